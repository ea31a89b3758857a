"""What pip builds and installs: the sdist holds what the extension's build needs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.join(os.path.dirname(__file__), "..")
INSTALLED = ("videoprism", "train", "kernels")  # train/ and kernels/ install as videoprism.train / .kernels


def test_sdist_has_extension_sources(tmp_path):
    """A wheel built from the sdist compiles csrc/: its headers (token_ops.h) and, from an sdist made on a
    machine without CUDA, its .cu file were left out, and the build failed with "token_ops.h: No such file"."""
    src = tmp_path / "src"  # a copy: sdist writes its egg-info and release tree into the source folder
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    for d in ("csrc", *INSTALLED):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "VIDEOPRISM_NO_CUDA": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, env=env,
                   check=True, capture_output=True)
    (sdist,) = (tmp_path / "dist").iterdir()
    with tarfile.open(sdist) as tar:
        have = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {f"csrc/{f}" for f in os.listdir(os.path.join(ROOT, "csrc"))}
    assert want <= have, f"missing from the sdist: {sorted(want - have)}"
