"""Static INT8 quantisation of a bundle's embedder, calibrated on real part images, with the drift it causes.

``quantize_bundle(bundle, images, out)`` writes a *new* bundle whose ``model.onnx`` is a QDQ INT8 model
(weights QInt8, per channel by default; activations QUInt8 by default, i.e. U8S8).

Why U8S8 and not onnxruntime's generic "S8S8 QDQ first" advice: on x86-64 the CPU kernels are built around
u8 x s8 products (VNNI ``VPDPBUSD``); measured with onnxruntime 1.32 on a 2-core AVX512-VNNI CPU, the tiny test CNN
ran ~1.4x *faster* than FP32 with U8S8 and ~3x *slower* with S8S8, with identical drift (QDQ with asymmetric
activations puts both on the same grid). ``activation_type="int8"`` remains available (e.g. for ARM); compare the
recorded drift and throughput. Weights use a 7-bit range by default (``reduce_range``): on an x86 CPU without VNNI
(AVX2 only) the U8S8 kernel's ``VPMADDUBSW`` saturates 8-bit products, which on an AVX2-only AMD EPYC tripled the
score drift of the tiny test CNN (0.017 -> 0.05-0.09); the line PC's CPU is not known when a bundle is quantised.
Dynamic INT8 is deliberately not offered: for these CNNs on CPU it is several times slower than FP32.

The reference bank is **kept as it is**: it was embedded by the FP32 model and cannot be re-embedded without the
reference images. The quantised model's embeddings therefore drift a little from the bank's; this module measures
that drift on the calibration images (embedding |fp32 - int8|, score change, verdict flips at the parent's
threshold) and records it, with the settings, sizes and a throughput comparison, in
``provenance.quantization`` of the new bundle. Judge the drift against the threshold margin before deploying, and
re-calibrate the threshold on held-out good parts (``inspector add-references --recalibrate-good``) if it matters.

``onnxruntime.quantization`` and ``onnx`` are imported inside the functions, so ``import inspector`` stays light.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from inspector.bundle import (
    MODEL_FILE,
    derived_provenance,
    load_bundle,
    write_bundle,
)
from inspector.engine import PLACEMENT_INPUT, Inspector, OnnxEmbedder
from inspector.errors import ImageError, InspectorError

MIN_CALIBRATION_IMAGES = 8
CALIBRATION_BATCH = 8
QUANTIZED_TAG = "int8-static"


class QuantizeError(InspectorError):
    """Quantisation refused or failed; nothing was written."""


class _BatchReader:
    """A ``CalibrationDataReader`` over an already-preprocessed NCHW batch, ``CALIBRATION_BATCH`` images at a time."""

    def __init__(
        self,
        input_name: str,
        batch: np.ndarray,
        batch_size: int = CALIBRATION_BATCH,
        placement: np.ndarray | None = None,
    ) -> None:
        feeds = []
        for i in range(0, len(batch), batch_size):
            feed = {input_name: np.ascontiguousarray(batch[i : i + batch_size], dtype=np.float32)}
            if placement is not None:  # a model that also describes whole parts (inspector.density)
                feed[PLACEMENT_INPUT] = np.ascontiguousarray(placement[i : i + batch_size], dtype=np.float32)
            feeds.append(feed)
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _reader(input_name: str, batch: np.ndarray, placement: np.ndarray | None = None) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_BatchReader, CalibrationDataReader):
        pass

    return Reader(input_name, batch, placement=placement)


def load_calibration_batch(
    embedder: OnnxEmbedder, images: Sequence[str | Path], max_images: int
) -> tuple[np.ndarray, list[str], list[str], list[tuple[int, int]]]:
    """Decode and preprocess (the bundle's own preprocessing) up to ``max_images`` readable images.

    Returns the float32 NCHW batch, the files used, the problems with files that could not be read, and each used
    image's original (width, height) (where the part sits on the letterboxed input, as the line places it).
    """
    arrays: list[np.ndarray] = []
    used: list[str] = []
    problems: list[str] = []
    sizes: list[tuple[int, int]] = []
    for source in images:
        if len(arrays) >= max_images:
            break
        try:
            img = embedder.preprocessor.load(source, name=str(source))
            arrays.append(embedder.preprocessor(img))
            used.append(str(source))
            sizes.append(img.size)
        except ImageError as exc:
            problems.append(str(exc))
    batch = (
        np.stack(arrays)
        if arrays
        else np.zeros((0, 3, embedder.preprocessing.height, embedder.preprocessing.width), np.float32)
    )
    return batch, used, problems, sizes


def images_per_second(
    embedder: OnnxEmbedder, batch: np.ndarray, min_seconds: float = 0.2, max_repeats: int = 20
) -> float:
    """Throughput on ``batch`` (best of a few timed passes after one warm-up pass)."""
    embedder.run(batch)
    best, spent, repeats = float("inf"), 0.0, 0
    while repeats < 3 or (spent < min_seconds and repeats < max_repeats):
        t0 = time.perf_counter()
        embedder.run(batch)
        dt = time.perf_counter() - t0
        best, spent, repeats = min(best, dt), spent + dt, repeats + 1
    return float(len(batch) / max(best, 1e-9))


def _drift(
    line: Inspector,
    fp32: tuple[np.ndarray, np.ndarray | None],
    int8: tuple[np.ndarray, np.ndarray | None],
    valid: np.ndarray | None,
) -> dict[str, Any]:
    """How far the INT8 model moves the line's scores from the FP32 model's, both scored by the parent bundle as the
    line scores (``line``: patch score, fused with the whole-part score when the bundle has one; the threshold's
    units), and how many verdicts flip at its threshold. ``fp32`` / ``int8``: each model's embeddings and
    descriptors."""
    (emb32, desc32), (emb8, desc8) = fp32, int8
    diff = np.abs(emb32.astype(np.float64) - emb8.astype(np.float64))
    scorer = line.scorer
    raw32, raw8 = scorer.raw(emb32, valid, desc32), scorer.raw(emb8, valid, desc8)
    s32, s8 = scorer.fuse(raw32), scorer.fuse(raw8)
    dscore = np.abs(s32 - s8)
    threshold = line.threshold
    out: dict[str, Any] = {
        "measured_on": "calibration images (in-sample for the activation ranges)",
        "images": len(emb32),
        "score": "the line's score: patch and whole-part views fused"
        if desc32 is not None
        else "the line's score (patch)",
        "embedding_abs_diff_max": float(diff.max()),
        "embedding_abs_diff_mean": float(diff.mean()),
        "embedding_norm_fp32_mean": float(np.linalg.norm(emb32.reshape(-1, emb32.shape[-1]), axis=1).mean()),
        "score_abs_diff_max": float(dscore.max()),
        "score_abs_diff_mean": float(dscore.mean()),
        "score_fp32_range": [float(s32.min()), float(s32.max())],
        "threshold": float(threshold),
        "verdict_flips": int(np.sum((s32 > threshold) != (s8 > threshold))),
    }
    if desc32 is not None and desc8 is not None:  # each view alone, in the threshold's units
        views32, views8 = scorer.standardised(raw32), scorer.standardised(raw8)
        spread = (
            line.bundle.descriptors.std(axis=0) if line.bundle.descriptors is not None else np.abs(desc32).mean(axis=0)
        )
        moved = np.abs(desc32 - desc8) / (spread + 1e-9 * float(spread.mean()) + 1e-12)  # in the golden parts' spread
        out["descriptor_drift_in_spreads"] = {"median": float(np.median(moved)), "p99": float(np.percentile(moved, 99))}
        for name in views32 or {}:
            out[f"{name}_view_abs_diff_max"] = float(np.abs(views32[name] - views8[name]).max())  # type: ignore[index]
    return out


def quantize_model(
    fp32: OnnxEmbedder,
    batch: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    out_model: Path,
    *,
    per_channel: bool = True,
    activation_type: Literal["uint8", "int8"] = "uint8",
    reduce_range: bool = True,
) -> dict[str, Any]:
    """Write a static INT8 (QDQ) copy of ``fp32``'s model to ``out_model``, its activation ranges calibrated on
    ``batch`` (preprocessed as the line does; ``sizes``: each image's original size, where the part sits); returns
    the settings used, as a bundle records them."""
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise QuantizeError(f"onnxruntime.quantization is unavailable (needs the 'onnx' package): {exc}") from None
    if activation_type not in ("int8", "uint8"):
        raise QuantizeError(f"activation_type must be 'int8' or 'uint8', got {activation_type!r}")
    if len(batch) < MIN_CALIBRATION_IMAGES:
        raise QuantizeError(f"{len(batch)} calibration images: at least {MIN_CALIBRATION_IMAGES} are needed")
    act = QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8
    with tempfile.TemporaryDirectory(prefix="inspector-quantize-") as tmp:
        source, pre_processed, pre_notes = fp32.model_path, "no", []
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process
        except ImportError as exc:  # pragma: no cover - depends on the onnxruntime version
            quant_pre_process, pre_notes = None, [f"quant_pre_process unavailable: {exc}"]
        # symbolic shape inference chokes on some exported graphs (e.g. Expand with a computed shape): retry without it
        for label, kwargs in (("full", {}), ("without symbolic shape inference", {"skip_symbolic_shape": True})):
            if quant_pre_process is None:
                break
            try:
                quant_pre_process(str(fp32.model_path), str(Path(tmp) / "pre.onnx"), **kwargs)
                source, pre_processed = Path(tmp) / "pre.onnx", label
                break
            except Exception as exc:
                pre_notes.append(f"quant_pre_process ({label}) failed: {type(exc).__name__}: {exc}")
        try:
            quantize_static(
                str(source),
                str(out_model),
                _reader(fp32.input_name, batch, fp32.placements(sizes) if fp32.describes_parts else None),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=act,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:
            raise QuantizeError(
                f"{fp32.model_path}: static INT8 quantisation failed: {type(exc).__name__}: {exc}"
            ) from None
    settings: dict[str, Any] = {
        "method": QUANTIZED_TAG,
        "format": "QDQ",
        "weights": "int8"
        + (" per-channel" if per_channel else " per-tensor")
        + (", 7-bit range" if reduce_range else ""),
        "activations": activation_type,
        "calibrate_method": "MinMax",
        "pre_processed": pre_processed,
    }
    if pre_notes:
        settings["pre_process_notes"] = pre_notes
    return settings


def quantize_bundle(
    bundle_path: str | Path,
    calibration_images: Sequence[str | Path],
    out_path: str | Path,
    *,
    per_channel: bool = True,
    max_images: int = 64,
    activation_type: Literal["uint8", "int8"] = "uint8",
    threads: int | None = None,
    reduce_range: bool = True,
) -> Path:
    """Write a new bundle at ``out_path`` with a static INT8 (QDQ) copy of the model, the same bank and threshold.

    Calibration images go through the bundle's own preprocessing; up to ``max_images`` readable ones are used
    (unreadable ones are skipped and listed). Fewer than 8 readable images is refused with :class:`QuantizeError`.
    The drift against the FP32 model, model sizes and throughput are in ``provenance.quantization``.
    """
    bundle_path, out_path = Path(bundle_path), Path(out_path)
    if max_images < MIN_CALIBRATION_IMAGES:
        raise QuantizeError(f"max_images={max_images}: at least {MIN_CALIBRATION_IMAGES} calibration images are needed")
    parent = load_bundle(bundle_path)
    if out_path.resolve() == parent.path.resolve():
        raise QuantizeError(f"{out_path}: the output must be a new bundle, not the input bundle")
    if out_path.exists():
        raise QuantizeError(f"{out_path}: already exists (choose a new bundle path)")
    if parent.spec.provenance.get("quantized"):
        raise QuantizeError(
            f"{parent.path}: is already quantized ({parent.spec.provenance['quantized']}); "
            "quantize the FP32 parent instead"
        )
    fp32 = OnnxEmbedder(parent.model_path, parent.spec.preprocessing, threads=threads)
    batch, used, problems, sizes = load_calibration_batch(fp32, calibration_images, max_images)
    if len(batch) < MIN_CALIBRATION_IMAGES:
        detail = ("\n  " + "\n  ".join(problems)) if problems else ""
        raise QuantizeError(
            f"only {len(batch)} calibration image(s) could be read, at least {MIN_CALIBRATION_IMAGES} are needed; "
            f"nothing was written{detail}"
        )

    with tempfile.TemporaryDirectory(prefix="inspector-quantize-") as tmp:
        q_path = Path(tmp) / MODEL_FILE
        settings = quantize_model(
            fp32,
            batch,
            sizes,
            q_path,
            per_channel=per_channel,
            activation_type=activation_type,
            reduce_range=reduce_range,
        )
        int8 = OnnxEmbedder(q_path, parent.spec.preprocessing, threads=threads)
        out32, out8 = fp32.run(batch, sizes), int8.run(batch, sizes)
        if out32[0].shape != out8[0].shape:
            raise QuantizeError(
                f"quantised model outputs {out8[0].shape}, the FP32 model {out32[0].shape}; nothing was written"
            )
        report: dict[str, Any] = {
            **settings,
            "calibration": {"images": len(used), "files": used, "skipped": problems},
            "drift": _drift(Inspector(parent, threads=threads), out32, out8, fp32.patch_valid(sizes, out32[0])),
            "model_bytes": {"fp32": parent.model_path.stat().st_size, "int8": q_path.stat().st_size},
            "images_per_second": {
                "fp32": images_per_second(fp32, batch),
                "int8": images_per_second(int8, batch),
                "batch": len(batch),
                "threads": threads,
            },
            "bank": "kept from the FP32 parent (embedded by the FP32 model; not re-embedded)"
            + ("; so are the whole-part descriptors and score scales" if parent.spec.density else ""),
        }

        prov = derived_provenance(parent, drop=("reference_change",))
        prov["quantized"] = QUANTIZED_TAG
        prov["quantization"] = report
        model = {**parent.spec.model, "quantization": QUANTIZED_TAG}
        model["version"] = f"{parent.spec.model.get('version', 'unversioned')}+int8"
        spec = replace(parent.spec, model=model, provenance=prov)
        return write_bundle(out_path, q_path, parent.references, spec, descriptors=parent.descriptors)
