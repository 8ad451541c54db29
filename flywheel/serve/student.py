"""The student deployment: one base model per replica, a LoRA adapter per agent, batches that mix agents, answers
streamed token by token.

    handle.options(multiplexed_model_id="sgd_Flights@v2", stream=True).stream.remote(turns, sampling, constraint)

Adapters are Serve-multiplexed under the model id `<agent>@<version>` (a promotion loads the new version; LRU
eviction unloads the old one). Requests do not go through `@serve.batch`, which splits batches by multiplexed
model id: each request puts a `Row` on the replica's queue and one decode loop takes up to `max_batch_size`
waiting rows (waiting `batch_wait_s` for more), runs them as one batch in the engine, and hands each row's text
back to its caller as it is decoded. A caller that goes away (client disconnect -> `CancelledError`) flags its
row, which ends at the next token.

`stream()` yields dicts: `{"text": "..."}` increments, then one `{"done": true, "finish_reason", "prompt_tokens",
"completion_tokens"}`; or a single `{"error": {...}}` (HTTP status, message, param) when the request cannot be run
(prompt too long, adapter missing or corrupt), before any text.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, AsyncIterator

from ray import serve

from flywheel.config import ServeConfig
from flywheel.registry.registry import Registry
from flywheel.storage import Store

logger = logging.getLogger("ray.serve")


class AdapterError(RuntimeError):
    """An agent's adapter cannot be loaded (missing, corrupt): only that agent fails."""


class _Adapter:
    """One adapter in the engine. Serve's multiplexer calls `__del__` when it evicts it (LRU); the unload waits
    for requests already holding it. Python calls `__del__` again at garbage collection: that is a no-op."""

    def __init__(self, engine: Any, model_id: str, name: str):
        self.engine, self.model_id, self.name = engine, model_id, name
        self._users, self._evicted, self._gone = 0, False, False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    async def release(self) -> None:
        with self._lock:
            self._users -= 1
            unload = self._evicted and self._users == 0
        if unload:
            await asyncio.to_thread(self._unload)

    def _unload(self) -> None:
        with self._lock:
            if self._gone:
                return
            self._gone = True
        self.engine.unload_adapter(self.name)
        logger.info("unloaded adapter %s (%s)", self.model_id, self.name)

    def __del__(self) -> None:
        try:
            with self._lock:
                self._evicted = True
                idle = self._users == 0
            if idle:
                self._unload()
        except Exception:  # interpreter shutdown: nothing left to free
            pass


def _error(status: int, message: str, param: str | None = None, code: str = "invalid_request") -> dict:
    return {"error": {"status": status, "message": message, "param": param, "code": code}}


@serve.deployment(name="StudentModel")
class StudentModel:
    def __init__(self, home: str, cfg: ServeConfig):
        from flywheel.serve.engine import HFEngine

        self.store, self.cfg = Store(home), cfg
        self.engine = HFEngine(cfg.base_model, threads=max(1, int(cfg.replica_cpus)))
        self.context = min(self.engine.context_length, cfg.max_context_tokens or self.engine.context_length)
        self.stats = {"requests": 0, "batches": 0, "mixed_batches": 0, "largest_batch": 0, "loads": 0,
                      "cancelled": 0, "rows_cancelled": 0}
        self._model_ids: dict[str, str] = {}  # engine adapter name -> "<agent>@<version>"
        self._waiting: list[Any] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._grammars = None

        async def load_adapter(model_id: str) -> _Adapter:
            return await asyncio.to_thread(self._load, model_id)

        # Wired here rather than as a decorator: the cache size comes from the config.
        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter)

    # -- adapters ----------------------------------------------------------------------------------------------
    def _load(self, model_id: str) -> _Adapter:
        agent, _, version = model_id.rpartition("@")
        try:
            entry = Registry(self.store).get(agent, version)
        except Exception as e:
            raise AdapterError(f"{model_id} is not registered: {e}") from None
        tmp = None if self.store.local else tempfile.mkdtemp(prefix="flywheel-adapter-")
        name = f"{re.sub(r'[^A-Za-z0-9_@-]', '_', model_id)}-{uuid.uuid4().hex[:6]}"
        try:
            path = self.store.local_copy(entry["adapter"], tmp or "")
            # A fresh engine name per load, so a late unload of an evicted copy never hits a reloaded one.
            self.engine.load_adapter(name, path)
        except Exception as e:
            logger.error("adapter %s at %s cannot be loaded: %s", model_id, entry.get("adapter"), e)
            raise AdapterError(f"the adapter of {model_id} cannot be loaded ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        self._model_ids[name] = model_id
        self.stats["loads"] += 1
        logger.info("loaded adapter %s from %s", model_id, entry["adapter"])
        return _Adapter(self.engine, model_id, name)

    def _grammar(self, constraint: dict | None) -> Any:
        if constraint is None:
            return None
        if self._grammars is None:
            from flywheel.serve.grammar import GrammarCompiler

            self._grammars = GrammarCompiler(self.engine.tokenizer, self.engine.model.config.vocab_size)
        return self._grammars.compile(constraint)

    # -- requests ----------------------------------------------------------------------------------------------
    async def stream(self, turns: list[dict], sampling: dict, constraint: dict | None = None) -> AsyncIterator[dict]:
        """Answer one prompt with the adapter named by the request's multiplexed model id, as it is decoded."""
        from flywheel.serve.engine import Row, Sampling

        params = Sampling(**{**sampling, "stop": tuple(sampling.get("stop") or ())})
        prompt_ids = await asyncio.to_thread(self.engine.encode, turns)
        limit = self.context - params.max_tokens
        if len(prompt_ids) > limit:
            yield _error(400, f"messages: the prompt is {len(prompt_ids)} tokens; with max_tokens "
                              f"{params.max_tokens} the student's context of {self.context} tokens allows at most "
                              f"{limit}. Shorten the messages or lower max_tokens", "messages",
                         "context_length_exceeded")
            return
        try:
            adapter = await self._adapter(serve.get_multiplexed_model_id())
        except AdapterError as e:
            yield _error(503, str(e), "model", "adapter_unavailable")
            return
        try:
            grammar = await asyncio.to_thread(self._grammar, constraint)
        except Exception as e:  # a schema xgrammar cannot compile
            param = getattr(e, "param", None) or "tools"
            yield _error(400, f"{param}: {e}", param, "invalid_schema")
            return
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        row = Row(turns, adapter.name, params, grammar,
                  on_text=lambda text: loop.call_soon_threadsafe(queue.put_nowait, {"text": text}),
                  prompt_ids=prompt_ids,
                  done=lambda gen: loop.call_soon_threadsafe(queue.put_nowait, {"done": gen}))
        adapter.acquire()
        try:
            self._enqueue(row)
            while True:
                item = await queue.get()
                while "text" in item and not queue.empty():  # coalesce what piled up: fewer Ray messages
                    nxt = queue.get_nowait()
                    if "text" not in nxt:
                        yield item
                        item = nxt
                        break
                    item = {"text": item["text"] + nxt["text"]}
                if "done" in item:
                    gen = item["done"]
                    if isinstance(gen, BaseException):
                        raise gen
                    yield {"done": True, "finish_reason": gen.finish_reason, "prompt_tokens": gen.prompt_tokens,
                           "completion_tokens": gen.completion_tokens}
                    return
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            row.cancelled.set()  # the caller went away: its row ends at the next token
            self.stats["cancelled"] += 1
            raise
        finally:
            await adapter.release()

    async def generate(self, turns: list[dict], budget: int) -> dict:
        """The whole answer at once, greedy (kept for callers that do not stream)."""
        text, done = "", {}
        async for item in self.stream(turns, {"max_tokens": budget}):
            if "error" in item:
                raise RuntimeError(item["error"]["message"])
            text += item.get("text", "")
            done = item
        return {"text": text, "prompt_tokens": done["prompt_tokens"],
                "completion_tokens": done["completion_tokens"], "truncated": done["finish_reason"] == "length"}

    # -- the decode loop ---------------------------------------------------------------------------------------
    def _enqueue(self, row: Any) -> None:
        self._waiting.append(row)
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())

    async def _decode_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._waiting:
                continue
            if len(self._waiting) < self.cfg.max_batch_size:
                await asyncio.sleep(self.cfg.batch_wait_s)  # let a batch fill
            rows = [r for r in self._waiting[: self.cfg.max_batch_size] if not r.cancelled.is_set()]
            dropped = self._waiting[: self.cfg.max_batch_size]
            del self._waiting[: self.cfg.max_batch_size]
            if self._waiting:
                self._wake.set()
            for r in dropped:
                if r.cancelled.is_set():
                    r.done(asyncio.CancelledError())
            if not rows:
                continue
            try:
                gens = await asyncio.to_thread(self.engine.run_batch, rows)
            except Exception as e:  # the batch failed: every caller in it hears why
                logger.exception("batch of %d failed", len(rows))
                for r in rows:
                    r.done(RuntimeError(f"the student failed: {type(e).__name__}: {e}"))
                continue
            for r, gen in zip(rows, gens):
                r.done(gen)
                self.stats["rows_cancelled"] += gen.finish_reason == "cancelled"
            self.stats["requests"] += len(rows)
            self.stats["batches"] += 1
            self.stats["mixed_batches"] += len({r.adapter for r in rows}) > 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))

    # -- health ------------------------------------------------------------------------------------------------
    async def ready(self) -> dict:
        """Readiness: the engine answers one greedy token on the base model."""
        from flywheel.serve.engine import Row, Sampling

        start = time.perf_counter()
        [gen] = await asyncio.to_thread(self.engine.run_batch, [Row([{"role": "user", "content": "ping"}], None,
                                                                     Sampling(max_tokens=1))])
        return {"ok": True, "seconds": round(time.perf_counter() - start, 3), "tokens": gen.completion_tokens}

    def info(self) -> dict:
        """Counters and the adapters loaded in the engine right now (as model ids)."""
        return {**self.stats, "adapters": sorted(self._model_ids[n] for n in self.engine.adapters()),
                "waiting": len(self._waiting)}
