"""Selective serving's evidence for one candidate: a confidence threshold certified on the VALIDATION split, then
checked on the TEST split, with the curves and costs a team needs to decide. `flywheel evaluate` calls it.

    block = selective_block(cfg, task, validation, decode, test_expected, test_run, tools, cost)
    block["certificate"]["threshold"]     # None: nothing certified (the reason says why, and the size that would do)
    block["test"]["holds"]                # the test split does not refute the certificate

The procedure (`flywheel.evaluate.selective.certify`): Learn-then-Test with fixed-sequence testing and an exact
binomial tail. With probability at least 1 - delta over the calibration data, the answers the student serves
(confidence >= threshold) are exactly right at least `selective_target` of the time. Its assumption: live
traffic is exchangeable with the validation split; drift breaks it (the monitor routes a drifted agent to the
teacher). Only the validation split certifies; the test split scores the one certified threshold.

"Exactly right" is `name_args_accuracy` for tool calls (function and every argument, type-aware) and `accuracy`
for classification; free text has no exact notion and gets no certificate. The confidence aggregate is the
configured one (`confidence_aggregate`); every aggregate's AUROC and calibration error on both splits is
reported beside it, so the choice can be revisited on validation figures.
"""

from __future__ import annotations

import json
import math
from typing import Callable

from flywheel.inference.confidence import AGGREGATES

EXACT = {"tool_call": "name_args_accuracy", "classification": "accuracy"}
CURVE_POINTS = 40


def scores(confidences: list[dict | None], aggregate: str) -> list[float]:
    """One number per answer; NaN where it has no confidence (never accepted first: fail closed)."""
    return [float((c or {}).get("aggregates", {}).get(aggregate, math.nan)) if c else math.nan for c in confidences]


def servable_scores(run: dict, tools: list[list[dict]], aggregate: str) -> list[float]:
    """`scores`, with NaN where Serve would defer the answer whatever its confidence (cut off by the token cap, or
    a broken call: `flywheel.checks.unservable`), so the certificate covers only answers Serve would serve."""
    from flywheel.checks import unservable

    texts, finished = run.get("text"), run.get("finish_reason")
    out = scores(run["confidence"], aggregate)
    if texts is None or finished is None:
        return out
    return [math.nan if unservable(t, f, tl) else x for x, t, f, tl in zip(out, texts, finished, tools)]


def correctness(task: str, expected: list[dict], answers: list[dict], tools: list[list[dict]]) -> list[int]:
    """1 where the answer is exactly right (`EXACT[task]`), else 0."""
    from flywheel.metrics import per_example

    return [int(v >= 1.0) for v in per_example(task, expected, answers, tools)[EXACT[task]]]


def rankers(confidences: list[dict | None], correct: list[int]) -> dict:
    """AUROC (right vs wrong) and expected calibration error of every aggregate."""
    from flywheel.evaluate.selective import auroc, expected_calibration_error

    return {name: {"auroc": auroc(scores(confidences, name), correct),
                   "ece": expected_calibration_error(scores(confidences, name), correct)} for name in AGGREGATES}


def thin(curve: list[dict], points: int = CURVE_POINTS) -> list[dict]:
    """At most `points` points of a risk-coverage curve, evenly spread, its last point kept."""
    if len(curve) <= points:
        return curve
    step = len(curve) / points
    return [curve[int(i * step)] for i in range(points)] + [curve[-1]]


def selective_block(cfg, task: str, validation: list[dict], decode: Callable, test_expected: list[dict],
                    test_run: dict, tools: list[list[dict]], cost: dict) -> dict:
    """The certificate (validation), its check on test, the risk-coverage curve and the cascade's cost.
    `decode(examples)` answers examples as the gated row was answered: {"answers", "confidence"}."""
    from flywheel.evaluate.selective import cascade_summary, certify, check_on_test, risk_coverage

    target, delta, aggregate = cfg.selective_target, cfg.selective_delta, cfg.confidence_aggregate
    if cfg.max_calibration_examples:
        validation = validation[: cfg.max_calibration_examples]
    val_tools = [json.loads(e.get("tools_json") or "[]") for e in validation]
    val_run = decode(validation) if validation else {"answers": [], "confidence": []}
    val_correct = correctness(task, [e["target"] for e in validation], val_run["answers"], val_tools)
    certificate = certify(servable_scores(val_run, val_tools, aggregate), val_correct, target, delta)
    test_scores = servable_scores(test_run, tools, aggregate)
    test_correct = correctness(task, test_expected, test_run["answers"], tools)
    threshold = certificate["threshold"]
    student = cost.get("student_per_1k_usd") or 0.0
    teacher = cost.get("teacher_per_1k_usd") or 0.0
    return {"target": target, "delta": delta, "aggregate": aggregate, "metric": EXACT[task],
            "certificate": certificate,
            "test": check_on_test(test_scores, test_correct, threshold, target),
            "curve": thin(risk_coverage(test_scores, test_correct)),
            "rankers": {"validation": rankers(val_run["confidence"], val_correct),
                        "test": rankers(test_run["confidence"], test_correct)},
            "cascade": cascade_summary(test_scores, test_correct, [1] * len(test_correct), threshold,
                                       student / 1000, teacher / 1000)}


def registry_certificate(block: dict) -> dict:
    """What the registry keeps with the version, and Serve reads: threshold, T, delta, aggregate, coverage and
    the certificate's figures on both splits."""
    cert, test = block["certificate"], block["test"]
    return {"threshold": cert["threshold"], "target": block["target"], "delta": block["delta"],
            "aggregate": block["aggregate"], "metric": block["metric"], "coverage": cert["coverage"],
            "accepted_accuracy": cert["accepted_accuracy"], "n_calibration": cert["n_calibration"],
            "reason": cert["reason"], "test": {k: test.get(k) for k in ("coverage", "coverage_ci",
                                                                        "accepted_accuracy", "accepted_accuracy_ci",
                                                                        "accepted", "n_test", "holds")}}


def gate_reasons(block: dict | None) -> list[str]:
    """Why selective serving cannot be promoted on this evidence ([]: it can). Fails closed on a missing block."""
    if not isinstance(block, dict):
        return ["no selective-serving evidence (calibration did not run)"]
    cert, test = block.get("certificate") or {}, block.get("test") or {}
    if cert.get("threshold") is None:
        return [f"no confidence threshold certified on validation: {cert.get('reason') or 'unknown'}"]
    reasons = []
    if not test.get("accepted"):
        reasons.append("the certified threshold accepts no test answer (coverage 0 on test)")
    elif not test.get("holds"):
        reasons.append(f"the test split refutes the certificate: accepted accuracy {test.get('accepted_accuracy')} "
                       f"with interval {test.get('accepted_accuracy_ci')} is below the target {block.get('target')}")
    return reasons


def markdown(block: dict | None) -> str:
    """The report's selective-serving section: the certificate, its check on test, the rankers, the risk-coverage
    curve (accepted accuracy against the share of traffic the student keeps) and the cascade's cost."""
    if not block:
        return ""
    cert, test, cascade = block["certificate"], block["test"], block["cascade"]
    t = cert["threshold"]
    lines = ["## Selective serving", "",
             f"Certificate (validation, {cert['n_calibration']} examples; Learn-then-Test, fixed sequence, exact "
             f"binomial): served answers exactly right ({block['metric']}) at least {block['target']:.2f} of the time "
             f"with probability >= {1 - block['delta']:.2f}. Confidence aggregate `{block['aggregate']}`. "
             + (f"Threshold **{t:.4f}**: coverage {cert['coverage']:.2f}, accepted accuracy "
                f"{cert['accepted_accuracy']:.3f} ({cert['accepted']} accepted, {cert['errors']} wrong)."
                if t is not None else f"**No threshold certified**: {cert['reason']}"), "",
             f"On test ({test['n_test']} examples): coverage {_fmt(test['coverage'])} {_ci(test['coverage_ci'])}, "
             f"accepted accuracy {_fmt(test['accepted_accuracy'])} {_ci(test['accepted_accuracy_ci'])}, "
             f"{test['accepted']} accepted; the certificate {'holds' if test['holds'] else 'is REFUTED'}.", "",
             f"Cascade (student where confident, else teacher) on test: exact-call accuracy "
             f"{_fmt(cascade.get('cascade_accuracy'))} vs teacher-only {_fmt(cascade.get('teacher_accuracy'))}; "
             f"share of teacher-only cost saved {_fmt(cascade.get('teacher_cost_saved'))} (every request is drafted "
             f"by the student first; a deferred one also costs the teacher).", "",
             "| aggregate | AUROC validation | ECE validation | AUROC test | ECE test |", "|---|---|---|---|---|"]
    for name, val in block["rankers"]["validation"].items():
        tst = block["rankers"]["test"][name]
        lines.append(f"| {name} | {_fmt(val['auroc'])} | {_fmt(val['ece'])} | {_fmt(tst['auroc'])} | "
                     f"{_fmt(tst['ece'])} |")
    lines += ["", "Risk-coverage on test (each row a threshold; `*` the certified one):", "",
              "| threshold | coverage | accepted accuracy |", "|---|---|---|"]
    for p in block["curve"]:
        mark = " *" if t is not None and abs(p["threshold"] - t) < 1e-12 else ""
        lines.append(f"| {p['threshold']:.4f}{mark} | {p['coverage']:.3f} | {_fmt(p['accepted_accuracy'])} |")
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"
