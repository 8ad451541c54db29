"""How sure the student is of an answer, from its tokens' log-probabilities (`Generation.logprobs`, taken after
the grammar mask). Pure functions: Serve scores each answer with them and evaluation calibrates on them.

    conf = answer_confidence(gen.text, gen.token_ends, gen.logprobs)
    conf["call"]          # one number in [0, 1] for the whole answer (the aggregate `AGGREGATES[name]` picks)
    conf["arguments"]     # {"restaurant_name": 0.41, "date": 0.99, ...}: which value a reviewer should doubt
    conf["aggregates"]    # every candidate aggregate, so evaluation can choose the best ranker on validation

Which tokens count: every token of the answer's tool calls, from the `{` after `<tool_call>` to the end of the
call. Under the tool-call grammar a token the grammar forces (`{"name": `, a closing quote it requires) has
log-probability 0, so a product or a minimum over the call is decided by the tokens that carried a choice: the
function name, each argument value, and whether another argument follows (an optional argument added or left out
is the choice of the token after a value). A mean over all tokens would be flattered by the forced ones, so the
mean here is over choice tokens only (log-probability below `FORCED`).

Candidate aggregates of a call (each in [0, 1]):
    min      the least likely choice token's probability
    product  the probability of the whole call (exp of the sum of its log-probabilities)
    mean     the mean probability of its choice tokens
    values   the least likely argument value or function name (each value's probability is the product over the
             tokens that overlap its JSON text, quotes included)
A text answer (no tool call: a label of a classifier, free text) is scored the same way over all its tokens,
with no arguments. An answer without log-probabilities (an engine that gives none) has confidence None:
callers treat that as "not confident" (fail closed).
"""

from __future__ import annotations

import json
import math
from typing import Sequence

FORCED = -1e-4  # a log-probability above this is taken as forced (probability > 0.9999): no choice was made
AGGREGATES = ("min", "product", "mean", "values")
DEFAULT_AGGREGATE = "min"
_OPEN = "<tool_call>"


def answer_confidence(text: str, token_ends: Sequence[int], logprobs: Sequence[float],
                      aggregate: str = DEFAULT_AGGREGATE) -> dict | None:
    """{"call": aggregate's value, "aggregate", "aggregates": {name: value}, "name": p | None,
    "arguments": {argument: p}} for one answer; None without usable log-probabilities."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"confidence aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if not logprobs or len(token_ends) != len(logprobs) or not all(math.isfinite(x) for x in logprobs):
        return None
    spans = call_spans(text)
    if spans is None:  # a text answer: every token counts
        values: dict = {}
        name = None
        picked = list(range(len(logprobs)))
    else:
        picked = _tokens_in(token_ends, spans["calls"])
        name = _span_probability(token_ends, logprobs, spans["name"]) if spans["name"] else None
        values = {arg: _span_probability(token_ends, logprobs, [span]) for arg, span in spans["arguments"].items()}
    chosen = [logprobs[i] for i in picked] or [0.0]
    choices = [x for x in chosen if x < FORCED]
    aggregates = {"min": math.exp(min(chosen)), "product": math.exp(sum(chosen)),
                  "mean": sum(math.exp(x) for x in choices) / len(choices) if choices else 1.0,
                  "values": min([*values.values(), *([name] if name is not None else [])], default=1.0)}
    return {"call": aggregates[aggregate], "aggregate": aggregate, "aggregates": aggregates, "name": name,
            "arguments": values}


def call_spans(text: str) -> dict | None:
    """Character spans in `text` of its tool calls: {"calls": [(start, end)], "name": [(start, end)],
    "arguments": {argument: (start, end)}} (JSON value text, quotes included; a later call's argument of the
    same name wins); None for an answer with no `<tool_call>`. A call cut short spans to the end of the text."""
    if _OPEN not in text:
        return None
    calls, names, arguments = [], [], {}
    at = text.find(_OPEN)
    while at >= 0:
        start = at + len(_OPEN)
        while start < len(text) and text[start].isspace():
            start += 1
        fields, end = _object_fields(text, start)
        calls.append((start, end))
        if "name" in fields:
            names.append(fields["name"])
        if "arguments" in fields:
            inner, _ = _object_fields(text, fields["arguments"][0])
            arguments.update(inner)
        at = text.find(_OPEN, end)
    return {"calls": calls, "name": names, "arguments": arguments}


def _object_fields(text: str, start: int) -> tuple[dict[str, tuple[int, int]], int]:
    """({key: (value start, value end)}, end of the object) of the JSON object at `start`; a broken or cut
    object gives the fields read so far and the end of what could be read."""
    decoder, fields = json.JSONDecoder(), {}
    if start >= len(text) or text[start] != "{":
        return fields, start
    i = _skip(text, start + 1)
    while i < len(text) and text[i] != "}":
        try:
            key, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return fields, len(text)
        i = _skip(text, i)
        if i >= len(text) or text[i] != ":":
            return fields, len(text)
        begin = _skip(text, i + 1)
        try:
            _, end = decoder.raw_decode(text, begin)
        except json.JSONDecodeError:
            fields[str(key)] = (begin, len(text))
            return fields, len(text)
        fields[str(key)] = (begin, end)
        i = _skip(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip(text, i + 1)
    return fields, min(len(text), i + 1)


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _tokens_in(token_ends: Sequence[int], spans: list[tuple[int, int]]) -> list[int]:
    """Indices of the tokens whose text overlaps any span."""
    picked, begin = [], 0
    for i, end in enumerate(token_ends):
        if any(begin < b and end > a for a, b in spans):
            picked.append(i)
        begin = max(begin, end)
    return picked


def _span_probability(token_ends: Sequence[int], logprobs: Sequence[float], spans: list[tuple[int, int]]) -> float:
    return math.exp(sum(logprobs[i] for i in _tokens_in(token_ends, spans)))
