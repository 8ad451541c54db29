"""The Arrow schemas that are the contracts between the stages of the loop.

A *log record* is one request an agent made and the answer that served it (capture -> curate).
A *curated example* is one cleaned, redacted example in one split: train (distill), validation (selection: sweeps,
early stopping) or test (the gate, evaluation figures); read through `flywheel.datasets`.
A *quarantined record* is anything that could not become a log record or an example, with the reason.

`normalise_message` turns an OpenAI-shaped message (the chat API's, a log's, a reviewer's correction) into the
MESSAGE row every stage stores, or raises `Rejected` with one of the reason codes below; `digest` and
`canonical_json` are the one way ids and comparisons are derived from JSON.

Messages and the answer are typed nested columns. Tool declarations (`tools_json`) and tool-call
arguments stay JSON text: they are arbitrary JSON Schema / JSON objects chosen by each agent, and Arrow
would otherwise infer a different struct type per agent.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

R_BAD_MESSAGES = "bad_messages"
R_BAD_RESPONSE = "bad_response"
R_BAD_TOOL_ARGUMENTS = "bad_tool_arguments"
R_MISTYPED = "mistyped_field"
SESSION_KEYS = ("session_id", "conversation_id", "thread_id", "dialogue_id", "sgd_dialogue_id")  # read in this order
ROLES = {"system", "user", "assistant", "tool", "developer", "function"}

TOOL_CALL = pa.struct(
    [
        ("id", pa.string()),
        ("name", pa.string()),
        ("arguments", pa.string()),  # JSON object text, normalised at ingest
    ]
)

MESSAGE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("name", pa.string()),
        ("tool_call_id", pa.string()),
        ("tool_calls", pa.list_(TOOL_CALL)),
    ]
)

LOG_RECORD = pa.schema(
    [
        ("record_id", pa.string()),  # stable: a replay of the same record has the same id
        ("agent_id", pa.string()),
        ("tenant", pa.string()),
        ("timestamp", pa.float64()),  # seconds since the epoch (ordinal in some public logs)
        ("session_id", pa.string()),  # conversation id when the source has one; splits group by it
        ("messages", pa.list_(MESSAGE)),
        ("tools_json", pa.string()),  # JSON list of OpenAI tool declarations, "[]" when none
        ("response", MESSAGE),
        ("model", pa.string()),  # the model or adapter that answered
        ("latency_ms", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("feedback", pa.float64()),  # -1 (bad) .. 1 (good), null when none
        ("source", pa.string()),  # "serve", or the file an ingested line came from, with its line
        ("extra_json", pa.string()),  # JSON object of the source's unrecognised top-level fields, null when none
    ]
)

EXAMPLE = pa.schema(
    [
        ("example_id", pa.string()),
        ("record_id", pa.string()),
        ("agent_id", pa.string()),
        ("session_id", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("tools_json", pa.string()),
        ("target", MESSAGE),  # the teacher's answer the student learns
        ("label", pa.string()),  # tool name(s) for tool calls, the class for classifiers, "text" otherwise
        ("task", pa.string()),  # "tool_call" | "classification" | "text"
        ("split", pa.string()),  # "train" | "validation" | "test" (versions before the three-way split: "eval")
    ]
)

QUARANTINE = pa.schema(
    [
        ("reason", pa.string()),  # a stable reason code, see flywheel.capture.ingest / flywheel.curate.filters
        ("detail", pa.string()),
        ("stage", pa.string()),
        ("source", pa.string()),
        ("record_id", pa.string()),
        ("agent_id", pa.string()),
        ("raw", pa.string()),
    ]
)


def quarantine_row(reason: str, detail: str, source: str, raw: str, stage: str = "ingest",
                   record_id: str | None = None, agent_id: str | None = None) -> dict:
    """One QUARANTINE row: a stable reason code, what was wrong, where, and the input's first 4 KiB."""
    return {"reason": reason, "detail": detail, "stage": stage, "source": source,
            "record_id": record_id, "agent_id": agent_id, "raw": raw[:4096]}


def message(role: str, content: str | None = None, tool_calls: list[dict] | None = None,
            name: str | None = None, tool_call_id: str | None = None) -> dict[str, Any]:
    """A message row in the `MESSAGE` shape (every key present)."""
    return {"role": role, "content": content, "name": name, "tool_call_id": tool_call_id,
            "tool_calls": tool_calls}


def to_openai_message(m: dict[str, Any]) -> dict[str, Any]:
    """A `MESSAGE` row back to the OpenAI chat message shape (arguments stay JSON text)."""
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
    if m.get("name"):
        out["name"] = m["name"]
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"id": tc.get("id") or f"call_{i}", "type": "function",
             "function": {"name": tc["name"], "arguments": tc["arguments"]}}
            for i, tc in enumerate(m["tool_calls"])
        ]
    return out


def tools_of(row: dict[str, Any]) -> list[dict]:
    return json.loads(row.get("tools_json") or "[]")


def last_user_text(messages: list[dict] | None) -> str:
    """The content of a conversation's last user message ("" when there is none)."""
    return next((m.get("content") or "" for m in reversed(list(messages or [])) if m.get("role") == "user"), "")


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


# --- OpenAI-shaped messages -> MESSAGE rows ----------------------------------------------------------------
class Rejected(ValueError):
    """A value that cannot become a row: `reason` is a stable code (the `R_*` constants), `detail` says where."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def digest(*parts: Any, n: int = 32) -> str:
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:n]


def _text(content: Any, where: str) -> str | None:
    """OpenAI content: a string, null, or a list of parts (text parts are joined)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
        return "".join(texts)
    raise Rejected(R_MISTYPED, f"{where}.content must be text, null or a list of parts, got {type(content).__name__} "
                               f"{content!r:.40}")


def normalise_arguments(args: Any, where: str) -> str:
    if args is None or args == "":
        return "{}"
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise Rejected(R_BAD_TOOL_ARGUMENTS, f"{where}: arguments are not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise Rejected(R_BAD_TOOL_ARGUMENTS, f"{where}: arguments must be a JSON object, got {type(args).__name__}")
    return canonical_json(args)


def normalise_tool_calls(calls: Any, where: str) -> list[dict] | None:
    if not calls:
        return None
    if not isinstance(calls, list):
        raise Rejected(R_BAD_RESPONSE, f"{where}.tool_calls must be a list")
    out = []
    for i, tc in enumerate(calls):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise Rejected(R_BAD_RESPONSE, f"{where}.tool_calls[{i}] has no function name")
        out.append({"id": tc.get("id"), "name": fn["name"],
                    "arguments": normalise_arguments(fn.get("arguments"), f"{where}.tool_calls[{i}]")})
    return out


def normalise_message(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise Rejected(R_MISTYPED, f"{where} must be an object, got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise Rejected(R_BAD_MESSAGES, f"{where}.role is {role!r}; expected one of {sorted(ROLES)}")
    return message(role, _text(m.get("content"), where), normalise_tool_calls(m.get("tool_calls"), where),
                   m.get("name") if isinstance(m.get("name"), str) else None,
                   m.get("tool_call_id") if isinstance(m.get("tool_call_id"), str) else None)
