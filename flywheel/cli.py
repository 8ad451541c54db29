"""`flywheel <verb>`: one CLI for every stage; the same functions back `jobs/*.py` for `ray job submit`.

    flywheel ingest flywheel/data/sgd/sgd_dev_flywheel_logs.jsonl
    flywheel curate --agents sgd_Flights
    flywheel distill --agent sgd_Flights --epochs 1
    flywheel sweep --agent sgd_Flights --num-samples 8
    flywheel evaluate --agent sgd_Flights --promote
    flywheel promote --agent sgd_Flights --version v1      flywheel rollback --agent sgd_Flights
    flywheel serve --port 8000                              flywheel monitor --agent sgd_Flights
    flywheel demo

Every config field is a flag (`--test-fraction 0.25`, true/false fields are switches: `--force`, `--no-incremental`);
its help (`flywheel curate --help`) is the field's comment in the config class, with its default. `--config
FILE.yaml` loads a job file first (flags win). stdout carries only the result: one JSON object with `--json`
(indented without it; the demo prints its tables); progress, Ray's and Tune's output go to stderr. Errors print one
line naming what is wrong and exit 2. Verbs that need Ray join the instance running here (`flywheel.raycluster`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import io
import json
import os
import sys
import tokenize
import typing
from typing import Any, Callable, Iterator

from flywheel import config as C
from flywheel.controller import ControllerConfig, run_controller
from flywheel.serve.auth import KeysConfig, run_keys  # light: no Ray, no FastAPI


def _ray_init(home: str, log_to_driver: bool = False) -> dict:
    """Join the Ray instance running here (or RAY_ADDRESS), else start one, and refuse a `home` that would split
    across its nodes. `log_to_driver`: show the workers' output here (distill's and sweep's step progress is
    written by the training workers)."""
    from flywheel.raycluster import check_home, connect_ray

    info = connect_ray(configure_logging=False, log_to_driver=log_to_driver)
    check_home(home)
    return info


def run_ingest(cfg: C.IngestConfig) -> dict:
    """Ingest each path in turn. A file that cannot be read to its end (`InputError`) stops the run; what was
    ingested up to there, its own lines before the fault included, travels in the error's `result`."""
    from flywheel.capture.store import InputError, ingest_file
    from flywheel.storage import Store

    store = Store(cfg.home or None)
    files: list[dict] = []
    for path in cfg.paths:
        try:
            files.append(ingest_file(store, path, cfg.agent_id, cfg.tenant, cfg.known_agents, cfg.max_line_bytes))
        except InputError as e:
            e.result = _ingested(store.uri, files + [e.result])
            raise
    return _ingested(store.uri, files)


def _ingested(home: str, files: list[dict]) -> dict:
    return {"home": home, "files": files, "accepted": sum(f["accepted"] for f in files),
            "quarantined": sum(f["quarantined"] for f in files)}


def run_curate(cfg: C.CurateConfig) -> dict:
    from flywheel.curate.pipeline import curate

    _ray_init(cfg.home)
    return curate(cfg, progress=True)


def run_distill(cfg: C.DistillConfig) -> dict:
    from flywheel.distill.train import distill

    _ray_init(cfg.home, log_to_driver=True)
    return distill(cfg)


def run_sweep(cfg: C.SweepConfig) -> dict:
    from flywheel.distill.sweep import sweep

    _ray_init(cfg.home, log_to_driver=True)
    return sweep(cfg)


def run_evaluate(cfg: C.EvaluateConfig) -> dict:
    from flywheel.evaluate.run import evaluate

    return evaluate(cfg, progress=True)


@dataclasses.dataclass(frozen=True)
class PromoteConfig:
    """`flywheel promote`: point an agent's production alias at a registered version (compare-and-swap)."""

    agent: str = ""  # the agent whose `production` alias moves
    version: str = ""  # a registered version (`flywheel evaluate` and `sweep` register them), or "latest"
    home: str = ""  # FLYWHEEL_HOME when empty
    force: bool = False  # promote even if its recorded gate failed

    def __post_init__(self):
        if not self.agent or not self.version:
            raise C.ConfigError("agent, version: name both (e.g. --agent sgd_Flights --version v3, or latest)")
        C.check_ids(self, "agent", "version")


@dataclasses.dataclass(frozen=True)
class RollbackConfig:
    """`flywheel rollback`: restore the agent's previous production version."""

    agent: str = ""  # the agent whose `production` alias goes back one version
    home: str = ""  # FLYWHEEL_HOME when empty

    def __post_init__(self):
        if not self.agent:
            raise C.ConfigError("agent: name the agent to roll back (e.g. --agent sgd_Flights)")
        C.check_ids(self, "agent")


def run_promote(cfg: PromoteConfig) -> dict:
    from flywheel.registry.registry import Registry
    from flywheel.routing import promoted_mode, set_route
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
    set_route(store, cfg.agent, promoted_mode(entry), f"promoted {entry['version']}")
    return move


def run_rollback(cfg: RollbackConfig) -> dict:
    from flywheel.registry.registry import Registry
    from flywheel.routing import TEACHER, promoted_mode, set_route
    from flywheel.storage import Store

    store = Store(cfg.home or None)
    registry = Registry(store)
    move = registry.rollback(cfg.agent)
    mode = promoted_mode(registry.get(cfg.agent, move["to"])) if move["to"] else TEACHER
    set_route(store, cfg.agent, mode, f"rollback to {move['to']}")
    return move


def run_serve(cfg: C.ServeConfig) -> dict:
    import time

    from flywheel.serve.app import run

    _ray_init(cfg.home)
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
    from flywheel.raycluster import find_address

    if find_address()[0]:  # a Ray instance runs here: join it, so the drift gauges reach its dashboard
        _ray_init(cfg.home)
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
    "run": (ControllerConfig, run_controller),
}


# -- flags: one per config field, its help the field's comment ----------------------------------------------------

@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: the `# comment` on its line} of a config class, read from its source (the one place they are
    written). A field that spans lines takes the first comment before its statement ends."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen app): the flags fall back to their types
        return {}
    out: dict[str, str] = {}
    depth, field, opening, prev = 0, None, True, None  # prev: (the last token, whether it opened its statement)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.INDENT, tokenize.DEDENT):
            depth += 1 if tok.type == tokenize.INDENT else -1
        elif tok.type == tokenize.NEWLINE:  # the end of a statement (NL only ends a physical line)
            field, opening = None, True
        elif tok.type == tokenize.COMMENT:
            if field and field not in out:
                out[field] = tok.string.lstrip("#").strip()
        elif tok.type != tokenize.NL:
            if tok.string == ":" and depth == 1 and prev and prev[1] and prev[0].type == tokenize.NAME:
                field = prev[0].string  # `name: type ...` opening a statement of the class body
            prev, opening = (tok, opening), False
    return out


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return f"{_type_name(typing.get_args(kind)[0])},..."
    return getattr(kind, "__name__", "value")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return '""' if value == "" else str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def field_help(cls: type, f: dataclasses.Field, kind: Any) -> str:
    """`<the field's comment, or its type> (default: X)`, escaped for argparse."""
    text = field_comments(cls).get(f.name) or _type_name(kind)
    return f"{text} (default: {_shown(_default(f))})".replace("%", "%%")


def _switches(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if hints[f.name] is bool}


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def switch_argv(argv: list[str]) -> list[str]:
    """The older `--force true` / `--incremental=false` spellings as switches (`--force`, `--no-incremental`)."""
    if not argv or argv[0] not in VERBS:
        return argv
    switches, out, i = _switches(VERBS[argv[0]][0]), [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        flag, eq, value = arg.partition("=")
        if flag in switches and not eq and i + 1 < len(argv) and argv[i + 1].lower() in _TRUE + _FALSE:
            value, eq, i = argv[i + 1], "=", i + 1
        if flag in switches and eq:
            if value.lower() not in _TRUE + _FALSE:
                raise C.ConfigError(f"{flag}: expected true or false, got {value!r} (or use {flag} / "
                                    f"--no-{flag[2:]})")
            arg = flag if value.lower() in _TRUE else "--no-" + flag[2:]
        out.append(arg)
        i += 1
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flywheel", description="A Ray-native data flywheel for LLM agents.")
    sub = p.add_subparsers(dest="verb", required=True)
    for verb, (cls, _) in VERBS.items():
        sp = sub.add_parser(verb, help=(cls.__doc__ or "").strip().splitlines()[0], description=cls.__doc__)
        sp.add_argument("--config", metavar="FILE.yaml",
                        help="a YAML job file (jobs/*.yaml) loaded first; flags override it (default: none)")
        sp.add_argument("--json", action="store_true",
                        help="print the result as one JSON object on stdout; progress stays on stderr (default: off)")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, text = hints[f.name], field_help(cls, f, hints[f.name])
            if verb == "ingest" and f.name == "paths":
                sp.add_argument("paths", nargs="*", metavar="FILE",
                                help=field_comments(cls).get("paths") or "log files to ingest (default: none)")
                continue
            if verb == "keys" and f.name == "action":
                sp.add_argument("action", nargs="?", metavar="{create,revoke,list}", help=text)
                continue
            flag = "--" + f.name.replace("_", "-")
            if kind is bool:  # --x / --no-x; unset (None): the YAML's value or the default
                sp.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text)
            else:
                sp.add_argument(flag, dest=f.name, default=None, metavar=_type_name(kind).upper(), help=text)
    return p


# -- running a verb ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout inside to stderr: prints, Ray Tune's status tables, worker output that Ray
    forwards, C extensions writing to fd 1. A verb's stdout is then only its result, printed after this block."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no usable fd 1: redirecting sys.stdout is all there is to do
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for stream in (sys.stdout, sys.__stdout__):
            with contextlib.suppress(Exception):
                stream.flush()  # bytes written inside still land on stderr
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def check_job_home(cfg: Any, environ: Any = os.environ) -> None:
    """Inside a submitted Ray job the working directory is a per-job upload that disappears with the job: a home
    that is unset or relative would curate (and write into) that directory's empty `.flywheel`. Refuse it."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in environ or not hasattr(cfg, "home"):  # set for a job's driver
        return
    home = cfg.home or environ.get("FLYWHEEL_HOME") or ""
    if "://" in home or (home and os.path.isabs(os.path.expanduser(home))):
        return
    raise C.ConfigError(f"home: a Ray job needs an absolute or s3:// home, got {home or 'none'!r}: set FLYWHEEL_HOME "
                        "(--runtime-env-json '{\"env_vars\": {\"FLYWHEEL_HOME\": \"s3://bucket/flywheel\"}}'), "
                        "`home:` in the job YAML or --home")


def _fail(verb: str, as_json: bool, e: BaseException) -> int:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if as_json:
        from flywheel.capture.reader import InputError

        partial = e.result if isinstance(e, InputError) else None  # an ingest stopped by an unreadable file
        print(json.dumps({"error": str(msg), "type": type(e).__name__, **({"ingested": partial} if partial else {})}))
    else:
        print(f"flywheel {verb}: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = switch_argv(argv)
    except C.ConfigError as e:
        return _fail(argv[0], "--json" in argv, e)
    args = parser().parse_args(argv)
    cls, fn = VERBS[args.verb]
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v not in (None, [])}
    # the demo's tables are its human output; every other verb's stdout is its result alone
    quiet = args.json or args.verb != "demo"
    try:
        with stdout_to_stderr() if quiet else contextlib.nullcontext():
            cfg = C.load(cls, args.config, **overrides)
            check_job_home(cfg)
            result = fn(cfg)
    except (C.ConfigError, FileNotFoundError, PermissionError, ValueError, KeyError, ConnectionError) as e:
        return _fail(args.verb, args.json, e)
    except Exception as e:  # registry conflicts and friends: still one line, not a traceback
        from flywheel.registry.registry import RegistryError

        if not isinstance(e, RegistryError):
            raise
        return _fail(args.verb, args.json, e)
    if args.json:
        print(json.dumps(result, default=str, indent=None), flush=True)
    elif args.verb != "demo":  # the demo has printed its own tables
        print(json.dumps(result, default=str, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
