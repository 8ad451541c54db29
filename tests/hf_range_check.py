"""Run under another transformers by tests/test_packaging.py (in .venv-vllm, which holds the lowest version
pyproject.toml allows, and the xgrammar vLLM pins): HFEngine's greedy answers, free and under the tool-call grammar, and the training's shared-prefix pass against the plain batch.

    .venv-vllm/bin/python tests/hf_range_check.py MODEL ADAPTER OUT.json

Writes {"transformers": version, "texts": [...], "prefix_max_diff": float}.
"""

import json
import sys

CONSTRAINT = {"type": "tool_calls", "parallel": False, "tools": [{"name": "SearchOnewayFlight", "parameters": {
    "type": "object", "properties": {"origin_city": {"type": "string"}, "destination_city": {"type": "string"}},
    "required": ["origin_city", "destination_city"]}}]}


def main() -> None:
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flywheel.distill.data import answer_logits, collate
    from flywheel.inference.engine import HFEngine

    model_path, adapter, out = sys.argv[1:4]
    prompts = json.loads(sys.stdin.read())
    hf = HFEngine(model_path, dtype="float32")
    hf.load_adapter("a", adapter)
    texts = [g.text for g in hf.generate(prompts * 2, [None] * len(prompts) + ["a"] * len(prompts), 16)]
    texts += [g.text for g in hf.generate(prompts[:1], ["a"], 64, constraints=[CONSTRAINT])]  # xgrammar there
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), adapter)
    head = hf.encode(prompts[0])
    rows = [{"input_ids": head + [int(t) for t in tail], "answer_len": 3} for tail in ([11, 12, 13, 14], [15, 16, 17])]
    with torch.no_grad():
        plain, _ = answer_logits(model, collate(rows, hf.tokenizer.pad_token_id, share_prefix=False))
        shared, _ = answer_logits(model, collate(rows, hf.tokenizer.pad_token_id, share_prefix=True))
    with open(out, "w") as f:
        json.dump({"transformers": transformers.__version__, "texts": texts,
                   "prefix_max_diff": float((plain - shared).abs().max())}, f)


if __name__ == "__main__":
    main()
