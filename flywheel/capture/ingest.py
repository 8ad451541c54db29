"""Normalise external agent logs into `schema.LOG_RECORD` rows; anything else is quarantined with a reason.

    flywheel ingest logs.jsonl [more.jsonl.gz s3://bucket/logs.jsonl ...] --json

(Reading the files: `flywheel.capture.reader`; writing the rows: `flywheel.capture.store.ingest_file`.)

Accepted line shapes (one JSON object per line):
- NVIDIA Data Flywheel Blueprint records: `request` (OpenAI chat request), `response` (a chat completion, or a
  list of streamed chunks), `workload_id`, `client_id`, `timestamp`.
- OpenAI chat JSONL: `messages` ending with the assistant answer, optional `tools`, agent id from `agent_id`,
  `workload_id` or `metadata.agent_id` (or the `agent_id` given to ingest).
- Flywheel's own records (what Serve captures).
Tool-call `arguments` may be JSON objects or JSON strings; both become canonical JSON text.

Every rejected line carries a stable reason code (the `R_*` constants) and its source location (`file:line`):

    invalid_json      not JSON, or a line cut off mid-object (a truncated write)
    invalid_utf8      bytes that are not UTF-8
    oversized_record  a line longer than the cap (`IngestConfig.max_line_bytes`)
    not_an_object     valid JSON that is not an object
    unknown_format    neither `request`+`response` nor `messages`
    missing_field     a required field is absent (e.g. `response`)
    mistyped_field    a known field holds the wrong JSON type (messages not a list, content a number,
                      timestamp neither a number nor an ISO-8601 time, feedback not a number, ...)
    bad_messages      messages empty, or a message with an unknown role
    bad_response      the answer is neither text nor a tool call, or has no message
    bad_tool_arguments, bad_tools    tool-call arguments / tool declarations that are not what they claim
    missing_agent_id  no agent id anywhere (pass --agent-id)
    unknown_agent     an agent id outside the configured allowlist (`IngestConfig.known_agents`)
    invalid_id        an agent or tenant id that cannot name a path (`flywheel.ids`: `../x`, `a/b`, 5,000
                      characters, control characters, ...); the detail names the field

Unknown *extra* top-level fields are kept, not rejected: they travel as JSON text in `extra_json`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Collection, Iterable

from flywheel.ids import InvalidId, check_id
from flywheel.schema import (R_BAD_MESSAGES, R_BAD_RESPONSE, R_BAD_TOOL_ARGUMENTS, R_MISTYPED,  # noqa: F401
                             SESSION_KEYS, Rejected, canonical_json, digest, message, normalise_arguments,
                             normalise_message, normalise_tool_calls, quarantine_row)

R_INVALID_UTF8 = "invalid_utf8"
R_INVALID_JSON = "invalid_json"
R_NOT_OBJECT = "not_an_object"
R_UNKNOWN_FORMAT = "unknown_format"
R_MISSING_FIELD = "missing_field"
R_BAD_TOOLS = "bad_tools"
R_NO_AGENT = "missing_agent_id"
R_OVERSIZED = "oversized_record"
R_UNKNOWN_AGENT = "unknown_agent"
R_INVALID_ID = "invalid_id"

# Top-level fields this module reads; every other top-level field is kept verbatim in `extra_json`.
CORE_KEYS = {"request", "response", "messages", "tools", "model", "agent_id", "workload_id", "client_id", "tenant",
             "timestamp", "metadata", "record_id", "latency_ms", "feedback", "usage", "session_id"}
DEFAULT_MAX_LINE_BYTES = 1_000_000


def reassemble_stream(chunks: list) -> dict:
    """Streamed `chat.completion.chunk`s -> one assistant message (content and tool-call deltas joined)."""
    content, calls = [], {}
    for chunk in chunks:
        for choice in (chunk or {}).get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                content.append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                slot = calls.setdefault(tc.get("index", 0), {"id": None, "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                args = fn.get("arguments")
                slot["function"]["arguments"] += args if isinstance(args, str) else (canonical_json(args) if args else "")
    return {"role": "assistant", "content": "".join(content) or None,
            "tool_calls": [calls[k] for k in sorted(calls)] or None}


def response_message(resp: Any) -> dict:
    """The answer inside a chat completion, a streamed list of chunks, or a bare message."""
    if isinstance(resp, list):
        resp = reassemble_stream(resp)
    if not isinstance(resp, dict):
        raise Rejected(R_BAD_RESPONSE, "response is not an object")
    if "choices" in resp:
        choices = resp["choices"]
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise Rejected(R_BAD_RESPONSE, "response.choices is empty")
        msg = choices[0].get("message") or choices[0].get("delta")
        if msg is None:
            raise Rejected(R_BAD_RESPONSE, "response.choices[0] has no message")
        resp = msg
    msg = normalise_message({"role": "assistant", **resp}, "response")
    if not msg["tool_calls"] and not (msg["content"] or "").strip():
        raise Rejected(R_BAD_RESPONSE, "response has neither text content nor tool calls")
    return msg


def _tools(tools: Any) -> str:
    if tools is None:
        return "[]"
    if not isinstance(tools, list):
        raise Rejected(R_BAD_TOOLS, "tools must be a list of tool declarations")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise Rejected(R_BAD_TOOLS, f"tools[{i}] has no function.name")
    return canonical_json(tools)


def _usage(resp: Any) -> tuple[int | None, int | None]:
    usage = resp.get("usage") if isinstance(resp, dict) else None
    if not isinstance(usage, dict):
        return None, None
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


def _number(value: Any, default: float | None) -> float | None:
    """A number, a numeric string or an ISO-8601 time as float seconds; `default` when it is none of these."""
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else default
    if isinstance(value, str):
        try:
            number = float(value)
            return number if math.isfinite(number) else default
        except ValueError:
            from datetime import datetime

            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return default
    return default


def _typed_number(obj: dict, meta: dict, key: str, default: float | None, iso: bool = False) -> float | None:
    """`obj[key]` (else `metadata[key]`) as a float; absent -> `default`; present but not a number -> mistyped."""
    value = obj.get(key, meta.get(key))
    if value is None:
        return default
    number = _number(value, None)
    if number is None or (not iso and isinstance(value, str) and not _is_numeric(value)):
        kind = "a number or an ISO-8601 time" if iso else "a number"
        raise Rejected(R_MISTYPED, f"{key} must be {kind}, got {type(value).__name__} {value!r:.40}")
    return number


def _is_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def extra_fields(obj: dict) -> str | None:
    """The record's unrecognised top-level fields as canonical JSON text (None when there are none)."""
    extra = {k: v for k, v in obj.items() if k not in CORE_KEYS}
    return canonical_json(extra) if extra else None


def _first(obj: dict, meta: dict, fields: tuple[str, ...], default: tuple[str, Any]) -> tuple[str, Any]:
    """(field, value) of the first field that is set (`metadata.x` reads the metadata), else `default`."""
    for name in fields:
        value = meta.get(name[9:]) if name.startswith("metadata.") else obj.get(name)
        if value:
            return name, value
    return default


def _check_id(field: str, kind: str, value: str) -> str:
    try:
        return check_id(kind, value)
    except InvalidId as e:
        raise Rejected(R_INVALID_ID, f"{field}: {e}") from None


def parse_record(obj: Any, source: str, default_agent: str = "", tenant: str = "default") -> dict:
    """One decoded JSON object -> a LOG_RECORD row, or `Rejected` with a reason code."""
    if not isinstance(obj, dict):
        raise Rejected(R_NOT_OBJECT, f"a line must be a JSON object, got {type(obj).__name__}")
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    if "request" in obj:  # blueprint / flywheel shape
        req = obj["request"]
        if not isinstance(req, dict):
            raise Rejected(R_MISTYPED, f"request must be an object with messages, got {type(req).__name__}")
        if "response" not in obj:
            raise Rejected(R_MISSING_FIELD, "response is missing")
        raw_messages, tools, resp = req.get("messages"), req.get("tools"), obj["response"]
        answer = response_message(resp)
        model = (resp.get("model") if isinstance(resp, dict) else None) or req.get("model")
    elif "messages" in obj:  # OpenAI chat JSONL: the last assistant message is the answer
        raw_messages, tools = obj["messages"], obj.get("tools")
        if not isinstance(raw_messages, list):
            raise Rejected(R_MISTYPED, f"messages must be a list, got {type(raw_messages).__name__}")
        if not raw_messages:
            raise Rejected(R_BAD_MESSAGES, "messages must be a non-empty list")
        if not isinstance(raw_messages[-1], dict) or raw_messages[-1].get("role") != "assistant":
            raise Rejected(R_BAD_RESPONSE, "the last message must be the assistant's answer")
        answer = response_message(raw_messages[-1])
        raw_messages, resp, model = raw_messages[:-1], {}, obj.get("model")
    else:
        raise Rejected(R_UNKNOWN_FORMAT, "expected `request`+`response` (blueprint) or `messages` (OpenAI JSONL)")
    if raw_messages is None:
        raise Rejected(R_MISSING_FIELD, "request.messages is missing")
    if not isinstance(raw_messages, list):
        raise Rejected(R_MISTYPED, f"request.messages must be a list, got {type(raw_messages).__name__}")
    if not raw_messages:
        raise Rejected(R_BAD_MESSAGES, "request.messages must be a non-empty list")
    messages = [normalise_message(m, f"messages[{i}]") for i, m in enumerate(raw_messages)]
    agent_field, agent = _first(obj, meta, ("agent_id", "workload_id", "metadata.agent_id"),
                                ("--agent-id", default_agent))
    if agent and not isinstance(agent, str):
        raise Rejected(R_MISTYPED, f"the agent id must be text, got {type(agent).__name__} {agent!r:.40}")
    if not agent:
        raise Rejected(R_NO_AGENT, "no agent id (agent_id, workload_id or metadata.agent_id); pass --agent-id")
    _check_id(agent_field, "agent id", agent)
    tenant_field, tenant = _first(obj, meta, ("tenant", "client_id", "metadata.tenant"),
                                  ("--tenant", tenant or "default"))
    tenant = _check_id(tenant_field, "tenant id", str(tenant))
    tools_json = _tools(tools)
    ts = _typed_number(obj, meta, "timestamp", 0.0, iso=True)
    session = next((str(obj[k]) for k in SESSION_KEYS if obj.get(k) not in (None, "")), None)
    session = session or next((str(meta[k]) for k in SESSION_KEYS if meta.get(k) not in (None, "")), None)
    prompt_tokens, completion_tokens = _usage(resp)
    record_id = obj.get("record_id") if isinstance(obj.get("record_id"), str) else None
    record_id = record_id or digest(agent, ts, messages, tools_json, answer)
    return {
        "record_id": record_id, "agent_id": agent, "tenant": tenant,
        "timestamp": ts, "session_id": session, "messages": messages, "tools_json": tools_json,
        "response": answer, "model": model if isinstance(model, str) else None,
        "latency_ms": _typed_number(obj, {}, "latency_ms", None),
        "prompt_tokens": prompt_tokens if isinstance(prompt_tokens, int) else None,
        "completion_tokens": completion_tokens if isinstance(completion_tokens, int) else None,
        "feedback": _typed_number(obj, meta, "feedback", None),
        "source": source, "extra_json": extra_fields(obj),
    }


def parse_lines(lines: Iterable[bytes], source: str, default_agent: str = "", tenant: str = "default",
                max_bytes: int = DEFAULT_MAX_LINE_BYTES, known_agents: Collection[str] = (),
                first_line: int = 1) -> tuple[list[dict], list[dict]]:
    """Raw JSONL lines -> (records, quarantined). Blank lines are skipped; every other line lands in one.

    `known_agents`, when given, is an allowlist: records of any other agent are quarantined as `unknown_agent`.
    `first_line` numbers the first line (ingest feeds a large file in chunks).
    """
    for kind, value in (("agent id (--agent-id)", default_agent), ("tenant id (--tenant)", tenant)):
        if value:
            check_id(kind, value)  # a bad setting, not a bad line: InvalidId for the caller
    allow = frozenset(known_agents)
    records, quarantined = [], []
    for lineno, raw in enumerate(lines, start=first_line):
        where = f"{source}:{lineno}"
        if not raw.strip():
            continue
        preview = raw[:4096].decode("utf-8", "replace")
        if len(raw) > max_bytes:
            size = f"{len(raw)}{'+' if len(raw) == max_bytes + 1 else ''} bytes"  # a streamed line is cut at cap+1
            quarantined.append(quarantine_row(
                R_OVERSIZED, f"the line is longer than max_line_bytes={max_bytes} ({size}); raise the cap to accept it",
                where, preview))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            quarantined.append(quarantine_row(R_INVALID_UTF8, str(e), where, preview))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            cut = e.pos >= len(text.rstrip())
            detail = f"{e.msg} at column {e.colno}" + (" (the line ends mid-value: truncated?)" if cut else "")
            quarantined.append(quarantine_row(R_INVALID_JSON, detail, where, text))
            continue
        try:
            record = parse_record(obj, where, default_agent, tenant)
            if allow and record["agent_id"] not in allow:
                raise Rejected(R_UNKNOWN_AGENT, f"agent {record['agent_id']!r} is not among the known agents "
                                                f"{sorted(allow)}; add it to known_agents to accept it")
            records.append(record)
        except Rejected as e:
            agent = obj.get("workload_id") or obj.get("agent_id") if isinstance(obj, dict) else None
            quarantined.append(quarantine_row(e.reason, e.detail, where, text,
                                              agent_id=agent if isinstance(agent, str) else None))
    return records, quarantined
