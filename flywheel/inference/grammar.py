"""Constrained decoding for the student: what an answer must look like, compiled to an xgrammar grammar per row.

    spec = constraint_for(tools, tool_choice, response_format)         # pure, JSON-able: travels to the replica
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size)      # once per engine (~1 s: the vocabulary)
    grammars = [compiler.compile(spec), None, ...]                      # one per batch row, None = unconstrained
    model.generate(**batch, logits_processor=[RowGrammars(grammars, tokenizer)])

Checked by `pytest tests/test_grammar.py` (a tiny random Llama with the student's tokenizer: whatever the weights,
the answer obeys its grammar).

A spec (None: free answer) is one of:
- `{"type": "tool_calls", "tools": [{"name", "parameters"}], "parallel": bool}`: only tool calls, written as the
  student was taught (`flywheel.prompts`): `<tool_call>{"name": N, "arguments": {...}}</tool_call>`, one or more
  separated by "\\n" (`parallel`) or exactly one. Each call's arguments follow that tool's `parameters` schema (no
  undeclared argument, required ones present, enums held); a tool without parameters takes any object.
- `{"type": "json", "schema": {...}, "tools": [...]?}`: a JSON value of the schema (`{"type": "object"}` for
  response_format json_object); with `tools`, tool calls as above are the alternative (tool_choice auto).
- `{"type": "no_tool_calls"}`: any text that never contains `<tool_call>` (tool_choice none).
- `{"type": "auto_tools", "tools": [...], "parallel": bool}` (tool_choice auto or absent, with declared tools, no
  JSON response_format): free text, except that wherever `<tool_call>` begins, a whole call of a declared tool
  follows, its arguments valid as above, then `</tool_call>`; text may come before and after calls. `parallel`
  false: at most one call, and the answer ends after it. An xgrammar `triggered_tags` structural tag (trigger
  `<tool_call>`). A tool whose `parameters` xgrammar cannot enforce keeps its name checked and takes any JSON object
  (a warning is logged), so a request under auto is never refused for its schemas. Compiling an agent's ~10
  tools takes ~0.05 s with the student's tokenizer, once: `GrammarCompiler` caches by spec.

JSON is written the way `json.dumps` writes it (", " and ": ", no other whitespace), as in the student's training
targets; tool arguments keep their keys in sorted order, as the targets do (`ingest.canonical_json`), so the grammar
does not fight what the student learned. A response_format schema keeps its declared order (OpenAI's behaviour).

xgrammar is a dependency of the package, imported lazily: `import flywheel.inference.grammar` works without it, and
compiling a grammar on a node that lacks it raises `GrammarUnavailable` naming it (a server fault, never taken
for a bad schema).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import re
import threading
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE, CALL_SEPARATOR = "<tool_call>", "</tool_call>", "\n"
ANY_OBJECT = {"type": "object"}
SEPARATORS = (", ", ": ")  # json.dumps' defaults

logger = logging.getLogger(__name__)


class GrammarError(ValueError):
    """A spec xgrammar cannot compile (an unsupported schema feature); `param` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class GrammarUnavailable(RuntimeError):
    """xgrammar is not installed on this node: a broken install, not a bad request."""


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise GrammarUnavailable(f"constrained decoding needs xgrammar, which this node cannot import ({e}): "
                                 "install the flywheel package with its dependencies (`pip install xgrammar==0.2.9`)"
                                 ) from None
    return xgrammar


# -- what the answer must be ---------------------------------------------------------------------------------
def constraint_for(tools: list[dict] | None, tool_choice: Any, response_format: dict | None,
                   parallel_tool_calls: bool = True) -> dict | None:
    """OpenAI's tools / tool_choice / response_format (already validated by `protocol.parse_request`) -> a spec,
    or None when the answer is free (no declared tools, tool_choice auto or absent, no JSON response_format)."""
    declared = [_tool(t) for t in tools or []]
    fmt = (response_format or {}).get("type")
    json_schema = None
    if fmt == "json_object":
        json_schema = ANY_OBJECT
    elif fmt == "json_schema":
        json_schema = (response_format.get("json_schema") or {}).get("schema") or ANY_OBJECT
    if tool_choice == "none":
        return {"type": "json", "schema": json_schema} if json_schema is not None else {"type": "no_tool_calls"}
    if tool_choice == "required":
        if not declared:
            raise ValueError('tool_choice "required" needs at least one declared tool')
        return {"type": "tool_calls", "tools": declared, "parallel": bool(parallel_tool_calls)}
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in declared if t["name"] == name]
        if not chosen:
            raise ValueError(f"tool_choice names {name!r}, which is not among the declared tools")
        return {"type": "tool_calls", "tools": chosen, "parallel": False}
    if json_schema is None:  # auto, or absent
        return {"type": "auto_tools", "tools": declared, "parallel": bool(parallel_tool_calls)} if declared else None
    spec = {"type": "json", "schema": json_schema}
    if declared:
        spec["tools"] = declared
    return spec


def _tool(tool: Any) -> dict:
    tool = tool.model_dump(exclude_none=True) if hasattr(tool, "model_dump") else tool
    fn = tool.get("function", tool)
    return {"name": fn["name"], "parameters": fn.get("parameters") or ANY_OBJECT}


def canonical(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# -- spec -> xgrammar structural tag --------------------------------------------------------------------------
def structural_tag(spec: dict) -> dict:
    """A spec as an xgrammar structural tag (plain dicts; `xgrammar.Grammar.from_structural_tag` reads it)."""
    kind = spec["type"]
    if kind == "no_tool_calls":
        return {"type": "structural_tag", "format": {"type": "any_text", "excludes": [TOOL_CALL_OPEN]}}
    if kind == "tool_calls":
        return {"type": "structural_tag", "format": _calls(spec["tools"], spec.get("parallel", True))}
    if kind == "auto_tools":
        return {"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": _tags(spec["tools"], lenient=True),
            "at_least_one": False, "stop_after_first": not spec.get("parallel", True)}}
    if kind == "json":
        fmt = {"type": "grammar", "grammar": _json_ebnf(spec["schema"], "the schema", "response_format")}
        if spec.get("tools"):
            fmt = {"type": "or", "elements": [fmt, _calls(spec["tools"], True)]}
        return {"type": "structural_tag", "format": fmt}
    raise ValueError(f"unknown constraint type {kind!r}")


def _calls(tools: list[dict], parallel: bool) -> dict:
    """Only tool calls: one, or (`parallel`) one or more separated by `CALL_SEPARATOR`."""
    tags = _tags(tools)
    if parallel:
        return {"type": "tags_with_separator", "tags": tags, "separator": CALL_SEPARATOR, "at_least_one": True}
    return tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}


def _tags(tools: list[dict], lenient: bool = False) -> list[dict]:
    """One structural-tag `tag` per tool: `<tool_call>{"name": N, "arguments": ` + the arguments + `}</tool_call>`.
    `lenient`: a tool whose parameters xgrammar cannot enforce takes any object instead of failing the spec."""
    return [{"type": "tag", "begin": TOOL_CALL_OPEN + '{"name": ' + json.dumps(t["name"], ensure_ascii=False)
             + ', "arguments": ', "content": {"type": "grammar", "grammar": _arguments(t, lenient)},
             "end": "}" + TOOL_CALL_CLOSE} for t in tools]


def _arguments(tool: dict, lenient: bool) -> str:
    what = f"the parameters of tool {tool['name']!r}"
    try:
        return _json_ebnf(_sorted_properties(tool["parameters"]), what, "tools")
    except GrammarError as e:
        if not lenient:
            raise
        logger.warning("%s; its arguments are decoded as any JSON object", e)
        return _json_ebnf(ANY_OBJECT, what, "tools")


def _json_ebnf(schema: dict, what: str, param: str) -> str:
    xgr = _xgrammar()

    try:
        return str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=SEPARATORS,
                                                strict_mode=True))
    except Exception as e:  # xgrammar raises RuntimeError / ValueError / InvalidJSONError for unsupported schemas
        raise GrammarError(f"{param}: {what} cannot be enforced on the student's answer: {_reason(e)}", param) from None


def _reason(e: Exception) -> str:
    """xgrammar's C++ message without its `[time] /project/cpp/file.cc:line: ` prefix."""
    return re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(e)).strip()


def _sorted_properties(schema: Any) -> Any:
    """The schema with every `properties` map in key order (the student writes arguments as sorted JSON)."""
    if isinstance(schema, list):
        return [_sorted_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _sorted_properties(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _sorted_properties(schema["properties"][k]) for k in sorted(schema["properties"])}
    return out


# -- compiling ------------------------------------------------------------------------------------------------
class GrammarCompiler:
    """Specs -> xgrammar `CompiledGrammar`s for one tokenizer; the last `cache_size` specs are kept (an agent's
    tools repeat on every request). Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, stop_token_ids: list[int] | None = None,
                 cache_size: int = 256, max_threads: int = 2):
        xgr = _xgrammar()

        vocab_size = vocab_size or len(tokenizer)
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                                 stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads)
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: dict | None) -> Any:
        """A spec -> a `CompiledGrammar` (None -> None). Raises `GrammarError` for a schema xgrammar refuses."""
        if spec is None:
            return None
        key = canonical(spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        tag = structural_tag(spec)
        try:
            compiled = self._compiler.compile_structural_tag(tag)
        except Exception as e:
            raise GrammarError(f"the answer's constraint cannot be compiled: {_reason(e)}") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


# -- applying -------------------------------------------------------------------------------------------------
class RowGrammars:
    """A transformers `LogitsProcessor` for a batch where each row has its own compiled grammar or None.

    Per step it feeds each constrained row's last token to that row's matcher (not on the first call, which sees
    the prompt), fills the row's bitmask and masks its logits; unconstrained rows are not touched. A row whose
    grammar has terminated (it accepted EOS), or that stopped early and is being padded, may only produce EOS.
    Single use: one per `generate` call. Works with left-padded batches (only each row's last token is read).
    """

    def __init__(self, grammars: list[Any], tokenizer: Any = None, eos_token_id: int | list[int] | None = None):
        xgr = _xgrammar()

        self.grammars = list(grammars)
        self.rows = [i for i, g in enumerate(self.grammars) if g is not None]
        self.matchers = {i: xgr.GrammarMatcher(self.grammars[i]) for i in self.rows}
        first = self.grammars[self.rows[0]] if self.rows else None
        self.vocab_size = first.tokenizer_info.vocab_size if first is not None else 0
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None and first is not None:
            eos_token_id = list(first.tokenizer_info.stop_token_ids)
        self.eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self._bitmask = xgr.allocate_token_bitmask(len(self.grammars), self.vocab_size) if self.rows else None
        self._eos_only = self._mask_of(self.eos)                          # what an ended row may write
        stops = set(self.eos) | {t for g in self.grammars if g is not None for t in g.tokenizer_info.stop_token_ids}
        self._not_stop = ~self._mask_of(sorted(stops)) if self.rows else None  # words of every other token
        self._left: set[int] = set()      # rows that left their grammar: stopped by the caller, then padded
        self._final: set[int] = set()     # rows whose grammar is complete: nothing but EOS may follow
        self._started = False

    def is_terminated(self, row: int) -> bool:
        """The row's grammar is over: it accepted EOS, or only EOS may follow (as of the last step this processor
        saw; `generate` does not call it after a row's final token), or the row left it (stopped, then padded).
        False for unconstrained rows."""
        return row in self.matchers and (self._over(row) or row in self._final)

    def _over(self, row: int) -> bool:
        return row in self._left or self.matchers[row].is_terminated()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch
        xgr = _xgrammar()

        if not self.rows:
            return scores
        if input_ids.shape[0] != len(self.grammars):
            raise ValueError(f"RowGrammars was built for {len(self.grammars)} rows, the batch has "
                             f"{input_ids.shape[0]}")
        if self._started:
            last = input_ids[:, -1].tolist()
            for i in self.rows:
                if not self._over(i) and not self.matchers[i].accept_token(last[i]):
                    self._left.add(i)
        self._started = True
        for i in self.rows:
            if self._over(i):
                self._bitmask[i] = self._eos_only
            else:
                self.matchers[i].fill_next_token_bitmask(self._bitmask, i)
                if not (self._bitmask[i] & self._not_stop).any():
                    self._final.add(i)
        bitmask = self._bitmask
        if scores.device.type == "cuda":
            bitmask = bitmask.to(scores.device, non_blocking=True)
            backend = "triton" if importlib.util.find_spec("triton") else "torch_native"
        else:
            backend = "cpu" if scores.device.type == "cpu" else "torch_native"
        width = min(self.vocab_size, scores.shape[-1])
        xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=width, indices=self.rows, backend=backend)
        if scores.shape[-1] > self.vocab_size:  # padded embedding rows beyond the tokenizer: never allowed
            scores[self.rows, self.vocab_size:] = -torch.inf
        return scores

    def _mask_of(self, tokens: list[int]) -> Any:
        """One bitmask row (int32 words) allowing exactly `tokens`."""
        import torch

        words = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
        for t in tokens:
            bit = 1 << (t % 32)
            words[t // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32: bit 31 is the sign
        return words
