"""User feedback on a captured answer: a thumbs up or down, an optional corrected answer and a comment.

    POST /v1/feedback {"record_id": "...", "rating": "down", "correction": {"role": "assistant", ...}}

One JSON object per event, never rewritten, so concurrent writers (Serve replicas) never clobber each other:

    feedback/<agent>/<stamp>-<record>-<rand>.json
        {"event_id", "record_id", "agent", "tenant", "rating": "up"|"down", "score": 1|-1,
         "correction": MESSAGE row or null, "comment", "at"}

`<stamp>` is the time in milliseconds (13 digits, so names sort by time), `<record>` the record id (its digest
when it cannot name a file), `<rand>` 8 random hex digits. The record must exist and belong to the caller's
tenant (`tenant=None`: no tenant check, for open mode). The review queue turns negative feedback into items
(`flywheel.review.queue.fill_queue`); `negative_records` is what curation should exclude.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from flywheel.feedback_log import FEEDBACK, feedback_events, latest_scores  # noqa: F401  (queue reads the events)
from flywheel.ids import check_id, is_valid_id
from flywheel.review.records import find_record
from flywheel.schema import Rejected, digest, normalise_message
from flywheel.storage import Store

RATINGS = {"up": 1, "down": -1}
MAX_COMMENT_CHARS = 4000


class ReviewError(ValueError):
    """A request the review package refuses; `status` is the HTTP status the Serve app answers with."""

    status = 400

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Invalid(ReviewError):
    status = 400


class Forbidden(ReviewError):
    status = 403


class NotFound(ReviewError):
    status = 404


def check_correction(message: Any, param: str = "correction") -> dict:
    """An OpenAI assistant message (text or tool calls) -> a `MESSAGE` row; `Invalid` naming `param` otherwise."""
    if not isinstance(message, dict):
        raise Invalid(f"{param}: expected an assistant message object, got {type(message).__name__}", param)
    if message.get("role", "assistant") != "assistant":
        raise Invalid(f"{param}.role: a correction is the assistant's answer, got {message.get('role')!r}", param)
    try:
        row = normalise_message({**message, "role": "assistant"}, param)
    except Rejected as e:
        raise Invalid(e.detail, param) from None
    if not row["tool_calls"] and not (row["content"] or "").strip():
        raise Invalid(f"{param}: the answer needs text content or tool_calls", param)
    return row


def record_feedback(store: Store, record_id: Any, tenant: str | None, rating: Any, correction: Any = None,
                    comment: Any = None, agent: str | None = None) -> dict:
    """Check, then store one feedback event; returns it. `agent` (optional) narrows the record search."""
    if not isinstance(record_id, str) or not record_id or len(record_id) > 256:
        raise Invalid("record_id: expected the record id (the x-flywheel-record-id header of the answer)",
                      "record_id")
    if rating not in RATINGS:
        raise Invalid(f"rating: expected 'up' or 'down', got {rating!r:.40}", "rating")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS):
        raise Invalid(f"comment: expected text of at most {MAX_COMMENT_CHARS} characters", "comment")
    row = check_correction(correction) if correction is not None else None
    if agent is not None and not is_valid_id(agent):
        raise Invalid(f"model: {agent[:80]!r} is not a valid agent id", "model")
    record = find_record(store, record_id, agent)
    if record is None:
        raise NotFound(f"no captured record with id {record_id!r}")
    if tenant is not None and record.get("tenant") != tenant:
        raise Forbidden(f"the record {record_id!r} belongs to another tenant")
    now = time.time()
    agent = check_id("agent id", record["agent_id"])
    name = record_id if is_valid_id(record_id) and len(record_id) <= 64 else digest(record_id, n=24)
    event_id = f"{int(now * 1000):013d}-{name}-{uuid.uuid4().hex[:8]}"
    event = {"event_id": event_id, "record_id": record_id, "agent": agent, "tenant": record.get("tenant"),
             "rating": rating, "score": RATINGS[rating], "correction": row, "comment": comment, "at": now}
    store.write_json(f"{FEEDBACK}/{agent}/{event_id}.json", event)
    return event


def negative_records(store: Store, agent: str) -> set[str]:
    """Records whose latest feedback is a thumbs down: curation should set them aside (`negative_feedback`)."""
    return {rid for rid, score in latest_scores(store, agent).items() if score < 0}
