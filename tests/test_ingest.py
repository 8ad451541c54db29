"""Ingest: every line is accepted or quarantined with a stable reason; formats normalise to one schema."""

import json

import pyarrow.parquet as pq

from flywheel.capture import ingest as I
from flywheel.capture.store import LogStore, ingest_file
from flywheel.schema import LOG_RECORD

from conftest import DATA, SGD_LOGS

GOOD_OPENAI = {"agent_id": "support", "messages": [
    {"role": "user", "content": "Where is order 42?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "order_status", "arguments": {"id": 42}}}]}],
    "tools": [{"type": "function", "function": {"name": "order_status", "parameters": {"type": "object"}}}]}


def lines(*objs) -> list[bytes]:
    return [o if isinstance(o, bytes) else json.dumps(o).encode() for o in objs]


def test_blueprint_record_with_object_arguments_and_no_call_id():
    rec = json.load(open(f"{DATA}/aiva-example-record.json"))
    row = I.parse_record(rec, "aiva:1")
    assert row["agent_id"] == "primary_assistant"
    call = row["response"]["tool_calls"][0]
    assert call["name"] == "ToReturnProcessing"
    assert json.loads(call["arguments"]) == {"query": "Why the hold up with my return of ankle socks?", "user_id": "4165"}
    assert row["messages"][0]["role"] == "system"


def test_string_and_object_arguments_normalise_to_the_same_text():
    a = I.normalise_arguments({"b": 1, "a": "x"}, "w")
    b = I.normalise_arguments('{"a": "x", "b": 1}', "w")
    assert a == b == '{"a":"x","b":1}'


def test_openai_jsonl_last_assistant_message_is_the_answer():
    row = I.parse_record(GOOD_OPENAI, "f:1")
    assert row["agent_id"] == "support" and len(row["messages"]) == 1
    assert row["response"]["tool_calls"][0]["arguments"] == '{"id":42}'


def test_streamed_response_is_reassembled():
    chunks = [{"choices": [{"delta": {"role": "assistant", "tool_calls": [
        {"index": 0, "id": "c", "function": {"name": "get_", "arguments": '{"ci'}}]}}]},
              {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": 'ty": "Oslo"}'}}]}}]}]
    rec = {"request": {"messages": [{"role": "user", "content": "weather in Oslo?"}]}, "response": chunks,
           "workload_id": "w", "timestamp": 1}
    row = I.parse_record(rec, "s:1")
    assert row["response"]["tool_calls"][0]["name"] == "get_weather"
    assert json.loads(row["response"]["tool_calls"][0]["arguments"]) == {"city": "Oslo"}


def test_every_bad_line_is_quarantined_with_its_reason():
    good = json.loads(open(SGD_LOGS).readline())
    no_agent = {k: v for k, v in good.items() if k != "workload_id"}
    bad_args = json.loads(json.dumps(good))
    bad_args["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = "{not json"
    empty = json.loads(json.dumps(good))
    empty["response"]["choices"][0]["message"] = {"role": "assistant", "content": "  "}
    bad_role = json.loads(json.dumps(good))
    bad_role["request"]["messages"][0]["role"] = "robot"
    raw = lines(good, b'{"request": {"messages": [', b"\xff\xfe not utf8", [1, 2], {"hello": 1},
                no_agent, bad_args, empty, bad_role, b"", {"request": good["request"]}, b"x" * 30000)
    records, quarantined = I.parse_lines(raw, "mixed.jsonl", max_bytes=20000)
    reasons = sorted(q["reason"] for q in quarantined)
    assert len(records) == 1
    assert reasons == sorted([I.R_INVALID_JSON, I.R_INVALID_UTF8, I.R_NOT_OBJECT, I.R_UNKNOWN_FORMAT, I.R_NO_AGENT,
                              I.R_BAD_TOOL_ARGUMENTS, I.R_BAD_RESPONSE, I.R_BAD_MESSAGES, I.R_MISSING_FIELD,
                              I.R_OVERSIZED])
    assert all(q["source"].startswith("mixed.jsonl:") for q in quarantined)
    # 12 lines, one blank: every non-blank line is accounted for exactly once
    assert len(records) + len(quarantined) == 11


def test_ingest_file_is_retry_safe_and_counts_add_up(store, tmp_path):
    path = tmp_path / "logs.jsonl"
    good = open(SGD_LOGS).readlines()[:20]
    path.write_text("".join(good) + "garbage\n" + '{"messages": []}\n')
    first = ingest_file(store, str(path))
    again = ingest_file(store, str(path))
    assert first == again
    assert (first["accepted"], first["quarantined"]) == (20, 2)
    table = LogStore(store).read()
    assert table.num_rows == 20 and table.schema == LOG_RECORD
    q = [f for f in store.list("quarantine/ingest")]
    assert len(q) == 1
    with store.open(f"quarantine/ingest/{q[0]}") as f:
        assert sorted(pq.read_table(f).column("reason").to_pylist()) == [I.R_BAD_MESSAGES, I.R_INVALID_JSON]


def test_wal_append_is_durable_and_compaction_dedupes(store):
    rec = I.parse_record(json.loads(open(SGD_LOGS).readline()), "x:1")
    logs = LogStore(store)
    logs.append([rec])
    logs.append([rec])  # a replay after a client retry
    assert len(LogStore(store).read_wal()) == 2
    logs.close()
    assert LogStore(store).compact() == 2
    assert LogStore(store).read().num_rows == 1
    assert store.list("logs/wal") == []
