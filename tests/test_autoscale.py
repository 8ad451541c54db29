"""Autoscaling fed by drift and the Serve catalog: the pure parts without Ray, then one run on the shared local Ray.

    .venv/bin/python -m pytest tests/test_autoscale.py -q -k "not on_ray"    # the pure parts: seconds, no Ray
    .venv/bin/python -m pytest tests/test_autoscale.py -q -k on_ray          # drift -> TeacherProxy replicas

The policy tests run the policy the way the Serve controller does: built from the same `autoscaling_config`,
unpickled by value through Serve's `AutoscalingPolicy`, wrapped by Serve's own delay-and-bounds logic, and called
with real `AutoscalingContext` objects.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time

import pytest

from flywheel.config import ConfigError, ServeConfig
from flywheel.registry.registry import Registry
from flywheel.routing import STUDENT, TEACHER, register_agent, set_route
from flywheel.serve.autoscale import (INGRESS, FlywheelPolicy, Traffic, TrafficWindow, autoscaling_config, combine,
                                      desired_replicas, hot_agents, latest_reports, read_report, report)
from flywheel.serve.catalog import Catalog, route_of
from flywheel.storage import Store


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the figures ------------------------------------------------------------------------------------------------
def test_traffic_window_counts_rates_and_answer_times_over_the_window():
    clock = Clock()
    window = TrafficWindow(10.0, clock)
    for _ in range(30):
        window.arrived("busy")
    for _ in range(10):
        window.arrived("quiet")
    window.answered(STUDENT, 0.2)
    window.answered(STUDENT, 0.4)
    clock.now += 10.0  # a full window old replica: rates are counts / window
    assert window.rates() == pytest.approx({"busy": 3.0, "quiet": 1.0})
    assert window.latency() == pytest.approx({STUDENT: 0.3})
    clock.now += 11.0  # everything has left the window
    assert window.rates() == {} and window.latency() == {}


def test_report_reads_back_into_the_same_traffic():
    rates = {"a": 6.0, "b": 3.0, "c": 0.5, "d": 0.5}
    routes = {"a": (TEACHER, True), "b": (STUDENT, False), "c": (TEACHER, False), "d": (TEACHER, True)}
    figures = report(rates, routes, {TEACHER: 2.0}, top=2)
    assert figures["rate"] == 10.0 and figures["share/a"] == 0.6 and figures["teacher/a"] == 1.0
    assert "share/c" not in figures and figures["rest/share"] == pytest.approx(0.1)  # c and d together
    assert figures["rest/teacher"] == pytest.approx(0.1) and figures["rest/drift"] == pytest.approx(0.05)
    traffic = read_report(figures)
    assert traffic.teacher_rate == pytest.approx(7.0) and traffic.drift_rate == pytest.approx(6.5)
    assert traffic.student_rate == pytest.approx(3.0) and traffic.latency == {TEACHER: 2.0}
    both = combine([traffic, read_report(report({"b": 1.0}, routes, {STUDENT: 0.5}, top=2))])
    assert both.rate == 11.0 and both.teacher_rate == pytest.approx(7.0) and both.latency == {TEACHER: 2.0,
                                                                                             STUDENT: 0.5}


def test_hot_agents_are_the_busiest_the_student_answers():
    rates = {"a": 5.0, "b": 9.0, "c": 7.0, "d": 1.0, "e": 7.0}
    routes = {"a": (STUDENT, False), "b": (TEACHER, True), "c": (STUDENT, False), "d": (STUDENT, False),
              "e": (STUDENT, False)}
    assert hot_agents(rates, routes, 3) == ["c", "e", "a"]  # b is on the teacher; ties by name
    assert hot_agents(rates, routes, 0) == [] and hot_agents({}, {}, 4) == []


def test_latest_reports_drop_keys_missing_from_the_newest_report():
    from ray.serve._private.common import TimeStampedValue as P

    raw = {"rate": {"r1": [P(1.0, 4.0), P(2.0, 5.0)], "r2": [P(2.5, 1.0)]},
           "share/old": {"r1": [P(1.0, 1.0)]},  # only in r1's older report: its busiest agent changed since
           "share/new": {"r1": [P(2.0, 1.0)], "r2": [P(2.5, 1.0)]}}
    reports = sorted(latest_reports(raw), key=lambda r: r["rate"])
    assert reports == [{"rate": 1.0, "share/new": 1.0}, {"rate": 5.0, "share/new": 1.0}]


# -- the decision -------------------------------------------------------------------------------------------------
def test_drift_raises_the_teacher_and_shrinks_the_student_a_promotion_reverses_it():
    before = Traffic(rate=20.0, teacher_rate=2.0, latency={STUDENT: 0.5, TEACHER: 2.0})
    drift = Traffic(rate=20.0, teacher_rate=18.0, drift_rate=16.0, latency={STUDENT: 0.5, TEACHER: 2.0})
    # teacher: rate x answer time / target ongoing (Little's law) before any request queues (ongoing 1)
    assert desired_replicas(TEACHER, before, 1, target=4, latency_s=9) == pytest.approx(1.0)
    assert desired_replicas(TEACHER, drift, 1, target=4, latency_s=9) == pytest.approx(9.0)
    assert desired_replicas(STUDENT, before, 9, target=2, latency_s=9) == pytest.approx(4.5)
    assert desired_replicas(STUDENT, drift, 0, target=2, latency_s=9) == pytest.approx(0.5)
    # a promotion: back to `before`; the queue never rules out the load it still sees
    assert desired_replicas(TEACHER, before, 30, target=4, latency_s=9) == pytest.approx(7.5)
    # no teacher answer time measured yet: the configured one
    assert desired_replicas(TEACHER, Traffic(rate=10.0, teacher_rate=10.0), 0, target=5, latency_s=3) == 6.0
    assert desired_replicas(INGRESS, drift, 100, target=50, latency_s=1) == 2.0
    assert desired_replicas(TEACHER, None, 8, target=4, latency_s=1) == 2.0  # no figures: the load alone


def _context(name: str, policy_state: dict, *, current: int, target: int, ongoing: float, raw=None, config=None,
             now: float = 0.0):
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingContext

    return AutoscalingContext(
        deployment_id=DeploymentID(name=name, app_name="app"), deployment_name=name, app_name="app",
        current_num_replicas=current, target_num_replicas=target, running_replicas=[], total_num_requests=ongoing,
        total_queued_requests=0.0, aggregated_metrics={}, raw_metrics=raw or {}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state=policy_state, last_scale_up_time=None,
        last_scale_down_time=None, current_time=now or time.time(), config=config)


def _serve_policy(cfg: ServeConfig, role: str):
    """The policy as Serve's controller builds it: unpickled by value, instantiated with its kwargs, wrapped."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig(**autoscaling_config(cfg, role))
    return _apply_autoscaling_config(_resolve_policy_callable(config.policy)), config


def test_the_policy_as_serve_runs_it_follows_a_drift_route():
    from ray.serve._private.common import TimeStampedValue as P

    cfg = ServeConfig(teacher_min_replicas=1, teacher_max_replicas=8, teacher_target_ongoing_requests=2,
                      teacher_upscale_delay_s=0, teacher_latency_s=1.0, downscale_delay_s=0)
    ingress, ingress_config = _serve_policy(cfg, INGRESS)
    teacher, teacher_config = _serve_policy(cfg, TEACHER)
    assert isinstance(FlywheelPolicy("teacher"), FlywheelPolicy)  # the same class, built here by import

    def tick(figures: dict, teacher_now: int) -> int:
        now = time.time()
        raw = {k: {"ingress-1": [P(now, v)]} for k, v in figures.items()}
        ingress(_context("Ingress", {}, current=1, target=1, ongoing=1, raw=raw, config=ingress_config, now=now))
        decided, _ = teacher(_context("TeacherProxy", {}, current=teacher_now, target=teacher_now, ongoing=0,
                                      config=teacher_config, now=now))
        return decided

    on_student = report({"busy": 8.0, "quiet": 2.0}, {"busy": (STUDENT, False), "quiet": (TEACHER, False)},
                        {TEACHER: 1.0}, top=8)
    drifted = report({"busy": 8.0, "quiet": 2.0}, {"busy": (TEACHER, True), "quiet": (TEACHER, False)},
                     {TEACHER: 1.0}, top=8)
    assert tick(on_student, 1) == 1  # 2 req/s x 1 s / 2 per replica
    assert tick(drifted, 1) == 5  # 10 req/s x 1 s / 2: raised before any teacher request queued
    assert tick(on_student, 5) == 1  # promoted back (downscale_delay_s 0 here)


def test_autoscaling_config_carries_the_serve_config():
    from ray.serve.config import AutoscalingConfig

    cfg = ServeConfig(student_min_replicas=0, student_max_replicas=3, max_batch_size=4, autoscale_metrics_interval_s=1)
    student = AutoscalingConfig(**autoscaling_config(cfg, STUDENT))
    assert (student.min_replicas, student.max_replicas, student.initial_replicas) == (0, 3, 1)
    assert student.target_ongoing_requests == 8.0 and student.downscale_to_zero_delay_s == 900.0
    assert student.metrics_interval_s == 1 and student.policy.policy_kwargs["role"] == STUDENT
    pinned = AutoscalingConfig(**autoscaling_config(ServeConfig(num_replicas=2), STUDENT))
    assert pinned.min_replicas == pinned.max_replicas == 2
    teacher = AutoscalingConfig(**autoscaling_config(ServeConfig(), TEACHER))
    assert teacher.upscale_delay_s == 1.0 and teacher.downscale_delay_s == 300.0
    assert "metrics_interval_s" not in autoscaling_config(ServeConfig(), TEACHER)  # Serve's default: not passed


@pytest.mark.parametrize("change, key", [
    ({"engine": "trt"}, "engine"),
    ({"ingress_min_replicas": 0}, "ingress_min_replicas"),
    ({"student_min_replicas": 3, "student_max_replicas": 2}, "student_min_replicas"),
    ({"teacher_max_replicas": 0, "teacher_min_replicas": 0}, "teacher_min_replicas"),
    ({"teacher_latency_s": 0}, "teacher_latency_s"),
    ({"downscale_delay_s": -1}, "downscale_delay_s"),
    ({"autoscale_top_agents": 0}, "autoscale_top_agents"),
])
def test_serve_config_refuses_scaling_that_cannot_work(change, key):
    with pytest.raises(ConfigError, match=key):
        ServeConfig(**change)


def test_vllm_engine_without_vllm_installed_is_a_clear_error():
    from flywheel.serve.student import _engine
    from flywheel.inference.vllm_engine import available, engine_kind

    if available():
        pytest.skip("vllm is installed in this environment")
    assert engine_kind("auto") == "hf"  # auto never picks an engine that is not there
    with pytest.raises(ConfigError, match="vllm package"):
        _engine(ServeConfig(engine="vllm"))


def test_a_student_replica_asks_for_the_gpus_it_is_given_and_its_engine_follows_them():
    from flywheel.inference.vllm_engine import available, engine_kind
    from flywheel.serve.app import student_resources
    from flywheel.serve.student import gpu_memory_share

    assert student_resources(ServeConfig(replica_cpus=2)) == {"num_cpus": 2}  # no GPU asked: none is taken
    assert student_resources(ServeConfig(replica_gpus=0.5)) == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert student_resources(ServeConfig(replica_memory_mb=512)) == {"num_cpus": 1.0, "memory": 512 * 2**20}
    assert engine_kind("auto", gpus=0) == "hf"  # a CPU replica, whatever its node has
    assert engine_kind("auto", gpus=1) == ("vllm" if available() else "hf")
    assert engine_kind("hf", gpus=1) == "hf"
    assert gpu_memory_share(1) == gpu_memory_share(2) == 0.85 and gpu_memory_share(0.5) == pytest.approx(0.425)
    with pytest.raises(ConfigError, match="replica_gpus"):
        ServeConfig(replica_gpus=-1)
    with pytest.raises(ConfigError, match="replica_memory_mb"):
        ServeConfig(replica_memory_mb=-1)
    vllm_env = "/opt/vllm/bin/python"  # a replica in vLLM's environment: Ray starts its worker with that Python
    assert student_resources(ServeConfig(replica_python=vllm_env)) == {
        "num_cpus": 1.0, "runtime_env": {"py_executable": vllm_env}}
    with pytest.raises(ConfigError, match="replica_python: the absolute path"):
        ServeConfig(replica_python=".venv-vllm/bin/python")
    with pytest.raises(ConfigError, match="dtype"):
        ServeConfig(dtype="float16")


# -- the catalog --------------------------------------------------------------------------------------------------
def _register(store: Store, agent: str, versions: int = 1, production: str | None = "v1") -> None:
    """A registry entry in the layout `Registry` writes (no adapter files: the catalog never opens them), written
    with a rename but without `Store.write_json`'s fsync: 10,000 of them take a second, not eight."""
    state = {"agent": agent, "versions": [{"version": f"v{i}", "adapter": f"adapters/{agent}/v{i}", "created": 1.0}
                                          for i in range(1, versions + 1)],
             "aliases": {"production": production} if production else {}, "history": []}
    path = store.path(f"registry/{agent}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def test_catalog_answers_routes_and_picks_up_changes_incrementally(store):
    _register(store, "sgd_Flights")
    register_agent(store, "sgd_Flights", tenant="acme")
    register_agent(store, "sgd_Hotels", tenant="acme")  # in the catalog, no adapter: the teacher
    _register(store, "sgd_Restaurants", production=None)  # registered, never promoted
    catalog = Catalog(store, refresh_s=0.0)
    assert catalog.refresh() == {"sgd_Flights", "sgd_Hotels", "sgd_Restaurants"}
    snap = catalog.snapshot
    assert [e.agent for e in snap.listing()] == ["sgd_Flights", "sgd_Hotels", "sgd_Restaurants"]
    flights = route_of(snap.get("sgd_Flights"))
    assert (flights.backend, flights.model_id, flights.tenant) == (STUDENT, "sgd_Flights@v1", "acme")
    assert route_of(snap.get("sgd_Hotels")).backend == TEACHER and snap.get("sgd_Nope") is None
    assert snap.get("sgd_Flights").created > 0
    assert catalog.refresh() == set() and catalog.snapshot is snap  # nothing changed: nothing read, same snapshot
    assert catalog.take_promoted() == []  # the first load promotes nothing

    set_route(store, "sgd_Flights", TEACHER, "drift: window 3")  # what the drift monitor does
    assert catalog.refresh() == {"sgd_Flights"}
    assert route_of(catalog.snapshot.get("sgd_Flights")).reason == "its route is teacher: drift: window 3"
    _register(store, "sgd_Flights", versions=2, production="v2")  # a promotion ...
    set_route(store, "sgd_Flights", STUDENT, "promoted v2")  # ... routes it back
    _register(store, "sgd_Restaurants", production="v1")
    assert catalog.refresh() == {"sgd_Flights", "sgd_Restaurants"}
    assert route_of(catalog.snapshot.get("sgd_Flights")).model_id == "sgd_Flights@v2"
    assert catalog.take_promoted() == ["sgd_Flights", "sgd_Restaurants"] and catalog.take_promoted() == []
    store.remove("registry/sgd_Restaurants.json")
    assert catalog.refresh() == {"sgd_Restaurants"} and catalog.snapshot.get("sgd_Restaurants") is None


def test_catalog_with_ten_thousand_agents(store):
    """Correctness at 10,000 registered agents (the time is bench/catalog.py's business)."""
    n = 10_000
    for i in range(n):
        _register(store, f"agent{i:05d}", production="v1" if i % 2 == 0 else None)
    for i in range(0, n, 1000):
        set_route(store, f"agent{i:05d}", TEACHER, "drift")
    catalog = Catalog(store, refresh_s=0.0)
    assert len(catalog.refresh()) == n
    listing = catalog.snapshot.listing()
    assert len(listing) == n and listing[0].agent == "agent00000" and listing[-1].agent == "agent09999"
    backends = [route_of(e).backend for e in listing]
    assert backends.count(STUDENT) == n // 2 - n // 1000  # even ids are promoted, minus the drifted ones
    assert route_of(catalog.snapshot.get("agent00002")).model_id == "agent00002@v1"
    set_route(store, "agent05000", STUDENT, "promoted")
    _register(store, "agent10000")
    assert catalog.refresh() == {"agent05000", "agent10000"}
    assert len(catalog.snapshot.listing()) == n + 1 and catalog.take_promoted() == ["agent05000", "agent10000"]


def test_catalog_on_an_object_store(monkeypatch):
    """The same on S3 (a local moto server): listings with ETags, one batched read of what changed."""
    from conftest import fake_aws_credentials, moto_s3

    fake_aws_credentials(monkeypatch)
    with moto_s3("flywheel-catalog") as endpoint:
        monkeypatch.setenv("FLYWHEEL_S3_ENDPOINT", endpoint)
        store = Store("s3://flywheel-catalog/home")
        for agent in ("a1", "a2", "a3"):
            store.write_json(f"registry/{agent}.json", {"agent": agent, "versions": [{"version": "v1"}],
                                                        "aliases": {"production": "v1"}, "history": []})
        register_agent(store, "a4", tenant="acme")
        catalog = Catalog(store, refresh_s=0.0)
        assert catalog.refresh() == {"a1", "a2", "a3", "a4"} and catalog.refresh() == set()
        assert route_of(catalog.snapshot.get("a2")).model_id == "a2@v1"
        set_route(store, "a2", TEACHER, "drift")
        assert catalog.refresh() == {"a2"} and route_of(catalog.snapshot.get("a2")).backend == TEACHER
        set_route(store, "a2", STUDENT, "promoted")
        assert catalog.refresh() == {"a2"} and catalog.take_promoted() == ["a2"]


# -- on Ray: a drift event scales the TeacherProxy --------------------------------------------------------------
def _replicas(deployment: str) -> int:
    """Replicas Serve is running or starting for `deployment` (its target as `serve.status()` shows it)."""
    from ray import serve

    states = serve.status().applications["flywheel"].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) not in ("STOPPING", "STOPPED"))


def _wait_replicas(deployment: str, done, timeout_s: float) -> float:
    start = time.monotonic()
    while not done(_replicas(deployment)):
        assert time.monotonic() - start < timeout_s, f"{deployment}: {_replicas(deployment)} replicas"
        time.sleep(0.25)
    return time.monotonic() - start


def test_on_ray_drift_scales_the_teacher_proxy_and_back(ray_session, tiny_model, tmp_path):
    from ray import serve

    from flywheel.serve.app import run, shutdown
    from serving import ASK, free_port, make_adapter, start_teacher

    import httpx

    teacher, stop_teacher = start_teacher()  # sgd_Slow answers after 2 s: one request holds a replica's slot
    store = Store(str(tmp_path / "home"))
    registry = Registry(store)
    for i, agent in enumerate(["sgd_Slow", "sgd_Flights"]):
        entry = registry.register(agent, make_adapter(tiny_model, str(tmp_path / agent), seed=i),
                                  {"dataset_version": "test", "base_model": tiny_model})
        registry.promote(agent, entry["version"])
    cfg = ServeConfig(home=store.uri, base_model=tiny_model, port=free_port(), teacher_url=teacher.url,
                      replica_cpus=0.5, max_new_tokens=2, max_batch_size=4, batch_wait_s=0.02, routing_ttl_s=0.3,
                      ingress_max_replicas=1, student_max_replicas=1, teacher_min_replicas=1, teacher_max_replicas=3,
                      teacher_target_ongoing_requests=1, teacher_latency_s=2.0, teacher_upscale_delay_s=0,
                      downscale_delay_s=2, autoscale_look_back_s=2, autoscale_metrics_interval_s=0.5,
                      traffic_window_s=4)
    serve.shutdown()  # HTTP options are fixed when Serve starts: start it fresh on our port
    url = run(cfg)
    statuses, stop = [], threading.Event()

    def client(k: int) -> None:
        while not stop.is_set():
            agent = "sgd_Flights" if k == 0 else "sgd_Slow"  # sgd_Slow carries most of the traffic
            r = httpx.post(f"{url}/chat/completions", json={"model": agent, "messages": ASK, "max_tokens": 2},
                           timeout=60)
            statuses.append(r.status_code)

    pool = concurrent.futures.ThreadPoolExecutor(3)
    start = time.monotonic()
    try:
        futures = [pool.submit(client, k) for k in range(3)]
        while len(statuses) < 20:
            time.sleep(0.2)
        assert _replicas("TeacherProxy") == 1  # everything is on the student
        set_route(store, "sgd_Slow", TEACHER, "drift: test")  # as the drift monitor does
        # Two clients send sgd_Slow, so at most 2 requests are ever in flight at the teacher: load alone (ongoing /
        # target 1) cannot ask for 3 replicas. The forecast (its recent rate x 2 s / 1) does, at once.
        up = _wait_replicas("TeacherProxy", lambda n: n >= 3, timeout_s=30)
        while len(teacher.seen) < 4:  # the drifted agent's answers now come from the (slow) teacher
            assert time.monotonic() - start < 120, "no teacher traffic"
            time.sleep(0.2)
        set_route(store, "sgd_Slow", STUDENT, "promoted: test")  # a promotion routes it back
        down = _wait_replicas("TeacherProxy", lambda n: n == 1, timeout_s=45)
    finally:
        stop.set()
        for f in futures:
            f.result(timeout=90)
        pool.shutdown()
        shutdown()
        stop_teacher()
    assert set(statuses) == {200}, sorted(set(statuses))
    assert len(teacher.seen) >= 4 and all(b["model"] == "sgd_Slow" for b in teacher.seen)
    print(json.dumps({"scale_up_s": round(up, 1), "scale_down_s": round(down, 1), "requests": len(statuses),
                      "test_s": round(time.monotonic() - start, 1)}))


def test_a_hot_agent_overflows_to_a_second_student_replica(ray_session, tiny_model, tmp_path):
    """One agent's burst beyond what one replica takes (max_ongoing_requests 8) is not pinned to the replica that
    holds its adapter: Serve's multiplexed router sends the overflow to the other, which loads the adapter too."""
    from ray import serve

    from flywheel.serve.app import run, shutdown
    from serving import ASK, free_port, make_adapter

    import httpx

    store = Store(str(tmp_path / "home"))
    registry = Registry(store)
    entry = registry.register("sgd_Hot", make_adapter(tiny_model, str(tmp_path / "hot"), seed=3),
                              {"dataset_version": "test", "base_model": tiny_model})
    registry.promote("sgd_Hot", entry["version"])
    cfg = ServeConfig(home=store.uri, base_model=tiny_model, port=free_port(), num_replicas=2, replica_cpus=0.5,
                      max_new_tokens=24, max_batch_size=4, batch_wait_s=0.02, routing_ttl_s=0.3,
                      prewarm_hot_agents=0)
    serve.shutdown()
    url = run(cfg)
    try:
        _wait_replicas("StudentModel", lambda n: n == 2, timeout_s=60)

        def ask(_: int) -> tuple[int, str]:
            r = httpx.post(f"{url}/chat/completions", json={"model": "sgd_Hot", "messages": ASK, "max_tokens": 24},
                           timeout=120)
            return r.status_code, r.headers.get("x-flywheel-replica", "")

        assert ask(0)[0] == 200  # one replica now holds sgd_Hot's adapter
        with concurrent.futures.ThreadPoolExecutor(14) as pool:  # more than one replica's 8 at once
            answers = list(pool.map(ask, range(28)))
    finally:
        shutdown()
    assert {status for status, _ in answers} == {200}
    replicas = {replica for _, replica in answers}
    assert "" not in replicas and len(replicas) == 2, sorted(replicas)


def test_deferred_requests_of_a_selective_agent_load_the_teacher():
    from flywheel.serve.autoscale import TrafficWindow, read_report, report

    now = [1000.0]
    window = TrafficWindow(30.0, clock=lambda: now[0])
    for i in range(10):
        window.arrived("sgd_Flights")
        if i < 4:
            window.deferred("sgd_Flights")
        window.arrived("sgd_Hotels")
    shares = window.deferral_shares()
    assert shares == {"sgd_Flights": 0.4}
    figures = report(window.rates(), {"sgd_Flights": ("student", False), "sgd_Hotels": ("teacher", False)}, {},
                     top=5, deferred=shares)
    assert figures["teacher/sgd_Flights"] == 0.4 and figures["teacher/sgd_Hotels"] == 1.0
    assert read_report(figures).teacher_share == pytest.approx(0.5 * 0.4 + 0.5 * 1.0)
    now[0] += 60  # out of the window
    assert window.deferral_shares() == {}
