"""Zero-shot retrieval: text->video and video->text recall at 1, 5, 10.

Protocol: every validation clip with its own caption. A retrieved item counts as a hit
when its caption equals the query's (identical captions are indistinguishable for any
model; with unique captions this is the usual one-correct-item protocol). The chance
level reported with the metrics is the expected R@1 of a random ranking under the same
rule: mean over queries of (items sharing the caption) / (items).
"""
from __future__ import annotations

import torch


def caption_groups(text_ids: torch.Tensor, text_paddings: torch.Tensor) -> torch.Tensor:
    """Group id per caption: equal token sequences (padding ignored) share a group."""
    ids = text_ids.long() * (text_paddings < 0.5).long() - (text_paddings >= 0.5).long()
    return torch.unique(ids, dim=0, return_inverse=True)[1]


def recall_at_k(sim: torch.Tensor, query_groups: torch.Tensor, item_groups: torch.Tensor,
                ks=(1, 5, 10)) -> dict[int, float]:
    """sim [Q, I]; a query hits at k when its best-scored item of the query's group ranks within
    the top k. Ties count against the model: that item's rank is the number of other items
    scoring at least as high (a topk would break ties by item order, and a collapsed model
    whose embeddings are all equal would score by how the split happens to be ordered). A query whose scores are
    not all finite (a diverged model's) misses."""
    match = item_groups[None, :] == query_groups[:, None]                      # [Q, I]
    best = sim.masked_fill(~match, float("-inf")).amax(1, keepdim=True)       # [Q, 1]
    rank = ((sim >= best) & ~match).sum(1)                                    # items ahead of it
    # A query with no match, or whose scores are not all finite (NaN compares false with all), never hits: a mask,
    # not a rank of "every item" (that rank is below a k past the number of items, R@10 of 9 clips).
    can_hit = match.any(1) & sim.isfinite().all(1)
    return {k: float(((rank < k) & can_hit).float().mean()) for k in ks}


def retrieval_metrics(video: torch.Tensor, text: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """video, text: L2-normalised `[N, D]` embeddings of the same N clips, in order;
    groups [N]: caption group ids (`caption_groups`)."""
    if video.shape != text.shape or video.shape[0] != groups.shape[0]:
        raise ValueError(f"retrieval needs matching [N, D] video/text embeddings and N group ids, got "
                         f"{tuple(video.shape)}, {tuple(text.shape)} and {tuple(groups.shape)}")
    with torch.autocast(text.device.type, enabled=False):  # fp32 ranks under the evaluation's autocast too
        sim = text.float() @ video.float().T
    out = {}
    for name, s in (("t2v", sim), ("v2t", sim.T)):
        for k, r in recall_at_k(s, groups, groups).items():
            out[f"{name}_R@{k}"] = r
    sizes = torch.bincount(groups).float()
    out["chance_R@1"] = float((sizes[groups] / groups.shape[0]).mean())
    # Captions whose token sequences are equal count as one (a tokenizer that drops digits or case can merge
    # captions that differ as text): fewer of them than clips raises the chance level above.
    out["captions"] = int((sizes > 0).sum())
    return out
