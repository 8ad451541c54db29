"""Serving benchmark: streamed vs non-streamed answers through the real HTTP endpoint, in one run.

    .venv/bin/python bench/serve.py                                  # real student, 4 agents, ~3 min here
    .venv/bin/python bench/serve.py stream --agents 8 --requests 48 --concurrency 8 --max-tokens 48
    .venv/bin/python bench/serve.py fleet                            # 1,000 agents: see bench/fleet.py

It builds a home with `--agents` agents, each with its own LoRA adapter (random weights: throughput does not depend
on what an adapter learned) on the student base, starts the Flywheel Serve app on the local Ray, and sends the same
prompts from concurrent official `openai` clients (AsyncOpenAI) twice: once with `stream: true`, once without.
For each mode it prints p50 / p95 time to first token (streamed: the first content or tool-call delta; plain:
the whole answer, which is when its first token reaches the caller) and total latency, and output tokens/s; then
the ratios streamed / plain. It also times a 20 MB request body (413 before it is read) and a normal request right
after it (the replica keeps serving). Results go to bench/figures/serve-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # noqa: E402  (bench/results.py)
from traffic import PROMPTS, free_port, one, pct  # noqa: E402  (bench/traffic.py)

def make_adapter(base: str, out_dir: str, seed: int, rank: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for p in model.parameters():  # small random LoRA weights: the base model's text stays readable
        if p.requires_grad:
            p.data.mul_(0.01)
    model.save_pretrained(out_dir)
    return out_dir


def build_home(root: str, base: str, agents: int, rank: int) -> tuple[str, list[str]]:
    from flywheel.registry.registry import Registry
    from flywheel.routing import register_agent
    from flywheel.storage import Store

    store = Store(os.path.join(root, "home"))
    registry = Registry(store)
    names = [f"bench_agent_{i:03d}" for i in range(agents)]
    for i, agent in enumerate(names):
        adapter = make_adapter(base, os.path.join(root, "adapters", agent), seed=i, rank=rank)
        entry = registry.register(agent, adapter, {"dataset_version": "bench", "base_model": base})
        registry.promote(agent, entry["version"])
        register_agent(store, agent, tenant="bench")
    return store.uri, names


async def run_mode(url: str, agents: list[str], stream: bool, requests: int, concurrency: int,
                   max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)

    async def task(i: int) -> dict:
        async with sem:
            return await one(client, agents[i % len(agents)], PROMPTS[i % len(PROMPTS)], stream, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(task(i) for i in range(requests)))
    wall = time.perf_counter() - start
    await client.close()
    return summarise(results, wall)


def summarise(results: list[dict], wall: float) -> dict:
    ttft, total = [r["ttft"] for r in results], [r["total"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": round(wall, 2), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "total_p50": pct(total, 0.5), "total_p95": pct(total, 0.95),
            "ttft_over_total_p50": round(statistics.median(r["ttft"] / r["total"] for r in results), 3)}


def oversized(url: str, agent: str) -> dict:
    import httpx

    body = json.dumps({"model": agent, "messages": [{"role": "user", "content": "x" * 20_000_000}]}).encode()
    start = time.perf_counter()
    r = httpx.post(f"{url}/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=600)
    rejected = time.perf_counter() - start
    start = time.perf_counter()
    ok = httpx.post(f"{url}/chat/completions", json={"model": agent, "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hi"}]}, timeout=600)
    return {"status": r.status_code, "seconds": round(rejected, 3), "code": r.json()["error"]["code"],
            "next_request_status": ok.status_code, "next_request_seconds": round(time.perf_counter() - start, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=os.environ.get("FLYWHEEL_STUDENT",
                                                          os.path.join(REPO, "models", "smollm2-135m-instruct")))
    modes = p.add_subparsers(dest="mode")
    stream = modes.add_parser("stream", help="streamed vs non-streamed answers, a 20 MB body (the default)")
    stream.add_argument("--agents", type=int, default=4)
    stream.add_argument("--rank", type=int, default=8)
    stream.add_argument("--requests", type=int, default=24)
    stream.add_argument("--concurrency", type=int, default=4)
    stream.add_argument("--max-tokens", type=int, default=32)
    stream.add_argument("--max-batch-size", type=int, default=8)
    stream.add_argument("--replica-cpus", type=float, default=2.0)
    import fleet

    fleet.add_arguments(modes.add_parser("fleet", help="1,000 agents' adapters, Zipf traffic: (a) vs (b) vs (c)",
                                         description=fleet.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(sys.argv[1:] if len(sys.argv) > 1 and sys.argv[1] in ("stream", "fleet", "-h", "--help")
                        else ["stream", *sys.argv[1:]])
    if args.mode == "fleet":
        return fleet.run_fleet(args)
    return run_stream(args)


def run_stream(args) -> int:
    import ray

    from flywheel.config import ServeConfig
    from flywheel.serve.app import run, shutdown

    root = tempfile.mkdtemp(prefix="flywheel-bench-serve-")
    t0 = time.perf_counter()
    home, agents = build_home(root, args.base_model, args.agents, args.rank)
    print(f"home with {len(agents)} adapters (r{args.rank}) in {time.perf_counter() - t0:.1f}s: {home}", flush=True)
    ray.init(num_cpus=max(2, int(args.replica_cpus)), include_dashboard=False, log_to_driver=False)
    url = run(ServeConfig(home=home, base_model=args.base_model, port=free_port(), replica_cpus=args.replica_cpus,
                          max_batch_size=args.max_batch_size, max_new_tokens=args.max_tokens, auth="off",
                          rate_limit_rps=0, batch_wait_s=0.01), ready_timeout_s=300)
    try:
        asyncio.run(run_mode(url, agents, False, min(len(agents), args.requests), args.concurrency, 2))  # warm
        out = {"config": vars(args)}
        for name, stream in (("streamed", True), ("plain", False)):
            out[name] = asyncio.run(run_mode(url, agents, stream, args.requests, args.concurrency, args.max_tokens))
            print(name, json.dumps(out[name]), flush=True)
        out["oversized_body"] = oversized(url, agents[0])
    finally:
        shutdown()
        ray.shutdown()
    s, n = out["streamed"], out["plain"]
    print(f"\n{args.requests} requests, {args.concurrency} concurrent clients, {len(agents)} agents, "
          f"max_tokens {args.max_tokens}, real student {os.path.basename(args.base_model)}")
    print("| mode | TTFT p50 | TTFT p95 | total p50 | total p95 | output tok/s |")
    print("|---|---|---|---|---|---|")
    for name, r in (("streamed", s), ("non-streamed", n)):
        print(f"| {name} | {r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s | {r['total_p50']:.2f} s | "
              f"{r['total_p95']:.2f} s | {r['tokens_per_s']} |")
    print(f"streamed / non-streamed: TTFT p50 {s['ttft_p50'] / n['ttft_p50']:.2f}x, total p50 "
          f"{s['total_p50'] / n['total_p50']:.2f}x, tokens/s {s['tokens_per_s'] / n['tokens_per_s']:.2f}x; "
          f"streamed first token at {s['ttft_over_total_p50']:.0%} of the answer's time (median)")
    o = out["oversized_body"]
    print(f"20 MB body: HTTP {o['status']} ({o['code']}) in {o['seconds']} s; next request HTTP "
          f"{o['next_request_status']} in {o['next_request_seconds']} s")
    results.save("serve", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
