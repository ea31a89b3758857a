"""A user's value echoed by an error stays short: a 1 MB override, config value or key, --set item or checkpoint key
gave a 1 MB "one-line" error (found by fuzzing), which floods a terminal and a scheduler's log. The message still names
the field and the value's start and length (videoprism.paths.shown)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import videoprism as vp
from videoprism.checkpoint import CheckpointError, _read_npz
from videoprism.cli import main
from videoprism.paths import LONGEST_PATH, shown, shown_each
from videoprism.train.config import parse_args

BIG = "x" * 10**6
LIMIT = 600  # a few hundred characters beside the value's start: the message's own words and the field names


def _bounded(message: str, *names: str, limit: int = LIMIT) -> None:
    assert "\n" not in message and len(message) < limit, (len(message), message[:300])
    for name in names:
        assert name in message, (name, message[:300])


OVERRIDES = {  # override -> what the error must still name
    "int value": (f"train.steps={BIG}", "train.steps", "xxxxx", "characters"),
    "choice value": (f"optim.name={BIG}", "optim.name", "xxxxx"),
    "not key=value": (BIG, "not key=value", "(1000002 characters)"),
    "no section": (f"{BIG}=1", "is no field of any section", "xxxxx"),
    "unknown section": (f"{BIG}.x=1", "unknown config section", "xxxxx"),
    "unknown field": (f"train.{BIG}=1", "unknown field", "train", "xxxxx"),
}


@pytest.mark.parametrize("case", OVERRIDES)
def test_a_huge_override_is_a_short_error(case):
    item, *names = OVERRIDES[case]
    with pytest.raises(ValueError) as e:
        parse_args([item], 1)
    _bounded(str(e.value), *names)


FILES = {  # file contents -> what the error must still name
    "str value": ({"train": {"steps": BIG}}, "train.steps must be int", "xxxxx", "(1000002 characters)"),
    "list value": ({"train": {"steps": list(range(10**5))}}, "train.steps must be int", "[0, 1, 2"),
    "nested value": ({"train": {"steps": json.loads("[" * 900 + "]" * 900)}}, "train.steps", "[[[["),
    "choice value": ({"optim": {"name": BIG}}, "optim.name", "xxxxx"),
    "section not a table": ({"train": list(range(10**5))}, "'train' must be a table", "[0, 1"),
    "top-level key": ({BIG: 1}, "top-level key", "xxxxx"),
    "field key": ({"train": {BIG: 1}}, "unknown field", "xxxxx"),
    "preset": ({"preset": BIG}, "unknown preset", "xxxxx"),
    "launch_dir": ({"launch_dir": list(range(10**5))}, "launch_dir must be", "[0, 1"),
}


@pytest.mark.parametrize("case", FILES)
def test_a_huge_value_or_key_in_a_config_file_is_a_short_error(case, tmp_path):
    data, *names = FILES[case]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        parse_args(["--config", str(path)], 1)
    _bounded(str(e.value), str(path), *names)


def test_a_huge_toml_value_is_a_short_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[train]\nsteps = "{BIG}"\n')
    with pytest.raises(ValueError) as e:
        parse_args(["--config", str(path)], 1)
    _bounded(str(e.value), str(path), "train.steps must be int", "(1000002 characters)")


@pytest.mark.parametrize("name", ["missing preset", "missing file", "resume"])
def test_an_absurd_path_or_preset_is_a_short_error(name):
    """A path prints whole up to the longest one Linux takes (LONGEST_PATH), then is cut as a value is."""
    argv = {"missing preset": ["--config", BIG], "missing file": ["--config", f"a.{BIG}"],
            "resume": ["--resume", f"/nonexistent/{BIG}"]}[name]
    with pytest.raises((ValueError, OSError)) as e:
        parse_args(argv, 1)
    _bounded(str(e.value), "characters)", limit=LONGEST_PATH + LIMIT)


SETS = {  # --set item -> what the error line must still name
    "not key=value": ([BIG], "--set 'xxxxx", "expected KEY=VALUE"),
    "bad value": ([f"model_dim={BIG}"], "model_dim must be", "xxxxx"),
    "unknown key": ([f"{BIG}=1"], "unknown config field(s) ['xxxxx"),
    "many unknown keys": ([f"k{i}=1" for i in range(2000)], "unknown config field(s) ['k0'", "(2000 in all)"),
}


@pytest.mark.parametrize("case", SETS)
def test_a_huge_set_is_a_one_line_error(case, tmp_path, capsys):
    items, *names = SETS[case]
    argv = ["convert", str(tmp_path / "w.npz"), "--model", "videoprism_v1_base", "--out",
            str(tmp_path / "o.safetensors")]
    for item in items:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("\n")
    _bounded(err[:-1], *names)


def _tiny():
    return vp.from_official("videoprism_v1_base", model_dim=16, num_heads=2, mlp_dim=32, num_spatial_layers=1,
                            num_temporal_layers=1, pos_emb_shape=(2, 2, 2))


def _safetensors(path, tensors: dict, meta: dict) -> str:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)
    return str(path)


READERS = ["extra key", "class name", "config key", "config value", "npz key"]


@pytest.mark.parametrize("case", READERS)
def test_a_long_key_or_metadata_value_in_a_checkpoint_is_a_short_error(case, tmp_path):
    """The readers name a file's unexpected key, class or config field: of 60 kB each here (a header holds any)."""
    key = "k" * 60000  # a zip member's name (the .npz) holds at most 65535 bytes
    model = _tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {"class": "FactorizedEncoder", "config": json.dumps(vp.checkpoint.config_fields("FactorizedEncoder",
                                                                                           model.config))}
    with pytest.raises(CheckpointError) as e:
        if case == "extra key":
            vp.load_safetensors(_safetensors(tmp_path / "w.safetensors", {**state, key: torch.zeros(1)}, meta), model)
        elif case == "class name":
            vp.model_from_safetensors(_safetensors(tmp_path / "w.safetensors", state, {**meta, "class": key}))
        elif case in ("config key", "config value"):
            config = {**json.loads(meta["config"]), **({key: 1} if case == "config key" else {"pos_emb_shape": key})}
            vp.model_from_safetensors(_safetensors(tmp_path / "w.safetensors", state,
                                                   {**meta, "config": json.dumps(config)}))
        else:
            path = tmp_path / "w.npz"
            np.savez(path, **{key: np.array([object()], dtype=object)})
            _read_npz(str(path))
    _bounded(str(e.value), str(tmp_path), "kkkkk", "characters)")


def test_short_values_are_shown_whole():
    """A usual value prints as before, so the messages that name one are unchanged."""
    assert shown("abc") == "'abc'" and shown([1, 2]) == "[1, 2]" and shown("x" * 80) == repr("x" * 80)[:60] + \
        "... (82 characters)"
    assert shown_each(["a", "b"]) == "['a', 'b']" == repr(["a", "b"])
    assert shown(json.loads("[" * 900 + "]" * 900)).startswith("[[[[")


def test_a_huge_label_name_in_an_eval_manifest_is_a_short_error(tmp_path, capsys):
    """train/evaluate.py: a manifest's label named by 1 MB (or 10^5 labels) printed whole in `eval probe`'s and `eval
    zeroshot`'s "no clip has the label ... (its labels: ...)"."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.mp4", "caption": "a", "label": {BIG: 1}}) + "\n")
    nowhere = str(tmp_path / "none.safetensors")
    for argv in (["probe", str(manifest), str(manifest), "--labels", "colour"],
                 ["zeroshot", str(manifest), "--label", "colour", "--classes", "a,b"]):
        assert main(["eval", *argv, "--checkpoint", nowhere, "--quiet"]) == 2
        _bounded(capsys.readouterr().err.strip(), "'colour'", "xxxxx", "characters")


def test_many_long_shard_paths_in_a_data_error_are_a_short_line(tmp_path, capsys):
    """videoprism/data: `data tokenizer shards/*.tar` (and `data index`, read_source) named every shard given in its
    error: 100 shards of 250-character names made a 26 kB line. The list is cut at LONGEST_PATH."""
    import io
    import tarfile

    from videoprism.data.manifest import read_source

    shards = []
    for i in range(100):
        shards.append(str(tmp_path / f"{i:03d}{'s' * 240}.tar"))
        with tarfile.open(shards[-1], "w") as tar:
            info = tarfile.TarInfo("k.mp4")  # video-only: no caption to train on
            info.size = 4
            tar.addfile(info, io.BytesIO(b"\0" * 4))
    assert main(["data", "tokenizer", *shards, "--out", str(tmp_path / "t.model")]) == 2
    _bounded(capsys.readouterr().err.strip(), "holds no caption", "characters", limit=LONGEST_PATH + 200)
    with pytest.raises(ValueError) as e:  # manifest.py: neither one manifest nor shards
        read_source([*shards, str(tmp_path / "m.jsonl")])
    _bounded(str(e.value), "one .jsonl manifest", "characters", limit=LONGEST_PATH + 200)


def test_a_huge_tokenizer_path_is_a_short_error():
    """videoprism/data/text.py: data.tokenizer=<1 MB> (a config file's value) printed whole: a path prints whole up to
    LONGEST_PATH."""
    from videoprism.data.text import Tokenizer

    with pytest.raises(FileNotFoundError) as e:
        Tokenizer(BIG)
    _bounded(str(e.value), "SentencePiece model", "characters", limit=LONGEST_PATH + 200)


def test_a_huge_path_or_member_name_in_data_errors_is_a_short_line(tmp_path):
    """videoprism/data/manifest.py: a manifest path (data.train, a config file's value) printed whole, as did a shard
    member's name or link target, which a tar (pax) header holds at any length: the error that stops the read named
    a 1 MB one whole. Paths and member names print whole up to LONGEST_PATH."""
    import io
    import tarfile

    from videoprism.data.errors import TooManyBadSamplesError
    from videoprism.data.manifest import read_shards, read_source

    with pytest.raises(FileNotFoundError) as e:
        read_source(BIG)
    _bounded(str(e.value), "manifest", "does not exist", "characters", limit=LONGEST_PATH + 200)
    shard = str(tmp_path / "s.tar")
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo("a.mp4")
        link.type, link.linkname = tarfile.SYMTYPE, BIG
        tar.addfile(link)
        for name in (f"{BIG}/b.x.mp4", f"{BIG}/b.y.mp4"):  # a key of two video members
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"\0" * 4))
    with pytest.raises(TooManyBadSamplesError) as e:
        read_shards([shard], max_bad_share=0.0)
    _bounded(str(e.value), "symbolic link", "characters", limit=LONGEST_PATH + 1000)
    with pytest.raises(TooManyBadSamplesError) as e:
        read_shards([shard], max_bad_share=0.5)  # the first reject passes: the second key's stops
    _bounded(str(e.value), "are both its video member", "characters", limit=5 * LONGEST_PATH)  # 4 paths


def test_a_huge_value_in_a_pack_header_is_a_short_error(tmp_path):
    """videoprism/data/pack.py: the header's format version of another program's file printed whole."""
    import struct

    from videoprism.data.pack import MAGIC, StalePack, pack_path, read_pack

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.mp4", "caption": "a"}) + "\n")
    header = json.dumps({"version": BIG}).encode()
    with open(pack_path(str(manifest)), "wb") as fh:
        fh.write(MAGIC + struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(StalePack) as e:
        read_pack(str(manifest))
    _bounded(str(e.value), "has format version", "xxxxx", "characters")


def test_a_huge_path_or_decoder_message_is_a_short_error(monkeypatch):
    """videoprism/data/decode.py: a manifest line's path (any length) and a decoder's message (any string) printed
    whole in BadVideoError's one line."""
    import av

    from videoprism.data.decode import PyAVClip
    from videoprism.data.errors import BadVideoError

    with pytest.raises(BadVideoError) as e:
        PyAVClip(BIG)
    _bounded(str(e.value), "missing file", "characters", limit=LONGEST_PATH + 200)

    def fails(self):
        raise av.error.InvalidDataError(1094995529, BIG, "clip.mp4")

    monkeypatch.setattr(PyAVClip, "_open", fails)
    with pytest.raises(BadVideoError) as e:
        PyAVClip(b"\0" * 8, name="clip.mp4")
    _bounded(str(e.value), "clip.mp4", "cannot read the container", "xxxxx", "characters")
