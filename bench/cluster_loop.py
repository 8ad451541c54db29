"""The whole loop on three Ray nodes that share nothing but an S3 home, each stage a `ray job submit` of its
`jobs/` entrypoint, timed stage by stage: ingest (from s3://) -> curate -> distill (a Train worker on each worker
node) -> evaluate and promote -> serve (the student replica on the GPU worker) -> capture (the official `openai`
client) -> monitor -> the controller (a retrain on the new traffic, gated and promoted) -> the next answer from the
new version. `tests/test_cluster_loop.py` runs it and checks each step.

    .venv/bin/python bench/cluster_loop.py      # -> bench/figures/cluster-loop-<time>.json

The head (no CPUs: the job drivers, the dashboard, the Ingress) and two one-CPU workers are `ray.cluster_utils`
nodes in a subprocess; the S3 home is moto, in that subprocess. The nodes start without the S3 endpoint (only the
jobs' runtime env carries it), and every worker process of every job runs a guard (Ray's
`worker_process_setup_hook`) that fails any open of a path under the driver's local folders: the model, the logs
and the job files exist only there, so a stage that read one from its node's disk instead of from the home fails.
The model is a tiny random Llama with the student's tokenizer: this measures the cluster's plumbing, not training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SGD_LOGS = os.path.join(REPO, "flywheel", "data", "sgd", "sgd_dev_flywheel_logs.jsonl")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from traffic import free_port  # noqa: E402  (bench/traffic.py)

GUARD = r'''
"""Installed in every worker process of the test's jobs: opening a path under the driver's folders fails."""
import os
import sys


def install():
    roots = [os.path.realpath(r) for r in os.environ["GUARDED_ROOTS"].split(os.pathsep) if r]

    def refuse(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if any(path == r or path.startswith(r + os.sep) for r in roots):
                raise PermissionError(f"a worker opened the driver's local path {path}")

    sys.addaudithook(refuse)
'''

# the small settings a test can afford, as the job files a team would write
JOB_FILES = {
    "distill.yaml": {"max_steps": 2, "batch_size": 2, "max_length": 1024, "num_workers": 2},
    # the controller's retrains run beside the serving replica, which holds half of one worker's CPU
    "retrain.yaml": {"max_steps": 2, "batch_size": 2, "max_length": 1024, "num_workers": 1},
    "evaluate.yaml": {"min_share_of_teacher": 0.0, "min_examples": 1, "max_new_tokens": 8, "max_examples": 4,
                      "selective": False},  # a random tiny model is never right: no threshold could be certified
    "monitor.yaml": {"min_window": 10, "window": 20, "stride": 10, "report": "never"},
}

LOOP = r"""
import glob, json, os, subprocess, sys, time
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
import boto3
import openai
from moto.server import ThreadedMotoServer
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
model, logs, work, s3_port, dash_port, serve_port, *agent_ports = sys.argv[1:]
t0 = time.time()
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(s3_port), verbose=False)
server.start()
endpoint = f"http://127.0.0.1:{s3_port}"
s3 = boto3.client("s3", endpoint_url=endpoint)
s3.create_bucket(Bucket="flywheel")
for path in glob.glob(os.path.join(model, "*")):
    s3.upload_file(path, "flywheel", "home/models/base/" + os.path.basename(path))
s3.upload_file(logs, "flywheel", "raw/logs.jsonl")
BASE, HOME = "s3://flywheel/home/models/base", "s3://flywheel/home"
# the job agents' ports too: another Ray on the machine (a test session's) already holds the default one
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": int(dash_port),
    "dashboard_agent_listen_port": int(agent_ports[0]), "object_store_memory": 80 * 2**20})
node_tmp = {name: os.path.join(os.path.dirname(work), f"node-{name}", "tmp") for name in ("train", "gpu")}
for path in node_tmp.values():
    os.makedirs(path)
# each worker node its own temp folder (its workers' TMPDIR), where Flywheel keeps its node copies of models
train_node = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20, env_vars={"TMPDIR": node_tmp["train"]},
                              dashboard_agent_listen_port=int(agent_ports[1]))
gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 * 2**20,  # a fake GPU: the student's
                            env_vars={"TMPDIR": node_tmp["gpu"]}, dashboard_agent_listen_port=int(agent_ports[2]))
cluster.wait_for_nodes()
os.environ["RAY_ADDRESS"] = cluster.address  # for the state API below; the jobs are sent to the dashboard
runtime_env = {"working_dir": work, "worker_process_setup_hook": "guard.install",
               "env_vars": {"FLYWHEEL_HOME": HOME, "FLYWHEEL_S3_ENDPOINT": endpoint,
                            "GUARDED_ROOTS": os.environ["GUARDED_ROOTS"], "HF_HUB_OFFLINE": "1"}}
times = {"cluster_s": round(time.time() - t0, 1)}
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
def ray_job_submit(entrypoint, timeout=900):  # waits for the job and prints its log
    cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash_port}", "--runtime-env-json",
           json.dumps(runtime_env), "--", *entrypoint]
    for _ in range(60):  # the head's job agent answers a little after the dashboard
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(2)
    return out
def submit(name, args):
    start = time.time()
    out = ray_job_submit([sys.executable, f"jobs/{name}.py", *args.split(), "--json"])
    times[name] = round(time.time() - start, 1)
    print(f"job {name}: rc {out.returncode} in {times[name]} s", file=sys.stderr, flush=True)
    if out.returncode != 0:
        print("RESULT", json.dumps({"failed": name, "log": (out.stdout + out.stderr)[-6000:]}), flush=True)
        sys.exit(0)
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
def nodes_of(actor_class, state=None):
    return sorted({a.node_id for a in list_actors(limit=1000, raise_on_missing_output=False)
                   if a.class_name.endswith(actor_class) and state in (None, a.state)})
def guard_refuses():  # the guard itself: a job's task that opens the driver's copy of the logs fails
    out = ray_job_submit([sys.executable, "-c", "import ray, sys; ray.init(); "
                          "ray.get(ray.remote(lambda p: open(p).read(1)).remote(sys.argv[1]))", logs])
    return out.returncode != 0 and "opened the driver's local path" in out.stdout + out.stderr
agent = "sgd_Flights"
ingested = submit("ingest", "s3://flywheel/raw/logs.jsonl")
curated = submit("curate", f"--agents {agent} --min-examples 4")
trained = submit("distill", f"--config small/distill.yaml --agent {agent} --base-model {BASE}")
train_nodes = nodes_of("RayTrainWorker")
gated = submit("evaluate", f"--config small/evaluate.yaml --agent {agent} --base-model {BASE} "
                           f"--adapter-version {trained['version']} --promote")
submit("serve", f"--base-model {BASE} --port {serve_port} --replica-gpus 1 --replica-cpus 0.5 --auth off "
                f"--no-blocking --student-max-replicas 1 --teacher-min-replicas 0 --max-new-tokens 8 "
                f"--wal-seal-age-s 0.5 --routing-ttl-s 0.5")
student_nodes = nodes_of("StudentModel", "ALIVE")
ingress_nodes = nodes_of("Ingress", "ALIVE")
requests = [json.loads(line)["request"] for line in open(logs)]
requests = [r for r in requests if r.get("tools")][:24]
client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="unused", max_retries=5, timeout=120)
backends = []
start = time.time()
for req in requests:
    raw = client.chat.completions.with_raw_response.create(model=agent, messages=req["messages"], tools=req["tools"],
                                                           max_tokens=8)
    backends.append(raw.headers["x-flywheel-backend"])
times["traffic"] = round(time.time() - start, 1)
time.sleep(1.5)  # the replica seals its WAL segment
monitored = submit("monitor", f"--config small/monitor.yaml --agent {agent}")
controlled = submit("run", f"--passes 1 --agents {agent} --base-model {BASE} --min-new-records 10 "
                           f"--retrain-after-s 0 --cooldown-s 0 --distill-config small/retrain.yaml "
                           f"--evaluate-config small/evaluate.yaml --monitor-config small/monitor.yaml")
time.sleep(1.0)  # past the Ingress's routing cache
after = client.chat.completions.with_raw_response.create(model=agent, messages=requests[0]["messages"],
                                                         tools=requests[0]["tools"], max_tokens=8)
times["total_s"] = round(time.time() - t0, 1)
refused = guard_refuses()
listing = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="flywheel", Prefix="home/")
           for o in page.get("Contents", [])]
print("RESULT", json.dumps({
    "ingested": ingested, "curated": curated.get(agent, {}).get("counts"), "trained": trained,
    "promoted": gated.get("promoted"), "monitor": monitored, "controller": controlled,
    "train_on_both_workers": train_nodes == sorted([train_node.node_id, gpu_node.node_id]),
    "student_on_gpu_node": student_nodes == [gpu_node.node_id],
    "ingress_on_head": ingress_nodes == [cluster.head_node.node_id],
    "backends": sorted(set(backends)), "answered": len(backends), "after": after.headers["x-flywheel-backend"],
    "wal_keys": len([k for k in listing if k.startswith("home/logs/")]),
    "node_model_copies": {name: sorted(os.listdir(os.path.join(path, "flywheel-models")))
                          if os.path.isdir(os.path.join(path, "flywheel-models")) else []
                          for name, path in node_tmp.items()},
    "guard_refused": refused, "times": times}), flush=True)
cluster.shutdown()
server.stop()
"""



def prepare(root: str) -> tuple[str, str, str]:
    """The jobs' working_dir (the entrypoints and the small job files) and a copy of the logs under `root`."""
    work = os.path.join(root, "work")
    shutil.copytree(os.path.join(REPO, "jobs"), os.path.join(work, "jobs"))
    with open(os.path.join(work, "guard.py"), "w") as f:
        f.write(GUARD)
    os.makedirs(os.path.join(work, "small"))
    for name, values in JOB_FILES.items():
        with open(os.path.join(work, "small", name), "w") as f:
            json.dump(values, f)  # JSON is YAML
    logs = os.path.join(root, "logs", "sgd_dev.jsonl")
    os.makedirs(os.path.dirname(logs))
    shutil.copy(SGD_LOGS, logs)
    return work, logs, os.path.dirname(logs)


def run_loop(root: str, model: str, timeout: int = 1500) -> dict:
    """Run the loop in a fresh interpreter (its own cluster and S3 server); the result it printed."""
    work, logs, logs_dir = prepare(root)
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "HF_HUB_OFFLINE": "1",
           "GUARDED_ROOTS": os.pathsep.join([work, logs_dir, model])}
    env.pop("RAY_ADDRESS", None)
    ports = [str(free_port()) for _ in range(6)]  # S3, dashboard, Serve, the three nodes' job agents
    out = subprocess.run([sys.executable, "-c", LOOP, model, logs, work, *ports], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    lines = [line[len("RESULT "):] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-4000:])
    return json.loads(lines[-1])


def main() -> None:
    sys.path.insert(0, REPO)
    from flywheel.models import build_tiny
    from results import save

    student = os.environ.get("FLYWHEEL_STUDENT", os.path.join(REPO, "models", "smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as root:
        model = build_tiny(os.path.join(root, "tiny-llama"), tokenizer_from=student)
        started = time.time()
        result = run_loop(root, model)
    print(json.dumps(result["times"], indent=1))
    save("cluster-loop", {"command": "python bench/cluster_loop.py", "started": started, **result})


if __name__ == "__main__":
    main()
