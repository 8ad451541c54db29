"""The OpenAI wire format at Serve's boundary: request models, answers, stream chunks and error bodies.

Pure functions and pydantic models, no Ray: `flywheel.serve.app` uses them and `tests/test_serve.py` checks them
without a cluster (`pytest tests/test_serve.py -k completion_from_text`).

- `parse_request(body)` validates a chat-completions body and returns it with its messages as `schema.MESSAGE`
  rows (what capture stores and what the student's prompt is built from). A bad body raises `APIError(400)` whose
  message names the offending field.
- `completion_from_text(...)` turns the student's text into a `chat.completion` (tool calls become OpenAI
  `tool_calls` with finish_reason "tool_calls").
- `stream_events(completion)` replays a finished completion as server-sent `chat.completion.chunk` events.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.capture.ingest import Rejected, normalise_message
from flywheel.prompts import parse_answer


class APIError(Exception):
    """An error the client sees as an OpenAI error body `{"error": {"message", "type", "code", "param"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


# -- requests ------------------------------------------------------------------------------------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields pass through to the teacher


class FunctionCall(_Open):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] | None = None


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None


class FunctionDef(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatCompletionRequest(_Open):
    """`POST /v1/chat/completions`. `model` is the agent id. Sampling fields are forwarded to the teacher; the
    student decodes greedily."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None


def _field(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> "messages[0].content" (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("str", "int", "float", "bool", "none") and "[" not in part:
            out += f".{part}" if out else part
    return out


def parse_request(body: Any) -> tuple[ChatCompletionRequest, list[dict]]:
    """A decoded JSON body -> (request, messages as `schema.MESSAGE` rows), or `APIError(400)` naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        problems: dict[str, list[str]] = {}
        for err in e.errors(include_url=False):
            problems.setdefault(_field(err["loc"]) or "body", []).append(err["msg"])
        field, msgs = next(iter(problems.items()))  # a union reports one message per member: join them
        more = f" (and {len(problems) - 1} more invalid field(s))" if len(problems) > 1 else ""
        raise APIError(400, f"{field}: {' or '.join(msgs)}{more}", code="invalid_request", param=field) from None
    try:
        rows = [normalise_message(m, f"messages[{i}]") for i, m in enumerate(body["messages"])]
    except Rejected as e:
        raise APIError(400, e.detail, code="invalid_request", param=e.detail.split(":", 1)[0]) from None
    return req, rows


def token_budget(req: ChatCompletionRequest, cap: int) -> int:
    """The caller's `max_completion_tokens` / `max_tokens`, capped by the server's limit."""
    asked = req.max_completion_tokens or req.max_tokens or cap
    return max(1, min(asked, cap))


# -- answers -------------------------------------------------------------------------------------------------
def new_id() -> str:
    """A fresh request id: the completion is `chatcmpl-<id>` and the captured record's `record_id` is `<id>`."""
    return uuid.uuid4().hex


def completion_from_text(agent: str, text: str, prompt_tokens: int, completion_tokens: int, backend: str,
                         request_id: str | None = None, truncated: bool = False,
                         created: int | None = None) -> dict[str, Any]:
    """The student's raw text -> an OpenAI `chat.completion` (tool calls parsed, ids unique per request)."""
    request_id = request_id or new_id()
    parsed = parse_answer(text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed["content"]}
    if parsed["tool_calls"]:
        message["tool_calls"] = [{**tc, "id": f"call_{request_id[:16]}_{i}"}
                                 for i, tc in enumerate(parsed["tool_calls"])]
        finish = "tool_calls"
    else:
        finish = "length" if truncated else "stop"
    return {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created or int(time.time()),
        "model": agent, "system_fingerprint": backend,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def stream_events(completion: dict[str, Any], include_usage: bool = False) -> Iterator[str]:
    """A finished completion as SSE `chat.completion.chunk` events, ending with `data: [DONE]`."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    head = {k: completion.get(k) for k in ("id", "created", "model", "system_fingerprint")}

    def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [] if delta is None else
                 [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    if message.get("content"):
        yield event({"content": message["content"]})
    for i, tc in enumerate(message.get("tool_calls") or []):
        fn = tc.get("function") or {}
        args = fn.get("arguments")
        yield event({"tool_calls": [{"index": i, "id": tc.get("id"), "type": "function",
                                     "function": {"name": fn.get("name"),
                                                  "arguments": args if isinstance(args, str) else
                                                  json.dumps(args or {})}}]})
    yield event({}, choice.get("finish_reason") or "stop")
    if include_usage and completion.get("usage"):
        yield event(None, usage=completion["usage"])
    yield "data: [DONE]\n\n"
