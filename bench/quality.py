"""Quality benchmark on real clip art: does background splitting find rare positives better than the baselines?

Corpus: the deduplicated Open Clip Art images (bench/datasets.py), rare class ``animals``
(~4.2%), plus variants with the positives subsampled to 0.5% and 0.1% of the corpus. Each
seed draws its own subsample and a 50/50 stratified train/test split. Everything runs at
the engine level on cached features (pooled 1280-d, ImageNet logits, last-stage input maps).

- Protocol A (the paper's): ``k`` labeled positives (5, 20, all; a ``k`` at or above the
  split's positives is "all") and every other training image labeled background. Test AP of
  kNN-to-positives (max cosine on pretrained features), a logistic-regression probe on the
  pretrained features, the trainable trunk without the auxiliary loss ("ft", aux_weight 0)
  and background splitting ("bs", the default TrainConfig), in adapter and last-stage modes.
- Protocol B (the product's use): from 5 seed positives (half the positives when fewer than
  10), rounds of train -> rank -> an oracle labels the top 20 -> repeat, 15 rounds (300
  reviews), on the training split. The loop is the product's :class:`bgminer.loop.Miner`
  (query, decide, retrain_if_due with a threshold of 20 labels) over a real store;
  :class:`BenchProject` supplies the cached features and runs each round's learner. Positives
  found after 100/200/300 reviews per strategy (background-splitting model, default config:
  adapter rounds start afresh), for random review, for a logistic-regression loop (most-likely
  on an LR probe) and a kNN loop (near-positives on pretrained features, no training).
- Estimator check: at 100 and 200 reviews of the default loop, draw the validation sample
  (``evaluate.draw_validation_sample`` on the current model's scores of the unreviewed
  training images), label it with the oracle, ``estimate_remaining``, and count how often the
  95% interval covers the true number of positives left (several draws per seed).

    .venv/bin/python bench/quality.py                 # full run: A + B + estimator, 5 seeds
    .venv/bin/python bench/quality.py --quick         # 2 seeds, fewer settings (a few minutes)
    .venv/bin/python bench/quality.py --protocols A --modes adapter --set aux_weight=0.04 --json

``--set key=value`` overrides TrainConfig fields (and ``adapter_hidden``) of every trained run.
Torch runs on one thread (``--threads``): on the shared 2-core machine two threads were ~10x slower.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datasets import RARE_CATEGORY, openclipart_project, stratified_split, subsample_positives
from bgminer import strategies
from bgminer.backbone import load_backbone
from bgminer.calibration import fit_platt
from bgminer.category_status import useful_width
from bgminer.evaluate import average_precision, discovery_curve, draw_validation_sample, estimate_remaining, labels_for_width
from bgminer.index import normalize
from bgminer.loop import Miner
from bgminer.model import DEFAULT_ADAPTER_HIDDEN, build_model
from bgminer.probe import LinearProbe, fit_logistic
from bgminer.rank import RankContext
from bgminer.scoring import score
from bgminer.store import Store
from bgminer.strategies import DEFAULT_STRATEGY, make_strategy
from bgminer.train import TrainConfig, build_training_set, train

CORPORA = {"4%": None, "0.5%": 0.005, "0.1%": 0.001}  # positive share; None = the corpus as it is
KS = (5, 20, None)  # None = all training positives
MODES = ("adapter", "last-stage")
METHODS = ("knn", "lr", "ft", "bs", "auto")
STRATEGY_NAMES = ("most-likely", "uncertain", "near-positives", "mixed")
CHECKPOINTS = (100, 200, 300)
SEED_POSITIVES = 5
ESTIMATE_AT = (100, 200)
ESTIMATE_DRAWS = 20
VALIDATION_SIZE = 30  # Project.validation_sample's default
VALIDATION_SIZES = (VALIDATION_SIZE,)  # --validation-sizes adds larger samples (what the page's "label more" leads to)
CALIBRATION_REVIEWS = 20  # reviews made after the model was trained, besides the validation sample
CALIBRATION_SHOWN = 50  # the candidates after those, whose displayed probability is checked
RAW_KEYS = ("corpus", "seed", "loop", "train_positives", "seed_positives", "hidden", "found", "recall", "seconds")


@dataclass
class Data:
    """Cached features of every embedded clip-art image, rows aligned with ``paths``."""

    paths: list[str]
    positive: np.ndarray  # bool [N]
    pooled: np.ndarray  # float32 [N, 1280]
    logits: np.ndarray  # float16 [N, 1000]
    maps: np.ndarray  # float16 [N, 192, 7, 7]
    row_of: dict[str, int] = field(default_factory=dict)

    def inputs(self, mode: str) -> np.ndarray:
        return self.pooled if mode == "adapter" else self.maps

    def read(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows by image id (= row), as :meth:`bgminer.feature_cache.FeatureCache.read` serves the engine."""
        return {"pooled": self.pooled, "logits": self.logits}[name][np.asarray(ids, dtype=np.int64)]


@dataclass
class Split:
    corpus: str
    seed: int
    train: np.ndarray  # rows of Data
    test: np.ndarray

    def positives(self, data: Data, part: str = "train") -> np.ndarray:
        rows = self.train if part == "train" else self.test
        return rows[data.positive[rows]]


def load_data(partial: bool = False) -> Data:
    """Features of the benchmark project's images; ``partial`` uses the ones embedded so far instead of embedding the rest."""
    if partial:
        from bench.datasets import DATA_ROOT, openclipart
        from bgminer.project import Project

        project = Project(DATA_ROOT / "openclipart-project")
        by_path = {str(Path(it.path).resolve()): it for it in openclipart()}
        truth = {row["id"]: by_path[row["path"]] for row in project.store.images() if row["path"] in by_path}
    else:
        project, truth = openclipart_project()
    embedded = set(project.store.image_ids(embedded=True))
    ids = np.array(sorted(i for i in truth if i in embedded), dtype=np.int64)
    paths = [str(truth[int(i)].path) for i in ids]
    data = Data(
        paths=paths,
        positive=np.array([truth[int(i)].category == RARE_CATEGORY for i in ids]),
        pooled=project.features.read("pooled", ids),
        logits=project.features.read("logits", ids),
        maps=project.features.read("maps", ids),
    )
    data.row_of = {p: r for r, p in enumerate(paths)}
    return data


def make_split(data: Data, corpus: str, seed: int) -> Split:
    """``subsample_positives`` (for the rarer corpora) then ``stratified_split``, both seeded."""
    from bench.datasets import openclipart

    items = [it for it in openclipart() if str(it.path) in data.row_of]
    fraction = CORPORA[corpus]
    if fraction is not None:
        items = subsample_positives(items, RARE_CATEGORY, fraction, seed)
    train_items, test_items = stratified_split(items, RARE_CATEGORY, seed)
    rows = [np.array([data.row_of[str(it.path)] for it in part], dtype=np.int64) for part in (train_items, test_items)]
    return Split(corpus, seed, *rows)


# -- scorers ------------------------------------------------------------------------------------


def knn_scores(data: Data, positives: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Max cosine to any labeled positive, on pretrained pooled features."""
    return (normalize(data.pooled[rows]) @ normalize(data.pooled[positives]).T).max(axis=1)


def logistic_probe(x: np.ndarray, y: np.ndarray, c: float = 1.0) -> LinearProbe:
    """The engine's probe (:func:`bgminer.probe.fit_logistic`): sklearn's objective, C=``c``."""
    return fit_logistic(x, y, c=c)


@dataclass
class Trainer:
    """Trains background-splitting models with a TrainConfig built from defaults + overrides."""

    overrides: dict[str, object]
    backbone: object = field(default_factory=load_backbone)

    def config(self, mode: str, seed: int, **extra: object) -> TrainConfig:
        names = {f.name for f in fields(TrainConfig)}
        kw = {k: v for k, v in {**self.overrides, **extra}.items() if k in names - {"mode", "seed", "device"}}
        return TrainConfig(mode=mode, seed=seed, device="cpu", **kw)

    def fresh(self, mode: str, config: TrainConfig):
        hidden = int(self.overrides.get("adapter_hidden", DEFAULT_ADAPTER_HIDDEN))
        return build_model(mode, self.backbone, [RARE_CATEGORY], config.fixed_background_logit, adapter_hidden=hidden)

    def fit(self, data: Data, mode: str, labels: dict[int, str], candidates: np.ndarray, config: TrainConfig, model=None):
        inputs = data.inputs(mode)
        ts = build_training_set(inputs, {0: labels}, candidates, data.logits, config)
        return train(model if model is not None else self.fresh(mode, config), ts, config).model

    def scores(self, data: Data, model, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeddings, probs = score(model, data.inputs(model.mode), rows, device="cpu")
        return embeddings, probs[:, 0]


def probe_head(model, probe: LinearProbe) -> None:
    """Start the main head at a logistic probe (background logit 0, category logit = probe), in place.

    Valid in every mode because the untrained trunk outputs the pretrained pooled features. This
    emulates linear-probe-then-fine-tune (``--head-init probe``); the engine starts the head at zero.
    """
    with torch.no_grad():
        model.main_head.weight.zero_()
        model.main_head.bias.zero_()
        model.main_head.weight[1] = torch.from_numpy(probe.w)
        model.main_head.bias[1] = probe.b


# -- protocol A ---------------------------------------------------------------------------------


def k_values(n_train_positives: int, ks: tuple[int | None, ...]) -> list[int]:
    """Distinct k to run: each requested k, capped at the split's positives (so "all" is listed once)."""
    out: list[int] = []
    for k in ks:
        value = n_train_positives if k is None or k >= n_train_positives else k
        if value not in out:
            out.append(value)
    return out


def protocol_a(
    data: Data,
    split: Split,
    trainer: Trainer,
    modes: tuple[str, ...],
    ks: tuple[int | None, ...],
    methods: tuple[str, ...] = METHODS,
    head_init: str = "zero",
) -> list[dict]:
    """One row per (k, method): test AP of each method on this split."""
    positives = split.positives(data)
    y_test = data.positive[split.test]
    rng = np.random.default_rng(split.seed)
    shuffled = rng.permutation(positives)
    out = []
    for k in k_values(len(positives), ks):
        chosen = np.sort(shuffled[:k])
        label = "all" if k == len(positives) else str(k)
        y_train = np.isin(split.train, chosen)
        rows = {}
        if "knn" in methods:
            rows["knn"] = knn_scores(data, chosen, split.test)
        probe = logistic_probe(data.pooled[split.train], y_train)
        if "lr" in methods:
            rows["lr"] = probe(data.pooled[split.test])
        labels = {int(r): ("positive" if p else "negative") for r, p in zip(split.train, y_train, strict=True)}
        for mode in modes:
            for method, aux in (("ft", {"aux_weight": 0.0}), ("bs", {})):
                if method not in methods:
                    continue
                start = time.perf_counter()
                config = trainer.config(mode, split.seed, **aux)
                model = trainer.fresh(mode, config)
                if head_init == "probe":
                    probe_head(model, probe)
                model = trainer.fit(data, mode, labels, split.train, config, model)
                rows[f"{mode}-{method}"] = trainer.scores(data, model, split.test)[1]
                rows[f"{mode}-{method}-seconds"] = time.perf_counter() - start
        if "auto" in methods:  # the product's default ranking of the test images, as Miner would query it
            start = time.perf_counter()
            rows["auto"] = default_strategy_scores(data, split, chosen, rows.get(f"{modes[0]}-bs") if modes else None)
            rows["auto-seconds"] = time.perf_counter() - start
        for method, s in rows.items():
            if not method.endswith("-seconds"):
                out.append(
                    {
                        "corpus": split.corpus,
                        "seed": split.seed,
                        "k": label,
                        "k_value": k,
                        "method": method,
                        "ap": average_precision(y_test, s),
                        "seconds": rows.get(f"{method}-seconds"),
                    }
                )
    return out


def default_strategy_scores(data: Data, split: Split, positives: np.ndarray, model_scores: np.ndarray | None) -> np.ndarray:
    """Test images ordered by the default strategy (``auto``), as scores (first = highest): the chosen
    training positives labeled positive, every other training image negative, the test images unlabeled."""
    ctx = RankContext(
        ids=split.test,
        scores=model_scores,
        positive_ids=positives,
        negative_ids=np.setdiff1d(split.train, positives),
        features=data,
        category=RARE_CATEGORY,
    )
    order = make_strategy("auto").rank(ctx, len(split.test))
    out = np.full(len(split.test), -len(split.test), np.float64)  # anything left unranked comes last
    out[ctx.rows(order)] = -np.arange(len(order), dtype=np.float64)
    return out


# -- protocol B ---------------------------------------------------------------------------------


def seed_positive_count(n_positives: int) -> int:
    return min(SEED_POSITIVES, max(1, n_positives // 2))


class BenchProject:
    """The training split as a project for :class:`bgminer.loop.Miner`: a real store (labels, models),
    cached features, and ``learner`` ("bs", "lr" or "none") as the round that :meth:`train` runs."""

    def __init__(
        self, data: Data, split: Split, learner: str, trainer: Trainer, folder: Path, retrain_after: int,
        category: str = RARE_CATEGORY,
    ):
        self.data, self.rows, self.learner, self.trainer = data, split.train, learner, trainer
        self.store = Store(folder / "bench.sqlite")
        with self.store.write() as db:  # image id = row of Data
            db.executemany(
                "INSERT INTO images (id, path, status, embedded, added_at) VALUES (?, ?, 'ok', 1, 0)",
                [(int(r), data.paths[r]) for r in self.rows],
            )
        self.store.add_category(category)
        self.auto_retrain_after = retrain_after if learner != "none" else 0
        self.scores: np.ndarray | None = None
        self.embeddings = data.pooled[self.rows]
        self.model = None
        self.features = data  # pretrained rows by image id (= row of Data), as a project's feature cache


    def label(self, category: str, image_ids, value: str, source: str = "user", author: str | None = None) -> list[int]:
        return self.store.add_labels(category, [(int(i), value) for i in image_ids], source=source, author=author)

    def undo(self, category: str, author: str | None = None):
        return self.store.undo(category, author)

    def ranking_inputs(self, category: str):
        return self.rows, self.scores, self.embeddings

    def train(self, category: str, config: TrainConfig, progress=None, cancel=None):
        labels = self.store.labels(category)
        if self.learner == "bs":
            self.model = self.trainer.fit(
                self.data, config.mode, labels, self.rows, config, self.model if config.warm_start else None
            )
            self.embeddings, self.scores = self.trainer.scores(self.data, self.model, self.rows)
        else:
            y = np.array([labels.get(int(i)) == "positive" for i in self.rows])
            self.scores = logistic_probe(self.data.pooled[self.rows], y)(self.data.pooled[self.rows])
        model_id = self.store.add_model([category], config.mode, {}, None)
        self.store.update_model(model_id, state="ready", label_counts=self.store.label_counts())
        return self.store.model(model_id)


def run_loop(
    data: Data,
    split: Split,
    learner: str,
    strategy_name: str,
    trainer: Trainer,
    rounds: int,
    per_round: int,
    estimate: bool = False,
    seeds: np.ndarray | None = None,
    category: str = RARE_CATEGORY,
) -> dict:
    """One review loop on the training split, driven through :class:`bgminer.loop.Miner` (an oracle
    decides). ``learner``: "bs" (default model), "lr", or "none" (no model). A round retrains when
    ``per_round`` new labels arrived (the auto-retrain policy). ``category``: the name the person
    gave the class (the default strategy reads what it means)."""
    rows = split.train
    truth = data.positive[rows]
    positives = rows[truth]
    if seeds is None:
        rng = np.random.default_rng(split.seed)
        seeds = rng.choice(positives, seed_positive_count(len(positives)), replace=False)
    reviewed: list[bool] = []
    reviewed_ids: list[int] = []
    estimates = []
    is_pos = dict(zip(rows.tolist(), truth.tolist(), strict=True))
    mode = str(trainer.overrides.get("mode", TrainConfig().mode))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bgminer-quality-") as folder:
        project = BenchProject(data, split, learner, trainer, Path(folder), retrain_after=per_round, category=category)
        project.label(category, seeds, "positive", author="oracle")
        miner = Miner(project, category, "oracle", strategy_name)
        for r in range(rounds):
            config = trainer.config(mode, split.seed + r)
            if r == 0 and learner != "none":
                miner.train(config)
            elif r > 0:
                miner.retrain_if_due(config=config)
            if estimate and project.scores is not None and len(reviewed) in ESTIMATE_AT:
                estimates.extend(
                    check_estimator(rows, project.scores, project.store.labels(category), is_pos, split.seed, len(reviewed))
                )
            miner.seed = split.seed * 1000 + r
            for candidate in miner.query(per_round):
                miner.decide(candidate.image_id, "positive" if is_pos[candidate.image_id] else "negative")
                reviewed.append(is_pos[candidate.image_id])
                reviewed_ids.append(candidate.image_id)
        final_scores = project.scores
        project.store.close()
    curve = discovery_curve(reviewed)
    n_seeds = len(seeds)
    hidden = len(positives) - n_seeds
    found = {n: int(curve[min(n, len(curve)) - 1]) if len(curve) else 0 for n in CHECKPOINTS if n <= rounds * per_round}
    return {
        "corpus": split.corpus,
        "seed": split.seed,
        "loop": f"{learner}:{strategy_name}",
        "train_positives": len(positives),
        "seed_positives": n_seeds,
        "hidden": hidden,
        "found": found,
        "recall": {n: f / hidden if hidden else float("nan") for n, f in found.items()},
        "seconds": time.perf_counter() - start,
        "estimates": estimates,
        "reviewed_ids": reviewed_ids,
        "seed_ids": [int(i) for i in seeds],
        "final_scores": final_scores,  # the learner's scores of ``rows`` after the last round (None: no learner)
    }


def check_estimator(
    rows: np.ndarray, scores: np.ndarray, labels: dict[int, str], is_pos: dict[int, bool], seed: int, reviews: int
) -> list[dict]:
    """Several validation samples (of each size in ``VALIDATION_SIZES``) from the current scores: does the
    95% interval cover the true positives left, how wide is it, would the Review page call it useful
    (``category_status.useful_width``), and how many more labels would it ask for otherwise?

    Each draw also checks the calibration the Review page would show next: Platt scaling fitted on the
    labels reviewed after this model was trained (the sample, plus the ``CALIBRATION_REVIEWS`` images it
    ranks first, as most-likely review would show them), against the truth of the ``CALIBRATION_SHOWN``
    images ranked after those: the mean probability the page would display and the share of them positive.
    """
    unreviewed = ~np.isin(rows, np.fromiter(labels, dtype=np.int64, count=len(labels)))
    pool, pool_scores = rows[unreviewed], scores[unreviewed]
    truth = np.array([is_pos[int(i)] for i in pool], dtype=bool)
    true_left = int(truth.sum())
    found = sum(v == "positive" for v in labels.values())
    order = np.argsort(-pool_scores, kind="stable")
    reviewed_next = order[:CALIBRATION_REVIEWS]
    shown = order[CALIBRATION_REVIEWS : CALIBRATION_REVIEWS + CALIBRATION_SHOWN]
    out = []
    for size, draw in ((size, draw) for size in VALIDATION_SIZES for draw in range(ESTIMATE_DRAWS)):
        rng = np.random.default_rng([seed, reviews, draw] + ([] if size == VALIDATION_SIZE else [size]))
        positions, pi = draw_validation_sample(pool_scores, size, rng)
        y = truth[positions]
        est = estimate_remaining(pool[positions], y, pi, len(pool), found=found)
        target = useful_width(found + est.remaining)
        useful = est.width <= target
        more = 0 if useful else labels_for_width(pool[positions], y, pi, len(pool), target)
        fit_on = np.union1d(positions, reviewed_next)
        calibration = fit_platt(pool_scores[fit_on], truth[fit_on])
        out.append(
            {
                "reviews": reviews,
                "size": size,
                "true": true_left,
                "estimate": est.remaining,
                "low": est.low,
                "high": est.high,
                "covered": bool(est.low <= true_left <= est.high),
                "sample": est.sample_size,
                "useful": useful,
                "labels_needed": more,
                "calibrated": calibration.fitted,
                "shown_probability": float(np.mean(calibration.probability(pool_scores[shown]))),
                "shown_score": float(np.mean(pool_scores[shown])),
                "shown_positive": float(np.mean(truth[shown])),
            }
        )
    return out


# -- summaries ----------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize_a(rows: list[dict]) -> dict:
    settings = list(dict.fromkeys((r["corpus"], r["k"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {}
    for corpus, k in settings:
        cell = {}
        for m in methods:
            ap = [r["ap"] for r in rows if (r["corpus"], r["k"], r["method"]) == (corpus, k, m)]
            secs = [
                r["seconds"] for r in rows if (r["corpus"], r["k"], r["method"]) == (corpus, k, m) and r["seconds"] is not None
            ]
            if ap:
                mu, sd = mean_std(ap)
                cell[m] = {"mean": mu, "std": sd, "n": len(ap), "seconds": float(np.mean(secs)) if secs else None}
        table[f"{corpus} k={k}"] = cell

    def paired(a: str, b: str) -> dict | None:
        diffs_by_setting = {}
        for corpus, k in settings:
            by_seed = {r["seed"]: r["ap"] for r in rows if (r["corpus"], r["k"], r["method"]) == (corpus, k, a)}
            other = {r["seed"]: r["ap"] for r in rows if (r["corpus"], r["k"], r["method"]) == (corpus, k, b)}
            d = [by_seed[s] - other[s] for s in by_seed if s in other]
            if d:
                diffs_by_setting[f"{corpus} k={k}"] = d
        if not diffs_by_setting:
            return None
        every = [x for d in diffs_by_setting.values() for x in d]
        mu, sd = mean_std(every)
        return {
            "mean": mu,
            "std": sd,
            "n": len(every),
            "sem": sd / math.sqrt(len(every)),
            "wins": sum(x > 0 for x in every),
            "per_setting": {s: dict(zip(("mean", "std"), mean_std(d), strict=True)) for s, d in diffs_by_setting.items()},
        }

    mode_names = sorted({m.rsplit("-", 1)[0] for m in methods if m.endswith(("-bs", "-ft"))})
    diffs = {f"{mode}: bs - ft": paired(f"{mode}-bs", f"{mode}-ft") for mode in mode_names}
    diffs.update({f"{mode}-bs - lr": paired(f"{mode}-bs", "lr") for mode in mode_names})
    return {"table": table, "paired": {k: v for k, v in diffs.items() if v is not None}}


def summarize_b(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        cell = out.setdefault(r["corpus"], {}).setdefault(r["loop"], {"found": {}, "recall": {}, "seconds": []})
        for n, f in r["found"].items():
            cell["found"].setdefault(n, []).append(f)
            cell["recall"].setdefault(n, []).append(r["recall"][n])
        cell["seconds"].append(r["seconds"])
        cell["hidden"] = r["hidden"]
    for loops in out.values():
        for cell in loops.values():
            cell["found"] = {n: dict(zip(("mean", "std"), mean_std(v), strict=True)) for n, v in cell["found"].items()}
            cell["recall"] = {n: dict(zip(("mean", "std"), mean_std(v), strict=True)) for n, v in cell["recall"].items()}
            cell["seconds"] = float(np.mean(cell["seconds"]))
    return out


def summarize_estimates(rows: list[dict]) -> dict:
    """Per corpus, review count and validation sample size: coverage (over every draw, and mean ± std over seeds), the interval's
    width, how often the page would call it useful and how many more labels it asks for, and the
    calibration check (mean displayed probability, raw and calibrated, against the share positive)."""
    out: dict = {}
    for r in rows:
        for e in r["estimates"]:
            cells = out.setdefault(r["corpus"], {}).setdefault(e["reviews"], {})
            cells.setdefault(e.get("size", VALIDATION_SIZE), {}).setdefault(r["seed"], []).append(e)

    def cell(by_seed: dict[int, list[dict]]) -> dict:
        es = [e for per_seed in by_seed.values() for e in per_seed]
        widths = [e["high"] - e["low"] for e in es]
        needed = [e["labels_needed"] for e in es if not e["useful"] and e["labels_needed"] is not None]
        fitted = [e for e in es if e["calibrated"]]
        coverage_by_seed = mean_std([float(np.mean([e["covered"] for e in per_seed])) for per_seed in by_seed.values()])
        return {
            "coverage": float(np.mean([e["covered"] for e in es])),
            "coverage_by_seed": dict(zip(("mean", "std"), coverage_by_seed, strict=True)),
            "draws": len(es),
            "seeds": len(by_seed),
            "true_left_mean": float(np.mean([e["true"] for e in es])),
            "estimate_mean": float(np.mean([e["estimate"] for e in es])),
            "width_mean": float(np.mean(widths)),
            "width_std": float(np.std(widths, ddof=1)) if len(widths) > 1 else 0.0,
            "sample_mean": float(np.mean([e["sample"] for e in es])),
            "useful_share": float(np.mean([e["useful"] for e in es])),
            "labels_needed_median": float(np.median(needed)) if needed else None,
            "calibrated_share": len(fitted) / len(es),
            "shown_positive_mean": float(np.mean([e["shown_positive"] for e in es])),
            "shown_score_mean": float(np.mean([e["shown_score"] for e in es])),
            "shown_probability_mean": float(np.mean([e["shown_probability"] for e in fitted])) if fitted else None,
        }

    return {
        corpus: {reviews: {size: cell(by_seed) for size, by_seed in by_size.items()} for reviews, by_size in by_reviews.items()}
        for corpus, by_reviews in out.items()
    }


def print_tables(result: dict) -> None:
    if "A" in result:
        table = result["A"]["table"]
        methods = list(dict.fromkeys(m for cell in table.values() for m in cell))
        print("\nProtocol A: test AP, mean ± std over seeds")
        print(f"{'setting':<15}" + "".join(f"{m:>17}" for m in methods))
        for setting, cell in table.items():
            print(
                f"{setting:<15}"
                + "".join(f"{cell[m]['mean']:>10.3f}±{cell[m]['std']:.3f}" if m in cell else f"{'':>17}" for m in methods)
            )
        print("\nPaired differences (AP points x100, mean ± std over settings x seeds; wins/n):")
        for name, d in result["A"]["paired"].items():
            per = "  ".join(f"{s}: {100 * v['mean']:+.1f}" for s, v in d["per_setting"].items())
            print(
                f"  {name:<22} {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} (sem {100 * d['sem']:.1f}; "
                f"{d['wins']}/{d['n']})   {per}"
            )
    if "B" in result:
        print(
            "\nProtocol B: positives found in review after 100/200/300 reviews (mean over seeds); recall of "
            "hidden positives at the end"
        )
        for corpus, loops in result["B"].items():
            hidden = next(iter(loops.values()))["hidden"]
            print(f"  {corpus} (hidden positives in the training split: {hidden})")
            for loop, cell in loops.items():
                found = " / ".join(f"{cell['found'][n]['mean']:6.1f}" for n in cell["found"])
                last = max(cell["recall"])
                print(
                    f"    {loop:<22} {found}   recall@{last} {cell['recall'][last]['mean']:.2f} ± "
                    f"{cell['recall'][last]['std']:.2f}   {cell['seconds']:.0f} s/loop"
                )
    if "estimator" in result:
        print(
            "\nRemaining-positives estimator (default loop, validation samples of expected size n): coverage of the true "
            "count by the 95% interval (all draws; mean ± std over seeds), its width, how often it is useful, labels it asks for"
        )
        for corpus, by_reviews in result["estimator"].items():
            for reviews, by_size in by_reviews.items():
                for size, e in by_size.items():
                    seeds = e["coverage_by_seed"]
                    needed = "-" if e["labels_needed_median"] is None else f"{e['labels_needed_median']:.0f}"
                    print(
                        f"  {corpus:<5} after {reviews} reviews, n={size}: coverage {e['coverage']:.2f} over {e['draws']} "
                        f"draws ({seeds['mean']:.2f} ± {seeds['std']:.2f}); true left {e['true_left_mean']:.1f}, estimate "
                        f"{e['estimate_mean']:.1f}, width {e['width_mean']:.0f} ± {e['width_std']:.0f}; useful "
                        f"{e['useful_share']:.2f}, more labels asked (median) {needed}"
                    )
        print(
            "\nCalibration (default loop): the 50 candidates after the next 20, mean displayed number vs. share positive "
            "(fitted on those 20 and the validation sample)"
        )
        for corpus, by_reviews in result["estimator"].items():
            for reviews, by_size in by_reviews.items():
                for size, e in by_size.items():
                    shown = "-" if e["shown_probability_mean"] is None else f"{e['shown_probability_mean']:.3f}"
                    print(
                        f"  {corpus:<5} after {reviews} reviews, n={size}: positive {e['shown_positive_mean']:.3f}, raw score "
                        f"{e['shown_score_mean']:.3f}, calibrated {shown} (fitted in {e['calibrated_share']:.0%} of draws)"
                    )


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        value: object
        if raw in ("None", "none"):
            value = None
        elif raw in ("True", "False"):
            value = raw == "True"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key] = value
    return out


AUTO_SETTINGS = (
    "COLD_START_POSITIVES", "EXPLORE_SHARE", "UNEXPLORED_SHARE", "CLASS_LIFT_SHARE", "UNCERTAIN_SHARE", "WARM_MAIN",
    "NAME_PRIOR", "SEMANTIC_PROBE_FROM", "EXPLORE_BELOW",
)


def apply_auto_settings(pairs: list[str]) -> dict[str, object]:
    """Try another setting of the default strategy (``--auto NAME=VALUE``: a constant of
    :mod:`bgminer.strategies`); returns every setting in force."""
    for name, value in parse_overrides(pairs).items():
        if name not in AUTO_SETTINGS:
            raise SystemExit(f"--auto: {name} is not one of {', '.join(AUTO_SETTINGS)}")
        setattr(strategies, name, value)
    return {name: getattr(strategies, name) for name in AUTO_SETTINGS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, adapter mode, fewer loops")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5; 2 with --quick)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--corpora", nargs="+", choices=list(CORPORA), default=list(CORPORA))
    parser.add_argument("--protocols", nargs="+", choices=["A", "B"], default=["A", "B"])
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, help="protocol A training modes (default both; adapter with --quick)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="protocol A methods")
    parser.add_argument(
        "--head-init", choices=["zero", "probe"], default="zero", help="protocol A: main head at zero (engine) or at the LR probe"
    )
    parser.add_argument("--ks", nargs="+", default=None, help="protocol A k values; 'all' for every positive")
    parser.add_argument(
        "--strategies", nargs="+", default=None, help=f"protocol B strategies (default {' '.join(STRATEGY_NAMES)})"
    )
    parser.add_argument(
        "--strategy-corpora",
        nargs="+",
        choices=list(CORPORA),
        default=["4%"],
        help="corpora where protocol B runs every strategy; elsewhere only the first (few positives to find there)",
    )
    parser.add_argument("--no-baselines", action="store_true", help="protocol B: only the strategies' loops")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig field override"
    )
    parser.add_argument("--auto", action="append", default=[], metavar="NAME=VALUE",
                        help="another setting of the default strategy (a constant of bgminer.strategies)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--partial", action="store_true", help="use the images embedded so far (never starts embedding)")
    parser.add_argument("--validation-sizes", nargs="+", type=int, default=[VALIDATION_SIZE],
                        help="estimator check: expected sizes of the validation samples drawn (default 30, the product's)")
    args = parser.parse_args(argv)
    global VALIDATION_SIZES
    VALIDATION_SIZES = tuple(args.validation_sizes)
    torch.set_num_threads(args.threads)
    n_seeds = args.seeds or (2 if args.quick else 5)
    modes = tuple(args.modes or (("adapter",) if args.quick else MODES))
    ks = tuple(None if k == "all" else int(k) for k in args.ks) if args.ks else ((20, None) if args.quick else KS)
    strategies = tuple(args.strategies or (("most-likely",) if args.quick else STRATEGY_NAMES))
    trainer = Trainer(parse_overrides(args.overrides))
    auto = apply_auto_settings(args.auto)

    started = time.perf_counter()
    data = load_data(args.partial)
    result: dict = {
        "benchmark": "quality",
        "images": len(data.paths),
        "positives": int(data.positive.sum()),
        "seeds": list(range(args.first_seed, args.first_seed + n_seeds)),
        "overrides": trainer.overrides,
        "auto": auto,
        "head_init": args.head_init,
        "default_config": {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)},
        "threads": args.threads,
    }
    rows_a: list[dict] = []
    rows_b: list[dict] = []
    timings: dict[str, float] = {"load": time.perf_counter() - started}
    for corpus in args.corpora:
        for seed in result["seeds"]:
            split = make_split(data, corpus, seed)
            if "A" in args.protocols:
                t = time.perf_counter()
                rows_a.extend(protocol_a(data, split, trainer, modes, ks, tuple(args.methods), args.head_init))
                timings["A"] = timings.get("A", 0.0) + time.perf_counter() - t
            if "B" in args.protocols:
                t = time.perf_counter()
                names = strategies if corpus in args.strategy_corpora else strategies[:1]
                loops = [("bs", s) for s in names]
                if not args.no_baselines:
                    loops += [("none", "random"), ("lr", "most-likely"), ("none", "near-positives")]
                for learner, name in loops:
                    estimate = learner == "bs" and name == DEFAULT_STRATEGY  # the estimator under the shipped loop
                    rows_b.append(run_loop(data, split, learner, name, trainer, args.rounds, args.per_round, estimate))
                timings["B"] = timings.get("B", 0.0) + time.perf_counter() - t
            print(f"[{time.perf_counter() - started:6.0f} s] {corpus} seed {seed} done", file=sys.stderr, flush=True)
    if rows_a:
        result["A"] = summarize_a(rows_a)
    if rows_b:
        result["B"] = summarize_b(rows_b)
        result["estimator"] = summarize_estimates(rows_b)
    timings["total"] = time.perf_counter() - started
    result["seconds"] = timings
    if args.json:
        result["raw"] = {"A": rows_a, "B": [{k: v for k, v in r.items() if k in RAW_KEYS} for r in rows_b]}
        print(json.dumps(result, default=float))
        return
    print(
        f"quality benchmark: {result['images']} images, {result['positives']} {RARE_CATEGORY}, seeds {result['seeds']}, "
        f"overrides {trainer.overrides or 'none'}"
    )
    print_tables(result)
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
