"""Curation's pure core: one batch of log records -> cleaned example rows, each kept or set aside with a reason.

    flywheel curate --agents sgd_Flights            (applied by `flywheel.curate.pipeline` on Ray Data)

No Ray here. Every function is deterministic, so a rerun gives the same dataset. Per batch (`clean_batch`):
validate and label each record, score toxicity once for the batch, redact PII consistently per record
(`flywheel.pii`: regex always, Presidio for the agents that ask), then compute the exact dedup key and
the MinHash signature (`flywheel.curate.near_dup`). Per agent, on the small key columns: what people said
(`set_aside_reviewed`), exact duplicates, near-duplicates, classifier or free text, a label-balanced cap, the
session-grouped stratified train/validation/test split (`split_groups`).

Review labels (`flywheel.review`: a reviewer's approved or corrected answer, logged with `source="review"` and
`extra_json.priority` 1) go first wherever records compete: duplicates and near-duplicates keep the record with
the highest priority, then the earliest (`precedence`), and the cap keeps labels before other rows; the record a
label replaces is set aside as `reviewed`. Priority is `extra_json.priority` (an integer; 0 when absent).

Reason codes (stable, counted in the manifest):

    oversized_record, no_user_turn, empty_answer, refusal, unknown_tool, bad_tool_arguments,
    negative_feedback (logged feedback < 0, or the latest user rating is a thumbs down), duplicate,
    student_answer (answered by a student: not a teacher label; it stays in the logs for monitoring and review),
    toxic, tool_schema_violation, too_long, too_short (see `flywheel.curate.quality`), near_duplicate
    (`flywheel.curate.near_dup`), over_agent_cap, reviewed (a review label replaces it, or a later decision on
    the same review item replaces this label)
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from typing import Any, Collection, Iterable, Mapping

from flywheel import pii
from flywheel.checks import (R_BAD_ARGS, R_EMPTY, R_REFUSAL, R_SCHEMA, R_UNKNOWN_TOOL,  # noqa: F401  (reason codes)
                             answer_problem, class_label, dedup_key, normalise_text)
from flywheel.config import CurateConfig
from flywheel.curate import near_dup, quality
from flywheel.curate.near_dup import mark_near_duplicates  # noqa: F401  (re-exported: the pipeline)
from flywheel.pii import Redactor

R_OVERSIZED = "oversized_record"
R_NO_USER = "no_user_turn"
R_NEGATIVE = "negative_feedback"
R_DUPLICATE = "duplicate"
R_STUDENT = "student_answer"
R_TOXIC = quality.R_TOXIC
R_TOO_LONG = quality.R_TOO_LONG
R_TOO_SHORT = quality.R_TOO_SHORT
R_NEAR_DUP = near_dup.R_NEAR_DUP
R_OVER_CAP = "over_agent_cap"
R_REVIEWED = "reviewed"
RARE = "__rare__"  # the stratum of labels too small to stratify on their own


# --- PII (one text at a time; `clean_batch` redacts whole records with `pii.redact_record`) ----------------
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


def review_marks(extra_json: str | None) -> tuple[int, str | None]:
    """(priority, the review lineage JSON or None) of a record from its `extra_json`.

    Priority is `extra_json.priority` when it is an integer, else 0. The lineage is the record's `extra_json`,
    kept verbatim, when it holds a `review` object with an `item_id` (a review label); None otherwise.
    """
    try:
        extra = json.loads(extra_json or "{}")
    except (ValueError, TypeError):
        return 0, None
    if not isinstance(extra, dict):
        return 0, None
    priority = extra.get("priority", 0)
    priority = priority if isinstance(priority, int) and not isinstance(priority, bool) else 0
    review = extra.get("review")
    return priority, extra_json if isinstance(review, dict) and review.get("item_id") else None


def review_item(review_json: str | None) -> str | None:
    """The review item id of a label's lineage (`review_marks`), or None."""
    return json.loads(review_json)["review"]["item_id"] if review_json else None


def precedence(r: dict) -> tuple:
    """Which of two competing records wins (smaller first): higher priority, then earlier, then record id."""
    return -(r.get("priority") or 0), r["timestamp"] if r["timestamp"] is not None else 0.0, r["record_id"]


# --- the per-record step ---------------------------------------------------------------------------------
def _check(row: dict, max_record_bytes: int, cfg: CurateConfig) -> dict:
    """Validate and label one LOG_RECORD row (nothing redacted yet): `reason` None (kept) or a reason code."""
    priority, review = review_marks(row.get("extra_json"))
    out = {
        "example_id": row["record_id"], "record_id": row["record_id"], "agent_id": row["agent_id"],
        "session_id": row.get("session_id") or row["record_id"], "timestamp": row.get("timestamp") or 0.0,
        "tools_json": row.get("tools_json") or "[]", "reason": None, "detail": None,
        "dedup_key": None, "label": None, "task": None, "pii": "{}", "minhash": None,
        "messages": row.get("messages") or [], "target": row.get("response"), "source": row.get("source"),
        "priority": priority, "review_json": review,
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
    problem = answer_problem(out["tools_json"], answer)
    if problem:
        return reject(*problem)
    calls = answer.get("tool_calls") or []
    if calls:
        out["task"], out["label"] = "tool_call", "+".join(sorted({tc.get("name") or "" for tc in calls}))
    else:
        label = class_label(answer.get("content"))
        out["task"], out["label"] = ("classification", label) if label else ("text", "text")
    bounds = quality.length_violation(out["messages"], answer, cfg.max_prompt_chars, cfg.max_answer_chars,
                                      cfg.min_answer_chars)
    if bounds:
        return reject(*bounds)
    return out


def _flag_toxic(outs: list[dict], threshold: float) -> None:
    """Score every user turn and answer text of the batch's kept records at once; set aside the toxic ones."""
    if threshold >= 1.0:
        return
    pairs = {id(o): quality.scored_texts(o["messages"], o["target"]) for o in outs if o["reason"] is None}
    scores = quality.toxicity(t for ps in pairs.values() for _, t in ps)
    for o in outs:
        if o["reason"] is None:
            detail = quality.toxic_detail(pairs[id(o)], scores, threshold)
            if detail:
                o["reason"], o["detail"] = R_TOXIC, detail


def _redact(outs: list[dict], cfg: CurateConfig) -> None:
    """Redact every record (kept or set aside: quarantine is stored too), Presidio once per batch."""
    policies = {a: pii.policy_for(a, cfg.presidio_agents, cfg.presidio_entities, cfg.presidio_min_score,
                                  cfg.pii_allow) for a in {o["agent_id"] for o in outs}}
    texts = [t for o in outs if policies[o["agent_id"]].presidio and o["reason"] != R_OVERSIZED
             for t in pii.record_texts([*o["messages"], o["target"]], policies[o["agent_id"]].allow_args)]
    found = pii.presidio_spans(texts, tuple(cfg.presidio_entities), cfg.presidio_min_score) if texts else {}
    for o in outs:
        policy = policies[o["agent_id"]]
        use = found if policy.presidio and o["reason"] != R_OVERSIZED else None
        o["messages"], o["target"], redactor = pii.redact_record(o["messages"], o["target"], policy, use)
        o["detail"] = redactor.apply(o["detail"])
        o["pii"] = json.dumps(dict(redactor.counts), sort_keys=True)


def clean_batch(rows: Iterable[dict], max_record_bytes: int | None = None,
                cfg: CurateConfig | None = None) -> list[dict]:
    """LOG_RECORD rows -> cleaned rows (kept: `reason` None; set aside: a reason code and a detail).

    `cfg` carries the quality settings (defaults: `CurateConfig()`); `max_record_bytes` overrides its bound.
    """
    cfg = cfg or CurateConfig()
    limit = cfg.max_record_bytes if max_record_bytes is None else max_record_bytes
    outs = [_check(r, limit, cfg) for r in rows]
    _flag_toxic(outs, cfg.toxicity_threshold)
    _redact(outs, cfg)
    for o in outs:
        if o["reason"] is None:
            o["dedup_key"] = dedup_key(o["agent_id"], o["messages"], o["tools_json"])
            o["minhash"] = near_dup.signature(o["messages"], cfg.near_dup_num_perm)
    return outs


def clean_record(row: dict, max_record_bytes: int | None = None, cfg: CurateConfig | None = None) -> dict:
    """One LOG_RECORD row -> a cleaned row (see `clean_batch`)."""
    return clean_batch([row], max_record_bytes, cfg)[0]


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


def set_aside_reviewed(rows: list[dict], superseded: Mapping[str, str | None] | Collection[str],
                       negative: Collection[str], labels: Mapping[str, str] | None = None) -> Counter:
    """Set aside, in place, the kept rows (`reason` None) that people have judged; returns the count per reason.

    `superseded`: original record ids a review label replaces (a mapping may name the replacing review item)
    -> `reviewed`. `labels`: review item id -> the record id of its current label; a label row (`review_json`
    set) of a listed item that is not its current label was replaced by a later decision -> `reviewed` (a label
    of an item not listed keeps its place: it wins duplicates by priority anyway). `negative`:
    records whose latest user rating is a thumbs down -> `negative_feedback`. A record both replaced and
    rated down is `reviewed`. Rows already set aside keep their reason. Pure: the caller reads the id sets
    (`flywheel.review.superseded_records`, `labels`, `negative_records`) once per agent.
    """
    counts: Counter = Counter()
    for r in rows:
        if r["reason"] is not None:
            continue
        rid = r["record_id"]
        if rid in superseded:
            item = superseded.get(rid) if isinstance(superseded, Mapping) else None
            r["reason"] = R_REVIEWED
            r["detail"] = "a review label replaces it" + (f" (review item {item})" if item else "")
        elif labels and r.get("review_json") and labels.get(review_item(r["review_json"]), rid) != rid:
            r["reason"] = R_REVIEWED
            r["detail"] = (f"a later decision on review item {review_item(r['review_json'])} replaces this label "
                           f"(with {labels[review_item(r['review_json'])]})")
        elif rid in negative:
            r["reason"], r["detail"] = R_NEGATIVE, "the latest user rating is a thumbs down"
        else:
            continue
        counts[r["reason"]] += 1
    return counts


def mark_duplicates(rows: list[dict]) -> int:
    """Keep one record of each dedup key, the first by `precedence` (a review label before any other record,
    then the earliest, then the record id); mark the rest `duplicate`. Rows already set aside take no part."""
    seen: dict[str, str] = {}
    n = 0
    for r in sorted((r for r in rows if r["reason"] is None), key=precedence):
        if r["dedup_key"] in seen:
            r["reason"], r["detail"] = R_DUPLICATE, f"same request as record {seen[r['dedup_key']]}"
            n += 1
        else:
            seen[r["dedup_key"]] = r["record_id"]
    return n


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def cap_examples(rows: list[dict], max_examples: int, seed: int) -> int:
    """A label-balanced cap on an agent's kept rows; the rest are set aside as `over_agent_cap`. Returns how many.

    The cap is shared by water-filling: every label gets an equal share, a label smaller than its share keeps
    all of its rows and leaves the remainder to the others. Within a label the rows kept are the first in a
    seeded hash order of their record ids, so a rerun (and a later version with more logs) keeps the same ones.
    Rows with a higher priority (review labels) come first within their label. Settles the task first
    (`settle_task`), as labels depend on it.
    """
    kept = [r for r in rows if r["reason"] is None]
    if max_examples <= 0 or len(kept) <= max_examples:
        return 0
    settle_task(kept)
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in kept:
        by_label[r["label"]].append(r)
    labels = sorted(by_label, key=lambda lb: (len(by_label[lb]), lb))
    left, n = max_examples, 0
    for i, label in enumerate(labels):
        members = sorted(by_label[label], key=lambda r: (-(r.get("priority") or 0), _rank(seed, r["record_id"])))
        quota = min(len(members), left // (len(labels) - i))
        left -= quota
        for r in members[quota:]:
            r["reason"] = R_OVER_CAP
            r["detail"] = (f"max_examples_per_agent={max_examples}: label {label!r} keeps {quota} of "
                           f"{len(members)} (label-balanced)")
            n += 1
    return n


def split_groups(rows: list[dict], validation_fraction: float, test_fraction: float, min_held_out_per_label: int,
                 seed: int, pinned: dict[str, str] | None = None,
                 min_label_count: int = CurateConfig.min_label_count) -> dict[str, str]:
    """Stratified train/validation/test split by label, grouped by session (a conversation is in one split).

    Labels with fewer than `min_label_count` rows are too small to stratify on their own: they form one stratum,
    `__rare__` (as the NVIDIA Data Flywheel blueprint does), which takes its held-out shares as a whole. Strata are
    visited smallest first; each takes sessions (in a seeded hash order) into test until its test rows reach
    `test_fraction` of the stratum, then into validation until those reach `validation_fraction`; each at least
    `min_held_out_per_label` rows when the stratum has the sessions (test from 2 sessions, validation from 3), and
    the rest go to train. A label seen more than once keeps a session in train: a session is held out only if every
    such label it holds keeps another session in train, so those labels are always learned before they are judged.
    A label seen once (an agent whose requests each declare other tools) cannot be both, so it does not hold its
    session back: such agents still get about the configured shares.
    `pinned` maps sessions to the split an earlier version gave them; they stay there, so a held-out conversation
    never leaks into train. Returns session -> "train" | "validation" | "test".
    """
    assign: dict[str, str] = dict(pinned or {})
    counts = Counter(r["label"] for r in rows)
    strata: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        strata[RARE if counts[r["label"]] < min_label_count else r["label"]].append(r)
    for stratum in sorted(strata, key=lambda st: (len(strata[st]), st)):
        _split_stratum(strata[stratum], counts, assign, {
            "test": (test_fraction, 2), "validation": (validation_fraction, 3)}, min_held_out_per_label, seed)
    return assign


def _split_stratum(members: list[dict], counts: Counter, assign: dict[str, str],
                   shares: dict[str, tuple[float, int]], min_held_out: int, seed: int) -> None:
    """Assign one stratum's unassigned sessions (see `split_groups`); `shares`: split -> (fraction, the sessions the
    stratum needs before `min_held_out` applies), filled in order."""
    sessions = sorted({r["session_id"] for r in members}, key=lambda s: _rank(seed, s))
    per_session = Counter(r["session_id"] for r in members)
    labels_of: dict[str, set[str]] = defaultdict(set)
    sessions_of: dict[str, set[str]] = defaultdict(set)
    for r in members:
        labels_of[r["session_id"]].add(r["label"])
        sessions_of[r["label"]].add(r["session_id"])
    in_train = {lb: sum(1 for s in ss if assign.get(s, "train") == "train") for lb, ss in sessions_of.items()}
    want = {split: max(round(fraction * len(members)), min_held_out if len(sessions) >= needs else 0)
            for split, (fraction, needs) in shares.items()}
    have = Counter({split: sum(per_session[s] for s in sessions if assign.get(s) == split) for split in shares})
    for s in sessions:
        if s in assign:
            continue
        free = all(in_train[lb] > 1 for lb in labels_of[s] if counts[lb] > 1)
        split = next((sp for sp in shares if have[sp] < want[sp]), None) if free else None
        assign[s] = split or "train"
        if split:
            have[split] += per_session[s]
            for lb in labels_of[s]:
                in_train[lb] -= 1
