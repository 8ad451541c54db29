"""A lease on the home: one holder at a time, taken, renewed and released by compare-and-swap on its version.

    lease = Lease(store, "controller/lease.json", holder=my_id, ttl_s=300)
    if lease.acquire():
        try:
            with lease.kept():            # renewed every ttl_s / 3 while the block runs, however long a step takes
                ...                       # between steps `renew()` is False (and `lost` set) once it is not ours
        finally:
            lease.release()               # frees it only if it is still ours

A lease is free when released, past its `until`, or held by a process of this host that no longer exists (a
killed holder). Every write is conditional on the version this holder last saw (`Store.write_json_if`, atomic on
local and S3 homes), so a holder whose lease ran out while it stalled finds it taken on its next renewal and
stops, instead of overwriting the new holder; and of two holders that saw the same free lease, one wins.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterator

from flywheel.storage import Store


class Lease:
    def __init__(self, store: Store, rel: str, holder: str, ttl_s: float, clock: Callable[[], float] = time.time):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.store, self.rel, self.holder, self.ttl_s, self.clock = store, rel, holder, ttl_s, clock
        self.lost = threading.Event()
        self._token: str | None = None  # the version this holder wrote last; None while not held
        self._lock = threading.Lock()   # renewals from `kept`'s thread and the holder's own calls

    def acquire(self) -> bool:
        """Take the lease if it is free (or already ours); False while another live holder has it."""
        with self._lock:
            current, token = self.store.read_json_versioned(self.rel)
            holder = (current or {}).get("holder")
            if holder not in (None, self.holder) and float(current.get("until") or 0) > self.clock() \
                    and _alive(holder):
                return False
            self.lost.clear()
            return self._write(token, self.holder)

    def renew(self) -> bool:
        """Extend the lease by `ttl_s`; False (and `lost` set) when it is no longer ours."""
        with self._lock:
            if self._token is None or not self._write(self._token, self.holder):
                self._token = None
                self.lost.set()
                return False
            return True

    def release(self) -> None:
        """Free the lease, unless another holder has taken it since (then it is theirs: left alone)."""
        with self._lock:
            if self._token is not None:
                self._write(self._token, None)
            self._token = None

    @contextlib.contextmanager
    def kept(self, every_s: float | None = None) -> Iterator["Lease"]:
        """Renew in a background thread every `every_s` (ttl_s / 3) while the block runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every_s or self.ttl_s / 3) and self.renew():
                pass

        thread = threading.Thread(target=beat, name=f"lease-{self.rel}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def _write(self, token: str | None, holder: str | None) -> bool:
        """Write {holder, until} if the lease is still at `token`; a holder's write remembers the new version."""
        nonce = uuid.uuid4().hex
        body = {"holder": holder, "until": self.clock() + self.ttl_s if holder else 0, "nonce": nonce,
                **({} if holder else {"released_by": self.holder})}
        if not self.store.write_json_if(self.rel, body, token):
            return False
        if holder is None:
            return True
        # read back the version just written: no one else writes a live lease that is not theirs
        written, version = self.store.read_json_versioned(self.rel)
        self._token = version if (written or {}).get("nonce") == nonce else None
        return self._token is not None


def _alive(holder: str) -> bool:
    """False only when the holder (`host-pid-suffix`) is a process of this host that is gone; other hosts count
    as alive until their lease runs out."""
    parts = holder.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def holder_id() -> str:
    """This process's holder name: host, pid (so a killed holder on this host is recognised) and a suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
