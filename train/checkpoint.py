"""Distributed checkpoints: `torch.distributed.checkpoint` (DCP), atomic, keep-latest-k.

Layout of `DIR/step_00000100/`: the DCP files of the sharded state (model, optimizer,
step counters; FSDP2 shards are written by their owners, no rank gathers the full
model), plus `rank<r>.pt` per rank with what differs between ranks (RNG states, data
position) and the number of ranks that wrote the checkpoint (rank0.pt's is the one read).

Atomicity: everything is written into `step_XXXXXXXX.tmp`, then rank 0 renames it to
`step_XXXXXXXX` (an atomic rename on POSIX) after a barrier; an asynchronous save (`Saver`)
renames once its background write has finished on every rank. A crash at any moment
leaves either no new folder or a complete one; `latest()` never returns a `.tmp`, and the
next run in that folder removes it (`clear_unfinished()`).
A complete folder is never rewritten: when a run starts, `retire()` renames the
checkpoints at or after its first step (other than the one it resumed from) to
`step_XXXXXXXX.abandoned[N]`, which `latest()` ignores, so a later save never meets one
of another run's and a resume never jumps into an abandoned future.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from concurrent import futures
from contextlib import contextmanager, suppress

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from videoprism.paths import fsync_path
from videoprism.train.parallel import on_main_rank

# At least 8 digits: step_{step:08d} has 9 from step 10^8 on (such checkpoints were not listed: a resume took the
# newest one of 8 digits, and keep-latest-k deleted none of them).
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_DIR = re.compile(r"^step_\d{8,}\.tmp$")  # a save being written, or one that did not finish
_ANY_STEP_DIR = re.compile(r"^step_(\d{8,})")  # also a .tmp or .abandoned one: the step it was saved at
_RANK_FILE = re.compile(r"rank(\d+)\.pt")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _save_synced(obj, path: str) -> None:
    """torch.save, on disk before it returns (DCP syncs its own files): once the folder is renamed into
    place the older checkpoints are deleted, so a power loss must not find this file still in the page cache."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(path: str) -> None:
    try:
        fsync_path(path)
    except OSError as e:  # a file system that cannot sync a folder (EINVAL) has not failed the save
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def quiet_single_process() -> None:
    """DCP warns "torch.distributed is disabled ... assuming the intent is to save in a single
    process" on every call without a process group, even with `no_dist=True` asked for: in the
    middle of the progress bar of a one-process run it reads like a fault. A filter for that
    one message, not a `catch_warnings` block around the call: an asynchronous save warns
    from its writer thread, after such a block has ended."""
    if not _distributed():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process", category=UserWarning)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, permissions, a failing file system)."""


class CheckpointReadError(ValueError):
    """A checkpoint does not load into this run (another model config, a damaged file)."""


class DamagedCheckpointError(CheckpointReadError):
    """A checkpoint whose files are lost, cut or garbled (`reason`: which, and each rank's error), where a checkpoint
    written before it may load: `--auto-resume` goes back to one (Trainer.resume). Not raised where the cause may be
    another config, other versions, or the machine (permissions, memory), which would stop every earlier one alike."""

    def __init__(self, message: str, reason: str = ""):  # a default: unpickled (on_main_rank) from args and __dict__
        super().__init__(message)
        self.reason = reason


def _rank_errors(e: BaseException) -> dict[int, BaseException]:
    """The error of each failing rank: DCP's CheckpointException (a BaseException) carries one
    per rank, with a traceback each; any other error is this rank's."""
    return {r: exc for r, (exc, _) in e.failures.items()} if isinstance(e, CheckpointException) else {_rank(): e}


def interrupt(e: BaseException) -> None:
    """KeyboardInterrupt when Ctrl-C cut a save or load: DCP wraps every rank's exception, KeyboardInterrupt too, in
    a CheckpointException, which reported a failed write, or a damaged checkpoint to resume before (losing its
    steps)."""
    if any(isinstance(x, KeyboardInterrupt) for x in _rank_errors(e).values()):
        raise KeyboardInterrupt from None


# What a checkpoint whose files are cut or garbled raises from DCP's load (each rank's error wrapped) or torch.load.
LOAD_ERRORS = (CheckpointException, RuntimeError, EOFError, pickle.UnpicklingError)
# Of those, and of what unpickling garbage raises, the errors of a file that is there and whole: the machine failed
# (memory, the process group) or denies it (permissions, a failing disk: every OSError but a lost file's).
_NOT_DAMAGE = (OSError, MemoryError, torch.OutOfMemoryError, dist.DistError)


def _is_damage(e: BaseException) -> bool:
    """Every rank's error in `e` is what reading a lost, cut or garbled file raises (not an interrupt, nor _NOT_DAMAGE):
    a checkpoint written before it, whose files are others, may load."""
    return all(isinstance(x, FileNotFoundError) or isinstance(x, Exception) and not isinstance(x, _NOT_DAMAGE)
               for x in _rank_errors(e).values())


def _failures(e: BaseException) -> str:
    """`_rank_errors(e)` on one line."""
    def one(x: BaseException) -> str:
        text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(x)).split())  # torch bolds parts of some messages
        text = text if len(text) <= 300 else text[:297] + "..."
        return f"{type(x).__name__}: {text}" if text else type(x).__name__

    return "; ".join(f"rank {r}: {one(x)}" for r, x in sorted(_rank_errors(e).items()))


@contextmanager
def _writing(tmp: str, root: str):
    """A failed write as one OSError naming the folder, the errors and the fix (a command
    prints it as one line)."""
    try:
        yield
    except (CheckpointException, OSError, KeyboardInterrupt) as e:
        # The unfinished folder goes now: on a full disk its space is what the next run's config.json needs
        # (clear_unfinished removes it only after that write); after Ctrl-C, a checkpoint's size of disk until the
        # next run. Only once no rank writes in it: DCP raises its CheckpointException on every rank after all are
        # done; another error (a rank file, a Ctrl-C outside DCP) is this rank's alone.
        if isinstance(e, CheckpointException) or not _distributed():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise
        interrupt(e)
        kept, fix = latest(root), ""
        if any(isinstance(x, OSError) for x in _rank_errors(e).values()):
            # Without a complete checkpoint there is nothing to --resume (it stops on "no complete checkpoint").
            fix = (f": free space or fix the permissions under {root}, or set train.out_dir to another disk, then "
                   + ("--resume" if kept else "run the same command again"))
        raise CheckpointWriteError(f"writing checkpoint {tmp} failed ({_failures(e)}); the latest complete "
                                   f"checkpoint ({kept or 'none yet'}) is intact{fix}") from e


# What a numpy array (numpy's RNG state in the rank files written before it was stored as a tensor) needs from the
# unpickler, under both of its names: numpy 1.x pickles `numpy.core.multiarray._reconstruct`, numpy 2
# `numpy._core.multiarray._reconstruct`, and weights_only torch.load allows a global by the name in the file only: a
# checkpoint written under the other numpy (pyproject allows both) was reported as a damaged file.
_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed `core` to `_core`
_NUMPY_ARRAYS = [(_NP_CORE.multiarray._reconstruct, f"numpy.{core}.multiarray._reconstruct")
                 for core in ("core", "_core")]
_NUMPY_ARRAYS += [np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def versions() -> dict:
    """The versions that wrote a checkpoint (its rank files keep them): an error loading it under others names them."""
    # str(): torch.__version__ is a TorchVersion, a class weights_only torch.load refuses
    return {"torch": str(torch.__version__), "numpy": str(np.__version__), "python": sys.version.split()[0]}


def rng_state() -> dict:
    # numpy's state as plain data (its MT19937 key a tensor, not np.random.get_state()'s ndarray): a pickled ndarray
    # names numpy's private module, which differs between numpy 1.x and 2 (see _NUMPY_ARRAYS).
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        # This rank's device only (torch.cuda.set_device(LOCAL_RANK)): the states of the node's other GPUs are
        # other ranks', and a list indexed by device would not fit a resume with other GPUs visible.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]  # key: a tensor (rng_state), or an ndarray in older rank files
    np.random.set_state((kind, np.asarray(key).astype(np.uint32), *rest))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # written by get_rng_state_all(): one state per visible device
            here = torch.cuda.current_device()
            cuda = cuda[here] if here < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def step_of(path: str) -> int:
    """The step of a step_XXXXXXXX folder (-1 for another name)."""
    m = _STEP_DIR.match(os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else -1


def step_dirs(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    out = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return sorted(out)


def latest(root: str) -> str | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def find(path: str, *, required: bool, option: str = "--resume") -> str | None:
    """The checkpoint `--resume PATH` names: PATH itself when it is a step_* folder, else the latest
    complete one of the run whose out_dir (or checkpoints folder) PATH is. None when there is none,
    or, if `required`, FileNotFoundError naming where it looked (and `option`, what gave PATH)."""
    fix = "pass the run's out_dir (its latest checkpoint) or one of its checkpoints/step_* folders"
    if required and not os.path.isdir(path):
        what = "is a file, not a run's folder" if os.path.exists(path) else "does not exist"
        there = [os.path.basename(d) for _, d in step_dirs(os.path.dirname(os.path.abspath(path)))]
        if there:  # a step folder mistyped (`step_3` for step_00000003): the ones that are there
            fix = f"its folder holds {', '.join(there[-5:])}" + (f" (and {len(there) - 5} older)" if len(there) > 5
                                                                   else "")
        raise FileNotFoundError(f"{option} {path!r} {what}; {fix}")
    if os.path.basename(path.rstrip("/")).startswith("step_"):
        return path if os.path.isdir(path) else None
    target = latest(os.path.join(path, "checkpoints")) or latest(path)
    if target is None and required:
        raise FileNotFoundError(f"{option} {path!r}: no complete checkpoint there (looked for "
                                f"{os.path.join(path, 'checkpoints', 'step_*')}); {fix}")
    return target


def retire(root: str, step: int, *, keep: str | None = None) -> list[str]:
    """Rename the complete checkpoints under `root` at step >= `step`, except `keep` (the one
    the run resumed from), to `<name>.abandoned[N]`: they belong to a run this one replaces.
    Collective: rank 0 renames, every rank gets the new names, or its error (on_main_rank: raised
    between two barriers, it left the other ranks in the second)."""
    return on_main_rank(lambda: _retire(root, step, keep))


def _retire(root: str, step: int, keep: str | None) -> list[str]:
    keep_real = os.path.realpath(keep) if keep else None
    return [_set_aside(path, "checkpoint") for s, path in step_dirs(root)
            if s >= step and os.path.realpath(path) != keep_real]


def retire_records(out_dir: str) -> list[str]:
    """At a fresh start in `out_dir`: rename the records of the run this one replaces (metrics.jsonl, whose records
    the curves of this run would mix in, and the rejects.rank<r>.jsonl files) to `<name>.abandoned[N]`.
    Collective, as `retire`."""
    def aside() -> list[str]:
        names = sorted(n for n in os.listdir(out_dir)
                       if n == "metrics.jsonl" or re.fullmatch(r"rejects\.rank\d+\.jsonl", n))
        return [_set_aside(os.path.join(out_dir, n), "record") for n in names]

    return on_main_rank(lambda: aside() if os.path.isdir(out_dir) else [])


def _set_aside(path: str, what: str) -> str:
    """Rename `path` to `<path>.abandoned[N]` (the first free N), returning the new name."""
    target, n = path + ".abandoned", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.abandoned{n}"
    try:
        os.rename(path, target)
    except OSError as e:  # left in place, a later --resume would land in the replaced run: stop here
        raise OSError(f"cannot rename {what} {path} of the run this one replaces out of the way ({e.strerror or e}): "
                      f"fix the permissions under {os.path.dirname(path)} or move it away yourself, then run "
                      "again") from e
    return target


def clear_unfinished(root: str) -> list[str]:
    """Remove the `step_XXXXXXXX.tmp` folders under `root`, each a save that did not finish (a kill, a full disk):
    a checkpoint's size of disk each, which only a later save of the same step cleared. Called as a run starts,
    when none is being written (this run's first save comes later; one run writes an out_dir). Collective: rank 0
    removes, every rank gets the folders removed (on_main_rank: no rank writes a save before they are gone)."""
    return on_main_rank(lambda: _clear_unfinished(root))


def _clear_unfinished(root: str) -> list[str]:
    removed = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if _TMP_DIR.match(name):
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True)  # one that cannot be removed costs disk, not the run
            if not os.path.exists(path):
                removed.append(path)
    return removed


class Saver:
    """Writes the checkpoints of one run into `root`, keeping the latest `keep`. Collective.

    Synchronous, or asynchronous (`async_save`): DCP copies the state to host memory, a
    background thread writes it while training goes on, and `finish()` renames it into place
    once written. The loop calls `finish()` at the first step boundary where no rank is still
    writing (trainer: one all-reduce a step), at the next save, and before exiting, so one
    write is in flight at most and a crash before its rename leaves the previous checkpoint.
    """

    def __init__(self, root: str, *, keep: int, async_save: bool = False):
        self.root, self.keep, self.async_save = root, keep, async_save
        self.pending: tuple[str, str, object] | None = None  # (tmp folder, final folder, upload future)
        # The writer thread's collectives (DCP plans the write across ranks) get a group of their
        # own: on the default group they would interleave with the training loop's. Created here,
        # at the same point on every rank, as new_group requires.
        self.group = dist.new_group(backend="gloo") if async_save and _distributed() else None
        quiet_single_process()

    @property
    def writing(self) -> bool:
        """A background write is still running on this rank."""
        return self.pending is not None and not self.pending[2].done()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
             trainer_state: dict, rank_state: dict, wait: bool = True) -> str:
        """Checkpoint `step`, complete on return unless asynchronous and not `wait`. Returns its
        final path. An existing `step` folder is the one this run resumed from (`retire()` moved
        any other aside) and the state has not moved since: it is kept as it is, never rewritten
        (a crash between removing and replacing it would leave nothing loadable)."""
        self.finish()
        final = os.path.join(self.root, f"step_{step:08d}")
        if on_main_rank(lambda: os.path.isdir(final)):  # one answer for all ranks: a rank that returned here would
            return final                           # leave the others in the save's collectives
        tmp = final + ".tmp"
        on_main_rank(lambda: self._clear(tmp))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd,
                 "trainer": {k: torch.tensor(v) for k, v in trainer_state.items()}}
        with _writing(tmp, self.root):
            os.makedirs(tmp, exist_ok=True)
            _save_synced({**rank_state, "versions": versions(), "world": _world()},
                         os.path.join(tmp, f"rank{_rank()}.pt"))
            if self.async_save and not wait:
                # Returns once the state is copied to host memory: the next update cannot reach it.
                future = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group, no_dist=not _distributed())
                self.pending = (tmp, final, future)
                return final
            dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
        self._publish(tmp, final)
        return final

    def finish(self) -> None:
        """Wait for the background write (its error, such as a full disk, is raised here) and
        rename it into place. Collective; nothing to do without one."""
        if self.pending is None:
            return
        tmp, final, future = self.pending
        self.pending = None
        with _writing(tmp, self.root):
            future.result()
        self._publish(tmp, final)

    def drop(self) -> None:
        """After a failure elsewhere: wait for the background write without raising its error
        or publishing it (its thread must not outlive the process group it uses). Its `.tmp` folder is removed in one
        process; under torchrun, when a run next starts (`clear_unfinished`): other ranks may still write in it. Not
        collective."""
        if self.pending is not None:
            futures.wait([self.pending[2]])
            if not _distributed():  # no other rank writes in it: its space back now, as a failed write's (_writing)
                shutil.rmtree(self.pending[0], ignore_errors=True)
            self.pending = None

    def _clear(self, tmp: str) -> None:
        """Rank 0, before the ranks write `tmp`: the checkpoints folder made, leftovers of a crashed save of the
        same step removed. Run through on_main_rank, as `_rename_into_place`."""
        with _writing(tmp, self.root):
            os.makedirs(self.root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: str, final: str) -> None:
        _barrier()
        # on_main_rank, not rank 0 between two barriers: its error (a failing disk) reaches every rank as the
        # same one-line CheckpointWriteError; the others failed in the second barrier when rank 0's process
        # group closed (a gloo traceback) or waited there until the collective timed out.
        on_main_rank(lambda: self._rename_into_place(tmp, final))

    def _rename_into_place(self, tmp: str, final: str) -> None:
        with _writing(tmp, self.root):
            os.rename(tmp, final)
            _sync_folder(self.root)  # the rename on disk before the checkpoints it replaces are deleted
        # The checkpoints older than the latest k leave the step_* names before they are deleted file by file
        # (seconds for a large one, within a preemption's hard kill): a kill left a partial folder that step_dirs
        # listed as complete. One that cannot be renamed is left whole; what such a kill left goes now.
        for _, old in step_dirs(self.root)[:-self.keep] if self.keep > 0 else []:
            with suppress(OSError):
                os.rename(old, old + ".deleting")
        for name in os.listdir(self.root):
            if name.endswith(".deleting") and _STEP_DIR.match(name.removesuffix(".deleting")):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def written_ranks(path: str, use: str = "resume") -> int:
    """How many ranks wrote the checkpoint at `path`: the number rank0.pt records, once for the whole checkpoint. A
    count of the rank<r>.pt files read one whose last files are lost as a checkpoint of fewer ranks, resumed
    (resharded) without their data positions and RNG states. Of a checkpoint written before the rank files recorded
    it: that count, r = 0..n-1 (a lost last file goes unseen there). Lost files: DamagedCheckpointError naming them
    and the checkpoint to `use` ("resume" or "export") instead."""
    found = sorted(int(m.group(1)) for m in map(_RANK_FILE.fullmatch, os.listdir(path)) if m)
    recorded = read_rank_state(path, 0, use).get("world") if 0 in found else None
    ranks = recorded or max(found, default=0) + 1
    lost = [r for r in range(ranks) if r not in found]
    if lost:
        # A folder is renamed into place once every rank wrote its file: one is lost.
        reason = (f"incomplete: {', '.join(f'rank{r}.pt' for r in lost)} lost"
                  + (f" (written by {recorded} ranks)" if recorded else ""))
        if _TMP_DIR.match(os.path.basename(path.rstrip("/"))):  # never renamed into place: not "lost", unwritten
            reason = f"incomplete: a save that did not finish (no {', '.join(f'rank{r}.pt' for r in lost)})"
        raise DamagedCheckpointError(f"checkpoint {path!r} is {reason}: {_earlier(path, use)}", reason)
    return ranks


def _earlier(path: str, use: str = "resume") -> str:
    """The fix for a checkpoint that does not load: the complete one before it, named, to `use` ("resume" or
    "export"). While the damaged one is the latest, `--resume OUT_DIR` takes it again (`--auto-resume` goes back
    itself: Trainer.resume); resumed from the one before, the run renames it out of the way (`retire`). Of a
    step_XXXXXXXX.tmp (a save that did not finish), the one before it is the latest complete checkpoint, which
    `videoprism export` of its run folder takes (find): said."""
    folder = os.path.dirname(path.rstrip("/"))
    m = _ANY_STEP_DIR.match(os.path.basename(path.rstrip("/")))
    before = [p for s, p in step_dirs(folder) if m and s < int(m.group(1))]
    if use == "export":
        if not before:
            return "no complete checkpoint before it: restore the file"
        run = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
        also = (f" (the run's latest complete checkpoint, which `videoprism export {run}` takes)"
                if step_of(path) < 0 and before[-1] == latest(folder) else "")
        return f"export the checkpoint before it, videoprism export {before[-1]}{also}"
    return (f"resume from the checkpoint before it, --resume {before[-1]}" if before else
            "no complete checkpoint before it: restore the file, or start afresh without --resume")


def _versions_of(path: str) -> dict | None:
    """The versions that wrote the checkpoint at `path` (rank0.pt's), None when unknown (written before checkpoints
    kept them, or rank0.pt does not read)."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAYS):
            saved = torch.load(os.path.join(path, "rank0.pt"), weights_only=True).get("versions")
        return saved if isinstance(saved, dict) else None
    except Exception:  # noqa: BLE001 - only a hint for another error's message
        return None


def other_versions(path: str, export_here: bool = False) -> str:
    """'' when the checkpoint at `path` was written under this process's torch and numpy (or it does not say), else
    which versions wrote it and the fix: a checkpoint's files (DCP's metadata, the RNG states) are torch's and numpy's
    formats, which another version may not read; the model's weights move between versions as safetensors.
    `export_here`: its weights loaded under this process's versions (only the RNG states did not), so export here."""
    theirs, ours = _versions_of(path), versions()
    # The release, not the build (2.11.0+cu130 and 2.11.0+cpu write and read the same formats).
    diff = [k for k in ("torch", "numpy") if theirs and str(theirs.get(k)).split("+")[0] != ours[k].split("+")[0]]
    if not diff:
        return ""
    return (f"it was written under {' and '.join(f'{k} {theirs.get(k)}' for k in diff)}, this is "
            f"{' and '.join(f'{k} {ours[k]}' for k in diff)}: resume it with the versions that wrote it, or carry its "
            f"model over: `videoprism export {path}` "
            + ("(its weights load here; only the RNG states do not)" if export_here else "under those versions")
            + ", then a new run here with "
            "model.init=THAT.safetensors (the optimizer state and data position start afresh)")


def restore_rng(path: str, rank: int, state: dict) -> None:
    """set_rng_state of the states rank `rank` saved in the checkpoint at `path`: one that this torch or numpy does
    not take (another version's format) stops with one line naming the checkpoint, the versions and the fix, not a
    traceback from torch.set_rng_state."""
    try:
        set_rng_state(state)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        # Called after the model and optimizer state loaded: `videoprism export` works under these versions.
        note = other_versions(path, export_here=True) or (
            f"written under another torch or numpy? resume it with the versions that wrote it, or `videoprism export "
            f"{path}` (its weights load here), then a new run with model.init=THAT.safetensors")
        raise CheckpointReadError(f"checkpoint {path}: the RNG states of rank{rank}.pt do not restore "
                                  f"({_failures(e)}); {note}") from e


def damaged(path: str, what: str, e: BaseException, use: str = "resume") -> CheckpointReadError:
    """The error of the checkpoint at `path` whose file(s) `what` do not read (`e`), with the fix for `use` (and
    first, when other torch or numpy versions wrote it, that fix: the likelier cause). A DamagedCheckpointError
    unless that, or `e` is not a damaged file's (_is_damage: a permission denied)."""
    note, reason = other_versions(path), f"{what}: {_failures(e)}"
    message = (f"checkpoint {path} does not load ({reason}): "
               + (f"{note}; if not that, a damaged file; " if note else "a damaged file; ") + _earlier(path, use))
    return DamagedCheckpointError(message, reason) if _is_damage(e) and not note else CheckpointReadError(message)


def read_rank_state(path: str, rank: int, use: str = "resume") -> dict:
    """The RNG states and data position rank `rank` saved in the checkpoint at `path` (`use`: as `damaged`)."""
    try:
        # No unpickling of arbitrary objects; numpy arrays (its RNG state) are plain data.
        with torch.serialization.safe_globals(_NUMPY_ARRAYS):
            state = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=True)
        _check_rank_state(state)
        return state
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise damaged(path, f"rank{rank}.pt", e, use) from e


# More ranks than any job has: a rank file recording more is not one the trainer wrote (a count of 10**12 made
# written_ranks list that many lost files, MemoryError).
_MAX_WORLD = 1 << 24


def _check_rank_state(state) -> None:
    """ValueError unless `state` has the structure Saver writes (a dict; `world` an int of ranks; `data`, `rng` and
    `export` dicts, `export` naming its prefix): a rank file that loads but holds something else (hand-made, or
    another program's) raised AttributeError, TypeError or KeyError from the code that reads it, as a traceback."""
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a rank's state")
    world = state.get("world", 1)
    if type(world) is not int or not 1 <= world <= _MAX_WORLD:
        raise ValueError(f"'world' is {str(world)[:40]}, not a number of ranks")
    for key in ("data", "rng", "export"):
        if key in state and not isinstance(state[key], dict):
            raise ValueError(f"'{key}' is a {type(state[key]).__name__}, not a dict")
    if "export" in state and not isinstance(state["export"].get("prefix"), str):
        raise ValueError("'export' names no prefix")


def read_metadata(path: str, use: str = "resume") -> Metadata:
    """DCP's metadata of the checkpoint at `path` (`use`: as `damaged`). Checked before DCP loads: DCP logs a
    missing or damaged `.metadata` as two warnings with a traceback each, then fails with an AssertionError."""
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises almost any error
        raise damaged(path, ".metadata", e, use) from e


def _fits(state: dict, path: str) -> bool:
    """Whether `state` has the keys and sizes the metadata of the checkpoint at `path` lists: DCP's planning of
    its load, which reads no tensor. One that does not fit holds another model's state (another config, or the code
    that builds the model changed since), whatever state its files are in."""
    planner = DefaultLoadPlanner()
    planner.set_up_planner(state, read_metadata(path))
    try:
        planner.create_local_plan()
    except (RuntimeError, ValueError):  # "Missing key in checkpoint state_dict", "Size mismatch between saved ..."
        return False
    return True


def readable(path: str, use: str = "resume") -> int:
    """The number of ranks that wrote the checkpoint at `path`, once its rank files and its metadata are found (else
    one line naming the lost file and the checkpoint to `use` instead)."""
    ranks = written_ranks(path, use)
    read_metadata(path, use)
    return ranks


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
         trainer_keys: list[str], differences: list[str] | None = None) -> tuple[dict, int]:
    """Load `path` into model and optimizer (in place, any parallel layout and number of ranks: DCP
    reshards); returns (trainer_state, the number of ranks that wrote it). The rank files (RNG states,
    data positions) are read with `read_rank_state`. `differences`: how this run's config differs from the one of
    the run that wrote `path` in what shapes the state (None: unknown), which a failed load names as its cause."""
    if not os.path.isdir(path) or step_of(path) < 0:
        raise FileNotFoundError(f"checkpoint {path!r} is not a complete step_XXXXXXXX folder; pass the "
                                "run's out_dir with --resume or one of its checkpoints/step_* folders")
    ranks = on_main_rank(lambda: readable(path))  # rank 0's listing (its error) on every rank
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": {k: torch.tensor(0) for k in trainer_keys}}
    quiet_single_process()
    try:
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=True))
    except (torch.OutOfMemoryError, dist.DistError):
        raise  # the device or the process group failed, not the checkpoint
    except LOAD_ERRORS as e:
        interrupt(e)
        fits = _fits(state, path)
        if differences:
            cause = (f"this run's config differs from the one that wrote it in {'; '.join(differences)}: drop "
                     "those changes")
        elif differences is None:
            cause = ("the run that wrote it had another model config (its config.json is gone: pass --config with "
                     "its preset and model fields)")
        elif fits:
            cause = "the same config as the run that wrote it, so not a config change"
        else:
            cause = ("the same config as the run that wrote it, but another model: its metadata lists other keys or "
                     "sizes (the code that builds the model changed since?)")
        note = other_versions(path)
        message = (f"checkpoint {path} does not load into this run ({_failures(e)}); " + (f"{note}; " if note else "")
                   + f"a size mismatch or a missing key: {cause}; a damaged file: {_earlier(path)}")
        if differences == [] and not note and fits and _is_damage(e):  # the writer's model and versions: its files
            raise DamagedCheckpointError(message, f"its .distcp files: {_failures(e)}") from e
        raise CheckpointReadError(message) from e
    return {k: int(v) for k, v in state["trainer"].items()}, ranks
