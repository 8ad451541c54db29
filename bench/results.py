"""Where every bench script writes its figures: bench/figures/<kind>-<time>.json (printed as `results: <path>`), a
tracked folder, so the result a README figure rests on can be committed beside it (bench/out/ stays for caches)."""

import json
import os
import time

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


def save(kind: str, out: dict, path: str = "", quiet: bool = False) -> str:
    """Write `out`; `path` (a previous call's) rewrites that file: a long run saves what finished as it goes."""
    os.makedirs(OUT, exist_ok=True)
    path = path or os.path.join(OUT, f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(out, f, indent=2, default=str)
    os.replace(f"{path}.tmp", path)
    if not quiet:
        print(f"results: {path}")
    return path
