"""A trained-looking adapter model, shared by the scoring and Ray engine tests."""

from __future__ import annotations

from bgminer.model import build_model
from bgminer.project import Project


def adapter_model(reference: Project):
    """An adapter on ``reference``'s backbone for categories a and b, its trunk nudged off the identity (seeded)."""
    import torch

    torch.manual_seed(0)
    model = build_model("adapter", reference.backbone, ["a", "b"])
    with torch.no_grad():
        for p in model.trunk.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a trained-looking adapter, not the identity
    return model
