"""Data sources: a JSONL manifest or WebDataset tar shards, read into a list of `Sample`s.

Manifest line (JSON object, UTF-8):
    {"path": "clips/a.webm", "caption": "a red circle moves left", "dataset": "synth",
     "start": 1.5, "end": 4.0, "label": 3}
`path` is required (relative paths resolve against the manifest's folder); `caption`, when present, is a non-empty
string: a reader that needs captions (`captions=True`: stage 1, retrieval) rejects a line without one, the others
(stage 2, probes, zero-shot classification) take video-only lines; `start`/`end` (seconds) select a window,
`label` is an int or a dict of ints (e.g. {"colour": 2, "shape": 0}).
`offset`/`size` (bytes) make `path` a byte range, as `videoprism data index` writes for WebDataset members. A clean
manifest from `index` also carries the probe fields (`codec`, `frames`, `fps`, `width`, `height`, `duration`, `cfr`,
`rotation`, `matrix`).

WebDataset shard: a tar whose members are grouped by key (the name up to the first "."): one video member (.mp4,
.webm, .mkv, .avi, .mov, .m4v) or one image member (.jpg, .jpeg, .png, .webp: a one-frame video, as an image file
listed in a manifest is), a `.txt` caption (which only a reader that needs captions requires) and optionally a
`.json` object with start/end/label/dataset. A key with both a video and an image member is its video: the image is
taken for its thumbnail (video datasets ship one per clip) and ignored. Member names are keys, not paths ('../' or a
leading '/' opens nothing); a member that is no plain file (link, device, FIFO, folder, sparse file) is never followed
or read: its key is rejected. Shards are read uncompressed (a member's bytes in place).

Bad lines or members (bad JSON, missing path, empty or non-UTF-8 caption, ...) are skipped and reported; reading
stops with `TooManyBadSamplesError` only when their share passes `max_bad_share`.
"""
from __future__ import annotations

import array
import functools
import hashlib
import io
import json
import os
import pickle
import shlex
import sys
import tarfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..paths import LONGEST_PATH, echo, json_loads, note_once, shortened, shown
from .errors import BadSampleBudget, BadVideoError, FileNameEncodingError, NoUsableSamplesError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
# The image formats of public image-text shards; FFmpeg decodes each as a one-frame video (decode.py), as it does an
# image file a manifest lists.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_MEDIA_SLOTS = ("video", "image")  # a shard key's sample is its video member, else its image member
PROBE_FIELDS = ("codec", "frames", "fps", "width", "height", "duration", "cfr", "rotation", "matrix")
_KNOWN_FIELDS = frozenset({"path", "caption", "dataset", "start", "end", "label", "offset", "size", "member",
                           *PROBE_FIELDS})  # the rest of a line is kept as `extra`


@dataclass(frozen=True)
class Sample:
    path: str  # absolute path of the video or image file (or of the tar holding it)
    caption: str | None  # None: a video-only line (readers with captions=False)
    dataset: str = ""
    start: float | None = None
    end: float | None = None
    label: int | dict | None = None
    offset: int | None = None  # byte range of the video or image inside `path` (WebDataset member)
    size: int | None = None
    member: str | None = None  # its name inside the tar, for messages
    probe: dict = field(default_factory=dict, compare=False)  # index fields of a clean manifest
    extra: dict = field(default_factory=dict, compare=False)  # other fields of the line, kept by `index`

    @property
    def name(self) -> str:
        """How errors and reports name the sample."""
        if self.offset is None:
            return self.path
        return f"{self.path}:{self.member}" if self.member else f"{self.path}@{self.offset}+{self.size}"

    def source(self) -> str | bytes:
        """The path to open, or the bytes of a member of a tar."""
        if self.offset is None:
            return self.path
        with open(self.path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            # A cut shard's last member (or a wrong line) declares bytes the file lacks: read(50 GB) of them asked
            # for 50 GB up front, a MemoryError that stopped `data index`.
            if self.offset + self.size > end:
                raise BadVideoError(self.name, f"truncated: its bytes [{self.offset}, {self.offset + self.size}) "
                                               f"pass the end of the file ({end} bytes): a cut shard (copy it "
                                               "again) or a wrong 'offset' / 'size'")
            f.seek(self.offset)
            return f.read(self.size)

    def read_bytes(self) -> bytes:
        """The encoded video or image (for decoders that take memory, like DALI)."""
        src = self.source()
        if isinstance(src, bytes):
            return src
        with open(src, "rb") as f:
            return f.read()

    def to_record(self, base: str | None = None) -> dict:
        """The manifest line of this sample (paths relative to `base` when given)."""
        rec = dict(self.extra)
        rec["path"] = _relative(self.path, base) if base else self.path
        if self.caption is not None:
            rec["caption"] = self.caption
        for key in ("dataset", "start", "end", "label", "offset", "size", "member"):
            value = getattr(self, key)
            if value not in (None, ""):
                rec[key] = value
        rec.update(self.probe)
        return rec


def resolve(base: str, path: str) -> str:
    """A manifest line's `path` joined to the manifest's folder `base` and normalised. Normalising is textual: a '..'
    after a symlinked folder ("data/" linking to /mnt/x/deep/data, "../clips/a.webm") named the folder above the
    link, not the one `ls data/../clips` lists, and every such file was "missing". A path with '..' resolves
    against the folder the kernel reaches (_folder)."""
    if os.pardir not in path.split(os.sep):
        return os.path.normpath(os.path.join(base, path))
    folder, name = os.path.split(path)
    return os.path.normpath(os.path.join(_folder(base, folder), name))


@functools.lru_cache(maxsize=4096)
def _folder(base: str, folder: str) -> str:
    """`folder` joined to `base`: normalised as text where that is the folder the kernel reaches (the names of the
    samples as they always were), else that folder (a symlink crossed by '..'). Cached: a manifest has few."""
    lexical = os.path.normpath(os.path.join(base, folder))
    physical = os.path.realpath(os.path.join(base, folder))
    return lexical if os.path.realpath(lexical) == physical else physical


def _relative(path: str, base: str) -> str:
    """`path` as a clean manifest in `base` writes it: relative, as `resolve` reads it back to the same file (the
    relative path from the folder `base` links to, where '..' crosses a symlink), else absolute."""
    for start in (base, os.path.realpath(base)):
        rel = os.path.relpath(path, start)
        if resolve(base, rel) == os.path.normpath(path):
            return rel
    return os.path.abspath(path)


# Levels of lists and objects a sample's field may hold. A fixed bound, far below every interpreter's recursion limit:
# pickle.dumps raised RecursionError between 400 and 500 levels on Python 3.11, between 700 and 900 on 3.12 (fewer
# from a deeper call stack), so a field 500 lists deep was a skipped line on one and a sample on the other: the
# sample list, and the fingerprint a checkpoint keeps of it, changed with the Python a run resumed on (pack format 8).
MAX_FIELD_DEPTH = 100
TOO_DEEP = "a field's lists or objects are nested too deep to keep; flatten the field"
# EMPTY_LIST, EMPTY_DICT, EMPTY_TUPLE, MARK (a longer tuple's start), TUPLE1 to TUPLE3.
_CONTAINER_OPCODES = b"".join((pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.MARK, pickle.TUPLE1,
                                pickle.TUPLE2, pickle.TUPLE3))


def _nested_deeper_than(values, limit: int) -> bool:
    """Whether one of `values` holds lists, tuples or dicts more than `limit` levels deep (a list of numbers is 1
    level). Iterative: no recursion limit of its own."""
    stack = [(v, 1) for v in values]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, (list, tuple)):
            continue
        if depth > limit:
            return True
        stack.extend((x, depth + 1) for x in v)
    return False


def _fingerprint_line(s: Sample) -> bytes:
    """What the checkpoint fingerprint hashes of a sample. surrogatepass: a path with a lone surrogate (a non-UTF-8
    file name as Python lists it, "caf\\udce9.mp4", which json.dumps writes and json.loads gives back) is a usable
    sample; strict UTF-8 raised on it. Every other name encodes as before, so older checkpoints still resume."""
    return f"{s.name}\0{s.start}\0{s.end}\n".encode("utf-8", "surrogatepass")


class SampleList(Sequence):
    """Samples stored compactly: each one's field values pickled into one bytearray, with the end offsets in an
    int64 array; `samples[i]` builds the Sample from its bytes. For a manifest of millions of clips:
    - about a third of the memory of Sample objects (measured: ~610 -> ~210 bytes a sample);
    - nothing for a DataLoader worker to copy: a forked worker shares its parent's memory until it writes to a
      page, and Python writes a reference count into every object it touches, so a list of objects ends up
      copied page by page into every worker over an epoch (pytorch/pytorch#13246); these two buffers are two
      objects, whatever the length.
    What a loader needs of every sample is gathered as they are appended, not by passes over millions of them:
    the label fields (`int_label`, `label_names`) and the `fingerprint` a checkpoint keeps of the list.
    A list read from a manifest's pack (pack.py) maps the pack's buffers instead of holding them: shared with every
    process that maps the same file; a process it starts (spawn, forkserver) is handed the open pack and maps it
    too, any other unpickling maps the pack by name."""

    _crcs = None  # a mapped pack's CRC-32 of each record, checked as it is read (pack.py); None: not checked

    def __init__(self, samples=()):
        self._data, self._ends = bytearray(), array.array("q")
        self.int_label, self._label_names = False, set()
        self.uncaptioned = 0  # samples without a caption
        self._hash, self._fingerprint = hashlib.sha256(), None
        self._pack, self._file = None, None  # the manifest whose pack (pack.py) the buffers map read-only, its file
        for s in samples:
            self.append(s)

    @classmethod
    def mapped(cls, data: memoryview, ends: memoryview, crcs: memoryview, *, int_label: bool,
               label_names: list[str], uncaptioned: int, fingerprint: str, source: str, file) -> "SampleList":
        """A list over the buffers of `source`'s mapped pack (pack.read_pack), open as `file`, with what was
        gathered when it was packed."""
        new = cls()
        new._data, new._ends, new._crcs, new._pack, new._file = data, ends, crcs, source, file
        new.int_label, new._label_names, new.uncaptioned = int_label, set(label_names), uncaptioned
        new._hash, new._fingerprint = None, fingerprint
        return new

    def buffers(self) -> tuple[bytes | bytearray | memoryview, array.array | memoryview]:
        """The records and their end offsets (what pack.write_pack stores)."""
        return self._data, self._ends

    def append(self, s: Sample) -> None:
        # Everything that can fail first: a sample is either appended whole (record, labels, fingerprint) or not at
        # all (read_manifest rejects the line it could not append).
        # A tuple of the values, not the dataclass: no field names in every record.
        try:
            record = pickle.dumps((s.path, s.caption, s.dataset, s.start, s.end, s.label, s.offset, s.size,
                                   s.member, s.probe or None, s.extra or None), protocol=pickle.HIGHEST_PROTOCOL)
        except RecursionError:  # hundreds of levels (fewer from a deep call stack): json read the line, pickle cannot
            raise ValueError(TOO_DEEP) from None
        # Every list, dict and tuple pickles to one of _CONTAINER_OPCODES: a record with no more of those bytes than
        # the bound holds no field past it, and the walk in Python (~3x a typical sample's pickling) is skipped.
        if (len(record) - len(record.translate(None, _CONTAINER_OPCODES)) > MAX_FIELD_DEPTH
                and _nested_deeper_than((s.label, *s.probe.values(), *s.extra.values()), MAX_FIELD_DEPTH)):
            raise ValueError(TOO_DEEP)
        key = _fingerprint_line(s)
        if self._pack is not None:  # a mapped pack is read-only: this list takes its own copy first
            self._check_all()  # a damaged record is not copied into the list's own buffers
            self._data, self._ends = bytearray(self._data), array.array("q", self._ends)
            self._pack = self._file = self._crcs = None
        if self._hash is None:  # an unpickled copy (the hash state does not pickle): hashed again, once
            self._hash = hashlib.sha256()
            for old in self:
                self._hash.update(_fingerprint_line(old))
        self._data += record
        self._ends.append(len(self._data))
        if isinstance(s.label, dict):
            self._label_names.update(s.label)
        elif isinstance(s.label, int):
            self.int_label = True
        self.uncaptioned += s.caption is None
        self._hash.update(key)
        self._fingerprint = None

    @property
    def label_names(self) -> list[str]:
        """The keys of every dict label, sorted (the loader's `label_<key>` fields)."""
        return sorted(self._label_names)

    @property
    def fingerprint(self) -> str:
        """`count:hash` of the samples' names and windows in order: a checkpoint's data position indexes into this
        list, so a resume over another list (a line more or less) must be refused."""
        if self._fingerprint is None:
            self._fingerprint = f"{len(self)}:{self._hash.hexdigest()[:16]}"
        return self._fingerprint

    def __getstate__(self) -> dict:  # a spawned DataLoader worker gets a pickled copy: hashlib objects do not pickle
        from multiprocessing import context, reduction

        state = dict(self.__dict__, _fingerprint=self.fingerprint, _hash=None, _file=None)
        if self._pack is not None:  # the pack, not its bytes: the other process maps the same file
            state.update(_data=None, _ends=None, _crcs=None)
            if context.get_spawning_popen() is not None:
                # A process being started (a DataLoader worker under spawn or forkserver, every epoch) is handed
                # this open file: by name, a pack packed again over an edited manifest or removed during the run
                # killed every such worker at start.
                state["_file"] = reduction.DupFd(self._file.fileno())
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._pack is not None:
            from .pack import map_buffers

            fd = None if state["_file"] is None else state["_file"].detach()
            self._file, self._data, self._ends, self._crcs = map_buffers(self._pack, self._fingerprint, fd)

    def __copy__(self) -> "SampleList":
        # The default copy shares the buffers: appending to the copy would change the original (a mapped pack's
        # read-only buffers are shared; the first append copies them).
        new = object.__new__(type(self))
        owned = self._pack is None
        new.__dict__.update(self.__dict__, _data=bytearray(self._data) if owned else self._data,
                            _ends=array.array("q", self._ends) if owned else self._ends,
                            _label_names=set(self._label_names),
                            _hash=None if self._hash is None else self._hash.copy())
        return new

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._ends)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of {n}")
        i %= n
        start = self._ends[i - 1] if i else 0
        record = memoryview(self._data)[start:self._ends[i]]
        if self._crcs is not None and zlib.crc32(record) != self._crcs[i]:
            self._read_instead(i, "fails its checksum")
            return self[i]
        try:
            *head, probe, extra = plain_values(record)
            return Sample(*head, probe=probe or {}, extra=extra or {})
        # Any error: a pack's bytes are whatever its sender wrote, with checksums to match (not only bit rot).
        except Exception as e:
            if self._pack is None:  # this process's own records (or its parent's): a bug, not damage
                raise
            self._read_instead(i, f"does not decode: {e}")
        return self[i]

    def _check_all(self) -> None:
        """Every record of a mapped pack checked (before the list copies them into buffers it checks no more)."""
        if self._crcs is not None:
            from .pack import record_crcs

            sums = record_crcs(self._data, self._ends)
            if sums != array.array("I", self._crcs):
                self._read_instead(next(i for i, (a, b) in enumerate(zip(sums, self._crcs)) if a != b),
                                   "fails its checksum")

    def _read_instead(self, i: int, why: str) -> None:
        """Record `i` of the mapped pack failed its checksum or did not decode (`why`): the pack is damaged, and this
        list reads its manifest instead, as a reader does a damaged pack (a note, the manifest parsed), once in this
        process. The manifest must still hold the very samples (fingerprint): the positions of a run or its
        checkpoint index into them."""
        from .pack import StalePack, pack_path

        manifest, pack = self._pack, pack_path(self._pack)
        damage = f"{pack} is damaged (record {i} {why})"
        echo(f"note: {damage}; reading {manifest} instead (`videoprism data pack {shlex.quote(manifest)}` writes it "
             "again)", file=sys.stderr)
        try:
            parsed, _ = _parse_manifest(manifest, 1.0, False, captions=False)  # as packed
        except (OSError, ValueError) as e:
            raise StalePack(f"{damage}, and {manifest} cannot be read instead: {e}") from None
        if parsed.fingerprint != self.fingerprint:
            raise StalePack(f"{damage}, and {manifest}, read instead, no longer holds the samples this process was "
                            f"given ({parsed.fingerprint}, not {self.fingerprint}: changed since they were read): "
                            "restore the manifest they came from, or start over from `videoprism data pack "
                            f"{shlex.quote(manifest)}`")
        self._data, self._ends, self._hash = parsed._data, parsed._ends, parsed._hash
        self._pack = self._file = self._crcs = None


class _PlainValues(pickle.Unpickler):
    """Unpickles a record of plain values only: str, int, float, bool, None and the tuples, lists and dicts of
    them that SampleList.append writes (a manifest line's JSON values). A pack arrives with its manifest from
    wherever the data came from, and a pickle that names a global (a function, a class) calls it as it is read:
    any code its sender chose, at the first sample read. The only other way to a callable, a copyreg extension
    code, resolves through find_class too unless a program registered that code and loaded it since (nothing
    here registers one: copyreg's registry stays empty with torch and the trainer imported). Costs ~0.8 us a
    record more than pickle.loads (bench/manifest.py: sample_us, sample_pickle_us)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}, which reading it would call; a record holds plain "
                                     "values only")


def plain_values(record) -> tuple:
    """The values of one SampleList record (bytes-like), read by _PlainValues."""
    return _PlainValues(io.BytesIO(record)).load()


def _number(rec: dict, key: str) -> float | None:
    value = rec.get(key)
    if value is None:
        return None
    # json parses NaN and Infinity: not a time either; nor an int past a float's range (1e400 written as digits), which
    # math.isfinite met with an OverflowError. The comparisons are exact for an int, and false for NaN.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= sys.float_info.max:
        raise ValueError(f"'{key}' must be a non-negative, finite number of seconds, got {shown(value)}")
    return float(value)


def _class_id(v) -> bool:
    """A class id: an int in [0, 2^63) (the loader batches them as int64 and takes -1 for "no label")."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _label(value):
    if value is None or _class_id(value):
        return value
    if isinstance(value, dict) and all(_class_id(v) for v in value.values()):
        if "label" in value:  # the name of an int label (batch field "label", probe "label"): one name, two labels
            raise ValueError("'label' dict key 'label' is the name of an int label; rename the key (e.g. "
                             '{"class": 3}) or give the int itself ("label": 3)')
        return dict(value)
    raise ValueError(f"'label' must be a class id (an int >= 0) or a dict of them, got {shown(value)}")


def sample_from_record(rec, base: str) -> Sample:
    """Validate one manifest object; raises ValueError naming the field, the value and what is expected."""
    if not isinstance(rec, dict):
        raise ValueError(f"a line must be a JSON object, got {type(rec).__name__}")
    path = rec.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"'path' must be a non-empty string, got {shown(path)}")
    check_file_name(path)
    caption = rec.get("caption")  # absent (or null): a video-only line
    if isinstance(caption, list):  # a clip's captions: the loader pairs a clip with one caption a sample
        raise ValueError(f"'caption' must be one string, got a list of {len(caption)}: {shown(caption)}; give one "
                         "caption a line (for training, a clip may repeat on a line per caption)")
    if caption is not None and (not isinstance(caption, str) or not caption.strip()):
        raise ValueError(f"'caption' must be a non-empty string, got {shown(caption)}")
    if caption is not None and not caption.isascii():
        try:  # JSON's "\ud800" escapes a lone surrogate: no text, and the tokenizer fails on it mid-run
            caption.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"'caption' holds {caption[e.start]!r} at {e.start}, a lone UTF-16 surrogate, not text; "
                             "fix the line") from None
    start, end = _number(rec, "start"), _number(rec, "end")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"'end' ({end}) must be after 'start' ({start})")
    offset, size = rec.get("offset"), rec.get("size")
    # Not a bool (an int to isinstance): json's true read the tar from byte 1.
    if (offset is None) != (size is None) or any(v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                                                    or v < 0) for v in (offset, size)):
        raise ValueError(f"'offset' and 'size' must both be non-negative ints or both absent, got {shown(offset)}, "
                         f"{shown(size)}")
    dataset, member = rec.get("dataset", ""), rec.get("member")
    if not isinstance(dataset, str):
        raise ValueError(f"'dataset' must be a string, got {shown(dataset)}")
    if member is not None and not isinstance(member, str):
        raise ValueError(f"'member' must be a string (the name inside the tar), got {shown(member)}")
    return Sample(path=resolve(base, path), caption=caption, dataset=dataset, start=start,
                  end=end, label=_label(rec.get("label")), offset=offset, size=size, member=member,
                  probe={k: rec[k] for k in PROBE_FIELDS if k in rec},
                  extra={k: v for k, v in rec.items() if k not in _KNOWN_FIELDS})


def check_file_name(path: str) -> None:
    """ValueError unless `path` can name a file: a NUL, or a lone UTF-16 surrogate that is no byte of a name (JSON's
    "\\ud800"; os.listdir's name of a byte that is not UTF-8 is "\\udce9", which json.dumps writes and which is
    fine), made the probe of `data index` raise and end the whole index ("'utf-8' codec can't encode character").
    FileNameEncodingError for a character that this process's file names cannot hold (a locale that is not
    UTF-8): in an ascii one, `data index` rejected "caf\u00e9.webm" as "a lone UTF-16 surrogate"."""
    if "\0" in path:
        raise ValueError(f"'path' {shown(path)} holds a NUL character, which no file name holds; fix the line")
    if not path.isascii():
        try:
            os.fsencode(path)
        except UnicodeEncodeError as e:
            if not "\ud800" <= path[e.start] <= "\udfff":  # a character, which a UTF-8 locale's names hold
                raise FileNameEncodingError(
                    f"'path' holds {path[e.start]!r} at {e.start}, which this process's file names cannot: they "
                    f"are {sys.getfilesystemencoding()}, from the locale (LC_ALL, LC_CTYPE, LANG), not UTF-8; run "
                    "with PYTHONUTF8=1 or in a UTF-8 locale (LC_ALL=C.UTF-8)") from None
            raise ValueError(f"'path' holds {path[e.start]!r} at {e.start}, a lone UTF-16 surrogate, which no file "
                             "name holds; fix the line") from None


def check_manifest(path: str) -> None:
    """FileNotFoundError naming the fix unless `path` is a file."""
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"manifest {shown(path, LONGEST_PATH)} {what}; pass a .jsonl file (one JSON object "
                                "per line) or WebDataset .tar shards")


# Why a reader that needs captions rejects a line or member without one.
NO_CAPTION = ("no caption (stage 1 and retrieval need one per clip; stage 2, probes and zero-shot classification "
              "read video-only lines)")


def read_manifest(path: str, *, max_bad_share: float = 0.01, use_pack: bool = True, progress: bool = False,
                  captions: bool = True) -> tuple[SampleList, list[tuple[str, str]]]:
    """Samples of a JSONL manifest and the rejected lines as (`FILE:LINE`, reason), from its pack (pack.py)
    when it has one that matches it, else parsed (with a progress bar when `progress`). `captions`: a line
    without a caption is rejected (NO_CAPTION); False keeps it (`Sample.caption` None)."""
    check_manifest(path)
    if use_pack:
        packed = _read_packed(path, max_bad_share, captions)
        if packed is not None:
            return packed
    started = time.monotonic()
    samples, rejects = _parse_manifest(path, max_bad_share, progress, captions)
    took = time.monotonic() - started
    from .pack import pack_path

    # No hint where a pack exists but did not serve: the note above said why, and what would.
    if use_pack and took > _PACK_HINT_SECONDS and not os.path.exists(pack_path(path)):
        echo(f"note: reading {path} ({len(samples) + len(rejects)} lines) took {took:.0f} s; `videoprism data "
             f"pack {shlex.quote(path)}` writes it once to a file every process maps instead", file=sys.stderr)
    return samples, rejects


_PACK_HINT_SECONDS = 20.0


def _read_packed(path: str, max_bad_share: float, captions: bool):
    """read_manifest's result from the manifest's pack; None when it has none or one that does not match, or when
    the reader needs captions and the pack holds video-only lines (the pack keeps them: which lines those are, the
    parse says), unless their count alone passes the share (TooManyBadSamplesError at once)."""
    from .pack import StalePack, pack_path, read_pack

    try:
        packed = read_pack(path)
    except StalePack as e:
        note_once(f"{pack_path(path)} {e}; reading {path} instead (`videoprism data pack {shlex.quote(path)}` "
                  "writes it again)")
        return None
    if packed is None:
        return None
    samples, rejects, lines = packed
    budget = _line_budget(path, lines, max_bad_share, captions)
    if captions and samples.uncaptioned:
        bad = samples.uncaptioned + len(rejects)
        if budget.over(bad):  # the parse would stop too: said at once, not after minutes of parsing on every rank
            budget.stop(bad, f"video-only lines: {samples.uncaptioned} (counted by {pack_path(path)}; {NO_CAPTION}), "
                             f"lines rejected when it was packed: {len(rejects)}")
        note_once(f"{pack_path(path)} holds {samples.uncaptioned} video-only lines, which a reader that needs "
                  f"captions rejects; reading {path} instead (`videoprism data index --require-captions` writes a "
                  "manifest without them, whose pack serves it)")
        return None
    # The share is checked at read time, as a parse would: the pack keeps every rejected line.
    for where, reason in rejects:
        budget.skip(where, reason)
    return samples, rejects


def _line_budget(path: str, lines: int, max_bad_share: float, captions: bool) -> BadSampleBudget:
    return BadSampleBudget(total=lines, max_share=max_bad_share, what=f"lines of {path}",
                           clean=_clean_command(shlex.quote(path), captions))


def _clean_command(source: str, captions: bool) -> str:
    """The `data index` that cleans `source` for its reader: one that needs captions also needs the video-only lines
    out (--require-captions rejects them)."""
    return f"videoprism data index {source} --out CLEAN.jsonl" + (" --require-captions" if captions else "")


def _parse_manifest(path: str, max_bad_share: float, progress: bool,
                    captions: bool) -> tuple[SampleList, list[tuple[str, str]]]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        if b"\0" in f.read(4096):  # a video or an archive given as the manifest: one error, not a reject per "line"
            raise ValueError(f"manifest {shown(path, LONGEST_PATH)} is a binary file, not a JSONL manifest; pass a "
                             ".jsonl file (one JSON object per line) or WebDataset .tar shards")
        # Two passes, the lines counted first (the budget's total) and then parsed one at a time: a list of every
        # line's bytes beside the samples would double the peak memory of a large manifest.
        f.seek(0)
        total = sum(1 for raw in f if raw.strip())
        budget = _line_budget(path, total, max_bad_share, captions)
        samples = SampleList()
        f.seek(0)
        looked = False  # at the first sample's file (_relative_to_cwd)
        with _line_bar(total, path, progress) as bar:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if n % 16384 == 0:  # in steps: a bar's update per line would cost more than a line's parse
                    bar.update(min(16384, total - bar.n))
                try:
                    # utf-8-sig: a byte-order mark (some editors write one) is not part of the first line.
                    rec = json_loads(raw.decode("utf-8-sig" if n == 1 else "utf-8").strip())
                    s = sample_from_record(rec, base)
                    if captions and s.caption is None:
                        raise ValueError(NO_CAPTION)
                    samples.append(s)
                    if not looked:
                        looked = True
                        _relative_to_cwd(path, rec["path"], s)
                except FileNameEncodingError as e:  # the locale's, not the line's: every such line alike
                    raise FileNameEncodingError(f"{path}:{n}: {e}") from None
                except UnicodeDecodeError as e:
                    budget.skip(f"{path}:{n}", f"not UTF-8 ({e.reason} at byte {e.start}); save the manifest as "
                                               "UTF-8")
                except json.JSONDecodeError as e:
                    budget.skip(f"{path}:{n}", f"bad JSON ({_json_error(e)})")
                except ValueError as e:
                    budget.skip(f"{path}:{n}", str(e))
            bar.update(total - bar.n)
    if not total:
        raise NoUsableSamplesError(f"manifest {shown(path, LONGEST_PATH)} is empty; it needs one JSON object per "
                                   'line, e.g. {"path": "clips/a.mp4", "caption": "a dog runs"}', [])
    if not samples:
        raise NoUsableSamplesError(f"manifest {shown(path, LONGEST_PATH)} has no usable line ({budget.bad} "
                                   "rejected)", budget.rejects)
    return samples, budget.rejects


def _json_error(e: json.JSONDecodeError) -> str:
    """Where and why a line is not JSON, and the fix when it is not plain: a tab, a line break or a terminal's
    escape pasted raw into a caption is no JSON (json's message for it, "Invalid control character at", read
    "at at column 12")."""
    where = f"{e.msg.removesuffix(' at')} at column {e.colno}"
    if e.msg.startswith("Invalid control character"):
        return (f"{where}: a string holds {e.doc[e.pos]!r} raw; escape it (\\t, \\n, \\u001b), as json.dumps "
                "writes it")
    return where


def _relative_to_cwd(manifest: str, written: str, s: Sample) -> None:
    """A note when the manifest's first file is missing where its path resolves (the manifest's folder) and there
    is such a file from the current folder: a manifest written with paths relative to where its script ran. Every
    sample would be skipped as a missing file, and the reason would not say why."""
    if s.member is None and not os.path.isabs(written) and not os.path.exists(s.path) and os.path.isfile(written):
        echo(f"note: {manifest}: its paths resolve against its own folder, "
             f"{os.path.dirname(os.path.abspath(manifest))}, which has no {written!r}; the current folder has one: "
             "write the manifest's paths relative to its folder, or absolute", file=sys.stderr)


def _line_bar(total: int, path: str, show: bool):
    from ..progress import progress_bar

    return progress_bar(total=total, unit="line", unit_scale=True, desc=f"read {os.path.basename(path)}",
                        disable=not show)


def read_shards(paths: list[str], *, max_bad_share: float = 0.01,
                captions: bool = True) -> tuple[SampleList, list[tuple[str, str]]]:
    """Samples of WebDataset tar shards (one per key) and the rejected keys as (`TAR:KEY`, reason). `captions`: a
    key without a .txt member is rejected (NO_CAPTION); False keeps it as a video-only sample."""
    groups: list[tuple[str, str, dict]] = []
    broken: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for tar_path in paths:
        if not os.path.isfile(tar_path):
            raise FileNotFoundError(f"shard {shown(tar_path, LONGEST_PATH)} does not exist")
        real = os.path.realpath(tar_path)
        if real in seen:  # its samples would be read twice: a weight the user did not ask for
            raise ValueError(f"shard {shown(tar_path, LONGEST_PATH)} is given twice (also as "
                             f"{shown(seen[real], LONGEST_PATH)}); give each shard once")
        seen[real] = tar_path
        tar_path = os.path.abspath(tar_path)
        by_key: dict[str, dict] = {}
        plain_slots: dict[str, set] = {}  # per key, the slots a plain field filled
        names: dict[tuple[str, str], str] = {}  # (key, slot) -> the member that fills it
        members = 0
        try:
            with tarfile.open(tar_path, "r:") as tar:
                for m in tar:
                    members += 1
                    base = os.path.basename(m.name)
                    key, _, field = base.partition(".")
                    key = os.path.join(os.path.dirname(m.name), key)
                    # WebDataset keys end at the first dot, so "clip.v1.mp4" is key "clip", field "v1.mp4":
                    # the member's kind is its last extension. A plain field ("mp4") wins over a compound
                    # one ("preview.mp4") of the same kind, whichever comes first in the tar.
                    slot = _slot(field)
                    unread = _unread_member(m, slot)
                    if not m.isfile() and not unread:  # a folder, or a link of no kind a sample reads
                        continue
                    entry = by_key.setdefault(key, {})
                    if unread:  # the key's reason (dropped without a word, it was "no video or image member")
                        entry.setdefault("unread", unread)
                    if slot is None or unread:
                        continue
                    plain = "." not in field
                    # Per slot: a plain caption settles which of two compound captions is meant, not which video;
                    # two images beside the video that is the sample do not make the key ambiguous.
                    twice = entry.setdefault("twice", {})
                    if slot in entry:
                        if plain == (slot in plain_slots.get(key, ())):  # two plain (or two compound) of a kind
                            both = f"{_member(names[key, slot])} and {_member(m.name)}"
                            twice.setdefault(slot, f"{both} are both its {slot} member")
                        if not plain or slot in plain_slots.get(key, ()):
                            continue
                    if plain:
                        if slot in entry:  # the plain member settles which of the compound ones was meant
                            twice.pop(slot, None)
                        plain_slots.setdefault(key, set()).add(slot)
                    names[key, slot] = m.name
                    if slot not in _MEDIA_SLOTS and m.size > MAX_TEXT_MEMBER:  # read whole: a 1 GB one took 1 GB
                        entry.setdefault("large", f"its {slot} member {_member(m.name)} is {m.size} bytes, over the "
                                                  f"{MAX_TEXT_MEMBER} a caption or .json may be; shorten it")
                    else:
                        entry[slot] = (m.offset_data, m.size, m.name) if slot in _MEDIA_SLOTS else \
                            tar.extractfile(m).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            # A cut or corrupt shard: keep the members before the damage (a video cut with the
            # shard is rejected when read, Sample.source); the rest of the shard is lost. OSError: a header
            # declaring 2**50 bytes, past the largest file the file system holds, made tarfile's seek fail (EINVAL).
            what = _compressed(tar_path) if not members else None
            broken.append((tar_path, f"{what}, not a plain tar: decompress it" if what else
                           f"truncated or not a tar file: read stopped after {members} members ({e})"))
        groups.extend((tar_path, k, v) for k, v in by_key.items())
    budget = BadSampleBudget(total=len(groups) + len(broken), max_share=max_bad_share, what="shard samples",
                             clean=_clean_command(" ".join(shlex.quote(str(p)) for p in paths), captions))
    for where, reason in broken:
        budget.skip(where, reason)
    samples = SampleList()
    for tar_path, key, entry in groups:
        try:
            samples.append(_shard_sample(tar_path, entry, captions))
        except (ValueError, json.JSONDecodeError) as e:
            budget.skip(f"{tar_path}:{key}", str(e))
    if not samples:
        raise NoUsableSamplesError(f"shards {shortened(str(paths), LONGEST_PATH)} hold no usable sample "
                                   f"({budget.bad} rejected)", budget.rejects)
    return samples, budget.rejects


def named_image(name: str) -> bool:
    """Whether a file or member name (a shard's `TAR:MEMBER`) ends in an image extension (IMAGE_EXTENSIONS, in
    any case); a member of no name (`TAR@OFFSET+SIZE`) is not known for one."""
    return _slot(name) == "image"


def _slot(field: str) -> str | None:
    """What a member of a shard key holds, by the last extension of its field: "video", "image", ".txt", ".json", or
    None (another member, ignored)."""
    ext = "." + field.rsplit(".", 1)[-1].lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return ext if ext in (".txt", ".json") else None


# The most bytes a shard's .txt or .json member is read into memory for: a caption is tokenized to 64 tokens.
MAX_TEXT_MEMBER = 1 << 20


def _unread_member(m: tarfile.TarInfo, slot: str | None) -> str | None:
    """Why a key's video, image, caption or .json member `m` is not read, or None. A member that is no plain file
    is never followed (a link's target is a path on the host, or another member) nor opened; a sparse one's bytes
    are not the file's (holes left out), so no byte range of the shard is its video."""
    if slot is None:
        return None
    if m.issym() or m.islnk():
        kind = f"a {'symbolic' if m.issym() else 'hard'} link (to {shown(m.linkname, LONGEST_PATH)})"
    elif m.isfile():
        if m.sparse is None or slot not in _MEDIA_SLOTS:  # tarfile reads a sparse caption whole
            return None
        kind = "a sparse file (tar --sparse)"
    else:
        kind = {tarfile.DIRTYPE: "a directory", tarfile.FIFOTYPE: "a FIFO", tarfile.CHRTYPE: "a device",
                tarfile.BLKTYPE: "a device"}.get(m.type, f"of tar type {m.type!r}")
    return (f"its {slot} member {_member(m.name)} is {kind}, not a plain file: it is not read; a shard holds its "
            "files' bytes (tar --dereference --hard-dereference, without --sparse)")


def _member(name: str) -> str:
    """A shard member's name for a reason: a tar (pax) name has no length limit, and a 1 MB one made as long a
    line; cut as a path is (LONGEST_PATH)."""
    return shortened(name, LONGEST_PATH)


def _shard_sample(tar_path: str, entry: dict, captions: bool) -> Sample:
    for reason in ("large", "unread"):
        if reason in entry:
            raise ValueError(entry[reason])
    media = next((slot for slot in _MEDIA_SLOTS if slot in entry), None)
    twice = [entry["twice"][slot] for slot in (media, ".txt", ".json") if slot in entry.get("twice", {})]
    if twice:  # which one is the sample's is not for the reader to guess
        raise ValueError(f"{twice[0]}; give each key one (a compound field such as KEY.preview.mp4 yields to "
                         "the plain KEY.mp4)")
    if media is None:
        raise ValueError(f"no video or image member (one of {', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)})")
    if ".txt" not in entry and captions:
        raise ValueError(f"no .txt member: {NO_CAPTION}")
    try:
        rec = json_loads(_member_text(entry, ".json")) if ".json" in entry else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"the .json member is not JSON ({_json_error(e)})") from None
    if not isinstance(rec, dict):
        raise ValueError("the .json member must hold an object")
    offset, size, member = entry[media]
    # The .txt member is the caption (a "caption" in the .json is not).
    caption = _member_text(entry, ".txt").strip() if ".txt" in entry else None
    rec.update(path=tar_path, caption=caption, offset=offset, size=size, member=member)
    return sample_from_record(rec, os.path.dirname(tar_path))


def _member_text(entry: dict, slot: str) -> str:
    """The text of a shard key's `.txt` or `.json` member: UTF-8, without a leading byte-order mark (Notepad's UTF-8
    has one), which was a caption's first character, a piece of its own to the tokenizer
    (an <unk> with the shared test_spm.model)."""
    try:
        return entry[slot].decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        what = "the caption" if slot == ".txt" else "start, end, label, dataset"
        raise ValueError(f"the {slot} member ({what}) is not UTF-8 ({e.reason} at byte {e.start}); save it as "
                         "UTF-8") from None


# The magic numbers of the compressions tar archives ship in (.tar.gz, .tar.bz2, .tar.xz, .tar.zst).
_COMPRESSIONS = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _compressed(path: str) -> str | None:
    """'a gzip-compressed file' (bzip2, xz, zstd) when `path` starts with such a stream, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:  # the reader that opens it says why
        return None
    return next((f"a {name}-compressed file" for magic, name in _COMPRESSIONS.items() if head.startswith(magic)),
                None)


def is_shard(path: str) -> bool:
    """Whether `path` names a WebDataset shard: a .tar, in any case (a shard written on a case-insensitive file
    system, "SHARD-000.TAR")."""
    return os.fspath(path).lower().endswith(".tar")


def read_source(source: str | list[str], *, max_bad_share: float = 0.01, captions: bool = True):
    """A manifest (.jsonl) or a list of shards (.tar), chosen by extension. `captions`: read_manifest's."""
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    paths = [os.fspath(p) for p in paths]
    for p in paths:
        if not is_shard(p) and _compressed(p):  # else "a binary file, not a JSONL manifest"
            raise ValueError(f"{p} is {_compressed(p)}: manifests and shards are read uncompressed (a shard's "
                             "videos in place, by byte ranges); decompress it and pass the .jsonl or .tar")
    if paths and all(is_shard(p) for p in paths):
        return read_shards(paths, max_bad_share=max_bad_share, captions=captions)
    if len(paths) == 1:
        return read_manifest(paths[0], max_bad_share=max_bad_share, captions=captions)
    raise ValueError(f"data source must be one .jsonl manifest or a list of .tar shards, got "
                     f"{shortened(str(paths), LONGEST_PATH)}")
