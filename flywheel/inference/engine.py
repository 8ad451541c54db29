"""The serving engine seam: one base model, many LoRA adapters, mixed in one batch, streamed token by token.

`Engine` is the interface Serve and evaluation use. `HFEngine` is the default: a transformers model (bf16 where the
hardware has it; on the GPU when there is one), batched multi-LoRA from `flywheel.inference.lora` (a pool of adapter
slots; rows of one batch with different adapters cost one forward pass), and its own decode loop.

    engine = HFEngine("models/smollm2-135m-instruct", max_adapters=32, max_rank=64)
    engine.load_adapter("sgd_Flights@v1", "/path/to/adapter")          # a PEFT folder; AdapterFormatError if not
    engine.generate([turns_a, turns_b], adapters=["sgd_Flights@v1", None], max_new_tokens=64)   # greedy
    engine.run_batch([Row(turns, "sgd_Flights@v1", Sampling(64, temperature=0.7, seed=1), on_text=print)])
    engine.run_continuous(take, max_rows=8)                              # Serve: rows join while others decode

Every row has its own adapter, sampling parameters (temperature, top_p, seed, stop strings, token budget),
optional grammar (a compiled grammar from `flywheel.inference.grammar`), a callback that receives the row's text as it
is decoded, and a cancel flag that ends the row at the next token.

The decode loop: rows are prefilled (left-padded; a prompt prefix that rows of one adapter share, such as an agent's
tools block, computed once and its cache repeated) into a KV cache (`DynamicCache`), then every step runs one forward
over all active rows' last tokens. A row that finishes (EOS, stop string, token budget, context, cancel) leaves
the batch at once: its cache rows are dropped, and leading columns no row needs any more are cut. Between steps,
`run_continuous` asks `take(n)` for waiting rows: they are prefilled together and their cache joins the batch's
(the shorter one left-padded, masked out), so a request that arrives while a long answer decodes starts at the
next step rather than after the batch (models whose cache layers are not plain `DynamicLayer`s, e.g. sliding
windows, admit only when the batch is empty). `run_batch` is the same loop with a fixed set of rows.

Adapters: `load_adapter` reads and checks a PEFT folder and puts it in a slot (the least recently used idle slot
is evicted when all are taken; the adapter stays known and is read again from its folder when a row needs it).
A row whose adapter cannot get a slot (every slot pinned by running rows) waits for one. One decode loop runs at
a time; adapters load between its steps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from flywheel.inference.lora import TARGET_MODULES, AdapterFormatError, LoRAPool, PoolFull, read_adapter
from flywheel.prompts import MIN_SHARED_PREFIX, common_prefix_len

BASE = "__base__"
STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"
__all__ = ["AdapterFormatError", "Engine", "Generation", "HFEngine", "Row", "Sampling"]


@dataclass(frozen=True)
class Generation:
    """One row's answer. `tokens` are its token ids (EOS left out), `logprobs` each one's log-probability under the
    distribution it was chosen from (after the grammar mask, at temperature 1: a token the grammar forces has
    log-probability 0), `token_ends` where each token's text ends in the decoded answer (`text` may be cut shorter
    by a stop string), `top_logprobs` the row's `Sampling.top_logprobs` most likely (token id, log-probability)
    pairs at each position (empty when not asked). The log-probabilities take no part in equality: two batches of
    different shapes round them differently."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = STOP
    tokens: tuple[int, ...] = field(default=(), compare=False)
    logprobs: tuple[float, ...] = field(default=(), compare=False)
    token_ends: tuple[int, ...] = field(default=(), compare=False)
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Sampling:
    """How one row is decoded. temperature 0 is greedy (the default: the student was taught greedily)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # the caller wants the tokens' log-probabilities (each row keeps them anyway)
    top_logprobs: int = 0  # this many alternatives (token id, log-probability) per position, as OpenAI's


@dataclass
class Row:
    """One request in a batch. `on_text` gets decoded increments (from the engine's thread)."""

    turns: list[dict]
    adapter: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    grammar: Any = None  # a compiled grammar for flywheel.inference.grammar.RowGrammars, or None
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_ids: list[int] | None = None  # the encoded prompt, when the caller already has it
    done: Callable[[Any], None] | None = None  # run_continuous tells it the row's Generation (or exception)


class Engine(Protocol):
    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> list[str]: ...

    def encode(self, turns: list[dict]) -> list[int]: ...

    def run_batch(self, rows: list[Row]) -> list[Generation]: ...

    def generate(self, prompts: list[list[dict]], adapters: list[str | None],
                 max_new_tokens: int = 128, constraints: list[dict | None] | None = None) -> list[Generation]: ...


def _auto_dtype(device: str):
    """bf16 where the hardware computes it natively (measured ~2x faster generation on an AVX512-BF16 CPU)."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from flywheel.hardware import native_bf16

    return torch.bfloat16 if native_bf16("cpu") else torch.float32


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFEngine:
    """transformers + batched LoRA slots + a continuous decode loop (bf16 where the hardware has it; GPU when
    present). `max_adapters` slots of rank up to `max_rank` on the `target_modules` Linear layers."""

    def __init__(self, base_model: str, dtype: str = "auto", threads: int | None = None, device: str = "auto",
                 max_adapters: int = 8, max_rank: int = 64, target_modules: tuple[str, ...] = TARGET_MODULES,
                 share_prefix: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        from flywheel.models import cache_keyword, local_model

        self.base_model = base_model  # as named (a URI stays a URI); loaded from this node's copy
        self.cache_keyword = cache_keyword()
        folder = local_model(base_model)
        self.share_prefix = share_prefix  # rows prefilled together compute their common prefix once
        self.device = _device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dtype = _auto_dtype(self.device) if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype).to(self.device).eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.pool = LoRAPool(self.model, max_adapters, max_rank, target_modules)
        self._paths: dict[str, str] = {}  # known adapters (resident in a slot or not) -> folder
        self._run = threading.Lock()  # one decode loop at a time
        self._step = threading.Lock()  # one forward pass or one change to the slots at a time
        self._compiler = None
        self.counters = {"steps": 0, "prefills": 0, "mixed_batches": 0, "largest_batch": 0, "rows": 0,
                         "rows_cancelled": 0, "loads": 0, "reloads": 0, "prefill_tokens": 0,
                         "prefill_tokens_shared": 0, "step_rows": 0, "prefill_s": 0.0, "step_s": 0.0}

    # -- adapters ----------------------------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        return list(self._paths)

    def resident(self) -> list[str]:
        """The adapters in a slot now (the others are read again from their folders when a row needs them)."""
        return self.pool.resident()

    def load_adapter(self, name: str, path: str) -> None:
        """Read and check a PEFT folder (`AdapterFormatError` if it cannot be served) and give it a slot."""
        if name in self._paths:
            return
        weights = read_adapter(path, self.pool.shapes, self.pool.max_rank)
        with self._step:
            try:
                self.pool.install(name, weights)
            except PoolFull:  # every slot serves a running row: it gets one when a row needs it
                pass
            self._paths[name] = path
            self.counters["loads"] += 1

    def unload_adapter(self, name: str) -> None:
        with self._step:
            if self._paths.pop(name, None) is not None:
                self.pool.free(name)

    def stats(self) -> dict:
        """Counters (read without waiting for a running forward pass): `prefills` and `steps` (forward passes),
        `mixed_batches` (passes whose rows use more than one adapter, the base model counting as one),
        `largest_batch` (rows in one pass), `rows` and `rows_cancelled` (rows ended), adapter `loads`, `reloads`
        (an evicted adapter read again from its folder) and `evictions`; `prefill_tokens` (prompt tokens prefilled)
        and `prefill_tokens_shared` (of those, the ones a shared prefix spared computing again); `step_rows` (rows
        over all decode steps: divided by `steps`, the mean decode batch); `prefill_s` and `step_s` (seconds in
        prefill and in decode forward passes); the slots and their memory."""
        return {**self.counters, "evictions": self.pool.evictions, "slots": self.pool.slots,
                "resident": len(self.pool.resident()), "slot_bytes": self.pool.nbytes()}

    def _pin(self, name: str | None) -> int | None:
        """The slot of a row's adapter, pinned for the row (0: no adapter); None when no slot is free yet.
        Raises KeyError for an unknown adapter and AdapterFormatError when its folder no longer reads."""
        if name is None:
            return 0
        with self._step:
            if name not in self._paths:
                raise KeyError(f"adapter {name!r} is not loaded")
            slot = self.pool.slot_of(name)
            if slot is not None:
                self.pool.pin(slot)
                return slot
            if not self.pool.has_room():
                return None
            path = self._paths[name]
        weights = read_adapter(path, self.pool.shapes, self.pool.max_rank)  # evicted: read again from its folder
        with self._step:
            reload = self.pool.slot_of(name) is None
            try:
                slot = self.pool.install(name, weights)
            except PoolFull:
                return None
            self.pool.pin(slot)
            self.counters["reloads"] += reload
        return slot

    # -- prompts -----------------------------------------------------------------------------------------------
    def encode(self, turns: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)

    def grammar(self, spec: dict | None) -> Any:
        """A constraint spec compiled for this engine's tokenizer (compiler built on first use), or None."""
        if spec is None:
            return None
        if self._compiler is None:
            from flywheel.inference.grammar import GrammarCompiler

            self._compiler = GrammarCompiler(self.tokenizer, self.model.config.vocab_size)
        return self._compiler.compile(spec)

    # -- decoding ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[dict]], adapters: list[str | None],
                 max_new_tokens: int = 128, constraints: list[dict | None] | None = None) -> list[Generation]:
        """Greedy answers for a batch (evaluation's entry point); `constraints`: one `flywheel.inference.grammar` spec
        (or None) per prompt, the answer decoded under it."""
        if len(prompts) != len(adapters) or (constraints is not None and len(constraints) != len(prompts)):
            raise ValueError("one adapter name (or None) and one constraint (or None) per prompt")
        sampling = Sampling(max_tokens=max_new_tokens)
        grammars = [self.grammar(c) for c in constraints] if constraints is not None else [None] * len(prompts)
        return self.run_batch([Row(p, a, sampling, grammar=g) for p, a, g in zip(prompts, adapters, grammars)])

    def run_batch(self, rows: list[Row]) -> list[Generation]:
        """Decode every row under its own adapter, sampling, grammar and stop strings; stream through `on_text`.
        Rows whose adapters do not all fit in the slots at once decode as slots free up."""
        for row in rows:
            if row.adapter is not None and row.adapter not in self._paths:
                raise KeyError(f"adapter {row.adapter!r} is not loaded")
        queue, results = list(rows), {}

        def take(n: int) -> list[Row]:
            taken = queue[:n]
            del queue[:n]
            return taken

        self._decode(take, lambda row, result: results.__setitem__(id(row), result), max(1, len(rows)))
        for row in rows:
            if isinstance(results[id(row)], BaseException):
                raise results[id(row)]
        return [results[id(row)] for row in rows]

    def run_continuous(self, take: Callable[[int], list[Row]], max_rows: int) -> None:
        """Decode until no row is active and `take(n)` (asked between steps for at most n more rows) has none;
        each row's Generation, or the exception that ended it, goes to its `done`."""
        self._decode(take, lambda row, result: row.done(result) if row.done else None, max_rows)

    def _decode(self, take: Callable[[int], list[Row]], finish: Callable[[Row, Any], None], max_rows: int) -> None:
        import torch

        with self._run, torch.inference_mode():
            loop = _DecodeLoop(self, finish)
            try:
                while True:
                    took = loop.admit(take, max_rows)
                    if not loop.active:
                        if not took and not loop.deferred:
                            return
                        continue
                    loop.step()
            except BaseException as e:  # every row still in the loop hears why
                loop.fail(e)
                raise


@dataclass
class _Live:
    """A row in the decode loop: its slot, text, per-row grammar and sampler, and where its next token goes."""

    row: Row
    prompt: list[int]
    slot: int
    text: "_RowText"
    grammar: Any = None  # flywheel.inference.grammar.RowGrammars for this row alone
    generator: Any = None  # torch.Generator of a sampled row
    position: int = 0  # position id of `pending`
    pending: int = 0  # the token chosen last, not yet in the cache


class _DecodeLoop:
    """The state of one `_decode` call: active rows, their KV cache and attention mask, rows waiting for a slot."""

    def __init__(self, engine: HFEngine, finish: Callable[[Row, Any], None]):
        self.engine, self.finish = engine, finish
        self.tokenizer, self.model, self.pool = engine.tokenizer, engine.model, engine.pool
        self.device = engine.device
        self.active: list[_Live] = []
        self.deferred: list[Row] = []
        self.cache: Any = None
        self.mask: Any = None
        self.joinable = True  # plain DynamicLayers: a prefilled cache can join a running one

    # -- rows joining --------------------------------------------------------------------------------------------
    def admit(self, take: Callable[[int], list[Row]], max_rows: int) -> bool:
        """Prefill what fits now: rows waiting for a slot first, then up to the free rows' worth from `take`."""
        room = max_rows - len(self.active)
        if room <= 0 or (self.active and not self.joinable):
            return False
        taken = take(room - len(self.deferred)) if room > len(self.deferred) else []
        rows, self.deferred = self.deferred + taken, []
        joining = []
        for row in rows:
            live = self._live(row) if len(joining) < room else None
            if live is None:
                self.deferred.append(row)
            elif live is not _ENDED:
                joining.append(live)
        if joining:
            self._prefill(joining)
        return bool(rows)

    def _live(self, row: Row) -> Any:
        """The row ready to decode; None when it waits for a slot; `_ENDED` when it has ended (cancelled while
        waiting, adapter unknown or unreadable, prompt not encodable): its caller has been told."""
        try:
            if row.prompt_ids is None:
                row.prompt_ids = self.engine.encode(row.turns)
            if row.cancelled.is_set():
                self._end_row(row, Generation("", len(row.prompt_ids), 0, CANCELLED))
                return _ENDED
            slot = self.engine._pin(row.adapter)
        except Exception as e:  # this row only: the others decode on
            self.finish(row, e)
            return _ENDED
        if slot is None:
            return None
        live = _Live(row, row.prompt_ids, slot, _RowText(self.tokenizer, row), position=len(row.prompt_ids))
        if row.grammar is not None:
            from flywheel.inference.grammar import RowGrammars

            live.grammar = RowGrammars([row.grammar], self.tokenizer)
        if row.sampling.temperature > 0:
            live.generator = _generator(row.sampling.seed)
        return live

    def _prefill(self, joining: list[_Live]) -> None:
        """One forward over the joining rows' prompts (left-padded among themselves); their cache joins the
        batch's and each takes its first token. Rows of one adapter whose prompts begin alike (an agent's tools
        block) compute that prefix once (`_shared_prefix`): the same logits in fewer positions."""
        import torch

        running = bool(self.active)
        self.active += joining  # from here on, a failure reaches these rows' callers too
        shared = self._shared_prefix(joining)
        cache = self._prefix_cache(joining, shared)
        batch = self.tokenizer.pad({"input_ids": [live.prompt[shared:] for live in joining]}, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0) + shared
        if shared:
            mask = torch.cat([mask.new_ones(len(joining), shared), mask], dim=1)
        logits = self._forward(ids, mask, positions, cache, [live.slot for live in joining], "prefill_s")
        counters = self.engine.counters
        counters["prefills"] += 1
        counters["prefill_tokens"] += sum(len(live.prompt) for live in joining)
        counters["prefill_tokens_shared"] += shared * (len(joining) - 1)  # positions not computed again
        self.joinable = self.joinable and all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
        if running:
            self._join(cache, mask)
        else:
            self.cache, self.mask = cache, mask
        self._advance(joining, logits)

    def _shared_prefix(self, joining: list[_Live]) -> int:
        """Prompt tokens all joining rows begin with, when they share one adapter slot (the prefix's keys and
        values depend on it); 0 for fewer than `MIN_SHARED_PREFIX` or with the engine's `share_prefix` off."""
        if not self.engine.share_prefix or len({live.slot for live in joining}) > 1:
            return 0
        shared = common_prefix_len([live.prompt for live in joining])
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _prefix_cache(self, joining: list[_Live], shared: int) -> Any:
        """A fresh cache; with a shared prefix, holding it (one forward pass) repeated for every joining row."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if shared:
            ids = torch.tensor([joining[0].prompt[:shared]], device=self.device)
            positions = torch.arange(shared, device=self.device)[None]
            self._forward(ids, torch.ones_like(ids), positions, cache, [joining[0].slot], "prefill_s")
            cache.batch_repeat_interleave(len(joining))
        return cache

    def _join(self, cache: Any, mask: Any) -> None:
        """Append prefilled rows to the batch: both caches left-padded to one length, masked where padded."""
        import torch
        import torch.nn.functional as F

        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])
            old.values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)])
        self.mask = torch.cat([F.pad(self.mask, (length - self.mask.shape[1], 0)),
                               F.pad(mask, (length - mask.shape[1], 0))])

    # -- one step ------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One forward over every active row's pending token; each row takes its next token."""
        import torch

        for live in self.active:
            if live.row.cancelled.is_set():
                live.text.close(CANCELLED)
            elif live.position >= self.engine.context_length:
                live.text.close(LENGTH)
        self._leave()
        if not self.active:
            return
        ids = torch.tensor([[live.pending] for live in self.active], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
        positions = torch.tensor([[live.position] for live in self.active], device=self.device)
        slots = [live.slot for live in self.active]
        logits = self._forward(ids, self.mask, positions, self.cache, slots, "step_s")
        self.engine.counters["steps"] += 1
        self.engine.counters["step_rows"] += len(slots)
        for live in self.active:
            live.position += 1
        self._advance(self.active, logits)

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any, slots: list[int], clock: str) -> Any:
        """One forward pass (prefill or decode step) with each row's adapter slot; the last position's logits.
        Its seconds add to the counter `clock` names."""
        start = time.perf_counter()
        with self.engine._step:
            self.pool.set_rows(slots)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self.engine.cache_keyword: cache})
            logits = out.logits[:, -1].float()
        counters = self.engine.counters
        counters[clock] += time.perf_counter() - start
        counters["mixed_batches"] += len(set(slots)) > 1
        counters["largest_batch"] = max(counters["largest_batch"], len(slots))
        return logits

    def _advance(self, lives: list[_Live], logits: Any) -> None:
        """Each row's next token from its logits row (grammar, then sampling or greedy) with its log-probability
        under what it was chosen from, streamed; ended rows leave the batch."""
        import torch

        greedy = logits.argmax(-1).tolist()
        for i, live in enumerate(lives):
            token, scores = greedy[i], logits[i]
            if live.grammar is not None or live.generator is not None:
                token, scores = self._choose(live, logits[i: i + 1])
            live.pending = token
            if token == self.tokenizer.eos_token_id:
                live.text.close(STOP)
            else:
                logprobs = torch.log_softmax(scores.float(), dim=-1)
                live.text.add(token, float(logprobs[token]), _top(logprobs, live.row.sampling.top_logprobs))
            if live.text.finish is None and live.row.cancelled.is_set():
                live.text.close(CANCELLED)
        self._leave()

    def _choose(self, live: _Live, scores: Any) -> tuple[int, Any]:
        """(token, the scores row it was chosen from: masked by the row's grammar where it has one)."""
        import torch

        if live.grammar is not None:  # it reads the row's previous token (ignored on its first call)
            scores = live.grammar(torch.tensor([[live.pending]]), scores)
        if live.generator is None:
            return int(scores[0].argmax()), scores[0]
        return _sample(scores[0], live.row.sampling, live.generator), scores[0]

    # -- rows leaving --------------------------------------------------------------------------------------------
    def _leave(self) -> None:
        """Drop ended rows from the batch and its cache; cut cache columns that only padding still fills."""
        keep = [i for i, live in enumerate(self.active) if live.text.finish is None]
        if len(keep) == len(self.active):
            return
        for i, live in enumerate(self.active):
            if live.text.finish is not None:
                self._release(live)
                self._end_row(live.row, live.text.generation(len(live.prompt)))
        self.active = [self.active[i] for i in keep]
        if not self.active:
            self.cache = self.mask = None
            return
        import torch

        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).long().argmax())  # the first column some row still attends to
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def _release(self, live: _Live) -> None:
        if live.slot:
            with self.engine._step:
                self.pool.unpin(live.slot)

    def _end_row(self, row: Row, gen: Generation) -> None:
        self.engine.counters["rows"] += 1
        self.engine.counters["rows_cancelled"] += gen.finish_reason == CANCELLED
        self.finish(row, gen)

    def fail(self, error: BaseException) -> None:
        """The loop broke (a forward raised): every row in it ends with the error."""
        for live in self.active:
            self._release(live)
            self.finish(live.row, error)
        for row in self.deferred:
            self.finish(row, error)
        self.active, self.deferred = [], []


_ENDED = object()


def _left_pad(t: Any, length: int) -> Any:
    import torch.nn.functional as F

    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t


def _top(logprobs: Any, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    values, ids = logprobs.topk(k)
    return tuple(zip(ids.tolist(), values.tolist()))


def _generator(seed: int | None) -> Any:
    import torch

    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def _sample(scores: Any, p: Sampling, generator: Any) -> int:
    """One token drawn from softmax(scores / temperature), within the top-p nucleus, with the row's generator."""
    import torch

    probs = torch.softmax(scores.float() / p.temperature, dim=-1).cpu()
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())


class _RowText:
    """One row's answer: decodes its tokens, applies stop strings, hands increments to `on_text`, knows when and
    why the row ended."""

    def __init__(self, tokenizer: Any, row: Row):
        self.tokenizer, self.row = tokenizer, row
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.ends: list[int] = []
        self.top: list[tuple] = []
        self.text, self.sent = "", 0
        self.finish: str | None = None

    def add(self, token: int, logprob: float = 0.0, top: tuple = ()) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.top.append(top)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.ends.append(len(text))
        hold = len(text) if text.endswith("\ufffd") else None  # half a multi-byte character: wait for the rest
        stops = self.row.sampling.stop
        for stop in stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text = text[:at]
                self.close(STOP)
                return
        self.text = text
        safe = len(text) if hold is None else text.rfind("\ufffd")
        for stop in stops:  # never send what may become the start of a stop string
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        self._emit(text[:safe])
        if len(self.tokens) >= self.row.sampling.max_tokens:
            self.close(LENGTH)

    def _emit(self, upto: str) -> None:
        if len(upto) > self.sent and self.row.on_text is not None:
            self.row.on_text(upto[self.sent:])
        self.sent = max(self.sent, len(upto))

    def close(self, reason: str) -> None:
        if self.finish is None:
            self._emit(self.text)
            self.finish = reason

    def generation(self, prompt_tokens: int) -> Generation:
        top = tuple(self.top) if self.row.sampling.top_logprobs > 0 else ()
        return Generation(self.text, prompt_tokens, len(self.tokens), self.finish or LENGTH, tuple(self.tokens),
                          tuple(self.logprobs), tuple(self.ends), top)
