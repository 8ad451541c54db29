"""Sweeps on Ray Tune: ASHA over LoRA rank/alpha/dropout, learning rate, target modules and epochs for one agent.

    flywheel sweep --agent sgd_Flights --num-samples 8 --json
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/sweep.yaml

Each Tune trial (`_trial`, a function trainable holding `trial_cpus`) builds the same `TorchTrainer` as
`flywheel distill` (`train.build_trainer`) with the trial's hyperparameters and runs it. Every checkpoint the
training loop reports (at each epoch end, or every `eval_every` steps) is scored on the agent's VALIDATION split
before Tune sees it: `ScoreThenReport`, a Ray Train callback, runs in the trial's Train controller (on the trial's
node, in the CPU the trial reserved while its driver waits on `fit()`), scores the adapter with
`ValidationScorer` (answers generated as `flywheel evaluate` generates them, the task's metrics, and `eval_loss`,
the teacher-forced loss of the teacher's answers) and forwards training and validation metrics to Tune as Ray's
`TuneReportCallback` does. So ASHA compares trials on the validation metric after the same number of evaluations
(`training_iteration`) and stops the weak ones early. The test split is never read here: it is left to
`flywheel evaluate`, so the gate's figures are not the ones the sweep chose on. A dataset without validation
examples (an older train/eval version, or too few sessions) is refused before any trial starts.

The best trial (the objective's last value; ties, common on small validation splits, go to the lower
`eval_loss`) has its last adapter registered as a new version with the trial's hyperparameters in its lineage;
nothing is promoted (`flywheel evaluate --promote` gates it). Everything lives under `sweeps/<name>/` on the
store: Tune's experiment (`tune/`), one Train run per trial (`trial-<id>/`) and `sweep.json` (settings, status,
best trial, registered version). Rerunning with the same name restores the experiment (`Tuner.restore`): finished
trials are kept, interrupted ones restart from their last checkpoint, and a finished sweep returns its summary.
The sweep is an MLflow run with one child run per trial (`flywheel.tracking`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any, Sequence

from flywheel.config import ConfigError, DistillConfig, SweepConfig
from flywheel.datasets import VALIDATION, open_split, read_manifest, resolve_version
from flywheel.storage import Store

SEARCHED = ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "epochs")
MODULE_SETS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "all": DistillConfig.__dataclass_fields__["target_modules"].default}
OPERATIONAL = ("home", "tracking_uri", "register", "max_concurrent_trials")  # a resumed sweep may change these
TRAIN_KEYS = ("loss", "epoch", "step")


# -- pure pieces -----------------------------------------------------------------------------------------------
def modules(choice: str) -> tuple[str, ...]:
    """A target-module choice: "all", "attention" or "+"-joined module names."""
    return tuple(MODULE_SETS.get(choice) or choice.split("+"))


def trial_config(job: dict, params: dict, run_name: str) -> DistillConfig:
    """The DistillConfig of one trial: the sweep's fixed settings plus the trial's sampled hyperparameters."""
    c = job["cfg"]
    return DistillConfig(
        agent=c["agent"], home=job["home"], dataset_version=job["version"], base_model=job["base_model"],
        run_name=run_name, num_workers=c["num_workers"], threads_per_worker=c["threads_per_worker"],
        memory_per_worker_mb=c["memory_per_worker_mb"],
        epochs=float(params["epochs"]), max_steps=c["max_steps"], batch_size=c["batch_size"],
        learning_rate=float(params["learning_rate"]), lora_r=int(params["lora_r"]),
        lora_alpha=int(params["lora_alpha"]), lora_dropout=float(params["lora_dropout"]),
        target_modules=modules(params["target_modules"]), max_length=c["max_length"], max_history=c["max_history"],
        bf16=c["bf16"], checkpoint_every=c["eval_every"], seed=c["seed"])


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pick_best(trials: Sequence[dict], metric: str, mode: str) -> dict | None:
    """The finished trial with the best last value of `metric`; ties go to the lower eval_loss, then to the earlier
    trial. Errored, unfinished and unscored trials are never picked."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [t for t in trials if t["status"] == "done" and _finite(t["metrics"].get(metric))]
    if not scored:
        return None

    def key(t: dict) -> tuple[float, float]:
        loss = t["metrics"].get("eval_loss")
        return sign * t["metrics"][metric], -loss if _finite(loss) else -math.inf

    return max(scored, key=key)  # max keeps the first of equal keys


def _choices(cfg: SweepConfig) -> dict[str, list]:
    values = {k: list(getattr(cfg, k)) for k in SEARCHED}
    if cfg.max_steps > 0:
        values["epochs"] = [values["epochs"][0]]  # steps are capped: epochs would only relabel identical trials
    return values


def search_space(cfg: SweepConfig) -> dict:
    import ray.tune

    pick = ray.tune.grid_search if cfg.search == "grid" else ray.tune.choice
    return {k: pick(v) if len(v) > 1 else v[0] for k, v in _choices(cfg).items()}


def planned_trials(cfg: SweepConfig) -> int:
    """How many trials the search makes: num_samples draws, or num_samples passes over the grid."""
    return cfg.num_samples * (math.prod(len(v) for v in _choices(cfg).values()) if cfg.search == "grid" else 1)


# -- scoring a checkpoint ---------------------------------------------------------------------------------------
class ValidationScorer:
    """Scores adapters on an agent's validation split: answers generated like `flywheel evaluate` generates them
    (same prompts, greedy decoding, `HFEngine`), the task's metrics, the share of parseable answers, and
    `eval_loss`: the mean per-token loss of the teacher's answers, a smooth signal where small-split accuracies tie."""

    def __init__(self, store: Store, agent: str, version: str, base_model: str, max_examples: int = 0,
                 max_new_tokens: int = 128, batch_size: int = 8, max_history: int = 10, max_length: int = 768,
                 threads: int = 0):
        import torch

        from flywheel.distill.data import encode
        from flywheel.inference.engine import HFEngine
        from flywheel.prompts import prompt_turns

        if threads:
            torch.set_num_threads(threads)
        split = open_split(store, agent, version, VALIDATION).require("the sweep's objective")
        examples = split.rows()
        examples = examples[:max_examples] if max_examples else examples
        if not examples:
            raise ValueError(f"{agent}: the validation split of dataset {version} has no {split.task!r} example to "
                             f"score")
        self.task, self.n = split.task, len(examples)
        self.expected = [e["target"] for e in examples]
        self.tools = [json.loads(e.get("tools_json") or "[]") for e in examples]
        self.prompts = [prompt_turns(e, max_history) for e in examples]
        self.base_model, self.batch_size, self.max_new_tokens = base_model, batch_size, max_new_tokens
        self.engine = HFEngine(base_model)
        self.encoded = [x for x in (encode(self.engine.tokenizer, e, max_length, max_history) for e in examples) if x]
        self._loss_model = None
        self._calls = 0

    def __call__(self, adapter_dir: str) -> dict[str, float]:
        from flywheel.metrics import score
        from flywheel.inference.answers import generate_answers

        self._calls += 1
        name = f"checkpoint-{self._calls}"
        self.engine.load_adapter(name, adapter_dir)
        try:
            answers = generate_answers(self.engine, self.prompts, name, self.batch_size, self.max_new_tokens)["answers"]
        finally:
            self.engine.unload_adapter(name)
        out = {k: v for k, v in score(self.task, self.expected, answers, self.tools).items() if k != "n"}
        out["valid_answers"] = sum(bool(a.get("valid")) for a in answers) / len(answers)
        out["eval_loss"] = self.loss(adapter_dir)
        out["eval_examples"] = self.n
        return out

    def loss(self, adapter_dir: str) -> float:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from flywheel.distill.data import mean_answer_loss
        from flywheel.models import local_model

        if not self.encoded:
            return math.nan
        if self._loss_model is None:
            self._loss_model = AutoModelForCausalLM.from_pretrained(local_model(self.base_model), dtype=torch.float32)
        model = PeftModel.from_pretrained(self._loss_model, adapter_dir).eval()
        try:
            total, tokens = mean_answer_loss(model, self.encoded, self.engine.tokenizer.pad_token_id, self.batch_size)
        finally:
            self._loss_model = model.unload()  # the plain base model again, for the next checkpoint
        return total / max(tokens, 1)


def _score_then_report(job: dict) -> Any:
    """A `TuneReportCallback` that scores each reported checkpoint before forwarding the metrics to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoreThenReport(TuneReportCallback):
        # Runs in the trial's Train controller actor (placed on the trial's node); the scorer loads there, once.
        def __init__(self, job: dict):
            super().__init__()
            self.job, self.scorer = job, None

        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is None:  # the training loop reports a checkpoint every time; nothing to score otherwise
                return
            c = self.job["cfg"]
            store = Store(self.job["home"])
            if self.scorer is None:
                self.scorer = ValidationScorer(store, c["agent"], self.job["version"], self.job["base_model"],
                                               c["eval_examples"], c["max_new_tokens"], c["eval_batch_size"],
                                               c["max_history"], c["max_length"], max(1, int(c["trial_cpus"])))
            with checkpoint.as_directory() as d:
                scores = self.scorer(os.path.join(d, "adapter"))
            base = store.pyarrow_fs()[1].rstrip("/")
            rel = checkpoint.path[len(base) + 1:] if checkpoint.path.startswith(base + "/") else checkpoint.path
            super().after_report(run_context, [{**metrics[0], **scores, "adapter_checkpoint": rel}], None)

    return ScoreThenReport(job)


def _trial(config: dict, job: dict | None = None) -> None:
    """One Tune trial: a Ray Train run with the trial's hyperparameters; its Train run resumes if it exists."""
    import ray.tune

    from flywheel.distill.train import build_trainer

    run_name = f"trial-{ray.tune.get_context().get_trial_id()}"
    cfg = trial_config(job, {k: config[k] for k in SEARCHED}, run_name)
    build_trainer(cfg, Store(job["home"]), [(cfg.agent, job["version"])], run_name, storage=f"sweeps/{job['name']}",
                  callbacks=(_score_then_report(job),)).fit()


# -- the sweep --------------------------------------------------------------------------------------------------
def _trials(results: Any, statuses: dict[str, str], keys: Sequence[str]) -> list[dict]:
    rows = []
    for r in results:
        m = dict(r.metrics or {})
        status = statuses.get(m.get("trial_id"), "PENDING")
        history = []
        if r.metrics_dataframe is not None:
            for rec in r.metrics_dataframe.to_dict("records"):
                history.append((int(rec.get("training_iteration") or len(history) + 1),
                                {k: rec[k] for k in keys if k in rec and _finite(rec[k])}))
        rows.append({"trial_id": m.get("trial_id", "?"), "params": {k: (r.config or {}).get(k) for k in SEARCHED},
                     "status": {"TERMINATED": "done", "ERROR": "error"}.get(status, "unfinished"),
                     "evaluations": m.get("training_iteration", 0), "metrics": {k: m[k] for k in keys if k in m},
                     "adapter_checkpoint": m.get("adapter_checkpoint"), "history": history,
                     "error": f"{type(r.error).__name__}: {str(r.error)[:300]}" if r.error else None})
    return rows


def _tuner(cfg: SweepConfig, job: dict, store: Store, callbacks: Sequence) -> Any:
    import ray
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    pafs, base = store.pyarrow_fs()
    root = f"{base}/sweeps/{job['name']}"
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_trial, job=job), {"cpu": job["cfg"]["trial_cpus"]})
    if ray.tune.Tuner.can_restore(f"{root}/tune", storage_filesystem=pafs):
        # Finished trials are kept, unfinished ones run again (their Train runs resume from the last checkpoint);
        # errored ones stay errored (Tune already retried them once). The restored run keeps the original
        # TuneConfig and RunConfig (callbacks included); ASHA's rung history is not part of Tune's saved state.
        return ray.tune.Tuner.restore(f"{root}/tune", trainable, resume_unfinished=True, resume_errored=False,
                                      storage_filesystem=pafs)
    # Each trial holds trial_cpus and its Train workers hold their own, outside the trial: with no cap, Tune
    # starts as many trials as CPUs and their worker groups wait forever for CPUs the trials hold.
    c = job["cfg"]
    per_trial = c["trial_cpus"] + c["num_workers"] * c["threads_per_worker"]
    concurrent = cfg.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 0) // per_trial))
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=10_000, grace_period=cfg.grace_period,
                               reduction_factor=cfg.reduction_factor) if cfg.scheduler == "asha" else FIFOScheduler())
    return ray.tune.Tuner(
        trainable, param_space=search_space(cfg),
        tune_config=ray.tune.TuneConfig(metric=job["metric"], mode=job["mode"], scheduler=scheduler,
                                        # the cap goes to the generator: Tune ignores max_concurrent_trials
                                        # when given a BasicVariantGenerator instance
                                        search_alg=BasicVariantGenerator(random_state=cfg.seed,
                                                                         max_concurrent=concurrent),
                                        num_samples=cfg.num_samples),
        run_config=ray.tune.RunConfig(name="tune", storage_path=root, storage_filesystem=pafs,
                                      failure_config=ray.tune.FailureConfig(max_failures=1),
                                      callbacks=list(callbacks)),
    )


def _saved_statuses(store: Store, name: str) -> dict[str, str]:
    """Each trial's status as Tune saved it (TERMINATED, ERROR, RUNNING, PENDING, ...). The saved state, not the
    ResultGrid: after an interruption Tune stops the running trials in memory, but saves them as running."""
    from ray.tune import ExperimentAnalysis

    pafs, base = store.pyarrow_fs()
    analysis = ExperimentAnalysis(f"{base}/sweeps/{name}/tune", storage_filesystem=pafs)
    return {t.trial_id: t.status for t in analysis.trials}


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _check_resumable(state: dict, job: dict) -> None:
    old, new = state["job"], job
    changed = sorted(k for k in set(old["cfg"]) | set(new["cfg"])
                     if k not in OPERATIONAL and old["cfg"].get(k) != new["cfg"].get(k))
    changed += [k for k in ("version", "base_model", "metric") if old.get(k) != new.get(k)]
    if changed:
        diff = ", ".join(f"{k}: {old['cfg'].get(k, old.get(k))!r} -> {new['cfg'].get(k, new.get(k))!r}"
                         for k in changed)
        raise ConfigError(f"sweep {job['name']!r} already exists with other settings ({diff}); rerun it with its "
                          f"settings to resume it, or give this search a new --name")


def sweep(cfg: SweepConfig, store: Store | None = None, callbacks: Sequence = ()) -> dict:
    """Run (or resume) a sweep for one agent and register its best adapter. Returns a summary.

    `callbacks` are extra Ray Tune callbacks for a new sweep (the tests use one to interrupt a sweep at a known
    point); Tune saves them with the experiment, so a resumed sweep runs the original ones.
    """
    import ray

    from flywheel import tracking
    from flywheel.metrics import METRICS, PRIMARY
    from flywheel.models import resolve_model_path

    store = store or Store(cfg.home or None)
    version = resolve_version(store, cfg.agent, cfg.dataset_version)
    name = cfg.name or f"{cfg.agent}-{version}"
    task = read_manifest(store, cfg.agent, version)["task"]
    metric = cfg.metric or PRIMARY[task]
    if metric not in (*METRICS[task], "eval_loss"):
        raise ConfigError(f"metric: {metric!r} is not a metric of {cfg.agent}'s task {task!r}; one of "
                          f"{[*METRICS[task], 'eval_loss']}")
    job = _plain({"cfg": dataclasses.asdict(cfg), "home": store.uri, "version": version, "name": name,
                  "base_model": resolve_model_path(cfg.base_model), "task": task, "metric": metric,
                  "mode": "min" if metric == "eval_loss" else "max"})
    state_rel = f"sweeps/{name}/sweep.json"
    state = store.read_json(state_rel)
    if state:
        _check_resumable(state, job)
        job = {**state["job"], "cfg": {**state["job"]["cfg"], **{k: job["cfg"][k] for k in OPERATIONAL}}}
        if state["status"] == "completed":
            return state["summary"]
    else:
        state = {"name": name, "job": job, "status": "running", "created": time.time(), "tracked": {}}
    open_split(store, cfg.agent, version, VALIDATION).require("the sweep's objective")  # before any trial starts
    uri = cfg.tracking_uri
    if not state.get("mlflow_run_id"):
        searched = {k: v for k, v in job["cfg"].items() if k not in ("home", "agent", "base_model", "tracking_uri")}
        state["mlflow_run_id"] = tracking.log_run(
            cfg.agent, f"sweep {name}", params={**searched, "dataset_version": version, "metric": metric},
            tags={"flywheel.stage": "sweep", "flywheel.sweep": name}, finished=False, store=store, uri=uri)
    state["status"] = "running"
    store.write_json(state_rel, state)

    if not ray.is_initialized():
        ray.init(configure_logging=False)
    started = time.time()
    results = _tuner(cfg, job, store, callbacks).fit()
    keys = (*METRICS[task], "eval_loss", "valid_answers", "eval_examples", *TRAIN_KEYS)
    trials = _trials(results, _saved_statuses(store, name), keys)
    _track_trials(cfg, store, name, trials, state)
    summary = {"agent": cfg.agent, "name": name, "dataset_version": version, "task": task, "metric": metric,
               "mode": job["mode"], "status": "completed", "sweep_s": round(time.time() - started, 1),
               "experiment": store.path(f"sweeps/{name}/tune"), "mlflow_run_id": state["mlflow_run_id"],
               "trials": [{"trial_id": t["trial_id"], "status": t["status"], "evaluations": t["evaluations"],
                           **t["params"], **t["metrics"]} for t in trials],
               "best": None, "registered": None}
    # Tune creates trials lazily: an interrupted sweep has unfinished trials, or fewer than planned
    missing = planned_trials(SweepConfig(**job["cfg"])) - sum(t["status"] != "unfinished" for t in trials)
    if missing > 0:
        summary["status"] = "interrupted"
        summary["message"] = (f"{missing} trial(s) did not finish; rerun the same command (sweep name "
                              f"{name!r}) to resume")
        state |= {"status": "interrupted", "summary": summary}
        store.write_json(state_rel, state)
        return summary
    _publish_best(cfg, store, job, trials, state, summary)
    state |= {"status": "completed", "summary": summary}
    store.write_json(state_rel, state)
    return summary


def _track_trials(cfg: SweepConfig, store: Store, name: str, trials: list[dict], state: dict) -> None:
    """Log each finished trial once as a child run of the sweep's tracking run (ids kept in `state`)."""
    from flywheel import tracking

    for t in trials:
        if t["status"] != "unfinished" and t["trial_id"] not in state["tracked"]:
            run_id = tracking.log_sweep_trial(cfg.agent, name, t["trial_id"], t["params"], t["history"],
                                              parent_run_id=state["mlflow_run_id"],
                                              tags={"flywheel.status": t["status"]}, store=store,
                                              uri=cfg.tracking_uri)
            if run_id:
                state["tracked"][t["trial_id"]] = run_id


def _publish_best(cfg: SweepConfig, store: Store, job: dict, trials: list[dict], state: dict, summary: dict) -> None:
    """The best trial (on validation) into `summary`; its adapter registered (`cfg.register`) and tracked."""
    from flywheel import tracking

    name, metric = job["name"], job["metric"]
    best = pick_best(trials, metric, job["mode"])
    if best is None:
        raise ValueError(f"sweep {name!r}: no trial finished with a {metric!r} score; errors: "
                         f"{[t['error'] for t in trials if t['error']]}")
    summary["best"] = {"trial_id": best["trial_id"], **best["params"], **best["metrics"]}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = store.local_copy(f"{best['adapter_checkpoint']}/adapter", os.path.join(tmp, "adapter"))
        if cfg.register:
            summary["registered"] = _register(store, job, best, adapter)["version"]
        if state["mlflow_run_id"]:
            tracking.log_run(cfg.agent, f"sweep {name}", run_id=state["mlflow_run_id"],
                             params={f"best.{k}": v for k, v in best["params"].items()},
                             metrics={f"best.{k}": v for k, v in best["metrics"].items()},
                             artifacts={"adapter": adapter}, store=store, uri=cfg.tracking_uri,
                             tags={"flywheel.best_trial": best["trial_id"],
                                   "flywheel.registered": summary["registered"] or "-"})


def _register(store: Store, job: dict, best: dict, adapter: str) -> dict:
    """Register the best trial's adapter once: a rerun after a crash finds the version it already registered."""
    from flywheel.registry.registry import Registry

    registry, agent = Registry(store), job["cfg"]["agent"]
    for entry in registry.versions(agent):
        if (entry.get("sweep") or {}).get("name") == job["name"] and entry["sweep"]["trial_id"] == best["trial_id"]:
            return entry
    cfg = trial_config(job, best["params"], f"trial-{best['trial_id']}")
    hyper = {k: v for k, v in dataclasses.asdict(cfg).items()
             if k not in ("home", "agent", "base_model", "tracking_uri")}  # as distill() records them
    return registry.register(agent, adapter, {
        "dataset_version": job["version"], "base_model": job["base_model"], "run_name": f"{job['name']}/{cfg.run_name}",
        "hyperparameters": hyper, "train_metrics": {k: best["metrics"][k] for k in TRAIN_KEYS if k in best["metrics"]},
        "sweep": {"name": job["name"], "trial_id": best["trial_id"], "metric": job["metric"], "mode": job["mode"],
                  "value": best["metrics"][job["metric"]], "validation": best["metrics"], "searched": best["params"]}})
