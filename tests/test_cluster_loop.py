"""The whole loop on three Ray nodes that share nothing but an S3 home, each stage a `ray job submit` of its
`jobs/` entrypoint (`bench/cluster_loop.py` is the test bed: what runs where, and the guard on the driver's local
folders).

    .venv/bin/python -m pytest tests/test_cluster_loop.py -q -s
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
from cluster_loop import run_loop  # noqa: E402

pytestmark = pytest.mark.slow


def test_the_whole_loop_runs_as_ray_jobs_on_three_nodes_with_an_s3_home(tmp_path, tiny_model):
    result = run_loop(str(tmp_path), tiny_model)
    print(json.dumps(result, indent=1))
    assert "failed" not in result, result.get("log", result)
    assert result["ingested"]["accepted"] == 1567 and result["curated"]["in"] > 100, result
    assert result["trained"]["version"] == "v1" and result["promoted"], result
    assert result["train_on_both_workers"], result  # one Train worker on each worker node
    assert result["student_on_gpu_node"] and result["ingress_on_head"], result
    assert result["answered"] == 24 and result["backends"] == ["student:sgd_Flights@v1"], result
    assert result["wal_keys"] > 0 and result["monitor"]["n_new"] == 24, result  # every answer reached the monitor
    assert result["controller"]["passes"] == [{"sgd_Flights": "promoted"}], result  # a retrain on the new traffic
    assert result["after"] == "student:sgd_Flights@v2", result  # ... gated, promoted and served
    assert result["guard_refused"], result  # the guard bites: a task opening the driver's local logs fails
    # each worker node copied the base model from the home into its own temp folder
    copies = {node: [c for c in names if not c.startswith(".")] for node, names in result["node_model_copies"].items()}
    assert all(len(c) == 1 for c in copies.values()), result  # one copy each, named by the model's content
