"""Preemption: a scheduler's notice (SIGTERM, or SIGUSR1 as in SLURM's `--signal=USR1@120`)
becomes a checkpoint at the next step boundary instead of the loss of every step since the
last interval checkpoint.

The handler only records the signal; the training loop reads it after each step, agreed
across ranks (all-reduce max), because a scheduler signals the ranks at slightly different
moments and a checkpoint needs every rank at the same step. The run then saves and
raises `Preempted`, a SystemExit with status 128 + the signal number, the status the signal
itself would have given.

Outside the steps (startup: the model, the data cache, the compile; after the final
checkpoint: the evaluation, export and plot) there is no step to finish: `stopping` ends the
run at once, with a line saying what was kept and the same exit status, instead of the
signal's default action (a silent exit). `videoprism data index` stops by it too (its journal keeps what was probed),
which is why this lives beside the data code and not under train/.

Every command (cli.run_command) stops so on SIGTERM and SIGUSR1 where no code of its own acts on them, short ones
too: SIGUSR1 is a notice as SIGTERM is (SLURM's `--signal=USR1@120` reaches every process of the job's steps, an
`embed` beside the trainer included), and its default action is the same silent exit, with the command's `with`
blocks (a temporary folder, decoding workers) never unwound.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """The run stopped on a preemption notice; `checkpoint` holds it up to `step` (None, None: before its first
    step, with nothing to save). `said`: the code that stopped has said what it kept; if not, the command's line
    (cli.run_command) names only the signal."""

    def __init__(self, signum: int, step: int | None, checkpoint: str | None, *, said: bool = True):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint, self.said = signum, step, checkpoint, said


def stopped_line(signum: int, kept: str) -> str:
    """The one line of a command stopped by `signum`: the signal, then what was kept and how to go on."""
    return f"{signal.Signals(signum).name}: stopped; {kept}"


class PreemptionNotice:
    """Records the first preemption signal this process receives while active."""

    def __init__(self) -> None:
        self.signum = 0

    def _record(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def catching(self, enabled: bool):
        """Install the handler for SIGNALS (only the main thread may), restore the old ones on exit."""
        with _handling(enabled, self._record):
            yield self


@contextlib.contextmanager
def stopping(enabled: bool, stop: Callable[[int], BaseException]):
    """While the block runs, a notice raises `stop(signum)` (a `Preempted` whose message the callable has
    said) as soon as the main thread runs Python; further notices are ignored while it unwinds."""
    def _raise(signum: int, frame) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise stop(signum)

    with _handling(enabled, _raise):
        yield


@contextlib.contextmanager
def _handling(enabled: bool, handler):
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            # None: a handler installed from C, which Python cannot put back; the default then.
            signal.signal(s, signal.SIG_DFL if old is None else old)
