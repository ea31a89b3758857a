"""The DALI graph on the GPU (NVDEC) against the same graph on the CPU, with no PyAV anywhere in the path.

It runs on the lent GPU machines, which have neither PyAV nor FFmpeg nor ../shared, once bench/dali_wheel.sh has
installed DALI there. Clips: DIR/clips.jsonl of `python -m bench.data --write-clips DIR` (its probe fields give codec,
frame count and size, so nothing is demuxed), from $VIDEOPRISM_DALI_CLIPS or .device/dali_clips (written by
`bench/dali_wheel.sh prepare`, carried by the device call); where neither exists but PyAV does, the synthetic part of
the set is written to a temp folder. The CPU graph is the oracle: its logic is covered against PyAV in
test_data_dali.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (GPU machines: bench/dali_wheel.sh install)")

from videoprism.data.dali_pipeline import DaliClips, clip_plan  # noqa: E402
from videoprism.data.manifest import read_source  # noqa: E402
from videoprism.data.transforms import Augment  # noqa: E402

from .conftest import psnr  # noqa: E402

pytestmark = pytest.mark.gpu

CLIPS = os.environ.get("VIDEOPRISM_DALI_CLIPS",
                       os.path.join(os.path.dirname(__file__), "..", ".device", "dali_clips"))
VP9, VP9_B, H264 = "synth_vp9/clips/000000.webm", "synth_vp9/clips/000001.webm", "synth_h264/clips/000000.mp4"
T = 16


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """{path relative to the set: Sample with probe fields}."""
    root = CLIPS
    if not os.path.isfile(os.path.join(root, "clips.jsonl")):
        try:
            import av  # noqa: F401  (write_clips encodes with it)
        except ImportError:
            pytest.skip(f"no clip set at {root} (bench/dali_wheel.sh prepare writes it, the device call carries it) "
                        "and no PyAV to write one")
        from bench.data import write_clips

        root = str(tmp_path_factory.mktemp("dali_clips"))
        write_clips(root, T, hd=False)
    samples, _ = read_source(os.path.join(root, "clips.jsonl"))
    return {os.path.relpath(s.path, root): s for s in samples}


def run(device, samples, boxes=None, size=None, flips=None, frames=None):
    """The graph on `device` over a batch: list of uint8 [T, R, R, 3] (R = `size`, else the frame height)."""
    plans = [clip_plan(s, T) for s in samples]
    size = size or plans[0][2]
    dali = DaliClips(batch_size=len(samples), num_frames=T, resolution=size, device=torch.device(device))
    return dali.run([s.read_bytes() for s in samples], frames or [p[1] for p in plans],
                    boxes or [(0, 0, p[2], p[3]) for p in plans], flips or [False] * len(samples))[0]


def check_video(v, size):
    assert v.shape == (T, size, size, 3) and v.dtype == torch.uint8 and v.device.type == "cuda"
    # Real frames: not blank (DALI returns zeros past a cut), with content that changes over time.
    assert v.amax().item() > 0 and v.float().std().item() > 5
    assert v.reshape(T, -1).amax(1).min().item() > 0
    assert (v[0].float() - v[-1].float()).abs().mean().item() > 1


def every_frame_on_cpu(sample):
    """All frames of a clip from the CPU graph (no resize): uint8 [N, H, W, 3]."""
    n = sample.probe["frames"]
    return torch.cat([run("cpu", [sample], frames=[list(range(i, min(i + T, n)))])[0] for i in range(0, n, T)])


def check_same_frames(gpu, frames, every, min_db):
    """Each GPU frame matches the CPU frame of the same index, and matches it better than its neighbours."""
    for k, i in enumerate(frames):
        scores = {j: psnr(gpu[k], every[j]) for j in (i - 1, i, i + 1) if 0 <= j < len(every)}
        assert scores[i] >= min_db and max(scores, key=scores.get) == i, (k, i, scores)
    assert psnr(gpu, every[frames]) >= min_db


def test_gpu_graph_gives_the_cpu_graph_frames_on_vp9(clips):
    s = clips[VP9]
    codec, frames, h, w, _, _ = clip_plan(s, T)
    assert codec == "vp9" and frames == [i * s.probe["frames"] // T for i in range(T)]
    (gpu,) = run("cuda", [s])
    check_video(gpu, h)
    check_same_frames(gpu.cpu(), frames, every_frame_on_cpu(s), 40)


def test_gpu_training_transform_matches_the_cpu_graph_on_a_batch(clips):
    """Random resized crops, a flip, two different clips in one batch, 16 x 288 x 288."""
    samples = [clips[VP9], clips[VP9_B], clips[VP9]]
    augs = [Augment.draw(np.random.default_rng(seed), flip_prob=0.5) for seed in (1, 2, 3)]
    assert any(a.flip for a in augs) and not all(a.flip for a in augs)
    h, w = samples[0].probe["height"], samples[0].probe["width"]
    boxes, flips = [a.box(h, w) for a in augs], [a.flip for a in augs]
    gpu = run("cuda", samples, boxes, 288, flips)
    cpu = run("cpu", samples, boxes, 288, flips)
    for g, c in zip(gpu, cpu):
        check_video(g, 288)
        assert psnr(g.cpu(), c) >= 40
    assert psnr(gpu[0].cpu(), gpu[1].cpu()) < 30  # the batch kept its samples apart


def test_gpu_decodes_h264_to_the_frames_of_its_vp9_twin(clips):
    """NVDEC takes H.264 (the CPU graph does not): the synthetic H.264 clip shows the scene of the VP9 one (the same
    seed), so the CPU graph's VP9 frames are the oracle up to the two codecs' losses (~35 dB measured with PyAV,
    ~23 dB to the neighbouring frame)."""
    (gpu,) = run("cuda", [clips[H264]])
    codec, frames, h, _, _, _ = clip_plan(clips[H264], T)
    assert codec == "h264" and frames == clip_plan(clips[VP9], T)[1]
    check_video(gpu, h)
    check_same_frames(gpu.cpu(), frames, every_frame_on_cpu(clips[VP9]), 30)


def test_gpu_output_reaches_torch_through_dlpack_without_a_host_copy(clips, monkeypatch):
    from nvidia.dali import backend

    def no_host_copy(*_):
        raise AssertionError("DALI output copied to the host")

    for cls in (backend.TensorListGPU, backend.TensorGPU):
        monkeypatch.setattr(cls, "as_cpu", no_host_copy)
    seen = []
    from_dlpack = torch.from_dlpack

    def spy(x):
        y = from_dlpack(x)
        seen.append((type(x).__name__, x.data_ptr(), y.data_ptr(), y.device.type))
        return y

    monkeypatch.setattr(torch, "from_dlpack", spy)
    (video,) = run("cuda", [clips[VP9]], size=288)
    check_video(video, 288)
    # torch saw DALI's device buffer itself (same address): a view, no copy through host memory.
    assert len(seen) == 1 and seen[0][0] == "TensorGPU" and seen[0][1] == seen[0][2] and seen[0][3] == "cuda", seen


def test_gpu_graph_returns_without_waiting_for_work_queued_before_it(clips):
    """The copy out of DALI and the blank-frame check run on the loader's own stream: a spin queued on the
    consumer's stream (a training step, ~2 s) is still running when run() returns; the clips are ordered
    before the consumer's next work."""
    _, frames, h, w, _, _ = clip_plan(clips[VP9], T)
    args = ([clips[VP9].read_bytes()], [frames], [(0, 0, h, w)], [False])
    dali = DaliClips(batch_size=1, num_frames=T, resolution=288, device=torch.device("cuda"))
    dali.run(*args)                               # builds the pipeline
    torch.cuda.synchronize()
    torch.cuda._sleep(4_000_000_000)
    queued = torch.cuda.Event()
    queued.record()
    (video,), (blank,) = dali.run(*args)
    assert not queued.query(), "run() waited for the work queued on the current stream"
    assert not blank
    check_video(video, 288)
