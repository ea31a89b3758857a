"""What a run's folder (train.out_dir) holds, and whether a run may write there.

A run writes its checkpoints, its export (model.safetensors), config.json and metrics.jsonl into train.out_dir.
Another run's checkpoints and export in that folder are work that a new run would replace: its checkpoints
renamed out of the way, its export overwritten at the end (a stage-1 export may be the teacher of a stage-2 run),
its records mixed with the new run's. So a run writes a folder that holds another run only when told to
(`--overwrite`): a fresh start there, or a resume from another folder's checkpoint into it. A run resumes only a
run of its own stage (config.json names it).

A live run holds its folder: its main rank keeps an flock on `run.lock` there from its start to its end, and a
second run (a requeued job whose first instance still runs, the same job submitted twice, two fresh runs started
together) stops before it writes anything there. The kernel drops the lock with its holder's last descriptor, so a
run killed outright leaves no stale lock.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys

from videoprism.paths import echo
from videoprism.train import checkpoint as ckpt
from videoprism.train.config import RUN_STAGE
from videoprism.train.parallel import Dist, on_main_rank

EXPORT = "model.safetensors"
LOCK = "run.lock"
# flock's errors where the file system has no locks (NFS without its lock service, some FUSE file systems).
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_HELD: set[int] = set()  # the descriptors of the lock files this process holds (a main rank's)


def _forget_in_child() -> None:
    """In a process forked from the holder (a DataLoader worker, a decoder pool): the lock lives as long as any
    descriptor of its open file, so a copy here would keep it after the run died. Closed, not unlocked (an unlock
    through the copy would free the run's own lock)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def export_path(out_dir: str) -> str:
    return os.path.join(out_dir, EXPORT)


def run_folder(path: str) -> str:
    """The out_dir of the run that `--resume PATH` names (PATH: an out_dir, its checkpoints folder or a step_*
    folder in it)."""
    path = os.path.abspath(path.rstrip("/") or "/")
    if ckpt.step_of(path) >= 0:
        path = os.path.dirname(path)
    return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def stage_of(folder: str) -> int | None:
    """The stage of the run in `folder`, as its config.json says (None: no such file, or written before it said)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            stage = json.load(fh).get(RUN_STAGE)
    except (OSError, ValueError, AttributeError):
        return None
    return stage if stage in (1, 2) else None


def holdings(folder: str) -> list[str]:
    """What a run in `folder` would lose to another one written there: its checkpoints and its export."""
    held = []
    steps = ckpt.step_dirs(os.path.join(folder, "checkpoints"))
    if steps:
        held.append(f"{len(steps)} checkpoint(s) up to step {steps[-1][0]}")
    if os.path.exists(export_path(folder)):
        held.append(f"its export {EXPORT}")
    return held


def same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_out_dir(out_dir: str, stage: int, *, resume: str | None, overwrite: bool, teacher: str = "") -> None:
    """ValueError, with the fix, when this run (stage `stage`, resuming from `resume` or starting fresh) must not
    write `out_dir`: it would overwrite its own teacher; it resumes another stage's run; or `out_dir` holds another
    run and `overwrite` is off."""
    if teacher and same_folder(teacher, export_path(out_dir)):
        raise ValueError(f"stage2.teacher={teacher} is this run's export path (train.out_dir/{EXPORT}): the stage-2 "
                         "export would overwrite its teacher; set train.out_dir to another folder")
    source = run_folder(resume) if resume is not None else None
    if source is not None:
        other = stage_of(source)
        if other is not None and other != stage:
            fix = (f"stage 2 starts from a stage-1 run's export: stage2.teacher={export_path(source)}, a new "
                   "train.out_dir and no --resume" if stage == 2 else
                   "stage 1 starts afresh (or from an export: model.init=PATH) in a folder of its own")
            raise ValueError(f"--resume {resume}: {source} holds a stage-{other} run, which stage {stage} cannot "
                             f"resume; {fix}")
        if same_folder(source, out_dir) and ckpt.step_dirs(os.path.join(out_dir, "checkpoints")):
            return  # the run goes on in its own folder
    held = holdings(out_dir)
    if not held or overwrite:
        return
    check_not_live(out_dir)  # a live run's folder: that is what stops this one, not what it holds
    held_stage = stage_of(out_dir)
    what = f"a stage-{held_stage} run" if held_stage is not None else "another run"
    if source is not None and same_folder(source, out_dir):
        # --auto-resume's first start (no checkpoint here yet) in a folder that holds an export: a converted model
        # or a finished run's, which this run's export would replace at the end.
        fix = ("it has no checkpoint to continue; set train.out_dir to a folder of this run's own, or start over "
               "there with --overwrite instead of --auto-resume")
    elif source is None:
        fix = ("continue it with --resume (or --auto-resume), " if held_stage in (None, stage) else "") + (
            "set train.out_dir to a folder of this run's own, or add --overwrite to start over there")
    else:
        fix = f"set train.out_dir to a folder of this run's own to continue {source}'s run there, or add --overwrite"
    raise ValueError(f"train.out_dir={out_dir} holds {what} ({', '.join(held)}), which this run would replace; {fix} "
                     "(with --overwrite its checkpoints are kept as step_*.abandoned, its export is replaced at the "
                     "end)")


class OutDirBusyError(ValueError):
    """train.out_dir is held by another live run."""


def lock_path(out_dir: str) -> str:
    return os.path.join(out_dir, LOCK)


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote in the file when it took it."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
        command = info["command"].replace("\n", "\\n")  # one line (a `python -c` script has several)
        return f"pid {info['pid']} on host {info['host']} since {info['since']}, its command: {command}"
    except (OSError, ValueError, TypeError, KeyError):  # taken a moment ago, not yet written; or another writer's
        return "a process that has not yet said who it is"


def _busy(out_dir: str, fd: int) -> OutDirBusyError:
    return OutDirBusyError(
        f"train.out_dir={out_dir} is written by another run that is still running ({_holder(fd)}; per "
        f"{lock_path(out_dir)}): wait for it to end or stop it, or set train.out_dir to another folder (--overwrite "
        "replaces a finished run's folder, never a live one's)")


class OutDirLock:
    """The lock by which a run holds its `out_dir`, from `hold` to `release`."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.fd: int | None = None  # the main rank's, while it holds the folder

    def hold(self, dist_: Dist) -> None:
        """The main rank takes the lock; every rank learns the outcome: OutDirBusyError raised on every rank when
        another live run holds the folder, a note where its file system has no locks. Collective."""
        note = on_main_rank(self._take)
        if note and dist_.main:
            echo(note, flush=True)

    def _take(self) -> str | None:
        """None once this process holds the folder, or a note where the file system cannot lock."""
        os.makedirs(self.out_dir, exist_ok=True)
        path = lock_path(self.out_dir)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited across exec (PEP 446)
        except OSError as e:
            raise OSError(f"cannot open {path} to hold train.out_dir for this run ({e.strerror or e}): fix the "
                          "permissions there or set train.out_dir to another folder") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = _busy(self.out_dir, fd)
            os.close(fd)
            raise busy from None
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_LOCKS:
                raise OSError(f"cannot lock {path} to hold train.out_dir for this run ({e.strerror or e}); set "
                              "train.out_dir to a folder on another file system") from e
            return (f"note: train.out_dir={self.out_dir}: its file system cannot lock {LOCK} ({e.strerror}), so "
                    "nothing stops another run writing this folder at the same time; start one run per "
                    "train.out_dir")
        self.fd = fd
        _HELD.add(fd)
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": since,
                "command": shlex.join(sys.orig_argv)}
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, the next run's line is vaguer
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        return None

    def release(self) -> None:
        """The end of the run (nothing where this process holds nothing). Unlocked before the close: a child forked
        other than through Python's os.fork (which closes its copy) may still hold a descriptor of it."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD.discard(fd)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_not_live(out_dir: str) -> None:
    """OutDirBusyError when a live run holds `out_dir`: for a run that check_out_dir refuses anyway, whose line
    should say that (its fix is to wait, not --overwrite). A shared lock, held for an instant: it tells without
    writing the file. Any other outcome (no lock file, no locks on this file system) is left to `OutDirLock.hold`."""
    try:
        fd = os.open(lock_path(out_dir), os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _busy(out_dir, fd) from None
    except OSError:
        pass
    finally:
        os.close(fd)
