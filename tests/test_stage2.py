"""Stage 2 (DESIGN 5): decoder input construction, shuffling, teacher/student, ablation
switches, that both losses go down on a tiny run, bf16 precision, and the Triton kernels in
the real step."""
from __future__ import annotations

import pytest
import torch

import videoprism
from videoprism.masking import bevt_mask
from videoprism.ops.attention import INTERPRET
from videoprism.train.config import build_config
from videoprism.train.distill import Teacher, identity_slots, random_slots
from videoprism.train.parallel import Dist
from videoprism.train.stage2 import Stage2Task

T, R, P = 2, 16, 4          # 2 frames of 16x16 pixels, 4x4 patches: N = 16 positions per frame
N = (R // P) ** 2


def tiny_clip(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = dict(model_dim=16, num_heads=2, mlp_dim=32, num_spatial_layers=1, num_temporal_layers=1,
                  num_auxiliary_layers=1, num_unimodal_layers=1, vocabulary_size=20, patch_size=P,
                  pos_emb_shape=(T, R // P, R // P), attention_backend="reference")
    return videoprism.from_official("videoprism_lvt_v1_base", **{**config, **overrides})


def tiny_cfg(*overrides):
    return build_config("tiny", ["model.num_frames=2", "model.resolution=16", "stage2.decoder_dim=16",
                                 "stage2.decoder_layers=1", "stage2.decoder_heads=2", "train.global_batch=4",
                                 "data.source=random", *overrides], 2)


def make_task(*overrides, seed=0):
    cfg = tiny_cfg(*overrides)
    return Stage2Task(cfg, Dist(0, 1, torch.device("cpu")), Teacher(tiny_clip(seed)), None), cfg


def make_trainer(task, cfg, dev: torch.device, name: str):
    """The real trainer over seeded random clips of the tiny model's size."""
    from videoprism.train.data import RandomClips
    from videoprism.train.trainer import Trainer

    data = RandomClips(micro_batch=4, rank=0, world=1, frames=T, resolution=R, vocab=20, seed=0)
    return Trainer(cfg, task, data, Dist(0, 1, dev), name=name)


def video(b=4, seed=1):
    return torch.randint(0, 256, (b, T, R, R, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_decoder_input_matches_reference_construction():
    task, _ = make_task()
    model = task.module
    with torch.no_grad():
        model.mask_emb.normal_()
    B, m, n, D = 3, 10, 2 * N, 16
    vis = torch.randn(B, m, D)
    perm = random_slots(B, n, generator=torch.Generator().manual_seed(0), device="cpu")
    x = model.decoder_input(vis, perm)
    for b in range(B):          # the literal construction of DESIGN 5, one slot at a time
        c = [vis[b, j] for j in range(m)] + [model.mask_emb] * (n - m)
        for i in range(n):
            assert torch.allclose(x[b, i], c[perm[b, i]] + model.pos_emb[i], atol=1e-6)


def test_bf16_decoder_input_rounds_once_and_its_embeddings_get_fp32_gradients():
    """bf16 student tokens (autocast) with the fp32 embeddings: the sum is formed in fp32 and rounded once, and
    the embeddings' gradients are fp32 sums over the batch (rounding them to bf16 first rounded both twice)."""
    task, _ = make_task()
    model = task.module
    with torch.no_grad():
        model.mask_emb.normal_(), model.pos_emb.normal_()
    B, m, n, D = 3, 10, 2 * N, 16
    g = torch.Generator().manual_seed(1)
    vis = torch.randn(B, m, D, generator=g).bfloat16()
    perm = random_slots(B, n, generator=g, device="cpu")
    x = model.decoder_input(vis, perm)
    c = torch.cat([vis.float(), model.mask_emb.detach().expand(B, n - m, D)], 1)
    want = (torch.gather(c, 1, perm[:, :, None].expand(-1, -1, D)) + model.pos_emb.detach()).bfloat16()
    assert x.dtype == torch.bfloat16 and torch.equal(x, want)
    grad = torch.randn(B, n, D, generator=g).bfloat16()
    x.backward(grad)
    torch.testing.assert_close(model.pos_emb.grad, grad.float().sum(0), rtol=1e-6, atol=1e-6)
    masked = (perm >= m)[:, :, None]
    torch.testing.assert_close(model.mask_emb.grad, (grad.float() * masked).sum((0, 1)), rtol=1e-6, atol=1e-6)


def test_shuffled_slot_is_not_its_own_position_but_identity_slots_are():
    g = torch.Generator().manual_seed(0)
    pos = bevt_mask(4, T, (4, 4), 0.65, seed=3)
    K = pos.shape[2]
    ident = identity_slots(pos, N)
    # Unshuffled: the visible token of position (t, p) sits in slot t*N + p; masks elsewhere.
    for b in range(4):
        assert sorted(ident[b].tolist()) == list(range(T * N))
        for t in range(T):
            for k in range(K):
                assert ident[b, t * N + pos[b, t, k]] == t * K + k
    perm = random_slots(4, T * N, generator=g, device="cpu")
    assert all(sorted(perm[b].tolist()) == list(range(T * N)) for b in range(4))
    # Shuffled: for most visible slots the token is not the one of that slot's position.
    own = (perm < T * K) & (perm == ident)
    assert own.float().mean() < 0.2
    assert not torch.equal(perm[0], perm[1])


def test_student_starts_equal_to_teacher_and_teacher_gets_no_gradient():
    task, _ = make_task()
    teacher, model = task.teacher, task.module
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for (k, s), t in zip(model.student.state_dict().items(), teacher.encoder.state_dict().values()):
        assert torch.equal(s, t), k
    assert all(not p.requires_grad for p in teacher.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        inputs = task.prepare({"video": video()}, step, 0)
        loss, _ = task.loss(model, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not teacher.training
    teacher.train()
    assert not teacher.training
    # The student moved away from the teacher.
    assert any(not torch.equal(s, t) for s, t in zip(model.student.state_dict().values(),
                                                     teacher.encoder.state_dict().values()))


def test_ablation_switches_change_only_their_part():
    base, _ = make_task()
    no_shuffle, _ = make_task("stage2.shuffle=false")
    no_global, _ = make_task("stage2.global_distill=false")
    batch = {"video": video()}
    a, b, c = (t.prepare(batch, 5, 0) for t in (base, no_shuffle, no_global))
    assert torch.equal(a["pos"], b["pos"]) and torch.equal(a["pos"], c["pos"])   # same masks
    assert torch.equal(a["perm"], c["perm"])                                       # same shuffle
    assert torch.equal(b["perm"], identity_slots(a["pos"], N))                     # no shuffle
    assert not torch.equal(a["perm"], b["perm"])
    # Same parameters where both have them; the global branch exists only when switched on.
    names = lambda t: {k for k, _ in t.module.named_parameters()}  # noqa: E731
    assert names(base) == names(no_shuffle)
    assert names(no_global) == {k for k in names(base) if not k.startswith(("global_decoder", "global_pooler"))}
    no_global.module.load_state_dict(base.module.state_dict(), strict=False)
    with torch.no_grad():
        la, lc = base.losses(base.module, a), no_global.losses(no_global.module, c)
    assert set(la) == {"token_loss", "global_loss"} and set(lc) == {"token_loss"}
    assert torch.allclose(la["token_loss"], lc["token_loss"], atol=1e-6)


def test_both_losses_decrease_on_a_tiny_run():
    task, _ = make_task()
    opt = torch.optim.AdamW(task.module.parameters(), lr=3e-3)
    inputs = task.prepare({"video": video(8)}, 0, 0)
    history = []
    for _ in range(25):
        loss, parts = task.loss(task.module, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    for key in ("token_loss", "global_loss"):
        first, last = history[0][key], min(h[key] for h in history[-5:])
        assert last < 0.7 * first, (key, first, last)


def test_teacher_targets_are_the_stage1_tower():
    clip = tiny_clip()
    teacher = Teacher(clip)
    v = video(2)
    tokens, pooled = teacher(v)
    ref_tokens, _ = clip.vision_encoder(v)
    emb, _, _ = clip(v, None, None, normalize=False)
    assert torch.allclose(tokens, ref_tokens) and torch.allclose(pooled, emb, atol=1e-6)


def test_decoder_never_takes_the_inference_fast_path():
    """In eval mode without grad, nn.TransformerEncoderLayer may switch to a fused inference op
    that torch.compile cannot trace in torch 2.11 (a compiled stage-2 evaluation failed there):
    the decoders must run their layers op by op, as in training."""
    from videoprism.train.distill import Decoder

    dec = Decoder(16, 16, 1, 2).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = dec(x)
    names = {e.name for e in prof.events()}
    assert "aten::_transformer_encoder_layer_fwd" not in names and "aten::linear" in names
    torch.testing.assert_close(y, dec.train()(x))  # dropout 0: eval and training modes agree


def test_position_count_mismatch_is_reported():
    task, _ = make_task()
    with pytest.raises(ValueError, match="token positions"):
        task.module.decoder_input(torch.randn(1, 3, 16), torch.arange(5)[None])


def test_a_training_manifest_of_other_frames_fails_before_the_teacher_is_built(tmp_path, monkeypatch, capsys):
    """Images (data.train PATH:WEIGHT:1, stage 1's one-frame videos) or any FRAMES other than model.num_frames:
    the decoder's position embedding holds model.num_frames x N slots. Checked in the preflight, naming the
    entry; the first step's error named model.num_frames/resolution, after the teacher and the data were built."""
    from videoprism.train import stage2

    (tmp_path / "images.jsonl").write_text("")
    videoprism.save_safetensors(tiny_clip(0), str(tmp_path / "teacher.safetensors"))
    monkeypatch.setenv("VIDEOPRISM_TRACEBACK", "")
    monkeypatch.setattr(stage2, "build_teacher", lambda *a, **k: pytest.fail("the teacher was built"))
    images = f"{tmp_path}/images.jsonl"
    assert stage2.main(["--config", "tiny", "data.source=manifest", f"data.train={images},{images}:1:1",
                        f"train.out_dir={tmp_path}/out",
                        f"stage2.teacher={tmp_path}/teacher.safetensors"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: data.train: {images!r} is read as 1-frame clips (its FRAMES) and stage 2 trains clips of "
        "model.num_frames=8 (the decoder's position embedding has a slot per token of such a clip); drop its FRAMES "
        "(one-frame images are for stage 1)")


def test_both_stages_end_by_saying_where_their_metrics_are(tmp_path, capsys):
    from videoprism.train import stage1, stage2

    common = ["--config", "tiny", "model.num_frames=2", "model.resolution=16", "data.source=random",
              "train.global_batch=2", "train.steps=1"]
    for stage, extra in ((stage1, []), (stage2, [f"stage2.teacher={tmp_path}/stage1/model.safetensors"])):
        out = tmp_path / stage.__name__.rsplit(".", 1)[1]
        assert stage.main([*common, f"train.out_dir={out}", *extra]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[-1] == f"metrics: {out / 'metrics.jsonl'}; non-finite steps skipped: 0; bad samples skipped: 0", lines[-1]
        assert lines[-2] == f"config: {out / 'config.json'}" and (out / "config.json").is_file(), lines[-2]


def test_stage2_on_an_out_dir_that_a_live_run_holds_stops_before_the_teacher(tmp_path, monkeypatch, capsys):
    """Stage 2 holds its train.out_dir as stage 1 does: a second run there, fresh, --resume, --auto-resume or
    --overwrite, stops with the holder's line before it builds the teacher, and leaves the folder as it was."""
    from videoprism.train import stage2

    from .test_train_units import folder_state, held_by_a_live_run, held_line

    teacher, out = str(tmp_path / "teacher.safetensors"), tmp_path / "run"
    videoprism.save_safetensors(tiny_clip(0), teacher)
    args = ["--config", "tiny", "model.num_frames=2", "model.resolution=16", "data.source=random",
            "train.global_batch=2", "train.steps=1", f"train.out_dir={out}", f"stage2.teacher={teacher}"]
    monkeypatch.setenv("VIDEOPRISM_TRACEBACK", "")
    assert stage2.main(args) == 0
    capsys.readouterr()
    monkeypatch.setattr(stage2, "build_teacher", lambda *a, **k: pytest.fail("the teacher was built"))
    with held_by_a_live_run(out) as (holder, _):
        before = folder_state(out)
        for mode in ([], ["--resume"], ["--auto-resume"], ["--overwrite"]):
            assert stage2.main([*args, *mode]) == 2, mode
            assert capsys.readouterr().err.strip() == held_line(out, holder), mode
            assert folder_state(out) == before, mode


def test_train_compile_compiles_the_teachers_blocks():
    """With train.compile the task compiles its frozen teacher's blocks as well as the student's: each
    traces as one graph (no break), and the teacher gives the eager teacher's targets.
    (The "eager" compile backend keeps this fast; the trainer uses Inductor by default.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    task, _ = make_task("train.compile=true", "train.compile_backend=eager")
    eager, _ = make_task("train.compile=false")
    v = video()
    tokens, pooled = task.teacher(v)
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    ref_tokens, ref_pooled = eager.teacher(v)
    torch.testing.assert_close(tokens, ref_tokens)
    torch.testing.assert_close(pooled, ref_pooled)
    assert not tokens.requires_grad


def test_compiled_teacher_serves_the_steps_and_the_evaluation_with_the_same_graphs(tmp_path):
    """The frozen teacher runs without autograd in the step and in the evaluation alike: its no-grad forward
    after a step reuses the graphs the step compiled for its blocks (dynamo guards the caller's grad mode; the
    step's grad-enabled call compiled them a second time). A second step and evaluation compile nothing."""
    from torch._dynamo.utils import counters

    from videoprism.train.metrics import MetricsLogger

    torch._dynamo.reset()
    counters.clear()
    task, cfg = make_task("train.compile=true", "train.compile_backend=eager", f"train.out_dir={tmp_path}")
    trainer = make_trainer(task, cfg, torch.device("cpu"), "teacher")
    task.val = [{"video": video(4, seed), "index": torch.arange(4) + 4 * i}  # the step's batch size
                for i, seed in enumerate((1, 2))]

    def evaluate():
        trainer._evaluate(MetricsLogger(str(tmp_path), total_steps=1, start_step=1, enabled=False, desc="t"))

    def teacher():
        with torch.no_grad():
            task.teacher(video(4, 3))

    per_pass = []
    for run in (trainer.train_step, teacher, evaluate, trainer.train_step, evaluate):
        before = counters["stats"]["unique_graphs"]
        run()
        per_pass.append(counters["stats"]["unique_graphs"] - before)
    torch._dynamo.reset()
    assert per_pass[0] > 0 and per_pass[1] == 0 and per_pass[3:] == [0, 0], per_pass


def test_compiled_student_step_has_no_graph_break():
    """The student (encoder on BEVT-visible tokens, shuffle op, both decoders; the trainer compiles its
    blocks) traces as one graph and gives the eager losses; the backward follows."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    task, _ = make_task("train.compile=false")
    inputs = task.prepare({"video": video()}, 0, 0)
    compiled = torch.compile(task.module, backend="eager", fullgraph=True)
    loss, _ = task.loss(compiled, inputs)
    loss.backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    eager_loss, _ = task.loss(task.module, inputs)
    torch.testing.assert_close(loss, eager_loss)


def test_bf16_precision_trains_like_fp32(tmp_path):
    """train.precision=bf16 (what 'auto' does on a GPU), run here on the CPU: the step under bf16
    autocast, the frozen teacher's weights in bf16, the student's fp32 master weights; compiled
    (aot_eager traces the custom ops' fake impls under autocast); losses near the fp32 run's."""
    from videoprism.train.metrics import MetricsLogger

    losses, val = {}, {}
    for prec in ("fp32", "bf16"):
        torch._dynamo.reset()
        task, cfg = make_task(f"train.precision={prec}", f"train.compile={prec == 'bf16'}",
                              "train.compile_backend=aot_eager", f"train.out_dir={tmp_path / prec}",
                              "checkpoint.export=false")
        trainer = make_trainer(task, cfg, torch.device("cpu"), prec)
        assert trainer.autocast == (prec == "bf16")
        losses[prec] = [trainer.train_step()["loss"] for _ in range(3)]
        assert {p.dtype for p in task.teacher.parameters()} == {torch.bfloat16 if prec == "bf16" else torch.float32}
        assert {p.dtype for p in task.module.parameters()} == {torch.float32}
        task.val = [{"video": video(2), "index": torch.arange(2)}]
        val[prec] = trainer._evaluate(MetricsLogger(str(tmp_path), total_steps=3, start_step=3, enabled=False,
                                                    desc=prec))
    assert losses["bf16"] != losses["fp32"]  # the autocast is in effect
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=3e-2)
    assert val["bf16"] == pytest.approx(val["fp32"], rel=3e-2)


def _stage2_losses(dev: torch.device, backend: str, compile_: bool, out_dir, steps: int = 3) -> list[float]:
    """Losses of `steps` fp32 trainer steps of a stage-2 model with head dim 16 (the smallest
    the Triton kernels tile) and the given attention backend; asserts no graph break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    clip = tiny_clip(0, model_dim=32, mlp_dim=64, attention_backend=backend).to(dev)
    cfg = tiny_cfg("train.precision=fp32", f"train.compile={compile_}", "train.compile_backend=aot_eager",
                   f"train.device={dev.type}", f"train.out_dir={out_dir}", "checkpoint.export=false")
    trainer = make_trainer(Stage2Task(cfg, Dist(0, 1, dev), Teacher(clip), None), cfg, dev, backend)
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    return losses


@pytest.mark.gpu
def test_gpu_stage2_step_is_queued_without_a_host_sync(tmp_path):
    """Teacher and student with the Triton kernels (masked time axis), BEVT masks and slot permutations drawn
    on the GPU, the FLOP count of the masked pairs kept on the device, bf16 autocast, fused AdamW."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from .test_train_stage1 import launch_without_sync

    dev = torch.device("cuda")
    clip = tiny_clip(0, model_dim=32, mlp_dim=64, attention_backend="triton").to(dev)
    cfg = tiny_cfg("train.compile=false", "train.device=cuda", f"train.out_dir={tmp_path}", "checkpoint.export=false",
                   "optim.name=adamw")
    trainer = make_trainer(Stage2Task(cfg, Dist(0, 1, dev), Teacher(clip), None), cfg, dev, "sync")
    recs = launch_without_sync(trainer)
    assert all(r["_flops"] > 0 and r["token_loss"] > 0 for r in recs)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="on the CPU the Triton kernels run in "
                                                 "Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")),
    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_triton_stage2_step_matches_eager(tmp_path, device):
    """The stage-2 step with the Triton attention kernels (the masked time axis on BEVT masks, the
    teacher's unmasked axes; on the CPU in Triton's interpreter) and the device's token ops,
    compiled (aot_eager: Inductor's step is what bench.train_step times), gives the eager
    plain-PyTorch step's losses. (In the interpreter they are equal; the masked time-axis output
    off by 1% moves them by 3e-4.)"""
    dev = torch.device(device)
    want = _stage2_losses(dev, "reference", False, tmp_path / "eager")
    got = _stage2_losses(dev, "triton", True, tmp_path / "triton")
    assert got == pytest.approx(want, abs=1e-4)


def test_validation_losses_are_the_same_for_any_batching_and_idle_batches_add_nothing():
    """With per-clip masks keyed by the clip's manifest index, batches of 1, 2 or all 5 clips score the same
    masks, and a rank's idle batches (index -1, which build_val_batches adds so every rank runs as many
    forwards) count for nothing, so the logged losses do not depend on the batching (batches of 1: the mean
    over clips of each clip scored alone). Over ranks: tests/test_train_distributed.py."""
    clips, index = video(5, seed=3), torch.tensor([7, 2, 9, 4, 0])  # manifest indices: a share's, in any order
    idle = {"video": torch.zeros_like(clips[:2]), "index": torch.full((2,), -1)}
    got = []
    for b, idle_batches in [(5, 0), (2, 1), (1, 2)]:
        task, _ = make_task()
        task.val = [{"video": clips[i:i + b], "index": index[i:i + b]} for i in range(0, 5, b)] + [idle] * idle_batches
        with torch.no_grad():
            got.append(task.evaluate(task.module))
    assert set(got[0]) == {"val_token_loss", "val_global_loss"}
    for other in got[1:]:
        assert other == pytest.approx(got[0], rel=1e-5)
    task, _ = make_task()
    with torch.no_grad():
        pos, perm = task._val_masks(torch.tensor([3, 4]), T, R, R)
        assert torch.equal(pos[1:], task._val_masks(torch.tensor([4]), T, R, R)[0])  # clip 4 alone or after clip 3
        assert not torch.equal(pos[0], pos[1]) and not torch.equal(perm[0], perm[1])


def test_stage2_step_flops_match_flop_counter():
    """stage2_step_flops against torch's counter on a real forward + backward of the stage-2 loss. The
    counter has no formula for the CPU SDPA kernel of the decoders' layers and the MAP poolers: their
    scores and weighted sums (4 * tokens^2 * width per sequence and layer; 4 * tokens * hidden per clip for
    a one-query pooler) are added by hand, 3x where trained, 1x for the frozen teacher's pooler. The reference
    backend's masked time axis attends on the dense [B, N, T] grid of locations: B*N*T^2 pairs where the
    formula counts the pairs of visible tokens, sum over locations of their frame counts squared; that excess
    (3x, trained) is taken off by hand. Then exact."""
    from torch.utils.flop_counter import FlopCounterMode

    measured, formula = {}, {}
    for distill in (True, False):
        task, cfg = make_task(f"stage2.global_distill={str(distill).lower()}")
        inputs = task.prepare({"video": video()}, 0, 0)
        B, frames, K = inputs["pos"].shape
        n, m, Dd, D = frames * N, frames * K, cfg.stage2.decoder_dim, 16
        with FlopCounterMode(display=False) as fc:
            loss, _ = task.loss(task.module, inputs)
            loss.backward()
        sdpa = 3 * cfg.stage2.decoder_layers * B * 4 * n * n * Dd + B * 4 * n * (4 * D)  # token decoder, teacher pooler
        if distill:
            sdpa += 3 * (cfg.stage2.decoder_layers * B * 4 * m * m * Dd + B * 4 * m * D)  # global decoder, pooler
        pairs = sum(int(torch.bincount(p.flatten(), minlength=N).pow(2).sum()) for p in inputs["pos"])
        grid = 3 * task.model_config.num_temporal_layers * 4 * D * (B * N * frames**2 - pairs)
        measured[distill], formula[distill] = fc.get_total_flops() + sdpa - grid, float(task.flops(inputs))
    assert formula[True] - formula[False] == measured[True] - measured[False]
    assert formula[True] == pytest.approx(measured[True], rel=1e-9)


def test_losses_are_cosine_distances_to_the_teacher_and_the_total_weighs_the_global_one():
    """The token loss is the mean over every (clip, slot) of 1 - cos(decoder output, teacher token), the
    global loss the mean over clips of 1 - cos(pooled output, teacher pooled embedding), computed here with
    F.cosine_similarity on the module's and the teacher's outputs; total = token + global_weight * global."""
    import torch.nn.functional as F

    task, _ = make_task("stage2.global_weight=0.25")
    inputs = task.prepare({"video": video()}, 0, 0)
    with torch.no_grad():
        token_pred, global_pred = task.module(inputs["video"], inputs["pos"], inputs["perm"])
        token_target, global_target = task.teacher(inputs["video"])
        total, parts = task.loss(task.module, inputs)
    assert token_pred.shape == token_target.shape == (4, T * N, 16)
    token = (1 - F.cosine_similarity(token_pred, token_target, dim=-1)).mean()
    global_ = (1 - F.cosine_similarity(global_pred, global_target, dim=-1)).mean()
    torch.testing.assert_close(parts["token_loss"], token)
    torch.testing.assert_close(parts["global_loss"], global_)
    torch.testing.assert_close(total, token + 0.25 * global_)
    assert abs(float(token) - float(global_)) > 1e-3  # the two terms are told apart


def test_stage2_trains_and_validates_on_video_only_lines_without_a_tokenizer(tmp_path, capsys):
    """Stage 2 reads no text: a manifest whose lines have no caption, in a folder without spm.model and no
    data.tokenizer, trains and validates (data.cache on and off); stage 1 on it stops at the bad-sample share with
    the lines and the reason."""
    import json
    import os

    pytest.importorskip("av", reason="PyAV decodes the clips")
    from videoprism.data.synth import generate
    from videoprism.train import stage1, stage2

    generate(str(tmp_path / "synth"), 6, seed=1, size=16, num_frames=2, workers=1)
    os.makedirs(tmp_path / "video_only")
    m = tmp_path / "video_only" / "m.jsonl"
    recs = [json.loads(x) for f in ("train.jsonl", "val.jsonl") for x in open(tmp_path / "synth" / f)]
    m.write_text("".join(json.dumps({"path": str(tmp_path / "synth" / r["path"])}) + "\n" for r in recs))
    common = ["--config", "tiny", "model.num_frames=2", "model.resolution=16", "train.global_batch=2",
              "train.steps=2", "train.eval_every=1", "data.workers=0"]
    assert stage1.main([*common, "data.source=random", f"train.out_dir={tmp_path}/s1", "train.steps=1"]) == 0
    for cache in ("true", "false"):
        out = tmp_path / f"s2_{cache}"
        assert stage2.main([*common, f"data.train={m}", f"data.val={m}", f"data.cache={cache}", f"train.out_dir={out}",
                            f"stage2.teacher={tmp_path}/s1/model.safetensors"]) == 0
        evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval" in r]
        assert [r["step"] for r in evals] == [1, 2] and all(r["eval"]["val_token_loss"] > 0 for r in evals)
    # Either way the manifest's lines are checked, stopping at the first past the share.
    for cache in ("true", "false"):
        capsys.readouterr()
        assert stage1.main([*common, f"data.train={m}", f"data.tokenizer={tmp_path}/synth/spm.model",
                            f"data.cache={cache}", f"train.out_dir={tmp_path}/s1_text_{cache}",
                            "train.eval_every=0"]) == 2  # no data.val: else a note says it does not evaluate
        err = capsys.readouterr().err
        assert f"1 of 6 lines of {m} are bad" in err and "stage 1 and retrieval need" in err, err
        assert f"videoprism data index {m} --out CLEAN.jsonl --require-captions" in err, err
        assert "\n" not in err.strip(), err


def test_a_stage2_checkpoint_exports_its_student_as_the_run_does(tmp_path):
    """`videoprism export` of a stage-2 run's latest checkpoint: the student encoder its end exports, byte for
    byte."""
    from videoprism.train.export import export_checkpoint

    task, cfg = make_task(f"train.out_dir={tmp_path}", "train.steps=2", "train.eval_every=0", "train.compile=false",
                          "checkpoint.export=true")
    results = make_trainer(task, cfg, torch.device("cpu"), "stage2").fit()
    out = export_checkpoint(str(tmp_path), str(tmp_path / "again.safetensors"))
    assert open(out, "rb").read() == open(results["export"], "rb").read()
    from videoprism.checkpoint import safetensors_clip

    assert safetensors_clip(out) == {"num_frames": T, "resolution": R}  # the clip size embed and eval default to


def test_the_decoders_start_from_the_runs_seed_whatever_the_data_drew_before():
    """The decoders were drawn from the global generator after the data was built, so a run with data.val (whose
    loader draws from it) trained from other decoders than the same run without: runs could not be compared."""
    tasks = []
    for drawn_before in (0, 5):
        teacher = Teacher(tiny_clip(0))
        torch.rand(drawn_before)  # what building the data drew
        tasks.append(Stage2Task(tiny_cfg(), Dist(0, 1, torch.device("cpu")), teacher, None))
    a, b = (dict(t.module.named_parameters()) for t in tasks)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = Stage2Task(tiny_cfg("train.seed=1"), Dist(0, 1, torch.device("cpu")), Teacher(tiny_clip(0)), None)
    c = dict(other.module.named_parameters())
    assert not all(torch.equal(a[k], c[k]) for k in a if not k.startswith("student."))


def test_a_safetensors_teacher_sets_the_students_shape_fields(tmp_path):
    """The student is the teacher's encoder: model.* shape fields that contradict it were ignored while config.json
    recorded them, and model.resolution was checked against the preset's patch size, not the teacher's (a valid
    resolution refused, an invalid one passing to fail at the first step)."""
    teacher = str(tmp_path / "teacher.safetensors")
    videoprism.save_safetensors(tiny_clip(0), teacher)  # patch 4, D 16, 2 heads, 2 x 4 x 4 positions
    cfg = build_config("tiny", [f"stage2.teacher={teacher}", "model.resolution=12"], 2)
    m = cfg.model
    assert (m.model_dim, m.num_heads, m.patch_size, m.pos_emb_shape) == (16, 2, P, f"{T},{R // P},{R // P}")
    assert build_config("tiny", [f"stage2.teacher={teacher}", "model.model_dim=16"], 2).model.model_dim == 16
    with pytest.raises(ValueError, match=r"model.model_dim=128 \(the teacher's: 16\), model.num_heads=8 \(the "
                                         r"teacher's: 2\): stage 2's student is stage2.teacher's encoder"):
        build_config("tiny", [f"stage2.teacher={teacher}", "model.model_dim=128", "model.num_heads=8"], 2)
    with pytest.raises(ValueError, match="model.resolution=18 is not a multiple of stage2.teacher's patch size 4"):
        build_config("tiny", [f"stage2.teacher={teacher}", "model.resolution=18"], 2)
    assert build_config("tiny", [f"stage2.teacher={teacher}"], 1).model.model_dim == 64  # stage 1 has no teacher
    # A run's config.json records every field (one written before this recorded the preset's 64): it follows the
    # teacher, as that run's model did, instead of refusing its own resume.
    from videoprism.train.config import save_config

    old = build_config("tiny", [f"train.out_dir={tmp_path}/run"], 2)
    old.stage2.teacher = teacher
    save_config(old, str(tmp_path / "run" / "config.json"), stage=2)
    assert build_config(str(tmp_path / "run" / "config.json"), [], 2).model.model_dim == 16


def test_a_teacher_that_is_no_stage1_model_is_refused_before_the_data(tmp_path):
    """A stage-2 export (an encoder) as the teacher was refused only where the teacher is built, after the data,
    as "holds FactorizedEncoder, not a FactorizedVideoCLIP with its config (save_safetensors writes both)"; a run
    folder got "pass the path of a file"."""
    from videoprism.train.config import check_inputs

    enc = str(tmp_path / "student.safetensors")
    videoprism.save_safetensors(tiny_clip(0).vision_encoder, enc)
    with pytest.raises(ValueError, match="holds a FactorizedEncoder; the teacher is a video-text model with its "
                                         "pooler: a stage-1 run's export"):
        check_inputs(build_config("tiny", [f"stage2.teacher={enc}", f"train.out_dir={tmp_path}/run"], 2), 2)
    with pytest.raises(FileNotFoundError, match=f"pass a run's export .*videoprism export {tmp_path}"):
        check_inputs(build_config("tiny", [f"stage2.teacher={tmp_path}", f"train.out_dir={tmp_path}/run"], 2), 2)


def test_the_global_branch_reads_the_visible_tokens_unshuffled_and_without_positions():
    """DESIGN 5: the global decoder runs over the visible tokens with no shuffle and no position embedding, then
    the MAP pooler. Oracles: its prediction does not move with the slot permutation, the slot position
    embedding or the mask embedding (all of which move the token prediction); and a decoder without position
    embedding followed by attention pooling is blind to the order of its tokens, so reordering them leaves
    the pooled output as it was."""
    task, _ = make_task()
    model = task.module
    inputs = task.prepare({"video": video()}, 0, 0)
    g = torch.Generator().manual_seed(5)
    other = random_slots(4, T * N, generator=g, device="cpu")
    with torch.no_grad():
        tokens, pooled = model(inputs["video"], inputs["pos"], inputs["perm"])
        model.pos_emb.normal_(generator=g)
        model.mask_emb.normal_(generator=g)
        tokens2, pooled2 = model(inputs["video"], inputs["pos"], other)
        x = torch.randn(2, 7, 16, generator=g)
        order = torch.randperm(7, generator=g)
        a = model.global_pooler(model.global_decoder(x))
        b = model.global_pooler(model.global_decoder(x[:, order]))
    assert (tokens2 - tokens).abs().max() > 1e-3
    torch.testing.assert_close(pooled2, pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_saves_nothing_inside_any_block(tmp_path):
    """train.activation_checkpointing recomputes every transformer block in the backward: the forward keeps none of
    a block's activations, only its input. Counted with the autograd saved-tensor hooks (checkpoint's own hooks take
    the saves inside a checkpointed block), block by block, for both stages' modules (the encoder's, the text
    tower's and the stage-2 decoders' torch layers): a block the switch missed would save here and pass the
    loss-equality tests."""
    from videoprism.train.parallel import blocks
    from videoprism.train.stage1 import Stage1Task

    def saves_inside_blocks(task, cfg):
        trainer = make_trainer(task, cfg, torch.device("cpu"), "ckpt")
        inside, saved = [], {}
        for i, block in enumerate(blocks(task.module)):
            block.register_forward_pre_hook(lambda m, a, i=i: inside.append(i))
            block.register_forward_hook(lambda m, a, o: [inside.pop(), None][1])  # a hook's value replaces o

        def pack(t):
            # Tensors with elements: torch 2.11's checkpoint also saves an empty placeholder with a block's input
            # (2 saves a block; 2.14 saves the input alone), which holds no activation.
            if inside and t.numel():
                saved[inside[-1]] = saved.get(inside[-1], 0) + 1
            return t

        inputs = task.prepare(trainer.data.next_batch(0), 0, 0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = task.loss(trainer.model, inputs)
        loss.backward()  # the recomputation runs
        assert all(p.grad is not None for p in task.module.parameters() if p.requires_grad)
        return len(blocks(task.module)), saved

    for ckpt in ("false", "true"):
        task, cfg = make_task(f"train.out_dir={tmp_path}/s2{ckpt}", f"train.activation_checkpointing={ckpt}",
                              "train.compile=false")
        s1_cfg = tiny_cfg(f"train.out_dir={tmp_path}/s1{ckpt}", f"train.activation_checkpointing={ckpt}",
                          "train.compile=false")
        s1 = Stage1Task(s1_cfg, Dist(0, 1, torch.device("cpu")), tiny_clip(), None)
        # Stage 2: the student's spatial and temporal blocks and one torch layer per decoder; stage 1: the video
        # tower's spatial, temporal and auxiliary blocks and the text tower's unimodal one.
        for task_, cfg_, want in ((task, cfg, 4), (s1, s1_cfg, 4)):
            n, saved = saves_inside_blocks(task_, cfg_)
            assert n == want
            assert sorted(saved) == list(range(n)), saved  # the count sees every block
            if ckpt == "true":  # the checkpoint keeps the block's input, nothing computed inside
                assert set(saved.values()) == {1}, saved
            else:
                assert min(saved.values()) >= 8, saved


def test_stage2_distils_from_an_official_npz_teacher_end_to_end(tmp_path, golden_dir, golden_config):
    """stage2.teacher=<the golden LvT .npz, official layout> with no model.* shape field: the student's shape comes
    from the file's arrays, as from a .safetensors teacher's metadata (the tiny preset's patch 8 refused
    model.resolution=36, and its D=64, no auxiliary layer, 32000 words each failed the load naming a key, not the
    field); a field given against the file is refused naming it. The teacher stage 2 builds gives the official
    outputs, the student starts as its encoder, the run trains, its export loads, and a resumed run ends where the
    whole run did."""
    import json
    import os
    import shutil

    import numpy as np

    from tests.test_golden import ATOL
    from videoprism.train import stage2

    teacher = os.path.join(golden_dir, "params_clip.npz")
    clip = ["--config", "tiny", f"stage2.teacher={teacher}", "model.num_frames=4", "model.resolution=36"]
    cfg = build_config(clip[1], clip[2:], 2)
    want = golden_config["clip"]
    for k in ("model_dim", "num_heads", "mlp_dim", "num_spatial_layers", "num_temporal_layers",
              "num_auxiliary_layers", "patch_size"):
        assert getattr(cfg.model, k) == want[k], k
    assert cfg.model.pos_emb_shape == ",".join(map(str, want["pos_emb_shape"]))
    with pytest.raises(ValueError, match=r"^model.model_dim=64 \(the teacher's: 32\): stage 2's student is "):
        build_config(clip[1], [*clip[2:], "model.model_dim=64"], 2)

    built = stage2.build_teacher(cfg, torch.device("cpu"))
    with np.load(os.path.join(golden_dir, "inputs.npz")) as f:
        tokens, pooled = built(torch.from_numpy(f["video"]))
    with np.load(os.path.join(golden_dir, "outputs_clip.npz")) as f:
        np.testing.assert_allclose(pooled.numpy(), f["video_embeddings_unnormalized"], rtol=0, atol=ATOL)
        np.testing.assert_allclose(tokens.numpy(), f["spatiotemporal_features"], rtol=0, atol=ATOL)
    student = Stage2Task(cfg, Dist(0, 1, torch.device("cpu")), built, None).module.student.state_dict()
    assert student.keys() == built.encoder.state_dict().keys()
    assert all(torch.equal(v, built.encoder.state_dict()[k]) for k, v in student.items())

    run = [*clip, "data.source=random", "train.global_batch=2", "train.steps=2", "checkpoint.interval=1",
           "checkpoint.keep=2", "train.log_every=1"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert stage2.main([*run, f"train.out_dir={whole}"]) == 0
    steps = [r for r in map(json.loads, open(whole / "metrics.jsonl")) if "token_loss" in r]
    assert len(steps) == 2 and all(np.isfinite([r["token_loss"], r["global_loss"]]).all() for r in steps)
    exported = videoprism.model_from_safetensors(str(whole / "model.safetensors"), expect="FactorizedEncoder")
    assert exported.config.model_dim == 32 and exported.config.patch_size == 18
    shutil.copytree(whole, part, ignore=shutil.ignore_patterns("step_00000002", "model.safetensors"))
    assert stage2.main([*run, f"train.out_dir={part}", "--resume"]) == 0  # from step 1
    assert open(part / "model.safetensors", "rb").read() == open(whole / "model.safetensors", "rb").read()
