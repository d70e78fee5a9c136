"""`pipelines` command line: the ML engineer's entry point (demo, train, score with a registered model).

Exit codes: 0 ok, 2 bad input (missing folder, unknown setting, bad value); ``promote``: 0 promoted, 1 gate refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import default_env

if TYPE_CHECKING:
    from pipelines.settings import PipelineSettings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipelines", description="Train and package the part-inspection model.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate demo data, train, export a bundle, score the test split")
    demo.add_argument(
        "--workdir", type=Path, default=Path("runs/demo"), help="where data, checkpoints and the bundle go"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fast", action="store_true", help="2 training epochs instead of 6 (a quick smoke test)")

    train = sub.add_parser(
        "train", help="train on your images, log to MLflow, register a version with alias 'challenger'"
    )
    src = train.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data",
        type=Path,
        help="dataset root: MVTec layout (train/good, test/good, test/<defect>), VisA (Data/Images/Normal|Anomaly), "
        "or images labelled by masks beside them (KolektorSDD, DAGM)",
    )
    src.add_argument("--good", type=Path, help="folder of good images (with --defective for defect photos)")
    train.add_argument("--defective", type=Path, help="folder of defective images (sub-folders = defect types)")
    train.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        metavar="ROOT",
        help="another part type's dataset root the embedder also trains on (repeatable): an embedder for part types "
        "it never saw (new-part); the bundle stays --data's part type",
    )
    train.add_argument(
        "--config", type=Path, help="JSON or YAML file of recipe settings (nested or dotted keys; --set wins)"
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe setting, e.g. train.epochs=3",
    )
    add_allow_download(train)
    train.add_argument(
        "--nproc",
        type=int,
        help="train on N processes under torchrun (DDP: one GPU each, or CPU processes on gloo); "
        "the same as --set train.devices=N",
    )
    train.add_argument(
        "--work-dir", type=Path, help="where runs, bundles and the default MLflow store go (default: runs)"
    )
    train.add_argument("--experiment", help="MLflow experiment (one per product line)")
    train.add_argument("--model-name", help="registered model name")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite under the work dir)")
    train.add_argument(
        "--group-pattern", help="regex with one numeric group; images within --group-gap form one capture group"
    )
    train.add_argument("--group-gap", type=int, help="see --group-pattern")
    train.add_argument(
        "--group-by-folder",
        dest="group_by_folder",
        action="store_true",
        default=None,
        help="the images of one folder are one capture group (goods kept in date, shift or camera folders)",
    )
    train.add_argument(
        "--no-baseline", dest="baseline", action="store_false", default=None, help="skip the frozen-baseline evaluation"
    )

    score = sub.add_parser(
        "score", help="score a folder with a registered model, e.g. models:/parts-inspector@challenger"
    )
    score.add_argument("paths", nargs="+")
    score.add_argument("--model", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    score.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite under runs/)")
    score.add_argument("--json", action="store_true")

    batch = sub.add_parser(
        "score-batch",
        help="score folders, a manifest or list files of paths in shards on Dask or Ray workers (Parquet results)",
    )
    batch.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="image folders, a dataset manifest (.json), list files of paths "
        "(.txt: one path a line), image files or globs",
    )
    batch.add_argument(
        "--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, or a bundle folder"
    )
    batch.add_argument("--out", required=True, type=Path, help="results folder (run.json, shards/*.parquet, summary)")
    batch.add_argument("--engine", choices=["dask", "ray"], default="dask", help="where shards run (default dask)")
    batch.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes of the local cluster (default: the cores, at most 4)",
    )
    batch.add_argument("--dask-address", help="an existing Dask scheduler, tcp://host:8786 (default: a LocalCluster)")
    batch.add_argument("--ray-address", help="an existing Ray cluster, host:6379 or ray://host:10001 (default: local)")
    batch.add_argument("--shard-size", type=int, default=256, help="images per shard and Parquet file (default 256)")
    batch.add_argument("--heatmaps", type=Path, default=None, metavar="DIR", help="also write an overlay PNG per image")
    batch.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime threads per worker (default: the local cores shared out; "
        "on a cluster, each worker's INSPECTOR_THREADS or its cores)",
    )
    batch.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite under runs/)"
    )
    batch.add_argument(
        "--cache-dir", type=Path, help="verified registry bundles on each worker (default ~/.cache/inspector/registry)"
    )

    promote = sub.add_parser(
        "promote",
        help="gate 'challenger' against 'champion' on a frozen gate set; move 'champion' only if every rule passes",
    )
    promote.add_argument("--model-name", required=True, help="registered model name")
    gate = promote.add_mutually_exclusive_group(required=True)
    gate.add_argument(
        "--gate-data",
        type=Path,
        help="gate images: MVTec layout (its test/ images) or good/ + <defect>/ folders; frozen as a manifest",
    )
    gate.add_argument("--gate-manifest", type=Path, help="a gate manifest written before (pinned by its hash)")
    promote.add_argument(
        "--manifest-out", type=Path, help="where --gate-data's manifest goes (default: runs/gates/<hash>.json)"
    )
    promote.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite under runs/)"
    )
    promote.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="RULE=VALUE",
        help="gate rule, e.g. min_auroc=0.95",
    )
    promote.add_argument("--json", action="store_true", help="print the whole decision as JSON")
    promote.add_argument(
        "--signing-key",
        type=Path,
        help="Ed25519 private key (PEM): sign a challenger that passes, so lines with --require-signature run it",
    )

    review = sub.add_parser(
        "review-export",
        help="reviewed parts: false rejects -> golden references (a gated challenger), defects -> a manifest",
    )
    review.add_argument("--db", help="review database URL (default: INSPECTOR_RECORD_DB, else the line's SQLite file)")
    review.add_argument("--record-dir", type=Path, help="the line's recording folder (INSPECTOR_RECORD_DIR)")
    review.add_argument("--model-name", required=True, help="registered model whose champion gets the references")
    review.add_argument("--gate-manifest", type=Path, required=True, help="the frozen gate set the challenger faces")
    review.add_argument("--work-dir", type=Path, default=Path("runs/review"), help="exports and bundles go here")
    review.add_argument("--experiment", default="parts", help="MLflow experiment of the registration run")
    review.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite under --work-dir)"
    )
    review.add_argument("--base-manifest", type=Path, help="training manifest the exported defects are added to")
    review.add_argument(
        "--recalibrate-good", nargs="+", default=[], help="more good images to recalibrate on (beside recent passes)"
    )
    review.add_argument("--target-frr", type=float, default=0.01, help="false-reject target of the recalibration")
    review.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="RULE=VALUE", help="gate rule override"
    )
    review.add_argument("--json", action="store_true", help="print the outcome as JSON")

    rollback = sub.add_parser("rollback", help="move 'champion' back to the previous champion, or to --to VERSION")
    rollback.add_argument("--model-name", required=True)
    rollback.add_argument("--to", dest="to_version", help="version to make champion (default: the previous champion)")
    rollback.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite under runs/)"
    )

    part = sub.add_parser(
        "new-part",
        help="a bundle for a new part type from a few golden photos with an existing embedder, registered as its "
        "own model (one per part type)",
    )
    part.add_argument("embedder", help="a bundle folder or a registered version (models:/<name>@champion)")
    part.add_argument("goldens", nargs="+", help="golden photos of the new part type: files, folders or globs")
    part.add_argument("--name", required=True, help="the part type: its registered model's name")
    part.add_argument("--out", required=True, type=Path, help="where the new bundle goes (must not exist)")
    part.add_argument("--goods", nargs="+", help="extra good photos (not goldens) to set the threshold on")
    part.add_argument("--target-frr", type=float, default=0.01, help="target false-reject rate (default 0.01)")
    part.add_argument("--alias", default="challenger", help="alias moved onto the new version (default challenger)")
    part.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite under runs/)"
    )

    serve = sub.add_parser(
        "serve-deployments", help="serve the retraining and promotion deployments (cron schedules) from this host"
    )
    serve.add_argument(
        "--config", type=Path, help="JSON or YAML file of deployment parameters (see pipelines/deployments.py)"
    )
    serve.add_argument("--retrain-cron", help="cron of the retraining deployment (default: nightly 02:00)")
    serve.add_argument("--dry-run", action="store_true", help="print the deployments and exit without serving")
    return p


def add_allow_download(parser: argparse.ArgumentParser) -> None:
    """``--allow-download``: the one way a run may fetch a trunk's pretrained weights (``embedder.allow_download``)."""
    parser.add_argument(
        "--allow-download",
        dest="overrides",
        action="append_const",
        const="embedder.allow_download=true",
        help="fetch the trunk's pretrained weights when they are not on this machine (torch hub or Hugging Face "
        "cache); without it a missing file is an error naming the file and where to put it",
    )


def _settings(args: argparse.Namespace) -> PipelineSettings:
    from pipelines.settings import PipelineSettings

    given = {
        k: getattr(args, k)
        for k in (
            "work_dir",
            "experiment",
            "model_name",
            "tracking_uri",
            "group_pattern",
            "group_gap",
            "group_by_folder",
            "baseline",
        )
        if getattr(args, k, None) is not None
    }
    return PipelineSettings(**given)


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.evaluation import calibration_shortfall
    from pipelines.flows import DataSource, train_flow
    from pipelines.recipe import Recipe
    from pipelines.settings import apply_overrides, load_overrides

    overrides = load_overrides(args.config, args.overrides)
    if args.nproc is not None:
        overrides["train.devices"] = args.nproc
    recipe = apply_overrides(Recipe(), overrides)
    source = (
        DataSource(root=str(args.data))
        if args.data
        else DataSource(good=str(args.good), defective=str(args.defective) if args.defective else None)
    )
    settings = _settings(args)
    result = train_flow(source, recipe, settings, [DataSource(root=str(root)) for root in args.also] or None)
    print(
        json.dumps(
            {
                "run_id": result.run_id,
                "model_version": result.model_version,
                "bundle": str(result.bundle),
                "dataset_hash": result.dataset_hash,
                "metrics": result.metrics,
            },
            indent=2,
        )
    )
    print(summary_table(result.metrics))
    if note := calibration_shortfall(result.bundle):
        print(f"calibration: {note}")
    print(f"registered models:/{settings.model_name}/{result.model_version} (alias challenger)")
    return 0


def summary_table(metrics: dict[str, float]) -> str:
    """The test metrics of the trained model beside the frozen baseline's, one row each."""

    def cell(value: float | None, width: int) -> str:
        return "" if value is None else f"{'n/a':>{width}}" if math.isnan(value) else f"{value:>{width}.3f}"

    rows = [k[len("test_") :] for k in metrics if k.startswith("test_")]
    lines = [f"{'test metric':<28}{'trained':>10}{'frozen baseline':>17}"]
    for name in rows:
        lines.append(f"{name:<28}{cell(metrics['test_' + name], 10)}{cell(metrics.get(f'baseline_test_{name}'), 17)}")
    if math.isnan(metrics.get("test_image_auroc", 0.0)):
        lines.append(
            "n/a: the test set lacks good or defective parts (AUROC and escape need both; with goods only, "
            "the false-reject rate is the figure to watch)"
        )
    return "\n".join(lines)


def cmd_score(args: argparse.Namespace) -> int:
    import tempfile

    import mlflow

    from inspector.cli import main as inspector_main
    from pipelines.tracking import download_bundle, tracking_uri

    mlflow.set_tracking_uri(args.tracking_uri or tracking_uri(Path("runs").resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = download_bundle(args.model, Path(tmp) / "bundle")
        return inspector_main(["score", *args.paths, "--bundle", str(bundle), *(["--json"] if args.json else [])])


def cmd_score_batch(args: argparse.Namespace) -> int:
    from pipelines.batch.flow import BatchRequest, run_score_batch

    registry_uri = None
    if not Path(args.model).is_dir():
        import mlflow

        _set_tracking(args.tracking_uri)
        registry_uri = mlflow.get_registry_uri()
    request = BatchRequest(
        sources=list(args.sources),
        model=args.model,
        out=str(args.out),
        shard_size=args.shard_size,
        heatmaps=str(args.heatmaps) if args.heatmaps else None,
        threads=args.threads,
        registry_uri=registry_uri,
        cache_dir=str(args.cache_dir) if args.cache_dir else None,
    )
    result = run_score_batch(request, args.engine, args.workers, args.dask_address, args.ray_address)
    assert result.summary is not None
    print(
        json.dumps(
            {
                "out": result.out,
                "model_version": result.manifest.model_version,
                "shards": len(result.manifest.shards),
                "shards_scored_now": len(result.scored_now),
                "shards_done_before": result.skipped_shards,
                "summary": result.summary.to_dict(),
                "mlflow_run_id": result.mlflow_run_id,
            },
            indent=2,
        )
    )
    return 0


def _set_tracking(uri: str | None) -> None:
    import mlflow

    from pipelines.tracking import tracking_uri

    mlflow.set_tracking_uri(uri or tracking_uri(Path("runs").resolve()))


def cmd_promote(args: argparse.Namespace) -> int:
    import hashlib

    from pipelines.promotion import (
        GateRules,
        gate_set_from_folder,
        load_gate_set,
        promote_flow,
    )

    rules = GateRules.from_overrides(args.overrides)
    if args.gate_data is not None:
        out = (
            args.manifest_out
            or Path("runs/gates") / f"{hashlib.sha256(str(args.gate_data.resolve()).encode()).hexdigest()[:12]}.json"
        )
        gate = gate_set_from_folder(args.gate_data, out)
        print(f"gate set {gate.hash} ({len(gate.manifest.entries)} images) frozen in {gate.path}", file=sys.stderr)
    else:
        gate = load_gate_set(args.gate_manifest)
    _set_tracking(args.tracking_uri)
    key = str(args.signing_key.resolve()) if args.signing_key else None
    decision = promote_flow(args.model_name, str(gate.path.resolve()), rules, signing_key=key)
    if args.json:
        print(json.dumps(decision, indent=2, default=str))
    else:
        print(f"{'PROMOTED' if decision['moved'] else 'REFUSED'}: {decision['note']}")
        for reason in decision["reasons"]:
            print(f"  {reason}")
        if shortfall := decision["challenger"].get("calibration_shortfall"):
            print(f"  [warn] calibration: {shortfall}")
    return 0 if decision["moved"] else 1


def cmd_review_export(args: argparse.Namespace) -> int:
    from inspector.review.settings import RecordingSettings
    from pipelines.promotion import GateRules
    from pipelines.review import review_loop_flow

    recording = RecordingSettings.from_env(record_db=args.db, record_dir=args.record_dir)
    if not args.gate_manifest.is_file():
        raise FileNotFoundError(f"{args.gate_manifest}: gate manifest not found")
    rules = GateRules.from_overrides(args.overrides)
    outcome = review_loop_flow(
        recording.database_url(),
        str(recording.recording_dir()),
        args.model_name,
        str(args.gate_manifest.resolve()),
        work_dir=str(args.work_dir),
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        rules=rules.model_dump(exclude_none=True),
        base_manifest=str(args.base_manifest) if args.base_manifest else None,
        recalibrate_good=[str(p) for p in args.recalibrate_good],
        target_frr=args.target_frr,
    )
    if args.json:
        print(json.dumps(outcome, indent=2, default=str))
    else:
        e = outcome["export"]
        print(f"exported {e['false_rejects']} false reject(s), {e['defects']} defect(s); manifest: {e['manifest']}")
        if outcome["challenger"]:
            moved = outcome["decision"]["moved"]
            print(f"challenger v{outcome['challenger']}: {'PROMOTED' if moved else 'REFUSED'} by the gate")
        print(f"{outcome['seconds']} s from export to decision")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipelines.promotion import rollback

    _set_tracking(args.tracking_uri)
    result = rollback(args.model_name, args.to_version)
    moved = f"v{result.from_version} -> v{result.to_version}"
    print(f"champion of {result.model_name}: {moved} (recorded in run {result.run_id})")
    return 0


def cmd_new_part(args: argparse.Namespace) -> int:
    from inspector.cli import expand_paths
    from pipelines.new_part import register_new_part

    goldens, goods = expand_paths(args.goldens), expand_paths(args.goods or [])
    missing = goldens.missing + goods.missing
    if missing:
        raise FileNotFoundError(f"no such file, folder or matching glob: {', '.join(missing)}")
    _set_tracking(args.tracking_uri)
    version = register_new_part(
        args.embedder,
        goldens.found,
        args.out,
        args.name,
        goods=goods.found,
        target_false_reject_rate=args.target_frr,
        alias=args.alias,
    )
    tags = version.tags or {}
    print(
        json.dumps(
            {
                "part": args.name,
                "out": str(args.out),
                "model_uri": f"models:/{args.name}@{args.alias}",
                "version": version.version,
                "embedder": tags.get("embedder"),
                "threshold": tags.get("threshold"),
                "promise": tags.get("few_shot_promise"),
            },
            indent=2,
        )
    )
    return 0


def cmd_serve_deployments(args: argparse.Namespace) -> int:
    from pipelines.deployments import DeploymentSettings, serve_deployments

    settings = DeploymentSettings.load(args.config)
    if args.retrain_cron:
        settings = settings.model_copy(update={"retrain_cron": args.retrain_cron})
    serve_deployments(settings, dry_run=args.dry_run)
    return 0


def main(argv: list[str] | None = None) -> int:
    default_env()
    args = _parser().parse_args(argv)
    from inspector.errors import InspectorError
    from pipelines.promotion import GateError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from pipelines.demo import run_demo

        run_demo(args.workdir, seed=args.seed, fast=args.fast)
        return 0
    try:
        commands = {
            "train": cmd_train,
            "score": cmd_score,
            "score-batch": cmd_score_batch,
            "promote": cmd_promote,
            "rollback": cmd_rollback,
            "review-export": cmd_review_export,
            "serve-deployments": cmd_serve_deployments,
            "new-part": cmd_new_part,
        }
        return commands[args.command](args)
    except (FileNotFoundError, KeyError, ValueError, GateError, InspectorError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
