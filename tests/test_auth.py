"""API keys, tenants and rate limits (flywheel.serve.auth): pure, no Ray.

    pytest tests/test_auth.py
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from flywheel.serve.auth import KEYS_DIR, KeyStore, Principal, RateLimiter, is_loopback
from flywheel.storage import Store


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def home(tmp_path):
    return str(tmp_path / "home")


@pytest.fixture
def keys(home):
    return KeyStore(Store(home))


def test_create_then_verify_gives_the_principal(keys):
    key_id, key = keys.create("acme", ["sgd_Flights", "sgd_Hotels"], name="ci", rate_limit_rps=5, burst=10)
    assert len(key_id) == 12 and int(key_id, 16) >= 0
    assert key.startswith(f"fw_{key_id}_") and len(key) > 40
    principal = keys.verify(f"Bearer {key}")
    assert principal == Principal("acme", frozenset({"sgd_Flights", "sgd_Hotels"}), key_id, 5.0, 10)
    assert keys.verify(f"bearer   {key}  ") == principal  # the scheme is case-insensitive
    assert key not in repr(principal)


def test_wrong_unknown_and_malformed_keys_are_refused(keys):
    key_id, key = keys.create("acme", ["*"])
    other = KeyStore(keys.store).create("acme", ["*"])[1]
    wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for header in [None, "", key, f"Basic {key}", f"Bearer {wrong_secret}", "Bearer fw_", f"Bearer fw_{key_id}_",
                   "Bearer fw_000000000000_abc", "Bearer fw_../../x_abc", f"Bearer fw_{key_id.upper()}_{key[16:]}",
                   f"Bearer {key[:3]}{other[3:15]}{key[15:]}", "Bearer " + "x" * 10_000]:
        assert keys.verify(header) is None, header
    assert keys.verify(f"Bearer {key}") is not None


def test_the_store_holds_a_hash_never_the_key(keys, home):
    key_id, key = keys.create("acme", ["sgd_Flights"], name="ci")
    path = os.path.join(home, KEYS_DIR, f"{key_id}.json")
    text = open(path).read()
    record = json.loads(text)
    assert key not in text and key.split("_", 2)[2] not in text
    assert set(record) == {"key_id", "sha256", "tenant", "agents", "name", "created", "revoked", "rate_limit_rps",
                           "burst"}
    assert record["tenant"] == "acme" and record["agents"] == ["sgd_Flights"] and record["revoked"] is None
    assert record["rate_limit_rps"] is None and record["burst"] is None
    listed = keys.list()
    assert [r["key_id"] for r in listed] == [key_id] and "sha256" not in listed[0]


def test_revocation_takes_effect_within_the_ttl(home):
    clock = Clock()
    serving = KeyStore(Store(home), ttl_s=5.0, clock=clock)  # a Serve replica
    admin = KeyStore(Store(home))  # `flywheel keys revoke` in another process
    key_id, key = admin.create("acme", ["*"])
    assert serving.verify(f"Bearer {key}") is not None
    assert admin.any_active()
    revoked = admin.revoke(key_id)
    assert revoked["revoked"] is not None and "sha256" not in revoked
    assert serving.verify(f"Bearer {key}") is not None  # cached for up to ttl_s
    clock.t += 5.01
    assert serving.verify(f"Bearer {key}") is None
    assert admin.revoke(key_id)["revoked"] == revoked["revoked"]  # idempotent
    assert not admin.any_active()
    with pytest.raises(KeyError, match="no API key"):
        admin.revoke("0123456789ab")
    with pytest.raises(KeyError, match="no API key"):
        admin.revoke("../../etc")


def test_lookups_are_cached_found_or_not_and_the_cache_is_bounded(home, monkeypatch):
    clock = Clock()
    serving = KeyStore(Store(home), ttl_s=5.0, max_cache=3, clock=clock)
    reads = []
    read_json = serving.store.read_json
    monkeypatch.setattr(serving.store, "read_json", lambda rel, *a: reads.append(rel) or read_json(rel, *a))
    for _ in range(3):
        assert serving.verify("Bearer fw_abcdefabcdef_whatever") is None
    assert len(reads) == 1  # the negative result was cached
    clock.t += 5.01
    assert serving.verify("Bearer fw_abcdefabcdef_whatever") is None and len(reads) == 2
    for i in range(6):
        serving.verify(f"Bearer fw_{i:012x}_x")
    assert len(serving._cache) == 3
    key_id, key = KeyStore(Store(home)).create("acme", ["*"])
    assert serving.verify(f"Bearer {key}") is not None  # a new key_id was never cached


def test_create_validates_tenant_agents_and_limits(keys):
    for tenant in ["../x", "", "a/b", "a..b", " acme", "x" * 200]:
        with pytest.raises(ValueError, match="tenant"):
            keys.create(tenant, ["a"])
    for agents in [[], ["../a"], ["*", "a"], ["a b"]]:
        with pytest.raises(ValueError, match="agent"):
            keys.create("acme", agents)
    with pytest.raises(ValueError, match="rate_limit_rps"):
        keys.create("acme", ["a"], rate_limit_rps=-1)
    with pytest.raises(ValueError, match="burst"):
        keys.create("acme", ["a"], burst=0)
    with pytest.raises(ValueError, match="name"):
        keys.create("acme", ["a"], name="line\nbreak")
    assert keys.list() == []


def test_may_call():
    p = Principal("acme", frozenset({"sgd_Flights"}), "0" * 12)
    assert p.may_call("sgd_Flights") and not p.may_call("sgd_Hotels")
    star = Principal("acme", frozenset({"*"}), "0" * 12)
    assert star.may_call("sgd_Flights") and star.may_call("anything")


def test_concurrent_creates_keep_every_key(keys):
    made = []
    threads = [threading.Thread(target=lambda: made.append(keys.create("acme", ["a"]))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["key_id"] for r in keys.list()) == sorted(k for k, _ in made)
    assert all(keys.verify(f"Bearer {key}") for _, key in made)


# --- rate limits ------------------------------------------------------------------------------------------
def test_rate_limiter_allows_a_burst_then_says_when_to_retry():
    clock = Clock()
    limiter = RateLimiter(rps=2.0, burst=3, clock=clock)
    assert [limiter.acquire("acme") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("acme")
    assert wait == pytest.approx(0.5)
    assert limiter.acquire("other") == 0.0  # tenants do not share a bucket
    clock.t += 0.25
    assert limiter.acquire("acme") == pytest.approx(0.25)
    clock.t += 0.25
    assert limiter.acquire("acme") == 0.0  # refilled one token
    assert limiter.acquire("acme") > 0
    clock.t += 100
    assert [limiter.acquire("acme") for _ in range(3)] == [0.0, 0.0, 0.0]  # refills up to the burst, no more
    assert limiter.acquire("acme") > 0


def test_rate_limiter_per_key_limits_and_unlimited():
    clock = Clock()
    limiter = RateLimiter(rps=0, burst=0, clock=clock)  # the server default: unlimited
    assert all(limiter.acquire("acme") == 0.0 for _ in range(100))
    assert [limiter.acquire("acme", rps=1.0, burst=2) for _ in range(3)][-1] == pytest.approx(1.0)
    limiter = RateLimiter(rps=1.0, burst=1, clock=clock)
    assert all(limiter.acquire("big", rps=0) == 0.0 for _ in range(10))  # a key without a limit
    with pytest.raises(ValueError, match="rps"):
        RateLimiter(rps=float("nan"), burst=1)


def test_rate_limiter_memory_is_bounded():
    clock = Clock()
    limiter = RateLimiter(rps=10.0, burst=1, max_tenants=50, clock=clock)
    for i in range(1000):
        limiter.acquire(f"t{i}")
    assert len(limiter) <= 50
    clock.t += 10  # every bucket refilled: idle buckets go
    for i in range(20):
        limiter.acquire("busy")
    assert len(limiter) == 1  # each acquire drops up to 8 refilled buckets


def test_rate_limiter_is_thread_safe():
    limiter = RateLimiter(rps=1e-6, burst=100)  # effectively no refill during the test
    allowed = []
    lock = threading.Lock()

    def hammer():
        n = sum(limiter.acquire("acme") == 0.0 for _ in range(50))
        with lock:
            allowed.append(n)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 100


def test_is_loopback():
    for host in ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]:
        assert is_loopback(host), host
    for host in ["0.0.0.0", "::", "10.0.0.1", "192.168.1.5", "example.com", "", "localhost.evil.com", "128.0.0.1"]:
        assert not is_loopback(host), host


# --- `flywheel keys` --------------------------------------------------------------------------------------
def test_cli_keys_create_list_revoke(home, capsys):
    from flywheel.cli import main

    assert main(["keys", "create", "--tenant", "t1", "--agents", "a,b", "--name", "ci", "--rate-limit-rps", "5",
                 "--burst", "10", "--home", home, "--json"]) == 0
    out, err = capsys.readouterr()
    created = json.loads(out)
    key, key_id = created["key"], created["key_id"]
    assert key.startswith(f"fw_{key_id}_") and "cannot be shown again" in err and "sha256" not in created
    assert created["tenant"] == "t1" and created["agents"] == ["a", "b"]
    assert created["rate_limit_rps"] == 5.0 and created["burst"] == 10
    assert KeyStore(Store(home)).verify(f"Bearer {key}").tenant == "t1"

    assert main(["keys", "--home", home, "--json"]) == 0  # list is the default action
    out, _ = capsys.readouterr()
    listed = json.loads(out)["keys"]
    assert [k["key_id"] for k in listed] == [key_id]
    assert key not in out and key.split("_", 2)[2] not in out and "sha256" not in out

    assert main(["keys", "revoke", "--key-id", key_id, "--home", home]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out)["revoked"] is not None and key not in out and "sha256" not in out
    assert KeyStore(Store(home)).verify(f"Bearer {key}") is None


def test_cli_keys_errors_exit_2_with_a_message(home, capsys):
    from flywheel.cli import main

    assert main(["keys", "create", "--tenant", "../x", "--agents", "a", "--home", home]) == 2
    assert "tenant" in capsys.readouterr().err
    assert main(["keys", "create", "--tenant", "t1", "--home", home]) == 2
    assert "agents" in capsys.readouterr().err
    assert main(["keys", "revoke", "--home", home]) == 2
    assert "key_id" in capsys.readouterr().err
    assert main(["keys", "revoke", "--key-id", "0123456789ab", "--home", home, "--json"]) == 2
    assert "no API key" in json.loads(capsys.readouterr().out)["error"]
    assert main(["keys", "rotate", "--home", home]) == 2
    assert "action" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(home, KEYS_DIR))
