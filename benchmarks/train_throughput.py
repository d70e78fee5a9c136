"""Training throughput (images/s) of the Siamese embedder on this machine, each with its training loss, one run.

Baseline: the default line model (Lite0 patch embedder) at 224 px; every other row prints its ratio to it. Run on demand: ``.venv/bin/python benchmarks/train_throughput.py [--steps 6] [--batch 32]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch

from models.siamese import EmbedderConfig, build_embedder
from models.training import TrainConfig, batch_loss, resolve_device, resolve_mode

CASES = [
    ("lite0 patch 224 px, projection head only (default)", EmbedderConfig(), 224),
    ("lite0 patch 224 px, stages 3-4 trainable", EmbedderConfig(trainable_stages=2), 224),
    ("lite0 patch 128 px, projection head only (demo)", EmbedderConfig(), 128),
    ("lite0 global 224 px, last 2 stages trainable", EmbedderConfig(mode="global", trainable_stages=2), 224),
    ("resnet18 224 px, global, random init", EmbedderConfig(backbone="resnet18", weights=None, mode="global"), 224),
    (
        "tiny_cnn 64 px, global (unit tests)",
        EmbedderConfig(backbone="tiny_cnn", weights=None, mode="global", embedding_dim=32, hidden_dim=64),
        64,
    ),
]


def measure(cfg: EmbedderConfig, size: int, batch: int, steps: int, device: torch.device) -> float:
    """Images per second of forward + the mode's loss + backward + AdamW step, after one warm-up step."""
    torch.manual_seed(0)
    model = build_embedder(cfg).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tcfg = TrainConfig(mode=resolve_mode(model, "auto"))
    x = torch.randn(batch, 3, size, size)
    if tcfg.mode == "patch":  # pairs of (good, defect with a square mask) from distinct sources
        masks = torch.zeros(batch // 2, 2, size, size)
        masks[:, 1, size // 4 : size // 2, size // 4 : size // 2] = 1
        data = (
            x.view(batch // 2, 2, 3, size, size),
            masks,
            torch.arange(batch).view(-1, 2) // 2,
            torch.tensor([[0, 1]]).repeat(batch // 2, 1),
        )
    else:
        data = (x, torch.arange(batch) % 2)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss, _, _ = batch_loss(model, data, tcfg, device)
        scaler.scale(loss).backward()
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
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} timed steps")
    baseline = None
    for name, cfg, size in CASES:
        ips = measure(cfg, size, args.batch, args.steps, device)
        baseline = baseline or ips
        print(f"{name:<50} {ips:8.1f} img/s   x{ips / baseline:5.2f} vs default")


if __name__ == "__main__":
    main()
