"""The commands' progress bars (tqdm): redrawn in place on a terminal; in a log (stderr or stdout a file or a pipe:
CI, `2> log`, nohup, SLURM's output file) one plain line every LOG_INTERVAL_S seconds instead.

A redraw is a carriage return and the whole bar again, up to ten a second: a log that is not a terminal keeps every
one, so an hour of `data index` left ~36,000 redraws on one "line" of the log (a training run's bar, one a second,
~86,000 a day), which a log viewer shows as one unreadable line or as thousands of partial ones.
"""
from __future__ import annotations

import os
import sys

from .paths import printable

# A log's line every this many seconds (tqdm's TQDM_MININTERVAL, when set, decides instead).
LOG_INTERVAL_S = 30.0


def progress_bar(*, file=None, **kwargs):
    """tqdm(file=file (default stderr), **kwargs), with one line per refresh, at most one per LOG_INTERVAL_S, when
    `file` is not a terminal."""
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    if "desc" in kwargs:  # a manifest's name: its control characters would garble the bar's line
        kwargs["desc"] = printable(kwargs["desc"])
    if not _is_terminal(file):
        file = _Lines(file)
        if "TQDM_MININTERVAL" in os.environ:  # tqdm reads it as its default, which an argument would override
            kwargs.pop("mininterval", None)  # (the training bar's 1 s: a log got a line a second whatever was set)
        else:
            kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL_S)
    return tqdm(file=file, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Lines:
    """A stream for tqdm that turns each redraw ("\\r<bar><padding>") into the line "<bar>\\n"."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        line = s.strip("\r\n ")
        if line:  # tqdm's "\n" after its last redraw, and its clearing redraws, are no line of their own
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # encoding, fileno: tqdm picks its bar's characters and width by them
        return getattr(self.stream, name)
