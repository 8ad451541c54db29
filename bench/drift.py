"""Drift monitor bench: false alarms on in-distribution traffic, detection rate and delay after a real shift.

    .venv/bin/python bench/drift.py                                    # SGD agents (+ banking77 when shipped)
    .venv/bin/python bench/drift.py --banking77 DIR --trials 3     # DIR: a folder with the banking77 CSVs

No Ray, no store: the same pieces `flywheel.monitor.drift.check_drift` runs, with `MonitorConfig`'s defaults
(window 200, stride 50, alpha 0.01 with Holm over 5 tests, 999 permutations, persistence 2, clear after 3; the
flags --stride, --persistence, --alpha and --permutations change them):
`features.example_features` / `features.live_features`, the bundled MiniLM (`flywheel.embeddings`), the window
test `drift.window_drift` (repeated requests count once) and the episode rule `episodes.advance`.

Data, shipped with the package:
- SGD (`flywheel/data/sgd/sgd_dev_flywheel_logs.jsonl`): every `sgd_<Domain>` agent with >= `--min-records`
  records. Its conversations are split in halves (by a digest of the conversation id and the split number): one
  half is the reference, the other the in-distribution pool. Agents have 45-168 records, so live traffic is a
  bootstrap stream from the pool (with replacement); the monitor counts a repeated request once, so an
  in-distribution window holds at most the pool's distinct requests (20-80), and shifted requests, drawn from
  ~1,400 others, make up more of a window's distinct requests than of its 200 (the table shows that share).
- banking77 (`flywheel/data/banking77/test.csv` if shipped, or `--banking77 DIR`): the 77 intents dealt into
  `--banking-agents` agents (intent i goes to agent i mod n), one user turn per request, no tools; reference and
  pool are halves of each agent's utterances; streams are random permutations of the pool, one after another.

Measured:
- **false alarms**: per agent and split (`--splits`, 3: the reference/pool halving drawn again), a stream of
  `window + (windows - 1) * stride` in-distribution requests checked every `stride` requests: `windows` (20)
  evaluated windows; drifted windows (one window failing the tests) and drift episodes (what acts: routes to the
  teacher, queues a retrain). The goal: no episode. Windows of one stream overlap; the splits are independent.
- **detection**: `window` in-distribution requests, then from the shift point each request is out-of-domain with
  probability `mix` (other SGD agents' requests; for banking77, other agents' intents); checked every `stride`
  requests from the shift point (the first check sees no shifted request) until an episode starts or `--horizon`
  requests. The delay is the number of requests after the shift until the episode starts (a multiple of
  `stride`); an episode at the first check (before any shifted request) counts as a false alarm. The goal:
  detection within 200 requests.

Prints two tables and writes everything to bench/figures/drift-<time>.json. Embeddings are cached in
bench/out/embeddings.npz (keyed by text), so a second run skips the model.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import save  # noqa: E402  (bench/results.py)
SGD = os.path.join(REPO, "flywheel", "data", "sgd", "sgd_dev_flywheel_logs.jsonl")
BANKING = os.path.join(REPO, "flywheel", "data", "banking77")
OUT = os.path.join(REPO, "bench", "out")

from flywheel.capture.ingest import digest, parse_record  # noqa: E402
from flywheel.config import MonitorConfig  # noqa: E402
from flywheel.monitor import drift, episodes, features, live  # noqa: E402


# -- embeddings, cached on disk by text ---------------------------------------------------------------------------
class Embeddings:
    def __init__(self, path: str):
        self.path, self.vectors = path, {}
        if os.path.exists(path):
            data = np.load(path)
            self.vectors = dict(zip(data["keys"].tolist(), data["vectors"]))

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def add(self, rows: list[dict]) -> None:
        """Give every feature row its "emb" (base64 float16, as the monitor stores it)."""
        from flywheel.embeddings import embed

        missing = sorted({r["text"] for r in rows if self.key(r["text"]) not in self.vectors})
        if missing:
            t = time.time()
            self.vectors.update(zip(map(self.key, missing), embed(missing)))
            print(f"embedded {len(missing)} texts in {time.time() - t:.0f} s", flush=True)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            keys = sorted(self.vectors)
            np.savez(self.path, keys=np.array(keys), vectors=np.stack([self.vectors[k] for k in keys]))
        for r in rows:
            r["emb"] = live.pack_embedding(self.vectors[self.key(r["text"])])


# -- data -----------------------------------------------------------------------------------------------------------
def sgd_agents(min_records: int, split: int = 0) -> dict[str, dict]:
    """{agent: {"reference": [rows], "pool": [rows]}} plus the out-of-domain pool of each (other agents' requests)."""
    by_agent: dict[str, list[dict]] = {}
    with open(SGD) as f:
        for lineno, line in enumerate(f, start=1):
            r = parse_record(json.loads(line), f"sgd:{lineno}")
            by_agent.setdefault(r["agent_id"], []).append(r)
    rows = {a: [features.live_features(r) for r in records] for a, records in by_agent.items()}
    out = {}
    for agent, records in sorted(by_agent.items()):
        if len(records) < min_records:
            if not split:
                print(f"skipped {agent}: {len(records)} records < --min-records {min_records}")
            continue
        half = [int(digest(r["session_id"], *([split] if split else [])), 16) % 2 for r in records]
        out[agent] = {"reference": [row for row, h in zip(rows[agent], half) if h == 0],
                      "pool": [row for row, h in zip(rows[agent], half) if h == 1],
                      "ood": [row for other, rs in rows.items() if other != agent for row in rs],
                      "sampling": "bootstrap"}
    return out


def banking_agents(folder: str, n_agents: int, split: int = 0) -> dict[str, dict]:
    with open(os.path.join(folder, "test.csv"), newline="") as f:
        data = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    intents = sorted({c for _, c in data})
    group = {c: i % n_agents for i, c in enumerate(intents)}
    rows: dict[int, list[dict]] = {}
    for i, (text, intent) in enumerate(data):
        record = {"record_id": f"b77-{i}", "agent_id": "banking77", "timestamp": float(i),
                  "messages": [{"role": "user", "content": text}], "tools_json": "[]",
                  "response": {"role": "assistant", "content": intent}}
        rows.setdefault(group[intent], []).append({**features.live_features(record), "intent": intent})
    out = {}
    for g, rs in sorted(rows.items()):
        half = [int(digest(r["id"], *([split] if split else [])), 16) % 2 for r in rs]
        out[f"banking77_{g}"] = {"reference": [r for r, h in zip(rs, half) if h == 0],
                                 "pool": [r for r, h in zip(rs, half) if h == 1],
                                 "ood": [r for other, o in rows.items() if other != g for r in o],
                                 "sampling": "permutations"}
    return out


# -- streams --------------------------------------------------------------------------------------------------------
def draw(pool: list[dict], n: int, rng: np.random.Generator, sampling: str) -> list[dict]:
    if sampling == "bootstrap":
        idx = rng.integers(len(pool), size=n)
    else:  # random permutations of the pool, one after another: no repeat within len(pool) requests
        idx = np.concatenate([rng.permutation(len(pool)) for _ in range(n // len(pool) + 1)])[:n]
    return [pool[i] for i in idx]


def run_stream(reference: list[dict], stream: list[dict], first_check: int, cfg: MonitorConfig, tag: str,
               ood_ids: set | None = None) -> list[dict]:
    """Check the stream every `stride` requests from `first_check` on; stops at the first episode start.
    Returns one summary per evaluated window."""
    state, out = None, []
    for n, end in enumerate(range(first_check, len(stream) + 1, cfg.stride)):
        window = stream[max(0, end - cfg.window):end]
        test = drift.window_drift(reference, window, cfg, seed=int(digest(tag, n, n=8), 16))
        state, change = episodes.advance(state, test["drifted"], cfg.persistence, cfg.clear_windows)
        distinct = {r["key"] for r in window}
        out.append({"end": end, "drifted": test["drifted"], "pvalue": test["pvalue"], "episode": change == "start",
                    "distinct": len(distinct), "tests": {k: v["p"] for k, v in test["tests"].items()},
                    "ood_distinct": len(distinct & ood_ids) if ood_ids else 0})
        if change == "start":
            break
    return out


def false_alarms(agent: str, data: dict, cfg: MonitorConfig, windows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = cfg.window + (windows - 1) * cfg.stride
    stream = [{**r, "id": f"{r['id']}#{i}"} for i, r in enumerate(draw(data["pool"], n, rng, data["sampling"]))]
    state, drifted, episodes_started, checks = None, 0, 0, []
    for k, end in enumerate(range(cfg.window, n + 1, cfg.stride)):
        window = stream[end - cfg.window:end]
        test = drift.window_drift(data["reference"], window, cfg, seed=int(digest(agent, "fa", k, n=8), 16))
        state, change = episodes.advance(state, test["drifted"], cfg.persistence, cfg.clear_windows)
        drifted += test["drifted"]
        episodes_started += change == "start"
        checks.append({"pvalue": test["pvalue"], "drifted": test["drifted"], "distinct": test["n_live"],
                       "tests": {name: t["p"] for name, t in test["tests"].items()}})
    return {"windows": len(checks), "drifted_windows": drifted, "false_alarms": episodes_started,
            "min_pvalue": min(c["pvalue"] for c in checks),
            "mean_distinct": round(statistics.mean(c["distinct"] for c in checks), 1), "checks": checks}


def detection(agent: str, data: dict, cfg: MonitorConfig, mix: float, trials: int, horizon: int, seed: int) -> dict:
    runs = []
    for trial in range(trials):
        rng = np.random.default_rng([seed, trial, int(mix * 100)])
        warm = draw(data["pool"], cfg.window, rng, data["sampling"])
        after = draw(data["pool"], horizon, rng, data["sampling"])
        ood = [data["ood"][i] for i in rng.integers(len(data["ood"]), size=horizon)]
        shifted = rng.random(horizon) < mix
        tail = [o if s else a for a, o, s in zip(after, ood, shifted)]
        stream = [{**r, "id": f"{r['id']}#{i}"} for i, r in enumerate(warm + tail)]
        ood_keys = {r["key"] for r, s in zip(tail, shifted) if s}
        checks = run_stream(data["reference"], stream, cfg.window, cfg, f"{agent}-{mix}-{trial}", ood_keys)
        start = next((c for c in checks if c["episode"]), None)
        delay = start["end"] - cfg.window if start else None
        runs.append({"delay": delay, "false_alarm": delay == 0, "checks": checks,
                     "ood_share_at_detection": round(start["ood_distinct"] / start["distinct"], 3) if start else None,
                     "first_drifted_window": next((c["end"] - cfg.window for c in checks if c["drifted"]), None)})
    delays = [r["delay"] for r in runs if r["delay"]]
    return {"mix": mix, "trials": trials, "detected": len(delays),
            "within_200": sum(d <= 200 for d in delays), "false_alarms": sum(r["false_alarm"] for r in runs),
            "median_delay": statistics.median(delays) if delays else None, "max_delay": max(delays) if delays else None,
            "runs": runs}


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=20, help="in-distribution windows per agent and split")
    p.add_argument("--splits", type=int, default=3, help="reference/pool splits per agent for the false alarms "
                                                         "(split 0 also serves the shift trials)")
    p.add_argument("--trials", type=int, default=3, help="shift trials per agent and mix")
    p.add_argument("--mixes", default="1.0,0.5", help="shares of out-of-domain requests after the shift")
    p.add_argument("--horizon", type=int, default=400, help="requests after the shift before giving up")
    p.add_argument("--min-records", type=int, default=40, help="SGD agents with fewer records are skipped")
    p.add_argument("--banking77", default=BANKING if os.path.isdir(BANKING) else "",
                   help="a banking77 folder (test.csv); default: flywheel/data/banking77 when shipped")
    p.add_argument("--banking-agents", type=int, default=4)
    p.add_argument("--agents", default="", help="comma-separated subset of agents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stride", type=int, default=MonitorConfig.stride, help="new requests between checks")
    p.add_argument("--persistence", type=int, default=MonitorConfig.persistence)
    p.add_argument("--alpha", type=float, default=MonitorConfig.alpha)
    p.add_argument("--permutations", type=int, default=MonitorConfig.permutations)
    args = p.parse_args()
    cfg = MonitorConfig(agent="bench", stride=args.stride, persistence=args.persistence, alpha=args.alpha,
                        permutations=args.permutations)
    started = time.time()

    splits = []
    for split in range(args.splits):
        agents = sgd_agents(args.min_records, split)
        if args.banking77:
            agents.update(banking_agents(args.banking77, args.banking_agents, split))
        if args.agents:
            agents = {a: d for a, d in agents.items() if a in args.agents.split(",")}
        splits.append(agents)
    cache = Embeddings(os.path.join(OUT, "embeddings.npz"))
    every = {id(r): r for agents in splits for d in agents.values() for key in ("reference", "pool", "ood")
             for r in d[key]}
    cache.add(list(every.values()))

    results: dict[str, dict] = {}
    for agent, data in splits[0].items():
        t = time.time()
        runs = [false_alarms(agent, agents[agent], cfg, args.windows, args.seed + k) for k, agents in enumerate(splits)]
        fa = {"windows": sum(r["windows"] for r in runs), "drifted_windows": sum(r["drifted_windows"] for r in runs),
              "false_alarms": sum(r["false_alarms"] for r in runs), "min_pvalue": min(r["min_pvalue"] for r in runs),
              "mean_distinct": round(statistics.mean(r["mean_distinct"] for r in runs), 1), "splits": runs}
        det = [detection(agent, data, cfg, float(m), args.trials, args.horizon, args.seed)
               for m in args.mixes.split(",")]
        results[agent] = {"reference": len(data["reference"]), "pool": len(data["pool"]),
                          "sampling": data["sampling"], "in_distribution": fa, "shift": det,
                          "seconds": round(time.time() - t, 1)}
        print(f"{agent}: {fa['windows']} windows, {fa['drifted_windows']} drifted, {fa['false_alarms']} false alarms;"
              f" detection " + ", ".join(f"mix {d['mix']}: {d['within_200']}/{d['trials']} within 200 "
                                         f"(median delay {d['median_delay']})" for d in det) +
              f" [{time.time() - t:.0f} s]", flush=True)

    print(f"\nIn-distribution windows (window {cfg.window}, stride {cfg.stride}, alpha {cfg.alpha} Holm over 5 tests, "
          f"persistence {cfg.persistence})")
    print(table([[a, r["reference"], r["pool"], r["in_distribution"]["mean_distinct"], r["in_distribution"]["windows"],
                  r["in_distribution"]["drifted_windows"], r["in_distribution"]["false_alarms"],
                  f"{r['in_distribution']['min_pvalue']:.3f}"] for a, r in results.items()],
                ["agent", "reference", "pool", "distinct/window", "windows", "drifted windows", "false alarms",
                 "min p_adj"]))
    total_windows = sum(r["in_distribution"]["windows"] for r in results.values())
    total_drifted = sum(r["in_distribution"]["drifted_windows"] for r in results.values())
    total_fa = sum(r["in_distribution"]["false_alarms"] for r in results.values())
    print(f"total: {total_windows} windows over {len(results)} agents, {total_drifted} drifted windows, "
          f"{total_fa} false alarms (drift episodes)")

    print(f"\nShift: out-of-domain requests mixed in from the shift point; delay = requests after the shift until the "
          f"drift episode starts (horizon {args.horizon})")
    rows = []
    for a, r in results.items():
        for d in r["shift"]:
            shares = [x["ood_share_at_detection"] for x in d["runs"] if x["ood_share_at_detection"] is not None]
            rows.append([a, d["mix"], d["trials"], d["detected"], d["within_200"], d["median_delay"], d["max_delay"],
                         d["false_alarms"], f"{statistics.mean(shares):.2f}" if shares else "-"])
    print(table(rows, ["agent", "mix", "trials", "detected", "within 200", "median delay", "max delay",
                       "alarms before shift", "OOD share of distinct at detection"]))
    summary = {}
    for mix in args.mixes.split(","):
        ds = [d for r in results.values() for d in r["shift"] if d["mix"] == float(mix)]
        delays = [x["delay"] for d in ds for x in d["runs"] if x["delay"]]
        summary[mix] = {"trials": sum(d["trials"] for d in ds), "detected": sum(d["detected"] for d in ds),
                        "within_200": sum(d["within_200"] for d in ds),
                        "median_delay": statistics.median(delays) if delays else None,
                        "max_delay": max(delays) if delays else None}
        print(f"mix {mix}: detected {summary[mix]['detected']}/{summary[mix]['trials']}, within 200 requests "
              f"{summary[mix]['within_200']}/{summary[mix]['trials']}, median delay {summary[mix]['median_delay']}, "
              f"max {summary[mix]['max_delay']}")

    print(f"\n{time.time() - started:.0f} s")
    save("drift", {"command": " ".join(sys.argv), "config": cfg.__dict__, "args": vars(args),
                   "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
                   "seconds": round(time.time() - started, 1),
                   "totals": {"windows": total_windows, "drifted_windows": total_drifted, "false_alarms": total_fa,
                              "shift": summary},
                   "agents": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
