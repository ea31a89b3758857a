"""The main job: synthetic data -> stage 1 -> stage 2 -> frozen-feature probes, on the CPU.

    python -m train.pipeline --out runs/demo

1. writes the embedded synthetic video-text data (coloured shapes moving in captioned
   directions; `--scene single` by default: one shape per clip, so clips that look alike
   differ only in direction and stage 1 has to learn motion) under OUT/data, unless the
   same data is already there;
2. stage 1 (`tiny`): video-text contrastive training, zero-shot retrieval on the
   validation split;
3. stage 2 (`tiny`): masked video modeling distilled from the stage-1 model;
4. zero-shot classification of direction, colour and shape with the stage-1 model (prompts
   in the captions' wording, the class left open: data/prompts/<label>.txt), and attentive
   probes on the frozen stage-1 and stage-2 encoders for the same labels.
Extra `key=value` arguments apply to both stages (e.g. train.steps=100).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from videoprism.cli import command_name, run_command
from videoprism.data.synth import SCENES, class_names, generate, prompt_templates
from videoprism.paths import echo, make_folder, write_json_atomic
from videoprism.train import checkpoint as ckpt, stage1, stage2
from videoprism.train.config import build_config
from videoprism.train.data import decode_all, tokenizer_for
from videoprism.train.modeling import model_from_safetensors
from videoprism.train.probe import PROBE_LR, PROBE_STEPS, check_probe_options, label_key, run_probes
from videoprism.train.zeroshot import class_embeddings, video_embeddings, zero_shot_metrics
from videoprism.train.trainer import GoOn, NonFiniteLossError

PROBE_LABELS = ["direction", "colour", "shape"]
RETRIEVAL_KEYS = ("t2v_R@1", "t2v_R@5", "t2v_R@10", "v2t_R@1", "v2t_R@5", "v2t_R@10")
PIPELINE_KEYS = ("data.train", "data.val", "train.out_dir", "stage2.teacher")
RERUN = "train.pipeline run again starts both stages over"


def _data(root: str, clips: int, frames: int, resolution: int, scene: str) -> None:
    """The synthetic data in `root`, generated unless a previous run left the same data there."""
    meta_path = os.path.join(root, "synth.json")
    want = {"num": clips, "size": resolution, "num_frames": frames, "scene": scene}
    if os.path.exists(meta_path):
        with open(meta_path) as fh:
            have = json.load(fh)
        if all(have.get(k) == v for k, v in want.items()):
            return
        shutil.rmtree(root)
    t0 = time.perf_counter()
    meta = generate(root, clips, size=resolution, num_frames=frames, scene=scene, progress=True)
    echo(f"synthetic data ({scene!r} scenes): {meta['num_train']} train + {meta['num_val']} val clips in {root} "
         f"({time.perf_counter() - t0:.0f} s)")


def _go_on(out: str, stage: int) -> GoOn:
    """What a stage's stop line (SIGTERM, SIGUSR1) names: the pipeline takes no --resume (the trainer's own advice)
    and a rerun starts both stages over; the stage's own command continues that stage alone from its checkpoint."""
    return GoOn(resume=f"{command_name(f'train.stage{stage}')} --resume {out}/stage{stage}", restart=RERUN,
                note=f" (this stage alone; {RERUN})")


def main(argv: list[str] | None = None) -> int:
    """Bad arguments, config values and data end the job with a one-line `error: ...` (exit 2)."""
    return run_command(_main, argv, errors=(NonFiniteLossError,))


def _main(argv: list[str] | None) -> int:
    prog = command_name("train.pipeline")
    p = argparse.ArgumentParser(prog=prog, description=__doc__.replace("python -m train.pipeline", prog),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder: data, stage1, stage2 (default: %(default)s)")
    p.add_argument("--clips", type=int, default=1000,
                   help="synthetic clips to generate, 10%% go to validation (default: %(default)s)")
    p.add_argument("--scene", default="single", choices=SCENES,
                   help="synthetic scenes: 'single' (one moving shape: same-looking clips differ only in direction, "
                        "so stage 1 must learn motion; the default) or 'pair' (a second, changing shape also "
                        "captioned)")
    p.add_argument("--config", default="tiny", help="config preset of both stages (default: %(default)s)")
    # The defaults' measurements: train/probe.py (PROBE_STEPS).
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS,
                   help="optimizer steps of each probe (default: %(default)s)")
    p.add_argument("--probe-lr", type=float, default=PROBE_LR,
                   help="peak learning rate of each probe, cosine decay (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="section.field=value, applied to both stages")
    args = p.parse_args(argv)
    check_probe_options(args.probe_steps, args.probe_lr, ("--probe-steps", "--probe-lr"))
    if args.clips < 2:
        raise ValueError(f"--clips must be >= 2 (the train and validation splits get one each), got {args.clips}")
    ours = [o for o in args.overrides if o.split("=", 1)[0] in PIPELINE_KEYS]
    if ours:
        raise ValueError(f"{', '.join(ours)}: the pipeline sets {', '.join(PIPELINE_KEYS)} itself (use --out; for "
                         "other data or another teacher run the stages on their own: "
                         f"{command_name('train.stage1')} / {command_name('train.stage2')})")
    t_start = time.perf_counter()

    # Both stages' configs are built (and so checked) before the data and stage 1 take minutes.
    root = os.path.join(args.out, "data")
    data = [f"data.train={root}/train.jsonl", f"data.val={root}/val.jsonl"]
    cfg1 = build_config(args.config, [*data, f"train.out_dir={args.out}/stage1", *args.overrides], 1, pipeline=True)
    cfg2 = build_config(args.config, [*data, f"train.out_dir={args.out}/stage2",
                                      f"stage2.teacher={args.out}/stage1/model.safetensors", *args.overrides], 2,
                        pipeline=True)
    if not cfg1.checkpoint.export:
        raise ValueError("checkpoint.export=false: stage 2 distils from stage 1's exported weights; leave it on")
    make_folder(args.out, f"--out {args.out}")
    _data(root, args.clips, cfg1.model.num_frames, cfg1.model.resolution, args.scene)
    # The demo owns --out: a second run starts both stages over (the first's checkpoints kept as *.abandoned).
    stage = 1
    try:
        res1 = stage1.run(cfg1, overwrite=True, go_on=_go_on(args.out, 1))
        stage = 2
        res2 = stage2.run(cfg2, overwrite=True, go_on=_go_on(args.out, 2))
    except KeyboardInterrupt as e:  # the trainer's advice names its own command's --auto-resume, which this lacks
        # Without a checkpoint --resume stops on "no complete checkpoint": only the pipeline starts it again.
        resume = (f"for this demo's stage {stage}: {_go_on(args.out, stage).resume}; "
                  if ckpt.latest(os.path.join(args.out, f"stage{stage}", "checkpoints")) else "")
        raise KeyboardInterrupt(f"{e} ({resume}{RERUN})") from None

    # Probes on frozen features of the same clips, eval transform.
    t0 = time.perf_counter()
    tok = tokenizer_for(cfg1)
    kw = dict(frames=cfg1.model.num_frames, resolution=cfg1.model.resolution, tokenizer=tok, dc=cfg1.data)
    (train, _), (val, _) = decode_all(cfg1.data.train, **kw), decode_all(cfg1.data.val, **kw)  # skips: reported
    backend = cfg1.model.attention_backend
    clip1 = model_from_safetensors(res1["export"], expect="FactorizedVideoCLIP", attention_backend=backend)
    enc1 = clip1.vision_encoder
    emb = video_embeddings(clip1, val["video"])
    zero_shot = {name: zero_shot_metrics(emb, class_embeddings(clip1, tok, class_names()[name], prompt_templates(name),
                                                               device="cpu"), val[label_key(name)], class_names()[name])
                 for name in PROBE_LABELS}
    enc2 = model_from_safetensors(res2["export"], expect="FactorizedEncoder", attention_backend=backend)
    probes = {name: run_probes(enc, train, val, PROBE_LABELS, steps=args.probe_steps, lr=args.probe_lr)
              for name, enc in (("stage 1", enc1), ("stage 2", enc2))}
    t_probe = time.perf_counter() - t0

    print("\n=== VideoPrism tiny demo (synthetic data, CPU) ===")
    print("stage-1 zero-shot retrieval on the validation split ({} clips): ".format(val["video"].shape[0])
          + ", ".join(f"{k} {100 * res1[k]:.1f}%" for k in RETRIEVAL_KEYS)
          + f" (chance R@1 {100 * res1['chance_R@1']:.1f}%)")
    print("stage-1 zero-shot classification (prompts in the captions' wording, the class left open): "
          + ", ".join(f"{name} {100 * zero_shot[name]['top1']:.1f}%" for name in PROBE_LABELS)
          + " (chance " + ", ".join(f"{100 * zero_shot[name]['chance']:.1f}%" for name in PROBE_LABELS) + ")")
    print(f"frozen-feature attentive probes, validation accuracy (training accuracy) ({args.probe_steps} steps "
          f"each, lr {args.probe_lr:g}, {t_probe:.0f} s):")
    print(f"  {'label':<10} {'chance':>7} {'stage 1':>14} {'stage 2':>14}")
    for name in PROBE_LABELS:
        cells = [f"{100 * probes[s][name]['accuracy']:5.1f}% ({100 * probes[s][name]['train_accuracy']:3.0f}%)"
                 for s in ("stage 1", "stage 2")]
        print(f"  {name:<10} {100 * probes['stage 1'][name]['chance']:>6.1f}% {cells[0]:>14} {cells[1]:>14}")
    for stage, res in (("stage 1", res1), ("stage 2", res2)):
        echo(f"{stage}: checkpoint {res['checkpoint']}, weights {res['export']}, "
             f"curves {res['plot'] or 'not drawn (see above)'}")
    total = time.perf_counter() - t_start
    # What the summary printed, for scripts: every number above with its chance level, and the paths.
    results = os.path.join(args.out, "results.json")
    write_json_atomic(results, {
        "validation_clips": int(val["video"].shape[0]),
        "retrieval": {k: res1[k] for k in (*RETRIEVAL_KEYS, "chance_R@1", "captions")},
        "zero_shot": {name: {k: v for k, v in zero_shot[name].items() if k != "per_class"} for name in PROBE_LABELS},
        "probes": {s.replace(" ", ""): probes[s] for s in probes},
        "runs": {s.replace(" ", ""): {k: res[k] for k in ("checkpoint", "export", "plot")}
                 for s, res in (("stage 1", res1), ("stage 2", res2))},
        "probe_steps": args.probe_steps, "probe_lr": args.probe_lr, "probe_s": round(t_probe, 1),
        "total_s": round(total, 1)})
    echo(f"results: {results}")
    print(f"total time {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
