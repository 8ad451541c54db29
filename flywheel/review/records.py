"""Reading captured records for review: find one by id, or scan an agent's records that are new since a cursor.

Pure reads of the log store (`flywheel.capture.store`): the write-ahead log first, then the Parquet parts.

Cost of `find_record(store, record_id, agent=None)`:
- the WAL: every uncompacted segment is read (bounded: Serve seals a segment every few seconds and every cycle
  compacts them), and a record is most often asked about just after it was answered, while it is still there;
- the parts: with `agent`, only the parts whose footer (`flywheel.agents`) names it are opened, otherwise all;
  each is read for its `record_id` column only (a few bytes per record), and the whole row only of the part that
  holds it. So a lookup is O(parts) small reads, never a read of every record. Pass the agent when known.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flywheel.capture.store import AGENTS_KEY, PARQUET, LogStore
from flywheel.schema import LOG_RECORD
from flywheel.storage import Store


def _read_part(store: Store, name: str, columns: list[str] | None = None) -> pa.Table | None:
    try:
        with store.fs.open(store.path(PARQUET, name), "rb") as f:
            return pq.read_table(f, columns=columns, schema=None if columns else LOG_RECORD)
    except FileNotFoundError:  # replaced or removed while we looked
        return None


def part_holds(store: Store, name: str, agent: str) -> bool:
    """Whether a part holds records of `agent`, from its footer (older parts: its `agent_id` column)."""
    try:
        with store.fs.open(store.path(PARQUET, name), "rb") as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
            if AGENTS_KEY in meta:
                return agent in json.loads(meta[AGENTS_KEY])
            f.seek(0)
            return agent in pq.read_table(f, columns=["agent_id"]).column(0).to_pylist()
    except FileNotFoundError:
        return False


def find_record(store: Store, record_id: str, agent: str | None = None) -> dict | None:
    """The captured record with this id (a `LOG_RECORD` dict), or None. See the module docstring for the cost."""
    return find_records(store, {record_id}, agent).get(record_id)


def find_records(store: Store, record_ids: set[str], agent: str | None = None) -> dict[str, dict]:
    """{record_id: record} for those of `record_ids` that exist, in one pass over the WAL and the parts."""
    wanted, found = set(record_ids), {}
    if not wanted:
        return found
    logs = LogStore(store)
    wal = [r for r in logs.read_wal() if r.get("record_id") in wanted and (agent is None or r.get("agent_id") == agent)]
    for row in pa.Table.from_pylist(wal, schema=LOG_RECORD).to_pylist() if wal else []:  # the schema's shape
        found.setdefault(row["record_id"], row)
    for name in logs.part_names():
        if not wanted - found.keys():
            break
        if agent is not None and not part_holds(store, name, agent):
            continue
        missing = pa.array(sorted(wanted - found.keys()), pa.string())
        ids = _read_part(store, name, ["record_id"])
        if ids is None or not pc.any(pc.is_in(ids.column(0), value_set=missing)).as_py():
            continue
        table = _read_part(store, name)
        if table is None:
            continue
        for row in table.filter(pc.is_in(table["record_id"], value_set=missing)).to_pylist():
            if agent is None or row.get("agent_id") == agent:
                found.setdefault(row["record_id"], row)
    return found


def agent_rows(table: pa.Table, agent: str) -> list[dict]:
    return table.filter(pc.equal(table["agent_id"], agent)).to_pylist()


def new_records(store: Store, agent: str, seen_parts: Iterable[str]) -> tuple[list[str], Iterator[dict]]:
    """(the part names not in `seen_parts`, the agent's records in those parts and in the WAL).

    The WAL is read every time (it is small); a record read there and again later in its compacted part is
    returned twice: callers must be idempotent (the review queue is: items are named from the record id).
    """
    logs = LogStore(store)
    seen = set(seen_parts)
    wal = [r for r in logs.read_wal() if r.get("agent_id") == agent]  # before the parts: see LogStore.read
    fresh = [n for n in logs.part_names() if n not in seen]

    def rows() -> Iterator[dict]:
        if wal:
            yield from pa.Table.from_pylist(wal, schema=LOG_RECORD).to_pylist()
        for name in fresh:
            if not part_holds(store, name, agent):
                continue
            table = _read_part(store, name)
            if table is not None:
                yield from agent_rows(table, agent)

    return fresh, rows()
