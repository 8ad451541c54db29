"""Training speed against this machine's own peak: what a training step computes, how fast, and what the levers save.

    .venv/bin/python bench/distill.py --throughput-only --throughput-steps 12 --agents sgd_Restaurants

(`bench/distill.py` curates the shipped logs and calls `levers` and `matmul_peak` here.)

- **Peak**: GFLOP/s of a fp32 (and bf16) matmul of the training shapes (tokens x hidden @ hidden x {hidden,
  intermediate}, intermediate x hidden), at the thread count the training loop uses.
- **Model FLOPs** of a batch: 4 x the decoder's linear weights per real token (forward + the input gradient; the base
  is frozen, so no weight gradient), the LoRA factors' 6 x, the output layer only at answer positions, and
  attention's 12 x hidden x (positions attended) per token. Padding is not counted: it is waste.
- **Levers**: the same batches, from the same initial adapter, through one plain PyTorch loop twice: rows computed
  whole (`share_prefix` off, the loop before the lever) and rows that share their tools block computed once
  (`share_prefix` on). The lever changes no arithmetic, so the two loss curves must agree; the bench prints the
  largest difference. Then the shared-prefix loop once more with the attention training uses on CPU
  (`flywheel.hardware.training_attention`: plain matmul attention instead of PyTorch's fused SDPA kernel, whose
  backward is slow on CPU): the same math in another order, so the losses agree to bf16 rounding.
"""

from __future__ import annotations

import time
from typing import Any


def matmul_peak(threads: int, hidden: int, intermediate: int, rows: int = 2048, repeats: int = 10) -> dict:
    """{dtype: best GFLOP/s over the training shapes} for float32 and bfloat16 at `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    shapes = [(rows, hidden, hidden), (rows, hidden, intermediate), (rows, intermediate, hidden)]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b  # warm-up
            reps = repeats if dtype == torch.float32 else 2  # bf16 without native support is ~30x slower
            started = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - started) / 1e9)
        out[str(dtype).removeprefix("torch.")] = round(best, 1)
    return out


def linear_params(model: Any) -> dict:
    """{"frozen": weights of the decoder's linear layers, "lora": trainable parameters, "head": the output layer}."""
    import torch

    frozen = 0
    head = model.get_output_embeddings().weight.numel()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name and module is not model.get_output_embeddings():
            frozen += module.weight.numel()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"frozen": frozen, "lora": lora, "head": head}


def batch_flops(rows: list[dict], shared: int, params: dict, layers: int, hidden: int) -> float:
    """Model FLOPs of one training step over `rows` (see the module doc); `shared`: the prefix computed once."""
    tokens = shared + sum(len(r["input_ids"]) - shared for r in rows)
    answers = sum(r["answer_len"] for r in rows)
    attended = shared * (shared + 1) / 2 + sum(
        (len(r["input_ids"]) - shared) * shared + (len(r["input_ids"]) - shared) * (len(r["input_ids"]) - shared + 1) / 2
        for r in rows)
    return (4 * params["frozen"] + 6 * params["lora"]) * tokens + 4 * params["head"] * answers + \
        12 * hidden * layers * attended


def levers(student: str, examples: list[dict], steps: int, batch: int, threads: int, lr: float,
           max_length: int, max_history: int) -> dict:
    """The plain loop over the same `steps` batches with the shared prefix off, then on (see the module doc)."""
    import torch
    from transformers import AutoTokenizer

    from flywheel.distill.data import encode, length_buckets, shared_prefix_len

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(student)
    encoded = [e for e in (encode(tokenizer, x, max_length, max_history) for x in examples) if e]
    batches = length_buckets(encoded, batch, 0)[:steps]
    runs = {mode: _loop(student, batches, tokenizer.pad_token_id, lr, share, attention)
            for mode, share, attention in (("rows whole", False, "sdpa"), ("shared prefix", True, "sdpa"),
                                           ("eager attention", True, "eager"))}
    before, after, eager = runs["rows whole"], runs["shared prefix"], runs["eager attention"]
    return {"examples": len(encoded), "fit_max_length": f"{len(encoded)} of {len(examples)}", "batch": batch,
            "threads": threads, "steps": len(batches), "runs": runs,
            "mean_shared_prefix": sum(shared_prefix_len(b) for b in batches) / len(batches),
            "speedup_records_per_s": after["records_per_s"] / before["records_per_s"],
            "max_loss_difference": _largest_difference(before, after),
            "attention_speedup_records_per_s": eager["records_per_s"] / after["records_per_s"],
            "attention_max_loss_difference": _largest_difference(after, eager)}


def _largest_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))


def _loop(student: str, batches: list[list[dict]], pad_id: int, lr: float, share: bool, attention: str) -> dict:
    """`batches` through one process's training loop (first step untimed: allocations); throughput and losses."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from flywheel.config import DistillConfig
    from flywheel.distill.answers import Answers
    from flywheel.distill.data import answer_loss, collate
    from flywheel.hardware import native_bf16

    defaults = DistillConfig(agent="bench")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32,
                                                                attn_implementation=attention),
                           LoraConfig(r=defaults.lora_r, lora_alpha=defaults.lora_alpha, lora_dropout=0.0,
                                      target_modules=list(defaults.target_modules), task_type="CAUSAL_LM"))
    params, config = linear_params(model), model.config
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    bf16 = defaults.bf16 and native_bf16("cpu")
    answers, losses = Answers(model).train(), []
    tokens = computed = records = flops = 0.0
    seconds = 0.0
    for i, rows in enumerate(batches):
        started = time.perf_counter()
        inputs = collate(rows, pad_id, share_prefix=share)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = answer_loss(answers, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if i == 0:
            continue
        seconds += time.perf_counter() - started
        shared = inputs["prefix_ids"].shape[1] if "prefix_ids" in inputs else 0
        tokens += int(inputs["attention_mask"].sum())
        computed += inputs["computed_tokens"]
        records += len(rows)
        flops += batch_flops(rows, shared, params, config.num_hidden_layers, config.hidden_size)
    return {"seconds": round(seconds, 1), "records_per_s": records / seconds, "tokens_per_s": tokens / seconds,
            "computed_tokens_per_s": computed / seconds, "model_gflops_per_s": flops / seconds / 1e9,
            "dtype": "bfloat16" if bf16 else "float32", "losses": [round(x, 6) for x in losses],
            "params": params}
