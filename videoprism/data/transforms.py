"""Frame sampling and the spatial transforms, shared by every decoder so that all backends give the same outputs.

Temporal: `uniform_indices(n, t)` picks frame `floor(i * n / t)` for i < t, as the official VideoPrism demo does
(`np.linspace(0, n, t, endpoint=False)` rounded down): the first frame of each of t equal segments.

Spatial: each sample gets a crop box in source pixels plus a horizontal flip, then the box is resized to
`resolution x resolution` (bilinear, antialiased when shrinking):
* eval: the centred square of side min(H, W), i.e. "resize the shorter side, centre crop";
* train: random resized crop (area share in `scale`, aspect ratio log-uniform in `ratio`, one box for all frames of
  the clip so motion is kept) and a horizontal flip with probability `flip_prob`, 0 by default: a flip turns a clip
  that "moves left" into one that moves right, so it is wrong for captions (and labels) that name a horizontal
  direction, as the embedded synthetic data's do. Raise it only for data whose captions are mirror-invariant.
The random draws are made up front (`Augment`), from a generator keyed by (seed, epoch, sample), before the frame
size is known; `box(h, w)` turns them into pixels. So a sample's transform depends only on the key, never on the
decoder, the worker or the order in which samples are decoded.

Orientation: a video whose container says to turn it for display (a phone's portrait clip: stored landscape, with a
display-matrix rotation) is transformed upright, as players and the ffmpeg command line show it. The crop box is
drawn in the upright frame; a decoder that outputs stored frames crops the same pixels (`stored_box`) and turns
the result.

Colour: YUV frames become RGB with the colour matrix their stream declares (BT.709 for most HD video), as PyAV,
players and the ffmpeg command line convert them. DALI's decoders convert every YUV stream with BT.601; its graph
turns that RGB into the declared matrix's (`matrix_fix`), a linear map of RGB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TRAIN_SCALE = (0.4, 1.0)  # area share of the crop: milder than ImageNet's 0.08, as video-text models use
TRAIN_RATIO = (3 / 4, 4 / 3)
TRAIN_FLIP_PROB = 0.0  # see the module docstring: flips contradict left/right captions


def uniform_indices(n: int, t: int) -> list[int]:
    """Indices of t frames spread uniformly over n (n >= t): the first frame of each of t equal segments."""
    if t < 1 or n < t:
        raise ValueError(f"uniform_indices needs 1 <= t <= n, got n={n}, t={t}")
    return [i * n // t for i in range(t)]


@dataclass(frozen=True)
class Augment:
    """One sample's spatial transform, drawn before the frame size is known. `train=False` is the eval transform."""

    train: bool = False
    area: float = 1.0  # share of the frame's area covered by the crop
    log_ratio: float = 0.0  # log(width / height) of the crop
    u: float = 0.5  # horizontal position of the crop in [0, 1] (0: left edge)
    v: float = 0.5  # vertical position in [0, 1]
    flip: bool = False

    @staticmethod
    def draw(rng: np.random.Generator, scale=TRAIN_SCALE, ratio=TRAIN_RATIO,
             flip_prob: float = TRAIN_FLIP_PROB) -> "Augment":
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}; use 0 for captions that name "
                             "left/right")
        # The flip draw is made whatever flip_prob is, so the crop of a sample does not depend on it.
        return Augment(train=True, area=float(rng.uniform(*scale)),
                       log_ratio=float(rng.uniform(math.log(ratio[0]), math.log(ratio[1]))),
                       u=float(rng.random()), v=float(rng.random()), flip=bool(rng.random() < flip_prob))

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(y0, x0, crop_h, crop_w) in source pixels."""
        if not self.train:
            side = min(h, w)
            return (h - side) // 2, (w - side) // 2, side, side
        aspect = math.exp(self.log_ratio)
        cw, ch = math.sqrt(self.area * h * w * aspect), math.sqrt(self.area * h * w / aspect)
        # A box wider or taller than the frame shrinks as a whole, keeping its aspect ratio (clamping
        # one side alone would leave the ratio range, and the resize would stretch the content).
        fit = min(1.0, w / cw, h / ch)
        cw, ch = min(w, max(1, round(cw * fit))), min(h, max(1, round(ch * fit)))
        y0 = min(h - ch, int(self.v * (h - ch + 1)))
        x0 = min(w - cw, int(self.u * (w - cw + 1)))
        return y0, x0, ch, cw


def quarter_turns(degrees: float) -> int:
    """Counterclockwise quarter turns (0-3) that show a stored frame upright, from its display rotation in degrees
    counterclockwise (PyAV's `VideoFrame.rotation`, ffprobe's side-data `rotation`); np.rot90/torch.rot90 turn it."""
    return round(degrees / 90) % 4


# Luma weights (Kr, Kb) of the YUV colour matrices FFmpeg converts with, by name; a stream's declared matrix (H.273
# MatrixCoefficients, FFmpeg's AVColorSpace) -> name. Every other value converts as BT.601 (unspecified, BT.470BG,
# SMPTE 170M), but those FFmpeg cannot convert (YCgCo, ICtCp: `data index` rejects them).
LUMA_WEIGHTS = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "fcc": (0.30, 0.11), "smpte240m": (0.212, 0.087),
                "bt2020": (0.2627, 0.0593)}
_MATRIX_NAMES = {1: "bt709", 4: "fcc", 7: "smpte240m", 9: "bt2020"}


def yuv_matrix(colorspace: int, is_rgb: bool) -> str:
    """The name (LUMA_WEIGHTS) of the matrix a frame of FFmpeg colorspace `colorspace` converts to RGB with; "bt601"
    for an RGB frame (`is_rgb`: no matrix, so nothing for `matrix_fix` to change)."""
    return "bt601" if is_rgb else _MATRIX_NAMES.get(colorspace, "bt601")


def _rgb_to_ycbcr(matrix: str) -> np.ndarray:
    kr, kb = LUMA_WEIGHTS[matrix]
    kg = 1.0 - kr - kb
    return np.array([[kr, kg, kb],
                     [-kr / (2 * (1 - kb)), -kg / (2 * (1 - kb)), 0.5],
                     [0.5, -kg / (2 * (1 - kr)), -kb / (2 * (1 - kr))]])


def matrix_fix(matrix: str) -> np.ndarray:
    """float32 [3, 3] M with rgb = M @ rgb_601: the RGB of YUV converted with `matrix` from its RGB converted with
    BT.601 (both from the same Y'CbCr, in the same range: the offsets and range scales cancel). Identity for
    BT.601 (exactly: the map changes no value of such a clip); a grey stays grey under any M."""
    if matrix == "bt601":
        return np.eye(3, dtype=np.float32)
    return (np.linalg.inv(_rgb_to_ycbcr(matrix)) @ _rgb_to_ycbcr("bt601")).astype(np.float32)


def stored_box(box: tuple[int, int, int, int], turns: int, h: int, w: int) -> tuple[int, int, int, int]:
    """The box (y0, x0, crop_h, crop_w) of an upright frame, np.rot90(stored, turns), as a box of the stored frame
    of height `h` and width `w` (the same pixels)."""
    y, x, bh, bw = box
    turns %= 4
    if turns == 1:  # upright[i, j] = stored[j, w - 1 - i]
        return x, w - y - bh, bw, bh
    if turns == 2:  # upright[i, j] = stored[h - 1 - i, w - 1 - j]
        return h - y - bh, w - x - bw, bh, bw
    if turns == 3:  # upright[i, j] = stored[h - 1 - j, i]
        return h - x - bw, y, bw, bh
    return box


def apply_augment(frames: torch.Tensor, aug: Augment, resolution: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, resolution, resolution, 3]: crop the box, resize, flip."""
    y0, x0, ch, cw = aug.box(frames.shape[1], frames.shape[2])
    crop = frames[:, y0:y0 + ch, x0:x0 + cw].permute(0, 3, 1, 2)  # NCHW view with channels-last strides
    if (ch, cw) != (resolution, resolution):
        # uint8 channels-last bilinear with antialias has a fast CPU kernel; no float copy of the frames.
        crop = F.interpolate(crop, size=(resolution, resolution), mode="bilinear", antialias=True,
                             align_corners=False)
    if aug.flip:
        crop = crop.flip(3)
    return crop.permute(0, 2, 3, 1).contiguous()
