"""Identifiers that can become part of a path: one rule for all of them.

Agent ids, tenant ids, dataset and adapter versions, run and sweep names and key ids all end up in paths under
FLYWHEEL_HOME (`agents/<agent>.json`, `datasets/<agent>/<version>/`, `sweeps/<name>/`), so none of them may come
from untrusted input unchecked. The rule, `ID_PATTERN` minus any `..`:

    1 to 128 characters: letters, digits and _ . @ : -, starting with a letter or a digit, never '..'

which leaves out `/`, `\\`, whitespace, control characters and hidden (dot) names. Ingest quarantines a line
whose ids break it (`invalid_id`), configs fail with a `ConfigError` naming the key, the registry raises
`RegistryError`; everything else raises `InvalidId` (a `ValueError`).
"""

from __future__ import annotations

import re
from typing import Any

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$"
RULE = "1-128 letters, digits or _ . @ : -, starting with a letter or digit, without '..'"
_ID = re.compile(ID_PATTERN[1:-1])  # used with fullmatch: `$` would also accept a trailing newline


class InvalidId(ValueError):
    """An identifier that breaks the rule; the message names its kind, shows the value and says what to do."""


def is_valid_id(value: Any) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None and ".." not in value


def show(value: Any, limit: int = 60) -> str:
    """`value` as a short, escaped preview (`repr`, cut to `limit` characters, with its length when cut)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit - 3]}...{size}"


def check_id(kind: str, value: Any) -> str:
    """`value` when it is a valid identifier, else `InvalidId` naming `kind` (e.g. "agent id")."""
    if is_valid_id(value):
        return value
    if not isinstance(value, str):
        raise InvalidId(f"{kind} must be text, got {type(value).__name__} {show(value)}")
    raise InvalidId(f"invalid {kind} {show(value)}: use {RULE} (e.g. sgd_Flights)")
