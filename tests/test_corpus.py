"""Ingest: every file under a source becomes exactly one row, 'ok' with a thumbnail or
'rejected' with the right reason; re-runs, zips, CSV lists and cancels behave."""

from __future__ import annotations

import csv
import io
import shutil
import stat
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from imagefiles import noise, png_claiming_size
from PIL import Image

from bgminer.corpus import IngestError, extract_zip, ingest, thumbnail_path
from bgminer.progress import Cancelled, CancelToken
from bgminer.settings import Limits
from bgminer.store import Store


@pytest.fixture
def project(tmp_path):
    """(store, thumbs_dir, uploads_dir) of a fresh project."""
    return Store(tmp_path / "project.db"), tmp_path / "thumbs", tmp_path / "uploads"


def run(project, sources, **kw):
    store, thumbs, uploads = project
    return ingest(store, [str(s) for s in sources], thumbs, uploads, **kw)


def rows_by_name(store: Store) -> dict[str, dict]:
    return {Path(r["path"]).name: dict(r) for r in store.images("ok") + store.images("rejected")}


def write_pngs(folder: Path, n: int, size: int = 12, first_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:03d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        Image.fromarray(noise(size, size, first_seed + i)).save(path)
    return paths


def make_mixed_folder(root: Path) -> Path:
    """Eight good images of every accepted kind, bad files of every kind, a duplicate, nesting."""
    (root / "good").mkdir(parents=True)
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "bad").mkdir()
    Image.fromarray(noise(300, 600, 1)).save(root / "good" / "photo.jpg")
    shutil.copyfile(root / "good" / "photo.jpg", root / "good" / "photo_copy.jpg")
    Image.fromarray(noise(30, 40, 2)).convert("P").save(root / "good" / "palette.png")
    Image.fromarray(np.dstack([noise(30, 40, 3), np.full((30, 40), 128, np.uint8)])).save(root / "good" / "rgba.png")
    Image.fromarray(noise(30, 40, 4)).save(root / "good" / "pic.webp")
    Image.fromarray(noise(30, 40, 5)).save(root / "good" / "pic.bmp")
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(root / "nested" / "deeper" / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(noise(30, 40, 6)).save(root / "nested" / "scan.tiff")
    Image.fromarray((np.arange(35 * 45).reshape(35, 45) * 20).astype(np.uint16)).save(root / "nested" / "gray16.png")
    full = (root / "good" / "photo.jpg").read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "bad" / "notes.jpg").write_text("these are notes, not a picture\n" * 3)
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "bomb.png").write_bytes(png_claiming_size(50_000, 50_000))
    Image.fromarray(noise(16, 16, 7)).save(root / "bad" / "icon.ico")
    (root / "readme.txt").write_text("not walked: no image suffix")
    (root / ".cache").mkdir()
    Image.fromarray(noise(10, 10, 8)).save(root / ".cache" / "hidden.png")
    Image.fromarray(noise(10, 10, 9)).save(root / ".hidden.png")
    return root


GOOD = {"photo.jpg", "palette.png", "rgba.png", "pic.webp", "pic.bmp", "anim.gif", "scan.tiff", "gray16.png"}
BAD = {
    "photo_copy.jpg": "duplicate",
    "truncated.jpg": "truncated",
    "notes.jpg": "not_an_image",
    "empty.png": "empty_file",
    "bomb.png": "too_large",
    "icon.ico": "unsupported_format",
}


def test_mixed_folder_is_accounted_for_file_by_file(project, tmp_path):
    folder = make_mixed_folder(tmp_path / "corpus")
    report = run(project, [folder])
    rows = rows_by_name(project[0])
    assert {name for name, r in rows.items() if r["status"] == "ok"} == GOOD
    assert {name: r["reason"] for name, r in rows.items() if r["status"] == "rejected"} == BAD
    assert (report.added, report.duplicates, report.ignored, report.skipped_known) == (8, 1, 1, 0)
    assert report.rejected == {reason: 1 for reason in BAD.values()}
    assert report.total_seen == 14 == report.added + sum(report.rejected.values())
    assert sorted(Path(p).name for p, _, _ in report.rejected_files) == sorted(BAD)


def test_rows_carry_resolved_path_hash_size_and_dimensions(project, tmp_path):
    folder = make_mixed_folder(tmp_path / "corpus")
    run(project, [folder])
    rows = rows_by_name(project[0])
    photo = folder / "good" / "photo.jpg"
    assert rows["photo.jpg"]["path"] == str(photo.resolve())
    assert rows["photo.jpg"]["size"] == photo.stat().st_size
    assert (rows["photo.jpg"]["width"], rows["photo.jpg"]["height"]) == (600, 300)
    assert (rows["gray16.png"]["width"], rows["gray16.png"]["height"]) == (45, 35)
    assert rows["photo_copy.jpg"]["sha256"] == rows["photo.jpg"]["sha256"]
    assert str(photo.resolve()) in rows["photo_copy.jpg"]["detail"]


def test_every_accepted_image_has_a_small_jpeg_thumbnail(project, tmp_path):
    run(project, [make_mixed_folder(tmp_path / "corpus")])
    store, thumbs, _ = project
    for row in store.images("ok"):
        with Image.open(thumbnail_path(thumbs, row["sha256"])) as thumb:
            assert thumb.format == "JPEG"
            assert max(thumb.size) <= 256


def test_pixel_limit_applies_to_images_of_moderate_size(project, tmp_path):
    Image.fromarray(noise(300, 300, 1)).save(tmp_path / "big.png")
    Image.fromarray(noise(100, 100, 2)).save(tmp_path / "small.png")
    report = run(project, [tmp_path / "big.png", tmp_path / "small.png"], max_pixels=50_000)
    assert report.added == 1
    assert report.rejected == {"too_large": 1}


def test_reingesting_the_same_folder_adds_nothing(project, tmp_path):
    folder = make_mixed_folder(tmp_path / "corpus")
    first = run(project, [folder])
    second = run(project, [folder])
    assert second.added == 0 and second.rejected == {}
    assert second.skipped_known == second.total_seen == first.total_seen
    assert project[0].image_count(None) == first.total_seen


def test_same_content_in_a_later_run_is_a_duplicate_of_the_stored_original(project, tmp_path):
    (original,) = write_pngs(tmp_path / "a", 1)
    (tmp_path / "b").mkdir()
    shutil.copyfile(original, tmp_path / "b" / "again.png")
    run(project, [tmp_path / "a"])
    report = run(project, [tmp_path / "b"])
    assert report.duplicates == 1
    assert report.rejected_files == [
        (str((tmp_path / "b" / "again.png").resolve()), "duplicate", f"same content as {original.resolve()}")
    ]


def test_symlinked_folder_loops_are_walked_once(project, tmp_path):
    write_pngs(tmp_path / "corpus", 2)
    (tmp_path / "corpus" / "loop").symlink_to(tmp_path / "corpus", target_is_directory=True)
    report = run(project, [tmp_path / "corpus"])
    assert (report.total_seen, report.added) == (2, 2)


def test_missing_source_is_an_error(project, tmp_path):
    with pytest.raises(IngestError, match="no such file or folder"):
        run(project, [tmp_path / "nowhere"])


def make_zip(path: Path, entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise(10, 10, seed)).save(buf, "PNG")
    return buf.getvalue()


def test_zip_contents_are_extracted_into_uploads_and_ingested_once(project, tmp_path):
    archive = make_zip(
        tmp_path / "batch.zip",
        {"top.png": png_bytes(1), "sub/inner.png": png_bytes(2), "__MACOSX/sub/._inner.png": b"junk", "sub/.DS_Store": b"junk"},
    )
    first = run(project, [archive])
    second = run(project, [archive])
    _, _, uploads = project
    (extracted,) = uploads.resolve().iterdir()
    assert extracted.name.startswith("batch-") and len(extracted.name) == len("batch-") + 16
    assert (first.added, first.total_seen) == (2, 2)
    assert sorted(project[0].image_paths(project[0].image_ids()).values()) == [
        str(extracted / "sub" / "inner.png"),
        str(extracted / "top.png"),
    ]
    assert (second.added, second.skipped_known) == (0, 2)


@pytest.mark.parametrize(
    ("entries", "symlinks", "message"),
    [
        ({"ok.png": png_bytes(1), "../evil.png": png_bytes(2)}, (), "zip slip"),
        ({"ok.png": png_bytes(1), "a/../../evil.png": png_bytes(2)}, (), "zip slip"),
        ({"ok.png": png_bytes(1), "/tmp/evil.png": png_bytes(2)}, (), "absolute path"),
        ({"ok.png": png_bytes(1)}, ("link.png",), "symbolic link"),
    ],
)
def test_unsafe_zip_is_refused_and_nothing_is_stored(project, tmp_path, entries, symlinks, message):
    archive = make_zip(tmp_path / "unsafe.zip", entries, symlinks)
    with pytest.raises(IngestError, match=message):
        run(project, [archive])
    assert project[0].image_count(None) == 0
    assert not project[2].exists() or not any(project[2].iterdir())
    assert not (tmp_path / "evil.png").exists()


def test_zip_that_unpacks_past_the_size_cap_is_refused(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.png": bytes(4 * 2**20)})
    assert archive.stat().st_size < 2**20
    with pytest.raises(IngestError, match="zip bomb"):
        extract_zip(archive, tmp_path / "uploads", Limits(archive_bytes=2**20, archive_ratio=10_000))
    assert not (tmp_path / "uploads").exists()


def test_csv_list_with_path_column_resolves_relative_paths_and_reports_missing_files(project, tmp_path):
    a, b = write_pngs(tmp_path / "imgs", 2)
    lst = tmp_path / "list.csv"
    with open(lst, "w", newline="") as f:
        csv.writer(f).writerows([["label", "path"], ["x", "imgs/img_000.png"], ["y", str(b)], ["z", "imgs/gone.png"]])
    report = run(project, [lst])
    assert report.added == 2
    assert report.rejected_files == [(str((tmp_path / "imgs" / "gone.png").resolve()), "unreadable", "No such file or directory")]
    assert sorted(project[0].image_paths(project[0].image_ids()).values()) == [str(a.resolve()), str(b.resolve())]


def test_csv_list_without_header_uses_the_first_column(project, tmp_path):
    write_pngs(tmp_path / "imgs", 2)
    (tmp_path / "list.csv").write_text("imgs/img_000.png,cat\nimgs/img_001.png,dog\n")
    assert run(project, [tmp_path / "list.csv"]).added == 2


def test_cancel_keeps_committed_chunks_and_a_rerun_completes(project, tmp_path):
    write_pngs(tmp_path / "corpus", 10)
    token = CancelToken()

    def cancel_after_first_chunk(done: int, total: int, message: str = "") -> None:
        if done > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        run(project, [tmp_path / "corpus"], chunk_size=4, progress=cancel_after_first_chunk, cancel=token)
    assert project[0].image_count(None) == 4
    report = run(project, [tmp_path / "corpus"], chunk_size=4)
    assert (report.added, report.skipped_known) == (6, 4)
    paths = [r["path"] for r in project[0].images("ok")]
    assert sorted(paths) == sorted(str(p.resolve()) for p in (tmp_path / "corpus").iterdir())


@pytest.mark.parametrize("on_job_thread", [False, True], ids=["main-thread", "job-thread"])
def test_process_pool_gives_the_same_accounting_as_in_process(project, tmp_path, on_job_thread):
    paths = write_pngs(tmp_path / "corpus", 70)
    shutil.copyfile(paths[0], tmp_path / "corpus" / "zz_copy.png")
    if on_job_thread:  # as the app runs it: a process with other threads starts workers another way
        with ThreadPoolExecutor(1) as thread:
            report = thread.submit(run, project, [tmp_path / "corpus"], workers=2, chunk_size=16).result()
    else:
        report = run(project, [tmp_path / "corpus"], workers=2, chunk_size=16)
    assert (report.added, report.rejected) == (70, {"duplicate": 1})
    assert report.rejected_files[0][2] == f"same content as {paths[0].resolve()}"
    assert project[0].image_count("ok") == 70


def test_a_rejected_file_that_was_fixed_is_retried_on_reingest(project, tmp_path):
    folder = tmp_path / "fixable"
    folder.mkdir()
    broken = folder / "photo.png"
    broken.write_text("not yet an image")
    first = run(project, [folder])
    assert first.added == 0 and first.rejected == {"not_an_image": 1}
    Image.fromarray(noise(20, 20, seed=3)).save(broken)
    second = run(project, [folder])
    assert second.added == 1
    store = project[0]
    assert store.image_count("ok") == 1 and store.image_count("rejected") == 0
    assert run(project, [folder]).added == 0
