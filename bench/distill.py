"""Distillation benchmark: the real student on the shipped SGD agents, scored on each agent's TEST split: base,
in-context, distilled, and distilled under the tool_choice "auto" grammar; plus the levers (epochs, early stopping
on validation, a shared tool-calling adapter as the starting point) and a leave-agents-out check of that adapter.

    flock /tmp/flywheel-heavy.lock .venv/bin/python bench/distill.py      # sgd_Flights, 1 epoch, whole test split
    .venv/bin/python bench/distill.py --agents sgd_Flights,sgd_Restaurants --epochs 3
    .venv/bin/python bench/distill.py --epochs 6 --validation-every 10 --patience 3          # early stopping
    .venv/bin/python bench/distill.py --init-from-shared --shared-max-examples 400 \\
        --held-out-agents sgd_Buses,sgd_Events,sgd_Homes,sgd_Music                          # shared start + LOAO
    .venv/bin/python bench/distill.py --max-steps 2 --test-examples 4 --max-new-tokens 48 --in-context-k 2 \
        --init-from-shared --shared-max-examples 16 --held-out-agents sgd_Hotels --validation-every 2 --patience 1 \
        --workers 1                                          # a smoke run of every lever: 825 s on 2 busy cores

Per run: the shipped logs are ingested and curated (Ray Data) into train / validation / test splits per agent
(`flywheel.datasets`; a dataset curated before validation splits existed has train/eval, and its eval file is read
as test). Per agent in `--agents` a LoRA adapter is distilled on Ray Train from the agent's train split
(`flywheel.distill.train.distill`) and `flywheel.evaluate.run.evaluate` scores, on the test split only:

- base: the base student;  in-context: the base student with its `--in-context-k` nearest TRAIN examples;
- distilled: the adapter;  distilled + constrained: the adapter decoded under each example's grammar
  (`flywheel.inference.grammar.constraint_for(tools, "auto", None)`: free text, or calls of declared tools with
  schema-valid arguments).

Each with function-name accuracy, name+arguments accuracy and valid-call rate (plain text, or parseable calls of
declared tools with schema-valid arguments), each with a 95% percentile-bootstrap interval over test examples
(`flywheel.metrics.bootstrap_ci`), and the distilled student's decoding speed (completion tokens per
second of `generate`) with and without the grammar, counted by `CountingEngine` around the engine evaluation uses.

Levers (all off by default):
- `--epochs`, `--max-steps` (a cap on optimizer steps, for smoke runs);
- `--validation-every N --patience P`: early stopping on the validation split's loss (`DistillConfig.validation_every`,
  `early_stopping_patience`; the lowest-loss adapter is the one registered);
- `--init-from-shared`: first a shared adapter is distilled on the train splits of the OTHER agents (every curated
  agent not in `--agents` or `--held-out-agents`), at most `--shared-max-examples` examples shared equally
  (`DistillConfig.datasets`, `max_examples`), for `--shared-epochs`; each agent's adapter then starts from it
  (`DistillConfig.init_adapter`);
- `--held-out-agents A,B`: leave-agents-out: that shared adapter (trained without them) against the base student on
  each held-out agent's test split, plain and constrained. It trains the shared adapter even without
  `--init-from-shared`.
- `--throughput-steps N` (`--throughput-only` to stop there): N training steps of the first agent through one
  process with the shared prefix off and on, then with the shared prefix and the attention training uses on CPU
  (`bench/train_speed.py`: records/s, tokens/s, model FLOPs against this machine's measured matmul peak, the loss
  curves compared), then through Ray Train as the product trains.

Results go to bench/figures/distill-<time>.json; the last lines print the command that reproduces the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import save  # noqa: E402  (bench/results.py)

from flywheel.prompts import TOOL_FORMATS  # noqa: E402  (stdlib only)

SHARED = "sgd_shared_tools"  # the registry name of the shared adapter
SYSTEMS = {"base": "base student", "base_in_context": "base + in-context", "candidate": "distilled",
           "candidate_constrained": "distilled + constrained"}
HELD_OUT_SYSTEMS = {"base": "base student", "candidate": "shared (agent unseen)",
                    "candidate_constrained": "shared + constrained"}
METRIC_COLUMNS = (("function_name_accuracy", "function name"), ("name_args_accuracy", "name + arguments"),
                  ("valid_call", "valid call"))


# -- datasets ---------------------------------------------------------------------------------------------------
def split_rows(store, agent: str, version: str, split: str) -> list[dict]:
    """A split's rows (train / validation / test; an older version's eval file as test)."""
    from flywheel.datasets import read_split

    return read_split(store, agent, version, split).to_pylist()


def split_counts(store, agent: str, version: str) -> dict[str, int]:
    return {s: len(split_rows(store, agent, version, s)) for s in ("train", "validation", "test")}


def shared_sources(manifests: dict, exclude: set[str]) -> list[str]:
    """`agent@version` of every curated agent outside `exclude`: what the shared adapter learns from."""
    return [f"{a}@{m['version']}" for a, m in sorted(manifests.items()) if m.get("version") and a not in exclude]


# -- counting decoding speed ------------------------------------------------------------------------------------
class CountingEngine:
    """The engine evaluation decodes with, unchanged, plus completion tokens and seconds of every `generate` call,
    keyed by (adapter, constrained). Everything else is the wrapped engine's."""

    def __init__(self, engine):
        self.engine = engine
        self.counts: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0])

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, adapters, max_new_tokens=128, constraints=None):
        started = time.perf_counter()
        gens = self.engine.generate(prompts, adapters, max_new_tokens, constraints=constraints)
        key = (adapters[0] if adapters else None, any(c is not None for c in constraints or []))
        self.counts[key][0] += sum(g.completion_tokens for g in gens)
        self.counts[key][1] += time.perf_counter() - started
        return gens

    def tokens_per_s(self, adapter: str | None, constrained: bool) -> float | None:
        tokens, seconds = self.counts.get((adapter, constrained), (0, 0.0))
        return tokens / seconds if seconds else None


# -- training and scoring ---------------------------------------------------------------------------------------
def needs(cls, *fields: str) -> None:
    """Fail early, naming the field, when this checkout's config lacks a lever the options ask for."""
    missing = [f for f in fields if f not in {x.name for x in dataclasses.fields(cls)}]
    if missing:
        raise SystemExit(f"{cls.__name__} has no {', '.join(missing)} in this checkout: the option needs it")


def train(args, store, student: str, agent: str, epochs: float, **levers) -> dict:
    """One `distill` run with the bench's settings (plus `levers`: DistillConfig fields); its summary."""
    from flywheel.config import DistillConfig
    from flywheel.distill.train import distill

    levers = {k: v for k, v in levers.items() if v} | {"tool_format": args.tool_format,
                                                        "argument_weight": args.argument_weight,
                                                        "value_swaps": args.value_swaps}
    if args.validation_every:
        levers |= {"validation_every": args.validation_every, "early_stopping_patience": args.patience}
    needs(DistillConfig, *levers)
    cfg = DistillConfig(agent=agent, base_model=student, num_workers=args.workers, batch_size=args.batch_size,
                        epochs=epochs, max_steps=args.max_steps, learning_rate=args.lr, max_length=args.max_length,
                        **levers)
    return distill(cfg, store)


def score(args, store, student: str, engine: CountingEngine, agent: str, version: str, in_context_k: int) -> dict:
    """`evaluate` on the agent's test split with `engine`; the report plus decoding speed with and without grammar."""
    from flywheel.config import EvaluateConfig
    from flywheel.evaluate.run import evaluate

    extra = {"constrained": True} if "constrained" in {f.name for f in dataclasses.fields(EvaluateConfig)} else {}
    engine.counts.clear()
    rep = evaluate(EvaluateConfig(agent=agent, base_model=student, adapter_version=version,
                                  max_examples=args.test_examples, in_context_k=in_context_k,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                                  min_examples=1, **extra), store, engine=engine)
    adapter = f"{agent}@{version}"
    rep["decoding_tokens_per_s"] = {"base": engine.tokens_per_s(None, False),
                                    "distilled": engine.tokens_per_s(adapter, False),
                                    "distilled_constrained": engine.tokens_per_s(adapter, True)}
    return rep


def with_intervals(row: dict, n_boot: int, seed: int) -> dict:
    """The row plus a bootstrap interval for `valid_call` (a 0/1 rate: its bootstrap needs only the count)."""
    from flywheel.metrics import bootstrap_ci

    if row.get("valid_call") is None or "valid_call_ci" in row:
        return row
    n = int(row.get("n") or 0)
    k = round(row["valid_call"] * n)
    return {**row, "valid_call_ci": bootstrap_ci([1.0] * k + [0.0] * (n - k), n_boot=n_boot, seed=seed)}


def systems_of(rep: dict, names: dict[str, str]) -> dict[str, dict]:
    boot = rep.get("bootstrap") or {}
    return {name: with_intervals(rep[name], boot.get("n_boot", 1000), boot.get("seed", 0))
            for name in names if isinstance(rep.get(name), dict)}


# -- the run ----------------------------------------------------------------------------------------------------
def prepare(args, store) -> dict:
    """Ingest the shipped logs and curate the agents the run needs; {agent: manifest}."""
    from flywheel.capture.store import ingest_file
    from flywheel.config import CurateConfig
    from flywheel.curate.pipeline import curate
    from flywheel.demo import PACKAGE_DATA

    ingest_file(store, os.path.join(PACKAGE_DATA, "sgd", "sgd_dev_flywheel_logs.jsonl"))
    if args.train_logs:  # SGD's train split too: 17x the records per agent
        ingest_file(store, os.path.join(PACKAGE_DATA, "sgd", "sgd_train_flywheel_logs.jsonl.gz"))
    every = args.init_from_shared or args.held_out_agents  # the shared adapter learns from all the others
    scope = () if every else tuple(args.agents)
    return {a: m for a, m in curate(CurateConfig(agents=scope), store).items() if m.get("version")}


def train_shared(args, store, student: str, manifests: dict) -> dict | None:
    """The shared tool-calling adapter on the other agents' train splits, when a lever asks for it."""
    if not (args.init_from_shared or args.held_out_agents):
        return None
    sources = shared_sources(manifests, set(args.agents) | set(args.held_out_agents))
    if not sources:
        raise SystemExit("no other curated agent to train the shared adapter on")
    print(f"shared adapter: {len(sources)} agents' train splits, at most {args.shared_max_examples} examples, "
          f"{args.shared_epochs} epochs", flush=True)
    out = train(args, store, student, SHARED, args.shared_epochs, datasets=tuple(sources),
                max_examples=args.shared_max_examples)
    return {**out, "sources": sources}


def run_agent(args, store, student: str, engine, manifests: dict, shared: dict | None, agent: str) -> dict:
    m = manifests[agent]
    counts = split_counts(store, agent, m["version"])
    init = f"{SHARED}@{shared['version']}" if shared and args.init_from_shared else ""
    print(f"{agent}: {counts} (dataset {m['version']}); distilling {args.epochs} epochs"
          + (f" from {init}" if init else ""), flush=True)
    out = train(args, store, student, agent, args.epochs, init_adapter=init)
    rep = score(args, store, student, engine, agent, out["version"], args.in_context_k)
    return {"splits": counts, "scored": rep["candidate"].get("n"), "legacy_dataset": bool(rep.get("legacy_dataset")),
            "init_adapter": init or None, "train": {k: out.get(k) for k in TRAIN_KEYS},
            "systems": systems_of(rep, SYSTEMS), "decoding_tokens_per_s": rep["decoding_tokens_per_s"],
            "gate": rep["gate"], "report": rep["report"]}


TRAIN_KEYS = ("version", "steps", "train_time_s", "tokens_per_s", "train_examples", "validation_loss", "best_step",
              "stopped_at", "adapter_from")


def run_held_out(args, store, student: str, engine, manifests: dict, shared: dict, agent: str) -> dict:
    """The shared adapter, registered under the held-out agent (in this run's home), scored on its test split."""
    from flywheel.registry.registry import Registry

    registry = Registry(store)
    entry = registry.get(SHARED, shared["version"])
    with tempfile.TemporaryDirectory() as tmp:
        path = registry.adapter_path(entry) if store.local else store.local_copy(entry["adapter"], tmp + "/a")
        mine = registry.register(agent, path, {"copied_from": f"{SHARED}@{shared['version']}",
                                               "datasets": entry.get("datasets"), "leave_agents_out": True})
    print(f"{agent} (held out): scoring {SHARED}@{shared['version']} as {agent}@{mine['version']}", flush=True)
    rep = score(args, store, student, engine, agent, mine["version"], 0)
    return {"splits": split_counts(store, agent, manifests[agent]["version"]), "scored": rep["candidate"].get("n"),
            "systems": systems_of(rep, HELD_OUT_SYSTEMS), "decoding_tokens_per_s": rep["decoding_tokens_per_s"]}


def run(args) -> dict:
    import ray

    from flywheel.config import default_student_path
    from flywheel.inference.engine import HFEngine
    from flywheel.models import resolve_model_path
    from flywheel.storage import Store

    student = resolve_model_path(args.base_model or default_student_path())
    home = args.home or tempfile.mkdtemp(prefix="flywheel-bench-distill-")
    store, cpus, started = Store(home), os.cpu_count() or 2, time.time()
    ray.init(num_cpus=cpus, object_store_memory=400 * 2**20, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    manifests = prepare(args, store)
    missing = [a for a in args.agents + args.held_out_agents if a not in manifests]
    if missing:
        raise SystemExit(f"no curated dataset for {missing} (agents here: {sorted(manifests)})")
    result = {"args": vars(args), "student": student, "cpus": cpus, "home": home, "agents": {}, "held_out": {},
              "curate_s": round(time.time() - started, 1)}
    if args.throughput_steps:
        result["throughput"] = throughput(args, store, student, args.agents[0], manifests[args.agents[0]]["version"])
        if args.throughput_only:
            result["wall_s"], result["partial"] = round(time.time() - started, 1), ""
            return result
    shared = train_shared(args, store, student, manifests)
    if shared:
        result["shared"] = {k: shared.get(k) for k in (*TRAIN_KEYS, "sources")}
    engine = CountingEngine(HFEngine(student))
    engine.grammar({"type": "no_tool_calls"})  # builds the grammar compiler (the vocabulary) outside the timings
    partial = save("distill", result, quiet=True)  # rewritten after each agent: a stopped run keeps what finished
    for agent in args.agents:
        result["agents"][agent] = run_agent(args, store, student, engine, manifests, shared, agent)
        save("distill", result, partial, quiet=True)
    for agent in args.held_out_agents:
        result["held_out"][agent] = run_held_out(args, store, student, engine, manifests, shared, agent)
        save("distill", result, partial, quiet=True)
    result["wall_s"] = round(time.time() - started, 1)
    result["partial"] = partial
    return result


# -- training throughput: the levers in one process, then Ray Train -------------------------------------------
def throughput(args, store, student: str, agent: str, version: str) -> dict:
    """`train_speed.levers` on the agent's train split (one process, all cores), this machine's matmul peak, and
    the same number of steps through Ray Train (`args.workers` workers, the shared prefix on)."""
    from transformers import AutoConfig

    from flywheel.config import DistillConfig
    from flywheel.distill.train import distill
    from train_speed import levers, matmul_peak

    threads, batch = os.cpu_count() or 2, args.workers * args.batch_size
    print(f"throughput: {args.throughput_steps} steps of {agent}, batch {batch}, {threads} threads", flush=True)
    shape = AutoConfig.from_pretrained(student)
    peak = matmul_peak(threads, shape.hidden_size, shape.intermediate_size)
    defaults = DistillConfig(agent=agent)
    rows = split_rows(store, agent, version, "train")
    one = levers(student, rows, args.throughput_steps, batch, threads, args.lr, args.max_length, defaults.max_history)
    for run in one["runs"].values():
        run["share_of_peak"] = run["model_gflops_per_s"] / peak[run["dtype"]]
    t0 = time.time()
    out = distill(DistillConfig(agent=agent, base_model=student, num_workers=args.workers, batch_size=args.batch_size,
                                max_steps=args.throughput_steps, learning_rate=args.lr, max_length=args.max_length,
                                run_name=f"throughput-{int(time.time())}"), store)
    on_ray = {"tokens_per_s": out["tokens_per_s"], "computed_tokens_per_s": out["computed_tokens_per_s"],
              "wall_s": round(time.time() - t0, 1), "steps": out["steps"], "batch_per_worker": args.batch_size,
              "workers": args.workers}
    return {"peak_gflops_per_s": peak, "single_process": one, "ray_train": on_ray, "train_records": len(rows),
            "epoch_hours_at_shared_rate": len(rows) / one["runs"]["shared prefix"]["records_per_s"] / 3600,
            "epoch_hours_at_best_rate": len(rows) / one["runs"]["eager attention"]["records_per_s"] / 3600,
            "ratio": on_ray["tokens_per_s"] / one["runs"]["eager attention"]["tokens_per_s"]}


# -- printing ---------------------------------------------------------------------------------------------------
def cell(row: dict, metric: str) -> str:
    value, ci = row.get(metric), row.get(f"{metric}_ci")
    if value is None:
        return "-"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"


def table(systems: dict[str, dict], labels: dict[str, str]) -> None:
    print(f"   {'system':26}" + "".join(f"{title:>22}" for _, title in METRIC_COLUMNS))
    for name, row in systems.items():
        print(f"   {labels[name]:26}" + "".join(f"{cell(row, m):>22}" for m, _ in METRIC_COLUMNS))


def speed(tps: dict, adapter: str = "distilled") -> str:
    """Decoding speed (completion tokens/s of `generate`): base, the adapter, the adapter under the grammar."""
    f = {k: (f"{v:.1f}" if v else "-") for k, v in tps.items()}
    ratio = (tps["distilled_constrained"] / tps["distilled"]) if tps.get("distilled") and \
        tps.get("distilled_constrained") else None
    return (f"decoding: base {f['base']} tokens/s, {adapter} {f['distilled']}, {adapter} + constrained "
            f"{f['distilled_constrained']}" + (f" (x{ratio:.2f})" if ratio else ""))


def report(result: dict) -> None:
    args = result["args"]
    print(f"\n== distillation of {result['student']} on {result['cpus']} CPUs ({result.get('wall_s', '-')} s in all); "
          f"figures on each agent's TEST split, 95% bootstrap intervals; tools rendered as "
          f"{args.get('tool_format', 'signatures')}, max_length {args['max_length']}, argument tokens weighted "
          f"x{args.get('argument_weight', 1.0):g} in the training loss, {args.get('value_swaps', 0)} value-swapped "
          f"copies per training example")
    if result.get("shared"):
        s = result["shared"]
        print(f"\nshared adapter {SHARED}@{s['version']}: {len(s['sources'])} agents, {s['train_examples']} train "
              f"examples, {s['steps']} steps in {s['train_time_s']} s")
    for agent, r in result["agents"].items():
        t = r["train"]
        print(f"\n{agent}: splits {r['splits']}, {r['scored']} test examples scored"
              f"{' (a train/eval dataset: its eval file)' if r['legacy_dataset'] else ''}; "
              f"{t['steps']} steps in {t['train_time_s']} s" + (f" from {r['init_adapter']}" if r["init_adapter"]
                                                                 else "")
              + (f"; best validation loss {t['validation_loss']:.3f} at step {t['best_step']}"
                 if t.get("validation_loss") is not None else "")
              + (f", stopped early at step {t['stopped_at']}" if t.get("stopped_at") else ""))
        table(r["systems"], SYSTEMS)
        print(f"   {speed(r['decoding_tokens_per_s'])}")
        g = r["gate"]
        print(f"   gate: {'passed' if g.get('passed') else 'failed'} (lower bound {g.get('candidate_lower')} vs "
              f"threshold {g.get('threshold')})")
    for agent, r in result["held_out"].items():
        print(f"\n{agent} (left out of the shared adapter): splits {r['splits']}, {r['scored']} test examples")
        table(r["systems"], HELD_OUT_SYSTEMS)
        print(f"   {speed(r['decoding_tokens_per_s'], 'shared')}")
    if result.get("throughput"):
        report_throughput(result["throughput"])


def report_throughput(t: dict) -> None:
    p, q, peak = t["single_process"], t["ray_train"], t["peak_gflops_per_s"]
    print(f"\ntraining throughput, {p['steps']} steps (the first untimed) of batch {p['batch']}, one process, "
          f"{p['threads']} threads; matmul peak here {peak['float32']} GFLOP/s fp32, {peak['bfloat16']} bf16; "
          f"{p['fit_max_length']} train records fit max_length")
    for mode, r in p["runs"].items():
        print(f"   {mode:14} {r['records_per_s']:.3f} records/s  {r['tokens_per_s']:.0f} tokens/s  "
              f"{r['computed_tokens_per_s']:.0f} computed/s  {r['model_gflops_per_s']:.1f} GFLOP/s "
              f"({r['share_of_peak']:.0%} of {r['dtype']} peak)")
    print(f"   shared prefix: {p['mean_shared_prefix']:.0f} tokens per batch on average; x{p['speedup_records_per_s']:.2f} "
          f"records/s; largest loss difference over the steps {p['max_loss_difference']:.2g}")
    if "attention_speedup_records_per_s" in p:
        print(f"   eager attention: x{p['attention_speedup_records_per_s']:.2f} records/s over the shared prefix; "
              f"largest loss difference {p['attention_max_loss_difference']:.2g}")
    best = "best" if "epoch_hours_at_best_rate" in t else "shared"
    print(f"   one epoch of the {t['train_records']} train records at the {best} rate: "
          f"{t[f'epoch_hours_at_{best}_rate']:.2f} h")
    print(f"   Ray Train ({q['workers']} workers x batch {q['batch_per_worker']}, shared prefix, the product's "
          f"attention): {q['tokens_per_s']:.0f} tokens/s ({q['computed_tokens_per_s']:.0f} computed/s); "
          f"x{t['ratio']:.2f} the one process")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", default="sgd_Flights", help="comma-separated SGD agents to distill and score")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=0, help=">0: cap every training run at this many steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2, help="per worker (the global batch is workers x this)")
    ap.add_argument("--report", default="", help="print the tables of a saved results JSON (a stopped run's too)")
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument("--tool-format", default="signatures", choices=TOOL_FORMATS,
                    help="how tools are rendered in the prompt (training and scoring; Serve renders signatures)")
    ap.add_argument("--argument-weight", type=float, default=1.0,
                    help="weight of a tool call's argument tokens in the training loss (1: plain cross-entropy)")
    ap.add_argument("--value-swaps", type=int, default=0,
                    help="copies of each training example with its stated argument values swapped (0: off)")
    ap.add_argument("--validation-every", type=int, default=0,
                    help="early stopping: validation loss every N steps, the best adapter kept (0: off)")
    ap.add_argument("--patience", type=int, default=0, help="stop after this many checks without a lower loss")
    ap.add_argument("--init-from-shared", action="store_true",
                    help="start each agent's adapter from a shared adapter trained on the other agents")
    ap.add_argument("--shared-max-examples", type=int, default=400)
    ap.add_argument("--shared-epochs", type=float, default=1.0)
    ap.add_argument("--held-out-agents", default="", help="comma-separated agents the shared adapter never sees, "
                                                          "scored against the base student")
    ap.add_argument("--test-examples", "--eval-examples", type=int, default=0, help="0: the whole test split")
    ap.add_argument("--in-context-k", type=int, default=3, help="0: skip the in-context baseline")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="96 cut 4 answers in an earlier table")
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--throughput-steps", type=int, default=0, help="0: skip the training-throughput comparison")
    ap.add_argument("--throughput-only", action="store_true", help="stop after the throughput comparison")
    ap.add_argument("--train-logs", action="store_true", help="also ingest the shipped SGD train-split logs")
    ap.add_argument("--home", default="", help="a FLYWHEEL_HOME to keep (default: a temporary one)")
    ap.add_argument("--base-model", default="", help="default: the student `make setup` built")
    args = ap.parse_args(argv)
    args.agents = [a for a in args.agents.split(",") if a]
    args.held_out_agents = [a for a in args.held_out_agents.split(",") if a]
    if set(args.agents) & set(args.held_out_agents):
        ap.error("--held-out-agents must not repeat --agents")
    if args.patience and not args.validation_every:
        ap.error("--patience needs --validation-every")
    return args


def main() -> None:
    args = parse_args()
    if args.report:
        with open(args.report) as f:
            report(json.load(f))
        return
    result = run(args)
    report(result)
    save("distill", result, result.pop("partial"))
    print(f"home {result['home']}")
    print("reproduce: flock /tmp/flywheel-heavy.lock .venv/bin/python bench/distill.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
