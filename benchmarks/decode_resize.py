"""Decode + resize of one camera photo into the model's input, per photo size and format, three ways.

The line's preprocessing cost grows with the camera, not with the model: a 5 MP photo shrunk to 320x256 can cost
more CPU than the forward pass. On one thread, best of ``--repeats``, decode included, milliseconds per photo:

* one step: full decode, one bicubic resize (``PreprocessConfig.reducing_gap=None``, what bundles that do not
  record a reducing gap keep);
* two steps: full decode, a whole-factor box reduce, then bicubic (``reducing_gap=3.0``, the default);
* + draft: the line's way (``Preprocessor.load``): a JPEG decoded at the DCT scale that keeps 3x the size it is
  resized to, then the two-step resize; the ratio is one step / this, with the largest pixel difference;
* for one-channel photos (a mono camera): converted to RGB at decode against kept one channel until after the
  resize, as the line does (the same array, bit for bit);
* the resize alone, of the photo as the line decodes it: Pillow's bicubic (the line's, antialiased) against
  OpenCV's ``INTER_CUBIC`` (four taps, no antialias), with the largest pixel difference: what a faster resampler
  would save, and how far it would move the pixels every bundle was calibrated on.

    .venv/bin/python -m benchmarks.decode_resize [--sizes 640x512,1280x1024,2448x2048] [--input 320x256]
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import best_seconds, write_json
from inspector.preprocess import PreprocessConfig, Preprocessor, load_image


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best-of-``repeats`` milliseconds of one call, after a warm-up call."""
    return 1000.0 * best_seconds(fn, repeats)


def photo(width: int, height: int, mono: bool, seed: int = 0) -> Image.Image:
    """A smooth part-like photo with sensor noise (smooth content alone would flatter the JPEG decoder)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(40, 220, (24, 30, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    noisy = np.asarray(base).astype(np.int16) + rng.integers(-8, 9, (height, width, 3))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return img.convert("L") if mono else img


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def opencv_resize(pre: Preprocessor, image: Image.Image, repeats: int) -> dict[str, Any]:
    """Milliseconds of the line's resampling (Pillow's bicubic with the config's reducing gap, to where the part lands
    on the input) and of OpenCV's bicubic to the same size, and their largest pixel difference."""
    import cv2

    new_w, new_h, _, _ = pre.placement(*image.size)
    gap = pre.config.reducing_gap
    pixels = np.asarray(image)

    def pillow() -> np.ndarray:
        return np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=gap))

    def opencv() -> np.ndarray:
        return np.asarray(cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_CUBIC))

    return {
        "resize_pillow_ms": best_ms(pillow, repeats),
        "resize_opencv_ms": best_ms(opencv, repeats),
        "opencv_max_diff": int(np.abs(pillow().astype(int) - opencv().astype(int)).max()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="640x512,1280x1024,2448x2048", help="photo sizes, WxH, comma-separated")
    p.add_argument("--input", default="320x256", help="the model's input, WxH")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, default=None, help="also write every row to this file")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    in_w, in_h = (int(v) for v in args.input.split("x"))
    two = Preprocessor(PreprocessConfig(height=in_h, width=in_w))
    one = Preprocessor(PreprocessConfig(height=in_h, width=in_w, reducing_gap=None))
    print(f"input {in_w}x{in_h}, one thread, ms per photo (best of {args.repeats}); max diff: from one step")
    print(
        f"{'photo':>10} {'format':>6} {'colour':>6} | {'one step':>8} {'two steps':>9} {'+ draft':>8} {'ratio':>6} "
        f"{'max diff':>8} | {'mono via RGB':>12} {'one channel':>11} {'ratio':>6} | resize: Pillow / OpenCV / max diff"
    )
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        for fmt in ("JPEG", "PNG"):
            for mono in (False, True):
                data = encoded(photo(w, h, mono), fmt)
                row: dict[str, Any] = {"photo": size, "format": fmt, "mono": mono}
                row["one_step_ms"] = best_ms(lambda: one.resize(load_image(data, keep_gray=True)), args.repeats)
                row["two_steps_ms"] = best_ms(lambda: two.resize(load_image(data, keep_gray=True)), args.repeats)
                row["line_ms"] = best_ms(lambda: two.resize(two.load(data, keep_gray=True)), args.repeats)
                reference = one.resize(load_image(data)).astype(int)
                row["max_pixel_difference"] = int(np.abs(two.resize(two.load(data)).astype(int) - reference).max())
                line = (
                    f"{size:>10} {fmt:>6} {'mono' if mono else 'colour':>6} | {row['one_step_ms']:8.1f} "
                    f"{row['two_steps_ms']:9.1f} {row['line_ms']:8.1f} {row['one_step_ms'] / row['line_ms']:5.2f}x "
                    f"{row['max_pixel_difference']:8d} |"
                )
                if mono:
                    row["via_rgb_ms"] = best_ms(lambda: two.resize(two.load(data)), args.repeats)
                    row["same_array"] = bool(
                        np.array_equal(two.resize(two.load(data)), two.resize(two.load(data, keep_gray=True)))
                    )
                    line += (
                        f" {row['via_rgb_ms']:12.1f} {row['line_ms']:11.1f} {row['via_rgb_ms'] / row['line_ms']:5.2f}x"
                    )
                    line += "" if row["same_array"] else "  (NOT the same array)"
                else:
                    line += " " * 32  # no mono columns
                row.update(opencv_resize(two, two.load(data), args.repeats))
                line += f" | {row['resize_pillow_ms']:6.2f} {row['resize_opencv_ms']:6.2f} {row['opencv_max_diff']:5d}"
                print(line)
                rows.append(row)
    figures = {"input": args.input, "rows": rows}
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
