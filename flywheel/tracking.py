"""Experiment tracking in MLflow: training runs, sweeps (one parent run, one child run per trial), evaluations.

    pip install 'mlflow>=3.5,<4'     # the UI: mlflow-skinny (our dependency) has none
    MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file://$FLYWHEEL_HOME/mlruns

Where runs go, first match wins: the job's `tracking_uri` (`off` turns tracking off), `$MLFLOW_TRACKING_URI`, then
a local file store at `<home>/mlruns`. MLflow 3 keeps the file store in maintenance mode and refuses it unless
`MLFLOW_ALLOW_FILE_STORE=true`, which this module sets for file URIs; its `sqlite:///...` default needs SQLAlchemy,
which `mlflow-skinny` (our dependency) does not ship: point `tracking_uri` at `sqlite:///...` or an MLflow server
once the full `mlflow` is installed. An object-store home has no local default: set `tracking_uri`.

One experiment per agent (`flywheel-<agent>`). Tracking never fails a job: any MLflow error is logged as a warning
and the function returns None. Everything here runs in the process that calls it (the driver), not in Ray workers.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Any, Iterable, Mapping

from flywheel.storage import Store

logger = logging.getLogger(__name__)
OFF = ("off", "none", "false")
MAX_PARAM_CHARS = 6000


def tracking_uri(store: Store | None = None, uri: str = "") -> str | None:
    """The MLflow tracking URI to use, or None when tracking is off (or has nowhere to go)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.strip().lower() in OFF:
        return None
    if uri:
        return uri
    store = store or Store()
    if not store.local:
        logger.warning("MLflow tracking is off: the home %s is not local; set tracking_uri (or MLFLOW_TRACKING_URI) "
                       "to an MLflow server or sqlite:/// file", store.uri)
        return None
    return "file://" + store.path("mlruns").replace("file://", "")


def experiment_name(agent: str) -> str:
    return f"flywheel-{agent}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module docstring
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        out[str(k)] = str(v)[:MAX_PARAM_CHARS]
    return out


def _metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries (bools as 0/1); everything else is not a metric."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[str(k)] = float(v)
    return out


def _warn(what: str, e: Exception) -> None:
    logger.warning("MLflow tracking failed (%s): %s: %s; the job goes on without it", what, type(e).__name__, e)


def log_run(agent: str, run_name: str, *, params: Mapping[str, Any] | None = None,
            metrics: Mapping[str, Any] | None = None, history: Iterable[tuple[int, Mapping[str, Any]]] = (),
            artifacts: Mapping[str, str] | None = None, tags: Mapping[str, Any] | None = None,
            parent_run_id: str | None = None, run_id: str | None = None, finished: bool = True,
            store: Store | None = None, uri: str = "") -> str | None:
    """Create (or, with `run_id`, add to) one MLflow run. `history` holds (step, metrics) pairs; `artifacts` maps a
    folder in the run's artifacts to a local file or folder. Returns the run id, or None when tracking is off or
    failed (a warning is logged: tracking never stops the job)."""
    import time

    try:
        resolved = tracking_uri(store, uri)
        if resolved is None:
            return None
        from mlflow.entities import Metric, Param

        client = _client(resolved)
        if run_id is None:
            all_tags = {**{k: str(v) for k, v in (tags or {}).items()}, "flywheel.agent": agent}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run_id = client.create_run(_experiment_id(client, experiment_name(agent)), run_name=run_name,
                                       tags=all_tags).info.run_id
        elif tags:
            for k, v in tags.items():
                client.set_tag(run_id, k, str(v))
        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, step) for step, m in history for k, v in _metrics(m).items()]
        rows += [Metric(k, v, now, 0) for k, v in _metrics(metrics or {}).items()]
        pars = [Param(k, v) for k, v in _params(params or {}).items()]
        for i in range(0, max(len(rows), len(pars)), 100):  # MLflow caps a batch at 1000 metrics / 100 params
            client.log_batch(run_id, metrics=rows[i:i + 100], params=pars[i:i + 100])
        for dest, path in (artifacts or {}).items():
            if os.path.isdir(path):
                client.log_artifacts(run_id, path, dest)
            elif os.path.exists(path):
                client.log_artifact(run_id, path, dest or None)
        if finished:
            client.set_terminated(run_id)
        return run_id
    except Exception as e:  # noqa: BLE001 - tracking must never fail the job
        _warn(f"run {run_name!r} of {agent}", e)
        return None


def log_training_run(agent: str, run_name: str, hyperparameters: Mapping[str, Any], metrics: Mapping[str, Any],
                     adapter_dir: str | None = None, tags: Mapping[str, Any] | None = None,
                     store: Store | None = None, uri: str = "") -> str | None:
    """One `flywheel distill` run: its hyperparameters, final train metrics and the adapter folder (`adapter/`)."""
    return log_run(agent, f"distill {run_name}", params=hyperparameters, metrics=metrics,
                   artifacts={"adapter": adapter_dir} if adapter_dir else None,
                   tags={"flywheel.stage": "distill", "flywheel.run_name": run_name, **(tags or {})},
                   store=store, uri=uri)


def log_sweep_trial(agent: str, sweep: str, trial_id: str, params: Mapping[str, Any],
                    history: Iterable[tuple[int, Mapping[str, Any]]], parent_run_id: str | None = None,
                    tags: Mapping[str, Any] | None = None, store: Store | None = None, uri: str = "") -> str | None:
    """One Tune trial as a child run of its sweep: the trial's hyperparameters and every evaluation it reported
    (step = the evaluation's number)."""
    return log_run(agent, f"{sweep} {trial_id}", params=params, history=history,
                   tags={"flywheel.stage": "sweep_trial", "flywheel.sweep": sweep, "flywheel.trial_id": trial_id,
                         **(tags or {})}, parent_run_id=parent_run_id, store=store, uri=uri)


def log_evaluation(report: Mapping[str, Any], markdown: str | None = None, store: Store | None = None,
                   uri: str = "") -> str | None:
    """One `flywheel evaluate` report: every system's numeric metrics as `<system>.<metric>`, the gate's verdict,
    and the report itself (`report/eval.json`, `report/eval.md`) as artifacts."""
    import json

    systems = report.get("systems") or [k for k in ("teacher", "base", "production", "candidate") if k in report]
    metrics = {f"{name}.{k}": v for name in systems if isinstance(report.get(name), dict)
               for k, v in report[name].items()}
    gate = report.get("gate") or {}
    metrics["gate_passed"] = bool(gate.get("passed"))
    metrics["promoted"] = bool(report.get("promoted"))
    params = {k: report.get(k) for k in ("candidate_version", "dataset_version", "base_model", "task", "metric",
                                          "production_version", "n_expected") if k in report}
    try:
        tmp = tempfile.mkdtemp(prefix="flywheel-eval-report-")
        with open(os.path.join(tmp, "eval.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        if markdown is not None:
            with open(os.path.join(tmp, "eval.md"), "w") as f:
                f.write(markdown)
    except OSError as e:
        _warn("writing the evaluation report", e)
        return None
    try:
        return log_run(report.get("agent", "unknown"), f"evaluate {report.get('candidate_version')}", params=params,
                       metrics=metrics, artifacts={"report": tmp}, store=store, uri=uri,
                       tags={"flywheel.stage": "evaluate",
                             "flywheel.gate": "passed" if gate.get("passed") else "failed"})
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
