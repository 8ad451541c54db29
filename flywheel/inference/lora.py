"""Batched multi-LoRA for one base model: a fixed pool of adapter slots, and rows of one batch that each use their
own slot in the same forward pass (BGMV: gather each row's A and B, then batched matmuls).

    pool = LoRAPool(model, slots=32, max_rank=64)          # wraps the target Linear layers once (forward hooks)
    weights = read_adapter("/adapters/sgd_Flights/v3", pool.shapes, pool.max_rank)   # a PEFT folder, checked
    slot = pool.install("sgd_Flights@v3", weights)           # a free slot, or the least recently used idle one
    pool.set_rows([slot, 0, slot])                            # per batch row: 0 = the base model, no adapter
    model(input_ids, ...)                                     # every wrapped layer adds its rows' LoRA terms

Each wrapped layer computes `y = base(x) + scale[s] * (x @ A[s]^T) @ B[s]^T` with `s` the row's slot: `A` is a
stack `[slots + 1, rank, in]`, `B` `[slots + 1, out, rank]`, zero-padded for smaller ranks; slot 0 is all zeros
(the base model). A batch whose rows use one slot takes plain matmuls; a mixed batch gathers each row's slices and
uses `torch.bmm`, so 8 rows with 8 adapters cost one pass, not 8. Only the ranks the batch needs are multiplied
(stacks are sliced to the largest rank among its slots), and a layer no row's adapter targets is skipped.

Memory is allocated lazily: a layer's stack exists once some adapter targets it, at the largest rank loaded so far
(up to `max_rank`; growing re-pads every stack once). SmolLM2-135M with rank-16 adapters on all 7 projections:
~4.9M parameters per slot (19.5 MB fp32, 9.8 MB bf16); on q_proj and v_proj only ~0.9M.

`read_adapter` accepts PEFT LoRA folders (adapter_config.json + adapter_model.safetensors, or adapter_model.bin):
any rank up to `max_rank`, any subset of the wrapped layers, rsLoRA scaling. It refuses, with `AdapterFormatError`
naming the problem, what the pool cannot represent: DoRA, biases, modules_to_save, embedding LoRA, per-module
alpha patterns, a layer that is not wrapped, a rank above `max_rank`, shapes that do not fit the base model, and
unreadable files. Slots are kept in LRU order; a slot in use by a running batch (pinned) is never evicted.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
# adapter_config.json keys whose non-empty value changes the maths beyond plain LoRA
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "layer_replication", "alpha_pattern",
               "trainable_token_indices", "use_qalora", "alora_invocation_tokens", "target_parameters",
               "arrow_config", "use_bdlora", "kasa_config", "monteclora_config", "velora_config")


class AdapterFormatError(ValueError):
    """An adapter folder the pool cannot read or represent; the message names the folder and the reason."""


class PoolFull(RuntimeError):
    """Every slot is in use by rows of the running batch: the adapter waits until one is released."""


@dataclass
class AdapterWeights:
    """One adapter read from disk: per wrapped layer (its name in the base model) A (r, in), B (out, r), scale."""

    path: str
    rank: int
    layers: dict[str, tuple[Any, Any, float]]


# -- reading PEFT folders -------------------------------------------------------------------------------------
def read_adapter(path: str, shapes: dict[str, tuple[int, int]], max_rank: int) -> AdapterWeights:
    """A PEFT LoRA folder as plain tensors, checked against the wrapped layers' (in, out) `shapes`."""
    config = _read_config(path)
    tensors = _read_tensors(path)
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        layer, part = _layer_of(path, key)
        pairs.setdefault(layer, {})[part] = tensor
    if not pairs:
        raise AdapterFormatError(f"{path}: the adapter has no LoRA weights")
    layers, rank = {}, 0
    for layer, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise AdapterFormatError(f"{path}: layer {layer} has lora_{'A' if 'B' in parts else 'B'} only")
        a, b = parts["A"], parts["B"]
        if layer not in shapes:
            raise AdapterFormatError(f"{path}: layer {layer} is not one this engine applies LoRA to (it wraps "
                                     f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in shapes}))})")
        fan_in, fan_out = shapes[layer]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise AdapterFormatError(f"{path}: layer {layer} has A {tuple(a.shape)} and B {tuple(b.shape)}; the base "
                                     f"model needs A (r, {fan_in}) and B ({fan_out}, r): another base model?")
        if r > max_rank:
            raise AdapterFormatError(f"{path}: rank {r} at {layer} is above max_adapter_rank ({max_rank})")
        alpha = float(config.get("lora_alpha") or r)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        layers[layer] = (a, b, scale)
        rank = max(rank, r)
    return AdapterWeights(path, rank, layers)


def _read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: no adapter_config.json (not a PEFT adapter folder)") from None
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"{path}: adapter_config.json cannot be read: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterFormatError(f"{path}: a {kind} adapter; only LoRA adapters can be served")
    for key in UNSUPPORTED:
        if config.get(key):
            raise AdapterFormatError(f"{path}: {key}={config[key]!r} is not supported by the batched LoRA engine "
                                     "(plain LoRA only)")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{path}: bias={config['bias']!r} is not supported (the base model's biases would "
                                 "change); train with bias='none'")
    return config


def _read_tensors(path: str) -> dict[str, Any]:
    safetensors = os.path.join(path, "adapter_model.safetensors")
    pickled = os.path.join(path, "adapter_model.bin")
    try:
        if os.path.exists(safetensors):
            from safetensors.torch import load_file

            return load_file(safetensors, device="cpu")
        if os.path.exists(pickled):
            import torch

            return torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt file: safetensors and torch raise various types
        raise AdapterFormatError(f"{path}: the adapter weights cannot be read ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    raise AdapterFormatError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


def _layer_of(path: str, key: str) -> tuple[str, str]:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0.self_attn.q_proj`, A)."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for part in ("A", "B"):
        for suffix in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if name.endswith(suffix):
                return name[: -len(suffix)], part
    raise AdapterFormatError(f"{path}: weight {key!r} is not a plain LoRA A/B matrix (DoRA, embedding LoRA, "
                             "biases and modules_to_save cannot be served)")


# -- the pool -------------------------------------------------------------------------------------------------
class LoRAPool:
    """`slots` adapter slots (1..slots; 0 is the base model) over the target Linear layers of `model`."""

    def __init__(self, model: Any, slots: int, max_rank: int, target_modules: tuple[str, ...] = TARGET_MODULES):
        import torch

        if slots < 1 or max_rank < 1:
            raise ValueError(f"a LoRA pool needs slots >= 1 and max_rank >= 1, got {slots}, {max_rank}")
        self.slots, self.max_rank = slots, max_rank
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules}
        if not self.layers:
            raise ValueError(f"the model has no Linear layer named {', '.join(target_modules)}")
        self.shapes = {name: (m.in_features, m.out_features) for name, m in self.layers.items()}
        first = next(iter(self.layers.values())).weight
        self.dtype, self.device = first.dtype, first.device
        self.rank_cap = 0  # the width of every allocated stack
        self.A: dict[str, Any] = {}  # layer -> [slots + 1, rank_cap, in]
        self.B: dict[str, Any] = {}  # layer -> [slots + 1, out, rank_cap]
        self.scale: dict[str, Any] = {}  # layer -> [slots + 1]
        n = slots + 1
        self.names: list[str | None] = [None] * n
        self.rank = [0] * n
        self.targets: list[frozenset[str]] = [frozenset()] * n
        self.last_used = [0.0] * n
        self.pins = [0] * n
        self.doomed: set[int] = set()  # slots unloaded while pinned: cleared at their last unpin
        self.evictions = 0
        self._rows: Any = None  # per-row slot index tensor of the running forward
        self._single: int | None = None  # the one slot every row uses (0 = no adapter at all)
        self._live: frozenset[str] = frozenset()  # layers some row's adapter targets
        self._width = 0  # the largest rank among the rows' slots
        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]

    # -- slots ------------------------------------------------------------------------------------------------
    def slot_of(self, name: str) -> int | None:
        return next((s for s in range(1, self.slots + 1) if self.names[s] == name and s not in self.doomed), None)

    def resident(self) -> list[str]:
        names = list(self.names)
        return [n for s, n in enumerate(names) if s and n is not None and s not in self.doomed]

    def install(self, name: str, weights: AdapterWeights) -> int:
        """Put an adapter in a slot (free, else the least recently used unpinned one); returns the slot."""
        slot = self.slot_of(name)
        if slot is not None:
            self.touch(slot)
            return slot
        slot = self._victim()
        if self.names[slot] is not None:
            self.evictions += 1
            self._clear(slot)
        self._grow(weights.rank)
        for layer, (a, b, scale) in weights.layers.items():
            self._allocate(layer)
            r = a.shape[0]
            self.A[layer][slot, :r] = a.to(self.device, self.dtype)
            self.B[layer][slot, :, :r] = b.to(self.device, self.dtype)
            self.scale[layer][slot] = scale
        self.names[slot], self.rank[slot], self.targets[slot] = name, weights.rank, frozenset(weights.layers)
        self.touch(slot)
        return slot

    def has_room(self) -> bool:
        """A slot is free, or held by an adapter no running row uses (it would be evicted)."""
        return any(self.pins[s] == 0 for s in range(1, self.slots + 1))

    def _victim(self) -> int:
        free = [s for s in range(1, self.slots + 1) if self.names[s] is None]
        if free:
            return free[0]
        idle = [s for s in range(1, self.slots + 1) if self.pins[s] == 0]
        if not idle:
            raise PoolFull(f"all {self.slots} adapter slots are in use by the running batch")
        return min(idle, key=lambda s: self.last_used[s])

    def free(self, name: str) -> None:
        """Forget an adapter; a slot still pinned by running rows is freed when they leave."""
        slot = self.slot_of(name)
        if slot is None:
            return
        if self.pins[slot]:
            self.doomed.add(slot)  # no longer found by name; not free, not evictable until unpinned
        else:
            self._clear(slot)

    def touch(self, slot: int) -> None:
        self.last_used[slot] = time.monotonic()

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1
        self.touch(slot)

    def unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        if self.pins[slot] == 0 and slot in self.doomed:
            self.doomed.discard(slot)
            self._clear(slot)

    def _clear(self, slot: int) -> None:
        for layer in self.targets[slot]:
            self.A[layer][slot].zero_()
            self.B[layer][slot].zero_()
            self.scale[layer][slot] = 0.0
        self.names[slot], self.rank[slot], self.targets[slot] = None, 0, frozenset()

    def _grow(self, rank: int) -> None:
        """Widen every stack to `rank` (zero-padded) when an adapter of a larger rank than any before arrives."""
        import torch

        if rank <= self.rank_cap:
            return
        for layer in self.A:
            a, b = self.A[layer], self.B[layer]
            self.A[layer] = torch.cat([a, a.new_zeros(a.shape[0], rank - self.rank_cap, a.shape[2])], dim=1)
            self.B[layer] = torch.cat([b, b.new_zeros(b.shape[0], b.shape[1], rank - self.rank_cap)], dim=2)
        self.rank_cap = rank

    def _allocate(self, layer: str) -> None:
        import torch

        if layer in self.A:
            return
        fan_in, fan_out = self.shapes[layer]
        n = self.slots + 1
        self.A[layer] = torch.zeros(n, self.rank_cap, fan_in, dtype=self.dtype, device=self.device)
        self.B[layer] = torch.zeros(n, fan_out, self.rank_cap, dtype=self.dtype, device=self.device)
        self.scale[layer] = torch.zeros(n, dtype=self.dtype, device=self.device)

    # -- the forward ------------------------------------------------------------------------------------------
    def set_rows(self, slots: list[int]) -> None:
        """The slot of each batch row for the next forward passes (0: the base model)."""
        import torch

        distinct = set(slots)
        self._single = next(iter(distinct)) if len(distinct) == 1 else None
        self._rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        self._live = frozenset().union(*(self.targets[s] for s in distinct))
        self._width = max(self.rank[s] for s in distinct)

    def _hook(self, layer: str):
        def add_lora(module: Any, args: tuple, output: Any) -> Any:
            if layer not in self._live:
                return output
            return output + self._delta(layer, args[0])

        return add_lora

    def _delta(self, layer: str, x: Any) -> Any:
        import torch

        r = self._width
        if self._single is not None:
            s = self._single
            return (x @ self.A[layer][s, :r].T) @ self.B[layer][s, :, :r].T * self.scale[layer][s]
        rows = self._rows
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1])  # [batch, tokens, in]
        a = self.A[layer][:, :r][rows]  # [batch, r, in]
        b = self.B[layer][:, :, :r][rows]  # [batch, out, r]
        v = torch.bmm(x3, a.transpose(1, 2))
        out = torch.bmm(v, b.transpose(1, 2)) * self.scale[layer][rows].view(-1, 1, 1)
        return out.reshape(*shape[:-1], out.shape[-1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.A, self.B) for t in list(d.values()))
