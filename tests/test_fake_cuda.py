"""One training step of each stage on fake CUDA tensors, so that device-placement bugs of the GPU path
show up without a GPU (a stage-1 temperature left on the CPU once cost a GPU run).

Under torch's FakeTensorMode tensors only claim a device; an op that mixes a cuda tensor with a
non-scalar CPU tensor raises, as on a GPU. The step is the trainer's own `launch_step` (masks drawn
on the device, forward under bf16 autocast, loss, backward, clipping, the optimizer with its
found_inf flag), the models built by the stages' own code; the custom ops run their fake impls.
Only what needs the driver or real memory is stood in for (`fake_cuda`, each with its reason).
"""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.overrides import TorchFunctionMode

import videoprism.train.stage1 as stage1
from videoprism.kernels import bevt_blocks
from videoprism.masking import accept_blocks_ref
from videoprism.train.config import build_config
from videoprism.train.data import RandomClips, trim_text
from videoprism.train.distill import Teacher
from videoprism.train.modeling import build_clip
from videoprism.train.parallel import Dist
from videoprism.train.stage2 import Stage2Task
from videoprism.train.trainer import Trainer

CUDA = torch.device("cuda")


class _Generator(torch.Generator):
    """A CPU generator that reports the device it was asked for: a CUDA generator needs the driver.
    Fake random ops read no generator state, nor its device: _GeneratorCheck checks that."""

    def __new__(cls, device="cpu"):
        g = super().__new__(cls)
        g._device = torch.device(device)
        return g

    device = property(lambda self: self._device)


class _GeneratorCheck(TorchFunctionMode):
    """A random op's generator must be on its output's device (CUDA raises "Expected a 'cuda' device
    type for generator"; fake ops ignore the generator)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        g = (kwargs or {}).get("generator")
        if isinstance(g, torch.Generator) and isinstance(out, torch.Tensor) and g.device.type != out.device.type:
            raise RuntimeError(f"{func.__name__}: a {g.device.type} generator for a {out.device} tensor")
        return out


def _backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """torch.autograd.backward as a walk of the graph in Python: the C++ engine first stashes every
    CUDA device's current stream (GraphTask::stash_current_streams), which needs the driver. Each
    node's backward runs as the engine runs it, and every gradient is checked against the device the
    node recorded in the forward, as the engine's validate_outputs does (then summed to its shape
    and cast to its dtype, as there). Hooks do not run: the one-process step registers none."""
    assert inputs is None and not create_graph  # what the trainer never asks for
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    grads = [grad_tensors] if isinstance(grad_tensors, torch.Tensor) else grad_tensors
    grads = grads or [torch.ones_like(t) for t in tensors]
    deps, todo, seen = {}, [t.grad_fn for t in tensors], set()
    while todo:  # how many edges lead into each node
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                deps[nxt] = deps.get(nxt, 0) + 1
                todo.append(nxt)
    buffers = {}

    def add(node, i, g):
        meta = node._input_metadata[i]
        if g.device != meta.device:
            raise RuntimeError(f"{node.name()}: gradient {i} on {g.device}, its input was on {meta.device}")
        g = g.sum_to_size(meta.shape).to(meta.dtype)
        buf = buffers.setdefault(node, [None] * len(node._input_metadata))
        buf[i] = g if buf[i] is None else buf[i] + g

    for t, g in zip(tensors, grads):
        add(t.grad_fn, t.output_nr, g)
    ready = [n for n in dict.fromkeys(t.grad_fn for t in tensors) if not deps.get(n)]
    while ready:
        node = ready.pop()
        inputs_ = buffers.pop(node, None) or [None] * len(node._input_metadata)
        if type(node).__name__ == "AccumulateGrad":
            leaf, g = node.variable, inputs_[0]
            if g is not None:
                leaf.grad = g.detach() if leaf.grad is None else leaf.grad + g
            continue
        out = node.apply(*inputs_) if isinstance(node, torch.autograd.function.BackwardCFunction) else node(*inputs_)
        for (nxt, i), g in zip(node.next_functions, out if isinstance(out, tuple) else (out,)):
            if nxt is None:
                continue
            if g is not None:
                add(nxt, i, g)
            deps[nxt] -= 1
            if not deps[nxt]:
                ready.append(nxt)


@contextlib.contextmanager
def fake_cuda():
    # Real CPU tensors (the loader's batches) may enter: they become fake CPU tensors, which the
    # device check still sees. A shape env (static shapes) lets a 0-d device tensor stand for a number
    # in an op: torch._foreach_add_(tensors, 0-d tensor) (Adafactor's step count) reads its .item() in the
    # fake mode's fallback, where CUDA's kernel reads it on the device.
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
    swap = torch.utils.swap_tensors

    def swap_tensors(t1, t2):
        # Module.to() swaps a fake parameter with its moved copy, and swap_tensors refuses tensors that
        # have weakrefs, which the fake mode's memo tables hold to every fake tensor (a FakeTensor
        # limitation; the swapped objects keep their identity, which is what the memos need).
        with mock.patch("weakref.getweakrefs", lambda t: []):
            return swap(t1, t2)

    with contextlib.ExitStack() as stack:
        for patch in (
            mock.patch.object(torch.utils, "swap_tensors", swap_tensors),
            mock.patch.object(torch, "Generator", _Generator),
            mock.patch.object(torch.autograd, "backward", _backward),
            # Page-locked host memory needs the driver (and fake tensors have no pin_memory impl).
            mock.patch.object(torch.Tensor, "pin_memory", lambda self, *a, **k: self),
            # torch.autocast("cuda") turns itself off where no GPU is visible; its casts are dispatch only.
            mock.patch("torch.cuda.amp.common.amp_definitely_not_available", lambda: False),
            mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
            # The step's timing events are CUDA events.
            mock.patch.object(Trainer, "_event", lambda self: None),
            # The BEVT acceptance kernel is a Triton launch (real memory), not an op with a fake impl; the
            # reference computes the same mask (test_masking) from the same device tensors.
            mock.patch.object(bevt_blocks, "bevt_accept_blocks_triton", accept_blocks_ref),
            mock.patch.object(stage1, "trim_text", _host_trim_text),
        ):
            stack.enter_context(patch)
        stack.enter_context(mode)
        stack.enter_context(_GeneratorCheck())
        yield


class HostClips(RandomClips):
    """The loader's batches: real host tensors, made outside the fake mode."""

    def next_batch(self, step):
        with unset_fake_temporarily():
            return super().next_batch(step)


def _host_trim_text(ids, paddings):
    # The caption length is a host read (int(...)) of the host batch, which a fake tensor cannot answer.
    with unset_fake_temporarily():
        return trim_text(ids, paddings)


def check_step(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable parameter got a gradient (the optimizer made its state), and every parameter,
    buffer and optimizer state tensor is on the GPU."""
    missing = [name for name, p in module.named_parameters() if p.requires_grad and p not in optimizer.state]
    assert not missing, f"no gradient reached {missing}"
    named = [*module.named_parameters(), *module.named_buffers()]
    named += [(f"state {k}", v) for st in optimizer.state.values() for k, v in st.items() if torch.is_tensor(v)]
    off = {name: t.device for name, t in named if t.device.type != "cuda"}
    assert not off, f"not on the GPU: {off}"


# Each stage with both optimizers (Adafactor with its momentum and absolute steps in stage 1, torch's update in
# stage 2), and the switches that change the step's code path: GradCache (its own backward over accumulated
# micro-batches), activation checkpointing (recompute in the backward), LiT (a frozen encoder), unshuffled slots
# (identity_slots, built from the mask on its device).
CASES = [(1, "optim.name=adamw"),
         (1, "optim.name=adafactor", "optim.adafactor_momentum=0.9", "optim.adafactor_relative_step=false"),
         (1, "train.micro_batch=1", "stage1.grad_cache=true", "train.activation_checkpointing=true"),
         (1, "stage1.lit=true"),
         (2, "optim.name=adamw"),
         (2, "optim.name=adafactor", "stage2.shuffle=false", "train.activation_checkpointing=true")]


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # copy.deepcopy of the student
@pytest.mark.parametrize("stage,overrides", [(c[0], c[1:]) for c in CASES],
                         ids=[f"stage{c[0]}-" + "-".join(c[1:]) for c in CASES])
def test_train_step_on_fake_cuda(stage, overrides, tmp_path):
    # A real run's GPU settings: the triton attention ops (model.attention_backend=auto on CUDA), bf16 autocast.
    cfg = build_config("tiny", ["data.source=random", "train.global_batch=2", "model.attention_backend=auto",
                                f"train.out_dir={tmp_path}", *overrides], stage)
    d = Dist(0, 1, CUDA)
    data = HostClips(micro_batch=cfg.train.micro_batch or 2, rank=0, world=1, frames=cfg.model.num_frames,
                     resolution=cfg.model.resolution, vocab=50, seed=0)
    with fake_cuda():
        if stage == 1:
            task = stage1.Stage1Task(cfg, d, build_clip(cfg.model, vocab=50, device=CUDA), None)
        else:
            task = Stage2Task(cfg, d, Teacher(build_clip(cfg.model, vocab=None, device=CUDA)), None)
        trainer = Trainer(cfg, task, data, d, name="fake")
        assert trainer.autocast
        pending = trainer.launch_step()
        check_step(task.module, trainer.optimizer)
    assert trainer.step == 1 and pending.values.shape == (len(pending.keys),)


def test_python_backward_matches_the_engine():
    """The stand-in backward computes torch's gradients (real CPU tensors, a stage-2 loss: custom ops,
    torch's decoder layers, both losses)."""
    cfg = build_config("tiny", ["data.source=random", "model.num_frames=2", "model.resolution=32"], 2)
    torch.manual_seed(0)
    task = Stage2Task(cfg, Dist(0, 1, torch.device("cpu")), Teacher(build_clip(cfg.model, vocab=None,
                                                                                 device=torch.device("cpu"))), None)
    batch = RandomClips(micro_batch=2, rank=0, world=1, frames=cfg.model.num_frames, resolution=cfg.model.resolution,
                        vocab=2, seed=0).next_batch(0)
    inputs = task.prepare(batch, 0, 0)
    params = [p for p in task.module.parameters() if p.requires_grad]
    task.loss(task.module, inputs)[0].backward()
    expect = [p.grad for p in params]
    task.module.zero_grad(set_to_none=True)
    _backward(task.loss(task.module, inputs)[0])
    for p, g in zip(params, expect):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
