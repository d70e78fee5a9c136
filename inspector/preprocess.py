"""Image loading and eval preprocessing: the one implementation the line, training-time evaluation and export use.

Two inference paths that disagree (hand-written preprocessing on the line, another in training) is the classic
way an anomaly model flags everything in production. Training-time evaluation, ONNX parity checks and the line
scorer therefore all call :func:`load_image`, :meth:`Preprocessor.resize` and :meth:`Preprocessor.normalize`.
Training augmentation runs between ``resize`` and ``normalize`` on the uint8 array.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inspector.errors import ImageError

ResizeMode = Literal["letterbox", "stretch"]
Interpolation = Literal["bicubic", "bilinear", "nearest", "area"]

_PIL_FILTERS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
}

#: File suffixes treated as images when a folder is scanned.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

#: Images with more pixels than this are refused before decoding (a decompression bomb or a wrong file).
DEFAULT_MAX_PIXELS = 64_000_000

#: Single-channel modes Pillow decodes with more than 8 bits a pixel: the 16-bit PNG or TIFF of a mono line camera
#: (10-, 12- or 14-bit sensors stored in 16 bits) and 32-bit integer TIFF.
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

#: The depths a camera stores, which a high-bit image is scaled by: the smallest that holds the training images'
#: largest value. A fixed full range, never an image's own maximum, so brightness means the same on every part.
CAMERA_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a network input; stored in the bundle so the line reproduces it exactly.

    ``letterbox`` keeps the aspect ratio and pads (squashing a 200x512 part to a square smears small defects);
    the pad colour is the normalisation mean (rounded to uint8), so padding is ~0 after :meth:`Preprocessor.normalize`.

    ``reducing_gap``: a JPEG many times the input's size is decoded at a reduced DCT scale that still leaves this
    many times the size it is resized to (:meth:`Preprocessor.load`), and an image still more than this many times
    the input is first shrunk by a whole factor with a box filter, then resampled with ``interpolation`` (Pillow's
    two-step resize). Why: a line camera's 5 MP JPEG decoded and resampled in one step to 320x256 cost 48 ms of
    CPU, several forward passes; now 23 ms, the pixels within one grey level (benchmarks/README.md). Images under
    2 x ``reducing_gap`` = 6x the input on a side (the magnetic tiles, the demo's parts) load and resize as before.
    ``None``: full decode, one step (bundles written before this field read as None, so they keep scoring as
    calibrated).

    ``bit_depth``: the camera depth (:data:`CAMERA_BIT_DEPTHS`) of single-channel images stored with more than 8
    bits; their values are scaled from ``0 .. 2**bit_depth - 1`` to 8 bits. The training pipeline sets it from
    the training images (:func:`pipelines.recipe.resolve_bit_depth`). ``None``: 8-bit images only; a 16-bit image
    is then an error naming the file, not a white picture (Pillow's own conversion clips every value above 255).
    """

    height: int = 224
    width: int = 224
    resize: ResizeMode = "letterbox"
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    colour: Literal["rgb"] = "rgb"
    max_pixels: int = DEFAULT_MAX_PIXELS
    reducing_gap: float | None = 3.0
    bit_depth: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ValueError(f"input size {self.height}x{self.width} is too small (minimum 8x8)")
        if self.resize not in ("letterbox", "stretch"):
            raise ValueError(f"unknown resize mode {self.resize!r}: use 'letterbox' or 'stretch'")
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}: use one of {sorted(_PIL_FILTERS)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std > 0")
        if self.reducing_gap is not None and not self.reducing_gap >= 1.0:
            raise ValueError(
                f"reducing_gap must be at least 1.0 (or None for a one-step resize), got {self.reducing_gap}"
            )
        if self.bit_depth is not None and self.bit_depth not in CAMERA_BIT_DEPTHS:
            raise ValueError(
                f"bit_depth must be one of {CAMERA_BIT_DEPTHS} (or None for 8-bit images only), got {self.bit_depth}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("reducing_gap", None)  # written before the two-step resize existed: keep one step
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


def auto_input_size(
    sizes: Sequence[tuple[int, int]], pixels: int, *, multiple: int = 32, max_aspect: float = 2.0
) -> tuple[int, int]:
    """Input (height, width) with about ``pixels`` pixels and the median aspect of the images' (width, height).

    Parts photographed portrait stay portrait: letterboxing a 200x512 part into a square wastes most of the input
    on padding and shrinks its defects. Sides are multiples of ``multiple`` (the embedder's coarsest stride), and
    the aspect is capped at ``max_aspect`` so one odd dataset cannot ask for a sliver.
    """
    if not sizes:
        raise ValueError("no image sizes to choose an input size from")
    if pixels < multiple * multiple:
        raise ValueError(f"input_pixels {pixels} is below one {multiple}x{multiple} cell")
    aspect = float(np.median([h / w for w, h in sizes]))
    aspect = min(max(aspect, 1.0 / max_aspect), max_aspect)
    height = max(multiple, round(math.sqrt(pixels * aspect) / multiple) * multiple)
    width = max(multiple, round(math.sqrt(pixels / aspect) / multiple) * multiple)
    return height, width


def significant_bits(image: Image.Image) -> int:
    """The camera depth (:data:`CAMERA_BIT_DEPTHS`) a decoded image needs: 8 unless it is a high-bit
    single-channel image, then the smallest depth holding its largest value."""
    if image.mode not in HIGH_BIT_MODES:
        return 8
    return _depth_of(np.asarray(image), image.mode)  # not getextrema: Pillow has none for big-endian I;16B


def _depth_of(values: np.ndarray, mode: str) -> int:
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0:
        raise ValueError(f"negative pixel values (down to {low}) in a {mode} image")
    return next(d for d in CAMERA_BIT_DEPTHS if d >= high.bit_length())


def _to_8bit(image: Image.Image, bit_depth: int | None, label: str) -> Image.Image:
    """A high-bit single-channel image as 8-bit ``L``, its values scaled from the camera depth's full range."""
    values = np.asarray(image)  # one copy out of Pillow, shared by the checks and the scaling
    bits = _depth_of(values, image.mode)
    if bit_depth is None:
        raise ImageError(
            label,
            f"{bits}-bit single-channel image (mode {image.mode}), but this model takes 8-bit images: "
            "build it on this camera's images (the training pipeline then sets preprocess.bit_depth) "
            "or set preprocess.bit_depth",
        )
    if bits > bit_depth:
        raise ImageError(
            label,
            f"pixel values up to {int(values.max())} do not fit this model's {bit_depth}-bit range "
            f"(a {bits}-bit image): did the camera's bit depth change? Rebuild the model on its images",
        )
    scaled = values.astype(np.float32) * np.float32(255.0 / (2**bit_depth - 1))
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def load_image(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    keep_gray: bool = False,
    at_least: Callable[[int, int], tuple[int, int]] | None = None,
    bit_depth: int | Literal["keep"] | None = None,
) -> Image.Image:
    """Open, fully decode and validate one image; raise :class:`ImageError` naming the file and the problem.

    Decoding fully here (not lazily) is what turns a truncated JPEG into an error for that file instead of a crash
    somewhere inside a batch later. Grayscale and palette images become RGB; EXIF orientation is applied.
    ``keep_gray``: an 8-bit grayscale image stays one channel (``L``), which :meth:`Preprocessor.resize` turns into
    the same RGB array at a third of the cost (mono line cameras; the line scorer asks for it). ``at_least``: from
    the stored (width, height), the smallest size the caller needs; a JPEG is then decoded at the coarsest DCT
    scale (1/2, 1/4, 1/8) that still gives that much, which is most of a large photo's decode cost saved
    (:meth:`Preprocessor.load`). Every byte is still decoded, so a truncated file still fails.
    ``bit_depth``: how a high-bit single-channel image (:data:`HIGH_BIT_MODES`) becomes 8 bits
    (:attr:`PreprocessConfig.bit_depth`; ``"keep"`` returns it undecided, for ingest to measure). Floating-point
    images are refused: their scale is not in the file.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        if not source:
            raise ImageError(label, "empty file (0 bytes)")
        stream: Any = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(label, "no such file")
        if path.stat().st_size == 0:
            raise ImageError(label, "empty file (0 bytes)")
        stream = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own max_pixels check decides
            img: Image.Image = Image.open(stream)
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(label, f"image is {width}x{height} px, over the limit of {max_pixels} pixels")
            if width < 1 or height < 1:
                raise ImageError(label, f"image has no pixels ({width}x{height})")
            if at_least is not None and img.format == "JPEG":
                img.draft(None, at_least(width, height))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an already-upright image
            if img.mode == "F":
                raise ImageError(
                    label,
                    "32-bit floating-point image: its value range is not in the file; save the camera's "
                    "images as 8- or 16-bit integers",
                )
            if img.mode in HIGH_BIT_MODES:
                if bit_depth == "keep":
                    return img
                img = _to_8bit(img, bit_depth, label)
            return img if img.mode == "RGB" or (keep_gray and img.mode == "L") else img.convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(label, "not an image (unknown format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(label, f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(label, f"cannot decode image ({exc})") from None


def mask_pixels(mask: Image.Image) -> np.ndarray:
    """Where a ground-truth mask marks the defect, at its own size: the pixels at or above half its brightest value.

    Why half the brightest and not a fixed 128: datasets store masks as 0/255, as 0/1 or in 16 bits. A fixed 128
    found no defect in a 0/1 mask, and training then taught that defect's patches as normal ones. Near-zero noise
    in a JPEG-saved 0/255 mask stays out, as before. An empty mask (no pixel above 0) marks nothing.
    """
    values = np.asarray(mask if mask.mode in HIGH_BIT_MODES or mask.mode == "L" else mask.convert("L"))
    top = float(values.max()) if values.size else 0.0
    return values >= top / 2 if top > 0 else np.zeros(values.shape, dtype=bool)


def open_mask(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A ground-truth mask as an ``L`` image, 255 where it marks the defect (:func:`mask_pixels`); raises
    :class:`ImageError` naming the file. ``path`` may be a folder of masks of one image (MVTec LOCO keeps one file
    per defect region, ``ground_truth/<type>/<image>/000.png``): their union, all of one size."""
    path = Path(path)
    files = (
        sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if path.is_dir()
        else [path]
    )
    if not files:
        raise ImageError(str(path), "mask folder holds no image")
    union: np.ndarray | None = None
    for file in files:
        marked = mask_pixels(load_image(file, max_pixels=max_pixels, bit_depth="keep"))
        if union is not None and marked.shape != union.shape:
            raise ImageError(
                str(file),
                f"mask is {marked.shape[1]}x{marked.shape[0]}, the others in {path} {union.shape[1]}x{union.shape[0]}",
            )
        union = marked if union is None else union | marked
    assert union is not None
    return Image.fromarray(union.astype(np.uint8) * 255, mode="L")


def patch_grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) feature grid behind ``num_patches`` patches of an ``height`` x ``width`` input.

    The embedder's grid keeps the input's aspect (strided convolutions), so of the factorisations of P the one whose
    aspect is closest to the input's is the grid.
    """
    if num_patches < 1:
        raise ValueError("no patches")
    target = math.log(height / width)
    pairs = [(r, num_patches // r) for r in range(1, num_patches + 1) if num_patches % r == 0]
    return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - target))


def full_placement(n: int, height: int, width: int) -> np.ndarray:
    """(n, 4) placements (left, top, width, height) of parts that fill the whole ``height`` x ``width`` input."""
    return np.tile(np.array([[0.0, 0.0, width, height]], dtype=np.float32), (n, 1))


def cells_on_part(placement: tuple[int, int, int, int], grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(rows, cols) True for the cells of a ``grid`` over an input of ``size`` (height, width) whose centre lies in
    the part's ``placement`` (left, top, width, height, whole pixels).

    In whole numbers: row i's centre ``(i + ½)·H/rows`` lies in ``[top, top + h)`` exactly when
    ``top·2·rows ≤ (2i + 1)·H < (top + h)·2·rows``; the torch rule inside the model (``models.siamese.on_part_weights``)
    compares the same whole numbers, so the two agree for every image size, never differing by a rounding.
    """
    (rows, cols), (height, width) = grid, size
    left, top, part_w, part_h = (int(v) for v in placement)
    ys = (2 * np.arange(rows, dtype=np.int64) + 1) * height
    xs = (2 * np.arange(cols, dtype=np.int64) + 1) * width
    on_rows = (ys >= 2 * top * rows) & (ys < 2 * (top + part_h) * rows)
    on_cols = (xs >= 2 * left * cols) & (xs < 2 * (left + part_w) * cols)
    return on_rows[:, None] & on_cols[None, :]


class Preprocessor:
    """Turns decoded images into the float32 NCHW batches the embedder takes."""

    def __init__(self, config: PreprocessConfig | None = None) -> None:
        self.config = config or PreprocessConfig()
        self._mean = np.asarray(self.config.mean, dtype=np.float32) * 255.0
        self._inv_std = 1.0 / (np.asarray(self.config.std, dtype=np.float32) * 255.0)
        self._pad = tuple(int(round(m * 255.0)) for m in self.config.mean)

    def load(self, source: str | Path | bytes, *, name: str | None = None, keep_gray: bool = False) -> Image.Image:
        """Decode one image for this model's input (:func:`load_image`, this config's ``max_pixels``).

        With ``reducing_gap`` set, a JPEG many times the input is decoded at a reduced DCT scale that still leaves
        ``reducing_gap`` times the size it is resized to (what Pillow's ``thumbnail`` does): a 5 MP photo for a
        320x256 input decodes at half size. Every path that feeds the model (line, service, heatmaps, INT8
        calibration, training) loads through here, so all of them see the same pixels and sizes.
        """
        at_least = self._decode_size if self.config.reducing_gap is not None else None
        return load_image(
            source,
            max_pixels=self.config.max_pixels,
            name=name,
            keep_gray=keep_gray,
            at_least=at_least,
            bit_depth=self.config.bit_depth,
        )

    def decodes_reduced(self, width: int, height: int) -> bool:
        """Whether :meth:`load` decodes a JPEG of ``width`` x ``height`` (either orientation) at a reduced scale:
        at least twice the size :meth:`_decode_size` asks for on both sides (the coarsest DCT scale is 1/2)."""
        if self.config.reducing_gap is None:
            return False
        need_w, need_h = self._decode_size(width, height)
        return width >= 2 * need_w and height >= 2 * need_h

    def _decode_size(self, width: int, height: int) -> tuple[int, int]:
        """``reducing_gap`` times the size a stored ``width`` x ``height`` image is resized to, in either orientation
        (EXIF may turn it after decoding)."""
        gap = float(self.config.reducing_gap or 1.0)
        upright_w, upright_h, _, _ = self.placement(width, height)
        turned_w, turned_h, _, _ = self.placement(height, width)
        return math.ceil(gap * max(upright_w, turned_h)), math.ceil(gap * max(upright_h, turned_w))

    def placement(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Where an image of ``width`` x ``height`` lands on the input canvas: (new_w, new_h, left, top)."""
        cfg = self.config
        if cfg.resize == "stretch":
            return cfg.width, cfg.height, 0, 0
        scale = min(cfg.width / width, cfg.height / height)
        new_w = max(1, min(cfg.width, int(round(width * scale))))
        new_h = max(1, min(cfg.height, int(round(height * scale))))
        return new_w, new_h, (cfg.width - new_w) // 2, (cfg.height - new_h) // 2

    def placements(self, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """(N, 4) the model's placement input: where each image of original (width, height) sits on the input, as
        left, top, width, height (``full_placement`` for parts that fill it)."""
        out = np.empty((len(sizes), 4), dtype=np.float32)
        for i, (width, height) in enumerate(sizes):
            new_w, new_h, left, top = self.placement(width, height)
            out[i] = (left, top, new_w, new_h)
        return out

    def content_mask(self, sizes: list[tuple[int, int]], grid: tuple[int, int]) -> np.ndarray:
        """(N, rows·cols) True for each feature-grid patch whose centre lies on the part, False on the letterbox
        padding.

        Why: padding is not the part. Scored with it, a narrow or wide crop's patches are mostly padding, which
        matches the golden padding exactly; the part's score and its typical patch distance then depend on how
        its image was cropped rather than on the part (on the magnetic tiles the crop shape alone separated goods
        from defects at AUROC 0.65; benchmarks/README.md). ``sizes`` are the original (width, height) images.
        """
        out = np.empty((len(sizes), grid[0] * grid[1]), dtype=bool)
        for i, (width, height) in enumerate(sizes):
            new_w, new_h, left, top = self.placement(width, height)
            out[i] = cells_on_part((left, top, new_w, new_h), grid, (self.config.height, self.config.width)).ravel()
        return out

    def _place(
        self, image: Image.Image, resample: Image.Resampling, fill: int | tuple[int, ...], mode: str | None = None
    ) -> Image.Image:
        """``image`` resized onto the input canvas; ``mode``: converted to it after the resize (before the padding)."""
        new_w, new_h, left, top = self.placement(*image.size)
        gap = self.config.reducing_gap if resample != Image.Resampling.NEAREST else None
        resized = image.resize((new_w, new_h), resample, reducing_gap=gap)
        if mode is not None and resized.mode != mode:
            resized = resized.convert(mode)
        if (new_w, new_h) == (self.config.width, self.config.height):
            return resized
        canvas = Image.new(resized.mode, (self.config.width, self.config.height), fill)
        canvas.paste(resized, (left, top))
        return canvas

    def resize(self, image: Image.Image) -> np.ndarray:
        """Resize to the configured size (letterbox or stretch); returns HxWx3 uint8.

        A grayscale (``L``) image is resized as one channel and only then made RGB: bit for bit the array its RGB
        conversion gives (Pillow resamples each channel alike), for a third of the resampling work.
        """
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        return np.asarray(self._place(image, _PIL_FILTERS[self.config.interpolation], self._pad, "RGB"), dtype=np.uint8)

    def resize_mask(self, mask: Image.Image) -> np.ndarray:
        """A defect mask (:func:`mask_pixels`) through the same geometry as :meth:`resize` (nearest neighbour,
        padding = no defect)."""
        binary = Image.fromarray(mask_pixels(mask).astype(np.uint8) * 255, mode="L")
        return np.asarray(self._place(binary, Image.Resampling.NEAREST, 0)) > 0

    def normalize(self, array: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 (or a stack NxHxWx3) to float32 CHW (NCHW), scaled by mean/std.

        The layout change is done on the uint8 pixels (a quarter of the bytes) and the arithmetic in one
        preallocated float32 buffer; the values are bit-for-bit those of ``(x - mean) * inv_std``.
        """
        chw = np.ascontiguousarray(np.moveaxis(np.asarray(array), -1, -3))
        out = np.empty(chw.shape, dtype=np.float32)
        np.subtract(chw, self._mean.reshape(3, 1, 1), out=out, dtype=np.float32)
        out *= self._inv_std.reshape(3, 1, 1)
        return out

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One decoded image to a float32 CHW array."""
        return self.normalize(self.resize(image))

    def batch(self, images: list[Image.Image]) -> np.ndarray:
        """Several decoded images to one float32 NCHW batch."""
        if not images:
            return np.zeros((0, 3, self.config.height, self.config.width), dtype=np.float32)
        return self.normalize(np.stack([self.resize(img) for img in images]))
