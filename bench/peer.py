"""Flywheel's serving against vLLM's own OpenAI server on the same traffic, in one run on one machine.

    .venv/bin/python bench/peer.py --requests 48                     # ~15 min on 2 CPU cores
    .venv/bin/python bench/peer.py --shapes 1,100 --requests 16 --systems flywheel-hf,vllm-server

Builds a home with the largest shape's agents, each with its own random LoRA adapter (rank `--rank` on q/v: what an
adapter learned does not change its cost), registered and promoted. Then the same streamed chat completions
(`--requests`, `--max-tokens` each, greedy) from `--concurrency` concurrent official `openai` clients go to:

  flywheel-hf     `flywheel serve`, the HF engine (one student replica, `--replica-cpus`);
  flywheel-vllm   `flywheel serve`, the vLLM engine in vLLM's environment (`replica_python`: .venv-vllm);
  vllm-server     vLLM's own OpenAI server from that environment, every adapter registered by name
                  (`--lora-modules`), the same `max_loras` / `max_cpu_loras` / rank as Flywheel's replica.

Traffic shapes (`--shapes`): `base` (the base model, no adapter: Flywheel's `base_model_name` route, vLLM's served
model name), and N adapters (1, 100, 1000: the agents drawn from a Zipf distribution over the first N, exponent
`--zipf`; 1 is every request to one agent). Each system and shape prints output tokens/s, p50/p99 latency and
time to first token; then the ratios Flywheel / vLLM server. Each engine also decodes the same rows directly,
without HTTP (`direct`: the continuous decode loop a replica runs, at most `--concurrency` rows at once), so Serve's
overhead is a printed ratio. Every system and engine first answers each model of a shape once (adapters loaded),
then is measured. Flywheel runs with its own defaults unless flags say otherwise (`--replica-cpus`: its replica's
CPUs and torch threads, also the HF engine's threads when direct; `--batch-wait-s`); vLLM's server and engine bind
their threads to every core here, as vLLM does by default.

Each measurement also says where the time went (`breakdown`): the share of the wall time the HF engine spent in
prefill and in decode forward passes, how many of each, the mean decode batch, and the cores each process kept
busy (student replica, Ingress, HTTP proxy, Serve controller, Ray, the clients: `bench/processes.py`). Results go to
bench/figures/peer-<time>.json, rewritten as each measurement ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # noqa: E402  (bench/results.py)
from processes import cpu_seconds, cpu_shares  # noqa: E402  (bench/processes.py)
from traffic import PROMPTS, free_port, send, student_info  # noqa: E402  (bench/traffic.py)

VLLM_PYTHON = os.environ.get("FLYWHEEL_VLLM_PYTHON", os.path.join(REPO, ".venv-vllm", "bin", "python"))
BASE = "base"  # the name the base model goes by (vLLM's --served-model-name)
SYSTEMS = ("flywheel-hf", "flywheel-vllm", "vllm-server")


def shape_targets(shape: str, agents: list[str], requests: int, zipf: float) -> list[str]:
    """The model each request names: the base, one agent, or a Zipf draw over the first N agents."""
    from fleet import zipf_agents

    if shape == BASE:
        return [BASE] * requests
    n = int(shape)
    return [agents[0]] * requests if n == 1 else zipf_agents(agents[:n], requests, zipf)


# -- the systems --------------------------------------------------------------------------------------------------
def serve_config(args, home: str, engine: str):
    from flywheel.config import ServeConfig

    return ServeConfig(home=home, base_model=args.base_model, port=free_port(), auth="off", rate_limit_rps=0,
                       engine=engine, replica_python=VLLM_PYTHON if engine == "vllm" else "", dtype=args.dtype,
                       base_model_name=BASE,
                       num_replicas=1, replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                       max_batch_size=args.concurrency,
                       max_new_tokens=args.max_tokens, max_resident_adapters=args.max_loras,
                       max_adapters_per_replica=args.max_cpu_loras, max_adapter_rank=args.rank,
                       batch_wait_s=args.batch_wait_s, request_timeout_s=900)


class FlywheelServer:
    """`flywheel serve` on the local Ray with one engine; `url` once it answers."""

    def __init__(self, args, home: str, engine: str):
        self.cfg = serve_config(args, home, engine)

    def __enter__(self) -> str:
        from flywheel.serve.app import run

        return run(self.cfg, ready_timeout_s=900)

    def __exit__(self, *exc) -> None:
        from flywheel.serve.app import shutdown

        shutdown()

    @staticmethod
    def engine_counters() -> dict:
        """The student replica's engine counters (`StudentModel.info`)."""
        info = student_info()
        return {k: info.get(k, 0) for k in ENGINE_COUNTERS}


class VLLMServer:
    """vLLM's OpenAI server (`vllm.entrypoints.openai.api_server`) in vLLM's environment, each agent's adapter
    registered under the agent's name, with the same LoRA limits and CPU settings as Flywheel's vLLM engine."""

    def __init__(self, args, adapters: dict[str, str]):
        self.port = free_port()
        modules = [f"{name}={path}" for name, path in adapters.items()]
        self.argv = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", args.base_model,
                     "--served-model-name", BASE, "--port", str(self.port), "--host", "127.0.0.1",
                     "--dtype", args.dtype, "--max-model-len", "2048", "--enable-lora",
                     "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras),
                     "--max-lora-rank", str(args.rank), "--max-num-seqs", str(args.concurrency),
                     "--disable-uvicorn-access-log", *(["--enforce-eager"] if not args.replica_gpus else []),
                     "--lora-modules", *modules]  # eager on CPU, as VLLMEngine sets it there
        from flywheel.inference.vllm_engine import cpu_environment  # no vllm import: the settings only

        self.env = {**os.environ, **cpu_environment()}

    def __enter__(self) -> str:
        import httpx

        self.log = open(os.path.join(tempfile.gettempdir(), f"peer-vllm-server-{self.port}.log"), "w")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {self.proc.returncode}: see {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return f"http://127.0.0.1:{self.port}/v1"
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM's server did not answer /health: see {self.log.name}")

    @staticmethod
    def engine_counters() -> dict:
        return {}  # vLLM's server keeps its own (its /metrics); the process shares still say where the CPU went

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def measure_http(server, shapes: dict[str, list[str]], args, out: dict, save) -> None:
    """Each shape's traffic through one running system, after a short warm-up of its own models, into `out`,
    with where the time went (`breakdown`)."""
    start = time.perf_counter()
    with server as url:
        out["start_s"] = round(time.perf_counter() - start, 1)
        for shape, targets in shapes.items():
            asyncio.run(send(url, warm_up(targets), 2, 2, temperature=0))
            engine, cpu = server.engine_counters(), cpu_seconds()
            out[shape] = asyncio.run(send(url, targets, args.concurrency, args.max_tokens, temperature=0))
            out[shape]["breakdown"] = breakdown(engine, server.engine_counters(), cpu, out[shape]["wall_s"])
            print(f"  {shape}: {json.dumps(out[shape])}", flush=True)
            save()


def warm_up(targets: list[str]) -> list[str]:
    """Each model a shape names, once: every system measures with its adapters loaded, as `direct` does."""
    return list(dict.fromkeys(targets))


ENGINE_COUNTERS = ("prefills", "steps", "step_rows", "prefill_s", "step_s")


def breakdown(engine_before: dict, engine_after: dict, cpu_before: dict, wall_s: float) -> dict:
    """Where one measurement's wall time went: the share the HF engine spent in forward passes (prefill, decode),
    its passes and mean decode batch (empty for an engine without these counters), and the cores each process
    role kept busy (`bench/processes.py`)."""
    found: dict = {"cores": cpu_shares(cpu_before, cpu_seconds(), wall_s)}
    if engine_after:
        d = {k: engine_after.get(k, 0) - engine_before.get(k, 0) for k in ENGINE_COUNTERS}
        found.update({"prefill_share": round(d["prefill_s"] / wall_s, 3), "decode_share": round(d["step_s"] / wall_s, 3),
                      "prefills": d["prefills"], "steps": d["steps"],
                      "mean_decode_batch": round(d["step_rows"] / d["steps"], 2) if d["steps"] else 0})
    return found


# -- the engines, directly ----------------------------------------------------------------------------------------
def decode_direct(engine, targets: list[str], concurrency: int, max_tokens: int) -> dict:
    """The rows of one shape through the engine's continuous decode loop (what a replica runs), at most
    `concurrency` at once: output tokens/s and p50/p99 of each row's time from submission."""
    from flywheel.inference.engine import Row, Sampling
    from traffic import pct

    waiting: queue.Queue = queue.Queue()
    ends: list[tuple[float, int]] = []
    lock = threading.Lock()

    def finished(result, started: float) -> None:
        with lock:
            ends.append((time.perf_counter() - started, getattr(result, "completion_tokens", 0)))

    def take(n: int) -> list[Row]:
        rows = []
        while len(rows) < n and not waiting.empty():
            rows.append(waiting.get())
        now = time.perf_counter()
        for row in rows:
            row.done = lambda result, t=now: finished(result, t)
        return rows

    for i, target in enumerate(targets):
        turns = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        waiting.put(Row(turns, None if target == BASE else target, Sampling(max_tokens)))
    counters = getattr(engine, "counters", {})
    engine_before, cpu = dict(counters), cpu_seconds()
    start = time.perf_counter()
    engine.run_continuous(take, concurrency)
    wall = time.perf_counter() - start
    seconds, tokens = [e[0] for e in ends], sum(e[1] for e in ends)
    return {"requests": len(ends), "wall_s": round(wall, 1), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "total_p50": round(pct(seconds, 0.5), 2),
            "total_p99": round(pct(seconds, 0.99), 2), "breakdown": breakdown(engine_before, counters, cpu, wall)}


def direct(engine_kind: str, base_model: str, adapters: dict[str, str], shapes: dict[str, list[str]],
           concurrency: int, max_tokens: int, max_loras: int, max_cpu_loras: int, rank: int, threads: int,
           dtype: str, gpu: bool) -> dict:
    """Every shape through one engine built as a replica builds it."""
    if engine_kind == "vllm":
        from flywheel.inference.vllm_engine import VLLMEngine

        engine = VLLMEngine(base_model, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=rank,
                            dtype=dtype)
    else:
        from flywheel.inference.engine import HFEngine

        engine = HFEngine(base_model, dtype=dtype, threads=threads, max_adapters=max_loras, max_rank=rank,
                          device="auto" if gpu else "cpu")
    used = {t for targets in shapes.values() for t in targets if t != BASE}
    for name in used:
        engine.load_adapter(name, adapters[name])
    out = {}
    for shape, targets in shapes.items():
        decode_direct(engine, warm_up(targets), 2, 2)  # warm, as the HTTP runs are
        out[shape] = decode_direct(engine, targets, concurrency, max_tokens)
    if hasattr(engine, "close"):
        engine.close()
    return out


def direct_vllm(args, adapters: dict[str, str], shapes: dict[str, list[str]]) -> dict:
    """`direct` for the vLLM engine, in vLLM's environment (this script run there with `--direct-json`)."""
    job = {"base_model": args.base_model, "adapters": adapters, "shapes": shapes, "concurrency": args.concurrency,
           "max_tokens": args.max_tokens, "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras,
           "rank": args.rank, "threads": int(args.replica_cpus), "dtype": args.dtype, "gpu": args.replica_gpus > 0}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    log = f.name + ".log"  # a file, not a pipe: vLLM's engine process may outlive the script by a moment
    with open(log, "w") as sink:
        run = subprocess.run([VLLM_PYTHON, os.path.abspath(__file__), "--direct-json", f.name], stdout=sink,
                             stderr=subprocess.STDOUT, timeout=3600)
    try:
        if run.returncode != 0:
            with open(log) as failed:
                raise RuntimeError(f"the vLLM engine run failed: {failed.read()[-2000:]}")
        with open(f.name + ".out") as result:  # vLLM logs on stdout: the figures come back in a file
            return json.load(result)
    finally:
        for leftover in (f.name, f.name + ".out", log):
            if os.path.exists(leftover):
                os.unlink(leftover)


# -- the run ------------------------------------------------------------------------------------------------------
def build(args, root: str) -> tuple[str, dict[str, str]]:
    """A home whose agents each have their own adapter; {agent: the adapter folder in the home}."""
    from fleet import build_home

    from flywheel.registry.registry import Registry
    from flywheel.storage import Store

    largest = max([int(s) for s in args.shapes.split(",") if s != BASE] or [1])
    home, agents = build_home(root, args.base_model, largest, args.rank)
    registry = Registry(Store(home))
    return home, {a: registry.adapter_path(registry.alias(a)) for a in agents}


def report(out: dict) -> None:
    systems = [s for s in SYSTEMS if s in out["http"]]
    print(f"\n{out['config']['requests']} streamed greedy requests per shape, {out['config']['concurrency']} "
          f"concurrent clients, {out['config']['max_tokens']} tokens, real student ({out['config']['dtype']}), one "
          "replica / server")
    print("| shape | system | output tok/s | total p50 / p99 | TTFT p50 / p99 |")
    print("|---|---|---|---|---|")
    for shape in out["shapes"]:
        for system in systems:
            r = out["http"][system].get(shape)
            if r:
                print(f"| {shape} | {system} | {r['tokens_per_s']} | {r['total_p50']} / {r['total_p99']} s | "
                      f"{r['ttft_p50']} / {r['ttft_p99']} s |")
        for engine, r in out["direct"].items():
            if shape in r:
                print(f"| {shape} | {engine} engine, direct | {r[shape]['tokens_per_s']} | {r[shape]['total_p50']} / "
                      f"{r[shape]['total_p99']} s | - |")
    for name, value in ratios(out).items():
        print(f"{name}: {value}")


def ratios(out: dict) -> dict:
    """Flywheel / vLLM server per shape and engine; Serve's share of each engine's direct tokens/s."""
    http, found = out["http"], {}
    server = http.get("vllm-server", {})
    for system, engine in (("flywheel-hf", "hf"), ("flywheel-vllm", "vllm")):
        for shape, r in http.get(system, {}).items():
            if not isinstance(r, dict):
                continue
            if shape in server:
                found[f"{system} / vllm-server, {shape}"] = round(r["tokens_per_s"] / server[shape]["tokens_per_s"], 2)
            if shape in out["direct"].get(engine, {}):
                found[f"{system} / {engine} engine direct, {shape}"] = round(
                    r["tokens_per_s"] / out["direct"][engine][shape]["tokens_per_s"], 2)
    out["ratios"] = found
    return found


def main() -> int:
    from flywheel.config import ServeConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=os.environ.get("FLYWHEEL_STUDENT",
                                                          os.path.join(REPO, "models", "smollm2-135m-instruct")))
    p.add_argument("--shapes", default="base,1,100,1000")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--direct", default="hf,vllm", help="engines also run without HTTP ('' for none)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=16, help="adapters in one batch (Flywheel's slots)")
    p.add_argument("--max-cpu-loras", type=int, default=64, help="adapters held per replica / server")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--replica-cpus", type=float, default=ServeConfig.replica_cpus,
                   help="CPUs (and the HF engine's torch threads) of Flywheel's replica and of the direct runs")
    p.add_argument("--batch-wait-s", type=float, default=ServeConfig.batch_wait_s,
                   help="how long Flywheel's idle decode loop waits for a batch to fill")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs for Flywheel's replica (and the engines)")
    p.add_argument("--dtype", default="float32", help="float32 (CPU here), or bfloat16 on a GPU")
    p.add_argument("--direct-json", help=argparse.SUPPRESS)  # internal: the vLLM engine's run in its environment
    args = p.parse_args()
    if args.direct_json:
        with open(args.direct_json) as f:
            job = json.load(f)
        figures = direct("vllm", **job)
        with open(args.direct_json + ".out", "w") as f:
            json.dump(figures, f)
        return 0
    return run(args)


def run(args) -> int:
    import shutil

    import ray

    root = tempfile.mkdtemp(prefix="flywheel-bench-peer-")
    t0 = time.perf_counter()
    home, adapters = build(args, root)
    agents = list(adapters)
    print(f"home with {len(agents)} agents, one r{args.rank} adapter each, in {time.perf_counter() - t0:.0f}s",
          flush=True)
    shapes = {s: shape_targets(s, agents, args.requests, args.zipf) for s in args.shapes.split(",")}
    out = {"config": vars(args), "shapes": {s: len(set(t)) for s, t in shapes.items()}, "http": {}, "direct": {}}
    path = results.save("peer", out, quiet=True)
    print(f"results: {path}", flush=True)
    save = lambda: results.save("peer", out, path, quiet=True)  # noqa: E731
    systems = args.systems.split(",")
    try:
        for engine in [e for e in args.direct.split(",") if e]:
            print(f"{engine} engine, direct", flush=True)
            out["direct"][engine] = direct_vllm(args, adapters, shapes) if engine == "vllm" else direct(
                "hf", args.base_model, adapters, shapes, args.concurrency, args.max_tokens, args.max_loras,
                args.max_cpu_loras, args.rank, int(args.replica_cpus), args.dtype, args.replica_gpus > 0)
            print(f"  {json.dumps(out['direct'][engine])}", flush=True)
            save()
        if any(s.startswith("flywheel") for s in systems):
            ray.init(num_cpus=max(2, int(args.replica_cpus) + 1), include_dashboard=False, log_to_driver=False)
        for system in systems:
            print(system, flush=True)
            server = VLLMServer(args, adapters) if system == "vllm-server" else \
                FlywheelServer(args, home, "vllm" if system == "flywheel-vllm" else "hf")
            measure_http(server, shapes, args, out["http"].setdefault(system, {}), save)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    ratios(out)
    save()
    report(out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
