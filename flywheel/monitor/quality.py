"""Answer quality of a window of live traffic: reported beside input drift, never counted as drift. Pure.

    from flywheel.monitor.quality import summary
    summary(window_rows, cfg)   # rows: `features.live_features` of the newest live records

What users ask (input drift) and how well they are answered are different findings with different remedies: a
weak student after a good request mix is a training or gate problem, not a reason to call the traffic shifted.
Rates are over every answered request in the window (repeats included: each answer counts):

    invalid_rate            answers that are unusable (unknown tool, arguments not an object or against the
                            schema, empty, refusal); also per backend (`student_invalid_rate`)
    fallback_rate           student answers that fell back to the teacher (`extra_json` {"fallback": ...})
    negative_feedback_rate  feedback < 0 among records with feedback
    teacher_agreement       on shadow samples (records holding both backends' answers): share with the same
                            functions, and exactly the same calls; "no shadow samples" when there are none

A rate past its limit in the config is a flag; feedback and agreement need `MIN_SAMPLES` records to flag.

One quality signal does count as drift: `deferral_shift`. A selective agent's certificate says what share of its
traffic the student kept on validation (its coverage); when the window's selectively routed requests are deferred
to the teacher significantly more often than that (a one-sided exact binomial test at `alpha`), the traffic no
longer looks like the calibration data, which is what the certificate assumed: the check reports drift.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

MIN_SAMPLES = 10
DEFERRAL_RATE = "deferral_rate"  # the name a deferral shift gets among the drifted features
NO_SHADOW = "no shadow samples"


def _rate(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def summary(rows: Sequence[dict[str, Any]], cfg) -> dict:
    """Quality signals of the window's rows and the flags they raise against `cfg` (a `MonitorConfig`)."""
    backends = Counter(r.get("backend") or "other" for r in rows)
    student = [r for r in rows if r.get("backend") == "student"]
    feedback = [r["feedback"] for r in rows if r.get("feedback") is not None]
    shadows = [r["shadow"] for r in rows if r.get("shadow")]
    out: dict[str, Any] = {
        "n": len(rows), "backends": dict(sorted(backends.items())),
        "invalid_rate": _rate([bool(r.get("invalid")) for r in rows]),
        "student_invalid_rate": _rate([bool(r.get("invalid")) for r in student]),
        "invalid_reasons": dict(Counter(r["invalid"] for r in rows if r.get("invalid")).most_common()),
        "fallback_rate": _rate([bool(r.get("fallback")) for r in rows]),
        "n_feedback": len(feedback), "negative_feedback_rate": _rate([f < 0 for f in feedback]),
        "teacher_agreement": ({"n": len(shadows), "function": _rate([s["function"] for s in shadows]),
                               "exact": _rate([s["exact"] for s in shadows])} if shadows else NO_SHADOW),
    }
    flags = []
    if out["invalid_rate"] is not None and out["invalid_rate"] > cfg.max_invalid_rate:
        flags.append(f"invalid answers {out['invalid_rate']:.0%} > {cfg.max_invalid_rate:.0%} "
                     f"({', '.join(f'{k}: {v}' for k, v in out['invalid_reasons'].items())})")
    if out["fallback_rate"] is not None and out["fallback_rate"] > cfg.max_fallback_rate:
        flags.append(f"fallbacks to the teacher {out['fallback_rate']:.0%} > {cfg.max_fallback_rate:.0%}")
    if len(feedback) >= MIN_SAMPLES and out["negative_feedback_rate"] > cfg.max_negative_feedback_rate:
        flags.append(f"negative feedback {out['negative_feedback_rate']:.0%} > {cfg.max_negative_feedback_rate:.0%}"
                     f" of {len(feedback)}")
    if len(shadows) >= MIN_SAMPLES and out["teacher_agreement"]["function"] < cfg.min_teacher_agreement:
        flags.append(f"teacher agreement {out['teacher_agreement']['function']:.0%} < "
                     f"{cfg.min_teacher_agreement:.0%} on {len(shadows)} shadow samples")
    out["flags"], out["degraded"] = flags, bool(flags)
    return out


def deferral_shift(rows: Sequence[dict[str, Any]], coverage: float | None, alpha: float) -> dict:
    """Whether the window's selective requests are deferred more often than the certificate's coverage allows:
    {"n", "deferred", "expected_rate", "pvalue", "shifted"} (never shifted without a coverage or MIN_SAMPLES)."""
    from flywheel.metrics import binom_cdf

    selective = [r for r in rows if r.get("selective")]
    deferred = sum(bool(r.get("fallback")) for r in selective)
    if coverage is None or len(selective) < MIN_SAMPLES:
        return {"n": len(selective), "deferred": deferred, "expected_rate": None, "pvalue": None, "shifted": False}
    expected = min(1.0, max(0.0, 1.0 - coverage))
    pvalue = 1.0 - binom_cdf(deferred - 1, len(selective), expected)  # P(at least this many deferred)
    return {"n": len(selective), "deferred": deferred, "expected_rate": round(expected, 4),
            "pvalue": pvalue, "shifted": pvalue < alpha}
