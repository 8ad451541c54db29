"""One test per stage on the shared local Ray: curate, distill, evaluate (tiny model, real code paths)."""

import json
import os

import pyarrow.parquet as pq
import pytest

from flywheel.capture.store import LogStore, ingest_file
from flywheel.config import CurateConfig, DistillConfig, EvaluateConfig
from flywheel.curate.pipeline import curate
from flywheel.datasets import SPLITS, TEST, TRAIN, read_split
from flywheel.registry.registry import Registry

from conftest import SGD_LOGS


@pytest.fixture
def curated(ray_session, store, sgd_sample):
    ingest_file(store, sgd_sample)
    return curate(CurateConfig(agents=("sgd_Flights",), min_examples=4), store)["sgd_Flights"]


def test_curate_accounts_for_every_record_and_publishes_atomically(ray_session, store, tmp_path):
    lines = open(SGD_LOGS).readlines()
    flights = [ln for ln in lines if '"sgd_Flights"' in ln][:30]
    pii = json.loads(flights[0])
    pii["request"]["messages"][-1]["content"] += " my email is jane.doe@example.com, card 4111 1111 1111 1111"
    pii["timestamp"] = 5
    dup = json.loads(flights[1])
    dup["timestamp"] = 2_000_000_000  # a later replay of the same request: a duplicate
    neg = json.loads(flights[2])
    neg["feedback"] = -1
    neg["timestamp"] = 7
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(flights) + "\n".join(json.dumps(x) for x in (pii, dup, neg)) + "\n{broken\n")
    ing = ingest_file(store, str(path))
    assert (ing["accepted"], ing["quarantined"]) == (33, 1)
    m = curate(CurateConfig(agents=("sgd_Flights",)), store)["sgd_Flights"]
    c = m["counts"]
    assert c["in"] == 33 and c["in"] == c["kept"] + c["quarantined"] and c["kept"] == sum(c[s] for s in SPLITS)
    assert all(c[s] for s in SPLITS)  # 31 kept: each split holds some
    assert m["reasons"] == {"duplicate": 1, "negative_feedback": 1}
    assert m["pii"]["EMAIL"] == 1 and m["pii"]["CARD"] == 1
    version = m["version"]
    assert store.read_json("datasets/sgd_Flights/LATEST") == {"version": version}
    rows = {s: read_split(store, "sgd_Flights", version, s).to_pylist() for s in SPLITS}
    text = "".join(json.dumps(r, default=str) for s in SPLITS for r in rows[s])
    assert "jane.doe@example.com" not in text and "4111 1111 1111 1111" not in text
    sessions = {s: {r["session_id"] for r in rows[s]} for s in SPLITS}
    assert not sessions[TRAIN] & sessions[TEST] and not sessions["validation"] & (sessions[TRAIN] | sessions[TEST])
    repeated = {lb for lb in {r["label"] for s in SPLITS for r in rows[s]}
                if sum(r["label"] == lb for s in SPLITS for r in rows[s]) > 1}
    assert {r["label"] for r in rows[TEST] if r["label"] in repeated} <= {r["label"] for r in rows[TRAIN]}
    with store.open(f"datasets/sgd_Flights/{version}/quarantine.parquet") as f:
        assert sorted(pq.read_table(f).column("reason").to_pylist()) == ["duplicate", "negative_feedback"]
    assert store.list("datasets/_staging") == []
    # the same logs again: the same version, nothing new published
    again = curate(CurateConfig(agents=("sgd_Flights",)), store)["sgd_Flights"]
    assert again["version"] == version and sorted(store.list("datasets/sgd_Flights")) == sorted(["LATEST", version])


def test_captured_wal_records_flow_into_curation(ray_session, store):
    from flywheel.capture.ingest import parse_record

    recs = [parse_record(json.loads(ln), f"serve:{i}") for i, ln in enumerate(open(SGD_LOGS).readlines()[:12])]
    LogStore(store).append(recs)  # what Serve does before answering
    m = curate(CurateConfig(min_examples=2), store)
    assert sum(x["counts"]["in"] for x in m.values()) == 12
    assert store.list("logs/wal") == []


@pytest.mark.extended  # the same, across two nodes with an S3 home, runs in CI (tests/test_nodes.py)
def test_distill_trains_registers_and_resumes(curated, store, tiny_model):
    cfg = DistillConfig(agent="sgd_Flights", base_model=tiny_model, max_steps=4, checkpoint_every=2,
                        num_workers=2, batch_size=2, max_length=1024)
    out = __import__("flywheel.distill.train", fromlist=["distill"]).distill(cfg, store)
    assert out["steps"] == 4 and out["version"] == "v1" and out["resumed_at"] == 0
    assert store.exists("adapters/sgd_Flights/v1/adapter_model.safetensors")
    entry = Registry(store).get("sgd_Flights", "v1")
    assert entry["dataset_version"] == curated["version"] and entry["base_model"] == tiny_model
    assert entry["hyperparameters"]["learning_rate"] == 1e-3
    # LoRA B matrices start at zero: training must have moved them
    from safetensors.torch import load_file

    weights = load_file(os.path.join(store.path("adapters/sgd_Flights/v1"), "adapter_model.safetensors"))
    assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)
    # the same run name again with more steps resumes from the last checkpoint instead of restarting
    more = __import__("flywheel.distill.train", fromlist=["distill"]).distill(
        DistillConfig(**{**cfg.__dict__, "max_steps": 6}), store)
    assert more["resumed_at"] == 4 and more["steps"] == 6 and more["version"] == "v2"


def test_evaluate_scores_gates_and_refuses_to_promote_a_bad_student(curated, store, tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from flywheel.evaluate.run import evaluate

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(tmp_path / "adapter"))
    Registry(store).register("sgd_Flights", str(tmp_path / "adapter"), {"dataset_version": curated["version"]})
    rep = evaluate(EvaluateConfig(agent="sgd_Flights", base_model=tiny_model, max_new_tokens=8, promote=True,
                                  min_examples=2), store)
    assert rep["teacher"]["function_name_accuracy"] == 1.0
    assert rep["n_expected"] == rep["candidate"]["n"] == curated["counts"]["test"] and rep["split"] == "test"
    assert rep["gate"]["passed"] is False and rep["promoted"] is False  # a random model calls no tools
    assert Registry(store).alias("sgd_Flights") is None
    assert store.exists("reports/sgd_Flights/v1/eval.md")
    # no learning curve in this home yet: the report says what the agent has and that nothing is forecast
    assert rep["traffic"]["records"] == curated["counts"]["train"] and rep["traffic"]["state"] == "no forecast"
    assert "Traffic: " in store.read_text("reports/sgd_Flights/v1/eval.md")
    assert Registry(store).get("sgd_Flights", "v1")["scores"]["gate"] is False
    # gated as Serve decodes it: under each request's grammar; those are the scores the registry keeps
    assert rep["gated"] == rep["gate"]["system"] == "candidate_constrained"
    assert rep["gate"]["candidate"] == rep["candidate_constrained"]["name_args_accuracy"]
    # selective serving: a random model certifies no threshold, and the gate says why; the registry keeps it
    block = rep["selective"]
    assert block["certificate"]["threshold"] is None and "45" in block["certificate"]["reason"]
    assert any("no confidence threshold certified" in r for r in rep["gate"]["reasons"])
    assert block["test"]["n_test"] == rep["n_expected"] and set(block["rankers"]["test"]) == {"min", "product",
                                                                                             "mean", "values"}
    kept = Registry(store).get("sgd_Flights", "v1")["selective"]
    assert kept["threshold"] is None and kept["target"] == 0.95 and kept["delta"] == 0.1
    kept = Registry(store).get("sgd_Flights", "v1")["scores"]
    assert kept["valid_call"] == rep["candidate_constrained"]["valid_call"]
    # side by side, each metric with its bootstrap interval; latency and measured cost
    assert rep["systems"] == ["teacher", "base", "base_in_context", "candidate", "candidate_constrained"]
    assert rep["in_context"]["k"] == 3 and rep["in_context"]["pool"] == curated["counts"]["train"]
    assert rep["teacher"]["valid_call"] == 1.0 and all(0.0 <= rep[s]["valid_call"] <= 1.0 for s in rep["systems"])
    for name in rep["systems"]:
        for m in rep["metrics"]:
            lo, hi = rep[name][f"{m}_ci"]
            assert lo <= rep[name][m] <= hi and rep[name]["n"] == rep["n_expected"]
    assert rep["teacher"]["function_name_accuracy_ci"] == [1.0, 1.0]
    for name in ("base", "base_in_context", "candidate"):
        r = rep[name]
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] and r["cpu_s_per_request"] > 0 and r["cost_per_1k_usd"] > 0
    cost = rep["cost"]
    assert cost["teacher_token_counts"] == {"logged": 0, "estimated": rep["n_expected"]}  # SGD logs carry no usage
    assert cost["teacher_per_1k_usd"] > 0 and cost["teacher_over_student"] == pytest.approx(
        cost["teacher_per_1k_usd"] / cost["student_per_1k_usd"])
    md = open(rep["report"]).read()
    assert "| base_in_context |" in md and "function_name_accuracy" in md and "[0.00, 0.00]" in md
    assert "lower bound" in md or "FAILED" in md
