"""The fingerprint of the extension's sources (csrc/), which setup.py builds into videoprism._C (`_C.sources`) and
videoprism/ops/native.py compares with a checkout's csrc/: a library built before the sources changed (a `git pull`
after `pip install -e .`, which rebuilds nothing) ran its old kernels with no word. No imports beyond the standard
library: setup.py loads this file by its path, before the package can be imported."""
from __future__ import annotations

import hashlib
import os


# What the build compiles or includes: an editor's backup or swap file beside them is not a change of sources.
SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def sources_digest(csrc: str) -> str:
    """The first 16 hex digits of a SHA-256 over the source files of `csrc` (SUFFIXES), names and contents (a bare
    token: setup.py passes it as a -D value)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(csrc)):
        path = os.path.join(csrc, name)
        if name.endswith(SUFFIXES) and not name.startswith(".") and os.path.isfile(path):
            with open(path, "rb") as fh:
                h.update(f"{name}\0{os.path.getsize(path)}\0".encode())
                h.update(fh.read())
    return h.hexdigest()[:16]
