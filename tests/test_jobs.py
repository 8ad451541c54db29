"""`ray job submit` of a jobs/ entrypoint to a real Ray head started by this test, with token auth on."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from flywheel.capture.store import ingest_file
from flywheel.storage import Store

from conftest import REPO

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path_factory):
    """`ray start --head --block` in its own session and temp dir; everything it started is killed after."""
    bin_dir = os.path.dirname(sys.executable)
    ray = os.path.join(bin_dir, "ray")
    temp = str(tmp_path_factory.mktemp("rayhead"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", PATH=bin_dir + os.pathsep + env.get("PATH", ""),
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    # every port explicit: another Ray on this machine (the session's) already holds the defaults
    gcs, dash, agent, metrics = free_port(), free_port(), free_port(), free_port()
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=200000000", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError as e:
            if getattr(e, "code", None) in (401, 403):  # up, and asking for the token
                break
            time.sleep(1)
    else:
        pytest.fail("the Ray head did not come up within 120 s")
    yield {"address": address, "env": env, "ray": ray}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)  # `ray start --block` lingers after SIGTERM; its processes are killed below anyway
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    # processes of this head carry its temp dir in their command line; never `ray stop` (it kills every Ray)
    subprocess.run(["pkill", "-9", "-f", temp], check=False)
    shutil.rmtree(temp, ignore_errors=True)


def test_curate_job_submitted_with_ray_job_submit(ray_head, tmp_path, sgd_sample):
    home = str(tmp_path / "home")
    ingest_file(Store(home), sgd_sample)
    # the dashboard refuses a client without the token
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{ray_head['address']}/api/jobs/", timeout=5)
    cmd = [ray_head["ray"], "job", "submit", "--address", ray_head["address"], "--working-dir", REPO,
           "--runtime-env-json", json.dumps({"env_vars": {"FLYWHEEL_HOME": home}}),
           "--", "python", "jobs/curate.py", "--config", "jobs/curate.yaml", "--json"]
    for _ in range(60):  # the head's dashboard agent starts a little after the dashboard itself
        out = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr)
    store = Store(home)
    for agent in ("sgd_Flights", "sgd_Restaurants"):
        version = store.read_json(f"datasets/{agent}/LATEST")["version"]
        manifest = store.read_json(f"datasets/{agent}/{version}/manifest.json")
        assert manifest["counts"]["in"] == 40 and manifest["counts"]["kept"] > 30
