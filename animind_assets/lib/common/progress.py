"""Progress reporting with counts, rates and ETA, decoupled from any orchestrator.

Library code takes a ``log`` callable (``context.log.info`` in Dagster, ``print`` in scripts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
LogFn = Callable[[str], None]


def _noop(_: str) -> None:
    return None


def fmt_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def eta_text(done: float, total: float, elapsed_s: float, budget_left_s: float | None = None) -> str:
    """The ETA of a job ``done`` of ``total`` units after ``elapsed_s`` seconds, as text (``fmt_seconds``; ``?`` before
    any unit is done): the remaining units at the rate so far or, with ``budget_left_s`` (seconds left of a wall-clock
    budget that stops the job early), the budget left when that ends the job first, marked ``(time budget)``.

    >>> eta_text(10, 100, 10.0)
    '1m30s'
    >>> eta_text(10, 100, 10.0, budget_left_s=30.0)
    '30.0s (time budget)'
    """
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    if budget_left_s is not None:
        left = max(0.0, budget_left_s)
        if not eta == eta or left < eta:
            return f"{fmt_seconds(left)} (time budget)"
    return fmt_seconds(eta) if eta == eta else "?"


class Progress:
    """Counts work done and logs ``label: done/total (pct) rate/s, elapsed, ETA`` at most every
    ``every_s`` seconds (and always at the end).

    ``budget_s`` (seconds from construction; None or 0 = none): a wall-clock budget that stops the work early. The
    ETA is then the sooner of "the remaining units at the current rate" and "the budget left", marked
    ``(time budget)`` when the budget ends first.

    >>> p = Progress("embed", total=10, unit="texts", log=print, every_s=0)
    >>> p.update(10)  # doctest: +ELLIPSIS
    embed: 10/10 texts (100.0%) ...
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "items",
        log: LogFn | None = None,
        every_s: float = 5.0,
        budget_s: float | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.log = log or _noop
        self.every_s = every_s
        self.budget_s = budget_s if budget_s and budget_s > 0 else None
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start - every_s - 1.0 if every_s > 0 else self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def message(self, extra: str = "") -> str:
        rate = self.rate
        if self.total:
            pct = 100.0 * self.done / self.total
            elapsed = self.elapsed
            left = None if self.budget_s is None else self.budget_s - elapsed
            eta_s = eta_text(self.done, self.total, elapsed, left)
            msg = (
                f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.1f}%) "
                f"{rate:,.1f} {self.unit}/s, elapsed {fmt_seconds(self.elapsed)}, ETA {eta_s}"
            )
        else:
            msg = f"{self.label}: {self.done} {self.unit} {rate:,.1f} {self.unit}/s, elapsed {fmt_seconds(self.elapsed)}"
        return f"{msg} {extra}".rstrip()

    def update(self, n: int = 1, extra: str = "", force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if force or finished or self.every_s <= 0 or now - self._last >= self.every_s:
            self._last = now
            self.log(self.message(extra))

    def finish(self, extra: str = "") -> None:
        self.log(self.message(extra))

