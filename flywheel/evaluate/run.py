"""Evaluate an agent's candidate adapter on its held-out traffic, gate it, optionally promote it.

    flywheel evaluate --agent sgd_Flights --adapter-version v2 --promote --json
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/evaluate.yaml

Side by side on the eval split: the teacher (its logged answers are the reference, so it scores 1.0 by
construction), the base student, the current production adapter (if any) and the candidate. The report is
written as JSON and markdown to `reports/<agent>/<version>/`, the scores go into the registry, and with
`--promote` a passing candidate becomes `production` by compare-and-swap and the agent is routed to it.
"""

from __future__ import annotations

import json
import math
import time

from flywheel.config import EvaluateConfig
from flywheel.storage import Store


def generate_answers(engine, examples: list[dict], adapter: str | None, cfg: EvaluateConfig,
                     progress=None) -> tuple[list[dict], float]:
    """Student answers (OpenAI message shape) for examples, and the mean seconds per request."""
    from flywheel.distill.data import prompt_turns
    from flywheel.prompts import parse_answer

    answers, started = [], time.time()
    for i in range(0, len(examples), cfg.batch_size):
        chunk = examples[i:i + cfg.batch_size]
        gens = engine.generate([prompt_turns(e, cfg.max_history) for e in chunk], [adapter] * len(chunk),
                               cfg.max_new_tokens)
        answers += [parse_answer(g.text) for g in gens]
        if progress is not None:
            progress.update(len(chunk))
    return answers, (time.time() - started) / max(1, len(examples))


def evaluate(cfg: EvaluateConfig, store: Store | None = None, engine=None, progress: bool = False) -> dict:
    from flywheel.curate.pipeline import read_split, resolve_version
    from flywheel.evaluate.gate import decide
    from flywheel.evaluate.metrics import PRIMARY, score
    from flywheel.registry.registry import Registry
    from flywheel.routing import STUDENT, set_route
    from flywheel.serve.engine import HFEngine

    store = store or Store(cfg.home or None)
    registry = Registry(store)
    candidate = registry.get(cfg.agent, cfg.adapter_version)
    dataset_version = resolve_version(store, cfg.agent, cfg.dataset_version)
    examples = read_split(store, cfg.agent, dataset_version, "eval").to_pylist()
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    if not examples:
        raise ValueError(f"{cfg.agent}: the eval split of dataset {dataset_version} is empty")
    manifest = store.read_json(f"datasets/{cfg.agent}/{dataset_version}/manifest.json")
    task = manifest["task"]
    examples = [e for e in examples if e["task"] == task]
    expected = [e["target"] for e in examples]
    production = registry.alias(cfg.agent)
    engine = engine or HFEngine(cfg.base_model)
    rows: dict[str, dict] = {"teacher": {**score(task, expected, expected), "s_per_request": None}}
    bar = None
    if progress:
        from tqdm import tqdm

        passes = 2 + (production is not None and production["version"] != candidate["version"])
        bar = tqdm(total=passes * len(examples), desc=f"evaluate {cfg.agent}", unit="answer")
    systems: list[tuple[str, str | None, dict | None]] = [("base", None, None), ("candidate", candidate["version"], candidate)]
    if production is not None and production["version"] != candidate["version"]:
        systems.append(("production", production["version"], production))
    samples = {}
    for name, version, entry in systems:
        adapter = None
        if entry is not None:
            adapter = f"{cfg.agent}@{version}"
            engine.load_adapter(adapter, registry.adapter_path(entry) if store.local else
                                store.local_copy(entry["adapter"], f"/tmp/flywheel-adapters/{adapter}"))
        answers, s_per_req = generate_answers(engine, examples, adapter, cfg, bar)
        rows[name] = {**score(task, expected, answers), "s_per_request": round(s_per_req, 3),
                      "valid_answers": sum(a["valid"] for a in answers) / len(answers)}
        samples[name] = answers[:3]
    if bar is not None:
        bar.close()
    if production is not None and production["version"] == candidate["version"]:
        rows["production"] = rows["candidate"]
    report = {"agent": cfg.agent, "task": task, "metric": PRIMARY[task], "dataset_version": dataset_version,
              "candidate_version": candidate["version"], "base_model": cfg.base_model,
              "production_version": production["version"] if production else None,
              "n_expected": len(examples), **rows, "samples": samples, "created": time.time()}
    report["gate"] = decide(report, cfg.min_share_of_teacher, cfg.min_examples)
    report["promoted"] = False
    if cfg.promote and report["gate"]["passed"]:
        registry.promote(cfg.agent, candidate["version"],
                         expected=production["version"] if production else None,
                         reason=f"gate passed: {report['gate']['metric']}={report['gate']['candidate']:.3f}")
        set_route(store, cfg.agent, STUDENT, reason=f"promoted {candidate['version']}")
        report["promoted"] = True
    registry.record_scores(cfg.agent, candidate["version"],
                           {k: v for k, v in rows["candidate"].items()} | {"gate": report["gate"]["passed"]})
    prefix = f"reports/{cfg.agent}/{candidate['version']}"
    store.write_json(f"{prefix}/eval.json", report)
    store.write_bytes(f"{prefix}/eval.md", markdown(report).encode())
    report["report"] = store.path(f"{prefix}/eval.md")
    return report


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def markdown(report: dict) -> str:
    metrics = [k for k in report["candidate"] if k not in ("n", "s_per_request", "valid_answers")]
    head = "| system | " + " | ".join(metrics) + " | s/request |\n|---|" + "---|" * (len(metrics) + 1) + "\n"
    body = ""
    for name in ("teacher", "base", "production", "candidate"):
        if name in report and isinstance(report[name], dict):
            r = report[name]
            body += f"| {name} | " + " | ".join(_fmt(r.get(m)) for m in metrics) + f" | {_fmt(r.get('s_per_request'))} |\n"
    gate = report["gate"]
    verdict = "PASSED" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"])
    return (f"# Evaluation: {report['agent']} {report['candidate_version']}\n\n"
            f"Dataset `{report['dataset_version']}`, {report['n_expected']} held-out examples, task "
            f"`{report['task']}`, base `{report['base_model']}`. The teacher's logged answers are the reference.\n\n"
            f"{head}{body}\nGate ({gate.get('metric')}): {verdict}\n\nPromoted: {report['promoted']}\n\n"
            f"Sample candidate answers:\n\n```json\n{json.dumps(report['samples'].get('candidate'), indent=1)}\n```\n")
