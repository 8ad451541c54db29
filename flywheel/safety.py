"""Content checks two stages share: toxic text (curation sets such records aside; Serve defers a student answer
that trips it) and prompt injection (Serve flags the record of a request that carries one).

    safety.toxicity(["some text"])             -> {"some text": 0.03}   (alt-profanity-check, 0..1)
    safety.injection_check("heuristic")("Ignore all previous instructions and ...")   -> 1.0
    safety.injection_check("mypackage.guards:score")                                   -> your function

An injection check is a function `text -> score in [0, 1]`; a score at or above the threshold flags the text.
`heuristic` (the default) is the pattern scorer below: it scores what a prompt asks the model to do to its own
instructions (ignore, reveal, override them; act unrestricted) rather than what the prompt is about, so a booking
request that mentions "rules" or "instructions" stays clean. It is a flag for review, never a block: measured
by `bench/injection.py` on public jailbreak and injection sets (README, "Guardrails"). Any importable
`module:function` with the same signature replaces it (a classifier model behind it is the caller's choice).
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Callable, Iterable

InjectionCheck = Callable[[str], float]

# One hit of any of these flags a text: each names an attack on the model's instructions, not a topic.
STRONG = [re.compile(p, re.I) for p in (
    r"\b(ignore|disregard|forget|override|bypass|skip|overlook)\b.{0,40}\b(previous|prior|above|earlier|"
    r"preceding|original|initial|system|all|your|any)\b.{0,20}\b(instructions?|instructed|prompts?|rules|"
    r"directions|guidelines|directives|programming|context|told)\b",
    r"\b(ignore|disregard|forget)\b (the|everything|all)( of)? (above|before|that)\b",
    r"\b(reveal|print|show|repeat|output|leak|tell me|disclose|display|confirm|share|give me)\b.{0,30}"
    r"\b(your|the|our)\b.{0,20}\b(system prompt|initial prompt|hidden prompt|instructions|secret( key| code)?|"
    r"password|passcode|prompt above)\b",
    r"\bdo anything now\b|\bjailbr(eak|oken)\b|\b(developer|maintenance|god|admin|debug|system) mode\b",
    r"\b(no|without( any)?|free (of|from)|not (bound|restricted|limited) by)\b.{0,30}\b(ethic(al|s)|moral(s|ity)?|"
    r"filters?|censor(ship|ed)?|content polic(y|ies)|safeguards)\b",
    r"\byou (have|has|with) no (restrictions|limitations|limits|rules|boundaries)\b",
    r"\b(unfiltered|uncensored|unrestricted|amoral|unethical)\b.{0,40}\b(ai|assistant|chatbot|model|mode|"
    r"character|version|response)\b",
    r"\b(openai|anthropic|content)('s)? (polic(y|ies)|rules|guidelines)\b",
    r"\bnew (instructions|rules|task)\s*:|\bend of (the )?(system|previous) (prompt|instructions)\b",
    r"\b(you are|you're) (now|no longer)\b.{0,40}\b(free|bound|restricted|an? (ai|assistant|model))\b",
    r"\b(decode|encode|translate)\b.{0,40}\b(base64|rot13|morse|hex(adecimal)?|cipher)\b",
)] + [re.compile(r"\bDAN\b")]  # the "Do Anything Now" persona: upper case only (Dan is a name)
# Each of these is innocent alone; two together flag a text.
WEAK = [re.compile(p, re.I) for p in (
    r"\bfrom now on\b", r"\bstay in character\b", r"\b(pretend|imagine) (to be|you are|that you)\b",
    r"\bhypothetical(ly)?\b", r"\bnever refuse\b|\bcannot refuse\b|\bmust (always )?(answer|comply|obey)\b",
    r"\b(chatgpt|gpt-?4|language model|large language model|llm)\b", r"\b(two|2) (different )?(responses|answers)\b",
    r"\b(act|behave|respond|answer) as\b", r"\bsimulat(e|ion)\b", r"\bbreak (character|the rules)\b",
    r"\b(illegal|harmful|offensive|explicit)\b", r"\bevil\b|\bdark side\b|\bopposite\b",
)]
INJECTION_THRESHOLD = 0.5


def heuristic_injection(text: str) -> float:
    """1.0 on a strong pattern, else 0.25 per weak pattern (capped at 1): two weak ones reach the threshold."""
    if not text:
        return 0.0
    if any(p.search(text) for p in STRONG):
        return 1.0
    return min(1.0, 0.25 * sum(bool(p.search(text)) for p in WEAK))


def _off(text: str) -> float:
    return 0.0


@functools.lru_cache(maxsize=8)
def injection_check(spec: str) -> InjectionCheck:
    """`heuristic`, `off`, or `module:function` -> the check. Raises ValueError naming a spec that cannot load."""
    if spec == "heuristic":
        return heuristic_injection
    if spec == "off":
        return _off
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"injection_check {spec!r}: use 'heuristic', 'off' or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"injection_check {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"injection_check {spec!r} is not a function")
    return fn


# --- toxicity ----------------------------------------------------------------------------------------------
def toxicity(texts: Iterable[str]) -> dict[str, float]:
    """alt-profanity-check probability (0..1) for each distinct text, scored in one call."""
    distinct = sorted({t for t in texts if t and t.strip()})
    if not distinct:
        return {}
    try:
        from profanity_check import predict_prob
    except ImportError as e:
        raise RuntimeError(f"the toxicity filter needs alt-profanity-check ({e}): `pip install -e .`, or set "
                           f"its threshold to 1.0 to turn it off") from None
    return dict(zip(distinct, (float(p) for p in predict_prob(distinct))))
