"""The OpenAI wire format at Serve's boundary: request models, sampling, answers, stream chunks and error bodies.

Pure functions and pydantic models, no Ray: `flywheel.serve.ingress` uses them and `tests/test_protocol.py` checks them
without a cluster (`pytest tests/test_protocol.py`).

- `parse_request(body)` validates a chat-completions body the way the OpenAI API does and returns it with its
  messages as `schema.MESSAGE` rows (what capture stores and what the student's prompt is built from). A bad body
  raises `APIError(400)` whose message starts with the offending field (`temperature`, `messages[2].content`, ...)
  and whose `param` is that field. Unknown fields pass through (the teacher gets the whole body).
- `sampling_params(req, default, limit)` is what the student decodes with. The student was distilled on greedy
  targets, so a request without `temperature` is decoded greedily (temperature 0), not at OpenAI's default of 1.
  A `max_tokens` above the server's limit is a 400, never silently capped.
- `student_unsupported(req)` raises a 400 for parameters the student engine cannot honour (penalties,
  logit_bias, audio, non-text input); teacher-routed agents accept them. `logprobs` / `top_logprobs` are honoured:
  the student's log-probabilities are taken after the tool-call grammar's mask (`flywheel.inference.engine`).
- `completion_from_text(...)` turns the student's text into a `chat.completion` (tool calls become OpenAI
  `tool_calls` with finish_reason "tool_calls").
- `stream_events(completion)` replays a finished completion as server-sent `chat.completion.chunk` events;
  `flywheel.serve.streaming.DeltaParser` streams one as it is generated.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from typing import Annotated, Any, Callable, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from flywheel.prompts import parse_answer
from flywheel.schema import Rejected, normalise_message
from flywheel.serve.streaming import chunk, tool_call_id

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function and json_schema names
TOOL_CHOICES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20

Int = Annotated[int, Strict()]      # JSON 7, not 7.0, "7" or true
Float = Annotated[float, Strict()]  # JSON numbers (ints too), not "0.5" or true
Bool = Annotated[bool, Strict()]


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


def _bad(param: str, message: str, code: str = "invalid_request") -> APIError:
    return APIError(400, f"{param}: {message}", code=code, param=param)


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
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatCompletionRequest(_Open):
    """`POST /v1/chat/completions`. `model` is the agent id. Every field is forwarded to the teacher as sent; the
    student honours the sampling fields through `sampling_params` and rejects the rest (`student_unsupported`)."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: Bool | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    n: Int | None = None
    stream: Bool = False
    stream_options: dict[str, Any] | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = None
    logit_bias: dict[str, Float] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, v: Any) -> Any:
        return False if v is None else v  # OpenAI accepts `"stream": null`


def _field(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> "messages[0].content" (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool", "none") or "[" in part or part.startswith("function-"):
            continue
        else:
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
    _check_sampling(req)
    _check_messages(req)
    _check_tools(req)
    _check_response_format(req.response_format)
    try:
        rows = [normalise_message(m, f"messages[{i}]") for i, m in enumerate(body["messages"])]
    except Rejected as e:
        raise APIError(400, e.detail, code="invalid_request", param=e.detail.split(":", 1)[0]) from None
    return req, rows


def _in_range(req: ChatCompletionRequest, name: str, low: float, high: float, low_open: bool = False) -> None:
    value = getattr(req, name)
    if value is not None and not ((low < value if low_open else low <= value) and value <= high):
        raise _bad(name, f"must be {'>' if low_open else '>='} {low} and <= {high}, got {value}", "invalid_value")


def _check_sampling(req: ChatCompletionRequest) -> None:
    _in_range(req, "temperature", 0, 2)
    _in_range(req, "top_p", 0, 1, low_open=True)
    _in_range(req, "presence_penalty", -2, 2)
    _in_range(req, "frequency_penalty", -2, 2)
    for name in ("max_tokens", "max_completion_tokens"):
        if getattr(req, name) is not None and getattr(req, name) < 1:
            raise _bad(name, f"must be >= 1, got {getattr(req, name)}", "invalid_value")
    if req.n is not None and req.n < 1:
        raise _bad("n", f"must be >= 1, got {req.n}", "invalid_value")
    if req.n is not None and req.n > 1:
        raise _bad("n", f"only n=1 is supported (the student answers with one choice), got {req.n}",
                   "unsupported_value")
    if isinstance(req.stop, str) and not req.stop:
        raise _bad("stop", "must be a non-empty string or a list of 1-4 non-empty strings, got ''", "invalid_value")
    if isinstance(req.stop, list):
        if not 1 <= len(req.stop) <= MAX_STOP:
            raise _bad("stop", f"must hold 1 to {MAX_STOP} strings, got {len(req.stop)}", "invalid_value")
        for i, s in enumerate(req.stop):
            if not s:
                raise _bad(f"stop[{i}]", "must be a non-empty string", "invalid_value")
    if req.stream_options is not None and not req.stream:
        raise _bad("stream_options", "is only allowed when stream is true")
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise _bad("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}",
                       "invalid_value")
        if not req.logprobs:
            raise _bad("top_logprobs", "requires logprobs to be true")
    for token, bias in (req.logit_bias or {}).items():
        if not token.isdigit():
            raise _bad("logit_bias", f"keys must be token ids (non-negative integers), got {token!r}")
        if not -100 <= bias <= 100:
            raise _bad(f"logit_bias.{token}", f"must be between -100 and 100, got {bias}", "invalid_value")


def _check_messages(req: ChatCompletionRequest) -> None:
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role in ("system", "developer", "user", "tool", "function") and m.content is None:
            raise _bad(f"{where}.content", f"a {m.role} message needs content (missing or null)")
        if m.role == "assistant" and m.content is None and not m.tool_calls and not (m.model_extra or {}).get(
                "function_call"):
            raise _bad(f"{where}.content", "an assistant message needs content or tool_calls")
        if m.role == "tool" and not m.tool_call_id:
            raise _bad(f"{where}.tool_call_id", "a tool message needs the id of the tool call it answers")
        if m.role == "function" and not m.name:
            raise _bad(f"{where}.name", "a function message needs the name of the function it answers")


def _check_tools(req: ChatCompletionRequest) -> None:
    names: list[str] = []
    for i, tool in enumerate(req.tools or []):
        fn, where = tool.function, f"tools[{i}].function"
        if not NAME_RE.match(fn.name):
            raise _bad(f"{where}.name", f"must be 1-64 characters of a-z, A-Z, 0-9, _ or -, got {fn.name!r}",
                       "invalid_value")
        if fn.name in names:
            raise _bad(f"{where}.name", f"{fn.name!r} is declared twice; tool names must be unique", "invalid_value")
        names.append(fn.name)
        if fn.parameters is not None:
            _check_schema(fn.parameters, f"{where}.parameters")
    choice = req.tool_choice
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise _bad("tool_choice", f"must be one of {', '.join(TOOL_CHOICES)} or "
                                      f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r}',
                       "invalid_value")
        if choice == "required" and not names:
            raise _bad("tool_choice", '"required" needs at least one tool in tools')
        return
    fn = choice.get("function")
    if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad("tool_choice", f'must be "none", "auto", "required" or {{"type": "function", "function": '
                                  f'{{"name": ...}}}}, got {choice!r:.120}', "invalid_value")
    if fn["name"] not in names:
        raise _bad("tool_choice", f"names function {fn['name']!r}, which is not among the declared tools "
                                  f"{names}", "invalid_value")


def _check_schema(schema: Any, where: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise _bad(where, f"is not a valid JSON schema: {e.message} (at {at or 'the top'})", "invalid_value") from None


def _check_response_format(fmt: dict[str, Any] | None) -> None:
    if fmt is None:
        return
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMATS:
        raise _bad("response_format", f"type must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}",
                   "invalid_value")
    if kind != "json_schema":
        return
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema", 'is required with type "json_schema": '
                                                  '{"name": ..., "schema": {...}, "strict": true|false}')
    if not isinstance(spec.get("name"), str) or not NAME_RE.match(spec["name"]):
        raise _bad("response_format.json_schema.name", "must be 1-64 characters of a-z, A-Z, 0-9, _ or -, got "
                                                       f"{spec.get('name')!r}", "invalid_value")
    if "schema" in spec:
        if not isinstance(spec["schema"], dict):
            raise _bad("response_format.json_schema.schema", f"must be a JSON schema object, got "
                                                             f"{type(spec['schema']).__name__}", "invalid_value")
        _check_schema(spec["schema"], "response_format.json_schema.schema")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise _bad("response_format.json_schema.strict", f"must be true or false, got {spec['strict']!r}",
                   "invalid_value")


# -- what the student decodes with -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the student decodes one request. `temperature` 0 is greedy: the student was distilled on greedy
    targets, so greedy is the default when the caller sends no temperature."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # return each answer token's log-probability (OpenAI `logprobs`)
    top_logprobs: int = 0  # and this many most likely alternatives per position

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_params(req: ChatCompletionRequest, default_max_tokens: int, max_tokens_limit: int) -> SamplingParams:
    """The request's sampling fields for the student, defaults filled in.

    `max_completion_tokens` wins over the legacy `max_tokens`; without either the server's `default_max_tokens`
    applies (clipped to `max_tokens_limit`). A value above `max_tokens_limit` is a 400 naming the field given.
    Defaults: temperature 0 (greedy, how the student was trained; OpenAI's default is 1), top_p 1, no seed, no stop.
    """
    field = next((f for f in ("max_completion_tokens", "max_tokens") if getattr(req, f) is not None), None)
    if field is None:
        max_tokens = min(default_max_tokens, max_tokens_limit)
    else:
        max_tokens = getattr(req, field)
        if max_tokens > max_tokens_limit:
            raise _bad(field, f"{max_tokens} is above this server's limit of {max_tokens_limit} completion tokens "
                              f"for the student; ask for at most {max_tokens_limit}", "invalid_value")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingParams(max_tokens=max_tokens, temperature=0.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=stop,
                          logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0)


def student_unsupported(req: ChatCompletionRequest) -> None:
    """Raise `APIError(400, code="unsupported_parameter")` for the first parameter the student cannot honour.

    The list, on purpose short and explicit: presence_penalty / frequency_penalty other than 0, a non-empty logit_bias, audio output or a non-text modality, and non-text message content
    (images, audio, files). `n` > 1 is already rejected by `parse_request`. `parallel_tool_calls` false is accepted:
    with tool_choice "required" the grammar then allows one call (`grammar.constraint_for(...,
    parallel_tool_calls=False)`); under "auto" the student decides between text and calls, and at most one call (absent: several allowed, as OpenAI)."""
    extra = req.model_extra or {}

    def refuse(param: str, what: str) -> APIError:
        return APIError(400, f"{param}: {what} is not supported by the student model that answers this agent; "
                             "agents routed to the teacher accept it", code="unsupported_parameter", param=param)

    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise refuse(name, f"{name}={getattr(req, name)}")
    if req.logit_bias:
        raise refuse("logit_bias", "a non-empty logit_bias")
    if extra.get("audio") is not None:
        raise refuse("audio", "audio output")
    modalities = extra.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or set(modalities) - {"text"}):
        raise refuse("modalities", f"modalities={modalities!r}")
    for i, m in enumerate(req.messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type not in ("text", "input_text", "output_text"):
                raise refuse(f"messages[{i}].content[{j}]", f"a {part.type!r} content part")


# -- answers -------------------------------------------------------------------------------------------------
def new_id() -> str:
    """A fresh request id: the completion is `chatcmpl-<id>` and the captured record's `record_id` is `<id>`."""
    return uuid.uuid4().hex


def completion_from_text(agent: str, text: str, prompt_tokens: int, completion_tokens: int, backend: str,
                         request_id: str | None = None, truncated: bool = False,
                         created: int | None = None, logprobs: dict | None = None) -> dict[str, Any]:
    """The student's raw text -> an OpenAI `chat.completion` (tool calls parsed, ids unique per request);
    `logprobs`: the choice's OpenAI `{"content": [...]}` when the request asked for them."""
    request_id = request_id or new_id()
    parsed = parse_answer(text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed["content"]}
    if parsed["tool_calls"]:
        message["tool_calls"] = [{**tc, "id": tool_call_id(request_id, i)} for i, tc in enumerate(parsed["tool_calls"])]
        finish = "tool_calls"
    else:
        finish = "length" if truncated else "stop"
    return {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created or int(time.time()),
        "model": agent, "system_fingerprint": backend,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def logprobs_content(tokens: Sequence[int], logprobs: Sequence[float], top: Sequence[Sequence[tuple[int, float]]],
                     decode: Callable[[int], str]) -> dict[str, Any]:
    """OpenAI's `choices[0].logprobs` for an answer's tokens: {"content": [{"token", "logprob", "bytes",
    "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": None}, as the official client parses it."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = decode(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in (top[i] if i < len(top) else ())]}
               for i, (t, lp) in enumerate(zip(tokens, logprobs))]
    return {"content": content, "refusal": None}


def stream_events(completion: dict[str, Any], include_usage: bool = False) -> Iterator[str]:
    """A finished completion as SSE `chat.completion.chunk` events, ending with `data: [DONE]`."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    head = {k: completion.get(k) for k in ("id", "created", "model", "system_fingerprint")}
    yield chunk(head, {"role": "assistant", "content": ""})
    if message.get("content"):
        yield chunk(head, {"content": message["content"]})
    for i, tc in enumerate(message.get("tool_calls") or []):
        fn = tc.get("function") or {}
        args = fn.get("arguments")
        yield chunk(head, {"tool_calls": [{"index": i, "id": tc.get("id"), "type": "function",
                                           "function": {"name": fn.get("name"),
                                                        "arguments": args if isinstance(args, str) else
                                                        json.dumps(args or {})}}]})
    if choice.get("logprobs"):
        yield chunk(head, {}, None, logprobs=choice["logprobs"])
    yield chunk(head, {}, choice.get("finish_reason") or "stop")
    if include_usage and completion.get("usage"):
        yield chunk(head, None, usage=completion["usage"])
    yield "data: [DONE]\n\n"
