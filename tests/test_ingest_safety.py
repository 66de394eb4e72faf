"""Ingest and uploads on a shared server: nothing outside the data roots is read, archives
cannot fill the disk, the disk reserve holds, OS errors become rejects, and uploads never
overwrite one another."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from imagefiles import noise
from PIL import Image

from bgminer import fsutil
from bgminer.corpus import IngestError, extract_zip, ingest
from bgminer.fsutil import DiskSpaceError
from bgminer.settings import Limits
from bgminer.store import Store
from bgminer.uploads import save_uploads

NO_RESERVE = Limits(disk_reserve_bytes=0)


@pytest.fixture
def tree(tmp_path):
    """A data root with two images, a folder outside it with an image and a text file, and a project."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder, seeds in ((root, (1, 2)), (outside, (3,))):
        folder.mkdir()
        for seed in seeds:
            Image.fromarray(noise(12, 12, seed)).save(folder / f"img_{seed}.png")
    (outside / "notes.png").write_text("secret notes, not an image")
    project = tmp_path / "project"
    return root, outside, (Store(tmp_path / "project.db"), project / "thumbs", project / "uploads")


def run(project, sources, roots=(), limits=NO_RESERVE, **kw):
    store, thumbs, uploads = project
    return ingest(store, [str(s) for s in sources], thumbs, uploads, data_roots=roots, limits=limits, **kw)


def rows(store: Store) -> dict[str, tuple[str, str | None]]:
    """path -> (status, reason) of every row."""
    return {r["path"]: (r["status"], r["reason"]) for r in store.images("ok") + store.images("rejected")}


class Touched:
    """Records every path opened or stat'ed (followed) while installed."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real_open, real_stat, real_os_open = builtins.open, os.stat, os.open

        def spy(fn):
            def wrapped(path, *a, **kw):
                if isinstance(path, (str, os.PathLike)):
                    self.paths.append(os.path.abspath(os.fspath(path)))
                return fn(path, *a, **kw)

            return wrapped

        monkeypatch.setattr(builtins, "open", spy(real_open))
        monkeypatch.setattr(os, "stat", spy(real_stat))
        monkeypatch.setattr(os, "open", spy(real_os_open))

    def under(self, folder: Path) -> list[str]:
        return [p for p in self.paths if p == str(folder) or p.startswith(f"{folder}{os.sep}")]


# -- data roots --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["img_3.png", "missing.png", ""], ids=["existing-file", "missing-file", "folder"])
def test_a_source_outside_the_roots_is_refused_alike_whether_or_not_it_exists(tree, monkeypatch, name):
    root, outside, project = tree
    touched = Touched(monkeypatch)
    with pytest.raises(IngestError, match="outside_data_roots") as refused:
        run(project, [root, outside / name], roots=[root])
    assert refused.value.reason == "outside_data_roots"
    assert touched.under(outside) == []
    assert project[0].image_count(None) == 0


def test_without_roots_any_folder_may_be_added(tree):
    _, outside, project = tree
    assert run(project, [outside], roots=()).added == 1


def test_csv_entries_outside_the_roots_are_rejected_with_one_reason_and_never_read(tree, monkeypatch):
    root, outside, project = tree
    listed = ["img_1.png", str(outside / "img_3.png"), str(outside / "missing.png"), "../outside/notes.png", "/etc/passwd"]
    (root / "list.csv").write_text("path\n" + "\n".join(listed) + "\n")
    touched = Touched(monkeypatch)
    report = run(project, [root / "list.csv"], roots=[root])
    assert touched.under(outside) == [] and "/etc/passwd" not in touched.paths
    assert report.added == 1 and report.rejected == {"outside_data_roots": 4}
    details = {detail for _, reason, detail in report.rejected_files}
    assert len(details) == 1  # the same words for a file that exists, one that does not and a non-image
    assert rows(project[0])[str(outside / "notes.png")] == ("rejected", "outside_data_roots")


def test_reingest_never_stats_paths_outside_the_roots(tree, monkeypatch):
    root, outside, project = tree
    (root / "list.csv").write_text(f"path\nimg_1.png\n{outside / 'img_3.png'}\n")
    run(project, [root / "list.csv"], roots=[root])
    touched = Touched(monkeypatch)
    again = run(project, [root / "list.csv"], roots=[root])
    assert touched.under(outside) == []
    assert (again.added, again.skipped_known, again.rejected) == (0, 1, {"outside_data_roots": 1})
    assert project[0].image_count(None) == 2


def test_a_symlink_inside_a_root_that_leads_outside_is_rejected_and_its_target_never_opened(tree, monkeypatch):
    root, outside, project = tree
    (root / "link.png").symlink_to(outside / "img_3.png")
    (root / "linked_folder").symlink_to(outside, target_is_directory=True)
    touched = Touched(monkeypatch)
    report = run(project, [root], roots=[root])
    assert touched.under(outside) == []
    assert report.added == 2
    assert report.rejected_files == [(str(root / "link.png"), "outside_data_roots", report.rejected_files[0][2])]
    assert not any(path.startswith(str(outside)) for path in rows(project[0]))


def test_a_symlink_between_places_inside_the_roots_is_followed(tree):
    root, _, project = tree
    other = root.parent / "other_root"
    other.mkdir()
    Image.fromarray(noise(12, 12, 9)).save(other / "img_9.png")
    (root / "link.png").symlink_to(other / "img_9.png")
    report = run(project, [root], roots=[root, other])
    assert report.added == 3 and str(other / "img_9.png") in rows(project[0])


def test_an_archive_inside_the_roots_unpacks_into_the_project_and_is_ingested(tree):
    root, _, project = tree
    make_zip(root / "batch.zip", {"a.png": png_bytes(5), "b/c.png": png_bytes(6)})
    report = run(project, [root / "batch.zip"], roots=[root])
    assert (report.added, report.rejected) == (2, {})


# -- archive limits ----------------------------------------------------------------------
def make_zip(path: Path, entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise(10, 10, seed)).save(buf, "PNG")
    return buf.getvalue()


def test_an_entry_that_compresses_too_well_is_refused_with_nothing_extracted(tmp_path):
    bomb = make_zip(tmp_path / "bomb.zip", {"ok.png": png_bytes(1), "zeros.png": bytes(4 * 2**20)})
    with pytest.raises(IngestError, match=r"compresses \d+:1, over the 200:1 limit \(zip bomb\?\)"):
        extract_zip(bomb, tmp_path / "uploads", NO_RESERVE)
    assert not (tmp_path / "uploads").exists()


def test_a_small_entry_may_compress_well(tmp_path):
    folder = extract_zip(make_zip(tmp_path / "small.zip", {"zeros.bin": bytes(2**19)}), tmp_path / "uploads", NO_RESERVE)
    assert (folder / "zeros.bin").stat().st_size == 2**19


def test_an_archive_with_too_many_entries_is_refused_with_nothing_extracted(tmp_path, tree):
    _, _, project = tree
    many = make_zip(tmp_path / "many.zip", {f"d{i}/": b"" for i in range(8)} | {f"f{i}.png": png_bytes(i) for i in range(3)})
    with pytest.raises(IngestError, match="11 entries, over the limit of 10"):
        run(project, [many], limits=Limits(archive_entries=10, disk_reserve_bytes=0))
    assert not project[2].exists()
    assert run(project, [many], limits=Limits(archive_entries=11, disk_reserve_bytes=0)).added == 3


def test_an_entry_larger_than_its_header_says_is_refused(tmp_path):
    data = png_bytes(1) * 50
    archive = make_zip(tmp_path / "liar.zip", {"big.png": data}, zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    declared = len(data).to_bytes(4, "little")
    smaller = (len(data) // 2).to_bytes(4, "little")
    assert raw.count(declared) == 4  # compressed and uncompressed size, in the local and central headers
    archive.write_bytes(bytes(raw).replace(declared, smaller))
    with pytest.raises(IngestError):
        extract_zip(archive, tmp_path / "uploads", NO_RESERVE)
    assert not any((tmp_path / "uploads").iterdir())


# -- the disk reserve --------------------------------------------------------------------
def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def test_an_archive_is_not_unpacked_into_the_disk_reserve(tmp_path):
    archive = make_zip(tmp_path / "ok.zip", {"a.png": png_bytes(1)})
    with pytest.raises(DiskSpaceError, match="must stay free"):
        extract_zip(archive, tmp_path / "uploads", Limits(disk_reserve_bytes=free_bytes(tmp_path) + 2**30))
    assert not (tmp_path / "uploads").exists()


def test_the_reserve_is_checked_again_while_unpacking_and_nothing_partial_is_left(tmp_path, monkeypatch):
    archive = make_zip(
        tmp_path / "big.zip", {"a.bin": os.urandom(3 * 2**20)} | {f"{i}.bin": os.urandom(6 * 2**20) for i in range(3)}
    )
    real = shutil.disk_usage
    calls = []

    def shrinking(path):  # another writer fills the disk once the extraction has started
        calls.append(path)
        usage = real(path)
        return usage if len(calls) == 1 else usage._replace(free=2**20)

    monkeypatch.setattr(fsutil.shutil, "disk_usage", shrinking)
    with pytest.raises(DiskSpaceError):
        extract_zip(archive, tmp_path / "uploads", Limits(disk_reserve_bytes=2**20))
    assert len(calls) == 2
    assert list((tmp_path / "uploads").iterdir()) == []


def test_thumbnails_keep_the_reserve(tree):
    root, _, project = tree
    with pytest.raises(DiskSpaceError):
        run(project, [root], limits=Limits(disk_reserve_bytes=free_bytes(root) + 2**30))
    assert project[0].image_count(None) == 0
    assert not project[1].exists()


def test_an_archive_the_reserve_refuses_is_a_reject_and_the_other_sources_still_ingest(tree, monkeypatch):
    root, _, project = tree
    archive = make_zip(root / "batch.zip", {"a.png": png_bytes(5), "b.bin": os.urandom(4 * 2**20)}, zipfile.ZIP_STORED)
    usage = shutil.disk_usage(root)
    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    report = run(project, [archive, root / "img_1.png"], limits=Limits(disk_reserve_bytes=8 * 2**20))
    assert report.added == 1
    assert report.rejected_files == [(str(archive), "archive_unreadable", report.rejected_files[0][2])]
    assert "must stay free" in report.rejected_files[0][2]


# -- OS errors while unpacking -----------------------------------------------------------
def test_an_os_error_while_unpacking_is_a_reject_and_a_rerun_retries_the_archive(tree):
    root, _, project = tree
    archive = make_zip(root / "batch.zip", {"a.png": png_bytes(5), "b.png": png_bytes(6)})
    uploads = project[2]
    uploads.parent.mkdir(parents=True)
    uploads.write_text("a file where the uploads folder should be")
    report = run(project, [archive, root / "img_1.png"])
    assert report.added == 1 and report.rejected == {"archive_unreadable": 1}
    (path, _, detail) = report.rejected_files[0]
    assert path == str(archive) and detail == "cannot unpack: File exists"
    uploads.unlink()
    again = run(project, [archive, root / "img_1.png"])
    assert (again.added, again.skipped_known, again.rejected) == (2, 1, {})
    assert rows(project[0]).get(str(archive)) is None


def test_a_full_disk_while_unpacking_is_a_reject_with_the_os_message(tree, monkeypatch):
    root, _, project = tree
    archive = make_zip(root / "batch.zip", {"a.png": png_bytes(5)})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    report = run(project, [archive, root / "img_2.png"])
    assert report.added == 1
    assert report.rejected_files == [(str(archive), "archive_unreadable", f"cannot unpack: {os.strerror(errno.ENOSPC)}")]
    assert list(project[2].iterdir()) == []


# -- uploads -----------------------------------------------------------------------------
def stored_files(uploads: Path) -> list[Path]:
    return sorted(p for p in uploads.rglob("*") if p.is_file())


def test_the_same_upload_name_twice_keeps_both_files(tmp_path):
    uploads = tmp_path / "uploads"
    first = save_uploads(uploads, [("photo.png", png_bytes(1))], NO_RESERVE)
    second = save_uploads(uploads, [("photo.png", io.BytesIO(png_bytes(2)))], NO_RESERVE)
    assert first.refused == second.refused == []
    assert first.saved[0] != second.saved[0]
    assert first.saved[0].read_bytes() == png_bytes(1) and second.saved[0].read_bytes() == png_bytes(2)
    assert stored_files(uploads) == sorted(first.saved + second.saved)


def test_the_same_content_twice_is_stored_once(tmp_path):
    uploads = tmp_path / "uploads"
    result = save_uploads(uploads, [("a.png", png_bytes(1)), ("copy of a.PNG", png_bytes(1))], NO_RESERVE)
    assert result.saved[0] == result.saved[1]
    assert stored_files(uploads) == [result.saved[0]]
    assert result.saved[0].parent.parent == uploads / "web" and result.saved[0].suffix == ".png"


def test_the_client_name_is_never_a_path(tmp_path):
    uploads = tmp_path / "project" / "uploads"
    result = save_uploads(uploads, [("../../evil.png", png_bytes(1)), ("/tmp/x/evil.jpg", png_bytes(2))], NO_RESERVE)
    assert len(result.saved) == 2 and all(uploads / "web" in p.parents and "evil" not in p.name for p in result.saved)
    assert not list(tmp_path.glob("**/evil*"))


def test_a_non_image_is_refused_with_the_reason_and_its_name_as_data(tmp_path):
    result = save_uploads(tmp_path / "uploads", [("**notes**.png", b"text, not pixels"), ("ok.png", png_bytes(1))], NO_RESERVE)
    assert [name for name, _ in result.refused] == ["**notes**.png"]
    assert "not_an_image" in result.refused[0][1]
    assert len(result.saved) == 1 and len(stored_files(tmp_path / "uploads")) == 1


def test_an_uploaded_zip_is_unpacked_with_the_limits_and_leaves_no_copy(tmp_path):
    uploads = tmp_path / "uploads"
    archive = make_zip(tmp_path / "batch.zip", {"a.png": png_bytes(1), "b.png": png_bytes(2)}).read_bytes()
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.png": bytes(4 * 2**20)}).read_bytes()
    result = save_uploads(uploads, [("batch.zip", archive), ("bomb.zip", bomb)], NO_RESERVE)
    (folder,) = result.saved
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["a.png", "b.png"]
    assert result.refused[0][0] == "bomb.zip" and "zip bomb" in result.refused[0][1]
    assert stored_files(uploads) == sorted(folder.iterdir())


def test_a_broken_uploaded_zip_is_refused_under_its_own_name(tmp_path):
    result = save_uploads(tmp_path / "uploads", [("holiday.zip", b"PK\x03\x04 not really a zip")], NO_RESERVE)
    ((name, why),) = result.refused
    assert name == "holiday.zip" and why.startswith("holiday.zip is not a readable zip archive")
    assert ".upload-" not in why and not result.saved


@pytest.mark.parametrize(
    ("limits", "refused", "message"),
    [
        (Limits(upload_file_bytes=1000, disk_reserve_bytes=0), ["big.png"], "limit per file"),
        (Limits(upload_submit_bytes=1000, disk_reserve_bytes=0), ["small.png", "big.png"], "in one submit"),
        (Limits(upload_submit_files=1, disk_reserve_bytes=0), ["small.png", "big.png"], "2 files in one submit"),
        (Limits(project_upload_bytes=1000, disk_reserve_bytes=0), ["big.png"], "project's uploads"),
    ],
    ids=["per-file", "per-submit-bytes", "per-submit-files", "per-project"],
)
def test_upload_limits_refuse(tmp_path, limits, refused, message):
    small, buf = png_bytes(1), io.BytesIO()
    Image.fromarray(noise(40, 40, 2)).save(buf, "PNG")
    assert len(small) < 1000 < len(buf.getvalue())
    result = save_uploads(tmp_path / "uploads", [("small.png", small), ("big.png", buf.getvalue())], limits)
    assert [name for name, _ in result.refused] == refused
    assert all(message in why for _, why in result.refused)
    assert len(stored_files(tmp_path / "uploads")) == 2 - len(refused)


def test_the_project_limit_counts_what_is_already_stored(tmp_path):
    uploads = tmp_path / "uploads"
    limits = Limits(project_upload_bytes=len(png_bytes(1)) + len(png_bytes(2)) - 1, disk_reserve_bytes=0)
    assert save_uploads(uploads, [("a.png", png_bytes(1))], limits).refused == []
    assert save_uploads(uploads, [("b.png", png_bytes(2))], limits).refused[0][0] == "b.png"


def test_uploads_keep_the_disk_reserve(tmp_path):
    result = save_uploads(
        tmp_path / "uploads", [("a.png", png_bytes(1))], Limits(disk_reserve_bytes=free_bytes(tmp_path) + 2**30)
    )
    assert result.saved == [] and "must stay free" in result.refused[0][1]
    assert not (tmp_path / "uploads").exists()
