"""Weights: the official Flax `.npz` checkpoints (read) and our safetensors (read/write).

Official layout (golden NOTES.md §1): one float32 array per Flax leaf, key = the tree
path joined with "/" including the leading "params/"; transformer stacks were built
with `nn.scan`, so every leaf under `.../x_layers/` has a leading layer axis.

`load_flax_checkpoint` is strict: every array of the file is used, every parameter
of the model is filled, every shape is checked (an error names the key and both
shapes), pickled arrays are refused, and nothing is written into the model until
the whole file has been converted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
import zlib
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch
from torch import nn

from videoprism.classifier import FactorizedVideoClassifier
from videoprism.config import narrow_config
from videoprism.clip import FactorizedVideoCLIP
from videoprism.encoder import FactorizedEncoder
from videoprism.layers import AttentionPooler, TransformerStack
from videoprism.paths import atomic_path, json_loads, new_file_mode, shortened, shown, shown_each


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (names the file, the key and the fix)."""


# A converter receives the array and returns [(torch name, row slice or None, tensor)].
Fill = Callable[[np.ndarray], list]


class _Layout:
    """The expected flax keys of a model, each with its shape and its converter."""

    def __init__(self):
        self.entries: dict[str, tuple[tuple[int, ...], Fill]] = {}

    def add(self, key: str, shape, fill: Fill) -> None:
        self.entries[key] = (tuple(int(s) for s in shape), fill)

    def param(self, key: str, name: str, shape, transform=lambda a: a) -> None:
        self.add(key, shape, lambda a: [(name, None, transform(a))])

    def dense(self, key: str, name: str, linear: nn.Linear) -> None:
        """flax Dense: kernel [in, out] -> weight = kernel.T."""
        self.param(f"{key}/kernel", f"{name}.weight", (linear.in_features, linear.out_features), lambda a: a.T)
        self.param(f"{key}/bias", f"{name}.bias", (linear.out_features,))

    def layer_norm(self, key: str, name: str, ln: nn.LayerNorm) -> None:
        """Stored scale is gamma - 1."""
        (d,) = ln.normalized_shape
        self.param(f"{key}/scale", f"{name}.weight", (d,), lambda a: 1.0 + a)
        self.param(f"{key}/bias", f"{name}.bias", (d,))

    def attention_projections(self, key: str, name: str, q: str, k: str, v: str, post: str,
                              dim: int, heads: int, head_dim: int) -> list:
        """[(flax key, shape, fill)] of q/k/v/post `w [D, N, H]`, `b [N, H]`, `post/b [D]`.

        q, k, v name (linear, row offset) pairs: the fused qkv projection takes three slices."""
        nh = heads * head_dim
        out = []
        for which, (lin, off) in zip(("query", "key", "value"), (q, k, v)):
            rows = slice(off, off + nh)
            out.append((f"{key}/{which}/w", (dim, heads, head_dim),
                        lambda a, lin=lin, rows=rows: [(f"{name}{lin}.weight", rows, a.reshape(dim, nh).T)]))
            out.append((f"{key}/{which}/b", (heads, head_dim),
                        lambda a, lin=lin, rows=rows: [(f"{name}{lin}.bias", rows, a.reshape(nh))]))
        out.append((f"{key}/post/w", (dim, heads, head_dim),
                    lambda a: [(f"{name}{post}.weight", None, a.reshape(dim, nh))]))
        out.append((f"{key}/post/b", (dim,), lambda a: [(f"{name}{post}.bias", None, a)]))
        return out

    def stack(self, key: str, name: str, stack: TransformerStack) -> None:
        """Scan-stacked layers: every leaf has a leading layer axis; layer i = arr[i]."""
        L = len(stack.layers)
        if L == 0:
            return
        blk = stack.layers[0]
        D = blk.ln_attn.normalized_shape[0]
        H, Dh = blk.attn.num_heads, blk.attn.head_dim
        F = blk.ffn.fc1.out_features
        hybrid = isinstance(blk.post_ln_attn, nn.LayerNorm)
        per_layer = []  # (sub key, shape, fill(arr_i, i))
        ln_names = [("pre_layer_norm" if hybrid else "layer_norm", "ln_attn"),
                    ("ff_layer/pre_layer_norm" if hybrid else "ff_layer/layer_norm", "ln_ffn")]
        if hybrid:
            ln_names += [("post_layer_norm", "post_ln_attn"), ("ff_layer/post_layer_norm", "post_ln_ffn")]
        for sub, mod in ln_names:
            per_layer.append((f"{sub}/scale", (D,), lambda a, i, m=mod: [(f"{name}.layers.{i}.{m}.weight", None, 1.0 + a)]))
            per_layer.append((f"{sub}/bias", (D,), lambda a, i, m=mod: [(f"{name}.layers.{i}.{m}.bias", None, a)]))
        for sub, fc, shape in (("ffn_layer1", "fc1", (D, F)), ("ffn_layer2", "fc2", (F, D))):
            per_layer.append((f"ff_layer/{sub}/linear/kernel", shape,
                              lambda a, i, fc=fc: [(f"{name}.layers.{i}.ffn.{fc}.weight", None, a.T)]))
            per_layer.append((f"ff_layer/{sub}/linear/bias", shape[1:],
                              lambda a, i, fc=fc: [(f"{name}.layers.{i}.ffn.{fc}.bias", None, a)]))
        proj = self.attention_projections("self_attention", "", ("qkv", 0), ("qkv", H * Dh), ("qkv", 2 * H * Dh),
                                          "post", D, H, Dh)
        for sub, shape, fill in proj:
            per_layer.append((sub, shape, lambda a, i, fill=fill: [
                (f"{name}.layers.{i}.attn.{n}", rows, t) for n, rows, t in fill(a)]))
        for sub, shape, fill in per_layer:
            self.add(f"{key}/x_layers/{sub}", (L, *shape),
                     lambda a, fill=fill: [item for i in range(L) for item in fill(a[i], i)])

    def pooler(self, key: str, name: str, pooler: AttentionPooler) -> None:
        D = pooler.query.shape[-1]
        self.param(f"{key}/pooling_attention_query", f"{name}.query", (1, D))
        for k, shape, fill in self.attention_projections("pooling_attention", f"{name}.", ("q", 0), ("k", 0),
                                                         ("v", 0), "post", D, pooler.num_heads, pooler.head_dim):
            self.add(f"{key}/{k}", shape, fill)
        self.param(f"{key}/pooling_attention/per_dim_scale/per_dim_scale", f"{name}.per_dim_scale", (pooler.head_dim,))
        self.layer_norm(f"{key}/pooling_attention_layer_norm", f"{name}.ln", pooler.ln)

    def encoder(self, key: str, name: str, enc: FactorizedEncoder) -> None:
        p = f"{name}." if name else ""
        self.dense(f"{key}patch_projection/linear", f"{p}patch_projection", enc.patch_projection)
        self.param(f"{key}spatial_pos_emb/emb_var", f"{p}spatial_pos_emb", enc.spatial_pos_emb.shape)
        self.param(f"{key}temporal_pos_emb/emb_var", f"{p}temporal_pos_emb", enc.temporal_pos_emb.shape)
        self.stack(f"{key}spatial_encoder/transformers_stack", f"{p}spatial_encoder", enc.spatial_encoder)
        self.stack(f"{key}temporal_encoder/transformers_stack", f"{p}temporal_encoder", enc.temporal_encoder)
        self.layer_norm(f"{key}spatial_ln", f"{p}spatial_ln", enc.spatial_ln)
        self.layer_norm(f"{key}temporal_ln", f"{p}temporal_ln", enc.temporal_ln)


def flax_layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], Fill]]:
    """Every key an official checkpoint of this model holds, with its shape and converter."""
    lay = _Layout()
    if isinstance(model, FactorizedEncoder):
        lay.encoder("params/", "", model)
    elif isinstance(model, FactorizedVideoCLIP):
        lay.encoder("params/vision_encoder/", "vision_encoder", model.vision_encoder)
        lay.stack("params/auxiliary_encoder/transformers_stack", "auxiliary_encoder", model.auxiliary_encoder)
        lay.pooler("params/contrastive_vision_pooler", "contrastive_vision_pooler", model.contrastive_vision_pooler)
        te = model.text_encoder
        lay.param("params/text_encoder/token_emb/emb_var", "text_encoder.token_emb.weight", te.token_emb.weight.shape)
        lay.param("params/text_encoder/cls_emb", "text_encoder.cls_emb", te.cls_emb.shape)
        lay.stack("params/text_encoder/unimodal_transformer", "text_encoder.unimodal_transformer",
                  te.unimodal_transformer)
        lay.layer_norm("params/text_encoder/unimodal_ln", "text_encoder.unimodal_ln", te.unimodal_ln)
    elif isinstance(model, FactorizedVideoClassifier):
        lay.encoder("params/encoder/", "encoder", model.encoder)
        lay.pooler("params/atten_pooler", "atten_pooler", model.atten_pooler)
        lay.dense("params/projection/linear", "projection", model.projection)
    else:
        raise TypeError(f"no official checkpoint layout for {type(model).__name__}")
    return lay.entries


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        name = os.path.basename(path.rstrip("/"))
        run = name.startswith("step_") or name == "checkpoints" or os.path.isdir(os.path.join(path, "checkpoints"))
        folder = path
    else:  # a file of a checkpoint (rank0.pt, *.distcp): its folder holds DCP's .metadata
        folder = os.path.dirname(os.path.abspath(path))
        run = os.path.isfile(os.path.join(folder, ".metadata"))
    if run:
        raise CheckpointError(f"{path}: is (in) a training run's checkpoint, which holds the optimizer's state too; "
                              f"`videoprism export {folder}` writes its model as a .safetensors file to pass here (a "
                              "finished run's is OUT_DIR/model.safetensors)")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder; pass the checkpoint file inside it (.npz or .safetensors)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")


# What reading a damaged zip raises besides OSError and ValueError: a bad CRC or header, an unknown compression
# method, a cut deflate stream.
_ZIP_ERRORS = (zipfile.BadZipFile, NotImplementedError, EOFError, zlib.error)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    headers = _npz_headers(path)
    for key, (shape, dtype, held) in headers.items():
        if dtype.hasobject:
            raise CheckpointError(f"{path}: {shortened(key)} is a pickled (object) array, which is refused for "
                                  "safety; re-save it with plain numeric arrays")
        # A header's shape is allocated before its bytes are read: a damaged one asked for terabytes.
        if (size := math.prod(shape) * dtype.itemsize) > held:
            raise CheckpointError(f"{path}: {shortened(key)} declares shape {shape} of {dtype} ({size} bytes) but "
                                  f"holds {held} bytes: a damaged file; restore it")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, *_ZIP_ERRORS) as e:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({e})") from None


def load_flax_checkpoint(path: str, model: nn.Module) -> nn.Module:
    """Load an official Flax `.npz` checkpoint into `model` (strict; all or nothing)."""
    arrays = _read_npz(path)
    layout = flax_layout(model)
    missing = sorted(set(layout) - set(arrays))
    extra = sorted(set(arrays) - set(layout))
    if missing or extra:
        # One line: a command prints it as its `error: ...` (three lines were three, the fix on the last).
        msg = [f"{path} does not match {type(model).__name__}:"]
        if missing:
            msg.append(f"missing {len(missing)} key(s), e.g. {missing[:3]};")
        if extra:
            msg.append(f"unexpected {len(extra)} key(s), e.g. {shown_each(extra[:3])};")
        msg.append("check that the model name/config matches the checkpoint (e.g. an LvT checkpoint needs "
                   "FactorizedVideoCLIP, layer counts must agree: in a training config model.num_*_layers)")
        raise CheckpointError(" ".join(msg))

    params = dict(model.named_parameters())
    new = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in params.items()}
    filled = {n: torch.zeros(p.shape[:1] if p.dim() else (), dtype=torch.int32) for n, p in params.items()}
    for key, (shape, fill) in layout.items():
        arr = arrays[key]
        if arr.dtype.kind != "f":
            raise CheckpointError(f"{path}: {key} has dtype {arr.dtype}; expected a float array")
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(arr.shape)} but the model expects {shape}; "
                                  "the checkpoint is for another configuration: use the model name of its size "
                                  "(a large checkpoint needs a *_large model) or override the fields that differ "
                                  "(from_official(..., model_dim=...); on the command line --model NAME or "
                                  "--set model_dim=...; in a training config model.name and model.*, e.g. "
                                  "model.pos_emb_shape=T,H,W for a position grid)")
        for name, rows, value in fill(np.asarray(arr, dtype=np.float32)):
            t = torch.from_numpy(np.ascontiguousarray(value))
            target = new[name] if rows is None else new[name][rows]
            target.copy_(t.reshape(target.shape))
            cover = filled[name] if rows is None else filled[name][rows]
            cover += 1
    unfilled = [n for n, c in filled.items() if not bool((c == 1).all())]
    if unfilled:
        raise CheckpointError(f"{path}: parameter(s) {unfilled[:3]} not filled exactly once by the checkpoint")
    assign = any(p.is_meta for p in params.values())
    device = next((p.device for p in params.values() if not p.is_meta), torch.device("cpu"))
    model.load_state_dict({n: t.to(device) for n, t in new.items()}, strict=True, assign=assign)
    return model


def save_safetensors(model: nn.Module, path: str, *, clip: dict | None = None) -> None:
    """Our weights: the state dict + the config (JSON) in the safetensors metadata. `clip`: the clip size the model
    was trained on ({"num_frames": T, "resolution": R}), which `videoprism embed`/`eval` default to (the position
    grid in the config may be another one: a stage-2 student keeps its teacher's)."""
    meta = {"class": type(model).__name__}
    if clip is not None:
        meta["clip"] = json.dumps(clip)
    if hasattr(model, "config"):
        # How to run the model (the attention backend) is the loader's: a tiny model trained with the reference
        # backend on a CPU runs with the GPU's kernels where it is loaded on one.
        fields = {**config_fields(type(model).__name__, model.config), **dict.fromkeys(RUNTIME_FIELDS)}
        meta["config"] = json.dumps(fields)
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; pass a file name, e.g. "
                                f"{os.path.join(path, 'model.safetensors')}")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(state, path, meta)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, written so that the same tensors and metadata give the same
    bytes: safetensors writes the metadata from a hash map whose order changes from process to
    process, so its keys are put back in sorted order in place (the header keeps its length, the
    tensor offsets do not move). Atomic: never a half-written file under the final name."""
    from safetensors import SafetensorError

    try:
        with atomic_path(path) as tmp:
            _write_sorted(tensors, tmp, metadata)
            os.chmod(tmp, new_file_mode())  # safetensors writes 0o600 whatever the umask
    except (SafetensorError, OSError) as e:  # a full disk: safetensors' error is no OSError and names no file
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise OSError(f"writing {path} failed ({cause}): free space or write it to another disk") from e


def _write_sorted(tensors: dict[str, torch.Tensor], tmp: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # safetensors' JSON: compact, non-ASCII as is; the padding of the original is kept.
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size and raw.rstrip(b" ") != text:
            fh.seek(8)
            fh.write(text.ljust(size, b" "))


def load_safetensors(path: str, model: nn.Module) -> nn.Module:
    """Load our safetensors weights into `model` (strict, shapes checked, all or nothing)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_file(path)
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"{path} does not match {type(model).__name__}: missing {missing[:3]}, "
                              f"unexpected {shown_each(extra[:3])}; build the model with the config it was saved from")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)} but the model expects "
                                  f"{tuple(own[k].shape)}")
        if v.dtype != own[k].dtype:
            # Loaded with assign (meta models), a half file would silently make a half model.
            raise CheckpointError(f"{path}: {k} is {v.dtype} but the model is {own[k].dtype}; save the "
                                  f"weights in {own[k].dtype} (or cast the model before loading)")
        if v.is_floating_point() and not (finite := torch.isfinite(v)).all():
            # Garbage under an intact header (a copy cut and patched, bad memory) or a diverged run's export: as a
            # stage-2 teacher, every step was non-finite and the run blamed the learning rate.
            raise CheckpointError(f"{path}: {k} holds {int((~finite).sum())} non-finite values (NaN or inf): damaged "
                                  "weights, or the export of a run that diverged; export an earlier checkpoint of "
                                  "the run (videoprism export RUN/checkpoints/step_N) or restore the file")
    assign = any(t.is_meta for t in own.values())
    model.load_state_dict(state, strict=True, assign=assign)
    return model


def _config_classes() -> dict:
    """Model class name -> its config dataclass."""
    from videoprism.config import CLIPConfig, ClassifierConfig, EncoderConfig

    return {"FactorizedEncoder": EncoderConfig, "FactorizedVideoCLIP": CLIPConfig,
            "FactorizedVideoClassifier": ClassifierConfig}


def safetensors_clip(path: str) -> dict:
    """The clip size `save_safetensors` recorded ({"num_frames", "resolution"}), {} when it recorded none."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        text = (fh.metadata() or {}).get("clip")
    try:
        clip = json_loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    ok = isinstance(clip, dict) and all(isinstance(clip.get(k), int) and clip[k] > 0
                                        for k in ("num_frames", "resolution"))
    return clip if ok else {}


def safetensors_config(path: str) -> tuple[str | None, dict]:
    """The model class name and config fields (JSON values) that `save_safetensors` wrote into
    the metadata of `path`; (None, {}) for a file without them."""
    from safetensors import SafetensorError, safe_open

    _check_file(path)
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if "config" not in meta:
        return meta.get("class"), {}
    try:
        values = json_loads(meta["config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the config metadata is not JSON ({e})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: the config metadata is not a JSON object")
    return meta.get("class"), values


def _npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
    """Each array's (shape, dtype, bytes its member holds after the header) in an .npz, from its .npy header: no array
    is read (an official checkpoint is GBs)."""
    _check_file(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable .npz checkpoint (not a zip archive of .npy arrays)")
    fmt = np.lib.format
    headers = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.endswith(".npy"):
                    with z.open(info) as f:
                        version = fmt.read_magic(f)
                        header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                        shape, _, dtype = header(f)
                        headers[info.filename[:-4]] = (tuple(shape), dtype, info.file_size - f.tell())
    except (ValueError, OSError, *_ZIP_ERRORS) as e:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({e})") from None
    return headers


def _npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
    return {key: shape for key, (shape, _, _) in _npz_headers(path).items()}


def _stack_layers(shapes: dict, key: str) -> int:
    """Layers of a scan-stacked transformer (their leading axis; 0: a stack of none has no keys)."""
    return shapes.get(f"{key}/x_layers/ff_layer/ffn_layer1/linear/bias", (0,))[0]


def _encoder_fields(shapes: dict, key: str) -> dict:
    """The shape fields of the FactorizedEncoder under `key` ("params/", "params/vision_encoder/", ...)."""
    out = {"model_dim": shapes[f"{key}patch_projection/linear/bias"][0]}
    side = math.isqrt(shapes[f"{key}patch_projection/linear/kernel"][0] // 3)
    if 3 * side * side == shapes[f"{key}patch_projection/linear/kernel"][0]:
        out["patch_size"] = side
    grid, frames = shapes.get(f"{key}spatial_pos_emb/emb_var"), shapes.get(f"{key}temporal_pos_emb/emb_var")
    if grid and frames:
        # The spatial table has H*W rows, not the grid's rows and columns: a grid of that count set by the user fits
        # (grid_fits); without one a square count is taken as a square grid, as every official one is, and said.
        out[GRID_TOKENS] = [frames[0], grid[0]]
        if math.isqrt(grid[0]) ** 2 == grid[0]:
            out["pos_emb_shape"] = [frames[0], math.isqrt(grid[0]), math.isqrt(grid[0])]
    for axis in ("spatial", "temporal"):
        stack = f"{key}{axis}_encoder/transformers_stack"
        out[f"num_{axis}_layers"] = _stack_layers(shapes, stack)
        if out[f"num_{axis}_layers"]:
            out["mlp_dim"] = shapes[f"{stack}/x_layers/ff_layer/ffn_layer1/linear/bias"][-1]
        query = shapes.get(f"{stack}/x_layers/self_attention/query/w")  # [L, D, heads, head_dim]
        if query:
            out["num_heads"] = query[2]
    return out


# Where each official model keeps its video encoder (the first key found names the class).
_FLAX_ENCODERS = (("FactorizedVideoCLIP", "params/vision_encoder/"), ("FactorizedVideoClassifier", "params/encoder/"),
                  ("FactorizedEncoder", "params/"))


# The entry of flax_config's fields that is no config field: what an .npz's position tables fix of the grid, [T, H*W].
GRID_TOKENS = "pos_emb_tokens"


def flax_config(path: str) -> tuple[str | None, dict]:
    """The model class and the config fields that shape its weights, read off the array shapes of an official
    `.npz` (which carries no config): what `safetensors_config` gives for our files, for the fields the shapes
    tell (not the logit cap; the position grid only as GRID_TOKENS, and as pos_emb_shape the square grid of a
    square count, a guess); (None, {}) for a file of another layout."""
    shapes = _npz_shapes(path)
    found = [(kind, key) for kind, key in _FLAX_ENCODERS if f"{key}patch_projection/linear/bias" in shapes]
    if not found:
        return None, {}
    kind, key = found[0]
    out = _encoder_fields(shapes, key)
    if kind == "FactorizedVideoCLIP":
        out["num_auxiliary_layers"] = _stack_layers(shapes, "params/auxiliary_encoder/transformers_stack")
        out["num_unimodal_layers"] = _stack_layers(shapes, "params/text_encoder/unimodal_transformer")
        if "params/text_encoder/token_emb/emb_var" in shapes:
            out["vocabulary_size"] = shapes["params/text_encoder/token_emb/emb_var"][0]
    return kind, out


def grid_fits(saved: dict, grid) -> bool:
    """Whether the position grid `grid` (T, H, W) is one the checkpoint of config `saved` (checkpoint_config's)
    was trained with: the grid our file records; for an official .npz, whose tables fix only T and H*W, any grid of
    that many positions (an 8x32 grid's file was refused for the 16x16 its 256 positions were guessed as)."""
    if GRID_TOKENS in saved:
        return [grid[0], grid[1] * grid[2]] == list(saved[GRID_TOKENS])
    return "pos_emb_shape" not in saved or list(grid) == list(saved["pos_emb_shape"])


def guessed_grid_note(saved: dict, where: str) -> str | None:
    """The one-line note for a model given the square grid that an official .npz's positions were taken as
    (`where`: the option and file, e.g. "model.init=X.npz"); None for a checkpoint that records its grid."""
    if GRID_TOKENS not in saved or "pos_emb_shape" not in saved:
        return None
    frames, rows, cols = saved["pos_emb_shape"]
    return (f"note: {where}: an .npz holds {rows * cols} positions per frame, not the grid's rows and columns; "
            f"taken as a square {rows}x{cols} grid, as the official ones are: for another set "
            f"model.pos_emb_shape={frames},H,W with H*W={rows * cols}")


def checkpoint_config(path: str) -> tuple[str | None, dict]:
    """`flax_config` of an official .npz, else `safetensors_config`."""
    return flax_config(path) if os.fspath(path).lower().endswith(".npz") else safetensors_config(path)


def config_fields(name: str, config) -> dict:
    """The config of a model of class `name` as JSON values (what `save_safetensors` writes): only the fields of the
    class's own config, since a classifier's or CLIP's encoder shares its parent's config object, whose extra fields
    (num_classes, ...) the encoder cannot be built with."""
    own = _config_classes().get(name)
    return json.loads(json.dumps(asdict(narrow_config(config, own) if own is not None else config)))


def model_from_config(name: str, values: dict, *, where: str) -> nn.Module:
    """A model of class `name` on the meta device, built from its config fields as JSON values (`config_fields`),
    each checked; `where` names their source in the errors."""
    from videoprism.models import build_model

    configs = _config_classes()
    fields = {f.name for f in dataclasses.fields(configs[name])}
    if set(values) - fields:
        raise CheckpointError(f"{where}: unknown config field(s) {shown_each(sorted(set(values) - fields))}; {name} "
                              f"has {sorted(fields)}")
    if fields - set(values):  # a default would silently stand in for how the weights were trained
        raise CheckpointError(f"{where}: config field(s) {sorted(fields - set(values))} missing from the metadata; "
                              "pass them as overrides or re-save the model with save_safetensors")
    shape = values["pos_emb_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(v, int) for v in shape)):
        raise CheckpointError(f"{where}: config pos_emb_shape must be 3 ints (frames, rows, cols), got {shown(shape)}")
    try:
        return build_model(configs[name](**{**values, "pos_emb_shape": tuple(shape)}), device="meta")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: its config does not build a {name} ({e})") from None


# The config fields that say how to run a model, not what its weights compute: the only ones a load may change.
RUNTIME_FIELDS = ("attention_backend",)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def model_from_safetensors(path: str, *, expect: str | None = None, **overrides) -> nn.Module:
    """Rebuild a model written by `save_safetensors` from the class name and config in its
    metadata, and load its weights (on the CPU), in the dtype they were saved in. `overrides` set the
    runtime fields (attention_backend) and fields the metadata lacks; one that contradicts the saved config
    (num_heads: the fused weights load either way, and compute something else) is refused. `expect` names the
    class the file must hold."""
    from safetensors import safe_open

    name, saved = safetensors_config(path)
    if name not in _config_classes() or not saved or (expect and name != expect):
        raise CheckpointError(f"{path} holds {shortened(name or 'no class name')}, not a "
                              f"{expect or 'VideoPrism model'} with its config (save_safetensors writes both)")
    clash = [f"{shortened(k)}={shown(v)} (saved: {shown(saved[k])})" for k, v in overrides.items()
             if k in saved and k not in RUNTIME_FIELDS and json.loads(json.dumps(v)) != saved[k]]
    if clash:
        raise CheckpointError(f"{path}: {', '.join(clash)} contradicts the config its weights were trained with; "
                              f"leave it out (only {', '.join(RUNTIME_FIELDS)} can change at load)")
    model = model_from_config(name, {**saved, **overrides}, where=path)
    with safe_open(path, framework="pt") as fh:  # the header only: a bf16 save loads back as a bf16 model
        floats = {fh.get_slice(k).get_dtype() for k in fh.keys()} & set(_DTYPES)
    if len(floats) == 1:  # else load_safetensors names the tensor that differs from the model
        model = model.to(_DTYPES[floats.pop()])
    return load_safetensors(path, model)


def load_checkpoint(path: str, model: nn.Module) -> nn.Module:
    """Load weights by file type: an official Flax `.npz` or our `.safetensors`."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return load_flax_checkpoint(path, model)
    if ext == ".safetensors":
        return load_safetensors(path, model)
    _check_file(path)
    raise CheckpointError(f"{path}: unknown checkpoint type; expected an official .npz or a .safetensors file")
