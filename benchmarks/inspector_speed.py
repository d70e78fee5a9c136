"""Line-side speed in one run, same model and images: torch eager vs the inspector (onnxruntime), end to end, HTTP.

Model: the default line embedder (Lite0 patch embedder, 224 px, ImageNet weights, untrained head: speed does not
depend on training) with a golden bank built from generated parts. Prints images/s and the ratios the issue's
targets are stated in:
  * inspector ORT forward vs torch eager forward, batch 1 and 32;
  * end to end (JPEG decode + preprocessing + ORT + patch kNN scoring) vs the ORT forward alone, per image at batch
    32, same images, same run: one ``Inspector.score`` call of 32 images, and ``score_paths`` streaming all images
    in chunks of 32 (on a multi-core CPU, batches side by side, one core each, against one batch at a time through
    the three-stage pipeline); the ORT forward alone is the fastest of one batch on all cores and batches side by
    side; plus the time of each stage for one batch of 32 and the brute-force kNN the line used before;
  * p50/p99 single-image latency through ``Inspector.score``;
  * the HTTP service (``inspector serve`` in its own process) under 8 concurrent clients (bounded request loop on
    127.0.0.1) vs in-process single-image scoring.

    .venv/bin/python benchmarks/inspector_speed.py [--images 128] [--requests 64] [--skip-eager] [--skip-service]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
from PIL import Image

from inspector.bundle import BundleSpec, Threshold, write_bundle
from inspector.density import DensitySpec, ScoreScale
from inspector.engine import PLACEMENT_INPUT, Inspector, OnnxEmbedder, make_session
from inspector.preprocess import PreprocessConfig, Preprocessor, full_placement, load_image
from inspector.scoring import GoldenBank, ScoringConfig
from models.coreset import greedy_coreset
from models.demo_data import render_good_part
from models.export import export_onnx
from models.siamese import EmbedderConfig, build_embedder


def rate(fn, n_images: int, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Best-of-``repeats`` images per second of ``fn`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def interleaved_rates(
    fns: dict[str, Callable[[], object]], n_images: dict[str, int], rounds: int = 5
) -> dict[str, float]:
    """Best-of-``rounds`` images/s of several functions measured in turn, so load from other jobs hits all alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: n_images[name] / best[name] for name in fns}


def _with_blas_threads(n: int, fn: Callable[..., object], *args: object) -> object:
    """Run ``fn`` with numpy's BLAS on ``n`` threads (the line keeps it on one; the old brute force used two)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(n, user_api="blas"):
        return fn(*args)


def stage_times(inspector: Inspector, paths: list[Path], rounds: int = 5) -> dict[str, float]:
    """Best-of-``rounds`` milliseconds per batch of each stage of ``Inspector.score`` on these images."""
    emb = inspector.embedder
    pre = emb.preprocessor
    images = [load_image(p, keep_gray=True) for p in paths]  # as the line decodes them
    resized = np.stack([pre.resize(img) for img in images])
    batch = pre.normalize(resized)
    features, descriptors = emb.run(batch)
    brute = GoldenBank(inspector.bundle.references, cells=0)
    stages: dict[str, Callable[[], object]] = {
        "decode (1 thread)": lambda: [load_image(p, keep_gray=True) for p in paths],
        "resize (1 thread)": lambda: [pre.resize(img) for img in images],
        "decode+resize (pool)": lambda: emb.prepare(paths),
        "normalise": lambda: pre.normalize(resized),
        "ORT forward": lambda: emb.embed_arrays(batch),
        "kNN (pruned, line)": lambda: inspector.golden.anomaly_scores(features, inspector.bundle.spec.scoring),
        "kNN (brute force, before)": lambda: _with_blas_threads(
            2, brute.anomaly_scores, features, inspector.bundle.spec.scoring
        ),
    }
    if images[0].mode == "L":  # mono images: the one-channel route against converting to RGB first
        stages["decode+resize via RGB (1 thread, before)"] = lambda: [pre.resize(load_image(p)) for p in paths]
        stages["decode+resize one channel (1 thread)"] = lambda: [
            pre.resize(load_image(p, keep_gray=True)) for p in paths
        ]
    if inspector.density is not None and descriptors is not None:
        density = inspector.density
        stages["whole-part Gaussian"] = lambda: density.distances(descriptors)
    rates = interleaved_rates(stages, dict.fromkeys(stages, 1), rounds)
    return {name: 1000.0 / r for name, r in rates.items()}


def side_by_side_forward(session: object, feed: dict[str, np.ndarray], streams: int, pool: ThreadPoolExecutor) -> None:
    """The ORT forward alone as the line runs it on a multi-core CPU: ``streams`` batches side by side on a session
    of one intra-op thread each (Inspector.score_paths's default there)."""
    for f in [pool.submit(session.run, None, feed) for _ in range(streams)]:  # type: ignore[attr-defined]
        f.result()


def features_per_image(inspector: Inspector) -> int:
    """Patches per image of a patch bundle (1 for image mode), from the model's output shape."""
    shape = inspector.embedder.session.get_outputs()[0].shape
    return int(shape[1]) if len(shape) == 3 and isinstance(shape[1], int) else 1


def make_images(folder: Path, n: int, size: int, seed: int, mono: bool = False) -> list[Path]:
    """``n`` generated parts as JPEGs, colour or (``mono``) one-channel like a mono line camera's."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.fromarray(render_good_part(np.random.default_rng([seed, i]), size, size))
        p = folder / f"part_{i:03d}.jpg"
        (img.convert("L") if mono else img).save(p, quality=92)
        paths.append(p)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_rate(
    bundle: Path, paths: list[Path], requests: int, clients: int = 8, repeats: int = 3, extra: Sequence[str] = ()
) -> tuple[float, int]:
    """Images/s of ``requests`` single-image POSTs from ``clients`` threads against ``inspector serve`` on loopback
    (best of ``repeats`` rounds after a warm-up) and the number of failed requests over all rounds.

    The server is its own process (``inspector serve``), as on the line, so it shares neither the GIL nor
    numpy's thread settings with the client threads and the rest of this benchmark.
    """
    import subprocess
    import sys

    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from inspector.cli import main; sys.exit(main())",
        "serve",
        "--bundle",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        *extra,
    ]
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
            r = local.client.post(f"{url}/v1/score", files={"files": (name, data, "image/jpeg")})
            return r.status_code == 200

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(4 * clients)))  # warm-up: connections, ORT arenas for batch 1
            elapsed, errors = float("inf"), 0
            for _ in range(repeats):  # best of ``repeats``, like the in-process figure it is compared with
                t0 = time.perf_counter()
                results = list(pool.map(one, range(requests)))
                elapsed = min(elapsed, time.perf_counter() - t0)
                errors += sum(not ok for ok in results)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return requests / elapsed, errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128, help="images streamed through score_paths (multiple of 32)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="best of this many interleaved repeats per measure")
    p.add_argument(
        "--mono", action="store_true", help="score one-channel JPEGs (a mono line camera) instead of colour ones"
    )
    p.add_argument("--skip-eager", action="store_true", help="leave out the torch eager comparison")
    p.add_argument("--skip-service", action="store_true", help="leave out the HTTP service measure")
    p.add_argument(
        "--patch-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the patch embedder "
        "without the whole-part descriptor and score (what the default costs over it)",
    )
    p.add_argument(
        "--multi-scale",
        action="store_true",
        help="also measure the whole-part descriptor taken again from the "
        "input at half size (density_downscales=(2,)): what that option costs",
    )
    p.add_argument(
        "--head-only",
        action="store_true",
        help="also measure the patch embedder without the pretrained half (128-d patches)",
    )
    p.add_argument(
        "--global",
        dest="global_mode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the global embedder",
    )
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    work = Path(tempfile.mkdtemp(prefix="inspector_speed_"))
    paths = make_images(work / "parts", max(args.images, 32), 256, seed=1, mono=args.mono)
    refs = make_images(work / "refs", 48, 256, seed=2)
    pre_cfg = PreprocessConfig(height=args.size, width=args.size)
    pre = Preprocessor(pre_cfg)

    modes = [("patch (default)", EmbedderConfig())]
    modes += (
        [("patch, no whole-part score (density_stages=0)", EmbedderConfig(density_stages=0))] if args.patch_only else []
    )
    modes += (
        [("patch, whole part also at half size (density_downscales=(2,))", EmbedderConfig(density_downscales=(2,)))]
        if args.multi_scale
        else []
    )
    modes += (
        [("patch, head alone (keep_pretrained=False)", EmbedderConfig(keep_pretrained=False))] if args.head_only else []
    )
    modes += [("global", EmbedderConfig(mode="global"))] if args.global_mode else []
    for index, (label, cfg) in enumerate(modes):
        torch.manual_seed(0)
        model = build_embedder(cfg).eval()
        onnx_path = export_onnx(model, work / f"{cfg.mode}{index}.onnx", height=args.size, width=args.size)
        onnx = OnnxEmbedder(onnx_path, pre_cfg)
        embedded = onnx.embed_all(refs)
        bank = embedded.embeddings.reshape(-1, embedded.embeddings.shape[-1])
        bank = bank[greedy_coreset(bank, 16384)]
        density = None
        if embedded.descriptors is not None:  # scales from the references themselves: speed does not depend on them
            density = DensitySpec(tuple(model.descriptor_blocks), ScoreScale(0.0, 1.0), ScoreScale(0.0, 1.0))
        spec = BundleSpec(
            pre_cfg,
            ScoringConfig(),
            Threshold(1.0),
            model={"name": label, "mode": "patch" if cfg.mode == "patch" else "image"},
            density=density,
        )
        bundle = write_bundle(
            work / f"bundle_{cfg.mode}{index}",
            onnx_path,
            bank,
            spec,
            descriptors=embedded.descriptors if density else None,
        )
        inspector = Inspector.from_bundle(bundle)
        batch = pre.batch([load_image(q) for q in paths[:32]])
        full = torch.from_numpy(full_placement(32, args.size, args.size))
        print(
            f"\n== {label}: bank {len(bank)} x {bank.shape[1]}, input {args.size}px, {torch.get_num_threads()} threads, "
            f"{inspector.embedder.decode_workers} decode threads, {inspector.golden.cells} bank cells"
        )
        if not args.skip_eager:
            xb = torch.from_numpy(batch)
            forward = (
                (lambda x: model.forward_parts(x, full[: len(x)])) if density else model
            )  # what the ONNX model computes
            with torch.no_grad():
                eager32 = rate(lambda: forward(xb), 32)
                eager1 = rate(lambda: [forward(xb[i : i + 1]) for i in range(8)], 8)
            ort32 = rate(lambda: inspector.embedder.embed_arrays(batch), 32)
            ort1 = rate(lambda: [inspector.embedder.embed_arrays(batch[i : i + 1]) for i in range(8)], 8)
            print(f"torch eager   batch 32 {eager32:7.1f} img/s   batch 1 {eager1:7.1f} img/s")
            print(
                f"inspector ORT batch 32 {ort32:7.1f} img/s   batch 1 {ort1:7.1f} img/s   ratio vs eager: x{ort32 / eager32:.2f} (b32), x{ort1 / eager1:.2f} (b1)"
            )
        stages = stage_times(inspector, paths[:32], args.rounds)
        print("stage times, one batch of 32: " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
        n_stream = len(paths) // 32 * 32
        spinning = make_session(inspector.bundle.model_path, spinning=True)
        feed = {
            spinning.get_inputs()[0].name: batch,
            **({PLACEMENT_INPUT: full.numpy()} if inspector.embedder.describes_parts else {}),
        }
        streams = inspector.embedder.streams
        serial = inspector.embedder.serial_session()
        pipelined = Inspector.from_bundle(bundle, streams=1)  # one batch at a time on all cores, three-stage pipeline
        with ThreadPoolExecutor(streams) as side_pool:
            rates = interleaved_rates(
                {
                    "ort": lambda: inspector.embedder.embed_arrays(batch),
                    "ort_spin": lambda: spinning.run(None, feed),
                    "ort_side": lambda: side_by_side_forward(serial, feed, streams, side_pool),
                    "score": lambda: inspector.score(paths[:32]),
                    "stream": lambda: list(inspector.score_paths(paths[:n_stream], chunk=32)),
                    "stream_1": lambda: list(pipelined.score_paths(paths[:n_stream], chunk=32)),
                },
                {
                    "ort": 32,
                    "ort_spin": 32,
                    "ort_side": 32 * streams,
                    "score": 32,
                    "stream": n_stream,
                    "stream_1": n_stream,
                },
                args.rounds,
            )
        ort_best = max(rates["ort"], rates["ort_spin"], rates["ort_side"])
        print(
            f"ORT forward alone, batch 32: {rates['ort']:7.1f} img/s (line session, no spinning), {rates['ort_spin']:7.1f} img/s "
            f"(ORT's default spinning), {rates['ort_side']:7.1f} img/s ({streams} batches side by side, one thread each); "
            "ratios below use the fastest, measured in turn with them"
        )
        print(
            f"end to end, Inspector.score of 32 images:          {rates['score']:7.1f} img/s = ORT forward time x{ort_best / rates['score']:.2f}"
        )
        print(
            f"end to end, score_paths of {n_stream} images, chunks of 32: {rates['stream']:7.1f} img/s = ORT forward time x{ort_best / rates['stream']:.2f}"
            f"  (target <= x1.25; {streams} batches side by side)"
        )
        print(
            f"  the same, one batch at a time (streams=1: three-stage pipeline, the default before): {rates['stream_1']:7.1f} img/s = "
            f"x{ort_best / rates['stream_1']:.2f}; side by side / pipeline = x{rates['stream'] / rates['stream_1']:.2f}"
        )
        print(
            f"kNN: {inspector.golden.last_exact_searches} of {32 * features_per_image(inspector)} patches searched over the whole bank in the last batch"
        )
        lat = []
        for q in paths[:32]:
            t0 = time.perf_counter()
            inspector.score([q])
            lat.append((time.perf_counter() - t0) * 1000)
        print(f"single-image latency: p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
        if cfg.mode == "patch" and not args.skip_service:
            single = rate(lambda: [inspector.score([q]) for q in paths[:16]], 16)
            alone, combined, errors = [], [], 0
            for _ in range(2):  # interleaved: the machine's load drifts between measures
                for out, extra in ((alone, ["--combine-images", "1"]), (combined, [])):
                    svc, failed = service_rate(bundle, paths, args.requests, extra=extra)
                    out.append(svc)
                    errors += failed
            svc, before = max(combined), max(alone)
            print(
                f"HTTP service, 8 clients, {args.requests} single-image requests (best of 3): {svc:6.1f} img/s, {errors} errors; "
                f"in-process single-image scoring {single:6.1f} img/s; ratio x{svc / single:.2f}; each request alone "
                f"(--combine-images 1) {before:6.1f} img/s: combining queued requests x{svc / before:.2f}"
            )


if __name__ == "__main__":
    main()
