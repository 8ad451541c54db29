"""The OpenAI contract at Serve's boundary and the streamed deltas of the student's answer. Pure: no Ray, no model.

    .venv/bin/python -m pytest tests/test_protocol.py -q
"""

from __future__ import annotations

import json
import random

import pytest

from conftest import SGD_LOGS
from flywheel.capture.ingest import reassemble_stream
from flywheel.prompts import format_answer, parse_answer
from flywheel.serve.protocol import (APIError, SamplingParams, completion_from_text, parse_request, sampling_params,
                                     stream_events, student_unsupported)
from flywheel.serve.streaming import DeltaParser, chunk

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "FindFlights", "parameters": {
    "type": "object", "properties": {"origin": {"type": "string"}}, "required": ["origin"]}}}]


def body(**fields) -> dict:
    return {"model": "sgd_Flights", "messages": USER, **fields}


# -- the request contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 2}, "n"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"stop": ""}, "stop"),
    ({"stop": []}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ["a", ""]}, "stop[1]"),
    ({"stop": 5}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"50256": 101}}, "logit_bias.50256"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": None}, *USER]}, "messages[0].content"),
    ({"messages": [*USER, {"role": "developer"}]}, "messages[1].content"),
    ({"messages": [*USER, {"role": "assistant", "content": None}]}, "messages[1].content"),
    ({"messages": [*USER, {"role": "tool", "content": "ok"}]}, "messages[1].tool_call_id"),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{nope"}}]}]}, "messages[1].tool_calls[0]"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS * 2}, "tools[1].function.name"),
    ({"tool_choice": "always", "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "FindFlights"}}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "Other"}}, "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": {"type": "function"}, "tools": TOOLS}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": "json"}, "response_format"),
])
def test_invalid_requests_name_the_field(fields, param):
    with pytest.raises(APIError) as e:
        parse_request(body(**fields))
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(param), e.value.message
    assert e.value.code in ("invalid_request", "invalid_value", "unsupported_value")


def test_n_above_one_says_why():
    with pytest.raises(APIError) as e:
        parse_request(body(n=3))
    assert "one choice" in e.value.message and e.value.code == "unsupported_value"


def test_valid_requests_pass_and_extras_travel():
    req, rows = parse_request(body(
        temperature=0, top_p=1, n=1, seed=7, stop=["\n\n"], presence_penalty=0, frequency_penalty=0,
        max_completion_tokens=32, stream=True, stream_options={"include_usage": True}, logprobs=False,
        logit_bias={}, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "FindFlights"}},
        parallel_tool_calls=False, response_format={"type": "text"}, service_tier="auto", store=False,
        messages=[{"role": "system", "content": "s"}, {"role": "developer", "content": [{"type": "text", "text": "d"}]},
                  *USER, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                      "name": "FindFlights", "arguments": "{\"origin\": \"SF\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "[]"}, {"role": "assistant", "content": ""}]))
    assert req.model_extra == {"service_tier": "auto", "store": False} and len(rows) == 6
    assert rows[3]["tool_calls"][0]["name"] == "FindFlights"
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "a", "schema": {
            "type": "object", "properties": {"x": {"type": "integer"}}}, "strict": True}}):
        assert parse_request(body(response_format=fmt))[0].response_format == fmt
    assert parse_request(body(stream=None))[0].stream is False
    assert parse_request(body(temperature=2, top_p=0.01, stop="END"))[0].temperature == 2


def test_sampling_params_defaults_and_limits():
    req, _ = parse_request(body())
    assert sampling_params(req, 128, 512) == SamplingParams(max_tokens=128, temperature=0.0, top_p=1.0, seed=None,
                                                            stop=())
    assert sampling_params(req, 128, 512).greedy and sampling_params(req, 1024, 512).max_tokens == 512
    req, _ = parse_request(body(temperature=0.7, top_p=0.9, seed=3, stop="END", max_tokens=64))
    p = sampling_params(req, 128, 512)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.greedy) == (64, 0.7, 0.9, 3, ("END",), False)
    req, _ = parse_request(body(max_tokens=16, max_completion_tokens=8, stop=["a", "b"]))
    assert sampling_params(req, 128, 512).max_tokens == 8 and sampling_params(req, 128, 512).stop == ("a", "b")
    for field in ("max_tokens", "max_completion_tokens"):
        req, _ = parse_request(body(**{field: 600}))
        with pytest.raises(APIError) as e:
            sampling_params(req, 128, 512)
        assert e.value.param == field and e.value.message.startswith(field) and "512" in e.value.message


@pytest.mark.parametrize("fields, param", [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"42": -100}}, "logit_bias"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "see"},
                                                {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[1]"),
])
def test_student_unsupported_parameters(fields, param):
    req, _ = parse_request(body(**fields))
    with pytest.raises(APIError) as e:
        student_unsupported(req)
    assert e.value.status == 400 and e.value.code == "unsupported_parameter" and e.value.param == param
    assert e.value.message.startswith(param) and "not supported by the student" in e.value.message
    assert "teacher" in e.value.message


def test_student_supported_parameters_pass():
    req, _ = parse_request(body(presence_penalty=0, frequency_penalty=0.0, logprobs=False, logit_bias={},
                                modalities=["text"], parallel_tool_calls=False, seed=1, temperature=0.3,
                                tools=TOOLS, tool_choice="required"))
    student_unsupported(req)


# -- streaming -----------------------------------------------------------------------------------------------
RID = "0123456789abcdef0123"
HEAD = {"id": f"chatcmpl-{RID}", "created": 1, "model": "sgd_Flights", "system_fingerprint": "student:x"}
CALL = '<tool_call>{"name": "FindFlights", "arguments": {"origin": "SF", "date": "2019-03-01"}}</tool_call>'


def sgd_answers(limit: int = 60) -> list[str]:
    """Real answers as the student is taught to write them (`prompts.format_answer`): the teacher's tool calls in
    SGD logs, the assistant's texts from their conversations, and pairs of calls as one answer."""
    calls, texts = [], []
    with open(SGD_LOGS) as f:
        for line in f:
            record = json.loads(line)
            msg = record["response"]["choices"][0]["message"]
            calls.append([{"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}
                          for tc in msg.get("tool_calls") or []])
            texts += [m["content"] for m in record["request"]["messages"] if m["role"] == "assistant" and m["content"]]
            if len(calls) >= limit // 3 and len(texts) >= limit // 3:
                break
    out = [format_answer({"tool_calls": c}) for c in calls[:limit // 3] if c]
    out += [format_answer({"content": t}) for t in texts[:limit // 3]]
    out += [format_answer({"tool_calls": a + b}) for a, b in zip(calls[:limit // 3:2], calls[1:limit // 3:2])]
    assert any("<tool_call>" in a for a in out) and any("<tool_call>" not in a for a in out)
    return out


TRICKY = [
    "",
    "   ",
    "Sure, which day?",
    "  Sure, which day?  \n",
    "a < b and c <tool but not a call <tool_c",
    "<tool_call",
    CALL,
    "  \n" + CALL + "\n",
    "Let me look.\n" + CALL,
    "Let me look. " + CALL + " Done, " + CALL.replace("SF", "LA") + "  thanks ",
    CALL + "\n" + CALL.replace("FindFlights", "ReserveFlight"),
    '<tool_call>{"name": "Q", "arguments": {"text": "a } \\" { ] [ </tool", "n": [1, {"x": [2]}], "e": {}}}'
    '</tool_call>',
    '<tool_call>{"name": "Q", "arguments": {"u": "caf\u00e9 \\u00e9 \\\\ \U0001F600"}}</tool_call>',
    '<tool_call>{"name": "Q", "arguments": {}}</tool_call>',
    '<tool_call> {\n  "name" : "Q" ,\n  "arguments" : { "a" : 1 } \n} </tool_call>',
    '<tool_call>{"arguments": {"a": 1}, "name": "Q"}</tool_call>',                   # keys out of order
    '<tool_call>{"name": "Q"}</tool_call>',                                          # no arguments
    '<tool_call>{"name": "Q", "other": 1, "arguments": {"a": 1}}</tool_call>',        # a key between
    '<tool_call>{"name": "Q\\u0041", "arguments": {"a": 1}}</tool_call>',             # an escape in the name
    '<tool_call>not json</tool_call> then text',                                     # rejected: no call
    '<tool_call>{"name": 5, "arguments": {}}</tool_call>' + CALL,                    # rejected, then one
    '<tool_call>{"name": "Q", "arguments": [1]}</tool_call>',                         # arguments not an object
    '<tool_call>{"name": "Q", "arguments": {"a": 1}}',                                # closed by the end of text
    '<tool_call>{"arguments": {"a": 1}, "name": "Q"}',                                # ... and held whole
    "text <tool_call>{\"name\": \"Q\", \"arguments\": {\"a\": \"<tool_call>\"}}</tool_call> more",
    "<tool_call><tool_call>" + CALL[len("<tool_call>"):],
]


def streamed(text: str, pieces: list[str]) -> tuple[dict, list[dict]]:
    """Feed the pieces; the SSE chunks (through `chunk`) reassembled into one message, and the raw deltas."""
    assert "".join(pieces) == text
    parser, deltas = DeltaParser(RID), []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    events = [chunk(HEAD, {"role": "assistant", "content": ""})] + [chunk(HEAD, d) for d in deltas]
    events.append(chunk(HEAD, {}, "tool_calls" if parser.calls else "stop"))
    chunks = []
    for e in events:
        assert e.startswith("data: ") and e.endswith("\n\n")
        chunks.append(json.loads(e[len("data: "):]))
        assert chunks[-1]["object"] == "chat.completion.chunk" and chunks[-1]["id"] == HEAD["id"]
    return reassemble_stream(chunks), deltas


def assert_same_answer(text: str, pieces: list[str]) -> None:
    message, deltas = streamed(text, pieces)
    expected = completion_from_text("sgd_Flights", text, 1, 1, "x", RID)["choices"][0]["message"]
    assert message["content"] == expected["content"], (text, pieces)
    want = [(tc["id"], tc["function"]["name"], json.loads(tc["function"]["arguments"]))
            for tc in expected.get("tool_calls") or []]
    got = [(tc["id"], tc["function"]["name"], json.loads(tc["function"]["arguments"]))
           for tc in message["tool_calls"] or []]
    assert got == want, (text, pieces)
    for d in deltas:  # only OpenAI delta shapes
        assert set(d) in ({"content"}, {"tool_calls"}) and (d.get("content") or d.get("tool_calls"))


def splits_everywhere(text: str):
    yield [text]
    yield list(text)  # one character at a time
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def random_splits(text: str, rng: random.Random, n: int = 20):
    for _ in range(n):
        pieces, i = [], 0
        while i < len(text):
            k = rng.choice([1, 1, 2, 3, 4, 5, 8])
            pieces.append(text[i:i + k])
            i += k
        yield pieces


@pytest.mark.parametrize("text", TRICKY)
def test_stream_reassembles_to_the_completion_at_every_split(text):
    for pieces in splits_everywhere(text):
        assert_same_answer(text, pieces)


def test_stream_of_real_answers_at_every_split_and_random_token_boundaries():
    rng = random.Random(0)
    for text in sgd_answers():
        for pieces in [*splits_everywhere(text), *random_splits(text, rng)]:
            assert_same_answer(text, pieces)


def test_stream_at_the_tokenizers_boundaries(student_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_path)
    for text in sgd_answers(20) + TRICKY:
        ids, pieces, sent = tok.encode(text, add_special_tokens=False), [], ""
        for n in range(1, len(ids) + 1):
            now = tok.decode(ids[:n])
            if not now.endswith("\ufffd"):
                pieces.append(now[len(sent):])
                sent = now
        assert sent == text
        assert_same_answer(text, pieces)


def test_stream_is_incremental():
    parser = DeltaParser(RID)
    assert parser.feed("Hello wor") == [{"content": "Hello wor"}]
    assert parser.feed("ld. ") == [{"content": "ld."}]              # the trailing space waits for more text
    assert parser.feed("<tool") == []                               # may be a tag
    assert parser.feed('_call>{"name": "Find') == []
    assert parser.feed('Flights", "argu') == []
    head = parser.feed('ments": {"or')
    assert head == [{"tool_calls": [{"index": 0, "id": f"call_{RID[:16]}_0", "type": "function",
                                     "function": {"name": "FindFlights", "arguments": ""}}]},
                    {"tool_calls": [{"index": 0, "function": {"arguments": '{"or'}}]}]
    assert parser.feed('igin": "S}F"}') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'igin": "S}F"}'}}]}]
    assert parser.feed("}</tool_c") == [] and parser.feed("all>\nBye ") == [{"content": " \nBye"}]
    assert parser.feed("<") == [] and parser.finish() == [{"content": " <"}] and parser.calls == 1


def test_stream_broken_call_after_its_announcement_is_kept():
    """The one documented difference: a call announced then cut off stays in the stream with what it had."""
    text = '<tool_call>{"name": "Q", "arguments": {"a": 1, "b'
    message, _ = streamed(text, [text])
    assert parse_answer(text)["tool_calls"] is None
    assert message["tool_calls"][0]["function"] == {"name": "Q", "arguments": '{"a": 1, "b'}


def test_stream_events_replays_a_completion_through_chunk():
    c = completion_from_text("sgd_Flights", "Ok. " + CALL, 3, 4, "student:x", RID)
    events = list(stream_events(c, include_usage=True))
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert events[-1] == "data: [DONE]\n\n" and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    message = reassemble_stream(chunks)
    assert message["content"] == "Ok." and message["tool_calls"][0]["id"] == f"call_{RID[:16]}_0"


def test_logprobs_are_honoured_in_the_shape_the_openai_client_parses():
    from openai.types.chat import ChatCompletion

    from flywheel.serve.protocol import completion_from_text, logprobs_content

    req, _ = parse_request(body(logprobs=True, top_logprobs=2))
    student_unsupported(req)  # accepted: the student returns them
    params = sampling_params(req, 128, 512)
    assert params.logprobs and params.top_logprobs == 2
    vocab = {1: "Pos", 2: "itive", 3: "Neg"}
    content = logprobs_content([1, 2], [-0.1, -0.01], [[(1, -0.1), (3, -2.5)], [(2, -0.01), (1, -5.0)]],
                               vocab.__getitem__)
    parsed = ChatCompletion.model_validate(completion_from_text("agent", "Positive", 5, 2, "student:x", "r1",
                                                                logprobs=content))
    lp = parsed.choices[0].logprobs.content
    assert [t.token for t in lp] == ["Pos", "itive"] and lp[0].logprob == -0.1 and lp[0].bytes == list(b"Pos")
    assert [a.token for a in lp[0].top_logprobs] == ["Pos", "Neg"] and lp[1].top_logprobs[1].logprob == -5.0
