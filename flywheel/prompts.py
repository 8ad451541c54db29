"""How an agent's request becomes the student's prompt, and how the student's text becomes an OpenAI answer.

Shared by distillation (targets), sweeps, evaluation and serving, so the student is always asked the way it was
taught: every stage renders a curated example with `prompt_turns` and a live request with `chat_messages`.

- Tools are rendered in the system turn, one per line, in one of `TOOL_FORMATS`: `signatures` (the default, and
  what Serve sends), compact `name(arg*, arg [a|b] =default) - description` (`*` = required), ~470 tokens per SGD
  prompt; or `json`, each tool's OpenAI function object as one line of JSON (700+ tokens). An adapter is trained,
  evaluated and served with one format (it is in its registry lineage); `json` exists to measure the choice.
- Only the last `max_history` non-system messages are kept.
- A tool call is written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
DEFAULT_RE = re.compile(r"\(default:\s*([^)]*)\)")
TOOL_FORMATS = ("signatures", "json")
SERVED_TOOL_FORMAT = "signatures"  # what `flywheel.serve` renders: an adapter trained with another is not promoted
TOOL_INSTRUCTIONS = (
    "To call a tool, answer only with <tool_call>{\"name\": <tool name>, \"arguments\": {<argument>: <value>}}"
    "</tool_call>. Otherwise answer in text."
)


def render_tool(tool: dict) -> str:
    fn = tool.get("function", tool)
    params = (fn.get("parameters") or {}).get("properties") or {}
    required = set((fn.get("parameters") or {}).get("required") or [])
    args = []
    for name, spec in params.items():
        spec = spec if isinstance(spec, dict) else {}
        text = name + ("*" if name in required else "")
        if spec.get("enum"):
            text += " [" + "|".join(str(v) for v in spec["enum"]) + "]"
        default = spec.get("default")
        if default is None:
            m = DEFAULT_RE.search(spec.get("description") or "")
            default = m.group(1).strip() if m else None
        if default is not None:
            text += f" ={default}"
        args.append(text)
    desc = (fn.get("description") or "").strip()
    return f"{fn['name']}({', '.join(args)})" + (f" - {desc}" if desc else "")


def render_tools(tools: list[dict], tool_format: str = "signatures") -> str:
    """The system turn's tool block in `tool_format` (see the module doc)."""
    if tool_format == "json":
        lines = [json.dumps({k: fn[k] for k in ("name", "description", "parameters") if k in fn}, ensure_ascii=False)
                 for fn in (t.get("function", t) for t in tools)]
        return "Tools (JSON):\n" + "\n".join(lines) + "\n" + TOOL_INSTRUCTIONS
    if tool_format != "signatures":
        raise ValueError(f"tool_format: must be one of {TOOL_FORMATS}, got {tool_format!r}")
    return "Tools:\n" + "\n".join(render_tool(t) for t in tools) + "\n" + TOOL_INSTRUCTIONS


def format_tool_calls(tool_calls: list[dict]) -> str:
    """MESSAGE tool calls (arguments as JSON text) -> the student's text form."""
    return format_with_spans({"tool_calls": tool_calls})[0]


def format_answer(msg: dict) -> str:
    """The text the student must produce for a teacher answer (MESSAGE shape)."""
    return format_with_spans(msg)[0]


def format_with_spans(msg: dict) -> tuple[str, list[tuple[int, int]]]:
    """`format_answer`'s text and the character span of each tool call's `arguments` object in it (none for a
    text answer): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one call per line."""
    if not msg.get("tool_calls"):
        return (msg.get("content") or "").strip(), []
    text, spans = "", []
    for i, tc in enumerate(msg["tool_calls"]):
        try:
            args = json.loads(tc.get("arguments") or "{}")
        except json.JSONDecodeError:
            args = {}
        head = ("\n" if i else "") + '<tool_call>{"name": ' + json.dumps(tc["name"], ensure_ascii=False) + \
            ', "arguments": '
        body = json.dumps(args, ensure_ascii=False)
        start = len(text) + len(head)
        spans.append((start, start + len(body)))
        text += head + body + "}</tool_call>"
    return text, spans


def chat_messages(messages: list[dict], tools: list[dict], max_history: int = 10,
                  tool_format: str = "signatures") -> list[dict]:
    """Request messages (MESSAGE or OpenAI shape) + tool declarations -> plain chat turns for the template."""
    if max_history < 1:
        raise ValueError(f"max_history: must be >= 1, got {max_history}")
    system = [m.get("content") or "" for m in messages if m.get("role") in ("system", "developer")]
    if tools:
        system.append(render_tools(tools, tool_format))
    turns = []
    for m in [m for m in messages if m.get("role") not in ("system", "developer")][-max_history:]:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": tc["function"]["name"], "arguments": tc["function"].get("arguments")}
                     if "function" in tc else tc for tc in m["tool_calls"]]
            calls = [{**c, "arguments": c["arguments"] if isinstance(c["arguments"], str)
                      else json.dumps(c["arguments"] or {})} for c in calls]
            content = ((m.get("content") or "") + "\n" + format_tool_calls(calls)).strip()
        else:
            content = m.get("content") or ""
        turns.append({"role": "tool" if role in ("tool", "function") else role, "content": content})
    if system:
        turns.insert(0, {"role": "system", "content": "\n\n".join(s for s in system if s)})
    return turns


def prompt_turns(example: dict, max_history: int = 10, tool_format: str = "signatures") -> list[dict]:
    """A curated example (schema.EXAMPLE row: messages + tools_json) -> the student's chat turns."""
    return chat_messages(example["messages"], json.loads(example.get("tools_json") or "[]"), max_history,
                         tool_format)


MIN_SHARED_PREFIX = 32  # tokens: a shorter common prefix of a batch's rows is not worth a forward pass of its own


def common_prefix_len(prompts: list[list[int]]) -> int:
    """Tokens every prompt begins with, short of each one's last token (the position whose logits a prefill or a
    training row needs for itself); 0 for a single prompt."""
    if len(prompts) < 2:
        return 0
    n = 0
    for column in zip(*prompts):
        if any(t != column[0] for t in column):
            break
        n += 1
    return min(n, min(len(p) for p in prompts) - 1)


def parse_answer(text: str) -> dict[str, Any]:
    """Student text -> {"content", "tool_calls" (OpenAI shape, arguments as JSON text), "valid"}.

    `valid` is False when the text tried to call a tool but the call could not be parsed.
    """
    calls, valid = [], True
    for i, raw in enumerate(TOOL_CALL_RE.findall(text)):
        try:
            obj = json.loads(raw)
            name, args = obj["name"], obj.get("arguments", {})
            if not isinstance(name, str) or not isinstance(args, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            valid = False
            continue
        calls.append({"id": f"call_{i}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    content = TOOL_CALL_RE.sub("", text).strip() if "<tool_call>" in text else text.strip()
    return {"content": content or None, "tool_calls": calls or None, "valid": valid}
