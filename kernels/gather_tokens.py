"""Token gather and its adjoint, token scatter: Triton kernels (references: token_ops_ref.py).

    gather:  out[b, j, :] = x[b, idx[b, j], :]                 x [B, L, D], idx [B, M] -> [B, M, D]
    scatter: out[b, l, :] = sum_{j : idx[b, j] == l} src[b, j]  src [B, M, D], idx [B, M] -> [B, L, D]

Scatter is the adjoint (backward) of gather and vice versa. Duplicate indices
accumulate (that is what makes scatter the exact adjoint of a gather with repeats);
rows no index points at are zero.

Scatter in two launches, without a sort and without a memset of the output:
1. `_scatter_sources_kernel`, one thread per index: the first and the last source j of
   every output row (b, l), as int32 atomic maxima of M - j and j + 1 into a zeroed
   [2, B, L] table (0: no source). Atomics only pick the extremes, so the table is
   deterministic.
2. `_scatter_tokens_fwd_kernel` writes every output row exactly once: no source -> zeros,
   first == last -> a copy of src[b, first] (the masking case: unique indices), otherwise
   the sum of the sources in ascending j (fp32 accumulation for half types, fp64 for
   fp64), found by scanning idx[b, first..last] in chunks of BLOCK_J. That duplicate path
   is the slow one (a serial walk per row, its scan up to M long), taken by a program
   only for its rows with several sources. Indices outside [0, L) are nobody's source:
   never read.
The sort + searchsorted CSR build it replaces cost five extra launches and a segmented
sort before the copy could start.

Bytes moved (memory-bound, no FLOPs worth counting), E = element size:
    gather:  B*M*D*E read + B*M*D*E written (+ 8*B*M index bytes)
    scatter: B*M*D*E read + B*L*D*E written (+ 8*B*M index bytes, 8*B*L table zeroing,
             8*B*L table reads; the duplicate scan re-reads index rows from cache)
Floor at VideoPrism-B stage 2 (B=32, M=1440 of L=4096, D=768, bf16) on an H200 (copy
4218 GB/s read+write): gather 141.6 MB -> 33.6 us, scatter 272.1 MB -> 64.5 us (the
table adds 1 MB zeroed + 1 MB read, under 1%).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from videoprism.kernels.device_guard import on_tensor_device
from videoprism.kernels.token_ops_ref import acc_dtype


def tl_acc_type(dtype: torch.dtype):
    """acc_dtype as a Triton type (the kernels' ACC constexpr)."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


TILE_ELEMS = 8192   # elements per program: 16 KB of bf16 (32 KB of fp32), 32 per thread at 8 warps
NUM_WARPS = 8
SOURCES_BLOCK = 1024  # indices per program of the scatter's first/last table
DUP_SCAN_BLOCK = 256  # indices per chunk of the scatter's duplicate scan (one per thread)


def row_tile(D: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of a row-copy program: at most 256 columns (a D=768 row is three
    full column blocks, no masked lanes) and as many rows as make TILE_ELEMS elements. Many
    rows per program: a few thousand programs move a ~100 MB op, not one tiny program per
    row, which left the copy bound by per-program latency."""
    block_d = min(triton.next_power_of_2(max(D, 1)), 256)
    return max(1, TILE_ELEMS // block_d), block_d


@triton.jit
def _gather_tokens_fwd_kernel(x_ptr, idx_ptr, out_ptr, L, M, D, n_rows,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, column block): BLOCK_R output rows r = b*M + j, BLOCK_D columns."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < n_rows
    j = tl.load(idx_ptr + r, mask=r_ok, other=0)
    j_ok = (j >= 0) & (j < L)              # memory safety only: the op checks values on the CPU
    src_row = (r // M).to(tl.int64) * L + j
    ok = r_ok[:, None] & (d < D)[None, :]
    v = tl.load(x_ptr + src_row[:, None] * D + d[None, :], mask=ok & j_ok[:, None], other=0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * D + d[None, :], v, mask=ok)


@triton.jit
def _scatter_sources_kernel(idx_ptr, table_ptr, L, M, n_idx, n_rows, BLOCK: tl.constexpr):
    """Thread per index r = b*M + j: table[0, b, l] = max(M - j), table[1, b, l] = max(j + 1)
    over the j with idx[b, j] = l, i.e. the first and last source of output row (b, l)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r_ok = r < n_idx
    l = tl.load(idx_ptr + r, mask=r_ok, other=-1)
    ok = r_ok & (l >= 0) & (l < L)         # memory safety only: the op checks values on the CPU
    b = r // M
    j = r - b * M
    row = b.to(tl.int64) * L + l
    # Relaxed: nothing in this kernel reads the table; the launch boundary orders it for the next.
    tl.atomic_max(table_ptr + row, M - j, mask=ok, sem="relaxed")
    tl.atomic_max(table_ptr + n_rows + row, j + 1, mask=ok, sem="relaxed")


@triton.jit
def _scatter_tokens_fwd_kernel(src_ptr, idx_ptr, table_ptr, out_ptr, L, M, D, n_rows,
                               ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_J: tl.constexpr):
    """Program (row block, column block) over output rows r = b*L + l. The tile writes the
    rows with at most one source (zeros or a copy, as gather does); a row with several
    sources is then summed alone, in ascending j, so the tile keeps gather's few registers."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < n_rows
    d_ok = d < D
    first = M - tl.load(table_ptr + r, mask=r_ok, other=0)          # M when the row has no source
    last = tl.load(table_ptr + n_rows + r, mask=r_ok, other=0) - 1  # -1 then
    b = (r // L).to(tl.int64)
    dup = first < last
    v = tl.load(src_ptr + (b * M + first)[:, None] * D + d[None, :], mask=(first == last)[:, None] & d_ok[None, :],
                other=0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * D + d[None, :], v, mask=(r_ok & ~dup)[:, None] & d_ok[None, :])
    if tl.max(dup.to(tl.int32), axis=0) > 0:
        # Rows walked from the first to the last duplicate row of the tile.
        for row in range(tl.min(tl.where(dup, r, n_rows), axis=0), tl.max(tl.where(dup, r, -1), axis=0) + 1):
            row_first = M - tl.load(table_ptr + row, mask=row < n_rows, other=0)
            row_last = tl.load(table_ptr + n_rows + row, mask=row < n_rows, other=0) - 1
            if row_first < row_last:
                base = (row // L).to(tl.int64) * M
                acc = tl.load(src_ptr + (base + row_first) * D + d, mask=d_ok, other=0.0).to(ACC)
                # The other sources are the j in (first, last] with idx[b, j] == l: per chunk
                # of indices, the hits taken one at a time from the lowest.
                for j0 in range(row_first + 1, row_last + 1, BLOCK_J):
                    jj = j0 + tl.arange(0, BLOCK_J)
                    hit = tl.load(idx_ptr + base + jj, mask=jj <= row_last, other=-1) == row % L
                    cur = j0 - 1
                    for _ in range(0, tl.sum(hit.to(tl.int32), axis=0)):
                        cur = tl.min(tl.where(hit & (jj > cur), jj, row_last + 1), axis=0)
                        acc += tl.load(src_ptr + (base + cur) * D + d, mask=d_ok, other=0.0).to(ACC)
                tl.store(out_ptr + tl.cast(row, tl.int64) * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@on_tensor_device
def gather_tokens_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Triton gather; x [B, L, D] and idx [B, M] int64 (made contiguous here: a copy only when
    they are not), indices in range."""
    x, idx = x.contiguous(), idx.contiguous()   # the kernel indexes rows as dense [B, L, D]
    B, L, D = x.shape
    M = idx.shape[1]
    out = torch.empty(B, M, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    BLOCK_R, BLOCK_D = row_tile(D)
    grid = (triton.cdiv(B * M, BLOCK_R), triton.cdiv(D, BLOCK_D))
    _gather_tokens_fwd_kernel[grid](x, idx, out, L, M, D, B * M, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                                    num_warps=NUM_WARPS)
    return out


@on_tensor_device
def scatter_tokens_triton(src: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """Triton scatter-add; src [B, M, D] and idx [B, M] int64 (made contiguous here), indices in range."""
    src, idx = src.contiguous(), idx.contiguous()
    B, M, D = src.shape
    out = torch.empty(B, length, D, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    # First/last source per output row; B*L int32 each (1 MB at stage 2).
    table = torch.zeros(2, B * length, dtype=torch.int32, device=src.device)
    if M > 0:
        _scatter_sources_kernel[(triton.cdiv(B * M, SOURCES_BLOCK),)](idx, table, length, M, B * M, B * length,
                                                                     BLOCK=SOURCES_BLOCK)
    BLOCK_R, BLOCK_D = row_tile(D)
    grid = (triton.cdiv(B * length, BLOCK_R), triton.cdiv(D, BLOCK_D))
    _scatter_tokens_fwd_kernel[grid](src, idx, table, out, length, M, D, B * length,
                                     ACC=tl_acc_type(src.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                                     BLOCK_J=DUP_SCAN_BLOCK, num_warps=NUM_WARPS)
    return out
