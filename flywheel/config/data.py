"""The configs of the data stages: `IngestConfig` (`flywheel ingest`) and `CurateConfig` (`flywheel curate`)."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.config.core import ConfigError, _deprecated_alias, check_ids


@dataclass(frozen=True)
class IngestConfig:
    """`flywheel ingest`: read external logs (OpenAI JSONL or NVIDIA blueprint records) into the log store.
    `paths`: JSONL log files, local paths or s3:// URIs, plain or gzip (told by its first bytes)."""

    paths: tuple[str, ...] = ()
    home: str = ""  # FLYWHEEL_HOME when empty
    tenant: str = "default"
    agent_id: str = ""  # force an agent id when the source has none (OpenAI JSONL)
    # validation
    known_agents: tuple[str, ...] = ()  # an allowlist: records of other agents are quarantined (unknown_agent)
    max_line_bytes: int = 1_000_000  # longer lines are quarantined (oversized_record)

    def __post_init__(self):
        check_ids(self, "tenant", "agent_id", "known_agents")
        if not self.paths:
            raise ConfigError("paths: give at least one log file to ingest")
        if self.max_line_bytes < 1:
            raise ConfigError(f"max_line_bytes: must be >= 1, got {self.max_line_bytes}")


@dataclass(frozen=True)
class CurateConfig:
    """`flywheel curate`: logs -> validated, redacted, deduplicated, split dataset versions per agent."""

    home: str = ""
    agents: tuple[str, ...] = ()  # empty: every agent in the logs
    # the split, by session and stratified by label: train / validation (selection) / test (the gate, the figures)
    validation_fraction: float = 0.1  # share held out for selection: sweeps, early stopping (0: no validation split)
    test_fraction: float = 0.2  # share held out for the gate and every reported figure
    min_held_out_per_label: int = 1  # at least this many of a label's rows in test (and validation), sessions allowing
    eval_fraction: float = 0.0  # deprecated name of test_fraction (0: not given)
    min_eval_per_label: int = -1  # deprecated name of min_held_out_per_label (-1: not given)
    min_examples: int = 4  # an agent with fewer kept examples gets no dataset version
    max_record_bytes: int = 256_000
    seed: int = 0
    batch_size: int = 256
    # quality filters
    pii_allow: tuple[str, ...] = ()  # not PII: "[agent:]ENTITY" (e.g. sgd_Music:PERSON) or "[agent:]arg" (user_id)
    presidio_agents: tuple[str, ...] = ()  # agents also scanned by Presidio NER ("*": all); empty: regex only
    presidio_entities: tuple[str, ...] = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS",
                                          "US_SSN", "IBAN_CODE")  # no LOCATION/DATE_TIME: cities are arguments
    presidio_min_score: float = 0.4
    toxicity_threshold: float = 0.9  # alt-profanity-check probability above which a record is `toxic`; 1: off
    max_prompt_chars: int = 32_000  # longer requests are `too_long` (0: no bound)
    max_answer_chars: int = 8_000  # longer answers are `too_long` (0: no bound)
    min_answer_chars: int = 1  # shorter text answers are `too_short` (raise it for free-text agents)
    near_dup_threshold: float = 0.9  # Jaccard of request word 3-shingles: later copies are `near_duplicate`; 0: off
    near_dup_num_perm: int = 64  # MinHash permutations (the signature is num_perm * 4 bytes per record)
    # shingles in at least this share of an agent's records (20 or more) are its prompt template, left out of the
    # near-duplicate comparison (templated classifiers: every request ~96% the same); 0: compare whole requests
    near_dup_template_share: float = 0.8
    min_label_count: int = 5  # labels with fewer kept examples are stratified together as "__rare__"
    max_examples_per_agent: int = 0  # >0: a deterministic, label-balanced cap (the rest is `over_agent_cap`)
    # scale and storage
    incremental: bool = True  # build on the previous version: read only the log parts it has not consumed
    write_batch_rows: int = 2048  # rows per batch streamed from the cleaned data into the version's files

    def __post_init__(self):
        check_ids(self, "agents")
        check_ids(self, "presidio_agents", allow=("*",))
        _deprecated_alias(self, "eval_fraction", "test_fraction", unset=0.0)
        _deprecated_alias(self, "min_eval_per_label", "min_held_out_per_label", unset=-1)
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 <= self.validation_fraction < 1.0 or \
                self.test_fraction + self.validation_fraction >= 1.0:
            raise ConfigError(f"test_fraction, validation_fraction: test in (0, 1), validation in [0, 1), together "
                              f"below 1 (train keeps the rest), got {self.test_fraction}, {self.validation_fraction}")
        if self.min_held_out_per_label < 0:
            raise ConfigError(f"min_held_out_per_label: must be >= 0, got {self.min_held_out_per_label}")
        if self.batch_size < 1 or self.write_batch_rows < 1:
            raise ConfigError(f"batch_size, write_batch_rows: must be >= 1, got {self.batch_size}, "
                              f"{self.write_batch_rows}")
        from flywheel import pii  # stdlib-only at import; Presidio itself loads only when used

        try:
            pii.parse_allow(self.pii_allow)
        except ValueError as e:
            raise ConfigError(f"pii_allow: {e}") from None
        try:
            pii.check_entities(self.presidio_entities)
        except ValueError as e:
            raise ConfigError(f"presidio_entities: {e}") from None
        for key in ("presidio_min_score", "toxicity_threshold", "near_dup_threshold", "near_dup_template_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}: must be in [0, 1], got {getattr(self, key)}")
        if not 16 <= self.near_dup_num_perm <= 1024:
            raise ConfigError(f"near_dup_num_perm: must be in [16, 1024], got {self.near_dup_num_perm}")
        for key in ("max_prompt_chars", "max_answer_chars", "min_answer_chars", "min_label_count",
                    "max_examples_per_agent"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
