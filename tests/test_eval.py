"""`videoprism eval retrieval|probe` (train/evaluate.py) against independent constructions: retrieval recomputed
clip by clip through the embed path with a literal ranking loop; the probe against the demo's decode-everything
path; labels that some clips lack; bad input."""
from __future__ import annotations

import json
import os
import shutil
import sys

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
    assert got["captions"] == len(set(caps))  # the synthetic captions tokenize apart


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
    assert sorted(got["labels"]) == ["colour", "direction", "shape"]
    for name, r in got["labels"].items():
        assert r == want[name], name
        assert r["clips"] == [sum(1 for _ in open(train)), sum(1 for _ in open(val))]
    assert got["skipped"] == {"train": [], "val": []}  # per split (one merged list said neither)


def _relabel(d: str, name: str, drop_first: int) -> str:
    """A copy of train.jsonl whose first `drop_first` clips have no labels at all."""
    lines = [json.loads(x) for x in open(os.path.join(d, "train.jsonl"))]
    for rec in lines[:drop_first]:
        rec.pop("label")
    path = os.path.join(d, name)
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_labels_named_like_another_labels_results_keep_their_own():
    """Dict-label keys `colour`, `colour_train` and `colour_clips` each get their own results: the flat result
    dict had `colour_train` as both colour's training accuracy and that label's accuracy (the later label's
    overwrote it), and `eval probe` reported one label's numbers as another's."""
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(12, 5, 8, generator=g), torch.randn(6, 5, 8, generator=g)
    names = ["colour", "colour_train", "colour_clips"]
    train, val = {}, {}
    for i, name in enumerate(names):  # other classes and other clips missing per label
        train[f"label_{name}"] = torch.randint(0, 2 + i, (12,), generator=g)
        val[f"label_{name}"] = torch.randint(0, 2 + i, (6,), generator=g)
        train[f"label_{name}"][:2 * i] = -1
    got = probe_features(tx, train, vx, val, names, num_heads=2, steps=5)
    assert sorted(got) == sorted(names)
    for name in names:
        ty, vy = train[f"label_{name}"], val[f"label_{name}"]
        keep = ty >= 0
        acc, train_acc = train_probe(tx[keep], ty[keep], vx, vy, num_heads=2, steps=5)
        seen = set(ty[keep].tolist())
        assert got[name] == {"accuracy": acc, "train_accuracy": train_acc,
                             "chance": 1.0 / len(seen | set(vy.tolist())),
                             "majority": float(torch.bincount(vy).max() / 6), "clips": [int(keep.sum()), 6],
                             "unseen": sorted(set(vy.tolist()) - seen)}, name


def test_a_probe_of_classes_it_cannot_learn_says_so():
    """Validation classes with no training clip are listed (the probe scored 0% against a chance of 1 / (largest
    id + 1) without a word); chance counts the classes the clips have (ids {0, 5}: 50%, not 1/6); a label with one
    training class is refused (its accuracy is that class's share); a probe whose loss went non-finite is refused
    (NaN logits argmax to class 0: the accuracy printed was class 0's share)."""
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(12, 5, 8, generator=g), torch.randn(6, 5, 8, generator=g)
    train = {"label": torch.tensor([0, 5] * 6)}
    got = probe_features(tx, train, vx, {"label": torch.tensor([0, 5, 5, 0, 2, 3])}, ["label"], num_heads=2,
                         steps=3)
    assert got["label"]["unseen"] == [2, 3] and got["label"]["chance"] == 1 / 4
    got = probe_features(tx, train, vx, {"label": torch.tensor([0, 5] * 3)}, ["label"], num_heads=2, steps=3)
    assert got["label"]["unseen"] == [] and got["label"]["chance"] == 1 / 2
    with pytest.raises(ValueError, match="every training clip has class 5; a probe needs two classes"):
        probe_features(tx, {"label": torch.full((12,), 5)}, vx, {"label": torch.tensor([5] * 6)}, ["label"],
                       num_heads=2, steps=3)
    with pytest.raises(ValueError, match="the probe diverged"):
        probe_features(tx, train, vx, {"label": torch.tensor([0, 5] * 3)}, ["label"], num_heads=2, steps=3, lr=1e30)


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
    assert (got["label"]["accuracy"], got["label"]["train_accuracy"]) == want
    assert got["label"]["clips"] == [10, 5]
    with pytest.raises(ValueError, match=r"'colour' is not in the training manifest \(it has: \['label'\]\)"):
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
    assert "no clip has the label 'speed'" in error("probe", manifest, manifest, "--checkpoint", enc,
                                                    "--labels", "speed", "--steps", "1")
    assert "--steps must be >= 1" in error("probe", manifest, manifest, "--checkpoint", enc, "--steps", "0")


def test_probe_labels_are_checked_before_the_model_and_name_the_manifest(data, tmp_path, capsys):
    """A label that VAL lacks, an unknown or empty --labels: one line naming the manifest that lacks it and its labels,
    before the model loads (a missing checkpoint is not the error reported) and the clips are encoded."""
    _, d = data
    train = os.path.join(d, "train.jsonl")
    val = tmp_path / "val_colour_only.jsonl"
    val.write_text("".join(json.dumps({**rec, "label": {"colour": rec["label"]["colour"]}}) + "\n"
                           for rec in map(json.loads, open(os.path.join(d, "val.jsonl")))))
    nowhere = str(tmp_path / "no_such_model.safetensors")

    def error(*argv) -> str:
        capsys.readouterr()
        assert main(["eval", "probe", *argv, "--checkpoint", nowhere, "--quiet", "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "no_such_model" not in err, err
        return err

    err = error(train, str(val))  # every label of TRAIN by default: VAL has only colour
    assert err.startswith(f"error: {val}: ") and "'direction'" in err and "['colour']" in err and "--labels" in err
    err = error(train, str(val), "--labels", "colour,shape")
    assert err.startswith(f"error: {val}: ") and "'shape'" in err
    err = error(train, train, "--labels", "speed")
    assert err.startswith(f"error: {train}: ") and "'speed'" in err and "['colour', 'direction', 'shape']" in err
    assert "--labels ' , ': no label name" in error(train, train, "--labels", " , ")
    # Past the checks, the missing checkpoint is what stops it: the labels were fine.
    assert "no_such_model" in (main(["eval", "probe", train, str(val), "--labels", "colour", "--checkpoint", nowhere,
                                     "--quiet"]), capsys.readouterr().err)[1]
    # probe_features on its own names the split that lacks the label, with that split's labels.
    x = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match=r"'shape' is not in the validation manifest \(it has: \['colour'\]\)"):
        probe_features(x, {"label_shape": torch.zeros(2, dtype=torch.long)}, x,
                       {"label_colour": torch.zeros(2, dtype=torch.long)}, ["shape"], num_heads=2, steps=1)


def test_retrieval_bf16_equals_training_validation_under_its_autocast(data, tmp_path):
    """Training validates under its train.precision (auto: bf16 autocast on a GPU): eval --precision bf16 reports
    what Stage1Task.evaluate reports under a bf16 run's autocast, and its forward is that autocast's."""
    import types

    from videoprism.train.data import build_val_batches
    from videoprism.train.evaluate import encode_manifest
    from videoprism.train.parallel import Dist
    from videoprism.train.stage1 import Stage1Task

    root, d = data
    manifest = os.path.join(d, "train.jsonl")
    out = tmp_path / "r.json"
    assert main(["eval", "retrieval", manifest, "--checkpoint", str(root / "clip.safetensors"), "--batch-size", "8",
                 "--workers", "0", "--quiet", "--precision", "bf16", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["precision"] == "bf16"

    cfg = build_config("tiny", [f"model.num_frames={FRAMES}", f"model.resolution={RES}", "model.patch_size=8",
                                f"data.val={manifest}", "data.workers=0", "train.precision=bf16"], 1)
    assert cfg.train.bf16("cpu")
    model = vp.model_from_safetensors(str(root / "clip.safetensors")).eval()
    tok = Tokenizer(os.path.join(d, "spm.model"))
    one = Dist(0, 1, torch.device("cpu"))
    task = types.SimpleNamespace(val=build_val_batches(cfg, tok, batch_size=8, dist_=one)[0], dist=one)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's _evaluate of a bf16 run
        want = Stage1Task.evaluate(task, model)
    assert {k: got[k] for k in want} == want

    kw = dict(frames=FRAMES, resolution=RES, device="cpu", batch_size=8, workers=0, max_bad_share=0.0,
              tokenizer=tok, progress=False)
    enc16, enc32 = encode_manifest(model, manifest, bf16=True, **kw)[0], encode_manifest(model, manifest, **kw)[0]
    first = task.val[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v, _, _ = model(first["video"], first["text_ids"], first["text_paddings"])
    assert torch.allclose(enc16["video"][:8], v.float(), atol=1e-6)
    assert not torch.equal(enc16["video"], enc32["video"])


def test_too_many_bad_files_names_the_flag(data, tmp_path, capsys):
    _, d = data
    lines = open(os.path.join(d, "train.jsonl")).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:5] + ["not json"] + [l.replace(".webm", ".missing.webm") for l in lines[5:7]]
                             + lines[7:]) + "\n")
    for argv in (["retrieval", str(bad), "--tokenizer", os.path.join(d, "spm.model")],
                 ["probe", str(bad), str(bad), "--steps", "1"]):
        capsys.readouterr()
        assert main(["eval", *argv, "--checkpoint", os.path.join(os.path.dirname(d), "clip.safetensors"),
                     "--quiet", "--workers", "0", "--max-bad-share", "0.05"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and "--max-bad-share" in err, err


def test_streamed_fields_stay_aligned_past_a_skipped_clip(data, tmp_path):
    """A bad clip mid-manifest: the features and labels of the others fill the buffers in order, row i of each
    field the i-th good clip (oracle: each clip through read_clip and the encoder alone)."""
    from videoprism.train.evaluate import encode_manifest

    root, d = data
    lines = [json.loads(x) for x in open(os.path.join(d, "train.jsonl"))][:7]
    lines[3]["path"] = "clips/missing.webm"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({**r, "path": os.path.join(d, r["path"])}) + "\n" for r in lines))
    enc = vp.model_from_safetensors(str(root / "enc.safetensors")).eval()
    got, rejects = encode_manifest(enc, str(manifest), frames=FRAMES, resolution=RES, device="cpu", batch_size=3,
                                   workers=0, max_bad_share=0.5, feature_dtype=torch.float32, decoder="pyav",
                                   progress=False)
    good = [r for i, r in enumerate(lines) if i != 3]
    assert len(rejects) == 1 and "missing.webm" in rejects[0][0]
    assert got["tokens"].shape[0] == len(good) == got["label_colour"].shape[0]
    assert got["label_colour"].tolist() == [r["label"]["colour"] for r in good]
    with torch.no_grad():
        want = torch.cat([enc(read_clip(os.path.join(d, r["path"]), FRAMES, RES)[None])[0] for r in good])
    assert torch.allclose(got["tokens"], want, atol=1e-5)


def test_probe_on_one_manifest_for_both_splits_encodes_it_once(data, tmp_path, monkeypatch):
    import videoprism.train.evaluate as ev

    root, d = data
    train = os.path.join(d, "train.jsonl")
    calls = []
    real = ev.encode_manifest
    monkeypatch.setattr(ev, "encode_manifest", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    out = tmp_path / "p.json"
    assert main(["eval", "probe", train, train, "--checkpoint", str(root / "enc.safetensors"), "--labels", "colour",
                 "--steps", "2", "--workers", "0", "--quiet", "--out", str(out)]) == 0
    n = sum(1 for _ in open(train))
    assert calls == [train] and json.loads(out.read_text())["labels"]["colour"]["clips"] == [n, n]


def test_probe_features_that_cannot_fit_stop_before_encoding(data, monkeypatch, capsys):
    """The probe holds every clip's tokens on the host (10k base clips: 63 GB in bfloat16): past the memory
    available, the command ran out of memory (or swapped) after encoding most clips. It stops before encoding,
    naming the size and the options that shrink it."""
    import videoprism.train.evaluate as ev

    root, d = data
    train, val = os.path.join(d, "train.jsonl"), os.path.join(d, "val.jsonl")
    cfg = vp.model_from_safetensors(str(root / "enc.safetensors")).config
    clips = sum(1 for _ in open(train)) + sum(1 for _ in open(val))
    need = clips * FRAMES * (RES // cfg.patch_size) ** 2 * cfg.model_dim * 4
    monkeypatch.setattr(ev, "encode_manifest", lambda *a, **k: pytest.fail("encoded"))
    argv = ["eval", "probe", train, val, "--checkpoint", str(root / "enc.safetensors"), "--features", "float32",
            "--steps", "1", "--workers", "0", "--quiet"]
    monkeypatch.setattr(ev, "available_memory", lambda: need - 1)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the frozen tokens of the {clips} clips of TRAIN and VAL take {need / 2**30:.1f} GiB" in err
    assert "--num-frames, --resolution) or --features bfloat16" in err and err.count("\n") == 1
    monkeypatch.setattr(ev, "available_memory", lambda: need)  # they fit: encoded
    with pytest.raises(pytest.fail.Exception, match="encoded"):
        main(argv)
    if sys.platform == "linux":  # MemAvailable read (elsewhere: no check)
        from videoprism.data.cores import available_memory

        assert available_memory() is not None


def test_available_memory_counts_a_cgroups_page_cache_as_free(tmp_path, monkeypatch):
    """memory.current of a cgroup counts the files read through it (the videos, the checkpoint): a container whose
    page cache had filled up to its limit read as out of memory. Its inactive cache is free to take, as MemAvailable
    counts it on the host."""
    import videoprism.data.cores as cores

    gib = 2**30
    (tmp_path / "meminfo").write_text(f"MemTotal: {128 * gib // 1024} kB\nMemAvailable: {100 * gib // 1024} kB\n")
    (tmp_path / "memory.max").write_text(f"{64 * gib}\n")
    (tmp_path / "memory.current").write_text(f"{63 * gib}\n")   # 60 GiB of it cache, 50 GiB inactive
    (tmp_path / "memory.stat").write_text(f"anon {3 * gib}\nfile {60 * gib}\nactive_file {10 * gib}\n"
                                          f"inactive_file {50 * gib}\n")
    monkeypatch.setattr(cores, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(cores, "CGROUP", str(tmp_path))
    assert cores.available_memory() == 51 * gib                     # 1 GiB before: the cache counted as used
    (tmp_path / "memory.stat").unlink()                           # unreadable: the headroom alone
    assert cores.available_memory() == 1 * gib
    (tmp_path / "memory.max").write_text("max\n")                 # no limit: the host's
    assert cores.available_memory() == 100 * gib


def _classes(d: str, label: str) -> list[str]:
    return json.load(open(os.path.join(d, "synth.json")))["classes"][label]


def test_zeroshot_equals_clip_by_clip_oracle(data, tmp_path):
    """`eval zeroshot` against each clip embedded alone through the embed path, each prompt tokenized and embedded
    alone, the template mean taken by hand and each clip's class ranked by a literal loop."""
    root, d = data
    manifest = os.path.join(d, "val.jsonl")
    classes, templates = _classes(d, "direction"), ["a red circle moves {}", "{}", "a blue square slides {}"]
    out = tmp_path / "z.json"
    argv = ["eval", "zeroshot", manifest, "--checkpoint", str(root / "clip.safetensors"), "--label", "direction",
            "--classes-file", os.path.join(d, "synth.json"), "--batch-size", "3", "--workers", "0", "--quiet",
            "--out", str(out)]
    for t in templates:
        argv += ["--template", t]
    assert main(argv) == 0
    got = json.loads(out.read_text())
    assert got["tokenizer"] == os.path.join(d, "spm.model") and got["unlabelled"] == 0

    model = vp.model_from_safetensors(str(root / "clip.safetensors")).eval()
    tok = Tokenizer(os.path.join(d, "spm.model"))
    lines = [json.loads(x) for x in open(manifest)]
    with torch.no_grad():
        cls = []
        for c in classes:
            prompts = [model.encode_text(*tok([t.replace("{}", c)]))[0].double() for t in templates]
            prompts = [p / p.norm() for p in prompts]
            mean = sum(prompts) / len(prompts)
            cls.append(mean / mean.norm())
        video = [model.encode_video(read_clip(os.path.join(d, rec["path"]), FRAMES, RES)[None])[0][0].double()
                 for rec in lines]
    labels = [rec["label"]["direction"] for rec in lines]
    hits = []
    for v, y in zip(video, labels):
        scores = [float(v @ c) for c in cls]
        ahead = sum(1 for j, s in enumerate(scores) if j != y and s >= scores[y])
        hits.append(ahead == 0)
    assert got["clips"] == len(lines) and got["classes"] == 4 and got["templates"] == templates
    assert got["top1"] == pytest.approx(sum(hits) / len(hits), abs=1e-6) and "top5" not in got
    per = {c: [h for h, y in zip(hits, labels) if y == i] for i, c in enumerate(classes)}
    for c in classes:
        assert got["per_class"][c]["clips"] == len(per[c])
        if per[c]:
            assert got["per_class"][c]["top1"] == pytest.approx(sum(per[c]) / len(per[c]), abs=1e-6)
    present = [sum(h) / len(h) for h in per.values() if h]
    assert got["mean_class_accuracy"] == pytest.approx(sum(present) / len(present), abs=1e-6)
    assert got["chance"] == 0.25 and got["majority"] == max(len(h) for h in per.values()) / len(lines)


def test_zero_shot_metrics_by_hand():
    """Top-1, top-5, mean class accuracy on planted embeddings, and ties counting against the model."""
    from videoprism.train.zeroshot import zero_shot_metrics

    C = 7
    classes = torch.eye(C)
    # Clip i is class i's direction rotated towards class (i + 1): top-1 right for clips 0..4; clips 5 and 6 lean
    # further to the next class (top-1 wrong, rank 1: top-5 right); clip 7 is class 0 seen as class 3 at rank ~1.
    video = torch.zeros(8, C)
    for i in range(7):
        w = 0.9 if i < 5 else 0.3
        video[i, i], video[i, (i + 1) % C] = w, (1 - w * w) ** 0.5
    video[7, 3] = 1.0
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    m = zero_shot_metrics(video, classes, labels, [f"c{i}" for i in range(C)])
    assert m["top1"] == 5 / 8 and m["top5"] == 7 / 8  # clip 7: its class scores 0, tied with 5 others: rank 6
    assert m["per_class"]["c0"] == {"clips": 2, "top1": 0.5} and m["per_class"]["c5"]["top1"] == 0.0
    assert m["mean_class_accuracy"] == pytest.approx((0.5 + 1 + 1 + 1 + 1 + 0 + 0) / 7)
    assert m["chance"] == 1 / 7 and m["majority"] == 2 / 8 and m["clips"] == 8
    # A collapsed model (every clip equally close to every class) is wrong everywhere, whatever the class order.
    flat = zero_shot_metrics(torch.ones(4, 3) / 3 ** 0.5, torch.ones(3, 3) / 3 ** 0.5, torch.tensor([0, 1, 2, 0]),
                             ["a", "b", "c"])
    assert flat["top1"] == 0.0 and "top5" not in flat
    assert flat["per_class"]["b"] == {"clips": 1, "top1": 0.0}
    with pytest.raises(ValueError, match=r"label ids must be in \[0, 3\)"):
        zero_shot_metrics(torch.ones(1, 3), torch.eye(3), torch.tensor([3]), ["a", "b", "c"])


def test_zero_shot_top5_counts_ranks_0_to_4_and_needs_more_than_5_classes():
    """Top-5 is a hit when at most 4 other classes score at least as high as the clip's own; with 5 classes or
    fewer it is always 1 and is left out."""
    from videoprism.train.zeroshot import zero_shot_metrics

    video = torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.5, 0.0],    # 4 classes ahead of class 0: rank 4, a top-5 hit
                          [0.1, 0.5, 0.5, 0.5, 0.5, 0.5]])   # 5 ahead: rank 5, a miss
    m = zero_shot_metrics(video, torch.eye(6), torch.tensor([0, 0]), [f"c{i}" for i in range(6)])
    assert m["top5"] == 0.5 and m["top1"] == 0.0
    assert "top5" not in zero_shot_metrics(torch.eye(5), torch.eye(5), torch.arange(5), list("abcde"))


def test_class_embeddings_are_the_normalised_mean_of_each_class_prompts():
    """A class's embedding is normalize(mean over templates of its prompts' embeddings): planted prompt embeddings
    of different lengths of mean, the oracle by hand."""
    from videoprism.train.zeroshot import class_embeddings, check_templates

    classes, templates = ["cat", "dog"], ["a {}", "the {}", "{}"]
    prompts = [t.replace("{}", c) for c in classes for t in templates]
    g = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(len(prompts), 5, generator=g), dim=-1)

    def tokenizer(texts):  # each prompt as one token: its index
        return torch.tensor([[prompts.index(t)] for t in texts]), torch.zeros(len(texts), 1)

    class Model:
        def encode_text(self, ids, pads):  # a normalised embedding per prompt, as the text tower's
            return table[ids[:, 0]]

    got = class_embeddings(Model(), tokenizer, classes, templates, device="cpu")
    for i in range(len(classes)):
        mean = sum(table[i * len(templates) + j] for j in range(len(templates))) / len(templates)
        torch.testing.assert_close(got[i], mean / mean.norm())
    # Two {} would put the class name twice in each prompt.
    with pytest.raises(ValueError, match="exactly one"):
        check_templates(["{} and {}"])


def test_zeroshot_bad_input_one_line_errors(data, tmp_path, capsys):
    """Each bad option is one line naming the option or manifest and the fix; the label, class and template checks
    come before the model loads (the missing checkpoint is not what is reported)."""
    root, d = data
    manifest = os.path.join(d, "val.jsonl")
    nowhere = str(tmp_path / "no_such_model.safetensors")

    def error(*argv, checkpoint=nowhere) -> str:
        capsys.readouterr()
        assert main(["eval", "zeroshot", manifest, *argv, "--checkpoint", checkpoint, "--quiet", "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "no_such_model" not in err, err
        return err

    assert "pick one with --label" in error("--classes", "a,b")
    assert "no clip has the label 'speed'" in error("--label", "speed", "--classes", "a,b")
    assert "one of the two" in error("--label", "shape")
    assert "one of the two" in error("--label", "shape", "--classes", "a", "--classes-file", "x.txt")
    assert "class id 2, but 2 class names" in error("--label", "shape", "--classes", "circle,square")
    assert "both named 'square'" in error("--label", "shape", "--classes", "circle,square, square")
    assert "class 1 is ''" in error("--label", "shape", "--classes", "circle,,triangle")
    assert "exactly one '{}'" in error("--label", "shape", "--classes", "circle,square,triangle", "--template", "x")
    assert "given twice" in error("--label", "shape", "--classes", "circle,square,triangle", "--template", "a {}",
                                  "--template", "a {}")
    txt = tmp_path / "shapes.txt"
    txt.write_text("circle\n\nsquare\n")
    assert "class id 2, but 2 class names" in error("--label", "shape", "--classes-file", str(txt))  # blank lines skip
    bad = tmp_path / "c.json"
    bad.write_text('{"colour": ["red"]}')
    assert "no list of class names for the label 'shape'" in error("--label", "shape", "--classes-file", str(bad))
    bad.write_text("[1, 2")
    assert "not JSON" in error("--label", "shape", "--classes-file", str(bad))
    # Not UTF-8: the file and the fix, as embed-text's --texts-file says it (it was "'utf-8' codec can't decode").
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 {}\n".encode("latin-1"))
    for option, given in (("--classes-file", []), ("--templates-file", ["--classes", "circle,square,triangle"])):
        assert error("--label", "shape", *given, option, str(latin)).endswith(
            f"{option} {latin}: not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8")
    assert f"--templates-file {tmp_path}: a folder; pass a text file" in error(
        "--label", "shape", "--classes", "circle,square,triangle", "--templates-file", str(tmp_path))
    # Past the checks: an encoder has no text tower.
    assert "no text tower" in error("--label", "shape", "--classes", "circle,square,triangle",
                                    checkpoint=str(root / "enc.safetensors"))
    # Names that the synthetic data's tokenizer reads alike (it lowercases): their prompts always tied, and a tie
    # counts against the model. And results written over the classes file given (synth.json) replaced it.
    assert "classes 1 ('Square') and 2 ('square') are the same text to the tokenizer" in error(
        "--label", "shape", "--classes", "circle,Square,square", checkpoint=str(root / "clip.safetensors"))
    bad.write_text('["circle", "square", "triangle"]')
    assert f"--out {bad}: is the input --classes-file {bad}" in error("--label", "shape", "--classes-file", str(bad),
                                                                      "--out", str(bad))
    assert bad.read_text() == '["circle", "square", "triangle"]'
    unlabelled = tmp_path / "nolabel.jsonl"
    unlabelled.write_text("".join(json.dumps({k: v for k, v in rec.items() if k != "label"}) + "\n"
                                  for rec in map(json.loads, open(manifest))))
    capsys.readouterr()
    assert main(["eval", "zeroshot", str(unlabelled), "--classes", "a", "--checkpoint", nowhere, "--quiet"]) == 2
    assert "no clip has a 'label'" in capsys.readouterr().err


def test_zeroshot_on_a_manifest_mixing_int_and_dict_labels(data, tmp_path):
    """Clips with an int label sit out a dict label's classification and the others an int one's; the class-count
    check reads each kind alone."""
    root, d = data
    lines = [json.loads(x) for x in open(os.path.join(d, "val.jsonl"))]
    for rec in lines[:2]:
        rec["label"] = 5  # an int label, beyond the 3 shape classes
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({**r, "path": os.path.join(d, r["path"])}) + "\n" for r in lines))
    shutil.copy(os.path.join(d, "spm.model"), tmp_path / "spm.model")
    out = tmp_path / "z.json"
    assert main(["eval", "zeroshot", str(mixed), "--checkpoint", str(root / "clip.safetensors"), "--label", "shape",
                 "--classes", "circle,square,triangle", "--workers", "0", "--quiet", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["clips"] == len(lines) - 2
    assert main(["eval", "zeroshot", str(mixed), "--checkpoint", str(root / "clip.safetensors"), "--label", "label",
                 "--classes", "a,b,c,d,e,f", "--workers", "0", "--quiet", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["clips"] == 2


def test_probe_and_zeroshot_read_manifests_without_captions(data, tmp_path, capsys):
    """A classification dataset's manifest (path and label, no caption): `eval probe` and `eval zeroshot` give what
    they give on the captioned manifest; `eval retrieval` needs the captions."""
    root, d = data
    for split in ("train", "val"):
        recs = [json.loads(x) for x in open(os.path.join(d, f"{split}.jsonl"))]
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"path": os.path.join(d, r["path"]), "label": r["label"]}) + "\n" for r in recs))
    shutil.copy(os.path.join(d, "spm.model"), tmp_path / "spm.model")
    clip = str(root / "clip.safetensors")
    common = ["--checkpoint", clip, "--workers", "0", "--quiet"]
    for folder in (d, str(tmp_path)):
        assert main(["eval", "probe", os.path.join(folder, "train.jsonl"), os.path.join(folder, "val.jsonl"),
                     "--labels", "colour", "--steps", "5", *common, "--out", os.path.join(folder, "p.json")]) == 0
        assert main(["eval", "zeroshot", os.path.join(folder, "val.jsonl"), "--label", "shape", "--classes",
                     "circle,square,triangle", *common, "--out", os.path.join(folder, "z.json")]) == 0
    for name in ("p.json", "z.json"):
        got, want = (json.load(open(os.path.join(f, name))) for f in (str(tmp_path), d))
        for k in ("manifest", "train", "val", "tokenizer"):
            got.pop(k, None), want.pop(k, None)
        assert got == want, name
    capsys.readouterr()
    assert main(["eval", "retrieval", str(tmp_path / "val.jsonl"), *common]) == 2
    assert "no caption (stage 1 and retrieval need one" in capsys.readouterr().err


def test_a_diverged_models_nan_scores_are_misses():
    """NaN compares false with everything, so a rank counted from comparisons put a NaN score first: a diverged
    model read as perfect in zero-shot classification and retrieval."""
    from videoprism.train.retrieval import recall_at_k
    from videoprism.train.zeroshot import zero_shot_metrics

    nan = torch.full((4, 8), float("nan"))
    cls = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    m = zero_shot_metrics(nan, cls, torch.tensor([0, 1, 2, 0]), ["a", "b", "c"])
    assert m["top1"] == 0.0 and m["mean_class_accuracy"] == 0.0
    sim = torch.eye(3)
    sim[1, 0] = float("nan")
    groups = torch.arange(3)
    assert recall_at_k(sim, groups, groups, ks=(1,))[1] == pytest.approx(2 / 3)  # query 1 misses; 0 and 2 hit


def test_the_commands_that_need_a_text_tower_default_to_a_video_text_model(capsys):
    """Without --model or --checkpoint, retrieval and zeroshot built the default encoder and then stopped with "has
    no text tower"; they default to the video-text model, and their --help says so."""
    from videoprism.cli import DEFAULT_LVT_MODEL, DEFAULT_MODEL, build_parser

    parser = build_parser()
    for command, want in (("retrieval", DEFAULT_LVT_MODEL), ("zeroshot", DEFAULT_LVT_MODEL), ("probe", DEFAULT_MODEL)):
        argv = ["eval", command, "m.jsonl"] + (["v.jsonl"] if command == "probe" else [])
        assert parser.parse_args(argv).default_model == want
        with pytest.raises(SystemExit):
            parser.parse_args(["eval", command, "--help"])
        assert f"(default {want};" in " ".join(capsys.readouterr().out.split())


def test_names_with_control_characters_are_said_escaped(data, tmp_path, capsys):
    """A clip and a manifest named "x\\nerror: forged\\x1b[31m..." were said raw in eval's `skipped` line and its
    summary: a forged `error: forged` line, in red. Each is escaped, one line."""
    root, d = data
    forged = "x\nerror: forged\x1b[31m"
    bad = tmp_path / f"{forged}.webm"
    bad.write_bytes(b"junk")
    lines = [json.loads(x) for x in open(os.path.join(d, "train.jsonl"))][:3]
    lines = [{**r, "path": os.path.join(d, r["path"])} for r in lines] + [{**lines[0], "path": str(bad)}]
    manifest = tmp_path / f"{forged}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["eval", "retrieval", str(manifest), "--checkpoint", str(root / "clip.safetensors"), "--workers", "0",
                 "--tokenizer", os.path.join(d, "spm.model"), "--quiet", "--max-bad-share", "0.5"]) == 0
    said = capsys.readouterr()
    err, out = said.err.splitlines(), said.out.splitlines()
    shown = f"{tmp_path}/x\\nerror: forged\\x1b[31m"
    assert [line for line in err if "forged" in line][0].startswith(f"skipped {shown}.webm: "), err
    assert out[0].startswith(f"zero-shot retrieval, 3 clips of {shown}.jsonl "), out
    assert "\x1b" not in said.err + said.out and not any(line.startswith("error") for line in err + out)
