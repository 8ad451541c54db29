"""Untrusted input never names a path: one id rule (`flywheel.ids`), a `Store` that refuses escapes, and ingest
that quarantines a line whose ids break the rule (`invalid_id`) while the rest of the file goes in. Pure: no Ray."""

from __future__ import annotations

import json
import os
import re

import pyarrow.parquet as pq
import pytest

from flywheel import config as C
from flywheel.capture import ingest as I
from flywheel.capture.store import ingest_file
from flywheel.cli import main
from flywheel.ids import ID_PATTERN, InvalidId, check_id, is_valid_id
from flywheel.registry.registry import Registry, RegistryError
from flywheel.routing import get_route, queue_retrain, register_agent
from flywheel.storage import Store, UnsafePath

from conftest import SGD_LOGS

GOOD_IDS = ["sgd_Flights", "news-classifier", "v12", "tenant.a", "sgd_Flights@v2", "20240101T000000.123Z-ab", "x" * 128]
BAD_IDS = ["../x", "..", "/etc/passwd", "a/b", "a\\b", "", "x" * 5000, "x" * 129, "a\x00b", "a\nb", "abc\n", " lead",
           ".hidden", "a..b", "tab\tid", None, 42]
HOSTILE_AGENTS = ["../x", "../../etc", "/etc/passwd", "a" * 5000, "bad\x00id", "bad\nid", "esc\x1b[31m"]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_real_ids_are_valid(value):
    assert is_valid_id(value) and check_id("agent id", value) == value
    assert re.match(ID_PATTERN, value)


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
def test_ids_that_could_name_another_path_are_refused(value):
    assert not is_valid_id(value)
    with pytest.raises(InvalidId, match="agent id"):
        check_id("agent id", value)


def test_the_message_shows_a_short_escaped_value_and_the_rule():
    with pytest.raises(InvalidId) as e:
        check_id("agent id", "a" * 5000)
    msg = str(e.value)
    assert len(msg) < 220 and "5000 characters" in msg and "'..'" in msg and "sgd_Flights" in msg
    with pytest.raises(InvalidId, match=re.escape(r"'a\x00b'")):
        check_id("tenant id", "a\x00b")


@pytest.mark.parametrize("parts", [("../x",), ("a/../../b",), ("/etc/passwd",), ("logs", "../../x"), ("logs", "/x"),
                                   ("a\\b",), ("a\x00b",), ("a\nb",), ("..",)], ids=repr)
def test_store_paths_never_leave_the_home(tmp_path, parts):
    for store in (Store(str(tmp_path / "home")), Store("s3://bucket/home")):
        with pytest.raises(UnsafePath, match="unsafe path"):
            store.path(*parts)


def test_store_paths_inside_the_home_still_work(tmp_path):
    store = Store(str(tmp_path / "home"))
    assert store.path() == store.path("") == store.uri
    assert store.path("logs/parquet", "part-1.parquet") == f"{store.uri}/logs/parquet/part-1.parquet"
    assert store.path(os.path.dirname("a.json")) == store.uri
    assert store.path("datasets/x/") == f"{store.uri}/datasets/x"
    assert store.path("registry/.sgd_Flights.lock").endswith("/registry/.sgd_Flights.lock")
    assert Store("s3://bucket/home").path("logs", "a.json") == "s3://bucket/home/logs/a.json"


def test_routing_and_registry_check_their_ids(tmp_path):
    store = Store(str(tmp_path / "home"))
    for call in (lambda: register_agent(store, "../x"), lambda: register_agent(store, "ok", "a/b"),
                 lambda: get_route(store, "a\\b"), lambda: queue_retrain(store, "ok", "../e", "drift")):
        with pytest.raises(InvalidId):
            call()
    registry = Registry(store)
    for call in (lambda: registry.versions("../x"), lambda: registry.get("ok", "../v1"),
                 lambda: registry.set_alias("x" * 5000, None)):
        with pytest.raises(RegistryError, match="invalid"):
            call()
    assert not os.path.exists(tmp_path / "home")


def hostile_log(path) -> dict:
    """Good SGD lines and lines whose workload_id / client_id would name paths; returns {line: field} of bad ones."""
    good = [json.loads(line) for line in open(SGD_LOGS).readlines()[:2]]
    bad = {}
    rows = [good[0]]
    for agent in HOSTILE_AGENTS:
        rows.append({**good[0], "workload_id": agent})
        bad[len(rows)] = "workload_id"
    rows.append({**good[0], "client_id": "../tenants"})
    bad[len(rows)] = "client_id"
    rows.append(good[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return bad


def files_under(root) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


def test_a_hostile_log_is_quarantined_line_by_line_and_writes_only_inside_the_home(tmp_path):
    log, parent = tmp_path / "hostile.jsonl", tmp_path / "parent"
    home = parent / "home"
    home.mkdir(parents=True)
    bad = hostile_log(log)
    result = ingest_file(Store(str(home)), str(log))
    assert (result["accepted"], result["quarantined"]) == (2, len(bad))
    assert result["reasons"] == {I.R_INVALID_ID: len(bad)}
    rows = [r for f in files_under(home / "quarantine" / "ingest") for r in pq.read_table(f).to_pylist()]
    assert {int(r["source"].rsplit(":", 1)[1]): r["detail"].split(":", 1)[0] for r in rows} == bad
    assert all(r["reason"] == "invalid_id" and len(r["detail"]) < 250 for r in rows)
    assert sorted(os.listdir(home / "agents")) == sorted({f"{r['workload_id']}.json" for r in
                                                          map(json.loads, open(SGD_LOGS).readlines()[:2])})
    home_prefix = str(home) + os.sep
    assert all(f.startswith(home_prefix) for f in files_under(parent)), files_under(parent)


def test_a_bad_default_tenant_or_agent_is_a_setting_error_not_a_bad_line():
    line = json.dumps(json.loads(open(SGD_LOGS).readline())).encode()
    with pytest.raises(InvalidId, match="tenant"):
        I.parse_lines([line], "f", tenant="../t")
    with pytest.raises(InvalidId, match="agent"):
        I.parse_lines([line], "f", default_agent="a/b")


def test_cli_ingest_of_a_hostile_file_exits_0_with_the_quarantine_counts(tmp_path, capsys):
    log, home = tmp_path / "hostile.jsonl", tmp_path / "parent" / "home"
    bad = hostile_log(log)
    assert main(["ingest", str(log), "--home", str(home), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["accepted"], out["quarantined"]) == (2, len(bad))
    assert out["files"][0]["reasons"] == {"invalid_id": len(bad)}
    assert main(["ingest", str(log), "--home", str(home), "--tenant", "../t", "--json"]) == 2
    assert "tenant" in json.loads(capsys.readouterr().out)["error"]


AGENT, PATHS = {"agent": "sgd_Flights"}, {"paths": ["logs.jsonl"]}


@pytest.mark.parametrize("cls,base,key,value", [
    (C.DistillConfig, {}, "agent", "../x"), (C.DistillConfig, AGENT, "run_name", "a/b"),
    (C.SweepConfig, AGENT, "name", ".hidden"), (C.EvaluateConfig, AGENT, "adapter_version", "../v1"),
    (C.EvaluateConfig, AGENT, "dataset_version", "v1\n"), (C.MonitorConfig, {}, "agent", "x" * 5000),
    (C.IngestConfig, PATHS, "tenant", "../t"), (C.IngestConfig, PATHS, "known_agents", "ok,../x"),
    (C.IngestConfig, PATHS, "agent_id", "/etc"), (C.CurateConfig, {}, "agents", "sgd_Flights,/etc"),
    (C.CurateConfig, {}, "presidio_agents", "*,../x"), (C.DemoConfig, {}, "agents", "a\\b")], ids=repr)
def test_config_loading_rejects_ids_that_name_other_paths(cls, base, key, value):
    with pytest.raises(C.ConfigError, match=f"^{key}: invalid"):
        C.load(cls, **base, **{key: value})


def test_a_job_yaml_with_a_hostile_agent_names_the_key(tmp_path):
    job = tmp_path / "distill.yaml"
    job.write_text("agent: ../x\n")
    with pytest.raises(C.ConfigError, match="^agent: invalid agent id '../x'"):
        C.load(C.DistillConfig, str(job))


def test_config_defaults_and_wildcards_stay_allowed():
    assert C.load(C.DistillConfig, agent="sgd_Flights").run_name == ""
    assert C.load(C.CurateConfig, presidio_agents="*").presidio_agents == ("*",)
    assert C.load(C.IngestConfig, paths=["x.jsonl"], agent_id="", tenant="acme.prod").tenant == "acme.prod"
