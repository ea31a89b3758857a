"""bench/dali_wheel.sh's machine side (status, install) on a stand-in pack: what runs on the lent GPU machine
before DALI does, so a mistake there would cost a device call. The real pack (prepare) needs the 190 MiB wheel."""
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None,
                                reason="needs bash and sha256sum")


def make_pack(repo, tag=TAG, chunks=2):
    """A pack as prepare writes it: an install tree holding a stand-in nvidia.dali, as .tar.xz, in chunks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in (("./nvidia/dali/__init__.py", "__version__ = '9.9.9'\n"),
                           ("./nvidia_dali_cuda130-9.9.9.dist-info/METADATA", "Name: nvidia-dali-cuda130\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    data = buf.getvalue()
    name = f"nvidia_dali_cuda130-9.9.9-{tag}-sm90.tar.xz"
    folder = repo / ".whl" / "dali"
    folder.mkdir(parents=True)
    step = -(-len(data) // chunks)
    lines = [f"{hashlib.sha256(data).hexdigest()}  {name}"]
    for i in range(chunks):
        part = data[i * step:(i + 1) * step]
        (folder / f"part-{i:02d}").write_bytes(part)
        lines.append(f"{hashlib.sha256(part).hexdigest()}  part-{i:02d}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return folder


def run(repo, cmd, site):
    env = {**os.environ, "PY": sys.executable, "DALI_SITE": str(site), "PATH": "/usr/bin:/bin"}  # no nvidia-smi
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(repo / "bench" / "dali_wheel.sh"), cmd], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "repo" / "bench").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "bench", "dali_wheel.sh"), tmp_path / "repo" / "bench")
    (tmp_path / "repo" / ".whl" / "deps").mkdir(parents=True)
    return tmp_path / "repo"


def test_install_joins_checks_and_unpacks_the_pack(repo, tmp_path):
    make_pack(repo)
    site = tmp_path / "site"
    r = run(repo, "status", site)
    assert r.returncode == 0 and r.stdout.count(": ok") == 2, r.stdout + r.stderr
    r = run(repo, "install", site)
    assert r.returncode == 0, r.stderr
    assert f"nvidia.dali 9.9.9 from {site}/nvidia/dali" in r.stdout and f"export PYTHONPATH={site}" in r.stdout
    assert (site / "nvidia_dali_cuda130-9.9.9.dist-info" / "METADATA").is_file()
    r = run(repo, "install", site)  # a second call finds it in place
    assert r.returncode == 0 and "already installed" in r.stdout, r.stderr


def test_an_unpack_cut_short_is_done_again(repo, tmp_path):
    """A call cut while unpacking leaves the package's folders but not the whole tree: the next call unpacks."""
    make_pack(repo)
    site = tmp_path / "site"
    (site / "nvidia" / "dali").mkdir(parents=True)
    (site / "nvidia_dali_cuda130-9.9.9.dist-info").mkdir()
    r = run(repo, "install", site)
    assert r.returncode == 0 and "unpacked" in r.stdout and "already installed" not in r.stdout, r.stderr
    assert (site / "nvidia" / "dali" / "__init__.py").is_file()


def test_missing_or_damaged_chunks_are_named(repo, tmp_path):
    folder = make_pack(repo)
    (folder / "part-01").unlink()
    r = run(repo, "status", tmp_path / "site")
    assert r.returncode == 1 and "missing chunk .whl/dali/part-01 (2 of 2)" in r.stderr
    r = run(repo, "install", tmp_path / "site")
    assert r.returncode == 2 and "chunks missing" in r.stderr and not (tmp_path / "site").exists()
    (folder / "part-01").write_bytes(b"not the chunk")
    r = run(repo, "status", tmp_path / "site")
    assert r.returncode == 1 and "damaged chunk .whl/dali/part-01" in r.stderr


def test_a_pack_for_another_python_is_refused_with_the_fix(repo, tmp_path):
    make_pack(repo, tag="cp39")
    r = run(repo, "install", tmp_path / "site")
    assert r.returncode == 2 and f"holds DALI for cp39, this" in r.stderr and f"is {TAG}" in r.stderr, r.stderr
    assert not (tmp_path / "site").exists()


def test_shim_runs_the_benchmark_without_the_extension(tmp_path):
    """`gpu` on a machine where the extension is not built imports videoprism through `shim`: bench.data and the
    data layer must load from it alone (the editable install's finder, which would hide a missing module, removed;
    videoprism._C made unimportable)."""
    env = {**os.environ, "DALI_SHIM": str(tmp_path / "shim")}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "dali_wheel.sh"), "shim"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    shim = r.stdout.strip().splitlines()[-1]
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
            "sys.modules['videoprism._C'] = None  # import fails: not built\n"
            "import runpy, videoprism, videoprism.data.dali_pipeline, videoprism.data.loader\n"
            "assert videoprism.__file__.startswith(sys.argv[1]), videoprism.__file__\n"
            "sys.argv = ['bench.data', '--help']\n"
            "runpy.run_module('bench.data', run_name='__main__')\n")
    # Run from elsewhere so that the repo is on the path only after the shim (`-P`, which the script uses on the
    # GPU machines' Python 3.12, is Python >= 3.11: 3.10 refused it with "Unknown option: -P").
    r = subprocess.run([sys.executable, "-c", code, shim], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": f"{shim}:{ROOT}"})
    assert r.returncode == 0 and "--clips" in r.stdout, r.stderr[-2000:]
