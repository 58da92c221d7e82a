"""One progress style for every command: a rich bar with done/total, rate, elapsed time, ETA and a free field."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed estimate)."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f}/s" if speed else "--/s")


class InfoColumn(ProgressColumn):
    """The task's ``info`` field (losses, the current file ...), empty when the task has none."""

    def render(self, task: Any) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress_bar(disable: bool = False) -> Progress:
    """A rich Progress in the house style; tasks may carry an ``info`` field shown after the ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        InfoColumn(),
        disable=disable,
    )
