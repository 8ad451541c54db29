"""The OpenAI-compatible Ray Serve app: one student base model with a LoRA adapter per agent, the teacher as
fallback, API keys per tenant, limits, and every answer captured before it is complete.

    flywheel serve --home .flywheel --teacher-url http://localhost:9000/v1 --port 8000   # calls run(cfg)

Three deployments, each autoscaled between its min and max replicas (`flywheel.serve.autoscale`):
- `Ingress` (`flywheel.serve.ingress`: FastAPI, no CPU reserved, on the head node by default) checks the key, the
  limit and the body, routes each agent to the student or the teacher, and captures every answer; its module doc
  lists the routes and the error statuses.
- `StudentModel` (`flywheel.serve.student`) holds one engine and streams each answer as it is decoded.
- `TeacherProxy` (`flywheel.serve.teacher`, only with a `teacher_url`) calls the teacher endpoint; it scales up
  as soon as drift routes busy agents to the teacher.

This module places and starts them: `build_app` (the application), `run` (deploy and wait until it answers),
`shutdown`, and `app_from_env` (the builder `serve run` and KubeRay's RayService import).
"""

import logging
import time

from ray import serve
from ray.serve import Application

from flywheel.config import ConfigError, ServeConfig
from flywheel.routing import STUDENT, TEACHER
from flywheel.serve.auth import KeyStore, is_loopback
from flywheel.serve.autoscale import INGRESS, autoscaling_config
from flywheel.serve.ingress import Ingress
from flywheel.serve.student import StudentModel
from flywheel.serve.teacher import TeacherProxy
from flywheel.storage import Store

APP_NAME = "flywheel"
logger = logging.getLogger("ray.serve")


# -- auth at start ----------------------------------------------------------------------------------------
def check_auth_at_start(cfg: ServeConfig, store: Store) -> str:
    """The auth mode this app runs with; refuses a non-loopback host without keys unless auth is off."""
    if cfg.auth == "off":
        return "off: every caller may call every agent (auth: off)"
    has_keys = KeyStore(store).any_active()
    if not has_keys and (cfg.auth == "keys" or not is_loopback(cfg.host)):
        raise ConfigError(f"auth: refusing to serve on {cfg.host} without API keys. Create one with `flywheel keys "
                          "create --tenant <tenant> --agents <agent,...>` (or '*'), or switch auth off explicitly "
                          "(--auth off) for a trusted network")
    if not has_keys:
        return f"open on loopback ({cfg.host}): no API keys exist yet; every key created later is required"
    return "API keys required (Authorization: Bearer <key>)"


# -- entrypoints ----------------------------------------------------------------------------------------------
HEAD_NODE_RESOURCE = "node:__internal_head__"  # what Ray gives the head node alone (ray._common.constants)


def student_resources(cfg: ServeConfig) -> dict:
    """A student replica's Ray actor options: `replica_cpus`, `replica_gpus` when set (the autoscaler then starts
    a GPU node for it, and Ray gives it its card through CUDA_VISIBLE_DEVICES), `replica_memory_mb` as Ray memory,
    and `replica_python` when set (the replica's worker runs that interpreter, e.g. vLLM's environment; it needs
    the same ray and flywheel)."""
    options: dict = {"num_cpus": cfg.replica_cpus}
    if cfg.replica_gpus:
        options["num_gpus"] = cfg.replica_gpus
    if cfg.replica_memory_mb:
        options["memory"] = cfg.replica_memory_mb * 2**20
    if cfg.replica_python:
        options["runtime_env"] = {"py_executable": cfg.replica_python}
    return options


def ingress_resources(cfg: ServeConfig) -> dict:
    """An Ingress replica's Ray actor options: no CPU (it waits on its handles), and a sliver of the head node's
    own resource when `ingress_on_head`, so Ray places it on the head."""
    options: dict = {"num_cpus": 0}
    if cfg.ingress_on_head:
        options["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return options


def build_app(cfg: ServeConfig) -> Application:
    """The Serve application: `Ingress` in front of `StudentModel` and `TeacherProxy`, each with its autoscaling
    (`flywheel.serve.autoscale`); the home is resolved here, on the driver."""
    store = Store(cfg.home or None)
    logger.info("flywheel serve auth: %s", check_auth_at_start(cfg, store))
    student = StudentModel.options(max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
                                   max_queued_requests=cfg.max_queued_requests,
                                   autoscaling_config=autoscaling_config(cfg, STUDENT),
                                   ray_actor_options=student_resources(cfg)).bind(store.uri, cfg)
    teacher = TeacherProxy.options(max_ongoing_requests=cfg.teacher_max_ongoing_requests,
                                   max_queued_requests=cfg.max_queued_requests,
                                   autoscaling_config=autoscaling_config(cfg, TEACHER),
                                   ray_actor_options={"num_cpus": cfg.teacher_replica_cpus},
                                   ).bind(cfg.teacher_url, cfg.teacher_model, cfg.teacher_api_key_env,
                                          cfg.teacher_timeout_s) if cfg.teacher_url else None
    # The proxy refuses requests beyond the ingress's queue itself (503, Retry-After, a plain-text body).
    from ray.serve.config import BackpressureConfig

    return Ingress.options(max_ongoing_requests=cfg.max_ongoing_requests,
                           max_queued_requests=max(cfg.max_queued_requests, 4 * cfg.max_ongoing_requests)
                           if cfg.max_queued_requests > 0 else -1,
                           autoscaling_config=autoscaling_config(cfg, INGRESS),
                           ray_actor_options=ingress_resources(cfg),
                           backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
                           ).bind(store.uri, cfg, student, teacher)


def run(cfg: ServeConfig, ready_timeout_s: float = 60.0) -> str:
    """Deploy the app on the current Ray (started here if needed); returns the OpenAI base URL once it answers."""
    import httpx
    import ray

    mode = check_auth_at_start(cfg, Store(cfg.home or None))
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    base = f"http://{host}:{cfg.port}"
    deadline = time.monotonic() + ready_timeout_s
    while True:  # the proxy learns the route a moment after serve.run returns
        try:
            if httpx.get(f"{base}/healthz", timeout=2.0).status_code == 200:
                logger.info("serving at %s/v1; auth %s", base, mode)
                return f"{base}/v1"
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app is deployed but {base}/healthz does not answer. HTTP host and port are fixed "
                               "when Serve first starts on a cluster: if Serve was already running with other "
                               "http options, call flywheel.serve.app.shutdown() (or `serve shutdown`) and retry")
        time.sleep(0.25)


def shutdown() -> None:
    """Stop Serve (every app, the proxy and the controller); Ray itself keeps running."""
    serve.shutdown()


def app_from_env(args: dict) -> Application:
    """Application builder for `serve run flywheel.serve.app:app_from_env` and KubeRay's RayService.

    `args` are `ServeConfig` fields (strictly checked); FLYWHEEL_HOME and FLYWHEEL_STUDENT come from the environment.
    The HTTP host is Serve's `http_options`, which this builder cannot see: unless `args` name a loopback `host`,
    the app is taken to be reachable from the network, so it needs API keys in the home or `auth: off`.
    """
    from flywheel.config import build

    return build_app(build(ServeConfig, {"host": "0.0.0.0", **dict(args or {})}))
