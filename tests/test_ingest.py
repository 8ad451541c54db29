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


# -- gzip and s3:// inputs, and inputs that cannot be read to their end ----------------------------------------
import gzip  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

from flywheel.capture.reader import InputError  # noqa: E402
from flywheel.storage import Store  # noqa: E402

SGD_LINES = open(SGD_LOGS, "rb").read().splitlines(keepends=True)[:300]


def rows(store, drop=("source",)) -> list[dict]:
    table = LogStore(store).read().sort_by("record_id")
    return table.drop_columns(list(drop)).to_pylist()


def ids(store) -> list[str]:
    return sorted(LogStore(store).read().column("record_id").to_pylist())


def plain_ids(tmp_path, lines: list[bytes]) -> list[str]:
    """The record ids of `lines` ingested from a plain JSONL file into a home of their own."""
    path = tmp_path / "reference.jsonl"
    path.write_bytes(b"".join(lines))
    other = Store(str(tmp_path / "reference-home"))
    ingest_file(other, str(path))
    return ids(other)


def test_gzip_ingest_equals_plain_ingest_record_for_record(tmp_path):
    plain = tmp_path / "logs.jsonl"
    plain.write_bytes(b"".join(SGD_LINES))
    packed = tmp_path / "logs.bin"  # no .gz in the name: gzip is told by its magic bytes
    packed.write_bytes(gzip.compress(b"".join(SGD_LINES[:120])) + gzip.compress(b"".join(SGD_LINES[120:])))
    a, b = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    ra, rb = ingest_file(a, str(plain), chunk_lines=64), ingest_file(b, str(packed), chunk_lines=64)
    assert ra["accepted"] == rb["accepted"] == 300 and ra["reasons"] == rb["reasons"] == {}
    assert ra["agents"] == rb["agents"]
    assert rows(a) == rows(b) and len(rows(a)) == 300
    src = sorted(LogStore(b).read().column("source").to_pylist(), key=lambda s: int(s.rsplit(":", 1)[1]))
    assert src[0] == "logs.bin:1" and src[-1] == "logs.bin:300"


def test_truncated_gzip_keeps_the_records_before_the_cut_and_says_where(tmp_path, store):
    gz = gzip.compress(b"".join(SGD_LINES))
    cut = gz[:len(gz) * 6 // 10]
    whole = zlib.decompressobj(31).decompress(cut).count(b"\n")  # complete lines before the cut
    assert 0 < whole < 300
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    with pytest.raises(InputError) as e:
        ingest_file(store, str(path))
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and f"at line {whole + 1} " in msg
    assert f"the {whole} lines before it were ingested ({whole} accepted, 0 quarantined)" in msg
    assert e.value.result["accepted"] == whole
    assert ids(store) == plain_ids(tmp_path, SGD_LINES[:whole])  # the partial last chunk was written too


def test_corrupt_gzip_member_stops_with_the_lines_before_it(tmp_path, store):
    gz = bytearray(gzip.compress(b"".join(SGD_LINES)))
    gz[len(gz) // 2] ^= 0xFF
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(gz))
    with pytest.raises(InputError, match=r"corrupt\.jsonl\.gz: the gzip stream is corrupt .* at line \d+"):
        ingest_file(store, str(path))
    got = ids(store)
    assert 0 < len(got) < 300 and got == plain_ids(tmp_path, SGD_LINES[:len(got)])


def test_gzip_of_random_binary_is_quarantined_line_by_line(tmp_path, store):
    blob = random.Random(7).randbytes(300_000)
    path = tmp_path / "noise.jsonl.gz"
    path.write_bytes(gzip.compress(blob))
    result = ingest_file(store, str(path))
    expected = sum(1 for line in blob.split(b"\n") if line.strip())
    assert result["accepted"] == 0 and result["quarantined"] == expected > 500
    assert set(result["reasons"]) <= {I.R_INVALID_UTF8, I.R_INVALID_JSON} and result["reasons"][I.R_INVALID_UTF8]
    with store.open(f"quarantine/ingest/{store.list('quarantine/ingest')[0]}") as f:
        got = {int(r["source"].rsplit(":", 1)[1]): r["raw"] for r in pq.read_table(f).to_pylist()}
    want = {n: line.decode("utf-8", "replace") for n, line in enumerate(blob.split(b"\n"), 1) if line.strip()}
    assert got == want  # each quarantined row holds its decompressed line, at its line number


def test_oversized_line_in_a_gzip_is_quarantined_without_holding_it(tmp_path, store):
    import tracemalloc

    path = tmp_path / "huge.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(SGD_LINES[0])
        for _ in range(64):  # one 64 MiB line, written (and read) in pieces
            f.write(b"x" * (1 << 20))
        f.write(b"\n" + SGD_LINES[1])
    tracemalloc.start()
    try:
        result = ingest_file(store, str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (result["accepted"], result["reasons"]) == (2, {I.R_OVERSIZED: 1})
    assert peak < 24 << 20, f"peak {peak >> 20} MiB while reading a 64 MiB line"
    q = store.list("quarantine/ingest")
    with store.open(f"quarantine/ingest/{q[0]}") as f:
        row = pq.read_table(f).to_pylist()[0]
    assert row["source"] == "huge.jsonl.gz:2" and "max_line_bytes=1000000" in row["detail"]


def test_cli_reports_an_unreadable_gzip_in_one_line_with_the_counts(tmp_path, capsys):
    from flywheel.cli import main

    good = tmp_path / "good.jsonl"
    good.write_bytes(b"".join(SGD_LINES[:10]))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b"".join(SGD_LINES))[:20_000])
    assert main(["ingest", str(good), str(cut), "--home", str(tmp_path / "h"), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["type"] == "InputError" and "cut.jsonl.gz: the gzip stream is truncated" in out["error"]
    done = out["ingested"]
    assert [f["file"] for f in done["files"]] == [str(good), str(cut)] and done["files"][0]["accepted"] == 10
    assert done["accepted"] == 10 + done["files"][1]["accepted"] and done["files"][1]["accepted"] > 0
    assert main(["ingest", str(cut), "--home", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flywheel ingest: ") and "Traceback" not in err and len(err.splitlines()) == 1


def test_ingest_streams_a_gzip_from_s3(tmp_path, store, monkeypatch):
    import boto3

    from conftest import fake_aws_credentials, moto_s3

    fake_aws_credentials(monkeypatch)
    plain = tmp_path / "logs.jsonl"
    plain.write_bytes(b"".join(SGD_LINES))
    ingest_file(Store(str(tmp_path / "local")), str(plain))
    with moto_s3("flywheel-ingest") as endpoint:
        monkeypatch.setenv("FLYWHEEL_S3_ENDPOINT", endpoint)
        boto3.client("s3", endpoint_url=endpoint).put_object(
            Bucket="flywheel-ingest", Key="in/logs.jsonl.gz", Body=gzip.compress(b"".join(SGD_LINES)))
        result = ingest_file(store, "s3://flywheel-ingest/in/logs.jsonl.gz")
        assert ingest_file(store, "s3://flywheel-ingest/in/logs.jsonl.gz") == result  # retry-safe
        with pytest.raises(FileNotFoundError):
            ingest_file(store, "s3://flywheel-ingest/in/missing.jsonl.gz")
    assert result["accepted"] == 300 and result["file"] == "s3://flywheel-ingest/in/logs.jsonl.gz"
    assert rows(store) == rows(Store(str(tmp_path / "local")))
    assert os.path.basename(LogStore(store).read().column("source")[0].as_py()).startswith("logs.jsonl.gz:")
