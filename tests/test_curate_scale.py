"""Curation at scale: validation with reason codes, crash safety, S3, incremental versions, the card.

    .venv/bin/python -m pytest tests/test_curate_scale.py -q

Real parts only: the shared local Ray (`ray_session`), a real S3-compatible server (moto, on a free local port),
real files, and a real process killed mid-publish (`FLYWHEEL_FAULT`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from flywheel.capture import ingest as I
from flywheel.capture.store import LogStore, ingest_file
from flywheel.config import CurateConfig
from flywheel.curate.pipeline import FAULT_EXIT, curate
from flywheel.datasets import SPLITS, read_split
from flywheel.storage import Store

from conftest import NEWS_LOGS, REPO, SGD_LOGS, moto_s3

# Ray workers resolve S3 credentials from their own environment (see flywheel.storage): set it before the
# shared Ray starts (collection runs before any test), as a cluster would through its runtime_env or node roles.
for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
               ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_k, _v)

FLIGHTS = [ln for ln in open(SGD_LOGS).read().splitlines() if '"sgd_Flights"' in ln]
HOTEL = next(ln for ln in open(SGD_LOGS).read().splitlines() if '"sgd_Hotels"' in ln)


def write_lines(path, lines) -> str:
    with open(path, "wb") as f:
        f.write(b"\n".join(ln if isinstance(ln, bytes) else ln.encode() for ln in lines) + b"\n")
    return str(path)


def version_ids(store: Store, agent: str, version: str) -> dict[str, set[str]]:
    out = {s: set(read_split(store, agent, version, s).column("record_id").to_pylist()) for s in SPLITS}
    with store.open(f"datasets/{agent}/{version}/quarantine.parquet") as f:
        out["quarantine"] = set(pq.read_table(f).column("record_id").to_pylist())
    return out


def sessions(store: Store, agent: str, version: str, split: str) -> set[str]:
    return set(read_split(store, agent, version, split).column("session_id").to_pylist())


def mutate(line: str, fn) -> str:
    obj = json.loads(line)
    fn(obj)
    return json.dumps(obj)


# -- (a) every class of bad input, quarantined with its reason and location; no valid record lost ---------------
def test_every_bad_line_is_quarantined_with_its_reason_and_no_valid_record_is_lost(ray_session, store, tmp_path):
    good = FLIGHTS[:14]
    msg = lambda o: o["request"]["messages"]  # noqa: E731
    call = lambda o: o["response"]["choices"][0]["message"]["tool_calls"][0]["function"]  # noqa: E731
    bad = [  # (the line, the reason it must be quarantined with)
        (FLIGHTS[20][: len(FLIGHTS[20]) // 2], I.R_INVALID_JSON),  # truncated mid-write
        ("this is not json", I.R_INVALID_JSON),
        (b'{"request": "\xff\xfe"}', I.R_INVALID_UTF8),
        (mutate(FLIGHTS[21], lambda o: msg(o)[0].update(content="x" * 30_000)), I.R_OVERSIZED),
        ("[1, 2, 3]", I.R_NOT_OBJECT),
        ('{"hello": "world"}', I.R_UNKNOWN_FORMAT),
        (mutate(FLIGHTS[22], lambda o: o.pop("response")), I.R_MISSING_FIELD),
        (mutate(FLIGHTS[23], lambda o: o["request"].update(messages="book me a flight")), I.R_MISTYPED),
        (mutate(FLIGHTS[24], lambda o: msg(o)[0].update(content=42)), I.R_MISTYPED),
        (mutate(FLIGHTS[25], lambda o: o.update(timestamp="last tuesday")), I.R_MISTYPED),
        (mutate(FLIGHTS[26], lambda o: o.update(feedback="great")), I.R_MISTYPED),
        (mutate(FLIGHTS[27], lambda o: o.update(workload_id=7)), I.R_MISTYPED),
        (HOTEL, I.R_UNKNOWN_AGENT),
        (mutate(FLIGHTS[28], lambda o: o["response"]["choices"][0].update(
            message={"role": "assistant", "content": "   ", "tool_calls": []})), I.R_BAD_RESPONSE),
        (mutate(FLIGHTS[29], lambda o: o.pop("workload_id")), I.R_NO_AGENT),
        (mutate(FLIGHTS[30], lambda o: msg(o)[0].update(role="robot")), I.R_BAD_MESSAGES),
        (mutate(FLIGHTS[31], lambda o: call(o).update(arguments="{not json")), I.R_BAD_TOOL_ARGUMENTS),
        (mutate(FLIGHTS[32], lambda o: o["request"].update(tools={"not": "a list"})), I.R_BAD_TOOLS),
    ]
    lines, want = [], {}
    for i in range(max(len(good), len(bad))):  # interleaved, so bad lines sit in every chunk
        if i < len(good):
            lines.append(good[i])
        if i == 3:
            lines.append("")  # a blank line is skipped, not counted
        if i < len(bad):
            lines.append(bad[i][0])
            want[len(lines)] = bad[i][1]
    path = write_lines(tmp_path / "mixed.jsonl", lines)

    # small chunks: line numbers and counts must carry across the Parquet parts of one file
    ing = ingest_file(store, path, known_agents=("sgd_Flights",), max_line_bytes=20_000, chunk_lines=7)
    assert (ing["accepted"], ing["quarantined"], ing["lines"]) == (len(good), len(bad), len(good) + len(bad))
    rows = []
    for name in store.list("quarantine/ingest"):
        with store.open(f"quarantine/ingest/{name}") as f:
            rows += pq.read_table(f).to_pylist()
    assert all(r["source"].startswith("mixed.jsonl:") for r in rows)
    got = {int(r["source"].rsplit(":", 1)[1]): r["reason"] for r in rows}
    assert got == want  # every bad line, at its own line number, with the right reason
    # 33 lines in chunks of 7: five quarantine parts, four record parts (the last chunk holds only bad lines)
    assert (len(store.list("quarantine/ingest")), len(store.list("logs/parquet"))) == (5, 4)
    # unknown extra fields are kept as JSON, not fatal
    records = LogStore(store).read()
    extra = json.loads(records.column("extra_json")[0].as_py())
    assert {"sgd_dialogue_id", "sgd_turn", "sgd_services", "sgd_target"} <= set(extra)

    m = curate(CurateConfig(agents=("sgd_Flights",)), store)["sgd_Flights"]
    c = m["counts"]
    assert c["in"] == len(good) == c["kept"] + c["quarantined"] and c["kept"] == sum(c[s] for s in SPLITS)
    ids = version_ids(store, "sgd_Flights", m["version"])
    assert set().union(*ids.values()) == set(records.column("record_id").to_pylist())  # no valid record lost
    assert m["stages"]["ingest"]["reasons"][I.R_MISTYPED] == 4  # the fifth has no usable agent id


# -- (b) a crash mid-write publishes nothing; the rerun completes -----------------------------------------------
def _crash(home: str, point: str) -> subprocess.CompletedProcess:
    """Curate in a real process that dies at `point` (os._exit: no cleanup, no finally). It runs the clean stage
    in-process (a new Ray job would spend its time starting workers); the fault sits in the publish step that
    both executors share, and the curations around it run on Ray."""
    env = {**os.environ, "FLYWHEEL_FAULT": point}
    code = ("import sys; from flywheel.config import CurateConfig; from flywheel.curate.pipeline import curate; "
            "from flywheel.storage import Store; "
            "curate(CurateConfig(agents=('sgd_Flights',)), Store(sys.argv[1]), executor='local')")
    return subprocess.run([sys.executable, "-c", code, home], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_crash_mid_write_publishes_nothing_and_the_rerun_completes(ray_session, store, home, tmp_path):
    ingest_file(store, write_lines(tmp_path / "day1.jsonl", FLIGHTS[:24]))
    v1 = curate(CurateConfig(agents=("sgd_Flights",)), store)["sgd_Flights"]["version"]
    ingest_file(store, write_lines(tmp_path / "day2.jsonl", FLIGHTS[24:40]))

    proc = _crash(home, "after_staging_write")  # killed between the staging writes and the publish rename
    assert proc.returncode == FAULT_EXIT, proc.stderr[-2000:]
    assert store.read_json("datasets/sgd_Flights/LATEST") == {"version": v1}
    assert store.list("datasets/sgd_Flights") == sorted(["LATEST", v1])  # no partial version visible
    (run,) = store.list("datasets/_staging")  # the dead run's staging folder: it did write everything
    assert {"train.parquet", "validation.parquet", "test.parquet", "keys.parquet", "manifest.json", "card.md"} <= \
        set(store.list(f"datasets/_staging/{run}/sgd_Flights"))

    proc = _crash(home, "after_publish")  # killed after the rename, before LATEST moved
    assert proc.returncode == FAULT_EXIT, proc.stderr[-2000:]
    assert store.read_json("datasets/sgd_Flights/LATEST") == {"version": v1}
    (v2,) = set(store.list("datasets/sgd_Flights")) - {"LATEST", v1}

    m = curate(CurateConfig(agents=("sgd_Flights",)), store)["sgd_Flights"]  # the rerun
    assert m["version"] == v2 and store.read_json("datasets/sgd_Flights/LATEST") == {"version": v2}
    assert m["counts"]["in"] == 40 and m["lineage"]["previous"] == v1
    assert sum(len(x) for x in version_ids(store, "sgd_Flights", v2).values()) == 40


# -- (c) the same pipeline through s3:// on a local S3-compatible server ----------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3("flywheel-ci") as endpoint:
        yield endpoint


def test_ingest_and_curation_end_to_end_through_s3(ray_session, s3_endpoint, monkeypatch, sgd_sample, tmp_path):
    import boto3

    monkeypatch.setenv("FLYWHEEL_S3_ENDPOINT", s3_endpoint)
    store = Store("s3://flywheel-ci/home")
    ing = ingest_file(store, sgd_sample)
    assert ing["accepted"] == 80
    ms = curate(CurateConfig(agents=("sgd_Flights", "sgd_Restaurants")), store)
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket="flywheel-ci", Prefix="home/datasets/")["Contents"]}
    for agent, m in ms.items():
        assert m["published"] and m["counts"]["in"] == 40
        assert store.read_json(f"datasets/{agent}/LATEST") == {"version": m["version"]}
        for name in ("train.parquet", "validation.parquet", "test.parquet", "keys.parquet", "manifest.json",
                     "card.md", "class_balance.png"):
            assert f"home/datasets/{agent}/{m['version']}/{name}" in keys
        assert read_split(store, agent, m["version"], "train").num_rows == m["counts"]["train"]
    assert not [k for k in keys if "_staging" in k]
    # more logs arrive in the bucket: the next version reads only them
    extra = [ln for ln in open(SGD_LOGS).read().splitlines() if '"sgd_Restaurants"' in ln][40:50]
    before = set(store.list("logs/parquet"))
    ingest_file(store, write_lines(tmp_path / "more.jsonl", extra))
    m2 = curate(CurateConfig(agents=("sgd_Flights", "sgd_Restaurants")), store)
    assert m2["sgd_Flights"]["version"] == ms["sgd_Flights"]["version"]  # nothing new: unchanged
    r2 = m2["sgd_Restaurants"]
    assert r2["lineage"]["parts_read"] == sorted(set(store.list("logs/parquet")) - before)
    assert r2["counts"]["in"] == 50 and r2["lineage"]["previous"] == ms["sgd_Restaurants"]["version"]


# -- (d) incremental: only new parts are read; old + new examples; held-out sessions pinned --------------------
def test_incremental_version_reads_only_new_parts_and_keeps_old_examples(ray_session, store, tmp_path):
    agent = "sgd_Flights"
    ingest_file(store, write_lines(tmp_path / "day1.jsonl", FLIGHTS[:40]))
    m1 = curate(CurateConfig(agents=(agent,)), store)[agent]
    old_parts = set(store.list("logs/parquet"))
    replay = FLIGHTS[5]  # the very same record again: same id, counted once
    dups = [mutate(FLIGHTS[i], lambda o: o.update(timestamp=2_000_000_000 + i)) for i in (1, 2)]  # later copies
    ingest_file(store, write_lines(tmp_path / "day2.jsonl", FLIGHTS[40:70] + [replay] + dups))
    new_parts = sorted(set(store.list("logs/parquet")) - old_parts)

    m2 = curate(CurateConfig(agents=(agent,)), store)[agent]
    lin = m2["lineage"]
    assert lin["incremental"] and lin["previous"] == m1["version"] and lin["parts_read"] == new_parts
    assert set(lin["parts"]) == old_parts | set(new_parts)
    assert m2["counts"]["in"] == m1["counts"]["in"] + 30 + 2
    assert m2["stages"]["previous"]["in"] == m1["counts"]["in"] and m2["stages"]["clean"]["in"] == 32
    assert m2["reasons"].get("duplicate", 0) == m1["reasons"].get("duplicate", 0) + 2
    assert m2["stages"]["decide"]["reasons"]["duplicate"] == 2 and not m2["stages"]["clean"]["reasons"]
    old, new = version_ids(store, agent, m1["version"]), version_ids(store, agent, m2["version"])
    assert all(old[s] <= new[s] for s in SPLITS)  # old examples kept, in their split
    held = {s: sessions(store, agent, m2["version"], s) for s in SPLITS}
    for split in SPLITS:  # sessions stay put, and never straddle two splits
        assert sessions(store, agent, m1["version"], split) <= held[split]
        assert not any(held[split] & held[other] for other in SPLITS if other != split)
    assert m2["counts"]["in"] == sum(len(v) for v in new.values())

    # a full rebuild of the same logs (in-process executor, fresh home) names the same version, same examples
    other = Store(str(tmp_path / "rebuild"))
    shutil.copytree(store.path("logs"), other.path("logs"))
    full = curate(CurateConfig(agents=(agent,), incremental=False), other, executor="local")[agent]
    assert full["version"] == m2["version"] and not full["lineage"]["incremental"]
    rebuilt = version_ids(other, agent, full["version"])
    assert set().union(*(rebuilt[s] for s in SPLITS)) == set().union(*(new[s] for s in SPLITS))  # the same kept
    # and nothing new: the latest version stands, no part is read
    again = curate(CurateConfig(agents=(agent,)), store)[agent]
    assert again["version"] == m2["version"] and "clean" not in again["timings_s"]



NEWS = open(NEWS_LOGS).read().splitlines()
HEADLINE = ("Acme Corp Announces It Will Acquire Widget Holdings In An All Stock Deal Valued At About Two Billion "
            "Dollars, Expects The Combined Company To Save Three Hundred Million A Year In Costs By The End Of Its "
            "Next Fiscal Year, And Says The Boards Of Both Companies Have Approved The Terms Unanimously; Shareholders "
            "Of Widget Will Receive Zero Point Four Shares Of Acme For Each Share They Hold, The Deal Is Expected To "
            "Close In The Second Half Of The Year Pending Regulatory Approval In The United States And Europe, And "
            "Acme Reaffirms Its Full Year Revenue Outlook While Widget Withdraws Its Own Guidance")  # a long slot


def with_headline(line: str, headline: str, ts: int) -> str:
    """A news classifier record with another headline in the same prompt template."""
    def edit(o):
        user = o["request"]["messages"][-1]
        start, end = "### START HEADLINE ###\n\n", "\n\n### END HEADLINE ###"
        user["content"] = user["content"].split(start)[0] + start + headline + end + user["content"].split(end)[1]
        o["timestamp"] = ts
    return mutate(line, edit)


def test_templated_agent_keeps_distinct_requests_and_still_drops_near_copies(store, tmp_path):
    """The news classifier's ~4,900-character template around each headline made every pair of its requests
    ~0.96 similar: 498 of its 500 records were `near_duplicate`. Near-duplicates are judged without the template."""
    agent = "news_classifier"
    copy = HEADLINE.replace("About Two Billion", "Roughly Two Billion")  # one word changed in a long headline
    ingest_file(store, write_lines(tmp_path / "day1.jsonl", NEWS[:40] + [
        with_headline(NEWS[0], HEADLINE, 1_700_000_000), with_headline(NEWS[1], copy, 1_900_000_000)]))
    m1 = curate(CurateConfig(agents=(agent,)), store, executor="local")[agent]
    assert m1["published"] and m1["task"] == "classification", m1.get("error")
    assert m1["reasons"] == {"near_duplicate": 1} and m1["counts"]["kept"] == 41  # only the near-copy goes
    assert m1["stages"]["decide"]["template_shingles"] > 500
    with store.open(f"datasets/{agent}/{m1['version']}/quarantine.parquet") as f:
        assert pq.read_table(f).column("reason").to_pylist() == ["near_duplicate"]

    # the next day: the carried examples' requests come from the previous version, compared without the template
    ingest_file(store, write_lines(tmp_path / "day2.jsonl", NEWS[40:70]))
    m2 = curate(CurateConfig(agents=(agent,)), store, executor="local")[agent]
    assert m2["lineage"]["incremental"] and m2["counts"]["kept"] == 71 and m2["reasons"] == {"near_duplicate": 1}
    other = Store(str(tmp_path / "rebuild"))
    shutil.copytree(store.path("logs"), other.path("logs"))
    full = curate(CurateConfig(agents=(agent,), incremental=False), other, executor="local")[agent]
    assert full["version"] == m2["version"] and full["reasons"] == m2["reasons"]
    # the whole-request comparison (template share 0) is what set the agent aside
    whole = curate(CurateConfig(agents=(agent,), incremental=False, near_dup_template_share=0.0), other,
                   executor="local")[agent]
    assert not whole.get("published") and "near_duplicate" in whole["error"]

# -- (e) the dataset card ---------------------------------------------------------------------------------------
def test_each_version_has_a_card_with_counts_balance_pii_and_a_plot(ray_session, store, tmp_path):
    pii = mutate(FLIGHTS[0], lambda o: o["request"]["messages"][-1].update(
        content=o["request"]["messages"][-1]["content"] + " Mail jane.doe@example.com or call 415-555-0134."))
    mistyped = mutate(FLIGHTS[30], lambda o: o.update(timestamp="soon"))
    ingest_file(store, write_lines(tmp_path / "logs.jsonl", [pii] + FLIGHTS[1:30] + [mistyped, "{cut"]))
    m = curate(CurateConfig(agents=("sgd_Flights",)), store)["sgd_Flights"]
    folder = f"datasets/sgd_Flights/{m['version']}"
    text = store.read_text(f"{folder}/card.md")
    assert f"version `{m['version']}`" in text and "## Counts by stage" in text
    assert "![class balance](class_balance.png)" in text
    for label, n in m["labels"]["train"].items():
        assert f"| `{label}` | {n} |" in text
    assert "| EMAIL | 1 |" in text and "| PHONE | 1 |" in text
    assert "| ingest | mistyped_field | 1 |" in text  # the cut line names no agent: counted as unattributed
    assert m["stages"]["ingest"]["unattributed"] == 1
    with store.open(f"{folder}/class_balance.png") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
