"""The learning-curve fit and forecast on synthetic test sets drawn from a known curve."""

import random

import pytest

from flywheel.evaluate.learning import fit_curve, forecast, predict, records_for


def drawn(sizes, a, b, examples, seed=0, floor=0.0):
    """Per-size correctness of `examples` test items whose error at n records is max(a * n^-b, floor)."""
    rng = random.Random(seed)
    u = [rng.random() for _ in range(examples)]  # one test set: an item right at n stays right at larger n
    return [{"n": n, "correct": [int(x >= max(a * n ** -b, floor)) for x in u]} for n in sizes]


def test_the_fit_recovers_a_known_power_law_and_forecasts_its_records():
    fit = fit_curve([{"n": n, "accuracy": 1 - 3.0 * n ** -0.5} for n in (25, 100, 400)])
    assert fit["a"] == pytest.approx(3.0) and fit["b"] == pytest.approx(0.5)
    assert predict(fit, 900) == pytest.approx(0.9)
    assert records_for(fit, 0.9) == pytest.approx(900)
    assert records_for({"a": 1.0, "b": -0.1}, 0.9) is None  # a curve that does not fall never gets there
    assert records_for({"a": 0.9, "b": 1e-4}, 0.8) is None  # nearly flat: far beyond reach, not an overflow
    assert fit_curve([{"n": 10, "accuracy": 0.5}]) is None


def test_the_forecast_interval_covers_the_true_records_and_a_flat_curve_is_a_plateau():
    truth = (3.0 / (1 - 0.8)) ** (1 / 0.5)  # 225 records for 0.8
    points = drawn((16, 32, 64, 128), 3.0, 0.5, examples=400)
    out = forecast(points, goal=0.8)
    assert not out["reached"] and not out["plateau"]
    assert out["low"] <= truth <= out["high"] and out["low"] < out["n"] < out["high"]
    flat = drawn((16, 32, 64, 128), 3.0, 0.5, examples=400, floor=0.6)  # capacity: never above 0.4
    out = forecast(flat, goal=0.8)
    assert out["plateau"] and not out["reached"]
    assert forecast(drawn((16, 32), 1.0, 1.0, examples=50), goal=0.8)["reached"]  # 0.94 at 16 records


def test_traffic_says_whether_an_agent_waits_for_traffic_or_fails():
    from flywheel.evaluate.learning import traffic

    curve = {"points": [{"n": 30}, {"n": 60}], "forecast": {"goal": 0.8, "n": 1900.0, "low": 900.0,
                                                            "high": 5000.0, "plateau": False, "reached": False}}
    assert traffic(curve, 200, False)["state"] == "waiting for traffic"
    assert traffic(curve, 2500, False)["state"] == "failing"  # it has the records the curve asks for
    assert traffic(curve, 200, True)["state"] == "served"
    flat = {"points": curve["points"], "forecast": {**curve["forecast"], "n": None, "plateau": True}}
    assert traffic(flat, 200, False)["state"] == "plateau"
    assert traffic(None, 200, False) | {"sizes": None} == {"records": 200, "goal": None, "forecast": None,
                                                          "low": None, "high": None, "plateau": False,
                                                          "sizes": None, "state": "no forecast"}
    got = traffic(curve, 200, False)
    assert (got["records"], got["forecast"], got["low"], got["high"], got["sizes"]) == (200, 1900.0, 900.0, 5000.0,
                                                                                      [30, 60])
