"""The demo data generator: MVTec layout, exact masks on the part, determinism, visible and small defects."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.demo_data import (
    DEFECT_TYPES,
    DemoDataset,
    add_defect,
    generate_demo_dataset,
    main,
    part_mask,
    render_good_part,
)

SMALL = dict(n_train_good=4, n_test_good=3, n_test_per_defect=3, height=64, width=72)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", seed=3, **SMALL)


def test_layout_and_counts(dataset: DemoDataset) -> None:
    root = dataset.root
    assert dataset.n_train_good == 4 and dataset.n_test_good == 3
    assert dataset.defect_counts == {kind: 3 for kind in DEFECT_TYPES}
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png", "003.png"]
    assert len(list((root / "test" / "good").glob("*.png"))) == 3
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(("good", *DEFECT_TYPES))
    assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
    for kind in DEFECT_TYPES:
        images = sorted(p.stem for p in (root / "test" / kind).glob("*.png"))
        masks = sorted(p.stem for p in (root / "ground_truth" / kind).glob("*.png"))
        assert images == ["000", "001", "002"]
        assert masks == [f"{s}_mask" for s in images]


def test_images_load_with_pillow(dataset: DemoDataset) -> None:
    for path in dataset.root.rglob("*.png"):
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.size == (72, 64)
            assert im.mode == ("L" if "ground_truth" in path.parts else "RGB")


def test_masks_are_binary_nonempty_and_on_the_part(dataset: DemoDataset) -> None:
    for kind in DEFECT_TYPES:
        for image_path in sorted((dataset.root / "test" / kind).glob("*.png")):
            mask = np.array(Image.open(dataset.root / "ground_truth" / kind / f"{image_path.stem}_mask.png"))
            image = np.array(Image.open(image_path))
            assert mask.shape == image.shape[:2]
            assert set(np.unique(mask)) == {0, 255}, (kind, image_path.name)
            # On the part: inside the flange's outer circle, never in the image corners (the table).
            ys, xs = np.nonzero(mask)
            r = np.hypot(ys - (mask.shape[0] - 1) / 2, xs - (mask.shape[1] - 1) / 2)
            assert r.max() <= 0.42 * min(mask.shape) * 1.05 + 4, (kind, image_path.name)


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_defect_changes_exactly_the_masked_part_pixels(kind: str) -> None:
    for i in range(6):
        rng = np.random.default_rng([42, i])
        good = render_good_part(rng, 96, 96)
        image, mask = add_defect(good, kind, rng)
        assert image.dtype == np.uint8 and image.shape == good.shape
        assert mask.dtype == bool and mask.shape == good.shape[:2] and mask.any()
        assert not (mask & ~part_mask(good)).any(), "defect outside the part"
        diff = np.abs(image.astype(np.int16) - good.astype(np.int16)).mean(axis=2)
        assert not diff[~mask].any(), "pixels changed outside the mask"
        assert diff[mask].mean() > 8.0, f"{kind} #{i} is invisible"


def test_small_and_large_defects_exist() -> None:
    areas: dict[str, list[float]] = {kind: [] for kind in DEFECT_TYPES}
    for kind in DEFECT_TYPES:
        for i in range(12):
            rng = np.random.default_rng([5, i])
            _, mask = add_defect(render_good_part(rng, 96, 96), kind, rng)
            areas[kind].append(mask.mean())
    for kind, fractions in areas.items():
        assert min(fractions) < 0.01, f"no small {kind}"
    assert max(max(f) for f in areas.values()) > 0.01, "no defect covers more than 1 % of the image"


def test_good_parts_vary_but_stay_the_same_part() -> None:
    parts = [render_good_part(np.random.default_rng(i), 96, 96).astype(np.float32) for i in range(6)]
    masks = [part_mask(p.astype(np.uint8)) for p in parts]
    for a, b, ma, mb in zip(parts, parts[1:], masks, masks[1:], strict=False):
        assert np.abs(a - b).mean() > 3.0, "good parts are pixel copies"
        iou = (ma & mb).sum() / (ma | mb).sum()
        assert iou > 0.5, "good parts differ too much in position"  # shifted a few px and turned a few degrees
        assert abs(int(ma.sum()) - int(mb.sum())) < 0.1 * ma.sum(), "good parts differ in size"
    for m in masks:
        assert 0.35 < m.mean() < 0.6  # the flange fills about half the frame
        assert not m[0, 0] and not m[-1, -1]  # on a dark table


def test_deterministic_by_seed(tmp_path: Path) -> None:
    kwargs = dict(n_train_good=2, n_test_good=1, n_test_per_defect=1, height=48, width=48)
    a = generate_demo_dataset(tmp_path / "a", seed=9, **kwargs)
    b = generate_demo_dataset(tmp_path / "b", seed=9, **kwargs)
    c = generate_demo_dataset(tmp_path / "c", seed=10, **kwargs)
    da, db, dc = _digest(a.root), _digest(b.root), _digest(c.root)
    assert da == db
    assert da.keys() == dc.keys()
    assert all(da[k] != dc[k] for k in da if "ground_truth" not in k)


def test_overwrites_only_its_own_files(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "train" / "good").mkdir(parents=True)
    keep = root / "train" / "good" / "notes.txt"
    keep.write_text("mine")
    stale = root / "train" / "good" / "000.png"
    stale.write_bytes(b"not a png")
    generate_demo_dataset(
        root, n_train_good=1, n_test_good=0, n_test_per_defect=1, height=32, width=32, defect_types=("pit",)
    )
    assert keep.read_text() == "mine"
    with Image.open(stale) as im:
        assert im.size == (32, 32)
    assert not list(root.rglob("*.tmp"))


def test_subset_of_defect_types_keeps_the_same_images(tmp_path: Path) -> None:
    kwargs = dict(n_train_good=0, n_test_good=0, n_test_per_defect=2, height=40, width=40)
    full = _digest(generate_demo_dataset(tmp_path / "full", **kwargs).root)
    part = _digest(generate_demo_dataset(tmp_path / "part", defect_types=("stain",), **kwargs).root)
    assert part and all(full[k] == v for k, v in part.items())


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown defect"):
        add_defect(render_good_part(np.random.default_rng(0), 32, 32), "dent", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown defect"):
        generate_demo_dataset("/nonexistent/never-written", defect_types=("dent",))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = [str(out), "--seed", "1", "--size", "40x48", "--train", "2", "--test-good", "1", "--per-defect", "1"]
    assert main(args) == 0
    assert "2 train good" in capsys.readouterr().out
    with Image.open(out / "train" / "good" / "001.png") as im:
        assert im.size == (48, 40)
    assert len(list((out / "ground_truth").rglob("*_mask.png"))) == len(DEFECT_TYPES)
    assert main([str(out), "--defects", "dent"]) == 2
    with pytest.raises(SystemExit):
        main([str(out), "--size", "abc"])
