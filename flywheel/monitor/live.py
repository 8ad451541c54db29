"""An agent's live traffic, read incrementally: a cursor and a bounded window in `monitor/state/<agent>.json`.

A check reads only what no earlier check of the agent has read, never the whole log store:

- Parquet log parts whose names are not in the cursor's `parts`. Their footers say which agents they hold
  (`LogStore.part_agents` reads footers only); only parts that hold the agent are opened.
- The write-ahead log (`logs/wal/`). A sealed segment never changes, so one read whole is not read again; an open
  segment is read again and only records not taken yet are taken (`wal[<segment>]["ids"]`). When compaction turns
  a segment into `part-wal-<segment>.parquet`, the records already taken from it are skipped in that part. The
  WAL is read before the parts, so a segment compacted in between is seen in its part.

Records of the agent that Serve captured (`source == "serve"`) become rows of the window (`features.live_features`
plus the embedding of the text, float16, base64). The window keeps the newest `window` rows by timestamp; the
state also holds the episode (`flywheel.monitor.episodes`) and a short history of evaluated windows. The state is
written once, at the end of a check, after the check acted: a check that fails part-way reads the same records
again next time.
"""

from __future__ import annotations

import base64
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flywheel.capture.store import OPEN, PARQUET, SEALED, WAL, LogStore, parse_segment
from flywheel.ids import check_id
from flywheel.schema import LOG_RECORD
from flywheel.storage import Store

STATE = "monitor/state"
WAL_PART = "part-wal-"  # compaction names a segment's part `part-wal-<segment>.parquet`


def state_path(agent: str) -> str:
    return f"{STATE}/{check_id('agent id', agent)}.json"


def new_state(agent: str) -> dict:
    return {"agent": agent, "format": 1, "parts": [], "wal": {}, "window": [], "new": 0, "evaluations": 0,
            "episode": None, "last_retrain": None, "history": []}


def load_state(store: Store, agent: str) -> dict:
    """The agent's monitor state (a fresh one when none was written yet)."""
    return {**new_state(agent), **(store.read_json(state_path(agent)) or {})}


def save_state(store: Store, agent: str, state: dict) -> None:
    store.write_json(state_path(agent), state)


# -- reading ---------------------------------------------------------------------------------------------------------
def read_new(store: Store, agent: str, state: dict, opened: dict[str, list[str]] | None = None) -> list[dict]:
    """The agent's Serve records that no earlier check read (LOG_RECORD rows, oldest first). Advances the cursor in
    `state` (the caller saves it) and lists in `opened` what it read: "wal" segments, part "footers", "parts"."""
    opened = opened if opened is not None else {}
    for key in ("wal", "footers", "parts"):
        opened.setdefault(key, [])
    rows = _read_wal(store, agent, state, opened["wal"])
    rows += _read_parts(store, agent, state, opened)
    seen, out = {r["id"] for r in state["window"]}, []
    for r in rows:  # a record written twice (a fenced WAL append) or still in the window counts once
        if r.get("source") == "serve" and r.get("record_id") not in seen:
            seen.add(r.get("record_id"))
            out.append(r)
    out.sort(key=lambda r: r.get("timestamp") or 0.0)
    return out


def _read_wal(store: Store, agent: str, state: dict, opened: list[str]) -> list[dict]:
    wal: dict[str, dict] = state["wal"]
    listed, rows = set(), []
    for name in store.list(WAL):
        if name.endswith(OPEN):
            base = name[:-len(OPEN)]
            candidates = [name, base + SEALED]  # it may be sealed while we read
        elif name.endswith(SEALED):
            base, candidates = name[:-len(SEALED)], [name]
        else:
            continue
        listed.add(base)
        entry = wal.get(base)
        if entry and (entry.get("sealed") or entry.get("compacted")):
            continue
        for candidate in candidates:
            try:
                with store.open(f"{WAL}/{candidate}", "rb") as f:
                    data = f.read()
            except FileNotFoundError:  # sealed or compacted meanwhile: its part will be read
                continue
            opened.append(candidate)
            entry = wal.setdefault(base, {"sealed": False, "compacted": False, "ids": []})
            entry["sealed"] = not candidate.endswith(OPEN)
            taken = set(entry["ids"])
            for r in parse_segment(data):
                if r.get("agent_id") == agent and r.get("record_id") not in taken:
                    taken.add(r.get("record_id"))
                    entry["ids"].append(r.get("record_id"))
                    rows.append(r)
            break
    for base in [b for b, e in wal.items() if e.get("compacted") and b not in listed]:
        del wal[base]  # compacted and gone from the WAL: its part is in `parts`
    return rows


def _read_parts(store: Store, agent: str, state: dict, opened: dict[str, list[str]]) -> list[dict]:
    logs = LogStore(store)
    consumed = set(state["parts"])
    rows = []
    for name in logs.part_names():
        if name in consumed:
            continue
        try:
            holders = logs.part_agents([name])[name]
            opened["footers"].append(name)
            table = _read_part(store, name) if agent in holders else None
        except FileNotFoundError:  # removed since listing (retention): nothing to read
            consumed.add(name)
            continue
        consumed.add(name)
        entry = None
        if name.startswith(WAL_PART):  # from now on its segment, if still listed, is not read again
            entry = state["wal"].setdefault(name[len(WAL_PART):-len(".parquet")], {"sealed": True, "ids": []})
            entry["compacted"] = True
        if table is None:
            continue
        opened["parts"].append(name)
        taken = set(entry["ids"]) if entry else set()
        table = table.filter(pc.equal(table["agent_id"], agent))
        rows += [r for r in table.to_pylist() if r.get("record_id") not in taken]
    state["parts"] = sorted(consumed)
    return rows


def _read_part(store: Store, name: str) -> pa.Table:
    with store.fs.open(store.path(PARQUET, name), "rb") as f:
        return pq.read_table(f, schema=LOG_RECORD)


# -- the window ----------------------------------------------------------------------------------------------------
def newest(window: Sequence[dict], records: Sequence[dict], size: int) -> list[dict]:
    """The new records that belong to the newest `size` of window rows + records (so only they get featurised)."""
    stamps = sorted([(r["ts"], 0, i) for i, r in enumerate(window)] +
                    [(float(r.get("timestamp") or 0.0), 1, i) for i, r in enumerate(records)])
    return [records[i] for _, kind, i in stamps[-size:] if kind == 1] if size > 0 else []


def extend(window: Sequence[dict], rows: Sequence[dict], size: int) -> list[dict]:
    """The newest `size` rows of the window and the new rows, oldest first."""
    merged = sorted([*window, *rows], key=lambda r: r["ts"])  # stable: equal times keep their order
    return merged[-size:] if size > 0 else []


def pack_embedding(vector: np.ndarray) -> str:
    """An embedding as base64 float16 (what the state and the reference cache keep)."""
    return base64.b64encode(np.asarray(vector, dtype=np.float16).tobytes()).decode()


def unpack_embeddings(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """The embeddings of feature rows (n x d float64)."""
    if not rows:
        return np.zeros((0, 0))
    return np.stack([np.frombuffer(base64.b64decode(r["emb"]), dtype=np.float16) for r in rows]).astype(np.float64)
