"""The three-way split and the one home for dataset reads: shares held out, sessions in one split and pinned across
versions, train/eval versions curated before the split, and which files evaluation opens. No Ray: curation runs
in this process (`executor="local"`), evaluation on a tiny random model.

`FileOpens` is a real filesystem audit (Linux inotify): it records every file opened in a folder by any process,
Ray workers included, so "reads only the test split" is checked on the files opened, not on a mock.

    .venv/bin/python -m pytest tests/test_split.py -q
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import datasets
from flywheel.capture.store import LogStore, ingest_file
from flywheel.config import CurateConfig, EvaluateConfig, SweepConfig
from flywheel.curate.pipeline import curate
from flywheel.datasets import SPLITS, TEST, TRAIN, VALIDATION
from flywheel.registry.registry import Registry
from flywheel.schema import EXAMPLE, message

from conftest import SGD_LOGS

IN_OPEN = 0x20  # <sys/inotify.h>


class FileOpens:
    """Names of the files opened in `folder` (by any process) while the block runs, from Linux inotify."""

    def __init__(self, folder: str):
        self.folder, self.names = folder, set()

    def __enter__(self) -> FileOpens:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, self.folder.encode(), IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {self.folder}")
        return self

    def __exit__(self, *exc) -> None:
        try:
            while True:
                try:
                    data = os.read(self.fd, 1 << 16)
                except BlockingIOError:
                    break
                i = 0
                while i < len(data):  # struct inotify_event {int wd; u32 mask, cookie, len; char name[len]}
                    _, mask, _, n = struct.unpack_from("iIII", data, i)
                    if mask & IN_OPEN:
                        self.names.add(data[i + 16:i + 16 + n].rstrip(b"\0").decode())
                    i += 16 + n
        finally:
            os.close(self.fd)


SGD = [json.loads(line) for line in open(SGD_LOGS)]


def flights(store, n: int = 60, cfg: CurateConfig | None = None) -> dict:
    """Curate the first `n` shipped sgd_Flights logs in this process; returns the manifest."""
    path = os.path.join(store.uri, "flights.jsonl")
    os.makedirs(store.uri, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(o) + "\n" for o in [o for o in SGD if o["workload_id"] == "sgd_Flights"][:n])
    ingest_file(store, path)
    return curate(cfg or CurateConfig(agents=("sgd_Flights",)), store, executor="local")["sgd_Flights"]


def unique_tool_records(n: int) -> list[dict]:
    """An agent whose every request declares its own tool and whose every answer calls it (labels never repeat);
    the requests are distinct SGD user turns of every agent, two per session."""
    texts = list(dict.fromkeys(m["content"] for o in SGD for m in o["request"]["messages"][-1:]
                               if len(m["content"].split()) >= 9))[:n]
    rows = []
    for i, text in enumerate(texts):
        tool = {"type": "function", "function": {"name": f"tool_{i}", "parameters": {
            "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
        call = {"id": "c0", "name": f"tool_{i}", "arguments": json.dumps({"query": text[:40]})}
        rows.append({"record_id": f"u{i}", "agent_id": "per_request_tools", "tenant": "acme", "timestamp": 1000.0 + i,
                     "session_id": f"s{i // 2}", "messages": [message("user", text)], "tools_json": json.dumps([tool]),
                     "response": message("assistant", tool_calls=[call]), "model": "teacher:big", "latency_ms": 5.0,
                     "prompt_tokens": 3, "completion_tokens": 2, "feedback": None, "source": "serve",
                     "extra_json": None})
    return rows


def sessions(store, agent: str, version: str) -> dict[str, set[str]]:
    return {s: set(datasets.read_split(store, agent, version, s).column("session_id").to_pylist()) for s in SPLITS}


def assert_shares(counts: dict, validation: float, test: float, slack: float = 0.06) -> None:
    kept = counts["kept"]
    assert kept == sum(counts[s] for s in SPLITS)
    assert abs(counts[VALIDATION] / kept - validation) <= slack and abs(counts[TEST] / kept - test) <= slack, counts


def assert_disjoint(by_split: dict[str, set[str]]) -> None:
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not by_split[a] & by_split[b], (a, b, by_split[a] & by_split[b])


# -- the split --------------------------------------------------------------------------------------------------
def test_repeating_labels_hold_out_the_configured_shares_grouped_by_session(store):
    m = flights(store, 120, CurateConfig(agents=("sgd_Flights",), validation_fraction=0.15, test_fraction=0.25))
    assert_shares(m["counts"], 0.15, 0.25)
    by_split = sessions(store, "sgd_Flights", m["version"])
    assert_disjoint(by_split)
    assert m["sessions"] == {s: len(by_split[s]) for s in SPLITS}
    # a label seen more than once and held out is also in train
    repeated = {lb for lb, n in _label_totals(m).items() if n > 1}
    for split in (VALIDATION, TEST):
        assert set(m["labels"][split]) & repeated <= set(m["labels"][TRAIN])
    card = store.read_text(f"datasets/sgd_Flights/{m['version']}/card.md")
    assert f"{m['counts']['validation']} validation" in card and "| label | train | validation | test |" in card


def _label_totals(m: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for split in SPLITS:
        for lb, n in m["labels"][split].items():
            out[lb] = out.get(lb, 0) + n
    return out


def test_an_agent_whose_every_request_declares_its_own_tool_still_gets_held_out_splits(store):
    rows = unique_tool_records(100)
    LogStore(store).write_records(rows, name_from="day1")
    m = curate(CurateConfig(agents=("per_request_tools",)), store, executor="local")["per_request_tools"]
    assert m["counts"]["kept"] == len(rows) and len(_label_totals(m)) == len(rows)  # no label repeats
    assert_shares(m["counts"], 0.1, 0.2)  # was: almost everything in train (each label kept its only session)
    assert_disjoint(sessions(store, "per_request_tools", m["version"]))


def test_sessions_stay_in_their_split_across_an_incremental_version(store):
    m1 = flights(store, 60)
    m2 = flights(store, 120)  # the next 60 logs: an incremental version
    assert m2["lineage"]["incremental"] and m2["lineage"]["previous"] == m1["version"]
    before, after = sessions(store, "sgd_Flights", m1["version"]), sessions(store, "sgd_Flights", m2["version"])
    assert all(before[s] <= after[s] for s in SPLITS)
    assert_disjoint(after)
    assert_shares(m2["counts"], 0.1, 0.2)


# -- versions curated before the three-way split ----------------------------------------------------------------
def make_legacy(store, agent: str, version: str) -> tuple[str, list[dict]]:
    """Turn a curated version into one laid out as before the three-way split: train.parquet + eval.parquet, whose
    eval holds the VALIDATION sessions (so pinning, not a fresh split, decides where they go next), the manifest's
    counts and labels under train/eval. Published as version "legacy1"; the three-way version is removed."""
    old, new = f"datasets/{agent}/{version}", f"datasets/{agent}/legacy1"
    evals = [{**r, "split": "eval"} for r in datasets.read_split(store, agent, version, VALIDATION).to_pylist()]
    train = datasets.read_split(store, agent, version, TRAIN).to_pylist()
    for name, rows in (("train", train), ("eval", evals)):
        with store.open(f"{new}/{name}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=EXAMPLE), f)
    manifest = store.read_json(f"{old}/manifest.json")
    manifest["counts"] = {**{k: v for k, v in manifest["counts"].items() if k not in SPLITS},
                          "train": len(train), "eval": len(evals)}
    manifest["config"] = {k: v for k, v in manifest["config"].items()
                          if k not in ("validation_fraction", "test_fraction", "min_held_out_per_label")}
    manifest |= {"version": "legacy1", "files": ["train.parquet", "eval.parquet", "quarantine.parquet"]}
    shutil.copy(store.path(f"{old}/quarantine.parquet"), store.path(f"{new}/quarantine.parquet"))
    store.write_json(f"{new}/manifest.json", manifest)
    store.remove(old)
    store.write_json(f"datasets/{agent}/LATEST", {"version": "legacy1"})
    return "legacy1", evals


def test_a_train_eval_version_reads_eval_as_test_and_has_no_validation(store, tiny_model):
    m = flights(store)
    version, evals = make_legacy(store, "sgd_Flights", m["version"])
    assert datasets.is_legacy(store, "sgd_Flights", version)
    test = datasets.open_split(store, "sgd_Flights", "latest", TEST)
    assert test.version == version and test.legacy and test.table.num_rows == len(evals)
    assert set(test.table.column("split").to_pylist()) == {"test"}  # rows come back under today's name
    validation = datasets.open_split(store, "sgd_Flights", version, VALIDATION)
    assert validation.table.num_rows == 0 and validation.table.schema == EXAMPLE
    with pytest.raises(ValueError, match="curated before validation splits.*flywheel curate --agents sgd_Flights"):
        validation.require("the sweep's objective")
    # a selection step says so before it starts anything
    from flywheel.distill.sweep import sweep

    with pytest.raises(ValueError, match="curated before validation splits"):
        sweep(SweepConfig(agent="sgd_Flights", base_model=tiny_model, tracking_uri="off"), store)
    assert not store.exists("sweeps")


def test_curating_after_a_train_eval_version_keeps_its_eval_sessions_held_out_as_test(store):
    m = flights(store)
    _, evals = make_legacy(store, "sgd_Flights", m["version"])
    again = curate(CurateConfig(agents=("sgd_Flights",)), store, executor="local")["sgd_Flights"]
    assert again["lineage"]["previous"] == "legacy1" and not again["lineage"]["incremental"]  # the config changed
    by_split = sessions(store, "sgd_Flights", again["version"])
    assert {r["session_id"] for r in evals} <= by_split[TEST]  # the old held-out sessions never reach train
    assert_disjoint(by_split)


# -- what evaluation reads ----------------------------------------------------------------------------------------
def register_random_adapter(store, tiny_model: str, tmp_path, agent: str = "sgd_Flights") -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "adapter"))
    return Registry(store).register(agent, str(tmp_path / "adapter"), {"dataset_version": None})


def small_evaluation(tiny_model: str, **kw) -> EvaluateConfig:
    return EvaluateConfig(**{"agent": "sgd_Flights", "base_model": tiny_model, "max_new_tokens": 4, "min_examples": 1,
                             "n_boot": 100, "in_context_k": 2, "tracking_uri": "off", **kw})


def test_evaluate_reads_the_test_split_and_train_demos_never_validation(store, tiny_model, tmp_path):
    """Scores come from test only; validation is read for one thing, calibrating selective serving."""
    from flywheel.evaluate.run import evaluate

    m = flights(store)
    register_random_adapter(store, tiny_model, tmp_path)
    with FileOpens(store.path(f"datasets/sgd_Flights/{m['version']}")) as opened:
        calibrated = evaluate(small_evaluation(tiny_model, max_examples=4, in_context_k=0), store)
    assert "validation.parquet" in opened.names and calibrated["split"] == "test"
    assert calibrated["selective"]["certificate"]["n_calibration"] == m["counts"]["validation"]
    with FileOpens(store.path(f"datasets/sgd_Flights/{m['version']}")) as opened:
        rep = evaluate(small_evaluation(tiny_model, selective=False), store)
    assert "test.parquet" in opened.names and "train.parquet" in opened.names  # the audit sees the reads
    assert "validation.parquet" not in opened.names
    assert opened.names <= {"test.parquet", "train.parquet", "manifest.json"}
    assert rep["split"] == "test" and rep["n_expected"] == rep["candidate"]["n"] == m["counts"]["test"]
    assert rep["in_context"]["pool"] == m["counts"]["train"]
    # the candidate under each example's tool-call grammar is a system of its own, with a valid-call rate
    assert "candidate_constrained" in rep["systems"]
    assert rep["constrained"]["decoded"] == (rep["constrained"]["examples_with_grammar"] > 0)
    assert all(0.0 <= rep[s]["valid_call"] <= 1.0 for s in rep["systems"]) and rep["teacher"]["valid_call"] == 1.0
    assert "| candidate_constrained |" in open(rep["report"]).read()


def test_an_old_train_eval_version_still_evaluates_on_its_eval_file(store, tiny_model, tmp_path):
    from flywheel.evaluate.run import evaluate

    m = flights(store)
    version, evals = make_legacy(store, "sgd_Flights", m["version"])
    register_random_adapter(store, tiny_model, tmp_path)
    with FileOpens(store.path(f"datasets/sgd_Flights/{version}")) as opened:
        rep = evaluate(small_evaluation(tiny_model, in_context_k=0, constrained=False), store)
    assert opened.names <= {"eval.parquet", "manifest.json"} and "eval.parquet" in opened.names
    assert rep["dataset_version"] == version and rep["legacy_dataset"] and rep["n_expected"] == len(evals)
    assert rep["candidate"]["n"] == len(evals) and "its eval file" in open(rep["report"]).read()
