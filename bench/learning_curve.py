"""Learning curves: the real student distilled on nested subsets of an agent's train split, each scored on the same
TEST sessions, a fitted curve and the records it forecasts for the goal.

    .venv/bin/python bench/learning_curve.py --agents sgd_Restaurants --sizes 20,40,80 --max-test 60 \\
        --out bench/figures/learning-sgd_Restaurants.json
    .venv/bin/python bench/learning_curve.py --agents sgd_Restaurants,sgd_Flights \\
        --sizes 130,260,520,1040,0 --epochs 3                           # up to the full train set (0): days on CPU
    .venv/bin/python bench/learning_curve.py --report bench/figures/learning-sgd_Restaurants.json

The shipped dev AND train logs are ingested and curated once (`bench/selective.py`'s `prepare`), so an agent's
validation and test sessions are fixed and only its train set grows. Size n trains on the first n train records
of one seeded hash order of their ids (`DistillConfig.max_examples`, `distill.data.take_balanced`), so each subset
holds the smaller ones. Each adapter's answers to the first `--max-test` test examples are decoded under each
request's tool-call grammar, as Serve decodes them; name + arguments, function name and valid call are reported
with 95% bootstrap intervals. `flywheel.evaluate.learning.forecast` fits error(n) = a * n^-b to name + arguments
and gives the records for `--goal` with a 90% interval over resampled test examples, or says the last size is a
plateau. Each agent's curve is also kept in the home (`reports/<agent>/learning.json`), where its next evaluation
report and the status page compare the forecast with the records it has. The plot goes beside the JSON (`.png`). Results are written after every size: a stopped run keeps what
finished, and `--resume` (same settings and `--home`) runs only the sizes it lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import save  # noqa: E402  (bench/results.py)

METRICS = ("name_args_accuracy", "function_name_accuracy", "valid_call")


def size_point(args, store, agent: str, n: int, test: list[dict]) -> dict:
    """Train on the first `n` records (0: all), decode the test examples, score them."""
    from flywheel.config import DistillConfig, EvaluateConfig
    from flywheel.distill.train import distill
    from flywheel.evaluate.run import system_row
    from flywheel.metrics import per_example
    from selective import decoder

    started = time.perf_counter()
    extra = {"base_model": args.base_model} if args.base_model else {}
    trained = distill(DistillConfig(agent=agent, home=store.uri, epochs=args.epochs, max_examples=n,
                                    max_length=args.max_length, learning_rate=args.lr, num_workers=args.workers,
                                    batch_size=args.batch_size, max_steps=args.max_steps,
                                    run_name=f"{agent}-learning-{n or 'all'}", **extra), store)
    train_s = time.perf_counter() - started
    engine, decode = decoder(args, store, agent, trained["version"])
    started = time.perf_counter()
    run = decode(test)
    decode_s = time.perf_counter() - started
    tools = [json.loads(e.get("tools_json") or "[]") for e in test]
    expected = [e["target"] for e in test]
    row = system_row("tool_call", expected, run["answers"], tools, EvaluateConfig(agent=agent, in_context_k=0), run)
    correct = per_example("tool_call", expected, run["answers"], tools)["name_args_accuracy"]
    return {"n": trained["train_examples"], "asked": n, "adapter_version": trained["version"],
            "train_s": round(train_s, 1), "decode_s": round(decode_s, 1),
            "tokens_per_s": trained.get("tokens_per_s"), "correct": [int(c) for c in correct],
            **{m: row.get(m) for m in METRICS}, **{f"{m}_ci": row.get(f"{m}_ci") for m in METRICS}}


def bench_agent(args, store, agent: str, out: dict, path: str) -> dict:
    from flywheel.datasets import TEST, open_split, resolve_version
    from flywheel.evaluate.learning import forecast, save_curve

    test = open_split(store, agent, resolve_version(store, agent), TEST).rows()[: args.max_test or None]
    kept = {p["asked"]: p for p in (out["agents"].get(agent) or {}).get("points", [])}  # --resume
    result = {"agent": agent, "n_test": len(test), "points": [], "goal": args.goal}
    out["agents"][agent] = result
    for n in args.sizes:
        result["points"].append(kept.get(n) or size_point(args, store, agent, n, test))
        save("learning", out, path, quiet=True)  # the point is kept before anything else can fail
        result["forecast"] = forecast(result["points"], args.goal)
        save("learning", out, path, quiet=True)
        save_curve(store, agent, result)  # where the agent's eval report and the status page read it
        print_agent(result)
    return result


def resumed(args) -> dict:
    """The run at `--out`, whose finished sizes are kept, after checking it ran with these settings."""
    saved = json.load(open(args.out))
    same = ("epochs", "lr", "max_steps", "workers", "batch_size", "max_length", "max_test", "max_new_tokens", "home")
    changed = [k for k in same if saved["settings"].get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"--resume: {args.out} ran with other {', '.join(changed)}; its sizes are not comparable")
    return saved


def print_agent(r: dict) -> None:
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"\n{r['agent']}: {r['n_test']} test examples (the same at every size)")
    print(f"   {'records':>8} {'name + arguments':>22} {'function name':>22} {'valid call':>11} {'train s':>8}")
    for p in r["points"]:
        ci = p.get("name_args_accuracy_ci") or (None, None)
        fci = p.get("function_name_accuracy_ci") or (None, None)
        print(f"   {p['n']:>8} {f(p['name_args_accuracy']):>6} [{f(ci[0])}, {f(ci[1])}]  "
              f"{f(p['function_name_accuracy']):>6} [{f(fci[0])}, {f(fci[1])}]  {f(p['valid_call']):>11} "
              f"{p['train_s']:>8}")
    fc = r.get("forecast") or {}
    fit = fc.get("fit")
    if fit:
        print(f"   fit: error(n) = {fit['a']:.3g} * n^({-fit['b']:.3g}); name + arguments {fc['goal']} at "
              + (f"{fc['n']:,.0f} records" if fc.get("n") else "no size within reach")
              + (f" (90%: {fc['low']:,.0f} - {fc['high']:,.0f})" if fc.get("low") else "")
              + ("; the last size is a plateau" if fc.get("plateau") else ""))


def plot(out: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flywheel.evaluate.learning import predict

    fig, ax = plt.subplots(figsize=(6, 4))
    for agent, r in out["agents"].items():
        ns = [p["n"] for p in r["points"]]
        acc = [p["name_args_accuracy"] for p in r["points"]]
        lo = [a - (p.get("name_args_accuracy_ci") or [a, a])[0] for a, p in zip(acc, r["points"])]
        hi = [(p.get("name_args_accuracy_ci") or [a, a])[1] - a for a, p in zip(acc, r["points"])]
        line = ax.errorbar(ns, acc, yerr=[lo, hi], marker="o", capsize=3, label=agent)
        fit = (r.get("forecast") or {}).get("fit")
        if fit:
            grid = [min(ns) * (max(ns) * 20 / min(ns)) ** (i / 50) for i in range(51)]
            ax.plot(grid, [predict(fit, n) for n in grid], "--", color=line[0].get_color(), alpha=0.6)
    ax.axhline(out["settings"]["goal"], color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("train records")
    ax.set_ylabel("name + arguments (test)")
    ax.set_ylim(0, 1)
    ax.legend()
    png = path.removesuffix(".json") + ".png"
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return png


def main() -> None:
    from selective import training_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", default="sgd_Restaurants,sgd_Flights")
    ap.add_argument("--sizes", default="20,40,80,160,320", help="train records per size, increasing (0: all)")
    training_args(ap, epochs=1.0)
    ap.add_argument("--max-test", type=int, default=100, help="test examples per agent (0: all)")
    ap.add_argument("--goal", type=float, default=0.8, help="name + arguments the forecast aims at")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--home", default="")
    ap.add_argument("--base-model", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--report", default="", help="reprint a saved run and draw its plot")
    ap.add_argument("--resume", action="store_true",
                    help="keep the sizes --out already holds (run with the same settings and --home)")
    args = ap.parse_args()
    if args.report:  # reprint a saved run, and draw its plot (a stopped run has none yet)
        saved = json.load(open(args.report))
        for r in saved["agents"].values():
            print_agent(r)
        print("plot:", plot(saved, args.report))
        return
    args.agents = [a for a in args.agents.split(",") if a]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if any(b <= a for a, b in zip(args.sizes, args.sizes[1:]) if b):
        ap.error("--sizes must increase (0, all records, last)")
    from selective import prepare

    from flywheel.storage import Store

    store = Store(args.home or tempfile.mkdtemp(prefix="flywheel-learning-"))
    out = {"command": "python bench/learning_curve.py " + shlex.join(sys.argv[1:]), "started": time.time(),
           "settings": {k: v for k, v in vars(args).items() if k not in ("report", "resume")}, "agents": {}}
    if args.resume:  # the home already holds the curated splits
        out.update({k: v for k, v in resumed(args).items() if k in ("agents", "curated")})
    else:
        out["curated"] = {a: (m or {}).get("counts") for a, m in prepare(args, store).items()}
    path = save("learning", out, args.out)
    for agent in args.agents:
        bench_agent(args, store, agent, out, path)
        out["plot"] = plot(out, path)
        save("learning", out, path)
    print("reproduce: .venv/bin/python bench/learning_curve.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
