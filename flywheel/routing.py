"""Which backend answers an agent, and the retrain queue: the state that monitoring writes and Serve reads.

`routing/<agent>.json` = {"mode": MODES, "reason": ..., "since": ...}:
    student     the production adapter answers every request
    selective   the production adapter answers when its confidence reaches the threshold certified with that
                version (`registry` entry `selective`), the teacher answers the rest (`flywheel.serve.selective`)
    shadow      the teacher answers; the production adapter answers too and its answer is logged beside it
    teacher     the teacher answers
No file means "selective when the production version carries a certified threshold, student when it carries no
certificate (it was promoted without one), teacher without a production adapter". Drift sets "teacher"; a
promotion sets "selective" (or "student" for a version promoted without a certificate).
Serve's Ingress reads these files (with `agents/` and the registry) into its in-memory catalog every
`routing_ttl_s` (flywheel/serve/catalog.py), and its autoscaling moves capacity with them: a route to the teacher
scales the TeacherProxy up at once, a route back scales it down after the cool-down (flywheel/serve/autoscale.py).
Every write here is an atomic replace (`Store.write_json`), which is what lets the catalog skip unchanged folders.
`queue/retrain/<agent>-<event>.json` holds retrain requests, each naming the event that caused it.
Every agent, tenant and event id is checked (`flywheel.ids.check_id`) before it names a file: `InvalidId` otherwise.
"""

from __future__ import annotations

import time

from flywheel.ids import check_id
from flywheel.storage import Store

STUDENT, TEACHER, SELECTIVE, SHADOW = "student", "teacher", "selective", "shadow"
MODES = (STUDENT, SELECTIVE, SHADOW, TEACHER)


def _rel(agent: str) -> str:
    return f"routing/{check_id('agent id', agent)}.json"


def get_route(store: Store, agent: str) -> dict:
    return store.read_json(_rel(agent), {"mode": STUDENT, "reason": "default", "since": 0.0})


def set_route(store: Store, agent: str, mode: str, reason: str) -> dict:
    if mode not in MODES:
        raise ValueError(f"route mode must be one of {', '.join(MODES)}, got {mode!r}")
    state = {"mode": mode, "reason": reason, "since": time.time()}
    store.write_json(_rel(agent), state)
    return state


def promoted_mode(entry: dict) -> str:
    """The route a promotion of this registry entry sets: selective when it carries a certified threshold."""
    certificate = entry.get("selective") or {}
    return SELECTIVE if certificate.get("threshold") is not None else STUDENT


def resolve(agent: str, mode: str | None, reason: str, production: str | None, certificate: dict | None) -> dict:
    """Who answers an agent, from its route file's `mode` (None: no file) and `reason`, its production version and
    that version's certificate: {"backend": STUDENT | TEACHER (who answers first), "mode", "model" (the adapter's
    model id, also in shadow), "reason", "threshold", "aggregate"}. Serve's catalog and the status page both ask."""
    if mode == TEACHER:
        return _answer(TEACHER, TEACHER, None, f"its route is teacher: {reason}")
    if production is None:
        return _answer(TEACHER, TEACHER, None, "it has no production adapter yet")
    model, threshold = f"{agent}@{production}", (certificate or {}).get("threshold")
    mode = mode or (SELECTIVE if threshold is not None else STUDENT)
    if mode == SHADOW:
        return _answer(TEACHER, SHADOW, model, "shadow: the student answers beside the teacher")
    if mode == SELECTIVE and threshold is None:
        return _answer(TEACHER, TEACHER, None, f"selective, but {model} has no certified threshold")
    if mode == SELECTIVE:
        return _answer(STUDENT, SELECTIVE, model, "production adapter, selective", float(threshold),
                       str((certificate or {}).get("aggregate") or "min"))
    return _answer(STUDENT, STUDENT, model, "production adapter")


def _answer(backend: str, mode: str, model: str | None, reason: str, threshold: float | None = None,
            aggregate: str = "min") -> dict:
    return {"backend": backend, "mode": mode, "model": model, "reason": reason, "threshold": threshold,
            "aggregate": aggregate}


def queue_retrain(store: Store, agent: str, event_id: str, reason: str) -> str:
    rel = f"queue/retrain/{check_id('agent id', agent)}-{check_id('event id', event_id)}.json"
    store.write_json(rel, {"agent": agent, "event": event_id, "reason": reason, "queued": time.time()})
    return rel


def retrain_queue(store: Store) -> list[dict]:
    return [store.read_json(f"queue/retrain/{n}") for n in store.list("queue/retrain") if n.endswith(".json")]


def register_agent(store: Store, agent: str, tenant: str = "default") -> None:
    """Add an agent to the catalog (ingest does this for every agent it sees); Serve 404s on others."""
    rel = f"agents/{check_id('agent id', agent)}.json"
    check_id("tenant id", tenant)
    if not store.exists(rel):
        store.write_json(rel, {"agent": agent, "tenant": tenant, "created": time.time()})


def known_agents(store: Store) -> list[str]:
    return [n[:-5] for n in store.list("agents") if n.endswith(".json")]
