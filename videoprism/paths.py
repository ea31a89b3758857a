"""Output folders of the commands, created up front with an error that names the option."""
from __future__ import annotations

import os


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
