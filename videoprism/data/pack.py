"""A manifest's samples packed into one file beside it (`MANIFEST.pack`), mapped into memory by every reader.

Every rank reads the whole manifest (the loader shards each epoch's order, so a run resumes on another number of
ranks). Parsing and validating JSON costs ~12 s and ~0.16 GB per million lines in every rank (bench/manifest.py): at
36M clips, minutes of startup and ~6 GB per rank, 8 copies per node. A pack holds what that parse produces
(SampleList's two buffers, its label fields and fingerprint, the rejected lines), written once by
`videoprism data pack` or `data index`; a reader maps it read-only, so startup is a header read and the ranks (and
their DataLoader workers, forked or spawned) of a node share one copy in the page cache.

Layout (integers in the writing machine's byte order, which the header names; n and the header's CRC little-endian):
    MAGIC (8 bytes) | header length n (uint64) | header: n bytes of JSON | CRC-32 of the header (uint32)
    | zero padding to a multiple of 8 | ends: int64 [count] (end offset of each record in data)
    | crcs: uint32 [count] (CRC-32 of each record) | data: the pickled records, back to back
A pack is used only while it matches its manifest: the same folder (paths are resolved against it when packed), the
same size, and the same file (inode, modification and change time) or, when that file was copied, moved or
touched since, the same content (its SHA-256, read in ~0.2 s per million lines, where a parse takes ~12 s). Any
other pack is ignored with a note, and the manifest is read as JSON. The header is checked as it is read, and each
record as it is read (a CRC-32 of ~150 bytes: +0.3 us on a sample's ~3.8 us; the whole record area at startup cost
~90 ms per million, against the pack's 1 ms): a damaged record is read from the manifest instead, with a note.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import secrets
import shlex
import struct
import sys
import time
import zlib

from ..paths import LONGEST_PATH, echo, json_loads, note_once, shortened

MAGIC = b"VPPACK\x00\x01"
VERSION = 8  # bump when the record layout or the validation of a line changes: a pack holds the result of both
# 2: a rejected line is kept as its line number (1 kept the manifest's name as the packing command gave it)
# 3: the manifest's inode, change time and SHA-256; a CRC-32 of the header and of each record
# 4: video-only lines (no caption) are samples, counted in the header's "uncaptioned" (3 rejected them)
# 5: a line's "cfr" and "rotation" (data index) are probe fields (4 kept them among the extra fields)
# 6: a negative or int64-overflowing label and a caption holding a lone surrogate reject the line (5 kept them)
# 7: a line's "matrix" (data index) is a probe field (6 kept it among the extra fields)


def pack_path(manifest: str) -> str:
    return manifest + ".pack"


def _stamp(manifest: str) -> dict:
    """What a pack must match: a manifest edited, replaced or moved (relative paths resolve elsewhere) since. The
    file (inode, change time, which no program sets) tells an unchanged manifest at the cost of a stat; size and
    modification time alone took another version of the same size copied over it with its time (`cp -p`,
    `rsync -t`, a tar extract) for the packed one."""
    st = os.stat(manifest)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "folder": os.path.dirname(os.path.abspath(manifest))}


_FILE = ("size", "mtime_ns", "ctime_ns", "ino")  # the stamp's fields that name one version of one file


def _resolution_ns(stamp_ns: int) -> int:
    """The longest a file system's time stamps may stand still, judged by one of its stamps: whole seconds (ext3,
    FAT's two, some network file systems) or finer (a kernel's clock tick, at most 10 ms: 50 ms kept)."""
    return 2_000_000_000 if stamp_ns % 1_000_000_000 == 0 else 50_000_000


_SETTLE_S = 5.0  # the longest write_pack waits for it (more: the clocks disagree; readers check the content)


def _settled_stamp(manifest: str, fd: int) -> dict:
    """The manifest's stamp, once its change time lies a whole resolution before the file system's clock (read off
    the open file `fd`, beside the manifest: its own clock, not this machine's): an edit within the tick of the
    manifest's last change (a script that writes, packs and writes again) keeps its size, times and inode, and
    would pass for the packed version. From `read_after_ns` on, every change gets another change time; a reader
    trusts the file's stamp only for a pack so made (else it checks the content)."""
    waited = 0.0
    while True:
        stamp = _stamp(manifest)
        now = os.fstat(fd).st_mtime_ns
        need = stamp["ctime_ns"] + _resolution_ns(stamp["ctime_ns"]) - now
        if need < 0 or waited >= _SETTLE_S:
            return dict(stamp, read_after_ns=now)
        pause = min(need / 1e9 + 0.01, _SETTLE_S - waited)
        time.sleep(pause)
        waited += pause
        os.utime(fd)  # its times: the file system's now


def _trusted(packed: dict) -> bool:
    """Whether a pack's stamp of its manifest tells every later change (_settled_stamp)."""
    return packed["read_after_ns"] - packed["ctime_ns"] > _resolution_ns(packed["ctime_ns"])


def content_hash(manifest: str) -> str:
    """SHA-256 of the manifest's bytes (~0.2 s per million lines here: blake2b took 0.3-0.45, md5 0.42, CRC-32 0.09
    but 32 bits to name a version)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(manifest, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def record_crcs(data, ends):
    """uint32 CRC-32 of each record of `data` ending at `ends` (SampleList.buffers)."""
    import array

    view, crcs, start = memoryview(data), array.array("I"), 0
    if crcs.itemsize != 4:
        raise RuntimeError(f"this machine's unsigned int has {crcs.itemsize} bytes, not 4")
    for end in ends:
        crcs.append(zlib.crc32(view[start:end]))
        start = end
    return crcs


def write_pack(manifest: str, *, progress: bool = False) -> dict:
    """Read `manifest` as JSON and write `MANIFEST.pack` atomically; returns {"pack", "samples", "rejected"}.
    Every line is kept or recorded as rejected (a reader applies its own max_bad_share)."""
    from .manifest import check_manifest, read_manifest

    check_manifest(manifest)  # its message, not the stat's bare "[Errno 2]"
    path = pack_path(manifest)
    # A name of its own: `data pack` on every node of a job (containers: one pid for all) wrote into one file. Its
    # pid space and pid tell a later pack whether its writer is gone (_remove_stale).
    space = _pid_space()
    tmp = _tmp_path(path, space)
    stale = _remove_stale(path, space)
    if stale:
        echo(f"note: removed {len(stale)} unfinished pack file(s) of {manifest} whose writer is gone (a `data pack` "
             f"or `data index` killed while writing): {', '.join(stale)}", file=sys.stderr)
    try:
        fh = open(tmp, "xb")
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        with fh:
            # Before reading: the file system's clock past the manifest's last change (_settled_stamp), so that any
            # edit from here on (during the read too) changes the stamp.
            stamp = _settled_stamp(manifest, fh.fileno())
            stamp["sha256"] = content_hash(manifest)
            # Video-only lines kept (counted in the header): a reader that needs captions parses instead.
            samples, rejects = read_manifest(manifest, max_bad_share=1.0, use_pack=False, progress=progress,
                                             captions=False)
            if any(_stamp(manifest)[k] != stamp[k] for k in _FILE):  # the hash and the parse may differ
                raise ValueError(f"{manifest} changed while it was packed; pack it again once it is written")
            # A reject is `FILE:LINE` with FILE as the reader names the manifest (a relative name here is another
            # file in a run elsewhere): the line number is kept, the name is the reader's (read_pack).
            lines = [[int(where.rpartition(":")[2]), reason] for where, reason in rejects]
            header = json.dumps({
                "version": VERSION, "byteorder": sys.byteorder, "manifest": stamp, "count": len(samples),
                "lines": len(samples) + len(rejects), "int_label": samples.int_label,
                "label_names": samples.label_names, "uncaptioned": samples.uncaptioned,
                "fingerprint": samples.fingerprint, "rejects": lines}).encode()
            data, ends = samples.buffers()
            try:
                fh.write(MAGIC + struct.pack("<Q", len(header)) + header + struct.pack("<I", zlib.crc32(header)))
                fh.write(b"\0" * (-fh.tell() % 8))
                fh.write(ends.tobytes())
                fh.write(record_crcs(data, ends).tobytes())
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as e:
                raise _cannot_write(path, e) from None
        try:
            os.replace(tmp, path)  # a reader sees the old pack or the new one, never half of one
        except OSError as e:
            raise _cannot_write(path, e) from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"pack": path, "samples": len(samples), "rejected": len(rejects)}


def _tmp_path(path: str, space: str) -> str:
    return f"{path}.{space}.{os.getpid()}.{secrets.token_hex(8)}.tmp"


def check_name_room(manifest: str, option: str) -> None:
    """ValueError, before any work, when `manifest` (`option`, e.g. "--out X") is named too long for its pack to be
    written beside it: the pack's temporary file adds ~45 bytes to the name, past the file system's longest (255
    bytes on most). `data index` found out when it packed, after probing every file."""
    folder = os.path.dirname(os.path.abspath(manifest))
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    over = len(os.fsencode(os.path.basename(_tmp_path(pack_path(manifest), _pid_space())))) - longest
    if over > 0:
        raise ValueError(f"{option}: its name is {len(os.fsencode(os.path.basename(manifest)))} bytes, {over} too "
                         f"many for the pack written beside it (the name with .pack and a temporary suffix, at most "
                         f"{longest} bytes here); pick a shorter name")


def _cannot_write(path: str, e: OSError) -> OSError:
    if e.errno == errno.ENAMETOOLONG:  # no folder takes it: the fix is the manifest's name
        return OSError(f"cannot write {path} ({e.strerror}): the pack's name, its manifest's with .pack (and a "
                       "temporary suffix while written) added, is past what the file system allows; rename the "
                       "manifest shorter, or go on without a pack")
    return OSError(f"cannot write {path} ({e.strerror}); the pack is written beside its manifest: copy the manifest "
                   "and its videos to a folder you can write, or go on without a pack")


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
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENAMETOOLONG):  # a manifest of a name too long to add .pack has none
            return None
        raise StalePack(f"cannot be opened ({e.strerror})") from None
    try:  # kept open while the list lives: a process it starts is handed this file (SampleList.__getstate__)
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file
            raise StalePack(f"cannot be mapped ({e})") from None
        header, ends, crcs, data = _parse(mapped)
        packed, now = header["manifest"], _stamp(manifest)
        if packed["folder"] != now["folder"]:  # moved, or the same folder by another name (a symlink)
            raise StalePack(f"was packed for the manifest in {shortened(packed['folder'], LONGEST_PATH)}, not "
                            f"{now['folder']} (its relative paths resolve against its folder)")
        if packed["size"] != now["size"]:
            raise StalePack("was written for another version of the manifest (its size changed since)")
        if any(packed[k] != now[k] for k in _FILE) or not _trusted(packed):
            # Another file (copied, moved, restored), touched, or replaced keeping its size and time: its content
            # tells which.
            started = time.monotonic()
            if content_hash(manifest) != packed["sha256"]:
                raise StalePack("was written for another version of the manifest (its content differs from the "
                                "packed one's, though its size is the same)")
            why = ("was packed within its time stamps' resolution of a change to it" if not _trusted(packed) else
                   "was copied, moved or touched since it was packed (its inode, modification or change time "
                   "differ)")
            note_once(f"{path} is used: {manifest} {why}, and its content matches the pack's (checked in "
                      f"{time.monotonic() - started:.2f} s, at every read until `videoprism data pack "
                      f"{shlex.quote(manifest)}` packs it again)", key=f"{path}: {why}")
    except BaseException:
        fh.close()
        raise
    from .manifest import SampleList

    samples = SampleList.mapped(data, ends, crcs, int_label=header["int_label"], label_names=header["label_names"],
                                uncaptioned=header["uncaptioned"], fingerprint=header["fingerprint"],
                                source=os.path.abspath(manifest), file=fh)
    if sys.getfilesystemencoding() != "utf-8":  # packed in a UTF-8 locale, read in another: as the JSON's parse
        _check_names(samples, manifest)
    return samples, [(f"{manifest}:{n}", reason) for n, reason in header["rejects"]], header["lines"]


def _check_names(samples, manifest: str) -> None:
    """FileNameEncodingError, as the manifest's parse raises it, for the first sample whose path this process's file
    names cannot hold: a pack of "caf\u00e9.webm" written in a UTF-8 locale ended a `data index` in an ascii one
    with "'ascii' codec can't encode character '\\xe9'", naming no file and no fix."""
    from .errors import FileNameEncodingError
    from .manifest import check_file_name

    for s in samples:
        try:
            check_file_name(s.path)
        except FileNameEncodingError as e:
            raise FileNameEncodingError(f"{manifest} (read from its pack), the sample of {s.path}: {e}") from None


def map_buffers(manifest: str, fingerprint: str, fd: int | None = None):
    """(file, data, ends, crcs) of `manifest`'s pack for a SampleList unpickled in another process: the very file
    its parent maps when handed its descriptor `fd` (a process it starts), else the pack of that name."""
    fh = os.fdopen(fd, "rb") if fd is not None else open(pack_path(manifest), "rb")
    header, ends, crcs, data = _parse(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    if header["fingerprint"] != fingerprint:
        raise StalePack(f"{pack_path(manifest)} changed while its samples were in use (packed again?)")
    return fh, data, ends, crcs


# What a header holds, checked before any field is used: valid JSON of another shape (another program's file, a hand
# edit) is a damaged pack like any other, not a KeyError or TypeError from the reader. [T]: a list of T; a tuple: a
# list of those types, in order.
_HEADER = {"version": int, "byteorder": str,
           "manifest": {"size": int, "mtime_ns": int, "ctime_ns": int, "ino": int, "folder": str,
                        "read_after_ns": int, "sha256": str},
           "count": int, "lines": int, "int_label": bool, "label_names": [str], "uncaptioned": int,
           "fingerprint": str, "rejects": [(int, str)]}


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
    """A header's value as its JSON spells it, shortened."""
    return shortened(json.dumps(value), 40)


def _parse(mapped: mmap.mmap):
    """(header, ends, crcs, data) of a mapped pack, its structure and header checked (a cut, damaged or foreign
    file raises StalePack); its records are checked as they are read (SampleList)."""
    view = memoryview(mapped)
    try:
        if view[:8] != MAGIC:
            raise StalePack("is not a videoprism pack (bad magic bytes)")
        (n,) = struct.unpack_from("<Q", view, 8)
        raw = bytes(view[16:16 + n])
        header = json_loads(raw)
        # The version first: an older pack has no checksum where this one has.
        if isinstance(header, dict) and header.get("version") != VERSION:
            raise StalePack(f"has format version {_shown(header.get('version'))}, this videoprism reads {VERSION}")
        if struct.unpack_from("<I", view, 16 + n)[0] != zlib.crc32(raw):
            raise ValueError("header checksum mismatch")
        _check_shape(header, _HEADER, "header")
        for key in ("count", "lines", "uncaptioned"):  # a count past int64 (2**70) failed later, as an OverflowError
            if not 0 <= header[key] < 2**63:
                raise ValueError(f"header.{key} is {_shown(header[key])}, not a count")
        count = header["count"]
        ends_at = 20 + n + (-(20 + n) % 8)
        crcs_at = ends_at + 8 * count
        data_at = crcs_at + 4 * count
        if data_at > len(view):
            raise StalePack("is cut short")
        if header["byteorder"] != sys.byteorder:
            raise StalePack(f"was written on a {shortened(header['byteorder'], 40)}-endian machine")
        ends = view[ends_at:crcs_at].cast("q")
        if count and ends[-1] != len(view) - data_at:
            raise StalePack("is cut short or has extra bytes")
        return header, ends, view[crcs_at:data_at].cast("I"), view[data_at:]
    except (ValueError, TypeError, struct.error) as e:
        raise StalePack(f"is damaged ({e})") from None
