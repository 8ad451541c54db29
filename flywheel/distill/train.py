"""Distillation on Ray Train: a LoRA adapter per agent, trained on the teacher's answers (sequence-level KD), plus
the teacher's logits when a local teacher model is configured (token-level KD).

    flywheel distill --agent sgd_Flights --epochs 3 --json
    ray job submit --working-dir . -- python jobs/distill.py --config jobs/distill.yaml

`TorchTrainer` runs `train_loop_per_worker` on `num_workers` workers with one of two strategies: `ddp` (DDP over
gloo on CPU with bf16 autocast, NCCL on GPU) or `deepspeed` (ZeRO stage 1/2/3 from config, the same code on CPU and
GPU). `grad_accum` micro-batches make one optimizer step.
Each worker reads the train split (`flywheel.datasets`) from the store, tokenises it, and takes every `world`-th
batch of a shared, length-bucketed order, so every worker runs the same number of steps. Checkpoints (adapter +
optimizer + position) go to `checkpoints/<run_name>/step-<step>/` on the store every `checkpoint_every` steps and
at each epoch end; a restarted worker group resumes from the last one (up to `max_failures` times;
`inject_failure_at_step` kills a worker once to prove it), even one Ray Train's controller had not yet collected
(`checkpoints.mark_persisted`), and so does a rerun with the same run name. The final adapter is registered in
the registry as a new (not yet promoted) version with its lineage.

Levers:
- `datasets: [agent, agent@version, ...]` trains one adapter (registered under `agent`) on several agents' train
  splits, concatenated; `max_examples` caps them, shared equally (`data.take_balanced`): a shared tool-calling
  adapter.
- `init_adapter` (a PEFT folder, or a registry entry `agent@version`) starts from that adapter's LoRA weights
  instead of random A / zero B; its rank and target modules must equal `lora_r` and `target_modules` (checked on
  the driver, before any worker starts).
- `validation_every` N: every N optimizer steps the workers compute the loss of the teacher's answers on the
  validation split (never the test split; each worker its share; at most `validation_max_examples`); the lowest-loss adapter is kept (`best_adapter/` in each
  checkpoint, so a resumed run keeps it too) and is the one registered. `early_stopping_patience` P stops training
  after P checks in a row without a lower loss. Off by default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from flywheel.config import ConfigError, DistillConfig
from flywheel.datasets import TRAIN, VALIDATION, open_split, resolve_version
from flywheel.distill.backends import DDP, DeepSpeed
from flywheel.distill.checkpoints import BEST, restore, save_checkpoint
from flywheel.distill.placement import explained, failure_config, worker_resources
from flywheel.hardware import native_bf16, training_attention
from flywheel.models import local_model
from flywheel.storage import Store


def _load_teacher(cfg: DistillConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if not cfg.teacher_model or cfg.kd_weight == 0:
        return None  # the tokenizers were compared once, on the driver (build_trainer)
    import ray.train.torch

    bf16 = cfg.bf16 and native_bf16(ray.train.torch.get_device().type)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher_model, dtype=torch.bfloat16 if bf16 else None)
    return teacher.eval().requires_grad_(False)


def _maybe_fail(cfg: DistillConfig, store: Store, run_name: str, step: int, checkpointed: int, rank: int,
                world: int) -> None:
    """Fault drill: the last worker exits once, hard, on reaching `inject_failure_at_step` (a marker on the store
    makes it fire only once across restarts), so Ray Train has to restart the group from the last checkpoint.

    It first waits until Ray Train's controller has committed the checkpoint of step `checkpointed` to its
    snapshot: the controller collects reports every couple of seconds, and a worker that dies before that takes
    its last report with it. Waiting makes the step the run resumes at deterministic.
    """
    marker = f"checkpoints/{run_name}/injected-failure-{step}.json"
    if not cfg.inject_failure_at_step or step != cfg.inject_failure_at_step or rank != world - 1 \
            or store.exists(marker):
        return
    deadline = time.time() + 120
    while checkpointed and time.time() < deadline:
        snapshot = store.read_json(f"checkpoints/{run_name}/checkpoint_manager_snapshot.json", default={}) or {}
        latest = (snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}
        if latest.get("step", -1) >= checkpointed:
            break
        time.sleep(0.5)
    store.write_json(marker, {"step": step, "rank": rank, "checkpointed": checkpointed, "at": time.time()})
    sys.stderr.write(f"[distill {cfg.agent}] injected failure: rank {rank} exits at step {step}\n")
    os._exit(1)


def _lora_model(cfg: DistillConfig, store: Store, init: dict | None) -> Any:
    """The base model with a fresh LoRA adapter, or one whose weights come from `init` (see `resolve_init_adapter`)."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    device = "cuda" if cfg.use_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32,
                                                 attn_implementation=training_attention(device))
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    if init is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = init.get("path") or store.local_copy(init["rel"], os.path.join(tmp, "init"))
            result = set_peft_model_state_dict(model, load_peft_weights(path, device="cpu"))
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        if unexpected:
            raise ConfigError(f"init_adapter: {cfg.init_adapter!r} holds LoRA weights this adapter does not have "
                              f"(e.g. {unexpected[:3]}); use an adapter with the same target_modules")
    return model


def _encoded(store: Store, tokenizer: Any, cfg: DistillConfig, sources: list, split: str,
             cap: int = 0) -> list[dict]:
    """The examples of `split` of every (agent, version) in `sources`, capped by `cap` (shared equally), with
    `value_swaps` variants added to the train split only, encoded."""
    from flywheel.distill.data import encode, swap_values, take_balanced

    groups = {f"{agent}@{version}": open_split(store, agent, version, split).rows(task_only=False)
              for agent, version in sources}
    examples = take_balanced(groups, cap, cfg.seed)
    if split == TRAIN and cfg.value_swaps:
        examples = swap_values(examples, cfg.value_swaps, cfg.seed)
    weight = cfg.argument_weight if split == TRAIN else 1.0  # validation loss: unweighted (see distill.data)
    return [e for e in (encode(tokenizer, ex, cfg.max_length, cfg.max_history, cfg.tool_format, weight)
                        for ex in examples) if e]


def _validate(backend: Any, val: list[dict], pad_id: int, cfg: DistillConfig, state: dict,
              best: dict | None) -> dict | None:
    """Validation loss of the current adapter: each rank scores its share of the split (`val[rank::world]`), the
    sums are all-reduced, so every rank sees the same figure and decides alike; updates `state["validation"]`;
    returns the best adapter's weights so far."""
    import torch
    import torch.distributed as dist

    from flywheel.distill.data import mean_answer_loss

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    shared = world > 1 and len(val) >= world  # equal shares: ZeRO-3 forwards are collective, so equal batch counts
    shard = val[:len(val) - len(val) % world][dist.get_rank()::world] if shared else val
    backend.model.eval()
    total, tokens = mean_answer_loss(backend.eval_model, shard, pad_id, cfg.batch_size, backend.device,
                                     backend.autocast)
    backend.model.train()
    sums = torch.tensor([float(total), float(tokens)], dtype=torch.float64)
    if shared:
        dist.all_reduce(sums)
    v, value = state["validation"], float(sums[0] / max(sums[1], 1))
    v["history"].append([state["step"], value])
    if v["best"] is None or value < v["best"]:
        v.update(best=value, best_step=state["step"], stale=0)
        return backend.adapter_weights()
    v["stale"] += 1
    if cfg.early_stopping_patience and v["stale"] >= cfg.early_stopping_patience:
        v["stopped_at"] = state["step"]
    return best


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from flywheel.distill.data import length_buckets

    cfg = DistillConfig(**config["cfg"])
    # a model named by URI is copied once to this worker's node
    cfg = dataclasses.replace(cfg, base_model=local_model(cfg.base_model), teacher_model=local_model(cfg.teacher_model))
    store = Store(config["home"])
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    teacher = _load_teacher(cfg)
    model = _lora_model(cfg, store, config.get("init_adapter"))
    encoded, val = _worker_data(store, tokenizer, cfg, [tuple(s) for s in config["sources"]])
    # micro-batches per worker per epoch, rounded down to whole optimizer steps
    per_epoch = max(1, len(length_buckets(encoded, cfg.batch_size, 0)) // world // cfg.grad_accum) * cfg.grad_accum
    steps_per_epoch = per_epoch // cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    backend = (DeepSpeed if cfg.strategy == "deepspeed" else DDP)(model, cfg, total)
    if teacher is not None:
        teacher.to(backend.device)
    state = {"step": 0, "tokens": 0, "computed_tokens": 0,
             "validation": {"best": None, "best_step": 0, "stale": 0, "stopped_at": 0, "history": []}}
    best = restore(backend, state, store, config["checkpoint_root"])
    resumed_at = checkpointed = state["step"]
    backend.model.train()
    started, losses = time.time(), []
    while state["step"] < total and not state["validation"]["stopped_at"]:
        epoch, offset = divmod(state["step"], steps_per_epoch)
        batches = length_buckets(encoded, cfg.batch_size, cfg.seed + epoch)[rank::world][:per_epoch]
        for i in range(offset * cfg.grad_accum, per_epoch, cfg.grad_accum):
            if state["step"] >= total:
                break
            _maybe_fail(cfg, store, config["run_name"], state["step"], checkpointed, rank, world)
            _optimizer_step(backend, batches[i:i + cfg.grad_accum], tokenizer.pad_token_id, teacher, cfg, state,
                            losses)
            if rank == 0 and (state["step"] % 5 == 0 or state["step"] == total):
                # stderr, not print(): Ray Train's print patch would show each line twice on the driver
                sys.stderr.write(f"[distill {cfg.agent}] step {state['step']}/{total} loss {losses[-1]:.3f}\n")
            if val and (state["step"] % cfg.validation_every == 0 or state["step"] == total):
                best = _validate(backend, val, tokenizer.pad_token_id, cfg, state, best)
            stopped = bool(state["validation"]["stopped_at"])
            if state["step"] == total or state["step"] % steps_per_epoch == 0 or stopped or \
                    (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0):
                metrics = {**_run_metrics(state, losses, steps_per_epoch, total, time.time() - started, resumed_at),
                           "train_examples": len(encoded), **(_validation_metrics(state, len(val)) if val else {})}
                losses = []
                save_checkpoint(backend, state, best, rank, metrics, store, config.get("local_checkpoint"),
                            config["checkpoint_root"])
                checkpointed = state["step"]
            if stopped:
                break


def _worker_data(store: Store, tokenizer: Any, cfg: DistillConfig,
                 sources: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """(encoded training examples, encoded validation examples; none when early stopping is off)."""
    encoded = _encoded(store, tokenizer, cfg, sources, TRAIN, cfg.max_examples)
    if not encoded:
        raise ValueError(f"{cfg.agent}: no training example fits in max_length={cfg.max_length}")
    val = _encoded(store, tokenizer, cfg, sources, VALIDATION) if cfg.validation_every else []
    return encoded, val[:cfg.validation_max_examples] if cfg.validation_max_examples else val


def _optimizer_step(backend: Any, micro_batches: list[list[dict]], pad_id: int, teacher: Any, cfg: DistillConfig,
                    state: dict, losses: list[float]) -> None:
    """One optimizer step over `micro_batches` (gradient accumulation); counts tokens and records each loss."""
    from flywheel.distill.data import answer_loss, collate

    for j, batch in enumerate(micro_batches):
        inputs = {k: (v.to(backend.device) if hasattr(v, "to") else v)
                  for k, v in collate(batch, pad_id, cfg.share_prefix).items()}
        with backend.micro_batch(boundary=j == cfg.grad_accum - 1):
            with backend.autocast:
                loss, _ = answer_loss(backend.model, inputs, teacher, cfg.kd_weight, cfg.kd_temperature)
            backend.backward(loss)
        state["tokens"] += int(inputs["attention_mask"].sum())
        state["computed_tokens"] += inputs["computed_tokens"]
        losses.append(float(loss.detach()))
    backend.step()
    state["step"] += 1


def _run_metrics(state: dict, losses: list[float], steps_per_epoch: int, total: int, elapsed: float,
                 resumed_at: int) -> dict:
    """What a checkpoint reports: step, epoch, mean loss since the last report, throughput (first attempt only)."""
    first = resumed_at == 0
    return {"step": state["step"], "epoch": state["step"] / steps_per_epoch, "loss": sum(losses) / len(losses),
            "tokens_per_s_per_worker": state["tokens"] / max(elapsed, 1e-9) if first else 0.0,
            "computed_tokens_per_s_per_worker":
                state["computed_tokens"] / max(elapsed, 1e-9) if first else 0.0,
            "resumed_at": resumed_at, "total_steps": total}


def _validation_metrics(state: dict, n_val: int) -> dict:
    v = state["validation"]
    return {"validation_loss": v["best"], "best_step": v["best_step"], "stopped_at": v["stopped_at"],
            "validation_examples": n_val, "validation_history": v["history"]}


def build_trainer(cfg: DistillConfig, store: Store, sources: list[tuple[str, str]], run_name: str,
                  storage: str = "checkpoints", callbacks: tuple = ()) -> Any:
    """The `TorchTrainer` of one distillation run on the train splits of `sources` ((agent, dataset version) pairs):
    `train_loop_per_worker` on `cfg.num_workers` workers, checkpoints under `<home>/<storage>/<run_name>/` (the
    same name resumes). `cfg.base_model` must already be a local path. Checks the teacher's tokenizer and the
    init adapter here, before any worker starts. `num_workers` 0: Ray Train's local mode, the loop runs in this
    process without Ray (no restarts; the checkpoint is uploaded to `<storage>/<run_name>/local-checkpoint/`).
    `flywheel.distill.sweep` builds one per Tune trial, with its own storage and report callbacks."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.teacher_model and cfg.kd_weight > 0:
        from transformers import AutoTokenizer

        from flywheel.distill.data import check_same_tokenizer

        check_same_tokenizer(AutoTokenizer.from_pretrained(local_model(cfg.base_model)),
                             AutoTokenizer.from_pretrained(local_model(cfg.teacher_model)))
    init = resolve_init_adapter(cfg, store)
    if cfg.validation_every:  # a selection step: it needs validation examples, and says so
        splits = [open_split(store, agent, version, VALIDATION) for agent, version in sources]
        if not any(sp.table.num_rows for sp in splits):
            splits[0].require("early stopping (validation_every)")
    pafs, base = store.pyarrow_fs()
    local = f"{storage}/{run_name}/local-checkpoint" if cfg.num_workers == 0 else None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "home": store.uri, "sources": [list(s) for s in sources],
                           "run_name": run_name, "init_adapter": init, "local_checkpoint": local,
                           "checkpoint_root": f"{storage}/{run_name}"},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(name=run_name, storage_path=f"{base}/{storage}", storage_filesystem=pafs,
                             failure_config=failure_config(cfg),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks)),
    )


def training_sources(cfg: DistillConfig, store: Store) -> list[tuple[str, str]]:
    """(agent, published dataset version) pairs to train on: `datasets` ("agent" or "agent@version"; no version:
    `dataset_version`), or the agent's own dataset."""
    entries = cfg.datasets or (cfg.agent,)
    pairs = [entry.partition("@")[::2] for entry in entries]
    return [(agent, resolve_version(store, agent, version or cfg.dataset_version)) for agent, version in pairs]


def resolve_init_adapter(cfg: DistillConfig, store: Store) -> dict | None:
    """`init_adapter` -> {"path": a local folder} (a local home) or {"rel": a folder under the home: a registered
    adapter, or a local folder uploaded to an s3:// home, whose workers may run on other nodes}, after checking
    that its rank and target modules are this run's; None without one. ConfigError naming what differs."""
    if not cfg.init_adapter:
        return None
    import json

    from flywheel.registry.registry import Registry, RegistryError

    if os.path.isdir(cfg.init_adapter):
        folder = os.path.abspath(cfg.init_adapter)
        path = os.path.join(folder, "adapter_config.json")
        adapter_cfg = None
        if os.path.exists(path):
            with open(path) as f:
                adapter_cfg = json.load(f)
        # an s3:// home's workers may run on other nodes: the folder travels through the home
        init = {"path": folder} if store.local or not adapter_cfg else {"rel": _upload_folder(store, folder)}
    else:
        agent, sep, version = cfg.init_adapter.partition("@")
        if not sep:
            raise ConfigError(f"init_adapter: {cfg.init_adapter!r} is neither an adapter folder nor a registry entry "
                              f"'agent@version' (e.g. sgd_Flights@v3)")
        try:
            init = {"rel": Registry(store).get(agent, version)["adapter"]}
        except RegistryError as e:
            raise ConfigError(f"init_adapter: {e}") from None
        adapter_cfg = store.read_json(f"{init['rel']}/adapter_config.json")
    if not adapter_cfg:
        raise ConfigError(f"init_adapter: {cfg.init_adapter!r} is not a PEFT adapter (no adapter_config.json)")
    r, targets = adapter_cfg.get("r"), adapter_cfg.get("target_modules") or []
    targets = sorted([targets] if isinstance(targets, str) else targets)
    if r != cfg.lora_r or targets != sorted(cfg.target_modules):
        raise ConfigError(f"init_adapter: {cfg.init_adapter!r} has r={r}, target_modules={targets}; this run has "
                          f"lora_r={cfg.lora_r}, target_modules={sorted(cfg.target_modules)}: give the same (or "
                          f"leave init_adapter empty to start from random A / zero B)")
    return init


def _upload_folder(store: Store, folder: str) -> str:
    """Copy a local adapter folder into the home once, under a name from its contents; its path under the home."""
    import hashlib

    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            digest.update(os.path.relpath(os.path.join(root, name), folder).encode())
            with open(os.path.join(root, name), "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    rel = f"init-adapters/{digest.hexdigest()[:24]}"
    if not store.exists(f"{rel}/adapter_config.json"):
        store.upload(folder, rel)
    return rel


def _run_name(cfg: DistillConfig, sources: list[tuple[str, str]]) -> str:
    """`run_name`, else <agent>-<dataset version> (one dataset of the agent's own), else <agent>-<digest of them>."""
    import hashlib

    if cfg.run_name:
        return cfg.run_name
    if [a for a, _ in sources] == [cfg.agent]:
        return f"{cfg.agent}-{sources[0][1]}"
    return f"{cfg.agent}-" + hashlib.sha256(repr(sorted(sources)).encode()).hexdigest()[:12]


def distill(cfg: DistillConfig, store: Store | None = None) -> dict:
    """Train one agent's adapter on Ray Train and register it as a new version. Returns a summary."""
    import ray

    from flywheel.models import resolve_model_path

    store = store or Store(cfg.home or None)
    sources = training_sources(cfg, store)
    run_name = _run_name(cfg, sources)
    cfg = dataclasses.replace(cfg, base_model=resolve_model_path(cfg.base_model),
                              teacher_model=resolve_model_path(cfg.teacher_model) if cfg.teacher_model else "")
    if cfg.num_workers and not ray.is_initialized():  # 0 workers: Ray Train's local mode, no Ray
        ray.init(configure_logging=False)
    trainer = build_trainer(cfg, store, sources, run_name)
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as e:
        raise explained(cfg, e) from e
    train_s = time.time() - started
    if result.checkpoint is None:
        raise RuntimeError(f"{cfg.agent}: training finished without a checkpoint ({result.error})")
    return _register(cfg, store, sources, run_name, result, train_s)


def _register(cfg: DistillConfig, store: Store, sources: list[tuple[str, str]], run_name: str, result: Any,
              train_s: float) -> dict:
    """Register the run's adapter (the best by validation loss when that was checked, else the last) and track it."""
    from flywheel import tracking
    from flywheel.registry.registry import Registry

    own = next((v for a, v in sources if a == cfg.agent), None)
    metrics = dict(result.metrics or {})
    history = metrics.pop("validation_history", None)
    with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        chosen = BEST if os.path.exists(os.path.join(d, BEST)) else "adapter"
        adapter = shutil.copytree(os.path.join(d, chosen), os.path.join(tmp, "adapter"))
        hyper = {k: v for k, v in dataclasses.asdict(cfg).items()
                 if k not in ("home", "agent", "base_model", "tracking_uri")}
        entry = Registry(store).register(cfg.agent, adapter, {
            "dataset_version": own, "datasets": [{"agent": a, "version": v} for a, v in sources],
            "base_model": cfg.base_model, "run_name": run_name, "hyperparameters": hyper,
            "train_metrics": {**metrics, **({"validation_history": history} if history else {})},
            "adapter_from": "best validation loss" if chosen == BEST else "last step",
            "train_time_s": round(train_s, 1)})
        tracking.log_training_run(cfg.agent, run_name, hyper, {**metrics, "train_time_s": train_s},
                                  adapter_dir=adapter, tags={"flywheel.version": entry["version"],
                                                             "flywheel.dataset_version": own or "+".join(
                                                                 f"{a}@{v}" for a, v in sources)},
                                  store=store, uri=cfg.tracking_uri)
    return {"agent": cfg.agent, "version": entry["version"], "dataset_version": own, "datasets": entry["datasets"],
            "run_name": run_name, "steps": metrics.get("step"), "loss": metrics.get("loss"),
            "resumed_at": metrics.get("resumed_at"), "train_examples": metrics.get("train_examples"),
            "validation_loss": metrics.get("validation_loss"), "best_step": metrics.get("best_step"),
            "stopped_at": metrics.get("stopped_at"), "validation_history": history,
            "adapter_from": entry["adapter_from"],
            "tokens_per_s": metrics.get("tokens_per_s_per_worker", 0.0) * cfg.num_workers,
            "computed_tokens_per_s": metrics.get("computed_tokens_per_s_per_worker", 0.0) * cfg.num_workers,
            "train_time_s": round(train_s, 1), "adapter": entry["adapter"]}
