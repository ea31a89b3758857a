"""Zero-shot classification with a video-text (LvT) model: each class is a text prompt, a clip's class the
prompt its video embedding is closest to (the paper's zero-shot protocol, as for CLIP).

A class's embedding is the mean of its prompts' L2-normalised text embeddings (one prompt per template, the
class name in the template's `{}`), normalised again: several templates ("a video of {}", "{}") average out
the wording, the usual prompt ensemble. Scores are cosine similarities; ties rank against the model as in
train/retrieval.py.
"""
from __future__ import annotations

import contextlib

import torch

from videoprism.train.data import trim_text


def check_templates(templates: list[str]) -> list[str]:
    """Each template names where the class goes with one `{}`; no template twice (it would weigh double)."""
    if not templates:
        raise ValueError("no prompt template; pass at least one, e.g. --template 'a video of {}.'")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r}: needs exactly one '{{}}' where the class name goes, e.g. "
                             "'a video of {}.'")
    dup = sorted({t for t in templates if templates.count(t) > 1})
    if dup:
        raise ValueError(f"prompt template {dup[0]!r} given twice; each template once")
    return templates


def check_classes(classes: list[str], source: str) -> list[str]:
    """Class names in label-id order: non-empty, distinct (two classes with one prompt cannot be told apart)."""
    if not classes:
        raise ValueError(f"{source}: no class name; give one per label id, in id order")
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{source}: class {i} is {c!r}; every class needs a non-empty name")
    seen: dict[str, int] = {}
    for i, c in enumerate(classes):
        if c.strip() in seen:
            raise ValueError(f"{source}: classes {seen[c.strip()]} and {i} are both named {c.strip()!r}; name each "
                             "class once")
        seen[c.strip()] = i
    return [c.strip() for c in classes]


def check_classes_tokenized(classes: list[str], tokenizer) -> None:
    """Class names that the tokenizer reads alike ("Left" and "left" to one that lowercases, "class1" and "class2" to
    one that drops digits) give every template the same prompt: their classes always tie, and a tie counts against
    the model."""
    ids, pads = tokenizer(classes)
    seen: dict[tuple, int] = {}
    for i in range(len(classes)):
        key = tuple(ids[i][pads[i] == 0].tolist())
        if key in seen:
            raise ValueError(f"classes {seen[key]} ({classes[seen[key]]!r}) and {i} ({classes[i]!r}) are the same "
                             "text to the tokenizer (it lowercases, or drops characters it does not know): their "
                             "prompts cannot be told apart; name them differently")
        seen[key] = i


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: list[str], *, device: torch.device | str, bf16: bool = False,
                    batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """`[len(texts), D]` float32 on the CPU, L2-normalised, row i for text i (`model`: a FactorizedVideoCLIP;
    `bf16`: its text tower under bf16 autocast, as training's; `progress`: a bar with texts/s)."""
    from videoprism.progress import progress_bar

    dev = torch.device(device)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    out = []
    with progress_bar(total=len(texts), unit="text", desc="embed-text", disable=not progress, smoothing=0) as bar, amp:
        for i in range(0, len(texts), batch_size):
            ids, pads = trim_text(*tokenizer(texts[i:i + batch_size]))
            out.append(model.encode_text(ids.to(dev), pads.to(dev)).float().cpu())
            bar.update(ids.shape[0])
    return torch.cat(out)


def class_embeddings(model, tokenizer, classes: list[str], templates: list[str], *, device: torch.device | str,
                     bf16: bool = False) -> torch.Tensor:
    """`[C, D]` float32 on the CPU, L2-normalised: per class, the normalised mean of its prompts' normalised text
    embeddings (text_embeddings)."""
    prompts = [t.replace("{}", c) for c in classes for t in templates]
    emb = text_embeddings(model, tokenizer, prompts, device=device, bf16=bf16)
    return torch.nn.functional.normalize(emb.view(len(classes), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def video_embeddings(model, video: torch.Tensor, *, batch_size: int = 32,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """L2-normalised video embeddings of decoded clips: uint8 `[N, T, H, W, 3]` -> float32 `[N, D]` on the CPU."""
    model.eval()
    return torch.cat([model.encode_video(video[i:i + batch_size].to(device))[0].float().cpu()
                      for i in range(0, video.shape[0], batch_size)])


def zero_shot_metrics(video: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """video `[N, D]` and classes `[C, D]` L2-normalised, labels `[N]` class ids in [0, C), names the C classes'.
    A clip's rank of its class is the number of other classes scoring at least as high (a tie counts against the
    model: a collapsed model does not score by class order; a clip with a non-finite score, a diverged model's,
    misses). -> top-1 and top-5 accuracy (top-5 only for more than 5 classes), mean per-class accuracy (over the
    classes the clips have), chance (1 / C), the majority class's share, and per class its clips and top-1
    accuracy."""
    C = classes.shape[0]
    if len(names) != C:
        raise ValueError(f"{len(names)} class names for {C} class embeddings")
    if labels.numel() == 0:
        raise ValueError("zero-shot classification needs at least one labelled clip")
    if int(labels.min()) < 0 or int(labels.max()) >= C:
        raise ValueError(f"label ids must be in [0, {C}) for {C} classes, got {int(labels.min())}..{int(labels.max())}")
    with torch.autocast(video.device.type, enabled=False):
        sim = video.float() @ classes.float().T                                   # [N, C]
    own = sim.gather(1, labels[:, None])                                          # [N, 1]
    others = torch.ones_like(sim, dtype=torch.bool).scatter_(1, labels[:, None], False)
    rank = ((sim >= own) & others).sum(1)                                         # classes ahead of its own
    rank = torch.where(sim.isfinite().all(1), rank, C)  # a NaN compares false with everything: a miss, not a hit
    counts = torch.bincount(labels, minlength=C)
    hits = torch.bincount(labels, weights=(rank < 1).double(), minlength=C)
    present = counts > 0
    out = {"top1": float((rank < 1).double().mean()),
           "mean_class_accuracy": float((hits[present] / counts[present]).mean()),
           "chance": 1.0 / C, "majority": float(counts.max() / labels.numel()), "clips": int(labels.numel()),
           "classes": C,
           "per_class": {n: {"clips": int(counts[i]), "top1": float(hits[i] / counts[i]) if counts[i] else None}
                         for i, n in enumerate(names)}}
    if C > 5:
        out["top5"] = float((rank < 5).double().mean())
    return out
