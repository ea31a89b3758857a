"""The journal of `videoprism data index`: every file's probe result appended as it comes, so that a run cut short
(Ctrl-C, SIGTERM, SIGKILL, a preempted node, the OOM killer) loses only the files being probed, and the same command
goes on from there: an index of millions of files takes hours.

`OUT.journal`, beside the clean manifest OUT, is JSON lines:
    {"journal": "videoprism data index", "version": 2, "key": {...}}    what its results are of
    [i, fields, reason, stamp]    the result of sample i: its probe fields and null, or null and why it is bad;
                                  the stamp of its file (`file_stamp`) before it was probed
Each line is handed to the OS as its result comes (a killed process loses none of them) and fsynced every few seconds
(what a machine crash may lose). The key names the input (each source: a manifest's SHA-256, ~0.2 s per million lines;
a shard's size, inode and times, as pack.py stamps a manifest, since hashing a shard set reads the whole dataset;
and the fingerprint of the samples read from them) and what changes a result (--min-frames, --full,
--require-captions; the PyAV version): a journal of another key is ignored, with a note, and started over. The key
does not name the files a manifest lists (a stat of each at every start): a result whose file has another stamp
now (replaced under the same path, written over, deleted) is dropped, with a note, and its file probed again; the
other results are kept. A last line cut by a kill mid-write is dropped (its file is probed again). The index
removes the journal once the clean manifest is written and packed.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import av

from ..paths import LONGEST_PATH, echo, json_loads, shortened, shown
from .manifest import is_shard
from .pack import _FILE, _stamp, content_hash

MAGIC = "videoprism data index"
VERSION = 2  # bump when probe() returns other fields or rejects otherwise: an older journal is then started over
_SYNC_S = 5.0  # fsync at most this often: a network file system may take a while to answer each
_STAT_THREADS = 32  # stats of the journaled files at once: each waits on a network file system's round trip
_STAT_BATCH = 64  # files a thread stats per task: a task per file cost 7x the stats themselves on a local disk
_STAT_CHUNK = 4096  # results checked at a time (a million-file journal is not a million futures)


def journal_path(out: str) -> str:
    return out + ".journal"


def journal_key(sources: list[str], samples, *, min_frames: int, full: bool, captions: bool) -> dict:
    """What the results of `data index` over `samples` read from `sources` with these options are of."""
    return {"options": {"--min-frames": min_frames, "--full": full, "--require-captions": captions},
            "sources": [_identity(s) for s in sources], "samples": samples.fingerprint, "pyav": av.__version__}


def file_stamp(path: str) -> list[int] | None:
    """The version of the file at `path` (a sample's file, or its shard) that a result is of: its size, times and
    inode (pack.py's stamp of a manifest, in _FILE's order). Size and modification time, as make and rsync compare,
    miss a file of the same size copied over it with its time (`cp -p`, `rsync -t`, a tar extract); a file moved
    into its place has another inode. None: it cannot be stat'ed (missing; its probe says why)."""
    try:
        stamp = _stamp(path)
    except OSError:
        return None
    return [stamp[k] for k in _FILE]


def _file_stamps(paths: list[str]) -> list[list[int] | None]:
    return [file_stamp(p) for p in paths]


def _identity(source: str) -> dict:
    path = os.path.abspath(source)
    if is_shard(path):  # any write changes its size or times, a file put in its place its inode
        stamp = _stamp(path)
        return {"shard": path, **{k: stamp[k] for k in _FILE}}
    return {"manifest": path, "sha256": content_hash(path)}


class Journal:
    """The results of an index so far (`results[i]`: sample i's (fields, reason), None while not probed), read from
    the journal at `path` when it is of `key` and of the files now at `files` (`files[i]`: sample i's file, or its
    shard); `record` adds one. Held locked: two commands writing one --out would each take the other's lines for
    their own."""

    def __init__(self, path: str, key: dict, files: Sequence[str]):
        self.path, self.results, self.done = path, [None] * len(files), 0
        self._fh = _open_locked(path)
        self._synced = time.monotonic()
        try:
            self._load(key, files)
        except BaseException:
            self._fh.close()
            raise

    def todo(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r is None]

    def record(self, i: int, result: tuple[dict | None, str | None], stamp: list[int] | None) -> None:
        """Sample i's (fields, reason), of its file as `stamp` (file_stamp, taken before the probe opened it)."""
        self.results[i] = result
        self.done += 1
        self._write(json.dumps([i, *result, stamp]) + "\n")

    def close(self) -> None:
        """Synced and closed, without an error of its own: a write that failed (a full disk) has raised one."""
        if self._fh.closed:
            return
        with contextlib.suppress(OSError):
            self._sync()
        with contextlib.suppress(OSError):
            self._fh.close()  # closed even when it fails to write what its buffer held

    def remove(self) -> None:
        self.close()
        os.remove(self.path)

    def _load(self, key: dict, files: Sequence[str]) -> None:
        fh = self._fh
        fh.seek(0)
        first = fh.readline()
        # Without a whole first line: a new journal, or one killed while its header was written (nothing to say).
        why = _why_ignored(first, key) if first.endswith(b"\n") else ""
        if why:
            echo(f"note: {self.path} ignored ({why}): every file is probed again", file=sys.stderr)
        if why is not None:
            self._start(key)
            return
        kept, damaged, stamps = len(first), 0, [None] * len(self.results)  # of each result's file, as it was probed
        for line in fh:
            if not line.endswith(b"\n"):  # cut by a kill mid-write: dropped, and its file probed again
                break
            entry = _entry(line, len(self.results))
            if entry is None:
                damaged += 1
            else:
                i, result, stamp = entry
                self.results[i], stamps[i] = result, stamp
            kept += len(line)
        fh.truncate(kept)  # the next line starts on a line of its own
        changed = self._drop_changed(files, stamps)
        self.done = sum(r is not None for r in self.results)
        echo(f"note: {self.path}: {self.done} of {len(self.results)} files probed by an earlier run of this command "
             "are taken from it" + (f" ({damaged} damaged line(s) skipped)" if damaged else "")
             + (f"; {changed} changed since (replaced, written over or deleted): probed again" if changed else ""),
             file=sys.stderr)

    def _drop_changed(self, files: Sequence[str], stamps: list) -> int:
        """Drops the results whose file now has another stamp than when it was probed (`stamps`); returns their
        count. The files are stat'ed by threads (millions on a network file system, one at a time, took as long as
        probing them), each path once a chunk (a shard's members share one)."""
        done, changed = [i for i, r in enumerate(self.results) if r is not None], 0
        with ThreadPoolExecutor(_STAT_THREADS) as pool:
            for start in range(0, len(done), _STAT_CHUNK):
                chunk = done[start:start + _STAT_CHUNK]
                paths = list(dict.fromkeys(files[i] for i in chunk))
                batches = [paths[k:k + _STAT_BATCH] for k in range(0, len(paths), _STAT_BATCH)]
                now = dict(zip(paths, itertools.chain.from_iterable(pool.map(_file_stamps, batches))))
                for i in chunk:
                    if now[files[i]] != stamps[i]:
                        self.results[i] = None
                        changed += 1
        return changed

    def _start(self, key: dict) -> None:
        self._fh.truncate(0)
        self._write(json.dumps({"journal": MAGIC, "version": VERSION, "key": key}) + "\n")
        self._sync()

    def _write(self, line: str) -> None:
        try:
            self._fh.write(line.encode())  # ASCII: json.dumps escapes the rest
            self._fh.flush()
            if time.monotonic() - self._synced > _SYNC_S:
                self._sync()
        except OSError as e:
            raise OSError(f"cannot write {self.path} ({e.strerror}), the journal of the results so far (a run "
                          "cut short goes on from it): make room beside --out, then run the same command") from None

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._synced = time.monotonic()


def _open_locked(path: str):
    try:
        fh = open(path, "a+b")  # appended at its end, wherever it was read or truncated
    except OSError as e:
        raise OSError(f"cannot write {path} ({e.strerror}), the journal of the index beside --out") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ValueError(f"{path} is held by another `videoprism data index` writing the same --out: let it "
                         "finish, or give another --out") from None
    except OSError:  # a file system without locks: unguarded, as the clean manifest itself is
        pass
    return fh


def _why_ignored(first: bytes, key: dict) -> str | None:
    """Why a journal whose first line is `first` does not hold results of `key` (None: it does)."""
    try:
        header = json_loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("journal") != MAGIC:
        return "not a journal of `videoprism data index`"
    if header.get("version") != VERSION:
        return f"of journal version {shown(header.get('version'))}, this videoprism writes {VERSION}"
    old = header.get("key")
    if old == key:
        return None
    if not isinstance(old, dict):
        return "its header is damaged"
    if old.get("options") != key["options"]:
        return f"written with {shortened(_flags(old.get('options')), 200)}, this run has {_flags(key['options'])}"
    was, now = old.get("sources"), key["sources"]
    if not isinstance(was, list) or [_named(s) for s in was] != [_named(s) for s in now]:
        # As the sources given are cut (data/cli.py): a path prints whole up to LONGEST_PATH.
        return "written for " + (shortened(" ".join(str(_named(s)) for s in was), LONGEST_PATH) if isinstance(was, list)
                                 else "other sources")
    changed = [_named(n) for w, n in zip(was, now) if w != n]
    if changed:
        return f"{changed[0]} changed since it was written"
    if old.get("pyav") != key["pyav"]:
        return f"written with PyAV {shortened(str(old.get('pyav')))}, this run has {key['pyav']}"
    return "the samples read from the same sources differ"


def _named(source) -> str | None:
    return source.get("manifest", source.get("shard")) if isinstance(source, dict) else None


def _flags(options) -> str:
    if not isinstance(options, dict):
        return "unknown options"
    return " ".join(flag if value is True else f"{flag} {value}" for flag, value in options.items()
                    if value is not False) or "no options"


def _entry(line: bytes, count: int):
    """(i, (fields, reason), stamp) of a journal line; None for a damaged one."""
    try:
        i, fields, reason, stamp = json_loads(line)
    except (ValueError, TypeError):
        return None
    good = (type(i) is int and 0 <= i < count
            and (isinstance(fields, dict) and reason is None or fields is None and isinstance(reason, str))
            and (stamp is None or isinstance(stamp, list) and len(stamp) == len(_FILE)
                 and all(type(v) is int for v in stamp)))
    return (i, (fields, reason), stamp) if good else None
