"""Training masks keyed per clip: drawn for a step's whole global batch, handed out by micro-step.

A clip's masks (stage 1: the tube mask; stage 2: the BEVT mask and the slot permutation) are a function of
(train.seed, step, the clip's index in the step's global batch of train.global_batch clips). So any split of
that batch (ranks x clips per forward x accumulation) gives every clip the same masks, and its losses and
updates are the same up to float summation order; a resumed run draws at step s what the uninterrupted one did
(the seed comes from the step, never from a running count).

The index of a clip: the data sources order a step's global batch the same on any split, micro-batch by
micro-batch (micro-step a of a step covers clips [a*w*b, (a+1)*w*b) on w ranks of b clips). Within a global
micro-batch, rank r of w holds rows [r*b, (r+1)*b) of the in-memory sources (RandomClips, CachedClips) and
every w-th clip from r of the streamed manifest loader (it deals an epoch round-robin): `strided`.

Cost: one draw of the G clips per step (on the batch's device, no host synchronisation), the same work as a
run without accumulation draws per step, and fewer launches than one draw per micro-step (BEVT's acceptance
rounds run once for all of them). Each rank keeps its own rows of the step (G / w clips) for the step's
micro-steps: at stage 2's paper shapes (4096 clips, 16 frames, 16x16 patches, K = 90) that is
4096 * 16 * (90 + 256) * 8 B = 181 MB for the int64 `pos` and `perm` on one rank, 23 MB each on 8; the draw
itself briefly holds the global batch's (as every rank without accumulation does).
"""
from __future__ import annotations

from typing import Callable

import torch

from videoprism.train.parallel import Dist

# draw(clips, step, *dims) -> tensors whose first axis is the clip, row i the masks of clip i of the step.
Draw = Callable[..., tuple[torch.Tensor, ...]]


class StepMasks:
    """`masks(step, micro, b, dims, dist_=, accum=)` -> this rank's rows for micro-step `micro` of `step`, each
    tensor `[b, ...]`, from one `draw(accum * world * b, step, *dims)` per step (cached for its micro-steps)."""

    def __init__(self, draw: Draw, *, strided: bool = False):
        self.draw, self.strided = draw, strided
        self._key: tuple | None = None
        self._rows: tuple[torch.Tensor, ...] = ()  # this rank's rows of the step, each [accum, b, ...]

    def __call__(self, step: int, micro: int, b: int, dims: tuple, *, dist_: Dist, accum: int) -> tuple[torch.Tensor, ...]:
        if not 0 <= micro < accum:
            raise ValueError(f"micro-step {micro} of a step of {accum} micro-steps (train.global_batch / (ranks x "
                             "train.micro_batch))")
        key = (step, b, tuple(dims), dist_.rank, dist_.world, accum, self.strided)
        if key != self._key:
            self._rows = ()  # the last step's rows go before this step's draw
            full = self.draw(accum * dist_.world * b, step, *dims)
            self._rows = tuple(self._own(x, b, dist_, accum) for x in full)
            self._key = key
        return tuple(x[micro] for x in self._rows)

    def _own(self, x: torch.Tensor, b: int, dist_: Dist, accum: int) -> torch.Tensor:
        """This rank's rows of the step's draw `x [accum * w * b, ...]` as `[accum, b, ...]` (a copy: the other
        ranks' rows are freed)."""
        if self.strided:  # row j of rank r's micro-batch a: clip a*w*b + j*w + r
            return x.unflatten(0, (accum, b, dist_.world))[:, :, dist_.rank].contiguous()
        return x.unflatten(0, (accum, dist_.world, b))[:, dist_.rank].contiguous()
