"""Reviewed corrections become training labels: a label replaces the record it reviews (`reviewed`), wins over any
same-request record, and a thumbs down sets a record aside (`negative_feedback`), in fresh and incremental versions.

    .venv/bin/python -m pytest tests/test_curate_review.py -q

The pure tests call `flywheel.curate.filters` on rows cleaned from a real home (records, a review decision made
with `flywheel.review`, a feedback event); the Ray test runs `curate()` twice on the shared local Ray.
"""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq

from flywheel.capture.store import LogStore
from flywheel.config import CurateConfig
from flywheel.curate import filters as F
from flywheel.curate.pipeline import curate
from flywheel.curate.reviewed import read_review
from flywheel.datasets import SPLITS, read_split
from flywheel.review import approve, correct, fill_queue, list_items, record_feedback
from flywheel.schema import message
from flywheel.storage import Store

AGENT = "sgd_Flights"
TOOLS = [{"type": "function", "function": {
    "name": "FindFlights", "description": "Search flights",
    "parameters": {"type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"}},
                   "required": ["origin"]}}}]
CITIES = ["Boston", "Denver", "Austin", "Seattle", "Chicago", "Miami", "Atlanta", "Portland", "Phoenix", "Dallas",
          "Houston", "Orlando"]
FIXED = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
    "name": "FindFlights", "arguments": {"origin": "San Francisco", "destination": "Boston"}}}]}


def call(args: dict) -> dict:
    return message("assistant", tool_calls=[{"id": "c0", "name": "FindFlights", "arguments": json.dumps(args)}])


def record(i: int, ts: float | None = None, rid: str | None = None) -> dict:
    city = CITIES[i]
    return {"record_id": rid or f"r{i}", "agent_id": AGENT, "tenant": "acme", "timestamp": ts or 1000.0 + i,
            "session_id": f"s-{rid or i}", "messages": [message("user", f"find me a flight to {city} please")],
            "tools_json": json.dumps(TOOLS), "response": call({"origin": "SF", "destination": city}),
            "model": "teacher:big", "latency_ms": 5.0, "prompt_tokens": 3, "completion_tokens": 2, "feedback": None,
            "source": "serve", "extra_json": None}


def review_correction(store: Store, rid: str) -> str:
    """A thumbs down on `rid`, queued, then corrected by a reviewer (the review package's own path)."""
    record_feedback(store, rid, "acme", "down", comment="wrong origin")
    fill_queue(store, AGENT)
    item = next(i for i in list_items(store, [AGENT]) if i["record_id"] == rid)
    correct(store, item["item_id"], "acme:k1", FIXED)
    record_feedback(store, rid, "acme", "up")  # the latest rating counts: a later thumbs up on the original
    return item["item_id"]


def keyed(rows: list[dict]) -> dict[str, dict]:
    return {r["record_id"]: r for r in rows}


# -- pure: the decisions on rows cleaned from a real home ---------------------------------------------------------
def test_a_label_replaces_its_original_and_a_thumbs_down_is_set_aside(store):
    LogStore(store).write_records([record(i) for i in range(4)], name_from="day1")
    item = review_correction(store, "r0")
    record_feedback(store, "r1", "acme", "down")
    LogStore(store).write_records([record(0, ts=1.0, rid="copy0")], name_from="day2")  # same request as r0, earlier

    review = read_review(store, AGENT)
    assert review.superseded == {"r0": item} and review.negative == {"r1"} and len(review.labels) == 1
    rows = F.clean_batch(LogStore(store).read(AGENT).to_pylist())
    by_id = keyed(rows)
    (label_id,) = review.labels.values()
    label = by_id[label_id]
    assert label["reason"] is None and label["priority"] == 1 and label["source"] == "review"
    assert json.loads(label["review_json"])["review"]["item_id"] == item
    assert json.loads(label["target"]["tool_calls"][0]["arguments"])["origin"] == "San Francisco"
    assert by_id["r0"]["priority"] == 0 and by_id["r0"]["review_json"] is None

    counts = F.set_aside_reviewed(rows, review.superseded, review.negative, review.labels)
    assert counts == {F.R_REVIEWED: 1, F.R_NEGATIVE: 1}
    assert by_id["r0"]["reason"] == F.R_REVIEWED and item in by_id["r0"]["detail"]
    assert by_id["r1"]["reason"] == F.R_NEGATIVE
    assert F.mark_duplicates(rows) == 1  # the earlier unreviewed copy loses to the label
    assert by_id["copy0"]["reason"] == F.R_DUPLICATE and label_id in by_id["copy0"]["detail"]
    assert by_id["r0"]["reason"] == F.R_REVIEWED  # a row already set aside keeps its reason
    assert {r["record_id"] for r in rows if r["reason"] is None} == {label_id, "r2", "r3"}


def test_a_later_decision_on_the_same_item_replaces_the_earlier_label(store):
    LogStore(store).write_records([record(i) for i in range(2)], name_from="day1")
    record_feedback(store, "r0", "acme", "down")
    fill_queue(store, AGENT)
    (item,) = list_items(store, [AGENT])
    approve(store, item["item_id"], "acme:k1")
    correct(store, item["item_id"], "acme:k2", FIXED)  # the reviewer changed their mind: two label parts
    rows = F.clean_batch(LogStore(store).read(AGENT).to_pylist())
    review = read_review(store, AGENT)
    assert F.set_aside_reviewed(rows, review.superseded, review.negative, review.labels) == {F.R_REVIEWED: 2}
    labels = [r for r in rows if r["review_json"]]
    assert len(labels) == 2 and [r["record_id"] for r in labels if r["reason"] is None] == \
        [review.labels[item["item_id"]]]
    (kept,) = [r for r in labels if r["reason"] is None]
    assert json.loads(kept["target"]["tool_calls"][0]["arguments"])["origin"] == "San Francisco"


def test_a_label_of_an_item_we_know_nothing_of_keeps_its_place():
    old = {"record_id": "review-old", "reason": None, "review_json": json.dumps({"priority": 1, "review": {
        "item_id": "a.0123456789abcdef01234567"}}), "priority": 1}
    new = {**old, "record_id": "review-new"}
    orphan = {**old, "record_id": "review-orphan", "review_json": json.dumps({"review": {"item_id": "a.lost"}})}
    counts = F.set_aside_reviewed([old, new, orphan], {}, set(), labels={"a.0123456789abcdef01234567": "review-new"})
    assert counts == {F.R_REVIEWED: 1} and old["reason"] == F.R_REVIEWED and "later decision" in old["detail"]
    assert new["reason"] is None and orphan["reason"] is None  # an item we know nothing of: the label stays


def test_review_labels_win_duplicates_near_duplicates_and_the_cap():
    def rows():
        return [{"record_id": "a-early", "timestamp": 1.0, "dedup_key": "k", "reason": None, "priority": 0},
                {"record_id": "label", "timestamp": 9.0, "dedup_key": "k", "reason": None, "priority": 1},
                {"record_id": "b-late", "timestamp": 5.0, "dedup_key": "k", "reason": None}]  # no priority: 0

    got = rows()
    assert F.mark_duplicates(got) == 2
    assert [r["record_id"] for r in got if r["reason"] is None] == ["label"]
    assert all("record label" in r["detail"] for r in got if r["reason"])
    plain = [{**r, "priority": 0} for r in rows()]
    F.mark_duplicates(plain)  # without priority, the earliest wins as before
    assert [r["record_id"] for r in plain if r["reason"] is None] == ["a-early"]

    long = ("I need a nonstop flight from San Francisco to Boston next Friday morning for two adults, window "
            "seats if possible, returning on Sunday evening, and please avoid any red-eye departures")
    clean = F.clean_batch([{**record(0, ts=1.0, rid="orig"), "messages": [message("user", long)]},
                           {**record(0, ts=9.0, rid="label"), "messages": [message("user", long + " thanks")],
                            "extra_json": json.dumps({"priority": 1, "review": {"item_id": "x"}})}])
    assert [c["reason"] for c in clean] == [None, None] and clean[1]["priority"] == 1
    assert F.mark_near_duplicates(clean, 0.8) == 1
    assert clean[0]["reason"] == F.R_NEAR_DUP and "record label" in clean[0]["detail"] and clean[1]["reason"] is None

    capped = [{"record_id": f"r{i}", "label": "A", "task": "tool_call", "reason": None, "priority": int(i == 7)}
              for i in range(10)]
    F.cap_examples(capped, 2, seed=0)
    assert "r7" in {r["record_id"] for r in capped if r["reason"] is None}


def test_priority_comes_from_extra_json():
    assert F.review_marks(None) == (0, None) and F.review_marks("{bad") == (0, None)
    assert F.review_marks('{"priority": 2}') == (2, None) and F.review_marks('{"priority": "high"}') == (0, None)
    label = json.dumps({"priority": 1, "review": {"item_id": "a.x"}})
    assert F.review_marks(label) == (1, label) and F.review_item(label) == "a.x"


# -- Ray: a fresh version, then an incremental one after the review, then one after a thumbs down only -------------
def test_curate_trains_on_the_label_and_quarantines_what_it_replaces(ray_session, store, tmp_path):
    logs = LogStore(store)
    logs.write_records([record(i) for i in range(10)], name_from="day1")
    v1 = curate(CurateConfig(agents=(AGENT,)), store)[AGENT]
    train1 = read_split(store, AGENT, v1["version"], "train").column("record_id").to_pylist()
    original, down, later = sorted(train1)[:3]

    item = review_correction(store, original)  # written after v1: a new log part holds the label
    record_feedback(store, down, "acme", "down")
    copy = {**record(int(original[1:]), ts=1.0, rid="copy"), "session_id": "s-copy"}  # same request, earliest
    logs.write_records([copy, record(10), record(11)], name_from="day2")

    v2 = curate(CurateConfig(agents=(AGENT,)), store)[AGENT]
    assert v2["lineage"]["incremental"] and v2["lineage"]["previous"] == v1["version"]
    rows = [r for split in SPLITS for r in read_split(store, AGENT, v2["version"], split).to_pylist()]
    labels = [r for r in rows if r["record_id"].startswith("review-")]
    assert len(labels) == 1 and labels[0]["split"] == "train"  # the original's session is pinned to train
    assert json.loads(labels[0]["target"]["tool_calls"][0]["arguments"]) == {"origin": "San Francisco",
                                                                            "destination": "Boston"}
    with store.open(f"datasets/{AGENT}/{v2['version']}/quarantine.parquet") as f:
        quarantine = {r["record_id"]: r for r in pq.read_table(f).to_pylist()}
    assert quarantine[original]["reason"] == "reviewed" and item in quarantine[original]["detail"]
    assert quarantine[down]["reason"] == "negative_feedback"
    assert quarantine["copy"]["reason"] == "duplicate" and labels[0]["record_id"] in quarantine["copy"]["detail"]
    c = v2["counts"]
    assert c["in"] == c["kept"] + c["quarantined"] == 14 and c["kept"] == sum(c[s] for s in SPLITS) == 11
    assert c["review_labels"] == 1 and v2["reasons"] == {"duplicate": 1, "negative_feedback": 1, "reviewed": 1}
    assert v2["stages"]["decide"]["reasons"] == v2["reasons"]  # decided now, on carried rows too
    review = v2["lineage"]["review"]
    assert review["labels"] == 1 and review["items"] == [item] and review["decisions"] == {"corrected": 1}
    with store.open(f"datasets/{AGENT}/{v2['version']}/keys.parquet") as f:
        keys = {r["record_id"]: r for r in pq.read_table(f).to_pylist()}
    assert json.loads(keys[labels[0]["record_id"]]["review_json"])["review"]["original_record_id"] == original
    assert "review labels (decisions) | 1 (corrected: 1)" in store.read_text(f"datasets/{AGENT}/{v2['version']}/card.md")

    # a full rebuild of the same home gives the same examples
    other = Store(str(tmp_path / "rebuild"))
    for folder in ("logs", "review", "feedback"):
        shutil.copytree(store.path(folder), other.path(folder))
    full = curate(CurateConfig(agents=(AGENT,), incremental=False), other, executor="local")[AGENT]
    assert full["version"] == v2["version"] and full["reasons"] == v2["reasons"]

    # a thumbs down alone (no new log part) makes a new version from the previous one's rows
    record_feedback(store, later, "acme", "down")
    v3 = curate(CurateConfig(agents=(AGENT,)), store)[AGENT]
    assert v3["version"] != v2["version"] and v3["lineage"]["parts_read"] == [] and "clean" not in v3["timings_s"]
    assert v3["reasons"]["negative_feedback"] == 2 and v3["counts"]["kept"] == 10 and v3["counts"]["review_labels"] == 1
    assert later not in set(read_split(store, AGENT, v3["version"], "train").column("record_id").to_pylist())
    again = curate(CurateConfig(agents=(AGENT,)), store)[AGENT]
    assert again["version"] == v3["version"] and "agents" not in again["timings_s"]  # nothing changed since
