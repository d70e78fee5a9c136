"""Siamese embedder training loop: seeded, checkpointed each epoch, resumable, early-stopped on validation AUROC.

Kept apart from the network (``models.siamese``) the way anomalib keeps ``lightning_model`` apart from
``torch_model``. CUDA when present (AMP, pinned memory, non-blocking copies, channels_last), CPU otherwise.
Validation scores through ``inspector.scoring``, the same code the line uses.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from inspector.durable import replace_durably
from inspector.metrics import roc_auc
from inspector.preprocess import PreprocessConfig, Preprocessor, full_placement, patch_grid
from inspector.scorer import PART_VIEW, PATCH_VIEW, Scorer, golden_rows
from inspector.scoring import ScoringConfig
from models import distributed
from models.distributed import DistributedContext, gather_items
from models.losses import (
    in_batch_contrastive_loss,
    in_batch_triplet_loss,
    patch_contrastive_loss,
    patch_labels_from_masks,
    patch_triplet_loss,
)
from models.siamese import Embedder, PatchEmbedder

log = logging.getLogger(__name__)

LossName = Literal["contrastive", "triplet"]
Mode = Literal["auto", "patch", "in_batch"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; defaults work for a pretrained backbone on a few hundred images."""

    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    loss: LossName = "contrastive"
    mode: Mode = "auto"  # patch embedders train in "patch" mode, image embedders "in_batch"
    margin: float = 1.0
    mining: Literal["hard", "all"] = "hard"
    max_steps_per_epoch: int | None = None
    early_stopping_patience: int = 3
    min_delta: float = 1e-4
    collapse_variance: float = 1e-5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    #: processes the fit runs on (one GPU each on CUDA, CPU processes on gloo otherwise); above 1 ``pipelines``
    #: launches it with ``torchrun`` (``pipelines/ddp.py``), and ``train`` finds the process group made for it
    devices: int = 1
    progress: bool = True
    init_checkpoint: str | None = None  # warm start: a checkpoint whose "model" weights are loaded before epoch 1
    keep_initial: bool = (
        True  # validate the starting weights too: if no epoch beats them, they are what train() returns
    )

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be 1 or more, got {self.devices}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_auroc: float | None
    embedding_variance: float
    seconds: float
    images: int
    val_views: dict[str, float] | None = None  # with a whole-part score: each view's validation AUROC alone

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class TrainHistory:
    """What happened: one record per epoch, the best epoch, and why training stopped."""

    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None  # -1: no epoch beat the starting weights (``keep_initial``), which were kept
    best_val_auroc: float | None = None
    initial_val_auroc: float | None = None
    initial_val_views: dict[str, float] | None = (
        None  # with a whole-part score: each view's AUROC on the starting weights
    )
    skipped: str | None = None  # why no training happened (the starting weights are the model), when it was skipped
    loss: str | None = None  # the loss the loop trained with, e.g. "patch_triplet" (see ``loss_name``)
    stopped_early: bool = False
    collapsed: bool = False
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for rec, e in zip(d["epochs"], self.epochs):
            rec["images_per_second"] = e.images_per_second
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainHistory:
        epochs = [
            EpochRecord(**{k: v for k, v in e.items() if k in EpochRecord.__dataclass_fields__})
            for e in data.get("epochs", [])
        ]
        rest = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "epochs"}
        return cls(epochs=epochs, **rest)


@dataclass
class ValidationData:
    """Preprocessed validation images: golden references and labelled queries (label 1 = anomalous)."""

    references: Tensor
    queries: Tensor
    labels: np.ndarray
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    query_sizes: list[tuple[int, int]] | None = None  # original (width, height): patch scores skip letterbox padding
    preprocess: PreprocessConfig | None = None  # the geometry the queries went through (with query_sizes)
    reference_sizes: list[tuple[int, int]] | None = (
        None  # the references' (width, height): their whole-part descriptors
    )


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@torch.no_grad()
def embed_tensor(
    embedder: Embedder | PatchEmbedder, images: Tensor, batch_size: int = 64, device: torch.device | None = None
) -> np.ndarray:
    """Embed a preprocessed NCHW tensor in eval mode; float32 numpy out."""
    device = device or next(embedder.parameters()).device
    was_training = embedder.training
    embedder.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        outs.append(embedder(x).float().cpu())
    embedder.train(was_training)
    if not outs:
        return np.zeros((0, embedder.embedding_dim), dtype=np.float32)
    return torch.cat(outs).numpy()


@torch.no_grad()
def embed_parts(
    embedder: PatchEmbedder,
    images: Tensor,
    placements: np.ndarray,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Patch embeddings and whole-part descriptors (``PatchEmbedder.forward_parts``) of a preprocessed NCHW tensor."""
    device = device or next(embedder.parameters()).device
    was_training = embedder.training
    embedder.eval()
    patches, descriptors = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        z, d = embedder.forward_parts(x, torch.from_numpy(placements[i : i + batch_size]).to(device))
        patches.append(z.float().cpu())
        descriptors.append(d.float().cpu())
    embedder.train(was_training)
    return torch.cat(patches).numpy(), torch.cat(descriptors).numpy().astype(np.float64)


def _placements(data: ValidationData, sizes: list[tuple[int, int]] | None, n: int) -> np.ndarray:
    """Where each validation image's part sits on the input (the whole input when its size is unknown)."""
    cfg = data.preprocess
    if cfg is None:
        raise ValueError("whole-part validation needs the preprocessing geometry (ValidationData.preprocess)")
    return full_placement(n, cfg.height, cfg.width) if sizes is None else Preprocessor(cfg).placements(sizes)


def describes_parts(embedder: nn.Module, data: ValidationData) -> bool:
    """Whether validation scores like a line bundle with the whole-part score: the embedder describes whole parts,
    the geometry is known, and there are enough references for a Gaussian and goods to scale the two views."""
    return (
        bool(getattr(embedder, "density_stages", ()))
        and data.preprocess is not None
        and len(data.references) >= 2
        and int((np.asarray(data.labels) == 0).sum()) >= 2
    )


def _on_part(data: ValidationData, sizes: list[tuple[int, int]] | None, embeddings: np.ndarray) -> np.ndarray | None:
    """(N, P) the patches on each part (the line's rule), for patch embeddings of images of known size."""
    if embeddings.ndim != 3 or sizes is None or data.preprocess is None:
        return None
    cfg = data.preprocess
    return Preprocessor(cfg).content_mask(sizes, patch_grid(embeddings.shape[1], cfg.height, cfg.width))


def validation_views(
    embedder: Embedder | PatchEmbedder, data: ValidationData, device: torch.device | None = None
) -> tuple[dict[str, np.ndarray], float]:
    """Scores of the validation queries as the line computes them, and the mean per-dimension embedding variance.

    Always ``patch`` (worst patch, or image distance). For an embedder that describes whole parts, also ``part``
    (Mahalanobis distance to a Gaussian of the references' descriptors) and ``fused``: both standardised on the
    query goods (the calibration goods, as ``build_bundle`` scales them) and fused by the default rule, the
    line's score. Why: the epoch the line keeps must be the one that separates best with the score the line will
    use; picked by the patch score alone, training was kept where it lowered the fused score (benchmarks/README.md)."""
    ref_desc = query_desc = None
    part_blocks: tuple[int, ...] | None = None
    if isinstance(embedder, PatchEmbedder) and describes_parts(embedder, data):
        refs, ref_desc = embed_parts(
            embedder, data.references, _placements(data, data.reference_sizes, len(data.references)), device=device
        )
        queries, query_desc = embed_parts(
            embedder, data.queries, _placements(data, data.query_sizes, len(data.queries)), device=device
        )
        part_blocks = embedder.descriptor_blocks
    else:
        refs = embed_tensor(embedder, data.references, device=device)
        queries = embed_tensor(embedder, data.queries, device=device)
    scorer = Scorer.of(
        golden_rows(refs, data.scoring, _on_part(data, data.reference_sizes, refs)),
        data.scoring,
        part_references=ref_desc,
        part_blocks=part_blocks,
    )
    raw = scorer.raw(queries, _on_part(data, data.query_sizes, queries), query_desc)
    views = {PATCH_VIEW: raw.patch}
    if raw.part is not None:
        scorer = scorer.fitted_on(raw.subset(np.asarray(data.labels) == 0))  # the goods scale both views
        views.update({PART_VIEW: raw.part, "fused": scorer.fuse(raw)})
    both = np.concatenate([refs, queries])
    variance = float(both.reshape(-1, both.shape[-1]).var(axis=0).mean())
    return views, variance


def validate(
    embedder: Embedder | PatchEmbedder, data: ValidationData, device: torch.device | None = None
) -> tuple[float, float, dict[str, float]]:
    """Validation image AUROC of the line's score (fused when the embedder describes whole parts), the mean
    per-dimension embedding variance, and each view's AUROC alone."""
    views, variance = validation_views(embedder, data, device)
    aurocs = {name: roc_auc(data.labels, scores) for name, scores in views.items()}
    return aurocs.get("fused", aurocs["patch"]), variance, aurocs


def resolve_mode(embedder: nn.Module, mode: Mode) -> Mode:
    """``auto`` → ``patch`` for a patch embedder, ``in_batch`` for an image embedder."""
    if mode == "auto":
        return "patch" if getattr(embedder, "mode", "global") == "patch" else "in_batch"
    if (mode == "patch") != (getattr(embedder, "mode", "global") == "patch"):
        raise ValueError(f"training mode {mode!r} does not fit a {getattr(embedder, 'mode', 'global')!r} embedder")
    return mode


def loss_name(cfg: TrainConfig) -> str:
    """The loss ``batch_loss`` runs for a resolved mode, e.g. ``patch_triplet``; an error for a pairing it lacks.

    Patch triplets are mined batch-hard only: batch-all over every (anchor, positive, negative) patch triple of a
    batch is millions of triplets."""
    if cfg.loss not in ("contrastive", "triplet"):
        raise ValueError(f"unknown loss {cfg.loss!r}: use 'contrastive' or 'triplet'")
    if cfg.mode not in ("patch", "in_batch"):
        raise ValueError(f"unknown training mode {cfg.mode!r}: use 'auto', 'patch' or 'in_batch'")
    if cfg.mode == "patch" and cfg.loss == "triplet" and cfg.mining != "hard":
        raise ValueError(f"the patch triplet loss mines batch-hard only, got mining={cfg.mining!r}")
    return f"{cfg.mode}_{cfg.loss}"


class TrainingForward(nn.Module):
    """What the loss needs from the embedder in one ``forward`` (patch maps in ``patch`` mode, image embeddings in
    ``in_batch`` mode), so that DDP, which wraps a module's ``forward``, wraps the training step's one call."""

    def __init__(self, embedder: Embedder | PatchEmbedder, mode: Mode) -> None:
        super().__init__()
        self.embedder = embedder
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "patch":  # resolve_mode checked the embedder
            return cast(PatchEmbedder, self.embedder).forward_map(x)
        return cast(Tensor, self.embedder(x))


def batch_loss(
    embedder: Embedder | PatchEmbedder,
    batch: Any,
    cfg: TrainConfig,
    device: torch.device,
    *,
    forward: nn.Module | None = None,
    ctx: DistributedContext | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Loss for one batch in the configured mode; returns (loss, embeddings for the collapse monitor, images seen).

    ``patch``: batches of :class:`~models.training_data.PatchPairDataset` (images, masks, sources, labels), the loss
    on patch embeddings. ``in_batch``: batches of :class:`~models.training_data.LabelledImageDataset` (images,
    labels), the loss on image embeddings mined from the batch. ``forward``: the module that runs the embedder (a
    :class:`TrainingForward`, DDP-wrapped under ``torchrun``); ``ctx``: this rank's process group, whose shares of
    the batch are gathered before the loss (the whole batch's pairs, as one process sees them)."""
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    fmt = (lambda t: t.contiguous(memory_format=torch.channels_last)) if device.type == "cuda" else (lambda t: t)
    run = forward if forward is not None else TrainingForward(embedder, cfg.mode)
    if cfg.mode == "patch":
        images, masks, sources, labels = (move(t) for t in batch[:4])  # (items, images per item, ...)
        per_item = images.shape[1]
        maps = run(fmt(images.flatten(0, 1)))
        if ctx is not None:
            maps = gather_items(maps.unflatten(0, (-1, per_item)), ctx, grad=True).flatten(0, 1)
            masks, sources, labels = (gather_items(t, ctx) for t in (masks, sources, labels))
        masks, sources, labels = (t.flatten(0, 1) for t in (masks, sources, labels))
        patch_labels = patch_labels_from_masks(masks, (maps.shape[-2], maps.shape[-1]))
        patches = maps.flatten(2).transpose(1, 2)
        patch_loss = patch_triplet_loss if cfg.loss == "triplet" else patch_contrastive_loss
        loss = patch_loss(patches, patch_labels.flatten(1), labels, sources, margin=cfg.margin)
        return loss, patches.reshape(-1, patches.shape[-1]), len(maps)
    if cfg.mode == "in_batch":
        x, labels = move(batch[0]), move(batch[1])
        z = run(fmt(x))
        if ctx is not None:
            z, labels = gather_items(z, ctx, grad=True), gather_items(labels, ctx)
        if cfg.loss == "contrastive":
            loss = in_batch_contrastive_loss(z, labels, margin=cfg.margin)
        else:
            loss = in_batch_triplet_loss(z, labels, margin=cfg.margin, mining=cfg.mining)
        return loss, z, len(z)
    raise ValueError(f"unknown training mode {cfg.mode!r}")


def _optimizer(embedder: Embedder | PatchEmbedder, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with a smaller learning rate for the (pretrained) backbone than for the fresh projection head."""
    backbone = [p for p in embedder.backbone.parameters() if p.requires_grad]
    head = [p for n, p in embedder.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": head, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file, then rename), so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    replace_durably(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state: tensors and plain types only (``weights_only``), never code. Scheduled retraining
    warm-starts from the champion's checkpoint in the artifact store: whoever can write the store must not be able to
    run code on the training worker through it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None


def train(
    embedder: Embedder | PatchEmbedder,
    dataset: Dataset,
    config: TrainConfig | None = None,
    *,
    validation: ValidationData | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
) -> TrainHistory:
    """Train ``embedder`` in place; returns the history. The best-validated weights are restored at the end.

    With ``checkpoint_dir``, ``last.pt`` is written after every epoch and ``best.pt`` whenever validation improves;
    ``resume=True`` continues from ``last.pt`` (same config) as if the run had not been interrupted.

    In a process group of several ranks (``torchrun``, :mod:`models.distributed`) the model runs under DDP, each rank
    on its share of every global batch of ``batch_size``; rank 0 alone validates, checkpoints and shows progress,
    and every rank ends with the same weights.
    """
    cfg = config or TrainConfig()
    cfg = replace(cfg, mode=resolve_mode(embedder, cfg.mode))
    ctx = distributed.current()
    main = ctx is None or ctx.is_main
    device = resolve_device(cfg.device)
    if ctx is not None:
        device = distributed.rank_device(ctx, device)
    seed_everything(cfg.seed)
    if (
        cfg.init_checkpoint and not resume
    ):  # warm start (e.g. from the champion's best.pt); same architecture or an error
        embedder.load_state_dict(load_checkpoint(cfg.init_checkpoint, map_location="cpu")["model"])
        log.info("warm start from %s", cfg.init_checkpoint)
    embedder.to(device)
    if device.type == "cuda":
        embedder.to(memory_format=torch.channels_last)
    optimizer = _optimizer(embedder, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history = TrainHistory(device=str(device), loss=loss_name(cfg))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    forward: nn.Module = TrainingForward(embedder, cfg.mode)
    if ctx is not None:
        from torch.nn.parallel import DistributedDataParallel

        # static_graph: the parameters the step uses never change, and the stages past the deepest feature stage
        # (trainable but never run by forward_map) are left out of every reduction
        forward = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True
        )
    loss_scale = ctx.world_size if ctx is not None else 1  # see models.distributed: the mean over ranks

    def checkpoint(name: str, state: dict[str, Any]) -> None:
        if ckpt_dir is not None and main:
            save_checkpoint(ckpt_dir / name, state)

    def validated() -> tuple[float, float, dict[str, float]]:
        assert validation is not None
        if ctx is None:
            return validate(embedder, validation, device)
        return distributed.broadcast_from_main(validate(embedder, validation, device) if main else None)

    best_state: dict[str, Tensor] | None = None
    start_epoch = 0
    bad_epochs = 0
    best_score: float | None = None
    best_tiebreak: float | None = None  # the patch view's AUROC of the best weights, when the fused score ties

    if resume:
        if ckpt_dir is None or not (ckpt_dir / "last.pt").is_file():
            raise FileNotFoundError(f"resume asked but there is no checkpoint at {ckpt_dir}/last.pt")
        state = load_checkpoint(ckpt_dir / "last.pt", map_location=device)
        embedder.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history = TrainHistory.from_dict(state["history"])
        bad_epochs = int(state.get("bad_epochs", 0))
        best_score = state.get("best_score")
        best_tiebreak = state.get("best_tiebreak")
        start_epoch = int(state["epoch"]) + 1
        if (ckpt_dir / "best.pt").is_file():
            best_state = load_checkpoint(ckpt_dir / "best.pt", map_location="cpu")["model"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at epoch %d", ckpt_dir / "last.pt", start_epoch)

    loader_gen = torch.Generator().manual_seed(cfg.seed)
    loader_options: dict[str, Any] = {
        "num_workers": cfg.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": cfg.num_workers > 0,
    }
    sampler: distributed.GlobalBatchSampler | None = None
    if ctx is None:
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=len(dataset) > cfg.batch_size,  # type: ignore[arg-type]
            generator=loader_gen,
            **loader_options,
        )
    else:  # the same global batches, shared out over the ranks
        loader, sampler = distributed.rank_loader(dataset, ctx, cfg.batch_size, cfg.seed * 1_000_003, loader_options)

    if cfg.keep_initial and validation is not None and start_epoch == 0 and cfg.epochs > 0:
        # training must earn its keep: the starting (pretrained or warm-started) weights are the first candidate
        initial_auroc, _, initial_views = validated()
        if not math.isnan(initial_auroc):
            history.initial_val_auroc = best_score = history.best_val_auroc = initial_auroc
            best_tiebreak = _tiebreak(initial_views)
            history.initial_val_views = initial_views if len(initial_views) > 1 else None
            history.best_epoch = -1
            best_state = {k: v.detach().cpu().clone() for k, v in embedder.state_dict().items()}
            checkpoint("best.pt", {"model": best_state, "epoch": -1, **(extra_state or {})})
            log.info("starting weights: val_auroc %.4f %s", initial_auroc, _views_text(initial_views))

    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader_gen.manual_seed(cfg.seed * 1_000_003 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        embedder.train()
        t0 = time.perf_counter()
        total, n_batches, n_images = 0.0, 0, 0
        variances: list[float] = []
        steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        bar = _progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and main)
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss, z, seen = batch_loss(embedder, batch, cfg, device, forward=forward, ctx=ctx)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"epoch {epoch + 1}, step {step + 1}: loss is {loss.item()} (diverged); lower the learning rate"
                )
            scaler.scale(loss * loss_scale if loss_scale != 1 else loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach())
            n_batches += 1
            n_images += seen
            variances.append(float(z.detach().float().var(dim=0).mean()))
            if bar is not None:
                bar.set_postfix(loss=f"{total / n_batches:.4f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        scheduler.step()
        seconds = time.perf_counter() - t0
        val_auroc, variance, val_views = (None, float(np.mean(variances)) if variances else 0.0, None)
        if validation is not None:
            val_auroc, variance, val_views = validated()
        record = EpochRecord(
            epoch,
            total / max(n_batches, 1),
            val_auroc,
            variance,
            seconds,
            n_images,
            val_views if val_views and len(val_views) > 1 else None,
        )
        history.epochs.append(record)
        log.info(
            "epoch %d loss %.4f val_auroc %s %s variance %.2e %.1f img/s",
            epoch + 1,
            record.train_loss,
            val_auroc,
            _views_text(record.val_views),
            variance,
            record.images_per_second,
        )
        if variance < cfg.collapse_variance:
            history.collapsed = True
            log.warning(
                "embedding collapse: mean embedding variance %.2e < %.1e at epoch %d",
                variance,
                cfg.collapse_variance,
                epoch + 1,
            )

        score = val_auroc if val_auroc is not None and not math.isnan(val_auroc) else -record.train_loss
        tiebreak = _tiebreak(val_views)
        if _improves(score, tiebreak, best_score, best_tiebreak, cfg.min_delta):
            best_score, best_tiebreak, history.best_epoch, history.best_val_auroc, bad_epochs = (
                score,
                tiebreak,
                epoch,
                val_auroc,
                0,
            )
            best_state = {k: v.detach().cpu().clone() for k, v in embedder.state_dict().items()}
            checkpoint("best.pt", {"model": best_state, "epoch": epoch, **(extra_state or {})})
        else:
            bad_epochs += 1
        stop = validation is not None and bad_epochs >= cfg.early_stopping_patience
        history.stopped_early = stop and epoch + 1 < cfg.epochs
        if ckpt_dir is not None and main:
            save_checkpoint(
                ckpt_dir / "last.pt",
                {
                    "model": embedder.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "bad_epochs": bad_epochs,
                    "best_score": best_score,
                    "best_tiebreak": best_tiebreak,
                    "history": history.to_dict(),
                    "train_config": cfg.to_dict(),
                    "torch_rng": torch.get_rng_state(),
                    **(extra_state or {}),
                },
            )
        if stop:
            log.info("early stop at epoch %d: no validation gain for %d epochs", epoch + 1, bad_epochs)
            break

    if best_state is not None:
        embedder.load_state_dict(best_state)
    return history


def _tiebreak(views: dict[str, float] | None) -> float | None:
    """With a fused score: the patch view's AUROC, which decides between epochs whose fused AUROC ties."""
    value = views.get("patch") if views and len(views) > 1 else None
    return None if value is None or math.isnan(value) else float(value)


def _improves(
    score: float, tiebreak: float | None, best: float | None, best_tiebreak: float | None, min_delta: float
) -> bool:
    """Whether an epoch beats the best so far: a higher validation score (the line's), or the same score (within
    ``min_delta``) and a better patch view. Why the tie-break: a few dozen validation parts often tie the fused AUROC
    (the whole-part view, which training does not change, ranks them), while the patch view, which training does
    change, still separates the epochs; it is also what the line falls back on if ``build_bundle`` drops the
    whole-part score."""
    if best is None or score > best + min_delta:
        return True
    return (
        abs(score - best) <= min_delta
        and tiebreak is not None
        and best_tiebreak is not None
        and tiebreak > best_tiebreak + min_delta
    )


def _views_text(views: dict[str, float] | None) -> str:
    return "(" + ", ".join(f"{k} {v:.4f}" for k, v in views.items()) + ")" if views and len(views) > 1 else ""


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
