"""What a node installs is what the project declares: every third-party module the package imports comes from a
distribution `pyproject.toml` names (core or an extra), and a missing optional part is a clear error, not a wrong
status.

    pytest tests/test_packaging.py -q

The cluster image and `ray-cluster.yaml` install the package from its metadata; a module reached only through
another package's dependencies (or installed by the Makefile alone) is absent or at another version on such a node.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "flywheel")


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """{distribution: "core" or the extra that names it} from pyproject.toml."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    name = lambda req: normal(re.match(r"[A-Za-z0-9_.\-]+", req).group())  # noqa: E731
    out = {name(r): "core" for r in project["dependencies"]}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out.update({name(r): extra for r in reqs if name(r) not in out})
    return out


def imported(root: str) -> dict[str, str]:
    """{top-level module: a file importing it} for every absolute, non-stdlib import under `root`."""
    out = {}
    for folder, _, files in os.walk(root):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"flywheel"}:
                    out.setdefault(top, os.path.relpath(path, REPO))
    return out


def undeclared(modules: dict[str, str], names: dict[str, str]) -> list[str]:
    """Modules no declared distribution provides (a module not installed here is matched by its own name)."""
    provides = importlib.metadata.packages_distributions()
    return [f"{module} (imported by {where})" for module, where in sorted(modules.items())
            if not any(normal(d) in names for d in provides.get(module) or [module])]


def test_every_import_of_the_package_is_declared():
    assert undeclared(imported(PACKAGE), declared()) == []


def test_the_check_catches_a_module_reached_only_through_another_package():
    names = declared()
    assert undeclared({"xgrammar": "flywheel/inference/grammar.py"}, names) == []
    del names["xgrammar"]  # as it was when only the Makefile installed it
    assert undeclared({"xgrammar": "flywheel/inference/grammar.py"}, names) == [
        "xgrammar (imported by flywheel/inference/grammar.py)"]
    assert undeclared({"not_a_module_anyone_ships": "x.py"}, names) == ["not_a_module_anyone_ships (imported by x.py)"]


def test_a_node_without_xgrammar_gets_a_server_error_naming_it_not_a_bad_schema(monkeypatch):
    from flywheel.inference import grammar

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError, as on such a node
    with pytest.raises(grammar.GrammarUnavailable, match="needs xgrammar") as e:
        grammar.GrammarCompiler(tokenizer=None)
    # the student maps GrammarError (a schema it cannot enforce) to 400; this is not one, so the request is a 500
    assert not isinstance(e.value, grammar.GrammarError)


def test_the_vllm_environment_installs_the_ray_the_project_declares():
    """A replica in .venv-vllm (`replica_python`) joins the driver's Ray: the Makefile's ray pin there is the one
    pyproject.toml declares (another ray version cannot join the cluster)."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        [ray] = [r for r in tomllib.load(f)["project"]["dependencies"] if r.startswith("ray[")]
    with open(os.path.join(REPO, "Makefile")) as f:
        makefile = f.read()
    pinned = re.search(r"\$\(VLLM_VENV\)/bin/pip install -q \"ray\[serve\]==([0-9.]+)\"", makefile)
    assert pinned and ray.endswith("==" + pinned.group(1)), (ray, pinned and pinned.group(0))


VLLM_PYTHON = os.environ.get("FLYWHEEL_VLLM_PYTHON", os.path.join(REPO, ".venv-vllm", "bin", "python"))
PROMPTS = [[{"role": "user", "content": "Find me a flight from Phoenix to Las Vegas on March 12th."}],
           [{"role": "user", "content": "A table for two at an Italian place in Oakland tonight, please."}]]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason="no second environment (make vllm)")
def test_the_lowest_declared_transformers_decodes_and_trains_as_the_newest(tiny_model, tmp_path):
    """transformers renamed the forward's `past_key_values` to `cache` in 5.24; an older forward swallows `cache=`
    without a word, so the KV cache was dropped (garbage after the first token, a wrong shared-prefix loss). The
    vLLM environment holds the lowest transformers pyproject.toml allows (and xgrammar 0.2.8, which vllm pins): the
    same greedy answers there as here, free and under the tool-call grammar."""
    import json
    import subprocess

    from serving import strong_adapter

    from flywheel.inference.engine import HFEngine

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        [spec] = [r for r in tomllib.load(f)["project"]["dependencies"] if r.startswith("transformers")]
    lowest = re.search(r">=([0-9.]+)", spec).group(1)
    adapter = strong_adapter(tiny_model, str(tmp_path / "adapter"))
    out = tmp_path / "old.json"
    run = subprocess.run([VLLM_PYTHON, os.path.join(REPO, "tests", "hf_range_check.py"), tiny_model, adapter,
                          str(out)], input=json.dumps(PROMPTS), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    old = json.loads(out.read_text())
    assert old["transformers"].startswith(lowest), (old["transformers"], spec)  # the bound is what is tested
    hf = HFEngine(tiny_model, dtype="float32")
    hf.load_adapter("a", adapter)
    here = [g.text for g in hf.generate(PROMPTS * 2, [None] * len(PROMPTS) + ["a"] * len(PROMPTS), 16)]
    from hf_range_check import CONSTRAINT

    here += [g.text for g in hf.generate(PROMPTS[:1], ["a"], 64, constraints=[CONSTRAINT])]
    assert old["texts"] == here and here[-1].startswith("<tool_call>")
    assert old["prefix_max_diff"] < 1e-4
