"""The two ways a worker steps its model: `DDP` (plain PyTorch DDP, bf16 autocast where native) and `DeepSpeed`
(ZeRO, stage from config). Both take a PEFT model, the run's config and its number of optimizer steps, and give
`train_loop_per_worker` one interface: `micro_batch`, `backward`, `step`, `adapter_weights`, `save`, `restore`.
"""

from __future__ import annotations

import os
from typing import Any

from flywheel.config import DistillConfig
from flywheel.distill.answers import Answers
from flywheel.hardware import native_bf16


class DDP:
    """Plain PyTorch: DDP through `prepare_model`, bf16 autocast on CPU, gradient accumulation with `no_sync`."""

    def __init__(self, model: Any, cfg: DistillConfig, total: int):
        import ray.train.torch
        import torch

        self.cfg = cfg
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=cfg.learning_rate, weight_decay=0.0)
        self.schedule = warmup_decay(self.optimizer, total)
        self.peft = self.eval_model = model  # validation runs on the unwrapped model: no DDP buffer broadcasts
        self.model = ray.train.torch.prepare_model(Answers(model))
        self.device = ray.train.torch.get_device()
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.bf16 and native_bf16(self.device.type))

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

    def adapter_weights(self) -> dict:
        """A CPU copy of the adapter's LoRA weights (PEFT's saved form)."""
        return lora_copy(self.peft)

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


class DeepSpeed:
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
            model=Answers(model), model_parameters=params, optimizer=optimizer, lr_scheduler=warmup_decay(optimizer, total),
            config={"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
                    "gradient_clipping": 1.0, "bf16": {"enabled": cfg.bf16 and native_bf16(ray.train.torch.get_device().type)},
                    "zero_optimization": {"stage": cfg.zero_stage}, "steps_per_print": 10 ** 9,
                    "wall_clock_breakdown": False})
        self.model = self.eval_model = self.engine  # ZeRO-3 gathers parameters in the engine's forward
        self.peft = model
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

    def adapter_weights(self) -> dict:
        """A CPU copy of the adapter's LoRA weights; under ZeRO-3 a collective (every rank calls it)."""
        import deepspeed

        trainable = [p for p in self.peft.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=self.cfg.zero_stage == 3):
            return lora_copy(self.peft)

    def save(self, state: dict, directory: str, rank: int) -> None:
        import deepspeed

        trainable = [p for p in self.peft.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=self.cfg.zero_stage == 3):  # collective
            if rank == 0:
                self.peft.save_pretrained(os.path.join(directory, "adapter"))
        self.engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state", client_state=dict(state))

    def restore(self, directory: str) -> dict:
        _, client_state = self.engine.load_checkpoint(os.path.join(directory, "deepspeed"), tag="state")
        return {k: client_state[k] for k in ("step", "tokens", "validation") if k in client_state}


def lora_copy(peft: Any) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft).items()}


def save_weights(peft: Any, weights: dict, directory: str) -> None:
    """An adapter folder (adapter_config.json + adapter_model.safetensors) holding `weights`."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    peft.peft_config["default"].save_pretrained(directory)
    save_file(weights, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})


def warmup_decay(optimizer: Any, total: int) -> Any:
    """Linear warm-up over the first 10% of steps, then linear decay to 10% of the peak rate."""
    import torch

    warmup = max(1, total // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - max(0, s - warmup) / max(1, total - warmup)))
