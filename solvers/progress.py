"""A dependency-free progress bar for ``brl solve``."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

from .result import Monitor, SolveResult

_BAR_WIDTH = 20
_REDRAW_SECONDS = 0.1  # a fast solver must not spend its time redrawing the terminal


class ProgressMonitor(Monitor):
    """Shows progress on ``stream`` (the solvers enforce their own ``time_limit``).

    On a terminal it redraws one line in place; elsewhere (CI logs, files) it prints a plain line
    about every 10% of ``total`` so logs stay short. ``sign`` (``problem.sign``) turns the
    minimised objective the solver reports back into the user's sense. ``keeper``, when given,
    receives the run so far at most once every ``keep_every`` seconds (``Monitor.keep``).
    ``offset`` is added to the iterations a solver reports (a resumed run's first is the
    iteration it resumes at).
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        *,
        sign: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
        keeper: Callable[[SolveResult], None] | None = None,
        keep_every: float = 30.0,
        offset: int = 0,
    ) -> None:
        self.total = max(int(total), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.sign = sign
        self._clock = clock
        self._start = clock()
        self._tty = _is_tty(self.stream)
        self._every = math.ceil(self.total / 10)
        self._offset = offset
        self._next_line = (offset // self._every + 1) * self._every
        self._last_draw = -math.inf
        self._width = 0
        self._pending: tuple[int, float, float, float] | None = None
        # the rate counts from the first update: a solver's set-up (an exact solve at x0, a
        # warm-up) before it is no iteration
        self._first: tuple[int, float] | None = None
        self._gone = False  # the reader went away (a closed terminal, `| head`): stop writing
        self._keeper, self._keep_every, self._kept = keeper, keep_every, self._start
        self.last_kept: Callable[[], SolveResult] | None = None

    def update(self, iteration: int, objective: float, hypergrad_norm: float) -> None:
        """Redraw the bar (terminal) or print a line when another tenth is done (elsewhere)."""
        iteration += self._offset
        now = self._clock()
        if self._first is None:
            self._first = (iteration, now)
        self._pending = (iteration, objective, hypergrad_norm, now)
        final = iteration >= self.total
        if self._tty:
            if final or now - self._last_draw >= _REDRAW_SECONDS:
                self._last_draw = now
                self._draw(self._pending)
        elif final or iteration >= self._next_line:
            self._next_line = (iteration // self._every + 1) * self._every
            self._draw(self._pending)

    def keep(self, unfinished: Callable[[], SolveResult]) -> None:
        self.last_kept = unfinished  # the run so far, should the next iteration fail
        if self._keeper is not None and self._clock() - self._kept >= self._keep_every:
            self._keeper(unfinished())
            self._kept = self._clock()  # a slow save does not eat into the next interval

    def note(self, text: str) -> None:
        """In place of the bar on a terminal (the next update draws over it); a line
        elsewhere."""
        self._show(text)

    def close(self) -> None:
        """Show the last update if it was not shown (a run stopped early), and end the line."""
        if self._pending is not None:
            self._draw(self._pending)
        if self._tty and self._width:
            self._write("\n")
            self._width = 0

    def _draw(self, update: tuple[int, float, float, float]) -> None:
        self._pending = None
        self._show(self._line(*update))

    def _show(self, line: str) -> None:
        if self._tty:
            self._write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self._write(line + "\n")

    def _write(self, text: str) -> None:
        """Write and flush; a stream whose reader has gone is dropped, not let end the run
        and lose its work."""
        if self._gone:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # EPIPE, EIO after a hang-up; a closed file
            self._gone = True

    def _line(self, iteration: int, objective: float, norm: float, now: float) -> str:
        first, since = self._first if self._first is not None else (0, self._start)
        elapsed = now - since
        rate = (iteration - first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else math.inf
        done = min(iteration / self.total, 1.0)
        head = f"{iteration}/{self.total}"
        if self._tty:
            filled = round(done * _BAR_WIDTH)
            head += f" [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]"
        return (
            f"{head} {done:4.0%}  objective {self.sign * objective:.6g}  ||h|| {norm:.3g}  "
            f"{rate:.1f} it/s  ETA {_duration(eta)}"
        )


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` before the rate is known."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
