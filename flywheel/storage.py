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
    registry/<agent>.json         versions and aliases (compare-and-swap, below)
    registry/.claims/<agent>/     one object per allocated version number (flywheel.registry)
    monitor/            drift reports (HTML) and events
    routing/<agent>.json          which backend answers the agent
    queue/retrain/      retrain requests

Every path given to `Store` is relative to the home and may not leave it: absolute parts, `..` segments,
backslashes and control characters raise `UnsafePath` (ids that name paths are checked earlier, `flywheel.ids`).

Publishing is atomic: write under a staging name, then rename (local) or write the object that makes it
visible (a manifest; S3 object writes are atomic per object): see `Store.publish`.

Small shared state (the registry) changes by compare-and-swap: `read_json_versioned` returns the object with a
version token, `write_json_if` replaces it only if that token is still current (or, with token None, creates it
only if absent) and returns False when another writer got there first; the caller re-reads and retries.
- S3: one conditional PutObject, `If-Match: <ETag>` / `If-None-Match: *`; S3 checks and writes atomically.
  S3-compatible servers must honour both headers (AWS S3 does; check others: one that ignores them silently
  turns this back into last-writer-wins).
- Local: the token is the SHA-256 of the bytes; the compare and the `os.replace` run under an exclusive
  `flock` on the folder's hidden `.cas.lock`, held for those microseconds only. The kernel drops the
  lock when its holder exits, however it exits: no stale lock, and a slow live holder is waited for (up to
  `LOCK_WAIT_S`, then `TimeoutError`), never interrupted.
Readers never see a torn object on either: `os.replace` locally, whole-object PUTs on S3, which `read_json`
reads with one GET (so a concurrent replace cannot fail the read either).

S3 (or any S3-compatible server): `FLYWHEEL_HOME=s3://bucket/prefix`, with `FLYWHEEL_S3_ENDPOINT` for a
non-AWS endpoint (MinIO, moto). The endpoint travels inside the picklable `Store` and its `pyarrow_fs()` to Ray
tasks in other processes; credentials do not: every process resolves them as boto does (environment variables,
shared config, instance role), so give Ray workers the same environment (`runtime_env` env_vars or node roles).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from typing import Any, Callable, Iterator

import fsspec

from flywheel.ids import show

DEFAULT_HOME = ".flywheel"
LOCK_WAIT_S = 30.0  # how long a local conditional write waits for another writer's compare+rename
_UNSAFE = re.compile(r"(?:^|/)\.\.(?:/|$)|[\x00-\x1f\x7f\\]")  # a `..` segment, a control character, a backslash


class UnsafePath(ValueError):
    """A relative path that could leave the home."""


def home_uri(home: str | None = None) -> str:
    """The configured home: an explicit value, else `$FLYWHEEL_HOME`, else `./.flywheel`."""
    uri = home or os.environ.get("FLYWHEEL_HOME") or DEFAULT_HOME
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def endpoint_options(uri: str) -> dict:
    """fsspec storage options naming `$FLYWHEEL_S3_ENDPOINT` for an `s3://` URI (a non-AWS server); else {}."""
    endpoint = os.environ.get("FLYWHEEL_S3_ENDPOINT")
    if uri.startswith("s3://") and endpoint:
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


class Store:
    """A thin, picklable handle on the home. Paths given to methods are relative to the home."""

    def __init__(self, home: str | None = None, storage_options: dict | None = None):
        self.uri = home_uri(home)
        self.storage_options = storage_options or endpoint_options(self.uri)
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
        """The object at `rel`, or `default` when it does not exist; never half of one (see `write_json`)."""
        data, _ = self._get(self.path(rel))
        return default if data is None else json.loads(data)

    def write_json(self, rel: str, obj: Any) -> str:
        """Write JSON atomically: readers see the old object or the new one, never half of one."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self.write_bytes(rel, data)

    def read_json_versioned(self, rel: str) -> tuple[Any, str | None]:
        """(object, version token) of `rel`, or (None, None) when it does not exist. See `write_json_if`."""
        data, etag = self._get(self.path(rel))
        if data is None:
            return None, None
        return json.loads(data), etag if etag is not None else _digest(data)

    def write_json_if(self, rel: str, obj: Any, token: str | None) -> bool:
        """Write `obj` to `rel` only if it is still at version `token` (None: only if `rel` does not exist).

        True when written; False when another writer changed (or created) it since `token` was read: re-read
        with `read_json_versioned` and retry. Atomic on local homes and S3 (module docstring); other
        filesystems raise `NotImplementedError`.
        """
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        target = self.path(rel)
        if self.local:
            return _write_if_local(_local(target), data, token)
        if self.uri.startswith("s3://"):
            return self._write_if_s3(target, data, token)
        raise NotImplementedError(f"conditional writes need a local or s3:// home, not {self.uri}")

    def _get(self, target: str) -> tuple[bytes | None, str | None]:
        """(bytes, S3 ETag or None) of one whole object; (None, None) when it does not exist.

        On S3 this is one GET, so body and ETag belong to the same version, and a concurrent replace cannot
        break the read (`fs.open` sends a HEAD, then ranged GETs pinned to the HEAD's ETag: `FileExpired`).
        """
        if self.local:
            try:
                with open(_local(target), "rb") as f:
                    return f.read(), None
            except FileNotFoundError:
                return None, None
        if not self.uri.startswith("s3://"):
            try:
                return self.fs.cat_file(target), None
            except FileNotFoundError:
                return None, None
        from fsspec.asyn import sync

        fs = self.fs
        bucket, key, _ = fs.split_path(target)

        async def get() -> tuple[bytes, str]:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return sync(fs.loop, get)
        except FileNotFoundError:
            return None, None

    def _write_if_s3(self, target: str, data: bytes, token: str | None) -> bool:
        fs = self.fs
        bucket, key, _ = fs.split_path(target)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        for attempt in range(8):
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
                return True
            except OSError as e:  # s3fs turns ClientErrors into OSErrors, the ClientError is the cause
                code = _s3_error_code(e)
                if code == "ConditionalRequestConflict":  # 409: a concurrent conditional write; S3 says retry
                    time.sleep(0.05 * 2 ** attempt)
                    continue
                if code not in ("PreconditionFailed", "NoSuchKey"):
                    raise
                # 412 (changed) or 404 (If-Match on a deleted key). A PUT that botocore or s3fs retried after a
                # lost response may have landed before its retry was refused: the object then holds our bytes.
                return self._get(target)[0] == data
        return False

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
        data, _ = self._get(self.path(rel))
        if data is None:
            raise FileNotFoundError(self.path(rel))
        return data.decode()

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


# -- conditional writes: helpers -------------------------------------------------------------------------
def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _s3_error_code(e: BaseException | None) -> str | None:
    """The S3 error code behind an exception (s3fs keeps botocore's ClientError as the cause)."""
    seen = 0
    while e is not None and seen < 8:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


@contextlib.contextmanager
def flocked(target: str, wait_s: float | None = None) -> Iterator[None]:
    """Hold the exclusive `flock` that guards local conditional writes of `target`.

    The kernel releases it when the holder closes it or dies, so there is no stale lock to take over; a waiter
    gives up after `wait_s` (default `LOCK_WAIT_S`) with `TimeoutError` and leaves the holder alone.
    """
    import fcntl

    lock = os.path.join(os.path.dirname(target), ".cas.lock")  # one per folder: holders need microseconds
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline, pause = time.monotonic() + wait_s, 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{lock} is held by another writer of {target} for over {wait_s:.0f}s; it is still "
                        "running (a dead holder releases it at once): retry when it has finished") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        yield  # closing the descriptor below releases the lock
    finally:
        os.close(fd)


def fetch_once(dest: str, fetch: Callable[[str], Any], marker: str, wait_s: float = 600.0) -> bool:
    """Make the local folder `dest` a whole copy, once per machine: unless `dest/<marker>` exists, `fetch(staging)`
    fills a staging folder that is then renamed to `dest`, under `dest`'s lock (processes of one node share the
    copy; a reader never sees half of one). True when this call made the copy."""
    import shutil

    if os.path.exists(os.path.join(dest, marker)):
        return False
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with flocked(dest, wait_s=wait_s):
        if os.path.exists(os.path.join(dest, marker)):
            return False
        staging = f"{dest}.staging-{uuid.uuid4().hex[:8]}"
        try:
            fetch(staging)
            shutil.rmtree(dest, ignore_errors=True)  # a partial folder without the marker
            os.replace(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True


def _write_if_local(target: str, data: bytes, token: str | None) -> bool:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:  # staged outside the lock: the lock covers the compare and the rename only
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        with flocked(target):
            try:
                with open(target, "rb") as f:
                    current = _digest(f.read())
            except FileNotFoundError:
                current = None
            if current != token:
                return False
            os.replace(tmp, target)
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
