"""Stage 1 trains images as one-frame videos with the first temporal position embedding (DESIGN 5)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import videoprism as vp
from videoprism.train.stage1 import ContrastiveModel


def test_one_frame_videos_take_the_cropped_temporal_embedding():
    torch.manual_seed(0)
    clip = vp.from_official("videoprism_lvt_v1_base", patch_size=6, pos_emb_shape=(4, 2, 2), model_dim=16,
                            num_heads=2, mlp_dim=32, num_spatial_layers=1, num_temporal_layers=1,
                            num_auxiliary_layers=1, num_unimodal_layers=1, vocabulary_size=20)
    with torch.no_grad():
        clip.vision_encoder.temporal_pos_emb.normal_()
    model = ContrastiveModel(clip, temperature_init=0.07, max_logit_scale=100.0, lit=False)
    image, ids, pads = torch.rand(2, 1, 12, 12, 3), torch.randint(0, 20, (2, 5)), torch.zeros(2, 5)
    with torch.no_grad():
        v, _, _ = model(image, ids, pads)
        want, _, _ = clip(image, ids, pads, crop_temporal_pos_emb=True)
        official, _, _ = clip(image, ids, pads)
    torch.testing.assert_close(v, want)
    assert (v - official).abs().max() > 1e-4  # interpolating 4 -> 1 would average the rows


def test_stage1_trains_an_image_shard_as_the_manifest_of_its_images(tmp_path):
    """data.train=IMAGES.tar:1:1, images given as WebDataset members (key.jpg + key.txt), trains as the same images
    listed in a manifest: the same one-frame batches, so the same losses, step for step."""
    pytest.importorskip("av", reason="PyAV decodes the images")
    from videoprism.data.text import Tokenizer, train_spm
    from videoprism.train.data import build_train_data

    from .test_data_images import make_images, write_manifest, write_shard
    from .test_train_stage1 import make_trainer

    images = make_images(8)
    sources = {"manifest": write_manifest(str(tmp_path), images), "shard": write_shard(tmp_path / "i.tar", images)}
    train_spm([im["caption"] for im in images], str(tmp_path / "spm.model"))
    tok = Tokenizer(str(tmp_path / "spm.model"))
    losses = {}
    for name, source in sources.items():
        run = tmp_path / name
        trainer = make_trainer(run, "train.compile=false", "data.source=manifest", f"data.train={source}:1:1",
                               "data.workers=0", "train.steps=3", "checkpoint.interval=0", vocab=tok.vocab_size)
        trainer.data = build_train_data(trainer.cfg, trainer.dist, tok, micro_batch=4, vocab=tok.vocab_size)
        peek = build_train_data(trainer.cfg, trainer.dist, tok, micro_batch=4, vocab=tok.vocab_size)
        assert peek.next_batch(0)["video"].shape == (4, 1, 16, 16, 3)  # one-frame videos
        trainer.fit()  # 2 micro-batches an epoch: the 3rd step starts epoch 2
        losses[name] = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert len(losses["shard"]) == 3 and all(math.isfinite(x) for x in losses["shard"])
    assert losses["shard"] == losses["manifest"]
