"""Input drift tests of one window of live requests against the training reference: pure numpy/scipy, no store.

    from flywheel.monitor.stats import input_drift, sample
    result = input_drift(sample(ref_rows, ref_emb), sample(live_rows, live_emb), alpha=0.01, permutations=999)

Five tests, one family:

    text             MMD^2 between the MiniLM embeddings of the last user turn (Gaussian kernel, bandwidth = the
                     median squared distance of the pooled sample): sees a shift of the whole mix of requests
    text_neighbours  Schilling's nearest-neighbour test on the same embeddings (how many of each request's k
                     nearest requests come from its own side): sees new kinds of requests that sit
                     close to the old ones (new intents of a banking agent), where MMD needs a larger share
    chars            two-sample Kolmogorov-Smirnov on the length of the last user turn
    n_messages       K-S on the number of messages (how deep into a conversation)
    n_tools          K-S on the number of declared tools (K-S is conservative on such discrete values)

The two embedding tests share `permutations` random relabellings of the pooled sample: their p-values are exact
under exchangeability, whatever the embeddings' distribution (floor: 1 / (permutations + 1)).

Holm's step-down correction keeps the chance that an in-distribution window fails ANY test at or below `alpha`;
persistence across windows (`flywheel.monitor.episodes`) keeps false drift episodes rarer still.

Duplicate requests (the same `key`) count once on each side: curation deduplicates the reference the same way, a
retried request is one request, and a window sampled with repeats is not an independent sample of its
distribution (the permutation and K-S p-values would be too small).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

TESTS = ("text", "text_neighbours", "chars", "n_messages", "n_tools")


@dataclass(frozen=True)
class Sample:
    """The input features of distinct requests: embeddings (n x d) and the numeric features (n,)."""

    emb: np.ndarray
    chars: np.ndarray
    n_messages: np.ndarray
    n_tools: np.ndarray

    def __len__(self) -> int:
        return len(self.emb)


def distinct(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the first row of every distinct request `key` (rows without a key are all distinct)."""
    seen, keep = set(), []
    for i, row in enumerate(rows):
        key = row.get("key")
        if key is None or key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def sample(rows: Sequence[dict[str, Any]], emb: np.ndarray) -> Sample:
    """A `Sample` of the distinct requests among `rows` (feature dicts, aligned with the rows of `emb`)."""
    keep = distinct(rows)
    emb = np.asarray(emb, dtype=np.float64).reshape(len(rows), -1)[keep]
    col = {k: np.array([float(rows[i][k]) for i in keep]) for k in ("chars", "n_messages", "n_tools")}
    return Sample(emb, col["chars"], col["n_messages"], col["n_tools"])


def neighbours(total: int) -> int:
    """k of the nearest-neighbour test: a tenth of the pooled sample, between 5 and 20 (fewer for tiny samples)."""
    return max(1, min(total - 1, max(5, min(20, total // 10))))


def embedding_tests(x: np.ndarray, y: np.ndarray, permutations: int = 999,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """{"text": (MMD^2, p), "text_neighbours": (same-side neighbour pairs, p)} of two samples of unit vectors.

    Column 0 of the label matrix is the observed split, every other column one random relabelling. MMD^2 is
    w' K w with w = 1/n on one side and -1/m on the other (one (n+m) x (n+m) by (n+m) x B product for all of
    them); the neighbour statistic counts the k-nearest-neighbour pairs whose two ends are on the same side.
    p = (1 + #{relabelled >= observed}) / (1 + B).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        return {"text": (0.0, 1.0), "text_neighbours": (0.0, 1.0)}
    z = np.vstack([x, y])
    total = n + m
    gram = z @ z.T
    sq = np.diag(gram).copy()
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    bandwidth = float(np.median(dist[np.triu_indices(total, 1)]))
    if bandwidth <= 0.0:  # (nearly) every request the same on both sides: nothing to tell apart
        return {"text": (0.0, 1.0), "text_neighbours": (0.0, 1.0)}
    rng = np.random.default_rng(seed)
    live = np.zeros((total, permutations + 1), dtype=bool)
    live[n:, 0] = True
    relabelled = rng.random((permutations, total)).argsort(axis=1)[:, :m]  # the "live" rows of each relabelling
    live[relabelled.T, np.arange(1, permutations + 1)[None, :]] = True

    weights = np.where(live, -1.0 / m, 1.0 / n)
    mmd = np.einsum("ib,ib->b", weights, np.exp(-dist / bandwidth) @ weights)

    k = neighbours(total)
    np.fill_diagonal(dist, np.inf)
    nearest = np.argpartition(dist, k - 1, axis=1)[:, :k]
    src, dst = np.repeat(np.arange(total), k), nearest.ravel()
    same = (live[src] == live[dst]).sum(axis=0).astype(np.float64)

    def p(stats: np.ndarray) -> float:
        return float((1.0 + np.count_nonzero(stats[1:] >= stats[0] - 1e-12)) / (permutations + 1.0))

    return {"text": (float(mmd[0]), p(mmd)), "text_neighbours": (float(same[0]), p(same))}


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = 999, seed: int = 0) -> tuple[float, float]:
    """(MMD^2, permutation p-value) of two samples of vectors; see `embedding_tests`."""
    return embedding_tests(x, y, permutations, seed)["text"]


def ks_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(K-S statistic, p-value); 1.0 when either side is empty or every value on both sides is the same."""
    from scipy.stats import ks_2samp

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0 or np.ptp(np.concatenate([a, b])) == 0:
        return 0.0, 1.0
    result = ks_2samp(a, b)
    return float(result.statistic), float(result.pvalue)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (reject where adjusted <= alpha: family-wise error <= alpha)."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def input_drift(reference: Sample, live: Sample, alpha: float, permutations: int = 999, seed: int = 0) -> dict:
    """The five input tests of `live` against `reference`, Holm-corrected at family-wise level `alpha`.

    {"drifted", "drifted_features", "drift_share" (share of tests that failed), "pvalue" (the smallest adjusted
     p-value), "tests": {name: {"statistic", "p", "p_adj", "drifted"}}, "n_reference", "n_live"} (distinct requests)
    """
    raw = embedding_tests(reference.emb, live.emb, permutations, seed)
    for name in TESTS[2:]:
        raw[name] = ks_test(getattr(reference, name), getattr(live, name))
    adjusted = holm({name: p for name, (_, p) in raw.items()})
    tests = {name: {"statistic": round(stat, 6), "p": round(p, 6), "p_adj": round(adjusted[name], 6),
                    "drifted": adjusted[name] <= alpha} for name, (stat, p) in raw.items()}
    drifted = [name for name in TESTS if tests[name]["drifted"]]
    return {"drifted": bool(drifted), "drifted_features": drifted, "drift_share": len(drifted) / len(TESTS),
            "pvalue": round(min(adjusted.values()), 6), "tests": tests, "n_reference": len(reference),
            "n_live": len(live)}
