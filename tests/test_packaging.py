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
