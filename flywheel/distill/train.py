"""Distillation on Ray Train: a LoRA adapter per agent, trained on the teacher's answers (sequence-level KD), plus
the teacher's logits when a local teacher model is configured (token-level KD).

    flywheel distill --agent sgd_Flights --epochs 3 --json
    ray job submit --working-dir . -- python jobs/distill.py --config jobs/distill.yaml

`TorchTrainer` runs `train_loop_per_worker` on `num_workers` workers with one of two strategies: `ddp` (DDP over
gloo on CPU with bf16 autocast, NCCL on GPU) or `deepspeed` (ZeRO stage 1/2/3 from config, the same code on CPU and
GPU). `grad_accum` micro-batches make one optimizer step.
Each worker reads the agent's train split from the store, tokenises it, and takes every `world`-th batch of a
shared, length-bucketed order, so every worker runs the same number of steps. Checkpoints (adapter + optimizer
+ position) go to `checkpoints/<run_name>/` on the store every `checkpoint_every` steps and at each epoch end;
a restarted worker group resumes from the last one (up to `max_failures` times; `inject_failure_at_step` kills a
worker once to prove it), and so does a rerun with the same run name. The final
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


class _DDP:
    """Plain PyTorch: DDP through `prepare_model`, bf16 autocast on CPU, gradient accumulation with `no_sync`."""

    def __init__(self, model: Any, cfg: DistillConfig, total: int):
        import ray.train.torch
        import torch

        self.cfg = cfg
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=cfg.learning_rate, weight_decay=0.0)
        self.schedule = _schedule(self.optimizer, total)
        self.peft = model
        self.model = ray.train.torch.prepare_model(model)
        self.device = ray.train.torch.get_device()
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def micro_batch(self, boundary: bool) -> Any:
        """Context for one micro-batch's forward and backward: DDP syncs gradients only on the last one."""
        import contextlib

        if boundary or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: Any) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> None:
        import torch

        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, state: dict, directory: str, rank: int) -> None:
        import torch

        if rank == 0:
            self.peft.save_pretrained(os.path.join(directory, "adapter"))
            torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), **state},
                       os.path.join(directory, "state.pt"))

    def restore(self, directory: str) -> dict:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.peft, load_file(os.path.join(directory, "adapter", "adapter_model.safetensors")))
        state = torch.load(os.path.join(directory, "state.pt"), weights_only=False)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.schedule.load_state_dict(state.pop("schedule"))
        return state


class _DeepSpeed:
    """DeepSpeed ZeRO (stage from config) on the process group Ray Train set up: gloo on CPU, NCCL on GPU.

    DeepSpeed owns gradient accumulation, clipping, bf16 and the schedule; each rank saves its own shard of
    the optimizer state into the checkpoint directory and Ray Train merges the ranks' files into one checkpoint.
    """

    def __init__(self, model: Any, cfg: DistillConfig, total: int):
        import deepspeed
        import ray.train.torch
        import torch

        self.cfg = cfg
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=_schedule(optimizer, total),
            config={"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
                    "gradient_clipping": 1.0, "bf16": {"enabled": cfg.bf16},
                    "zero_optimization": {"stage": cfg.zero_stage}, "steps_per_print": 10 ** 9,
                    "wall_clock_breakdown": False})
        self.model = self.engine
        self.peft = self.engine.module
        self.device = ray.train.torch.get_device()
        self.autocast = torch.autocast(self.device.type, enabled=False)  # the bf16 section casts the model itself

    def micro_batch(self, boundary: bool) -> Any:
        import contextlib

        return contextlib.nullcontext()  # the engine knows its accumulation boundaries

    def backward(self, loss: Any) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum itself
        self.engine.step()  # updates weights (and the schedule) only at accumulation boundaries

    def step(self) -> None:
        pass

    def save(self, state: dict, directory: str, rank: int) -> None:
        import deepspeed

        trainable = [p for p in self.peft.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=self.cfg.zero_stage == 3):  # collective
            if rank == 0:
                self.peft.save_pretrained(os.path.join(directory, "adapter"))
        self.engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state", client_state=dict(state))

    def restore(self, directory: str) -> dict:
        _, client_state = self.engine.load_checkpoint(os.path.join(directory, "deepspeed"), tag="state")
        return {k: client_state[k] for k in ("step", "tokens")}


def _schedule(optimizer: Any, total: int) -> Any:
    """Linear warm-up over the first 10% of steps, then linear decay to 10% of the peak rate."""
    import torch

    warmup = max(1, total // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - max(0, s - warmup) / max(1, total - warmup)))


def _load_teacher(cfg: DistillConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if not cfg.teacher_model or cfg.kd_weight == 0:
        return None  # the tokenizers were compared once, on the driver (build_trainer)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher_model, dtype=torch.bfloat16 if cfg.bf16 else None)
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


def train_loop_per_worker(config: dict) -> None:
    import ray.train
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
    teacher = _load_teacher(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    examples = read_split(store, cfg.agent, config["version"], "train").to_pylist()
    encoded = [e for e in (encode(tokenizer, ex, cfg.max_length, cfg.max_history) for ex in examples) if e]
    if not encoded:
        raise ValueError(f"{cfg.agent}: no training example fits in max_length={cfg.max_length}")
    # micro-batches per worker per epoch, rounded down to whole optimizer steps
    per_epoch = max(1, len(length_buckets(encoded, cfg.batch_size, 0)) // world // cfg.grad_accum) * cfg.grad_accum
    steps_per_epoch = per_epoch // cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    backend = (_DeepSpeed if cfg.strategy == "deepspeed" else _DDP)(model, cfg, total)
    if teacher is not None:
        teacher.to(backend.device)
    state = {"step": 0, "tokens": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = backend.restore(d)
    resumed_at = checkpointed = state["step"]
    backend.model.train()
    started, losses = time.time(), []
    while state["step"] < total:
        epoch, offset = divmod(state["step"], steps_per_epoch)
        batches = length_buckets(encoded, cfg.batch_size, cfg.seed + epoch)[rank::world][:per_epoch]
        for i in range(offset * cfg.grad_accum, per_epoch, cfg.grad_accum):
            if state["step"] >= total:
                break
            _maybe_fail(cfg, store, config["run_name"], state["step"], checkpointed, rank, world)
            for j, batch in enumerate(batches[i:i + cfg.grad_accum]):
                inputs = {k: (v.to(backend.device) if hasattr(v, "to") else v)
                          for k, v in collate(batch, tokenizer.pad_token_id).items()}
                with backend.micro_batch(boundary=j == cfg.grad_accum - 1):
                    with backend.autocast:
                        loss, _ = answer_loss(backend.model, inputs, teacher, cfg.kd_weight, cfg.kd_temperature)
                    backend.backward(loss)
                state["tokens"] += int(inputs["attention_mask"].sum())
                losses.append(float(loss.detach()))
            backend.step()
            state["step"] += 1
            if rank == 0 and (state["step"] % 5 == 0 or state["step"] == total):
                # stderr, not print(): Ray Train's print patch would show each line twice on the driver
                sys.stderr.write(f"[distill {cfg.agent}] step {state['step']}/{total} loss {losses[-1]:.3f}\n")
            end_of_epoch = state["step"] % steps_per_epoch == 0
            if state["step"] == total or end_of_epoch or (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0):
                elapsed = time.time() - started
                metrics = {"step": state["step"], "epoch": state["step"] / steps_per_epoch,
                           "loss": sum(losses) / len(losses),
                           "tokens_per_s_per_worker": state["tokens"] / max(elapsed, 1e-9) if resumed_at == 0 else 0.0,
                           "resumed_at": resumed_at, "total_steps": total, "train_examples": len(encoded)}
                losses = []
                with tempfile.TemporaryDirectory() as tmp:
                    backend.save(dict(state), tmp, rank)
                    has_files = bool(os.listdir(tmp))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
                checkpointed = state["step"]


def build_trainer(cfg: DistillConfig, store: Store, version: str, run_name: str, storage: str = "checkpoints",
                  callbacks: tuple = ()) -> Any:
    """The `TorchTrainer` of one distillation run: `train_loop_per_worker` on `cfg.num_workers` workers, checkpoints
    under `<home>/<storage>/<run_name>/` (the same name resumes). `cfg.base_model` must already be a local path.
    `flywheel.distill.sweep` builds one per Tune trial, with its own storage and report callbacks."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.teacher_model and cfg.kd_weight > 0:  # fail here, before any worker starts
        from transformers import AutoTokenizer

        from flywheel.distill.data import check_same_tokenizer

        check_same_tokenizer(AutoTokenizer.from_pretrained(cfg.base_model), AutoTokenizer.from_pretrained(cfg.teacher_model))
    pafs, base = store.pyarrow_fs()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "home": store.uri, "version": version,
                           "run_name": run_name},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.threads_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=f"{base}/{storage}", storage_filesystem=pafs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks)),
    )


def distill(cfg: DistillConfig, store: Store | None = None) -> dict:
    """Train one agent's adapter on Ray Train and register it as a new version. Returns a summary."""
    import ray

    from flywheel import tracking
    from flywheel.curate.pipeline import resolve_version
    from flywheel.models import resolve_model_path
    from flywheel.registry.registry import Registry

    store = store or Store(cfg.home or None)
    version = resolve_version(store, cfg.agent, cfg.dataset_version)
    run_name = cfg.run_name or f"{cfg.agent}-{version}"
    cfg = dataclasses.replace(cfg, base_model=resolve_model_path(cfg.base_model),
                              teacher_model=resolve_model_path(cfg.teacher_model) if cfg.teacher_model else "")
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    trainer = build_trainer(cfg, store, version, run_name)
    started = time.time()
    result = trainer.fit()
    train_s = time.time() - started
    if result.checkpoint is None:
        raise RuntimeError(f"{cfg.agent}: training finished without a checkpoint ({result.error})")
    registry = Registry(store)
    with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        adapter = shutil.copytree(os.path.join(d, "adapter"), os.path.join(tmp, "adapter"))
        hyper = {k: v for k, v in dataclasses.asdict(cfg).items()
                 if k not in ("home", "agent", "base_model", "tracking_uri")}
        metrics = dict(result.metrics or {})
        entry = registry.register(cfg.agent, adapter, {
            "dataset_version": version, "base_model": cfg.base_model, "run_name": run_name,
            "hyperparameters": hyper, "train_metrics": metrics, "train_time_s": round(train_s, 1)})
        tracking.log_training_run(cfg.agent, run_name, hyper, {**metrics, "train_time_s": train_s},
                                  adapter_dir=adapter, tags={"flywheel.version": entry["version"], "flywheel.dataset_version": version},
                                  store=store, uri=cfg.tracking_uri)
    return {"agent": cfg.agent, "version": entry["version"], "dataset_version": version, "run_name": run_name,
            "steps": metrics.get("step"), "loss": metrics.get("loss"), "resumed_at": metrics.get("resumed_at"),
            "tokens_per_s": metrics.get("tokens_per_s_per_worker", 0.0) * cfg.num_workers,
            "train_time_s": round(train_s, 1), "adapter": entry["adapter"]}
