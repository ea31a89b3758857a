"""Typed training configuration: sections of dataclasses, named presets, config files,
`key=value` overrides.

Every field carries its documentation (and, where it has a fixed set of values, its
choices) in metadata; `--help` prints all of them. A configuration is built in layers:
stage defaults, a preset (`tiny`, `base`, ...), a config file (TOML or JSON: `preset = NAME`
plus `[section]` tables of fields), then `section.field=value` overrides, each parsed with the
field's type (bool accepts true/false/1/0/yes/no). Every run writes the resolved config to
`OUT_DIR/config.json`, which `--config` takes back to repeat the run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field

from videoprism.paths import LONGEST_PATH, read_text, shortened, shown


def f(default, help: str, choices: tuple | None = None, valid: str | None = None):
    """A dataclass field with its documentation and, optionally, its allowed values: `choices`, or a
    numeric range `valid` written as in the docs: ">= 1", "> 0", "[0, 1]", "[0, 1)"."""
    meta = {"help": help, "choices": choices, "valid": valid}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _in_range(value, valid: str) -> bool:
    if valid[0] in "><":
        op, bound = valid.split()
        return value >= float(bound) if op == ">=" else value > float(bound)
    lo, hi = (float(t) for t in valid[1:-1].split(","))
    return (lo <= value if valid[0] == "[" else lo < value) and (value <= hi if valid[-1] == "]" else value < hi)


def check_field(section: str, obj, name: str) -> None:
    """Raise if field `name` of the config section `obj` holds a value outside its choices or range."""
    meta = obj.__dataclass_fields__[name].metadata
    value = getattr(obj, name)
    if isinstance(value, float) and not math.isfinite(value):  # inf passes every "> 0"; nan fails them unnamed
        raise ValueError(f"{section}.{name}={shown(value)} must be a finite number (see --help)")
    if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"{section}.{name}={shown(value)} is not one of {', '.join(map(repr, meta['choices']))}")
    if meta.get("valid") and not _in_range(value, meta["valid"]):
        where = "in " if meta["valid"][0] in "[(" else ""
        raise ValueError(f"{section}.{name}={shown(value)} is out of range: it must be {where}{meta['valid']} "
                         "(see --help)")


@dataclass
class ModelConfig:
    name: str = f("videoprism_lvt_v1_base", "Official model name whose configuration is the starting point.")
    init: str = f("random", "Initial weights: 'random', an official Flax .npz checkpoint, or our .safetensors "
                            "(stage 1 only: stage 2's student starts as stage2.teacher's encoder).")
    model_dim: int = f(0, "Override of the token width D (0 = the official value).", valid=">= 0")
    num_heads: int = f(0, "Override of the attention heads (0 = official).", valid=">= 0")
    mlp_dim: int = f(0, "Override of the FFN width (0 = official).", valid=">= 0")
    num_spatial_layers: int = f(0, "Override of the spatial blocks (0 = official).", valid=">= 0")
    num_temporal_layers: int = f(0, "Override of the temporal blocks (0 = official).", valid=">= 0")
    num_auxiliary_layers: int = f(-1, "Override of the auxiliary blocks before the pooler (-1 = official).",
                                  valid=">= -1")
    num_unimodal_layers: int = f(0, "Override of the text blocks (0 = official).", valid=">= 0")
    patch_size: int = f(0, "Override of the patch side in pixels (0 = official 18).", valid=">= 0")
    vocabulary_size: int = f(0, "Text vocabulary (0 = the tokenizer's size, or the official 32000 without one).",
                             valid=">= 0")
    pos_emb_shape: str = f("", "Position-embedding grid 'T,H,W' ('' = the clip size for a random init, the "
                               "checkpoint's grid for a checkpoint; an official .npz holds only T and H*W, taken "
                               "as a square grid: set a non-square one here).")
    attention_backend: str = f("auto", "Attention kernels: 'auto' (triton on GPU, reference on CPU) or one "
                                       "backend of videoprism.ops.factorized_attention.",
                               choices=("auto", "reference", "triton", "flex", "flash", "sdpa"))
    num_frames: int = f(16, "Frames per clip.", valid=">= 1")
    resolution: int = f(288, "Frame side in pixels (a multiple of the patch size).", valid=">= 1")

    def clip_size(self) -> dict:
        """The clip size the run trains on, as an export records it."""
        return {"num_frames": self.num_frames, "resolution": self.resolution}

    def overrides(self, vocab: int | None = None) -> dict:
        """Official config fields that differ from the named configuration."""
        out = {}
        for k in ("model_dim", "num_heads", "mlp_dim", "num_spatial_layers", "num_temporal_layers",
                  "num_unimodal_layers", "patch_size"):
            if getattr(self, k) > 0:
                out[k] = getattr(self, k)
        if self.num_auxiliary_layers >= 0:
            out["num_auxiliary_layers"] = self.num_auxiliary_layers
        if self.vocabulary_size > 0 or vocab:
            out["vocabulary_size"] = self.vocabulary_size or vocab
        if self.pos_emb_shape:
            out["pos_emb_shape"] = self.grid()
        return out

    def grid(self) -> tuple[int, int, int] | None:
        """model.pos_emb_shape as (T, H, W), None when unset ('')."""
        if not self.pos_emb_shape:
            return None
        try:
            shape = tuple(int(x) for x in self.pos_emb_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"model.pos_emb_shape must be 'T,H,W' positive ints, got {shown(self.pos_emb_shape)}")
        return shape


@dataclass
class DataConfig:
    source: str = f("manifest", "'manifest' (video files listed in JSONL manifests) or 'random' (seeded random "
                                "clips and captions, for benchmarks and tests).", choices=("manifest", "random"))
    train: str = f("", "Training manifests, comma separated, each PATH[:WEIGHT[:FRAMES]]: one dataset is drawn per "
                       "step by weight (alternating gradient descent); FRAMES=1 makes images one-frame videos. A "
                       "PATH may hold ':' but not ',' (give a symlink of another name).")
    val: str = f("", "Validation manifest for zero-shot retrieval and probes ('' = none).")
    tokenizer: str = f("", "SentencePiece model of the captions ('' = DIR/spm.model next to the first manifest); "
                           "stage 1 only: stage 2 reads no text, and its manifests may hold video-only lines.")
    workers: int = f(2, "Decoding worker processes per rank, at most 4 per core (a note says a cap) and one per "
                        "clip of the rank's epoch.", valid=">= 0")
    max_bad_share: float = f(0.01, "Stop with an error when more than this share of samples is unreadable "
                                          "(counted by each rank over its share of an epoch, and over a manifest's "
                                          "lines: with few samples per rank one bad file weighs more).",
                             valid="[0, 1]")
    decode_timeout: float = f(120.0, "Seconds a worker may spend decoding one clip before it is killed and the "
                                     "file skipped as bad (a hung decoder; 0 = no limit; needs data.workers > 0).",
                              valid=">= 0")
    cache: bool = f(False, "Decode each clip once and keep it in memory (small datasets, CPU demos; every rank "
                           "decodes and holds the whole manifest; one training manifest, no dataset mix). Clips "
                           "are kept as the eval transform makes them (shorter side resized, centre crop): no "
                           "random resized crop, data.flip_prob still applies. A run stops before decoding when "
                           "its node's held sets (this and data.val_cache's) would take more than 3/4 of the memory "
                           "available.")
    val_cache: bool = f(True, "Decode each rank's share of data.val once, at the start, and hold it for every "
                              "evaluation (a 16x288x288 clip is 4 MB of uint8: 10k clips take 40 GB on one node); a "
                              "run stops before decoding when its node's held sets (this and data.cache's) would take "
                              "more than 3/4 of the memory available. false: decode the share again at each "
                              "evaluation, holding nothing between them (the same batches and metrics; each "
                              "evaluation takes the decode's time too, and its bad clips are reported at the first "
                              "one).")
    flip_prob: float = f(0.0, "Share of training clips mirrored horizontally (0: a mirror contradicts captions that "
                              "say left or right; raise it for data without such captions).", valid="[0, 1]")


@dataclass
class OptimConfig:
    name: str = f("adafactor", "'adamw' (torch's fused AdamW, on the GPU and the CPU) or 'adafactor' "
                               "(torch.optim.Adafactor's update and defaults, without its host reads: "
                               "train/adafactor.py; optim.adafactor_* switch on optax's momentum and absolute steps).",
                  choices=("adamw", "adafactor"))
    lr: float = f(5e-4, "Peak learning rate.", valid="> 0")
    min_lr: float = f(0.0, "Learning rate at the end of the decay.", valid=">= 0")
    warmup_steps: int = f(20000, "Linear warm-up from 0 to lr.", valid=">= 0")
    decay: str = f("linear", "Decay after warm-up, from lr to min_lr at train.steps: 'linear', 'cosine', or "
                             "'constant' (lr).",
                   choices=("linear", "cosine", "constant"))
    weight_decay: float = f(1e-4, "Decoupled weight decay.", valid=">= 0")
    beta1: float = f(0.9, "AdamW beta1.", valid="[0, 1)")
    beta2: float = f(0.999, "AdamW beta2.", valid="[0, 1)")
    adafactor_relative_step: bool = f(True, "Adafactor: a step moves each parameter by about lr times its own RMS "
                                            "(torch's and optax's default); false: by about lr, as AdamW's steps.")
    adafactor_momentum: float = f(0.0, "Adafactor: average of its steps with this beta1 (0 = none, torch's); the "
                                       "CoCa and ViT-g recipes, the paper's lineage, use 0.9 with "
                                       "adafactor_relative_step=false.", valid="[0, 1)")
    grad_clip: float = f(1.0, "Clip the global gradient norm to this value (0 = off).", valid=">= 0")


@dataclass
class TrainConfig:
    steps: int = f(200000, "Optimizer steps.", valid=">= 1")
    global_batch: int = f(4096, "Clips per optimizer step, over all ranks and accumulation steps.", valid=">= 1")
    micro_batch: int = f(0, "Clips per rank per forward (0 = global_batch / world size, no accumulation).",
                         valid=">= 0")
    # At most 2**32 - 1: the run seeds numpy's global generator with it (seeds.seed_process), which takes no more.
    seed: int = f(0, "Seed of initialisation, masks and data order.", valid="[0, 4294967295]")
    mask_ratio: float = f(0.5, "Share of patches dropped per frame (stage 1: tube masks; stage 2: BEVT).",
                          valid="[0, 1)")
    compile: bool = f(True, "torch.compile each transformer block's forward (fullgraph, no graph break; each kind of "
                            "block compiles once), the stage-2 frozen teacher's too; embeddings, pooler and loss run "
                            "eager.")
    compile_backend: str = f("inductor", "torch.compile backend: 'inductor' (fused kernels; the fast one), or "
                             "'aot_eager' / 'eager' to tell a compile problem from an Inductor one.",
                             choices=("inductor", "aot_eager", "eager"))
    activation_checkpointing: bool = f(False, "Recompute each transformer block in the backward to save memory.")
    precision: str = f("auto", "'auto' (bf16 autocast on a GPU, fp32 on the CPU), 'bf16' (bf16 autocast on either: "
                       "on the CPU fast only with AMX/AVX512-BF16; the stage-2 teacher's weights in bf16 too) or "
                       "'fp32'.", choices=("auto", "bf16", "fp32"))
    max_nonfinite: int = f(20, "Non-finite losses are skipped and counted; more than this stops the run.",
                           valid=">= 0")
    log_every: int = f(10, "Steps between progress/JSONL records.", valid=">= 1")
    eval_every: int = f(0, "Steps between evaluations on data.val (0 = only at the end): stage 1's zero-shot "
                              "retrieval, stage 2's distillation losses.", valid=">= 0")
    out_dir: str = f("runs/stage1", "Folder of checkpoints, metrics, plots and exports.")
    device: str = f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'.", choices=("auto", "cpu", "cuda"))
    peak_tflops: float = f(0.0, "Matmul ceiling for MFU in TFLOP/s (0 = measure at start, in the step's dtype).",
                           valid=">= 0")

    def bf16(self, device_type: str) -> bool:
        """Whether the step runs under bf16 autocast on a `device_type` device (precision resolved)."""
        return bf16_autocast(self.precision, device_type)


def bf16_autocast(precision: str, device_type: str) -> bool:
    """A precision setting ('auto', 'bf16', 'fp32') resolved: bf16 autocast or not on a `device_type` device
    ('auto': bf16 on a GPU, fp32 on the CPU). Training's train.precision and `videoprism eval --precision`."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


@dataclass
class ParallelConfig:
    mode: str = f("auto", "'auto' (ddp when more than one rank), 'none', 'ddp', 'fsdp' (FSDP2, per-block "
                          "fully_shard with a bf16/fp32 mixed-precision policy on GPU) or 'hsdp' (FSDP2 sharded "
                          "within groups of parallel.shard_size ranks, replicated across the groups: the "
                          "per-block all-gathers stay inside a node, only the gradient all-reduce crosses nodes). "
                          "ddp, fsdp and hsdp on one process run unwrapped.",
                  choices=("auto", "none", "ddp", "fsdp", "hsdp"))
    shard_size: int = f(0, "Ranks per shard group in hsdp mode (other modes ignore it); must divide the world size "
                           "(0 = the ranks of one node, torchrun's LOCAL_WORLD_SIZE).", valid=">= 0")
    timeout_s: float = f(0.0, "Seconds a collective waits for the other ranks before the run fails: how long a rank "
                              "that hangs (a stuck node, a stopped process) holds the others. 0 = torch's default "
                              "(30 min on gloo, 10 on NCCL). Leave room for the longest wait of a healthy run: the "
                              "first step's compile, data.cache's decode, a checkpoint save.", valid=">= 0")


@dataclass
class CheckpointConfig:
    interval: int = f(1000, "Steps between checkpoints (0 = only at the end).", valid=">= 0")
    keep: int = f(3, "Keep the latest k checkpoints (0 = all).", valid=">= 0")
    export: bool = f(True, "Write the final weights as safetensors.")
    async_save: bool = f(False, "Write interval checkpoints in a background thread (DCP async_save): the step waits "
                                "only for the copy of the state to host memory, not for the disk. Costs host memory "
                                "for one copy of this rank's model and optimizer state.")
    save_on_signal: bool = f(True, "On SIGTERM or SIGUSR1 (a scheduler's preemption notice), finish the current "
                                   "step, save a checkpoint and exit with status 128 + the signal (143, 138); "
                                   "--resume continues exactly. false: the signal ends the run at once.")


@dataclass
class Stage1Config:
    lit: bool = f(False, "LiT: freeze the video encoder (the factorized ViT); the text tower, the auxiliary layers "
                         "after the encoder and the pooler train.")
    temperature_init: float = f(0.07, "Initial softmax temperature (CLIP: 0.07), learned as log(1/t).", valid="> 0")
    max_logit_scale: float = f(100.0, "Clamp of the learned 1/temperature (CLIP: 100).", valid="> 0")
    grad_cache: bool = f(True, "With gradient accumulation (train.micro_batch), score the whole global batch in "
                               "the contrastive loss (GradCache: embeddings of every micro-batch without grad, the "
                               "loss and its embedding gradients, then each micro-batch's forward and backward "
                               "again: one more forward a step). false: each micro-step's loss scores only its "
                               "micro_batch x world clips.")


@dataclass
class Stage2Config:
    teacher: str = f("", "Stage-1 weights (.safetensors export or official .npz) of the frozen teacher.")
    decoder_dim: int = f(512, "Width Dd of both decoders.", valid=">= 1")
    decoder_layers: int = f(4, "Transformer blocks of each decoder.", valid=">= 1")
    decoder_heads: int = f(8, "Attention heads of the decoders.", valid=">= 1")
    shuffle: bool = f(True, "Shuffle the decoder's token slots (false: visible tokens stay in their own slots).")
    global_distill: bool = f(True, "Add the global distillation loss (false: token-wise loss only).")
    global_weight: float = f(1.0, "Weight of the global loss (the token loss has weight 1).", valid=">= 0")


@dataclass
class Config:
    # The preset the sections started from (not a section): config.json records it as a config file's
    # `preset = NAME`, so a field missing there (an older version's file, a hand edit) takes that preset's value.
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tiny(c: Config, stage: int) -> None:
    """A CPU demo model: 64x64 clips of 8 frames, 8x8 patches, D=64, 2+1 layers."""
    m = c.model
    m.model_dim, m.num_heads, m.mlp_dim = 64, 4, 128
    m.num_spatial_layers, m.num_temporal_layers, m.num_auxiliary_layers, m.num_unimodal_layers = 2, 1, 0, 2
    m.patch_size, m.num_frames, m.resolution = 8, 8, 64
    m.attention_backend = "reference"
    c.data.cache = True
    c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.decay = "adamw", 2e-3, 30, "cosine"
    # 1200 steps: the appearance words are learned in ~300, motion direction (which the "single" synthetic scenes
    # make necessary to tell captions apart) only later.
    c.train.steps, c.train.global_batch, c.train.log_every = 1200, 32, 10
    c.train.compile, c.train.peak_tflops = False, 0.0
    c.checkpoint.interval, c.checkpoint.keep = 100, 2
    c.stage2.decoder_dim, c.stage2.decoder_layers, c.stage2.decoder_heads = 64, 2, 4
    if stage == 2:
        # A stage-2 step costs ~4x a stage-1 step (teacher on every token, decoder over all
        # T*N slots): fewer, smaller steps from a student that starts at the teacher. A gentle lr
        # keeps what the teacher knows of motion (the distillation losses reward appearance first).
        # Direction probe (`eval probe`) from one stage-1 encoder (86%), three seeds each: lr 3e-4
        # 63/65/67%, 1e-4 83/74/87% (val token/global loss 0.19/0.31 vs 0.23/0.42); on another, 1e-3 59%.
        c.train.steps, c.train.global_batch, c.optim.lr, c.optim.warmup_steps = 300, 16, 1e-4, 15


def _paper(size: str):
    def apply(c: Config, stage: int) -> None:
        """The paper's settings (DESIGN 5) on the official `size` model, 16 frames at 288x288."""
        c.model.name = f"videoprism_lvt_v1_{size}"
        if size == "giant":
            c.stage2.decoder_dim = 512
    return apply


PRESETS = {"tiny": _tiny, "base": _paper("base"), "large": _paper("large"), "giant": _paper("giant")}


def _parse(value: str, typ):
    if typ is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {shown(value)}")
    try:
        if typ is int and not value.strip().lstrip("+-").isdigit() and float(value).is_integer():
            return int(float(value))  # 2e5 steps, as DESIGN writes them
        return typ(value)
    except ValueError:  # int('abc') says "invalid literal for int() with base 10", which names no fix
        raise ValueError(f"expected {'a number' if typ is float else 'an integer' if typ is int else typ.__name__}, "
                         f"got {shown(value)}") from None


def _sections(cfg: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


def _sections_with(cfg: Config, name: str) -> list[str]:
    """The sections that have a field `name`."""
    return [s for s in _sections(cfg) if name in typing.get_type_hints(type(getattr(cfg, s)))]


def _sectionless(cfg: Config, key: str) -> str:
    """What a `key=value` without a section is, and its fix: a field's section to prefix, or for `preset`
    (no field: the layer the sections start from) the two ways to choose one."""
    if key == "preset":
        return (f"the preset is no override; choose it with --config NAME ({', '.join(PRESETS)}), or write "
                "`preset = \"NAME\"` in a --config .toml/.json file")
    owners = _sections_with(cfg, key)
    if not owners:  # an example section would name a field that does not exist either
        return f"key {shown(key)} is no field of any section ({', '.join(_sections(cfg))}); see --help for the fields"
    return f"key {shown(key)} needs a section, e.g. {owners[0]}.{key} (see --help)"


# Fields renamed since a config file or config.json could have named them: the error names the new field.
RENAMED = {"train.mixed_precision": "train.precision (true: auto, false: fp32)",
           "data.max_bad_fraction": "data.max_bad_share"}


def _did_you_mean(section: str, name: str, fields) -> str:
    """The fix an unknown field's error names: the new name of a renamed one, else the closest field (a typo)."""
    import difflib

    if f"{section}.{name}" in RENAMED:
        return f", renamed to {RENAMED[f'{section}.{name}']}"
    # A name far longer than any field is no typo of one (and difflib's work grows with its length).
    close = difflib.get_close_matches(name, list(fields), n=1) if len(name) <= 100 else []
    return f" (did you mean {section}.{close[0]}?)" if close else ""


def _field(cfg: Config, key: str, where: str):
    """(section object, field name, field type) of `section.field`; errors say where and what exists."""
    if "." not in key:
        raise ValueError(f"{where}: {_sectionless(cfg, key)}")
    section, name = key.split(".", 1)
    sec = getattr(cfg, section, None)
    if sec is None or not dataclasses.is_dataclass(sec):
        raise ValueError(f"{where}: unknown config section {shown(section)}; sections: {', '.join(_sections(cfg))}")
    hints = typing.get_type_hints(type(sec))
    if name not in hints:
        raise ValueError(f"{where}: unknown field {shown(name)} in section {section!r}"
                         f"{_did_you_mean(section, name, hints)}; fields: {', '.join(hints)}")
    return sec, name, hints[name]


def _set(cfg: Config, key: str, value, where: str) -> None:
    sec, name, typ = _field(cfg, key, where)
    setattr(sec, name, value)
    try:
        check_field(key.split(".")[0], sec, name)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` strings in order; errors name the key and the fix."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {shown(item)} is not key=value; e.g. optim.lr=1e-3 (see --help)")
        key, value = item.split("=", 1)
        _, _, typ = _field(cfg, key, f"override {shown(item)}")
        try:
            parsed = _parse(value, typ)
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from None
        _set(cfg, key, _home(key, parsed), f"override {shown(item)}")
    return cfg


def toml_reader(path: str):
    """The TOML parser: the standard library's tomllib (Python >= 3.11), else tomli, the package it was made from
    (same API; a dependency on Python 3.10, where a .toml config said "needs Python >= 3.11" instead of reading)."""
    try:
        import tomllib
        return tomllib
    except ImportError:
        pass
    try:
        import tomli
        return tomli
    except ImportError:
        raise ValueError(f"{path}: reading TOML on Python < 3.11 needs the tomli package: pip install 'tomli>=2' "
                         "(or write the config as JSON)") from None


def read_config_file(path: str) -> dict:
    """A config file as {"preset": NAME (optional), SECTION: {FIELD: value}}: TOML (.toml) or JSON."""
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"config file {shown(path, LONGEST_PATH)} {what}; pass a preset name "
                         f"({', '.join(PRESETS)}) or a .toml/.json file")
    ext = os.path.splitext(path)[1].lower() or ".json"  # no extension: JSON, as before
    if ext not in (".toml", ".json"):
        raise ValueError(f"config file {shown(path, LONGEST_PATH)}: only .toml and .json files are read, got "
                         f"{shown(ext)}; write the config as TOML or JSON (see --help)")
    toml = toml_reader(path) if ext == ".toml" else None  # outside the try: a missing parser is no parse error
    text = read_text(path, "config file", "a .toml/.json file")  # outside too: not UTF-8 is its own line
    try:
        data = toml.loads(text) if toml is not None else json.loads(text)
    except ValueError as e:   # json/toml decode errors are ValueErrors
        raise ValueError(f"{path}: not a valid {ext[1:].upper()} config ({e})") from None
    except RecursionError:  # both parsers recurse per level: `a = [[[[...` 5000 deep ended in a traceback
        raise ValueError(f"{path}: not a valid {ext[1:].upper()} config (arrays or tables nested too deep to "
                         "read)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a table of sections, got {type(data).__name__}")
    return data


def _type_ok(value, typ) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def apply_file(cfg: Config, path: str, data: dict) -> Config:
    """Set every `[section] field = value` of a config file, type-checked against the field."""
    for section, table in data.items():
        if section == "preset":
            continue
        if not isinstance(table, dict):
            if section not in _sections(cfg):  # a field written at the top level: name its section
                owners = _sections_with(cfg, section)
                fix = f"put it under [{owners[0]}]" if owners else f"sections: {', '.join(_sections(cfg))}"
                raise ValueError(f"{path}: top-level key {shown(section)} is not a config section; {fix} (see --help)")
            raise ValueError(f"{path}: {section!r} must be a table of fields ([{section}] in TOML), "
                             f"got {shown(table)}")
        for name, value in table.items():
            key = f"{section}.{name}"
            _, _, typ = _field(cfg, key, path)
            if not _type_ok(value, typ):
                raise ValueError(f"{path}: {key} must be {typ.__name__}, got {shown(value)}; fix the file")
            _set(cfg, key, float(value) if typ is float else _home(key, value), path)
    return cfg


# config.json records the folder its run was launched from, which its relative paths were resolved from: a resume
# (or --config OUT_DIR/config.json) run from elsewhere reads the same files, not others of the same relative name.
LAUNCH_DIR = "launch_dir"
RUN_STAGE = "stage"  # and the stage of its run (run_folder.stage_of): not config fields, both
_RUN_KEYS = (LAUNCH_DIR, RUN_STAGE)
# The fields that name files a run reads (data.train: comma-separated PATH[:WEIGHT[:FRAMES]]). Not train.out_dir: a
# resume writes to the run's folder where it is now (_resumed_config), a new run to its own.
_PATH_FIELDS = ("data.train", "data.val", "data.tokenizer", "model.init", "stage2.teacher")


def _home(key: str, value):
    """A path field's value with a leading ~ expanded (each entry of data.train): the shell expands ~ only at the
    start of a word, so `train.out_dir=~/runs/x` reached the run as is, which made a folder named ~ in the current
    one."""
    if key not in (*_PATH_FIELDS, "train.out_dir") or not isinstance(value, str) or "~" not in value:
        return value
    if key == "data.train":
        return ",".join(os.path.expanduser(item.strip()) for item in value.split(","))
    return os.path.expanduser(value)


def _launch_dir(path: str, data: dict) -> str:
    folder = data[LAUNCH_DIR]
    if not isinstance(folder, str) or not os.path.isabs(folder):
        raise ValueError(f"{path}: {LAUNCH_DIR} must be the absolute folder the run was launched from (its relative "
                         f"paths resolve from there), got {shown(folder)}; fix it or remove the key")
    return folder


def _paths_from(data: dict, folder: str) -> dict:
    """A config's dict (a config file's, `to_dict`'s) with the relative paths of its _PATH_FIELDS joined to `folder`,
    without its LAUNCH_DIR and RUN_STAGE. A section that is not a table is left to apply_file to name."""
    out = {k: v for k, v in data.items() if k not in _RUN_KEYS}
    for key in _PATH_FIELDS:
        section, name = key.split(".")
        table = out.get(section)
        if not isinstance(table, dict) or not isinstance(table.get(name), str):
            continue
        value = _home(key, table[name])
        if key == "data.train":
            value = ",".join(os.path.join(folder, item.strip()) for item in value.split(",") if item.strip())
        elif value and not (key == "model.init" and value == "random"):
            value = os.path.join(folder, value)
        out[section] = {**table, name: value}
    return out


def build_config(config: str, overrides: list[str], stage: int, *, pipeline: bool = False) -> Config:
    """Stage defaults, then `config` (a preset name, or a .toml/.json file naming its preset),
    then the overrides. `pipeline`: a config of train.pipeline, whose stage2.teacher is the export its stage 1
    writes (an earlier run's there sets nothing)."""
    is_file = config not in PRESETS and (os.sep in config or "." in config)
    data = read_config_file(config) if is_file else {}
    if is_file and not data:
        raise ValueError(f"config file {config!r} is empty; write `preset = NAME` and [section] tables of fields in "
                         f"it, or pass a preset name ({', '.join(PRESETS)})")
    run_file, run_stage = LAUNCH_DIR in data or RUN_STAGE in data, data.get(RUN_STAGE)  # a run's config.json
    if LAUNCH_DIR in data:
        data = _paths_from(data, _launch_dir(config, data))
    data.pop(RUN_STAGE, None)
    preset = data.get("preset", "tiny") if data else config
    if not isinstance(preset, str) or preset not in PRESETS:  # a list (`preset = ["base"]`) is not even hashable
        where = f"{config}: unknown preset" if data else "unknown config preset"
        raise ValueError(f"{where} {shown(preset)}; choose one of {', '.join(PRESETS)} (or a .toml/.json file)")
    cfg = _preset(preset, stage)
    if data:
        apply_file(cfg, config, data)
    if run_file:
        _say_what_a_run_file_leaves(config, data, preset, stage, run_stage, cfg)
    apply_overrides(cfg, overrides)
    # What the user set: the overrides, and a config file's fields unless it is a run's config.json (which records
    # every field; one written before its stage-2 model fields followed the teacher holds the preset's).
    given = set() if run_file else {f"{section}.{k}" for section, table in data.items() if isinstance(table, dict)
                                    for k in table}
    given |= {item.split("=", 1)[0] for item in overrides}
    teacher = teacher_fields(cfg, stage) if not pipeline else {}
    if teacher:
        _student_of_teacher(cfg, given, teacher)
    return _check_combined(cfg, teacher)


# The model fields that shape an encoder's weights: stage 2's student has its teacher's.
ENCODER_SHAPE_FIELDS = ("model_dim", "num_heads", "mlp_dim", "num_spatial_layers", "num_temporal_layers",
                        "num_auxiliary_layers", "patch_size", "pos_emb_shape")


def _student_of_teacher(cfg: Config, given: set[str], saved: dict) -> None:
    """The student is the teacher's encoder: model.*'s shape fields take the teacher's values
    (they were ignored, and config.json recorded them as the run's), and one the user set (`given`: the file's and
    the overrides' keys) that contradicts the teacher is refused. `saved`: the teacher's config (teacher_fields)."""
    clash = []
    for name in ENCODER_SHAPE_FIELDS:
        if name not in saved:
            continue
        if name == "pos_emb_shape" and _teachers_grid_is_set(cfg, saved):
            continue
        want = ",".join(map(str, saved[name])) if name == "pos_emb_shape" else saved[name]
        have = getattr(cfg.model, name)
        if f"model.{name}" in given and have != want and have not in ("", 0, -1):  # not the "official" defaults
            clash.append(f"model.{name}={shown(have)} (the teacher's: {shown(want)})")
        setattr(cfg.model, name, want)
    if clash:
        raise ValueError(f"{', '.join(clash)}: stage 2's student is stage2.teacher's encoder, of the teacher's "
                         "shape; drop the model.* fields that contradict it")


def _teachers_grid_is_set(cfg: Config, saved: dict) -> bool:
    """Whether model.pos_emb_shape is set to a grid of the teacher's: an official .npz fixes only T and H*W, so a
    grid of that count stands (an 8x32 one was refused for the square 16x16 its 256 positions were taken as). With
    none set, the square grid the student takes from the .npz is said (rank 0)."""
    from videoprism.checkpoint import grid_fits, guessed_grid_note
    from videoprism.paths import echo

    grid = cfg.model.grid()
    if grid is not None:
        return grid_fits(saved, grid)
    note = guessed_grid_note(saved, f"stage2.teacher={shortened(cfg.stage2.teacher, LONGEST_PATH)}")
    if note and os.environ.get("RANK", "0") == "0":
        echo(note, file=sys.stderr)
    return False


def _preset(preset: str, stage: int) -> Config:
    """The stage's defaults under `preset`."""
    cfg = Config()
    if stage == 2:
        # Stage-2 paper settings (DESIGN 5): 65% BEVT masking, cosine to 1e-5, wd 0.05.
        cfg.train.mask_ratio, cfg.train.steps, cfg.train.out_dir = 0.65, 300000, "runs/stage2"
        cfg.optim.warmup_steps, cfg.optim.decay, cfg.optim.min_lr, cfg.optim.weight_decay = 25000, "cosine", 1e-5, 0.05
    PRESETS[preset](cfg, stage)
    cfg.preset = preset
    return cfg


def _say_what_a_run_file_leaves(path: str, data: dict, preset: str, stage: int, run_stage, cfg: Config) -> None:
    """A run's config.json holds every field, so `--config` repeats the run: a field it lacks (an older version's
    file, a hand edit) silently took the preset's value, and another stage's file gave this stage that stage's
    mask ratio and schedule. Both are said (on rank 0), not refused: either may be meant."""
    from videoprism.paths import echo

    if os.environ.get("RANK", "0") != "0":
        return
    missing = [f"{section}.{fl.name}" for section in _sections(cfg)
               for fl in dataclasses.fields(getattr(cfg, section)) if fl.name not in data.get(section, {})]
    if missing:
        echo(f"warning: {path} has no {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
             f"({len(missing)} field(s)): they take the {preset} preset's values", file=sys.stderr)
    if run_stage in (1, 2) and run_stage != stage:
        # (Only the mask ratio's stage default, the same under every preset, is compared; the schedule is said
        # as a whole.)
        default = _preset(preset, stage).train.mask_ratio
        echo(f"warning: {path} is a stage-{run_stage} run's config: its train.mask_ratio={cfg.train.mask_ratio} "
             f"(stage {stage}'s default: {default}), optim.* and train.steps are that run's; override them for "
             f"stage {stage}'s (see --help)", file=sys.stderr)



def teacher_fields(cfg: Config, stage: int) -> dict:
    """Stage 2's student is its teacher's encoder: with a readable teacher, the model config a .safetensors carries
    or the shape fields an official .npz's array shapes tell (which, not model.*, set the student's shape), else
    {}."""
    path = cfg.stage2.teacher
    if stage != 2 or not path.lower().endswith((".safetensors", ".npz")) or not os.path.isfile(path):
        return {}
    from videoprism.checkpoint import CheckpointError, checkpoint_config

    try:
        return checkpoint_config(path)[1]
    except CheckpointError:  # said where the teacher is loaded
        return {}


def _refuse_unread(o: OptimConfig) -> None:
    """A field of one optimizer set away from its default while the other is chosen (Adafactor's switches under
    AdamW, AdamW's betas under Adafactor) is refused: the run would look configured and train as if it were unset.
    (The settings of a part switched off, train.compile_backend under train.compile=false or stage2.global_weight
    under stage2.global_distill=false, are kept: switching a part off should not need its settings undone.)"""
    for names, owner, other in ((("adafactor_momentum", "adafactor_relative_step"), "adafactor", ("beta1", "beta2")),
                                (("beta1", "beta2"), "adamw", ("adafactor_momentum", "adafactor_relative_step"))):
        if o.name == owner or all(getattr(o, n) == OptimConfig.__dataclass_fields__[n].default for n in names):
            continue
        raise ValueError(f"optim.{names[0]} / optim.{names[1]} apply to optim.name={owner}, not {o.name!r}; drop them "
                         f"({'AdamW' if o.name == 'adamw' else 'Adafactor'}'s are optim.{other[0]} and "
                         f"optim.{other[1]})")


def _check_combined(cfg: Config, teacher: dict) -> Config:
    """Constraints between fields (each field's own range is checked when it is set); `teacher`: stage 2's teacher's
    config (teacher_fields), whose patch the student has."""
    s2 = cfg.stage2
    if s2.decoder_dim % s2.decoder_heads:
        raise ValueError(f"stage2.decoder_dim={s2.decoder_dim} is not divisible by stage2.decoder_heads="
                         f"{s2.decoder_heads}; pick heads that divide the width (e.g. 8 for 512)")
    s1 = cfg.stage1
    if not 1 / s1.max_logit_scale <= s1.temperature_init < 1:
        raise ValueError(f"stage1.temperature_init must be in [1/stage1.max_logit_scale, 1) = "
                         f"[{1 / s1.max_logit_scale:g}, 1), got {s1.temperature_init}")
    o = cfg.optim
    if o.decay != "constant" and o.min_lr > o.lr:
        raise ValueError(f"optim.min_lr={o.min_lr:g} is above optim.lr={o.lr:g}: the {o.decay} decay would raise the "
                         "learning rate; set optim.min_lr below optim.lr (0 decays to zero)")
    _refuse_unread(o)
    m = cfg.model
    from videoprism.config import CONFIGS, official_config  # dataclasses only: --help stays light

    if m.name in CONFIGS:  # an unknown name is said where the model is built, with the known ones
        own = teacher.get("patch_size")  # stage 2's student is its teacher's encoder
        patch = own or m.patch_size or official_config(m.name).patch_size
        if m.resolution % patch:
            whose = f"stage2.teacher's patch size {patch}" if own else f"the patch size {patch}"
            raise ValueError(f"model.resolution={m.resolution} is not a multiple of {whose}; use e.g. "
                             f"{max(1, m.resolution // patch) * patch}")
        from videoprism.masking import num_visible

        grid = m.resolution // patch
        if num_visible((grid, grid), cfg.train.mask_ratio) < 1:  # else the first step says it
            raise ValueError(f"train.mask_ratio={cfg.train.mask_ratio} leaves no visible patch of a frame's "
                             f"{grid}x{grid} (model.resolution / the patch size); lower it")
        _check_masks_some(cfg.train.mask_ratio, grid)
    for key, value in (("train.out_dir", cfg.train.out_dir), ("model.init", cfg.model.init)):
        if not value.strip():
            raise ValueError(f"{key} is empty; set it (see --help)")
    if cfg.train.micro_batch > cfg.train.global_batch:
        raise ValueError(f"train.micro_batch={cfg.train.micro_batch} is larger than train.global_batch="
                         f"{cfg.train.global_batch}; lower it (0 = no accumulation)")
    return cfg


def _check_masks_some(ratio: float, grid: int) -> None:
    """A ratio above 0 that rounds to no masked patch (K = round(N * (1 - ratio)) = N on a small grid) trained
    without a mask and said nothing: stage 2's student then saw every token its teacher did."""
    from videoprism.masking import num_visible

    n = grid * grid
    if ratio == 0 or num_visible((grid, grid), ratio) < n:
        return
    if n == 1:
        raise ValueError(f"train.mask_ratio={ratio} masks nothing on a frame of 1x1 patches (its one patch stays "
                         "visible); set train.mask_ratio=0 or raise model.resolution")
    raise ValueError(f"train.mask_ratio={ratio} masks no patch of a frame's {grid}x{grid} (model.resolution / the "
                     f"patch size; round({n} x {1 - ratio:g}) = {n} visible); raise it to at least {1 / n:g} or set 0")


def check_inputs(cfg: Config, stage: int) -> None:
    """The files a run reads and the folder it writes, and the device its kernels need: checked before the
    model is built and the data decoded, so a wrong path fails in a second with the field that holds it."""
    import torch

    from videoprism.ops import attention

    manifests = cfg.data.source == "manifest"  # the random source reads no data file (_say_unread)
    files = [("data.val", cfg.data.val)] if manifests else []
    if stage == 1 and manifests:  # stage 2 reads no text, nor model.init (STAGE_ONLY)
        files.append(("data.tokenizer", cfg.data.tokenizer))
    if stage == 1 and cfg.model.init != "random":
        files.append(("model.init", cfg.model.init))
    if stage == 2:
        files.append(("stage2.teacher", cfg.stage2.teacher))
    for key, path in files:
        if path and not os.path.isfile(path):
            what = "is a folder" if os.path.isdir(path) else "does not exist"
            where = "" if os.path.isabs(path) else f" (from the current folder: {os.path.abspath(path)})"
            fix = "pass the path of a file (see --help)"
            if os.path.isdir(path) and key in ("model.init", "stage2.teacher"):  # a training run or a checkpoint
                fix = (f"pass a run's export (OUT_DIR/model.safetensors), or write a checkpoint's with `videoprism "
                       f"export {path}`")
            raise FileNotFoundError(f"{key}={shown(path, LONGEST_PATH)} {what}{where}; {fix}")
    if stage == 2 and cfg.stage2.teacher.lower().endswith((".safetensors", ".npz")):
        from videoprism.checkpoint import checkpoint_config

        kind = checkpoint_config(cfg.stage2.teacher)[0]
        npz = cfg.stage2.teacher.lower().endswith(".npz")  # one of no known layout: its load names the keys
        if kind != "FactorizedVideoCLIP" and (kind or not npz):  # before the data is decoded
            raise ValueError(f"stage2.teacher={cfg.stage2.teacher!r} holds a {kind or 'model without a class name'}; "
                             "the teacher is a video-text model with its pooler: a stage-1 run's export or an "
                             "official LvT .npz (a stage-2 export is a student encoder)")
    out = os.path.abspath(cfg.train.out_dir)
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"train.out_dir={shown(cfg.train.out_dir, LONGEST_PATH)} cannot be created: "
                                 f"{parent!r} is a file; pick another folder")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"train.out_dir={shown(cfg.train.out_dir, LONGEST_PATH)} cannot be written: "
                              f"{parent!r} is not writable; pick another folder")
    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    backend = cfg.model.attention_backend
    if cpu and backend == "triton" and not attention.INTERPRET:
        raise ValueError("model.attention_backend=triton needs a GPU and this run is on the CPU; use 'reference' "
                         "or 'auto' (or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")
    if cpu and backend in ("flex", "flash"):
        why = "FlexAttention has no backward on the CPU" if backend == "flex" else "flash-attn's kernels need a GPU"
        raise ValueError(f"model.attention_backend={backend} cannot train on the CPU ({why}) and this run is on the "
                         "CPU; use 'reference' or 'auto'")
    if backend == "sdpa":  # else the first step fails, after the data is decoded and the run folder written
        from videoprism.config import official_config

        cap = official_config(cfg.model.name).atten_logit_cap
        if stage == 2 or cap > 0:
            why = ("stage 2's student attends on the masked time axis of BEVT masks" if stage == 2 else
                   f"{cfg.model.name} soft-caps its attention logits at {cap:g}")
            raise ValueError(f"model.attention_backend=sdpa cannot train this model ({why}, which SDPA does not do); "
                             "use 'auto', 'triton', 'flex' or 'reference'")


def config_changes(old: dict, new: dict) -> list[str]:
    """`section.field: old -> new` for every field whose value differs between two configs' dicts (`to_dict`, a
    run's config.json), fields of one only included: what a resume changed. Paths are compared as the files they
    name: relative ones joined to the dict's LAUNCH_DIR (without one, the current folder, as they are read)."""
    old, new = (_paths_from(d, d.get(LAUNCH_DIR) or os.getcwd()) for d in (old, new))
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b and (section in old or section != "preset"):  # an older version's config.json names none
                out.append(f"{section}: {shown(a, LONGEST_PATH)} -> {shown(b, LONGEST_PATH)}")
            continue
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                # the configs were built: a value is long only as a path, which prints whole up to LONGEST_PATH
                was, now = (shown(d.get(name, "(unset)"), LONGEST_PATH) for d in (a, b))
                out.append(f"{section}.{name}: {was} -> {now}")
    return out


def save_config(cfg: Config, path: str, stage: int | None = None) -> None:
    """The resolved config as JSON, written atomically. It holds every field, so `--config`
    reads back exactly this run's settings whatever preset it names (none: tiny), the folder its relative paths
    resolve from (LAUNCH_DIR: this process's) and the stage of the run (RUN_STAGE)."""
    from videoprism.paths import write_json_atomic

    try:
        run = {LAUNCH_DIR: os.getcwd(), **({RUN_STAGE: stage} if stage is not None else {})}
        write_json_atomic(path, {**cfg.to_dict(), **run}, indent=2)
    except OSError as e:  # a full disk fails in write() or close(): an OSError that names no file
        raise OSError(f"writing the run's config {path} failed ({e.strerror or e}): free space or fix the "
                      f"permissions under {os.path.dirname(os.path.abspath(path))}, or set train.out_dir to "
                      "another disk") from e


def help_text(stage: int, config: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Every field with its documentation and its value in `config` with `overrides` (what
    `--config X [overrides] --help` shows), or in the default preset if those do not build."""
    shown = f"--config {config}" + (" and the overrides given" if overrides else "")
    try:
        cfg = build_config(config, list(overrides), stage)
    except (ValueError, OSError) as e:
        cfg, shown = build_config("tiny", [], stage), f"the default preset 'tiny' (--config {config}: {e})"
    lines = [f"Configuration fields (presets: {', '.join(PRESETS)}); values shown are those of {shown}:"]
    for section in _sections(cfg):
        obj = getattr(cfg, section)
        for fl in dataclasses.fields(obj):
            choices, valid = fl.metadata.get("choices"), fl.metadata.get("valid")
            extra = f" One of: {', '.join(map(str, choices))}." if choices else f" Valid: {valid}." if valid else ""
            lines.append(f"  {section}.{fl.name}={getattr(obj, fl.name)!r}\n      {fl.metadata['help']}{extra}")
    lines.append("\nA config file (--config FILE.toml or .json) sets `preset = NAME` and [section] tables of "
                 "these fields; every run writes its resolved config to OUT_DIR/config.json, which --config reads "
                 "back. Layers: preset, file, then section.field=value overrides.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None, stage: int) -> tuple[Config, ResumeFrom | None, bool]:
    """`--config NAME [--resume [PATH] | --auto-resume] [--overwrite] [section.field=value ...]` -> (config,
    ResumeFrom or None, overwrite). `--resume` without a path resumes from the run's own out_dir."""
    import argparse

    from videoprism.cli import command_name

    # --help lists the fields with their values in the --config (and overrides) on the command line;
    # read here only for --help, and any error in them is left to the real parser.
    given = sys.argv[1:] if argv is None else argv
    config, rest = "tiny", []
    if "-h" in given or "--help" in given:
        pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
        _resume_args(pre)
        try:
            known, rest = pre.parse_known_args(given)
            _override_not_path(known, rest)
            config = known.config or _help_config(known, [a for a in rest if "=" in a], stage)
        except (argparse.ArgumentError, ValueError):
            pass
    p = argparse.ArgumentParser(
        prog=command_name(f"train.stage{stage}"), formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"VideoPrism stage-{stage} training.",
        epilog=help_text(stage, config, [a for a in rest if "=" in a and not a.startswith("-")]))
    _resume_args(p)
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_intermixed_args(argv)  # overrides before and after the options
    _override_not_path(args, args.overrides)
    if args.auto_resume and args.resume is not None:
        p.error("--resume and --auto-resume exclude each other")
    if args.auto_resume and args.overwrite:
        raise ValueError("--overwrite and --auto-resume exclude each other (--auto-resume continues the run in "
                         "train.out_dir)")
    if args.resume and not os.path.exists(args.resume):  # a typo: said as such, not as the tiny preset's data
        raise FileNotFoundError(f"--resume {shortened(args.resume, LONGEST_PATH)}: no such file or folder; pass a "
                                "run's out_dir (its latest checkpoint) or one of its checkpoints/step_* folders")
    if args.config is None and (args.resume is not None or args.auto_resume):
        cfg = _resumed_config(_resumed_dir(args.resume, args.overrides, stage), args.overrides, stage,
                              required=args.resume is not None)
    else:
        cfg = build_config(args.config or "tiny", args.overrides, stage)
    _say_unread(cfg, args.config, args.overrides, stage)
    if args.auto_resume:
        return cfg, ResumeFrom(cfg.train.out_dir, if_any=True), False
    return cfg, None if args.resume is None else ResumeFrom(args.resume or cfg.train.out_dir), args.overwrite


# The fields one stage alone reads (a section name: all its fields). Stage 2's student is its teacher's encoder
# (model.init is stage 1's starting point) and reads no text (data.tokenizer).
STAGE_ONLY = {1: ("stage1", "data.tokenizer", "model.init"), 2: ("stage2",)}


def _say_unread(cfg: Config, config: str | None, overrides: list[str], stage: int) -> None:
    """A note on rank 0 naming the fields given (overrides, a config file's tables; not a run's config.json, which
    holds every field) that this run does not read: accepted, as one file may configure both stages or both
    sources, but `python -m train.stage2 model.init=X` trained from the teacher as if it were unset, and
    `data.source=random data.train=X` or `train.eval_every=N` with no validation split did nothing, silently."""
    from videoprism.paths import echo

    keys = {o.split("=", 1)[0] for o in overrides}
    if config and config not in PRESETS and os.path.isfile(config):
        data = read_config_file(config)
        if not any(k in data for k in _RUN_KEYS):
            keys |= {f"{section}.{k}" for section, table in data.items() if isinstance(table, dict) for k in table}
    if os.environ.get("RANK", "0") != "0":
        return
    other = STAGE_ONLY[3 - stage]
    unread = sorted(k for k in keys if k in other or k.split(".")[0] in other)
    if unread:
        echo(f"note: stage {stage} does not read {', '.join(unread)} (stage {3 - stage}'s only): no effect on this "
             "run", file=sys.stderr)
    random = cfg.data.source == "random"
    files = sorted(k for k in keys if k.startswith("data.") and k != "data.source")
    if random and files:
        echo(f"note: data.source=random reads none of {', '.join(files)} (it draws seeded random clips and "
             "captions): no effect on this run", file=sys.stderr)
    if "train.eval_every" in keys and cfg.train.eval_every and (random or not cfg.data.val):
        why = "data.source=random has no validation split" if random else "data.val is not set"
        echo(f"note: train.eval_every={cfg.train.eval_every} evaluates on data.val and {why}: this run does not "
             "evaluate; set data.val=VAL.jsonl (with data.source=manifest)", file=sys.stderr)


def _resume_args(p) -> None:
    """--config, --resume, --auto-resume: on the parser, and on the --help pre-parser that picks the values shown."""
    p.add_argument("--config", default=None,
                   help=f"a preset ({', '.join(PRESETS)}) or a .toml/.json config file, e.g. the config.json a run "
                        "writes to its out_dir. Default: with --resume/--auto-resume, the config.json of the run "
                        "resumed (its out_dir kept, the overrides applied on top); else tiny")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="resume from the latest checkpoint of PATH (default: train.out_dir), also on another number "
                        "of processes (the model, optimizer and data position reshard)")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume from train.out_dir's latest checkpoint if it has one, else start at step 0: one "
                        "command for a job that a scheduler may preempt and requeue")
    p.add_argument("--overwrite", action="store_true",
                   help="write train.out_dir even though it holds another run's checkpoints or export (a fresh start "
                        "there, or --resume from another folder into it): its checkpoints are kept as "
                        "step_*.abandoned, its records as *.abandoned, its export is replaced at the end")


def _override_not_path(args, overrides: list[str]) -> None:
    """`--resume section.field=value`: argparse took the override for --resume's PATH; it is an override."""
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        overrides.append(args.resume)
        args.resume = ""


def _resumed_dir(resume: str | None, overrides: list[str], stage: int) -> str:
    """Where a resume without --config looks for the run's config.json: PATH, else the default out_dir (or the
    train.out_dir override)."""
    return resume or build_config("tiny", overrides, stage).train.out_dir


def _help_config(known, overrides: list[str], stage: int) -> str:
    """The config whose values --help shows without --config: the resumed run's config.json, as the resume takes."""
    if known.resume is None and not known.auto_resume:
        return "tiny"
    return run_config_path(_resumed_dir(known.resume, overrides, stage)) or "tiny"


def run_config_path(path: str) -> str | None:
    """The config.json of the run that `--resume PATH` names: in PATH (its out_dir), or above it (PATH is its
    checkpoints folder or one of its step_* folders). None when there is none."""
    folder = os.path.abspath(path)
    for _ in range(3):
        candidate = os.path.join(folder, "config.json")
        if os.path.isfile(candidate):
            return candidate
        folder = os.path.dirname(folder)
    return None


def _resumed_config(path: str, overrides: list[str], stage: int, *, required: bool) -> Config:
    """A resume without --config continues the run as it was configured: its saved config.json, its out_dir
    (where that file lies, wherever the command runs from), then the overrides. A preset here could change the
    model under the checkpoint (tiny weights for a base run) and moves every schedule field. `required`
    (--resume, with or without PATH): a missing config.json is said; --auto-resume's first start has none yet."""
    from videoprism.paths import echo

    main = os.environ.get("RANK", "0") == "0"
    saved = run_config_path(path)
    if saved is None:
        if required and main:
            echo(f"note: --resume {path}: no config.json there or above it; continuing with the tiny preset and "
                 "the overrides (pass --config with the run's settings)", file=sys.stderr)
        return build_config("tiny", overrides, stage)
    if main:
        echo(f"config: {saved} (the resumed run's; --config to start from another)", file=sys.stderr)
    cfg = build_config(saved, overrides, stage)
    run_dir = os.path.dirname(saved)
    if os.path.abspath(cfg.train.out_dir) == run_dir or any(o.startswith("train.out_dir=") for o in overrides):
        return cfg
    # Its out_dir is relative to where it first ran (or the run was moved): the run's folder is where it is now.
    return build_config(saved, [f"train.out_dir={run_dir}", *overrides], stage)


@dataclass(frozen=True)
class ResumeFrom:
    """Where a run continues from: a run's out_dir (its latest checkpoint) or a step_* folder.
    `if_any` (--auto-resume): start at step 0 when `path` holds no checkpoint yet, which the
    trainer decides once the ranks can agree on it."""
    path: str
    if_any: bool = False
