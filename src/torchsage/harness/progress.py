"""Progress for people: a tqdm bar on a terminal, plain periodic lines otherwise.

A redrawn bar written to a log file or a pipe leaves carriage-return frames and cursor codes in
it; when the stream is not a terminal, :class:`Progress` instead prints one plain line every
``interval`` seconds (and one at the end), e.g. ``sweep: 12/40 runs (30%), 1 failed, 2m05s``.

Example:
    >>> import io
    >>> stream = io.StringIO()
    >>> with Progress(3, "demo", unit="step", stream=stream, interval=0) as bar:
    ...     for _ in range(3):
    ...         bar.update()
    >>> stream.getvalue().splitlines()[-1].startswith("demo: 3/3 steps (100%)")
    True
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

__all__ = ["Progress", "bar", "progress"]

T = TypeVar("T")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts ``total`` units of work on ``stream`` (default stderr); ``enabled=False`` is silent,
    ``tty_only=True`` shows a bar on a terminal and nothing otherwise (inner loops)."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        enabled: bool = True,
        stream: IO[str] | None = None,
        interval: float = 30.0,
        leave: bool = True,
        tty_only: bool = False,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interval = interval
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._bar = None
        isatty = getattr(self.stream, "isatty", None)
        tty = isatty is not None and isatty()
        self.enabled = enabled and (tty or not tty_only)
        if self.enabled and tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=self.stream,
                leave=leave,
                dynamic_ncols=True,
            )

    def line(self) -> str:
        """The plain progress line."""
        units = self.unit if self.unit.endswith("s") else self.unit + "s"
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n // self.total}%)" if self.total else ""
        extra = "".join(f", {v} {k}" for k, v in self.postfix.items())
        return f"{self.desc}: {done} {units}{share}{extra}, {_duration(time.monotonic() - self._start)}"

    def set_postfix(self, **values: Any) -> None:
        """Extra ``name value`` pairs shown after the count (e.g. ``failed=1``)."""
        self.postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def update(self, n: int = 1) -> None:
        """Counts ``n`` more units done."""
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval and (self.total is None or self.n < self.total):
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """Closes the bar, or prints the final line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n > 0:
            print(self.line(), file=self.stream, flush=True)
            self.enabled = False

    def wrap(self, iterable: Iterable[T]) -> Iterator[T]:
        """Iterates ``iterable``, counting one unit per item; closes at the end."""
        try:
            for item in iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """Iterates ``iterable`` while counting it with a :class:`Progress`."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update()


class _Bar(Progress):
    """A :class:`Progress` that can also be iterated (what :func:`bar` returns)."""

    iterable: Iterable[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable")
        return self.wrap(self.iterable)


def bar(
    iterable: Iterable[Any] | None = None,
    desc: str = "",
    total: int | None = None,
    *,
    disable: bool = False,
    leave: bool = True,
    unit: str = "it",
    **_: Any,
) -> _Bar:
    """A drop-in for the ``tqdm(...)`` calls of the library: a bar on a terminal, plain lines
    every 30 s otherwise; iterable, or counted with ``update`` (also as a context manager)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    out = _Bar(total, desc, unit, enabled=not disable, leave=leave)
    out.iterable = iterable
    return out
