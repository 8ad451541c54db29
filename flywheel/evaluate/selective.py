"""Selective serving with a finite-sample certificate. Pure functions (standard library and numpy), no model.

The student answers a request only when its confidence is at least a per-agent threshold; everything else is
deferred to the teacher. `certify` picks the threshold on calibration records (confidence, exactly right or not)
so that, with probability at least 1 - delta over the calibration data, the answers the student serves are
exactly right at least `target` of the time. It is Learn-then-Test (Angelopoulos et al. 2021) with
fixed-sequence testing, the procedure of Trust-or-Escalate (Jung et al., ICLR 2025):

- each candidate threshold lam (a distinct confidence value) has the null hypothesis "the accuracy of the answers
  with confidence >= lam is below target", tested with the exact binomial p-value of its errors among them;
- candidates are tested from the highest down, and the walk stops at the first one not rejected at level delta;
  the certified threshold is the lowest rejected one. Testing in a fixed order controls the family-wise error at
  delta with no multiplicity correction: a wrong certificate needs the first true null in the order rejected.

A threshold that accepts fewer than `min_calibration_size(target, delta)` records can never be rejected, even
with no errors (target**n > delta), so a walk started above it would stop at once. The walk therefore starts at
the highest threshold that accepts that many. The start depends on the confidences alone, never on which
answers were right, and under the usual assumption that accuracy does not fall as the threshold rises the
guarantee is unchanged; `tests/test_selective.py` checks the error rate by simulation.

Confidences that are NaN or infinite count as the lowest of all: no candidate threshold is such a value, so
those records are never accepted and always go to the teacher.

`check_on_test` checks a certificate on held-out data, `risk_coverage`, `auroc` and
`expected_calibration_error` describe the confidence itself, and `cascade_summary` prices the cascade.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

from flywheel.metrics import binom_cdf, wilson_lower  # noqa: F401  (binom_cdf: callers import it here too)


def min_calibration_size(target: float, delta: float) -> int:
    """Smallest n with target**n <= delta: the fewest accepted records that can certify `target` at `delta`,
    and only when every one of them is right (45 for 0.95 at 0.1)."""
    _check_levels(target, delta)
    n = max(1, math.ceil(math.log(delta) / math.log(target)))
    while n > 1 and target ** (n - 1) <= delta:  # float rounding of the logs, either way
        n -= 1
    while target ** n > delta:
        n += 1
    return n


def _check_levels(target: float, delta: float) -> None:
    for name, x in (("target", target), ("delta", delta)):
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not 0.0 < x < 1.0:
            raise ValueError(f"{name} must be a number strictly between 0 and 1, got {x!r}")


def _scores(confidences: Sequence[float]) -> np.ndarray:
    """Confidences as floats; NaN and infinite values become -inf, below every candidate threshold."""
    conf = np.asarray(confidences, dtype=float).reshape(-1)
    return np.where(np.isfinite(conf), conf, -np.inf)


def _labels(correct: Sequence, n: int, name: str = "correct") -> np.ndarray:
    """0/1 (or bool) outcomes as a float array of length n."""
    y = np.asarray(correct, dtype=float).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{n} confidences but {len(y)} {name} values")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{name} must hold only 0/1 or True/False")
    return y


def _steps(conf: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds high to low, records accepted at each, errors among them), one per distinct finite value."""
    order = np.argsort(-conf, kind="stable")
    sc, errors = conf[order], np.cumsum(1.0 - y[order])
    finite = np.isfinite(sc)
    last = np.flatnonzero(finite & np.append(sc[1:] != sc[:-1], True))  # the end of each run of ties
    return sc[last], last + 1, errors[last].astype(int)


def certify(confidences: Sequence[float], correct: Sequence, target: float = 0.95, delta: float = 0.1,
            min_accepted: int = 1) -> dict:
    """The lowest confidence threshold whose accepted answers are certified right at least `target` of the time,
    with probability >= 1 - delta (module docstring). `min_accepted` raises the floor on how many calibration
    records the threshold must accept. Returns {"threshold" (None when nothing can be certified), "target",
    "delta", "n_calibration", "accepted", "errors", "coverage", "accepted_accuracy", "p_value", "tested",
    "reason" (None, or why nothing was certified)}."""
    _check_levels(target, delta)
    conf = _scores(confidences)
    y = _labels(correct, len(conf))
    n_total, need = len(conf), min_calibration_size(target, delta)
    floor = max(int(min_accepted), need)
    out = {"threshold": None, "target": target, "delta": delta, "n_calibration": n_total, "accepted": 0,
           "errors": 0, "coverage": 0.0, "accepted_accuracy": None, "p_value": None, "tested": 0, "reason": None}
    thresholds, accepted, errors = _steps(conf, y)
    usable = accepted >= floor
    if not usable.any():
        n_finite = int(accepted[-1]) if len(accepted) else 0
        out["reason"] = (f"only {n_finite} calibration records with a finite confidence; certifying accuracy >= "
                         f"{target} at delta={delta} needs at least {floor} accepted records (at least {need} "
                         f"even with zero errors, since {target}**n must be <= {delta})")
        return out
    best = first = None
    for j in np.flatnonzero(usable):
        p = binom_cdf(int(errors[j]), int(accepted[j]), 1.0 - target)
        out["tested"] += 1
        first = first or (j, p)
        if p > delta:
            break
        best = (j, p)
    if best is None:
        j, p = first
        n, k = int(accepted[j]), int(errors[j])
        out["p_value"] = p
        out["reason"] = (f"not certified: the first threshold tested ({thresholds[j]:.6g}, {n} accepted, {k} wrong, "
                         f"accuracy {(n - k) / n:.3f}) has p-value {p:.3g} > delta={delta}; certifying accuracy >= "
                         f"{target} needs at least {need} accepted records even with zero errors")
        return out
    j, p = best
    n, k = int(accepted[j]), int(errors[j])
    return out | {"threshold": float(thresholds[j]), "accepted": n, "errors": k, "coverage": n / n_total,
                  "accepted_accuracy": (n - k) / n, "p_value": p}


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval of a proportion at `level`; None when there is nothing to measure."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    return [wilson_lower(p, n, z), 1.0 - wilson_lower(1.0 - p, n, z)]


def check_on_test(confidences: Sequence[float], correct: Sequence, threshold: float | None, target: float,
                  level: float = 0.95) -> dict:
    """A certificate checked on held-out test data. Returns {"threshold", "target", "level", "n_test",
    "accepted", "coverage", "coverage_ci", "accepted_accuracy", "accepted_accuracy_ci", "holds"}; `holds` is
    False only when the accepted accuracy's upper bound falls below `target` (the test data refute the
    certificate). `threshold` None accepts nothing: coverage 0, and nothing served that could be wrong."""
    conf = _scores(confidences)
    y = _labels(correct, len(conf))
    mask = conf >= threshold if threshold is not None else np.zeros(len(conf), dtype=bool)
    n, right = int(mask.sum()), int(y[mask].sum())
    acc_ci = wilson_interval(right, n, level)
    return {"threshold": threshold, "target": target, "level": level, "n_test": len(conf), "accepted": n,
            "coverage": n / len(conf) if len(conf) else 0.0, "coverage_ci": wilson_interval(n, len(conf), level),
            "accepted_accuracy": right / n if n else None, "accepted_accuracy_ci": acc_ci,
            "holds": acc_ci is None or acc_ci[1] >= target}


def risk_coverage(confidences: Sequence[float], correct: Sequence) -> list[dict]:
    """The risk-coverage curve: {"threshold", "accepted", "coverage", "accepted_accuracy"} at every distinct
    finite confidence, from the highest threshold down, for plotting."""
    conf = _scores(confidences)
    thresholds, accepted, errors = _steps(conf, _labels(correct, len(conf)))
    return [{"threshold": float(t), "accepted": int(n), "coverage": n / len(conf), "accepted_accuracy": (n - k) / n}
            for t, n, k in zip(thresholds, accepted, errors)]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sx = x[order]
    starts = np.flatnonzero(np.append(True, sx[1:] != sx[:-1]))
    ends = np.append(starts[1:], len(sx))
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(confidences: Sequence[float], correct: Sequence) -> float | None:
    """How well confidence ranks right answers above wrong ones: the Mann-Whitney statistic, ties counted half
    (1.0 perfect, 0.5 chance, 0.0 reversed). None when every answer is right, or every one wrong."""
    conf = _scores(confidences)
    y = _labels(correct, len(conf)).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    rank_sum = float(_average_ranks(conf)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def expected_calibration_error(confidences: Sequence[float], correct: Sequence, bins: int = 10) -> float | None:
    """ECE: the record-weighted mean of |accuracy - mean confidence| over `bins` equal-width bins of [0, 1]
    (1.0 falls in the last bin). Non-finite confidences are left out; None when no record is left."""
    conf = np.asarray(confidences, dtype=float).reshape(-1)
    y = _labels(correct, len(conf))
    keep = np.isfinite(conf)
    conf, y = conf[keep], y[keep]
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("expected_calibration_error needs confidences in [0, 1]")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not len(conf):
        return None
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    gap = np.abs(np.bincount(idx, weights=y, minlength=bins) - np.bincount(idx, weights=conf, minlength=bins))
    return float(gap.sum() / len(conf))


def cascade_summary(confidences: Sequence[float], student_correct: Sequence, teacher_correct: Sequence,
                    threshold: float | None, student_cost: float, teacher_cost: float) -> dict:
    """The cascade: the student's answer where confidence >= threshold, else the teacher's (threshold None
    defers everything). Cost model, per request: the student drafts every request, so an accepted one costs
    `student_cost` and a deferred one `student_cost + teacher_cost`; teacher-only serving costs `teacher_cost`.
    `teacher_cost_saved` is 1 - cascade cost / teacher-only cost, negative when too little is accepted to pay
    for the drafts. Returns {"threshold", "n", "accepted", "coverage", "cascade_accuracy",
    "accepted_accuracy", "student_accuracy", "teacher_accuracy", "cascade_cost", "teacher_only_cost",
    "teacher_cost_saved"} (costs are totals over the n requests)."""
    conf = _scores(confidences)
    s = _labels(student_correct, len(conf), "student_correct")
    t = _labels(teacher_correct, len(conf), "teacher_correct")
    n = len(conf)
    mask = conf >= threshold if threshold is not None else np.zeros(n, dtype=bool)
    k = int(mask.sum())
    cascade_cost = n * student_cost + (n - k) * teacher_cost
    teacher_only = n * teacher_cost
    mean = (lambda a: float(a.mean()) if len(a) else None)
    return {"threshold": threshold, "n": n, "accepted": k, "coverage": k / n if n else 0.0,
            "cascade_accuracy": mean(np.where(mask, s, t)), "accepted_accuracy": mean(s[mask]),
            "student_accuracy": mean(s), "teacher_accuracy": mean(t), "cascade_cost": cascade_cost,
            "teacher_only_cost": teacher_only,
            "teacher_cost_saved": 1.0 - cascade_cost / teacher_only if teacher_only else None}
