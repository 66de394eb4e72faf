"""Protocol C: a rare class that comes in several styles, seeds from one style only.

Corpus: ``bench/multimode_data.py`` (clip art, emoji, Tux Paint stamps, Fashion-MNIST). For each
concept (bird, footwear, ...) and prevalence (0.5%, 0.1% of the corpus), each seed draws the
concept's positives to that share, spread over the concept's modes (styles/sources, at least one
each), keeps every other image (the concept's family members are the hard negatives), and picks
the seed positives from one mode only (rotating with the seed). Then the product's review loop
(:class:`bgminer.loop.Miner` over ``bench.quality.BenchProject``, an oracle deciding 20 per round,
15 rounds) runs with each loop, on a category named after the concept ("bird", as a person would
name it; the default strategy reads what the name means, ``bgminer.explore.NamePrior``):

- ``bs:auto``          the default strategy over the background-splitting model (the product);
- ``bs:most-likely``   the previous default (model score only);
- ``lr:most-likely``   a logistic-regression probe loop on the pretrained features;
- ``none:near-positives``  kNN to the positives, no training;  ``none:random``.

Reported per prevalence: positives found after 100/200/300 reviews (share of the hidden ones),
the share of the concept's non-seed modes with at least one find, and the AP of the learner's
final ranking over the positives still unreviewed. ``--names wrong`` names each category after the
next concept (bird's "fruit") and ``--auto NAME_PRIOR=0`` ignores names: what a misleading or a
meaningless name costs.

    .venv/bin/python bench/multimode.py                        # 5 seeds x every concept x 0.5% and 0.1%
    .venv/bin/python bench/multimode.py --seeds 2 --concepts bird --prevalences 0.5% --loops bs:auto lr:most-likely
    .venv/bin/python bench/multimode.py --json > docs/results/quality-C.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.multimode_data import CONCEPTS, Item, multimode_project
from bench.quality import CHECKPOINTS, Data, Split, Trainer, apply_auto_settings, knn_scores, mean_std, parse_overrides, run_loop
from bgminer.evaluate import average_precision

PREVALENCES = {"0.5%": 0.005, "0.1%": 0.001}
LOOPS = ("bs:auto", "bs:most-likely", "lr:most-likely", "none:near-positives", "none:random")
SEED_POSITIVES = 5


def load(backbone: str) -> tuple[Data, list[Item]]:
    """Cached features of every embedded image (row = image id, as BenchProject expects) and their items."""
    project, by_id = multimode_project(backbone=backbone)
    embedded = set(project.store.image_ids(embedded=True))
    ids = np.array(sorted(i for i in by_id if i in embedded), dtype=np.int64)
    size = int(ids.max()) + 1
    rows = {name: project.features.read(name, ids) for name in ("pooled", "logits", "maps")}
    full = {name: np.zeros((size, *a.shape[1:]), a.dtype) for name, a in rows.items()}
    for name, a in rows.items():
        full[name][ids] = a
    paths = [""] * size
    items: list[Item | None] = [None] * size
    for i in ids.tolist():
        paths[i], items[i] = str(by_id[i].path), by_id[i]
    data = Data(paths=paths, positive=np.zeros(size, bool), **full)
    data.row_of = {p: r for r, p in enumerate(paths) if p}
    return data, items


def draw(items: list[Item | None], concept: str, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corpus rows, positive mask over the rows, seed rows): positives thinned to ``fraction`` of the corpus,
    at least one per mode, and the seeds from one mode (the ``seed``-th of the modes with 2+ positives)."""
    rng = np.random.default_rng([seed, len(concept)])
    present = [r for r, it in enumerate(items) if it is not None]
    negatives = [r for r in present if concept not in items[r].concepts]
    by_mode: dict[str, list[int]] = {}
    for r in present:
        if concept in items[r].concepts:
            by_mode.setdefault(items[r].mode, []).append(r)
    modes = sorted(by_mode)
    want = max(len(modes), round(fraction * len(negatives) / (1 - fraction)))
    total = sum(len(v) for v in by_mode.values())
    share = {m: max(1, round(want * len(by_mode[m]) / total)) for m in modes}
    chosen = {m: rng.choice(by_mode[m], min(share[m], len(by_mode[m])), replace=False) for m in modes}
    seedable = [m for m in modes if len(chosen[m]) >= 2] or modes
    seed_mode = seedable[seed % len(seedable)]
    n_seeds = min(SEED_POSITIVES, max(1, len(chosen[seed_mode]) // 2))
    seeds = rng.choice(chosen[seed_mode], n_seeds, replace=False)
    rows = np.sort(np.concatenate([np.asarray(negatives), *chosen.values()]).astype(np.int64))
    positive = np.isin(rows, np.concatenate(list(chosen.values())))
    return rows, positive, np.sort(seeds.astype(np.int64))


def category_name(concept: str, names: str, concepts: list[str]) -> str:
    """What the person calls the category: the concept's own word, or (``names="wrong"``) the next
    concept's, to measure what a name that means something else costs."""
    if names == "wrong":
        return concepts[(concepts.index(concept) + 1) % len(concepts)]
    return concept


def one_run(
    data: Data, items, concept: str, corpus: str, seed: int, loop: str, trainer: Trainer, rounds: int, name: str | None = None
) -> dict:
    rows, positive, seeds = draw(items, concept, PREVALENCES[corpus], seed)
    truth = np.zeros(len(data.positive), bool)
    truth[rows[positive]] = True
    run_data = replace(data, positive=truth)
    learner, strategy = loop.split(":")
    split = Split(corpus, seed, rows, rows[:0])
    result = run_loop(run_data, split, learner, strategy, trainer, rounds, 20, seeds=seeds, category=name or concept)
    seed_mode = items[int(seeds[0])].mode
    modes = {items[r].mode for r in rows[positive]}
    found_modes = {items[i].mode for i in result["reviewed_ids"] if truth[i]}
    others = modes - {seed_mode}
    reviewed = np.isin(rows, np.r_[np.asarray(result["reviewed_ids"], np.int64), seeds])
    remaining_truth = truth[rows[~reviewed]]
    final = result["final_scores"]
    if final is None:  # no learner: rank the rest by the kNN loop's own measure
        found = np.r_[seeds, [i for i in result["reviewed_ids"] if truth[i]]].astype(np.int64)
        final = knn_scores(data, found, rows)
    ap = average_precision(remaining_truth, np.asarray(final)[~reviewed]) if remaining_truth.any() else float("nan")
    result.update(
        concept=concept,
        category=name or concept,
        seed_mode=seed_mode,
        modes=sorted(modes),
        other_modes_found=len(others & found_modes) / len(others) if others else float("nan"),
        modes_found=len(found_modes | {seed_mode}) / len(modes),
        remaining_ap=ap,
        remaining=int(remaining_truth.sum()),
        prevalence=float(positive.mean()),
    )
    for key in ("reviewed_ids", "final_scores", "estimates"):
        result.pop(key)
    return result


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        cell = out.setdefault(r["corpus"], {}).setdefault(r["loop"], {"recall": {}, "other_modes_found": [], "remaining_ap": []})
        for n, v in r["recall"].items():
            cell["recall"].setdefault(n, []).append(v)
        cell["other_modes_found"].append(r["other_modes_found"])
        cell["remaining_ap"].append(r["remaining_ap"])
    for loops in out.values():
        for cell in loops.values():
            cell["n"] = len(cell["remaining_ap"])
            cell["recall"] = {n: dict(zip(("mean", "std"), mean_std(v), strict=True)) for n, v in cell["recall"].items()}
            for key in ("other_modes_found", "remaining_ap"):
                v = [x for x in cell[key] if not math.isnan(x)]
                cell[key] = dict(zip(("mean", "std"), mean_std(v), strict=True)) if v else None
    return out


def print_summary(result: dict) -> None:
    print(f"protocol C: {result['images']} images, concepts {', '.join(result['concepts'])}, seeds {result['seeds']}")
    for corpus, loops in result["summary"].items():
        print(f"\n  {corpus}: share of hidden positives found after {' / '.join(map(str, CHECKPOINTS))} reviews "
              "(mean ± std over concepts x seeds); other modes hit; AP of the unreviewed rest")
        for loop, cell in loops.items():
            recall = " / ".join(f"{v['mean']:5.1%}±{v['std']:4.1%}" for v in cell["recall"].values())
            modes = cell["other_modes_found"]
            ap = cell["remaining_ap"]
            print(f"    {loop:<22} {recall}   modes {modes['mean'] if modes else float('nan'):4.2f}   "
                  f"AP {ap['mean'] if ap else float('nan'):.3f}   (n={cell['n']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--concepts", nargs="+", default=None, help=f"default: all of {sorted(CONCEPTS)}")
    parser.add_argument("--prevalences", nargs="+", choices=list(PREVALENCES), default=list(PREVALENCES))
    parser.add_argument("--loops", nargs="+", default=list(LOOPS), help="learner:strategy pairs")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--auto", action="append", default=[], metavar="NAME=VALUE",
                        help="try another setting of the default strategy (a constant of bgminer.strategies)")
    parser.add_argument("--names", choices=["concept", "wrong"], default="concept",
                        help="the category's name: the concept's word (bird), or the next concept's (a misleading name)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data, items = load(args.backbone)
    concepts = args.concepts or sorted(CONCEPTS)
    unknown = set(concepts) - set(CONCEPTS)
    if unknown:
        parser.error(f"unknown concepts {sorted(unknown)}; choose from {sorted(CONCEPTS)}")
    trainer = Trainer(parse_overrides(args.overrides))
    auto = apply_auto_settings(args.auto)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = []
    for corpus in args.prevalences:
        for concept in concepts:
            for seed in seeds:
                for loop in args.loops:
                    name = category_name(concept, args.names, concepts)
                    runs.append(one_run(data, items, concept, corpus, seed, loop, trainer, args.rounds, name))
                    r = runs[-1]
                    print(f"[{time.perf_counter() - started:6.0f} s] {corpus} {concept} seed {seed} {loop}: "
                          f"found {r['found']} of {r['hidden']}, other modes {r['other_modes_found']:.2f}, "
                          f"AP rest {r['remaining_ap']:.3f}", file=sys.stderr, flush=True)
    result = {
        "benchmark": "quality-C",
        "images": int(sum(it is not None for it in items)),
        "backbone": args.backbone,
        "concepts": concepts,
        "modes": {c: dict(Counter(it.mode for it in items if it is not None and c in it.concepts)) for c in concepts},
        "seeds": seeds,
        "overrides": trainer.overrides,
        "auto": auto,
        "names": args.names,
        "summary": summarize(runs),
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        result["raw"] = runs
        print(json.dumps(result, default=float))
    else:
        print_summary(result)


if __name__ == "__main__":
    main()
