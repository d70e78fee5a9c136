"""A cheaper whole-part view: what each choice of the trunk's stages costs in the forward pass and gives in quality.

The whole-part view pools each channel's mean and spread over the part at some of the trunk's stages
(``embedder.density_stages``, ending ``embedder.density_skip`` stages before the last). The later a stage, the more
the forward pass must run beyond what the patch view needs. For each choice this prints, in one run:

* the onnxruntime forward (batch 32, the recipe's input size, the line's session settings) in images/s, beside the
  patch view alone (no whole-part view: the floor) and the default;
* image AUROC of the whole-part view alone (the product's Gaussian of golden descriptors), on the later goods
  against every defect and against each defect type, over ``--draws`` draws: each holds out a random fifth of the
  goods' capture groups as the later goods and fits the view on the rest; the difference to the default is paired
  per draw. The patch view is the same for every choice, so this is where the choices differ; the fused score is
  measured through the product (``benchmarks.quality``) for the choice kept.

The embedder is the default recipe's before training, embedded once with every stage any choice needs; each choice
is the descriptor's columns of its stages (exactly what a model with that choice computes).

    .venv/bin/python -m benchmarks.whole_part_view ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import interleaved_rates, write_json
from benchmarks.thresholds import Images, dataset_of, frozen_embedded, groups_share, later_goods_arguments
from inspector.density import GaussianDensity
from inspector.engine import OnnxEmbedder
from inspector.metrics import roc_auc
from models.export import export_onnx
from models.siamese import EmbedderConfig, build_embedder, density_skip_of, density_stage_indices
from pipelines.recipe import Recipe

#: (density_stages, density_skip) of each choice measured where the trunk has the stages; the recipe's own first
CHOICES = ((4, 1), (3, 1), (1, 3), (2, 4))


def stage_columns(union: tuple[int, ...], blocks: tuple[int, ...], stages: tuple[int, ...]) -> np.ndarray:
    """The descriptor columns of ``stages`` in a descriptor built from ``union`` (one block of columns each)."""
    starts = np.cumsum((0, *blocks))
    return np.concatenate([np.arange(starts[union.index(s)], starts[union.index(s) + 1]) for s in stages])


def forward_rates(configs: dict[str, EmbedderConfig], recipe: Recipe, work: Path, rounds: int) -> dict[str, float]:
    """Images/s of each embedder's ONNX forward at batch 32, measured in turn (load from other jobs hits all)."""
    pre = recipe.preprocess
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((32, 3, pre.height, pre.width)).astype(np.float32)
    sizes = [(pre.width, pre.height)] * len(batch)
    runs: dict[str, Callable[[], object]] = {}
    for name, cfg in configs.items():
        path = work / f".whole_part_view.{len(runs)}.onnx"
        torch.manual_seed(recipe.seed)
        export_onnx(build_embedder(cfg).eval(), path, height=pre.height, width=pre.width)
        onnx = OnnxEmbedder(path, pre)
        runs[name] = partial(onnx.run, batch, sizes)
        path.unlink(missing_ok=True)
    return interleaved_rates(runs, dict.fromkeys(runs, len(batch)), rounds=rounds)


def pooled(k: int) -> str:
    return f", late stages pooled {k}x{k}" if k > 1 else ""


def label(stages: tuple[int, ...]) -> str:
    return "stages " + ",".join(map(str, stages)) if stages else "patch view only"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each forward pass")
    p.add_argument(
        "--pool",
        type=int,
        default=1,
        help="also each choice with its late stages on the map pooled k x k (density_pool)",
    )
    later_goods_arguments(p)
    args = p.parse_args(argv)
    manifest, split, recipe = dataset_of(args)
    base = recipe.embedder
    if base.density_downscales or not base.density_stages:
        raise SystemExit("needs the whole-part view at the input's own scale (density_stages > 0, no downscales)")
    n_stages = len(build_embedder(replace(base, density_stages=0), weights=None).backbone.stages)
    asked = ((base.density_stages, density_skip_of(base)), *((c, s) for c, s in CHOICES if s < n_stages))
    choices = {label(density_stage_indices(n_stages, c, s)): (c, s) for c, s in asked}  # same stages: measured once
    stages_of = {name: density_stage_indices(n_stages, c, s) for name, (c, s) in choices.items()}
    union = tuple(sorted({i for st in stages_of.values() for i in st}))
    work = args.out.parent if args.out else Path("runs")
    work.mkdir(parents=True, exist_ok=True)

    configs = {label(()): replace(base, density_stages=0)}
    pools = (base.density_pool, *((args.pool,) if args.pool != base.density_pool else ()))
    named = {f"{name}{pooled(k)}": (name, k) for k in pools for name in choices}
    configs.update(
        {
            label_k: replace(base, density_stages=choices[name][0], density_skip=choices[name][1], density_pool=k)
            for label_k, (name, k) in named.items()
        }
    )
    rates = forward_rates(configs, recipe, work, args.rounds)

    every = replace(base, density_stages=len(union), density_skip=n_stages - 1 - union[-1])
    embedded_by = {
        k: frozen_embedded(manifest, split, replace(recipe, embedder=replace(every, density_pool=k)), work)
        for k in pools
    }
    blocks = tuple(embedded_by[pools[0]][2].descriptor_blocks)
    per_draw: dict[str, list[dict[str, float]]] = {name: [] for name in named}
    for draw in range(args.draws):
        later = groups_share(embedded_by[pools[0]][0].groups, 0.2, np.random.default_rng([args.seed, draw]))
        for label_k, (name, k) in named.items():
            goods, defects, _ = embedded_by[k]
            per_draw[label_k].append(part_view_aurocs(goods, defects, later, union, blocks, stages_of[name]))
    default = next(iter(named))
    results: dict[str, Any] = {"recipe": recipe.to_dict(), "images_per_second": rates, "choices": {}}
    print(f"\nforward, batch 32 at {recipe.preprocess.height}x{recipe.preprocess.width}, images/s (x the default):")
    for name, rate in rates.items():
        print(f"  {name:24s} {rate:7.1f}  x{rate / rates[default]:.2f}")
    print(
        f"\nwhole-part view alone, image AUROC on later goods against every defect over {args.draws} draws, "
        "mean [min, max] (difference to the default, paired per draw: mean [min, max]):"
    )
    for name, rows in per_draw.items():
        summary: dict[str, Any] = {"stages": list(stages_of[named[name][0]]), "pool": named[name][1]}
        for key in rows[0]:
            values = np.array([r[key] for r in rows])
            diff = values - np.array([r[key] for r in per_draw[default]])
            summary[key] = {
                "mean": float(values.mean()),
                "min": float(values.min()),
                "max": float(values.max()),
                "diff_mean": float(diff.mean()),
                "diff_min": float(diff.min()),
                "diff_max": float(diff.max()),
            }
        results["choices"][name] = summary
        print(f"  {name:24s}", flush=True)
        for key in rows[0]:
            f = summary[key]
            print(
                f"    {key:18s} {f['mean']:.3f} [{f['min']:.3f}, {f['max']:.3f}]  "
                f"({f['diff_mean']:+.3f} [{f['diff_min']:+.3f}, {f['diff_max']:+.3f}])"
            )
    write_json(args.out, results)
    return results


def part_view_aurocs(
    goods: Images,
    defects: Images,
    later: np.ndarray,
    union: tuple[int, ...],
    blocks: tuple[int, ...],
    stages: tuple[int, ...],
) -> dict[str, float]:
    """The whole-part view of ``stages`` alone (the product's Gaussian of the golden descriptors, :class:`
    GaussianDensity`, fitted on the goods outside ``later``): image AUROC of the later goods against every defect,
    and against each defect type."""
    cols = stage_columns(union, blocks, stages)
    assert goods.emb.descriptors is not None and defects.emb.descriptors is not None
    density = GaussianDensity(goods.emb.descriptors[~later][:, cols], [blocks[union.index(s)] for s in stages])
    good = density.distances(goods.emb.descriptors[later][:, cols])
    bad = density.distances(defects.emb.descriptors[:, cols])
    out = {"all defects": roc_auc(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])}
    for kind in sorted(set(defects.types.tolist())):
        mine = bad[defects.types == kind]
        out[str(kind)] = roc_auc(np.r_[np.zeros(len(good)), np.ones(len(mine))], np.r_[good, mine])
    return out


if __name__ == "__main__":
    main()
