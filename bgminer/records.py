"""The records the store hands out: label events, model versions and jobs, each read from its rows.

Frozen values: changing one means a write through :class:`bgminer.store.Store`.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LabelEvent:
    id: int
    image_id: int
    category: str
    value: str
    source: str
    author: str
    created_at: float
    undoes: int | None


@dataclass(frozen=True)
class ModelRecord:
    """A model version. ``categories`` are the current names of the categories it scores, in the
    checkpoint's column order (a rename shows here); ``category_ids`` the same columns by id
    (None for a name that matched no category when the store was migrated)."""

    id: int
    categories: list[str]
    mode: str
    state: str
    config: dict[str, Any]
    label_counts: dict[str, Any]
    losses: list[Any]
    metrics: dict[str, Any]
    parent_id: int | None
    checkpoint: str | None
    train_seconds: float | None
    error: str | None
    created_at: float
    category_ids: list[int | None] = field(default_factory=list)


@dataclass(frozen=True)
class JobRecord:
    id: int
    kind: str
    state: str
    progress: float
    message: str
    params: dict[str, Any]
    result: dict[str, Any]
    cancel_requested: bool
    started_at: float | None
    finished_at: float | None
    error: str | None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")


def label_event(row: sqlite3.Row) -> LabelEvent:
    return LabelEvent(
        row["id"], row["image_id"], row["category"], row["value"], row["source"], row["author"], row["created_at"], row["undoes"]
    )


def model_record(row: sqlite3.Row, columns: list[tuple[int, int | None, str | None]]) -> ModelRecord:
    """``columns``: (position, category id, current name) from model_categories; unmapped ones keep the trained name."""
    trained = json.loads(row["categories"])
    current = {position: (cid, name) for position, cid, name in columns}
    return ModelRecord(
        id=row["id"],
        categories=[current.get(k, (None, None))[1] or trained[k] for k in range(len(trained))],
        mode=row["mode"],
        state=row["state"],
        config=json.loads(row["config"]),
        label_counts=json.loads(row["label_counts"]),
        losses=json.loads(row["losses"]),
        metrics=json.loads(row["metrics"]),
        parent_id=row["parent_id"],
        checkpoint=row["checkpoint"],
        train_seconds=row["train_seconds"],
        error=row["error"],
        created_at=row["created_at"],
        category_ids=[current.get(k, (None, None))[0] for k in range(len(trained))],
    )


def job_record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        kind=row["kind"],
        state=row["state"],
        progress=row["progress"],
        message=row["message"],
        params=json.loads(row["params"]),
        result=json.loads(row["result"]),
        cancel_requested=bool(row["cancel_requested"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
    )
