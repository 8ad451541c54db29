"""The promotion gate: fail closed.

A candidate passes only when every rule holds (`m` is the task's primary metric, `metrics.PRIMARY`):

1. it clears the teacher: the LOWER bound of the candidate's 95% interval of `m` is at least
   `min_share_of_teacher` x the teacher's `m`. The lower bound is the percentile-bootstrap one (`<m>_ci`); for a
   0/1-per-example metric (accuracy, function-name accuracy) it is the smaller of that and the Wilson bound,
   because a bootstrap of 20/20 correct collapses to [1, 1] and would certify a perfect score on any sample size;
2. it does not regress production (when an agent has one): the candidate's point estimate of `m` is at least
   production's lower bound minus `max_regression` (default 0). A candidate that is statistically
   indistinguishable from production passes; one below production's whole interval fails;
3. the results are whole: at least `min_examples` scored examples, and every system scored exactly the
   `n_expected` examples of the test split (a partial run is never promoted);
4. nothing is missing or broken: each metric and interval is a finite number (not NaN, not text), intervals are
   `[lo, hi]` with `lo <= hi`.

Anything else fails, with the reasons listed. The gate never raises on bad input: a broken report is a "no".
The candidate is whichever row the caller names: `flywheel evaluate` gates the candidate decoded as Serve decodes
it (under each request's tool-call grammar), and scores production the same way.
"""

from __future__ import annotations

import math
from typing import Any

from flywheel.metrics import BINARY, PRIMARY, wilson_lower


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) or math.isinf(x):
        return None
    return float(x)


def _interval(x: Any) -> tuple[float, float] | None:
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        return None
    lo, hi = _number(x[0]), _number(x[1])
    return (lo, hi) if lo is not None and hi is not None and lo <= hi else None


def lower_bound(metric: str, point: float, ci: tuple[float, float], n: int) -> float:
    """The bound rule 1 uses: the bootstrap lower bound, and no higher than Wilson's for a 0/1 metric."""
    return min(ci[0], wilson_lower(point, n)) if metric in BINARY else ci[0]


def _system(report: dict, name: str, metric: str, reasons: list[str]) -> tuple[float | None, tuple | None, Any]:
    """(point, interval, n) of one system's `metric`; appends a reason for each missing or broken piece."""
    row = report.get(name)
    if not isinstance(row, dict):
        reasons.append(f"{name} results are missing")
        return None, None, None
    point, ci = _number(row.get(metric)), _interval(row.get(f"{metric}_ci"))
    if point is None:
        reasons.append(f"{name} {metric} is missing or not a number ({row.get(metric)!r})")
    if ci is None and name != "teacher":
        reasons.append(f"{name} {metric}_ci is missing or broken ({row.get(f'{metric}_ci')!r})")
    return point, ci, row.get("n")


def _whole(name: str, n: Any, expected: Any, min_examples: int, reasons: list[str]) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < min_examples:
        reasons.append(f"{name}: only {n!r} scored examples (< min_examples={min_examples})")
    elif not isinstance(expected, int) or n != expected:
        reasons.append(f"partial results: {name} scored {n} of {expected!r} test examples")


def decide(report: dict | None, min_share_of_teacher: float, min_examples: int, max_regression: float = 0.0,
           candidate: str = "candidate", metric: str = "", selective: dict | None = None) -> dict:
    """`report` = {"task", "n_expected", `candidate`, "teacher", "production" (absent or None: no production)};
    each system is {<metric>: x, "<metric>_ci": [lo, hi], "n": k}. `candidate` names the row to gate: the
    candidate decoded as Serve will decode it; `metric` the gated metric (empty: the task's primary).
    `selective` (the report's selective block) replaces rule 1 with the certificate's rules
    (`calibrate.gate_reasons`). Returns {"passed", "reasons", "system", ...figures}."""
    if not isinstance(report, dict):
        return {"passed": False, "reasons": ["no evaluation report"]}
    metric = metric or PRIMARY.get(report.get("task"))
    if metric is None:
        return {"passed": False, "reasons": [f"unknown task {report.get('task')!r}"]}
    reasons: list[str] = []
    expected = report.get("n_expected")
    c, c_ci, n = _system(report, candidate, metric, reasons)
    t, _, t_n = _system(report, "teacher", metric, reasons)
    _whole(candidate, n, expected, min_examples, reasons)
    if isinstance(report.get("teacher"), dict):
        _whole("teacher", t_n, expected, min_examples, reasons)
    lower = lower_bound(metric, c, c_ci, n) if c is not None and c_ci and isinstance(n, int) else None
    threshold = None if t is None else min_share_of_teacher * t
    if selective is not None:
        from flywheel.evaluate.calibrate import gate_reasons

        reasons += gate_reasons(selective)
    elif lower is not None and threshold is not None and lower < threshold:
        reasons.append(f"candidate {metric} lower bound {lower:.3f} (point {c:.3f}) < {min_share_of_teacher:.2f} x "
                       f"teacher {t:.3f} = {threshold:.3f}")
    p = p_ci = None
    if report.get("production") is not None:
        p, p_ci, p_n = _system(report, "production", metric, reasons)
        _whole("production", p_n, expected, min_examples, reasons)
        if p is None or p_ci is None:
            reasons.append("production results are broken: cannot rule out a regression")
        elif c is not None and c < p_ci[0] - max_regression:
            reasons.append(f"candidate {metric} {c:.3f} regresses production (point {p:.3f}, lower bound "
                           f"{p_ci[0]:.3f}, max_regression {max_regression:.3f})")
    return {"passed": not reasons, "metric": metric, "system": candidate, "candidate": c,
            "candidate_ci": list(c_ci) if c_ci else None, "candidate_lower": lower, "teacher": t,
            "threshold": threshold, "production": p, "production_lower": p_ci[0] if p_ci else None,
            "max_regression": max_regression, "selective": selective is not None, "reasons": reasons}
