"""The frozen-feature probe (train/probe.py) on features whose labels are known by construction."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import PEAK_MEMORY
from videoprism.train.probe import probe_features, train_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_probe_accuracy_is_the_share_of_clips_it_classifies_right():
    """Features that carry the class in every token (a probe fits them exactly) with 3 of 10 validation labels
    changed to another class: validation accuracy is 7/10 and training accuracy 1, counted by hand."""
    markers = torch.eye(4, 16) * 4
    g = torch.Generator().manual_seed(2)

    def clips(y):
        return markers[y][:, None, :] + 0.1 * torch.randn(len(y), 6, 16, generator=g)

    ty, vy = torch.arange(40) % 4, torch.arange(10) % 4
    vx = clips(vy)
    wrong = vy.clone()
    wrong[:3] = (wrong[:3] + 1) % 4
    val, train = train_probe(clips(ty), ty, vx, wrong, num_heads=2, steps=200)
    assert val == pytest.approx(0.7, abs=1e-6) and train == 1.0


def test_probe_refuses_labels_it_cannot_score():
    """A validation clip without the label (-1) would count as a miss; a single training class gives its share."""
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(8, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    with pytest.raises(ValueError, match="class ids >= 0"):
        train_probe(tx, torch.tensor([0, 1] * 4), vx, torch.tensor([0, 1, -1, 0]), num_heads=2, steps=1)
    with pytest.raises(ValueError, match="every training clip has class 5"):
        probe_features(tx, {"label": torch.full((8,), 5)}, vx, {"label": torch.tensor([5, 0, 5, 0])}, ["label"],
                       num_heads=2, steps=1)


_PROBE_PEAK = PEAK_MEMORY + """
import torch
from videoprism.train.probe import probe_features
tx, vx = torch.randn(4000, 64, 128).bfloat16(), torch.randn(100, 64, 128).bfloat16()
ty, vy = torch.arange(4000) % 3, torch.arange(100) % 3
ty[0] = vy[0] = -1
probe_features(tx[:300], {"label": ty[:300]}, vx, {"label": vy}, ["label"], num_heads=2, steps=2)  # lazy set-up
rss = reset_peak()
probe_features(tx, {"label": ty}, vx, {"label": vy}, ["label"], num_heads=2, steps=2)
print(peak_since(rss))
"""


def test_a_label_some_clips_lack_reads_the_features_in_place():
    """A label that some clips lack trained its probe on a copy of the other clips' features: the host held the
    features twice (10k clips at base, 63 GB in bfloat16, became 126 GB). The probe reads the labelled rows in place
    (the same probe, bit for bit: test_clips_without_a_label_sit_out_its_probe): the peak of probing 4000 clips of
    62.5 MB of features stays far below another copy of them."""
    r = subprocess.run([sys.executable, "-c", _PROBE_PEAK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    features = 4000 * 64 * 128 * 2
    assert int(r.stdout) < features / 2, f"peak {int(r.stdout) / 2**20:.0f} MB"
