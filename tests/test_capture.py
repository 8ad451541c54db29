"""Capture never loses an acknowledged record (flywheel.capture.store.LogStore); no Ray.

A real writer process appends and prints each record id after `append()` returns (the acknowledgement), while this
process compacts the same home; the writer is then stopped gracefully or SIGKILLed. Every acknowledged id must be
in the Parquet parts exactly once, read with pyarrow directly (not through `read()`, which deduplicates).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from flywheel.capture.store import OPEN, PARQUET, SEALED, WAL, LogStore
from flywheel.storage import Store

from conftest import REPO, fake_aws_credentials, moto_s3

WRITER = r"""
import os, sys, time
from flywheel.capture.store import LogStore
from flywheel.storage import Store

home, stop, pause, seal_age_s, max_records = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
logs = LogStore(Store(home), writer_id="serve-test", seal_age_s=seal_age_s, max_segment_records=max_records)
i = 0
while not os.path.exists(stop):
    if os.path.exists(pause) and logs.open_segment:  # hold an open segment with acknowledged records in it
        print("paused", flush=True)
        time.sleep(3600)
    batch = [{"record_id": f"r{i + k}", "agent_id": "sgd_Flights", "source": "serve", "timestamp": float(i + k),
              "messages": [{"role": "user", "content": f"request {i + k}"}],
              "response": {"role": "assistant", "content": "ok"}} for k in range(1 + i % 3)]
    logs.append(batch)
    print("\n".join(r["record_id"] for r in batch), flush=True)  # acknowledged
    i += len(batch)
logs.close()
print("closed", flush=True)
"""

DEADLINE_S = 120  # a guard against a hung writer, never a measurement


class Writer:
    """The writer process and the ids it acknowledged (read from its stdout by a thread)."""

    def __init__(self, home: str, tmp_path, seal_age_s: float = 3600.0, max_records: int = 7):
        self.stop, self.pause = str(tmp_path / "stop"), str(tmp_path / "pause")
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, home, self.stop, self.pause, str(seal_age_s),
                                      str(max_records)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.acked: list[str] = []
        self.events: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            (self.acked if line.startswith("r") else self.events).append(line)

    def wait_for(self, condition, what: str, step=lambda: None) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            if self.proc.poll() is not None and not condition():
                pytest.fail(f"the writer exited ({self.proc.returncode}) before {what}: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the writer never got to {what}")
            step()
            time.sleep(0.01)

    def finish(self) -> None:
        self.proc.wait(timeout=DEADLINE_S)
        self.reader.join(timeout=DEADLINE_S)


def part_ids(store: Store) -> collections.Counter:
    """record_id -> how many times it is in the Parquet parts (no deduplication)."""
    ids = collections.Counter()
    for name in LogStore(store).part_names():
        with store.fs.open(store.path(PARQUET, name), "rb") as f:
            ids.update(pq.read_table(f, columns=["record_id"]).column(0).to_pylist())
    return ids


def record(rid: str) -> dict:
    return {"record_id": rid, "agent_id": "sgd_Flights", "source": "serve", "messages": [{"role": "user",
            "content": rid}], "response": {"role": "assistant", "content": "ok"}}


def age(path: str, seconds: float) -> None:
    """Make a file look `seconds` old (what a dead writer's lease looks like, without waiting)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_compaction_from_another_process_loses_no_acknowledged_record(home, store, tmp_path):
    writer = Writer(home, tmp_path, seal_age_s=0.05, max_records=7)  # seals on size and on age while we compact
    moved, errors = [], []

    def compactor():
        try:
            while writer.proc.poll() is None:
                moved.append(LogStore(Store(home)).compact())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    # two compactors at once (this process's threads), racing each other and the writer
    threads = [threading.Thread(target=compactor, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    writer.wait_for(lambda: len(writer.acked) >= 300 and sum(moved) > 0, "300 acknowledged, some compacted")
    open(writer.stop, "w").close()  # graceful: close() seals the open segment
    writer.finish()
    for t in threads:
        t.join(timeout=DEADLINE_S)
    assert not errors, errors
    assert writer.proc.returncode == 0 and writer.events == ["closed"], writer.proc.stderr.read()
    LogStore(store).compact()

    ids = part_ids(store)
    assert not [i for i in writer.acked if ids[i] != 1]  # every acknowledged record, exactly once
    assert len(writer.acked) == len(set(writer.acked))
    assert store.list(WAL) == []


def test_sigkilled_writer_is_recovered_after_its_lease_and_never_before(home, store, tmp_path):
    writer = Writer(home, tmp_path, seal_age_s=3600, max_records=7)  # seals on size only
    writer.wait_for(lambda: len(writer.acked) >= 100, "100 acknowledged")
    open(writer.pause, "w").close()
    writer.wait_for(lambda: writer.events == ["paused"], "a pause with an open segment")
    [open_name] = [n for n in store.list(WAL) if n.endswith(OPEN)]

    # the writer is alive: its open segment is not taken, only the sealed ones are compacted
    LogStore(store, lease_s=3600).compact()
    assert store.list(WAL) == [open_name]
    in_open = LogStore(store).read_wal()
    assert in_open and not set(r["record_id"] for r in in_open) & set(part_ids(store))

    os.kill(writer.proc.pid, signal.SIGKILL)
    writer.finish()
    assert LogStore(store, lease_s=3600).compact() == 0  # just died: its lease has not run out yet
    assert store.list(WAL) == [open_name]
    age(store.path(WAL, open_name), 60)
    assert LogStore(store, lease_s=1).compact() == len(in_open)  # recovered

    ids = part_ids(store)
    assert writer.acked and not [i for i in writer.acked if ids[i] != 1]
    assert store.list(WAL) == []
    assert f"part-wal-{open_name[:-len(OPEN)]}.parquet" in LogStore(store).part_names()


def test_a_writer_whose_segment_was_recovered_under_it_still_stores_every_record(store):
    logs = LogStore(store, writer_id="stalled", seal_age_s=3600)
    logs.append([record("a")])
    first = logs.open_segment
    # the writer stalls past its lease: a compactor recovers and compacts its open segment
    age(store.path(WAL, first), 60)
    assert LogStore(store, lease_s=1).compact() == 1
    logs.append([record("b")])  # lands in the recovered (deleted) file: the fence writes it again
    assert logs.open_segment not in (None, first)

    # a takeover between the write and the check: the record is in both files (a duplicate, never a loss)
    second = logs.open_segment
    os.rename(store.path(WAL, second), store.path(WAL, second[:-len(OPEN)] + SEALED))
    logs.append([record("c")])
    assert logs.open_segment not in (None, first, second)
    logs.close()
    LogStore(store).compact()

    ids = part_ids(store)
    assert ids["a"] == 1 and ids["b"] == 1 and ids["c"] == 2
    assert sorted(LogStore(store).read().column("record_id").to_pylist()) == ["a", "b", "c"]
    assert store.list(WAL) == []


def test_segments_seal_on_size_age_and_close_and_compact_idempotently(store):
    logs = LogStore(store, writer_id="w", seal_age_s=3600, max_segment_records=2)
    logs.append([record("a")])
    assert [n.endswith(OPEN) for n in store.list(WAL)] == [True]
    logs.append([record("b")])  # full: sealed at once
    assert [n.endswith(SEALED) for n in store.list(WAL)] == [True] and logs.open_segment is None
    logs.append([record("c"), record("d"), record("e")])  # one batch over the cap: a segment of its own
    assert len(store.list(WAL)) == 2 and logs.open_segment is None
    assert len(LogStore(store).read_wal()) == 5

    aging = LogStore(store, writer_id="aging", seal_age_s=0.05)
    aging.append([record("f")])
    name = aging.open_segment
    deadline = time.monotonic() + DEADLINE_S
    while aging.open_segment is not None and time.monotonic() < deadline:  # the timer seals it, no append needed
        time.sleep(0.01)
    assert name[:-len(OPEN)] + SEALED in store.list(WAL)
    aging.close()

    logs.append([record("g")])
    logs.close()  # seals the open segment and stops the timer thread
    assert not [n for n in store.list(WAL) if n.endswith(OPEN)]
    assert not [t for t in threading.enumerate() if t.name.startswith(("flywheel-wal-w-", "flywheel-wal-aging-"))]

    # a torn last line (a crash mid-append) is skipped; a rerun after a crash rewrites the same parts
    torn = store.path(WAL, f"dead-00000000-000001{SEALED}")
    with open(torn, "wb") as f:
        f.write(b'{"record_id": "h", "agent_id": "sgd_Flights"}\n{"record_id": "i", "agen')
    snapshot = {n: open(store.path(WAL, n), "rb").read() for n in store.list(WAL)}
    assert LogStore(store).compact() == 8
    parts = LogStore(store).part_names()
    for n, data in snapshot.items():  # as if the compactor had crashed before deleting the segments
        with open(store.path(WAL, n), "wb") as f:
            f.write(data)
    assert LogStore(store).compact() == 8 and LogStore(store).part_names() == parts
    ids = part_ids(store)
    assert sorted(ids) == list("abcdefgh") and set(ids.values()) == {1}


def test_read_wal_sees_sealed_and_open_segments(store):
    sealed = LogStore(store, writer_id="one")
    sealed.append([record("a"), record("b")])
    sealed.close()
    live = LogStore(store, writer_id="two", seal_age_s=3600)
    live.append([record("c")])
    assert sorted(r["record_id"] for r in LogStore(store).read_wal()) == ["a", "b", "c"]
    assert LogStore(store).compact() == 2  # the live open segment stays
    assert sorted(LogStore(store).read().column("record_id").to_pylist()) == ["a", "b", "c"]
    live.close()


def test_bad_settings_name_the_key(store):
    with pytest.raises(ValueError, match="lease_s"):
        LogStore(store, lease_s=0)
    with pytest.raises(ValueError, match="writer_id"):
        LogStore(store, writer_id="../escape")


# -- object stores: one object per append, acknowledged when the PUT returned ---------------------------------
@pytest.fixture
def s3_store(monkeypatch):
    fake_aws_credentials(monkeypatch)
    with moto_s3("flywheel-capture") as endpoint:
        monkeypatch.setenv("FLYWHEEL_S3_ENDPOINT", endpoint)
        yield Store("s3://flywheel-capture/home")


def test_s3_append_and_concurrent_compaction_store_each_record_once(s3_store):
    logs = LogStore(s3_store, writer_id="serve-s3")
    acked = []
    for i in range(0, 30, 3):
        batch = [record(f"s{i + k}") for k in range(3)]
        logs.append(batch)
        acked += [r["record_id"] for r in batch]
        if i == 12:
            LogStore(s3_store).compact()  # while the writer keeps going
    assert len(s3_store.list(WAL)) == 5 and all(n.endswith(SEALED) for n in s3_store.list(WAL))
    assert len(LogStore(s3_store).read_wal()) == 15
    threads = [threading.Thread(target=LogStore(s3_store).compact) for _ in range(2)]  # two compactors at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logs.close()
    ids = part_ids(s3_store)
    assert sorted(ids) == sorted(acked) and set(ids.values()) == {1}
    assert s3_store.list(WAL) == []
