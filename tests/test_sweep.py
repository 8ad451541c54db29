"""Sweeps (Ray Tune + Train V2, tiny model) and MLflow tracking.

One sweep of 2 trials runs once for the module: it is interrupted (deterministically, by a callback that sends
Tune's stop signal when the first trial completes) and then resumed with the same name. The tests check what
survived: the finished trial is not rerun, the best trial by the validation metric is registered as a candidate with
its hyperparameters, and the sweep and its trials are in the local MLflow store. The dataset folder is audited
(inotify, every process) while the sweep runs: selection reads the validation split and never the test split.
Tracking is also tested on its own.
"""

import json
import logging
import os
import signal

import pytest

from flywheel import tracking
from flywheel.capture.store import ingest_file
from flywheel.config import ConfigError, CurateConfig, SweepConfig
from flywheel.distill.sweep import MODULE_SETS, modules, pick_best, sweep
from flywheel.registry.registry import Registry
from flywheel.storage import Store

from conftest import SGD_LOGS
from test_split import FileOpens

try:
    from ray.tune import Callback
except ImportError:  # pragma: no cover - ray[tune] is a dependency
    Callback = object


class InterruptOnce(Callback):
    """Records every trial start; when the first trial completes, sends the driver SIGUSR1, which Tune handles
    like Ctrl-C (stop, save the experiment state). A marker file makes it fire once: Tune restores this callback
    with the experiment."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_trial_start(self, iteration, trials, trial, **info):
        with open(os.path.join(self.folder, "starts.txt"), "a") as f:
            f.write(trial.trial_id + "\n")

    def on_trial_complete(self, iteration, trials, trial, **info):
        marker = os.path.join(self.folder, "interrupted.txt")
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def swept(ray_session, tiny_model, tmp_path_factory):
    """Curate sgd_Flights (40 logs), then sweep 2 trials: interrupted after the first, then resumed."""
    from flywheel.curate.pipeline import curate

    root = tmp_path_factory.mktemp("sweep")
    home = str(root / "home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_HOME", home)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        store = Store(home)
        logs = root / "logs.jsonl"
        logs.write_text("".join([ln for ln in open(SGD_LOGS) if '"sgd_Flights"' in ln][:40]))
        ingest_file(store, str(logs))
        dataset = curate(CurateConfig(agents=("sgd_Flights",), min_examples=4), store)["sgd_Flights"]
        cfg = SweepConfig(agent="sgd_Flights", base_model=tiny_model, name="tiny", search="grid",
                          learning_rate=(1e-4, 5e-2), lora_r=(4,), lora_alpha=(8,), lora_dropout=(0.0,),
                          target_modules=("q_proj+v_proj",), epochs=(1.0,), num_samples=1, max_steps=2,
                          eval_every=1, batch_size=2, max_length=1024, eval_examples=4, max_new_tokens=4,
                          eval_batch_size=4, num_workers=1, grace_period=1, reduction_factor=2)
        with FileOpens(store.path(f"datasets/sgd_Flights/{dataset['version']}")) as opened:
            first = sweep(cfg, store, callbacks=[InterruptOnce(str(root))])
            second = sweep(cfg, store)  # the same name: Tuner.restore
            again = sweep(cfg, store)  # finished: the recorded summary, no Tune run
    starts = open(root / "starts.txt").read().split()
    interrupted_after = open(root / "interrupted.txt").read()
    return {"store": store, "cfg": cfg, "first": first, "second": second, "again": again, "starts": starts,
            "interrupted_after": interrupted_after, "home": home, "opened": opened.names, "dataset": dataset}


def test_sweep_selects_on_the_validation_split_and_never_opens_the_test_split(swept):
    # the trials' Train workers (train split) and controllers (validation split) are other processes: the audit
    # sees their opens
    assert {"train.parquet", "validation.parquet"} <= swept["opened"]
    assert "test.parquet" not in swept["opened"]
    n = swept["dataset"]["counts"]["validation"]
    assert all(t["eval_examples"] == min(n, swept["cfg"].eval_examples) for t in swept["second"]["trials"])


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(swept):
    first, second = swept["first"], swept["second"]
    done_first = [t["trial_id"] for t in first["trials"] if t["status"] == "done"]
    assert first["status"] == "interrupted" and first["registered"] is None and "rerun" in first["message"]
    assert done_first == [swept["interrupted_after"]]
    assert second["status"] == "completed" and len(second["trials"]) == 2
    assert all(t["status"] == "done" for t in second["trials"])
    # the trial that finished before the interruption was started once, and kept its results
    assert swept["starts"].count(swept["interrupted_after"]) == 1
    assert set(swept["starts"]) == {t["trial_id"] for t in second["trials"]}
    kept = next(t for t in second["trials"] if t["trial_id"] == swept["interrupted_after"])
    assert kept == next(t for t in first["trials"] if t["trial_id"] == swept["interrupted_after"])
    assert swept["again"] == second


def test_sweep_registers_the_best_trial_as_a_candidate(swept):
    second, store = swept["second"], swept["store"]
    metric = second["metric"]
    assert metric == "name_args_accuracy"  # the tool-calling agent's primary metric: the exact call
    for t in second["trials"]:
        assert 1 <= t["evaluations"] <= 2 and t["eval_loss"] > 0 and 0.0 <= t[metric] <= 1.0
    # the best by the metric's last value; a tie (a random tiny model calls no tools) goes to the lower eval_loss
    best = max(second["trials"], key=lambda t: (t[metric], -t["eval_loss"]))
    assert second["best"]["trial_id"] == best["trial_id"]
    versions = Registry(store).versions("sgd_Flights")
    assert [v["version"] for v in versions] == [second["registered"]] == ["v1"]
    entry = versions[0]
    assert entry["hyperparameters"]["learning_rate"] == best["learning_rate"]
    assert entry["hyperparameters"]["lora_r"] == best["lora_r"] == 4
    assert entry["hyperparameters"]["target_modules"] == ["q_proj", "v_proj"]
    assert entry["sweep"]["trial_id"] == best["trial_id"] and entry["sweep"]["value"] == best[metric]
    assert Registry(store).alias("sgd_Flights") is None  # a candidate, not promoted
    assert store.exists("adapters/sgd_Flights/v1/adapter_model.safetensors")
    assert store.read_json("sweeps/tiny/sweep.json")["status"] == "completed"


def test_sweep_and_its_trials_are_tracked_in_mlflow(swept):
    from mlflow.tracking import MlflowClient

    second = swept["second"]
    uri = tracking.tracking_uri(swept["store"])
    assert uri == f"file://{swept['home']}/mlruns"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("flywheel-sgd_Flights")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("flywheel.stage") == "sweep"]
    children = [r for r in runs if r.data.tags.get("flywheel.stage") == "sweep_trial"]
    assert len(parents) == 1 and parents[0].info.run_id == second["mlflow_run_id"]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["flywheel.registered"] == "v1"
    assert parent.data.params["learning_rate"] == "0.0001,0.05"
    assert parent.data.params["metric"] == second["metric"]
    assert parent.data.metrics["best.eval_loss"] == pytest.approx(second["best"]["eval_loss"])
    assert "adapter/adapter_config.json" in [a.path for a in client.list_artifacts(parent.info.run_id, "adapter")]
    # one child run per trial, however many times the sweep ran
    assert sorted(r.data.tags["flywheel.trial_id"] for r in children) == sorted(t["trial_id"] for t in second["trials"])
    for r in children:
        trial = next(t for t in second["trials"] if t["trial_id"] == r.data.tags["flywheel.trial_id"])
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert float(r.data.params["learning_rate"]) == trial["learning_rate"]
        assert r.data.metrics["eval_loss"] == pytest.approx(trial["eval_loss"])
        history = client.get_metric_history(r.info.run_id, "function_name_accuracy")
        assert sorted(m.step for m in history) == list(range(1, trial["evaluations"] + 1))


# -- no Ray ------------------------------------------------------------------------------------------------------
def test_pick_best_uses_the_metric_then_eval_loss_and_skips_unfinished_trials():
    def trial(tid, acc, loss, status="done"):
        return {"trial_id": tid, "status": status, "metrics": {"accuracy": acc, "eval_loss": loss}}

    trials = [trial("a", 0.5, 1.0), trial("b", 0.8, 2.0), trial("c", 0.8, 1.5), trial("d", 0.9, 0.1, "unfinished"),
              trial("e", float("nan"), 0.1)]
    assert pick_best(trials, "accuracy", "max")["trial_id"] == "c"
    assert pick_best(trials, "eval_loss", "min")["trial_id"] == "e"  # its accuracy is NaN, its loss is fine
    assert pick_best([trial("x", 1.0, 1.0, "error")], "accuracy", "max") is None
    assert modules("all") == MODULE_SETS["all"] and modules("q_proj+v_proj") == ("q_proj", "v_proj")


def test_sweep_config_names_the_bad_key():
    with pytest.raises(ConfigError, match="search"):
        SweepConfig(agent="a", search="bayes")
    with pytest.raises(ConfigError, match="target_modules"):
        SweepConfig(agent="a", target_modules=("q_proj+",))
    with pytest.raises(ConfigError, match="lora_dropout"):
        SweepConfig(agent="a", lora_dropout=(1.0,))


def test_tracking_logs_runs_with_params_metrics_and_artifacts(tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = Store(str(tmp_path / "home"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    run_id = tracking.log_training_run("sgd_Flights", "sgd_Flights-v1", {"lora_r": 4, "target_modules": ("q", "v")},
                                       {"loss": 1.25, "step": 4, "note": "not a number"}, adapter_dir=str(adapter),
                                       tags={"registry_version": "v1"}, store=store)
    report = {"agent": "sgd_Flights", "candidate_version": "v1", "task": "tool_call",
              "systems": ["teacher", "candidate"],
              "teacher": {"function_name_accuracy": 1.0}, "candidate": {"function_name_accuracy": 0.75, "n": 4},
              "gate": {"passed": False}}
    eval_id = tracking.log_evaluation(report, "# report\n", store=store)
    client = MlflowClient(f"file://{store.uri}/mlruns")
    run = client.get_run(run_id)
    assert run.data.params == {"lora_r": "4", "target_modules": "q,v"}
    assert run.data.metrics == {"loss": 1.25, "step": 4.0} and run.data.tags["registry_version"] == "v1"
    assert [a.path for a in client.list_artifacts(run_id, "adapter")] == ["adapter/adapter_config.json"]
    ev = client.get_run(eval_id)
    assert ev.data.metrics["candidate.function_name_accuracy"] == 0.75 and ev.data.metrics["gate_passed"] == 0.0
    assert sorted(a.path for a in client.list_artifacts(eval_id, "report")) == ["report/eval.json", "report/eval.md"]
    # MLFLOW_TRACKING_URI is honoured, "off" turns tracking off, and a broken store only warns
    other = f"file://{tmp_path}/elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert tracking.tracking_uri(store) == other
    assert MlflowClient(other).get_run(tracking.log_run("sgd_Flights", "x", metrics={"m": 1}, store=store))
    assert tracking.log_run("sgd_Flights", "x", metrics={"m": 1}, store=store, uri="off") is None
    with caplog.at_level(logging.WARNING, logger="flywheel.tracking"):
        broken = "file:///dev/null/mlruns"  # a path under a file: MLflow cannot create it
        assert tracking.log_run("sgd_Flights", "x", metrics={"m": 1}, store=store, uri=broken) is None
    assert "MLflow tracking failed" in caplog.text
