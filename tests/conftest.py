"""Shared test fixtures: the golden data of ../shared (read in place, never copied) and the GPU marker."""
from __future__ import annotations

import importlib.metadata
import json
import os

# Triton kernels run in the interpreter where there is no GPU; it must be chosen
# before triton is first imported.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One tile config per kernel instead of the search (a compile per candidate): the GPU tests
# check correctness, and every candidate config computes the same function.
os.environ.setdefault("VIDEOPRISM_TRITON_AUTOTUNE", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = os.environ.get("VIDEOPRISM_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
GOLDEN = os.path.join(SHARED, "golden", "visible")
MEDIA = os.path.join(SHARED, "media")


def pytest_configure(config):
    """Triton 3.6's interpreter (torch 2.11's Triton, the CPU tests of the Triton kernels) turns
    one-element arrays into Python ints, which numpy 2.4 refuses: dozens of kernel tests would fail
    with a TypeError deep in Triton. Say so once instead (3.8 with numpy 2.4 is fine)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return
    if _release(triton_version) < (3, 7) and _release(np.__version__) >= (2, 4):
        raise pytest.UsageError(f"Triton {triton_version}'s interpreter, which runs the Triton kernel tests on the CPU, "
                                f"needs numpy < 2.4 (this is {np.__version__}): pip install 'numpy<2.4'")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_pos(B: int, T: int, K: int, N: int, gen: torch.Generator) -> torch.Tensor:
    """A masked-video pos map [B, T, K] for the attention tests: K sorted visible spatial indices out of N, per
    frame (a random visible set in each frame, as the masked time axis takes)."""
    return torch.stack([torch.stack([torch.randperm(N, generator=gen)[:K].sort().values for _ in range(T)])
                        for _ in range(B)])


def child_pids() -> set[int]:
    """The pids of this process's multiprocessing children (pools, DataLoader workers) now."""
    import multiprocessing

    return {child.pid for child in multiprocessing.active_children()}


def still_running(since: set[int], within: float) -> list[int]:
    """The multiprocessing children started after `since` (child_pids() then) that still run after waiting up to
    `within` seconds for them to end. By the process's state (/proc), not a Process object's exit code: the pool's
    own thread may reap a worker as it breaks, and the object then reads None for a while; and by pids new since
    `since`: an earlier test's DataLoader workers, still waiting for their iterator's collection, are not ours."""
    import time

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie awaits only its reaping
        except FileNotFoundError:
            return False

    pids, deadline = child_pids() - since, time.monotonic() + within
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if running(pid)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images or videos (any shapes that broadcast)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def _need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: the shared golden/media data exists only on our machines and in CI")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> str:
    return _need(GOLDEN)


@pytest.fixture(scope="session")
def media_dir() -> str:
    return _need(MEDIA)


@pytest.fixture(scope="session")
def golden_config(golden_dir) -> dict:
    with open(os.path.join(golden_dir, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def golden_inputs(golden_dir) -> dict[str, torch.Tensor]:
    with np.load(os.path.join(golden_dir, "inputs.npz")) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def golden_overrides(section: dict) -> dict:
    """Official config fields of a golden model section (drops the non-field keys)."""
    keep = ("patch_size", "pos_emb_shape", "model_dim", "num_spatial_layers", "num_temporal_layers", "num_heads",
            "mlp_dim", "atten_logit_cap", "vocabulary_size", "num_unimodal_layers", "num_auxiliary_layers",
            "enable_causal_atten")
    return {k: v for k, v in section.items() if k in keep}


class _FullDiskFile:
    """A file open for writing whose first write lands half its data, then fails as on a full disk (ENOSPC)."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        import errno

        self._fh.write(data[:len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk(part)`: from now on, a file whose path holds `part` and is opened for writing (by `open`, as
    np.save, json and our writers open files) fails half-way through its first write with ENOSPC."""
    import builtins

    real_open = builtins.open

    def fail_on(part: str) -> None:
        def fake_open(file, mode="r", *a, **k):
            fh = real_open(file, mode, *a, **k)
            named = isinstance(file, (str, bytes, os.PathLike)) and part in os.fsdecode(file)
            return _FullDiskFile(fh) if named and ("w" in mode or "a" in mode) else fh

        monkeypatch.setattr(builtins, "open", fake_open)

    return fail_on


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A one-rank gloo process group (the default one) for the test, destroyed after it. init_process_group also
    wraps sys.excepthook to prefix "[rank0]: ", and destroy_process_group leaves it wrapped: each such test added a
    wrapper around the hook of every later test in the process."""
    import sys

    import torch.distributed as dist

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# Prepended to the scripts of the peak-memory tests (run in a fresh interpreter): the process's own high-water mark
# over a stretch of its work. Not ru_maxrss: Linux carries it across fork and exec, so a child of a pytest holding
# 1 GB read that 1 GB as its own peak (a decode test failed with "1104 MB", and below such a parent a test of a
# peak's growth could not fail).
PEAK_MEMORY = """
def _status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:  # "5": the high-water mark (VmHWM) starts again from the RSS
        f.write("5")
    return _status_bytes("VmRSS:")


def peak_since(rss):
    return _status_bytes("VmHWM:") - rss
"""
