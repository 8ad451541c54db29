"""Catalog benchmark: `/v1/models` and routing look-ups with 10,000 registered agents, against the previous way.

    .venv/bin/python bench/catalog.py                          # the catalog functions only: ~30 s, no Ray
    .venv/bin/python bench/catalog.py --http                   # also through the real app over HTTP (tiny model)
    .venv/bin/python bench/catalog.py --agents 10000 --calls 500

It writes `--agents` agents into a temporary home in the layouts the code uses (`registry/<agent>.json` as
`flywheel.registry.Registry` writes it, `agents/<agent>.json` as ingest does, a drift route for 1 in 100) and times:

- the Ingress's catalog (`flywheel.serve.catalog`): its first load, an idle refresh, a refresh after 10
  promotions, then per call: the `/v1/models` answer (the listing filtered by a `*` key and serialised) and a
  routing look-up, p50 / p99 over `--calls` calls;
- the previous code, inlined here as it was: `list_agents` (listings of `registry/` and `agents/`) behind
  `/v1/models` and `resolve_route` (three file reads) behind every routing look-up, each run once per
  `routing_ttl_s` per Ingress replica (and per agent for routes);
- with `--http`, `GET /v1/models` and `GET /v1/models/<agent>` through the real app (Ray Serve, a tiny random
  student, auth off) over HTTP, p50 / p99.

Results go to bench/figures/catalog-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # noqa: E402  (bench/results.py)


def write_home(home: str, n: int) -> list[str]:
    """n agents: every one in the catalog and the registry (even ones promoted), 1 in 100 routed to the teacher."""
    agents = [f"agent{i:05d}" for i in range(n)]
    for folder in ("registry", "agents", "routing"):
        os.makedirs(os.path.join(home, folder), exist_ok=True)
    now = time.time()
    for i, agent in enumerate(agents):
        registry = {"agent": agent, "aliases": {"production": "v1"} if i % 2 == 0 else {}, "history": [],
                    "versions": [{"version": "v1", "adapter": f"adapters/{agent}/v1", "created": now,
                                  "dataset_version": "bench", "base_model": "bench"}]}
        files = [("registry", registry), ("agents", {"agent": agent, "tenant": "acme", "created": now})]
        if i % 100 == 0:
            files.append(("routing", {"mode": "teacher", "reason": "drift", "since": now}))
        for folder, obj in files:
            path = os.path.join(home, folder, f"{agent}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(obj, f)
            os.replace(path + ".tmp", path)
    return agents


def quantiles(seconds: list[float]) -> dict:
    q = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50_ms": round(q[49] * 1000, 3), "p99_ms": round(q[98] * 1000, 3), "calls": len(seconds)}


def timed(fn, calls: int) -> dict:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return quantiles(seconds)


# -- the previous code (flywheel/serve/app.py before the catalog), kept here as the baseline --------------------
def before_list_agents(store) -> list[dict]:
    from flywheel.registry.registry import Registry
    from flywheel.routing import known_agents

    created: dict[str, int] = {}
    for folder, suffix in (("registry", ".json"), ("agents", ".json")):
        for e in store.fs.ls(store.path(folder), detail=True):
            name = str(e.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(suffix) and not name.startswith("."):
                created[name[: -len(suffix)]] = int(float(e.get("created") or e.get("mtime") or 0))
    known = set(known_agents(store)) | set(Registry(store).agents())
    return [{"id": a, "created": created.get(a, 0)} for a in sorted(known)]


def before_resolve_route(store, agent: str) -> tuple:
    from flywheel.registry.registry import Registry
    from flywheel.routing import TEACHER, get_route

    catalog = store.read_json(f"agents/{agent}.json")
    if catalog is None and not store.exists(f"registry/{agent}.json"):
        return None
    if get_route(store, agent).get("mode") == TEACHER:
        return (TEACHER, None)
    entry = Registry(store).alias(agent)
    return ("teacher", None) if entry is None else ("student", f"{agent}@{entry['version']}")


# -- the catalog ----------------------------------------------------------------------------------------------
def bench_catalog(store, agents: list[str], calls: int) -> dict:
    from flywheel.serve.catalog import Catalog, route_of

    catalog = Catalog(store, refresh_s=0.0)
    start = time.perf_counter()
    catalog.refresh()
    first = time.perf_counter() - start
    time.sleep(1.1)  # let the folders go quiet: an idle refresh then checks folder stamps only
    catalog.refresh()
    idle = timed(catalog.refresh, calls)
    promoted = random.Random(1).sample(agents[1::2], 10)  # odd agents have no production yet
    for agent in promoted:
        path = store.path(f"registry/{agent}.json")
        state = json.load(open(path))
        state["aliases"]["production"] = "v1"
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)
    start = time.perf_counter()
    changed = catalog.refresh()
    after_promotions = time.perf_counter() - start
    assert changed == set(promoted) and sorted(catalog.take_promoted()) == sorted(promoted), changed

    def models() -> bytes:
        entries = catalog.snapshot.listing()
        return json.dumps({"object": "list", "data": [{"id": e.agent, "object": "model", "created": e.created,
                                                       "owned_by": "flywheel"} for e in entries]}).encode()

    pick = random.Random(2)
    return {"first_load_s": round(first, 3), "idle_refresh": idle, "refresh_after_10_promotions_s":
            round(after_promotions, 4), "models_answer": timed(models, calls), "models_bytes": len(models()),
            "route_lookup": timed(lambda: route_of(catalog.snapshot.get(pick.choice(agents))), calls)}


def bench_before(store, agents: list[str], calls: int) -> dict:
    pick = random.Random(3)
    return {"list_agents": timed(lambda: before_list_agents(store), max(5, calls // 20)),
            "resolve_route": timed(lambda: before_resolve_route(store, pick.choice(agents)), calls)}


# -- over HTTP ---------------------------------------------------------------------------------------------------
def bench_http(home: str, agents: list[str], calls: int, student: str) -> dict:
    import httpx
    import ray

    from flywheel.config import ServeConfig
    from flywheel.models import build_tiny
    from flywheel.serve.app import run, shutdown

    tiny = build_tiny(tempfile.mkdtemp(prefix="flywheel-bench-tiny-"), tokenizer_from=student)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    url = run(ServeConfig(home=home, base_model=tiny, port=port, auth="off", replica_cpus=0.5, rate_limit_rps=0,
                          teacher_url=""), ready_timeout_s=300)
    ready = time.perf_counter() - start
    pick = random.Random(4)
    try:
        with httpx.Client(timeout=60) as client:
            assert len(client.get(f"{url}/models").json()["data"]) == len(agents)
            models = timed(lambda: client.get(f"{url}/models").raise_for_status(), calls)
            one = timed(lambda: client.get(f"{url}/models/{pick.choice(agents)}").raise_for_status(), calls)
    finally:
        shutdown()
        ray.shutdown()
    return {"app_ready_s": round(ready, 1), "models": models, "model": one}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=10_000)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--http", action="store_true", help="also time the real app over HTTP (starts Ray, tiny model)")
    p.add_argument("--base-model", default=os.environ.get("FLYWHEEL_STUDENT",
                                                          os.path.join(REPO, "models", "smollm2-135m-instruct")),
                   help="the tokenizer of the tiny student (--http)")
    args = p.parse_args()

    from flywheel.storage import Store

    home = tempfile.mkdtemp(prefix="flywheel-bench-catalog-")
    start = time.perf_counter()
    agents = write_home(home, args.agents)
    print(f"{len(agents)} agents written in {time.perf_counter() - start:.1f}s: {home}", flush=True)
    store = Store(home)
    out = {"config": vars(args), "catalog": bench_catalog(store, agents, args.calls),
           "before": bench_before(store, agents, args.calls)}
    print(json.dumps(out["catalog"]), json.dumps(out["before"]), sep="\n", flush=True)
    if args.http:
        out["http"] = bench_http(home, agents, args.calls, args.base_model)
        print(json.dumps(out["http"]), flush=True)
    c, b = out["catalog"], out["before"]
    print(f"\n{len(agents)} agents | p50 / p99 over {args.calls} calls")
    print("| what | catalog (now) | before |")
    print("|---|---|---|")
    print(f"| /v1/models answer (listing + JSON) | {c['models_answer']['p50_ms']} / {c['models_answer']['p99_ms']} ms "
          f"| list_agents alone: {b['list_agents']['p50_ms']} / {b['list_agents']['p99_ms']} ms |")
    print(f"| routing look-up | {c['route_lookup']['p50_ms']} / {c['route_lookup']['p99_ms']} ms | resolve_route: "
          f"{b['resolve_route']['p50_ms']} / {b['resolve_route']['p99_ms']} ms |")
    print(f"| idle refresh (every routing_ttl_s) | {c['idle_refresh']['p50_ms']} / {c['idle_refresh']['p99_ms']} ms "
          f"| - |")
    print(f"first load {c['first_load_s']} s; refresh after 10 promotions {c['refresh_after_10_promotions_s']} s; "
          f"/v1/models body {c['models_bytes']:,} bytes")
    if args.http:
        h = out["http"]
        print(f"over HTTP (Serve proxy -> Ingress): GET /v1/models {h['models']['p50_ms']} / {h['models']['p99_ms']}"
              f" ms, GET /v1/models/<agent> {h['model']['p50_ms']} / {h['model']['p99_ms']} ms")
    results.save("catalog", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
