"""Evaluation: type-aware and multi-call matching, bootstrap intervals, the gate's rules, the in-context baseline
with the real MiniLM, the LLM judge against a real local HTTP server (a separate process). No Ray.

    .venv/bin/python -m pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time

import httpx
import pytest

from flywheel.config import EvaluateConfig
from flywheel.evaluate.gate import decide
from flywheel.metrics import bootstrap_ci, confidence_intervals, per_example, score, score_tool_call
from flywheel.schema import message

TOOLS = [{"type": "function", "function": {"name": "BookFlight", "parameters": {
    "type": "object", "required": ["origin", "cabin"], "properties": {
        "origin": {"type": "string"},
        "cabin": {"type": "string", "enum": ["Economy", "Business"], "default": "Economy"},
        "seats": {"type": "string", "enum": ["1", "2", "3"], "description": "Seats (default: 1)"},
        "bags": {"type": "integer", "default": 0},
        "refundable": {"type": "boolean", "description": "(default: False)"},
        "zip": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "FindHotel", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "stars": {"type": "number"}}}}}]


def call(name, **args):
    return {"id": None, "name": name, "arguments": json.dumps(args)}


def answer(*calls):
    return message("assistant", None, list(calls))


def matches(exp_args: dict, pred_args: dict, name="BookFlight") -> bool:
    s = score_tool_call(answer(call(name, **exp_args)), answer(call(name, **pred_args)), TOOLS)
    return s["name_args_accuracy"] == 1.0


# --- type-aware and multi-call matching -------------------------------------------------------------------
@pytest.mark.parametrize("exp, pred, same", [
    ({"origin": "SFO", "cabin": "Business", "seats": "2"}, {"origin": "sfo ", "cabin": "business", "seats": 2}, True),
    ({"origin": "SFO", "cabin": "Economy", "bags": 2}, {"origin": "SFO", "cabin": "Economy", "bags": "2"}, True),
    ({"origin": "SFO", "cabin": "Economy", "bags": 2}, {"origin": "SFO", "cabin": "Economy", "bags": 2.0}, True),
    ({"origin": " San  Francisco", "cabin": "Economy"}, {"origin": "san francisco", "cabin": "ECONOMY"}, True),
    ({"origin": "SFO", "cabin": "Economy", "refundable": "True"}, {"origin": "SFO", "cabin": "Economy",
                                                                   "refundable": True}, True),
    # string-typed: a number and its text match, but "02134" is not 2134
    ({"origin": "SFO", "cabin": "Economy", "zip": "02134"}, {"origin": "SFO", "cabin": "Economy", "zip": 2134}, False),
    ({"origin": "SFO", "cabin": "Economy", "zip": "2134"}, {"origin": "SFO", "cabin": "Economy", "zip": 2134}, True),
    # optional arguments equal to their declared default count as omitted (schema default and "(default: x)")
    ({"origin": "SFO", "cabin": "Economy"}, {"origin": "SFO", "cabin": "Economy", "seats": "1", "bags": 0,
                                              "refundable": "false"}, True),
    ({"origin": "SFO", "cabin": "Economy", "seats": 1}, {"origin": "SFO", "cabin": "Economy"}, True),
    ({"origin": "SFO", "cabin": "Economy"}, {"origin": "SFO", "cabin": "Economy", "seats": "2"}, False),
    # a required argument is never dropped, even when it equals its default
    ({"origin": "SFO"}, {"origin": "SFO", "cabin": "Economy"}, False),
    ({"city": "Paris", "stars": "4.5"}, {"city": "paris", "stars": 4.5}, True),
])
def test_argument_matching_follows_the_declared_types_and_defaults(exp, pred, same):
    name = "FindHotel" if "city" in exp else "BookFlight"
    assert matches(exp, pred, name) is same


def test_multi_call_answers_match_in_any_order():
    a = call("BookFlight", origin="SFO", cabin="Economy")
    b = call("FindHotel", city="Paris", stars=4)
    b_text = call("FindHotel", city=" paris", stars="4")
    exp = answer(a, b)
    s = score_tool_call(exp, answer(b_text, a), TOOLS)
    assert s["function_name_accuracy"] == s["name_args_accuracy"] == s["call_f1"] == s["slot_f1"] == 1.0
    s = score_tool_call(exp, answer(a), TOOLS)  # one of two calls
    assert s["function_name_accuracy"] == 0.0 and s["name_args_accuracy"] == 0.0
    assert s["call_f1"] == pytest.approx(2 / 3)
    s = score_tool_call(exp, answer(a, a), TOOLS)  # a multiset: the same call twice is not both calls
    assert s["function_name_accuracy"] == 0.0 and s["call_f1"] == pytest.approx(0.5)
    s = score_tool_call(exp, answer(b, call("BookFlight", origin="LAX", cabin="Economy")), TOOLS)
    assert s["function_name_accuracy"] == 1.0 and s["name_args_accuracy"] == 0.0 and 0 < s["slot_f1"] < 1
    # values of different types under one key never break the comparison
    mixed = score_tool_call(answer(call("X", v=2), call("X", v="two")), answer(call("X", v=[1]), call("X", v=None)))
    assert mixed["name_args_accuracy"] == 0.0


def test_score_passes_each_examples_tools():
    exp = [answer(call("BookFlight", origin="SFO", cabin="Economy"))] * 2
    pred = [answer(call("BookFlight", origin="SFO", cabin="Economy", seats="1"))] * 2
    assert score("tool_call", exp, pred, [TOOLS, TOOLS])["name_args_accuracy"] == 1.0
    assert score("tool_call", exp, pred)["name_args_accuracy"] == 0.0  # no schema: no declared default


# --- bootstrap intervals ----------------------------------------------------------------------------------
def bernoulli(n: int, p: float) -> list[float]:
    return [float((i * 7919) % 100 < p * 100) for i in range(n)]


def test_bootstrap_interval_contains_the_estimate_narrows_with_n_and_is_seeded():
    widths = []
    for n in (20, 80, 320):
        xs = bernoulli(n, 0.7)
        lo, hi = bootstrap_ci(xs, n_boot=1000, seed=0)
        assert lo <= sum(xs) / n <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert bootstrap_ci(bernoulli(50, 0.5), seed=3) == bootstrap_ci(bernoulli(50, 0.5), seed=3)
    assert bootstrap_ci([], n_boot=1000) is None


def test_every_metric_gets_an_interval_including_macro_f1():
    exp = [message("assistant", f"[[{c}]]") for c in "ABCABCABCA"]
    pred = [message("assistant", c) for c in "ABCABCACBB"]
    values = per_example("classification", exp, pred)
    point = score("classification", exp, pred)
    cis = confidence_intervals("classification", values, n_boot=500, seed=0)
    assert set(cis) == {"accuracy_ci", "macro_f1_ci"}
    for m in ("accuracy", "macro_f1"):
        assert cis[f"{m}_ci"][0] <= point[m] <= cis[f"{m}_ci"][1]


# --- the gate ---------------------------------------------------------------------------------------------
def system(fn=0.97, ci=(0.945, 0.99), n=200):
    return {"name_args_accuracy": fn, "name_args_accuracy_ci": None if ci is None else list(ci), "n": n}


GOOD = {"task": "tool_call", "n_expected": 200, "candidate": system(), "teacher": system(1.0, (1.0, 1.0))}


@pytest.mark.parametrize("report, why", [
    ({**GOOD, "candidate": system(ci=None)}, "name_args_accuracy_ci is missing"),
    ({**GOOD, "candidate": system(ci=(0.99, 0.945))}, "name_args_accuracy_ci is missing or broken"),
    ({**GOOD, "candidate": system(ci=(math.nan, 0.99))}, "name_args_accuracy_ci is missing or broken"),
    ({**GOOD, "candidate": system(0.95, (0.85, 0.99))}, "lower bound 0.850"),  # the point clears, the bound not
    # 20/20 correct: the bootstrap collapses to [1, 1], Wilson's bound (0.83) does not
    ({**GOOD, "n_expected": 20, "candidate": system(1.0, (1.0, 1.0), 20), "teacher": system(1.0, (1, 1), 20)},
     "lower bound 0.83"),
    ({**GOOD, "teacher": system(1.0, (1, 1), 150)}, "teacher scored 150 of 200"),
    ({**GOOD, "candidate": system(n=199)}, "candidate scored 199 of 200"),
    ({**GOOD, "n_expected": None}, "of None test examples"),
    ({**GOOD, "production": system(0.995, (0.985, 1.0))}, "regresses production"),
    ({**GOOD, "production": system(n=100)}, "production scored 100 of 200"),
    ({**GOOD, "production": system(ci=None)}, "cannot rule out a regression"),
    ({**GOOD, "production": "v1"}, "production results are missing"),
    ({**GOOD, "candidate": {**system(), "n": True}}, "scored examples"),
])
def test_gate_fails_closed_with_a_reason(report, why):
    verdict = decide(report, 0.9, 10)
    assert verdict["passed"] is False and any(why in r for r in verdict["reasons"]), verdict["reasons"]


def test_gate_passes_within_productions_interval_or_the_tolerance():
    assert decide({**GOOD, "production": None}, 0.9, 10)["passed"]
    verdict = decide({**GOOD, "production": system(0.98, (0.96, 0.995))}, 0.9, 10)
    assert verdict["passed"] and verdict["production_lower"] == 0.96
    better_prod = {**GOOD, "production": system(0.995, (0.985, 1.0))}
    assert not decide(better_prod, 0.9, 10)["passed"]
    assert decide(better_prod, 0.9, 10, max_regression=0.02)["passed"]
    v = decide(GOOD, 0.9, 10)
    assert v["candidate_lower"] == pytest.approx(0.936, abs=1e-3) and v["threshold"] == 0.9


def test_gate_reads_the_row_it_is_told_to_read():
    """`flywheel evaluate` gates the candidate as Serve decodes it: the free row's scores do not count."""
    served = {**GOOD, "candidate": system(0.5, (0.3, 0.7)), "candidate_constrained": system()}
    verdict = decide(served, 0.9, 10, candidate="candidate_constrained")
    assert verdict["passed"] and verdict["system"] == "candidate_constrained" and verdict["candidate"] == 0.97
    assert not decide(served, 0.9, 10)["passed"]  # the free row alone would fail
    missing = decide(GOOD, 0.9, 10, candidate="candidate_constrained")
    assert not missing["passed"] and "candidate_constrained results are missing" in missing["reasons"]


def selective_block(threshold=0.8, accepted=60, right=59, target=0.95):
    """A report's selective block as `calibrate.selective_block` writes it (the parts the gate reads)."""
    from flywheel.evaluate.selective import check_on_test

    conf = [0.9] * accepted + [0.1] * (100 - accepted)
    correct = [1] * right + [0] * (accepted - right) + [0] * (100 - accepted)
    return {"target": target, "certificate": {"threshold": threshold, "reason": None if threshold is not None
                                              else "45 accepted calibration records needed"},
            "test": check_on_test(conf, correct, threshold, target)}


def test_selective_gate_replaces_the_teacher_share_by_the_certificate():
    weak = {**GOOD, "candidate": system(0.45, (0.35, 0.55))}  # right on under half of the calls
    assert not decide(weak, 0.9, 10)["passed"]
    verdict = decide(weak, 0.9, 10, selective=selective_block())
    assert verdict["passed"] and verdict["selective"], verdict["reasons"]
    uncertified = decide(weak, 0.9, 10, selective=selective_block(threshold=None))
    assert not uncertified["passed"] and "no confidence threshold certified" in uncertified["reasons"][0]
    refuted = decide(weak, 0.9, 10, selective=selective_block(accepted=60, right=45))
    assert not refuted["passed"] and "refutes the certificate" in refuted["reasons"][0]
    none_taken = decide(weak, 0.9, 10, selective=selective_block(accepted=0, right=0))
    assert not none_taken["passed"] and "coverage 0" in none_taken["reasons"][0]
    from flywheel.evaluate.calibrate import gate_reasons

    assert gate_reasons(None) and not decide(weak, 0.9, 10, selective={})["passed"]  # fails closed
    # the other rules still hold under selective serving
    partial = decide({**weak, "n_expected": 300}, 0.9, 10, selective=selective_block())
    assert not partial["passed"] and any("partial results" in r for r in partial["reasons"])


def test_the_gate_reads_a_configured_metric():
    rows = {**GOOD, "candidate": {**system(), "function_name_accuracy": 0.5, "function_name_accuracy_ci": [0.4, 0.6]},
            "teacher": {**system(1.0, (1.0, 1.0)), "function_name_accuracy": 1.0}}
    assert decide(rows, 0.9, 10)["passed"] and decide(rows, 0.9, 10)["metric"] == "name_args_accuracy"
    assert not decide(rows, 0.9, 10, metric="function_name_accuracy")["passed"]


def test_production_and_the_gated_candidate_decode_under_the_grammars():
    from flywheel.evaluate.run import _systems

    grammars = [{"type": "auto_tools", "tools": []}, None]
    prompts = {"base": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]}
    production, candidate = {"version": "v1"}, {"version": "v2"}
    decoded = {name: (entry, g) for name, _, entry, g in
               _systems(EvaluateConfig(agent="a"), [], None, prompts, production, candidate, grammars)}
    assert decoded == {"base": (None, None), "production": (production, grammars), "candidate": (candidate, None),
                       "candidate_constrained": (candidate, grammars)}
    free = _systems(EvaluateConfig(agent="a"), [], None, prompts, production, candidate, None)
    assert [(name, g) for name, _, _, g in free] == [("base", None), ("production", None), ("candidate", None)]


# --- the in-context baseline with the real MiniLM ---------------------------------------------------------
def example(text: str, target: dict | None = None, history: list[dict] | None = None) -> dict:
    return {"messages": [*(history or []), message("user", text)], "tools_json": json.dumps(TOOLS),
            "target": target or message("assistant", f"answer to {text}")}


TRAIN = [example("Find me a flight from Boston to Chicago on Friday",
                 answer(call("BookFlight", origin="Boston", cabin="Economy"))),
         example("Book a table for four at an Italian restaurant tonight"),
         example("What will the weather be like in Paris tomorrow?"),
         example("Play some relaxing jazz music in the living room")]


def test_in_context_examples_are_the_semantically_nearest():
    from flywheel.evaluate.in_context import select_demos

    queries = [example("I need to fly out of Denver next Monday"), example("Reserve dinner for two at a sushi place"),
               example("Is it going to rain in London this weekend?")]
    demos = select_demos(queries, TRAIN, k=2)
    assert [d[0] is TRAIN[i] for d, i in zip(demos, (0, 1, 2))] == [True, True, True]
    assert all(len(d) == 2 for d in demos)
    assert select_demos(queries, TRAIN, k=0) == [[], [], []] and select_demos(queries, [], k=3) == [[], [], []]


def test_in_context_prompt_is_trimmed_to_fit():
    from flywheel.evaluate.in_context import fit_prompt
    from flywheel.prompts import prompt_turns

    history = [message("user", "hi"), message("assistant", "Hello! Where to?")]
    ex = example("A flight from Denver please", history=history)

    def count(turns):  # one "token" per character
        return sum(len(t["content"]) for t in turns)

    base = prompt_turns(ex, 10)
    full = fit_prompt(ex, TRAIN[:2], 10, 10_000, count)
    assert full[0] == base[0] and full[-3:] == base[-3:]  # system first, the conversation last
    assert full[1]["content"] == TRAIN[1]["messages"][-1]["content"]  # the farther demo first, the nearest last
    assert full[3]["content"] == TRAIN[0]["messages"][-1]["content"]
    assert full[4]["content"].startswith("<tool_call>") and json.loads(
        full[4]["content"][len("<tool_call>"):-len("</tool_call>")])["name"] == "BookFlight"
    one = fit_prompt(ex, TRAIN[:2], 10, count(full) - 1, count)  # the farthest demo goes first
    assert count(one) < count(full) and TRAIN[0]["messages"][-1]["content"] in [t["content"] for t in one]
    assert TRAIN[1]["messages"][-1]["content"] not in [t["content"] for t in one]
    assert fit_prompt(ex, TRAIN[:2], 10, count(base), count) == base
    assert fit_prompt(ex, TRAIN[:2], 10, 1, count) == prompt_turns(ex, 1)  # nothing fits: the shortest base prompt


# --- the LLM judge against a real local server ------------------------------------------------------------
JUDGE_SERVER = r'''
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Judge(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer judge-key":
            return self.reply(401, {"error": {"message": "bad api key"}})
        prompt = body["messages"][-1]["content"]
        graded = prompt.split("Answer to grade:\n", 1)[1]
        reference = prompt.split("Reference answer:\n", 1)[1].split("\n\nAnswer to grade:", 1)[0]
        if "SLOW" in graded:
            time.sleep(3)
        if "BROKEN" in graded:
            return self.reply(500, {"error": {"message": "judge overloaded"}})
        text = {"PROSE": "I would rate this a 4 out of 5.", "RANGE": '{"score": 9, "reason": "great"}',
                "FENCED": '```json\n{"score": 4}\n```'}.get(graded.strip())
        if text is None:
            text = json.dumps({"score": 5 if graded == reference else 2, "reason": body["model"]})
        self.reply(200, {"id": "j", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]})

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Judge).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", JUDGE_SERVER, str(port)])
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.post(url + "/chat/completions", json={}, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the judge server did not start")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_judge_scores_strict_json_and_reports_failures_separately(judge_url, monkeypatch):
    from flywheel.config import EvaluateConfig
    from flywheel.evaluate.judge import HTTPJudge, JudgeError, judge_answers, parse_verdict
    from flywheel.evaluate.run import judge_row

    assert parse_verdict('{"score": 4, "reason": "ok"}') == 4
    assert [parse_verdict(t) for t in ("4", '{"score": "4"}', '{"score": true}', '{"score": 0}', "", None,
                                       'Sure! {"score": 4}')] == [None] * 7

    monkeypatch.setenv("JUDGE_KEY", "judge-key")
    judge = HTTPJudge(judge_url, "big-teacher", "JUDGE_KEY", timeout_s=1.0)
    try:
        out = judge_answers(judge, ["q"] * 7, ["Paris"] * 7,
                            ["Paris", "Lyon", "PROSE", "RANGE", "FENCED", "SLOW", "BROKEN"])
    finally:
        judge.close()
    assert out["scores"] == [5, 2, None, None, None, None, None]
    assert out["failures"] == {"unparseable": 3, "error": 2}
    assert "did not answer within 1.0s" in out["errors"][0] and "HTTP 500: " in out["errors"][1]

    with pytest.raises(JudgeError, match="HTTP 401"):
        HTTPJudge(judge_url, "m", "NO_SUCH_KEY_ENV", timeout_s=5).reply([{"role": "user", "content": "x"}])
    with pytest.raises(JudgeError, match="could not reach the judge"):
        HTTPJudge(f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=5).reply([{"role": "user", "content": "x"}])

    cfg = EvaluateConfig(agent="support", judge_url=judge_url, judge_api_key_env="JUDGE_KEY", judge_timeout_s=5)
    examples = [example("Capital of France?", message("assistant", "Paris"))] * 3
    row = judge_row(cfg, examples, [{"content": "Paris"}, {"content": "Rome"}, {"content": "PROSE"}])
    assert row["judge_score"] == 3.5 and row["judge_n"] == 2  # the unparseable reply is not a score
    assert row["judge_failures"] == {"unparseable": 1, "error": 0}
    assert row["judge_score_ci"][0] <= 3.5 <= row["judge_score_ci"][1]


def test_evaluate_config_names_the_bad_key():
    from flywheel.config import ConfigError, EvaluateConfig, build

    for key, value in (("n_boot", 10), ("min_share_of_teacher", 1.5), ("max_regression", -0.1), ("ci_level", 1.0),
                       ("in_context_k", -1), ("teacher_usd_per_m_input_tokens", -1), ("judge_timeout_s", 0),
                       ("judge_url", "teacher.internal/v1")):
        with pytest.raises(ConfigError, match=key):
            build(EvaluateConfig, {"agent": "a", key: value})
