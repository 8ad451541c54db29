"""The CUDA paths: HFEngine on the GPU, the vLLM CUDA wheel with many adapters inside Serve, a DeepSpeed ZeRO-3
training step on the GPU. Marked `gpu`: skipped without CUDA (conftest). `bench/gpu_check.sh` installs what a bare
GPU machine lacks and runs them, then `bench/peer.py` at GPU scale.

On a GPU machine the vLLM engine runs in the main environment (`pip install -e ".[gpu]"`: the CUDA wheel of vllm
beside flywheel), so `replica_python` stays empty here.
"""

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import free_port, strong_adapter

from flywheel.capture.store import ingest_file
from flywheel.config import CurateConfig, DistillConfig, ServeConfig

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
PROMPTS = [[{"role": "user", "content": "Find me a flight from Phoenix to Las Vegas on March 12th."}],
           [{"role": "user", "content": "A table for two at an Italian place in Oakland tonight, please."}]]
LOGPROB_TOL = 2e-3  # fp32 on both devices (no TF32: PyTorch's default for matmuls)


def test_hf_engine_on_cuda_answers_as_on_the_cpu(student_path, tmp_path):
    from flywheel.inference.engine import HFEngine, Row, Sampling

    adapter = strong_adapter(student_path, str(tmp_path / "adapter"))
    answers = {}
    for device in ("cpu", "cuda"):
        engine = HFEngine(student_path, dtype="float32", device=device)
        assert engine.device.startswith(device)
        engine.load_adapter("a", adapter)
        rows = [Row(p, a, Sampling(24, logprobs=True)) for p in PROMPTS for a in (None, "a")]  # mixed batch
        answers[device] = engine.run_batch(rows)
    for cpu, gpu in zip(answers["cpu"], answers["cuda"]):
        assert (gpu.text, list(gpu.tokens)) == (cpu.text, list(cpu.tokens))
        assert max(abs(a - b) for a, b in zip(gpu.logprobs, cpu.logprobs)) < LOGPROB_TOL


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="no vllm here (pip install -e '.[gpu]')")
def test_vllm_cuda_serves_many_adapters_inside_serve(ray_session, student_path, tmp_path):
    """100 agents on one GPU replica (`engine: auto` with `replica_gpus: 1` picks vLLM), traffic over all of them
    from concurrent official clients: every answer 200, from the vLLM replica, greedy as the HF engine on the GPU."""
    import openai
    from ray import serve

    from flywheel.inference.engine import HFEngine
    from flywheel.registry.registry import Registry
    from flywheel.routing import register_agent
    from flywheel.serve.app import run, shutdown
    from flywheel.storage import Store

    store = Store(str(tmp_path / "home"))
    registry = Registry(store)
    agents = [f"gpu_{i:03d}" for i in range(100)]
    paths = {}
    for i, agent in enumerate(agents):
        paths[agent] = strong_adapter(student_path, str(tmp_path / f"adapter-{i}"), seed=i)
        registry.promote(agent, registry.register(agent, paths[agent], {"dataset_version": "gpu",
                                                                           "base_model": student_path})["version"])
        register_agent(store, agent, tenant="gpu")
    cfg = ServeConfig(home=store.uri, base_model=student_path, port=free_port(), auth="off", rate_limit_rps=0,
                      replica_gpus=1, num_replicas=1, dtype="float32", max_new_tokens=16, max_batch_size=32,
                      max_resident_adapters=16, max_adapters_per_replica=128, max_adapter_rank=8)
    serve.shutdown()
    url = run(cfg, ready_timeout_s=900)
    try:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=2, timeout=300)
        ask = lambda i: client.chat.completions.create(model=agents[i % 100], messages=PROMPTS[i % 2],  # noqa: E731
                                                       max_tokens=16).choices[0].message.content
        with ThreadPoolExecutor(32) as pool:
            texts = list(pool.map(ask, range(200)))
        info = serve.get_deployment_handle("StudentModel", app_name="flywheel").info.remote().result(timeout_s=60)
        assert info["engine"] == "vllm" and len(info["adapters"]) == 100, info
    finally:
        shutdown()
    hf = HFEngine(student_path, dtype="float32", device="cuda")
    for i in (0, 1, 57):
        hf.load_adapter(agents[i], paths[agents[i]])
        assert hf.generate([PROMPTS[i % 2]], [agents[i]], 16)[0].text == texts[i], i


def test_deepspeed_zero3_trains_a_step_on_the_gpu(ray_session, store, sgd_sample, tiny_model):
    from safetensors.torch import load_file

    from flywheel.curate.pipeline import curate
    from flywheel.distill.train import distill

    ingest_file(store, sgd_sample)
    curate(CurateConfig(agents=("sgd_Flights",), min_examples=4), store)
    out = distill(DistillConfig(agent="sgd_Flights", base_model=tiny_model, num_workers=1, use_gpu=True,
                                strategy="deepspeed", zero_stage=3, batch_size=2, max_length=1024, max_steps=2,
                                checkpoint_every=1, run_name="gpu-zero3"), store)
    assert out["steps"] == 2 and out["loss"] == out["loss"]  # finite, not NaN
    weights = load_file(os.path.join(store.path(f"adapters/sgd_Flights/{out['version']}"), "adapter_model.safetensors"))
    assert any(float(w.float().abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)
    assert json.dumps(out)  # the result is plain data
