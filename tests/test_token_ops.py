"""Token ops (patchify_gather, gather/scatter_tokens, shuffle_with_mask_tokens): every
backend against the plain-PyTorch references, the references against literal loops of
the spec, gradients, opcheck, validation and torch.compile without graph breaks.

The ops only move data, so results must be exact, except where a backend sums
(scatter with repeated indices, the shuffle's embedding grads): there the error
against a float64 oracle may be at most twice the error of plain PyTorch in the same
dtype plus one unit of the dtype's epsilon times the value (STYLE 3). One exception
has a reason: Triton's CPU interpreter rounds fp32 -> bf16 by truncation, so a bf16
value *computed* in a Triton kernel (not copied) is checked to one bf16 unit on the
CPU and exactly on the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from videoprism.kernels.gather_tokens import gather_tokens_ref, scatter_tokens_ref
from videoprism.kernels.patchify_gather import patchify_gather_ref
from videoprism.kernels.shuffle_tokens import shuffle_with_mask_tokens_bwd_ref, shuffle_with_mask_tokens_ref
from videoprism.ops import gather_tokens, patchify_gather, scatter_tokens, shuffle_with_mask_tokens

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_BACKENDS = ["cpp"] + (["triton"] if INTERPRET else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 2**-52}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def noncontig(x: torch.Tensor) -> torch.Tensor:
    """The same values seen through a strided view (every other row of a buffer)."""
    buf = torch.empty(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype, device=x.device)
    buf[:, ::2] = x
    return buf[:, ::2]


def perms(B, n, g):
    return torch.stack([torch.randperm(n, generator=g) for _ in range(B)])


def assert_close_2x(out, oracle64, plain, dtype, scale=None):
    """|out - oracle| <= 2 |plain - oracle| + eps(dtype) * scale (elementwise). For a sum the
    scale is the sum of the magnitudes of its terms (what its rounding errors are relative
    to); by default |oracle|."""
    err, ref_err = (out.double() - oracle64).abs(), (plain.double() - oracle64).abs()
    scale = oracle64.abs() if scale is None else scale
    bound = 2 * ref_err + EPS[dtype] * scale + 1e-30
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"


def assert_computed_equal(out, expect, backend):
    """Exact, except a bf16 value computed by a Triton kernel in the CPU interpreter (one unit)."""
    if backend == "triton" and out.dtype == torch.bfloat16 and out.device.type == "cpu":
        torch.testing.assert_close(out.float(), expect.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, expect)


# ----------------------------------------------------------------------------- references vs the spec
def test_patchify_reference_is_the_official_layout():
    """Feature (p*P + q)*3 + c of patch m*Nw + n is pixel (m*P + p, n*P + q, c) (golden NOTES 3)."""
    B, T, P, h, w = 1, 2, 3, 2, 3
    video = torch.randint(0, 256, (B, T, h * P, w * P, 3), generator=gen(), dtype=torch.uint8)
    pos = torch.tensor([[[0, 4, 5], [1, 2, 3]]])
    out = patchify_gather_ref(video, pos, P)
    for t in range(T):
        for k, idx in enumerate(pos[0, t].tolist()):
            mh, nw = divmod(idx, w)
            for p in range(P):
                for q in range(P):
                    for c in range(3):
                        pixel = video[0, t, mh * P + p, nw * P + q, c].float()
                        assert out[0, t, k, (p * P + q) * 3 + c] == pixel * (1 / 255)
    # The uint8 scaling is one fp32 multiply by fp32(1/255): within one unit of v / 255.
    v = torch.arange(256, dtype=torch.float32)
    assert bool(((v * (1 / 255) - v / 255).abs() <= 2**-24).all())


def test_shuffle_reference_is_design_5():
    """x[b, i] = c[b, perm[b, i]] + pos_dec[i], c = visible tokens then mask embeddings."""
    B, m, n, D = 2, 3, 7, 4
    g = gen(1)
    visible, me, pe = torch.randn(B, m, D, generator=g), torch.randn(D, generator=g), torch.randn(n, D, generator=g)
    perm = perms(B, n, g)
    out = shuffle_with_mask_tokens_ref(visible, perm, me, pe)
    for b in range(B):
        for i in range(n):
            j = int(perm[b, i])
            assert torch.equal(out[b, i], (visible[b, j] if j < m else me) + pe[i])


def test_scatter_reference_accumulates_duplicates():
    src = torch.tensor([[[1.0], [2.0], [4.0]]])
    out = scatter_tokens_ref(src, torch.tensor([[2, 0, 2]]), 4)
    assert out.flatten().tolist() == [2.0, 0.0, 5.0, 0.0]


# ----------------------------------------------------------------------------- forward, every backend
GATHER_SHAPES = [(1, 1, 1, 1), (2, 197, 90, 3), (3, 7, 12, 257), (2, 90, 3, 64)]   # B, L, M, D


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES)
def test_gather_matches_reference(backend, dtype, shape):
    B, L, M, D = shape
    g = gen()
    x = torch.randn(B, L, D, generator=g).to(dtype)
    idx = torch.randint(0, L, (B, M), generator=g)             # repeats allowed
    for xx in (x, noncontig(x)):
        assert torch.equal(gather_tokens(xx, idx, backend=backend), gather_tokens_ref(x, idx))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES)
def test_scatter_matches_reference(backend, dtype, shape):
    B, L, M, D = shape
    g = gen()
    src = torch.randn(B, M, D, generator=g).to(dtype)
    # Unique indices (the masking case): every output row is a copy or zero -> exact.
    uniq = torch.stack([torch.randperm(max(L, M), generator=g)[:M] for _ in range(B)]) % max(L, 1)
    if M <= L:
        out = scatter_tokens(noncontig(src), uniq, L, backend=backend)
        assert torch.equal(out, scatter_tokens_ref(src, uniq, L))
    # Repeated indices accumulate.
    rep = torch.randint(0, L, (B, M), generator=g)
    out = scatter_tokens(src, rep, L, backend=backend)
    # Each row's sources are summed in ascending j in fp32, as in the reference: same bits.
    assert_computed_equal(out, scatter_tokens_ref(src, rep, L), backend)
    oracle = scatter_tokens_ref(src.double(), rep, L)
    plain = torch.zeros(B, L, D, dtype=dtype).scatter_add_(1, rep[:, :, None].expand(-1, -1, D), src)
    assert_close_2x(out, oracle, plain, dtype, scale=scatter_tokens_ref(src.double().abs(), rep, L))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_many_sources_per_row(backend, dtype):
    """~120 sources per output row, spread over more than one 256-index chunk of the Triton
    duplicate scan, next to rows with one source and none: bitwise the reference sum."""
    B, L, M, D = 2, 9, 600, 5
    g = gen(2)
    src = torch.randn(B, M, D, generator=g).to(dtype)
    idx = torch.randint(0, 5, (B, M), generator=g)
    idx[:, 7] = 6                                   # row 6: one source; rows 5, 7, 8: none
    out = scatter_tokens(src, idx, L, backend=backend)
    assert_computed_equal(out, scatter_tokens_ref(src, idx, L), backend)
    assert not out[:, 5].any() and not out[:, 7:].any()


SHUFFLE_SHAPES = [(1, 1, 1, 1), (2, 3, 7, 90), (3, 12, 40, 257), (2, 0, 5, 8), (2, 6, 6, 64)]   # B, m, n, D


def shuffle_inputs(B, m, n, D, dtype, seed=0, emb_dtype=torch.float32):
    g = gen(seed)
    visible = torch.randn(B, m, D, generator=g).to(dtype)
    return visible, perms(B, n, g), torch.randn(D, generator=g).to(emb_dtype), torch.randn(n, D, generator=g).to(emb_dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHUFFLE_SHAPES)
def test_shuffle_forward_matches_reference(backend, dtype, shape):
    visible, perm, me, pe = shuffle_inputs(*shape, dtype)
    out = shuffle_with_mask_tokens(noncontig(visible), perm, me, pe, backend=backend)
    assert out.dtype == dtype
    assert_computed_equal(out, shuffle_with_mask_tokens_ref(visible, perm, me, pe), backend)
    # Embeddings in the activations' dtype too (no fp32 parameters).
    out = shuffle_with_mask_tokens(visible, perm, me.to(dtype), pe.to(dtype), backend=backend)
    assert_computed_equal(out, shuffle_with_mask_tokens_ref(visible, perm, me.to(dtype), pe.to(dtype)), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHUFFLE_SHAPES)
def test_shuffle_backward_matches_reference(backend, dtype, shape):
    visible, perm, me, pe = shuffle_inputs(*shape, dtype)
    visible.requires_grad_(), me.requires_grad_(), pe.requires_grad_()
    B, m, D = visible.shape
    grad = torch.randn(B, perm.shape[1], D, generator=gen(5)).to(dtype)
    shuffle_with_mask_tokens(visible, perm, me, pe, backend=backend).backward(grad)
    gv64, gm64, gp64 = shuffle_with_mask_tokens_bwd_ref(grad.double(), perm, m)
    # The unshuffled visible grad is a copy: exact.
    assert visible.grad.dtype == dtype and torch.equal(visible.grad.double(), gv64)
    assert me.grad.dtype == torch.float32 and pe.grad.dtype == torch.float32
    # Plain PyTorch in the same dtype: autograd of the composition, sums in `dtype`.
    c = torch.zeros_like(grad).scatter_(1, perm[:, :, None].expand(-1, -1, D), grad)
    mag = shuffle_with_mask_tokens_bwd_ref(grad.double().abs(), perm, m)
    assert_close_2x(me.grad, gm64, c[:, m:].sum((0, 1)), dtype, scale=mag[1])
    assert_close_2x(pe.grad, gp64, grad.sum(0), dtype, scale=mag[2])


PATCH_CASES = [(1, 1, 2, 3, 1, 4), (2, 3, 4, 5, 3, 7), (1, 2, 3, 3, 5, 9), (2, 1, 2, 2, 18, 2)]  # B, T, h, w, P, K


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8] + DTYPES)
@pytest.mark.parametrize("case", PATCH_CASES)
def test_patchify_matches_reference(backend, dtype, case):
    B, T, h, w, P, K = case
    g = gen()
    if dtype == torch.uint8:
        video = torch.randint(0, 256, (B, T, h * P, w * P, 3), generator=g, dtype=torch.uint8)
    else:
        video = torch.rand(B, T, h * P, w * P, 3, generator=g).to(dtype)
    pos = torch.rand(B, T, h * w, generator=g).argsort(-1)[..., :K].sort(-1).values
    # Non-contiguous: a channels-first buffer seen channels-last.
    strided = video.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)
    out = patchify_gather(strided, pos, P, backend=backend)
    assert out.dtype == torch.float32
    assert torch.equal(out, patchify_gather_ref(video, pos, P))


# ----------------------------------------------------------------------------- gradients, opcheck, compile
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_gradcheck_float64(backend):
    g = gen(7)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[4, 0, 4, 2], [1, 1, 3, 0]])
    assert torch.autograd.gradcheck(lambda x: gather_tokens(x, idx, backend=backend), (x,))
    src = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: scatter_tokens(s, idx, 5, backend=backend), (src,))
    visible, perm, me, pe = shuffle_inputs(2, 3, 7, 5, torch.float64, emb_dtype=torch.float64)
    args = tuple(t.requires_grad_() for t in (visible, me, pe))
    assert torch.autograd.gradcheck(lambda v, a, b: shuffle_with_mask_tokens(v, perm, a, b, backend=backend), args)
    video = torch.rand(1, 2, 4, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[[0, 3], [1, 2]]])
    assert torch.autograd.gradcheck(lambda v: patchify_gather(v, pos, 2, backend=backend), (video,))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    g = gen(3)
    ops = torch.ops.videoprism
    x = torch.randn(2, 6, 5, generator=g, requires_grad=True)
    idx = torch.tensor([[5, 0, 2], [1, 1, 4]])
    torch.library.opcheck(ops.gather_tokens, (x, idx, backend))
    torch.library.opcheck(ops.scatter_tokens, (torch.randn(2, 3, 5, generator=g, requires_grad=True), idx, 6, backend))
    visible, perm, me, pe = shuffle_inputs(2, 3, 7, 5, torch.float32)
    torch.library.opcheck(ops.shuffle_with_mask_tokens, tuple(t.requires_grad_() if t.is_floating_point() else t
                                                              for t in (visible, perm, me, pe)) + (backend,))
    torch.library.opcheck(ops.shuffle_with_mask_tokens_backward, (torch.randn(2, 7, 5, generator=g), perm, 3, backend))
    video = torch.rand(2, 2, 4, 6, 3, generator=g, requires_grad=True)
    torch.library.opcheck(ops.patchify_gather, (video, torch.tensor([[[0, 5], [1, 2]], [[3, 4], [0, 1]]]), 2, backend))
    torch.library.opcheck(ops.patchify_gather, (torch.randint(0, 256, (1, 1, 4, 4, 3), dtype=torch.uint8),
                                                torch.tensor([[[0, 3]]]), 2, backend))


def _masked_step(video, pos, mask_emb, pos_emb, perm, w, backend):
    """Every op in one function: the masked-encoding and token-shuffle data path."""
    B, T, K = pos.shape
    patches = patchify_gather(video, pos, 2, backend=backend)            # [B, T, K, 12]
    tokens = (patches @ w).reshape(B, T * K, -1)                        # "encoder"
    idx = torch.arange(T * K, device=pos.device).flip(0).expand(B, -1)
    tokens = scatter_tokens(gather_tokens(tokens, idx, backend=backend), idx, T * K, backend=backend)
    return shuffle_with_mask_tokens(tokens, perm, mask_emb, pos_emb, backend=backend).square().mean()


def test_compile_fullgraph_has_no_graph_break():
    """fullgraph=True raises on a graph break; the AOT forward and backward graphs must hold
    each op as one node, and the compiled step must equal the eager one."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    g = gen(4)
    B, T, h, w, K, D = 2, 2, 2, 3, 4, 8
    n = T * h * w
    video = torch.rand(B, T, 2 * h, 2 * w, 3, generator=g, requires_grad=True)
    pos = torch.rand(B, T, h * w, generator=g).argsort(-1)[..., :K].sort(-1).values
    mask_emb = torch.randn(D, generator=g, requires_grad=True)
    pos_emb = torch.randn(n, D, generator=g, requires_grad=True)
    w_ = torch.randn(12, D, generator=g, requires_grad=True)
    perm = perms(B, n, g)
    leaves = (video, mask_emb, pos_emb, w_)
    seen = {"fw": [], "bw": []}

    def recorder(name):
        def compiler(gm, example_inputs):
            seen[name] += [str(nd.target) for nd in gm.graph.nodes if str(nd.target).startswith("videoprism.")]
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _masked_step(*a, "cpp"), fullgraph=True,
                             backend=aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw")))
    loss_c = compiled(video, pos, mask_emb, pos_emb, perm, w_)
    grads_c = torch.autograd.grad(loss_c, leaves)
    loss_e = _masked_step(video, pos, mask_emb, pos_emb, perm, w_, "cpp")
    grads_e = torch.autograd.grad(loss_e, leaves)
    assert sorted(seen["fw"]) == ["videoprism.gather_tokens.default", "videoprism.patchify_gather.default",
                                  "videoprism.scatter_tokens.default", "videoprism.shuffle_with_mask_tokens.default"]
    # Backward: shuffle's backward op, scatter's (a gather), gather's (a scatter), patchify's (a scatter).
    assert sorted(seen["bw"]) == ["videoprism.gather_tokens.default", "videoprism.scatter_tokens.default",
                                  "videoprism.scatter_tokens.default",
                                  "videoprism.shuffle_with_mask_tokens_backward.default"]
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- validation
def test_bad_inputs_say_what_is_wrong():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"idx values must be in \[0, 5\)"):
        gather_tokens(x, torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match="idx must be"):
        gather_tokens(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown backend"):
        gather_tokens(x, torch.zeros(2, 2, dtype=torch.long), backend="fast")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA"):
        gather_tokens(x, torch.zeros(2, 2, dtype=torch.long), backend="cuda")
    with pytest.raises(ValueError, match=r"idx values must be in \[0, 4\)"):
        scatter_tokens(x, torch.tensor([[0, 4, 1, 1, 1], [0] * 5]), 4)
    visible, perm, me, pe = shuffle_inputs(2, 3, 7, 5, torch.float32)
    with pytest.raises(ValueError, match="permutation"):
        shuffle_with_mask_tokens(visible, torch.zeros_like(perm), me, pe)
    with pytest.raises(ValueError, match="pos_emb must be"):
        shuffle_with_mask_tokens(visible, perm, me, pe[:-1])
    with pytest.raises(ValueError, match="n >= m"):
        shuffle_with_mask_tokens(visible, perm[:, :2], me, pe[:2])
    video = torch.rand(1, 1, 4, 6, 3)
    with pytest.raises(ValueError, match="multiples of patch_size 4"):
        patchify_gather(video, torch.zeros(1, 1, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"pos values must be in \[0, 6\)"):
        patchify_gather(video, torch.tensor([[[6]]]), 2)
    with pytest.raises(ValueError, match="uint8"):
        patchify_gather(video.to(torch.int32), torch.zeros(1, 1, 1, dtype=torch.long), 2)


# ----------------------------------------------------------------------------- GPU: cuda vs triton vs reference
GPU_BACKENDS = ["triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [768, 257, 3])          # 16-byte vectors and the scalar fallback
def test_gpu_backends_agree(dtype, D):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    B, L, M = 4, 1440, 503          # L = 16 frames x 90 tokens (stage 2); B*M rows end in a partial CUDA tile
    x = torch.randn(B, L, D, device=dev, generator=g).to(dtype)
    idx = torch.rand(B, L, device=dev, generator=g).argsort(-1)[:, :M]
    rep = torch.randint(0, L, (B, M), device=dev, generator=g)
    ref_g = gather_tokens_ref(x, idx)
    src = torch.randn(B, M, D, device=dev, generator=g).to(dtype)
    for be in GPU_BACKENDS:
        assert torch.equal(gather_tokens(x, idx, backend=be), ref_g)
        assert torch.equal(gather_tokens(noncontig(x), idx, backend=be), ref_g)
        assert torch.equal(scatter_tokens(src, idx, L, backend=be), scatter_tokens_ref(src, idx, L))
        plain = torch.zeros(B, L, D, dtype=dtype, device=dev).scatter_add_(1, rep[:, :, None].expand(-1, -1, D), src)
        assert_close_2x(scatter_tokens(src, rep, L, backend=be), scatter_tokens_ref(src.double(), rep, L), plain,
                        dtype, scale=scatter_tokens_ref(src.double().abs(), rep, L))
    n, m = 1440, 504
    visible = torch.randn(B, m, D, device=dev, generator=g).to(dtype)
    perm = torch.rand(B, n, device=dev, generator=g).argsort(-1)
    me = torch.randn(D, device=dev, generator=g)
    pe = torch.randn(n, D, device=dev, generator=g)
    grad = torch.randn(B, n, D, device=dev, generator=g).to(dtype)
    ref_out = shuffle_with_mask_tokens_ref(visible, perm, me, pe)
    gv64, gm64, gp64 = shuffle_with_mask_tokens_bwd_ref(grad.double(), perm, m)
    c = torch.zeros_like(grad).scatter_(1, perm[:, :, None].expand(-1, -1, D), grad)
    mag = shuffle_with_mask_tokens_bwd_ref(grad.double().abs(), perm, m)
    results = {}
    for be in GPU_BACKENDS:
        v, a, b = (t.clone().requires_grad_() for t in (visible, me, pe))
        out = shuffle_with_mask_tokens(v, perm, a, b, backend=be)
        assert torch.equal(out, ref_out)
        out.backward(grad)
        assert torch.equal(v.grad.double(), gv64)
        assert_close_2x(a.grad, gm64, c[:, m:].sum((0, 1)), dtype, scale=mag[1])
        assert_close_2x(b.grad, gp64, grad.sum(0), dtype, scale=mag[2])
        results[be] = (out, v.grad)
    assert torch.equal(results["triton"][0], results["cuda"][0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.uint8] + DTYPES)
def test_gpu_patchify_backends_agree(dtype):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    B, T, P, h, w, K = 2, 5, 18, 16, 16, 90                # B*T*K = 900 patches: a partial CUDA tile of 8
    if dtype == torch.uint8:
        video = torch.randint(0, 256, (B, T, h * P, w * P, 3), device=dev, generator=g, dtype=torch.uint8)
    else:
        video = torch.rand(B, T, h * P, w * P, 3, device=dev, generator=g).to(dtype)
    pos = torch.rand(B, T, h * w, device=dev, generator=g).argsort(-1)[..., :K].sort(-1).values
    ref = patchify_gather_ref(video, pos, P)
    for be in GPU_BACKENDS:
        assert torch.equal(patchify_gather(video, pos, P, backend=be), ref)
    odd = torch.rand(1, 2, 3 * 5, 2 * 5, 3, device=dev, generator=g).to(dtype if dtype != torch.uint8 else torch.float32)
    pos_odd = torch.tensor([[[0, 3, 5], [1, 2, 4]]], device=dev)
    for be in GPU_BACKENDS:                                # P*P*3 = 75: no 4-wide stores
        assert torch.equal(patchify_gather(odd, pos_odd, 5, backend=be), patchify_gather_ref(odd, pos_odd, 5))


@pytest.mark.gpu
def test_gpu_compile_inductor_no_graph_break():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    B, T, h, w, K, D = 2, 2, 2, 3, 4, 8
    n = T * h * w
    args = (torch.rand(B, T, 2 * h, 2 * w, 3, device=dev, generator=g),
            torch.rand(B, T, h * w, device=dev, generator=g).argsort(-1)[..., :K].sort(-1).values,
            torch.randn(D, device=dev, generator=g), torch.randn(n, D, device=dev, generator=g),
            torch.rand(B, n, device=dev, generator=g).argsort(-1), torch.randn(12, D, device=dev, generator=g))
    for be in GPU_BACKENDS:
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: _masked_step(*a, be), fullgraph=True)
        torch.testing.assert_close(compiled(*args), _masked_step(*args, be))
