"""Seeds of the trainer's random draws (masks, slot permutations, data order), derived
from the run's seed and where the draw happens.

Every rank derives the same seed for the same draw, so masks and data order do not depend
on the number of ranks or the micro-batch (a training mask is drawn for the step's whole global
batch: train.step_masks), and a resumed run draws what the uninterrupted one did.
"""
from __future__ import annotations

import random

import numpy as np
import torch

# What is drawn: the first key of every seed, so two kinds of draw never share one.
# INIT: parameters a stage makes after its data is built; FLIP: data.cache's mirrored rows of an epoch.
MASK, SLOTS, SAMPLE, DATASET, EPOCH, INIT, FLIP = range(7)
# Base seed of the validation draws: fixed, so runs with different train.seed are scored on
# the same masks.
VALIDATION = 10_000_019


def derive_seed(draw: int, seed: int, *keys: int) -> int:
    """A 63-bit seed for `draw` (MASK, SLOTS, ...) of a run seeded `seed` at `keys` (for a
    training mask: the step; a validation mask: the clip), hashed by numpy's SeedSequence (as
    the data loader seeds its draws), so distinct tuples get unrelated seeds. The linear formulas
    this replaces collided: (seed*P + step)*64 + micro repeats once micro reaches 64, seed + 1
    for a second draw is the next micro-step's first, and seed*P + step is run seed+1's draw P
    steps earlier."""
    state = np.random.SeedSequence([draw, seed, *keys]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def seed_process(seed: int) -> None:
    """The global generators of a run: torch's (parameter init) and, though no draw of ours
    uses them, Python's and numpy's, so the RNG states a checkpoint saves repeat with the run."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
