"""Preemption: a scheduler's notice (SIGTERM, or SIGUSR1 as in SLURM's `--signal=USR1@120`)
becomes a checkpoint at the next step boundary instead of the loss of every step since the
last interval checkpoint.

The handler only records the signal; the training loop reads it after each step, agreed
across ranks (all-reduce max), because a scheduler signals the ranks at slightly different
moments and a checkpoint needs every rank at the same step. The run then saves and
raises `Preempted`, a SystemExit with status 128 + the signal number, the status the signal
itself would have given.
"""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """The run stopped on a preemption notice after saving `checkpoint` at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class PreemptionNotice:
    """Records the first preemption signal this process receives while active."""

    def __init__(self) -> None:
        self.signum = 0

    def _record(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def catching(self, enabled: bool):
        """Install the handler for SIGNALS (only the main thread may), restore the old ones on exit."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                # None: a handler installed from C, which Python cannot put back; the default then.
                signal.signal(s, signal.SIG_DFL if handler is None else handler)
