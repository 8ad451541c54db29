"""The log store: at-least-once capture, then batched Parquet.

A record is *accepted* once `append()` returns: it is in a write-ahead segment, flushed and fsynced. Serve calls
`append()` before it answers. `compact()` turns closed segments into Parquet parts and only then deletes the
segments, so a crash at any point loses nothing (a crash between the two leaves both; readers deduplicate by
`record_id`). Ingest writes Parquet parts directly, named from the input's digest, so re-ingesting a file is a
no-op.
"""

from __future__ import annotations

import io
import json
import os
import threading
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.capture.ingest import digest
from flywheel.routing import register_agent
from flywheel.schema import LOG_RECORD, QUARANTINE
from flywheel.storage import Store

WAL = "logs/wal"
PARQUET = "logs/parquet"
QUARANTINE_DIR = "quarantine"


def write_parquet(store: Store, rel: str, table: pa.Table) -> str:
    """Write one Parquet object atomically (staging name + rename locally; one PUT on S3)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return store.write_bytes(rel, buf.getvalue())


class LogStore:
    def __init__(self, store: Store, writer_id: str | None = None):
        self.store = store
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._segment: str | None = None
        self._file = None
        self._count = 0
        self.max_segment_records = 1000

    # -- capture (Serve) ---------------------------------------------------------------------
    def append(self, records: list[dict]) -> None:
        """Durably append records (fsync) before returning: this is the acknowledgement point."""
        lines = "".join(json.dumps(r, default=str) + "\n" for r in records).encode()
        with self._lock:
            if self._file is None or self._count >= self.max_segment_records:
                self._roll()
            self._file.write(lines)
            self._file.flush()
            if self.store.local:
                os.fsync(self._file.fileno())
            self._count += len(records)
            if not self.store.local:  # object stores: one object per append batch
                self._close()

    def _roll(self) -> None:
        self._close()
        self._segment = f"{WAL}/{self.writer_id}-{uuid.uuid4().hex[:8]}.jsonl"
        if self.store.local:
            path = self.store.path(self._segment)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._file = open(path, "ab")
        else:
            self._file = self.store.fs.open(self.store.path(self._segment), "wb")
        self._count = 0

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        with self._lock:
            self._close()

    # -- batch writes (ingest, curation quarantine) -------------------------------------------
    def write_records(self, records: list[dict], name_from: str) -> str | None:
        if not records:
            return None
        return write_parquet(self.store, f"{PARQUET}/part-{digest(name_from, n=16)}.parquet",
                             pa.Table.from_pylist(records, schema=LOG_RECORD))

    def write_quarantine(self, rows: list[dict], stage: str, name_from: str) -> str | None:
        if not rows:
            return None
        return write_parquet(self.store, f"{QUARANTINE_DIR}/{stage}/part-{digest(name_from, n=16)}.parquet",
                             pa.Table.from_pylist(rows, schema=QUARANTINE))

    # -- compaction and reading ---------------------------------------------------------------
    def compact(self) -> int:
        """Move closed WAL segments (not this writer's open one) into Parquet parts. Returns records moved."""
        moved = 0
        open_segment = self._segment.rsplit("/", 1)[-1] if self._file is not None else None
        for name in self.store.list(WAL):
            if not name.endswith(".jsonl") or name == open_segment:
                continue
            rel = f"{WAL}/{name}"
            with self.store.open(rel, "rb") as f:
                lines = f.read().splitlines()
            rows = []
            for line in lines:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line from a crash mid-append was never acknowledged
                    continue
            if rows:
                write_parquet(self.store, f"{PARQUET}/part-wal-{name[:-6]}.parquet",
                              pa.Table.from_pylist(rows, schema=LOG_RECORD))
                moved += len(rows)
            self.store.remove(rel)
        return moved

    def read_wal(self) -> list[dict]:
        """Accepted records not yet compacted (monitoring reads them live)."""
        rows = []
        for name in self.store.list(WAL):
            if name.endswith(".jsonl"):
                with self.store.open(f"{WAL}/{name}", "rb") as f:
                    for line in f.read().splitlines():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError:
                            continue
        return rows

    def parquet_files(self) -> list[str]:
        return [self.store.path(PARQUET, n) for n in self.store.list(PARQUET) if n.endswith(".parquet")]

    def read(self, agent_id: str | None = None, include_wal: bool = True) -> pa.Table:
        """All records (deduplicated by record_id), optionally of one agent. Small-data helper."""
        tables = []
        for path in self.parquet_files():
            with self.store.fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, schema=LOG_RECORD))
        if include_wal:
            tables.append(pa.Table.from_pylist(self.read_wal(), schema=LOG_RECORD))
        table = pa.concat_tables(tables) if tables else LOG_RECORD.empty_table()
        if agent_id is not None:
            table = table.filter(pa.compute.equal(table["agent_id"], agent_id))
        seen, keep = set(), []
        for i, rid in enumerate(table["record_id"].to_pylist()):
            if rid not in seen:
                seen.add(rid)
                keep.append(i)
        return table.take(keep) if len(keep) != len(table) else table


def ingest_file(store: Store, path: str, default_agent: str = "", tenant: str = "default") -> dict:
    """Read one JSONL file into the log store. Retry-safe: outputs are named from the file's digest."""
    from flywheel.capture.ingest import parse_lines

    with open(path, "rb") as f:
        data = f.read()
    name = os.path.basename(path)
    records, quarantined = parse_lines(data.split(b"\n"), name, default_agent, tenant)
    key = digest(name, len(data), __import__("hashlib").sha256(data).hexdigest())
    logs = LogStore(store)
    logs.write_records(records, key)
    logs.write_quarantine(quarantined, "ingest", key)
    reasons: dict[str, int] = {}
    for q in quarantined:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    agents: dict[str, int] = {}
    for r in records:
        agents[r["agent_id"]] = agents.get(r["agent_id"], 0) + 1
    for agent in agents:
        register_agent(store, agent, tenant)
    return {"file": path, "lines": len(records) + len(quarantined), "accepted": len(records),
            "quarantined": len(quarantined), "reasons": reasons, "agents": agents}
