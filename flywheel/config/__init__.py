"""Typed job configs, loaded strictly.

One frozen dataclass per job; defaults live here; a YAML file under `jobs/` only overrides. Unknown keys and
values of the wrong type fail with a `ConfigError` that names the key. Every field is also a CLI flag
(`--dataset-version v3`), see `flywheel.cli`. Fields that name agents, tenants, versions and runs become parts of
paths, so each `__post_init__` checks them with `check_ids` (the rule of `flywheel.ids`; "" means the default).

Where each lives, in the order of the data path:

    core        ConfigError, check_ids, default_student_path, build, load
    data        IngestConfig, CurateConfig
    training    DistillConfig, SweepConfig
    evaluation  EvaluateConfig
    serving     ServeConfig, MonitorConfig
    demo        DemoConfig

Import them from here (`from flywheel.config import DistillConfig`).
"""

from flywheel.config.core import ConfigError, build, check_ids, default_student_path, load
from flywheel.config.data import CurateConfig, IngestConfig
from flywheel.config.demo import DemoConfig
from flywheel.config.evaluation import EvaluateConfig
from flywheel.config.serving import MonitorConfig, ServeConfig
from flywheel.config.training import DistillConfig, SweepConfig

__all__ = ["ConfigError", "CurateConfig", "DemoConfig", "DistillConfig", "EvaluateConfig", "IngestConfig",
           "MonitorConfig", "ServeConfig", "SweepConfig", "build", "check_ids", "default_student_path", "load"]
