"""Frozen-feature attentive probe (as in the official classification demo): a MAP pooler
(hidden D) + linear head trained on the frozen encoder's tokens `[B, T*N, D]`, one probe
per label (e.g. motion direction, colour, shape).

Features are extracted once (no augmentation), so a probe trains in seconds on the CPU.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from videoprism.layers import AttentionPooler

# The probe's optimisation: 600 steps at lr 1e-2 (the earlier default) underfit the motion-direction
# probe on some runs' features: on one demo's stage-1 encoder, train accuracy 62-83% and validation
# 50-77% over 4 seeds; 1500 steps at 3e-3 fit it (train 92-100%, validation 67-93%; another run's
# features: 84-93% -> 91-96%). Colour and shape fit either way.
PROBE_STEPS, PROBE_LR = 1500, 3e-3


def check_probe_options(steps: int, lr: float, flags: tuple[str, str]) -> None:
    """A probe's steps (>= 1) and peak learning rate (finite, > 0), named by their command's `flags`: an inf lr
    passed a bare `lr > 0` and trained the probes to NaN weights, their accuracies then meaningless."""
    if steps < 1 or not 0 < lr < math.inf:
        raise ValueError(f"{flags[0]} must be >= 1 and {flags[1]} a finite number > 0, got {steps} and {lr}")


@torch.no_grad()
def extract_features(encoder: nn.Module, video: torch.Tensor, *, batch_size: int = 32,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Frozen encoder tokens of every clip: uint8 `[N, T, H, W, 3]` -> float32 `[N, T*N', D]` (CPU)."""
    encoder.eval()
    out = []
    for i in range(0, video.shape[0], batch_size):
        tokens, _ = encoder(video[i:i + batch_size].to(device))
        out.append(tokens.float().cpu())
    return torch.cat(out)


class ProbeHead(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_classes: int):
        super().__init__()
        self.pooler = AttentionPooler(dim, num_heads, dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pooler(tokens))


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *,
                num_heads: int, steps: int = PROBE_STEPS, batch_size: int = 64, lr: float = PROBE_LR,
                seed: int = 0, device: torch.device | str = "cpu", train_rows: torch.Tensor | None = None,
                val_rows: torch.Tensor | None = None) -> tuple[float, float]:
    """Train a probe head with AdamW (cosine schedule) on `device`; returns (validation accuracy, training
    accuracy): a low training accuracy says the probe underfit, not that the features lack the label.
    The features stay where they are (the host, for many clips): each batch moves to `device` as float32.
    `*_rows`: the rows of `*_x` that `*_y` labels, in order (None: every row), read in place: a copy of the
    labelled clips' features would double the host memory of the features (6.3 GB per 1000 clips at base)."""
    if train_y.min() < 0 or val_y.min() < 0:
        raise ValueError("probe labels must be class ids >= 0 (the manifest misses labels for some clips)")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    head = ProbeHead(train_x.shape[-1], num_heads, num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    train_y, val_y = train_y.to(device), val_y.to(device)
    finite = torch.ones((), dtype=torch.bool, device=device)  # read once at the end: no sync a step
    for _ in range(steps):
        idx = torch.randint(0, train_y.shape[0], (batch_size,), generator=g)
        x = train_x[idx if train_rows is None else train_rows[idx]].to(device, torch.float32)
        loss = nn.functional.cross_entropy(head(x), train_y[idx.to(device)])
        finite &= torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if not bool(finite):  # NaN logits argmax to class 0: the accuracy would be class 0's share
        raise ValueError(f"the probe diverged (a non-finite loss) at lr {lr:g}: lower the learning rate (--lr)")
    head.eval()

    def accuracy(x, rows, y):
        with torch.no_grad():  # a slice of every row is a view: no copy of 256 clips' features besides the float32
            pred = torch.cat([head((x[i:i + 256] if rows is None else x[rows[i:i + 256]]).to(device, torch.float32))
                              .argmax(-1) for i in range(0, y.shape[0], 256)])
        return float((pred == y).float().mean())

    return accuracy(val_x, val_rows, val_y), accuracy(train_x, train_rows, train_y)


def label_key(name: str) -> str:
    """The loader's batch key of a label: a manifest's int `label` is "label", a dict's entry k is "label_k"."""
    return "label" if name == "label" else f"label_{name}"


def probe_features(train_x: torch.Tensor, train_labels: dict, val_x: torch.Tensor, val_labels: dict,
                   labels: list[str], *, num_heads: int, steps: int = PROBE_STEPS, lr: float = PROBE_LR,
                   device: torch.device | str = "cpu") -> dict:
    """One probe per label on frozen features `[N, L, D]` (`*_labels`: the loader's label fields, -1 where a
    clip has none: such clips sit out that label's probe). Per label name, its own dict: validation `accuracy`,
    `train_accuracy`, `chance` (1 / the classes the clips have), `majority` (the majority-class share of the
    validation clips), `clips` ([train, val]) and `unseen` (validation classes no training clip has: the probe
    cannot predict them). Nested, not `<name>_train` keys: a label may be named so (dict keys `colour` and
    `colour_train`), and one label's results would overwrite another's."""
    out = {}
    for name in labels:
        key = label_key(name)
        for split, fields in (("training", train_labels), ("validation", val_labels)):
            if key not in fields:
                have = sorted(k[6:] if k.startswith("label_") else k for k in fields if k.startswith("label"))
                raise ValueError(f"probe label {name!r} is not in the {split} manifest (it has: "
                                 f"{have or 'no labels'})")
        ty, vy = train_labels[key], val_labels[key]
        tk, vk = ty >= 0, vy >= 0
        if not tk.any() or not vk.any():
            raise ValueError(f"probe label {name!r}: no {'training' if not tk.any() else 'validation'} clip has it")
        # The labelled clips' rows, the features left in place (None: every clip has the label).
        rows = {f"{split}_rows": None if keep.all() else keep.nonzero()[:, 0] for split, keep in (("train", tk),
                                                                                                 ("val", vk))}
        ty, vy = ty[tk], vy[vk]
        seen = set(ty.unique().tolist())
        classes = seen | set(vy.unique().tolist())
        if len(seen) == 1:
            raise ValueError(f"probe label {name!r}: every training clip has class {seen.pop()}; a probe needs two "
                             "classes or more (its accuracy would be that class's share)")
        acc, train_acc = train_probe(train_x, ty, val_x, vy, num_heads=num_heads, steps=steps, lr=lr, device=device,
                                     **rows)
        out[name] = {"accuracy": acc, "train_accuracy": train_acc, "chance": 1.0 / len(classes),
                     "majority": float(torch.bincount(vy).max() / vy.shape[0]),
                     "clips": [int(ty.shape[0]), int(vy.shape[0])], "unseen": sorted(classes - seen)}
    return out


def run_probes(encoder: nn.Module, train: dict, val: dict, labels: list[str], *, steps: int = PROBE_STEPS,
               lr: float = PROBE_LR, device: torch.device | str = "cpu") -> dict:
    """`probe_features` on the encoder's features of decoded clips (`train`/`val`: `video` and the label fields)."""
    tx = extract_features(encoder, train["video"], device=device)
    vx = extract_features(encoder, val["video"], device=device)
    return probe_features(tx, train, vx, val, labels, num_heads=encoder.config.num_heads, steps=steps, lr=lr,
                          device=device)
