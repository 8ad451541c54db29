"""`flywheel demo`: one full turn of the flywheel on an embedded local Ray, real data, the real student.

    make demo            # sets up .venv and the student once, then runs this
    flywheel demo --agents sgd_Flights,sgd_Restaurants --max-steps 40

ingest the shipped SGD agent logs (dev and train splits) -> curate (Ray Data) -> distill a LoRA per agent (Ray
Train, 2 workers) -> evaluate teacher vs base vs distilled on held-out traffic, certify a confidence threshold on
the validation split -> gate and promote -> serve selectively (Ray Serve, OpenAI-compatible; a stand-in teacher
replays the logged teacher answers for the requests the student defers) -> answer held-out requests with the
official `openai` client -> drift check on shifted traffic -> a closing summary. Bounded by `--max-steps` and
`--calibration-examples`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from flywheel.config import (ConfigError, CurateConfig, DemoConfig, DistillConfig, EvaluateConfig, MonitorConfig,
                             ServeConfig)
from flywheel.storage import Store

PACKAGE_DATA = os.path.join(os.path.dirname(__file__), "data")
MARKER = ".flywheel-demo"  # a file in every home the demo made: `fresh` clears only those (or an empty folder)


def prepare_home(home: str, fresh: bool) -> None:
    """Make a local `home` ready for the demo; never delete a folder the demo did not make.

    fresh: a new or empty folder is used as it is; a folder holding `MARKER` (the demo made it) is cleared; any other
    folder is refused with a `ConfigError` that names it. Not fresh: the folder is reused as it is. A folder the
    demo starts from empty gets the marker. Remote (`s3://`) homes are never cleared.
    """
    if "://" in home:
        return
    path = os.path.abspath(os.path.expanduser(home))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"home: {path} is a file, not a folder; pass another --home")
    entries = os.listdir(path) if os.path.isdir(path) else []
    ours = MARKER in entries
    if fresh and entries and not ours:
        raise ConfigError(f"home: {path} is not empty and was not made by `flywheel demo` (no {MARKER} file in "
                          f"it), so the demo will not clear it; pass --no-fresh to reuse it, or a new --home")
    if fresh and ours:
        shutil.rmtree(path)
    if fresh or not entries:  # now new or empty: the demo makes it
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, MARKER), "w") as f:
            f.write("made by `flywheel demo`: `flywheel demo` (fresh) may delete this folder\n")


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def text_table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _shifted_requests(logs: str, exclude: set[str], n: int) -> list[dict]:
    """Requests of *other* agents (hotels, music, ...): traffic the distilled agent never saw."""
    out = []
    with open(logs) as f:
        for line in f:
            rec = json.loads(line)
            if rec["workload_id"] not in exclude and rec["workload_id"] in ("sgd_Hotels", "sgd_Music", "sgd_Media"):
                out.append(rec["request"])
            if len(out) >= n:
                break
    return out


def _logged_answers(paths: list[str]) -> dict[str, dict]:
    """The teacher's logged answer to each logged request of `paths` (plain or gzipped JSONL), keyed by its last
    user turn (the stand-in teacher): every file the demo ingested, so a deferred held-out request finds its own."""
    import gzip

    answers = {}
    for path in paths:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            for line in f:
                rec = json.loads(line)
                users = [m for m in rec["request"]["messages"] if m.get("role") == "user"]
                if users:
                    answers[users[-1]["content"]] = rec["response"]["choices"][0]["message"]
    return answers


def replay_teacher(answers: dict[str, dict]) -> tuple[Any, str]:
    """A real OpenAI-compatible HTTP server on 127.0.0.1 standing in for the teacher: it answers each request with
    the logged teacher answer to the same last user turn. (uvicorn server, base URL)."""
    import socket
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request) -> JSONResponse:
        body = await request.json()
        users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
        message = answers.get(users[-1]["content"] if users else "", {"role": "assistant",
                                                                       "content": "Could you tell me more?"})
        return JSONResponse({"id": "chatcmpl-replay", "object": "chat.completion", "created": int(time.time()),
                             "model": body.get("model"),
                             "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                             "choices": [{"index": 0, "message": message,
                                          "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def _drift_check(cfg: DemoConfig, store: Store, client, logs: str, drift_agent: str) -> tuple[dict, dict, dict]:
    from flywheel.monitor.drift import check_drift
    from flywheel.routing import get_route, retrain_queue

    calm = check_drift(MonitorConfig(agent=drift_agent, min_window=min(10, cfg.live_requests),
                                     window=cfg.live_requests), store)
    print(f"{drift_agent}, in-domain traffic ({calm['n_live']} requests): {calm['verdict']} "
          f"(drift share {calm.get('drift_share')})")
    for req in _shifted_requests(logs, set(cfg.agents), cfg.shifted_requests):
        # only the requests matter for drift: one token of answer keeps this quick
        client.chat.completions.create(model=drift_agent, messages=req["messages"], tools=req.get("tools"),
                                       max_tokens=1)
    # one window of shifted traffic decides here (persistence 1); a deployment waits for 2 in a row (the default)
    shifted = check_drift(MonitorConfig(agent=drift_agent, min_window=min(10, cfg.shifted_requests),
                                        window=cfg.shifted_requests, persistence=1), store)
    route = get_route(store, drift_agent)
    time.sleep(0.5)  # past Serve's routing cache
    print(f"{drift_agent}, shifted traffic ({shifted['n_live']} hotels/music/media requests): {shifted['verdict']} "
          f"(drift share {shifted.get('drift_share')}); drifted: {shifted.get('drifted_features')}")
    print(f"route now: {route['mode']} ({route['reason']}); retrain queue: "
          f"{[q['agent'] for q in retrain_queue(store)]}; report {shifted.get('report')}")
    raw = client.chat.completions.with_raw_response.create(model=drift_agent, max_tokens=8,
                                                           messages=[{"role": "user", "content": "hi"}])
    print(f"{drift_agent} now goes to the teacher: x-flywheel-backend {raw.headers.get('x-flywheel-backend')}")
    return calm, shifted, route


def demo(cfg: DemoConfig) -> dict:
    """The seven steps on one home, each printed as it runs; the summary as a dict (`--json`)."""
    started = time.time()
    prepare_home(cfg.home, cfg.fresh)
    store = Store(cfg.home)
    os.environ["FLYWHEEL_HOME"] = store.uri
    logs = cfg.logs or os.path.join(PACKAGE_DATA, "sgd", "sgd_dev_flywheel_logs.jsonl")
    more = [] if cfg.logs else [os.path.join(PACKAGE_DATA, "sgd", "sgd_train_flywheel_logs.jsonl.gz")]
    _start_ray()
    timings: dict[str, float] = {}
    for path in [logs, *more]:
        _ingest(store, path, timings)
    _curate(cfg, store, timings)
    _distill(cfg, store, timings)
    reports = _evaluate(cfg, store, timings)
    answered, drift = _serve_and_monitor(cfg, store, logs, reports, [logs, *more])
    return _summary(cfg, store, reports, answered, drift, timings, started)


def _start_ray() -> None:
    """Join the Ray running here (Serve, the controller), else start a small one with its dashboard."""
    import ray

    from flywheel.raycluster import connect_ray

    if ray.is_initialized():
        return
    ray_info = connect_ray(start=dict(num_cpus=2, object_store_memory=400 * 1024 * 1024, include_dashboard=True,
                                      dashboard_host="127.0.0.1"), configure_logging=False, log_to_driver=True)
    if ray_info["dashboard_url"]:
        print(f"Ray dashboard (jobs, actors, Train and Serve): http://{ray_info['dashboard_url']}")
    if not ray_info["started"] and _serve_running():  # the demo deploys, then shuts down, its own Serve
        raise ConfigError(f"Ray Serve already runs on the Ray instance at {ray_info['address']} (a `flywheel "
                          f"serve`?); the demo would replace its app and shut it down: stop it first")


def _ingest(store: Store, logs: str, timings: dict) -> None:
    from flywheel.capture.store import ingest_file

    say(f"1/7 ingest {logs} into {store.uri}")
    t = time.time()
    ing = ingest_file(store, logs)
    timings[f"ingest {os.path.basename(logs)}"] = time.time() - t
    print(f"{ing['accepted']} records accepted, {ing['quarantined']} quarantined, {len(ing['agents'])} agents")


def _curate(cfg: DemoConfig, store: Store, timings: dict) -> None:
    from flywheel.curate.pipeline import curate
    from flywheel.datasets import SPLITS

    say(f"2/7 curate on Ray Data: {', '.join(cfg.agents)}")
    t = time.time()
    manifests = curate(CurateConfig(agents=cfg.agents), store)
    timings["curate"] = time.time() - t
    print(text_table([[a, m["version"], m["counts"]["in"], *(m["counts"][s] for s in SPLITS),
                  m["counts"]["quarantined"], json.dumps(m["reasons"]) or "{}", json.dumps(m["pii"])]
                 for a, m in manifests.items()],
                ["agent", "version", "in", *SPLITS, "quarantined", "reasons", "pii redacted"]))


def _distill(cfg: DemoConfig, store: Store, timings: dict) -> None:
    from flywheel.distill.train import distill

    say(f"3/7 distill a LoRA adapter per agent on Ray Train (2 workers, {cfg.max_steps} steps)")
    for agent in cfg.agents:
        t = time.time()
        r = distill(DistillConfig(agent=agent, base_model=cfg.base_model, max_steps=cfg.max_steps,
                                  batch_size=cfg.batch_size), store)
        timings[f"distill {agent}"] = time.time() - t
        print(f"{agent}: {r['version']} steps={r['steps']} loss={r['loss']:.3f} "
              f"{r['tokens_per_s']:.0f} tok/s, {r['train_time_s']:.0f}s")


EVALUATED = ("teacher", "base", "base_in_context", "candidate", "candidate_constrained")


def _evaluate(cfg: DemoConfig, store: Store, timings: dict) -> dict[str, dict]:
    """Score every agent on its test split, gate and promote; {agent: evaluation report}."""
    from flywheel.evaluate.run import evaluate
    from flywheel.inference.engine import HFEngine

    say("4/7 evaluate teacher vs base vs distilled on held-out traffic, gate, promote")
    engine = HFEngine(cfg.base_model)
    reports, rows = {}, []
    for agent in cfg.agents:
        t = time.time()
        rep = evaluate(EvaluateConfig(agent=agent, base_model=cfg.base_model, max_examples=cfg.eval_examples,
                                      max_new_tokens=cfg.max_new_tokens, promote=True,
                                      min_share_of_teacher=cfg.min_share_of_teacher,
                                      min_examples=min(10, cfg.eval_examples), selective_target=cfg.selective_target,
                                      max_calibration_examples=cfg.calibration_examples),
                       store, engine=engine, progress=True)
        timings[f"evaluate {agent}"] = time.time() - t
        reports[agent] = rep
        for system in [s for s in EVALUATED if s in rep]:
            r = rep[system]
            label = system.replace("candidate", f"distilled {rep['candidate_version']}").replace("_", " ")
            rows.append([agent, label, f"{r['function_name_accuracy']:.2f}", f"{r['name_args_accuracy']:.2f}",
                         f"{r['slot_f1']:.2f}", _num(r.get("valid_call")), r.get("s_per_request") or "-"])
    print(text_table(rows, ["agent", "system", "function name", "name+args", "slot F1", "valid call", "s/request"]))
    print(text_table([_selective_row(a, rep) for a, rep in reports.items()],
                     ["agent", "threshold", "validation coverage", "test coverage", "test accepted accuracy",
                      "cascade exact", "teacher cost saved"]))
    for agent, rep in reports.items():
        gate = rep["gate"]
        print(f"{agent}: gate {'PASSED' if gate['passed'] else 'FAILED'} ({'; '.join(gate['reasons']) or 'ok'}); "
              f"promoted={rep['promoted']}; report {rep['report']}")
    return reports


def _selective_row(agent: str, rep: dict) -> list:
    """One agent's certificate (validation) and its check on test, as the demo prints them."""
    block = rep.get("selective") or {}
    cert, test, cascade = block.get("certificate") or {}, block.get("test") or {}, block.get("cascade") or {}
    ci = test.get("accepted_accuracy_ci")
    return [agent, _num(cert.get("threshold")), f"{_num(cert.get('coverage'))} of {cert.get('n_calibration', 0)}",
            f"{_num(test.get('coverage'))} ({test.get('accepted', 0)} of {test.get('n_test', 0)})",
            f"{_num(test.get('accepted_accuracy'))}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""),
            _num(cascade.get("cascade_accuracy")), _num(cascade.get("teacher_cost_saved"))]


def _serve_and_monitor(cfg: DemoConfig, store: Store, logs: str, reports: dict,
                       ingested: list[str]) -> tuple[dict, dict]:
    """Serve the promoted students, call them with the official client, then check drift; (answered, drift)."""
    from openai import OpenAI

    from flywheel.serve.app import run as serve_run
    from flywheel.serve.app import shutdown as serve_shutdown

    say(f"5/7 serve on Ray Serve at http://127.0.0.1:{cfg.port}/v1 and call it with the official openai client")
    teacher, teacher_url = replay_teacher(_logged_answers(ingested))
    print(f"stand-in teacher at {teacher_url}: it replays the teacher's logged answer to each request")
    url = serve_run(ServeConfig(home=store.uri, base_model=cfg.base_model, port=cfg.port, replica_cpus=1.0,
                                routing_ttl_s=0.5, blocking=False, teacher_url=teacher_url))
    client = OpenAI(base_url=url, api_key="demo", max_retries=0, timeout=120)
    print("models:", [m.id for m in client.models.list().data][:6], "...")
    promoted = [a for a in cfg.agents if reports[a]["promoted"]]
    answered = {}
    for agent in cfg.agents:
        if agent not in promoted:
            print(f"{agent}: not promoted (the gate failed), so the teacher answers all of its traffic")
        answered[agent] = _live_requests(cfg, store, client, agent, reports[agent]["dataset_version"])

    say("6/7 monitor: Evidently drift of live traffic against the training reference")
    calm, shifted, route = {}, {}, {"mode": "-"}
    if not promoted:
        print("no agent passed the gate, so no student traffic to monitor; train longer (--max-steps) to see it")
    else:
        calm, shifted, route = _drift_check(cfg, store, client, logs, promoted[0])
    serve_shutdown()
    teacher.should_exit = True
    return answered, {"in_domain": calm.get("verdict"), "shifted": shifted.get("verdict"), "route": route["mode"]}


def _live_requests(cfg: DemoConfig, store: Store, client: Any, agent: str, version: str) -> dict:
    """The agent's first `live_requests` test examples through Serve; how many call the teacher's function."""
    from flywheel.datasets import TEST, read_split
    from flywheel.schema import to_openai_message

    held_out = read_split(store, agent, version, TEST).to_pylist()
    ok, backends = 0, {}
    for i, ex in enumerate(held_out[:cfg.live_requests]):
        msgs = [to_openai_message(m) for m in ex["messages"]]
        raw = client.chat.completions.with_raw_response.create(model=agent, messages=msgs,
                                                               tools=json.loads(ex["tools_json"]), max_tokens=96)
        who = raw.headers.get("x-flywheel-backend", "").split(":")[0]
        backends[who] = backends.get(who, 0) + 1
        choice = raw.parse().choices[0]
        got = [c.function.name for c in choice.message.tool_calls or []]
        want = [c["name"] for c in ex["target"]["tool_calls"] or []]
        ok += got == want
        if i == 0:
            print(f"{agent} <- {msgs[-1]['content']!r}")
            print(f"{agent} -> finish_reason={choice.finish_reason} tool_calls="
                  f"{[(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]}")
    print(f"{agent}: {ok}/{cfg.live_requests} live answers call the teacher's function; answered by {backends}")
    return {"requests": cfg.live_requests, "function_name_matches": ok, "backends": backends}


def _summary(cfg: DemoConfig, store: Store, reports: dict, answered: dict, drift: dict, timings: dict,
             started: float) -> dict:
    say("7/7 summary")
    total = time.time() - started
    print(text_table([[k, f"{v:.0f}s"] for k, v in timings.items()] + [["total", f"{total:.0f}s"]], ["stage", "time"]))
    better = all(reports[a]["candidate"]["function_name_accuracy"] > reports[a]["base"]["function_name_accuracy"]
                 for a in cfg.agents)
    print(f"distilled student beats the base student on function-name accuracy for every agent: {better}")
    print(f"everything is under {store.uri} (datasets, adapters, registry, reports, monitor)")
    return {"home": store.uri, "agents": list(cfg.agents), "total_s": round(total, 1),
            "distilled_beats_base": better,
            "evaluation": {a: {s: reports[a][s] for s in ("teacher", "base", "candidate") if s in reports[a]}
                           for a in cfg.agents},
            "promoted": {a: reports[a]["promoted"] for a in cfg.agents},
            "selective": {a: _selective_row(a, reports[a])[1:] for a in cfg.agents}, "live": answered,
            "drift": drift}
