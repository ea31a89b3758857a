"""bench/step_profile.py: the kind of each kernel name, and the time split of profiled calls."""
from __future__ import annotations

import pytest
import torch

from bench.step_profile import category, profile_calls, summary


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", "matmul"),
    ("aten::mm", "matmul"),
    ("aten::addmm", "matmul"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("triton_per_fused_native_layer_norm_0", "fused"),
    ("triton_poi_fused_gelu_1", "fused"),
    ("_space_fwd_kernel", "attention"),
    ("_time_bwd_kernel", "attention"),
    ("_space_bwd_dkdv_kernel", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("_shuffle_tokens_bwd_kernel", "token_ops"),
    ("void videoprism::scatter_sources_kernel<long>(long const*, int*, long, long, long)", "token_ops"),
    ("_patchify_gather_fwd_kernel", "token_ops"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("aten::layer_norm", "other"),
])
def test_category_of_kernel_names(name, kind):
    assert category(name) == kind


def test_matmul_bound_call_is_mostly_matmul():
    a = torch.randn(512, 512)
    p = profile_calls(lambda: a @ a, torch.device("cpu"), calls=3)
    assert p["split_pct"]["matmul"] > 90, p
    assert abs(sum(p["split_pct"].values()) - 100) < 1
    assert p["top"][0][0] == "aten::mm" and p["top"][0][3] == "matmul"
    assert "busy_pct" not in p  # a GPU-only figure
    assert summary(p).startswith("matmul ")


def test_ops_the_optimizer_runs_count_as_optimizer():
    """AdamW's per-parameter loop on the CPU runs sqrt, div, lerp, ...: optimizer time, whatever the op."""
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(50)]
    for p in params:
        p.grad = torch.randn(64)
    opt = torch.optim.AdamW(params, foreach=False)
    p = profile_calls(opt.step, torch.device("cpu"), calls=2)
    assert p["split_pct"]["optimizer"] > 95, p
    sqrt = [row for row in p["top"] if row[0] == "aten::sqrt"]
    assert sqrt and sqrt[0][3] == "optimizer"
    # The same op outside the optimizer is other.
    x = torch.rand(1 << 20)
    assert profile_calls(lambda: x.sqrt(), torch.device("cpu"))["top"][0][3] == "other"


def test_train_step_benchmark_with_profile_writes_the_split(tmp_path):
    """The benchmark as device_check.sh runs it (--profile), here on the CPU at a tiny size: each row has
    its time split, the JSON the row's full profile under the same label."""
    import json

    from bench import train_step

    out = tmp_path / "ts.json"
    assert train_step.main(["--preset", "tiny", "--frames", "2", "--batch", "2", "--modes", "eager",
                            "--stages", "1,2", "--reps", "1", "--profile", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["stage"], r["mode"]) for r in report["rows"]] == [(1, "eager"), (2, "eager")]
    for r in report["rows"]:
        prof = report["meta"]["profiles"][f"stage{r['stage']} 2 frames eager"]
        assert r["time_split"] == summary(prof)
        assert {"matmul", "optimizer"} <= set(prof["split_pct"])
