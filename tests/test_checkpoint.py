"""Checkpoint loading: strict, all-or-nothing, clear errors; safetensors round trip."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

import videoprism as vp
from tests.conftest import golden_overrides


@pytest.fixture()
def golden_npz(golden_dir) -> dict[str, np.ndarray]:
    with np.load(os.path.join(golden_dir, "params_encoder.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture()
def fresh_encoder(golden_config):
    torch.manual_seed(0)
    return vp.from_official("videoprism_v1_base", **golden_overrides(golden_config["encoder"]))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bad(tmp_path, arrays, **kw):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays, **kw)
    return path


def test_missing_key(tmp_path, golden_npz, fresh_encoder):
    key = "params/temporal_ln/scale"
    path = _bad(tmp_path, {k: v for k, v in golden_npz.items() if k != key})
    before = _snapshot(fresh_encoder)
    with pytest.raises(vp.CheckpointError, match="missing 1 key.*temporal_ln/scale"):
        vp.load_flax_checkpoint(path, fresh_encoder)
    assert _unchanged(fresh_encoder, before)


def test_extra_key(tmp_path, golden_npz, fresh_encoder):
    path = _bad(tmp_path, {**golden_npz, "params/bogus/kernel": np.zeros(3, np.float32)})
    with pytest.raises(vp.CheckpointError, match="unexpected 1 key.*bogus"):
        vp.load_flax_checkpoint(path, fresh_encoder)


def test_wrong_shape_names_key_and_both_shapes(tmp_path, golden_npz, fresh_encoder):
    key = "params/spatial_encoder/transformers_stack/x_layers/ff_layer/ffn_layer1/linear/kernel"
    arrays = dict(golden_npz)
    arrays[key] = arrays[key][:, :, :-1]
    # The damaged key sorts after other keys: a partial load would already have written some.
    before = _snapshot(fresh_encoder)
    with pytest.raises(vp.CheckpointError,
                       match=r"ffn_layer1/linear/kernel has shape \(2, 32, 63\).*\(2, 32, 64\).*--set model_dim"):
        vp.load_flax_checkpoint(_bad(tmp_path, arrays), fresh_encoder)
    assert _unchanged(fresh_encoder, before), "nothing may be loaded half-way"


def test_pickled_array_is_refused(tmp_path, golden_npz, fresh_encoder):
    arrays = dict(golden_npz)
    arrays["params/spatial_ln/bias"] = np.array([{"evil": 1}], dtype=object)
    with pytest.raises(vp.CheckpointError, match="pickled"):
        vp.load_flax_checkpoint(_bad(tmp_path, arrays), fresh_encoder)


def test_not_a_checkpoint(tmp_path, fresh_encoder):
    path = tmp_path / "x.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(vp.CheckpointError, match="not a readable"):
        vp.load_flax_checkpoint(str(path), fresh_encoder)
    with pytest.raises(vp.CheckpointError, match="no such checkpoint"):
        vp.load_flax_checkpoint(str(tmp_path / "absent.npz"), fresh_encoder)


def test_wrong_model_class(golden_dir, golden_config):
    clip = vp.from_official("videoprism_lvt_v1_base", **golden_overrides(golden_config["clip"]))
    with pytest.raises(vp.CheckpointError, match="FactorizedVideoCLIP"):
        vp.load_flax_checkpoint(os.path.join(golden_dir, "params_encoder.npz"), clip)


def test_every_array_lands_in_the_right_place(golden_npz, golden_dir, fresh_encoder):
    """Spot checks of the layout rules (NOTES §1d) against the raw arrays."""
    m = vp.load_flax_checkpoint(os.path.join(golden_dir, "params_encoder.npz"), fresh_encoder)
    g = {k: torch.from_numpy(v) for k, v in golden_npz.items()}
    x = "params/spatial_encoder/transformers_stack/x_layers/"
    blk = m.spatial_encoder.layers[1]
    D = blk.attn.qkv.in_features
    torch.testing.assert_close(blk.attn.qkv.weight[D:2 * D], g[x + "self_attention/key/w"][1].reshape(D, D).T)
    torch.testing.assert_close(blk.attn.post.weight, g[x + "self_attention/post/w"][1].reshape(D, D))
    torch.testing.assert_close(blk.ln_attn.weight, 1 + g[x + "layer_norm/scale"][1])
    torch.testing.assert_close(m.patch_projection.weight, g["params/patch_projection/linear/kernel"].T)


def test_meta_model_loads_with_assign(golden_dir, golden_config, golden_inputs):
    meta = vp.from_official("videoprism_v1_base", device="meta", **golden_overrides(golden_config["encoder"]))
    vp.load_flax_checkpoint(os.path.join(golden_dir, "params_encoder.npz"), meta)
    assert not any(p.is_meta for p in meta.parameters())
    ref = vp.load_flax_checkpoint(os.path.join(golden_dir, "params_encoder.npz"),
                                  vp.from_official("videoprism_v1_base", **golden_overrides(golden_config["encoder"])))
    with torch.no_grad():
        torch.testing.assert_close(meta(golden_inputs["video"])[0], ref(golden_inputs["video"])[0], rtol=0, atol=0)


def test_safetensors_round_trip(tmp_path, golden_dir, golden_config, golden_inputs):
    over = golden_overrides(golden_config["clip"])
    a = vp.load_flax_checkpoint(os.path.join(golden_dir, "params_clip.npz"),
                                vp.from_official("videoprism_lvt_v1_base", **over))
    path = str(tmp_path / "clip.safetensors")
    vp.save_safetensors(a, path)
    b = vp.load_safetensors(path, vp.from_official("videoprism_lvt_v1_base", **over))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(vp.CheckpointError, match="does not match"):
        vp.load_safetensors(path, vp.from_official("videoprism_v1_base", **golden_overrides(golden_config["encoder"])))


def test_folders_and_paths_as_checkpoint_arguments(tmp_path):
    """A folder is named as one (it was 'no such checkpoint file', or a full .tmp file left beside it
    on save); pathlib paths work; the extension's case does not matter."""
    import pathlib

    m = vp.from_official("videoprism_v1_base", model_dim=16, num_heads=2, mlp_dim=32, num_spatial_layers=1,
                         num_temporal_layers=1, pos_emb_shape=(2, 2, 2))
    with pytest.raises(IsADirectoryError, match="is a folder; pass a file name"):
        vp.save_safetensors(m, str(tmp_path))
    assert os.listdir(tmp_path) == []
    for load in (vp.load_checkpoint, vp.load_safetensors, vp.load_flax_checkpoint):
        with pytest.raises(vp.CheckpointError, match="is a folder; pass the checkpoint file inside it"):
            load(str(tmp_path), m)
    vp.save_safetensors(m, str(tmp_path / "w.SAFETENSORS"))
    vp.load_checkpoint(pathlib.Path(tmp_path / "w.SAFETENSORS"), m)


def test_safetensors_files_repeat_byte_for_byte(tmp_path):
    """The same weights give the same file: safetensors writes metadata from a hash map (six
    orders in sixteen saves of one process here); we sort it in place. The file still loads,
    with its metadata and tensors, by safetensors itself."""
    import hashlib

    from safetensors import safe_open

    from videoprism.checkpoint import write_safetensors

    tensors = {"w": torch.arange(12.0).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    meta = {"config": '{"name": "caf\u00e9 \u00e9"}', "class": "M", "videos": "a.mp4\nb\u00e9.webm", "z": ""}
    path = str(tmp_path / "w.safetensors")
    digests = set()
    for _ in range(12):
        write_safetensors(tensors, path, meta)
        digests.add(hashlib.sha256(open(path, "rb").read()).hexdigest())
    assert len(digests) == 1 and os.listdir(tmp_path) == ["w.safetensors"]  # no temporary file left
    with safe_open(path, framework="pt") as fh:
        assert fh.metadata() == meta
        assert all(torch.equal(fh.get_tensor(k), v) for k, v in tensors.items())
    size = int.from_bytes(open(path, "rb").read(8), "little")
    header = open(path, "rb").read()[8:8 + size].decode().rstrip()
    assert list(json.loads(header)["__metadata__"]) == sorted(meta)


def test_safetensors_metadata_and_dtype_are_checked(tmp_path):
    """A file whose config lacks a field (a default would stand in silently), holds a malformed
    field, or stores another dtype than the model's is refused with a CheckpointError."""

    from safetensors import safe_open
    from safetensors.torch import save_file

    from videoprism.config import official_config

    enc = vp.FactorizedEncoder(official_config("videoprism_v1_base", model_dim=16, num_heads=2, mlp_dim=32,
                                               num_spatial_layers=1, num_temporal_layers=1,
                                               pos_emb_shape=(2, 2, 2), atten_logit_cap=30.0))
    good = str(tmp_path / "good.safetensors")
    vp.save_safetensors(enc, good)
    assert vp.model_from_safetensors(good).config.atten_logit_cap == 30.0
    with safe_open(good, framework="pt") as fh:
        meta, state = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    config = json.loads(meta["config"])

    drop = object()

    def write(name, tensors=state, **config_changes):
        cfg = {k: v for k, v in {**config, **config_changes}.items() if v is not drop}
        path = str(tmp_path / name)
        save_file(tensors, path, metadata={**meta, "config": json.dumps(cfg)})
        return path

    cases = [(write("missing.safetensors", atten_logit_cap=drop), "missing from the metadata"),
             (write("shape.safetensors", pos_emb_shape=[2, 2]), "pos_emb_shape must be 3 ints"),
             (write("type.safetensors", model_dim="wide"), "does not build"),
             (write("mixed.safetensors", {k: v.half() if i % 2 else v for i, (k, v) in enumerate(state.items())}),
              "is torch.float16 but the model is torch.float32")]
    # Damaged numbers under an intact header (a stage-2 teacher of garbage made every step non-finite, and the
    # run blamed the learning rate): refused by name.
    last = sorted(state)[-1]
    for bad in (float("nan"), float("inf")):
        garbled = {**state, last: state[last].clone().view(-1).index_fill_(0, torch.tensor([0, 2]), bad)
                   .view_as(state[last])}
        cases.append((write("garbled.safetensors", garbled), rf"{re.escape(last)} holds 2 non-finite values"))
    for path, needle in cases:
        with pytest.raises(vp.CheckpointError, match=needle):
            vp.model_from_safetensors(path)
    # Saved in one dtype, loaded back in it (a bf16 model's save was refused: "cast the model before loading",
    # which model_from_safetensors gave no way to do).
    vp.save_safetensors(enc.to(torch.bfloat16), str(tmp_path / "bf16.safetensors"))
    back = vp.model_from_safetensors(str(tmp_path / "bf16.safetensors"))
    assert all(torch.equal(v, enc.state_dict()[k]) and v.dtype == torch.bfloat16 for k, v in back.state_dict().items())
    # A field the weights do not show in their shapes (num_heads splits the same fused qkv) cannot be overridden
    # against the saved config; the runtime field can.
    with pytest.raises(vp.CheckpointError, match=r"num_heads=1 \(saved: 2\) contradicts the config"):
        vp.model_from_safetensors(good, num_heads=1)
    assert vp.model_from_safetensors(good, num_heads=2, attention_backend="sdpa").config.attention_backend == "sdpa"
