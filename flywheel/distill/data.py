"""Examples -> token ids with an answer mask, and batches; pure functions, no Ray.

The prompt is exactly what Serve will send (`flywheel.prompts`); the target is the teacher's answer in the
student's text form followed by end-of-turn. The loss covers only the answer: `answer_mask` is built from
lengths, never from pad ids (for the student pad == eos == `<|im_end|>`, which is also the last answer token).

Batches are LEFT-padded so that every row's answer sits at the end: the model then only computes the output
layer over the last `answer_len + 1` positions (`logits_to_keep`), which saves ~15% of a step.

Rows that begin alike are computed once: an agent's examples mostly share their system turn (its tools block is
most of each prompt: ~470-750 of ~1,000 tokens for an SGD agent), so `length_buckets` batches examples of the same
system turn together (`prefix_key`) and `collate` splits off the rows' longest common token prefix. `answer_logits`
runs that prefix once, repeats its key/value cache over the rows and runs each row's rest on it: the same logits
and gradients as the plain batch (causal attention: a position sees only what precedes it), in about half the
compute at batch 4. `share_prefix=False` gives the plain batch.

`argument_weight` (> 1) weighs the answer tokens inside a tool call's `arguments` object that many times in the
training loss (the values the student gets wrong are few tokens among many format tokens it learns in an epoch);
validation loss stays unweighted, so early stopping compares runs on one scale.

`swap_values` (a training lever, off by default) adds copies of each training example in which the call's
argument values that the conversation states word for word are swapped, in the conversation and in the call alike,
for other values the same argument takes in the train split: the student then cannot score by recalling the values
it saw most often and has to copy the one this conversation gives.

`take_balanced` shares an example cap between several agents' train splits (a shared adapter);
`mean_answer_loss` is the validation loss that early stopping and the sweep's `eval_loss` read.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

from flywheel.models import cache_keyword
from flywheel.prompts import MIN_SHARED_PREFIX, common_prefix_len, format_with_spans, prompt_turns


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
        turns = prompt_turns(example, history, tool_format)
        prompt_ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
        if len(prompt_ids) + len(answer_ids) <= max_length:
            return {"input_ids": list(prompt_ids) + answer_ids, "answer_len": len(answer_ids),
                    "prefix_key": _prefix_key(turns), **weights}
    return None


def _prefix_key(turns: list[dict]) -> str:
    """What examples whose prompts begin with the same tokens have in common: their system turn (tools included)."""
    first = turns[0] if turns and turns[0]["role"] == "system" else {"content": ""}
    return hashlib.sha256(first["content"].encode()).hexdigest()[:16]


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


MIN_SWAP_CHARS = 3  # shorter values ("4", "no") match too much unrelated text to swap safely


def swap_values(examples: list[dict], copies: int, seed: int) -> list[dict]:
    """`examples` plus up to `copies` variants of each with its call's verbatim-stated values swapped (see above).
    An example none of whose values can be swapped gets no variant; values only come from `examples` themselves."""
    pool = _value_pool(examples)
    rng = random.Random(seed)
    variants = []
    for ex in examples:
        for i in range(copies):
            variant = _swapped(ex, pool, rng, i)
            if variant is not None:
                variants.append(variant)
    return examples + variants


def _calls(example: dict) -> list[tuple[str, dict]]:
    """(function name, arguments) of each call in an example's target whose arguments parse as a JSON object."""
    out = []
    for call in (example["target"] or {}).get("tool_calls") or []:
        try:
            args = json.loads(call["arguments"] or "{}")
        except (TypeError, ValueError):
            continue
        if isinstance(args, dict):
            out.append((call["name"], args))
    return out


def _value_pool(examples: list[dict]) -> dict[tuple[str, str], list[str]]:
    """(function, argument) -> the distinct string values it takes in `examples`, sorted (a stable choice order)."""
    pool: dict[tuple[str, str], set[str]] = {}
    for ex in examples:
        for name, args in _calls(ex):
            for key, value in args.items():
                if isinstance(value, str) and len(value) >= MIN_SWAP_CHARS:
                    pool.setdefault((name, key), set()).add(value)
    return {k: sorted(v) for k, v in pool.items()}


def _whole(value: str) -> str:
    """A regex matching `value` as whole words (not inside a longer word)."""
    return rf"(?<!\w){re.escape(value)}(?!\w)"


def _stated(value: str) -> re.Pattern:
    return re.compile(_whole(value), re.IGNORECASE)


def _swapped(example: dict, pool: dict, rng: random.Random, copy: int) -> dict | None:
    """One variant of `example`, or None when no value of its call is both stated verbatim and swappable."""
    texts = [m.get("content") or "" for m in example["messages"]]
    conversation = "\n".join(texts)
    mapping: dict[str, str] = {}
    for name, args in _calls(example):
        for key, value in args.items():
            if not isinstance(value, str) or value.lower() in mapping or not _stated(value).search(conversation):
                continue
            others = [v for v in pool.get((name, key), ()) if v.lower() != value.lower()
                      and not _stated(v).search(conversation)]
            if others:
                mapping[value.lower()] = rng.choice(others)
    if not mapping:
        return None
    pattern = re.compile("|".join(_whole(v) for v in sorted(mapping, key=len, reverse=True)), re.IGNORECASE)

    def swap(text: str | None) -> str | None:
        return text if text is None else pattern.sub(lambda m: mapping.get(m.group(0).lower(), m.group(0)), text)

    def swap_message(m: dict) -> dict:
        calls = [{**c, "arguments": _swap_arguments(c["arguments"], swap)} for c in m.get("tool_calls") or []]
        return {**m, "content": swap(m.get("content")), "tool_calls": calls or m.get("tool_calls")}

    return {**example, "example_id": f"{example['example_id']}~swap{copy}",
            "messages": [swap_message(m) for m in example["messages"]], "target": swap_message(example["target"])}


def _swap_arguments(arguments: str | None, swap: Any) -> str | None:
    """A call's arguments JSON with every string value that is a swapped value replaced (whole values only)."""
    try:
        args = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        return arguments
    if not isinstance(args, dict):
        return arguments
    return json.dumps({k: swap(v) if isinstance(v, str) else v for k, v in args.items()}, ensure_ascii=False)


def length_buckets(items: list[dict], batch_size: int, seed: int) -> list[list[dict]]:
    """Batches of one `prefix_key` and similar length (a shared prefix, less padding), in a shuffled order that is
    the same for every worker."""
    rng = random.Random(seed)
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(item.get("prefix_key", ""), []).append(item)
    chunk = batch_size * 8
    batches = []
    for key in sorted(groups):
        shuffled = groups[key][:]
        rng.shuffle(shuffled)
        for i in range(0, len(shuffled), chunk):
            group = sorted(shuffled[i:i + chunk], key=lambda x: len(x["input_ids"]))
            batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def shared_prefix_len(batch: list[dict]) -> int:
    """The longest token prefix every row's prompt begins with, short of its last prompt token (that position
    predicts the row's first answer token, so it stays in the row's own part); 0 below `MIN_SHARED_PREFIX` or for
    a single row."""
    n = common_prefix_len([x["input_ids"][:len(x["input_ids"]) - x["answer_len"]] for x in batch])
    return n if n >= MIN_SHARED_PREFIX else 0


def collate(batch: list[dict], pad_id: int, share_prefix: bool = True) -> dict:
    """Left-pad a batch; positions restart at 0 on the first real token of each row. With `share_prefix` and a
    common prefix of P tokens (`shared_prefix_len`), `prefix_ids` [1, P] holds it and the padded rows hold the rest,
    with positions from P and an attention mask over prefix + rest. `computed_tokens`: the positions a forward pass
    computes (real tokens, the prefix counted once)."""
    import torch

    shared = shared_prefix_len(batch) if share_prefix else 0
    if shared:
        rest = collate([{**x, "input_ids": x["input_ids"][shared:]} for x in batch], pad_id, share_prefix=False)
        mask = torch.cat([torch.ones((len(batch), shared), dtype=torch.long), rest["attention_mask"]], dim=1)
        return {**rest, "prefix_ids": torch.tensor([batch[0]["input_ids"][:shared]]), "attention_mask": mask,
                "position_ids": rest["position_ids"] + shared, "computed_tokens": rest["computed_tokens"] + shared}
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
            "answer_width": max(x["answer_len"] for x in batch), "computed_tokens": int(mask.sum()),
            **({"answer_weights": weights} if weights is not None else {})}


def answer_logits(model: Any, batch: dict) -> tuple[Any, Any]:
    """Float logits at the answer positions and the answer tokens they predict: ([N, vocab], [N]). `model`: a
    causal LM (a Hugging Face or PEFT model); a batch with `prefix_ids` runs the prefix once (see the module doc)."""
    k = batch["answer_width"]
    cache = _prefix_cache(model, batch["prefix_ids"], len(batch["input_ids"])) if "prefix_ids" in batch else None
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=k + 1, use_cache=cache is not None,
                **{cache_keyword(): cache})
    logits = out.logits[:, :-1, :].float()  # positions T-k-1 .. T-2 predict tokens T-k .. T-1
    keep = batch["answer_mask"][:, -k:]
    return logits[keep], batch["input_ids"][:, -k:][keep]


def _prefix_cache(model: Any, prefix_ids: Any, rows: int) -> Any:
    """The key/value cache of one forward pass over `prefix_ids` [1, P], repeated for `rows` rows (differentiable:
    each row's gradient flows back into the one prefix pass)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1, **{cache_keyword(): cache})  # fills `cache`
    cache.batch_repeat_interleave(rows)
    return cache


def mean_answer_loss(model: Any, encoded: list[dict], pad_id: int, batch_size: int, device: Any = None,
                     autocast: Any = None) -> tuple[float, int]:
    """(summed cross-entropy, answer tokens) of the teacher's answers over `encoded` examples, without gradients:
    validation loss = sum / tokens. `autocast`: a context for the forward passes (training's bf16 autocast)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from flywheel.distill.answers import answers_of

    total, tokens = 0.0, 0
    ordered = sorted(encoded, key=lambda x: (x.get("prefix_key", ""), len(x["input_ids"])))  # shared prefixes
    with torch.no_grad():
        for i in range(0, len(ordered), batch_size):
            batch = collate(ordered[i:i + batch_size], pad_id)
            if device is not None:
                batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
            with autocast if autocast is not None else contextlib.nullcontext():
                logits, targets = answers_of(model, batch)
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
    of answer tokens). `model`: a causal LM or an `answers.Answers` module (wrapped or not); `teacher`: a causal LM."""
    import torch
    import torch.nn.functional as F

    from flywheel.distill.answers import answers_of

    logits, targets = answers_of(model, batch)
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
