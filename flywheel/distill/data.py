"""Examples -> token ids with an answer mask, and batches; pure functions, no Ray.

The prompt is exactly what Serve will send (`flywheel.prompts`); the target is the teacher's answer in the
student's text form followed by end-of-turn. The loss covers only the answer: `answer_mask` is built from
lengths, never from pad ids (for the student pad == eos == `<|im_end|>`, which is also the last answer token).

Batches are LEFT-padded so that every row's answer sits at the end: the model then only computes the output
layer over the last `answer_len + 1` positions (`logits_to_keep`), which saves ~15% of a step.

`argument_weight` (> 1) weighs the answer tokens inside a tool call's `arguments` object that many times in the
training loss (the values the student gets wrong are few tokens among many format tokens it learns in an epoch);
validation loss stays unweighted, so early stopping compares runs on one scale.

`take_balanced` shares an example cap between several agents' train splits (a shared adapter);
`mean_answer_loss` is the validation loss that early stopping and the sweep's `eval_loss` read.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from flywheel.prompts import format_with_spans, prompt_turns


def encode(tokenizer: Any, example: dict, max_length: int, max_history: int,
           tool_format: str = "signatures", argument_weight: float = 1.0) -> dict | None:
    """One EXAMPLE row -> {"input_ids", "answer_len"} (+ "answer_weights" when `argument_weight` != 1); drops
    history turns until it fits, None if it never does."""
    text, spans = format_with_spans(example["target"])
    answer = tokenizer(text + tokenizer.eos_token, add_special_tokens=False,
                       return_offsets_mapping=argument_weight != 1)
    answer_ids = answer["input_ids"]
    weights = {} if argument_weight == 1 else \
        {"answer_weights": _argument_weights(spans, answer["offset_mapping"], argument_weight)}
    for history in range(max_history, 0, -1):
        prompt_ids = tokenizer.apply_chat_template(prompt_turns(example, history, tool_format),
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
        if len(prompt_ids) + len(answer_ids) <= max_length:
            return {"input_ids": list(prompt_ids) + answer_ids, "answer_len": len(answer_ids), **weights}
    return None


def _argument_weights(spans: list[tuple[int, int]], offsets: list, weight: float) -> list[float]:
    """A token's weight: `weight` when it overlaps a tool call's arguments (`prompts.format_with_spans`), else 1."""
    return [weight if any(a < end and b > start for start, end in spans) else 1.0 for a, b in offsets]


def take_balanced(groups: dict[str, list[dict]], max_examples: int, seed: int) -> list[dict]:
    """Several datasets' examples -> one list of at most `max_examples` (0: all), shared equally between the groups:
    a group smaller than its share keeps everything and leaves the rest to the others (water-filling). Within a
    group the examples kept are the first in a seeded hash order of their record ids, so a rerun keeps the same."""
    if max_examples <= 0 or sum(len(g) for g in groups.values()) <= max_examples:
        return [ex for name in sorted(groups) for ex in groups[name]]
    order = sorted(groups, key=lambda name: (len(groups[name]), name))
    left, out = max_examples, []
    for i, name in enumerate(order):
        quota = min(len(groups[name]), left // (len(order) - i))
        left -= quota
        ranked = sorted(groups[name], key=lambda ex: hashlib.sha256(f"{seed}:{ex['record_id']}".encode()).hexdigest())
        out += ranked[:quota]
    return out


def length_buckets(items: list[dict], batch_size: int, seed: int) -> list[list[dict]]:
    """Batches of similar length (less padding), in a shuffled order that is the same for every worker."""
    rng = random.Random(seed)
    shuffled = items[:]
    rng.shuffle(shuffled)
    chunk = batch_size * 8
    batches = []
    for i in range(0, len(shuffled), chunk):
        group = sorted(shuffled[i:i + chunk], key=lambda x: len(x["input_ids"]))
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(batch: list[dict], pad_id: int) -> dict:
    """Left-pad a batch; positions restart at 0 on the first real token of each row."""
    import torch

    width = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    answer = torch.zeros((len(batch), width), dtype=torch.bool)
    weights = torch.ones((len(batch), width)) if any("answer_weights" in x for x in batch) else None
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, width - n:] = torch.tensor(x["input_ids"])
        mask[i, width - n:] = 1
        answer[i, width - x["answer_len"]:] = True
        if weights is not None and "answer_weights" in x:
            weights[i, width - x["answer_len"]:] = torch.tensor(x["answer_weights"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "answer_mask": answer,
            "answer_width": max(x["answer_len"] for x in batch), **({"answer_weights": weights} if weights is not None
                                                                   else {})}


def answer_logits(model: Any, batch: dict) -> tuple[Any, Any]:
    """Float logits at the answer positions and the answer tokens they predict: ([N, vocab], [N])."""
    k = batch["answer_width"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=k + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float()  # positions T-k-1 .. T-2 predict tokens T-k .. T-1
    keep = batch["answer_mask"][:, -k:]
    return logits[keep], batch["input_ids"][:, -k:][keep]


def mean_answer_loss(model: Any, encoded: list[dict], pad_id: int, batch_size: int, device: Any = None,
                     autocast: Any = None) -> tuple[float, int]:
    """(summed cross-entropy, answer tokens) of the teacher's answers over `encoded` examples, without gradients:
    validation loss = sum / tokens. `autocast`: a context for the forward passes (training's bf16 autocast)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = collate(encoded[i:i + batch_size], pad_id)
            if device is not None:
                batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
            with autocast if autocast is not None else contextlib.nullcontext():
                logits, targets = answer_logits(model, batch)
            total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            tokens += int(targets.numel())
    return total, tokens


def kd_loss(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Token-level distillation: T^2 * mean over answer tokens of KL(teacher_T || student_T) (Hinton et al.).

    The T^2 factor keeps the gradient scale independent of the temperature. Both inputs are [N, vocab] over the
    same tokenizer's vocabulary (checked before training, see `check_same_tokenizer`).
    """
    import torch.nn.functional as F

    t = temperature
    log_student = F.log_softmax(student_logits / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return kl.mean() * t * t


def answer_loss(model: Any, batch: dict, teacher: Any = None, kd_weight: float = 0.0,
                temperature: float = 1.0) -> tuple[Any, int]:
    """Cross-entropy over answer tokens only (weighted by `answer_weights` where the batch has them), plus
    `kd_weight` x the KL to a local teacher's logits when one is given: (1 - w) * CE + w * KD. Returns (loss, number
    of answer tokens)."""
    import torch
    import torch.nn.functional as F

    logits, targets = answer_logits(model, batch)
    if "answer_weights" in batch:
        k = batch["answer_width"]
        weights = batch["answer_weights"][:, -k:][batch["answer_mask"][:, -k:]].to(logits.dtype)
        loss = (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / weights.sum()
    else:
        loss = F.cross_entropy(logits, targets)
    if teacher is not None and kd_weight > 0:
        with torch.no_grad():
            teacher_logits, _ = answer_logits(teacher, batch)
        vocab = min(logits.shape[-1], teacher_logits.shape[-1])  # embeddings padded past the tokenizer differ
        loss = (1 - kd_weight) * loss + kd_weight * kd_loss(logits[:, :vocab], teacher_logits[:, :vocab], temperature)
    return loss, int(targets.numel())


def check_same_tokenizer(student: Any, teacher: Any) -> None:
    """Logit distillation compares distributions over token ids: both models must share one vocabulary."""
    from flywheel.config import ConfigError

    s, t = student.get_vocab(), teacher.get_vocab()
    if s != t or student.eos_token != teacher.eos_token:
        only = sorted(set(s) ^ set(t))[:5]
        raise ConfigError(
            f"teacher_model: its tokenizer differs from the student's ({len(t):,} vs {len(s):,} tokens, "
            f"e.g. {only or 'same tokens with different ids'}); token-level distillation needs a shared "
            "tokenizer. Use a teacher of the same family or set kd_weight to 0 (sequence-level distillation only).")
