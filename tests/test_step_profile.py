"""bench/step_profile.py: the kind of each kernel name, and the time split of profiled calls."""
from __future__ import annotations

import pytest
import torch

from types import SimpleNamespace

from torch.autograd import DeviceType

from bench.step_profile import busy_ms, category, profile_calls, split_events, summary


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
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, "
     "cutlass::bfloat16_t>, false, false>(Flash_fwd_params)", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)",
     "attention"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "comm"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "comm"),
    ("c10d::allgather_", "comm"),
    ("Memcpy HtoD (Pageable -> Device)", "memcpy"),
    ("Memset (Device)", "memcpy"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<2>, CopyFunctor<float, "
     "float, float, 2, 1, 1>, Copy<float, float> >", "other"),
    ("void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, float>(float const*, "
     "TensorListAddresses, int)", "optimizer"),
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
    # Every op in the table (~10 kinds of similar tiny cost; the default top 12 may leave sqrt out).
    p = profile_calls(opt.step, torch.device("cpu"), calls=2, top=100)
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


def _device_event(name, start, end, *, annotation=False):
    return SimpleNamespace(name=name, device_type=DeviceType.CUDA, self_device_time_total=end - start,
                           is_user_annotation=annotation, time_range=SimpleNamespace(start=start, end=end),
                           cpu_parent=None)


def test_gpu_split_leaves_out_annotation_spans_and_counts_overlap_once():
    """A GPU profile as the profiler gives it (times in us): two kernels of a compiled graph, an NCCL kernel
    overlapping the second on another stream, and the graph's own annotation span over both (not a kernel)."""
    events = [
        _device_event("## Call CompiledFxGraph fabc ##", 0, 1000, annotation=True),
        _device_event("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", 0, 600),
        _device_event("triton_poi_fused_gelu_1", 600, 1000),
        _device_event("ncclDevKernel_AllGather_RING_LL", 800, 1200),
    ]
    p = split_events(events, cuda=True, calls=1, wall_ms=2.0)
    assert p["split_pct"] == {"matmul": 42.9, "fused": 28.6, "comm": 28.6}  # of 1400 us of kernels
    assert p["busy_pct"] == 60.0  # kernels run 0-1200 us of 2000
    assert [row[0] for row in p["top"]][0].startswith("nvjet")


@pytest.mark.parametrize("spans, ms", [([], 0.0), ([(0, 1000)], 1.0), ([(0, 500), (250, 750)], 0.75),
                                       ([(0, 100), (200, 300)], 0.2), ([(0, 1000), (100, 200)], 1.0)])
def test_busy_is_the_union_of_the_intervals(spans, ms):
    assert busy_ms(spans) == pytest.approx(ms)
