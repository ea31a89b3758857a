"""Process group, device, and the parallel wrapping of the trainable module (torchtitan order):
activation checkpointing, then the per-block compile, then DDP or per-block FSDP2 `fully_shard` (over all
ranks, or HSDP: sharded within groups, replicated across them).

One entry point serves one CPU, one GPU, or `torchrun` on many nodes: the process group
comes up when torchrun's environment says there is more than one rank (NCCL on GPU,
gloo on the CPU).
"""
from __future__ import annotations

import functools
import os
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from videoprism.layers import TransformerBlock


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    # A gloo group beside NCCL for the ranks' per-step flags (all_reduce_max): agreeing on the host
    # leaves the GPU's queued work alone. None: the default group (gloo on the CPU, or one made elsewhere).
    host_group: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, timeout_s: float = 0.0) -> Dist:
    """The process group of a torchrun launch (one process: none). `timeout_s`: how long a collective waits for
    the other ranks (parallel.timeout_s; 0: torch's default, 30 min on gloo, 10 on NCCL)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    _check_slurm_launch(world)
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    host_group = None
    if world > 1 and not dist.is_initialized():
        # torchrun --max-restarts: the restarted workers share the agent's store with the failed attempt
        # (TORCHELASTIC_USE_AGENT_STORE; torch 2.14 no longer prefixes it per attempt), and the process groups'
        # rendezvous read the dead workers' addresses: "Gloo connectFullMesh failed ... Connection refused", or
        # a hang in init_process_group until its 30-minute timeout (3 of 4 restarts here). Each attempt gets its
        # own keys, agreed through the store (_attempt_keys): not TORCHELASTIC_RESTART_COUNT, which each node's
        # torchrun counts for itself.
        store, _, _ = next(dist.rendezvous("env://"))
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        prefix = _attempt_keys(store, rank, world, timeout or timedelta(minutes=30))
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                                store=dist.PrefixStore(prefix, store), timeout=timeout)
        if device == "cuda":
            host_group = dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank, world, dev, host_group)


def _attempt_keys(store, rank: int, world: int, timeout: timedelta) -> str:
    """The store prefix of this attempt's process group, the same on all its ranks. TORCHELASTIC_RESTART_COUNT is
    not: torchrun counts a restart only where its own worker failed, and a node whose workers were healthy restarts
    them on seeing the failed node rejoin ("Detected 1 new nodes"), without counting; two nodes then waited on
    different keys until the timeout (4 of 4 runs of two torchruns as two nodes, one worker killed).
    Rank 0 names the attempt (a fresh token) and the others join it. A rank that starts before its rank 0 reads the
    last attempt's token (the store outlives the attempts), whose workers are all dead (torchrun stops them before
    the next rendezvous): its rank 0 never confirms a join, and this attempt's rank 0 points its `ok` (for a rank
    that joined it) and its `next` (for one that found all its ranks joined, `ok` perhaps set then) to the new token.
    Every wait is on a key that will be set: no polling."""
    key = f"videoprism/attempt/w{world}"  # ranks of another world size (elastic) never share an attempt
    if rank == 0:
        token = uuid.uuid4().hex
        if store.check([key]):
            last = store.get(key).decode()
            store.set(f"{key}/{last}/next", token)
            store.set(f"{key}/{last}/ok", token)
        store.set(key, token)
        store.wait([f"{key}/{token}/joined"], timeout)  # set by the last rank to join
        store.set(f"{key}/{token}/ok", token)
        return f"{key}/{token}"
    store.wait([key], timeout)
    token = store.get(key).decode()
    while True:
        count = store.add(f"{key}/{token}/count", 1)
        if count == world - 1:
            store.set(f"{key}/{token}/joined", "1")
        verdict = f"{key}/{token}/{'ok' if count < world else 'next'}"
        store.wait([verdict], timeout)
        follow = store.get(verdict).decode()
        if follow == token:  # rank 0 confirmed: all ranks joined this token
            return f"{key}/{token}"
        token = follow


def _check_slurm_launch(world: int) -> None:
    """An `srun` step of several tasks whose processes did not join one process group: `srun torchrun` without
    --nnodes/--rdzv-endpoint starts one standalone torchrun per node (each a whole run of its own, all writing
    the same out_dir), and `srun python -m train.stageN` one single-process run per task."""
    if os.environ.get("VIDEOPRISM_SEPARATE_RUNS") == "1":  # e.g. a sweep: one run per task, each its own out_dir
        return
    step = os.environ.get("SLURM_STEP_ID", "")
    if not step.isdigit() or int(step) >= 0xFFFFFFF0:  # not an srun step: a batch script's own shell, or no SLURM
        return
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)
    launchers = int(os.environ.get("GROUP_WORLD_SIZE", "0")) if "TORCHELASTIC_RUN_ID" in os.environ else world
    if tasks > 1 and launchers < tasks:
        raise ValueError(
            f"this SLURM step has {tasks} tasks but they are {tasks // max(launchers, 1)} separate runs of "
            f"{world} rank(s) each, not one: give torchrun --nnodes $SLURM_NNODES --rdzv-backend c10d "
            "--rdzv-endpoint $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 --rdzv-id "
            "$SLURM_JOB_ID (one srun task per node), or launch the script with torchrun instead of plain srun "
            "(separate runs on purpose, each with its own train.out_dir: set VIDEOPRISM_SEPARATE_RUNS=1)")


def leave_together(dist_: Dist) -> None:
    """The end of a finished run: every rank waits for the others before its process groups go. A rank that
    tore its gloo groups down and exited while another still worked (rank 0 writing the plot) now and then
    aborted at interpreter exit on a loaded machine ("terminate called without an active exception", exit
    -6: 3 of 13 two-rank runs here), and torchrun reported the finished run as failed. Never after a
    failure: the other ranks may never come."""
    if multi_rank():
        dist.barrier(group=dist_.host_group)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def blocks(module: nn.Module) -> list[nn.Module]:
    """Transformer blocks: the model's own and the stage-2 decoders' (torch's layers)."""
    return [m for m in module.modules() if isinstance(m, (TransformerBlock, nn.TransformerEncoderLayer))]


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(module: nn.Module) -> None:
    """Recompute every transformer block in the backward. The block's forward is wrapped in
    place (no wrapper module), so parameter names and checkpoints are unchanged."""
    for block in blocks(module):
        block.forward = functools.partial(_checkpointed, block.forward)


def hsdp_groups(world: int, shard_size: int) -> tuple[int, int]:
    """(replicas, ranks per shard group) of `parallel.mode=hsdp` on `world` ranks: `shard_size`, or 0 for the
    ranks of one node (torchrun's LOCAL_WORLD_SIZE)."""
    shard = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if not shard:
        raise ValueError("parallel.mode=hsdp: parallel.shard_size=0 means the ranks of one node, but LOCAL_WORLD_SIZE "
                         "is not set (a launcher other than torchrun); set parallel.shard_size to the GPUs of a node")
    if world % shard:
        raise ValueError(f"parallel.shard_size={shard}{'' if shard_size else ' (LOCAL_WORLD_SIZE)'} does not divide "
                         f"the {world} ranks; set parallel.shard_size to a divisor of the world size (the GPUs of "
                         "one node)")
    return world // shard, shard


def shard_mesh(mode: str, dist_: Dist, shard_size: int):
    """The device mesh FSDP2 shards over: all ranks ('fsdp'), or ('replicate', 'shard') groups
    of consecutive ranks ('hsdp', HSDP: parameters sharded within a group, replicated across
    groups, so the per-block all-gathers stay on a node's fast links)."""
    from torch.distributed.device_mesh import init_device_mesh

    if mode == "fsdp":
        return init_device_mesh(dist_.device.type, (dist_.world,))
    return init_device_mesh(dist_.device.type, hsdp_groups(dist_.world, shard_size),
                            mesh_dim_names=("replicate", "shard"))


def parallelize(module: nn.Module, *, mode: str, dist_: Dist, compile: str | None, mixed_precision: bool,
                act_ckpt: bool, shard_size: int = 0) -> nn.Module:
    """Returns the module to call in the train step (the same object for 'none', 'fsdp' and
    'hsdp'). `compile`: the torch.compile backend ("inductor", ...), None for eager."""
    if mode == "auto":
        mode = "ddp" if dist_.world > 1 else "none"
    if mode not in ("none", "ddp", "fsdp", "hsdp"):
        raise ValueError(f"parallel.mode must be 'auto', 'none', 'ddp', 'fsdp' or 'hsdp', got {mode!r}")
    if mode == "none" and dist_.world > 1:
        raise ValueError(f"parallel.mode=none with {dist_.world} ranks would train diverging copies; use ddp or fsdp")
    if mode in ("ddp", "fsdp", "hsdp") and dist_.world == 1:
        # One process: nothing to replicate or shard (a run resumed on one rank with its saved config; DDP without
        # a process group failed after the data was decoded).
        mode = "none"
    if act_ckpt:
        apply_activation_checkpointing(module)
    if compile:
        compile_blocks(module, compile)
    if mode in ("fsdp", "hsdp"):
        shard(module, shard_mesh(mode, dist_, shard_size), bf16=dist_.device.type == "cuda" and mixed_precision)
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist_.device.index] if dist_.device.type == "cuda" else None
        return DDP(module, device_ids=ids)
    return module


def compile_blocks(module: nn.Module, backend: str) -> None:
    """torch.compile (fullgraph) each transformer block's forward, in place: torchtitan's regional compile. Every
    block's forward is one code object to dynamo, so each kind of block (spatial, temporal, auxiliary, text, decoder)
    compiles once per pass and shape, where a compile of the whole model unrolls the depth into one graph: base stage
    1's cold start took 47 s against 121 s, step times within noise (CPU, 2 frames; bench/RESULTS.md).
    What lies between blocks (embeddings, pooler, loss, token ops) runs eager, a few dozen kernels a step. The forward
    is compiled, not the call: FSDP2's hooks, which the call runs around it, stay outside the graph (`block.compile()`
    traced them, and their dynamo.disable failed the first fullgraph forward); an activation-checkpointed forward
    (wrapped before) compiles with its checkpoint."""
    _allow_graphs_per_pass()
    for block in blocks(module):
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=True)


def _allow_graphs_per_pass() -> None:
    """A compiled run has a graph per kind of block, pass (the step, GradCache's no-grad one, the evaluation on full
    clips, its last smaller batch, the stage-2 teacher's forward) and clip shape (datasets of other frame counts,
    images), all of one code object: a busy stage-1 run made 8, dynamo's default limit, past which fullgraph fails
    the run. Each compiles once."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def shard(module: nn.Module, mesh, *, bf16: bool) -> None:
    """FSDP2 in place: one `fully_shard` group per transformer block, then the rest. `bf16`:
    bf16 compute with fp32 gradient reduction and master weights (torchtitan's default).

    A module with `fp32_own_params = True` (stage 1's, whose own parameter is the temperature)
    keeps its own parameters in fp32 in the forward: its children get their own bf16 groups
    and its group computes in fp32. (In the root group with the rest, the forward saw the
    temperature in bf16: 1/t in steps of 1.6-3 %; DDP and one process see fp32.) Groups do not
    rename parameters, so checkpoints of either layout load into the other."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    if getattr(module, "fp32_own_params", False):
        for child in module.children():
            # Kept unsharded from forward to backward, as in the root group they came from (no second
            # all-gather of the embeddings and the pooler a micro-step).
            fully_shard(child, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        mp = MixedPrecisionPolicy()
    fully_shard(module, mesh=mesh, mp_policy=mp)


def shard_layout(module: nn.Module) -> dict[str, int] | None:
    """Ranks per dimension of the mesh the parameters are sharded over ({'shard': 8} for fsdp,
    {'replicate': 4, 'shard': 8} for hsdp), None when they are plain tensors (none, ddp)."""
    mesh = getattr(next(module.parameters()), "device_mesh", None)
    if mesh is None:
        return None
    return dict(zip(mesh.mesh_dim_names or ("shard",), mesh.shape))


def grad_sync(module: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps."""
    import contextlib

    if hasattr(module, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def multi_rank() -> bool:
    """A process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if multi_rank():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_reduce_max(values: list[int], dist_: Dist) -> list[int]:
    """Element-wise max of small integer flags over the ranks (the ranks' agreement on what to
    do at a step boundary); the values themselves on one process. On the host (gloo): a tensor
    on the GPU would wait behind the step queued there, a host sync every step."""
    if not multi_rank():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    if dist_.host_group is None and dist.get_backend() != "gloo":  # NCCL initialised elsewhere: no host group
        t = t.to(dist_.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dist_.host_group)
    return t.tolist()


def gather_objects(obj, dist_: Dist) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in one process. Over the host group: small
    results of a sharded evaluation, not tensors on the step's path."""
    if not multi_rank():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=dist_.host_group)
    return out


def gather_rows(rows: dict[str, torch.Tensor], dist_: Dist) -> dict[str, torch.Tensor]:
    """Rows sharded over the ranks (CPU tensors, one row per clip, keyed alike on every rank, an "index" [n]
    among them) as one process holding them all would have them: concatenated and ordered by index, on
    every rank."""
    parts = gather_objects(rows, dist_)
    out = {k: torch.cat([p[k] for p in parts]) for k in rows}
    order = torch.argsort(out["index"])
    return {k: v[order] for k, v in out.items()}


def on_main_rank(fn):
    """`fn()` run by rank 0 alone, its result (or its error, raised) on every rank: one reader of a shared
    file instead of one per rank (a metadata storm on a cluster file system)."""
    distributed = multi_rank()
    box = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:  # noqa: BLE001 - handed to every rank, raised there
            box[0] = (False, e)
    if distributed:
        dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
