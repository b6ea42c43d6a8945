"""How a run shows its progress: what the engine tells about each phase, and a rich progress bar."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TimeElapsedColumn


class ProgressSink(Protocol):
    """Told about each phase: its label, its total (requests or seconds) and progress ticks."""

    def begin(self, label: str, total: float) -> None: ...

    def update(self, completed: float) -> None: ...

    def end(self) -> None: ...


class RichProgress:
    """A progress bar on a console, redrawn by the benchmark's own ticks: no refresh thread,
    whose rendering would compete with the measurement for the GIL."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            "{task.description}",
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            auto_refresh=False,
            transient=True,
        )
        self._task: TaskID | None = None

    def begin(self, label: str, total: float) -> None:
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)
        self._progress.refresh()

    def update(self, completed: float) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=completed)
            self._progress.refresh()

    def end(self) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self._progress.stop()
