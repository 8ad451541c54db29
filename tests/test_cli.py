"""`flywheel <verb>` for people: help on every flag, switches, a clean stdout, the demo's home, joining Ray, job homes.

One test starts Ray (in subprocesses, one CPU): `connect_ray()` joins the instance already running.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from flywheel import cli
from flywheel import config as C
from flywheel.cli import check_job_home, main, parser, switch_argv
from flywheel.demo import MARKER, prepare_home
from flywheel.raycluster import choose_address

from conftest import REPO


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# --- help ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_renders_help_and_every_flag_says_its_default(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert f"usage: flywheel {verb}" in capsys.readouterr().out
    for action in subparsers()[verb]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        where = f"{verb} {action.option_strings or action.dest}"
        assert action.help and "default" in action.help, f"{where}: {action.help!r}"


def test_help_is_the_fields_comment_in_the_config_class():
    curate = {a.dest: a.help for a in subparsers()["curate"]._actions}
    assert curate["min_examples"] == "an agent with fewer kept examples gets no dataset version (default: 4)"
    assert curate["presidio_entities"].startswith("no LOCATION/DATE_TIME")  # a field written over two lines
    assert curate["seed"] == "int (default: 0)"  # no comment: its type
    assert "45%%" in {a.dest: a.help for a in subparsers()["sweep"]._actions}["lora_dropout"]  # argparse-escaped
    assert cli.field_comments(cli.PromoteConfig)["force"] == "promote even if its recorded gate failed"
    assert "__post_init__" not in cli.field_comments(C.DistillConfig)


# --- switches --------------------------------------------------------------------------------------------------
def test_booleans_are_switches():
    p = parser()
    assert p.parse_args(["promote", "--agent", "a", "--force"]).force is True
    assert p.parse_args(["promote", "--agent", "a"]).force is None  # unset: the YAML's value, else the default
    assert p.parse_args(["curate", "--no-incremental"]).incremental is False
    for flag in ("--no-blocking", "--no-metrics-per-agent"):
        assert getattr(p.parse_args(["serve", flag]), flag[5:].replace("-", "_")) is False
    assert p.parse_args(["demo", "--no-fresh"]).fresh is False


def test_the_older_true_false_spelling_still_works():
    assert switch_argv(["promote", "--force", "true", "--agent", "a"]) == ["promote", "--force", "--agent", "a"]
    assert switch_argv(["curate", "--incremental=false"]) == ["curate", "--no-incremental"]
    assert switch_argv(["curate", "--incremental", "No", "--seed", "1"]) == ["curate", "--no-incremental", "--seed",
                                                                           "1"]
    assert switch_argv(["ingest", "true"]) == ["ingest", "true"]  # not a switch: a path
    with pytest.raises(C.ConfigError, match="--force"):
        switch_argv(["promote", "--force=maybe"])
    cfg = C.load(C.CurateConfig, None, **{"incremental": parser().parse_args(
        switch_argv(["curate", "--incremental", "false"])).incremental})
    assert cfg.incremental is False


# --- stdout is the result --------------------------------------------------------------------------------------
def test_json_stdout_is_one_object_and_everything_else_goes_to_stderr(monkeypatch, capfd):
    def noisy(cfg):  # what Ray Tune, forwarded worker logs and C extensions do during a long verb
        print("progress 1/2")
        sys.stdout.write("progress 2/2\n")
        os.write(1, b"native progress\n")
        return {"ok": True, "home": cfg.home}

    monkeypatch.setitem(cli.VERBS, "rollback", (cli.RollbackConfig, noisy))
    assert main(["rollback", "--agent", "a", "--home", "/h", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"ok": True, "home": "/h"} and out.count("\n") == 1
    assert "progress 1/2" in err and "progress 2/2" in err and "native progress" in err
    assert main(["rollback", "--agent", "a", "--home", "/h"]) == 0  # human output: the result, indented
    out, err = capfd.readouterr()
    assert json.loads(out)["ok"] is True and "progress 1/2" in err
    print("after")  # stdout is back
    assert capfd.readouterr().out == "after\n"


def test_json_run_of_a_real_verb_in_a_fresh_process(tmp_path):
    log = tmp_path / "one.jsonl"
    log.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}) + "\n" + "not json\n")
    env = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_HOME"}
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "ingest", str(log), "--agent-id", "chat",
                          "--home", str(tmp_path / "home"), "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)  # the whole of stdout is one JSON object
    assert (result["accepted"], result["quarantined"]) == (1, 1) and out.stdout.strip().count("\n") == 0


def test_errors_are_one_json_object_with_json_and_one_stderr_line_without(tmp_path, capsys):
    assert main(["promote", "--agent", "a", "--version", "v9", "--home", str(tmp_path), "--json"]) == 2
    out, err = capsys.readouterr()
    assert "v9" in json.loads(out)["error"]
    assert main(["promote", "--agent", "a", "--version", "v9", "--home", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("flywheel promote: ") and err.count("\n") == 1


# --- the demo's home -------------------------------------------------------------------------------------------
def test_demo_never_clears_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    with pytest.raises(C.ConfigError, match="--no-fresh") as e:
        prepare_home(str(mine), fresh=True)
    assert str(mine) in str(e.value)
    assert (mine / "chapter1.tex").read_text() == "years of work" and not (mine / MARKER).exists()

    prepare_home(str(mine), fresh=False)  # --no-fresh: reused as it is, and not marked as the demo's
    assert sorted(os.listdir(mine)) == ["chapter1.tex"]

    new = tmp_path / "new"
    prepare_home(str(new), fresh=True)  # a new folder: the demo makes it and marks it
    assert os.listdir(new) == [MARKER]
    (new / "datasets").mkdir()
    prepare_home(str(new), fresh=True)  # the demo's own: cleared
    assert os.listdir(new) == [MARKER]

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_home(str(empty), fresh=True)
    assert os.listdir(empty) == [MARKER]
    prepare_home("s3://bucket/demo", fresh=True)  # remote homes are never cleared (and not touched here)


# --- joining the Ray instance that runs here -------------------------------------------------------------------
def test_choose_address_prefers_ray_address_then_the_live_instance():
    assert choose_address("10.0.0.1:6379", "127.0.0.1:1", {"127.0.0.1:2"}) == "10.0.0.1:6379"
    assert choose_address(None, "127.0.0.1:1", {"127.0.0.1:1", "127.0.0.1:2"}) == "127.0.0.1:1"
    assert choose_address(None, "127.0.0.1:9", {"127.0.0.1:2"}) == "127.0.0.1:2"  # a stale `ray start` record
    assert choose_address(None, None, set()) is None  # nothing running: start one
    with pytest.raises(ConnectionError, match="RAY_ADDRESS"):
        choose_address(None, None, {"127.0.0.1:2", "127.0.0.1:3"})


HOLD = """
import ray, sys
ctx = ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 1024 * 1024, _temp_dir=sys.argv[1],
               configure_logging=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # held until the test closes stdin
ray.shutdown()
"""

JOIN = """
import json, os, ray
import ray._private.services
from flywheel.raycluster import connect_ray
if os.environ.get("ONLY_GCS"):  # other instances run here too: let the scan see only the test's one
    def only():
        return frozenset({os.environ["ONLY_GCS"]})
    only.cache_clear = lambda: None
    ray._private.services.find_gcs_addresses = only
info = connect_ray(configure_logging=False, log_to_driver=False)
print(json.dumps({**info, "nodes": len(ray.nodes())}))
"""


def test_connect_ray_joins_the_instance_already_running(tmp_path):
    from ray._private.services import find_gcs_addresses

    # as a shell with no Ray settings: the instance is found by the scan, and its token is sent (new local
    # instances have token auth on) as `ray.init(address="auto")` would send it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    temp = tempfile.mkdtemp(prefix="fwray", dir="/tmp")  # short: Ray's socket paths have a length limit
    holder = subprocess.Popen([sys.executable, "-c", HOLD, temp], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        address = holder.stdout.readline().strip()
        assert address, "the first Ray instance did not start"
        find_gcs_addresses.cache_clear()
        others = set(find_gcs_addresses()) - {address}
        if others:  # other Ray instances run here (a test session's, the developer's)
            env["ONLY_GCS"] = address
        out = subprocess.run([sys.executable, "-c", JOIN], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        info = json.loads(out.stdout.strip().splitlines()[-1])
        assert info["address"] == address and info["started"] is False and info["nodes"] == 1
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
        shutil.rmtree(temp, ignore_errors=True)


# --- a Ray job needs a real home -------------------------------------------------------------------------------
JOB = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}  # what Ray's job supervisor sets for a submitted job's driver


def test_a_ray_job_refuses_an_unset_or_relative_home():
    keys = C.build(cli.KeysConfig, {})
    check_job_home(keys, environ={})  # not a job: the usual ./.flywheel default
    with pytest.raises(C.ConfigError, match="FLYWHEEL_HOME.*home:"):
        check_job_home(keys, environ=JOB)
    with pytest.raises(C.ConfigError, match="'data/fw'"):
        check_job_home(C.build(cli.KeysConfig, {"home": "data/fw"}), environ=JOB)
    with pytest.raises(C.ConfigError):
        check_job_home(keys, environ={**JOB, "FLYWHEEL_HOME": ".flywheel"})
    for home in ("s3://bucket/flywheel", "/data/flywheel"):
        check_job_home(C.build(cli.KeysConfig, {"home": home}), environ=JOB)
        check_job_home(keys, environ={**JOB, "FLYWHEEL_HOME": home})


def test_a_ray_job_without_a_home_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLYWHEEL_HOME", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert main(["keys", "create", "--tenant", "t", "--agents", "a", "--json"]) == 2
    assert "FLYWHEEL_HOME" in json.loads(capsys.readouterr().out)["error"]
    assert os.listdir(tmp_path) == []


# --- a home every node shares ---------------------------------------------------------------------------------
def test_a_local_home_on_a_cluster_of_several_nodes_is_refused():
    from flywheel.raycluster import SHARED_HOME_ENV, split_home

    assert split_home("/data/fw", local=True, nodes=1, shared=False) is None  # one node: one folder
    assert split_home("s3://b/fw", local=False, nodes=3, shared=False) is None
    assert split_home("/mnt/nfs/fw", local=True, nodes=3, shared=True) is None  # every node mounts it
    problem = split_home("/data/fw", local=True, nodes=3, shared=False)
    assert "3 nodes" in problem and "s3://" in problem and SHARED_HOME_ENV in problem


def test_joining_forwards_the_s3_endpoint_but_no_secret_and_nothing_a_job_sets():
    from flywheel.raycluster import forwarded_env

    env = {"FLYWHEEL_S3_ENDPOINT": "http://minio:9000", "AWS_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_ACCESS_KEY_ID": "k", "FLYWHEEL_HOME": "s3://b/fw"}
    assert forwarded_env(env) == {"FLYWHEEL_S3_ENDPOINT": "http://minio:9000", "AWS_REGION": "eu-west-1"}
    job = json.dumps({"runtime_env": {"env_vars": {"FLYWHEEL_S3_ENDPOINT": "http://minio:9000"}}})
    assert forwarded_env({**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": job}) == {"AWS_REGION": "eu-west-1"}
