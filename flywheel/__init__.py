"""Flywheel: a Ray-native data flywheel for LLM agents.

capture -> curate -> distill -> (sweep) -> evaluate/gate -> registry -> serve -> monitor -> (review) -> ...
See `flywheel/cycle.py` for one turn of the loop and `flywheel.cli` for the verbs.
"""

import os

# Models and data load from local paths only: never reach for a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
