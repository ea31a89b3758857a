"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step, so a checkpoint needs only the step to
restore it and a skipped (non-finite) step keeps the same learning rate curve.
"""
from __future__ import annotations

import math

import torch

from videoprism.train.adafactor import Adafactor
from videoprism.train.config import OptimConfig, check_field


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps` (step 0 gets lr / warmup), then linear,
    cosine or constant decay from lr to min_lr at `total_steps`."""
    # Checked before the warm-up returns: a typo would otherwise stop the run only when the
    # warm-up ends (step 20000 in the paper's settings).
    check_field("optim", cfg, "decay")
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * frac
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))  # cosine


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on biases, norms, embeddings' scales or the
    temperature), as in CLIP/ViT training. Both optimizers take a `found_inf` flag (a 0-d tensor;
    non-zero: leave everything as it was), so the trainer skips a non-finite step on the device."""
    decay = [p for _, p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in params if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "adamw":
        # Fused AdamW: one kernel for all parameters on the GPU, one vectorised pass per parameter on the CPU
        # (the default there is a loop of ~10 aten ops per parameter: 25% of a `tiny` stage-1 step).
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    if cfg.name == "adafactor":
        # torch.optim.Adafactor's update without its per-parameter host reads, and FSDP2-ready (train/adafactor.py).
        return Adafactor(groups, lr=cfg.lr, momentum=cfg.adafactor_momentum, relative_step=cfg.adafactor_relative_step)
    raise ValueError(f"optim.name must be 'adamw' or 'adafactor', got {cfg.name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
