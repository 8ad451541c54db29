"""Autoscaling fed by drift: the Ingress, the student and the teacher proxy follow traffic and routes.

Every deployment of the app gets Serve's `autoscaling_config` from `ServeConfig` (`autoscaling_config` below:
min/max replicas, target ongoing requests, upscale/downscale delays, look-back) and the custom policy
`FlywheelPolicy`. The figures that drive it, and the dashboard, are the same:

1. each Ingress replica counts requests per agent over `traffic_window_s` (`TrafficWindow`) and the answer time
   of each backend; in `record_autoscaling_stats` it reads every counted agent's route from its catalog and
   returns `report(...)`: the request rate, the traffic share, route (teacher or student) and drift flag of its
   `autoscale_top_agents` busiest agents one by one and of the others together, and the measured answer times.
   The same figures are set as Ray gauges (`TrafficGauges`):

       flywheel_autoscale_request_rate                requests/s over the window (per Ingress replica)
       flywheel_autoscale_teacher_share               share of that traffic whose agent the teacher answers now
       flywheel_autoscale_drift_share                 share whose agent's route file says teacher (drift)
       flywheel_autoscale_agent_share{agent}          an agent's share (the busiest agents; metrics_per_agent)
       flywheel_autoscale_agent_teacher{agent}        1 while the teacher answers the agent, else 0

2. Serve pushes each replica's figures to its controller every `autoscale_metrics_interval_s`. There the
   Ingress's policy reads the latest report of every Ingress replica (`AutoscalingContext.raw_metrics`), adds
   them up (`combine`) and posts the app's `Traffic` on a board; the student's and the teacher proxy's policies
   read it.

3. `desired_replicas` (pure) decides, with capacity per replica = target ongoing requests / answer time (Little's
   law; the answer time is measured by the Ingress, or `student_latency_s` / `teacher_latency_s` until it is):

       teacher proxy  max(ongoing / target, rate x teacher share x teacher answer time / target)
       student        max(ongoing / target, rate x (1 - teacher share) x student answer time / target)
       Ingress        ongoing / target                                  (Serve's default rule)

   A drift event (the monitor routes an agent to the teacher, `flywheel.routing.set_route`) moves that agent's
   recent traffic from the student's rate to the teacher's as soon as the Ingress's catalog sees the route
   (`routing_ttl_s`), so the teacher proxy's target rises before its queue builds; the student's target falls
   after `downscale_delay_s` (the cool-down). A promotion does the reverse, and the Ingress asks the student to
   prewarm the promoted agents (`StudentModel.prewarm`).

Serve wraps the policy (`ray.serve.autoscaling_policy._apply_autoscaling_config`): upscale/downscale delays and
min/max bounds still apply, and a deployment at 0 replicas with queued requests starts one without asking the
policy. Cold start: with `student_min_replicas: 0` the student gives its last replica back after
`downscale_to_zero_delay_s` idle; the next request then waits, within its `request_timeout_s`, for a new Ray
worker process to start, load the base model and its adapter (not measured here for the real student; a GPU
engine adds its own start-up). `/readyz` asks the student too, so it also starts a replica, and answers 503 when
that takes longer than its 30 s. A promotion whose agent had traffic in the window starts a replica ahead of that
traffic (its forecast is above 0).

Why a board rather than one application-level policy: Ray 2.60 reads app-level policies only from a Serve config
file (`applications[].autoscaling_policy`, for `serve deploy` and RayService); `serve.run`, which `flywheel serve`
and the tests use, has no such argument. Deployment-level policies work on both paths and all run in the one
Serve controller process, so they share `_BOARD` (keyed by application). Serve pickles a policy's module by value,
so `FlywheelPolicy` imports this module by name when called and so reaches the one real board.
"""

from __future__ import annotations

import importlib
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

STUDENT, TEACHER, INGRESS = "student", "teacher", "ingress"  # the student/teacher names of flywheel.routing
ROLES = (INGRESS, STUDENT, TEACHER)
POLICY = "flywheel.serve.autoscale:FlywheelPolicy"
RATE = "rate"
SERVE_METRICS_INTERVAL_S = 10.0  # Serve's default push interval; only a different value is passed on
# ServeConfig fields that set the autoscaling of the deployments (the cluster configs carry the same values).
SCALING_FIELDS = ("num_replicas", "ingress_min_replicas", "ingress_max_replicas", "ingress_target_ongoing_requests",
                  "student_min_replicas", "student_max_replicas", "student_target_ongoing_requests",
                  "student_latency_s", "teacher_min_replicas", "teacher_max_replicas",
                  "teacher_target_ongoing_requests", "teacher_max_ongoing_requests", "teacher_replica_cpus",
                  "teacher_latency_s", "upscale_delay_s", "teacher_upscale_delay_s", "downscale_delay_s",
                  "downscale_to_zero_delay_s", "autoscale_look_back_s", "autoscale_metrics_interval_s",
                  "traffic_window_s", "autoscale_top_agents", "prewarm_hot_agents", "max_queued_requests")


# -- what one Ingress replica saw -----------------------------------------------------------------------------
class TrafficWindow:
    """Requests per agent, answer seconds per backend and requests a selective student deferred to the teacher,
    over the last `window_s`, in one-second buckets."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.window_s, self.clock = window_s, clock
        self.started = clock()
        self._buckets: deque[tuple[int, Counter, dict[str, list[float]], Counter]] = deque()

    def _bucket(self, now: float) -> tuple[int, Counter, dict[str, list[float]], Counter]:
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, Counter(), {}, Counter()))
        self._prune(now)
        return self._buckets[-1]

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + 1 <= now - self.window_s:
            self._buckets.popleft()

    def arrived(self, agent: str) -> None:
        self._bucket(self.clock())[1][agent] += 1

    def deferred(self, agent: str) -> None:
        """A request of a selective agent that the student passed to the teacher."""
        self._bucket(self.clock())[3][agent] += 1

    def deferral_shares(self) -> dict[str, float]:
        """Per agent with deferrals in the window: the share of its requests the teacher answered instead."""
        self._prune(self.clock())
        arrived, deferred = Counter(), Counter()
        for _, bucket, _, passed in self._buckets:
            arrived.update(bucket)
            deferred.update(passed)
        return {agent: min(1.0, n / arrived[agent]) for agent, n in deferred.items() if arrived[agent]}

    def answered(self, backend: str, seconds: float) -> None:
        total = self._bucket(self.clock())[2].setdefault(backend, [0.0, 0])
        total[0] += seconds
        total[1] += 1

    def rates(self) -> dict[str, float]:
        """Requests per second of each agent seen in the window (over the replica's age while it is younger)."""
        now = self.clock()
        self._prune(now)
        span = max(1.0, min(self.window_s, now - self.started))
        counts: Counter = Counter()
        for _, bucket, _, _ in self._buckets:
            counts.update(bucket)
        return {agent: n / span for agent, n in counts.items()}

    def latency(self) -> dict[str, float]:
        """Mean answer seconds per backend over the window (backends without answers are left out)."""
        self._prune(self.clock())
        sums: dict[str, list[float]] = {}
        for _, _, answers, _ in self._buckets:
            for backend, (seconds, n) in answers.items():
                total = sums.setdefault(backend, [0.0, 0])
                total[0] += seconds
                total[1] += n
        return {backend: seconds / n for backend, (seconds, n) in sums.items() if n}


def report(rates: Mapping[str, float], routes: Mapping[str, tuple[str, bool]], latency: Mapping[str, float],
           top: int, deferred: Mapping[str, float] | None = None) -> dict[str, float]:
    """One Ingress replica's figures for the policy and the gauges (`record_autoscaling_stats` returns them).

    `routes`: agent -> (backend now, routed to the teacher by its route file); `deferred`: agent -> the share of a
    selective student agent's requests the teacher answered (they load the teacher too). Keys: `rate`;
    `share/<agent>`, `teacher/<agent>` (the share of its requests the teacher answers: 1 or 0, or the deferred
    share), `drift/<agent>` (1 or 0) for the `top` busiest agents; `rest/share`,
    `rest/teacher`, `rest/drift` (shares of the whole traffic) for the others; `latency/<backend>` when measured.
    """
    total = sum(rates.values())
    figures = {RATE: total, "rest/share": 0.0, "rest/teacher": 0.0, "rest/drift": 0.0}
    busiest = set(sorted(rates, key=lambda a: (-rates[a], a))[:top])
    for agent, rate in rates.items():
        share = rate / total if total else 0.0
        backend, drift = routes.get(agent, (None, False))
        teacher, drift = float(backend == TEACHER), float(drift and backend == TEACHER)
        if backend != TEACHER:
            teacher = float((deferred or {}).get(agent, 0.0))
        if agent in busiest:
            figures.update({f"share/{agent}": share, f"teacher/{agent}": teacher, f"drift/{agent}": drift})
        else:
            figures["rest/share"] += share
            figures["rest/teacher"] += share * teacher
            figures["rest/drift"] += share * drift
    figures.update({f"latency/{backend}": seconds for backend, seconds in latency.items()})
    return figures


HOT_AGENTS = "serve/hot_agents.json"  # under the home: the busiest student agents, for new student replicas
HOT_AGENTS_EVERY_S = 10.0  # an Ingress rewrites it at most this often (when the list changed)


def hot_agents(rates: Mapping[str, float], routes: Mapping[str, tuple[str, bool]], n: int) -> list[str]:
    """The `n` busiest agents the student answers now, busiest first: what a new student replica prewarms."""
    on_student = [a for a in rates if routes.get(a, (None, False))[0] == STUDENT]
    return sorted(on_student, key=lambda a: (-rates[a], a))[:n]


# -- what the whole app saw -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """Request rates (requests/s) of the app, and measured answer seconds per backend."""

    rate: float = 0.0
    teacher_rate: float = 0.0  # of agents the teacher answers now
    drift_rate: float = 0.0  # of those, agents whose route file says teacher
    latency: Mapping[str, float] = field(default_factory=dict)

    @property
    def student_rate(self) -> float:
        return max(0.0, self.rate - self.teacher_rate)

    @property
    def teacher_share(self) -> float:
        return self.teacher_rate / self.rate if self.rate else 0.0

    @property
    def drift_share(self) -> float:
        return self.drift_rate / self.rate if self.rate else 0.0


def read_report(figures: Mapping[str, float]) -> Traffic:
    """The `Traffic` of one replica's `report`."""
    rate = float(figures.get(RATE, 0.0))
    teacher, drift = figures.get("rest/teacher", 0.0), figures.get("rest/drift", 0.0)
    for key, share in figures.items():
        if key.startswith("share/"):
            agent = key[len("share/"):]
            teacher += share * figures.get(f"teacher/{agent}", 0.0)
            drift += share * figures.get(f"drift/{agent}", 0.0)
    latency = {k[len("latency/"):]: float(v) for k, v in figures.items() if k.startswith("latency/")}
    return Traffic(rate, rate * min(1.0, teacher), rate * min(1.0, drift), latency)


def combine(parts: Iterable[Traffic]) -> Traffic:
    """The app's traffic: rates added; answer times averaged, weighted by each replica's rate to that backend."""
    parts = list(parts)
    latency = {}
    for backend, rate_of in ((STUDENT, lambda t: t.student_rate), (TEACHER, lambda t: t.teacher_rate)):
        seen = [(t.latency[backend], rate_of(t)) for t in parts if backend in t.latency]
        if seen:
            weight = sum(w for _, w in seen)
            latency[backend] = (sum(s * w for s, w in seen) / weight if weight else sum(s for s, _ in seen) / len(seen))
    return Traffic(sum(t.rate for t in parts), sum(t.teacher_rate for t in parts), sum(t.drift_rate for t in parts),
                   latency)


def latest_reports(raw_metrics: Mapping[str, Mapping[Any, list]] | None) -> list[dict[str, float]]:
    """Each replica's newest report from `AutoscalingContext.raw_metrics` ({metric: {replica: time series}}).

    All figures of one report share a timestamp; a key missing from the newest report (an agent that left the
    busiest) is left out even though older points of it are still in the look-back window.
    """
    by_replica: dict[Any, dict[str, Any]] = {}
    for name, series_by_replica in (raw_metrics or {}).items():
        for replica, series in series_by_replica.items():
            if series:
                by_replica.setdefault(replica, {})[name] = series[-1]
    reports = []
    for points in by_replica.values():
        newest = max(p.timestamp for p in points.values())
        reports.append({name: float(p.value) for name, p in points.items() if p.timestamp == newest})
    return reports


def desired_replicas(role: str, traffic: Traffic | None, ongoing: float, target: float, latency_s: float) -> float:
    """Replicas `role` should have before Serve's delays and bounds (module docstring); `traffic` None: load only."""
    load = ongoing / target
    if role == INGRESS or traffic is None:
        return load
    rate = traffic.teacher_rate if role == TEACHER else traffic.student_rate
    return max(load, rate * traffic.latency.get(role, latency_s) / target)


# -- the policy, run by the Serve controller ------------------------------------------------------------------
_BOARD: dict[str, tuple[Traffic, float]] = {}  # app name -> (its traffic, when posted)


class FlywheelPolicy:
    """Serve's custom autoscaling policy for one deployment of the app (`role`: ingress, student or teacher)."""

    def __init__(self, role: str, latency_s: float = 1.0, stale_s: float = 60.0):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role, self.latency_s, self.stale_s = role, latency_s, stale_s

    def __call__(self, ctx: Any) -> tuple[float, dict]:
        module = importlib.import_module("flywheel.serve.autoscale")  # the real module: its board is shared
        return module.decide(self.role, self.latency_s, self.stale_s, ctx), {}


def decide(role: str, latency_s: float, stale_s: float, ctx: Any) -> float:
    """The policy's decision for one tick: the Ingress posts the app's traffic, the others read it."""
    now = ctx.current_time or time.time()
    if role == INGRESS:
        reports = latest_reports(ctx.raw_metrics)
        traffic = combine(read_report(r) for r in reports) if reports else None
        if traffic is not None:
            _BOARD[ctx.app_name] = (traffic, now)
    else:
        posted = _BOARD.get(ctx.app_name)
        traffic = posted[0] if posted and now - posted[1] <= stale_s else None
    return desired_replicas(role, traffic, ctx.total_num_requests, ctx.config.get_target_ongoing_requests(),
                            latency_s)


# -- deployment options -----------------------------------------------------------------------------------------
def student_target(cfg: Any) -> float:
    return cfg.student_target_ongoing_requests or float(2 * cfg.max_batch_size)


def autoscaling_config(cfg: Any, role: str) -> dict:
    """Serve `autoscaling_config` of one deployment from a `ServeConfig`."""
    if role == STUDENT and cfg.num_replicas > 0:
        low = high = cfg.num_replicas
    else:
        low, high = getattr(cfg, f"{role}_min_replicas"), getattr(cfg, f"{role}_max_replicas")
    target = {INGRESS: cfg.ingress_target_ongoing_requests, STUDENT: student_target(cfg),
              TEACHER: cfg.teacher_target_ongoing_requests}[role]
    latency = {INGRESS: 1.0, STUDENT: cfg.student_latency_s, TEACHER: cfg.teacher_latency_s}[role]
    config = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
              "target_ongoing_requests": target,
              "upscale_delay_s": cfg.teacher_upscale_delay_s if role == TEACHER else cfg.upscale_delay_s,
              "downscale_delay_s": cfg.downscale_delay_s, "look_back_period_s": cfg.autoscale_look_back_s,
              "policy": {"policy_function": POLICY, "policy_kwargs": {
                  "role": role, "latency_s": latency,
                  "stale_s": max(3 * cfg.autoscale_metrics_interval_s, cfg.autoscale_look_back_s)}}}
    if low == 0:
        config["downscale_to_zero_delay_s"] = cfg.downscale_to_zero_delay_s
    if cfg.autoscale_metrics_interval_s != SERVE_METRICS_INTERVAL_S:  # a deprecated Serve field: only when needed
        config["metrics_interval_s"] = cfg.autoscale_metrics_interval_s
    return config


# -- the dashboard ------------------------------------------------------------------------------------------------
class TrafficGauges:
    """The figures of one Ingress replica's report as Ray gauges (module docstring)."""

    def __init__(self, per_agent: bool = True):
        from ray.util.metrics import Gauge

        self.per_agent = per_agent
        self.rate = Gauge("flywheel_autoscale_request_rate", "Requests per second over the traffic window")
        self.teacher = Gauge("flywheel_autoscale_teacher_share", "Share of traffic the teacher answers now")
        self.drift = Gauge("flywheel_autoscale_drift_share", "Share of traffic routed to the teacher by drift")
        self.agent_share = Gauge("flywheel_autoscale_agent_share", "An agent's share of the traffic",
                                 tag_keys=("agent",))
        self.agent_teacher = Gauge("flywheel_autoscale_agent_teacher", "1 while the teacher answers the agent",
                                   tag_keys=("agent",))
        self._shown: set[str] = set()

    def set(self, figures: Mapping[str, float]) -> None:
        traffic = read_report(figures)
        self.rate.set(traffic.rate)
        self.teacher.set(traffic.teacher_share)
        self.drift.set(traffic.drift_share)
        if not self.per_agent:
            return
        agents = {k[len("share/"):] for k in figures if k.startswith("share/")}
        for agent in agents:
            self.agent_share.set(figures[f"share/{agent}"], {"agent": agent})
            self.agent_teacher.set(figures.get(f"teacher/{agent}", 0.0), {"agent": agent})
        for agent in self._shown - agents:  # left the busiest: its share here is no longer reported
            self.agent_share.set(0.0, {"agent": agent})
        self._shown = agents
