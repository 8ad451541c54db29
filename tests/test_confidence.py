"""The confidence of an answer from its tokens' log-probabilities (`flywheel.inference.confidence`), on answers
cut into tokens by hand: which tokens count for the call, each argument value and the function name.

    .venv/bin/python -m pytest tests/test_confidence.py -q
"""

from __future__ import annotations

import math

import pytest

from flywheel.inference.confidence import AGGREGATES, answer_confidence, call_spans


def tokens(*pieces: tuple[str, float]) -> tuple[str, list[int], list[float]]:
    """(text, token ends, log-probabilities) of an answer given as (token text, probability) pieces."""
    text, ends, logprobs = "", [], []
    for piece, p in pieces:
        text += piece
        ends.append(len(text))
        logprobs.append(math.log(p))
    return text, ends, logprobs


CALL = tokens(("<tool_call>", 0.9), ('{"name": "', 1.0), ("Reserve", 0.8), ('Table", "arguments": {"', 1.0),
              ("city", 0.7), ('": "', 1.0), ("San", 0.5), (" Jose", 0.9), ('", "', 0.6), ("time", 1.0),
              ('": "', 1.0), ("17:30", 0.2), ('"}}', 1.0), ("</tool_call>", 1.0))


def test_a_call_is_scored_on_its_choice_tokens_with_a_confidence_per_value():
    conf = answer_confidence(*CALL)
    # "<tool_call>" comes before the call's JSON: its 0.9 does not count.
    assert conf["aggregates"]["min"] == pytest.approx(0.2)
    assert conf["aggregates"]["product"] == pytest.approx(0.8 * 0.7 * 0.5 * 0.9 * 0.6 * 0.2)
    assert conf["aggregates"]["mean"] == pytest.approx((0.8 + 0.7 + 0.5 + 0.9 + 0.6 + 0.2) / 6)
    # A value's tokens are those overlapping its JSON text, quotes included (the token that closes it too).
    assert conf["arguments"]["city"] == pytest.approx(0.5 * 0.9 * 0.6)
    assert conf["arguments"]["time"] == pytest.approx(0.2)
    assert conf["name"] == pytest.approx(0.8)
    assert conf["aggregates"]["values"] == pytest.approx(0.2) and conf["call"] == conf["aggregates"]["min"]
    assert answer_confidence(*CALL, aggregate="product")["call"] == conf["aggregates"]["product"]


def test_spans_of_two_calls_and_of_a_call_cut_short():
    text = '<tool_call>{"name": "A", "arguments": {"x": 1}}</tool_call>\n<tool_call>{"name": "B", "arguments": {"y": [1, 2]}}'
    spans = call_spans(text)
    assert [text[a:b] for a, b in spans["name"]] == ['"A"', '"B"']
    assert {k: text[a:b] for k, (a, b) in spans["arguments"].items()} == {"x": "1", "y": "[1, 2]"}
    cut = '<tool_call>{"name": "A", "arguments": {"x": "unfinis'
    spans = call_spans(cut)
    assert cut[slice(*spans["arguments"]["x"])] == '"unfinis' and spans["calls"][0][1] == len(cut)
    assert call_spans("plain text") is None


def test_a_text_answer_counts_every_token_and_no_logprobs_is_none():
    conf = answer_confidence(*tokens(("Pos", 0.9), ("itive", 1.0)))
    assert conf["call"] == pytest.approx(0.9) and conf["arguments"] == {} and conf["name"] is None
    assert answer_confidence("Positive", [], []) is None  # an engine without log-probabilities: fail closed
    assert answer_confidence("ab", [1, 2], [float("nan"), 0.0]) is None
    with pytest.raises(ValueError, match="aggregate"):
        answer_confidence(*CALL, aggregate="median")
    assert set(answer_confidence(*CALL)["aggregates"]) == set(AGGREGATES)
