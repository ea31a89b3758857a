"""Adafactor with no host reads: torch.optim.Adafactor's update, for the GPU and FSDP2.

torch.optim.Adafactor (torch 2.11-2.14) reads three scalars per parameter back to the host every
step (the step count, the parameter's RMS, the update's RMS): several hundred host syncs a step
for a base model, each draining the GPU's queue; and it squares a column norm in place, which
fails on FSDP2's sharded parameters. This optimizer computes the same update with those scalars
kept on the device (float64, cast to fp32 and the parameter's dtype where they meet it, as torch's Python
floats are), and it takes a `found_inf` flag as fused AdamW does: a flagged step leaves
parameters and state as they were (the trainer's non-finite skip without a host read).

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

Sharded parameters (FSDP2/HSDP DTensors, dim 0 sharded over one mesh dimension): each rank works
on its own rows. What crosses the shards (sum of p^2 and of u^2 for the RMS values; for a matrix,
whose rows are the sharded dim, the column sums of g^2 and the row sum of R) is gathered from every
parameter of a group into one buffer and summed in one all-reduce: two collectives a step, not a
few per parameter (their update directions, one local shard's worth, wait in memory for the second).
The state is stored as DTensors (R and vectors sharded as p; C sharded as p when
p has 3+ dims, else replicated), so distributed checkpoints save and reshard it.

Cost per m x n matrix: reads g three times (two norms, the update; a flagged step's fill once more), p twice
(three times with weight decay); O(m + n) state. Launches: about 17 ops per matrix and 6 per vector (2 more
with found_inf), ~45 per parameter group (a TorchDispatchMode count: ~4.5k a step for base LvT's 384
tensors with found_inf). A parameter group should hold one dtype (the trainer's fp32 master weights): the
foreach ops fall back to one kernel per tensor otherwise. eps1 follows each parameter's dtype (torch's
takes the first parameter's for the whole group).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

# At most this many elements of parameters not sharded have their update directions held at once (128 MB in
# fp32; a larger parameter alone): few launches per chunk, not a copy of the whole model. Sharded parameters
# (FSDP2) hold theirs together, one local shard's worth, for their one all-reduce.
_CHUNK = 1 << 25


class _Param:
    """One parameter's local rows (its shard, or the whole tensor), the process group its dim 0 is
    sharded over, and its parameter group's hyper-parameters `hp`."""

    def __init__(self, p: torch.Tensor, hp: dict):
        self.p, self.hp, self.group, self.shape = p, hp, None, tuple(p.shape)
        self.local, self.grad = p, p.grad
        # Set by the step: averaging weight 1 - beta2_t and rho_t (0-d views), the sum of p^2 over the whole
        # parameter, and a matrix's [column sums of g^2, row sum of R] over the whole parameter (or None).
        self.weight = self.rho = self.p_sq = self.cols = None
        if isinstance(p, DTensor):
            sharded = [i for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]
            if sharded and (len(sharded) > 1 or p.placements[sharded[0]] != Shard(0)):
                raise ValueError(f"Adafactor: a parameter sharded as {p.placements} (shape {self.shape}); "
                                 "only dim 0 over one mesh dimension (FSDP2, HSDP) is supported")
            if sharded:
                self.group = p.device_mesh.get_group(sharded[0])
            self.local, self.grad = p.to_local(), p.grad.to_local()

    def state_tensor(self, local: torch.Tensor, shape: tuple[int, ...], shard_rows: bool) -> torch.Tensor:
        """A state tensor from this rank's part: a DTensor over p's mesh (dim 0 sharded as p's when
        `shard_rows`, else replicated) for a DTensor parameter, `local` itself otherwise."""
        if not isinstance(self.p, DTensor):
            return local
        placements = [pl if shard_rows else Replicate() for pl in self.p.placements]
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.p.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if isinstance(x, DTensor) else x


def _all_reduce_per_group(parts: list[list[torch.Tensor]], groups: list) -> list[list[torch.Tensor]]:
    """Sum each parameter's tensors over the ranks its shard group spans: one flat float64 buffer and one
    all-reduce per distinct group (parameters not sharded pass unchanged)."""
    out = list(parts)
    for group in dict.fromkeys(g for g in groups if g is not None):  # the same order on every rank
        idx = [i for i, g in enumerate(groups) if g is group]
        flat = torch.cat([t.reshape(-1).double() for i in idx for t in parts[i]])
        dist.all_reduce(flat, group=group)
        pieces = iter(flat.split([t.numel() for i in idx for t in parts[i]]))
        for i in idx:
            out[i] = [next(pieces).view(t.shape) for t in parts[i]]
    return out


class Adafactor(torch.optim.Optimizer):
    """torch.optim.Adafactor's update and hyper-parameters (lr, beta2_decay, eps = (eps1, eps2), d,
    weight_decay), with no host read, two collectives a step on sharded parameters, and a
    `found_inf` attribute honoured (see the module doc)."""

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
        # All parameter groups at once: their cross-shard sums share the two all-reduces.
        params = [_Param(p, hp) for hp in self.param_groups for p in hp["params"] if p.grad is not None]
        if params:
            self._step(params, getattr(self, "found_inf", None))
        return loss

    def _step(self, params: list[_Param], found_inf: torch.Tensor | None) -> None:
        dev = params[0].local.device
        keep = None if found_inf is None else (found_inf.to(dev) == 0).reshape(())  # GradScaler's is [1]
        flagged = None if keep is None else ~keep
        groups = _indices(params)
        for q in params:
            state = self.state[q.p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=dev)
            elif state["step"].device != dev:  # loaded from torch's Adafactor, whose step lives on the host
                state["step"] = state["step"].to(dev)
        # The step's scalars, vectorised over each parameter group (its hyper-parameters are numbers): a few
        # launches a group, where one parameter at a time took ~25 small kernels each.
        for idx in groups:
            qs = [params[i] for i in idx]
            hp = qs[0].hp
            steps = [self.state[q.p]["step"] for q in qs]
            torch._foreach_add_(steps, 1.0 if keep is None else keep.to(torch.float32))
            t = torch.stack(steps).double().clamp_(min=1)   # a flagged first step stays at 0 (its weight is zeroed)
            weight = t.pow(hp["beta2_decay"])               # 1 - beta2_t
            if keep is not None:
                weight = torch.where(keep, weight, 0.0)
            rho = t.rsqrt().clamp_(max=hp["lr"])             # min(lr, 1/sqrt(t))
            for q, w, r in zip(qs, weight.float().unbind(), rho.unbind()):
                q.weight, q.rho = w.to(q.local.dtype), r
        # Phase 1, local: the sums of p^2 (before the weight decay, as torch), the weight decay, the row
        # statistics, and for each parameter the partial sums that cross its shards (sum of p^2; for matrices
        # the column sums of g^2 and R's row sum).
        p_sq = torch.stack(torch._foreach_norm([q.local for q in params])).double().square_().unbind()
        for idx in groups:
            lr, wd = params[idx[0]].hp["lr"], params[idx[0]].hp["weight_decay"]
            if wd:
                factor = 1 - lr * wd
                torch._foreach_mul_([params[i].local for i in idx],
                                    factor if keep is None else torch.where(keep, factor, 1.0))
        partial = []
        for q, sq in zip(params, p_sq):
            state, g = self.state[q.p], q.grad
            if keep is not None:
                # A flagged step: zero gradient and zero averaging weight leave the statistics as they were,
                # and a zero update the parameter (its NaNs must not reach them: a fill, not a product; in
                # place, a flagged step's gradient being of no further use).
                g.masked_fill_(flagged, 0.0)
            parts = [sq]
            if len(q.shape) > 1:
                row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_().div_(q.shape[-1])
                if "row_var" not in state:
                    # For a matrix sharded by rows the column statistics span every shard: replicated.
                    state["row_var"] = q.state_tensor(torch.zeros_like(row_mean), q.shape[:-1] + (1,), True)
                    col = (*q.shape[:-2], 1, q.shape[-1])
                    local_col = col if len(q.shape) == 2 else (g.shape[0], *col[1:])
                    state["col_var"] = q.state_tensor(g.new_zeros(local_col), col, len(q.shape) > 2)
                row_var = _local(state["row_var"]).lerp_(row_mean, q.weight)
                # The column sums of g^2 and R's row sum: partial sums for a matrix sharded by rows (summed over
                # the shards below), whole ones for 3+ dims (dim 0, the sharded one, is a batch dim of the pair).
                cols = [torch.linalg.vector_norm(g, dim=-2, keepdim=True).square_(), row_var.sum(dim=-2, keepdim=True)]
                if len(q.shape) == 2:
                    parts += cols  # whole after the all-reduce below
                else:
                    q.cols = cols
            partial.append(parts)
        sums = _all_reduce_per_group(partial, [q.group for q in params])  # one all-reduce per shard group
        # Phases 2 and 3: the update directions u and p -= alpha / max(1, RMS(u) / d) * u. Sharded parameters
        # all at once (their sums of u^2 share one all-reduce; their directions, one local shard's worth, wait
        # for it); the others in chunks of at most _CHUNK elements (each chunk's directions held together).
        for q, (sq, *cols) in zip(params, sums):
            q.p_sq = sq
            if cols:
                q.cols = cols
        sharded = [q for q in params if q.group is not None]
        if sharded:
            self._update(sharded, dev)
        chunk, size = [], 0
        for q in (q for q in params if q.group is None):
            if chunk and size + q.local.numel() > _CHUNK:
                self._update(chunk, dev)
                chunk, size = [], 0
            chunk.append(q)
            size += q.local.numel()
        if chunk:
            self._update(chunk, dev)

    def _update(self, params: list[_Param], dev: torch.device) -> None:
        """u for each parameter, the sums of u^2 (over the shards: one all-reduce), and the update, its
        scalars (alpha = max(eps2, RMS(p)) * rho_t, the clipping) vectorised over the parameters."""
        updates = []
        for q in params:
            state = self.state[q.p]
            eps1 = q.hp["eps"][0]
            eps1 = torch.finfo(q.local.dtype).eps if eps1 is None else eps1
            if len(q.shape) > 1:
                col_sq, row_sum = q.cols
                m = q.shape[-2]
                col_var = _local(state["col_var"]).lerp_(col_sq.to(q.local.dtype).div_(m), q.weight)
                row_var = _local(state["row_var"])
                # R @ C of an [m, 1] and a [1, n] factor: each element one product, as the broadcast one computes.
                var = torch.mul(row_var, col_var).div_((row_sum.to(q.local.dtype) / m).clamp_(min=eps1))
                var.clamp_(min=eps1 * eps1)
            else:
                if "variance" not in state:
                    state["variance"] = q.state_tensor(torch.zeros_like(q.grad), q.shape, True)
                var = _local(state["variance"]).lerp_(q.grad * q.grad, q.weight).clamp(min=eps1 * eps1)
            updates.append(var.rsqrt_().mul_(q.grad))
        u_sq = torch.stack(torch._foreach_norm(updates)).double().square_()
        if any(q.group is not None for q in params):  # summed over the shards
            u_sq = torch.stack([s for (s,) in _all_reduce_per_group([[s] for s in u_sq.unbind()],
                                                                    [q.group for q in params])])
        # Per parameter: sqrt(numel), eps2, d (host numbers; one copy, page-locked so the host need not wait).
        consts = torch.tensor([[math.sqrt(math.prod(q.shape)), q.hp["eps"][1], q.hp["d"]] for q in params],
                              dtype=torch.float64)
        consts = consts.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else consts.to(dev)
        root_n, eps2, d = consts.unbind(1)
        alpha = torch.maximum(torch.stack([q.p_sq for q in params]).sqrt() / root_n, eps2)
        alpha *= torch.stack([q.rho for q in params])
        scale = (-alpha / (u_sq.sqrt() / (root_n * d)).clamp_(min=1.0)).float().unbind()
        for q, u, sc in zip(params, updates, scale):
            u.mul_(sc.to(q.local.dtype))
        torch._foreach_add_([q.local for q in params], updates)


def _indices(params: list[_Param]) -> list[list[int]]:
    """Positions of the parameters of each parameter group, in order."""
    out: dict[int, list[int]] = {}
    for i, q in enumerate(params):
        out.setdefault(id(q.hp), []).append(i)
    return list(out.values())
