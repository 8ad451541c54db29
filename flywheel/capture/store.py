"""The log store: at-least-once capture, then batched Parquet.

A record is *accepted* once `append()` returns: it is in a write-ahead segment, flushed and fsynced. Serve calls
`append()` before it answers. `compact()` turns closed segments into Parquet parts and only then deletes the
segments, so a crash at any point loses nothing (a crash between the two leaves both; readers deduplicate by
`record_id`). Ingest streams a file in chunks of lines and writes one Parquet part per chunk, named from the
input's digest and the chunk number, so re-ingesting a file is a no-op and memory stays bounded by one chunk.

Every part records the agents it holds in its footer (`flywheel.agents`), so incremental curation can tell which
parts an agent has not consumed yet without reading them.

    flywheel ingest logs.jsonl --known-agents sgd_Flights,sgd_Hotels --max-line-bytes 500000
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import uuid
from typing import BinaryIO, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.capture.ingest import DEFAULT_MAX_LINE_BYTES, digest
from flywheel.routing import register_agent
from flywheel.schema import LOG_RECORD, QUARANTINE
from flywheel.storage import Store

WAL = "logs/wal"
PARQUET = "logs/parquet"
QUARANTINE_DIR = "quarantine"
AGENTS_KEY = b"flywheel.agents"  # Parquet footer metadata of a log part: JSON list of the agents in it
INGEST_CHUNK_LINES = 10_000  # lines per Parquet part: bounds ingest memory, gives Ray Data tasks to balance


def with_agents(table: pa.Table) -> pa.Table:
    """The table with its agents recorded in the schema metadata (ends up in the Parquet footer)."""
    agents = sorted(set(table.column("agent_id").drop_null().to_pylist()))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), AGENTS_KEY: json.dumps(agents).encode()})


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
                             with_agents(pa.Table.from_pylist(records, schema=LOG_RECORD)))

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
                              with_agents(pa.Table.from_pylist(rows, schema=LOG_RECORD)))
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

    def part_names(self) -> list[str]:
        """Names of the Parquet log parts, sorted (the unit incremental curation tracks)."""
        return [n for n in self.store.list(PARQUET) if n.endswith(".parquet")]

    def parquet_files(self) -> list[str]:
        return [self.store.path(PARQUET, n) for n in self.part_names()]

    def part_agents(self, names: Iterable[str]) -> dict[str, frozenset[str]]:
        """Which agents each part holds: from the footer metadata, else (older parts) its `agent_id` column."""
        out = {}
        for name in names:
            with self.store.fs.open(self.store.path(PARQUET, name), "rb") as f:
                meta = pq.ParquetFile(f).schema_arrow.metadata or {}
                if AGENTS_KEY in meta:
                    out[name] = frozenset(json.loads(meta[AGENTS_KEY]))
                else:
                    f.seek(0)
                    column = pq.read_table(f, columns=["agent_id"]).column(0)
                    out[name] = frozenset(column.drop_null().unique().to_pylist())
        return out

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


def _lines(f: BinaryIO, max_bytes: int) -> Iterator[bytes]:
    """The file's lines without their newline; a line longer than `max_bytes` is cut at `max_bytes + 1` bytes
    (enough to be quarantined as oversized) and the rest skipped, so one huge line never fills memory."""
    while True:
        raw = f.readline(max_bytes + 2)
        if not raw:
            return
        if raw.endswith(b"\n"):
            yield raw[:-1]
            continue
        if len(raw) <= max_bytes + 1:  # the last line, without a newline
            yield raw
            continue
        yield raw[:max_bytes + 1]
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)


def _chunks(lines: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def file_digest(path: str) -> tuple[int, str]:
    """(size, sha256) of a file, read in 1 MiB blocks."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()


def ingest_file(store: Store, path: str, default_agent: str = "", tenant: str = "default",
                known_agents: Iterable[str] = (), max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                chunk_lines: int = INGEST_CHUNK_LINES) -> dict:
    """Stream one JSONL file into the log store, `chunk_lines` lines per Parquet part.

    Retry-safe: parts are named from the file's digest (and the validation settings, when not the defaults) plus
    the chunk number, so ingesting the same file again rewrites the same parts with the same rows.
    """
    from flywheel.capture.ingest import parse_lines

    name = os.path.basename(path)
    size, sha = file_digest(path)
    allow = sorted(set(known_agents))
    settings: dict = {}  # only non-default settings change the part names (older homes keep theirs)
    if allow:
        settings["known_agents"] = allow
    if max_line_bytes != DEFAULT_MAX_LINE_BYTES:
        settings["max_line_bytes"] = max_line_bytes
    key = digest(name, size, sha, *([settings] if settings else []))
    logs = LogStore(store)
    accepted = quarantined = 0
    reasons: dict[str, int] = {}
    agents: dict[str, int] = {}
    first = 1
    with open(path, "rb") as f:
        for i, chunk in enumerate(_chunks(_lines(f, max_line_bytes), chunk_lines)):
            records, rejected = parse_lines(chunk, name, default_agent, tenant, max_bytes=max_line_bytes,
                                            known_agents=allow, first_line=first)
            first += len(chunk)
            part = key if i == 0 else f"{key}-{i}"
            logs.write_records(records, part)
            logs.write_quarantine(rejected, "ingest", part)
            accepted, quarantined = accepted + len(records), quarantined + len(rejected)
            for q in rejected:
                reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
            for r in records:
                agents[r["agent_id"]] = agents.get(r["agent_id"], 0) + 1
    for agent in agents:
        register_agent(store, agent, tenant)
    return {"file": path, "lines": accepted + quarantined, "accepted": accepted,
            "quarantined": quarantined, "reasons": reasons, "agents": agents}
