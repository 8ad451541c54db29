"""The OpenAI-compatible Ray Serve app: one student base model with a LoRA adapter per agent, the teacher as
fallback, and every answer captured before it is returned.

    flywheel serve --home .flywheel --teacher-url http://localhost:9000/v1 --port 8000   # calls run(cfg)

    POST /v1/chat/completions    `model` is the agent id; `stream: true` answers with server-sent events
    GET  /v1/models              the known agents (the catalog and the registry)
    GET  /healthz

Two deployments:
- `Ingress` (FastAPI, no CPU reserved) validates the body, routes the agent (cached for `routing_ttl_s`), asks
  the student or the teacher, appends the log record to the write-ahead log (`LogStore.append`, fsynced) and only
  then answers. Header `x-flywheel-backend` (and `system_fingerprint`) names what answered, e.g.
  `student:sgd_Flights@v2` or `teacher:<model>`; `x-flywheel-record-id` is the captured record's id.
- `StudentModel` holds one `HFEngine`. Adapters are Serve-multiplexed under the model id `<agent>@<version>`, so
  a promotion loads the new version and LRU eviction unloads the old one. Requests for different agents share
  one `generate` call (PEFT runs each row of a batch through its own adapter).

An agent whose route is "teacher" (drift) or that has no production adapter goes to the teacher; with no teacher
configured that is HTTP 503. Unknown agents are 404 `model_not_found`, bad bodies 400 naming the field, teacher
failures 502. Every error is an OpenAI error body.
"""

# No `from __future__ import annotations` here: Serve 2.60 rebuilds the ingress methods' signatures and then no
# longer sees `request: Request` (FastAPI answers 422 "query.request: Field required").
import asyncio
import contextvars
import json
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel.capture.ingest import SESSION_KEYS, Rejected, canonical_json, normalise_message, quarantine_row
from flywheel.capture.store import LogStore
from flywheel.config import ServeConfig
from flywheel.prompts import chat_messages
from flywheel.registry.registry import Registry
from flywheel.routing import STUDENT, TEACHER, get_route, known_agents
from flywheel.serve.protocol import (APIError, ChatCompletionRequest, completion_from_text, error_body,
                                     new_id, parse_request, stream_events, token_budget)
from flywheel.serve.teacher import HTTPTeacher, TeacherError
from flywheel.storage import Store

APP_NAME = "flywheel"
logger = logging.getLogger("ray.serve")


# -- routing and capture: plain functions over the store ------------------------------------------------------
@dataclass(frozen=True)
class Route:
    backend: str  # STUDENT | TEACHER
    model_id: str | None  # "<agent>@<version>" when the student answers
    tenant: str
    reason: str


def resolve_route(store: Store, agent: str) -> Route | None:
    """Who answers `agent` now; None when the agent is unknown (neither in the catalog nor in the registry)."""
    if not agent or "/" in agent or agent.startswith("."):
        return None
    catalog = store.read_json(f"agents/{agent}.json")
    if catalog is None and not store.exists(f"registry/{agent}.json"):
        return None
    tenant = str((catalog or {}).get("tenant") or "default")
    route = get_route(store, agent)
    if route.get("mode") == TEACHER:
        return Route(TEACHER, None, tenant, f"its route is teacher: {route.get('reason')}")
    entry = Registry(store).alias(agent)
    if entry is None:
        return Route(TEACHER, None, tenant, "it has no production adapter yet")
    return Route(STUDENT, f"{agent}@{entry['version']}", tenant, "production adapter")


def list_agents(store: Store) -> list[str]:
    return sorted(set(known_agents(store)) | set(Registry(store).agents()))


def log_record(record_id: str, agent: str, tenant: str, req: ChatCompletionRequest, rows: list[dict],
               tools: list[dict], completion: dict, model: str, latency_ms: float) -> dict:
    """One answered request as a `schema.LOG_RECORD` row; `Rejected` when the answer cannot be one."""
    answer = normalise_message({**completion["choices"][0]["message"], "role": "assistant"}, "response")
    usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
    meta = req.metadata or {}
    session = next((str(meta[k]) for k in SESSION_KEYS if meta.get(k) not in (None, "")), None)
    tokens = [usage.get(k) if isinstance(usage.get(k), int) else None for k in ("prompt_tokens", "completion_tokens")]
    return {"record_id": record_id, "agent_id": agent, "tenant": tenant, "timestamp": time.time(),
            "session_id": session, "messages": rows, "tools_json": canonical_json(tools), "response": answer,
            "model": model, "latency_ms": latency_ms, "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
            "feedback": None, "source": "serve", "extra_json": None}


# -- the student: one engine, multiplexed adapters, batches that mix agents -----------------------------------
class _Adapter:
    """One adapter in the engine. Serve's multiplexer calls `__del__` when it evicts it (LRU); the unload waits
    for requests already holding it. Python calls `__del__` again at garbage collection: that is a no-op."""

    def __init__(self, engine: Any, model_id: str, name: str):
        self.engine, self.model_id, self.name = engine, model_id, name
        self._users, self._evicted, self._gone = 0, False, False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    async def release(self) -> None:
        with self._lock:
            self._users -= 1
            unload = self._evicted and self._users == 0
        if unload:
            await asyncio.to_thread(self._unload)

    def _unload(self) -> None:
        with self._lock:
            if self._gone:
                return
            self._gone = True
        self.engine.unload_adapter(self.name)
        logger.info("unloaded adapter %s (%s)", self.model_id, self.name)

    def __del__(self) -> None:
        try:
            with self._lock:
                self._evicted = True
                idle = self._users == 0
            if idle:
                self._unload()
        except Exception:  # interpreter shutdown: nothing left to free
            pass


@serve.deployment(name="StudentModel")
class StudentModel:
    def __init__(self, home: str, cfg: ServeConfig):
        from flywheel.serve.engine import HFEngine

        self.store, self.cfg = Store(home), cfg
        self.engine = HFEngine(cfg.base_model, threads=max(1, int(cfg.replica_cpus)))
        self.stats = {"requests": 0, "batches": 0, "mixed_batches": 0, "largest_batch": 0, "loads": 0}
        self._model_ids: dict[str, str] = {}  # engine adapter name -> "<agent>@<version>"
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_s)

        async def load_adapter(model_id: str) -> _Adapter:
            return await asyncio.to_thread(self._load, model_id)

        # Wired here rather than as a decorator: the cache size comes from the config.
        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter)

    def _load(self, model_id: str) -> _Adapter:
        agent, _, version = model_id.rpartition("@")
        entry = Registry(self.store).get(agent, version)
        tmp = None if self.store.local else tempfile.mkdtemp(prefix="flywheel-adapter-")
        try:
            path = self.store.local_copy(entry["adapter"], tmp or "")
            # A fresh engine name per load, so a late unload of an evicted copy never hits a reloaded one.
            name = f"{re.sub(r'[^A-Za-z0-9_@-]', '_', model_id)}-{uuid.uuid4().hex[:6]}"
            self.engine.load_adapter(name, path)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        self._model_ids[name] = model_id
        self.stats["loads"] += 1
        logger.info("loaded adapter %s from %s", model_id, entry["adapter"])
        return _Adapter(self.engine, model_id, name)

    async def generate(self, turns: list[dict], budget: int) -> dict:
        """Answer one prompt with the adapter named by the request's multiplexed model id."""
        adapter = await self._adapter(serve.get_multiplexed_model_id())
        adapter.acquire()
        try:
            # Serve 2.60 splits a @serve.batch batch by multiplexed model id. Enqueue from a blank context so one
            # batch mixes agents; without this trick batches would just be per agent.
            gen = await contextvars.Context().run(asyncio.ensure_future,
                                                  self._batched((turns, adapter.name, budget)))
        finally:
            await adapter.release()
        return {"text": gen.text, "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                "truncated": gen.completion_tokens >= budget}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[tuple[list[dict], str, int]]) -> list[Any]:
        out: list[Any] = [None] * len(items)
        by_budget: dict[int, list[int]] = {}
        for i, (_, _, budget) in enumerate(items):
            by_budget.setdefault(budget, []).append(i)
        for budget, rows in by_budget.items():
            gens = await asyncio.to_thread(self.engine.generate, [items[i][0] for i in rows],
                                           [items[i][1] for i in rows], budget)
            for i, gen in zip(rows, gens):
                out[i] = gen
        self.stats["requests"] += len(items)
        self.stats["batches"] += 1
        self.stats["mixed_batches"] += len({name for _, name, _ in items}) > 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        return out

    def info(self) -> dict:
        """Counters and the adapters loaded in the engine right now (as model ids)."""
        return {**self.stats, "adapters": sorted(self._model_ids[n] for n in self.engine.adapters())}


# -- the ingress: validate, route, answer, capture ------------------------------------------------------------
api = FastAPI(title="Flywheel", description="OpenAI-compatible chat completions; `model` is the agent id.")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = (exc.errors() or [{}])[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return JSONResponse(error_body(f"{where}: {err.get('msg')}", code="invalid_request", param=where), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", code=code),
                        status_code=exc.status_code)


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error"),
                        status_code=500)


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, home: str, cfg: ServeConfig, student: DeploymentHandle):
        self.store, self.cfg, self.student = Store(home), cfg, student
        replica = serve.get_replica_context().replica_id.unique_id
        self.logs = LogStore(self.store, writer_id="serve-" + re.sub(r"[^A-Za-z0-9_-]", "_", replica))
        self.teacher = (HTTPTeacher(cfg.teacher_url, cfg.teacher_model, cfg.teacher_api_key_env, cfg.teacher_timeout_s)
                        if cfg.teacher_url else None)
        self._routes: dict[str, tuple[float, Route | None]] = {}

    async def _route(self, agent: str) -> Route:
        now = time.monotonic()
        hit = self._routes.get(agent)
        if hit is None or hit[0] < now:
            if len(self._routes) > 10_000:
                self._routes.clear()
            hit = (now + self.cfg.routing_ttl_s, await asyncio.to_thread(resolve_route, self.store, agent))
            self._routes[agent] = hit
        if hit[1] is None:
            raise APIError(404, f"The model {agent!r} does not exist: it is not a known agent. GET /v1/models lists "
                                "the agents; ingest its logs or register it first.", code="model_not_found",
                           param="model")
        return hit[1]

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        agents = await asyncio.to_thread(list_agents, self.store)
        return {"object": "list", "data": [{"id": a, "object": "model", "created": 0, "owned_by": "flywheel"}
                                           for a in agents]}

    @api.get("/v1/models/{agent}")
    async def model(self, agent: str) -> dict:
        await self._route(agent)
        return {"id": agent, "object": "model", "created": 0, "owned_by": "flywheel"}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        req, rows = parse_request(body)
        route = await self._route(req.model)
        request_id, start = new_id(), time.perf_counter()
        if route.backend == STUDENT:
            completion, backend = await self._ask_student(req, body, rows, route, request_id)
        else:
            completion, backend = await self._ask_teacher(req, body, route, request_id)
        await self._capture(request_id, req, body, rows, route, completion, backend,
                            (time.perf_counter() - start) * 1000)
        headers = {"x-flywheel-backend": backend, "x-flywheel-record-id": request_id}
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(completion, usage), media_type="text/event-stream", headers=headers)
        return JSONResponse(completion, headers=headers)

    async def _ask_student(self, req: ChatCompletionRequest, body: dict, rows: list[dict], route: Route,
                           request_id: str) -> tuple[dict, str]:
        turns = chat_messages(rows, body.get("tools") or [], self.cfg.max_history)
        budget = token_budget(req, self.cfg.max_new_tokens)
        try:
            out = await self.student.options(multiplexed_model_id=route.model_id).generate.remote(turns, budget)
        except Exception as e:
            raise APIError(500, f"the student ({route.model_id}) failed: {_last_line(e)}", "server_error",
                           "student_error") from None
        backend = f"student:{route.model_id}"
        return completion_from_text(req.model, out["text"], out["prompt_tokens"], out["completion_tokens"], backend,
                                    request_id, truncated=out["truncated"]), backend

    async def _ask_teacher(self, req: ChatCompletionRequest, body: dict, route: Route,
                           request_id: str) -> tuple[dict, str]:
        if self.teacher is None:
            raise APIError(503, f"agent {req.model!r} must be answered by the teacher ({route.reason}) but no teacher "
                                "is configured: set teacher_url (--teacher-url), or promote an adapter for it",
                           "server_error", "teacher_not_configured")
        try:
            answer = await self.teacher.complete(req.model, body)
        except TeacherError as e:
            raise APIError(502, str(e), "server_error", "teacher_error") from None
        backend = f"teacher:{self.teacher.model_for(req.model)}"
        completion = {**answer, "id": f"chatcmpl-{request_id}", "object": "chat.completion", "model": req.model,
                      "created": answer.get("created") or int(time.time()), "system_fingerprint": backend}
        return completion, backend

    async def _capture(self, request_id: str, req: ChatCompletionRequest, body: dict, rows: list[dict], route: Route,
                       completion: dict, backend: str, latency_ms: float) -> None:
        """Durably store the answered request before the caller sees the answer (at-least-once)."""
        try:
            record = log_record(request_id, req.model, route.tenant, req, rows, body.get("tools") or [], completion,
                                backend, latency_ms)
        except Rejected as e:  # e.g. the teacher's tool-call arguments are not JSON: keep it, set aside
            raw = json.dumps({"request": body, "response": completion}, default=str)
            row = quarantine_row(e.reason, e.detail, "serve", raw, "serve", request_id, req.model)
            await asyncio.to_thread(self.logs.write_quarantine, [row], "serve", request_id)
            logger.warning("record %s quarantined: %s", request_id, e)
            return
        await asyncio.to_thread(self.logs.append, [record])


# -- entrypoints ----------------------------------------------------------------------------------------------
def build_app(cfg: ServeConfig) -> Application:
    """The Serve application: `Ingress` in front of `StudentModel` (the home is resolved here, on the driver)."""
    home = Store(cfg.home or None).uri
    student = StudentModel.options(num_replicas=cfg.num_replicas, max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
                                   ray_actor_options={"num_cpus": cfg.replica_cpus}).bind(home, cfg)
    return Ingress.bind(home, cfg, student)


def run(cfg: ServeConfig, ready_timeout_s: float = 60.0) -> str:
    """Deploy the app on the current Ray (started here if needed); returns the OpenAI base URL once it answers."""
    import httpx
    import ray

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
    """
    from flywheel.config import build

    return build_app(build(ServeConfig, dict(args or {})))
