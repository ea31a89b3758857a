"""The gradients of the whole training losses (DESIGN 5) against central finite differences, in float64 on a micro
model: stage 1 (masked encoder, auxiliary stack, MAP pooler, text tower, contrastive loss with its temperature; clips,
images as one-frame videos, LiT) and stage 2 (student, shuffled decoder input, token and global decoders, cosine
losses; shuffle and global_distill on and off), with the "cpp" and the "reference" token ops; then that the backends
give one step the same loss and gradients in float32.

Each op has its own gradcheck (test_token_ops.py, the attention tests); these catch what only their composition can
get wrong: a detach in the wrong place, a view or a caller's layout the op's backward does not expect, a parameter no
gradient reaches. Each parameter (and the float video) is checked along a random direction v of its own:
(L(p + eps v) - L(p - eps v)) / 2 eps against <dL/dp, v>."""
from __future__ import annotations

import pytest
import torch

from videoprism.ops import token_ops
from videoprism.ops.attention import INTERPRET
from videoprism.train.config import build_config
from videoprism.train.distill import Teacher
from videoprism.train.modeling import build_clip
from videoprism.train.parallel import Dist
from videoprism.train.stage1 import Stage1Task
from videoprism.train.stage2 import Stage2Task

T, R, B = 2, 12, 3  # 2 frames of 12x12 pixels, 4x4 patches: 9 positions a frame, 4 of them visible at mask ratio 0.5
MICRO = ["model.model_dim=8", "model.num_heads=2", "model.mlp_dim=16", "model.num_spatial_layers=1",
         "model.num_temporal_layers=1", "model.num_auxiliary_layers=1", "model.num_unimodal_layers=1",
         "model.patch_size=4", f"model.num_frames={T}", f"model.resolution={R}", "model.attention_backend=reference",
         "train.mask_ratio=0.5", f"train.global_batch={B}", "data.source=random", "stage2.decoder_dim=8",
         "stage2.decoder_layers=1", "stage2.decoder_heads=2"]
VOCAB = 20
CPU = Dist(0, 1, torch.device("cpu"))


@pytest.fixture(params=["cpp", "reference"])
def token_backend(request, monkeypatch):
    """The backend every token op of the model runs on (the model passes none: the device's default)."""
    monkeypatch.setattr(token_ops, "default_backend", lambda device: request.param)
    return request.param


def micro_clip(stage: int, *overrides: str, dtype=torch.float64):
    cfg = build_config("tiny", [*MICRO, *overrides], stage)
    torch.manual_seed(0)
    return build_clip(cfg.model, vocab=VOCAB, device=CPU.device).to(dtype), cfg


def stage1_task(*overrides: str, dtype=torch.float64) -> Stage1Task:
    clip, cfg = micro_clip(1, *overrides, dtype=dtype)
    task = Stage1Task(cfg, CPU, clip, None)
    task.module.to(dtype)
    return task


def stage2_task(*overrides: str, dtype=torch.float64) -> Stage2Task:
    clip, cfg = micro_clip(2, *overrides, dtype=dtype)
    task = Stage2Task(cfg, CPU, Teacher(clip), None)
    task.module.to(dtype)
    with torch.no_grad():  # zero at init; any value takes the same path
        task.module.mask_emb.normal_(generator=torch.Generator().manual_seed(2))
    return task


def batch(frames: int = T, dtype=torch.float64) -> dict:
    """B clips of `frames` frames (float in [0, 1], or uint8 as the data layer's) with captions of 2, 4 and 5 tokens
    of 5 (padding that trim_text keeps)."""
    g = torch.Generator().manual_seed(1)
    video = torch.rand(B, frames, R, R, 3, generator=g, dtype=torch.float64)
    video = (video * 255).to(torch.uint8) if dtype == torch.uint8 else video.to(dtype)
    pads = (torch.arange(5) >= torch.tensor([[2], [4], [5]])).float()
    return {"video": video, "text_ids": torch.randint(1, VOCAB, (B, 5), generator=g) * (1 - pads.long()),
            "text_paddings": pads}


def check_gradients(loss_fn, tensors: dict, *, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-9):
    """Every tensor's gradient of loss_fn() (one backward) against central finite differences along a random
    direction of that tensor alone. Returns the gradients."""
    for x in tensors.values():
        x.grad = None
    loss_fn().backward()
    gen = torch.Generator().manual_seed(0)
    wrong = []
    for name, x in tensors.items():
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        analytic = 0.0 if x.grad is None else float((x.grad * v).sum())
        with torch.no_grad():
            x.add_(eps * v)
            plus = float(loss_fn())
            x.sub_(2 * eps * v)
            minus = float(loss_fn())
            x.add_(eps * v)
        numeric = (plus - minus) / (2 * eps)
        if abs(analytic - numeric) > atol + rtol * abs(numeric):
            wrong.append(f"{name}: autograd {analytic:.9g}, finite differences {numeric:.9g}")
    assert not wrong, "gradients that finite differences contradict:\n" + "\n".join(wrong)
    return {name: x.grad for name, x in tensors.items()}


def trainable(module: torch.nn.Module) -> dict:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def without_gradient(grads: dict) -> list[str]:
    """The tensors whose gradient is none or zero (to rounding: 1e-12 of the largest entry of any)."""
    scale = max(float(g.abs().max()) for g in grads.values() if g is not None)
    return sorted(name for name, g in grads.items() if g is None or float(g.abs().max()) <= 1e-12 * scale)


# A MAP pooler's key bias shifts every score of its one query alike, which its softmax (no logit cap) cancels: in exact
# arithmetic it gets no gradient, in floating point ~1e-17 of rounding. The capped attention of the blocks keeps it.
POOLER_KEY_BIAS = {1: "clip.contrastive_vision_pooler.k.bias", 2: "global_pooler.k.bias"}


@pytest.mark.parametrize("frames", [T, 1], ids=["clips", "images"])
def test_stage1_gradients_match_finite_differences(token_backend, frames):
    """Every parameter, the temperature and the float video; every parameter gets a gradient. Images (one-frame
    videos) take the first temporal position embedding only: its other rows get exactly none."""
    task = stage1_task()
    inputs = task.prepare(batch(frames), step=0, micro=0)
    video = inputs["video"].requires_grad_()
    grads = check_gradients(lambda: task.loss(task.module, inputs)[0], {**trainable(task.module), "video": video})
    assert without_gradient(grads) == [POOLER_KEY_BIAS[1]]
    temporal = grads["clip.vision_encoder.temporal_pos_emb"]
    assert (temporal.abs().amax(1) > 0).tolist() == [t < frames for t in range(T)]
    # The masked patches' pixels get none, every visible one some: the encoder reads the K visible patches alone.
    P = task.model_config.patch_size
    seen = torch.zeros(B, frames, (R // P) ** 2, dtype=torch.bool)
    seen.scatter_(2, inputs["pos"], True)
    per_patch = video.grad.reshape(B, frames, R // P, P, R // P, P, 3).abs().amax((3, 5, 6)).flatten(2)
    assert (per_patch > 0).equal(seen)


def test_lit_trains_all_but_the_frozen_video_encoder_with_the_right_gradients():
    task = stage1_task("stage1.lit=true")
    inputs = task.prepare(batch(), step=0, micro=0)
    frozen = {n: p for n, p in task.module.named_parameters() if n.startswith("clip.vision_encoder.")}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    grads = check_gradients(lambda: task.loss(task.module, inputs)[0], trainable(task.module))
    assert without_gradient(grads) == [POOLER_KEY_BIAS[1]] and all(p.grad is None for p in frozen.values())


@pytest.mark.parametrize("global_distill", [True, False], ids=["global", "token-only"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "unshuffled"])
def test_stage2_gradients_match_finite_differences(token_backend, shuffle, global_distill):
    """Every parameter of the student and the decoders, and the float video through the student (the teacher's
    targets held: its no-grad forward is out of the gradient by design); every parameter gets a gradient, the mask
    embedding through the mask slots."""
    task = stage2_task(f"stage2.shuffle={str(shuffle).lower()}", f"stage2.global_distill={str(global_distill).lower()}")
    inputs = task.prepare(batch(), step=0, micro=0)
    targets = task.teacher(inputs["video"])
    task.teacher = lambda video: targets
    video = inputs["video"].requires_grad_()
    grads = check_gradients(lambda: task.loss(task.module, inputs)[0], {**trainable(task.module), "video": video})
    assert without_gradient(grads) == ([POOLER_KEY_BIAS[2]] if global_distill else [])
    assert any(n.startswith("global_") for n in grads) == global_distill
    visible = inputs["pos"].shape[2] * T
    assert 0 < visible < inputs["perm"].shape[1]  # mask slots there are, and visible tokens


def full_step(task, inputs: dict) -> tuple[torch.Tensor, dict]:
    for p in task.module.parameters():
        p.grad = None
    loss = task.loss(task.module, inputs)[0]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in task.module.named_parameters() if p.grad is not None}


def step_on(backend: str, stage: int, monkeypatch) -> tuple[torch.Tensor, dict]:
    """One float32 step of the training data's uint8 clips, the token ops and the attention on `backend`
    ("triton": both Triton's; else the token ops on it and the reference attention)."""
    monkeypatch.setattr(token_ops, "default_backend", lambda device: backend)
    attention = "triton" if backend == "triton" else "reference"
    make = stage1_task if stage == 1 else stage2_task
    task = make(f"model.attention_backend={attention}", dtype=torch.float32)
    return full_step(task, task.prepare(batch(dtype=torch.uint8), step=0, micro=0))


def assert_same_step(got: tuple, want: tuple, rtol: float = 1e-5) -> None:
    """The same loss, and the same gradient of every parameter up to rtol of the largest gradient entry (fp32
    rounding of a near-zero gradient, such as the pooler key bias's, which is 0 in exact arithmetic)."""
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=0)
    assert grads.keys() == want_grads.keys()
    scale = max(float(g.abs().max()) for g in want_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage", [1, 2])
def test_cpp_and_reference_token_ops_give_the_same_float32_step(stage, monkeypatch):
    assert_same_step(step_on("cpp", stage, monkeypatch), step_on("reference", stage, monkeypatch))


@pytest.mark.skipif(not INTERPRET, reason="Triton's interpreter runs the CPU check (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("stage", [1, 2])
def test_triton_kernels_give_the_reference_float32_step(stage, monkeypatch):
    assert_same_step(step_on("triton", stage, monkeypatch), step_on("reference", stage, monkeypatch))
