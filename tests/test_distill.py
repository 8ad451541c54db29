"""Distillation that holds up: logit distillation, DeepSpeed ZeRO on CPU, a killed worker, gradient accumulation.

Every run is a real Ray Train run (2 workers over gloo) on a tiny random model with the student's tokenizer.
"""

import math
import os
import shutil

import pytest
import torch

from flywheel.capture.store import ingest_file
from flywheel.config import ConfigError, CurateConfig, DistillConfig
from flywheel.curate.pipeline import curate
from flywheel.distill.data import answer_loss, kd_loss
from flywheel.distill.train import distill


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


@pytest.mark.parametrize("stage", [2, 3])
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


def test_strategy_and_kd_settings_are_validated():
    with pytest.raises(ConfigError, match="strategy"):
        DistillConfig(agent="a", strategy="fsdp9")
    with pytest.raises(ConfigError, match="zero_stage"):
        DistillConfig(agent="a", zero_stage=4)
    with pytest.raises(ConfigError, match="kd_weight"):
        DistillConfig(agent="a", kd_weight=1.5)
