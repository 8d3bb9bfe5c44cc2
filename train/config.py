"""Typed training configuration: the one place where Hydra's composed config becomes dataclasses.

`python -m train` composes `conf/` with Hydra, then calls `config_from_dict(OmegaConf.to_container(cfg))` once;
everything below the entry point sees these frozen dataclasses, never a DictConfig. The conversion is strict:
an unknown key, a missing required key or a value of the wrong type raises a `ConfigError` naming the key path
(torchtitan's JobConfig and litgpt's dataclass configs follow the same rule; the converter is
model/build.py's, shared with `python -m eval`). `model.*` is model/build.py's `ModelSpec`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from model.build import ModelSpec
from model.build import config_from_dict as _config_from_dict
from model.config import ConfigError  # one error class for model and training configs

FREEZE_GROUPS = ("vision", "merger", "deepstack", "embed", "llm", "lm_head")
WARMUP_KINDS = ("ctc", "grounding")  # train.vision_warmup.kind (train/vision_warmup.py)


@dataclass(frozen=True)
class OCRGenConfig:
    """Synthetic OCR set generated before training when `enabled` (see train/ocr_data.py)."""
    enabled: bool = False
    out_dir: str = "data/ocr_synth"
    n_train: int = 2000
    n_val: int = 64
    seed: int = 0
    charset: str = "digits"          # digits | words | mixed | multilingual (train/ocr_scripts.py)
    min_len: int = 3
    max_len: int = 8
    height: int = 32
    width: int = 128
    font_size: tuple = (18, 24)
    rotation: float = 2.0            # max |degrees|
    noise: float = 0.05              # std of additive pixel noise (0..1 scale)
    align: str = "random"            # random: anywhere on the canvas | left: left edge + up to `jitter` px
    jitter: int = 4                  # max random x offset (px) with align=left
    colors: str = "random"           # random: gray levels per image | fixed: black on white
    fonts: tuple = ()                # font file names to use (e.g. [DejaVuSans.ttf]); () = every DejaVu face
    font_dir: Optional[str] = None   # folder of .ttf files; None = matplotlib's fonts/ttf
    prompt: str = "Read the text in the image."
    scripts: tuple = ()              # multilingual: names in train/ocr_scripts.SCRIPT_WORDS; () = all covered
    mix: float = 0.0                 # multilingual: probability that a line mixes scripts (and numbers)
    lines: tuple = (1, 1)            # lines per image (min, max); > 1: documents, `height` per line
    layout: str = "left"             # documents: left | center | right | random (one per page)
    blur: float = 0.0                # max Gaussian blur radius (px), uniform per image; 0 = none
    low_contrast: float = 0.0        # probability that text and background differ by only 25-60 gray levels


@dataclass(frozen=True)
class GroundingGenConfig:
    """Synthetic referring-expression set generated before training when `enabled` (train/grounding_data.py)."""
    enabled: bool = False
    out_dir: str = "data/grounding_synth"
    n_train: int = 2000
    n_val: int = 64
    seed: int = 0
    width: int = 128                 # canvas in pixels
    height: int = 128
    grid: tuple = (4, 4)             # (columns, rows) of cells; one item per cell
    objects: tuple = (3, 5)          # items per scene (min, max), before the relation distractor
    size: tuple = (0.55, 0.9)        # item side as a fraction of the cell side (min, max)
    digit_frac: float = 0.3          # probability that an item after the first (always a digit) is a digit
    kinds: tuple = ("attribute", "relation", "digit")  # expression kinds, drawn uniformly
    clutter: int = 12                # random lines / dots under the items
    noise: float = 0.02              # std of additive pixel noise (0..1 scale)
    prompt: str = "Locate {expr} in the image and output its bbox coordinates in JSON format."
    question_first: bool = False     # the prompt text before the image in the user turn (the image tokens can then
                                     # attend to the expression); Qwen3-VL's own grounding prompts put the image first
    detect_all: float = 0.0          # share of TRAINING scenes asked for every item instead of one (the answer lists
                                     # each item's bbox_2d and class label in reading order, as Qwen3-VL answers a
                                     # multi-object request); the val split always holds referring expressions
    prompt_all: str = "Outline the position of every object and output all the bbox coordinates in JSON format."
    scenes_dir: str = ""             # where a question_first / detect_all set takes its scenes from (made there when
                                     # missing; default out_dir/scenes): runs naming one folder draw the scenes once

    def __post_init__(self):
        _check(self.width >= 32 and self.height >= 32, "data.grounding.width/height", (self.width, self.height),
               ">= 32")
        _check(len(self.grid) == 2 and min(self.grid) >= 2, "data.grounding.grid", self.grid,
               "[columns, rows], each >= 2")
        _check(len(self.objects) == 2 and 2 <= self.objects[0] <= self.objects[1] < self.grid[0] * self.grid[1],
               "data.grounding.objects", self.objects, "[min, max] with 2 <= min <= max < grid cells")
        _check(len(self.size) == 2 and 0 < self.size[0] <= self.size[1] <= 1, "data.grounding.size", self.size,
               "[min, max] fractions of a cell with 0 < min <= max <= 1")
        _check(0 <= self.digit_frac <= 1, "data.grounding.digit_frac", self.digit_frac, "in [0, 1]")
        _check(bool(self.kinds) and all(k in ("attribute", "relation", "digit") for k in self.kinds),
               "data.grounding.kinds", self.kinds, "a non-empty subset of [attribute, relation, digit]")
        _check("{expr}" in self.prompt, "data.grounding.prompt", self.prompt, "a template holding {expr}")
        _check(0 <= self.detect_all <= 1, "data.grounding.detect_all", self.detect_all, "in [0, 1]")
        for name in ("n_train", "n_val", "clutter"):
            _check(getattr(self, name) >= 0, f"data.grounding.{name}", getattr(self, name), ">= 0")


@dataclass(frozen=True)
class DataConfig:
    """JSONL datasets (message format or LLaVA `conversations`), packing and loading.

    Args:
        train / val: JSONL paths; `root`: media root (default: each file's directory).
        allow_outside_root: read media paths that leave `root` (absolute, file:///, '..'); refused by default.
        token_budget: packed tokens per micro-batch (one packed row, B=1, cu_seqlens).
        max_seq_len: a sample longer than this is a broken sample (skipped or fatal by `on_error`).
        image_min_pixels / image_max_pixels: per-image pixel budget (smart_resize); video_* likewise for all frames.
    """
    train: Optional[str] = None
    val: Optional[str] = None
    root: Optional[str] = None
    allow_outside_root: bool = False  # media paths outside `root` (absolute, file:///, '..') are refused unless true
    token_budget: int = 2048
    max_seq_len: int = 2048
    max_samples_per_batch: int = 0   # 0 = no limit
    length_grouping: bool = True
    group_size: int = 64             # length-grouping window, in batches
    shuffle: bool = True
    num_workers: int = 0
    prefetch_factor: int = 2
    on_error: str = "skip"           # skip | raise
    image_min_pixels: int = 32 * 32
    image_max_pixels: int = 1024 * 32 * 32
    video_min_pixels: int = 128 * 32 * 32
    video_max_pixels: int = 2048 * 32 * 32
    video_fps: float = 2.0
    video_max_frames: int = 64
    system_prompt: Optional[str] = None
    ocr: OCRGenConfig = field(default_factory=OCRGenConfig)
    grounding: GroundingGenConfig = field(default_factory=GroundingGenConfig)

    def __post_init__(self):
        for name in ("max_seq_len", "group_size", "prefetch_factor", "image_min_pixels", "video_min_pixels",
                     "video_max_frames"):
            _check(getattr(self, name) >= 1, f"data.{name}", getattr(self, name), ">= 1")
        for name in ("num_workers", "max_samples_per_batch"):
            _check(getattr(self, name) >= 0, f"data.{name}", getattr(self, name), ">= 0")
        for kind in ("image", "video"):
            lo, hi = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            _check(hi >= lo, f"data.{kind}_max_pixels", hi, f">= data.{kind}_min_pixels ({lo})")
        _check(not (self.ocr.enabled and self.grounding.enabled), "data.grounding.enabled", True,
               "not together with data.ocr.enabled (one synthetic set per run)")
        _check(self.video_fps > 0, "data.video_fps", self.video_fps, "> 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`; per-group learning rates.

    Args:
        module_lr: absolute learning rate per parameter group (keys: vision, merger, deepstack, embed, llm,
            lm_head, lora); groups not named use `lr`.
    """
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0           # 0 disables clipping
    module_lr: dict = field(default_factory=dict)
    fused: bool = False

    def __post_init__(self):
        for name in ("lr", "weight_decay", "warmup_steps", "grad_clip"):
            _check(getattr(self, name) >= 0, f"optim.{name}", getattr(self, name), ">= 0")
        _check(self.eps > 0, "optim.eps", self.eps, "> 0")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
               "two values in [0, 1)")
        for k, v in self.module_lr.items():
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, f"optim.module_lr.{k}", v,
                   "a number >= 0")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (train/lora.py); PEFT's names: r, lora_alpha, lora_dropout, target_modules (suffixes)."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    exclude_vision: bool = True      # match target_modules only inside the language model

    def __post_init__(self):
        _check(self.alpha > 0, "train.lora.alpha", self.alpha, "> 0")
        _check(0 <= self.dropout < 1, "train.lora.dropout", self.dropout, "in [0, 1)")


@dataclass(frozen=True)
class FreezeConfig:
    """Freeze parameter groups independently (DeepStack mergers are their own group; `embed` is the token table,
    which is also the LM head when tied; `llm` is the rest of the decoder)."""
    vision: bool = False
    merger: bool = False
    deepstack: bool = False
    embed: bool = False
    llm: bool = False
    lm_head: bool = False


@dataclass(frozen=True)
class VisionWarmupConfig:
    """Optional first stage: the vision tower alone learns what the images hold (train/vision_warmup.py).

    kind: ctc (read each image's answer text left to right: OCR lines, digits) | grounding (classify every patch
    by the item covering it and regress that item's box: the synthetic grounding set's `meta.items` layout).
    """
    kind: str = "ctc"                # ctc | grounding
    steps: int = 0                   # 0: off
    lr: float = 1.0e-3
    batch_size: int = 64             # images per step
    num_workers: int = 0             # DataLoader workers decoding images
    log_every: int = 25
    seed: int = 0
    box_weight: float = 1.0          # grounding: weight of the per-patch box L1 (0..1 coordinates) beside the class CE

    def __post_init__(self):
        _check(self.kind in WARMUP_KINDS, "train.vision_warmup.kind", self.kind, " | ".join(WARMUP_KINDS))
        _check(self.box_weight >= 0, "train.vision_warmup.box_weight", self.box_weight, ">= 0")
        for name in ("steps", "num_workers"):
            _check(getattr(self, name) >= 0, f"train.vision_warmup.{name}", getattr(self, name), ">= 0")
        for name in ("batch_size", "log_every"):
            _check(getattr(self, name) >= 1, f"train.vision_warmup.{name}", getattr(self, name), ">= 1")
        _check(self.lr > 0, "train.vision_warmup.lr", self.lr, "> 0")


@dataclass(frozen=True)
class TrainConfig:
    """Loop, precision, checkpointing and validation settings."""
    out_dir: str = "runs/default"
    mode: str = "full"               # full | lora
    steps: int = 100
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    precision: str = "auto"          # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    checkpoint_vision: bool = True   # with activation_checkpointing: also the vision blocks (False: faster, more memory)
    compile: bool = False            # torch.compile each vision block and decoder layer (train.parallel.apply_compile)
    loss_chunk_size: int = 1024      # tokens per lm_head chunk in the chunked cross-entropy (>= 1)
    on_nonfinite: str = "raise"      # a NaN / inf loss or gradient: raise (stop, nothing saved) | skip (no update)
    aux_loss_coef: float = 0.001     # MoE load-balancing loss weight (models with experts)
    log_every: int = 10
    eval_every: int = 0              # 0: only at the end
    eval_samples: int = 32           # validation samples for greedy-generation CER (0: loss only)
    eval_max_new_tokens: int = 24
    eval_metric: str = "cer"         # cer | grounding (adds Acc@0.5, mean IoU, point-in-box of the first box)
    save_every: int = 0              # 0: only at the end
    keep_last: int = 2
    resume: str = "auto"             # auto (latest in out_dir/checkpoints if any) | none | <checkpoint dir>
    export: bool = True              # final save_pretrained (merged LoRA) to out_dir/final
    max_time_s: float = 0.0          # stop (and save) after this wall time; 0 = no limit
    stop_after_steps: int = 0        # stop (and save) after this many steps in this invocation (time-sliced jobs)
    num_threads: int = 0             # torch.set_num_threads on CPU; 0 = leave as is
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    vision_warmup: VisionWarmupConfig = field(default_factory=VisionWarmupConfig)

    def __post_init__(self):
        # each of these would otherwise fail after step 1 (log_every), after all the training (eval_max_new_tokens)
        # or be ignored without a word (negative counts)
        for name in ("log_every", "eval_max_new_tokens"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), ">= 1")
        for name in ("eval_every", "eval_samples", "save_every", "keep_last", "max_time_s", "stop_after_steps",
                     "num_threads", "aux_loss_coef"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), ">= 0")


@dataclass(frozen=True)
class ParallelConfig:
    """FSDP2 (`fully_shard`) under torchrun; `none` runs single-process. backend auto: nccl on CUDA, gloo on CPU."""
    strategy: str = "none"           # none | fsdp
    backend: str = "auto"
    reshard_after_forward: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    """wandb (offline by default) and the tqdm progress bar."""
    wandb_mode: str = "offline"      # online | offline | disabled
    project: str = "qwen3vl-lab"
    run_name: Optional[str] = None
    progress_bar: bool = True


@dataclass(frozen=True)
class Config:
    """The whole training run, as composed from conf/ (the `experiment` group only overrides the others)."""
    name: str = "default"
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        _check(self.train.mode in ("full", "lora"), "train.mode", self.train.mode, "full | lora")
        _check(self.train.precision in ("auto", "bf16", "fp32"), "train.precision", self.train.precision,
               "auto | bf16 | fp32")
        _check(self.train.eval_metric in ("cer", "grounding"), "train.eval_metric", self.train.eval_metric,
               "cer | grounding")
        _check(self.train.device in ("auto", "cpu", "cuda"), "train.device", self.train.device, "auto|cpu|cuda")
        _check(self.data.on_error in ("skip", "raise"), "data.on_error", self.data.on_error, "skip | raise")
        _check(self.train.on_nonfinite in ("skip", "raise"), "train.on_nonfinite", self.train.on_nonfinite,
               "skip | raise")
        _check(self.parallel.strategy in ("none", "fsdp"), "parallel.strategy", self.parallel.strategy,
               "none | fsdp")
        _check(self.logging.wandb_mode in ("online", "offline", "disabled"), "logging.wandb_mode",
               self.logging.wandb_mode, "online | offline | disabled")
        ocr = self.data.ocr
        _check(ocr.charset in ("digits", "words", "mixed", "multilingual"), "data.ocr.charset", ocr.charset,
               "digits | words | mixed | multilingual")
        _check(ocr.layout in ("left", "center", "right", "random"), "data.ocr.layout", ocr.layout,
               "left | center | right | random")
        _check(len(ocr.lines) == 2 and 1 <= ocr.lines[0] <= ocr.lines[1], "data.ocr.lines", ocr.lines,
               "[min, max] with 1 <= min <= max")
        for name in ("mix", "low_contrast"):
            _check(0.0 <= getattr(ocr, name) <= 1.0, f"data.ocr.{name}", getattr(ocr, name), "in [0, 1]")
        _check(ocr.blur >= 0, "data.ocr.blur", ocr.blur, ">= 0")
        _check(self.data.ocr.align in ("random", "left"), "data.ocr.align", self.data.ocr.align, "random | left")
        _check(self.data.ocr.colors in ("random", "fixed"), "data.ocr.colors", self.data.ocr.colors, "random | fixed")
        warm = self.train.vision_warmup
        if warm.steps > 0:  # a synthetic set whose labels the chosen warm-up cannot read fails here, not after minutes
            _check(not (warm.kind == "ctc" and self.data.grounding.enabled), "train.vision_warmup.kind", warm.kind,
                   "grounding with data.grounding.enabled (a CTC reader of the JSON box answers learns nothing "
                   "about where the items are)")
            _check(not (warm.kind == "grounding" and self.data.ocr.enabled), "train.vision_warmup.kind", warm.kind,
                   "ctc with data.ocr.enabled (OCR records carry no item layout to classify patches by)")
        for k in self.optim.module_lr:
            _check(k in FREEZE_GROUPS + ("lora",), "optim.module_lr", k, f"keys in {FREEZE_GROUPS + ('lora',)}")
        for name, v in (("train.steps", self.train.steps), ("train.grad_accum", self.train.grad_accum),
                        ("data.token_budget", self.data.token_budget), ("train.lora.r", self.train.lora.r),
                        ("train.loss_chunk_size", self.train.loss_chunk_size)):
            _check(v >= 1, name, v, ">= 1")
        _check(self.data.max_seq_len <= self.data.token_budget, "data.max_seq_len", self.data.max_seq_len,
               f"<= data.token_budget ({self.data.token_budget}): a sample must fit in one packed batch")


def _check(ok: bool, key: str, value, expected: str):
    if not ok:
        raise ConfigError(f"config: {key}={value!r} is invalid; expected {expected}")


def config_from_dict(d: dict, cls: type = Config, path: str = "") -> Any:
    """`model.build.config_from_dict` with the training `Config` as the default class (strict; ConfigError)."""
    return _config_from_dict(d, cls, path)


def config_to_dict(cfg) -> dict:
    """Plain nested dict of a config dataclass (for logging and checkpoint metadata)."""
    return dataclasses.asdict(cfg)
