"""Per-agent adapter registry: versions with lineage, aliases (`production`, `canary`), atomic promotion.

    flywheel promote --agent sgd_Flights --version v2
    flywheel rollback --agent sgd_Flights

`registry/<agent>.json` holds every version (adapter path under the home, dataset version, base model,
hyperparameters, scores) and the aliases. Changes are compare-and-swap under a per-agent lock: `promote(...,
expected=...)` fails with `PromotionConflict` when production moved since the caller looked, so two concurrent
promotions produce exactly one winner. Adapters live in PEFT format at `adapters/<agent>/<version>/`.
Agent ids and versions follow `flywheel.ids` (no `..`, `/`, ...); others raise `RegistryError`.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any, Iterator

from flywheel.ids import InvalidId, check_id
from flywheel.storage import Store

PRODUCTION = "production"
_UNSET = object()


class RegistryError(RuntimeError):
    pass


class PromotionConflict(RegistryError):
    pass


def _checked(kind: str, value: str) -> str:
    try:
        return check_id(kind, value)
    except InvalidId as e:
        raise RegistryError(str(e)) from None


class Registry:
    def __init__(self, store: Store):
        self.store = store

    def _rel(self, agent: str) -> str:
        return f"registry/{_checked('agent id', agent)}.json"

    def _load(self, agent: str) -> dict:
        return self.store.read_json(self._rel(agent), {"agent": agent, "versions": [], "aliases": {}, "history": []})

    @contextlib.contextmanager
    def _locked(self, agent: str, timeout_s: float = 30.0) -> Iterator[None]:
        """An exclusive per-agent lock (O_EXCL lock file; stale after `timeout_s`)."""
        if not self.store.local:
            yield  # object stores: last writer wins; run promotions from one controller (see README)
            return
        path = self.store.path(f"registry/.{_checked('agent id', agent)}.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - os.path.getmtime(path) > timeout_s:
                        os.remove(path)
                        continue
                if time.monotonic() > deadline:
                    raise RegistryError(f"registry lock {path} is held; retry later") from None
                time.sleep(0.01)
        try:
            os.write(fd, uuid.uuid4().hex.encode())
            yield
        finally:
            os.close(fd)
            os.remove(path)

    # -- reading -------------------------------------------------------------------------------
    def agents(self) -> list[str]:
        return [n[:-5] for n in self.store.list("registry") if n.endswith(".json")]

    def versions(self, agent: str) -> list[dict]:
        return self._load(agent)["versions"]

    def get(self, agent: str, version: str) -> dict:
        _checked("version", version)
        if version == "latest":
            versions = self.versions(agent)
            if not versions:
                raise RegistryError(f"agent {agent!r} has no registered adapter versions")
            return versions[-1]
        for v in self.versions(agent):
            if v["version"] == version:
                return v
        raise RegistryError(f"agent {agent!r} has no version {version!r}")

    def alias(self, agent: str, name: str = PRODUCTION) -> dict | None:
        state = self._load(agent)
        version = state["aliases"].get(name)
        return next((v for v in state["versions"] if v["version"] == version), None) if version else None

    def adapter_path(self, entry: dict) -> str:
        return self.store.path(entry["adapter"])

    # -- writing -------------------------------------------------------------------------------
    def register(self, agent: str, adapter_dir: str, lineage: dict[str, Any]) -> dict:
        """Copy a local PEFT adapter folder in as the next version; returns its entry."""
        if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
            raise RegistryError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
        with self._locked(agent):
            state = self._load(agent)
            version = f"v{len(state['versions']) + 1}"
            rel = f"adapters/{agent}/{version}"
            self.store.upload(adapter_dir, rel)
            entry = {"version": version, "adapter": rel, "created": time.time(), **lineage}
            state["versions"].append(entry)
            self.store.write_json(self._rel(agent), state)
        return entry

    def record_scores(self, agent: str, version: str, scores: dict) -> None:
        with self._locked(agent):
            state = self._load(agent)
            for v in state["versions"]:
                if v["version"] == version:
                    v["scores"] = scores
            self.store.write_json(self._rel(agent), state)

    def set_alias(self, agent: str, version: str | None, name: str = PRODUCTION,
                  expected: Any = _UNSET, reason: str = "") -> dict:
        """Point `name` at `version` (None removes it). With `expected`, only if it still points there."""
        if version is not None:
            _checked("version", version)
        with self._locked(agent):
            state = self._load(agent)
            current = state["aliases"].get(name)
            if expected is not _UNSET and current != expected:
                raise PromotionConflict(
                    f"{agent}: {name} is {current!r}, expected {expected!r}; someone else promoted first")
            if version is not None and version not in {v["version"] for v in state["versions"]}:
                raise RegistryError(f"agent {agent!r} has no version {version!r}")
            if version is None:
                state["aliases"].pop(name, None)
            else:
                state["aliases"][name] = version
            state["history"].append({"alias": name, "from": current, "to": version, "time": time.time(),
                                     "reason": reason})
            self.store.write_json(self._rel(agent), state)
        return {"agent": agent, "alias": name, "from": current, "to": version}

    def promote(self, agent: str, version: str, expected: Any = _UNSET, reason: str = "") -> dict:
        return self.set_alias(agent, version, PRODUCTION, expected, reason or "promote")

    def rollback(self, agent: str) -> dict:
        """Restore the production version that preceded the current one."""
        state = self._load(agent)
        current = state["aliases"].get(PRODUCTION)
        moves = [h for h in state["history"] if h["alias"] == PRODUCTION]
        if not moves or current is None:
            raise RegistryError(f"agent {agent!r} has no production history to roll back")
        previous = moves[-1]["from"]
        # After a rollback the last move's "from" is the version we came from: walk back past rollbacks.
        for h in reversed(moves):
            if h["to"] == current and h["reason"] != "rollback":
                previous = h["from"]
                break
        return self.set_alias(agent, previous, PRODUCTION, expected=current, reason="rollback")
