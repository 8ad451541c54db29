"""The Serve catalog: every agent with its tenant, production adapter and route, held in memory by each Ingress.

`GET /v1/models`, routing and registry look-ups answer from a `Snapshot`; no request lists or reads the store.
`Catalog.refresh` brings the snapshot up to date incrementally: it lists `agents/`, `registry/` and `routing/`
with each file's stamp (local: inode, mtime and size, so an atomic replace always counts as a change; object
stores: ETag, LastModified and size) and re-reads only the files whose stamp changed (object stores: in one
batched read). A refresh that finds nothing new reads no file and keeps the same snapshot object. On a local home
a folder whose own stamp has not changed is not even listed (every write under the home is a rename, which
changes the folder's stamp), so an idle refresh costs three `stat` calls whatever the number of agents; an
object store home costs one listing per folder and refresh.

    catalog = Catalog(Store(home), refresh_s=2.0)
    snapshot = await catalog.fresh()          # refreshes first when the snapshot is older than refresh_s
    entry = snapshot.get("sgd_Flights")       # None: not a known agent (404)
    route_of(entry)                           # Route(student, "sgd_Flights@v3", tenant, "production adapter")

An agent is known when it is in the catalog (`agents/<agent>.json`, written by ingest) or in the registry.
`refresh_s` is `ServeConfig.routing_ttl_s`: a new agent, a promotion or a drift route is answered accordingly by
a request that arrives `refresh_s` after the change (plus the refresh's own time), without a restart.
`Catalog.take_promoted` lists the agents whose answer moved to a student adapter (a promotion, or a route back
to the student) since it was last asked, so the Ingress can ask the student to prewarm them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flywheel.ids import is_valid_id
from flywheel.registry.registry import PRODUCTION
from flywheel.routing import STUDENT, resolve
from flywheel.storage import Store

logger = logging.getLogger("ray.serve")
FOLDERS = ("agents", "registry", "routing")


@dataclass(frozen=True)
class Route:
    backend: str  # STUDENT | TEACHER: who answers first (selective: the student, which may defer)
    model_id: str | None  # "<agent>@<version>" when the student answers (or shadows the teacher)
    tenant: str
    reason: str
    mode: str = ""  # flywheel.routing's mode: student, selective, shadow or teacher
    threshold: float | None = None  # selective: the certified confidence threshold
    aggregate: str = "min"  # selective: the confidence aggregate the threshold was certified for


@dataclass(frozen=True)
class Entry:
    """One agent as the catalog knows it."""

    agent: str
    tenant: str = "default"
    created: int = 0  # Unix seconds the agent was first seen
    production: str | None = None  # the registry's production version
    route: str | None = None  # the routing file's mode; None: no routing file (student once promoted)
    route_reason: str = ""
    certificate: dict | None = None  # the production version's `selective` entry (its certified threshold)


def route_of(entry: Entry) -> Route:
    """Who answers the agent (`flywheel.routing.resolve`): its route file says teacher (drift), else its
    production adapter (selective when certified, or as the route file says), else the teacher."""
    r = resolve(entry.agent, entry.route, entry.route_reason, entry.production, entry.certificate)
    return Route(r["backend"], r["model"], entry.tenant, r["reason"], r["mode"], r["threshold"], r["aggregate"])


@dataclass(frozen=True)
class Snapshot:
    """The catalog at one refresh; never changed after it is built."""

    entries: dict[str, Entry] = field(default_factory=dict)
    version: int = 0  # counts the refreshes that changed something
    _sorted: list[Entry] = field(default_factory=list, compare=False)

    def get(self, agent: str) -> Entry | None:
        return self.entries.get(agent)

    def listing(self) -> list[Entry]:
        """Every known agent, sorted by id (sorted once per snapshot)."""
        if not self._sorted and self.entries:
            self._sorted.extend(self.entries[a] for a in sorted(self.entries))
        return self._sorted


def _stamp(info: dict) -> tuple:
    """What changes whenever an object store object is rewritten (fsspec listing details)."""
    return tuple(str(info.get(k)) for k in ("ETag", "LastModified", "size", "mtime"))


def _first_seen(info: dict) -> int:
    stamp = info.get("created") or info.get("mtime") or info.get("LastModified") or 0
    return int(stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0))


def _certificate(state: Any, version: str | None) -> dict | None:
    """The `selective` certificate of a registry object's version, if it carries one."""
    if not isinstance(state, dict) or version is None:
        return None
    found = next((v for v in state.get("versions") or [] if v.get("version") == version), {})
    certificate = found.get("selective")
    return certificate if isinstance(certificate, dict) else None


def _production(state: Any) -> str | None:
    """The production version of a registry object, when that version is registered (as `Registry.alias`)."""
    if not isinstance(state, dict):
        return None
    version = (state.get("aliases") or {}).get(PRODUCTION)
    return version if version and any(v.get("version") == version for v in state.get("versions") or []) else None


class Catalog:
    """The refreshing holder of the current `Snapshot` (one per Ingress replica)."""

    def __init__(self, store: Store, refresh_s: float):
        self.store, self.refresh_s = store, refresh_s
        self.snapshot = Snapshot()
        self._files: dict[str, dict[str, tuple[tuple, Any, int]]] = {f: {} for f in FOLDERS}  # name -> stamp, obj, seen
        self._dirs: dict[str, tuple | None] = {}  # local folder -> its stamp when last listed (if trustworthy)
        self._lock = threading.Lock()  # one refresh at a time
        self._started = float("-inf")  # monotonic start of the last refresh
        self._task: asyncio.Future | None = None
        self._promoted: dict[str, None] = {}  # ordered set, filled by refreshes, emptied by take_promoted
        self._promoted_lock = threading.Lock()  # short: never held across I/O
        self._loaded = False

    # -- refreshing --------------------------------------------------------------------------------------------
    def refresh(self) -> set[str]:
        """Bring the snapshot up to date; returns the agents whose entry changed."""
        with self._lock:
            self._started = time.monotonic()
            touched: set[str] = set()
            for folder in FOLDERS:
                touched |= self._sync_folder(folder)
            if not touched:
                self._loaded = True
                return set()
            old = self.snapshot
            entries = dict(old.entries)
            for agent in touched:
                entry = self._entry(agent)
                if entry is None:
                    entries.pop(agent, None)
                else:
                    entries[agent] = entry
            changed = {a for a in touched if old.entries.get(a) != entries.get(a)}
            if changed:
                self.snapshot = Snapshot(entries, old.version + 1)
                if self._loaded:  # the first load promotes nothing
                    self._note_promotions(old, changed)
            self._loaded = True
            return changed

    def _sync_folder(self, folder: str) -> set[str]:
        """Re-read the files of `folder` whose stamp changed; forget removed ones. Returns the agents touched."""
        current = self._list_local(folder) if self.store.local else self._list_remote(folder)
        if current is None:
            return set()
        known = self._files[folder]
        gone = set(known) - set(current)
        for agent in gone:
            del known[agent]
        stale = [a for a, (stamp, _) in current.items() if a not in known or known[a][0] != stamp]
        for agent, obj in self._read(folder, stale).items():
            known[agent] = (current[agent][0], obj, current[agent][1])
        return gone | set(stale)

    def _list_local(self, folder: str) -> dict[str, tuple[tuple, int]] | None:
        """{agent: (stamp, first seen)} of a local folder's JSON files; None when the folder is unchanged.

        Every write under the home replaces a file by a rename, which changes the folder's own stamp; so an
        unchanged folder stamp means unchanged files, provided the folder had been quiet for a second before it
        was last listed (a change within the same clock tick as the stamp could otherwise go unseen)."""
        path, started = self.store.path(folder), time.time()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._dirs.pop(folder, None)
            return {}
        stamp = (st.st_ino, st.st_mtime_ns)
        if self._dirs.get(folder) == stamp:
            return None
        current = {}
        with os.scandir(path) as entries:
            for e in entries:
                if e.name.endswith(".json") and is_valid_id(e.name[:-5]) and e.is_file(follow_symlinks=False):
                    f = e.stat(follow_symlinks=False)
                    current[e.name[:-5]] = ((f.st_ino, f.st_mtime_ns, f.st_size), int(f.st_mtime))
        self._dirs[folder] = stamp if st.st_mtime_ns < (started - 1.0) * 1e9 else None
        return current

    def _list_remote(self, folder: str) -> dict[str, tuple[tuple, int]]:
        """{agent: (stamp, first seen)} of an object store folder's JSON files (one listing)."""
        try:
            listed = self.store.fs.ls(self.store.path(folder), detail=True)
        except FileNotFoundError:
            return {}
        current = {}
        for info in listed:
            name = str(info.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "file" and name.endswith(".json") and is_valid_id(name[:-5]):
                current[name[:-5]] = (_stamp(info), _first_seen(info))
        return current

    def _read(self, folder: str, agents: list[str]) -> dict[str, Any]:
        """{agent: parsed JSON} of `folder/<agent>.json` (object stores: in one batched read); files gone or
        unreadable are left out and read again at the next refresh."""
        if not agents:
            return {}
        if self.store.local:
            found = {}
            for agent in agents:
                try:
                    with open(self.store.path(folder, f"{agent}.json"), "rb") as f:
                        found[agent] = f.read()
                except FileNotFoundError:
                    pass
        else:
            fs = self.store.fs
            paths = {fs._strip_protocol(self.store.path(folder, f"{a}.json")): a for a in agents}
            found = {paths[p]: data for p, data in fs.cat(list(paths), on_error="omit").items() if p in paths}
        out = {}
        for agent, data in found.items():
            try:
                out[agent] = json.loads(data)
            except ValueError:
                logger.warning("catalog: %s/%s.json is not JSON; skipped until it changes", folder, agent)
        return out

    def _entry(self, agent: str) -> Entry | None:
        catalog = self._files["agents"].get(agent)
        registry = self._files["registry"].get(agent)
        if catalog is None and registry is None:
            return None
        about = catalog[1] if catalog and isinstance(catalog[1], dict) else {}
        created = about.get("created") or (catalog[2] if catalog else 0) or (registry[2] if registry else 0)
        route = self._files["routing"].get(agent)
        route_obj = route[1] if route and isinstance(route[1], dict) else {}
        production = _production(registry[1]) if registry else None
        return Entry(agent, str(about.get("tenant") or "default"), int(float(created or 0)), production,
                     route_obj.get("mode") if route else None, str(route_obj.get("reason") or ""),
                     _certificate(registry[1], production) if registry else None)

    def _note_promotions(self, old: Snapshot, changed: set[str]) -> None:
        for agent in sorted(changed):
            before, after = old.get(agent), self.snapshot.get(agent)
            now = route_of(after) if after is not None else None
            if now is not None and now.backend == STUDENT and (before is None or route_of(before).model_id !=
                                                               now.model_id):
                with self._promoted_lock:
                    self._promoted[agent] = None

    async def fresh(self) -> Snapshot:
        """The snapshot, refreshed first when older than `refresh_s` (one refresh at a time; a failed refresh is
        logged and the previous snapshot kept)."""
        if time.monotonic() - self._started >= self.refresh_s:
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(asyncio.to_thread(self.refresh))
            try:
                await asyncio.shield(self._task)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("catalog refresh failed, answering from the previous snapshot: %s", e)
        return self.snapshot

    def take_promoted(self) -> list[str]:
        """The agents newly answered by a student adapter since the last call."""
        with self._promoted_lock:
            promoted, self._promoted = list(self._promoted), {}
        return promoted
