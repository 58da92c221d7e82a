"""Jobs for the web page: one at a time, first come first served, on a worker thread, so the page never waits.

A job is a function of its Job handle: it reports progress (fraction, a line of text, a preview picture)
and, when it can stop early, checks ``job.stop_requested``. The page reads snapshots. A job's files are
written into a hidden folder that becomes its own folder only when the job succeeds (``io.atomic_dir``):
a failed or stopped job leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from headstyle.io import atomic_dir

Status = Literal["queued", "running", "done", "failed", "stopped"]
FINISHED: tuple[Status, ...] = ("done", "failed", "stopped")


class AppError(Exception):
    """A problem the user can fix (bad input, missing model); shown in the page as one line."""


class Stopped(Exception):
    """Raised inside a job that honours a stop request."""


@dataclass(frozen=True)
class JobState:
    """What the page shows of a job: status, progress in [0, 1], a line of text, the latest preview
    (uint8 image or a PNG path), the result when done and the error line when failed."""

    id: int
    name: str
    status: Status
    fraction: float
    text: str
    preview: np.ndarray | Path | None
    result: Any
    error: str
    queued_ahead: int


class Job:
    """A unit of work on the queue; ``run(job)`` does the work and returns the result."""

    def __init__(self, id: int, name: str, run: Callable[[Job], Any], queue_: JobQueue) -> None:
        self.id = id
        self.name = name
        self._run = run
        self._queue = queue_
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._status: Status = "queued"
        self._fraction = 0.0
        self._text = "waiting for the jobs before it"
        self._preview: np.ndarray | Path | None = None
        self._result: Any = None
        self._error = ""

    def report(self, fraction: float, text: str, preview: np.ndarray | Path | None = None) -> None:
        """Progress from inside the job: fraction in [0, 1], one line, optionally a new preview."""
        with self._lock:
            self._fraction = min(max(float(fraction), 0.0), 1.0)
            self._text = text
            if preview is not None:
                self._preview = preview

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the job to stop: a queued job never starts; a running one stops where it checks."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` seconds passed (False)."""
        return self._finished.wait(timeout)

    def state(self) -> JobState:
        with self._lock:
            return JobState(self.id, self.name, self._status, self._fraction, self._text, self._preview,
                            self._result, self._error, self._queue.ahead_of(self))  # fmt: skip

    def _execute(self) -> None:
        if self._stop.is_set():
            self._finish("stopped", text="stopped before it started")
            return
        with self._lock:
            self._status = "running"
            self._text = "starting"
        try:
            result = self._run(self)
        except Stopped as exc:
            self._finish("stopped", text=str(exc) or "stopped")
        except AppError as exc:
            self._finish("failed", error=str(exc))
        except Exception as exc:  # the page must show every failure, not only the expected ones
            traceback.print_exc()
            self._finish("failed", error=f"{type(exc).__name__}: {exc}")
        else:
            self._finish("done", result=result)

    def _finish(self, status: Status, result: Any = None, error: str = "", text: str = "") -> None:
        with self._lock:
            self._status = status
            self._result = result
            self._error = error
            if status == "done":
                self._fraction, self._text = 1.0, "done"
            else:
                self._text = text or error
        self._finished.set()


class JobQueue:
    """First come, first served, one job at a time on a single daemon worker thread."""

    def __init__(self) -> None:
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._current: Job | None = None
        self._worker = threading.Thread(target=self._work, name="headstyle-jobs", daemon=True)
        self._worker.start()

    def submit(self, name: str, run: Callable[[Job], Any]) -> Job:
        job = Job(next(self._ids), name, run, self)
        with self._lock:
            self._waiting.append(job)
        self._pending.put(job)
        return job

    def ahead_of(self, job: Job) -> int:
        """How many jobs run before ``job`` starts (the running one included); 0 once it runs."""
        with self._lock:
            if job not in self._waiting:
                return 0
            return self._waiting.index(job) + (self._current is not None)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs: ask the running one to stop and let the worker end."""
        with self._lock:
            for job in self._waiting:
                job.request_stop()
            if self._current is not None:
                self._current.request_stop()
        self._pending.put(None)
        self._worker.join(timeout)

    def _work(self) -> None:
        while (job := self._pending.get()) is not None:
            with self._lock:
                self._waiting.remove(job)
                self._current = job
            try:
                job._execute()
            finally:
                with self._lock:
                    self._current = None


# ---------------------------------------------------------------------------------------------- files


def rebase(value: Any, old: Path, new: Path) -> Any:
    """``value`` with every Path under ``old`` moved under ``new`` (through dataclasses, lists and tuples)."""
    if isinstance(value, Path):
        return new / value.relative_to(old) if value.is_relative_to(old) else value
    if isinstance(value, list | tuple):
        return type(value)(rebase(v, old, new) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: rebase(getattr(value, f.name), old, new) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return value


def job_folder_name(kind: str) -> str:
    """A new job's folder name: time, then kind (sorted by time in a listing)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}-{kind}"


def run_in_folder(folder: str | os.PathLike, work: Callable[[Path], Any]) -> Any:
    """``work(tmp)`` inside atomic_dir(folder); its result's paths point into ``folder`` afterwards."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        result = work(tmp)
    return rebase(result, tmp, folder)
