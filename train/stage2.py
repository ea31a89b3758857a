"""Stage 2: masked video modeling with global-local distillation and token shuffling (DESIGN 5).

    python -m train.stage2 --config tiny stage2.teacher=runs/stage1/model.safetensors \
        data.train=DIR/train.jsonl data.val=DIR/val.jsonl

Teacher: the frozen stage-1 video tower on the full clip (token targets `[B, T*N, D]`,
pooled target `[B, D]`). Student: an encoder initialised from the teacher's, on the 35%
BEVT-visible tokens. Token-wise loss: decoder over the shuffled [visible | mask] slots,
cosine distance to the teacher's token at each slot's position. Global loss: decoder +
MAP pooler over the visible tokens, cosine distance to the teacher's pooled embedding.
"""
from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from videoprism.checkpoint import flax_config
from videoprism.cli import run_command
from videoprism.data.device import to_device
from videoprism.flops import stage2_step_flops, temporal_pairs
from videoprism.masking import bevt_mask
from videoprism.train.config import Config, ResumeFrom, parse_args
from videoprism.train.data import build_train_data, build_val_batches
from videoprism.train.distill import Stage2Model, Teacher, identity_slots, random_slots
from videoprism.train.export import export_module, export_spec
from videoprism.train.losses import cosine_distance
from videoprism.train.metrics import print_outputs
from videoprism.train.modeling import build_clip, model_from_safetensors
from videoprism.train.parallel import (Dist, close_distributed, compile_blocks, gather_objects, init_distributed,
                                       leave_together)
from videoprism.train.run_folder import OutDirLock
from videoprism.train.seeds import INIT, MASK, SLOTS, VALIDATION, derive_seed, seed_process
from videoprism.train.step_masks import StepMasks
from videoprism.train.trainer import (GoOn, NonFiniteLossError, Trainer, accumulation, preflight,
                                      stopping_before_training)


class Stage2Task:
    stage = 2
    loss_keys = ("token_loss", "global_loss")

    def __init__(self, cfg: Config, dist_: Dist, teacher: Teacher, val_batches: list[dict] | None, *,
                 strided_ranks: bool = False):
        """`strided_ranks`: as Stage1Task's (the data source's row order)."""
        self.cfg, self.dist, self.teacher, self.val = cfg, dist_, teacher, val_batches
        # Training masks and slot permutations: clip i of a step's global batch gets row i of one draw per step.
        self.step_masks = StepMasks(lambda g, step, T, H, W: self._draw(g, T, H, W, self.cfg.train.seed, step),
                                    strided=strided_ranks)
        enc = teacher.encoder
        self.model_config = enc.config
        self.export_spec = export_spec("FactorizedEncoder", enc.config, "student.", cfg.model.clip_size())
        P = enc.config.patch_size
        grid = cfg.model.resolution // P
        self.num_patches = grid * grid
        s2 = cfg.stage2
        # The decoders' initial weights from their own seed: drawn from the global generator, they depended on what
        # building the data had drawn from it before (a run with data.val trained from other decoders).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(INIT, cfg.train.seed))
            model = Stage2Model(enc, num_positions=cfg.model.num_frames * self.num_patches, dec_dim=s2.decoder_dim,
                                dec_layers=s2.decoder_layers, dec_heads=s2.decoder_heads,
                                global_distill=s2.global_distill)
        self.module = model.to(dist_.device)
        if cfg.train.bf16(dist_.device.type):
            teacher.to(torch.bfloat16)  # after the student's copy: the student keeps fp32 master weights
        if cfg.train.compile:
            # The frozen teacher sees all T*N tokens: 39% of a base step's FLOPs (bench/RESULTS.md).
            # Eager, each of its LayerNorms, GELUs and residual adds is a pass over 4096 tokens a clip.
            compile_blocks(teacher, cfg.train.compile_backend)

    def _draw(self, g: int, T: int, H: int, W: int, seed: int, *keys: int):
        """BEVT mask and slot permutation of `g` clips, drawn from `derive_seed(..., seed, *keys)`."""
        dev, P = self.dist.device, self.model_config.patch_size
        pos = bevt_mask(g, T, (H // P, W // P), self.cfg.train.mask_ratio, seed=derive_seed(MASK, seed, *keys),
                        device=dev)
        if self.cfg.stage2.shuffle:
            gen = torch.Generator(device=dev).manual_seed(derive_seed(SLOTS, seed, *keys))
            perm = random_slots(g, T * self.num_patches, generator=gen, device=dev)
        else:
            perm = identity_slots(pos, self.num_patches)
        return pos, perm

    def _val_masks(self, index: torch.Tensor, T: int, H: int, W: int):
        """Masks of the validation clips of manifest indices `index` (an idle row's -1: clip 0's), one draw per
        clip keyed by its index: any number of ranks and any batching score the same masks, so the logged
        losses compare across runs."""
        draws = [self._draw(1, T, H, W, VALIDATION, max(i, 0)) for i in index.tolist()]
        return torch.cat([p for p, _ in draws]), torch.cat([q for _, q in draws])

    def prepare(self, batch: dict, step: int, micro: int) -> dict:
        video = to_device(batch["video"], self.dist.device)
        b, T, H, W, _ = video.shape
        pos, perm = self.step_masks(step, micro, b, (T, H, W), dist_=self.dist,
                                    accum=accumulation(self.cfg.train, self.dist.world)[1])
        return {"video": video, "pos": pos, "perm": perm}

    def losses(self, module: nn.Module, inputs: dict) -> dict:
        token_target, global_target = self.teacher(inputs["video"])  # no grad: Teacher.forward's own
        token_pred, global_pred = module(inputs["video"], inputs["pos"], inputs["perm"])
        out = {"token_loss": cosine_distance(token_pred, token_target)}
        if global_pred is not None:
            out["global_loss"] = cosine_distance(global_pred, global_target)
        return out

    def loss(self, module: nn.Module, inputs: dict):
        parts = self.losses(module, inputs)
        total = parts["token_loss"] + self.cfg.stage2.global_weight * parts.get("global_loss", 0.0)
        return total, parts

    def flops(self, inputs: dict) -> float:
        b, T, K = inputs["pos"].shape
        s2 = self.cfg.stage2
        return stage2_step_flops(self.model_config, batch=b, frames=T, grid_tokens=self.num_patches, visible=K,
                                 dec_dim=s2.decoder_dim, dec_layers=s2.decoder_layers,
                                 dec_mlp_dim=4 * s2.decoder_dim, global_distill=s2.global_distill,
                                 pairs_per_clip=temporal_pairs(inputs["pos"], T, K, self.num_patches))

    def tokens(self, inputs: dict) -> int:
        return inputs["pos"].numel()

    def evaluate(self, module: nn.Module) -> dict:
        """Distillation losses on the validation split with fixed masks (per clip): each rank scores its
        share, the means are over every clip of the split (the same on every rank)."""
        if not self.val:
            return {}
        sums: dict[str, float] = {}
        count = 0
        for batch in self.val:
            video = batch["video"].to(self.dist.device)
            b, T, H, W, _ = video.shape
            pos, perm = self._val_masks(batch["index"], T, H, W)
            real = int((batch["index"] >= 0).sum())  # a batch is all real clips or all idle ones
            count += real
            for k, v in self.losses(module, {"video": video, "pos": pos, "perm": perm}).items():
                sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + float(v) * real
        ranks = gather_objects((sums, count), self.dist)
        n = sum(c for _, c in ranks)
        return {k: sum(s[k] for s, _ in ranks) / n for k in sums}

    def export(self, module: nn.Module, path: str) -> None:
        """The student encoder as a `FactorizedEncoder` safetensors file (collective under FSDP)."""
        export_module(module, self.export_spec, path, main=self.dist.main)


def build_teacher(cfg: Config, device: torch.device) -> Teacher:
    """From a stage-1 export (its config travels in the file) or an official LvT .npz (the
    config is model.name with the model.* overrides, whose shape fields build_config took from the
    file's array shapes)."""
    path = cfg.stage2.teacher
    if path.endswith(".npz"):
        # The text tower's fields too: stage 2 reads no text, but the teacher loads the whole file strictly.
        text = {k: v for k, v in flax_config(path)[1].items() if k in ("num_unimodal_layers", "vocabulary_size")}
        mc = dataclasses.replace(cfg.model, init=path, **text)
        return Teacher(build_clip(mc, vocab=None, device=device))
    if not path:
        raise ValueError("stage2.teacher is empty; pass the stage-1 export (e.g. "
                         "stage2.teacher=runs/stage1/model.safetensors) or an official LvT .npz")
    return Teacher(model_from_safetensors(path, expect="FactorizedVideoCLIP",
                                          attention_backend=cfg.model.attention_backend, device=device))


def run(cfg: Config, resume: ResumeFrom | None = None, overwrite: bool = False, go_on: GoOn = GoOn()) -> dict:
    """Train stage 2 per `cfg`; returns the final validation losses and the output paths. `overwrite`, `go_on`: as
    stage 1's."""
    preflight(cfg, 2, resume, overwrite)
    dist_ = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
    lock = OutDirLock(cfg.train.out_dir)
    try:
        lock.hold(dist_)  # before anything is written there; held to the run's end
        with stopping_before_training(cfg, dist_, go_on):
            seed_process(cfg.train.seed)
            teacher = build_teacher(cfg, dist_.device)
            micro, _ = accumulation(cfg.train, dist_.world)
            # No tokenizer: stage 2 reads no text, so its manifests may hold video-only lines (no caption).
            data = build_train_data(cfg, dist_, None, micro_batch=micro, vocab=2)
            val, val_rejects = build_val_batches(cfg, None, batch_size=micro, dist_=dist_)
            task = Stage2Task(cfg, dist_, teacher, val, strided_ranks=data.strided_ranks)
            trainer = Trainer(cfg, task, data, dist_, name="stage2", go_on=go_on)
            trainer.val_rejects = val_rejects
            if resume is not None:
                trainer.resume(resume.path, if_any=resume.if_any)
        results = trainer.fit()
        if dist_.main:
            print_outputs(results, cfg.train.out_dir, keys=("val_token_loss", "val_global_loss"))
        leave_together(dist_)
        return results
    finally:
        lock.release()
        close_distributed()


def main(argv: list[str] | None = None) -> int:
    """Bad config values, paths and data end the run with a one-line `error: ...` (exit 2)."""
    def command() -> None:
        run(*parse_args(argv, stage=2))

    return run_command(command, errors=(NonFiniteLossError,))


if __name__ == "__main__":
    sys.exit(main())
