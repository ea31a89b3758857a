"""Paths of the commands: output folders created up front with an error that names the option, outputs that
are no input, files written whole (or not at all) and JSON standard, and which files are our weights."""
from __future__ import annotations

import json
import math
import os
import sys
import unicodedata
from contextlib import contextmanager


def is_safetensors(path: str | None) -> bool:
    """Whether `path` names our weights format (which carries its config) by its extension, in any case, as
    load_checkpoint tells the formats apart."""
    return path is not None and os.path.splitext(os.fspath(path))[1].lower() == ".safetensors"


def printable(text: str) -> str:
    """`text` with its control characters (C0, DEL, C1) escaped as Python writes them ("\\n", "\\x1b"): a file name,
    shard member or caption printed to a terminal or a log could otherwise move the cursor, colour or retitle the
    terminal, or start a line of its own (a name holding "\\nerror: ..." forged an error line)."""
    if text.isprintable():  # the common case, unchanged (a space is printable; no other whitespace is)
        return text
    return "".join(_escape(ch) for ch in text)


# Linux's PATH_MAX: a path limit for shown/shortened, which prints any path the system takes whole and cuts only an
# absurd one (a 1 MB typo or paste).
LONGEST_PATH = 4096


def shortened(text: str, limit: int = 80) -> str:
    """`text` (a value as a message writes it) whole when it is at most `limit` characters, else its start and its
    length: an error or a note names the bad value recognisably in one readable line. Whole, a 1 MB override, config
    value or key made a 1 MB "line" that flooded the terminal and a scheduler's log."""
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} characters)"


def shown(value, limit: int = 80) -> str:
    """The repr of a user's value (a config field's, an override's, a file's) for a message, shortened."""
    try:
        return shortened(repr(value), limit)
    except RecursionError:  # a list nested thousands deep (JSON, a literal) has no repr
        return f"a {type(value).__name__} nested too deep to print"


def shown_each(items, most: int = 10) -> str:
    """A list of a user's names (a file's unknown keys or fields) as its repr writes it, each shown: a key of 100 kB
    or 10^5 of them made a line as long; past `most` items the count stands for the rest."""
    head = ", ".join(shown(item) for item in items[:most])
    return f"[{head}]" if len(items) <= most else f"[{head}, ...] ({len(items)} in all)"


def listed(name: str) -> str:
    """`name` as one line of a listing of rows (embed's F.videos.txt, a .safetensors' `videos` or `texts`): its
    backslashes doubled, then its control characters escaped (printable). Without the doubling a file named with a
    backslash and an n read back as one named with a newline; now
    `line.encode("latin-1", "backslashreplace").decode("unicode_escape")` is the name, whatever it holds."""
    return printable(name.replace("\\", "\\\\"))


def echo(text: str, file=None, flush: bool = False) -> None:
    """`print(text)` with its control characters escaped (printable): the way a command says a line that holds a
    user's string (a path, a sample's or shard member's name, a label, an error's message). The whole line is one
    line: a message of its own never holds a control character."""
    print(printable(text), file=file, flush=flush)


_NOTED: set[str] = set()


def note_once(message: str, key: str | None = None) -> None:
    """`note: message` on stderr once a process for `key` (default: the message itself), and on rank 0 only: every
    rank reads the same manifests, and one command may read a manifest twice (eval probe: its labels, then its
    clips); every rank loads the same extension (videoprism.ops.native)."""
    key = message if key is None else key
    if key in _NOTED or os.environ.get("RANK", "0") != "0":
        return
    _NOTED.add(key)
    echo(f"note: {message}", file=sys.stderr)


def _escape(ch: str) -> str:
    if ch == " " or ch.isprintable() or unicodedata.category(ch) != "Cc":  # Cf (a zero-width joiner) is kept
        return ch
    return repr(ch)[1:-1]


def make_folder(folder: str, option: str) -> None:
    """`os.makedirs(folder, exist_ok=True)`, before any work: a path that cannot be a folder (a file
    where one of its folders should be: "File exists" names neither) fails now with one OSError line
    naming `option` (e.g. "--out runs/x.npy"), not at the end of the run."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(f"{option}: cannot create its folder {folder} ({e.strerror}: {e.filename}); pick another "
                      "path") from None
    if not os.access(folder, os.W_OK):
        raise OSError(f"{option}: cannot write to {folder}; pick another path")


def check_out_file(path: str, option: str, want: str = "a file path in it") -> None:
    """The output file `option` names can be written, checked before any work: not a folder, its folder
    made (make_folder)."""
    if os.path.isdir(path):
        raise ValueError(f"{option}: is a folder; pass {want}")
    make_folder(os.path.dirname(os.path.abspath(path)), option)


def read_text(path: str, option: str, want: str) -> str:
    """The text of the file a user gave with `option` (`want`: what to pass instead, for the error), for the lines,
    JSON or TOML in it: UTF-8, a byte-order mark (Notepad writes one) dropped, newlines as Python reads them. A
    missing file, a folder or another encoding is one line naming the file and the fix, not "'utf-8' codec can't
    decode byte 0xff in position 0"."""
    if not os.path.isfile(path):
        raise ValueError(f"{option} {path}: {'a folder' if os.path.isdir(path) else 'no such file'}; pass {want}")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:  # bytes decoded here: the offset is the file's (utf-8-sig's counts from after a byte-order mark)
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save "
                         "it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as a text-mode read gives a Windows file's lines


def check_not_an_input(path: str, option: str, inputs: list[tuple[str, str | None]]) -> None:
    """The output file `option` names is none of the command's `inputs` ((what, path) pairs): writing it would
    destroy what the command reads (the weights of `--checkpoint` replaced by embeddings)."""
    own = os.path.realpath(path)
    for name, given in inputs:
        if given is not None and os.path.realpath(given) == own:
            raise ValueError(f"{option}: is the input {name} {given}; writing it would replace what this command "
                             "reads: pick another output path")


def new_file_mode() -> int:
    """The permission bits `open()` gives a new file here (0o666 less the umask): for files a library writes as
    0o600 (safetensors' save_file renames a private temporary file), so weights on a shared cluster stay readable
    to whom the user's umask lets read them. The umask is read from /proc, not set and reset (a thread creating a
    file between the two calls would get the wrong mode)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def json_loads(text: str | bytes):
    """json.loads, where arrays or objects nested past Python's recursion limit (a line of 100000 "[") are a
    JSONDecodeError like any other bad JSON: json raises RecursionError for them, which escaped every reader's
    `except ValueError` (a manifest's line, a shard's .json, a pack's or a journal's header, a checkpoint's metadata)
    as a traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("arrays or objects nested too deep to read", "", 0) from None


def finite_or_null(obj):
    """`obj` (JSON values) with every non-finite float (a skipped step's NaN loss, an inf gradient norm) as None,
    to be written with allow_nan=False: what json.dumps writes for it, NaN or Infinity, is no JSON, and JavaScript's
    JSON.parse, Rust's serde_json and Go's encoding/json refuse the whole file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


@contextmanager
def atomic_path(path: str, *, sync: bool = True):
    """A temporary path beside `path` for a writer that takes a file name (safetensors, PyAV, a figure), moved to
    `path` once the block ends: a kill, a full disk or any error mid-write leaves the previous file (or none), never
    a cut one under the final name, and no temporary file but a SIGKILL's. The temporary name is this process's own
    (two processes writing one path never write into one file). `sync`: the data is on disk before the rename, so
    a power loss after it finds the new file whole, not empty (the rename can reach the disk before the data)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        if sync:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # a partial file would hold the space the user frees


@contextmanager
def atomic_file(path: str, mode: str = "w", **kw):
    """`open(path, mode)` ("w" or "wb", `kw` as open's) written whole or not at all, as `atomic_path`."""
    with atomic_path(path, sync=False) as tmp:
        with open(tmp, mode, **kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def fsync_path(path: str) -> None:
    """os.fsync of the file or folder `path` (a folder: the renames in it reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj, *, indent: int = 1) -> None:
    """`obj` as JSON in `path`, whole or not at all (`atomic_file`): a kill or a full disk mid-write leaves the
    previous file (a run's config.json, a result an earlier run saved), never a truncated one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path, "w", encoding="utf-8") as fh:
        json.dump(finite_or_null(obj), fh, indent=indent, allow_nan=False)
        fh.write("\n")
