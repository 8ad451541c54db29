"""Engine benchmark: decode throughput of one batch whose rows use one adapter vs a different adapter each, with
the batched LoRA slots of `HFEngine` and with PEFT's mixed batch (`adapter_names`), on the real student.

    .venv/bin/python bench/engine.py            # 8 rows, 64 new tokens, rank-16 adapters on all 7 projections
    .venv/bin/python bench/engine.py --rows 8 --max-tokens 32 --rank 8 --repeats 3

Adapters are random (small weights, so the text stays the base model's and every mode writes about as many
tokens): throughput does not depend on what an adapter learned. Each mode runs once to warm up, then `--repeats`
times; it prints generated tokens / wall seconds (best run) per mode, and the time to first token of a request
that arrives while a full batch decodes (continuous admission: it joins at the next step), and `--rows` real
sgd_Flights requests (its tools block in every prompt) decoded as one batch of one adapter with the shared prompt
prefix off and on. Results also go to bench/figures/engine-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import save  # noqa: E402  (bench/results.py)
from traffic import PROMPTS as SERVE_PROMPTS  # noqa: E402  (bench/traffic.py)

PROMPTS = SERVE_PROMPTS + ["Write a short poem about the sea.", "Explain what a LoRA adapter is in two sentences."]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: str, out_dir: str, seed: int, rank: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=MODULES))
    for p in model.parameters():  # small random LoRA weights: the base model's text stays readable
        if p.requires_grad:
            p.data.mul_(0.01)
    model.save_pretrained(out_dir)
    return out_dir


def timed(run, repeats: int) -> tuple[float, list[str]]:
    """(best seconds, answers) over `repeats` runs after one warm-up; `run` returns (text, tokens) per row."""
    run()
    best, answers = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        answers = run()
        best = min(best, time.perf_counter() - start)
    return best, answers


def engine_modes(engine, prompts: list, names: list[str], max_tokens: int, repeats: int) -> dict:
    from flywheel.inference.engine import Row, Sampling

    def run(adapters: list[str]) -> list:
        rows = [Row(p, a, Sampling(max_tokens=max_tokens)) for p, a in zip(prompts, adapters)]
        return [(g.text, g.completion_tokens) for g in engine.run_batch(rows)]

    return {"slots, one adapter": timed(lambda: run([names[0]] * len(prompts)), repeats),
            "slots, a different adapter per row": timed(lambda: run(names[: len(prompts)]), repeats)}


def peft_modes(base: str, paths: list[str], prompts: list, tokenizer, max_tokens: int, repeats: int,
               dtype) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), paths[0],
                                      adapter_name="a0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
           for p in prompts]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    width = batch["input_ids"].shape[1]

    def run(adapter_names: list[str] | None) -> list:
        with torch.inference_mode():
            if adapter_names is None:
                model.set_adapter("a0")
            out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 **({"adapter_names": adapter_names} if adapter_names else {}))
        new = [row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
               for row in out[:, width:].tolist()]
        return [(tokenizer.decode(row, skip_special_tokens=True), len(row)) for row in new]

    return {"PEFT, one adapter": timed(lambda: run(None), repeats),
            "PEFT, a different adapter per row (adapter_names)":
                timed(lambda: run([f"a{i}" for i in range(len(prompts))]), repeats)}


def agent_prompts(n: int) -> list[list[dict]]:
    """The first `n` sgd_Flights requests of the shipped dev logs as the student's chat turns (tools included)."""
    import json

    from flywheel.prompts import chat_messages

    out = []
    with open(os.path.join(REPO, "flywheel", "data", "sgd", "sgd_dev_flywheel_logs.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["workload_id"] == "sgd_Flights":
                out.append(chat_messages(record["request"]["messages"], record["request"].get("tools") or []))
            if len(out) == n:
                return out
    return out


def shared_prefill(engine, prompts: list, name: str, max_tokens: int, repeats: int) -> dict:
    """One agent's requests (one adapter, one tools block) decoded as one batch, the shared prefix off and on."""
    from flywheel.inference.engine import Row, Sampling

    def run() -> list:
        return [(g.text, g.completion_tokens) for g in
                engine.run_batch([Row(p, name, Sampling(max_tokens=max_tokens)) for p in prompts])]

    out = {}
    for share in (False, True):
        engine.share_prefix = share
        before = dict(engine.stats())
        seconds, answers = timed(run, repeats)
        after = engine.stats()
        runs = repeats + 1
        out["shared prefix" if share else "rows whole"] = {
            "seconds": round(seconds, 3), "answers": answers,
            "prefill_tokens": (after["prefill_tokens"] - before["prefill_tokens"]) // runs,
            "prefill_tokens_shared": (after["prefill_tokens_shared"] - before["prefill_tokens_shared"]) // runs}
    engine.share_prefix = True
    whole, shared = out["rows whole"], out["shared prefix"]
    out["speedup"] = round(whole["seconds"] / shared["seconds"], 2)
    out["answers_identical"] = sum(a == b for a, b in zip(whole.pop("answers"), shared.pop("answers")))
    return out


def late_arrival(engine, prompts: list, names: list[str], max_tokens: int) -> dict:
    """A full batch decodes; one more request arrives 10 steps in: its time to first token vs the batch's rest."""
    from flywheel.inference.engine import Row, Sampling

    rows = [Row(p, a, Sampling(max_tokens=max_tokens)) for p, a in zip(prompts[:-1], names)]
    late_done, batch_done = {}, {}
    late = Row(prompts[-1], names[-1], Sampling(max_tokens=8),
               done=lambda gen: late_done.setdefault("t", time.perf_counter()))
    for row in rows:
        row.done = lambda gen: batch_done.__setitem__("t", time.perf_counter())
    calls = [0]
    arrived = {}

    def take(n: int) -> list:
        calls[0] += 1
        if calls[0] == 1:
            return rows
        if calls[0] == 11:
            arrived["t"] = time.perf_counter()
            return [late]
        return []

    start = time.perf_counter()
    engine.run_continuous(take, max_rows=len(prompts))
    return {"late request: done after arrival (s)": round(late_done["t"] - arrived["t"], 3),
            "batch: still decoding after that arrival (s)": round(batch_done["t"] - arrived["t"], 3),
            "batch wall (s)": round(batch_done["t"] - start, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default=os.path.join(REPO, "models", "smollm2-135m-instruct"))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--agent-max-tokens", type=int, default=16,
                        help="new tokens per agent request in the shared-prefix comparison (prefill-heavy)")
    args = parser.parse_args()

    from flywheel.inference.engine import HFEngine

    engine = HFEngine(args.base_model, threads=args.threads, max_adapters=args.rows, max_rank=args.rank)
    prompts = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(args.rows)]
    with tempfile.TemporaryDirectory() as root:
        paths = [make_adapter(args.base_model, os.path.join(root, f"a{i}"), i, args.rank) for i in range(args.rows)]
        names = [f"a{i}" for i in range(args.rows)]
        for name, path in zip(names, paths):
            engine.load_adapter(name, path)
        results = engine_modes(engine, prompts, names, args.max_tokens, args.repeats)
        results.update(peft_modes(args.base_model, paths, prompts, engine.tokenizer, args.max_tokens, args.repeats,
                                  engine.dtype))
        arrival = late_arrival(engine, prompts, names, args.max_tokens)
        agent = shared_prefill(engine, agent_prompts(args.rows), names[0], args.agent_max_tokens, args.repeats)
    print(f"{args.rows} rows x {args.max_tokens} new tokens, rank-{args.rank} adapters on 7 projections, "
          f"{engine.dtype}, {args.threads} threads on {engine.device}")
    table = {}
    for mode, (seconds, answers) in results.items():
        tokens = sum(n for _, n in answers)
        table[mode] = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
        print(f"  {mode:<52} {tokens:>5} tokens {seconds:7.2f} s {tokens / seconds:8.1f} tok/s")
    modes = list(results)
    same = [sum(a == b for a, b in zip(results[ours][1], results[peft][1]))
            for ours, peft in ((modes[0], modes[2]), (modes[1], modes[3]))]
    table["rows_identical_to_peft"] = {"one adapter": same[0], "an adapter per row": same[1]}
    print(f"  {'answers identical to PEFT (one / an adapter per row)':<52} {same[0]}/{args.rows}, "
          f"{same[1]}/{args.rows} rows")
    for key, value in arrival.items():
        print(f"  {key:<52} {value}")
    print(f"{args.rows} sgd_Flights requests (tools block included), one adapter, {args.agent_max_tokens} new tokens:")
    for mode in ("rows whole", "shared prefix"):
        r = agent[mode]
        print(f"  {mode:<52} {r['seconds']:7.2f} s, {r['prefill_tokens']} prompt tokens, "
              f"{r['prefill_tokens_shared']} of them not computed again")
    print(f"  {'speedup; answers identical':<52} x{agent['speedup']}; {agent['answers_identical']}/{args.rows} rows")
    save("engine", {"args": vars(args), "dtype": str(engine.dtype), "modes": table,
                    "late_arrival": arrival, "agent_prompts": agent})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
