"""Fused factorized attention (Triton kernels + custom ops + backends) against the reference.

Tolerance (STYLE 3): the oracle is the reference in float64 on the same (rounded) inputs;
a kernel's max error must be at most twice that of the plain-PyTorch reference run in the
kernel's dtype, plus one unit of that dtype's epsilon times the output scale (so that a case
where the reference happens to be exact does not demand exactness).

On the CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without
a GPU), where bf16 tl.dot is not meaningful: fp32 and fp16 here, bf16 in the `gpu` tests.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from videoprism.kernels.factorized_attention import factorized_attention_ref
from videoprism.kernels.factorized_attention_space import _exp2, _rcp, _tanh
from tests.conftest import random_pos
from videoprism.ops.attention import INTERPRET, factorized_attention

interp = pytest.mark.skipif(not INTERPRET, reason="the CPU tests run the kernels in Triton's interpreter "
                                                  "(TRITON_INTERPRET=1, set by conftest without a GPU)")
EPS = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def make_qkv(B, T, K, H, Dh, gen, *, noncontig=False, device="cpu"):
    """fp64 qkv [B, T, K, 3, H, Dh]; non-contiguous = a head-major buffer with padded rows,
    seen through transposed strides (as a projection output with a different layout would be)."""
    if noncontig:
        buf = torch.randn(B, T, K, H, 3, Dh + 8, generator=gen, dtype=torch.float64)
        x = buf.transpose(3, 4)[..., :Dh]
    else:
        x = torch.randn(B, T, K, 3, H, Dh, generator=gen, dtype=torch.float64)
    return (1.5 * x).to(device)


def padding(B, T, K, axis, gen, device="cpu"):
    """30% random padded keys plus one fully padded sequence (its rows must come out uniform)."""
    kp = torch.rand(B, T, K, generator=gen) < 0.3
    if axis == "space":
        kp[0, 0, :] = True
    else:
        kp[-1] = True
    return kp.to(device)


def check(x64, dtype, gen, backend="triton", factor=2.0, **kw):
    """Forward and the qkv gradient of `backend` in `dtype` against the fp64 oracle (2x rule).

    One exception, a sequence of one key (K = 1 on the space axis): there dq = dk = 0 exactly
    and the reference gets 0 to the last bit, while the space kernels form the softmax
    gradient's row term as rowsum(do * o) (FlashAttention's delta) instead of rowsum(p * dp):
    equal in exact math, they differ by a rounding of a Dh-term dot product. The floor is
    then 4 * sqrt(Dh) epsilons of the gradient's scale."""
    x64 = x64.to(dtype).double()                      # the same rounded inputs for everyone
    do = torch.randn(*x64.shape[:3], *x64.shape[4:], generator=gen, dtype=torch.float64).to(x64.device)
    res = {}
    for name, dt, be in (("oracle", torch.float64, "reference"), ("base", dtype, "reference"), ("kern", dtype, backend)):
        x = x64.to(dt).requires_grad_()
        o = factorized_attention(x, backend=be, **kw)
        assert o.shape == x64.shape[:3] + x64.shape[4:] and o.dtype == dt
        g, = torch.autograd.grad(o, x, do.to(dt))
        res[name] = (o.double(), g.double())
    for i, what in enumerate(("output", "grad qkv")):
        ref = res["oracle"][i]
        err_k = (res["kern"][i] - ref).abs().max().item()
        err_b = (res["base"][i] - ref).abs().max().item()
        floor = EPS[dtype] * ref.abs().max().item()
        if kw["axis"] == "space" and x64.shape[2] == 1 and i == 1:
            floor *= 4 * x64.shape[-1] ** 0.5
        bound = factor * err_b + floor
        desc = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        assert err_k <= bound, f"{backend} {what} error {err_k:.3g} > {factor} x reference {err_b:.3g} + eps ({desc})"


SPACE = [  # B, T, K, H, Dh, softcap, padded, causal, noncontig
    (1, 3, 1, 12, 64, 50.0, False, False, False),
    (1, 1, 3, 12, 88, 50.0, True, True, True),
    (1, 2, 90, 2, 64, 50.0, True, False, True),
    (1, 1, 197, 1, 88, 50.0, False, False, False),
    (1, 1, 257, 1, 64, 0.0, True, True, False),
    # K a multiple of 64: the kernels drop the out-of-range masks (even_k)
    (1, 1, 128, 2, 64, 50.0, False, False, True),
    (2, 1, 64, 1, 64, 0.0, True, True, False),
]
TIME = [  # B, T, K, H, Dh, N (None = identity pos), softcap, padded, causal, noncontig
    (1, 1, 3, 12, 64, None, 50.0, True, False, False),
    (2, 3, 90, 1, 88, 128, 50.0, True, True, True),
    (1, 16, 197, 1, 64, None, 50.0, False, False, False),
    (1, 16, 90, 1, 64, 256, 50.0, False, False, True),
    (1, 3, 257, 2, 64, 300, 50.0, True, False, False),
    (2, 16, 3, 12, 64, 5, 0.0, True, True, False),
]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", SPACE, ids=[f"K{c[2]}" for c in SPACE])
def test_space_matches_reference(case, dtype):
    B, T, K, H, Dh, cap, padded, causal, noncontig = case
    gen = torch.Generator().manual_seed(K)
    x = make_qkv(B, T, K, H, Dh, gen, noncontig=noncontig)
    kp = padding(B, T, K, "space", gen) if padded else None
    check(x, dtype, gen, axis="space", softcap=cap, key_padding=kp, causal=causal)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TIME, ids=[f"T{c[1]}K{c[2]}{'pos' if c[5] else ''}" for c in TIME])
def test_time_matches_reference(case, dtype):
    B, T, K, H, Dh, N, cap, padded, causal, noncontig = case
    gen = torch.Generator().manual_seed(T * 1000 + K)
    x = make_qkv(B, T, K, H, Dh, gen, noncontig=noncontig)
    pos = None if N is None else random_pos(B, T, K, N, gen)
    kp = padding(B, T, K, "time", gen) if padded else None
    check(x, dtype, gen, axis="time", softcap=cap, pos=pos, key_padding=kp, causal=causal)


@triton.jit
def _math_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, _tanh(x, True), mask=ok)
    tl.store(out_ptr + n + offs, _tanh(x, False), mask=ok)
    tl.store(out_ptr + 2 * n + offs, _exp2(x), mask=ok)
    tl.store(out_ptr + 3 * n + offs, _rcp(1.0 + tl.abs(x) / 25.0), mask=ok)


def test_bad_arguments_name_what_is_wrong():
    """Each of these ran before: a truthy string as causal, a NaN cap (as no cap), integer qkv."""
    x = make_qkv(1, 2, 3, 2, 8, torch.Generator().manual_seed(0)).float()
    for kw, needle in (({"causal": "no"}, "causal must be True or False"),
                       ({"softcap": float("nan")}, "softcap must be a finite number"),
                       ({"softcap": "50"}, "softcap must be a finite number")):
        with pytest.raises(ValueError, match=needle):
            factorized_attention(x, axis="space", backend="reference", **kw)
    with pytest.raises(ValueError, match="qkv must be a float tensor"):
        factorized_attention(x.long(), axis="space", backend="reference")
    # A NaN scale gave an all-NaN output; a string one, a ValueError that did not name it; a list as key padding an
    # AttributeError; num_locations below a pos index a scatter's RuntimeError (the reference), ignored by the others.
    pos = torch.tensor([[[0, 5], [1, 2]]])
    for kw, needle in (({"axis": "space", "scale": float("nan")}, "scale must be a finite number"),
                       ({"axis": "space", "scale": "a"}, "scale must be a finite number"),
                       ({"axis": "space", "key_padding": [[[False] * 3] * 2]},
                        "key_padding must be a bool .* got list"),
                       ({"axis": "time", "pos": pos, "num_locations": 4}, r"pos must hold .* in \[0, 4\)"),
                       ({"axis": "time", "pos": pos, "num_locations": 6.0}, "num_locations must be .* got 6.0"),
                       ({"axis": "time", "pos": pos, "num_locations": -1}, "num_locations must be .* got -1")):
        with pytest.raises(ValueError, match=needle):
            factorized_attention(x[:, :, :2] if "pos" in kw else x, backend="reference", **kw)
    # numpy's numbers and 0-d tensors stay accepted, with the same result as Python's
    ok = torch.tensor([[[0, 1], [1, 2]]])
    want = factorized_attention(x[:, :, :2], axis="time", backend="reference", pos=ok, num_locations=4, scale=0.5)
    for scale, n in ((np.float32(0.5), np.int64(4)), (torch.tensor(0.5), torch.tensor(4))):
        got = factorized_attention(x[:, :, :2], axis="time", backend="reference", pos=ok, num_locations=n, scale=scale)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dev", [pytest.param("cpu", marks=interp), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_math_helpers_meet_their_documented_error(dev):
    """The kernels' tanh, exp2 and reciprocal (PTX approximations on a GPU, Triton's portable
    functions in the interpreter) against float64 torch: relative error of the hardware
    tanh (bf16 only) <= 2^-10, of the accurate tanh <= 8 ulp, of exp2 and 1/x (on [1, 2])
    <= 4 ulp, over logits from 1e-7 to 25 in size."""
    mag = torch.cat([torch.logspace(-7, 0, 500, dtype=torch.float64), torch.linspace(0.5, 25, 1500, dtype=torch.float64)])
    x = torch.cat([mag, -mag, torch.zeros(1, dtype=torch.float64)]).float()
    out = torch.empty(4, x.numel(), device=dev)
    _math_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(dev), out, x.numel(), BLOCK=1024)
    xd = x.double()
    refs = (torch.tanh(xd), torch.tanh(xd), torch.exp2(xd), 1.0 / (1.0 + xd.abs() / 25.0))
    ulp = 2.0**-23
    for name, got, ref, bound in zip(("tanh fast", "tanh", "exp2", "rcp"), out.double().cpu(), refs,
                                     (2.0**-10, 8 * ulp, 4 * ulp, 4 * ulp)):
        rel = ((got - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
        assert rel <= bound, f"{name}: relative error {rel:.3g} > {bound:.3g}"


@interp
def test_fully_padded_rows_are_uniform():
    """Math oracle for the finite mask: a row with every key padded averages v over the keys
    of its sequence (the frame; on the masked time axis, the frames where it is visible)."""
    gen = torch.Generator().manual_seed(1)
    B, T, K, H, Dh = 1, 4, 6, 2, 16
    x = make_qkv(B, T, K, H, Dh, gen).float()
    kp = torch.ones(B, T, K, dtype=torch.bool)
    o = factorized_attention(x, axis="space", softcap=50.0, key_padding=kp, backend="triton")
    torch.testing.assert_close(o, x[:, :, :, 2].mean(2, keepdim=True).expand_as(o), rtol=1e-5, atol=1e-6)
    pos = torch.tensor([[[0, 1, 2, 3, 4, 5], [0, 2, 3, 4, 6, 7], [1, 2, 3, 4, 5, 7], [0, 1, 2, 3, 4, 5]]])
    o = factorized_attention(x, axis="time", pos=pos, key_padding=kp, backend="triton")
    # Location 5 is visible in frames 0, 2, 3 (slots 5, 4, 5): those three tokens average their v.
    members = [(0, 5), (2, 4), (3, 5)]
    v5 = torch.stack([x[0, t, k, 2] for t, k in members]).mean(0)
    for t, k in members:
        torch.testing.assert_close(o[0, t, k], v5, rtol=1e-5, atol=1e-6)
    # Location 6 is visible in frame 1 only: the token attends to itself.
    torch.testing.assert_close(o[0, 1, 4], x[0, 1, 4, 2], rtol=1e-5, atol=1e-6)


@interp
@pytest.mark.parametrize("axis", ["space", "time"])
def test_a_view_with_offsets_past_int32_gives_what_its_contiguous_copy_gives(axis):
    """The kernels take the batch offset in int64 and the rest in int32: a view whose q-to-v offset is 2^31
    (q, k and v projected into a [3, B, ...] buffer and permuted; giant at B ~ 190) read v 4 GiB early, the
    forward off by 100 (what lies there) and dq, dk with it. Such a view now runs as its contiguous copy, so both
    give the same bits. The buffer is 8 GiB of address space, of which the pages of q, k, v and the decoy are
    touched (a few MB)."""
    B, T, K, H, Dh = 1, 2, 16, 1, 16
    s3, at = 2**30, 2**31  # 2 * s3 wraps to -2^31: the wrapped v address is `at - 2^31`, the decoy
    s_k = H * Dh
    s_b = T * K * s_k
    buf = torch.empty(at + 2 * s3 + s_b * B, dtype=torch.float16)
    buf[:s_b * B].fill_(100.0)
    view = buf.as_strided((B, T, K, 3, H, Dh), (s_b, K * s_k, s_k, s3, Dh, 1), at)
    view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(0)))
    view.requires_grad_()
    copy = view.detach().contiguous().requires_grad_()
    pos = random_pos(B, T, K, 2 * K, torch.Generator().manual_seed(1)) if axis == "time" else None
    do = torch.randn(B, T, K, H, Dh, generator=torch.Generator().manual_seed(2)).half()
    for x in (view, copy):
        factorized_attention(x, axis=axis, pos=pos, softcap=50.0, backend="triton").backward(do)
    assert torch.equal(factorized_attention(view.detach(), axis=axis, pos=pos, softcap=50.0, backend="triton"),
                       factorized_attention(copy.detach(), axis=axis, pos=pos, softcap=50.0, backend="triton"))
    assert torch.equal(view.grad, copy.grad)


@interp
def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    B, T, K, H, Dh = 1, 3, 5, 2, 16
    x = make_qkv(B, T, K, H, Dh, gen, noncontig=True).float().requires_grad_()
    kp = padding(B, T, K, "space", gen)
    pos = random_pos(B, T, K, 8, gen)
    ops = torch.ops.videoprism
    torch.library.opcheck(ops.attention_space_fwd, (x, kp, 50.0, 0.25, True))
    torch.library.opcheck(ops.attention_time_fwd, (x, pos, kp, 50.0, 0.25, True))
    torch.library.opcheck(ops.attention_time_fwd, (x, None, None, 0.0, 0.25, False))
    o, m, logl = ops.attention_space_fwd(x.detach(), kp, 50.0, 0.25, True)
    do = torch.randn_like(o)
    torch.library.opcheck(ops.attention_space_bwd, (do, x.detach(), o, m, logl, kp, 50.0, 0.25, True))
    torch.library.opcheck(ops.attention_time_bwd, (do, x.detach(), pos, kp, 50.0, 0.25, True))


@interp
def test_compile_fullgraph_one_node_per_call():
    """torch.compile(fullgraph=True) of forward + backward: no graph break, each attention
    call is one custom-op node, and the gradients equal eager mode's."""
    gen = torch.Generator().manual_seed(4)
    B, T, K, H, Dh = 1, 3, 4, 2, 16
    x = make_qkv(B, T, K, H, Dh, gen).float()
    pos = random_pos(B, T, K, 6, gen)

    def step(qkv):
        a = factorized_attention(qkv, axis="space", softcap=50.0, backend="triton")
        b = factorized_attention(qkv, axis="time", softcap=50.0, pos=pos, backend="triton")
        c = factorized_attention(qkv, axis="time", softcap=50.0, backend="triton")
        return (a * b + c).square().sum()

    seen = []

    def count(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    xe = x.clone().requires_grad_()
    step(xe).backward()
    xc = x.clone().requires_grad_()
    torch.compile(step, fullgraph=True, backend=count)(xc).backward()
    assert seen.count("videoprism.attention_space_fwd.default") == 1, seen
    assert seen.count("videoprism.attention_time_fwd.default") == 2, seen
    torch.testing.assert_close(xc.grad, xe.grad)
    xc.grad = None
    torch.compile(step, fullgraph=True, backend="eager")(xc).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("dev", [pytest.param("cpu", marks=interp), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_encoder_with_triton_matches_golden(dev, golden_dir, golden_config, golden_inputs):
    """The whole encoder and the video-text model (causal, padded text) on the official goldens
    with every attention call on the Triton kernels (fp32; compiled on a GPU, else the
    interpreter), at the goldens' tolerance."""
    import os

    import numpy as np

    import videoprism as vp
    from tests.conftest import golden_overrides

    golden_inputs = {k: v.to(dev) for k, v in golden_inputs.items()}

    def load(name, section, params):
        model = vp.from_official(name, attention_backend="triton", **golden_overrides(golden_config[section]))
        return vp.load_flax_checkpoint(os.path.join(golden_dir, params), model).to(dev).eval()

    def want(name):
        with np.load(os.path.join(golden_dir, f"outputs_{name}.npz")) as f:
            return {k: f[k] for k in f.files}

    enc, w = load("videoprism_v1_base", "encoder", "params_encoder.npz"), want("encoder")
    with torch.no_grad():
        emb, aux = enc(golden_inputs["video"], golden_inputs["frame_paddings"], return_intermediate=True)
    np.testing.assert_allclose(emb.cpu().numpy(), w["embeddings_padded"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(aux["spatial_features"].cpu().numpy(), w["spatial_features_padded"], rtol=0, atol=2e-5)
    clip, w = load("videoprism_lvt_v1_base", "clip", "params_clip.npz"), want("clip")
    with torch.no_grad():
        v, t = clip(golden_inputs["video"], golden_inputs["text_ids"], golden_inputs["text_paddings"])[:2]
    np.testing.assert_allclose(v.cpu().numpy(), w["video_embeddings"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(t.cpu().numpy(), w["text_embeddings"], rtol=0, atol=2e-5)


@interp
def test_compiled_masked_encoder_train_step_has_no_graph_break():
    """torch.compile(fullgraph=True) of a masked encoder with the Triton ops, forward and
    backward graphs (a break raises); gradients equal the eager reference backend's."""
    import videoprism as vp

    gen = torch.Generator().manual_seed(10)
    kw = dict(model_dim=32, num_heads=2, mlp_dim=64, num_spatial_layers=1, num_temporal_layers=1,
              pos_emb_shape=(4, 4, 4))
    torch.manual_seed(0)
    ref = vp.from_official("videoprism_v1_base", attention_backend="reference", **kw)
    model = vp.from_official("videoprism_v1_base", attention_backend="triton", **kw)
    model.load_state_dict(ref.state_dict())
    video = torch.rand(1, 4, 72, 72, 3, generator=gen)
    pos = random_pos(1, 4, 7, 16, gen)

    def step(m, call):
        call(video, pos=pos)[0].square().mean().backward()
        return {n: p.grad for n, p in m.named_parameters()}

    want = step(ref, ref)
    # aot_eager traces the backward as well (through the ops' registered autograd).
    got = step(model, torch.compile(model, fullgraph=True, backend="aot_eager"))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("axis,masked", [("space", False), ("time", False), ("time", True)])
def test_flex_matches_reference(axis, masked):
    """FlexAttention has no backward on the CPU: forward only here (gradients in the gpu test)."""
    gen = torch.Generator().manual_seed(5)
    B, T, K, H, Dh = 2, 3, 5, 2, 16
    x = make_qkv(B, T, K, H, Dh, gen).float()
    pos = random_pos(B, T, K, 8, gen) if masked else None
    kw = dict(axis=axis, softcap=50.0, pos=pos, key_padding=padding(B, T, K, axis, gen), causal=True)
    torch.testing.assert_close(factorized_attention(x, backend="flex", **kw),
                               factorized_attention_ref(x, **kw), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'flex' has no backward on the CPU.*'reference'"):
        factorized_attention(x.requires_grad_(), backend="flex", **kw)
    with torch.no_grad():
        factorized_attention(x, backend="flex", **kw)


def test_sdpa_matches_reference_without_cap():
    gen = torch.Generator().manual_seed(6)
    x = make_qkv(2, 3, 5, 2, 16, gen).float()
    for axis in ("space", "time"):
        kw = dict(axis=axis, key_padding=padding(2, 3, 5, axis, gen), causal=True)
        torch.testing.assert_close(factorized_attention(x, backend="sdpa", **kw),
                                   factorized_attention_ref(x, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sdpa_fp16_with_key_padding(dev):
    """The additive mask's fill fits fp16 (the fp32 one overflowed it); causal with the first keys padded leaves a
    query nothing to attend to, which averages all values as a fully padded row does (fp16 kept parts of the
    scores there: off by up to 6.8). On a GPU, SDPA's fused fp16 kernels take the same masks."""
    gen = torch.Generator().manual_seed(7)
    x = make_qkv(2, 3, 5, 2, 16, gen).float() * 3
    for axis in ("space", "time"):
        kp = padding(2, 3, 5, axis, gen)
        lead = kp.clone()
        lead[0, :2, :2] = lead[1, :, :2] = True  # the first keys of some space rows padded, and of some time rows
        lead[0, :2, 2:] = False
        for kw in (dict(key_padding=kp), dict(key_padding=lead, causal=True)):
            got = factorized_attention(x.half().to(dev), backend="sdpa", axis=axis,
                                       **{k: v.to(dev) if torch.is_tensor(v) else v for k, v in kw.items()})
            torch.testing.assert_close(got.float().cpu(), factorized_attention_ref(x, axis=axis, **kw),
                                       rtol=2e-2, atol=2e-2)


def test_time_axis_pos_must_be_sorted_and_on_the_device():
    x = torch.zeros(1, 2, 3, 3, 1, 8)
    with pytest.raises(ValueError, match="increasing order"):
        factorized_attention(x, axis="time", pos=torch.tensor([[[0, 2, 1], [0, 1, 2]]]))
    with pytest.raises(ValueError, match="move it to qkv's device"):
        factorized_attention(x, axis="time", pos=torch.arange(3).expand(1, 2, 3).to("meta"))


def test_unsupported_combinations_name_a_backend_that_works():
    x = torch.zeros(1, 2, 3, 3, 1, 8)
    pos = torch.arange(3).expand(1, 2, 3).contiguous()
    cases = [
        (dict(backend="sdpa", softcap=50.0), "'triton'"),
        (dict(backend="sdpa", pos=pos, axis="time"), "'triton'"),
        (dict(backend="nope"), "one of"),
        (dict(axis="depth"), "'space'"),
        (dict(pos=pos), "axis='time'"),
        (dict(axis="time", pos=pos.float()), "integer"),
        (dict(key_padding=torch.zeros(1, 2, 3)), "bool"),
        (dict(softcap=-1.0), "softcap"),
    ]
    for kw, needle in cases:
        kw = {"axis": "space", **kw}
        with pytest.raises(ValueError, match=needle):
            factorized_attention(x, **kw)
    with pytest.raises(ValueError, match=r"\[B, T, K, 3, H, Dh\]"):
        factorized_attention(x[:, :, :, :2], axis="space")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="'triton'"):
            factorized_attention(x.half(), axis="space", softcap=50.0, backend="flash")
    if INTERPRET:
        with pytest.raises(ValueError, match="64 frames"):
            factorized_attention(torch.zeros(1, 65, 1, 3, 1, 8), axis="time", backend="triton")
        with pytest.raises(ValueError, match="256"):
            factorized_attention(torch.zeros(1, 1, 1, 3, 1, 264), axis="space", backend="triton")
        with pytest.raises(ValueError, match="32 frames"):
            factorized_attention(torch.zeros(1, 33, 1, 3, 1, 136, requires_grad=True), axis="time", backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at model-like sizes, the other backends with gradients, Inductor
# ---------------------------------------------------------------------------------------------
# Each case is a compile of every kernel variant it touches (dtype, head dim, flags), so the
# matrix is the model's cases once in bf16, and one space and one time case in fp16 / fp32.
GPU_CASES = [  # axis, B, T, K, H, Dh, N (masked time), padded, causal
    ("space", 2, 8, 256, 12, 64, None, False, False),     # full frame
    ("space", 2, 8, 90, 12, 64, None, True, False),       # masked frame, padded keys
    ("space", 4, 1, 64, 8, 88, None, True, True),         # text encoder
    ("time", 2, 16, 256, 12, 64, None, False, False),     # unmasked time axis
    ("time", 2, 16, 90, 12, 64, 256, True, False),        # masked time axis, padded
    ("time", 2, 8, 128, 16, 88, 256, False, True),
    ("time", 2, 16, 90, 16, 88, 256, False, False),       # giant, masked: the 8-warp tiles of head dim 128
]
# fp32 last: its kernels take the longest to compile (bench/device_check.sh's time box may cut them).
GPU_DTYPES = [(c, torch.bfloat16) for c in GPU_CASES] + [(GPU_CASES[i], dt) for dt in (torch.float16, torch.float32)
                                                         for i in (1, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", GPU_DTYPES,
                         ids=[f"{c[0]}-T{c[2]}K{c[3]}Dh{c[5]}{'pos' if c[6] else ''}-{str(d)[6:]}" for c, d in GPU_DTYPES])
def test_gpu_triton_matches_reference(case, dtype):
    axis, B, T, K, H, Dh, N, padded, causal = case
    gen = torch.Generator().manual_seed(7)
    x = make_qkv(B, T, K, H, Dh, gen, noncontig=True, device="cuda")
    pos = None if N is None else random_pos(B, T, K, N, gen).cuda()
    kp = padding(B, T, K, axis, gen, device="cuda") if padded else None
    check(x, dtype, gen, axis=axis, softcap=50.0, pos=pos, key_padding=kp, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "flash"])
@pytest.mark.parametrize("axis,masked", [("space", False), ("time", True)])
def test_gpu_other_backends_match_reference(backend, axis, masked):
    """Gradients of the other soft-cap backends (all three layouts run forward on the CPU)."""
    if backend == "flash":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
        if masked:
            pytest.skip("flash-attn takes no pos map")
    gen = torch.Generator().manual_seed(8)
    B, T, K, H, Dh = 2, 16, 90, 4, 64
    x = make_qkv(B, T, K, H, Dh, gen, device="cuda")
    pos = random_pos(B, T, K, 256, gen).cuda() if masked else None
    # Third-party kernels (flash-attn's cap uses the approximate tanh instruction): what is
    # tested here is our wrapping (layouts, scale, cap, masks), where a mistake is O(1), so
    # their precision is held to 4x the reference's error rather than the 2x of our kernels.
    check(x, torch.bfloat16, gen, backend=backend, factor=4.0, axis=axis, softcap=50.0, pos=pos)


@pytest.mark.gpu
def test_gpu_inductor_fullgraph_forward_backward():
    gen = torch.Generator().manual_seed(9)
    B, T, K, H, Dh = 2, 8, 90, 4, 64
    lin = torch.nn.Linear(H * Dh, 3 * H * Dh, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randn(B, T, K, H * Dh, generator=gen).to("cuda", torch.bfloat16)
    pos = random_pos(B, T, K, 256, gen).cuda()

    def step(t):
        qkv = lin(t).view(B, T, K, 3, H, Dh)
        a = factorized_attention(qkv, axis="space", softcap=50.0, backend="triton")
        b = factorized_attention(qkv, axis="time", softcap=50.0, pos=pos, backend="triton")
        return (a.float() * b.float()).sum()

    te = tokens.clone().requires_grad_()
    step(te).backward()
    tc = tokens.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(tc).backward()
    torch.testing.assert_close(tc.grad, te.grad, rtol=2e-2, atol=2e-2)


@interp
def test_bench_records_the_tiles_each_kernel_ran_with():
    """bench.attention writes, per Triton row, the tiles the search picked for every kernel
    of the row (what the fixed defaults are set from); here the interpreter's defaults."""
    from bench.attention import _chosen_tiles

    gen = torch.Generator().manual_seed(5)
    x = make_qkv(1, 2, 8, 2, 16, gen).float().requires_grad_()
    for axis in ("space", "time"):
        factorized_attention(x, axis=axis, softcap=50.0, backend="triton").sum().backward()
    assert _chosen_tiles("space", True) == ("space_fwd_kernel 64x64 w4 s1; space_bwd_dq_kernel 64x64 w4 s1; "
                                            "space_bwd_dkdv_kernel 64x64 w4 s1")
    assert _chosen_tiles("time", False) == "time_fwd_kernel 32x2 w4 s1"


@interp
@pytest.mark.parametrize("tiles", [(128, 32), (32, 32)], ids=["128x32", "32x32"])
def test_space_kernels_at_other_tiles(tiles, monkeypatch):
    """The interpreter runs one tile (64 x 64); the GPU runs others (128 x 32 is the default at
    K = 90, 32 x 32 a search candidate): the kernels' partial query and key tiles at those
    sizes, against the fp64 oracle (2x rule), forward and gradient."""
    from videoprism.kernels import factorized_attention_space as sp

    m, n = tiles
    monkeypatch.setattr(sp, "_default_config", lambda fwd, bd, K: triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1))
    kernels = (sp._space_fwd_kernel, sp._space_bwd_dq_kernel, sp._space_bwd_dkdv_kernel)
    for k in kernels:
        k.cache.clear()             # the search remembers its pick per shape key
    try:
        gen = torch.Generator().manual_seed(90)
        x = make_qkv(1, 1, 90, 1, 64, gen, noncontig=True)
        check(x, torch.float32, gen, axis="space", softcap=50.0)
        kp = padding(1, 1, 90, "space", gen)
        check(x, torch.float32, gen, axis="space", softcap=50.0, key_padding=kp)
        for k in kernels:
            assert k.best_config.kwargs == {"BLOCK_M": m, "BLOCK_N": n}, k.best_config
    finally:
        for k in kernels:
            k.cache.clear()


def test_tile_search_skips_short_sequences(monkeypatch):
    """With the search on (a GPU run), a frame of K >= SEARCH_MIN_K tokens gets every candidate that fits;
    a text-length sequence gets the one fixed config, so a new text length never starts a search mid-run."""
    from videoprism.kernels import factorized_attention_space as sp

    monkeypatch.setattr(sp, "INTERPRET", False)
    monkeypatch.setattr(sp, "AUTOTUNE", True)
    for fwd in (True, False):
        prune, configs = sp._prune(fwd), sp._configs(fwd)
        assert len(prune(configs, {"K": 256}, BLOCK_D=64)) == len(configs)
        assert len(prune(configs, {"K": sp.SEARCH_MIN_K}, BLOCK_D=64)) == len(configs)
        for K in (8, 40, 65):  # 65: the text tower's longest sequence, 64 tokens and the class token
            (only,) = prune(configs, {"K": K}, BLOCK_D=64)
            assert str(only) == str(sp._default_config(fwd, 64, K))
