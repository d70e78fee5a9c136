"""Training loop: checkpoints, exact resume after an interruption, early stopping, collapse monitor."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from models.siamese import EmbedderConfig, build_embedder
from models.training import TrainConfig, ValidationData, train

TINY = EmbedderConfig(backbone="tiny_cnn", weights=None, mode="global", embedding_dim=16, hidden_dim=32)


def _images(n: int, defect: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.3
    if defect:
        x[:, :, 10:16, 10:16] += 2.0  # a bright square
    return x


class SpotDataset(Dataset):
    """Goods are noise, defects have a bright square; optionally fails at one epoch (a killed run)."""

    def __init__(self, fail_at_epoch: int | None = None) -> None:
        self.x = torch.cat([_images(32, False, 0), _images(32, True, 1)])
        self.y = torch.cat([torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long)])
        self.fail_at_epoch = fail_at_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.fail_at_epoch:
            raise RuntimeError("killed")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def _validation() -> ValidationData:
    return ValidationData(
        references=_images(8, False, 5),
        queries=torch.cat([_images(8, False, 6), _images(8, True, 7)]),
        labels=np.r_[np.zeros(8), np.ones(8)],
    )


def _config(**kw: object) -> TrainConfig:
    base = dict(epochs=3, batch_size=16, lr=3e-3, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_trains_checkpoints_and_learns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_embedder(TINY)
    history = train(model, SpotDataset(), _config(epochs=4), validation=_validation(), checkpoint_dir=tmp_path)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    assert len(history.epochs) >= 1 and all(np.isfinite(e.train_loss) for e in history.epochs)
    assert history.best_val_auroc is not None and history.best_val_auroc >= 0.9
    losses = [e.train_loss for e in history.epochs]
    assert len(losses) >= 2 and np.all(np.diff(losses) < 0), losses  # the loss falls every epoch


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight = build_embedder(TINY)
    train(
        straight,
        SpotDataset(),
        _config(early_stopping_patience=99),
        validation=_validation(),
        checkpoint_dir=tmp_path / "a",
    )

    torch.manual_seed(0)
    interrupted = build_embedder(TINY)
    with pytest.raises(RuntimeError, match="killed"):
        train(
            interrupted,
            SpotDataset(fail_at_epoch=2),
            _config(early_stopping_patience=99),
            validation=_validation(),
            checkpoint_dir=tmp_path / "b",
        )
    resumed = build_embedder(TINY)
    history = train(
        resumed,
        SpotDataset(),
        _config(early_stopping_patience=99),
        validation=_validation(),
        checkpoint_dir=tmp_path / "b",
        resume=True,
    )
    assert len(history.epochs) == 3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(build_embedder(TINY), SpotDataset(), _config(), checkpoint_dir=tmp_path, resume=True)


class _RunsCode:
    """A pickle payload that would create a file when unpickled (what a hostile checkpoint in the store does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    from models.training import load_checkpoint

    marker = tmp_path / "pwned.txt"
    hostile = tmp_path / "best.pt"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, hostile)
    with pytest.raises(ValueError, match="best.pt: not a readable checkpoint"):
        load_checkpoint(hostile)
    assert not marker.exists(), "unpickling ran the payload"
    fine = tmp_path / "fine.pt"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1, "history": {"epochs": [{"loss": 0.5}]}}, fine)
    assert load_checkpoint(fine)["epoch"] == 1


def test_early_stopping_when_validation_does_not_improve() -> None:
    torch.manual_seed(0)
    same = _images(4, False, 9)  # queries identical to the references: every score 0, AUROC stuck at 0.5
    flat = ValidationData(references=same, queries=torch.cat([same, same]), labels=np.r_[np.zeros(4), np.ones(4)])
    history = train(
        build_embedder(TINY),
        SpotDataset(),
        _config(epochs=6, early_stopping_patience=2, keep_initial=False),
        validation=flat,
    )
    assert len(history.epochs) == 3 and history.stopped_early and history.best_epoch == 0


def test_starting_weights_are_kept_when_no_epoch_beats_them() -> None:
    """Training must earn its keep: validated like every epoch, the starting weights win unless an epoch beats them."""
    torch.manual_seed(0)
    same = _images(4, False, 9)
    flat = ValidationData(references=same, queries=torch.cat([same, same]), labels=np.r_[np.zeros(4), np.ones(4)])
    model = build_embedder(TINY)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(model, SpotDataset(), _config(epochs=6, early_stopping_patience=2), validation=flat)
    assert (
        history.initial_val_auroc == 0.5
        and history.best_epoch == -1
        and len(history.epochs) == 2
        and history.stopped_early
    )
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name

    torch.manual_seed(0)
    history = train(build_embedder(TINY), SpotDataset(), _config(epochs=2), validation=_validation())
    assert history.initial_val_auroc is not None and history.best_val_auroc >= history.initial_val_auroc


def test_collapse_monitor_flags_constant_embeddings() -> None:
    torch.manual_seed(0)
    model = build_embedder(TINY)
    torch.nn.init.zeros_(model.head[-1].weight)
    torch.nn.init.constant_(model.head[-1].bias, 1.0)
    history = train(model, SpotDataset(), _config(epochs=1, lr=0.0), validation=_validation())
    assert history.collapsed and history.epochs[0].embedding_variance < 1e-6


def _part_validation(tmp_path: Path) -> tuple[ValidationData, list[Path]]:
    """Goods vary in brightness part to part; 'patchy' parts are half dark, half bright: every patch matches some
    golden patch, the whole part does not (the case the line's whole-part score exists for)."""
    from PIL import Image

    from inspector.preprocess import PreprocessConfig, Preprocessor
    from tests.parts import textured_parts

    rng = np.random.default_rng(3)
    pre = PreprocessConfig(height=32, width=32)
    refs, goods = textured_parts(rng, 30, (0.3, 0.7)), textured_parts(rng, 12, (0.3, 0.7))
    patchy = [
        Image.fromarray(
            np.concatenate(
                [
                    np.asarray(textured_parts(rng, 1, (0.3, 0.32))[0])[:, :20],
                    np.asarray(textured_parts(rng, 1, (0.68, 0.7))[0])[:, 20:],
                ],
                axis=1,
            )
        )
        for _ in range(12)
    ]
    files = []
    for i, img in enumerate(refs):
        files.append(tmp_path / f"ref{i}.png")
        img.save(files[-1])
    batch = Preprocessor(pre).batch
    data = ValidationData(
        references=torch.from_numpy(batch(refs)),
        queries=torch.from_numpy(batch(goods + patchy)),
        labels=np.r_[np.zeros(12), np.ones(12)],
        query_sizes=[im.size for im in goods + patchy],
        preprocess=pre,
        reference_sizes=[im.size for im in refs],
    )
    return data, files


def test_validation_scores_with_the_line_s_fused_score(tmp_path: Path) -> None:
    """Epochs are chosen by the score the line will use: for an embedder that describes whole parts, the standardised
    patch and whole-part scores fused; the patch score alone cannot see parts that are off as a whole."""
    from models.training import validate

    data, _ = _part_validation(tmp_path)
    torch.manual_seed(0)
    model = build_embedder(
        EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=8, density_stages=2)
    )
    auroc, variance, views = validate(model, data)
    assert set(views) == {"patch", "part", "fused"} and variance > 0
    assert auroc == views["fused"] and views["fused"] > 0.95 and views["fused"] > views["patch"] + 0.2
    no_part = build_embedder(
        EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=8, density_stages=0)
    )
    auroc, _, views = validate(no_part, data)
    assert set(views) == {"patch"} and auroc == views["patch"]


def test_training_records_each_view_and_keeps_the_best_fused_epoch(tmp_path: Path) -> None:
    from inspector.preprocess import PreprocessConfig, Preprocessor
    from models.synthetic import SyntheticDefects
    from models.training_data import PatchPairDataset

    data, files = _part_validation(tmp_path)
    torch.manual_seed(0)
    model = build_embedder(
        EmbedderConfig(backbone="tiny_cnn", weights=None, feature_stages=(2, 3), embedding_dim=8, density_stages=2)
    )
    dataset = PatchPairDataset(
        files, [], Preprocessor(PreprocessConfig(height=32, width=32)), synthetic=SyntheticDefects(), seed=0
    )
    history = train(model, dataset, _config(epochs=2, batch_size=8, max_steps_per_epoch=2), validation=data)
    assert history.initial_val_views is not None and set(history.initial_val_views) == {"patch", "part", "fused"}
    assert history.initial_val_auroc == history.initial_val_views["fused"]
    for record in history.epochs:
        assert record.val_views is not None and record.val_auroc == record.val_views["fused"]
    chosen = history.initial_val_auroc if history.best_epoch == -1 else history.epochs[history.best_epoch].val_auroc
    assert history.best_val_auroc == chosen == max([history.initial_val_auroc] + [r.val_auroc for r in history.epochs])


def test_a_tied_fused_score_is_broken_by_the_patch_view() -> None:
    from models.training import _improves

    assert _improves(0.96, 0.95, None, None, 1e-4)  # the first candidate
    assert _improves(0.97, 0.90, 0.96, 0.95, 1e-4)  # the line's score decides first
    assert not _improves(0.95, 0.99, 0.96, 0.90, 1e-4)
    assert _improves(0.96, 0.954, 0.96, 0.926, 1e-4)  # a tie: the better patch view wins
    assert not _improves(0.96, 0.926, 0.96, 0.954, 1e-4)
    assert not _improves(0.96, None, 0.96, 0.9, 1e-4)  # no views (a patch-only model): a tie keeps the earlier weights
