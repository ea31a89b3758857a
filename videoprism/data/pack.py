"""A manifest's samples packed into one file beside it (`MANIFEST.pack`), mapped into memory by every reader.

Every rank reads the whole manifest (the loader shards each epoch's order, so a run resumes on another number of
ranks). Parsing and validating JSON costs ~12 s and ~0.16 GB per million lines in every rank (bench/manifest.py): at 36M clips,
minutes of startup and ~6 GB per rank, 8 copies per node. A pack holds what that parse produces (SampleList's
two buffers, its label fields and fingerprint, the rejected lines), written once by `videoprism data pack` or
`data index`; a reader maps it read-only, so startup is a header read and the ranks (and their DataLoader workers,
forked or spawned) of a node share one copy in the page cache.

Layout (integers in the writing machine's byte order, which the header names):
    MAGIC (8 bytes) | header length n (uint64) | header: n bytes of JSON | zero padding to a multiple of 8
    | ends: int64 [count] (end offset of each record in data) | data: the pickled records, back to back
A pack is used only while it matches its manifest (size, modification time, folder: paths are resolved against
it when packed); any other pack is ignored with a note, and the manifest is read as JSON.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import secrets
import struct
import sys
import time

MAGIC = b"VPPACK\x00\x01"
VERSION = 2  # bump when the record layout or the validation of a line changes: a pack holds the result of both
# 2: a rejected line is kept as its line number (1 kept the manifest's name as the packing command gave it)


def pack_path(manifest: str) -> str:
    return manifest + ".pack"


def _stamp(manifest: str) -> dict:
    """What a pack must match: a manifest edited, replaced or moved (relative paths resolve elsewhere) since."""
    st = os.stat(manifest)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "folder": os.path.dirname(os.path.abspath(manifest))}


def write_pack(manifest: str, *, progress: bool = False) -> dict:
    """Read `manifest` as JSON and write `MANIFEST.pack` atomically; returns {"pack", "samples", "rejected"}.
    Every line is kept or recorded as rejected (a reader applies its own max_bad_share)."""
    from .manifest import check_manifest, read_manifest

    check_manifest(manifest)  # its message, not the stat's bare "[Errno 2]"
    stamp = _stamp(manifest)  # before reading: an edit during the read leaves a pack that no reader takes
    samples, rejects = read_manifest(manifest, max_bad_share=1.0, use_pack=False, progress=progress)
    # A reject is `FILE:LINE` with FILE as the reader names the manifest (a relative name here is another file in
    # a run elsewhere): the line number is kept, the name is the reader's (read_pack).
    lines = [[int(where.rpartition(":")[2]), reason] for where, reason in rejects]
    header = json.dumps({
        "version": VERSION, "byteorder": sys.byteorder, "manifest": stamp, "count": len(samples),
        "lines": len(samples) + len(rejects), "int_label": samples.int_label, "label_names": samples.label_names,
        "fingerprint": samples.fingerprint, "rejects": lines}).encode()
    data, ends = samples.buffers()
    path = pack_path(manifest)
    # A name of its own: `data pack` on every node of a job (containers: one pid for all) wrote into one file. Its
    # pid space and pid tell a later pack whether its writer is gone (_remove_stale).
    space = _pid_space()
    tmp = f"{path}.{space}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    stale = _remove_stale(path, space)
    if stale:
        print(f"note: removed {len(stale)} unfinished pack file(s) of {manifest} whose writer is gone (a `data pack` "
              f"or `data index` killed while writing): {', '.join(stale)}", file=sys.stderr)
    try:
        with open(tmp, "xb") as fh:
            fh.write(MAGIC + struct.pack("<Q", len(header)) + header)
            fh.write(b"\0" * (-fh.tell() % 8))
            fh.write(ends.tobytes())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # a reader sees the old pack or the new one, never half of one
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"cannot write {path} ({e.strerror}); the pack is written beside its manifest: copy the "
                      "manifest and its videos to a folder you can write, or go on without a pack") from None
    return {"pack": path, "samples": len(samples), "rejected": len(rejects)}


# A writer writes its file from start to end in minutes (seconds per million clips): one untouched for a day has
# no writer left, wherever that ran.
_STALE_SECONDS = 24 * 3600


def _remove_stale(path: str, here: str) -> list[str]:
    """Remove the tmp files of the pack `path` whose writers are provably gone, and return their names: a writer in
    this pid space (`here`, _pid_space) whose process is not running (killed), or any untouched for _STALE_SECONDS
    (another machine's or container's, whose pid means nothing here; or of a version that named no pid space). A
    live writer's is kept."""
    folder, name = os.path.split(path)
    # As write_pack names them: [pid space.]pid.token.tmp (no pid space: an older version's)
    named = re.compile(re.escape(name) + r"\.(?:([0-9a-f]{12})\.)?(\d{1,9})\.[0-9a-f]{16}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(folder or "."))
    except OSError:  # a folder this process may write but not list: nothing to tell apart, and no reason to fail
        return []
    for entry in entries:
        m = named.fullmatch(entry.name)
        if m is None:
            continue
        try:
            killed = m[1] == here and not _running(int(m[2]))
            if killed or time.time() - entry.stat().st_mtime > _STALE_SECONDS:
                os.remove(entry.path)
                removed.append(os.path.join(folder, entry.name))
        except OSError:  # gone already (renamed into place by its writer, removed by another pack), or another
            pass         # user's in a sticky folder: left, the pack is written all the same
    return removed


def _pid_space() -> str:
    """12 hex digits naming this machine's boot and pid namespace: a writer's pid can be looked up only by a process
    that shares both (a container may have a namespace of its own, another node has another boot). Without /proc
    (not Linux), a random value, shared with no other process: such files are removed by age only."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            space = f"{fh.read().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return secrets.token_hex(6)
    return hashlib.sha256(space.encode()).hexdigest()[:12]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: the process is only looked up
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


class StalePack(Exception):
    """A pack that does not match its manifest or cannot be read (`str()` says why)."""


def read_pack(manifest: str):
    """(SampleList over the mapped pack, rejects, lines) of `manifest`'s pack; None when it has none;
    StalePack when it has one that cannot be used."""
    path = pack_path(manifest)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StalePack(f"cannot be opened ({e.strerror})") from None
    try:  # kept open while the list lives: a process it starts is handed this file (SampleList.__getstate__)
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file
            raise StalePack(f"cannot be mapped ({e})") from None
        header, ends, data = _parse(mapped)
        packed, now = header["manifest"], _stamp(manifest)
        if packed["folder"] != now["folder"]:  # moved, or the same folder by another name (a symlink)
            raise StalePack(f"was packed for the manifest in {packed['folder']}, not {now['folder']} (its relative "
                            "paths resolve against its folder)")
        if packed != now:
            raise StalePack("was written for another version of the manifest (its size or modification time "
                            "changed since)")
    except BaseException:
        fh.close()
        raise
    from .manifest import SampleList

    samples = SampleList.mapped(data, ends, int_label=header["int_label"], label_names=header["label_names"],
                                fingerprint=header["fingerprint"], source=os.path.abspath(manifest), file=fh)
    return samples, [(f"{manifest}:{n}", reason) for n, reason in header["rejects"]], header["lines"]


def map_buffers(manifest: str, fingerprint: str, fd: int | None = None):
    """(file, data, ends) of `manifest`'s pack for a SampleList unpickled in another process: the very file its
    parent maps when handed its descriptor `fd` (a process it starts), else the pack of that name."""
    fh = os.fdopen(fd, "rb") if fd is not None else open(pack_path(manifest), "rb")
    header, ends, data = _parse(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    if header["fingerprint"] != fingerprint:
        raise StalePack(f"{pack_path(manifest)} changed while its samples were in use (packed again?)")
    return fh, data, ends


# What a header holds, checked before any field is used: valid JSON of another shape (another program's file, a hand
# edit) is a damaged pack like any other, not a KeyError or TypeError from the reader. [T]: a list of T; a tuple: a
# list of those types, in order.
_HEADER = {"version": int, "byteorder": str, "manifest": {"size": int, "mtime_ns": int, "folder": str},
           "count": int, "lines": int, "int_label": bool, "label_names": [str], "fingerprint": str,
           "rejects": [(int, str)]}


def _check_shape(value, shape, name: str) -> None:
    """ValueError naming the first part of `value` (called `name`) that `shape` (as _HEADER) does not describe."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{name} is {_shown(value)}, not an object")
        for key, sub in shape.items():
            if key not in value:
                raise ValueError(f"{name} has no {key!r}")
            _check_shape(value[key], sub, f"{name}.{key}")
    elif isinstance(shape, (list, tuple)):
        if not isinstance(value, list) or isinstance(shape, tuple) and len(value) != len(shape):
            raise ValueError(f"{name} is {_shown(value)}, not a list" + (f" of {len(shape)}" if len(shape) > 1 else ""))
        for i, item in enumerate(value):
            _check_shape(item, shape[i] if isinstance(shape, tuple) else shape[0], f"{name}[{i}]")
    elif not isinstance(value, shape) or shape is int and isinstance(value, bool):  # JSON true is no integer
        raise ValueError(f"{name} is {_shown(value)}, not {_KINDS[shape]}")


_KINDS = {int: "an integer", str: "a string", bool: "true or false"}


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse(mapped: mmap.mmap):
    """(header, ends, data) of a mapped pack, its structure checked (a cut or foreign file raises StalePack)."""
    view = memoryview(mapped)
    try:
        if view[:8] != MAGIC:
            raise StalePack("is not a videoprism pack (bad magic bytes)")
        (n,) = struct.unpack_from("<Q", view, 8)
        header = json.loads(bytes(view[16:16 + n]))
        if isinstance(header, dict) and header.get("version") != VERSION:
            raise StalePack(f"has format version {header.get('version')}, this videoprism reads {VERSION}")
        _check_shape(header, _HEADER, "header")
        count = header["count"]
        if count < 0:
            raise ValueError(f"header.count is {count}, not a count")
        ends_at = 16 + n + (-(16 + n) % 8)
        data_at = ends_at + 8 * count
        if data_at > len(view):
            raise StalePack("is cut short")
        if header["byteorder"] != sys.byteorder:
            raise StalePack(f"was written on a {header['byteorder']}-endian machine")
        ends = view[ends_at:data_at].cast("q")
        if count and ends[-1] != len(view) - data_at:
            raise StalePack("is cut short or has extra bytes")
        return header, ends, view[data_at:]
    except (ValueError, TypeError, struct.error) as e:
        raise StalePack(f"is damaged ({e})") from None
