"""Where a training run's workers go, and a clear failure when they cannot go anywhere.

Each worker asks Ray for `threads_per_worker` CPUs (and `memory_per_worker_mb`, when set) besides its GPU. When
the cluster cannot hold every worker at once, Ray Train waits: it asks again every start timeout, forever by
default. On a cluster whose autoscaler adds nodes that is right; on a fixed cluster it is a run that never starts
and says nothing (seen on the three-node test bed: a retrain with 2 x 1 CPU workers waited for good because the
agent's serving replica held 0.5 CPU of one node). So a run waits `placement_timeout_s` at most (three tries of a
third each), then fails with `PlacementError`, which says what the run asks, what the cluster has free and in all,
and which actors hold resources. `placement_timeout_s` 0 keeps Ray's wait-forever.
"""

from __future__ import annotations

import os
from typing import Any

from flywheel.config import DistillConfig

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Ray Train's controller, which the driver's
TRIES = 3  # environment reaches (Ray Train propagates this variable)


class PlacementError(RuntimeError):
    """The training workers could not all be placed within `placement_timeout_s`."""


def worker_resources(cfg: DistillConfig) -> dict:
    """What each training worker asks Ray for besides its GPU: `threads_per_worker` CPUs and, when set,
    `memory_per_worker_mb` of memory (the scheduler then places no more workers on a node than its memory holds)."""
    resources: dict = {"CPU": cfg.threads_per_worker}
    if cfg.memory_per_worker_mb:
        resources["memory"] = cfg.memory_per_worker_mb * 2**20
    return resources


def failure_config(cfg: DistillConfig) -> Any:
    """Ray Train's FailureConfig for the run: `max_failures` worker-group restarts, and startup retries bounded by
    `placement_timeout_s` (unbounded at 0). Sets the start timeout each try waits (see the module doc); at 0 the
    environment is left as it is (Ray's default, or the operator's own setting)."""
    from ray.train import FailureConfig

    if cfg.placement_timeout_s:
        os.environ[START_TIMEOUT_ENV] = f"{cfg.placement_timeout_s / TRIES:g}"
    return FailureConfig(max_failures=cfg.max_failures,
                         controller_failure_limit=TRIES - 1 if cfg.placement_timeout_s else -1)


def explained(cfg: DistillConfig, error: BaseException) -> BaseException:
    """`error` from `trainer.fit()` as a `PlacementError` when the workers could not be placed; else `error`."""
    import ray
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if not isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
        return error
    ask = {**worker_resources(cfg), **({"GPU": 1} if cfg.use_gpu else {})}
    return PlacementError(
        f"{cfg.agent}: the {cfg.num_workers} training workers could not all be placed in "
        f"{cfg.placement_timeout_s:g} s: each asks {_readable(ask)}; the cluster has {_readable(ray.available_resources())} "
        f"free of {_readable(ray.cluster_resources())}; held by {_holders() or 'no running actor (tasks or placement groups hold it)'}. "
        f"Lower num_workers or threads_per_worker, give the cluster a node, or free what others hold "
        f"(placement_timeout_s 0 waits as long as it takes)")


def _holders(limit: int = 5) -> str:
    """The alive actors that hold CPUs or GPUs, most first: 'ServeReplica:flywheel:StudentModel 0.5 CPU, ...'.
    Read from the GCS actor table (Ray-internal, but it needs no dashboard, which the public state API does)."""
    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        rows = [gcs_pb2.ActorTableData.FromString(raw)
                for raw in state._connect_and_get_accessor().get_actor_table(None, "ALIVE")]
    except Exception:  # an explanation's extra, never a reason to hide the error
        return ""
    held = []
    for row in rows:
        need = {k: v for k, v in row.required_resources.items() if k in ("CPU", "GPU") and v}
        if need:
            held.append((sum(need.values()), f"{row.class_name} {_readable(need)}"))
    return ", ".join(text for _, text in sorted(held, key=lambda h: -h[0])[:limit])


def _readable(resources: dict) -> str:
    """{"CPU": 1.5, "memory": 2**31} -> '1.5 CPU, 2048 MiB memory' (the object store and Ray's node keys left
    out)."""
    parts = []
    for key in sorted(resources):
        value = resources[key]
        if key == "memory":
            parts.append(f"{value / 2**20:.0f} MiB memory")
        elif key in ("CPU", "GPU"):
            parts.append(f"{value:g} {key}")
    return ", ".join(parts) or "nothing"
