"""What adding a few goods of each later capture session to the golden bank buys, without retraining.

The line can take new golden parts at any time (``inspector references add``). When the camera's exposure, the
lighting or the batch of parts changes, the goods the line sees drift from the goods the bundle was built on; the
quality benchmark measures the product on exactly those later goods. This probe takes a bundle built on the
product split (``quality.py`` leaves ``trained_bundle`` / ``untrained_bundle`` in its ``--out``), adds the first
``k`` test goods of each capture session (the operator's "these are good" at the start of a block), and scores the
remaining test goods and every test defect with both the parent bundle and the topped-up one: same images, paired.

    .venv/bin/python benchmarks/topup_probe.py ../shared/data/magnetic_tile_defect/magnetic_tile \\
        --group-pattern 'num_(\\d+)' --group-gap 2000 --session-pattern '^(exp\\d+)_' \\
        --bundle trained=runs/bq/trained_bundle --bundle frozen=runs/bq/untrained_bundle --per-session 0,2,5,10

Sessions come from ``--session-pattern`` (a regex whose first group names the session, matched on the file name;
without it every test good is one session); order within a session from the number ``--group-pattern`` captures
(else the file name). The parent's threshold is kept (no re-calibration), so the false-reject rate shows what the
new references alone do to the goods of the same session.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from quality import product_split

from inspector.references import add_references
from pipelines.datasets import ImageRecord
from pipelines.recipe import Evaluation, Recipe, evaluate_bundle


def session_of(path: Path, pattern: str | None) -> str:
    """The capture session a file name belongs to (``""`` when the pattern does not match or is not given)."""
    m = re.search(pattern, path.name) if pattern else None
    return m.group(1) if m else ""


def capture_order(path: Path, pattern: str | None) -> tuple[int, str]:
    """Sort key: the frame number ``pattern`` captures, then the name."""
    m = re.search(pattern, path.name) if pattern else None
    return (int(m.group(1)) if m else 0, path.name)


def first_goods(
    goods: list[ImageRecord], k: int, session_pattern: str | None, order_pattern: str | None
) -> list[ImageRecord]:
    """The first ``k`` goods, in capture order, of every session."""
    by_session: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in goods:
        by_session[session_of(r.path, session_pattern)].append(r)
    return [
        r
        for s in sorted(by_session)
        for r in sorted(by_session[s], key=lambda r: capture_order(r.path, order_pattern))[:k]
    ]


def row(label: str, ev: Evaluation, types: list[str]) -> str:
    m, per = ev.metrics(), ev.per_type_auroc()
    cells = [
        f"{m['image_auroc']:.3f}",
        *(f"{per.get(t, float('nan')):.3f}" for t in types),
        f"{m['false_reject_rate']:.3f}",
        f"{m['escape_rate']:.3f}",
    ]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument(
        "--bundle", action="append", required=True, metavar="LABEL=PATH", help="a bundle built on this split"
    )
    p.add_argument("--group-pattern", default=None)
    p.add_argument("--group-gap", type=int, default=0)
    p.add_argument("--group-by-folder", action="store_true")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="the split the bundles were built on (quality.py --split-seed, default its --seed 0)",
    )
    p.add_argument("--session-pattern", default=None, help="regex, first group = the capture session, on the file name")
    p.add_argument("--per-session", default="0,2,5,10", help="comma-separated k: goods added from each session")
    args = p.parse_args()

    _, split, _ = product_split(
        args.root, Recipe(), args.group_pattern, args.group_gap, args.group_by_folder, args.split_seed
    )
    goods = [r for r in split.test if r.is_good]
    defects = [r for r in split.test if not r.is_good]
    types = sorted({r.defect_type for r in defects})
    sessions = sorted({session_of(r.path, args.session_pattern) for r in goods})
    print(f"{len(goods)} test goods in {len(sessions)} sessions, {len(defects)} test defects ({', '.join(types)})")
    print("\n| bundle, goods added | overall | " + " | ".join(types) + " | FRR | escape |")
    print("| --- " * (len(types) + 4) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.bundle:
            label, _, path = spec.partition("=")
            for k in (int(v) for v in args.per_session.split(",")):
                added = first_goods(goods, k, args.session_pattern, args.group_pattern)
                taken = {r.path for r in added}
                rest = [r for r in goods if r.path not in taken] + defects
                parent = evaluate_bundle(Path(path), rest)
                print(row(f"{label}, k = {k}: parent ({len(rest) - len(defects)} goods)", parent, types), flush=True)
                if k:
                    out = Path(tmp) / f"{label}_{k}"
                    add_references(path, [r.path for r in added], out)
                    print(
                        row(f"{label}, k = {k}: + {len(added)} references", evaluate_bundle(out, rest), types),
                        flush=True,
                    )


if __name__ == "__main__":
    main()
