"""The optional LLM judge for free-text answers, through the teacher's OpenAI-compatible endpoint.

Off unless `EvaluateConfig.judge_url` is set. For each eval example it sends the user's question, the teacher's
reference answer and a system's answer to `POST {judge_url}/chat/completions` (plain httpx, synchronous, with a
timeout) and asks for exactly `{"score": <1-5>, "reason": "..."}`. The reply must be that JSON object and
nothing else: a reply that does not parse, or a score outside 1..5, is a failure counted under `unparseable`,
never a score; a request that fails (timeout, connection, HTTP error, not a chat completion) is counted under
`error`. The report shows the mean score over the judged examples next to both failure counts.

    flywheel evaluate --agent support_bot --judge-url http://127.0.0.1:9000/v1 --judge-model big-teacher
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Sequence

import httpx

JUDGE_SYSTEM = (
    "You grade an assistant's answer against a reference answer to the same question. Reply with only a JSON "
    'object, no other text: {"score": <integer 1-5>, "reason": "<one sentence>"}. 5: the answer says what the '
    "reference says; 3: partly right or incomplete; 1: wrong, irrelevant or empty."
)


class JudgeError(RuntimeError):
    """The judge request did not produce a chat completion; the message says why."""


def judge_messages(question: str, reference: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Question:\n{question}\n\nReference answer:\n{reference}\n\n"
                                        f"Answer to grade:\n{answer}"}]


def parse_verdict(text: str | None) -> int | None:
    """The score of a strict JSON reply, or None: anything but one JSON object with an integer 1..5 `score`."""
    try:
        obj = json.loads((text or "").strip())
    except json.JSONDecodeError:
        return None
    score = obj.get("score") if isinstance(obj, dict) else None
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
        return None
    return score


class HTTPJudge:
    """`POST {url}/chat/completions`, temperature 0; the API key comes from the environment variable named."""

    def __init__(self, url: str, model: str, api_key_env: str = "", timeout_s: float = 60.0):
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model = model
        self._client = httpx.Client(headers={"Authorization": f"Bearer {key}"} if key else {},
                                    timeout=httpx.Timeout(timeout_s))

    def reply(self, messages: list[dict]) -> str | None:
        """The judge's reply text; raises JudgeError when there is no chat completion."""
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 200, "stream": False}
        try:
            resp = self._client.post(self.endpoint, json=body)
        except httpx.TimeoutException:
            raise JudgeError(f"the judge at {self.endpoint} did not answer within {self._client.timeout.read}s") \
                from None
        except httpx.HTTPError as e:
            raise JudgeError(f"could not reach the judge at {self.endpoint}: {type(e).__name__}: {e}") from None
        if resp.status_code >= 400:
            raise JudgeError(f"the judge at {self.endpoint} answered HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            return resp.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"the judge at {self.endpoint} answered with something that is not a chat "
                             "completion") from None

    def close(self) -> None:
        self._client.close()


def judge_answers(judge: HTTPJudge, questions: Sequence[str], references: Sequence[str],
                  answers: Sequence[str]) -> dict:
    """{"scores": per-example score or None, "failures": {"unparseable": k, "error": m}, "errors": first few}."""
    scores, failures, errors = [], Counter({"unparseable": 0, "error": 0}), []
    for q, ref, ans in zip(questions, references, answers):
        try:
            score = parse_verdict(judge.reply(judge_messages(q, ref, ans)))
            failures["unparseable"] += score is None
        except JudgeError as e:
            score = None
            failures["error"] += 1
            errors = errors if len(errors) >= 3 else errors + [str(e)]
        scores.append(score)
    return {"scores": scores, "failures": dict(failures), "errors": errors}
