"""Tokens a training epoch computes, counted (no training): rows whole, with the shared prefix, and with one sequence
per conversation (the lever measured and not built).

    .venv/bin/python bench/train_tokens.py --agents sgd_Flights,sgd_Restaurants --out bench/figures/train-tokens.json

The shipped dev and train logs are ingested and curated (`bench/selective.py`'s `prepare`); each agent's train split
is encoded as training encodes it (`distill.data.encode`, `--max-length`, the 10-turn history window) and batched
as training batches it (`length_buckets`, `--batch-size` rows). Counted per agent:

- rows whole: every row's tokens;
- shared prefix: each batch's common prefix once plus every row's own tokens (`shared_prefix_len`);
- conversations: records of one session whose whole sequence (prompt + answer) begins a later record's prompt
  merged into that later one (the loss on every call in it), at `--max-history` and with the whole history kept.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import save  # noqa: E402  (bench/results.py)


def conversation_tokens(rows: list[dict], encoded: list[dict]) -> tuple[int, int]:
    """(tokens, sequences) when each session's records chain into as few sequences as exact prefixes allow."""
    sessions: dict[str, list[list[int]]] = defaultdict(list)
    for row, e in zip(rows, encoded):
        if e is not None:
            sessions[row["session_id"]].append(e["input_ids"])
    tokens = sequences = 0
    for seqs in sessions.values():
        chains: list[list[int]] = []
        for ids in sorted(seqs, key=len):
            chain = next((c for c in chains if len(c) < len(ids) and ids[:len(c)] == c), None)
            if chain is None:
                chains.append(list(ids))
            else:
                chain[:] = ids
        tokens += sum(len(c) for c in chains)
        sequences += len(chains)
    return tokens, sequences


def count(args, store, agent: str) -> dict:
    from transformers import AutoTokenizer

    from flywheel.config import default_student_path
    from flywheel.datasets import TRAIN, open_split, resolve_version
    from flywheel.distill.data import encode, length_buckets, shared_prefix_len

    tok = AutoTokenizer.from_pretrained(args.base_model or default_student_path())
    rows = open_split(store, agent, resolve_version(store, agent), TRAIN).rows(task_only=False)
    encoded = [encode(tok, r, args.max_length, args.max_history) for r in rows]
    fitting = [e for e in encoded if e]
    whole = sum(len(e["input_ids"]) for e in fitting)
    batches = length_buckets(fitting, args.batch_size, 0)
    shared = whole - sum(shared_prefix_len(b) * (len(b) - 1) for b in batches)
    chained, sequences = conversation_tokens(rows, encoded)
    full = [encode(tok, r, 10 ** 6, 10 ** 6) for r in rows]
    full_whole = sum(len(e["input_ids"]) for e in full)
    full_chained, full_sequences = conversation_tokens(rows, full)
    return {"records": len(rows), "fit_max_length": len(fitting), "sessions": len({r["session_id"] for r in rows}),
            "rows_whole": whole, "shared_prefix": shared, "shared_prefix_ratio": whole / shared,
            "conversations": chained, "conversation_sequences": sequences, "conversation_ratio": whole / chained,
            "whole_history": {"rows_whole": full_whole, "conversations": full_chained,
                              "conversation_sequences": full_sequences, "ratio": full_whole / full_chained}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", default="sgd_Flights,sgd_Restaurants")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per batch (DistillConfig.batch_size)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-history", type=int, default=10)
    ap.add_argument("--validation-fraction", type=float, default=0.1)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--home", default="")
    ap.add_argument("--base-model", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    args.agents = [a for a in args.agents.split(",") if a]
    import ray

    from flywheel.storage import Store
    from selective import prepare

    ray.init(num_cpus=os.cpu_count() or 2, object_store_memory=400 * 2**20, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    store = Store(args.home or tempfile.mkdtemp(prefix="flywheel-train-tokens-"))
    prepare(args, store)
    out = {"command": "python bench/train_tokens.py " + shlex.join(sys.argv[1:]), "settings": vars(args),
           "agents": {}}
    for agent in args.agents:
        r = out["agents"][agent] = count(args, store, agent)
        print(f"{agent}: {r['records']} train records ({r['fit_max_length']} fit {args.max_length} tokens) from "
              f"{r['sessions']} sessions; tokens per epoch: rows whole {r['rows_whole']:,}, shared prefix "
              f"{r['shared_prefix']:,} (x{r['shared_prefix_ratio']:.2f}), one sequence per conversation "
              f"{r['conversations']:,} (x{r['conversation_ratio']:.2f}; with the whole history kept "
              f"x{r['whole_history']['ratio']:.2f})", flush=True)
    save("train-tokens", out, args.out)


if __name__ == "__main__":
    main()
