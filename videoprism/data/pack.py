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

import json
import mmap
import os
import secrets
import struct
import sys

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
    # A name of its own: `data pack` on every node of a job (containers: one pid for all) wrote into one file.
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
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


def _parse(mapped: mmap.mmap):
    """(header, ends, data) of a mapped pack, its structure checked (a cut or foreign file raises StalePack)."""
    view = memoryview(mapped)
    try:
        if view[:8] != MAGIC:
            raise StalePack("is not a videoprism pack (bad magic bytes)")
        (n,) = struct.unpack_from("<Q", view, 8)
        header = json.loads(bytes(view[16:16 + n]))
        if header.get("version") != VERSION:
            raise StalePack(f"has format version {header.get('version')}, this videoprism reads {VERSION}")
        count = header["count"]
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
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise StalePack(f"is damaged ({e})") from None
