"""Per-agent adapter registry: versions with lineage, aliases (`production`, `canary`), atomic promotion.

    flywheel promote --agent sgd_Flights --version v2
    flywheel rollback --agent sgd_Flights

`registry/<agent>.json` holds every version (adapter path under the home, dataset version, base model,
hyperparameters, scores) and the aliases. Every change is an optimistic compare-and-swap of that one object
(`Store.read_json_versioned` / `Store.write_json_if`: a conditional PUT on S3, a flock-guarded compare+rename
locally), retried when another writer got there first, so concurrent writers on any machine lose nothing.
`promote(..., expected=...)` fails with `PromotionConflict` when production moved since the caller looked:
two concurrent promotions produce exactly one winner. There is no long-held lock to go stale or be taken over.

`register` first claims its version number by creating `registry/.claims/<agent>/v<N>.json` (create-only, so
each number has one owner, even when the claimant crashes), then uploads the adapter to
`adapters/<agent>/v<N>/`, then adds the entry: an entry is visible only once its adapter is in place.
Agent ids and versions follow `flywheel.ids` (no `..`, `/`, ...); others raise `RegistryError`.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from typing import Any, Callable

from flywheel.ids import InvalidId, check_id
from flywheel.storage import Store

PRODUCTION = "production"
CAS_TIMEOUT_S = 60.0  # how long one change keeps retrying lost races before it gives up
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

    def _empty(self, agent: str) -> dict:
        return {"agent": agent, "versions": [], "aliases": {}, "history": []}

    def _load(self, agent: str) -> dict:
        return self.store.read_json(self._rel(agent), self._empty(agent))

    def _update(self, agent: str, change: Callable[[dict], Any]) -> Any:
        """Apply `change(state)` (it edits the state in place and returns the result) as a compare-and-swap.

        A lost race re-reads and re-applies `change` to the winner's state; `change` raises to refuse
        (`PromotionConflict` when production moved).
        """
        rel = self._rel(agent)
        deadline, attempt = time.monotonic() + CAS_TIMEOUT_S, 0
        while True:
            state, token = self.store.read_json_versioned(rel)
            state = self._empty(agent) if state is None else state
            result = change(state)
            try:
                if self.store.write_json_if(rel, state, token):
                    return result
            except TimeoutError as e:
                raise RegistryError(str(e)) from None
            attempt += 1
            if time.monotonic() > deadline:
                raise RegistryError(f"{rel} kept changing under this update for {CAS_TIMEOUT_S:.0f}s "
                                    f"({attempt} attempts); retry later")
            time.sleep(random.uniform(0, min(0.2, 0.002 * 2 ** attempt)))  # jittered: racers spread out

    def _claim_version(self, agent: str) -> str:
        """The next free `v<N>`, owned by this caller: the first `registry/.claims/<agent>/v<N>.json` it creates."""
        n = max((_number(v["version"]) for v in self.versions(agent)), default=0) + 1
        owner = {"agent": agent, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        for _ in range(10_000):
            version = f"v{n}"
            try:
                if self.store.write_json_if(f"registry/.claims/{agent}/{version}.json",
                                            {**owner, "version": version}, None):
                    return version
            except TimeoutError as e:
                raise RegistryError(str(e)) from None
            n += 1
        raise RegistryError(f"agent {agent!r}: no free version number after v{n}")

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
        version = self._claim_version(_checked("agent id", agent))
        rel = f"adapters/{agent}/{version}"
        self.store.upload(adapter_dir, rel)
        entry = {"version": version, "adapter": rel, "created": time.time(), **lineage}

        def add(state: dict) -> None:
            state["versions"] = sorted([*state["versions"], entry], key=lambda v: _number(v["version"]))

        self._update(agent, add)
        return entry

    def record_scores(self, agent: str, version: str, scores: dict) -> None:
        def score(state: dict) -> None:
            for v in state["versions"]:
                if v["version"] == version:
                    v["scores"] = scores

        self._update(agent, score)

    def record_certificate(self, agent: str, version: str, certificate: dict) -> None:
        """Keep a version's selective-serving certificate (`flywheel.evaluate.selective`: threshold, target,
        delta, aggregate, coverage, its check on test) with it; Serve's catalog reads the production version's."""
        def keep(state: dict) -> None:
            for v in state["versions"]:
                if v["version"] == version:
                    v["selective"] = certificate

        self._update(agent, keep)

    def set_alias(self, agent: str, version: str | None, name: str = PRODUCTION,
                  expected: Any = _UNSET, reason: str = "") -> dict:
        """Point `name` at `version` (None removes it). With `expected`, only if it still points there."""
        if version is not None:
            _checked("version", version)

        def move(state: dict) -> dict:
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
            return {"agent": agent, "alias": name, "from": current, "to": version}

        return self._update(agent, move)

    def promote(self, agent: str, version: str, expected: Any = _UNSET, reason: str = "") -> dict:
        return self.set_alias(agent, version, PRODUCTION, expected, reason or "promote")

    def rollback(self, agent: str) -> dict:
        """Restore the production version before the current one (`PromotionConflict` if it moves meanwhile)."""
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


def _number(version: str) -> int:
    """N of `v<N>` (0 for any other name): the order of versions, and where numbering continues."""
    m = re.fullmatch(r"v(\d+)", version)
    return int(m.group(1)) if m else 0
