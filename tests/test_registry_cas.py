"""The registry under concurrent writers, on a local home and on `s3://` (a moto server on 127.0.0.1). No Ray.

    pytest tests/test_registry_cas.py

Every registry change is a compare-and-swap of `registry/<agent>.json` (`Store.read_json_versioned` /
`Store.write_json_if`). Racing writers, threads and processes, must give exactly one winner per promotion,
distinct versions per registration, a registry that always parses, and nothing taken from a slow live writer.

moto enforces `If-None-Match: *` and `If-Match: <etag>` on PutObject, but checks and writes without a lock, so
two racing PUTs can both pass the check (AWS S3 is atomic). The fixture serialises the fake's PutObject handler
to give it S3's atomicity; the code under test is unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from flywheel import storage
from flywheel.registry.registry import PromotionConflict, Registry, RegistryError
from flywheel.storage import Store

from conftest import REPO

PROMOTE = r"""
import sys
from flywheel.registry.registry import PromotionConflict, Registry
from flywheel.storage import Store
registry = Registry(Store(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
try:
    registry.promote("a", sys.argv[2], expected=None)
    print("won", flush=True)
except PromotionConflict:
    print("conflict", flush=True)
"""

# A writer that stops inside its compare+rename (between the version check and os.replace) until told to go on.
SLOW_PROMOTE = r"""
import os, sys
from flywheel.registry.registry import Registry
from flywheel.storage import Store
replace = os.replace
def held(src, dst):
    print("holding", flush=True)
    sys.stdin.readline()
    replace(src, dst)
os.replace = held
Registry(Store(sys.argv[1])).promote("a", "v1", expected=None)
print("done", flush=True)
"""


def _adapter(tmp_path, name: str, mark: int = 0) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"mark": mark}))
    return str(d)


def _child(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _expect(proc: subprocess.Popen, line: str) -> None:
    got = proc.stdout.readline().strip()
    if got != line:
        proc.kill()
        raise AssertionError(f"child said {got!r}, expected {line!r}: {proc.stderr.read()[-2000:]}")


# -- the primitives ------------------------------------------------------------------------------------------
def test_conditional_writes_create_once_and_replace_only_the_version_read(home_uri):
    store = Store(home_uri)
    assert store.read_json_versioned("registry/x.json") == (None, None)
    assert store.write_json_if("registry/x.json", {"n": 1}, None)
    assert not store.write_json_if("registry/x.json", {"n": 2}, None)  # exists now
    obj, token = store.read_json_versioned("registry/x.json")
    assert obj == {"n": 1} and token
    assert store.write_json_if("registry/x.json", {"n": 3}, token)
    assert not store.write_json_if("registry/x.json", {"n": 4}, token)  # the version read is gone
    obj, newer = store.read_json_versioned("registry/x.json")
    assert obj == {"n": 3} and newer != token
    store.remove("registry/x.json")
    assert not store.write_json_if("registry/x.json", {"n": 5}, newer)  # replace-if-unchanged of a deleted one
    assert store.read_json("registry/x.json") is None


def test_a_refused_put_that_already_holds_our_bytes_counts_as_written(s3_home):
    """A PUT retried by botocore after a lost response is refused (412) although the first one landed."""
    store = Store(s3_home)
    store.write_json("registry/x.json", {"n": 1})  # as if our first attempt had landed
    assert store.write_json_if("registry/x.json", {"n": 1}, None)
    assert not store.write_json_if("registry/x.json", {"n": 2}, None)


# -- the registry under racing writers ---------------------------------------------------------------------
def test_registry_flow_is_the_same_on_both_homes(home_uri, tmp_path):
    reg = Registry(Store(home_uri))
    v1 = reg.register("a", _adapter(tmp_path, "x1"), {"dataset_version": "d1"})
    v2 = reg.register("a", _adapter(tmp_path, "x2"), {"dataset_version": "d2"})
    assert (v1["version"], v2["version"]) == ("v1", "v2") and reg.get("a", "latest")["version"] == "v2"
    reg.promote("a", "v1", expected=None)
    with pytest.raises(PromotionConflict):
        reg.promote("a", "v2", expected=None)
    reg.promote("a", "v2", expected="v1")
    reg.record_scores("a", "v2", {"gate": True})
    assert reg.rollback("a")["to"] == "v1" and reg.alias("a")["version"] == "v1"
    assert reg.get("a", "v2")["scores"] == {"gate": True}
    assert reg.agents() == ["a"]
    with pytest.raises(RegistryError):
        reg.promote("a", "v9")


def test_two_threads_promoting_from_the_same_expected_have_one_winner(home_uri, tmp_path):
    reg = Registry(Store(home_uri))
    for i in range(2):
        reg.register("a", _adapter(tmp_path, f"y{i}"), {})
    go, results = threading.Barrier(2), []

    def attempt(version):
        go.wait()
        try:
            reg.promote("a", version, expected=None)
            results.append(version)
        except PromotionConflict:
            results.append("conflict")

    threads = [threading.Thread(target=attempt, args=(v,)) for v in ("v1", "v2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results)[0] == "conflict" and results.count("conflict") == 1
    winner = next(r for r in results if r != "conflict")
    history = reg._load("a")["history"]
    assert reg.alias("a")["version"] == winner and [h["to"] for h in history] == [winner]


def test_two_processes_promoting_from_the_same_expected_have_one_winner(home_uri, tmp_path):
    reg = Registry(Store(home_uri))
    for i in range(2):
        reg.register("a", _adapter(tmp_path, f"z{i}"), {})
    procs = [_child(PROMOTE, home_uri, v) for v in ("v1", "v2")]
    try:
        for p in procs:
            _expect(p, "ready")
        for p in procs:  # both are parked on stdin: release them together
            p.stdin.write("go\n")
            p.stdin.flush()
        outcome = {v: p.communicate(timeout=60)[0].strip() for v, p in zip(("v1", "v2"), procs)}
    finally:
        for p in procs:
            p.kill()
    assert sorted(outcome.values()) == ["conflict", "won"], outcome
    winner = next(v for v, said in outcome.items() if said == "won")
    assert reg.alias("a")["version"] == winner and len(reg._load("a")["history"]) == 1


def test_eight_concurrent_registrations_get_eight_versions_and_the_json_is_never_torn(home_uri, tmp_path):
    store = Store(home_uri)
    reg = Registry(store)
    adapters = [_adapter(tmp_path, f"w{i}", mark=i) for i in range(8)]
    stop, seen, reader_errors = threading.Event(), [], []

    def read_all_the_time():  # a torn object would fail to parse; counts only ever grow
        try:
            while not stop.is_set():
                state = store.read_json("registry/a.json")
                seen.append(len(state["versions"]) if state else 0)
        except Exception as e:  # noqa: BLE001 - reported below
            reader_errors.append(e)

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            entries = list(pool.map(lambda i: reg.register("a", adapters[i], {"mark": i}), range(8)))
    finally:
        stop.set()
        reader.join()
    assert not reader_errors, reader_errors
    assert seen == sorted(seen) and seen
    assert sorted(e["version"] for e in entries) == sorted(f"v{n}" for n in range(1, 9))
    stored = reg.versions("a")
    assert [v["version"] for v in stored] == [f"v{n}" for n in range(1, 9)]
    for v in stored:  # each version holds the adapter its own caller uploaded
        assert json.loads(store.read_text(f"{v['adapter']}/adapter_config.json")) == {"mark": v["mark"]}


def test_a_crashed_registration_leaves_a_gap_not_a_shared_version(tmp_path):
    store = Store(str(tmp_path / "home"))
    reg = Registry(store)
    reg.register("a", _adapter(tmp_path, "c1", mark=1), {})
    assert store.write_json_if("registry/.claims/a/v2.json", {"crashed": True}, None)  # claimed, never finished
    entry = reg.register("a", _adapter(tmp_path, "c3", mark=3), {})
    assert entry["version"] == "v3" and [v["version"] for v in reg.versions("a")] == ["v1", "v3"]
    assert reg.agents() == ["a"]


# -- local: the microsecond lock is waited for, never taken over, and dies with its holder -----------------
def test_a_slow_live_writer_is_waited_for_not_interrupted(tmp_path, monkeypatch):
    home = str(tmp_path / "home")
    reg = Registry(Store(home))
    for i in range(2):
        reg.register("a", _adapter(tmp_path, f"s{i}"), {})
    slow = _child(SLOW_PROMOTE, home)
    try:
        _expect(slow, "holding")  # it has checked the version and holds the lock, rename pending
        monkeypatch.setattr(storage, "LOCK_WAIT_S", 0.3)
        with pytest.raises(RegistryError, match="held by another writer"):
            reg.promote("a", "v2", expected=None)
        assert reg.alias("a") is None  # nobody wrote past the holder
        slow.stdin.write("go\n")
        slow.stdin.flush()
        _expect(slow, "done")
        assert slow.wait(timeout=30) == 0
    finally:
        slow.kill()
    assert reg.alias("a")["version"] == "v1"  # the slow writer's promotion stands
    with pytest.raises(PromotionConflict):
        reg.promote("a", "v2", expected=None)


def test_a_writer_killed_while_holding_the_lock_leaves_no_stale_lock(tmp_path, monkeypatch):
    home = str(tmp_path / "home")
    reg = Registry(Store(home))
    for i in range(2):
        reg.register("a", _adapter(tmp_path, f"k{i}"), {})
    slow = _child(SLOW_PROMOTE, home)
    _expect(slow, "holding")
    slow.kill()  # dies inside its compare+rename
    slow.wait(timeout=30)
    monkeypatch.setattr(storage, "LOCK_WAIT_S", 5.0)
    start = time.monotonic()
    reg.promote("a", "v2", expected=None)  # the kernel released the dead holder's lock
    assert time.monotonic() - start < 2.0
    assert reg.alias("a")["version"] == "v2" and len(reg._load("a")["history"]) == 1
