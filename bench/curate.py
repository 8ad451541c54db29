"""Curation throughput and memory: Ray Data on every CPU against the same stage functions in one plain process.

    .venv/bin/python bench/curate.py --n 100000 --scale 1,10

For each scale s, N*s log lines are generated from the shipped SGD logs (untimed): every dialogue turn is re-sampled
with its own wording (openers, closers, numbers), ~5% are exact duplicates of earlier requests sent again later,
~10% carry PII in a user turn (emails, phones, Luhn-valid card numbers) and ~2% are malformed (truncated, not JSON,
not UTF-8, mistyped, missing the response). `flywheel ingest` puts them in a log store (timed and shown, but not
part of the comparison). Then, each in a fresh child process on a fresh copy of that log store, `curate()` runs
the whole pipeline (plan, clean, the whole-agent decisions, the streaming writes, cards, publish):

    ray     the clean stage on Ray Data, `ray.init(num_cpus=os.cpu_count())`
    local   the same functions (`filters.clean_batch`, the decisions, the writes) in this process, no Ray

It prints records/s for both, the ratio, the parallel efficiency (ray_rate / (local_rate * num_cpus)), the time of
each stage, and peak memory: the driver's RSS (sampled, and getrusage's high-water mark) and, for Ray, the largest
single worker USS and the largest sum over workers (USS: private memory; RSS would also count the object-store pages
a worker maps). It also prints the CPU seconds of the driver and the workers and the load average around each run:
other load on the same cores shows up as lost parallel efficiency in wall time, not in CPU seconds. Figures only,
no pass/fail. A JSON summary goes to bench/figures/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SGD = os.path.join(REPO, "flywheel", "data", "sgd", "sgd_dev_flywheel_logs.jsonl")
OPENERS = ["", "Hi.", "Hello!", "Hey there,", "Good morning.", "OK so", "Quick question:", "Sorry to bother you,",
           "Thanks for the help so far.", "Right,", "Alright.", "Um,", "Listen,", "Great.", "Hmm,", "Please,",
           "I was wondering,", "Also,", "One more thing:", "Well,"]
CLOSERS = ["", "Thanks!", "Thank you.", "Cheers.", "That would be great.", "Appreciate it.", "ASAP please.",
           "No rush.", "Is that possible?", "Let me know.", "Much obliged.", "If you can.", "Thanks a lot.",
           "Sounds good?", "Please and thank you.", "Got it?", "Ta.", "Many thanks.", "OK?", "Thanks again."]
NAMES = ["jane.doe", "sam.lee", "a.kumar", "m.rossi", "li.wei", "o.smith", "p.garcia", "k.tanaka"]


def luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = sum(d if i % 2 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(reversed(digits)))
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return " ".join(s[i:i + 4] for i in range(0, 16, 4))


def generate(path: str, n: int, seed: int = 0) -> dict:
    """Write `n` JSONL lines; returns what was injected."""
    base = [json.loads(ln) for ln in open(SGD)]
    rng = random.Random(seed)
    injected = {"duplicates": 0, "pii": 0, "malformed": 0}
    recent: list[str] = []
    with open(path, "wb") as f:
        for i in range(n):
            roll = rng.random()
            if roll < 0.02:  # malformed
                kind = i % 5
                good = json.dumps(base[i % len(base)])
                line = [good[: len(good) // 2].encode(), b"not json at all", b'{"request": "\xff\xfe"}',
                         good.replace('"content": "', '"content": 7, "x": "', 1).encode(),
                         json.dumps({k: v for k, v in base[i % len(base)].items() if k != "response"}).encode()][kind]
                injected["malformed"] += 1
            elif roll < 0.07 and recent:  # an exact duplicate: the same request, sent again later
                obj = json.loads(rng.choice(recent))
                obj["timestamp"] = 1_700_000_000 + i
                line = json.dumps(obj).encode()
                injected["duplicates"] += 1
            else:
                src = base[i % len(base)]
                obj = json.loads(json.dumps(src))
                copy = i // len(base)
                obj["timestamp"] = 1_700_000_000 + i
                obj["sgd_dialogue_id"] = f"{src['sgd_dialogue_id']}-{copy}"
                for m in obj["request"]["messages"]:
                    if m["role"] == "user" and copy:
                        text = re.sub(r"\d", lambda _: str(rng.randrange(10)), m["content"])
                        m["content"] = " ".join(x for x in (rng.choice(OPENERS), text, rng.choice(CLOSERS)) if x)
                if roll > 0.90:  # PII in the last user turn
                    pii = [f"my email is {rng.choice(NAMES)}{i}@example.com",
                           f"call me on 415-555-{i % 10000:04d}", f"card {luhn_card(rng)}"][i % 3]
                    user = [m for m in obj["request"]["messages"] if m["role"] == "user"][-1]
                    user["content"] += f" ({pii})"
                    injected["pii"] += 1
                line = json.dumps(obj).encode()
                recent.append(line.decode())
                recent = recent[-5000:]
            f.write(line + b"\n")
    return injected


# -- the child: one timed curation ---------------------------------------------------------------------------
class Sampler:
    """Peak RSS of this process and peak USS (private memory: object-store pages a worker maps are shared, not
    its own) of its `ray::` worker processes, sampled every second (reading a worker's USS parses its smaps: at
    5 Hz the sampler alone used ~7% of a core in the driver, a cost only the Ray run paid)."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.driver = self.worker = self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(1.0)

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds (user + system) used so far by this process, and by its live `ray::` workers."""
        t = self.me.cpu_times()
        workers = 0.0
        for p in self.me.children(recursive=True):
            try:
                if (p.cmdline() or [""])[0].startswith("ray::"):
                    c = p.cpu_times()
                    workers += c.user + c.system
            except Exception:
                continue
        return t.user + t.system, workers

    def sample(self) -> None:
        try:
            self.driver = max(self.driver, self.me.memory_info().rss)
            rss = []
            for p in self.me.children(recursive=True):
                try:
                    if (p.cmdline() or [""])[0].startswith("ray::"):
                        rss.append(p.memory_full_info().uss)
                except Exception:  # a worker that just exited
                    continue
            if rss:
                self.worker, self.workers = max(self.worker, max(rss)), max(self.workers, sum(rss))
        except Exception:
            pass

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def child(mode: str, home: str) -> dict:
    from flywheel.config import CurateConfig
    from flywheel.curate.pipeline import curate
    from flywheel.storage import Store

    out: dict = {"mode": mode, "cpus": os.cpu_count()}
    if mode == "ray":
        import ray

        t0 = time.time()
        for attempt in (1, 2):  # a busy machine can time the node start out once
            try:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
                         log_to_driver=False)
                break
            except Exception as e:
                if attempt == 2:
                    raise
                print(f"ray.init failed ({e}); retrying", file=sys.stderr)
                ray.shutdown()
                time.sleep(10)
        out["ray_init_s"] = round(time.time() - t0, 2)
    out["load_before"] = round(os.getloadavg()[0], 1)
    with Sampler() as mem:
        cpu0, t0 = mem.cpu_s(), time.time()
        manifests = curate(CurateConfig(), Store(home), executor=mode)
        out["wall_s"] = time.time() - t0
        cpu1 = mem.cpu_s()
        out["cpu_driver_s"], out["cpu_workers_s"] = round(cpu1[0] - cpu0[0], 1), round(cpu1[1] - cpu0[1], 1)
    out["load_after"] = round(os.getloadavg()[0], 1)
    stages: dict[str, float] = {}
    for m in manifests.values():
        for k, v in m.get("timings_s", {}).items():
            if k in ("plan", "clean", "agents"):
                stages[k] = v  # run-level: the same in every agent's entry
            else:
                stages[k] = stages.get(k, 0.0) + v
    published = [m for m in manifests.values() if m.get("published")]
    out.update(
        records=sum(m["counts"]["in"] for m in published), kept=sum(m["counts"]["kept"] for m in published),
        quarantined=sum(m["counts"]["quarantined"] for m in published), agents=len(published),
        reasons={r: sum(m["reasons"].get(r, 0) for m in published)
                 for r in sorted({r for m in published for r in m["reasons"]})},
        pii={k: sum(m["pii"].get(k, 0) for m in published) for k in sorted({k for m in published for k in m["pii"]})},
        stages_s={k: round(v, 2) for k, v in stages.items()},
        driver_peak_rss_mb=round(mem.driver / 2**20), driver_maxrss_mb=round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        worker_peak_uss_mb=round(mem.worker / 2**20), workers_peak_uss_sum_mb=round(mem.workers / 2**20))
    out["records_per_s"] = out["records"] / out["wall_s"]
    return out


# -- the parent: generate, ingest, run both modes per scale, print ---------------------------------------------
def run_scale(n: int, workdir: str, save) -> dict:
    from flywheel.capture.store import ingest_file
    from flywheel.storage import Store

    data = os.path.join(workdir, f"logs-{n}.jsonl")
    t0 = time.time()
    injected = generate(data, n)
    gen_s = time.time() - t0
    base = os.path.join(workdir, f"home-{n}")
    t0 = time.time()
    ing = ingest_file(Store(base), data)
    ingest_s = time.time() - t0
    os.remove(data)
    result = {"n": n, "generated_s": round(gen_s, 1), "injected": injected,
              "ingest": {"s": round(ingest_s, 1), "records_per_s": round(n / ingest_s), "accepted": ing["accepted"],
                         "quarantined": ing["quarantined"], "reasons": ing["reasons"]}}
    for mode in ("ray", "local"):  # Ray first: a run cut short still has the figure under test
        home = os.path.join(workdir, f"home-{n}-{mode}")
        shutil.copytree(os.path.join(base, "logs"), os.path.join(home, "logs"))
        env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--home", home], env=env,
                              capture_output=True, text=True, cwd=REPO)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"the {mode} run at n={n} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        result[mode] = json.loads(lines[-1])
        done = result[mode]
        print(f"   [{mode} n={n:,}: {done['records_per_s']:,.0f} records/s, wall {done['wall_s']:.1f} s]", flush=True)
        save(result)  # a later failure keeps what finished
        shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    ray_rate, local_rate = result["ray"]["records_per_s"], result["local"]["records_per_s"]
    result["speedup"] = ray_rate / local_rate
    result["parallel_efficiency"] = ray_rate / (local_rate * result["ray"]["cpus"])
    return result


def report(r: dict) -> None:
    loc, ray_ = r["local"], r["ray"]
    print(f"\n== n={r['n']:,} lines (generated in {r['generated_s']} s, untimed): injected {r['injected']}")
    print(f"   ingest (one process): {r['ingest']['s']} s, {r['ingest']['records_per_s']:,} lines/s, "
          f"accepted {r['ingest']['accepted']:,}, quarantined {r['ingest']['quarantined']:,} {r['ingest']['reasons']}")
    print(f"   curated {loc['records']:,} records of {loc['agents']} agents: kept {loc['kept']:,}, "
          f"set aside {loc['quarantined']:,} {loc['reasons']}; PII redacted {loc['pii']}")
    print(f"   {'':28}{'local (1 process)':>20}{'ray (' + str(ray_['cpus']) + ' CPUs)':>20}")
    print(f"   {'records/s':28}{loc['records_per_s']:>20,.0f}{ray_['records_per_s']:>20,.0f}")
    print(f"   {'wall s':28}{loc['wall_s']:>20.1f}{ray_['wall_s']:>20.1f}")
    print(f"   {'CPU s (driver / workers)':28}{loc['cpu_driver_s']:>20.1f}"
          f"{str(ray_['cpu_driver_s']) + ' / ' + str(ray_['cpu_workers_s']):>20}")
    print(f"   {'load average before/after':28}{str(loc['load_before']) + ' / ' + str(loc['load_after']):>20}"
          f"{str(ray_['load_before']) + ' / ' + str(ray_['load_after']):>20}")
    for stage in ("plan", "clean", "agents", "decide", "write", "card", "publish"):
        print(f"   {'  stage ' + stage + ' s':28}{loc['stages_s'].get(stage, 0):>20.1f}"
              f"{ray_['stages_s'].get(stage, 0):>20.1f}")
    print(f"   {'driver peak RSS MB':28}{loc['driver_peak_rss_mb']:>20}{ray_['driver_peak_rss_mb']:>20}")
    print(f"   {'driver maxrss MB (getrusage)':28}{loc['driver_maxrss_mb']:>20}{ray_['driver_maxrss_mb']:>20}")
    print(f"   {'worker peak USS MB (max/sum)':28}{'-':>20}"
          f"{str(ray_['worker_peak_uss_mb']) + ' / ' + str(ray_['workers_peak_uss_sum_mb']):>20}")
    print(f"   ray.init {ray_.get('ray_init_s')} s (not timed); speedup {r['speedup']:.2f}x; "
          f"parallel efficiency {r['parallel_efficiency']:.0%} of {ray_['cpus']} CPUs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="log lines at scale 1")
    ap.add_argument("--scale", default="1,10", help="comma-separated multiples of --n")
    ap.add_argument("--workdir", default="", help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--child", choices=("ray", "local"), help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.home)))
        return
    scales = [int(s) for s in args.scale.split(",") if s]
    workdir = args.workdir or tempfile.mkdtemp(prefix="flywheel-bench-")
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(REPO, "bench", "out")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"curate-n{args.n}-x{'-'.join(map(str, scales))}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    results: list[dict] = []

    def save(partial: dict | None = None) -> None:
        with open(path, "w") as f:
            json.dump({"args": vars(args), "results": results + ([partial] if partial else [])}, f, indent=2)

    try:
        for s in scales:
            results.append(run_scale(args.n * s, workdir, save))
            save()
            report(results[-1])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"\n== {b['n'] // a['n']}x the records: driver peak RSS local {a['local']['driver_peak_rss_mb']} -> "
              f"{b['local']['driver_peak_rss_mb']} MB, ray {a['ray']['driver_peak_rss_mb']} -> "
              f"{b['ray']['driver_peak_rss_mb']} MB; largest Ray worker (USS) {a['ray']['worker_peak_uss_mb']} -> "
              f"{b['ray']['worker_peak_uss_mb']} MB")
    print(f"\nsummary: {os.path.relpath(path, REPO)}")


if __name__ == "__main__":
    main()
