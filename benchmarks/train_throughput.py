"""Training throughput (images/s) of the Siamese embedder on this machine, in-batch contrastive, one run.

Baseline: the default line model (Lite0, last 2 stages trainable) at 224 px; every other row prints its ratio
to it. Run on demand: ``.venv/bin/python benchmarks/train_throughput.py [--steps 6] [--batch 32]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from models.losses import in_batch_contrastive_loss  # noqa: E402
from models.siamese import EmbedderConfig, build_embedder  # noqa: E402
from models.training import resolve_device  # noqa: E402

CASES = [
    ("lite0 224 px, last 2 stages trainable (default)", EmbedderConfig(), 224),
    ("lite0 224 px, fully trainable", EmbedderConfig(trainable_stages=-1), 224),
    ("lite0 128 px, last 2 stages trainable (demo)", EmbedderConfig(), 128),
    ("resnet18 224 px, random init", EmbedderConfig(backbone="resnet18", weights=None), 224),
    ("tiny_cnn 64 px (tests)", EmbedderConfig(backbone="tiny_cnn", weights=None, embedding_dim=32, hidden_dim=64), 64),
]


def measure(cfg: EmbedderConfig, size: int, batch: int, steps: int, device: torch.device) -> float:
    """Images per second of forward + in-batch loss + backward + AdamW step, after one warm-up step."""
    torch.manual_seed(0)
    model = build_embedder(cfg).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch, device=device) % 2
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss = in_batch_contrastive_loss(model(x), labels)
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
