"""Losses of both stages and the cross-rank gather they need."""
from __future__ import annotations

import re
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from videoprism.kernels.token_ops_ref import acc_dtype

# torch 2.14 deprecates the autograd all_gather below for one of the private torch.distributed._functional_collectives;
# the public one works from torch 2.11 (the GPU machines') to 2.14, so its notice is not repeated by every rank.
# Only for the call here (torch attributes the notice to its caller): a user's own all_gather keeps its notice.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning, module=re.escape(__name__) + r"\Z")


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather `[b, ...]` from every rank into `[world * b, ...]` (rank-major), with a
    backward that sums the gradients of every rank's copy into the local slice, so the
    loss over the global batch trains each rank's tower (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or in fp64 if it is: a float64 model's loss (as the gradient checks take it) rounded to fp32 left
    its finite differences a digit or two (test_loss_gradients.py)."""
    return x.to(acc_dtype(x.dtype))


def contrastive_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (CLIP).

    `video`, `text`: this rank's L2-normalised embeddings `[b, D]`; the rank's rows are
    scored against every rank's columns. The value is the mean over this rank's rows of the
    video->text and text->video cross-entropies; the mean over ranks (what DDP/FSDP's
    gradient averaging optimises) equals the loss of the whole global batch on one rank.
    """
    all_video, all_text = gather_with_grad(video), gather_with_grad(text)
    b = video.shape[0]
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(rank * b, (rank + 1) * b, device=video.device)
    scale = logit_scale.exp()
    # In fp32 even under autocast, which would run these matmuls in bf16 whatever their inputs: at a
    # logit scale up to 100 bf16's 2^-8 makes each logit ~0.3 off.
    with torch.autocast(video.device.type, enabled=False):
        v2t = _fp32(scale) * _fp32(video) @ _fp32(all_text).T      # [b, B]
        t2v = _fp32(scale) * _fp32(text) @ _fp32(all_video).T      # [b, B]
    return 0.5 * (F.cross_entropy(v2t, labels) + F.cross_entropy(t2v, labels))


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all leading positions of 1 - cos(pred, target) along the last axis."""
    pred, target = _fp32(pred), _fp32(target)
    cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    return (1.0 - cos).mean()
