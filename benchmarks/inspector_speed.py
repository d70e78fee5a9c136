"""Line-side speed in one run, same model and images: torch eager against the inspector (onnxruntime), each stage
of scoring, end to end against the forward pass alone, single-image latency and the HTTP service.

Model: the default line embedder (Lite0 patch embedder with the whole-part view, ImageNet weights, untrained head:
speed does not depend on training), bundled by the product's own ``build_bundle`` from generated parts (48 golden,
16 calibration goods). For each model it prints:

* the ORT forward against torch eager, batch 32 and batch 1 (``--skip-eager`` leaves it out);
* the time of each stage for one batch of 32: decode, resize, normalise, forward, the golden-bank search (and the
  brute-force search beside it), the whole-part Gaussian;
* end to end (decode + preprocessing + ORT + scoring) against the ORT forward alone, per image at batch 32: one
  ``Inspector.score`` call of 32 images, and ``score_paths`` streaming ``--images`` in chunks of 32, with batches
  side by side, one core each (the default on a multi-core CPU), and one batch at a time (``streams=1``: the path
  of a GPU or a single core). The forward alone is the fastest of one batch on all cores, ORT's own spinning
  threads, and batches side by side; all are measured in turn, so load from other jobs hits all alike;
* p50/p99 single-image latency through ``Inspector.score``;
* the HTTP service (``inspector serve`` in its own process) under 8 concurrent clients posting one image each,
  with queued requests combined (the default) and each request scored alone (``--combine-images 1``).

``--patch-only``, ``--multi-scale``, ``--head-only`` and ``--global`` add the models of other product settings
(what the default costs over each). ``--set`` changes the recipe as ``pipelines train --set`` does.

``--backbones A,B`` measures trunks instead, beside the recipe's own (Lite0 by default, ImageNet weights): each as
the recipe reads it (``pipelines.recipe.trunk_overrides``) on a generated weights file of its shapes, bundled the
same way, and its INT8 candidate as the training flow builds it (``pipelines.line_model``: quantised on the golden
goods, bank and threshold on its own scores); for FP32 and INT8, the ORT forward and the golden-bank search of a
batch of 32, and end to end (``score_paths``, batches side by side), with the bank's size, then each one's stages
(as above). ``--also-set KEY=VALUE`` adds the recipe's trunk with other settings (the line model before a change of
default: ``--backbones tf_efficientnet_lite0 --also-set embedder.density_skip=0``). The values of the weights do
not change the forward's cost; the pruned search may prune differently with real features.

    .venv/bin/python -m benchmarks.inspector_speed [--images 128] [--requests 64] [--mono] [--skip-eager]
    .venv/bin/python -m benchmarks.inspector_speed --backbones wide_resnet50_2,vit_small_patch14_dinov2 --images 64
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from benchmarks.common import best_seconds, generated_weights, interleaved_rates, write_json
from benchmarks.train_throughput import backbone_names
from inspector.engine import PLACEMENT_INPUT, Inspector, make_session
from inspector.preprocess import full_placement
from inspector.scoring import GoldenBank
from models.demo_data import render_good_part
from models.export import describes_parts
from models.siamese import Embedder, EmbedderConfig, PatchEmbedder, build_embedder
from pipelines.bundle_building import build_bundle
from pipelines.cli import add_allow_download
from pipelines.data.split import DataSplit
from pipelines.line_model import int8_candidate
from pipelines.recipe import Recipe
from pipelines.settings import apply_overrides, load_overrides

BATCH = 32


def generated_parts(folder: Path, n: int, size: int, seed: int, mono: bool = False) -> list[Path]:
    """``n`` generated parts as JPEGs, colour or (``mono``) one-channel like a mono line camera's."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.fromarray(render_good_part(np.random.default_rng([seed, i]), size, size))
        path = folder / f"part_{i:03d}.jpg"
        (img.convert("L") if mono else img).save(path, quality=92)
        paths.append(path)
    return paths


def stage_ms(inspector: Inspector, paths: list[Path], rounds: int) -> dict[str, float]:
    """Best-of-``rounds`` milliseconds of each stage of ``Inspector.score`` for one batch of these images."""
    emb, scorer = inspector.embedder, inspector.scorer
    pre = emb.preprocessor
    images = [pre.load(p, keep_gray=True) for p in paths]  # as the line decodes them
    sizes = [im.size for im in images]
    resized = np.stack([pre.resize(im) for im in images])
    batch = pre.normalize(resized)
    embeddings, descriptors = emb.run(batch, sizes)
    valid = emb.patch_valid(sizes, embeddings)
    brute = GoldenBank(inspector.bundle.references, cells=0)
    stages: dict[str, Callable[[], object]] = {
        "decode (1 thread)": lambda: [pre.load(p, keep_gray=True) for p in paths],
        "resize (1 thread)": lambda: [pre.resize(im) for im in images],
        "decode+resize (pool)": lambda: emb.prepare(paths),
        "normalise": lambda: pre.normalize(resized),
        "ORT forward": lambda: emb.run(batch, sizes),
        "ORT forward (1 thread, as batches side by side)": lambda: emb.run(batch, sizes, serial=True),
        "golden-bank search (pruned, the line's)": lambda: scorer.bank.anomaly_scores(
            embeddings, scorer.scoring, valid
        ),
        "golden-bank search (brute force)": lambda: brute.anomaly_scores(embeddings, scorer.scoring, valid),
    }
    if images[0].mode == "L":  # a mono camera: kept one channel until after the resize, against RGB at decode
        stages["decode+resize via RGB (1 thread)"] = lambda: [pre.resize(pre.load(p)) for p in paths]
    if scorer.part_model is not None:
        stages["whole-part Gaussian"] = lambda: scorer.part_distances(descriptors)
    rates = interleaved_rates(stages, dict.fromkeys(stages, 1), rounds)
    return {name: 1000.0 / r for name, r in rates.items()}


def side_by_side_forward(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], streams: int, pool: ThreadPoolExecutor
) -> None:
    """The ORT forward alone as the line runs it on a multi-core CPU: ``streams`` batches side by side on a session
    of one intra-op thread each."""
    for future in [pool.submit(session.run, None, feed) for _ in range(streams)]:
        future.result()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_rate(
    bundle: Path, paths: list[Path], requests: int, repeats: int, clients: int = 8, extra: Sequence[str] = ()
) -> tuple[float, int]:
    """Images/s of ``requests`` single-image POSTs from ``clients`` threads against ``inspector serve`` on loopback
    (best of ``repeats`` rounds after a warm-up) and the failed requests over all rounds.

    The server is its own process, as on the line, so it shares neither the GIL nor numpy's thread settings with
    the client threads."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "inspector.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "error", *extra]
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"inspector serve exited with {server.returncode}")
            time.sleep(0.1)
        blobs = [(p.name, p.read_bytes()) for p in paths]
        local = threading.local()

        def one(i: int) -> bool:
            """One camera client: a kept-alive connection per thread, one image per request."""
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=60)
            name, data = blobs[i % len(blobs)]
            return bool(local.client.post(f"{url}/v1/score", files={"files": (name, data, "image/jpeg")}).is_success)

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(4 * clients)))  # warm-up: connections, ORT arenas for batch 1
            elapsed, errors = float("inf"), 0
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                results = list(pool.map(one, range(requests)))
                elapsed = min(elapsed, time.perf_counter() - t0)
                errors += sum(not ok for ok in results)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return requests / elapsed, errors


def split_of(parts: dict[str, list[Path]]) -> DataSplit:
    """The generated goods as a split: golden and calibration goods, nothing else."""
    return DataSplit(
        train_good=parts["golden"],
        train_defective=[],
        calibration_good=parts["calibration"],
        validation_defective=[],
        test=[],
    )


def bundle_of(model: Embedder | PatchEmbedder, recipe: Recipe, parts: dict[str, list[Path]], out: Path) -> Path:
    """The product's bundle of ``model`` on generated goods: golden bank, whole-part view, calibrated threshold."""
    return build_bundle(model, split_of(parts), recipe, out, model_name=out.name)


def measure(
    label: str, cfg: EmbedderConfig, recipe: Recipe, bundle_dir: Path, parts: dict[str, list[Path]], args: Any
) -> dict[str, Any]:
    """Every figure of one model; printed as it goes, returned for ``--json``."""
    size = recipe.preprocess.height
    paths = parts["scored"]
    torch.manual_seed(0)
    model = build_embedder(cfg).eval()
    bundle = bundle_of(model, replace(recipe, embedder=cfg), parts, bundle_dir)
    inspector = Inspector.from_bundle(bundle)
    emb = inspector.embedder
    figures: dict[str, Any] = {"bank": list(inspector.bundle.references.shape)}
    print(
        f"\n== {label}: bank {inspector.bundle.references.shape[0]} x {inspector.bundle.references.shape[1]}, "
        f"input {size}px, {torch.get_num_threads()} threads, {emb.decode_workers} decode threads, "
        f"{inspector.scorer.bank.cells} bank cells"
    )
    first = paths[:BATCH]
    batch = emb.preprocessor.batch([emb.preprocessor.load(q) for q in first])
    full = full_placement(len(first), size, size)
    if not args.skip_eager:
        x = torch.from_numpy(batch)
        place = torch.from_numpy(full)
        with_parts = describes_parts(model) and isinstance(model, PatchEmbedder)

        def eager(xb: torch.Tensor) -> object:  # what the ONNX model computes
            if with_parts and isinstance(model, PatchEmbedder):
                return model.forward_parts(xb, place[: len(xb)])
            return model(xb)

        with torch.no_grad():
            eager32 = BATCH / best_seconds(lambda: eager(x), args.rounds)
            eager1 = 8 / best_seconds(lambda: [eager(x[i : i + 1]) for i in range(8)], args.rounds)
        ort32 = BATCH / best_seconds(lambda: emb.run(batch), args.rounds)
        ort1 = 8 / best_seconds(lambda: [emb.run(batch[i : i + 1]) for i in range(8)], args.rounds)
        print(f"torch eager   batch 32 {eager32:7.1f} img/s   batch 1 {eager1:7.1f} img/s")
        print(
            f"inspector ORT batch 32 {ort32:7.1f} img/s   batch 1 {ort1:7.1f} img/s   "
            f"ORT vs eager x{ort32 / eager32:.2f} (batch 32), x{ort1 / eager1:.2f} (batch 1)"
        )
        figures["eager"] = {"eager_32": eager32, "eager_1": eager1, "ort_32": ort32, "ort_1": ort1}
    stages = stage_ms(inspector, first, args.rounds)
    print("one batch of 32, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    figures["stage_ms"] = stages
    n_stream = len(paths) // BATCH * BATCH
    spinning = make_session(inspector.bundle.model_path, spinning=True)
    feed = {spinning.get_inputs()[0].name: batch, **({PLACEMENT_INPUT: full} if emb.describes_parts else {})}
    streams, serial = emb.streams, emb.serial_session()
    one_at_a_time = Inspector.from_bundle(bundle, streams=1)
    with ThreadPoolExecutor(streams) as pool:
        rates = interleaved_rates(
            {
                "ort": lambda: emb.run(batch),
                "ort_spinning": lambda: spinning.run(None, feed),
                "ort_side_by_side": lambda: side_by_side_forward(serial, feed, streams, pool),
                "score": lambda: inspector.score(first),
                "stream": lambda: list(inspector.score_paths(paths[:n_stream], chunk=BATCH)),
                "stream_one_at_a_time": lambda: list(one_at_a_time.score_paths(paths[:n_stream], chunk=BATCH)),
            },
            {
                "ort": BATCH,
                "ort_spinning": BATCH,
                "ort_side_by_side": BATCH * streams,
                "score": BATCH,
                "stream": n_stream,
                "stream_one_at_a_time": n_stream,
            },
            args.rounds,
        )
    forward = max(rates["ort"], rates["ort_spinning"], rates["ort_side_by_side"])
    print(
        f"ORT forward alone, batch 32: {rates['ort']:.1f} img/s (the line's session), {rates['ort_spinning']:.1f} "
        f"(ORT's spinning threads), {rates['ort_side_by_side']:.1f} ({streams} batches side by side, one thread "
        "each); the ratios below use the fastest"
    )
    print(
        f"end to end, Inspector.score of 32 images: {rates['score']:.1f} img/s = "
        f"forward x{forward / rates['score']:.2f}"
    )
    print(
        f"end to end, score_paths of {n_stream} images: {rates['stream']:.1f} img/s = forward "
        f"x{forward / rates['stream']:.2f} ({streams} batches side by side); one batch at a time (streams=1) "
        f"{rates['stream_one_at_a_time']:.1f} img/s = x{forward / rates['stream_one_at_a_time']:.2f}"
    )
    figures["images_per_second"] = rates
    figures["end_to_end_vs_forward"] = {k: forward / rates[k] for k in ("score", "stream", "stream_one_at_a_time")}
    latency = []
    for q in first:
        t0 = time.perf_counter()
        inspector.score([q])
        latency.append((time.perf_counter() - t0) * 1000)
    p50, p99 = (float(v) for v in np.percentile(latency, [50, 99]))
    print(f"single-image latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    figures["latency_ms"] = {"p50": p50, "p99": p99}
    if cfg.mode == "patch" and not args.skip_service:
        single = 16 / best_seconds(lambda: [inspector.score([q]) for q in paths[:16]], args.rounds)
        alone: list[float] = []
        combined: list[float] = []
        errors = 0
        for _ in range(2 if args.rounds > 1 else 1):  # interleaved: the machine's load drifts between measures
            for out, extra in ((alone, ["--combine-images", "1"]), (combined, [])):
                rate, failed = service_rate(bundle, paths, args.requests, args.rounds, extra=extra)
                out.append(rate)
                errors += failed
        print(
            f"HTTP service, 8 clients, {args.requests} single-image requests: {max(combined):.1f} img/s, {errors} "
            f"errors; in-process single images {single:.1f} img/s (ratio x{max(combined) / single:.2f}); each "
            f"request alone {max(alone):.1f} img/s (combining queued requests x{max(combined) / max(alone):.2f})"
        )
        figures["service"] = {
            "combined": max(combined),
            "alone": max(alone),
            "in_process": single,
            "errors": errors,
        }
    return figures


def line_measures(bundle: Path, paths: list[Path]) -> dict[str, tuple[Callable[[], object], int]]:
    """What is timed of one bundle on the line, with the images each call handles: the ORT forward and the
    golden-bank search of one batch of 32, and end to end (``score_paths`` over ``paths``, batches side by side)."""
    inspector = Inspector.from_bundle(bundle)
    emb = inspector.embedder
    first = paths[:BATCH]
    images = [emb.preprocessor.load(q) for q in first]
    sizes = [im.size for im in images]
    batch = emb.preprocessor.batch(images)
    embeddings, _ = emb.run(batch, sizes)
    valid = emb.patch_valid(sizes, embeddings)
    scorer = inspector.scorer
    return {
        "forward": (lambda: emb.run(batch, sizes), BATCH),
        "search": (lambda: scorer.bank.anomaly_scores(embeddings, scorer.scoring, valid), BATCH),
        "end_to_end": (lambda: list(inspector.score_paths(paths, chunk=BATCH)), len(paths)),
    }


def trunk_bundles(name: str, recipe: Recipe, parts: dict[str, list[Path]], work: Path) -> dict[str, Any]:
    """One trunk's FP32 bundle and its INT8 candidate (see the module doc), and its bank's size."""
    torch.manual_seed(0)
    model = build_embedder(recipe.embedder).eval()
    work.mkdir(parents=True, exist_ok=True)
    fp32 = bundle_of(model, recipe, parts, work / f"{name}_fp32")
    bank = Inspector.from_bundle(fp32).bundle.references
    return {
        "fp32": fp32,
        "int8": int8_candidate(fp32, split_of(parts), recipe, work / f"{name}_int8"),
        "bank": list(bank.shape),
        "bank_mb": bank.nbytes / 2**20,
    }


def compare_trunks(
    names: list[str],
    recipe: Recipe,
    parts: dict[str, list[Path]],
    work: Path,
    rounds: int,
    also: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The recipe's own trunk (its own weights, measured once even when named), the recipe with the ``also``
    settings, and each other named trunk, as the recipe reads it on a generated weights file, each in FP32 and
    INT8; every rate of every row measured in turn in the same rounds, so load from other jobs falls on all alike;
    printed as a table with each row's end-to-end ratio to the recipe's FP32."""
    base_name = recipe.embedder.backbone
    built: dict[str, dict[str, Any]] = {
        f"{base_name} (recipe)": trunk_bundles(base_name, recipe, parts, work / "recipe")
    }
    if also:
        label = ", ".join(f"{k}={v}" for k, v in also.items())
        built[label] = trunk_bundles(base_name, apply_overrides(recipe, also), parts, work / "also")
    for name in (n for n in names if n != base_name):
        trunk = apply_overrides(
            recipe, {"embedder.backbone": name, "embedder.weights": str(generated_weights(name, work / "weights"))}
        )
        built[name] = trunk_bundles(name, trunk, parts, work)
    paths = parts["scored"][: len(parts["scored"]) // BATCH * BATCH]
    measures = {
        (row, precision, what): timed
        for row, b in built.items()
        for precision in ("fp32", "int8")
        for what, timed in line_measures(b[precision], paths).items()
    }
    rates = interleaved_rates(
        {"|".join(k): fn for k, (fn, _) in measures.items()}, {"|".join(k): n for k, (_, n) in measures.items()}, rounds
    )
    rows: dict[str, Any] = {
        row: {
            "bank": b["bank"],
            "bank_mb": b["bank_mb"],
            **{p: {w: rates[f"{row}|{p}|{w}"] for w in ("forward", "search", "end_to_end")} for p in ("fp32", "int8")},
            "stage_ms": {p: stage_ms(Inspector.from_bundle(b[p]), paths[:BATCH], rounds) for p in ("fp32", "int8")},
        }
        for row, b in built.items()
    }
    base = next(iter(rows.values()))
    print(
        f"\n{'trunk':<26}{'bank (rows x dim, MB)':>24}  "
        + "  ".join(f"{p} forward / search / end to end img/s (x base)" for p in ("FP32", "INT8"))
    )
    for name, row in rows.items():
        cells = [
            f"{row[p]['forward']:6.1f} / {row[p]['search']:7.1f} / {row[p]['end_to_end']:6.1f} "
            f"(x{row[p]['end_to_end'] / base['fp32']['end_to_end']:.2f})"
            for p in ("fp32", "int8")
        ]
        bank = f"{row['bank'][0]} x {row['bank'][1]}, {row['bank_mb']:.0f}"
        print(f"{name:<34}{bank:>24}  " + "  ".join(f"{c:<44}" for c in cells))
    for name, row in rows.items():
        for p in ("fp32", "int8"):
            stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stage_ms"][p].items())
            print(f"{name}, {p.upper()}: one batch of 32, ms: {stages}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128, help="images streamed through score_paths (a multiple of 32)")
    p.add_argument("--requests", type=int, default=64, help="single-image requests per round against the service")
    p.add_argument("--size", type=int, default=224, help="square input size")
    p.add_argument("--rounds", type=int, default=5, help="best of this many interleaved repeats per measure")
    p.add_argument("--mono", action="store_true", help="score one-channel JPEGs (a mono line camera)")
    p.add_argument("--skip-eager", action="store_true", help="leave out the torch eager comparison")
    p.add_argument("--skip-service", action="store_true", help="leave out the HTTP service")
    p.add_argument(
        "--patch-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the patch view alone (embedder.density_stages=0): what the whole-part view costs",
    )
    p.add_argument(
        "--multi-scale",
        action="store_true",
        help="also the whole part seen again at half size (embedder.density_downscales=2)",
    )
    p.add_argument(
        "--head-only", action="store_true", help="also the trained head without the pretrained features beside it"
    )
    p.add_argument("--global", dest="global_mode", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="recipe setting")
    add_allow_download(p)
    p.add_argument("--backbones", default="", help="comma-separated trunks: FP32 and INT8 line speed of each instead")
    p.add_argument(
        "--also-set",
        dest="also",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --backbones: also the recipe's trunk with these settings (e.g. a previous default)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    trunks = backbone_names(args.backbones, p)
    torch.set_num_threads(os.cpu_count() or 2)
    recipe = apply_overrides(Recipe(input_pixels=None), load_overrides(None, args.overrides))
    recipe = replace(recipe, preprocess=replace(recipe.preprocess, height=args.size, width=args.size))
    base = recipe.embedder
    models = [("patch (default)", base)]
    models += [("patch view only (density_stages=0)", replace(base, density_stages=0))] if args.patch_only else []
    models += [("whole part also at half size", replace(base, density_downscales=(2,)))] if args.multi_scale else []
    models += (
        [("trained head alone (keep_pretrained=False)", replace(base, keep_pretrained=False))] if args.head_only else []
    )
    models += [("global", replace(base, mode="global"))] if args.global_mode else []
    figures: dict[str, Any] = {"size": args.size, "models": {}}
    with tempfile.TemporaryDirectory(prefix="inspector_speed_") as tmp:
        work = Path(tmp)
        parts = {
            "scored": generated_parts(work / "parts", max(args.images, BATCH), 256, seed=1, mono=args.mono),
            "golden": generated_parts(work / "golden", 48, 256, seed=2),
            "calibration": generated_parts(work / "calibration", 16, 256, seed=3),
        }
        if trunks:
            also = load_overrides(None, args.also, {}) if args.also else None
            figures["trunks"] = compare_trunks(trunks, recipe, parts, work, args.rounds, also)
        else:
            for index, (label, cfg) in enumerate(models):
                figures["models"][label] = measure(label, cfg, recipe, work / f"bundle_{index}", parts, args)
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
