"""Monitor: input drift on the shipped SGD logs, episodes, incremental reading, answer quality, gauges.

    pytest tests/test_monitor.py -q

The reference is a train split written here for sgd_Flights (2/3 of its conversations); "live" traffic is appended
through the log store as Serve would (source "serve"): the held-out Flights conversations (no drift), or Hotels and
Music user turns sent to sgd_Flights (drift). Embeddings are the real bundled MiniLM, memoised per text for the
session (`embed_texts` is the monitor's one seam to the model).
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flywheel
from flywheel import routing
from flywheel.capture.ingest import digest, parse_record
from flywheel.capture.store import LogStore
from flywheel.config import ConfigError, MonitorConfig, load
from flywheel.monitor import drift, episodes, features, live, quality, stats
from flywheel.monitor.drift import check_drift, drift_events, reference_examples
from flywheel.schema import EXAMPLE

AGENT = "sgd_Flights"
VERSION = "v-test"
SGD_LOGS = os.path.join(os.path.dirname(flywheel.__file__), "data", "sgd", "sgd_dev_flywheel_logs.jsonl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VECTORS: dict[str, np.ndarray] = {}


@pytest.fixture(autouse=True)
def memoised_embeddings(monkeypatch):
    """The real model, each distinct text embedded once per test session."""
    from flywheel.embeddings import embed

    def cached(texts, model_path=""):
        missing = sorted({t for t in texts if t not in _VECTORS})
        if missing:
            _VECTORS.update(zip(missing, embed(missing, model_path)))
        return np.stack([_VECTORS[t] for t in texts]) if texts else np.zeros((0, 0))

    monkeypatch.setattr(drift, "embed_texts", cached)


@functools.lru_cache(maxsize=1)
def sgd_records() -> dict[str, list[dict]]:
    """Every shipped SGD line as a LOG_RECORD row, by agent, in file order."""
    by_agent: dict[str, list[dict]] = {}
    with open(SGD_LOGS) as f:
        for lineno, line in enumerate(f, start=1):
            r = parse_record(json.loads(line), f"sgd:{lineno}")
            by_agent.setdefault(r["agent_id"], []).append(r)
    return by_agent


def flights_split() -> tuple[list[dict], list[dict]]:
    """(reference, held-out) Flights records, split by conversation: one conversation in three is held out."""
    rows = sgd_records()[AGENT]
    held = [r for r in rows if int(digest(r["session_id"]), 16) % 3 == 0]
    return [r for r in rows if int(digest(r["session_id"]), 16) % 3 != 0], held


def other_domains() -> list[dict]:
    """Hotels and Music turns, interleaved (a deterministic mix of both)."""
    hotels, music = sgd_records()["sgd_Hotels"], sgd_records()["sgd_Music"]
    mixed = [r for pair in zip(hotels, music) for r in pair]
    return mixed + hotels[len(music):]


def write_reference(store, records: list[dict]) -> None:
    """A minimal curated dataset for AGENT: train.parquet (schema.EXAMPLE) and the LATEST pointer."""
    rows = [{"example_id": r["record_id"], "record_id": r["record_id"], "agent_id": AGENT,
             "session_id": r["session_id"], "messages": r["messages"], "tools_json": r["tools_json"],
             "target": r["response"], "label": features.answer_label(r["response"]), "task": "tool_call",
             "split": "train"} for r in records]
    with store.open(f"datasets/{AGENT}/{VERSION}/train.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=EXAMPLE), f)
    store.write_json(f"datasets/{AGENT}/LATEST", {"version": VERSION})


class Traffic:
    """Appends records as Serve captures them: agent sgd_Flights, source "serve", increasing timestamps, a fresh
    record id per request (the same request may be sent again)."""

    def __init__(self, store):
        self.store, self.sent = store, 0

    def send(self, records: list[dict], compact: bool = False, **fields) -> None:
        rows = [{**r, "record_id": f"{r['record_id']}-{self.sent + i}", "agent_id": AGENT, "source": "serve",
                 "timestamp": 1_800_000_000.0 + self.sent + i, **fields} for i, r in enumerate(records)]
        self.sent += len(rows)
        with LogStore(self.store) as logs:
            logs.append(rows)
        if compact:
            LogStore(self.store).compact()


@pytest.fixture
def reference(store) -> list[dict]:
    ref, _ = flights_split()
    write_reference(store, ref)
    return ref


@pytest.fixture
def traffic(store) -> Traffic:
    return Traffic(store)


def cfg(home: str, **kw) -> MonitorConfig:
    return MonitorConfig(**{"agent": AGENT, "home": home, "window": 96, "min_window": 20, "report": "never", **kw})


# -- pure parts ------------------------------------------------------------------------------------------------------
def test_features_are_pure_and_shared():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Fly me to Paris"},
            {"role": "assistant", "content": "When?"}, {"role": "user", "content": "Tomorrow, 2 seats!"}]
    tools = json.dumps([{"type": "function", "function": {"name": "SearchOnewayFlight", "parameters": {
        "type": "object", "properties": {"seats": {"type": "integer"}}, "required": ["seats"]}}},
                        {"type": "function", "function": {"name": "ReserveOnewayFlight"}}])
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "1", "name": "SearchOnewayFlight", "arguments": '{"seats": 2}'}]}
    f = features.input_features(msgs, tools, AGENT)
    assert {k: v for k, v in f.items() if k != "key"} == {"text": "Tomorrow, 2 seats!", "chars": 18, "words": 3,
                                                           "n_messages": 4, "n_tools": 2}
    assert f["key"] == features.input_features(msgs, tools, AGENT)["key"] != features.input_features(msgs[:2], tools,
                                                                                                      AGENT)["key"]
    # the same input features for a training example and a live record of the same request, whoever answered
    example = {"messages": msgs, "tools_json": tools, "target": call, "agent_id": AGENT}
    record = {"messages": msgs, "tools_json": tools, "response": {"role": "assistant", "content": "zzz"},
              "agent_id": AGENT, "record_id": "r1", "timestamp": 5.0, "model": "student:sgd_Flights@v1"}
    row = features.live_features(record)
    assert features.example_features(example) == {k: row[k] for k in features.example_features(example)}
    assert row["backend"] == "student" and row["invalid"] is None and row["shadow"] is None
    # answers: unusable ones get curation's reason codes
    problem = features.invalid_reason
    assert problem(tools, call) is None
    assert problem(tools, {"tool_calls": [{"name": "Nope", "arguments": "{}"}]}) == "unknown_tool"
    assert problem(tools, {"tool_calls": [{"name": "SearchOnewayFlight", "arguments": "[1]"}]}) == "bad_tool_arguments"
    assert problem(tools, {"tool_calls": [{"name": "SearchOnewayFlight", "arguments": "{}"}]}) == \
        "tool_schema_violation"
    assert problem(tools, {"content": "  "}) == "empty_answer" and problem(tools, None) == "empty_answer"
    assert problem(tools, {"content": "I'm sorry, I can't help"}) == "refusal"
    other = {"tool_calls": [{"name": "SearchOnewayFlight", "arguments": '{"seats": 3}'}]}
    assert features.agreement(call, other) == {"function": True, "exact": False}
    assert features.agreement(call, call) == {"function": True, "exact": True}
    assert features.agreement({"content": "Hi  there"}, {"content": "hi there"}) == {"function": True, "exact": True}
    shadowed = {**record, "response": call, "feedback": -1.0,
                "extra_json": json.dumps({"shadow": {"model": "teacher:x", "response": other}, "fallback": True})}
    assert {k: features.live_features(shadowed)[k] for k in ("shadow", "fallback", "feedback")} == {
        "shadow": {"function": True, "exact": False}, "fallback": True, "feedback": -1.0}


def test_stats_are_calibrated_corrected_and_deduplicated():
    rng = np.random.default_rng(0)
    same = [stats.embedding_tests(rng.normal(size=(60, 8)), rng.normal(size=(60, 8)), 199, seed=s) for s in range(20)]
    assert min(p for t in same for _, p in t.values()) > 0.01  # 40 null tests at p <= 0.01 would be a surprise
    shifted = stats.embedding_tests(rng.normal(size=(60, 8)), rng.normal(0.6, 1, size=(60, 8)), 199)
    assert shifted["text"][1] == 1 / 200  # the permutation floor
    # a new, tight cluster in a fifth of the live sample: the neighbour test sees it
    live = np.vstack([rng.normal(size=(48, 8)), rng.normal(0, 0.05, size=(12, 8)) + 1.5])
    assert stats.embedding_tests(rng.normal(size=(120, 8)), live, 199)["text_neighbours"][1] == 1 / 200
    assert stats.mmd_test(np.ones((5, 3)), np.ones((5, 3))) == (0.0, 1.0)
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert stats.ks_test(np.ones(10), np.ones(10)) == (0.0, 1.0)
    rows = [{"key": "a", "chars": 1, "n_messages": 1, "n_tools": 1}, {"key": "a", "chars": 1, "n_messages": 1,
                                                                       "n_tools": 1}, {"key": "b", "chars": 2,
                                                                                       "n_messages": 3, "n_tools": 1}]
    s = stats.sample(rows, np.eye(3))
    assert len(s) == 2 and s.chars.tolist() == [1.0, 2.0]  # a repeated request counts once


def test_episodes_need_persistence_and_end_with_hysteresis():
    state, changes = None, []
    for drifted in [1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0]:
        state, change = episodes.advance(state, bool(drifted), persistence=2, clear_windows=3)
        changes.append(change)
    assert changes == [None, None, None, "start", None, None, None, None, None, "end", None]
    a = episodes.episode_id(AGENT, 1_800_000_000.0, 3, "r1")
    assert a == episodes.episode_id(AGENT, 1_800_000_000.0, 3, "r1") != episodes.episode_id(AGENT, 1.8e9, 4, "r1")
    assert a.startswith("20270115T080000Z-")


def test_config_is_checked_and_the_job_file_loads():
    job = load(MonitorConfig, os.path.join(REPO, "jobs", "monitor.yaml"))
    assert job.agent == AGENT and job.persistence >= 2
    with pytest.raises(ConfigError, match="permutations"):
        MonitorConfig(agent=AGENT, permutations=99)
    with pytest.raises(ConfigError, match="min_window"):
        MonitorConfig(agent=AGENT, window=10, min_window=20)
    with pytest.raises(ConfigError, match="unknown key.*drift_share"):
        load(MonitorConfig, None, agent=AGENT, drift_share=0.3)


# -- one check ------------------------------------------------------------------------------------------------------
def test_no_dataset_is_a_clear_error(store, home):
    with pytest.raises(FileNotFoundError, match=r"sgd_Flights.*flywheel curate"):
        check_drift(cfg(home), store)


def test_held_out_traffic_does_not_drift(store, home, reference, traffic):
    _, held = flights_split()
    traffic.send(held)
    result = check_drift(cfg(home, report="always"), store)
    print(f"held out: p={result['pvalue']} tests={result['tests']}")
    assert result["verdict"] == "no_drift" and result["drifted"] is False and result["window_drifted"] is False
    assert result["pvalue"] > 0.01 and result["event"] is None and result["retrain"] is None
    assert result["n_reference"] == len(reference) and result["n_live"] == result["n_distinct"] == len(held)
    assert os.path.getsize(store.path(result["report"])) > 10_000  # the Evidently report is still written
    assert routing.get_route(store, AGENT)["reason"] == "default"
    assert routing.retrain_queue(store) == [] and drift_events(store, AGENT) == []


def test_a_shifted_window_is_detected_and_acted_on(store, home, reference, traffic):
    traffic.send(other_domains()[:96])
    first = check_drift(cfg(home, persistence=1, report="drift"), store)
    print(f"shifted: p={first['pvalue']} drifted={first['drifted_features']}")
    assert first["verdict"] == "drift" and first["drifted"] and first["window_drifted"]
    assert "text" in first["drifted_features"] and first["tests"]["text"]["p"] == 1 / 1000  # the floor
    assert first["pvalue"] == first["tests"]["text"]["p_adj"] <= 0.01  # Holm: 4 x 0.001
    route = routing.get_route(store, AGENT)
    assert route["mode"] == "teacher" and first["episode"] in route["reason"]
    assert [(q["agent"], q["event"]) for q in routing.retrain_queue(store)] == [(AGENT, first["episode"])]
    [event] = drift_events(store, AGENT)
    assert event["id"] == event["episode"] == first["event"] == first["episode"]
    assert event["retrain"] == first["retrain"] and event["dataset_version"] == VERSION
    assert event["kind"] == "drift_episode" and event["ended"] is None and event["windows"][-1]["drifted"]
    assert first["report"].startswith(f"monitor/{AGENT}/drift-") and os.path.getsize(store.path(first["report"])) > 0
    # nothing new: the same window is not tested again (no second "drifted window" from the same requests)
    again = check_drift(cfg(home, persistence=1), store)
    assert again["verdict"] == "no_new_data" and again["drifted"] and again["n_new"] == 0
    assert len(routing.retrain_queue(store)) == 1


def test_too_few_live_requests_give_no_verdict(store, home, reference, traffic):
    _, held = flights_split()
    traffic.send(held[:10])
    result = check_drift(cfg(home), store)
    assert result["verdict"] == "insufficient_data" and result["drifted"] is False
    assert result["n_live"] == 10 and result["event"] is None and result["report"] is None
    assert not store.exists(f"monitor/{AGENT}") and routing.retrain_queue(store) == []
    traffic.send(held[10:30])  # the cursor kept the first ten: the window now holds all thirty
    assert check_drift(cfg(home), store)["n_live"] == 30


def test_reference_examples_reads_the_latest_train_split(store, reference):
    table = reference_examples(store, AGENT)
    assert table.schema == EXAMPLE and table.num_rows == len(reference)
    store.write_json(f"datasets/{AGENT}/LATEST", {"version": "gone"})
    with pytest.raises(FileNotFoundError, match="gone.*flywheel curate"):
        reference_examples(store, AGENT)


# -- incremental reading --------------------------------------------------------------------------------------------
def test_a_check_reads_only_new_parts_and_wal_records(store, home, reference, traffic, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("the monitor must not read the whole log store")

    monkeypatch.setattr(LogStore, "read", never)
    footers: list[str] = []
    part_agents = LogStore.part_agents

    def spy(self, names):
        footers.extend(names)
        return part_agents(self, names)

    monkeypatch.setattr(LogStore, "part_agents", spy)
    _, held = flights_split()
    hotels = sgd_records()["sgd_Hotels"]
    with LogStore(store) as logs:  # another agent's traffic: its part's footer is read, the part is not opened
        logs.append([{**r, "source": "serve"} for r in hotels[:30]])
    traffic.send(held[:25], compact=True)
    parts_1 = LogStore(store).part_names()
    first = check_drift(cfg(home), store)
    assert sorted(footers) == parts_1 and first["read"]["footers"] == 2 and len(first["read"]["parts"]) == 1
    assert first["n_new"] == first["n_live"] == 25 and first["verdict"] == "no_drift"

    traffic.send(held[25:40], compact=True)
    footers.clear()
    second = check_drift(cfg(home, stride=10), store)
    new_parts = sorted(set(LogStore(store).part_names()) - set(parts_1))
    assert footers == second["read"]["parts"] == new_parts and len(new_parts) == 1
    assert second["read"]["wal"] == [] and second["n_new"] == 15 and second["n_live"] == 40

    traffic.send(held[40:])  # not compacted yet: read from the WAL segment
    third = check_drift(cfg(home, stride=5), store)
    assert third["read"]["parts"] == [] and len(third["read"]["wal"]) == 1
    assert third["n_new"] == len(held) - 40 and third["n_live"] == len(held)
    LogStore(store).compact()  # the segment becomes a part: its records are not taken twice
    fourth = check_drift(cfg(home, stride=5), store)
    assert fourth["read"]["parts"] == [f"part-wal-{third['read']['wal'][0][:-len('.jsonl')]}.parquet"]
    assert fourth["n_new"] == 0 and fourth["n_live"] == len(held) and fourth["verdict"] == "no_new_data"
    state = live.load_state(store, AGENT)
    assert len(state["window"]) == len(held) and [e["compacted"] for e in state["wal"].values()] == [True]
    check_drift(cfg(home, stride=5), store)  # the compacted segment is gone from the WAL: its entry goes too
    assert live.load_state(store, AGENT)["wal"] == {}


# -- episodes end to end -----------------------------------------------------------------------------------------
def test_one_episode_one_retrain_with_persistence_and_hysteresis(store, home, reference, traffic):
    _, held = flights_split()
    shifted = other_domains() + sgd_records()["sgd_Homes"]
    c = cfg(home, window=40, stride=40, min_window=20)  # every batch of 40 requests is one new window
    verdicts, retrains = [], []

    def window(records):
        traffic.send(records)
        result = check_drift(c, store)
        verdicts.append(result["verdict"])
        retrains.append(result["retrain"])
        return result

    window(held[:40])
    first = window(shifted[:40])
    assert first["window_drifted"] and not first["drifted"] and first["retrain"] is None  # one window: suspect
    assert routing.get_route(store, AGENT)["reason"] == "default"
    start = window(shifted[40:80])
    for i in range(2):
        window(shifted[80 + 40 * i:120 + 40 * i])
    for i in range(3):
        window([held[(j + 7 * i) % len(held)] for j in range(40)])
    assert verdicts == ["no_drift", "suspect", "drift", "drift", "drift", "drift", "drift", "no_drift"], verdicts
    assert [r for r in retrains if r] == [start["retrain"]] and len(routing.retrain_queue(store)) == 1
    [event] = drift_events(store, AGENT)
    assert event["id"] == start["event"] and event["ended"] is not None and len(event["end_windows"]) == 3
    assert [w["drifted"] for w in event["windows"]] == [True, True]
    assert routing.get_route(store, AGENT)["mode"] == "teacher"  # leaving the teacher is a promotion's call
    # a second episode within the cool-down: recorded, routed, but its retrain is suppressed by the first
    window(shifted[200:240])
    second = window(shifted[240:280])
    assert second["event"] and second["event"] != start["event"] and second["retrain"] is None
    assert drift_events(store, AGENT)[-1]["suppressed_by"] == start["event"]
    assert len(routing.retrain_queue(store)) == 1


# -- quality is not drift ---------------------------------------------------------------------------------------------
def test_a_weak_student_is_a_quality_finding_not_input_drift(store, home, reference, traffic):
    _, held = flights_split()
    garbage = {"role": "assistant", "content": None, "name": None, "tool_call_id": None,
               "tool_calls": [{"id": "x", "name": "BookSpaceship", "arguments": "not json"}]}
    traffic.send(held, response=garbage, model="student:sgd_Flights@v1", feedback=-1.0)
    result = check_drift(cfg(home), store)
    assert result["verdict"] == "no_drift" and not result["window_drifted"] and result["retrain"] is None
    q = result["quality"]
    assert q["degraded"] and q["invalid_rate"] == q["student_invalid_rate"] == 1.0
    assert q["invalid_reasons"] == {"unknown_tool": len(held)} and q["backends"] == {"student": len(held)}
    assert q["negative_feedback_rate"] == 1.0 and q["teacher_agreement"] == quality.NO_SHADOW
    assert any("invalid answers" in f for f in q["flags"]) and any("negative feedback" in f for f in q["flags"])
    assert routing.get_route(store, AGENT)["reason"] == "default" and routing.retrain_queue(store) == []


def test_teacher_agreement_on_shadow_samples(store, home, reference, traffic):
    _, held = flights_split()
    for r in held[:30]:  # the student's answer is served, the teacher's logged beside it
        wrong = {**r["response"], "tool_calls": [{**tc, "arguments": "{}"} for tc in r["response"]["tool_calls"]]}
        traffic.send([{**r, "response": wrong}], model="student:sgd_Flights@v1",
                     extra_json=json.dumps({"shadow": {"model": "teacher:big", "response": r["response"]}}))
    q = check_drift(cfg(home), store)["quality"]
    assert q["teacher_agreement"] == {"n": 30, "function": 1.0, "exact": 0.0}


def test_requests_without_any_words_still_get_a_report():
    import pandas as pd

    cols = drift.REPORT_TEXT + drift.REPORT_NUMERIC
    frame = pd.DataFrame([{"text": "", "chars": 0, "words": 0, "n_messages": 3, "n_tools": 2}] * 30, columns=cols)
    assert drift.run_report(frame, frame.copy()) is not None


# -- Ray gauges (the one Ray test: run last) ------------------------------------------------------------------------
def test_gauges_are_skipped_without_ray_and_set_inside_ray(monkeypatch, ray_session):
    monkeypatch.setattr(drift, "_GAUGES", {})
    values = {"flywheel_drift_share": 0.25, "flywheel_drift_pvalue": 0.001, "flywheel_drift_episode": 1.0,
              "flywheel_quality_invalid_rate": None}
    with monkeypatch.context() as m:
        m.setattr(ray_session, "is_initialized", lambda: False)
        drift.export_metrics(AGENT, values)  # no Ray to report to: nothing happens, no error
        assert drift._GAUGES == {}
    drift.export_metrics(AGENT, values)
    assert sorted(drift._GAUGES) == ["flywheel_drift_episode", "flywheel_drift_pvalue", "flywheel_drift_share"]
    assert all(g.info["tag_keys"] == ("agent",) for g in drift._GAUGES.values())


def test_deferring_more_than_certified_counts_as_drift():
    from flywheel.monitor.quality import deferral_shift

    def rows(deferred: int, n: int = 40) -> list[dict]:
        return [{"selective": True, "fallback": i < deferred} for i in range(n)] + [{"selective": False}] * 10

    # certified coverage 0.6: 40% of selective requests are expected to go to the teacher
    assert not deferral_shift(rows(16), 0.6, 0.01)["shifted"]
    assert not deferral_shift(rows(22), 0.6, 0.01)["shifted"]  # within chance
    shifted = deferral_shift(rows(30), 0.6, 0.01)
    assert shifted["shifted"] and shifted["n"] == 40 and shifted["deferred"] == 30 and shifted["pvalue"] < 0.01
    assert not deferral_shift(rows(40), None, 0.01)["shifted"]  # no certificate: no expectation
    assert not deferral_shift(rows(9, n=9), 0.9, 0.01)["shifted"]  # too few selective requests to tell
