"""Safety and quality checks for curation: toxic content, tool calls that break their schema, length bounds.

    flywheel curate --agents sgd_Flights --toxicity-threshold 0.9 --max-prompt-chars 32000

Pure functions (no Ray), applied by `flywheel.curate.filters.clean_batch`. Reason codes (stable):

    toxic                  alt-profanity-check gives a user turn or the answer text a probability above
                           `toxicity_threshold` (scored once per batch, over its distinct texts)
    tool_schema_violation  the teacher's tool call does not validate against the declared tool's JSON Schema
                           (the validator's message is the detail)
    too_long, too_short    the request or the answer is outside the configured character bounds

Schema validation is lenient in one way only, the way evaluation compares arguments: a scalar whose text form
is what the schema declares passes (SGD declares `"enum": ["1", "2"]` with `"type": "string"`, and a teacher that
answers `2` means `"2"`; `"True"` for a boolean likewise). Everything the schema declares is checked; nothing it
does not declare (`additionalProperties` is open unless the schema closes it).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Iterable

R_TOXIC = "toxic"
R_SCHEMA = "tool_schema_violation"
R_TOO_LONG = "too_long"
R_TOO_SHORT = "too_short"


# --- toxicity ----------------------------------------------------------------------------------------------
def toxicity(texts: Iterable[str]) -> dict[str, float]:
    """alt-profanity-check probability (0..1) for each distinct text, scored in one call."""
    distinct = sorted({t for t in texts if t and t.strip()})
    if not distinct:
        return {}
    try:
        from profanity_check import predict_prob
    except ImportError as e:
        raise RuntimeError(f"the toxicity filter needs alt-profanity-check ({e}): `pip install -e .`, or set "
                           f"toxicity_threshold: 1.0 to turn the filter off") from None
    return dict(zip(distinct, (float(p) for p in predict_prob(distinct))))


def scored_texts(messages: list[dict], answer: dict | None) -> list[tuple[str, str]]:
    """(where, text) pairs the toxicity filter scores: every user turn and the answer's text."""
    out = [(f"user turn {i + 1}", m["content"]) for i, m in enumerate(m for m in messages if m.get("role") == "user")
           if m.get("content")]
    if answer and answer.get("content"):
        out.append(("answer", answer["content"]))
    return out


def toxic_detail(pairs: list[tuple[str, str]], scores: dict[str, float], threshold: float) -> str | None:
    """The detail for a `toxic` record (the worst text and its probability), or None when all are below."""
    worst = max(pairs, key=lambda p: scores.get(p[1], 0.0), default=None)
    if worst is None or scores.get(worst[1], 0.0) <= threshold:
        return None
    return f"profanity p={scores[worst[1]]:.2f} > toxicity_threshold={threshold} in {worst[0]}: {worst[1][:80]!r}"


# --- tool-call schema --------------------------------------------------------------------------------------
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


# --- length bounds -----------------------------------------------------------------------------------------
def chars(m: dict | None) -> int:
    """Characters of one message: its text and its tool-call arguments."""
    if not m:
        return 0
    return len(m.get("content") or "") + sum(len(tc.get("arguments") or "") for tc in m.get("tool_calls") or [])


def length_violation(messages: list[dict], answer: dict | None, max_prompt_chars: int, max_answer_chars: int,
                     min_answer_chars: int) -> tuple[str, str] | None:
    """(reason, detail) when the request or the answer is outside the character bounds (0 turns a bound off)."""
    prompt, got = sum(chars(m) for m in messages), chars(answer)
    if max_prompt_chars and prompt > max_prompt_chars:
        return R_TOO_LONG, f"the request has {prompt} characters > max_prompt_chars={max_prompt_chars}"
    if max_answer_chars and got > max_answer_chars:
        return R_TOO_LONG, f"the answer has {got} characters > max_answer_chars={max_answer_chars}"
    if answer and not answer.get("tool_calls") and got < min_answer_chars:
        return R_TOO_SHORT, f"the answer has {got} characters < min_answer_chars={min_answer_chars}"
    return None
