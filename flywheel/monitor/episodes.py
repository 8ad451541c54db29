"""Drift episodes: persistence and hysteresis over evaluated windows. Pure, no store.

A window that fails the input tests is only *suspect*. `persistence` (k) drifted windows in a row start a drift
episode; once started, it lasts until `clear_windows` (m) clean windows in a row. Monitoring acts once per
episode (route to the teacher, queue a retrain named after the episode), so a shift that lasts for many windows
queues one retrain, and a single unlucky window queues none.

    state, change = advance(state, window_drifted=True, persistence=2, clear_windows=3)  # "start" | "end" | None
"""

from __future__ import annotations

import time

from flywheel.schema import digest

START, END = "start", "end"


def advance(state: dict | None, window_drifted: bool, persistence: int, clear_windows: int) -> tuple[dict, str | None]:
    """The episode state after one more evaluated window, and what changed ("start", "end" or None).

    `state` = {"active": bool, "drifted_streak": int, "clean_streak": int} (None: no window seen yet).
    """
    s = {"active": False, "drifted_streak": 0, "clean_streak": 0, **(state or {})}
    if window_drifted:
        s["drifted_streak"], s["clean_streak"] = s["drifted_streak"] + 1, 0
    else:
        s["drifted_streak"], s["clean_streak"] = 0, s["clean_streak"] + 1
    if not s["active"] and s["drifted_streak"] >= persistence:
        s["active"] = True
        return s, START
    if s["active"] and s["clean_streak"] >= clear_windows:
        s["active"] = False
        return s, END
    return s, None


def episode_id(agent: str, window_end: float, evaluation: int, last_record: str | None) -> str:
    """A deterministic id for the episode that starts at this window (a retried check names it the same, so its
    retrain request and event are rewritten, not doubled): `<UTC time of the newest request>-<digest>`."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(window_end)) + "Z"
    return f"{stamp}-{digest(agent, evaluation, last_record, n=8)}"
