"""Distillation on Ray Train: a LoRA adapter per agent, trained on the teacher's answers (sequence-level KD).

    flywheel distill --agent sgd_Flights --epochs 3 --json
    ray job submit --working-dir . -- python jobs/distill.py --config jobs/distill.yaml

`TorchTrainer` runs `train_loop_per_worker` on `num_workers` workers (DDP over gloo on CPU, NCCL on GPU).
Each worker reads the agent's train split from the store, tokenises it, and takes every `world`-th batch of a
shared, length-bucketed order, so every worker runs the same number of steps. Checkpoints (adapter + optimizer
+ position) go to `checkpoints/<run_name>/` on the store every `checkpoint_every` steps and at each epoch end;
a restarted worker group resumes from the last one, and so does a rerun with the same run name. The final
adapter is registered in the registry as a new (not yet promoted) version with its lineage.
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

from flywheel.config import DistillConfig
from flywheel.storage import Store


def _save(model: Any, optimizer: Any, state: dict, directory: str) -> None:
    import torch

    unwrapped = model.module if hasattr(model, "module") else model
    unwrapped.save_pretrained(os.path.join(directory, "adapter"))
    torch.save({"optimizer": optimizer.state_dict(), **state}, os.path.join(directory, "state.pt"))


def _restore(model: Any, optimizer: Any, directory: str) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    unwrapped = model.module if hasattr(model, "module") else model
    weights = load_file(os.path.join(directory, "adapter", "adapter_model.safetensors"))
    set_peft_model_state_dict(unwrapped, weights)
    state = torch.load(os.path.join(directory, "state.pt"), weights_only=False)
    optimizer.load_state_dict(state.pop("optimizer"))
    return state


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.curate.pipeline import read_split
    from flywheel.distill.data import answer_loss, collate, encode, length_buckets

    cfg = DistillConfig(**config["cfg"])
    store = Store(config["home"])
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    examples = read_split(store, cfg.agent, config["version"], "train").to_pylist()
    encoded = [e for e in (encode(tokenizer, ex, cfg.max_length, cfg.max_history) for ex in examples) if e]
    if not encoded:
        raise ValueError(f"{cfg.agent}: no training example fits in max_length={cfg.max_length}")
    per_epoch = max(1, len(length_buckets(encoded, cfg.batch_size, 0)) // world)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(per_epoch * cfg.epochs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=0.0)
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - max(0, s - warmup) / max(1, total - warmup)))
    state = {"step": 0, "tokens": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = _restore(model, optimizer, d)
        for _ in range(state["step"]):
            schedule.step()
    resumed_at = state["step"]
    model = ray.train.torch.prepare_model(model)
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16 and not torch.cuda.is_available())
    device = ray.train.torch.get_device()
    started, losses = time.time(), []
    while state["step"] < total:
        epoch, offset = divmod(state["step"], per_epoch)
        batches = length_buckets(encoded, cfg.batch_size, cfg.seed + epoch)[rank::world][:per_epoch]
        for batch in batches[offset:]:
            if state["step"] >= total:
                break
            inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in collate(batch, tokenizer.pad_token_id).items()}
            with autocast:
                loss, n_tokens = answer_loss(model, inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += int(inputs["attention_mask"].sum())
            losses.append(float(loss.detach()))
            if rank == 0 and (state["step"] % 5 == 0 or state["step"] == total):
                # stderr, not print(): Ray Train's print patch would show each line twice on the driver
                sys.stderr.write(f"[distill {cfg.agent}] step {state['step']}/{total} loss {losses[-1]:.3f}\n")
            end_of_epoch = state["step"] % per_epoch == 0
            if state["step"] == total or end_of_epoch or (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0):
                elapsed = time.time() - started
                metrics = {"step": state["step"], "epoch": state["step"] / per_epoch, "loss": sum(losses) / len(losses),
                           "tokens_per_s_per_worker": (state["tokens"]) / max(elapsed, 1e-9) if resumed_at == 0 else 0.0,
                           "resumed_at": resumed_at, "total_steps": total, "train_examples": len(encoded)}
                losses = []
                with tempfile.TemporaryDirectory() as tmp:
                    if rank == 0:
                        _save(model, optimizer, dict(state), tmp)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def distill(cfg: DistillConfig, store: Store | None = None) -> dict:
    """Train one agent's adapter on Ray Train and register it as a new version. Returns a summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flywheel.curate.pipeline import resolve_version
    from flywheel.models import resolve_model_path
    from flywheel.registry.registry import Registry

    store = store or Store(cfg.home or None)
    version = resolve_version(store, cfg.agent, cfg.dataset_version)
    run_name = cfg.run_name or f"{cfg.agent}-{version}"
    cfg = dataclasses.replace(cfg, base_model=resolve_model_path(cfg.base_model))
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    pafs, base = store.pyarrow_fs()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "home": store.uri, "version": version},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": cfg.threads_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=f"{base}/checkpoints", storage_filesystem=pafs,
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    started = time.time()
    result = trainer.fit()
    train_s = time.time() - started
    if result.checkpoint is None:
        raise RuntimeError(f"{cfg.agent}: training finished without a checkpoint ({result.error})")
    registry = Registry(store)
    with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        adapter = shutil.copytree(os.path.join(d, "adapter"), os.path.join(tmp, "adapter"))
        hyper = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("home", "agent", "base_model")}
        metrics = dict(result.metrics or {})
        entry = registry.register(cfg.agent, adapter, {
            "dataset_version": version, "base_model": cfg.base_model, "run_name": run_name,
            "hyperparameters": hyper, "train_metrics": metrics, "train_time_s": round(train_s, 1)})
    return {"agent": cfg.agent, "version": entry["version"], "dataset_version": version, "run_name": run_name,
            "steps": metrics.get("step"), "loss": metrics.get("loss"), "resumed_at": metrics.get("resumed_at"),
            "tokens_per_s": metrics.get("tokens_per_s_per_worker", 0.0) * cfg.num_workers,
            "train_time_s": round(train_s, 1), "adapter": entry["adapter"]}
