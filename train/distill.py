"""Stage-2 modules (DESIGN 5): the frozen teacher, the decoders and the student model.

Shapes: `n = T*N` token positions of a clip (frame-major, position `t*N + p`), `m = T*K`
visible tokens (frame-major, spatial index `pos[b, t, k]`), D the encoder width, Dd the
decoder width.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from videoprism import ops
from videoprism.layers import AttentionPooler


class Teacher(nn.Module):
    """The stage-1 video tower, frozen: encoder -> token targets `[B, n, D]`; auxiliary
    stack + MAP pooler -> global target `[B, D]`. Always on the full clip, in eval mode,
    without autograd."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.encoder = clip.vision_encoder
        self.auxiliary = clip.auxiliary_encoder
        self.pooler = clip.contrastive_vision_pooler
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # a frozen teacher never leaves eval mode

    # No autograd whoever calls it, and one grad mode for its compiled blocks in the step and the evaluation
    # alike (dynamo guards the grad mode: a grad-enabled step compiled each block kind a second time).
    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, _ = self.encoder(video)
        pooled = self.pooler(self.auxiliary(tokens[:, None])[:, 0])
        return tokens, pooled


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, `dim_in` -> `dim_out` -> `dim_out`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_out)
        self.fc2 = nn.Linear(dim_out, dim_out)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU under a name torch does not recognise: given `F.gelu`, nn.TransformerEncoderLayer
    in eval mode without grad takes its inference fast path (`aten::_transformer_encoder_layer_fwd`),
    which torch.compile cannot trace in torch 2.11 (no fake impl: a compiled stage-2 evaluation
    failed) and which met bf16 activations with fp32 weights under CPU autocast."""
    return nn.functional.gelu(x)


class Decoder(nn.Module):
    """MLP D->Dd, `num_layers` pre-LN blocks of width Dd (GELU FFN 4*Dd) + final LayerNorm,
    MLP Dd->D, linear D->D. `[B, L, D] -> [B, L, D]`.

    The blocks are torch's own (`nn.TransformerEncoderLayer`, norm first): the decoders are
    not part of the official model and have no logit cap, so plain 4-D SDPA runs them with
    the fused flash kernels on both the GPU and the CPU."""

    def __init__(self, dim: int, dec_dim: int, num_layers: int, num_heads: int):
        super().__init__()
        self.mlp_in = Mlp(dim, dec_dim)
        layer = nn.TransformerEncoderLayer(dec_dim, num_heads, 4 * dec_dim, dropout=0.0, activation=_gelu,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(dec_dim), enable_nested_tensor=False)
        self.mlp_out = Mlp(dec_dim, dim)
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp_out(self.blocks(self.mlp_in(x))))


def identity_slots(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The unshuffled `perm [B, n]`: slot `t*N + p` holds the visible token of position
    (t, p) (index `t*K + k` of the visible sequence) when p is visible in frame t, else a
    mask token (indices m.. in order)."""
    B, T, K = pos.shape
    n, m = T * num_patches, T * K
    slot = torch.full((B, T, num_patches), -1, dtype=torch.long, device=pos.device)
    k = torch.arange(K, device=pos.device).expand(B, T, K)
    slot.scatter_(2, pos.long(), k + (torch.arange(T, device=pos.device) * K)[None, :, None])
    slot = slot.reshape(B, n)
    masked = slot < 0
    mask_index = m + masked.long().cumsum(1) - 1
    return torch.where(masked, mask_index, slot)


def random_slots(batch: int, n: int, *, generator: torch.Generator, device) -> torch.Tensor:
    """A uniformly random permutation of the n slots per sample, `[B, n]` int64."""
    return torch.rand(batch, n, generator=generator, device=device).argsort(dim=1)


class Stage2Model(nn.Module):
    """The trained part of stage 2: student encoder, token-wise decoder with its mask
    embedding and slot position embedding, and (optionally) the global decoder + pooler.

    forward(video, pos [B, T, K], perm [B, n]) -> (token predictions `[B, n, D]` by slot,
    global prediction `[B, D]` or None).
    """

    def __init__(self, teacher_encoder: nn.Module, *, num_positions: int, dec_dim: int, dec_layers: int,
                 dec_heads: int, global_distill: bool):
        super().__init__()
        D = teacher_encoder.config.model_dim
        # The student starts as an exact copy of the teacher's encoder.
        self.student = copy.deepcopy(teacher_encoder).requires_grad_(True)
        self.mask_emb = nn.Parameter(torch.zeros(D))
        self.pos_emb = nn.Parameter(torch.randn(num_positions, D) * 0.02)
        self.token_decoder = Decoder(D, dec_dim, dec_layers, dec_heads)
        self.global_decoder = Decoder(D, dec_dim, dec_layers, dec_heads) if global_distill else None
        self.global_pooler = AttentionPooler(D, dec_heads, D) if global_distill else None

    def decoder_input(self, visible: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """x[b, i] = c[b, perm[b, i]] + pos_emb[i], c = [visible | mask_emb x (n - m)]."""
        if perm.shape[1] != self.pos_emb.shape[0]:
            raise ValueError(f"clips have {perm.shape[1]} token positions but the decoder's position embedding "
                             f"has {self.pos_emb.shape[0]}; train with the model.num_frames/resolution it was "
                             "built for")
        # The fp32 embeddings go in as they are: the op adds them in fp32 and rounds the sum once, and their
        # gradients come back as fp32 sums (cast to bf16 first, both were rounded twice, at a copy each).
        return ops.shuffle_with_mask_tokens(visible, perm, self.mask_emb, self.pos_emb)

    def forward(self, video: torch.Tensor, pos: torch.Tensor, perm: torch.Tensor):
        visible, _ = self.student(video, pos=pos)                     # [B, m, D] frame-major
        tokens = self.token_decoder(self.decoder_input(visible, perm))
        pooled = None
        if self.global_decoder is not None:
            pooled = self.global_pooler(self.global_decoder(visible))
        return tokens, pooled
