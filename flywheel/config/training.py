"""The configs of training: `DistillConfig` (`flywheel distill`, a Ray Train run) and `SweepConfig`
(`flywheel sweep`, Ray Tune over the adapter's settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.config.core import ConfigError, check_ids, default_student_path
from flywheel.ids import InvalidId, check_id


@dataclass(frozen=True)
class DistillConfig:
    """`flywheel distill`: LoRA on the student base, trained on the teacher's answers with Ray Train."""

    agent: str = ""
    home: str = ""
    dataset_version: str = "latest"
    base_model: str = field(default_factory=default_student_path)
    run_name: str = ""  # default: <agent>-<dataset_version>; the same name resumes
    num_workers: int = 2  # 0: in this process (Ray Train's local mode: no Ray, no restarts; tests, debugging)
    epochs: float = 1.0
    max_steps: int = 0  # >0 caps optimizer steps (demo, tests)
    batch_size: int = 4  # per worker
    learning_rate: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    max_length: int = 768  # tokens of prompt + answer; older history turns are dropped to fit (see README)
    max_history: int = 10
    share_prefix: bool = True  # rows of a batch that begin alike (the tools block) are computed once (distill.data)
    tool_format: str = "signatures"  # tools in the prompt: signatures | json (Serve renders signatures)
    argument_weight: float = 1.0  # >1: a tool call's argument tokens weigh this much more in the training loss
    value_swaps: int = 0  # >0: this many copies of each training example with its stated values swapped (distill.data)
    bf16: bool = True  # bf16 autocast where the hardware computes bf16 natively (flywheel.hardware); fp32 elsewhere
    checkpoint_every: int = 0  # steps; 0: once per epoch and at the end
    seed: int = 0
    threads_per_worker: int = 1
    memory_per_worker_mb: int = 0  # Ray memory reserved per training worker (the scheduler keeps it free); 0: none
    use_gpu: bool = False
    strategy: str = "ddp"  # ddp | deepspeed (ZeRO, stage below; gloo on CPU, NCCL on GPU)
    zero_stage: int = 2
    grad_accum: int = 1  # micro-batches per optimizer step
    teacher_model: str = ""  # a local HF model sharing the student's tokenizer: adds token-level distillation
    kd_weight: float = 0.5  # loss = (1 - w) * CE(teacher's answer) + w * T^2 * KL(teacher || student)
    kd_temperature: float = 2.0
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    # give up when the workers cannot all be placed for this long (PlacementError, naming what is free and what
    # holds the rest); 0: wait as long as it takes, as on a cluster whose autoscaler adds nodes
    placement_timeout_s: float = 900.0
    inject_failure_at_step: int = 0  # fault drill: the last worker exits once when it reaches this step
    tracking_uri: str = ""  # MLflow; empty: $MLFLOW_TRACKING_URI, else file://<home>/mlruns; "off": no tracking
    # what to train on, and from where
    datasets: tuple[str, ...] = ()  # several agents' train splits ("agent" or "agent@version"); empty: agent's own
    max_examples: int = 0  # >0: at most this many training examples, shared equally by the datasets
    init_adapter: str = ""  # a PEFT adapter folder or a registry entry "agent@version" to start from (same r, modules)
    # early stopping on the validation split's loss (the registered adapter is the one with the lowest)
    validation_every: int = 0  # optimizer steps between validation-loss checks; 0: off
    early_stopping_patience: int = 0  # stop after this many checks without a lower loss; 0: never stop early
    validation_max_examples: int = 128  # the validation loss reads at most this many (0: all), shared by workers

    def __post_init__(self):
        if not self.agent:
            raise ConfigError("agent: name the agent to distill (e.g. --agent sgd_Flights)")
        check_ids(self, "agent", "dataset_version", "run_name")
        for entry in self.datasets:
            agent, _, version = entry.partition("@")
            try:
                check_id("agent id", agent)
                check_id("dataset version", version or "latest")
            except InvalidId as e:
                raise ConfigError(f"datasets: {entry!r}: {e}; give 'agent' or 'agent@version'") from None
        for key in ("max_examples", "validation_every", "early_stopping_patience"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not 1 <= self.argument_weight <= 100:
            raise ConfigError(f"argument_weight: must be between 1 (plain cross-entropy) and 100, got "
                              f"{self.argument_weight}")
        if not 0 <= self.value_swaps <= 10:
            raise ConfigError(f"value_swaps: must be between 0 (off) and 10 copies per example, got {self.value_swaps}")
        from flywheel.prompts import TOOL_FORMATS

        if self.tool_format not in TOOL_FORMATS:
            raise ConfigError(f"tool_format: must be one of {', '.join(TOOL_FORMATS)}, got {self.tool_format!r}")
        if self.early_stopping_patience and not self.validation_every:
            raise ConfigError("early_stopping_patience: needs validation_every > 0 (how often the validation loss "
                              "is checked)")
        if self.strategy not in ("ddp", "deepspeed"):
            raise ConfigError(f"strategy: 'ddp' or 'deepspeed', got {self.strategy!r}")
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"zero_stage: 1, 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if not 0.0 <= self.kd_weight <= 1.0 or self.kd_temperature <= 0:
            raise ConfigError(f"kd_weight must be in [0, 1] and kd_temperature > 0, got {self.kd_weight}, "
                              f"{self.kd_temperature}")
        if self.num_workers < 0 or (self.num_workers == 0 and self.strategy == "deepspeed"):
            raise ConfigError(f"num_workers: must be >= 1 (0, in this process, only with strategy ddp), got "
                              f"{self.num_workers}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("epochs or max_steps must be > 0")
        if self.memory_per_worker_mb < 0:
            raise ConfigError(f"memory_per_worker_mb: must be >= 0, got {self.memory_per_worker_mb}")
        if not 0 <= self.placement_timeout_s <= 7 * 86400:
            raise ConfigError(f"placement_timeout_s: must be between 0 (wait as long as it takes) and a week, got "
                              f"{self.placement_timeout_s}")


@dataclass(frozen=True)
class SweepConfig:
    """`flywheel sweep`: Ray Tune (ASHA) over LoRA rank/alpha/dropout, learning rate, target modules and epochs.

    Each trial is a Ray Train run (`flywheel distill`'s loop); each of its checkpoints is scored on the agent's
    validation split and the score is what Tune compares (the test split is left to `flywheel evaluate`). The best
    trial's adapter is registered as a new version (a candidate: `flywheel evaluate` gates and promotes it). The
    same `name` resumes an interrupted sweep.
    """

    agent: str = ""
    home: str = ""
    dataset_version: str = "latest"
    base_model: str = field(default_factory=default_student_path)
    name: str = ""  # default: <agent>-<dataset_version>; the same name resumes (or returns the finished sweep)
    # the search space: lists of choices, drawn at random (search=random) or crossed (search=grid)
    learning_rate: tuple[float, ...] = (2e-4, 5e-4, 1e-3, 2e-3)
    lora_r: tuple[int, ...] = (8, 16, 32)
    lora_alpha: tuple[int, ...] = (16, 32)
    lora_dropout: tuple[float, ...] = (0.0, 0.05)  # 0.05 costs ~45% step time on CPU
    target_modules: tuple[str, ...] = ("q_proj+v_proj", "all")  # "+"-joined module names, or "attention" / "all"
    epochs: tuple[float, ...] = (1.0, 2.0, 3.0)  # ignored when max_steps > 0
    search: str = "random"  # random: num_samples draws; grid: every combination, num_samples times over
    num_samples: int = 8
    seed: int = 0  # the random search's draws and each trial's training seed
    # the objective and early stopping
    metric: str = ""  # a metric of the agent's task (default: its primary one, name_args_accuracy...) or eval_loss
    scheduler: str = "asha"  # asha (early stopping) | fifo (every trial runs to the end)
    grace_period: int = 1  # evaluations every trial gets before ASHA may stop it
    reduction_factor: int = 2  # at each ASHA rung only the best 1/reduction_factor go on
    # each trial's training (other DistillConfig fields keep their defaults)
    num_workers: int = 1
    threads_per_worker: int = 1
    memory_per_worker_mb: int = 0  # Ray memory reserved per training worker of a trial; 0: none
    batch_size: int = 4
    max_steps: int = 0  # >0 caps every trial's optimizer steps (tests, smoke runs)
    max_length: int = 768
    max_history: int = 10
    bf16: bool = True  # bf16 autocast where the hardware computes bf16 natively (flywheel.hardware); fp32 elsewhere
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end of every epoch
    # each evaluation: generation on the validation split (as `flywheel evaluate` prompts) + the teacher answers' loss
    eval_examples: int = 0  # 0: the whole validation split
    max_new_tokens: int = 128
    eval_batch_size: int = 8
    # placement, registration, tracking
    trial_cpus: float = 1.0  # reserved per trial for its Train controller and evaluations (workers reserve their own)
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs fit (trial_cpus + the trial's workers each)
    register: bool = True  # register the best trial's adapter as a new (not promoted) version
    tracking_uri: str = ""  # MLflow; empty: $MLFLOW_TRACKING_URI, else file://<home>/mlruns; "off": no tracking

    def __post_init__(self):
        if not self.agent:
            raise ConfigError("agent: name the agent to sweep (e.g. --agent sgd_Flights)")
        check_ids(self, "agent", "dataset_version", "name")
        for key in ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "epochs"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: give at least one value to search over")
        if any(v <= 0 for v in self.learning_rate) or any(v <= 0 for v in self.epochs):
            raise ConfigError(f"learning_rate, epochs: values must be > 0, got {self.learning_rate}, {self.epochs}")
        if any(v < 1 for v in self.lora_r + self.lora_alpha):
            raise ConfigError(f"lora_r, lora_alpha: values must be >= 1, got {self.lora_r}, {self.lora_alpha}")
        if any(not 0.0 <= v < 1.0 for v in self.lora_dropout):
            raise ConfigError(f"lora_dropout: values must be in [0, 1), got {self.lora_dropout}")
        if any(not m or any(not part for part in m.split("+")) for m in self.target_modules):
            raise ConfigError(f"target_modules: each choice is '+'-joined module names (q_proj+v_proj) or "
                              f"'attention' / 'all', got {self.target_modules}")
        if self.search not in ("random", "grid"):
            raise ConfigError(f"search: 'random' or 'grid', got {self.search!r}")
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"scheduler: 'asha' or 'fifo', got {self.scheduler!r}")
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError(f"num_samples and grace_period must be >= 1 and reduction_factor >= 2, got "
                              f"{self.num_samples}, {self.grace_period}, {self.reduction_factor}")
        if self.num_workers < 1 or self.threads_per_worker < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("num_workers, threads_per_worker, batch_size, eval_batch_size: must be >= 1")
        for key in ("max_steps", "eval_every", "eval_examples", "max_concurrent_trials", "trial_cpus",
                    "memory_per_worker_mb"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
