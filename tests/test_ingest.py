"""The dataset path (`pipelines.data`) on real image files: bad files, duplicates, label conflicts, every layout,
dataset hash, split stability."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.layouts import scan_folders, scan_mvtec, scan_visa
from pipelines.data.manifest import Manifest, build_manifest, ingest, read_manifest, write_manifest
from pipelines.data.records import ImageRecord, capture_groups, group_by_regex
from pipelines.data.split import SplitFractions, assign_splits, split_roles, with_splits


def _image(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    """A small random RGB PNG (size = width, height), unique content per seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _plain_folders(root: Path, n_good: int, n_bad: int) -> tuple[Path, Path]:
    """``root/good`` and ``root/bad`` with that many distinct 8 × 8 images."""
    for i in range(n_good):
        _image(root / "good" / f"g{i:03d}.png", i, (8, 8))
    for i in range(n_bad):
        _image(root / "bad" / f"d{i:03d}.png", 1000 + i, (8, 8))
    return root / "good", root / "bad"


def _roles(manifest: Manifest, **kw: object) -> dict[str, str]:
    return {e.path: r for e, r in zip(manifest.entries, split_roles(manifest, **kw))}  # type: ignore[arg-type]


def test_bad_files_are_reported_by_path_and_left_out(tmp_path: Path, bad_images: dict[str, Path]) -> None:
    good_dir, bad_dir = tmp_path / "in" / "good", tmp_path / "in" / "defective"
    kept = [_image(good_dir / f"ok{i}.png", i) for i in range(3)] + [
        _image(bad_dir / "scratch" / "d0.png", 100, (20, 30))
    ]
    kept.append(Path(shutil.copy(bad_images["good"], good_dir / "fixture_good.png")))
    broken = {
        kind: Path(shutil.copy(bad_images[kind], good_dir / bad_images[kind].name))
        for kind in ("truncated", "empty", "text", "corrupt")
    }
    broken["huge"] = Path(
        shutil.copy(bad_images["huge"], bad_dir / "huge.png")
    )  # 12000 × 12000 px, over the pixel limit

    manifest = ingest(good=good_dir, defective=bad_dir)

    assert sorted(e.path for e in manifest.entries) == sorted(map(str, kept))
    rejected = {r.path: r for r in manifest.rejected}
    assert set(rejected) == {str(p) for p in broken.values()}
    assert all(r.kind == "invalid" and r.reason for r in rejected.values())
    assert "0 bytes" in rejected[str(broken["empty"])].reason
    assert "not an image" in rejected[str(broken["text"])].reason
    assert "over the limit" in rejected[str(broken["huge"])].reason and rejected[str(broken["huge"])].label == 1
    by_path = {e.path: e for e in manifest.entries}
    d0 = by_path[str(bad_dir / "scratch" / "d0.png")]
    assert (d0.label, d0.defect_type, d0.width, d0.height) == (1, "scratch", 20, 30)
    assert by_path[str(good_dir / "fixture_good.png")].width == 30  # the fixture's 40 × 30 (h × w) image
    assert manifest.summary()["rejected"] == 5 and manifest.source["layout"] == "folders"

    # a lower pixel limit turns the 20 × 30 image into a rejection too (the limit is a parameter, not a constant)
    small = build_manifest(scan_folders(good_dir, bad_dir), max_pixels=500)
    assert str(bad_dir / "scratch" / "d0.png") in {r.path for r in small.rejected}


def test_duplicates_kept_once_and_label_conflicts_rejected(tmp_path: Path) -> None:
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    a = _image(good_dir / "a.png", 1)
    b = Path(shutil.copy(a, good_dir / "b.png"))  # same bytes, same label → duplicate of a (first by path)
    c = Path(shutil.copy(a, good_dir / "c.png"))
    unique = _image(good_dir / "u.png", 2)
    clash = _image(good_dir / "x.png", 3)
    d = _image(bad_dir / "d.png", 4)
    clash_bad = Path(shutil.copy(clash, bad_dir / "x_defect.png"))  # same bytes labelled good and defective

    manifest = ingest(good=good_dir, defective=bad_dir)

    assert [e.path for e in manifest.entries] == [str(d), str(a), str(unique)]  # path order: tmp/bad < tmp/good
    assert [(x.path, x.duplicate_of) for x in manifest.duplicates] == [(str(b), str(a)), (str(c), str(a))]
    assert manifest.duplicates[0].sha256 == manifest.entries[1].sha256
    conflicts = {r.path: r for r in manifest.rejected}
    assert set(conflicts) == {str(clash), str(clash_bad)} and all(r.kind == "conflict" for r in conflicts.values())
    assert str(clash_bad) in conflicts[str(clash)].reason and "conflicting labels" in conflicts[str(clash)].reason

    # the same file given as good and as defective (overlapping folders) is a conflict too, not a crash
    overlap = build_manifest([ImageRecord(unique, 0, "good", ""), ImageRecord(unique, 1, "defect", "")])
    assert overlap.entries == [] and len(overlap.rejected) == 2


def test_mvtec_layout_and_manifest_round_trip(tmp_path: Path) -> None:
    from models.demo_data import generate_demo_dataset

    root = tmp_path / "mvtec"
    generate_demo_dataset(root, seed=0, n_train_good=14, n_test_good=2, n_test_per_defect=2, height=24, width=32)
    _image(root / "test" / "good" / "zz_broken.png", 0).write_bytes(b"\x89PNG\r\n\x1a\n broken")

    manifest = ingest(root=root)

    records = scan_mvtec(root)
    assert len(manifest.entries) == len(records) - 1 and [r.path for r in manifest.rejected] == [
        str(root / "test" / "good" / "zz_broken.png")
    ]
    goods = [e for e in manifest.entries if e.is_good]
    defects = [e for e in manifest.entries if not e.is_good]
    assert sum(e.source_split == "train" for e in goods) == 14 and sum(e.source_split == "test" for e in goods) == 2
    assert defects and all(e.mask and Path(e.mask).is_file() for e in defects)
    assert {e.defect_type for e in defects} == {p.name for p in (root / "test").iterdir() if p.name != "good"}
    assert all((e.width, e.height) == (32, 24) for e in manifest.entries)
    assert manifest.source["layout"] == "mvtec"

    out = write_manifest(with_splits(manifest), tmp_path / "artifacts" / "manifest.json")
    assert [p.name for p in out.parent.iterdir()] == ["manifest.json"]  # no temp file left behind
    again = read_manifest(out)
    assert again.dataset_hash == manifest.dataset_hash and [e.split for e in again.entries] == [
        e.split for e in with_splits(manifest).entries
    ]
    assert all(e.split for e in again.entries) and all(
        e.split == "test" for e in again.entries if e.source_split == "test" and e.is_good
    )
    assert Manifest.from_json(manifest.to_json()) == manifest
    tampered = json.loads(out.read_text())
    tampered["entries"][0]["label"] = 1 - tampered["entries"][0]["label"]
    with pytest.raises(ValueError, match="does not match"):
        Manifest.from_dict(tampered)

    split = assign_splits(manifest, SplitFractions(calibration_fraction=0.2))
    assert all(r.source_split == "test" for r in split.test if r.is_good)
    assert len(split.train_good) + len(split.calibration_good) == 14


def test_dataset_hash_ignores_names_and_order_but_not_content(tmp_path: Path) -> None:
    files = [_image(tmp_path / "a" / f"img{i}.png", i) for i in range(5)]
    records = [ImageRecord(p, int(i >= 3), "good" if i < 3 else "dent", "") for i, p in enumerate(files)]
    base = build_manifest(records)

    (tmp_path / "b").mkdir()
    renamed = [Path(shutil.copy(p, tmp_path / "b" / f"renamed_{9 - i}.png")) for i, p in enumerate(files)]
    moved = [ImageRecord(q, r.label, r.defect_type, r.source_split) for q, r in zip(renamed, records)][::-1]
    assert build_manifest(moved).dataset_hash == base.dataset_hash

    _image(renamed[0], 1000)  # one image's content changes
    assert build_manifest(moved).dataset_hash != base.dataset_hash
    relabelled = [ImageRecord(r.path, r.label, "scratch" if r.label else "good", "") for r in records]
    assert build_manifest(relabelled).dataset_hash != base.dataset_hash
    assert build_manifest(records).dataset_hash == base.dataset_hash  # idempotent


def test_adding_images_never_moves_old_ones(tmp_path: Path) -> None:
    good_dir, bad_dir = _plain_folders(tmp_path, 40, 16)
    fractions = SplitFractions(calibration_fraction=0.25, defect_train_fraction=0.5, defect_val_fraction=0.2, seed=3)
    before = _roles(ingest(good=good_dir, defective=bad_dir), fractions=fractions)
    assert set(before.values()) == {"train", "calibration", "train_defective", "validation", "test"}

    for i in range(40, 70):  # new goods sort before and after the old names
        _image(good_dir / f"{'a' if i % 2 else 'z'}{i:03d}.png", i, (8, 8))
    for i in range(16, 26):
        _image(bad_dir / f"c{i:03d}.png", 1000 + i, (8, 8))
    after = _roles(ingest(good=good_dir, defective=bad_dir), fractions=fractions)
    assert len(after) == len(before) + 40
    assert {p: after[p] for p in before} == before

    # keyed by content: a renamed file keeps its role
    old = good_dir / "g000.png"
    old.rename(good_dir / "renamed.png")
    assert (
        _roles(ingest(good=good_dir, defective=bad_dir), fractions=fractions)[str(good_dir / "renamed.png")]
        == before[str(old)]
    )

    # the DataSplit the training steps take holds every kept image exactly once
    manifest = ingest(good=good_dir, defective=bad_dir)
    split = assign_splits(manifest, fractions)
    placed = (
        split.train_good
        + split.calibration_good
        + split.validation_defective
        + [r.path for r in split.train_defective + split.test]
    )
    assert sorted(map(str, placed)) == sorted(e.path for e in manifest.entries)


def test_capture_groups_stay_together(tmp_path: Path) -> None:
    good_dir = tmp_path / "good"
    for session in range(12):
        for shot in range(3):
            _image(good_dir / f"s{session:02d}_{shot}.png", 10 * session + shot, (8, 8))
    by_session = group_by_regex(r"^(s\d+)_")
    manifest = ingest(good=good_dir, group_of=by_session)
    assert {e.group for e in manifest.entries} == {f"s{i:02d}" for i in range(12)}
    roles = _roles(manifest, fractions=SplitFractions(calibration_fraction=0.4))
    per_session: dict[str, set[str]] = {}
    for path, role in roles.items():
        per_session.setdefault(by_session(Path(path)), set()).add(role)
    assert all(len(r) == 1 for r in per_session.values())
    assert {next(iter(r)) for r in per_session.values()} == {
        "train",
        "calibration",
        "test",
    }  # plain folders keep test goods
    # a group function given at split time overrides the recorded groups
    plain = ingest(good=good_dir)
    assert _roles(plain, fractions=SplitFractions(calibration_fraction=0.4), group_of=by_session) == roles


def test_masks_found_by_either_name_kept_as_0_1_and_left_out_with_a_warning_when_empty_or_misshapen(
    tmp_path: Path,
) -> None:
    from models.demo_data import generate_demo_dataset

    root = tmp_path / "mvtec"
    generate_demo_dataset(root, seed=0, n_train_good=4, n_test_good=2, n_test_per_defect=2, height=24, width=32)
    masks = sorted((root / "ground_truth").rglob("*_mask.png"))
    ones, empty = masks[0], masks[1]
    Image.fromarray((np.asarray(Image.open(ones).convert("L")) > 0).astype(np.uint8)).save(
        ones
    )  # 0/1, as some datasets ship
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(empty)
    same_name = masks[2].with_name(masks[2].stem.removesuffix("_mask") + ".bmp")  # BTAD / converted VisA naming
    Image.open(masks[2]).save(same_name)
    masks[2].unlink()
    wrong_shape = masks[3]
    Image.open(wrong_shape).resize((24, 24)).save(wrong_shape)
    manifest = ingest(root=root)
    by_image = {(Path(e.path).parent.name, Path(e.path).stem): e.mask for e in manifest.entries if not e.is_good}
    assert by_image[(ones.parent.name, ones.stem.removesuffix("_mask"))] == str(ones)
    assert by_image[(empty.parent.name, empty.stem.removesuffix("_mask"))] is None
    assert [w for w in manifest.warnings if str(empty) in w and "marks no pixel" in w]
    assert not [w for w in manifest.warnings if str(ones) in w]
    assert by_image[(same_name.parent.name, same_name.stem)] == str(same_name)
    assert by_image[(wrong_shape.parent.name, wrong_shape.stem.removesuffix("_mask"))] is None
    assert [w for w in manifest.warnings if str(wrong_shape) in w and "24x24, the image 32x24" in w]


def test_btad_ok_folders_and_validation_goods_are_read(tmp_path: Path) -> None:
    """BTAD names its good parts ``ok`` and stores masks under the image's own name; MVTec AD 2 and LOCO add a
    ``validation/good`` folder of goods the product may train and calibrate on."""
    btad = tmp_path / "btad"
    train = [_image(btad / "train" / "ok" / f"{i:04d}.bmp", i) for i in range(4)]
    test_ok = _image(btad / "test" / "ok" / "0100.bmp", 100)
    bad = _image(btad / "test" / "ko" / "0200.bmp", 200)
    mask = np.zeros((16, 24), np.uint8)
    mask[4:8, 4:12] = 255
    (btad / "ground_truth" / "ko").mkdir(parents=True)
    Image.fromarray(mask).save(btad / "ground_truth" / "ko" / "0200.png")
    manifest = ingest(root=btad)
    rows = {Path(e.path): e for e in manifest.entries}
    assert all(rows[p].is_good and rows[p].source_split == "train" for p in train)
    assert rows[test_ok].is_good and rows[test_ok].defect_type == "good" and rows[test_ok].source_split == "test"
    assert (
        not rows[bad].is_good
        and rows[bad].defect_type == "ko"
        and rows[bad].mask == str(btad / "ground_truth" / "ko" / "0200.png")
    )
    assert all(r.source_split == "test" for r in assign_splits(manifest).test if r.is_good)

    mvtec2 = tmp_path / "mvtec2"
    kept = [_image(mvtec2 / "train" / "good" / f"{i}.png", 300 + i) for i in range(3)]
    kept += [_image(mvtec2 / "validation" / "good" / f"{i}.png", 400 + i) for i in range(2)]
    assert sorted(r.path for r in scan_mvtec(mvtec2)) == sorted(kept)
    with pytest.raises(FileNotFoundError, match="train/good"):
        scan_mvtec(tmp_path / "nothing")


def test_masks_stored_beside_their_images_are_masks_not_parts(tmp_path: Path) -> None:
    """KolektorSDD2 keeps ``<id>_GT.png`` beside every ``<id>.png`` (KolektorSDD ``<id>_label.bmp``): such files are
    the defective image's mask, and skipped among the goods, never ingested as parts."""
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    goods = [_image(good_dir / f"{i}.png", i) for i in range(3)]
    for i in range(3):
        Image.fromarray(np.zeros((16, 24), np.uint8)).save(good_dir / f"{i}_GT.png")
    bad = _image(bad_dir / "scratch" / "7.png", 7)
    mask = np.zeros((16, 24), np.uint8)
    mask[2:6, 3:9] = 255
    Image.fromarray(mask).save(bad_dir / "scratch" / "7_label.bmp")
    lone = _image(bad_dir / "scratch" / "solo_gt.png", 8)  # no image named "solo": a part, not a mask
    records = scan_folders(good_dir, bad_dir)
    assert sorted(r.path for r in records if r.is_good) == goods
    defects = {r.path: r.mask for r in records if not r.is_good}
    assert defects == {bad: bad_dir / "scratch" / "7_label.bmp", lone: None}
    manifest = build_manifest(records)
    assert not manifest.rejected and not manifest.warnings
    assert {Path(e.path): e.mask for e in manifest.entries if not e.is_good}[bad] == str(
        bad_dir / "scratch" / "7_label.bmp"
    )


def test_plain_folders_are_read_however_deep(tmp_path: Path) -> None:
    """Goods kept by date and camera (``good/<date>/<camera>/``) are all goods; a defect type's own sub-folders
    stay that type; hidden folders are skipped."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    goods = [
        _image(good / "top.png", 0),
        _image(good / "2026-11-30" / "cam1" / "a.png", 1),
        _image(good / "2026-12-01" / "b.png", 2),
    ]
    _image(good / ".thumbs" / "t.png", 3)
    crack = [_image(bad / "crack" / "c.png", 4), _image(bad / "crack" / "night" / "d.png", 5)]
    loose = _image(bad / "e.png", 6)
    records = scan_folders(good, bad)
    assert sorted(r.path for r in records if r.is_good) == sorted(goods)
    assert {r.path: r.defect_type for r in records if not r.is_good} == {
        crack[0]: "crack",
        crack[1]: "crack",
        loose: "defect",
    }


def test_mvtec_ad_2_test_public_with_its_own_ground_truth(tmp_path: Path) -> None:
    """MVTec AD 2: ``test_public/good``, ``test_public/bad`` and the masks in ``test_public/ground_truth/bad``
    (never a defect type of its own); ``test_private`` (unlabelled) is not read."""
    root = tmp_path / "can"
    _image(root / "train" / "good" / "000_regular.png", 0)
    good = _image(root / "test_public" / "good" / "000_regular.png", 1)
    bad = _image(root / "test_public" / "bad" / "000_overexposed.png", 2)
    mask = np.zeros((16, 24), np.uint8)
    mask[3:9, 5:11] = 255
    (root / "test_public" / "ground_truth" / "bad").mkdir(parents=True)
    Image.fromarray(mask).save(root / "test_public" / "ground_truth" / "bad" / "000_overexposed_mask.png")
    _image(root / "test_private" / "000.png", 3)
    records = {r.path: r for r in scan_mvtec(root)}
    assert len(records) == 3 and records[good].is_good and records[good].source_split == "test"
    assert (
        records[bad].defect_type == "bad"
        and records[bad].mask == root / "test_public" / "ground_truth" / "bad" / "000_overexposed_mask.png"
    )


def test_mvtec_loco_mask_folders_are_joined(tmp_path: Path) -> None:
    """MVTec LOCO keeps one mask file per defect region in ``ground_truth/<type>/<image>/``: the image's mask is
    their union; masks of different sizes in one folder are an error naming the file."""
    from inspector.errors import ImageError
    from inspector.preprocess import open_mask

    root = tmp_path / "loco"
    _image(root / "train" / "good" / "000.png", 0)
    _image(root / "validation" / "good" / "000.png", 1)
    bad = _image(root / "test" / "logical_anomalies" / "000.png", 2)
    folder = root / "ground_truth" / "logical_anomalies" / "000"
    folder.mkdir(parents=True)
    regions = [np.zeros((16, 24), np.uint8) for _ in range(2)]
    regions[0][1:4, 1:5] = 255
    regions[1][10:14, 15:20] = 255
    for i, r in enumerate(regions):
        Image.fromarray(r).save(folder / f"{i:03d}.png")
    records = {r.path: r for r in scan_mvtec(root)}
    assert records[bad].mask == folder
    manifest = ingest(root=root)
    assert not manifest.warnings and {Path(e.path): e.mask for e in manifest.entries}[bad] == str(folder)
    assert np.array_equal(np.asarray(open_mask(folder)) > 0, (regions[0] > 0) | (regions[1] > 0))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "002.png")
    with pytest.raises(ImageError, match="8x8") as info:
        open_mask(folder)
    assert str(folder / "002.png") in str(info.value)


def _mask(path: Path, size: tuple[int, int], box: tuple[int, int, int, int] | None) -> Path:
    """A 0/255 mask (size = width, height) marking ``box`` (x0, y0, x1, y1), or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    marked = np.zeros((size[1], size[0]), np.uint8)
    if box:
        marked[box[1] : box[3], box[0] : box[2]] = 255
    Image.fromarray(marked).save(path)
    return path


def test_plain_folders_keep_goods_for_test_and_mvtec_keeps_its_own(tmp_path: Path) -> None:
    good_dir, bad_dir = _plain_folders(tmp_path, 60, 12)
    fractions = SplitFractions(calibration_fraction=0.2, good_test_fraction=0.2)
    split = assign_splits(ingest(good=good_dir, defective=bad_dir), fractions)
    test_goods = [r for r in split.test if r.is_good]
    assert 4 <= len(test_goods) <= 24  # about a fifth of 60: without them the test AUROC is undefined
    assert len(split.train_good) + len(split.calibration_good) + len(test_goods) == 60
    with pytest.raises(ValueError, match="no good parts to train on"):
        split_roles(ingest(good=good_dir), SplitFractions(calibration_fraction=0.5, good_test_fraction=0.5))

    from models.demo_data import generate_demo_dataset

    root = tmp_path / "mvtec"
    generate_demo_dataset(root, seed=0, n_train_good=30, n_test_good=3, n_test_per_defect=1, height=16, width=16)
    split = assign_splits(ingest(root=root), fractions)
    assert sorted(r.path.parent.name for r in split.test if r.is_good) == ["good"] * 3
    assert all(r.source_split == "test" for r in split.test if r.is_good)  # MVTec's own test goods, no train good moved


def test_visa_layout(tmp_path: Path) -> None:
    root = tmp_path / "candle"
    images, masks = root / "Data" / "Images", root / "Data" / "Masks" / "Anomaly"
    goods = [_image(images / "Normal" / f"{i:04d}.JPG", i, (20, 16)) for i in range(5)]
    bads = [_image(images / "Anomaly" / f"{i:03d}.JPG", 100 + i, (20, 16)) for i in range(3)]
    for i, bad in enumerate(bads[:2]):
        _mask(masks / f"{bad.stem}.png", (20, 16), (i, 2, 8 + i, 9))
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n")

    manifest = ingest(root=root)

    assert manifest.source["layout"] == "visa"
    by_path = {Path(e.path): e for e in manifest.entries}
    assert set(by_path) == set(goods + bads)
    assert [by_path[g].label for g in goods] == [0] * 5
    assert [(by_path[b].label, by_path[b].defect_type) for b in bads] == [(1, "defect")] * 3
    assert [by_path[b].mask for b in bads] == [str(masks / f"{b.stem}.png") for b in bads[:2]] + [None]

    from pipelines.promotion import gate_set_from_folder

    gate = gate_set_from_folder(root, tmp_path / "gate.json")  # a VisA object is a valid promotion gate set too
    assert gate.manifest.dataset_hash == manifest.dataset_hash and gate.path.is_file()


def test_visa_keeps_its_own_split_file(tmp_path: Path) -> None:
    """VisA's split_csv/1cls.csv (beside the object folders, paths relative to them) decides which goods are test."""
    visa = tmp_path / "VisA"
    root = visa / "candle"
    images = root / "Data" / "Images"
    goods = [_image(images / "Normal" / f"{i:04d}.JPG", i, (20, 16)) for i in range(10)]
    bads = [_image(images / "Anomaly" / f"{i:03d}.JPG", 100 + i, (20, 16)) for i in range(3)]
    test_goods = goods[7:]
    rows = ["object,split,label,image,mask"]
    rows += [f"candle,{'test' if g in test_goods else 'train'},normal,{g.relative_to(visa).as_posix()}," for g in goods]
    rows += [f"candle,test,anomaly,{b.relative_to(visa).as_posix()}," for b in bads]
    rows += ["pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,"]  # another object's row: not this dataset's
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")

    manifest = ingest(root=root)
    by_path = {Path(e.path): e for e in manifest.entries}
    assert [by_path[g].source_split for g in goods] == ["train"] * 7 + ["test"] * 3
    split = assign_splits(manifest, SplitFractions(calibration_fraction=0.3, good_test_fraction=0.2))
    assert sorted(r.path for r in split.test if r.is_good) == test_goods  # VisA's own, none drawn from its train goods

    (visa / "split_csv" / "1cls.csv").write_text(
        "object,label,image\ncandle,normal,candle/Data/Images/Normal/0000.JPG\n"
    )
    with pytest.raises(ValueError, match=r"1cls.csv: not a VisA split file.*'split'"):
        scan_visa(root)
    (visa / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\ncandle,val,normal,x.JPG,\n")
    with pytest.raises(ValueError, match=r"1cls.csv, line 2: split 'val'"):
        scan_visa(root)


def test_datasets_labelled_by_their_masks(tmp_path: Path) -> None:
    """KolektorSDD2 keeps ``<id>_GT.png`` beside every image, black for a good part; DAGM 2007 keeps
    ``Label/<id>_label.PNG`` for its defective images only. Both read from ``--data ROOT``."""
    ksdd = tmp_path / "ksdd2"
    marked = [
        _image(ksdd / split / f"{10 * i + j}.png", 10 * i + j, (16, 24))
        for i, split in enumerate(("train", "test"))
        for j in range(2)
    ]
    black = [
        _image(ksdd / split / f"{10 * i + j + 5}.png", 50 + 10 * i + j, (16, 24))
        for i, split in enumerate(("train", "test"))
        for j in range(3)
    ]
    for p in marked:
        _mask(p.with_name(f"{p.stem}_GT.png"), (16, 24), (2, 2, 9, 9))
    for p in black:
        _mask(p.with_name(f"{p.stem}_GT.png"), (16, 24), None)
    unreadable = _image(ksdd / "train" / "99.png", 99, (16, 24))
    unreadable.with_name("99_GT.png").write_bytes(b"not a png")

    manifest = ingest(root=ksdd)

    assert manifest.source["layout"] == "masks"
    by_path = {Path(e.path): e for e in manifest.entries}
    assert set(by_path) == set(marked + black)  # no mask became a part
    assert all(by_path[p].label == 1 and by_path[p].mask == str(p.with_name(f"{p.stem}_GT.png")) for p in marked)
    assert all(by_path[p].label == 0 and by_path[p].defect_type == "good" and by_path[p].mask is None for p in black)
    assert {p.parent.name for p in black if by_path[p].source_split == "test"} == {"test"}
    assert [by_path[p].source_split for p in black] == ["train"] * 3 + ["test"] * 3
    (rejected,) = manifest.rejected
    assert rejected.path == str(unreadable) and "99_GT.png" in rejected.reason and "unknown" in rejected.reason
    assert not manifest.warnings  # an all-black mask of a good part is not a problem

    dagm = tmp_path / "Class1"
    parts = [_image(dagm / "Train" / f"{i:04d}.PNG", 200 + i, (16, 16)) for i in range(1, 6)]
    _mask(dagm / "Train" / "Label" / "0002_label.PNG", (16, 16), (4, 4, 12, 12))
    (dagm / "Train" / "Label" / "Labels.txt").write_text("5\n")

    manifest = ingest(root=dagm)

    labels = {Path(e.path).name: (e.label, e.mask) for e in manifest.entries}
    assert labels == {
        "0001.PNG": (0, None),
        "0002.PNG": (1, str(dagm / "Train" / "Label" / "0002_label.PNG")),
        "0003.PNG": (0, None),
        "0004.PNG": (0, None),
        "0005.PNG": (0, None),
    }
    assert len(parts) == 5 and not manifest.rejected


def test_unknown_dataset_layout_says_what_it_reads(tmp_path: Path) -> None:
    _image(tmp_path / "pics" / "a.png", 0)
    with pytest.raises(FileNotFoundError, match=r"pics: no dataset layout found.*MVTec AD.*VisA.*--good DIR"):
        ingest(root=tmp_path / "pics")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        ingest(root=tmp_path / "missing")


def test_folders_as_capture_groups_and_too_few_groups_refused(tmp_path: Path) -> None:

    good_dir = tmp_path / "good"
    for day in range(16):
        for shot in range(3):
            _image(good_dir / f"2026-11-{day + 1:02d}" / f"cam1_{shot}.png", 10 * day + shot, (8, 8))
    records = scan_folders(good_dir)
    groups = capture_groups(records, by_folder=True)
    assert groups is not None and len(set(groups.values())) == 16
    split = assign_splits(build_manifest(records, group_of=groups))
    role_of = {
        **{p: "train" for p in split.train_good},
        **{p: "calibration" for p in split.calibration_good},
        **{r.path: "test" for r in split.test},
    }
    per_day: dict[str, set[str]] = {}
    for path, role in role_of.items():
        per_day.setdefault(path.parent.name, set()).add(role)
    assert all(len(roles) == 1 for roles in per_day.values())  # a day's captures never straddle train and calibration
    assert set().union(*per_day.values()) == {"train", "calibration", "test"}
    # both groupings at once: frames within a folder
    moved = capture_groups(
        [replace(r, path=Path(str(r.path).replace(str(tmp_path), "/elsewhere/data"))) for r in records], by_folder=True
    )
    assert moved is not None and sorted(moved.values()) == sorted(
        groups.values()
    )  # keyed inside the dataset, not by where it lies
    both = capture_groups(records, r"_(\d+)\.png", 0, by_folder=True)
    assert both is not None and len(set(both.values())) == 48 and capture_groups(records) is None

    few = [r for r in records if r.path.parent.name in ("2026-11-01", "2026-11-02")]
    with pytest.raises(ValueError, match=r"6 good images form 2 capture group\(s\).*none fell to"):
        assign_splits(build_manifest(few, group_of=groups))


def test_latest_captures_as_the_test_goods(tmp_path: Path) -> None:
    good_dir = tmp_path / "good"
    for day in range(1, 11):  # day 10 sorts after day 9 only by number
        for shot in range(4):
            _image(good_dir / f"day{day}" / f"{shot}.png", 10 * day + shot, (8, 8))
    for i in range(6):
        _image(tmp_path / "bad" / f"d{i}.png", 500 + i, (8, 8))
    records = scan_folders(good_dir, tmp_path / "bad")
    manifest = build_manifest(records, group_of=capture_groups(records, by_folder=True))

    split = assign_splits(manifest, SplitFractions(good_test_fraction=0.2, good_test_split="latest"))

    assert sorted({r.path.parent.name for r in split.test if r.is_good}) == ["day10", "day9"]  # the last two of ten
    earlier = {p.parent.name for p in split.train_good + split.calibration_good}
    assert earlier == {f"day{d}" for d in range(1, 9)} and split.calibration_good
    hashed = assign_splits(manifest, SplitFractions(good_test_fraction=0.2))
    assert {r.path.parent.name for r in hashed.test if r.is_good} != {"day9", "day10"}
    with pytest.raises(ValueError, match="good_test_split"):
        split_roles(manifest, SplitFractions(good_test_split="newest"))


def test_a_defect_type_folder_is_not_a_capture_group(tmp_path: Path) -> None:
    """Grouped by folder, every scratch photo would land on one side of the split: scratches all trained on and
    never tested, or never trained on. Type folders stay ungrouped; their own dated sub-folders are groups."""
    for day in range(3):
        _image(tmp_path / "good" / f"day{day}" / "a.png", day, (8, 8))
    scratches = [_image(tmp_path / "bad" / "scratch" / f"s{i}.png", 100 + i, (8, 8)) for i in range(4)]
    dents = [_image(tmp_path / "bad" / "dent" / "2026-11-30" / f"d{i}.png", 200 + i, (8, 8)) for i in range(2)]
    records = scan_folders(tmp_path / "good", tmp_path / "bad")
    groups = capture_groups(records, by_folder=True)
    assert groups is not None
    assert [groups[p] for p in scratches] == [""] * 4  # each its own group, split by content
    assert {groups[p] for p in dents} == {"bad/dent/2026-11-30"}
    assert {groups[r.path] for r in records if r.is_good} == {"good/day0", "good/day1", "good/day2"}
