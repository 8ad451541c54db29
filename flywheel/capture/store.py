"""The log store: captured records that are never lost once acknowledged, then batched Parquet.

A record is *accepted* (acknowledged) once `append()` returns; Serve calls it before it answers. On a local (or
shared POSIX) home that means the record's line is written, flushed and fsynced into a write-ahead segment that
the writer still owns; on an object store (`s3://`), that the PUT of a new object holding the batch returned.

The segment lifecycle (local homes), under `logs/wal/`:

    <writer>-<session>-<seq>.jsonl.open   open: one writer appends to it (one open segment per writer at a time)
    <writer>-<session>-<seq>.jsonl        sealed: flushed, fsynced, closed, then renamed (atomic); never changes

A writer seals its segment when it holds `max_segment_records` records or `max_segment_bytes` bytes, when it is
`seal_age_s` old (a daemon timer thread, started by the first append, does it even when no more appends come),
and on `close()` (also run when the `LogStore` is garbage-collected or the interpreter exits). The next append
opens a new segment. `compact()`, from any process, turns *sealed* segments into Parquet parts named from the
segment (`logs/parquet/part-wal-<segment>.parquet`), then deletes the segment: two compactors at once, or a rerun
after a crash, write the same part, and a segment another compactor already took is skipped. A torn last line
(a crash mid-append, never acknowledged) is skipped.

The lease: a writer that died (SIGKILL, a lost node) leaves an open segment behind. `compact()` recovers it,
renaming it to its sealed name and compacting it, once its mtime is older than `lease_s` (30 s). A live writer
seals within `seal_age_s` (5 s) of opening a segment, so its open segment is never that old; `lease_s` must stay
well above every writer's `seal_age_s`. Mtimes are compared with the compactor's clock: on a home shared by
several machines (NFS), keep their clocks within a fraction of `lease_s`.

The fence: a writer stalled past the lease (a paused VM, a stopped process) may find its open segment recovered
under it. After every write+fsync, `append()` checks that the open path still names the file it wrote to (same
inode); if not, the records may have missed the compaction, so it opens a fresh segment and writes them again
there before returning. That rare case can leave a duplicate, which `read()` and curation remove by `record_id`;
the normal path stores each record exactly once.

Object stores have no append or rename: each `append()` writes its records as one new sealed object, so there is
nothing open to recover. Ingest streams a file (local or `s3://`, plain or gzip: `flywheel.capture.reader`) in
chunks of lines and writes one Parquet part per chunk, named from the input's digest and the chunk number, so
re-ingesting a file is a no-op and memory stays bounded by one chunk. A file that cannot be read to its end keeps
the chunk read before the fault, then raises `InputError`. Every part records the agents it holds in its footer
(`flywheel.agents`), so incremental curation can tell which parts an agent has not consumed yet without reading
them.

    flywheel ingest logs.jsonl --known-agents sgd_Flights,sgd_Hotels --max-line-bytes 500000
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from typing import BinaryIO, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.capture.ingest import DEFAULT_MAX_LINE_BYTES, digest
from flywheel.capture.reader import InputError, LineReader, input_digest, open_input
from flywheel.routing import register_agent
from flywheel.schema import LOG_RECORD, QUARANTINE
from flywheel.storage import Store

log = logging.getLogger(__name__)

WAL = "logs/wal"
PARQUET = "logs/parquet"
QUARANTINE_DIR = "quarantine"
SEALED = ".jsonl"  # a sealed WAL segment (or, on object stores, one append batch)
OPEN = ".jsonl.open"  # a WAL segment a writer still appends to (local homes only)
AGENTS_KEY = b"flywheel.agents"  # Parquet footer metadata of a log part: JSON list of the agents in it
INGEST_CHUNK_LINES = 10_000  # lines per Parquet part: bounds ingest memory, gives Ray Data tasks to balance

SEAL_AGE_S = 5.0  # a writer seals its open segment this long after opening it
LEASE_S = 30.0  # compact() recovers an open segment whose mtime is older than this (its writer is gone)
MAX_SEGMENT_RECORDS = 1000
MAX_SEGMENT_BYTES = 16 << 20
_WRITER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}")
_FENCE_TRIES = 3


def with_agents(table: pa.Table) -> pa.Table:
    """The table with its agents recorded in the schema metadata (ends up in the Parquet footer)."""
    agents = sorted(set(table.column("agent_id").drop_null().to_pylist()))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), AGENTS_KEY: json.dumps(agents).encode()})


def write_parquet(store: Store, rel: str, table: pa.Table) -> str:
    """Write one Parquet object atomically (staging name + rename locally; one PUT on S3)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return store.write_bytes(rel, buf.getvalue())


def parse_segment(data: bytes) -> list[dict]:
    """The records of a WAL segment; a torn line (a crash mid-append, never acknowledged) is skipped."""
    rows = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # JSONDecodeError, or bytes cut inside a UTF-8 character
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _fsync_dir(path: str) -> None:
    """Make a file created or renamed in `path` survive a power loss (POSIX; a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Segments:
    """One writer's segments on a local home: append (fsync, fence), seal on size, age and close. Thread-safe.

    Kept apart from `LogStore` so that the timer thread and the finalizer never keep the `LogStore` alive.
    """

    def __init__(self, wal_dir: str, prefix: str, seal_age_s: float, max_records: int, max_bytes: int):
        self.dir, self.seal_age_s, self.max_records, self.max_bytes = wal_dir, seal_age_s, max_records, max_bytes
        self.prefix = prefix
        self.seq = 0
        self.lock = threading.Lock()
        self.wake = threading.Event()  # a segment was opened, or the timer must stop
        self.stop: threading.Event | None = None
        self.thread: threading.Thread | None = None
        self.file: BinaryIO | None = None
        self.path: str | None = None
        self.records = self.bytes = 0
        self.opened_at = 0.0

    @property
    def open_name(self) -> str | None:
        path = self.path
        return os.path.basename(path) if path else None

    def append(self, data: bytes, n: int) -> None:
        with self.lock:
            for _ in range(_FENCE_TRIES):
                if self.file is None or (self.records and (self.records + n > self.max_records or
                                                           self.bytes + len(data) > self.max_bytes)):
                    self._seal()
                    self._open()
                try:
                    self.file.write(data)
                    self.file.flush()
                    os.fsync(self.file.fileno())
                except BaseException:
                    self._abandon()  # it may end in a torn line: never write after one
                    raise
                self.records, self.bytes = self.records + n, self.bytes + len(data)
                if self._still_ours():
                    if self.records >= self.max_records or self.bytes >= self.max_bytes:
                        self._seal()
                    return
                # Taken over: a compactor recovered the segment (our lease ran out); it may have read the file
                # before this write. Write the records again into a fresh segment (a possible duplicate).
                log.warning("WAL segment %s was recovered while its writer was alive; writing %d records again",
                            self.path, n)
                self._drop()
            raise OSError(f"could not keep a WAL segment under {self.dir}: it was taken over {_FENCE_TRIES} times "
                          "in a row; is a compactor running with a lease_s shorter than the writers' seal_age_s?")

    def close(self) -> None:
        with self.lock:
            self._seal()
            stop, thread = self.stop, self.thread
            self.stop = self.thread = None
        if stop is not None:
            stop.set()
            self.wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    # -- under self.lock ---------------------------------------------------------------------------
    def _open(self) -> None:
        self.seq += 1
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, f"{self.prefix}-{self.seq:06d}{OPEN}")
        self.file = open(self.path, "xb")
        _fsync_dir(self.dir)  # the new name survives a power loss, like the records fsynced into it
        self.records = self.bytes = 0
        self.opened_at = time.monotonic()
        if self.thread is None:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._timer, args=(self.stop,), daemon=True,
                                           name=f"flywheel-wal-{self.prefix}")
            self.thread.start()
        self.wake.set()

    def _seal(self) -> None:
        """flush + fsync + close, then rename to the sealed name. A recovered segment is left to its compactor."""
        if self.file is None:
            return
        f, path = self.file, self.path
        try:
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
            with contextlib.suppress(FileNotFoundError):  # recovered meanwhile: the compactor owns it
                os.rename(path, path[:-len(OPEN)] + SEALED)
        finally:  # cleared last: `open_name` is None only once the sealed name exists
            self.file = self.path = None

    def _abandon(self) -> None:
        with contextlib.suppress(OSError):
            self._seal()
        self._drop()

    def _drop(self) -> None:
        f, self.file, self.path = self.file, None, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def _still_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        fst = os.fstat(self.file.fileno())
        return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)

    def _timer(self, stop: threading.Event) -> None:
        """Seal the open segment once it is `seal_age_s` old. Sleeps until then, or until a segment opens."""
        while True:
            with self.lock:
                if stop.is_set():
                    return
                timeout = None
                if self.file is not None:
                    timeout = self.opened_at + self.seal_age_s - time.monotonic()
                    if timeout <= 0:
                        name, timeout = self.open_name, None
                        try:
                            self._seal()
                        except OSError:  # its records were fsynced: the lease recovers the segment
                            log.exception("could not seal WAL segment %s under %s", name, self.dir)
                self.wake.clear()
            self.wake.wait(timeout)


class LogStore:
    """Captured records: the write-ahead log (`append`, `compact`, `read_wal`) and the Parquet parts.

    `LogStore(store, writer_id="serve-<replica>")` per writing process; readers and compactors use `LogStore(store)`.
    Call `close()` when a writer shuts down (it seals the open segment), or use it as a context manager.
    """

    def __init__(self, store: Store, writer_id: str | None = None, *, seal_age_s: float = SEAL_AGE_S,
                 lease_s: float = LEASE_S, max_segment_records: int = MAX_SEGMENT_RECORDS,
                 max_segment_bytes: int = MAX_SEGMENT_BYTES):
        for key, value in (("seal_age_s", seal_age_s), ("lease_s", lease_s),
                           ("max_segment_records", max_segment_records), ("max_segment_bytes", max_segment_bytes)):
            if not value > 0:
                raise ValueError(f"LogStore {key} must be > 0, got {value!r}")
        if writer_id is not None and not _WRITER_ID.fullmatch(writer_id):
            raise ValueError(f"LogStore writer_id {writer_id!r} must be 1-128 letters, digits or _ . @ : -, "
                             "starting with a letter or digit (it becomes part of a file name)")
        self.store = store
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self.seal_age_s, self.lease_s = seal_age_s, lease_s
        self.max_segment_records, self.max_segment_bytes = max_segment_records, max_segment_bytes
        self._prefix = f"{self.writer_id}-{uuid.uuid4().hex[:8]}"  # a new session per instance: no name repeats
        self._segments: _Segments | None = None
        self._lock = threading.Lock()
        self._seq = 0
        if store.local:
            self._segments = _Segments(self._local(WAL), self._prefix, seal_age_s, max_segment_records,
                                       max_segment_bytes)
            weakref.finalize(self, self._segments.close)  # seal on garbage collection and at interpreter exit

    def _local(self, *rel: str) -> str:
        path = self.store.path(*rel)
        return path[len("file://"):] if path.startswith("file://") else path

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- capture (Serve) ---------------------------------------------------------------------
    def append(self, records: list[dict]) -> None:
        """Durably store the records before returning: this is the acknowledgement point.

        Local: appended to this writer's open segment and fsynced (fenced, see the module docstring).
        Object stores: one new object holding the batch (returns after the PUT).
        """
        if not records:
            return
        data = "".join(json.dumps(r, default=str) + "\n" for r in records).encode()
        if self._segments is not None:
            self._segments.append(data, len(records))
            return
        with self._lock:
            self._seq += 1
            name = f"{self._prefix}-{self._seq:06d}{SEALED}"
        self.store.write_bytes(f"{WAL}/{name}", data)

    @property
    def open_segment(self) -> str | None:
        """The name of this writer's open segment under `logs/wal/`, or None."""
        return self._segments.open_name if self._segments is not None else None

    def close(self) -> None:
        """Seal the open segment and stop the timer thread. A later `append` opens a new segment."""
        if self._segments is not None:
            self._segments.close()

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
        """Move sealed WAL segments (and open ones whose lease expired) into Parquet parts. Returns records moved.

        Safe to run from several processes at once and while writers append: it never touches a live open segment.
        """
        moved = 0
        own = self.open_segment
        for name in self.store.list(WAL):
            if name.endswith(OPEN):
                if not self.store.local or name == own or not self._recover(name):
                    continue
                name = name[:-len(OPEN)] + SEALED
            elif not name.endswith(SEALED):
                continue
            moved += self._compact_segment(name)
        return moved

    def _recover(self, name: str) -> bool:
        """Take over an open segment whose writer is gone (lease expired): rename it to its sealed name."""
        path = self._local(WAL, name)
        try:
            if time.time() - os.stat(path).st_mtime <= self.lease_s:
                return False  # its writer may be alive
            os.rename(path, path[:-len(OPEN)] + SEALED)
        except FileNotFoundError:
            pass  # sealed by its writer or recovered by another compactor meanwhile: compact the sealed name
        return True

    def _compact_segment(self, name: str) -> int:
        rel = f"{WAL}/{name}"
        try:
            with self.store.open(rel, "rb") as f:
                rows = parse_segment(f.read())
        except FileNotFoundError:  # another compactor took it
            return 0
        if rows:
            write_parquet(self.store, f"{PARQUET}/part-wal-{name[:-len(SEALED)]}.parquet",
                          with_agents(pa.Table.from_pylist(rows, schema=LOG_RECORD)))
            if self.store.local:
                _fsync_dir(self._local(PARQUET))  # the part is durable before its segment goes
        self.store.remove(rel)
        return len(rows)

    def read_wal(self) -> list[dict]:
        """Accepted records not yet compacted, from sealed and open segments (monitoring reads them live)."""
        rows = []
        for name in self.store.list(WAL):
            if name.endswith(OPEN):
                candidates = [name, name[:-len(OPEN)] + SEALED]  # it may be sealed while we list
            elif name.endswith(SEALED):
                candidates = [name]
            else:
                continue
            for candidate in candidates:
                try:
                    with self.store.open(f"{WAL}/{candidate}", "rb") as f:
                        rows.extend(parse_segment(f.read()))
                    break
                except FileNotFoundError:  # sealed or compacted meanwhile
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
        """All records (deduplicated by record_id), optionally of one agent. Small-data helper.

        The WAL is read before the parts, so a segment compacted in between is seen in its part.
        """
        wal = pa.Table.from_pylist(self.read_wal(), schema=LOG_RECORD) if include_wal else None
        tables = []
        for name in self.part_names():
            try:
                with self.store.fs.open(self.store.path(PARQUET, name), "rb") as f:
                    tables.append(pq.read_table(f, schema=LOG_RECORD))
            except FileNotFoundError:
                continue
        if wal is not None:
            tables.append(wal)
        table = pa.concat_tables(tables) if tables else LOG_RECORD.empty_table()
        if agent_id is not None:
            table = table.filter(pa.compute.equal(table["agent_id"], agent_id))
        seen, keep = set(), []
        for i, rid in enumerate(table["record_id"].to_pylist()):
            if rid not in seen:
                seen.add(rid)
                keep.append(i)
        return table.take(keep) if len(keep) != len(table) else table


def _chunks(lines: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ingest_file(store: Store, path: str, default_agent: str = "", tenant: str = "default",
                known_agents: Iterable[str] = (), max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                chunk_lines: int = INGEST_CHUNK_LINES) -> dict:
    """Stream one JSONL file (local or `s3://`, plain or gzip: `flywheel.capture.reader`) into the log store,
    `chunk_lines` lines per Parquet part.

    Retry-safe: parts are named from the file's digest (and the validation settings, when not the defaults) plus
    the chunk number, so ingesting the same file again rewrites the same parts with the same rows. A file that
    cannot be read to its end (a truncated or corrupt gzip) still has every line before the fault stored, then
    raises `InputError` naming the file, the position and the counts (also in `InputError.result`).
    """
    from flywheel.capture.ingest import parse_lines

    name = os.path.basename(path)
    size, sha = input_digest(path)
    allow = sorted(set(known_agents))
    settings: dict = {}  # only non-default settings change the part names (older homes keep theirs)
    if allow:
        settings["known_agents"] = allow
    if max_line_bytes != DEFAULT_MAX_LINE_BYTES:
        settings["max_line_bytes"] = max_line_bytes
    key = digest(name, size, sha, *([settings] if settings else []))
    logs, tally = LogStore(store), _Tally(path)
    with open_input(path) as f:
        reader = LineReader(f, max_line_bytes)
        for i, chunk in enumerate(_chunks(reader, chunk_lines)):  # a fault ends the lines: the last chunk is kept
            records, rejected = parse_lines(chunk, name, default_agent, tenant, max_bytes=max_line_bytes,
                                            known_agents=allow, first_line=tally.next_line)
            part = key if i == 0 else f"{key}-{i}"
            logs.write_records(records, part)
            logs.write_quarantine(rejected, "ingest", part)
            tally.add(len(chunk), records, rejected)
    for agent in tally.agents:
        register_agent(store, agent, tenant)
    if reader.fault:
        raise InputError(f"{path}: {reader.fault}; the {tally.next_line - 1} lines before it were ingested "
                         f"({tally.accepted} accepted, {tally.quarantined} quarantined) and the rest of the file "
                         "was not read", tally.result())
    return tally.result()


class _Tally:
    """What one ingested file has produced so far."""

    def __init__(self, path: str):
        self.path, self.next_line, self.accepted, self.quarantined = path, 1, 0, 0
        self.reasons: dict[str, int] = {}
        self.agents: dict[str, int] = {}

    def add(self, lines: int, records: list[dict], rejected: list[dict]) -> None:
        self.next_line += lines
        self.accepted, self.quarantined = self.accepted + len(records), self.quarantined + len(rejected)
        for q in rejected:
            self.reasons[q["reason"]] = self.reasons.get(q["reason"], 0) + 1
        for r in records:
            self.agents[r["agent_id"]] = self.agents.get(r["agent_id"], 0) + 1

    def result(self) -> dict:
        return {"file": self.path, "lines": self.accepted + self.quarantined, "accepted": self.accepted,
                "quarantined": self.quarantined, "reasons": self.reasons, "agents": self.agents}
