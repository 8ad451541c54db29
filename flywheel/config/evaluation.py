"""`EvaluateConfig` (`flywheel evaluate`: the scores, the gate, selective serving's certificate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flywheel.config.core import ConfigError, check_ids, default_student_path


@dataclass(frozen=True)
class EvaluateConfig:
    """`flywheel evaluate`: score the candidate against the teacher, the base student (plain and with in-context
    examples from train) and production on the test split, with bootstrap intervals, latency and cost; the gate."""

    agent: str = ""
    home: str = ""
    dataset_version: str = "latest"
    base_model: str = field(default_factory=default_student_path)
    adapter_version: str = "latest"  # a registry version, or "latest" candidate
    max_new_tokens: int = 128
    batch_size: int = 8
    max_examples: int = 0  # 0: the whole test split
    max_history: int = 10
    # the gate (flywheel/evaluate/gate.py)
    min_share_of_teacher: float = 0.9  # candidate's lower 95% bound >= share * teacher metric
    max_regression: float = 0.0  # candidate point >= production's lower 95% bound - this
    min_examples: int = 10  # the gate fails closed below this many scored examples
    promote: bool = False  # promote when the gate passes
    # confidence intervals: percentile bootstrap over test examples
    n_boot: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    # the in-context baseline: base student + k nearest train examples (0: skip it)
    in_context_k: int = 3
    constrained: bool = True  # score the candidate under each example's tool-call grammar, and gate that row
    metric: str = ""  # the gate's metric (a name in metrics.METRICS of the task); empty: metrics.PRIMARY's
    # selective serving (flywheel/evaluate/calibrate.py): a confidence threshold certified on the validation split
    selective: bool = True  # certify and gate on it (tool calls, classification); false: the teacher-share rule
    selective_target: float = 0.95  # T: served answers exactly right at least T of the time...
    selective_delta: float = 0.1  # ...with probability at least 1 - delta over the calibration data
    confidence_aggregate: str = "min"  # flywheel.inference.confidence.AGGREGATES
    max_calibration_examples: int = 0  # 0: the whole validation split
    embedding_model: str = ""  # a local sentence-transformers folder; empty: the bundled all-MiniLM-L6-v2
    max_prompt_tokens: int = 2048  # in-context prompts are trimmed to fit
    # cost per 1k requests (illustrative defaults: set your own prices)
    student_usd_per_core_hour: float = 0.05  # x measured CPU-seconds of the student's generation
    teacher_usd_per_m_input_tokens: float = 0.60
    teacher_usd_per_m_output_tokens: float = 0.60
    # optional LLM judge for free-text agents, through the teacher's OpenAI-compatible endpoint (empty url: off)
    judge_url: str = ""  # e.g. https://teacher.internal/v1
    judge_model: str = ""  # empty: the agent id (as Serve names the teacher's model)
    judge_api_key_env: str = "FLYWHEEL_TEACHER_API_KEY"
    judge_timeout_s: float = 60.0
    tracking_uri: str = ""  # MLflow; empty: $MLFLOW_TRACKING_URI, else file://<home>/mlruns; "off": no tracking

    def __post_init__(self):
        if not self.agent:
            raise ConfigError("agent: name the agent to evaluate")
        check_ids(self, "agent", "dataset_version", "adapter_version")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.max_prompt_tokens < 1:
            raise ConfigError(f"batch_size, max_new_tokens, max_prompt_tokens: must be >= 1, got {self.batch_size}, "
                              f"{self.max_new_tokens}, {self.max_prompt_tokens}")
        for key in ("min_share_of_teacher", "max_regression"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.n_boot < 100:
            raise ConfigError(f"n_boot: at least 100 bootstrap resamples (1000 recommended), got {self.n_boot}")
        if not 0.5 <= self.ci_level < 1.0:
            raise ConfigError(f"ci_level: must be in [0.5, 1), got {self.ci_level}")
        for key in ("in_context_k", "max_examples", "min_examples", "student_usd_per_core_hour",
                    "teacher_usd_per_m_input_tokens", "teacher_usd_per_m_output_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.judge_timeout_s <= 0:
            raise ConfigError(f"judge_timeout_s: must be > 0, got {self.judge_timeout_s}")
        _check_selective(self)
        if self.judge_url and not self.judge_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge_url: an http(s) URL of an OpenAI-compatible API (.../v1), got {self.judge_url!r}")


def _check_selective(cfg: Any) -> None:
    """`ConfigError` naming the key for an EvaluateConfig metric or selective-serving value that cannot work."""
    from flywheel.inference.confidence import AGGREGATES
    from flywheel.metrics import METRICS

    known = sorted({m for names in METRICS.values() for m in names})
    if cfg.metric and cfg.metric not in known:
        raise ConfigError(f"metric: must be one of {', '.join(known)} (or empty), got {cfg.metric!r}")
    for key in ("selective_target", "selective_delta"):
        if not 0.0 < getattr(cfg, key) < 1.0:
            raise ConfigError(f"{key}: must be strictly between 0 and 1, got {getattr(cfg, key)}")
    if cfg.confidence_aggregate not in AGGREGATES:
        raise ConfigError(f"confidence_aggregate: must be one of {', '.join(AGGREGATES)}, "
                          f"got {cfg.confidence_aggregate!r}")
    if cfg.max_calibration_examples < 0:
        raise ConfigError(f"max_calibration_examples: must be >= 0, got {cfg.max_calibration_examples}")
