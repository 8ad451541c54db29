"""`flywheel <verb>`: one CLI for every stage; the same functions back `jobs/*.py` for `ray job submit`.

    flywheel ingest flywheel/data/sgd/sgd_dev_flywheel_logs.jsonl
    flywheel curate --agents sgd_Flights
    flywheel distill --agent sgd_Flights --epochs 1
    flywheel sweep --agent sgd_Flights --num-samples 8
    flywheel evaluate --agent sgd_Flights --promote
    flywheel promote --agent sgd_Flights --version v1      flywheel rollback --agent sgd_Flights
    flywheel serve --port 8000                              flywheel monitor --agent sgd_Flights
    flywheel demo

Every config field is a flag (`--eval-fraction 0.25`); `--config FILE.yaml` loads a job file first (flags win);
`--json` prints one machine-readable JSON object. Errors print one line naming what is wrong and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any, Callable

from flywheel import config as C
from flywheel.serve.auth import KeysConfig, run_keys  # light: no Ray, no FastAPI


def _ray_init() -> None:
    import os

    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        ray.init(configure_logging=False, log_to_driver=False)


def run_ingest(cfg: C.IngestConfig) -> dict:
    from flywheel.capture.store import ingest_file
    from flywheel.storage import Store

    store = Store(cfg.home or None)
    files = [ingest_file(store, p, cfg.agent_id, cfg.tenant, cfg.known_agents, cfg.max_line_bytes)
             for p in cfg.paths]
    return {"home": store.uri, "files": files, "accepted": sum(f["accepted"] for f in files),
            "quarantined": sum(f["quarantined"] for f in files)}


def run_curate(cfg: C.CurateConfig) -> dict:
    from flywheel.curate.pipeline import curate

    _ray_init()
    return curate(cfg, progress=True)


def run_distill(cfg: C.DistillConfig) -> dict:
    from flywheel.distill.train import distill

    _ray_init()
    return distill(cfg)


def run_sweep(cfg: C.SweepConfig) -> dict:
    from flywheel.distill.sweep import sweep

    _ray_init()
    return sweep(cfg)


def run_evaluate(cfg: C.EvaluateConfig) -> dict:
    from flywheel.evaluate.run import evaluate

    return evaluate(cfg, progress=True)


@dataclasses.dataclass(frozen=True)
class PromoteConfig:
    """`flywheel promote`: point an agent's production alias at a registered version (compare-and-swap)."""

    agent: str = ""
    version: str = ""
    home: str = ""
    force: bool = False  # promote even if its recorded gate failed

    def __post_init__(self):
        C.check_ids(self, "agent", "version")


@dataclasses.dataclass(frozen=True)
class RollbackConfig:
    """`flywheel rollback`: restore the agent's previous production version."""

    agent: str = ""
    home: str = ""

    def __post_init__(self):
        C.check_ids(self, "agent")


def run_promote(cfg: PromoteConfig) -> dict:
    from flywheel.registry.registry import Registry
    from flywheel.routing import STUDENT, set_route
    from flywheel.storage import Store

    store = Store(cfg.home or None)
    registry = Registry(store)
    entry = registry.get(cfg.agent, cfg.version)
    if not cfg.force and not (entry.get("scores") or {}).get("gate"):
        raise C.ConfigError(f"{cfg.agent} {entry['version']} has not passed the gate (run `flywheel evaluate "
                            f"--agent {cfg.agent} --adapter-version {entry['version']}`) ; --force overrides")
    current = registry.alias(cfg.agent)
    move = registry.promote(cfg.agent, entry["version"], expected=current["version"] if current else None,
                            reason="manual promote" + (" (forced)" if cfg.force else ""))
    set_route(store, cfg.agent, STUDENT, f"promoted {entry['version']}")
    return move


def run_rollback(cfg: RollbackConfig) -> dict:
    from flywheel.registry.registry import Registry
    from flywheel.routing import STUDENT, TEACHER, set_route
    from flywheel.storage import Store

    store = Store(cfg.home or None)
    move = Registry(store).rollback(cfg.agent)
    set_route(store, cfg.agent, STUDENT if move["to"] else TEACHER, f"rollback to {move['to']}")
    return move


def run_serve(cfg: C.ServeConfig) -> dict:
    import time

    from flywheel.serve.app import run

    _ray_init()
    url = run(cfg)
    print(f"Flywheel is serving OpenAI-compatible endpoints at {url}, auth: {cfg.auth} (Ctrl-C stops)",
          file=sys.stderr)
    if cfg.blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            from flywheel.serve.app import shutdown

            shutdown()
    return {"url": url}


def run_monitor(cfg: C.MonitorConfig) -> dict:
    from flywheel.monitor.drift import check_drift

    return check_drift(cfg)


def run_demo(cfg: C.DemoConfig) -> dict:
    from flywheel.demo import demo

    return demo(cfg)


VERBS: dict[str, tuple[type, Callable[[Any], dict]]] = {
    "ingest": (C.IngestConfig, run_ingest),
    "curate": (C.CurateConfig, run_curate),
    "distill": (C.DistillConfig, run_distill),
    "sweep": (C.SweepConfig, run_sweep),
    "evaluate": (C.EvaluateConfig, run_evaluate),
    "promote": (PromoteConfig, run_promote),
    "rollback": (RollbackConfig, run_rollback),
    "serve": (C.ServeConfig, run_serve),
    "monitor": (C.MonitorConfig, run_monitor),
    "demo": (C.DemoConfig, run_demo),
    "keys": (KeysConfig, run_keys),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flywheel", description="A Ray-native data flywheel for LLM agents.")
    sub = p.add_subparsers(dest="verb", required=True)
    for verb, (cls, _) in VERBS.items():
        sp = sub.add_parser(verb, help=(cls.__doc__ or "").strip().splitlines()[0], description=cls.__doc__)
        sp.add_argument("--config", help="a YAML job file (jobs/*.yaml); flags override it")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if verb == "ingest" and f.name == "paths":
                sp.add_argument("paths", nargs="*", help="JSONL files to ingest")
                continue
            if verb == "keys" and f.name == "action":
                sp.add_argument("action", nargs="?", metavar="{create,revoke,list}", help="default: list")
                continue
            kind = hints[f.name]
            text = "comma-separated list" if typing.get_origin(kind) is tuple else getattr(kind, "__name__", "value")
            sp.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=text.upper())
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cls, fn = VERBS[args.verb]
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v not in (None, [])}
    try:
        cfg = C.load(cls, args.config, **overrides)
        result = fn(cfg)
    except (C.ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if args.json:
            print(json.dumps({"error": str(msg), "type": type(e).__name__}))
        else:
            print(f"flywheel {args.verb}: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # registry conflicts and friends: still one line, not a traceback
        from flywheel.registry.registry import RegistryError

        if not isinstance(e, RegistryError):
            raise
        print(json.dumps({"error": str(e)}) if args.json else f"flywheel {args.verb}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str, indent=None))
    elif args.verb != "demo":  # the demo has printed its own tables
        print(json.dumps(result, default=str, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
