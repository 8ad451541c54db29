"""The serving engine without Ray: batched multi-LoRA slots checked token for token against PEFT, slot LRU and
reloads, adapters it must refuse, continuous admission, per-row sampling / stop / cancel / grammar in the decode
loop, and the node's adapter disk cache. A tiny random Llama (fp32) with real PEFT adapters made here.

    .venv/bin/python -m pytest tests/test_engine.py -q
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading

import pytest

from flywheel.inference.engine import HFEngine, Row, Sampling
from flywheel.inference.lora import AdapterFormatError

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[{"role": "user", "content": f"Request {i}: book {'a flight ' * (i % 3)}to city {i}"}] for i in range(6)]


def make_adapter(base: str, out_dir: str, seed: int, rank: int, targets: list[str], **extra) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False,
                                      **extra))
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """r4 on q/v, r8 on all seven projections, r8 on o/down only."""
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(tiny_model, str(root / "a"), 1, 4, ["q_proj", "v_proj"]),
            "b": make_adapter(tiny_model, str(root / "b"), 2, 8, ALL),
            "c": make_adapter(tiny_model, str(root / "c"), 3, 8, ["o_proj", "down_proj"])}


def engine_with(tiny_model, adapters, names=("a", "b", "c"), slots=4) -> HFEngine:
    engine = HFEngine(tiny_model, dtype="float32", max_adapters=slots, max_rank=16)
    for name in names:
        engine.load_adapter(name, adapters[name])
    return engine


def peft_answers(tiny_model, adapters, prompts, names, max_new_tokens) -> list[tuple[str, int]]:
    """(text, tokens) per row from PEFT's own mixed-batch generate (`adapter_names`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.padding_side = "left"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                      adapters["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts]
    batch = tok.pad({"input_ids": ids}, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, adapter_names=[n or "__base__" for n in names])
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        tokens = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        answers.append((tok.decode(tokens, skip_special_tokens=True), len(tokens)))
    return answers


# -- batched LoRA against PEFT ----------------------------------------------------------------------------------
def test_a_mixed_batch_equals_peft_row_by_row(tiny_model, adapters):
    engine = engine_with(tiny_model, adapters)
    names = ["a", "b", None, "c", "a", "b"]
    gens = engine.generate(PROMPTS, names, max_new_tokens=10)
    expected = peft_answers(tiny_model, adapters, PROMPTS, names, 10)
    assert [(g.text, g.completion_tokens) for g in gens] == expected
    # Each adapter changes the answer (the comparison above is not base vs base).
    base = engine.generate(PROMPTS[:1] * 4, [None, "a", "b", "c"], max_new_tokens=10)
    assert len({g.text for g in base}) == 4
    stats = engine.stats()
    assert stats["prefills"] == 2 and stats["mixed_batches"] >= 9 and stats["largest_batch"] == 6
    # One adapter for the whole batch (the plain-matmul path) equals PEFT too.
    same = engine.generate(PROMPTS[:3], ["b"] * 3, max_new_tokens=10)
    assert [(g.text, g.completion_tokens) for g in same] == peft_answers(tiny_model, adapters, PROMPTS[:3],
                                                                         ["b"] * 3, 10)


def test_slots_are_lru_and_an_evicted_adapter_reloads_from_its_folder(tiny_model, adapters):
    engine = engine_with(tiny_model, adapters, names=("a", "b"), slots=2)
    before = {n: engine.generate(PROMPTS[:1], [n], 8)[0].text for n in ("b", "a")}  # "a" used last
    engine.load_adapter("c", adapters["c"])  # evicts "b", the least recently used
    assert sorted(engine.resident()) == ["a", "c"] and sorted(engine.adapters()) == ["a", "b", "c"]
    assert engine.stats()["evictions"] == 1
    assert engine.generate(PROMPTS[:1], ["b"], 8)[0].text == before["b"]  # read again from its folder
    assert engine.stats()["reloads"] == 1 and "b" in engine.resident()
    # Three adapters in one batch over two slots: rows wait for a slot, every answer is still right.
    mixed = engine.generate(PROMPTS[:3], ["a", "b", "c"], 8)
    roomy = engine_with(tiny_model, adapters).generate(PROMPTS[:3], ["a", "b", "c"], 8)
    assert mixed == roomy
    engine.unload_adapter("a")
    assert "a" not in engine.adapters() and "a" not in engine.resident()
    with pytest.raises(KeyError, match="'a' is not loaded"):
        engine.generate(PROMPTS[:1], ["a"], 2)
    # Unloaded while a row decodes with it: the row finishes with it, then its slot is freed.
    row = Row(PROMPTS[0], "b", Sampling(max_tokens=8), on_text=lambda _: engine.unload_adapter("b"))
    assert engine.run_batch([row])[0].text == before["b"]
    assert "b" not in engine.resident() and not engine.pool.doomed and engine.pool.names.count(None) == 2


def test_adapters_the_pool_cannot_serve_are_refused_by_name(tiny_model, adapters, tmp_path):
    engine = engine_with(tiny_model, adapters, names=("a",))
    corrupt = shutil.copytree(adapters["b"], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    cases = {
        str(corrupt): "cannot be read",
        make_adapter(tiny_model, str(tmp_path / "dora"), 4, 4, ["q_proj"], use_dora=True): "use_dora",
        make_adapter(tiny_model, str(tmp_path / "big"), 5, 32, ["q_proj"]): "rank 32 .* above max_adapter_rank",
        str(tmp_path): "no adapter_config.json",
    }
    for path, reason in cases.items():
        with pytest.raises(AdapterFormatError, match=reason) as e:
            engine.load_adapter("bad", path)
        assert path in str(e.value)
    assert engine.adapters() == ["a"]
    assert engine.generate(PROMPTS[:1], ["a"], 4)[0].completion_tokens == 4  # the engine still serves
    attention_only = HFEngine(tiny_model, dtype="float32", max_adapters=1, target_modules=("q_proj", "v_proj"))
    with pytest.raises(AdapterFormatError, match="down_proj is not one this engine applies LoRA to"):
        attention_only.load_adapter("b", adapters["b"])


def test_an_adapter_broken_after_eviction_fails_its_row_only(tiny_model, adapters, tmp_path):
    broken = shutil.copytree(adapters["b"], tmp_path / "b")
    engine = engine_with(tiny_model, {**adapters, "b": str(broken)}, names=("b", "a", "c"), slots=2)
    assert "b" not in engine.resident()
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    rows = [Row(p, name, Sampling(max_tokens=4)) for p, name in zip(PROMPTS, ["b", "a", None])]
    results = run_continuously(engine, rows)
    assert isinstance(results[0], AdapterFormatError) and "cannot be read" in str(results[0])
    assert [r.completion_tokens for r in results[1:]] == [4, 4]


# -- the decode loop --------------------------------------------------------------------------------------------
def run_continuously(engine: HFEngine, rows: list[Row], arrivals: dict[int, list[Row]] | None = None) -> list:
    """Rows through `run_continuous`; `arrivals`: more rows handed over at the n-th call of `take`."""
    done, calls = {}, [0]
    for row in rows + [r for more in (arrivals or {}).values() for r in more]:
        row.done = lambda result, row=row: done.setdefault(id(row), (len(done), result))

    def take(n: int) -> list[Row]:
        calls[0] += 1
        return rows if calls[0] == 1 else (arrivals or {}).get(calls[0], [])

    engine.run_continuous(take, max_rows=8)
    order = sorted(done.values(), key=lambda x: x[0])
    assert len(order) == len(rows) + sum(len(m) for m in (arrivals or {}).values())
    return [done[id(r)][1] for r in rows + [r for more in (arrivals or {}).values() for r in more]]


def test_a_row_that_arrives_mid_answer_joins_and_finishes_first(tiny_model, adapters):
    engine = engine_with(tiny_model, adapters)
    long = Row(PROMPTS[0], "b", Sampling(max_tokens=24))
    short = Row(PROMPTS[3], "a", Sampling(max_tokens=3))
    long_gen, short_gen = run_continuously(engine, [long], {4: [short]})  # after the long row's 3rd step
    assert long_gen.finish_reason == "length" and long_gen.completion_tokens == 24
    assert short_gen.completion_tokens == 3
    assert engine.stats()["prefills"] == 2 and engine.stats()["largest_batch"] == 2
    # The same answers as decoding each alone and both in one batch from the start.
    alone = [engine.run_batch([Row(p, n, Sampling(max_tokens=k))])[0]
             for p, n, k in ((PROMPTS[0], "b", 24), (PROMPTS[3], "a", 3))]
    together = engine.run_batch([Row(PROMPTS[0], "b", Sampling(max_tokens=24)),
                                 Row(PROMPTS[3], "a", Sampling(max_tokens=3))])
    assert [long_gen, short_gen] == alone == together


def test_a_request_submitted_while_another_decodes_does_not_wait_for_it(tiny_model, adapters):
    """Two threads, as in Serve: the decode loop, and a caller that submits once the long answer streams."""
    engine = engine_with(tiny_model, adapters)
    waiting: queue.Queue = queue.Queue()
    events: list[str] = []
    started = threading.Event()
    long = Row(PROMPTS[1], None, Sampling(max_tokens=64), on_text=lambda _: started.set(),
               done=lambda gen: events.append(f"long:{gen.finish_reason}"))
    short = Row(PROMPTS[2], "c", Sampling(max_tokens=2), done=lambda gen: events.append(f"short:{gen.finish_reason}"))

    def take(n: int) -> list[Row]:
        rows = []
        while len(rows) < n and not waiting.empty():
            rows.append(waiting.get_nowait())
        return rows

    waiting.put(long)
    loop = threading.Thread(target=engine.run_continuous, args=(take, 8))
    loop.start()
    assert started.wait(60)
    waiting.put(short)
    loop.join(120)
    assert events == ["short:length", "long:length"]


def test_sampling_stop_strings_streaming_and_cancel_per_row(tiny_model, adapters):
    engine = engine_with(tiny_model, adapters)
    sampled = Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = engine.run_batch([Row(PROMPTS[0], "a", sampled)])[0].text
    mixed = engine.run_batch([Row(PROMPTS[1], "b"), Row(PROMPTS[0], "a", sampled), Row(PROMPTS[2], None, sampled)])
    assert mixed[1].text == alone  # a row's sample does not depend on its batch
    other = engine.run_batch([Row(PROMPTS[0], "a", Sampling(12, 1.0, 0.9, seed=8))])[0].text
    assert other != alone

    full = engine.run_batch([Row(PROMPTS[4], "c", Sampling(max_tokens=12))])[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    pieces: list[str] = []
    cut = engine.run_batch([Row(PROMPTS[4], "c", Sampling(max_tokens=12, stop=(stop,)), on_text=pieces.append)])[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)] and "".join(pieces) == cut.text

    cancelled = Row(PROMPTS[5], "b", Sampling(max_tokens=30))
    cancelled.on_text = lambda _: cancelled.cancelled.set()  # the caller goes away after its first text
    gens = engine.run_batch([cancelled, Row(PROMPTS[3], None, Sampling(max_tokens=8))])
    assert gens[0].finish_reason == "cancelled" and gens[0].completion_tokens < 30
    assert gens[1] == engine.run_batch([Row(PROMPTS[3], None, Sampling(max_tokens=8))])[0]
    assert engine.stats()["rows_cancelled"] == 1


def test_a_grammar_row_decodes_under_its_grammar_beside_a_free_row(tiny_model, adapters):
    pytest.importorskip("xgrammar")
    engine = engine_with(tiny_model, adapters)
    tool = {"name": "PickCity", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["SF", "NYC"]}}, "required": ["city"]}}
    spec = {"type": "tool_calls", "tools": [tool], "parallel": False}
    gens = engine.generate(PROMPTS[:2], ["b", "a"], max_new_tokens=48, constraints=[spec, None])
    assert gens[0].finish_reason == "stop", gens[0]
    body = gens[0].text.removeprefix("<tool_call>").removesuffix("</tool_call>")
    assert json.loads(body)["name"] == "PickCity" and json.loads(body)["arguments"]["city"] in ("SF", "NYC")
    assert gens[1] == engine.generate(PROMPTS[1:2], ["a"], max_new_tokens=48)[0]


# -- the node's adapter cache (tier 2) -----------------------------------------------------------------------------
def test_remote_adapters_are_copied_to_the_node_once(tiny_model, adapters, tmp_path, monkeypatch):
    from conftest import fake_aws_credentials, moto_s3

    from flywheel.serve.student import AdapterCache
    from flywheel.storage import Store

    fake_aws_credentials(monkeypatch)
    with moto_s3("flywheel-test") as endpoint:
        monkeypatch.setenv("FLYWHEEL_S3_ENDPOINT", endpoint)
        store = Store("s3://flywheel-test/home")
        store.upload(adapters["a"], "adapters/sgd_Flights/v1")
        entry = {"version": "v1", "adapter": "adapters/sgd_Flights/v1"}
        caches = [AdapterCache(store, str(tmp_path / "cache")) for _ in range(2)]  # two replicas on one node
        first = caches[0].path(entry)
        assert first.startswith(str(tmp_path / "cache")) and os.path.exists(os.path.join(first, "adapter_config.json"))
        assert caches[1].path(entry) == first and caches[0].copies + caches[1].copies == 1
        shutil.rmtree(first)  # a copy that went away is fetched again
        assert caches[1].path(entry) == first and caches[1].copies == 1
        # a bounded cache deletes the least recently used copy, never the one it just copied
        store.upload(adapters["b"], "adapters/sgd_Hotels/v1")
        other = {"version": "v1", "adapter": "adapters/sgd_Hotels/v1"}
        size = sum(os.path.getsize(os.path.join(first, f)) for f in os.listdir(first))
        bounded = AdapterCache(store, str(tmp_path / "cache"), max_bytes=size + size // 2, grace_s=0)
        second = bounded.path(other)
        assert not os.path.exists(first) and os.path.exists(os.path.join(second, "adapter_config.json"))
        assert bounded.pruned == 1
        recent = AdapterCache(store, str(tmp_path / "cache"), max_bytes=size + size // 2, grace_s=600)
        assert recent.path(entry) == first and os.path.exists(second)  # used within grace_s: kept, over the bound
        assert recent.pruned == 0 and recent.copies == 1
        # a copy a replica holds (its adapter is loaded, and the engine may read the folder again) is never pruned
        held, release = recent.hold(entry)
        pruner = AdapterCache(store, str(tmp_path / "cache"), max_bytes=size + size // 2, grace_s=0)
        store.upload(adapters["b"], "adapters/sgd_Hotels/v2")
        pruner.path({"version": "v2", "adapter": "adapters/sgd_Hotels/v2"})
        assert held == first and os.path.exists(os.path.join(held, "adapter_config.json")) and pruner.pruned == 1
        release()  # unloaded: the next copy may prune it
        store.upload(adapters["a"], "adapters/sgd_Buses/v1")
        pruner.path({"version": "v1", "adapter": "adapters/sgd_Buses/v1"})
        assert not os.path.exists(held)
    local = Store(str(tmp_path / "home"))
    local.upload(adapters["a"], "adapters/x/v1")
    assert AdapterCache(local, str(tmp_path / "unused")).path({"adapter": "adapters/x/v1"}) == \
        local.path("adapters/x/v1")  # a local home is read in place


# -- log-probabilities -------------------------------------------------------------------------------------------
def _forced_logprobs(model_path: str, adapter: str | None, prompt_ids: list[int], answer: list[int]) -> list[float]:
    """Each answer token's log-probability from one teacher-forced forward pass of PEFT's model (no cache)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        logits = model.eval()(torch.tensor([prompt_ids + answer])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    return [float(logprobs[i, t]) for i, t in enumerate(answer)]


def test_logprobs_in_a_mixed_batch_equal_a_forward_pass(tiny_model, adapters):
    engine = engine_with(tiny_model, adapters)
    names = ["a", None, "b"]
    rows = [Row(PROMPTS[i], n, Sampling(12, top_logprobs=3)) for i, n in enumerate(names)]
    gens = engine.run_batch(rows)
    for i, (gen, name) in enumerate(zip(gens, names)):
        assert len(gen.tokens) == len(gen.logprobs) == len(gen.token_ends) == gen.completion_tokens > 0
        expected = _forced_logprobs(tiny_model, adapters[name] if name else None, engine.encode(PROMPTS[i]),
                                    list(gen.tokens))
        assert max(abs(a - b) for a, b in zip(gen.logprobs, expected)) < 1e-4, (gen.logprobs, expected)
        assert gen.token_ends[-1] == len(gen.text)
        for token, logprob, top in zip(gen.tokens, gen.logprobs, gen.top_logprobs):
            assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - logprob) < 1e-6  # greedy = most likely
            assert top[0][1] >= top[1][1] >= top[2][1]


def test_logprobs_are_taken_after_the_grammar_mask(tiny_model, adapters):
    pytest.importorskip("xgrammar")
    from flywheel.inference.confidence import answer_confidence

    engine = engine_with(tiny_model, adapters)
    tool = {"name": "PickCity", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["SF", "NYC"]}}, "required": ["city"]}}
    gen = engine.generate(PROMPTS[:1], ["b"], max_new_tokens=48,
                          constraints=[{"type": "tool_calls", "tools": [tool], "parallel": False}])[0]
    assert gen.finish_reason == "stop", gen
    # After the mask, each token's probability is renormalised over what the grammar allows: never below the raw
    # model's, and ~1 where the grammar leaves one token (the random model alone would rarely write it).
    raw = _forced_logprobs(tiny_model, adapters["b"], engine.encode(PROMPTS[0]), list(gen.tokens))
    assert all(post >= r - 1e-4 for post, r in zip(gen.logprobs, raw))
    assert sum(post > -1e-4 and r < -0.5 for post, r in zip(gen.logprobs, raw)) >= 5
    conf = answer_confidence(gen.text, gen.token_ends, gen.logprobs)
    assert set(conf["arguments"]) == {"city"} and 0 < conf["arguments"]["city"] <= 1
    assert conf["aggregates"]["product"] <= conf["aggregates"]["min"] <= 1


TOOLS_BLOCK = "Tools:\n" + "\n".join(f"Tool{i}(city*, date =2019-03-0{i % 9 + 1}) - finds things in a city"
                                     for i in range(12))
SHARED = [[{"role": "system", "content": TOOLS_BLOCK}, *p] for p in PROMPTS[:4]]


def test_rows_of_one_adapter_compute_their_common_prompt_prefix_once(tiny_model, adapters):
    engine = engine_with(tiny_model, adapters)
    rows = [Row(p, "b", Sampling(10, top_logprobs=2)) for p in SHARED]
    gens = engine.run_batch(rows)
    stats = engine.stats()
    prompts = [engine.encode(p) for p in SHARED]
    prefix = next(i for i, col in enumerate(zip(*prompts)) if len(set(col)) > 1)
    assert prefix > 100 and stats["prefill_tokens_shared"] == prefix * 3
    assert [(g.text, g.completion_tokens) for g in gens] == peft_answers(tiny_model, adapters, SHARED, ["b"] * 4, 10)
    for gen, prompt in zip(gens, prompts):
        expected = _forced_logprobs(tiny_model, adapters["b"], prompt, list(gen.tokens))
        assert max(abs(a - b) for a, b in zip(gen.logprobs, expected)) < 1e-4
    # different adapters: the prefix's keys and values differ, nothing is shared
    engine.run_batch([Row(p, name, Sampling(4)) for p, name in zip(SHARED, ["a", "b", "a", None])])
    assert engine.stats()["prefill_tokens_shared"] == prefix * 3


def test_answers_are_batched_by_system_turn_and_returned_in_the_callers_order(tiny_model, adapters):
    from flywheel.inference.answers import by_system_turn, generate_answers

    other = [[{"role": "system", "content": "Tools:\nOther(x)"}, *p] for p in PROMPTS[:2]]
    mixed = [SHARED[0], other[0], SHARED[1], other[1], SHARED[2]]
    assert by_system_turn(mixed) == [0, 2, 4, 1, 3]
    engine = engine_with(tiny_model, adapters)
    run = generate_answers(engine, mixed, "b", 3, 6)
    # the first batch of three is all one tools block, so two of its rows reuse its prefix
    assert engine.stats()["prefill_tokens_shared"] > 0
    alone = [generate_answers(engine_with(tiny_model, adapters), [p], "b", 1, 6)["answers"][0] for p in mixed]
    assert run["answers"] == alone


def test_evaluation_copies_an_s3_adapter_into_a_folder_of_its_own(tiny_model, adapters, s3_home):
    """Not Serve's node cache (whose pruning could delete it mid-evaluation) nor a fixed path two evaluations share;
    removed with the engine that reads it."""
    import gc
    import glob
    import tempfile

    from flywheel.config import EvaluateConfig
    from flywheel.evaluate.run import _load
    from flywheel.registry.registry import Registry
    from flywheel.storage import Store

    store = Store(s3_home)
    store.upload(adapters["a"], "adapters/x/v1")
    pattern = os.path.join(tempfile.gettempdir(), "flywheel-evaluate-*")
    before, entry = set(glob.glob(pattern)), {"version": "v1", "adapter": "adapters/x/v1"}
    engine = HFEngine(tiny_model, dtype="float32")
    for _ in range(2):  # the second call finds it loaded: no second copy
        assert _load(EvaluateConfig(agent="x"), store, Registry(store), engine, entry) == "x@v1"
    [scratch] = set(glob.glob(pattern)) - before
    assert os.path.exists(os.path.join(scratch, "adapter", "adapter_config.json"))
    assert engine.generate(PROMPTS[:1], ["x@v1"], max_new_tokens=4)[0].text is not None
    del engine
    gc.collect()
    assert not os.path.exists(scratch)


def test_a_base_model_on_s3_is_copied_once_per_node_and_answers_as_the_local_one(tiny_model, s3_home, tmp_path,
                                                                                 monkeypatch):
    from flywheel.models import local_model, resolve_model_path
    from flywheel.storage import Store

    monkeypatch.setenv("FLYWHEEL_MODEL_CACHE", str(tmp_path / "models"))
    Store(s3_home).upload(tiny_model, "models/tiny")
    uri = f"{s3_home}/models/tiny"
    assert resolve_model_path(uri) == uri  # shipped to workers as the URI, not as a driver path
    copy = local_model(uri)
    assert copy.startswith(str(tmp_path / "models")) and local_model(uri) == copy
    assert len(os.listdir(tmp_path / "models")) == 2  # one copy (and the cache's lock file)
    prompts = PROMPTS[:2]
    assert [g.text for g in HFEngine(uri, dtype="float32").generate(prompts, [None, None], max_new_tokens=8)] == \
        [g.text for g in HFEngine(tiny_model, dtype="float32").generate(prompts, [None, None], max_new_tokens=8)]
    with pytest.raises(FileNotFoundError, match="config.json"):
        local_model(f"{s3_home}/models/missing")
