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

from videoprism.kernels.token_ops_ref import (gather_tokens_ref, patchify_gather_ref, scatter_tokens_ref,
                                              scatter_tokens_torch, shuffle_with_mask_tokens_bwd_ref,
                                              shuffle_with_mask_tokens_ref)
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
    return torch.stack([torch.randperm(n, generator=g) for _ in range(B)]) if B else torch.empty(0, n, dtype=torch.long)


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
    plain = scatter_tokens_torch(src, rep, L)
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


def test_shuffle_embedding_grads_keep_fp32_sums_with_mixed_dtypes():
    """mask_emb and pos_emb may differ in dtype (shuffle_with_mask_tokens's docstring): each gets its grad in its
    own dtype, the fp32 sum rounded once, never the other embedding's dtype on the way (a bf16 detour costs
    mask_emb ~3 significant digits). Oracle: the literal float64 sums of DESIGN 6.4."""
    B, m, n, D = 3, 5, 12, 16
    visible, perm, me, pe = shuffle_inputs(B, m, n, D, torch.bfloat16)
    me, pe = me.float().requires_grad_(), pe.to(torch.bfloat16).requires_grad_()
    grad = torch.randn(B, n, D, generator=gen(9)).to(torch.bfloat16)
    for backend in ["reference"] + CPU_BACKENDS:
        me.grad = pe.grad = None
        shuffle_with_mask_tokens(visible, perm, me, pe, backend=backend).backward(grad)
        want_me = sum(grad[b, i].double() for b in range(B) for i in range(n) if perm[b, i] >= m)
        assert me.grad.dtype == torch.float32 and pe.grad.dtype == torch.bfloat16
        torch.testing.assert_close(me.grad.double(), want_me, rtol=1e-6, atol=1e-6, msg=backend)
        torch.testing.assert_close(pe.grad.double(), grad.double().sum(0), rtol=2**-8, atol=0, msg=backend)


def test_cpu_ops_run_the_native_kernels_not_the_reference(monkeypatch):
    """backend=None on the CPU picks "cpp" (the module docstring), and "cpp" runs the C++ kernels of
    videoprism._C, forward and backward: with every reference made to fail, the ops still work and give
    the reference's results. (Were "cpp" to fall back to the reference, every "cpp against the reference"
    test above would compare the reference with itself.)"""
    import videoprism.ops.token_ops as token_ops
    from videoprism.kernels import token_ops_ref

    assert token_ops.default_backend(torch.device("cpu")) == "cpp"
    g = gen(11)
    x = torch.randn(2, 6, 5, generator=g)
    idx = torch.tensor([[5, 0, 2, 2], [1, 1, 4, 3]])
    visible, perm, me, pe = shuffle_inputs(2, 3, 7, 5, torch.float32)
    video, pos = torch.rand(2, 2, 4, 6, 3, generator=g), torch.tensor([[[0, 5], [1, 2]], [[3, 4], [0, 1]]])
    cot = torch.randn(2, 7, 5, generator=g)
    want = (gather_tokens_ref(x, idx), scatter_tokens_ref(x[:, :4], idx, 6),
            shuffle_with_mask_tokens_ref(visible, perm, me, pe), shuffle_with_mask_tokens_bwd_ref(cot, perm, 3),
            patchify_gather_ref(video, pos, 2))

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU op ran the plain-PyTorch reference")

    for name in ("gather_tokens_ref", "scatter_tokens_ref", "shuffle_with_mask_tokens_ref",
                 "shuffle_with_mask_tokens_bwd_ref", "patchify_gather_ref"):
        monkeypatch.setattr(token_ops_ref, name, refuse)
    for backend in (None, "cpp"):
        xs, vs, vid = x.clone().requires_grad_(), visible.clone().requires_grad_(), video.clone().requires_grad_()
        mes, pes = me.clone().requires_grad_(), pe.clone().requires_grad_()
        assert torch.equal(gather_tokens(xs, idx, backend=backend), want[0])
        assert torch.equal(scatter_tokens(x[:, :4], idx, 6, backend=backend), want[1])
        out = shuffle_with_mask_tokens(vs, perm, mes, pes, backend=backend)
        assert torch.equal(out, want[2])
        out.backward(cot)
        assert torch.equal(vs.grad, want[3][0])
        torch.testing.assert_close(mes.grad, want[3][1], rtol=1e-6, atol=1e-6)   # sums: another order
        torch.testing.assert_close(pes.grad, want[3][2], rtol=1e-6, atol=1e-6)
        patches = patchify_gather(vid, pos, 2, backend=backend)
        assert torch.equal(patches, want[4])
        gather_tokens(xs, idx, backend=backend).sum().backward()          # scatter as the backward
        patches.sum().backward()
        assert xs.grad is not None and vid.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_split_rows_over_threads_with_the_same_bits(dtype):
    """The C++ kernels spread their rows over torch's intra-op threads (at::parallel_for compiles to a loop on one
    thread in an extension built without OpenMP, as ours was up to 706bd25: setup.py), and give the same bits on
    one thread and on four, and the reference's, at sizes that split into several tasks of 64 rows (16 slots for
    the shuffle backward's blocks): repeated scatter indices, the shuffle's embedding sums, uint8 patches."""
    import videoprism._C as ext

    g = gen(21)
    x = torch.randn(2, 600, 33, generator=g).to(dtype)
    rep = torch.randint(0, 600, (2, 500), generator=g)                   # repeats: scatter sums rows
    visible, perm, me, pe = shuffle_inputs(3, 100, 300, 17, dtype, seed=4)
    cot = torch.randn(3, 300, 17, generator=g).to(dtype)
    video = torch.randint(0, 256, (2, 4, 18, 18, 3), generator=g, dtype=torch.uint8)
    pos = torch.rand(2, 4, 36, generator=g).argsort(-1)[..., :30].sort(-1).values

    def run():
        v, m, p = visible.clone().requires_grad_(), me.clone().requires_grad_(), pe.clone().requires_grad_()
        shuffle_with_mask_tokens(v, perm, m, p, backend="cpp").backward(cot)
        return (gather_tokens(x, rep, backend="cpp"), scatter_tokens(x[:, :500], rep, 600, backend="cpp"),
                shuffle_with_mask_tokens(visible, perm, me, pe, backend="cpp"), v.grad, m.grad, p.grad,
                patchify_gather(video, pos, 3, backend="cpp"))

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert ext.intra_op_threads() == 4, "the C++ kernels run on one thread: build the extension with OpenMP"
        many = run()
        torch.set_num_threads(1)
        assert ext.intra_op_threads() == 1
        one = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(many, one):
        assert torch.equal(a, b)
    gv, gm, gp = shuffle_with_mask_tokens_bwd_ref(cot, perm, 100)
    want = (gather_tokens_ref(x, rep), scatter_tokens_ref(x[:, :500], rep, 600),
            shuffle_with_mask_tokens_ref(visible, perm, me, pe), gv, gm, gp, patchify_gather_ref(video, pos, 3))
    for name, out, ref in zip(("gather", "scatter", "shuffle", "d visible", "d mask_emb", "d pos_emb", "patchify"),
                              many, want):
        if name in ("d mask_emb", "d pos_emb"):  # sums in another order than the reference's
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(out, ref), name


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


@pytest.mark.skipif(not INTERPRET, reason="Triton launchers on CPU tensors need TRITON_INTERPRET=1")
def test_triton_launchers_take_strided_inputs():
    """The public Triton launchers (not only the ops) accept non-contiguous tensors: the kernels
    index dense rows, so each launcher makes its inputs contiguous (they read wrong rows before)."""
    from videoprism.kernels import gather_tokens as gt
    from videoprism.kernels import patchify_gather as pg
    from videoprism.kernels import shuffle_tokens as st

    g = gen(13)
    B, L, M, D = 2, 9, 5, 6
    x = torch.randn(B, L, D, generator=g)
    idx = torch.stack([torch.randperm(L, generator=g)[:M] for _ in range(B)])
    assert torch.equal(gt.gather_tokens_triton(noncontig(x), noncontig(idx)), gather_tokens_ref(x, idx))
    src = torch.randn(B, M, D, generator=g)
    assert torch.equal(gt.scatter_tokens_triton(noncontig(src), noncontig(idx), L), scatter_tokens_ref(src, idx, L))
    visible, perm, me, pe = shuffle_inputs(B, 3, 7, D, torch.float32, seed=13)
    me_strided = torch.stack([me, me], 1)[:, 0]                       # stride 2
    pe_strided = pe.t().contiguous().t()                               # column-major [n, D]
    out = st.shuffle_with_mask_tokens_fwd_triton(noncontig(visible), noncontig(perm), me_strided, pe_strided)
    assert torch.equal(out, shuffle_with_mask_tokens_ref(visible, perm, me, pe))
    grad = torch.randn(B, 7, D, generator=g)
    for got, want in zip(st.shuffle_with_mask_tokens_bwd_triton(noncontig(grad), noncontig(perm), 3),
                         shuffle_with_mask_tokens_bwd_ref(grad, perm, 3)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)     # the embedding grads are sums
    video = torch.randint(0, 256, (1, 2, 6, 9, 3), generator=g, dtype=torch.uint8)
    pos = torch.tensor([[[0, 5, 2], [4, 1, 3]]])
    strided = video.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)   # channels-first buffer
    assert torch.equal(pg.patchify_gather_triton(strided, noncontig(pos), 3), patchify_gather_ref(video, pos, 3))


@pytest.mark.skipif(not INTERPRET, reason="the Triton kernel on CPU tensors needs TRITON_INTERPRET=1")
def test_triton_shuffle_backward_drops_out_of_range_perm_values():
    """A perm value outside [0, n) (no permutation: the op raises on the CPU, the CUDA kernel
    asserts) goes into neither d visible nor d mask_emb, in the Triton kernel as in the CUDA one
    (`ps >= m && ps < n`); d pos_emb still sums every slot."""
    from videoprism.kernels.shuffle_tokens import shuffle_with_mask_tokens_bwd_triton

    m, n, D = 2, 5, 4
    grad = torch.randn(1, n, D, generator=gen(14))
    perm = torch.tensor([[0, 7, 2, -1, 4]])                            # 7 >= n and -1: invalid
    gv, gm, gp = shuffle_with_mask_tokens_bwd_triton(grad, perm, m)
    assert torch.equal(gv[0, 0], grad[0, 0])                           # row 1 has no valid source: not written
    torch.testing.assert_close(gm, grad[0, 2] + grad[0, 4], rtol=0, atol=1e-6)
    torch.testing.assert_close(gp, grad[0], rtol=0, atol=0)


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
    # Second order too (the shuffle's backward had no autograd formula); the others' backwards are each other
    assert torch.autograd.gradgradcheck(lambda v, a, b: shuffle_with_mask_tokens(v, perm, a, b, backend=backend),
                                        args)
    assert torch.autograd.gradgradcheck(lambda x: gather_tokens(x, idx, backend=backend), (x,))
    assert torch.autograd.gradgradcheck(lambda v: patchify_gather(v, pos, 2, backend=backend), (video,))


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
    for dtype in (torch.int32, torch.float8_e4m3fn):  # float8 passed as a float, then failed in the kernel
        with pytest.raises(ValueError, match=f"uint8 .* got {dtype}"):
            patchify_gather(video.to(dtype), torch.zeros(1, 1, 1, dtype=torch.long), 2)


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
        plain = scatter_tokens_torch(src, rep, L)
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


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x that starts one element into its buffer: not 16-byte aligned,
    so the CUDA kernels must take their narrow (non-vector) paths."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    assert out.is_contiguous() and (out.numel() == 0 or out.data_ptr() % 16 != 0)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("D", [1, 7, 15, 16, 520])
def test_gpu_cuda_odd_shapes(dtype, D):
    """The CUDA kernels at every element size (fp64: 2-wide vectors), D not a multiple of the
    vector width, rows in partial tiles, misaligned (contiguous) inputs, rows with many
    sources in the scatter, and empty shapes: bitwise the references (sums in ascending j /
    ascending b, as the CPU kernels)."""
    dev, be = "cuda", "cuda"
    g = gen(11)
    B, L, M = 3, 37, 300                    # B*M = 900 rows: partial tiles at every block_rows
    x = torch.randn(B, L, D, generator=g).to(dtype)
    rep = torch.randint(0, L, (B, M), generator=g)
    for xx in (x.to(dev), misaligned(x.to(dev))):
        assert torch.equal(gather_tokens(xx, rep.to(dev), backend=be).cpu(), gather_tokens_ref(x, rep))
    src = torch.randn(B, M, D, generator=g).to(dtype)
    uniq = torch.stack([torch.randperm(500, generator=g)[:M] for _ in range(B)])  # unique, 200 empty rows
    few = torch.randint(0, 3, (B, M), generator=g)                                 # ~100 sources per row
    few[:, 5] = 4                                                                  # row 4: one source
    for idx, length in ((rep, L), (few, L), (uniq, 500)):
        expect = scatter_tokens_ref(src, idx, length)      # CPU: ascending j in fp32 / fp64
        for s in (src.to(dev), misaligned(src.to(dev))):
            out = scatter_tokens(s, idx.to(dev), length, backend=be)
            assert torch.equal(out.cpu(), expect)
            assert torch.equal(scatter_tokens(s, idx.to(dev), length, backend=be), out)   # deterministic
    # Empty: M = 0 (all rows zero), L = M = 0, B = 0.
    z = scatter_tokens(src[:, :0].to(dev), rep[:, :0].to(dev), L, backend=be)
    assert z.shape == (B, L, D) and not z.any()
    assert scatter_tokens(src[:, :0].to(dev), rep[:, :0].to(dev), 0, backend=be).shape == (B, 0, D)
    assert gather_tokens(x.to(dev), rep[:, :0].to(dev), backend=be).shape == (B, 0, D)
    assert gather_tokens(x[:0].to(dev), rep[:0].to(dev), backend=be).shape == (0, M, D)
    # Shuffle: B*n = 145 rows (slot-major tiles cut inside a slot), m = 0 (mask slots only).
    for Bs, m, n in ((5, 11, 29), (4, 0, 6), (0, 3, 7)):
        visible, perm, me, pe = shuffle_inputs(Bs, m, n, D, dtype, seed=D)
        grad = torch.randn(Bs, n, D, generator=g).to(dtype)
        want = shuffle_with_mask_tokens_ref(visible, perm, me, pe)
        gv_cpu, gm_cpu, gp_cpu = torch.ops.videoprism.shuffle_tokens_bwd_native(grad, perm, m)   # "cpp"
        for v, gg, pe_d in ((visible.to(dev), grad.to(dev), pe.to(dev)),
                            (misaligned(visible.to(dev)), misaligned(grad.to(dev)), misaligned(pe.to(dev)))):
            out = shuffle_with_mask_tokens(v, perm.to(dev), me.to(dev), pe_d, backend=be)
            assert torch.equal(out.cpu(), want)
            gv, gm, gp = torch.ops.videoprism.shuffle_tokens_bwd_native(gg, perm.to(dev), m)
            assert torch.equal(gv.cpu(), gv_cpu)
            assert torch.equal(gp.cpu(), gp_cpu)            # ascending b from zero, as the CPU kernel
            gm64 = shuffle_with_mask_tokens_bwd_ref(grad.double(), perm, m)[1]
            plain = torch.zeros_like(grad).scatter_(1, perm[:, :, None].expand(-1, -1, D), grad)[:, m:].sum((0, 1))
            mag = shuffle_with_mask_tokens_bwd_ref(grad.double().abs(), perm, m)[1]
            assert_close_2x(gm.cpu(), gm64, plain, dtype, scale=mag)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64, torch.bfloat16])
def test_gpu_cuda_patchify_staging(dtype):
    """Patchify's shared-memory staging: runs of 3P elements with P = 1 (3-element runs),
    odd P (no 4-wide tile boundary inside a run), P with one run per tile (3P beyond the
    8192-element tile: tile_runs = 1, vector stores only when 3P % 4 == 0), fp64 (32-byte
    Pack<double, 4> stores), a misaligned video, and K = 0."""
    dev = "cuda"
    g = gen(12)
    # P, h, w, K; B*T = 3 frames, so a tile of all B*T*K*P runs ends inside a 4-element group
    cases = [(1, 3, 4, 5), (5, 3, 2, 3), (7, 2, 3, 5), (2, 16, 16, 200)]   # the last: 3 tiles, 1 partial
    cases += [(700, 1, 2, 2), (701, 1, 1, 1)] if dtype == torch.uint8 else [(683, 1, 1, 1), (684, 1, 1, 1)]
    for P, h, w, K in cases:
        shape = (1, 3, h * P, w * P, 3)
        if dtype == torch.uint8:
            video = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        else:
            video = torch.rand(shape, generator=g).to(dtype)
        pos = torch.rand(1, 3, h * w, generator=g).argsort(-1)[..., :K]
        want = patchify_gather_ref(video, pos, P)
        for v in (video.to(dev), misaligned(video.to(dev))):
            assert torch.equal(patchify_gather(v, pos.to(dev), P, backend="cuda").cpu(), want)
    empty = patchify_gather(video.to(dev), pos[..., :0].to(dev), P, backend="cuda")
    assert empty.shape == (1, 3, 0, 3 * P * P)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_subnormal_sums_are_kept(backend):
    """fp32 sums keep subnormal values, as torch and the references do (the extension was
    built with --use_fast_math, i.e. -ftz=true, which flushed them to zero in the scatter's
    duplicate sum and the shuffle's fp32 adds)."""
    dev = "cuda"
    tiny = torch.finfo(torch.float32).tiny / 4            # 2^-128: subnormal in fp32 and bf16
    for dtype in (torch.float32, torch.bfloat16):
        src = torch.full((1, 3, 8), tiny, device=dev).to(dtype)
        idx = torch.tensor([[0, 0, 1]], device=dev)
        # On the CPU: CUDA's scatter_add_ adds with fp32 global atomics, which flush subnormals (PTX atom.add.f32).
        want = scatter_tokens_ref(src.cpu(), idx.cpu(), 2).to(dev)
        assert bool((want[0, 0].float() == 2 * tiny).all())
        assert torch.equal(scatter_tokens(src, idx, 2, backend=backend), want)
        visible = torch.full((2, 2, 8), tiny, device=dev).to(dtype)
        me = torch.full((8,), tiny, device=dev, requires_grad=True)
        pe = torch.full((3, 8), tiny, device=dev, requires_grad=True)
        perm = torch.tensor([[1, 0, 2], [2, 1, 0]], device=dev)
        out = shuffle_with_mask_tokens(visible, perm, me, pe, backend=backend)
        assert torch.equal(out, shuffle_with_mask_tokens_ref(visible, perm, me, pe))
        assert bool((out.float() == 2 * tiny).all())
        out.backward(torch.full_like(out, tiny))
        _, gm, gp = shuffle_with_mask_tokens_bwd_ref(torch.full_like(out, tiny), perm, 2)
        assert torch.equal(pe.grad, gp) and torch.equal(me.grad, gm) and bool((gp == 2 * tiny).all())


@pytest.mark.gpu
def test_gpu_cuda_offsets_beyond_int32():
    """Tensors of more than 2^31 elements (2^32 bytes) with rows near their end: the CUDA
    kernels' element/byte offsets must be int64 (odd D: the narrow paths, offsets in bytes
    or elements). About 14 GB of GPU memory at the peak."""
    dev = "cuda"
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GB")
    g = torch.Generator(device=dev).manual_seed(0)
    B, L, D = 2, 1_100_000, 1023             # B*L*D = 2.25e9 > 2^31 elements, bf16 rows of 2046 bytes
    x = torch.randn(B, L, D, device=dev, generator=g, dtype=torch.bfloat16)
    idx = torch.tensor([[0, L - 1, 5, L - 2], [L - 1, 0, L - 3, 7]], device=dev)
    rows = torch.arange(B, device=dev)[:, None]
    got = gather_tokens(x, idx, backend="cuda")
    assert torch.equal(got, x[rows, idx])
    del x
    out = scatter_tokens(got, idx, L, backend="cuda")
    assert torch.equal(out[rows, idx], got)
    out[rows, idx] = 0
    assert int(out.count_nonzero()) == 0
    del out
    # Shuffle forward/backward: output and grad of B*n*D > 2^31 elements, pos_emb of 4.5 GB.
    n, m = L, 1000
    perm = torch.stack([torch.randperm(n, device=dev, generator=g) for _ in range(B)])
    visible = torch.randn(B, m, D, device=dev, generator=g, dtype=torch.bfloat16)
    me = torch.randn(D, device=dev, generator=g)
    pe = torch.randn(n, D, device=dev, generator=g)
    out = shuffle_with_mask_tokens(visible, perm, me, pe, backend="cuda")
    for sl in (slice(0, 1000), slice(n - 1000, n)):
        p = perm[:, sl]
        tok = torch.where((p < m)[..., None], visible[rows, p.clamp(max=m - 1)].float(), me)
        assert torch.equal(out[:, sl], (tok + pe[sl]).to(torch.bfloat16))
    del pe
    gv, _, gp = torch.ops.videoprism.shuffle_tokens_bwd_native(out, perm, m)
    inv = perm.argsort(1)[:, :m]                               # slot of visible token j
    assert torch.equal(gv, out[rows, inv])
    for sl in (slice(0, 1000), slice(n - 1000, n)):
        assert torch.equal(gp[sl], out[0, sl].float() + out[1, sl].float())
    del out, gp
    # Patchify: a uint8 video of 2.2e9 bytes, patches in its last frames.
    T, P, h, w = 700, 16, 64, 64
    video = torch.randint(0, 256, (1, T, h * P, w * P, 3), device=dev, generator=g, dtype=torch.uint8)
    pos = torch.rand(1, T, h * w, device=dev, generator=g).argsort(-1)[..., :4]
    got = patchify_gather(video, pos, P, backend="cuda")
    assert torch.equal(got[:, -3:], patchify_gather_ref(video[:, -3:], pos[:, -3:], P))


def test_triton_patchify_refuses_int32_overflowing_shapes():
    """Its in-frame offsets and row counters are int32: a frame of 2^31 values is refused up
    front (meta tensors: nothing allocated, nothing launched)."""
    pytest.importorskip("triton")
    from videoprism.kernels.patchify_gather import patchify_gather_triton

    video = torch.empty(1, 1, 26766, 26766, 3, dtype=torch.uint8, device="meta")  # 2.149e9 values
    pos = torch.zeros(1, 1, 4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="values per frame"):
        patchify_gather_triton(video, pos, 18)


def test_triton_launchers_run_on_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every launcher enters its first tensor's device when
    that is another one (a model on cuda:1 while the current device is 0), and leaves CPU tensors and the
    current device alone. Fake CUDA tensors stand in for real ones (no GPU here); the launch is stubbed."""
    import contextlib
    import inspect

    from torch._subclasses.fake_tensor import FakeTensorMode

    from videoprism.kernels import (bevt_blocks, factorized_attention_space, factorized_attention_time,
                                    gather_tokens, patchify_gather, shuffle_tokens)
    from videoprism.kernels.device_guard import on_tensor_device

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    launch = on_tensor_device(lambda x, n: n)
    with FakeTensorMode():
        on_1, on_0 = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
    assert launch(on_1, 3) == 3 and entered == [torch.device("cuda:1")]
    assert launch(on_0, 3) == 3 and launch(torch.empty(2), 3) == 3 and launch(7, 3) == 3
    assert entered == [torch.device("cuda:1")]
    # Every public launcher of the kernels package is guarded.
    launchers = [f for m in (bevt_blocks, factorized_attention_space, factorized_attention_time, gather_tokens,
                             patchify_gather, shuffle_tokens)
                 for name, f in inspect.getmembers(m, inspect.isfunction)
                 if f.__module__ == m.__name__ and (name.endswith("_triton") or name.startswith("attention_"))]
    assert len(launchers) == 10 and all(f.__code__.co_name == "run" for f in launchers), launchers
