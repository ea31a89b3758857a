"""`factorized_attention`: the one attention entry point of the model, with a backend switch.

Backends (the exact math is in kernels/factorized_attention.py):
  "reference" plain PyTorch, the oracle; any input; the default on the CPU.
  "triton"    fused Triton kernels, registered as the custom ops `videoprism::attention_*`
              (fake impl + autograd, so torch.compile sees one node per call); any input up
              to head dim 256 and 64 frames; the default on CUDA (CPU: TRITON_INTERPRET=1).
  "flex"      FlexAttention with the soft-cap as a score_mod; any input (the time axis
              copies to sequence-major order; the masked time axis runs as a block-sparse
              mask over all T*K tokens of a clip).
  "flash"     flash-attn's soft-cap kernels, if installed; fp16/bf16, no key padding, no pos.
  "sdpa"      torch SDPA; no soft-cap (it has none), no pos.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from videoprism.checks import as_int, check_pos
from videoprism.kernels.factorized_attention import MASK_VALUE, factorized_attention_ref

BACKENDS = ("reference", "triton", "flex", "flash", "sdpa")

try:  # Triton ships with the CUDA builds of torch only.
    from videoprism.kernels.factorized_attention_space import INTERPRET, attention_space_bwd, attention_space_fwd
    from videoprism.kernels.factorized_attention_time import attention_time_bwd, attention_time_fwd
    _TRITON_MISSING = None
except ImportError as e:  # pragma: no cover - depends on the install
    INTERPRET, _TRITON_MISSING = False, e


def default_backend(device: torch.device) -> str:
    return "triton" if torch.device(device).type == "cuda" and _TRITON_MISSING is None else "reference"


# ----------------------------------------------------------------------------------------------
# "triton": custom ops
# ----------------------------------------------------------------------------------------------
if _TRITON_MISSING is None:

    @torch.library.custom_op("videoprism::attention_space_fwd", mutates_args=())
    def _space_fwd(qkv: torch.Tensor, key_padding: torch.Tensor | None, softcap: float, scale: float,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return attention_space_fwd(qkv, key_padding, softcap, scale, causal)

    @_space_fwd.register_fake
    def _(qkv, key_padding, softcap, scale, causal):
        B, T, K, _, H, Dh = qkv.shape
        stat = qkv.new_empty((B, T, H, K), dtype=torch.float32)
        return qkv.new_empty((B, T, K, H, Dh)), stat, torch.empty_like(stat)

    @torch.library.custom_op("videoprism::attention_space_bwd", mutates_args=())
    def _space_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, m: torch.Tensor, logl: torch.Tensor,
                   key_padding: torch.Tensor | None, softcap: float, scale: float, causal: bool) -> torch.Tensor:
        return attention_space_bwd(do, qkv, o, m, logl, key_padding, softcap, scale, causal)

    @_space_bwd.register_fake
    def _(do, qkv, o, m, logl, key_padding, softcap, scale, causal):
        return qkv.new_empty(qkv.shape)

    def _space_setup(ctx, inputs, output):
        qkv, key_padding, softcap, scale, causal = inputs
        o, m, logl = output
        ctx.mark_non_differentiable(m, logl)
        ctx.save_for_backward(qkv, o, m, logl, key_padding)
        ctx.args = (softcap, scale, causal)

    def _space_backward(ctx, do, _dm, _dl):
        qkv, o, m, logl, key_padding = ctx.saved_tensors
        return _space_bwd(do, qkv, o, m, logl, key_padding, *ctx.args), None, None, None, None

    _space_fwd.register_autograd(_space_backward, setup_context=_space_setup)

    @torch.library.custom_op("videoprism::attention_time_fwd", mutates_args=())
    def _time_fwd(qkv: torch.Tensor, pos: torch.Tensor | None, key_padding: torch.Tensor | None, softcap: float,
                  scale: float, causal: bool) -> torch.Tensor:
        return attention_time_fwd(qkv, pos, key_padding, softcap, scale, causal)

    @_time_fwd.register_fake
    def _(qkv, pos, key_padding, softcap, scale, causal):
        B, T, K, _, H, Dh = qkv.shape
        return qkv.new_empty((B, T, K, H, Dh))

    @torch.library.custom_op("videoprism::attention_time_bwd", mutates_args=())
    def _time_bwd(do: torch.Tensor, qkv: torch.Tensor, pos: torch.Tensor | None, key_padding: torch.Tensor | None,
                  softcap: float, scale: float, causal: bool) -> torch.Tensor:
        return attention_time_bwd(do, qkv, pos, key_padding, softcap, scale, causal)

    @_time_bwd.register_fake
    def _(do, qkv, pos, key_padding, softcap, scale, causal):
        return qkv.new_empty(qkv.shape)

    def _time_setup(ctx, inputs, output):
        qkv, pos, key_padding, softcap, scale, causal = inputs
        ctx.save_for_backward(qkv, pos, key_padding)
        ctx.args = (softcap, scale, causal)

    def _time_backward(ctx, do):
        qkv, pos, key_padding = ctx.saved_tensors
        return _time_bwd(do, qkv, pos, key_padding, *ctx.args), None, None, None, None, None

    _time_fwd.register_autograd(_time_backward, setup_context=_time_setup)


def _triton(qkv, *, axis, softcap, pos, key_padding, causal, scale):
    if _TRITON_MISSING is not None:
        raise ValueError(f"attention backend 'triton' needs the triton package ({_TRITON_MISSING}); "
                         "use backend='reference'")
    if qkv.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"attention backend 'triton' runs on CUDA tensors (got device {qkv.device}); on the CPU "
                         "use backend='reference', or set TRITON_INTERPRET=1 before importing videoprism to run "
                         "the kernels in Triton's interpreter")
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention backend 'triton' takes float16/bfloat16/float32 qkv, got {qkv.dtype}; "
                         "use backend='reference'")
    Dh = qkv.shape[-1]
    if Dh > 256:
        raise ValueError(f"attention backend 'triton' supports head dims up to 256, got {Dh}; use 'flex' or 'reference'")
    if axis == "space":
        return _space_fwd(qkv, key_padding, softcap, scale, causal)[0]
    T = qkv.shape[1]
    if T > 64:
        raise ValueError(f"attention backend 'triton' holds the whole time axis in registers, up to 64 frames; "
                         f"got T={T}; use 'flex' or 'reference'")
    if qkv.dtype == torch.float32 and qkv.requires_grad and torch.is_grad_enabled() and T > 32 and Dh > 128:
        # The fp32 time backward at BLOCK_T = 64, BLOCK_D = 256 holds four 64 KB tiles in shared
        # memory (256 KB; sm_90 gives a program 227 KB): Triton would raise OutOfResources in the
        # backward, on the GPU only. The forward alone (192 KB) fits.
        raise ValueError(f"attention backend 'triton' trains in float32 on up to 32 frames at head dims above "
                         f"128; got T={T}, Dh={Dh}; use bf16/fp16 (autocast), 'flex' or 'reference'")
    return _time_fwd(qkv, pos, key_padding, softcap, scale, causal)


# ----------------------------------------------------------------------------------------------
# "flex": FlexAttention
# ----------------------------------------------------------------------------------------------
# Flex multiplies scores by log2(e) after the score_mod: MASK_VALUE * log2(e) overflows fp32 to
# -inf (a fully masked row would be NaN), so it gets a finite mask half as large, which keeps
# the same meaning (exp of it relative to any real logit is 0; equal in a fully masked row).
_FLEX_MASK = MASK_VALUE / 2
_flex_compiled = None


def _flex_fn(device: torch.device):
    """Flex is only fast compiled; eager (CPU, or inside an outer torch.compile) runs its math."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _flex_compiled is None:
        # One compile per shape and grad mode: a model has a handful (space, time, text);
        # a benchmark sweep has dozens, past dynamo's default limit of 8, after which flex
        # silently falls back to its unfused math.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def _flex(qkv, *, axis, softcap, pos, key_padding, causal, scale):
    from torch.nn.attention.flex_attention import create_block_mask

    B, T, K, _, H, Dh = qkv.shape
    dev = qkv.device
    if dev.type == "cpu" and qkv.requires_grad:
        if torch.is_grad_enabled():
            raise ValueError("attention backend 'flex' has no backward on the CPU (FlexAttention's limit); use "
                             "'reference' to train on the CPU, or run the forward under torch.no_grad()")
        qkv = qkv.detach()  # flex refuses any CPU input that requires grad, even under no_grad
    q, k, v = qkv.unbind(3)                                               # [B, T, K, H, Dh] views
    block_mask, frame = None, None
    if axis == "space":                                                   # sequences (b, t)
        q, k, v = (a.permute(0, 1, 3, 2, 4).flatten(0, 1) for a in (q, k, v))    # [B*T, H, K, Dh]
        kp = None if key_padding is None else key_padding.reshape(B * T, K)
    elif pos is None:                                                     # sequences (b, k): copies
        q, k, v = (a.permute(0, 2, 3, 1, 4).reshape(B * K, H, T, Dh) for a in (q, k, v))
        kp = None if key_padding is None else key_padding.permute(0, 2, 1).reshape(B * K, T)
    else:                                                                 # one clip = T*K tokens
        q, k, v = (a.flatten(1, 2).transpose(1, 2) for a in (q, k, v))   # [B, H, T*K, Dh]
        kp = None if key_padding is None else key_padding.reshape(B, T * K)
        loc = pos.reshape(B, T * K)
        frame = torch.arange(T, device=dev).repeat_interleave(K)
        block_mask = create_block_mask(lambda b, h, qi, ki: loc[b, qi] == loc[b, ki], B, None, T * K, T * K,
                                       device=dev)

    def score_mod(s, b, h, qi, ki):
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if kp is not None:
            s = torch.where(kp[b, ki], _FLEX_MASK, s)
        if causal:
            later = ki > qi if frame is None else frame[ki] > frame[qi]
            s = torch.where(later, _FLEX_MASK, s)
        return s

    o = _flex_fn(dev)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    if axis == "space":
        return o.view(B, T, H, K, Dh).permute(0, 1, 3, 2, 4)
    if pos is None:
        return o.view(B, K, H, T, Dh).permute(0, 3, 1, 2, 4)
    return o.transpose(1, 2).view(B, T, K, H, Dh)


# ----------------------------------------------------------------------------------------------
# "flash": flash-attn soft-cap kernels; "sdpa": torch SDPA
# ----------------------------------------------------------------------------------------------
def _flash(qkv, *, axis, softcap, pos, key_padding, causal, scale):
    try:
        from flash_attn import flash_attn_qkvpacked_func
    except ImportError as e:
        raise ValueError(f"attention backend 'flash' needs the flash-attn package ({e}); pip install flash-attn, "
                         "or use 'triton' (same soft-cap, also on the time axis)") from e
    if key_padding is not None:
        raise ValueError("attention backend 'flash' has no finite key-padding mask (a fully padded row must be "
                         "uniform); use 'triton', 'flex' or 'reference'")
    if pos is not None:
        raise ValueError("attention backend 'flash' does not take a pos map (masked time axis); "
                         "use 'triton', 'flex' or 'reference'")
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend 'flash' takes float16/bfloat16, got {qkv.dtype}; use 'triton'")
    B, T, K, _, H, Dh = qkv.shape
    if axis == "space":                                                   # a view: [B*T, K, 3, H, Dh]
        o = flash_attn_qkvpacked_func(qkv.flatten(0, 1), softmax_scale=scale, causal=causal, softcap=softcap)
        return o.view(B, T, K, H, Dh)
    x = qkv.transpose(1, 2).reshape(B * K, T, 3, H, Dh)                   # copy to sequence-major
    o = flash_attn_qkvpacked_func(x, softmax_scale=scale, causal=causal, softcap=softcap)
    return o.view(B, K, T, H, Dh).transpose(1, 2)


def _sdpa(qkv, *, axis, softcap, pos, key_padding, causal, scale):
    if softcap > 0:
        raise ValueError(f"attention backend 'sdpa' has no logit soft-cap (softcap={softcap}); "
                         "use 'triton', 'flex', 'flash' or 'reference'")
    if pos is not None:
        raise ValueError("attention backend 'sdpa' does not take a pos map (masked time axis); "
                         "use 'triton', 'flex' or 'reference'")
    B, T, K, _, H, Dh = qkv.shape
    q, k, v = qkv.unbind(3)                                   # [B, T, K, H, Dh]
    # SDPA's fused kernels take 4-D [batch, heads, seq, dim]: fold the other grid axis
    # into the batch. On the time axis that costs a permute copy of q, k, v and o.
    if axis == "space":
        perm, inv, S = (0, 1, 3, 2, 4), (0, 1, 3, 2, 4), K       # [B, T, H, K, Dh]
        kp = None if key_padding is None else key_padding.bool().reshape(B * T, 1, 1, K)
    else:
        perm, inv, S = (0, 2, 3, 1, 4), (0, 3, 1, 2, 4), T       # [B, K, H, T, Dh]
        kp = None if key_padding is None else key_padding.bool().permute(0, 2, 1).reshape(B * K, 1, 1, T)
    q, k, v = (a.permute(*perm).reshape(-1, H, S, Dh) for a in (q, k, v))
    mask = None
    if kp is not None:
        # A query whose keys are all padded (causal: all of those up to it) averages all values uniformly (the
        # official code's finite mask): unmask its row and zero the query, so every score is 0. (A large fill alone
        # is not exact in fp16, whose rounding near -32752 keeps parts of the scores.)
        full = kp.cumprod(-1).bool().transpose(-1, -2) if causal else kp.all(-1, keepdim=True)
        kp, q = kp & ~full, q.masked_fill(full, 0)
        # MASK_VALUE overflows fp16: half the type's most negative value there.
        fill = max(MASK_VALUE, 0.5 * torch.finfo(q.dtype).min)
        mask = torch.zeros(kp.shape, dtype=q.dtype, device=q.device).masked_fill(kp, fill)
        if causal:
            c = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
            mask = mask.masked_fill(~c & ~full, fill)
            causal = False
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    o = o.reshape(B, T, H, K, Dh) if axis == "space" else o.reshape(B, K, H, T, Dh)
    return o.permute(*inv)


_IMPL = {"reference": factorized_attention_ref, "triton": _triton, "flex": _flex, "flash": _flash, "sdpa": _sdpa}


def _validate(qkv, axis, softcap, pos, key_padding, causal, scale, num_locations):
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"qkv must be a [B, T, K, 3, H, Dh] tensor (the qkv projection viewed per head), "
                         f"got {tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv)}")
    if not qkv.is_floating_point():
        raise ValueError(f"qkv must be a float tensor (float32, float16 or bfloat16), got {qkv.dtype}")
    if axis not in ("space", "time"):
        raise ValueError(f"axis must be 'space' (within a frame) or 'time' (across frames), got {axis!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < math.inf:
        raise ValueError(f"softcap must be a finite number >= 0 (0 = no cap), got {softcap!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    # Any real number (numpy's, a 0-d tensor) as before; symbolic ones pass (a compiled model with dynamic shapes).
    if scale is not None and not isinstance(scale, torch.SymFloat):
        try:
            ok = not isinstance(scale, (bool, str)) and math.isfinite(float(scale))
        except (TypeError, ValueError, RuntimeError):
            ok = False
        if not ok:
            raise ValueError(f"scale must be a finite number (None = Dh^-0.5), got {scale!r}")
    if num_locations is not None and not isinstance(num_locations, torch.SymInt):
        n = as_int(num_locations)
        if n is None or n < 1:
            raise ValueError(f"num_locations must be the spatial grid's size, an int >= 1 (None = read from pos), "
                             f"got {num_locations!r}")
    btk = tuple(qkv.shape[:3])
    if pos is not None:
        if axis != "time":
            raise ValueError("pos (the spatial index of each token) only applies to axis='time'; pass pos=None "
                             "for axis='space'")
        if not isinstance(pos, torch.Tensor) or tuple(pos.shape) != btk:
            raise ValueError(f"pos must be an integer [B, T, K] = {list(btk)} tensor of spatial indices, "
                             f"got {tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__}")
    if key_padding is not None and (not isinstance(key_padding, torch.Tensor) or tuple(key_padding.shape) != btk
                                    or key_padding.dtype != torch.bool):
        got = (f"{key_padding.dtype} {tuple(key_padding.shape)}" if isinstance(key_padding, torch.Tensor) else
               type(key_padding).__name__)
        raise ValueError(f"key_padding must be a bool [B, T, K] = {list(btk)} tensor (True = padded key), got {got}")
    for name, t in (("pos", pos), ("key_padding", key_padding)):
        if t is not None and t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv on {qkv.device}; move it to qkv's device")
    if pos is not None:
        check_pos(pos, num_locations)


def factorized_attention(
    qkv: torch.Tensor,
    *,
    axis: str,
    softcap: float = 0.0,
    pos: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    causal: bool = False,
    backend: str | None = None,
    scale: float | None = None,
    num_locations: int | None = None,
) -> torch.Tensor:
    """Attention along one axis of `qkv [B, T, K, 3, H, Dh]` (any strides) -> `[B, T, K, H, Dh]`.

    axis="space": among the K tokens of each frame; axis="time": among the tokens of the same
    spatial location across frames (`pos [B, T, K]` int, sorted per frame, gives each token's
    spatial index; None = identity). `key_padding [B, T, K]` bool, True = padded key; `causal`
    along the axis; `softcap` c > 0 caps logits to c * tanh(s / c); `scale` defaults to
    Dh^-0.5. `backend` None (or "auto") picks "triton" on CUDA, "reference" elsewhere.
    `num_locations`: the spatial grid's size (above every index of pos), which the reference's
    masked time axis lays its tokens on (None: read from pos, a host read); the other backends
    search each frame's sorted pos. See kernels/factorized_attention.py for the exact math.
    """
    _validate(qkv, axis, softcap, pos, key_padding, causal, scale, num_locations)
    backend = default_backend(qkv.device) if backend in (None, "auto") else backend
    if backend not in _IMPL:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS} (or None for the default)")
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    kw = {"num_locations": num_locations} if backend == "reference" and pos is not None else {}
    return _IMPL[backend](qkv, axis=axis, softcap=float(softcap), pos=pos, key_padding=key_padding, causal=causal,
                          scale=scale, **kw)
