"""`videoprism embed`, `embed-text` and `convert`, run as a user runs them (a subprocess or `main`)."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import videoprism as vp
from tests.conftest import child_pids, golden_overrides, still_running
from videoprism.cli import main

from .test_data import SPM, write_clip

SMALL = ["--set", "model_dim=32", "--set", "num_heads=2", "--set", "mlp_dim=64", "--set", "num_spatial_layers=1",
         "--set", "num_temporal_layers=1"]


def run(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "videoprism", *args], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def test_embed_h264_and_vp9_twins_agree(tmp_path, media_dir):
    """The same clip in two codecs gives the same embedding (decoding parity end to end)."""
    out = tmp_path / "emb.npy"
    run("embed", os.path.join(media_dir, "water_bottle_drumming.mp4"),
        os.path.join(media_dir, "water_bottle_drumming_vp9.webm"), "--num-frames", "4", "--resolution", "72",
        "--pool", "mean", "--quiet", "--out", str(out), *SMALL)
    emb = torch.from_numpy(np.load(out))
    assert emb.shape == (2, 32)
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0)
    assert cos > 0.99, f"H.264 vs VP9 embedding cosine {cos:.4f}"


def test_embed_corrupt_file_one_line_error(tmp_path, media_dir):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    r = run("embed", str(bad), "--quiet", "--out", str(tmp_path / "e.npy"), *SMALL, check=False)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and "broken.mp4" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "e.npy").exists()


@pytest.mark.parametrize("ext", [".safetensors", ".npy"])
def test_embed_skip_bad_keeps_going(tmp_path, media_dir, ext):
    out = tmp_path / f"e{ext}"
    good = os.path.join(media_dir, "water_bottle_drumming_vp9.webm")
    r = run("embed", str(tmp_path / "missing.mp4"), good,
            "--skip-bad", "--num-frames", "2", "--resolution", "36", "--quiet", "--out", str(out), *SMALL)
    assert "skipped:" in r.stderr and "missing.mp4" in r.stderr
    if ext == ".npy":  # no names inside: the rows' videos are listed next to it
        assert np.load(out).shape[0] == 1
        assert (tmp_path / "e.videos.txt").read_text() == f"{good}\n"
        run("embed", good, "--num-frames", "2", "--resolution", "36", "--quiet", "--out", str(out), *SMALL)
        assert not (tmp_path / "e.videos.txt").exists()  # it would describe the earlier rows
    else:
        from safetensors.torch import load_file

        assert load_file(str(out))["embeddings"].shape[0] == 1


def test_convert_then_load(tmp_path, golden_dir, golden_config, golden_inputs):
    over = golden_overrides(golden_config["clip"])
    sets = [a for k, v in over.items() for a in ("--set", f"{k}={tuple(v) if isinstance(v, list) else v}")]
    out = tmp_path / "clip.safetensors"
    run("convert", os.path.join(golden_dir, "params_clip.npz"), "--model", "videoprism_lvt_v1_base",
        "--out", str(out), *sets)
    a = vp.load_safetensors(str(out), vp.from_official("videoprism_lvt_v1_base", **over))
    b = vp.load_flax_checkpoint(os.path.join(golden_dir, "params_clip.npz"),
                                vp.from_official("videoprism_lvt_v1_base", **over))
    for k, v in b.state_dict().items():
        assert torch.equal(v, a.state_dict()[k]), k


def test_help_explains_every_command():
    out = run("--help").stdout
    for cmd in ("embed", "embed-text", "convert", "data", "eval"):
        assert cmd in out
    assert "--num-frames" in run("embed", "--help").stdout
    assert "--tokenizer" in run("embed-text", "--help").stdout
    for task in ("retrieval", "zeroshot", "probe"):
        assert "--num-frames" in run("eval", task, "--help").stdout


def _small_encoder_file(tmp_path) -> str:
    """A small encoder saved as our .safetensors (2 frames of 32x32, 8x8 patches) and one clip next to it."""
    enc = vp.from_official("videoprism_v1_base", model_dim=32, num_heads=2, mlp_dim=64, num_spatial_layers=1,
                           num_temporal_layers=1, patch_size=8, pos_emb_shape=(2, 4, 4))
    vp.save_safetensors(enc, str(tmp_path / "enc.safetensors"))
    write_clip(str(tmp_path / "c.mp4"), 8)
    return str(tmp_path / "enc.safetensors")


def test_a_set_override_that_is_no_config_value_is_one_line_with_our_safetensors(tmp_path):
    """`--set model_dim={32}` (a set; bytes, b'32', alike) with our .safetensors raised a TypeError ("Object of type
    set is not JSON serializable") where the override is compared with the saved config: a traceback, exit 1. It is
    the text given, refused as contradicting the saved config, as any other value."""
    from videoprism.cli import _build, parse_overrides

    path = _small_encoder_file(tmp_path)
    for value in ("{32}", "b'32'", "1j"):
        with pytest.raises(vp.CheckpointError, match=re.escape(f"model_dim={value!r} (saved: 32) contradicts")):
            _build(None, path, parse_overrides([f"model_dim={value}"]), default="videoprism_v1_base")
    assert parse_overrides(["pos_emb_shape=(2,4,4)", "attention_backend=sdpa", "atten_logit_cap=None"]) == {
        "pos_emb_shape": (2, 4, 4), "attention_backend": "sdpa", "atten_logit_cap": None}


def test_embed_names_a_file_that_is_not_utf8_in_its_outputs(tmp_path):
    """A video whose name is not UTF-8 (b"caf\\xe9 12:30.mp4", a name Python holds as "caf\\udce9 12:30.mp4") was
    embedded, then the command failed on writing its name: to the .npy's listing of rows ("'utf-8' codec can't
    encode character '\\udce9'", the listing left empty) or to a .safetensors' metadata (no file written). The
    listing holds the name's bytes, a line per row; the metadata, UTF-8 JSON, the name as the messages print it."""
    from safetensors import safe_open

    clip = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9 12:30.mp4"))
    write_clip(clip, 4)
    args = [str(tmp_path / "missing.mp4"), clip, "--skip-bad", "--num-frames", "2", "--resolution", "36", "--quiet",
            "--workers", "0", *SMALL]
    assert main(["embed", *args, "--out", str(tmp_path / "e.npy")]) == 0
    assert (tmp_path / "e.videos.txt").read_bytes() == os.fsencode(clip) + b"\n"
    assert main(["embed", *args, "--out", str(tmp_path / "e.safetensors")]) == 0
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as fh:
        assert fh.metadata()["videos"] == clip.replace("\udce9", "\\udce9")


def test_embed_shows_names_with_control_characters_escaped(tmp_path, capsys):
    """A name holding a newline and an escape sequence was printed raw: `skipped: bad` then a forged
    `error: forged` line (in red), and a corrupt file's error retitled the terminal; the listing of rows gave one
    name two lines. Each now shows the name as Python escapes it, one line."""
    bad = str(tmp_path / "bad\nerror: forged\x1b[31m.mp4")
    with open(bad, "wb") as fh:
        fh.write(b"junk")
    good = str(tmp_path / "ok\r\x1b]0;T\x07.mp4")
    write_clip(good, 4)
    args = [bad, good, "--num-frames", "2", "--resolution", "36", "--quiet", "--workers", "0", *SMALL]
    assert main(["embed", *args, "--out", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: {tmp_path}/bad\\nerror: forged\\x1b[31m.mp4: "), err
    assert main(["embed", *args, "--skip-bad", "--out", str(tmp_path / "e.npy")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "forged" in line][0].startswith("skipped: "), err
    assert "\x1b" not in "".join(err)
    assert (tmp_path / "e.videos.txt").read_text() == f"{tmp_path}/ok\\r\\x1b]0;T\\x07.mp4\n"


def test_embed_listing_tells_a_backslash_n_from_a_newline(tmp_path):
    """A file named with a backslash and an n and one named with a newline were listed alike ("a\\nb.mp4") in
    F.videos.txt and the .safetensors' `videos`: the rows could not be told apart. The README's recipe reads each
    name back as it was."""
    from safetensors import safe_open

    names = [str(tmp_path / "a\\nb.mp4"), str(tmp_path / "a\nb.mp4"), str(tmp_path / "c\\\x1b.mp4")]
    for n, name in enumerate(names):
        write_clip(name, 4 + n)
    (tmp_path / "bad.mp4").write_bytes(b"junk")  # a skipped file: the .npy's rows get their listing
    args = [*names, str(tmp_path / "bad.mp4"), "--num-frames", "2", "--resolution", "36", "--quiet", "--workers", "0",
            "--skip-bad", *SMALL]
    assert main(["embed", *args, "--out", str(tmp_path / "e.npy")]) == 0
    assert main(["embed", *args, "--out", str(tmp_path / "e.safetensors")]) == 0
    with open(tmp_path / "e.videos.txt", encoding="utf-8", errors="surrogateescape") as fh:
        listing = fh.read().splitlines()
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as fh:
        metadata = fh.metadata()["videos"].split("\n")
    for lines in (listing, metadata):
        assert [line.encode("latin-1", "backslashreplace").decode("unicode_escape") for line in lines] == names


def test_embed_own_safetensors_needs_no_model_flags(tmp_path):
    """Our .safetensors carry their config: a trained small model (the demo's exports) embeds
    with --checkpoint alone, at its own frame count and resolution."""
    ckpt = _small_encoder_file(tmp_path)
    assert main(["embed", str(tmp_path / "c.mp4"), "--checkpoint", ckpt, "--quiet",
                 "--out", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (1, 2 * 4 * 4, 32)


def test_embed_defaults_to_the_clip_size_a_training_export_records(tmp_path):
    """A stage-2 student keeps its teacher's position grid and trains on its own clip size: embed (and eval) used
    the grid's, a size the model was not trained on. An export records the training's, the default now."""
    from videoprism.checkpoint import safetensors_clip

    ckpt = _small_encoder_file(tmp_path)
    vp.save_safetensors(vp.model_from_safetensors(ckpt), str(tmp_path / "trained.safetensors"),
                        clip={"num_frames": 4, "resolution": 16})
    assert safetensors_clip(str(tmp_path / "trained.safetensors")) == {"num_frames": 4, "resolution": 16}
    assert safetensors_clip(ckpt) == {}
    for name, tokens in (("enc", 2 * 4 * 4), ("trained", 4 * 2 * 2)):
        assert main(["embed", str(tmp_path / "c.mp4"), "--checkpoint", str(tmp_path / f"{name}.safetensors"),
                     "--quiet", "--out", str(tmp_path / f"{name}.npy")]) == 0
        assert np.load(tmp_path / f"{name}.npy").shape == (1, tokens, 32)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_embed_streams_batches_equal_to_each_clip_alone(tmp_path, workers):
    """Decoding workers and batches of 2 give, row for row in the order of the arguments, each clip decoded alone
    (read_clip) through the model alone; a file that cannot give the frames is skipped with --skip-bad, and the
    listing names the rows."""
    from videoprism.data import read_clip

    ckpt = _small_encoder_file(tmp_path)
    for n, name in ((12, "a.mp4"), (9, "b.mp4"), (1, "short.mp4")):
        write_clip(str(tmp_path / name), n)
    videos = [str(tmp_path / v) for v in ("a.mp4", "c.mp4", "short.mp4", "b.mp4", "a.mp4")]
    videos[1] = str(tmp_path / "enc.safetensors")  # not a video
    out = tmp_path / "e.npy"
    assert main(["embed", *videos, "--checkpoint", ckpt, "--batch-size", "2", "--workers", workers, "--skip-bad",
                 "--quiet", "--out", str(out)]) == 0
    got = torch.from_numpy(np.load(out))
    model = vp.model_from_safetensors(ckpt).eval()
    with torch.no_grad():
        want = torch.stack([model(read_clip(v, 2, 32)[None])[0][0] for v in (videos[0], videos[3], videos[4])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (tmp_path / "e.videos.txt").read_text().splitlines() == [videos[0], videos[3], videos[4]]


def test_embed_classifier_checkpoint_gives_encoder_features(tmp_path):
    """A classifier's forward is class logits; embed uses its encoder (same features as the
    encoder alone), not the logits."""
    cls = vp.from_official("videoprism_vc_v1_base", model_dim=32, num_heads=2, mlp_dim=64, num_spatial_layers=1,
                           num_temporal_layers=1, patch_size=8, pos_emb_shape=(2, 4, 4), num_classes=5)
    vp.save_safetensors(cls, str(tmp_path / "cls.safetensors"))
    vp.save_safetensors(cls.encoder, str(tmp_path / "enc.safetensors"))
    write_clip(str(tmp_path / "c.mp4"), 8)
    for name in ("cls", "enc"):
        assert main(["embed", str(tmp_path / "c.mp4"), "--checkpoint", str(tmp_path / f"{name}.safetensors"),
                     "--pool", "mean", "--quiet", "--out", str(tmp_path / f"{name}.npy")]) == 0
    got, want = np.load(tmp_path / "cls.npy"), np.load(tmp_path / "enc.npy")
    assert got.shape == (1, 32) and np.array_equal(got, want)


def test_embed_and_convert_refuse_bad_flags_before_any_work(tmp_path, capsys):
    ckpt = _small_encoder_file(tmp_path)
    clip = str(tmp_path / "c.mp4")
    for flags, needle in ((["--num-frames", "0"], "--num-frames 0: must be a positive"),
                          (["--resolution", "0"], "--resolution 0: must be a positive"),
                          (["--device", "gpu"], "not a device"),
                          (["--device", "meta"], "runs on cpu or cuda"),  # a traceback from deep inside
                          (["--device", "mps"], "runs on cpu or cuda"),
                          (["--out", ckpt], f"is the input --checkpoint {ckpt}"),  # replaced the weights
                          (["--out", "/proc/nope/e.npy"], "/proc/nope")):
        args = ["embed", clip, "--checkpoint", ckpt, "--quiet", "--out", str(tmp_path / "e.npy"), *flags]
        assert main(args) == 2, flags
        assert needle in capsys.readouterr().err, flags
    # `embed data/* --out data/e.npy` run again: the glob holds the last run's output
    assert main(["embed", clip, str(tmp_path / "e.npy"), "--checkpoint", ckpt, "--out", str(tmp_path / "e.npy")]) == 2
    assert f"is the input video {tmp_path / 'e.npy'}" in capsys.readouterr().err
    assert main(["convert", "x.npz", "--model", "videoprism_v1_base", "--out", str(tmp_path / "c.npy")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    # our own format given to convert: said as such (it was "not a zip archive of .npy arrays")
    assert main(["convert", ckpt, "--model", "videoprism_v1_base", "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "is already our .safetensors format" in capsys.readouterr().err


def test_embed_progress_bar_shows_the_rate_once(tmp_path, capsys):
    ckpt = _small_encoder_file(tmp_path)
    clip = str(tmp_path / "c.mp4")
    assert main(["embed", clip, clip, "--checkpoint", ckpt, "--out", str(tmp_path / "e.npy")]) == 0
    final = capsys.readouterr().err.splitlines()[-1]  # the bar's last refresh (a line of its own in a log)
    assert "2/2" in final and len(re.findall(r"clips?/s|s/clip|clips_per_s", final)) == 1, final


def test_progress_in_a_log_is_plain_lines_and_on_a_terminal_a_bar_redrawn_in_place(tmp_path):
    """stderr a file (CI, `2> log`, SLURM): every redraw of the bar (a carriage return, up to ten a second) stayed in
    the log on one line; now a plain line at the start, at most one per LOG_INTERVAL_S, and one at the end."""
    import pty

    from videoprism.progress import progress_bar

    with open(tmp_path / "log", "wb+") as log:
        subprocess.run([sys.executable, "-m", "videoprism", "data", "synth", "--out", str(tmp_path / "d"), "--num",
                        "12", "--size", "16", "--frames", "2", "--workers", "1"], stderr=log, stdout=subprocess.DEVNULL,
                       check=True, timeout=120)
        log.seek(0)
        err = log.read().decode()
    assert "\r" not in err
    assert [line.split("|")[0] for line in err.splitlines()] == ["synth:   0%", "synth: 100%"], err

    master, replica = pty.openpty()
    with open(replica, "w") as terminal:
        with progress_bar(total=3, file=terminal, desc="t") as bar:
            bar.update(3)
    assert os.read(master, 4096).count(b"\r") >= 2  # drawn, then redrawn over itself
    os.close(master)


def test_help_states_defaults(capsys):
    from videoprism.train import pipeline

    for entry, argv, defaults in ((pipeline.main, ["--help"], ("runs/demo", "1000", "tiny", "1500", "0.003")),
                                  (main, ["embed", "--help"], ("videoprism_public_v1_base", "none")),
                                  (main, ["eval", "probe", "--help"], ("1500", "0.003", "bfloat16", "16"))):
        with pytest.raises(SystemExit):
            entry(argv)
        text = " ".join(capsys.readouterr().out.split())
        for d in defaults:
            assert f"default {d}" in text or f"default: {d}" in text, (argv, d)


def _small_clip_file(tmp_path) -> tuple[str, str]:
    """A small random LvT model saved as our .safetensors, and a SentencePiece model whose pieces fit its text tower."""
    from videoprism.data.text import train_spm

    spm = str(tmp_path / "spm.model")
    train_spm([f"a {c} {s} moves {d}" for c in ("red", "blue", "green") for s in ("circle", "square")
               for d in ("left", "right", "up", "down")], spm, vocab_size=40)
    clip = vp.from_official("videoprism_lvt_v1_base", model_dim=32, num_heads=2, mlp_dim=64, num_spatial_layers=1,
                            num_temporal_layers=1, num_auxiliary_layers=0, num_unimodal_layers=1, vocabulary_size=40,
                            patch_size=8, pos_emb_shape=(2, 4, 4))
    vp.save_safetensors(clip, str(tmp_path / "clip.safetensors"))
    return str(tmp_path / "clip.safetensors"), spm


@pytest.mark.parametrize("ext", [".npy", ".safetensors"])
def test_embed_text_rows_equal_each_text_embedded_alone(tmp_path, ext):
    """Batched (and trimmed to the batch's longest text) as one text at a time through the Python API, in the order
    of the arguments then the file's lines; a .safetensors keeps the texts."""
    from safetensors import safe_open

    from videoprism.data.text import Tokenizer

    ckpt, spm = _small_clip_file(tmp_path)
    texts = ["a red circle moves left", "blue", "a green square moves up while a red circle moves down, slowly"]
    (tmp_path / "more.txt").write_text("a red square moves right\nup\n")
    out = tmp_path / f"t{ext}"
    assert main(["embed-text", *texts, "--texts-file", str(tmp_path / "more.txt"), "--checkpoint", ckpt,
                 "--tokenizer", spm, "--batch-size", "2", "--quiet", "--out", str(out)]) == 0
    texts += ["a red square moves right", "up"]
    if ext == ".npy":
        got = torch.from_numpy(np.load(out))
    else:
        with safe_open(str(out), "pt") as f:
            got = f.get_tensor("embeddings")
            assert f.metadata()["texts"].split("\n") == texts
    model, tok = vp.model_from_safetensors(ckpt).eval(), Tokenizer(spm)
    with torch.no_grad():
        want = torch.cat([model.encode_text(*tok([t])) for t in texts])
    assert got.shape == (5, 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the texts give different rows


def test_embed_text_bad_input_one_line_errors(tmp_path, capsys):
    ckpt, spm = _small_clip_file(tmp_path)
    enc = _small_encoder_file(tmp_path)

    def error(*argv) -> str:
        capsys.readouterr()
        assert main(["embed-text", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    base = ["--checkpoint", ckpt, "--tokenizer", spm, "--out", str(tmp_path / "t.npy")]
    assert "no text to embed" in error(*base)
    assert "text 2 is empty" in error("a dog", "  ", *base)
    (tmp_path / "t.txt").write_text("a dog\n\n")
    assert f"line 2 of {tmp_path / 't.txt'} is empty" in error("--texts-file", str(tmp_path / "t.txt"), *base)
    assert "must end in .npy or .safetensors" in error("a dog", *base[:4], "--out", "t.txt")
    assert "--tokenizer nope.model: no such file" in error("a dog", "--checkpoint", ckpt, "--tokenizer", "nope.model")
    assert "no text tower" in error("a dog", "--checkpoint", enc, "--tokenizer", spm)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert (f"--texts-file {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8"
            in error("--texts-file", str(tmp_path / "latin1.txt"), *base))
    assert f"is the input --checkpoint {ckpt}" in error("a dog", *base[:4], "--out", ckpt)
    big = SPM  # the shared SentencePiece model: 1000 pieces, more than this text tower's 40
    if os.path.isfile(big):
        assert "the tokenizer the checkpoint was trained with" in error("a dog", "--checkpoint", ckpt, "--tokenizer",
                                                                         big)
    assert not (tmp_path / "t.npy").exists()


def test_embed_text_file_with_a_byte_order_mark_and_an_uppercase_safetensors(tmp_path):
    """A texts file saved with a UTF-8 byte-order mark (Notepad) gave its first text another embedding (the mark was
    tokenised); a checkpoint named .SAFETENSORS was loaded as an official one into the default model."""
    ckpt, spm = _small_clip_file(tmp_path)
    upper = str(tmp_path / "CLIP.SAFETENSORS")
    os.link(ckpt, upper)
    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle moves left\r\nup\r\n".encode("utf-8"))
    common = ["--tokenizer", spm, "--quiet"]
    assert main(["embed-text", "--texts-file", str(tmp_path / "bom.txt"), "--checkpoint", upper, *common,
                 "--out", str(tmp_path / "file.npy")]) == 0
    assert main(["embed-text", "a red circle moves left", "up", "--checkpoint", ckpt, *common,
                 "--out", str(tmp_path / "args.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "file.npy"), np.load(tmp_path / "args.npy"))


def test_embed_pool_of_a_video_text_model_is_refused(tmp_path, capsys):
    """A video-text model's embedding is pooled already: --pool mean was silently ignored."""
    ckpt, _ = _small_clip_file(tmp_path)
    write_clip(str(tmp_path / "c.mp4"), 8)
    assert main(["embed", str(tmp_path / "c.mp4"), "--checkpoint", ckpt, "--pool", "mean", "--quiet",
                 "--out", str(tmp_path / "e.npy")]) == 2
    assert "is a video-text model, whose video embedding is already pooled" in capsys.readouterr().err


def test_export_names_itself_and_what_it_was_given(tmp_path, capsys):
    """`export PATH` with no run there said "--resume PATH: no complete checkpoint", an option never given."""
    (tmp_path / "model.safetensors").write_bytes(b"x")
    for path, needle in ((tmp_path / "none", "does not exist"), (tmp_path / "model.safetensors", "is a file"),
                         (tmp_path, "no complete checkpoint there")):
        assert main(["export", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: export '{path}'") and needle in err and "--resume" not in err, err


def test_embed_rejects_bad_output_name(media_dir):
    r = run("embed", os.path.join(media_dir, "water_bottle_drumming_vp9.webm"), "--out", "x.txt", check=False)
    assert r.returncode != 0 and ".npy or .safetensors" in r.stderr


# Bad input to every entry point: exit status 2 and one line `error: ...` naming the input and the fix, no
# traceback. In process (the wrapper `run_command` is what a console script runs), so each case takes well
# under a second: all of them fail before any training step.
def _bad_inputs(tmp):
    from videoprism.train import pipeline, stage1, stage2

    (tmp / "garbage.model").write_bytes(b"not a sentencepiece model")
    (tmp / "bad.jsonl").write_text('{"path": "a.webm", "caption": \n[1, 2]\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "clip.mp4").write_bytes(b"\0\0\0\x20ftypisom" + bytes(range(256)) * 8)
    (tmp / "out.npy").mkdir()
    np.savez(tmp / "other.npz", **{"params/other_model/w": np.zeros(2, np.float32)})  # another model's checkpoint
    from videoprism.train.config import build_config, save_config

    save_config(build_config("tiny", [f"train.out_dir={tmp}/s1run"], 1), str(tmp / "s1run" / "config.json"), stage=1)
    # train.steps=1: a case that wrongly passed would train one step, not the tiny preset's 1200.
    tiny = ["--config", "tiny", "model.num_frames=2", "model.resolution=16", f"train.out_dir={tmp}/run", "train.steps=1"]
    rand = [*tiny, "data.source=random", "train.global_batch=2"]
    return [
        (stage1.main, [*tiny, "train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
        (stage1.main, [*tiny, "train.stepz=3"], "unknown field 'stepz'"),
        (stage1.main, ["--config", "tin"], "unknown config preset 'tin'"),
        (stage1.main, ["model.num_frames=2", "--config", "tiny", "train.steps=abc"], "train.steps: expected an integer"),
        (stage1.main, [*rand, "--resume", "train.steps=abc"], "train.steps: expected an integer"),
        (stage1.main, [*rand, "lr=1"], "e.g. optim.lr"),
        (stage1.main, [*tiny, f"data.train={tmp}/none.jsonl"], "none.jsonl' does not exist"),
        (stage1.main, [*tiny, f"data.train={tmp}/bad.jsonl"], "set data.tokenizer=PATH.model"),
        (stage1.main, [*rand, f"model.init={tmp}/none.safetensors"], "none.safetensors' does not exist"),
        (stage1.main, [*rand, "model.name=videoprism_v1_base"], "not a video-text (LvT) model"),
        (stage1.main, [*tiny, f"data.train={tmp}/bad.jsonl", f"data.tokenizer={tmp}/garbage.model"],
         "is not a SentencePiece model"),
        (stage1.main, tiny, "data.train is empty; pass data.train=PATH/train.jsonl"),
        (stage1.main, [*rand, "train.global_batch=0"], "train.global_batch=0 is out of range: it must be >= 1"),
        (stage1.main, [*rand, "train.log_every=0"], "train.log_every=0 is out of range: it must be >= 1"),
        (stage1.main, [*rand, "train.mask_ratio=1.5"], "train.mask_ratio=1.5 is out of range: it must be in [0, 1)"),
        (stage1.main, [*rand, "data.flip_prob=2"], "data.flip_prob=2.0 is out of range: it must be in [0, 1]"),
        (stage1.main, [*tiny, f"data.train={tmp}/bad.jsonl", f"data.val={tmp}/none.jsonl"],
         "data.val='" + f"{tmp}/none.jsonl' does not exist"),
        (stage1.main, [*rand, f"train.out_dir={tmp}/garbage.model/run"], "garbage.model' is a file"),
        (stage1.main, [*rand, "--resume", f"{tmp}/none"], f"--resume {tmp}/none: no such file or folder"),
        (stage1.main, [*rand, "--resume", f"{tmp}/run/checkpoints/step_00000100"], "step_00000100: no such file"),
        (stage1.main, [*rand, "--resume", str(tmp)], "no complete checkpoint"),
        (stage1.main, [*rand, "stage1.temperature_init=2"], "stage1.temperature_init must be in [1/stage1.max_logit"),
        (stage1.main, [*rand, "optim.min_lr=1", "optim.lr=0.1"], "optim.min_lr=1 is above optim.lr=0.1"),
        # Each ran before: inf passed "> 0" (a NaN model exported), a timeout of inf crashed a worker, nan/inf
        # weights failed the first step's sampling, an empty out_dir failed after the data, a resolution not a
        # multiple of the patch after the pipeline's data.
        (stage1.main, [*rand, "optim.lr=inf"], "optim.lr=inf must be a finite number"),
        (stage1.main, [*rand, "data.decode_timeout=inf"], "data.decode_timeout=inf must be a finite number"),
        (stage1.main, [*tiny, f"data.train={tmp}/empty.jsonl:nan"], "WEIGHT must be > 0"),
        (stage1.main, [*tiny, f"data.train={tmp}/empty.jsonl:inf"], "WEIGHT must be > 0"),
        (stage1.main, [*rand, "train.out_dir="], "train.out_dir is empty"),
        (stage1.main, [*rand, "model.init="], "model.init is empty"),
        # A contrastive loss over one clip is 0 with no gradient: these trained nothing (loss 0.0, grad_norm 0.0).
        (stage1.main, [*rand, "train.global_batch=1"], "train.global_batch=1: stage 1's contrastive loss"),
        (stage1.main, [*rand, "train.micro_batch=1", "stage1.grad_cache=false"],
         "train.micro_batch=1 on 1 rank with stage1.grad_cache=false: each micro-step's contrastive loss"),
        (pipeline.main, ["--out", str(tmp), "model.resolution=60"], "model.resolution=60 is not a multiple of the "
                                                                      "patch size 8; use e.g. 56"),
        (stage2.main, [*rand, f"stage2.teacher={tmp}/none.safetensors"], "stage2.teacher='"),
        (stage2.main, [*rand, f"stage2.teacher={tmp}/other.npz"], "other.npz does not match FactorizedVideoCLIP: "
                                                                   "missing"),
        (stage2.main, [*rand, "stage2.decoder_heads=3"], "decoder_dim=64 is not divisible by stage2.decoder_heads=3"),
        (stage2.main, [*rand, "stage2.decoder_layers=0"], "stage2.decoder_layers=0 is out of range"),
        # A stage-1 run given to stage 2 is that, not a missing stage2.teacher (which it also lacks).
        (stage2.main, ["--config", "tiny", "--resume", f"{tmp}/s1run"], "holds a stage-1 run, which stage 2 cannot"),
        (stage1.main, [*tiny, f"data.train={tmp}/bad.jsonl", "data.val=no/such.jsonl"],
         f"does not exist (from the current folder: {os.getcwd()}/no/"),
        (pipeline.main, ["--out", str(tmp), "--config", "huge"], "unknown config preset 'huge'"),
        (pipeline.main, ["--out", str(tmp), "stage2.decoder_heads=3"], "not divisible by stage2.decoder_heads=3"),
        (pipeline.main, ["--out", str(tmp), f"stage2.teacher={tmp}/t.safetensors"], "the pipeline sets"),
        (pipeline.main, ["--out", str(tmp), "--clips", "0"], "--clips must be >= 2"),
        # An inf lr passed `> 0` and trained the probes, minutes later, to NaN (the decoder heads fail sooner before).
        (pipeline.main, ["--out", str(tmp), "--probe-lr", "inf", "stage2.decoder_heads=3"],
         "--probe-steps must be >= 1 and --probe-lr a finite number > 0, got 1500 and inf"),
        (main, ["embed", str(tmp / "garbage.model"), "--model", "videoprism_foo"], "unknown model name 'videoprism_foo'"),
        (main, ["embed", "x.mp4", "--out", "x.txt"], "must end in .npy or .safetensors"),
        (main, ["embed", str(tmp / "garbage.model"), "--out", f"{tmp}/garbage.model/e.npy"],
         "cannot create its folder"),
        (main, ["data", "index", str(tmp / "empty.jsonl"), "--out", f"{tmp}/c.jsonl", "--quiet"], "is empty"),
        (main, ["data", "index", str(tmp / "bad.jsonl"), "--out", str(tmp), "--quiet"], "is a folder; pass a .jsonl"),
        (main, ["data", "index", str(tmp), "--out", f"{tmp}/c.jsonl", "--quiet"], "is a folder"),
        (main, ["data", "index", str(tmp / "bad.jsonl"), "--out", f"{tmp}/garbage.model/c.jsonl", "--quiet"],
         "cannot create its folder"),
        (main, ["embed", str(tmp / "garbage.model"), f"{tmp}/none.webm", f"{tmp}/none2.webm", "--out",
                f"{tmp}/e.npy"], "none.webm: no such file (and 1 more)"),
        (main, ["embed", str(tmp), "--out", f"{tmp}/e.npy"], "a folder, not a video file"),
        (main, ["embed", str(tmp / "garbage.model"), "--out", f"{tmp}/out.npy"], "out.npy: is a folder"),
        (main, ["embed", str(tmp / "garbage.model"), "--model", "videoprism_vc_v1_base", "--out", f"{tmp}/e.npy"],
         "--set num_classes=N"),
        (main, ["data", "index", str(tmp / "clip.mp4"), "--out", f"{tmp}/c.jsonl", "--quiet"],
         "clip.mp4' is a binary file, not a JSONL manifest"),
        (main, ["data", "synth", "--out", str(tmp / "garbage.model"), "--num", "2"], "--out"),
        (main, ["embed", str(tmp / "garbage.model"), "--attention-backend", "fast", "--out", f"{tmp}/e.npy"],
         "--attention-backend fast: choose one of"),
        (main, ["embed", str(tmp / "bad.jsonl"), "--quiet", "--out", f"{tmp}/e.npy", *SMALL], "bad.jsonl: not a video"),
    ]


def test_bad_input_one_line_error_exit_2(tmp_path, capsys):
    for entry, argv, needle in _bad_inputs(tmp_path):
        _assert_one_line_error(entry, argv, needle, capsys)


def test_bad_manifest_line_one_line_error_exit_2(tmp_path, capsys, media_dir):
    from videoprism.train import stage1

    (tmp_path / "bad.jsonl").write_text('{"path": "a.webm", "caption": \n[1, 2]\n')
    argv = ["--config", "tiny", "model.num_frames=2", "model.resolution=16", f"train.out_dir={tmp_path}/run",
            "train.steps=1", f"data.train={tmp_path}/bad.jsonl",
            f"data.tokenizer={SPM}"]  # the tokenizer loads before the manifest is read
    _assert_one_line_error(stage1.main, argv, "bad.jsonl:1: bad JSON", capsys)


def _assert_one_line_error(entry, argv, needle, capsys):
    assert entry(argv) == 2, argv
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, lines)


def test_triton_attention_on_the_cpu_fails_before_the_run_starts(tmp_path, capsys, monkeypatch):
    from videoprism.ops import attention
    from videoprism.train import stage1

    monkeypatch.setattr(attention, "INTERPRET", False)  # the suite runs Triton's interpreter on the CPU
    argv = ["--config", "tiny", "data.source=random", f"train.out_dir={tmp_path}/run", "model.attention_backend=triton",
            "train.device=cpu"]
    _assert_one_line_error(stage1.main, argv, "model.attention_backend=triton needs a GPU", capsys)
    assert not (tmp_path / "run").exists()  # nothing written: no config.json, no retired checkpoints
    for backend, why in (("flex", "FlexAttention has no backward on the CPU"), ("flash", "need a GPU")):
        argv[4] = f"model.attention_backend={backend}"
        _assert_one_line_error(stage1.main, argv, why, capsys)
    assert not (tmp_path / "run").exists()


def test_sdpa_attention_is_refused_before_the_run_starts(tmp_path, capsys):
    """SDPA has neither the official models' logit soft-cap nor stage 2's masked time axis: refused by the
    preflight (it failed at the first step, after the data was decoded and the run folder written)."""
    from videoprism.train import stage1
    from videoprism.train.config import build_config, check_inputs

    argv = ["--config", "tiny", "data.source=random", f"train.out_dir={tmp_path}/run", "model.attention_backend=sdpa"]
    _assert_one_line_error(stage1.main, argv, "soft-caps its attention logits at 50", capsys)
    assert not (tmp_path / "run").exists()
    cfg = build_config("tiny", ["model.attention_backend=sdpa", f"train.out_dir={tmp_path}/run"], 2)
    with pytest.raises(ValueError, match="stage 2's student attends on the masked time axis"):
        check_inputs(cfg, 2)


def test_a_file_name_that_is_not_utf8_prints_escaped_under_a_utf8_locale(tmp_path, monkeypatch):
    """Under a UTF-8 locale (en_US.UTF-8) stdout's errors are strict: `data pack` of a manifest in a folder named
    b"caf\\xe9" packed it, then failed with "error: 'utf-8' codec can't encode character '\\udce9'", exit 2, at the
    line naming the pack (a run's "checkpoint: ..." lines likewise). The name prints escaped, as stderr prints it."""
    import io

    folder = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9"))
    os.mkdir(folder)
    manifest = os.path.join(folder, "train.jsonl")
    with open(manifest, "w") as fh:
        fh.write('{"path": "a.webm", "caption": "a clip"}\n')
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="utf-8", errors="strict"))
    assert main(["data", "pack", manifest, "--quiet"]) == 0
    sys.stdout.flush()
    assert b"caf\\udce9/train.jsonl.pack" in out.getvalue() and os.path.isfile(manifest + ".pack")


def test_bad_input_traceback_on_request(tmp_path, monkeypatch):
    from videoprism.train import stage1

    monkeypatch.setenv("VIDEOPRISM_TRACEBACK", "1")
    with pytest.raises(ValueError, match="expected an integer"):
        stage1.main(["train.steps=abc"])
    # The data tools too (they caught their own errors and printed one line).
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["data", "index", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "clean.jsonl")])
    monkeypatch.delenv("VIDEOPRISM_TRACEBACK")
    assert main(["data", "index", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "clean.jsonl")]) == 2


@pytest.mark.parametrize("name", ["encoder", "attention", "token_ops", "data", "train_step", "checkpoint"])
def test_bench_help_names_the_module_and_explains_every_option(name, capsys):
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m bench.{name} ")
    parsers = []

    def keep(self, argv=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", keep)
        with pytest.raises(SystemExit):
            module.main([])
    for action in parsers[0]._actions:
        assert action.help, (name, action.option_strings)
        if action.default not in (None, False, argparse.SUPPRESS):  # flags and computed defaults say it in words
            assert "%(default)s" in action.help, (name, action.option_strings, action.help)


def test_out_of_memory_is_one_line_exit_1_and_other_runtime_errors_keep_their_traceback(capsys, monkeypatch):
    import torch

    from videoprism.cli import run_command

    monkeypatch.delenv("VIDEOPRISM_TRACEBACK", raising=False)

    def huge():  # a real failed CPU allocation (1 PiB)
        torch.empty(2**50, dtype=torch.uint8)

    def gpu_oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    def cublas_oom():
        raise RuntimeError("CUDA error: out of memory\nCompile with TORCH_USE_CUDA_DSA")

    for fn, needle in ((huge, "can't allocate memory"), (gpu_oom, "Tried to allocate 20.00 GiB"),
                       (cublas_oom, "CUDA error: out of memory")):
        assert run_command(fn) == 1
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: out of memory (") and needle in lines[0], lines
        assert lines[0].endswith("use a smaller batch, fewer frames or a lower resolution")

    def bug():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_command(bug)


def test_sizes_past_memory_or_the_machines_integers_are_one_line(tmp_path, capsys, monkeypatch):
    """numpy's MemoryError (`data synth --size 99999998`: "Unable to allocate 142. PiB") and a size past int64
    (`model.resolution=99999999992` made torch.empty raise "TypeError: ... Overflow when unpacking long long";
    `data synth --fps 99999999999` PyAV's "OverflowError: value too large to convert to int") ended in tracebacks,
    exit 1. Out of memory is the one line it is for torch's allocations (exit 1); a size too large is one line,
    exit 2. A TypeError that is no overflow keeps its traceback."""
    from videoprism.cli import run_command

    monkeypatch.delenv("VIDEOPRISM_TRACEBACK", raising=False)
    assert run_command(lambda: np.empty(2**60, dtype=np.uint8)) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: out of memory (Unable to allocate") and "\n" not in line, line
    for fn, needle in ((lambda: torch.empty(2**64), "Overflow when unpacking long"),
                       (lambda: torch.empty(2**40, 2**40), "Storage size calculation overflowed")):
        status, line = run_command(fn), capsys.readouterr().err.strip()
        assert status == 2 and line.startswith("error: a size or count is too large (") and needle in line, line
    r = run("data", "synth", "--out", str(tmp_path / "d"), "--num", "2", "--fps", "99999999999", "--workers", "1",
            "--quiet", check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: a size or count is too large (value too large to convert to int); check the numbers given (frames, "
        "resolution, batch, model sizes, frame rate) for extra digits"], r.stderr[-2000:]
    with pytest.raises(TypeError, match="unsupported operand"):
        run_command(lambda: 1 + "a")


def _nofile(n: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_out_of_file_descriptors_is_one_line_naming_the_limit_and_the_fix(tmp_path, capsys, monkeypatch):
    """`data index --workers 2` under `ulimit -n 16` said `error: [Errno 24] Too many open files`, which names no
    fix; torch's loader, out of descriptors for a batch's shared-memory handles (`eval probe` under `ulimit -n 32`),
    ended in a 20-line traceback."""
    from videoprism.cli import run_command

    monkeypatch.delenv("VIDEOPRISM_TRACEBACK", raising=False)
    data = tmp_path / "d"
    run("data", "synth", "--out", str(data), "--num", "4", "--quiet")
    r = subprocess.run([sys.executable, "-m", "videoprism", "data", "index", str(data / "train.jsonl"), "--out",
                        str(tmp_path / "clean.jsonl"), "--workers", "2"], capture_output=True, text=True, timeout=60,
                       preexec_fn=_nofile(16))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines, r.stderr[-3000:]
    assert lines[-1].startswith("error: out of file descriptors ([Errno 24] Too many open files") and (
        "`ulimit -n`, is 16); raise it" in lines[-1]), lines[-1]

    def loader_out_of_files():  # torch's DataLoader as it raised under `eval probe`
        raise RuntimeError("Too many open files. Communication with the workers is no longer possible. Please "
                           "increase the limit using `ulimit -n` in the shell or change the sharing strategy")

    assert run_command(loader_out_of_files) == 1
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith("error: out of file descriptors (Too many open files; the "), said


def test_ctrl_c_is_said_once_by_rank_0(monkeypatch, capsys):
    """torchrun passes a Ctrl-C to every rank, which all said the same line (one per GPU)."""
    from videoprism.cli import run_command

    def interrupted():
        raise KeyboardInterrupt("[stage1] at step 4")

    for rank, said in (("1", ""), ("0", "interrupted: [stage1] at step 4\n")):
        monkeypatch.setenv("RANK", rank)
        assert run_command(interrupted) == 130
        assert capsys.readouterr().err == said


def test_stdout_closed_by_its_reader_ends_quietly_with_the_sigpipe_status(tmp_path, capsys):
    """`videoprism data synth ... | head -1`: the reader gone, the command's summary line said `error: [Errno 32]
    Broken pipe` with exit status 2, as if the input were bad. A BrokenPipeError that is not stdout's keeps its
    one line."""
    from videoprism.cli import run_command

    p = subprocess.Popen([sys.executable, "-m", "videoprism", "data", "synth", "--out", str(tmp_path / "d"), "--num",
                          "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before the command writes a line
    err = p.stderr.read()
    assert (p.wait(timeout=120), err) == (141, "")

    def socket_gone():
        raise BrokenPipeError(32, "Broken pipe")

    assert run_command(socket_gone) == 2
    assert capsys.readouterr().err == "error: [Errno 32] Broken pipe\n"


@pytest.mark.parametrize("saved", [True, False])
def test_ctrl_c_in_the_main_job_names_the_stage_command_that_resumes(tmp_path, monkeypatch, capsys, saved):
    """The trainer's Ctrl-C line says 'the same command with --auto-resume', which train.pipeline does not take:
    the pipeline names the stage's own command (and that it starts over itself). Before the stage's first
    checkpoint that command would stop on "no complete checkpoint": only the pipeline's own rerun is named."""
    from videoprism.train import pipeline

    monkeypatch.setattr(pipeline, "_data", lambda *a: None)
    monkeypatch.setattr(pipeline.stage1, "run", lambda cfg, overwrite, go_on: {"export": "x"})
    said = ("[stage2] at step 3; the latest checkpoint is C: the same command with --auto-resume goes on from it"
            if saved else "[stage2] at step 1; no checkpoint yet: the same command starts again")
    if saved:
        (tmp_path / "stage2" / "checkpoints" / "step_00000002").mkdir(parents=True)

    def interrupted(cfg, overwrite, go_on):
        raise KeyboardInterrupt(said)

    monkeypatch.setattr(pipeline.stage2, "run", interrupted)
    assert pipeline.main(["--out", str(tmp_path)]) == 130
    resume = f"for this demo's stage 2: python -m train.stage2 --resume {tmp_path}/stage2; " if saved else ""
    assert capsys.readouterr().err == (
        f"interrupted: {said} ({resume}train.pipeline run again starts both stages over)\n")


@pytest.mark.parametrize("when", ["step", "startup"])
def test_a_stop_signal_in_the_main_job_names_what_the_pipeline_offers(tmp_path, monkeypatch, capsys, when):
    """SIGTERM in the pipeline's stage 1 said the trainer's "the same command with --resume continues from it" (before
    the first step: "with --auto-resume"): train.pipeline takes neither flag (`error: unrecognized arguments`). The
    line names the stage's own command with --resume on its out_dir (after a step) and the pipeline's rerun."""
    import signal

    from videoprism.train import pipeline
    from videoprism.train.trainer import Trainer

    launch = Trainer.launch_step

    def launch_then_notice(self):  # the notice comes in step 2, acted on at its boundary
        pending = launch(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return pending

    def data_then_notice(*a, **k):  # in the startup: data.cache's decode of a manifest
        os.kill(os.getpid(), signal.SIGTERM)

    if when == "step":
        monkeypatch.setattr(Trainer, "launch_step", launch_then_notice)
    else:
        monkeypatch.setattr(pipeline.stage1, "build_train_data", data_then_notice)
    assert pipeline.main(["--out", str(tmp_path), "--clips", "20", "train.steps=4", "train.global_batch=4",
                          "train.eval_every=0", "checkpoint.interval=0"]) == 128 + signal.SIGTERM
    said = capsys.readouterr()
    said = said.out + said.err
    assert "--auto-resume" not in said and "the same command" not in said, said
    rerun = "train.pipeline run again starts both stages over"
    if when == "step":
        assert (f"[stage1] SIGTERM: stopped after step 2; checkpoint {tmp_path}/stage1/checkpoints/step_00000002; "
                f"python -m train.stage1 --resume {tmp_path}/stage1 continues from it (this stage alone; {rerun})"
                in said), said
    else:
        assert f"SIGTERM before the first step: stopped (no step taken, nothing lost); {rerun}\n" in said, said


@pytest.mark.parametrize("main_module, argv0, want", [
    ("train.pipeline", "/repo/train/pipeline.py", "python -m train.stage1"),
    ("videoprism.train.pipeline", "/site/videoprism/train/pipeline.py", "python -m videoprism.train.stage1"),
    (None, "/venv/bin/videoprism-stage2", "videoprism-stage1"),
    (None, "/venv/bin/videoprism", "videoprism-stage1"),
])
def test_a_command_another_entry_point_advises_is_one_that_starts_the_way_this_one_did(monkeypatch, main_module,
                                                                                         argv0, want):
    """train.pipeline's stop line and errors name stage 1's command: `python -m train.stage1` works only from the
    repository, and the installed pipeline (`python -m videoprism.train.pipeline`) named it all the same."""
    import types

    from videoprism.cli import command_name

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=main_module) if main_module else None
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert command_name("train.stage1") == want
    assert command_name("train.pipeline") == (f"python -m {main_module}" if main_module
                                              else "python -m videoprism.train.pipeline")


def test_the_installed_pipelines_help_shows_its_own_command():
    r = subprocess.run([sys.executable, "-m", "videoprism.train.pipeline", "--help"], capture_output=True, text=True,
                       timeout=300, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "python -m videoprism.train.pipeline --out runs/demo" in r.stdout
    assert "python -m train." not in r.stdout, r.stdout


def test_the_main_job_runs_end_to_end_at_toy_size(tmp_path, capsys):
    """The README's main command, shrunk (20 clips, 2 steps a stage, 3 probe steps): every stage runs and the
    closing table holds each probe label with its chance level and both stages' accuracies (their values are the
    demo's to judge: tests/test_stage2.py checks learning)."""
    import re

    from videoprism.train import pipeline

    assert pipeline.main(["--out", str(tmp_path), "--clips", "20", "--probe-steps", "3", "train.steps=2",
                          "train.global_batch=4", "train.eval_every=0"]) == 0
    out = capsys.readouterr().out
    assert "stage-1 zero-shot retrieval on the validation split (2 clips): t2v_R@1" in out
    assert re.search(r"^stage-1 zero-shot classification .*: direction \d+\.\d%, colour \d+\.\d%, shape \d+\.\d% "
                     r"\(chance 25\.0%, 16\.7%, 33\.3%\)$", out, re.M), out
    for name in pipeline.PROBE_LABELS:
        assert re.search(rf"^  {name} +\d+\.\d% +\d+\.\d% \( *\d+%\) +\d+\.\d% \( *\d+%\)$", out, re.M), out
    for stage in ("stage1", "stage2"):
        assert f"weights {tmp_path / stage / 'model.safetensors'}, curves {tmp_path / stage / 'curves.png'}" in out
    # results.json holds what the summary printed.
    import json

    assert f"results: {tmp_path / 'results.json'}" in out
    res = json.load(open(tmp_path / "results.json"))
    assert res["validation_clips"] == 2 and f"t2v_R@1 {100 * res['retrieval']['t2v_R@1']:.1f}%" in out
    for name in pipeline.PROBE_LABELS:
        assert f"{name} {100 * res['zero_shot'][name]['top1']:.1f}%" in out
        acc = [100 * res["probes"][s][name]["accuracy"] for s in ("stage1", "stage2")]
        assert re.search(rf"^  {name} +\d+\.\d% +{acc[0]:5.1f}% .* {acc[1]:5.1f}% ", out, re.M), (name, acc)
    assert res["runs"]["stage2"]["export"] == str(tmp_path / "stage2" / "model.safetensors")
    printed = re.search(r"lr 0\.003, (\d+) s\):", out)
    assert printed and abs(int(printed[1]) - res["probe_s"]) <= 0.6 and res["probe_s"] <= res["total_s"]


def _embed_a_skipping_run(tmp_path) -> list[str]:
    """An earlier run's e.npy and e.videos.txt (a.mp4's row, missing.mp4 skipped); returns the embed flags."""
    ckpt = _small_encoder_file(tmp_path)
    write_clip(str(tmp_path / "a.mp4"), 12)
    write_clip(str(tmp_path / "b.mp4"), 9)
    flags = ["--checkpoint", ckpt, "--skip-bad", "--quiet", "--workers", "0", "--out", str(tmp_path / "e.npy")]
    assert main(["embed", str(tmp_path / "missing.mp4"), str(tmp_path / "a.mp4"), *flags]) == 0
    return flags


def _embed_pair_state(tmp_path) -> tuple[bytes | None, str | None]:
    """The bytes of e.npy and the text of e.videos.txt now (None: no such file)."""
    npy, listing = tmp_path / "e.npy", tmp_path / "e.videos.txt"
    return (npy.read_bytes() if npy.exists() else None, listing.read_text() if listing.exists() else None)


@pytest.mark.parametrize("fails", ["e.npy", "e.videos.txt"])
def test_embed_on_a_full_disk_keeps_the_previous_rows_and_listing(tmp_path, full_disk, fails):
    """np.save wrote the .npy in place: a full disk (or a kill) mid-write left a cut e.npy under the name and the
    previous rows lost; and a listing that failed after the new .npy was written left the old listing describing
    the new rows (row 0 named a.mp4, its embedding b.mp4's). Now neither file changes, and no temporary is left."""
    flags = _embed_a_skipping_run(tmp_path)
    before = _embed_pair_state(tmp_path)
    assert before[1] == f"{tmp_path / 'a.mp4'}\n"
    full_disk(fails)
    assert main(["embed", str(tmp_path / "b.mp4"), str(tmp_path / "missing.mp4"), *flags]) == 2
    assert _embed_pair_state(tmp_path) == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_embed_never_leaves_a_listing_beside_rows_it_does_not_describe(tmp_path, monkeypatch):
    """A run without skips over an earlier run's .npy and listing: the new .npy was written, then the old listing
    removed, so a kill between the two left the old listing naming the new rows (a.mp4 for b.mp4's embedding, the
    same count of rows: nothing to tell). Each state the files pass through (seen before and after each rename and
    removal) is now the old pair, the new one, or a .npy without a listing."""
    flags = _embed_a_skipping_run(tmp_path)
    old = _embed_pair_state(tmp_path)
    states = []

    def watched(real):
        def call(*a, **k):
            states.append(_embed_pair_state(tmp_path))
            real(*a, **k)
            states.append(_embed_pair_state(tmp_path))
        return call

    monkeypatch.setattr(os, "remove", watched(os.remove))
    monkeypatch.setattr(os, "replace", watched(os.replace))
    assert main(["embed", str(tmp_path / "b.mp4"), *flags]) == 0
    monkeypatch.undo()
    new = _embed_pair_state(tmp_path)
    assert new[0] != old[0] and new[1] is None and states
    for npy, listing in states:
        assert listing is None or (npy, listing) == old, "a listing beside rows it does not describe"


def test_progress_in_a_log_takes_tqdm_mininterval_over_the_callers_interval():
    """TQDM_MININTERVAL=S sets a log's interval (README), also for a bar whose caller passes its own (the training
    bar's mininterval=1.0, which overrode tqdm's default from the environment: a line a second in the log). tqdm
    reads the variable on import: a process of its own."""
    from videoprism.progress import LOG_INTERVAL_S

    code = ("import io; from videoprism.progress import progress_bar; "
            "print([progress_bar(total=3, file=io.StringIO(), **kw).mininterval for kw in ({}, {'mininterval': 1.0})])")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    for setting, want in ((None, [LOG_INTERVAL_S] * 2), ("7", [7.0, 7.0])):
        run_env = env if setting is None else {**env, "TQDM_MININTERVAL": setting}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True,
                             timeout=60).stdout
        assert out.strip() == str(want), (setting, out)


def test_embed_reads_a_dotdot_path_through_a_symlinked_folder_as_the_kernel_does(tmp_path, monkeypatch, capsys):
    """`embed data/../clips/c.mp4`, data/ a symlink to deep/data: the file exists (deep/clips/c.mp4), but embed's
    manifest held the path with '..' dropped as text (abspath: ./clips/c.mp4, no such file), and it stopped on
    "missing file". The video is embedded; a skipped one is still named as given."""
    deep = tmp_path / "x" / "deep"
    (deep / "data").mkdir(parents=True)
    ckpt = _small_encoder_file(deep)
    (tmp_path / "data").symlink_to(deep / "data")
    monkeypatch.chdir(tmp_path)
    videos = ["data/../c.mp4", "data/../gone.mp4"]
    out = str(tmp_path / "e.npy")
    assert main(["embed", *videos, "--checkpoint", ckpt, "--out", out, "--quiet", "--workers", "0",
                 "--skip-bad"]) == 0
    assert np.load(out).shape[0] == 1
    assert (tmp_path / "e.videos.txt").read_text() == "data/../c.mp4\n"
    assert "skipped: data/../gone.mp4: " in capsys.readouterr().err


class _SignalFellThrough(Exception):
    """A stop signal reached the test's own handler: the command had none of its own."""


def _fail_on_stop_signals():
    """The test's handlers for SIGTERM and SIGUSR1 (restored by the returned callable): a command without its own
    lets the signal through to them, which fails the test instead of killing the pytest process."""
    import signal

    def fell_through(signum, frame):
        raise _SignalFellThrough(signal.Signals(signum).name)

    before = {s: signal.signal(s, fell_through) for s in (signal.SIGTERM, signal.SIGUSR1)}
    return lambda: [signal.signal(s, h) for s, h in before.items()]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_ends_any_command_with_one_line_and_its_status(signame, capsys, monkeypatch):
    """`embed`, `export`, `eval`, `embed-text`, `convert`, `data pack`, `data tokenizer` and the benchmarks had no
    handler: SIGTERM (SIGUSR1 alike) ended them silently, status -15, the log showing nothing. Every command runs
    through run_command, which now says one line and returns 128 + the signal; rank 0 only says it."""
    import signal
    import time

    from videoprism.cli import run_command

    signum = getattr(signal, signame)

    def works():
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises within it
        return 0

    restore = _fail_on_stop_signals()
    try:
        for rank, said in (("1", ""), ("0", f"{signame}: stopped; outputs are written whole or not at all: the same "
                                            "command starts again\n")):
            monkeypatch.setenv("RANK", rank)
            assert run_command(works) == 128 + signum
            assert capsys.readouterr().err == said
    finally:
        restore()


def test_sigterm_during_embed_removes_its_temporary_folder_and_workers(tmp_path, capsys, monkeypatch):
    """SIGTERM while `embed` ran (its clips decoding in worker processes) ended it silently, status -15, and left
    its temporary folder (TMPDIR/videoprism-embed-*/videos.jsonl) and a worker behind. It now unwinds: status 143,
    one line, neither folder nor worker left, no --out written."""
    import signal
    import tempfile

    import videoprism.data.device as device

    ckpt = _small_encoder_file(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real = device.to_device

    def signalled(x, dev):  # a batch in hand: the workers are decoding the next ones
        os.kill(os.getpid(), signal.SIGTERM)
        return real(x, dev)

    monkeypatch.setattr(device, "to_device", signalled)
    restore, children = _fail_on_stop_signals(), child_pids()
    try:
        status = main(["embed", *[str(tmp_path / "c.mp4")] * 6, "--checkpoint", ckpt, "--workers", "2",
                       "--batch-size", "1", "--quiet", "--out", str(tmp_path / "e.npy")])
    finally:
        restore()
    assert status == 143
    assert capsys.readouterr().err.splitlines()[-1].startswith("SIGTERM: stopped; ")
    left = [n for n in os.listdir(scratch) if not n.startswith("pymp-")]  # multiprocessing's own, for the process
    assert not left and not (tmp_path / "e.npy").exists() and not still_running(children, within=10)
