"""Factorized soft-capped attention, space axis: flash-style Triton kernels and launchers,
plus the helpers the time-axis kernels share.

The math and the reference are in factorized_attention.py. A space sequence is one frame
(b, t): K tokens (1..4096), head dim up to 256 (padded to a power of two by masked loads).
Forward: online softmax over key tiles, saving the row max m and log l (log2 units).
Backward: two kernels, dq (which also forms delta = rowsum(do * o)) then dk/dv, each program
owning its rows, so no atomics and a deterministic result.

Where the time goes (sm_90, head dim 64, per score element and SM sub-partition): the two
MMAs take ~8 issue-cycle equivalents, each MUFU op (exp2, tanh) 8, every other instruction 1.
So a softmax loop is bound by its exponentials and its instruction count as much as by its
matmuls; the helpers below keep both minimal (tools/triton_compile_check.py counts them).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from videoprism.kernels.device_guard import on_tensor_device
from videoprism.kernels.factorized_attention import MASK_VALUE

# Triton decides interpreter vs. compiler when a kernel is decorated, from this variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MASK = tl.constexpr(MASK_VALUE)


# Logits are kept in log2 units (s2 = log2(e) * s) so that every exponential is one exp2: the
# constants fold into the scale the host passes (logit_consts), and exp(s - m) = exp2(s2 - m2).
LOG2E = 1.4426950408889634
# Only a compiled kernel can use PTX (the interpreter has no inline asm): the interpreter runs
# the same math through Triton's portable functions.
_GPU = tl.constexpr(not INTERPRET)


@triton.jit
def _exp2(x):
    """2^x in fp32. On a GPU one MUFU.EX2 (ex2.approx.ftz, ~2 ulp): tl.exp2 lowers to the
    non-ftz form, which ptxas wraps in a range test and two multiplies per element; a result
    below 2^-126 flushes to 0, which no softmax weight needs."""
    if _GPU:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _rcp(x):
    """1 / x in fp32 for x in [1, 2] (no range handling needed): one MUFU.RCP on a GPU (~1 ulp);
    a plain `/` lowers to div.full, a range test and four more instructions per element."""
    if _GPU:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    """tanh in fp32 for the logit cap c * tanh(s / c).

    FAST (bf16 inputs on a GPU): the hardware tanh.approx.f32, one MUFU op, relative error
    ~2^-11: below the 2^-8 rounding of the bf16 operands and of p before p @ v, so it does
    not show in a bf16 result, and it takes the cap's cost from ~30 instructions an element
    (the loop was issue-bound, not tensor-bound) to one.
    Otherwise (fp32, fp16, the interpreter) accurate to a few ulp over the whole range:
    |x| < 0.625: odd minimax polynomial (Cephes tanhf); else (1 - e) / (1 + e), e = exp(-2|x|).
    1 - 2/(exp(2x)+1) alone would lose all relative precision near 0, which the cap would
    turn into an absolute logit error of c * eps."""
    if FAST and _GPU:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        ax = tl.abs(x)
        z = x * x
        small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
                  + 1.33314422036e-1) * z - 3.33332819422e-1) * z * ax + ax
        e = _exp2(ax * -2.8853900817779268)                  # exp(-2|x|); -2 log2(e)
        r = tl.where(ax < 0.625, small, (1.0 - e) * _rcp(1.0 + e))
        return tl.where(x < 0, -r, r)


@triton.jit
def _capped_logits(s, qk_scale, cap2, SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr):
    """Raw q @ k^T -> (logits in log2 units, th): th = tanh(s_raw / c) with the cap (for its
    derivative 1 - th^2), the raw s without; the constants come from logit_consts."""
    if SOFTCAP:
        th = _tanh(s * qk_scale, FAST_TANH)
        return th * cap2, th
    else:
        return s * qk_scale, s


def logit_consts(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap2) for the kernels' log2-unit logits:
    no cap: s2 = dot * qk_scale, qk_scale = scale * log2(e);
    cap c:  s2 = cap2 * tanh(dot * qk_scale), qk_scale = scale / c, cap2 = c * log2(e).
    One multiply an element either way, no division."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0


def fast_tanh(dtype: torch.dtype) -> bool:
    """The hardware tanh for bf16 only: fp16 rounds at 2^-11, the size of its error."""
    return dtype == torch.bfloat16


def even_k(K: int) -> bool:
    """K is a multiple of 64, hence of every key tile (BLOCK_N <= 64 in all candidates): the
    kernels then skip the out-of-range column masks."""
    return K % 64 == 0


def block_d(head_dim: int) -> int:
    """Head dims are padded (masked loads) to a power of two >= 16, the smallest tl.dot tile."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in true fp32 ("ieee"), not TF32: the fp32 path is the one the
    tests hold to the reference's own error."""
    return "ieee" if dtype == torch.float32 else "tf32"


# The config search is on by default: measured on an H200 (bf16, base space K=256, fwd+bwd),
# the searched configs ran in 1.67 ms against 2.21 ms for the fixed defaults. Each candidate
# costs a Triton compile (about a second) per kernel variant (dtype, head dim, flags); the
# search's timings are kept in Triton's cache directory (CACHE_SEARCH, keyed by the kernel's
# source, the Triton version, the compile target (sm_90: an H100 and an H200 share picks in a
# shared cache directory), the key and the candidates), so a variant is searched once per
# machine, not once per process: a resumed run, a rank started after a search has ended and the
# training benchmark after bench.attention take the earlier pick without compiling the other
# candidates (ranks that start together on a cold cache each search).
# `VIDEOPRISM_TRITON_AUTOTUNE=0` (the test suite sets it) uses one config per head dim instead.
# The defaults are always among the candidates.
AUTOTUNE = os.environ.get("VIDEOPRISM_TRITON_AUTOTUNE", "1") == "1"
CACHE_SEARCH = True  # triton.autotune(cache_results=...) of every searched kernel (the interpreter never caches)


def _configs(fwd: bool):
    """Candidates for the search: (BLOCK_M, BLOCK_N, warps, stages)."""
    shapes = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)] if fwd else \
        [(64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (128, 32, 8, 2), (32, 32, 4, 1)]
    assert all(64 % n == 0 for _, n, _, _ in shapes), "even_k() promises every key tile divides 64"
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _default_config(fwd: bool, bd: int, K: int) -> triton.Config:
    """One config by padded head dim (and K). Forward: 128-query tiles (the q tile stays in
    registers, k/v tiles stream); backward: smaller tiles, it holds four operand tiles at once.
    At head dim 64 all three kernels take 32-key tiles when a last 64-key tile would be at most
    half full (stage 2's K = 90: 96 padded keys instead of 128). A loop costs about the same per
    score either way (sm_90, Triton 3.6, bf16 with the cap, per score for 64 / 32 keys: forward
    12.5 / 15.2 instructions and 2.06 / 2.13 MUFU, MUFU-bound at ~16.5 / 17 cycles; dq 16.2 /
    17.5 instructions, 2 MUFU; dk/dv 19.7 / 26.2 instructions, 2 MUFU), so at K = 90 the
    scores no longer computed are worth ~1.3x (forward), ~1.2x (dq), ~1.0x (dk/dv): a static
    estimate; the tile search measures it on the GPU."""
    if INTERPRET:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)
    if fwd:
        m, n, w, s = (128, 64, 4, 3) if bd <= 64 else (128, 64, 8, 3) if bd <= 128 else (64, 32, 4, 2)
    else:
        m, n, w, s = (64, 64, 4, 2) if bd <= 64 else (64, 32, 4, 2) if bd <= 128 else (32, 32, 4, 1)
    if bd <= 64 and 0 < K % 64 <= 32:
        n = 32
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def autotune_bench(kernel_call, quantiles):
    """Autotuning timer: short runs (the default 25 + 100 ms per config adds up over the
    model's shapes); the kernels take tens of microseconds, so 25 ms still averages many.
    Without the search the prune leaves one config and there is nothing to time; Triton 3.6
    (unlike 3.8) times a lone config anyway, which in the interpreter asks for a GPU driver
    and fails, so that call returns at once. AUTOTUNE is read at call time (bench/attention.py
    turns it off for its fixed-tile rows)."""
    if INTERPRET or not AUTOTUNE:
        return [0.0] * len(quantiles) if quantiles else 0.0
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# Sequences shorter than this take the fixed config, searched or not: the text tower's (K = the
# trimmed text length, a multiple of 8 up to 64, plus the class token: up to 8 values in a run, the
# longest 65) would otherwise be searched once per new length in the first steps of a run, ~15
# compiles each (5 candidates x 3 kernels), stalling every rank.
SEARCH_MIN_K = 66


def _prune(fwd: bool):
    def prune(configs, named_args, **kw):
        bd, default = kw["BLOCK_D"], _default_config(fwd, kw["BLOCK_D"], named_args["K"])
        if INTERPRET or not AUTOTUNE or named_args["K"] < SEARCH_MIN_K:
            return [default]
        # Large head dims do not fit the big tiles in registers / shared memory.
        keep = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * bd <= 128 * 64 * 128]
        return keep or [default]
    return prune


@triton.jit
def _space_scores(q, k, rows, cols, kp_ptrs, K, qk_scale, cap2,
                  SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_KP: tl.constexpr,
                  CAUSAL: tl.constexpr, COL_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Logits of one [BLOCK_M, BLOCK_N] tile in log2 units (logit_consts): scaled, capped, masked.
    Returns (s2, th, keep): th = tanh(s_raw / c) for the cap's derivative, keep = the entries
    that carry a gradient. Padded / future keys get the finite MASK_VALUE (a fully masked row
    is uniform, as in the official model); keys past the end get -inf (no key at all) where
    COL_MASK (K not a multiple of the tile, and the kernel sums over these keys)."""
    s, th = _capped_logits(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), qk_scale, cap2, SOFTCAP, FAST_TANH)
    in_range = cols < K
    keep = in_range[None, :] & (rows >= 0)[:, None]
    if HAS_KP:
        pad = tl.load(kp_ptrs, mask=in_range, other=1) != 0
        keep = keep & ~pad[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    if HAS_KP or CAUSAL:
        s = tl.where(keep, s, _MASK)
    if COL_MASK:
        s = tl.where(in_range[None, :], s, float("-inf"))
    return s, th, keep


@triton.jit
def _program_tile(K, T, H, BLOCK: tl.constexpr):
    """Program id -> (tile of the frame-head, frame-head index (b*T + t)*H + h, b, t, h), int64
    b and t. One flat grid axis (2^31 programs), the tiles of a frame-head adjacent so that
    they share k, v in L2: B*T*H on the y axis would cap at 65,535 frame-heads."""
    n = tl.cdiv(K, BLOCK)
    tile = tl.program_id(0) % n
    pid_bth = tl.program_id(0) // n
    bt = pid_bth // H
    return tile, pid_bth, (bt // T).to(tl.int64), (bt % T).to(tl.int64), pid_bth % H


@triton.jit
def _load_kv(base, cols, offs_d, d_ok, K, s_k, s_3, s_d):
    """The k and v rows `cols` of one frame-head (zeros past K or Dh): [BLOCK_N, BLOCK_D] each."""
    mask = (cols < K)[:, None] & d_ok[None, :]
    off = cols[:, None] * s_k + offs_d[None, :] * s_d
    return tl.load(base + s_3 + off, mask=mask, other=0.0), tl.load(base + 2 * s_3 + off, mask=mask, other=0.0)


@triton.autotune(configs=_configs(True), key=["K", "BLOCK_D", "SOFTCAP", "CAUSAL", "HAS_KP"],
                 prune_configs_by={"early_config_prune": _prune(True)}, do_bench=autotune_bench,
                 cache_results=CACHE_SEARCH)
@triton.jit
def _space_fwd_kernel(
    qkv, o, m_out, l_out, kp,
    s_b, s_t, s_k, s_3, s_h, s_d,
    o_b, o_t, o_k, o_h,
    kp_b, kp_t, kp_k,
    T, H, K, Dh, qk_scale, cap2,
    SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_KP: tl.constexpr, CAUSAL: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Space-axis forward: one program per (BLOCK_M queries, frame (b, t), head h), flat grid.

    Math, per frame and head, with online softmax over key tiles (fp32 accumulation), in
    log2 units (s2 = log2(e) * s, constants folded by logit_consts):
        s = scale * q @ k^T ; s = c * tanh(s / c) ; s = where(kept, s, MASK_VALUE)
        m2 = rowmax(s2) ; l = rowsum(2^(s2 - m2)) ; o = 2^(s2 - m2) @ v / l
    Layout: q, k, v read through the strides of qkv [B, T, K, 3, H, Dh] (no copies);
    o [B, T, K, H, Dh]; m2 and log2(l) stored fp32 [B, T, H, K] for the backward (kept apart,
    not as one logsumexp, because MASK_VALUE + log2(l) rounds back to MASK_VALUE in fp32 and
    would lose the uniform 1/l of a fully masked row).
    FLOPs: 4 * B*T*H * K^2 * Dh (2 matmuls); specials B*T*H * K^2 exp2 (+ as many tanh with
    the cap). Bytes: 4 * B*T*K*H*Dh elements (q, k, v read once per query tile, o written)
    + 8 * B*T*H*K (the fp32 m2, log2 l) + K/BLOCK_M re-reads of k, v (from L2).
    Floor = max(FLOPs / matmul peak, bytes / HBM bandwidth, specials / MUFU rate). VideoPrism-B,
    16 clips x 16 frames, K = 256, H = 12, Dh = 64, bf16, capped, on an H200 (785 TFLOP/s and
    4.22 TB/s measured, MUFU 132 SMs x 16/clk x 1.98 GHz = 4.2 T/s): 0.066 ms of matmul,
    0.097 ms of bytes (409 MB: 403 of q, k, v, o + 6 of m2, log2 l), 0.096 ms of exp2 + tanh:
    ~0.097 ms (bench.attention prints its floor, without the 6 MB of statistics).
    Per score element the loop issues the two MMAs' share, one MUFU.EX2 (+ one MUFU.TANH for
    bf16 with the cap) and ~10 other instructions; at head dim 64 one MUFU op (16/clk/SM) takes
    about as long as the tensor cores' 256 FLOPs an element (as long at the spec-sheet 4096
    FLOPs/clk/SM, 0.7x at the 785 TFLOP/s measured), so the two of a capped kernel take 2x
    (1.5x measured) its matmul time: exponentials and bytes, not the MMAs, set its floor.
    """
    pid_m, pid_bth, b, t, h = _program_tile(K, T, H, BLOCK_M)
    base = qkv + b * s_b + t * s_t + h * s_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < Dh
    q = tl.load(base + rows[:, None] * s_k + offs_d[None, :] * s_d,
                mask=(rows < K)[:, None] & d_ok[None, :], other=0.0)
    kp_base = kp + b * kp_b + t * kp_t
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Causal: no tile is skipped. A fully masked row (finite MASK_VALUE) is uniform over all
    # K keys, future ones included, so skipping is only exact when no row is fully masked;
    # causal attention is used by the (short) text encoder only.
    for start_n in range(0, K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(base, cols, offs_d, d_ok, K, s_k, s_3, s_d)
        s, th, keep = _space_scores(q, k, rows, cols, kp_base + cols * kp_k, K, qk_scale, cap2,
                                    SOFTCAP, FAST_TANH, HAS_KP, CAUSAL, not EVEN_K, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = _exp2(m_i - m_new)
        p = _exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    out = acc * (1.0 / l_i)[:, None]
    row_ok = rows < K
    o_ptrs = o + b * o_b + t * o_t + h * o_h + rows[:, None] * o_k + offs_d[None, :]
    tl.store(o_ptrs, out.to(o.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(m_out + pid_bth.to(tl.int64) * K + rows, m_i, mask=row_ok)
    tl.store(l_out + pid_bth.to(tl.int64) * K + rows, tl.log2(l_i), mask=row_ok)


@triton.jit
def _space_probs(s, m, logl):
    """Recomputed softmax from the saved row max and log-sum, log2 units (s - m first: exact
    for the MASK_VALUE entries of a fully masked row). Query rows past K need no mask: their
    q and do are zero, so they add nothing to dk or dv and their dq is not stored."""
    return _exp2((s - m[:, None]) - logl[:, None])


@triton.autotune(configs=_configs(False), key=["K", "BLOCK_D", "SOFTCAP", "CAUSAL", "HAS_KP"],
                 prune_configs_by={"early_config_prune": _prune(False)}, do_bench=autotune_bench,
                 cache_results=CACHE_SEARCH)
@triton.jit
def _space_bwd_dq_kernel(
    qkv, o, do, m_in, l_in, delta, dqkv, kp,
    s_b, s_t, s_k, s_3, s_h, s_d,
    o_b, o_t, o_k, o_h,
    do_b, do_t, do_k, do_h, do_d,
    g_b, g_t, g_k, g_3, g_h,
    kp_b, kp_t, kp_k,
    T, H, K, Dh, scale, qk_scale, cap2,
    SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_KP: tl.constexpr, CAUSAL: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Space-axis backward, part 1 of 2: delta and dq for BLOCK_M query rows.

        delta = rowsum(do * o)           (stored fp32 [B, T, H, K] for part 2)
        p = 2^(s2 - m2 - log2 l) ; dp = do @ v^T ; ds = p * (dp - delta)
        ds *= 1 - tanh^2(s_raw / c)      (the cap's derivative) ; ds = 0 where masked
        dq = scale * ds @ k              -> dqkv[:, :, :, 0]
    FLOPs: 6 * B*T*H * K^2 * Dh (s, dp, dq); specials as the forward's (p and the cap's
    derivative recomputed). Bytes: q, o, do, dq once + k, v per query tile (once from HBM,
    the re-reads from L2): >= 6 * B*T*K*H*Dh elements. Floor: max of the three terms, as
    the forward's; at its shapes above 0.14 ms of bytes (604 MB; matmul 0.098, specials 0.096).
    """
    pid_m, pid_bth, b64, t64, h = _program_tile(K, T, H, BLOCK_M)
    base = qkv + b64 * s_b + t64 * s_t + h * s_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < Dh
    row_mask = (rows < K)[:, None] & d_ok[None, :]
    q = tl.load(base + rows[:, None] * s_k + offs_d[None, :] * s_d, mask=row_mask, other=0.0)
    do_t_ = tl.load(do + b64 * do_b + t64 * do_t + h * do_h + rows[:, None] * do_k + offs_d[None, :] * do_d,
                    mask=row_mask, other=0.0)
    o_t_ = tl.load(o + b64 * o_b + t64 * o_t + h * o_h + rows[:, None] * o_k + offs_d[None, :],
                   mask=row_mask, other=0.0)
    stat = pid_bth.to(tl.int64) * K + rows
    dl = tl.sum(do_t_.to(tl.float32) * o_t_.to(tl.float32), 1)
    tl.store(delta + stat, dl, mask=rows < K)
    m = tl.load(m_in + stat, mask=rows < K, other=0.0)
    logl = tl.load(l_in + stat, mask=rows < K, other=0.0)
    kp_base = kp + b64 * kp_b + t64 * kp_t
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(base, cols, offs_d, d_ok, K, s_k, s_3, s_d)
        s, th, keep = _space_scores(q, k, rows, cols, kp_base + cols * kp_k, K, qk_scale, cap2,
                                    SOFTCAP, FAST_TANH, HAS_KP, CAUSAL, not EVEN_K, DOT_PREC)
        p = _space_probs(s, m, logl)
        dp = tl.dot(do_t_, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - dl[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        if HAS_KP or CAUSAL:
            ds = tl.where(keep, ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    g = dqkv + b64 * g_b + t64 * g_t + h * g_h + rows[:, None] * g_k + offs_d[None, :]
    tl.store(g, (dq * scale).to(dqkv.dtype.element_ty), mask=row_mask)


@triton.autotune(configs=_configs(False), key=["K", "BLOCK_D", "SOFTCAP", "CAUSAL", "HAS_KP"],
                 prune_configs_by={"early_config_prune": _prune(False)}, do_bench=autotune_bench,
                 cache_results=CACHE_SEARCH)
@triton.jit
def _space_bwd_dkdv_kernel(
    qkv, do, m_in, l_in, delta, dqkv, kp,
    s_b, s_t, s_k, s_3, s_h, s_d,
    do_b, do_t, do_k, do_h, do_d,
    g_b, g_t, g_k, g_3, g_h,
    kp_b, kp_t, kp_k,
    T, H, K, Dh, scale, qk_scale, cap2,
    SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_KP: tl.constexpr, CAUSAL: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Space-axis backward, part 2 of 2: dk and dv for BLOCK_N keys (BLOCK_N here plays the
    role of the key tile, BLOCK_M the query tile), looping over every query tile:
        dv += p^T @ do ; dk += scale * ds^T @ q     -> dqkv[:, :, :, 1] and [:, :, :, 2]
    No atomics: each program owns its keys, so the result is deterministic.
    FLOPs: 8 * B*T*H * K^2 * Dh (s, dp, dv, dk); specials as the forward's. Bytes: k, v, dk,
    dv once + q, do per key tile (once from HBM): >= 6 * B*T*K*H*Dh elements. Floor: max of
    the three terms; at the forward's shapes 0.14 ms of bytes (matmul 0.131 ms, specials
    0.096 ms). The two parts move >= 12 elements a token-head-dim where one fused
    backward would move 8 (bench.attention's floor: the least any kernel can move).
    """
    pid_n, pid_bth, b64, t64, h = _program_tile(K, T, H, BLOCK_N)
    base = qkv + b64 * s_b + t64 * s_t + h * s_h
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < Dh
    col_mask = (cols < K)[:, None] & d_ok[None, :]
    kv_off = cols[:, None] * s_k + offs_d[None, :] * s_d
    k = tl.load(base + s_3 + kv_off, mask=col_mask, other=0.0)
    v = tl.load(base + 2 * s_3 + kv_off, mask=col_mask, other=0.0)
    kp_ptrs = kp + b64 * kp_b + t64 * kp_t + cols * kp_k
    do_base = do + b64 * do_b + t64 * do_t + h * do_h
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, K, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask = (rows < K)[:, None] & d_ok[None, :]
        q = tl.load(base + rows[:, None] * s_k + offs_d[None, :] * s_d, mask=row_mask, other=0.0)
        do_t_ = tl.load(do_base + rows[:, None] * do_k + offs_d[None, :] * do_d, mask=row_mask, other=0.0)
        stat = pid_bth.to(tl.int64) * K + rows
        m = tl.load(m_in + stat, mask=rows < K, other=0.0)
        logl = tl.load(l_in + stat, mask=rows < K, other=0.0)
        dl = tl.load(delta + stat, mask=rows < K, other=0.0)
        s, th, keep = _space_scores(q, k, rows, cols, kp_ptrs, K, qk_scale, cap2,
                                    SOFTCAP, FAST_TANH, HAS_KP, CAUSAL, not EVEN_K, DOT_PREC)
        p = _space_probs(s, m, logl)
        dv += tl.dot(tl.trans(p.to(do_t_.dtype)), do_t_, input_precision=DOT_PREC)
        dp = tl.dot(do_t_, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - dl[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        if HAS_KP or CAUSAL:
            ds = tl.where(keep, ds, 0.0)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    g = dqkv + b64 * g_b + t64 * g_t + h * g_h + cols[:, None] * g_k + offs_d[None, :]
    tl.store(g + g_3, (dk * scale).to(dqkv.dtype.element_ty), mask=col_mask)
    tl.store(g + 2 * g_3, dv.to(dqkv.dtype.element_ty), mask=col_mask)


def int32_offsets(t: torch.Tensor) -> torch.Tensor:
    """`t` ([B, ...]) as the kernels can address it: itself when every offset within one batch row fits int32,
    else a contiguous copy. The kernels take the batch offset in int64 and the rest (frame, token, q/k/v, head,
    channel: under 2^31 on any contiguous layout, 2.8e8 for giant at 16 frames) in int32 arithmetic, which the
    large strides of a view would wrap (q, k and v projected into a [3, B, ...] buffer and permuted: a q-to-v
    offset of 2 * B * T * K * H * Dh)."""
    span = sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:]))
    return t if span < 2**31 else t.contiguous()


def _kp_args(key_padding: torch.Tensor | None, qkv: torch.Tensor):
    """(tensor, strides, flag) for the optional [B, T, K] key-padding mask, read as bytes in
    place (a bool tensor is one byte per element, so the uint8 view is free)."""
    if key_padding is None:
        return qkv, (0, 0, 0), False
    kp = int32_offsets(key_padding.view(torch.uint8) if key_padding.dtype == torch.bool else key_padding)
    return kp, tuple(kp.stride()), True


def _flags(qkv: torch.Tensor, K: int, Dh: int, softcap: float, has_kp: bool, causal: bool) -> dict:
    """The space kernels' compile-time flags."""
    return dict(SOFTCAP=softcap > 0, FAST_TANH=fast_tanh(qkv.dtype), HAS_KP=has_kp, CAUSAL=causal,
                EVEN_K=even_k(K), DOT_PREC=dot_precision(qkv.dtype), BLOCK_D=block_d(Dh))


@on_tensor_device
def attention_space_fwd(qkv: torch.Tensor, key_padding: torch.Tensor | None, softcap: float, scale: float,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the space-axis forward. Returns (o [B, T, K, H, Dh], m2, log2 l [B, T, H, K] fp32:
    the row max and log-sum of the softmax in log2 units, for the backward)."""
    qkv = int32_offsets(qkv)
    B, T, K, _, H, Dh = qkv.shape
    o = qkv.new_empty(B, T, K, H, Dh)
    m = qkv.new_empty(B, T, H, K, dtype=torch.float32)
    logl = torch.empty_like(m)
    kp, kps, has_kp = _kp_args(key_padding, qkv)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_M"]) * B * T * H,)  # noqa: E731
    _space_fwd_kernel[grid](
        qkv, o, m, logl, kp, *qkv.stride(), *o.stride()[:4], *kps,
        T, H, K, Dh, *logit_consts(scale, softcap), **_flags(qkv, K, Dh, softcap, has_kp, causal),
    )
    return o, m, logl


@on_tensor_device
def attention_space_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, m: torch.Tensor,
                        logl: torch.Tensor, key_padding: torch.Tensor | None, softcap: float, scale: float,
                        causal: bool) -> torch.Tensor:
    """Launch the space-axis backward (dq kernel, then dk/dv kernel). Returns dqkv, the
    layout of qkv made contiguous: [B, T, K, 3, H, Dh]."""
    qkv, do = int32_offsets(qkv), int32_offsets(do)
    B, T, K, _, H, Dh = qkv.shape
    dqkv = qkv.new_empty(B, T, K, 3, H, Dh)
    delta = torch.empty_like(m)
    kp, kps, has_kp = _kp_args(key_padding, qkv)
    common = _flags(qkv, K, Dh, softcap, has_kp, causal)
    gs = dqkv.stride()[:5]
    _space_bwd_dq_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_M"]) * B * T * H,)](
        qkv, o, do, m, logl, delta, dqkv, kp, *qkv.stride(), *o.stride()[:4], *do.stride(), *gs, *kps,
        T, H, K, Dh, scale, *logit_consts(scale, softcap), **common)
    _space_bwd_dkdv_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_N"]) * B * T * H,)](
        qkv, do, m, logl, delta, dqkv, kp, *qkv.stride(), *do.stride(), *gs, *kps,
        T, H, K, Dh, scale, *logit_consts(scale, softcap), **common)
    return dqkv
