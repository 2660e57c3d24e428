"""Progress that reads well where it is written: a redrawn bar on a terminal, plain lines in a file.

Under Slurm, `nohup` or CI the output is a file, where a bar's carriage-return redraws pile up into one
endless "line" that `less` and `tail` cannot show. There, `Progress` prints a plain line (tqdm's own
meter text: count, elapsed, remaining, rate, and the caller's postfix such as losses and memory) every
`every_s` seconds and once when it closes, so every epoch leaves at least one line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

EVERY_S = 30.0  # between two plain lines in a file


class Progress:
    """tqdm's interface as far as this project uses it: `update`, `set_postfix_str`, `close`, a context
    manager, and iteration over `iterable` when one is given. `disable`: show nothing (other ranks)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
        leave: bool = True,
        every_s: float = EVERY_S,
        stream: TextIO | None = None,
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.iterable = iterable
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.desc, self.unit, self.disable, self.every_s = desc, unit, disable, every_s
        self.terminal = _is_terminal(self.stream)
        self._bar = None
        if self.terminal and not disable:
            self._bar = tqdm(
                total=self.total,
                desc=desc,
                unit=unit,
                initial=initial,
                leave=leave,
                dynamic_ncols=True,
                file=self.stream,
            )
        self.n = self._start_n = initial
        self._postfix = ""
        self._started = self._printed = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.disable and time.monotonic() - self._printed >= self.every_s:
            self._print_line()

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif not self.disable:
            self._print_line()

    def _print_line(self) -> None:
        now = time.monotonic()
        elapsed = now - self._started
        # The rate of this run of the loop (a resumed epoch starts at `initial`, not at 0).
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else None
        line = tqdm.format_meter(
            self.n, self.total, elapsed, ncols=0, prefix=self.desc, unit=self.unit, rate=rate, postfix=self._postfix
        )
        print(line, file=self.stream, flush=True)
        self._printed = now


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _length(iterable: Iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None
