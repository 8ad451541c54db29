"""Safety and quality checks for curation: toxic content and length bounds (a tool call that breaks its schema is
`flywheel.checks.schema_violation`, shared with monitoring and review).

    flywheel curate --agents sgd_Flights --toxicity-threshold 0.9 --max-prompt-chars 32000

Pure functions (no Ray), applied by `flywheel.curate.filters.clean_batch`. Reason codes (stable):

    toxic                  alt-profanity-check gives a user turn or the answer text a probability above
                           `toxicity_threshold` (scored once per batch, over its distinct texts)
    too_long, too_short    the request or the answer is outside the configured character bounds
"""

from __future__ import annotations

from flywheel import safety

R_TOXIC = "toxic"
R_TOO_LONG = "too_long"
R_TOO_SHORT = "too_short"


# --- toxicity (the scorer is `flywheel.safety.toxicity`, shared with Serve's output check) -----------------
toxicity = safety.toxicity


def scored_texts(messages: list[dict], answer: dict | None) -> list[tuple[str, str]]:
    """(where, text) pairs the toxicity filter scores: every user turn and the answer's text."""
    out = [(f"user turn {i + 1}", m["content"]) for i, m in enumerate(m for m in messages if m.get("role") == "user")
           if m.get("content")]
    if answer and answer.get("content"):
        out.append(("answer", answer["content"]))
    return out


def toxic_detail(pairs: list[tuple[str, str]], scores: dict[str, float], threshold: float) -> str | None:
    """The detail for a `toxic` record (the worst text and its probability), or None when all are below."""
    worst = max(pairs, key=lambda p: scores.get(p[1], 0.0), default=None)
    if worst is None or scores.get(worst[1], 0.0) <= threshold:
        return None
    return f"profanity p={scores[worst[1]]:.2f} > toxicity_threshold={threshold} in {worst[0]}: {worst[1][:80]!r}"


# --- length bounds -----------------------------------------------------------------------------------------
def chars(m: dict | None) -> int:
    """Characters of one message: its text and its tool-call arguments."""
    if not m:
        return 0
    return len(m.get("content") or "") + sum(len(tc.get("arguments") or "") for tc in m.get("tool_calls") or [])


def length_violation(messages: list[dict], answer: dict | None, max_prompt_chars: int, max_answer_chars: int,
                     min_answer_chars: int) -> tuple[str, str] | None:
    """(reason, detail) when the request or the answer is outside the character bounds (0 turns a bound off)."""
    prompt, got = sum(chars(m) for m in messages), chars(answer)
    if max_prompt_chars and prompt > max_prompt_chars:
        return R_TOO_LONG, f"the request has {prompt} characters > max_prompt_chars={max_prompt_chars}"
    if max_answer_chars and got > max_answer_chars:
        return R_TOO_LONG, f"the answer has {got} characters > max_answer_chars={max_answer_chars}"
    if answer and not answer.get("tool_calls") and got < min_answer_chars:
        return R_TOO_SHORT, f"the answer has {got} characters < min_answer_chars={min_answer_chars}"
    return None
