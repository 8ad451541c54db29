"""Answers for a list of prompts: the engine's greedy generations in fixed-size batches, parsed into the OpenAI
message shape (`flywheel.prompts.parse_answer`), with each request's latency and each answer's confidence
(`flywheel.inference.confidence`). Evaluation scores systems with it and sweeps rank trials with it, so a trial is
ranked on answers generated exactly as the gate's are."""

from __future__ import annotations

import time


def generate_answers(engine, prompts: list[list[dict]], adapter: str | None, batch_size: int, max_new_tokens: int,
                     progress=None, constraints: list[dict | None] | None = None) -> dict:
    """Answers (OpenAI message shape), each request's latency (its batch's seconds), each answer's confidence
    (every aggregate; None where the engine gives no log-probabilities), wall and CPU seconds.
    `constraints`: one `flywheel.inference.grammar` spec (or None) per prompt, decoded under it."""
    from flywheel.inference.confidence import answer_confidence
    from flywheel.prompts import parse_answer

    answers, latency, confidence = [], [], []
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        started = time.perf_counter()
        extra = {"constraints": constraints[i:i + batch_size]} if constraints is not None else {}
        gens = engine.generate(chunk, [adapter] * len(chunk), max_new_tokens, **extra)
        latency += [time.perf_counter() - started] * len(chunk)
        answers += [parse_answer(g.text) for g in gens]
        confidence += [answer_confidence(g.text, g.token_ends, g.logprobs) for g in gens]
        if progress is not None:
            progress.update(len(chunk))
    return {"answers": answers, "latency_s": latency, "confidence": confidence, "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu}
