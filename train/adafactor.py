"""Adafactor with no host reads: torch.optim.Adafactor's update, for the GPU and FSDP2.

torch.optim.Adafactor (torch 2.11-2.14) reads three scalars per parameter back to the host every
step (the step count, the parameter's RMS, the update's RMS): several hundred host syncs a step
for a base model, each draining the GPU's queue; and it squares a column norm in place, which
fails on FSDP2's sharded parameters (a norm over the sharded dimension is a partial sum until
the ranks reduce it, and cannot change placement in place). This optimizer computes the same
update with those scalars kept on the device (float64, cast to the parameter's dtype where they
meet it, as torch's Python floats are), out of place where a sharded tensor is reduced, and it
takes a `found_inf` flag as fused AdamW does: a flagged step leaves parameters and state as they
were (the trainer's non-finite skip without a host read).

Update of a parameter p with gradient g at step t (torch's Adafactor: Shazeer & Stern 2018 with
the relative step size rho_t = min(lr, 1/sqrt(t)) and 1 - beta2_t = t^beta2_decay):
    alpha = max(eps2, RMS(p)) * rho_t
    p    *= 1 - lr * weight_decay
    2+ dims: R = lerp(R, mean over the last dim of g^2, t^beta2_decay)         [..., m, 1]
             C = lerp(C, mean over the next-to-last dim of g^2, t^beta2_decay) [..., 1, n]
             V = R @ C / max(mean of R over its rows, eps1)
    vectors: V = lerp(V, g^2, t^beta2_decay)
    u     = g / sqrt(max(V, eps1^2))
    p    -= alpha / max(1, RMS(u) / d) * u
eps1 defaults to the machine epsilon of the parameter's dtype. The state (step, row_var, col_var,
variance) has torch's names and shapes; the step lives on the parameter's device.

Cost per m x n matrix: reads g three times (two norms, the update), p twice; O(m + n) state.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor


def _full(x: torch.Tensor) -> torch.Tensor:
    """A reduction of a sharded tensor, reduced over the ranks (an all-reduce, no host read)."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def _placed_as(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x laid out over the ranks as the parameter p is (DTensor may replicate a product with a
    tiny factor, e.g. for a [1, n] parameter sharded along its one row), so p can take it in place."""
    if isinstance(x, DTensor) and x.placements != p.placements:
        return x.redistribute(p.device_mesh, p.placements)
    return x


class Adafactor(torch.optim.Optimizer):
    """torch.optim.Adafactor's update and hyper-parameters (lr, beta2_decay, eps = (eps1, eps2), d,
    weight_decay), with no host read and a `found_inf` attribute honoured (see the module doc)."""

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0):
        if not lr >= 0.0:
            raise ValueError(f"Adafactor: lr must be >= 0, got {lr}")
        if not beta2_decay <= 0.0:
            raise ValueError(f"Adafactor: beta2_decay must be <= 0, got {beta2_decay}")
        if (eps[0] is not None and not eps[0] >= 0.0) or not eps[1] >= 0.0:
            raise ValueError(f"Adafactor: eps must be (None or >= 0, >= 0), got {eps}")
        if not d >= 1.0:
            raise ValueError(f"Adafactor: the clipping threshold d must be >= 1, got {d}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Adafactor: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self.state[p], group, found_inf)
        return loss

    @staticmethod
    def _update(p: torch.Tensor, g: torch.Tensor, state: dict, group: dict, found_inf: torch.Tensor | None) -> None:
        if g.is_sparse or torch.is_complex(p):
            raise RuntimeError("Adafactor takes dense real parameters")
        lr, wd, d = group["lr"], group["weight_decay"], group["d"]
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        keep = None if found_inf is None else found_inf.to(p.device) == 0
        step = state["step"]
        step += 1 if keep is None else keep.to(step.dtype)
        t = step.double().clamp(min=1)              # a flagged first step stays at 0 (its weight is zeroed)
        weight = t ** group["beta2_decay"]          # 1 - beta2_t
        rho = t.rsqrt().clamp(max=lr)               # min(lr, 1/sqrt(t))
        alpha = (_full(torch.linalg.vector_norm(p)).double() / math.sqrt(p.numel())).clamp(min=eps2) * rho
        if keep is not None:
            # A flagged step: zero gradient and zero averaging weight leave the statistics as they were, and
            # a zero update the parameter (its NaNs must not reach the statistics: where, not a product).
            g = torch.where(keep, g, 0.0)
            weight = torch.where(keep, weight, 0.0)
        if wd:
            factor = 1 - lr * wd
            p.mul_(factor if keep is None else torch.where(keep, factor, 1.0).to(p.dtype))
        w = weight.to(p.dtype)
        if g.dim() > 1:
            row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square() / g.size(-1)
            col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square() / g.size(-2)
            if "row_var" not in state:
                state["row_var"], state["col_var"] = torch.zeros_like(row_mean), torch.zeros_like(col_mean)
            row_var, col_var = state["row_var"], state["col_var"]
            row_var.lerp_(row_mean, w)
            col_var.lerp_(col_mean, w)
            var = torch.matmul(row_var, col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp(min=eps1))
        else:
            if "variance" not in state:
                state["variance"] = torch.zeros_like(g)
            var = state["variance"].lerp_(g * g, w).clone()
        # In place from here (fresh buffers of a parameter's size each step cost more than the math on a CPU).
        u = _placed_as(var.clamp_(min=eps1 * eps1).rsqrt_().mul_(g), p)
        rms_u = _full(torch.linalg.vector_norm(u)).double() / (math.sqrt(u.numel()) * d)
        p.add_(u.mul_((-alpha / rms_u.clamp(min=1.0)).to(p.dtype)))
