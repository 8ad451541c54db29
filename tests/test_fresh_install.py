"""A node set up from the package's own metadata serves a tool call.

A fresh virtual environment (no site packages of its own) gets exactly the distributions that `pyproject.toml`
declares and, recursively, what those declare (their installed metadata, markers and extras evaluated), each
linked file by file from this test's environment, so no network is needed; then the package itself, installed
from a wheel built from `pyproject.toml` (not the editable checkout). A module the code imports that no declared
requirement brings (as xgrammar once was: every request with tools answered 400) is missing there, and `flywheel
serve` run from that environment, on its own Ray, must answer a tool call under the grammar.

    .venv/bin/python -m pytest tests/test_fresh_install.py -q
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

pytestmark = pytest.mark.slow


def declared_closure(requirements: list[str]) -> set[str]:
    """The canonical names of the distributions `requirements` bring, recursively, as installed here."""
    extras_of: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name, extras = canonicalize_name(req.name), set(req.extras)
        if name in extras_of and extras <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, set()) | extras
        for line in metadata.distribution(req.name).requires or []:  # PackageNotFoundError: declared, not here
            sub = Requirement(line)
            wanted = [""] + sorted(extras_of[name])
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(sub)
    return set(extras_of)


def base_requirements() -> list[str]:
    """flywheel's own requirements (no extras), as pyproject.toml declares them."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def link_distributions(names: set[str], site: str) -> None:
    """Link each named distribution's files (its RECORD) into `site`; a top-level folder no other installed
    distribution shares is linked whole."""
    here = sysconfig.get_paths()["purelib"]
    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            owners.setdefault(top, set()).add(canonicalize_name(dist.metadata["Name"]))
    for name in sorted(names):
        for f in metadata.distribution(name).files or []:
            top = f.parts[0]
            if top == "..":  # scripts and data outside site-packages
                continue
            whole = owners[top] <= names
            rel = top if whole else str(f)
            src, dst = os.path.join(here, rel), os.path.join(site, rel)
            if os.path.lexists(dst) or not os.path.lexists(src):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(src, dst)


def site_packages(python: str) -> str:
    return glob.glob(os.path.join(os.path.dirname(os.path.dirname(python)), "lib", "python*", "site-packages"))[0]


def test_the_closure_leaves_out_what_is_not_declared():
    """What the fresh environment gets: a requirement left out of pyproject.toml is missing from it (xgrammar
    reaches the package through no other declared requirement)."""
    declared = base_requirements()
    assert "xgrammar" in declared_closure(declared)
    assert "xgrammar" not in declared_closure([r for r in declared if not r.startswith("xgrammar")])
    assert not {"pytest", "moto", "selenium"} & declared_closure(declared)  # the dev extra stays out


def fresh_environment(root: str) -> str:
    """The fresh environment's python, holding the declared closure and flywheel's own wheel."""
    env = os.path.join(root, "env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    python = os.path.join(env, "bin", "python")
    link_distributions(declared_closure(base_requirements()), site_packages(python))
    wheels = os.path.join(root, "wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                    REPO], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                    *glob.glob(os.path.join(wheels, "flywheel-*.whl"))], check=True, capture_output=True)
    return python


def test_a_fresh_environment_from_the_package_metadata_serves_a_tool_call(tmp_path, tiny_model):
    import httpx
    import openai

    from serving import free_port

    python = fresh_environment(str(tmp_path))
    where = subprocess.run([python, "-c", "import importlib.util as u, flywheel; print(flywheel.__file__); "
                                          "print(u.find_spec('moto'), u.find_spec('pytest'))"],
                           capture_output=True, text=True, cwd=str(tmp_path))
    assert where.returncode == 0, where.stderr[-2000:]
    # the installed wheel, not the checkout; the test tools (the dev extra) are not there
    assert where.stdout.split() == [os.path.join(site_packages(python), "flywheel", "__init__.py"), "None", "None"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_ADDRESS="local", HF_HUB_OFFLINE="1")  # its own Ray, whose workers run the fresh environment
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(python), "flywheel"), "serve", "--home", str(tmp_path / "home"),
         "--base-model", tiny_model, "--base-model-name", "base", "--port", str(port), "--auth", "off",
         "--replica-cpus", "0.5", "--max-new-tokens", "48", "--teacher-min-replicas", "0"],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert server.poll() is None, server.stdout.read()[-4000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
        tools = [{"type": "function", "function": {
            "name": "find_flight", "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "enum": ["Seattle", "Boston"]}},
                                                  "required": ["city"]}}}]
        answer = client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "A flight to Seattle, please."}], tools=tools,
            tool_choice="required", max_tokens=48)
        call = answer.choices[0].message.tool_calls[0]
        assert call.function.name == "find_flight" and "city" in call.function.arguments, answer
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: Serve and its Ray shut down
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(tmp_path)], check=False)  # the fresh environment's workers
