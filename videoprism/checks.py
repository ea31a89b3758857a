"""Checks of the models' and ops' inputs, each failing with a ValueError that names the argument,
what it must be and the fix.

Shape, dtype and device are checked always. Values (ranges, sortedness) are read only where that
costs no wait for the GPU: on the CPU they raise; on a GPU only `pos` is checked, by an
asynchronous device assert (a failure ends the process with the message); inside a compiled graph
none are (a host read there would break the graph; the trainer's inputs come from this package's
loaders and masks, valid by construction).
"""
from __future__ import annotations

import operator

import torch

# A float video outside this range is almost surely in [0, 255] or normalised (mean/std), not in [0, 1];
# the slack leaves room for a resampling filter's overshoot.
_FLOAT_VIDEO_RANGE = (-0.5, 1.5)


def as_int(value) -> int | None:
    """`value` as an int when it is one of any kind (Python's, numpy's, a 0-d integer tensor), else None: not a
    bool, a float (1.7 must not pass as 1) or a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        # As it is: under torch.compile a traced size (a grid's patch count) is an int here, and operator.index
        # would read its value, a guard that compiled a whole-model graph again for every other resolution.
        return value
    try:
        return operator.index(value)
    except TypeError:
        return None


def _read_values(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_device(name: str, t: torch.Tensor, device: torch.device | None) -> None:
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the model on {device}; move it with .to({str(device)!r})")


def check_video(video, patch_size: int, device: torch.device | None = None) -> None:
    """`video` [B, T, H, W, 3], uint8 in [0, 255] or float in [0, 1], frames a multiple of the patch."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[-1] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be a [B, T, H, W, 3] tensor (channels last), got {shape}")
    if video.dtype != torch.uint8 and not video.is_floating_point():
        raise ValueError(f"video must be uint8 in [0, 255] or float in [0, 1], got dtype {video.dtype}")
    B, T, H, W, _ = video.shape
    if B < 1 or T < 1:
        raise ValueError(f"video holds no clip or no frame: shape {tuple(video.shape)}; pass B >= 1 clips of T >= 1 "
                         "frames")
    if H < patch_size or W < patch_size or H % patch_size or W % patch_size:
        raise ValueError(f"video frames of {H}x{W} pixels are not a multiple of patch_size {patch_size}; "
                         f"resize or crop to e.g. {max(1, H // patch_size) * patch_size} pixels")
    _check_device("video", video, device)
    if video.is_floating_point() and _read_values(video):
        # Detached: no warning for an input that needs grad. NaN passes (the comparisons are false for it): a
        # training step whose batch holds one is skipped as a non-finite loss, not ended here.
        lo, hi = (float(v) for v in torch.aminmax(video.detach()))
        if lo < _FLOAT_VIDEO_RANGE[0] or hi > _FLOAT_VIDEO_RANGE[1]:
            raise ValueError(f"video values span [{lo:g}, {hi:g}]: a float video must be in [0, 1] (divide a 0-255 "
                             "video by 255, undo a mean/std normalisation, or pass uint8)")


def check_paddings(name: str, paddings, shape: tuple[int, ...], device: torch.device | None = None) -> None:
    """`paddings` of `shape` (float, int or bool), 1 (True) = padded, 0 = real: nothing in between."""
    if not isinstance(paddings, torch.Tensor) or tuple(paddings.shape) != tuple(shape):
        got = tuple(paddings.shape) if isinstance(paddings, torch.Tensor) else type(paddings).__name__
        raise ValueError(f"{name} must be a {list(shape)} tensor (1 = padded, 0 = real), got {got}")
    if paddings.is_complex():
        raise ValueError(f"{name} must be float (1.0 = padded), bool (True = padded) or int, got {paddings.dtype}")
    _check_device(name, paddings, device)
    if paddings.dtype != torch.bool and _read_values(paddings) and not ((paddings == 0) | (paddings == 1)).all():
        raise ValueError(f"{name} must hold only 0 (real) and 1 (padded), got values such as "
                         f"{paddings[(paddings != 0) & (paddings != 1)][:3].tolist()}")


def check_text_ids(ids, vocabulary_size: int, device: torch.device | None = None) -> None:
    """`ids` [B, L] integer token ids in [0, vocabulary_size)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"text_ids must be a [B, L] tensor of token ids, got {got}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"text_ids must be integer token ids (int64, as videoprism.data.text.Tokenizer returns), "
                         f"got {ids.dtype}")
    if ids.shape[0] < 1:
        raise ValueError("text_ids holds no text (B = 0); pass at least one")
    _check_device("text_ids", ids, device)
    if ids.numel() and _read_values(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocabulary_size:
            raise ValueError(f"text_ids span [{lo}, {hi}] but the model's vocabulary_size is {vocabulary_size}; "
                             "tokenize with the model's SentencePiece model (or build the model with that "
                             "tokenizer's vocabulary_size)")


def check_pos(pos, num_patches: int | None = None, device: torch.device | None = None) -> None:
    """`pos` [B, T, K] integer visible patch indices: K >= 1, each frame's in increasing order
    without repeats (the masked time axis finds a location's frames by binary search), within
    [0, num_patches) when that is given."""
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3:
        got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"pos must be a [B, T, K] tensor of visible patch indices, got {got}")
    if pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos must hold integer patch indices, int64 (or int32) as videoprism.masking returns "
                         f"them, got {pos.dtype}")
    if pos.shape[-1] < 1:
        raise ValueError("pos keeps no patch (K = 0); a mask must keep at least one patch per frame")
    _check_device("pos", pos, device)
    if torch.compiler.is_compiling():
        return
    ok = (pos >= 0).all() if num_patches is None else ((pos >= 0) & (pos < num_patches)).all()
    if pos.shape[-1] > 1:
        ok = ok & (pos[..., 1:] > pos[..., :-1]).all()
    grid = "" if num_patches is None else f" in [0, {num_patches})"
    msg = (f"pos must hold each frame's visible patch indices{grid} in increasing order without repeats (as "
           "videoprism.masking returns them); sort them with pos.sort(-1).values")
    if pos.device.type == "cpu":
        if not bool(ok):
            raise ValueError(msg)
    elif pos.device.type != "meta":
        torch._assert_async(ok, msg)
