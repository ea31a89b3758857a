"""The training / evaluation loader: sharded, seeded, resumable, robust to bad samples.

    loader = build_loader("data/train.jsonl", num_frames=16, resolution=288, batch_size=8, train=True, seed=0,
                          rank=0, world_size=1, tokenizer="data/spm.model", backend="auto", num_workers=2)
    for batch in loader:          # one epoch from the current position
        batch["video"]            # uint8 [B, T, R, R, 3] (on the GPU with the DALI GPU backend)
        batch["text_ids"]         # int64 [B, 64] (with a tokenizer; tokenizer=None: no text fields)
        batch["text_paddings"]    # float32 [B, 64], 1.0 = padding
        batch["label"] / batch["label_<name>"]  # int64 [B] when the manifest has labels (-1 where missing)
        batch["caption"], batch["path"], batch["dataset"]  # lists of str (caption None: a video-only line, read
                                  # without a tokenizer); batch["index"]: int64 [B] sample ids
    state = loader.state_dict()   # {"epoch", "position", "rejects", ...}: save it with the checkpoint
    loader.load_state_dict(state) # the next iteration yields exactly the batches that would have come next

Order: the samples of epoch e are permuted by a generator seeded with (seed, e) (identity when `train=False`);
rank r of w takes every w-th sample from r (a training epoch first drops the tail so every rank gets the same
count). Each sample's transform is drawn from (seed, e, sample id), so the batches depend only on the seed and
the position, never on `num_workers` or the decoder.
Workers: at most WORKERS_PER_CORE per core (a note says so) and one per item left to decode (the others would have
none: `embed` of one video with --workers 100000 started 100000 processes and hung).

Decoders, per file: `backend="pyav"` decodes with PyAV (the fastest CPU decoder measured here, see decode.py);
`backend="dali"` runs the DALI graph (dali_pipeline.py) on the GPU when `device` is CUDA, else on the CPU, for the
files whose codec DALI takes on that device, and PyAV for the others and for files DALI fails on (it decodes them or
says why not; dali_pipeline.py); `backend="auto"` is DALI on a GPU when DALI is installed, else PyAV.

Bad samples (missing, empty, truncated, corrupt, non-video, unsupported, too few frames; bad manifest lines; files
whose decode kills its worker process or hangs past `decode_timeout`) are skipped and recorded (`loader.rejects`:
(name, reason)); `TooManyBadSamplesError` stops the run when the skipped share of an epoch passes `max_bad_share`
(default 1%).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..paths import echo, shortened, shown
from ..preemption import SIGNALS as STOP_SIGNALS
from .cores import usable_cores
from .device import to_device
from .errors import BadSampleBudget, BadVideoError
from .manifest import Sample, SampleList, read_source
from .text import Tokenizer
from .transforms import TRAIN_FLIP_PROB, Augment

BACKENDS = ("auto", "pyav", "dali")


@dataclass
class _Item:
    """One decoded sample (`video`) or the reason it was skipped (`bad`)."""

    pos: int  # position in this rank's epoch order
    sample_id: int
    video: torch.Tensor | None = None
    bad: str | None = None
    no_shm: str | None = None  # a worker could not put the clip in shared memory (/dev/shm full): why


def _identity(x):
    return x


def _init_worker(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and SIGUSR1 to their parent, as torch's workers do SIGINT:
    a scheduler signals the whole process group (SLURM: every process of the job), and a trainer
    that saves a checkpoint on the notice (videoprism/preemption.py) needs its workers
    alive until it has. So that a worker that ignores them, or is stuck in a decoder, never
    outlives its parent, Linux kills it when the parent thread that started it dies
    (PR_SET_PDEATHSIG); torch's own watchdog acts only between items. SIGALRM gets its default
    action back (a handler inherited through fork would defuse the decode timeout, see _PyAVItems)."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is _defer_signal:  # forked inside signals_deferred: Ctrl-C as a worker's
        signal.signal(signal.SIGINT, signal.default_int_handler)
    die_with_parent()


def die_with_parent() -> None:
    """In a worker process (multiprocessing's): Linux kills it when the parent thread that started it dies
    (PR_SET_PDEATHSIG), so that a parent killed outright (SIGKILL, the OOM killer) leaves no worker behind, whatever
    signals the worker ignores."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    # Did the parent die before the request took effect? Its sentinel pipe says so under every start
    # method, but under fork a sibling worker may hold a copy of it open; being reparented says so
    # except under forkserver (Python 3.14's default), where the OS parent is the fork server.
    parent = multiprocessing.parent_process()
    if parent is not None and (not parent.is_alive() or (
            multiprocessing.get_start_method() != "forkserver" and os.getppid() != parent.pid)):
        os._exit(0)


_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators with workers (_pyav_items)

# Held back over forks: Ctrl-C and the stop signals, whose handlers raise (a trainer's startup, `data index`).
_HELD_SIGNALS = (signal.SIGINT, *STOP_SIGNALS)
_DEFERRED_SIGNALS: list[int] = []


def _defer_signal(signum: int, frame) -> None:
    _DEFERRED_SIGNALS.append(signum)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C, SIGTERM and SIGUSR1 held back until the block has run, then handed to their handlers. Python runs a
    signal's handler at the main thread's next bytecode: when that is in a callback of os.fork (logging's lock
    release, as a DataLoader or a process pool starts its workers) or of a worker's shutdown, Python prints
    "Exception ignored in ..." and drops the handler's exception (KeyboardInterrupt, Preempted), and the command
    goes on (2 Ctrl-Cs in 12 on tiny epochs here; a SIGTERM as `data index` forked its probe pool ran the index to
    its end, status 0). Only in the main thread (Python runs signal handlers there, so another thread's forks are
    not at risk) and only over handlers written in Python (SIG_IGN and SIG_DFL act in the kernel)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {s: h for s in _HELD_SIGNALS if callable(h := signal.getsignal(s))}
    for s in held:
        signal.signal(s, _defer_signal)
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        came = [s for s in dict.fromkeys(_DEFERRED_SIGNALS) if s in held]
        _DEFERRED_SIGNALS.clear()
        for s in came:
            held[s](s, None)


def _kill_workers_at_exit() -> None:
    """multiprocessing's exit handler SIGTERMs its daemonic children, then joins them: ours ignore SIGTERM
    (_init_worker), so a process that exits while a loader iterator is alive (an uncaught error) would wait
    for them forever. This handler is registered after multiprocessing's, so it runs before it."""
    for it in list(_LIVE_ITERATORS):
        for w in getattr(it, "_workers", ()):
            if w.is_alive():
                w.kill()


atexit.register(_kill_workers_at_exit)  # multiprocessing.connection registered multiprocessing's on import


class _InFlight:
    """The position each DataLoader worker is decoding (-1 between items), in shared memory: when a worker
    dies, this names the file it was on."""

    def __init__(self, workers: int):
        self.pos = multiprocessing.Array("q", [-1] * workers, lock=False)

    def faults(self, it, decode_timeout: float) -> list[tuple[int | None, str]]:
        """(position, reason to skip it) for each worker of the iterator `it` that died in a decode; (None,
        how) for one that died between items."""
        workers = getattr(it, "_workers", ())  # a DataLoader without workers has none
        # The error may come before the worker is gone: a dying worker's pipe closes (ConnectionResetError
        # while the parent fetches a tensor it shared) before the kernel reaps it.
        ended = multiprocessing.connection.wait([w.sentinel for w in workers], timeout=1.0)
        for w in workers:
            if w.sentinel in ended:
                w.join(0.5)  # its pipes close a moment before the kernel can report how it ended
        out = []
        for wid, w in enumerate(workers):
            pos, code = int(self.pos[wid]), w.exitcode
            if code is None:
                continue
            if code == -signal.SIGALRM and pos >= 0:  # the decode's own alarm (_PyAVItems)
                out.append((pos, f"the decoder hung on it (no result after {decode_timeout:g} s: "
                                 "data.decode_timeout)"))
                continue
            how = (f"its worker process was killed by {signal.Signals(-code).name}"
                   if code < 0 and -code in signal.valid_signals() else f"its worker process exited with {code}")
            out.append((pos, f"the decoder crashed on it ({how})") if pos >= 0 else (None, how))
        return out


class _PyAVItems(torch.utils.data.Dataset):
    """Position j of the epoch order -> `_Item`, decoded with PyAV (runs in DataLoader workers).

    `in_flight` records the position each worker decodes; `faulty` maps the positions whose decode killed or
    hung a worker earlier in this epoch to the reason: they are skipped without decoding them again."""

    def __init__(self, loader: "VideoTextLoader", order: np.ndarray, epoch: int, threads: int,
                 in_flight: _InFlight | None = None, faulty: dict[int, str] | None = None):
        self.loader, self.order, self.epoch, self.threads = loader, order, epoch, threads
        self.in_flight, self.faulty = in_flight, faulty or {}

    def __len__(self):
        return len(self.order)

    def __getitem__(self, pos: int) -> _Item:
        from .decode import decode_clip  # PyAV: imported where it decodes (the GPU machines lack it)

        sid = int(self.order[pos])
        if pos in self.faulty:
            return _Item(pos, sid, bad=self.faulty[pos])
        s = self.loader.samples[sid]
        worker = torch.utils.data.get_worker_info()
        track = self.in_flight is not None and worker is not None
        if track:
            self.in_flight.pos[worker.id] = pos
            # A decode hung inside libav never returns to Python, so no Python-level timeout can end it; the
            # kernel ends the process when the alarm fires (SIGALRM's default action), and the parent's
            # next() sees a worker that died on this position.
            signal.setitimer(signal.ITIMER_REAL, self.loader.decode_timeout)
        try:
            video = decode_clip(s.source(), self.loader.num_frames, self.loader.resolution,
                                self.loader.augment(self.epoch, sid), start=s.start, end=s.end, name=s.name,
                                threads=self.threads)
        except BadVideoError as e:
            return _Item(pos, sid, bad=e.reason)
        except OSError as e:  # the file vanished or cannot be read between listing and decoding
            return _Item(pos, sid, bad=f"unreadable ({e.strerror or e})")
        finally:
            if track:
                signal.setitimer(signal.ITIMER_REAL, 0)
                self.in_flight.pos[worker.id] = -1
        if worker is not None:
            # The clip goes to the parent through /dev/shm. Pickled by the queue's feeder thread, a full /dev/shm
            # (Docker's default is 64 MB) failed there: a traceback on stderr, the item lost, and the parent
            # waiting for it forever. Moved here (the copy the pickler would make), the failure is the item's.
            try:
                video.share_memory_()
            except RuntimeError as e:
                return _Item(pos, sid, no_shm=str(e))
        return _Item(pos, sid, video=video)


_STATUS_CHECK_S = 0.5  # how often a next() waiting for an item checks that the workers are alive


class _SynchronouslyWatchedIter(torch.utils.data.dataloader._MultiProcessingDataLoaderIter):
    """A DataLoader iterator whose workers' deaths are exceptions of `next()`, never ones raised at a
    random point.

    torch's SIGCHLD handler raises "DataLoader worker is killed by signal" in the main thread wherever it
    happens to be (in the middle of an optimizer step, say), where nothing can recover. The iterator's
    __init__ registers its workers with that check and then calls `_reset`, which hands them their first
    items: unregistering them here, before any item is sent (private API, checked by tests/test_data.py
    under each torch we support), leaves no moment in which a decode can crash while they are watched
    (unregistering after `iter()` returned left one: a first item that killed its worker at once raised
    inside `iter()`, with no iterator to ask which worker died). What is left is the iterator's own
    check: a `next()` that waits for a dead worker's item raises RuntimeError within `_STATUS_CHECK_S`."""

    def __init__(self, loader) -> None:
        try:
            with signals_deferred():  # it forks the workers
                super().__init__(loader)
        except BaseException:
            self._kill_started_workers()
            raise

    def _try_get_data(self, timeout: float = _STATUS_CHECK_S):
        # torch looks for dead workers only when its wait for an item times out, every 5 s by default: each
        # crash or hang of a decode stalled the run that long before the workers restarted.
        return super()._try_get_data(timeout)

    def _kill_started_workers(self) -> None:
        """After a failed start (EMFILE under a low `ulimit -n`: the next worker's queue, after some had forked):
        torch's own clean-up of a half-built iterator fails (its worker status is set later), and its SIGTERM
        is ignored by our workers (_init_worker), so they outlived the error and the exit waited for them
        forever. SIGKILL: they hold nothing to save."""
        for w in getattr(self, "_workers", ()):
            w.kill()
            w.join()
        if getattr(self, "_worker_pids_set", False):
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(self))
            self._worker_pids_set = False
        self._workers, self._shutdown = [], True  # __del__ has nothing left to stop

    def _shutdown_workers(self) -> None:
        # Called by next() at the epoch's end, by _pyav_items before a restart, and by __del__ (where a Ctrl-C is
        # lost whatever is done).
        if getattr(self, "_shutdown", True) or sys.is_finalizing():  # nothing left to stop, or the exit
            return super()._shutdown_workers()
        with signals_deferred():
            super()._shutdown_workers()

    def _reset(self, loader, first_iter=False) -> None:
        if self._worker_pids_set:
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(self))
            self._worker_pids_set = False
        super()._reset(loader, first_iter)


def _share_temp_dir() -> None:
    """A worker makes a pymp-* folder in the temp folder the first time it sends a batch (the socket that hands the
    batch's shared memory over) and removes it at its exit: a worker killed (the OOM killer, a crash or hang in the
    decoder, a restart's SIGKILL) left it in the user's /tmp, one per worker killed. The loader's process makes its
    own before the workers start: multiprocessing hands it to them (every start method), and removes it at exit."""
    multiprocessing.util.get_temp_dir()


def _start_fork_server(ctx) -> None:
    """Under forkserver (Python 3.14's default) the workers' OS parent is the fork server, a child of the loader's
    process in its process group that keeps the default action of SIGTERM and SIGUSR1: a scheduler's notice to
    the group (_init_worker) killed it, the loader read every worker as dead (exit 255) and restarted them, inside
    the trainer's save budget and with a strike against each file in flight. Started here with both signals
    blocked, which it inherits (a blocked signal is never delivered); this thread unblocks them after, so a
    notice in between reaches the trainer then. Nothing to do when it runs already."""
    if ctx.get_start_method() != "forkserver":
        return
    import multiprocessing.forkserver

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGUSR1))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class _WatchedDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes are watched only by `next()` (_SynchronouslyWatchedIter)."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()  # as the base class: a warning when workers outnumber the cores
        _share_temp_dir()
        _start_fork_server(self.multiprocessing_context or multiprocessing.get_context())
        return _SynchronouslyWatchedIter(self)


# Each worker decodes on one core (one decoder thread); a few per core still pay where they wait on a slow file
# system, more only hold prefetched clips (an absurd data.workers forked until the machine stalled).
WORKERS_PER_CORE = 4


def _decoding_workers(asked: int, rank: int) -> int:
    """`asked` decoding workers, at most WORKERS_PER_CORE per core; said on rank 0 when it caps."""
    cores = usable_cores()
    cap = WORKERS_PER_CORE * cores
    if asked <= cap:
        return asked
    if rank == 0:
        echo(f"note: {asked} decoding workers asked (data.workers, --workers), {cores} core(s) here: {cap} decode "
             f"({WORKERS_PER_CORE} per core at most; the batches are the same)", file=sys.stderr)
    return cap


class VideoTextLoader:
    def __init__(self, samples: Sequence[Sample], *, num_frames: int, resolution: int, batch_size: int, train: bool,
                 seed: int, rank: int, world_size: int, tokenizer: Tokenizer | None, backend: str, device: torch.device,
                 num_workers: int, max_bad_share: float, drop_last: bool, flip_prob: float = TRAIN_FLIP_PROB,
                 decode_timeout: float = 120.0, source_rejects=(), source_name: str = ""):
        self.samples = samples if isinstance(samples, SampleList) else SampleList(samples)
        self.source_name = source_name  # the manifest or shards, for the bad-share error
        self.flip_prob = flip_prob
        self.num_frames, self.resolution, self.batch_size = num_frames, resolution, batch_size
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.tokenizer, self.device = tokenizer, device
        self.num_workers = _decoding_workers(num_workers, rank)
        self.max_bad_share, self.drop_last, self.decode_timeout = max_bad_share, drop_last, decode_timeout
        self.source_rejects = list(source_rejects)
        # Label fields of the whole source, so every batch has the same keys (-1 where a clip has none): per-batch
        # keys would misalign the batches of a consumer that concatenates them.
        self.int_label, self.label_names = self.samples.int_label, self.samples.label_names
        self._unreported = list(self.source_rejects)  # for drain_rejects(): a trainer reports each skip once
        self.epoch, self.position = 0, 0
        # Reads of this epoch by another number of ranks, before a resume that changed it: [world, [position
        # of each of its ranks]] per earlier layout; this epoch's order leaves their samples out.
        self.segments: list[list] = []
        self._budget = self._new_budget()
        self._committed = 0  # rejects of this epoch up to `position` (the ones a resume must not count twice)
        self._dali = None
        if backend == "auto":
            backend = "dali" if device.type == "cuda" and _dali_available() else "pyav"
        self.backend = backend

    # ---- order and transforms ------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample ids this rank reads in `epoch`, in order: rank r of w takes every w-th of the epoch's
        permutation from r on (the tail that would leave ranks unequal is dropped in training). In an epoch
        resumed on another number of ranks, the samples the earlier layouts read are left out first."""
        order = self._permutation(epoch)
        for world, positions in self.segments if epoch == self.epoch else []:
            layout = self._trimmed(order, world)
            read = np.concatenate([layout[r::world][:p] for r, p in enumerate(positions)])
            order = order[~np.isin(order, read)]
        return self._trimmed(order, self.world_size)[self.rank::self.world_size]

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.samples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.train else np.arange(n)

    def _trimmed(self, order: np.ndarray, world: int) -> np.ndarray:
        return order[: len(order) - len(order) % world] if self.train else order

    def augment(self, epoch: int, sample_id: int) -> Augment:
        if not self.train:
            return Augment()
        return Augment.draw(np.random.default_rng([self.seed, epoch, sample_id, 1]), flip_prob=self.flip_prob)

    def __len__(self) -> int:
        """Batches per epoch when no sample is bad."""
        n = len(self.epoch_order(self.epoch))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def rejects(self) -> list[tuple[str, str]]:
        """(name, reason) of every sample skipped in this epoch so far (manifest lines: `source_rejects`)."""
        return list(self._budget.rejects)

    def drain_rejects(self) -> list[tuple[str, str]]:
        """(name, reason) of the samples and manifest lines skipped since the last call (all epochs)."""
        out, self._unreported = self._unreported, []
        return out

    # ---- state -----------------------------------------------------------------------------------------------
    def _new_budget(self) -> BadSampleBudget:
        # The share is of this rank's whole epoch, also when the epoch is the rest of one begun on other ranks.
        total = len(self._trimmed(self._permutation(self.epoch), self.world_size)[self.rank::self.world_size])
        of = f"{self.source_name}, " if self.source_name else ""
        return BadSampleBudget(total=total, max_share=self.max_bad_share,
                               what=f"samples of {of}epoch {self.epoch} on rank {self.rank}",
                               clean=f"videoprism data index {self.source_name or 'MANIFEST'} --out CLEAN.jsonl "
                                     f"--min-frames {self.num_frames}")

    @property
    def _fingerprint(self) -> str:
        """Of the sample list the position indexes into: a resume over other data would silently repeat and drop
        samples (the epoch order is a permutation of the list)."""
        return self.samples.fingerprint

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "samples": self._fingerprint, "segments": self.segments,
                "rejects": [list(r) for r in self._budget.rejects[: self._committed]]}

    def _check_same_data(self, state: dict) -> None:
        if state.get("samples", self._fingerprint) != self._fingerprint:
            raise ValueError(f"the data position was saved over other samples ({shortened(str(state['samples']))}; now "
                             f"{self._fingerprint}, as count:hash): resume with the manifest or shards the run "
                             "started with (a re-indexed manifest is other data; start a new run for it); the "
                             "samples' absolute paths count too: data moved to another folder or mount resumes from "
                             "its old path (a symlink there to its new place)")
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed={shown(state['seed'])}, this loader has "
                             f"seed={self.seed}; resume with the same seed")

    def load_state_dict(self, state: dict) -> None:
        self._check_same_data(state)
        for key in ("world_size", "rank"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data state was saved with {key}={shown(state[key])}, this loader has "
                                 f"{key}={getattr(self, key)}; resume with the same {key} (or with "
                                 "load_resharded, given every rank's state)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.segments = state.get("segments", [])
        self._budget = self._new_budget()
        self._budget.load_state_dict({"rejects": state["rejects"]})
        self._committed = self._budget.bad

    def load_resharded(self, states: list[dict]) -> None:
        """Continue from the states of all ranks of a run with another number of ranks (`states[r]`: rank
        r's): the rest of their epoch, without the samples any of them read, is dealt anew over this run's
        ranks. Each sample of the epoch is read once; which rank reads it and the batches it lands in
        change (so losses are not those of an uninterrupted run). The skipped samples the old ranks counted
        in this epoch are dealt over the new ranks (old rank r's to new rank r mod world), so the epoch's
        bad-sample share is still of the whole epoch."""
        for r, state in enumerate(states):
            self._check_same_data(state)
            if (state["rank"], state["world_size"]) != (r, len(states)):
                raise ValueError(f"data state {r} of {len(states)} says rank {state['rank']} of "
                                 f"{state['world_size']}: the checkpoint's rank files do not belong together")
        epochs = sorted({int(s["epoch"]) for s in states})
        if len(epochs) > 1:
            raise ValueError(f"the {len(states)} ranks of the checkpoint were in different epochs ({epochs}): "
                             f"its data position cannot move to {self.world_size} ranks; resume with "
                             f"{len(states)} processes (or from another checkpoint)")
        self.epoch, self.position = epochs[0], 0
        self.segments = [*states[0].get("segments", []), [len(states), [int(s["position"]) for s in states]]]
        self._budget = self._new_budget()
        self._budget.load_state_dict({"rejects": [r for old, state in enumerate(states)
                                                  if old % self.world_size == self.rank for r in state["rejects"]]})
        self._committed = self._budget.bad

    # ---- iteration -------------------------------------------------------------------------------------------
    def __iter__(self):
        order = self.epoch_order(self.epoch)
        items = self._pyav_items(order) if self.backend == "pyav" else self._dali_items(order)
        pending: list[_Item] = []
        for item in items:
            if item.bad is not None:
                self._unreported.append((self.samples[item.sample_id].name, item.bad))
                self._budget.skip(self.samples[item.sample_id].name, item.bad)
                continue
            pending.append(item)
            if len(pending) == self.batch_size:
                self.position, self._committed = item.pos + 1, self._budget.bad
                yield self._collate(pending)
                pending = []
        if pending and not self.drop_last:
            self.position, self._committed = len(order), self._budget.bad
            yield self._collate(pending)
        self.end_epoch()

    def end_epoch(self) -> None:
        """Go on to the next epoch, the rest of this one left unread: where an iteration runs out, and where a
        trainer's other ranks ran out of their shares first (train.data.ManifestData keeps the ranks in one epoch).
        An iteration begun before is done with: the next `iter()` starts the new epoch."""
        self.epoch, self.position, self.segments = self.epoch + 1, 0, []
        self._budget, self._committed = self._new_budget(), 0

    def _pyav_items(self, order: np.ndarray):
        """The items from `position` on. A file whose decode kills its worker process (a libav segfault) or
        hangs past `decode_timeout` would end or stall a plain DataLoader's run: here the workers restart at
        the first item not yet delivered, so the items come exactly as in a run without that file. A
        worker can also die of its environment (the OOM killer, a full /dev/shm) while decoding a good
        file: so a file is skipped as a bad sample only when its decode kills a worker a second time."""
        # One decoder thread per worker: the workers already fill the cores.
        threads = 1 if self.num_workers > 0 else 0
        faulty: dict[int, str] = {}  # position -> reason: skipped without decoding
        suspects: set[int] = set()  # positions whose decode a worker died in once
        start, fruitless = self.position, 0  # restarts in a row that delivered no item and blamed no file
        while True:
            # No more workers than items left: each takes whole items, so the others would start with nothing.
            workers = min(self.num_workers, max(1, len(order) - start)) if self.num_workers else 0
            in_flight = _InFlight(workers) if workers else None
            dl = _WatchedDataLoader(_PyAVItems(self, order, self.epoch, threads, in_flight, faulty),
                                    sampler=range(start, len(order)), batch_size=None,
                                    collate_fn=_identity, num_workers=workers,
                                    worker_init_fn=_init_worker,
                                    prefetch_factor=4 if workers > 0 else None)
            it = None
            while True:
                try:
                    if it is None:
                        it = iter(dl)
                        _LIVE_ITERATORS.add(it)
                    item = next(it)
                except StopIteration:
                    return
                except Exception as e:  # a worker died: RuntimeError, or a closed pipe while fetching its item
                    faults = in_flight.faults(it, self.decode_timeout) if in_flight else []
                    if not faults:
                        raise  # an error of the decoding code itself, re-raised from its worker
                    error = str(e)  # not `e`: its traceback holds the iterator, whose end stops the workers
                    break
                if item.no_shm is not None:
                    raise OSError(errno.ENOSPC, f"/dev/shm is full ({item.no_shm}): the data loader's workers pass "
                                  "clips through it; give it more room (docker run --shm-size=2g) or decode in "
                                  "the main process (data.workers=0, --workers 0)")
                start, fruitless = item.pos + 1, 0
                yield item
            it._shutdown_workers()  # the surviving workers, before new ones start: here, not in `del`'s __del__,
            del it                  # where a Ctrl-C is lost
            blamed = {pos: why for pos, why in faults if pos in suspects}
            faulty.update(blamed)
            suspects.update(pos for pos, _ in faults if pos is not None)
            fruitless = 0 if blamed else fruitless + 1
            how = "; ".join(f"{'between files' if pos is None else self.samples[int(order[pos])].name}: {why}"
                            for pos, why in faults)
            echo(f"warning: a data loader worker died ({how}); the workers restart at position {start} of epoch "
                 f"{self.epoch} (a file is skipped when its decode kills a worker twice)", file=sys.stderr)
            if fruitless >= 3:
                raise RuntimeError(
                    f"data loader workers died {fruitless} times in a row with no item delivered in between (last: "
                    f"{how}; {error}): out of memory or /dev/shm full? Lower data.workers or the batch size")

    def _dali_items(self, order: np.ndarray):
        from .dali_pipeline import DaliClips

        if self._dali is None:
            self._dali = DaliClips(batch_size=self.batch_size, num_frames=self.num_frames,
                                   resolution=self.resolution, device=self.device,
                                   num_threads=max(1, self.num_workers or usable_cores()))
        fallback = _PyAVItems(self, order, self.epoch, threads=0)
        for lo in range(self.position, len(order), self.batch_size):
            chunk = list(range(lo, min(lo + self.batch_size, len(order))))
            yield from self._dali.decode_items(
                [(pos, int(order[pos]), self.samples[int(order[pos])], self.augment(self.epoch, int(order[pos])))
                 for pos in chunk], fallback)

    def _collate(self, items: list[_Item]) -> dict:
        samples = [self.samples[i.sample_id] for i in items]
        captions = [s.caption for s in samples]
        # DALI's GPU clips are on the device; PyAV's (and DALI's fallbacks) stay on the host for the trainer's
        # copy (to_device): a pageable .to(cuda) here would wait for the queued training step.
        dev = next((i.video.device for i in items if i.video.device.type != "cpu"), None)
        video = torch.stack([i.video if dev is None else to_device(i.video, dev) for i in items])
        batch = {"video": video, "caption": captions,
                 "path": [s.name for s in samples], "dataset": [s.dataset for s in samples],
                 "index": torch.tensor([i.sample_id for i in items], dtype=torch.int64)}
        if self.tokenizer is not None:
            batch["text_ids"], batch["text_paddings"] = self.tokenizer(captions)
        if self.int_label:
            batch["label"] = torch.tensor([s.label if isinstance(s.label, int) else -1 for s in samples])
        for k in self.label_names:
            batch[f"label_{k}"] = torch.tensor([s.label.get(k, -1) if isinstance(s.label, dict) else -1
                                                for s in samples])
        return batch


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(source, *, num_frames: int, resolution: int, batch_size: int, train: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, tokenizer: Tokenizer | str | None, backend: str = "auto",
                 device: torch.device | str = "cpu", num_workers: int = 0, max_bad_share: float = 0.01,
                 drop_last: bool | None = None, flip_prob: float = TRAIN_FLIP_PROB,
                 decode_timeout: float = 120.0) -> VideoTextLoader:
    """A `VideoTextLoader` over a .jsonl manifest or a list of WebDataset .tar shards (see the module docstring).

    `drop_last` defaults to `train`. `flip_prob`: share of training clips mirrored horizontally (0 by default: a
    mirror contradicts captions that say left or right). `tokenizer=None`: batches without text (stage 2, features
    for a probe), which also read video-only lines (no caption; `batch["caption"]` None for them). Bad manifest
    lines count against `max_bad_share` of the lines when reading.
    `decode_timeout`: seconds one clip may take in a worker before the worker is killed and the file skipped (a
    hung decoder; 0 = no limit; only with `num_workers` > 0: the main process cannot interrupt its own decode).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "dali" and not _dali_available():
        raise ImportError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or the `dali` extra), "
                          "or use backend='pyav'")
    for name, value, lo in (("num_frames", num_frames, 1), ("resolution", resolution, 1),
                            ("batch_size", batch_size, 1), ("world_size", world_size, 1), ("num_workers", num_workers, 0)):
        if not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
    if not isinstance(decode_timeout, (int, float)) or decode_timeout < 0:
        raise ValueError(f"decode_timeout must be seconds >= 0 (0 = no limit), got {decode_timeout!r}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer(tokenizer)
    # Video-only lines (no caption) are samples unless the batches carry text.
    samples, rejects = read_source(source, max_bad_share=max_bad_share, captions=tokenizer is not None)
    if train and len(samples) < world_size:  # an evaluation's share may be empty; a training epoch's may not
        raise ValueError(f"{len(samples)} samples cannot be sharded over world_size={world_size} ranks")
    return VideoTextLoader(samples, num_frames=num_frames, resolution=resolution, batch_size=batch_size, train=train,
                           seed=seed, rank=rank, world_size=world_size, tokenizer=tokenizer, backend=backend,
                           device=torch.device(device), num_workers=num_workers, max_bad_share=max_bad_share,
                           drop_last=train if drop_last is None else drop_last, flip_prob=flip_prob,
                           decode_timeout=float(decode_timeout), source_rejects=rejects,
                           source_name=_source_name(source))


def _source_name(source) -> str:
    """A manifest path or shard paths as the user can type them again (quoted for the shell where needed)."""
    import shlex

    if isinstance(source, (str, os.PathLike)):
        return shlex.quote(os.fspath(source))
    return " ".join(shlex.quote(os.fspath(s)) for s in source)
