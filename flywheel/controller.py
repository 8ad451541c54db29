"""The controller: the loop that turns the flywheel with nobody at the keyboard.

    flywheel run --interval-s 60                                  # long-running on the cluster; Ctrl-C stops
    flywheel run --passes 1 --json                                # one pass (cron, tests)
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"FLYWHEEL_HOME": "s3://bucket/flywheel"}}' \
        -- python jobs/run.py --config jobs/run.yaml

Every pass, for every agent (config `agents`, else every agent with a production adapter or a queued retrain):

1. **monitor**: a drift check of the agent's new live traffic (`flywheel.monitor.drift.check_drift`); drift routes
   the agent to the teacher and queues one retrain for the episode. **review**: new records that need a person
   (negative feedback, invalid tool calls, disagreement) go to the review queue (`flywheel.review.fill_queue`).
2. **trigger**: a cycle starts when the agent has a queued retrain (drift, a person) older than `retrain_after_s`
   (time for the teacher's answers to the new traffic to be captured), approved review corrections,
   or `min_new_records` newly captured records, and its last cycle ended more than `cooldown_s` ago and the
   training budget (`cpu_hours_per_day`) has room.
3. **cycle**: curate -> distill -> evaluate (the gate) -> promote, one step at a time. After each step the agent's
   state (`controller/state/<agent>.json`) records the step's output, so a controller that is killed and
   restarted resumes at the first unfinished step: it never repeats a finished one (a distill interrupted inside
   Ray Train resumes from its checkpoint under the cycle's run name). A failed step is retried with exponential
   backoff (`backoff_s`, `max_attempts`), then the cycle is abandoned and reported; nothing is dropped silently.
   A candidate that fails the gate ends the cycle with the agent still on the teacher; its retrain request stays
   queued, so the next cycle (after the cool-down, with more traffic) tries again.

Every decision is an event, `controller/events/<agent>-<ms>-<step>.json` = {agent, cycle, step, status, at,
detail}: the status page and `flywheel run --passes 0 --dry-run`-style tools read them. One controller per home:
the pass holds `controller/lease.json` (`flywheel.lease`: taken, renewed during long steps and released by
compare-and-swap; a controller that finds a live lease of another waits). Steps run one
at a time in this process, which is a Ray driver: curation uses Ray Data and training Ray Train on the cluster.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from flywheel.config import ConfigError, CurateConfig, DistillConfig, EvaluateConfig, MonitorConfig, check_ids, \
    default_student_path, load
from flywheel.lease import Lease, holder_id
from flywheel.routing import promoted_mode, retrain_queue, set_route
from flywheel.storage import Store

logger = logging.getLogger("flywheel.controller")


class _Metrics:
    """The controller's decisions as Ray metrics (set only inside Ray): cycle durations, gate outcomes, routes."""

    def __init__(self):
        self._made = None

    def _make(self):
        import ray
        from ray.util.metrics import Counter, Gauge, Histogram

        if not ray.is_initialized():
            return None
        if self._made is None:
            self._made = {
                "cycles": Counter("flywheel_cycles_total", "Controller cycles by outcome", tag_keys=("agent", "outcome")),
                "seconds": Histogram("flywheel_cycle_seconds", "Controller cycle duration",
                                     [60, 300, 900, 1800, 3600, 7200, 14400], tag_keys=("agent",)),
                "gates": Counter("flywheel_gate_total", "Gate outcomes", tag_keys=("agent", "passed")),
                "route": Gauge("flywheel_route_teacher", "1 while the agent is routed to the teacher",
                               tag_keys=("agent",)),
                "failures": Counter("flywheel_step_failures_total", "Failed controller steps",
                                    tag_keys=("agent", "step")),
            }
        return self._made

    def observe(self, event: dict, state: dict) -> None:
        try:
            m = self._make()
        except Exception:  # metrics never stop the controller
            return
        if m is None:
            return
        agent, step, status = event["agent"], event["step"], event["status"]
        if step == "cycle" and status != "started":
            m["cycles"].inc(1, {"agent": agent, "outcome": status.split(" ")[0]})
            started = state.get("last_started") or state.get("started")
            if started:
                m["seconds"].observe(max(0.0, event["at"] - float(started)), {"agent": agent})
        elif step == "evaluate" and status == "done":
            m["gates"].inc(1, {"agent": agent, "passed": str(bool(event["detail"].get("gate"))).lower()})
        elif status in ("failed", "abandoned"):
            m["failures"].inc(1, {"agent": agent, "step": step})
        if step == "monitor" and status == "drift":
            m["route"].set(1, {"agent": agent})
        elif step == "promote" and status == "done":
            m["route"].set(0, {"agent": agent})


metrics = _Metrics()
STEPS = ("curate", "distill", "evaluate", "promote")
STATE, EVENTS, LEASE = "controller/state", "controller/events", "controller/lease.json"


@dataclass(frozen=True)
class ControllerConfig:
    """`flywheel run`: the controller that monitors, retrains, gates and promotes every agent on its own."""

    home: str = ""
    base_model: str = field(default_factory=default_student_path)
    agents: tuple[str, ...] = ()  # empty: every agent with a production adapter or a queued retrain
    interval_s: float = 60.0  # seconds between passes
    passes: int = 0  # stop after this many passes; 0: run until stopped
    monitor: bool = True  # check drift of every agent each pass
    monitor_config: str = ""  # a jobs/monitor.yaml-style file for the drift checks (agent/home are set here)
    min_new_records: int = 0  # newly captured records of an agent that start a cycle; 0: only other triggers
    cooldown_s: float = 600.0  # between the end of one cycle of an agent and the start of its next
    retrain_after_s: float = 300.0  # a queued retrain waits this long, so the teacher's answers to the new traffic
    # (the agent is routed to the teacher on drift) are captured before the cycle curates them
    max_attempts: int = 3  # tries of a failing step before the cycle is abandoned
    backoff_s: float = 30.0  # wait after the first failure; doubles after each
    cpu_hours_per_day: float = 0.0  # training CPU-hours (wall x workers) per rolling day; 0: no budget
    distill_config: str = ""  # a jobs/distill.yaml-style file for the training runs (agent/home are set here)
    evaluate_config: str = ""  # a jobs/evaluate.yaml-style file for the gate
    lease_s: float = 300.0  # a controller's lease on the home; another controller waits while it is live
    inject_exit_after: str = ""  # fault drill: exit the process right after this step is recorded

    def __post_init__(self):
        check_ids(self, "agents")
        for key in ("interval_s", "cooldown_s", "backoff_s", "cpu_hours_per_day", "lease_s", "retrain_after_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.max_attempts < 1 or self.passes < 0 or self.min_new_records < 0:
            raise ConfigError("max_attempts must be >= 1; passes and min_new_records >= 0")
        if self.inject_exit_after not in ("",) + STEPS:
            raise ConfigError(f"inject_exit_after: one of {', '.join(STEPS)} (or empty), got {self.inject_exit_after!r}")


class Controller:
    def __init__(self, cfg: ControllerConfig, store: Store | None = None, distill: dict | None = None,
                 evaluate: dict | None = None, clock: Callable[[], float] = time.time):
        self.cfg, self.store, self.clock = cfg, store or Store(cfg.home or None), clock
        self.distill = {**_overrides(DistillConfig, cfg.distill_config), **(distill or {})}
        self.evaluate = {**_overrides(EvaluateConfig, cfg.evaluate_config), **(evaluate or {})}
        self.monitor = _overrides(MonitorConfig, cfg.monitor_config)
        self.id = holder_id()
        self.lease = Lease(self.store, LEASE, self.id, cfg.lease_s, clock)
        self._seq = 0

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> list[dict]:
        """Pass after pass until `passes` is reached or `stop` is set; returns what each pass did."""
        stop, done = stop or threading.Event(), []
        while not stop.is_set():
            done.append(self.pass_once())
            if self.cfg.passes and len(done) >= self.cfg.passes:
                break
            stop.wait(self.cfg.interval_s)
        return done

    def pass_once(self) -> dict:
        """Every agent's turn, while this controller holds the lease (renewed as long as a step takes)."""
        if not self.lease.acquire():
            return {"lease": "held by another controller"}
        done: dict[str, str] = {}
        try:
            with self.lease.kept():
                for agent in self.agents():
                    if not self.lease.renew():  # a step outlasted lease_s unrenewed, and another controller took over
                        done[agent] = "skipped: the lease was lost"
                        continue
                    done[agent] = self.tick(agent)
            return done
        finally:
            self.lease.release()

    def agents(self) -> list[str]:
        if self.cfg.agents:
            return list(self.cfg.agents)
        from flywheel.registry.registry import Registry

        registry = Registry(self.store)
        queued = {q["agent"] for q in retrain_queue(self.store) if q}
        return sorted({a for a in registry.agents() if registry.alias(a)} | queued | set(self._states()))

    def tick(self, agent: str) -> str:
        """One agent's turn in a pass: advance its cycle, or monitor it and maybe start one."""
        state = self.state(agent)
        if not state.get("cycle"):
            if self.cfg.monitor:
                self._monitor(agent)
            self._review(agent)
            trigger = self._trigger(agent, state)
            if trigger is None:
                return "idle"
            state = self._start(agent, state, trigger)
        return self._advance(agent, state)

    # -- triggers --------------------------------------------------------------------------------------------------
    def _monitor(self, agent: str) -> None:
        from flywheel.monitor.drift import check_drift

        try:
            result = check_drift(MonitorConfig(**{**self.monitor, "agent": agent, "home": self.store.uri}), self.store)
        except FileNotFoundError as e:  # no curated reference yet: nothing to compare with
            result = {"verdict": "no_reference", "detail": str(e)}
        except Exception as e:
            self.event(agent, None, "monitor", "failed", f"{type(e).__name__}: {e}")
            return
        verdict = result.get("verdict")
        if verdict not in ("insufficient_data", "no_reference", "no_new_data"):
            self.event(agent, None, "monitor", str(verdict), {k: result.get(k) for k in
                                                             ("drift_share", "pvalue", "event", "retrain")})

    def _review(self, agent: str) -> None:
        """Fill the agent's review queue from its new records (negative feedback, invalid calls, disagreement)."""
        from flywheel.review import fill_queue

        try:
            added = fill_queue(self.store, agent)
        except Exception as e:
            self.event(agent, None, "review", "failed", f"{type(e).__name__}: {e}")
            return
        if added.get("enqueued"):
            self.event(agent, None, "review", "queued", added["enqueued"])

    def _trigger(self, agent: str, state: dict) -> str | None:
        now = self.clock()
        if now - float(state.get("last_end") or 0) < self.cfg.cooldown_s:
            return None
        queued = [q for q in retrain_queue(self.store) if q and q.get("agent") == agent]
        if queued and now - min(float(q.get("queued") or 0) for q in queued) >= self.cfg.retrain_after_s:
            reason = f"retrain queued ({queued[0].get('reason')})"
        elif self._corrections(agent) > int(state.get("corrections_seen") or 0):
            reason = "review corrections"
        elif self.cfg.min_new_records and self._new_records(agent, state) >= self.cfg.min_new_records:
            reason = f"{self.cfg.min_new_records}+ new records"
        else:
            return None
        if self.cfg.cpu_hours_per_day and self._cpu_hours_today() >= self.cfg.cpu_hours_per_day:
            self.event(agent, None, "budget", "deferred", f"{reason}: the day's {self.cfg.cpu_hours_per_day} "
                                                          "training CPU-hours are used")
            return None
        return reason

    def _corrections(self, agent: str) -> int:
        return len([n for n in self.store.list(f"review/labels/{agent}") if n.endswith(".json")])

    def _new_records(self, agent: str, state: dict) -> int:
        """The agent's records in log parts the last cycle had not seen (footers first, then one column)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from flywheel.capture.store import PARQUET, LogStore

        logs = LogStore(self.store)
        seen = set(state.get("parts_seen") or [])
        new = [n for n, agents in logs.part_agents([n for n in logs.part_names() if n not in seen]).items()
               if agent in agents]
        count = 0
        for name in new:
            with self.store.fs.open(self.store.path(PARQUET, name), "rb") as f:
                column = pq.read_table(f, columns=["agent_id"]).column(0)
            count += int(pc.sum(pc.equal(column, agent)).as_py() or 0)
        return count

    def _cpu_hours_today(self) -> float:
        spent = 0.0
        for state in self._states().values():
            for run in state.get("trainings") or []:
                if self.clock() - run["at"] < 86_400:
                    spent += run["cpu_hours"]
        return spent

    # -- the cycle -------------------------------------------------------------------------------------------------
    def _start(self, agent: str, state: dict, trigger: str) -> dict:
        cycle = f"{agent}-c{int(self.clock())}-{uuid.uuid4().hex[:4]}"
        requests = [n for n in self.store.list("queue/retrain") if n.startswith(f"{agent}-") and n.endswith(".json")]
        state = {**state, "cycle": cycle, "trigger": trigger, "started": self.clock(), "done": {},
                 "attempts": 0, "next_try": 0.0, "requests": requests}
        self.save(agent, state)
        self.event(agent, cycle, "cycle", "started", trigger)
        return state

    def _advance(self, agent: str, state: dict) -> str:
        for step in STEPS:
            if step in state["done"]:
                continue
            if self.clock() < float(state.get("next_try") or 0):
                return f"{step}: waiting to retry"
            try:
                output = getattr(self, f"_{step}")(agent, state)
            except Exception as e:  # reported and retried, never dropped
                return self._failed(agent, state, step, e)
            state = {**state, "done": {**state["done"], step: output}, "attempts": 0, "next_try": 0.0}
            self.save(agent, state)
            self.event(agent, state["cycle"], step, "done", output)
            if self.cfg.inject_exit_after == step:
                os._exit(17)  # the drill: die right after recording the step
            if output.get("end"):
                return self._end(agent, state, output["end"])
        return self._end(agent, state, "promoted")

    def _failed(self, agent: str, state: dict, step: str, error: Exception) -> str:
        attempts = int(state.get("attempts") or 0) + 1
        detail = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:500] if str(error).strip() else ''}"
        logger.exception("%s: %s failed (attempt %d)", agent, step, attempts)
        if attempts >= self.cfg.max_attempts:
            self.event(agent, state["cycle"], step, "abandoned", f"{detail} (after {attempts} attempts)")
            return self._end(agent, state, f"abandoned at {step}")
        wait = self.cfg.backoff_s * 2 ** (attempts - 1)
        self.save(agent, {**state, "attempts": attempts, "next_try": self.clock() + wait})
        self.event(agent, state["cycle"], step, "failed", f"{detail}; retry {attempts + 1} in {wait:.0f}s")
        return f"{step}: failed, retrying"

    def _end(self, agent: str, state: dict, outcome: str) -> str:
        if outcome == "promoted":
            for name in state.get("requests") or []:  # the requests this cycle answered, not newer ones
                self.store.remove(f"queue/retrain/{name}")
        self.save(agent, {"last_cycle": state["cycle"], "last_outcome": outcome, "last_end": self.clock(),
                          "last_started": state.get("started"),
                          "corrections_seen": self._corrections(agent), "parts_seen": self._parts(),
                          "trainings": state.get("trainings") or []})
        self.event(agent, state["cycle"], "cycle", outcome, {k: v for k, v in state["done"].items()})
        return outcome

    def _parts(self) -> list[str]:
        from flywheel.capture.store import LogStore

        return LogStore(self.store).part_names()

    # -- the steps: each returns what the next steps (and a restart) need ---------------------------------------
    def _curate(self, agent: str, state: dict) -> dict:
        from flywheel.curate.pipeline import curate

        manifests = curate(CurateConfig(home=self.store.uri, agents=(agent,)), self.store)
        manifest = manifests.get(agent) or {}
        if not manifest.get("version"):
            return {"end": "no usable dataset", "detail": str(manifest)[:300]}
        return {"dataset_version": manifest["version"]}

    def _distill(self, agent: str, state: dict) -> dict:
        from flywheel.distill.train import distill

        run_name = state["cycle"]
        existing = self._registered(agent, run_name)  # trained and registered before a restart
        if existing:
            return {"adapter_version": existing["version"], "run_name": run_name, "reused": True}
        cfg = DistillConfig(**{**self.distill, "agent": agent, "home": self.store.uri,
                               "base_model": self.distill.get("base_model") or self.cfg.base_model,
                               "dataset_version": state["done"]["curate"]["dataset_version"], "run_name": run_name})
        out = distill(cfg, self.store)
        hours = out["train_time_s"] * cfg.num_workers / 3600
        self.save(agent, {**state, "trainings": (state.get("trainings") or [])[-50:] +
                          [{"at": self.clock(), "cpu_hours": hours}]})
        state["trainings"] = self.state(agent)["trainings"]
        return {"adapter_version": out["version"], "run_name": run_name, "train_time_s": out["train_time_s"]}

    def _registered(self, agent: str, run_name: str) -> dict | None:
        entries = (self.store.read_json(f"registry/{agent}.json") or {}).get("versions") or []
        return next((e for e in entries if e.get("run_name") == run_name), None)

    def _evaluate(self, agent: str, state: dict) -> dict:
        from flywheel.evaluate.run import evaluate

        version = state["done"]["distill"]["adapter_version"]
        cfg = EvaluateConfig(**{**self.evaluate, "agent": agent, "home": self.store.uri, "promote": False,
                                "base_model": self.evaluate.get("base_model") or self.cfg.base_model,
                                "adapter_version": version})
        report = evaluate(cfg, self.store)
        gate = report["gate"]
        out = {"adapter_version": version, "gate": bool(gate["passed"]), "reasons": gate.get("reasons"),
               "metric": gate.get("metric"), "candidate_lower": gate.get("candidate_lower")}
        return out if gate["passed"] else {**out, "end": "gate failed"}

    def _promote(self, agent: str, state: dict) -> dict:
        from flywheel.registry.registry import Registry

        version = state["done"]["evaluate"]["adapter_version"]
        registry = Registry(self.store)
        current = registry.alias(agent)
        if not current or current["version"] != version:  # a restart after the swap finds it done
            registry.promote(agent, version, expected=current["version"] if current else None,
                             reason=f"controller cycle {state['cycle']}: gate passed")
        set_route(self.store, agent, promoted_mode(registry.get(agent, version)),
                  f"promoted {version} (cycle {state['cycle']})")
        return {"production": version}

    # -- state, events, lease --------------------------------------------------------------------------------------
    def state(self, agent: str) -> dict:
        return self.store.read_json(f"{STATE}/{agent}.json", {}) or {}

    def save(self, agent: str, state: dict) -> None:
        self.store.write_json(f"{STATE}/{agent}.json", state)

    def _states(self) -> dict[str, dict]:
        return {n[:-5]: self.store.read_json(f"{STATE}/{n}", {}) or {} for n in self.store.list(STATE)
                if n.endswith(".json")}

    def event(self, agent: str, cycle: str | None, step: str, status: str, detail: Any = None) -> dict:
        at, self._seq = self.clock(), self._seq + 1
        record = {"agent": agent, "cycle": cycle, "step": step, "status": status, "at": at, "seq": self._seq,
                  "detail": detail, "controller": self.id}
        self.store.write_json(f"{EVENTS}/{agent}-{int(at * 1000):015d}-{uuid.uuid4().hex[:4]}-{step}.json", record)
        logger.info("%s %s %s: %s", agent, step, status, detail)
        metrics.observe(record, self.state(agent))
        return record


def events(store: Store, agent: str | None = None) -> list[dict]:
    """The controller's decisions, oldest first (of one agent, or all)."""
    names = [n for n in store.list(EVENTS) if n.endswith(".json") and (agent is None or n.startswith(f"{agent}-"))]
    rows = [store.read_json(f"{EVENTS}/{n}") for n in names]
    return sorted((r for r in rows if r), key=lambda r: (r["at"], r.get("seq", 0)))


def _overrides(cls: type, path: str) -> dict:
    """A job YAML's keys, checked against its config (agent/home/versions are the controller's)."""
    if not path:
        return {}
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    load(cls, path, agent=data.get("agent") or "controller")  # strict: unknown keys and bad values fail here
    return {k: v for k, v in data.items() if k not in ("agent", "home", "dataset_version", "adapter_version",
                                                        "run_name", "promote")}


def run_controller(cfg: ControllerConfig) -> dict:
    """The `flywheel run` verb (and `jobs/run.py`): joins the Ray instance here (or RAY_ADDRESS), then passes."""
    from flywheel.raycluster import check_home, connect_ray

    connect_ray(configure_logging=False, log_to_driver=False)
    check_home(cfg.home)
    return {"passes": Controller(cfg).run()}


def run_process(values: dict) -> int:
    """`python -c` entry for drills and tests: a config mapping (strictly checked), then `run_controller`."""
    from flywheel.config import build

    run_controller(build(ControllerConfig, values))
    return 0

