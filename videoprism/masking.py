"""Token masks for masked encoding (DESIGN 4): tube masks (stage 1) and BEVT masks (stage 2).

Every frame keeps exactly `K = round(h * w * (1 - ratio))` visible patches, so the
visible tokens form a compact `[B, T, K, D]` tensor. A mask is returned as
`pos [B, T, K]` int64: the sorted spatial indices (row-major `m * w + n` on the
`h x w` patch grid) of the visible patches of each frame.

Masks are drawn on `device` with one torch generator and no host synchronisation,
so a GPU batch gets its mask without a round trip. The same seed on the same device
type gives the same mask (CPU and CUDA generators produce different streams).
"""
from __future__ import annotations

import math
import numbers

import torch

from videoprism.checks import as_int, check_pos

__all__ = ["tube_mask", "bevt_mask", "inverse_slot_map", "num_visible"]

# BEiT block-wise masking: blocks of at least 16 patches on the 16x16 grid (scaled
# with the grid area), aspect ratio log-uniform in [0.3, 1/0.3].
_MIN_BLOCK_AT_256 = 16
_ASPECT = (0.3, 1 / 0.3)
# Block rounds per "minimum block" of per-frame budget: enough that the blocks fill
# nearly all of every frame's budget before the neighbour-first fill tops it up (a block
# must fit every frame of its run, so later rounds are refused more often: at stage 2,
# 16x16, 65%, blocks cover 95% of the masked patches with 16 per minimum block, 87% with 4).
_ROUNDS_PER_MIN_BLOCK = 16
_MAX_ROUNDS = 192


def num_visible(grid: tuple[int, int], ratio: float) -> int:
    """K = round(h * w * (1 - ratio)): visible patches per frame."""
    h, w = grid
    return int(round(h * w * (1.0 - ratio)))


def _check(batch, frames, grid, ratio) -> tuple[int, int, int]:
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"mask batch must be a positive int, got {batch!r}")
    if not (isinstance(frames, int) and frames >= 1):
        raise ValueError(f"mask frames must be a positive int, got {frames!r}")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"mask grid must be (h, w) positive ints (patches per column, row), got {grid!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1) (share of masked patches), got {ratio!r}")
    h, w = grid
    k = num_visible(grid, ratio)
    if k < 1:
        raise ValueError(f"mask ratio {ratio} leaves no visible patch on a {h}x{w} grid; lower the ratio")
    return h, w, k


def _generator(seed, generator, device) -> tuple[torch.Generator | None, torch.device]:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator to the mask, not both")
    if generator is not None:
        if device is not None and torch.device(device).type != generator.device.type:
            raise ValueError(f"mask generator is on {generator.device} but device={device}; "
                             "make a generator on the batch's device")
        return generator, generator.device
    device = torch.device("cpu" if device is None else device)
    if seed is None:
        return None, device
    value = as_int(seed)
    if value is None or not -2**63 <= value < 2**64:
        raise ValueError(f"mask seed must be an int in [-2^63, 2^64) as torch.Generator.manual_seed takes (or "
                         f"None: torch's global generator), got {seed!r}")
    if device.type == "meta":  # shapes only, nothing to draw
        return None, device
    g = torch.Generator(device=device)
    g.manual_seed(value)
    return g, device


def _lowest_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k lowest scores along the last axis (int64)."""
    return score.topk(k, dim=-1, largest=False, sorted=False).indices.sort(dim=-1).values


def tube_mask(batch: int, frames: int, grid: tuple[int, int], ratio: float, *, seed: int | None = None,
              generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Tube masking: one uniformly random set of K visible patches per sample, the same in
    every frame. Returns pos [B, T, K] int64, sorted within each frame."""
    h, w, k = _check(batch, frames, grid, ratio)
    gen, device = _generator(seed, generator, device)
    score = torch.rand(batch, h * w, generator=gen, device=device)
    return _lowest_sorted(score, k)[:, None, :].expand(batch, frames, k).contiguous()


def bevt_mask(batch: int, frames: int, grid: tuple[int, int], ratio: float, *, seed: int | None = None,
              generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """BEVT masking: BEiT block-wise masks extended over runs of consecutive frames.

    Each of R rounds draws one block per sample: a rectangle (area uniform in
    [min_block, h*w - K], aspect log-uniform in [0.3, 1/0.3], clamped to the grid) over
    a run of consecutive frames (length uniform in [1, T]). Rounds run in order; a block
    is added to every frame of its run if it pushes none of them past `h*w - K` masked
    patches, else to none (a block is a whole space-time cube, as BEVT's). Then each frame is
    topped up to exactly `h*w - K` masked patches, preferring unmasked patches next to masked
    ones (so the top-up grows blocks; it adds ~2% of the masked patches at the 16x16 grid, 65%).
    Returns pos [B, T, K] int64, sorted within each frame.

    All block geometry is drawn up front in one batch; only the acceptance is sequential
    (kernels/bevt_blocks.py: one Triton launch on a GPU, a few small ops per round elsewhere).
    """
    h, w, k = _check(batch, frames, grid, ratio)
    gen, device = _generator(seed, generator, device)
    n = h * w
    budget = n - k                                    # masked patches per frame
    if budget == 0:
        return torch.arange(n, device=device).expand(batch, frames, n).contiguous()
    blocks = propose_blocks(batch, frames, (h, w), budget, gen, device)
    accept = accept_blocks_ref
    if device.type == "cuda":   # the reference is launch-bound there (~8 tiny ops per round)
        try:
            from videoprism.kernels.bevt_blocks import bevt_accept_blocks_triton as accept
        except ImportError:  # a CUDA torch without Triton (Triton ships with Linux builds): the reference
            pass
    mask = accept(*blocks, frames, (h, w), budget).reshape(batch, frames, h, w)
    # Top-up: score masked patches 3, unmasked ones next to a masked patch in [1, 2),
    # the rest in [0, 1); the K lowest scores stay visible.
    m = mask.float()
    near = torch.zeros_like(m)
    near[..., 1:, :] += m[..., :-1, :]
    near[..., :-1, :] += m[..., 1:, :]
    near[..., :, 1:] += m[..., :, :-1]
    near[..., :, :-1] += m[..., :, 1:]
    score = torch.rand(batch, frames, h, w, generator=gen, device=device) + (near > 0).float()
    score = torch.where(mask, 3.0, score)
    return _lowest_sorted(score.reshape(batch, frames, n), k)


def propose_blocks(batch: int, frames: int, grid: tuple[int, int], budget: int, generator, device):
    """The block proposals of bevt_mask, all rounds at once: (top, left, bh, bw, start, length),
    each [R, B] int64 (see bevt_mask for their distributions)."""
    h, w = grid
    n = h * w
    # At most the budget: a low ratio (under ~6% at 16x16) would otherwise refuse every block.
    min_block = min(budget, max(1, round(_MIN_BLOCK_AT_256 * n / 256)))
    rounds = min(_MAX_ROUNDS, _ROUNDS_PER_MIN_BLOCK * math.ceil(budget / min_block))
    log_lo, log_hi = math.log(_ASPECT[0]), math.log(_ASPECT[1])
    u = torch.rand(6, rounds, batch, generator=generator, device=device)
    length = 1 + (u[0] * frames).long().clamp(max=frames - 1)                  # [R, B] in [1, T]
    start = (u[1] * (frames - length + 1)).long()
    area = min_block + u[2] * max(budget - min_block, 0)
    aspect = torch.exp(log_lo + u[3] * (log_hi - log_lo))
    bh = torch.sqrt(area * aspect).round().long().clamp(1, h)
    bw = torch.sqrt(area / aspect).round().long().clamp(1, w)
    top = (u[4] * (h - bh + 1)).long()
    left = (u[5] * (w - bw + 1)).long()
    return top, left, bh, bw, start, length


def accept_blocks_ref(top, left, bh, bw, start, length, frames: int, grid: tuple[int, int],
                      budget: int) -> torch.Tensor:
    """BEVT block acceptance, the rounds in order, all (b, t) at once per round: mask [B, T, h*w]
    bool. The math is in kernels/bevt_blocks.py (the one-launch GPU version).

    Every round's rows, columns and frame run are built up front, a few ops over all R rounds ([R, B, h + w + T]
    bool: as small as the block proposals), shaped to broadcast: the loop keeps the sequential acceptance, 9 ops
    a round and no views. It built them and kept a running count in ~47 (views included), and on the CPU
    (launch-bound: [B, T, 64] at tiny, 176 rounds) the draw took ~16-30 ms of a tiny stage-2 step's ~0.7 s."""
    R, B = top.shape
    h, w = grid
    dev = top.device
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    tt = torch.arange(frames, device=dev)
    in_rows = ((rows >= top[..., None]) & (rows < (top + bh)[..., None]))[:, :, None, :, None]   # [R, B, 1, h, 1]
    in_cols = ((cols >= left[..., None]) & (cols < (left + bw)[..., None]))[:, :, None, None]   # [R, B, 1, 1, w]
    in_runs = ((tt >= start[..., None]) & (tt < (start + length)[..., None]))[..., None, None]  # [R, B, T, 1, 1]
    mask = torch.zeros(B, frames, h, w, dtype=torch.bool, device=dev)
    for rows_r, cols_r, in_run, out_run in zip(in_rows, in_cols, in_runs, ~in_runs):
        rect = rows_r & cols_r                                                                   # [B, 1, h, w]
        # (mask | rect).sum: a frame's masked patches were the block added (what it had plus the new ones).
        fits_run = (((mask | rect).sum((2, 3), keepdim=True) <= budget) | out_run).all(1, keepdim=True)
        mask |= rect & (in_run & fits_run)                                                       # [B, T, h, w]
    return mask.reshape(B, frames, h * w)


def inverse_slot_map(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """slot [B, T, N] int32 with slot[b, t, pos[b, t, k]] = k and -1 where patch n is masked
    in frame t.

    The masked time axis as a table: the key of token (b, t, k) in frame t' sits at slot
    `slot[b, t', pos[b, t, k]]` (absent when -1). The attention kernels find it by a binary
    search of frame t' instead (`pos` sorted; no [B, T, N] table to build and read each step),
    the reference by scattering the tokens to their locations on a dense [B, T, N] grid (no
    slot lookup); this table is for code that looks slots up many times.
    """
    n = as_int(num_patches)
    if n is None or n < 1:
        raise ValueError(f"num_patches must be the grid's patch count, an int >= 1, got {num_patches!r}")
    num_patches = n
    if isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[2] > num_patches:
        raise ValueError(f"pos has K={pos.shape[2]} slots but num_patches={num_patches}; K must be <= N")
    check_pos(pos, num_patches)
    B, T, K = pos.shape
    slot = torch.full((B, T, num_patches), -1, dtype=torch.int32, device=pos.device)
    k = torch.arange(K, dtype=torch.int32, device=pos.device).expand(B, T, K)
    return slot.scatter_(2, pos.long(), k)
