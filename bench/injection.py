"""Prompt-injection check benchmark: how often `flywheel.safety`'s check flags attacks, and how often it flags the
agents' own traffic.

    .venv/bin/python bench/injection.py --out bench/figures/injection.json
    .venv/bin/python bench/injection.py --check mypackage.guards:score --split train    # another check, dev split

Sets (shipped under bench/data/injection/ with their licences):
    llm-warden     jackhhao/llm-warden (MIT): 1,598 train / 400 test prompts labelled jailbreak or benign; the
                   benign ones include role-play prompts ("act as ..."), hard negatives. Patterns were written
                   looking at the train split only; `--split test` (the default) scores the shipped check once.
    purplellama    meta-llama/PurpleLlama CyberSecEval prompt_injection.json (MIT): 251 injections (196 direct,
                   55 indirect, 15 techniques), no benign rows: recall only. Its odd rows are the train half
                   (looked at while writing patterns), its even rows the test half.
    agents         every user turn and tool result of the shipped SGD logs (dev split) and news classifier: the
                   traffic Serve sees, all benign: the false-flag rate a team would live with.
Prints recall, false-flag rate and precision per set, recall per PurpleLlama technique, and the check's speed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import save  # noqa: E402  (bench/results.py)

DATA = os.path.join(REPO, "bench", "data", "injection")
LOGS = [os.path.join(REPO, "flywheel", "data", "sgd", "sgd_dev_flywheel_logs.jsonl"),
        os.path.join(REPO, "flywheel", "data", "news-classifier", "news-classifier-500_dataset.jsonl")]


def warden(split: str) -> list[tuple[str, bool]]:
    csv.field_size_limit(10 ** 8)
    with open(os.path.join(DATA, "llm-warden", f"jailbreak_dataset_{split}.csv"), newline="") as f:
        return [(r["prompt"], r["type"] == "jailbreak") for r in csv.DictReader(f)]


def purplellama(split: str) -> list[tuple[str, str]]:
    with open(os.path.join(DATA, "purplellama", "prompt_injection.json")) as f:
        rows = json.load(f)
    return [(r["user_input"], r["injection_variant"]) for i, r in enumerate(rows) if i % 2 == (split == "train")]


def agent_texts() -> list[str]:
    """Every distinct user turn and tool result of the shipped agents' logs."""
    out: set[str] = set()
    for path in LOGS:
        with open(path) as f:
            for line in f:
                body = json.loads(line).get("request") or {}
                for m in body.get("messages") or []:
                    if m.get("role") in ("user", "tool") and isinstance(m.get("content"), str):
                        out.add(m["content"])
    return sorted(t for t in out if t.strip())


def rates(flags: list[bool], labels: list[bool]) -> dict:
    tp = sum(f and y for f, y in zip(flags, labels))
    fp = sum(f and not y for f, y in zip(flags, labels))
    pos, neg = sum(labels), len(labels) - sum(labels)
    return {"n": len(labels), "attacks": pos, "benign": neg, "recall": tp / pos if pos else None,
            "false_flag_rate": fp / neg if neg else None, "precision": tp / (tp + fp) if tp + fp else None}


def main() -> None:
    from flywheel.safety import INJECTION_THRESHOLD, injection_check

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", default="heuristic", help="heuristic, or module:function (text -> score 0..1)")
    ap.add_argument("--threshold", type=float, default=INJECTION_THRESHOLD)
    ap.add_argument("--split", default="test", choices=("train", "test"), help="llm-warden split to score")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    check = injection_check(args.check)
    flagged = lambda texts: [check(t) >= args.threshold for t in texts]  # noqa: E731

    rows = warden(args.split)
    started = time.perf_counter()
    warden_flags = flagged([t for t, _ in rows])
    seconds = time.perf_counter() - started
    attacks = purplellama(args.split)
    pl_flags = flagged([t for t, _ in attacks])
    by_variant: dict[str, list[bool]] = {}
    for (_, variant), f in zip(attacks, pl_flags):
        by_variant.setdefault(variant, []).append(f)
    agents = agent_texts()
    agent_flags = flagged(agents)
    out = {"command": "python bench/injection.py " + " ".join(sys.argv[1:]), "check": args.check,
           "threshold": args.threshold,
           "llm_warden": {"split": args.split, **rates(warden_flags, [y for _, y in rows])},
           "purplellama": {"split": args.split, **rates(pl_flags, [True] * len(attacks)),
                           "recall_by_variant": {k: sum(v) / len(v) for k, v in sorted(by_variant.items())}},
           "agents": {**rates(agent_flags, [False] * len(agents)),
                      "flagged_examples": [t[:160] for t, f in zip(agents, agent_flags) if f][:10]},
           "ms_per_text": 1000 * seconds / max(1, len(rows)),
           "mean_chars": sum(len(t) for t, _ in rows) / max(1, len(rows))}
    w, p, a = out["llm_warden"], out["purplellama"], out["agents"]
    print(f"llm-warden {args.split}: recall {w['recall']:.3f} on {w['attacks']} jailbreaks, false flags "
          f"{w['false_flag_rate']:.3f} of {w['benign']} benign, precision {w['precision'] or 0:.3f}")
    print(f"purplellama: recall {p['recall']:.3f} on {p['attacks']} injections; by technique: " +
          ", ".join(f"{k} {v:.2f}" for k, v in p["recall_by_variant"].items()))
    print(f"agents' traffic: {sum(agent_flags)} of {a['benign']} distinct user/tool texts flagged "
          f"({a['false_flag_rate']:.4f})")
    print(f"speed: {out['ms_per_text']:.3f} ms per text (mean {out['mean_chars']:.0f} characters)")
    save("injection", out, args.out)


if __name__ == "__main__":
    main()
