"""Curation on Ray Data: log store -> per-agent, immutable dataset versions with a manifest.

    flywheel curate --agents sgd_Flights,sgd_Restaurants --json
    ray job submit --working-dir . -- python jobs/curate.py --config jobs/curate.yaml

1. Ray Data streams every Parquet part of the log store through `filters.clean_batch` (validate, quarantine
   with a reason, redact PII, label, dedup key) and writes the cleaned rows to a staging folder.
2. The driver reads only the small key columns to take the whole-agent decisions: exact dedup across the agent's
   history, classifier or free text, and the session-grouped stratified split.
3. Each agent's version is written under `datasets/_staging/`, then published by one rename to
   `datasets/<agent>/<version>/` and the `LATEST` pointer is written last. A crash before that publishes nothing.

A version is named from its input (record ids + config), so curating the same logs twice gives the same version.
Counts add up: records in == kept (train + eval) + quarantined, per agent, in `manifest.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from flywheel.capture.ingest import digest
from flywheel.capture.store import LogStore, write_parquet
from flywheel.config import CurateConfig
from flywheel.curate import filters
from flywheel.schema import EXAMPLE, MESSAGE, QUARANTINE
from flywheel.storage import Store

CLEAN = pa.schema([
    ("example_id", pa.string()), ("record_id", pa.string()), ("agent_id", pa.string()),
    ("session_id", pa.string()), ("timestamp", pa.float64()), ("messages", pa.list_(MESSAGE)),
    ("tools_json", pa.string()), ("target", MESSAGE), ("label", pa.string()), ("task", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("dedup_key", pa.string()), ("pii", pa.string()),
    ("source", pa.string()),
])
KEYS = ["record_id", "agent_id", "session_id", "timestamp", "label", "task", "reason", "dedup_key", "pii"]


def clean_arrow_batch(batch: pa.Table, max_record_bytes: int, agents: tuple[str, ...] = ()) -> pa.Table:
    """The Ray Data stage: an Arrow batch of LOG_RECORD rows -> CLEAN rows (kept and set aside alike)."""
    if agents:
        batch = batch.filter(pc.is_in(batch["agent_id"], value_set=pa.array(list(agents), pa.string())))
    return pa.Table.from_pylist(filters.clean_batch(batch.to_pylist(), max_record_bytes), schema=CLEAN)


def latest_version(store: Store, agent: str) -> str | None:
    pointer = store.read_json(f"datasets/{agent}/LATEST")
    return pointer["version"] if pointer else None


def resolve_version(store: Store, agent: str, version: str = "latest") -> str:
    v = latest_version(store, agent) if version == "latest" else version
    if not v or not store.exists(f"datasets/{agent}/{v}/manifest.json"):
        raise FileNotFoundError(f"agent {agent!r} has no curated dataset {version!r} under {store.uri}: "
                                f"run `flywheel curate --agents {agent}` first")
    return v


def read_split(store: Store, agent: str, version: str, split: str) -> pa.Table:
    with store.open(f"datasets/{agent}/{version}/{split}.parquet", "rb") as f:
        return pq.read_table(f, schema=EXAMPLE)


def _pinned_sessions(store: Store, agent: str) -> dict[str, str]:
    """Sessions an earlier version put in eval stay in eval (and train in train): no leak across versions."""
    prev = latest_version(store, agent)
    if not prev:
        return {}
    pinned = {}
    for split in ("train", "eval"):
        for s in read_split(store, agent, prev, split).column("session_id").to_pylist():
            pinned[s] = split
    return pinned


def curate(cfg: CurateConfig, store: Store | None = None, progress: bool = False) -> dict:
    """Run curation; returns {agent: manifest} for every agent that got (or already had) a version."""
    import ray

    store = store or Store(cfg.home or None)
    logs = LogStore(store)
    logs.compact()
    files = logs.parquet_files()
    if not files:
        raise FileNotFoundError(f"no logs under {store.uri}/logs: run `flywheel ingest FILE` or serve traffic first")
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    pafs, base = store.pyarrow_fs()
    run = uuid.uuid4().hex[:12]
    staging = f"datasets/_staging/{run}"
    started = time.time()
    ds = ray.data.read_parquet([f.split("://", 1)[-1] for f in files], filesystem=pafs)
    ds = ds.map_batches(clean_arrow_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
                        fn_kwargs={"max_record_bytes": cfg.max_record_bytes, "agents": cfg.agents})
    ds.write_parquet(f"{base}/{staging}/cleaned", filesystem=pafs)
    cleaned = pads.dataset(f"{base}/{staging}/cleaned", filesystem=pafs, format="parquet", schema=CLEAN)
    keys = cleaned.to_table(columns=KEYS).to_pylist()
    clean_s = time.time() - started
    by_agent: dict[str, list[dict]] = {}
    for r in keys:
        by_agent.setdefault(r["agent_id"], []).append(r)
    manifests = {}
    try:
        for agent in sorted(by_agent):
            manifests[agent] = _publish_agent(store, cfg, agent, by_agent[agent], cleaned, staging, run)
            manifests[agent]["timings_s"] = {"clean_all_agents": round(clean_s, 2)}
    finally:
        store.remove(staging)
    return manifests


def _publish_agent(store: Store, cfg: CurateConfig, agent: str, keys: list[dict], cleaned: pads.Dataset,
                   staging: str, run: str) -> dict:
    keys = list({r["record_id"]: r for r in reversed(keys)}.values())  # a replayed record counts once
    rows = [r for r in keys if r["reason"] is None]
    n_dup = filters.mark_duplicates(rows)
    kept = [r for r in rows if r["reason"] is None]
    filters.settle_task(kept)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("home", "agents", "batch_size")}
    version = digest(agent, sorted(r["record_id"] for r in keys), config, n=12)
    if store.exists(f"datasets/{agent}/{version}/manifest.json"):  # same input, same output: retry-safe
        return store.read_json(f"datasets/{agent}/{version}/manifest.json")
    reasons = Counter(r["reason"] for r in keys if r["reason"] is not None)
    if len(kept) < cfg.min_examples:
        reasons_txt = dict(reasons)
        return {"agent": agent, "version": None, "published": False,
                "error": f"only {len(kept)} usable examples (< min_examples={cfg.min_examples}); reasons: {reasons_txt}"}
    splits = filters.split_groups(kept, cfg.eval_fraction, cfg.min_eval_per_label, cfg.seed,
                                  _pinned_sessions(store, agent))
    decided = {r["record_id"]: r for r in keys}
    for r in kept:
        r["split"] = splits[r["session_id"]]
    full = cleaned.to_table(filter=pads.field("agent_id") == agent).to_pylist()
    examples = {"train": [], "eval": []}
    quarantined = []
    seen = set()
    for row in sorted(full, key=lambda r: r["record_id"]):
        if row["record_id"] in seen:  # a replayed record (same id) counts once
            continue
        seen.add(row["record_id"])
        d = decided[row["record_id"]]
        if d["reason"] is not None:
            quarantined.append({"reason": d["reason"], "detail": row["detail"] or d.get("detail"), "stage": "curate",
                                "source": row["source"], "record_id": row["record_id"], "agent_id": agent,
                                "raw": json.dumps({"messages": row["messages"][-2:], "target": row["target"]},
                                                  default=str)[:4096]})
            continue
        ex = {k: row[k] for k in EXAMPLE.names if k in row}
        ex.update(label=d["label"], task=d["task"], split=d["split"])
        examples[d["split"]].append(ex)
    n_in = len(seen)
    prefix = f"{staging}/{agent}"
    for split, exs in examples.items():
        write_parquet(store, f"{prefix}/{split}.parquet", pa.Table.from_pylist(exs, schema=EXAMPLE))
    if quarantined:
        write_parquet(store, f"{prefix}/quarantine.parquet", pa.Table.from_pylist(quarantined, schema=QUARANTINE))
    pii = Counter()
    for r in kept:
        pii.update(json.loads(r["pii"] or "{}"))
    tasks = Counter(r["task"] for r in kept)
    manifest = {
        "agent": agent, "version": version, "published": True, "created": time.time(), "run": run,
        "task": tasks.most_common(1)[0][0],
        "counts": {"in": n_in, "kept": len(kept), "quarantined": len(quarantined),
                   "train": len(examples["train"]), "eval": len(examples["eval"]), "duplicates": n_dup},
        "reasons": dict(sorted(reasons.items())),
        "labels": {s: dict(Counter(e["label"] for e in exs).most_common()) for s, exs in examples.items()},
        "sessions": {s: len({e["session_id"] for e in exs}) for s, exs in examples.items()},
        "pii": dict(pii), "config": config,
        "lineage": {"log_records": n_in, "record_ids_digest": digest(sorted(seen)),
                    "previous": latest_version(store, agent)},
    }
    if manifest["counts"]["in"] != manifest["counts"]["kept"] + manifest["counts"]["quarantined"]:
        raise AssertionError(f"{agent}: counts do not add up: {manifest['counts']}")
    store.write_json(f"{prefix}/manifest.json", manifest)
    store.move(prefix, f"datasets/{agent}/{version}")  # publish: one rename
    store.write_json(f"datasets/{agent}/LATEST", {"version": version})
    return manifest
