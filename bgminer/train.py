"""Training rounds for the background-splitting model.

Label convention for the main head (``TrainingSet.main_labels``): ``0`` = background, ``c + 1`` =
category ``c``, ``-1`` = no main label (the row only gets the auxiliary loss). Following Forager,
:func:`build_training_set` fills the background with randomly sampled *unlabeled* images, which are
presumed background (label ``0``, like labeled negatives): at >95% background they nearly all are,
and the auxiliary loss splits that background into ImageNet pseudo-classes so the main head need
not carve it out alone.

Loss = CE(main, rows with a main label) + ``aux_weight`` * CE(aux, every row), where the aux target
is the frozen pretrained model's ImageNet argmax (or its softmax with ``soft_aux``).
:func:`train` never modifies the model it is given: it trains a copy and returns it, so a failed or
cancelled round leaves the caller's previous version untouched. Warm start = pass the last model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from bgminer.device import autocast, resolve_device, to_device
from bgminer.features import Inputs, inputs_ahead, read_inputs
from bgminer.model import BackgroundSplittingModel
from bgminer.modes import AUTO_MODE, get_mode, resolve_mode
from bgminer.progress import CancelToken, ProgressFn, check, report

_PROGRESS_INTERVAL_S = 0.5


@dataclass
class TrainConfig:
    """Everything that decides a training round; JSON-able (``dataclasses.asdict``) for the store.

    ``epochs``, ``batch_size``, ``lr``, ``warm_start``, ``min_steps`` and ``min_background`` left as None take the mode's default
    (:attr:`bgminer.modes.ModeSpec.defaults`). ``mode="auto"`` leaves them None until :meth:`resolved`
    picks the round's mode (:func:`bgminer.modes.resolve_mode`).
    """

    mode: str = "adapter"  # a registered mode, or "auto"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-4
    aux_weight: float = 0.04  # Forager's value; the paper used 0.1, which cost AP on clip art (docs/quality.md)
    soft_aux: bool = False  # distill the pretrained softmax instead of its hard argmax
    background_ratio: float = 10.0  # presumed-background unlabeled images sampled per labeled positive
    min_background: int | None = None  # at least this many (or every unlabeled image when fewer)
    pos_fraction: float = 0.0  # expected share of positives per batch (sampled with replacement); 0 = uniform
    fixed_background_logit: float | None = None
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    min_steps: int | None = None  # small rounds repeat epochs until this many optimiser steps
    max_steps: int | None = None
    warm_start: bool | None = None  # start from the previous version of the same mode (None: the mode's default)

    def __post_init__(self) -> None:
        if self.mode != AUTO_MODE:
            for name, value in asdict(get_mode(self.mode).defaults).items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if not 0.0 <= self.pos_fraction < 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1), got {self.pos_fraction}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


    def resolved(self, positives: int) -> TrainConfig:
        """This config with ``mode="auto"`` replaced by the mode a round picks on ``self.device`` when its
        categories have at least ``positives`` positive labels each; the fields left None take that mode's
        defaults. A config of a registered mode is returned unchanged."""
        if self.mode != AUTO_MODE:
            return self
        return replace(self, mode=resolve_mode(self.mode, self.device, positives))


@dataclass
class TrainingSet:
    """The rows of one round. ``inputs[ids]`` (or ``inputs(ids, train)``) gives the model input for row ids."""

    inputs: Inputs
    row_ids: np.ndarray  # int64 [N]; an image positive for several categories appears once per category
    main_labels: np.ndarray  # int64 [N]: 0 background, c + 1 category c, -1 aux loss only
    aux_targets: np.ndarray  # int64 [N]: ImageNet argmax of the frozen pretrained model
    aux_soft: np.ndarray | None = None  # float [N, 1000] pretrained ImageNet logits, for soft_aux

    def __post_init__(self) -> None:
        n = len(self.row_ids)
        if len(self.main_labels) != n or len(self.aux_targets) != n or (self.aux_soft is not None and len(self.aux_soft) != n):
            raise ValueError("row_ids, main_labels, aux_targets (and aux_soft) must have the same length")

    def __len__(self) -> int:
        return len(self.row_ids)


@dataclass
class EpochLoss:
    main: float
    aux: float
    total: float


@dataclass
class TrainResult:
    """The trained copy of the model and how the round went."""

    model: BackgroundSplittingModel = field(repr=False)
    epochs: list[EpochLoss]
    steps: int
    samples: int
    seconds: float
    device: str


def _is_positive(value: str | int) -> bool:
    if value in ("positive", 1, True):
        return True
    if value in ("negative", -1, False):
        return False
    raise ValueError(f"label values must be 'positive'/'negative' or +1/-1, got {value!r}")


def build_training_set(
    inputs: Inputs,
    labels: Mapping[int, Mapping[int, str | int]],
    candidate_ids: np.ndarray,
    imagenet_logits: np.ndarray,
    config: TrainConfig,
) -> TrainingSet:
    """Rows for one round: labeled positives and negatives plus sampled presumed-background images.

    ``labels`` maps category index (position in the model's categories) to ``{row_id: label}`` with
    labels 'positive'/'negative' or +1/-1. ``candidate_ids`` are the rows that have inputs (embedded
    images); labels on other rows are ignored. ``imagenet_logits`` ``[cap, 1000]`` is indexed by row id.
    ``max(min_background, background_ratio * positives)`` unlabeled candidates are sampled (seeded).
    """
    candidates = np.unique(np.asarray(candidate_ids, dtype=np.int64))
    entries = [
        (row, category + 1, _is_positive(value)) for category, per_image in labels.items() for row, value in per_image.items()
    ]
    rows = np.array([e[0] for e in entries], dtype=np.int64)
    main = np.array([e[1] for e in entries], dtype=np.int64)
    positive = np.array([e[2] for e in entries], dtype=bool)
    has_input = np.isin(rows, candidates)
    rows, main, positive = rows[has_input], main[has_input], positive[has_input]
    if not positive.any():
        raise ValueError("training needs at least one positive label")
    order = np.lexsort((main[positive], rows[positive]))
    positive_rows, positive_labels = rows[positive][order], main[positive][order]
    negatives = np.setdiff1d(rows[~positive], positive_rows)  # negative for some category, positive for none
    unlabeled = np.setdiff1d(candidates, rows)
    n_background = min(len(unlabeled), max(config.min_background, math.ceil(config.background_ratio * len(positive_rows))))
    background = np.sort(np.random.default_rng(config.seed).choice(unlabeled, size=n_background, replace=False))

    row_ids = np.concatenate([positive_rows, negatives, background])
    main_labels = np.concatenate([positive_labels, np.zeros(len(negatives) + n_background, dtype=np.int64)])
    logits = read_inputs(imagenet_logits, row_ids, train=False).numpy()
    return TrainingSet(
        inputs=inputs,
        row_ids=row_ids,
        main_labels=main_labels,
        aux_targets=logits.argmax(axis=1).astype(np.int64),
        aux_soft=logits if config.soft_aux else None,
    )


def _epoch_order(ts: TrainingSet, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Row positions for one epoch: a permutation, or ``len(ts)`` weighted draws when oversampling positives."""
    n = len(ts)
    positive = torch.from_numpy(ts.main_labels > 0)
    n_pos = int(positive.sum())
    if config.pos_fraction == 0.0 or n_pos in (0, n):
        return torch.randperm(n, generator=generator)
    weights = torch.where(positive, config.pos_fraction / n_pos, (1.0 - config.pos_fraction) / (n - n_pos))
    return torch.multinomial(weights.double(), n, replacement=True, generator=generator)


def _param_groups(net: BackgroundSplittingModel, config: TrainConfig) -> list[dict]:
    """The heads at ``config.lr``, the trunk at the mode's fraction of it (one group when they are equal)."""
    scale = get_mode(config.mode).trunk_lr_scale
    if scale == 1.0:
        return [{"params": list(net.parameters()), "lr": config.lr}]
    heads = [p for name, p in net.named_parameters() if not name.startswith("trunk.")]
    return [{"params": heads, "lr": config.lr}, {"params": list(net.trunk.parameters()), "lr": config.lr * scale}]


def train(
    model: BackgroundSplittingModel,
    training_set: TrainingSet,
    config: TrainConfig,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    on_epoch: Callable[[list[EpochLoss]], None] | None = None,
) -> TrainResult:
    """Train a copy of ``model`` on ``training_set``; raises ``Cancelled`` between steps if asked to.

    ``on_epoch`` receives the losses so far after every epoch (for live loss curves).

    Deterministic on CPU for a given model, data and config (all randomness comes from ``config.seed``).
    A ``mode="auto"`` config is resolved with the fewest positives of any category in ``training_set``.
    """
    if config.mode == AUTO_MODE:
        counts = np.bincount(training_set.main_labels[training_set.main_labels > 0])[1:]
        config = config.resolved(int(counts[counts > 0].min()) if counts.any() else 0)
    if config.mode != model.mode:
        raise ValueError(f"config mode {config.mode!r} does not match model mode {model.mode!r}")
    if config.fixed_background_logit != model.fixed_background_logit:
        raise ValueError("config.fixed_background_logit does not match the model's")
    if config.soft_aux and training_set.aux_soft is None:
        raise ValueError("soft_aux needs training_set.aux_soft (pretrained ImageNet logits)")
    if len(training_set) == 0:
        raise ValueError("empty training set")
    device = resolve_device(config.device)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    net = copy.deepcopy(model).to(device)
    if device.type == "cuda" and get_mode(config.mode).spatial_input:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    optimizer = torch.optim.AdamW(_param_groups(net, config), weight_decay=config.weight_decay, fused=True)
    batch_size = int(config.batch_size)
    steps_per_epoch = math.ceil(len(training_set) / batch_size)
    total_steps = max(steps_per_epoch * int(config.epochs), config.min_steps)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    main_labels = torch.from_numpy(training_set.main_labels)
    aux_targets = torch.from_numpy(training_set.aux_targets)
    aux_probs = (
        torch.softmax(torch.from_numpy(np.asarray(training_set.aux_soft, dtype=np.float32)), dim=1) if config.soft_aux else None
    )

    epochs: list[EpochLoss] = []
    step = 0
    samples = 0
    last_report = 0.0
    while step < total_steps:
        order = _epoch_order(training_set, config, generator)[: (total_steps - step) * batch_size]
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        batches = 0
        positions = list(order.split(batch_size))
        id_batches = [training_set.row_ids[pos.numpy()] for pos in positions]
        for pos, x in zip(positions, inputs_ahead(training_set.inputs, id_batches, True, device), strict=True):
            check(cancel)
            x = to_device(x, device)
            y_main = main_labels[pos].to(device)
            y_aux = (aux_probs if aux_probs is not None else aux_targets)[pos].to(device)
            with autocast(device):
                main_logits, aux_logits = net(x)
            has_main = y_main >= 0
            main_loss = (
                F.cross_entropy(main_logits[has_main].float(), y_main[has_main])
                if bool(has_main.any())
                else main_logits.sum() * 0.0
            )
            aux_loss = F.cross_entropy(aux_logits.float(), y_aux)
            loss = main_loss + config.aux_weight * aux_loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            sums += torch.stack([main_loss, aux_loss, loss]).detach().double()
            batches += 1
            step += 1
            samples += len(pos)
            now = time.perf_counter()
            if now - last_report >= _PROGRESS_INTERVAL_S or step == total_steps:
                report(progress, step, total_steps, f"epoch {len(epochs) + 1}, step {step}/{total_steps}, loss {loss.item():.4f}")
                last_report = now
        mean = (sums / max(batches, 1)).cpu().tolist()
        epochs.append(EpochLoss(main=mean[0], aux=mean[1], total=mean[2]))
        if on_epoch is not None:
            on_epoch(list(epochs))
    net.eval()
    return TrainResult(
        model=net.cpu(),
        epochs=epochs,
        steps=step,
        samples=samples,
        seconds=time.perf_counter() - start,
        device=str(device),
    )

