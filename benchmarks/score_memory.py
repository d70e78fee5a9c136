"""Peak memory and images/s of one ``Inspector.score`` call over a whole folder, streamed or in one batch.

``Inspector.score`` streams a call of more than ``SCORE_CHUNK`` images through ``score_paths`` (the pipelines'
evaluation and the MLflow model's ``predict`` score whole test folders in one call). ``--one-batch`` restores the
old behaviour, every image decoded into one array first, for the comparison; run each in its own process:

    .venv/bin/python benchmarks/score_memory.py BUNDLE FOLDER [--limit 800] [--one-batch]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import inspector.engine as engine
from inspector.engine import Inspector
from inspector.preprocess import IMAGE_SUFFIXES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("folder", type=Path, help="images anywhere below it are scored")
    p.add_argument("--limit", type=int, default=800)
    p.add_argument(
        "--one-batch", action="store_true", help="decode every image into one array first (before session 12)"
    )
    args = p.parse_args()
    paths = sorted(
        q for q in args.folder.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and "ground_truth" not in q.parts
    )[: args.limit]
    if args.one_batch:
        engine.SCORE_CHUNK = len(paths) + 1
    inspector = Inspector.from_bundle(args.bundle)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    t0 = time.perf_counter()
    results = inspector.score(paths)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(
        f"{'one batch' if args.one_batch else 'streamed'}: {len(results)} images, {len(results) / seconds:.1f} img/s, "
        f"peak RSS {peak} MB ({before} MB after loading the bundle), {inspector.embedder.streams} streams"
    )


if __name__ == "__main__":
    main()
