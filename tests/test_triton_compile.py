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


def _env(tmp_path) -> dict:
    """The compiler's environment: Triton's cache in the test's folder, not the user's ~/.triton/cache (15 MB of
    cubins, 39 folders, left behind by every run of this file)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIDEOPRISM_TRITON_AUTOTUNE")}
    return {**env, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.triton_compile_check", *args], cwd=ROOT, env=_env(tmp_path),
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


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    report = tmp_path / "kernels.json"
    r = _run(tmp_path, "--coverage", "smoke", "--arch", "80", "--arch", "90", "--json", str(report))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # Each kernel module took part (a recording that silently lost a module would pass).
    for name in ("_space_fwd_kernel", "_space_bwd_dkdv_kernel", "_time_bwd_kernel", "_scatter_tokens_fwd_kernel",
                 "_shuffle_tokens_bwd_kernel", "_patchify_gather_fwd_kernel", "_gather_tokens_fwd_kernel",
                 "_bevt_accept_kernel"):
        assert name in r.stdout, name
    assert "0 failed" in r.stdout
    _check_space_forward_loop(json.loads(report.read_text())["kernels"])


def _check_space_forward_loop(rows):
    """The capped bf16 space forward on sm_90 issues at most 2 MUFU ops per score element
    (its exp2 and the hardware tanh) and at most 18 instructions in all (15.5 with
    Triton 3.6 and 3.8; the margin is for other compiler versions): at head dim 64 one MUFU op
    an element already takes as long as the element's share of the two MMAs, so the cap's
    accurate software tanh (3 MUFU and ~42 instructions an element) made the loop 5x slower
    than its tensor cores. The smoke launch is bf16 with the cap, padding and causal masks."""
    row = next(r for r in rows if r["arch"] == 90 and r["kernel"] == "_space_fwd_kernel" and "bfloat16" in r["launch"])
    if "loop_instructions" not in row:
        pytest.skip("this Triton ships no cuobjdump: no SASS to count")
    elements = row["tiles"]["BLOCK_M"] * row["tiles"]["BLOCK_N"] / (32 * row["warps"])  # per thread
    assert row["loop_mma"] > 0, row
    assert row["loop_mufu"] <= 2.1 * elements, row
    assert row["loop_instructions"] <= 18 * elements, row


def test_loop_profile_counts_the_longest_loop():
    from tools.triton_compile_check import loop_profile
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.EX2 R2, R3 ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   MUFU.TANH R4, R4 ;
        /*0040*/              @!P3 BRA 0x20 ;
        /*0050*/                   FMUL R5, R5, R6 ;
        /*0060*/                   BRA 0x60;
    """
    assert loop_profile(sass) == {"loop_instructions": 3, "loop_mufu": 1, "loop_mma": 1}
    assert loop_profile("/*0000*/ EXIT ;")["loop_instructions"] == 0


def test_a_kernel_the_compiler_rejects_fails_the_check(tmp_path):
    launches = tmp_path / "launches.json"
    launches.write_text(json.dumps([{"module": __name__, "name": "_early_exit_kernel",
                                     "args": [{"tensor": "float32"}, {"tensor": "float32"}, 8], "kwargs": {"N": 16}}]))
    r = _run(tmp_path, "--phase", "compile", "--launches", str(launches))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL  sm_90 _early_exit_kernel" in r.stdout and "1 failed" in r.stdout
