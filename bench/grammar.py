"""Constrained-decoding benchmark: the real student's decoding speed with and without the tool_choice "auto" grammar.

    flock /tmp/flywheel-heavy.lock .venv/bin/python bench/grammar.py                 # 8 prompts x 64 tokens, 2 reps
    .venv/bin/python bench/grammar.py --prompts 16 --max-new-tokens 128 --reps 3 --adapter /path/to/adapter

The prompts are requests from the shipped SGD logs (`flywheel/data/sgd/sgd_dev_flywheel_logs.jsonl`) that the
teacher answered with a tool call, taken round-robin over the agents, rendered with their declared tools as Serve
renders them (`flywheel.prompts.chat_messages`). The same batch is decoded greedily by `HFEngine.generate` once per
variant and repetition (the order alternating): free (no constraint) and under `constraint_for(tools, "auto", None)`
(each row its own tools' grammar). Before timing, each variant decodes once (grammars compiled and cached, kernels
warm), so the figures are steady-state decoding: completion tokens / seconds of `generate`, and milliseconds per
decode step (the batch runs until its longest row ends, so tokens/s also counts how many rows are still writing).
Printed: tokens/s of each variant per repetition and their median, the ratio (constrained / free), how many rows
wrote the same text as free decoding, how many wrote `<tool_call>` and how many answers are tool calls that parse.
`--variants free,auto,required` adds tool_choice "required" (calls only): the grammar's cost while the answer is
JSON, which the base student's free text under auto rarely reaches. Results go to bench/figures/grammar-<time>.json.

`--adapter` decodes with a distilled LoRA adapter (a PEFT folder) instead of the base student: the base student
rarely starts a `<tool_call>`, so with it the grammar mostly watches free text; a distilled one writes calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import save  # noqa: E402  (bench/results.py)

LOGS = os.path.join(REPO, "flywheel", "data", "sgd", "sgd_dev_flywheel_logs.jsonl")


def sgd_requests(n: int, path: str = LOGS) -> list[dict]:
    """`n` logged requests (plus their "agent") answered with a tool call, round-robin over agents (file order
    within an agent)."""
    by_agent: dict[str, list[dict]] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            message = record["response"]["choices"][0]["message"]
            if message.get("tool_calls") and record["request"].get("tools"):
                by_agent.setdefault(record["workload_id"], []).append({**record["request"],
                                                                       "agent": record["workload_id"]})
    picked, queues = [], [list(reversed(q)) for q in by_agent.values()]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return picked


def decode(engine, turns: list, adapter: str | None, max_new_tokens: int, constraints: list | None) -> dict:
    """One greedy batch: its texts, completion tokens, seconds, and decode steps (its longest row's tokens)."""
    started = time.perf_counter()
    gens = engine.generate(turns, [adapter] * len(turns), max_new_tokens, constraints=constraints)
    seconds = time.perf_counter() - started
    tokens = sum(g.completion_tokens for g in gens)
    steps = max(g.completion_tokens for g in gens)
    return {"texts": [g.text for g in gens], "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "steps": steps, "ms_per_step": 1000 * seconds / max(steps, 1)}


def calls_that_parse(texts: list[str]) -> int:
    from flywheel.prompts import parse_answer

    return sum(bool(p["tool_calls"]) and p["valid"] for p in map(parse_answer, texts))


def run(args: argparse.Namespace) -> dict:
    from flywheel.config import default_student_path
    from flywheel.inference.engine import HFEngine
    from flywheel.inference.grammar import constraint_for
    from flywheel.models import resolve_model_path
    from flywheel.prompts import chat_messages

    student = resolve_model_path(args.base_model or default_student_path())
    requests = sgd_requests(args.prompts)
    turns = [chat_messages(r["messages"], r["tools"]) for r in requests]
    specs = {choice: [constraint_for(r["tools"], choice, None) for r in requests]
             for choice in args.variants if choice != "free"}
    started = time.perf_counter()
    engine = HFEngine(student, threads=args.threads or None)
    load_s = time.perf_counter() - started
    adapter = None
    if args.adapter:
        adapter = "bench"
        engine.load_adapter(adapter, args.adapter)
    started = time.perf_counter()
    for spec in specs.get("auto") or next(iter(specs.values()), []):
        engine.grammar(spec)
    compile_s = time.perf_counter() - started  # includes the tokenizer's vocabulary (~0.3-1 s, once per engine)
    variants = {choice: specs.get(choice) for choice in args.variants}
    for constraints in variants.values():  # warm-up: kernels, caches
        decode(engine, turns, adapter, 2, constraints)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for rep in range(args.reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))  # alternate who goes first
        for name in order:
            runs[name].append(decode(engine, turns, adapter, args.max_new_tokens, variants[name]))
            r = runs[name][-1]
            print(f"rep {rep + 1} {name:8}: {r['tokens']} tokens, {r['steps']} steps in {r['seconds']:.2f} s = "
                  f"{r['tokens_per_s']:.1f} tokens/s, {r['ms_per_step']:.0f} ms/step", flush=True)
    return summary(args, student, engine, adapter, requests, runs, load_s, compile_s)


def summary(args, student, engine, adapter, requests, runs, load_s, compile_s) -> dict:
    median = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    step_ms = {name: statistics.median(r["ms_per_step"] for r in rs) for name, rs in runs.items()}
    texts = {name: rs[-1]["texts"] for name, rs in runs.items()}
    return {"args": vars(args), "student": student, "adapter": adapter and args.adapter,
            "device": engine.device, "dtype": str(engine.dtype), "threads": _threads(),
            "agents": sorted({r["agent"] for r in requests}),
            "prompts": len(requests), "tools_per_prompt": [len(r["tools"]) for r in requests],
            "model_load_s": round(load_s, 2), "grammar_compile_s": round(compile_s, 3),
            "tokens_per_s": {name: [round(r["tokens_per_s"], 2) for r in rs] for name, rs in runs.items()},
            "median_tokens_per_s": {k: round(v, 2) for k, v in median.items()},
            "ratio_over_free": {k: round(v / median["free"], 3) for k, v in median.items() if k != "free"},
            "median_ms_per_step": {k: round(v, 1) for k, v in step_ms.items()},
            "same_text_as_free": {k: sum(a == b for a, b in zip(texts["free"], t)) for k, t in texts.items()},
            "calls_that_parse": {k: calls_that_parse(t) for k, t in texts.items()},
            "rows_with_tool_call_tag": {k: sum("<tool_call>" in x for x in t) for k, t in texts.items()},
            "samples": {k: t[:2] for k, t in texts.items()}}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def report(result: dict) -> None:
    m, n = result["median_tokens_per_s"], result["prompts"]
    labels = {"free": "free decoding", "auto": "auto-tools grammar", "required": "required-call grammar"}
    print(f"\n== {result['student']}{' + adapter ' + result['adapter'] if result['adapter'] else ''} on "
          f"{result['device']} ({result['dtype']}, {result['threads']} threads): {n} SGD prompts x "
          f"{result['args']['max_new_tokens']} new tokens, greedy, {result['args']['reps']} reps")
    print(f"   {'variant':24}{'tokens/s':>10}{'/ free':>8}{'ms/step':>9}{'same text':>11}{'<tool_call>':>13}"
          f"{'parsed calls':>14}   tokens/s per rep")
    for name, value in m.items():
        ratio = result["ratio_over_free"].get(name, 1.0)
        print(f"   {labels[name]:24}{value:10.1f}{ratio:8.3f}{result['median_ms_per_step'][name]:9.0f}"
              f"{result['same_text_as_free'][name]:>8}/{n:<2}"
              f"{result['rows_with_tool_call_tag'][name]:>11}/{n:<2}{result['calls_that_parse'][name]:>11}/{n:<2}"
              f"   {result['tokens_per_s'][name]}")
    print(f"   grammar compile for {n} prompts (first use, incl. the vocabulary): {result['grammar_compile_s']} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--adapter", default="", help="a PEFT adapter folder to decode with (default: the base student)")
    ap.add_argument("--base-model", default="", help="default: the student `make setup` built")
    ap.add_argument("--variants", default="free,auto",
                    help="comma-separated, from free (no grammar), auto (tool_choice auto), required (calls only)")
    args = ap.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    if "free" not in args.variants or not set(args.variants) <= {"free", "auto", "required"}:
        ap.error("--variants: free plus any of auto, required")
    result = run(args)
    report(result)
    save("grammar", result)
    print(f"reproduce: .venv/bin/python bench/grammar.py --prompts "
          f"{args.prompts} --max-new-tokens {args.max_new_tokens} --reps {args.reps} --variants "
          f"{','.join(args.variants)}"
          + (f" --adapter {args.adapter}" if args.adapter else ""))


if __name__ == "__main__":
    main()
