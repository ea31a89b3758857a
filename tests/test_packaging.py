"""What pip builds and installs: the sdist holds what the extension's build needs, and the installed
packages import nothing that pyproject.toml does not declare."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
INSTALLED = ("videoprism", "train", "kernels")  # train/ and kernels/ install as videoprism.train / .kernels
# Not [project] dependencies: flash-attn (attention backend 'flash', imported when chosen), DALI (the `dali`
# extra: nvidia.dali), Triton (a dependency of torch's CUDA builds, which the extension is built against).
OPTIONAL = {"flash_attn", "nvidia", "triton"}


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


def test_runtime_imports_are_dependencies():
    """Every third-party module the installed packages import is a declared dependency: matplotlib (every
    training run plots its curves) was only in the test extra, so an installed run failed at its end."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    declared = {_dist_name(r) for r in project["dependencies"]}
    imported = {}
    for top in INSTALLED:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    with open(path, encoding="utf-8") as fh:
                        tree = ast.parse(fh.read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            names = [a.name for a in node.names]
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            names = [node.module]
                        else:
                            continue
                        for name in names:
                            imported.setdefault(name.split(".")[0], os.path.relpath(path, ROOT))
    third_party = {m: p for m, p in imported.items()
                   if m not in sys.stdlib_module_names and m not in OPTIONAL and m != "videoprism"}
    missing = {m: p for m, p in third_party.items() if m not in declared}  # import names = distribution names here
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def _dist_name(requirement: str) -> str:
    for sep in "<>=!~;[ ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()
