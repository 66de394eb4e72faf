"""GPU check: embedding throughput (decode workers, nvJPEG) and short full-mode and last-stage rounds on CUDA.

    bash bench/gpu_check.sh                      # on a CUDA machine; prints one JSON object
    bash bench/gpu_check.sh --sweep 4 8 16       # also embedding img/s per number of decode workers
    python bench/gpu_check.py --device cpu --repeat 1 --jpeg-device cpu --compare-seeds 1 --compare-max-steps 2  # smoke

Uses the demo corpus (assets/demo, 400 PNGs, repeated ``--repeat`` times through symlinks) and the
same images re-encoded as 1000-px JPEGs, with their ground-truth labels, so it needs nothing but
the repository and the pretrained weights. Embedding runs:

- ``png``: decoded in ``--workers`` processes (default: every core), fp16 forward;
- ``jpeg_workers``: the JPEGs decoded in the worker processes (PIL, draft scaling);
- ``jpeg_nvjpeg``: the JPEGs left encoded by the workers and decoded in batches by nvJPEG
  (``torchvision.io.decode_jpeg(device="cuda")``), resized and cropped on the GPU;
- ``forward_ceiling``: the same forward pass on a pre-decoded batch, repeated (the GPU's own rate).

Then ``full_vs_last_stage`` (``bench/full_mode.py``): AP of adapter, last-stage and full-mode rounds at
20 positives per demo category of 40+ images, full mode starting from the last-stage model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bgminer.backbone import load_backbone
from bgminer.evaluate import average_precision
from bgminer.feature_cache import FeatureCache
from bgminer.features import PixelLoader, embed_images, forward_backbone, net_on
from bgminer.model import build_model
from bgminer.pixels import default_workers
from bgminer.scoring import score
from bgminer.store import Store
from bgminer.train import TrainConfig, build_training_set, train

DEMO = ROOT / "assets" / "demo"


def to_jpeg(source: str, target: str, long_side: int = 1000) -> str:
    with Image.open(source) as image:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    scale = long_side / max(rgb.size)
    rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BICUBIC).save(
        target, "JPEG", quality=90
    )
    return target


def corpus_store(folder: Path, files: list[str], repeat: int) -> Store:
    """A store of ``files`` repeated ``repeat`` times, each repeat through its own symlinks (the store holds a path once)."""
    folder.mkdir(parents=True)
    paths = []
    for k in range(repeat):
        (folder / f"r{k}").mkdir()
        for p in files:
            link = folder / f"r{k}" / Path(p).name
            link.symlink_to(p)
            paths.append(str(link))
    store = Store(folder / "p.sqlite")
    store.add_images([{"path": p, "sha256": f"{i:064x}", "status": "ok"} for i, p in enumerate(paths)])
    return store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    parser.add_argument("--workers", type=int, default=None, help="decode worker processes (default: bgminer's for the device)")
    parser.add_argument("--jpeg-device", default="auto", help="where JPEGs are decoded in the nvjpeg run (cpu: smoke test)")
    parser.add_argument("--sweep", type=int, nargs="*", default=[], help="also embed the PNGs with each of these worker counts")
    parser.add_argument("--compare-seeds", type=int, default=2, help="full vs last-stage seeds (bench/full_mode.py); 0 skips")
    parser.add_argument("--compare-max-steps", type=int, default=None, help="cap those rounds (smoke tests only)")
    args = parser.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is meant for a GPU machine")
    cuda = dev == "cuda"
    workers = default_workers(dev) if args.workers is None else args.workers
    jpeg_device = ("cuda" if cuda else None) if args.jpeg_device == "auto" else args.jpeg_device

    def peak_mb() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")

    def reset_peak() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    with open(DEMO / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pngs = [str(DEMO / r["path"]) for r in rows]
    rare = np.array([r["category"] == "animals" for r in rows])
    out: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "workers": workers,
        "batch_size": args.batch_size,
        "load_average_before": os.getloadavg()[0],
    }
    bb = load_backbone()
    with tempfile.TemporaryDirectory() as tmp:
        jpeg_dir = Path(tmp) / "jpeg"
        jpeg_dir.mkdir()
        with ProcessPoolExecutor(min(16, len(os.sched_getaffinity(0)))) as pool:
            jpegs = list(pool.map(to_jpeg, pngs, [str(jpeg_dir / (Path(p).stem + ".jpg")) for p in pngs]))

        def embed(name: str, files: list[str], n_workers: int, jpeg: str | None) -> tuple[Store, FeatureCache, dict]:
            store = corpus_store(Path(tmp) / name, files, args.repeat)
            cache = FeatureCache(Path(tmp) / name / "features", bb.feature_dim, len(bb.class_names), bb.map_shape)
            embed_images(store, cache, bb, ids=list(range(1, 65)), batch_size=64, device=dev, workers=n_workers, jpeg_device=jpeg)
            reset_peak()
            rep = embed_images(store, cache, bb, batch_size=args.batch_size, device=dev, workers=n_workers, jpeg_device=jpeg)
            figures = {
                "images": rep.embedded,
                "failed": rep.failed,
                "workers": rep.workers,
                "jpeg_device": jpeg,
                "images_per_second": rep.images_per_second,
                "peak_gpu_mb": peak_mb(),
            }
            return store, cache, figures

        store, cache, out["embed_png"] = embed("png", pngs, workers, None)
        _, _, out["embed_jpeg_workers"] = embed("jpeg_cpu", jpegs, workers, None)
        jpeg_store, _, out["embed_jpeg_nvjpeg"] = embed("jpeg_gpu", jpegs, workers, jpeg_device)
        out["embed_png_sweep"] = [embed(f"sweep{w}", pngs, w, None)[2] for w in args.sweep]
        out["forward_ceiling"] = forward_ceiling(bb, torch.device(dev), args.batch_size, cache.has_maps)

        ids = np.arange(1, len(pngs) + 1)  # the first copy of the corpus
        rng = np.random.default_rng(0)
        seeds = rng.choice(ids[rare], 5, replace=False)
        labels = {0: {int(i): "positive" for i in seeds}}
        logits = cache.open("logits")
        png_pixels = PixelLoader(store, bb, workers=workers, jpeg_device=None)
        jpeg_pixels = PixelLoader(jpeg_store, bb, workers=workers, jpeg_device=jpeg_device)
        for name, mode, inputs, epochs in (
            ("train_full", "full", png_pixels, args.epochs),
            ("train_full_jpeg_nvjpeg", "full", jpeg_pixels, args.epochs),
            ("train_last-stage", "last-stage", cache.open("maps"), args.epochs * 4),
        ):
            config = TrainConfig(mode=mode, epochs=epochs, device=dev, background_ratio=40)
            training_set = build_training_set(inputs, labels, ids, logits, config)
            model = build_model(mode, bb, ["animals"])
            reset_peak()
            result = train(model, training_set, config)
            t0 = time.perf_counter()
            _, scores = score(result.model, inputs, ids, batch_size=256, device=dev)
            score_s = time.perf_counter() - t0
            if isinstance(inputs, PixelLoader):
                inputs.close()
            test = ~np.isin(ids, seeds)
            out[name] = {
                "samples": result.samples,
                "seconds": result.seconds,
                "train_images_per_second": result.samples / result.seconds,
                "score_images_per_second": len(ids) / score_s,
                "peak_gpu_mb": peak_mb(),
                "demo_ap_from_5_seeds": average_precision(rare[test], scores[test, 0]),
                "final_loss": result.epochs[-1].total,
            }
    if args.compare_seeds:
        from bench.full_mode import run as full_vs_last_stage

        out["full_vs_last_stage"] = full_vs_last_stage(dev, None, args.compare_seeds, 20, args.compare_max_steps)
    out["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


def forward_ceiling(bb, dev: torch.device, batch_size: int, with_maps: bool, seconds: float = 3.0) -> dict:
    """Images/s of the embedding forward alone (pixels already on the device), as embedding runs it."""
    net = net_on(bb.net, dev)
    x = torch.randn(batch_size, 3, bb.preprocess.crop, bb.preprocess.crop, device=dev)
    forward_backbone(net, x, dev, with_maps)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward_backbone(net, x, dev, with_maps)  # copies the results to the host, as embedding does
        done += batch_size
    return {"images_per_second": done / (time.perf_counter() - start), "with_maps": with_maps}


if __name__ == "__main__":
    main()
