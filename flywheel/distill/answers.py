"""A causal LM as one module from a collated batch to its answer logits: what DDP and DeepSpeed wrap in training.

A batch whose rows share a prefix takes two forward passes of the LM (`data.answer_logits`: the prefix, then the
rows on its cache). DDP must see one forward call per backward (a second call before the backward leaves its
gradient buckets wrong on the first step), so training calls this module once per micro-batch and it makes both
passes inside.
"""

from __future__ import annotations

from typing import Any

import torch

from flywheel.distill.data import answer_logits


class Answers(torch.nn.Module):
    def __init__(self, lm: Any):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict) -> tuple[Any, Any]:
        return answer_logits(self.lm, batch)


def answers_of(model: Any, batch: dict) -> tuple[Any, Any]:
    """(answer logits, answer tokens) of `batch` from a causal LM, an `Answers` module, or either wrapped by DDP or
    a DeepSpeed engine (they keep the wrapped module as `.module`)."""
    if isinstance(model, Answers) or isinstance(getattr(model, "module", None), Answers):
        return model(batch)
    return answer_logits(model, batch)
