"""The training step on N processes: ``torchrun`` launched from the Prefect training task, one rank a GPU (nccl)
or a CPU process (gloo).

``train.devices=N`` (or ``pipelines train --nproc N``) makes the flow's training task call :func:`fit_distributed`
instead of :func:`pipelines.embedder_training.fit_embedder`: it writes the step's inputs as JSON (the split's
paths and the recipe: nothing pickled crosses the process boundary), runs ``python -m torch.distributed.run
--standalone --nproc-per-node N -m pipelines.ddp JOB``, and each rank runs the same ``fit_embedder`` inside the
process group (``models.training.train`` finds it: DDP, the sampler, the batch gather; ``models/distributed.py``).
Rank 0 alone writes checkpoints (``last.pt``/``best.pt`` as a one-process run does, so ``resume`` works as today)
and the step's result; the task loads those weights, and the flow goes on in its own process: export, bundle,
MLflow, registration happen once, never per rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from inspector.durable import replace_durably
from models import distributed
from models.siamese import Embedder, PatchEmbedder, build_embedder
from models.training import TrainHistory, load_checkpoint, save_checkpoint
from pipelines.data.records import ImageRecord
from pipelines.data.split import DataSplit
from pipelines.recipe import Recipe

JOB_FILE = "ddp_job.json"
RESULT_FILE = "ddp_result.pt"
HISTORY_FILE = "ddp_history.json"
LOG_FILE = "ddp.log"


def _record(r: ImageRecord) -> dict[str, Any]:
    return {
        "path": str(r.path),
        "label": r.label,
        "defect_type": r.defect_type,
        "source_split": r.source_split,
        "mask": None if r.mask is None else str(r.mask),
    }


def _from_record(d: dict[str, Any]) -> ImageRecord:
    return ImageRecord(Path(d["path"]), int(d["label"]), d["defect_type"], d["source_split"], _path(d["mask"]))


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def split_to_dict(split: DataSplit) -> dict[str, Any]:
    return {
        "train_good": [str(p) for p in split.train_good],
        "train_defective": [_record(r) for r in split.train_defective],
        "calibration_good": [str(p) for p in split.calibration_good],
        "validation_defective": [str(p) for p in split.validation_defective],
        "test": [_record(r) for r in split.test],
        "groups": dict(split.groups),
    }


def split_from_dict(data: dict[str, Any]) -> DataSplit:
    return DataSplit(
        train_good=[Path(p) for p in data["train_good"]],
        train_defective=[_from_record(r) for r in data["train_defective"]],
        calibration_good=[Path(p) for p in data["calibration_good"]],
        validation_defective=[Path(p) for p in data["validation_defective"]],
        test=[_from_record(r) for r in data["test"]],
        groups=dict(data.get("groups", {})),
    )


def write_job(folder: Path, split: DataSplit, recipe: Recipe, checkpoint_dir: Path, resume: bool) -> Path:
    """The step's inputs as JSON for the ranks to read."""
    folder.mkdir(parents=True, exist_ok=True)
    job = {
        "split": split_to_dict(split),
        "recipe": dataclasses.asdict(recipe),
        "checkpoint_dir": str(checkpoint_dir),
        "result_dir": str(folder),
        "resume": resume,
    }
    path = folder / JOB_FILE
    path.write_text(json.dumps(job))
    return path


def torchrun_command(nproc: int, job: Path) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``, the same interpreter) on this host, ``nproc`` ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "pipelines.ddp",
        str(job),
    ]


def fit_distributed(
    split: DataSplit, recipe: Recipe, checkpoint_dir: Path, *, nproc: int | None = None, resume: bool = False
) -> tuple[Embedder | PatchEmbedder, TrainHistory]:
    """``fit_embedder`` on ``nproc`` processes (default ``recipe.train.devices``) under ``torchrun``; returns the
    trained embedder (on the CPU, in eval mode) and rank 0's history, as ``fit_embedder`` does."""
    nproc = nproc or recipe.train.devices
    if nproc < 2:
        raise ValueError(f"a distributed fit needs 2 or more processes, got {nproc}")
    if recipe.train.batch_size % nproc:
        raise ValueError(f"train.batch_size {recipe.train.batch_size} does not split over {nproc} processes")
    if torch.cuda.is_available() and recipe.train.device in ("auto", "cuda") and torch.cuda.device_count() < nproc:
        raise ValueError(f"train.devices={nproc} but this host has {torch.cuda.device_count()} GPU(s)")
    checkpoint_dir = Path(checkpoint_dir)
    folder = checkpoint_dir.parent / "ddp"
    for stale in (RESULT_FILE, HISTORY_FILE):
        (folder / stale).unlink(missing_ok=True)
    job = write_job(
        folder,
        split,
        dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, devices=nproc)),
        checkpoint_dir,
        resume,
    )
    log_path = folder / LOG_FILE
    with log_path.open("w") as log:
        done = subprocess.run(torchrun_command(nproc, job), stdout=log, stderr=subprocess.STDOUT, env=_rank_env())
    if done.returncode != 0 or not (folder / RESULT_FILE).is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(
            f"distributed training on {nproc} processes failed (exit {done.returncode}); {log_path}:\n{tail}"
        )
    embedder = build_embedder(recipe.embedder)
    embedder.load_state_dict(load_checkpoint(folder / RESULT_FILE)["model"])
    history = TrainHistory.from_dict(json.loads((folder / HISTORY_FILE).read_text()))
    return embedder.cpu().eval(), history


def _rank_env() -> dict[str, str]:
    """The ranks' environment: this one, with the working tree importable (``-m pipelines.ddp``)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run_rank(job_path: Path) -> None:
    """One rank: join the group, fit, and (rank 0) write the weights and the history for the launching task."""
    from pipelines.embedder_training import fit_embedder
    from pipelines.settings import recipe_from_dict

    job = json.loads(Path(job_path).read_text())
    recipe = recipe_from_dict(job["recipe"])
    ctx = distributed.init_from_env(recipe.train.device)
    try:
        embedder, history = fit_embedder(
            split_from_dict(job["split"]), recipe, Path(job["checkpoint_dir"]), resume=bool(job["resume"])
        )
        if ctx is None or ctx.is_main:
            folder = Path(job["result_dir"])
            save_checkpoint(folder / RESULT_FILE, {"model": embedder.state_dict()})
            fd, tmp = tempfile.mkstemp(prefix=f".{HISTORY_FILE}.", dir=folder)
            with os.fdopen(fd, "w") as fh:
                json.dump(history.to_dict(), fh)
            replace_durably(tmp, folder / HISTORY_FILE)
        distributed.barrier()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
