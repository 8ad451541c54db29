"""Distillation benchmark: the real student on the shipped SGD agents, base vs in-context vs distilled, and Ray Train
throughput against a plain single-process loop on the same data, in one run.

    .venv/bin/python bench/distill.py                       # sgd_Flights + sgd_Restaurants, 3 epochs, ~35 min here
    .venv/bin/python bench/distill.py --agents sgd_Flights --epochs 1 --eval-examples 20   # a quick pass

Per agent it ingests and curates the shipped logs (Ray Data), distills a LoRA on SmolLM2-135M-Instruct with Ray
Train (`--workers` workers, DDP over gloo, bf16 autocast), evaluates on the agent's held-out split (sessions never
seen in training) and prints function-name and name+arguments accuracy, with 95% bootstrap intervals, for:
the teacher (its logged answers score 1.0 against themselves: the reference), the base student, the base student
with its k nearest train examples in the prompt (all-MiniLM-L6-v2), and the distilled student; training time;
the student's measured cost per 1k requests next to the teacher's list price for the same tokens.

Throughput: `--throughput-steps` optimizer steps of the first agent's data through (a) a plain loop in this process
with all CPU threads and (b) Ray Train with `--workers` single-thread workers, the same global batch, the same
loss code. Both count tokens per second of the training loop (model load and Ray start excluded, reported apart).
Results go to bench/out/distill-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def single_process_throughput(student: str, examples: list[dict], steps: int, batch: int, threads: int,
                              lr: float, max_length: int) -> dict:
    """The plain PyTorch loop: the same encode/collate/answer_loss as the Ray Train workers, one process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.config import DistillConfig
    from flywheel.distill.data import answer_loss, collate, encode, length_buckets

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    defaults = DistillConfig(agent="bench")
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                           LoraConfig(r=defaults.lora_r, lora_alpha=defaults.lora_alpha, lora_dropout=0.0,
                                      target_modules=list(defaults.target_modules), task_type="CAUSAL_LM"))
    encoded = [e for e in (encode(tokenizer, x, max_length, defaults.max_history) for x in examples) if e]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    setup_s = time.time() - t0
    batches = length_buckets(encoded, batch, 0)
    model.train()
    tokens, t0 = 0, time.time()
    for i in range(steps):
        inputs = collate(batches[i % len(batches)], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = answer_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(inputs["attention_mask"].sum())
    loop_s = time.time() - t0
    return {"tokens_per_s": tokens / loop_s, "loop_s": round(loop_s, 1), "setup_s": round(setup_s, 1),
            "tokens": tokens, "steps": steps, "batch": batch, "threads": threads}


def ray_throughput(store, agent: str, student: str, steps: int, batch: int, workers: int, lr: float,
                   max_length: int) -> dict:
    from flywheel.config import DistillConfig
    from flywheel.distill.train import distill

    t0 = time.time()
    out = distill(DistillConfig(agent=agent, base_model=student, num_workers=workers, batch_size=batch,
                                max_steps=steps, learning_rate=lr, max_length=max_length,
                                run_name=f"throughput-{int(time.time())}"), store)
    return {"tokens_per_s": out["tokens_per_s"], "wall_s": round(time.time() - t0, 1), "steps": out["steps"],
            "batch_per_worker": batch, "workers": workers}


def metric(row: dict, name: str) -> str:
    value, ci = row.get(name), row.get(f"{name}_ci")
    if value is None:
        return "-"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", default="sgd_Flights,sgd_Restaurants", help="comma-separated SGD agents")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2, help="per worker (the global batch is workers x this)")
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument("--eval-examples", type=int, default=0, help="0: the whole held-out split")
    ap.add_argument("--in-context-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="the 2026-11-25 table used 96: it cut 4 answers")
    ap.add_argument("--throughput-steps", type=int, default=8, help="0: skip the throughput comparison")
    ap.add_argument("--home", default="", help="a FLYWHEEL_HOME to keep (default: a temporary one)")
    ap.add_argument("--base-model", default="", help="default: the student `make setup` built")
    args = ap.parse_args()

    import ray

    from flywheel.capture.store import ingest_file
    from flywheel.config import CurateConfig, DistillConfig, EvaluateConfig, default_student_path
    from flywheel.curate.pipeline import curate, read_split
    from flywheel.demo import PACKAGE_DATA
    from flywheel.distill.train import distill
    from flywheel.evaluate.run import evaluate
    from flywheel.models import resolve_model_path
    from flywheel.storage import Store

    agents = [a for a in args.agents.split(",") if a]
    student = resolve_model_path(args.base_model or default_student_path())
    home = args.home or tempfile.mkdtemp(prefix="flywheel-bench-distill-")
    store = Store(home)
    cpus = os.cpu_count() or 2
    started = time.time()
    ray.init(num_cpus=cpus, object_store_memory=400 * 2**20, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    ingest_file(store, os.path.join(PACKAGE_DATA, "sgd", "sgd_dev_flywheel_logs.jsonl"))
    manifests = curate(CurateConfig(agents=tuple(agents)), store)
    result: dict = {"args": vars(args), "student": student, "cpus": cpus, "agents": {}}

    if args.throughput_steps:
        first = agents[0]
        train = read_split(store, first, manifests[first]["version"], "train").to_pylist()
        print(f"throughput: {args.throughput_steps} steps of {first}, global batch {args.workers * args.batch_size}",
              flush=True)
        plain = single_process_throughput(student, train, args.throughput_steps, args.workers * args.batch_size,
                                          cpus, args.lr, args.max_length)
        on_ray = ray_throughput(store, first, student, args.throughput_steps, args.batch_size, args.workers, args.lr,
                                args.max_length)
        result["throughput"] = {"single_process": plain, "ray_train": on_ray,
                                "ratio": on_ray["tokens_per_s"] / plain["tokens_per_s"]}

    for agent in agents:
        m = manifests[agent]
        print(f"{agent}: train {m['counts']['train']}, eval {m['counts']['eval']} (dataset {m['version']}); "
              f"distilling {args.epochs} epochs", flush=True)
        out = distill(DistillConfig(agent=agent, base_model=student, num_workers=args.workers,
                                    batch_size=args.batch_size, epochs=args.epochs, learning_rate=args.lr,
                                    max_length=args.max_length), store)
        rep = evaluate(EvaluateConfig(agent=agent, base_model=student, adapter_version=out["version"],
                                      max_examples=args.eval_examples, in_context_k=args.in_context_k,
                                      max_new_tokens=args.max_new_tokens, min_examples=1), store)
        result["agents"][agent] = {
            "train": m["counts"]["train"], "eval": m["counts"]["eval"], "scored": rep["candidate"].get("n"),
            "train_time_s": out["train_time_s"], "train_tokens_per_s": out["tokens_per_s"], "steps": out["steps"],
            "systems": {s: rep[s] for s in rep["systems"]}, "cost": rep["cost"], "gate": rep["gate"],
            "report": rep["report"]}

    result["wall_s"] = round(time.time() - started, 1)
    report(result)
    os.makedirs(os.path.join(REPO, "bench", "out"), exist_ok=True)
    path = os.path.join(REPO, "bench", "out", f"distill-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nsummary: {os.path.relpath(path, REPO)}; home {home}")


def report(result: dict) -> None:
    print(f"\n== distillation of {result['student']} on {result['cpus']} CPUs ({result['wall_s']} s in all)")
    labels = {"teacher": "teacher (reference)", "base": "base student", "base_in_context": "base + in-context",
              "production": "production", "candidate": "distilled"}
    for agent, r in result["agents"].items():
        print(f"\n{agent}: {r['train']} train / {r['eval']} eval examples ({r['scored']} scored); "
              f"trained {r['steps']} steps in {r['train_time_s']} s ({r['train_tokens_per_s']:.0f} tokens/s)")
        print(f"   {'system':22}{'function name':>22}{'name + arguments':>22}{'slot F1':>8}{'$/1k req':>10}")
        for name, row in r["systems"].items():
            cost = r["cost"].get("teacher_per_1k_usd") if name == "teacher" else row.get("cost_per_1k_usd")
            print(f"   {labels.get(name, name):22}{metric(row, 'function_name_accuracy'):>22}"
                  f"{metric(row, 'name_args_accuracy'):>22}{row.get('slot_f1', float('nan')):>8.2f}"
                  f"{'-' if cost is None else f'{cost:.4f}':>10}")
        g = r["gate"]
        print(f"   gate: {'passed' if g.get('passed') else 'failed'}: lower bound {g.get('candidate_lower')} vs "
              f"threshold {g.get('threshold')} {'; '.join(g.get('reasons') or [])}")
        c = r["cost"]
        print(f"   cost per 1k requests: student ${c.get('student_per_1k_usd', 0):.4f} ({c.get('student_basis')}), "
              f"teacher ${c.get('teacher_per_1k_usd', 0):.4f} ({c.get('teacher_basis')}): "
              f"{c.get('teacher_over_student') or 0:.1f}x")
    t = result.get("throughput")
    if t:
        p, q = t["single_process"], t["ray_train"]
        print(f"\ntraining throughput, {p['steps']} steps, global batch {p['batch']}: single process "
              f"({p['threads']} threads) {p['tokens_per_s']:.0f} tokens/s; Ray Train ({q['workers']} workers x 1 thread) "
              f"{q['tokens_per_s']:.0f} tokens/s; ratio {t['ratio']:.2f}x (Ray run wall incl. start {q['wall_s']} s, "
              f"plain setup {p['setup_s']} s)")


if __name__ == "__main__":
    main()
