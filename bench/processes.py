"""Where a serving benchmark's CPU goes: CPU seconds of every process on the machine, by the role it plays.

    before = cpu_seconds(); ...traffic...; shares = cpu_shares(before, cpu_seconds(), wall_s)

Roles come from the process titles Ray and vLLM give their processes (`ray::ServeReplica:<app>:<deployment>`,
`ray::ProxyActor`, `VLLM::EngineCore`, ...); this benchmark's own process (its `openai` clients) is `clients`.
A share is CPU seconds over the wall time: 1.0 is one core busy the whole run (this machine has `os.cpu_count()`).
"""

from __future__ import annotations

import os

ROLES = (("StudentModel", "student replica"), ("Ingress", "ingress"), ("TeacherProxy", "teacher proxy"),
         ("ProxyActor", "http proxy"), ("ServeController", "serve controller"), ("EngineCore", "vllm engine core"),
         ("vllm.entrypoints", "vllm api server"), ("raylet", "ray system"), ("gcs_server", "ray system"),
         ("multiprocessing", "spawned workers (vLLM's engine core)"), ("dashboard", "ray system"), ("log_monitor", "ray system"), ("monitor.py", "ray system"),
         ("ray::", "other ray workers"))


def role_of(pid: int, cmdline: list[str]) -> str:
    if pid == os.getpid():
        return "clients"
    title = " ".join(cmdline)
    return next((role for marker, role in ROLES if marker in title), "other")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (role, user + system CPU seconds so far)} for every process readable now."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        times = p.info["cpu_times"]
        if times is not None:
            found[p.pid] = (role_of(p.pid, p.info["cmdline"] or []), times.user + times.system)
    return found


def cpu_shares(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
               wall_s: float) -> dict[str, float]:
    """Cores busy per role between two readings (a process born in between counts from zero), busiest first."""
    shares: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        used = seconds - before.get(pid, (role, 0.0))[1]
        if used > 0:
            shares[role] = shares.get(role, 0.0) + used / wall_s
    return {role: round(share, 2) for role, share in sorted(shares.items(), key=lambda kv: -kv[1]) if share >= 0.01}
