"""Join the Ray instance already running here, or start one: `connect_ray()`, for every verb and the controller.

    from flywheel.raycluster import connect_ray
    connect_ray(configure_logging=False)      # {"address": "127.0.0.1:6379", "started": False, ...}

Two drivers that each start their own local Ray leave two instances on one machine, and Ray Train's placement
group cleaner then fails with "Found multiple active Ray instances". So a verb first looks for an instance to join,
in this order: `RAY_ADDRESS` (a submitted Ray job's driver always has it); the cluster of the last `ray start` here
(`/tmp/ray/ray_current_cluster`) if it is alive; the one local instance that is running (Serve, the controller, a
demo). Only when there is none (or with `RAY_ADDRESS=local`) does it start a fresh local Ray. Several local
instances and no `RAY_ADDRESS` is an error that says which to set, never a guess; nothing is ever stopped.

Token auth stays on (Ray 2.60 turns it on for `ray start` clusters and for new local instances). Joining an
instance found here sends the local token (`~/.ray/auth_token` or `RAY_AUTH_TOKEN`) as `ray.init(address="auto")`
would; with `RAY_ADDRESS` the client runs as the environment says (`RAY_AUTH_MODE=token` for a token cluster).
A joined instance's workers keep the environment of the process that started them, not this shell's: so joining
sends the settings a stage's remote code reads (`FORWARDED`: the S3 endpoint and region; the home travels in each
stage's arguments) in the job's runtime environment, which every task, actor, Train worker, Tune trial and Serve
replica of this driver inherits (Serve takes the driver's runtime env as its deployments' default). Keys a
submitted job already sets are left to it (Ray refuses a conflict). Credentials are not copied there (the
dashboard shows a job's runtime env): each node brings its own (an instance role, IRSA, or the cluster config's
environment).
"""

from __future__ import annotations

import os
from typing import Any


FORWARDED = ("FLYWHEEL_S3_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3")


def forwarded_env(environ: Any = os.environ) -> dict[str, str]:
    """The `FORWARDED` settings set here and not already in a submitted job's runtime env (pure)."""
    import json

    job = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = set(((job.get("runtime_env") or {}).get("env_vars") or {}))
    return {k: environ[k] for k in FORWARDED if environ.get(k) and k not in taken}


def choose_address(env_address: str | None, bootstrap: str | None, live: set[str] | frozenset[str]) -> str | None:
    """The address to join, or None to start a fresh local Ray (pure: the decision, without looking).

    `env_address`: `RAY_ADDRESS`; `bootstrap`: the address `ray start` last recorded on this machine; `live`: the
    GCS addresses of the Ray instances running here.
    """
    if env_address:
        return env_address
    if bootstrap and bootstrap in live:
        return bootstrap
    if len(live) == 1:
        return next(iter(live))
    if len(live) > 1:
        raise ConnectionError(f"several Ray instances run on this machine ({', '.join(sorted(live))}); set "
                              f"RAY_ADDRESS to the one to join (e.g. RAY_ADDRESS={sorted(live)[0]})")
    return None


def find_address() -> tuple[str | None, bool]:
    """(address to join or None, whether it came from RAY_ADDRESS)."""
    env_address = os.environ.get("RAY_ADDRESS") or None
    if env_address:
        return env_address, True
    from ray._private.services import find_gcs_addresses  # a scan of the raylet processes, as `ray status` does
    from ray._private.utils import read_ray_address

    return choose_address(None, read_ray_address(), set(find_gcs_addresses())), False


def _auth_failed(e: BaseException | None) -> bool:
    while e is not None:
        if type(e).__name__ == "AuthenticationError":
            return True
        e = e.__cause__ or e.__context__
    return False


def _use_local_token() -> None:
    """What `ray.init(address="auto")` does for a local instance: with RAY_AUTH_MODE unset and a token available
    (~/.ray/auth_token, RAY_AUTH_TOKEN), send it. An explicit RAY_AUTH_MODE (token or disabled) is kept as it is."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect_ray(start: dict[str, Any] | None = None, **kwargs: Any) -> dict:
    """Connect this process to Ray: join the instance running here, else start one with `ray.init(**start)`.

    `kwargs` go to `ray.init` either way (`configure_logging`, `log_to_driver`, ...); `start` only when a fresh
    instance starts (`num_cpus`, `object_store_memory`, `include_dashboard`: Ray refuses them when joining).
    Returns {"address": the GCS address, "started": whether this call started the instance, "dashboard_url"}.
    A `ConnectionError` says what to set when the instance cannot be joined.
    """
    import ray

    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address, "started": False, "dashboard_url": None}
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address, from_env = find_address()
    ctx = None
    if address and address != "local":  # RAY_ADDRESS=local: a fresh instance, as `ray.init` reads it
        if not from_env:
            _use_local_token()
        env = forwarded_env()
        try:
            ctx = ray.init(address=address, **({"runtime_env": {"env_vars": env}} if env else {}), **kwargs)
        except Exception as e:
            if _auth_failed(e):
                raise ConnectionError(f"the Ray instance at {address} asks for its token: export RAY_AUTH_MODE=token "
                                      f"and make the token available (~/.ray/auth_token or RAY_AUTH_TOKEN)") from e
            if from_env or not isinstance(e, ConnectionError):  # the user named this cluster: it or nothing
                raise
            ctx = None  # the instance found a moment ago has gone: start our own
    started = ctx is None
    if started:  # "local": never a stale `ray start` record, which `ray.init()` would try to join
        ctx = ray.init(address="local", **(start or {}), **kwargs)
    return {"address": ray.get_runtime_context().gcs_address, "started": started,
            "dashboard_url": getattr(ctx, "dashboard_url", None)}


SHARED_HOME_ENV = "FLYWHEEL_HOME_SHARED"  # "1": this local home path is one filesystem every node mounts (NFS)


def split_home(uri: str, local: bool, nodes: int, shared: bool) -> str | None:
    """Why a home would split across this cluster's nodes (pure), or None: a local path on a cluster of several
    nodes is a different folder on each, so a stage's workers would write where the driver never reads."""
    if not local or nodes <= 1 or shared:
        return None
    return (f"home: {uri} is a local path and this Ray cluster has {nodes} nodes: each node's workers would read "
            f"and write a folder of their own there. Use an s3:// home (FLYWHEEL_HOME=s3://bucket/flywheel), or, "
            f"if every node mounts this path as one filesystem, set {SHARED_HOME_ENV}=1")


def check_home(home: str) -> None:
    """Refuse (`ConfigError`) a home that `split_home` finds would split across the nodes of the Ray joined here."""
    import ray

    from flywheel.config import ConfigError
    from flywheel.storage import Store

    store = Store(home or None)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    problem = split_home(store.uri, store.local, nodes, os.environ.get(SHARED_HOME_ENV) == "1")
    if problem:
        raise ConfigError(problem)


__all__ = ["connect_ray", "choose_address", "find_address", "split_home", "check_home"]
