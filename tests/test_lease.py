"""The home's lease (`flywheel.lease`): one holder at a time on a local home and on `s3://` (moto), a stalled holder
that cannot overwrite its successor, renewal through a step longer than the lease, and two processes contending.
No Ray.

    .venv/bin/python -m pytest tests/test_lease.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from flywheel.lease import Lease
from flywheel.storage import Store

from conftest import REPO

REL = "controller/lease.json"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_holder_and_a_stalled_one_never_overwrites_its_successor(home_uri):
    store, clock = Store(home_uri), Clock()
    a, b = (Lease(store, REL, name, ttl_s=10, clock=clock) for name in ("host-a", "host-b"))
    assert a.acquire() and not b.acquire() and a.renew()
    clock.now += 11  # a stalls past its lease without renewing: b takes over
    assert b.acquire()
    assert not a.renew() and a.lost.is_set()
    a.release()  # a's release leaves b's lease alone
    assert store.read_json(REL)["holder"] == "host-b" and not a.acquire()
    b.release()
    assert store.read_json(REL)["holder"] is None and a.acquire()


def test_a_lease_is_kept_through_a_step_longer_than_it(home_uri):
    store = Store(home_uri)
    a, b = Lease(store, REL, "host-a", ttl_s=0.6), Lease(store, REL, "host-b", ttl_s=0.6)
    assert a.acquire()
    with a.kept():
        time.sleep(1.5)  # two and a half leases long
        assert not b.acquire() and not a.lost.is_set()
    a.release()
    assert b.acquire()


def test_a_killed_holder_on_this_host_frees_the_lease_at_once(store):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{os.uname().nodename}-{child.stdout.strip()}-abcdef"
    store.write_json(REL, {"holder": dead, "until": time.time() + 3600})
    assert Lease(store, REL, "host-b", ttl_s=10).acquire()


CONTEND = r"""
import json, sys, time
from flywheel.lease import Lease, holder_id
from flywheel.storage import Store
lease, spans = Lease(Store(sys.argv[1]), "controller/lease.json", holder_id(), ttl_s=0.3), []
while len(spans) < int(sys.argv[2]):
    if not lease.acquire():
        time.sleep(0.01)
        continue
    with lease.kept():
        start = time.time()
        time.sleep(0.5)  # longer than the lease: only renewals keep it
        spans.append((start, time.time(), lease.lost.is_set()))
    lease.release()
    time.sleep(0.02)
print(json.dumps(spans))
"""


def test_two_processes_never_hold_it_at_once(home_uri):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CONTEND, home_uri, "4"], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    spans = [json.loads(out) for out, _ in outs]
    assert all(len(s) == 4 and not any(lost for *_, lost in s) for s in spans)
    for start, end, _ in spans[0]:
        for other_start, other_end, _ in spans[1]:
            assert end <= other_start or other_end <= start, (spans[0], spans[1])
