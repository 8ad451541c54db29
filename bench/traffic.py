"""What the serving benchmarks send and how they count it: the prompts, one timed chat completion from an official
`openai` client (streamed or not), a run of them from concurrent clients, percentiles, a free port, the student
replica's counters.
`bench/serve.py`, `bench/fleet.py`, `bench/peer.py` and `bench/engine.py` share these so their figures are
measured the same way.
"""

from __future__ import annotations

import asyncio
import socket
import time

PROMPTS = ["Find me a flight from San Francisco to Seattle on March 3rd.",
           "I want a table for two at an Italian place in Oakland tonight.",
           "Book a hotel in Paris for three nights starting Friday.",
           "What's the weather going to be like in Denver tomorrow?",
           "Play something by Taylor Swift in the living room.",
           "I need a ride to the airport at 6 am."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client, agent: str, prompt: str, stream: bool, max_tokens: int, **sampling) -> dict:
    """One timed chat completion; `sampling` (e.g. temperature=0) goes into the request as it is."""
    messages = [{"role": "user", "content": prompt}]
    start = time.perf_counter()
    if not stream:
        c = await client.chat.completions.create(model=agent, messages=messages, max_tokens=max_tokens, **sampling)
        total = time.perf_counter() - start
        return {"ttft": total, "total": total, "tokens": c.usage.completion_tokens}
    first, tokens = None, 0
    s = await client.chat.completions.create(model=agent, messages=messages, max_tokens=max_tokens, stream=True,
                                             stream_options={"include_usage": True}, **sampling)
    async for ch in s:
        delta = ch.choices[0].delta if ch.choices else None
        if first is None and delta is not None and (delta.content or delta.tool_calls):
            first = time.perf_counter() - start
        if ch.usage:
            tokens = ch.usage.completion_tokens
    total = time.perf_counter() - start
    return {"ttft": first if first is not None else total, "total": total, "tokens": tokens}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def send(url: str, targets: list[str], concurrency: int, max_tokens: int, **sampling) -> dict:
    """Request i streamed to model `targets[i]` (prompt i mod the prompts) from `concurrency` concurrent clients:
    output tokens/s over the run's wall time, p50/p99 latency and time to first token."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=900)
    sem = asyncio.Semaphore(concurrency)

    async def task(i: int) -> dict:
        async with sem:
            return await one(client, targets[i], PROMPTS[i % len(PROMPTS)], True, max_tokens, **sampling)

    start = time.perf_counter()
    results = await asyncio.gather(*(task(i) for i in range(len(targets))))
    wall = time.perf_counter() - start
    await client.close()
    ttft, total = [r["ttft"] for r in results], [r["total"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "agents": len(set(targets)), "wall_s": round(wall, 1),
            "output_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "total_p50": round(pct(total, 0.5), 2), "total_p99": round(pct(total, 0.99), 2),
            "ttft_p50": round(pct(ttft, 0.5), 2), "ttft_p99": round(pct(ttft, 0.99), 2)}


def student_info() -> dict:
    """`StudentModel.info()` of the served Flywheel app: its engine's counters and adapter slots."""
    from ray import serve

    from flywheel.serve.app import APP_NAME

    return serve.get_deployment_handle("StudentModel", APP_NAME).info.remote().result(timeout_s=60)
