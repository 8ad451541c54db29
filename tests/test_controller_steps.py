"""The controller's bookkeeping without Ray: failing steps retried with backoff and then abandoned, the cool-down,
the budget, the lease. The stages themselves are replaced by small functions here; tests/test_controller.py runs
the real ones end to end.

    .venv/bin/python -m pytest tests/test_controller_steps.py -q
"""

from __future__ import annotations

import time

import pytest

from flywheel.controller import Controller, ControllerConfig, events
from flywheel.routing import queue_retrain, retrain_queue


class Clock:
    """Starts at the real time (retrain requests carry real timestamps) and moves only when told."""

    def __init__(self):
        self.now = time.time() + 1

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def controller(store, monkeypatch):
    clock = Clock()
    ctl = Controller(ControllerConfig(home=store.uri, monitor=False, retrain_after_s=0, cooldown_s=600,
                                      backoff_s=10, max_attempts=3, agents=("a1",)), store, clock=clock)
    monkeypatch.setattr(ctl, "_review", lambda agent: None)
    ctl.calls = []

    def step(name, output):
        def run(agent, state):
            ctl.calls.append(name)
            if isinstance(output, Exception):
                raise output
            return output
        return run

    ctl.step = lambda name, output: monkeypatch.setattr(ctl, f"_{name}", step(name, output))
    for name, out in (("curate", {"dataset_version": "d1"}), ("distill", {"adapter_version": "v2"}),
                      ("evaluate", {"adapter_version": "v2", "gate": True}), ("promote", {"production": "v2"})):
        ctl.step(name, out)
    ctl.clock_ = clock
    return ctl


def test_idle_without_a_trigger(controller):
    assert controller.pass_once() == {"a1": "idle"}
    assert controller.calls == []


def test_a_failing_step_is_retried_with_backoff_then_abandoned(controller, store):
    queue_retrain(store, "a1", "e1", "drift")
    controller.step("distill", RuntimeError("no GPU today"))
    assert controller.pass_once() == {"a1": "distill: failed, retrying"}
    assert controller.pass_once() == {"a1": "distill: waiting to retry"}  # backoff 10 s not yet passed
    controller.clock_.now += 10
    assert controller.pass_once() == {"a1": "distill: failed, retrying"}
    controller.clock_.now += 15  # the second wait is 20 s
    assert controller.pass_once() == {"a1": "distill: waiting to retry"}
    controller.clock_.now += 5
    assert controller.pass_once() == {"a1": "abandoned at distill"}
    assert controller.calls == ["curate", "distill", "distill", "distill"]  # curate ran once
    log = [(e["step"], e["status"]) for e in events(store, "a1")]
    assert log == [("cycle", "started"), ("curate", "done"), ("distill", "failed"), ("distill", "failed"),
                   ("distill", "abandoned"), ("cycle", "abandoned at distill")]
    assert "no GPU today" in events(store, "a1")[-2]["detail"]
    assert len(retrain_queue(store)) == 1  # the request stays: nothing is dropped silently


def test_a_promoted_cycle_clears_its_requests_and_cools_down(controller, store):
    queue_retrain(store, "a1", "e1", "drift")
    assert controller.pass_once() == {"a1": "promoted"}
    assert retrain_queue(store) == []
    queue_retrain(store, "a1", "e2", "drift again")
    assert controller.pass_once() == {"a1": "idle"}  # within the cool-down
    controller.clock_.now += 601
    assert controller.pass_once() == {"a1": "promoted"}


def test_a_failed_gate_ends_the_cycle_and_keeps_the_request(controller, store):
    queue_retrain(store, "a1", "e1", "drift")
    controller.step("evaluate", {"adapter_version": "v2", "gate": False, "end": "gate failed"})
    assert controller.pass_once() == {"a1": "gate failed"}
    assert "promote" not in controller.calls and len(retrain_queue(store)) == 1


def test_the_budget_defers_a_cycle(store):
    clock = Clock()
    ctl = Controller(ControllerConfig(home=store.uri, monitor=False, retrain_after_s=0, cpu_hours_per_day=1.0,
                                      agents=("a1",)), store, clock=clock)
    ctl.save("a1", {"trainings": [{"at": clock() - 3600, "cpu_hours": 1.5}]})
    queue_retrain(store, "a1", "e1", "drift")
    ctl._review = lambda agent: None
    assert ctl.pass_once() == {"a1": "idle"}
    assert [(e["step"], e["status"]) for e in events(store, "a1")] == [("budget", "deferred")]


def test_one_controller_per_home(store):
    first = Controller(ControllerConfig(home=store.uri, monitor=False, agents=("a1",)), store)
    second = Controller(ControllerConfig(home=store.uri, monitor=False, agents=("a1",)), store)
    assert first.lease.acquire()
    assert second.pass_once() == {"lease": "held by another controller"}


def test_a_controller_that_lost_its_lease_stops_and_leaves_the_new_holder_alone(store):
    clock = Clock()
    config = ControllerConfig(home=store.uri, monitor=False, agents=("a1", "a2"), lease_s=60)
    first, second = Controller(config, store, clock=clock), Controller(config, store, clock=clock)

    def stall(agent: str) -> str:  # a1's turn outlasts the lease unrenewed; the second controller takes over
        clock.now += 61
        assert second.lease.acquire()
        return "idle"

    first.tick = stall
    assert first.pass_once() == {"a1": "idle", "a2": "skipped: the lease was lost"}
    assert store.read_json("controller/lease.json")["holder"] == second.id
