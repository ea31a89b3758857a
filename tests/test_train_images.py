"""Stage 1 trains images as one-frame videos with the first temporal position embedding (DESIGN 5)."""
from __future__ import annotations

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
