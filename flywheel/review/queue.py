"""The review queue: uncertain answers triaged into items, decided by people, and turned into training labels.

    fill_queue(store, "sgd_Flights")              # the controller, once per cycle: new records -> open items
    approve(store, item_id, reviewer="acme:3f9c0a1b2d4e")
    correct(store, item_id, reviewer, {"role": "assistant", "tool_calls": [...]})

Layout under the home:

    review/queue/<agent>/<item_id>.json   one item: the record's request and answer, why it is here, its status
    review/state/<agent>.json             fill_queue's cursor: the log parts already scanned, the feedback mark
    logs/parquet/part-<digest>.parquet    one label per decision (`LogStore.write_records`, source "review")
    review/labels/<agent>/<item_id>-<answer digest>.json   a small index of those labels: {item_id, status,
                                          label_record_id, label_part, decided_at} (the controller counts them)

An item id is `<agent>.<24 hex>`, the hex a digest of (record id, reason): the same record flagged for the same
reason is one item however often it is scanned, and an item is never reset once it exists. Reason codes:

    negative_feedback     a thumbs down (`flywheel.review.feedback`), or an ingested record with feedback < 0
    invalid_tool_call     the answer tried a call that did not parse (`<tool_call>` text left over, a call written
                          as JSON text, an empty answer where tools are declared), called an undeclared tool, or
                          its arguments break the tool's declared JSON Schema (`flywheel.checks.call_problem`)
    teacher_disagreement  the record carries a second answer (`extra_json.shadow` = {"model", "response"}, the
                          response in OpenAI or MESSAGE shape: shadow
                          mode logs the student's answer beside the teacher's, or the reverse) and they differ
    low_confidence        `extra_json.confidence` below `LOW_CONFIDENCE` (0.5)
    guardrail             `extra_json.guardrail` (or `guardrails`, a list) holds a verdict with `passed: false`

Statuses: `open` -> `approved` (the answer is right as it is) or `corrected` (the reviewer's answer replaces it);
a later decision replaces an earlier one. Every decision writes its label first, then the item, so a crash in
between leaves the item open and deciding again rewrites the same part. A label is a `LOG_RECORD` with
`source="review"`, `model="review:<reviewer>"`, the original request, session and time, the decided answer as
`response`, and `extra_json` = {"priority": 1, "review": {item_id, reviewer, original_record_id, reason, decision,
decided_at, original_model}}; its part is named from (item id, answer), so re-approving is a no-op.
Curation should let a review label win over the record it reviews (`superseded_records`), see the README.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any, Iterable

from flywheel.capture.store import LogStore
from flywheel.checks import call_problem
from flywheel.ids import check_id, is_valid_id
from flywheel.review.feedback import Invalid, NotFound, check_correction, feedback_events
from flywheel.review.records import find_records, new_records
from flywheel.schema import canonical_json, digest, normalise_message, to_openai_message
from flywheel.storage import Store

QUEUE, STATE, LABELS = "review/queue", "review/state", "review/labels"
NEGATIVE, INVALID_CALL, LOW_CONFIDENCE_REASON = "negative_feedback", "invalid_tool_call", "low_confidence"
DISAGREEMENT, GUARDRAIL = "teacher_disagreement", "guardrail"
REASONS = (NEGATIVE, INVALID_CALL, LOW_CONFIDENCE_REASON, DISAGREEMENT, GUARDRAIL)
OPEN, APPROVED, CORRECTED = "open", "approved", "corrected"
LOW_CONFIDENCE = 0.5
FEEDBACK_GRACE_MS = 120_000  # events stamped up to this long before the mark are looked at again (clock skew)
PRIORITY = 1  # a review label's priority marker (original records have none: 0)
_ITEM_ID = re.compile(r"(.+)\.([0-9a-f]{24})")


# -- what makes a record worth a look (pure) ------------------------------------------------------------------
def _extra(record: dict) -> dict:
    try:
        extra = json.loads(record.get("extra_json") or "null")
    except ValueError:
        return {}
    return extra if isinstance(extra, dict) else {}


def invalid_tool_call(record: dict) -> str | None:
    """Why the record's answer is a broken tool call, or None (`flywheel.checks.call_problem`)."""
    problem = call_problem(record.get("tools_json"), record.get("response"))
    return problem[1] if problem else None


def _answer_key(message: dict) -> Any:
    calls = message.get("tool_calls") or []
    if calls:
        return sorted((tc["name"], canonical_json(json.loads(tc.get("arguments") or "{}"))) for tc in calls)
    return " ".join((message.get("content") or "").lower().split())


def second_answer(record: dict) -> tuple[str, dict] | None:
    """(model, MESSAGE row) of the other answer a record carries (`extra_json.shadow`), or None."""
    shadow = _extra(record).get("shadow")
    if not isinstance(shadow, dict) or not isinstance(shadow.get("response"), dict):
        return None
    response = {**shadow["response"], "role": "assistant"}
    if all(isinstance(tc, dict) and "name" in tc for tc in response.get("tool_calls") or []):  # MESSAGE shape
        response["tool_calls"] = [{"id": tc.get("id"), "type": "function",
                                   "function": {"name": tc["name"], "arguments": tc.get("arguments")}}
                                  for tc in response.get("tool_calls") or []] or None
    try:
        return str(shadow.get("model") or "shadow"), normalise_message(response, "shadow.response")
    except ValueError:
        return None


def flags(record: dict) -> list[tuple[str, str, dict]]:
    """[(reason, detail, extra item fields)] for one captured record; [] when nothing needs a look."""
    out: list[tuple[str, str, dict]] = []
    if record.get("feedback") is not None and record["feedback"] < 0:
        out.append((NEGATIVE, f"logged feedback {record['feedback']}", {}))
    broken = invalid_tool_call(record)
    if broken:
        out.append((INVALID_CALL, broken, {}))
    other = second_answer(record)
    if other is not None:
        try:
            differ = _answer_key(other[1]) != _answer_key(record.get("response") or {})
        except ValueError:
            differ = True
        if differ:
            out.append((DISAGREEMENT, f"{record.get('model')} and {other[0]} answered differently",
                        {"other": {"model": other[0], "answer": other[1]}}))
    extra = _extra(record)
    confidence = extra.get("confidence")
    if isinstance(confidence, (int, float)) and not isinstance(confidence, bool) and confidence < LOW_CONFIDENCE:
        out.append((LOW_CONFIDENCE_REASON, f"confidence {confidence:.2f} < {LOW_CONFIDENCE}", {}))
    verdicts = extra.get("guardrails") or extra.get("guardrail") or []
    failed = [v for v in (verdicts if isinstance(verdicts, list) else [verdicts])
              if isinstance(v, dict) and v.get("passed") is False]
    if failed:
        out.append((GUARDRAIL, "guardrail failed: " + ", ".join(str(v.get("name") or v.get("reason") or "?")
                                                                for v in failed), {}))
    return out


# -- items ----------------------------------------------------------------------------------------------------
def item_id_for(agent: str, record_id: str, reason: str) -> str:
    return f"{agent}.{digest(record_id, reason, n=24)}"


def _item_rel(item_id: str) -> str:
    match = _ITEM_ID.fullmatch(item_id) if isinstance(item_id, str) else None
    if match is None or not is_valid_id(match.group(1)):
        raise NotFound(f"no review item {str(item_id)[:80]!r}")
    return f"{QUEUE}/{match.group(1)}/{item_id}.json"


def enqueue(store: Store, record: dict, reason: str, detail: str, **extra: Any) -> dict | None:
    """Add an open item for (record, reason) unless one exists; returns the new item, or None."""
    if reason not in REASONS:
        raise ValueError(f"reason: expected one of {REASONS}, got {reason!r}")
    agent = check_id("agent id", record["agent_id"])
    iid = item_id_for(agent, record["record_id"], reason)
    if store.exists(_item_rel(iid)):
        return None
    item = {"item_id": iid, "agent": agent, "tenant": record.get("tenant"), "record_id": record["record_id"],
            "reason": reason, "detail": detail, "status": OPEN, "created": time.time(),
            "timestamp": record.get("timestamp"), "session_id": record.get("session_id"),
            "request": {"messages": record.get("messages") or [], "tools_json": record.get("tools_json") or "[]"},
            "answer": record.get("response"), "model": record.get("model"), "other": None, "suggested": None,
            "comment": None, "decision": None, **extra}
    store.write_json(_item_rel(iid), item)
    return item


def get_item(store: Store, item_id: str) -> dict:
    item = store.read_json(_item_rel(item_id))
    if not isinstance(item, dict):
        raise NotFound(f"no review item {item_id!r}")
    return item


def list_items(store: Store, agents: Iterable[str] | None = None, status: str | None = OPEN) -> list[dict]:
    """Items of `agents` (all when None) with `status` (any when None), oldest first. Reads every item file."""
    out = []
    for agent in sorted(agents) if agents is not None else store.list(QUEUE):
        if not is_valid_id(agent):
            continue
        for name in store.list(f"{QUEUE}/{agent}"):
            item = store.read_json(f"{QUEUE}/{agent}/{name}") if name.endswith(".json") else None
            if isinstance(item, dict) and (status is None or item.get("status") == status):
                out.append(item)
    return sorted(out, key=lambda i: (i.get("created") or 0, i["item_id"]))


def fill_queue(store: Store, agent: str, since: float | None = None) -> dict:
    """Enqueue the agent's new captured records and new negative feedback that need a look. Idempotent.

    New: log parts not scanned before (the cursor in `review/state/<agent>.json`), the WAL (re-read each time),
    and feedback events since the last mark. `since` (Unix seconds) rescans every part and feedback event for
    records and events at or after that time instead.
    """
    check_id("agent id", agent)
    state = store.read_json(f"{STATE}/{agent}.json") or {}
    seen = [] if since is not None else list(state.get("parts") or [])
    fresh, rows = new_records(store, agent, seen)
    counts: Counter = Counter()
    scanned = 0
    for record in rows:
        if record.get("source") == "review" or since is not None and (record.get("timestamp") or 0.0) < since:
            continue  # a review label is a decision already, never an item
        scanned += 1
        for reason, detail, extra in flags(record):
            counts[reason] += enqueue(store, record, reason, detail, **extra) is not None
    mark = int(state.get("feedback_ms") or 0)
    after = int(since * 1000) if since is not None else max(0, mark - FEEDBACK_GRACE_MS)
    events = feedback_events(store, agent, after)
    down = {e["record_id"]: e for e in events if e.get("score", 0) < 0
            and not store.exists(_item_rel(item_id_for(agent, e["record_id"], NEGATIVE)))}
    for rid, record in find_records(store, set(down), agent).items():
        e = down[rid]
        counts[NEGATIVE] += enqueue(store, record, NEGATIVE, "thumbs down" + (f": {e['comment']}" if e.get("comment")
                                                                             else ""),
                                    suggested=e.get("correction"), comment=e.get("comment")) is not None
    stamps = [int(e["event_id"].split("-", 1)[0]) for e in events if str(e.get("event_id", "")).split("-")[0].isdigit()]
    store.write_json(f"{STATE}/{agent}.json", {"parts": sorted(set(seen) | set(fresh)),
                                               "feedback_ms": max([mark, *stamps]), "updated": time.time()})
    return {"agent": agent, "parts": len(fresh), "records": scanned, "feedback_events": len(events),
            "enqueued": {r: n for r, n in counts.items() if n}}


# -- decisions and labels -------------------------------------------------------------------------------------
def _reviewer(reviewer: Any) -> str:
    if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > 200 or not reviewer.isprintable():
        raise Invalid("reviewer: printable text of 1-200 characters", "reviewer")
    return reviewer.strip()


def label_record(item: dict) -> dict:
    """The training label a decided item gives, as a `LOG_RECORD` dict."""
    decision = item["decision"]
    message = decision["message"]
    lineage = {"item_id": item["item_id"], "reviewer": decision["reviewer"], "original_record_id": item["record_id"],
               "reason": item["reason"], "decision": item["status"], "decided_at": decision["at"],
               "original_model": item.get("model")}
    return {"record_id": "review-" + digest(item["item_id"], message, n=24), "agent_id": item["agent"],
            "tenant": item.get("tenant"), "timestamp": item.get("timestamp"), "session_id": item.get("session_id"),
            "messages": item["request"]["messages"], "tools_json": item["request"]["tools_json"],
            "response": message, "model": f"review:{decision['reviewer']}", "latency_ms": None,
            "prompt_tokens": None, "completion_tokens": None, "feedback": None, "source": "review",
            "extra_json": canonical_json({"priority": PRIORITY, "review": lineage})}


def _decide(store: Store, item_id: str, reviewer: Any, status: str, message: dict) -> dict:
    item = get_item(store, item_id)
    item = {**item, "status": status, "decision": {"reviewer": _reviewer(reviewer), "at": time.time(),
                                                   "message": message}}
    label = label_record(item)
    item["decision"]["label_part"] = LogStore(store).write_records(
        [label], name_from=f"review:{item_id}:{digest(message)}").rsplit("/", 1)[-1]
    item["decision"]["label_record_id"] = label["record_id"]
    store.write_json(f"{LABELS}/{item['agent']}/{item_id}-{digest(message, n=12)}.json",
                     {"item_id": item_id, "status": status, "label_record_id": label["record_id"],
                      "label_part": item["decision"]["label_part"], "decided_at": item["decision"]["at"]})
    store.write_json(_item_rel(item_id), item)
    return item


def approve(store: Store, item_id: str, reviewer: str) -> dict:
    """The answer is right as it is: it becomes a label (a reviewed student answer included)."""
    item = get_item(store, item_id)
    if not item.get("answer"):
        raise Invalid(f"item {item_id} has no answer to approve: correct it instead", "item_id")
    return _decide(store, item_id, reviewer, APPROVED, item["answer"])


def correct(store: Store, item_id: str, reviewer: str, message: Any) -> dict:
    """The reviewer's answer (an OpenAI assistant message: content or tool_calls) replaces the record's."""
    return _decide(store, item_id, reviewer, CORRECTED, check_correction(message, "message"))


def labels(store: Store, agent: str) -> list[dict]:
    """The agent's review labels (`LOG_RECORD` dicts), one per decided item."""
    return [label_record(i) for i in list_items(store, [check_id("agent id", agent)], status=None)
            if i.get("status") in (APPROVED, CORRECTED) and i.get("decision")]


def superseded_records(store: Store, agent: str) -> set[str]:
    """Original record ids that a review decision replaces: curation should drop them in favour of the label."""
    return {i["record_id"] for i in list_items(store, [check_id("agent id", agent)], status=None)
            if i.get("status") in (APPROVED, CORRECTED)}


def openai_view(item: dict) -> dict:
    """An item's request and answers in the OpenAI message shape (what the page shows and edits)."""
    def msg(m: dict | None) -> dict | None:
        return to_openai_message(m) if m else None

    return {"messages": [msg(m) for m in item["request"]["messages"]],
            "tools": json.loads(item["request"].get("tools_json") or "[]"), "answer": msg(item.get("answer")),
            "other": {"model": item["other"]["model"], "answer": msg(item["other"]["answer"])}
            if item.get("other") else None, "suggested": msg(item.get("suggested"))}
