"""Curated datasets: the one place that knows their layout, and how every stage reads them.

    from flywheel.datasets import TEST, open_split
    split = open_split(store, "sgd_Flights", "latest", TEST)   # the resolved version, the task, the rows
    split.rows()                                               # schema.EXAMPLE rows of the dataset's task

Layout (written by `flywheel curate`, see `flywheel.curate.pipeline`):

    datasets/<agent>/LATEST                                   {"version": v}
    datasets/<agent>/<v>/manifest.json                        counts, labels, sessions per split; task; config
    datasets/<agent>/<v>/{train,validation,test}.parquet      schema.EXAMPLE rows; a session is in one split
    datasets/<agent>/<v>/{quarantine,keys}.parquet, card.md   what was set aside and why; the dataset card

Each split has one use, so nothing is chosen on the examples it is judged on:

- train: what distillation learns from, the in-context baseline's demonstrations, the drift monitor's reference;
- validation: selection: the sweep's objective, training's early stopping (`Split.require` fails when empty);
- test: the gate and every figure `flywheel evaluate` reports; nothing selects on it.

Versions curated before the three-way split hold train/eval only. On such a version "test" reads its eval file
(the held-out sessions it always gated on; rows come back labelled "test"), and "validation" is empty: a
selection step that needs it says so (`Split.require`). `flywheel curate` then publishes a three-way version
(the config changed, so it rebuilds), and the old eval sessions stay held out, as test (`pinned_sessions`).
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.schema import EXAMPLE
from flywheel.storage import Store

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)
LEGACY = {"eval": TEST}  # split names of versions curated before the three-way split -> today's name


def folder(agent: str, version: str) -> str:
    """A version's folder, relative to the home."""
    return f"datasets/{agent}/{version}"


def latest_version(store: Store, agent: str) -> str | None:
    """The agent's latest published version (`datasets/<agent>/LATEST`), or None."""
    pointer = store.read_json(f"datasets/{agent}/LATEST")
    return str(pointer["version"]) if isinstance(pointer, dict) and pointer.get("version") else None


def pointed_version(store: Store, agent: str, version: str = "latest") -> str:
    """"latest" -> the version the LATEST pointer names (FileNotFoundError naming the fix when there is none);
    any other name as it is. Unlike `resolve_version`, the version folder need not hold a manifest."""
    v = latest_version(store, agent) if version == "latest" else version
    if not v:
        raise FileNotFoundError(f"agent {agent!r} has no curated dataset under {store.uri}/datasets/{agent} "
                                f"(no LATEST pointer): run `flywheel curate --agents {agent}` first")
    return v


def resolve_version(store: Store, agent: str, version: str = "latest") -> str:
    """"latest" or a version name -> a published version (one with a manifest); FileNotFoundError otherwise."""
    v = latest_version(store, agent) if version == "latest" else version
    if not v or not store.exists(f"{folder(agent, v)}/manifest.json"):
        raise FileNotFoundError(f"agent {agent!r} has no curated dataset {version!r} under {store.uri}: "
                                f"run `flywheel curate --agents {agent}` first")
    return v


def read_manifest(store: Store, agent: str, version: str) -> dict | None:
    return store.read_json(f"{folder(agent, version)}/manifest.json")


def split_name(name: str) -> str:
    """Today's name of a split name read from an older version ("eval" -> "test")."""
    return LEGACY.get(name, name)


def is_legacy(store: Store, agent: str, version: str) -> bool:
    """True for a version curated before the three-way split (train/eval files, no test file)."""
    base = folder(agent, version)
    return not store.exists(f"{base}/{TEST}.parquet") and store.exists(f"{base}/eval.parquet")


def split_file(store: Store, agent: str, version: str, split: str) -> str | None:
    """The file `split` is read from (relative to the home): `<split>.parquet`, or an older version's eval file
    for "test"; None when the version has none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rel = f"{folder(agent, version)}/{split}.parquet"
    if store.exists(rel):
        return rel
    if split == TEST and is_legacy(store, agent, version):
        return f"{folder(agent, version)}/eval.parquet"
    return None


def read_split(store: Store, agent: str, version: str, split: str, columns: list[str] | None = None) -> pa.Table:
    """One split of a version as schema.EXAMPLE rows (or only `columns`). An older train/eval version: "test"
    reads its eval file, "validation" is empty. A split file that should exist and does not: FileNotFoundError."""
    rel = split_file(store, agent, version, split)
    if rel is None:
        if split == VALIDATION and is_legacy(store, agent, version):
            empty = EXAMPLE.empty_table()
            return empty.select(columns) if columns else empty
        raise FileNotFoundError(f"agent {agent!r}: dataset version {version!r} has no {split} split at "
                                f"{store.path(folder(agent, version))}: re-run `flywheel curate --agents {agent}`")
    with store.open(rel, "rb") as f:
        table = pq.read_table(f, schema=EXAMPLE, columns=columns)
    if "split" in table.column_names and not rel.endswith(f"/{split}.parquet"):  # an eval file read as test
        i = table.column_names.index("split")
        table = table.set_column(i, "split", pa.array([split] * table.num_rows, pa.string()))
    return table


def pinned_sessions(store: Store, agent: str, version: str | None) -> dict[str, str]:
    """Session -> the split `version` put it in (an older version's eval sessions -> test); {} without a version.
    Curation keeps them there, so a held-out conversation never moves into train in a later version."""
    pinned: dict[str, str] = {}
    for split in SPLITS if version else ():
        if split_file(store, agent, version, split) is not None:
            sessions = read_split(store, agent, version, split, columns=["session_id"]).column(0).to_pylist()
            pinned.update(dict.fromkeys(sessions, split))
    return pinned


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of one dataset version, as a stage reads it (`open_split`)."""

    agent: str
    version: str
    name: str  # train | validation | test
    task: str | None  # the dataset's task (manifest), None for a folder without a manifest
    table: pa.Table  # schema.EXAMPLE rows
    legacy: bool  # the version holds train/eval only (see the module docstring)

    def rows(self, task_only: bool = True) -> list[dict]:
        """The split's rows; with `task_only`, only examples of the dataset's task (what stages score and train)."""
        rows = self.table.to_pylist()
        return [r for r in rows if r["task"] == self.task] if task_only and self.task else rows

    def require(self, purpose: str) -> Split:
        """This split, or a ValueError that says why it is empty and what to do, naming `purpose`."""
        if self.table.num_rows:
            return self
        if self.legacy and self.name == VALIDATION:
            raise ValueError(
                f"{self.agent}: dataset version {self.version} was curated before validation splits existed "
                f"(train/eval only), so {purpose} has no validation examples; run `flywheel curate --agents "
                f"{self.agent}` to publish a train/validation/test version (its eval sessions stay held out, as test)")
        fraction = f"{self.name}_fraction" if self.name != TRAIN else "validation_fraction and test_fraction"
        raise ValueError(f"{self.agent}: the {self.name} split of dataset version {self.version} is empty, so "
                         f"{purpose} has nothing to use; capture more traffic or change the curate config's "
                         f"{fraction}, then run `flywheel curate --agents {self.agent}`")


def open_split(store: Store, agent: str, version: str, split: str) -> Split:
    """The single entry point: `version` ("latest" or a name) resolved, the split read, the task from the
    manifest. "latest" without a LATEST pointer, or a missing split file: FileNotFoundError naming the fix."""
    v = pointed_version(store, agent, version)
    table = read_split(store, agent, v, split)
    manifest = read_manifest(store, agent, v) or {}
    return Split(agent, v, split, manifest.get("task"), table, is_legacy(store, agent, v))
