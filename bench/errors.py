"""Where a distilled adapter's tool calls go wrong: each argument of each test example, compared as the metrics do.

    flock /tmp/flywheel-heavy.lock .venv/bin/python bench/errors.py --home HOME --agent sgd_Flights --version v1

Reads an agent's TEST split (`--split validation`: its validation split, where a decoding lever is chosen before
test sees it) from a Flywheel home (for instance one `bench/distill.py --home` kept), decodes every example with
the registered adapter under its tool-call grammar (`tool_choice: auto`, as `candidate_constrained` in `flywheel
evaluate`; `--demos K`: with its K nearest TRAIN examples in the prompt, as `base_in_context` builds them), and
compares each call with the teacher's the way `name_args_accuracy` does
(`flywheel.metrics.canonical_args`: declared types, case and whitespace ignored, an optional argument
equal to its declared default the same as leaving it out). Printed: how many answers are right, and per argument
name how often the student left out a value the teacher gave (`omitted`), gave one the teacher did not (`added`),
or gave another value (`wrong`), with examples; a wrong function counts under `function`; then every answer that
is not a valid call (`flywheel.evaluate.run.valid_call`) with the reason. Results, each answer included, go to
bench/figures/errors-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import save  # noqa: E402  (bench/results.py)


def calls(answer: dict | None) -> dict[str, dict]:
    """{function name: arguments} of a MESSAGE- or OpenAI-shaped answer (the last call of a name wins)."""
    out = {}
    for tc in (answer or {}).get("tool_calls") or []:
        fn = tc.get("function", tc)
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            args = {}
        out[fn.get("name")] = args if isinstance(args, dict) else {}
    return out


def differences(expected: dict, answer: dict, tools: list[dict]) -> list[tuple[str, str, str]]:
    """(kind, argument, "teacher -> student") for each difference; empty when the answer is right."""
    from flywheel.metrics import canonical_args, tool_schemas

    schemas = tool_schemas(tools)
    exp, got = calls(expected), calls(answer)
    if set(exp) != set(got):
        return [("function", "-", f"{sorted(exp)} -> {sorted(got)}")]
    out = []
    for name in exp:
        e, g = (dict(canonical_args(name, args, schemas)) for args in (exp[name], got[name]))
        for key in sorted(set(e) | set(g)):
            if key not in g:
                out.append(("omitted", key, f"{e[key]} -> (none)"))
            elif key not in e:
                out.append(("added", key, f"(none) -> {g[key]}"))
            elif e[key] != g[key]:
                out.append(("wrong", key, f"{e[key]} -> {g[key]}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--version", default="latest", help="the adapter's registry version")
    ap.add_argument("--split", default="test", choices=("test", "validation"))
    ap.add_argument("--examples", type=int, default=0, help="the first N examples (0: all)")
    ap.add_argument("--demos", type=int, default=0, help="K nearest train examples in each prompt (0: none)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--base-model", default="")
    args = ap.parse_args()

    from flywheel.config import EvaluateConfig, default_student_path
    from flywheel.datasets import TRAIN, open_split, resolve_version
    from flywheel.evaluate.run import _constraints, _prompts, call_problem_of, tool_format
    from flywheel.inference.answers import generate_answers
    from flywheel.inference.engine import HFEngine
    from flywheel.registry.registry import Registry
    from flywheel.storage import Store

    store = Store(args.home)
    registry = Registry(store)
    entry = registry.get(args.agent, args.version)
    version = resolve_version(store, args.agent)
    examples = open_split(store, args.agent, version, args.split).rows()
    examples = examples[:args.examples] if args.examples else examples
    tools = [json.loads(e.get("tools_json") or "[]") for e in examples]
    engine = HFEngine(args.base_model or default_student_path())
    name = f"{args.agent}@{entry['version']}"
    engine.load_adapter(name, registry.adapter_path(entry))
    # the evaluation's prompts: its defaults (10 history turns; demos fitted into 2,048 prompt tokens)
    cfg = EvaluateConfig(agent=args.agent, in_context_k=args.demos)
    train = open_split(store, args.agent, version, TRAIN).rows() if args.demos else []
    prompts = _prompts(cfg, examples, train, engine, tool_format(entry))
    run = generate_answers(engine, prompts["base_in_context" if args.demos else "base"], name, args.batch_size,
                           args.max_new_tokens, constraints=_constraints(tools))
    kinds, samples, rows = Counter(), defaultdict(list), []
    for e, answer, t in zip(examples, run["answers"], tools):
        diff = differences(e["target"], answer, t)
        problem = call_problem_of(answer, t)
        rows.append({"record_id": e["record_id"], "right": not diff, "differences": diff,
                     "invalid": list(problem) if problem else None, "answer": answer})
        for kind, key, text in diff:
            kinds[(kind, key)] += 1
            samples[(kind, key)].append(text)
    right = sum(r["right"] for r in rows)
    print(f"{args.agent}@{entry['version']}: {right}/{len(rows)} {args.split} answers right (name + arguments, "
          f"constrained{f', {args.demos} demos' if args.demos else ''})")
    for (kind, key), n in kinds.most_common():
        print(f"  {kind:9s} {key:22s} {n:3d}   e.g. {'; '.join(samples[(kind, key)][:3])}")
    for r in (r for r in rows if r["invalid"]):
        print(f"  invalid call ({r['invalid'][0]}) {r['record_id']}: {r['invalid'][1]}")
    save("errors", {"args": vars(args), "right": right, "n": len(rows), "rows": rows,
                    "counts": [[kind, key, n] for (kind, key), n in kinds.most_common()]})


if __name__ == "__main__":
    main()
