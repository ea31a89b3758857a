"""Every Triton kernel compiles to a cubin for the GPUs we ship for (sm_80, sm_90), checked on
a machine without a GPU: the interpreter the rest of the CPU suite uses never runs the
compiler (tools/triton_compile_check.py says how the launches are recorded and replayed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIDEOPRISM_TRITON_AUTOTUNE")}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.triton_compile_check", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)


@triton.jit
def _early_exit_kernel(a_ptr, out_ptr, n, N: tl.constexpr):
    """Runs in the interpreter (plain Python), but Triton's compiler has no `break`."""
    i = tl.arange(0, N)
    acc = tl.zeros((N,), dtype=tl.float32)
    for k in range(n):
        if k == 4:
            break
        acc += tl.load(a_ptr + k * N + i)
    tl.store(out_ptr + i, acc)


def test_every_kernel_compiles_for_sm80_and_sm90():
    r = _run("--coverage", "smoke", "--arch", "80", "--arch", "90")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # Each kernel module took part (a recording that silently lost a module would pass).
    for name in ("_space_fwd_kernel", "_space_bwd_dkdv_kernel", "_time_bwd_kernel", "_scatter_tokens_fwd_kernel",
                 "_shuffle_tokens_bwd_kernel", "_patchify_gather_fwd_kernel", "_gather_tokens_fwd_kernel",
                 "_bevt_accept_kernel"):
        assert name in r.stdout, name
    assert "0 failed" in r.stdout


def test_a_kernel_the_compiler_rejects_fails_the_check(tmp_path):
    launches = tmp_path / "launches.json"
    launches.write_text(json.dumps([{"module": __name__, "name": "_early_exit_kernel",
                                     "args": [{"tensor": "float32"}, {"tensor": "float32"}, 8], "kwargs": {"N": 16}}]))
    r = _run("--phase", "compile", "--launches", str(launches))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL  sm_90 _early_exit_kernel" in r.stdout and "1 failed" in r.stdout
