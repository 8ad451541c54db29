"""Scoring a student's answers against the teacher's, per workload type. Pure functions, no model.

- tool calling: function-name accuracy (the set of called functions matches), name+arguments accuracy (and
  arguments equal after type-aware normalisation: case, whitespace, numbers written as text), argument (slot)
  F1, and the share of answers that parse as tool calls at all;
- classification: accuracy and macro-F1 over the teacher's labels;
- free text: token-overlap F1.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from typing import Any

from flywheel.curate.filters import class_label, normalise_text

PRIMARY = {"tool_call": "function_name_accuracy", "classification": "accuracy", "text": "token_f1"}


def norm_value(v: Any) -> Any:
    """Type-aware normal form: "2" == 2 == 2.0, "San Jose " == "san jose", "True" == true."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = re.sub(r"\s+", " ", v.strip().lower())
        if s in ("true", "false"):
            return s == "true"
        try:
            return float(s)
        except ValueError:
            return s
    if isinstance(v, list):
        return tuple(norm_value(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, norm_value(x)) for k, x in v.items()))
    return v


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


def score_tool_call(expected: dict, predicted: dict) -> dict[str, float]:
    exp, pred = _calls(expected), _calls(predicted)
    name_ok = sorted(n for n, _ in exp) == sorted(n for n, _ in pred)
    exp_norm = sorted((n, norm_value(a)) for n, a in exp)
    pred_norm = sorted((n, norm_value(a)) for n, a in pred)
    exp_slots = Counter((n, k, norm_value(v)) for n, a in exp for k, v in a.items())
    pred_slots = Counter((n, k, norm_value(v)) for n, a in pred for k, v in a.items())
    hit = sum((exp_slots & pred_slots).values())
    p = hit / sum(pred_slots.values()) if pred_slots else float(not exp_slots)
    r = hit / sum(exp_slots.values()) if exp_slots else float(not pred_slots)
    return {"function_name_accuracy": float(name_ok), "name_args_accuracy": float(name_ok and exp_norm == pred_norm),
            "slot_f1": 2 * p * r / (p + r) if p + r else 0.0, "valid_tool_call": float(bool(pred))}


def token_f1(a: str, b: str) -> float:
    ta, tb = normalise_text(a).split(), normalise_text(b).split()
    common = sum((Counter(ta) & Counter(tb)).values())
    if not ta or not tb or not common:
        return float(ta == tb)
    p, r = common / len(tb), common / len(ta)
    return 2 * p * r / (p + r)


def macro_f1(pairs: list[tuple[str, str | None]]) -> float:
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


def score(task: str, expected: list[dict], predicted: list[dict]) -> dict[str, float]:
    """Mean metrics over paired answers (MESSAGE-shaped expected, OpenAI- or MESSAGE-shaped predicted)."""
    if len(expected) != len(predicted):
        raise ValueError(f"{len(expected)} expected answers but {len(predicted)} predictions")
    n = len(expected)
    if n == 0:
        return {"n": 0}
    if task == "tool_call":
        rows = [score_tool_call(e, p) for e, p in zip(expected, predicted)]
        out = {k: sum(r[k] for r in rows) / n for k in rows[0]}
    elif task == "classification":
        pairs = [(class_label(e.get("content")), class_label(p.get("content"))) for e, p in zip(expected, predicted)]
        out = {"accuracy": sum(e == p for e, p in pairs) / n, "macro_f1": macro_f1(pairs)}
    else:
        out = {"token_f1": sum(token_f1(e.get("content") or "", p.get("content") or "")
                               for e, p in zip(expected, predicted)) / n}
    out["n"] = n
    return out


def wilson_lower(p: float, n: int, z: float = 1.96) -> float:
    """95% Wilson lower bound of a proportion: 33/33 correct is only >= 0.89 with confidence."""
    if n <= 0 or math.isnan(p):
        return 0.0
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / denom)
