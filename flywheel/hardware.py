"""What the machine computes natively: the one place that decides bf16 vs fp32 for training and serving.

bf16 on a CPU without AVX512-BF16 / AMX is emulated: measured on an AVX2 machine (SmolLM2-135M + LoRA r16, forward
and backward of 2 x 256 tokens, one thread) 6.9 s in fp32 vs 127 s under bf16 autocast. So bf16 is used only where
the hardware has it: CUDA devices that support it, and CPUs with the `avx512_bf16` or `amx_bf16` flags.

Attention in training (`training_attention`): on CPU, PyTorch's fused SDPA kernel
(`_scaled_dot_product_flash_attention_for_cpu`) is slow in its backward pass: profiled on a 2-core AMD EPYC with
AVX512-BF16 (SmolLM2-135M + LoRA r16 on all projections, bf16 autocast, a 477-token shared prefix and 4 rows of
~290 tokens), it took 40% of a training step (1.3 s forward + 3.0 s backward of 10.8 s), where the plain matmul
attention ("eager") takes 1.6 s in all. Decoding stays on SDPA: there the fused kernel is the faster one
(4 prompts of 1,054 tokens, 24 new tokens: 12 s vs 22 s eager). Measured end to end the gain is small: ~8% for
Ray Train's one-thread workers, none for one process with 2 threads (bench/train_speed.py's "eager attention").
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str = "cpu") -> bool:
    """True where bf16 matmuls run natively on `device_type` ("cpu" or "cuda")."""
    import torch

    if device_type.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX") and \
        any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def training_attention(device_type: str = "cpu") -> str:
    """The attention implementation training loads the model with: "eager" on CPU, "sdpa" elsewhere (module doc)."""
    return "eager" if device_type == "cpu" else "sdpa"
