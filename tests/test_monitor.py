"""Monitor: real Evidently drift reports on the shipped SGD logs, and what drift does to routing and the queue.

    pytest tests/test_monitor.py -q

The reference is a train split written here for sgd_Flights (2/3 of its conversations); "live" traffic is appended
through the log store as Serve would (source "serve"): the held-out Flights conversations (no drift), or Hotels and
Music user turns relabelled as sgd_Flights (drift).
"""

from __future__ import annotations

import functools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flywheel
from flywheel import routing
from flywheel.capture.ingest import digest, parse_record
from flywheel.capture.store import LogStore
from flywheel.config import MonitorConfig
from flywheel.monitor import features
from flywheel.monitor.drift import check_drift, drift_events, reference_examples
from flywheel.schema import EXAMPLE

AGENT = "sgd_Flights"
VERSION = "v-test"
WINDOW = 96  # the held-out Flights traffic (51 requests) fits whole; drift is measured on 96 requests
SGD_LOGS = os.path.join(os.path.dirname(flywheel.__file__), "data", "sgd", "sgd_dev_flywheel_logs.jsonl")


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


def write_reference(store, records: list[dict]) -> None:
    """A minimal curated dataset for AGENT: train.parquet (schema.EXAMPLE) and the LATEST pointer."""
    rows = [{"example_id": r["record_id"], "record_id": r["record_id"], "agent_id": AGENT,
             "session_id": r["session_id"], "messages": r["messages"], "tools_json": r["tools_json"],
             "target": r["response"], "label": features.answer_label(r["response"]), "task": "tool_call",
             "split": "train"} for r in records]
    with store.open(f"datasets/{AGENT}/{VERSION}/train.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=EXAMPLE), f)
    store.write_json(f"datasets/{AGENT}/LATEST", {"version": VERSION})


def serve(store, records: list[dict]) -> None:
    """Append records as Serve captures them: agent sgd_Flights, source "serve", increasing timestamps."""
    rows = [{**r, "agent_id": AGENT, "source": "serve", "timestamp": 1_800_000_000.0 + i}
            for i, r in enumerate(records)]
    logs = LogStore(store)
    logs.append(rows)
    logs.close()


def other_domains() -> list[dict]:
    """Hotels and Music turns, interleaved (a deterministic mix of both)."""
    hotels, music = sgd_records()["sgd_Hotels"], sgd_records()["sgd_Music"]
    mixed = [r for pair in zip(hotels, music) for r in pair]
    return mixed + hotels[len(music):]


@pytest.fixture
def reference(store) -> list[dict]:
    ref, _ = flights_split()
    write_reference(store, ref)
    return ref


def cfg(home: str, **kw) -> MonitorConfig:
    return MonitorConfig(**{"agent": AGENT, "home": home, "window": WINDOW, "min_window": 20, **kw})


def test_features_are_pure_and_shared():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Fly me to Paris"},
            {"role": "assistant", "content": "When?"}, {"role": "user", "content": "Tomorrow, 2 seats!"}]
    tools = json.dumps([{"type": "function", "function": {"name": "SearchOnewayFlight"}},
                        {"type": "function", "function": {"name": "ReserveOnewayFlight"}}])
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "1", "name": "SearchOnewayFlight", "arguments": "{}"}]}
    f = features.request_features(msgs, tools, call)
    assert f == {"text": "Tomorrow, 2 seats!", "chars": 18, "words": 3, "n_messages": 4, "n_tools": 2,
                 "answer": "SearchOnewayFlight"}
    assert features.request_features([], None, None) == {"text": "", "chars": 0, "words": 0, "n_messages": 0,
                                                         "n_tools": 0, "answer": "none"}
    assert features.answer_label({"role": "assistant", "content": "ok", "tool_calls": None}) == "text"
    assert features.n_tools("not json") == 0
    assert features.oov_share("fly to Paris now", {"fly", "to"}) == 0.5
    assert features.oov_share("", set()) == 0.0
    # cross-fitted: reference row i is scored against the other fold's vocabulary, never its own
    ref, live = features.oov_shares(["a b", "c d", "a c"], ["a b", "z"])
    assert ref == [1.0, 0.5, 0.5] and live == [1.0, 1.0]
    # one function serves EXAMPLE rows (target) and LOG_RECORD rows (response)
    example = {"messages": msgs, "tools_json": tools, "target": call}
    record = {"messages": msgs, "tools_json": tools, "response": call}
    r, l = features.feature_frames([example, example], [record])
    assert list(r.columns) == features.COLUMNS == list(l.columns)
    assert r.drop(columns="oov_share").iloc[0].to_dict() == l.drop(columns="oov_share").iloc[0].to_dict()


def test_no_dataset_is_a_clear_error(store, home):
    with pytest.raises(FileNotFoundError, match=r"sgd_Flights.*flywheel curate"):
        check_drift(cfg(home), store)


def test_held_out_traffic_does_not_drift(store, home, reference):
    _, held = flights_split()
    assert 20 <= len(held) <= WINDOW
    serve(store, held)
    result = check_drift(cfg(home), store)
    print(f"no-drift share: {result['drift_share']} drifted: {result['drifted_features']}")
    assert result["verdict"] == "no_drift" and result["drifted"] is False
    assert result["drift_share"] < 0.5 and result["event"] is None
    assert result["n_reference"] == len(reference) and result["n_live"] == len(held)
    assert os.path.getsize(store.path(result["report"])) > 0
    assert routing.get_route(store, AGENT)["reason"] == "default"
    assert routing.retrain_queue(store) == [] and drift_events(store, AGENT) == []


def test_other_domains_drift_route_to_teacher_and_queue_a_retrain(store, home, reference):
    serve(store, other_domains()[:WINDOW])
    result = check_drift(cfg(home), store)
    print(f"drift share: {result['drift_share']} drifted: {result['drifted_features']}")
    assert result["verdict"] == "drift" and result["drifted"] is True and result["drift_share"] >= 0.5
    assert "text" in result["drifted_features"] and "oov_share" in result["drifted_features"]
    html = store.path(result["report"])
    assert result["report"].startswith(f"monitor/{AGENT}/drift-") and os.path.getsize(html) > 10_000
    route = routing.get_route(store, AGENT)
    assert route["mode"] == "teacher" and result["event"] in route["reason"]
    queue = routing.retrain_queue(store)
    assert [(q["agent"], q["event"]) for q in queue] == [(AGENT, result["event"])]
    [event] = drift_events(store, AGENT)
    assert event["id"] == result["event"] and event["retrain"] == result["retrain"]
    assert event["dataset_version"] == VERSION and event["report"] == result["report"]


def test_second_drift_within_cooldown_queues_no_second_retrain(store, home, reference):
    serve(store, other_domains()[:WINDOW])
    first = check_drift(cfg(home, cooldown_s=3600.0), store)
    second = check_drift(cfg(home, cooldown_s=3600.0), store)
    assert first["verdict"] == second["verdict"] == "drift"
    assert first["retrain"] and second["retrain"] is None
    assert len(routing.retrain_queue(store)) == 1
    events = drift_events(store, AGENT)
    assert [e["id"] for e in events] == [first["event"], second["event"]]
    assert events[1]["suppressed_by"] == first["event"]
    assert routing.get_route(store, AGENT)["mode"] == "teacher"


def test_too_few_live_requests_give_no_verdict(store, home, reference):
    _, held = flights_split()
    serve(store, held[:10])
    result = check_drift(cfg(home), store)
    assert result["verdict"] == "insufficient_data" and result["drifted"] is False
    assert result["n_live"] == 10 and result["event"] is None and result["report"] is None
    assert not store.exists(f"monitor/{AGENT}") and routing.retrain_queue(store) == []


def test_reference_examples_reads_the_latest_train_split(store, reference):
    table = reference_examples(store, AGENT)
    assert table.schema == EXAMPLE and table.num_rows == len(reference)
    store.write_json(f"datasets/{AGENT}/LATEST", {"version": "gone"})
    with pytest.raises(FileNotFoundError, match="gone.*flywheel curate"):
        reference_examples(store, AGENT)



def test_drift_share_gauge_is_skipped_without_ray_and_set_inside_ray(monkeypatch, ray_session):
    from flywheel.monitor import drift

    monkeypatch.setattr(drift, "_GAUGE", None)
    with monkeypatch.context() as m:
        m.setattr(ray_session, "is_initialized", lambda: False)
        drift.export_metric(AGENT, 0.25)  # no Ray to report to: nothing happens, no error
        assert drift._GAUGE is None
    drift.export_metric(AGENT, 0.25)
    assert drift._GAUGE.info["name"] == "flywheel_drift_share"
    assert drift._GAUGE.info["tag_keys"] == ("agent",)


def test_requests_without_any_words_still_get_a_verdict():
    from flywheel.monitor.drift import run_report

    ref, held = flights_split()
    r, l = features.feature_frames([{**x, "target": x["response"]} for x in ref[:30]], held[:30])
    r["text"], l["text"] = "", ""  # e.g. an agent whose requests carry no user turn: no text to classify
    _, share, drifted = run_report(r, l, 0.5)
    assert 0.0 <= share < 0.5 and "text" not in drifted
