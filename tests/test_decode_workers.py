"""Decoding in worker processes (bgminer.pixels): the same pixels as in process, bad files rejected
inside the workers, cancellation, the JPEG path meant for the GPU (exercised here with torchvision's
CPU decoder), and cache rows read and written without mapping the files."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefiles import noise, png_claiming_size
from PIL import Image

from bgminer.backbone import Preprocess, load_backbone
from bgminer.feature_cache import FeatureCache, read_rows, write_rows
from bgminer.features import PixelLoader, embed_images
from bgminer.imageio import ImageRejected, load_rgb, to_tensor_uint8
from bgminer.pixels import Decoder, default_workers, orient
from bgminer.progress import Cancelled, CancelToken
from bgminer.store import Store

ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def backbone():
    return load_backbone()


def blocks(h: int, w: int, seed: int) -> np.ndarray:
    """Flat colour quadrants plus a little noise: any wrong turn or flip changes most pixels."""
    arr = np.zeros((h, w, 3), np.uint8)
    colours = np.random.default_rng(seed).integers(0, 256, (4, 3))
    arr[: h // 2, : w // 3], arr[: h // 2, w // 3 :] = colours[0], colours[1]
    arr[h // 2 :, : 2 * w // 3], arr[h // 2 :, 2 * w // 3 :] = colours[2], colours[3]
    return arr


def save_jpeg(path: Path, arr: np.ndarray, orientation: int = 1) -> Path:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(arr).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def corpus(folder: Path) -> list[Path]:
    """PNGs, greyscale and RGBA among them, and JPEGs in every EXIF orientation, 40..300 px."""
    folder.mkdir()
    files = []
    for i in range(6):
        img = Image.fromarray(noise(40 + 13 * i, 70 + 9 * i, seed=i))
        img = [img, img.convert("L"), img.convert("RGBA")][i % 3]
        files.append(folder / f"p{i}.png")
        img.save(files[-1])
    for o in range(1, 9):
        files.append(save_jpeg(folder / f"j{o}.jpg", blocks(180 + 15 * o, 300 - 10 * o, seed=o), o))
    return files


def store_of(root: Path, files: list[Path]) -> Store:
    store = Store(root / "p.sqlite")
    store.add_images([{"path": str(p), "sha256": f"{i:064x}", "status": "ok"} for i, p in enumerate(files)])
    return store


def expected(backbone, path: Path) -> torch.Tensor:
    return Preprocess(backbone.preprocess)(to_tensor_uint8(load_rgb(path, draft_size=backbone.preprocess.resize)))


def requests(files: list[Path], batch: int = 5, train: bool = False):
    for b in range(0, len(files), batch):
        chunk = files[b : b + batch]
        yield list(range(b + 1, b + 1 + len(chunk))), [str(p) for p in chunk], train, b


def decode_all(decoder: Decoder, files: list[Path], train: bool = False):
    ids, pixels, rejected = [], [], []
    for got_ids, x, bad in decoder(requests(files, train=train)):
        ids += got_ids
        rejected += bad
        if x is not None:
            pixels.append(x)
    return ids, torch.cat(pixels), rejected


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_hand_back_exactly_the_pixels_of_the_in_process_preprocess(tmp_path, backbone, workers):
    files = corpus(tmp_path / "img")
    decoder = Decoder(backbone.preprocess, workers)
    try:
        ids, pixels, rejected = decode_all(decoder, files)
    finally:
        decoder.close()
    assert rejected == [] and ids == list(range(1, len(files) + 1))
    assert torch.equal(pixels, torch.stack([expected(backbone, p) for p in files]))
    assert multiprocessing.active_children() == []


def test_from_a_job_thread_workers_start_from_a_forkserver_with_the_same_pixels(tmp_path, backbone):
    files = corpus(tmp_path / "img")[:7]
    out: dict = {}

    def job() -> None:  # the app embeds on a job thread: fork is off the table there
        from bgminer.pixels import worker_context

        out["method"] = worker_context().get_start_method()
        decoder = Decoder(backbone.preprocess, 2)
        try:
            out["result"] = decode_all(decoder, files)
        finally:
            decoder.close()

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(timeout=300)
    assert out["method"] in ("forkserver", "spawn")
    _, pixels, rejected = out["result"]
    assert rejected == [] and torch.equal(pixels, torch.stack([expected(backbone, p) for p in files]))


def test_bad_files_are_rejected_inside_the_workers_and_the_rest_embedded(tmp_path, backbone):
    files = corpus(tmp_path / "img")[:4]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bomb.png").write_bytes(png_claiming_size(30_000, 30_000))  # 900 MP header: refused before decoding
    good = (tmp_path / "img" / "p0.png").read_bytes()
    (bad / "cut.png").write_bytes(good[: len(good) // 2])
    (bad / "text.jpg").write_bytes(b"not an image at all")
    files += [bad / "bomb.png", bad / "cut.png", bad / "text.jpg", bad / "gone.png"]
    store = store_of(tmp_path, files)
    cache = FeatureCache(tmp_path / "features", backbone.feature_dim, len(backbone.class_names), backbone.map_shape)
    report = embed_images(store, cache, backbone, batch_size=3, device="cpu", workers=2)
    assert (report.embedded, report.failed, report.workers) == (4, 4, 2)
    assert store.rejected_counts() == {"too_large": 1, "truncated": 1, "not_an_image": 1, "unreadable": 1}
    assert store.image_ids(embedded=False) == []


def test_embedding_with_workers_writes_the_same_rows_as_in_process(tmp_path, backbone):
    files = corpus(tmp_path / "img")
    rows = {}
    for workers in (0, 2):
        root = tmp_path / f"w{workers}"
        root.mkdir()
        store = store_of(root, files)
        cache = FeatureCache(root / "features", backbone.feature_dim, len(backbone.class_names), backbone.map_shape)
        report = embed_images(store, cache, backbone, batch_size=4, device="cpu", workers=workers)
        assert report.embedded == len(files)
        ids = store.image_ids()
        rows[workers] = {name: cache.read(name, ids) for name in ("pooled", "logits", "maps")}
    for name in rows[0]:
        np.testing.assert_array_equal(rows[0][name], rows[2][name])


def test_cancelling_stops_the_workers_keeps_finished_batches_and_a_rerun_completes(tmp_path, backbone):
    files = corpus(tmp_path / "img")
    store = store_of(tmp_path, files)
    cache = FeatureCache(tmp_path / "features", backbone.feature_dim, len(backbone.class_names), backbone.map_shape)
    token = CancelToken()

    def cancel_after_first_batch(done, total, message=""):
        if done >= 3:
            token.cancel()

    with pytest.raises(Cancelled):
        embed_images(
            store, cache, backbone, batch_size=3, device="cpu", workers=2, progress=cancel_after_first_batch, cancel=token
        )
    assert multiprocessing.active_children() == []
    assert 3 <= len(store.image_ids(embedded=True)) < len(files)
    embed_images(store, cache, backbone, batch_size=3, device="cpu", workers=2)
    assert store.image_ids(embedded=False) == []


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_pixels_upright_as_pil_does(orientation):
    from bgminer.imageio import _UPRIGHT

    arr = noise(5, 7, seed=orientation)
    upright = Image.fromarray(arr).transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else Image.fromarray(arr)
    got = orient(torch.from_numpy(arr).permute(2, 0, 1), orientation)
    assert torch.equal(got, torch.from_numpy(np.array(upright)).permute(2, 0, 1))


def test_jpegs_left_encoded_for_decode_jpeg_come_out_upright_like_the_cpu_path(tmp_path, backbone):
    """The path nvJPEG takes on a GPU, with torchvision's CPU decoder standing in for the device."""
    files = corpus(tmp_path / "img")
    cut = tmp_path / "img" / "cut.jpg"
    whole = files[-1].read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])  # decode_jpeg refuses it, then the CPU decoder names why
    files.append(cut)
    cpu = Decoder(backbone.preprocess, 0)
    encoded = Decoder(backbone.preprocess, 2, jpeg_device="cpu")
    try:
        ids_cpu, want, bad_cpu = decode_all(cpu, files)
        ids_enc, got, bad_enc = decode_all(encoded, files)
    finally:
        encoded.close()
    assert ids_enc == ids_cpu == list(range(1, len(files)))
    assert [(i, e.reason) for i, e in bad_enc] == [(i, e.reason) for i, e in bad_cpu] == [(len(files), "truncated")]
    png = slice(0, 6)
    assert torch.equal(got[png], want[png])  # not JPEG: decoded in the workers as before
    for k in range(6, len(ids_cpu)):  # JPEGs: full decode + resize vs draft decode; same picture, same way up
        assert (got[k] - want[k]).abs().mean() < 0.05, f"orientation {k - 5}"


def test_pixel_loader_training_views_depend_on_the_seed_not_on_the_workers(tmp_path, backbone):
    files = corpus(tmp_path / "img")
    store = store_of(tmp_path, files)
    id_batches = [np.array([1, 2, 3, 7]), np.array([8, 9, 14]), np.array([4, 5, 6, 10, 11])]
    views = {}
    for workers in (0, 2):
        loader = PixelLoader(store, backbone, workers=workers, seed=3)
        try:
            first = list(loader.batches(id_batches, True, torch.device("cpu")))
            second = list(loader.batches(id_batches[:1], False, torch.device("cpu")))  # the workers stay up between passes
        finally:
            loader.close()
        views[workers] = first
        assert torch.equal(second[0], torch.stack([expected(backbone, files[i - 1]) for i in id_batches[0]]))
    assert multiprocessing.active_children() == []
    for a, b in zip(views[0], views[2], strict=True):
        assert a.shape[1:] == (3, 224, 224) and torch.equal(a, b)
    again = PixelLoader(store, backbone, workers=0, seed=4)
    assert not torch.equal(next(again.batches(id_batches[:1], True, torch.device("cpu"))), views[0][0])


def test_pixel_loader_raises_for_a_file_that_vanished(tmp_path, backbone):
    files = corpus(tmp_path / "img")[:3]
    store = store_of(tmp_path, files)
    files[1].unlink()
    loader = PixelLoader(store, backbone, workers=1)
    try:
        with pytest.raises(ImageRejected, match="image 2"):
            list(loader.batches([np.array([1, 2, 3])], False, torch.device("cpu")))
    finally:
        loader.close()


def test_worker_counts():
    assert 1 <= default_workers("cpu") <= 4
    assert default_workers("cuda") >= default_workers("cpu")
    with pytest.raises(ValueError, match="workers"):
        Decoder(load_backbone().preprocess, -1)


def test_rows_are_read_and_written_by_file_io_like_fancy_indexing(tmp_path):
    path = tmp_path / "a.npy"
    data = np.random.default_rng(0).standard_normal((50, 3, 2)).astype(np.float16)
    np.save(path, data)
    array = np.load(path, mmap_mode="r")
    ids = np.array([7, 3, 4, 5, 49, 0, 3, 20, 21])
    np.testing.assert_array_equal(read_rows(array, ids), data[ids])
    np.testing.assert_array_equal(read_rows(array[2:], ids[:3]), data[2:][ids[:3]])  # a view: fancy indexing
    with pytest.raises(IndexError):
        read_rows(array, np.array([50]))
    new = np.arange(4 * 6, dtype=np.float16).reshape(4, 3, 2)
    write_rows(path, np.array([9, 2, 3, 40]), new)
    data[[9, 2, 3, 40]] = new
    np.testing.assert_array_equal(np.load(path), data)
    with pytest.raises(ValueError, match="do not fit"):
        write_rows(path, np.array([1]), new[:1].astype(np.float32))


def _rss_file_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssFile:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_a_whole_cache_file_leaves_none_of_it_resident_in_this_process(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.ones((16384, 1024), np.float32))  # 64 MiB
    ids = np.arange(16384)
    before = _rss_file_kb()
    assert read_rows(np.load(path, mmap_mode="r"), ids).sum() == 16384 * 1024
    assert _rss_file_kb() - before < 16 * 1024
    mapped = np.load(path, mmap_mode="r")
    assert np.asarray(mapped[ids]).sum() == 16384 * 1024  # through the map: the pages stay resident
    assert _rss_file_kb() - before > 32 * 1024
    del mapped


def test_jpeg_bytes_of_a_cmyk_jpeg_go_through_the_cpu_decoder(tmp_path, backbone):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(blocks(60, 80, 1)).convert("CMYK").save(path, "JPEG")
    decoder = Decoder(backbone.preprocess, 0, jpeg_device="cpu")
    ((ids, x, bad),) = list(decoder([([1], [str(path)], False, 0)]))
    assert ids == [1] and bad == [] and torch.equal(x[0], expected(backbone, path))
