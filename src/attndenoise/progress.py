"""Progress with an ETA for long loops (evaluation settings, demo rows).

On a terminal a rich progress bar on stderr; otherwise (a log file, CI, a pipe) one line per finished unit with the
elapsed time and the ETA, so that a redirected run still says how far it is. Library calls pass ``progress=False``
by default and stay quiet; the CLI turns it on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

__all__ = ["Progress", "ProgressArg", "eta_seconds", "format_seconds", "make_progress"]


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``: short enough for one log line (``?`` when not known yet)."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def eta_seconds(done: Mapping[str, Sequence[float]], remaining: Mapping[str, int]) -> float:
    """Seconds left when units of several kinds cost differently (a trained demo row vs an evaluated one): each
    remaining unit costs the mean time of the finished units of its kind, or of all finished units while none of its
    kind has finished. 0 when nothing remains; ``nan`` when nothing has finished yet."""
    if not any(remaining.values()):
        return 0.0
    every = [t for ts in done.values() for t in ts]
    if not every:
        return float("nan")
    overall = sum(every) / len(every)
    left = 0.0
    for kind, count in remaining.items():
        ts = done.get(kind) or ()
        left += count * (sum(ts) / len(ts) if ts else overall)
    return left


class Progress:
    """Finished-work reporter over a total *weight* (a cost estimate per unit, e.g. the number of prompt tokens):
    the ETA is ``elapsed * remaining weight / finished weight``. Units found already done (a resumed run's stored
    results) are advanced with ``timed=False``: they count towards the share done but not towards the rate, which
    would otherwise promise a resumed run an ETA of seconds.

    ``bar=None`` draws a rich bar when ``stream`` is a terminal and writes lines otherwise.
    """

    def __init__(self, total: float, description: str = "", *, stream: TextIO | None = None,
                 bar: bool | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total = float(total)
        self.done = 0.0
        self.timed = 0.0  # the weight finished by work done in this call (the rate's denominator)
        self.units = 0
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = clock()
        use_bar = bar if bar is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar: Any = None
        self._task: Any = None
        if use_bar:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(description, total=self.total)
            self._bar.start()

    def eta(self, elapsed: float | None = None) -> float:
        """Seconds left by the finished share of the weight (``nan`` before anything has finished)."""
        left = max(0.0, self.total - self.done)
        if left == 0:
            return 0.0
        if self.timed <= 0:
            return float("nan")
        elapsed = self.clock() - self.start if elapsed is None else elapsed
        return elapsed * left / self.timed

    def advance(self, what: str, weight: float = 1.0, *, timed: bool = True) -> str:
        """Mark one unit (``what`` names it) of ``weight`` finished; returns the line it reports. ``timed=False``
        for a unit that was found already done and took no work."""
        self.done += weight
        if timed:
            self.timed += weight
        self.units += 1
        elapsed = self.clock() - self.start
        line = (f"{self.description + ': ' if self.description else ''}{what} done "
                f"({100 * min(1.0, self.done / self.total) if self.total else 100:.0f}%); elapsed "
                f"{format_seconds(elapsed)}, ETA {format_seconds(self.eta(elapsed))}")
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=f"{self.description} {what}".strip())
        else:
            print(line, file=self.stream, flush=True)
        return line

    def close(self) -> None:
        """Stop the bar (lines need no closing)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ProgressArg = bool | Progress | None


def make_progress(progress: ProgressArg, total: float, description: str) -> tuple[Progress | None, bool]:
    """The reporter a function should use and whether it owns it (must close it): ``False``/``None`` quiet, ``True``
    a new one over ``total``, a :class:`Progress` given by the caller (several calls sharing one ETA) as it is."""
    if isinstance(progress, Progress):
        return progress, False
    if progress:
        return Progress(total, description), True
    return None, False
