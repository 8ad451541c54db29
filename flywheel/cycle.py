"""One turn of the flywheel, as a table of contents. Each line is a stage package; each stage reads and writes
only the store, so any line can also run alone (`flywheel <verb>`, `jobs/<verb>.py`).

    capture  (flywheel.capture)  Serve writes every answered request to the log store before it answers
    curate   (flywheel.curate)   logs -> validated, redacted, deduplicated, split dataset version per agent
    distill  (flywheel.distill)  a LoRA adapter per agent on Ray Train, registered as a new version
    evaluate (flywheel.evaluate) teacher vs base vs production vs candidate on held-out traffic; the gate
    promote  (flywheel.registry) compare-and-swap of the `production` alias; Serve picks it up
    monitor  (flywheel.monitor)  drift -> route to the teacher -> queue a retrain -> `retrain_pending()` turns again
"""

from __future__ import annotations

import os

from flywheel.config import CurateConfig, DistillConfig, EvaluateConfig
from flywheel.storage import Store


def turn(store: Store, agents: tuple[str, ...], base_model: str, distill: dict | None = None,
         evaluate: dict | None = None) -> dict:
    """Curate -> distill -> evaluate/gate/promote for each agent. Returns {agent: {dataset, train, eval}}."""
    from flywheel.capture.store import LogStore
    from flywheel.curate.pipeline import curate
    from flywheel.distill.train import distill as train
    from flywheel.evaluate.run import evaluate as score

    LogStore(store).compact()
    datasets = curate(CurateConfig(home=store.uri, agents=agents), store)
    out = {}
    for agent in agents:
        if not datasets.get(agent, {}).get("published"):
            out[agent] = {"dataset": datasets.get(agent), "skipped": "no usable dataset"}
            continue
        trained = train(DistillConfig(agent=agent, home=store.uri, base_model=base_model, **(distill or {})), store)
        report = score(EvaluateConfig(agent=agent, home=store.uri, base_model=base_model,
                                      adapter_version=trained["version"], promote=True, **(evaluate or {})), store)
        out[agent] = {"dataset": datasets[agent], "train": trained,
                      "gate": report["gate"], "promoted": report["promoted"], "candidate": report[report["gated"]]}
    return out


def retrain_pending(store: Store, base_model: str, distill: dict | None = None, evaluate: dict | None = None) -> dict:
    """Close the loop: turn once for every agent with a queued retrain, then clear its requests."""
    from flywheel.routing import retrain_queue

    queue = retrain_queue(store)
    agents = tuple(sorted({q["agent"] for q in queue}))
    if not agents:
        return {}
    result = turn(store, agents, base_model, distill, evaluate)
    for name in store.list("queue/retrain"):
        request = store.read_json(f"queue/retrain/{name}") if name.endswith(".json") else None
        if request and request.get("agent") in agents:
            store.remove(f"queue/retrain/{name}")
    return result


if __name__ == "__main__":
    import sys

    home = Store(os.environ.get("FLYWHEEL_HOME"))
    print(turn(home, tuple(sys.argv[1:]), os.environ.get("FLYWHEEL_STUDENT", "models/smollm2-135m-instruct")))
