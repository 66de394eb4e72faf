"""Background jobs: long work runs on a worker thread, reports progress into the store's
jobs table and stops when a cancel is requested there.

The UI only reads job rows (it never receives callbacks from a worker), so a Streamlit
page can poll the store from its own thread and never touch Streamlit from a worker.

Heavy jobs (:data:`HEAVY_KINDS`) are limited so one visitor cannot starve the server: at
most one per project (across processes, from the store's rows) and at most
``BGMINER_MAX_JOBS`` at once in one process (across every runner).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from .progress import Cancelled, CancelToken
from .records import JobRecord
from .store import JobBusy, Store

# Progress writes are throttled so a fast loop does not hammer SQLite.
_MIN_UPDATE_INTERVAL = 0.25
# Jobs that read the whole corpus or train: one per project, a global cap per process.
HEAVY_KINDS = frozenset({"ingest", "demo", "train", "rescore", "embed"})

JobFn = Callable[..., Any]  # fn(progress=..., cancel=...) -> JSON-able result

# Heavy job threads of every runner in this process (the global cap counts the live ones).
_heavy_threads: set[threading.Thread] = set()
_heavy_lock = threading.Lock()


class JobLimitError(RuntimeError):
    """A job was refused by a job limit; the message says which and what to do."""


class JobRunner:
    """Starts jobs on daemon threads: at most one job of each kind per runner, one heavy job per
    project, and at most ``max_jobs`` heavy jobs in this process (None: ``BGMINER_MAX_JOBS``)."""

    def __init__(self, store: Store, max_jobs: int | None = None):
        self.store = store
        self.max_jobs = max_jobs
        self._threads: dict[int, threading.Thread] = {}
        self._tokens: dict[int, CancelToken] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, fn: JobFn, params: dict[str, Any] | None = None) -> int:
        """Start ``fn`` on a worker thread; raises :class:`JobLimitError` when a limit refuses it."""
        heavy = kind in HEAVY_KINDS
        with self._lock, _heavy_lock:
            for job_id, thread in self._threads.items():
                if thread.is_alive() and self.store.job(job_id).kind == kind:
                    raise JobLimitError(f"a {kind} job (#{job_id}) is already running")
            if heavy:
                cap = self._max_jobs()
                running = sum(t.is_alive() for t in _heavy_threads)
                if running >= cap:
                    raise JobLimitError(
                        f"the server is busy: {running} heavy job(s) running, at most {cap} at once (BGMINER_MAX_JOBS); "
                        "try again when one ends"
                    )
            job_id = self._add(kind, params)
            token = CancelToken(is_set=lambda: self.store.job(job_id).cancel_requested)
            thread = threading.Thread(target=self._run, args=(job_id, fn, token), name=f"bgminer-{kind}-{job_id}", daemon=True)
            self._threads[job_id] = thread
            self._tokens[job_id] = token
            if heavy:
                _heavy_threads.difference_update([t for t in _heavy_threads if not t.is_alive()])
                _heavy_threads.add(thread)
            thread.start()
        return job_id

    def _add(self, kind: str, params: dict[str, Any] | None) -> int:
        try:
            return self.store.add_job(kind, params, exclusive=sorted(HEAVY_KINDS) if kind in HEAVY_KINDS else ())
        except JobBusy as exc:
            raise JobLimitError(
                f"{exc}: one heavy job (ingest, training, re-scoring) per project at a time; wait for it or cancel it"
            ) from exc

    def _max_jobs(self) -> int:
        if self.max_jobs is not None:
            return self.max_jobs
        from .settings import load_settings

        return load_settings().limits.max_jobs

    def cancel(self, job_id: int) -> None:
        self.store.request_cancel(job_id)
        token = self._tokens.get(job_id)
        if token is not None:
            token.cancel()

    def wait(self, job_id: int, timeout: float | None = None) -> JobRecord:
        thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)
        return self.store.job(job_id)

    def _run(self, job_id: int, fn: JobFn, token: CancelToken) -> None:
        store = self.store
        store.update_job(job_id, state="running", started_at=time.time())
        last = 0.0

        def progress(done: int, total: int, message: str = "") -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= _MIN_UPDATE_INTERVAL or done >= total:
                last = now
                store.update_job(job_id, progress=(done / total) if total else 1.0, message=message)

        try:
            result = fn(progress=progress, cancel=token)
        except Cancelled:
            store.update_job(job_id, state="cancelled", message="cancelled")
        except Exception as exc:  # noqa: BLE001 (any failure is recorded on the job row for the UI / CLI)
            store.update_job(job_id, state="failed", error=f"{type(exc).__name__}: {exc}", message=traceback.format_exc(limit=3))
        else:
            store.update_job(job_id, state="done", progress=1.0, result=_jsonable(result))
        finally:
            store.close()


def _jsonable(result: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(result):
        return asdict(result)
    if isinstance(result, dict):
        return result
    return {"value": result}
