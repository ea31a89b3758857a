"""`videoprism eval`: evaluate a trained or official model on manifests, outside a training run.

    videoprism eval retrieval VAL.jsonl --checkpoint RUN/model.safetensors [--tokenizer spm.model]
    videoprism eval probe TRAIN.jsonl VAL.jsonl --checkpoint X [--labels direction,colour]
    videoprism eval zeroshot VAL.jsonl --checkpoint X --label direction --classes left,right,up,down

* `retrieval`: zero-shot text->video and video->text R@1/5/10 of a video-text (LvT) model, the protocol of
  training's validation (train/retrieval.py: a hit is an item with the query's caption).
* `zeroshot`: zero-shot classification of a video-text (LvT) model (train/zeroshot.py): each class a text prompt
  (`--template`, the class name in its `{}`), a clip's class the prompt closest to its video embedding; top-1,
  top-5 and mean per-class accuracy against the manifest's labels.
* `probe`: frozen-feature attentive probes (train/probe.py, as the demo's), one per label, on an encoder's tokens:
  a stage-2 export, an official or our encoder or classifier, or an LvT model's video tower.

Clips stream through the loader's evaluation transform (uniform frames, shorter side resized, centre crop;
`--decoder`: DALI on a GPU when installed, else PyAV) in batches on `--device`, under bf16 autocast on a GPU as
training's steps and validation run by default (`--precision`, as train.precision). Bad files are skipped and
reported as in training; more than `--max-bad-share` of them stops the command. The probe keeps every clip's tokens
on the host, in bfloat16 by default: clips x T*N x D x 2 bytes (base at 16 frames: 6.3 MB a clip, 1000 clips
6.3 GB, 10k clips 63 GB); it stops before encoding when TRAIN's and VAL's clips would take more than the memory
available.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

from videoprism.cli import (DEFAULT_LVT_MODEL, DEFAULT_MODEL, add_model_args, check_clip_size, load_model,
                            resolve_device)
from videoprism.paths import (LONGEST_PATH, check_not_an_input, check_out_file, echo, read_text, shortened, shown,
                              shown_each, write_json_atomic)
from videoprism.data.cores import available_memory, usable_cores

FEATURE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def encode_manifest(model, manifest: str, *, frames: int, resolution: int, device: str, batch_size: int,
                    workers: int, max_bad_share: float, tokenizer=None, feature_dtype=torch.bfloat16,
                    bf16: bool = False, decoder: str = "auto", progress: bool = True) -> tuple[dict, list]:
    """Every readable clip of `manifest` through `model` (no gradients) -> (host tensors in manifest order, the
    skipped (name, reason) pairs). An LvT model with a tokenizer gives "video" and "text" `[N, D]` embeddings and
    the caption fields (without a tokenizer, "video" alone); an encoder gives "tokens" `[N, T*N', D]` in
    `feature_dtype`. Label fields come along.
    `bf16`: the forward under bf16 autocast, as a training step and its validation (train.precision). `decoder`:
    the loader's backend ("auto": DALI on a GPU when installed, else PyAV).
    Each field fills one buffer sized for every clip of the manifest (skipped clips leave its tail unused): the
    features are held once, not as batches and again as their concatenation."""
    import videoprism as vp
    from videoprism.data.device import to_device
    from videoprism.data.loader import build_loader
    from videoprism.progress import progress_bar
    from videoprism.train.data import trim_text

    loader = build_loader(manifest, num_frames=frames, resolution=resolution, batch_size=batch_size, train=False,
                          tokenizer=tokenizer, device=device, num_workers=workers, max_bad_share=max_bad_share,
                          backend=decoder)
    dev = torch.device(device)
    clip = isinstance(model, vp.FactorizedVideoCLIP)
    total, n = len(loader.samples), 0
    buffers: dict[str, torch.Tensor] = {}
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    # The bar as a context: an error (too many bad clips) closes it, so the error line starts a line of its own.
    with progress_bar(total=total, unit="clip", desc=os.path.basename(manifest), disable=not progress,
                      smoothing=0) as bar, torch.no_grad(), amp:
        for batch in loader:
            video = to_device(batch["video"], dev)
            if clip and tokenizer is None:
                v, _, _ = model(video)
                out = {"video": v.float().cpu()}
            elif clip:
                ids, pads = trim_text(batch["text_ids"], batch["text_paddings"])
                v, t, _ = model(video, to_device(ids, dev), to_device(pads, dev))
                out = {"video": v.float().cpu(), "text": t.float().cpu(), "text_ids": batch["text_ids"],
                       "text_paddings": batch["text_paddings"]}
            else:
                tokens, _ = model(video)
                out = {"tokens": tokens.to("cpu", feature_dtype)}
            out.update({k: v for k, v in batch.items() if k.startswith("label")})
            b = video.shape[0]
            for k, v in out.items():
                if k not in buffers:
                    buffers[k] = torch.empty((total, *v.shape[1:]), dtype=v.dtype)
                buffers[k][n:n + b] = v
            n += b
            bar.update(b)
    rejects = loader.drain_rejects()
    for name, reason in rejects:
        echo(f"skipped {shortened(name, LONGEST_PATH)}: {shortened(reason, LONGEST_PATH)}", file=sys.stderr)
    if n == 0:
        raise ValueError(f"{manifest}: no readable clip (each is reported above as skipped)")
    return {k: v[:n] for k, v in buffers.items()}, rejects


def _tokenizer(path: str | None, manifest: str, vocabulary: int) -> tuple:
    """(the tokenizer, its path): --tokenizer, else spm.model next to the manifest (as `data synth` writes it and
    training defaults to); its ids must fit the model's text embedding."""
    from videoprism.cli import load_tokenizer

    if path is None:
        path = os.path.join(os.path.dirname(os.path.abspath(manifest)), "spm.model")
        if not os.path.isfile(path):
            raise ValueError(f"--tokenizer not given and {path} (the default: spm.model next to the manifest) does "
                             "not exist; pass --tokenizer PATH.model (the captions' SentencePiece model the "
                             "checkpoint was trained with)")
    return load_tokenizer(path, vocabulary), path


def _labelled(manifest: str, max_bad_share: float) -> tuple:
    """(the manifest's samples, their labels named as `eval probe` and `eval zeroshot` name them: "label" for an
    int `label`, the keys of a dict one, the loader's fields "label" / "label_<key>")."""
    from videoprism.data.manifest import read_source

    # Video-only lines (no caption) are clips to these commands; bad lines are reported when encoded.
    samples, _ = read_source(manifest, max_bad_share=max_bad_share, captions=False)
    return samples, sorted({*samples.label_names, *(["label"] if samples.int_label else [])})


def _names(names: list[str], sep: str = ", ") -> str:
    """A manifest's label names for a message: a label of 1 MB, or 10^5 of them, made a line as long."""
    return shortened(sep.join(names), 200)


def _probe_labels(args) -> tuple[list[str], int]:
    """(--labels, else every label of TRAIN, each checked against both manifests: before the model loads and
    the clips are encoded, which is most of the command's time; the clips of both manifests, one manifest given
    twice counted once)."""
    read = {m: _labelled(m, args.max_bad_share) for m in dict.fromkeys((args.train, args.val))}
    clips = sum(len(samples) for samples, _ in read.values())
    have = {m: read[m][1] for m in (args.train, args.val)}
    if args.labels is not None:
        labels = list(dict.fromkeys(x.strip() for x in args.labels.split(",") if x.strip()))
        if not labels:
            raise ValueError(f"--labels {shown(args.labels)}: no label name; pass comma-separated names, e.g. "
                             f"--labels {_names(have[args.train], ',') or 'colour,shape'}")
    else:
        labels = have[args.train]
        if not labels:
            raise ValueError(f"{args.train}: no clip has a 'label'; add labels to the manifest (an int, or a dict of "
                             "ints such as {\"colour\": 2}; README, Data format)")
    both = [n for n in have[args.train] if n in have[args.val]]
    for name in labels:
        for m in (args.train, args.val):
            if name not in have[m]:
                raise ValueError(f"{m}: no clip has the label {shown(name)} (its labels: "
                                 f"{shown_each(have[m]) if have[m] else 'none'}); pass --labels with labels both "
                                 f"manifests have ({_names(both, ',') or 'none'})")
    return labels, clips


def _check_feature_memory(encoder, clips: int, frames: int, resolution: int, features: str) -> None:
    """The probe holds every clip's tokens on the host (encode_manifest): stop before encoding when they cannot fit,
    not when the host runs out of memory after most of the encoding (or swaps, and the probe's random batches crawl)."""
    cfg = encoder.config
    per_clip = frames * (resolution // cfg.patch_size) ** 2 * cfg.model_dim * FEATURE_DTYPES[features].itemsize
    need, have = clips * per_clip, available_memory()
    if have is not None and need > have:
        half = " or --features bfloat16 (half of float32's)" if features == "float32" else ""
        raise ValueError(f"the frozen tokens of the {clips} clips of TRAIN and VAL take {need / 2**30:.1f} GiB of host "
                         f"memory ({per_clip / 2**20:.2f} MiB a clip in {features}), and {have / 2**30:.1f} GiB is "
                         f"available: probe fewer clips (shorter manifests), fewer frames or a lower resolution "
                         f"(--num-frames, --resolution){half}, or run where more memory is free")


def _check(args) -> str:
    """The checks of the options and manifests before any slow work -> the device."""
    check_clip_size(args)
    for flag, value, lo in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value < lo:
            raise ValueError(f"{flag} {value}: must be >= {lo}")
    if not 0 <= args.max_bad_share <= 1:
        raise ValueError(f"--max-bad-share {args.max_bad_share}: must be a share in [0, 1]")
    if args.out is not None:
        if not args.out.endswith(".json"):
            raise ValueError(f"--out {args.out}: must end in .json")
        check_out_file(args.out, f"--out {args.out}")
        # The results would replace an input: a synth.json given as --classes-file.
        check_not_an_input(args.out, f"--out {args.out}", [
            *(("manifest", m) for m in args.manifests), ("--checkpoint", args.checkpoint),
            ("--classes-file", getattr(args, "classes_file", None)),
            ("--templates-file", getattr(args, "templates_file", None))])
    for m in args.manifests:
        if not os.path.isfile(m):
            raise ValueError(f"{m}: {'a folder, not a manifest' if os.path.isdir(m) else 'no such file'}")
    return resolve_device(args.device)


def _common(args) -> tuple:
    """Checks before slow work, then the model: -> (model, source, frames, resolution, device)."""
    device = _check(args)
    model, source, frames, resolution = load_model(args, device)
    return model, source, frames, resolution, device


def _stream_kw(args, frames: int, resolution: int, device: str) -> dict:
    from videoprism.train.config import bf16_autocast

    return dict(frames=frames, resolution=resolution, device=device, batch_size=args.batch_size,
                workers=args.workers, max_bad_share=args.max_bad_share, decoder=args.decoder,
                bf16=bf16_autocast(args.precision, torch.device(device).type), progress=not args.quiet)


def _write(args, results: dict) -> None:
    if args.out is not None:
        write_json_atomic(args.out, results)
        echo(f"wrote {args.out}")


def cmd_retrieval(args) -> int:
    import videoprism as vp
    from videoprism.train.retrieval import caption_groups, retrieval_metrics

    args.manifests = [args.manifest]
    model, source, frames, resolution, device = _common(args)
    if not isinstance(model, vp.FactorizedVideoCLIP):
        raise ValueError(f"{source}: a {type(model).__name__} has no text tower; retrieval needs a video-text (LvT) "
                         "model, e.g. a stage-1 run's model.safetensors (for an encoder: videoprism eval probe)")
    tok, tok_path = _tokenizer(args.tokenizer, args.manifest, model.config.vocabulary_size)
    kw = _stream_kw(args, frames, resolution, device)
    enc, rejects = encode_manifest(model, args.manifest, tokenizer=tok, **kw)
    metrics = retrieval_metrics(enc["video"], enc["text"], caption_groups(enc["text_ids"], enc["text_paddings"]))
    n = enc["video"].shape[0]
    echo(f"zero-shot retrieval, {n} clips of {args.manifest} ({frames} frames at {resolution}x{resolution}, "
         f"{source}; {len(rejects)} skipped):")
    for d in ("t2v", "v2t"):
        print(f"  {d}  " + "  ".join(f"R@{k} {100 * metrics[f'{d}_R@{k}']:5.1f}%" for k in (1, 5, 10)))
    print(f"  chance R@1 {100 * metrics['chance_R@1']:.1f}% ({metrics['captions']} distinct captions as tokenized, "
          f"of {n} clips)")
    _write(args, {"task": "retrieval", "model": source, "manifest": args.manifest, "tokenizer": tok_path,
                  "clips": n, "frames": frames,
                  "resolution": resolution, "precision": "bf16" if kw["bf16"] else "fp32",
                  "skipped": [list(r) for r in rejects], **metrics})
    return 0


def cmd_probe(args) -> int:
    import videoprism as vp
    from videoprism.train.probe import check_probe_options, probe_features

    check_probe_options(args.steps, args.lr, ("--steps", "--lr"))
    args.manifests = [args.train, args.val]
    device = _check(args)
    labels, clips = _probe_labels(args)
    model, source, frames, resolution = load_model(args, device)
    encoder = model.vision_encoder if isinstance(model, vp.FactorizedVideoCLIP) else model
    _check_feature_memory(encoder, clips, frames, resolution, args.features)
    kw = dict(**_stream_kw(args, frames, resolution, device), feature_dtype=FEATURE_DTYPES[args.features])
    train, train_rejects = encode_manifest(encoder, args.train, **kw)
    # One manifest for both (a quick check that the probe fits): encoded once.
    same = os.path.samefile(args.train, args.val)
    val, val_rejects = (train, []) if same else encode_manifest(encoder, args.val, **kw)
    results = probe_features(train["tokens"], train, val["tokens"], val, labels,
                             num_heads=encoder.config.num_heads, steps=args.steps, lr=args.lr, device=device)
    echo(f"frozen-feature attentive probes ({source}, {frames} frames at {resolution}x{resolution}; {args.steps} "
         f"steps each, lr {args.lr:g}; skipped: {len(train_rejects)} training, {len(val_rejects)} validation "
         "clips): validation accuracy (training accuracy)")
    print(f"  {'label':<12} {'clips':>11} {'chance':>7} {'majority':>9} {'accuracy':>16}")
    # Per label, nested: a label may be named like a top-level field (a label called "model" or "steps").
    per_label = {name: results[name] for name in labels}
    for name, r in per_label.items():
        clips = "/".join(map(str, r["clips"]))
        echo(f"  {name:<12} {clips:>11} {100 * r['chance']:6.1f}% {100 * r['majority']:8.1f}% "
             f"{100 * r['accuracy']:6.1f}% ({100 * r['train_accuracy']:5.1f}%)")
        if r["unseen"]:
            echo(f"  {'':<12} warning: validation classes {r['unseen']} have no training clip: the probe cannot "
                 "predict them")
    _write(args, {"task": "probe", "model": source, "train": args.train, "val": args.val, "frames": frames,
                  "resolution": resolution, "precision": "bf16" if kw["bf16"] else "fp32", "steps": args.steps,
                  "lr": args.lr, "labels": per_label,
                  "skipped": {"train": [list(r) for r in train_rejects], "val": [list(r) for r in val_rejects]}})
    return 0


def _zeroshot_label(args) -> tuple[str, int]:
    """--label (else the manifest's only label), checked against the manifest before the model loads -> (its name,
    its largest class id)."""
    samples, have = _labelled(args.manifest, args.max_bad_share)
    if not have:
        raise ValueError(f"{args.manifest}: no clip has a 'label'; add class ids to the manifest (an int, or a dict "
                         "of ints such as {\"direction\": 2}; README, Data format)")
    name = args.label
    if name is None:
        if len(have) > 1:
            raise ValueError(f"{args.manifest}: its clips have the labels {_names(have)}; pick one with --label")
        name = have[0]
    if name not in have:
        raise ValueError(f"{args.manifest}: no clip has the label {shown(name)} (its labels: {_names(have)}); "
                         "pass --label with one of them")
    if name == "label":
        ids = [s.label for s in samples if isinstance(s.label, int)]
    else:
        ids = [s.label[name] for s in samples if isinstance(s.label, dict) and name in s.label]
    return name, max(ids)


def _zeroshot_classes(args, label: str) -> list[str]:
    """--classes "a,b,c" or --classes-file: a .txt (one name per line) or a .json (a list; an object with a list
    per label, such as `data synth`'s synth.json, whose lists are under "classes")."""
    import json

    from videoprism.train.zeroshot import check_classes

    if (args.classes is None) == (args.classes_file is None):
        raise ValueError("give the class names with --classes a,b,c or --classes-file FILE (one of the two), in "
                         "label-id order")
    if args.classes is not None:
        return check_classes(args.classes.split(","), f"--classes {args.classes!r}")
    path = args.classes_file
    text = read_text(path, "--classes-file", "a .txt file (one class name a line) or a .json list")
    if not path.endswith(".json"):
        return check_classes([x for x in text.splitlines() if x.strip()], path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--classes-file {path}: not JSON ({e}); give a list of names, or a .txt with one a "
                         "line") from None
    if isinstance(data, dict):
        table = data.get("classes", data)
        if not isinstance(table, dict) or label not in table:
            raise ValueError(f"--classes-file {path}: no list of class names for the label {shown(label)} (a JSON "
                             "list, or an object with one list per label)")
        data = table[label]
    if not isinstance(data, list):
        raise ValueError(f"--classes-file {path}: the class names must be a JSON list of strings")
    return check_classes(data, f"{path} ({label})")


def cmd_zeroshot(args) -> int:
    import videoprism as vp
    from videoprism.train.probe import label_key
    from videoprism.train.zeroshot import (check_classes_tokenized, check_templates, class_embeddings,
                                           zero_shot_metrics)

    args.manifests = [args.manifest]
    device = _check(args)
    templates = list(args.template or [])
    if args.templates_file is not None:
        text = read_text(args.templates_file, "--templates-file", "a text file, one template a line (each with {})")
        templates += [x.strip() for x in text.splitlines() if x.strip()]
        if not templates:
            raise ValueError(f"--templates-file {args.templates_file}: no template in it (one a line, each with {{}})")
    templates = check_templates(templates or ["{}"])
    label, top = _zeroshot_label(args)
    classes = _zeroshot_classes(args, label)
    if top >= len(classes):
        raise ValueError(f"{args.manifest}: label {shown(label)} has class id {top}, but {len(classes)} class names "
                         f"were given; name every class, in id order (0..{top} at least)")
    model, source, frames, resolution = load_model(args, device)
    if not isinstance(model, vp.FactorizedVideoCLIP):
        raise ValueError(f"{source}: a {type(model).__name__} has no text tower; zero-shot classification needs a "
                         "video-text (LvT) model, e.g. a stage-1 run's model.safetensors (for an encoder: "
                         "videoprism eval probe)")
    tok, tok_path = _tokenizer(args.tokenizer, args.manifest, model.config.vocabulary_size)
    check_classes_tokenized(classes, tok)
    kw = _stream_kw(args, frames, resolution, device)
    cls = class_embeddings(model, tok, classes, templates, device=device, bf16=kw["bf16"])
    enc, rejects = encode_manifest(model, args.manifest, **kw)
    y = enc[label_key(label)]
    has = y >= 0  # clips without this label sit out
    if not has.any():
        raise ValueError(f"{args.manifest}: no readable clip has the label {shown(label)}")
    m = zero_shot_metrics(enc["video"][has], cls, y[has], classes)
    unlabelled = int((~has).sum())
    echo(f"zero-shot classification of {shown(label)}, {m['clips']} clips of {args.manifest} ({len(classes)} classes, "
         f"{len(templates)} template(s); {frames} frames at {resolution}x{resolution}, {source}; {len(rejects)} "
         "skipped" + (f", {unlabelled} without the label" if unlabelled else "") + "):")
    top5 = f"  top-5 {100 * m['top5']:5.1f}%" if "top5" in m else ""
    print(f"  top-1 {100 * m['top1']:5.1f}%{top5}  mean class accuracy {100 * m['mean_class_accuracy']:5.1f}%  "
          f"(chance {100 * m['chance']:.1f}%, majority class {100 * m['majority']:.1f}%)")
    _write(args, {"task": "zeroshot", "model": source, "manifest": args.manifest, "tokenizer": tok_path,
                  "unlabelled": unlabelled, "label": label,
                  "templates": templates, "frames": frames, "resolution": resolution,
                  "precision": "bf16" if kw["bf16"] else "fp32", "skipped": [list(r) for r in rejects], **m})
    return 0


def register(subparsers, names: str) -> None:
    """Add `eval` (with `retrieval`, `zeroshot` and `probe`) to the `videoprism` sub-parsers (`names`: the official
    models)."""
    from videoprism.train.probe import PROBE_LR, PROBE_STEPS

    ev = subparsers.add_parser("eval", help="evaluate a model on manifests: zero-shot retrieval and classification, "
                                            "attentive probes",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ev.add_subparsers(dest="eval_command", required=True)

    def common(p: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
        add_model_args(p, names, default_model)
        p.add_argument("--batch-size", type=int, default=16, help="clips per forward (default: %(default)s)")
        p.add_argument("--workers", type=int, default=min(8, usable_cores()),
                       help="decoding processes, at most one per clip and 4 per core (default: %(default)s)")
        p.add_argument("--max-bad-share", type=float, default=0.01,
                       help="stop when more than this share of the clips is unreadable (default: %(default)s)")
        p.add_argument("--out", help="also write the results (and the skipped files) to this .json")
        p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="the forward's: 'auto' is bf16 autocast on a GPU and fp32 on the CPU, as training's "
                            "train.precision and so its validation (default: %(default)s)")
        p.add_argument("--decoder", choices=("auto", "pyav", "dali"), default="auto",
                       help="'auto': DALI on a GPU when installed, else PyAV; 'pyav': the decoder of training's "
                            "validation, whose frames DALI's match to >= 40 dB PSNR, not bit for bit (default: "
                            "%(default)s)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("retrieval", help="zero-shot text<->video retrieval of a video-text (LvT) model",
                       description="Embed every clip and its caption of MANIFEST and report text->video and "
                                   "video->text recall at 1, 5 and 10 (a hit: an item whose caption equals the "
                                   "query's) with the chance level, as training's validation does.")
    r.add_argument("manifest", help="a .jsonl manifest (path, caption) or a WebDataset .tar shard")
    r.add_argument("--tokenizer", help="the captions' SentencePiece model (default: spm.model next to the manifest)")
    common(r, DEFAULT_LVT_MODEL)
    r.set_defaults(func=cmd_retrieval)

    z = sub.add_parser("zeroshot", help="zero-shot classification of a video-text (LvT) model",
                       description="Embed one text prompt per class and template (the class name in the template's "
                                   "{}; a class's embedding is the mean over its templates) and every clip of "
                                   "MANIFEST; a clip's prediction is the class closest to its video embedding. "
                                   "Reports top-1, top-5 (more than 5 classes) and mean per-class accuracy against "
                                   "the manifest's label, with the chance level and the majority class's share. "
                                   "Clips without the label sit out.",
                       epilog="example: videoprism eval zeroshot k400_val.jsonl --model videoprism_lvt_public_v1_base "
                              "--checkpoint lvt_base.npz --tokenizer c4_en.model --classes-file k400_classes.txt "
                              "--template 'a video of {}.' --template '{}'")
    z.add_argument("manifest", help="a .jsonl manifest (path, caption, label) or a WebDataset .tar shard")
    z.add_argument("--label", help="which label to classify: a key of the manifest's dict labels, or 'label' for an "
                                   "int one (default: the manifest's only label)")
    z.add_argument("--classes", help="comma-separated class names in label-id order (id 0 first)")
    z.add_argument("--classes-file", help="class names in id order: a .txt with one a line, or a .json list (or an "
                                          "object with a list per label, such as data synth's synth.json)")
    z.add_argument("--template", action="append", metavar="TEXT",
                   help="prompt template with {} for the class name (repeatable: the class embedding averages them; "
                        "default: the bare name '{}'), e.g. --template 'a video of {}.'")
    z.add_argument("--templates-file", help="more templates, one a line (added to --template's)")
    z.add_argument("--tokenizer", help="the text tower's SentencePiece model (default: spm.model next to the manifest)")
    common(z, DEFAULT_LVT_MODEL)
    z.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("probe", help="frozen-feature attentive probes for the manifest's labels",
                       description="Extract the frozen encoder's tokens of every clip of TRAIN and VAL, train one "
                                   "attentive probe (a MAP pooler and a linear layer) per label on TRAIN's and report "
                                   "its accuracy on VAL with the chance level and the majority class's share. "
                                   "Labels come from the manifests' `label` field (an int: the label 'label'; a "
                                   "dict: one label per key); clips without a label sit out its probe. Every "
                                   "clip's tokens stay on the host (in bfloat16: clips x T*N x D x 2 bytes, 6.3 MB a "
                                   "clip at base with 16 frames); it stops before encoding when they would take more "
                                   "than the memory available.")
    p.add_argument("train", help="the probes' training manifest (.jsonl with labels, or a .tar shard)")
    p.add_argument("val", help="the validation manifest")
    p.add_argument("--labels", help="comma-separated labels to probe (default: every label of TRAIN)")
    p.add_argument("--steps", type=int, default=PROBE_STEPS, help="optimizer steps of each probe (default: %(default)s)")
    p.add_argument("--lr", type=float, default=PROBE_LR, help="peak learning rate, cosine decay (default: %(default)s)")
    p.add_argument("--features", choices=sorted(FEATURE_DTYPES), default="bfloat16",
                   help="dtype of the tokens kept on the host (default: %(default)s; float32 takes twice the memory)")
    common(p)
    p.set_defaults(func=cmd_probe)
