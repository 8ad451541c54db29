"""Where every bench script writes its figures: bench/out/<kind>-<time>.json (printed as `results: <path>`)."""

import json
import os
import time

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def save(kind: str, out: dict) -> str:
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"results: {path}")
    return path
