"""Constrained decoding: specs from OpenAI fields, xgrammar grammars, and real `generate` calls on a tiny random Llama
with the student's tokenizer. No Ray.

    .venv/bin/python -m pytest tests/test_grammar.py -q

A random model follows no format by itself, so what it writes under a grammar is the grammar's doing. To make that
a hard test, an adversary (`Push`) boosts, at every step, the tokens that continue a forbidden string (an undeclared
function, an undeclared argument, a value outside an enum, `<tool_call>`); without the grammar the model writes it.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from flywheel.prompts import parse_answer

xgr = pytest.importorskip("xgrammar")
torch = pytest.importorskip("torch")

from flywheel.inference.grammar import GrammarCompiler, GrammarError, RowGrammars, constraint_for  # noqa: E402

FLIGHTS = {"type": "object", "properties": {
    "origin": {"type": "string", "enum": ["SF", "LA", "NYC"]},
    "seats": {"type": "integer", "minimum": 1, "maximum": 6},
    "cabin": {"enum": ["economy", "business"]},
    "refundable": {"type": "boolean"},
    "note": {"type": "string", "maxLength": 6},
}, "required": ["origin", "seats"]}
HOTELS = {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                           "city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "FindFlights", "parameters": FLIGHTS}},
         {"type": "function", "function": {"name": "FindHotels", "parameters": HOTELS}},
         {"type": "function", "function": {"name": "Evil", "description": "never chosen in these tests"}}]
SCHEMAS = {"FindFlights": FLIGHTS, "FindHotels": HOTELS, "Evil": {"type": "object"}}
ANSWER = {"type": "object", "properties": {"verdict": {"enum": ["yes", "no"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["verdict", "score"]}
PROMPTS = ["hi", "Book me a flight from SF to LA for two, please.", "x y z", "What about hotels in Rome?"]


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


# -- specs: pure -----------------------------------------------------------------------------------------------
def test_constraint_for_maps_the_openai_fields():
    schema_fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}
    assert constraint_for(None, None, {"type": "text"}) is None and constraint_for([], None, None) is None
    assert constraint_for([], "auto", None) is None  # no tools, no format: a free answer
    auto = {"type": "auto_tools", "tools": [{"name": n, "parameters": SCHEMAS[n]} for n in SCHEMAS], "parallel": True}
    assert constraint_for(TOOLS, None, None) == auto and constraint_for(TOOLS, "auto", None) == auto
    assert constraint_for(TOOLS, "auto", {"type": "text"}, parallel_tool_calls=False) == {**auto, "parallel": False}
    assert constraint_for(TOOLS, "none", None) == {"type": "no_tool_calls"}
    req = constraint_for(TOOLS, "required", None)
    assert req["type"] == "tool_calls" and req["parallel"] and [t["name"] for t in req["tools"]] == list(SCHEMAS)
    assert req["tools"][2]["parameters"] == {"type": "object"}  # no parameters: any object
    assert constraint_for(TOOLS, "required", None, parallel_tool_calls=False)["parallel"] is False
    assert constraint_for(TOOLS, named("FindHotels"), None) == {
        "type": "tool_calls", "tools": [{"name": "FindHotels", "parameters": HOTELS}], "parallel": False}
    assert constraint_for(None, None, {"type": "json_object"}) == {"type": "json", "schema": {"type": "object"}}
    assert constraint_for(None, "none", schema_fmt) == {"type": "json", "schema": ANSWER}
    both = constraint_for(TOOLS, "auto", schema_fmt)
    assert both["type"] == "json" and both["schema"] == ANSWER and len(both["tools"]) == 3
    with pytest.raises(ValueError):
        constraint_for([], "required", None)
    with pytest.raises(ValueError):
        constraint_for(TOOLS, named("Nope"), None)


# -- compiled grammars: exact acceptance -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


@pytest.fixture(scope="module")
def compiler(tok, model):
    return GrammarCompiler(tok, model.config.vocab_size)


def accepts(compiled, text: str) -> bool:
    m = xgr.GrammarMatcher(compiled)
    return m.accept_string(text) and m.is_completed()


def call(name: str, args: dict) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def test_compiled_grammars_accept_exactly_the_allowed_answers(compiler):
    one = compiler.compile(constraint_for(TOOLS, named("FindFlights"), None))
    ok = {"origin": "SF", "seats": 2}
    assert accepts(one, call("FindFlights", {"cabin": "economy", "origin": "LA", "seats": 6}))
    assert accepts(one, call("FindFlights", ok))
    assert not accepts(one, call("FindFlights", ok) + "\n") and not accepts(one, " " + call("FindFlights", ok))
    assert not accepts(one, call("FindHotels", {"city": "Rome"}))                   # another function
    assert not accepts(one, call("Evil", {}))
    assert not accepts(one, call("FindFlights", {**ok, "zzz": 1}))                  # an undeclared argument
    assert not accepts(one, call("FindFlights", {"origin": "Mars", "seats": 2}))    # outside the enum
    assert not accepts(one, call("FindFlights", {"origin": "SF"}))                  # a required one missing
    assert not accepts(one, call("FindFlights", {"seats": 2, "origin": "SF"}))      # not in sorted order
    assert not accepts(one, call("FindFlights", ok) + "\n" + call("FindFlights", ok))  # one call only
    assert not accepts(one, "Sure! " + call("FindFlights", ok))                      # no text
    many = compiler.compile(constraint_for(TOOLS, "required", None))
    assert accepts(many, call("FindFlights", ok) + "\n" + call("Evil", {"any": [1, {"x": None}]}))
    assert not accepts(many, "") and not accepts(many, "I will not call anything.")
    assert not accepts(many, call("Nope", {}))
    none = compiler.compile(constraint_for(TOOLS, "none", None))
    assert accepts(none, "Which day? <tool> <tool_cal") and not accepts(none, "ok " + call("FindFlights", ok))
    obj = compiler.compile(constraint_for(None, None, {"type": "json_object"}))
    assert accepts(obj, '{"a": [1, {"b": null}], "c": "d"}') and not accepts(obj, "[1]")
    assert not accepts(obj, '{"a": 1} and more')
    either = compiler.compile(constraint_for(TOOLS, "auto", {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": ANSWER}}))
    assert accepts(either, '{"verdict": "yes", "score": 3}') and accepts(either, call("FindHotels", {"city": "Rome"}))
    assert not accepts(either, '{"verdict": "maybe", "score": 3}')


def accepts_tokens(compiled, tok, text: str) -> bool:
    """The answer as the student's tokenizer splits it, token by token, then EOS: what decoding feeds the matcher."""
    m = xgr.GrammarMatcher(compiled)
    return all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False)) and \
        m.accept_token(tok.eos_token_id) and m.is_terminated()


AUTO_OK = ["", "Which day do you want to fly?", "Sure, <tool and <tool_cal are just text. {\"name\": 1}",
           call("FindFlights", {"origin": "SF", "seats": 2}),
           "Let me look. " + call("FindHotels", {"city": "Rome", "stars": 4}) + " Done.",
           call("FindFlights", {"cabin": "business", "origin": "NYC", "refundable": False, "seats": 6}) + "\n"
           + call("FindHotels", {"city": "Paris"}),
           call("Evil", {"anything": [1, {"x": None}]})]                  # declared without parameters: any object
AUTO_BAD = {
    "undeclared function": call("BookCar", {"origin": "SF", "seats": 2}),
    "undeclared argument": call("FindFlights", {"origin": "SF", "seats": 2, "zzz": 1}),
    "missing required argument": call("FindFlights", {"origin": "SF"}),
    "wrong enum value": call("FindFlights", {"origin": "Mars", "seats": 2}),
    "wrong type": call("FindFlights", {"origin": "SF", "seats": "two"}),
    "out of range": call("FindHotels", {"city": "Rome", "stars": 9}),
    "unsorted keys": call("FindFlights", {"seats": 2, "origin": "SF"}),
    "broken JSON: missing brace": call("FindFlights", {"origin": "SF", "seats": 2})[:-len("}</tool_call>")]
                                  + "</tool_call>",
    "broken JSON: bare word": '<tool_call>{"name": "FindFlights", "arguments": {"origin": SF, "seats": 2}}</tool_call>',
    "broken JSON: not as taught": '<tool_call>{"name":"FindFlights","arguments":{"origin":"SF","seats":2}}</tool_call>',
    "unclosed call": '<tool_call>{"name": "FindFlights", "arguments": {"origin": "SF", "seats": 2}}',
    "<tool_call> inside text, then text": "I would call <tool_call> FindFlights now.",
    "<tool_call> inside text, then a bad call": "Ok. " + call("FindHotels", {"city": "Oslo"}),
}


def test_auto_admits_text_and_exactly_the_declared_calls(compiler, tok):
    grammar = compiler.compile(constraint_for(TOOLS, "auto", None))
    for text in AUTO_OK:
        assert accepts(grammar, text) and accepts_tokens(grammar, tok, text), text
    for why, text in AUTO_BAD.items():
        assert not accepts(grammar, text) and not accepts_tokens(grammar, tok, text), why
    one = compiler.compile(constraint_for(TOOLS, "auto", None, parallel_tool_calls=False))
    ok = call("FindHotels", {"city": "Rome"})
    assert accepts_tokens(one, tok, "Booking. " + ok) and accepts_tokens(one, tok, "Which city?")
    assert not accepts_tokens(one, tok, ok + "\n" + ok) and not accepts_tokens(one, tok, ok + " and more text")


def test_auto_tools_compile_fast_once_and_tolerate_unenforceable_schemas(compiler, tok):
    import time

    from conftest import SGD_LOGS

    declared: dict[str, dict] = {}
    with open(SGD_LOGS) as f:
        for line in f:  # real agents' tools, with enums and required arguments
            declared |= {t["function"]["name"]: t for t in json.loads(line)["request"]["tools"]}
            if len(declared) >= 10:
                break
    spec = constraint_for(list(declared.values()), "auto", None)
    started = time.perf_counter()
    grammar = compiler.compile(spec)
    compiled_s = time.perf_counter() - started
    started = time.perf_counter()
    assert compiler.compile(json.loads(json.dumps(spec))) is grammar
    assert compiled_s < 1.0 and time.perf_counter() - started < 0.01, compiled_s
    name, fn = next((n, t["function"]) for n, t in declared.items() if fn_required(t))
    args = {k: (fn["parameters"]["properties"][k].get("enum") or ["x"])[0] for k in sorted(fn_required(declared[name]))}
    assert accepts_tokens(grammar, tok, call(name, args)) and not accepts_tokens(grammar, tok, call(name, {}))
    broken = TOOLS[:1] + [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]
    lenient = compiler.compile(constraint_for(broken, "auto", None))  # auto: f takes any object, FindFlights is held
    assert accepts(lenient, call("f", {"b": [1]})) and not accepts(lenient, call("g", {}))
    assert not accepts(lenient, call("FindFlights", {"origin": "Mars", "seats": 2}))
    with pytest.raises(GrammarError):
        compiler.compile(constraint_for(broken, "required", None))


def fn_required(tool: dict) -> list[str]:
    return (tool["function"].get("parameters") or {}).get("required") or []


def test_compile_caches_and_names_what_it_cannot_enforce(compiler):
    spec = constraint_for(TOOLS, "required", None)
    assert compiler.compile(spec) is compiler.compile(json.loads(json.dumps(spec))) and compiler.compile(None) is None
    broken = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]
    with pytest.raises(GrammarError) as e:
        compiler.compile(constraint_for(broken, "required", None))
    assert e.value.param == "tools" and str(e.value).startswith("tools: the parameters of tool 'f'")
    assert "/project/cpp" not in str(e.value)


# -- generate: a random model under each grammar ----------------------------------------------------------------
class Push:
    """A logits processor that pushes every row towards writing `target` (again and again) by boosting the tokens
    that continue it. Placed before `RowGrammars`: the grammar has the last word."""

    def __init__(self, tok, target: str, prompt_len: int, boost: float = 50.0):
        self.tok, self.target, self.prompt_len, self.boost = tok, target, prompt_len, boost
        self.pieces = [tok.decode([i]) for i in range(len(tok))]
        self._next: dict[str, list[int]] = {}

    def __call__(self, input_ids, scores):
        for r in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[r, self.prompt_len:], skip_special_tokens=True)
            done = next((k for k in range(len(self.target) - 1, 0, -1) if text.endswith(self.target[:k])), 0)
            rest = self.target[done:]
            if rest not in self._next:
                self._next[rest] = [i for i, s in enumerate(self.pieces) if s and rest.startswith(s)]
            scores[r, self._next[rest]] += self.boost
        return scores


def generate(model, tok, grammars: list, prompts: list[str], push: str | None = None, max_new_tokens: int = 128,
             sample: bool = False, seed: int = 0) -> tuple[list[str], RowGrammars | None]:
    torch.manual_seed(seed)
    batch = tok(prompts, return_tensors="pt", padding=True)
    n = batch["input_ids"].shape[1]
    processors = [Push(tok, push, n)] if push else []
    rows = RowGrammars(grammars, tok) if any(g is not None for g in grammars) else None
    processors += [rows] if rows else []
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sample, top_k=None, top_p=None,
                             logits_processor=processors, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return [tok.decode(row, skip_special_tokens=True) for row in out[:, n:]], rows


def only_call(text: str) -> tuple[str, dict]:
    parsed = parse_answer(text)
    assert parsed["valid"] and parsed["content"] is None and len(parsed["tool_calls"] or []) == 1, text
    fn = parsed["tool_calls"][0]["function"]
    return fn["name"], json.loads(fn["arguments"])


def test_named_function_is_always_a_valid_call_of_that_function(model, tok, compiler):
    grammar = compiler.compile(constraint_for(TOOLS, named("FindFlights"), None))
    texts = []
    for seed in range(3):  # sampled: different calls, each one valid
        texts += generate(model, tok, [grammar] * len(PROMPTS), PROMPTS, sample=True, seed=seed)[0]
    evil = '<tool_call>{"name": "Evil", "arguments": {"zzz": "x", "origin": "Mars", "seats": 99}}</tool_call>'
    assert evil in generate(model, tok, [None], PROMPTS[:1], push=evil)[0][0]  # the adversary works unchecked
    for push in (evil, evil.replace("Evil", "FindFlights")):
        texts += generate(model, tok, [grammar] * 2, PROMPTS[:2], push=push)[0]
    for text in texts:
        name, args = only_call(text)
        assert name == "FindFlights", text
        jsonschema.validate(args, FLIGHTS)
        assert set(args) <= set(FLIGHTS["properties"]) and args["origin"] in ("SF", "LA", "NYC")
        assert list(args) == sorted(args)
    assert len({t for t in texts}) > 1  # sampling explored more than one call


def test_required_gives_calls_of_declared_tools_only(model, tok, compiler):
    grammar = compiler.compile(constraint_for(TOOLS[:2], "required", None))
    push = call("Evil", {}) + "\n" + call("FindHotels", {"city": "Oslo", "zzz": 1})
    texts, rows = generate(model, tok, [grammar] * 2, PROMPTS[:2], push=push, max_new_tokens=200)
    texts += generate(model, tok, [grammar] * 4, PROMPTS, sample=True, seed=1, max_new_tokens=200)[0]
    for text in texts:  # a random model may go on calling until max_new_tokens: check the calls it finished
        assert text.startswith("<tool_call>") and "</tool_call>" in text, text
        text = text[:text.rindex("</tool_call>") + len("</tool_call>")]
        parsed = parse_answer(text)
        assert parsed["valid"] and parsed["content"] is None and parsed["tool_calls"], text
        assert text == "\n".join(call(tc["function"]["name"], json.loads(tc["function"]["arguments"]))
                                 for tc in parsed["tool_calls"])
        for tc in parsed["tool_calls"]:
            jsonschema.validate(json.loads(tc["function"]["arguments"]), SCHEMAS[tc["function"]["name"]])
            assert tc["function"]["name"] in ("FindFlights", "FindHotels")


def test_none_never_writes_a_tool_call(model, tok, compiler):
    grammar = compiler.compile(constraint_for(TOOLS, "none", None))
    assert "<tool_call>" in generate(model, tok, [None], PROMPTS[:1], push="<tool_call>")[0][0]
    texts, rows = generate(model, tok, [grammar] * 3, PROMPTS[:3], push="<tool_call>", max_new_tokens=48)
    for text in texts:
        assert "<tool_call>" not in text and "<tool_call" in text, text  # it tried, the grammar said no
        assert parse_answer(text)["tool_calls"] is None


def test_json_object_and_schema_are_valid_json(model, tok, compiler):
    obj = compiler.compile(constraint_for(None, None, {"type": "json_object"}))
    push = '{"a": [1, "b"]} and then some text'
    assert not generate(model, tok, [None], PROMPTS[:1], push=push)[0][0].startswith('{"a": [1, "b"]}\n')
    texts, rows = generate(model, tok, [obj] * 2, PROMPTS[:2], push=push)
    for i, text in enumerate(texts):
        assert isinstance(json.loads(text), dict), text
        assert rows.is_terminated(i)  # the grammar ended, then EOS was the only choice
    schema = compiler.compile(constraint_for(None, None, {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": ANSWER}}))
    texts = generate(model, tok, [schema] * 2, PROMPTS[:2], push='{"verdict": "maybe", "score": 12, "x": 1}')[0]
    texts += generate(model, tok, [schema] * 4, PROMPTS, sample=True, seed=2)[0]
    for text in texts:
        jsonschema.validate(json.loads(text), ANSWER)


def test_mixed_batch_decodes_each_row_under_its_own_grammar(model, tok, compiler):
    prompts = ["a much longer prompt, so that the others are left-padded in this batch", "hi", "hey there", "x"]
    grammars = [compiler.compile(constraint_for(TOOLS, named("FindHotels"), None)),
                compiler.compile(constraint_for(TOOLS, "none", None)),
                None,
                compiler.compile(constraint_for(None, None, {"type": "json_schema", "json_schema": {
                    "name": "answer", "schema": ANSWER}}))]
    texts, rows = generate(model, tok, grammars, prompts, push=call("FindFlights", {"origin": "SF"}))
    name, args = only_call(texts[0])
    assert name == "FindHotels" and args["city"] in ("Paris", "Rome")
    jsonschema.validate(args, HOTELS)
    assert "<tool_call>" not in texts[1]
    jsonschema.validate(json.loads(texts[3]), ANSWER)
    assert rows.is_terminated(0) and rows.is_terminated(3) and not rows.is_terminated(2)
    # The unconstrained row is untouched: the same text as the same batch decoded without any grammar.
    alone = generate(model, tok, [None] * 4, prompts, push=call("FindFlights", {"origin": "SF"}))[0]
    assert texts[2] == alone[2] and texts[2].startswith(call("FindFlights", {"origin": "SF"}))


def test_rows_that_ended_may_only_write_eos(tok, compiler):
    grammar = compiler.compile(constraint_for(TOOLS, named("FindHotels"), None))
    rows = RowGrammars([grammar, grammar, None], tok)
    vocab = grammar.tokenizer_info.vocab_size
    answer = tok.encode(call("FindHotels", {"city": "Rome"}), add_special_tokens=False)
    ids = torch.tensor([[7, 7, 7]] * 3)
    off_grammar = tok.encode("hello", add_special_tokens=False)[0]
    for step, token in enumerate(answer + [tok.eos_token_id, tok.pad_token_id]):
        scores = rows(ids, torch.zeros(3, vocab))
        if step == 0:
            assert not torch.isinf(scores[1]).all() and not torch.isinf(scores[2]).any()
        if step == len(answer):  # the call is complete: EOS only
            assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [tok.eos_token_id]
        ids = torch.cat([ids, torch.tensor([[token], [off_grammar], [token]])], dim=1)
    assert rows.is_terminated(0) and rows.is_terminated(1) and not rows.is_terminated(2)
    scores = rows(ids, torch.zeros(3, vocab))
    for r in (0, 1):  # terminated, and stopped by the caller then padded: EOS only
        assert torch.isfinite(scores[r]).nonzero().flatten().tolist() == [tok.eos_token_id]
    assert torch.isfinite(scores[2]).all()


# -- generate under tool_choice auto ------------------------------------------------------------------------------
def accepts_prefix(compiled, text: str) -> bool:
    """The text is an answer of the grammar, or the start of one (a row cut by max_new_tokens)."""
    return xgr.GrammarMatcher(compiled).accept_string(text)


def finished_calls(text: str) -> list[tuple[str, dict]]:
    """The complete `<tool_call>...</tool_call>` blocks of a text as (name, arguments), each one a parseable call."""
    return [only_call("<tool_call>" + block[:block.index("</tool_call>") + len("</tool_call>")])
            for block in text.split("<tool_call>")[1:] if "</tool_call>" in block]


def test_auto_leaves_text_alone_and_makes_every_call_a_declared_valid_one(model, tok, compiler):
    grammar = compiler.compile(constraint_for(TOOLS[:2], "auto", None))
    free = generate(model, tok, [None] * 2, PROMPTS[:2], max_new_tokens=32)[0]
    assert generate(model, tok, [grammar] * 2, PROMPTS[:2], max_new_tokens=32)[0] == free  # text: untouched
    evil = 'Sure. <tool_call>{"name": "Evil", "arguments": {"zzz": "x", "origin": "Mars", "seats": 99}}</tool_call>'
    assert generate(model, tok, [None], PROMPTS[:1], push=evil)[0][0].startswith(evil)  # the adversary works
    texts = []
    for push in (evil, evil.replace("Evil", "FindFlights")):
        texts += generate(model, tok, [grammar] * 4, PROMPTS, push=push, max_new_tokens=160)[0]
    calls = []
    for text in texts:
        assert text.startswith("Sure. <tool_call>{\"name\": \"Find") and accepts_prefix(grammar, text), text
        calls += finished_calls(text)
    assert len(calls) >= len(texts), texts  # every row finished at least one call
    for name, args in calls:
        assert name in ("FindFlights", "FindHotels")
        jsonschema.validate(args, SCHEMAS[name])
        assert list(args) == sorted(args) and "zzz" not in args


def test_mixed_batch_auto_rows_call_only_their_own_tools(model, tok, compiler):
    prompts = ["a much longer prompt, so that the others are left-padded in this batch", "hi", "hey there"]
    flights = compiler.compile(constraint_for(TOOLS[:1], "auto", None))
    hotels = compiler.compile(constraint_for(TOOLS[1:2], "auto", None))
    push = call("FindHotels", {"city": "Oslo", "stars": 3})
    texts, rows = generate(model, tok, [flights, hotels, None], prompts, push=push)
    assert texts[0].startswith('<tool_call>{"name": "FindFlights", "arguments": {')
    assert texts[1].startswith('<tool_call>{"name": "FindHotels", "arguments": {"city": "') and "Oslo" not in texts[1]
    for text, grammar, other, name in ((texts[0], flights, hotels, "FindFlights"),
                                       (texts[1], hotels, flights, "FindHotels")):
        assert accepts_prefix(grammar, text) and not accepts_prefix(other, text), text
        found = finished_calls(text)
        assert found and {n for n, _ in found} == {name}, text
        for _, args in found:
            jsonschema.validate(args, SCHEMAS[name])
    alone = generate(model, tok, [None] * 3, prompts, push=push)[0]
    assert texts[2] == alone[2] and texts[2].startswith(push)  # the unconstrained row: as if no grammar existed
