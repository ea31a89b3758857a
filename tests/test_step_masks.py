"""Training masks keyed per clip (train/step_masks.py): a clip's stage-1 tube mask and its stage-2 BEVT mask and
slot permutation depend on (train.seed, step, the clip's index in the step's global batch) only, so every split
of a global batch over ranks, micro-batches and accumulation gives every clip the same masks. (The losses of
such splits under torchrun: test_train_distributed.py.)"""
from __future__ import annotations

import pytest
import torch

from videoprism.train.config import build_config
from videoprism.train.data import CachedClips, ManifestData, RandomClips
from videoprism.train.distill import Teacher
from videoprism.train.modeling import build_clip
from videoprism.train.parallel import Dist
from videoprism.train.stage1 import Stage1Task
from videoprism.train.stage2 import Stage2Task
from videoprism.train.step_masks import StepMasks

T, R = 2, 16  # 2 frames of 16x16 pixels, 4x4 patches
G = 8         # the global batch every split below divides
TINY = ["model.model_dim=16", "model.num_heads=2", "model.mlp_dim=32", "model.num_spatial_layers=1",
        "model.num_temporal_layers=1", "model.num_unimodal_layers=1", "model.num_auxiliary_layers=0",
        "model.patch_size=4", f"model.num_frames={T}", f"model.resolution={R}", "data.source=random",
        f"train.global_batch={G}", "stage2.decoder_dim=16", "stage2.decoder_layers=1", "stage2.decoder_heads=2"]
# (ranks, clips per rank per forward): accumulation G / (ranks * micro) = 1, 2, 4, 8.
SPLITS = [(1, 8), (1, 4), (1, 2), (1, 1), (2, 4), (2, 2), (2, 1), (4, 2), (4, 1), (8, 1)]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tasks():
    """One task per stage; each split below points it at its own config and rank."""
    out = {}
    for stage in (1, 2):
        cfg = build_config("tiny", TINY, stage)
        clip = build_clip(cfg.model, vocab=50 if stage == 1 else None, device=CPU)
        out[stage] = (Stage1Task(cfg, Dist(0, 1, CPU), clip, None) if stage == 1 else
                      Stage2Task(cfg, Dist(0, 1, CPU), Teacher(clip), None))
    return out


def batch(b: int) -> dict:
    return {"video": torch.zeros(b, T, R, R, 3, dtype=torch.uint8), "text_ids": torch.ones(b, 8, dtype=torch.long),
            "text_paddings": torch.zeros(b, 8)}


def masks_by_clip(task, stage: int, world: int, micro: int, step: int, *, strided: bool = False) -> dict:
    """{key: [G, ...]}: the masks every (rank, micro-step) of the split prepared, each row at its clip's index
    in the step's global batch (rank r of w holds rows [r*b, (r+1)*b) of every global micro-batch of w*b clips,
    or, `strided` (the streamed loader), every w-th row from r)."""
    task.cfg = build_config("tiny", [*TINY, f"train.micro_batch={micro}"], stage)
    task.step_masks.strided = strided
    keys = ("pos",) if stage == 1 else ("pos", "perm")
    out: dict[str, list] = {k: [None] * G for k in keys}
    for rank in range(world):
        task.dist = Dist(rank, world, CPU)
        for a in range(G // (world * micro)):
            inputs = task.prepare(batch(micro), step, a)
            for j in range(micro):
                index = a * world * micro + (j * world + rank if strided else rank * micro + j)
                for k in keys:
                    assert out[k][index] is None
                    out[k][index] = inputs[k][j]
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("stage", [1, 2])
def test_a_clip_gets_the_same_masks_under_every_split(tasks, stage):
    """Stage 1's tube mask, stage 2's BEVT mask and slot permutation of clip i of step s are the same whether
    the global batch of 8 is one forward, 2-8 accumulated micro-batches, 2-8 ranks, or both; a resumed run's
    step s (a fresh task: nothing cached) draws them too."""
    task = tasks[stage]
    for step in (0, 3):
        want = masks_by_clip(task, stage, 1, G, step)
        for world, micro in SPLITS[1:]:
            got = masks_by_clip(task, stage, world, micro, step)
            for k in want:
                assert torch.equal(got[k], want[k]), (stage, step, world, micro, k)
        # Distinct clips and distinct steps get distinct masks (two of BEVT's 6-of-16 masks may coincide).
        assert len({tuple(row.flatten().tolist()) for row in want["pos"]}) >= G - 1
        assert not torch.equal(want["pos"], masks_by_clip(task, stage, 1, G, step + 1)["pos"])
    micro = 2
    cfg = build_config("tiny", [*TINY, f"train.micro_batch={micro}"], stage)
    fresh = Stage1Task(cfg, Dist(1, 2, CPU), task.module.clip, None) if stage == 1 else \
        Stage2Task(cfg, Dist(1, 2, CPU), task.teacher, None)
    got = fresh.prepare(batch(micro), 3, 1)
    want = masks_by_clip(task, stage, 2, micro, 3)
    rows = slice(3 * micro, 4 * micro)  # rank 1 of 2, micro-step 1: clips a*w*b + r*b + j
    for k in want:
        assert torch.equal(got[k], want[k][rows]), k


def test_the_streamed_loader_deals_a_step_round_robin():
    """What ManifestData.strided_ranks says: the streamed loader's epoch order (no bad sample, within the first
    epoch) puts the same clips in a step's global batch on every split, row j of rank r's micro-batch a holding
    clip a*w*b + j*w + r of the step, not a*w*b + r*b + j (the in-memory sources' order)."""
    from videoprism.data.loader import VideoTextLoader
    from videoprism.data.manifest import Sample

    samples = [Sample(path=f"/nonexistent/{i}.mp4", caption=str(i)) for i in range(20)]

    def order(world: int, rank: int, micro: int):
        return VideoTextLoader(samples, num_frames=T, resolution=R, batch_size=micro, train=True, seed=3, rank=rank,
                               world_size=world, tokenizer=None, backend="pyav", device=CPU, num_workers=0,
                               max_bad_share=0.5, drop_last=True).epoch_order(0)

    whole = order(1, 0, G)
    for world, micro in SPLITS[1:]:
        for step in (0, 1):
            strided, blocked = [None] * G, [None] * G
            for rank in range(world):
                mine = order(world, rank, micro)
                for a in range(G // (world * micro)):
                    call = step * G // (world * micro) + a  # the loader's micro-batch count
                    for j in range(micro):
                        strided[a * world * micro + j * world + rank] = mine[call * micro + j]
                        blocked[a * world * micro + rank * micro + j] = mine[call * micro + j]
            assert strided == whole[step * G:(step + 1) * G].tolist(), (world, micro)
            assert (blocked == strided) == (world == 1 or micro == 1), (world, micro)


def test_the_streamed_loaders_round_robin_ranks_take_their_own_rows(tasks):
    """The streamed manifest loader deals an epoch's samples round-robin (rank r of w: every w-th from r), so
    row j of rank r's micro-batch a is clip a*w*b + j*w + r of the step; the masks follow the clip there too."""
    task = tasks[2]
    want = masks_by_clip(task, 2, 1, G, 5)
    for world, micro in [(2, 2), (2, 4), (4, 1), (4, 2)]:
        got = masks_by_clip(task, 2, world, micro, 5, strided=True)
        assert all(torch.equal(got[k], want[k]) for k in want), (world, micro)
    task.step_masks.strided = False
    assert not RandomClips.strided_ranks and not CachedClips.strided_ranks and ManifestData.strided_ranks


def test_step_masks_draw_once_per_step_and_check_the_micro_step():
    """One draw of the global batch per step (its micro-steps take their rows of it) and again for the next
    step; a micro-step past the step's accumulation is an error, not an empty mask."""
    calls = []

    def draw(clips, step, width):
        calls.append((clips, step))
        return (torch.arange(clips)[:, None] * 100 + step + torch.zeros(clips, width, dtype=torch.long),)

    masks = StepMasks(draw)
    d = Dist(1, 2, CPU)
    got = [masks(step, a, 3, (5,), dist_=d, accum=2)[0] for step in (7, 8) for a in (0, 1)]
    assert calls == [(12, 7), (12, 8)]
    assert [g[:, 0].tolist() for g in got] == [[307, 407, 507], [907, 1007, 1107], [308, 408, 508],
                                               [908, 1008, 1108]]
    with pytest.raises(ValueError, match="micro-step 2 of a step of 2"):
        masks(8, 2, 3, (5,), dist_=d, accum=2)


@pytest.mark.parametrize("stage", [1, 2])
def test_accumulated_steps_equal_the_whole_batch(tmp_path, stage):
    """The trainer on one process, the global batch of 8 as one forward, 2 micro-batches of 4 or 4 of 2: the
    same losses and gradient norms for 3 steps (float summation order apart), mask ratio as configured. Stage 1
    with stage1.grad_cache (its default): without it the contrastive loss of a micro-batch scores fewer clips.
    (Not the parameters to 1e-5: AdamW's normalised update turns the summation-order noise of a near-zero
    gradient entry into a step of up to lr.)"""
    from videoprism.train.trainer import Trainer

    def run(micro: int):
        cfg = build_config("tiny", [*TINY, f"train.micro_batch={micro}", f"train.out_dir={tmp_path / str(micro)}",
                                    "optim.warmup_steps=0", "optim.decay=constant", "optim.lr=1e-2"], stage)
        assert cfg.train.mask_ratio >= 0.5 and (stage == 2 or cfg.stage1.grad_cache)
        torch.manual_seed(0)
        clip = build_clip(cfg.model, vocab=50 if stage == 1 else None, device=CPU)
        d = Dist(0, 1, CPU)
        task = Stage1Task(cfg, d, clip, None) if stage == 1 else Stage2Task(cfg, d, Teacher(clip), None)
        data = RandomClips(micro_batch=micro, rank=0, world=1, frames=T, resolution=R, vocab=50, seed=0)
        trainer = Trainer(cfg, task, data, d, name="test")
        return [trainer.train_step() for _ in range(3)]

    want = run(G)
    assert len({r["loss"] for r in want}) == 3
    for micro in (4, 2):
        got = run(micro)
        for key in ("loss", "grad_norm"):
            assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-5, abs=1e-5), (micro, key)


@pytest.mark.parametrize("stage", [1, 2])
def test_each_stage_trains_on_its_own_kind_of_mask(stage):
    """DESIGN 4: stage 1 drops 50% of the tokens with tube masks (one visible set in every frame), stage 2 65%
    with BEVT masks (blocks over runs of frames: the visible set changes between the frames of most clips (a
    block over every frame can leave one unchanged: 0-5 of 32 clips over seeds 0-4), and the masked patches
    cluster, ~0.9 of their neighbours masked against ~0.65 for scattered patches). Either stage drawing the
    other's kind went unnoticed: every other test takes the masks as given. Oracle: the two definitions, on the
    masks a training step prepares (8x8 patches, 4 frames, 32 clips) with each stage's default ratio."""
    from tests.test_masking import masked_grid, masked_neighbour_share
    from videoprism.masking import num_visible

    frames, side, clips = 4, 32, 32
    sized = [o for o in TINY if not o.startswith(("model.num_frames", "model.resolution", "train.global_batch"))]
    cfg = build_config("tiny", [*sized, f"model.num_frames={frames}", f"model.resolution={side}",
                                f"train.global_batch={clips}"], stage)
    clip = build_clip(cfg.model, vocab=50 if stage == 1 else None, device=CPU)
    task = (Stage1Task(cfg, Dist(0, 1, CPU), clip, None) if stage == 1 else
            Stage2Task(cfg, Dist(0, 1, CPU), Teacher(clip), None))
    video = torch.zeros(clips, frames, side, side, 3, dtype=torch.uint8)
    pos = task.prepare({"video": video, "text_ids": torch.ones(clips, 8, dtype=torch.long),
                        "text_paddings": torch.zeros(clips, 8)}, 0, 0)["pos"]
    ratio = 0.5 if stage == 1 else 0.65
    assert pos.shape == (clips, frames, num_visible((8, 8), ratio))
    same_in_every_frame = (pos == pos[:, :1]).all(2).all(1)
    if stage == 1:
        assert same_in_every_frame.all()
    else:
        assert same_in_every_frame.float().mean() < 0.5
        assert masked_neighbour_share(masked_grid(pos, (8, 8))) > ratio + 0.15
