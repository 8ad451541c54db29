"""The controller turns the loop with nobody at the keyboard: drift -> teacher -> retrain -> gate -> promote ->
student, once per drift episode; killed mid-cycle and restarted, it finishes without repeating a finished step.
Real Ray, real Serve, real HTTP, a tiny real Llama; the controller runs as separate processes joined to the
test's Ray.

    .venv/bin/python -m pytest tests/test_controller.py -x -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from flywheel.capture.store import ingest_file
from flywheel.config import ServeConfig
from flywheel.controller import Controller, ControllerConfig, events
from flywheel.cycle import turn
from flywheel.registry.registry import Registry
from flywheel.routing import get_route, retrain_queue

from conftest import SGD_LOGS
from test_loop import replay_teacher
from serving import free_port

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One training worker: on a 2-CPU node the Serve replica holds half a CPU while the controller retrains.
SMALL_DISTILL = {"max_steps": 2, "batch_size": 2, "max_length": 1024, "num_workers": 1}
# All-student routing: a random tiny model is never right, so no confidence threshold could be certified for it.
SMALL_EVAL = {"min_share_of_teacher": 0.0, "min_examples": 1, "max_new_tokens": 8, "max_examples": 6, "selective": False}
# Windows of 40 live requests; two drifted windows in a row start an episode (the deployment default).
SMALL_MONITOR = {"agent": "x", "min_window": 20, "window": 40, "stride": 20, "report": "never"}


def job_files(tmp_path) -> dict:
    """The small training, gate and drift settings as the job files a controller reads."""
    files = {}
    for name, values in (("distill", SMALL_DISTILL), ("evaluate", SMALL_EVAL), ("monitor", SMALL_MONITOR)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        files[f"{name}_config"] = str(path)
    return files


def controller_process(home: str, tmp_path, tiny_model: str, ray_address: str, **extra) -> subprocess.CompletedProcess:
    """`flywheel run --passes 1` in its own process, with the small training and gate settings as job files."""
    args = {"passes": 1, "retrain_after_s": 0, "cooldown_s": 0, "base_model": tiny_model, **job_files(tmp_path),
            **extra}
    argv = [sys.executable, "-c", "import sys, json; from flywheel.controller import run_process; "
                                  "sys.exit(run_process(json.loads(sys.argv[1])))", json.dumps(args)]
    env = {**os.environ, "FLYWHEEL_HOME": home, "RAY_ADDRESS": ray_address}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_the_controller_closes_the_loop_and_survives_a_kill(ray_session, store, tiny_model, tmp_path):
    from openai import OpenAI

    from flywheel.serve.app import run, shutdown

    records = [json.loads(line) for line in open(SGD_LOGS)]
    ingest_file(store, SGD_LOGS)
    first = turn(store, ("sgd_Flights",), tiny_model, distill=SMALL_DISTILL, evaluate=SMALL_EVAL)["sgd_Flights"]
    assert first["promoted"]
    answers = {[m for m in r["request"]["messages"] if m["role"] == "user"][-1]["content"]:
               r["response"]["choices"][0]["message"] for r in records}
    server, teacher_url = replay_teacher(answers)
    shutdown()
    url = run(ServeConfig(home=store.uri, base_model=tiny_model, port=free_port(), replica_cpus=0.5,
                          teacher_url=teacher_url, routing_ttl_s=0.1, max_new_tokens=8, wal_seal_age_s=0.5))
    address = ray_session.get_runtime_context().gcs_address
    in_process = Controller(ControllerConfig(home=store.uri, base_model=tiny_model, retrain_after_s=3600,
                                             cooldown_s=0, **job_files(tmp_path)), store)
    try:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        hotels = [r["request"] for r in records if r["workload_id"] == "sgd_Hotels"]
        def shift(requests: list[dict]) -> None:  # the agent's traffic moves to hotel bookings
            for req in requests:
                client.chat.completions.create(model="sgd_Flights", messages=req["messages"], tools=req["tools"],
                                               max_tokens=4)
            time.sleep(1.0)  # the replica seals its WAL segment

        shift(hotels[:40])
        assert in_process.pass_once() == {"sgd_Flights": "idle"}  # one drifted window: suspect, not yet drift
        assert get_route(store, "sgd_Flights")["mode"] == "student" and retrain_queue(store) == []
        shift(hotels[40:60])
        assert in_process.pass_once() == {"sgd_Flights": "idle"}  # two in a row: drift; the retrain waits
        assert get_route(store, "sgd_Flights")["mode"] == "teacher"
        assert len(retrain_queue(store)) == 1
        verdicts = [e["status"] for e in events(store, "sgd_Flights") if e["step"] == "monitor"]
        assert verdicts == ["suspect", "drift"], verdicts

        time.sleep(0.3)  # past the routing cache
        for req in hotels[60:90]:  # the teacher answers the new traffic, and its answers are captured
            raw = client.chat.completions.with_raw_response.create(model="sgd_Flights", messages=req["messages"],
                                                                   tools=req["tools"])
            assert raw.headers["x-flywheel-backend"].startswith("teacher:")
        time.sleep(1.0)
        assert in_process.pass_once() == {"sgd_Flights": "idle"}  # the same episode: no second retrain
        assert len(retrain_queue(store)) == 1

        killed = controller_process(store.uri, tmp_path, tiny_model, address, inject_exit_after="distill")
        assert killed.returncode == 17, killed.stderr[-3000:]
        state = in_process.state("sgd_Flights")
        assert set(state["done"]) == {"curate", "distill"}  # killed right after training was recorded
        trained = state["done"]["distill"]["adapter_version"]

        resumed = controller_process(store.uri, tmp_path, tiny_model, address)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        shutdown()
        server.should_exit = True

    log = events(store, "sgd_Flights")
    cycle = state["cycle"]
    done = [e["step"] for e in log if e["cycle"] == cycle and e["status"] == "done"]
    assert done == ["curate", "distill", "evaluate", "promote"]  # each once: the restart repeated nothing
    assert [e["status"] for e in log if e["cycle"] == cycle and e["step"] == "cycle"] == ["started", "promoted"]
    assert Registry(store).alias("sgd_Flights")["version"] == trained == "v2"
    assert get_route(store, "sgd_Flights")["mode"] == "student"
    assert retrain_queue(store) == []
    assert len([e for e in log if e["step"] == "cycle" and e["status"] == "started"]) == 1  # one retrain
    assert len({e["controller"] for e in log if e["cycle"] == cycle}) == 2  # two controller processes did it
