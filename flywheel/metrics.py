"""Scoring a student's answers against the teacher's, per workload type. Pure functions, no model.

- tool calling: function-name accuracy (the multiset of called functions matches), name+arguments accuracy (the
  multiset of whole calls matches, in any order), call F1 (partial credit over whole calls, for multi-call
  answers), argument (slot) F1, and `tool_call_rate`: the share of answers that make any parseable tool call,
  right or wrong (the schema check is `valid_call` in `flywheel.evaluate.run`);
- classification: accuracy and macro-F1 over the teacher's labels;
- free text: token-overlap F1 (an LLM judge is optional, see `flywheel.evaluate.judge`).

Arguments are compared type-aware, using the tool's declared JSON schema when the example carries it: a
`number`/`integer` argument compares as a number ("2" == 2 == 2.0), a `string` one as text (2 == "2", but
"02" != "2"), a `boolean` one as true/false; case and whitespace never matter. An optional argument whose value
equals its declared default (`"default"` or "(default: x)" in the description) counts the same as omitting it.
Without a schema, values fall back to `norm_value`.

`per_example` gives each metric's per-example values; `bootstrap_ci` resamples them (percentile bootstrap over
examples, seeded) for the confidence intervals the gate reads.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

from flywheel.checks import class_label, normalise_text
from flywheel.prompts import DEFAULT_RE

PRIMARY = {"tool_call": "name_args_accuracy", "classification": "accuracy", "text": "token_f1"}
METRICS = {"tool_call": ("function_name_accuracy", "name_args_accuracy", "call_f1", "slot_f1", "tool_call_rate"),
           "classification": ("accuracy", "macro_f1"), "text": ("token_f1",)}
BINARY = frozenset({"function_name_accuracy", "name_args_accuracy", "tool_call_rate", "accuracy"})  # 0/1 per example


def norm_value(v: Any) -> Any:
    """Schema-free normal form: "2" == 2 == 2.0, "San Jose " == "san jose", "True" == true. Always hashable."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = normalise_text(v)
        if s in ("true", "false"):
            return s == "true"
        try:
            return float(s)
        except ValueError:
            return s
    if isinstance(v, list):
        return tuple(norm_value(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), norm_value(x)) for k, x in v.items()))
    return v


def _declared_type(spec: dict) -> str | None:
    kind = spec.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return kind if isinstance(kind, str) else None


def _as_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return normalise_text(str(v))


def norm_typed(v: Any, spec: dict | None) -> Any:
    """`v` normalised as the schema `spec` declares it (number, integer, string, boolean); else `norm_value`."""
    kind = _declared_type(spec or {})
    if kind in ("number", "integer") and not isinstance(v, bool):
        try:
            return float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError):
            return norm_value(v)
    if kind == "string" and isinstance(v, (str, int, float)):
        return _as_text(v)
    if kind == "boolean" and isinstance(v, str) and normalise_text(v) in ("true", "false"):
        return normalise_text(v) == "true"
    return norm_value(v)


def declared_default(spec: dict) -> Any:
    """An argument's declared default: `"default"` in its schema, else "(default: x)" in its description."""
    if "default" in spec:
        return spec["default"]
    m = DEFAULT_RE.search(spec.get("description") or "")
    return m.group(1).strip() if m else None


def tool_schemas(tools: Sequence[dict] | None) -> dict[str, tuple[dict, frozenset]]:
    """OpenAI tool declarations -> {tool name: (argument schemas, required argument names)}."""
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        params = fn.get("parameters") or {}
        if isinstance(fn.get("name"), str):
            props = params.get("properties") or {}
            out[fn["name"]] = ({k: s for k, s in props.items() if isinstance(s, dict)},
                               frozenset(params.get("required") or ()))
    return out


def canonical_args(name: str, args: dict, schemas: dict[str, tuple[dict, frozenset]]) -> tuple:
    """Arguments as a sorted, hashable tuple of (key, normal value); optional defaults dropped."""
    props, required = schemas.get(name, ({}, frozenset()))
    out = []
    for key, value in args.items():
        spec = props.get(key)
        norm = norm_typed(value, spec)
        default = declared_default(spec) if spec else None
        if spec and key not in required and default is not None and norm == norm_typed(default, spec):
            continue  # the declared default, written out: the same as leaving it out
        out.append((key, norm))
    return tuple(sorted(out, key=lambda kv: kv[0]))


def _calls(msg: dict | None) -> list[tuple[str, dict]]:
    out = []
    for tc in (msg or {}).get("tool_calls") or []:
        fn = tc.get("function", tc)
        args = fn.get("arguments")
        try:
            args = json.loads(args) if isinstance(args, str) else (args or {})
        except json.JSONDecodeError:
            args = {}
        out.append((fn.get("name"), args if isinstance(args, dict) else {}))
    return out


def _f1(hit: int, n_pred: int, n_exp: int) -> float:
    p = hit / n_pred if n_pred else float(not n_exp)
    r = hit / n_exp if n_exp else float(not n_pred)
    return 2 * p * r / (p + r) if p + r else 0.0


def score_tool_call(expected: dict, predicted: dict, tools: Sequence[dict] | None = None) -> dict[str, float]:
    """One answer: all calls compared as multisets, so the order of several calls never matters."""
    schemas = tool_schemas(tools)
    exp = Counter((n, canonical_args(n, a, schemas)) for n, a in _calls(expected))
    pred = Counter((n, canonical_args(n, a, schemas)) for n, a in _calls(predicted))
    name_ok = Counter(n for n, _ in exp.elements()) == Counter(n for n, _ in pred.elements())
    exp_slots = Counter((n, kv) for n, args in exp.elements() for kv in args)
    pred_slots = Counter((n, kv) for n, args in pred.elements() for kv in args)
    return {"function_name_accuracy": float(name_ok), "name_args_accuracy": float(name_ok and exp == pred),
            "call_f1": _f1(sum((exp & pred).values()), sum(pred.values()), sum(exp.values())),
            "slot_f1": _f1(sum((exp_slots & pred_slots).values()), sum(pred_slots.values()), sum(exp_slots.values())),
            "tool_call_rate": float(bool(pred))}


def token_f1(a: str, b: str) -> float:
    ta, tb = normalise_text(a).split(), normalise_text(b).split()
    common = sum((Counter(ta) & Counter(tb)).values())
    if not ta or not tb or not common:
        return float(ta == tb)
    p, r = common / len(tb), common / len(ta)
    return 2 * p * r / (p + r)


def macro_f1(pairs: Sequence[tuple[str | None, str | None]]) -> float:
    labels = {e for e, _ in pairs}
    tp, fp, fn = defaultdict(int), defaultdict(int), defaultdict(int)
    for e, p in pairs:
        if e == p:
            tp[e] += 1
        else:
            fn[e] += 1
            if p is not None:
                fp[p] += 1
    f1s = []
    for lb in labels:
        prec = tp[lb] / (tp[lb] + fp[lb]) if tp[lb] + fp[lb] else 0.0
        rec = tp[lb] / (tp[lb] + fn[lb]) if tp[lb] + fn[lb] else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / len(f1s) if f1s else 0.0


def per_example(task: str, expected: list[dict], predicted: list[dict],
                tools: Sequence[Sequence[dict] | None] | None = None) -> dict[str, list]:
    """Each metric's per-example values (classification: also the (expected, predicted) label pairs)."""
    if len(expected) != len(predicted):
        raise ValueError(f"{len(expected)} expected answers but {len(predicted)} predictions")
    if task == "tool_call":
        rows = [score_tool_call(e, p, t) for e, p, t in zip(expected, predicted, tools or [None] * len(expected))]
        return {m: [r[m] for r in rows] for m in METRICS[task]}
    if task == "classification":
        pairs = [(class_label(e.get("content")), class_label(p.get("content"))) for e, p in zip(expected, predicted)]
        return {"accuracy": [float(e == p) for e, p in pairs], "pairs": pairs}
    return {"token_f1": [token_f1(e.get("content") or "", p.get("content") or "")
                         for e, p in zip(expected, predicted)]}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if len(xs) else math.nan


def _statistics(task: str, values: dict[str, list]) -> dict[str, tuple[Sequence, Callable]]:
    """metric -> (items to resample, statistic of a resample)."""
    stats = {m: (values[m], _mean) for m in METRICS[task] if m in values}
    if task == "classification":
        stats["macro_f1"] = (values["pairs"], macro_f1)
    return stats


def score(task: str, expected: list[dict], predicted: list[dict],
          tools: Sequence[Sequence[dict] | None] | None = None) -> dict[str, float]:
    """Metrics over paired answers (MESSAGE-shaped expected, OpenAI- or MESSAGE-shaped predicted), and `n`."""
    if not expected:
        return {"n": 0}
    return summarise(task, per_example(task, expected, predicted, tools)) | {"n": len(expected)}


def summarise(task: str, values: dict[str, list]) -> dict[str, float]:
    """Each metric of `task` from its `per_example` values (means; macro-F1 over the label pairs)."""
    return {m: stat(items) for m, (items, stat) in _statistics(task, values).items()}


def bootstrap_ci(items: Sequence, statistic: Callable[[Sequence], float] = _mean, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of `statistic` over examples: `n_boot` resamples with replacement, seeded
    (the same seed and n draw the same resamples, so systems scored on one eval split are paired)."""
    import numpy as np

    n = len(items)
    if n == 0 or n_boot < 1:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    if statistic is _mean:
        stats = np.asarray(items, dtype=float)[idx].mean(axis=1)
    else:
        stats = np.array([statistic([items[i] for i in row]) for row in idx])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def confidence_intervals(task: str, values: dict[str, list], n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> dict[str, list[float] | None]:
    """`{"<metric>_ci": [lo, hi]}` for every metric of `task`, from `per_example` values."""
    return {f"{m}_ci": bootstrap_ci(items, stat, n_boot, seed, level)
            for m, (items, stat) in _statistics(task, values).items()}


def binom_cdf(k: int, n: int, p: float) -> float:
    """Exact P(Binomial(n, p) <= k), summed in log space so that large n neither overflows nor underflows."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"binom_cdf needs n >= 0 and p in [0, 1], got n={n}, p={p}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    terms = [log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def wilson_lower(p: float, n: int, z: float = 1.96) -> float:
    """95% Wilson lower bound of a proportion: 33/33 correct is only >= 0.89 with confidence."""
    if n <= 0 or math.isnan(p):
        return 0.0
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / denom)
