"""What pip builds and installs: the sdist holds what the extension's build needs, and the installed
packages import nothing that pyproject.toml does not declare."""
from __future__ import annotations

import ast
import importlib.machinery
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from videoprism.train.config import toml_reader

ROOT = os.path.join(os.path.dirname(__file__), "..")
INSTALLED = ("videoprism", "train", "kernels")  # train/ and kernels/ install as videoprism.train / .kernels
# Not [project] dependencies: flash-attn (attention backend 'flash', imported when chosen), DALI (the `dali`
# extra: nvidia.dali), Triton (a dependency of torch's CUDA builds, which the extension is built against).
OPTIONAL = {"flash_attn", "nvidia", "triton"}
# tomllib joined the standard library in 3.11; on 3.10 train/config.py imports tomli (declared for < 3.11) instead.
STDLIB = sys.stdlib_module_names | {"tomllib"}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tarfile.TarFile:
    """The sdist `setup.py sdist` makes of a copy of the sources (sdist writes its egg-info and release tree into
    the source folder), with its egg-info: what pip builds a wheel from and installs."""
    tmp_path = tmp_path_factory.mktemp("sdist")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    for d in ("csrc", *INSTALLED):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "VIDEOPRISM_NO_CUDA": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, env=env,
                   check=True, capture_output=True)
    (path,) = (tmp_path / "dist").iterdir()
    with tarfile.open(path) as tar:
        yield tar


def _member(tar: tarfile.TarFile, name: str) -> str:
    """The text of the sdist's file `name` (a path below its top folder)."""
    (member,) = [m for m in tar.getmembers() if m.name.split("/", 1)[-1] == name]
    return tar.extractfile(member).read().decode()


def test_sdist_has_extension_sources(sdist):
    """A wheel built from the sdist compiles csrc/: its headers (token_ops.h) and, from an sdist made on a
    machine without CUDA, its .cu file were left out, and the build failed with "token_ops.h: No such file"."""
    have = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    want = {f"csrc/{f}" for f in os.listdir(os.path.join(ROOT, "csrc"))}
    assert want <= have, f"missing from the sdist: {sorted(want - have)}"


def test_the_only_installed_top_level_module_is_videoprism(sdist):
    """DESIGN 2: no installed top-level module takes a generic name (kernels, train, bench collide with other PyPI
    packages); kernels/ and train/ install as videoprism.kernels and videoprism.train, and the training stages run
    as console scripts. The egg-info's top_level.txt is what a wheel installs at the top of site-packages."""
    assert _member(sdist, "videoprism_fast.egg-info/top_level.txt").split() == ["videoprism"]
    sources = _member(sdist, "videoprism_fast.egg-info/SOURCES.txt").split()
    assert "kernels/token_ops_ref.py" in sources and "train/stage1.py" in sources  # shipped, under videoprism.*
    scripts = _member(sdist, "videoprism_fast.egg-info/entry_points.txt")
    for target in ("videoprism.cli:main", "videoprism.train.stage1:main", "videoprism.train.stage2:main"):
        assert target in scripts, scripts


def test_runtime_imports_are_dependencies():
    """Every third-party module the installed packages import is a declared dependency: matplotlib (every
    training run plots its curves) was only in the test extra, so an installed run failed at its end."""
    pyproject = os.path.join(ROOT, "pyproject.toml")
    with open(pyproject, "rb") as fh:
        project = toml_reader(pyproject).load(fh)["project"]
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
                   if m not in STDLIB and m not in OPTIONAL and m != "videoprism"}
    missing = {m: p for m, p in third_party.items() if m not in declared}  # import names = distribution names here
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def _dist_name(requirement: str) -> str:
    for sep in "<>=!~;[ ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()


NO_TRITON = """
import sys
sys.modules["triton"] = None  # what a CPU-only torch build (PyTorch's CPU index, macOS) has: no Triton
import pytest, torch
import videoprism as vp
from videoprism import ops
from videoprism.train import evaluate, pipeline, stage1, stage2  # noqa: F401
small = dict(model_dim=32, num_heads=2, mlp_dim=64, num_spatial_layers=1, num_temporal_layers=1, patch_size=8,
             pos_emb_shape=(2, 4, 4))
enc = vp.from_official("videoprism_v1_base", **small)
video = torch.randint(0, 255, (2, 2, 32, 32, 3), dtype=torch.uint8)
tokens, _ = enc(video, pos=vp.masking.bevt_mask(2, 2, (4, 4), 0.5, seed=0))
tokens.sum().backward()
x, idx = torch.randn(2, 5, 3), torch.tensor([[0, 4], [1, 1]])
assert torch.equal(ops.gather_tokens(x, idx), x[torch.arange(2)[:, None], idx])
for call in (lambda: ops.gather_tokens(x, idx, backend="triton"),
             lambda: vp.from_official("videoprism_v1_base", attention_backend="triton", **small)(video)):
    with pytest.raises(ValueError, match="Triton|triton"):
        call()
print("ok")
"""


def test_cpu_path_needs_no_triton():
    """A torch without Triton (its CPU-only builds) runs the CPU path: the model, masks, token ops and the
    training modules import and run; asking for a Triton backend is a clear error. The token ops' references
    sat in the Triton kernel files, so `import videoprism` failed there."""
    r = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# Collects the suite with PyAV and DALI unimportable, as on the GPU machines.
COLLECT_WITHOUT_PYAV = """
import sys
import pytest


class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "av" or name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")


sys.meta_path.insert(0, Hide())
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[1]]))
"""


def test_suite_collects_without_pyav_or_dali():
    """The GPU machines have neither PyAV nor DALI: a test module that imports either (or a videoprism module that
    does) at its top must skip there, not fail to collect. Two that did interrupted `pytest -m gpu` over the whole
    suite there before it ran a test."""
    r = subprocess.run([sys.executable, "-c", COLLECT_WITHOUT_PYAV, os.path.join(ROOT, "tests")], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


STALE_EXTENSION = """
import sys
# The copy on its own, as an installed one: a checkout's editable install (pip install -e) adds a finder that would
# hand `videoprism._C` the checkout's library.
sys.meta_path = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
import pytest, torch
from videoprism import ops
from videoprism.kernels import token_ops_ref
x, idx = torch.randn(2, 5, 3), torch.tensor([[0, 4], [1, 1]])
assert torch.equal(ops.gather_tokens(x, idx), token_ops_ref.gather_tokens_ref(x, idx))
with pytest.raises(ValueError, match="backend 'cpp' runs the kernels of videoprism._C, which "):
    ops.gather_tokens(x, idx, backend="cpp")
print("ok")
"""


@pytest.mark.parametrize("kind", ["missing", "other torch"])
def test_a_missing_or_stale_extension_says_one_line(tmp_path, kind):
    """A copy without its compiled extension (never built) or with one built against another torch (the loader's
    undefined symbol, here a library that needs a symbol nothing defines) imports, runs the token ops on their
    references and says so in one line: `import videoprism` raised "cannot import name '_C' from partially
    initialized module" or the loader's undefined-symbol error, a traceback before any command could start."""
    pkg = tmp_path / "videoprism"
    # Laid out as installed (setup.py's package_dir): kernels/ and train/ as videoprism.kernels and .train.
    skip = shutil.ignore_patterns("__pycache__", "_C*.so", "kernels", "train")
    shutil.copytree(os.path.join(ROOT, "videoprism"), pkg, ignore=skip)
    for sub in ("kernels", "train"):
        shutil.copytree(os.path.join(ROOT, sub), pkg / sub, ignore=shutil.ignore_patterns("__pycache__"))
    if kind == "other torch":
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            pytest.skip("needs a C compiler")
        (tmp_path / "old.c").write_text("extern void _ZN3c1010old_symbolEv(void);\n"
                                        "void *PyInit__C(void) { _ZN3c1010old_symbolEv(); return 0; }\n")
        library = pkg / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
        subprocess.run([compiler, "-shared", "-fPIC", str(tmp_path / "old.c"), "-o", str(library)], check=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", STALE_EXTENSION], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: videoprism._C "), r.stderr[-3000:]
    why = "is not built" if kind == "missing" else "undefined symbol: _ZN3c1010old_symbolEv"
    assert why in lines[0] and "plain-PyTorch references" in lines[0] and "pip install" in lines[0], lines[0]


def test_an_extension_built_from_older_sources_is_named(monkeypatch):
    """A library that loads but lacks an op the Python side calls (built before csrc/ gained it) is named with the
    op: its first call raised "No such operator videoprism::..." deep inside a training step."""
    from videoprism.ops import native, token_ops

    assert native.MISSING is None and token_ops.default_backend(torch.device("cpu")) == "cpp"  # this build is whole
    monkeypatch.setattr(native, "OPS", (*native.OPS, "newer_tokens_native"))
    why = native._load()
    assert why is not None and "lacks newer_tokens_native" in why, why
    monkeypatch.setattr(native, "MISSING", why)
    assert token_ops.default_backend(torch.device("cpu")) == "reference"
    x, idx = torch.randn(2, 5, 3), torch.tensor([[0, 4], [1, 1]])
    with pytest.raises(ValueError, match="lacks newer_tokens_native"):
        token_ops.gather_tokens(x, idx, backend="cpp")


def test_a_build_from_other_sources_is_named(tmp_path, monkeypatch):
    """A checkout's library built before its csrc/ changed (a `git pull` after `pip install -e .`, which rebuilds
    nothing) is named: it ran its old kernels with no word. Its csrc/ as built reads as current; one changed byte
    does not. An editor's swap or backup file beside the sources is not a change of them."""
    from videoprism.ops import native

    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    monkeypatch.setattr(native, "_PACKAGE", str(tmp_path / "videoprism"))
    (tmp_path / "csrc" / "ops.cpp").write_text("another project's source")
    assert native._stale() is None  # no setup.py beside it: another distribution's csrc/ in a site-packages
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path / "setup.py")
    assert native._stale() is not None  # a checkout's changed sources
    shutil.copy(os.path.join(ROOT, "csrc", "ops.cpp"), tmp_path / "csrc" / "ops.cpp")
    assert native._stale() is None, "this checkout's library was not built from its csrc/: rebuild it"
    for backup in (".ops.cpp.swp", "ops.cpp~", "ops.cpp.orig"):
        (tmp_path / "csrc" / backup).write_text("an editor's copy")
    assert native._stale() is None
    ops_cpp = tmp_path / "csrc" / "ops.cpp"
    ops_cpp.write_text(ops_cpp.read_text() + "\n")
    assert native._stale() == f"was built from other sources than {tmp_path / 'csrc'}"
