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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from inspector.bundle import load_bundle
from inspector.calibration import PROMISES
from inspector.engine import Inspector, ScoreResult
from inspector.errors import InspectorError
from inspector.preprocess import IMAGE_SUFFIXES
from inspector.review.settings import RecordingSettings
from inspector.settings import RuntimeSettings

if TYPE_CHECKING:
    from inspector.service import ServiceSettings

EXIT_OK, EXIT_ANOMALY, EXIT_BAD_INPUT = 0, 1, 2
T = TypeVar("T")


@dataclass(frozen=True)
class PathScan:
    """What the paths given on the command line came to: images, items that matched nothing, and the files in the
    folders given that were left out, each with why (a folder scan says what it skipped, it never drops silently)."""

    found: list[Path]
    missing: list[str]
    skipped: list[tuple[Path, str]]

    def report_skipped(self) -> None:
        """One line on stderr naming what the folder scans left out, when they left anything out."""
        if self.skipped:
            names = ", ".join(str(p) for p, _ in self.skipped[:10]) + (" …" if len(self.skipped) > 10 else "")
            print(
                f"note: skipped {len(self.skipped)} file(s) in the folders given, not an image type: {names}",
                file=sys.stderr,
            )


def expand_paths(items: Iterable[str]) -> PathScan:
    """Files, folders (recursively, image suffixes only) and globs → image paths, plus the items that matched nothing
    and the files in folders that are not images by their suffix."""
    found: list[Path] = []
    missing: list[str] = []
    skipped: list[tuple[Path, str]] = []
    kinds = ", ".join(sorted(IMAGE_SUFFIXES))
    for item in items:
        p = Path(item)
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(f)
                else:
                    why = f"not an image type ({f.suffix or 'no suffix'}; folders are scanned for {kinds})"
                    skipped.append((f, why))
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            (found.extend(matches) if matches else missing.append(item))
    return PathScan(found, missing, skipped)


def _print_table(results: list[ScoreResult]) -> None:
    width = max([len(r.source) for r in results] + [4])
    print(f"{'path':<{width}}  {'score':>8}  {'threshold':>9}  verdict")
    for r in results:
        if r.error:
            print(f"{r.source:<{width}}  {'-':>8}  {r.threshold:>9.4f}  ERROR {r.error}")
        else:
            why = f" ({max(r.views, key=r.views.__getitem__)})" if r.anomalous and r.views else ""
            verdict = "ANOMALOUS" if r.anomalous else "good"
            print(f"{r.source:<{width}}  {r.score:>8.4f}  {r.threshold:>9.4f}  {verdict}{why}")


def cmd_score(args: argparse.Namespace) -> int:
    scan = expand_paths(args.paths)
    paths, missing = scan.found, scan.missing
    for m in missing:
        print(f"error: {m}: no such file, folder or matching glob", file=sys.stderr)
    if not paths:
        print("error: no images to score", file=sys.stderr)
        return EXIT_BAD_INPUT
    runtime = RecordingSettings.from_env(
        threads=args.threads,
        streams=args.streams,
        require_signature=args.require_signature or None,
        public_key=args.public_key,
        record=args.record or None,
    )
    inspector = Inspector(runtime.trusted_bundle(args.bundle), **runtime.engine_options())
    if args.heatmaps is not None:
        from inspector.heatmap import write_heatmaps

        pairs = list(
            _progress(write_heatmaps(inspector, paths, args.heatmaps), len(paths), not (args.json or args.csv))
        )
        results = [r for r, _ in pairs]
        rows = [{**r.to_dict(), "heatmap": str(h) if h else None} for r, h in pairs]
    else:
        results = list(_progress(inspector.score_paths(paths), len(paths), not (args.json or args.csv)))
        rows = [r.to_dict() for r in results]
    if runtime.record:
        _record(runtime, inspector, results)
    rows += [
        {"path": str(p), "score": None, "threshold": inspector.threshold, "verdict": None, "skipped": why}
        for p, why in scan.skipped
    ]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_table(results)
        for p, why in scan.skipped:
            print(f"{p}  SKIPPED {why}")
    scan.report_skipped()
    errors = [r for r in results if r.error]
    for r in errors:
        print(f"error: {r.error}", file=sys.stderr)
    if errors or missing:
        return EXIT_BAD_INPUT
    if args.fail_on_anomaly and any(r.anomalous for r in results):
        return EXIT_ANOMALY
    return EXIT_OK


def _record(settings: RecordingSettings, inspector: Inspector, results: list[ScoreResult]) -> None:
    """Keep the flagged files (and a sample of passed ones) by path for review; a failure is a warning only."""
    try:
        from inspector.review.context import open_review
        from inspector.review.hook import record_paths
    except ImportError as exc:
        print(f"warning: --record needs the 'serve' extra (sqlalchemy, alembic): {exc}", file=sys.stderr)
        return
    review = open_review(settings)
    assert review.recorder is not None
    review.start()
    record_paths(review.recorder, inspector, results)
    review.stop()
    if review.recorder.failed:
        print(f"warning: {review.recorder.failed} part(s) could not be kept for review (see the log)", file=sys.stderr)


def cmd_review(args: argparse.Namespace) -> int:
    """``inspector review``: the review page alone, over the database the line records into."""
    try:
        import uvicorn

        from inspector.review.pages import create_review_app
    except ImportError as exc:
        print(f"error: `inspector review` needs the 'serve' extra: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    settings = RecordingSettings.from_env(record_db=args.db, record_dir=args.record_dir, reviewer_token=args.token)
    app = create_review_app(settings)
    print(
        f"inspector: review page on http://{args.host}:{args.port}/review ({settings.database_url()})", file=sys.stderr
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", server_header=False)
    return EXIT_OK


def _progress(results: Iterable[T], total: int, enabled: bool) -> Iterable[T]:
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
        "whole_part_score": None
        if bundle.spec.density is None
        else {
            "references": int(len(bundle.descriptors)) if bundle.descriptors is not None else 0,
            **{k: v for k, v in bundle.spec.density.to_dict().items() if k != "ids"},
        },
        "status": "ok",
    }
    print(json.dumps(info, indent=2))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # the service stack is an optional extra; importing it here keeps `import inspector.cli` light
        from inspector.service import serve
    except ImportError as exc:
        print(
            f"error: `inspector serve` needs the 'serve' extra (pip install 'siamese-inspector[serve]'): {exc}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return serve(serve_settings(args))


def serve_settings(args: argparse.Namespace) -> ServiceSettings:
    """``inspector serve`` flags over ``INSPECTOR_*`` (and ``MLFLOW_TRACKING_URI``) env vars over defaults."""
    from inspector.service import ServiceSettings

    return ServiceSettings.from_env(
        bundle=args.bundle,
        model_uri=args.model_uri,
        host=args.host,
        port=args.port,
        token=args.token,
        max_bytes=args.max_bytes,
        max_images=args.max_images,
        threads=args.threads,
        log_level=args.log_level,
        tracking_uri=args.tracking_uri,
        poll_seconds=args.poll_seconds,
        cache_dir=args.cache_dir,
        registry_timeout=args.registry_timeout,
        require_signature=args.require_signature or None,
        public_key=args.public_key,
        combine_images=args.combine_images,
        parts=args.parts,
        bundles_dir=args.bundles_dir,
        record=args.record or None,
        record_dir=args.record_dir,
        record_db=args.record_db,
    )


def _reference_summary(before_path: Path, after_path: Path) -> dict:
    """JSON summary of a reference change: rows and threshold before/after, what was added, skipped or removed."""
    from inspector.references import reference_sources

    before, after = load_bundle(before_path), load_bundle(after_path)
    change = after.spec.provenance.get("reference_change", {})
    return {
        "bundle": str(before.path),
        "out": str(after.path),
        "model": after.model_version,
        "references": {
            "before": int(before.references.shape[0]),
            "after": int(after.references.shape[0]),
            "sources_before": len(reference_sources(before)),
            "sources_after": len(reference_sources(after)),
        },
        "added": [a["id"] for a in change.get("added", [])],
        "removed": change.get("removed", []),
        "skipped": change.get("skipped", []),
        "threshold": {"before": before.spec.threshold.to_dict(), "after": after.spec.threshold.to_dict()},
    }


def _expand_or_report(items: list[str], what: str) -> list[Path] | None:
    scan = expand_paths(items)
    for m in scan.missing:
        print(f"error: {m}: no such file, folder or matching glob ({what})", file=sys.stderr)
    scan.report_skipped()
    return None if scan.missing else scan.found


def cmd_add_references(args: argparse.Namespace) -> int:
    from inspector.references import add_references

    images = _expand_or_report(args.images, "images to add")
    good = _expand_or_report(args.recalibrate_good or [], "--recalibrate-good")
    bad = _expand_or_report(args.recalibrate_defective or [], "--recalibrate-defective")
    if images is None or good is None or bad is None:
        return EXIT_BAD_INPUT
    if not images:
        print("error: no images to add", file=sys.stderr)
        return EXIT_BAD_INPUT
    if (args.recalibrate_good and not good) or (args.recalibrate_defective and not bad):
        print("error: a re-calibration folder holds no images", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = add_references(
        args.bundle,
        images,
        args.out,
        recalibrate_good=good,
        recalibrate_defective=bad,
        target_false_reject_rate=args.target_frr,
        promise=args.promise,
        skip_bad=args.skip_bad,
        threads=RuntimeSettings.from_env(threads=args.threads).threads,
    )
    print(json.dumps(_reference_summary(args.bundle, out), indent=2))
    return EXIT_OK


def cmd_new_part(args: argparse.Namespace) -> int:
    from inspector.new_part import NEW_PART_KEY, new_part

    goldens = _expand_or_report(args.goldens, "golden photos")
    goods = _expand_or_report(args.goods or [], "--goods")
    if goldens is None or goods is None:
        return EXIT_BAD_INPUT
    if args.goods and not goods:
        print("error: --goods holds no images", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = new_part(
        args.bundle,
        goldens,
        args.out,
        goods=goods,
        name=args.name,
        target_false_reject_rate=args.target_frr,
        promise=args.promise,
        threads=RuntimeSettings.from_env(threads=args.threads).threads,
    )
    bundle = load_bundle(out)
    made = bundle.spec.provenance[NEW_PART_KEY]
    summary = {
        "out": str(bundle.path),
        "part": made["part"],
        "model": bundle.model_version,
        "embedder": made["embedder"],
        "goldens": made["goldens"],
        "input_size": made["input_size"],
        "whole_part_score": made["whole_part_score"],
        "threshold": bundle.spec.threshold.value,
        "threshold_rule": bundle.spec.threshold.rule,
        "promise": made["promise"],
    }
    print(json.dumps(summary, indent=2))
    print(f"{made['part']}: {made['promise']}", file=sys.stderr)
    return EXIT_OK


def cmd_remove_references(args: argparse.Namespace) -> int:
    from inspector.references import remove_references

    out = remove_references(args.bundle, args.ids, args.out)
    print(json.dumps(_reference_summary(args.bundle, out), indent=2))
    return EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    try:  # onnxruntime.quantization needs the `onnx` package; import it only for this command
        from inspector.quantize import quantize_bundle
    except ImportError as exc:
        print(f"error: `inspector quantize` needs onnxruntime.quantization and onnx: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    images = _expand_or_report(args.images, "calibration images")
    if images is None:
        return EXIT_BAD_INPUT
    if not images:
        print("error: no calibration images", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = quantize_bundle(
        args.bundle,
        images,
        args.out,
        per_channel=not args.per_tensor,
        max_images=args.max_images,
        activation_type=args.activations,
        threads=RuntimeSettings.from_env(threads=args.threads).threads,
    )
    new = load_bundle(out)
    report = new.spec.provenance["quantization"]
    summary = {
        "bundle": str(args.bundle),
        "out": str(new.path),
        "model": new.model_version,
        "threshold": new.spec.threshold.value,
        "calibration_images": report["calibration"]["images"],
        "skipped": report["calibration"]["skipped"],
        "settings": {
            k: report[k] for k in ("method", "format", "weights", "activations", "calibrate_method", "pre_processed")
        },
        "drift": report["drift"],
        "model_bytes": report["model_bytes"],
        "images_per_second": report["images_per_second"],
    }
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inspector", description="Score part images against golden references (onnxruntime)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score image files, folders or globs")
    s.add_argument("paths", nargs="+")
    s.add_argument("--bundle", required=True, type=Path)
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON list on stdout")
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout")
    s.add_argument("--fail-on-anomaly", action="store_true", help="exit 1 when any part is flagged")
    s.add_argument(
        "--heatmaps",
        type=Path,
        default=None,
        metavar="DIR",
        help="write an anomaly-heatmap overlay PNG per image into DIR (patch-mode bundles)",
    )
    s.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: INSPECTOR_THREADS, all cores)"
    )
    s.add_argument(
        "--streams",
        type=_positive_int,
        default=None,
        help="batches scored side by side, one core each (default: "
        "INSPECTOR_STREAMS, else --threads or the cores; 1: one batch at a time on all cores)",
    )
    s.add_argument(
        "--record",
        action="store_true",
        help="keep flagged parts (and a sample of passed ones) by path for review (INSPECTOR_RECORD_* settings)",
    )
    _signature_flags(s)
    s.set_defaults(func=cmd_score)
    w = sub.add_parser("review", help="the review page alone, over the line's review database")
    w.add_argument("--db", default=None, help="SQLAlchemy URL (default: INSPECTOR_RECORD_DB, else the SQLite file)")
    w.add_argument("--record-dir", type=Path, default=None, help="where kept images are (INSPECTOR_RECORD_DIR)")
    w.add_argument("--token", default=None, help="reviewer token (prefer INSPECTOR_REVIEWER_TOKEN)")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, default=8001)
    w.set_defaults(func=cmd_review)
    g = sub.add_parser("sign", help="sign a verified bundle with an Ed25519 private key (writes signature.json)")
    g.add_argument("bundle", type=Path)
    g.add_argument("--key", required=True, type=Path, help="Ed25519 private key, PEM (never logged or copied)")
    g.set_defaults(func=cmd_sign)
    c = sub.add_parser("check", help="verify a bundle (hashes, schema, model loads)")
    c.add_argument("bundle", type=Path)
    c.set_defaults(func=cmd_check)
    a = sub.add_parser("add-references", help="embed new good parts and write a new bundle with them in its bank")
    a.add_argument("bundle", type=Path)
    a.add_argument("images", nargs="+", help="image files, folders or globs")
    a.add_argument("--out", required=True, type=Path, help="the new bundle directory (must not exist)")
    a.add_argument(
        "--recalibrate-good",
        nargs="+",
        metavar="DIR_OR_FILES",
        help="good parts NOT in the bank: threshold = their (1 - target FRR) score quantile",
    )
    a.add_argument(
        "--recalibrate-defective",
        nargs="+",
        metavar="DIR_OR_FILES",
        help="defective parts: report recall at that threshold",
    )
    _threshold_flags(a)
    a.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable or already-present images instead of failing"
    )
    a.set_defaults(func=cmd_add_references)
    n = sub.add_parser(
        "new-part",
        help="a bundle for a new part type from a few golden photos, with BUNDLE's embedder (no retraining)",
    )
    n.add_argument("bundle", type=Path, help="a bundle whose embedder serves the new part type")
    n.add_argument("goldens", nargs="+", help="golden photos of the new part type: files, folders or globs")
    n.add_argument("--out", required=True, type=Path, help="the new bundle directory (must not exist)")
    n.add_argument(
        "--goods",
        nargs="+",
        metavar="DIR_OR_FILES",
        help="extra good photos (not goldens): the threshold is set on them instead of the goldens' leave-one-out",
    )
    n.add_argument("--name", default=None, help="the part type's name (default: the --out folder's name)")
    _threshold_flags(n)
    n.set_defaults(func=cmd_new_part)
    r = sub.add_parser("remove-references", help="write a new bundle without the given reference ids")
    r.add_argument("bundle", type=Path)
    r.add_argument("--ids", nargs="+", required=True, help="reference ids (file names as added; see the add summary)")
    r.add_argument("--out", required=True, type=Path, help="the new bundle directory (must not exist)")
    r.set_defaults(func=cmd_remove_references)
    q = sub.add_parser(
        "quantize",
        help="write a new bundle with a static INT8 model calibrated on part images (bank and threshold kept)",
    )
    q.add_argument("bundle", type=Path)
    q.add_argument(
        "images", nargs="+", help="calibration image files, folders or globs (good parts; at least 8 readable)"
    )
    q.add_argument("--out", required=True, type=Path, help="the new bundle directory (must not exist)")
    q.add_argument("--max-images", type=int, default=64, help="most calibration images to use (default 64)")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default: per channel)")
    q.add_argument(
        "--activations",
        choices=["uint8", "int8"],
        default="uint8",
        help="activation type (default uint8: fastest on x86 CPUs)",
    )
    q.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: INSPECTOR_THREADS, all cores)"
    )
    q.set_defaults(func=cmd_quantize)
    v = sub.add_parser("serve", help="HTTP scoring service (needs the 'serve' extra: fastapi, uvicorn)")
    v.add_argument("--bundle", type=Path, default=None, help="bundle directory (or INSPECTOR_BUNDLE)")
    v.add_argument(
        "--model-uri",
        default=None,
        help="registry model to serve and follow: models:/<name>@champion (or INSPECTOR_MODEL_URI)",
    )
    v.add_argument(
        "--part",
        dest="parts",
        action="append",
        default=None,
        metavar="[NAME=]SOURCE",
        help="serve several part types: repeat for each, a bundle folder or models:/<name>@champion, named NAME or "
        "after the folder or model (or INSPECTOR_PARTS, comma-separated); requests name theirs",
    )
    v.add_argument(
        "--bundles-dir", type=Path, default=None, help="a folder of bundles, each a part type named by its sub-folder"
    )
    v.add_argument("--tracking-uri", default=None, help="MLflow server, http(s)://host:port (or MLFLOW_TRACKING_URI)")
    v.add_argument(
        "--poll-seconds", type=float, default=None, help="re-resolve the alias every N seconds (default 30; 0: never)"
    )
    v.add_argument(
        "--cache-dir", type=Path, default=None, help="verified registry bundles (default ~/.cache/inspector/registry)"
    )
    v.add_argument("--registry-timeout", type=float, default=None, help="seconds per registry request (default 10)")
    v.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=None, help="port (default 8000)")
    v.add_argument("--token", default=None, help="bearer token for /v1/score and /v1/reload (prefer INSPECTOR_TOKEN)")
    v.add_argument("--max-bytes", type=int, default=None, help="largest request body in bytes (default 20 MiB)")
    v.add_argument("--max-images", type=int, default=None, help="most images per request (default 64)")
    v.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: INSPECTOR_THREADS, all cores)"
    )
    v.add_argument(
        "--combine-images",
        type=int,
        default=None,
        help="requests queued behind a running batch are scored "
        "together, up to this many images (default 32; 1: every request alone)",
    )
    v.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])
    v.add_argument(
        "--record",
        action="store_true",
        help="keep flagged parts and a sample of passed ones for review at /review (or INSPECTOR_RECORD=1)",
    )
    v.add_argument("--record-dir", type=Path, default=None, help="kept images and heatmaps (INSPECTOR_RECORD_DIR)")
    v.add_argument("--record-db", default=None, help="review database URL (INSPECTOR_RECORD_DB; default SQLite)")
    _signature_flags(v)
    v.set_defaults(func=cmd_serve)
    return p


def _threshold_flags(p: argparse.ArgumentParser) -> None:
    """The flags of commands that set a threshold on good parts' scores, and their onnxruntime threads."""
    p.add_argument(
        "--target-frr", type=float, default=0.01, help="target false-reject rate on good parts (default 0.01)"
    )
    p.add_argument(
        "--promise",
        choices=PROMISES,
        default="expected",
        help="what the target promises: 'expected' (a new good is flagged at most at the target on average), "
        "'bound' (its 95 %% upper bound is within it), 'point' (at most target x n re-calibration goods flagged)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: INSPECTOR_THREADS, all cores)"
    )


def _signature_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--require-signature",
        action="store_true",
        help="run only bundles signed by --public-key (or INSPECTOR_REQUIRE_SIGNATURE=1)",
    )
    p.add_argument("--public-key", type=Path, default=None, help="Ed25519 public key, PEM (or INSPECTOR_PUBLIC_KEY)")


def cmd_sign(args: argparse.Namespace) -> int:
    from inspector.signing import sign_bundle

    out = sign_bundle(args.bundle, args.key)
    key_id = json.loads(out.read_text())["key_sha256"]
    print(json.dumps({"bundle": str(args.bundle), "signature": str(out), "key_sha256": key_id}, indent=2))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InspectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
