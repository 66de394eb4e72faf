"""Training modes: one entry per mode holds everything bgminer knows about it.

A mode cuts the backbone in two. The frozen prefix turns preprocessed pixels into the model's
input (pooled features, last-stage input maps, or the pixels themselves); the trainable trunk
continues from there to the embedding. Training defaults, the scoring chunk, where a project
finds the inputs, how a query image and an exported network reach them, the help text and the
CLI choices all come from here, so adding a mode is one :data:`MODES` entry.

Importing this module does not import torch (the CLI reads the mode names from it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .backbone import Backbone
    from .model import BackgroundSplittingModel
    from .project import Project


@dataclass(frozen=True)
class TrainDefaults:
    """What a :class:`~bgminer.train.TrainConfig` field left as None becomes in this mode."""

    epochs: int
    batch_size: int
    lr: float
    warm_start: bool  # start from the previous version of the same mode
    min_steps: int  # small rounds repeat epochs until this many optimiser steps
    min_background: int = 200  # unlabeled images a round samples at least (background for the main loss, aux for all)


@dataclass(frozen=True)
class ModeSpec:
    """One training mode."""

    name: str
    help: str  # one line for the Train page's mode picker
    input: str  # what the trunk eats: "pooled" or "maps" (feature-cache arrays of that name) or "pixels" (decoded on demand)
    float16_input: bool  # the feature cache stores the input as float16: query embeddings and exports round it alike
    # The backbone's frozen part, preprocessed pixels -> input (the backbone's own modules, not copies).
    frozen_prefix: Callable[[Backbone], nn.Module]
    # A fresh trainable trunk, input -> embedding, from (backbone, adapter hidden size).
    trainable_trunk: Callable[[Backbone, int], nn.Module]
    defaults: TrainDefaults
    score_batch: int  # rows per scoring chunk: bounded memory whatever the corpus size
    trunk_lr_scale: float = 1.0  # the trunk learns at this fraction of the heads' learning rate
    # A mode whose latest model a fresh model of this mode starts from (when warm starts are on and this
    # mode has no version of its own yet), and how: (mode name, fn(fresh model, that model) -> model).
    warm_from: tuple[str, Callable[[BackgroundSplittingModel, BackgroundSplittingModel], BackgroundSplittingModel]] | None = None

    @property
    def spatial_input(self) -> bool:
        """Inputs are image-shaped ``[B, C, H, W]`` (stage maps, pixels): the model runs channels-last on CUDA."""
        return self.input != "pooled"

    def inputs(self, project: Project) -> Any:
        """The trunk's inputs for ``project``, indexable by image id (a feature-cache array, or a pixel loader)."""
        if self.input == "pixels":
            from .features import PixelLoader

            return PixelLoader(project.store, project.backbone)
        cache = project.features
        if self.input not in cache.specs or not cache.path(self.input).exists():
            raise ValueError(f"{self.name} mode needs cached {self.input}; this backbone/project has none")
        return cache.open(self.input)

    def as_cached(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (the frozen prefix's output) rounded as the feature cache stores it, so that what a model
        sees at query or export time is what it was trained and scored on."""
        return x.half().float() if self.float16_input else x

    def embed(self, model: BackgroundSplittingModel, backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
        """The trunk embedding of preprocessed ``pixels`` ``[B, 3, crop, crop]``: the vector the search index holds."""
        return model.embed(self.as_cached(self.frozen_prefix(backbone)(pixels)))


def _pooled_prefix(backbone: Backbone) -> nn.Module:
    from torch import nn

    return nn.Sequential(backbone.net.stem, backbone.net.last_stage)


def _stem_prefix(backbone: Backbone) -> nn.Module:
    return backbone.net.stem


def _no_prefix(backbone: Backbone) -> nn.Module:
    from torch import nn

    return nn.Identity()


def _adapter_trunk(backbone: Backbone, hidden: int) -> nn.Module:
    from .model import ResidualAdapter

    return ResidualAdapter(backbone.feature_dim, hidden)


def _last_stage_trunk(backbone: Backbone, hidden: int) -> nn.Module:
    import copy

    return copy.deepcopy(backbone.net.last_stage)


def _whole_trunk(backbone: Backbone, hidden: int) -> nn.Module:
    import copy

    from torch import nn

    return nn.Sequential(copy.deepcopy(backbone.net.stem), copy.deepcopy(backbone.net.last_stage))


def _full_from_last_stage(full: BackgroundSplittingModel, source: BackgroundSplittingModel) -> BackgroundSplittingModel:
    """``full`` (a fresh full-mode model) with the last stage and both heads of ``source``, a trained
    last-stage model of the same backbone; the stem stays pretrained. Categories are matched by name
    (those ``source`` lacks start at zero, as in a fresh head)."""
    import copy

    from .model import grow_categories

    if source.mode != "last-stage" or source.backbone_sha256 != full.backbone_sha256:
        raise ValueError("a full-mode model starts only from a last-stage model of the same backbone")
    if source.categories != full.categories:
        source = grow_categories(source, full.categories)
    out = copy.deepcopy(full)
    out.trunk[1].load_state_dict(source.trunk.state_dict())
    out.main_head.load_state_dict(source.main_head.state_dict())
    out.aux_head.load_state_dict(source.aux_head.state_dict())
    return out


# Defaults measured on the clip-art loop (bench/quality.py protocol B, 5 seeds, docs/quality.md):
# - adapter rounds start afresh from the pretrained model: they take about a second, and
#   warm-started rounds found 7 fewer positives in 300 reviews, the trunk over-training round
#   after round. The pixel and stage-map modes warm-start so that each round stays short.
# - adapter rounds take at least 128 steps: with 32, the first rounds (5 positives + 200 sampled
#   background) under-fit, finding 2.8 of 12 hidden positives at 0.5% prevalence against 8.0.
#   On pixels that many steps would cost minutes on a CPU, so the other modes keep 32.
# - full mode follows the paper's recipe for fine-tuning a whole network on few positives (issue 11;
#   docs/gpu.md: AP .530 vs last-stage's .493 at 20 positives, mean of 3 demo categories on CPU, ahead
#   in 2; the GPU run is pending): it starts from the latest last-stage
#   model, BatchNorm statistics stay frozen (BackgroundSplittingModel.train), the trunk learns at a
#   tenth of the heads' rate, and each round samples at least 2,000 unlabeled images, so that the
#   aux loss keeps the trunk close to ImageNet over many images while the main loss sees them as
#   background. From 5 positives on the demo, full mode from scratch at one rate was at chance.
MODES: dict[str, ModeSpec] = {
    spec.name: spec
    for spec in (
        ModeSpec(
            name="adapter",
            help="seconds on a CPU: a small trunk on cached backbone features (default)",
            input="pooled",
            float16_input=False,
            frozen_prefix=_pooled_prefix,
            trainable_trunk=_adapter_trunk,
            defaults=TrainDefaults(epochs=4, batch_size=64, lr=1e-3, warm_start=False, min_steps=128),
            score_batch=4096,
        ),
        ModeSpec(
            name="last-stage",
            help="retrains the backbone's last stage from cached activations",
            input="maps",
            float16_input=True,
            frozen_prefix=_stem_prefix,
            trainable_trunk=_last_stage_trunk,
            defaults=TrainDefaults(epochs=5, batch_size=64, lr=3e-4, warm_start=True, min_steps=32),
            score_batch=256,
        ),
        ModeSpec(
            name="full",
            help="end-to-end fine-tuning from pixels; use a GPU",
            input="pixels",
            float16_input=False,
            frozen_prefix=_no_prefix,
            trainable_trunk=_whole_trunk,
            defaults=TrainDefaults(epochs=10, batch_size=64, lr=1e-3, warm_start=True, min_steps=32, min_background=2000),
            score_batch=128,
            trunk_lr_scale=0.1,
            warm_from=("last-stage", _full_from_last_stage),
        ),
    )
}


# mode="auto" picks a registered mode per round (resolve_mode). On CUDA a round retrains the last stage
# once every category it trains has this many positive labels; with fewer, the adapter, whose small trunk
# over-fits a handful of positives less. Set from bench/multimode.py; see docs/quality.md.
AUTO_MODE = "auto"
AUTO_LAST_STAGE_MIN_POSITIVES = 20


def resolve_mode(mode: str, device: str, positives: int) -> str:
    """The registered mode a round trains in. ``mode`` other than ``"auto"`` is checked and returned as is.

    ``"auto"``: ``"last-stage"`` when ``device`` is CUDA (``"cuda"``, ``"cuda:N"``, or ``"auto"`` on a
    machine that has CUDA) and ``positives`` (the fewest positive labels of the round's categories)
    reaches :data:`AUTO_LAST_STAGE_MIN_POSITIVES`; else ``"adapter"``, the CPU default that keeps rounds
    to seconds.
    """
    if mode != AUTO_MODE:
        return get_mode(mode).name
    if device == "auto":
        from .device import resolve_device  # imports torch: only when the machine must be asked

        device = resolve_device(device).type
    on_cuda = device == "cuda" or device.startswith("cuda:")
    return "last-stage" if on_cuda and positives >= AUTO_LAST_STAGE_MIN_POSITIVES else "adapter"


def get_mode(name: str) -> ModeSpec:
    """The spec of mode ``name``; ValueError naming the choices for an unknown one."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown training mode {name!r}; choose one of {', '.join(MODES)}") from None


def embed_query(backbone: Backbone, model: BackgroundSplittingModel | None, pixels: torch.Tensor) -> torch.Tensor:
    """Embedding of preprocessed ``pixels`` in the index's space: ``model``'s trunk embedding, or the
    backbone's pooled feature before any model is trained."""
    if model is None:
        return backbone.net.forward_features(pixels)
    return get_mode(model.mode).embed(model, backbone, pixels)
