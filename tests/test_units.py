"""Pure functions: curation filters, prompts, metrics, the gate, configs, the registry. No Ray."""

import dataclasses
import glob
import json
import math
import os
import threading

import pytest
import yaml

from flywheel import config as C
from flywheel.curate import filters as F
from flywheel.evaluate.gate import decide
from flywheel.metrics import norm_value, score, score_tool_call, wilson_lower
from flywheel.pii import Redactor
from flywheel.prompts import chat_messages, format_answer, parse_answer, render_tool
from flywheel.registry.registry import PromotionConflict, Registry, RegistryError
from flywheel.schema import message

from conftest import REPO

TOOL = {"type": "function", "function": {"name": "FindFlights", "description": "Find flights", "parameters": {
    "type": "object", "required": ["origin"], "properties": {
        "origin": {"type": "string"}, "seats": {"type": "string", "enum": ["1", "2"], "description": "(default: 1)"}}}}}


def call(name, **args):
    return {"id": None, "name": name, "arguments": json.dumps(args)}


# --- prompts ---------------------------------------------------------------------------------------------
def test_tools_render_compactly():
    assert render_tool(TOOL) == "FindFlights(origin*, seats [1|2] =1) - Find flights"


def test_tools_render_as_json_when_an_adapter_is_trained_that_way():
    from flywheel.evaluate.run import not_servable, tool_format

    msgs = [message("user", "hi")]
    compact, as_json = (chat_messages(msgs, [TOOL], 10, fmt)[0]["content"] for fmt in ("signatures", "json"))
    lines = as_json.splitlines()
    assert lines[0] == "Tools (JSON):" and json.loads(lines[1]) == TOOL["function"] and compact != as_json
    with pytest.raises(ValueError, match="tool_format"):
        chat_messages(msgs, [TOOL], 10, "xml")
    with pytest.raises(C.ConfigError, match="tool_format"):
        C.DistillConfig(agent="a", tool_format="xml")
    # the format is the adapter's (its lineage); Serve renders signatures, so a json adapter is never promoted
    trained = {"hyperparameters": dataclasses.asdict(C.DistillConfig(agent="a", tool_format="json"))}
    assert tool_format(trained) == "json" and "signatures" in not_servable(trained)
    assert tool_format({"version": "v1"}) == "signatures" and not_servable({"version": "v1"}) is None


def test_answer_round_trips_through_the_students_text_form():
    target = message("assistant", None, [call("FindFlights", origin="SFO", seats="2")])
    parsed = parse_answer(format_answer(target))
    assert parsed["valid"] and parsed["content"] is None
    assert parsed["tool_calls"][0]["function"]["name"] == "FindFlights"
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"origin": "SFO", "seats": "2"}


def test_broken_tool_call_text_is_flagged_invalid():
    assert parse_answer('<tool_call>{"name": "X", "arguments": {</tool_call>')["valid"] is False
    assert parse_answer("just text") == {"content": "just text", "tool_calls": None, "valid": True}


def test_history_is_capped_and_system_and_tools_lead():
    msgs = [message("system", "be brief")] + [message("user", f"u{i}") for i in range(15)]
    turns = chat_messages(msgs, [TOOL], max_history=10)
    assert turns[0]["role"] == "system" and "be brief" in turns[0]["content"] and "FindFlights(" in turns[0]["content"]
    assert len(turns) == 11 and turns[-1]["content"] == "u14"


# --- curation filters ------------------------------------------------------------------------------------
def test_redaction_is_consistent_between_prompt_and_answer():
    redact = Redactor()
    prompt = F.redact_message(message("user", "mail jane.doe@example.com or call 415-555-0132"), redact)
    answer = F.redact_message(message("assistant", None, [call("Notify", email="jane.doe@example.com")]), redact)
    assert "jane.doe" not in prompt["content"] and "415-555-0132" not in prompt["content"]
    assert json.loads(answer["tool_calls"][0]["arguments"])["email"] == "<EMAIL_1>"
    assert "<EMAIL_1>" in prompt["content"] and "<PHONE_1>" in prompt["content"]


def test_cards_need_a_valid_checksum_and_dates_are_not_phones():
    redact = Redactor()
    assert redact("card 4111 1111 1111 1111") == "card <CARD_1>"
    assert redact("order 1234 5678 9012 3456") == "order 1234 5678 9012 3456"  # fails Luhn
    assert redact("on 2019-03-01 at 10:30") == "on 2019-03-01 at 10:30"
    assert redact("ip 10.0.0.12") == "ip <IP_1>"


def row(answer, tools=(TOOL,), feedback=None, user="find me a flight from SFO", rid="r1", session="s1"):
    return {"record_id": rid, "agent_id": "a", "session_id": session, "timestamp": 1.0,
            "messages": [message("user", user)], "tools_json": json.dumps(list(tools)),
            "response": answer, "feedback": feedback, "source": "t"}


@pytest.mark.parametrize("answer,feedback,reason", [
    (message("assistant", None, [call("Nope")]), None, F.R_UNKNOWN_TOOL),
    (message("assistant", "  "), None, F.R_EMPTY),
    (message("assistant", "I'm sorry, I can't help with that."), None, F.R_REFUSAL),
    (message("assistant", None, [call("FindFlights", origin="SFO")]), -1.0, F.R_NEGATIVE),
    (message("assistant", None, [{"id": None, "name": "FindFlights", "arguments": "[1]"}]), None, F.R_BAD_ARGS),
])
def test_each_filter_sets_aside_with_its_reason(answer, feedback, reason):
    assert F.clean_record(row(answer, feedback=feedback), 100_000)["reason"] == reason


def test_kept_record_gets_task_label_and_dedup_key():
    out = F.clean_record(row(message("assistant", None, [call("FindFlights", origin="SFO")])), 100_000)
    assert out["reason"] is None and out["task"] == "tool_call" and out["label"] == "FindFlights"
    assert F.clean_record(row(message("assistant", "x")), 10)["reason"] == F.R_OVERSIZED


def test_duplicates_keep_the_earliest_record():
    rows = [{"record_id": f"r{i}", "timestamp": float(10 - i), "dedup_key": "k" if i < 3 else f"k{i}",
             "reason": None} for i in range(5)]
    assert F.mark_duplicates(rows) == 2
    assert [r["record_id"] for r in rows if r["reason"] is None] == ["r2", "r3", "r4"]


def test_split_is_stratified_grouped_by_session_and_deterministic():
    rows = [{"record_id": f"r{i}", "session_id": f"s{i // 2}", "label": "A" if i < 40 else "B"} for i in range(50)]
    a = F.split_groups(rows, 0.1, 0.2, 1, seed=0)
    assert a == F.split_groups(rows, 0.1, 0.2, 1, seed=0)
    for split, share in (("test", 0.2), ("validation", 0.1)):
        held = [r for r in rows if a[r["session_id"]] == split]
        assert {r["label"] for r in held} == {"A", "B"}  # stratified: every label in each held-out split
        assert share - 0.1 <= len(held) / len(rows) <= share + 0.1
    pinned = F.split_groups(rows, 0.1, 0.2, 1, seed=1, pinned={"s0": "test", "s1": "validation"})
    assert pinned["s0"] == "test" and pinned["s1"] == "validation"


def test_short_text_answers_make_a_classifier_prose_makes_text():
    rows = [{"task": "classification", "label": lb} for lb in ["earnings", "other"] * 20]
    F.settle_task(rows)
    assert {r["task"] for r in rows} == {"classification"}
    rows = [{"task": "classification", "label": f"l{i}"} for i in range(40)] + [{"task": "text", "label": "text"}]
    F.settle_task(rows)
    assert {r["task"] for r in rows} == {"text"}


# --- metrics and gate ------------------------------------------------------------------------------------
def test_argument_matching_is_type_aware():
    assert norm_value("2") == norm_value(2) == norm_value(2.0)
    assert norm_value(" San  Jose ") == norm_value("san jose")
    exp = message("assistant", None, [call("FindFlights", origin="SFO", seats="2")])
    pred = {"tool_calls": [{"function": {"name": "FindFlights", "arguments": '{"seats": 2, "origin": "sfo"}'}}]}
    s = score_tool_call(exp, pred)
    assert s["function_name_accuracy"] == s["name_args_accuracy"] == s["slot_f1"] == 1.0
    wrong = {"tool_calls": [{"function": {"name": "FindFlights", "arguments": '{"origin": "SFO"}'}}]}
    s = score_tool_call(exp, wrong)
    assert s["function_name_accuracy"] == 1.0 and s["name_args_accuracy"] == 0.0 and 0 < s["slot_f1"] < 1


def test_classification_accuracy_and_macro_f1():
    exp = [message("assistant", "[[Earnings]]"), message("assistant", "[[Other]]")]
    pred = [{"content": "earnings"}, {"content": "[[Earnings]]"}]
    s = score("classification", exp, pred)
    assert s["accuracy"] == 0.5 and 0 < s["macro_f1"] < 1


def test_wilson_lower_bound():
    assert 0.88 < wilson_lower(1.0, 33) < 0.9
    assert wilson_lower(float("nan"), 10) == 0.0


# A candidate whose 95% lower bound (bootstrap, and Wilson for a 0/1 metric: 0.936 at 194/200) clears 0.9 x teacher.
GOOD = {"task": "tool_call", "n_expected": 200,
        "candidate": {"name_args_accuracy": 0.97, "name_args_accuracy_ci": [0.945, 0.99], "n": 200},
        "teacher": {"name_args_accuracy": 1.0, "name_args_accuracy_ci": [1.0, 1.0], "n": 200}}


def cand(fn=0.97, ci=(0.945, 0.99), n=200):
    return {"name_args_accuracy": fn, "name_args_accuracy_ci": list(ci) if ci else ci, "n": n}


def test_gate_passes_a_good_candidate():
    assert decide(GOOD, 0.9, 10)["passed"]


@pytest.mark.parametrize("broken", [
    None, {}, {**GOOD, "task": "poetry"},
    {**GOOD, "candidate": cand(fn=math.nan)},
    {**GOOD, "candidate": {"name_args_accuracy_ci": [0.945, 0.99], "n": 200}},
    {**GOOD, "teacher": None},
    {**GOOD, "candidate": cand(n=5)},
    {**GOOD, "n_expected": 300},
    {**GOOD, "candidate": cand(fn=0.5, ci=(0.43, 0.57))},
    {**GOOD, "production": {"name_args_accuracy": 0.99, "n": 200}},  # no interval: cannot rule out a regression
    {**GOOD, "production": {"accuracy": 0.99, "n": 200}},
    {**GOOD, "candidate": cand(fn="0.95")},
])
def test_gate_fails_closed(broken):
    verdict = decide(broken, 0.9, 10)
    assert verdict["passed"] is False and verdict["reasons"]


# --- configs ---------------------------------------------------------------------------------------------
def test_unknown_keys_and_bad_values_name_the_key():
    with pytest.raises(C.ConfigError, match="learning_rat"):
        C.build(C.DistillConfig, {"agent": "a", "learning_rat": 1})
    with pytest.raises(C.ConfigError, match="num_workers"):
        C.build(C.DistillConfig, {"agent": "a", "num_workers": "two"})
    with pytest.raises(C.ConfigError, match="agent"):
        C.build(C.DistillConfig, {})
    for cls in (C.DistillConfig, C.SweepConfig, C.EvaluateConfig, C.ServeConfig):  # 0 would silently mean "all"
        with pytest.raises(C.ConfigError, match="max_history: must be >= 1"):
            C.build(cls, {"max_history": 0})
    with pytest.raises(ValueError, match="max_history"):
        chat_messages([{"role": "user", "content": "hi"}], [], max_history=0)
    for bad in ("base@v1", "../base", " "):  # the base route's name is an id and names no adapter version
        with pytest.raises(C.ConfigError, match="base_model_name"):
            C.build(C.ServeConfig, {"base_model_name": bad})
    assert C.build(C.ServeConfig, {"base_model_name": "smollm2-135m"}).base_model_name == "smollm2-135m"
    cfg = C.build(C.CurateConfig, {"agents": "a,b", "test_fraction": "0.3", "validation_fraction": "0.15"})
    assert cfg.agents == ("a", "b") and (cfg.test_fraction, cfg.validation_fraction) == (0.3, 0.15)
    # the deprecated names still load, into the new fields: both spellings make the same config
    old = C.build(C.CurateConfig, {"agents": "a,b", "eval_fraction": "0.3", "min_eval_per_label": 2,
                                   "validation_fraction": "0.15"})
    assert old == C.CurateConfig(agents=("a", "b"), test_fraction=0.3, validation_fraction=0.15,
                                 min_held_out_per_label=2)
    with pytest.raises(C.ConfigError, match="eval_fraction.*test_fraction"):
        C.build(C.CurateConfig, {"eval_fraction": 0.3, "test_fraction": 0.25})
    with pytest.raises(C.ConfigError, match="test_fraction, validation_fraction"):
        C.CurateConfig(test_fraction=0.5, validation_fraction=0.5)


def test_every_job_yaml_loads_into_its_config():
    from flywheel.cli import VERBS

    files = sorted(glob.glob(os.path.join(REPO, "jobs", "*.yaml")))  # <verb>.yaml, or <verb>-<variant>.yaml
    assert {os.path.basename(f)[:-5].split("-")[0] for f in files} == set(VERBS)
    for path in files:
        name = os.path.basename(path)[:-5]
        verb = name.split("-")[0]
        text = open(path).read()
        assert text.startswith(f"# ray job submit --working-dir . -- python jobs/{verb}.py --config jobs/{name}.yaml")
        C.load(VERBS[verb][0], path)
        assert isinstance(yaml.safe_load(text), dict)


# --- registry --------------------------------------------------------------------------------------------
def _adapter(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    return str(d)


def test_registry_versions_promotion_cas_and_rollback(store, tmp_path):
    reg = Registry(store)
    v1 = reg.register("a", _adapter(tmp_path, "x1"), {"dataset_version": "d1"})
    v2 = reg.register("a", _adapter(tmp_path, "x2"), {"dataset_version": "d2"})
    assert (v1["version"], v2["version"]) == ("v1", "v2")
    assert store.exists("adapters/a/v2/adapter_config.json")
    reg.promote("a", "v1", expected=None)
    with pytest.raises(PromotionConflict):
        reg.promote("a", "v2", expected=None)
    reg.promote("a", "v2", expected="v1")
    assert reg.alias("a")["version"] == "v2"
    assert reg.rollback("a")["to"] == "v1"
    assert reg.alias("a")["version"] == "v1"
    with pytest.raises(RegistryError):
        reg.promote("a", "v9")


def test_concurrent_promotions_have_exactly_one_winner(store, tmp_path):
    reg = Registry(store)
    for i in range(2):
        reg.register("a", _adapter(tmp_path, f"y{i}"), {})
    results = []

    def attempt(version):
        try:
            reg.promote("a", version, expected=None)
            results.append(version)
        except PromotionConflict:
            results.append("conflict")

    threads = [threading.Thread(target=attempt, args=(v,)) for v in ("v1", "v2") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("conflict") == 7 and reg.alias("a")["version"] in results
