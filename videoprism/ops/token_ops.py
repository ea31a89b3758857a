"""Token ops of masked training, as registered custom ops with a backend switch (DESIGN 6.2-6.4).

    patchify_gather(video, pos, patch_size)           -> [B, T, K, P*P*3] visible patches
    gather_tokens(x, idx)                             -> [B, M, D]   out[b, j] = x[b, idx[b, j]]
    scatter_tokens(src, idx, length)                  -> [B, L, D]   out[b, idx[b, j]] += src[b, j]
    shuffle_with_mask_tokens(visible, perm, mask_emb, pos_emb) -> [B, n, D]

The exact math and layouts are in the docstrings of kernels/<op>.py. Each op is one
`torch.ops.videoprism.<op>` node (fake impl + autograd), so `torch.compile(fullgraph=True)`
keeps it whole; backward passes are ops too (gather <-> scatter are each other's
backward; the shuffle has its own fused backward op).

Backends (`backend=None` picks "triton" on CUDA, "cpp" on the CPU; "reference" where videoprism._C is not loaded,
as videoprism/ops/native.py says once):
  "triton"    Triton kernels (on the CPU only under TRITON_INTERPRET=1, for tests)
  "cuda"      CUDA C++ kernels of videoprism._C
  "cpp"       CPU C++ kernels of videoprism._C (at::parallel_for)
  "reference" plain PyTorch (kernels/<op>.py), the oracle

Index values are checked inside the ops (so a compiled graph stays whole). On the CPU
every backend raises a ValueError for an index out of range or a perm that is not a
permutation. On CUDA there is no checking pass: a separate check (a reduction, or a
sort for the permutation property) would cost a quarter to a half of these
memory-bound ops at training shapes. The CUDA C++ kernels assert index ranges in-kernel
(device asserts, free); the Triton kernels keep invalid indices in bounds (masked, no
stray access) without reporting them; that each perm row is a permutation is the
caller's contract on CUDA (argsort of random keys, as the trainer draws it).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from videoprism.kernels import token_ops_ref as _ref
from videoprism.ops import native  # loads videoprism._C (torch.ops.videoprism.*_native), or says why not

try:  # Triton ships with the CUDA builds of torch only; the CPU path needs none (as in ops/attention.py).
    from videoprism.kernels import gather_tokens as _gather
    from videoprism.kernels import patchify_gather as _patchify
    from videoprism.kernels import shuffle_tokens as _shuffle
    _TRITON_MISSING = None
except ImportError as e:  # pragma: no cover - depends on the install
    _TRITON_MISSING = e

__all__ = ["BACKENDS", "default_backend", "gather_tokens", "patchify_gather", "scatter_tokens",
           "shuffle_with_mask_tokens"]

BACKENDS = ("triton", "cuda", "cpp", "reference")
_VIDEO_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_native = torch.ops.videoprism


def default_backend(device: torch.device) -> str:
    if device.type == "meta":  # shapes only (a model built on device="meta"): plain torch
        return "reference"
    native_backend = "cpp" if device.type != "cuda" else "cuda"
    if native.MISSING is not None:  # the references, as native.py says once
        native_backend = "reference"
    if device.type != "cuda":
        return native_backend
    return "triton" if _TRITON_MISSING is None else native_backend


def _resolve(backend: str | None, device: torch.device, op: str) -> str:
    backend = backend or default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and _TRITON_MISSING is not None:
        raise ValueError(f"{op}: backend 'triton' needs Triton, which this torch lacks ({_TRITON_MISSING}); use "
                         f"{default_backend(device)} (or a CUDA build of torch, which brings it)")
    if device.type == "meta":  # shapes only: every backend's op has a fake implementation
        return backend
    if backend in ("cpp", "cuda") and native.MISSING is not None:
        raise ValueError(f"{op}: backend {backend!r} runs the kernels of videoprism._C, which {native.MISSING}; "
                         f"{native.REBUILD}, or use 'reference'")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got {device}; use 'cpp' on the CPU")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpp' runs on the CPU, got {device} tensors; use 'cuda' or 'triton'")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{op}: backend 'triton' on {device} tensors needs Triton's interpreter "
                         "(TRITON_INTERPRET=1 before triton is imported); use 'cpp' on the CPU")
    return backend


def _as_index(t: Tensor, name: str, op: str, dims: int) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != dims or t.dtype not in (torch.int32, torch.int64):
        what = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a {dims}-d int64 (or int32) tensor, got {what}")
    return t.long()


def _check_range(t: Tensor, hi: int, what: str) -> None:
    """Values of t in [0, hi), on the CPU (see the module docstring for CUDA)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return
    lo_v, hi_v = (int(v) for v in t.aminmax())
    if lo_v < 0 or hi_v >= hi:
        raise ValueError(f"{what} values must be in [0, {hi}), got min {lo_v} max {hi_v}")


def _check_tokens(x: Tensor, name: str, op: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: {name} must be a float [B, L, D] tensor, got {what}")


# ----------------------------------------------------------------------------- gather / scatter
@torch.library.custom_op("videoprism::gather_tokens", mutates_args=())
def _gather_op(x: Tensor, idx: Tensor, backend: str) -> Tensor:
    _check_range(idx, x.shape[1], "gather_tokens: idx")
    if backend == "reference":
        return _ref.gather_tokens_ref(x, idx)
    if backend == "triton":
        return _gather.gather_tokens_triton(x, idx)
    return _native.gather_tokens_native(x, idx)


@_gather_op.register_fake
def _(x, idx, backend):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("videoprism::scatter_tokens", mutates_args=())
def _scatter_op(src: Tensor, idx: Tensor, length: int, backend: str) -> Tensor:
    _check_range(idx, length, "scatter_tokens: idx")
    if backend == "reference":
        return _ref.scatter_tokens_ref(src, idx, length)
    if backend == "triton":
        return _gather.scatter_tokens_triton(src, idx, length)
    return _native.scatter_tokens_native(src, idx, length)


@_scatter_op.register_fake
def _(src, idx, length, backend):
    return src.new_empty(src.shape[0], length, src.shape[2])


def _gather_setup(ctx, inputs, output):
    x, idx, backend = inputs
    ctx.save_for_backward(idx)
    ctx.length, ctx.backend = x.shape[1], backend


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _scatter_op(grad, idx, ctx.length, ctx.backend), None, None


def _scatter_setup(ctx, inputs, output):
    _, idx, _, backend = inputs
    ctx.save_for_backward(idx)
    ctx.backend = backend


def _scatter_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _gather_op(grad, idx, ctx.backend), None, None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def gather_tokens(x: Tensor, idx: Tensor, backend: str | None = None) -> Tensor:
    """out[b, j, :] = x[b, idx[b, j], :]. x [B, L, D] float, idx [B, M] int -> [B, M, D].
    Backward: scatter_tokens (repeated indices accumulate)."""
    op = "gather_tokens"
    _check_tokens(x, "x", op)
    idx = _as_index(idx, "idx", op, 2)
    if idx.shape[0] != x.shape[0] or idx.device != x.device:
        raise ValueError(f"{op}: idx must be [B={x.shape[0]}, M] on {x.device}, got {tuple(idx.shape)} on {idx.device}")
    return _gather_op(x, idx, _resolve(backend, x.device, op))


def scatter_tokens(src: Tensor, idx: Tensor, length: int, backend: str | None = None) -> Tensor:
    """The adjoint of gather_tokens: out [B, length, D] with out[b, l] = sum of src[b, j] over
    the j with idx[b, j] == l (duplicates accumulate, in ascending j, in fp32 for half types;
    rows nobody points at are zero). src [B, M, D] float, idx [B, M] int. Deterministic.
    Backward: gather_tokens."""
    op = "scatter_tokens"
    _check_tokens(src, "src", op)
    idx = _as_index(idx, "idx", op, 2)
    if idx.shape != src.shape[:2] or idx.device != src.device:
        raise ValueError(f"{op}: idx must be [B, M] = {tuple(src.shape[:2])} on {src.device}, "
                         f"got {tuple(idx.shape)} on {idx.device}")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"{op}: length (rows of the output) must be an int >= 0, got {length!r}")
    return _scatter_op(src, idx, length, _resolve(backend, src.device, op))


# ----------------------------------------------------------------------------- shuffle
def _check_permutation(perm: Tensor) -> None:
    """Every row of perm [B, n] is a permutation of [0, n) (the backward writes each visible
    row exactly once, which needs it)."""
    if perm.device.type != "cpu" or perm.numel() == 0:
        return
    n = perm.shape[1]
    if not bool((perm.sort(dim=1).values == torch.arange(n)).all()):
        raise ValueError(f"shuffle_with_mask_tokens: every row of perm must be a permutation of [0, {n}); "
                         "draw it with torch.randperm or an argsort of random keys")


@torch.library.custom_op("videoprism::shuffle_with_mask_tokens", mutates_args=())
def _shuffle_op(visible: Tensor, perm: Tensor, mask_emb: Tensor, pos_emb: Tensor, backend: str) -> Tensor:
    _check_permutation(perm)
    if backend == "reference":
        return _ref.shuffle_with_mask_tokens_ref(visible, perm, mask_emb, pos_emb)
    if backend == "triton":
        return _shuffle.shuffle_with_mask_tokens_fwd_triton(visible, perm, mask_emb, pos_emb)
    return _native.shuffle_tokens_fwd_native(visible, perm, mask_emb, pos_emb)


@_shuffle_op.register_fake
def _(visible, perm, mask_emb, pos_emb, backend):
    return visible.new_empty(visible.shape[0], perm.shape[1], visible.shape[2])


@torch.library.custom_op("videoprism::shuffle_with_mask_tokens_backward", mutates_args=())
def _shuffle_bwd_op(grad: Tensor, perm: Tensor, m: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "reference":
        return _ref.shuffle_with_mask_tokens_bwd_ref(grad, perm, m)
    if backend == "triton":
        return _shuffle.shuffle_with_mask_tokens_bwd_triton(grad, perm, m)
    return _native.shuffle_tokens_bwd_native(grad, perm, m)


@_shuffle_bwd_op.register_fake
def _(grad, perm, m, backend):
    B, n, D = grad.shape
    acc = _ref.acc_dtype(grad.dtype)
    return grad.new_empty(B, m, D), grad.new_empty(D, dtype=acc), grad.new_empty(n, D, dtype=acc)


def _shuffle_setup(ctx, inputs, output):
    visible, perm, mask_emb, pos_emb, backend = inputs
    ctx.save_for_backward(perm)
    ctx.m, ctx.backend = visible.shape[1], backend
    ctx.emb_dtypes = (mask_emb.dtype, pos_emb.dtype)


def _shuffle_backward(ctx, grad):
    (perm,) = ctx.saved_tensors
    gvis, gmask, gpos = _shuffle_bwd_op(grad, perm, ctx.m, ctx.backend)
    return gvis, None, gmask.to(ctx.emb_dtypes[0]), gpos.to(ctx.emb_dtypes[1]), None


def _shuffle_bwd_setup(ctx, inputs, output):
    grad, perm, m, backend = inputs
    ctx.save_for_backward(perm)
    ctx.m, ctx.backend, ctx.grad = m, backend, grad.new_empty(0)  # (the grad's dtype and device)


def _shuffle_bwd_backward(ctx, ggvis, ggmask, ggpos):
    """Double backward: the backward is linear in grad and its adjoint is the forward, the shuffle of the three
    cotangents (an output without one: zeros)."""
    (perm,) = ctx.saved_tensors
    B, n = perm.shape
    D = next(g.shape[-1] for g in (ggvis, ggmask, ggpos) if g is not None)
    ggvis = ctx.grad.new_zeros(B, ctx.m, D) if ggvis is None else ggvis.to(ctx.grad.dtype)
    ggmask = ctx.grad.new_zeros(D) if ggmask is None else ggmask
    ggpos = ctx.grad.new_zeros(n, D) if ggpos is None else ggpos
    return _shuffle_op(ggvis, perm, ggmask, ggpos, ctx.backend), None, None, None


_shuffle_op.register_autograd(_shuffle_backward, setup_context=_shuffle_setup)
_shuffle_bwd_op.register_autograd(_shuffle_bwd_backward, setup_context=_shuffle_bwd_setup)


def shuffle_with_mask_tokens(visible: Tensor, perm: Tensor, mask_emb: Tensor, pos_emb: Tensor,
                             backend: str | None = None) -> Tensor:
    """Decoder input of token-wise distillation (DESIGN 5), in one pass:
    out[b, i] = (visible[b, perm[b, i]] if perm[b, i] < m else mask_emb) + pos_emb[i].

    visible [B, m, D] float; perm [B, n] int, each row a permutation of [0, n) (n >= m);
    mask_emb [D] and pos_emb [n, D] float (any float dtype, e.g. fp32 parameters with bf16
    activations). Returns [B, n, D] in visible's dtype (the sum is formed in fp32 and
    rounded once). Backward: d visible through the inverse permutation, d mask_emb summed
    over the mask slots, d pos_emb summed over the batch (fp32 sums, deterministic).
    """
    op = "shuffle_with_mask_tokens"
    _check_tokens(visible, "visible", op)
    perm = _as_index(perm, "perm", op, 2)
    B, m, D = visible.shape
    n = perm.shape[1]
    if perm.shape[0] != B or n < m:
        raise ValueError(f"{op}: perm must be [B={B}, n] with n >= m={m} slots, got {tuple(perm.shape)}")
    if not (isinstance(mask_emb, Tensor) and mask_emb.shape == (D,) and mask_emb.is_floating_point()):
        raise ValueError(f"{op}: mask_emb must be a float [D={D}] tensor, got "
                         f"{tuple(mask_emb.shape) if isinstance(mask_emb, Tensor) else type(mask_emb).__name__}")
    if not (isinstance(pos_emb, Tensor) and pos_emb.shape == (n, D) and pos_emb.is_floating_point()):
        raise ValueError(f"{op}: pos_emb must be a float [n={n}, D={D}] tensor (one row per slot), got "
                         f"{tuple(pos_emb.shape) if isinstance(pos_emb, Tensor) else type(pos_emb).__name__}")
    if not (perm.device == mask_emb.device == pos_emb.device == visible.device):
        raise ValueError(f"{op}: perm, mask_emb and pos_emb must be on {visible.device} with visible, got "
                         f"{perm.device}, {mask_emb.device}, {pos_emb.device}")
    return _shuffle_op(visible, perm, mask_emb, pos_emb, _resolve(backend, visible.device, op))


# ----------------------------------------------------------------------------- patchify
@torch.library.custom_op("videoprism::patchify_gather", mutates_args=())
def _patchify_op(video: Tensor, pos: Tensor, patch_size: int, backend: str) -> Tensor:
    _, _, H, W, _ = video.shape
    _check_range(pos, (H // patch_size) * (W // patch_size), "patchify_gather: pos")
    if backend == "reference":
        return _ref.patchify_gather_ref(video, pos, patch_size)
    if backend == "triton":
        return _patchify.patchify_gather_triton(video, pos, patch_size)
    return _native.patchify_gather_native(video, pos, patch_size)


@_patchify_op.register_fake
def _(video, pos, patch_size, backend):
    B, T, _, _, C = video.shape
    return video.new_empty(B, T, pos.shape[2], patch_size * patch_size * C,
                           dtype=_ref.acc_dtype(video.dtype))


def _patchify_setup(ctx, inputs, output):
    video, pos, patch_size, backend = inputs
    ctx.save_for_backward(pos)
    ctx.video_shape, ctx.video_dtype = video.shape, video.dtype
    ctx.patch_size, ctx.backend = patch_size, backend


def _patchify_backward(ctx, grad):
    """d video = the patch grads scattered to their grid positions (zeros at hidden
    patches), unpatchified: one scatter_tokens op and a reshape."""
    (pos,) = ctx.saved_tensors
    B, T, H, W, _ = ctx.video_shape
    P = ctx.patch_size
    grid = (H // P, W // P)
    K, F = grad.shape[2], grad.shape[3]
    full = _scatter_op(grad.reshape(B * T, K, F), pos.reshape(B * T, K), grid[0] * grid[1], ctx.backend)
    return _ref.unpatchify(full.reshape(B, T, -1, F), grid, P).to(ctx.video_dtype), None, None, None


_patchify_op.register_autograd(_patchify_backward, setup_context=_patchify_setup)


def patchify_gather(video: Tensor, pos: Tensor, patch_size: int, backend: str | None = None) -> Tensor:
    """Visible patches of a video, reading only the visible pixels.

    video [B, T, H, W, 3] uint8 (scaled by 1/255) or float (values unchanged); pos [B, T, K]
    int, visible patch indices `m * (W/P) + n`. Returns [B, T, K, P*P*3] float32 (float64 for
    float64 input), feature index (p*P + q)*3 + c as the official patchify. A float video gets
    a gradient (the patch grads put back in place, zeros at hidden pixels).
    """
    op = "patchify_gather"
    if not (isinstance(video, Tensor) and video.dim() == 5 and video.shape[4] == 3):
        raise ValueError(f"{op}: video must be [B, T, H, W, 3] (channels last), got "
                         f"{tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__}")
    if video.dtype not in _VIDEO_DTYPES:  # (the float8 types are floating point too, and no kernel reads them)
        raise ValueError(f"{op}: video must be uint8 [0, 255] or float16/bfloat16/float32/float64 [0, 1], got "
                         f"{video.dtype}")
    if not (isinstance(patch_size, int) and patch_size >= 1):
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")
    B, T, H, W, _ = video.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"{op}: H x W = {H} x {W} must be multiples of patch_size {patch_size}; "
                         "resize or crop the video")
    pos = _as_index(pos, "pos", op, 3)
    if pos.shape[:2] != (B, T) or pos.device != video.device:
        raise ValueError(f"{op}: pos must be [B={B}, T={T}, K] on {video.device}, got {tuple(pos.shape)} on "
                         f"{pos.device}")
    return _patchify_op(video, pos, patch_size, _resolve(backend, video.device, op))
