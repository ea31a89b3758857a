"""`videoprism eval retrieval|probe` (train/evaluate.py) against independent constructions: retrieval recomputed
clip by clip through the embed path with a literal ranking loop; the probe against the demo's decode-everything
path; labels that some clips lack; bad input."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("av", reason="PyAV decodes every clip here (the GPU machines lack it)")

import videoprism as vp
from videoprism.cli import main
from videoprism.data import read_clip
from videoprism.data.loader import build_loader
from videoprism.data.synth import generate
from videoprism.data.text import Tokenizer
from videoprism.train.config import DataConfig, build_config
from videoprism.train.data import decode_all
from videoprism.train.modeling import build_clip
from videoprism.train.probe import probe_features, run_probes, train_probe

from .test_data import SPM

FRAMES, RES = 4, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic clips (labels: direction, colour, shape) and a small random LvT model saved as our safetensors."""
    root = tmp_path_factory.mktemp("eval")
    d = str(root / "data")
    generate(d, 40, seed=5, size=RES, num_frames=FRAMES, scene="single", workers=1)
    cfg = build_config("tiny", [f"model.num_frames={FRAMES}", f"model.resolution={RES}", "model.patch_size=8"], 1)
    torch.manual_seed(0)
    clip = build_clip(cfg.model, vocab=Tokenizer(os.path.join(d, "spm.model")).vocab_size, device=torch.device("cpu"))
    vp.save_safetensors(clip, str(root / "clip.safetensors"))
    vp.save_safetensors(clip.vision_encoder, str(root / "enc.safetensors"))
    return root, d


def _recall_oracle(video: torch.Tensor, text: torch.Tensor, captions: list[str], k: int, t2v: bool) -> float:
    """For each query, the items sorted by score; a hit when an item with the query's caption is among the first k."""
    sim = text @ video.T if t2v else video @ text.T
    hits = 0
    for q in range(len(captions)):
        order = sorted(range(len(captions)), key=lambda i: -float(sim[q, i]))
        hits += any(captions[i] == captions[q] for i in order[:k])
    return hits / len(captions)


def test_retrieval_equals_clip_by_clip_oracle(data, tmp_path):
    root, d = data
    manifest = os.path.join(d, "train.jsonl")
    out = tmp_path / "r.json"
    assert main(["eval", "retrieval", manifest, "--checkpoint", str(root / "clip.safetensors"), "--batch-size", "5",
                 "--workers", "0", "--quiet", "--out", str(out)]) == 0
    got = json.loads(out.read_text())

    model = vp.model_from_safetensors(str(root / "clip.safetensors")).eval()
    tok = Tokenizer(os.path.join(d, "spm.model"))
    lines = [json.loads(x) for x in open(manifest)]
    vids, texts = [], []
    with torch.no_grad():
        for rec in lines:
            ids, pads = tok([rec["caption"]])
            v, t, _ = model(read_clip(os.path.join(d, rec["path"]), FRAMES, RES)[None], ids, pads)
            vids.append(v[0])
            texts.append(t[0])
    video, text, caps = torch.stack(vids), torch.stack(texts), [rec["caption"] for rec in lines]
    assert got["clips"] == len(lines) and got["skipped"] == []
    for k in (1, 5, 10):
        assert got[f"t2v_R@{k}"] == pytest.approx(_recall_oracle(video, text, caps, k, True), abs=1e-6)
        assert got[f"v2t_R@{k}"] == pytest.approx(_recall_oracle(video, text, caps, k, False), abs=1e-6)
    groups = [sum(c == x for x in caps) / len(caps) for c in caps]
    assert got["chance_R@1"] == pytest.approx(sum(groups) / len(groups), abs=1e-6)


@pytest.mark.parametrize("checkpoint", ["clip", "enc"])
def test_probe_equals_the_demo_path(data, tmp_path, checkpoint):
    """Streamed float32 features give the probes of the demo's decode-everything path bit for bit, from an LvT
    model (its video tower) or an encoder."""
    root, d = data
    out = tmp_path / "p.json"
    train, val = os.path.join(d, "train.jsonl"), os.path.join(d, "val.jsonl")
    assert main(["eval", "probe", train, val, "--checkpoint", str(root / f"{checkpoint}.safetensors"),
                 "--features", "float32", "--steps", "20", "--batch-size", "32", "--workers", "0", "--quiet",
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())

    model = vp.model_from_safetensors(str(root / f"{checkpoint}.safetensors")).eval()
    encoder = model.vision_encoder if checkpoint == "clip" else model
    kw = dict(frames=FRAMES, resolution=RES, tokenizer=Tokenizer(os.path.join(d, "spm.model")),
              dc=DataConfig(workers=0))
    want = run_probes(encoder, decode_all(train, **kw)[0], decode_all(val, **kw)[0], ["colour", "direction", "shape"],
                      steps=20)
    for name in ("colour", "direction", "shape"):
        for key in (name, f"{name}_train", f"{name}_chance", f"{name}_majority"):
            assert got[key] == want[key], key
        assert got[f"{name}_clips"] == [sum(1 for _ in open(train)), sum(1 for _ in open(val))]


def _relabel(d: str, name: str, drop_first: int) -> str:
    """A copy of train.jsonl whose first `drop_first` clips have no labels at all."""
    lines = [json.loads(x) for x in open(os.path.join(d, "train.jsonl"))]
    for rec in lines[:drop_first]:
        rec.pop("label")
    path = os.path.join(d, name)
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_every_batch_has_every_label_of_the_manifest(data):
    """A label key that only later clips carry still comes in the first batch (-1 there): per-batch keys
    misaligned the labels of a consumer that concatenates the batches."""
    _, d = data
    path = _relabel(d, "late_labels.jsonl", drop_first=4)
    loader = build_loader(path, num_frames=FRAMES, resolution=RES, batch_size=4, train=False, tokenizer=None)
    batches = list(loader)
    assert all("text_ids" not in b for b in batches)  # no tokenizer: no text fields
    keys = {k for b in batches for k in b if k.startswith("label")}
    assert keys == {"label_colour", "label_direction", "label_shape"}
    assert all(keys <= set(b) for b in batches)
    assert batches[0]["label_colour"].tolist() == [-1] * 4 and (batches[1]["label_colour"] >= 0).all()
    clips, _ = decode_all(path, frames=FRAMES, resolution=RES, tokenizer=Tokenizer(os.path.join(d, "spm.model")),
                          dc=DataConfig(workers=0))
    assert clips["label_colour"].shape == clips["video"].shape[:1]


def test_clips_without_a_label_sit_out_its_probe():
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(12, 5, 8, generator=g), torch.randn(6, 5, 8, generator=g)
    ty, vy = torch.randint(0, 3, (12,), generator=g), torch.randint(0, 3, (6,), generator=g)
    ty[[0, 5]] = -1
    vy[2] = -1
    got = probe_features(tx, {"label": ty}, vx, {"label": vy}, ["label"], num_heads=2, steps=5)
    keep_t, keep_v = ty >= 0, vy >= 0
    want = train_probe(tx[keep_t], ty[keep_t], vx[keep_v], vy[keep_v], num_heads=2, steps=5)
    assert (got["label"], got["label_train"]) == want
    assert got["label_clips"] == [10, 5]
    with pytest.raises(ValueError, match="'colour' is not in the manifest.*label"):
        probe_features(tx, {"label": ty}, vx, {"label": vy}, ["colour"], num_heads=2, steps=5)
    with pytest.raises(ValueError, match="no validation clip has it"):
        probe_features(tx, {"label": ty}, vx, {"label": torch.full((6,), -1)}, ["label"], num_heads=2, steps=5)


def test_bad_input_one_line_errors(data, tmp_path, capsys):
    root, d = data
    manifest = os.path.join(d, "val.jsonl")
    enc, clip = str(root / "enc.safetensors"), str(root / "clip.safetensors")

    def error(*argv) -> str:
        capsys.readouterr()
        assert main(["eval", *argv, "--quiet", "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    assert "no text tower" in error("retrieval", manifest, "--checkpoint", enc)
    lonely = tmp_path / "m.jsonl"
    shutil.copy(manifest, lonely)
    assert "pass --tokenizer" in error("retrieval", str(lonely), "--checkpoint", clip)
    big = SPM  # the shared SentencePiece model: more pieces than the synthetic one
    if os.path.isfile(big) and Tokenizer(big).vocab_size > vp.model_from_safetensors(clip).config.vocabulary_size:
        assert "the tokenizer the checkpoint was trained with" in error("retrieval", manifest, "--checkpoint", clip,
                                                                         "--tokenizer", big)
    assert "must end in .json" in error("retrieval", manifest, "--checkpoint", clip, "--out", str(tmp_path / "r.txt"))
    assert "no such file" in error("retrieval", str(tmp_path / "none.jsonl"), "--checkpoint", clip)
    assert "--batch-size 0" in error("retrieval", manifest, "--checkpoint", clip, "--batch-size", "0")
    assert "'speed' is not in the manifest" in error("probe", manifest, manifest, "--checkpoint", enc,
                                                     "--labels", "speed", "--steps", "1")
    assert "--steps must be >= 1" in error("probe", manifest, manifest, "--checkpoint", enc, "--steps", "0")
