"""Reading each dataset layout into :class:`~pipelines.data.records.ImageRecord`: which files are images, which
are masks, and what each image's label, defect type and source split are. Nothing is opened here: the manifest
validates every image once.

Layouts read: MVTec AD / anomalib Folder (``train/good``, ``test/good``, ``test/<defect>``, masks under
``ground_truth/``), with BTAD's ``ok`` for ``good``, MVTec AD 2's ``test_public/`` and MVTec LOCO's mask folders;
VisA's own layout (``Data/Images/Normal|Anomaly``, ``Data/Masks/Anomaly``, its ``split_csv/1cls.csv``); datasets
whose masks say which parts are defective (KolektorSDD, KolektorSDD2, DAGM 2007); and plain folders of good and
defective images. Adding a layout means one ``scan_*`` function here and one branch in :func:`detect_layout`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from inspector.preprocess import IMAGE_SUFFIXES
from pipelines.data.records import LABEL_BY_MASK, ImageRecord


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted; hidden files and non-image suffixes ignored)."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


#: The good parts' folder in MVTec-like layouts: MVTec AD's ``good``, BTAD's ``ok``.
GOOD_FOLDERS = ("good", "ok")


def scan_mvtec(root: str | Path) -> list[ImageRecord]:
    """All images of an MVTec-layout folder; raises FileNotFoundError naming what is missing.

    Goods come from ``train/good`` and, where the dataset has one (MVTec AD 2, MVTec LOCO), ``validation/good``:
    both are goods the product may train and calibrate on; ``test/good`` stays test. BTAD's ``ok`` is ``good``.
    MVTec AD 2 has no ``test/`` but a labelled ``test_public/`` with its masks under ``test_public/ground_truth/``."""
    root = Path(root)
    good = next((name for name in GOOD_FOLDERS if (root / "train" / name).is_dir()), None)
    if good is None:
        raise FileNotFoundError(
            f"{root}: no train/good (or train/ok) folder "
            "(expected the MVTec AD layout: train/good, test/good, test/<defect>)"
        )
    records = [
        ImageRecord(p, 0, "good", "train")
        for folder in ("train", "validation")
        for p in list_images(root / folder / good)
    ]
    test = next((root / name for name in ("test", "test_public") if (root / name).is_dir()), root / "test")
    truth = root / "ground_truth" if (root / "ground_truth").is_dir() else test / "ground_truth"
    if test.is_dir():
        for sub in sorted(d for d in test.iterdir() if d.is_dir() and d != truth and not d.name.startswith(".")):
            label = 0 if sub.name in GOOD_FOLDERS else 1
            masks = mask_index(truth / sub.name) if label else {}
            for p in list_images(sub):
                records.append(
                    ImageRecord(
                        p, label, sub.name if label else "good", "test", masks.get(f"{p.stem}_mask", masks.get(p.stem))
                    )
                )
    return records


def mask_index(folder: Path) -> dict[str, Path]:
    """The masks of one defect type by file stem: MVTec AD names them ``<image>_mask.png``, datasets converted to
    its layout (BTAD, VisA) often ``<image>.png`` or another image format, MVTec LOCO a folder ``<image>/`` of
    masks (:func:`inspector.preprocess.open_mask` joins them); :func:`scan_mvtec` tries both names."""
    folders = (
        {d.name: d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
        if folder.is_dir()
        else {}
    )
    return {**folders, **{p.stem: p for p in list_images(folder)}}


#: Stem endings of a mask stored beside its image (KolektorSDD2 ``<id>_GT.png``, KolektorSDD ``<id>_label.bmp``).
BESIDE_MASK_SUFFIXES = ("_mask", "_gt", "_label")


def _masked_stem(stem: str) -> str | None:
    """The image stem a mask named ``<image><suffix>`` (:data:`BESIDE_MASK_SUFFIXES`) belongs to, else None."""
    return next((stem[: -len(suffix)] for suffix in BESIDE_MASK_SUFFIXES if stem.lower().endswith(suffix)), None)


def images_and_masks(folder: Path) -> list[tuple[Path, Path | None]]:
    """The images of a plain folder, each with the mask stored beside it, if any: a file named like an image of
    the folder plus one of :data:`BESIDE_MASK_SUFFIXES` is that image's mask, never a part of its own (taken as a
    part it would train the product on black-and-white masks)."""
    files = list_images(folder)
    by_stem = {p.stem: p for p in files}
    masks: dict[Path, Path] = {}
    for p in files:
        if (stem := _masked_stem(p.stem)) in by_stem:
            masks[by_stem[stem]] = p
    mask_files = set(masks.values())
    return [(p, masks.get(p)) for p in files if p not in mask_files]


def folder_tree(folder: Path) -> list[Path]:
    """``folder`` and every folder under it (hidden ones skipped), sorted: goods kept by date, camera or shift."""
    subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    return [folder] + [f for d in subs for f in folder_tree(d)]


def scan_folders(good: str | Path, defective: str | Path | None = None) -> list[ImageRecord]:
    """Plain ``--good DIR --defective DIR`` input. Every image under the good dir is a good part, however deep
    (``good/2026-11-30/cam1/…``); under the defective dir, images at the top are of type ``defect`` and each
    sub-folder, with everything under it, is a defect type of its name. Masks stored beside their images
    (:func:`images_and_masks`) go with the defective images and are skipped as goods."""
    good = Path(good)
    if not good.is_dir():
        raise FileNotFoundError(f"{good}: good-image folder not found")
    records = [ImageRecord(p, 0, "good", "") for folder in folder_tree(good) for p, _ in images_and_masks(folder)]
    if defective is not None:
        defective = Path(defective)
        if not defective.is_dir():
            raise FileNotFoundError(f"{defective}: defective-image folder not found")
        records += [ImageRecord(p, 1, "defect", "", mask) for p, mask in images_and_masks(defective)]
        for sub in sorted(d for d in defective.iterdir() if d.is_dir() and not d.name.startswith(".")):
            records += [
                ImageRecord(p, 1, sub.name, "", mask)
                for folder in folder_tree(sub)
                for p, mask in images_and_masks(folder)
            ]
    return records


VISA_IMAGES = Path("Data") / "Images"
VISA_MASKS = Path("Data") / "Masks"


def scan_visa(root: str | Path) -> list[ImageRecord]:
    """One VisA object as the dataset ships it: goods in ``Data/Images/Normal``, defects in ``Data/Images/Anomaly``
    (one folder for every kind: type ``defect``), their masks under the same name in ``Data/Masks/Anomaly``. Where
    VisA's ``split_csv/1cls.csv`` is there (beside the object folders, or in it), its train/test assignment is kept
    as each image's source split, so the test goods are VisA's own, as in published results; without it the
    product keeps goods for test by capture group like for plain folders."""
    root = Path(root)
    masks = mask_index(root / VISA_MASKS / "Anomaly")
    splits = visa_splits(root)

    def split(p: Path) -> str:
        return splits.get(p.relative_to(root.parent).as_posix(), "")

    return [
        ImageRecord(p, 0, "good", split(p))
        for folder in folder_tree(root / VISA_IMAGES / "Normal")
        for p in list_images(folder)
    ] + [
        ImageRecord(p, 1, "defect", split(p), masks.get(p.stem))
        for folder in folder_tree(root / VISA_IMAGES / "Anomaly")
        for p in list_images(folder)
    ]


VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"


def visa_splits(root: Path) -> dict[str, str]:
    """``train`` / ``test`` of each of this object's images in VisA's one-class split file, keyed by its path as the
    file writes it (relative to ``<VisA>``, so ``<object>/Data/...``), from ``<VisA>/split_csv/1cls.csv`` or a copy
    in the object's folder; empty when there is none. A file that is not VisA's (columns missing, a split other
    than train/test) is an error that names it."""
    for csv_path in (root.parent / VISA_SPLIT_CSV, root / VISA_SPLIT_CSV):
        if csv_path.is_file():
            break
    else:
        return {}
    prefix = f"{root.name}/"
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"split", "image"} - set(reader.fieldnames or ())
        if reader.fieldnames and missing:
            raise ValueError(
                f"{csv_path}: not a VisA split file, no column {sorted(missing)} "
                f"(expected object,split,label,image,mask)"
            )
        splits: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            split = (row.get("split") or "").strip().lower()
            if split not in ("train", "test"):
                raise ValueError(f"{csv_path}, line {line}: split {row.get('split')!r} is neither train nor test")
            image = (row.get("image") or "").strip().replace("\\", "/")
            if image.startswith(prefix):
                splits[image] = split
    return splits


#: Folders that hold the masks of the images beside them (DAGM 2007 keeps ``Train/Label/<id>_label.PNG``).
LABEL_FOLDERS = ("label", "labels", "gt", "ground_truth", "masks")


def _label_folder_masks(folder: Path) -> tuple[dict[str, Path], set[Path]]:
    """Masks kept in a ``Label/``-like sub-folder of ``folder``, by the stem of the image they belong to, and the
    folders they were found in (never scanned for parts)."""
    masks: dict[str, Path] = {}
    used: set[Path] = set()
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and d.name.lower() in LABEL_FOLDERS):
        used.add(sub)
        for p in list_images(sub):
            masks.setdefault(_masked_stem(p.stem) or p.stem, p)
    return masks, used


def _source_split(path: Path, root: Path) -> str:
    """``train`` / ``test`` when a folder on the way from ``root`` says so (KolektorSDD2, DAGM), else ``""``."""
    names = {part.lower() for part in path.relative_to(root).parts[:-1]}
    return "test" if "test" in names else "train" if "train" in names else ""


def scan_labelled_by_mask(root: str | Path) -> list[ImageRecord]:
    """Images anywhere under ``root`` whose masks say whether they are defective: a mask beside the image
    (``<id>_GT.png``, ``<id>_label.bmp``) or in a ``Label/`` folder beside it. An image with a mask is labelled
    by it at ingest (:data:`LABEL_BY_MASK`: an all-black mask is a good part, as KolektorSDD stores them); one
    without is good (DAGM keeps masks of its defective images only). Goods under a ``test`` folder stay test."""
    root = Path(root)
    records: list[ImageRecord] = []
    skip: set[Path] = set()
    for folder in folder_tree(root):
        if folder in skip or any(parent in skip for parent in folder.parents):
            continue
        in_label_folder, label_folders = _label_folder_masks(folder)
        skip |= label_folders
        for p, mask in images_and_masks(folder):
            mask = mask or in_label_folder.get(p.stem)
            records.append(
                ImageRecord(p, LABEL_BY_MASK if mask else 0, "defect" if mask else "good", _source_split(p, root), mask)
            )
    return records


def detect_layout(root: str | Path) -> str:
    """Which layout a dataset root is in: ``mvtec``, ``visa`` or ``masks`` (labelled by masks); raises
    FileNotFoundError naming the folder and what each layout needs when it is none of them."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if any((root / "train" / name).is_dir() for name in GOOD_FOLDERS):
        return "mvtec"
    if (root / VISA_IMAGES / "Normal").is_dir():
        return "visa"
    if any(r.mask for r in scan_labelled_by_mask(root)):
        return "masks"
    raise FileNotFoundError(
        f"{root}: no dataset layout found: expected train/good (or train/ok) with test/<defect> (MVTec AD), "
        "Data/Images/Normal and Data/Images/Anomaly (VisA), or images with masks beside them or in a Label/ folder "
        "(KolektorSDD, DAGM); for plain folders of good and defective images use --good DIR --defective DIR"
    )


def scan_layout(root: str | Path, layout: str) -> list[ImageRecord]:
    """All images of a dataset root in ``layout`` (what :func:`detect_layout` said of it)."""
    return (
        scan_mvtec(root) if layout == "mvtec" else scan_visa(root) if layout == "visa" else scan_labelled_by_mask(root)
    )


def scan_root(root: str | Path) -> list[ImageRecord]:
    """All images of a dataset root in any layout :func:`detect_layout` knows."""
    return scan_layout(root, detect_layout(root))


def scan_dataset(
    root: str | Path | None = None, good: str | Path | None = None, defective: str | Path | None = None
) -> list[ImageRecord]:
    """Either ``root`` (a dataset in a layout :func:`detect_layout` knows) or ``good`` [+ ``defective``] folders;
    exactly one of the two must be given."""
    if (root is None) == (good is None):
        raise ValueError(
            "give either a dataset root (MVTec layout) or a good-image folder (with an optional defective one)"
        )
    if root is not None:
        if defective is not None:
            raise ValueError("a defective folder goes with a good folder, not with a dataset root")
        return scan_root(root)
    return scan_folders(good, defective)  # type: ignore[arg-type]
