"""Selective serving benchmark: the real student on shipped agents, a confidence threshold certified on each agent's
VALIDATION sessions, then scored once on TEST sessions it never saw (never used for calibration or any choice).

    flock /tmp/flywheel-heavy.lock .venv/bin/python bench/selective.py --out bench/figures/selective.json
    .venv/bin/python bench/selective.py --agents sgd_Flights --train-examples 60 --epochs 1 \\
        --max-calibration 60 --max-test 40                                   # a smaller, quicker run
    .venv/bin/python bench/selective.py --report bench/figures/selective.json    # reprint a saved run

Per run: the dev logs AND SGD's train-split logs (`flywheel/data/sgd/*.jsonl.gz`, 33,963 records) and the news
classifier's logs are ingested and curated (Ray Data) with `--validation-fraction` / `--test-fraction` of each
agent's sessions held out, so calibration and test splits hold hundreds of records. Per agent a LoRA adapter is
distilled on at most `--train-examples` train records (today's student: ~130 records, the dev split's size), then
its answers to the validation and test sessions are decoded under each request's tool-call grammar, as Serve
decodes them, with each answer's confidence (`flywheel.inference.confidence`).

Choices are made on validation only: the confidence aggregate (`--aggregate auto`: the one with the highest
validation AUROC of right vs wrong exact calls) and the threshold (`flywheel.evaluate.selective.certify`:
Learn-then-Test, fixed sequence, exact binomial; T = `--target`, delta = `--delta`). The test split then scores
that one threshold: accepted accuracy and coverage with Wilson intervals, AUROC and ECE of every aggregate, and the
cascade (student where confident, else teacher) against teacher-only: exact-call accuracy and the share of the
teacher's cost saved (every request is drafted by the student first; a deferred one also costs the teacher).
The aggregate is chosen and the threshold certified on the same validation split (4 aggregates compared: a mild
reuse the README states). Figures go to `--out` (a tracked file for cited figures) as each agent finishes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import save  # noqa: E402  (bench/results.py)

DATA = os.path.join(REPO, "flywheel", "data")
LOGS = [os.path.join(DATA, "sgd", "sgd_dev_flywheel_logs.jsonl"),
        os.path.join(DATA, "sgd", "sgd_train_flywheel_logs.jsonl.gz"),
        os.path.join(DATA, "news-classifier", "news-classifier-500_dataset.jsonl")]


def prepare(args, store) -> dict:
    """Ingest every shipped log and curate the agents: {agent: manifest}."""
    from flywheel.capture.store import ingest_file
    from flywheel.config import CurateConfig
    from flywheel.curate.pipeline import curate

    for path in LOGS:
        ingest_file(store, path)
    return curate(CurateConfig(home=store.uri, agents=tuple(args.agents), validation_fraction=args.validation_fraction,
                               test_fraction=args.test_fraction), store)


def train(args, store, agent: str) -> dict:
    from flywheel.config import DistillConfig
    from flywheel.distill.train import distill

    extra = {"base_model": args.base_model} if args.base_model else {}
    return distill(DistillConfig(agent=agent, home=store.uri, epochs=args.epochs, max_examples=args.train_examples,
                                 max_length=args.max_length, learning_rate=args.lr, num_workers=args.workers,
                                 batch_size=args.batch_size, max_steps=args.max_steps, use_gpu=args.use_gpu,
                                 bf16=args.bf16, **extra), store)


def reused(store, agent: str) -> dict | None:
    """The agent's latest adapter in this home (a stopped run's), as `train` reports one; None if it has none."""
    from flywheel.registry.registry import Registry

    registry = Registry(store)
    versions = registry.versions(agent) if agent in registry.agents() else []
    if not versions:
        return None
    entry = versions[-1]
    print(f"{agent}: reusing adapter {entry['version']} from {store.uri} (not retrained)")
    metrics = entry.get("train_metrics") or {}
    return {"version": entry["version"], "train_examples": metrics.get("train_examples"),
            "train_s": entry.get("train_time_s")}


def decoder(args, store, agent: str, version: str):
    """(engine, decode(examples) -> generate_answers' run) for the agent's adapter, as Serve decodes it."""
    from flywheel.config import EvaluateConfig
    from flywheel.evaluate.run import _constraints, _prompts, tool_format
    from flywheel.inference.answers import generate_answers
    from flywheel.inference.engine import HFEngine
    from flywheel.config import default_student_path
    from flywheel.registry.registry import Registry

    registry = Registry(store)
    entry = registry.get(agent, version)
    engine = HFEngine(args.base_model or default_student_path())
    engine.load_adapter(agent, registry.adapter_path(entry))
    cfg = EvaluateConfig(agent=agent, in_context_k=0)

    def decode(examples: list[dict]) -> dict:
        tools = [json.loads(e.get("tools_json") or "[]") for e in examples]
        return generate_answers(engine, _prompts(cfg, examples, [], engine, tool_format(entry))["base"], agent,
                                args.eval_batch_size, args.max_new_tokens, None, _constraints(tools))

    return engine, decode


def choose_aggregate(args, task: str, validation: list[dict], run: dict) -> tuple[str, dict]:
    """The aggregate with the best validation AUROC (or the one named), and every aggregate's validation AUROC."""
    from flywheel.evaluate.calibrate import correctness, rankers

    tools = [json.loads(e.get("tools_json") or "[]") for e in validation]
    scored = rankers(run["confidence"], correctness(task, [e["target"] for e in validation], run["answers"], tools))
    if args.aggregate != "auto":
        return args.aggregate, scored
    best = max(scored, key=lambda name: -1.0 if scored[name]["auroc"] is None else scored[name]["auroc"])
    return best, scored


def bench_agent(args, store, agent: str) -> dict:
    from flywheel.config import EvaluateConfig
    from flywheel.datasets import TEST, VALIDATION, open_split, resolve_version
    from flywheel.evaluate.calibrate import selective_block
    from flywheel.evaluate.run import cost_summary, system_row

    started = time.perf_counter()
    trained = reused(store, agent) if args.reuse_adapter else None
    trained = trained or train(args, store, agent)
    train_s = trained.get("train_s") or time.perf_counter() - started
    version = resolve_version(store, agent)
    validation = open_split(store, agent, version, VALIDATION).rows()[: args.max_calibration or None]
    test_split = open_split(store, agent, version, TEST)
    test = test_split.rows()[: args.max_test or None]
    engine, decode = decoder(args, store, agent, trained["version"])
    started = time.perf_counter()
    val_run = decode(validation)
    aggregate, val_rankers = choose_aggregate(args, test_split.task, validation, val_run)
    test_run = decode(test)
    decode_s = time.perf_counter() - started
    tools = [json.loads(e.get("tools_json") or "[]") for e in test]
    expected = [e["target"] for e in test]
    cfg = EvaluateConfig(agent=agent, selective_target=args.target, selective_delta=args.delta,
                         confidence_aggregate=aggregate, in_context_k=0)
    row = system_row(test_split.task, expected, test_run["answers"], tools, cfg, test_run)
    cost = cost_summary(store, test, engine, cfg, row)
    block = selective_block(cfg, test_split.task, validation, lambda _: val_run, expected, test_run, tools, cost)
    return {"agent": agent, "task": test_split.task, "adapter_version": trained["version"],
            "train_examples": trained.get("train_examples"), "train_s": round(train_s, 1),
            "decode_s": round(decode_s, 1), "n_validation": len(validation), "n_test": len(test),
            "aggregate": aggregate, "aggregate_choice": val_rankers, "student_test": row, "cost": cost,
            "selective": block}


def print_agent(r: dict) -> None:
    b, cert, test, cas = r["selective"], r["selective"]["certificate"], r["selective"]["test"], \
        r["selective"]["cascade"]
    f = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    ci = lambda c: "" if not c else f" [{c[0]:.2f}, {c[1]:.2f}]"  # noqa: E731
    exact = r["student_test"].get("name_args_accuracy", r["student_test"].get("accuracy"))
    print(f"\n{r['agent']} ({r['task']}): trained on {r['train_examples']} records ({r['train_s']} s); "
          f"{r['n_validation']} validation / {r['n_test']} test examples; decode {r['decode_s']} s")
    print(f"  student alone on test: exact {f(exact)}" + (f", function name "
          f"{f(r['student_test'].get('function_name_accuracy'))}" if r["task"] == "tool_call" else ""))
    print(f"  aggregate {r['aggregate']} (validation AUROC: " + ", ".join(
        f"{k} {f(v['auroc'])}" for k, v in r["aggregate_choice"].items()) + ")")
    print(f"  certified threshold: {f(cert['threshold'])} (T {b['target']}, delta {b['delta']}; validation "
          f"coverage {f(cert['coverage'])}, accepted accuracy {f(cert['accepted_accuracy'])}"
          + (f"; {cert['reason']}" if cert["threshold"] is None else "") + ")")
    print(f"  test: accepted accuracy {f(test['accepted_accuracy'])}{ci(test['accepted_accuracy_ci'])}, coverage "
          f"{f(test['coverage'])}{ci(test['coverage_ci'])}, {test['accepted']} accepted; holds: {test['holds']}")
    print(f"  test AUROC {b['aggregate']} {f(b['rankers']['test'][b['aggregate']]['auroc'])}, ECE "
          f"{f(b['rankers']['test'][b['aggregate']]['ece'])}")
    print(f"  cascade exact {f(cas.get('cascade_accuracy'))} vs teacher-only {f(cas.get('teacher_accuracy'))}; "
          f"teacher cost saved {f(cas.get('teacher_cost_saved'))}; perfect ranker coverage at T: "
          f"{f((exact or 0) / b['target'])}")


def training_args(ap: argparse.ArgumentParser, epochs: float) -> None:
    """The training and curation options this bench and `bench/learning_curve.py` share."""
    ap.add_argument("--epochs", type=float, default=epochs)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-steps", type=int, default=0, help=">0: cap each training run (smoke runs)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2, help="per worker")
    ap.add_argument("--use-gpu", action="store_true", help="a GPU per training worker (decoding takes CUDA anyway)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast in training where the hardware computes it natively (--no-bf16: fp32)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--validation-fraction", type=float, default=0.2)
    ap.add_argument("--test-fraction", type=float, default=0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", default="sgd_Flights,sgd_Restaurants,sgd_Buses,news_classifier")
    ap.add_argument("--train-examples", type=int, default=130, help="train records per agent (0: all)")
    training_args(ap, epochs=3.0)
    ap.add_argument("--max-calibration", type=int, default=400, help="validation examples per agent (0: all)")
    ap.add_argument("--max-test", type=int, default=300, help="test examples per agent (0: all)")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--aggregate", default="auto", help="auto (best validation AUROC) or min/product/mean/values")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--home", default="", help="a FLYWHEEL_HOME to keep (default: a temporary one)")
    ap.add_argument("--base-model", default="")
    ap.add_argument("--out", default="", help="where the JSON goes (default bench/figures/selective-<time>.json)")
    ap.add_argument("--report", default="", help="reprint a saved run")
    ap.add_argument("--reuse-adapter", action="store_true",
                    help="decode with each agent's latest adapter in --home instead of training (a stopped run)")
    args = ap.parse_args()
    if args.report:
        for r in json.load(open(args.report))["agents"]:
            print_agent(r)
        return
    args.agents = [a for a in args.agents.split(",") if a]
    from flywheel.storage import Store

    store = Store(args.home or tempfile.mkdtemp(prefix="flywheel-selective-"))
    out = {"command": "python bench/selective.py " + shlex.join(sys.argv[1:]), "started": time.time(),
           "settings": {k: v for k, v in vars(args).items() if k not in ("report",)}, "agents": []}
    out["curated"] = {a: (m or {}).get("counts") or (m or {}).get("error") for a, m in prepare(args, store).items()}
    path = save("selective", out, args.out)
    for agent in args.agents:
        result = bench_agent(args, store, agent)
        out["agents"].append(result)
        print_agent(result)
        save("selective", out, path, quiet=True)
    print(f"\nresults: {path}\nreproduce: {out['command']}")


if __name__ == "__main__":
    main()
