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
    alpha = max(eps2, RMS(p)) * rho_t     (relative_step=False: alpha = lr)
    p    *= 1 - lr * weight_decay
    2+ dims: R = lerp(R, mean over the last dim of g^2, t^beta2_decay)         [..., m, 1]
             C = lerp(C, mean over the next-to-last dim of g^2, t^beta2_decay) [..., 1, n]
             V = R @ C / max(mean of R over its rows, eps1)
    vectors: V = lerp(V, g^2, t^beta2_decay)
    u     = g / sqrt(max(V, eps1^2))
    s     = -alpha / max(1, RMS(u) / d) * u
    p    += s                             (momentum b1 > 0: M = lerp(M, s, 1 - b1); p += M)
eps1 defaults to the machine epsilon of the parameter's dtype. The state (step, row_var, col_var,
variance) has torch's names and shapes, plus `momentum` (p's shape) when b1 > 0; the step lives on the
parameter's device, in float64 (torch's float32 count stops at 2^24 steps).

The defaults are torch's (relative step, no momentum): a step moves each parameter by about lr times
its own RMS. `relative_step=False` and `momentum` are the switches of optax's and praxis' Adafactor
(multiply_by_parameter_scale=False, momentum): with both, the step is lr in absolute terms, averaged
over steps, as in the CoCa / ViT-g recipes (beta1 = 0.9), the lineage of the paper's "Adafactor, lr 5e-4".
The momentum averages the whole step, lr included, without bias correction (as optax); weight decay
stays outside it (decoupled, as torch's).

Sharded parameters (FSDP2/HSDP DTensors, dim 0 sharded over one mesh dimension): each rank works
on its own rows. What crosses the shards (sum of p^2 and of u^2 for the RMS values; for a matrix,
whose rows are the sharded dim, the column sums of g^2 and the row sum of R) is gathered from every
parameter of a group into one buffer and summed in one all-reduce: two collectives a step, not a
few per parameter (their update directions, one local shard's worth, wait in memory for the second).
The state is stored as DTensors (R and vectors sharded as p; C sharded as p when
p has 3+ dims, else replicated), so distributed checkpoints save and reshard it.

Same-shape parameters of a group (and of a shard group) are updated as one stacked tensor on a GPU
(STACK_DEVICES; `_Bucket`): the launches of a step follow the number of shapes, not of parameters. Base
LvT's step (384 tensors, 130 matrices of 10 shapes): 760 aten ops stacked, 8020 one parameter at a time
(TorchDispatchMode counts, bench/optimizer.py `aten_ops`), for two more passes over the gradients (the
stacking copy).

Cost per m x n matrix: reads g three times (two norms, the update; a flagged step's fill once more; +2
passes when stacked), p twice (three times with weight decay, once less with relative_step=False); O(m + n)
state, and M (m x n, read and written once) with momentum. A parameter group should hold
one dtype (the trainer's fp32 master weights): the foreach ops fall back to one kernel per tensor otherwise.
eps1 follows each parameter's dtype (torch's takes the first parameter's for the whole group).
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
# Devices on which same-shape parameters are updated as one stacked tensor. On a GPU each op costs the host
# a dispatch and a launch (~5 us), base LvT's step issued ~3.9k of them one parameter at a time (~735 stacked),
# and stacking costs two passes over the gradients at the card's bandwidth (~0.5 ms for base on an H200). On
# the CPU ops cost their arithmetic, and the copy made the step 1.21x slower (1431 vs 1185 ms, base LvT, 2
# cores): there every parameter stays a bucket alone (views, no copies).
STACK_DEVICES = ("cuda",)


# The hyper-parameters beyond torch's Adafactor, at the values that give its update.
_SWITCHES = {"momentum": 0.0, "relative_step": True}


class _Param:
    """One parameter's local rows (its shard, or the whole tensor), the process group its dim 0 is
    sharded over, and its parameter group's hyper-parameters `hp`."""

    def __init__(self, p: torch.Tensor, hp: dict):
        self.p, self.hp, self.group, self.shape = p, hp, None, tuple(p.shape)
        self.local, self.grad = p, p.grad
        # Set by the step: averaging weight 1 - beta2_t and rho_t (0-d views), the sum of p^2 of the local rows (0
        # where the step is not relative: alpha needs no RMS of p).
        self.weight = self.rho = self.p_sq = None
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
    """Sum each bucket's tensors over the ranks its shard group spans: one flat float64 buffer and one
    all-reduce per distinct group (buckets not sharded pass unchanged)."""
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
    `found_inf` attribute honoured (see the module doc); `momentum` (b1, 0 = none) and `relative_step`
    (False: lr is the step's size, not its size relative to the parameter's RMS) as optax's. `stack`:
    update same-shape parameters as one stacked tensor (None: on the devices of STACK_DEVICES)."""

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0,
                 momentum: float = 0.0, relative_step: bool = True, stack: bool | None = None):
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
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Adafactor: momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d,
                                  "weight_decay": weight_decay, "momentum": momentum,
                                  "relative_step": bool(relative_step)})
        self.stack = stack

    def __setstate__(self, state):
        # A state dict saved before the switches existed holds groups without them: torch's update.
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in _SWITCHES.items():
                group.setdefault(k, v)

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
        for q in params:
            state = self.state[q.p]
            # float64: a float32 count (torch's) stops at 2^24 = 16,777,216 steps, and 1/sqrt(t) with it.
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64, device=dev)
            elif state["step"].device != dev or state["step"].dtype != torch.float64:
                # loaded from torch's Adafactor (its step on the host) or a checkpoint of the float32 count
                state["step"] = state["step"].to(dev, torch.float64)
        # The step's scalars, vectorised over each parameter group (its hyper-parameters are numbers): a few
        # launches a group, where one parameter at a time took ~25 small kernels each.
        for idx in _indices(params):
            qs = [params[i] for i in idx]
            hp = qs[0].hp
            steps = [self.state[q.p]["step"] for q in qs]
            torch._foreach_add_(steps, 1.0 if keep is None else keep.to(torch.float64))
            t = torch.stack(steps).clamp_(min=1)   # a flagged first step stays at 0 (its weight is zeroed)
            weight = t.pow(hp["beta2_decay"])               # 1 - beta2_t
            if keep is not None:
                weight = torch.where(keep, weight, 0.0)
            # min(lr, 1/sqrt(t)); the step's own size with relative_step=False
            rho = t.rsqrt().clamp_(max=hp["lr"]) if hp["relative_step"] else torch.full_like(t, hp["lr"])
            for q, w, r in zip(qs, weight.float().unbind(), rho.unbind()):
                q.weight, q.rho = w.to(q.local.dtype), r
        # The sums of p^2 (before the weight decay, as torch) where the step is relative, then the weight decay.
        relative = [q for q in params if q.hp["relative_step"]]
        sums = torch.stack(torch._foreach_norm([q.local for q in relative])).double().square_() if relative else []
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        for q in params:
            q.p_sq = zero
        for q, sq in zip(relative, sums):
            q.p_sq = sq
        for idx in _indices(params):
            lr, wd = params[idx[0]].hp["lr"], params[idx[0]].hp["weight_decay"]
            if wd:
                factor = 1 - lr * wd
                torch._foreach_mul_([params[i].local for i in idx],
                                    factor if keep is None else torch.where(keep, factor, 1.0))
        # Same-shape parameters side by side, so that they share buckets; in an order that is the same on every
        # rank (the all-reduces concatenate in it). Sharded parameters all at once (their cross-shard sums share
        # two all-reduces; their directions, one local shard's worth, wait for the second); the others in chunks
        # of at most _CHUNK elements.
        stack = dev.type in STACK_DEVICES if self.stack is None else self.stack
        order = {id(hp): i for i, hp in enumerate(self.param_groups)}
        ranked = sorted(params, key=lambda q: (order[id(q.hp)], q.shape, str(q.local.dtype)))
        sharded = [q for q in ranked if q.group is not None]
        if sharded:
            self._update(_Bucket.of(sharded, stack), flagged, dev)
        local = [q for q in ranked if q.group is None]
        chunk, size = [], 0
        for q in local:
            if chunk and size + q.local.numel() > _CHUNK:
                self._update(_Bucket.of(chunk, stack), flagged, dev)
                chunk, size = [], 0
            chunk.append(q)
            size += q.local.numel()
        if chunk:
            self._update(_Bucket.of(chunk, stack), flagged, dev)

    def _update(self, buckets: list["_Bucket"], flagged: torch.Tensor | None, dev: torch.device) -> None:
        """The update of every parameter of `buckets`: the statistics, the directions u, the sums of u^2
        (over the shards: one all-reduce before the directions, one after), and p -= alpha / max(1, RMS(u) / d)
        * u, its scalars (alpha = max(eps2, RMS(p)) * rho_t, the clipping) vectorised over the parameters."""
        # Phase 1, local: the row statistics and the partial sums that cross a matrix's shards (sum of p^2;
        # for a matrix whose rows are sharded, the column sums of g^2 and R's row sum).
        partial = []
        for b in buckets:
            parts = [_stacked([q.p_sq for q in b.params])]
            b.grad = _stacked([q.grad for q in b.params])
            if flagged is not None:
                # A flagged step: zero gradient and zero averaging weight leave the statistics as they were,
                # and a zero update the parameter (its NaNs must not reach them: a fill, not a product).
                b.grad.masked_fill_(flagged, 0.0)
            if b.matrix:
                state = [self.state[q.p] for q in b.params]
                for q, st in zip(b.params, state):
                    if "row_var" not in st:
                        # For a matrix sharded by rows the column statistics span every shard: replicated.
                        st["row_var"] = q.state_tensor(q.grad.new_zeros(q.grad.shape[:-1] + (1,)),
                                                       q.shape[:-1] + (1,), True)
                        col = (*q.shape[:-2], 1, q.shape[-1])
                        local_col = col if len(q.shape) == 2 else (q.grad.shape[0], *col[1:])
                        st["col_var"] = q.state_tensor(q.grad.new_zeros(local_col), col, len(q.shape) > 2)
                row_mean = torch.linalg.vector_norm(b.grad, dim=-1, keepdim=True).square_().div_(b.shape[-1])
                b.row = _lerp_state([_local(st["row_var"]) for st in state], row_mean, b.weight)
                # The column sums of g^2 and R's row sum: partial sums for a matrix sharded by rows (summed over
                # the shards below), whole ones for 3+ dims (dim 0, the sharded one, is a batch dim of the pair).
                cols = [torch.linalg.vector_norm(b.grad, dim=-2, keepdim=True).square_(),
                        b.row.sum(dim=-2, keepdim=True)]
                if len(b.shape) == 2:
                    parts += cols  # whole after the all-reduce below
                else:
                    b.cols = cols
            partial.append(parts)
        sums = _all_reduce_per_group(partial, [b.group for b in buckets])  # one all-reduce per shard group
        for b, (sq, *cols) in zip(buckets, sums):
            b.p_sq = sq
            if cols:
                b.cols = cols
        # Phase 2: the update directions and the sums of their squares.
        u_sq = []
        for b in buckets:
            dtype = b.grad.dtype
            eps1 = b.hp["eps"][0]
            eps1 = torch.finfo(dtype).eps if eps1 is None else eps1
            if b.matrix:
                col_sq, row_sum = b.cols
                m = b.shape[-2]
                col_var = _lerp_state([_local(self.state[q.p]["col_var"]) for q in b.params],
                                      col_sq.to(dtype).div_(m), b.weight)
                # R @ C of an [m, 1] and a [1, n] factor: each element one product, as the broadcast one computes.
                var = torch.mul(b.row, col_var).div_((row_sum.to(dtype) / m).clamp_(min=eps1))
                var.clamp_(min=eps1 * eps1)
            else:
                for q in b.params:
                    if "variance" not in self.state[q.p]:
                        self.state[q.p]["variance"] = q.state_tensor(torch.zeros_like(q.grad), q.shape, True)
                var = _lerp_state([_local(self.state[q.p]["variance"]) for q in b.params], b.grad * b.grad,
                                  b.weight).clamp(min=eps1 * eps1)
            b.update = var.rsqrt_().mul_(b.grad)
            b.grad = b.row = b.cols = None
            u_sq.append(torch.linalg.vector_norm(b.update.flatten(1), dim=1).double().square_())
        if any(b.group is not None for b in buckets):  # summed over the shards
            u_sq = [s for (s,) in _all_reduce_per_group([[s] for s in u_sq], [b.group for b in buckets])]
        params = [q for b in buckets for q in b.params]
        # Per parameter: sqrt(numel), eps2, d, whether the step is relative (host numbers; one copy, page-locked
        # so the host need not wait).
        consts = torch.tensor([[math.sqrt(math.prod(q.shape)), q.hp["eps"][1], q.hp["d"], q.hp["relative_step"]]
                               for q in params], dtype=torch.float64)
        consts = consts.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else consts.to(dev)
        root_n, eps2, d, relative = consts.unbind(1)
        rms = torch.cat([b.p_sq for b in buckets]).sqrt() / root_n
        alpha = torch.where(relative > 0, torch.maximum(rms, eps2), 1.0) * torch.stack([q.rho for q in params])
        scale = (-alpha / (torch.cat(u_sq).sqrt() / (root_n * d)).clamp_(min=1.0)).float()
        for b, sc in zip(buckets, scale.split([len(b.params) for b in buckets])):
            b.update.mul_(sc.to(b.update.dtype).view(-1, *[1] * (b.update.dim() - 1)))
            beta1 = b.hp["momentum"]
            if beta1:
                # M moves toward the step; a flagged step leaves M as it was and p where it is.
                for q in b.params:
                    if "momentum" not in self.state[q.p]:
                        self.state[q.p]["momentum"] = q.state_tensor(torch.zeros_like(q.local), q.shape, True)
                weight = 1.0 - beta1 if flagged is None else torch.where(flagged, 0.0, 1.0 - beta1).to(b.update.dtype)
                b.update = _lerp_state([_local(self.state[q.p]["momentum"]) for q in b.params], b.update, weight)
                if flagged is not None:
                    b.update = b.update * (~flagged).to(b.update.dtype)
        torch._foreach_add_([q.local for q in params], [u for b in buckets for u in b.update.unbind(0)])


class _Bucket:
    """Parameters of one parameter group with one shape, dtype and shard group, updated as one stacked
    tensor [G, *local shape] (on the devices of STACK_DEVICES): ~20 launches a bucket where one parameter at
    a time took ~17 a matrix (base LvT's 130 matrices have 10 shapes). A bucket of one is a view, no copy."""

    def __init__(self, params: list[_Param]):
        q = params[0]
        self.params, self.hp, self.group, self.shape = params, q.hp, q.group, q.shape
        self.matrix = len(q.shape) > 1
        self.weight = _stacked([q.weight for q in params])   # 1 - beta2_t per parameter, [G]
        self.weight = self.weight.view(-1, *[1] * len(q.local.shape))
        # Set by the step: the stacked gradient, R after its update, the column statistics, the sums of p^2,
        # the update directions.
        self.grad = self.row = self.cols = self.p_sq = self.update = None

    @staticmethod
    def key(q: _Param):
        """What parameters of one bucket share: group, shard group, shape (global and local), dtype."""
        return id(q.hp), None if q.group is None else id(q.group), q.shape, tuple(q.local.shape), q.local.dtype

    @classmethod
    def of(cls, params: list[_Param], stack: bool) -> list["_Bucket"]:
        """The buckets of a run of parameters sorted by `key`; one per parameter unless `stack`."""
        if not stack:
            return [cls([q]) for q in params]
        out: dict = {}
        for q in params:
            out.setdefault(cls.key(q), []).append(q)
        return [cls(qs) for qs in out.values()]


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[G, *shape]: a view of a lone tensor (in-place ops reach it), else a stacked copy."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def _lerp_state(states: list[torch.Tensor], target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The state tensors moved toward `target` by `weight`, as one stacked tensor, written back."""
    stacked = _stacked(states).lerp_(target, weight)
    if len(states) > 1:
        torch._foreach_copy_(states, stacked.unbind(0))
    return stacked


def _indices(params: list[_Param]) -> list[list[int]]:
    """Positions of the parameters of each parameter group, in order."""
    out: dict[int, list[int]] = {}
    for i, q in enumerate(params):
        out.setdefault(id(q.hp), []).append(i)
    return list(out.values())
