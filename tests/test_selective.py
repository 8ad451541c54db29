"""Selective serving: the binomial tail, the Learn-then-Test certificate (checked by simulation against a known
accuracy curve), and the descriptive helpers. Pure functions, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flywheel.evaluate.selective import (auroc, binom_cdf, cascade_summary, certify, check_on_test,
                                         expected_calibration_error, min_calibration_size, risk_coverage,
                                         wilson_interval)


def _brute_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1))


@pytest.mark.parametrize("n", [0, 1, 2, 5, 13, 30])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.5, 0.97, 1.0])
def test_binom_cdf_matches_brute_force(n, p):
    for k in range(-1, n + 2):
        assert binom_cdf(k, n, p) == pytest.approx(_brute_cdf(k, n, p) if k >= 0 else 0.0, abs=1e-12)


def test_binom_cdf_edges_and_large_n():
    assert binom_cdf(0, 0, 0.3) == 1.0
    assert binom_cdf(-1, 0, 0.3) == 0.0
    assert binom_cdf(0, 45, 0.05) == pytest.approx(0.95 ** 45)
    # large n: no overflow, and the mean's tail is near one half
    assert 0.45 < binom_cdf(5000, 10000, 0.5) < 0.55
    assert binom_cdf(10, 100000, 0.05) < 1e-300 or binom_cdf(10, 100000, 0.05) == 0.0
    with pytest.raises(ValueError):
        binom_cdf(1, 3, 1.5)


def test_min_calibration_size():
    assert min_calibration_size(0.95, 0.1) == 45
    assert 0.95 ** 45 <= 0.1 < 0.95 ** 44
    assert min_calibration_size(0.9, 0.1) == 22  # 0.9**22 = 0.098, 0.9**21 = 0.109
    assert min_calibration_size(0.5, 0.5) == 1
    for bad in (0.0, 1.0, -0.1, 1.2):
        with pytest.raises(ValueError):
            min_calibration_size(bad, 0.1)
        with pytest.raises(ValueError):
            min_calibration_size(0.95, bad)


def _true_accuracy(lam: float) -> float:
    """s ~ Uniform(0, 1), P(right | s) = 1 - (1 - s)**2 / 2, so A(lam) = mean over s >= lam = 1 - (1 - lam)**2 / 6;
    A(lam) >= 0.95 exactly when lam >= 1 - sqrt(0.3) = 0.452 (the best possible coverage is 0.548)."""
    return 1.0 - (1.0 - lam) ** 2 / 6.0


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    s = rng.uniform(size=n)
    return s, rng.uniform(size=n) < 1.0 - 0.5 * (1.0 - s) ** 2


def _naive_threshold(s: np.ndarray, y: np.ndarray, target: float) -> float | None:
    """The lowest threshold whose EMPIRICAL accepted accuracy reaches target: no certificate at all."""
    order = np.argsort(-s)
    acc = np.cumsum(y[order]) / np.arange(1, len(s) + 1)
    ok = np.flatnonzero(acc >= target)
    return float(s[order][ok[-1]]) if len(ok) else None


def test_certificate_holds_on_a_known_accuracy_curve():
    target, delta, draws, n = 0.95, 0.1, 2000, 500
    rng = np.random.default_rng(20250601)
    violations = naive_violations = 0
    coverage = []
    for _ in range(draws):
        s, y = _draw(rng, n)
        cert = certify(s, y, target, delta)
        if cert["threshold"] is not None:
            assert cert["accepted"] >= 45
            assert cert["p_value"] <= delta
            assert cert["coverage"] == pytest.approx(float(np.mean(s >= cert["threshold"])))
            violations += _true_accuracy(cert["threshold"]) < target
        coverage.append(cert["coverage"])
        naive = _naive_threshold(s, y, target)
        naive_violations += naive is not None and _true_accuracy(naive) < target
    slack = 3 * math.sqrt(delta * (1 - delta) / draws)
    rate, mean_cov = violations / draws, float(np.mean(coverage))
    print(f"violation rate {rate:.4f} (delta {delta}), mean coverage {mean_cov:.3f} (best possible 0.548), "
          f"naive violation rate {naive_violations / draws:.3f}")
    assert rate <= delta + slack
    assert 0.2 < mean_cov < 0.548  # it serves a real share, and never more than the curve allows
    assert np.mean(np.array(coverage) > 0) > 0.8
    assert naive_violations / draws > delta + slack  # the simulation can tell a certificate from none


def test_nothing_certified_when_every_threshold_is_a_true_null():
    """Accuracy 0.93 everywhere: every threshold's null is true, so certifying anything is an error."""
    rng = np.random.default_rng(7)
    draws = 1000
    wrong = sum(certify(rng.uniform(size=400), rng.uniform(size=400) < 0.93)["threshold"] is not None
                for _ in range(draws))
    assert wrong / draws <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / draws)


def test_a_student_never_right_is_not_certified():
    cert = certify(np.linspace(0, 1, 200), [False] * 200)
    assert cert["threshold"] is None and cert["coverage"] == 0.0 and cert["accepted"] == 0
    assert cert["p_value"] is not None and cert["p_value"] > 0.1
    assert "45" in cert["reason"]


def test_too_few_records_are_not_certified():
    cert = certify(np.linspace(0.5, 1, 20), [True] * 20)
    assert cert["threshold"] is None and cert["tested"] == 0
    assert "45" in cert["reason"] and "20" in cert["reason"]
    # 45 all right is just enough; 44 is not
    assert certify(np.linspace(0.5, 1, 45), [True] * 45)["threshold"] == pytest.approx(0.5)
    assert certify(np.linspace(0.5, 1, 44), [True] * 44)["threshold"] is None


def test_certify_picks_the_lowest_rejected_threshold_and_stops_at_the_first_failure():
    # 100 right answers at high confidence, then 100 wrong ones at low confidence
    conf = np.concatenate([np.linspace(0.6, 1.0, 100), np.linspace(0.0, 0.4, 100)])
    right = [True] * 100 + [False] * 100
    cert = certify(conf, right)
    # accepting the top 100 + j wrong: p-value binom_cdf(j, 100 + j, 0.05) <= 0.1 holds for j <= 1 only
    assert binom_cdf(1, 101, 0.05) <= 0.1 < binom_cdf(2, 102, 0.05)
    assert cert["accepted"] == 101 and cert["errors"] == 1
    assert cert["threshold"] == pytest.approx(0.4)
    assert cert["accepted_accuracy"] == pytest.approx(100 / 101)
    assert cert["coverage"] == pytest.approx(101 / 200)
    assert cert["p_value"] == pytest.approx(binom_cdf(1, 101, 0.05))
    assert cert["tested"] == 100 - 45 + 1 + 2  # from the 45th record down, stopping at the first failure
    # 60 right, 10 wrong, then 1000 right: the pooled set at the bottom would pass (10 of 1070 wrong), but the
    # walk stops at the first threshold it cannot reject and never gets there
    conf = np.concatenate([np.linspace(0.9, 1.0, 60), np.linspace(0.8, 0.85, 10), np.linspace(0.0, 0.7, 1000)])
    right = [True] * 60 + [False] * 10 + [True] * 1000
    assert binom_cdf(10, 1070, 0.05) <= 0.1
    stop = certify(conf, right)
    assert binom_cdf(1, 61, 0.05) > 0.1  # the first wrong answer already stops the walk
    assert stop["accepted"] == 60 and stop["errors"] == 0 and stop["threshold"] == pytest.approx(0.9)
    assert stop["tested"] == 60 - 45 + 1 + 1
    # a higher floor on accepted records moves the start, not the answer here
    assert certify(conf, right, min_accepted=150)["threshold"] is None


def test_non_finite_confidences_are_never_accepted():
    conf = [0.9] * 60 + [math.nan] * 30 + [math.inf] * 10
    right = [True] * 60 + [False] * 40
    cert = certify(conf, right)
    assert cert["threshold"] == 0.9 and cert["accepted"] == 60 and cert["errors"] == 0
    assert cert["coverage"] == pytest.approx(0.6)
    curve = risk_coverage(conf, right)
    assert [row["threshold"] for row in curve] == [0.9]
    only_nan = certify([math.nan] * 100, [True] * 100)
    assert only_nan["threshold"] is None and "0 calibration records" in only_nan["reason"]


def test_certify_validates_its_inputs():
    with pytest.raises(ValueError, match="3 confidences but 2"):
        certify([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="target"):
        certify([0.1], [1], target=1.0)
    with pytest.raises(ValueError, match="delta"):
        certify([0.1], [1], delta=0.0)
    with pytest.raises(ValueError, match="0/1"):
        certify([0.1, 0.2], [1, 2])


def test_risk_coverage_curve():
    curve = risk_coverage([0.9, 0.9, 0.5, 0.1], [1, 0, 1, 1])
    assert curve == [{"threshold": 0.9, "accepted": 2, "coverage": 0.5, "accepted_accuracy": 0.5},
                     {"threshold": 0.5, "accepted": 3, "coverage": 0.75, "accepted_accuracy": 2 / 3},
                     {"threshold": 0.1, "accepted": 4, "coverage": 1.0, "accepted_accuracy": 0.75}]


def test_check_on_test():
    rng = np.random.default_rng(3)
    s, y = _draw(rng, 4000)
    out = check_on_test(s, y, 0.6, 0.95)
    assert out["accepted"] == int(np.sum(s >= 0.6)) and out["n_test"] == 4000
    lo, hi = out["accepted_accuracy_ci"]
    assert lo <= out["accepted_accuracy"] <= hi and hi - lo < 0.05
    assert out["coverage_ci"][0] <= out["coverage"] <= out["coverage_ci"][1]
    assert out["holds"]  # A(0.6) = 0.973
    assert not check_on_test(s, y, 0.0, 0.95)["holds"]  # A(0) = 0.833: refuted
    none = check_on_test(s, y, None, 0.95)
    assert none["accepted"] == 0 and none["coverage"] == 0.0 and none["accepted_accuracy"] is None
    assert none["holds"] and none["coverage_ci"][0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(33, 33)[0] == pytest.approx(0.8957, abs=1e-3)
    assert wilson_interval(0, 0) is None


def test_auroc():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    # one discordant pair out of four, and one tie: (2 + 0.5) / 4
    assert auroc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auroc([0.3, 0.7], [1, 1]) is None
    assert auroc([math.nan, 0.2], [0, 1]) == 1.0  # NaN ranks lowest


def test_expected_calibration_error():
    # bin [0.2, 0.3): confidence 0.25, 1 of 4 right; bin [0.7, 0.8): confidence 0.75, 3 of 4 right
    assert expected_calibration_error([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0]) == pytest.approx(0.0)
    # always 0.9 sure, right half the time
    assert expected_calibration_error([0.9] * 10, [1, 0] * 5) == pytest.approx(0.4)
    # 1.0 lands in the last bin
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == pytest.approx(0.0)
    rng = np.random.default_rng(11)
    p = rng.uniform(size=50000)
    assert expected_calibration_error(p, rng.uniform(size=50000) < p) < 0.02
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [1])


def test_cascade_summary():
    conf = [0.9, 0.8, 0.4, 0.2]
    out = cascade_summary(conf, [1, 0, 1, 0], [1, 1, 0, 1], threshold=0.5, student_cost=1.0, teacher_cost=10.0)
    assert out["accepted"] == 2 and out["coverage"] == 0.5
    assert out["cascade_accuracy"] == pytest.approx(0.5)  # student 1, 0; teacher 0, 1
    assert out["teacher_accuracy"] == pytest.approx(0.75)
    assert out["student_accuracy"] == pytest.approx(0.5) and out["accepted_accuracy"] == pytest.approx(0.5)
    assert out["cascade_cost"] == pytest.approx(4 * 1.0 + 2 * 10.0)
    assert out["teacher_only_cost"] == pytest.approx(40.0)
    assert out["teacher_cost_saved"] == pytest.approx(1 - 24 / 40)
    none = cascade_summary(conf, [1, 0, 1, 0], [1, 1, 0, 1], None, 1.0, 10.0)
    assert none["accepted"] == 0 and none["cascade_accuracy"] == pytest.approx(0.75)
    assert none["teacher_cost_saved"] == pytest.approx(-0.1)  # drafts paid for, nothing served


def test_answers_serve_would_defer_are_never_accepted_by_the_certificate():
    from flywheel.evaluate.calibrate import servable_scores

    tools = [{"type": "function", "function": {"name": "Pick", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["SF"]}}, "required": ["city"]}}}]
    call = '<tool_call>{"name": "Pick", "arguments": {"city": "SF"}}</tool_call>'
    texts = [call, call + '<tool_call>{"name": "Pi', call.replace("SF", "LA"), call.replace("Pick", "Gone")]
    run = {"text": texts, "finish_reason": ["stop", "length", "stop", "stop"],
           "confidence": [{"aggregates": {"min": 0.9}}] * 4}
    got = servable_scores(run, [tools] * 4, "min")
    assert got[0] == 0.9 and all(math.isnan(x) for x in got[1:])
    # fail closed: certified on them, 3 of 4 records are never accepted, however sure the student was
    assert certify(got * 30, [1, 1, 1, 1] * 30, 0.8, 0.1)["coverage"] == pytest.approx(0.25)
