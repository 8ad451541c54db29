"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster` in a subprocess, so the session's own Ray is not
disturbed): nodes whose processes started without the driver's environment (a local home refused, the S3
endpoint reaching them, a base model named by an s3:// URI copied to the node that loads it, a distillation with
one Train worker on each node and the home on S3), a node with a (fake) GPU that the student replica given one
lands on, two controllers on two nodes, and a worker node lost mid-curation, mid-training or under serving load.

    .venv/bin/python -m pytest tests/test_nodes.py -q

Each test starts a head and a worker node (~15 s here) and stops them; the subprocess sets `RAY_ADDRESS` to its
cluster, so Flywheel's `connect_ray` joins it as a job driver on a real cluster would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def on_two_nodes(script: str, *args: str, timeout: int = 300) -> list[str]:
    """Run `script` (which starts its own cluster) in a fresh interpreter; the lines it printed after `RESULT `
    (Ray's own log lines reach stdout too)."""
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    return [line[len("RESULT "):] for line in out.stdout.splitlines() if line.startswith("RESULT ")]


TWO_NODES = r"""
import os, sys
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from flywheel.config import ConfigError
from flywheel.raycluster import check_home, connect_ray
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
worker = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
cluster.wait_for_nodes()
# set after the nodes started: their processes never had it, as on a cluster whose nodes lack it
os.environ.update(RAY_ADDRESS=cluster.address, FLYWHEEL_S3_ENDPOINT="http://minio.test:9000")
connect_ray()
for home in sys.argv[1:]:
    try:
        check_home(home)
        print("RESULT accepted", flush=True)
    except ConfigError as e:
        print("RESULT refused:", e, flush=True)
on_worker = NodeAffinitySchedulingStrategy(worker.node_id, soft=False)
print("RESULT", ray.get(ray.remote(lambda: os.environ.get("FLYWHEEL_S3_ENDPOINT")).options(
    scheduling_strategy=on_worker).remote()), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def test_on_two_real_nodes_a_local_home_is_refused_and_the_s3_endpoint_reaches_the_workers(tmp_path):
    local, s3, endpoint = (on_two_nodes(TWO_NODES, str(tmp_path / "home"), "s3://bucket/flywheel") + [""] * 3)[:3]
    assert local.startswith("refused:") and "2 nodes" in local and s3 == "accepted", (local, s3)
    assert endpoint == "http://minio.test:9000"  # read by a task on the node that never had it


GPU_NODE = r"""
import json, os, sys
import ray
from ray import serve
from ray.cluster_utils import Cluster
from flywheel.config import ServeConfig
from flywheel.raycluster import connect_ray
from flywheel.serve.app import run, shutdown
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
gpu_node = cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=80 * 2**20)  # a GPU as Ray counts it
cluster.wait_for_nodes()
os.environ["RAY_ADDRESS"] = cluster.address
connect_ray()
run(ServeConfig(home=sys.argv[1], base_model=sys.argv[2], port=int(sys.argv[3]), replica_cpus=0.5, replica_gpus=1,
                replica_memory_mb=2048, student_max_replicas=1, teacher_min_replicas=0, blocking=False, auth="off"))
info = serve.get_deployment_handle("StudentModel", app_name="flywheel").info.remote().result()
left, total = ray.available_resources(), ray.cluster_resources()
gpus = {"gpus_left": left.get("GPU", 0), "gpus": total.get("GPU"),
        "memory_taken_mb": round((total["memory"] - left["memory"]) / 2**20)}  # nothing else asks for memory
print("RESULT", json.dumps({**gpus, "student_answers": "slots" in info}), flush=True)
shutdown()
ray.shutdown()
cluster.shutdown()
"""


def test_a_student_replica_given_a_gpu_and_memory_is_placed_on_the_gpu_node_and_holds_both(tmp_path, tiny_model):
    from serving import free_port

    [line] = on_two_nodes(GPU_NODE, str(tmp_path / "home"), tiny_model, str(free_port()))
    # the only GPU of the cluster is taken by the student replica, which runs (HF on the CPU: Ray's GPU is fake),
    # and so is the memory it asked for
    assert json.loads(line) == {"gpus_left": 0, "gpus": 1.0, "memory_taken_mb": 2048, "student_answers": True}


MODEL_ON_S3 = r"""
import json, os, sys
# the nodes bring their own credentials (as an instance role would); the S3 endpoint only the driver has
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
import boto3
import ray
from moto.server import ThreadedMotoServer
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from flywheel.raycluster import connect_ray
from flywheel.storage import Store
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[2]), verbose=False)
server.start()
endpoint = f"http://127.0.0.1:{sys.argv[2]}"
boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="flywheel-models")
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
worker = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
cluster.wait_for_nodes()
os.environ.update(RAY_ADDRESS=cluster.address, FLYWHEEL_S3_ENDPOINT=endpoint)
Store("s3://flywheel-models/home").upload(sys.argv[1], "models/base")
connect_ray()


@ray.remote
def answer(uri):
    from flywheel.inference.engine import HFEngine
    from flywheel.models import local_model

    engine = HFEngine(uri, dtype="float32")
    text = engine.generate([[{"role": "user", "content": "hi"}]], [None], max_new_tokens=4)[0].text
    return engine.base_model, text, local_model(uri)


on_worker = NodeAffinitySchedulingStrategy(worker.node_id, soft=False)
uri = "s3://flywheel-models/home/models/base"
name, text, copy = ray.get(answer.options(scheduling_strategy=on_worker).remote(uri))
print("RESULT", json.dumps({"name": name, "answered": isinstance(text, str), "copy": copy}))
ray.shutdown()
cluster.shutdown()
server.stop()
"""


def test_a_node_loads_a_base_model_named_by_an_s3_uri_from_its_own_copy(tiny_model):
    from serving import free_port

    import shutil
    import tempfile

    [line] = on_two_nodes(MODEL_ON_S3, tiny_model, str(free_port()))
    result = json.loads(line)
    shutil.rmtree(result["copy"], ignore_errors=True)  # the node's copy, in its default cache
    assert result["name"] == "s3://flywheel-models/home/models/base" and result["answered"]
    assert os.path.dirname(result["copy"]) == os.path.join(tempfile.gettempdir(), "flywheel-models")


TWO_CONTROLLERS = r"""
import json, os, sys, time
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from flywheel.raycluster import connect_ray
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
worker = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
cluster.wait_for_nodes()
os.environ["RAY_ADDRESS"] = cluster.address
connect_ray()


@ray.remote(num_cpus=0.5)
class Passes:
    # a controller on one node whose agent's turn takes longer than its lease (0.3 s): only renewals keep it
    def run(self, home, passes):
        from flywheel.controller import Controller, ControllerConfig

        spans = []

        def slow_turn(agent):
            start = time.time()
            time.sleep(0.5)
            spans.append((start, time.time()))
            return "idle"

        ctl = Controller(ControllerConfig(home=home, monitor=False, agents=("a1",), lease_s=0.3))
        ctl.tick = slow_turn
        outcomes = []
        while len(spans) < passes:
            outcomes.append(ctl.pass_once())
            time.sleep(0.02)
        return ray.get_runtime_context().get_node_id(), spans, outcomes


nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [Passes.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]
results = ray.get([a.run.remote(sys.argv[1], 4) for a in actors])
print("RESULT", json.dumps(results))
ray.shutdown()
cluster.shutdown()
"""


def test_two_controllers_on_two_nodes_never_run_a_pass_at_once(tmp_path):
    """The home is a folder both nodes see (one machine); each pass outlasts the lease, so renewals must hold it."""
    [line] = on_two_nodes(TWO_CONTROLLERS, str(tmp_path / "home"))
    (node_a, spans_a, outcomes_a), (node_b, spans_b, outcomes_b) = json.loads(line)
    assert node_a != node_b and len(spans_a) == len(spans_b) == 4
    for start, end in spans_a:
        assert all(end <= other_start or other_end <= start for other_start, other_end in spans_b)
    outcomes, held = outcomes_a + outcomes_b, {"lease": "held by another controller"}
    assert held in outcomes and all(o in ({"a1": "idle"}, held) for o in outcomes)


DISTILL_ON_S3 = r"""
import json, os, sys
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
import boto3
import ray
from moto.server import ThreadedMotoServer
from ray.cluster_utils import Cluster
from flywheel.capture.store import ingest_file
from flywheel.config import CurateConfig, DistillConfig
from flywheel.curate.pipeline import curate
from flywheel.distill.train import distill
from flywheel.raycluster import connect_ray
from flywheel.storage import Store
model, logs, port = sys.argv[1:4]
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(port), verbose=False)
server.start()
endpoint = f"http://127.0.0.1:{port}"
boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="flywheel")
# one CPU per node and one per training worker: the two workers can only run one on each node
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
cluster.wait_for_nodes()
os.environ.update(RAY_ADDRESS=cluster.address, FLYWHEEL_S3_ENDPOINT=endpoint)
store = Store("s3://flywheel/home")
store.upload(model, "models/base")
connect_ray()
base = "s3://flywheel/home/models/base"
ingest_file(store, logs)
curate(CurateConfig(agents=("sgd_Flights",), min_examples=4), store)
cfg = DistillConfig(agent="sgd_Flights", base_model=base, num_workers=2, batch_size=2, max_length=1024,
                    max_steps=2, checkpoint_every=1, run_name="two-nodes", memory_per_worker_mb=256)
out = distill(cfg, store)
from ray.util.state import list_actors
asked = [max(v for k, v in a.required_resources.items() if k.startswith("memory"))  # its placement group bundle
         for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)]
from safetensors.torch import load
from flywheel.registry.registry import Registry
with store.open(out["adapter"] + "/adapter_model.safetensors") as f:
    weights = load(f.read())
entry = Registry(store).get("sgd_Flights", out["version"])
print("RESULT", json.dumps({"steps": out["steps"], "version": out["version"], "adapter": out["adapter"],
                            "lineage": [entry["base_model"], entry["dataset_version"] is not None],
                            "trained": any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k),
                            "checkpoints": store.list("checkpoints/two-nodes"),
                            "asked": asked}), flush=True)
ray.shutdown()
cluster.shutdown()
server.stop()
"""


def test_distill_runs_a_worker_on_each_node_with_the_home_and_the_base_model_on_s3(tiny_model, sgd_sample):
    """Two Train workers on two nodes that share no setting but Ray: the base model by URI (each node copies it),
    the curated data, checkpoints and the adapter all through an S3 home that only the driver knows the endpoint of.
    (Resuming from those checkpoints: tests/test_distill.py.)"""
    from serving import free_port

    [line] = on_two_nodes(DISTILL_ON_S3, tiny_model, sgd_sample, str(free_port()), timeout=600)
    result = json.loads(line)
    assert result["steps"] == 2 and result["version"] == "v1" and result["adapter"] == "adapters/sgd_Flights/v1"
    assert result["lineage"] == ["s3://flywheel/home/models/base", True]  # the URI, not a node's copy
    assert result["trained"]  # LoRA B starts at zero: the two workers' steps moved it
    assert result["checkpoints"]  # in the S3 home, where a worker on another node resumes from them
    assert result["asked"] == [256 * 2**20] * 2, result["asked"]  # each worker's memory, as Ray reserved it


CURATE_LOSES_A_NODE = r"""
import json, os, sys, threading, time
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
import boto3
import pyarrow.parquet as pq
import ray
from moto.server import ThreadedMotoServer
from ray.cluster_utils import Cluster
from flywheel.capture.store import LogStore, ingest_file
from flywheel.config import CurateConfig
from flywheel.curate.pipeline import curate
from flywheel.datasets import SPLITS, read_split
from flywheel.raycluster import connect_ray
from flywheel.schema import digest
from flywheel.storage import Store
logs, port, agents = sys.argv[1], sys.argv[2], tuple(sys.argv[3].split(","))
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(port), verbose=False)
server.start()
endpoint = f"http://127.0.0.1:{port}"
s3 = boto3.client("s3", endpoint_url=endpoint)
s3.create_bucket(Bucket="flywheel")
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
worker = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
cluster.wait_for_nodes()
os.environ.update(RAY_ADDRESS=cluster.address, FLYWHEEL_S3_ENDPOINT=endpoint)
store = Store("s3://flywheel/home")
connect_ray()
ingest_file(store, logs, chunk_lines=100)  # 16 log parts: one clean -> write task each, on both nodes
parts = LogStore(store).part_names()
ids = {a: [] for a in agents}
for name in parts:
    with store.open(f"logs/parquet/{name}", "rb") as f:
        t = pq.read_table(f, columns=["record_id", "agent_id"])
    for rid, agent in zip(t.column("record_id").to_pylist(), t.column("agent_id").to_pylist()):
        if agent in ids:
            ids[agent].append(rid)
out = {}
run = threading.Thread(target=lambda: out.update(curate(CurateConfig(agents=agents, min_examples=4), store)))
run.start()
def staged() -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="flywheel", Prefix="home/datasets/_staging/")
    return [o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".parquet")]
from ray.util.state import list_tasks
def on_worker() -> list[str]:
    running = list_tasks(filters=[("state", "=", "RUNNING")], limit=1000, raise_on_missing_output=False)
    return sorted(t.name for t in running if t.node_id == worker.node_id and "clean_part" in t.name)
tasks = []
while run.is_alive() and not (staged() and (tasks := on_worker())):  # mid-way, and the worker busy cleaning
    time.sleep(0.05)
at_loss = {"staged_files": len(staged()), "curating": run.is_alive(), "tasks_on_worker": tasks,
           "published": [k["Key"] for k in s3.list_objects_v2(Bucket="flywheel", Prefix="home/datasets/").get(
               "Contents", []) if "_staging" not in k["Key"]]}
cluster.remove_node(worker)  # the worker node dies with its running task and the objects it held
run.join(timeout=600)
result = {"at_loss": at_loss, "nodes_alive": sum(n["Alive"] for n in ray.nodes()), "agents": {}}
for agent in agents:
    m = out.get(agent) or {}
    rows = [rid for split in SPLITS for rid in read_split(store, agent, m["version"], split,
                                                           columns=["record_id"]).column(0).to_pylist()]
    result["agents"][agent] = {
        "version": m.get("version"), "versions": store.list(f"datasets/{agent}"), "counts": m.get("counts"),
        "logged": len(ids[agent]), "ids_match": m["lineage"]["record_ids_digest"] == digest(sorted(ids[agent])),
        "rows": len(rows), "unique_rows": len(set(rows))}
result["staging_left"] = len(staged())
print("RESULT", json.dumps(result), flush=True)
ray.shutdown()
cluster.shutdown()
server.stop()
"""


def test_a_worker_node_lost_mid_curation_still_publishes_one_version_with_every_record(tmp_path):
    """The worker node is removed once a cleaned file is staged and Ray's state API shows the node running a clean
    -> write task (a few of 16 parts done): Ray reruns the lost work on the head, and each agent's version is
    published once, its manifest counting every record logged for it, each row exactly once."""
    from serving import free_port

    agents = ("sgd_Flights", "sgd_Restaurants", "sgd_Hotels")
    logs = os.path.join(REPO, "flywheel", "data", "sgd", "sgd_dev_flywheel_logs.jsonl")
    [line] = on_two_nodes(CURATE_LOSES_A_NODE, logs, str(free_port()), ",".join(agents), timeout=600)
    result = json.loads(line)
    print(json.dumps(result, indent=1))  # pytest -s: what the node held when it was lost
    at_loss = result["at_loss"]
    assert at_loss["curating"] and at_loss["tasks_on_worker"] and at_loss["published"] == [], at_loss
    assert result["nodes_alive"] == 1 and result["staging_left"] == 0
    for agent, got in result["agents"].items():
        c = got["counts"]
        assert got["version"] and got["versions"] == sorted(["LATEST", got["version"]]), got  # published once
        assert c["in"] == got["logged"] == c["kept"] + c["quarantined"] and got["ids_match"], (agent, got)
        assert got["rows"] == got["unique_rows"] == c["kept"], (agent, got)


DISTILL_LOSES_A_NODE = DISTILL_ON_S3.split("cfg = DistillConfig")[0].replace(
    "cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)",
    "worker = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)") + r"""
import threading, time
cfg = DistillConfig(agent="sgd_Flights", base_model=base, num_workers=2, batch_size=2, max_length=1024,
                    max_steps=int(sys.argv[4]), checkpoint_every=1, run_name="loses-a-node")
out = {}
run = threading.Thread(target=lambda: out.update(distill(cfg, store)))
run.start()
def checkpoints() -> list[str]:
    return [n for n in store.list("checkpoints/loses-a-node") if n.startswith("step-")]
while len(checkpoints()) < 2 and run.is_alive():
    time.sleep(0.1)
at_loss = {"checkpoints": checkpoints(), "training": run.is_alive(),
           "marked": store.read_json("checkpoints/loses-a-node/persisted.json")}
cluster.remove_node(worker)  # one of the two Train workers dies with its node
cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)  # what an autoscaler does: a fresh, empty node
run.join(timeout=900)
from flywheel.registry.registry import Registry
versions = [v["version"] for v in Registry(store).versions("sgd_Flights")]
print("RESULT", json.dumps({"at_loss": at_loss, "steps": out.get("steps"), "resumed_at": out.get("resumed_at"),
                            "version": out.get("version"), "nodes_alive": sum(n["Alive"] for n in ray.nodes()),
                            "versions": versions}), flush=True)
ray.shutdown()
cluster.shutdown()
server.stop()
"""


def test_a_worker_node_lost_mid_training_resumes_on_a_new_node_from_the_s3_checkpoint(tiny_model, sgd_sample):
    """Two Train workers on two nodes, checkpoints to the S3 home every step. After the second checkpoint the worker
    node is removed and a fresh node joins (as an autoscaler would replace it): the worker group restarts on it and
    resumes from a checkpoint on S3, so only the steps after it are computed again, and one version registers. The
    loss comes as soon as the checkpoint's folder appears, before Ray Train's controller has collected the report:
    without the run's own persisted mark the group restarted from step 0."""
    from serving import free_port

    [line] = on_two_nodes(DISTILL_LOSES_A_NODE, tiny_model, sgd_sample, str(free_port()), "8", timeout=900)
    result = json.loads(line)
    print(json.dumps(result, indent=1))
    assert result["at_loss"]["training"] and len(result["at_loss"]["checkpoints"]) >= 2, result
    assert result["steps"] == 8 and result["version"] == "v1" and result["versions"] == ["v1"], result
    assert result["nodes_alive"] == 2, result
    # from a checkpoint uploaded before the loss (the newest, or the one before it when the loss came between its
    # upload and its mark), not from step 0
    assert 1 <= result["resumed_at"] < 8, result


SERVE_LOSES_A_NODE = r"""
import json, os, sys, threading, time
import httpx
import openai
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from flywheel.capture.store import LogStore
from flywheel.config import ServeConfig
from flywheel.raycluster import connect_ray
from flywheel.serve.app import run, shutdown
from flywheel.storage import Store
home, model, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 80 * 2**20})
first = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 * 2**20)  # the student's node
cluster.wait_for_nodes()
os.environ.update(RAY_ADDRESS=cluster.address, FLYWHEEL_HOME_SHARED="1")  # one machine: every node sees the home
connect_ray()
url = run(ServeConfig(home=home, base_model=model, port=port, replica_cpus=0.5, replica_gpus=1,
                      student_max_replicas=1, teacher_min_replicas=0, blocking=False, auth="off",
                      base_model_name="student-base", max_new_tokens=8))
def nodes_of(deployment: str) -> list[str]:
    return sorted(a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                  if a.class_name.endswith(deployment))
before, ingress = nodes_of("StudentModel"), nodes_of("Ingress")
statuses, acked, failures, lock, bodies = [], [], [], threading.Lock(), []
def note(response):
    if response.status_code != 200:
        response.read()
        bodies.append(response.text[:200])
    with lock:
        statuses.append(response.status_code)
def traffic(n):
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=10, timeout=120,
                           http_client=httpx.Client(event_hooks={"response": [note]}, timeout=120))
    for _ in range(n):
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="student-base", messages=[{"role": "user", "content": "Find me a flight to Seattle."}],
                max_tokens=8)
            with lock:
                acked.append(raw.headers["x-flywheel-record-id"])
        except openai.APIError as e:
            with lock:
                failures.append(repr(e))
senders = [threading.Thread(target=traffic, args=(6,)) for _ in range(3)]
for s in senders:
    s.start()
while len(acked) < 3:
    time.sleep(0.05)
at_loss = len(acked)
cluster.remove_node(first)  # the student replica's node dies under the traffic
cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 * 2**20)  # its replacement, as an autoscaler adds
for s in senders:
    s.join(timeout=600)
after = nodes_of("StudentModel")
shutdown()  # seals the open WAL segment
store = Store(home)
time.sleep(ServeConfig().wal_seal_age_s + 1.5)
LogStore(store, lease_s=1.0).compact()  # an Ingress that died with its node left an open segment: recovered
ids = []
for name in LogStore(store).part_names():
    with store.open(f"logs/parquet/{name}", "rb") as f:
        ids += pq.read_table(f, columns=["record_id"]).column(0).to_pylist()
print("RESULT", json.dumps({"at_loss": at_loss, "acked": len(acked), "unique": len(set(acked)),
                            "failures": failures[:3], "statuses": sorted(set(statuses)),
                            "retried": sum(s != 200 for s in statuses),
                            "ingress_on_lost_node": first.node_id in ingress,
                            "moved": before != after and before[0] == first.node_id and len(after) == 1,
                            "captured_once": all(ids.count(i) == 1 for i in acked),
                            "bodies": bodies}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def test_a_node_lost_under_serving_load_loses_no_request_and_no_record(tmp_path, tiny_model):
    """The student replica's node (it asks for the cluster's only, fake, GPU) is removed under traffic from three
    official `openai` clients that retry, and a fresh GPU node joins: the replica comes back there, every request
    ends 200, every acknowledged record is stored exactly once, and a request caught by the loss saw Flywheel's
    contract (503 `replica_lost` with Retry-After), never a 500: the Ingress replicas stay on the head
    (`ingress_on_head`), where a worker's loss cannot take them and their requests in flight."""
    from serving import free_port

    [line] = on_two_nodes(SERVE_LOSES_A_NODE, str(tmp_path / "home"), tiny_model, str(free_port()), timeout=600)
    result = json.loads(line)
    print(json.dumps(result, indent=1))
    assert result["at_loss"] >= 3 and result["moved"], result  # the loss came under traffic; the replica moved
    assert result["failures"] == [] and result["acked"] == result["unique"] == 18, result
    assert result["captured_once"], result
    assert not result["ingress_on_lost_node"] and set(result["statuses"]) <= {200, 503}, result
