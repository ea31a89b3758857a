"""Factorized soft-capped attention, time axis: Triton kernels and launchers.

The reference and the math are in factorized_attention.py. On the time axis a sequence
is one spatial location of one clip across the frames where it is visible (all T frames
with the identity `pos`), so sequences are short (T <= 64) and very many (B * N). One
program holds BLOCK_S whole sequences x one head in registers, `[BLOCK_S, T, Dh]` per
operand, and does the T x T problem with batched (3-D) `tl.dot`: no online softmax, no
saved statistics, and the backward recomputes everything from q, k, v and do.

Masked time axis (DESIGN 4): frame t keeps K tokens, `pos[b, t, k]` is the spatial index.
`time_sequence_table(pos)` lists each visible location once, by its first visible token
(the "leader"), as a row of T entries `b * K + slot` (the slot of the location in frame t,
-1 where hidden). Every token belongs to exactly one row, so the kernels read and write
every token exactly once, with no atomics. Rows are packed to the front; the number of rows
is a device scalar and the programs past it return at once (no host sync, static shapes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from videoprism.kernels.factorized_attention import (
    _MASK,
    INTERPRET,
    _kp_args,
    _tanh,
    block_d,
    dot_precision,
    time_gather_index,
)


def time_sequence_table(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [B, T, K] -> (table [B*T*K, T] int32, n_seq [] int32).

    Row r < n_seq: one visible location; table[r, t] = b * K + (slot of it in frame t), or
    -1 where it is hidden in frame t. Rows are in (b, first frame, slot) order; rows >= n_seq
    are -1. Plain tensor ops, no host sync."""
    B, T, K = pos.shape
    idx, valid = time_gather_index(pos)                                   # [B, T, K, T']
    frames = torch.arange(T, device=pos.device)
    first = valid.to(torch.uint8).argmax(-1)                              # first visible frame
    leader = (first == frames[None, :, None]).reshape(-1)                 # [B*T*K]
    b = torch.arange(B, device=pos.device)[:, None, None, None]
    entry = torch.where(valid, b * K + idx, -1).to(torch.int32).reshape(-1, T)
    n = B * T * K
    dest = torch.where(leader, torch.cumsum(leader, 0) - 1, n)            # non-leaders -> spare row
    table = torch.full((n + 1, T), -1, dtype=torch.int32, device=pos.device)
    table[dest] = entry
    return table[:n], leader.sum().to(torch.int32)


def _time_configs(fwd: bool):
    """Sequences per program (BLOCK_S) and warps: one config in the interpreter (it runs one
    numpy op per tile op, so big tiles there only cost memory); on the GPU a small search,
    pruned to tiles of at most 16K (forward) / 8K (backward: it holds q, k, v, do and three
    gradients) elements per operand."""
    if INTERPRET:
        return [triton.Config({"BLOCK_S": 32}, num_warps=4, num_stages=1)]
    sizes = (4, 8, 16) if fwd else (2, 4, 8)
    return [triton.Config({"BLOCK_S": bs}, num_warps=w, num_stages=1) for bs in sizes for w in (4, 8)]


def _time_prune(budget: int):
    def prune(configs, named_args, **kw):
        tile = kw["BLOCK_T"] * kw["BLOCK_D"]
        keep = [c for c in configs if c.kwargs["BLOCK_S"] * tile <= budget]
        return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_S"])]
    return prune


@triton.jit
def _time_rows(seq, table, n_seq, T, K, s_b, s_t, s_k,
               HAS_TABLE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per (sequence, frame): the element offset of its token in a [B, T, K, ...] tensor with
    strides (s_b, s_t, s_k), its batch and slot, and whether it exists. [BLOCK_S, BLOCK_T]."""
    frames = tl.arange(0, BLOCK_T)
    live = (seq < n_seq)[:, None] & (frames < T)[None, :]
    if HAS_TABLE:
        e = tl.load(table + seq.to(tl.int64)[:, None] * T + frames[None, :], mask=live, other=-1)
        valid = e >= 0
        e = tl.where(valid, e, 0)
        b = e // K
        slot = e % K
    else:
        valid = live
        b = tl.where(live, seq[:, None] // K, 0)
        slot = tl.where(live, seq[:, None] % K, 0)
    f64 = frames.to(tl.int64)[None, :]
    return b, slot, valid, b.to(tl.int64) * s_b + f64 * s_t + slot * s_k


@triton.jit
def _time_probs(q, k, b, slot, valid, kp, kp_b, kp_t, kp_k, scale, softcap,
                SOFTCAP: tl.constexpr, HAS_KP: tl.constexpr, CAUSAL: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr):
    """Softmax of the capped, masked logits of whole sequences: (p, th, keep) [S, T, T'].
    Padded / future keys: MASK_VALUE (finite: a fully padded row is uniform over the frames
    where the location is visible); hidden frames and frames past T: -inf (no key)."""
    s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=DOT_PREC) * scale
    th = s
    if SOFTCAP:
        th = _tanh(s / softcap)
        s = softcap * th
    keep = valid[:, None, :] & (tl.arange(0, BLOCK_T) >= 0)[None, :, None]   # -> [S, T, T']
    if HAS_KP:
        pad = tl.load(kp + b.to(tl.int64) * kp_b + tl.arange(0, BLOCK_T)[None, :].to(tl.int64) * kp_t
                      + slot * kp_k, mask=valid, other=1) != 0
        keep = keep & ~pad[:, None, :]
    if CAUSAL:
        fr = tl.arange(0, BLOCK_T)
        keep = keep & (fr[None, None, :] <= fr[None, :, None])
    s = tl.where(keep, s, _MASK)
    s = tl.where(valid[:, None, :], s, float("-inf"))
    m = tl.max(s, 2)
    m = tl.where(m == float("-inf"), 0.0, m)          # rows of empty lanes: avoid inf - inf
    p = tl.exp(s - m[:, :, None])
    l = tl.sum(p, 2)
    p = p / tl.where(l > 0, l, 1.0)[:, :, None]      # l = 0 only on empty lanes
    return p, th, keep


@triton.autotune(configs=_time_configs(True), key=["T", "K", "HAS_TABLE", "BLOCK_T", "BLOCK_D", "SOFTCAP"],
                 prune_configs_by={"early_config_prune": _time_prune(16384)})
@triton.jit
def _time_fwd_kernel(
    qkv, o, table, n_seq_ptr, kp,
    s_b, s_t, s_k, s_3, s_h, s_d,
    o_b, o_t, o_k, o_h,
    kp_b, kp_t, kp_k,
    T, K, Dh, n_seq_dense, scale, softcap,
    HAS_TABLE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KP: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Time-axis forward: one program per (BLOCK_S sequences, head h).

    Math, per sequence and head (T' = the frames, fp32 accumulation):
        s = scale * q @ k^T [T, T'] ; s = c * tanh(s / c) ; masked as in _time_probs
        o = softmax(s) @ v
    Layout: q, k, v gathered per frame through the strides of qkv [B, T, K, 3, H, Dh]
    (identity: slot k in every frame; masked: the table row); o [B, T, K, H, Dh].
    FLOPs: 4 * (#sequences) * H * T^2 * Dh on the padded BLOCK_T (>= 16) tile.
    Bytes: every token's q, k, v read once and o written once: 4 * B*T*K*H*Dh elements.
    """
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if HAS_TABLE:
        n_seq = tl.load(n_seq_ptr)
    else:
        n_seq = n_seq_dense
    if pid * BLOCK_S >= n_seq:
        return
    seq = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    b, slot, valid, off = _time_rows(seq, table, n_seq, T, K, s_b, s_t, s_k, HAS_TABLE, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < Dh)[None, None, :]
    msk = valid[:, :, None] & d_ok
    ptr = qkv + off[:, :, None] + h * s_h + offs_d[None, None, :] * s_d
    q = tl.load(ptr, mask=msk, other=0.0)
    k = tl.load(ptr + s_3, mask=msk, other=0.0)
    v = tl.load(ptr + 2 * s_3, mask=msk, other=0.0)
    p, th, keep = _time_probs(q, k, b, slot, valid, kp, kp_b, kp_t, kp_k, scale, softcap,
                              SOFTCAP, HAS_KP, CAUSAL, DOT_PREC, BLOCK_T)
    out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    o_off = b.to(tl.int64) * o_b + tl.arange(0, BLOCK_T).to(tl.int64)[None, :] * o_t + slot * o_k
    tl.store(o + o_off[:, :, None] + h * o_h + offs_d[None, None, :], out.to(o.dtype.element_ty), mask=msk)


@triton.autotune(configs=_time_configs(False), key=["T", "K", "HAS_TABLE", "BLOCK_T", "BLOCK_D", "SOFTCAP"],
                 prune_configs_by={"early_config_prune": _time_prune(8192)})
@triton.jit
def _time_bwd_kernel(
    qkv, do, dqkv, table, n_seq_ptr, kp,
    s_b, s_t, s_k, s_3, s_h, s_d,
    do_b, do_t, do_k, do_h, do_d,
    g_b, g_t, g_k, g_3, g_h,
    kp_b, kp_t, kp_k,
    T, K, Dh, n_seq_dense, scale, softcap,
    HAS_TABLE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KP: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Time-axis backward, one kernel: recompute p from q, k, then
        dv = p^T @ do ; dp = do @ v^T ; delta = rowsum(p * dp) (= rowsum(do * o))
        ds = p * (dp - delta) * (1 - tanh^2(s_raw / c)), 0 where masked
        dq = scale * ds @ k ; dk = scale * ds^T @ q  -> dqkv [B, T, K, 3, H, Dh]
    FLOPs: 10 * (#sequences) * H * T^2 * Dh (s, o-free delta, dp, dv, dq, dk).
    Bytes: q, k, v, do read and dq, dk, dv written once: 7 * B*T*K*H*Dh elements.
    """
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if HAS_TABLE:
        n_seq = tl.load(n_seq_ptr)
    else:
        n_seq = n_seq_dense
    if pid * BLOCK_S >= n_seq:
        return
    seq = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    b, slot, valid, off = _time_rows(seq, table, n_seq, T, K, s_b, s_t, s_k, HAS_TABLE, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < Dh)[None, None, :]
    msk = valid[:, :, None] & d_ok
    ptr = qkv + off[:, :, None] + h * s_h + offs_d[None, None, :] * s_d
    q = tl.load(ptr, mask=msk, other=0.0)
    k = tl.load(ptr + s_3, mask=msk, other=0.0)
    v = tl.load(ptr + 2 * s_3, mask=msk, other=0.0)
    frames = tl.arange(0, BLOCK_T).to(tl.int64)[None, :]
    do_off = b.to(tl.int64) * do_b + frames * do_t + slot * do_k
    dout = tl.load(do + do_off[:, :, None] + h * do_h + offs_d[None, None, :] * do_d, mask=msk, other=0.0)
    p, th, keep = _time_probs(q, k, b, slot, valid, kp, kp_b, kp_t, kp_k, scale, softcap,
                              SOFTCAP, HAS_KP, CAUSAL, DOT_PREC, BLOCK_T)
    p = tl.where(valid[:, :, None], p, 0.0)           # hidden frames are no queries
    dv = tl.dot(tl.permute(p.to(dout.dtype), (0, 2, 1)), dout, input_precision=DOT_PREC)
    dp = tl.dot(dout, tl.permute(v, (0, 2, 1)), input_precision=DOT_PREC)
    delta = tl.sum(p * dp, 2)
    ds = p * (dp - delta[:, :, None])
    if SOFTCAP:
        ds = ds * (1.0 - th * th)
    ds = tl.where(keep, ds, 0.0)
    dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * scale
    dk = tl.dot(tl.permute(ds.to(q.dtype), (0, 2, 1)), q, input_precision=DOT_PREC) * scale
    g_off = b.to(tl.int64) * g_b + frames * g_t + slot * g_k
    g = dqkv + g_off[:, :, None] + h * g_h + offs_d[None, None, :]
    ty = dqkv.dtype.element_ty
    tl.store(g, dq.to(ty), mask=msk)
    tl.store(g + g_3, dk.to(ty), mask=msk)
    tl.store(g + 2 * g_3, dv.to(ty), mask=msk)


def _launch_args(qkv: torch.Tensor, pos: torch.Tensor | None, key_padding: torch.Tensor | None):
    B, T, K, _, H, Dh = qkv.shape
    if pos is None:
        table, n_seq, n_dense = qkv, qkv, B * K
    else:
        table, n_seq = time_sequence_table(pos)
        n_dense = 0
    kp, kps, has_kp = _kp_args(key_padding, qkv)
    return table, n_seq, n_dense, kp, kps, has_kp


def attention_time_fwd(qkv: torch.Tensor, pos: torch.Tensor | None, key_padding: torch.Tensor | None,
                       softcap: float, scale: float, causal: bool) -> torch.Tensor:
    """Launch the time-axis forward: qkv [B, T, K, 3, H, Dh] (any strides) -> o [B, T, K, H, Dh]."""
    B, T, K, _, H, Dh = qkv.shape
    o = qkv.new_empty(B, T, K, H, Dh)
    table, n_seq, n_dense, kp, kps, has_kp = _launch_args(qkv, pos, key_padding)
    rows = B * K if pos is None else B * T * K
    _time_fwd_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_S"]), H)](
        qkv, o, table, n_seq, kp, *qkv.stride(), *o.stride()[:4], *kps,
        T, K, Dh, n_dense, scale, softcap,
        HAS_TABLE=pos is not None, SOFTCAP=softcap > 0, HAS_KP=has_kp, CAUSAL=causal,
        DOT_PREC=dot_precision(qkv.dtype), BLOCK_T=max(16, triton.next_power_of_2(T)), BLOCK_D=block_d(Dh))
    return o


def attention_time_bwd(do: torch.Tensor, qkv: torch.Tensor, pos: torch.Tensor | None,
                       key_padding: torch.Tensor | None, softcap: float, scale: float, causal: bool) -> torch.Tensor:
    """Launch the time-axis backward. Returns dqkv [B, T, K, 3, H, Dh] (contiguous)."""
    B, T, K, _, H, Dh = qkv.shape
    dqkv = qkv.new_empty(B, T, K, 3, H, Dh)
    table, n_seq, n_dense, kp, kps, has_kp = _launch_args(qkv, pos, key_padding)
    rows = B * K if pos is None else B * T * K
    _time_bwd_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_S"]), H)](
        qkv, do, dqkv, table, n_seq, kp, *qkv.stride(), *do.stride(), *dqkv.stride()[:5], *kps,
        T, K, Dh, n_dense, scale, softcap,
        HAS_TABLE=pos is not None, SOFTCAP=softcap > 0, HAS_KP=has_kp, CAUSAL=causal,
        DOT_PREC=dot_precision(qkv.dtype), BLOCK_T=max(16, triton.next_power_of_2(T)), BLOCK_D=block_d(Dh))
    return dqkv
