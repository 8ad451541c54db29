"""Run inside vLLM's environment by tests/test_vllm_engine.py: VLLMEngine's greedy answers as JSON.

    .venv-vllm/bin/python tests/vllm_check.py MODEL ADAPTER OUT.json < prompts.json   (vLLM logs on stdout)
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from flywheel.inference.vllm_engine import VLLMEngine

    model, adapter = sys.argv[1], sys.argv[2]
    job = json.load(sys.stdin)
    engine = VLLMEngine(model, max_loras=2, max_cpu_loras=2, max_lora_rank=16, dtype="float32")
    engine.load_adapter("a", adapter)
    n = len(job["prompts"])
    plain = engine.generate(job["prompts"] * 2, [None] * n + ["a"] * n, job["max_tokens"])
    constrained = engine.generate(job["prompts"][:1], ["a"], 96, constraints=[job["constraint"]])
    engine.close()
    with open(sys.argv[3], "w") as f:
        json.dump({"texts": [g.text for g in plain], "tokens": [g.completion_tokens for g in plain],
                   "constrained": constrained[0].text}, f)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard keeps it from running this again
    main()
