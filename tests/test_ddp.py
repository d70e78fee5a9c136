"""Multi-process training under DDP: 2 CPU processes on gloo, launched by torchrun as the training task launches
them, end with the weights 1 process reaches with the same global batch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.recipe import Recipe, tiny_recipe

#: float32 sums in another order (each rank's convolutions on half the batch, the gathered batch's loss) leave the two
#: runs a little apart: measured 5.7e-6 at most over every weight (tiny recipe, 2 epochs, global batch 8)
TOLERANCE = 1e-4


def _split(demo_root: Path):  # type: ignore[no-untyped-def]
    from pipelines.data.layouts import scan_dataset
    from pipelines.data.manifest import build_manifest
    from pipelines.data.split import SplitFractions, assign_splits

    manifest = build_manifest(scan_dataset(root=str(demo_root)))
    return assign_splits(manifest, SplitFractions.from_recipe(tiny_recipe()), None)


def _recipe(devices: int = 1) -> Recipe:
    recipe = tiny_recipe()
    return replace(
        recipe,
        preprocess=replace(recipe.preprocess, height=64, width=64),
        # keep_initial off: the weights compared are trained ones, never the starting weights kept
        train=replace(recipe.train, epochs=2, batch_size=8, devices=devices, progress=False, keep_initial=False),
        epoch_size=32,
    )


def test_sampler_shares_are_the_one_process_batches() -> None:
    from torch.utils.data import DataLoader

    from models.distributed import DistributedContext, GlobalBatchSampler

    data = list(range(37))
    for epoch in range(3):
        g = torch.Generator().manual_seed(7 * 1_000_003 + epoch)
        one = [b.tolist() for b in DataLoader(data, batch_size=8, shuffle=True, drop_last=True, generator=g)]
        shares = []
        for rank in range(2):
            sampler = GlobalBatchSampler(len(data), DistributedContext(rank, 2, rank, "gloo"), 8, 7 * 1_000_003)
            sampler.set_epoch(epoch)
            shares.append([b.tolist() for b in DataLoader(data, batch_size=4, sampler=sampler)])
        assert len(shares[0]) == len(shares[1]) == len(one) == 4
        for k, batch in enumerate(one):  # share j of rank r is item j * 2 + r of the one-process batch
            assert [x for pair in zip(shares[0][k], shares[1][k]) for x in pair] == batch


@pytest.mark.slow
def test_two_gloo_processes_train_the_weights_of_one(demo_root: Path, tmp_path: Path) -> None:
    from pipelines.ddp import fit_distributed
    from pipelines.embedder_training import fit_embedder

    split = _split(demo_root)
    one, one_history = fit_embedder(split, _recipe(), tmp_path / "one" / "checkpoints")
    two, two_history = fit_distributed(split, _recipe(devices=2), tmp_path / "two" / "checkpoints")

    assert len(one_history.epochs) == len(two_history.epochs) == 2
    assert two_history.best_epoch == one_history.best_epoch
    np.testing.assert_allclose(
        [e.train_loss for e in two_history.epochs], [e.train_loss for e in one_history.epochs], rtol=1e-4
    )
    assert [e.images for e in two_history.epochs] == [e.images for e in one_history.epochs]
    from models.training import load_checkpoint

    last_one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    last_two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    fresh = _fresh_state()
    moved = [k for k, p in one.named_parameters() if p.requires_grad and not torch.equal(last_one[k], fresh[k])]
    assert moved  # training moved the weights: the comparison is of trained weights
    for a, b in ((one.state_dict(), two.state_dict()), (last_one, last_two)):
        assert a.keys() == b.keys()
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert diff <= TOLERANCE, f"max |w_1proc - w_2proc| = {diff:.3e}"
    print(f"DDP parity: max |w_1proc - w_2proc| = {diff:.3e} over {len(a)} tensors ({len(moved)} trained)")
    # rank 0 alone checkpointed, where one process does; resume reads those files on every rank
    assert {p.name for p in (tmp_path / "two" / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    longer = lambda r: replace(r, train=replace(r.train, epochs=3))  # noqa: E731
    one, _ = fit_embedder(split, longer(_recipe()), tmp_path / "one" / "checkpoints", resume=True)
    two, resumed = fit_distributed(split, longer(_recipe(devices=2)), tmp_path / "two" / "checkpoints", resume=True)
    assert [e.epoch for e in resumed.epochs] == [0, 1, 2]  # epochs 0 and 1 from the checkpoint, 2 trained now
    a, b = one.state_dict(), two.state_dict()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= TOLERANCE


def test_train_task_launches_torchrun_for_several_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``train.devices`` (``pipelines train --nproc``) sends the flow's training step to ``fit_distributed``."""
    import pipelines.ddp
    from pipelines import flows
    from pipelines.cli import _parser

    calls: list[int] = []
    monkeypatch.setattr(
        pipelines.ddp, "fit_distributed", lambda split, recipe, ckpt: calls.append(recipe.train.devices)
    )
    monkeypatch.setattr(flows, "fit_embedder", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(flows, "get_run_logger", lambda: __import__("logging").getLogger("test"))
    flows.train_task.fn(None, _recipe(devices=2), tmp_path)
    flows.train_task.fn(None, _recipe(), tmp_path)
    assert calls == [2, 1]
    args = _parser().parse_args(["train", "--data", "d", "--nproc", "4"])
    assert args.nproc == 4
    with pytest.raises(ValueError, match="devices"):
        from pipelines.settings import apply_overrides

        apply_overrides(Recipe(), {"train.devices": 0})


def test_torchrun_command_runs_the_rank_entry_on_this_interpreter(tmp_path: Path) -> None:
    import sys

    from pipelines.data.records import ImageRecord
    from pipelines.data.split import DataSplit
    from pipelines.ddp import split_from_dict, split_to_dict, torchrun_command

    command = torchrun_command(4, tmp_path / "job.json")
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in command and command[-3:] == ["-m", "pipelines.ddp", str(tmp_path / "job.json")]
    split = DataSplit(
        [Path("/g/1.png")],
        [ImageRecord(Path("/d/1.png"), 1, "scratch", "train", Path("/d/1_mask.png"))],
        [Path("/g/2.png")],
        [Path("/d/2.png")],
        [ImageRecord(Path("/t/1.png"), 0, "good", "test")],
        {"/g/1.png": "group-a"},
    )
    assert split_from_dict(__import__("json").loads(__import__("json").dumps(split_to_dict(split)))) == split


def _fresh_state() -> dict[str, torch.Tensor]:
    from models.siamese import build_embedder

    torch.manual_seed(_recipe().seed)
    return build_embedder(_recipe().embedder).state_dict()
