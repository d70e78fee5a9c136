"""Backbones: shapes, offline weights (ImageNet Lite0, local files, hub cache), freezing. No downloads anywhere."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.backbones import (
    BACKBONES,
    LITE_PACKAGES,
    TORCHVISION_IMAGENET_FILES,
    Backbone,
    build_backbone,
    freeze_stages,
    lite_imagenet_file,
    pretrained_preprocessing,
    required_input_multiple,
    resnet18,
    tf_efficientnet_lite0,
    tiny_cnn,
)


@pytest.fixture(autouse=True)
def _no_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch home per test: nothing may come from (or go to) the real cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.fixture(scope="module")
def lite0_imagenet() -> Backbone:
    return tf_efficientnet_lite0(weights="imagenet").eval()


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- shapes and registry --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_a_spatial_map(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    side = 70 if required_input_multiple(name) == 14 else 64  # a vision transformer takes whole 14-pixel patches
    with torch.no_grad():
        y = backbone(torch.randn(2, 3, side, side))
    assert y.dim() == 4 and y.shape[:2] == (2, backbone.out_channels)
    assert y.shape[2] >= 1 and y.shape[3] >= 1
    assert len(backbone.stages) >= 4
    # parameters keep the architecture's own names: no classifier left behind
    assert not any(k.startswith(("fc.", "classifier.")) for k in backbone.state_dict())


def test_tiny_cnn_width_and_non_square_input() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("tiny_cnn", width=8).eval()
    with torch.no_grad():
        y = backbone(torch.randn(1, 3, 96, 64))
    assert y.shape == (1, 64, 6, 4)  # 4 stride-2 blocks: /16; 8*width channels


def test_unknown_backbone_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="tf_efficientnet_lite0") as info:
        build_backbone("vgg16")
    assert "resnet18" in str(info.value) and "tiny_cnn" in str(info.value)
    with pytest.raises(ValueError, match="unknown backbone"):
        pretrained_preprocessing("vgg16")


def test_pretrained_preprocessing() -> None:
    assert pretrained_preprocessing("tf_efficientnet_lite0") == {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
    }
    for name in TORCHVISION_IMAGENET_FILES:
        p = pretrained_preprocessing(name)
        assert p["mean"] == (0.485, 0.456, 0.406) and p["std"] == (0.229, 0.224, 0.225)
        assert p["interpolation"] == "bilinear"
    assert pretrained_preprocessing("tiny_cnn")["mean"] == (0.5, 0.5, 0.5)
    assert set(pretrained_preprocessing("tiny_cnn")) == {"mean", "std", "interpolation"}


def test_imagenet_file_names_match_torchvision() -> None:
    # torchvision's own weight enums are read only for their URL here, to catch a renamed file; nothing downloads
    from torchvision import models as tvm

    enums = {
        "resnet18": tvm.ResNet18_Weights,
        "mobilenet_v3_small": tvm.MobileNet_V3_Small_Weights,
        "mobilenet_v3_large": tvm.MobileNet_V3_Large_Weights,
        "efficientnet_b0": tvm.EfficientNet_B0_Weights,
    }
    for name, enum in enums.items():
        assert TORCHVISION_IMAGENET_FILES[name] == enum.DEFAULT.url.rsplit("/", 1)[-1]


# --- ImageNet Lite0 -------------------------------------------------------------------------------------------


def _scene(seed: int, size: int = 160) -> np.ndarray:
    """A natural-ish RGB picture: shaded background, overlapping coloured discs, a little noise (HxWx3 in [0,1])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3)) + rng.uniform(0.2, 0.8, 3) * (0.5 + 0.5 * yy[..., None])
    for _ in range(12):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        img[((yy - cy) ** 2 + (xx - cx) ** 2) < r * r] = rng.uniform(0, 1, 3)
    return np.clip(img + 0.03 * rng.standard_normal(img.shape), 0, 1)


def _stripes(size: int = 160) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    s = (np.sin(0.9 * xx + 0.3 * yy) > 0).astype(float)
    return np.stack([s, 1 - s, 0.5 * s], axis=-1)


def _crop(img: np.ndarray, top: int, left: int, size: int = 128) -> torch.Tensor:
    """Crop → CHW float, normalised with Lite0's mean = std = 0.5."""
    return (torch.from_numpy(img[top : top + size, left : left + size]).permute(2, 0, 1).float() - 0.5) / 0.5


def _pooled_cosines(backbone: nn.Module) -> tuple[float, float, float]:
    """cos(crop, shifted crop of the same scene), cos(scene, other scene), cos(scene, stripes)."""
    scene, other = _scene(0), _scene(1)
    batch = torch.stack([_crop(scene, 0, 0), _crop(scene, 10, 12), _crop(other, 0, 0), _crop(_stripes(), 0, 0)])
    with torch.no_grad():
        f = F.normalize(backbone(batch).mean(dim=(2, 3)), dim=1)
    return float(f[0] @ f[1]), float(f[0] @ f[2]), float(f[0] @ f[3])


def test_lite0_imagenet_loads_the_shipped_file_strictly(lite0_imagenet: Backbone) -> None:
    raw = torch.load(lite_imagenet_file(), map_location="cpu", weights_only=True)
    assert len(raw) == 296
    state = lite0_imagenet.state_dict()
    assert len(state) == 294  # the same tensors minus the classifier
    torch.testing.assert_close(state["conv_stem.weight"], raw["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["bn2.running_var"], raw["_bn1.running_var"], rtol=0, atol=0)
    torch.testing.assert_close(state["blocks.3.0.conv_pw.weight"], raw["_blocks.5._expand_conv.weight"], rtol=0, atol=0)


def test_lite0_imagenet_features_are_really_pretrained(lite0_imagenet: Backbone) -> None:
    torch.manual_seed(0)
    random_init = tf_efficientnet_lite0().eval()
    stem = "conv_stem.weight"
    assert not torch.equal(random_init.state_dict()[stem], lite0_imagenet.state_dict()[stem])

    shifted, other_scene, stripes = _pooled_cosines(lite0_imagenet)
    # measured: 0.95, 0.84, 0.25. A shifted crop stays close; different pictures, and above all a different kind of
    # picture, are far.
    assert shifted > other_scene > stripes
    assert shifted > 0.9 and shifted - stripes > 0.4

    # random init maps everything to nearly the same direction (measured 0.99 / 0.98 / 0.98): no such structure
    r_shifted, _, r_stripes = _pooled_cosines(random_init)
    assert r_shifted - r_stripes < (shifted - stripes) / 2


def test_lite0_accepts_lukemelas_and_timm_named_files(lite0_imagenet: Backbone, tmp_path: Path) -> None:
    import timm

    from_lukemelas_path = tf_efficientnet_lite0(weights=lite_imagenet_file())
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # with its classifier
    full.load_state_dict(lite0_imagenet.state_dict(), strict=False)
    timm_file = tmp_path / "lite0_timm.pth"
    torch.save(full.state_dict(), timm_file)
    from_timm_path = tf_efficientnet_lite0(weights=str(timm_file))
    expected = lite0_imagenet.state_dict()
    for loaded in (from_lukemelas_path, from_timm_path):
        got = loaded.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


# --- local files and the hub cache ----------------------------------------------------------------------------


def test_resnet18_state_dict_round_trips_through_a_path(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = resnet18()
    for bn in (m for m in source.modules() if isinstance(m, _BatchNorm)):
        bn.running_mean.uniform_(-1, 1)  # non-default buffers must round-trip too
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("resnet18", weights=path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source.eval()(x))


def test_full_torchvision_state_dict_loads_with_its_classifier_ignored(tmp_path: Path) -> None:
    from torchvision.models import resnet18 as tv_resnet18

    torch.manual_seed(2)
    full = tv_resnet18(weights=None)
    path = tmp_path / "full.pth"
    torch.save(full.state_dict(), path)
    loaded = resnet18(weights=str(path))
    torch.testing.assert_close(loaded.state_dict()["layer4.1.conv2.weight"], full.state_dict()["layer4.1.conv2.weight"])


def test_tiny_cnn_round_trip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = tiny_cnn(width=8)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    loaded = tiny_cnn(weights=path, width=8)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(RuntimeError, match="tiny.pt"):
        tiny_cnn(weights=path, width=16)  # strict: a file for another width is refused, naming the file
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        tiny_cnn(weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        tiny_cnn(weights="imagenet")


def test_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "state_dict": tiny_cnn(width=8).state_dict()}, path)
    with pytest.raises(ValueError, match="not a plain state dict"):
        tiny_cnn(weights=path, width=8)


@pytest.mark.parametrize("name", sorted(TORCHVISION_IMAGENET_FILES))
def test_torchvision_imagenet_without_cache_is_a_clear_error(name: str) -> None:
    with pytest.raises(FileNotFoundError, match="pass weights=<local state-dict path>") as info:
        build_backbone(name, weights="imagenet")
    assert TORCHVISION_IMAGENET_FILES[name] in str(info.value)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_larger_lite_sizes_share_lite0_stages_and_name_their_weights_package(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # same stage indices and strides as Lite0, so feature_stages=(3, 4) means the same grid for every size
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shapes = [tuple(m.shape[-2:]) for m in _stage_outputs(build_backbone(name).eval(), x)]
        lite0 = [tuple(m.shape[-2:]) for m in _stage_outputs(build_backbone("tf_efficientnet_lite0").eval(), x)]
    assert shapes == lite0
    assert pretrained_preprocessing(name) == pretrained_preprocessing("tf_efficientnet_lite0")
    # the ImageNet file comes from a package a default install does not have: the error says which one
    package, _ = LITE_PACKAGES[name]
    monkeypatch.setitem(LITE_PACKAGES, name, (package, "no_such_module_for_this_test"))
    with pytest.raises(FileNotFoundError, match=package):
        build_backbone(name, weights="imagenet")


def _stage_outputs(backbone: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for stage in backbone.stages:
        x = stage(x)
        out.append(x)
    return out


def test_torchvision_imagenet_is_read_from_the_hub_cache(_no_hub_cache: Path) -> None:
    # the hub cache is where torchvision itself would have saved the download; a file placed there is used as is
    torch.manual_seed(4)
    cached = resnet18()
    checkpoints = _no_hub_cache / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(cached.state_dict(), checkpoints / TORCHVISION_IMAGENET_FILES["resnet18"])
    loaded = resnet18(weights="imagenet")
    torch.testing.assert_close(loaded.state_dict()["conv1.weight"], cached.state_dict()["conv1.weight"])


# --- freezing -------------------------------------------------------------------------------------------------


def _bn_modes(stage: nn.Module) -> set[bool]:
    return {m.training for m in stage.modules() if isinstance(m, _BatchNorm)}


def _grad_flags(stage: nn.Module) -> set[bool]:
    return {p.requires_grad for p in stage.parameters()}


def test_freeze_stages_freezes_the_early_stages_and_keeps_their_bn_in_eval() -> None:
    torch.manual_seed(0)
    backbone = tiny_cnn(width=8)
    freeze_stages(backbone, trainable_last=1)
    backbone.train()
    stages = backbone.stages
    assert [_grad_flags(s) for s in stages] == [{False}, {False}, {False}, {True}]
    assert [_bn_modes(s) for s in stages] == [{False}, {False}, {False}, {True}]

    frozen_stats = _params(stages[0])
    backbone(torch.randn(4, 3, 64, 64)).sum().backward()
    assert all(torch.equal(v, frozen_stats[k]) for k, v in stages[0].state_dict().items())  # stats untouched
    assert all(p.grad is None for p in stages[0].parameters())
    assert all(p.grad is not None for p in stages[3].parameters())

    # the rule holds when a parent module switches modes, too (the embedder wraps the backbone)
    wrapper = nn.Sequential(backbone, nn.Flatten())
    wrapper.eval()
    wrapper.train()
    assert [_bn_modes(s) for s in stages] == [{False}, {False}, {False}, {True}]
    wrapper.eval()
    assert _bn_modes(stages[3]) == {False}


@pytest.mark.parametrize(
    ("trainable_last", "expected"),
    [(0, [False] * 4), (-1, [True] * 4), (99, [True] * 4), (2, [False, False, True, True])],
)
def test_freeze_stages_counts(trainable_last: int, expected: list[bool]) -> None:
    backbone = tiny_cnn(width=8)
    freeze_stages(backbone, trainable_last)
    backbone.train()
    assert [_grad_flags(s) for s in backbone.stages] == [{flag} for flag in expected]
    assert [_bn_modes(s) for s in backbone.stages] == [{flag} for flag in expected]


def test_freeze_stages_can_be_undone_and_checks_its_input() -> None:
    backbone = tiny_cnn(width=8)
    freeze_stages(backbone, 0)
    freeze_stages(backbone, -1)
    backbone.train()
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(m.training for m in backbone.modules())
    with pytest.raises(ValueError, match="trainable_last"):
        freeze_stages(backbone, -2)
    with pytest.raises(TypeError, match="stages"):
        freeze_stages(nn.Linear(2, 2), 1)


def test_freeze_stages_on_resnet18_maps_to_its_layers() -> None:
    backbone = resnet18()
    freeze_stages(backbone, trainable_last=2)
    backbone.train()
    trainable = {name.split(".")[0] for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert not backbone.bn1.training and not backbone.layer2[1].bn2.training and backbone.layer4[0].bn1.training


def test_stages_follow_a_deepcopy() -> None:
    backbone = tiny_cnn(width=8)
    freeze_stages(backbone, 1)
    clone = copy.deepcopy(backbone)
    clone_modules = {id(m) for m in clone.modules()}
    assert all(id(stage) in clone_modules for stage in clone.stages)
    clone.train()
    assert _bn_modes(clone.stages[0]) == {False} and _bn_modes(clone.stages[3]) == {True}
