"""The one FLOP formula of the project: the trainer's MFU and bench/train_step.py both use it.

Conventions (those of PaLM / torchtitan MFU, except that causal attention counts only the pairs it scores):
* Only matmul FLOPs are counted, 2 per multiply-add. LayerNorm, softmax, GELU, the
  soft-cap and the loss's exp/log are a few % and are left out.
* Forward FLOPs of a transformer block over `S` tokens of width `D`, FFN width `F`:
  qkv + output projections `2*S*4*D^2`, FFN `4*S*D*F`, attention `4*P*D`, where `P` is the
  number of (query, key) pairs the block must score: `S^2` dense, `S*(S+1)/2` causal.
* A training step costs 3x the forward of the parts that get gradients (forward, grad
  of activations, grad of weights) and 1x the forward of frozen parts (stage-2 teacher,
  the LiT video encoder), which need no backward at all. The patch projection of a trained
  encoder costs 2x: its input (the pixels) needs no gradient, only its weight does; so do the
  LiT pooler's k and v projections when they read the frozen encoder directly (no auxiliary layer).
* Recomputation is not counted: GradCache's no-grad embedding pass (stage1.grad_cache) and the
  blocks that activation checkpointing runs again add time, not model FLOPs (PaLM's MFU).
* Masked encoding counts visible tokens only: the spatial stack sees `K` tokens per
  frame; temporal attention scores only the pairs of visible tokens at the same spatial
  location, `sum_loc count(loc)^2` per clip (`T^2 * K` for tube masks, where every visible
  location is visible in all `T` frames). Masked tokens cost nothing and count nothing.

The `*_flops` functions return forward FLOPs for the whole batch, the `*_step_flops` ones a training
step's (3x / 1x / 2x as above), as Python floats; with the masked pair count of `temporal_pairs` (a
tensor on the mask's device) those that take it return a 0-d tensor.
"""
from __future__ import annotations

import torch


def block_flops(seqs: int, seq_len: int, dim: int, mlp_dim: int, *, pairs: float | None = None,
                causal: bool = False) -> float:
    """Forward FLOPs of one pre-LN transformer block over `seqs` sequences of `seq_len`
    tokens. `pairs` = scored (query, key) pairs of one sequence; default dense or causal."""
    if pairs is None:
        pairs = seq_len * (seq_len + 1) / 2 if causal else seq_len * seq_len
    tokens = seqs * seq_len
    return tokens * (8 * dim * dim + 4 * dim * mlp_dim) + seqs * 4 * pairs * dim


def pooler_kv_flops(batch: int, tokens: int, dim: int, hidden: int) -> float:
    """The attention pooler's k and v projections over `tokens` tokens per clip."""
    return 4.0 * batch * tokens * dim * hidden


def pooler_flops(batch: int, tokens: int, dim: int, hidden: int) -> float:
    """Attention pooler with one learned query: its projection (once, shared by the batch),
    k and v (all tokens), scores and weighted sum over `tokens` keys, output projection."""
    return (2 * dim * hidden + pooler_kv_flops(batch, tokens, dim, hidden)
            + batch * (4 * tokens * hidden + 2 * hidden * dim))


def temporal_pairs(pos: torch.Tensor | None, frames: int, visible: int, num_patches: int) -> float | torch.Tensor:
    """Scored pairs of the masked temporal attention, summed over the batch and divided by
    the batch size (mean per clip). `pos [B, T, K]` visible patch indices (< num_patches): a
    0-d tensor on pos's device, counted there (the trainer reads it back with the step's other
    scalars instead of waiting for the GPU); or None (tube or unmasked: T^2 * K)."""
    if pos is None:
        return float(frames * frames * visible)
    B = pos.shape[0]
    flat = pos.reshape(B, -1).long()
    counts = torch.zeros(B, num_patches, dtype=torch.float64, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    return (counts * counts).sum() / B


def patch_embed_flops(cfg, batch: int, frames: int, visible: int) -> float:
    """The encoder's patch projection over `visible` patches per frame (P*P*3 -> D)."""
    return 2.0 * batch * frames * visible * cfg.patch_size * cfg.patch_size * 3 * cfg.model_dim


def encoder_flops(cfg, batch: int, frames: int, visible: int, *, pairs_per_clip: float | None = None) -> float:
    """`FactorizedEncoder` forward on `visible` tokens per frame. `cfg` has patch_size,
    model_dim, mlp_dim, num_spatial_layers, num_temporal_layers (videoprism.config)."""
    D, F = cfg.model_dim, cfg.mlp_dim
    total = patch_embed_flops(cfg, batch, frames, visible)
    total += cfg.num_spatial_layers * block_flops(batch * frames, visible, D, F)
    if pairs_per_clip is None:
        pairs_per_clip = float(frames * frames * visible)
    # Temporal stack: one sequence per (clip, spatial location); tokens and pairs as counted.
    per_clip_tokens = frames * visible
    total += cfg.num_temporal_layers * (
        batch * per_clip_tokens * (8 * D * D + 4 * D * F) + batch * 4 * pairs_per_clip * D)
    return total


def video_head_flops(cfg, batch: int, tokens: int) -> float:
    """What the video tower adds to the encoder: the auxiliary stack over the clip's `tokens`
    output tokens and the MAP pooler (hidden 4D)."""
    D = cfg.model_dim
    return cfg.num_auxiliary_layers * block_flops(batch, tokens, D, cfg.mlp_dim) + pooler_flops(batch, tokens, D, 4 * D)


def video_tower_flops(cfg, batch: int, frames: int, visible: int, *, pairs_per_clip: float | None = None) -> float:
    """`FactorizedVideoCLIP` video tower: encoder, auxiliary stack over all T*K tokens, MAP pooler."""
    return (encoder_flops(cfg, batch, frames, visible, pairs_per_clip=pairs_per_clip)
            + video_head_flops(cfg, batch, frames * visible))


def text_tower_flops(cfg, batch: int, length: int) -> float:
    """CoCa text encoder over `length` tokens + the class token (causal if the config says so)."""
    D = cfg.model_dim
    return cfg.num_unimodal_layers * block_flops(batch, length + 1, D, 4 * D, causal=cfg.enable_causal_atten)


def contrastive_loss_flops(batch: int, global_batch: int, dim: int) -> float:
    """One rank's similarity matrices: its `batch` videos against the `global_batch` texts and
    its texts against all videos, `[batch, global_batch]` each (train/losses.py)."""
    return 2 * 2.0 * batch * global_batch * dim


def stage1_step_flops(cfg, *, batch: int, frames: int, visible: int, text_length: int, world: int = 1,
                      freeze_video: bool = False) -> float:
    """Training FLOPs of one rank's stage-1 step of `batch` clips, its loss scoring them against the
    `batch * world` clips of the global batch (`world` ranks; times the micro-steps that GradCache scores
    together, train/stage1.py). See the module docstring. LiT (`freeze_video`) freezes the encoder only:
    the auxiliary stack and the pooler still train; with no auxiliary layer the pooler's k and v read the frozen
    encoder's output and cost 2x (see the module docstring)."""
    encoder = encoder_flops(cfg, batch, frames, visible)
    head = video_head_flops(cfg, batch, frames * visible)
    text = text_tower_flops(cfg, batch, text_length)
    loss = contrastive_loss_flops(batch, batch * world, cfg.model_dim)
    # Trained encoder: 3x, less the patch projection's activation gradient (the pixels need none).
    video = encoder if freeze_video else 3 * encoder - patch_embed_flops(cfg, batch, frames, visible)
    total = video + 3 * (head + text + loss)
    if freeze_video and cfg.num_auxiliary_layers == 0:
        # The frozen encoder's output needs no gradient: k and v compute only their weights' (the tiny preset's LiT
        # step was counted 16% high). An auxiliary block's trained LayerNorm does need its input's: 3x there.
        total -= pooler_kv_flops(batch, frames * visible, cfg.model_dim, 4 * cfg.model_dim)
    return total


def decoder_flops(batch: int, tokens: int, dim: int, dec_dim: int, num_layers: int, dec_mlp_dim: int) -> float:
    """Stage-2 decoder (train/distill.py): MLP D->Dd (two linears), `num_layers` blocks of
    width Dd, MLP Dd->D (two linears), linear D->D, over `tokens` tokens per clip."""
    n = batch * tokens
    mlps = 2.0 * n * (dim * dec_dim + dec_dim * dec_dim) + 2.0 * n * (dec_dim * dim + dim * dim)
    return mlps + 2.0 * n * dim * dim + num_layers * block_flops(batch, tokens, dec_dim, dec_mlp_dim)


def stage2_step_flops(cfg, *, batch: int, frames: int, grid_tokens: int, visible: int, dec_dim: int,
                      dec_layers: int, dec_mlp_dim: int, global_distill: bool = True,
                      pairs_per_clip: float | None = None) -> float:
    """Training FLOPs of one stage-2 step: teacher forward on every token (1x), student
    encoder on the visible tokens, token decoder over all T*N slots, global decoder on the
    visible tokens + MAP pooler (3x)."""
    D = cfg.model_dim
    n, m = frames * grid_tokens, frames * visible
    teacher = video_tower_flops(cfg, batch, frames, grid_tokens)
    student = encoder_flops(cfg, batch, frames, visible, pairs_per_clip=pairs_per_clip)
    student += decoder_flops(batch, n, D, dec_dim, dec_layers, dec_mlp_dim)
    if global_distill:
        student += decoder_flops(batch, m, D, dec_dim, dec_layers, dec_mlp_dim) + pooler_flops(batch, m, D, D)
    # The student's patch projection needs no activation gradient (the pixels): 2x, not 3x.
    return teacher + 3 * student - patch_embed_flops(cfg, batch, frames, visible)


def peak_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a step computes its matmuls in: bf16 on CUDA (autocast), fp32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def matmul_peak_tflops(device: torch.device | str, *, n: int | None = None, dtype: torch.dtype | None = None) -> float:
    """Measured matmul ceiling of the device in TFLOP/s for `dtype` (default `peak_dtype`: the
    denominator of MFU): the best of a few timed `n x n` products after a warm-up. fp32 on CUDA
    is true fp32 unless TF32 is allowed (torch.backends.cuda.matmul.allow_tf32), as in the run."""
    import time

    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)  # 512 on the CPU underestimated the ceiling (a model ran above it)
    dtype = dtype or peak_dtype(device)
    # A private generator: the trainer measures this after a resume restored the global generators (DESIGN 8),
    # and operands drawn from them moved the run's torch stream off the checkpoint's.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best = float("inf")
    # On a GPU ~150 ms of rounds: the clocks ramp up within the first ones, and the best round counts.
    for i in range(21 if cuda else 6):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(5 if cuda else 1):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        if i:  # the first round is the warm-up
            best = min(best, (time.perf_counter() - t0) / (5 if cuda else 1))
    return 2 * n**3 / best / 1e12
