"""The Serve ingress: an OpenAI-compatible FastAPI app that checks the key, the limit and the body, routes each
request to the student or the teacher, and captures every answer before it is complete.

    POST /v1/chat/completions    `model` is the agent id; `stream: true` streams tokens as server-sent events
    GET  /v1/models              the agents the caller's key may call
    GET  /healthz                liveness (the ingress answers)
    GET  /readyz                 readiness (the student engine decodes a token; the log store takes writes)
    POST /v1/feedback            {record_id, rating: up|down, correction?, comment?, model?} (the key's tenant's record)
    GET  /review                 the review queue (HTML) of the agents the key may call; `?key=` signs in (cookie)
    POST /review/{item}/approve  /review/{item}/correct (form field or JSON `message`): decisions become labels
    GET  /status, /status.json   per agent: backend, production vs teacher, cost, drift, retrains, last cycle

The page and feedback handlers are `flywheel.serve.review_routes` (their logic is `flywheel.review`).

`Ingress` (no CPU reserved) checks the key, the rate limit and the body (size, then the OpenAI contract:
`flywheel.serve.protocol`), routes the agent from its in-memory catalog (`flywheel.serve.catalog`, refreshed every
`routing_ttl_s`), asks the student or the teacher proxy and appends the log record to the write-ahead log
(`LogStore.append`, fsynced) before the answer is complete: a plain answer is returned after the append, a
streamed answer sends its final chunk and `[DONE]` after it. `x-flywheel-record-id` is the captured record's id;
`x-flywheel-backend` (and `system_fingerprint`) names what answered, e.g. `student:sgd_Flights@v2` or
`teacher:<model>`; `x-flywheel-replica` the student replica that decoded it. It counts each agent's traffic and
hands the autoscaling policy (and the dashboard) traffic shares and routes; when its catalog sees an agent move to
a student adapter (a promotion) it asks the student to prewarm it.

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
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel import safety
from flywheel.capture.store import LogStore
from flywheel.config import ServeConfig
from flywheel.ids import is_valid_id
from flywheel.prompts import chat_messages
from flywheel.routing import SELECTIVE, SHADOW, STUDENT, TEACHER
from flywheel.schema import SESSION_KEYS, Rejected, canonical_json, normalise_message, quarantine_row
from flywheel.serve import guardrails, selective
from flywheel.serve.auth import KeyStore, Principal, RateLimiter
from flywheel.serve.autoscale import HOT_AGENTS, HOT_AGENTS_EVERY_S, TrafficGauges, TrafficWindow, hot_agents, report
from flywheel.serve.catalog import Catalog, Route, Snapshot, route_of
from flywheel.serve.metrics import ServeMetrics
from flywheel.serve.protocol import (APIError, ChatCompletionRequest, completion_from_text, error_body, new_id,
                                     parse_request, sampling_params, stream_events, student_unsupported)
from flywheel.serve.review_routes import ReviewRoutes, read_body
from flywheel.serve.streaming import DeltaParser, chunk
from flywheel.storage import Store

logger = logging.getLogger("ray.serve")


# -- capture: one answered request as a log record ----------------------------------------------------------
def log_record(record_id: str, agent: str, tenant: str, req: ChatCompletionRequest, rows: list[dict],
               tools: list[dict], completion: dict, model: str, latency_ms: float, extra: dict | None = None) -> dict:
    """One answered request as a `schema.LOG_RECORD` row; `Rejected` when the answer cannot be one. `extra`:
    what routing decided (confidence, a deferral and the student's draft: `flywheel.serve.selective`)."""
    answer = normalise_message({**completion["choices"][0]["message"], "role": "assistant"}, "response")
    usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
    meta = req.metadata or {}
    session = next((str(meta[k]) for k in SESSION_KEYS if meta.get(k) not in (None, "")), None)
    tokens = [usage.get(k) if isinstance(usage.get(k), int) else None for k in ("prompt_tokens", "completion_tokens")]
    return {"record_id": record_id, "agent_id": agent, "tenant": tenant, "timestamp": time.time(),
            "session_id": session, "messages": rows, "tools_json": canonical_json(tools), "response": answer,
            "model": model, "latency_ms": latency_ms, "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
            "feedback": None, "source": "serve", "extra_json": canonical_json(extra) if extra else None}



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


def _replica_lost(exc: BaseException) -> bool:
    """The replica answering a call died or became unreachable (Ray raises, or Serve wraps, an actor error)."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError) or isinstance(exc.__cause__, RayActorError)


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else type(exc).__name__


def _message_of(completion: dict) -> dict:
    """A completion's answer as a `schema.MESSAGE` row (how records keep answers), e.g. a student's draft."""
    return normalise_message({**completion["choices"][0]["message"], "role": "assistant"}, "response")


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
    redactor: guardrails.RequestRedactor | None = None  # the agent's PII leaves only as placeholders
    verdicts: list[dict] = field(default_factory=list)  # input guardrails' verdicts, written into the record


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, home: str, cfg: ServeConfig, student: DeploymentHandle, teacher: DeploymentHandle | None):
        self.store, self.cfg, self.student, self.teacher = Store(home), cfg, student, teacher
        replica = serve.get_replica_context().replica_id.unique_id
        self.logs = LogStore(self.store, writer_id="serve-" + re.sub(r"[^A-Za-z0-9_-]", "_", replica),
                             seal_age_s=cfg.wal_seal_age_s)
        self.keys = KeyStore(self.store, ttl_s=cfg.auth_cache_s)
        self.limiter = RateLimiter(cfg.rate_limit_rps, cfg.rate_limit_burst)
        self.metrics = ServeMetrics(cfg.metrics_per_agent)
        self.catalog = Catalog(self.store, cfg.routing_ttl_s)
        self.catalog.refresh()
        self.traffic = TrafficWindow(cfg.traffic_window_s)
        self.gauges = TrafficGauges(cfg.metrics_per_agent)
        self.pages = ReviewRoutes(self, self.store, cfg.auth, self.keys)
        self._keys_exist: tuple[float, bool] = (0.0, False)
        self._tasks: set[asyncio.Task] = set()
        self._hot: tuple[float, list[str]] = (0.0, [])
        self.injection = safety.injection_check(cfg.injection_check)

    def __del__(self) -> None:
        """Serve calls this at a graceful shutdown: seal the open WAL segment so it is compacted at once."""
        try:
            self.logs.close()
        except Exception:
            pass

    # -- who is calling (also used by flywheel.serve.review_routes) ----------------------------------------------
    async def principal(self, request: Request) -> Principal | None:
        """The caller's key, or None where no key is needed; 401 where one is needed and missing or unknown."""
        if self.cfg.auth == "off":
            return None
        header = request.headers.get("authorization")
        principal = await asyncio.to_thread(self.keys.verify, header) if header else None
        if principal is not None:
            return principal
        if self.cfg.auth == "auto" and not await self.any_keys():
            return None
        message = ("invalid API key: the key is unknown or revoked" if header else
                   "missing API key: send `Authorization: Bearer <key>` (create one with `flywheel keys create`)")
        err = APIError(401, message, "invalid_request_error", "invalid_api_key")
        err.headers = {"WWW-Authenticate": "Bearer"}
        raise err

    async def any_keys(self) -> bool:
        now = time.monotonic()
        if self._keys_exist[0] < now:
            self._keys_exist = (now + self.cfg.auth_cache_s, await asyncio.to_thread(self.keys.any_active))
        return self._keys_exist[1]

    def limit(self, principal: Principal | None) -> None:
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

    async def visible(self, principal: Principal | None) -> list[str]:
        """The agents a page may show: those the key may call (every known agent in open mode)."""
        return [e.agent for e in (await self._snapshot()).listing() if principal is None or principal.may_call(e.agent)]

    # -- the catalog, the traffic figures and prewarming -------------------------------------------------------
    async def _snapshot(self) -> Snapshot:
        """The catalog, at most `routing_ttl_s` old; agents newly on a student adapter are prewarmed."""
        snapshot = await self.catalog.fresh()
        promoted = self.catalog.take_promoted()
        if promoted:
            task = asyncio.get_running_loop().create_task(self._prewarm(promoted))
            self._tasks.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)
        return snapshot

    async def _prewarm(self, agents: list[str]) -> None:
        """Ask a student replica to load the promoted agents' adapters before their traffic arrives (one replica:
        the others load an adapter on its agent's first request there)."""
        try:
            result = await self.student.prewarm.remote(agents)
            logger.info("student prewarm of promoted agents %s: %s", agents, result)
        except Exception as e:
            logger.warning("StudentModel.prewarm(%s) failed (%s); their adapters load on their first request",
                           agents, _last_line(e))

    async def _route(self, agent: str) -> Route:
        # before the catalog: an agent with the base model's name is not reachable
        if self.cfg.base_model_name and agent == self.cfg.base_model_name:
            return Route(STUDENT, agent, "default", "the student's base model, no adapter (base_model_name)", STUDENT)
        entry = (await self._snapshot()).get(agent)
        if entry is None:
            raise APIError(404, f"The model {agent!r} does not exist: it is not a known agent. GET /v1/models lists "
                                "the agents; ingest its logs or register it first.", code="model_not_found",
                           param="model")
        return route_of(entry)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on its own schedule: the traffic figures that drive the autoscaling policy, also set
        as Ray gauges (flywheel.serve.autoscale)."""
        snapshot = await self._snapshot()
        rates, routes = self.traffic.rates(), {}
        for agent in rates:
            entry = snapshot.get(agent)
            if entry is not None:
                routes[agent] = (route_of(entry).backend, entry.route == TEACHER)
        figures = report(rates, routes, self.traffic.latency(), self.cfg.autoscale_top_agents,
                         self.traffic.deferral_shares())
        self.gauges.set(figures)
        await self._publish_hot(hot_agents(rates, routes, self.cfg.prewarm_hot_agents))
        return figures

    async def _publish_hot(self, agents: list[str]) -> None:
        """The busiest student agents into the home, for the next student replica to prewarm (when the list
        changed, at most every HOT_AGENTS_EVERY_S; with several Ingress replicas the last writer's view wins)."""
        at, last = self._hot
        if not agents or agents == last or time.monotonic() - at < HOT_AGENTS_EVERY_S and last:
            return
        self._hot = (time.monotonic(), agents)
        try:
            await asyncio.to_thread(self.store.write_json, HOT_AGENTS, {"agents": agents, "written": time.time()})
        except Exception as e:  # the figures still reach the policy; a new replica then loads on first request
            logger.warning("cannot write %s: %s", HOT_AGENTS, e)

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

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        principal = await self.principal(request)
        base = self.cfg.base_model_name
        named = [(base, 0)] if base else []
        named += [(e.agent, e.created) for e in (await self._snapshot()).listing() if e.agent != base]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "flywheel"}
                                           for name, created in named
                                           if principal is None or principal.may_call(name)]}

    @api.get("/v1/models/{agent}")
    async def model(self, agent: str, request: Request) -> dict:
        principal = await self.principal(request)
        self._allow(principal, agent)
        await self._route(agent)
        entry = None if agent == self.cfg.base_model_name else (await self._snapshot()).get(agent)
        return {"id": agent, "object": "model", "created": entry.created if entry else 0, "owned_by": "flywheel"}

    # -- feedback, review, status (flywheel.serve.review_routes) -------------------------------------------------
    @api.post("/v1/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        return await self.pages.feedback(request)

    @api.get("/review")
    async def review(self, request: Request) -> Response:
        return await self.pages.review(request)

    @api.post("/review/login")
    async def review_login(self, request: Request) -> Response:
        return await self.pages.login(request)

    @api.post("/review/{item_id}/approve")
    async def review_approve(self, item_id: str, request: Request) -> Response:
        return await self.pages.approve(request, item_id)

    @api.post("/review/{item_id}/correct")
    async def review_correct(self, item_id: str, request: Request) -> Response:
        return await self.pages.correct(request, item_id)

    @api.get("/status")
    async def status(self, request: Request) -> Response:
        return await self.pages.status(request)

    @api.get("/status.json")
    async def status_json(self, request: Request) -> dict:
        return await self.pages.status_json(request)

    # -- chat completions --------------------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        agent, backend, start = None, "-", time.perf_counter()
        try:
            principal = await self.principal(request)
            self.limit(principal)
            raw = await read_body(request, self.cfg.max_body_bytes)
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
            # off the event loop: the checks read every new turn, up to max_body_bytes of text
            call = await asyncio.to_thread(self._guarded, _Call(new_id(), req, body, rows, route, tenant, start))
            self.traffic.arrived(agent)
            if route.mode == SELECTIVE:
                return await self._selective(call)
            if route.mode == SHADOW:
                return await self._shadow(call)
            if route.backend == STUDENT:
                return await self._student(call)
            return await self._teacher(call)
        except APIError as e:
            self.metrics.request(agent, backend, e.status)
            raise

    def _guarded(self, call: _Call) -> _Call:
        """The input guardrails (`flywheel.serve.guardrails`): the injection verdict, the agent's PII placeholders."""
        if self.cfg.injection_check != "off":
            call.verdicts.append(guardrails.injection_verdict(call.rows, self.injection, self.cfg.injection_threshold))
        if guardrails.listed(call.req.model, self.cfg.redact_pii_agents):
            call.redactor = guardrails.RequestRedactor(call.rows)
        return call

    async def _student(self, call: _Call) -> Any:
        stream, first = await self._ask_student(call)
        headers = {"x-flywheel-backend": f"student:{call.route.model_id}", "x-flywheel-record-id": call.id,
                   "x-flywheel-replica": first.get("replica", "")}
        if call.req.stream:
            return StreamingResponse(self._sse(stream, first, call), media_type="text/event-stream", headers=headers)
        text, done = await self._collect(stream, first, call)
        completion = self._completion(call, text, done)
        await self._capture(call, completion)
        self._answered(call, STUDENT, False, completion["usage"])
        return JSONResponse(completion, headers=headers)

    async def _ask_student(self, call: _Call) -> tuple[Any, dict]:
        """(the student's answer stream, its first item) for the request, decoded under its tool-call grammar."""
        req = call.req
        student_unsupported(req)
        sampling = sampling_params(req, self.cfg.max_new_tokens, self.cfg.max_tokens_limit)
        from flywheel.inference.grammar import constraint_for

        # One call unless the caller asks for parallel calls: the student was taught one call per answer.
        constraint = constraint_for(call.body.get("tools") or [], req.tool_choice, req.response_format,
                                    parallel_tool_calls=req.parallel_tool_calls is not False)  # OpenAI: true unless sent false
        turns = chat_messages(call.rows, call.body.get("tools") or [], self.cfg.max_history)
        handle = self.student.options(multiplexed_model_id=call.route.model_id, stream=True)
        stream = handle.stream.remote(turns, dataclasses.asdict(sampling), constraint)
        return stream, await self._first(stream, call)

    async def _collect(self, stream: Any, first: dict, call: _Call) -> tuple[str, dict]:
        """The whole answer's text and the stream's `done` item."""
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
        except Exception as e:
            raise self._student_failed(call, e) from None
        return text, done

    def _answered(self, call: _Call, backend: str, stream: bool, usage: dict | None, ttft: float | None = None) -> None:
        seconds = time.perf_counter() - call.start
        self.traffic.answered(backend, seconds)
        self.metrics.answered(call.req.model, backend, seconds, stream, usage, ttft)

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
            raise self._student_failed(call, e) from None
        if "error" in first:
            err = first["error"]
            if err["status"] == 503:
                raise _retry(503, err["message"], err.get("code") or "unavailable", self.cfg.retry_after_s)
            raise APIError(err["status"], err["message"], "invalid_request_error", err.get("code"), err.get("param"))
        return first

    def _student_failed(self, call: _Call, e: Exception) -> APIError:
        """A lost replica is 503 with Retry-After (nothing was captured; Serve is replacing it): a retry is safe.
        Anything else the student raised is 500."""
        if _replica_lost(e):
            logger.warning("the student replica answering %s was lost: %s", call.id, _last_line(e))
            return _retry(503, f"the student replica serving {call.route.model_id!r} was lost mid-answer; nothing "
                          "was recorded, retry", "replica_lost", self.cfg.retry_after_s)
        return APIError(500, f"the student ({call.route.model_id}) failed: {_last_line(e)}", "server_error",
                        "student_error")

    def _completion(self, call: _Call, text: str, done: dict) -> dict:
        return completion_from_text(call.req.model, text, done["prompt_tokens"], done["completion_tokens"],
                                    f"student:{call.route.model_id}", call.id,
                                    truncated=done["finish_reason"] == "length", logprobs=done.get("logprobs"))

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
            if item.get("logprobs"):  # every token's, in one chunk after the text (OpenAI's client joins chunks)
                yield chunk(head, {}, None, logprobs=item["logprobs"])
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
        self._answered(call, STUDENT, True, completion["usage"], ttft)

    async def _teacher(self, call: _Call, extra: dict | None = None, headers: dict | None = None) -> Any:
        """The teacher's answer, captured (with `extra`: a deferral, a shadow answer) and returned."""
        completion = await self._teacher_completion(call)
        return await self._answer(call, completion, TEACHER, extra, headers)

    async def _teacher_completion(self, call: _Call) -> dict:
        if self.teacher is None:
            raise _retry(503, f"agent {call.req.model!r} must be answered by the teacher ({call.route.reason}) but "
                              "no teacher is configured: set teacher_url (--teacher-url), or promote an adapter for "
                              "it", "teacher_not_configured", 30)
        answer, model = await self._ask_teacher(call)
        if call.redactor is not None:  # the teacher saw placeholders: the client gets the values
            answer = call.redactor.restore(answer)
        return {**answer, "id": f"chatcmpl-{call.id}", "object": "chat.completion", "model": call.req.model,
                "created": answer.get("created") or int(time.time()), "system_fingerprint": f"teacher:{model}"}

    async def _answer(self, call: _Call, completion: dict, backend: str, extra: dict | None = None,
                      headers: dict | None = None) -> Any:
        """Capture a finished completion, then return it (replayed as chunks when the caller streams)."""
        await self._capture(call, completion, extra)
        self._answered(call, backend, bool(call.req.stream), completion.get("usage"))
        headers = {"x-flywheel-backend": completion["system_fingerprint"], "x-flywheel-record-id": call.id,
                   **(headers or {})}
        if call.req.stream:  # a held answer (the teacher's, a selective one) is replayed as chunks
            usage = bool((call.req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(completion, usage), media_type="text/event-stream", headers=headers)
        return JSONResponse(completion, headers=headers)

    # -- selective and shadow routes (flywheel.serve.selective) --------------------------------------------------
    async def _selective(self, call: _Call) -> Any:
        """The student's answer is held until its confidence is known: served when it clears the agent's certified
        threshold and its guardrails, else the teacher answers (and the record keeps the student's draft)."""
        stream, first = await self._ask_student(call)
        text, done = await self._collect(stream, first, call)
        draft = self._completion(call, text, done)
        route, confidence = call.route, done.get("confidence")
        value = selective.picked_confidence(confidence, route.aggregate)
        unsafe = await self._unsafe(draft)
        why = selective.deferral(text, done["finish_reason"], value, route.threshold, call.body.get("tools") or [],
                                 unsafe)
        headers = {"x-flywheel-replica": first.get("replica", ""),
                   "x-flywheel-confidence": "" if value is None else f"{value:.4f}"}
        self.metrics.selective(call.req.model, why or "served")
        if why is None:
            return await self._answer(call, draft, STUDENT, selective.served_extra(SELECTIVE, confidence, value,
                                                                                   route.threshold), headers)
        self.traffic.deferred(call.req.model)
        extra = selective.deferred_extra(SELECTIVE, why, _message_of(draft), draft["system_fingerprint"],
                                         confidence, value, route.threshold)
        headers["x-flywheel-deferred"] = why
        started = time.perf_counter()
        try:
            completion = await self._teacher_completion(call)
        except APIError as e:
            if why not in selective.GUARDRAIL_REASONS and self._draft_when_teacher_down(call):
                return await self._answer(call, draft, STUDENT, selective.unanswered_extra(extra, e.message),
                                          {**headers, "x-flywheel-low-confidence": "true"})
            await self._keep_unanswered(call, draft, extra, e)
            raise
        extra["timing_ms"] = {"student": round((started - call.start) * 1000, 1),
                              "teacher": round((time.perf_counter() - started) * 1000, 1)}
        return await self._answer(call, completion, TEACHER, extra, headers)

    def _draft_when_teacher_down(self, call: _Call) -> bool:
        return guardrails.listed(call.req.model, self.cfg.draft_when_teacher_down)

    async def _unsafe(self, draft: dict) -> bool:
        """The output check: the draft's text or string arguments score at or above output_toxicity_threshold."""
        if self.cfg.output_toxicity_threshold >= 1.0:
            return False
        score = await asyncio.to_thread(guardrails.unsafe_score, draft["choices"][0]["message"])
        return score >= self.cfg.output_toxicity_threshold

    async def _keep_unanswered(self, call: _Call, draft: dict, extra: dict, error: APIError) -> None:
        """A deferred request the teacher could not answer: the request and the student's draft are kept (as a
        quarantined row with the reason) so nothing the client sent is lost; the client gets the teacher's error."""
        _, draft, extra = self._private(call, draft, extra)
        raw = json.dumps({"request": self._body_to_keep(call), "student": draft, "extra": extra,
                          "error": error.body()}, default=str)
        row = quarantine_row("deferred_unanswered", f"deferred ({extra.get('fallback')}) but the teacher failed: "
                             f"{error.status}", "serve", raw, "serve", call.id, call.req.model)
        await asyncio.to_thread(self.logs.write_quarantine, [row], "serve", call.id)

    async def _shadow(self, call: _Call) -> Any:
        """The teacher serves; the student answers the same request beside it and its answer is logged."""
        teacher = asyncio.ensure_future(self._teacher_completion(call))
        try:
            stream, first = await self._ask_student(call)
            text, done = await self._collect(stream, first, call)
            draft = self._completion(call, text, done)
            confidence = done.get("confidence")
            value = selective.picked_confidence(confidence, call.route.aggregate)
            extra = selective.shadow_extra(_message_of(draft), draft["system_fingerprint"], confidence, value)
        except Exception as e:  # the student's failure never fails the teacher's answer
            extra = selective.shadow_extra(None, f"student:{call.route.model_id}", None, None,
                                           getattr(e, "message", None) or _last_line(e))
        return await self._answer(call, await teacher, TEACHER, extra)

    async def _ask_teacher(self, call: _Call) -> tuple[dict, str]:
        """(the teacher's completion, its model name) from the TeacherProxy deployment; 502, 503 or 504 else."""
        from ray.serve.exceptions import BackPressureError

        body = call.redactor.body(call.body) if call.redactor is not None else call.body
        response = self.teacher.complete.remote(call.req.model, body)
        try:
            async with asyncio.timeout(self._left(call)):
                answer = await response
        except TimeoutError:
            response.cancel()
            raise APIError(504, "the teacher did not answer within request_timeout_s", "server_error",
                           "timeout") from None
        except BackPressureError:
            raise _retry(503, "the teacher proxy is overloaded (its queue is full); retry shortly", "overloaded",
                         self.cfg.retry_after_s) from None
        except Exception as e:
            raise APIError(502, f"the teacher proxy failed: {_last_line(e)}", "server_error", "teacher_error") from None
        if "error" in answer:
            raise APIError(502, answer["error"], "server_error", "teacher_error")
        return answer["completion"], answer["model"]

    async def _capture(self, call: _Call, completion: dict, extra: dict | None = None) -> None:
        """Durably store the answered request before the caller has the whole answer (at-least-once)."""
        latency_ms = (time.perf_counter() - call.start) * 1000
        rows, completion, extra = self._private(call, completion, extra)
        try:
            record = log_record(call.id, call.req.model, call.tenant, call.req, rows,
                                call.body.get("tools") or [], completion, completion["system_fingerprint"],
                                latency_ms, extra)
        except Rejected as e:  # e.g. the teacher's tool-call arguments are not JSON: keep it, set aside
            raw = json.dumps({"request": self._body_to_keep(call), "response": completion}, default=str)
            row = quarantine_row(e.reason, e.detail, "serve", raw, "serve", call.id, call.req.model)
            await asyncio.to_thread(self.logs.write_quarantine, [row], "serve", call.id)
            logger.warning("record %s quarantined: %s", call.id, e)
            return
        await asyncio.to_thread(self.logs.append, [record])


    @staticmethod
    def _private(call: _Call, completion: dict, extra: dict | None) -> tuple[list[dict], dict, dict | None]:
        """What the log keeps of an answered request: the input verdicts joined to `extra`, and under a PII
        policy the request, the answer and the student's draft with this request's placeholders."""
        if call.verdicts:
            extra = {**(extra or {}), "guardrails": [*(extra or {}).get("guardrails", []), *call.verdicts]}
        if call.redactor is None:
            return call.rows, completion, extra
        r = call.redactor
        completion = r.completion(completion)
        if extra and (extra.get("shadow") or {}).get("response"):
            extra = {**extra, "shadow": {**extra["shadow"], "response": r.message(extra["shadow"]["response"])}}
        return r.rows, completion, {**(extra or {}), "pii_redacted": r.found}

    @staticmethod
    def _body_to_keep(call: _Call) -> dict:
        return call.redactor.body(call.body) if call.redactor is not None else call.body
