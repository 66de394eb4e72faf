"""GPU check: embedding throughput and a short full-mode (end-to-end) training round on CUDA.

    bash bench/gpu_check.sh            # on a CUDA machine; prints one JSON object

Uses the demo corpus (assets/demo, 400 images, repeated ``--repeat`` times for embedding) and
its ground-truth labels, so it needs nothing but the repository and the pretrained weights.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bgminer.backbone import load_backbone
from bgminer.evaluate import average_precision
from bgminer.feature_cache import FeatureCache
from bgminer.features import PixelLoader, embed_images
from bgminer.model import build_model
from bgminer.scoring import score
from bgminer.store import Store
from bgminer.train import TrainConfig, build_training_set, train

DEMO = ROOT / "assets" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    args = parser.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is meant for a GPU machine")
    cuda = dev == "cuda"

    def peak_mb() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    with open(DEMO / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    paths = [str(DEMO / r["path"]) for r in rows]
    rare = np.array([r["category"] == "animals" for r in rows])
    out: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    bb = load_backbone()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "p.sqlite")
        all_paths = []  # each repeat through its own symlinks: the store holds a path once
        for k in range(args.repeat):
            (Path(tmp) / f"r{k}").mkdir()
            for p in paths:
                link = Path(tmp) / f"r{k}" / Path(p).name
                link.symlink_to(p)
                all_paths.append(str(link))
        store.add_images([{"path": p, "sha256": f"{i:064x}", "status": "ok"} for i, p in enumerate(all_paths)])
        cache = FeatureCache(Path(tmp) / "features", bb.feature_dim, len(bb.class_names), bb.map_shape)
        embed_images(store, cache, bb, ids=list(range(1, 65)), batch_size=64, device=dev, decode_threads=16)  # warm-up
        reset_peak()
        rep = embed_images(store, cache, bb, batch_size=args.batch_size, device=dev, decode_threads=16)
        out["embed"] = {"images": rep.embedded, "images_per_second": rep.images_per_second, "peak_gpu_mb": peak_mb()}

        ids = np.arange(1, len(paths) + 1)  # the first copy of the corpus
        rng = np.random.default_rng(0)
        seeds = rng.choice(ids[rare], 5, replace=False)
        labels = {0: {int(i): "positive" for i in seeds}}
        logits = cache.open("logits")
        for mode, inputs, epochs in (
            ("full", PixelLoader(store, bb, threads=16), args.epochs),
            ("last-stage", cache.open("maps"), args.epochs * 4),
        ):
            config = TrainConfig(mode=mode, epochs=epochs, device=dev, background_ratio=40)
            training_set = build_training_set(inputs, labels, ids, logits, config)
            model = build_model(mode, bb, ["animals"])
            reset_peak()
            result = train(model, training_set, config)
            t0 = time.perf_counter()
            _, scores = score(result.model, inputs, ids, batch_size=256, device=dev)
            score_s = time.perf_counter() - t0
            test = ~np.isin(ids, seeds)
            out[f"train_{mode}"] = {
                "samples": result.samples,
                "seconds": result.seconds,
                "train_images_per_second": result.samples / result.seconds,
                "score_images_per_second": len(ids) / score_s,
                "peak_gpu_mb": peak_mb(),
                "demo_ap_from_5_seeds": average_precision(rare[test], scores[test, 0]),
                "final_loss": result.epochs[-1].total,
            }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
