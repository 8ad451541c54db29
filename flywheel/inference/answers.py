"""Answers for a list of prompts: the engine's greedy generations in fixed-size batches, parsed into the OpenAI
message shape (`flywheel.prompts.parse_answer`), with each request's latency and each answer's confidence
(`flywheel.inference.confidence`). Evaluation scores systems with it and sweeps rank trials with it, so a trial is
ranked on answers generated exactly as the gate's are.

Prompts are batched in the order of their system turn (where an agent's tools block lives), so the rows of one
batch share it and the engine prefills it once; results come back in the caller's order."""

from __future__ import annotations

import time


def generate_answers(engine, prompts: list[list[dict]], adapter: str | None, batch_size: int, max_new_tokens: int,
                     progress=None, constraints: list[dict | None] | None = None) -> dict:
    """Answers (OpenAI message shape), their raw text and finish reason, each request's latency (its batch's
    seconds), each answer's confidence (every aggregate; None where the engine gives no log-probabilities), wall
    and CPU seconds.
    `constraints`: one `flywheel.inference.grammar` spec (or None) per prompt, decoded under it."""
    from flywheel.inference.confidence import answer_confidence
    from flywheel.prompts import parse_answer

    n = len(prompts)
    answers, texts, finished, confidence = [None] * n, [""] * n, [""] * n, [None] * n
    latency = [0.0] * n
    order = by_system_turn(prompts)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, n, batch_size):
        rows = order[i:i + batch_size]
        started = time.perf_counter()
        extra = {"constraints": [constraints[r] for r in rows]} if constraints is not None else {}
        gens = engine.generate([prompts[r] for r in rows], [adapter] * len(rows), max_new_tokens, **extra)
        seconds = time.perf_counter() - started
        for r, g in zip(rows, gens):
            answers[r], texts[r], finished[r], latency[r] = parse_answer(g.text), g.text, g.finish_reason, seconds
            confidence[r] = answer_confidence(g.text, g.token_ends, g.logprobs)
        if progress is not None:
            progress.update(len(rows))
    return {"answers": answers, "text": texts, "finish_reason": finished, "latency_s": latency,
            "confidence": confidence, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def by_system_turn(prompts: list[list[dict]]) -> list[int]:
    """Prompt indices, those with the same system turn together (stable: first appearance order)."""
    first: dict[str, int] = {}
    key = [str(p[0].get("content")) if p and p[0].get("role") == "system" else "" for p in prompts]
    for i, k in enumerate(key):
        first.setdefault(k, i)
    return sorted(range(len(prompts)), key=lambda i: first[key[i]])
