"""A run's checkpoints on the store: `save_checkpoint` reports one to Ray Train and marks it persisted once every
worker's upload returned; `restore` resumes from the newer of Ray Train's committed checkpoint and that mark.

A checkpoint folder `checkpoints/<run_name>/step-<step>/` holds the backend's state (adapter, optimizer, schedule,
position; DeepSpeed: each rank's shard) and `BEST`, the adapter with the lowest validation loss so far.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from flywheel.distill.backends import save_weights
from flywheel.storage import Store

BEST = "best_adapter"  # in a checkpoint: the adapter with the lowest validation loss so far
PERSISTED = "persisted.json"  # in a run's checkpoint folder: the newest checkpoint every worker finished uploading


def save_checkpoint(backend: Any, state: dict, best: dict | None, rank: int, metrics: dict, store: Store,
                local: str | None, root: str) -> None:
    """Report `metrics` with a checkpoint: the adapter, optimizer and position, and the best adapter so far, in
    `root/step-<step>` (the run's checkpoint folder under the home), then mark it persisted (`mark_persisted`).
    `local`: in Ray Train's local mode nothing copies the checkpoint to storage, so it is uploaded there (that
    folder under the home, replaced each time) and the report points at it."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        backend.save(dict(state), tmp, rank)
        if best is not None and rank == 0:
            save_weights(backend.peft, best, os.path.join(tmp, BEST))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if os.listdir(tmp) else None
        if checkpoint is not None and local:
            store.upload(tmp, local)
            checkpoint = ray.train.Checkpoint(store.pyarrow_fs()[1] + "/" + local, filesystem=store.pyarrow_fs()[0])
            ray.train.report(metrics, checkpoint=checkpoint)
            return
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=step_dir(state["step"]))
    mark_persisted(store, root, state["step"], rank)


def step_dir(step: int) -> str:
    return f"step-{step:08d}"  # sorts by step, so the newer of two checkpoints is the larger name


def mark_persisted(store: Store, root: str, step: int, rank: int) -> None:
    """Write `root/PERSISTED` naming the checkpoint of `step` once every worker's report has returned (a report
    uploads its files before it returns). Ray Train's controller commits a reported checkpoint only when it next
    collects the reports, every couple of seconds, so a worker group lost in between (a node gone) restarted
    without it, from the previous one or from step 0; `restore` reads the mark too."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if rank == 0:
        store.write_json(f"{root}/{PERSISTED}", {"checkpoint": step_dir(step), "step": step})


def latest_checkpoint(store: Store, root: str) -> Any:
    """The newer of Ray Train's committed checkpoint and the one `root/PERSISTED` names; None when neither."""
    import ray.train

    checkpoint, mark = ray.train.get_checkpoint(), store.read_json(f"{root}/{PERSISTED}", default=None)
    if mark and (checkpoint is None or os.path.basename(checkpoint.path.rstrip("/")) < mark["checkpoint"]):
        pafs, base = store.pyarrow_fs()
        checkpoint = ray.train.Checkpoint(f"{base}/{root}/{mark['checkpoint']}", filesystem=pafs)
    return checkpoint


def restore(backend: Any, state: dict, store: Store, root: str) -> dict | None:
    """Resume from the run's latest checkpoint, if any (`latest_checkpoint`): `state` updated in place; the best
    adapter's weights."""
    from safetensors.torch import load_file

    checkpoint = latest_checkpoint(store, root)
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        state.update(backend.restore(d))
        best = os.path.join(d, BEST, "adapter_model.safetensors")
        return load_file(best) if os.path.exists(best) else None
