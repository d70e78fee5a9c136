"""Decode + resize of one photo into the model's input, per photo size and format, the line's way against before.

The line's preprocessing cost grows with the camera, not with the model: a 5 MP photo shrunk to 320x256 can cost
more CPU than the forward pass. This measures, on one thread, best of ``--repeats``, decode included:
  * one step: full decode, one-step resize (``reducing_gap=None``: bundles written before session 12);
  * two steps: full decode, a whole-factor box reduce then bicubic (``reducing_gap=3.0``);
  * + draft: the line's way since (``Preprocessor.load``), a JPEG decoded at the DCT scale that keeps 3x the size
    it is resized to, then the two-step resize; the ratio is one step / this, and the largest pixel difference
    between them;
  * for one-channel photos (a mono camera), decoding to RGB first against keeping one channel until after the
    resize (bit for bit the same array).

    .venv/bin/python benchmarks/decode_resize.py [--sizes 640x512,1280x1024,2448x2048] [--input 320x256]
"""

from __future__ import annotations

import argparse
import io
import timeit
from collections.abc import Callable

import numpy as np
from PIL import Image

from inspector.preprocess import PreprocessConfig, Preprocessor, load_image


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best-of-``repeats`` milliseconds of one call, after a warm-up call."""
    fn()
    return min(timeit.repeat(fn, number=1, repeat=repeats)) * 1000.0


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="640x512,1280x1024,2448x2048", help="photo sizes, WxH, comma-separated")
    p.add_argument("--input", default="320x256", help="the model's input, WxH")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    in_w, in_h = (int(v) for v in args.input.split("x"))
    two = Preprocessor(PreprocessConfig(height=in_h, width=in_w))
    one = Preprocessor(PreprocessConfig(height=in_h, width=in_w, reducing_gap=None))
    print(
        f"input {in_w}x{in_h}, one thread, ms per photo (best of {args.repeats}); max diff: largest pixel difference from one step"
    )
    print(
        f"{'photo':>10} {'format':>6} {'colour':>6} | {'one step':>8} {'two steps':>9} {'+ draft':>8} {'ratio':>6} {'max diff':>8} | "
        f"{'mono via RGB':>12} {'one channel':>11} {'ratio':>6}"
    )
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        for fmt in ("JPEG", "PNG"):
            for mono in (False, True):
                data = encoded(photo(w, h, mono), fmt)
                t_one = best_ms(lambda: one.resize(load_image(data, keep_gray=True)), args.repeats)
                t_two = best_ms(lambda: two.resize(load_image(data, keep_gray=True)), args.repeats)
                t_now = best_ms(lambda: two.resize(two.load(data, keep_gray=True)), args.repeats)  # the line's way
                reference = one.resize(load_image(data)).astype(int)
                diff = int(np.abs(two.resize(two.load(data)).astype(int) - reference).max())
                row = (
                    f"{size:>10} {fmt:>6} {'mono' if mono else 'colour':>6} | {t_one:8.1f} {t_two:9.1f} {t_now:8.1f} "
                    f"{t_one / t_now:5.2f}x {diff:8d} |"
                )
                if mono:
                    t_rgb = best_ms(lambda: two.resize(two.load(data)), args.repeats)
                    assert np.array_equal(two.resize(two.load(data)), two.resize(two.load(data, keep_gray=True)))
                    row += f" {t_rgb:12.1f} {t_now:11.1f} {t_rgb / t_now:5.2f}x"
                print(row)


if __name__ == "__main__":
    main()
