"""Tenants, API keys and per-tenant rate limits for the OpenAI-compatible Serve app (pure: no Ray, no FastAPI).

    flywheel keys create --tenant acme --agents sgd_Flights,sgd_Hotels --name ci --rate-limit-rps 5 --burst 10
    flywheel keys list
    flywheel keys revoke --key-id 3f9c0a1b2d4e

A key is `fw_<key_id>_<secret>`: `key_id` (12 hex characters) names its record, so `verify` reads one small
object, never scans. Records live under the home, one object per key so that concurrent creates never clobber
each other:

    auth/keys/<key_id>.json   {"key_id", "sha256" (hex digest of the whole key), "tenant", "agents" (or ["*"]),
                               "name", "created", "revoked" (null or a time), "rate_limit_rps", "burst"}

The key itself is printed once by `create` and never stored or logged. `KeyStore.verify` caches what it read
(found or not) for `ttl_s`, so a revocation takes effect within `ttl_s` in every Serve replica. `RateLimiter` is
a token bucket per tenant; `is_loopback` is how Serve decides that running without keys is safe.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from flywheel.config import ConfigError
from flywheel.ids import check_id

log = logging.getLogger(__name__)

KEYS_DIR = "auth/keys"
KEY_PREFIX = "fw_"
ALL_AGENTS = "*"
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_MAX_KEY_CHARS = 256  # a real key is 3 + 12 + 1 + 43 characters
_MAX_NAME_CHARS = 200


# -- keys --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant a verified key belongs to and the agents it may call."""

    tenant: str
    agents: frozenset[str]
    key_id: str
    rate_limit_rps: float | None = None  # None: the server's default
    burst: int | None = None

    def may_call(self, agent: str) -> bool:
        return ALL_AGENTS in self.agents or agent in self.agents


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _parse_bearer(header: str | None) -> tuple[str, str] | None:
    """`Bearer fw_<key_id>_<secret>` -> (key_id, key); anything else -> None."""
    if not header or len(header) > _MAX_KEY_CHARS + 16:
        return None
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key.startswith(KEY_PREFIX) or len(key) > _MAX_KEY_CHARS:
        return None
    key_id, sep, secret = key[len(KEY_PREFIX):].partition("_")
    if not sep or not secret or not _KEY_ID.fullmatch(key_id):
        return None
    return key_id, key


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "sha256"}


def _check_limits(rate_limit_rps: float | None, burst: int | None) -> tuple[float | None, int | None]:
    if rate_limit_rps is not None:
        if isinstance(rate_limit_rps, bool) or not isinstance(rate_limit_rps, (int, float)) \
                or not math.isfinite(rate_limit_rps) or rate_limit_rps < 0:
            raise ValueError(f"rate_limit_rps: must be a finite number >= 0 (0: unlimited), got {rate_limit_rps!r}")
        rate_limit_rps = float(rate_limit_rps)
    if burst is not None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst: must be an integer >= 1, got {burst!r}")
    return rate_limit_rps, burst


def check_agents(agents: Any) -> list[str]:
    """A sorted, de-duplicated list of safe agent ids, or ["*"] for every agent."""
    if isinstance(agents, str):
        agents = [a for a in agents.split(",") if a]
    agents = sorted(set(agents or ()))
    if not agents:
        raise ValueError("agents: name at least one agent the key may call (or '*' for every agent)")
    if ALL_AGENTS in agents:
        if len(agents) > 1:
            raise ValueError(f"agents: '*' already means every agent; give it alone, not with {agents}")
        return [ALL_AGENTS]
    for agent in agents:
        check_id("agent id", agent)
    return agents


class KeyStore:
    """API keys under the home, stored hashed: `create`, `revoke`, `list`, `any_active`, and `verify` per request."""

    def __init__(self, store, ttl_s: float = 5.0, max_cache: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if ttl_s < 0:
            raise ValueError(f"ttl_s: must be >= 0, got {ttl_s}")
        self.store = store
        self.ttl_s = ttl_s
        self.max_cache = max(1, max_cache)
        self._clock = clock
        self._cache: collections.OrderedDict[str, tuple[float, dict | None]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def create(self, tenant: str, agents, name: str = "", rate_limit_rps: float | None = None,
               burst: int | None = None) -> tuple[str, str]:
        """A new key for `tenant` that may call `agents` (["*"]: every agent) -> (key_id, key). Show the key once."""
        check_id("tenant id", tenant)
        agents = check_agents(agents)
        if not isinstance(name, str) or len(name) > _MAX_NAME_CHARS or not name.isprintable():
            raise ValueError(f"name: printable text of at most {_MAX_NAME_CHARS} characters, got {name!r}")
        rate_limit_rps, burst = _check_limits(rate_limit_rps, burst)
        while True:  # 48 random bits: a collision is rare, and never overwrites an existing record
            key_id = secrets.token_hex(6)
            if not self.store.exists(self._rel(key_id)):
                break
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = {"key_id": key_id, "sha256": _digest(key), "tenant": tenant, "agents": agents, "name": name,
                  "created": time.time(), "revoked": None, "rate_limit_rps": rate_limit_rps, "burst": burst}
        self.store.write_json(self._rel(key_id), record)
        self._forget(key_id)
        return key_id, key

    def revoke(self, key_id: str) -> dict:
        """Revoke a key (a second revoke changes nothing) -> its record, without the hash."""
        record = self._read(key_id) if isinstance(key_id, str) and _KEY_ID.fullmatch(key_id) else None
        if record is None:
            raise KeyError(f"no API key with key_id {key_id!r} (see `flywheel keys list`)")
        if record.get("revoked") is None:
            record["revoked"] = time.time()
            self.store.write_json(self._rel(key_id), record)
        self._forget(key_id)
        return _public(record)

    def list(self) -> list[dict]:
        """Every key's record, oldest first, without the hash."""
        records = [self._read(n[:-len(".json")]) for n in self.store.list(KEYS_DIR)
                   if n.endswith(".json") and _KEY_ID.fullmatch(n[:-len(".json")])]
        return sorted((_public(r) for r in records if r), key=lambda r: (r.get("created") or 0, r["key_id"]))

    def any_active(self) -> bool:
        return any(r.get("revoked") is None for r in self.list())

    def verify(self, authorization_header: str | None) -> Principal | None:
        """The `Principal` of a valid, unrevoked key in an `Authorization: Bearer ...` header, else None."""
        parsed = _parse_bearer(authorization_header)
        if parsed is None:
            return None
        key_id, key = parsed
        record = self._lookup(key_id)
        if record is None or record.get("revoked") is not None:
            return None
        if not hmac.compare_digest(str(record.get("sha256", "")), _digest(key)):
            return None
        return Principal(tenant=record["tenant"], agents=frozenset(record["agents"]), key_id=key_id,
                         rate_limit_rps=record.get("rate_limit_rps"), burst=record.get("burst"))

    # -- internals ---------------------------------------------------------------------------------------------
    @staticmethod
    def _rel(key_id: str) -> str:
        return f"{KEYS_DIR}/{key_id}.json"

    def _read(self, key_id: str) -> dict | None:
        """The stored record, or None when missing or malformed (a malformed record never authenticates)."""
        try:
            record = self.store.read_json(self._rel(key_id))
        except (ValueError, OSError) as e:
            log.warning("API key record %s is unreadable (%s): treated as unknown", key_id, type(e).__name__)
            return None
        if record is None:
            return None
        if not isinstance(record, dict) or record.get("key_id") != key_id or not isinstance(record.get("tenant"), str) \
                or not isinstance(record.get("agents"), list) or not isinstance(record.get("sha256"), str):
            log.warning("API key record %s is malformed: treated as unknown", key_id)
            return None
        return record

    def _lookup(self, key_id: str) -> dict | None:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key_id)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key_id)
                return hit[1]
        record = self._read(key_id)  # outside the lock: a slow store must not serialise every request
        with self._lock:
            self._cache[key_id] = (now + self.ttl_s, record)
            self._cache.move_to_end(key_id)
            while len(self._cache) > self.max_cache:
                self._cache.popitem(last=False)
        return record

    def _forget(self, key_id: str) -> None:
        with self._lock:
            self._cache.pop(key_id, None)


# -- rate limits -------------------------------------------------------------------------------------------------

class RateLimiter:
    """A token bucket per tenant: `rps` tokens a second, at most `burst` saved up; thread-safe, bounded memory.

    `acquire` -> 0.0 when the request may go now, else the seconds until a token is free (round it up for a
    `Retry-After` header). A bucket idle long enough to be full is the same as a fresh one, so idle buckets are
    dropped; past `max_tenants` the least recently used bucket is dropped too.
    """

    def __init__(self, rps: float, burst: int, max_tenants: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.rps, self.burst = self._params(rps, burst)
        self.max_tenants = max(1, max_tenants)
        self._clock = clock
        # tenant -> [tokens, last refill, rps, burst]
        self._buckets: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _params(rps: float, burst: int | None) -> tuple[float, int]:
        if isinstance(rps, bool) or not isinstance(rps, (int, float)) or math.isnan(rps):
            raise ValueError(f"rps: expected a number (<= 0: unlimited), got {rps!r}")
        rps = float(rps)
        if rps <= 0 or math.isinf(rps):
            return 0.0, 0
        if burst is None or burst < 1:
            burst = max(1, math.ceil(rps))
        return rps, int(burst)

    def acquire(self, tenant: str, rps: float | None = None, burst: int | None = None) -> float:
        rate, cap = self._params(self.rps if rps is None else rps, self.burst if burst is None else burst)
        if rate <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            self._evict_idle(now)
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = [float(cap), now, rate, float(cap)]
                while len(self._buckets) > self.max_tenants:
                    self._buckets.popitem(last=False)
            self._buckets.move_to_end(tenant)
            tokens = min(float(cap), bucket[0] + (now - bucket[1]) * rate)
            bucket[1:] = [now, rate, float(cap)]  # a key's own limits apply from its next request on
            if tokens >= 1.0:
                bucket[0] = tokens - 1.0
                return 0.0
            bucket[0] = tokens
            return (1.0 - tokens) / rate

    def _evict_idle(self, now: float, at_most: int = 8) -> None:
        """Drop least-recently-used buckets that have refilled: a full bucket is the same as no bucket."""
        for _ in range(at_most):
            if not self._buckets:
                return
            tenant, (tokens, last, rate, cap) = next(iter(self._buckets.items()))
            if tokens + (now - last) * rate < cap:
                return
            del self._buckets[tenant]

    def __len__(self) -> int:
        return len(self._buckets)


# -- where serving without keys is safe --------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also `[::1]` and IPv4-mapped loopback) and `localhost`; 0.0.0.0 is not."""
    host = (host or "").strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


# -- `flywheel keys` ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeysConfig:
    """`flywheel keys create|revoke|list`: API keys for the Serve app (a tenant and the agents it may call)."""

    action: str = "list"  # create | revoke | list
    tenant: str = ""  # create
    agents: tuple[str, ...] = ()  # create: agent ids, or "*" for every agent
    key_id: str = ""  # revoke
    name: str = ""  # create: a label for people (`ci`, `acme-prod`)
    rate_limit_rps: float = 0.0  # create: this key's requests/s for its tenant; 0: the server's default
    burst: int = 0  # create: requests that may go at once; 0: the server's default
    home: str = ""  # FLYWHEEL_HOME when empty

    def __post_init__(self):
        if self.action not in ("create", "revoke", "list"):
            raise ConfigError(f"action: expected create, revoke or list, got {self.action!r}")
        if self.action == "create":
            if not self.tenant:
                raise ConfigError("tenant: `flywheel keys create` needs --tenant")
            if not self.agents:
                raise ConfigError("agents: `flywheel keys create` needs --agents (comma-separated, or '*')")
            try:
                check_id("tenant id", self.tenant)
                check_agents(self.agents)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.action == "revoke" and not self.key_id:
            raise ConfigError("key_id: `flywheel keys revoke` needs --key-id (see `flywheel keys list`)")
        if not math.isfinite(self.rate_limit_rps) or self.rate_limit_rps < 0:
            raise ConfigError(f"rate_limit_rps: must be >= 0 (0: the server's default), got {self.rate_limit_rps}")
        if self.burst < 0:
            raise ConfigError(f"burst: must be >= 0 (0: the server's default), got {self.burst}")


def run_keys(cfg: KeysConfig) -> dict:
    from flywheel.storage import Store

    store = Store(cfg.home or None)
    keys = KeyStore(store)
    if cfg.action == "create":
        key_id, key = keys.create(cfg.tenant, list(cfg.agents), cfg.name, rate_limit_rps=cfg.rate_limit_rps or None,
                                  burst=cfg.burst or None)
        print("flywheel keys: store this key now; it is not saved and cannot be shown again", file=sys.stderr)
        return {"home": store.uri, "key": key, **_public(keys._read(key_id))}
    if cfg.action == "revoke":
        return {"home": store.uri, **keys.revoke(cfg.key_id)}
    return {"home": store.uri, "keys": keys.list()}


__all__ = ["KeyStore", "Principal", "RateLimiter", "is_loopback", "check_agents", "KeysConfig", "run_keys",
           "KEYS_DIR", "ALL_AGENTS"]
