"""Training loop: checkpoints, exact resume after an interruption, early stopping, collapse monitor."""

from __future__ import annotations

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
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss or history.best_val_auroc == 1.0


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight = build_embedder(TINY)
    train(straight, SpotDataset(), _config(early_stopping_patience=99), validation=_validation(), checkpoint_dir=tmp_path / "a")

    torch.manual_seed(0)
    interrupted = build_embedder(TINY)
    with pytest.raises(RuntimeError, match="killed"):
        train(interrupted, SpotDataset(fail_at_epoch=2), _config(early_stopping_patience=99), validation=_validation(), checkpoint_dir=tmp_path / "b")
    resumed = build_embedder(TINY)
    history = train(resumed, SpotDataset(), _config(early_stopping_patience=99), validation=_validation(), checkpoint_dir=tmp_path / "b", resume=True)
    assert len(history.epochs) == 3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(build_embedder(TINY), SpotDataset(), _config(), checkpoint_dir=tmp_path, resume=True)


def test_early_stopping_when_validation_does_not_improve() -> None:
    torch.manual_seed(0)
    same = _images(4, False, 9)  # queries identical to the references: every score 0, AUROC stuck at 0.5
    flat = ValidationData(references=same, queries=torch.cat([same, same]), labels=np.r_[np.zeros(4), np.ones(4)])
    history = train(build_embedder(TINY), SpotDataset(), _config(epochs=6, early_stopping_patience=2, keep_initial=False), validation=flat)
    assert len(history.epochs) == 3 and history.stopped_early and history.best_epoch == 0


def test_starting_weights_are_kept_when_no_epoch_beats_them() -> None:
    """Training must earn its keep: validated like every epoch, the starting weights win unless an epoch beats them."""
    torch.manual_seed(0)
    same = _images(4, False, 9)
    flat = ValidationData(references=same, queries=torch.cat([same, same]), labels=np.r_[np.zeros(4), np.ones(4)])
    model = build_embedder(TINY)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(model, SpotDataset(), _config(epochs=6, early_stopping_patience=2), validation=flat)
    assert history.initial_val_auroc == 0.5 and history.best_epoch == -1 and len(history.epochs) == 2 and history.stopped_early
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name

    torch.manual_seed(0)
    history = train(build_embedder(TINY), SpotDataset(), _config(epochs=2), validation=_validation())
    assert history.initial_val_auroc is not None and history.best_val_auroc >= history.initial_val_auroc


def test_collapse_monitor_flags_constant_embeddings() -> None:
    model = build_embedder(TINY)
    torch.nn.init.zeros_(model.head[-1].weight)
    torch.nn.init.constant_(model.head[-1].bias, 1.0)
    history = train(model, SpotDataset(), _config(epochs=1, lr=0.0), validation=_validation())
    assert history.collapsed and history.epochs[0].embedding_variance < 1e-6
