"""Learning curves: accuracy at nested train sizes -> a fitted curve and the records at which a goal is reached.

    points = [{"n": 30, "correct": [1, 0, ...]}, {"n": 60, "correct": [...]}, ...]   # same test examples each
    fit = fit_curve(points)                    # error(n) = a * n^-b, least squares on log error vs log n
    forecast(points, goal=0.8)                 # {"n": 1,900, "low": ..., "high": ..., "plateau": False, ...}

The model is the inverse power law of error in data size (Hestness et al. 2017; Kaplan et al. 2020), without a
floor: with no floor it never predicts a plateau, so `forecast` also tests for one (the last size no better than the
one before within the test examples' sampling noise) and then reports the plateau instead of a number of records.
The interval comes from resampling the test examples (the same draw for every size, as the sizes are scored on the
same examples) and refitting: the uncertainty of the scores, not of the model's form.
"""

from __future__ import annotations

import math
import random

MAX_FORECAST = 10 ** 7  # records: a forecast beyond this is reported as out of reach


def fit_curve(points: list[dict]) -> dict | None:
    """{"a", "b"} of error(n) = a * n^-b over `points` ({"n", "accuracy"} or {"n", "correct"}), or None when fewer
    than two sizes have an error strictly between 0 and 1 (a log needs both)."""
    xs, ys = [], []
    for p in points:
        err = 1 - _accuracy(p)
        if 0 < err < 1:
            xs.append(math.log(p["n"]))
            ys.append(math.log(err))
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"a": math.exp(my - slope * mx), "b": -slope}


def predict(fit: dict, n: float) -> float:
    """Accuracy the fitted curve gives at `n` records."""
    return 1 - fit["a"] * n ** -fit["b"]


def records_for(fit: dict | None, goal: float) -> float | None:
    """Records at which the fitted accuracy reaches `goal`; None when the curve never gets there (no fit, or a
    curve that does not fall) or only past `MAX_FORECAST`."""
    if fit is None or fit["b"] <= 0:
        return None
    log_n = math.log(fit["a"] / (1 - goal)) / fit["b"]  # in logs: a nearly flat curve overflows a float
    return math.exp(log_n) if log_n <= math.log(MAX_FORECAST) else None


def forecast(points: list[dict], goal: float, draws: int = 1000, seed: int = 0) -> dict:
    """The fitted curve, the records it needs for `goal` with a 90% interval over resampled test examples, and
    whether the last size is a plateau (see the module doc). `points` carry per-example `correct` lists of equal
    length (one test set) in increasing `n`."""
    points = sorted(points, key=lambda p: p["n"])
    fit = fit_curve(points)
    best = max(_accuracy(p) for p in points)
    out = {"goal": goal, "fit": fit, "n": records_for(fit, goal), "low": None, "high": None,
           "reached": best >= goal, "plateau": _plateau(points)}
    size = len(points[0]["correct"])
    if size == 0 or any(len(p["correct"]) != size for p in points):
        return out
    rng, needed = random.Random(seed), []
    for _ in range(draws):
        idx = [rng.randrange(size) for _ in range(size)]
        sample = [{"n": p["n"], "accuracy": sum(p["correct"][i] for i in idx) / size} for p in points]
        needed.append(records_for(fit_curve(sample), goal))
    reachable = sorted(n for n in needed if n is not None)
    out["share_of_draws_reaching"] = len(reachable) / draws
    if len(reachable) >= 0.9 * draws:
        out["low"], out["high"] = reachable[int(0.05 * len(reachable))], reachable[int(0.95 * len(reachable)) - 1]
    return out


def _plateau(points: list[dict]) -> bool:
    """The largest size no better than the one before it by more than 1.96 standard errors of the difference."""
    if len(points) < 2:
        return False
    a, b = points[-2], points[-1]
    pa, pb = _accuracy(a), _accuracy(b)
    m = len(b.get("correct") or []) or 1
    se = math.sqrt(max(pa * (1 - pa) + pb * (1 - pb), 1e-12) / m)
    return pb - pa <= 1.96 * se


def _accuracy(p: dict) -> float:
    if "accuracy" in p:
        return p["accuracy"]
    return sum(p["correct"]) / len(p["correct"]) if p["correct"] else 0.0


def curve_path(agent: str) -> str:
    """Where an agent's latest learning curve lives in the home (written by `bench/learning_curve.py --home`)."""
    return f"reports/{agent}/learning.json"


def save_curve(store, agent: str, curve: dict) -> None:
    """Keep an agent's curve ({"points", "forecast", "n_test", ...}) where the report and the status page read it."""
    store.write_json(curve_path(agent), curve)


def traffic(curve: dict | None, records: int | None, gate_passed: bool | None) -> dict:
    """What more traffic would do for an agent: the train records it has, the forecast records for the curve's goal
    (with its 90% interval), and its state: `served` (the gate passed), `waiting for traffic` (the forecast is
    beyond the records it has), `plateau` (the curve has flattened below the goal: more of the same traffic is not
    forecast to help), `no forecast` (no curve, or one with no reachable fit) or `failing` (the forecast says the
    records it has should do, yet the gate failed)."""
    fc = (curve or {}).get("forecast") or {}
    out = {"records": records, "goal": fc.get("goal"), "forecast": fc.get("n"), "low": fc.get("low"),
           "high": fc.get("high"), "plateau": bool(fc.get("plateau")),
           "sizes": [p.get("n") for p in (curve or {}).get("points") or []]}
    if gate_passed:
        state = "served"
    elif out["plateau"] and not fc.get("reached"):
        state = "plateau"
    elif out["forecast"] is None or records is None:
        state = "no forecast"
    else:
        state = "waiting for traffic" if out["forecast"] > records else "failing"
    return {**out, "state": state}
