"""What a solver hands back, and the hook through which it reports progress while it runs."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class SolveResult:
    """The outcome of one run, in the solver's (minimising) sense.

    ``objective`` and ``history["objective"]`` hold the minimised ``f``; reports multiply by
    ``problem.sign`` so a ``maximize`` problem is shown as the user wrote it.
    ``history`` has at least the keys ``"objective"``, ``"hypergrad_norm"`` and ``"time"``
    (seconds since the start), one entry per recorded iteration.
    """

    x: Tensor
    policy: Tensor
    objective: float
    history: dict[str, list[float]]
    iterations: int
    stopped_because: str
    extra: dict[str, Any] = field(default_factory=dict)


class Monitor:
    """Receives a solver's progress and may ask it to stop early.

    This base class does nothing and never stops, so solvers can always call it; subclasses
    draw progress bars, enforce time limits or log. Solvers call ``update`` once per iteration
    and check ``should_stop`` before the next one.
    """

    def update(self, iteration: int, objective: float, hypergrad_norm: float) -> None:
        """Record an iteration.

        ``iteration`` is how many iterations have completed (0 = the starting point),
        ``objective`` the minimised ``f`` there and ``hypergrad_norm`` the norm of the
        hyper-gradient used in the step.
        """

    def should_stop(self) -> bool:
        """Whether the solver should end the run now (for example, a time limit has passed)."""
        return False

    def keep(self, unfinished: Callable[[], SolveResult]) -> None:
        """Offer the run so far (``unfinished()`` builds it, so only when taken): a monitor
        may save it now and then, so that a run killed outright (kill -9, the OOM killer)
        leaves its last iterate and history behind. Solvers call it after ``update``."""

    def note(self, text: str) -> None:
        """A phase outside the iterations that can take a while on a big problem (an exact
        solve), shown until the next update."""

    def close(self) -> None:
        """Finish any output (a progress bar's line) once the run has ended."""


# stopped_because of a record saved while its run went on (``Monitor.keep``): found after the
# run, it means the run was killed before it could write its final record
UNFINISHED = "unfinished"


def unfinished(x: Tensor, policy: Tensor, objective: float, history: dict[str, list[float]],
               iterations: int, spent: dict[str, int] | None = None) -> SolveResult:
    """The run so far, as ``Monitor.keep`` takes it: iterate ``iterations`` and its policy;
    ``spent``, what the run had counted when it reached that iterate (a model-free run's
    ``queries`` and ``transitions``), which a resumed run goes on from."""
    return SolveResult(x=x.detach(), policy=policy.detach(), objective=float(objective),
                       history=history, iterations=iterations, stopped_because=UNFINISHED,
                       extra=dict(spent or {}))


# stopped_because when the objective or the hyper-gradient became NaN or infinite: the solver
# returns the last point whose numbers were finite and the command line exits 1
NOT_FINITE = "not_finite"


def stop_reason(options: dict[str, Any], start: float, monitor: Monitor) -> str | None:
    """Why a solver loop should end now, if it should: its own `time_limit` option (seconds
    since `start`, a `time.perf_counter()` reading; 0 is off) or the monitor's request."""
    limit = options.get("time_limit") or 0.0
    if limit and time.perf_counter() - start >= limit:
        return "time_limit"
    if monitor.should_stop():
        return "stopped"
    return None


# Ctrl-C, and what the command line treats as it: SIGTERM, and SIGHUP (a closed terminal)
_HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
              if hasattr(signal, name))


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while a record or checkpoint is written, then act on them
    (the first one received, delivered again to the handler it had): an interrupt that lands
    halfway would leave it cut short. Off the main thread, where Python delivers no signals,
    it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)

    held = {sig: signal.signal(sig, hold) for sig in _HELD}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
    if received:
        signal.raise_signal(received[0])

