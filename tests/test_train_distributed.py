"""Both stages through their real entry points (torchrun; a 1-process run through the main() that
`python -m train.stageN` calls, in the test's process):
2 processes (gloo, CPU) equal 1 process with the same global batch (losses within 1e-5 for
3 steps) under DDP and FSDP2, also split into accumulated micro-batches, 4 under HSDP (2 groups
of 2), a checkpoint resumes on another number of processes, the validation split sharded over 2
ranks scores as on 1, SIGKILL + --resume equals the
uninterrupted run, a preemption notice to one rank stops both at one step with a checkpoint
that --auto-resume continues from, and a killed rank restarted by torchrun (one node, or two
torchruns as two nodes) resumes.

One uninterrupted 10-step reference run per stage serves every comparison (the schedule is
constant, so its first 3 steps are a 3-step run); the stage-1 reference's export is the
stage-2 teacher."""
from __future__ import annotations

import importlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.model_dim=16", "model.num_heads=2", "model.mlp_dim=32", "model.num_spatial_layers=1",
        "model.num_temporal_layers=1", "model.num_unimodal_layers=1", "model.patch_size=4",
        "model.num_frames=4", "model.resolution=16", "data.source=random", "train.global_batch=8",
        "optim.warmup_steps=0", "optim.decay=constant", "optim.lr=1e-2", "train.log_every=1"]
STAGE2 = ["stage2.decoder_dim=16", "stage2.decoder_layers=1", "stage2.decoder_heads=2"]  # stage 1 would note them


@pytest.fixture(scope="module", autouse=True)
def children_temp_dir(tmp_path_factory):
    """torchrun makes a torchelastic_* folder in the temp folder at every launch and never removes it (36 in /tmp
    after a run of this file): the processes this file starts get a temp folder of pytest's, which pytest removes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("children_tmp")))
        yield


def command(stage: int, out: str, args, nproc: int = 1) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                     "--master-port", str(29500 + os.getpid() % 2000)]
    return [*launcher, "-m", f"train.stage{stage}", "--config", "tiny", *TINY, *STAGE2 * (stage == 2),
            f"train.out_dir={out}", *args]


def run(stage: int, out: str, *args: str, nproc: int = 1, timeout: int = 600) -> str:
    """`timeout`: seconds a launched run may take (ranks out of step hang in a collective: a test of that fails)."""
    if nproc == 1:
        return run_here(stage, out, args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(command(stage, out, args, nproc), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    # torch 2.14's deprecation of the autograd all_gather, once per rank and run: not the user's to act on
    assert "FutureWarning" not in r.stderr, r.stderr[-4000:]
    return r.stdout


def run_here(stage: int, out: str, args) -> str:
    """A 1-process run in this process, through the main() that `python -m train.stageN` calls, on one thread as
    the launched runs (OMP_NUM_THREADS=1): the same checks as a launched run without the interpreter and torch
    import each launch pays (~4 s of two cores, a dozen runs here)."""
    module = importlib.import_module(f"videoprism.train.stage{stage}")
    stdout, stderr, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(stdout), redirect_stderr(stderr):
            warnings.simplefilter("always")  # a warning this process gave once before is recorded again, as fresh
            status = module.main(command(stage, out, args)[3:])  # the arguments after `python -m train.stageN`
    finally:
        torch.set_num_threads(threads)
    assert status == 0, stdout.getvalue()[-2000:] + stderr.getvalue()[-4000:]
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future
    return stdout.getvalue()


def run_failing(cmd: list[str], logs) -> list[str]:
    """Run the torchrun command `cmd`, which must fail; each rank's stderr, in rank order. Each rank's stderr goes to
    its own file under `logs`: on the shared pipe one rank's line could land inside the other's."""
    at = cmd.index("torch.distributed.run") + 1
    cmd = [*cmd[:at], "--log-dir", str(logs), "--redirects", "2", *cmd[at:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VIDEOPRISM_TRACEBACK": ""}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    files = sorted(logs.rglob("stderr.log"), key=lambda f: int(f.parent.name))  # .../attempt_0/<rank>/stderr.log
    assert r.returncode != 0 and len(files) == int(cmd[cmd.index("--nproc-per-node") + 1]), r.stderr[-3000:]
    return [f.read_text() for f in files]


def losses(out: str) -> dict[int, float]:
    """Loss per step; a resumed run's records of a step replace the killed run's."""
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def assert_whole_run_matches(out: str, ref: str, tol: float = 1e-5, steps: int = 10) -> None:
    """The run in `out` logged the first `steps` steps of the reference run `ref` (all 10), each loss within `tol` of
    the reference's."""
    want, got = losses(ref), losses(out)
    assert sorted(got) == list(range(1, steps + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= tol, (step, got[step], want[step])


def stage_args(stage: int, refs) -> list[str]:
    return [f"stage2.teacher={refs[1]}/model.safetensors"] if stage == 2 else []


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[int, str]:
    """Uninterrupted single-process 10-step runs of both stages, checkpoints every 2 steps."""
    out = {}
    for stage in (1, 2):
        out[stage] = str(tmp_path_factory.mktemp(f"ref{stage}"))
        run(stage, out[stage], "train.steps=10", "checkpoint.interval=2", *stage_args(stage, out))
        ref = losses(out[stage])
        assert sorted(ref) == list(range(1, 11))
        assert all(ref[s] != ref[s + 1] for s in range(1, 10))  # every step moves the loss
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("stage", [1, 2])
def test_two_processes_equal_one(tmp_path, refs, stage, mode):
    run(stage, str(tmp_path), "train.steps=3", "checkpoint.export=false", f"parallel.mode={mode}",
        *stage_args(stage, refs), nproc=2)
    assert sharding(str(tmp_path)) == ({"shard": 2} if mode == "fsdp" else None)
    ref, got = losses(refs[stage]), losses(str(tmp_path))
    for step in (1, 2, 3):
        assert abs(got[step] - ref[step]) <= 1e-5, (mode, step, got[step], ref[step])


@pytest.mark.parametrize("stage, mode", [(1, "fsdp"), (2, "fsdp"), (1, "ddp")])
def test_compiled_blocks_on_two_processes_equal_one(tmp_path, refs, stage, mode):
    """train.compile (the default) with FSDP2 or DDP: each block's forward is compiled with fullgraph and FSDP2's
    hooks run outside the graph (compiling the block's whole call traced them, and stage 2's decoder layers
    failed their first forward at the hooks' dynamo.disable). The eager backend runs the same ops: the
    uncompiled 1-process losses."""
    run(stage, str(tmp_path), "train.steps=3", "checkpoint.export=false", f"parallel.mode={mode}", "train.compile=true",
        "train.compile_backend=eager", *stage_args(stage, refs), nproc=2)
    ref, got = losses(refs[stage]), losses(str(tmp_path))
    for step in (1, 2, 3):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


def test_adafactor_on_fsdp2_equals_one_process_and_reshards(tmp_path):
    """The paper's stage-1 optimizer (train/adafactor.py) on FSDP2's sharded parameters (where
    torch.optim.Adafactor fails: an in-place square of a partial norm): 2 ranks give the 1-process
    losses, and their checkpoint (row factors sharded, column factors replicated, the momentum sharded as the
    parameters) resumes on 1 process."""
    common = ["optim.name=adafactor", "optim.lr=1e-2", "optim.adafactor_momentum=0.9", "checkpoint.export=false",
              "checkpoint.interval=2"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "fsdp")
    run(1, ref, "train.steps=5", *common)
    run(1, out, "train.steps=2", *common, "parallel.mode=fsdp", nproc=2)
    assert "(written by 2 ranks, resumed on 1)" in run(1, out, "train.steps=5", *common, "parallel.mode=fsdp",
                                                      "--resume")
    want, got = losses(ref), losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5] and len(set(want.values())) == 5
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])


def sharding(out: str) -> dict | None:
    """The mesh the run's first metrics record says the parameters were sharded over."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return json.loads(f.readline())["sharding"]


@pytest.mark.parametrize("stage", [1, 2])
def test_hsdp_on_four_processes_equals_one(tmp_path, refs, stage):
    """HSDP, 2 shard groups of 2 ranks (gloo, CPU): the 1-process losses, parameters sharded over
    a (replicate 2, shard 2) mesh; stage 1 then resumes from the 2-D mesh's checkpoint exactly."""
    out = str(tmp_path)
    hsdp = ["checkpoint.export=false", "parallel.mode=hsdp", "parallel.shard_size=2", "checkpoint.interval=2",
            *stage_args(stage, refs)]
    run(stage, out, "train.steps=3", *hsdp, nproc=4)
    assert sharding(out) == {"replicate": 2, "shard": 2}
    ref, got = losses(refs[stage]), losses(out)
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    if stage == 1:
        step2 = os.path.join(out, "checkpoints", "step_00000002")
        assert "resumed from" in run(1, out, "train.steps=5", *hsdp, "--resume", step2, nproc=4)
        got = losses(out)
        assert sorted(got) == [1, 2, 3, 4, 5]
        for step in got:
            assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


@pytest.mark.parametrize("stage, before, mode_before, after, mode_after",
                         [(1, 2, "fsdp", 1, "fsdp"), (1, 1, "auto", 2, "ddp"), (2, 2, "fsdp", 1, "fsdp")])
def test_resume_on_another_number_of_ranks_continues_the_run(tmp_path, refs, stage, before, mode_before, after,
                                                             mode_after):
    """A checkpoint of FSDP2 on 2 ranks resumed on 1 process (with the same parallel.mode, which one process
    runs unwrapped), and one of 1 process on 2 DDP ranks: DCP reshards model and optimizer, the data source
    carries its global position over, and the run goes on with the uninterrupted run's losses (same global
    batches, same masks)."""
    out = str(tmp_path)
    common = ["checkpoint.export=false", "checkpoint.interval=2", *stage_args(stage, refs)]
    run(stage, out, "train.steps=2", *common, f"parallel.mode={mode_before}", nproc=before)
    resumed = run(stage, out, "train.steps=5", *common, f"parallel.mode={mode_after}", "--resume", nproc=after)
    assert f"(written by {before} ranks, resumed on {after})" in resumed
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["world"], r["sharding"]) for r in records if "resumed_from" in r] == [(after, None)]
    ref, got = losses(refs[stage]), losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    """24 synthetic clips with their manifest, which the runs only read (a test may add a manifest of its own)."""
    from videoprism.data.synth import generate

    data = str(tmp_path_factory.mktemp("synth"))
    generate(data, 24, seed=1, size=32, num_frames=8, workers=1)
    return data


@pytest.mark.parametrize("cache", [False, True])
def test_manifest_run_resumes_on_another_number_of_ranks(tmp_path, synth, cache):
    """Real clips through the trainer: 2 ranks checkpoint after 2 steps, 1 process goes on from every rank's
    position (the streamed loader: the rest of each old rank's epoch; the decoded cache: its global position)
    and finishes."""
    data = synth
    out = str(tmp_path / "run")
    args = ["data.source=manifest", f"data.train={data}/train.jsonl", f"data.cache={str(cache).lower()}",
            "data.workers=0", "checkpoint.export=false", "checkpoint.interval=2", "train.global_batch=4"]
    run(1, out, "train.steps=2", *args, nproc=2)
    resumed = run(1, out, "train.steps=4", *args, "--resume")
    assert "(written by 2 ranks, resumed on 1)" in resumed
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_a_bad_sample_on_one_rank_keeps_the_ranks_in_one_epoch(tmp_path, synth):
    """20 samples over 2 ranks in micro-batches of 2, one a corrupt file (data.max_bad_share lets it pass): its rank
    has 9 good ones, 4 batches, the other rank 5. That rank went on into epoch 1 alone at step 5, while the other read
    its last batch of epoch 0: the step-5 checkpoint held ranks in epochs 0 and 1, and a resume on 1 process stopped on
    "the 2 ranks of the checkpoint were in different epochs ([0, 1])". Every rank now starts epoch 1 at step 5."""
    from videoprism.train import checkpoint as ckpt

    broken = tmp_path / "broken.webm"
    broken.write_bytes(b"\x1a\x45\xdf\xa3 not a video")
    lines = [json.loads(line) for line in open(os.path.join(synth, "train.jsonl"))][:19]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({**line, "path": os.path.join(synth, line["path"])}) + "\n"
                                for line in [*lines, {**lines[0], "path": str(broken)}]))
    out = str(tmp_path / "run")
    args = ["data.source=manifest", f"data.train={manifest}", f"data.tokenizer={synth}/spm.model", "data.cache=false",
            "data.workers=0", "data.max_bad_share=0.5", "train.global_batch=4", "checkpoint.export=false"]
    run(1, out, "train.steps=5", *args, nproc=2, timeout=120)
    step5 = os.path.join(out, "checkpoints", "step_00000005")
    epochs = [ckpt.read_rank_state(step5, r)["data"]["loaders"][0]["epoch"] for r in (0, 1)]
    assert epochs == [1, 1], epochs
    assert "(written by 2 ranks, resumed on 1)" in run(1, out, "train.steps=6", *args, "--resume")
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


def evaluations(out: str) -> list[dict]:
    return [r["eval"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "eval" in r]


def test_validation_sharded_over_two_ranks_equals_one_process(tmp_path, synth):
    """Each rank decodes and scores its share of the validation split (5 clips in batches of 2 on 2 ranks: rank 1
    ends with an idle batch, the forwards collective under FSDP); the logged evaluation is the 1-process run's:
    stage 1's zero-shot retrieval over the whole split, stage 2's distillation losses (the 1-process stage 1
    its teacher). Streamed (data.val_cache=false: decoded at each evaluation, idle batches by a flag a batch), the
    same."""
    data = pathlib.Path(synth)
    val = data / "val5.jsonl"  # beside the clips its paths are relative to
    val.write_text("".join((data / "train.jsonl").read_text().splitlines(keepends=True)[:5]))
    args = ["data.source=manifest", f"data.train={data}/train.jsonl", f"data.val={val}", "data.cache=true",
            "data.workers=0", "train.global_batch=4", "train.steps=2", "train.eval_every=1"]
    one = tmp_path / "one"
    for stage in (1, 2):
        teacher = [f"stage2.teacher={one / 'stage1' / 'model.safetensors'}"] if stage == 2 else []
        run(stage, str(one / f"stage{stage}"), *args, *teacher)
        want = evaluations(str(one / f"stage{stage}"))
        for held in ("true", "false"):
            two = tmp_path / f"two_{held}" / f"stage{stage}"
            run(stage, str(two), *args, *teacher, "parallel.mode=fsdp", "checkpoint.export=false",
                f"data.val_cache={held}", nproc=2)
            got = evaluations(str(two))
            assert len(want) == len(got) == 2, (want, got)  # steps 1 and 2
            if stage == 1:
                assert want[0]["captions"] == 5 and got == want
            else:
                for w, g in zip(want, got):
                    assert g == pytest.approx(w, abs=1e-5)


def test_a_damaged_rank_file_read_for_all_ranks_fails_every_rank(tmp_path):
    """Resuming a 1-rank checkpoint with a damaged rank file on 2 ranks (rank 0 reads the old rank files for
    both): each rank stops with the one-line error naming the file, none waits for the other."""
    out = str(tmp_path)
    run(1, out, "train.steps=2", "checkpoint.export=false")
    open(os.path.join(out, "checkpoints", "step_00000002", "rank0.pt"), "wb").write(b"not a torch file")
    stderr = run_failing(command(1, out, ["train.steps=4", "checkpoint.export=false", "--resume"], nproc=2),
                         tmp_path / "logs")
    errors = [[line for line in text.splitlines() if line.startswith("error: checkpoint ")] for text in stderr]
    assert all(len(e) == 1 and "does not load (rank0.pt: " in e[0] for e in errors), [t[-1500:] for t in stderr]


def test_every_rank_of_a_run_on_an_out_dir_that_a_live_run_holds_stops_with_its_line(tmp_path):
    """Rank 0 alone takes the out_dir's lock; the other ranks learn from it that another live run holds the folder
    and stop with the same line, before anything is written there."""
    from .test_train_units import held_by_a_live_run, held_line

    out = tmp_path / "run"
    with held_by_a_live_run(out) as (holder, _):
        stderr = run_failing(command(1, str(out), ["train.steps=2", "--auto-resume"], nproc=2), tmp_path / "logs")
        lines = [[line for line in text.splitlines() if line.startswith("error: ")] for text in stderr]
        assert lines == [[held_line(out, holder)]] * 2, [text[-1500:] for text in stderr]
    assert os.listdir(out) == ["run.lock"]


def test_a_rank_file_damaged_for_one_rank_stops_every_rank_of_an_explicit_resume_alike(tmp_path):
    """--resume OUT_DIR on 2 ranks whose latest checkpoint has rank 1's file cut short: rank 1 alone reads that file.
    It stopped on its one-line error while rank 0, which had loaded the checkpoint ("resumed from ... at step 4"),
    went on into training and failed there on rank 1's closed connection (7 s; on another node it waits out the
    collective's timeout): "error: another rank of this run stopped ([...gloo/transport/tcp/pair.cc:561] Connection
    closed by peer ...". Every rank now stops with rank 1's line, naming the file, why, and the checkpoint before it;
    nor does an explicit --resume go back to that one itself, as --auto-resume does."""
    out = str(tmp_path / "run")
    run(1, out, "train.steps=4", "checkpoint.interval=2", "checkpoint.export=false", nproc=2)
    root = os.path.join(out, "checkpoints")
    with open(os.path.join(root, "step_00000004", "rank1.pt"), "r+b") as fh:
        fh.truncate(100)
    stderr = run_failing(command(1, out, ["train.steps=6", "checkpoint.export=false", "--resume", out], nproc=2),
                         tmp_path / "logs")
    lines = [[line for line in text.splitlines() if line.startswith("error: ")] for text in stderr]
    assert lines[0] == lines[1] and len(lines[0]) == 1, [text[-1500:] for text in stderr]
    assert lines[0][0].startswith(f"error: checkpoint {root}/step_00000004 does not load (rank1.pt: rank 1: "
                                  "RuntimeError: ")
    assert lines[0][0].endswith(f"a damaged file; resume from the checkpoint before it, --resume {root}/step_00000002")
    assert not any("Traceback" in text for text in stderr), stderr
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000004"]  # nothing renamed out of the way


def test_the_ranks_of_a_finished_run_leave_together(tmp_path):
    """Rank 0 still writing its plot while rank 1 tore its process groups down and exited: now and then an
    abort at rank 1's interpreter exit (-6), and torchrun failed the finished run. Rank 1 now exits after rank
    0's plot, and the run succeeds."""
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    script = tmp_path / "slow_plot_on_rank0.py"
    script.write_text("import atexit, os, sys, time\n"
                      "from videoprism.train import stage1, trainer\n"
                      f"stamps = {str(stamps)!r}\n"
                      "rank = os.environ['RANK']\n"
                      "def stamp(name):\n"
                      "    open(os.path.join(stamps, name), 'w').write(repr(time.time()))\n"
                      "if rank == '0':\n"
                      "    plot = trainer.plot_curves\n"
                      "    def slow_plot(*a, **k):\n"
                      "        time.sleep(3)\n"
                      "        out = plot(*a, **k)\n"
                      "        stamp('rank0_plotted')\n"
                      "        return out\n"
                      "    trainer.plot_curves = slow_plot\n"
                      "atexit.register(stamp, 'rank' + rank + '_exit')\n"
                      "sys.exit(stage1.main(sys.argv[1:]))\n")
    cmd = command(1, str(tmp_path / "run"), ["train.steps=2", "checkpoint.export=false", "parallel.mode=fsdp"],
                  nproc=2)
    cmd[cmd.index("-m", 2):cmd.index("--config")] = [str(script)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    plotted, rank1_exit = (float((stamps / n).read_text()) for n in ("rank0_plotted", "rank1_exit"))
    assert rank1_exit >= plotted


def test_a_rank_whose_view_of_out_dir_lags_resumes_from_rank_0s_checkpoint(tmp_path, refs):
    """A node whose view of a shared out_dir lags (an NFS attribute cache) does not see the newest
    checkpoint: every rank still loads rank 0's pick, and the run goes on with the uninterrupted
    run's losses (each rank choosing alone mixed two checkpoints, then hung in the final save)."""
    out = str(tmp_path / "run")
    run(1, out, "train.steps=4", "checkpoint.interval=2", "checkpoint.export=false")
    lagging = tmp_path / "lagging_rank1.py"
    lagging.write_text("import os, sys\n"
                       "from videoprism.train import checkpoint, stage1\n"
                       "if os.environ['RANK'] == '1':\n"
                       "    listed = checkpoint.step_dirs\n"
                       "    checkpoint.step_dirs = lambda root: listed(root)[:-1]\n"
                       "sys.exit(stage1.main(sys.argv[1:]))\n")
    cmd = command(1, out, ["train.steps=6", "checkpoint.export=false", "--auto-resume"], nproc=2)
    cmd[cmd.index("-m", 2):cmd.index("--config")] = [str(lagging)]  # the script instead of -m train.stage1
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "resumed from" in r.stdout and "step_00000004" in r.stdout
    assert_whole_run_matches(out, refs[1], steps=6)


@pytest.mark.parametrize("damage", ["cut", "lost"])
def test_a_rank_file_damaged_for_one_rank_takes_every_rank_back_under_auto_resume(tmp_path, refs, damage):
    """--auto-resume on 2 ranks whose latest checkpoint has rank 1's file cut short: rank 1 alone reads that file,
    and alone would go back to the checkpoint before it while rank 0 trained on (or stop the run). Every rank goes
    back to that one, the damaged one is renamed out of the way, and the run has the uninterrupted run's losses.
    Lost, the last rank's file made the checkpoint read as one of 1 rank: resumed "(written by 1 ranks, resumed on
    2)" without rank 1's data position and RNG states, or with a manifest's loader stopped on "data state 0 of 1
    says rank 0 of 2"; it is damaged alike."""
    out = str(tmp_path)
    args = ("train.steps=4", "checkpoint.interval=2", "checkpoint.export=false")
    run(1, out, *args, nproc=2)
    root = os.path.join(out, "checkpoints")
    rank1 = os.path.join(root, "step_00000004", "rank1.pt")
    if damage == "lost":
        os.remove(rank1)
    else:
        with open(rank1, "r+b") as fh:
            fh.truncate(100)
    stdout = run(1, out, *args[1:], "train.steps=6", "--auto-resume", nproc=2)
    why = "incomplete: rank1.pt lost (written by 2 ranks))" if damage == "lost" else "rank1.pt: rank 1: RuntimeError: "
    assert (f"--auto-resume: the damaged checkpoint {root}/step_00000004 ({why}" in stdout
            and f"going back to {root}/step_00000002, the newest checkpoint that loads (steps 3-4 are trained again)"
            in stdout and f"resumed from {root}/step_00000002 at step 2" in stdout), stdout[-3000:]
    assert os.path.isdir(os.path.join(root, "step_00000004.abandoned"))
    assert_whole_run_matches(out, refs[1], steps=6)


def test_an_srun_step_of_separate_runs_is_refused(monkeypatch):
    """`srun torchrun` without --nnodes/--rdzv-endpoint on 4 nodes is 4 whole runs writing one
    out_dir; `srun -n 8 python -m train.stage1` is 8. A batch script's own shell and a joined
    rendezvous pass."""
    from videoprism.train.parallel import _check_slurm_launch

    for key in ("TORCHELASTIC_RUN_ID", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    with pytest.raises(ValueError, match=r"8 tasks but they are 8 separate runs of 1 rank\(s\).*--nnodes"):
        _check_slurm_launch(1)
    _check_slurm_launch(8)  # a launcher that set WORLD_SIZE for all 8
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")  # each node's torchrun alone
    with pytest.raises(ValueError, match=r"4 separate runs of 8 rank\(s\)"):
        _check_slurm_launch(8)
    monkeypatch.setenv("GROUP_WORLD_SIZE", "4")  # one rendezvous of the 4 nodes
    _check_slurm_launch(32)
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    monkeypatch.setenv("SLURM_STEP_ID", str(0xFFFFFFFB))  # the batch step
    _check_slurm_launch(8)
    monkeypatch.delenv("SLURM_STEP_ID")
    _check_slurm_launch(8)
    # A sweep (`srun -n 8 bash -c 'python -m train.stage1 train.out_dir=runs/$SLURM_PROCID'`): separate on purpose.
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    with pytest.raises(ValueError, match="VIDEOPRISM_SEPARATE_RUNS=1"):
        _check_slurm_launch(1)
    monkeypatch.setenv("VIDEOPRISM_SEPARATE_RUNS", "1")
    _check_slurm_launch(1)


def test_on_main_rank_returns_or_raises_in_one_process():
    from videoprism.train.parallel import on_main_rank

    assert on_main_rank(lambda: [1, 2]) == [1, 2]
    with pytest.raises(KeyError, match="x"):
        on_main_rank(lambda: {}["x"])


def test_ranks_agree_on_their_attempts_keys_past_a_dead_attempts():
    """_attempt_keys on a store that outlived earlier attempts (torchrun's): ranks that start before their rank 0
    and read a dead attempt's token (one whose ranks all joined, one whose rank 0 died before the others joined),
    or another world size's, still agree on one fresh prefix."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist
    from videoprism.train.parallel import _attempt_keys

    store, timeout = dist.HashStore(), timedelta(seconds=10)

    def attempt(world, first=()):
        """Ranks 0..world-1 on threads; `first`'s ranks start 0.5 s before the rest (they read the last token)."""
        got = {}

        def rank(r):
            got[r] = _attempt_keys(store, r, world, timeout)

        late = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world) if r not in first]
        early = [threading.Thread(target=rank, args=(r,), daemon=True) for r in first]
        for t in early:
            t.start()
        time.sleep(0.5 if first else 0)
        for t in late:
            t.start()
        for t in early + late:
            t.join(60)
        assert len(got) == world and len(set(got.values())) == 1, got
        return got[0]

    done = attempt(2)
    again = attempt(2, first=(1,))  # rank 1 first reads `done`'s token, whose ranks all joined
    assert again != done
    store.set("videoprism/attempt/w3", "dead")  # a rank 0 that died before its ranks joined
    grown = attempt(3, first=(1, 2))
    assert grown not in (done, again, "videoprism/attempt/w3/dead")
    assert attempt(2, first=(1,)) not in (done, again)  # after another world size's attempt


def test_hsdp_groups_and_their_errors(monkeypatch):
    from videoprism.train.parallel import hsdp_groups

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert hsdp_groups(16, 8) == (2, 8)
    with pytest.raises(ValueError, match=r"parallel.shard_size=3 does not divide the 4 ranks"):
        hsdp_groups(4, 3)
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE is not set .* set parallel.shard_size"):
        hsdp_groups(4, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert hsdp_groups(32, 0) == (4, 8)
    with pytest.raises(ValueError, match=r"parallel.shard_size=8 \(LOCAL_WORLD_SIZE\) does not divide the 4 ranks"):
        hsdp_groups(4, 0)


def test_hsdp_that_cannot_be_laid_out_fails_before_the_model_is_built(tmp_path):
    """Checked in the preflight: one line, exit 2, no traceback, before any data or model."""
    r = subprocess.run(command(1, str(tmp_path), ["parallel.mode=hsdp", "parallel.shard_size=3"]), cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "WORLD_SIZE": "4", "VIDEOPRISM_TRACEBACK": ""})
    assert r.returncode == 2 and r.stderr.strip() == ("error: parallel.shard_size=3 does not divide the 4 ranks; set "
                                                      "parallel.shard_size to a divisor of the world size (the GPUs "
                                                      "of one node)"), r.stderr


@pytest.mark.parametrize("world, overrides, message", [
    ("1", ["train.micro_batch=3"], "train.micro_batch=3 does not divide the per-rank batch 8 (train.global_batch 8 / 1 "
                                   "ranks); set it to a divisor of 8 (0 = no accumulation)"),
    ("3", [], "train.global_batch=8 is not divisible by the 3 ranks; set it to a multiple of 3")])
def test_a_batch_that_cannot_be_split_fails_before_the_data_is_decoded(tmp_path, monkeypatch, capsys, world,
                                                                          overrides, message):
    """Checked in the preflight: with data.cache (the tiny preset's) the Trainer, which checked it, came after
    the decode of the whole manifest."""
    from videoprism.train import stage1

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("VIDEOPRISM_TRACEBACK", "")
    monkeypatch.setattr(stage1, "build_train_data", lambda *a, **k: pytest.fail("the data was built"))
    assert stage1.main(["--config", "tiny", *TINY, f"train.out_dir={tmp_path}", *overrides]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


@pytest.mark.parametrize("stage", [1, 2])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, refs, stage):
    args = ["train.steps=10", "checkpoint.interval=2", "checkpoint.export=false", *stage_args(stage, refs)]
    p = subprocess.Popen(command(stage, str(tmp_path), args), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    first = tmp_path / "checkpoints" / "step_00000002"
    deadline = time.time() + 300
    while not first.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -9, "the run ended before it could be killed"
    out = run(stage, str(tmp_path), *args, "--resume")
    assert "resumed from" in out
    assert_whole_run_matches(str(tmp_path), refs[stage], tol=1e-6)


def test_async_checkpoints_on_two_processes_resume_exactly(tmp_path, refs):
    """FSDP2 on 2 ranks with checkpoint.async_save: the writer threads' collectives run beside
    the training loop's without a deadlock, and a run resumed from an asynchronously written
    checkpoint goes on with the uninterrupted run's losses."""
    from videoprism.train import checkpoint as ckpt

    out = str(tmp_path)
    common = ["checkpoint.export=false", "parallel.mode=fsdp", "checkpoint.async_save=true", "checkpoint.interval=1",
              "checkpoint.keep=5"]
    run(1, out, "train.steps=3", *common, nproc=2)
    root = os.path.join(out, "checkpoints")
    assert [s for s, _ in ckpt.step_dirs(root)] == [1, 2, 3]
    assert "resumed from" in run(1, out, "train.steps=5", *common, "--resume", os.path.join(root, "step_00000002"),
                                 nproc=2)
    ref, got = losses(refs[1]), losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


@pytest.mark.parametrize("stage, mode, micro", [(1, "ddp", 2), (1, "fsdp", 1), (2, "ddp", 2), (2, "fsdp", 1)])
def test_accumulation_on_two_processes_equals_one_batch(tmp_path, refs, stage, mode, micro):
    """2 ranks x 2 or 4 accumulated micro-batches = 1 rank, one batch of 8 (the reference run), masks as
    configured (50% tube, 65% BEVT): a clip's masks are keyed by its index in the step's global batch
    (train/step_masks.py), so every split of it masks each clip alike. Stage 1 with GradCache (stage1.grad_cache,
    its default): the contrastive loss scores the whole global batch either way."""
    run(stage, str(tmp_path), "train.steps=3", "checkpoint.export=false", f"parallel.mode={mode}",
        f"train.micro_batch={micro}", *stage_args(stage, refs), nproc=2)
    records = [json.loads(line) for line in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
    assert records[0]["accum"] == 8 // (2 * micro)
    ref, got = losses(refs[stage]), losses(str(tmp_path))
    for step in (1, 2, 3):
        assert abs(got[step] - ref[step]) <= 1e-5, (mode, step, got[step], ref[step])


def _worker_pid(launcher: subprocess.Popen, rank: int | None, deadline: float) -> int:
    """The pid of the torchrun worker whose environment says RANK=`rank` (None: its only worker, any rank)."""
    want = f"RANK={'' if rank is None else rank}".encode()
    while time.time() < deadline and launcher.poll() is None:
        for task in os.listdir(f"/proc/{launcher.pid}/task"):
            try:
                children = open(f"/proc/{launcher.pid}/task/{task}/children").read().split()
            except OSError:
                continue
            for pid in children:
                try:
                    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                    if any(e == want or (rank is None and e.startswith(want)) for e in env):
                        return int(pid)
                except OSError:
                    continue
        time.sleep(0.05)
    raise AssertionError(f"no torchrun worker with RANK={rank} appeared")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers through Linux /proc")
def test_preemption_notice_to_one_rank_stops_both_and_auto_resume_continues(tmp_path, refs):
    """SIGTERM to rank 1 alone (a scheduler's notices arrive at slightly different moments):
    both ranks stop after the same step with one complete checkpoint; the same command with
    --auto-resume (which started the first run afresh: no checkpoint yet) finishes the run
    with the uninterrupted run's losses."""
    from videoprism.train import checkpoint as ckpt

    out = str(tmp_path)
    args = ["train.steps=10", "checkpoint.interval=0", "checkpoint.export=false", "--auto-resume"]
    p = subprocess.Popen(command(1, out, args, nproc=2), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    rank1 = _worker_pid(p, 1, deadline)
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and '"loss"' in metrics.read_text()) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(rank1, signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode != 0, "the run ended before the notice"
    assert "SIGTERM: stopped after step" in stdout, stdout[-2000:] + stderr[-4000:]
    saved = ckpt.step_dirs(os.path.join(out, "checkpoints"))
    assert len(saved) == 1 and 1 <= saved[0][0] < 10, saved
    assert {"rank0.pt", "rank1.pt"} <= set(os.listdir(saved[0][1]))
    resumed = run(1, out, *args, nproc=2)
    assert f"resumed from {saved[0][1]}" in resumed
    assert_whole_run_matches(out, refs[1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers through Linux /proc")
def test_a_killed_rank_restarted_by_torchrun_auto_resumes_with_the_uninterrupted_losses(tmp_path, refs):
    """SIGKILL to rank 1 after the first checkpoint under `torchrun --max-restarts 1 ... --auto-resume`: torchrun
    stops rank 0 and starts both again, they resume from the latest checkpoint and finish with the uninterrupted
    run's losses. The restarted workers share torchrun's store with the killed attempt: before each attempt had
    its own keys there, 3 of 4 restarts here failed in init_process_group ("Gloo connectFullMesh failed ...
    Connection refused") or hung in it."""
    out = str(tmp_path)
    args = ["train.steps=10", "checkpoint.interval=2", "checkpoint.export=false", "parallel.mode=fsdp",
            "--auto-resume"]
    cmd = command(1, out, args, nproc=2)
    at = cmd.index("torch.distributed.run") + 1
    cmd[at:at] = ["--max-restarts", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    rank1 = _worker_pid(p, 1, deadline)
    first = tmp_path / "checkpoints" / "step_00000002"
    while not first.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(rank1, signal.SIGKILL)
    try:
        stdout, stderr = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.terminate()  # torchrun stops its workers
        stdout, stderr = p.communicate(timeout=60)
        pytest.fail("the restarted workers hung: " + stderr[-3000:])
    assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "resumed from" in stdout, stdout[-2000:]
    assert_whole_run_matches(out, refs[1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers through Linux /proc")
def test_two_nodes_restart_together_after_one_nodes_worker_is_killed(tmp_path, refs):
    """Two torchruns as two nodes (c10d rendezvous on localhost, one worker each, `--max-restarts 1`), SIGKILL to
    the second node's worker after the first checkpoint: both nodes start their workers again, they resume and
    finish with the uninterrupted run's losses. Only the killed node's torchrun counts the restart (the other
    restarts on seeing it rejoin): when the attempt's store keys came from TORCHELASTIC_RESTART_COUNT, the two
    nodes' workers waited on different keys until parallel.timeout_s (4 of 4 runs)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "run")
    args = ["train.steps=10", "checkpoint.interval=2", "checkpoint.export=false", "parallel.mode=fsdp",
            "parallel.timeout_s=30", "--auto-resume"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"two-nodes-{port}",
                "--max-restarts", "1"]
    cmd = launcher + command(1, out, args)[1:]
    logs = [(open(tmp_path / f"node{i}.out", "w+"), open(tmp_path / f"node{i}.err", "w+")) for i in range(2)]
    # files, not pipes: a node blocked on a full pipe while the test waits on the other would hang both
    nodes = [subprocess.Popen(cmd, cwd=ROOT, stdout=o, stderr=e, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for o, e in logs]
    deadline = time.time() + 300
    worker = _worker_pid(nodes[1], None, deadline)
    first = tmp_path / "run" / "checkpoints" / "step_00000002"
    while not first.exists() and all(p.poll() is None for p in nodes) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(worker, signal.SIGKILL)
    end, hung = time.time() + 120, False
    for p in nodes:
        try:
            p.wait(timeout=max(1.0, end - time.time()))
        except subprocess.TimeoutExpired:
            hung = True
            p.terminate()  # torchrun stops its workers
            p.wait(timeout=60)
    ends = [(o.seek(0) or o.read(), e.seek(0) or e.read()) for o, e in logs]
    for f in (f for pair in logs for f in pair):
        f.close()
    assert not hung, "the restarted workers hung: " + ends[0][1][-2000:] + ends[1][1][-2000:]
    for p, (stdout, stderr) in zip(nodes, ends):
        assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "resumed from" in ends[0][0] + ends[1][0], ends[0][0][-2000:] + ends[1][0][-2000:]
    assert_whole_run_matches(out, refs[1])
