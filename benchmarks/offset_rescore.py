"""Re-score bundles a ``quality.py`` run left behind at every scoring offset, and re-run ``choose_offset`` on them.

Why: the offset is chosen after training and training does not depend on it, so the test AUROC of each offset,
and what the choice rule picks, can be measured on the run's own bundles in minutes instead of retraining for an
hour. Reads ``OUT/{untrained,trained}_bundle`` (product) and ``OUT/loto_<type>[_frozen]_bundle`` (leave one out).
``--banks random,coreset`` also rebuilds each bundle's golden bank from its training goods with each
``Recipe.bank_selection``, so a bank rule is compared on the same model.

    .venv/bin/python benchmarks/offset_rescore.py ../shared/data/magnetic_tile_defect/magnetic_tile runs/bench_quality \\
        --group-pattern 'num_(\\d+)' --group-gap 2000
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
from quality import without_type

from inspector.engine import Inspector
from inspector.metrics import roc_auc
from inspector.scoring import GoldenBank
from pipelines.datasets import group_by_number_gaps, scan_mvtec
from pipelines.ingest import SplitFractions, assign_splits, build_manifest
from pipelines.recipe import Recipe, choose_offset, reference_bank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path, help="the --out folder of a quality.py run")
    p.add_argument("--group-pattern", default=None)
    p.add_argument("--group-gap", type=int, default=0)
    p.add_argument("--offsets", default="0,0.5,1")
    p.add_argument(
        "--padding",
        action="store_true",
        help="score the letterbox padding too (the rule before "
        "ScoringConfig.content_only; needs --banks, which rebuilds each bank with its padding patches)",
    )
    p.add_argument("--only", default="", help="only the bundles whose name contains this (e.g. 'loto crack')")
    p.add_argument(
        "--banks",
        default="",
        help="comma-separated Recipe.bank_selection values to rebuild each bank with "
        "(default: the bundle's own bank only)",
    )
    args = p.parse_args()
    offsets = tuple(float(v) for v in args.offsets.split(","))
    recipe = Recipe()
    records = scan_mvtec(args.root)
    groups = (
        group_by_number_gaps([r.path for r in records], args.group_pattern, args.group_gap)
        if args.group_pattern
        else None
    )
    manifest = build_manifest(records, group_of=groups)
    split = assign_splits(manifest, SplitFractions.from_recipe(recipe))
    all_records = manifest.records()
    jobs = [
        (f"product {name}", args.out / f"{name}_bundle", split, split.test)
        for name in ("untrained", "trained")
        if (args.out / f"{name}_bundle").exists()
    ]
    for t in sorted({r.defect_type for r in all_records if not r.is_good}):
        held_split, held_test = without_type(split, all_records, t)
        jobs += [
            (f"loto {t} {kind}", args.out / f"loto_{t}{suffix}_bundle", held_split, held_test)
            for kind, suffix in (("frozen", "_frozen"), ("trained", ""))
            if (args.out / f"loto_{t}{suffix}_bundle").exists()
        ]
    print(
        f"{'bundle [bank]':<34}{'kept':>6}  test AUROC at "
        + " / ".join(f"{c:g}" for c in offsets)
        + "   at the chosen   bootstrap wins"
    )
    for name, bundle, sp, test in [j for j in jobs if args.only in j[0]]:
        inspector = Inspector.from_bundle(bundle)
        embed = inspector.embedder.embed_parts
        good, good_valid, _ = embed(sp.calibration_good)
        bad, bad_valid, _ = embed(sp.validation_defective)
        emb, emb_valid, _ = embed([r.path for r in test])
        labels = np.array([r.label for r in test])
        scoring = replace(recipe.scoring, content_only=not args.padding)
        banks = [] if args.padding else [("bundle", inspector.golden)]
        if args.banks:
            train, train_valid, _ = embed(sp.train_good)
            banks += [
                (
                    sel,
                    GoldenBank(
                        reference_bank(train, replace(recipe, bank_selection=sel, scoring=scoring), train_valid)
                    ),
                )
                for sel in args.banks.split(",")
            ]
        for bank_name, bank in banks:
            chosen, info = choose_offset(
                bank,
                good,
                bad,
                scoring,
                offsets,
                confidence=recipe.offset_confidence,
                seed=recipe.seed,
                good_groups=sp.group_ids(sp.calibration_good),
                defective_groups=sp.group_ids(sp.validation_defective),
                good_valid=good_valid,
                defective_valid=bad_valid,
            )
            t0 = time.process_time()
            worst, typical = bank.worst_and_typical(emb, scoring, emb_valid)
            cpu_ms = 1000 * (time.process_time() - t0) * 32 / max(len(emb), 1)
            aurocs = {c: roc_auc(labels, worst - c * typical) for c in offsets}
            wins = ", ".join(f"{c}: {w:.2f}" for c, w in info["offset_wins"].items())
            val = ", ".join(f"{c}: {a:.3f}" for c, a in info["offset_auroc"].items())
            label = f"{name} [{bank_name}]"
            print(
                f"{label:<34}{chosen.offset:>6g}  "
                + " / ".join(f"{aurocs[c]:.3f}" for c in offsets)
                + f"   {aurocs[chosen.offset]:.3f}   wins {wins}; validation {val}; search {cpu_ms:.0f} ms CPU / 32 parts",
                flush=True,
            )


if __name__ == "__main__":
    main()
