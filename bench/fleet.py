"""Many agents on one base: 1,000 distinct LoRA adapters, Zipf traffic, through the real HTTP endpoint (in one run).

    .venv/bin/python bench/serve.py fleet                          # 1,000 agents, ~15 min on 2 CPU cores
    .venv/bin/python bench/serve.py fleet --agents 200 --requests 120

Builds a home with `--agents` agents, each with its own LoRA adapter (random weights, rank `--rank` on q/v: what
an adapter learned does not change its cost), registered and promoted, starts Flywheel Serve on the real student,
and sends `--requests` chat completions (streamed, `--max-tokens` each) from `--concurrency` concurrent official
`openai` clients, agents drawn from a Zipf distribution (exponent `--zipf`: a few agents carry most traffic, most
are seen once). Three runs, same prompts:
  (a) fleet: the Zipf traffic over all agents, mixed batches, adapters in LRU slots;
  (b) one adapter: the same requests all sent to the most popular agent;
  (c) naive: the same Zipf traffic on a student that holds one adapter and decodes one request at a time
      (`max_batch_size 1`, one resident adapter, one adapter per replica: an adapter swap per request).
Each prints output tokens/s, p50/p99 latency and time to first token, adapter loads and evictions, and the
student replica's resident memory; then (a)/(b) and (a)/(c). Results go to bench/figures/fleet-<time>.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time

import results
from traffic import free_port, send, student_info  # bench/traffic.py

ZIPF_SEED = 7


def write_adapters(base: str, root: str, agents: int, rank: int) -> list[str]:
    """`agents` PEFT folders with random LoRA weights of the same shapes (one template made by PEFT)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    template = os.path.join(root, "template")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(template)
    shapes = {k: tuple(v.shape) for k, v in _saved(template).items()}
    paths = []
    for i in range(agents):
        out = os.path.join(root, f"a{i:05d}")
        os.makedirs(out)
        shutil.copy(os.path.join(template, "adapter_config.json"), out)
        g = torch.Generator().manual_seed(i)
        save_file({k: (torch.randn(s, generator=g) * 0.01).contiguous() for k, s in shapes.items()},
                  os.path.join(out, "adapter_model.safetensors"))
        paths.append(out)
    return paths


def _saved(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def build_home(root: str, base: str, agents: int, rank: int) -> tuple[str, list[str]]:
    from flywheel.registry.registry import Registry
    from flywheel.routing import register_agent
    from flywheel.storage import Store

    store = Store(os.path.join(root, "home"))
    registry = Registry(store)
    names = [f"fleet_{i:05d}" for i in range(agents)]
    for agent, adapter in zip(names, write_adapters(base, os.path.join(root, "adapters"), agents, rank)):
        entry = registry.register(agent, adapter, {"dataset_version": "bench", "base_model": base})
        registry.promote(agent, entry["version"])
        register_agent(store, agent, tenant="bench")
    shutil.rmtree(os.path.join(root, "adapters"))
    return store.uri, names


def zipf_agents(agents: list[str], requests: int, exponent: float) -> list[str]:
    weights = [1.0 / (k + 1) ** exponent for k in range(len(agents))]
    return random.Random(ZIPF_SEED).choices(agents, weights=weights, k=requests)


def _student_info() -> dict:
    """Adapter counters and resident memory of every StudentModel replica."""
    import psutil

    from flywheel.serve.app import APP_NAME

    info = student_info()
    replicas = [p for p in psutil.process_iter(["cmdline"])  # Ray titles a replica "ray::ServeReplica:<app>:<name>"
                if "ServeReplica:" + APP_NAME + ":StudentModel" in " ".join(p.info["cmdline"] or [])]
    info["rss_mb"] = [round(p.memory_info().rss / 2 ** 20) for p in replicas]
    return info


def _counters(before: dict, after: dict) -> dict:
    keys = ("adapter_loads", "adapter_evictions", "adapter_reloads", "adapter_failures")
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys + ("mixed_batches",)} | {
        "rss_mb": after["rss_mb"], "largest_batch": after.get("largest_batch", 0)}


def _measure(cfg, targets: list[str], args) -> dict:
    from flywheel.serve.app import run, shutdown

    url = run(cfg, ready_timeout_s=600)
    try:
        asyncio.run(send(url, targets[:4], 4, 2))  # warm: first compile / first adapters
        before = _student_info()
        out = asyncio.run(send(url, targets, args.concurrency, args.max_tokens))
        out.update(_counters(before, _student_info()))
    finally:
        shutdown()
    return out


def run_fleet(args) -> int:
    import tempfile

    import ray

    from flywheel.config import ServeConfig

    root = tempfile.mkdtemp(prefix="flywheel-bench-fleet-")
    t0 = time.perf_counter()
    home, agents = build_home(root, args.base_model, args.agents, args.rank)
    print(f"home with {len(agents)} agents, one r{args.rank} adapter each, in {time.perf_counter() - t0:.0f}s",
          flush=True)
    traffic = zipf_agents(agents, args.requests, args.zipf)
    hot = max(set(traffic), key=traffic.count)
    common = dict(home=home, base_model=args.base_model, replica_cpus=args.replica_cpus, auth="off",
                  rate_limit_rps=0, max_new_tokens=args.max_tokens, num_replicas=1, batch_wait_s=0.01)
    ray.init(num_cpus=max(2, int(args.replica_cpus)), include_dashboard=False, log_to_driver=False)
    try:
        runs = {}
        mixed = ServeConfig(port=free_port(), max_batch_size=args.max_batch_size,
                            max_resident_adapters=args.resident, **common)
        runs["fleet"] = _measure(mixed, traffic, args)
        print("fleet", json.dumps(runs["fleet"]), flush=True)
        runs["one_adapter"] = _measure(ServeConfig(port=free_port(), max_batch_size=args.max_batch_size,
                                                   max_resident_adapters=args.resident, **common),
                                       [hot] * len(traffic), args)
        print("one_adapter", json.dumps(runs["one_adapter"]), flush=True)
        naive = ServeConfig(port=free_port(), max_batch_size=1, max_resident_adapters=1,
                            max_adapters_per_replica=1, **common)
        runs["naive"] = _measure(naive, traffic, args)
        print("naive", json.dumps(runs["naive"]), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    _report(args, runs, traffic)
    return 0


def _report(args, runs: dict, traffic: list[str]) -> None:
    print(f"\n{args.requests} streamed requests over {len(set(traffic))} of {args.agents} agents (Zipf "
          f"{args.zipf}), {args.concurrency} concurrent clients, {args.max_tokens} tokens, real student, one replica")
    print("| run | output tok/s | total p50 / p99 | TTFT p50 / p99 | adapter loads / evictions | replica RSS |")
    print("|---|---|---|---|---|---|")
    names = {"fleet": "(a) 1,000 agents, mixed batches", "one_adapter": "(b) same traffic, one adapter",
             "naive": "(c) naive: one adapter swapped per request"}
    for key, r in runs.items():
        print(f"| {names[key]} | {r['tokens_per_s']} | {r['total_p50']} / {r['total_p99']} s | {r['ttft_p50']} / "
              f"{r['ttft_p99']} s | {r['adapter_loads']} / {r['adapter_evictions']} | "
              f"{', '.join(f'{m} MB' for m in r['rss_mb'])} |")
    a, b, c = (runs[k]["tokens_per_s"] for k in ("fleet", "one_adapter", "naive"))
    print(f"(a)/(b) = {a / b:.2f} (goal >= 0.8); (a)/(c) = {a / c:.2f} (goal >= 3)")
    results.save("fleet", {"config": vars(args), "runs": runs})


def add_arguments(p) -> None:
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--resident", type=int, default=32, help="LoRA slots per replica (max_resident_adapters)")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--replica-cpus", type=float, default=2.0)
