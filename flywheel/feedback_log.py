"""The feedback events `POST /v1/feedback` writes (`feedback/<agent>/<event id>.json`) and how to read them back.
Review writes and queues them (`flywheel.review.feedback`); the monitor counts them into each window's
negative-feedback rate; curation sets aside the records whose latest rating is a thumbs down."""

from __future__ import annotations

from flywheel.ids import check_id
from flywheel.storage import Store

FEEDBACK = "feedback"


def feedback_events(store: Store, agent: str, after_ms: int = 0) -> list[dict]:
    """The agent's feedback events (oldest first), those stamped at or after `after_ms` when given."""
    out = []
    for name in store.list(f"{FEEDBACK}/{check_id('agent id', agent)}"):
        stamp = name.split("-", 1)[0]
        if not name.endswith(".json") or not stamp.isdigit() or int(stamp) < after_ms:
            continue
        event = store.read_json(f"{FEEDBACK}/{agent}/{name}")
        if isinstance(event, dict) and event.get("record_id"):
            out.append(event)
    return sorted(out, key=lambda e: (e.get("at") or 0.0, e.get("event_id") or ""))


def latest_scores(store: Store, agent: str) -> dict[str, float]:
    """{record id: the score of its latest feedback event} (-1 a thumbs down, 1 up)."""
    latest: dict[str, float] = {}
    for e in feedback_events(store, agent):
        if isinstance(e.get("score"), (int, float)) and not isinstance(e.get("score"), bool):
            latest[e["record_id"]] = float(e["score"])
    return latest
