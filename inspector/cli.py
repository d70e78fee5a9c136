"""`inspector` command line: what the quality engineer runs on the line PC.

Exit codes mean something to scripts: 0 ok, 1 anomalies found (with ``--fail-on-anomaly``), 2 bad input
(unreadable image, bad bundle, no files).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from inspector.bundle import load_bundle
from inspector.engine import Inspector, ScoreResult
from inspector.errors import InspectorError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
EXIT_OK, EXIT_ANOMALY, EXIT_BAD_INPUT = 0, 1, 2


def expand_paths(items: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (recursively, image suffixes only) and globs → image paths, plus the items that matched nothing."""
    found: list[Path] = []
    missing: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            (found.extend(matches) if matches else missing.append(item))
    return found, missing


def _print_table(results: list[ScoreResult]) -> None:
    width = max([len(r.source) for r in results] + [4])
    print(f"{'path':<{width}}  {'score':>8}  {'threshold':>9}  verdict")
    for r in results:
        if r.error:
            print(f"{r.source:<{width}}  {'-':>8}  {r.threshold:>9.4f}  ERROR {r.error}")
        else:
            print(f"{r.source:<{width}}  {r.score:>8.4f}  {r.threshold:>9.4f}  {'ANOMALOUS' if r.anomalous else 'good'}")


def cmd_score(args: argparse.Namespace) -> int:
    paths, missing = expand_paths(args.paths)
    for m in missing:
        print(f"error: {m}: no such file, folder or matching glob", file=sys.stderr)
    if not paths:
        print("error: no images to score", file=sys.stderr)
        return EXIT_BAD_INPUT
    inspector = Inspector.from_bundle(args.bundle, threads=args.threads)
    results = list(_progress(inspector.score_paths(paths), len(paths), not (args.json or args.csv)))
    rows = [r.to_dict() for r in results]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_table(results)
    errors = [r for r in results if r.error]
    for r in errors:
        print(f"error: {r.error}", file=sys.stderr)
    if errors or missing:
        return EXIT_BAD_INPUT
    if args.fail_on_anomaly and any(r.anomalous for r in results):
        return EXIT_ANOMALY
    return EXIT_OK


def _progress(results: Iterable[ScoreResult], total: int, enabled: bool) -> Iterable[ScoreResult]:
    if not enabled or total < 64 or not sys.stderr.isatty():
        return results
    try:
        from tqdm import tqdm
    except ImportError:
        return results
    return tqdm(results, total=total, desc="scoring", unit="img", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    Inspector(bundle)  # the model must load in onnxruntime and match the references
    info = {
        "bundle": str(bundle.path),
        "model": bundle.model_version,
        "references": int(bundle.references.shape[0]),
        "embedding_dim": int(bundle.references.shape[1]),
        "threshold": bundle.spec.threshold.to_dict(),
        "preprocessing": bundle.spec.preprocessing.to_dict(),
        "status": "ok",
    }
    print(json.dumps(info, indent=2))
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inspector", description="Score part images against golden references (onnxruntime).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score image files, folders or globs")
    s.add_argument("paths", nargs="+")
    s.add_argument("--bundle", required=True, type=Path)
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON list on stdout")
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout")
    s.add_argument("--fail-on-anomaly", action="store_true", help="exit 1 when any part is flagged")
    s.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    s.set_defaults(func=cmd_score)
    c = sub.add_parser("check", help="verify a bundle (hashes, schema, model loads)")
    c.add_argument("bundle", type=Path)
    c.set_defaults(func=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InspectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
