"""Serve's input and output guardrails, beside the confidence rule of `flywheel.serve.selective`. Pure functions;
`flywheel.serve.ingress` calls them on the request's way in and on the student's held answer.

Input, every route:
    prompt injection   the turns new in this request (everything after the last assistant message: the user's
                       turn and the tool results an agent passes on, where indirect injections arrive) go through
                       the configured check (`flywheel.safety.injection_check`, `injection_check` /
                       `injection_threshold`). A hit flags the record (`guardrails` verdict `prompt_injection`):
                       the review queue shows it; the request is still answered.
    PII                for the agents in `redact_pii_agents` ("*": all), every e-mail, card number (Luhn),
                       SSN, IP address and phone number in the request (`flywheel.pii`'s regex recognisers) is
                       replaced by a placeholder (`<EMAIL_1>`) before the request goes to the teacher and before
                       the record is written; the teacher's answer gets the values back before the client sees it,
                       so a call the teacher writes with `<EMAIL_1>` reaches the agent with the address. The
                       student runs inside the cluster and sees the request as sent.
Output, the `selective` route (it holds the student's answer before serving it):
    unsafe output      the answer's text and string argument values are scored by `flywheel.safety.toxicity`; at or
                       above `output_toxicity_threshold` the answer is deferred to the teacher (`unsafe_output`).
"""

from __future__ import annotations

import json
from typing import Any

from flywheel import pii, safety
from flywheel.schema import to_openai_message

PROMPT_INJECTION = "prompt_injection"


def new_turns(rows: list[dict]) -> list[dict]:
    """The messages after the last assistant message: what this request adds to the conversation."""
    last = max((i for i, m in enumerate(rows) if m["role"] == "assistant"), default=-1)
    return rows[last + 1:]


def injection_verdict(rows: list[dict], check: safety.InjectionCheck, threshold: float) -> dict:
    """The `prompt_injection` verdict of a request: the highest score over its new user and tool turns."""
    scored = [(check(m["content"]), m["role"]) for m in new_turns(rows)
              if m["role"] in ("user", "tool") and m.get("content")]
    score, where = max(scored, default=(0.0, None))
    verdict = {"name": PROMPT_INJECTION, "passed": score < threshold, "score": round(float(score), 4)}
    return verdict if where is None or verdict["passed"] else {**verdict, "where": where}


def listed(agent: str, agents: tuple[str, ...]) -> bool:
    """`agent` is one of `agents` (a config's per-agent list; "*" names every agent)."""
    return "*" in agents or agent in agents


class RequestRedactor:
    """One request's consistent placeholders: rows and answers in, the same placeholders out, and back."""

    def __init__(self, rows: list[dict]):
        self.redactor = pii.Redactor()
        for text in pii.record_texts(rows):
            self.redactor.scan(text)
        self.rows = [pii.redact_message(m, self.redactor) for m in rows]
        self.values = {placeholder: value for value, placeholder in self.redactor.mapping.items()}

    @property
    def found(self) -> dict[str, int]:
        return dict(self.redactor.counts)

    def body(self, body: dict) -> dict:
        """The request as the teacher gets it: the redacted messages, everything else as sent."""
        if not self.values:
            return body
        return {**body, "messages": [to_openai_message(m) for m in self.rows]}

    def message(self, m: dict | None) -> dict | None:
        """A MESSAGE row (an answer) redacted with this request's placeholders (and new ones for new values)."""
        if m is None:
            return None
        for text in pii.record_texts([m]):
            self.redactor.scan(text)
        return pii.redact_message(m, self.redactor)

    def completion(self, completion: dict) -> dict:
        """A completion as written to the log: its message redacted."""
        return self._mapped(completion, self.redactor)

    def restore(self, completion: dict) -> dict:
        """The teacher's completion with every placeholder of this request replaced by its value."""
        return self._mapped(completion, self._restore_text) if self.values else completion

    def _mapped(self, completion: dict, fn: Any) -> dict:
        """The completion with `fn` applied to its message's text and to each string value of its calls' arguments."""
        msg = completion["choices"][0]["message"]
        out = {**msg, "content": fn(msg.get("content"))}
        if msg.get("tool_calls"):
            out["tool_calls"] = [{**tc, "function": {**tc["function"], "arguments": self._args(
                tc["function"].get("arguments"), fn)}} for tc in msg["tool_calls"]]
        return _with_message(completion, out)

    def _restore_text(self, text: str | None) -> str | None:
        if not text:
            return text
        for placeholder, value in self.values.items():
            text = text.replace(placeholder, value)
        return text

    @staticmethod
    def _args(arguments: Any, fn: Any) -> Any:
        """Apply `fn` to each string value of JSON arguments (the JSON stays valid), or to the raw text."""
        try:
            obj = json.loads(arguments) if isinstance(arguments, str) else None
        except json.JSONDecodeError:
            obj = None
        if obj is None:
            return fn(arguments) if isinstance(arguments, str) else arguments
        return json.dumps(_map_strings(obj, fn), ensure_ascii=False)


def _map_strings(value: Any, fn: Any) -> Any:
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return fn(value) if isinstance(value, str) else value


def _with_message(completion: dict, message: dict) -> dict:
    choice = {**completion["choices"][0], "message": message}
    return {**completion, "choices": [choice, *completion["choices"][1:]]}


def answer_texts(message: dict) -> list[str]:
    """The texts of an answer the output check scores: its content and its string argument values."""
    texts = [message.get("content") or ""]
    for tc in message.get("tool_calls") or []:
        args = (tc.get("function") or tc).get("arguments")
        try:
            obj = json.loads(args) if isinstance(args, str) else None
        except json.JSONDecodeError:
            obj = None
        strings: list[str] = []
        _map_strings(obj, lambda s: strings.append(s) or s)
        texts.extend(strings)
    return [t for t in texts if t.strip()]


def unsafe_score(message: dict) -> float:
    """The highest toxicity of the answer's texts (0 when it has none)."""
    return max(safety.toxicity(answer_texts(message)).values(), default=0.0)
