"""The frozen-feature probe (train/probe.py) on features whose labels are known by construction."""
from __future__ import annotations

import torch

from videoprism.train.probe import train_probe


def _clips(n: int, g: torch.Generator, shuffle_labels: bool = False):
    """n clips of 32 noise tokens (dim 16); class c puts marker vector c on 4 random tokens, so a
    pooler must find them among the rest, as a motion probe must find the moving object."""
    markers = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 32, 16, generator=g)
    for i in range(n):
        x[i, torch.randperm(32, generator=g)[:4]] += markers[y[i]]
    if shuffle_labels:
        y = y[torch.randperm(n, generator=g)]
    return x, y


def test_probe_finds_a_label_the_features_carry():
    g = torch.Generator().manual_seed(0)
    (tx, ty), (vx, vy) = _clips(400, g), _clips(200, g)
    val, train = train_probe(tx, ty, vx, vy, num_heads=4)
    assert val >= 0.95 and train >= 0.95, (val, train)


def test_probe_is_at_chance_on_labels_the_features_do_not_carry():
    """Shuffled labels: validation at chance (4 classes), whatever the probe memorised."""
    g = torch.Generator().manual_seed(1)
    (tx, ty), (vx, vy) = _clips(400, g, shuffle_labels=True), _clips(400, g, shuffle_labels=True)
    val, train = train_probe(tx, ty, vx, vy, num_heads=4, steps=300)
    assert val < 0.35 and train > val, (val, train)
