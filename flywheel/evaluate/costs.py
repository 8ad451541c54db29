"""Latency and cost per 1k requests, student vs teacher. Pure functions.

- Student latency: each request's seconds from the start of its generation batch to the batch's answer (a
  request waits for its whole batch, as it would on a batching server); p50 and p95 over the eval examples.
- Student cost: the process CPU-seconds measured while generating (`time.process_time`, every thread of the
  process) per request x `student_usd_per_core_hour` / 3600, x 1000.
- Teacher cost: the token counts of the logged requests (`prompt_tokens`, `completion_tokens` of the log
  record when the log has them; otherwise counted with the student's tokenizer on the request as the teacher
  received it: every message, the tool declarations and the answer) x the configured $ per 1M input and output
  tokens, x 1000.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None when there is nothing to measure."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def student_cost_per_1k(cpu_s_per_request: float, usd_per_core_hour: float) -> float:
    return cpu_s_per_request * usd_per_core_hour / 3600 * 1000


def teacher_cost_per_1k(prompt_tokens: Sequence[int], completion_tokens: Sequence[int],
                        usd_per_m_input: float, usd_per_m_output: float) -> float | None:
    """Mean $ per request over the logged requests, x 1000."""
    if not prompt_tokens:
        return None
    total = sum(p * usd_per_m_input + c * usd_per_m_output for p, c in zip(prompt_tokens, completion_tokens))
    return total / 1e6 / len(prompt_tokens) * 1000


def request_text(example: dict) -> str:
    """What the teacher read: every message (content and tool calls) and the tool declarations."""
    parts = [example.get("tools_json") or ""]
    for m in example["messages"]:
        parts.append(f"{m.get('role')}: {m.get('content') or ''}")
        parts += [f"{tc.get('name')}({tc.get('arguments') or ''})" for tc in m.get("tool_calls") or []]
    return "\n".join(parts)


def answer_text(target: dict) -> str:
    calls = [json.dumps({"name": tc.get("name"), "arguments": tc.get("arguments")})
             for tc in target.get("tool_calls") or []]
    return "\n".join([target.get("content") or "", *calls]).strip()


def teacher_tokens(examples: Sequence[dict], logged: dict[str, tuple[int | None, int | None]],
                   count: Callable[[str], int]) -> tuple[list[int], list[int], dict[str, int]]:
    """(prompt tokens, completion tokens, {"logged": k, "estimated": m}) per example: the log's usage when it has
    both counts, else `count` on the request and the answer."""
    prompts, completions, source = [], [], {"logged": 0, "estimated": 0}
    for e in examples:
        p, c = logged.get(e.get("record_id"), (None, None))
        if isinstance(p, int) and isinstance(c, int):
            source["logged"] += 1
        else:
            p, c = count(request_text(e)), count(answer_text(e["target"]))
            source["estimated"] += 1
        prompts.append(p)
        completions.append(c)
    return prompts, completions, source
