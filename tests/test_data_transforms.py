"""Training transforms: horizontal flips are off unless asked for (captions name left/right), and a flip mirrors."""
import math

import numpy as np
import pytest
import torch

from videoprism.data.transforms import Augment, apply_augment


def _draws(n, **kw):
    return [Augment.draw(np.random.default_rng([7, i]), **kw) for i in range(n)]


def test_default_training_draw_never_flips():
    # "moves left" becomes wrong under a mirror: the default must not flip any sample.
    assert not any(a.flip for a in _draws(200))


def test_flip_prob_flips_its_share_and_leaves_the_crop_alone():
    never, half, always = _draws(400, flip_prob=0.0), _draws(400, flip_prob=0.5), _draws(400, flip_prob=1.0)
    assert all(a.flip for a in always)
    assert 0.4 < np.mean([a.flip for a in half]) < 0.6
    # The crop of sample i is the same whatever the flip probability (one random stream, same draws).
    strip = lambda a: (a.area, a.log_ratio, a.u, a.v)  # noqa: E731
    assert [strip(a) for a in never] == [strip(a) for a in half] == [strip(a) for a in always]


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_flip_prob_out_of_range_is_refused(p):
    with pytest.raises(ValueError, match="flip_prob"):
        Augment.draw(np.random.default_rng(0), flip_prob=p)


def test_flip_mirrors_the_frames():
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8))
    aug = Augment(train=True, area=1.0, flip=False)
    plain = apply_augment(frames, aug, 20)
    mirrored = apply_augment(frames, Augment(train=True, area=1.0, flip=True), 20)
    assert torch.equal(plain, frames)  # full-frame box at the same size: no resampling
    assert torch.equal(mirrored, torch.from_numpy(frames.numpy()[:, :, ::-1].copy()))


def _white_box(t, h, w, y0, x0, ch, cw):
    """uint8 [t, h, w, 3] frames, black but for a white (y0, x0, ch, cw) box."""
    frames = torch.zeros(t, h, w, 3, dtype=torch.uint8)
    frames[:, y0:y0 + ch, x0:x0 + cw] = 255
    return frames


@pytest.mark.parametrize("h, w", [(40, 60), (60, 40)])
def test_the_output_shows_exactly_the_box(h, w):
    """apply_augment resizes the crop box, nothing else: with the frames white inside the box and black outside,
    every output pixel is white. Boxes of train draws (of both orientations) and the eval box, whose oracle
    is its definition: the centred square of side min(H, W)."""
    side = min(h, w)
    boxes = [(Augment(), ((h - side) // 2, (w - side) // 2, side, side))]
    for aug in _draws(40):
        y0, x0, ch, cw = aug.box(h, w)
        assert 0 <= y0 and y0 + ch <= h and 0 <= x0 and x0 + cw <= w
        boxes.append((aug, (y0, x0, ch, cw)))
    assert any(b[2] > b[3] for _, b in boxes) and any(b[3] > b[2] for _, b in boxes)  # tall and wide boxes
    for aug, box in boxes:
        out = apply_augment(_white_box(2, h, w, *box), aug, 16)
        assert out.shape == (2, 16, 16, 3)
        assert bool((out == 255).all()), (aug, box)


def test_train_crop_positions_cover_the_frame_edge_to_edge():
    """u = v = 0 puts the box at the top-left corner, u, v -> 1 at the bottom-right one, and u, v in [0, 1)
    reach each of the W - cw + 1 (H - ch + 1) positions, as a uniformly random crop position must."""
    h, w = 40, 50
    at = lambda u, v: Augment(train=True, area=0.25, log_ratio=0.0, u=u, v=v).box(h, w)  # noqa: E731
    y0, x0, ch, cw = at(0.0, 0.0)
    assert (y0, x0) == (0, 0) and (ch, cw) == (22, 22)
    y0, x0, ch, cw = at(0.9999, 0.9999)
    assert y0 + ch == h and x0 + cw == w
    grid = [i / 1000 for i in range(1000)]
    assert {at(u, 0.5)[1] for u in grid} == set(range(w - cw + 1))
    assert {at(0.5, v)[0] for v in grid} == set(range(h - ch + 1))


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_a_box_of_the_upright_frame_crops_the_same_pixels_of_the_stored_one(turns):
    """stored_box against np.rot90 (the oracle): the upright frame's box and the stored frame's box, turned, hold the
    same pixels, for boxes anywhere in a non-square frame."""
    from videoprism.data.transforms import stored_box

    h, w = 7, 12
    stored = np.arange(h * w).reshape(h, w)
    upright = np.rot90(stored, turns)
    rng = np.random.default_rng(turns)
    for _ in range(50):
        bh, bw = rng.integers(1, upright.shape[0] + 1), rng.integers(1, upright.shape[1] + 1)
        y, x = rng.integers(0, upright.shape[0] - bh + 1), rng.integers(0, upright.shape[1] - bw + 1)
        sy, sx, sh, sw = stored_box((y, x, bh, bw), turns, h, w)
        assert 0 <= sy and 0 <= sx and sy + sh <= h and sx + sw <= w
        np.testing.assert_array_equal(np.rot90(stored[sy:sy + sh, sx:sx + sw], turns), upright[y:y + bh, x:x + bw])


def test_quarter_turns_of_a_display_rotation():
    from videoprism.data.transforms import quarter_turns

    assert [quarter_turns(d) for d in (0, 90, 180, -180, -90, 270, 89.9)] == [0, 1, 2, 2, 3, 3, 1]


def test_train_box_size_from_area_and_aspect_by_hand():
    """The box's width / height is exp(log_ratio) and its area `area` * H * W, rounded to pixels; a box too
    large for the frame shrinks as a whole to the largest one of that aspect that fits. Values by hand."""
    r = math.log(4 / 3)
    # 120x120, area 1/4, w/h = 4/3: cw = sqrt(3600 * 4/3) = 69.28, ch = sqrt(3600 * 3/4) = 51.96.
    assert Augment(train=True, area=0.25, log_ratio=r, u=0.0, v=0.0).box(120, 120) == (0, 0, 52, 69)
    assert Augment(train=True, area=0.25, log_ratio=-r, u=0.0, v=0.0).box(120, 120) == (0, 0, 69, 52)
    # 180x320, the whole area at 4/3 (277 x 208) is taller than the frame: the full height, 240 wide.
    assert Augment(train=True, area=1.0, log_ratio=r, u=0.0, v=0.0).box(180, 320) == (0, 0, 180, 240)
    # 320x180 at 3/4: the full width, 240 tall.
    assert Augment(train=True, area=1.0, log_ratio=-r, u=0.0, v=0.0).box(320, 180) == (0, 0, 240, 180)


def test_draw_area_uniform_in_scale_and_aspect_log_uniform_in_ratio():
    """The area share is uniform in `scale` and the aspect ratio log-uniform in `ratio` (the module docstring):
    with ratio (1/2, 2) log-uniform puts half the draws below 1, uniform in the ratio only a third."""
    draws = [Augment.draw(np.random.default_rng([3, i]), scale=(0.2, 0.5), ratio=(0.5, 2.0)) for i in range(2000)]
    area = np.array([a.area for a in draws])
    log_ratio = np.array([a.log_ratio for a in draws])
    assert area.min() >= 0.2 and area.max() <= 0.5 and area.min() < 0.21 and area.max() > 0.49
    assert abs(area.mean() - 0.35) < 0.01
    assert log_ratio.min() >= math.log(0.5) and log_ratio.max() <= math.log(2.0)
    assert 0.46 < np.mean(log_ratio < 0) < 0.54


def _ffmpeg_rgb(ycbcr: np.ndarray, colorspace: int) -> np.ndarray:
    """FFmpeg's (PyAV's) RGB of uint8 [N, 3] limited-range Y'CbCr samples in a yuv444p frame of `colorspace`."""
    av = pytest.importorskip("av")
    frame = av.VideoFrame(len(ycbcr), 1, "yuv444p")
    for plane, values in zip(frame.planes, ycbcr.T):
        row = np.zeros(plane.line_size, np.uint8)
        row[:len(values)] = values
        plane.update(row.tobytes())
    frame.colorspace = colorspace
    return frame.reformat(format="rgb24").to_ndarray()[0].astype(np.float64)


def test_a_bt601_conversion_mapped_by_matrix_fix_is_ffmpegs_conversion_with_the_declared_matrix():
    """DALI converts every YUV stream with BT.601; its graph maps that RGB with `matrix_fix` to the RGB of the matrix
    the stream declares, which PyAV converts with. The oracle is FFmpeg's converter: for every colorspace value it
    takes, its RGB is that of the matrix `yuv_matrix` names, and BT.601's RGB mapped by that matrix's fix is it, to
    FFmpeg's rounding (colours that stay inside the RGB cube under both matrices)."""
    from videoprism.data.transforms import LUMA_WEIGHTS, matrix_fix, yuv_matrix

    rng = np.random.default_rng(0)
    ycbcr = np.stack([rng.integers(16, 236, 4000), rng.integers(72, 185, 4000), rng.integers(72, 185, 4000)], 1)
    canonical = {"bt601": 5, "bt709": 1, "fcc": 4, "smpte240m": 7, "bt2020": 9}  # AVColorSpace of each name
    assert set(canonical) == set(LUMA_WEIGHTS)
    bt601 = _ffmpeg_rgb(ycbcr, 5)
    for colorspace in range(18):
        try:
            rgb = _ffmpeg_rgb(ycbcr, colorspace)
        except Exception:  # av.error.FFmpegError: a matrix this FFmpeg cannot convert (data index rejects those)
            continue
        name = yuv_matrix(colorspace, is_rgb=False)
        np.testing.assert_array_equal(rgb, _ffmpeg_rgb(ycbcr, canonical[name]), err_msg=f"colorspace {colorspace}")
        inside = ((bt601 > 2) & (bt601 < 253) & (rgb > 2) & (rgb < 253)).all(1)
        assert inside.sum() > 1000
        fixed = bt601[inside] @ matrix_fix(name).astype(np.float64).T
        assert np.abs(fixed - rgb[inside]).max() <= 2.5, (colorspace, name)
    assert yuv_matrix(1, is_rgb=True) == "bt601"  # an RGB frame has no matrix: nothing to map
    np.testing.assert_array_equal(matrix_fix("bt601"), np.eye(3))
    assert np.allclose(matrix_fix("bt709") @ np.full(3, 100.0), 100.0, atol=1e-3)  # a grey stays grey
