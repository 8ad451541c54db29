"""Drift of an agent's live traffic against its training reference; a drift episode routes back to the teacher.

    flywheel monitor --agent sgd_Flights                 # one check: check_drift(MonitorConfig(agent=...))

One check, for one agent:

1. **Read** only the live records no earlier check read (`flywheel.monitor.live`: a cursor over log parts and WAL
   segments in `monitor/state/<agent>.json`) and add them to the window of the newest `window` requests.
2. **Input drift**, every `stride` new requests: the window's distinct requests against the train split of the
   agent's latest curated dataset (up to `max_reference` examples, features cached per dataset version in
   `monitor/state/<agent>.reference.parquet`). The last user turn is embedded with all-MiniLM-L6-v2
   (`flywheel.embeddings`) and compared by MMD and by a nearest-neighbour test (permutation p-values); length,
   turns and tools by K-S; Holm at family-wise `alpha` (`flywheel.monitor.stats`). Answers are not input: a weak
   student cannot look like drift.
3. **Episodes**: `persistence` drifted windows in a row start a drift episode, `clear_windows` clean ones end it
   (`flywheel.monitor.episodes`). At the start: the route goes to the teacher, one retrain request is queued,
   named after the episode (none if another was queued within `cooldown_s`), and the event
   `monitor/events/<agent>-<episode>.json` is written; at the end, that event gets `ended`.
4. **Quality** of the window's answers (invalid tool calls, fallbacks, negative feedback, teacher agreement on
   shadow samples; `flywheel.monitor.quality`): reported and flagged, never drift.
5. **Report**: Evidently's per-feature HTML report `monitor/<agent>/drift-<time>.html` (`report`: always, for
   drifted windows outside an episode, or never), and Ray gauges `flywheel_drift_share`, `flywheel_drift_pvalue`,
   `flywheel_drift_episode` (0/1) and `flywheel_quality_invalid_rate`, tagged by agent, whenever Ray is
   initialised in this process. `check_drift` initialises nothing: run it in a Ray driver or task to see them.

Verdicts: "insufficient_data" (fewer than `min_window` distinct live requests), "no_new_data" (fewer than
`stride` new requests since the last evaluated window; nothing is tested), "no_drift", "suspect" (this window
drifted, the episode has not started), "drift" (an episode is on). `drifted` is True while an episode is on.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel import datasets, routing
from flywheel.config import MonitorConfig
from flywheel.feedback_log import latest_scores
from flywheel.monitor import episodes, features, live, quality, stats
from flywheel.schema import digest
from flywheel.storage import Store

EVENTS = "monitor/events"
DRIFT, SUSPECT, NO_DRIFT = "drift", "suspect", "no_drift"
INSUFFICIENT, NO_NEW_DATA = "insufficient_data", "no_new_data"
HISTORY = 20  # evaluated windows kept in the state (the evidence an event cites)
GAUGES = {"flywheel_drift_share": "Share of the input drift tests that failed on the latest window",
          "flywheel_drift_pvalue": "Smallest Holm-adjusted p-value of the input drift tests on the latest window",
          "flywheel_drift_episode": "1 while a drift episode is on (the agent was routed to the teacher), else 0",
          "flywheel_quality_invalid_rate": "Share of unusable answers (invalid tool calls, empty) in the window"}
_GAUGES: dict[str, Any] = {}


# -- the reference ---------------------------------------------------------------------------------------------------
def reference_examples(store: Store, agent: str, version: str | None = None) -> pa.Table:
    """The train split (schema.EXAMPLE) of the agent's latest (or the given) curated dataset version, read through
    `flywheel.datasets` (the one place that knows the layout)."""
    split = datasets.open_split(store, agent, version or "latest", datasets.TRAIN)
    if split.table.num_rows == 0:
        raise ValueError(f"agent {agent!r}: dataset version {split.version!r} has an empty train split; "
                         f"capture more traffic and run `flywheel curate --agents {agent}`")
    return split.table


def embed_texts(texts: Sequence[str], model_path: str = "") -> np.ndarray:
    """Unit embeddings of the texts (n x d); a seam the tests and the bench share with the monitor."""
    from flywheel.embeddings import embed

    return np.asarray(embed(list(texts), model_path)) if texts else np.zeros((0, 0))


def reference_features(store: Store, agent: str, version: str, cfg: MonitorConfig) -> list[dict]:
    """Input feature rows (with "emb") of up to `max_reference` train examples; cached per version and settings."""
    rel = f"{live.STATE}/{agent}.reference.parquet"
    key = {"version": version, "embedding_model": cfg.embedding_model, "max_reference": cfg.max_reference}
    try:
        with store.open(rel, "rb") as f:
            cached = pq.read_table(f)
        if json.loads((cached.schema.metadata or {}).get(b"flywheel.monitor", b"{}")) == key:
            return cached.to_pylist()
    except FileNotFoundError:
        pass
    table = reference_examples(store, agent, version)
    if table.num_rows > cfg.max_reference:  # a fixed sample per version: every check compares with the same rows
        rng = np.random.default_rng(int(digest(agent, version, n=8), 16))
        table = table.take(np.sort(rng.choice(table.num_rows, cfg.max_reference, replace=False)))
    rows = [features.example_features(ex) for ex in table.to_pylist()]
    for row, vector in zip(rows, embed_texts([r["text"] for r in rows], cfg.embedding_model)):
        row["emb"] = live.pack_embedding(vector)
    out = pa.Table.from_pylist(rows).replace_schema_metadata({b"flywheel.monitor": json.dumps(key).encode()})
    buf = io.BytesIO()
    pq.write_table(out, buf)
    store.write_bytes(rel, buf.getvalue())
    return rows


# -- live rows -------------------------------------------------------------------------------------------------------
def featurize(records: Sequence[dict], model_path: str = "") -> list[dict]:
    """Window rows of live LOG_RECORD rows: `features.live_features` plus the embedding of the text."""
    rows = [features.live_features(r) for r in records]
    for row, vector in zip(rows, embed_texts([r["text"] for r in rows], model_path)):
        row["emb"] = live.pack_embedding(vector)
    return rows


def window_drift(reference: Sequence[dict], window: Sequence[dict], cfg: MonitorConfig, seed: int = 0) -> dict:
    """The input drift tests of a window of feature rows (with "emb") against reference rows; see `stats`."""
    return stats.input_drift(stats.sample(reference, live.unpack_embeddings(reference)), stats.sample(window, live.unpack_embeddings(window)),
                             cfg.alpha, cfg.permutations, seed)


# -- Evidently ---------------------------------------------------------------------------------------------------------
REPORT_TEXT, REPORT_NUMERIC = ["text"], ["chars", "words", "n_messages", "n_tools"]


def run_report(reference, live_frame, columns: Sequence[str] = tuple(REPORT_TEXT + REPORT_NUMERIC)):
    """Evidently's DataDriftPreset over the input features: the per-feature view for people (the verdict is ours)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(text_columns=[c for c in REPORT_TEXT if c in columns],
                                numerical_columns=[c for c in REPORT_NUMERIC if c in columns])
    report = Report([DataDriftPreset(columns=list(columns))], include_tests=True)
    try:
        with warnings.catch_warnings():  # constant columns (e.g. n_tools) make scipy warn about 0/0
            warnings.simplefilter("ignore")
            return report.run(Dataset.from_pandas(live_frame, data_definition=definition),
                              Dataset.from_pandas(reference, data_definition=definition))
    except ValueError as e:  # no words on either side (requests without user text): the other features only
        if "empty vocabulary" not in str(e) or "text" not in columns:
            raise
        return run_report(reference, live_frame, [c for c in columns if c != "text"])


def save_report(store: Store, agent: str, reference: Sequence[dict], window: Sequence[dict], stamp: str) -> str:
    """Write the Evidently HTML report under the home; returns its path relative to the home."""
    import pandas as pd

    cols = REPORT_TEXT + REPORT_NUMERIC
    frames = [pd.DataFrame([{c: r[c] for c in cols} for r in rows], columns=cols) for rows in (reference, window)]
    snapshot = run_report(*frames)
    rel = f"monitor/{agent}/drift-{stamp}.html"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "report.html")
        snapshot.save_html(local)
        with open(local, "rb") as f:
            store.write_bytes(rel, f.read())
    return rel


# -- events, routing, metrics -------------------------------------------------------------------------------------
def drift_events(store: Store, agent: str) -> list[dict]:
    """Every drift episode recorded for the agent (one event each), oldest first."""
    events = [store.read_json(f"{EVENTS}/{n}") for n in store.list(EVENTS)
              if n.startswith(f"{agent}-") and n.endswith(".json")]
    return sorted((e for e in events if e and e.get("agent") == agent), key=lambda e: e["time"])


def _last_retrain(store: Store, agent: str, state: dict) -> dict | None:
    """{"episode", "time"} of the agent's last retrain request (the state, else the events of older homes)."""
    if state.get("last_retrain"):
        return state["last_retrain"]
    last = next((e for e in reversed(drift_events(store, agent)) if e.get("retrain")), None)
    return {"episode": last.get("episode") or last["id"], "time": last["time"]} if last else None


def _maybe_retrain(store: Store, cfg: MonitorConfig, state: dict, episode: dict, reason: str,
                   now: float) -> tuple[str | None, str | None]:
    """Queue a retrain request for the episode unless its quota is used or the cool-down runs:
    (request path or None, the episode whose request suppressed it or None)."""
    if episode["retrains"] >= cfg.retrains_per_episode:
        return None, None
    last = _last_retrain(store, cfg.agent, state)
    retry = last is not None and last["episode"] == episode["id"] and episode["retrains"] == 0  # a check re-run
    if last is not None and not retry and now - float(last["time"]) < cfg.cooldown_s:
        return None, last["episode"]
    request_id = episode["id"] if episode["retrains"] == 0 else f"{episode['id']}-r{episode['retrains'] + 1}"
    path = routing.queue_retrain(store, cfg.agent, request_id, reason)
    episode["retrains"] += 1
    state["last_retrain"] = {"episode": episode["id"], "time": now}
    return path, None


def _start_episode(store: Store, cfg: MonitorConfig, state: dict, result: dict, now: float) -> None:
    """Route to the teacher, queue the episode's retrain, then write its event: in that order, so a crash part-way
    errs towards the teacher and at-least-once retraining (the episode id is deterministic: a retry rewrites)."""
    agent, episode = cfg.agent, state["episode"]
    window = state["window"]
    episode.update(id=episodes.episode_id(agent, window[-1]["ts"], state["evaluations"], window[-1]["id"]),
                   started=now, retrains=0, ended=None)
    if routing.get_route(store, agent).get("mode") != routing.TEACHER:
        routing.set_route(store, agent, routing.TEACHER, reason=f"drift episode {episode['id']}")
    reason = (f"drift episode {episode['id']}: input drift in {', '.join(result['drifted_features'])} "
              f"(p={result['pvalue']:.2g}) over {cfg.persistence} window(s) in a row")
    result["retrain"], suppressed = _maybe_retrain(store, cfg, state, episode, reason, now)
    event = {**{k: result[k] for k in ("agent", "drift_share", "drifted_features", "n_reference", "n_live",
                                       "report", "dataset_version", "retrain", "pvalue", "tests", "quality")},
             "id": episode["id"], "episode": episode["id"], "kind": "drift_episode", "time": now,
             "threshold": cfg.alpha, "alpha": cfg.alpha, "persistence": cfg.persistence,
             "clear_windows": cfg.clear_windows, "windows": state["history"][-cfg.persistence:],
             "suppressed_by": suppressed, "ended": None}
    store.write_json(f"{EVENTS}/{agent}-{episode['id']}.json", event)
    result["event"] = episode["id"]


def _end_episode(store: Store, cfg: MonitorConfig, state: dict, now: float) -> None:
    """Mark the episode's event ended (the route stays: leaving the teacher is a promotion's call)."""
    episode = state["episode"]
    rel = f"{EVENTS}/{cfg.agent}-{episode['id']}.json"
    event = store.read_json(rel) or {"agent": cfg.agent, "id": episode["id"], "episode": episode["id"],
                                     "time": episode.get("started") or now}
    event.update(ended=now, end_windows=state["history"][-cfg.clear_windows:])
    store.write_json(rel, event)
    episode["ended"] = now


def export_metrics(agent: str, values: dict[str, float | None]) -> None:
    """Set the Ray gauges named in `values` (see `GAUGES`; None skips one); a no-op outside an initialised Ray."""
    ray = sys.modules.get("ray")  # not imported here means no Ray to report to
    if ray is None or not ray.is_initialized():
        return
    from ray.util.metrics import Gauge

    for name, value in values.items():
        if value is None:
            continue
        if name not in _GAUGES:
            _GAUGES[name] = Gauge(name, description=GAUGES[name], tag_keys=("agent",))
        _GAUGES[name].set(float(value), tags={"agent": agent})


# -- the stage -------------------------------------------------------------------------------------------------------
def certified_coverage(store: Store, agent: str) -> float | None:
    """The share of validation traffic the production version's certificate kept on the student, if it has one."""
    from flywheel.registry.registry import Registry

    try:
        entry = Registry(store).alias(agent)
    except Exception:  # an unreadable registry: no deferral check, the input tests still run
        return None
    certificate = (entry or {}).get("selective") or {}
    coverage = certificate.get("coverage") if certificate.get("threshold") is not None else None
    return float(coverage) if isinstance(coverage, (int, float)) and not isinstance(coverage, bool) else None


def with_feedback(window: list[dict], scores: dict[str, float]) -> list[dict]:
    """The window's rows with each record's latest feedback event (`POST /v1/feedback` comes after the answer)."""
    return [{**r, "feedback": scores[r["id"]]} if r.get("id") in scores else r for r in window]


def check_drift(cfg: MonitorConfig, store: Store | None = None) -> dict:
    """One monitoring check of `cfg.agent`; see the module docstring. Initialises nothing (no Ray).

    Returns {"agent", "verdict", "drifted" (an episode is on), "window_drifted", "episode", "event" (an episode
    started by this check), "retrain", "ended_episode", "drift_share", "pvalue", "drifted_features", "tests",
    "quality", "n_reference", "n_live", "n_distinct", "n_new", "report", "dataset_version", "read" (the log parts
    and WAL segments it opened, and how many part footers it read)}.
    """
    store = store or Store(cfg.home or None)
    agent = cfg.agent
    version = datasets.pointed_version(store, agent)
    state = live.load_state(store, agent)
    read: dict[str, list[str]] = {}
    records = live.read_new(store, agent, state, read)
    state["window"] = live.extend(state["window"], featurize(live.newest(state["window"], records, cfg.window),
                                                               cfg.embedding_model), cfg.window)
    state["new"] += len(records)
    window = state["window"]
    episode = state.get("episode") or {}
    result: dict[str, Any] = {
        "agent": agent, "verdict": INSUFFICIENT, "drifted": bool(episode.get("active")), "window_drifted": None,
        "episode": episode.get("id") if episode.get("active") else None, "event": None, "retrain": None,
        "ended_episode": None, "drift_share": None, "pvalue": None, "drifted_features": [], "tests": {},
        "quality": quality.summary(with_feedback(window, latest_scores(store, agent)), cfg), "n_reference": None,
        "n_live": len(window),
        "n_distinct": len(stats.distinct(window)), "n_new": len(records), "report": None,
        "dataset_version": version,
        "read": {"parts": read["parts"], "wal": read["wal"], "footers": len(read["footers"])},  # what it opened
    }
    if result["n_distinct"] >= cfg.min_window and state["new"] < min(cfg.stride, cfg.window) and state["evaluations"]:
        result["verdict"] = NO_NEW_DATA
    if result["n_distinct"] < cfg.min_window or result["verdict"] == NO_NEW_DATA:
        live.save_state(store, agent, state)
        export_metrics(agent, {"flywheel_drift_episode": float(result["drifted"]),
                               "flywheel_quality_invalid_rate": result["quality"]["invalid_rate"]})
        return result

    reference = reference_features(store, agent, version, cfg)
    seed = int(digest(agent, state["evaluations"], window[-1]["id"], n=8), 16)
    test = window_drift(reference, window, cfg, seed)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    state["evaluations"] += 1
    state["new"] = 0
    deferrals = quality.deferral_shift(window, certified_coverage(store, agent), cfg.alpha)
    if deferrals["shifted"]:  # the student defers more than it was certified to: calibration no longer holds
        test = {**test, "drifted": True, "drifted_features": [*test["drifted_features"], quality.DEFERRAL_RATE]}
    result.update({k: test[k] for k in ("drift_share", "pvalue", "drifted_features", "tests", "n_reference")},
                  window_drifted=test["drifted"], n_distinct=test["n_live"], deferrals=deferrals)
    if cfg.report == "always" or (cfg.report == "drift" and test["drifted"] and not episode.get("active")):
        result["report"] = save_report(store, agent, reference, window, stamp)
    state["history"] = [*state["history"], {
        "evaluation": state["evaluations"], "time": now, "window_end": window[-1]["ts"], "drifted": test["drifted"],
        "drift_share": test["drift_share"], "pvalue": test["pvalue"], "drifted_features": test["drifted_features"],
        "n_live": test["n_live"], "report": result["report"]}][-HISTORY:]

    state["episode"], change = episodes.advance(episode, test["drifted"], cfg.persistence, cfg.clear_windows)
    if change == episodes.START:
        _start_episode(store, cfg, state, result, now)
    elif change == episodes.END:
        _end_episode(store, cfg, state, now)
        result["ended_episode"] = state["episode"]["id"]
    elif state["episode"]["active"] and cfg.retrains_per_episode > 1:  # a long episode: more, past the cool-down
        reason = f"drift episode {state['episode']['id']} still on after {state['episode']['retrains']} retrain(s)"
        result["retrain"], _ = _maybe_retrain(store, cfg, state, state["episode"], reason, now)
    active = state["episode"]["active"]
    result.update(drifted=active, episode=state["episode"]["id"] if active else None,
                  verdict=DRIFT if active else SUSPECT if test["drifted"] else NO_DRIFT)
    live.save_state(store, agent, state)
    export_metrics(agent, {"flywheel_drift_share": test["drift_share"], "flywheel_drift_pvalue": test["pvalue"],
                           "flywheel_drift_episode": float(active),
                           "flywheel_quality_invalid_rate": result["quality"]["invalid_rate"]})
    return result
