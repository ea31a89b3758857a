"""Stage 1: video-text contrastive pretraining (DESIGN 5).

    python -m train.stage1 --config tiny data.train=DIR/train.jsonl data.val=DIR/val.jsonl
    torchrun --nproc-per-node 8 -m train.stage1 --config base parallel.mode=fsdp ...

Video tower = encoder on tube-masked visible tokens + auxiliary stack + MAP pooler; text
tower = CoCa text encoder; symmetric InfoNCE over the global batch with a learned
temperature. LiT mode (stage1.lit=true) freezes the video encoder.
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from videoprism.cli import run_command
from videoprism.data.device import to_device
from videoprism.flops import stage1_step_flops
from videoprism.masking import tube_mask
from videoprism.train.config import Config, ResumeFrom, parse_args
from videoprism.train.data import build_train_data, build_val_batches, tokenizer_for, trim_text
from videoprism.train.export import export_module, export_spec
from videoprism.train.losses import contrastive_loss
from videoprism.train.metrics import print_outputs
from videoprism.train.modeling import build_clip
from videoprism.train.parallel import Dist, close_distributed, gather_rows, init_distributed, leave_together
from videoprism.train.retrieval import caption_groups, retrieval_metrics
from videoprism.train.run_folder import OutDirLock
from videoprism.train.seeds import MASK, derive_seed, seed_process
from videoprism.train.step_masks import StepMasks
from videoprism.train.trainer import (GoOn, NonFiniteLossError, Trainer, accumulation, preflight,
                                      stopping_before_training)


class ContrastiveModel(nn.Module):
    """The CLIP model plus the learned temperature, stored as log(1 / t) (CLIP)."""

    fp32_own_params = True  # the temperature, under FSDP's bf16 policy too (train.parallel.shard)

    def __init__(self, clip: nn.Module, *, temperature_init: float, max_logit_scale: float, lit: bool):
        super().__init__()  # temperature_init in [1 / max_logit_scale, 1): checked with the config
        self.clip = clip
        # Shape [1], not a scalar: FSDP2 shards no 0-d parameter.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature_init)]))
        self.max_log_scale = math.log(max_logit_scale)
        if lit:
            # Frozen parameters and an input without grad: autograd records nothing for the
            # encoder, so it costs one forward and no activation memory.
            self.clip.vision_encoder.requires_grad_(False)

    def forward(self, video=None, text_ids=None, text_paddings=None, pos=None):
        """-> (video_emb [B, D] | None, text_emb [B, D] | None, log of 1/temperature)."""
        # Images (one-frame videos) take the first temporal position embedding (DESIGN 5).
        crop = video is not None and video.shape[1] == 1
        v, t, _ = self.clip(video, text_ids, text_paddings, pos=pos, crop_temporal_pos_emb=crop)
        # A copy: under FSDP2 the parameter is an unsharded view whose storage is freed after
        # a no-grad forward (returned as is, GradCache's first pass read freed memory).
        return v, t, self.logit_scale.clone()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself after each update (CLIP): a clamp inside the forward
        would zero its gradient once past the limit and pin the temperature there for good."""
        self.logit_scale.clamp_(max=self.max_log_scale)


def captions(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's captions, trimmed (trim_text), on the device, their length marked dynamic: it changes from batch
    to batch, and graphs compiled at the first length (one per pass and clip shape) were each compiled again when it
    first changed."""
    ids, pads = (to_device(x, device) for x in trim_text(batch["text_ids"], batch["text_paddings"]))
    for x in (ids, pads):
        torch._dynamo.maybe_mark_dynamic(x, 1)
    return ids, pads


class Stage1Task:
    stage = 1
    loss_keys = ("temperature",)

    def __init__(self, cfg: Config, dist_: Dist, clip: nn.Module, val_batches: list[dict] | None, *,
                 strided_ranks: bool = False):
        """`strided_ranks`: the data source's (train.data): rank r of w holds every w-th clip of a global
        micro-batch from r, not the block [r*b, (r+1)*b) (train.step_masks)."""
        self.cfg, self.dist, self.val = cfg, dist_, val_batches
        self.model_config = clip.config
        self.export_spec = export_spec("FactorizedVideoCLIP", clip.config, "clip.", cfg.model.clip_size())
        self.grad_cache = cfg.stage1.grad_cache
        self.step_masks = StepMasks(self._draw_masks, strided=strided_ranks)
        s1 = cfg.stage1
        # .to(): the temperature is created on the CPU; the clip is already on the device.
        self.module = ContrastiveModel(clip, temperature_init=s1.temperature_init,
                                       max_logit_scale=s1.max_logit_scale, lit=s1.lit).to(dist_.device)

    def _draw_masks(self, clips: int, step: int, T: int, H: int, W: int) -> tuple[torch.Tensor]:
        """Tube masks of the step's `clips` (its global batch), row i clip i's."""
        P = self.model_config.patch_size
        return (tube_mask(clips, T, (H // P, W // P), self.cfg.train.mask_ratio,
                          seed=derive_seed(MASK, self.cfg.train.seed, step), device=self.dist.device),)

    def prepare(self, batch: dict, step: int, micro: int) -> dict:
        dev = self.dist.device
        video = to_device(batch["video"], dev)
        b, T, H, W, _ = video.shape
        # A clip's mask is keyed by its index in the step's global batch: the same on any split of it.
        pos, = self.step_masks(step, micro, b, (T, H, W), dist_=self.dist,
                               accum=accumulation(self.cfg.train, self.dist.world)[1])
        ids, pads = captions(batch, dev)
        return {"video": video, "pos": pos, "text_ids": ids, "text_paddings": pads}

    @staticmethod
    def _forward(module: nn.Module, inputs: dict):
        # Tube masks: one visible set for all frames, passed as [B, 1, K] so the encoder's time
        # axis runs on plain columns (FactorizedEncoder), not the masked time-axis search.
        return module(inputs["video"], inputs["text_ids"], inputs["text_paddings"], pos=inputs["pos"][:, :1])

    def loss(self, module: nn.Module, inputs: dict):
        v, t, log_scale = self._forward(module, inputs)
        return contrastive_loss(v, t, log_scale), {"temperature": torch.exp(-log_scale)}

    def cached_backward(self, module: nn.Module, inputs_list: list[dict], *, amp, sync):
        """One step's loss over all its accumulated micro-batches, as without accumulation
        (GradCache, Gao et al. 2021): embed every micro-batch without autograd, take the
        contrastive loss of the concatenation (all ranks' rows, gathered as usual) and its
        gradient with respect to the embeddings and the temperature, then run each
        micro-batch's forward again and backpropagate those gradients through it. The
        temperature's gradient is split evenly over the micro-batches' forwards, so every
        parameter gradient flows through the (DDP/FSDP-wrapped) module."""
        with torch.no_grad(), amp():
            outs = [self._forward(module, x) for x in inputs_list]
        v = torch.cat([o[0] for o in outs]).float().requires_grad_()
        t = torch.cat([o[1] for o in outs]).float().requires_grad_()
        log_scale = outs[0][2].detach().float().requires_grad_()
        loss = contrastive_loss(v, t, log_scale)
        loss.backward()
        sizes = [o[0].shape[0] for o in outs]
        g_video, g_text = v.grad.split(sizes), t.grad.split(sizes)
        g_scale = log_scale.grad / len(inputs_list)
        for a, x in enumerate(inputs_list):
            with sync(a == len(inputs_list) - 1):
                with amp():
                    va, ta, sa = self._forward(module, x)
                ((va.float() * g_video[a]).sum() + (ta.float() * g_text[a]).sum() + (sa.float() * g_scale).sum()).backward()
        return loss.detach(), {"temperature": torch.exp(-log_scale.detach())}

    def after_step(self) -> None:
        self.module.clamp_logit_scale_()

    def flops(self, inputs: dict) -> float:
        b, T, K = inputs["pos"].shape
        # GradCache (cached_backward) scores the step's accum micro-batches in one loss: each micro-batch's rows
        # against the whole global batch, accum x the columns of a micro-step's own loss.
        accum = accumulation(self.cfg.train, self.dist.world)[1] if self.grad_cache else 1
        return stage1_step_flops(self.model_config, batch=b, frames=T, visible=K,
                                 text_length=inputs["text_ids"].shape[1], world=self.dist.world * accum,
                                 freeze_video=self.cfg.stage1.lit)

    def tokens(self, inputs: dict) -> int:
        return inputs["pos"].numel()

    def evaluate(self, module: nn.Module) -> dict:
        """Zero-shot retrieval on the validation split, full clips (no mask): each rank embeds its share, the
        metrics rank over all of it (the same on every rank)."""
        if not self.val:
            return {}
        dev = self.dist.device
        parts: dict[str, list] = {"video": [], "text": [], "text_ids": [], "text_paddings": [], "index": []}
        for batch in self.val:
            v, t, _ = module(batch["video"].to(dev), *captions(batch, dev))
            real = batch["index"] >= 0
            for k, x in (("video", v.float().cpu()), ("text", t.float().cpu()), ("text_ids", batch["text_ids"]),
                         ("text_paddings", batch["text_paddings"]), ("index", batch["index"])):
                parts[k].append(x[real])
        rows = gather_rows({k: torch.cat(x) for k, x in parts.items()}, self.dist)
        groups = caption_groups(rows["text_ids"], rows["text_paddings"])
        return retrieval_metrics(rows["video"], rows["text"], groups)

    def export(self, module: nn.Module, path: str) -> None:
        """The trained CLIP (without the temperature) as safetensors, loadable into a
        `from_official` model of the same config (collective under FSDP)."""
        export_module(module, self.export_spec, path, main=self.dist.main)


def run(cfg: Config, resume: ResumeFrom | None = None, overwrite: bool = False, go_on: GoOn = GoOn()) -> dict:
    """Train stage 1 per `cfg`; returns the final retrieval metrics and the output paths. `overwrite`: write
    train.out_dir even if another run's checkpoints or export are there (run_folder). `go_on`: what a stop line
    names to go on (trainer.GoOn; train.pipeline's differs)."""
    preflight(cfg, 1, resume, overwrite)
    dist_ = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
    lock = OutDirLock(cfg.train.out_dir)
    try:
        lock.hold(dist_)  # before anything is written there; held to the run's end
        with stopping_before_training(cfg, dist_, go_on):
            seed_process(cfg.train.seed)
            tokenizer = tokenizer_for(cfg)
            clip = build_clip(cfg.model, vocab=tokenizer.vocab_size if tokenizer else None, device=dist_.device)
            micro, _ = accumulation(cfg.train, dist_.world)
            trainer_data = build_train_data(cfg, dist_, tokenizer, micro_batch=micro,
                                            vocab=clip.config.vocabulary_size)
            val, val_rejects = build_val_batches(cfg, tokenizer, batch_size=micro, dist_=dist_)
            task = Stage1Task(cfg, dist_, clip, val, strided_ranks=trainer_data.strided_ranks)
            trainer = Trainer(cfg, task, trainer_data, dist_, name="stage1", go_on=go_on)
            trainer.val_rejects = val_rejects
            if trainer.accum > 1 and not cfg.stage1.grad_cache and dist_.main:
                print(f"note: gradient accumulation over {trainer.accum} micro-steps without stage1.grad_cache: the "
                      f"contrastive loss of each scores {trainer.micro * dist_.world} clips against each other, not "
                      f"the global batch of {cfg.train.global_batch}")
            if cfg.stage1.lit and cfg.model.init == "random" and dist_.main:
                print("note: stage1.lit=true with model.init=random freezes a randomly initialised video encoder "
                      "(LiT tunes the text tower to pretrained video features): set model.init to the video weights")
            if resume is not None:
                trainer.resume(resume.path, if_any=resume.if_any)
        results = trainer.fit()
        if dist_.main:
            _report(results, cfg)
        leave_together(dist_)
        return results
    finally:
        lock.release()
        close_distributed()


def _report(results: dict, cfg: Config) -> None:
    if "t2v_R@1" in results:
        print("zero-shot retrieval (validation): " + ", ".join(
            f"{k} {100 * results[k]:.1f}%" for k in ("t2v_R@1", "t2v_R@5", "t2v_R@10", "v2t_R@1", "v2t_R@5",
                                                     "v2t_R@10", "chance_R@1"))
              + f" ({results['captions']} distinct captions as tokenized)")
    print_outputs(results, cfg.train.out_dir)


def main(argv: list[str] | None = None) -> int:
    """Bad config values, paths and data end the run with a one-line `error: ...` (exit 2)."""
    def command() -> None:
        run(*parse_args(argv, stage=1))

    return run_command(command, errors=(NonFiniteLossError,))


if __name__ == "__main__":
    sys.exit(main())
