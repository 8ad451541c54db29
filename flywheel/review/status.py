"""What each agent's flywheel looks like right now, gathered from the store (pure reads): the status page's rows.

    status_rows(store, ["sgd_Flights"])   # -> GET /status (HTML, `pages.status_page`) and GET /status.json

Sources, per agent:
    routing/<agent>.json + registry/<agent>.json      which backend answers, and why (as Serve resolves it)
    registry versions' `scores`, reports/<agent>/<v>/eval.json     the primary metric with its 95% interval per
                                                      version, the teacher's score, the cost per 1k requests
    monitor/events/<agent>-*.json                     drift events (share of drifted features, threshold)
    monitor/state/<agent>.json                        the monitor's episode and recent windows, when present
    controller/events/<agent>-*.json                  the controller's steps; `monitor` steps carry the drift share
                                                      of every check, drifted or not
    queue/retrain/, review/queue/<agent>/             pending retrains and open review items
    reports/<agent>/learning.json + the latest dataset's manifest   the learning curve's forecast against the train
                                                      records the agent has: waiting for traffic, or failing
Files that are missing or malformed are skipped: a fresh home gives rows with empty fields, never an error.
"""

from __future__ import annotations

from typing import Any, Iterable

from flywheel.metrics import METRICS, PRIMARY
from flywheel.registry.registry import Registry
from flywheel.routing import TEACHER, get_route, resolve, retrain_queue
from flywheel.storage import Store

DRIFT_EVENTS, CONTROLLER_EVENTS = "monitor/events", "controller/events"
HISTORY = 50  # drift points and controller events kept per agent


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _interval(x: Any) -> list[float] | None:
    if isinstance(x, (list, tuple)) and len(x) == 2 and all(_number(v) is not None for v in x):
        return [float(x[0]), float(x[1])]
    return None


def _events(store: Store, folder: str, agent: str) -> list[dict]:
    out = []
    for name in store.list(folder):
        if not (name.startswith(f"{agent}-") and name.endswith(".json")):
            continue
        try:
            event = store.read_json(f"{folder}/{name}")
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("agent") == agent:
            out.append(event)
    return sorted(out, key=lambda e: _number(e.get("at", e.get("time"))) or 0.0)


def backend(store: Store, agent: str, production: dict | None) -> dict:
    """Who answers the agent now, resolved as the Serve app does (`flywheel.routing.resolve`), with the production
    version's certificate (threshold, target, certified coverage) when it is served selectively."""
    route = get_route(store, agent)
    mode = route.get("mode") if store.exists(f"routing/{agent}.json") else None
    certificate = (production or {}).get("selective")
    answer = resolve(agent, mode, str(route.get("reason") or ""), (production or {}).get("version"), certificate)
    out = {k: answer[k] for k in ("backend", "mode", "model", "reason")} | {"since": route.get("since")}
    if answer["mode"] in ("selective", "shadow") and isinstance(certificate, dict):
        out["certificate"] = {k: certificate.get(k) for k in ("threshold", "target", "delta", "coverage")}
    return out


def _metric(scores: dict, report: dict | None) -> str | None:
    """The metric a version was gated on: its report's, its scores' (`metric`), else the first known one it has
    (versions scored before the gate read name + arguments carry function-name accuracy)."""
    if report and isinstance(report.get("metric"), str):
        return report["metric"]
    if isinstance(scores.get("metric"), str):
        return scores["metric"]
    known = [*PRIMARY.values(), *(m for names in METRICS.values() for m in names)]
    return next((m for m in known if m in scores), None)


def versions(store: Store, agent: str, production: str | None) -> list[dict]:
    """Every registered version with its primary metric and interval (from its registry scores)."""
    out = []
    for v in Registry(store).versions(agent):
        scores = v.get("scores") if isinstance(v.get("scores"), dict) else {}
        metric = _metric(scores, None)
        out.append({"version": v.get("version"), "created": v.get("created"), "metric": metric,
                    "value": _number(scores.get(metric)) if metric else None,
                    "ci": _interval(scores.get(f"{metric}_ci")) if metric else None, "gate": scores.get("gate"),
                    "production": v.get("version") == production})
    return out


def production_scores(store: Store, agent: str, entry: dict | None) -> tuple[dict | None, dict | None]:
    """(the production version's primary metric vs the teacher, its cost figures) from its eval report."""
    if entry is None:
        return None, None
    try:
        report = store.read_json(f"reports/{agent}/{entry['version']}/eval.json")
    except ValueError:
        report = None
    report = report if isinstance(report, dict) else None
    scores = entry.get("scores") if isinstance(entry.get("scores"), dict) else {}
    gated = report.get(report.get("gated", "candidate")) if report else None  # the row the gate read
    candidate = gated if isinstance(gated, dict) else scores
    metric = _metric(scores, report)
    teacher = report.get("teacher") if report and isinstance(report.get("teacher"), dict) else {}
    value, t_value = _number(candidate.get(metric)), _number(teacher.get(metric)) if metric else None
    quality = {"version": entry["version"], "metric": metric, "value": value,
               "ci": _interval(candidate.get(f"{metric}_ci")), "n": candidate.get("n"), "teacher": t_value,
               "share_of_teacher": value / t_value if value is not None and t_value else None,
               "gate": (report.get("gate") or {}).get("passed") if report else scores.get("gate"),
               "report": f"reports/{agent}/{entry['version']}/eval.md" if report else None}
    cost = report.get("cost") if report and isinstance(report.get("cost"), dict) else None
    if cost is None:
        return quality, None
    student, teacher_cost = _number(cost.get("student_per_1k_usd")), _number(cost.get("teacher_per_1k_usd"))
    saved = teacher_cost - student if student is not None and teacher_cost is not None else None
    return quality, {"student_per_1k_usd": student, "teacher_per_1k_usd": teacher_cost, "saved_per_1k_usd": saved,
                     "saved_share": saved / teacher_cost if saved is not None and teacher_cost else None,
                     "teacher_over_student": _number(cost.get("teacher_over_student"))}


def drift(store: Store, agent: str, route: dict, monitor_steps: list[dict]) -> dict:
    """Drift state, the drift events, and the share of drifted features of every check over time.

    Points come from the drift events, the controller's `monitor` steps and the monitor's window history
    (`monitor/state/<agent>.json`, entries that carry `drift_share`), each marked drifted or not. The threshold
    line is a share threshold only: events whose `threshold` is a test's alpha (they carry `alpha`) give none.
    """
    events = [{"at": _number(e.get("time", e.get("at"))), "share": _number(e.get("drift_share")),
               "threshold": None if "alpha" in e else _number(e.get("threshold")), "id": e.get("id"),
               "retrain": e.get("retrain"), "ended": e.get("ended")} for e in _events(store, DRIFT_EVENTS, agent)]
    points: dict[float, tuple[float, bool]] = {}
    for p in events:
        if p["at"] is not None and p["share"] is not None:
            points[p["at"]] = (p["share"], True)
    for step in monitor_steps:
        detail = step.get("detail") if isinstance(step.get("detail"), dict) else {}
        share, at = _number(detail.get("drift_share")), _number(step.get("at"))
        if share is not None and at is not None:
            points.setdefault(at, (share, step.get("status") == "drift"))
    try:
        state = store.read_json(f"monitor/state/{agent}.json") or {}
    except ValueError:
        state = {}
    state = state if isinstance(state, dict) else {}
    for h in state.get("history") or []:
        share, at = (_number(h.get("drift_share")), _number(h.get("time"))) if isinstance(h, dict) else (None, None)
        if share is not None and at is not None:
            points.setdefault(at, (share, bool(h.get("drifted"))))
    threshold = next((p["threshold"] for p in reversed(events) if p["threshold"] is not None), None)
    episode = state.get("episode") if isinstance(state.get("episode"), dict) else {}
    if episode.get("active"):
        now = f"drift: episode {episode.get('id')}"
    elif route["backend"] == TEACHER and "drift" in str(route.get("reason")):
        now = "drift: on the teacher"
    else:
        now = "ok" if points or state.get("history") else "no checks yet"
    series = [{"at": at, "share": share, "drifted": drifted} for at, (share, drifted) in sorted(points.items())]
    return {"state": now, "events": events[-HISTORY:], "threshold": threshold, "series": series[-HISTORY:]}


def traffic_row(store: Store, agent: str, latest: dict | None) -> dict:
    """`flywheel.evaluate.learning.traffic` for the agent: its latest dataset's train records, its curve, and whether
    its latest version passed the gate."""
    from flywheel.datasets import latest_version, read_manifest
    from flywheel.evaluate.learning import curve_path, traffic

    version = latest_version(store, agent)
    try:
        manifest = read_manifest(store, agent, version) if version else None
        curve = store.read_json(curve_path(agent)) if store.exists(curve_path(agent)) else None
    except ValueError:
        manifest, curve = None, None
    counts = (manifest or {}).get("counts") if isinstance(manifest, dict) else None
    records = _number((counts or {}).get("train")) if isinstance(counts, dict) else None
    scores = (latest or {}).get("scores") if isinstance((latest or {}).get("scores"), dict) else {}
    return traffic(curve if isinstance(curve, dict) else None, None if records is None else int(records),
                   scores.get("gate") if latest else None)


def status_row(store: Store, agent: str, queue: list[dict] | None = None) -> dict:
    from flywheel.review.queue import list_items

    queue = retrain_queue(store) if queue is None else queue
    registry = Registry(store)
    entry = registry.alias(agent)
    route = backend(store, agent, entry)
    quality, cost = production_scores(store, agent, entry)
    steps = _events(store, CONTROLLER_EVENTS, agent)
    cycles = [s for s in steps if s.get("step") != "monitor"]
    return {"agent": agent, "route": route, "production": quality, "cost": cost,
            "drift": drift(store, agent, route, [s for s in steps if s.get("step") == "monitor"]),
            "versions": versions(store, agent, entry["version"] if entry else None),
            "retrain": [q for q in queue if isinstance(q, dict) and q.get("agent") == agent],
            "last_cycle": cycles[-1] if cycles else None, "cycle_events": cycles[-10:],
            "review_items": len(list_items(store, [agent])),
            "traffic": traffic_row(store, agent, (registry.versions(agent) or [None])[-1])}


def status_rows(store: Store, agents: Iterable[str]) -> list[dict]:
    """One row per agent (see the module docstring), in the order given."""
    queue = retrain_queue(store)
    return [status_row(store, agent, queue) for agent in agents]
