"""Selective serving: whether the student's held answer is served or the request is deferred to the teacher, and
what the captured record says about it. Pure functions; `flywheel.serve.ingress` holds the answer and asks.

An agent in `selective` mode (`flywheel.routing`) has a threshold certified on its validation split
(`flywheel.evaluate.selective.certify`): the student's answer is served when all of these hold, else the teacher
answers and that is what the client gets:

    confidence     the answer's confidence (`flywheel.inference.confidence`, the aggregate the threshold was
                   certified for) is at least the threshold; a confidence that cannot be computed defers
    complete       the answer was not cut off by the token cap (finish_reason "length")
    valid call     a tool call parses, names a declared tool and its arguments satisfy that tool's JSON Schema
                   (`flywheel.checks.call_problem`: what the grammar could not enforce)
    safe output    the answer's text does not trip the unsafe-content check (`flywheel.serve.guardrails`)

The record of a served answer carries its confidence; a deferred one carries the student's draft (answer and
confidences) beside the teacher's answer, so the review queue sees a disagreement, `low_confidence` fires from
the real confidence, curation gives it priority, and the monitor counts the fallback. A deferred request the
teacher cannot answer gets the teacher's error, or (agents in `draft_when_teacher_down`) the student's draft
marked low-confidence; a guardrail deferral (truncated, invalid call, unsafe output) always gets the error.
"""

from __future__ import annotations

import math

from flywheel.checks import INVALID_CALL, TRUNCATED, unservable

LOW_CONFIDENCE, NO_CONFIDENCE = "low_confidence", "no_confidence"
UNSAFE_OUTPUT = "unsafe_output"
GUARDRAIL_REASONS = (TRUNCATED, INVALID_CALL, UNSAFE_OUTPUT)
DEFERRED_PRIORITY = 1  # curation keeps deferred records first where records compete (as review labels)


def picked_confidence(confidence: dict | None, aggregate: str) -> float | None:
    """The answer's confidence under `aggregate`; None when missing or not a finite number (fail closed)."""
    value = ((confidence or {}).get("aggregates") or {}).get(aggregate)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def deferral(text: str, finish_reason: str, confidence: float | None, threshold: float | None,
             tools: list[dict], unsafe: bool = False) -> str | None:
    """Why the answer must go to the teacher (a reason code above), or None when the student's answer is served.
    `threshold` None: no confidence rule (guardrails only); `unsafe`: the output check tripped."""
    problem = unservable(text, finish_reason, tools)
    if problem:
        return problem
    if unsafe:
        return UNSAFE_OUTPUT
    if threshold is None:
        return None
    if confidence is None:
        return NO_CONFIDENCE
    return LOW_CONFIDENCE if confidence < threshold else None


def served_extra(mode: str, confidence: dict | None, value: float | None, threshold: float | None) -> dict:
    """`extra_json` of a record the student answered."""
    return {"route": mode, "confidence": value, "threshold": threshold,
            "arguments_confidence": (confidence or {}).get("arguments") or {}}


def deferred_extra(mode: str, reason: str, draft: dict, draft_model: str, confidence: dict | None,
                   value: float | None, threshold: float | None) -> dict:
    """`extra_json` of a record the teacher answered after the student's `draft` (MESSAGE shape) was deferred."""
    return {"route": mode, "fallback": reason, "confidence": value, "threshold": threshold,
            "priority": DEFERRED_PRIORITY,
            "shadow": {"model": draft_model, "response": draft, "confidence": value,
                       "arguments_confidence": (confidence or {}).get("arguments") or {}},
            **({"guardrails": [{"name": reason, "passed": False}]} if reason in GUARDRAIL_REASONS else {})}


def unanswered_extra(extra: dict, error: str) -> dict:
    """`extra_json` of a deferred request served with the student's draft because the teacher failed."""
    return {**extra, "teacher_error": error, "low_confidence": True}


def shadow_extra(draft: dict | None, draft_model: str, confidence: dict | None, value: float | None,
                 error: str | None = None) -> dict:
    """`extra_json` of a shadow record: the teacher served it, the student's answer is logged beside it."""
    if draft is None:
        return {"route": "shadow", "shadow_error": error}
    return {"route": "shadow", "confidence": value,
            "shadow": {"model": draft_model, "response": draft, "confidence": value,
                       "arguments_confidence": (confidence or {}).get("arguments") or {}}}
