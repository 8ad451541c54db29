"""Curation's pure core: one batch of log records -> cleaned example rows, each kept or set aside with a reason.

No Ray here (`flywheel.curate.pipeline` applies these with Ray Data). Every function is deterministic, so a
rerun gives the same dataset. Reason codes (stable, counted in the manifest):

    oversized_record, no_user_turn, empty_answer, refusal, unknown_tool, bad_tool_arguments,
    negative_feedback, duplicate, student_answer (answered by a student: not a teacher label; it stays in
    the logs for monitoring and review)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from typing import Any, Iterable

R_OVERSIZED = "oversized_record"
R_NO_USER = "no_user_turn"
R_EMPTY = "empty_answer"
R_REFUSAL = "refusal"
R_UNKNOWN_TOOL = "unknown_tool"
R_BAD_ARGS = "bad_tool_arguments"
R_NEGATIVE = "negative_feedback"
R_DUPLICATE = "duplicate"
R_STUDENT = "student_answer"

REFUSAL_RE = re.compile(r"^\s*(i'?m sorry|i am sorry|i can(?:no|')t (?:help|assist)|as an ai\b|i am unable to|"
                        r"i'm unable to)", re.IGNORECASE)

# --- PII -------------------------------------------------------------------------------------------------
# Order matters: cards before phones (a card number contains phone-like runs).
PII_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("CARD", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
    ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("IP", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")),
    ("PHONE", re.compile(r"(?<![\w-])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b")),
]


def _luhn(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    checksum = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        checksum += d
    return len(digits) >= 13 and checksum % 10 == 0


class Redactor:
    """Consistent redaction within one record: the same value gets the same placeholder everywhere
    (prompt and teacher answer), so a student still learns to copy it into a tool argument."""

    def __init__(self):
        self.mapping: dict[str, str] = {}
        self.counts: Counter = Counter()

    def _placeholder(self, kind: str, value: str) -> str:
        if value not in self.mapping:
            n = sum(1 for p in self.mapping.values() if p.startswith(f"<{kind}_")) + 1
            self.mapping[value] = f"<{kind}_{n}>"
            self.counts[kind] += 1
        return self.mapping[value]

    def __call__(self, text: str | None) -> str | None:
        if not text:
            return text
        for kind, pattern in PII_PATTERNS:
            def sub(m: re.Match, kind=kind) -> str:
                value = m.group(0)
                if kind == "CARD" and not _luhn(value):
                    return value
                return self._placeholder(kind, value)

            text = pattern.sub(sub, text)
        return text


def redact_message(msg: dict | None, redact: Redactor) -> dict | None:
    if msg is None:
        return None
    out = dict(msg)
    out["content"] = redact(msg.get("content"))
    if msg.get("tool_calls"):
        out["tool_calls"] = [{**tc, "arguments": _redact_json(tc.get("arguments"), redact)}
                             for tc in msg["tool_calls"]]
    return out


def _redact_json(args: str | None, redact: Redactor) -> str | None:
    """Redact string values inside JSON arguments (keeps the JSON valid)."""
    if not args:
        return args
    try:
        obj = json.loads(args)
    except json.JSONDecodeError:
        return redact(args)

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return redact(v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return json.dumps(walk(obj), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# --- labels, keys ----------------------------------------------------------------------------------------
def normalise_text(text: str | None) -> str:
    return re.sub(r"\s+", " ", (text or "").strip().lower())


def class_label(content: str | None) -> str | None:
    """A short answer (`[[Earnings]]`, `positive`) as a class label candidate; None for prose."""
    text = normalise_text(content).strip("[](){}<>\"'`.:; ")
    return text if text and len(text.split()) <= 6 and len(text) <= 64 else None


def dedup_key(agent: str, messages: list[dict], tools_json: str) -> str:
    """Exact-duplicate key: the agent plus the normalised request (every turn and the declared tools).

    The whole request, not just the last user turn: in multi-turn logs "yes, thanks" recurs with different
    context and different correct answers.
    """
    parts = [agent, tools_json or "[]"]
    for m in messages:
        parts.append(f"{m.get('role')}:{normalise_text(m.get('content'))}")
        for tc in m.get("tool_calls") or []:
            parts.append(f"call:{tc.get('name')}:{tc.get('arguments')}")
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def tool_names(tools_json: str | None) -> set[str]:
    try:
        return {t["function"]["name"] for t in json.loads(tools_json or "[]") if "function" in t}
    except (json.JSONDecodeError, TypeError, KeyError):
        return set()


# --- the per-record step ---------------------------------------------------------------------------------
def clean_record(row: dict, max_record_bytes: int) -> dict:
    """One LOG_RECORD row -> a cleaned row with `reason` None (kept) or a reason code (set aside)."""
    out = {
        "example_id": row["record_id"], "record_id": row["record_id"], "agent_id": row["agent_id"],
        "session_id": row.get("session_id") or row["record_id"], "timestamp": row.get("timestamp") or 0.0,
        "tools_json": row.get("tools_json") or "[]", "reason": None, "detail": None,
        "dedup_key": None, "label": None, "task": None, "pii": "{}",
        "messages": row.get("messages") or [], "target": row.get("response"), "source": row.get("source"),
    }

    def reject(reason: str, detail: str) -> dict:
        out.update(reason=reason, detail=detail)
        return out

    size = len(json.dumps(row, default=str))
    if size > max_record_bytes:
        return reject(R_OVERSIZED, f"{size} bytes > max_record_bytes={max_record_bytes}")
    if not any(m.get("role") == "user" and (m.get("content") or "").strip() for m in out["messages"]):
        return reject(R_NO_USER, "the request has no non-empty user message")
    answer = out["target"] or {}
    if (row.get("model") or "").startswith("student:"):
        return reject(R_STUDENT, f"answered by {row['model']}; only the teacher's answers are training targets")
    if row.get("feedback") is not None and row["feedback"] < 0:
        return reject(R_NEGATIVE, f"user feedback {row['feedback']}")
    calls = answer.get("tool_calls") or []
    if calls:
        declared = tool_names(out["tools_json"])
        for tc in calls:
            if declared and tc["name"] not in declared:
                return reject(R_UNKNOWN_TOOL, f"{tc['name']!r} is not among the declared tools {sorted(declared)}")
            try:
                if not isinstance(json.loads(tc.get("arguments") or "{}"), dict):
                    raise ValueError
            except ValueError:
                return reject(R_BAD_ARGS, f"arguments of {tc['name']!r} are not a JSON object")
        out["task"], out["label"] = "tool_call", "+".join(sorted({tc["name"] for tc in calls}))
    else:
        content = (answer.get("content") or "").strip()
        if not content:
            return reject(R_EMPTY, "the answer has neither text nor tool calls")
        if REFUSAL_RE.match(content):
            return reject(R_REFUSAL, content[:120])
        label = class_label(content)
        out["task"], out["label"] = ("classification", label) if label else ("text", "text")
    redact = Redactor()
    out["messages"] = [redact_message(m, redact) for m in out["messages"]]
    out["target"] = redact_message(answer, redact)
    out["pii"] = json.dumps(dict(redact.counts), sort_keys=True)
    out["dedup_key"] = dedup_key(out["agent_id"], out["messages"], out["tools_json"])
    return out


def clean_batch(rows: Iterable[dict], max_record_bytes: int) -> list[dict]:
    return [clean_record(r, max_record_bytes) for r in rows]


# --- whole-agent decisions (run on the small key columns) ------------------------------------------------
def settle_task(rows: list[dict]) -> None:
    """An agent whose text answers come from a small set of labels is a classifier; otherwise free text."""
    texts = [r for r in rows if r["task"] in ("classification", "text")]
    labels = {r["label"] for r in texts if r["task"] == "classification"}
    is_classifier = texts and all(r["task"] == "classification" for r in texts) and \
        len(labels) <= max(20, len(texts) // 5)
    for r in texts:
        if not is_classifier:
            r["task"], r["label"] = "text", "text"


def mark_duplicates(rows: list[dict]) -> int:
    """Keep the earliest record of each dedup key (ties: record id); mark the rest `duplicate`."""
    seen: dict[str, str] = {}
    n = 0
    for r in sorted(rows, key=lambda r: (r["timestamp"], r["record_id"])):
        if r["dedup_key"] in seen:
            r["reason"], r["detail"] = R_DUPLICATE, f"same request as record {seen[r['dedup_key']]}"
            n += 1
        else:
            seen[r["dedup_key"]] = r["record_id"]
    return n


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_groups(rows: list[dict], eval_fraction: float, min_eval_per_label: int, seed: int,
                 pinned: dict[str, str] | None = None) -> dict[str, str]:
    """Stratified train/eval split by label, grouped by session (a conversation never spans both).

    Labels are visited rarest first; each takes sessions into eval (deterministic hash order) until its eval
    share reaches `eval_fraction` (at least `min_eval_per_label` when the label has two or more sessions).
    `pinned` maps sessions to a split already used by an earlier version, so eval never leaks into train.
    Returns session -> "train" | "eval".
    """
    assign: dict[str, str] = dict(pinned or {})
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    for label in sorted(by_label, key=lambda lb: (len(by_label[lb]), lb)):
        members = by_label[label]
        sessions = sorted({r["session_id"] for r in members}, key=lambda s: _rank(seed, s))
        per_session = Counter(r["session_id"] for r in members)
        want = max(round(eval_fraction * len(members)), min_eval_per_label if len(sessions) >= 2 else 0)
        have = sum(per_session[s] for s in sessions if assign.get(s) == "eval")
        for s in sessions:
            if s in assign:
                continue
            if have < want and len([x for x in sessions if assign.get(x) != "eval"]) > 1:
                assign[s], have = "eval", have + per_session[s]
            else:
                assign[s] = "train"
    return assign
