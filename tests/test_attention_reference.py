"""The reference factorized attention against a naive per-sequence loop (its own oracle).

The loop builds each sequence explicitly (a frame's tokens; the frames where a spatial
location is visible), runs textbook soft-capped attention in float64, and scatters back.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import random_pos
from videoprism.kernels.factorized_attention import MASK_VALUE, factorized_attention_ref


def _attend(q, k, v, keep, cap):
    """q [S, H, Dh], k/v [S', H, Dh], keep [S, S'] bool -> [S, H, Dh], float64."""
    s = torch.einsum("shd,thd->hst", q * q.shape[-1] ** -0.5, k)
    if cap > 0:
        s = cap * torch.tanh(s / cap)
    s = torch.where(keep[None], s, torch.tensor(MASK_VALUE, dtype=s.dtype))
    return torch.einsum("hst,thd->shd", torch.softmax(s, -1), v)


def naive(qkv, axis, cap, pos, key_padding, causal):
    B, T, K, _, H, Dh = qkv.shape
    x = qkv.double()
    out = torch.zeros(B, T, K, H, Dh, dtype=torch.float64)
    kp = torch.zeros(B, T, K, dtype=torch.bool) if key_padding is None else key_padding
    if pos is None:
        pos = torch.arange(K).expand(B, T, K)
    for b in range(B):
        if axis == "space":
            for t in range(T):
                keep = ~kp[b, t][None, :].expand(K, K)
                if causal:
                    keep = keep & torch.ones(K, K, dtype=torch.bool).tril()
                out[b, t] = _attend(x[b, t, :, 0], x[b, t, :, 1], x[b, t, :, 2], keep, cap)
        else:
            for loc in pos[b].unique().tolist():
                members = [(t, k) for t in range(T) for k in range(K) if pos[b, t, k] == loc]
                ts = torch.tensor([t for t, _ in members])
                q = torch.stack([x[b, t, k, 0] for t, k in members])
                kk = torch.stack([x[b, t, k, 1] for t, k in members])
                vv = torch.stack([x[b, t, k, 2] for t, k in members])
                keep = ~torch.stack([kp[b, t, k] for t, k in members])[None, :].expand(len(members), -1)
                if causal:
                    keep = keep & (ts[None, :] <= ts[:, None])
                o = _attend(q, kk, vv, keep, cap)
                for i, (t, k) in enumerate(members):
                    out[b, t, k] = o[i]
    return out


@pytest.mark.parametrize("axis,masked_pos", [("space", False), ("time", False), ("time", True)])
@pytest.mark.parametrize("cap,causal,padded", [(0.0, False, False), (5.0, False, True), (5.0, True, True)])
def test_reference_matches_naive_loop(axis, masked_pos, cap, causal, padded):
    gen = torch.Generator().manual_seed(0)
    B, T, K, H, Dh, N = 2, 4, 5, 2, 3, 9
    qkv = torch.randn(B, T, K, 3, H, Dh, generator=gen, dtype=torch.float64) * 3
    pos = random_pos(B, T, K, N, gen) if masked_pos else None
    kp = (torch.rand(B, T, K, generator=gen) < 0.3) if padded else None
    if padded and axis == "space":
        kp[0, 1] = True  # a fully padded frame: uniform attention, not NaN
    got = factorized_attention_ref(qkv, axis=axis, softcap=cap, pos=pos, key_padding=kp, causal=causal)
    want = naive(qkv, axis, cap, pos, kp, causal)
    assert torch.isfinite(got).all()
    # The reference computes in fp32 (as the official model does); the loop in fp64.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", ["space", "time"])
def test_half_inputs_are_attended_in_fp32_and_rounded_once(axis, dtype):
    """DESIGN 3: softmax in fp32. bf16/fp16 qkv (a bf16 model on the reference backend) are scored, soft-capped
    and softmaxed in fp32: the output is the fp64 attention of the same rounded inputs, rounded once to the
    dtype, so off by at most half its ulp (2^-8 of the largest output in bf16, 2^-11 in fp16; the fp32 work
    adds ~1e-6). Computed in the input dtype instead, the logits (up to ~50) are rounded to steps of 0.25."""
    gen = torch.Generator().manual_seed(1)
    B, T, K, H, Dh = 2, 3, 24, 2, 16
    qkv = (torch.randn(B, T, K, 3, H, Dh, generator=gen, dtype=torch.float64) * 2.5).to(dtype)
    kp = torch.rand(B, T, K, generator=gen) < 0.2
    got = factorized_attention_ref(qkv, axis=axis, softcap=50.0, key_padding=kp)
    want = naive(qkv.double(), axis, 50.0, None, kp, False)
    assert got.dtype == dtype
    half_ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    err = (got.double() - want).abs().max().item()
    assert err <= (half_ulp + 1e-5) * want.abs().max().item(), err
