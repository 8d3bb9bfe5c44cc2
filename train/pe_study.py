"""The position-encoding ablation study: train one small Qwen3-VL per (variant, seed) from scratch on synthetic
long-video needle tasks (train/video_needles.py), then measure teacher-forced accuracy at 1x..16x the training
length, with and without YaRN. `scripts/pe_ablation.py` composes the config (conf/pe_ablation/) and calls
`run_one` per variant and seed; eval/pe_report.py turns the JSON files into docs/ablations.md.

Reused pieces: model/build.py (the model from a preset + overrides), the vision warm-up of the OCR demo
(train/vision_warmup.py: the tower learns to read the needle digits with a CTC head first), train/step.py's
`train_step` (packed batches, chunked loss, clipping), train/optim.py (AdamW groups, warmup + cosine), and the
model's own `set_rope_scaling` for YaRN at evaluation time.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.build import ModelSpec, build_model

from .config import Config, OptimConfig, TrainConfig, VisionWarmupConfig
from .data import pack_samples
from .optim import build_optimizer, lr_at
from .step import train_step
from .video_needles import NeedleVideoConfig, NeedleVideos


@dataclass(frozen=True)
class StudyTrainConfig:
    """One variant's training run."""
    steps: int = 600
    batch_size: int = 16               # samples packed into one row per step
    max_time_s: float = 180.0          # the per-variant budget (0: none); the run stops early when it is spent
    precision: str = "auto"            # auto: bf16 autocast on CUDA, fp32 on CPU
    loss_chunk_size: int = 1024
    log_every: int = 50
    vision_warmup: VisionWarmupConfig = field(default_factory=VisionWarmupConfig)
    warmup_images: int = 2000          # distinct digit images for the vision warm-up
    first_tasks: tuple = ()            # curriculum: the first `first_steps` steps draw only these tasks (e.g. [read]:
    first_steps: int = 0               # find and read the needle first; the mixture alone can stall, docs/needle.md)

    def __post_init__(self):
        from model.config import ConfigError

        from .video_needles import TASKS

        if self.first_steps < 0 or (self.first_steps > 0) != bool(self.first_tasks):
            raise ConfigError(f"train.first_steps={self.first_steps} and train.first_tasks={list(self.first_tasks)}: "
                              "give both (a curriculum) or neither")
        if any(t not in TASKS for t in self.first_tasks):
            raise ConfigError(f"train.first_tasks={list(self.first_tasks)} must be a subset of {TASKS}")


@dataclass(frozen=True)
class StudyEvalConfig:
    """Evaluation: lengths in multiples of data.train_groups, trials per (task, length), YaRN on / off."""
    multiples: tuple = (1, 2, 4, 8, 16)
    trials: int = 16
    yarn: tuple = (False, True)
    yarn_factor: str = "tokens"        # tokens: factor = length multiple | positions: ratio of the largest position
                                       # ids (MRoPE's positions grow more slowly than tokens)
    sparse: tuple = ()                 # block-sparse prefill methods (model/sparsity.py) scored next to dense prefill
    sparse_multiples: tuple = (1, 2, 4)  # at these length multiples, without YaRN (issue: sparse prefill accuracy)
    sparse_block_size: int = 64

    def __post_init__(self):
        from model.config import ConfigError
        from model.sparsity import METHODS

        bad = [m for m in self.sparse if m not in METHODS or m == "none"]
        if bad:
            raise ConfigError(f"eval.sparse={list(self.sparse)}: {bad} unknown; methods: {list(METHODS[1:])}")

        if self.yarn_factor not in ("tokens", "positions"):
            raise ConfigError(f"eval.yarn_factor={self.yarn_factor!r} must be tokens | positions")
        if not self.multiples or any(m < 1 for m in self.multiples):
            raise ConfigError(f"eval.multiples={list(self.multiples)} must be a non-empty list of numbers >= 1")


@dataclass(frozen=True)
class StudyConfig:
    """The whole study as composed from conf/pe_ablation/ (variants are `model.text.rope` overrides)."""
    out: str = "docs/ablations"
    smoke: bool = False
    device: str = "auto"
    variants: dict = field(default_factory=dict)   # name -> model.text.rope overrides
    run: tuple = ()                                # the variants to run (names in `variants`)
    seeds: tuple = (0, 1, 2)
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: NeedleVideoConfig = field(default_factory=NeedleVideoConfig)
    train: StudyTrainConfig = field(default_factory=StudyTrainConfig)
    eval: StudyEvalConfig = field(default_factory=StudyEvalConfig)

    def __post_init__(self):
        from model.config import ConfigError

        unknown = [v for v in self.run if v not in self.variants]
        if unknown:
            raise ConfigError(f"run: unknown variant(s) {unknown}; defined in variants: {sorted(self.variants)}")

    def variant_spec(self, name: str) -> ModelSpec:
        """The study's model with variant `name`'s rope overrides on top of `model.text.rope`."""
        text = dict(self.model.text)
        text["rope"] = {**dict(text.get("rope", {})), **dict(self.variants[name])}
        return dataclasses.replace(self.model, text=text)


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def train_variant(model, videos: NeedleVideos, cfg: StudyConfig, seed: int, device, log=print) -> dict:
    """Vision warm-up, then `cfg.train.steps` steps on fresh needle samples; returns the run's summary."""
    from .video_needles import DigitImages
    from .vision_warmup import vision_warmup

    tc = cfg.train
    warm = None
    if tc.vision_warmup.steps > 0:
        t0 = time.perf_counter()
        wcfg = dataclasses.replace(tc.vision_warmup, seed=seed)
        warm = vision_warmup(model, DigitImages(videos, tc.warmup_images, seed), wcfg, device, log=log)
        warm = {"loss": warm["loss"], "line_acc": warm["line_acc"], "wall_s": time.perf_counter() - t0}
    run_cfg = Config(optim=cfg.optim, train=TrainConfig(steps=tc.steps, precision=tc.precision,
                                                        loss_chunk_size=tc.loss_chunk_size, on_nonfinite="raise"))
    opt = build_optimizer(model, cfg.optim)
    rng = np.random.default_rng([seed, 3])
    model.train()
    history, t0, step = [], time.perf_counter(), 0
    while step < tc.steps:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_at(step, tc.steps, cfg.optim)
        tasks = tc.first_tasks if step < tc.first_steps else None  # the curriculum's first stage, then cfg.data.tasks
        batch = pack_samples([videos.train_sample(rng, tasks) for _ in range(tc.batch_size)])
        m = train_step(model, [batch], opt, run_cfg, device)
        step += 1
        history.append(round(m["loss"], 5))
        if step % tc.log_every == 0 or step == tc.steps:
            log(f"  step {step}/{tc.steps} loss {np.mean(history[-tc.log_every:]):.4f} "
                f"{time.perf_counter() - t0:.0f}s")
        if tc.max_time_s > 0 and time.perf_counter() - t0 > tc.max_time_s:
            log(f"  time budget train.max_time_s={tc.max_time_s} spent after {step} steps")
            break
    return {"steps": step, "planned_steps": tc.steps, "wall_s": time.perf_counter() - t0,
            "loss_first": float(np.mean(history[:10])), "loss_last": float(np.mean(history[-10:])),
            "loss_curve": history[:: max(1, len(history) // 50)], "vision_warmup": warm}


@torch.no_grad()
def answer_preds(model, sample, device, precision: str) -> torch.Tensor:
    """The argmax token at every answer position of one forward over the whole sample (teacher forcing)."""
    from .step import autocast

    n = int((sample.labels != -100).sum())
    with autocast(device, precision):
        out = model(sample.input_ids[None].to(device), pixel_values_videos=sample.pixel_values_videos.to(device),
                    video_grid_thw=sample.video_grid_thw.to(device),
                    position_ids=sample.position_ids[:, None].to(device), logits_to_keep=n + 1)
    return out.logits[0, :-1].argmax(-1).cpu()


def answer_correct(preds: torch.Tensor, sample) -> bool:
    """Teacher forcing (LongVA's V-NIAH rule): right when the argmax at every answer position is the gold token."""
    n = int((sample.labels != -100).sum())
    return bool((preds == sample.input_ids[-n:]).all())


@torch.no_grad()
def answer_preds_prefill(model, sample, device, precision: str, sparsity=None) -> torch.Tensor:
    """`answer_preds` through the long-context path: the prompt goes through `Qwen3VL.prefill` (with a block-sparse
    `sparsity`, or dense for None), then each gold answer token is fed on the cache (teacher forcing; one query:
    dense). The sample's own position ids are used, so rules that depend on the video's seconds per group are
    honoured."""
    from model.generation import KVCache

    from .step import autocast

    n = int((sample.labels != -100).sum())
    ids, pos = sample.input_ids.to(device), sample.position_ids.to(device)   # (L,), (3, L)
    L = ids.shape[0]
    cache = KVCache.for_model(model, 1, L + 1)
    with autocast(device, precision):
        out = model.prefill(ids[None, :L - n], cache, chunk_size=L, pixel_values_videos=sample.pixel_values_videos
                            .to(device), video_grid_thw=sample.video_grid_thw.to(device),
                            position_ids=pos[:, None, :L - n], sparsity=sparsity)
        preds = [out.logits[0, -1].argmax()]
        for j in range(L - n, L - 1):
            out = model.prefill(ids[None, j:j + 1], cache, chunk_size=1, position_ids=pos[:, None, j:j + 1])
            preds.append(out.logits[0, -1].argmax())
    return torch.stack(preds).cpu()


def task_accuracy(videos: NeedleVideos, cfg: StudyConfig, seed: int, groups: int, preds) -> dict[str, float]:
    """Accuracy per task over `cfg.eval.trials` prompts of `groups` groups (needles spread over the depth), scored
    by `preds(sample) -> answer tokens`. The prompts depend only on (seed, groups, task): every variant and every
    prefill method sees the same ones."""
    ec, acc = cfg.eval, {}
    for ti, task in enumerate(cfg.data.tasks):
        rng = np.random.default_rng([seed, 4, groups, ti])
        samples = (videos.sample(task, groups, rng, depth=(k + 0.5) / ec.trials) for k in range(ec.trials))
        acc[task] = float(np.mean([answer_correct(preds(s), s) for s in samples]))
    return acc


def evaluate_sparse(model, videos: NeedleVideos, cfg: StudyConfig, seed: int, device, log=print) -> list[dict]:
    """Accuracy per task with dense prefill ("none") and each `cfg.eval.sparse` method at `sparse_multiples`, on the
    same prompts as `evaluate_variant` (no YaRN)."""
    from model.sparsity import SparsityConfig

    model.eval()
    ec, rows = cfg.eval, []
    for method in ("none", *ec.sparse):
        sp = None if method == "none" else SparsityConfig(method, block_size=ec.sparse_block_size)
        for mult in ec.sparse_multiples:
            groups = int(round(cfg.data.train_groups * mult))
            t0 = time.perf_counter()
            acc = task_accuracy(videos, cfg, seed, groups,
                                lambda s: answer_preds_prefill(model, s, device, cfg.train.precision, sp))
            rows.append({"sparse": method, "multiple": mult, "groups": groups, "accuracy": acc,
                         "mean": float(np.mean(list(acc.values()))), "seconds": time.perf_counter() - t0})
            log(f"  eval prefill {method} x{mult}: mean acc {rows[-1]['mean']:.3f}")
    return rows


def evaluate_variant(model, videos: NeedleVideos, cfg: StudyConfig, seed: int, device, log=print) -> list[dict]:
    """Accuracy per task at each length multiple, without and with YaRN (cfg.eval)."""
    model.eval()
    ec, dc = cfg.eval, cfg.data
    train_max_pos = videos.video(dc.train_groups)[2] + 24   # + the question and answer text (about 20 tokens)
    train_tokens = len(videos.video(dc.train_groups)[0]) + 24
    rows = []
    for yarn in ec.yarn:
        for mult in ec.multiples:
            groups = int(round(dc.train_groups * mult))
            ids, _, nxt = videos.video(groups)
            factor = 1.0
            if yarn:
                factor = max(1.0, (nxt + 24) / train_max_pos if ec.yarn_factor == "positions"
                             else (len(ids) + 24) / train_tokens)
                model.set_rope_scaling("yarn", factor, original_max_position_embeddings=train_max_pos)
            t0 = time.perf_counter()
            acc = task_accuracy(videos, cfg, seed, groups, lambda s: answer_preds(model, s, device, cfg.train.precision))
            if yarn:
                model.set_rope_scaling("default", 1.0)
            rows.append({"yarn": yarn, "multiple": mult, "groups": groups, "video_tokens": len(ids),
                         "max_position": nxt, "yarn_factor": factor, "accuracy": acc,
                         "mean": float(np.mean(list(acc.values()))), "seconds": time.perf_counter() - t0})
            log(f"  eval yarn={yarn} x{mult}: {groups} groups, {len(ids)} video tokens, "
                f"mean acc {rows[-1]['mean']:.3f}")
    return rows


def run_one(cfg: StudyConfig, variant: str, seed: int, processor, log=print) -> dict:
    """Train and evaluate one (variant, seed); writes `<out>/<variant>_seed<seed>.json` and returns its content."""
    device = _device(cfg.device)
    spec = cfg.variant_spec(variant)
    torch.manual_seed(seed)
    model = build_model(spec, device)
    videos = NeedleVideos(cfg.data, model.config, processor, seed=seed, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{variant} seed {seed}: {n_params / 1e6:.1f}M params, rope {model.config.text.rope}")
    t0 = time.perf_counter()
    train = train_variant(model, videos, cfg, seed, device, log)
    rows = evaluate_variant(model, videos, cfg, seed, device, log)
    sparse_rows = evaluate_sparse(model, videos, cfg, seed, device, log) if cfg.eval.sparse else []
    result = {
        "variant": variant, "seed": seed, "smoke": cfg.smoke, "rope": dataclasses.asdict(model.config.text.rope),
        "params": n_params, "model": dataclasses.asdict(spec), "data": dataclasses.asdict(cfg.data),
        "optim": dataclasses.asdict(cfg.optim), "train_config": dataclasses.asdict(cfg.train),
        "eval_config": dataclasses.asdict(cfg.eval), "train": train, "eval": rows,
        "sparse_eval": sparse_rows,
        "tokens_per_group": videos.tokens_per_group, "wall_s": time.perf_counter() - t0,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{variant}_seed{seed}.json").write_text(json.dumps(result, indent=1))
    return result
