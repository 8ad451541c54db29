"""Where everything lives: `FLYWHEEL_HOME`, a local folder or an `s3://` URI.

Layout under the home (every stage reads and writes only through `Store`):

    logs/wal/           write-ahead segments (JSONL, fsynced) of captured records
    logs/parquet/       compacted, deduplicated log records (schema.LOG_RECORD)
    quarantine/         rejected input with reason codes (schema.QUARANTINE)
    datasets/<agent>/<version>/   curated, immutable datasets + manifest.json
    checkpoints/        Ray Train run storage
    sweeps/<name>/      Ray Tune experiment, one Train run per trial, sweep.json (flywheel.distill.sweep)
    mlruns/             MLflow's local file store (flywheel.tracking; when no tracking URI is set)
    adapters/<agent>/<version>/   PEFT adapters
    registry/<agent>.json         versions and aliases
    monitor/            drift reports (HTML) and events
    routing/<agent>.json          which backend answers the agent
    queue/retrain/      retrain requests

Every path given to `Store` is relative to the home and may not leave it: absolute parts, `..` segments,
backslashes and control characters raise `UnsafePath` (ids that name paths are checked earlier, `flywheel.ids`).

Publishing is atomic: write under a staging name, then rename (local) or write the object that makes it
visible (a manifest; S3 object writes are atomic per object): see `Store.publish`.

S3 (or any S3-compatible server): `FLYWHEEL_HOME=s3://bucket/prefix`, with `FLYWHEEL_S3_ENDPOINT` for a
non-AWS endpoint (MinIO, moto). The endpoint travels inside the picklable `Store` and its `pyarrow_fs()` to Ray
tasks in other processes; credentials do not: every process resolves them as boto does (environment variables,
shared config, instance role), so give Ray workers the same environment (`runtime_env` env_vars or node roles).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from typing import Any, Iterator

import fsspec

from flywheel.ids import show

DEFAULT_HOME = ".flywheel"
_UNSAFE = re.compile(r"(?:^|/)\.\.(?:/|$)|[\x00-\x1f\x7f\\]")  # a `..` segment, a control character, a backslash


class UnsafePath(ValueError):
    """A relative path that could leave the home."""


def home_uri(home: str | None = None) -> str:
    """The configured home: an explicit value, else `$FLYWHEEL_HOME`, else `./.flywheel`."""
    uri = home or os.environ.get("FLYWHEEL_HOME") or DEFAULT_HOME
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


class Store:
    """A thin, picklable handle on the home. Paths given to methods are relative to the home."""

    def __init__(self, home: str | None = None, storage_options: dict | None = None):
        self.uri = home_uri(home)
        self.storage_options = storage_options or {}
        if self.uri.startswith("s3://") and not self.storage_options:
            endpoint = os.environ.get("FLYWHEEL_S3_ENDPOINT")
            if endpoint:
                self.storage_options = {"client_kwargs": {"endpoint_url": endpoint}}
        if self.uri.startswith("s3://"):
            # Ray tasks in other processes write here too: a cached listing would hide their objects.
            self.storage_options = {"use_listings_cache": False, **self.storage_options}
        self.local = "://" not in self.uri or self.uri.startswith("file://")

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __reduce__(self):
        return (Store, (self.uri, self.storage_options))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        protocol = self.uri.split("://", 1)[0] if "://" in self.uri else "file"
        return fsspec.filesystem(protocol, **self.storage_options)

    def path(self, *parts: str) -> str:
        """The full path of `parts` joined under the home; `UnsafePath` for anything that could leave it."""
        given = [p for p in parts if p]
        if not given:
            return self.uri
        rel = "/".join(given)
        if any(p[0] == "/" for p in given) or _UNSAFE.search(rel):
            raise UnsafePath(f"unsafe path {show(rel, 80)} under {self.uri}: paths in the home are relative, "
                             "without '..', backslashes or control characters")
        full = "/".join([self.uri, *[p.strip("/") for p in given]])
        if self.local:
            home, resolved = os.path.normpath(self.uri), os.path.normpath(full)
            if resolved != home and not resolved.startswith(home + os.sep):
                raise UnsafePath(f"unsafe path {show(rel, 80)}: it resolves outside the home {self.uri}")
        return full

    def pyarrow_fs(self):
        """(pyarrow filesystem, path of the home within it) for pyarrow / Ray Data readers and writers.

        Picklable (Ray ships it to tasks): local -> `LocalFileSystem`; otherwise the fsspec filesystem wrapped in
        `PyFileSystem(FSSpecHandler(...))`, which pickles with its storage options (the endpoint included).
        """
        import pyarrow.fs as pafs

        if self.local:
            return pafs.LocalFileSystem(), self.uri.replace("file://", "")
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self.uri.split("://", 1)[1]

    # -- small objects -------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_json(self, rel: str, default: Any = None) -> Any:
        try:
            with self.fs.open(self.path(rel), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return default

    def write_json(self, rel: str, obj: Any) -> str:
        """Write JSON atomically: readers see the old object or the new one, never half of one."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self.write_bytes(rel, data)

    def write_bytes(self, rel: str, data: bytes) -> str:
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            with self.fs.open(target, "wb") as f:
                f.write(data)
        return target

    def read_text(self, rel: str) -> str:
        with self.fs.open(self.path(rel), "r") as f:
            return f.read()

    def list(self, rel: str) -> list[str]:
        """Names (not paths) directly under `rel`, sorted; [] when it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def makedirs(self, rel: str) -> str:
        p = self.path(rel)
        self.fs.makedirs(p, exist_ok=True)
        return p

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel), recursive=True)

    def publish(self, src_rel: str, dst_rel: str, last: str = "manifest.json") -> None:
        """Publish a staged folder as `dst_rel`, where readers only trust a folder that holds `last`.

        Local: one atomic rename. Object stores have no rename: every object is copied, `last` after all the
        others, then the staging objects are deleted; a crash part way leaves no `last`, so nothing is visible,
        and a rerun overwrites the partial copy.
        """
        if self.local:
            self.move(src_rel, dst_rel)
            return
        src, dst = self.path(src_rel), self.path(dst_rel)
        root = self.fs._strip_protocol(src).rstrip("/")
        names = sorted(p[len(root) + 1:] for p in self.fs.find(src))
        if last not in names:
            raise FileNotFoundError(f"cannot publish {src}: it has no {last}")
        for name in [n for n in names if n != last] + [last]:
            self.fs.copy(f"{src}/{name}", f"{dst}/{name}")
        self.remove(src_rel)

    def move(self, src_rel: str, dst_rel: str) -> None:
        """Publish a staged folder or file. Local: one atomic rename."""
        src, dst = self.path(src_rel), self.path(dst_rel)
        if self.local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        else:
            self.fs.mv(src, dst, recursive=True)

    def local_copy(self, rel: str, dest: str) -> str:
        """A local copy of a folder (adapters, checkpoints) for code that needs a real path."""
        if self.local:
            return self.path(rel)
        self.fs.get(self.path(rel).rstrip("/") + "/", dest.rstrip("/") + "/", recursive=True)
        return dest

    def upload(self, local_path: str, rel: str) -> str:
        """Copy a local folder into the home (atomically visible for local homes)."""
        import shutil

        target = self.path(rel)
        if self.local:
            staging = f"{target}.staging-{uuid.uuid4().hex}"
            shutil.copytree(local_path, staging)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(staging, target)
        else:
            self.fs.put(local_path.rstrip("/") + "/", target + "/", recursive=True)
        return target

    @contextlib.contextmanager
    def open(self, rel: str, mode: str = "rb") -> Iterator[Any]:
        if "w" in mode or "a" in mode:
            self.fs.makedirs(self.path(os.path.dirname(rel)), exist_ok=True)
        with self.fs.open(self.path(rel), mode) as f:
            yield f
