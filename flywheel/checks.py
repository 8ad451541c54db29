"""Checks of a request or an answer that every stage shares: curation (which answers become training targets),
monitoring (which live answers are unusable), review and evaluation (which student calls are broken), metrics
(normal forms). Pure functions, no store, no Ray.

What is wrong with an answer (`answer_problem`), as curation's stable reason codes:

    unknown_tool           it calls a tool the request did not declare
    bad_tool_arguments     a call's arguments are not a JSON object
    tool_schema_violation  a call's arguments break the declared tool's JSON Schema (the validator's message is
                           the detail)
    empty_answer           neither text nor a tool call
    refusal                the text is a refusal ("I'm sorry, ...", "As an AI ...")

Whether an answer is a broken tool call (`call_problem`: what review flags and evaluation's valid-call rate counts)
is a narrower question with one more code, `unparsed_tool_call` (call text the parser left over, or a call written
as plain JSON text): text answers, refusals included, are not broken calls; an empty answer is one only where tools
are declared; a call is unknown when no tool is declared at all.

Whether a student's answer can be served as it is (`unservable`: Serve's guardrails before any confidence rule,
and the certificate's, so a threshold is certified on the answers Serve would actually serve):

    truncated              the answer was cut off by the token cap (finish_reason "length")
    invalid_call           a tool call that does not parse, names an undeclared tool or breaks its schema

Schema validation is lenient in one way only, the way evaluation compares arguments: a scalar whose text form
is what the schema declares passes (SGD declares `"enum": ["1", "2"]` with `"type": "string"`, and a teacher that
answers `2` means `"2"`; `"True"` for a boolean likewise). Everything the schema declares is checked; nothing it
does not declare (`additionalProperties` is open unless the schema closes it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any

from flywheel.prompts import parse_answer

R_EMPTY = "empty_answer"
R_REFUSAL = "refusal"
R_UNKNOWN_TOOL = "unknown_tool"
R_BAD_ARGS = "bad_tool_arguments"
R_SCHEMA = "tool_schema_violation"
R_UNPARSED = "unparsed_tool_call"
TRUNCATED, INVALID_CALL = "truncated", "invalid_call"

REFUSAL_RE = re.compile(r"^\s*(i'?m sorry|i am sorry|i can(?:no|')t (?:help|assist)|as an ai\b|i am unable to|"
                        r"i'm unable to)", re.IGNORECASE)


# --- normal forms and keys ---------------------------------------------------------------------------------
def normalise_text(text: str | None) -> str:
    return re.sub(r"\s+", " ", (text or "").strip().lower())


def class_label(content: str | None) -> str | None:
    """A short answer (`[[Earnings]]`, `positive`) as a class label candidate; None for prose."""
    text = normalise_text(content).strip("[](){}<>\"'`.:; ")
    return text if text and len(text.split()) <= 6 and len(text) <= 64 else None


def dedup_key(agent: str, messages: list[dict], tools_json: str) -> str:
    """Exact-duplicate key: the agent plus the normalised request (every turn and the declared tools).

    The whole request, not just the last user turn: in multi-turn logs "yes, thanks" recurs with different
    context and different correct answers.
    """
    parts = [agent, tools_json or "[]"]
    for m in messages:
        parts.append(f"{m.get('role')}:{normalise_text(m.get('content'))}")
        for tc in m.get("tool_calls") or []:
            parts.append(f"call:{tc.get('name')}:{tc.get('arguments')}")
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def tool_names(tools_json: str | None) -> set[str]:
    try:
        tools = json.loads(tools_json or "[]")
        return {t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    except (json.JSONDecodeError, TypeError, KeyError):
        return set()


# --- what is wrong with an answer --------------------------------------------------------------------------
def answer_problem(tools_json: str | None, answer: dict[str, Any] | None) -> tuple[str, str] | None:
    """(reason code, detail) of an unusable answer (MESSAGE shape), or None: see the module doc."""
    calls = (answer or {}).get("tool_calls") or []
    if not calls:
        content = ((answer or {}).get("content") or "").strip()
        if not content:
            return R_EMPTY, "the answer has neither text nor tool calls"
        return (R_REFUSAL, content[:120]) if REFUSAL_RE.match(content) else None
    return _calls_problem(tools_json, calls, tool_names(tools_json) or None)  # nothing declared: any name


def call_problem(tools_json: str | None, answer: dict[str, Any] | None) -> tuple[str, str] | None:
    """(reason code, detail) of an answer (MESSAGE shape) that is a broken tool call, or None: see the module doc."""
    content, calls = ((answer or {}).get("content") or "").strip(), (answer or {}).get("tool_calls") or []
    if "<tool_call>" in content:
        return R_UNPARSED, f"the answer tried a tool call that did not parse: {content[:120]!r}"
    if not calls and content.startswith("{") and '"name"' in content:
        return R_UNPARSED, f"a tool call written as text instead of a call: {content[:120]!r}"
    declared = tool_names(tools_json)
    if not calls:
        return (R_EMPTY, "an empty answer where tools are declared") if not content and declared else None
    return _calls_problem(tools_json, calls, declared)


def _calls_problem(tools_json: str | None, calls: list[dict], declared: set[str] | None) -> tuple[str, str] | None:
    """The first broken call: a name outside `declared` (None: any name), arguments not an object, or arguments
    that break the declared schema."""
    for tc in calls:
        name = tc.get("name") or ""
        if declared is not None and name not in declared:
            return R_UNKNOWN_TOOL, f"called {name!r}, which is not among the declared tools {sorted(declared)}"
        try:
            args = json.loads(tc.get("arguments") or "{}")
        except (ValueError, TypeError):
            args = None
        if not isinstance(args, dict):
            return R_BAD_ARGS, f"the arguments of {name!r} are not a JSON object"
        violation = schema_violation(tools_json or "[]", name, args)
        if violation:
            return R_SCHEMA, violation
    return None


# --- a tool call against its declared schema --------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _validators(tools_json: str) -> dict[str, Any]:
    """Tool name -> a jsonschema validator for its parameters, or the error text of a broken declaration."""
    import jsonschema
    from jsonschema.validators import validator_for

    out: dict[str, Any] = {}
    for tool in json.loads(tools_json or "[]"):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            continue
        schema = fn.get("parameters")
        if not isinstance(schema, dict) or not schema:
            continue
        cls = validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            out[fn["name"]] = f"the declared parameters of {fn['name']!r} are not valid JSON Schema: {e.message}"
            continue
        out[fn["name"]] = cls(schema)
    return out


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    return {t} if isinstance(t, str) else set(t or ())


def _as_declared(value: Any, schema: Any) -> Any:
    """`value` with scalars given in another type's text form read as the declared type (see the module doc)."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        return {k: _as_declared(v, props.get(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_declared(v, schema.get("items")) for v in value]
    types, enum = _types(schema), schema.get("enum")
    if isinstance(value, (bool, int, float)) and "string" in types and not types & {"number", "integer", "boolean"}:
        text = str(value) if isinstance(value, bool) or not float(value).is_integer() else str(int(value))
        matches = [e for e in enum or () if isinstance(e, str) and e.strip().lower() == text.lower()]
        return matches[0] if matches else text
    if isinstance(value, str) and enum and value not in enum:  # "true" for "True", " 2" for "2"
        matches = [e for e in enum if isinstance(e, str) and e.strip().lower() == value.strip().lower()]
        if matches:
            return matches[0]
    if isinstance(value, str) and "string" not in types:
        s = value.strip()
        if "boolean" in types and s.lower() in ("true", "false"):
            return s.lower() == "true"
        try:
            if "integer" in types and float(s).is_integer():
                return int(float(s))
            if "number" in types:
                return float(s)
        except ValueError:
            pass
    return value


def schema_violation(tools_json: str, name: str, arguments: dict) -> str | None:
    """Why a tool call's arguments break the declared tool's schema, or None when they validate (or the tool
    declares no parameters schema)."""
    import jsonschema

    validator = _validators(tools_json or "[]").get(name)
    if validator is None:
        return None
    if isinstance(validator, str):
        return validator
    error = jsonschema.exceptions.best_match(validator.iter_errors(_as_declared(arguments, validator.schema)))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{name}: {error.message}" + (f" (at {where})" if where else "")


def unservable(text: str, finish_reason: str, tools: list[dict]) -> str | None:
    """Why a student's raw answer cannot be served whatever its confidence (TRUNCATED, INVALID_CALL), or None."""
    if finish_reason == "length":
        return TRUNCATED
    parsed = parse_answer(text)
    calls = [tc["function"] for tc in parsed["tool_calls"] or []]
    if not parsed["valid"] or call_problem(json.dumps(tools), {"content": parsed["content"], "tool_calls": calls}):
        return INVALID_CALL
    return None
