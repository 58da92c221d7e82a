"""SIGINT and SIGTERM for a whole command: what runs a checkpointing loop stops after its iteration, everything
else stops at once, and the command ends with 130 or 143 and a line saying how to resume.

One process-wide ``STOP``. Inside ``STOP.deferred()`` (a trainer's loop) a first signal only sets the flag:
the loop finishes its iteration, writes a checkpoint and returns, and whoever ran it calls
``STOP.raise_if_requested()`` so that the next run of a multi-run command (demo, lab bench, ablations)
never starts. Outside a deferred region the first signal raises ``Interrupted`` where the code stands
(outputs are written to temporary files and renamed, so nothing half-written is left). A second signal,
anywhere, ends the process at once by that signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A SIGINT/SIGTERM ended the command; ``hint`` says how to continue it. Exit status 128 + the signal, as a
    shell reports a job a signal ended, so that `headstyle demo ... && next` stops here. A BaseException, so
    that no ``except Exception`` (a bench's failed-run guard) and no command-line framework swallows it."""

    def __init__(self, signum: int, hint: str = "") -> None:
        super().__init__(signum, hint)
        self.signum = signum
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return f"interrupted by {self.name}" + (f"; {self.hint}" if self.hint else "")


class StopSignals:
    """The process's SIGINT/SIGTERM state (module docstring). ``signal``: the first signal received since the
    outermost installation, or None."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._installed = 0
        self._deferred = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signal = signum
        if not self._deferred:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT/SIGTERM here (nests; the outermost level clears the flag and restores the previous
        handlers). Off the main thread signals stay with the host, and this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if not self._installed:
            self.signal = None
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        self._installed += 1
        try:
            yield
        finally:
            self._installed -= 1
            if not self._installed:
                for sig, handler in self._previous.items():
                    signal.signal(sig, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A loop that polls ``requested`` and checkpoints: here a first signal only sets the flag."""
        with self.installed():
            self._deferred += 1
            try:
                yield
            finally:
                self._deferred -= 1

    def requested_on_any(self, world_size: int, device: Any) -> bool:
        """``requested`` on any of ``world_size`` processes (one all-reduce when there are several): data-parallel
        trainers stop together, at the same iteration, or their collectives would hang."""
        if world_size == 1:
            return self.requested
        import torch

        flag = torch.tensor([float(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def raise_if_requested(self, hint: str = "") -> None:
        """Interrupted if a signal came (a loop that stopped for it has returned): the command goes no further."""
        if self.signal is not None:
            raise Interrupted(self.signal, hint)


STOP = StopSignals()


@contextlib.contextmanager
def resume_hint(hint: str) -> Iterator[None]:
    """An Interrupted leaving this block says ``hint`` (how to resume the command) unless it says more already."""
    try:
        yield
    except Interrupted as exc:
        raise Interrupted(exc.signum, exc.hint or hint) from None
