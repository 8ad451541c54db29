"""Executed docs: every code cell of every notebook in notebooks/ runs, in order, on the shared local Ray."""

import glob
import json
import os

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, ray_session, home):
    cells = json.load(open(path))["cells"]
    namespace: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        exec(compile(source, f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)  # noqa: S102
