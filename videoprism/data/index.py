"""`videoprism data index`: probe every file of a dataset once, write a clean manifest and a rejects report.

Each sample is opened with PyAV in a pool of processes (a file that crashes its process is pinned down and
rejected, the others keep their results): packet index (codec, frame count, fps, stored size, duration, whether
the frame rate is constant), a decode of its first frame (its display rotation and colour matrix; converted to
RGB) and of its whole last GOP (every frame with `full=True`), and the frame count of its window against
`min_frames`. Good samples go to the clean manifest with the probe fields added (the loader then knows codec, size,
frame count, rotation and colour matrix without opening the file, and DALI never meets a file it cannot decode);
bad ones go to the rejects report, one JSON line each with the path and the reason, after the manifest lines that
could not be parsed. Each result is journaled as it comes (journal.py): the same command, run again after an
interruption, probes only the files not done and writes the same clean manifest and report.
"""
from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .decode import PyAVClip
from .errors import BadVideoError, NoUsableSamplesError
from ..paths import atomic_file, check_not_an_input, check_out_file, echo, finite_or_null
from ..preemption import Preempted, stopped_line, stopping
from .cores import usable_cores
from .journal import Journal, file_stamp, journal_key, journal_path
from .loader import die_with_parent, signals_deferred
from .manifest import Sample, SampleList, read_source
from .pack import check_name_room, write_pack


def probe(sample: Sample, *, min_frames: int = 1, full: bool = False) -> dict:
    """Probe fields of a good sample; raises `BadVideoError` for a bad one."""
    try:
        with PyAVClip(sample.source(), name=sample.name, threads=1) as clip:
            idx = clip.index
            window = idx.window(sample.start, sample.end)
            if len(window) < min_frames:
                # A window names itself: the report's path is the whole file, which may have frames enough.
                where = "" if sample.start is None and sample.end is None else (
                    f" in the window [{sample.start or 0.0}, {'end' if sample.end is None else sample.end}) s "
                    f"(the file has {idx.num_frames})")
                raise BadVideoError(sample.name, f"too few frames: {len(window)}{where}, need {min_frames}")
            clip.verify(full=full)
            rotation, matrix = clip.rotation, clip.matrix
    except OSError as e:
        raise BadVideoError(sample.name, f"unreadable ({e.strerror or e})") from None
    # fps whole: the frame plan (dali_pipeline.clip_plan) puts frame i at i / fps, and a rounded rate (NTSC's
    # 29.97003) moves a window's frames by one within a minute.
    return {"codec": idx.codec, "frames": idx.num_frames, "fps": idx.fps, "width": idx.width,
            "height": idx.height, "duration": round(idx.duration, 6), "cfr": idx.constant_rate, "rotation": rotation,
            "matrix": matrix}


# Per job, set by the worker that starts it (shared memory): which files were being probed when a pool broke.
_STARTED = None


def _init_worker(started) -> None:
    """Ctrl-C and SLURM's SIGUSR1 go to the whole process group, and are the parent's to act on (it kills its
    workers, worker_pool): a worker the signal ended first broke the pool as a decoder crash does. SIGTERM ends a
    worker: a broken pool ends its other workers by SIGTERM and, from Python 3.12, holds the lock `submit` takes until
    they are gone (ignored, or the parent's handler inherited through fork, `data index` hung at the first file that
    crashed its worker). A worker a group's SIGTERM ends first is harmless: its files are probed again alone, or
    not at all as the parent stops (the same signal). A parent killed outright takes its workers with it (they
    outlived it: still there 30 s on)."""
    global _STARTED
    _STARTED = started
    for s in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])  # submit blocked it: one sent since ends us here
    die_with_parent()


def submit(pool: ProcessPoolExecutor, fn, *args):
    """pool.submit, which forks the workers, with SIGTERM blocked for the fork: a worker SIGTERMed before
    _init_worker ran the parent's handler, whose exception Python drops when it lands in an after-fork callback
    (threading's); the worker then lived on, SIGTERM ignored, and Python 3.12's broken pool waited for it forever
    (2 of 3 runs of 400 pools with a crash under Python 3.12.1). Blocked, the signal waits for _init_worker. In the
    parent the mask is this thread's only (the signal may come to another thread, its handler then run here, in such
    a callback): the handlers are held back too (signals_deferred)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    try:
        with signals_deferred():
            return pool.submit(fn, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _probe_job(args) -> tuple[tuple[dict | None, str | None], list[int] | None]:
    """((fields, reason), stamp) of a job: the stamp of its file taken before the probe opens it, so that a file
    replaced while it is probed has another one at the next run (journal.py)."""
    i, sample, min_frames, full = args
    if _STARTED is not None:
        _STARTED[i] = 1
    stamp = file_stamp(sample.path)
    try:
        return (probe(sample, min_frames=min_frames, full=full), None), stamp
    except BadVideoError as e:
        return (None, e.reason), stamp


def _probe_all(jobs: list, todo: list[int], workers: int, record) -> None:
    """Probe the jobs `todo` in worker processes, handing each result to `record(i, ((fields, reason), stamp))` as
    it comes (_probe_job). A file that kills its worker (a decoder crash, the OOM killer) breaks the whole pool: the
    jobs that had started are then probed again one at a time, each in a fresh process, which pins the crash on its
    file (rejected, with the reason) and keeps the others' results; the jobs not yet started go to a new pool."""
    while todo:
        started = multiprocessing.RawArray("b", len(jobs))
        done = _pool_round(todo, jobs, min(workers, len(todo)), started, record)
        suspects = [i for i in todo if i not in done and started[i]]
        if not done and not suspects:
            raise OSError("data index: the probe processes died before they started on any file, so the cause is "
                          "not a file: check memory and that PyAV imports (python -c 'import av')")
        for i in suspects:
            record(i, _probe_alone(i, jobs[i]))
        todo = [i for i in todo if i not in done and not started[i]]


def _pool_round(todo: list[int], jobs: list, workers: int, started, record) -> set[int]:
    """One pool over `todo` until it finishes or breaks; returns the jobs it finished. At most
    4 jobs a worker are in flight (a million-file manifest is not a million futures)."""
    done: set[int] = set()
    queue = collections.deque(todo)
    inflight: dict = {}
    with worker_pool(workers, started) as pool:
        try:
            while queue or inflight:
                while queue and len(inflight) < 4 * workers:
                    i = queue.popleft()
                    inflight[submit(pool, _probe_job, (i, *jobs[i]))] = i
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                broken = False
                for f in finished:
                    i = inflight.pop(f)
                    if isinstance(f.exception(), BrokenProcessPool):
                        broken = True
                        continue
                    record(i, f.result())  # an error of the probe itself (a bug) is raised here
                    done.add(i)
                if broken:
                    break
        except BrokenProcessPool:
            pass  # from submit(): a worker died meanwhile
    return done


def _probe_alone(i: int, job) -> tuple[tuple[dict | None, str | None], list[int] | None]:
    stamp = file_stamp(job[0].path)  # before the probe, as _probe_job's
    with worker_pool(1) as pool:
        try:
            return submit(pool, _probe_job, (i, *job)).result()
        except BrokenProcessPool:
            return (None, "the decoder crashed on it (its process died while probing the file)"), stamp


@contextlib.contextmanager
def worker_pool(workers: int, started=None):
    """A pool of probe processes, killed on an interrupt rather than waited for (up to 4 queued files a worker,
    minutes with --full): their files are not journaled, the next run probes them."""
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(started,))
    try:
        yield pool
    except BaseException:
        for p in list((pool._processes or {}).values()):  # private, but public (kill_workers) only from Python 3.14
            p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def index_dataset(source, out: str, *, rejects_path: str | None = None, workers: int | None = None,
                  min_frames: int = 1, full: bool = False, captions: bool = False, progress: bool = False) -> dict:
    """Write the clean manifest `out` and the rejects report; returns counts {"total", "kept", "rejected",
    "video_only"}. Video-only lines (no caption) are kept unless `captions` (then rejected, as stage 1 does): a
    decodable file is clean whatever a stage needs of it (stage 1 skips them as bad samples; stage 2 and probes use
    them); "video_only" counts the kept ones."""
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    try:
        samples, line_rejects = read_source(source, max_bad_share=1.0, captions=captions)
    except NoUsableSamplesError as e:  # still worth a report: it says why every line was refused
        if not e.rejects:  # an empty manifest: nothing to report, and an earlier --out stays as it was
            raise
        samples, line_rejects = SampleList(), e.rejects
    rejects_path = rejects_path or os.path.splitext(out)[0] + ".rejects.jsonl"
    sources = [source] if isinstance(source, str) else list(source)
    for option, path in (("--out", out), ("--rejects", rejects_path)):
        check_out_file(path, f"{option} {path}", "a .jsonl file path")
        if option == "--out" and not out.endswith(".jsonl"):  # a clean.tar would read back as a shard
            raise ValueError(f"--out {out}: the clean manifest must end in .jsonl")
        # Each would be read after it was written over (the manifest), or hold the other's lines.
        check_not_an_input(path, f"{option} {path}", [("source", s) for s in sources])
    check_name_room(out, f"--out {out}")
    if os.path.realpath(rejects_path) == os.path.realpath(out):
        raise ValueError(f"--rejects {rejects_path} is --out: the report and the clean manifest need a file each")
    jobs = [(s, min_frames, full) for s in samples]
    key = journal_key(sources, samples, min_frames=min_frames, full=full, captions=captions)
    journal = Journal(journal_path(out), key, [sample.path for sample, *_ in jobs])
    try:
        # A scheduler's notice (SIGTERM, SLURM's SIGUSR1) stops it as Ctrl-C does, with a line, not silently.
        with stopping(True, lambda signum: Preempted(signum, None, None)):
            _probe_rest(jobs, journal, workers or usable_cores(), progress)
            counts = _write(out, rejects_path, samples, journal.results, line_rejects)
            # The clean manifest is what a run reads on every rank: packed (pack.py), so that costs nothing at
            # startup. An empty one has nothing to pack; an older pack of `out` no longer matches it and is ignored.
            packed = write_pack(out, progress=progress)["pack"] if counts["kept"] else None  # its read: minutes at 10M+
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_kept(journal, len(jobs))) from None
    except Preempted as stop:
        echo(stopped_line(stop.signum, _kept(journal, len(jobs))), file=sys.stderr, flush=True)
        raise
    finally:
        journal.close()
    journal.remove()
    return {**counts, "out": out, "rejects": rejects_path, "pack": packed}


def _probe_rest(jobs: list, journal: Journal, workers: int, progress: bool) -> None:
    """Probe the jobs the journal holds no result of, journaling each result as it comes."""
    with _progress(len(jobs), progress, journal.done) as bar:
        def record(i: int, done: tuple[tuple[dict | None, str | None], list[int] | None]) -> None:
            journal.record(i, *done)
            bar.update(1)

        _probe_all(jobs, journal.todo(), workers, record)


def _kept(journal: Journal, total: int) -> str:
    return f"{journal.done} of {total} files probed, kept in {journal.path}: the same command goes on from there"


def _write(out: str, rejects_path: str, samples, results: list, line_rejects: list) -> dict:
    """The clean manifest (paths relative to its folder) and the rejects report; returns the counts."""
    base = os.path.dirname(os.path.abspath(out))
    kept = video_only = 0
    # Both whole or not at all (a full disk left a cut report under its name, and out.tmp behind); the report
    # replaced first, the clean manifest last. Until the pack is written the journal stays: the same command goes on.
    with atomic_file(out, "w") as fo, atomic_file(rejects_path, "w") as fr:
        for where, reason in line_rejects:
            fr.write(json.dumps({"path": where, "reason": reason}) + "\n")
        for sample, (fields, reason) in zip(samples, results):
            if reason is not None:
                fr.write(json.dumps({"path": sample.name, "reason": reason}) + "\n")
                continue
            rec = sample.to_record(base)
            rec.update(fields)
            # A field the source held as NaN (Python's json reads and writes it) is null: the clean manifest is JSON.
            fo.write(json.dumps(finite_or_null(rec), allow_nan=False) + "\n")
            kept += 1
            video_only += sample.caption is None
    total = len(samples) + len(line_rejects)
    return {"total": total, "kept": kept, "rejected": total - kept, "video_only": video_only}


def _progress(total: int, show: bool, done: int):
    from ..progress import progress_bar

    return progress_bar(total=total, initial=done, unit="file", desc="index", disable=not show)
