"""Zero-shot retrieval: text->video and video->text recall at 1, 5, 10.

Protocol: every validation clip with its own caption. A retrieved item counts as a hit
when its caption equals the query's (identical captions are indistinguishable for any
model; with unique captions this is the usual one-correct-item protocol). The chance
level reported with the metrics is the expected R@1 of a random ranking under the same
rule: mean over queries of (items sharing the caption) / (items).

The [N, N] similarity is scored a block of rows at a time (`BLOCK_ELEMENTS`): whole, with the temporaries of the
ranking (its masked copy, the bool match and comparisons), N = 8k clips peaked at 0.86 GB, 16k at 3.4 GB, and 50k
would take 34 GB; in blocks the peak stays near 0.2 GB whatever N.
"""
from __future__ import annotations

import torch

# Pairs scored per block: rows = BLOCK_ELEMENTS // items, at least MIN_BLOCK_ROWS. Up to 2048 clips the whole
# similarity is one block, one matmul as before blocking. A block's temporaries take ~45 bytes a pair (a float copy
# for isfinite, an int64 one for a bool sum, the previous block's scores until the next is computed): 4M pairs,
# ~0.18 GB; smaller blocks were no faster.
BLOCK_ELEMENTS = 1 << 22
# Row blocks of the matmul are equal, bit for bit, to the rows of one whole matmul only from some rows on (MKL on
# the CPU: 2, 3 and, on 2 threads, 7 rows take another kernel and differ in the last bits; 16 or more matched on 1
# to 16 threads): the blocks are balanced, each at least half this many rows, so that no remainder of a row or two
# is scored differently.
MIN_BLOCK_ROWS = 64


def caption_groups(text_ids: torch.Tensor, text_paddings: torch.Tensor) -> torch.Tensor:
    """Group id per caption: equal token sequences (padding ignored) share a group."""
    ids = text_ids.long() * (text_paddings < 0.5).long() - (text_paddings >= 0.5).long()
    return torch.unique(ids, dim=0, return_inverse=True)[1]


def row_blocks(rows: int, cols: int, block_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    """(start, end) of balanced blocks of `rows`, about `block_elements` // `cols` rows each (MIN_BLOCK_ROWS // 2 at
    least)."""
    per = max(MIN_BLOCK_ROWS, block_elements // max(cols, 1))
    n = max(1, -(-rows // per))
    return [(rows * b // n, rows * (b + 1) // n) for b in range(n)]


def _row_ranks(sim: torch.Tensor, match: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of queries' scores `[q, I]` and which items match each -> (rank of each query's best-scored match: the
    items of other groups scoring at least as high, whether the query can hit)."""
    best = sim.masked_fill(~match, float("-inf")).amax(1, keepdim=True)       # [q, 1]
    rank = ((sim >= best) & ~match).sum(1)                                    # items ahead of it
    # A query with no match, or whose scores are not all finite (NaN compares false with all), never hits: a mask,
    # not a rank of "every item" (that rank is below a k past the number of items, R@10 of 9 clips).
    return rank, match.any(1) & sim.isfinite().all(1)


def _recalls(rank: torch.Tensor, can_hit: torch.Tensor, ks) -> dict[int, float]:
    return {k: float(((rank < k) & can_hit).float().mean()) for k in ks}


def recall_at_k(sim: torch.Tensor, query_groups: torch.Tensor, item_groups: torch.Tensor,
                ks=(1, 5, 10)) -> dict[int, float]:
    """sim [Q, I]; a query hits at k when its best-scored item of the query's group ranks within
    the top k. Ties count against the model: that item's rank is the number of other items
    scoring at least as high (a topk would break ties by item order, and a collapsed model
    whose embeddings are all equal would score by how the split happens to be ordered). A query whose scores are
    not all finite (a diverged model's) misses."""
    parts = [_row_ranks(sim[a:b], item_groups[None, :] == query_groups[a:b, None])
             for a, b in row_blocks(sim.shape[0], sim.shape[1])]
    return _recalls(torch.cat([r for r, _ in parts]), torch.cat([h for _, h in parts]), ks)


def _both_ways(text: torch.Tensor, video: torch.Tensor, groups: torch.Tensor,
               block_elements: int) -> tuple[tuple, tuple]:
    """(rank, can_hit) of every text query (rows of text @ video.T) and every video query (its columns), the
    similarity computed a block of text rows at a time, twice: the first pass finds each video's best-scored
    matching text (over all rows), the second counts the texts ahead of it and ranks the rows."""
    blocks = row_blocks(text.shape[0], video.shape[0], block_elements)

    def scored():
        for a, b in blocks:
            with torch.autocast(text.device.type, enabled=False):  # fp32 ranks under the evaluation's autocast too
                sim = text[a:b] @ video.T                                     # [q, N]
            yield sim, groups[None, :] == groups[a:b, None]

    n = video.shape[0]
    # Every result preallocated and updated in place: a small tensor kept per block (the ranks of its rows, a
    # running maximum) would sit on the heap between blocks' temporaries, and the heap grew by ~30 MB a block.
    col_best = torch.full((n,), float("-inf"), device=video.device)
    col_ok = torch.ones(n, dtype=torch.bool, device=video.device)
    col_any = torch.zeros(n, dtype=torch.bool, device=video.device)
    for sim, match in scored():
        torch.maximum(col_best, sim.masked_fill(~match, float("-inf")).amax(0), out=col_best)
        col_ok &= sim.isfinite().all(0)
        col_any |= match.any(0)
    col_rank = torch.zeros(n, dtype=torch.int64, device=video.device)
    t2v = (torch.empty(text.shape[0], dtype=torch.int64, device=video.device),
           torch.empty(text.shape[0], dtype=torch.bool, device=video.device))
    for (a, b), (sim, match) in zip(blocks, scored()):
        col_rank += ((sim >= col_best) & ~match).sum(0)
        for out, x in zip(t2v, _row_ranks(sim, match)):
            out[a:b] = x
    return t2v, (col_rank, col_any & col_ok)


def retrieval_metrics(video: torch.Tensor, text: torch.Tensor, groups: torch.Tensor, *,
                      block_elements: int = BLOCK_ELEMENTS) -> dict[str, float]:
    """video, text: L2-normalised `[N, D]` embeddings of the same N clips, in order;
    groups [N]: caption group ids (`caption_groups`). `block_elements`: pairs scored at a time (the memory)."""
    if video.shape != text.shape or video.shape[0] != groups.shape[0]:
        raise ValueError(f"retrieval needs matching [N, D] video/text embeddings and N group ids, got "
                         f"{tuple(video.shape)}, {tuple(text.shape)} and {tuple(groups.shape)}")
    t2v, v2t = _both_ways(text.float(), video.float(), groups, block_elements)
    out = {}
    for name, (rank, can_hit) in (("t2v", t2v), ("v2t", v2t)):
        for k, r in _recalls(rank, can_hit, (1, 5, 10)).items():
            out[f"{name}_R@{k}"] = r
    sizes = torch.bincount(groups).float()
    out["chance_R@1"] = float((sizes[groups] / groups.shape[0]).mean())
    # Captions whose token sequences are equal count as one (a tokenizer that drops digits or case can merge
    # captions that differ as text): fewer of them than clips raises the chance level above.
    out["captions"] = int((sizes > 0).sum())
    return out
