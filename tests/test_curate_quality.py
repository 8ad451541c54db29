"""Curation quality filters: PII redaction (regex + Presidio), toxicity, tool-call schema, length
bounds, near-duplicates across batches, rare-label strata and the per-agent cap. Pure functions, no Ray.

Every test runs with the network cut (sockets refuse to connect): Presidio, spaCy and tldextract must work
offline.
"""

import json
import socket

import pytest

from flywheel.config import ConfigError, CurateConfig
from flywheel.curate import filters as F
from flywheel import pii
from flywheel.curate import near_dup
from flywheel.schema import message

TOOLS = [
    {"type": "function", "function": {"name": "BookTable", "description": "Book a table", "parameters": {
        "type": "object", "required": ["name", "city"], "properties": {
            "name": {"type": "string"}, "email": {"type": "string"}, "phone": {"type": "string"},
            "city": {"type": "string"}, "guests": {"type": "integer"},
            "seats": {"type": "string", "enum": ["1", "2", "3"]}}}}},
    {"type": "function", "function": {"name": "GetAccount", "description": "Look up an account", "parameters": {
        "type": "object", "required": ["user_id"], "properties": {"user_id": {"type": "string"}}}}},
]


def _refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args!r}")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)


@pytest.fixture(scope="module")
def presidio():
    """Presidio loaded once for the module (a few seconds), built with the network cut."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket, "create_connection", _refuse)
        mp.setattr(socket, "getaddrinfo", _refuse)
        return pii.presidio_engine(tuple(CurateConfig().presidio_entities))


def call(tool, **args):
    return {"id": None, "name": tool, "arguments": json.dumps(args)}


def row(user, answer, rid="r1", session="s1", ts=1.0, agent="a", history=()):
    return {"record_id": rid, "agent_id": agent, "session_id": session, "timestamp": ts,
            "messages": [*history, message("user", user)], "tools_json": json.dumps(TOOLS),
            "response": answer, "feedback": None, "source": "t"}


def args_of(out, i=0):
    return json.loads(out["target"]["tool_calls"][i]["arguments"])


# --- PII -----------------------------------------------------------------------------------------------
PII_USER = ("Hi, I'm John Smith. Book a table for two in San Jose and confirm to john.smith@example.com "
            "or call me at 415-555-0132. Pay with card 4111 1111 1111 1111.")
PII_ANSWER = message("assistant", None, [call("BookTable", name="John Smith", email="john.smith@example.com",
                                              phone="415-555-0132", city="San Jose", seats="2")])


def test_no_raw_pii_survives_and_placeholders_match_between_prompt_and_arguments(presidio):
    out = F.clean_record(row(PII_USER, PII_ANSWER), cfg=CurateConfig(presidio_agents=("a",)))
    assert out["reason"] is None
    text = json.dumps([out["messages"], out["target"]])
    for raw in ("John", "Smith", "john.smith@example.com", "415-555-0132", "4111 1111 1111 1111"):
        assert raw not in text
    prompt, args = out["messages"][-1]["content"], args_of(out)
    for key in ("name", "email", "phone"):  # the student learns to copy the placeholder into the argument
        assert args[key].startswith("<") and args[key] in prompt
    assert args["name"].startswith("<PERSON_") and args["email"] == "<EMAIL_1>" and args["phone"] == "<PHONE_1>"
    assert args["city"] == "San Jose" and "San Jose" in prompt  # LOCATION is not redacted by default
    assert json.loads(out["pii"]) == {"CARD": 1, "EMAIL": 1, "PERSON": 1, "PHONE": 1}


def test_regex_only_agents_skip_presidio_but_stay_consistent():
    out = F.clean_record(row(PII_USER, PII_ANSWER))  # default: regex only
    args = args_of(out)
    assert "john.smith@example.com" not in json.dumps(out["messages"]) and args["email"] == "<EMAIL_1>"
    assert args["name"] == "John Smith"  # names need Presidio: regex alone keeps them
    assert json.loads(out["pii"]) == {"CARD": 1, "EMAIL": 1, "PHONE": 1}


def test_a_value_found_in_the_prompt_is_replaced_in_a_bare_argument_too():
    redactor = pii.Redactor(lambda t: [pii.Span(0, 4, "PERSON")] if t.startswith("Jane ") else [])
    redactor.scan("Jane is flying")
    assert redactor.apply("Jane") == "<PERSON_1>" and redactor.apply("Janet") == "Janet"


def test_allowlisted_argument_is_kept_verbatim_everywhere(presidio):
    user = "Look up account jdoe@example.com, and cc other.person@example.org."
    answer = message("assistant", None, [call("GetAccount", user_id="jdoe@example.com")])
    cfg = CurateConfig(pii_allow=("a:user_id",), presidio_agents=("*",))
    out = F.clean_record(row(user, answer), cfg=cfg)
    assert args_of(out)["user_id"] == "jdoe@example.com"
    assert "jdoe@example.com" in out["messages"][-1]["content"]
    assert "other.person@example.org" not in out["messages"][-1]["content"]
    # the allowlist is per agent: another agent's user_id is redacted as usual
    other = F.clean_record(row(user, answer, agent="b"), cfg=cfg)
    assert args_of(other)["user_id"] == "<EMAIL_1>"


def test_allowlisted_entity_kind_is_not_redacted(presidio):
    out = F.clean_record(row(PII_USER, PII_ANSWER), cfg=CurateConfig(presidio_agents=("a",),
                                                                      pii_allow=("a:PERSON",)))
    assert args_of(out)["name"] == "John Smith" and "John Smith" in out["messages"][-1]["content"]
    assert args_of(out)["email"] == "<EMAIL_1>"


def test_bad_pii_settings_are_config_errors():
    with pytest.raises(ConfigError, match="pii_allow"):
        CurateConfig(pii_allow=("a:PASSPORTS",))
    with pytest.raises(ConfigError, match="presidio_entities"):
        CurateConfig(presidio_entities=("PERSON", "SHOE_SIZE"))
    with pytest.raises(ConfigError, match="toxicity_threshold"):
        CurateConfig(toxicity_threshold=2.0)


# --- toxicity, schema, length ----------------------------------------------------------------------------
BOOK = message("assistant", None, [call("BookTable", name="Ann", city="Fresno")])


def test_profanity_is_set_aside_as_toxic_and_the_quarantine_is_redacted():
    rows = [row("Book a table in Fresno, you fucking idiot. Mail me at ann@example.com", BOOK, rid="t1"),
            row("Book a table in Fresno for Ann, please.", BOOK, rid="ok"),
            row("Book a table in Fresno.", message("assistant", "Done, you stupid piece of shit."), rid="t2")]
    out = {o["record_id"]: o for o in F.clean_batch(rows)}
    assert out["t1"]["reason"] == F.R_TOXIC and "user turn 1" in out["t1"]["detail"]
    assert out["t2"]["reason"] == F.R_TOXIC and "answer" in out["t2"]["detail"]
    assert out["ok"]["reason"] is None
    assert "ann@example.com" not in json.dumps(out["t1"]["messages"]) + out["t1"]["detail"]
    assert F.clean_record(rows[0], cfg=CurateConfig(toxicity_threshold=1.0))["reason"] is None  # 1: off


@pytest.mark.parametrize("args,expect", [
    ({"name": "Ann", "city": "Fresno", "guests": "two"}, "'two' is not of type 'integer'"),  # wrong type
    ({"name": "Ann", "city": ["Fresno"]}, "is not of type 'string'"),  # wrong type
    ({"name": "Ann"}, "'city' is a required property"),  # missing required
    ({"name": "Ann", "city": "Fresno", "seats": "7"}, "'7' is not one of ['1', '2', '3']"),  # enum
])
def test_tool_call_breaking_its_schema_is_set_aside_with_the_validator_message(args, expect):
    out = F.clean_record(row("book it", message("assistant", None, [call("BookTable", **args)])))
    assert out["reason"] == F.R_SCHEMA and expect in out["detail"] and "BookTable" in out["detail"]


@pytest.mark.parametrize("args", [
    {"name": "Ann", "city": "Fresno", "seats": 2},  # SGD: string enum, numeric answer
    {"name": "Ann", "city": "Fresno", "guests": "3"},  # integer declared, text answer
    {"name": "Ann", "city": "Fresno", "extra": "not declared, not checked"},
])
def test_schema_check_is_lenient_like_evaluation_and_checks_only_what_is_declared(args):
    out = F.clean_record(row("book it", message("assistant", None, [call("BookTable", **args)])))
    assert out["reason"] is None, out["detail"]


def test_answer_problem_and_call_problem_differ_only_where_documented():
    from flywheel.checks import answer_problem, call_problem

    tools = json.dumps([{"type": "function", "function": {"name": "BookTable", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    book = {"content": None, "tool_calls": [{"name": "BookTable", "arguments": '{"city": "Fresno"}'}]}
    cases = [  # answer, tools, answer_problem's code, call_problem's code
        (book, tools, None, None),
        ({"content": "I'm sorry, I can't help with that."}, tools, "refusal", None),  # text, not a broken call
        ({"content": ""}, tools, "empty_answer", "empty_answer"),
        ({"content": ""}, "[]", "empty_answer", None),  # nothing declared: an empty answer is not a broken call
        ({"content": '<tool_call>{"name": "BookTable", "arg'}, tools, None, "unparsed_tool_call"),
        ({"content": '{"name": "BookTable", "arguments": {}}'}, tools, None, "unparsed_tool_call"),
        (book, "[]", None, "unknown_tool"),  # a call where no tool is declared
        ({"tool_calls": [{"name": "Other", "arguments": "{}"}]}, tools, "unknown_tool", "unknown_tool"),
        ({"tool_calls": [{"name": "BookTable", "arguments": "[1]"}]}, tools, "bad_tool_arguments",
         "bad_tool_arguments"),
        ({"tool_calls": [{"name": "BookTable", "arguments": "{}"}]}, tools, "tool_schema_violation",
         "tool_schema_violation"),
    ]
    for answer, declared, as_answer, as_call in cases:
        got = answer_problem(declared, answer), call_problem(declared, answer)
        assert tuple(p and p[0] for p in got) == (as_answer, as_call), (answer, declared, got)


def test_length_bounds():
    cfg = CurateConfig(max_prompt_chars=40, min_answer_chars=5)
    assert F.clean_record(row("x" * 41, BOOK), cfg=cfg)["reason"] == F.R_TOO_LONG
    assert F.clean_record(row("hello", message("assistant", "ok")), cfg=cfg)["reason"] == F.R_TOO_SHORT
    assert F.clean_record(row("hello", message("assistant", "okay, done")), cfg=cfg)["reason"] is None
    assert F.clean_record(row("hello", BOOK), cfg=cfg)["reason"] is None  # tool calls have no minimum


# --- near-duplicates -------------------------------------------------------------------------------------
LONG = ("I am planning a trip with my family next month and we would like to find a quiet restaurant close "
        "to the hotel that serves vegetarian food, has outdoor seating, accepts reservations for a group of "
        "six people around seven in the evening, and is not too expensive because we are on a budget this "
        "time. Could you look for something like that in the downtown area of San Jose please, and if there "
        "is nothing available on Friday then Saturday works as well, although my parents prefer to eat early "
        "and my youngest son needs a high chair, so a place that is friendly to small children is best")
OTHER = ("My sister is visiting from Chicago and she wants to see a live jazz concert this weekend, ideally "
         "somewhere we can also get dinner, so please search for music events on Saturday night in Oakland "
         "and tell me which venues still have tickets available for two adults at a reasonable price, and "
         "whether any of them are within walking distance of the train station near Lake Merritt")


def keys(outs):
    return [{k: o[k] for k in ("record_id", "session_id", "timestamp", "reason", "detail", "dedup_key",
                               "minhash", "label", "task")} for o in outs]


def test_near_duplicates_are_removed_across_batches_keeping_the_earliest():
    first = F.clean_batch([row(LONG, BOOK, rid="orig", session="s1", ts=1.0)])
    changed = LONG.replace("quiet", "calm")  # one word changed
    second = F.clean_batch([row(changed, BOOK, rid="copy", session="s2", ts=5.0),
                            row(OTHER, BOOK, rid="other", session="s3", ts=6.0),
                            row("Book a table in Paris", BOOK, rid="paris", session="s4", ts=7.0),
                            row("Book a table in Rome", BOOK, rid="rome", session="s5", ts=8.0),
                            row("Yes", BOOK, rid="turn2", session="s1", ts=9.0,  # the next turn
                                history=[message("user", LONG), message("assistant", "Which day?")])])
    rows = keys(first + second)
    assert all(len(r["minhash"]) == 4 * CurateConfig().near_dup_num_perm for r in rows)
    assert F.mark_duplicates(rows) == 0
    assert F.mark_near_duplicates(rows, 0.9) == 1
    by_id = {r["record_id"]: r for r in rows}
    assert by_id["copy"]["reason"] == near_dup.R_NEAR_DUP and "record orig" in by_id["copy"]["detail"]
    assert [r["record_id"] for r in rows if r["reason"] is None] == ["orig", "other", "paris", "rome", "turn2"]
    assert F.mark_near_duplicates(keys(first + second), 0.0) == 0  # 0: off


def test_near_duplicate_keeps_the_earliest_even_when_it_arrives_in_a_later_batch():
    late = F.clean_batch([row(LONG, BOOK, rid="z-late", session="s1", ts=9.0)])
    early = F.clean_batch([row(LONG.replace("quiet", "calm"), BOOK, rid="a-early", session="s2", ts=2.0)])
    rows = keys(late + early)
    F.mark_near_duplicates(rows, 0.9)
    assert [r["record_id"] for r in rows if r["reason"] is None] == ["a-early"]


# --- split and cap ---------------------------------------------------------------------------------------
def test_rare_labels_are_stratified_together_and_held_out_labels_are_seen_in_training():
    rows = [{"record_id": f"a{i}", "session_id": f"sa{i // 2}", "label": "A"} for i in range(40)]
    rows += [{"record_id": f"r{i}", "session_id": f"sr{i}", "label": f"R{i // 2}"} for i in range(20)]
    grouped = F.split_groups(rows, 0.1, 0.2, 1, seed=0, min_label_count=5)
    per_label = F.split_groups(rows, 0.1, 0.2, 1, seed=0, min_label_count=0)

    def held(split, assign, rare=True):
        return [r for r in rows if (r["label"] != "A") == rare and assign[r["session_id"]] == split]

    assert len(held("test", grouped)) == 4 and len(held("validation", grouped)) == 2  # 20% / 10% of the 20 rare rows
    # per label (2 rows, 2 sessions each): one session goes to test, the other stays in train
    assert len(held("test", per_label)) == 10 and not held("validation", per_label)
    train_labels = {r["label"] for r in rows if grouped[r["session_id"]] == "train"}
    assert {r["label"] for r in held("test", grouped) + held("validation", grouped)} <= train_labels
    assert len(held("test", grouped, rare=False)) == 8 and len(held("validation", grouped, rare=False)) == 4
    assert grouped == F.split_groups(rows, 0.1, 0.2, 1, seed=0, min_label_count=5)
    assert F.split_groups(rows, 0.1, 0.2, 1, seed=0, pinned={"sr0": "test", "sa0": "train"})["sr0"] == "test"


def test_cap_is_label_balanced_and_deterministic():
    def make():
        return [{"record_id": f"{lb}{i}", "label": lb, "task": "tool_call", "reason": None}
                for lb, n in (("A", 50), ("B", 8), ("C", 2)) for i in range(n)]

    rows = make()
    assert F.cap_examples(rows, 20, seed=0) == 40
    kept = [r for r in rows if r["reason"] is None]
    assert {lb: sum(r["label"] == lb for r in kept) for lb in "ABC"} == {"A": 10, "B": 8, "C": 2}
    assert {r["reason"] for r in rows if r["reason"]} == {F.R_OVER_CAP}
    again = make()
    F.cap_examples(again, 20, seed=0)
    assert [r["record_id"] for r in again if r["reason"] is None] == [r["record_id"] for r in kept]
    assert F.cap_examples(make(), 0, seed=0) == 0


def test_evaluation_reads_a_students_parsed_answer_with_the_same_checks():
    """`valid_call` / `call_problem_of` take `parse_answer`'s OpenAI shape; a call cut short by the token cap (an
    open `<tool_call>`, what a grammar-constrained answer looping inside a string leaves) is unparsed, not valid."""
    from flywheel.evaluate.run import call_problem_of, valid_call
    from flywheel.prompts import parse_answer

    tools = [{"type": "function", "function": {"name": "BookTable", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    cases = [
        ('<tool_call>{"name": "BookTable", "arguments": {"city": "Fresno"}}</tool_call>', None),
        ("Which city?", None),
        ('<tool_call>{"name": "BookTable", "arguments": {"city": "Cambodominadominadomina', "unparsed_tool_call"),
        ('<tool_call>{"name": "Other", "arguments": {}}</tool_call>', "unknown_tool"),
        ('<tool_call>{"name": "BookTable", "arguments": {}}</tool_call>', "tool_schema_violation"),
    ]
    for text, code in cases:
        answer = parse_answer(text)
        problem = call_problem_of(answer, tools)
        assert (problem and problem[0]) == code, (text, problem)
        assert valid_call(answer, tools) is (code is None)
