"""Factorized soft-capped attention, time axis: Triton kernels and launchers.

The reference and the math are in factorized_attention.py, the shared helpers in
factorized_attention_space.py. On the time axis a sequence
is one spatial location of one clip across the frames where it is visible (all T frames
with the identity `pos`), so sequences are short (T <= 64) and very many (B * N). One
program holds BLOCK_S whole sequences x HEADS heads, one head at a time in registers,
`[BLOCK_S, T, Dh]` per operand, and does the T x T problem with batched (3-D) `tl.dot`: no
online softmax, no saved statistics; the backward recomputes everything from q, k, v, do.

Masked time axis (DESIGN 4): frame t keeps K tokens, `pos[b, t, k]` is the spatial index,
sorted within the frame. The gather is fused: a program takes BLOCK_S slots of one frame
t, binary-searches each slot's location in every frame's row of `pos` (the slot holding it
there, or hidden), and keeps the slots that are their location's *leader* (no earlier frame
shows it). A leader's program owns the whole sequence of its location: it reads every
token of it and writes every result of it, so each token is read and written exactly once,
with no atomics, no index tensors and no extra launches. Programs without a leader return
at once (with tube masking, all frames after the first).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from videoprism.kernels import factorized_attention_space as _space
from videoprism.kernels.device_guard import on_tensor_device
from videoprism.kernels.factorized_attention_space import (
    _MASK,
    INTERPRET,
    _kp_args,
    _capped_logits,
    _exp2,
    autotune_bench,
    block_d,
    dot_precision,
    fast_tanh,
    int32_offsets,
    logit_consts,
)


def _time_configs(fwd: bool):
    """Candidates for the search (AUTOTUNE in factorized_attention_space.py):
    (BLOCK_S sequences, HEADS per program, warps). The 8-warp one- and two-sequence tiles are
    the ones that do not spill at padded head dims of 128 (see _time_prune)."""
    shapes = [(4, 1, 4), (8, 1, 4), (16, 1, 8), (4, 4, 4), (8, 2, 4), (8, 4, 4), (1, 1, 8), (2, 1, 8), (2, 4, 8)] \
        if fwd else [(2, 1, 4), (4, 1, 4), (8, 1, 8), (2, 4, 4), (4, 2, 4), (4, 4, 4), (1, 1, 4), (1, 1, 8), (2, 1, 8)]
    return [triton.Config({"BLOCK_S": bs, "HEADS": hp}, num_warps=w, num_stages=1) for bs, hp, w in shapes]


def _time_prune(fwd: bool):
    """Tiles of at most 16K (forward) / 8K (backward: it holds q, k, v, do and three
    gradients) elements per operand, head groups that divide H. Without the search, at T = 16:
    - padded head dim 64 (VideoPrism B, L): 4 (forward) / 2 (backward) sequences, 4 warps, and
      on the masked axis up to 4 heads per program, which share its pos search: 76 / 118
      registers a thread, no spill (sm_90, Triton 3.6; tools/triton_compile_check.py --json);
    - padded head dim 128 (giant's 88): those tiles spill 928 / 464 bytes a thread, so 2 / 1
      sequences on 8 warps and one head per backward program: 193 / 187 registers (196 / 188 before
      the log2-unit arithmetic of ff292fd; bench/RESULTS.md), no spill.
    The search, on by default on a GPU, tries the rest. The interpreter (one numpy op per tile
    op) takes 32 sequences and all heads: the fewest programs."""
    budget = 16384 if fwd else 8192

    def prune(configs, named_args, **kw):
        H, tile = named_args["H"], kw["BLOCK_T"] * kw["BLOCK_D"]
        if INTERPRET:
            return [triton.Config({"BLOCK_S": 32, "HEADS": H}, num_warps=4, num_stages=1)]
        wide = kw["BLOCK_D"] >= 128
        bs = max(1, min(4 if fwd else 2, (budget // 4 if wide else budget) // tile))
        hp = max(h for h in (1, 2, 4) if H % h == 0) if kw["HAS_POS"] and (fwd or not wide) else 1
        warps = 8 if wide else 4
        default = triton.Config({"BLOCK_S": bs, "HEADS": hp}, num_warps=warps, num_stages=1)
        if not _space.AUTOTUNE:                # read at call time
            return [default]
        keep = [c for c in configs if c.kwargs["BLOCK_S"] * tile <= budget and H % c.kwargs["HEADS"] == 0]
        # The default stays a candidate: the search can only match or beat it.
        same = [c for c in keep if (c.kwargs["BLOCK_S"], c.kwargs["HEADS"], c.num_warps) == (bs, hp, warps)]
        return keep + ([] if same else [default])
    return prune


@triton.jit
def _time_rows(pos, p_b, p_t, p_k, B, T, K,
               HAS_POS: tl.constexpr, LOG2K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's sequences, per (sequence, frame) [BLOCK_S, BLOCK_T]: batch index b
    (int64), slot of the token in that frame, and whether the token exists; plus the number
    of live sequences (0: nothing to do)."""
    pid = tl.program_id(0)
    frames = tl.arange(0, BLOCK_T)
    f_ok = (frames < T)[None, :]
    lanes = tl.arange(0, BLOCK_S)
    if HAS_POS:
        n_kb = tl.cdiv(K, BLOCK_S)
        bt = pid // n_kb
        t = bt % T
        b = bt // T
        ks = (pid % n_kb) * BLOCK_S + lanes
        lane_ok = ks < K
        row = pos + b.to(tl.int64) * p_b
        loc = tl.load(row + t * p_t + ks * p_k, mask=lane_ok, other=-1)[:, None]
        fptr = row + frames.to(tl.int64)[None, :] * p_t
        # lower_bound of loc in each frame's sorted row, all lanes and frames at once
        lo = tl.zeros([BLOCK_S, BLOCK_T], tl.int32)
        hi = lo + K
        for _ in tl.static_range(LOG2K):
            live = (lo < hi) & f_ok
            mid = (lo + hi) // 2
            right = tl.load(fptr + mid * p_k, mask=live, other=0) < loc
            lo = tl.where(live & right, mid + 1, lo)
            hi = tl.where(live & ~right, mid, hi)
        slot = tl.minimum(lo, K - 1)
        valid = (tl.load(fptr + slot * p_k, mask=f_ok & lane_ok[:, None], other=-1) == loc) & f_ok
        seen_before = tl.max((valid & (frames[None, :] < t)).to(tl.int32), 1)
        leader = lane_ok & (seen_before == 0)
        valid = valid & leader[:, None]
        n_live = tl.sum(leader.to(tl.int32), 0)
        bb = tl.zeros([BLOCK_S, BLOCK_T], tl.int64) + b
    else:
        seq = pid * BLOCK_S + lanes
        valid = (seq < B * K)[:, None] & f_ok
        bb = tl.where(valid, seq[:, None] // K, 0).to(tl.int64)
        slot = tl.where(valid, seq[:, None] % K, 0)
        n_live = BLOCK_S
    return bb, slot, valid, n_live


@triton.jit
def _token_ptrs(base, b, frames, slot, offs_d, s_b, s_t, s_k, s_d):
    """Pointers [BLOCK_S, BLOCK_T, BLOCK_D] to the rows (b, frame, slot) of a [B, T, K, ..., Dh]
    tensor with the given strides (head and q/k/v offsets are added by the caller)."""
    return base + (b * s_b + frames * s_t + slot * s_k)[:, :, None] + offs_d[None, None, :] * s_d


@triton.jit
def _load_qkv(ptr, s_3, msk):
    """q, k, v of one head at `ptr` (the q rows; k and v are s_3 and 2 * s_3 further)."""
    return (tl.load(ptr, mask=msk, other=0.0), tl.load(ptr + s_3, mask=msk, other=0.0),
            tl.load(ptr + 2 * s_3, mask=msk, other=0.0))


@triton.jit
def _time_probs(q, k, b, slot, valid, kp, kp_b, kp_t, kp_k, qk_scale, cap2,
                SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_KP: tl.constexpr, CAUSAL: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr):
    """Softmax of the capped, masked logits of whole sequences: (p, th, keep) [S, T, T'].
    Logits in log2 units (logit_consts in factorized_attention_space.py: one exp2 an element).
    Padded / future keys: MASK_VALUE (finite: a fully padded row is uniform over the frames
    where the location is visible); hidden frames and frames past T: -inf (no key)."""
    s, th = _capped_logits(tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=DOT_PREC), qk_scale, cap2,
                           SOFTCAP, FAST_TANH)
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
    p = _exp2(s - m[:, :, None])
    l = tl.sum(p, 2)
    p = p * (1.0 / tl.where(l > 0, l, 1.0))[:, :, None]      # l = 0 only on empty lanes
    return p, th, keep


_KEY = ["T", "K", "H", "HAS_POS", "BLOCK_T", "BLOCK_D", "SOFTCAP", "CAUSAL", "HAS_KP"]


@triton.autotune(configs=_time_configs(True), key=_KEY, prune_configs_by={"early_config_prune": _time_prune(True)},
                 do_bench=autotune_bench, cache_results=_space.CACHE_SEARCH)
@triton.jit
def _time_fwd_kernel(
    qkv, o, pos, kp,
    s_b, s_t, s_k, s_3, s_h, s_d,
    o_b, o_t, o_k, o_h,
    p_b, p_t, p_k,
    kp_b, kp_t, kp_k,
    B, T, K, H, Dh, scale, qk_scale, cap2,
    HAS_POS: tl.constexpr, LOG2K: tl.constexpr, SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_KP: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, HEADS: tl.constexpr,
):
    """Time-axis forward: one program per (BLOCK_S sequences, HEADS heads).

    Math, per sequence and head (T' = the frames, fp32 accumulation):
        s = scale * q @ k^T [T, T'] ; s = c * tanh(s / c) ; masked as in _time_probs (log2 units)
        o = softmax(s) @ v
    Layout: q, k, v gathered per frame through the strides of qkv [B, T, K, 3, H, Dh]
    (identity: slot k in every frame; masked: the searched slots); o [B, T, K, H, Dh].
    FLOPs: useful 4 * H * Dh * sum_l n_l^2 (n_l = frames where location l is visible: T for
    every location without pos); executed 4 * (#sequences) * H * BLOCK_T^2 * BLOCK_D, on the
    padded tile (BLOCK_T >= 16: 4x the useful at T = 8; giant's Dh 88 pads to 128, +45%).
    Bytes: every token's q, k, v read once and o written once: 4 * B*T*K*H*Dh elements
    (+ the int pos rows, L2-resident, on the masked axis).
    Floor = max(useful FLOPs / matmul peak, bytes / HBM bandwidth, specials / MUFU rate):
    bandwidth-bound (the T x T scores are small). VideoPrism-B, 16 clips x 16 frames x 256
    locations, H = 12, Dh = 64, bf16, H200 (4.22 TB/s measured): 403 MB, 0.095 ms; measured
    0.142 ms (67% of floor, bench/RESULTS.md).
    """
    b, slot, valid, n_live = _time_rows(pos, p_b, p_t, p_k, B, T, K, HAS_POS, LOG2K, BLOCK_S, BLOCK_T)
    if n_live == 0:
        return
    frames = tl.arange(0, BLOCK_T).to(tl.int64)[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    msk = valid[:, :, None] & (offs_d < Dh)[None, None, :]
    src = _token_ptrs(qkv, b, frames, slot, offs_d, s_b, s_t, s_k, s_d)
    dst = _token_ptrs(o, b, frames, slot, offs_d, o_b, o_t, o_k, 1)
    for hh in range(HEADS):
        h = tl.program_id(1) * HEADS + hh
        q, k, v = _load_qkv(src + h * s_h, s_3, msk)
        p, th, keep = _time_probs(q, k, b, slot, valid, kp, kp_b, kp_t, kp_k, qk_scale, cap2,
                                  SOFTCAP, FAST_TANH, HAS_KP, CAUSAL, DOT_PREC, BLOCK_T)
        out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        tl.store(dst + h * o_h, out.to(o.dtype.element_ty), mask=msk)


@triton.autotune(configs=_time_configs(False), key=_KEY, prune_configs_by={"early_config_prune": _time_prune(False)},
                 do_bench=autotune_bench, cache_results=_space.CACHE_SEARCH)
@triton.jit
def _time_bwd_kernel(
    qkv, do, dqkv, pos, kp,
    s_b, s_t, s_k, s_3, s_h, s_d,
    do_b, do_t, do_k, do_h, do_d,
    g_b, g_t, g_k, g_3, g_h,
    p_b, p_t, p_k,
    kp_b, kp_t, kp_k,
    B, T, K, H, Dh, scale, qk_scale, cap2,
    HAS_POS: tl.constexpr, LOG2K: tl.constexpr, SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_KP: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, HEADS: tl.constexpr,
):
    """Time-axis backward, one kernel: recompute p from q, k, then
        dv = p^T @ do ; dp = do @ v^T ; delta = rowsum(p * dp) (= rowsum(do * o))
        ds = p * (dp - delta) * (1 - tanh^2(s_raw / c)), 0 where masked
        dq = scale * ds @ k ; dk = scale * ds^T @ q  -> dqkv [B, T, K, 3, H, Dh]
    FLOPs: 10 * (#sequences) * H * T^2 * Dh (s, dp, dv, dq, dk), on the padded tile as the
    forward's. Bytes: q, k, v, do read and dq, dk, dv written once: 7 * B*T*K*H*Dh elements
    (o is not read: delta comes from p * dp, the whole sequence being in one tile).
    Floor: bandwidth-bound as the forward; at its shapes above 705 MB, 0.167 ms.
    """
    b, slot, valid, n_live = _time_rows(pos, p_b, p_t, p_k, B, T, K, HAS_POS, LOG2K, BLOCK_S, BLOCK_T)
    if n_live == 0:
        return
    frames = tl.arange(0, BLOCK_T).to(tl.int64)[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    msk = valid[:, :, None] & (offs_d < Dh)[None, None, :]
    src = _token_ptrs(qkv, b, frames, slot, offs_d, s_b, s_t, s_k, s_d)
    dsrc = _token_ptrs(do, b, frames, slot, offs_d, do_b, do_t, do_k, do_d)
    dst = _token_ptrs(dqkv, b, frames, slot, offs_d, g_b, g_t, g_k, 1)
    ty = dqkv.dtype.element_ty
    for hh in range(HEADS):
        h = tl.program_id(1) * HEADS + hh
        q, k, v = _load_qkv(src + h * s_h, s_3, msk)
        dout = tl.load(dsrc + h * do_h, mask=msk, other=0.0)
        p, th, keep = _time_probs(q, k, b, slot, valid, kp, kp_b, kp_t, kp_k, qk_scale, cap2,
                                  SOFTCAP, FAST_TANH, HAS_KP, CAUSAL, DOT_PREC, BLOCK_T)
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
        g = dst + h * g_h
        tl.store(g, dq.to(ty), mask=msk)
        tl.store(g + g_3, dk.to(ty), mask=msk)
        tl.store(g + 2 * g_3, dv.to(ty), mask=msk)


def _launch(kernel, tensors, strides, qkv, pos, key_padding, softcap, scale, causal):
    B, T, K, _, H, Dh = qkv.shape
    kp, kps, has_kp = _kp_args(key_padding, qkv)
    pos_t = qkv if pos is None else int32_offsets(pos)
    ps = (0, 0, 0) if pos is None else pos_t.stride()
    if pos is None:                 # sequences = the B*K columns
        grid = lambda meta: (triton.cdiv(B * K, meta["BLOCK_S"]), H // meta["HEADS"])  # noqa: E731
    else:                           # programs = blocks of slots of each frame (leader candidates)
        grid = lambda meta: (B * T * triton.cdiv(K, meta["BLOCK_S"]), H // meta["HEADS"])  # noqa: E731
    kernel[grid](
        *tensors[:-1], pos_t, kp, *strides, *ps, *kps,
        B, T, K, H, Dh, scale, *logit_consts(scale, softcap),
        HAS_POS=pos is not None, LOG2K=max(1, K.bit_length()), SOFTCAP=softcap > 0,
        FAST_TANH=fast_tanh(qkv.dtype), HAS_KP=has_kp,
        CAUSAL=causal, DOT_PREC=dot_precision(qkv.dtype), BLOCK_T=max(16, triton.next_power_of_2(T)),
        BLOCK_D=block_d(Dh))
    return tensors[-1]


@on_tensor_device
def attention_time_fwd(qkv: torch.Tensor, pos: torch.Tensor | None, key_padding: torch.Tensor | None,
                       softcap: float, scale: float, causal: bool) -> torch.Tensor:
    """Launch the time-axis forward: qkv [B, T, K, 3, H, Dh] (any strides) -> o [B, T, K, H, Dh]."""
    qkv = int32_offsets(qkv)
    B, T, K, _, H, Dh = qkv.shape
    o = qkv.new_empty(B, T, K, H, Dh)
    return _launch(_time_fwd_kernel, (qkv, o, o), (*qkv.stride(), *o.stride()[:4]),
                   qkv, pos, key_padding, softcap, scale, causal)


@on_tensor_device
def attention_time_bwd(do: torch.Tensor, qkv: torch.Tensor, pos: torch.Tensor | None,
                       key_padding: torch.Tensor | None, softcap: float, scale: float, causal: bool) -> torch.Tensor:
    """Launch the time-axis backward. Returns dqkv [B, T, K, 3, H, Dh] (contiguous)."""
    qkv, do = int32_offsets(qkv), int32_offsets(do)
    dqkv = qkv.new_empty(qkv.shape)
    return _launch(_time_bwd_kernel, (qkv, do, dqkv, dqkv), (*qkv.stride(), *do.stride(), *dqkv.stride()[:5]),
                   qkv, pos, key_padding, softcap, scale, causal)
