"""The student's text, as it is decoded, turned into OpenAI `chat.completion.chunk` deltas.

Pure, no Ray, no torch: the Serve app feeds each decoded text increment to a `DeltaParser` and sends what it returns
as SSE events built by `chunk(...)`. Checked by `pytest tests/test_protocol.py -k stream`.

The student answers in text or with `<tool_call>{"name": N, "arguments": {...}}</tool_call>` (`flywheel.prompts`).
The parser cuts the text exactly where `prompts.TOOL_CALL_RE` does (a call runs from `<tool_call>` to the first
`</tool_call>`, or to the end of the text), so the reassembled stream is the message `completion_from_text` builds
from the whole text:

- Content goes out as soon as it cannot be the start of `<tool_call>`. Whitespace at either end of the content is
  held back and dropped, as `parse_answer` strips it (whitespace between two pieces of text goes out with the
  later piece), so the streamed content equals the completion's content exactly, `None` when empty.
- A call shaped `{"name": "N", "arguments": {` is announced as soon as its arguments open (index, id, type, name,
  `arguments: ""`); then the arguments object's text streams as it is generated, up to its closing brace (JSON
  string and escape state and brace depth are tracked, so braces inside strings do not count; the outer `}` and
  `</tool_call>` are never sent as arguments).
- Any other shape (keys in another order, no arguments, escapes in the keys, ...) is held until the call ends and
  then sent whole, as `parse_answer` reads it; a call `parse_answer` rejects is not sent, and takes no index.
- Ids are `tool_call_id(request_id, index)`, the ones `protocol.completion_from_text` gives.

One difference is left, and only for broken output: a call already announced cannot be taken back, so if its text
then breaks (cut by max_tokens, invalid JSON after the arguments) the stream keeps it, with the arguments generated
so far, while `completion_from_text` drops it (and numbers later calls one lower). Under a tool-call grammar
(`flywheel.inference.grammar`) calls cannot break.
"""

from __future__ import annotations

import json
from typing import Any

from flywheel.prompts import parse_answer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
JSON_WS = " \t\n\r"
# What must follow `<tool_call>` for a call to stream: whitespace may precede each step; None is the name string.
HEADER = ("{", '"name"', ":", None, ",", '"arguments"', ":", "{")


def tool_call_id(request_id: str, index: int) -> str:
    """The id of the `index`-th tool call of a student answer (the same in a completion and in its stream)."""
    return f"call_{request_id[:16]}_{index}"


def chunk(head: dict[str, Any], delta: dict[str, Any] | None, finish: str | None = None,
          usage: dict[str, Any] | None = None, logprobs: dict[str, Any] | None = None) -> str:
    """One SSE event `data: {chat.completion.chunk}\\n\\n`. `head` holds id, created, model, system_fingerprint;
    `delta` None gives the usage-only chunk (`choices: []`) that `stream_options.include_usage` asks for;
    `logprobs` is the choice's OpenAI `{"content": [...]}` for the tokens of this chunk."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
    body = {**head, "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _held(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `tag` (it may still become the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class _Call:
    """One `<tool_call>` body, read character by character: header, then streamed arguments, or held whole."""

    def __init__(self) -> None:
        self.body = ""                       # every character of the body seen so far
        self.state = "header"                # header -> args -> after, or header -> whole
        self.step, self.pos, self.name_literal = 0, 0, ""
        self.depth, self.in_string, self.escape = 0, False, False

    def read(self, text: str) -> tuple[str | None, str]:
        """Feed body text; returns (the name if the call was announced just now, argument text to send)."""
        announced, args = None, []
        for c in text:
            self.body += c
            if self.state == "header":
                announced = self._header(c) or announced
                if self.state == "args":
                    args.append("{")
            elif self.state == "args":
                args.append(c)
                self._args(c)
        return announced, "".join(args)

    def _header(self, c: str) -> str | None:
        step = HEADER[self.step]
        if self.pos == 0 and c in JSON_WS:
            return None
        if step is None:  # the name: a JSON string literal
            if self.pos == 0 and c != '"':
                self.state = "whole"
                return None
            self.name_literal += c
            self.pos += 1
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"' and self.pos > 1:
                if "\\" in self.name_literal or any(ch < " " for ch in self.name_literal):  # send it whole
                    self.state = "whole"
                    return None
                self.step, self.pos = self.step + 1, 0
            return None
        if c != step[self.pos]:
            self.state = "whole"
            return None
        self.pos += 1
        if self.pos == len(step):
            self.step, self.pos = self.step + 1, 0
            if self.step == len(HEADER):
                self.state, self.depth = "args", 1
                return self.name_literal[1:-1]
        return None

    def _args(self, c: str) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            if self.depth == 0:
                self.state = "after"


class DeltaParser:
    """Decoded text increments of one answer -> OpenAI delta dicts. `feed(text)` as tokens arrive, then `finish()`.

    `calls` counts the tool calls sent (finish_reason "tool_calls" when it is > 0).
    """

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.calls = 0
        self._pending = ""               # text not yet read (a possible start of a tag)
        self._call: _Call | None = None  # the call being read, None outside calls
        self._started = False            # some content was sent (leading whitespace is dropped until then)
        self._space = ""                 # whitespace after the last content sent (sent only if text follows)
        self._done = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._done:
            raise RuntimeError("DeltaParser.feed after finish()")
        out: list[dict[str, Any]] = []
        self._pending += text
        while self._pending:
            if self._call is None:
                at = self._pending.find(OPEN)
                if at < 0:
                    keep = _held(self._pending, OPEN)
                    self._content(self._pending[:len(self._pending) - keep], out)
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                self._content(self._pending[:at], out)
                self._pending, self._call = self._pending[at + len(OPEN):], _Call()
            else:
                at = self._pending.find(CLOSE)
                if at < 0:
                    keep = _held(self._pending, CLOSE)
                    self._read_call(self._pending[:len(self._pending) - keep], out)
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                self._read_call(self._pending[:at], out)
                self._end_call(out)
                self._pending = self._pending[at + len(CLOSE):]
        return out

    def finish(self) -> list[dict[str, Any]]:
        """Flush what is held: an unfinished tag is text; a call left open ends with the text (as TOOL_CALL_RE)."""
        out: list[dict[str, Any]] = []
        if not self._done:
            if self._call is None:
                self._content(self._pending, out)
            else:
                self._read_call(self._pending, out)
                self._end_call(out)
            self._pending, self._done = "", True
        return out

    # -- content ---------------------------------------------------------------------------------------------
    def _content(self, text: str, out: list[dict[str, Any]]) -> None:
        text = self._space + text
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        self._space = text[len(body):]
        if body:
            self._started = True
            out.append({"content": body})

    # -- tool calls ------------------------------------------------------------------------------------------
    def _read_call(self, text: str, out: list[dict[str, Any]]) -> None:
        announced, args = self._call.read(text)
        if announced is not None:
            out.append(self._head(announced, ""))
        if args:
            out.append({"tool_calls": [{"index": self.calls - 1, "function": {"arguments": args}}]})

    def _end_call(self, out: list[dict[str, Any]]) -> None:
        call, self._call = self._call, None
        if call.state in ("header", "whole"):  # not announced: send it whole if parse_answer reads it
            parsed = parse_answer(OPEN + call.body + CLOSE)["tool_calls"]
            if parsed:
                fn = parsed[0]["function"]
                out.append(self._head(fn["name"], fn["arguments"]))

    def _head(self, name: str, arguments: str) -> dict[str, Any]:
        index, self.calls = self.calls, self.calls + 1
        return {"tool_calls": [{"index": index, "id": tool_call_id(self.request_id, index), "type": "function",
                                "function": {"name": name, "arguments": arguments}}]}
