"""Per-request features for monitoring: pure functions over `MESSAGE` rows, no store, no Ray.

    flywheel monitor --agent sgd_Flights      # drift.py tests these against the agent's training reference

Two kinds, kept apart on purpose:

*Input* features describe the request only, so they mean the same for a training example (`schema.EXAMPLE`) and a
live record (`schema.LOG_RECORD`), whoever answered it. They are what input drift is tested on:

    text          the last user message, PII-redacted as curation redacts the reference (embedded by drift.py)
    chars, words  its length
    n_messages    messages in the request (how deep into a conversation)
    n_tools       tools the request declares
    key           the request's exact-duplicate key (curation's `dedup_key`): a retried request counts once

*Quality* features describe the answer a live request got. They are reported, never counted as input drift (a
weak student is a quality finding, not a change in what users ask):

    backend       "student" | "teacher" | "other", from the record's `model` ("student:<agent>@<v>", "teacher:...")
    invalid       why the answer is unusable (curation's reason codes: unknown_tool, bad_tool_arguments,
                  tool_schema_violation, empty_answer, refusal), or None
    fallback      the record says a student answer fell back to the teacher: `extra_json` {"fallback": ...} truthy
    selective     the record was routed selectively (`extra_json` {"route": "selective"}): served or deferred
    feedback      the user's feedback (-1 .. 1) or None
    shadow        for shadow samples (`extra_json` {"shadow": {"model": ..., "response": <MESSAGE>}}: the other
                  backend's answer to the same request), whether the two answers agree: {"function": bool,
                  "exact": bool}; None without one
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from flywheel.checks import answer_problem, dedup_key
from flywheel.pii import Redactor
from flywheel.schema import last_user_text

_WORD = re.compile(r"[a-z0-9']+")
MAX_TEXT_CHARS = 2000  # the text kept in the monitor's state (the embedding sees all of it)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes)."""
    return _WORD.findall((text or "").lower())


def n_tools(tools_json: str | None) -> int:
    """How many tools a request declares (`tools_json` is a JSON list; bad JSON counts as none)."""
    try:
        tools = json.loads(tools_json or "[]")
    except json.JSONDecodeError:
        return 0
    return len(tools) if isinstance(tools, list) else 0


def request_key(agent: str, messages: Sequence[dict[str, Any]] | None, tools_json: str | None) -> str:
    """Curation's exact-duplicate key of the whole request (every turn and the declared tools)."""
    return dedup_key(agent, list(messages or []), tools_json or "[]")[:16]


def input_features(messages: Sequence[dict[str, Any]] | None, tools_json: str | None = "[]",
                   agent: str = "") -> dict[str, Any]:
    """The input features of one request (see the module docstring); the same for EXAMPLE and LOG_RECORD rows."""
    text = last_user_text(messages)
    text = (Redactor()(text) or "") if text else ""  # redacted as curation redacts the reference
    return {"text": text, "chars": len(text), "words": len(words(text)), "n_messages": len(list(messages or [])),
            "n_tools": n_tools(tools_json), "key": request_key(agent, messages, tools_json)}


# -- answers -------------------------------------------------------------------------------------------------------
def invalid_reason(tools_json: str | None, answer: dict[str, Any] | None) -> str | None:
    """Why an answer is unusable, as curation's reason code (`flywheel.checks.answer_problem`), or None."""
    problem = answer_problem(tools_json, answer)
    return problem[0] if problem else None


def answer_label(answer: dict[str, Any] | None) -> str:
    """The tool name(s) an answer calls, comma-joined and sorted; "text" for a plain answer, "none" without one."""
    if not answer:
        return "none"
    names = sorted(tc.get("name") or "" for tc in answer.get("tool_calls") or [])
    return ",".join(names) if names else "text"



def _calls(answer: dict[str, Any] | None) -> tuple[list[str], list[Any]]:
    names, args = [], []
    for tc in sorted((answer or {}).get("tool_calls") or [], key=lambda t: t.get("name") or ""):
        names.append(tc.get("name") or "")
        try:
            args.append(json.loads(tc.get("arguments") or "{}"))
        except ValueError:
            args.append(tc.get("arguments"))
    return names, args


def agreement(answer: dict[str, Any] | None, other: dict[str, Any] | None) -> dict[str, bool]:
    """Whether two answers to one request agree: on the functions called ("text" for plain answers), and exactly
    (same functions with the same arguments as JSON values; the same normalised text for plain answers)."""
    (names_a, args_a), (names_b, args_b) = _calls(answer), _calls(other)
    if not names_a and not names_b:
        norm = [" ".join(((a or {}).get("content") or "").lower().split()) for a in (answer, other)]
        return {"function": True, "exact": norm[0] == norm[1]}
    return {"function": names_a == names_b, "exact": names_a == names_b and args_a == args_b}


def _extra(record: dict[str, Any]) -> dict[str, Any]:
    try:
        extra = json.loads(record.get("extra_json") or "{}")
    except (TypeError, ValueError):
        return {}
    return extra if isinstance(extra, dict) else {}


def backend_kind(model: str | None) -> str:
    kind = (model or "").split(":", 1)[0]
    return kind if kind in ("student", "teacher") else "other"


def quality_features(record: dict[str, Any]) -> dict[str, Any]:
    """The quality features of one live LOG_RECORD row (see the module docstring)."""
    extra = _extra(record)
    shadow = extra.get("shadow")
    other = shadow.get("response") if isinstance(shadow, dict) else None
    feedback = record.get("feedback")
    return {"backend": backend_kind(record.get("model")),
            "invalid": invalid_reason(record.get("tools_json"), record.get("response")),
            "fallback": bool(extra.get("fallback")),
            "selective": extra.get("route") == "selective",
            "feedback": float(feedback) if feedback is not None else None,
            "shadow": agreement(record.get("response"), other) if isinstance(other, dict) else None}


def live_features(record: dict[str, Any]) -> dict[str, Any]:
    """Input and quality features of one live record, with its id and time (one row of the monitor's window)."""
    feats = input_features(record.get("messages"), record.get("tools_json"), record.get("agent_id") or "")
    feats["text"] = feats["text"][:MAX_TEXT_CHARS]
    return {"id": record.get("record_id"), "ts": float(record.get("timestamp") or 0.0), **feats,
            **quality_features(record)}


def example_features(example: dict[str, Any]) -> dict[str, Any]:
    """Input features of one training example (`schema.EXAMPLE` row)."""
    feats = input_features(example.get("messages"), example.get("tools_json"), example.get("agent_id") or "")
    feats["text"] = feats["text"][:MAX_TEXT_CHARS]
    return feats
