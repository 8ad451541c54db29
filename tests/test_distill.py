"""Distillation that holds up: logit distillation, DeepSpeed ZeRO on CPU, a killed worker, gradient accumulation;
and the training levers: early stopping on the validation loss, an init adapter, several agents' data at once.

The first are real Ray Train runs (2 workers over gloo), the levers run in this process (Ray Train's local mode,
`num_workers` 0, no Ray), all on a tiny random model with the student's tokenizer.
"""

import json
import math
import os
import shutil

import pytest
import torch

from flywheel.capture.store import ingest_file
from flywheel.config import ConfigError, CurateConfig, DistillConfig
from flywheel.curate.pipeline import curate
from flywheel.distill.data import answer_logits, answer_loss, kd_loss
from flywheel.distill.train import distill
from flywheel.registry.registry import Registry


@pytest.fixture
def curated(ray_session, store, sgd_sample):
    ingest_file(store, sgd_sample)
    return curate(CurateConfig(agents=("sgd_Flights",), min_examples=4), store)["sgd_Flights"]


def small(tiny_model: str, **kw) -> DistillConfig:
    return DistillConfig(**{"agent": "sgd_Flights", "base_model": tiny_model, "num_workers": 2, "batch_size": 2,
                            "max_length": 1024, **kw})


def test_kd_loss_matches_a_hand_computed_example():
    student = torch.tensor([[0.0, 0.0]])  # p_s = (1/2, 1/2) at any temperature
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p_t = (3/4, 1/4); KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    assert float(kd_loss(student, teacher, 1.0)) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    # T = 2: p_t = (sqrt3, 1) / (sqrt3 + 1); the loss is scaled by T^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert float(kd_loss(student, teacher, 2.0)) == pytest.approx(expected, abs=1e-6)
    # identical distributions: zero; mean over tokens
    assert float(kd_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)
    two = kd_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]), 1.0)
    assert float(two) == pytest.approx(float(kd_loss(student, teacher, 1.0)) / 2, abs=1e-6)


def test_answer_loss_mixes_cross_entropy_and_kd(tiny_model):
    from transformers import AutoModelForCausalLM

    from flywheel.distill.data import collate

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "answer_len": 2}, {"input_ids": [3, 4, 5], "answer_len": 1}], 0)
    ce, n = answer_loss(model, batch)
    assert n == 3
    same, _ = answer_loss(model, batch, teacher=model, kd_weight=0.25, temperature=2.0)  # KL to itself is 0
    assert float(same) == pytest.approx(0.75 * float(ce), rel=1e-5)
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    mixed, _ = answer_loss(model, batch, teacher=other.eval(), kd_weight=0.25, temperature=2.0)
    assert float(mixed) > float(same)


def test_a_teacher_with_another_tokenizer_is_rejected_before_training(curated, store, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    teacher = shutil.copytree(tiny_model, tmp_path / "teacher")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_tokens(["<not-in-the-student>"])
    tok.save_pretrained(teacher)
    with pytest.raises(ConfigError, match="tokenizer differs"):
        distill(small(tiny_model, teacher_model=str(teacher), max_steps=1), store)
    assert not store.exists("adapters/sgd_Flights/v1")


def test_token_level_distillation_trains_with_a_local_teacher(curated, store, tiny_model):
    out = distill(small(tiny_model, teacher_model=tiny_model, kd_weight=0.5, max_steps=2, num_workers=1), store)
    assert out["steps"] == 2 and out["version"] == "v1" and math.isfinite(out["loss"])


def test_a_worker_killed_once_resumes_from_the_last_checkpoint(curated, store, tiny_model):
    out = distill(small(tiny_model, max_steps=5, checkpoint_every=2, inject_failure_at_step=3,
                        run_name="drill"), store)
    # the last worker exited at step 3; the group restarted from the step-2 checkpoint and finished
    assert store.exists("checkpoints/drill/injected-failure-3.json")
    assert out["resumed_at"] == 2 and out["steps"] == 5 and out["version"] == "v1"
    # the run is tracked in MLflow (the local store under the home): hyperparameters, metrics, the adapter
    from mlflow.tracking import MlflowClient

    from flywheel.tracking import experiment_name, tracking_uri

    client = MlflowClient(tracking_uri(store))
    runs = client.search_runs([client.get_experiment_by_name(experiment_name("sgd_Flights")).experiment_id],
                              filter_string="tags.`flywheel.run_name` = 'drill'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["inject_failure_at_step"] == "3" and run.data.metrics["resumed_at"] == 2
    assert "adapter_model.safetensors" in {os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id,
                                                                                                   "adapter")}


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.extended), 3])  # ZeRO-3 gathers too
def test_deepspeed_zero_trains_on_cpu_with_accumulation_and_resumes(curated, store, tiny_model, stage):
    from safetensors.torch import load_file

    cfg = small(tiny_model, strategy="deepspeed", zero_stage=stage, grad_accum=2, max_steps=2, checkpoint_every=1,
                run_name=f"zero{stage}")
    out = distill(cfg, store)
    assert out["steps"] == 2 and math.isfinite(out["loss"])
    weights = load_file(os.path.join(store.path(f"adapters/sgd_Flights/{out['version']}"), "adapter_model.safetensors"))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(w.numel() > 0 for w in lora_b)  # gathered, not an empty ZeRO-3 shard
    assert any(float(w.float().abs().sum()) > 0 for w in lora_b)  # trained
    more = distill(DistillConfig(**{**cfg.__dict__, "max_steps": 3}), store)
    assert more["resumed_at"] == 2 and more["steps"] == 3


def test_workers_that_cannot_be_placed_fail_in_time_naming_what_holds_the_cluster(curated, store, tiny_model):
    """A fixed cluster whose free CPUs cannot hold the run (here an actor holds all but half a CPU, as a serving
    replica held a node's CPU on the test bed) fails within placement_timeout_s with what is free and who holds the
    rest, instead of waiting for good; once the holder is gone the same run trains."""
    import ray

    from flywheel.distill.placement import PlacementError

    @ray.remote
    class Holder:
        def ready(self):
            return True

    free = ray.available_resources().get("CPU", 0)
    holder = Holder.options(num_cpus=max(free - 0.5, 0.01)).remote()
    ray.get(holder.ready.remote())
    try:
        with pytest.raises(PlacementError) as e:
            distill(small(tiny_model, max_steps=1, num_workers=1, placement_timeout_s=3, run_name="unplaceable"),
                    store)
        message = str(e.value)
        assert "could not all be placed in 3 s" in message and "each asks 1 CPU" in message
        assert "free of" in message and "Holder" in message, message
    finally:
        ray.kill(holder)
    out = distill(small(tiny_model, max_steps=1, num_workers=1, placement_timeout_s=60, run_name="placed"), store)
    assert out["steps"] == 1
    with pytest.raises(ConfigError, match="placement_timeout_s"):
        small(tiny_model, placement_timeout_s=-1)


def test_strategy_and_kd_settings_are_validated():
    with pytest.raises(ConfigError, match="strategy"):
        DistillConfig(agent="a", strategy="fsdp9")
    with pytest.raises(ConfigError, match="zero_stage"):
        DistillConfig(agent="a", zero_stage=4)
    with pytest.raises(ConfigError, match="kd_weight"):
        DistillConfig(agent="a", kd_weight=1.5)


# -- in this process (Ray Train's local mode, num_workers 0): the training levers -----------------------------------
@pytest.fixture
def curated_here(store, sgd_sample):
    """sgd_Flights and sgd_Restaurants (40 logs each) curated in this process: no Ray."""
    ingest_file(store, sgd_sample)
    return curate(CurateConfig(agents=("sgd_Flights", "sgd_Restaurants")), store, executor="local")


def here(tiny_model: str, **kw) -> DistillConfig:
    return small(tiny_model, num_workers=0, bf16=False, tracking_uri="off", **kw)


def adapter_weights(store, entry: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(store.path(entry["adapter"]), "adapter_model.safetensors"))


def test_take_balanced_shares_the_cap_between_datasets():
    from flywheel.distill.data import take_balanced

    groups = {"a": [{"record_id": f"a{i}"} for i in range(50)], "b": [{"record_id": f"b{i}"} for i in range(6)]}
    out = take_balanced(groups, 20, seed=0)
    assert len(out) == 20 and sum(r["record_id"][0] == "b" for r in out) == 6  # b keeps all, a takes the rest
    assert out == take_balanced(groups, 20, seed=0) and len(take_balanced(groups, 0, seed=0)) == 56


def test_early_stopping_on_validation_loss_keeps_the_best_adapter(curated_here, store, tiny_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.datasets import VALIDATION, read_split
    from flywheel.distill.data import encode, mean_answer_loss

    # lr 1000 saturates the tiny model's outputs within two steps: the validation loss stops going down
    out = distill(here(tiny_model, max_steps=8, learning_rate=1000.0, validation_every=1, early_stopping_patience=2,
                       run_name="stop"), store)
    history = out["validation_history"]
    assert out["stopped_at"] == out["steps"] < 8 and len(history) == out["steps"]
    best_step, best = min(history, key=lambda h: (h[1], h[0]))
    assert (out["best_step"], out["validation_loss"]) == (best_step, best) and best_step < out["stopped_at"]
    assert out["adapter_from"] == "best validation loss"
    # the registered adapter is the best one: its validation loss is the recorded best, and it is not the last step's
    entry = Registry(store).get("sgd_Flights", out["version"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    val = [e for e in (encode(tok, ex, 1024, 10) for ex in
                       read_split(store, "sgd_Flights", entry["dataset_version"], VALIDATION).to_pylist()) if e]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), store.path(entry["adapter"]))
    total, tokens = mean_answer_loss(model.eval(), val, tok.pad_token_id, 2)
    assert total / tokens == pytest.approx(best, rel=1e-4)
    last = load_file(store.path("checkpoints/stop/local-checkpoint/adapter/adapter_model.safetensors"))
    registered = adapter_weights(store, entry)
    assert registered.keys() == last.keys() and any(not torch.equal(registered[k], last[k]) for k in last)


def test_a_shared_adapter_trains_on_several_agents_from_an_init_adapter(curated_here, store, tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    seed = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in seed.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a start no fresh adapter has (B is zero there)
    seed.save_pretrained(str(tmp_path / "seed"))
    Registry(store).register("seed", str(tmp_path / "seed"), {})
    lora = {"lora_r": 4, "lora_alpha": 8, "target_modules": ("q_proj", "v_proj")}
    with pytest.raises(ConfigError, match="init_adapter.*r=4.*lora_r=8"):  # before any training
        distill(here(tiny_model, init_adapter="seed@v1", **{**lora, "lora_r": 8}), store)
    with pytest.raises(ConfigError, match="init_adapter.*neither"):
        distill(here(tiny_model, init_adapter="no-such-folder"), store)

    out = distill(here(tiny_model, agent="shared", datasets=("sgd_Flights", "sgd_Restaurants@latest"),
                       max_examples=30, init_adapter="seed@v1", learning_rate=1e-6, max_steps=1, **lora), store)
    assert out["train_examples"] == 30 and out["version"] == "v1"
    assert [d["agent"] for d in out["datasets"]] == ["sgd_Flights", "sgd_Restaurants"]
    assert {d["version"] for d in out["datasets"]} == {m["version"] for m in curated_here.values()}
    trained, start = adapter_weights(store, Registry(store).get("shared", "v1")), adapter_weights(
        store, Registry(store).get("seed", "v1"))
    assert trained.keys() == start.keys()
    lora_b = [k for k in start if "lora_B" in k]
    assert all(torch.allclose(trained[k], start[k], atol=1e-4) for k in lora_b)  # one tiny step from the seed
    assert all(float(trained[k].abs().sum()) > 1.0 for k in lora_b)  # not a fresh zero B


def test_an_adapter_trained_on_json_tools_is_scored_with_json_tools(curated_here, store, tiny_model):
    from transformers import AutoTokenizer

    from flywheel.config import EvaluateConfig
    from flywheel.datasets import TRAIN, read_split
    from flywheel.distill.data import encode
    from flywheel.evaluate.run import evaluate

    example = read_split(store, "sgd_Flights", curated_here["sgd_Flights"]["version"], TRAIN).to_pylist()[0]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    compact, as_json = (encode(tok, example, 8192, 10, fmt) for fmt in ("signatures", "json"))
    assert len(as_json["input_ids"]) > len(compact["input_ids"]) and as_json["answer_len"] == compact["answer_len"]
    out = distill(here(tiny_model, max_steps=1, tool_format="json", run_name="json-tools"), store)
    assert Registry(store).get("sgd_Flights", out["version"])["hyperparameters"]["tool_format"] == "json"
    rep = evaluate(EvaluateConfig(agent="sgd_Flights", base_model=tiny_model, adapter_version=out["version"],
                                  max_new_tokens=4, max_examples=3, in_context_k=0, constrained=False,
                                  tracking_uri="off"), store)
    assert rep["tool_format"] == "json" and rep["candidate"]["n"] == 3


def test_argument_tokens_weigh_more_in_the_training_loss_and_only_there(curated_here, store, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.datasets import TRAIN, read_split
    from flywheel.distill.data import collate, encode
    from flywheel.prompts import format_answer, format_with_spans

    calls = [{"name": "Find", "arguments": '{"city": "Paris", "note": "a \\"quoted\\" }"}'},
             {"name": "B", "arguments": ""}]
    text, spans = format_with_spans({"tool_calls": calls})
    assert text == format_answer({"tool_calls": calls}) == \
        '<tool_call>{"name": "Find", "arguments": {"city": "Paris", "note": "a \\"quoted\\" }"}}</tool_call>\n' \
        '<tool_call>{"name": "B", "arguments": {}}</tool_call>'
    assert [text[a:b] for a, b in spans] == ['{"city": "Paris", "note": "a \\"quoted\\" }"}', "{}"]
    assert format_with_spans({"content": " plain text, no call "}) == ("plain text, no call", [])
    examples = read_split(store, "sgd_Flights", curated_here["sgd_Flights"]["version"], TRAIN).to_pylist()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    plain, weighted = encode(tok, examples[0], 8192, 10), encode(tok, examples[0], 8192, 10, argument_weight=3.0)
    assert "answer_weights" not in plain and weighted["input_ids"] == plain["input_ids"]
    answer = weighted["input_ids"][-weighted["answer_len"]:]
    heavy = tok.decode([t for t, w in zip(answer, weighted["answer_weights"]) if w == 3.0])
    light = tok.decode([t for t, w in zip(answer, weighted["answer_weights"]) if w == 1.0])
    args = json.loads(examples[0]["target"]["tool_calls"][0]["arguments"])
    assert args and all(str(v) in heavy for v in args.values()) and heavy.strip().startswith("{")
    assert "<tool_call>" in light and examples[0]["target"]["tool_calls"][0]["name"] in light
    assert not any(f"\"{k}\"" in light for k in args)  # every argument key and value is weighted

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ones = collate([{**weighted, "answer_weights": [1.0] * weighted["answer_len"]}], tok.pad_token_id)
    assert float(answer_loss(model, ones)[0]) == pytest.approx(float(answer_loss(model, collate([plain], tok.pad_token_id))[0]))
    batch = collate([weighted], tok.pad_token_id)
    logits, targets = answer_logits(model, batch)
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    w = torch.tensor(weighted["answer_weights"])
    assert float(answer_loss(model, batch)[0]) == pytest.approx(float((per_token * w).sum() / w.sum()), rel=1e-5)

    for bad in (0.5, float("nan"), 1000):
        with pytest.raises(ConfigError, match="argument_weight"):
            DistillConfig(agent="a", argument_weight=bad)
    out = distill(here(tiny_model, max_steps=1, argument_weight=4.0, run_name="weighted"), store)
    assert Registry(store).get("sgd_Flights", out["version"])["hyperparameters"]["argument_weight"] == 4.0


def _example(eid: str, user: str, name: str, args: dict) -> dict:
    return {"example_id": eid, "record_id": eid, "messages": [{"role": "user", "content": user}],
            "target": {"role": "assistant", "content": None,
                       "tool_calls": [{"id": "c", "name": name, "arguments": json.dumps(args)}]}}


def test_value_swaps_change_a_stated_value_in_the_conversation_and_the_call_alike():
    from flywheel.distill.data import swap_values

    examples = [_example("a", "A table at Thai Basil in San Jose, thai food please.", "Reserve",
                         {"restaurant_name": "Thai Basil", "location": "San Jose", "category": "Thai", "seats": "4",
                          "date": "2019-03-01"}),
                _example("b", "Somewhere in Oakland.", "Reserve",
                         {"restaurant_name": "Kiku Sushi", "location": "Oakland", "category": "Sushi", "seats": "2",
                          "date": "2019-03-02"}),
                _example("c", "Book it for me.", "Reserve", {"restaurant_name": "Basil"}),  # nothing stated
                _example("d", "I'd like Kiku Sushi.", "Other", {"restaurant_name": "Kiku Sushi"})]  # one value only
    out = swap_values(examples, 2, seed=0)
    assert out[:4] == examples  # the originals come first, untouched
    variants = out[4:]
    assert [v["example_id"] for v in variants] == ["a~swap0", "a~swap1", "b~swap0", "b~swap1"]
    for v in variants[:2]:
        user = v["messages"][0]["content"]
        args = json.loads(v["target"]["tool_calls"][0]["arguments"])
        # every stated value comes from the same argument's other values; unstated and short ones stay
        assert args == {"restaurant_name": "Kiku Sushi", "location": "Oakland", "category": "Sushi", "seats": "4",
                        "date": "2019-03-01"}
        assert user == "A table at Kiku Sushi in Oakland, Sushi food please."  # "thai" too: matched without case
    b = json.loads(variants[2]["target"]["tool_calls"][0]["arguments"])
    assert b["location"] == "San Jose" and b["restaurant_name"] == "Kiku Sushi"  # not stated in b: kept
    assert variants[2]["messages"][0]["content"] == "Somewhere in San Jose."
    assert swap_values(examples, 0, seed=0) == examples
    with pytest.raises(ConfigError, match="value_swaps"):
        DistillConfig(agent="a", value_swaps=11)


def test_value_swaps_add_training_examples_only(curated_here, store, tiny_model):
    from flywheel.datasets import TRAIN, read_split
    from flywheel.distill.data import swap_values

    version = curated_here["sgd_Flights"]["version"]
    examples = read_split(store, "sgd_Flights", version, TRAIN).to_pylist()
    variants = swap_values(examples, 1, seed=0)[len(examples):]
    assert variants, "the SGD sample states cities and airlines verbatim: some examples must get a variant"
    for v in variants:
        original = next(e for e in examples if e["example_id"] == v["example_id"].removesuffix("~swap0"))
        assert v["target"] != original["target"] and v["messages"] != original["messages"]
    plain = distill(here(tiny_model, max_steps=1, run_name="plain"), store)
    swapped = distill(here(tiny_model, max_steps=1, value_swaps=1, run_name="swapped"), store)
    assert swapped["train_examples"] == plain["train_examples"] + len(variants)
    assert Registry(store).get("sgd_Flights", swapped["version"])["hyperparameters"]["value_swaps"] == 1


def _lora(tiny_model: str, attention: str = "sdpa"):
    """The tiny model with a LoRA whose B is not zero (so the adapter changes the logits and has gradients)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                                attn_implementation=attention),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_rows_sharing_their_tools_block_give_the_plain_loss_and_gradients_from_fewer_computed_tokens(
        curated_here, store, tiny_model):
    from transformers import AutoTokenizer

    from flywheel.datasets import TRAIN, read_split
    from flywheel.distill.answers import Answers
    from flywheel.distill.data import collate, encode, length_buckets, mean_answer_loss, shared_prefix_len

    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = read_split(store, "sgd_Flights", curated_here["sgd_Flights"]["version"], TRAIN).to_pylist()
    encoded = [encode(tok, ex, 8192, 10, argument_weight=2.0) for ex in examples]
    batches = length_buckets(encoded, 3, seed=1)
    assert sorted(id(x) for b in batches for x in b) == sorted(id(x) for x in encoded)  # each example once
    assert all(len({x["prefix_key"] for x in b}) == 1 for b in batches)
    batch = max(batches, key=shared_prefix_len)
    assert len(batch) == 3 and shared_prefix_len(batch) > 300  # the tools block
    model = _lora(tiny_model)
    results = []
    for share in (False, True):
        inputs = collate(batch, tok.pad_token_id, share_prefix=share)
        assert ("prefix_ids" in inputs) is share
        loss, n = answer_loss(Answers(model), inputs)
        loss.backward()
        results.append((float(loss), n, inputs["computed_tokens"],
                        {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad()
    (plain, n_plain, cost_plain, g_plain), (shared, n_shared, cost_shared, g_shared) = results
    assert n_shared == n_plain and shared == pytest.approx(plain, rel=1e-5)
    assert g_plain.keys() == g_shared.keys() and len(g_plain) == 12  # 2 layers x 3 modules x A, B
    for k in g_plain:
        assert torch.allclose(g_shared[k], g_plain[k], rtol=1e-4, atol=1e-6), k
    real = sum(len(x["input_ids"]) for x in batch)
    assert cost_plain == real and cost_shared == real - 2 * shared_prefix_len(batch)
    # validation loss: the same sum either way, however the examples come
    with torch.no_grad():
        one_by_one = mean_answer_loss(model, encoded[::-1], tok.pad_token_id, 1)
        grouped = mean_answer_loss(model, encoded, tok.pad_token_id, 4)
    assert grouped[1] == one_by_one[1] and grouped[0] == pytest.approx(one_by_one[0], rel=1e-5)


def test_the_attention_training_uses_on_cpu_gives_sdpas_loss_and_gradients(curated_here, store, tiny_model):
    """Training loads the model with `hardware.training_attention("cpu")` (plain matmul attention, faster backward
    on CPU than the fused SDPA kernel): the same loss and gradients as SDPA, with a shared prefix and without."""
    from transformers import AutoTokenizer

    from flywheel.datasets import TRAIN, read_split
    from flywheel.distill.answers import Answers
    from flywheel.distill.data import collate, encode, length_buckets, shared_prefix_len
    from flywheel.hardware import training_attention

    assert training_attention("cpu") == "eager" and training_attention("cuda") == "sdpa"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = read_split(store, "sgd_Flights", curated_here["sgd_Flights"]["version"], TRAIN).to_pylist()
    batch = max(length_buckets([encode(tok, ex, 8192, 10) for ex in examples], 3, seed=1), key=shared_prefix_len)
    for share in (False, True):
        inputs = collate(batch, tok.pad_token_id, share_prefix=share)
        results = []
        for attention in ("sdpa", training_attention("cpu")):
            model = _lora(tiny_model, attention)
            loss, _ = answer_loss(Answers(model), inputs)
            loss.backward()
            results.append((float(loss), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
        (fused, g_fused), (plain, g_plain) = results
        assert plain == pytest.approx(fused, rel=1e-5)
        assert g_plain.keys() == g_fused.keys() and g_plain
        for k in g_plain:
            assert torch.allclose(g_plain[k], g_fused[k], rtol=1e-4, atol=1e-6), (share, k)


def test_a_shared_prefix_stops_before_any_rows_answer():
    from flywheel.distill.data import MIN_SHARED_PREFIX, shared_prefix_len

    head = list(range(100, 100 + MIN_SHARED_PREFIX + 8))
    short = {"input_ids": head + [1, 2], "answer_len": 2}  # its prompt is all of `head`
    longer = {"input_ids": head + [1, 2, 3, 4, 5], "answer_len": 1}  # begins with all of `short`
    assert shared_prefix_len([short, longer]) == len(head) - 1  # `short`'s last prompt token stays its own
    assert shared_prefix_len([short]) == 0
    assert shared_prefix_len([{"input_ids": [7] + head + [1], "answer_len": 1}, longer]) == 0
    tiny = {"input_ids": head[:MIN_SHARED_PREFIX - 1] + [9, 9], "answer_len": 1}
    assert shared_prefix_len([tiny, longer]) == 0  # too short to be worth a pass of its own


def test_a_local_init_adapter_travels_through_an_s3_home(tiny_model, s3_home, tmp_path):
    """Train workers of an s3:// home may run on nodes without the driver's folders: the folder is uploaded once."""
    from flywheel.distill.train import resolve_init_adapter
    from flywheel.storage import Store

    from serving import make_adapter

    folder = make_adapter(tiny_model, str(tmp_path / "seed"), seed=0)
    cfg = DistillConfig(agent="a", base_model=tiny_model, init_adapter=folder, lora_r=4,
                        target_modules=("q_proj", "v_proj"))
    remote, local = Store(s3_home), Store(str(tmp_path / "home"))
    init = resolve_init_adapter(cfg, remote)
    assert set(init) == {"rel"} and remote.read_json(f"{init['rel']}/adapter_config.json")["r"] == 4
    assert resolve_init_adapter(cfg, remote) == init  # the same contents: the same upload
    assert resolve_init_adapter(cfg, local) == {"path": folder}  # one machine: read in place
