"""The promotion gate: fail closed.

A candidate passes only when every check below holds; anything missing, NaN, partial or too small fails, with
the reasons listed. The gate never raises on bad input: a broken report is a "no".
"""

from __future__ import annotations

import math
from typing import Any

from flywheel.evaluate.metrics import PRIMARY, wilson_lower


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) or math.isinf(x):
        return None
    return float(x)


def decide(report: dict | None, min_share_of_teacher: float, min_examples: int) -> dict:
    """`report` = {"task", "n_expected", "candidate": metrics, "teacher": metrics, "production": metrics|None}."""
    reasons: list[str] = []
    if not isinstance(report, dict):
        return {"passed": False, "reasons": ["no evaluation report"]}
    task = report.get("task")
    metric = PRIMARY.get(task)
    if metric is None:
        return {"passed": False, "reasons": [f"unknown task {task!r}"]}
    cand = report.get("candidate") if isinstance(report.get("candidate"), dict) else {}
    teacher = report.get("teacher") if isinstance(report.get("teacher"), dict) else {}
    c, t, n = _number(cand.get(metric)), _number(teacher.get(metric)), cand.get("n")
    if c is None:
        reasons.append(f"candidate {metric} is missing or not a number ({cand.get(metric)!r})")
    if t is None:
        reasons.append(f"teacher {metric} is missing or not a number ({teacher.get(metric)!r})")
    if not isinstance(n, int) or n < min_examples:
        reasons.append(f"only {n!r} scored examples (< min_examples={min_examples})")
    expected = report.get("n_expected")
    if isinstance(n, int) and isinstance(expected, int) and n != expected:
        reasons.append(f"partial results: {n} of {expected} examples scored")
    if c is not None and t is not None and c < min_share_of_teacher * t:
        reasons.append(f"candidate {metric} {c:.3f} < {min_share_of_teacher:.2f} x teacher {t:.3f}")
    prod = report.get("production")
    if isinstance(prod, dict):
        p = _number(prod.get(metric))
        if p is None:
            reasons.append(f"production {metric} is missing: cannot rule out a regression")
        elif c is not None and c < p:
            reasons.append(f"candidate {metric} {c:.3f} regresses production {p:.3f}")
    return {"passed": not reasons, "metric": metric, "candidate": c, "teacher": t,
            "candidate_lower_95": wilson_lower(c, n) if c is not None and isinstance(n, int) else None,
            "threshold": None if t is None else min_share_of_teacher * t, "reasons": reasons}
