"""A project's labels and scores as plain files: the labels CSV (written and read back), the
corpus score table (CSV or Parquet) and an ImageNet-style folder tree of the labeled images.

Text cells of every CSV are escaped against spreadsheet formulas (:func:`csv_text`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

import numpy as np

from .fsutil import atomic_path
from .schema import StoreError
from .settings import local_user

if TYPE_CHECKING:
    from .project import Project

LABEL_COLUMNS = ("path", "category", "label", "source", "author", "updated_at", "score", "sha256")
NEGATIVE_SUFFIX = "_negative"  # export_folders: reviewed negatives of C go to OUT/C_negative/
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting so as a formula (OWASP)


def iso_utc(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC (milliseconds), as every export writes times."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds")


# -- labels ------------------------------------------------------------------------------------


def _score_lookup(project: Project, category: str) -> dict[int, float]:
    found = project.scores(category)
    if found is None:
        return {}
    ids, scores = found
    return dict(zip(ids.tolist(), scores.tolist(), strict=True))


def label_rows(project: Project, category: str | None = None) -> list[dict[str, Any]]:
    """Current labels as rows with the columns of :data:`LABEL_COLUMNS` (score from the active model, or None)."""
    rows = project.store.label_table(category)
    scores = {c: _score_lookup(project, c) for c in {r["category"] for r in rows}}
    return [
        {
            "path": r["path"],
            "category": r["category"],
            "label": r["label"],
            "source": r["source"],
            "author": r["author"],
            "updated_at": iso_utc(r["updated_at"]),
            "score": scores[r["category"]].get(r["image_id"]),
            "sha256": project.store.image(r["image_id"])["sha256"],
        }
        for r in rows
    ]


def csv_text(value: str) -> str:
    """A text cell that no spreadsheet runs as a formula: a leading ``'`` before ``= + - @``, tab or CR.

    A leading ``'`` is doubled too, so :func:`csv_untext` restores every value exactly.
    """
    return "'" + value if value.startswith((*FORMULA_STARTS, "'")) else value


def csv_untext(cell: str) -> str:
    """The value :func:`csv_text` escaped (other cells unchanged)."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith((*FORMULA_STARTS, "'")) else cell


def write_labels_csv(project: Project, path_or_buffer: str | Path | TextIO, category: str | None = None) -> int:
    """Write the current labels (every category, or one) as CSV; returns the number of rows.

    Columns: path, category, label, source, author, updated_at (ISO 8601, UTC), score (the active
    model's probability for that category; empty before training), sha256 (lets an import find
    images that moved). Text cells are escaped with :func:`csv_text`.
    """
    rows = label_rows(project, category)

    def cell(value: Any) -> Any:
        return csv_text(value) if isinstance(value, str) else value

    def write(f: TextIO) -> None:
        writer = csv.DictWriter(f, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(
            {**{k: cell(v) for k, v in r.items()}, "score": "" if r["score"] is None else repr(r["score"])} for r in rows
        )

    if isinstance(path_or_buffer, (str, Path)):
        with atomic_path(Path(path_or_buffer).expanduser()) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            write(f)
    else:
        write(path_or_buffer)
    return len(rows)


@dataclass
class LabelImport:
    """What :func:`import_labels_csv` did."""

    imported: int = 0  # label events written
    unchanged: int = 0  # rows that already matched the project's current label
    categories_created: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # paths not ingested in this project (nor found by sha256)
    invalid: list[str] = field(default_factory=list)  # "line N: reason"


_IMPORTED_VALUES = ("positive", "negative", "cleared")


def import_labels_csv(project: Project, path: str | Path, author: str | None = None) -> LabelImport:
    """Apply a labels CSV (as written by :func:`write_labels_csv`) to ``project``.

    Needs ``path``, ``category`` and ``label`` columns; ``author`` overrides the file's author
    column, which is kept when present (else the OS user), and every event is recorded with source
    "import". Cells escaped against formulas (:func:`csv_text`) are unescaped. Relative paths are
    resolved against the CSV's folder; a path the project does not know is matched by the
    ``sha256`` column when there is one. Unknown categories are created. When a pair appears
    twice, the last row wins; rows equal to the current label are not re-recorded, so importing
    the same file twice changes nothing.
    """
    csv_path = Path(path).expanduser().resolve()
    result = LabelImport()
    store = project.store
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if not {"path", "category", "label"} <= columns:
            raise ValueError(f"{csv_path} needs path, category and label columns (found: {', '.join(sorted(columns)) or 'none'})")
        raw = [{k: csv_untext(v) if isinstance(v, str) else v for k, v in row.items()} for row in reader]
    by_hash = store.known_hashes() if "sha256" in columns else {}
    known = set(store.categories())
    wanted: dict[tuple[str, int], tuple[str, str]] = {}  # (category, image id) -> (value, author); last row wins
    for line, row in enumerate(raw, start=2):
        category = (row.get("category") or "").strip()
        value = (row.get("label") or "").strip().lower()
        if not category or value not in _IMPORTED_VALUES or not row.get("path"):
            result.invalid.append(f"line {line}: needs a path, a category and a label of positive/negative/cleared")
            continue
        file = Path(row["path"]).expanduser()
        file = (file if file.is_absolute() else csv_path.parent / file).resolve()
        image_id = store.image_id_for_path(str(file))
        if image_id is None:
            image_id = by_hash.get((row.get("sha256") or "").strip())
        if image_id is None:
            result.missing.append(row["path"])
            continue
        if category not in known:
            try:
                project.add_category(category)
            except StoreError as exc:
                result.invalid.append(f"line {line}: {exc}")
                continue
            known.add(category)
            result.categories_created.append(category)
        wanted[(category, image_id)] = (value, author or (row.get("author") or "").strip() or local_user())

    groups: dict[tuple[str, str, str], list[int]] = {}
    current = {c: store.labels(c) for c in {c for c, _ in wanted}}
    for (category, image_id), (value, who) in wanted.items():
        if current[category].get(image_id, "cleared") == value:
            result.unchanged += 1
        else:
            groups.setdefault((category, value, who), []).append(image_id)
    for (category, value, who), ids in groups.items():
        project.label(category, ids, value, source="import", author=who)
        result.imported += len(ids)
    return result


# -- scores ------------------------------------------------------------------------------------


def scores_table(project: Project) -> tuple[Any, dict[str, int]]:
    """Every accepted image with one score column per category (from that category's active model).

    Returns (pandas DataFrame with ``path``, ``image_id`` and a float column per trained category,
    NaN where an image was not scored, e.g. ingested after training; {category: model version}).
    """
    import pandas as pd

    store = project.store
    ids = np.asarray(store.image_ids(), dtype=np.int64)
    paths = store.image_paths(ids.tolist())
    table = pd.DataFrame({"path": [paths[int(i)] for i in ids], "image_id": ids})
    versions: dict[str, int] = {}
    for category in store.categories():
        found = project.version_scores(category)
        if found is None:
            continue
        record, version = found
        if category in ("path", "image_id"):
            raise ValueError(f"category {category!r} clashes with a column name of the scores table; rename it first")
        column = np.full(len(ids), np.nan, dtype=np.float32)
        position = np.searchsorted(ids, version.ids)
        inside = (position < len(ids)) & (ids[np.minimum(position, len(ids) - 1)] == version.ids)
        column[position[inside]] = version.column(category)[inside]
        table[category] = column
        versions[category] = record.id
    if not versions:
        raise ValueError("no trained model yet: label a few positives and train first")
    return table, versions


def write_scores(project: Project, path_or_buffer: str | Path | BinaryIO, format: str | None = None) -> int:
    """Write the corpus scores table (see :func:`scores_table`) as CSV or Parquet; returns the row count.

    ``format`` defaults from a path's suffix (``.parquet`` -> Parquet, else CSV), and to CSV for a
    binary buffer. Parquet files carry each column's model version in their schema metadata (key ``bgminer``).
    """
    target = Path(path_or_buffer).expanduser() if isinstance(path_or_buffer, (str, Path)) else path_or_buffer
    if format is None:
        format = "parquet" if isinstance(target, Path) and target.suffix.lower() in (".parquet", ".pq") else "csv"
    if format not in ("csv", "parquet"):
        raise ValueError(f"scores format must be csv or parquet, not {format!r}")
    table, versions = scores_table(project)
    if format == "csv":
        from pandas.api.types import is_numeric_dtype

        for column in table.columns:  # numbers stay numbers; text (paths) is escaped
            if not is_numeric_dtype(table[column]):
                table[column] = table[column].map(lambda v: csv_text(v) if isinstance(v, str) else v)
        table.columns = [csv_text(str(c)) for c in table.columns]  # category names head columns

        def write(dest: Path | BinaryIO) -> None:
            table.to_csv(dest, index=False, float_format="%.9g")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(table, preserve_index=False)
        note = json.dumps({"model_versions": versions, "exported_at": iso_utc(time.time())}).encode()
        arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"bgminer": note})

        def write(dest: Path | BinaryIO) -> None:
            pq.write_table(arrow, dest)

    if isinstance(target, Path):
        with atomic_path(target) as tmp:
            write(tmp)
    else:
        write(target)
    return len(table)


# -- folders -----------------------------------------------------------------------------------


@dataclass
class FolderExport:
    """What :func:`export_folders` wrote: files per folder name, and whether they are links."""

    root: Path
    counts: dict[str, int]
    linked: bool


def _folder_name(name: str) -> str:
    """A category name as a single safe path component."""
    cleaned = "".join("_" if ch in '/\\:*?"<>|' or ord(ch) < 32 else ch for ch in name).strip().strip(".")
    return cleaned or "_"


def export_folders(
    project: Project,
    out: str | Path,
    link: bool = True,
    include_negatives: bool = False,
    categories: Sequence[str] | None = None,
) -> FolderExport:
    """An ImageNet-style tree: ``OUT/<category>/<file>`` for every positive, optionally
    ``OUT/<category>_negative/<file>`` for reviewed negatives.

    ``link=True`` makes symbolic links to the original files (absolute targets); ``link=False`` copies
    them. A file name used twice within one folder gets ``-<image id>`` before its suffix. Category
    folders must not exist yet (or be empty), so nothing of the user's is overwritten.
    """
    store = project.store
    root = Path(out).expanduser().resolve()
    cats = list(categories) if categories is not None else store.categories()
    plan: dict[str, list[tuple[int, str]]] = {}
    for category in cats:
        labels = store.labels(category)
        wanted = [("positive", _folder_name(category))] + (
            [("negative", _folder_name(category) + NEGATIVE_SUFFIX)] if include_negatives else []
        )
        for value, folder in wanted:
            if folder in plan:
                raise ValueError(f"two categories map to the folder {folder!r}; rename one first")
            ids = sorted(i for i, v in labels.items() if v == value)
            plan[folder] = [(i, p) for i, p in sorted(store.image_paths(ids).items())]
    for folder in plan:
        target = root / folder
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ValueError(f"{target} already exists and is not empty; choose a new output folder")
    counts: dict[str, int] = {}
    for folder, items in plan.items():
        target = root / folder
        target.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for image_id, source in items:
            name = Path(source).name
            if name in used:
                name = f"{Path(name).stem}-{image_id}{Path(name).suffix}"
            used.add(name)
            if link:
                os.symlink(source, target / name)
            else:
                shutil.copy2(source, target / name)
        counts[folder] = len(items)
    return FolderExport(root, counts, link)
