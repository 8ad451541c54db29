"""Curation on Ray Data: log store -> per-agent, immutable, incremental dataset versions with a manifest and card.

    flywheel curate --agents sgd_Flights,sgd_Restaurants --json
    ray job submit --working-dir . -- python jobs/curate.py --config jobs/curate.yaml

1. Plan. Each agent's latest version lists the log parts it consumed (`lineage.parts`); only parts that hold an
   agent in scope which has not consumed them are read. `incremental: false`, or a config that differs from the
   previous version's, rebuilds from every part.
2. Clean (Ray Data, streaming, bounded memory). One task per log part streams it batch by batch through
   `filters.clean_batch` (validate, quality, PII, label, dedup key, MinHash) into
   `datasets/_staging/<run>/cleaned/`, partitioned by agent.
3. Decide (one Ray task per agent, in parallel; key columns only). Per agent: the previous version's keys (`keys.parquet`) + the new records'
   keys -> what people said (`flywheel.curate.reviewed`, read once per agent on the driver: originals a review
   label replaces are `reviewed`, records rated thumbs down `negative_feedback`, the previous version's rows
   included), exact and near duplicates (review labels first, then the previous version's examples, so they
   win), classifier or free text, the session-grouped stratified train/validation/test split
   (`filters.split_groups`) with sessions pinned to the split an earlier version gave them (an older train/eval
   version's eval sessions stay held out, as test). Near-duplicates are judged without the agent's prompt
   template (`near_dup.template`: the request shingles most of its records share), read from the new cleaned rows
   and the previous version's examples. An agent whose review decisions or ratings changed since its
   latest version is decided again even without new log parts.
4. Write (streaming). The previous version's files and the agent's new cleaned rows stream batch by batch through
   the decisions into `train/validation/test/quarantine.parquet`, then `keys.parquet`, the card (`card.md`,
   `class_balance.png`) and `manifest.json`, all in the staging folder. A task holds one batch and one agent's keys.
5. Publish (driver). One rename to `datasets/<agent>/<version>/` (object stores: every object copied, the manifest last),
   then the `LATEST` pointer. A crash before that publishes nothing. `FLYWHEEL_FAULT=after_staging_write` (or
   `after_publish`) makes the process exit at that point: the crash tests use it.

A version is named from its input (record ids + config + the review decisions and ratings), so curating the same
logs twice gives the same version. A record set aside by a decision stays set aside in later incremental versions
(a thumbs down later turned up is kept again by a full rebuild, `incremental: false`).
Counts add up: records in == kept (train + validation + test) + quarantined, per agent, in `manifest.json`.
Readers of a published version go through `flywheel.datasets` (the layout, older train/eval versions, `open_split`).
`executor="local"` runs the clean stage and the agents in this process without Ray (small data, and the
benchmark's single-process baseline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import uuid
from collections import Counter, defaultdict
from typing import Any, Callable, Collection, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from flywheel.capture.store import QUARANTINE_DIR, LogStore, write_parquet
from flywheel.config import CurateConfig
from flywheel.curate import card, filters, near_dup
from flywheel.curate.reviewed import Review, label_lineage, read_review
from flywheel.datasets import SPLITS, latest_version, pinned_sessions, split_file, split_name
from flywheel.schema import EXAMPLE, LOG_RECORD, MESSAGE, QUARANTINE, digest, quarantine_row
from flywheel.storage import Store

CLEAN = pa.schema([
    ("example_id", pa.string()), ("record_id", pa.string()), ("agent_id", pa.string()),
    ("session_id", pa.string()), ("timestamp", pa.float64()), ("messages", pa.list_(MESSAGE)),
    ("tools_json", pa.string()), ("target", MESSAGE), ("label", pa.string()), ("task", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("dedup_key", pa.string()), ("pii", pa.string()),
    ("source", pa.string()),
    ("minhash", pa.binary()),  # near_dup.signature of the redacted request (near-duplicate search)
    ("priority", pa.int64()),  # extra_json.priority: review labels 1, other records 0 (filters.review_marks)
    ("review_json", pa.string()),  # a review label's extra_json (its lineage), verbatim; null for other records
])
KEYS = ["record_id", "agent_id", "session_id", "timestamp", "label", "task", "reason", "dedup_key", "pii",
        "minhash", "priority", "review_json"]
# keys.parquet, one row per record of a version: the clean stage's keys (raw label/task/reason) + the decision.
DECISION = [("final_reason", pa.string()), ("final_detail", pa.string()), ("final_label", pa.string()),
            ("final_task", pa.string()), ("split", pa.string())]
KEYS_FILE = pa.schema([CLEAN.field(k) for k in KEYS] + DECISION)
NOT_IN_DIGEST = ("home", "agents", "batch_size", "incremental", "write_batch_rows",  # do not change the output
                 "eval_fraction", "min_eval_per_label")  # deprecated names, moved to their new fields
FAULT_ENV, FAULT_EXIT = "FLYWHEEL_FAULT", 17
STAGING = "datasets/_staging"


def clean_arrow_batch(batch: pa.Table, max_record_bytes: int | None = None, agents: tuple[str, ...] = (),
                      cfg: CurateConfig | None = None) -> pa.Table:
    """One Arrow batch of LOG_RECORD rows -> CLEAN rows (kept and set aside alike): the step both executors run."""
    if agents:
        batch = batch.filter(pc.is_in(batch["agent_id"], value_set=pa.array(list(agents), pa.string())))
    return pa.Table.from_pylist(filters.clean_batch(batch.to_pylist(), max_record_bytes, cfg), schema=CLEAN)


def _digest_config(cfg: CurateConfig) -> dict:
    """The settings that shape a version (they name it, and an incremental build must share them)."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_DIGEST}
    return json.loads(json.dumps(config, default=str))


def _fault(point: str) -> None:
    """Deterministic crash injection for the retry-safety tests (`FLYWHEEL_FAULT=<point>`)."""
    if os.environ.get(FAULT_ENV) == point:
        os._exit(FAULT_EXIT)


@dataclasses.dataclass
class Base:
    """The previous version an incremental build starts from."""

    version: str
    manifest: dict
    parts: frozenset[str]


def _base(store: Store, agent: str, config: dict) -> Base | None:
    """The agent's latest version when a new one can build on it (same config, keys recorded), else None."""
    version = latest_version(store, agent)
    manifest = store.read_json(f"datasets/{agent}/{version}/manifest.json") if version else None
    if not manifest or manifest.get("config") != config or "parts" not in manifest.get("lineage", {}):
        return None
    if not store.exists(f"datasets/{agent}/{version}/keys.parquet"):
        return None
    return Base(version, manifest, frozenset(manifest["lineage"]["parts"]))


# -- the clean stage: Ray Data, or this process ----------------------------------------------------------------
def clean_part(paths: pa.Table, filesystem: Any, cfg: CurateConfig, agents: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """The Ray Data stage: log part path(s) -> CLEAN tables, one per `cfg.batch_size` records, streamed (a task
    holds one batch of one part, never a whole part's output)."""
    for path in paths.column("path").to_pylist():
        with filesystem.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=cfg.batch_size):
                yield clean_arrow_batch(pa.Table.from_batches([rb]), cfg.max_record_bytes, agents, cfg)


def _clean(executor: str, store: Store, parts: list[str], out_rel: str, cfg: CurateConfig,
           agents: tuple[str, ...]) -> None:
    """Stream `parts` (names under logs/parquet) through `clean_arrow_batch` into `out_rel`, hive-partitioned
    by agent. Ray: one task per log part (explicit: Ray's Parquet reader plans tasks by bytes on disk and would
    read a few well-compressed parts in one task, on one CPU). Local: one batch at a time in this process."""
    pafs, base = store.pyarrow_fs()
    paths = [f"{base}/logs/parquet/{p}" for p in parts]
    if executor == "ray":
        import ray

        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
        ds = ds.map_batches(clean_part, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"filesystem": pafs, "cfg": cfg, "agents": agents})
        # One fused operator (clean -> write), nothing downstream to reserve resources for. With Ray Data's
        # per-operator reservation on, it ran ONE task until the first finished (measured: 4 parts of 10k records
        # 17.7 s -> 12.4 s on 2 CPUs without it). Set for this execution only, then restored.
        ctx = ray.data.DataContext.get_current()
        reserved, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
        try:
            ds.write_parquet(f"{base}/{out_rel}", filesystem=pafs, partition_cols=["agent_id"])
        finally:
            ctx.op_resource_reservation_enabled = reserved
        return
    if executor != "local":
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    source = pads.dataset(paths, filesystem=pafs, format="parquet", schema=LOG_RECORD)

    def batches() -> Iterator[pa.RecordBatch]:
        for rb in source.to_batches(batch_size=cfg.batch_size, batch_readahead=1, fragment_readahead=1):
            yield from clean_arrow_batch(pa.Table.from_batches([rb]), cfg.max_record_bytes, agents, cfg).to_batches()

    pads.write_dataset(pa.RecordBatchReader.from_batches(CLEAN, batches()), f"{base}/{out_rel}", filesystem=pafs,
                       format="parquet", partitioning=["agent_id"], partitioning_flavor="hive",
                       min_rows_per_group=cfg.write_batch_rows, existing_data_behavior="overwrite_or_ignore")


def _ingest_reasons(store: Store) -> dict[str, Counter]:
    """Lines quarantined at ingest, by agent and reason ("" for lines that name no agent): the card's first stage."""
    out: dict[str, Counter] = defaultdict(Counter)
    for name in store.list(f"{QUARANTINE_DIR}/ingest"):
        with store.open(f"{QUARANTINE_DIR}/ingest/{name}", "rb") as f:
            t = pq.read_table(f, columns=["reason", "agent_id"])
        for reason, agent in zip(t.column("reason").to_pylist(), t.column("agent_id").to_pylist()):
            out[agent or ""][reason] += 1
    return out


def curate(cfg: CurateConfig, store: Store | None = None, progress: bool = False, executor: str = "ray") -> dict:
    """Run curation; returns {agent: manifest} for every agent in scope that got (or already had) a version."""
    store = store or Store(cfg.home or None)
    timings: dict[str, float] = {}
    started = time.time()
    logs = LogStore(store)
    logs.compact()
    names = logs.part_names()
    if not names:
        raise FileNotFoundError(f"no logs under {store.uri}/logs: run `flywheel ingest FILE` or serve traffic first")
    index = logs.part_agents(names)
    scope = sorted(set(cfg.agents) or set().union(*index.values()))
    config = _digest_config(cfg)
    bases = {a: _base(store, a, config) if cfg.incremental else None for a in scope}
    to_read = [n for n in names if any(a in bases and n not in (bases[a].parts if bases[a] else ())
                                       for a in index[n])]
    reviews = {a: read_review(store, a) for a in scope}  # once per agent per run; the decide tasks get them
    redecide = {a for a in scope if bases[a] is not None and
                reviews[a].digest != (bases[a].manifest["lineage"].get("review") or {}).get("inputs")}
    timings["plan"] = time.time() - started
    run = uuid.uuid4().hex[:12]
    staging = f"{STAGING}/{run}"
    manifests: dict[str, dict] = {}
    try:
        fresh_agents: set[str] = set()
        if to_read:
            t0 = time.time()
            if executor == "ray":
                import ray

                if not ray.is_initialized():
                    ray.init(configure_logging=False)
                ray.data.DataContext.get_current().enable_progress_bars = progress
            _clean(executor, store, to_read, f"{staging}/cleaned", cfg, tuple(cfg.agents))
            timings["clean"] = time.time() - t0
            if store.exists(f"{staging}/cleaned"):
                fresh_agents = set(scope) & {a for n in to_read for a in index[n]}
        todo = fresh_agents | redecide  # new logs, or new review decisions and ratings on the old ones
        ingest = _ingest_reasons(store) if todo else {}
        t0 = time.time()
        prepared = _prepare_all(executor, store, cfg, {
            a: (staging, run, bases[a], sorted(n for n in to_read if a in index[n] and a in fresh_agents), ingest,
                reviews[a])
            for a in scope if a in todo})
        if prepared:
            timings["agents"] = time.time() - t0
        for agent in scope:
            b = bases[agent]
            if agent in prepared:
                m, prefix = prepared[agent]
                m = _publish(store, m, prefix) if prefix else m
            elif b is not None:
                m = dict(b.manifest)  # nothing new for this agent: its latest version stands
            else:
                continue
            manifests[agent] = {**m, "timings_s": {**{k: round(v, 3) for k, v in timings.items()},
                                                   **m.get("timings_s", {})}}
    finally:
        store.remove(staging)
    return manifests


# -- one agent: decide on the keys, stream the rows through the decisions, publish -----------------------------
def _read_keys(store: Store, rel: str) -> list[dict]:
    with store.open(rel, "rb") as f:
        return pq.read_table(f, schema=KEYS_FILE).to_pylist()


def _prepare_agent(store: Store, cfg: CurateConfig, agent: str, staging: str, run: str, base: Base | None,
                   parts_read: list[str], ingest: dict[str, Counter] | None = None,
                   review: Review | None = None) -> tuple[dict, str | None]:
    """Decide, write and card one agent's new version under `staging/<agent>`. Returns (manifest, folder to
    publish), or (manifest, None) when there is nothing to publish (too few examples, or the version exists).
    Reads only the staging folder and the agent's previous version, so agents run in parallel. `review`: the
    agent's review decisions and ratings (`reviewed.read_review`, read on the driver)."""
    t0 = time.time()
    review = review or Review()
    pafs, root = store.pyarrow_fs()
    cleaned = (pads.dataset(f"{root}/{staging}/cleaned", filesystem=pafs, format="parquet", partitioning="hive",
                            schema=CLEAN) if store.exists(f"{staging}/cleaned")
               else pads.dataset(CLEAN.empty_table()))  # no new logs: new review decisions only
    prior = _read_keys(store, f"datasets/{agent}/{base.version}/keys.parquet") if base else []
    pool = _Pool(prior, _new_records(cleaned, agent, {r["record_id"] for r in prior}))
    pool.decide(cfg, review, lambda ids: _requests(store, agent, cleaned, base, ids, cfg.write_batch_rows))
    config = _digest_config(cfg)
    ids = sorted(r["record_id"] for r in pool.every)
    version = digest(agent, ids, config, n=12) if review.digest is None else \
        digest(agent, ids, config, review.digest, n=12)
    if store.exists(f"datasets/{agent}/{version}/manifest.json"):  # same input, same output: retry-safe
        if latest_version(store, agent) != version:  # a crash between publish and LATEST: finish the job
            store.write_json(f"datasets/{agent}/LATEST", {"version": version})
        return store.read_json(f"datasets/{agent}/{version}/manifest.json"), None
    reasons = Counter(d[0] for d in map(pool.decision, pool.every) if d[0] is not None)
    if len(pool.kept) < cfg.min_examples:
        return {"agent": agent, "version": None, "published": False,
                "error": f"only {len(pool.kept)} usable examples (< min_examples={cfg.min_examples}); "
                         f"reasons: {dict(reasons)}"}, None
    pinned = ({r["session_id"]: split_name(r["split"]) for r in prior if r["split"]} if base else
              pinned_sessions(store, agent, latest_version(store, agent)))
    decided = pool.split(cfg, pinned)
    decide_s = time.time() - t0

    t0 = time.time()
    prefix = f"{staging}/{agent}"
    written = _write_rows(store, prefix, cfg, agent, decided, cleaned, base)
    _write_keys(store, prefix, pool.every, decided, pool.raw)  # raw: exactly the pool, by record id
    write_s = time.time() - t0

    manifest = _manifest(store, agent, version, run, config, pool, decided, reasons, written, base, parts_read,
                         (ingest or {}).get(agent, Counter()), sum((ingest or {}).get("", {}).values()), review)
    t0 = time.time()
    card.write_card(store, prefix, manifest)
    store.write_json(f"{prefix}/manifest.json", manifest)  # last: a folder without it is not a version
    manifest["timings_s"] = {"decide": round(decide_s, 3), "write": round(write_s, 3),
                             "card": round(time.time() - t0, 3)}
    return manifest, prefix


class _Pool:
    """One agent's records for a new version: the previous version's (`prior`, key columns) and the new ones
    (`fresh`). `decide` runs the whole-agent decisions (review, duplicates, near-duplicates, cap, task) over the
    pool: the previous version's kept examples plus the new records that passed cleaning."""

    def __init__(self, prior: list[dict], fresh: list[dict]):
        self.prior, self.fresh, self.every = prior, fresh, prior + fresh
        self.prior_ids = {r["record_id"] for r in prior}
        self.clean_reasons = Counter(r["reason"] for r in fresh if r["reason"] is not None)  # before the decisions
        self.carried = [r for r in prior if r["final_reason"] is None]
        self.rows = self.carried + [r for r in fresh if r["reason"] is None]  # what the decisions see
        self.raw = {r["record_id"]: (r["label"], r["task"], r["timestamp"]) for r in self.rows}
        self.in_pool = {r["record_id"] for r in self.rows}
        self.kept: list[dict] = []
        self.n_dup = 0
        self.template: frozenset[bytes] = frozenset()

    def decide(self, cfg: CurateConfig, review: Review,
               requests: Callable[[Collection[str]], Iterator[tuple[str, list]]] | None = None) -> None:
        """`requests(ids)`: (record id, request messages) of those records, for the near-duplicate comparison
        without the agent's template (None: compare the stored signatures of whole requests)."""
        for r in self.carried:
            r["detail"] = None
            r["timestamp"] = float("-inf")  # the previous version's examples are first in time: a late copy loses
        # what people said, before duplicates: a replaced original must not win over its label, or block it
        filters.set_aside_reviewed(self.rows, review.superseded, review.negative, review.labels)
        self.n_dup = filters.mark_duplicates(self.rows)
        # near-duplicates across the agent's whole history, then the label-balanced cap
        filters.mark_near_duplicates(self.rows, cfg.near_dup_threshold,
                                     self._without_template(cfg, requests) if requests else None)
        filters.cap_examples(self.rows, cfg.max_examples_per_agent, cfg.seed)
        self.kept = [r for r in self.rows if r["reason"] is None]
        filters.settle_task(self.kept)
        for r in self.carried:
            r["timestamp"] = self.raw[r["record_id"]][2]

    def _without_template(self, cfg: CurateConfig, requests: Callable) -> dict[str, bytes] | None:
        """The live records' signatures without the agent's prompt template, or None when it has none (too few
        records, the filter or the template off, no shingle shared by `near_dup_template_share` of them)."""
        if cfg.near_dup_threshold <= 0 or cfg.near_dup_template_share <= 0:
            return None
        live = [r["record_id"] for r in self.rows if r["reason"] is None and r.get("minhash")]
        if len(live) < near_dup.TEMPLATE_MIN_RECORDS:
            return None
        sample = sorted(live, key=lambda rid: digest(rid, n=16))[:near_dup.TEMPLATE_SAMPLE]
        self.template = near_dup.template((m for _, m in requests(sample)), cfg.near_dup_template_share)
        if not self.template:
            return None
        return {rid: near_dup.signature(m, cfg.near_dup_num_perm, self.template) for rid, m in requests(live)}

    def decision(self, r: dict) -> tuple:
        """(reason, detail, label, task): decided now for the pool and new records, else as the previous version
        decided it."""
        if r["record_id"] in self.in_pool or r["record_id"] not in self.prior_ids:
            return r["reason"], r["detail"], r["label"], r["task"]
        return r["final_reason"], r["final_detail"], r["final_label"], r["final_task"]

    def split(self, cfg: CurateConfig, pinned: dict[str, str]) -> dict[str, tuple]:
        """{record id: (reason, detail, label, task, split or None)} for every record."""
        splits = filters.split_groups(self.kept, cfg.validation_fraction, cfg.test_fraction,
                                      cfg.min_held_out_per_label, cfg.seed, pinned,
                                      min_label_count=cfg.min_label_count)
        return {r["record_id"]: (*self.decision(r), splits[r["session_id"]] if r["record_id"] in self.in_pool
                                 and r["reason"] is None else None) for r in self.every}


def _manifest(store: Store, agent: str, version: str, run: str, config: dict, pool: _Pool,
              decided: dict[str, tuple], reasons: Counter, written: dict, base: Base | None, parts_read: list[str],
              own: Counter, unattributed: int, review: Review) -> dict:
    """The version's manifest: counts (which must add up), reasons, splits, PII, each stage's in/out, lineage."""
    every = pool.every
    kept_rows = [r for r in every if decided[r["record_id"]][4] is not None]
    reviewed = label_lineage(kept_rows, [r for r in every if decided[r["record_id"]][4] is None], review)
    task, labels, sessions = _split_summary(kept_rows, decided)
    decide_reasons = Counter(r["reason"] for r in pool.rows if r["reason"] is not None)
    manifest = {
        "agent": agent, "version": version, "published": True, "created": time.time(), "run": run, "task": task,
        "counts": {"in": len(every), "kept": len(kept_rows), "quarantined": written["quarantine"],
                   **{split: written[split] for split in SPLITS},
                   "duplicates": reasons.get(filters.R_DUPLICATE, 0), "review_labels": reviewed["labels"]},
        "reasons": dict(sorted(reasons.items())), "labels": labels, "sessions": sessions,
        "pii": _pii_counts(kept_rows), "config": config,
        "stages": {
            "ingest": {"quarantined": sum(own.values()), "reasons": dict(sorted(own.items())),
                       "unattributed": unattributed},
            "previous": {"version": base.version if base else None, "in": len(pool.prior),
                         "kept": len(pool.carried)},
            "clean": {"in": len(pool.fresh), "out": len(pool.fresh) - sum(pool.clean_reasons.values()),
                      "reasons": dict(sorted(pool.clean_reasons.items()))},
            "decide": {"in": len(pool.rows), "out": len(pool.kept), "reasons": dict(sorted(decide_reasons.items())),
                       "duplicates_new": pool.n_dup, "template_shingles": len(pool.template)},
        },
        "lineage": {"log_records": len(every), "record_ids_digest": digest(sorted(r["record_id"] for r in every)),
                    "previous": latest_version(store, agent), "incremental": base is not None,
                    "parts": sorted(set(base.parts if base else ()) | set(parts_read)), "parts_read": parts_read,
                    "watermark": max((r["timestamp"] for r in every if r["timestamp"] is not None), default=None),
                    "review": reviewed},
        "files": [*(f"{split}.parquet" for split in SPLITS), "quarantine.parquet", "keys.parquet", card.CARD,
                  card.PLOT],
    }
    c = manifest["counts"]
    if not (c["in"] == c["kept"] + c["quarantined"] and c["kept"] == sum(c[split] for split in SPLITS)):
        raise AssertionError(f"{agent}: counts do not add up: {c}")
    return manifest


def _new_records(cleaned: pads.Dataset, agent: str, prior_ids: set[str]) -> list[dict]:
    """The agent's cleaned records not in the previous version; a replayed record (same id) counts once."""
    seen, fresh = set(prior_ids), []
    for r in cleaned.to_table(columns=list(dict.fromkeys(KEYS + ["detail"])),
                              filter=pads.field("agent_id") == agent).to_pylist():
        if r["record_id"] not in seen:  # the earlier copy stays
            seen.add(r["record_id"])
            fresh.append(r)
    return fresh


def _requests(store: Store, agent: str, cleaned: pads.Dataset, base: Base | None, ids: Collection[str],
              rows: int) -> Iterator[tuple[str, list]]:
    """(record id, request messages) of the records `ids`, each once: from the agent's new cleaned rows, then the
    previous version's examples (carried records). Streamed `rows` at a time; stops once all are found."""
    want, seen = set(ids), set()

    def take(batch: pa.RecordBatch) -> Iterator[tuple[str, list]]:
        for rid, messages in zip(batch.column("record_id").to_pylist(), batch.column("messages").to_pylist()):
            if rid in want and rid not in seen:
                seen.add(rid)
                yield rid, messages

    scanner = cleaned.scanner(columns=["record_id", "messages"], filter=pads.field("agent_id") == agent,
                              batch_size=rows, batch_readahead=1, fragment_readahead=1)
    for batch in scanner.to_batches():
        yield from take(batch)
    for split in SPLITS if base else ():
        rel = split_file(store, agent, base.version, split)
        if len(seen) == len(want) or not rel:
            continue
        with store.open(rel, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=["record_id", "messages"]):
                yield from take(batch)


def _write_keys(store: Store, prefix: str, every: list[dict], decided: dict[str, tuple],
                pool: dict[str, tuple]) -> None:
    """keys.parquet: every record's keys and its final decision; `pool` ({record_id: (label, task, timestamp)})
    is what entered this run's decisions unmarked, with those labels."""
    key_rows = []
    for r in every:
        reason, detail, label, task, split = decided[r["record_id"]]
        row = {k: r.get(k) for k in KEYS}
        if r["record_id"] in pool:
            row["label"], row["task"], row["timestamp"] = pool[r["record_id"]]
            row["reason"] = None
        key_rows.append({**row, "final_reason": reason, "final_detail": detail, "final_label": label,
                         "final_task": task, "split": split})
    write_parquet(store, f"{prefix}/keys.parquet", pa.Table.from_pylist(key_rows, schema=KEYS_FILE))


def _pii_counts(rows: list[dict]) -> dict[str, int]:
    pii: Counter = Counter()
    for r in rows:
        pii.update(json.loads(r["pii"] or "{}"))
    return dict(sorted(pii.items()))


def _split_summary(kept_rows: list[dict], decided: dict[str, tuple]) -> tuple[str, dict, dict]:
    """(the agent's task: the most common one, the labels per split with their counts, the sessions per split)."""
    by_split: dict[str, list[tuple]] = defaultdict(list)
    for r in kept_rows:
        d = decided[r["record_id"]]
        by_split[d[4]].append((d[2], d[3], r["session_id"]))
    tasks = Counter(t for split in SPLITS for _, t, _ in by_split[split])
    labels = {s: dict(Counter(lb for lb, _, _ in by_split[s]).most_common()) for s in SPLITS}
    sessions = {s: len({sess for _, _, sess in by_split[s]}) for s in SPLITS}
    return (tasks.most_common(1) or [("text", 0)])[0][0], labels, sessions


def _publish(store: Store, manifest: dict, prefix: str) -> dict:
    """Make a prepared version visible: one rename (on S3 the manifest lands last), then LATEST."""
    _fault("after_staging_write")
    t0 = time.time()
    agent, version = manifest["agent"], manifest["version"]
    store.publish(prefix, f"datasets/{agent}/{version}")
    _fault("after_publish")
    store.write_json(f"datasets/{agent}/LATEST", {"version": version})
    manifest["timings_s"]["publish"] = round(time.time() - t0, 3)
    return manifest


def _prepare_all(executor: str, store: Store, cfg: CurateConfig, jobs: dict[str, tuple]) -> dict[str, tuple]:
    """`_prepare_agent` for every agent with new logs: one Ray task per agent (they are independent), or in turn
    in this process. The driver then holds no agent's keys, so its memory does not grow with the logs."""
    if executor != "ray" or len(jobs) < 2:
        return {a: _prepare_agent(store, cfg, a, *args) for a, args in jobs.items()}
    import ray

    if not ray.is_initialized():  # new review decisions only: no clean stage started Ray
        ray.init(configure_logging=False)
    task = ray.remote(num_cpus=1, max_retries=1)(_prepare_agent)
    refs = {a: task.remote(store, cfg, a, *args) for a, args in jobs.items()}
    return dict(zip(refs, ray.get(list(refs.values()))))


class _Sink:
    """A Parquet file written in row groups of about `rows` rows (bounded memory, sane row groups)."""

    def __init__(self, stack: contextlib.ExitStack, store: Store, rel: str, schema: pa.Schema, rows: int):
        f = stack.enter_context(store.open(rel, "wb"))
        self.writer = stack.enter_context(pq.ParquetWriter(f, schema, compression="zstd"))
        self.schema, self.rows, self.pending, self.n, self.total = schema, rows, [], 0, 0
        stack.callback(self.flush)  # runs before the writer closes (LIFO)

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.n += table.num_rows
            self.total += table.num_rows
            if self.n >= self.rows:
                self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending))
            self.pending, self.n = [], 0


def _iter_file(store: Store, rel: str, rows: int) -> Iterator[pa.RecordBatch]:
    with store.open(rel, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=rows)


def _write_rows(store: Store, prefix: str, cfg: CurateConfig, agent: str, decided: dict[str, tuple],
                cleaned: pads.Dataset, base: Base | None) -> dict[str, int]:
    """Stream the previous version's files and the agent's new cleaned rows through the decisions into
    train/validation/test/quarantine.parquet. Each record lands exactly once; the driver holds one batch at a time."""
    done: set[str] = set()
    with contextlib.ExitStack() as stack:
        sinks = {name: _Sink(stack, store, f"{prefix}/{name}.parquet", schema, cfg.write_batch_rows)
                 for name, schema in (*((split, EXAMPLE) for split in SPLITS), ("quarantine", QUARANTINE))}
        if base:
            old = f"datasets/{agent}/{base.version}"
            for batch in _iter_file(store, f"{old}/quarantine.parquet", cfg.write_batch_rows) \
                    if store.exists(f"{old}/quarantine.parquet") else ():
                ids = batch.column("record_id").to_pylist()
                keep = [i for i, rid in enumerate(ids) if decided.get(rid, (None,))[0] is not None and rid not in done]
                done.update(ids[i] for i in keep)
                sinks["quarantine"].add(pa.Table.from_batches([batch]).take(keep).cast(QUARANTINE))
            for split in SPLITS:
                rel = split_file(store, agent, base.version, split)
                for batch in _iter_file(store, rel, cfg.write_batch_rows) if rel else ():
                    _route(batch, agent, decided, done, sinks)
        scanner = cleaned.scanner(columns=[n for n in CLEAN.names if n not in ("agent_id", "minhash", "priority",
                                                                               "review_json")],
                                  filter=pads.field("agent_id") == agent, batch_size=cfg.write_batch_rows,
                                  batch_readahead=1, fragment_readahead=1)
        for batch in scanner.to_batches():
            _route(batch, agent, decided, done, sinks)
    if len(done) != len(decided):
        missing = sorted(set(decided) - done)[:5]
        raise ValueError(f"{agent}: {len(decided) - len(done)} decided records were not found in the cleaned "
                           f"logs or the previous version (e.g. {missing}); the previous version may be damaged: "
                           f"rerun with --incremental false")
    return {name: s.total for name, s in sinks.items()}


def _route(batch: pa.RecordBatch, agent: str, decided: dict[str, tuple], done: set[str],
           sinks: dict[str, _Sink]) -> None:
    """One batch (CLEAN or EXAMPLE rows) -> its kept rows into their split, its set-aside rows into quarantine."""
    ids = batch.column("record_id").to_pylist()
    take: dict[str, list[int]] = {name: [] for name in (*SPLITS, "quarantine")}
    for i, rid in enumerate(ids):
        d = decided.get(rid)
        if d is None or rid in done:  # a replay, or a record this version does not hold
            continue
        done.add(rid)
        take[d[4] or "quarantine"].append(i)
    table = pa.Table.from_batches([batch])
    for split in SPLITS:
        if not take[split]:
            continue
        part = table.take(take[split])
        d = [decided[rid] for rid in part.column("record_id").to_pylist()]
        sinks[split].add(pa.Table.from_arrays(
            [part.column("example_id"), part.column("record_id"), pa.array([agent] * part.num_rows, pa.string()),
             part.column("session_id"), part.column("messages"), part.column("tools_json"), part.column("target"),
             pa.array([x[2] for x in d], pa.string()), pa.array([x[3] for x in d], pa.string()),
             pa.array([split] * part.num_rows, pa.string())], schema=EXAMPLE))
    if take["quarantine"]:
        rows = table.take(take["quarantine"]).to_pylist()
        sinks["quarantine"].add(pa.Table.from_pylist([
            quarantine_row(decided[r["record_id"]][0], decided[r["record_id"]][1] or r.get("detail"), r.get("source"),
                           json.dumps({"messages": r["messages"][-2:], "target": r["target"]}, default=str),
                           "curate", r["record_id"], agent)
            for r in rows], schema=QUARANTINE))
