"""`videoprism data ...` sub-commands: `index` (probe a dataset, write a clean manifest), `pack` (a manifest's samples
in one file every process maps), `tokenizer` (a SentencePiece model of a dataset's captions) and `synth` (make
data).

`register(subparsers)` adds them to the top-level `videoprism` parser (videoprism/cli.py calls it).
"""
from __future__ import annotations

import argparse
import sys

from ..paths import LONGEST_PATH, echo, shortened


def _cmd_index(args) -> int:
    from .index import index_dataset

    # Bad input raises: `videoprism` runs every command through cli.run_command (one line, or the
    # traceback with VIDEOPRISM_TRACEBACK=1).
    r = index_dataset(args.source if len(args.source) > 1 else args.source[0], args.out,
                      rejects_path=args.rejects, workers=args.workers, min_frames=args.min_frames, full=args.full,
                      captions=args.require_captions, progress=not args.quiet)
    packed = f" (packed: {r['pack']})" if r["pack"] else ""
    video_only = (f" ({r['video_only']} of them video-only, without a caption: stage 1 and retrieval skip those)"
                  if r["video_only"] else "")
    echo(f"{r['kept']} of {r['total']} samples kept -> {r['out']}{packed}{video_only}; {r['rejected']} rejected -> "
         f"{r['rejects']}")
    if r["total"] == 0:
        echo(f"error: {_sources(args)} holds no sample (an empty manifest or shard set)", file=sys.stderr)
        return 2
    if r["kept"] == 0:
        echo(f"error: no usable sample in {_sources(args)}; the reasons are in {r['rejects']}", file=sys.stderr)
        return 2
    return 0


def _sources(args) -> str:
    """The manifest or shards given, for a message: `shards/*.tar` of 10^5 shards made a line of every path."""
    return shortened(" ".join(args.source), LONGEST_PATH)


def _cmd_pack(args) -> int:
    from .manifest import is_shard
    from .pack import write_pack

    for manifest in args.manifest:
        if is_shard(manifest):  # shards are packed as the clean manifest of their members
            raise ValueError(f"{manifest} is a WebDataset shard; `videoprism data index SHARDS --out CLEAN.jsonl` "
                             "writes and packs a manifest of its members")
        r = write_pack(manifest, progress=not args.quiet)
        echo(f"packed {r['samples']} samples ({r['rejected']} rejected lines kept for the reports) -> {r['pack']}")
    return 0


def _cmd_tokenizer(args) -> int:
    from ..paths import check_not_an_input, check_out_file
    from .manifest import read_source
    from .text import Tokenizer, train_spm

    check_out_file(args.out, f"--out {args.out}", "a .model file path")
    check_not_an_input(args.out, f"--out {args.out}", [("source", s) for s in args.source])
    source = args.source if len(args.source) > 1 else args.source[0]
    samples, rejects = read_source(source, max_bad_share=1.0, captions=False)
    captions = [s.caption for s in samples if s.caption is not None]
    if not captions:
        raise ValueError(f"{_sources(args)} holds no caption to train a tokenizer on")
    train_spm(captions, args.out, vocab_size=args.vocab_size)
    pieces = Tokenizer(args.out).vocab_size
    echo(f"wrote {args.out}: {pieces} pieces from {len(captions)} captions ({len(rejects)} bad lines skipped); "
         f"data.tokenizer={args.out} tokenizes them for stage 1")
    return 0


def _cmd_synth(args) -> int:
    from ..paths import make_folder
    from .synth import generate

    make_folder(args.out, f"--out {args.out}")
    meta = generate(args.out, args.num, seed=args.seed, codec=args.codec, size=args.size,
                    num_frames=args.frames, fps=args.fps, scene=args.scene, workers=args.workers,
                    progress=not args.quiet)
    echo(f"wrote {meta['num']} {args.codec} clips ({args.scene!r} scenes) to {args.out}: "
         f"train.jsonl ({meta['num_train']}), val.jsonl ({meta['num_val']}), spm.model, prompts/, synth.json")
    return 0


def _at_least(lo: int, *, even: bool = False):
    """argparse `type` of an int >= `lo` (and even): checked before the command makes its --out folder."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if n < lo or (even and n % 2):
            raise argparse.ArgumentTypeError(f"must be {'an even int ' if even else ''}>= {lo}, got {n}")
        return n

    return parse


_positive = _at_least(1)


def register(subparsers) -> None:
    """Add the `data` command (with `index`, `pack` and `synth`) to the `videoprism` sub-parsers."""
    # Light: synth imports PyAV only when it encodes.
    from .synth import DEFAULT_SCENE, SCENES

    data = subparsers.add_parser("data", help="data tools: index a dataset, pack a manifest, generate synthetic data",
                                 description="Data tools for the video-text loader.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{index,validate,pack,tokenizer,synth}")

    p = sub.add_parser("index", aliases=["validate"],
                       help="probe every file, write a clean manifest and a rejects report (alias: validate)",
                       description="Probe every video (or image: a one-frame video) of a JSONL manifest or of "
                                   "WebDataset .tar shards in parallel (codec, frames, fps, size, duration; first "
                                   "frame and last GOP decoded) and write "
                                   "a clean manifest with those fields plus a rejects report (one JSON line per bad "
                                   "file or manifest line: path and reason). Train on the clean manifest. Results "
                                   "are journaled as they come to OUT.journal: the same command, run again after "
                                   "an interruption (Ctrl-C, SIGTERM, a killed or preempted node), probes only the "
                                   "files not done yet (a journal of other sources or options is started over); it is "
                                   "removed once the clean manifest is written and packed.")
    p.add_argument("source", nargs="+", help="a .jsonl manifest, or one or more .tar shards")
    p.add_argument("--out", required=True, help="clean manifest to write (.jsonl), packed to OUT.pack as `data pack` "
                                                "does; paths are made relative to it; OUT.journal holds the results "
                                                "while it runs")
    p.add_argument("--rejects", default=None, help="rejects report (default: OUT with .rejects.jsonl)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="probe processes, at most one per file (default: one per core this job may use)")
    p.add_argument("--min-frames", type=_positive, default=1,
                   help="reject clips (or windows) with fewer frames, e.g. the frames per training clip (default: 1)")
    p.add_argument("--full", action="store_true", help="decode every frame instead of the first and the last GOP")
    p.add_argument("--require-captions", action="store_true",
                   help="reject lines without a caption (video-only lines are kept by default: stage 2 and probes "
                        "read them; a stage-1 manifest without them reads from its pack)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("pack", help="write a manifest's samples to MANIFEST.pack, which loaders map instead of "
                                    "parsing the JSON",
                       description="Read a JSONL manifest once and write its samples (and its rejected lines) to "
                                   "MANIFEST.pack beside it. Every loader of the manifest (each rank, each "
                                   "DataLoader worker, `videoprism eval`) then maps that file instead of parsing "
                                   "and validating every line: no startup time, one copy in memory per machine. "
                                   "A pack is used only while the manifest is unchanged (the same file, or a copy "
                                   "of the same content, in the same folder); pack again after editing it. "
                                   "`data index` packs the clean manifest it writes.")
    p.add_argument("manifest", nargs="+", help="one or more .jsonl manifests")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser("tokenizer", help="train a SentencePiece model on a dataset's captions (data.tokenizer)",
                       description="Train a SentencePiece BPE model on the captions of a JSONL manifest or of "
                                   "WebDataset .tar shards, with the ids the text encoder expects (pad 0, eos 1, "
                                   "unk 2, as the official c4_en model's), for stage 1 of a model trained from "
                                   "scratch (data.tokenizer; official weights come with their own tokenizer, "
                                   "c4_en). Lines without a caption are left out.")
    p.add_argument("source", nargs="+", help="a .jsonl manifest, or one or more .tar shards")
    p.add_argument("--out", required=True, help="the model to write (.model)")
    # At least the three special pieces (pad, eos, unk): below, SentencePiece failed with an internal error.
    p.add_argument("--vocab-size", type=_at_least(3), default=8000,
                   help="pieces at most, >= 3; fewer when the captions hold fewer (default: %(default)s; the official "
                        "c4_en has 32000)")
    p.set_defaults(func=_cmd_tokenizer)

    p = sub.add_parser("synth", help="write synthetic video-text clips, manifests and a SentencePiece model",
                       description="Write real encoded clips of a coloured shape moving in a captioned direction, "
                                   "alone ('a red circle moves left', --scene single) or with a second shape that "
                                   "grows, shrinks or stays still ('a red circle moves left while a blue square "
                                   "grows', --scene pair), train.jsonl/val.jsonl "
                                   "(labels: colour, shape, direction), spm.model trained on the captions, "
                                   "prompts/<label>.txt (zero-shot prompt templates for `videoprism eval zeroshot`) "
                                   "and synth.json (the class names). Deterministic for a seed.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=_at_least(2), required=True,
                   help="number of clips, at least 2 (1 in 10 goes to val.jsonl; the last one when fewer than 10)")
    p.add_argument("--seed", type=_at_least(0), default=0, help="random seed >= 0: same seed, same bytes (default: 0)")
    p.add_argument("--codec", choices=["vp9", "h264"], default="vp9", help="VP9 in WebM or H.264 in MP4 (default: vp9)")
    p.add_argument("--size", type=_at_least(16, even=True), default=96,
                   help="frame width and height in pixels, even, >= 16 (default: 96)")
    p.add_argument("--frames", type=_positive, default=16, help="frames per clip (default: 16)")
    p.add_argument("--fps", type=_positive, default=8, help="frame rate (default: 8)")
    p.add_argument("--scene", choices=SCENES, default=DEFAULT_SCENE,
                   help="'single': one moving shape, so same-looking clips differ only in direction (the demo's "
                        "scenes); 'pair': a second, growing, shrinking or still shape, also captioned "
                        "(default: %(default)s)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="encoding processes, at most one per clip (default: one per core this job may use)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)
