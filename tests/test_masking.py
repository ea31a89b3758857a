"""Tube and BEVT masks (DESIGN 4): exact K per frame, sorted unique positions, seeding,
blockiness against uniform random masks, and the inverse slot map."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from videoprism.masking import accept_blocks_ref, bevt_mask, inverse_slot_map, num_visible, tube_mask

MASKS = {"tube": tube_mask, "bevt": bevt_mask}


def masked_grid(pos: torch.Tensor, grid) -> torch.Tensor:
    """[B, T, h, w] bool, True where the patch is masked."""
    B, T, _ = pos.shape
    h, w = grid
    vis = torch.zeros(B, T, h * w, dtype=torch.bool, device=pos.device).scatter_(2, pos, True)
    return (~vis).reshape(B, T, h, w)


def masked_neighbour_share(masked: torch.Tensor) -> float:
    """Mean, over masked patches, of the share of their 4-neighbours (inside the grid) that
    are masked too: ~ the mask ratio for uniform masks, near 1 for block masks."""
    m = masked.double()
    near, deg = torch.zeros_like(m), torch.zeros_like(m)
    for dim in (2, 3):
        size = m.shape[dim]
        lo, hi = m.narrow(dim, 0, size - 1), m.narrow(dim, 1, size - 1)
        near.narrow(dim, 1, size - 1).add_(lo)
        near.narrow(dim, 0, size - 1).add_(hi)
        deg.narrow(dim, 1, size - 1).add_(1)
        deg.narrow(dim, 0, size - 1).add_(1)
    return float(((near / deg) * m).sum() / m.sum())


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("grid,frames,ratio", [((16, 16), 16, 0.65), ((16, 16), 8, 0.5), ((7, 5), 3, 0.3),
                                               ((1, 1), 2, 0.0), ((3, 4), 1, 0.9)])
def test_exact_k_sorted_unique(kind, grid, frames, ratio):
    pos = MASKS[kind](4, frames, grid, ratio, seed=0)
    n = grid[0] * grid[1]
    k = round(n * (1 - ratio))
    assert pos.shape == (4, frames, k) and pos.dtype == torch.int64
    assert num_visible(grid, ratio) == k
    assert int(pos.min()) >= 0 and int(pos.max()) < n
    assert bool((pos[..., 1:] > pos[..., :-1]).all()), "pos must be strictly increasing (sorted, unique)"
    # Every frame keeps exactly k: the masked share of the whole batch is 1 - k/n.
    assert float(masked_grid(pos, grid).double().mean()) == pytest.approx(1 - k / n)


def test_overall_ratio_is_close_to_the_request():
    for ratio in (0.5, 0.65, 0.9):
        pos = bevt_mask(2, 4, (16, 16), ratio, seed=1)
        share = float(masked_grid(pos, (16, 16)).double().mean())
        assert abs(share - ratio) <= 0.5 / 256   # K is rounded to a whole patch


def test_tube_is_the_same_in_every_frame_and_differs_across_samples():
    pos = tube_mask(8, 16, (16, 16), 0.5, seed=3)
    assert torch.equal(pos, pos[:, :1].expand_as(pos))
    assert not torch.equal(pos[0], pos[1])


def test_bevt_is_blockier_than_uniform_and_follows_frames():
    grid, B, T = (16, 16), 16, 8
    pos = bevt_mask(B, T, grid, 0.65, seed=0)
    masked = masked_grid(pos, grid)
    gen = torch.Generator().manual_seed(0)
    k = pos.shape[2]
    uniform = masked_grid(torch.rand(B, T, 256, generator=gen).argsort(-1)[..., :k].sort(-1).values, grid)
    bevt_share, uniform_share = masked_neighbour_share(masked), masked_neighbour_share(uniform)
    assert uniform_share == pytest.approx(0.65, abs=0.02)
    assert bevt_share > uniform_share + 0.15, (bevt_share, uniform_share)
    # Blocks span runs of frames: a masked patch is masked in the next frame far more often
    # than chance, yet frames differ (it is not a tube mask).
    same = (masked[:, 1:] & masked[:, :-1]).double().sum() / masked[:, :-1].double().sum()
    assert float(same) > 0.75
    assert not torch.equal(pos, pos[:, :1].expand_as(pos))
    # A budget under the minimum block (5% of 16x16 = 13 < 16 patches) still gets blocks, not
    # only the random top-up (uniform: ~0.05 of a masked patch's neighbours masked).
    low = masked_grid(bevt_mask(B, T, grid, 0.05, seed=0), grid)
    assert masked_neighbour_share(low) > 0.3


@pytest.mark.parametrize("kind", list(MASKS))
def test_seeding(kind):
    f = MASKS[kind]
    a = f(4, 4, (8, 8), 0.65, seed=11)
    assert torch.equal(a, f(4, 4, (8, 8), 0.65, seed=11))
    assert not torch.equal(a, f(4, 4, (8, 8), 0.65, seed=12))
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(f(4, 4, (8, 8), 0.65, generator=g1), f(4, 4, (8, 8), 0.65, generator=g2))
    # A generator advances: two draws from one generator differ.
    assert not torch.equal(f(4, 4, (8, 8), 0.65, generator=g1), f(4, 4, (8, 8), 0.65, generator=g1))


@pytest.mark.parametrize("kind", list(MASKS))
def test_bad_arguments_say_what_is_wrong(kind):
    f = MASKS[kind]
    with pytest.raises(ValueError, match="ratio"):
        f(2, 2, (4, 4), 1.0)
    with pytest.raises(ValueError, match="no visible patch"):
        f(2, 2, (2, 2), 0.9)
    with pytest.raises(ValueError, match="grid"):
        f(2, 2, (4, 0), 0.5)
    with pytest.raises(ValueError, match="batch"):
        f(0, 2, (4, 4), 0.5)
    with pytest.raises(ValueError, match="not both"):
        f(2, 2, (4, 4), 0.5, seed=1, generator=torch.Generator())
    # Each of these failed with a TypeError or OverflowError naming no argument, or (seed=1.7) ran as seed 1.
    for args, kw, needle in (((2, 2, 4, 0.5), {}, "grid"), ((2, 2, (4, 4), "0.5"), {}, "ratio"),
                             ((2, 2, (4, 4), None), {}, "ratio"), ((2, 2, (4, 4), 0.5), {"seed": 1.7}, "seed"),
                             ((2, 2, (4, 4), 0.5), {"seed": 2**64}, "seed"),
                             ((2, 2, (4, 4), 0.5), {"seed": "1"}, "seed")):
        with pytest.raises(ValueError, match=f"mask {needle} must be"):
            f(*args, **kw)
    # numpy's ints and floats are numbers too; a meta device gives the shape (it failed: no generator there)
    assert torch.equal(f(2, 2, (4, 4), np.float32(0.5), seed=np.int64(3)), f(2, 2, (4, 4), 0.5, seed=3))
    meta = f(2, 3, (4, 4), 0.5, seed=0, device="meta")
    assert meta.is_meta and meta.shape == f(2, 3, (4, 4), 0.5, seed=0).shape


def test_inverse_slot_map():
    pos = bevt_mask(3, 4, (5, 6), 0.6, seed=2)
    slot = inverse_slot_map(pos, 30)
    assert slot.shape == (3, 4, 30) and slot.dtype == torch.int32
    for b in range(3):
        for t in range(4):
            expect = torch.full((30,), -1, dtype=torch.int32)
            for k, n in enumerate(pos[b, t].tolist()):
                expect[n] = k
            assert torch.equal(slot[b, t], expect)
    with pytest.raises(ValueError, match="num_patches"):
        inverse_slot_map(pos, 5)
    for n in (np.int64(30), torch.tensor(30)):  # numpy's ints and 0-d tensors as before
        assert torch.equal(inverse_slot_map(pos, n), slot)
    for bad in (30.0, None):  # a TypeError from torch.full / a comparison
        with pytest.raises(ValueError, match="num_patches must be the grid's patch count"):
            inverse_slot_map(pos, bad)
    # A repeated or out-of-range index let one slot win silently, or failed inside scatter_.
    for bad in ([[[0, 0, 3]]], [[[0, 1, 30]]], [[[-1, 1, 2]]]):
        with pytest.raises(ValueError, match=r"indices in \[0, 30\) in increasing order"):
            inverse_slot_map(torch.tensor(bad), 30)


def test_inverse_slot_map_of_an_unmasked_clip_is_the_identity():
    """Ratio 0 keeps every patch (K = N, a valid mask): patch n of every frame sits at slot n, none absent."""
    pos = tube_mask(2, 3, (3, 4), 0.0, seed=0)
    assert torch.equal(pos, torch.arange(12).expand(2, 3, 12))
    assert torch.equal(inverse_slot_map(pos, 12), torch.arange(12, dtype=torch.int32).expand(2, 3, 12))


def _block_geometry(rounds, batch, frames, grid, seed):
    """Random rectangles and frame runs, some past the grid edge and the frame count (the
    kernel must clip exactly as the reference does)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    top, left = torch.randint(0, h, (rounds, batch), generator=g), torch.randint(0, w, (rounds, batch), generator=g)
    bh, bw = torch.randint(1, h + 1, (rounds, batch), generator=g), torch.randint(1, w + 1, (rounds, batch), generator=g)
    start = torch.randint(0, frames, (rounds, batch), generator=g)
    length = torch.randint(1, frames + 1, (rounds, batch), generator=g)
    return top, left, bh, bw, start, length


def test_bevt_block_is_a_whole_cube_or_nothing():
    """DESIGN 4: a block spans a run of consecutive frames. Round 0 masks the top row of frame 0;
    round 1's bottom row over frames 0-1 would pass frame 0's budget of 3, so it is refused in
    both frames (not kept in frame 1 alone, which would leave a gap in its run)."""
    col = lambda *v: torch.tensor(v)[:, None]  # noqa: E731  [R, B=1]
    geometry = (col(0, 1), col(0, 0), col(1, 1), col(2, 2), col(0, 0), col(1, 2))  # top left bh bw start length
    mask = accept_blocks_ref(*geometry, 2, (2, 2), 3)
    assert mask[0].tolist() == [[True, True, False, False], [False, False, False, False]]
    # With room in every frame of its run the same block is taken in all of them.
    mask = accept_blocks_ref(*geometry, 2, (2, 2), 4)
    assert mask[0].tolist() == [[True, True, True, True], [False, False, True, True]]


@pytest.mark.parametrize("rounds,batch,frames,grid,budget", [(24, 3, 4, (16, 16), 166), (7, 2, 3, (5, 7), 20),
                                                             (1, 1, 1, (1, 1), 1), (40, 2, 5, (9, 4), 30)])
def test_bevt_block_kernel_equals_the_reference(rounds, batch, frames, grid, budget):
    """The one-launch GPU acceptance (run here in Triton's interpreter) = the PyTorch rounds."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        device = "cuda"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device = "cpu"
    else:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from videoprism.kernels.bevt_blocks import bevt_accept_blocks_triton
    geometry = [t.to(device) for t in _block_geometry(rounds, batch, frames, grid, seed=rounds)]
    ref = accept_blocks_ref(*geometry, frames, grid, budget)
    got = bevt_accept_blocks_triton(*geometry, frames, grid, budget)
    assert got.dtype == torch.bool and got.shape == (batch, frames, grid[0] * grid[1])
    assert torch.equal(got, ref)
    assert bool((ref.sum(-1) <= budget).all()) and bool(ref.any())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(MASKS))
def test_masks_on_the_gpu(kind):
    """The GPU path (BEVT's block rounds are a Triton kernel there) keeps the CPU tests' properties."""
    pos = MASKS[kind](32, 16, (16, 16), 0.65, seed=0, device="cuda")
    assert pos.device.type == "cuda" and pos.shape == (32, 16, 90) and pos.dtype == torch.int64
    assert bool((pos[..., 1:] > pos[..., :-1]).all()) and int(pos.min()) >= 0 and int(pos.max()) < 256
    assert torch.equal(pos, MASKS[kind](32, 16, (16, 16), 0.65, seed=0, device="cuda"))
    assert not torch.equal(pos, MASKS[kind](32, 16, (16, 16), 0.65, seed=1, device="cuda"))
    pos = pos.cpu()
    masked = masked_grid(pos, (16, 16))
    if kind == "tube":
        assert torch.equal(pos, pos[:, :1].expand_as(pos)) and not torch.equal(pos[0], pos[1])
    else:
        assert masked_neighbour_share(masked) > 0.65 + 0.15     # uniform masks: ~0.65
        same = (masked[:, 1:] & masked[:, :-1]).double().sum() / masked[:, :-1].double().sum()
        assert float(same) > 0.75 and not torch.equal(pos, pos[:, :1].expand_as(pos))


def test_bevt_top_up_grows_the_blocks(monkeypatch):
    """The top-up after the block rounds masks unmasked patches next to masked ones first: with the rounds
    replaced by one 2x2 block per frame and a budget of 6 (2 to top up, 8 free 4-neighbours), both
    top-up patches are 4-neighbours of the block (a uniform top-up: ~1.6% of frames)."""
    import videoprism.masking as masking

    def one_block(top, left, bh, bw, start, length, frames, grid, budget):
        mask = torch.zeros(top.shape[1], frames, *grid, dtype=torch.bool, device=top.device)
        mask[..., 3:5, 3:5] = True
        return mask.reshape(top.shape[1], frames, -1)

    monkeypatch.setattr(masking, "accept_blocks_ref", one_block)
    pos = masking.bevt_mask(8, 4, (8, 8), 6 / 64, seed=0)
    masked = masked_grid(pos, (8, 8))
    assert bool(masked[..., 3:5, 3:5].all()) and int(masked.sum()) == 8 * 4 * 6
    ring = torch.zeros(8, 8, dtype=torch.bool)
    ring[2, 3:5] = ring[5, 3:5] = ring[3:5, 2] = ring[3:5, 5] = True
    assert int((masked & ring).sum()) == 8 * 4 * 2


def test_bevt_blocks_are_drawn_per_sample():
    """DESIGN 4: per-sample random rectangles. Two samples of a batch share about as many masked patches as
    two independent block masks of the ratio (here 0.69-0.79 of one sample's masked patches), not the
    ~0.95 of one set of blocks drawn for the whole batch (only the top-up would differ then)."""
    grid, B, T = (16, 16), 8, 8
    masked = masked_grid(bevt_mask(B, T, grid, 0.65, seed=0), grid)
    shared = [float((masked[0] & masked[j]).sum() / masked[0].sum()) for j in range(1, B)]
    assert max(shared) < 0.85, shared


@pytest.mark.parametrize("grid,frames", [((16, 16), 8), ((8, 8), 4), ((32, 32), 2), ((12, 20), 3)])
def test_bevt_block_proposals_follow_the_beit_geometry(grid, frames):
    """DESIGN 4 (BEiT block-wise masking): a block's area is drawn in [min_block, budget] with min_block 16
    patches at the 16x16 grid, scaled with the grid area (4 at 8x8, 64 at 32x32); its aspect ratio h/w
    log-uniform in [0.3, 1/0.3] (as many tall blocks as wide ones); its sides whole patches inside the
    grid; its run 1..T consecutive frames inside the clip. Sides are rounded to whole patches (the
    bounds below allow half a patch per side)."""
    from videoprism.masking import propose_blocks

    h, w = grid
    n = h * w
    budget, min_block = round(0.65 * n), 16 * n / 256
    top, left, bh, bw, start, length = propose_blocks(64, frames, grid, budget, torch.Generator().manual_seed(0),
                                                      "cpu")
    assert bool((top >= 0).all() and (top + bh <= h).all() and (left >= 0).all() and (left + bw <= w).all())
    assert bool((bh >= 1).all() and (bw >= 1).all())
    assert bool((length >= 1).all() and (start >= 0).all() and (start + length <= frames).all())
    assert int(length.max()) == frames and int(length.min()) == 1
    area = (bh * bw).double()
    # The smallest blocks are near min_block, never far below it (a side rounds down by half a patch at most).
    assert 0.7 * min_block <= float(area.min()) <= 1.25 * min_block, (float(area.min()), min_block)
    assert float(area.max()) > 0.75 * budget
    # Tall and wide blocks alike; blocks that no side of the grid clamped keep h/w within the range.
    tall, wide = float((bh > bw).double().mean()), float((bw > bh).double().mean())
    assert tall > 0.35 and wide > 0.35, (tall, wide)
    free = (bh < h) & (bw < w)
    assert bool(((bh[free] + 0.5) / (bw[free] - 0.5) >= 0.3).all())
    assert bool(((bh[free] - 0.5) / (bw[free] + 0.5) <= 1 / 0.3).all())


def test_bevt_block_rounds_take_few_ops_each():
    """The rounds are sequential and on the CPU each op is a launch of a few microseconds on [B, T, h, w] bools: the
    reference built each round's rectangle and frame run in the loop, 47 dispatched ops a round (views included),
    and a tiny stage-2 step's draw (176 rounds) took ~16-30 ms of its ~0.7 s. The geometry is built up front: at
    most 15 ops a round. The masks are the Triton kernel's (test_bevt_block_kernel_equals_the_reference) and whole
    cubes (test_bevt_block_is_a_whole_cube_or_nothing). The bound leaves room for another torch's dispatch of the
    same ops (9 a round under 2.14)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    rounds = 176
    geometry = _block_geometry(rounds, 4, 8, (8, 8), seed=3)
    with CountOps() as counted:
        mask = accept_blocks_ref(*geometry, 8, (8, 8), 42)
    assert counted.ops <= 15 * rounds + 40, counted.ops / rounds
    assert bool((mask.sum(-1) <= 42).all()) and bool(mask.any())
