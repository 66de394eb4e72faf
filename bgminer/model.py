"""The background-splitting classifier: one shared trunk, a main head and an ImageNet auxiliary head.

The main head predicts ``K + 1`` classes, background at index 0 and the ``K`` rare categories
after it; the auxiliary head predicts the 1000 ImageNet classes and starts as a copy of the
backbone's pretrained classifier. The training modes (:mod:`bgminer.modes`) share this one
definition and differ only in what the trainable trunk is and what it eats:

- ``adapter``: cached pooled features ``[B, D]`` -> residual MLP ``h = x + W2 act(W1 x)`` with
  ``W2`` zero-initialised, so at step 0 the trunk is the identity.
- ``last-stage``: cached stage maps (e.g. ``[B, 192, 7, 7]``) -> a trainable copy of the
  backbone's last stage + pooling.
- ``full``: pixels ``[B, 3, 224, 224]`` -> a trainable copy of the whole backbone.

In every mode the untrained model reproduces the pretrained ImageNet logits on its aux head.
BatchNorm layers keep their pretrained running statistics (they stay in eval mode even while
training; their affine weights still learn): batches of a few positives plus sampled background
give noisy statistics, and frozen ones keep step 0 exact and training independent of batch makeup.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bgminer.backbone import Backbone
from bgminer.fsutil import atomic_path
from bgminer.modes import get_mode

DEFAULT_ADAPTER_HIDDEN = 128  # bench/quality.py: beat 512 on all six clip-art settings (docs/quality.md)
CHECKPOINT_FORMAT = "bgminer-checkpoint"
CHECKPOINT_VERSION = 1


class ResidualAdapter(nn.Module):
    """``h = x + W2 act(W1 x)`` with ``W2`` and its bias at zero, so it starts as the identity.

    ``W1`` and its bias are drawn as ``nn.Linear`` draws them, U(-1/sqrt(dim), 1/sqrt(dim)), but
    from a generator seeded with ``seed``, so that a round's model does not depend on what
    else consumed torch's global random numbers before it."""

    def __init__(self, dim: int, hidden: int, seed: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(dim)
        with torch.no_grad():
            self.fc1.weight.uniform_(-bound, bound, generator=generator)
            self.fc1.bias.uniform_(-bound, bound, generator=generator)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class BackgroundSplittingModel(nn.Module):
    """Shared trunk + main head (background + K categories) + ImageNet auxiliary head."""

    def __init__(
        self,
        trunk: nn.Module,
        main_head: nn.Linear,
        aux_head: nn.Linear,
        categories: list[str],
        mode: str,
        backbone_name: str,
        backbone_sha256: str,
        adapter_hidden: int | None = None,
        fixed_background_logit: float | None = None,
    ):
        super().__init__()
        if main_head.out_features != len(categories) + 1:
            raise ValueError(f"main head has {main_head.out_features} outputs for {len(categories)} categories + background")
        self.trunk = trunk
        self.main_head = main_head
        self.aux_head = aux_head
        self.categories = list(categories)
        self.mode = mode
        self.backbone_name = backbone_name
        self.backbone_sha256 = backbone_sha256
        self.adapter_hidden = adapter_hidden
        self.fixed_background_logit = fixed_background_logit

    @property
    def embedding_dim(self) -> int:
        return self.main_head.in_features

    def train(self, mode: bool = True) -> BackgroundSplittingModel:
        """Like ``nn.Module.train`` but BatchNorm layers always stay in eval mode (frozen statistics)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output ``[B, D]``: the vector the search index is built on."""
        return self.trunk(x)

    def main_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.main_head(h)
        if self.fixed_background_logit is not None:
            background = torch.full_like(logits[:, :1], self.fixed_background_logit)
            logits = torch.cat([background, logits[:, 1:]], dim=1)
        return logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        return self.main_logits(h), self.aux_head(h)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-category probability ``[B, K]`` (softmax over background + categories, background dropped)."""
        return self.probabilities(self.embed(x))

    def probabilities(self, h: torch.Tensor) -> torch.Tensor:
        """Category probabilities ``[B, K]`` from embeddings ``h``."""
        return torch.softmax(self.main_logits(h).float(), dim=1)[:, 1:]


def build_model(
    mode: str,
    backbone: Backbone,
    categories: list[str],
    fixed_background_logit: float | None = None,
    adapter_hidden: int = DEFAULT_ADAPTER_HIDDEN,
) -> BackgroundSplittingModel:
    """A fresh model for ``mode`` whose aux head reproduces ``backbone``'s ImageNet logits.

    Its input is the mode's (:attr:`bgminer.modes.ModeSpec.input`): ``adapter`` pooled features
    ``[B, feature_dim]``; ``last-stage`` stage maps ``[B, *backbone.map_shape]``; ``full`` preprocessed
    pixels ``[B, 3, crop, crop]``.
    The main head starts at zero (every category at the same prior), so building is deterministic.
    """
    spec = get_mode(mode)
    if not categories:
        raise ValueError("a model needs at least one category")
    if len(set(categories)) != len(categories):
        raise ValueError(f"duplicate category names in {categories}")
    trunk = spec.trainable_trunk(backbone, adapter_hidden)
    main_head = nn.Linear(backbone.feature_dim, len(categories) + 1)
    nn.init.zeros_(main_head.weight)
    nn.init.zeros_(main_head.bias)
    model = BackgroundSplittingModel(
        trunk=trunk,
        main_head=main_head,
        aux_head=copy.deepcopy(backbone.classifier),
        categories=categories,
        mode=mode,
        backbone_name=backbone.name,
        backbone_sha256=backbone.weights_sha256,
        adapter_hidden=adapter_hidden if mode == "adapter" else None,
        fixed_background_logit=fixed_background_logit,
    )
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def grow_categories(model: BackgroundSplittingModel, categories: list[str]) -> BackgroundSplittingModel:
    """A copy of ``model`` whose main head covers ``categories`` (matched by name).

    Rows of categories the model already knows, and the background row, are copied; new
    categories start at zero like a fresh head. Used to warm-start after a category is added.
    """
    if not categories or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be non-empty and unique, got {categories}")
    grown = copy.deepcopy(model)
    old = model.main_head
    head = nn.Linear(old.in_features, len(categories) + 1).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        sources = [0] + [model.categories.index(c) + 1 if c in model.categories else -1 for c in categories]
        for row, src in enumerate(sources):
            if src >= 0:
                head.weight[row] = old.weight[src]
                head.bias[row] = old.bias[src]
    grown.main_head = head
    grown.categories = list(categories)
    return grown


def _metadata(model: BackgroundSplittingModel, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "mode": model.mode,
        "categories": model.categories,
        "embedding_dim": model.embedding_dim,
        "adapter_hidden": model.adapter_hidden,
        "fixed_background_logit": model.fixed_background_logit,
        "backbone": model.backbone_name,
        "backbone_sha256": model.backbone_sha256,
        "extra": extra,
    }


def save_checkpoint(model: BackgroundSplittingModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (state dict + JSON metadata + JSON-able ``extra``) atomically to ``path``.

    The file is a plain dict of a JSON string and tensors, loadable with ``torch.load(weights_only=True)``;
    it is written under a temporary name unique to this writer, fsynced and renamed, so readers never see half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "metadata": json.dumps(_metadata(model, extra or {})),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zips, non-torch files
        raise ValueError(f"{path} is not a bgminer checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a bgminer checkpoint")
    meta = json.loads(payload["metadata"])
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a bgminer checkpoint of unsupported version {meta.get('version')}")
    return meta, payload["state_dict"]


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint (mode, categories, dims, backbone, ``extra``) without building a model."""
    return _read(path)[0]


def load_checkpoint(path: str | Path, backbone: Backbone) -> BackgroundSplittingModel:
    """Rebuild the model saved at ``path`` on top of ``backbone`` (which must be the one it was trained on)."""
    meta, state = _read(path)
    if meta["backbone"] != backbone.name or meta["backbone_sha256"] != backbone.weights_sha256:
        raise ValueError(
            f"{path} was trained on backbone {meta['backbone']} ({meta['backbone_sha256'][:12]}), "
            f"not {backbone.name} ({backbone.weights_sha256[:12]})"
        )
    model = build_model(
        meta["mode"],
        backbone,
        meta["categories"],
        fixed_background_logit=meta["fixed_background_logit"],
        adapter_hidden=meta["adapter_hidden"] or DEFAULT_ADAPTER_HIDDEN,
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not match its own metadata: {exc}") from exc
    return model
