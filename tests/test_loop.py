"""The whole loop, end to end, on real Ray, real Serve, real HTTP and a real (tiny) model:

ingest -> curate -> distill -> gate/promote -> serve (openai client) -> capture -> drift -> teacher ->
retrain from the teacher's new answers -> promote again. Plus the real student for a few steps.
"""

import json
import os
import socket
import time

import pytest

from flywheel.capture.store import LogStore, ingest_file
from flywheel.config import DistillConfig, EvaluateConfig, MonitorConfig, ServeConfig
from flywheel.cycle import retrain_pending, turn
from flywheel.demo import replay_teacher  # noqa: F401  (test_controller imports it from here)
from flywheel.registry.registry import Registry
from flywheel.routing import get_route, retrain_queue

from conftest import SGD_LOGS

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_flywheel_turns_end_to_end(ray_session, store, tiny_model):
    from openai import OpenAI

    from flywheel.monitor.drift import check_drift
    from flywheel.serve.app import run, shutdown

    records = [json.loads(line) for line in open(SGD_LOGS)]
    ingest_file(store, SGD_LOGS)
    small = {"distill": {"max_steps": 2, "batch_size": 2, "max_length": 1024},
             "evaluate": {"min_share_of_teacher": 0.0, "min_examples": 1, "max_new_tokens": 8, "max_examples": 6,
                          "selective": False}}  # all-student: a random tiny model can never be certified
    first = turn(store, ("sgd_Flights",), tiny_model, **small)["sgd_Flights"]
    assert first["promoted"] and Registry(store).alias("sgd_Flights")["version"] == "v1"

    answers = {[m for m in r["request"]["messages"] if m["role"] == "user"][-1]["content"]:
               r["response"]["choices"][0]["message"] for r in records}
    server, teacher_url = replay_teacher(answers)
    shutdown()
    url = run(ServeConfig(home=store.uri, base_model=tiny_model, port=free_port(), replica_cpus=0.5,
                          teacher_url=teacher_url, routing_ttl_s=0.1, max_new_tokens=8))
    try:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        flights = [r["request"] for r in records if r["workload_id"] == "sgd_Flights"]
        raw = client.chat.completions.with_raw_response.create(
            model="sgd_Flights", messages=flights[0]["messages"], tools=flights[0]["tools"], max_tokens=8)
        assert raw.headers["x-flywheel-backend"] == "student:sgd_Flights@v1"
        assert raw.parse().choices[0].message is not None

        hotels = [r["request"] for r in records if r["workload_id"] == "sgd_Hotels"]
        for req in hotels[:40]:  # the agent's traffic moves to hotel bookings
            client.chat.completions.create(model="sgd_Flights", messages=req["messages"], tools=req["tools"],
                                           max_tokens=4)
        verdict = check_drift(MonitorConfig(agent="sgd_Flights", min_window=20, window=40, persistence=1), store)
        assert verdict["verdict"] == "drift", verdict
        assert get_route(store, "sgd_Flights")["mode"] == "teacher"
        assert [q["agent"] for q in retrain_queue(store)] == ["sgd_Flights"]

        time.sleep(0.3)  # past the routing cache
        for req in hotels[40:70]:  # now the teacher answers, and its answers are captured
            raw = client.chat.completions.with_raw_response.create(
                model="sgd_Flights", messages=req["messages"], tools=req["tools"])
            assert raw.headers["x-flywheel-backend"].startswith("teacher:")
    finally:
        shutdown()
        server.should_exit = True

    wal = LogStore(store).read_wal()
    assert sum(r["model"].startswith("teacher:") for r in wal) == 30
    assert sum(r["model"].startswith("student:") for r in wal) == 41

    second = retrain_pending(store, tiny_model, **small)["sgd_Flights"]
    manifest = second["dataset"]
    assert manifest["version"] != first["dataset"]["version"]
    assert manifest["reasons"]["student_answer"] == 41  # the student's own answers never become labels
    labels = {label for split in ("train", "validation", "test") for label in manifest["labels"][split]}
    assert any("Hotel" in label for label in labels)  # the teacher's answers on the new traffic are learned
    assert manifest["counts"]["in"] == manifest["counts"]["kept"] + manifest["counts"]["quarantined"]
    assert second["train"]["version"] == "v2" and second["promoted"]
    assert Registry(store).alias("sgd_Flights")["version"] == "v2"
    assert get_route(store, "sgd_Flights")["mode"] == "student" and retrain_queue(store) == []


def test_real_student_trains_a_few_steps_and_answers(ray_session, store, sgd_sample, student_path):
    from flywheel.curate.pipeline import curate
    from flywheel.config import CurateConfig
    from flywheel.distill.train import distill
    from flywheel.evaluate.run import evaluate

    ingest_file(store, sgd_sample)
    curate(CurateConfig(agents=("sgd_Flights",)), store)
    out = distill(DistillConfig(agent="sgd_Flights", base_model=student_path, max_steps=2, batch_size=1,
                                num_workers=2), store)
    assert out["steps"] == 2 and out["loss"] > 0 and os.path.exists(store.path(out["adapter"]))
    # the in-context baseline (long prompts) is covered on the tiny model in tests/test_stages.py
    report = evaluate(EvaluateConfig(agent="sgd_Flights", base_model=student_path, max_examples=2,
                                     max_new_tokens=40, min_examples=1, in_context_k=0,
                                     max_calibration_examples=3), store)
    # the real student's answers carry confidences: every aggregate is ranked on both splits
    block = report["selective"]
    assert block["certificate"]["n_calibration"] == 3 and set(block["rankers"]["test"]) == {"min", "product", "mean",
                                                                                           "values"}
    assert report["candidate"]["n"] == 2 and report["base"]["n"] == 2
    assert report["base"]["tool_call_rate"] <= 1.0 and report["gate"]["metric"] == "name_args_accuracy"
