"""Serve's own figures as Ray metrics: they show in the Ray dashboard's metrics view and on every node's Prometheus
endpoint (Ray exports them with the `ray_` prefix, e.g. `ray_flywheel_requests_total`).

Per agent and backend (`student` / `teacher`):

    flywheel_requests_total{agent, backend, status}       answered requests by HTTP status (2xx and errors)
    flywheel_tokens_total{agent, backend, kind}           prompt / completion tokens
    flywheel_request_seconds{agent, backend, stream}      whole-request latency (histogram)
    flywheel_ttft_seconds{agent, backend}                 time to the first streamed token (histogram)
    flywheel_selective_total{agent, outcome}              selective answers: `served` by the student, or the
                                                          deferral reason (low_confidence, truncated, ...):
                                                          deferral rate = 1 - served / all, coverage = served / all

Requests refused before an agent is known (401, 413, bad JSON) count under agent "-". With many thousands of
agents, per-agent series can be turned off (`ServeConfig.metrics_per_agent: false`): the agent tag is then "*".
"""

from __future__ import annotations

from typing import Any

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]


class ServeMetrics:
    def __init__(self, per_agent: bool = True):
        from ray.util.metrics import Counter, Histogram

        self.per_agent = per_agent
        self.requests = Counter("flywheel_requests_total", "Chat completion requests by agent, backend and status",
                                tag_keys=("agent", "backend", "status"))
        self.tokens = Counter("flywheel_tokens_total", "Prompt and completion tokens by agent and backend",
                              tag_keys=("agent", "backend", "kind"))
        self.latency = Histogram("flywheel_request_seconds", "Whole-request latency", LATENCY_BOUNDARIES,
                                 tag_keys=("agent", "backend", "stream"))
        self.ttft = Histogram("flywheel_ttft_seconds", "Time to the first streamed token", LATENCY_BOUNDARIES,
                              tag_keys=("agent", "backend"))
        self.selective_outcomes = Counter("flywheel_selective_total", "Selective answers by outcome: served by the "
                                          "student or the reason they were deferred to the teacher",
                                          tag_keys=("agent", "outcome"))

    def selective(self, agent: str, outcome: str) -> None:
        self.selective_outcomes.inc(1, {"agent": self._agent(agent), "outcome": outcome})

    def _agent(self, agent: str | None) -> str:
        return (agent or "-") if self.per_agent else "*"

    def request(self, agent: str | None, backend: str, status: int) -> None:
        self.requests.inc(1, {"agent": self._agent(agent), "backend": backend, "status": str(status)})

    def answered(self, agent: str, backend: str, seconds: float, stream: bool, usage: dict[str, Any] | None,
                 ttft: float | None = None) -> None:
        tags = {"agent": self._agent(agent), "backend": backend}
        self.request(agent, backend, 200)
        self.latency.observe(seconds, {**tags, "stream": str(stream).lower()})
        if ttft is not None:
            self.ttft.observe(ttft, tags)
        for kind in ("prompt_tokens", "completion_tokens"):
            value = (usage or {}).get(kind)
            if isinstance(value, int) and value > 0:
                self.tokens.inc(value, {**tags, "kind": kind.split("_")[0]})
