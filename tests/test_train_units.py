"""Unit tests of the training pieces that need no training run: config, schedule, losses,
retrieval metrics, the FLOP formula, text trimming, and atomic checkpoints."""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import PEAK_MEMORY
from videoprism.train import checkpoint as ckpt
from videoprism.train.config import OptimConfig, build_config, help_text, parse_args, save_config
from videoprism.train.data import trim_text
from videoprism.train.losses import contrastive_loss, cosine_distance
from videoprism.train.optim import lr_at
from videoprism.train.retrieval import caption_groups, recall_at_k, retrieval_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_overrides_and_errors():
    cfg = build_config("tiny", ["optim.lr=0.5", "train.compile=false", "stage2.shuffle=no", "model.num_frames=4"], 2)
    assert cfg.optim.lr == 0.5 and cfg.train.compile is False and cfg.stage2.shuffle is False
    assert cfg.model.num_frames == 4 and cfg.train.mask_ratio == 0.65  # stage-2 default kept under the preset
    assert build_config("base", [], 1).train.mask_ratio == 0.5
    # A key without a section: the section of its field, or for `preset` (no field) the ways to choose one; it
    # suggested `train.preset` and `train.foo`, neither of which exists.
    for bad, needle in (("optim.lr", "key=value"), ("lr=1", "needs a section, e.g. optim.lr"),
                        ("preset=base", r"choose it with --config NAME \(tiny, base, large, giant\), or write "
                                        '`preset = "NAME"`'),
                        ("foo=1", "key 'foo' is no field of any section"), ("nope.lr=1", "unknown config section"),
                        ("optim.nope=1", "unknown field"), ("train.compile=maybe", "train.compile"),
                        ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
                        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
                        ("train.seed=4294967296", r"train.seed=4294967296 is out of range: it must be in \[0, "
                                                  r"4294967295\]")):
        with pytest.raises(ValueError, match=needle):
            build_config("tiny", [bad], 1)
    with pytest.raises(ValueError, match="unknown config preset"):
        build_config("huge", [], 1)


def test_an_unknown_field_names_its_new_name_or_the_closest_field(tmp_path):
    """An old config (train.mixed_precision, renamed train.precision; data.max_bad_fraction, renamed
    data.max_bad_share) or a typo (train.stpes) was refused as "unknown field" followed by the whole list: the
    error names the renamed field's new name, else the closest field; a name close to none gets no guess."""
    old = tmp_path / "old.toml"
    old.write_text("[train]\nmixed_precision = true\n")
    for config, override, needle in (
            ("tiny", "train.mixed_precision=false", "'mixed_precision' in section 'train', renamed to train.precision"),
            (str(old), "train.steps=3", r"old.toml: unknown field 'mixed_precision' in section 'train', renamed to "
                                        r"train.precision \(true: auto, false: fp32\); fields: steps, "),
            ("tiny", "data.max_bad_fraction=0.1", "renamed to data.max_bad_share; fields: "),
            ("tiny", "train.stpes=3", r"unknown field 'stpes' in section 'train' \(did you mean train.steps\?\); "),
            ("tiny", "optim.warmup=3", r"\(did you mean optim.warmup_steps\?\)")):
        with pytest.raises(ValueError, match=needle):
            build_config(config, [override], 1)
    with pytest.raises(ValueError) as e:
        build_config("tiny", ["train.qqqq=1"], 1)
    assert "did you mean" not in str(e.value) and "renamed" not in str(e.value)


def test_config_values_as_users_write_them(tmp_path, monkeypatch):
    """~ at the start of a path field's path is the home folder (the shell does not expand it after `key=`: a
    folder named ~ was made in the current one), in overrides and files alike; a step count written 2e5 (as DESIGN
    writes them) is an int; an empty config file says so (it was an "unknown config preset" of its path)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    cfg = build_config("tiny", ["train.out_dir=~/runs/x", "data.train=~/a.jsonl:2,~/b.jsonl", "train.steps=2e5",
                                "data.val=~/v.jsonl"], 1)
    assert (cfg.train.out_dir, cfg.data.train, cfg.train.steps) == (f"{home}/runs/x",
                                                                     f"{home}/a.jsonl:2,{home}/b.jsonl", 200000)
    assert cfg.data.val == f"{home}/v.jsonl"
    (tmp_path / "c.toml").write_text('preset = "tiny"\n[data]\ntokenizer = "~/spm.model"\n')
    assert build_config(str(tmp_path / "c.toml"), [], 1).data.tokenizer == f"{home}/spm.model"
    with pytest.raises(ValueError, match="expected an integer, got '2.55e1'"):  # 25.5 steps
        build_config("tiny", ["train.steps=2.55e1"], 1)
    (tmp_path / "empty.toml").write_text("")
    with pytest.raises(ValueError, match="empty.toml' is empty; write `preset = NAME`"):
        build_config(str(tmp_path / "empty.toml"), [], 1)
    with pytest.raises(ValueError, match="train.mask_ratio=0.999 leaves no visible patch of a frame's 8x8"):
        build_config("tiny", ["train.mask_ratio=0.999"], 2)  # it failed at the first step


@pytest.mark.parametrize("stage", [1, 2])
def test_a_mask_ratio_that_masks_no_patch_is_refused(stage):
    """On a 2x2 grid a ratio of 0.1 keeps round(4 x 0.9) = 4 patches: the run trained without a mask and said
    nothing. The refusal names the field and the smallest ratio that masks a patch; 0 (no mask) and that ratio
    pass."""
    from videoprism.masking import num_visible

    small = ["model.resolution=16"]  # the tiny preset's patch 8: 2x2 patches a frame
    with pytest.raises(ValueError, match=r"train.mask_ratio=0.1 masks no patch of a frame's 2x2 .* raise it to at "
                                         r"least 0.25 or set 0$"):
        build_config("tiny", [*small, "train.mask_ratio=0.1"], stage)
    with pytest.raises(ValueError, match=r"train.mask_ratio=0.4 masks nothing on a frame of 1x1 patches .*set "
                                         r"train.mask_ratio=0 or raise model.resolution$"):
        build_config("tiny", ["model.resolution=8", "train.mask_ratio=0.4"], stage)
    for ratio in (0.0, 0.25):
        cfg = build_config("tiny", [*small, f"train.mask_ratio={ratio}"], stage)
        assert num_visible((2, 2), cfg.train.mask_ratio) == (4 if ratio == 0 else 3)
    assert build_config("tiny", ["model.resolution=8", "train.mask_ratio=0"], stage).train.mask_ratio == 0


def test_a_runs_config_file_says_what_it_leaves_to_the_preset_and_another_stage(tmp_path, capsys):
    """A run's config.json holds every field: one it lacks (an older file, a hand edit) took the tiny preset's value
    without a word, and a stage-1 run's file given to stage 2 its mask ratio and schedule. Both are said."""
    from videoprism.train.config import save_config

    path = str(tmp_path / "config.json")
    save_config(build_config("base", [f"train.out_dir={tmp_path}"], 1), path, stage=1)
    capsys.readouterr()
    assert build_config(path, [], 1).model.num_frames == 16 and capsys.readouterr().err == ""
    assert build_config(path, [], 2).train.mask_ratio == 0.5
    assert (f"warning: {path} is a stage-1 run's config: its train.mask_ratio=0.5 (stage 2's default: 0.65)"
            in capsys.readouterr().err)
    data = json.load(open(path))
    assert data["preset"] == "base"
    del data["model"]["num_frames"], data["optim"]["lr"]
    json.dump(data, open(path, "w"))
    assert build_config(path, [], 1).model.num_frames == 16  # the run's preset's: said
    assert (f"warning: {path} has no model.num_frames, optim.lr (2 field(s)): they take the base preset's values"
            in capsys.readouterr().err)
    del data["preset"]  # an older version's file names none: the default preset's, said
    json.dump(data, open(path, "w"))
    assert build_config(path, [], 1).model.num_frames == 8
    assert "they take the tiny preset's values" in capsys.readouterr().err


def test_config_files_layer_between_preset_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "base"\n[optim]\nlr = 1\ndecay = "cosine"\n[train]\nsteps = 7\ncompile = false\n')
    cfg = build_config(str(toml), ["train.steps=9"], 1)
    assert cfg.model.name == "videoprism_lvt_v1_base" and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.decay == "cosine" and cfg.train.compile is False and cfg.train.steps == 9   # override wins
    # A run's saved config reads back to the same config, whatever the stage defaults were.
    tuned = build_config("tiny", ["optim.lr=0.25", "stage2.shuffle=false", "model.num_frames=4"], 2)
    save_config(tuned, str(tmp_path / "out" / "config.json"))
    assert build_config(str(tmp_path / "out" / "config.json"), [], 2) == tuned
    assert build_config(str(tmp_path / "out" / "config.json"), [], 1) == tuned
    for text, needle in (('[optim]\nlr = "fast"\n', r"run.toml: optim.lr must be float, got 'fast'"),
                         ('[optim]\nnope = 1\n', "run.toml: unknown field 'nope'"),
                         ('[train]\nsteps = 1.5\n', "train.steps must be int"),
                         ('optim = 3\n', "'optim' must be a table"),
                         ('steps = 3\n', r"top-level key 'steps' is not a config section; put it under \[train\]"),
                         ('nope = 3\n', "top-level key 'nope' is not a config section; sections: model, data"),
                         ('preset = "huge"\n', "run.toml: unknown preset 'huge'"),
                         ('preset = ["base"]\n', r"run.toml: unknown preset \['base'\]; choose one of tiny"),
                         ('[optim]\ndecay = "cosin"\n', "optim.decay='cosin' is not one of 'linear', 'cosine'"),
                         ('[optim\n', "not a valid TOML config"),
                         ('launch_dir = "runs"\n', "run.toml: launch_dir must be the absolute folder the run was")):
        toml.write_text(text)
        with pytest.raises(ValueError, match=needle):
            build_config(str(toml), [], 1)
    with pytest.raises(ValueError, match="does not exist"):
        build_config(str(tmp_path / "missing.json"), [], 1)
    (tmp_path / "RUN.JSON").write_text('{"preset": "base"}')
    (tmp_path / "run").write_text('{"preset": "base"}')  # no extension: read as JSON
    assert build_config(str(tmp_path / "RUN.JSON"), [], 1) == build_config(str(tmp_path / "run"), [], 1)
    (tmp_path / "run.yaml").write_text("preset: base\n")
    with pytest.raises(ValueError, match="only .toml and .json files are read, got '.yaml'"):
        build_config(str(tmp_path / "run.yaml"), [], 1)
    # Not UTF-8 (a Latin-1 editor's file) is said as such with the fix, not as "'utf-8' codec can't decode byte";
    # a byte-order mark (Notepad) is no part of the config (TOML and JSON failed on it: "Unexpected UTF-8 BOM").
    for name, text in (("latin1.toml", '[data]\ntokenizer = "caf\xe9.model"\n'),
                       ("latin1.json", '{"data": {"tokenizer": "caf\xe9.model"}}')):
        (tmp_path / name).write_bytes(text.encode("latin-1"))
        at = text.index("\xe9")
        with pytest.raises(ValueError, match=f"^config file {tmp_path / name}: not UTF-8 text \\(byte 0xe9 at offset "
                                             f"{at}\\); save it as UTF-8$"):
            build_config(str(tmp_path / name), [], 1)
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.replace("\xe9", "e").encode("utf-8"))
        assert build_config(str(tmp_path / name), [], 1).data.tokenizer == "cafe.model"


def test_a_toml_config_reads_without_tomllib(tmp_path, monkeypatch):
    """Python 3.10 (pyproject: >= 3.10) has no tomllib: every .toml config, which the README shows, stopped with
    "reading TOML needs Python >= 3.11". tomli, the package tomllib came from, reads it there; without either the
    error names the file and the package to install."""
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` fails, as on 3.10
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "base"\n[optim]\nlr = 1\n[train]\nsteps = 7\n')
    cfg = build_config(str(toml), [], 1)
    assert cfg.model.name == "videoprism_lvt_v1_base" and cfg.optim.lr == 1.0 and cfg.train.steps == 7
    toml.write_text("[optim\n")
    with pytest.raises(ValueError, match="run.toml: not a valid TOML config"):
        build_config(str(toml), [], 1)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ValueError, match=r"run.toml: reading TOML on Python < 3.11 needs the tomli package: pip"):
        build_config(str(toml), [], 1)


def test_a_config_json_that_cannot_be_written_is_one_line_naming_it_and_the_fix(tmp_path, monkeypatch):
    """A full disk when a run writes (a resume: rewrites) OUT_DIR/config.json stopped it with "[Errno 28] No
    space left on device", naming no file and no fix. The file it had stays whole."""
    import builtins

    import videoprism.paths as paths

    path = str(tmp_path / "config.json")
    save_config(build_config("tiny", [], 1), path)
    before = open(path).read()
    monkeypatch.setattr(paths, "open", lambda *a, **k: builtins.open("/dev/full", "w"), raising=False)
    with pytest.raises(OSError) as err:
        save_config(build_config("tiny", ["train.steps=7"], 1), path)
    msg = str(err.value)
    assert msg.startswith(f"writing the run's config {path} failed (No space left on device)") and "\n" not in msg
    assert "train.out_dir" in msg
    assert open(path).read() == before and os.listdir(tmp_path) == ["config.json"]


def test_resume_flags(tmp_path, capsys):
    from videoprism.train.config import ResumeFrom

    out, elsewhere = str(tmp_path / "run"), str(tmp_path / "elsewhere")
    os.makedirs(elsewhere)
    assert parse_args([f"train.out_dir={out}"], 1)[1:] == (None, False)
    assert parse_args([f"train.out_dir={out}", "--overwrite"], 1)[1:] == (None, True)
    assert parse_args([f"train.out_dir={out}", "--resume"], 1)[1] == ResumeFrom(out)
    assert parse_args([f"train.out_dir={out}", "--resume", elsewhere], 1)[1] == ResumeFrom(elsewhere)
    assert parse_args([f"train.out_dir={out}", "--auto-resume"], 1)[1] == ResumeFrom(out, if_any=True)
    with pytest.raises(SystemExit):
        parse_args(["--resume", "--auto-resume"], 1)
    assert "--resume and --auto-resume exclude each other" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--overwrite and --auto-resume exclude each other"):
        parse_args(["--overwrite", "--auto-resume"], 1)
    # A mistyped path: said as such, not as the tiny preset's empty data.train
    with pytest.raises(FileNotFoundError, match=f"--resume {tmp_path / 'typo'}: no such file or folder"):
        parse_args(["--resume", str(tmp_path / "typo")], 1)


def test_another_stages_fields_are_said_to_have_no_effect(tmp_path, capsys):
    """Stage 2 reads no stage1.*, model.init (its student is the teacher's encoder) or data.tokenizer (no text),
    stage 1 no stage2.*: given, they were accepted and did nothing, and stage 2 even stopped on a model.init or
    data.tokenizer file it would not read. Now one note names them (from the overrides and a config file's tables,
    which may configure both stages; not from a run's config.json, which holds every field), and the run goes on."""
    from videoprism.train.config import check_inputs

    out = f"train.out_dir={tmp_path}/run"
    init = tmp_path / "missing.safetensors"
    cfg = parse_args(["stage1.lit=true", f"model.init={init}", "stage2.shuffle=false", out], 2)[0]
    assert capsys.readouterr().err == ("note: stage 2 does not read model.init, stage1.lit (stage 1's only): no "
                                       "effect on this run\n")
    assert cfg.stage1.lit and not cfg.stage2.shuffle
    check_inputs(cfg, 2)  # the model.init that stage 2 does not read is not looked for
    with pytest.raises(FileNotFoundError, match="model.init="):
        check_inputs(cfg, 1)
    both = tmp_path / "both.toml"
    both.write_text('preset = "tiny"\n[data]\ntokenizer = "spm.model"\n[stage1]\nlit = true\n'
                    '[stage2]\nshuffle = false\n')
    parse_args(["--config", str(both), out], 1)
    assert capsys.readouterr().err == ("note: stage 1 does not read stage2.shuffle (stage 2's only): no effect on "
                                       "this run\n")
    parse_args(["--config", str(both), out], 2)
    assert capsys.readouterr().err == ("note: stage 2 does not read data.tokenizer, stage1.lit (stage 1's only): no "
                                       "effect on this run\n")
    save_config(build_config(str(both), [out], 1), str(tmp_path / "config.json"), stage=1)
    parse_args(["--config", str(tmp_path / "config.json")], 2)  # every field, stage1.lit=true among them
    assert "note:" not in capsys.readouterr().err
    parse_args(["stage1.lit=true", "model.init=random", out], 1)
    assert capsys.readouterr().err == ""


def test_a_resume_without_config_continues_the_runs_config(tmp_path, capsys, monkeypatch):
    """`--resume` with no --config built the tiny preset: a base run resumed so got tiny's model (and every
    schedule field moved). Now it takes the run's config.json, keeps the run's folder and applies the overrides."""
    from videoprism.train.config import ResumeFrom, save_config

    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    saved = build_config("base", ["train.out_dir=run", "optim.lr=0.003"], 1)  # out_dir relative to the first cwd
    save_config(saved, str(run / "config.json"))
    monkeypatch.chdir("/")  # resumed from elsewhere
    step = str(run / "checkpoints" / "step_00000010")
    os.makedirs(step)
    os.makedirs(tmp_path / "other")
    for argv in (["--resume", step], ["--resume", str(run)], ["--auto-resume", f"train.out_dir={run}"],
                 [f"train.out_dir={run}", "--resume"]):
        cfg, resume, _ = parse_args(argv, 1)
        assert cfg.model == saved.model and cfg.optim == saved.optim and cfg.train.out_dir == str(run), argv
        assert resume.path in (step, str(run))
        assert f"config: {run / 'config.json'}" in capsys.readouterr().err
    cfg, *_ = parse_args(["--resume", step, "optim.lr=0.5"], 1)
    assert cfg.optim.lr == 0.5 and cfg.model == saved.model
    monkeypatch.chdir(tmp_path)  # from where it ran: its out_dir as saved (no change to report on resume)
    assert parse_args(["--resume", "run"], 1)[0] == saved
    cfg, *_ = parse_args(["--resume", step, "--config", "tiny"], 1)  # --config given: it wins
    assert cfg.model == build_config("tiny", [], 1).model
    cfg, resume, _ = parse_args(["--resume", str(tmp_path / "other")], 1)  # no config.json: tiny, said
    assert cfg == build_config("tiny", [], 1) and resume == ResumeFrom(str(tmp_path / "other"))
    assert "no config.json there or above it" in capsys.readouterr().err
    other = f"train.out_dir={tmp_path / 'other'}"
    cfg, resume, _ = parse_args(["--resume", other], 1)  # its out_dir's, without PATH: said too
    assert cfg == build_config("tiny", [other], 1) and resume == ResumeFrom(str(tmp_path / "other"))
    assert "no config.json there or above it" in capsys.readouterr().err
    parse_args(["--auto-resume", other], 1)  # a requeued job's first start: nothing to say
    assert "config" not in capsys.readouterr().err


def test_a_resume_from_another_folder_reads_the_files_the_run_read(tmp_path, capsys, monkeypatch):
    """A resume without --config took the run's config.json with its relative paths (manifests, tokenizer, teacher)
    as they were written, resolved from wherever the resume ran: from another folder it stopped on a missing file
    or, where that folder held files of the same relative names, trained on those. They resolve from the folder the
    run was launched from, which config.json records; paths given on the resume's command line from the resume's
    folder; a config.json written before that record, as before."""
    import json

    from videoprism.paths import write_json_atomic
    from videoprism.train.config import config_changes
    from videoprism.train.data import parse_datasets

    first, other = tmp_path / "first", tmp_path / "other"
    for folder in (first, other):  # the same relative names in both folders, each file holding its folder's name
        for name in ("data/a.jsonl", "data/b.jsonl", "data/val.jsonl", "data/spm.model", "teacher.safetensors"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(str(folder))

    def read(cfg):  # the folder of each file the config names, opened as a run opens it (from the current folder)
        train = [(open(path).read(), weight, frames) for path, weight, frames in parse_datasets(cfg.data.train, 8)]
        return train, [open(path).read() for path in (cfg.data.val, cfg.data.tokenizer, cfg.stage2.teacher)]

    monkeypatch.chdir(first)
    run = first / "run"
    saved = build_config("tiny", ["data.train=data/a.jsonl:2, data/b.jsonl:1:1", "data.val=data/val.jsonl",
                                  "data.tokenizer=data/spm.model", "stage2.teacher=teacher.safetensors",
                                  f"train.out_dir={run}"], 2)
    save_config(saved, str(run / "config.json"))
    want = read(saved)  # what the run read
    assert want == ([(str(first), 2.0, 8), (str(first), 1.0, 1)], [str(first)] * 3)
    assert read(parse_args(["--resume", "run"], 2)[0]) == want
    monkeypatch.chdir(other)
    cfg, *_ = parse_args(["--resume", str(run)], 2)
    assert read(cfg) == want and cfg.model == saved.model and cfg.train.out_dir == str(run)
    assert config_changes(json.load(open(run / "config.json")), cfg.to_dict()) == []  # the same files: no change
    tiny, base = build_config("tiny", [], 2).to_dict(), build_config("base", [], 2).to_dict()
    assert "preset: 'tiny' -> 'base'" in config_changes(tiny, base)
    del tiny["preset"]  # an older version's config.json: its fields' changes only
    assert not [c for c in config_changes(tiny, base) if c.startswith("preset")] and config_changes(tiny, base)
    cfg, *_ = parse_args(["--resume", str(run), "data.val=data/val.jsonl"], 2)  # an override: from this folder
    assert read(cfg) == (want[0], [str(other), str(first), str(first)])
    changes = config_changes(json.load(open(run / "config.json")), cfg.to_dict())
    assert changes == [f"data.val: {str(first / 'data/val.jsonl')!r} -> {str(other / 'data/val.jsonl')!r}"]
    write_json_atomic(str(run / "config.json"), saved.to_dict())  # as written before the record: as before
    cfg, *_ = parse_args(["--resume", str(run)], 2)
    assert cfg.data == saved.data and read(cfg) == ([(str(other), 2.0, 8), (str(other), 1.0, 1)], [str(other)] * 3)
    capsys.readouterr()


def test_a_data_train_path_holding_colons_is_one_path(tmp_path):
    """data.train entries are PATH[:WEIGHT[:FRAMES]], split at every ':': a manifest in a folder named "clips 12:30"
    was refused ("WEIGHT must be a number"), and a shard "take:2.tar" read as "take" with weight 2 (then missing).
    The path is the part that names a file; the weight and frames are what follows it."""
    from videoprism.train.data import parse_datasets

    folder = tmp_path / "clips 12:30"
    folder.mkdir()
    for name in ("train.jsonl", "take:2.tar"):
        (folder / name).write_text("")
    manifest, shard = str(folder / "train.jsonl"), str(folder / "take:2.tar")
    assert parse_datasets(f"{manifest}, {shard}:3, {manifest}:0.5:4", 8) == [
        (manifest, 1.0, 8), (shard, 3.0, 8), (manifest, 0.5, 4)]
    with pytest.raises(ValueError, match="WEIGHT must be a number"):  # an entry whose path is a file: as before
        parse_datasets(f"{manifest}:x", 8)
    with pytest.raises(FileNotFoundError, match=f"manifest '{tmp_path}/clips 12:30/none.jsonl' does not exist"):
        parse_datasets(f"{folder}/none.jsonl:2:4", 8)  # no file: the trailing numbers are the weight and frames


def test_fields_with_choices_are_checked_when_set():
    for bad in ("optim.decay=cosin", "optim.name=sgd", "parallel.mode=ddpp", "train.device=gpu",
                "data.source=files", "model.attention_backend=fast"):
        with pytest.raises(ValueError, match="is not one of"):
            build_config("tiny", [bad], 1)
    assert "One of: linear, cosine, constant." in help_text(1)


def test_help_of_a_resume_shows_the_resumed_runs_values(tmp_path, capsys):
    """`--resume PATH --help` (no --config) lists the values that resume takes, those of the run's config.json,
    not tiny's: the epilog said "those of --config tiny" for a base run."""
    run = tmp_path / "run"
    save_config(build_config("base", [f"train.out_dir={run}"], 1), str(run / "config.json"))
    for argv in (["--resume", str(run / "checkpoints" / "step_00000002")], ["--resume", f"train.out_dir={run}"],
                 ["--auto-resume", f"train.out_dir={run}"]):
        with pytest.raises(SystemExit):
            parse_args([*argv, "optim.lr=0.25", "--help"], 1)
        text = capsys.readouterr().out
        assert f"those of --config {run / 'config.json'} and the overrides given" in text, argv
        assert "train.global_batch=4096" in text and "optim.lr=0.25" in text, argv
    with pytest.raises(SystemExit):  # no config.json there: tiny, as that resume takes
        parse_args(["--resume", str(tmp_path / "other"), "--help"], 1)
    assert "those of --config tiny:" in capsys.readouterr().out


def test_help_lists_every_field():
    text = help_text(1)
    cfg = build_config("base", [], 1)
    for section, values in cfg.to_dict().items():
        if section == "preset":
            continue
        for name in values:
            assert f"{section}.{name}=" in text



def test_help_shows_the_values_of_the_chosen_config(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--config", "base", "optim.lr=0.25", "--help"], 1)
    text = capsys.readouterr().out
    assert "those of --config base and the overrides given" in text
    assert "train.global_batch=4096" in text and "optim.lr=0.25" in text and "optim.name='adafactor'" in text
    assert "train.global_batch=32" in help_text(1)  # tiny by default
    assert "default preset 'tiny' (--config nope: unknown config preset" in help_text(1, "nope")
    with pytest.raises(SystemExit):  # --config without its value: the real parser's error, exit 2
        parse_args(["--config"], 1)
    assert "usage: python -m train.stage1" in capsys.readouterr().err


def test_usage_names_the_command_that_was_run():
    """Installed, the module is videoprism.train.stage1 (or the console script), not the repository's train.stage1."""
    for module in ("videoprism.train.stage1", "train.stage2"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: python -m {module} "), r.stdout[:200]


def test_lr_schedule():
    c = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="cosine")
    assert lr_at(0, c, 110) == pytest.approx(0.1)
    assert lr_at(9, c, 110) == pytest.approx(1.0)
    assert lr_at(60, c, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, c, 110) == pytest.approx(0.1)
    # The first step past the warm-up is the top (warm-up ends at step 9, not 10), a step past the end stays at
    # min_lr (the cosine does not turn back up), and "constant" holds lr after the warm-up.
    assert lr_at(10, c, 110) == pytest.approx(1.0)
    assert lr_at(200, c, 110) == pytest.approx(0.1)
    c.decay = "constant"
    assert lr_at(0, c, 110) == pytest.approx(0.1) and lr_at(10, c, 110) == lr_at(200, c, 110) == 1.0
    c.decay = "linear"
    assert lr_at(60, c, 110) == pytest.approx(0.55)
    c.decay = "linaer"  # refused at step 0, not only when the warm-up ends
    with pytest.raises(ValueError, match="optim.decay=.linaer. is not one of"):
        lr_at(0, c, 110)


def test_adafactor_switches_reach_the_optimizer_and_adamw_refuses_them():
    from videoprism.train.optim import build_optimizer

    cfg = build_config("base", ["optim.adafactor_momentum=0.9", "optim.adafactor_relative_step=false"], 1)
    opt = build_optimizer([("w", torch.nn.Parameter(torch.ones(3, 3)))], cfg.optim)
    assert [(g["momentum"], g["relative_step"]) for g in opt.param_groups] == [(0.9, False)] * 2
    default = build_optimizer([("w", torch.nn.Parameter(torch.ones(3, 3)))], build_config("base", [], 1).optim)
    assert [(g["momentum"], g["relative_step"]) for g in default.param_groups] == [(0.0, True)] * 2
    for over in ("optim.adafactor_momentum=0.9", "optim.adafactor_relative_step=false"):
        with pytest.raises(ValueError, match="apply to optim.name=adafactor, not 'adamw'"):
            build_config("tiny", [over], 1)
    with pytest.raises(ValueError, match=r"optim.adafactor_momentum=1.0 is out of range"):
        build_config("base", ["optim.adafactor_momentum=1"], 1)


def test_fields_a_random_source_or_a_missing_val_leave_unread_are_said(tmp_path, capsys):
    """data.source=random draws seeded clips and captions: data.train, data.val, data.cache... given with it did
    nothing, silently; train.eval_every with no validation split (data.val unset, or the random source) never
    evaluated, silently. A note names them; without them given (the preset's values), nothing is said."""
    from videoprism.train.config import check_inputs

    out = f"train.out_dir={tmp_path}/run"
    cfg = parse_args(["data.source=random", "data.val=v.jsonl", "data.cache=false", "data.tokenizer=t.model", out],
                     1)[0]
    assert capsys.readouterr().err == ("note: data.source=random reads none of data.cache, data.tokenizer, data.val "
                                       "(it draws seeded random clips and captions): no effect on this run\n")
    check_inputs(cfg, 1)  # the missing v.jsonl and t.model it does not read are not looked for (they stopped it)
    parse_args(["train.eval_every=5", out], 2)
    assert capsys.readouterr().err == ("note: train.eval_every=5 evaluates on data.val and data.val is not set: this "
                                       "run does not evaluate; set data.val=VAL.jsonl (with data.source=manifest)\n")
    parse_args(["data.source=random", "train.eval_every=5", out], 1)
    assert "data.source=random has no validation split" in capsys.readouterr().err
    for quiet in (["data.source=random", out], ["train.eval_every=5", "data.val=v.jsonl", out],
                  ["train.eval_every=0", out]):
        parse_args(quiet, 1)
        assert "note:" not in capsys.readouterr().err, quiet


@pytest.mark.parametrize("unread", ["optim.beta1=0.95", "optim.beta2=0.98"])
def test_adamw_betas_under_adafactor_are_refused(unread):
    """AdamW's betas under Adafactor (the base preset's optimizer) were accepted and changed nothing the run did,
    while Adafactor's switches under AdamW were refused. Refused alike, naming Adafactor's own; with optim.name=adamw
    the value reaches the config."""
    with pytest.raises(ValueError) as e:
        build_config("base", [unread], 1)
    assert str(e.value) == ("optim.beta1 / optim.beta2 apply to optim.name=adamw, not 'adafactor'; drop them "
                            "(Adafactor's are optim.adafactor_momentum and optim.adafactor_relative_step)")
    key, value = unread.split("=")
    assert getattr(build_config("base", ["optim.name=adamw", unread], 1).optim, key.split(".")[1]) == float(value)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_weight_decay_reaches_matrices_only(name):
    """build_optimizer (its docstring, CLIP/ViT practice): decoupled weight decay on matrices (linear weights,
    position embeddings), none on biases, LayerNorm weights or the one-element temperature; frozen
    parameters are not optimised at all. Oracle: with zero gradients a step of either optimizer is the
    decay alone, p * (1 - lr * wd) for a decayed parameter and p unchanged for the others."""
    from videoprism.train.optim import build_optimizer

    g = torch.Generator().manual_seed(0)
    shapes = {"proj.weight": (3, 4), "proj.bias": (3,), "ln.weight": (3,), "ln.bias": (3,), "logit_scale": (1,),
              "pos_emb": (5, 3), "frozen.weight": (3, 3), "frozen.bias": (3,)}
    named = [(k, torch.nn.Parameter(torch.randn(*v, generator=g) + 1.0, requires_grad=not k.startswith("frozen")))
             for k, v in shapes.items()]
    before = {k: p.detach().clone() for k, p in named}
    opt = build_optimizer(named, OptimConfig(name=name, lr=0.1, weight_decay=0.5))
    for _, p in named:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for k, p in named:
        factor = 1 - 0.1 * 0.5 if k in ("proj.weight", "pos_emb") else 1.0
        torch.testing.assert_close(p.detach(), before[k] * factor, rtol=1e-6, atol=0, msg=k)
    # "p unchanged" holds for a parameter left out of the optimizer too: every trainable one is in it, once.
    held = [id(p) for group in opt.param_groups for p in group["params"]]
    assert sorted(held) == sorted(id(p) for _, p in named if p.requires_grad)


@pytest.mark.parametrize("autocast", [False, True])
def test_contrastive_loss_matches_naive_formula(autocast):
    """Also under bf16 autocast (the GPU training step's), which would run the logits' matmuls in bf16:
    at the largest logit scale (100) that was 1.5e-3 off the fp32 loss here."""
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(6, 64, generator=g), dim=-1)
    t = F.normalize(v + 0.5 * torch.randn(6, 64, generator=g), dim=-1)
    s = torch.tensor([math.log(100.0)])
    logits = 100.0 * v @ t.T
    naive = 0.0
    for i in range(6):  # -log softmax of the matching pair, in both directions
        naive += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = contrastive_loss(v, t, s)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, naive / 12, atol=1e-5)


def test_cosine_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert float(cosine_distance(a, b)) == pytest.approx(0.5)
    # The stage-2 token loss's shape [B, n, D]: the mean over all B * n positions, by a literal loop.
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    terms = [1 - float(p[i, j] @ t[i, j]) / float(p[i, j].norm() * t[i, j].norm()) for i in range(3) for j in range(5)]
    assert float(cosine_distance(p, t)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_retrieval_ranks_in_fp32_under_autocast():
    """Evaluation runs under the step's autocast: the similarity that ranks the clips stays fp32 (in bf16,
    whose resolution near 1 is 2^-8, a caption's own clip ahead of a near-twin by 2e-4 loses its rank)."""
    g = torch.Generator().manual_seed(3)
    v = F.normalize(torch.randn(20, 64, generator=g), dim=-1)
    t = F.normalize(0.5002 * v + 0.4998 * v.roll(-1, 0), dim=-1)  # own clip first, the next one a close second
    groups = torch.arange(20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = retrieval_metrics(v, t, groups)
    assert m["t2v_R@1"] == 1.0


def test_retrieval_metrics_brute_force():
    g = torch.Generator().manual_seed(1)
    n = 40
    v = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    t = F.normalize(v + 0.8 * torch.randn(n, 16, generator=g), dim=-1)
    ids = torch.randint(3, 9, (n, 5), generator=g)
    ids[5] = ids[17]  # one duplicated caption: either clip is a hit
    pads = torch.zeros(n, 5)
    groups = caption_groups(ids, pads)
    m = retrieval_metrics(v, t, groups)
    sim = t @ v.T
    for k in (1, 5, 10):
        hits = 0
        for q in range(n):
            top = sim[q].argsort(descending=True)[:k].tolist()
            hits += any(groups[i] == groups[q] for i in top)
        assert m[f"t2v_R@{k}"] == pytest.approx(hits / n)
    rows = [tuple(r) for r in ids.tolist()]
    assert m["chance_R@1"] == pytest.approx(sum(rows.count(r) for r in rows) / n / n)
    assert m["captions"] == len(set(rows)) == n - 1


def test_retrieval_ties_count_against_the_model():
    """A collapsed model (every embedding equal) retrieves nothing, whatever the order of the
    split: a topk would break the ties by index and score by how the clips are ordered."""
    groups = torch.arange(20).repeat_interleave(5)          # 20 captions x 5 clips, grouped
    same = F.normalize(torch.ones(100, 8), dim=-1)
    for order in (groups, groups.reshape(20, 5).T.reshape(-1)):  # grouped and interleaved
        m = retrieval_metrics(same, same, order)
        assert m["t2v_R@10"] == m["v2t_R@1"] == 0.0
    # One tie with the true item: it no longer counts as rank 1.
    sim = torch.tensor([[0.9, 0.9, 0.1]])
    assert recall_at_k(sim, torch.tensor([0]), torch.tensor([0, 1, 2]), ks=(1, 2)) == {1: 0.0, 2: 1.0}


def test_a_query_without_a_match_or_with_nan_scores_never_hits_whatever_k():
    """A query whose caption no item has, or whose scores hold a NaN (a diverged model's), misses at every k, also
    at a k above the number of items: they were given the rank "number of items", 3 here, a hit at k = 5 (a
    diverged model scored R@10 = 1 on a validation set of fewer than 10 clips)."""
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.1, 0.2, 0.3]])
    assert recall_at_k(sim, torch.tensor([7, 2]), torch.tensor([0, 1, 2]), ks=(1, 5)) == {1: 0.5, 5: 0.5}
    nan = F.normalize(torch.full((4, 8), float("nan")), dim=-1)
    m = retrieval_metrics(nan, nan, torch.arange(4))
    assert m["t2v_R@10"] == m["v2t_R@10"] == m["t2v_R@5"] == 0.0


def _recalls_whole(sim: torch.Tensor, groups: torch.Tensor) -> dict[int, float]:
    """The ranking of the whole [N, N] similarity, query by query: the rank of a query's best-scored item of its
    caption is the number of other captions' items scoring at least as high; a query with a non-finite score misses."""
    hits: dict[int, list[bool]] = {1: [], 5: [], 10: []}
    for q in range(sim.shape[0]):
        own = groups == groups[q]
        rank = int((sim[q][~own] >= sim[q][own].max()).sum())
        for k in hits:
            hits[k].append(rank < k and bool(sim[q].isfinite().all()))
    return {k: float(torch.tensor(h).float().mean()) for k, h in hits.items()}  # the metric's float32 mean


@pytest.mark.parametrize("exact", [True, False])
def test_retrieval_in_blocks_equals_the_whole_similarity(exact):
    """retrieval_metrics scores the similarity a block of rows at a time (the whole [N, N] matrix and its temporaries
    took 0.86 GB at 8k clips): the recalls are those of the whole matrix, bit for bit, in one block or several, with
    ties (small-integer embeddings: every score exact, many equal), duplicate captions and a NaN row and column."""
    from videoprism.train import retrieval

    g = torch.Generator().manual_seed(4)
    n = 300
    if exact:
        v, t = (torch.randint(-2, 3, (n, 6), generator=g).float() for _ in range(2))
    else:
        v = F.normalize(torch.randn(n, 32, generator=g), dim=-1)
        t = F.normalize(v + 1.5 * torch.randn(n, 32, generator=g), dim=-1)
    v[7, 0] = float("nan")
    groups = torch.randint(0, 200, (n,), generator=g)   # ~70 captions shared by 2-4 clips
    sim = t @ v.T
    want = {f"{d}_R@{k}": r for d, s in (("t2v", sim), ("v2t", sim.T)) for k, r in _recalls_whole(s, groups).items()}
    for block in (retrieval.BLOCK_ELEMENTS, 1, 100 * n):          # one block; 5 and 3 balanced ones (60, 100 rows)
        got = retrieval_metrics(v, t, groups, block_elements=block)
        assert {k: got[k] for k in want} == want, block
    assert len(retrieval.row_blocks(n, n, 1)) == 5 and len(retrieval.row_blocks(n, n, 100 * n)) == 3
    assert min(b - a for a, b in retrieval.row_blocks(n, n, 1)) >= retrieval.MIN_BLOCK_ROWS // 2
    assert recall_at_k(sim, groups, groups) == _recalls_whole(sim, groups)


_RETRIEVAL_PEAK = PEAK_MEMORY + """
import sys
import torch
from videoprism.train.retrieval import retrieval_metrics
torch.set_num_threads(1)
n = int(sys.argv[1])
v = torch.nn.functional.normalize(torch.randn(n, 16), dim=-1)
retrieval_metrics(v[:300], v[:300], torch.arange(300))  # the first call's lazy set-up (code pages) is no block's
rss = reset_peak()
retrieval_metrics(v, v.roll(1, 0), torch.arange(n) // 2, block_elements=1 << 19)
print(peak_since(rss))
"""


def test_retrieval_memory_stays_below_the_whole_similarity():
    """The peak memory of the ranking, measured (a fresh process's high-water mark): below one [N, N] float32
    matrix. Whole, the similarity, its masked copy and the comparisons took 3.4 such matrices (0.86 GB at 8k clips,
    16 GB past 30k); in blocks of 2^19 pairs, 10-25 MB here whatever N."""
    n = 4096
    r = subprocess.run([sys.executable, "-c", _RETRIEVAL_PEAK, str(n)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 4 * n * n, f"peak {int(r.stdout) / 2**20:.0f} MB"


def test_caption_groups_ignore_padding_content():
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 9, 9], [5, 7, 0, 0]])
    pads = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]).float()
    g = caption_groups(ids, pads)
    assert g[0] == g[1] and g[0] != g[2]


def test_trim_text_is_exact():
    import videoprism

    torch.manual_seed(0)
    clip = videoprism.from_official("videoprism_lvt_v1_base", model_dim=32, num_heads=2, mlp_dim=64,
                                    num_spatial_layers=1, num_temporal_layers=1, num_auxiliary_layers=0,
                                    num_unimodal_layers=2, vocabulary_size=50, attention_backend="reference")
    ids = torch.randint(1, 50, (3, 64))
    pads = torch.ones(3, 64)
    pads[0, :5] = pads[1, :11] = pads[2, :2] = 0
    tids, tpads = trim_text(ids, pads)
    assert tids.shape == (3, 16)
    with torch.no_grad():
        full = clip.encode_text(ids, pads)
        short = clip.encode_text(tids, tpads)
    assert torch.allclose(full, short, atol=1e-5)


def test_flop_formula_matches_flop_counter():
    """The analytic formula equals torch's FLOP counter on the model's unmasked forward (the
    counter sees every matmul the reference model runs)."""
    import videoprism
    from torch.utils.flop_counter import FlopCounterMode

    from videoprism.flops import text_tower_flops, video_tower_flops

    cfg = dict(model_dim=32, num_heads=2, mlp_dim=48, num_spatial_layers=2, num_temporal_layers=1,
               num_auxiliary_layers=1, num_unimodal_layers=1, vocabulary_size=30, patch_size=4,
               pos_emb_shape=(3, 4, 4), enable_causal_atten=False, attention_backend="reference")
    clip = videoprism.from_official("videoprism_lvt_v1_base", **cfg)
    B, T, R, L = 2, 3, 16, 7
    video = torch.rand(B, T, R, R, 3)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        clip(video, None, None)
    # torch's counter has no formula for the CPU SDPA kernel the pooler dispatches to:
    # add the pooler's scores and weighted sum (1 query, 4D hidden) by hand.
    pooler_core = B * 4 * (T * 16) * (4 * 32)
    assert fc.get_total_flops() + pooler_core == pytest.approx(video_tower_flops(clip.config, B, T, 16), rel=1e-6)
    ids, pads = torch.randint(0, 30, (B, L)), torch.zeros(B, L)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        clip(None, ids, pads)
    assert fc.get_total_flops() == pytest.approx(text_tower_flops(clip.config, B, L), rel=1e-6)


@pytest.mark.parametrize("lit,aux", [(False, 1), (True, 1), (False, 0), (True, 0)])
def test_stage1_step_flops_match_flop_counter(lit, aux):
    """The trainer's stage-1 FLOPs (3x the trained parts, 1x the frozen LiT encoder) against
    torch's counter on a real forward + backward of the training loss, exactly once the two known
    differences are accounted for by hand: the counter has no formula for the MAP pooler's CPU SDPA
    core, and the reference attention backend computes all S^2 pairs of the causal text tower where
    the formula counts the pairs it must score (the entries of the causal mask). Without an auxiliary
    layer (the tiny preset's) LiT's pooler reads the frozen encoder's output, whose gradient no one needs."""
    from torch.utils.flop_counter import FlopCounterMode

    from videoprism.train.data import RandomClips
    from videoprism.train.modeling import build_clip
    from videoprism.train.parallel import Dist
    from videoprism.train.stage1 import Stage1Task

    cfg = build_config("tiny", [f"stage1.lit={str(lit).lower()}", f"model.num_auxiliary_layers={aux}"], 1)
    d = Dist(0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    task = Stage1Task(cfg, d, build_clip(cfg.model, vocab=100, device=d.device), None)
    data = RandomClips(micro_batch=4, rank=0, world=1, frames=8, resolution=cfg.model.resolution, vocab=100,
                       seed=0, text_length=16)
    inputs = task.prepare(data.next_batch(0), 0, 0)
    with FlopCounterMode(display=False) as fc:
        loss, _ = task.loss(task.module, inputs)
        loss.backward()
    clip_cfg = task.module.clip.config
    assert clip_cfg.enable_causal_atten and cfg.model.attention_backend == "reference"
    B, T, K = inputs["pos"].shape
    D, S = clip_cfg.model_dim, inputs["text_ids"].shape[1] + 1           # text tokens + the class token
    scored = int(torch.ones(S, S).tril().sum())                          # causal: S(S+1)/2 pairs
    pooler_core = B * 4 * (T * K) * (4 * D)                              # scores + weighted sum, 1 query
    causal_extra = clip_cfg.num_unimodal_layers * B * 4 * (S * S - scored) * D
    # Both trained (3x) in either mode: LiT freezes the encoder only.
    expect = fc.get_total_flops() + 3 * pooler_core - 3 * causal_extra
    assert task.flops(inputs) == pytest.approx(expect, rel=1e-9)


def test_stage1_step_flops_with_grad_cache_count_the_whole_batch_loss():
    """With gradient accumulation and GradCache the contrastive loss scores all the step's clips at once ([A*b]
    rows against A*b*world columns), not each micro-batch's b x b*world: the step's FLOPs (summed over its
    micro-batches, as the trainer does) equal torch's counter on cached_backward, less the no-grad embedding pass
    GradCache adds (a recomputation, not counted) and with the two hand terms of the test above."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    from videoprism.train.data import RandomClips
    from videoprism.train.modeling import build_clip
    from videoprism.train.parallel import Dist
    from videoprism.train.stage1 import Stage1Task

    cfg = build_config("tiny", ["model.num_auxiliary_layers=1", "train.global_batch=8", "train.micro_batch=4"], 1)
    d = Dist(0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    task = Stage1Task(cfg, d, build_clip(cfg.model, vocab=100, device=d.device), None)
    assert task.grad_cache
    data = RandomClips(micro_batch=4, rank=0, world=1, frames=8, resolution=cfg.model.resolution, vocab=100,
                       seed=0, text_length=16)
    inputs = [task.prepare(data.next_batch(0), 0, a) for a in range(2)]              # accumulation 2
    with FlopCounterMode(display=False) as fc:
        task.cached_backward(task.module, inputs, amp=contextlib.nullcontext,
                             sync=lambda last: contextlib.nullcontext())
    with FlopCounterMode(display=False) as embed, torch.no_grad():
        for x in inputs:
            task._forward(task.module, x)
    clip_cfg = task.module.clip.config
    D = clip_cfg.model_dim
    hand = 0
    for x in inputs:
        B, T, K = x["pos"].shape
        S = x["text_ids"].shape[1] + 1
        hand += 3 * B * 4 * (T * K) * (4 * D)                                          # the pooler's SDPA core
        hand -= 3 * clip_cfg.num_unimodal_layers * B * 4 * (S * S - S * (S + 1) // 2) * D  # causal: scored pairs
    expect = fc.get_total_flops() - embed.get_total_flops() + hand
    assert sum(task.flops(x) for x in inputs) == pytest.approx(expect, rel=1e-9)


def test_derived_seeds_are_distinct_across_draws_steps_and_micro_steps():
    from videoprism.train.seeds import MASK, SLOTS, derive_seed

    seeds = {derive_seed(draw, seed, step, micro) for draw in (MASK, SLOTS) for seed in (0, 1)
             for step in range(50) for micro in range(100)}
    assert len(seeds) == 2 * 2 * 50 * 100  # the old (seed*P + step)*64 + micro repeated at micro 64
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(MASK, 3, 7, 1) == derive_seed(MASK, 3, 7, 1)


def test_temporal_pairs_counts_shared_locations():
    from videoprism.flops import temporal_pairs

    pos = torch.tensor([[[0, 1], [0, 2]]])  # location 0 in both frames, 1 and 2 in one each (of 4)
    assert float(temporal_pairs(pos, 2, 2, 4)) == 4 + 1 + 1
    assert temporal_pairs(None, 2, 2, 4) == 8


_SAVE_THEN_CRASH = textwrap.dedent("""
    import os, signal, sys, torch
    from videoprism.train import checkpoint as ckpt
    root, where = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward(); opt.step()
    saver = ckpt.Saver(root, keep=2, async_save=where == "async_write")
    kw = dict(trainer_state={"step": 1, "nonfinite": 0}, rank_state={"rng": ckpt.rng_state(), "data": {"p": 1}})
    saver.save(1, model, opt, **kw)
    torch.save(model.state_dict(), os.path.join(root, "expected.pt"))
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "rename":
        os.rename = die                  # every file written, the rename never happens
    else:
        import torch.distributed.checkpoint.filesystem as fs
        fs._write_item = die             # killed while DCP writes the tensors (in the writer thread if async)
    with torch.no_grad():
        model.weight.add_(1.0)
    saver.save(2, model, opt, **kw, wait=False)
    saver.finish()
""")


@pytest.mark.parametrize("where", ["dcp_write", "rename", "async_write"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, where):
    root = str(tmp_path / "ck")
    # No timeout let a save that hung instead of dying stall the suite (40-60 s each under load here).
    r = subprocess.run([sys.executable, "-c", _SAVE_THEN_CRASH, root, where], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert os.path.isdir(os.path.join(root, "step_00000002.tmp"))  # the save was cut short
    assert ckpt.latest(root) == os.path.join(root, "step_00000001")
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward(); opt.step()  # optimizer state to be overwritten
    state, ranks = ckpt.load(ckpt.latest(root), model, opt, trainer_keys=["step", "nonfinite"])
    rank_state = ckpt.read_rank_state(ckpt.latest(root), 0)
    assert state["step"] == 1 and ranks == 1 and rank_state["data"] == {"p": 1}
    expected = torch.load(os.path.join(root, "expected.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k])
    # A later save of the same step clears the leftover and keeps the latest k.
    saver = ckpt.Saver(root, keep=2)
    for step in (2, 3):
        saver.save(step, model, opt, trainer_state=state, rank_state=rank_state)
    assert [s for s, _ in ckpt.step_dirs(root)] == [2, 3]
    assert not os.path.exists(os.path.join(root, "step_00000002.tmp"))


def test_resume_finds_the_latest_checkpoint_from_the_out_dir_or_its_checkpoints_folder(tmp_path):
    """find (--resume PATH): a step_* folder is itself; the run's out_dir or its checkpoints folder gives the highest
    complete step (by number: 10 after 9; a .tmp and an .abandoned are not complete)."""
    ck = tmp_path / "checkpoints"
    for name in ("step_00000009", "step_00000010", "step_00000002", "step_00000011.tmp", "step_00000012.abandoned"):
        (ck / name).mkdir(parents=True)
    want = str(ck / "step_00000010")
    assert ckpt.find(str(tmp_path), required=True) == want
    assert ckpt.find(str(ck), required=True) == want
    assert ckpt.find(str(ck / "step_00000002"), required=True) == str(ck / "step_00000002")
    assert ckpt.find(str(tmp_path / "elsewhere"), required=False) is None


def test_retire_sets_aside_the_checkpoints_at_or_after_the_step_but_the_kept_one(tmp_path):
    """A run restarting at step 2 replaces the checkpoints of steps >= 2 (its own step 2 will be written again),
    except the one it resumed from."""
    for s in (1, 2, 3, 4):
        (tmp_path / f"step_{s:08d}").mkdir()
    ckpt.retire(str(tmp_path), 2, keep=str(tmp_path / "step_00000003"))
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000002.abandoned", "step_00000003",
                                            "step_00000004.abandoned"]


def test_a_checkpoint_of_a_replaced_run_that_cannot_be_retired_is_one_line(tmp_path, monkeypatch):
    """A run that starts at step s renames the checkpoints at or after s out of the way; a rename that failed
    stopped it with "[Errno 13] Permission denied: ..." and no fix (and, on rank 0 between two barriers, left
    the other ranks in the second)."""
    import errno

    (tmp_path / "step_00000003").mkdir()

    def denied(*a):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", denied)
    with pytest.raises(OSError) as err:
        ckpt.retire(str(tmp_path), 0)
    msg = str(err.value)
    assert msg.startswith(f"cannot rename checkpoint {tmp_path / 'step_00000003'} of the run this one replaces")
    assert "(Permission denied)" in msg and "move it away yourself" in msg and "\n" not in msg


_DELETE_THEN_CRASH = textwrap.dedent("""
    import os, shutil, signal, sys, torch
    from videoprism.train import checkpoint as ckpt
    root = sys.argv[1]
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward(); opt.step()
    saver = ckpt.Saver(root, keep=1)
    kw = dict(trainer_state={"step": 1}, rank_state={})
    saver.save(1, model, opt, **kw)

    def cut(path, **k):  # killed after the first file of a checkpoint older than keep is deleted
        if not os.path.isdir(path):  # the save's clearing of a leftover .tmp
            return
        os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
        os.kill(os.getpid(), signal.SIGKILL)

    shutil.rmtree = cut
    saver.save(2, model, opt, **kw)
""")


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_partial_one(tmp_path):
    """keep=k deletes the checkpoints older than the latest k file by file (seconds for a large one, in the
    window of a preemption's hard kill): a kill then left a partial folder under its step_* name, listed as a
    complete checkpoint (and the one `--resume` takes once the newer one is damaged or retired)."""
    root = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _DELETE_THEN_CRASH, root], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    for _, path in ckpt.step_dirs(root):  # every folder listed as complete loads
        ckpt.load(path, model, opt, trainer_keys=["step"])
        ckpt.read_rank_state(path, 0)
    assert [s for s, _ in ckpt.step_dirs(root)] == [2]
    ckpt.Saver(root, keep=1).save(3, model, opt, trainer_state={"step": 3}, rank_state={})
    assert sorted(os.listdir(root)) == ["step_00000003"]  # the next save clears what the kill left


def test_checkpoints_past_step_10_to_the_8_are_listed_kept_and_resumed(tmp_path):
    """step_{step:08d} has 9 digits from step 10^8 on: those folders were not checkpoints to step_dirs (a resume took
    step 99999999, and keep-latest-k deleted none of them)."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    saver = ckpt.Saver(str(tmp_path), keep=2)
    steps = (99_999_999, 10**8, 10**8 + 1, 2**31 + 1)
    for step in steps:
        saver.save(step, model, opt, trainer_state={"step": step}, rank_state={})
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path))] == list(steps[-2:])
    assert sorted(os.listdir(tmp_path)) == ["step_100000001", "step_2147483649"]
    latest = ckpt.find(str(tmp_path), required=True)
    assert ckpt.step_of(latest) == 2**31 + 1
    assert ckpt.load(latest, model, opt, trainer_keys=["step"])[0]["step"] == 2**31 + 1


@pytest.mark.parametrize("async_save", [False, True])
def test_single_process_checkpoint_warns_nothing(tmp_path, async_save):
    """DCP's "assuming the intent is to save in a single process" warning is not shown in the
    progress bar of every one-process run (it warns even with no_dist=True)."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    saver = ckpt.Saver(str(tmp_path), keep=1, async_save=async_save)
    with warnings.catch_warnings(record=True) as seen:  # the writer thread's warnings too: finish() is inside
        path = saver.save(1, model, opt, trainer_state={"step": 1}, rank_state={}, wait=False)
        saver.finish()
        assert ckpt.load(path, model, opt, trainer_keys=["step"])[0]["step"] == 1
    assert not [str(w.message) for w in seen if "single process" in str(w.message)]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_checkpoint_write_is_one_error_naming_folder_cause_and_fix(tmp_path, monkeypatch, async_save):
    import torch.distributed.checkpoint.filesystem as fs

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    saver = ckpt.Saver(str(tmp_path), keep=2, async_save=async_save)
    first = saver.save(1, model, opt, trainer_state={"step": 1}, rank_state={})

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs, "_write_item", full)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        saver.save(2, model, opt, trainer_state={"step": 2}, rank_state={}, wait=False)
        saver.finish()
    msg = str(err.value)
    assert isinstance(err.value, OSError) and "\n" not in msg  # a command prints it as one line, exit status 2
    assert str(tmp_path / "step_00000002.tmp") in msg and "No space left on device" in msg
    assert f"latest complete checkpoint ({first}) is intact" in msg and "train.out_dir" in msg
    assert ckpt.latest(str(tmp_path)) == first
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]  # the unfinished folder's space given back


@pytest.mark.parametrize("where", ["shards", "rank_file"])
@pytest.mark.parametrize("async_save", [False, True])
def test_ctrl_c_in_a_checkpoint_write_leaves_no_unfinished_folder(tmp_path, monkeypatch, where, async_save):
    """Ctrl-C while a save wrote (DCP's shards, wrapped in its CheckpointException, or the rank file, raised bare)
    left step_N.tmp, a checkpoint's size, behind the interrupted run: it is removed as a failed write's is."""
    import torch.distributed.checkpoint.filesystem as fs

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    saver = ckpt.Saver(str(tmp_path), keep=2, async_save=async_save)
    first = saver.save(1, model, opt, trainer_state={"step": 1}, rank_state={})

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(*((fs, "_write_item") if where == "shards" else (ckpt, "_save_synced")), ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        saver.save(2, model, opt, trainer_state={"step": 2}, rank_state={}, wait=False)
        saver.finish()
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"] and ckpt.latest(str(tmp_path)) == first


def test_a_background_write_dropped_after_a_failure_leaves_no_unfinished_folder(tmp_path):
    """A run that fails (or is interrupted) while an asynchronous save is in flight waits for it in drop(): its
    step_N.tmp stayed until a later run of the same folder started. In one process nothing else writes in it."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    saver = ckpt.Saver(str(tmp_path), keep=2, async_save=True)
    saver.save(1, model, opt, trainer_state={"step": 1}, rank_state={}, wait=False)
    assert os.listdir(tmp_path) == ["step_00000001.tmp"]
    saver.drop()
    assert os.listdir(tmp_path) == [] and saver.pending is None


def test_a_rank_alone_in_a_failed_write_leaves_the_folder_the_others_write(tmp_path, monkeypatch):
    """Under torchrun a rank's own error (its rank file on a full disk) comes while the other ranks still write
    their shards into the same .tmp folder: that rank must not remove it under them (clear_unfinished does,
    when the run next starts). DCP's error comes on every rank once all have written: the folder goes."""
    from torch.distributed.checkpoint.api import CheckpointException

    tmp = tmp_path / "step_00000001.tmp"
    monkeypatch.setattr(ckpt, "_distributed", lambda: True)
    monkeypatch.setattr(ckpt, "_rank", lambda: 1)
    for error, kept in ((OSError(28, "No space left on device"), True),
                        (CheckpointException("save", {1: (OSError(28, "No space left on device"), None)}), False)):
        tmp.mkdir(exist_ok=True)
        with pytest.raises(ckpt.CheckpointWriteError), ckpt._writing(str(tmp), str(tmp_path)):
            raise error
        assert tmp.is_dir() == kept, error


def test_a_failed_first_checkpoint_write_does_not_say_to_resume(tmp_path, monkeypatch):
    """The first save of a run failing (a full disk, a read-only folder) said "then --resume", which stops with
    "no complete checkpoint there": with none yet, the fix is to run the same command again."""
    import torch.distributed.checkpoint.filesystem as fs

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(fs, "_write_item", read_only)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        ckpt.Saver(str(tmp_path), keep=2).save(1, model, opt, trainer_state={"step": 1}, rank_state={})
    msg = str(err.value)
    assert "(none yet) is intact" in msg and msg.endswith("then run the same command again") and "--resume" not in msg


def _fail_on_publish(monkeypatch, where: str) -> None:
    """An I/O error where rank 0 puts a written checkpoint in place: its rename, or the sync of the folder."""
    import errno
    import stat

    rename, fsync = os.rename, os.fsync

    def eio(*a):
        raise OSError(errno.EIO, "Input/output error")

    if where == "rename":
        monkeypatch.setattr(os, "rename", lambda a, b: eio() if ckpt.step_of(str(b)) >= 0 else rename(a, b))
    else:
        monkeypatch.setattr(os, "fsync", lambda fd: eio() if stat.S_ISDIR(os.fstat(fd).st_mode) else fsync(fd))


@pytest.mark.parametrize("where", ["rename", "folder_sync"])
@pytest.mark.parametrize("async_save", [False, True])
def test_a_checkpoint_that_cannot_be_put_in_place_is_the_same_one_line_error(tmp_path, monkeypatch, where,
                                                                              async_save):
    """The rename into place and the folder's sync were outside the error handling of the write: a failing disk
    there ended the run with a bare "[Errno 5] Input/output error", no folder, no fix."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    saver = ckpt.Saver(str(tmp_path), keep=1, async_save=async_save)
    first = saver.save(1, model, opt, trainer_state={"step": 1}, rank_state={})
    _fail_on_publish(monkeypatch, where)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        saver.save(2, model, opt, trainer_state={"step": 2}, rank_state={}, wait=False)
        saver.finish()
    monkeypatch.undo()
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "step_00000002.tmp") in msg and "Input/output error" in msg
    assert "train.out_dir" in msg and "--resume" in msg
    # The previous checkpoint stays: not renamed over, and not deleted (keep=1) before the new one is on disk.
    assert ckpt.load(first, model, opt, trainer_keys=["step"])[0]["step"] == 1
    assert ckpt.latest(str(tmp_path)) == (first if where == "rename" else str(tmp_path / "step_00000002"))


@contextlib.contextmanager
def _gloo_rank(rank, port, errors):
    """Rank `rank` of two gloo ranks for the body of the block; its error, if any, goes to `errors[rank]` (with
    its type), and the process group is destroyed either way."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        yield
    except Exception as e:  # noqa: BLE001
        errors[rank] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


def _publish_on_two_ranks(rank, port, root, errors):
    with _gloo_rank(rank, port, errors):
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters())
        saver = ckpt.Saver(root, keep=1)
        saver.save(1, model, opt, trainer_state={"step": 1}, rank_state={})
        if rank == 0:
            _fail_on_publish(pytest.MonkeyPatch(), "rename")
        saver.save(2, model, opt, trainer_state={"step": 2}, rank_state={})


def _save_on_two_ranks(rank, port, root, errors):
    """Checkpoints of steps 1 and 2, written by two gloo ranks."""
    with _gloo_rank(rank, port, errors):
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters())
        saver = ckpt.Saver(root, keep=2)
        for step in (1, 2):
            saver.save(step, model, opt, trainer_state={"step": step}, rank_state={"data": {"rank": rank}})



def test_a_checkpoint_whose_last_rank_file_is_lost_is_damaged_not_one_of_fewer_ranks(tmp_path):
    """The number of ranks that wrote a checkpoint was the count of its rank<r>.pt files: a 2-rank checkpoint whose
    rank1.pt was lost loaded as a 1-rank one and resumed, resharded, without rank 1's data position and RNG states
    ("written by 1 ranks"; a lost rank0.pt, or one in the middle, was caught). It is a DamagedCheckpointError naming
    the lost file and the checkpoint before it; a checkpoint whose rank files do not record the number (written
    before they did) counts them, as then."""
    root = str(tmp_path)
    alive, errors = _on_two_ranks(_save_on_two_ranks, root)
    assert alive == [False, False] and not errors, dict(errors)
    step1, step2 = (os.path.join(root, f"step_0000000{s}") for s in (1, 2))
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    assert ckpt.load(step2, model, opt, trainer_keys=["step"]) == ({"step": 2}, 2)
    os.remove(os.path.join(step2, "rank1.pt"))
    with pytest.raises(ckpt.DamagedCheckpointError) as err:  # what --auto-resume goes back past
        ckpt.load(step2, model, opt, trainer_keys=["step"])
    assert str(err.value) == (f"checkpoint {step2!r} is incomplete: rank1.pt lost (written by 2 ranks): resume from "
                              f"the checkpoint before it, --resume {step1}")
    legacy = os.path.join(step1, "rank0.pt")
    torch.save({k: v for k, v in torch.load(legacy).items() if k != "world"}, legacy)
    assert ckpt.load(step1, model, opt, trainer_keys=["step"]) == ({"step": 1}, 2)


def _resume_failing_on_rank_1(rank, port, root, if_any, error, errors):
    """Trainer.resume(root) on two gloo ranks whose load of the checkpoint fails on rank 1 alone with `error` (as
    reading its own rank file does)."""
    from videoprism.train.parallel import Dist
    from videoprism.train.trainer import Trainer

    def load(target):
        if rank == 1:
            raise error
        trainer.step, trainer.resumed_from = ckpt.step_of(target), target
        return 2

    with _gloo_rank(rank, port, errors):
        trainer = Trainer.__new__(Trainer)  # the resume's logic, without a model
        trainer.dist, trainer._load = Dist(rank, 2, torch.device("cpu")), load
        trainer.resume(root, if_any=if_any)


@pytest.mark.parametrize("if_any, error", [
    (False, ckpt.DamagedCheckpointError("checkpoint step_00000004 does not load (rank1.pt: cut)", "rank1.pt: cut")),
    (True, ValueError("checkpoint step_00000004 holds the data position of another kind of data source"))])
def test_a_checkpoint_that_one_rank_cannot_load_stops_every_rank_with_its_error(tmp_path, if_any, error):
    """A rank reads its own rank file alone: where that failed (damaged, under --resume; an error --auto-resume does
    not go back past), that rank stopped on its error while rank 0 went on ("resumed from ...", into training, or
    into --auto-resume's gather) and failed at its next collective on rank 1's closed connection. Every rank now
    stops with rank 1's error."""
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    alive, errors = _on_two_ranks(_resume_failing_on_rank_1, str(tmp_path), if_any, error)
    assert alive == [False, False], "a rank waits in a collective"
    assert errors.get(0) == errors.get(1) == f"{type(error).__name__}: {error}", dict(errors)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002", "step_00000004"]


def _on_two_ranks(target, *args, start: str = "fork") -> tuple[list[bool], dict]:
    """Run `target(rank, port, *args, errors)` in two forked gloo ranks; (which were still alive after 60 s, and
    were killed: a rank left waiting in a collective), {rank: error text}). `start="spawn"` for ranks that compute
    (a forked child of a process whose OpenMP pool ran can hang in its first parallel op)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context(start)
    # The manager's server process ends here, not when the garbage collector finds the proxy (a later test).
    with ctx.Manager() as manager:
        errors = manager.dict()
        procs = [ctx.Process(target=target, args=(r, port, *args, errors)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        alive = [p.is_alive() for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        return alive, dict(errors)


def _global_batch(n=8, d=16):
    g = torch.Generator().manual_seed(5)
    v = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return v, F.normalize(v + 0.7 * torch.randn(n, d, generator=g), dim=-1)


def _contrastive_on_two_ranks(rank, port, root, errors):
    with _gloo_rank(rank, port, errors):
        v, t = _global_batch()
        b = v.shape[0] // 2
        v, t = v[rank * b:(rank + 1) * b].clone().requires_grad_(), t[rank * b:(rank + 1) * b].clone().requires_grad_()
        loss = contrastive_loss(v, t, torch.tensor(math.log(20.0)))
        loss.backward()
        torch.save({"loss": loss.detach(), "v": v.grad, "t": t.grad}, os.path.join(root, f"rank{rank}.pt"))


_ALL_GATHER_NOTICES = """
import json, warnings
from unittest import mock
import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

def notices(call):
    with warnings.catch_warnings(record=True) as caught:  # the process's filters, as they are
        try:
            call()
        except Exception:  # no process group: torch gives its notice first
            pass
    return sum(issubclass(w.category, FutureWarning) for w in caught)

before = notices(lambda: all_gather(torch.ones(1)))
from videoprism.train.losses import gather_with_grad
user = notices(lambda: all_gather(torch.ones(1)))
with mock.patch.object(dist, "is_initialized", lambda: True), mock.patch.object(dist, "get_world_size", lambda: 2):
    ours = notices(lambda: gather_with_grad(torch.ones(1)))
print(json.dumps({"before": before, "user": user, "ours": ours}))
"""


def test_importing_the_losses_keeps_torchs_all_gather_notice_for_other_callers():
    """train/losses.py silences torch 2.14's deprecation of the autograd all_gather for its own call (every rank
    printed it once a run). Its filter, set at import, silenced it for every caller in the process: a user's own
    all_gather lost its notice once the module was imported. A fresh process: the filters of no other test."""
    r = subprocess.run([sys.executable, "-c", _ALL_GATHER_NOTICES], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    counts = json.loads(r.stdout.splitlines()[-1])
    if counts["before"] == 0:
        pytest.skip(f"torch {torch.__version__} does not deprecate torch.distributed.nn.functional.all_gather")
    assert counts == {"before": 1, "user": 1, "ours": 0}, counts


def test_contrastive_loss_on_two_ranks_is_the_global_batchs():
    """Each of 2 ranks holds half the batch: the mean of the ranks' losses is the naive InfoNCE of the whole batch
    (its rows score against every rank's columns, its labels are the global indices), and each rank's gradient on
    its half is the gradient of the ranks' summed losses (the gather's backward adds every rank's share), i.e.
    2 x that of the global loss. The oracle: the naive formula on one process, by autograd."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        alive, errors = _on_two_ranks(_contrastive_on_two_ranks, root, start="spawn")
        assert alive == [False, False] and not errors, dict(errors)
        got = [torch.load(os.path.join(root, f"rank{r}.pt")) for r in range(2)]
    v, t = (x.clone().requires_grad_() for x in _global_batch())
    logits = 20.0 * v @ t.T
    n = v.shape[0]
    naive = sum(-torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i] for i in range(n)) / (2 * n)
    naive.backward()
    assert float((got[0]["loss"] + got[1]["loss"]) / 2) == pytest.approx(float(naive.detach()), abs=1e-5)
    b = n // 2
    for r in range(2):
        torch.testing.assert_close(got[r]["v"], 2 * v.grad[r * b:(r + 1) * b], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[r]["t"], 2 * t.grad[r * b:(r + 1) * b], atol=1e-5, rtol=1e-4)


def test_rank_0_failing_to_publish_a_checkpoint_fails_every_rank(tmp_path):
    """Rank 0 renames the written folder into place between two barriers: its error left the other ranks in the
    second one, to fail there when rank 0's process group closed ("Connection closed by peer", a traceback) or
    wait until the collective timed out, instead of stopping with rank 0's one-line message."""
    alive, errors = _on_two_ranks(_publish_on_two_ranks, str(tmp_path))
    assert alive == [False, False], "a rank waits in the barrier"
    for r in range(2):
        assert errors[r].startswith("CheckpointWriteError: writing checkpoint") and "Input/output error" in errors[r]
    assert ckpt.latest(str(tmp_path)) == str(tmp_path / "step_00000001")


def _peer_dies_on_two_ranks(rank, port, errors):
    import io
    import os
    import sys
    import time

    import torch.distributed as dist

    from videoprism.cli import run_command

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist.all_reduce(torch.ones(1))
    if rank == 1:
        os._exit(3)  # a crash: no error of its own reaches rank 0

    def step():  # rank 0's next collective, a moment later
        time.sleep(0.5)
        dist.all_reduce(torch.ones(1))

    sys.stderr = io.StringIO()
    errors[rank] = (run_command(step), sys.stderr.getvalue())


def test_a_rank_whose_peer_died_says_so_in_one_line():
    """When a rank's process dies, every other rank's next collective fails: each printed the collective's
    traceback (N-1 of them around the one error that says why). One line, status 1."""
    alive, errors = _on_two_ranks(_peer_dies_on_two_ranks)
    assert alive == [False, False]
    rc, err = errors[0]
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: another rank of this run stopped (")
    assert "Connection closed by peer" in err or "Connection reset by peer" in err
    assert err.rstrip().endswith("its own error, or torchrun's summary, says why")


def _stalled_peer_on_two_ranks(rank, port, errors):
    import os
    import time

    import torch.distributed as dist

    from videoprism.train.parallel import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed("cpu", timeout_s=2.0)  # parallel.timeout_s
    if rank == 1:  # stuck, but alive: no connection closes to end rank 0's wait (at most 8 s, until its error)
        deadline = time.monotonic() + 8
        while 0 not in errors and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    t0 = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as e:
        errors[rank] = (time.perf_counter() - t0, str(e).splitlines()[0])


def test_parallel_timeout_s_bounds_the_wait_for_a_stalled_rank():
    """A rank that hangs held the others in their collective for torch's default (30 min on gloo, 10 on NCCL),
    which no setting changed: parallel.timeout_s does."""
    alive, errors = _on_two_ranks(_stalled_peer_on_two_ranks)
    assert alive == [False, False]
    waited, message = errors[0]
    assert 1.5 <= waited < 6 and "Timed out" in message, (waited, message)


@pytest.mark.parametrize("damage", ["truncated_shard", "garbage_rank_file", "other_model"])
def test_a_checkpoint_that_does_not_load_is_one_error_naming_it_and_the_fix(tmp_path, damage):
    import glob

    def model_opt(width=3):
        model = torch.nn.Sequential(torch.nn.Linear(4, width))
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        return model, opt

    path = ckpt.Saver(str(tmp_path), keep=1).save(1, *model_opt(), trainer_state={"step": 1}, rank_state={})
    width = 3
    if damage == "truncated_shard":
        open(glob.glob(os.path.join(path, "*.distcp"))[0], "r+b").truncate(10)
    elif damage == "garbage_rank_file":
        open(os.path.join(path, "rank0.pt"), "wb").write(b"not a torch file")
    else:
        width = 5  # a run with another model config
    with pytest.raises(ckpt.CheckpointReadError) as err:
        if damage == "garbage_rank_file":
            ckpt.read_rank_state(path, 0)
        else:
            ckpt.load(path, *model_opt(width), trainer_keys=["step"])
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg and len(msg) < 1000
    assert msg.startswith(f"checkpoint {path} does not load") and "no complete checkpoint before it" in msg
    if damage == "other_model":
        # Without the writing run's config.json, the fix is to give its model fields; with it, the fields this
        # run changed are the cause (an override, another tokenizer), whatever --config was or was not given.
        assert "Size mismatch" in msg and "pass --config with its preset and model fields" in msg
        with pytest.raises(ckpt.CheckpointReadError) as err:
            ckpt.load(path, *model_opt(width), trainer_keys=["step"], differences=["model.model_dim: 3 -> 5"])
        assert "differs from the one that wrote it in model.model_dim: 3 -> 5: drop those changes" in str(err.value)


def test_alternating_datasets_follow_weights_and_seed():
    from videoprism.train.data import ManifestData

    class Stream:
        def __init__(self, name):
            self.name, self.n = name, 0

        def __iter__(self):
            while True:
                self.n += 1
                yield self.name

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    data = ManifestData([Stream("video"), Stream("image")], [3.0, 1.0], seed=4)
    picks = [data.next_batch(step) for step in range(400)]
    assert 0.68 < picks.count("video") / 400 < 0.82
    again = ManifestData([Stream("video"), Stream("image")], [3.0, 1.0], seed=4)
    assert [again.next_batch(step) for step in range(400)] == picks  # same on every rank / after resume
    other = ManifestData([Stream("video"), Stream("image")], [3.0, 1.0], seed=5)
    assert [other.next_batch(step) for step in range(400)] != picks


@pytest.mark.parametrize("records", [[], [{"step": 5, "t2v_R@1": 0.5}], [{"step": 1, "loss": 2.0, "clips_per_s": 3.0}]])
def test_curves_plot_whatever_the_log_holds(tmp_path, records):
    """A resume of a finished run logs no step: the plot has a single (empty) panel then."""
    import json

    from videoprism.train.metrics import plot_curves

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    png = plot_curves(str(log), str(tmp_path / "curves.png"))
    assert os.path.getsize(png) > 1000


def test_curves_cut_by_a_full_disk_leave_the_previous_plot(tmp_path, full_disk):
    """fig.savefig wrote curves.png in place: a full disk (or a kill) mid-write left a cut PNG under the name, the
    previous plot lost. Now the previous one stays, with no temporary file beside it."""
    import json

    from videoprism.train.metrics import plot_curves

    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0, "clips_per_s": 3.0}) + "\n")
    png = plot_curves(str(log), str(tmp_path / "curves.png"))
    before = open(png, "rb").read()
    log.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "clips_per_s": 3.0}) + "\n" for s in (1, 2)))
    full_disk("curves.png")
    with pytest.raises(OSError, match="No space left"):
        plot_curves(str(log), png)
    assert open(png, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["curves.png", "metrics.jsonl"]


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=0", "optim.lr=0.0 is out of range: it must be > 0"),
    ("optim.beta2=1", "optim.beta2=1.0 is out of range: it must be in [0, 1)"),
    ("checkpoint.keep=-1", "checkpoint.keep=-1 is out of range: it must be >= 0"),
    ("model.num_auxiliary_layers=-2", "model.num_auxiliary_layers=-2 is out of range: it must be >= -1"),
    ("data.decode_timeout=-1", "data.decode_timeout=-1.0 is out of range: it must be >= 0"),
    ("train.micro_batch=64", "train.micro_batch=64 is larger than train.global_batch=32"),
])
def test_out_of_range_values_are_refused_with_the_field_and_the_range(override, needle):
    with pytest.raises(ValueError) as e:
        build_config("tiny", [override], 1)
    assert needle in str(e.value)


def test_every_preset_passes_its_own_checks():
    """Presets set fields directly (no range check when set): the combined check and a re-read of each value
    through the overrides must accept them."""
    import dataclasses

    from videoprism.train.config import PRESETS

    for stage in (1, 2):
        for preset in PRESETS:
            cfg = build_config(preset, [], stage)
            overrides = [f"{sec.name}.{fl.name}={getattr(getattr(cfg, sec.name), fl.name)}"
                         for sec in dataclasses.fields(cfg) if sec.name != "preset"
                         for fl in dataclasses.fields(getattr(cfg, sec.name))]
            build_config(preset, overrides, stage)


def test_in_memory_sources_move_to_another_number_of_ranks():
    """RandomClips and CachedClips count global samples: 2 ranks x 2 micro-steps of 3, then 3 ranks of 2
    resumed from both states (global micro-batch 6 either way), serve the rows one rank of 6 serves."""
    from videoprism.train.data import CachedClips, RandomClips

    clips = {"video": torch.arange(40)[:, None].expand(40, 2).contiguous()}

    def sources(kind, micro, rank, world):
        if kind == "random":
            return RandomClips(micro_batch=micro, rank=rank, world=world, frames=1, resolution=2, vocab=9, seed=1,
                               text_length=4)
        return CachedClips(clips, micro_batch=micro, rank=rank, world=world, seed=1)

    for kind in ("random", "cached"):
        one = sources(kind, 6, 0, 1)
        expected = [one.next_batch(s)["video"] for s in range(8)]
        old = [sources(kind, 3, r, 2) for r in range(2)]
        for s in range(2):
            got = torch.cat([src.next_batch(s)["video"] for src in old])
            assert torch.equal(got, expected[s]), kind
        new = [sources(kind, 2, r, 3) for r in range(3)]
        for src in new:
            src.load_resharded([src_old.state_dict() for src_old in old])
        for s in range(2, 8):  # 40 clips: steps 0-5 in epoch 0, its last 4 dropped, step 6 the next epoch's
            assert torch.equal(torch.cat([src.next_batch(s)["video"] for src in new]), expected[s]), (kind, s)
        with pytest.raises(ValueError, match="not a whole number of this run.s global micro-batches of 5"):
            sources(kind, 5, 0, 1).load_resharded([src_old.state_dict() for src_old in old])


def test_in_memory_sources_resume_with_another_micro_batch_on_the_same_ranks():
    """A resume that changes train.micro_batch (accumulation for memory) on the same ranks goes on with the
    global stream: RandomClips counted its calls, so micro-batches of 2 after 2 calls of 4 replayed samples 4-7."""
    from videoprism.train.data import CachedClips, RandomClips

    clips = {"video": torch.arange(40)[:, None].expand(40, 2).contiguous()}

    def sources(kind, micro):
        if kind == "random":
            return RandomClips(micro_batch=micro, rank=0, world=1, frames=1, resolution=2, vocab=9, seed=1,
                               text_length=4)
        return CachedClips(clips, micro_batch=micro, rank=0, world=1, seed=1)

    for kind in ("random", "cached"):
        one = sources(kind, 4)
        expected = [one.next_batch(s)["video"] for s in range(4)]
        old = sources(kind, 4)
        for s in range(2):
            old.next_batch(s)
        new = sources(kind, 2)
        new.load_state_dict(old.state_dict())
        for s in range(2, 4):
            assert torch.equal(torch.cat([new.next_batch(s)["video"] for _ in range(2)]), expected[s]), (kind, s)


def test_data_flip_prob_mirrors_cached_clips(tmp_path, monkeypatch):
    """data.flip_prob with data.cache=true (the tiny preset's) reached no code: the cached clips, decoded once
    without augmentation, were served as they were at any flip_prob. Now a seeded share of the rows is mirrored
    (along W), drawn per row and epoch: the same global batches on any number of ranks, other rows in another
    epoch, the cache itself unchanged."""
    from videoprism.train import data as data_module
    from videoprism.train.data import CachedClips, build_train_data
    from videoprism.train.parallel import Dist

    n = 40
    clips = {"video": torch.arange(n * 2 * 3 * 3, dtype=torch.int64).reshape(n, 1, 2, 3, 3),
             "index": torch.arange(n)}
    cached = clips["video"].clone()
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("")
    monkeypatch.setattr(data_module, "decode_all", lambda *a, **k: (clips, []))

    def served(flip_prob, steps=8):
        cfg = build_config("tiny", ["data.cache=true", f"data.train={manifest}", f"data.flip_prob={flip_prob}"], 1)
        source = build_train_data(cfg, Dist(0, 1, torch.device("cpu")), None, micro_batch=6, vocab=9)
        return [source.next_batch(s) for s in range(steps)]

    plain = served(0.0)
    for mirrored, batch in zip(served(1.0), plain):
        assert torch.equal(mirrored["video"], batch["video"].flip(3))
    half = served(0.5)
    flipped = [[not torch.equal(a, b) for a, b in zip(h["video"], p["video"])] for h, p in zip(half, plain)]
    rows = [i for h in half for i in h["index"].tolist()]
    assert 10 < sum(map(sum, flipped)) < 38 and len(rows) == 48  # steps 0-5 in epoch 0, 6-7 in epoch 1
    for h, p, f in zip(half, plain, flipped):
        for a, b, was in zip(h["video"], p["video"], f):
            assert torch.equal(a, b.flip(2) if was else b)
    # Rows met in both epochs: some are mirrored in one and not the other.
    twice = {}
    for h, f in zip(half, flipped):
        for i, was in zip(h["index"].tolist(), f):
            twice.setdefault(i, []).append(was)
    assert any(len(set(v)) == 2 for v in twice.values())
    ranks = [CachedClips(clips, micro_batch=3, rank=r, world=2, seed=0, flip_prob=0.5) for r in range(2)]
    for s, h in enumerate(half):
        assert torch.equal(torch.cat([src.next_batch(s)["video"] for src in ranks]), h["video"])
    assert torch.equal(clips["video"], cached)


def test_decoded_sets_keep_only_the_clips_every_rank_decoded():
    """A file that failed on one rank alone is dropped on every rank (the rows stay aligned across ranks) and
    reported where it was decoded; when every rank decoded the same clips nothing changes."""
    from videoprism.train.data import _clips_every_rank_has

    ids = torch.tensor([3, 5, 8, 9])
    clips = {"video": torch.arange(4).view(4, 1) * 10, "text_ids": torch.arange(4).view(4, 1)}
    names = {3: "a.webm", 5: "b.webm", 8: "c.webm", 9: "d.webm"}
    same, rejects = _clips_every_rank_has(clips, ids, names, [("x.webm", "bad")], [[3, 5, 8, 9]] * 2, "m.jsonl")
    assert same is clips and rejects == [("x.webm", "bad")]
    kept, rejects = _clips_every_rank_has(clips, ids, names, [], [[3, 5, 8, 9], [3, 8, 9], [3, 5, 8]], "m.jsonl")
    assert kept["video"].flatten().tolist() == [0, 20] and kept["text_ids"].flatten().tolist() == [0, 2]
    assert rejects == [("b.webm", "skipped on another rank (decoded here)"),
                       ("d.webm", "skipped on another rank (decoded here)")]
    with pytest.raises(ValueError, match="'m.jsonl': no clip decoded on every rank"):
        _clips_every_rank_has(clips, ids, names, [], [[3, 5], [8, 9]], "m.jsonl")


def test_resume_refuses_when_rank_0_lags_behind_another_rank(tmp_path, monkeypatch):
    """Rank 0 picks the checkpoint, but rank 0 may be the node whose view lags: with --auto-resume it saw none
    and the whole run restarted at step 0 (then deleted its own fresh checkpoints as older than the real ones).
    Another rank that sees a newer checkpoint than rank 0's pick stops the run."""
    from videoprism.train import trainer as tr

    root = tmp_path / "run"
    for step in (2, 4):
        (root / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    seen_by_rank0 = {"run": None}
    monkeypatch.setattr(tr, "on_main_rank", lambda fn: seen_by_rank0["run"])  # rank 0 sees nothing yet
    # This process plays another rank; the max over ranks is its own flags.
    monkeypatch.setattr(tr, "all_reduce_max", lambda values, d: list(values))
    fake = SimpleNamespace(dist=None)
    with pytest.raises(FileNotFoundError, match="rank 0 sees no checkpoint and some ranks see a newer one"):
        tr.Trainer.resume(fake, str(root), if_any=True)
    seen_by_rank0["run"] = str(root / "checkpoints" / "step_00000002")  # rank 0 lists an older step
    with pytest.raises(FileNotFoundError, match="rank 0 resumes from .*step_00000002 and some ranks see a newer"):
        tr.Trainer.resume(fake, str(root), if_any=True)


class _FakeLoader:
    """Rank 0 decodes clips 0 and 1; rank 1 fails as a loader with no readable clip would."""

    def __init__(self, fail):
        self.fail = fail

    def __iter__(self):
        if self.fail:
            raise ValueError("rank 1 broke")
        yield {"video": torch.zeros(2, 1), "index": torch.tensor([0, 1]), "path": ["a", "b"], "caption": ["a", None]}

    def __len__(self):  # batches
        return 1

    def drain_rejects(self):
        return []


def _decode_all_on_two_ranks(rank, port, errors):
    import torch.distributed as dist

    import videoprism.data.loader as loader
    from videoprism.train import data as td

    loader.build_loader = lambda *a, **k: _FakeLoader(rank == 1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        td._decode_all("m.jsonl", frames=2, resolution=16, dc=SimpleNamespace(
            workers=0, max_bad_share=0.0, decode_timeout=0))
    except Exception as e:  # noqa: BLE001
        errors[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_a_rank_that_fails_to_decode_a_set_does_not_leave_the_others_in_the_gather():
    """_decode_all's all_gather must be reached by a rank whose loader raised (no readable clip, too many bad
    samples): otherwise the other ranks wait in it until the collective times out."""
    alive, errors = _on_two_ranks(_decode_all_on_two_ranks)
    assert alive == [False, False], "a rank waits in the gather"
    assert errors[1] == "rank 1 broke" and "rank(s) [1] could not decode it" in errors[0]


def _streamed_val_on_two_ranks(rank, port, manifest, errors):
    import torch.distributed as dist

    import videoprism.data.loader as loader
    from videoprism.train.data import build_val_batches
    from videoprism.train.parallel import Dist

    torch.set_num_threads(1)  # a forked child must not enter OpenMP (_val_shares_on_two_ranks)
    loader.build_loader = lambda *a, **k: _FakeLoader(rank == 1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = build_config("tiny", [f"data.val={manifest}", "data.val_cache=false", "data.workers=0"], 2)
        list(build_val_batches(cfg, None, batch_size=2, dist_=Dist(rank, 2, torch.device("cpu")))[0])
    except Exception as e:  # noqa: BLE001
        errors[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_a_rank_that_fails_to_decode_a_streamed_split_ends_the_evaluation_on_every_rank(tmp_path):
    """data.val_cache=false decodes at each evaluation, one host flag a batch keeping the ranks in step: a rank whose
    decode raised must say so in that flag, or the others wait in the next one until the collective times out."""
    manifest = tmp_path / "val.jsonl"
    manifest.write_text('{"path": "a.webm", "caption": "a"}\n{"path": "b.webm", "caption": "b"}\n')
    alive, errors = _on_two_ranks(_streamed_val_on_two_ranks, str(manifest))
    assert alive == [False, False], "a rank waits in a collective"
    assert errors[1] == "rank 1 broke" and "rank(s) [1] could not decode it" in errors[0]


def _val_config(manifest, *overrides, stage=1):
    return build_config("tiny", [f"data.val={manifest}", "data.workers=0", "model.num_frames=4", "model.resolution=32",
                                 "model.patch_size=8", "data.max_bad_share=0.5", "stage2.decoder_dim=16",
                                 "stage2.decoder_layers=1", "stage2.decoder_heads=2", *overrides], stage)


def test_a_streamed_validation_split_scores_as_the_held_one(tmp_path):
    """data.val_cache=false decodes the validation share at each evaluation instead of holding it: the same batches
    (order, eval transform, captions, a clip without a caption and a broken file skipped, batches cut across the
    loader's), so stage 1's retrieval metrics and stage 2's losses equal the held split's exactly, at every
    evaluation; its skips are reported once, after the first."""
    import videoprism
    from videoprism.data.synth import generate
    from videoprism.data.text import Tokenizer
    from videoprism.train import data as td
    from videoprism.train.distill import Teacher
    from videoprism.train.parallel import Dist
    from videoprism.train.stage1 import Stage1Task
    from videoprism.train.stage2 import Stage2Task

    data = tmp_path / "synth"
    generate(str(data), 8, seed=4, size=32, num_frames=4, workers=1)
    recs = [json.loads(x) for x in open(data / "train.jsonl")]
    (data / "clips" / "broken.webm").write_bytes(b"not a video")
    del recs[2]["caption"]
    recs.insert(4, {"path": "clips/broken.webm", "caption": "broken"})
    manifest = data / "val.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok, one = Tokenizer(str(data / "spm.model")), Dist(0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    clip = videoprism.from_official("videoprism_lvt_v1_base", model_dim=16, num_heads=2, mlp_dim=32,
                                    num_spatial_layers=1, num_temporal_layers=1, num_auxiliary_layers=1,
                                    num_unimodal_layers=1, vocabulary_size=tok.vocab_size, patch_size=8,
                                    pos_emb_shape=(4, 4, 4), attention_backend="reference").eval()
    td._DECODED.clear()
    try:
        for stage, text in ((1, tok), (2, None)):
            held, skipped = td.build_val_batches(_val_config(manifest, stage=stage), text, batch_size=3, dist_=one)
            streamed, none = td.build_val_batches(_val_config(manifest, "data.val_cache=false", stage=stage), text,
                                                  batch_size=3, dist_=one)
            assert isinstance(held, list) and none == []
            assert len(skipped) == (2 if text else 1)  # the broken file; stage 1: the clip without a caption
            for n in range(2):  # every evaluation decodes again; its skips are reported after the first
                got = list(streamed)
                assert [{k: v.shape for k, v in b.items()} for b in got] == [
                    {k: v.shape for k, v in b.items()} for b in held]
                assert all(torch.equal(b[k], h[k]) for b, h in zip(got, held) for k in h)
                assert streamed.drain_rejects() == (skipped if n == 0 else [])
            with torch.no_grad():
                if stage == 1:
                    scores = [Stage1Task.evaluate(SimpleNamespace(val=v, dist=one), clip) for v in (held, streamed)]
                else:
                    task = Stage2Task(_val_config(manifest, stage=2), one, Teacher(clip), None)
                    scores = []
                    for v in (held, streamed):
                        task.val = v
                        scores.append(task.evaluate(task.module))
            assert scores[0] == scores[1] and len(scores[0]) > 1, scores
            assert streamed.drain_rejects() == []
            good = len(recs) - len(skipped)
            assert [b["index"].shape[0] for b in held] == [3] * (good // 3) + [good % 3] * (good % 3 > 0)
    finally:
        td._DECODED.clear()


def test_held_decoded_sets_past_the_memory_stop_before_decoding(tmp_path, monkeypatch, capsys):
    """data.cache holds the decoded training manifest (every rank all of it) and data.val_cache each rank's share of
    data.val for the whole run: a set past the host's memory (10k base clips: 40 GB on a node) ran it out of memory
    at its start, or swapped, with no word of why (data.cache's unchecked before). The run stops before anything is
    decoded, naming the sizes and the fixes in one line, when the node's held sets together would take more than
    3/4 of the memory available; at 3/4 it goes on."""
    from videoprism.train import data as td
    from videoprism.train import stage1
    from videoprism.train.trainer import preflight

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("{}\n" * 5)
    val.write_text("{}\n" * 9 + "{}")  # 10 lines, the last without its newline
    per_clip = 8 * 64 * 64 * 3  # tiny: 8 frames of 64x64
    base = ["--config", "tiny", "data.source=manifest", f"data.train={train}"]
    held_val, held_train = "set data.val_cache=false (decoded at each evaluation, nothing held) or use fewer " \
        "validation clips", "set data.cache=false (each step's clips decoded as read, nothing held) or use fewer " \
        "training clips"
    monkeypatch.setattr(td, "decode_all", lambda *a, **k: pytest.fail("decoded"))
    # held sets: (their overrides, the clips a node holds on 1 rank, on 2 of 4 ranks: 3 of data.val's clips a rank
    # at most, all 5 of data.train's)
    for sets, extra, one, two in (("val", [f"data.val={val}", "data.cache=false"], 10, 2 * 3),
                                  ("train", ["data.cache=true"], 5, 2 * 5),
                                  ("train+val", [f"data.val={val}", "data.cache=true"], 15, 2 * 3 + 2 * 5)):
        for world, local, clips in (("1", None, one), ("4", "2", two)):
            monkeypatch.setenv("WORLD_SIZE", world)
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
            if local:
                monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
            fits = -(-4 * clips * per_clip // 3)  # the least memory of which they take 3/4 at most
            monkeypatch.setattr(td, "available_memory", lambda: fits - 1)
            capsys.readouterr()
            assert stage1.main([*base, *extra, f"train.out_dir={tmp_path}/run"]) == 2, (sets, world)
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert ("its 10 clips take 0.0 GiB of this node's memory" in err) == ("val" in sets)
            assert ("its 5 clips take 0.0 GiB of this node's memory" in err) == ("train" in sets)
            assert (held_val in err) == ("val" in sets) and (held_train in err) == ("train" in sets), err
            assert ("together more than 3/4 of the" in err) == (sets == "train+val"), err
            assert ("2 of 4 ranks, " in err) == (world == "4" and "val" in sets)
            assert ("2 ranks each all of it, " in err) == (world == "4" and "train" in sets)
            cfg = parse_args([*base, *extra, f"train.out_dir={tmp_path}/ok"], 1)[0]
            monkeypatch.setattr(td, "available_memory", lambda: fits)
            preflight(cfg, 1, None)  # they fit
            monkeypatch.setattr(td, "available_memory", lambda: None)
            preflight(cfg, 1, None)  # no count of the memory (not Linux): no check
    monkeypatch.setattr(td, "available_memory", lambda: 0)
    unheld = [f"data.val={val}", "data.cache=false", "data.val_cache=false", f"train.out_dir={tmp_path}/ok"]
    preflight(parse_args([*base, *unheld], 1)[0], 1, None)  # streamed: nothing held
    assert "data.val_cache=True\n      Decode each rank's share of data.val once" in help_text(1)
    assert "false: decode the share again at each evaluation" in help_text(1)
    assert "more than 3/4 of the memory available" in help_text(1)


def test_a_streamed_split_without_a_readable_clip_names_it_in_one_line(tmp_path):
    """data.val_cache=false: a split none of whose clips decodes stops at its first evaluation naming the manifest
    as the project's messages show a path (its repr: a newline in the name made a second line of the error)."""
    from videoprism.train.config import DataConfig
    from videoprism.train.data import StreamedVal
    from videoprism.train.parallel import Dist

    (tmp_path / "broken.webm").write_bytes(b"not a video")
    val = tmp_path / "va\nl.jsonl"
    val.write_text('{"path": "broken.webm", "caption": "broken"}\n')
    cfg = SimpleNamespace(data=DataConfig(val=str(val), val_cache=False, workers=0, max_bad_share=1.0),
                          model=SimpleNamespace(num_frames=2, resolution=16))
    streamed = StreamedVal(cfg, None, batch_size=2, dist_=Dist(0, 1, torch.device("cpu")))
    with pytest.raises(ValueError) as e:
        list(streamed)
    assert str(e.value) == f"{str(val)!r}: no readable clip"


_HELD_DECODE_PEAK = PEAK_MEMORY + """
import sys
import torch
from videoprism.train import data as td
from videoprism.train.config import DataConfig
torch.set_num_threads(1)
one, many = sys.argv[1:]
td._decode_all(one, frames=16, resolution=160, dc=DataConfig(workers=0))  # PyAV's import and first decode
rss = reset_peak()
clips = td._decode_all(many, frames=16, resolution=160, dc=DataConfig(workers=0))[0]
print(peak_since(rss), clips["video"].numel(), clips["video"].shape[0])
"""


def test_the_held_decode_peaks_near_the_set_it_holds(tmp_path):
    """data.cache and data.val_cache hold the decoded set for the whole run; its decode concatenated the loader's
    batches while it still held them, so its peak was twice the set (65 base clips: +525 MB for 259 MB held). It
    writes each batch into tensors allocated once for the share: measured (a fresh process's high-water mark), the
    peak stays below 1.5x the 192 clips of 1.2 MB it holds (2x and more before; 1.13x here alone, and a process's
    fixed allocations, ~30-70 MB with the suite's environment, weigh less on more clips)."""
    from videoprism.data.synth import generate

    data = tmp_path / "synth"
    generate(str(data), 4, seed=5, size=32, num_frames=16, workers=1)
    lines = (data / "train.jsonl").read_text().splitlines(keepends=True)
    (data / "one.jsonl").write_text(lines[0])  # beside the clips their paths are relative to
    (data / "many.jsonl").write_text("".join(lines[i % len(lines)] for i in range(192)))
    r = subprocess.run([sys.executable, "-c", _HELD_DECODE_PEAK, str(data / "one.jsonl"), str(data / "many.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak, held, clips = map(int, r.stdout.split())
    assert clips == 192 and held == 192 * 16 * 160 * 160 * 3
    assert peak < 1.5 * held, f"peak {peak / 2**20:.0f} MB for {held / 2**20:.0f} MB held"


def _val_shares_on_two_ranks(rank, port, manifest, cache, results):
    import torch.distributed as dist

    from videoprism.data.text import Tokenizer
    from videoprism.train.data import build_val_batches
    from videoprism.train.parallel import Dist

    # A forked child must not enter OpenMP (the decode's resize): the pool the parent's tests started is not
    # there, and the child waits for it forever.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = build_config("tiny", [f"data.val={manifest}", "data.workers=0", "model.num_frames=4",
                                    "model.resolution=32", f"data.val_cache={cache}"], 1)
        tok = Tokenizer(os.path.join(os.path.dirname(manifest), "spm.model"))
        batches, _ = build_val_batches(cfg, tok, batch_size=2, dist_=Dist(rank, 2, torch.device("cpu")))
        results[rank] = [(b["index"].tolist(), tuple(b["video"].shape), int(b["video"].sum() > 0),
                          int((b["text_paddings"] < 0.5).sum())) for b in batches]
    except Exception as e:  # noqa: BLE001
        results[rank] = repr(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cache", ["true", "false"], ids=["held", "streamed"])
def test_each_rank_decodes_its_share_of_the_validation_split_in_as_many_batches(tmp_path, cache):
    """Of a 5-clip validation split on 2 ranks, rank r decodes clips r, r+2, ... only (not the whole split);
    both hold two batches of 2, rank 1's second an idle one (black clips, one-token captions, index -1), so both
    run the evaluation's forwards in step (collective under FSDP). Streamed (data.val_cache=false), each evaluation
    decodes them so."""
    from videoprism.data.synth import generate

    data = tmp_path / "synth"
    generate(str(data), 8, seed=1, size=32, num_frames=4, workers=1)
    manifest = data / "val5.jsonl"
    manifest.write_text("".join((data / "train.jsonl").read_text().splitlines(keepends=True)[:5]))
    alive, results = _on_two_ranks(_val_shares_on_two_ranks, str(manifest), cache)
    assert alive == [False, False], "a rank waits in a collective"
    clip = (2, 4, 32, 32, 3)
    assert results[0] == [([0, 2], clip, 1, results[0][0][3]), ([4], (1, 4, 32, 32, 3), 1, results[0][1][3])]
    assert results[0][0][3] > 0 and results[0][1][3] > 0  # real captions
    assert results[1] == [([1, 3], clip, 1, results[1][0][3]), ([-1, -1], clip, 0, 2)]  # a token per caption


def test_fsdp_bf16_policy_leaves_the_temperature_in_fp32(one_rank_group):
    """Under FSDP2's bf16 compute policy (what a GPU run gets; forced here on a one-rank CPU
    mesh) the encoder's parameters arrive in bf16 and the temperature in fp32, exactly its
    master value; in one group with the rest it was rounded to bf16 (the negative control)."""
    from torch.distributed.device_mesh import init_device_mesh

    from videoprism.masking import tube_mask
    from videoprism.train.modeling import build_clip
    from videoprism.train.parallel import shard
    from videoprism.train.stage1 import ContrastiveModel

    cfg = build_config("tiny", ["model.num_frames=2", "model.resolution=16"], 1)
    seen = {}
    for own_fp32 in (True, False):
        torch.manual_seed(0)
        m = ContrastiveModel(build_clip(cfg.model, vocab=50, device=torch.device("cpu")), temperature_init=0.0123,
                             max_logit_scale=100, lit=False)
        master = m.logit_scale.detach().clone()
        m.fp32_own_params = own_fp32
        shard(m, init_device_mesh("cpu", (1,)), bf16=True)
        m.clip.vision_encoder.register_forward_pre_hook(
            lambda mod, args: seen.update(encoder=mod.spatial_pos_emb.dtype))
        pos = tube_mask(2, 2, (2, 2), 0.5, seed=0)[:, :1]
        video = torch.randint(0, 256, (2, 2, 16, 16, 3), dtype=torch.uint8)
        v, t, log_scale = m(video, torch.randint(0, 50, (2, 5)), torch.zeros(2, 5), pos=pos)
        assert seen["encoder"] == torch.bfloat16 and v.dtype == torch.bfloat16
        if own_fp32:
            assert log_scale.dtype == torch.float32 and torch.equal(log_scale.detach(), master)
            contrastive_loss(v, t, log_scale).backward()
            assert m.logit_scale.grad is not None and m.logit_scale.grad.dtype == torch.float32
        else:
            assert log_scale.dtype == torch.bfloat16 and not torch.equal(log_scale.detach().float(), master)


def test_fsdp_compiled_blocks_take_every_step_evaluation_and_batch_size(one_rank_group):
    """The trainer compiles each block's forward, under FSDP2 too: one code object (TransformerBlock.forward) to Dynamo for every
    block, with a graph per kind of block (spatial, temporal, text) and per pass (the training step, GradCache's
    no-grad embedding, the evaluation on full clips, its last smaller batch): 12 here, past Dynamo's 8 per code
    object, and fullgraph failed a run with a data.val at its evaluation. On a one-rank CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    from videoprism.masking import tube_mask
    from videoprism.train.modeling import build_clip
    from videoprism.train.parallel import compile_blocks, shard
    from videoprism.train.stage1 import ContrastiveModel

    cfg = build_config("tiny", ["model.num_frames=2", "model.resolution=16", "model.patch_size=8",
                                "model.model_dim=16", "model.mlp_dim=32", "model.num_unimodal_layers=1"], 1)

    def forward(m, b, masked):
        pos = tube_mask(b, 2, (2, 2), 0.5, seed=0)[:, :1] if masked else None
        video = torch.randint(0, 256, (b, 2, 16, 16, 3), dtype=torch.uint8)
        return m(video, torch.randint(1, 50, (b, 8)), torch.zeros(b, 8), pos=pos)

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default, whatever ran before
            m = ContrastiveModel(build_clip(cfg.model, vocab=50, device=torch.device("cpu")), temperature_init=0.07,
                                 max_logit_scale=100, lit=False)
            compile_blocks(m, "eager")
            shard(m, init_device_mesh("cpu", (1,)), bf16=False)
            contrastive_loss(*forward(m, 2, masked=True)).backward()
            with torch.no_grad():
                forward(m, 2, masked=True)
                forward(m, 2, masked=False)
                forward(m, 1, masked=False)
    finally:
        torch._dynamo.reset()


def test_seed_process_seeds_every_global_generator():
    """The RNG states a checkpoint saves (torch, Python, numpy) repeat for a seed."""
    import random

    import numpy as np

    from videoprism.train.seeds import seed_process

    def draws(seed):
        seed_process(seed)
        return torch.rand(2).tolist(), random.random(), np.random.rand()

    assert draws(5) == draws(5) and all(a != b for a, b in zip(draws(5), draws(6)))


def test_caption_less_lines_get_the_same_verdict_on_every_rank_and_are_held_once(tmp_path):
    """decode_all with a tokenizer checks the lines without a caption against the share of the whole manifest (as a
    reader that needs captions does), so every rank's share passes or fails alike: rank 0's share alone held 1
    caption-less clip of 2 (50% > 30%) and raised while rank 1 went on into the next collective. The clips with
    captions replace the memo's set without text (a filtered copy, not a second copy kept)."""
    from videoprism.data.errors import TooManyBadSamplesError
    from videoprism.data.synth import generate
    from videoprism.data.text import Tokenizer
    from videoprism.train import data as td
    from videoprism.train.config import DataConfig

    generate(str(tmp_path / "synth"), 5, seed=2, size=16, num_frames=2, workers=1)
    recs = [json.loads(x) for x in open(tmp_path / "synth" / "train.jsonl")][:4]
    del recs[0]["caption"]
    m = tmp_path / "synth" / "val4.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = Tokenizer(tmp_path / "synth" / "spm.model")
    td._DECODED.clear()
    try:
        dc = DataConfig(workers=0, max_bad_share=0.3)
        got = [td.decode_all(str(m), frames=2, resolution=16, tokenizer=tok, dc=dc, shard=(r, 2)) for r in (0, 1)]
        assert [g[0]["index"].tolist() for g in got] == [[2], [1, 3]]
        assert [g[0]["text_ids"].shape[0] for g in got] == [1, 2] and "no caption" in got[0][1][0][1]
        assert len(td._DECODED) == 3  # rank 0: its text set only; rank 1 (nothing dropped): both, sharing tensors
        td._DECODED.clear()
        for r in (0, 1):
            with pytest.raises(TooManyBadSamplesError, match="1 of 4 lines"):
                td.decode_all(str(m), frames=2, resolution=16, tokenizer=tok,
                              dc=DataConfig(workers=0, max_bad_share=0.2), shard=(r, 2))
        clips, rejects = td.decode_all(str(m), frames=2, resolution=16, tokenizer=None, dc=DataConfig(workers=0),
                                       shard=(0, 2))
        assert clips["index"].tolist() == [0, 2] and not rejects and "text_ids" not in clips
    finally:
        td._DECODED.clear()


def test_a_set_decoded_under_a_loose_bad_share_does_not_pass_a_stricter_one(tmp_path):
    """decode_all's memo is keyed by the bad-sample share: a set read with a broken file under a share of 50% must
    still fail a later caller that allows 10% (it returned the memoised set)."""
    from videoprism.data.errors import TooManyBadSamplesError
    from videoprism.data.synth import generate
    from videoprism.train import data as td
    from videoprism.train.config import DataConfig

    generate(str(tmp_path / "synth"), 5, seed=2, size=16, num_frames=2, workers=1)
    recs = [json.loads(x) for x in open(tmp_path / "synth" / "train.jsonl")][:4]
    recs[1]["path"] = "gone.webm"
    m = tmp_path / "synth" / "val4.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    td._DECODED.clear()
    try:
        clips, rejects = td.decode_all(str(m), frames=2, resolution=16, tokenizer=None,
                                       dc=DataConfig(workers=0, max_bad_share=0.5))
        assert clips["index"].tolist() == [0, 2, 3] and "gone.webm" in rejects[0][0]
        with pytest.raises(TooManyBadSamplesError):
            td.decode_all(str(m), frames=2, resolution=16, tokenizer=None, dc=DataConfig(workers=0, max_bad_share=0.1))
    finally:
        td._DECODED.clear()


def test_curves_plot_the_run_that_wrote_the_last_records():
    """A resume from step 5 of a 10-step run drops steps 6-10 (an abandoned future); a fresh start's record
    drops everything before it; a step logged twice (a resume from the latest) counts once, the later."""
    from videoprism.train.metrics import run_steps

    steps = lambda a, b, tag: [{"step": s, "loss": float(s), "tag": tag} for s in range(a, b + 1)]  # noqa: E731
    log = [{"config": {}}, *steps(1, 10, "a"), {"resumed_from": "x", "at_step": 5}, *steps(5, 7, "b")]
    got = run_steps(log)
    assert sorted(got) == list(range(1, 8)) and [got[s]["tag"] for s in range(1, 8)] == list("aaaabbb")
    assert sorted(run_steps([*log, {"config": {}}, *steps(1, 2, "c")])) == [1, 2]


def test_a_run_writes_a_folder_of_another_run_only_when_told(tmp_path):
    """run_folder.check_out_dir: another run's checkpoints and export are kept from a fresh start or a resume from
    elsewhere unless --overwrite; a run resumes only its own stage's; a stage-2 export never replaces its teacher;
    a folder with nothing to lose (a run that saved no checkpoint) is written."""
    from videoprism.train.config import save_config
    from videoprism.train.run_folder import check_out_dir

    def run(name, stage, step=None, export=False):
        folder = tmp_path / name
        save_config(build_config("tiny", [], stage), str(folder / "config.json"), stage=stage)
        if step is not None:
            os.makedirs(folder / "checkpoints" / f"step_{step:08d}")
        if export:
            (folder / "model.safetensors").write_bytes(b"weights")
        return str(folder)

    a, c, bare = run("a", 1, step=10, export=True), run("c", 1, step=3), run("bare", 1)
    for resume in (a, os.path.join(a, "checkpoints"), os.path.join(a, "checkpoints", "step_00000010")):
        check_out_dir(a, 1, resume=resume, overwrite=False)  # its own run goes on
    with pytest.raises(ValueError, match=r"holds a stage-1 run \(1 checkpoint\(s\) up to step 10, its export "
                                         r"model.safetensors\), which this run would replace; continue it with "
                                         r"--resume .*add --overwrite"):
        check_out_dir(a, 1, resume=None, overwrite=False)
    check_out_dir(a, 1, resume=None, overwrite=True)
    check_out_dir(bare, 1, resume=None, overwrite=False)
    with pytest.raises(ValueError, match=f"continue {a}'s run there, or add --overwrite"):
        check_out_dir(c, 1, resume=a, overwrite=False)  # another run's checkpoint into c, which holds its own
    check_out_dir(str(tmp_path / "new"), 1, resume=a, overwrite=False)
    with pytest.raises(ValueError, match=f"holds a stage-1 run, which stage 2 cannot resume; stage 2 starts from a "
                                         f"stage-1 run's export: stage2.teacher={a}/model.safetensors"):
        check_out_dir(a, 2, resume=a, overwrite=True)
    with pytest.raises(ValueError, match="holds a stage-2 run, which stage 1 cannot resume"):
        check_out_dir(str(tmp_path / "new"), 1, resume=run("s2", 2, step=4), overwrite=False)
    with pytest.raises(ValueError, match="holds a stage-1 run .*; set train.out_dir to a folder of this run's own, or "
                                         "add --overwrite"):  # no "continue it": stage 2 cannot
        check_out_dir(a, 2, resume=None, overwrite=False)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="the stage-2 export would overwrite its teacher"):
            check_out_dir(a, 2, resume=None, overwrite=overwrite, teacher=os.path.join(a, "model.safetensors"))
    # --auto-resume's first start (resume = out_dir, no checkpoint yet) in a folder holding only an export (a
    # converted model, a run whose checkpoints were moved away) would overwrite it at the end.
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "model.safetensors").write_bytes(b"weights")
    for folder in (str(converted), run("done", 1, export=True)):
        with pytest.raises(ValueError, match=r"\(its export model.safetensors\), which this run would replace; it has "
                                             "no checkpoint to continue; set train.out_dir to a folder"):
            check_out_dir(folder, 1, resume=folder, overwrite=False)
    check_out_dir(bare, 1, resume=bare, overwrite=False)  # nothing to lose: --auto-resume starts there


# A live run's lock on train.out_dir, taken as a run's main rank takes it; with "fork", a child forked after it (as
# a DataLoader forks its workers: they inherit the descriptors) that outlives it. Prints the child's pid (0: none).
_HOLDER = textwrap.dedent("""
    import os, sys, time
    import torch
    from videoprism.train.parallel import Dist
    from videoprism.train.run_folder import OutDirLock
    OutDirLock(sys.argv[1]).hold(Dist(0, 1, torch.device("cpu")))
    child = os.fork() if sys.argv[2] == "fork" else 0
    if sys.argv[2] == "fork" and child == 0:
        time.sleep(600)
        os._exit(0)
    print(child, flush=True)
    time.sleep(600)
""")


@contextlib.contextmanager
def held_by_a_live_run(out_dir, fork: bool = False):
    """`out_dir` held by another process, as by a live run: yields (that process, its forked child's pid or 0)."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out_dir), "fork" if fork else "-"], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(p.stdout.readline())
        yield p, child
    finally:
        p.kill()
        p.wait()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, 9)


def held_line(out_dir, holder: subprocess.Popen) -> str:
    """The line of a run stopped by `holder`'s lock on `out_dir` (the holder's command as its lock file says)."""
    import shlex
    import socket

    info = json.loads((out_dir / "run.lock").read_text())
    assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
    assert info["command"] == shlex.join([sys.executable, "-c", _HOLDER, str(out_dir), info["command"].split()[-1]])
    command = info["command"].replace("\n", "\\n")  # the holder's script, on the line's one line
    return (f"error: train.out_dir={out_dir} is written by another run that is still running (pid {holder.pid} on "
            f"host {socket.gethostname()} since {info['since']}, its command: {command}; per "
            f"{out_dir}/run.lock): wait for it to end or stop it, or set train.out_dir to another folder (--overwrite "
            "replaces a finished run's folder, never a live one's)")


def folder_state(folder) -> dict:
    """Every file under `folder`: its size and modification time."""
    return {os.path.relpath(os.path.join(d, n), folder): (os.stat(os.path.join(d, n)).st_size,
                                                          os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, _, names in os.walk(folder) for n in names}


TINY_RUN = ["--config", "tiny", "model.model_dim=16", "model.num_heads=2", "model.mlp_dim=32",
            "model.num_spatial_layers=1", "model.num_temporal_layers=1", "model.num_unimodal_layers=1",
            "model.patch_size=4", "model.num_frames=4", "model.resolution=16", "data.source=random",
            "train.global_batch=4", "checkpoint.export=false", "checkpoint.interval=1"]


def test_a_run_on_an_out_dir_that_a_live_run_holds_stops_at_once_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Two live runs on one train.out_dir (a requeued job whose first instance still runs, a job submitted twice) had
    nothing to stop them: the second ran to its end, both logged their steps into one metrics.jsonl (185 step
    records for 150 steps), saved over each other and retired each other's checkpoints. Now the second run stops
    before it builds anything, fresh, --resume, --auto-resume and --overwrite alike, naming the holder."""
    from videoprism.train import stage1

    out = tmp_path / "run"
    monkeypatch.setenv("VIDEOPRISM_TRACEBACK", "")
    assert stage1.main([*TINY_RUN, f"train.out_dir={out}", "train.steps=2"]) == 0  # a folder with a run's files
    capsys.readouterr()
    before = folder_state(out)
    monkeypatch.setattr(stage1, "build_clip", lambda *a, **k: pytest.fail("the model was built"))
    with held_by_a_live_run(out) as (holder, _):
        line = held_line(out, holder)
        before = {**before, "run.lock": folder_state(out)["run.lock"]}
        for mode in ([], ["--resume"], ["--auto-resume"], ["--overwrite"]):
            assert stage1.main([*TINY_RUN, f"train.out_dir={out}", "train.steps=4", *mode]) == 2, mode
            assert capsys.readouterr().err.strip() == line, mode
            assert folder_state(out) == before, mode


def test_a_run_goes_on_where_the_live_run_that_held_its_out_dir_was_killed(tmp_path, monkeypatch):
    """SIGKILL leaves no stale lock: the kernel drops it with the holder's last descriptor. A process forked by the
    holder (a DataLoader worker) inherits a descriptor of the lock file, and kept the lock as long as it lived after
    its run was killed; it closes its copy at the fork."""
    from videoprism.train import stage1

    out = tmp_path / "run"
    with held_by_a_live_run(out, fork=True) as (holder, child):
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # still alive
        monkeypatch.setenv("VIDEOPRISM_TRACEBACK", "")
        assert stage1.main([*TINY_RUN, f"train.out_dir={out}", "train.steps=1"]) == 0
        os.kill(child, 0)
    assert (out / "checkpoints" / "step_00000001").is_dir()


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP", "ENOSYS"])
def test_a_run_on_a_file_system_without_locks_goes_on_with_a_note(tmp_path, monkeypatch, capsys, code):
    """Where flock is not supported (NFS without its lock service, some FUSE file systems) the run goes on, and
    says that nothing stops a second run there."""
    import errno
    import fcntl

    from videoprism.train import run_folder, stage1

    def no_locks(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(run_folder, "fcntl", SimpleNamespace(**{k: getattr(fcntl, k) for k in dir(fcntl)
                                                                if k.startswith("LOCK_")}, flock=no_locks))
    out = tmp_path / "run"
    assert stage1.main([*TINY_RUN, f"train.out_dir={out}", "train.steps=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"note: train.out_dir={out}: its file system cannot lock run.lock "
                        f"({os.strerror(getattr(errno, code))}), so nothing stops another run writing this folder at "
                        "the same time; start one run per train.out_dir")
    assert (out / "checkpoints" / "step_00000001").is_dir()


def test_recorded_rejects_count_each_skip_of_the_run_once(tmp_path):
    """metrics.recorded_rejects: every rank's file; a sample skipped again at the same step (a resume from an earlier
    step replays it) or a validation clip skipped at every start counts once; a line cut by a crash is left out."""
    from videoprism.train.metrics import recorded_rejects

    def rec(step, path, reason="truncated"):
        return json.dumps({"step": step, "path": path, "reason": reason}) + "\n"

    (tmp_path / "rejects.rank0.jsonl").write_text(rec(0, "v.mp4 (data.val)") + rec(3, "a.mp4") + rec(7, "a.mp4")
                                                  + rec(5, "v.mp4 (data.val)") + rec(3, "a.mp4") + '{"step": 9, "pa')
    (tmp_path / "rejects.rank1.jsonl").write_text(rec(3, "b.mp4") + rec(3, "a.mp4", "moov atom not found")
                                                  + json.dumps({"step": 1, "path": 5, "reason": "x"}) + "\n")
    (tmp_path / "rejects.rank0.jsonl.abandoned").write_text(rec(1, "old.mp4"))
    got = recorded_rejects(str(tmp_path))
    assert sorted((r["step"], r["path"], r["reason"]) for r in got) == [
        (0, "v.mp4 (data.val)", "truncated"), (3, "a.mp4", "moov atom not found"), (3, "a.mp4", "truncated"),
        (3, "b.mp4", "truncated"), (7, "a.mp4", "truncated")]
    assert recorded_rejects(str(tmp_path / "none")) == []


def test_a_rejects_line_cut_by_a_kill_costs_only_itself(tmp_path):
    """A run killed (or out of disk) mid-append leaves rejects.rank<r>.jsonl's last line without its newline: the
    resumed run's first report was glued to it, and recorded_rejects lost both (the metrics log already ended such
    a line). Now only the cut record is lost."""
    from videoprism.train.metrics import recorded_rejects
    from videoprism.train.trainer import Trainer

    path = tmp_path / "rejects.rank0.jsonl"
    path.write_text('{"step": 2, "path": "a.webm", "reason": "x"}\n{"step": 3, "path": "b.we')
    fake = SimpleNamespace(
        data=SimpleNamespace(drain_rejects=lambda: [("c.webm", "empty file (0 bytes)")]), val_rejects=[],
        dist=SimpleNamespace(main=True, rank=0), name="stage1", step=5, resumed_from=None, resumed_step=0,
        cfg=SimpleNamespace(train=SimpleNamespace(out_dir=str(tmp_path))), rejects_unwritten=0, rejects_path=str(path))
    Trainer._report_rejects(fake, SimpleNamespace(message=lambda text: None))
    assert [r["path"] for r in recorded_rejects(str(tmp_path))] == ["a.webm", "c.webm"]


def test_rejects_of_one_sample_twice_in_a_step_count_twice(tmp_path):
    """An epoch that ends inside a step skips a bad file at its tail and the next epoch skips it again at its head,
    both reported at that step: two skips, not one (a 6000-step run with 11 bad files in 216 counted 2638 of its
    2641 skips: recorded_rejects merged each such pair as a resume's replay of one skip). A resume's replay of
    the same step still counts once."""
    from videoprism.train.metrics import recorded_rejects
    from videoprism.train.trainer import Trainer

    drained = []
    fake = SimpleNamespace(
        data=SimpleNamespace(drain_rejects=lambda: drained.pop(0) if drained else []), val_rejects=[],
        dist=SimpleNamespace(main=True, rank=0), name="stage1", step=7, resumed_from=None, resumed_step=0,
        cfg=SimpleNamespace(train=SimpleNamespace(out_dir=str(tmp_path))), rejects_unwritten=0,
        rejects_path=str(tmp_path / "rejects.rank0.jsonl"))
    log = SimpleNamespace(message=lambda text: None)
    drained.append([("bad.webm", "empty file (0 bytes)"), ("other.webm", "x"), ("bad.webm", "empty file (0 bytes)")])
    Trainer._report_rejects(fake, log)
    assert len(recorded_rejects(str(tmp_path))) == 3
    # A resume from an earlier checkpoint replays step 7: the same report again is not new skips.
    drained.append([("bad.webm", "empty file (0 bytes)"), ("other.webm", "x"), ("bad.webm", "empty file (0 bytes)")])
    Trainer._report_rejects(fake, log)
    assert len(recorded_rejects(str(tmp_path))) == 3


@pytest.mark.parametrize("stage", [1, 2])
def test_the_paper_presets_hold_designs_settings(stage):
    """DESIGN 5's paper settings are the defaults of the base/large/giant presets (a default changed by mistake
    trains another recipe without a word): Adafactor, batch 4096, lr 5e-4; stage 1 warmup 2e4, linear decay,
    wd 1e-4, 2e5 steps, CLIP's temperature (init 0.07, 1/t clamped at 100); stage 2 warmup 2.5e4, cosine to
    1e-5, wd 0.05, 3e5 steps, 4-layer decoders (Dd 512 for giant), shuffled slots, global distillation with
    the token loss's weight."""
    from videoprism.train.stage1 import ContrastiveModel

    for preset in ("base", "large", "giant"):
        cfg = build_config(preset, [], stage)
        o, t = cfg.optim, cfg.train
        assert (o.name, t.global_batch, o.lr) == ("adafactor", 4096, 5e-4)
        if stage == 1:
            assert (o.warmup_steps, o.decay, o.min_lr, o.weight_decay, t.steps) == (20000, "linear", 0.0, 1e-4, 200000)
            assert (cfg.stage1.temperature_init, cfg.stage1.max_logit_scale, cfg.stage1.lit) == (0.07, 100.0, False)
        else:
            s2 = cfg.stage2
            assert (o.warmup_steps, o.decay, o.min_lr, o.weight_decay, t.steps) == (25000, "cosine", 1e-5, 0.05, 300000)
            assert (s2.decoder_layers, s2.shuffle, s2.global_distill, s2.global_weight) == (4, True, True, 1.0)
            assert preset != "giant" or s2.decoder_dim == 512
    if stage == 1:  # the temperature starts at temperature_init: the first logits are cos / 0.07
        model = ContrastiveModel(torch.nn.Identity(), temperature_init=0.07, max_logit_scale=100.0, lit=False)
        assert float(model.logit_scale.detach().exp()) == pytest.approx(1 / 0.07)
