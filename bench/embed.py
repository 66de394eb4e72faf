"""Embedding throughput: the pipeline vs. the model-forward ceiling vs. a naive loop.

    python bench/embed.py [--n 1000] [--batch-size 32] [--json] [--rss-images 10000]
                          [--backbone efficientnet_lite0 ...] [--threads 2] [--sets png,jpeg-1000px]
                          [--workers 0 1 2]

On N real clip-art PNGs and the same images re-encoded as ~1000-px JPEGs (bench/datasets.py):
- pipeline: bgminer's embed_images into a fresh project (threaded decode one batch ahead of
  the forward pass, JPEG draft decoding, channels_last, inference_mode);
- ceiling: the same forward pass (stem + head + classifier, same batch size and threads) on
  tensors decoded beforehand, i.e. what the pipeline would reach if decoding were free;
- naive: PIL full decode + transform + forward, one image at a time in one loop.
``--rss-images`` also embeds that many images in a child process and reports its peak RSS
(features stream to memory-mapped files, so memory stays flat).
``--backbone`` takes one or more registered backbones (each at its own input size) and
``--threads`` sets torch's intra-op threads (default: torch's own choice); the load average
is recorded beside the numbers. ``--workers`` runs the pipeline once per number of decode worker
processes (0: decoded in the embedding thread; default: bgminer's default for the machine).
Peak memory at 10k and 100k images: ``bench/memory.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bgminer.backbone import Preprocess, load_backbone
from bgminer.feature_cache import FeatureCache
from bgminer.features import embed_images
from bgminer.imageio import load_rgb, to_tensor_uint8
from bgminer.pixels import default_workers
from bgminer.store import Store

DEFAULT_BACKBONE = "efficientnet_lite0"


def _store_for(paths: list[Path], root: Path, backbone: str = DEFAULT_BACKBONE) -> tuple[Store, FeatureCache]:
    store = Store(root / "bench.sqlite")
    store.add_images([{"path": str(p), "sha256": f"{i:064x}", "status": "ok"} for i, p in enumerate(paths)])
    bb = load_backbone(backbone)
    return store, FeatureCache(root / "features", bb.feature_dim, len(bb.class_names), bb.map_shape)


def pipeline(paths: list[Path], batch_size: int, backbone: str = DEFAULT_BACKBONE, workers: int | None = None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store, cache = _store_for(paths, Path(tmp), backbone)
        report = embed_images(store, cache, load_backbone(backbone), batch_size=batch_size, workers=workers)
        return report.images_per_second


def ceiling(paths: list[Path], batch_size: int, backbone: str = DEFAULT_BACKBONE) -> float:
    bb = load_backbone(backbone)
    pre = Preprocess(bb.preprocess)
    tensors = [pre(to_tensor_uint8(load_rgb(p, draft_size=bb.preprocess.resize))) for p in paths]
    net = bb.net.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tensors), batch_size):
            x = torch.stack(tensors[i : i + batch_size]).contiguous(memory_format=torch.channels_last)
            maps = net.stem(x)
            pooled = net.last_stage(maps)
            net.classifier(pooled)
            np.asarray(maps.numpy(), dtype=np.float16)  # the pipeline converts maps for the cache too
    return len(tensors) / (time.perf_counter() - start)


def naive(paths: list[Path], backbone: str = DEFAULT_BACKBONE) -> float:
    bb = load_backbone(backbone)
    pre = Preprocess(bb.preprocess)
    start = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            with Image.open(p) as img:
                rgb = img.convert("RGBA")
                white = Image.new("RGBA", rgb.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgb).convert("RGB")
            bb.net(pre(to_tensor_uint8(rgb))[None])
    return len(paths) / (time.perf_counter() - start)


def peak_rss_mb(n: int, batch_size: int, backbone: str = DEFAULT_BACKBONE) -> float:
    """Embed ``n`` images (the clip art, cycled) in a child process; its peak RSS in MB."""
    code = f"""
import sys, tempfile, resource
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from pathlib import Path
from bench.datasets import openclipart
from bench.embed import _store_for
from bgminer.features import embed_images
from bgminer.backbone import load_backbone
items = openclipart()
with tempfile.TemporaryDirectory() as tmp:
    paths = []  # the clip art cycled through per-round symlinks: the store holds each path once
    for i in range({n}):
        link = Path(tmp) / f"r{{i // len(items)}}" / f"{{i % len(items)}}.png"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(items[i % len(items)].path)
        paths.append(link)
    store, cache = _store_for(paths, Path(tmp), {backbone!r})
    embed_images(store, cache, load_backbone({backbone!r}), batch_size={batch_size})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from bench.datasets import large_jpegs, openclipart

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rss-images", type=int, default=0)
    parser.add_argument("--backbone", nargs="+", default=[DEFAULT_BACKBONE], help="registered backbone name(s)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--sets", default="png,jpeg-1000px", help="comma-separated image sets: png, jpeg-1000px")
    parser.add_argument("--workers", type=int, nargs="+", default=[None], help="decode worker processes, one run each")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    items = openclipart()[: args.n]
    wanted = args.sets.split(",")
    sets = {}
    if "png" in wanted:
        sets["png"] = [it.path for it in items]
    if "jpeg-1000px" in wanted:
        sets["jpeg-1000px"] = [
            it.path for it in large_jpegs(items, Path(__file__).resolve().parent / "data" / "jpeg1000", args.n)
        ]
    rows = []
    for backbone in args.backbone:
        bb = load_backbone(backbone)
        for name, paths in sets.items():
            ceil = ceiling(paths, args.batch_size, backbone)
            base = naive(paths[: max(50, len(paths) // 5)], backbone)
            for workers in args.workers:
                pipe = pipeline(paths, args.batch_size, backbone, workers)
                rows.append(
                    {
                        "backbone": backbone,
                        "workers": default_workers() if workers is None else workers,
                        "crop": bb.preprocess.crop,
                        "map_shape": list(bb.map_shape),
                        "images": name,
                        "n": len(paths),
                        "pipeline_ips": pipe,
                        "pipeline_ms_per_image": 1000.0 / pipe,
                        "ceiling_ips": ceil,
                        "ceiling_ms_per_image": 1000.0 / ceil,
                        "naive_ips": base,
                        "pipeline_over_ceiling": pipe / ceil,
                        "loadavg": list(os.getloadavg()),
                    }
                )
    result = {
        "benchmark": "embed",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "batch_size": args.batch_size,
        "results": rows,
    }
    if args.rss_images:
        mb = peak_rss_mb(args.rss_images, args.batch_size, args.backbone[0])
        result["peak_rss_mb"] = {"images": args.rss_images, "backbone": args.backbone[0], "mb": mb}
    result["this_process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["loadavg_end"] = list(os.getloadavg())
    if args.json:
        print(json.dumps(result))
        return
    print(f"threads {result['threads']}, batch {args.batch_size}")
    print(
        f"{'backbone':<18} {'crop':>4} {'images':<12} {'n':>5} {'workers':>7} {'pipeline img/s':>15} {'ms/img':>7} "
        f"{'ceiling img/s':>14} {'ms/img':>7} {'naive img/s':>12} {'pipe/ceil':>10} {'load(1m)':>9}"
    )
    for r in rows:
        print(
            f"{r['backbone']:<18} {r['crop']:>4} {r['images']:<12} {r['n']:>5} {r['workers']:>7} {r['pipeline_ips']:>15.1f} "
            f"{r['pipeline_ms_per_image']:>7.1f} {r['ceiling_ips']:>14.1f} {r['ceiling_ms_per_image']:>7.1f} "
            f"{r['naive_ips']:>12.1f} {r['pipeline_over_ceiling']:>10.2f} {r['loadavg'][0]:>9.2f}"
        )
    if args.rss_images:
        print(f"peak RSS embedding {args.rss_images} images ({args.backbone[0]}): {result['peak_rss_mb']['mb']:.0f} MB")


if __name__ == "__main__":
    main()
