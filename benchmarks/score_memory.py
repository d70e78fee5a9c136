"""Peak memory and images/s of one ``Inspector.score`` call over a whole folder, streamed or in one batch.

The pipelines' evaluation and the MLflow model's ``predict`` score whole test folders in one call;
``Inspector.score`` streams a call of more than ``SCORE_CHUNK`` images through ``score_paths``, so memory stays
bounded. ``--one-batch`` decodes every image into one array first and scores it in one forward pass, to show what
streaming saves. Peak RSS is per process, so run each way in its own process:

    .venv/bin/python -m benchmarks.score_memory BUNDLE FOLDER [--limit 800] [--one-batch]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_json
from inspector.engine import Inspector
from inspector.preprocess import IMAGE_SUFFIXES


def one_batch(inspector: Inspector, paths: list[Path]) -> int:
    """Every image decoded into one array, one forward pass, one search: the parts scored."""
    prepared = inspector.embedder.prepare(paths)
    embeddings, descriptors = inspector.embedder.run(prepared.batch, prepared.sizes)
    valid = inspector.embedder.patch_valid(prepared.sizes, embeddings)
    return len(inspector.scorer.score(embeddings, valid, descriptors))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("folder", type=Path, help="images anywhere below it are scored (masks under ground_truth/ not)")
    p.add_argument("--limit", type=int, default=800)
    p.add_argument("--one-batch", action="store_true", help="decode every image into one array first")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    paths = sorted(
        q for q in args.folder.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and "ground_truth" not in q.parts
    )[: args.limit]
    if not paths:
        p.error(f"no images under {args.folder}")
    inspector = Inspector.from_bundle(args.bundle)
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    t0 = time.perf_counter()
    scored = one_batch(inspector, paths) if args.one_batch else sum(r.error is None for r in inspector.score(paths))
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    how = "one batch" if args.one_batch else f"streamed, {inspector.embedder.streams} streams"
    print(
        f"{how}: {scored} of {len(paths)} images scored, {len(paths) / seconds:.1f} img/s, peak RSS {peak_mb} MB "
        f"({loaded_mb} MB after loading the bundle)"
    )
    figures = {
        "how": how,
        "images": len(paths),
        "scored": scored,
        "images_per_second": len(paths) / seconds,
        "peak_rss_mb": peak_mb,
        "loaded_rss_mb": loaded_mb,
    }
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
