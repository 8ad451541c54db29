"""Drift of an agent's live traffic against its training reference, with Evidently; drift routes back to the teacher.

    flywheel monitor --agent sgd_Flights

1. Reference: the train split of the agent's latest curated dataset (`reference_examples`).
   Live: the newest `window` records Serve captured for the agent (`source == "serve"`, WAL included).
2. Both become the same per-request features (`flywheel.monitor.features`) and go through Evidently's
   `DataDriftPreset`: a domain classifier for the text column, K-S / chi-square / Z tests for the others.
   The HTML report is saved to `monitor/<agent>/drift-<timestamp>.html`.
3. A share of drifted features >= `drift_share` is drift: an event `monitor/events/<agent>-<event>.json`, the
   route set to the teacher, and a retrain request queued, naming the event. Within `cooldown_s` of the last
   event that queued a retrain, drift is still recorded as an event but queues nothing (hysteresis).
4. The share is also a Ray metric, `flywheel_drift_share{agent=...}`, when this runs inside Ray.

Fewer than `min_window` live requests give the verdict "insufficient_data" and touch nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
import warnings
from typing import Any, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel import routing
from flywheel.capture.store import LogStore
from flywheel.config import MonitorConfig
from flywheel.monitor import features
from flywheel.schema import EXAMPLE
from flywheel.storage import Store

EVENTS = "monitor/events"
DRIFT, NO_DRIFT, INSUFFICIENT = "drift", "no_drift", "insufficient_data"
_GAUGE: Any = None


# -- inputs ------------------------------------------------------------------------------------------------
def latest_version(store: Store, agent: str) -> str:
    """The agent's latest curated dataset version (`datasets/<agent>/LATEST` = {"version": v})."""
    pointer = store.read_json(f"datasets/{agent}/LATEST")
    if not isinstance(pointer, dict) or not pointer.get("version"):
        raise FileNotFoundError(f"agent {agent!r} has no curated dataset under {store.uri}/datasets/{agent} "
                                f"(no LATEST pointer): run `flywheel curate --agents {agent}` first")
    return str(pointer["version"])


def reference_examples(store: Store, agent: str, version: str | None = None) -> pa.Table:
    """The train split (schema.EXAMPLE) of the agent's latest (or the given) curated dataset version.

    With `latest_version`, the one place that knows the dataset layout: `datasets/<agent>/<v>/train.parquet`.
    """
    version = version or latest_version(store, agent)
    rel = f"datasets/{agent}/{version}/train.parquet"
    try:
        with store.fs.open(store.path(rel), "rb") as f:
            table = pq.read_table(f, schema=EXAMPLE)
    except FileNotFoundError:
        raise FileNotFoundError(f"agent {agent!r}: dataset version {version!r} has no train split at "
                                f"{store.path(rel)}: re-run `flywheel curate --agents {agent}`") from None
    if table.num_rows == 0:
        raise ValueError(f"agent {agent!r}: dataset version {version!r} has an empty train split; "
                         f"capture more traffic and run `flywheel curate --agents {agent}`")
    return table


def live_records(store: Store, agent: str, window: int) -> list[dict]:
    """The newest `window` records Serve captured for the agent (Parquet and WAL), oldest first."""
    table = LogStore(store).read(agent)
    rows = [r for r in table.to_pylist() if r.get("source") == "serve"]
    rows.sort(key=lambda r: r.get("timestamp") or 0.0)  # stable: equal timestamps keep their order
    return rows[-window:] if window > 0 else rows


# -- Evidently -----------------------------------------------------------------------------------------------
def run_report(reference: pd.DataFrame, live: pd.DataFrame, drift_share: float,
               columns: Sequence[str] = tuple(features.COLUMNS)) -> tuple[Any, float, list[str]]:
    """Evidently's DataDriftPreset over the feature frames -> (snapshot, share of drifted features, drifted names)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(text_columns=features.TEXT_COLUMNS, numerical_columns=features.NUMERICAL_COLUMNS,
                                categorical_columns=features.CATEGORICAL_COLUMNS)
    report = Report([DataDriftPreset(columns=list(columns), drift_share=drift_share)], include_tests=True)
    try:
        with warnings.catch_warnings():  # constant columns (e.g. n_tools) make scipy warn about 0/0
            warnings.simplefilter("ignore")
            snapshot = report.run(Dataset.from_pandas(live, data_definition=definition),
                                  Dataset.from_pandas(reference, data_definition=definition))
    except ValueError as e:  # no words on either side (requests without user text): the other features only
        if "empty vocabulary" not in str(e) or "text" not in columns:
            raise
        return run_report(reference, live, drift_share, [c for c in columns if c != "text"])
    return (snapshot, *drift_summary(snapshot.dict()))


def drift_summary(result: dict) -> tuple[float, list[str]]:
    """(share of drifted columns, drifted column names) from an Evidently 0.7 `snapshot.dict()`."""
    share = next(float(m["value"]["share"]) for m in result["metrics"]
                 if m["config"]["type"] == "evidently:metric_v2:DriftedColumnsCount")
    drifted = []
    for test in result["tests"]:
        params = test["metric_config"]["params"]
        status = getattr(test["status"], "value", test["status"])
        if params.get("type") == "evidently:metric_v2:ValueDrift" and status == "FAIL":
            drifted.append(params["column"])
    return share, sorted(drifted)


def save_report(store: Store, agent: str, snapshot, stamp: str) -> str:
    """Write the HTML report under the home; returns its path relative to the home."""
    rel = f"monitor/{agent}/drift-{stamp}.html"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "report.html")
        snapshot.save_html(local)
        with open(local, "rb") as f:
            store.write_bytes(rel, f.read())
    return rel


# -- events, routing, metrics ----------------------------------------------------------------------------------
def drift_events(store: Store, agent: str) -> list[dict]:
    """Every drift event recorded for the agent, oldest first."""
    events = [store.read_json(f"{EVENTS}/{n}") for n in store.list(EVENTS)
              if n.startswith(f"{agent}-") and n.endswith(".json")]
    return sorted((e for e in events if e and e.get("agent") == agent), key=lambda e: e["time"])


def _record_drift(store: Store, cfg: MonitorConfig, result: dict, now: float, stamp: str) -> str:
    """Route to the teacher, queue a retrain (unless one was queued within the cool-down), then write the event.

    In that order, so a crash part-way errs towards the teacher and at-least-once retraining. Leaving the teacher
    is not monitoring's call: a promotion routes the agent back to its student.
    """
    agent = cfg.agent
    event_id = f"{stamp}-{uuid.uuid4().hex[:8]}"
    last = next((e for e in reversed(drift_events(store, agent)) if e.get("retrain")), None)
    cooling = last is not None and now - last["time"] < cfg.cooldown_s
    if routing.get_route(store, agent).get("mode") != routing.TEACHER:
        routing.set_route(store, agent, routing.TEACHER, reason=f"drift event {event_id}")
    reason = (f"drift event {event_id}: {result['drift_share']:.2f} of features drifted "
              f"({', '.join(result['drifted_features'])})")
    result["retrain"] = None if cooling else routing.queue_retrain(store, agent, event_id, reason)
    event = {**{k: result[k] for k in ("agent", "drift_share", "drifted_features", "n_reference", "n_live",
                                       "report", "dataset_version", "retrain")},
             "id": event_id, "time": now, "threshold": cfg.drift_share,
             "suppressed_by": last["id"] if cooling else None}
    store.write_json(f"{EVENTS}/{agent}-{event_id}.json", event)
    return event_id


def export_metric(agent: str, share: float) -> None:
    """Set the `flywheel_drift_share` Ray gauge; a no-op outside an initialised Ray."""
    global _GAUGE
    ray = sys.modules.get("ray")  # not imported here means no Ray to report to
    if ray is None or not ray.is_initialized():
        return
    if _GAUGE is None:
        from ray.util.metrics import Gauge

        _GAUGE = Gauge("flywheel_drift_share", description="Share of drifted features, live vs training reference",
                       tag_keys=("agent",))
    _GAUGE.set(share, tags={"agent": agent})


# -- the stage -------------------------------------------------------------------------------------------------
def check_drift(cfg: MonitorConfig, store: Store | None = None) -> dict:
    """One monitoring pass for `cfg.agent`. Returns the verdict; see the module docstring for the side effects.

    {"agent", "verdict": "drift" | "no_drift" | "insufficient_data", "drifted", "drift_share",
     "drifted_features", "n_reference", "n_live", "report", "event", "retrain", "dataset_version"}
    """
    store = store or Store(cfg.home or None)
    agent = cfg.agent
    version = latest_version(store, agent)
    reference = reference_examples(store, agent, version)
    live = live_records(store, agent, cfg.window)
    result: dict[str, Any] = {
        "agent": agent, "verdict": INSUFFICIENT, "drifted": False, "drift_share": None, "drifted_features": [],
        "n_reference": reference.num_rows, "n_live": len(live), "report": None, "event": None, "retrain": None,
        "dataset_version": version,
    }
    if len(live) < cfg.min_window:
        return result

    ref_frame, live_frame = features.feature_frames(reference.to_pylist(), live)
    snapshot, share, drifted = run_report(ref_frame, live_frame, cfg.drift_share)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    result.update(drift_share=share, drifted_features=drifted, drifted=share >= cfg.drift_share,
                  report=save_report(store, agent, snapshot, stamp))
    result["verdict"] = DRIFT if result["drifted"] else NO_DRIFT
    if result["drifted"]:
        result["event"] = _record_drift(store, cfg, result, now, stamp)
    export_metric(agent, share)
    return result
