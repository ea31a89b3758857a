"""Model properties beyond the golden sizes: parameter counts, any sizes, compile without graph breaks.

Oracles: the released models' parameter counts; torch SDPA (an independent attention
implementation) against our reference path with the cap off; and structural identities of
the factorized model (spatial features of a frame do not depend on the other frames;
samples of a batch do not interact).
"""
from __future__ import annotations

import pytest
import torch

import videoprism as vp


@pytest.mark.parametrize("name,millions", [
    ("videoprism_v1_base", 114), ("videoprism_v1_large", 354),
    ("videoprism_lvt_v1_base", 248), ("videoprism_lvt_v1_large", 580),
])
def test_parameter_counts_match_released_models(name, millions):
    model = vp.from_official(name, device="meta")
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) / millions < 0.005, f"{name}: {n:.1f}M parameters, released {millions}M"


def test_a_meta_model_runs_masked_clips_for_their_shapes():
    """A model on device="meta" (shapes without memory) ran full clips but refused masked ones: the token ops'
    default on meta tensors was the C++ backend, which said to use 'cuda' or 'triton'. Each op's shape on meta
    equals its shape on real tensors."""
    from videoprism import ops
    from videoprism.masking import tube_mask

    kw = dict(model_dim=32, num_heads=2, mlp_dim=64, num_spatial_layers=1, num_temporal_layers=1, patch_size=8,
              pos_emb_shape=(2, 4, 4))
    pos = tube_mask(1, 2, (4, 4), 0.5, seed=0)
    real = vp.from_official("videoprism_v1_base", **kw)(torch.rand(1, 2, 32, 32, 3), pos=pos)[0]
    meta = vp.from_official("videoprism_v1_base", device="meta", **kw)(torch.empty(1, 2, 32, 32, 3, device="meta"),
                                                                         pos=pos.to("meta"))[0]
    assert meta.is_meta and meta.shape == real.shape == (1, 16, 32)
    x, idx = torch.rand(2, 5, 4), torch.tensor([[0, 4, 2], [1, 1, 3]])
    for backend in (None, "cpp", "reference"):
        got = ops.gather_tokens(x.to("meta"), idx.to("meta"), backend=backend)
        assert got.is_meta and got.shape == ops.gather_tokens(x, idx).shape


def test_all_official_names_build():
    for name in ("videoprism_v1_giant", "videoprism_lvt_v1_giant", "videoprism_public_v1_base",
                 "videoprism_lvt_public_v1_large"):
        vp.from_official(name, device="meta")
    m = vp.from_official("videoprism_vc_v1_large", num_classes=7, device="meta")
    assert m.projection.out_features == 7
    with pytest.raises(ValueError, match="num_classes"):
        vp.from_official("videoprism_vc_v1_base")
    with pytest.raises(ValueError, match="unknown config field.*bogus"):
        vp.from_official("videoprism_v1_base", bogus=1)
    with pytest.raises(ValueError, match="unknown model name"):
        vp.from_official("videoprism_v2_base")


def tiny(name="videoprism_v1_base", **kw):
    base = dict(patch_size=6, pos_emb_shape=(3, 3, 3), model_dim=30, num_spatial_layers=2, num_temporal_layers=1,
                num_heads=2, mlp_dim=44)  # head dim 15: odd on purpose
    if "lvt" in name:
        base.update(vocabulary_size=50, num_unimodal_layers=1, num_auxiliary_layers=1)
    base.update(kw)
    torch.manual_seed(0)
    model = vp.from_official(name, **base).eval()
    with torch.no_grad():  # move every parameter off its init so that all of them matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("T,H,W", [(1, 12, 12), (3, 18, 24), (5, 6, 6)])
def test_reference_matches_sdpa_without_cap(T, H, W):
    """Odd head dim, T = 1, non-square and 1-patch frames, pos-emb interpolation both ways."""
    ref = tiny(atten_logit_cap=0.0, attention_backend="reference")
    sdpa = tiny(atten_logit_cap=0.0, attention_backend="sdpa")
    video = torch.rand(2, T, H, W, 3)
    fp = torch.zeros(2, T)
    fp[0, -1] = 1.0
    with torch.no_grad():
        a, aa = ref(video, fp, return_intermediate=True)
        b, bb = sdpa(video, fp, return_intermediate=True)
    assert a.shape == (2, T * (H // 6) * (W // 6), 30)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aa["spatial_features"], bb["spatial_features"], rtol=1e-5, atol=1e-5)


def test_sdpa_refuses_the_cap():
    m = tiny(attention_backend="sdpa")
    with pytest.raises(ValueError, match="soft-cap"):
        m(torch.rand(1, 2, 12, 12, 3))


def test_factorized_structure():
    m = tiny()
    video = torch.rand(3, 4, 12, 12, 3)
    with torch.no_grad():
        emb, aux = m(video, return_intermediate=True)
        # Spatial features of frame t depend on frame t only.
        _, one = m(video[:, 2:3], return_intermediate=True)
        N = 4
        torch.testing.assert_close(aux["spatial_features"][:, 2 * N:3 * N], one["spatial_features"],
                                   rtol=1e-5, atol=1e-5)
        # Samples do not interact.
        e1, _ = m(video[1:2])
        torch.testing.assert_close(emb[1:2], e1, rtol=1e-5, atol=1e-5)
        # The temporal stack mixes frames: changing frame 0 changes the output of frame 3.
        v2 = video.clone()
        v2[:, 0] = torch.rand_like(v2[:, 0])
        e2, _ = m(v2)
        assert (e2[:, 3 * N:] - emb[:, 3 * N:]).abs().max() > 1e-3


def test_bad_video_errors():
    m = tiny()
    with pytest.raises(ValueError, match="multiple of patch_size"):
        m(torch.rand(1, 2, 13, 12, 3))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        m(torch.rand(1, 2, 3, 12, 12))
    with pytest.raises(ValueError, match="frame_paddings"):
        m(torch.rand(1, 2, 12, 12, 3), torch.zeros(1, 3))
    # Paddings as float, bool or int 0/1 mean the same.
    video = torch.rand(1, 2, 12, 12, 3)
    want = m(video, torch.tensor([[0.0, 1.0]]))[0]
    for pad in (torch.tensor([[False, True]]), torch.tensor([[0, 1]])):
        assert torch.equal(m(video, pad)[0], want)


@pytest.mark.parametrize("call, needle", [
    # Each ran before and returned numbers: a 0-255 float video, a padding of 2 (attention masked
    # it, the feed-forward scaled by 1 - 2), float ids truncated to ints, an infinite cap (NaN).
    (lambda m, c: m(torch.rand(1, 2, 12, 12, 3) * 255), r"video values span \[.*\]: a float video must be in \[0, 1\]"),
    (lambda m, c: m(torch.rand(1, 2, 12, 12, 3), torch.tensor([[0.0, 2.0]])), "frame_paddings must hold only 0"),
    (lambda m, c: c(None, torch.rand(2, 5) * 40, torch.zeros(2, 5)), "text_ids must be integer token ids"),
    (lambda m, c: c(None, torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 5)), "text_ids must be integer"),
    (lambda m, c: c(None, torch.ones(2, 5, dtype=torch.long), torch.full((2, 5), 0.5)), "text_paddings must hold only"),
    (lambda m, c: c(None, torch.ones(2, 5, dtype=torch.long).to("meta"), torch.zeros(2, 5)),
     "text_ids is on meta but the model on cpu"),
    (lambda m, c: vp.from_official("videoprism_v1_base", atten_logit_cap=float("inf"), device="meta"),
     "atten_logit_cap must be a finite number"),
    # Each failed deep inside torch with a message that named none of the arguments.
    (lambda m, c: m(torch.rand(0, 2, 12, 12, 3)), "video holds no clip or no frame"),
    (lambda m, c: m(torch.rand(1, 2, 12, 12, 3).to("meta")), "video is on meta but the model on cpu"),
    (lambda m, c: m(torch.rand(1, 2, 12, 12, 3), pos=torch.zeros(1, 2, 0, dtype=torch.long)), "K = 0"),
    (lambda m, c: m(torch.rand(1, 2, 12, 12, 3), pos=torch.tensor([[[0, 4]]])), r"indices in \[0, 4\)"),
    (lambda m, c: m(torch.rand(1, 2, 12, 12, 3), pos=torch.ones(1, 2, 2, dtype=torch.bool)),
     "pos must hold integer patch indices, int64 \\(or int32\\)"),
    (lambda m, c: c(None, torch.full((2, 5), 50), torch.zeros(2, 5)), "vocabulary_size is 50"),
    (lambda m, c: c(None, torch.full((2, 5), -1), torch.zeros(2, 5)), r"span \[-1, -1\]"),
    (lambda m, c: vp.from_official("videoprism_v1_base", attention_backend="fast", device="meta"),
     "attention_backend must be one of"),
    (lambda m, c: vp.FactorizedVideoCLIP(m.config), "this model takes a CLIPConfig, got a EncoderConfig"),
])
def test_bad_inputs_fail_naming_the_argument(call, needle):
    with pytest.raises(ValueError, match=needle):
        call(tiny(), tiny("videoprism_lvt_v1_base"))


def test_a_video_that_needs_grad_is_checked_without_a_warning():
    """The range check read a video that requires grad into Python floats, which warns ("Converting a tensor with
    requires_grad=True to a scalar"); the check reads it detached, and the gradient still reaches the video."""
    import warnings

    video = torch.rand(1, 2, 12, 12, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny()(video)[0].sum().backward()
    assert video.grad is not None and video.grad.abs().sum() > 0


def test_clip_text_tower_causal_and_odd_dims():
    m = tiny("videoprism_lvt_v1_base")
    ids = torch.randint(0, 50, (2, 6))
    pad = torch.zeros(2, 6)
    pad[0, 4:] = 1
    with torch.no_grad():
        _, t, _ = m(None, ids, pad)
        # Causal: the text embedding (class token, last) sees every valid token; changing a
        # padded slot's id changes nothing, changing a valid one changes it.
        ids2 = ids.clone()
        ids2[0, 5] = (ids2[0, 5] + 1) % 50
        _, t2, _ = m(None, ids2, pad)
        ids3 = ids.clone()
        ids3[0, 1] = (ids3[0, 1] + 1) % 50
        _, t3, _ = m(None, ids3, pad)
    assert t.shape == (2, 30)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(t2, t, rtol=0, atol=1e-6)
    assert (t3 - t).abs().max() > 1e-4


def test_clip_degenerate_inputs_are_finite_and_batch_invariant(media_dir):
    """Constant clips (black, white, all-equal float), padded frames (a whole clip's too), one patch a frame, and
    captions that are empty, blank, unknown characters or past 64 tokens: each embedding is finite, unit norm, and
    the same inside a batch of different ones as alone (a padding or pooling mix-up between rows shows here)."""
    import os

    from videoprism.data.text import Tokenizer

    tok = Tokenizer(os.path.join(media_dir, "test_spm.model"))
    m = tiny("videoprism_lvt_v1_base", vocabulary_size=tok.vocab_size)
    video = torch.rand(4, 3, 12, 12, 3)
    video[0], video[1], video[2] = 0.0, 1.0, 0.5
    paddings = torch.tensor([[0, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1.0]])
    texts = ["", "   ", "\u4e2d\u6587 \u0416", "a person drums on a bottle " * 20, "a dog"]
    ids, text_paddings = tok(texts)
    assert (text_paddings[3] == 0).all() and (text_paddings[:3] == 0).any(1).all()  # 64 kept; none empty
    for clips, fp in ((video, paddings), (video[:, :1, :6, :6], None)):  # the second: T = 1, one 6x6 patch
        with torch.no_grad():
            v, t, _ = m(clips, ids, text_paddings, frame_paddings=fp)
            for i in range(clips.shape[0]):
                v1, _, _ = m(clips[i:i + 1], frame_paddings=None if fp is None else fp[i:i + 1])
                torch.testing.assert_close(v1[0], v[i], rtol=0, atol=1e-6)
            for i in range(len(texts)):
                one, one_paddings = tok([texts[i]])
                n = int((one_paddings == 0).sum())  # no padding column: a padded key that counts shows
                _, t1, _ = m(None, one[:, :n], one_paddings[:, :n])
                torch.testing.assert_close(t1[0], t[i], rtol=0, atol=1e-6)
        for e in (v, t):
            assert e.isfinite().all()
            torch.testing.assert_close(e.norm(dim=-1), torch.ones(e.shape[0]))


@pytest.mark.parametrize("name", ["videoprism_v1_base", "videoprism_lvt_v1_base"])
def test_compile_fullgraph_no_graph_break(name):
    m = tiny(name)
    video = torch.rand(2, 3, 12, 12, 3)
    args = (video,) if "lvt" not in name else (video, torch.randint(0, 50, (2, 5)), torch.zeros(2, 5))
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with torch.no_grad():
        got, want = compiled(*args), m(*args)
    for g, w in zip(got[:2], want[:2]):
        if isinstance(g, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_compiled_model_compiles_once_for_every_resolution_after_the_second():
    """torch.compile(model) on clips of other sizes: the first size compiles, the second again with the sizes
    dynamic, later ones reuse that graph. The grid's patch count, read as an int by the attention's check
    (checks.as_int's operator.index), was a guard on its value: every resolution compiled again, and past dynamo's
    limit (8) the model ran eager with only a log warning. Outputs are the eager model's."""
    from torch._dynamo.utils import counters

    m = tiny()
    compiled = torch.compile(m, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    per_call = []
    try:
        with torch.no_grad():
            for side in (12, 24, 30, 36, 42):  # not 18: the position grid's own size is a branch of its own
                video = torch.rand(2, 3, side, side, 3)
                before = counters["stats"]["unique_graphs"]
                got = compiled(video)[0]
                per_call.append(counters["stats"]["unique_graphs"] - before)
                torch.testing.assert_close(got, m(video)[0], rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
    assert per_call == [1, 1, 0, 0, 0], per_call


def test_masked_encoding_identity_pos_equals_unmasked():
    m = tiny()
    video = torch.rand(2, 3, 12, 18, 3)
    pos = torch.arange(6).expand(2, 3, 6).contiguous()
    with torch.no_grad():
        a, aa = m(video, return_intermediate=True)
        b, bb = m(video, return_intermediate=True, pos=pos)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb["spatial_features"], aa["spatial_features"], rtol=1e-5, atol=1e-5)


def test_masked_encoding_matches_manual_visible_token_pipeline():
    """Oracle: the encoder's layers applied by hand to the gathered visible tokens, with the
    tube structure (same locations in every frame) handled by the identity time map."""
    from videoprism.encoder import patchify
    from videoprism.layers import interpolate_temporal_pos_emb
    from videoprism.masking import tube_mask

    m = tiny()
    B, T = 2, 3
    video = torch.rand(B, T, 18, 18, 3)
    pos = tube_mask(B, T, (3, 3), 0.5, seed=0)                  # [B, T, K], same set per frame
    K = pos.shape[-1]
    with torch.no_grad():
        got, _ = m(video, pos=pos)
        tokens = m.patch_projection(patchify(video, 6))          # [B, T, N, D]
        idx = pos[..., None].expand(-1, -1, -1, tokens.shape[-1])
        x = torch.gather(tokens, 2, idx) + m.spatial_pos_emb[pos]  # pos grid equals the config's
        x = m.spatial_ln(m.spatial_encoder(x))
        x = x + interpolate_temporal_pos_emb(m.temporal_pos_emb, T)[None, :, None, :]
        want = m.temporal_ln(m.temporal_encoder(x)).reshape(B, T * K, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == (B, T * K, 30)
    # The tube given once for all frames ([B, 1, K], how stage 1 passes it): the same result,
    # its time axis on plain columns instead of the masked time-axis path.
    with torch.no_grad():
        tube, _ = m(video, pos=pos[:, :1])
    torch.testing.assert_close(tube, want, rtol=1e-5, atol=1e-5)


def test_masked_encoding_bevt_time_axis_runs_over_the_frames_of_each_location():
    """DESIGN 4 with a mask that differs between frames (BEVT): temporal attention of token (b, t, k) runs
    over the frames where location pos[b, t, k] is visible. Oracle: for each sample and location, the
    temporal stack applied by hand to that location's visible frames only (a plain sequence, no mask)."""
    from videoprism.encoder import patchify
    from videoprism.layers import interpolate_temporal_pos_emb
    from videoprism.masking import bevt_mask

    m = tiny()
    B, T, N = 2, 3, 9
    video = torch.rand(B, T, 18, 18, 3)
    pos = bevt_mask(B, T, (3, 3), 0.5, seed=1)                      # [B, T, K], differs between frames
    assert not torch.equal(pos, pos[:, :1].expand_as(pos))
    K, D = pos.shape[-1], 30
    with torch.no_grad():
        got, _ = m(video, pos=pos)
        tokens = m.patch_projection(patchify(video, 6))
        x = torch.gather(tokens, 2, pos[..., None].expand(-1, -1, -1, D)) + m.spatial_pos_emb[pos]
        x = m.spatial_ln(m.spatial_encoder(x))
        x = x + interpolate_temporal_pos_emb(m.temporal_pos_emb, T)[None, :, None, :]
        want = torch.full_like(x, float("nan"))
        for b in range(B):
            for loc in range(N):
                t_idx, k_idx = (pos[b] == loc).nonzero(as_tuple=True)   # its frames, in time order
                if len(t_idx):
                    seq = x[b, t_idx, k_idx][None, :, None, :]          # [1, frames, 1, D]: one column
                    want[b, t_idx, k_idx] = m.temporal_encoder(seq)[0, :, 0]
        want = m.temporal_ln(want).reshape(B, T * K, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_masked_encoding_gradients_repeat_bit_for_bit():
    """A seeded CPU run repeats exactly: the same masked batch gives the same gradients on
    every backward pass, whatever memory the allocator hands out in between. The spatial
    position embedding's gradient sums the rows of every sample's visible positions; summed
    by indexing's backward (index_put_ with accumulate) it differed between passes in the
    last bits, and two demo runs of one seed ended 5 points of R@1 apart."""
    from videoprism.masking import tube_mask

    torch.manual_seed(0)
    m = vp.from_official("videoprism_v1_base", patch_size=8, pos_emb_shape=(2, 8, 8), model_dim=64,
                         num_spatial_layers=1, num_temporal_layers=1, num_heads=4, mlp_dim=64)
    video = torch.rand(32, 2, 64, 64, 3)
    pos = tube_mask(32, 2, (8, 8), 0.5, seed=1)[:, :1]
    grads = []
    for junk in (1, 12345, 777, 3):
        keep = [torch.empty(junk) for _ in range(3)]  # noqa: F841 (shifts the allocations)
        m.zero_grad(set_to_none=True)
        m(video, pos=pos)[0].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for g in grads[1:]:
        assert [n for n in g if not torch.equal(g[n], grads[0][n])] == []


def test_masked_encoding_rejects_bad_pos():
    m = tiny()
    with pytest.raises(ValueError, match="pos must be"):
        m(torch.rand(2, 3, 12, 12, 3), pos=torch.zeros(2, 4, 2, dtype=torch.long))
    # Unsorted or repeated indices: the masked time axis binary-searches them (wrong rows, or
    # unwritten output in the Triton kernel, before the check).
    for bad in ([[0, 2, 1], [0, 1, 2], [0, 1, 2]], [[0, 0, 1], [0, 1, 2], [0, 1, 2]]):
        with pytest.raises(ValueError, match="increasing order without repeats"):
            m(torch.rand(2, 3, 12, 12, 3), pos=torch.tensor([bad, bad]))


def test_constructor_overrides_apply_over_a_given_config():
    from videoprism.config import official_config

    cfg = official_config("videoprism_v1_base", model_dim=16, num_heads=2, mlp_dim=32, num_spatial_layers=1,
                          num_temporal_layers=1)
    m = vp.FactorizedEncoder(cfg, num_spatial_layers=2, attention_backend="flex")
    assert m.config.num_spatial_layers == 2 and m.config.attention_backend == "flex" and cfg.num_spatial_layers == 1
    assert len(m.spatial_encoder.layers) == 2


def test_uint8_video_identity_pos_is_bit_exact():
    """uint8 video is scaled alike by the unmasked patchify and the masked patch gather: the
    stage-2 teacher (unmasked) and student (masked) see the same pixels. The temporal stack
    then sums the same products in another order (the masked time axis gathers each query's
    keys), so the outputs agree to fp32 rounding."""
    m = tiny()
    video = torch.randint(0, 256, (2, 3, 12, 18, 3), dtype=torch.uint8)
    pos = torch.arange(6).expand(2, 3, 6).contiguous()
    with torch.no_grad():
        a, aa = m(video, return_intermediate=True)
        b, bb = m(video, return_intermediate=True, pos=pos)
    assert torch.equal(bb["spatial_features"], aa["spatial_features"])
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_crop_temporal_pos_emb_for_images():
    """Images train as one-frame videos with the first temporal embedding row (DESIGN 5);
    by default (the official model) the embedding is interpolated, which for T = 1 averages it."""
    m = tiny()
    image = torch.rand(2, 1, 12, 12, 3)
    with torch.no_grad():
        cropped, _ = m(image, crop_temporal_pos_emb=True)
        interpolated, _ = m(image)
        # Rows past the first must not matter when cropping. (Not a constant shift such as += 1.0: every
        # LayerNorm after it removes a shift shared by all features, so no row choice could show.)
        m.temporal_pos_emb[1:] += torch.randn_like(m.temporal_pos_emb[1:])
        cropped2, _ = m(image, crop_temporal_pos_emb=True)
    torch.testing.assert_close(cropped2, cropped)
    assert (cropped - interpolated).abs().max() > 1e-3
    with pytest.raises(ValueError, match="crop_temporal_pos_emb"):
        m(torch.rand(1, 4, 12, 12, 3), crop_temporal_pos_emb=True)


def test_config_fields_are_type_checked():
    """A wrong type (e.g. `--set model_dim=abc`) is a ValueError naming the field, not a
    TypeError from inside a layer constructor (`--set pos_emb_shape=5`: "'int' object is not iterable")."""
    for field, value in (("model_dim", "abc"), ("num_heads", 0), ("pos_emb_shape", (4, 4)), ("pos_emb_shape", 5),
                         ("pos_emb_shape", None),
                         ("atten_logit_cap", -1.0), ("enable_causal_atten", 1)):
        with pytest.raises(ValueError, match=f"CLIPConfig.{field} must be"):
            vp.from_official("videoprism_lvt_v1_base", **{field: value})
    assert vp.from_official("videoprism_v1_base", model_dim=16, num_heads=2, mlp_dim=32, num_spatial_layers=1,
                            num_temporal_layers=0, pos_emb_shape=[2, 2, 2]).config.pos_emb_shape == (2, 2, 2)


# golden NOTES 7 (the official models.CONFIGS) and DESIGN 3 (P = 18, c = 50 for every released model):
# name -> (D, heads, mlp, spatial layers, temporal layers, pos_emb_shape); LvT adds La=2, Lu=12, V=32000.
RELEASED = {
    "videoprism_public_v1_base": (768, 12, 3072, 12, 4, (16, 16, 16)),
    "videoprism_public_v1_large": (1024, 16, 4096, 24, 4, (8, 16, 16)),
    "videoprism_lvt_public_v1_base": (768, 12, 3072, 12, 4, (16, 16, 16)),
    "videoprism_lvt_public_v1_large": (1024, 16, 4096, 24, 4, (8, 16, 16)),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_are_the_official_table(name):
    """Fields the parameter counts cannot see: the logit cap (no parameter), the temporal position embedding's
    length (8 of 354M parameters) and the patch size (P=16 moves base by 0.14%) silently change the model a
    checkpoint is loaded into (a wrong cap only changes the outputs)."""
    from videoprism.config import CLIPConfig, official_config

    cfg = official_config(name)
    D, heads, mlp, ls, lt, pos = RELEASED[name]
    assert (cfg.model_dim, cfg.num_heads, cfg.mlp_dim, cfg.num_spatial_layers, cfg.num_temporal_layers,
            cfg.pos_emb_shape) == (D, heads, mlp, ls, lt, pos)
    assert cfg.patch_size == 18 and cfg.atten_logit_cap == 50.0
    if "lvt" in name:
        assert isinstance(cfg, CLIPConfig)
        assert (cfg.num_auxiliary_layers, cfg.num_unimodal_layers, cfg.vocabulary_size, cfg.enable_causal_atten,
                cfg.norm_policy) == (2, 12, 32000, True, "pre")
