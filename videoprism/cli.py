"""`videoprism` command line: embed videos and texts, convert official checkpoints, export training checkpoints,
data tools, evaluation.

    videoprism embed VIDEO... [--model NAME] [--checkpoint X] [--num-frames T] [--out FILE.npy]
    videoprism embed-text TEXT... --tokenizer SPM.model [--model NAME] [--checkpoint X] [--out FILE.npy]
    videoprism convert CKPT.npz --model NAME --out WEIGHTS.safetensors
    videoprism export RUN[/checkpoints/step_N] [--out WEIGHTS.safetensors]
    videoprism data {index,validate,pack,tokenizer,synth} ...
    videoprism eval {retrieval,zeroshot,probe} ...
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import sys

import numpy as np
import torch

from videoprism.paths import (atomic_file, check_not_an_input, check_out_file, echo, is_safetensors, listed,
                              read_text, shown)
from videoprism.preemption import Preempted, stopped_line, stopping


def run_command(fn, *args, errors: tuple[type[BaseException], ...] = ()) -> int:
    """`fn(*args)` as a command: an error of the user's input exits with status 2 and one line,
    `error: <message>`, instead of a traceback.

    Those errors are ValueError (which CheckpointError, BadVideoError and BadSampleError are),
    OSError (a missing or unreadable path), TooManyBadSamplesError and the caller's `errors`:
    their messages name the input and the fix. Other exceptions are bugs and keep their
    traceback; `VIDEOPRISM_TRACEBACK=1` shows it for these too (a ValueError from deep inside).
    A size past the machine's integers (torch's overflow of int64, an OverflowError) is one line, exit status 2.
    Running out of memory (GPU, or a CPU allocation that fails, torch's, numpy's or Python's MemoryError) is one line
    too, exit status 1: the cause is the sizes asked for, not a bug; so is running out of file descriptors (EMFILE:
    the line names `ulimit -n` and fewer workers) and a collective that failed because another rank's
    process died (exit status 1: that rank's error says why). Ctrl-C (KeyboardInterrupt) is one line, `interrupted`
    and what the interrupted code said was kept (a trainer: its latest checkpoint), exit status 130
    (128 + SIGINT, the shell's status for it), said by rank 0 only under torchrun: a traceback of wherever
    the main thread happened to be (a DataLoader's queue, a decoder) says nothing. stdout closed by its reader
    (`videoprism data index M --out X | head -1`) ends the command silently with status 141 (128 + SIGPIPE, what
    the shell reports for a Unix tool stopped so), not `error: [Errno 32] Broken pipe` as if the input were bad.
    A stop signal (SIGTERM, SIGUSR1: preemption.py) is one line too, `SIGTERM: stopped; ...`, status 128 + the
    signal: what the code that acted on it said was kept (a trainer's checkpoint, data index's journal), else only
    that the command stopped.
    """
    from videoprism.data.errors import TooManyBadSamplesError

    _print_any_file_name()
    try:
        # A stop signal no code of the command acts on ends it as Ctrl-C does (preemption.py): its default action
        # was a silent exit that left `embed`'s temporary folder and decoding workers behind.
        with stopping(True, lambda signum: Preempted(signum, None, None, said=False)):
            status = fn(*args) or 0
        sys.stdout.flush()  # a closed pipe fails here, not at exit as "Exception ignored ... BrokenPipeError"
        return status
    except Preempted as e:
        if not e.said and os.environ.get("RANK", "0") == "0":
            echo(stopped_line(e.signum, "outputs are written whole or not at all: the same command starts again"),
                 file=sys.stderr, flush=True)
        return e.code
    except (ValueError, OSError, TooManyBadSamplesError, *errors) as e:
        if isinstance(e, BrokenPipeError) and _stdout_closed():
            return _SIGPIPE_STATUS
        if os.environ.get("VIDEOPRISM_TRACEBACK") == "1":
            raise
        if _out_of_files(e):
            return _say_out_of_files(str(e))
        echo(f"error: {e}", file=sys.stderr)  # a newline in a file name forges no line
        return 2
    except KeyboardInterrupt as e:
        if os.environ.get("VIDEOPRISM_TRACEBACK") == "1":
            raise
        if os.environ.get("RANK", "0") == "0":  # torchrun passes the Ctrl-C to every rank: one line, not one each
            echo("interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except MemoryError as e:  # numpy's and Python's failed allocations (`data synth --size 99999998`)
        if os.environ.get("VIDEOPRISM_TRACEBACK") == "1":
            raise
        return _say_out_of_memory(_first_line(e))
    except (OverflowError, TypeError) as e:
        if os.environ.get("VIDEOPRISM_TRACEBACK") == "1" or not _too_large(e):
            raise
        return _say_too_large(_first_line(e))
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        first = _first_line(e)
        if os.environ.get("VIDEOPRISM_TRACEBACK") == "1":
            raise
        if (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in first
                or "out of memory" in first.lower()):  # "CUDA error: out of memory" from cuBLAS, NCCL
            return _say_out_of_memory(first)
        if _too_large(e):
            return _say_too_large(first)
        if _out_of_files(e):  # torch's loader: "Too many open files. Communication with the workers is no longer ..."
            return _say_out_of_files(first.split(".")[0])
        if any(gone in first for gone in _PEER_GONE):
            # Every surviving rank of a run meets this when one rank dies: N-1 tracebacks of the collective hid the
            # one error that says why.
            echo(f"error: another rank of this run stopped ({first}); its own error, or torchrun's summary, says "
                 "why", file=sys.stderr)
            return 1
        raise


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _say_out_of_memory(first: str) -> int:
    echo(f"error: out of memory ({first}); use a smaller batch, fewer frames or a lower resolution", file=sys.stderr)
    return 1


def _too_large(e: BaseException) -> bool:
    """A size or count beyond the machine's integers (a typo's extra digits: `model.resolution=99999999992`,
    `bench.encoder --frames 99999999999999999999`, `data synth --fps 99999999999`): an OverflowError, or torch's
    TypeError / RuntimeError for a size past int64, where a smaller huge value is out of memory."""
    text = str(e)
    return (isinstance(e, OverflowError) or (isinstance(e, TypeError) and "Overflow when unpacking long" in text)
            or (isinstance(e, RuntimeError) and text.startswith("Storage size calculation overflowed")))


def _say_too_large(first: str) -> int:
    """Exit status 2, as other bad input: the value asked for, not the machine, is the cause."""
    echo(f"error: a size or count is too large ({first}); check the numbers given (frames, resolution, batch, model "
         "sizes, frame rate) for extra digits", file=sys.stderr)
    return 2


def _out_of_files(e: BaseException) -> bool:
    """The process or the system ran out of file descriptors (EMFILE, ENFILE): an OSError, or torch's DataLoader
    RuntimeError when a batch's shared-memory handles no longer fit."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.EMFILE, errno.ENFILE)
    return isinstance(e, RuntimeError) and str(e).startswith("Too many open files")


def _say_out_of_files(what: str) -> int:
    """One line for a limit of the environment, not of the input: `[Errno 24] Too many open files` named no fix,
    and torch's RuntimeError came with a traceback. Exit status 1, as running out of memory."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    echo(f"error: out of file descriptors ({what}; the open-files limit, `ulimit -n`, is {soft}); raise it "
         "(`ulimit -n 4096`) or use fewer decoding workers (--workers, data.workers)", file=sys.stderr)
    return 1


def _print_any_file_name() -> None:
    """stdout writes a file name that is not UTF-8 (a byte Python reads as a lone surrogate, "caf\\udce9") escaped,
    as stderr does: under a UTF-8 locale stdout's errors are strict, and a line naming such a file (`data index`'s
    summary, a run's "checkpoint: ..." lines) failed the command after its work was done, or a resume before it
    began. Python's own choice is kept where it is not strict (surrogateescape under the C locale)."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


# 128 + SIGPIPE: the shell's status for a command whose output's reader went away (`... | head -1`).
_SIGPIPE_STATUS = 141


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone; then it is pointed at /dev/null, so that Python's flush at
    exit does not print "Exception ignored ... BrokenPipeError". A BrokenPipeError of anything else (a socket of a
    collective, a decoder's pipe) is not this and keeps its message."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(event & select.POLLERR for _, event in poller.poll(0))  # Linux: a pipe with no reader left
    except (AttributeError, OSError, ValueError):  # no stdout, or not a real file (a test's capture)
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return gone


# How a collective fails on the ranks left when another rank's process has died: gloo's transport, NCCL's.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


# The console scripts of the training entry points (pyproject.toml [project.scripts]).
SCRIPTS = {"train.stage1": "videoprism-stage1", "train.stage2": "videoprism-stage2"}


def command_name(module: str) -> str:
    """How to start entry point `module` (e.g. "train.stage1") the way this process was started, for usage lines
    and the commands an error or a stop line advises: `python -m train.stage1` from the repository, `python -m
    videoprism.train.stage1` or the console script (`videoprism-stage1`) installed, where `train.*` does not
    import (train.pipeline's stop line named `python -m train.stage1` there); `python -m <module>` when called
    in-process."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name in (module, f"videoprism.{module}"):
        return f"python -m {spec.name}"
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script.startswith("videoprism"):  # a console script: installed
        return SCRIPTS.get(module, f"python -m videoprism.{module}")
    if spec is not None and spec.name.startswith("videoprism."):
        return f"python -m videoprism.{module}"
    return f"python -m {module}"


DEFAULT_MODEL = "videoprism_public_v1_base"
DEFAULT_LVT_MODEL = "videoprism_lvt_public_v1_base"  # of the commands that need a text tower


def parse_overrides(items: list[str]) -> dict:
    """["model_dim=32", "pos_emb_shape=(4,4,4)"] -> {"model_dim": 32, "pos_emb_shape": (4, 4, 4)}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {shown(item)}: expected KEY=VALUE, e.g. --set attention_backend=flex")
        out[key] = _config_literal(value)
    return out


def _config_literal(value: str):
    """The Python literal `value` spells when JSON can hold it (numbers, True/False, None, strings, lists, tuples),
    else `value` as the string given (a bare word such as sdpa). A set (`{768}`), bytes or a complex number stays
    text, which the checks name: as a value it reached the comparison with a .safetensors' saved config, a
    TypeError there."""
    try:
        parsed = ast.literal_eval(value)
        json.dumps(parsed)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return value
    return parsed


def _build(name: str | None, checkpoint: str | None, overrides: dict, *, default: str,
           device: str = "cpu"):
    """-> (model in eval mode, what it was built from: the .safetensors path or the official name). `name`: --model;
    `default`: the command's official model without it (our .safetensors need none)."""
    import videoprism as vp

    if is_safetensors(checkpoint):
        # Our files carry their config: a trained tiny model (e.g. the demo's) loads without
        # repeating every size with --set.
        if name is not None:
            echo(f"warning: --model {name} ignored: {checkpoint} carries its own config", file=sys.stderr)
        return vp.model_from_safetensors(checkpoint, **overrides).to(device).eval(), checkpoint
    name = name or default
    if checkpoint is None:
        model = vp.from_official(name, **overrides)  # an unknown name fails before the warning
        echo(f"warning: no --checkpoint given: {name} has random weights (use an official .npz or our "
             f".safetensors for real features)", file=sys.stderr)
    else:
        model = vp.load_checkpoint(checkpoint, vp.from_official(name, device="meta", **overrides))
    return model.to(device).eval(), name


def resolve_device(name: str | None) -> str:
    """--device: the name given (checked), else cuda when a GPU is visible, else cpu."""
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, meta: the kernels and the data path run on these two
        raise ValueError(f"--device {device}: VideoPrism-fast runs on cpu or cuda; use --device cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return device


def check_clip_size(args) -> None:
    """--num-frames / --resolution are positive when given (before any slow work)."""
    for flag, value in (("--num-frames", args.num_frames), ("--resolution", args.resolution)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer (leave it out for the model's own)")


def load_model(args, device: str):
    """The model of the shared model options (`add_model_args`) in eval mode on `device` -> (model, what it
    was built from, frames, resolution). A classifier comes back as its encoder: its forward gives class
    logits, not features."""
    import videoprism as vp

    overrides = parse_overrides(args.set)
    if args.attention_backend:
        from videoprism.ops.attention import BACKENDS

        if args.attention_backend not in BACKENDS:
            raise ValueError(f"--attention-backend {args.attention_backend}: choose one of {', '.join(BACKENDS)}")
        overrides["attention_backend"] = args.attention_backend
    model, source = _build(args.model, args.checkpoint, overrides, default=args.default_model, device=device)
    if isinstance(model, vp.FactorizedVideoClassifier):
        model = model.encoder
    cfg = model.config
    # Default: the clip size a training export records (a stage-2 student keeps its teacher's position grid, and
    # trains on its own clips), else the position grid's.
    from videoprism.checkpoint import safetensors_clip

    trained = safetensors_clip(args.checkpoint) if is_safetensors(args.checkpoint) else {}
    num_frames = args.num_frames if args.num_frames is not None else trained.get("num_frames", cfg.pos_emb_shape[0])
    resolution = args.resolution if args.resolution is not None else trained.get(
        "resolution", cfg.patch_size * cfg.pos_emb_shape[1])
    if resolution % cfg.patch_size:
        raise ValueError(f"--resolution {resolution}: must be a multiple of the patch size {cfg.patch_size}")
    return model, source, num_frames, resolution


def cmd_embed(args) -> int:
    import json
    import tempfile

    import videoprism as vp
    from videoprism.data import BadVideoError
    from videoprism.data.device import to_device
    from videoprism.data.cores import usable_cores
    from videoprism.data.loader import build_loader
    from videoprism.data.manifest import resolve
    from videoprism.progress import progress_bar

    ext = os.path.splitext(args.out)[1]
    if ext not in (".npy", ".safetensors"):
        raise ValueError(f"--out {args.out}: must end in .npy or .safetensors")
    check_clip_size(args)
    for flag, value, lo in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value is not None and value < lo:
            raise ValueError(f"{flag} {value}: must be >= {lo}")
    check_out_file(args.out, f"--out {args.out}")
    check_not_an_input(args.out, f"--out {args.out}", [("--checkpoint", args.checkpoint),
                                                        *(("video", v) for v in args.videos)])
    device = resolve_device(args.device)
    missing = [v for v in args.videos if not os.path.isfile(v)]
    if missing and not args.skip_bad:  # now, not after the model is built and the other clips embedded
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        what = "a folder, not a video file" if os.path.isdir(missing[0]) else "no such file"
        raise ValueError(f"{missing[0]}: {what}{more}; fix the path, or pass --skip-bad to embed the others")
    model, source, num_frames, resolution = load_model(args, device)
    is_clip = isinstance(model, vp.FactorizedVideoCLIP)
    if is_clip and args.pool != "none":
        raise ValueError(f"--pool {args.pool}: {source} is a video-text model, whose video embedding is already "
                         "pooled (its attention pooler); --pool applies to an encoder's token embeddings")
    # The clips stream through the evaluation loader (decoding workers, batches), as `eval` reads a manifest: the
    # videos become a temporary video-only manifest, in the order given; rejects name a video as it was given.
    # Joined, not abspath'd: abspath drops a '..' as text, and "data/../clips/c.mp4" through a symlinked data/ named
    # another, missing file; the manifest's reader resolves it as the kernel does (resolve), and names it so.
    given = {resolve(os.getcwd(), v): v for v in args.videos}
    workers = args.workers if args.workers is not None else (0 if len(args.videos) == 1 else
                                                              min(8, usable_cores()))

    rows: dict[int, torch.Tensor] = {}
    skipped: list[str] = []

    def reported(rejects) -> None:
        for name, reason in rejects:
            name = given.get(name, name)
            if not args.skip_bad:
                # One line and exit status 2 from run_command, with the ways on: a clip shorter than the
                # model's frames (a short clip, an image) embeds with fewer frames.
                fix = "pass --skip-bad to embed the others"
                if reason.startswith("too few frames"):
                    fix = f"embed it with fewer frames (--num-frames, now {num_frames}), or {fix}"
                raise BadVideoError(name, f"{reason}; {fix}")
            skipped.append(f"{name}: {reason}")

    dev = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="videoprism-embed-") as tmp:
        manifest = os.path.join(tmp, "videos.jsonl")
        with open(manifest, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"path": os.path.join(os.getcwd(), v)}) + "\n" for v in args.videos)
        loader = build_loader(manifest, num_frames=num_frames, resolution=resolution, batch_size=args.batch_size,
                              train=False, tokenizer=None, device=dev, num_workers=workers, max_bad_share=1.0,
                              backend=args.decoder)
        # tqdm's own rate (unit="clip") is the clips/s of the bar; smoothing=0 makes it the average since the start.
        with progress_bar(total=len(args.videos), unit="clip", desc="embed", disable=args.quiet,
                          smoothing=0) as bar, torch.no_grad():
            for batch in loader:
                rejects = loader.drain_rejects()
                reported(rejects)
                video = to_device(batch["video"], dev)
                if is_clip:
                    emb, _, _ = model(video)
                else:
                    emb, _ = model(video)
                    if args.pool == "mean":
                        emb = emb.mean(dim=1)
                rows.update(zip(batch["index"].tolist(), emb.float().cpu()))
                bar.update(len(rejects) + video.shape[0])
            rejects = loader.drain_rejects()
            reported(rejects)
            bar.update(len(rejects))
    for s in skipped:
        echo(f"skipped: {s}", file=sys.stderr)
    if not rows:
        raise ValueError("no video could be decoded (each is reported above as skipped)")
    order = sorted(rows)
    out = torch.stack([rows[i] for i in order])
    names = [args.videos[i] for i in order]
    listing_note = ""
    if ext == ".npy":
        # The rows no longer follow the arguments when a video was skipped, and a .npy holds no names: a listing.
        listing = _save_rows(args.out, out.numpy(), names if skipped else None)
        listing_note = f"; row i is line i of {listing}" if listing else ""
    else:
        from videoprism.checkpoint import write_safetensors

        # The metadata is UTF-8 JSON: a name that is not UTF-8 is escaped as the command's messages print it.
        videos = "\n".join(listed(n).encode("utf-8", "backslashreplace").decode() for n in names)
        write_safetensors({"embeddings": out.contiguous()}, args.out, {"videos": videos, "model": source})
    echo(f"wrote {args.out}: {tuple(out.shape)} ({len(names)} clip(s), {len(skipped)} skipped, "
         f"{num_frames} frames at {resolution}x{resolution}, {source}){listing_note}")
    return 0


def _save_rows(path: str, rows: np.ndarray, names: list[str] | None) -> str | None:
    """`rows` as the .npy `path` and, given `names`, the listing of their videos beside it (F.videos.txt, a line a
    row); returns the listing's path (None: without names, an earlier run's listing, which would describe other
    rows, is removed). Each is written whole or not at all (a full disk changes neither), in an order that never
    leaves a listing beside rows it does not describe: the old listing goes once both new files are written, then
    the .npy is replaced, then the listing. A kill between those renames leaves a .npy without its listing, whose
    rows are then fewer than the videos given."""
    listing = os.path.splitext(path)[0] + ".videos.txt"
    with contextlib.ExitStack() as later:  # the listing, replaced after the .npy
        if names is not None:
            # surrogateescape: a name that is not UTF-8 is its file's bytes (strict, the listing stopped the command)
            fh = later.enter_context(atomic_file(listing, "w", encoding="utf-8", errors="surrogateescape"))
            fh.write("".join(f"{listed(n)}\n" for n in names))  # a newline in a name: still one line a row
        save_npy(path, rows, before=lambda: _remove(listing))
    return listing if names is not None else None


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def save_npy(path: str, array: np.ndarray, *, before=None) -> None:
    """`np.save(path, array)` whole or not at all (np.save writes in place: a kill or a full disk left a cut file
    under the name, the previous one lost). `before`: called once the new file is written, before it replaces the
    old one."""
    with atomic_file(path, "wb") as fh:
        np.save(fh, array)
        if before is not None:
            before()


def load_tokenizer(path: str, vocabulary: int):
    """The SentencePiece model at `path`, whose ids must fit the model's text embedding (`vocabulary` rows)."""
    from videoprism.data.text import Tokenizer

    tok = Tokenizer(path)
    if tok.vocab_size > vocabulary:
        raise ValueError(f"--tokenizer {path}: {tok.vocab_size} pieces, but the model's text embedding has "
                         f"{vocabulary} rows; pass the tokenizer the checkpoint was trained with")
    return tok


def cmd_embed_text(args) -> int:
    import videoprism as vp
    from videoprism.train.zeroshot import text_embeddings

    ext = os.path.splitext(args.out)[1]
    if ext not in (".npy", ".safetensors"):
        raise ValueError(f"--out {args.out}: must end in .npy or .safetensors")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    texts = list(args.texts)
    if args.texts_file is not None:
        # Split at newlines only, as a file's lines iterate (str.splitlines also splits at \f, \x1c, U+2028).
        text = read_text(args.texts_file, "--texts-file", "a text file, one text a line")
        texts += [line.rstrip("\n") for line in io.StringIO(text)]
    if not texts:
        raise ValueError("no text to embed; give texts as arguments or --texts-file FILE (one a line)")
    for i, t in enumerate(texts):
        if not t.strip():
            where = f"line {i - len(args.texts) + 1} of {args.texts_file}" if i >= len(args.texts) else f"text {i + 1}"
            raise ValueError(f"{where} is empty; every text needs words (rows follow the texts, so none is dropped)")
    check_out_file(args.out, f"--out {args.out}")
    check_not_an_input(args.out, f"--out {args.out}", [("--checkpoint", args.checkpoint)])
    if not os.path.isfile(args.tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer}: no such file; pass the text tower's SentencePiece .model "
                         "(the official LvT models: c4_en; a stage-1 run: its data.tokenizer)")
    device = resolve_device(args.device)
    model, source = _build(args.model, args.checkpoint, parse_overrides(args.set), default=DEFAULT_LVT_MODEL,
                           device=device)
    if not isinstance(model, vp.FactorizedVideoCLIP):
        raise ValueError(f"{source}: a {type(model).__name__} has no text tower; embed-text needs a video-text (LvT) "
                         "model, e.g. videoprism_lvt_public_v1_base or a stage-1 run's model.safetensors")
    tok = load_tokenizer(args.tokenizer, model.config.vocabulary_size)
    emb = text_embeddings(model, tok, texts, device=device, batch_size=args.batch_size, progress=not args.quiet)
    if ext == ".npy":
        save_npy(args.out, emb.numpy())
    else:
        from videoprism.checkpoint import write_safetensors

        write_safetensors({"embeddings": emb.contiguous()}, args.out, {"texts": "\n".join(map(listed, texts)),
                                                                      "model": source})
    echo(f"wrote {args.out}: {tuple(emb.shape)} L2-normalised text embeddings, row i = text i ({source})")
    return 0


def cmd_convert(args) -> int:
    import videoprism as vp

    if not is_safetensors(args.out):
        raise ValueError(f"--out {args.out}: must end in .safetensors (load_checkpoint picks the format by it)")
    check_out_file(args.out, f"--out {args.out}")
    check_not_an_input(args.out, f"--out {args.out}", [("checkpoint", args.checkpoint)])
    if is_safetensors(args.checkpoint):
        raise ValueError(f"{args.checkpoint}: is already our .safetensors format (convert reads an official Flax "
                         ".npz); pass it to embed/eval as --checkpoint as it is")
    overrides = parse_overrides(args.set)
    if args.num_classes:
        overrides["num_classes"] = args.num_classes
    model = vp.load_flax_checkpoint(args.checkpoint, vp.from_official(args.model, device="meta", **overrides))
    vp.save_safetensors(model, args.out)
    n = sum(p.numel() for p in model.parameters())
    echo(f"wrote {args.out}: {type(model).__name__} {args.model}, {n / 1e6:.1f}M parameters")
    return 0


def cmd_export(args) -> int:
    from videoprism.train.export import export_checkpoint

    if args.out is not None:
        if not is_safetensors(args.out):
            raise ValueError(f"--out {args.out}: must end in .safetensors")
        check_out_file(args.out, f"--out {args.out}")
    out = export_checkpoint(args.checkpoint, args.out)
    echo(f"wrote {out}")
    return 0


def add_model_args(p: argparse.ArgumentParser, names: str, default: str = DEFAULT_MODEL) -> None:
    """The options that pick a model and its input (embed, eval): `load_model` reads them. `default`: the official
    model without --model (a video-text one for the commands that need a text tower)."""
    p.add_argument("--model", help=f"official model name (default {default}; not needed with our .safetensors, "
                                   f"which carry their config): {names}")
    p.set_defaults(default_model=default)
    p.add_argument("--checkpoint", help="weights: an official Flax .npz (with --model) or our .safetensors, e.g. a "
                                        "training run's model.safetensors (random weights if omitted)")
    p.add_argument("--num-frames", type=int, help="frames per clip (default: what a training export was trained on, "
                                                  "else the model's position grid: 16 for base)")
    p.add_argument("--resolution", type=int, help="square frame size in pixels (default: as --num-frames: the "
                                                  "training's, else the model's, 288)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--attention-backend", help="reference, sdpa, triton, flex, flash (default: the device's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the model (repeatable), e.g. --set model_dim=32")


def build_parser() -> argparse.ArgumentParser:
    from videoprism.config import CONFIGS

    names = ", ".join(sorted(CONFIGS))
    p = argparse.ArgumentParser(prog="videoprism", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("embed", help="embed video files with a VideoPrism model",
                       description="Decode each video, sample --num-frames frames uniformly, resize the shorter side "
                                   "and centre-crop to the model resolution, and write one embedding per video: the "
                                   "token embeddings [T*N, D] of an encoder (or their mean with --pool mean; a "
                                   "classifier checkpoint embeds with its encoder), or the L2-normalised video "
                                   "embedding [D] of an LvT model.")
    e.add_argument("videos", nargs="+", help="video files (any container/codec FFmpeg decodes)")
    add_model_args(e, names)
    e.add_argument("--pool", choices=("none", "mean"), default="none",
                   help="encoder models: 'mean' averages the tokens into one [D] vector (default: %(default)s)")
    e.add_argument("--out", default="embeddings.npy", help="output .npy or .safetensors (default: embeddings.npy)")
    e.add_argument("--skip-bad", action="store_true", help="skip undecodable files instead of stopping")
    e.add_argument("--batch-size", type=int, default=8, help="clips per forward (default: %(default)s)")
    e.add_argument("--workers", type=int, help="decoding processes, at most one per video and 4 per core "
                                               "(default: none for one video, else up to 8); a clip a worker takes "
                                               "over 120 s to decode is skipped as hung")
    e.add_argument("--decoder", choices=("auto", "pyav", "dali"), default="auto",
                   help="'auto': DALI on a GPU when installed, else PyAV; 'pyav': the frames of `eval --decoder "
                        "pyav` and of training's validation, which DALI's match to >= 40 dB PSNR, not bit for bit "
                        "(default: %(default)s)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_embed)

    t = sub.add_parser("embed-text", help="embed texts with the text tower of a video-text (LvT) model",
                       description="Tokenize each text as training's captions (SentencePiece, at most 64 tokens) and "
                                   "write its L2-normalised text embedding [D], row i for text i: with `embed`'s "
                                   "video embeddings of the same LvT model, `video @ text.T` scores text-video "
                                   "pairs (zero-shot retrieval and classification).",
                       epilog="example: videoprism embed-text 'a person drums on a bottle' 'a dog runs' --model "
                              "videoprism_lvt_public_v1_base --checkpoint lvt_base.npz --tokenizer c4_en.model "
                              "--out text.npy")
    t.add_argument("texts", nargs="*", help="texts to embed (or --texts-file)")
    t.add_argument("--texts-file", help="more texts, one a line (after the arguments' texts)")
    t.add_argument("--tokenizer", required=True, help="the text tower's SentencePiece .model (official LvT models: "
                                                      "c4_en; a training run: its data.tokenizer)")
    t.add_argument("--model", help=f"official model name (default videoprism_lvt_public_v1_base; not needed with our "
                                   f".safetensors): {names}")
    t.add_argument("--checkpoint", help="weights: an official Flax .npz (with --model) or our .safetensors, e.g. a "
                                        "stage-1 run's model.safetensors (random weights if omitted)")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the model (repeatable)")
    t.add_argument("--batch-size", type=int, default=256, help="texts per forward (default: %(default)s)")
    t.add_argument("--out", default="text_embeddings.npy", help="output .npy or .safetensors (default: %(default)s)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_embed_text)

    c = sub.add_parser("convert", help="convert an official Flax .npz checkpoint to safetensors",
                       description="Read an official checkpoint (e.g. flax_base_f16r288_repeated.npz) strictly "
                                   "into the named model and write our safetensors (weights + config).")
    c.add_argument("checkpoint", help="official .npz file")
    c.add_argument("--model", required=True, help=f"official model name ({names})")
    c.add_argument("--num-classes", type=int, help="classifier models only")
    c.add_argument("--out", required=True, help="output .safetensors")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), for checkpoints of non-standard sizes")
    c.set_defaults(func=cmd_convert)

    x = sub.add_parser("export", help="write a training checkpoint's model as safetensors",
                       description="Write the model of a training checkpoint as the safetensors file its run writes "
                                   "at the end (OUT_DIR/model.safetensors: stage 1's CLIP, stage 2's student "
                                   "encoder), for embed, eval or stage2.teacher: an intermediate checkpoint, or a "
                                   "run that stopped before its end. One process, on the CPU.")
    x.add_argument("checkpoint", help="a run's out_dir (its latest checkpoint) or one of its checkpoints/step_* "
                                      "folders")
    x.add_argument("--out", help="output .safetensors (default: RUN/model.step_XXXXXXXX.safetensors)")
    x.set_defaults(func=cmd_export)

    from videoprism.data.cli import register
    from videoprism.train.evaluate import register as register_eval

    register(sub)
    register_eval(sub, names)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
