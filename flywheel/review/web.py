"""Small, pure pieces of the review pages' HTTP handling, kept out of the Serve app: form bodies, JSON bodies,
the CSRF token, the same-origin check, the redirect target and the reviewer's name.

The Serve routes (`flywheel.serve.ingress`) call these; every refusal is a `ReviewError` naming the field.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.parse
from typing import Any

from flywheel.review.feedback import Invalid

FEEDBACK_FIELDS = ("record_id", "rating", "correction", "comment", "model")
DECISION_FIELDS = ("message", "csrf")


def json_object(raw: bytes, allowed: tuple[str, ...]) -> dict:
    """A JSON object body with only `allowed` fields; `Invalid` naming the field otherwise."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise Invalid(f"{unknown[0]}: unknown field (expected {', '.join(allowed)})", unknown[0])
    return body


def form_fields(raw: bytes) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body -> {field: first value}."""
    try:
        pairs = urllib.parse.parse_qs(raw.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        raise Invalid("the form body is not UTF-8 url-encoded data") from None
    return {k: v[0] for k, v in pairs.items() if v}


def correction(message: Any) -> Any:
    """The corrected answer as sent: a JSON object (a JSON client) or JSON text (the page's textarea)."""
    if isinstance(message, str):
        try:
            return json.loads(message)
        except ValueError as e:
            raise Invalid(f"message: the corrected answer is not valid JSON ({e})", "message") from None
    if message is None:
        raise Invalid("message: send the corrected answer (an OpenAI assistant message)", "message")
    return message


def csrf_token(key: str | None) -> str:
    """The token a page's forms carry: derived from the caller's key, so only its holder can make one."""
    return hmac.new(key.encode(), b"flywheel-review-forms", hashlib.sha256).hexdigest()[:32] if key else ""


def csrf_ok(sent: Any, key: str | None) -> bool:
    return isinstance(sent, str) and hmac.compare_digest(sent, csrf_token(key))


def same_origin(origin: str | None, host: str | None) -> bool:
    """False for a browser request sent from another origin (its `Origin` header names another host)."""
    if origin is None:
        return True  # not a browser's cross-origin request (or an old browser: the CSRF token still holds)
    return origin != "null" and urllib.parse.urlsplit(origin).netloc == (host or "")


def safe_next(path: Any) -> str:
    """A local path to go to after signing in (never another site)."""
    ok = isinstance(path, str) and path.startswith("/") and not path.startswith("//") and "\\" not in path
    return path if ok else "/review"


def reviewer_of(principal: Any) -> str:
    """`<tenant>:<key_id>` of the key that decided, `anonymous` in open mode."""
    return f"{principal.tenant}:{principal.key_id}" if principal is not None else "anonymous"
