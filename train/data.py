"""Training data sources: a source yields this rank's micro-batches and has a state for
checkpoints.

* `RandomClips`: seeded random clips and captions, generated per global sample index, so a
  run on any number of ranks sees the same global batch (tests, benchmarks).
* `ManifestData`: the video loader of `videoprism.data` on one or more manifests;
  several datasets alternate by weight, one per step, the same on every rank (the
  contrastive loss gathers embeddings across ranks, so all ranks must agree on the clip
  shape).
* `CachedClips`: a small dataset decoded once (eval transform) and served from memory in
  a seeded order per epoch: the CPU demo, where decoding every step would cost more than
  the model.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from videoprism.data.cores import available_memory
from videoprism.data.text import MAX_TEXT_LENGTH, Tokenizer
from videoprism.paths import LONGEST_PATH, shown
from videoprism.train.config import DataConfig, check_field
from videoprism.train.parallel import all_reduce_max
from videoprism.train.seeds import DATASET, EPOCH, FLIP, SAMPLE, derive_seed


class RandomClips:
    """Random uint8 clips `[b, T, R, R, 3]` and captions of random length; sample `g` of the
    global stream depends only on (seed, g)."""

    strided_ranks = False  # rank r of w: rows [r*b, (r+1)*b) of each global micro-batch (train.step_masks)

    def __init__(self, *, micro_batch: int, rank: int, world: int, frames: int, resolution: int, vocab: int,
                 seed: int, text_length: int = MAX_TEXT_LENGTH):
        self.micro, self.rank, self.world = micro_batch, rank, world
        self.frames, self.resolution, self.vocab, self.seed = frames, resolution, vocab, seed
        self.text_length = text_length
        self.calls = 0

    def _sample(self, g: int):
        gen = torch.Generator().manual_seed(derive_seed(SAMPLE, self.seed, g))
        R = self.resolution
        video = torch.randint(0, 256, (self.frames, R, R, 3), generator=gen, dtype=torch.uint8)
        ids = torch.randint(1, self.vocab, (self.text_length,), generator=gen)
        n = int(torch.randint(1, self.text_length + 1, (1,), generator=gen))
        pad = (torch.arange(self.text_length) >= n).float()
        return video, ids * (1 - pad.long()), pad

    def next_batch(self, step: int) -> dict:
        first = (self.calls * self.world + self.rank) * self.micro
        self.calls += 1
        video, ids, pad = zip(*(self._sample(first + i) for i in range(self.micro)))
        return {"video": torch.stack(video), "text_ids": torch.stack(ids), "text_paddings": torch.stack(pad)}

    def state_dict(self) -> dict:
        return {"samples": self.calls * self.world * self.micro}

    def load_state_dict(self, state: dict) -> None:
        # The global sample count, not the calls: a resume with another train.micro_batch makes calls of another
        # size (its call count replayed or skipped samples).
        self.load_resharded([state])

    def load_resharded(self, states: list[dict]) -> None:
        """From every rank's state of a run with another number of ranks: the same global stream goes on."""
        self.calls = _global_position(states, "samples", self.world * self.micro) // (self.world * self.micro)


def parse_datasets(spec: str, default_frames: int) -> list[tuple[str, float, int]]:
    """'a.jsonl:2,b.jsonl:1:1' -> [(path, weight, frames)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = _split_entry(item)
        try:
            weight = float(parts[1]) if len(parts) > 1 else 1.0
            frames = int(parts[2]) if len(parts) > 2 else default_frames
        except ValueError:
            raise ValueError(f"data.train entry {item!r}: WEIGHT must be a number and FRAMES an int") from None
        if not 0 < weight < math.inf or frames < 1:  # nan and inf too: they broke the sampling at the first step
            raise ValueError(f"data.train entry {item!r}: WEIGHT must be > 0 and FRAMES >= 1")
        if not os.path.exists(parts[0]):
            raise FileNotFoundError(f"data.train manifest {parts[0]!r} does not exist; generate the synthetic "
                                    "data (videoprism data synth --out DIR --num N) or fix the path")
        out.append((parts[0], weight, frames))
    if not out:
        raise ValueError("data.train is empty; pass data.train=PATH/train.jsonl (or data.source=random)")
    return out


def _split_entry(item: str) -> list[str]:
    """A data.train entry's [PATH, WEIGHT, FRAMES] (as given): its path is the part that names a file, so that one
    holding ':' ("clips 12:30/train.jsonl", a shard "take:2.tar") is one path, not a path and a weight (split at
    every ':', it was refused or misread). An entry naming no file takes its trailing numbers for the weight and
    frames, whose path the caller then names as missing."""
    cuts = [item.rsplit(":", n) for n in (2, 1)]
    if os.path.exists(item):
        return [item]
    for parts in cuts:
        if os.path.isfile(parts[0]):
            return parts
    for parts in cuts:
        if len(parts) > 1 and all(_is_number(p) for p in parts[1:]):
            return parts
    return [item]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ManifestData:
    """One loader per dataset; step `s` reads from the dataset drawn with a generator seeded
    by (seed, s), identical on every rank and after a resume. The ranks (`dist_`; None: one process) go on to a
    loader's next epoch together (`next_batch`)."""

    # The loader deals an epoch's samples round-robin: rank r of w holds every w-th clip of a global
    # micro-batch from r (train.step_masks keys the masks by that order).
    strided_ranks = True

    def __init__(self, loaders: list, weights: list[float], seed: int, dist_=None):
        self.loaders, self.seed, self.dist = loaders, seed, dist_
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.iters = [None] * len(loaders)

    def dataset_at(self, step: int) -> int:
        if len(self.loaders) == 1:
            return 0
        gen = torch.Generator().manual_seed(derive_seed(DATASET, self.seed, step))
        return int(torch.multinomial(self.weights, 1, generator=gen))

    def next_batch(self, step: int) -> dict:
        """This rank's next micro-batch of the step's dataset. Where one rank's share of an epoch runs out, every
        rank goes on to the next epoch (the others' batches of the old one dropped, as the tail of an epoch is): a
        bad sample skipped on one rank leaves that rank a batch short, and it went on into the next epoch alone, a
        step before the others (or more, as skips added up), whose checkpoints then held ranks in two epochs and
        refused to resume on another number of ranks. Collective: one flag per call, on the host."""
        i = self.dataset_at(step)
        for _ in range(2):
            batch = self._pull(i)
            if not all_reduce_max([batch is None], self.dist)[0]:
                return batch
            if self.iters[i] is not None:  # this rank's epoch had more: left, with its iteration
                self.iters[i].close()
                self.iters[i] = None
                self.loaders[i].end_epoch()
        name = getattr(self.loaders[i], "source_name", "") or f"number {i}"
        raise ValueError(f"data.train's {name} yields no batch: fewer good samples than one micro-batch; lower "
                         "train.global_batch (or train.micro_batch) or add samples")

    def _pull(self, i: int) -> dict | None:
        """Loader `i`'s next batch, None at the end of this rank's share of its epoch (the loader then is at the
        next one)."""
        if self.iters[i] is None:
            self.iters[i] = iter(self.loaders[i])
        try:
            return next(self.iters[i])
        except StopIteration:
            self.iters[i] = None
            return None

    def drain_rejects(self) -> list[tuple[str, str]]:
        return [r for ld in self.loaders for r in ld.drain_rejects()]

    def state_dict(self) -> dict:
        return {"loaders": [ld.state_dict() for ld in self.loaders]}

    def _check_datasets(self, state: dict) -> None:
        if len(state["loaders"]) != len(self.loaders):
            raise ValueError(f"the checkpoint's data position is of {len(state['loaders'])} training manifests and "
                             f"data.train lists {len(self.loaders)}: resume with the run's data.train "
                             "(--config OUT_DIR/config.json)")

    def load_state_dict(self, state: dict) -> None:
        self._check_datasets(state)
        for ld, s in zip(self.loaders, state["loaders"]):
            ld.load_state_dict(s)
        self.iters = [None] * len(self.loaders)

    def load_resharded(self, states: list[dict]) -> None:
        """From every rank's state of a run with another number of ranks (VideoTextLoader.load_resharded)."""
        self._check_datasets(states[0])
        for i, ld in enumerate(self.loaders):
            ld.load_resharded([s["loaders"][i] for s in states])
        self.iters = [None] * len(self.loaders)


_DECODED: dict[tuple, dict] = {}


def decode_all(manifest: str, *, frames: int, resolution: int, tokenizer: Tokenizer | None,
               dc: DataConfig, shard: tuple[int, int] | None = None) -> tuple[dict, list[tuple[str, str]]]:
    """Every clip of `manifest` (eval transform) -> ({"video" uint8 [N, T, R, R, 3], "label_<name>", "index" [N]
    (the clip's sample index in the manifest), with a tokenizer "text_ids" and "text_paddings"}, the (name,
    reason) of the skipped lines and clips), decoded with the workers, bad-sample share and decode
    timeout of `dc`. Every rank decodes the whole set and keeps the clips every rank decoded.
    `shard=(rank, world)`: this rank's share instead, every world-th clip from `rank` on (possibly none
    on a rank; the bad-sample share counts within the share).
    Without a tokenizer (stage 2, probes) video-only lines are clips too; with one, a clip without a caption is
    skipped as a bad sample (NO_CAPTION), within the manifest's bad-sample share. Memoised per process (file,
    mtime, frames, resolution, shard, bad-sample share), the captions tokenized per tokenizer: the demo's stages
    and probes decode once."""
    if shard is not None and shard[1] == 1:
        shard = None  # the whole set: one decode for a one-process run's validation and probes
    # The share too: a set decoded under a looser one must not pass a stricter caller's check unseen.
    key = (os.path.abspath(manifest), os.path.getmtime(manifest), frames, resolution, shard, dc.max_bad_share)
    text_key = None if tokenizer is None else (*key, tokenizer.model_path, tokenizer.max_length)
    if text_key is not None and text_key not in _DECODED:
        # Lines without a caption count against the bad-sample share of the whole manifest, as a reader that needs
        # captions counts them: the same verdict on every rank (a rank's share alone could pass on one rank and
        # fail on another, which would leave the others waiting in a collective), and before any decoding.
        from videoprism.data.manifest import read_source

        read_source(manifest, max_bad_share=dc.max_bad_share, captions=True)
    fresh = key not in _DECODED  # decoded by this call: no caller holds its tensors yet
    if fresh:
        _DECODED[key] = _decode_all(manifest, frames=frames, resolution=resolution, dc=dc, shard=shard)
    clips, captions, names, rejects = _DECODED[key]
    if tokenizer is None:
        return clips, rejects
    if text_key not in _DECODED:
        if any(c is None for c in captions):
            # The clips with captions are a copy: the set without text is dropped from the memo rather than held
            # twice (a reader without a tokenizer would decode again).
            del _DECODED[key]
        _DECODED[text_key] = _with_text(clips, captions, names, rejects, tokenizer, in_place=fresh)
    return _DECODED[text_key]


def _with_text(clips: dict, captions: list, names: list, rejects: list, tokenizer: Tokenizer, *,
               in_place: bool = False) -> tuple[dict, list]:
    """The clips with their tokenized captions; those without a caption skipped and reported (their share of the
    manifest checked by decode_all). `in_place`: the kept clips are moved up within `clips`' tensors (which no one
    else holds) rather than copied out of them (the whole set twice)."""
    from videoprism.data.manifest import NO_CAPTION

    missing = [name for name, c in zip(names, captions) if c is None]
    if missing:
        keep = torch.tensor([c is not None for c in captions], dtype=torch.bool)
        clips = _keep_rows(clips, keep) if in_place else {k: v[keep] for k, v in clips.items()}
        captions = [c for c in captions if c is not None]
        rejects = [*rejects, *((name, NO_CAPTION) for name in missing)]
    ids, pads = tokenizer(captions)
    return {**clips, "text_ids": ids, "text_paddings": pads}, rejects


def _eval_loader(manifest: str, *, frames: int, resolution: int, dc: DataConfig, rank: int, world: int,
                 batch_size: int):
    """The loader of `manifest`'s share (every world-th clip from `rank` on, in manifest order) through the eval
    transform, without text (the callers tokenize the captions: _with_text), with the workers, bad-sample share
    and decode timeout of `dc`."""
    from videoprism.data.loader import build_loader

    return build_loader(manifest, num_frames=frames, resolution=resolution, batch_size=batch_size, train=False,
                        rank=rank, world_size=world, tokenizer=None, num_workers=dc.workers,
                        max_bad_share=dc.max_bad_share, decode_timeout=dc.decode_timeout, backend="pyav")


def _tensors(batch: dict) -> dict[str, torch.Tensor]:
    """A loader batch's tensors (video, index, labels): its captions, names and datasets are lists."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _decode_all(manifest, *, frames, resolution, dc: DataConfig, shard=None) -> tuple[dict, list, list, list]:
    """-> (clips without text, each clip's caption (None: a video-only line), each clip's name, rejects)."""
    rank, world = shard or (0, 1)
    # Small batches: the loader holds a batch's clips and their stack together while it collates (64 base clips:
    # 0.5 GB on top of the held set; 8: 64 MB). The clips are the same at any batch size.
    batch_size = 8
    loader = _eval_loader(manifest, frames=frames, resolution=resolution, dc=dc, rank=rank, world=world,
                          batch_size=batch_size)
    held: dict[str, torch.Tensor] = {}
    rows = 0
    names: dict[int, str] = {}
    captions: dict[int, str | None] = {}
    try:
        room = len(loader) * batch_size  # the share's clips at most (fewer if some fail), up to a batch's more
        for batch in loader:
            rows = _write_rows(held, _tensors(batch), rows, room)
            names.update(zip(batch["index"].tolist(), batch["path"]))
            captions.update(zip(batch["index"].tolist(), batch["caption"]))
        if not names and shard is None:  # a share may be empty: the whole set is checked below
            raise ValueError(f"{shown(manifest, LONGEST_PATH)}: no readable clip")
    except Exception:  # every rank must still reach the gather below, or the others wait there forever
        _gather_ids(None)
        raise
    clips = {k: v[:rows] for k, v in held.items()} if held else {"index": torch.zeros(0, dtype=torch.int64)}
    everyone = _gather_ids(clips["index"])
    failed = [r for r, got in enumerate(everyone) if got is None]
    if failed:
        raise ValueError(f"{shown(manifest, LONGEST_PATH)}: rank(s) {failed} could not decode it (their error is in "
                         "their log)")
    if shard is None:
        clips, rejects = _clips_every_rank_has(clips, clips["index"], names, loader.drain_rejects(), everyone,
                                               manifest)
    elif not any(everyone):
        raise ValueError(f"{shown(manifest, LONGEST_PATH)}: no readable clip")
    else:
        rejects = loader.drain_rejects()
    ids = clips["index"].tolist()
    return clips, [captions[i] for i in ids], [names[i] for i in ids], rejects


def _write_rows(held: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], rows: int, room: int) -> int:
    """Writes `batch` into `held`'s tensors from row `rows` on (each allocated for `room` rows at the first batch)
    -> the rows written. A decode that concatenated its batches at the end held both, twice the set at its peak;
    the rows of skipped clips are never written, so their pages are never touched (not resident)."""
    for k, v in batch.items():
        if k not in held:
            held[k] = torch.empty((room, *v.shape[1:]), dtype=v.dtype)
        held[k][rows:rows + v.shape[0]] = v
    return rows + batch["index"].shape[0]


def _gather_ids(ids: torch.Tensor | None) -> list:
    """The sample ids each rank decoded ([ids] in one process); None for a rank that failed."""
    import torch.distributed as dist

    from videoprism.train.parallel import multi_rank

    mine = None if ids is None else ids.tolist()
    if not multi_rank():
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _clips_every_rank_has(clips: dict, ids: torch.Tensor, names: dict[int, str], rejects: list,
                          everyone: list[list[int]], manifest: str) -> tuple[dict, list]:
    """Only the clips every rank decoded: a file that failed or timed out on one rank alone (a flaky mount,
    a decode near data.decode_timeout) is dropped on all, so the ranks hold the same rows in the same order
    (under FSDP every rank must run the same evaluation forwards; a cached training set is indexed by row). The
    kept rows are moved up within `clips`' tensors (_decode_all's own)."""
    common = set.intersection(*map(set, everyone))
    keep = torch.tensor([i in common for i in ids.tolist()], dtype=torch.bool)
    if bool(keep.all()):
        return clips, rejects
    if not bool(keep.any()):
        raise ValueError(f"{shown(manifest, LONGEST_PATH)}: no clip decoded on every rank")
    dropped = [(names[i], "skipped on another rank (decoded here)") for i in ids[~keep].tolist()]
    return _keep_rows(clips, keep), [*rejects, *dropped]


def _keep_rows(clips: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of `clips` where `keep`, moved up in place (each to a row at or before its own, in order, so none is
    overwritten before it moves): a copy of the kept rows held the whole set twice at its peak."""
    rows = keep.nonzero().flatten().tolist()
    for v in clips.values():
        for to, row in enumerate(rows):
            if to != row:
                v[to] = v[row]
    return {k: v[:len(rows)] for k, v in clips.items()}


class CachedClips:
    """Decoded clips served in a seeded permutation per epoch. The position counts global
    samples, so rank r of w gets rows [r*b, (r+1)*b) of every global micro-batch of w*b
    clips: the same global batches on any number of ranks. `flip_prob`: data.flip_prob, the share of
    rows mirrored horizontally, drawn afresh each epoch (the streamed loader draws a flip per sample and
    epoch; the clips are decoded once, without it)."""

    strided_ranks = False

    def __init__(self, clips: dict, *, micro_batch: int, rank: int, world: int, seed: int,
                 rejects: list[tuple[str, str]] = (), flip_prob: float = 0.0):
        self.clips, self.micro, self.rank, self.world, self.seed = clips, micro_batch, rank, world, seed
        self.flip_prob = flip_prob
        self._unreported = list(rejects)  # skipped when the clips were decoded
        self.n = clips["video"].shape[0]
        if self.n < micro_batch * world:
            raise ValueError(f"{self.n} cached clips are fewer than one global micro-batch ({micro_batch * world}); "
                             "lower train.global_batch (or train.micro_batch) or add clips")
        self.epoch, self.position = 0, 0

    def _order(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(EPOCH, self.seed, self.epoch)))

    def next_batch(self, step: int) -> dict:
        g = self.micro * self.world
        if self.position + g > self.n:  # drop the tail of the epoch
            self.epoch, self.position = self.epoch + 1, 0
        lo = self.position + self.rank * self.micro
        idx = self._order()[lo:lo + self.micro]
        self.position += g
        batch = {k: v[idx] for k, v in self.clips.items()}  # copies: the cached rows stay as decoded
        if self.flip_prob > 0:
            flip = self._flips()[idx]
            batch["video"][flip] = batch["video"][flip].flip(3)  # [B, T, H, W, 3]: along W
        return batch

    def _flips(self) -> torch.Tensor:
        """Which rows this epoch mirrors: one draw per row, whatever rank serves it."""
        gen = torch.Generator().manual_seed(derive_seed(FLIP, self.seed, self.epoch))
        return torch.rand(self.n, generator=gen) < self.flip_prob

    def drain_rejects(self) -> list[tuple[str, str]]:
        out, self._unreported = self._unreported, []
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def load_resharded(self, states: list[dict]) -> None:
        """From every rank's state of a run with another number of ranks: the position is global already."""
        self.epoch = int(states[0]["epoch"])
        self.position = _global_position(states, "position", self.micro * self.world)


def _global_position(states: list[dict], key: str, unit: int) -> int:
    """`key` of the ranks' states (one global count, the same on every rank) as a whole number of this run's
    global micro-batches of `unit` samples."""
    if any(key not in s for s in states):
        raise ValueError(f"the checkpoint's data state has no global position ('{key}': written before resuming "
                         f"on another number of ranks was possible); resume with {len(states)} processes")
    values = {(int(s.get("epoch", 0)), int(s[key])) for s in states}
    if len(values) != 1:
        raise ValueError(f"the checkpoint's ranks disagree on the data position ({sorted(values)})")
    value = values.pop()[1]
    if value % unit:
        raise ValueError(f"the checkpoint's data position ({value} samples) is not a whole number of this run's "
                         f"global micro-batches of {unit}: keep train.global_batch (and a train.micro_batch "
                         "that divides it on the new number of ranks)")
    return value


def tokenizer_for(cfg) -> Tokenizer | None:
    """The caption tokenizer: data.tokenizer, else spm.model next to the first training manifest."""
    if cfg.data.source == "random":
        return None
    path = cfg.data.tokenizer
    if not path:
        first = parse_datasets(cfg.data.train, cfg.model.num_frames)[0][0]
        path = os.path.join(os.path.dirname(os.path.abspath(first)), "spm.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.tokenizer is not set and {path} (the default: spm.model next to the first "
                                    "data.train manifest) does not exist; set data.tokenizer=PATH.model")
    return Tokenizer(path)


def build_train_data(cfg, dist_, tokenizer: Tokenizer | None, *, micro_batch: int, vocab: int):
    dc, seed = cfg.data, cfg.train.seed
    check_field("data", dc, "source")
    if dc.source == "random":
        return RandomClips(micro_batch=micro_batch, rank=dist_.rank, world=dist_.world, frames=cfg.model.num_frames,
                           resolution=cfg.model.resolution, vocab=vocab, seed=seed)
    datasets = parse_datasets(dc.train, cfg.model.num_frames)
    if dc.cache:
        if len(datasets) > 1:
            raise ValueError("data.cache=true takes one training manifest; set data.cache=false to alternate datasets")
        path, _, frames = datasets[0]
        clips, rejects = decode_all(path, frames=frames, resolution=cfg.model.resolution, tokenizer=tokenizer,
                                    dc=dc)
        return CachedClips(clips, micro_batch=micro_batch, rank=dist_.rank, world=dist_.world, seed=seed,
                           rejects=rejects, flip_prob=dc.flip_prob)
    from videoprism.data.loader import build_loader

    loaders = [build_loader(path, num_frames=frames, resolution=cfg.model.resolution, batch_size=micro_batch,
                            train=True, seed=seed, rank=dist_.rank, world_size=dist_.world, tokenizer=tokenizer,
                            device=dist_.device, num_workers=dc.workers, max_bad_share=dc.max_bad_share,
                            flip_prob=dc.flip_prob, decode_timeout=dc.decode_timeout)
               for path, _, frames in datasets]
    return ManifestData(loaders, [w for _, w, _ in datasets], seed, dist_)


def build_val_batches(cfg, tokenizer: Tokenizer | None, *, batch_size: int,
                      dist_) -> tuple[list[dict] | StreamedVal | None, list[tuple[str, str]]]:
    """(batches, the (name, reason) of the clips and lines skipped) of this rank's share of the validation split
    (None, [] without data.val): every world-th clip from its
    rank on, decoded once, in batches of `batch_size` with each clip's manifest index in "index". Each
    rank decodes, holds and scores 1/world of the split; the evaluation gathers the results
    (parallel.gather_rows). Every rank gets the same number of batches, as the evaluation's forwards
    are collective under FSDP: a rank with fewer ends with idle ones (a black clip, a one-token caption,
    index -1), whose results are dropped. data.val_cache=false: a StreamedVal, which decodes those batches
    again at each evaluation and holds none (its skips come from its drain_rejects, after the first)."""
    if not cfg.data.val or cfg.data.source == "random":
        return None, []
    if not cfg.data.val_cache:
        return StreamedVal(cfg, tokenizer, batch_size=batch_size, dist_=dist_), []
    T, R = cfg.model.num_frames, cfg.model.resolution
    clips, rejects = decode_all(cfg.data.val, frames=T, resolution=R, tokenizer=tokenizer, dc=cfg.data,
                                shard=(dist_.rank, dist_.world))
    n = clips["index"].shape[0]
    batches = [{k: v[i:i + batch_size] for k, v in clips.items()} for i in range(0, n, batch_size)]
    rounds = all_reduce_max([len(batches)], dist_)[0]
    if rounds == len(batches):
        return batches, rejects
    idle = _idle_batch(batch_size, T, R, text=tokenizer is not None)
    return batches + [idle] * (rounds - len(batches)), rejects


# The share of the available memory the held decoded sets may take (3/4): the model, the optimizer, the loader
# workers and the batch being decoded need the rest. The decode writes into the held tensors, about the set at its
# peak (it concatenated its batches at the end before, twice the set: the share was half then).
HELD_SHARE = (3, 4)


class _Held(NamedTuple):
    """A decoded set a run holds for its whole length."""
    field: str
    path: str
    flag: str  # true: held
    frames: int
    whole: bool  # every rank holds all of it (else its share)
    unheld: str  # what flag=false does instead
    fewer: str


def _held_sets(cfg) -> list[_Held]:
    dc, held = cfg.data, []
    if dc.source == "random":
        return held
    datasets = parse_datasets(dc.train, cfg.model.num_frames) if dc.cache else []
    if len(datasets) == 1:  # more is refused by build_train_data
        held.append(_Held("data.train", datasets[0][0], "data.cache", datasets[0][2], True,
                          "each step's clips decoded as read, nothing held", "fewer training clips"))
    if dc.val and dc.val_cache:
        held.append(_Held("data.val", dc.val, "data.val_cache", cfg.model.num_frames, False,
                          "decoded at each evaluation, nothing held", "fewer validation clips"))
    return held


def check_held_memory(cfg) -> None:
    """data.cache holds the decoded training manifest for the whole run, on every rank all of it (LOCAL_WORLD_SIZE
    copies on a node); data.val_cache each rank's share of data.val (the ranks of a node together: LOCAL_WORLD_SIZE
    / WORLD_SIZE of the split, all of it on one node); T x R x R x 3 bytes a clip. A set past the host's memory
    killed the run at its start, or swapped, with no word of why. Stop before anything is decoded when the held
    sets together would take more than HELD_SHARE of the memory available. No check where the memory cannot be
    read (not Linux)."""
    held = _held_sets(cfg)
    have = available_memory() if held else None
    if have is None:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = min(world, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    R, said, need = cfg.model.resolution, [], 0
    for h in held:
        clips, per_clip = _clips_at_most(h.path, cfg.data), h.frames * R * R * 3
        size = local * (clips if h.whole else -(-clips // world)) * per_clip
        ranks = (f"{local} ranks each all of it, " if h.whole else f"{local} of {world} ranks, ") if world > 1 else ""
        said.append(f"{h.field}={shown(h.path, LONGEST_PATH)}: held decoded ({h.flag}=true), its {clips} clips take "
                    f"{size / 2**30:.1f} GiB of this node's memory ({ranks}{per_clip / 2**20:.1f} MiB a "
                    f"{h.frames}x{R}x{R} clip)")
        need += size
    part, of = HELD_SHARE
    if need * of > have * part:
        fixes = ", or ".join(f"set {h.flag}=false ({h.unheld}) or use {h.fewer}" for h in held)
        raise ValueError(f"{'; '.join(said)}: {'together ' if len(held) > 1 else ''}more than {part}/{of} of the "
                         f"{have / 2**30:.1f} GiB available (the model, the optimizer and the loader workers need "
                         f"the rest); {fixes}")


def _clips_at_most(path: str, dc: DataConfig) -> int:
    """The clips `path` can hold, cheaply: a manifest's lines (blank and bad ones too), a shard's samples."""
    from videoprism.data.manifest import is_shard, read_source

    if is_shard(path):
        return len(read_source(path, max_bad_share=dc.max_bad_share, captions=False)[0])
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")  # a last line without its newline


def _idle_batch(batch_size: int, frames: int, resolution: int, *, text: bool) -> dict:
    """A batch a rank runs while another still scores its share: black clips, index -1 (its results dropped)."""
    R = resolution
    idle = {"video": torch.zeros(batch_size, frames, R, R, 3, dtype=torch.uint8),
            "index": torch.full((batch_size,), -1, dtype=torch.int64)}
    if text:
        # A one-token caption: every causal attention row keeps a key, as a real caption's rows do (all keys padded
        # is an input no real batch has, and no kernel needs to handle).
        pads = torch.ones(batch_size, MAX_TEXT_LENGTH)
        pads[:, 0] = 0.0
        idle.update(text_ids=torch.zeros(batch_size, MAX_TEXT_LENGTH, dtype=torch.int64), text_paddings=pads)
    return idle


class StreamedVal:
    """data.val_cache=false: this rank's share of the validation split decoded again at each pass (an evaluation)
    into the batches build_val_batches holds otherwise: the same loader, eval transform, order, captions and batch
    size, then idle batches while another rank still has clips (one host flag a batch, so that FSDP's collective
    forwards stay in step). Nothing is held between passes. The clips the first pass skipped are reported once
    (drain_rejects); a rank whose decode fails ends the pass on every rank, not in a collective the others wait in."""

    def __init__(self, cfg, tokenizer: Tokenizer | None, *, batch_size: int, dist_):
        from videoprism.data.manifest import read_source

        self.manifest, self.dc, self.tokenizer, self.dist = cfg.data.val, cfg.data, tokenizer, dist_
        self.frames, self.resolution, self.batch_size = cfg.model.num_frames, cfg.model.resolution, batch_size
        # The manifest's lines now, as the held decode reads them (with captions: their share of the whole manifest,
        # the same verdict on every rank): a bad manifest stops the run at its start, not at its first evaluation.
        read_source(self.manifest, max_bad_share=self.dc.max_bad_share, captions=tokenizer is not None)
        self.idle: dict | None = None  # made when a rank first runs out (a batch of clips: 32 MB of 8 at base)
        self.passes = 0
        self._unreported: list[tuple[str, str]] = []

    def __iter__(self):
        rejects: list[tuple[str, str]] = []
        batches = self._batches(rejects)
        rounds = 0
        while True:
            more, batch = self._round(batches)
            if not more:
                break
            rounds += 1
            if batch is None and self.idle is None:
                self.idle = _idle_batch(self.batch_size, self.frames, self.resolution, text=self.tokenizer is not None)
            yield self.idle if batch is None else batch
        if not rounds:
            raise ValueError(f"{shown(self.manifest, LONGEST_PATH)}: no readable clip")
        if not self.passes:
            self._unreported = rejects
        self.passes += 1

    def _round(self, batches) -> tuple[bool, dict | None]:
        """(whether any rank has a batch left, this rank's next one). Collective."""
        failed = [0] * self.dist.world
        error = batch = None
        try:
            batch = next(batches, None)
        except Exception as e:  # noqa: BLE001 - raised below, after the others have heard of it
            error, failed[self.dist.rank] = e, 1
        more, *failed = all_reduce_max([int(batch is not None), *failed], self.dist)
        if error is not None:
            raise error
        if any(failed):
            ranks = [r for r, f in enumerate(failed) if f]
            raise ValueError(f"{shown(self.manifest, LONGEST_PATH)}: rank(s) {ranks} could not decode it (their error "
                             "is in their log)")
        return bool(more), batch

    def _batches(self, rejects: list):
        """This rank's clips in batches of batch_size, as build_val_batches cuts them from its decoded share (a
        clip without a caption dropped by _with_text first); its skips added to `rejects` at the end."""
        loader = _eval_loader(self.manifest, frames=self.frames, resolution=self.resolution, dc=self.dc,
                              rank=self.dist.rank, world=self.dist.world, batch_size=self.batch_size)
        uncaptioned: list[tuple[str, str]] = []
        pending: list[dict] = []
        rows = 0
        for batch in loader:
            clips = _tensors(batch)
            if self.tokenizer is not None:
                clips, skipped = _with_text(clips, batch["caption"], batch["path"], [], self.tokenizer)
                uncaptioned += skipped
            pending.append(clips)
            rows += clips["index"].shape[0]
            while rows >= self.batch_size:
                whole = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
                yield {k: v[:self.batch_size] for k, v in whole.items()}
                pending, rows = [{k: v[self.batch_size:] for k, v in whole.items()}], rows - self.batch_size
        if rows:
            yield {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
        rejects += [*loader.drain_rejects(), *uncaptioned]

    def drain_rejects(self) -> list[tuple[str, str]]:
        out, self._unreported = self._unreported, []
        return out


def trim_text(ids: torch.Tensor, paddings: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns past the batch's longest caption (rounded up to `multiple`,
    which bounds the number of distinct shapes a compiled graph sees). Exact: padded
    positions are masked out as keys and the class token carries no position."""
    real = int((paddings < 0.5).sum(1).max()) if paddings.numel() else 0
    keep = min(ids.shape[1], max(multiple, -(-real // multiple) * multiple))
    # Contiguous: a view is contiguous only when it keeps every column, and a compiled graph guards on its
    # strides (a batch with a full-length caption and one without compiled the step twice).
    return ids[:, :keep].contiguous(), paddings[:, :keep].contiguous()
