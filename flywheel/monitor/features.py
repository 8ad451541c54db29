"""Per-request drift features: pure functions over `MESSAGE` rows, no Evidently, no Ray.

    flywheel monitor --agent sgd_Flights      # drift.py turns these columns into an Evidently report

The training reference (`schema.EXAMPLE` rows) and live traffic (`schema.LOG_RECORD` rows) share the `messages`
column, so one function featurises both. The answer (`target` for examples, `response` for live records) gives
the tool/label mix. Features:

    text          the last user message (an Evidently text column: a domain classifier tells the two apart)
    chars, words  its length
    n_messages    messages in the request (how deep into a conversation)
    n_tools       tools the request declares
    oov_share     share of its words missing from the reference vocabulary (cross-fitted, see `oov_shares`)
    answer        the answer's tool name(s), or "text" for a plain answer
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Sequence

import pandas as pd

TEXT_COLUMNS = ["text"]
NUMERICAL_COLUMNS = ["chars", "words", "n_messages", "n_tools", "oov_share"]
CATEGORICAL_COLUMNS = ["answer"]
COLUMNS = TEXT_COLUMNS + NUMERICAL_COLUMNS + CATEGORICAL_COLUMNS

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes)."""
    return _WORD.findall((text or "").lower())


def last_user_text(messages: Sequence[dict[str, Any]] | None) -> str:
    """The content of the last user message, PII-redacted as curation redacts the reference ("" when none)."""
    from flywheel.curate.filters import Redactor

    for m in reversed(list(messages or [])):
        if m.get("role") == "user":
            return Redactor()(m.get("content") or "") or ""
    return ""


def n_tools(tools_json: str | None) -> int:
    """How many tools a request declares (`tools_json` is a JSON list; bad JSON counts as none)."""
    try:
        tools = json.loads(tools_json or "[]")
    except json.JSONDecodeError:
        return 0
    return len(tools) if isinstance(tools, list) else 0


def answer_label(answer: dict[str, Any] | None) -> str:
    """The tool name(s) an answer calls, comma-joined and sorted; "text" for a plain answer, "none" without one."""
    if not answer:
        return "none"
    names = sorted(tc.get("name") or "" for tc in answer.get("tool_calls") or [])
    return ",".join(names) if names else "text"


def request_features(messages: Sequence[dict[str, Any]] | None, tools_json: str | None = "[]",
                     answer: dict[str, Any] | None = None) -> dict[str, Any]:
    """All features of one request except `oov_share`, which needs the reference vocabulary."""
    text = last_user_text(messages)
    return {"text": text, "chars": len(text), "words": len(words(text)),
            "n_messages": len(list(messages or [])), "n_tools": n_tools(tools_json),
            "answer": answer_label(answer)}


def vocabulary(texts: Iterable[str]) -> set[str]:
    return {w for t in texts for w in words(t)}


def oov_share(text: str, vocab: set[str]) -> float:
    """Share of the words of `text` not in `vocab` (0.0 for a text without words)."""
    toks = words(text)
    return sum(w not in vocab for w in toks) / len(toks) if toks else 0.0


def oov_shares(reference_texts: Sequence[str], live_texts: Sequence[str]) -> tuple[list[float], list[float]]:
    """Cross-fitted OOV shares, so reference and live rows are measured the same way.

    A reference row scored against a vocabulary that contains it would always be 0. So the reference is split
    in two folds by position; every row (reference row i, live row j) is scored against the vocabulary of the
    fold it is *not* assigned to (i % 2, j % 2). Without drift both sides then have the same distribution.
    """
    folds = [vocabulary(reference_texts[k::2]) for k in (0, 1)]
    ref = [oov_share(t, folds[1 - i % 2]) for i, t in enumerate(reference_texts)]
    live = [oov_share(t, folds[1 - j % 2]) for j, t in enumerate(live_texts)]
    return ref, live


def frame(rows: Sequence[dict[str, Any]], answer_key: str) -> pd.DataFrame:
    """Feature rows (without `oov_share`) of EXAMPLE rows (answer_key="target") or LOG_RECORD rows ("response")."""
    feats = [request_features(r.get("messages"), r.get("tools_json"), r.get(answer_key)) for r in rows]
    return pd.DataFrame(feats, columns=[c for c in COLUMNS if c != "oov_share"])


def feature_frames(reference_rows: Sequence[dict[str, Any]],
                   live_rows: Sequence[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference, live) feature frames with every column of `COLUMNS`, in that order."""
    ref, live = frame(reference_rows, "target"), frame(live_rows, "response")
    ref["oov_share"], live["oov_share"] = oov_shares(ref["text"].tolist(), live["text"].tolist())
    return ref[COLUMNS], live[COLUMNS]
