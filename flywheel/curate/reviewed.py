"""What people said about an agent's records, as curation uses it: review labels, what they replace, thumbs down.

    flywheel curate --agents sgd_Flights      (`flywheel.curate.pipeline` reads this once per agent per run)

`read_review(store, agent)` gathers, from `flywheel.review`, the original records a review decision replaces
(`superseded_records`), each decided item's current label (`labels`: a label of an earlier decision on the same
item is replaced too) and the records whose latest rating is a thumbs down (`negative_records`). The sets are
small (one entry per decision or rating), picklable, and go to the agent's decide task as arguments; the pure
`flywheel.curate.filters.set_aside_reviewed` applies them. Their digest names the dataset version (same logs, same
decisions, same version) and, kept in the manifest, tells the next run whether decisions changed since.

`label_lineage(rows)` is what the manifest says about the labels a version holds.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

from flywheel.schema import digest
from flywheel.storage import Store

MAX_ITEMS = 200  # review item ids listed in a manifest (the count is always exact)


@dataclasses.dataclass(frozen=True)
class Review:
    """One agent's review decisions and ratings, as record ids."""

    superseded: dict[str, str | None] = dataclasses.field(default_factory=dict)  # original -> replacing item
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # review item -> its current label's record id
    negative: frozenset[str] = frozenset()  # records whose latest rating is a thumbs down

    @property
    def digest(self) -> str | None:
        """A digest of the decisions (None when there are none: versions are then named as before reviews)."""
        if not (self.superseded or self.labels or self.negative):
            return None
        return digest(sorted(self.superseded), sorted(self.labels.items()), sorted(self.negative), n=16)


def read_review(store: Store, agent: str) -> Review:
    """The agent's review decisions and ratings (reads its review items and feedback events once)."""
    from flywheel.review import labels, negative_records, superseded_records

    current = labels(store, agent)
    items: dict[str, str | None] = {}
    for label in current:
        lineage = json.loads(label["extra_json"])["review"]
        items[lineage["original_record_id"]] = lineage["item_id"]
    superseded = {rid: items.get(rid) for rid in sorted(set(superseded_records(store, agent)) | set(items))}
    return Review(superseded, {json.loads(r["extra_json"])["review"]["item_id"]: r["record_id"] for r in current},
                  frozenset(negative_records(store, agent)))


def label_lineage(kept: list[dict], set_aside: list[dict], review: Review | None) -> dict:
    """The manifest's `lineage.review`: the review labels kept (count, decisions, reasons, item ids), the labels
    set aside, and the digest of the decisions this version applied. Rows carry `review_json`."""
    def lineage(r: dict) -> dict:
        return json.loads(r["review_json"])["review"]

    labels = [lineage(r) for r in kept if r.get("review_json")]
    items = sorted(x["item_id"] for x in labels)
    return {"inputs": review.digest if review else None, "labels": len(labels),
            "decisions": dict(sorted(Counter(str(x.get("decision")) for x in labels).items())),
            "reasons": dict(sorted(Counter(str(x.get("reason")) for x in labels).items())),
            "items": items[:MAX_ITEMS], "items_listed": min(len(items), MAX_ITEMS),
            "labels_set_aside": sum(1 for r in set_aside if r.get("review_json"))}
