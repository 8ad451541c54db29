"""What every job config shares: `ConfigError`, the id check for fields that become paths, and the strict
loader (`build` from a mapping, `load` from a YAML file plus overrides)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from typing import Any

import yaml

from flywheel.ids import InvalidId, check_id


class ConfigError(ValueError):
    """A config that cannot run: the message names the key and what to do."""


_ID_KINDS = {"agents": "agent id", "agent": "agent id", "known_agents": "agent id", "presidio_agents": "agent id",
             "redact_pii_agents": "agent id", "draft_when_teacher_down": "agent id", "agent_id": "agent id",
             "tenant": "tenant id", "name": "sweep name"}


def check_ids(cfg: Any, *keys: str, allow: tuple[str, ...] = ("",)) -> None:
    """`ConfigError` naming the key when a field (text, or a tuple of texts) of `cfg` is not a valid id.

    Values in `allow` pass: "" (the default) and, for allowlists, "*".
    """
    for key in keys:
        value = getattr(cfg, key)
        for item in value if isinstance(value, tuple) else (value,):
            if item in allow:
                continue
            try:
                check_id(_ID_KINDS.get(key, key.replace("_", " ")), item)
            except InvalidId as e:
                raise ConfigError(f"{key}: {e}") from None


def default_student_path() -> str:
    return os.environ.get("FLYWHEEL_STUDENT", os.path.abspath("models/smollm2-135m-instruct"))


def _deprecated_alias(cfg: Any, old: str, new: str, unset: Any) -> None:
    """A value given under a field's deprecated name moves to its new name (with a DeprecationWarning); the old
    field goes back to `unset`, so both spellings make the same config. Both names with different values: error."""
    value = getattr(cfg, old)
    if value == unset:
        return
    default = type(cfg).__dataclass_fields__[new].default
    if getattr(cfg, new) not in (default, value):
        raise ConfigError(f"{old}: the deprecated name of {new}; give only {new} (got {old}={value!r} and "
                          f"{new}={getattr(cfg, new)!r})")
    warnings.warn(f"{type(cfg).__name__}.{old} is deprecated: use {new}", DeprecationWarning, stacklevel=4)
    object.__setattr__(cfg, new, value)
    object.__setattr__(cfg, old, unset)


def _check(cls: type, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls.__name__}.{key}: expected a list, got {value!r}")
        return tuple(_check(cls, key, v, typing.get_args(hint)[0]) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{cls.__name__}.{key}: expected true/false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{cls.__name__}.{key}: expected a number, got {value!r}")
        try:
            cast = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{cls.__name__}.{key}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != cast:
            raise ConfigError(f"{cls.__name__}.{key}: expected an integer, got {value!r}")
        return cast
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{cls.__name__}.{key}: expected text, got {value!r}")
        return str(value)
    return value


def build(cls: type, values: dict[str, Any]) -> Any:
    """A `cls` from a mapping, rejecting unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    checked = {k: _check(cls, k, v, hints[k]) for k, v in values.items() if v is not None}
    if checked.get("max_history", 1) < 1:
        raise ConfigError(f"{cls.__name__}.max_history: must be >= 1 (the request's last messages the student "
                          f"reads), got {checked['max_history']}")
    try:
        return cls(**checked)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def load(cls: type, path: str | None = None, **overrides: Any) -> Any:
    """Load `cls` from a YAML file (may be None), then apply overrides (e.g. CLI flags)."""
    values: dict[str, Any] = {}
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build(cls, values)
