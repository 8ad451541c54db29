"""Serve: the OpenAI-compatible app on the shared local Ray, a tiny real Llama with real PEFT adapters, a real
fake teacher (uvicorn on 127.0.0.1) and the official `openai` client.

    .venv/bin/python -m pytest tests/test_serve.py -x -q

One app for the module. Agents: sgd_Flights and sgd_Restaurants have promoted adapters (student),
sgd_Hotels has none (teacher), sgd_Drifted has an adapter but its route is "teacher", sgd_Broken's teacher
answers HTTP 500.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import time
from types import SimpleNamespace

import httpx
import pyarrow as pa
import pytest

from flywheel.capture.ingest import reassemble_stream
from flywheel.capture.store import LogStore
from flywheel.config import ServeConfig
from flywheel.registry.registry import Registry
from flywheel.routing import STUDENT, register_agent, set_route
from flywheel.schema import LOG_RECORD
from flywheel.serve.protocol import APIError, completion_from_text, parse_request, stream_events
from flywheel.serve.teacher import HTTPTeacher, TeacherError
from flywheel.storage import Store
from serving import ASK, FLIGHTS_TOOL, free_port, make_adapter, start_teacher, wait_ok

# -- pure parts: no Ray -------------------------------------------------------------------------------------
def test_completion_from_text_tool_call():
    text = '<tool_call>{"name": "FindFlights", "arguments": {"origin": "SF"}}</tool_call>'
    c = completion_from_text("sgd_Flights", text, 10, 5, "student:sgd_Flights@v1", "abc123")
    assert c["object"] == "chat.completion" and c["id"] == "chatcmpl-abc123" and c["model"] == "sgd_Flights"
    assert c["system_fingerprint"] == "student:sgd_Flights@v1"
    choice = c["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "FindFlights" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"origin": "SF"}
    assert c["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    # The same answer streamed reassembles to the same message.
    events = list(stream_events(c, include_usage=True))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks) and chunks[-1]["usage"]["total_tokens"] == 15
    assert reassemble_stream(chunks)["tool_calls"][0]["function"] == call["function"]

    plain = completion_from_text("a", "  Sure, which day?  ", 3, 4, "student:a@v1")
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "Sure, which day?"}
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert completion_from_text("a", "cut off", 3, 8, "x", truncated=True)["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "a", "messages": []}, "messages"),
    ({"model": "a", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "a", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "a", "messages": [{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{nope"}}]}]}, "messages[0].tool_calls[0]"),
])
def test_parse_request_names_the_field(body, field):
    with pytest.raises(APIError) as e:
        parse_request(body)
    assert e.value.status == 400 and e.value.param == field and e.value.message.startswith(field)


def test_parse_request_rows_and_passthrough():
    req, rows = parse_request({"model": "a", "seed": 7, "service_tier": "auto", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]})
    assert rows[0]["content"] == "hi there" and req.seed == 7 and req.model_extra == {"service_tier": "auto"}


def test_teacher_client_errors_say_what_happened(teacher):
    async def ask(url: str, agent: str, timeout_s: float = 5.0) -> dict:
        client = HTTPTeacher(url, timeout_s=timeout_s)
        try:
            return await client.complete(agent, {"model": agent, "messages": ASK, "stream": True,
                                                 "stream_options": {"include_usage": True}})
        finally:
            await client.aclose()

    assert asyncio.run(ask(teacher.url, "sgd_Hotels"))["choices"][0]["message"]["tool_calls"]
    assert teacher.seen[-1]["stream"] is False and "stream_options" not in teacher.seen[-1]
    with pytest.raises(TeacherError, match="did not answer within 0.3s"):
        asyncio.run(ask(teacher.url, "sgd_Slow", timeout_s=0.3))
    with pytest.raises(TeacherError, match="HTTP 500: teacher is down"):
        asyncio.run(ask(teacher.url, "sgd_Broken"))
    with pytest.raises(TeacherError, match="could not reach"):
        asyncio.run(ask(f"http://127.0.0.1:{free_port()}/v1", "sgd_Hotels"))


def test_an_idle_decode_loop_waits_for_its_batch_until_it_is_full_or_the_wait_ends():
    import asyncio
    import threading

    from flywheel.serve.student import StudentModel

    cls = StudentModel.func_or_class  # the replica's class, without Serve: only its batch filling runs
    student = cls.__new__(cls)
    student._waiting, student._waiting_lock = [], threading.Lock()

    async def fill(rows: int, wait_s: float) -> None:
        student.cfg = ServeConfig(max_batch_size=2, batch_wait_s=wait_s)
        student._waiting.clear()
        student._wake = asyncio.Event()
        filling = asyncio.create_task(student._fill())
        await asyncio.sleep(0.01)
        for row in range(rows):
            with student._waiting_lock:
                student._waiting.append(row)
            student._wake.set()
        await asyncio.wait_for(filling, 60)  # TimeoutError here: it kept waiting

    asyncio.run(fill(2, 600.0))  # a full batch starts at once, not after its 600 s wait
    asyncio.run(fill(1, 0.05))  # a partial one after the wait


# -- the app on Ray Serve -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher():
    """A real OpenAI-compatible server that answers every agent with one fixed tool call (sgd_Broken: HTTP 500)."""
    server, stop = start_teacher()
    yield server
    stop()


@pytest.fixture(scope="module")
def served(ray_session, tiny_model, tmp_path_factory, teacher):
    from ray import serve

    from flywheel.serve.app import run, shutdown

    root = tmp_path_factory.mktemp("serve")
    store = Store(str(root / "home"))
    registry = Registry(store)
    for i, agent in enumerate(["sgd_Flights", "sgd_Restaurants", "sgd_Drifted"]):
        adapter = make_adapter(tiny_model, str(root / f"adapter-{agent}"), seed=i)
        entry = registry.register(agent, adapter, {"dataset_version": "test", "base_model": tiny_model})
        registry.promote(agent, entry["version"])
    for agent in ["sgd_Flights", "sgd_Hotels", "sgd_Broken", "sgd_Drifted"]:
        register_agent(store, agent, tenant="acme")
    set_route(store, "sgd_Drifted", "teacher", "drift")
    cfg = ServeConfig(home=store.uri, base_model=tiny_model, port=free_port(), teacher_url=teacher.url,
                      max_adapters_per_replica=2, replica_cpus=0.5, max_new_tokens=8, max_batch_size=4,
                      batch_wait_s=0.2, routing_ttl_s=0.3, base_model_name="student-base")
    serve.shutdown()  # HTTP options are fixed when Serve starts: start it fresh on our port
    url = run(cfg)
    yield SimpleNamespace(url=url, base=url[: -len("/v1")], store=store, cfg=cfg, root=root, teacher=teacher)
    shutdown()


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=served.url, api_key="x", max_retries=0, timeout=120)


def captured(store: Store, record_id: str) -> dict:
    [rec] = [r for r in LogStore(store).read_wal() if r["record_id"] == record_id]
    assert set(rec) == set(LOG_RECORD.names)
    pa.Table.from_pylist([rec], schema=LOG_RECORD)  # conforms to the contract
    return rec


def student_info() -> dict:
    from ray import serve

    return serve.get_deployment_handle("StudentModel", app_name="flywheel").info.remote().result()


def test_student_answers_and_is_captured(served, client):
    raw = client.chat.completions.with_raw_response.create(model="sgd_Flights", messages=ASK, tools=[FLIGHTS_TOOL],
                                                           max_tokens=4, metadata={"session_id": "s-1"})
    assert raw.headers["x-flywheel-backend"] == "student:sgd_Flights@v1"
    c = raw.parse()
    assert c.object == "chat.completion" and c.model == "sgd_Flights" and c.id.startswith("chatcmpl-")
    assert c.system_fingerprint == "student:sgd_Flights@v1"
    assert c.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert c.usage.prompt_tokens > 20 and 0 <= c.usage.completion_tokens <= 4  # max_tokens honoured
    rec = captured(served.store, raw.headers["x-flywheel-record-id"])
    assert c.id == f"chatcmpl-{rec['record_id']}"
    assert rec["agent_id"] == "sgd_Flights" and rec["model"] == "student:sgd_Flights@v1" and rec["source"] == "serve"
    assert rec["tenant"] == "acme" and rec["session_id"] == "s-1" and rec["latency_ms"] > 0
    assert [m["content"] for m in rec["messages"]] == [m["content"] for m in ASK]
    assert json.loads(rec["tools_json"])[0]["function"]["name"] == "FindFlights"
    assert rec["completion_tokens"] == c.usage.completion_tokens


def test_teacher_only_agent_is_forwarded_and_captured(served, client):
    raw = client.chat.completions.with_raw_response.create(model="sgd_Hotels", messages=ASK, temperature=0.3)
    assert raw.headers["x-flywheel-backend"] == "teacher:sgd_Hotels"
    c = raw.parse()
    assert c.model == "sgd_Hotels" and c.choices[0].finish_reason == "tool_calls"
    assert c.choices[0].message.tool_calls[0].function.name == "FindHotels"
    sent = served.teacher.seen[-1]
    assert sent["model"] == "sgd_Hotels" and sent["stream"] is False and sent["temperature"] == 0.3
    assert sent["messages"] == ASK
    rec = captured(served.store, raw.headers["x-flywheel-record-id"])
    assert rec["model"] == "teacher:sgd_Hotels" and rec["response"]["tool_calls"][0]["name"] == "FindHotels"
    assert rec["prompt_tokens"] == 12 and rec["completion_tokens"] == 7

    # An agent with an adapter whose route was switched to the teacher (drift) goes to the teacher too.
    drifted = client.chat.completions.with_raw_response.create(model="sgd_Drifted", messages=ASK)
    assert drifted.headers["x-flywheel-backend"] == "teacher:sgd_Drifted"


def test_teacher_failure_is_502(served):
    r = httpx.post(f"{served.url}/chat/completions", json={"model": "sgd_Broken", "messages": ASK}, timeout=60)
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "teacher_error" and "HTTP 500" in err["message"] and "maintenance" in err["message"]


def test_unknown_agent_is_404(client, served):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="sgd_Nope", messages=ASK)
    assert e.value.code == "model_not_found" and "sgd_Nope" in e.value.message
    r = httpx.post(f"{served.url}/chat/completions", json={"model": "../registry/x", "messages": ASK}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # never a path


def test_malformed_bodies_are_openai_errors(served):
    endpoint = f"{served.url}/chat/completions"
    r = httpx.post(endpoint, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(endpoint, json={"model": "sgd_Flights"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["message"].startswith("messages: Field required")
    r = httpx.post(endpoint, json={"model": "sgd_Flights", "messages": [{"role": "robot", "content": "hi"}]}, timeout=30)
    assert r.status_code == 400 and "messages[0].role" in r.json()["error"]["message"]
    r = httpx.get(f"{served.url}/nowhere", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_models_lists_agents(served, client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"sgd_Flights", "sgd_Restaurants", "sgd_Hotels", "sgd_Broken", "sgd_Drifted", "student-base"}
    assert client.models.retrieve("sgd_Restaurants").id == "sgd_Restaurants"  # known from the registry only
    assert httpx.get(f"{served.base}/healthz", timeout=30).json() == {"status": "ok"}


def test_base_model_route_answers_without_an_adapter_and_is_captured(served, client, tiny_model):
    from flywheel.inference.engine import HFEngine
    from flywheel.prompts import chat_messages

    raw = client.chat.completions.with_raw_response.create(model="student-base", messages=ASK, max_tokens=6,
                                                           temperature=0)
    assert raw.headers["x-flywheel-backend"] == "student:student-base"
    answer = raw.parse()
    [expected] = HFEngine(tiny_model, device="cpu").generate([chat_messages(ASK, [])], [None], max_new_tokens=6)
    assert (answer.choices[0].message.content or "") == expected.text.strip()  # the base model's greedy answer
    adapted = client.chat.completions.create(model="sgd_Flights", messages=ASK, max_tokens=6, temperature=0)
    assert adapted.system_fingerprint == "student:sgd_Flights@v1"  # an agent's adapter still answers its agent
    rec = captured(served.store, raw.headers["x-flywheel-record-id"])
    assert rec["agent_id"] == "student-base" and rec["model"] == "student:student-base"
    assert client.models.retrieve("student-base").id == "student-base"


def test_streaming(served, client):
    chunks = list(client.chat.completions.create(model="sgd_Flights", messages=ASK, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "sgd_Flights"
    # Teacher answers stream too, tool calls as deltas.
    stream = client.chat.completions.create(model="sgd_Hotels", messages=ASK, stream=True)
    calls = [tc for c in stream for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert calls[0].function.name == "FindHotels" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert "stream_options" not in served.teacher.seen[-1] and served.teacher.seen[-1]["stream"] is False


def test_one_batch_mixes_agents(served, client):
    for agent in ("sgd_Flights", "sgd_Restaurants"):  # warm both adapters
        client.chat.completions.create(model=agent, messages=ASK, max_tokens=2)
    before = student_info()["mixed_batches"]
    agents = ["sgd_Flights", "sgd_Restaurants"] * 2
    for _ in range(3):  # arrivals must land within batch_wait_s of each other; retry on a busy machine
        with concurrent.futures.ThreadPoolExecutor(len(agents)) as pool:
            raws = list(pool.map(lambda a: client.chat.completions.with_raw_response.create(
                model=a, messages=ASK, max_tokens=3), agents))
        assert [r.headers["x-flywheel-backend"] for r in raws] == [f"student:{a}@v1" for a in agents]
        if student_info()["mixed_batches"] > before:
            break
    info = student_info()
    assert info["mixed_batches"] > before and info["largest_batch"] >= 2


def test_promotion_loads_new_version_and_evicts_old(served, client):
    registry = Registry(served.store)
    client.chat.completions.create(model="sgd_Flights", messages=ASK, max_tokens=2)
    client.chat.completions.create(model="sgd_Restaurants", messages=ASK, max_tokens=2)  # Flights@v1 is now LRU
    assert student_info()["adapters"] == ["sgd_Flights@v1", "sgd_Restaurants@v1"]
    v2 = registry.register("sgd_Flights", make_adapter(served.cfg.base_model, str(served.root / "flights-v2"), 9),
                           {"dataset_version": "test2", "base_model": served.cfg.base_model})
    registry.promote("sgd_Flights", v2["version"])
    time.sleep(served.cfg.routing_ttl_s + 0.3)  # the ingress's routing cache expires
    raw = client.chat.completions.with_raw_response.create(model="sgd_Flights", messages=ASK, max_tokens=2)
    assert raw.headers["x-flywheel-backend"] == "student:sgd_Flights@v2"
    assert captured(served.store, raw.headers["x-flywheel-record-id"])["model"] == "student:sgd_Flights@v2"
    # max_adapters_per_replica=2: loading v2 evicted v1, and eviction unloaded it from the engine.
    assert student_info()["adapters"] == ["sgd_Flights@v2", "sgd_Restaurants@v1"]


def test_no_teacher_configured_is_503(served):
    from ray import serve

    from flywheel.serve.app import build_app

    cfg = dataclasses.replace(served.cfg, teacher_url="")
    serve.run(build_app(cfg), name="flywheel-noteacher", route_prefix="/noteacher", blocking=False)
    try:
        wait_ok(f"{served.base}/noteacher/healthz")
        r = httpx.post(f"{served.base}/noteacher/v1/chat/completions", json={"model": "sgd_Hotels", "messages": ASK},
                       timeout=60)
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "teacher_not_configured" and "teacher_url" in err["message"]
        assert err["type"] == "server_error"
    finally:
        serve.delete("flywheel-noteacher")


def test_a_corrupt_adapter_fails_only_its_agent_and_prewarm_loads_production(served, client):
    registry = Registry(served.store)
    entry = registry.register("sgd_Corrupt", make_adapter(served.cfg.base_model, str(served.root / "corrupt"), 5),
                              {"dataset_version": "test", "base_model": served.cfg.base_model})
    registry.promote("sgd_Corrupt", entry["version"])
    with open(registry.adapter_path(entry) + "/adapter_model.safetensors", "wb") as f:
        f.write(b"not a safetensors file")
    failures = student_info()["adapter_failures"]
    time.sleep(served.cfg.routing_ttl_s + 0.3)  # the ingress's catalog sees the new agent
    r = httpx.post(f"{served.url}/chat/completions", json={"model": "sgd_Corrupt", "messages": ASK}, timeout=60)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "adapter_unavailable" and "sgd_Corrupt@v1" in err["message"]
    assert "cannot be read" in err["message"]
    assert client.chat.completions.create(model="sgd_Restaurants", messages=ASK, max_tokens=2).choices  # others serve
    info = student_info()
    assert info["adapter_failures"] > failures and "sgd_Corrupt@v1" not in info["adapters"]

    from ray import serve

    handle = serve.get_deployment_handle("StudentModel", app_name="flywheel")
    warmed = handle.prewarm.remote(["sgd_Restaurants", "sgd_Hotels", "sgd_Corrupt"]).result()
    assert warmed["loaded"] == ["sgd_Restaurants@v1"]
    assert warmed["failed"]["sgd_Hotels"] == "no production adapter" and "sgd_Corrupt" in warmed["failed"]
    assert "sgd_Restaurants@v1" in student_info()["resident"]


def test_a_promotion_is_prewarmed_before_its_first_request(served, client):
    """The Ingress's catalog sees a new production adapter and asks the student to load it: it is resident
    before anyone has called that agent."""
    registry = Registry(served.store)
    entry = registry.register("sgd_Warm", make_adapter(served.cfg.base_model, str(served.root / "warm"), 7),
                              {"dataset_version": "test", "base_model": served.cfg.base_model})
    registry.promote("sgd_Warm", entry["version"])
    set_route(served.store, "sgd_Warm", STUDENT, "promoted: test")
    time.sleep(served.cfg.routing_ttl_s + 0.3)
    client.chat.completions.create(model="sgd_Flights", messages=ASK, max_tokens=2)  # any request refreshes
    deadline = time.monotonic() + 60
    while "sgd_Warm@v1" not in student_info()["adapters"]:
        assert time.monotonic() < deadline, student_info()
        time.sleep(0.3)
    assert "sgd_Warm@v1" in student_info()["resident"]
    r = client.chat.completions.with_raw_response.create(model="sgd_Warm", messages=ASK, max_tokens=2)
    assert r.headers["x-flywheel-backend"] == "student:sgd_Warm@v1"


def test_a_new_student_replica_prewarms_the_busiest_agents(served, client):
    """The Ingress writes the busiest student agents into the home; a replacement replica loads their adapters
    before any request reaches it."""
    import ray

    from flywheel.serve.autoscale import HOT_AGENTS

    deadline = time.monotonic() + 90
    while not (served.store.read_json(HOT_AGENTS) or {}).get("agents"):  # Serve asks for the figures periodically
        client.chat.completions.create(model="sgd_Flights", messages=ASK, max_tokens=2)
        assert time.monotonic() < deadline, "the Ingress never wrote the busiest agents"
        time.sleep(1.0)
    assert "sgd_Flights" in served.store.read_json(HOT_AGENTS)["agents"]
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#StudentModel#" in a["name"]
              and a["name"].startswith("SERVE_REPLICA::flywheel#")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    deadline = time.monotonic() + 120
    while True:  # the replacement: only handle calls reach it until this test sends a request
        try:
            info = student_info()
            if info["prewarmed_at_start"]:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "the new replica did not prewarm"
        time.sleep(0.5)
    # the busiest that fit the replica (max_adapters_per_replica 2); an earlier test's broken adapter fails alone
    hot = served.store.read_json(HOT_AGENTS)["agents"][:served.cfg.max_adapters_per_replica]
    loadable = [a for a in hot if a != "sgd_Corrupt"]
    assert info["requests"] == 0 and info["prewarmed_at_start"] == len(loadable)
    registry = Registry(served.store)
    assert {f"{a}@{registry.alias(a)['version']}" for a in loadable} <= set(info["resident"])
