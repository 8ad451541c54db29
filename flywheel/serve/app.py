"""The OpenAI-compatible Ray Serve app: one student base model with a LoRA adapter per agent, the teacher as
fallback, API keys per tenant, limits, and every answer captured before it is complete.

    flywheel serve --home .flywheel --teacher-url http://localhost:9000/v1 --port 8000   # calls run(cfg)

    POST /v1/chat/completions    `model` is the agent id; `stream: true` streams tokens as server-sent events
    GET  /v1/models              the agents the caller's key may call
    GET  /healthz                liveness (the ingress answers)
    GET  /readyz                 readiness (the student engine decodes a token; the log store takes writes)
    POST /v1/feedback            {record_id, rating: up|down, correction?, comment?, model?} (the key's tenant's record)
    GET  /review                 the review queue (HTML) of the agents the key may call; `?key=` signs in (cookie)
    POST /review/{item}/approve  /review/{item}/correct (form field or JSON `message`): decisions become labels
    GET  /status, /status.json   per agent: backend, production vs teacher, cost, drift, retrains, last cycle

Pages (`flywheel.review.pages`) take the key from `Authorization: Bearer`, or from an HttpOnly cookie that
`GET /review?key=...` or the sign-in form (`POST /review/login`) sets; their forms carry a CSRF token derived from
the key, and a cross-origin POST is refused. The logic lives in `flywheel.review`; the routes only check who asks.

Two deployments:
- `Ingress` (FastAPI, no CPU reserved) checks the key, the rate limit and the body (size, then the OpenAI
  contract: `flywheel.serve.protocol`), routes the agent (cached for `routing_ttl_s`), asks the student or the
  teacher and appends the log record to the write-ahead log (`LogStore.append`, fsynced) before the answer is
  complete: a plain answer is returned after the append, a streamed answer sends its final chunk and `[DONE]`
  after it. `x-flywheel-record-id` is the captured record's id; `x-flywheel-backend` (and `system_fingerprint`)
  names what answered, e.g. `student:sgd_Flights@v2` or `teacher:<model>`.
- `StudentModel` (`flywheel.serve.student`) holds one engine and streams each answer as it is decoded.

Errors are OpenAI error bodies with the right status: 400 (a parameter, named in `param`), 401 (no or unknown
key), 403 (the key's tenant may not call that agent: said the same whether the agent exists or not), 404
(unknown agent, only to a caller allowed to ask), 413 (body too large), 429 (rate limit, `Retry-After`), 502
(teacher failed), 503 (overloaded or no backend, `Retry-After`), 504 (timed out).
"""

# No `from __future__ import annotations` here: Serve 2.60 rebuilds the ingress methods' signatures and then no
# longer sees `request: Request` (FastAPI answers 422 "query.request: Field required").
import asyncio
import dataclasses
import json
import logging
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel.capture.ingest import SESSION_KEYS, Rejected, canonical_json, normalise_message, quarantine_row
from flywheel.capture.store import LogStore
from flywheel.config import ConfigError, ServeConfig
from flywheel.ids import is_valid_id
from flywheel.prompts import chat_messages
from flywheel.registry.registry import Registry
from flywheel.review import pages as review_pages
from flywheel.review.feedback import ReviewError, record_feedback
from flywheel.review.queue import approve, correct, get_item, list_items
from flywheel.review.status import status_rows
from flywheel.review.web import (DECISION_FIELDS, FEEDBACK_FIELDS, correction, csrf_ok, csrf_token, form_fields,
                                 json_object, reviewer_of, safe_next, same_origin)
from flywheel.routing import STUDENT, TEACHER, get_route, known_agents
from flywheel.serve.auth import KeyStore, Principal, RateLimiter, is_loopback
from flywheel.serve.metrics import ServeMetrics
from flywheel.serve.protocol import (APIError, ChatCompletionRequest, completion_from_text, error_body, new_id,
                                     parse_request, sampling_params, stream_events, student_unsupported)
from flywheel.serve.streaming import DeltaParser, chunk
from flywheel.serve.student import StudentModel
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
    if not is_valid_id(agent):
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


def list_agents(store: Store) -> list[dict]:
    """The catalog and registry agents with the time each was first seen (`created`, Unix seconds)."""
    created: dict[str, int] = {}
    for folder, suffix in (("registry", ".json"), ("agents", ".json")):
        try:
            entries = store.fs.ls(store.path(folder), detail=True)
        except FileNotFoundError:
            continue
        for e in entries:
            name = str(e.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(suffix) and not name.startswith("."):
                stamp = e.get("created") or e.get("mtime") or e.get("LastModified") or 0
                stamp = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0)
                created[name[: -len(suffix)]] = int(stamp)
    known = set(known_agents(store)) | set(Registry(store).agents())
    return [{"id": a, "created": created.get(a, 0)} for a in sorted(known)]


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


# -- feedback, review and status pages (the logic is flywheel.review) -------------------------------------------
COOKIE = "flywheel_key"  # the page sign-in: an HttpOnly cookie holding the key
COOKIE_MAX_AGE_S = 8 * 3600
MAX_FORM_BYTES = 1_000_000


def review_api_error(e: ReviewError) -> APIError:
    kind = {403: "permission_denied_error"}.get(e.status, "invalid_request_error")
    code = {403: "permission_denied", 404: "not_found"}.get(e.status, "invalid_request")
    return APIError(e.status, str(e), kind, code, e.param)


# -- the ingress: authenticate, limit, validate, route, answer, capture ---------------------------------------
api = FastAPI(title="Flywheel", description="OpenAI-compatible chat completions; `model` is the agent id.")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=getattr(exc, "headers", None))


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
    logger.exception("unhandled error on %s", request.url.path)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", "internal_error"),
                        status_code=500)


def _retry(status: int, message: str, code: str, seconds: float, type: str = "server_error") -> APIError:
    err = APIError(status, message, type, code)
    err.headers = {"Retry-After": str(max(1, int(seconds + 0.999)))}
    return err


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else type(exc).__name__


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (before reading it, when declared)."""
    too_big = APIError(413, f"the request body is larger than the limit of {limit} bytes (max_body_bytes)",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


@dataclass
class _Call:
    """One chat-completions request on its way through the ingress."""

    id: str
    req: ChatCompletionRequest
    body: dict
    rows: list[dict]
    route: Route
    tenant: str
    start: float


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, home: str, cfg: ServeConfig, student: DeploymentHandle):
        self.store, self.cfg, self.student = Store(home), cfg, student
        replica = serve.get_replica_context().replica_id.unique_id
        self.logs = LogStore(self.store, writer_id="serve-" + re.sub(r"[^A-Za-z0-9_-]", "_", replica),
                             seal_age_s=cfg.wal_seal_age_s)
        self.teacher = (HTTPTeacher(cfg.teacher_url, cfg.teacher_model, cfg.teacher_api_key_env, cfg.teacher_timeout_s)
                        if cfg.teacher_url else None)
        self.keys = KeyStore(self.store, ttl_s=cfg.auth_cache_s)
        self.limiter = RateLimiter(cfg.rate_limit_rps, cfg.rate_limit_burst)
        self.metrics = ServeMetrics(cfg.metrics_per_agent)
        self._routes: dict[str, tuple[float, Route | None]] = {}
        self._catalog: tuple[float, list[dict]] = (0.0, [])
        self._keys_exist: tuple[float, bool] = (0.0, False)

    def __del__(self) -> None:
        """Serve calls this at a graceful shutdown: seal the open WAL segment so it is compacted at once."""
        try:
            self.logs.close()
        except Exception:
            pass

    # -- who is calling ----------------------------------------------------------------------------------------
    async def _principal(self, request: Request) -> Principal | None:
        """The caller's key, or None where no key is needed; 401 where one is needed and missing or unknown."""
        if self.cfg.auth == "off":
            return None
        header = request.headers.get("authorization")
        principal = await asyncio.to_thread(self.keys.verify, header) if header else None
        if principal is not None:
            return principal
        if self.cfg.auth == "auto" and not await self._any_keys():
            return None
        message = ("invalid API key: the key is unknown or revoked" if header else
                   "missing API key: send `Authorization: Bearer <key>` (create one with `flywheel keys create`)")
        err = APIError(401, message, "invalid_request_error", "invalid_api_key")
        err.headers = {"WWW-Authenticate": "Bearer"}
        raise err

    async def _any_keys(self) -> bool:
        now = time.monotonic()
        if self._keys_exist[0] < now:
            self._keys_exist = (now + self.cfg.auth_cache_s, await asyncio.to_thread(self.keys.any_active))
        return self._keys_exist[1]

    def _limit(self, principal: Principal | None) -> None:
        tenant = principal.tenant if principal else "-"
        wait = self.limiter.acquire(tenant, principal.rate_limit_rps if principal else None,
                                    principal.burst if principal else None)
        if wait > 0:
            raise _retry(429, f"rate limit reached for tenant {tenant!r}; retry after {wait:.1f}s",
                         "rate_limit_exceeded", wait, "rate_limit_error")

    @staticmethod
    def _allow(principal: Principal | None, agent: str) -> None:
        if principal is not None and not principal.may_call(agent):
            raise APIError(403, f"this API key may not call the model {agent!r}", "permission_denied_error",
                           "model_not_allowed", "model")

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

    # -- health and catalog ------------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        checks: dict[str, Any] = {}
        try:
            checks["student"] = await asyncio.wait_for(self.student.ready.remote(), timeout=30)
        except Exception as e:
            checks["student"] = {"ok": False, "error": _last_line(e)}
        try:
            self.store.makedirs("logs/wal")
            checks["log_store"] = {"ok": True}
        except Exception as e:
            checks["log_store"] = {"ok": False, "error": _last_line(e)}
        ok = all(c.get("ok") for c in checks.values())
        return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)

    async def _agents(self) -> list[dict]:
        now = time.monotonic()
        if self._catalog[0] < now:
            self._catalog = (now + self.cfg.routing_ttl_s, await asyncio.to_thread(list_agents, self.store))
        return self._catalog[1]

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        principal = await self._principal(request)
        agents = [a for a in await self._agents() if principal is None or principal.may_call(a["id"])]
        return {"object": "list", "data": [{"id": a["id"], "object": "model", "created": a["created"],
                                            "owned_by": "flywheel"} for a in agents]}

    @api.get("/v1/models/{agent}")
    async def model(self, agent: str, request: Request) -> dict:
        principal = await self._principal(request)
        self._allow(principal, agent)
        await self._route(agent)
        created = next((a["created"] for a in await self._agents() if a["id"] == agent), 0)
        return {"id": agent, "object": "model", "created": created, "owned_by": "flywheel"}

    # -- feedback, review, status (logic in flywheel.review; these only check who asks) ---------------------------
    @api.post("/v1/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        principal = await self._principal(request)
        self._limit(principal)
        try:
            body = json_object(await _read_body(request, MAX_FORM_BYTES), FEEDBACK_FIELDS)
            event = await asyncio.to_thread(record_feedback, self.store, body.get("record_id"),
                                            principal.tenant if principal else None, body.get("rating"),
                                            body.get("correction"), body.get("comment"), body.get("model"))
        except ReviewError as e:
            raise review_api_error(e) from None
        return JSONResponse({"object": "feedback", "id": event["event_id"], "record_id": event["record_id"],
                             "rating": event["rating"]})

    async def _viewer(self, request: Request) -> tuple[bool, Principal | None, str | None]:
        """Pages: (allowed, principal, key) from the Authorization header or the cookie; not allowed: sign in."""
        if self.cfg.auth == "off":
            return True, None, None
        cookie = request.cookies.get(COOKIE)
        for header in (request.headers.get("authorization"), f"Bearer {cookie}" if cookie else None):
            principal = await asyncio.to_thread(self.keys.verify, header) if header else None
            if principal is not None:
                return True, principal, header.split(None, 1)[1].strip()
        return self.cfg.auth == "auto" and not await self._any_keys(), None, None

    async def _visible(self, principal: Principal | None) -> list[str]:
        """The agents a page may show: those the key may call (every known agent in open mode)."""
        return [a["id"] for a in await self._agents() if principal is None or principal.may_call(a["id"])]

    @api.get("/review")
    async def review(self, request: Request) -> Response:
        query = request.query_params
        if "key" in query:
            return await self._sign_in(query["key"], "/review", request)
        allowed, principal, key = await self._viewer(request)
        if not allowed:
            return HTMLResponse(review_pages.login_page("Sign in with an API key to review."), status_code=401)
        items = await asyncio.to_thread(list_items, self.store, await self._visible(principal))
        return HTMLResponse(review_pages.review_page(items, principal.tenant if principal else None, csrf_token(key),
                                                     query.get("done", "")[:200], query.get("error", "")[:300]))

    @api.post("/review/login")
    async def review_login(self, request: Request) -> Response:
        try:
            form = form_fields(await _read_body(request, MAX_FORM_BYTES))
        except ReviewError as e:
            raise review_api_error(e) from None
        return await self._sign_in(form.get("key", ""), safe_next(form.get("next")), request)

    async def _sign_in(self, key: str, next_path: str, request: Request) -> Response:
        """Check the key once, keep it in an HttpOnly cookie and redirect (the key leaves the address bar)."""
        principal = await asyncio.to_thread(self.keys.verify, f"Bearer {key.strip()}") if key.strip() else None
        if principal is None:
            return HTMLResponse(review_pages.login_page("That key is unknown or revoked.", next_path), status_code=401)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(COOKIE, key.strip(), max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="lax",
                            secure=request.url.scheme == "https", path="/")
        return response

    @api.post("/review/{item_id}/approve")
    async def review_approve(self, item_id: str, request: Request) -> Response:
        return await self._decide(request, item_id, lambda who, body: approve(self.store, item_id, who))

    @api.post("/review/{item_id}/correct")
    async def review_correct(self, item_id: str, request: Request) -> Response:
        return await self._decide(request, item_id, lambda who, body: correct(self.store, item_id, who,
                                                                              correction(body.get("message"))))

    async def _decide(self, request: Request, item_id: str, decide) -> Response:
        """A decision from a page form (redirects back to /review) or a JSON client (answers the item)."""
        as_json = "application/json" in request.headers.get("content-type", "")
        allowed, principal, key = await self._viewer(request)
        if not allowed:
            raise APIError(401, "sign in at /review or send `Authorization: Bearer <key>`", code="invalid_api_key")
        self._limit(principal)
        try:
            raw = await _read_body(request, MAX_FORM_BYTES)
            body = json_object(raw, DECISION_FIELDS) if as_json else form_fields(raw)
            if not same_origin(request.headers.get("origin"), request.headers.get("host")) or \
                    (not as_json and not csrf_ok(body.get("csrf"), key)):
                raise APIError(403, "this form was not sent from the review page (CSRF check failed): reload "
                                    "/review", "permission_denied_error", "csrf_failed")
            item = await asyncio.to_thread(get_item, self.store, item_id)
            if principal is not None and not principal.may_call(item["agent"]):
                raise APIError(403, f"this API key may not review the agent {item['agent']!r}",
                               "permission_denied_error", "model_not_allowed")
            item = await asyncio.to_thread(decide, reviewer_of(principal), body)
        except ReviewError as e:
            if as_json:
                raise review_api_error(e) from None
            return RedirectResponse("/review?" + urllib.parse.urlencode({"error": f"{item_id}: {e}"}), status_code=303)
        if as_json:
            return JSONResponse(item)
        return RedirectResponse("/review?" + urllib.parse.urlencode({"done": f"{item['status']}: {item_id}"}),
                                status_code=303)

    @api.get("/status")
    async def status(self, request: Request) -> Response:
        allowed, principal, _ = await self._viewer(request)
        if not allowed:
            return HTMLResponse(review_pages.login_page("Sign in with an API key to see the status.", "/status"),
                                status_code=401)
        return HTMLResponse(review_pages.status_page(await self._status_rows(principal)))

    @api.get("/status.json")
    async def status_json(self, request: Request) -> dict:
        allowed, principal, _ = await self._viewer(request)
        if not allowed:
            raise APIError(401, "missing or unknown API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")
        return {"object": "list", "data": await self._status_rows(principal)}

    async def _status_rows(self, principal: Principal | None) -> list[dict]:
        return await asyncio.to_thread(status_rows, self.store, await self._visible(principal))

    # -- chat completions --------------------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        agent, backend, start = None, "-", time.perf_counter()
        try:
            principal = await self._principal(request)
            self._limit(principal)
            raw = await _read_body(request, self.cfg.max_body_bytes)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
            req, rows = parse_request(body)
            agent = req.model
            if not is_valid_id(agent):
                raise APIError(400, f"model: {agent[:80]!r} is not a valid agent id", code="invalid_request",
                               param="model")
            self._allow(principal, agent)
            route = await self._route(agent)
            backend = route.backend
            tenant = principal.tenant if principal else route.tenant
            call = _Call(new_id(), req, body, rows, route, tenant, start)
            if route.backend == STUDENT:
                return await self._student(call)
            return await self._teacher(call)
        except APIError as e:
            self.metrics.request(agent, backend, e.status)
            raise

    async def _student(self, call: _Call) -> Any:
        req = call.req
        student_unsupported(req)
        sampling = sampling_params(req, self.cfg.max_new_tokens, self.cfg.max_tokens_limit)
        from flywheel.serve.grammar import constraint_for

        # One call unless the caller asks for parallel calls: the student was taught one call per answer.
        constraint = constraint_for(call.body.get("tools") or [], req.tool_choice, req.response_format,
                                    parallel_tool_calls=req.parallel_tool_calls is True)
        turns = chat_messages(call.rows, call.body.get("tools") or [], self.cfg.max_history)
        handle = self.student.options(multiplexed_model_id=call.route.model_id, stream=True)
        stream = handle.stream.remote(turns, dataclasses.asdict(sampling), constraint)
        first = await self._first(stream, call)
        headers = {"x-flywheel-backend": f"student:{call.route.model_id}", "x-flywheel-record-id": call.id}
        if req.stream:
            return StreamingResponse(self._sse(stream, first, call), media_type="text/event-stream", headers=headers)
        text, done = "", first
        try:
            async with asyncio.timeout(self._left(call)):
                while "done" not in done:
                    text += done.get("text", "")
                    done = await stream.__anext__()
        except TimeoutError:
            stream.cancel()
            raise APIError(504, f"the student did not finish within request_timeout_s ({self.cfg.request_timeout_s}s)",
                           "server_error", "timeout") from None
        except StopAsyncIteration:
            raise APIError(502, "the student's stream ended without an answer", "server_error",
                           "student_error") from None
        completion = self._completion(call, text, done)
        await self._capture(call, completion)
        self.metrics.answered(req.model, STUDENT, time.perf_counter() - call.start, False, completion["usage"])
        return JSONResponse(completion, headers=headers)

    def _left(self, call: _Call) -> float:
        return max(0.001, self.cfg.request_timeout_s - (time.perf_counter() - call.start))

    async def _first(self, stream: Any, call: _Call) -> dict:
        """The student's first item: errors it reports (prompt too long, adapter broken) become HTTP errors here,
        before any byte of the answer is sent."""
        from ray.serve.exceptions import BackPressureError

        try:
            async with asyncio.timeout(self._left(call)):
                first = await stream.__anext__()
        except BackPressureError:
            raise _retry(503, "the student is overloaded (its queue is full); retry shortly", "overloaded",
                         self.cfg.retry_after_s) from None
        except TimeoutError:
            stream.cancel()
            raise APIError(504, f"the student did not start within request_timeout_s ({self.cfg.request_timeout_s}s)",
                           "server_error", "timeout") from None
        except Exception as e:
            raise APIError(500, f"the student ({call.route.model_id}) failed: {_last_line(e)}", "server_error",
                           "student_error") from None
        if "error" in first:
            err = first["error"]
            if err["status"] == 503:
                raise _retry(503, err["message"], err.get("code") or "unavailable", self.cfg.retry_after_s)
            raise APIError(err["status"], err["message"], "invalid_request_error", err.get("code"), err.get("param"))
        return first

    def _completion(self, call: _Call, text: str, done: dict) -> dict:
        return completion_from_text(call.req.model, text, done["prompt_tokens"], done["completion_tokens"],
                                    f"student:{call.route.model_id}", call.id,
                                    truncated=done["finish_reason"] == "length")

    async def _sse(self, stream: Any, first: dict, call: _Call) -> AsyncIterator[str]:
        """Tokens as they are decoded; the record is captured before the final chunk and `[DONE]`."""
        parser, text, item, ttft = DeltaParser(call.id), "", first, None
        head = {"id": f"chatcmpl-{call.id}", "created": int(time.time()), "model": call.req.model,
                "system_fingerprint": f"student:{call.route.model_id}"}
        yield chunk(head, {"role": "assistant", "content": ""})
        try:
            async with asyncio.timeout(self._left(call)):
                while "done" not in item:
                    if item.get("text"):
                        ttft = ttft if ttft is not None else time.perf_counter() - call.start
                        text += item["text"]
                        for delta in parser.feed(item["text"]):
                            yield chunk(head, delta)
                    item = await stream.__anext__()
            for delta in parser.finish():
                yield chunk(head, delta)
            completion = self._completion(call, text, item)
            await self._capture(call, completion)
        except (asyncio.CancelledError, GeneratorExit):
            stream.cancel()  # the client went away: free its row in the batch
            raise
        except Exception as e:
            stream.cancel()
            message = ("the answer did not finish within request_timeout_s" if isinstance(e, TimeoutError) else
                       f"the answer could not be completed: {_last_line(e)}")
            yield f"data: {json.dumps(error_body(message, 'server_error', 'stream_error'))}\n\n"
            self.metrics.request(call.req.model, STUDENT, 500)
            return
        yield chunk(head, {}, completion["choices"][0]["finish_reason"])
        if (call.req.stream_options or {}).get("include_usage"):
            yield chunk(head, None, usage=completion["usage"])
        yield "data: [DONE]\n\n"
        self.metrics.answered(call.req.model, STUDENT, time.perf_counter() - call.start, True, completion["usage"],
                              ttft)

    async def _teacher(self, call: _Call) -> Any:
        req = call.req
        if self.teacher is None:
            raise _retry(503, f"agent {req.model!r} must be answered by the teacher ({call.route.reason}) but no "
                              "teacher is configured: set teacher_url (--teacher-url), or promote an adapter for it",
                         "teacher_not_configured", 30)
        try:
            async with asyncio.timeout(self._left(call)):
                answer = await self.teacher.complete(req.model, call.body)
        except TeacherError as e:
            raise APIError(502, str(e), "server_error", "teacher_error") from None
        except TimeoutError:
            raise APIError(504, "the teacher did not answer within request_timeout_s", "server_error",
                           "timeout") from None
        backend = f"teacher:{self.teacher.model_for(req.model)}"
        completion = {**answer, "id": f"chatcmpl-{call.id}", "object": "chat.completion", "model": req.model,
                      "created": answer.get("created") or int(time.time()), "system_fingerprint": backend}
        await self._capture(call, completion)
        self.metrics.answered(req.model, TEACHER, time.perf_counter() - call.start, req.stream,
                              completion.get("usage"))
        headers = {"x-flywheel-backend": backend, "x-flywheel-record-id": call.id}
        if req.stream:  # the teacher is asked without streaming; its answer is replayed as chunks
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(completion, usage), media_type="text/event-stream", headers=headers)
        return JSONResponse(completion, headers=headers)

    async def _capture(self, call: _Call, completion: dict) -> None:
        """Durably store the answered request before the caller has the whole answer (at-least-once)."""
        latency_ms = (time.perf_counter() - call.start) * 1000
        try:
            record = log_record(call.id, call.req.model, call.tenant, call.req, call.rows,
                                call.body.get("tools") or [], completion, completion["system_fingerprint"],
                                latency_ms)
        except Rejected as e:  # e.g. the teacher's tool-call arguments are not JSON: keep it, set aside
            raw = json.dumps({"request": call.body, "response": completion}, default=str)
            row = quarantine_row(e.reason, e.detail, "serve", raw, "serve", call.id, call.req.model)
            await asyncio.to_thread(self.logs.write_quarantine, [row], "serve", call.id)
            logger.warning("record %s quarantined: %s", call.id, e)
            return
        await asyncio.to_thread(self.logs.append, [record])


# -- entrypoints ----------------------------------------------------------------------------------------------
def build_app(cfg: ServeConfig) -> Application:
    """The Serve application: `Ingress` in front of `StudentModel` (the home is resolved here, on the driver)."""
    store = Store(cfg.home or None)
    logger.info("flywheel serve auth: %s", check_auth_at_start(cfg, store))
    student = StudentModel.options(num_replicas=cfg.num_replicas, max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
                                   max_queued_requests=cfg.max_queued_requests,
                                   ray_actor_options={"num_cpus": cfg.replica_cpus}).bind(store.uri, cfg)
    # The proxy refuses requests beyond the ingress's queue itself (503, Retry-After, a plain-text body).
    from ray.serve.config import BackpressureConfig

    return Ingress.options(max_ongoing_requests=cfg.max_ongoing_requests,
                           max_queued_requests=max(cfg.max_queued_requests, 4 * cfg.max_ongoing_requests)
                           if cfg.max_queued_requests > 0 else -1,
                           backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
                           ).bind(store.uri, cfg, student)


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
