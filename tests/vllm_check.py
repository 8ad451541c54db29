"""Run inside vLLM's environment by tests/test_vllm_engine.py: VLLMEngine's greedy answers as JSON.

    .venv-vllm/bin/python tests/vllm_check.py OUT.json < jobs.json   (vLLM logs on stdout)

One engine per job, one after the other in this process (vLLM's import is most of the cost). A job names the
model, its adapter, the prompts, the token cap, the tool-call constraint and how many alternatives to keep per token;
each answer comes back with its tokens, their log-probabilities, where each token's text ends, and the
alternatives, for the test to compare with HFEngine's.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def as_json(g) -> dict:
    return {"text": g.text, "completion_tokens": g.completion_tokens, "finish_reason": g.finish_reason,
            "tokens": list(g.tokens), "logprobs": list(g.logprobs), "token_ends": list(g.token_ends),
            "top_logprobs": [[list(pair) for pair in top] for top in g.top_logprobs]}


def run(job: dict) -> dict:
    from flywheel.inference.engine import Row, Sampling
    from flywheel.inference.vllm_engine import VLLMEngine

    engine = VLLMEngine(job["model"], max_loras=2, max_cpu_loras=2, max_lora_rank=16, dtype="float32")
    engine.load_adapter("a", job["adapter"])
    n = len(job["prompts"])
    sampling = Sampling(job["max_tokens"], logprobs=True, top_logprobs=job.get("top_logprobs", 0))
    rows = [Row(p, a, sampling) for p, a in zip(job["prompts"] * 2, [None] * n + ["a"] * n)]
    plain = engine.run_batch(rows)  # base and adapter rows in one batch
    constrained = engine.generate(job["prompts"][:1], ["a"], job.get("constrained_tokens", 96),
                                  constraints=[job["constraint"]])
    engine.close()
    return {"plain": [as_json(g) for g in plain], "constrained": as_json(constrained[0])}


def main() -> None:
    results = [run(job) for job in json.load(sys.stdin)]
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard keeps it from running this again
    main()
