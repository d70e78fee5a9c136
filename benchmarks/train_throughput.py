"""Training throughput (images/s) of the Siamese embedder per backbone and mode on this machine, one run.

Each case times forward + its mode's loss + backward + an AdamW step on random batches (after one warm-up step);
every row prints its ratio to the first case measured (the default line model unless ``--cases`` leaves it out).

``--backbones`` adds one case per named trunk after ``--cases``: the patch embedder as the recipe reads that trunk
(``models.backbones.PATCH_READING``), 224 px, projection head only, on a generated weights file of the trunk's
shapes (the trunk is frozen as with pretrained weights; its values do not change the speed).

    .venv/bin/python -m benchmarks.train_throughput [--steps 5] [--batch 32] [--cases default,demo] [--loss triplet]
    .venv/bin/python -m benchmarks.train_throughput --cases default \
        --backbones wide_resnet50_2,vit_small_patch14_dinov2,vit_base_patch14_dinov2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch

from benchmarks.common import generated_weights, write_json
from models.backbones import BACKBONES, PATCH_READING
from models.siamese import EmbedderConfig, build_embedder
from models.training import TrainConfig, batch_loss, resolve_device, resolve_mode


@dataclass(frozen=True)
class Case:
    """One measured model: what it is, its settings, its input size."""

    description: str
    embedder: EmbedderConfig
    size: int


CASES = {
    "default": Case("lite0 patch 224 px, projection head only (default)", EmbedderConfig(), 224),
    "trunk": Case("lite0 patch 224 px, stages 3-4 trainable", EmbedderConfig(trainable_stages=2), 224),
    "demo": Case("lite0 patch 128 px, projection head only (demo)", EmbedderConfig(), 128),
    "global": Case(
        "lite0 global 224 px, last 2 stages trainable", EmbedderConfig(mode="global", trainable_stages=2), 224
    ),
    "resnet18": Case(
        "resnet18 224 px, global, random init", EmbedderConfig(backbone="resnet18", weights=None, mode="global"), 224
    ),
    "tiny": Case(
        "tiny_cnn 64 px, global (unit tests)",
        EmbedderConfig(backbone="tiny_cnn", weights=None, mode="global", embedding_dim=32, hidden_dim=64),
        64,
    ),
}


def trunk_case(backbone: str, folder: Path, size: int = 224) -> Case:
    """The patch embedder on ``backbone`` as the recipe reads it, on a generated weights file (see module doc)."""
    weights = str(generated_weights(backbone, folder))
    config = EmbedderConfig(backbone=backbone, weights=weights, **PATCH_READING.get(backbone, {}))
    return Case(f"{backbone} patch {size} px, projection head only", config, size)


def backbone_names(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """``--backbones`` as a list of registered trunk names (an unknown one is a usage error naming those known)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    if unknown := sorted(set(names) - set(BACKBONES)):
        parser.error(f"unknown backbone(s) {unknown}: choose from {sorted(BACKBONES)}")
    return names


def images_per_second(case: Case, batch: int, steps: int, device: torch.device, loss: str) -> float:
    """Images per second of forward + the mode's loss + backward + AdamW step, after one warm-up step."""
    torch.manual_seed(0)
    model = build_embedder(case.embedder).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = TrainConfig(mode=resolve_mode(model, "auto"), loss=loss)  # type: ignore[arg-type]
    size, pairs = case.size, max(1, batch // 2)
    x = torch.randn(2 * pairs, 3, size, size)
    data: tuple[torch.Tensor, ...]
    if cfg.mode == "patch":  # pairs of (good, defect with a square mask) from distinct sources
        masks = torch.zeros(pairs, 2, size, size)
        masks[:, 1, size // 4 : size // 2, size // 4 : size // 2] = 1
        sources = torch.arange(2 * pairs).view(-1, 2) // 2
        data = (x.view(pairs, 2, 3, size, size), masks, sources, torch.tensor([[0, 1]]).repeat(pairs, 1))
    else:
        data = (x, torch.arange(2 * pairs) % 2)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            value, _, _ = batch_loss(model, data, cfg, device)
        scaler.scale(value).backward()
        scaler.step(opt)
        scaler.update()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * pairs * steps / (time.perf_counter() - t0)


def gpu_beside_cpu(names: list[str], batch: int, steps: int, loss: str) -> dict[str, dict[str, float]] | None:
    """Each case's img/s on the CPU and on CUDA (AMP), where torch has CUDA; None (and a line saying so) otherwise."""
    if not torch.cuda.is_available():
        print("torch has no CUDA device here: GPU training throughput not timed")
        return None
    out = {}
    for name in names:
        cpu = images_per_second(CASES[name], batch, steps, torch.device("cpu"), loss)
        gpu = images_per_second(CASES[name], batch, steps, torch.device("cuda"), loss)
        out[name] = {"cpu": cpu, "cuda": gpu}
        print(f"{CASES[name].description:<52} CPU {cpu:8.1f} img/s   CUDA (AMP) {gpu:8.1f} img/s   x{gpu / cpu:5.1f}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps per case")
    p.add_argument("--batch", type=int, default=32, help="images per step (pairs of two)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--loss", default="contrastive", choices=["contrastive", "triplet"])
    p.add_argument("--backbones", default="", help="comma-separated trunks, one patch case each (see above)")
    p.add_argument(
        "--gpu", action="store_true", help="also time each case on CUDA (with AMP) beside the CPU, where torch has CUDA"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {unknown}: choose from {list(CASES)}")
    device = resolve_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} timed steps")
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        cases = {name: CASES[name] for name in names}
        cases.update({b: trunk_case(b, Path(tmp)) for b in backbone_names(args.backbones, p)})
        first = next(iter(cases))
        for name, case in cases.items():
            rates[name] = images_per_second(case, args.batch, args.steps, device, args.loss)
            print(f"{case.description:<60} {rates[name]:8.1f} img/s   x{rates[name] / rates[first]:5.2f} vs {first}")
    figures: dict[str, Any] = {
        "device": str(device),
        "batch": args.batch,
        "loss": args.loss,
        "images_per_second": rates,
    }
    if args.gpu:
        figures["gpu"] = gpu_beside_cpu(names, args.batch, args.steps, args.loss)
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
