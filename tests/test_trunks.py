"""The larger trunks (Wide ResNet-50-2, DINOv2 ViT-S/14 and ViT-B/14) on weights files this test writes itself: random
values in the shapes and names of the real files (torchvision's, timm's Hugging Face copy, Meta's own), so the
loading code is tested although this machine cannot fetch the real weights. Nothing downloads: the one download
test fetches a local file through a file:// URL."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from inspector.bundle import load_bundle
from inspector.engine import Inspector, OnnxEmbedder
from inspector.heatmap import score_with_maps
from inspector.preprocess import Preprocessor, load_image
from models.backbones import (
    DINOV2_FILES,
    PATCH_READING,
    TORCHVISION_IMAGENET_FILES,
    PretrainedFile,
    build_backbone,
    pretrained_file,
    vit_base_patch14_dinov2,
    vit_small_patch14_dinov2,
    wide_resnet50_2,
)
from models.siamese import PatchEmbedder, build_embedder
from pipelines.bundle_building import build_bundle
from pipelines.data.split import DataSplit
from pipelines.recipe import Recipe
from pipelines.settings import apply_overrides

VIT_S, VIT_B, WRN = "vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "wide_resnet50_2"


def random_state(shapes: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Seeded random values in the given tensors' shapes, of sane scale: a forward pass through 50 layers stays
    finite and far from zero (BatchNorm variances positive, weights ~ 1/sqrt(fan-in), norm scales near 1)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for name, tensor in shapes.items():
        if not tensor.is_floating_point():
            out[name] = torch.zeros_like(tensor)  # num_batches_tracked
        elif name.endswith("running_var"):
            out[name] = torch.rand(tensor.shape, generator=g) + 0.5
        elif tensor.dim() >= 2 and not name.endswith(("cls_token", "pos_embed", "mask_token")):
            out[name] = torch.randn(tensor.shape, generator=g) / tensor[0].numel() ** 0.5
        elif name.endswith(("weight", "gamma")):
            out[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=g)
        else:
            out[name] = 0.1 * torch.randn(tensor.shape, generator=g)
    return out


def _timm_state(arch: str) -> dict[str, Tensor]:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0).state_dict()


@pytest.fixture(autouse=True)
def _empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty torch hub and Hugging Face caches per test: nothing may come from (or go to) the real ones."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))


@pytest.fixture(scope="module")
def wrn_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """torchvision's Wide ResNet-50-2 state dict, classifier included, as the hub file holds it."""
    from torchvision.models import wide_resnet50_2 as torchvision_wrn

    path = tmp_path_factory.mktemp("wrn") / TORCHVISION_IMAGENET_FILES[WRN]
    torch.save(random_state(torchvision_wrn(weights=None).state_dict(), seed=1), path)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def vit_s_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """timm's ViT-S/14 DINOv2 state dict as its Hugging Face repo holds it (safetensors)."""
    path = tmp_path_factory.mktemp("vit_s") / "model.safetensors"
    save_file(random_state(_timm_state(VIT_S), seed=2), str(path))
    yield path
    path.unlink()


def _equal_to_file(backbone: torch.nn.Module, state: Mapping[str, Tensor], names: list[str]) -> None:
    loaded = backbone.state_dict()
    for name in names:
        assert torch.equal(loaded[name], state[name]), name


def test_wide_resnet_loads_a_torchvision_file_strictly_and_refuses_a_resnet50_one(
    wrn_file: Path, tmp_path: Path
) -> None:
    state = torch.load(wrn_file, weights_only=True)
    backbone = wide_resnet50_2(weights=str(wrn_file))
    _equal_to_file(backbone, state, ["conv1.weight", "layer2.3.bn3.running_var", "layer4.2.conv3.weight"])
    assert not any(k.startswith("fc.") for k in backbone.state_dict())  # the classifier is left out
    # the classic mix-up: ResNet-50 has the same tensor names, narrower layers
    from torchvision.models import resnet50

    wrong = tmp_path / "resnet50-0676ba61.pth"
    torch.save(resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(
        RuntimeError, match=r"resnet50-0676ba61\.pth.*layer1\.0\.conv1\.weight has shape \(64, 64, 1, 1\)"
    ):
        wide_resnet50_2(weights=wrong)


def test_vit_small_loads_timm_safetensors_and_vit_base_refuses_it_by_name(vit_s_file: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(vit_s_file))
    backbone = vit_small_patch14_dinov2(weights=vit_s_file)
    _equal_to_file(backbone, state, ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.ls2.gamma"])
    assert set(backbone.state_dict()) == set(state)  # timm's names, every one
    with pytest.raises(RuntimeError, match=r"model\.safetensors.*cls_token has shape \(1, 1, 384\).*\(1, 1, 768\)"):
        vit_base_patch14_dinov2(weights=vit_s_file)


def test_vit_base_loads_metas_file_from_the_torch_hub_cache(tmp_path: Path) -> None:
    # Meta's own file (what torch.hub.load('facebookresearch/dinov2', ...) caches) also holds the mask token
    state = random_state({**_timm_state(VIT_B), "mask_token": torch.zeros(1, 768)}, seed=3)
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / DINOV2_FILES[VIT_B].hub_file)
    backbone = vit_base_patch14_dinov2(weights="imagenet")
    _equal_to_file(backbone, state, ["pos_embed", "blocks.11.mlp.fc2.weight", "norm.bias"])
    assert "mask_token" not in backbone.state_dict()


def test_pretrained_files_are_found_in_either_cache_and_their_absence_says_where_to_put_them(tmp_path: Path) -> None:
    hf_repo = tmp_path / "hf_hub" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    with pytest.raises(FileNotFoundError) as info:
        pretrained_file(VIT_S)
    message = str(info.value)
    for expected in ("dinov2_vits14_pretrain.pth", str(tmp_path / "torch_home" / "hub" / "checkpoints")):
        assert expected in message
    assert "--set embedder.weights=PATH" in message and "--allow-download" in message
    # timm's copy, where huggingface_hub would have cached it
    (hf_repo / "refs").mkdir(parents=True)
    (hf_repo / "refs" / "main").write_text("abc123")
    snapshot = hf_repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    assert pretrained_file(VIT_S) == snapshot / "model.safetensors"
    # Meta's file in the torch hub cache comes first
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "dinov2_vits14_pretrain.pth").write_bytes(b"")
    assert pretrained_file(VIT_S) == hub / "dinov2_vits14_pretrain.pth"


def test_names_and_urls_match_the_libraries_own() -> None:
    import timm
    from torchvision.models import Wide_ResNet50_2_Weights

    assert Wide_ResNet50_2_Weights.IMAGENET1K_V1.url.endswith("/" + TORCHVISION_IMAGENET_FILES[WRN])
    for arch, source in DINOV2_FILES.items():
        cfg = timm.models.get_pretrained_cfg(arch)  # timm's default tag, the LVD-142M weights
        assert cfg is not None and (source.url, source.hf_repo) == (cfg.url, cfg.hf_hub_id)
        assert source.url.endswith("/" + source.hub_file)


def test_a_download_happens_only_when_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = tmp_path / "served.pth"
    torch.save({"x": torch.ones(1)}, served)
    monkeypatch.setitem(DINOV2_FILES, VIT_S, PretrainedFile("dinov2_vits14_pretrain.pth", served.as_uri()))
    with pytest.raises(FileNotFoundError, match="--allow-download"):
        pretrained_file(VIT_S)
    fetched = pretrained_file(VIT_S, allow_download=True)
    assert fetched == tmp_path / "torch_home" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert fetched.read_bytes() == served.read_bytes()


def test_a_vit_input_must_be_whole_patches() -> None:
    with pytest.raises(ValueError, match="multiples of 14"):
        apply_overrides(Recipe(), {"embedder.backbone": VIT_S, "preprocess.height": 64})
    with pytest.raises(ValueError, match="multiples of 28"):  # the half-size whole-part pass needs whole patches too
        apply_overrides(
            Recipe(), {"embedder.backbone": VIT_S, "embedder.density_downscales": 2, "preprocess.height": 210}
        )
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="not a multiple of the 14-pixel patch"):
        build_backbone(VIT_S)(torch.zeros(1, 3, 64, 56))


def _demo_images(root: Path) -> tuple[list[Path], list[Path]]:
    goods = sorted((root / "train" / "good").glob("*.png"))
    defects = sorted(p for p in (root / "test").rglob("*.png") if p.parent.name != "good")
    return goods, defects


@pytest.mark.parametrize(
    ("arch", "size", "patch_dim", "grid"),
    [(WRN, (64, 64), 2 * 1536, (4, 4)), (VIT_S, (70, 56), 2 * 384, (5, 4))],
)
def test_trunk_exports_with_parity_and_scores_through_the_line(
    arch: str,
    size: tuple[int, int],
    patch_dim: int,
    grid: tuple[int, int],
    request: pytest.FixtureRequest,
    demo_root: Path,
    tmp_path: Path,
) -> None:
    weights = request.getfixturevalue("wrn_file" if arch == WRN else "vit_s_file")
    recipe = apply_overrides(
        Recipe(input_pixels=None),
        {
            "embedder.backbone": arch,
            "embedder.weights": str(weights),
            "preprocess.height": size[0],
            "preprocess.width": size[1],
        },
    )
    assert recipe.embedder.feature_stages == PATCH_READING[arch]["feature_stages"]
    assert recipe.preprocess.mean == (0.485, 0.456, 0.406)  # the trunk's normalisation came with it
    torch.manual_seed(0)
    embedder = build_embedder(recipe.embedder).eval()
    assert isinstance(embedder, PatchEmbedder) and embedder.embedding_dim == patch_dim
    goods, defects = _demo_images(demo_root)
    split = DataSplit(goods[:6], [], goods[6:12], [], [])
    bundle = load_bundle(build_bundle(embedder, split, recipe, tmp_path / "bundle"))
    assert bundle.spec.model["parity_max_abs_diff"] <= 1e-4  # checked on real images at export
    assert bundle.references.shape[1] == patch_dim
    # every good is golden (calibration is cross-fitted over the training and calibration goods)
    assert bundle.descriptors is not None and bundle.descriptors.shape == (12, sum(embedder.descriptor_blocks))

    # the line's decode, preprocessing and onnxruntime give torch's patch embeddings on the same files
    files = defects[:2] + goods[12:14]
    line = OnnxEmbedder(bundle.model_path, recipe.preprocess).embed(files)
    with torch.no_grad():
        expected = embedder(
            torch.from_numpy(Preprocessor(recipe.preprocess).batch([load_image(f) for f in files]))
        ).numpy()
    assert line.embeddings.shape == (4, grid[0] * grid[1], patch_dim)
    assert np.max(np.abs(line.embeddings - expected)) <= 1e-4

    scored = score_with_maps(Inspector.from_bundle(bundle.path), files)
    for result, amap, image in scored:
        assert result.error is None and result.score is not None and np.isfinite(result.score)
        assert result.views is not None and set(result.views) == {"patch", "part"}  # the whole-part view is fused
        assert amap is not None and image is not None and amap.shape == (image.height, image.width)
