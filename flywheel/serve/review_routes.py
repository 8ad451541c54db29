"""The Ingress's feedback, review and status handlers: who may ask, then `flywheel.review` does the work.

    POST /v1/feedback            {record_id, rating: up|down, correction?, comment?, model?} (the key's tenant's record)
    GET  /review                 the review queue (HTML) of the agents the key may call; `?key=` signs in (cookie)
    POST /review/login           the sign-in form
    POST /review/{item}/approve  /review/{item}/correct (form field or JSON `message`): decisions become labels
    GET  /status, /status.json   per agent: backend, production vs teacher, cost, drift, retrains, last cycle

The routes are declared on the `Ingress` (Serve binds FastAPI routes to the deployment class's own methods); each
delegates to `ReviewRoutes` here, which reaches the Ingress's key check, rate limit and catalog through `Access`.
Pages take the key from `Authorization: Bearer`, or from an HttpOnly cookie that `GET /review?key=...` or the
sign-in form sets; their forms carry a CSRF token derived from the key, and a cross-origin POST is refused.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any, Callable, Protocol

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from flywheel.review import pages as review_pages
from flywheel.review.feedback import ReviewError, record_feedback
from flywheel.review.queue import approve, correct, get_item, list_items
from flywheel.review.status import status_rows
from flywheel.review.web import (DECISION_FIELDS, FEEDBACK_FIELDS, correction, csrf_ok, csrf_token, form_fields,
                                 json_object, reviewer_of, safe_next, same_origin)
from flywheel.serve.auth import KeyStore, Principal
from flywheel.serve.protocol import APIError
from flywheel.storage import Store

COOKIE = "flywheel_key"  # the page sign-in: an HttpOnly cookie holding the key
COOKIE_MAX_AGE_S = 8 * 3600
MAX_FORM_BYTES = 1_000_000


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (before reading it, when declared).
    Every route that takes a body reads it with this (the chat route too)."""
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


def review_api_error(e: ReviewError) -> APIError:
    kind = {403: "permission_denied_error"}.get(e.status, "invalid_request_error")
    code = {403: "permission_denied", 404: "not_found"}.get(e.status, "invalid_request")
    return APIError(e.status, str(e), kind, code, e.param)


class Access(Protocol):
    """What the handlers need from the Ingress."""

    async def principal(self, request: Request) -> Principal | None: ...

    def limit(self, principal: Principal | None) -> None: ...

    async def any_keys(self) -> bool: ...

    async def visible(self, principal: Principal | None) -> list[str]: ...


class ReviewRoutes:
    def __init__(self, access: Access, store: Store, auth: str, keys: KeyStore):
        self.access, self.store, self.auth, self.keys = access, store, auth, keys

    async def feedback(self, request: Request) -> JSONResponse:
        principal = await self.access.principal(request)
        self.access.limit(principal)
        try:
            body = json_object(await read_body(request, MAX_FORM_BYTES), FEEDBACK_FIELDS)
            event = await asyncio.to_thread(record_feedback, self.store, body.get("record_id"),
                                            principal.tenant if principal else None, body.get("rating"),
                                            body.get("correction"), body.get("comment"), body.get("model"))
        except ReviewError as e:
            raise review_api_error(e) from None
        return JSONResponse({"object": "feedback", "id": event["event_id"], "record_id": event["record_id"],
                             "rating": event["rating"]})

    async def viewer(self, request: Request) -> tuple[bool, Principal | None, str | None]:
        """Pages: (allowed, principal, key) from the Authorization header or the cookie; not allowed: sign in."""
        if self.auth == "off":
            return True, None, None
        cookie = request.cookies.get(COOKIE)
        for header in (request.headers.get("authorization"), f"Bearer {cookie}" if cookie else None):
            principal = await asyncio.to_thread(self.keys.verify, header) if header else None
            if principal is not None:
                return True, principal, header.split(None, 1)[1].strip()
        return self.auth == "auto" and not await self.access.any_keys(), None, None

    async def review(self, request: Request) -> Response:
        query = request.query_params
        if "key" in query:
            return await self.sign_in(query["key"], "/review", request)
        allowed, principal, key = await self.viewer(request)
        if not allowed:
            return HTMLResponse(review_pages.login_page("Sign in with an API key to review."), status_code=401)
        items = await asyncio.to_thread(list_items, self.store, await self.access.visible(principal))
        return HTMLResponse(review_pages.review_page(items, principal.tenant if principal else None, csrf_token(key),
                                                     query.get("done", "")[:200], query.get("error", "")[:300]))

    async def login(self, request: Request) -> Response:
        try:
            form = form_fields(await read_body(request, MAX_FORM_BYTES))
        except ReviewError as e:
            raise review_api_error(e) from None
        return await self.sign_in(form.get("key", ""), safe_next(form.get("next")), request)

    async def sign_in(self, key: str, next_path: str, request: Request) -> Response:
        """Check the key once, keep it in an HttpOnly cookie and redirect (the key leaves the address bar)."""
        principal = await asyncio.to_thread(self.keys.verify, f"Bearer {key.strip()}") if key.strip() else None
        if principal is None:
            return HTMLResponse(review_pages.login_page("That key is unknown or revoked.", next_path), status_code=401)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(COOKIE, key.strip(), max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="lax",
                            secure=request.url.scheme == "https", path="/")
        return response

    async def approve(self, request: Request, item_id: str) -> Response:
        return await self.decide(request, item_id, lambda who, body: approve(self.store, item_id, who))

    async def correct(self, request: Request, item_id: str) -> Response:
        return await self.decide(request, item_id, lambda who, body: correct(self.store, item_id, who,
                                                                             correction(body.get("message"))))

    async def decide(self, request: Request, item_id: str, decide: Callable[[str, dict], Any]) -> Response:
        """A decision from a page form (redirects back to /review) or a JSON client (answers the item)."""
        as_json = "application/json" in request.headers.get("content-type", "")
        allowed, principal, key = await self.viewer(request)
        if not allowed:
            raise APIError(401, "sign in at /review or send `Authorization: Bearer <key>`", code="invalid_api_key")
        self.access.limit(principal)
        try:
            raw = await read_body(request, MAX_FORM_BYTES)
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

    async def status(self, request: Request) -> Response:
        allowed, principal, _ = await self.viewer(request)
        if not allowed:
            return HTMLResponse(review_pages.login_page("Sign in with an API key to see the status.", "/status"),
                                status_code=401)
        return HTMLResponse(review_pages.status_page(await self.status_rows(principal)))

    async def status_json(self, request: Request) -> dict:
        allowed, principal, _ = await self.viewer(request)
        if not allowed:
            raise APIError(401, "missing or unknown API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")
        return {"object": "list", "data": await self.status_rows(principal)}

    async def status_rows(self, principal: Principal | None) -> list[dict]:
        return await asyncio.to_thread(status_rows, self.store, await self.access.visible(principal))
