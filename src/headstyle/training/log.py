"""A run's metrics log: log.jsonl (one entry per logged iteration), log.csv, and TensorBoard when installed.
A resumed run truncates both files to its checkpoint's iteration, so the log reads as one uninterrupted run."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from headstyle.input_files import MiB, field_problem, parse_json, read_text
from headstyle.io import atomic_write_text
from headstyle.training.checkpointing import ResumeError

# A resumed run's logs are read whole: a line per iteration, 10 000 iterations of a few hundred bytes each.
MAX_LOG_BYTES = 256 * MiB


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of a run's log.jsonl, one per logged iteration ([] before the first)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in read_text(path, ResumeError, max_bytes=MAX_LOG_BYTES).splitlines() if line]


class MetricsLog:
    """JSONL + CSV log of per-iteration metrics, and TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, resume_iteration: int | None) -> None:
        self.jsonl = run_dir / "log.jsonl"
        self.csv = run_dir / "log.csv"
        if resume_iteration is not None:
            self._truncate(resume_iteration)
        else:
            for path in (self.jsonl, self.csv):
                path.unlink(missing_ok=True)
        self._columns: list[str] | None = None
        if self.csv.is_file():
            with self.csv.open(newline="") as fh:
                self._columns = next(csv.reader(fh), None)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            pass
        else:
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _truncate(self, iteration: int) -> None:
        """Drop entries written after the checkpoint we resume from (they are recomputed)."""
        hint = "the file is torn: delete that line (or the log) and resume again"
        if self.jsonl.is_file():
            keep = []
            text = read_text(self.jsonl, ResumeError, max_bytes=MAX_LOG_BYTES)
            for number, line in enumerate(text.splitlines(), start=1):
                where = f"{self.jsonl}, line {number}: not a log entry"
                entry = parse_json(line, where, ResumeError, hint)
                problem = field_problem(entry, "iteration", int) if isinstance(entry, dict) else "not an object"
                if problem:
                    raise ResumeError(f"{where} ({problem}); {hint}")
                if entry["iteration"] <= iteration:
                    keep.append(line)
            atomic_write_text(self.jsonl, "".join(f"{line}\n" for line in keep))
        if self.csv.is_file():
            text = read_text(self.csv, ResumeError, max_bytes=MAX_LOG_BYTES)
            rows = list(csv.reader(io.StringIO(text, newline="")))
            torn = next((n for n, r in enumerate(rows[1:], start=1) if not (r and r[0].isascii() and r[0].isdigit())),
                        None)  # fmt: skip
            if torn is not None:
                raise ResumeError(f"{self.csv}, row {torn}: no iteration in its first cell; {hint}")
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) <= iteration])
            atomic_write_text(self.csv, out.getvalue())

    def write(self, metrics: dict[str, Any]) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        new_file = self._columns is None
        if new_file:
            self._columns = list(scalars)
        with self.csv.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new_file:
                writer.writerow(self._columns)
            writer.writerow([scalars.get(k, "") for k in self._columns])
        if self._tb is not None:
            for key, value in scalars.items():
                if key != "iteration":
                    self._tb.add_scalar(key, value, metrics["iteration"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
