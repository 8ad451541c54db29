"""Near-duplicate removal for curation: MinHash signatures per record, LSH across an agent's whole history.

    flywheel curate --agents sgd_Flights --near-dup-threshold 0.9 --near-dup-num-perm 64

Two steps, both pure (no Ray):

1. `signature(messages, num_perm)`, in the per-record stage: a MinHash (datasketch, `affine32` scheme, fixed seed)
   over word 3-shingles of the normalised, redacted request (every turn, with its role and tool calls), stored as
   `num_perm` little-endian uint32 (`num_perm * 4` bytes) in the `minhash` column.
2. `mark_near_duplicates(rows, threshold)`, at publish time, over the key rows of ALL the agent's records: in
   order of precedence (a higher `priority` first, so a review label wins; then the earliest; then the record
   id), a record whose estimated Jaccard similarity to a kept record before it of another session is at least
   `threshold` is set aside as `near_duplicate`, naming the record it repeats. LSH (`MinHashLSH`) finds the
   candidates, so the work grows with the number of records, not its square.

Records of the same session are never near-duplicates of each other: they are the successive turns of one
conversation (each request extends the previous one), and a replay of the same request is an exact duplicate.
Word shingles keep short requests safe: one changed word in "a flight to Paris" changes its meaning, and such a
request shares too few 3-shingles with "a flight to Rome" to reach 0.9; only long requests that differ in a
word or two meet the threshold.

An agent's prompt template is left out of the comparison (`template`): the shingles found in at least
`near_dup_template_share` of the agent's records (a sample of at most `TEMPLATE_SAMPLE`, and only from
`TEMPLATE_MIN_RECORDS` records on) say nothing about whether two records repeat each other. Without that, a
templated agent (the news classifier: ~4,900 characters of instructions and examples around a ~60-character
headline, ~712 of a request's ~727 shingles shared by every record) has every pair of requests at an estimated
Jaccard of ~0.96, and all but one record were set aside as near-duplicates of the first. The agent's signatures
are then computed again without the template (`signature(..., skip=template)`) and compared as above. Text that
most of an agent's records repeat counts as template too: near-copies of ONE request that make up at least that
share of an agent's traffic are no longer caught (exact copies still are, by the duplicate key).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Collection, Iterable, Mapping

import numpy as np

R_NEAR_DUP = "near_duplicate"
SHINGLE_WORDS = 3
SEED = 1  # fixed: signatures computed by different workers and runs must be comparable
SCHEME = "affine32"
_TOKEN = re.compile(r"<[a-z]+_\d+>|\w+")
TEMPLATE_MIN_RECORDS = 20  # fewer records than this: no template (two near-copies would be "the template")
TEMPLATE_SAMPLE = 1000  # records the template is found in (a deterministic sample: by record id digest)
TEMPLATE_ONLY = b"[template only]"  # the one shingle of a request that is all template


def shingles(messages: Iterable[dict], k: int = SHINGLE_WORDS) -> set[bytes]:
    """Word k-shingles of the request (role markers and tool calls included), lower-cased."""
    words: list[str] = []
    for m in messages:
        words.append(f"[{m.get('role')}]")
        words.extend(_TOKEN.findall((m.get("content") or "").lower()))
        for tc in m.get("tool_calls") or []:
            words.append(f"[call:{tc.get('name')}]")
            words.extend(_TOKEN.findall((tc.get("arguments") or "").lower()))
    if len(words) <= k:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)}


@functools.lru_cache(maxsize=8)
def _prototype(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME)


def signature(messages: Iterable[dict], num_perm: int = 64, skip: Collection[bytes] = frozenset()) -> bytes:
    """The request's MinHash signature as bytes (`num_perm` little-endian uint32), without the shingles in `skip`
    (the agent's template, `template`)."""
    from datasketch import MinHash

    proto = _prototype(num_perm)
    m = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME, permutations=proto.permutations)
    words = shingles(messages).difference(skip) or {TEMPLATE_ONLY} if skip else shingles(messages)
    m.update_batch(list(words))
    return m.hashvalues.astype("<u4").tobytes()


def template(requests: Iterable[Iterable[dict]], share: float, min_records: int = TEMPLATE_MIN_RECORDS
             ) -> frozenset[bytes]:
    """The shingles found in at least `share` of `requests` (each a request's messages): the agent's prompt
    template. Empty when `share` is 0 or there are fewer than `min_records` requests."""
    if share <= 0:
        return frozenset()
    counts: Counter = Counter()
    n = 0
    for messages in requests:
        counts.update(shingles(messages))
        n += 1
    if n < max(min_records, 1):
        return frozenset()
    return frozenset(s for s, c in counts.items() if c >= share * n)


def _lean(sig: bytes):
    from datasketch import LeanMinHash

    return LeanMinHash(seed=SEED, hashvalues=np.frombuffer(sig, dtype="<u4").astype(np.uint32), scheme=SCHEME)


def mark_near_duplicates(rows: list[dict], threshold: float, signatures: Mapping[str, bytes] | None = None) -> int:
    """Mark near-duplicates `near_duplicate` in place, keeping the first by (-priority, timestamp, record id);
    returns how many were marked.

    `rows` are an agent's key rows (`record_id`, `session_id`, `timestamp`, `reason`, `minhash`, optionally
    `priority`); only rows still kept (`reason` None) with a signature take part. `signatures` (record id ->
    signature), when given, replace every such row's `minhash` (the signatures without the agent's template); it
    must hold them all. `threshold` 0 turns the filter off.
    """
    if threshold <= 0:
        return 0
    from datasketch import MinHashLSH

    live = sorted((r for r in rows if r["reason"] is None and r.get("minhash")),
                  key=lambda r: (-(r.get("priority") or 0), r["timestamp"] or 0.0, r["record_id"]))
    if not live:
        return 0
    if signatures is not None:
        missing = [r["record_id"] for r in live if r["record_id"] not in signatures]
        if missing:
            raise ValueError(f"{len(missing)} records have no signature without the template (e.g. {missing[:3]})")
    sig = (lambda r: r["minhash"]) if signatures is None else (lambda r: signatures[r["record_id"]])
    sizes = {len(sig(r)) for r in live}
    if len(sizes) > 1 or next(iter(sizes)) % 4:
        raise ValueError(f"minhash signatures of different sizes {sorted(sizes)} bytes in one agent: they come from "
                         f"runs with different near_dup_num_perm; curate again from the logs with one setting")
    num_perm = next(iter(sizes)) // 4
    # LSH only proposes candidates, tuned for recall (a lower threshold, misses weighted 9:1 over false alarms);
    # every candidate is then checked against `threshold` with the signatures' estimated Jaccard similarity.
    lsh = MinHashLSH(threshold=max(min(threshold, 0.99) - 0.1, 0.05), num_perm=num_perm, weights=(0.1, 0.9))
    kept: list[tuple[dict, object]] = []
    n = 0
    for r in live:
        m = _lean(sig(r))
        best: tuple[float, dict] | None = None
        for i in lsh.query(m):
            other, om = kept[i]
            if other["session_id"] == r["session_id"]:
                continue
            similarity = float(m.jaccard(om))
            if similarity >= threshold and (best is None or similarity > best[0]):
                best = (similarity, other)
        if best is not None:
            r["reason"] = R_NEAR_DUP
            r["detail"] = f"near-duplicate (estimated Jaccard {best[0]:.2f}) of record {best[1]['record_id']}"
            n += 1
        else:
            lsh.insert(len(kept), m)
            kept.append((r, m))
    return n
