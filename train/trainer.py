"""The training job: `train(cfg)` wires data, model, optimizer and logging together and runs the loop.

One function runs a whole job from a typed `train.config.Config`; the pieces live beside it so tests and notebooks
can drive them directly: model building (model/build.py), optimizer and schedule (train/optim.py), the step and
validation (train/step.py), checkpointing, compile and FSDP (train/checkpoint.py, train/parallel.py), export
(train/export.py) and logging (train/logger.py).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.build import build_model

from .checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from .config import Config, ConfigError, config_to_dict
from .data import (BatchStream, ChatEncoder, DataError, PackedBatchSampler, SFTDataset, count_label_tokens,
                   dataset_root)
from .export import export
from .grounding_data import generate_grounding_dataset
from .logger import Logger
from .ocr_data import generate_ocr_dataset
from .optim import apply_freezing, build_optimizer, lr_at
from .parallel import (all_reduce_sum, apply_activation_checkpointing, apply_compile, apply_fsdp,
                       init_distributed)
from .step import NonFiniteError, evaluate, train_step


def _device(cfg: Config) -> torch.device:
    """train.device, with auto = CUDA when available."""
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _data_paths(cfg: Config, rank: int, distributed: bool) -> tuple[str, str | None]:
    """(train, val) JSONL paths; generates the synthetic OCR or grounding set first when data.ocr.enabled or
    data.grounding.enabled (rank 0 only)."""
    data = cfg.data
    train_path, val_path = data.train, data.val
    for synth, generate in ((data.ocr, generate_ocr_dataset), (data.grounding, generate_grounding_dataset)):
        if not synth.enabled:
            continue
        if rank == 0:
            generate(synth)
        if distributed:
            dist.barrier()
        train_path = train_path or os.path.join(synth.out_dir, "train.jsonl")
        val_path = val_path or os.path.join(synth.out_dir, "val.jsonl")
    if not train_path:
        raise ValueError("no training data: set data.train=<file.jsonl> (or data.ocr.enabled=true / "
                         "data.grounding.enabled=true)")
    return train_path, val_path


def _resume_from(cfg: Config, ckpt_root: Path, rank: int) -> tuple[Path | None, bool]:
    """The checkpoint to resume from, and whether it is verified already: train.resume = auto (the newest one
    that passes its integrity check, if any) | none | <dir> (exactly that one)."""
    if cfg.train.resume == "auto":
        return resume_checkpoint(ckpt_root, log=print if rank == 0 else (lambda msg: None)), True
    return (None if cfg.train.resume == "none" else Path(cfg.train.resume)), False


def _prepare_model(model, cfg: Config, train_ds, fresh: bool, device) -> tuple[dict, dict | None]:
    """LoRA, freezing, the vision warm-up (fresh runs: a checkpoint already holds the warmed-up tower), then from
    outside the model: activation checkpointing, compile, FSDP. Returns (trainable counts per group, warm-up result).
    """
    distributed = cfg.parallel.strategy == "fsdp"
    if cfg.train.mode == "lora":
        from .lora import apply_lora

        lc = cfg.train.lora
        apply_lora(model, lc.r, lc.alpha, lc.dropout, lc.target_modules, lc.exclude_vision)
    counts = apply_freezing(model, cfg.train.freeze)
    warmup_result = None
    if cfg.train.vision_warmup.steps > 0 and fresh:
        if distributed:
            raise ConfigError("train.vision_warmup runs single-process; warm up once, then launch torchrun with "
                              "model.path=<that export>")
        if counts.get("vision", 0) == 0:
            raise ConfigError("train.vision_warmup.steps > 0 but the vision tower is frozen (train.freeze.vision "
                              "or mode=lora): nothing to warm up")
        from .vision_warmup import vision_warmup

        t_warm = time.perf_counter()
        warmup_result = vision_warmup(model, train_ds, cfg.train.vision_warmup, device, log=print)
        warmup_result["wall_s"] = time.perf_counter() - t_warm
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model, vision=cfg.train.checkpoint_vision)
    if cfg.train.compile:
        apply_compile(model, dynamic=None)  # packed batches change length: dynamic shapes after the first recompile
    if distributed:
        apply_fsdp(model, cfg.parallel, device.type)
    return counts, warmup_result


def _should_stop(cfg: Config, step: int, start_step: int, t_start: float, world: int, device) -> bool:
    """train.max_time_s passed (on any rank) or train.stop_after_steps taken in this invocation."""
    stop = cfg.train.max_time_s > 0 and time.perf_counter() - t_start > cfg.train.max_time_s
    stop = bool(all_reduce_sum(1.0 if stop else 0.0, device) > 0) if world > 1 else stop
    return stop or (cfg.train.stop_after_steps > 0 and step - start_step >= cfg.train.stop_after_steps)


def _next_micro_batches(stream: BatchStream, accum: int, device, logger, dropped: dict) -> list[dict]:
    """The next optimizer step's micro-batches. When no sample of them loaded on any rank (every one failed to
    decode: pack_samples dropped them all) they are dropped, counted and the next ones drawn; a whole epoch of
    such draws is a DataError."""
    for _ in range(max(1, stream.steps_per_epoch) + 1):
        micro = [next(stream) for _ in range(accum)]
        n = sum(count_label_tokens(b) for b in micro)
        if all_reduce_sum(n, device) > 0:
            return micro
        dropped["batches"] += 1
        logger.print(f"dropped a step's micro-batches: none of their {sum(b['n_dropped'] for b in micro)} local "
                     f"sample(s) loaded (see the data warnings)")
    raise DataError("a whole epoch of micro-batches failed to load; check the dataset's media")


def train(cfg: Config) -> dict:
    """Run one training job end to end; returns {"history", "evals", "final_dir", "checkpoint", "model", ...}.

    Args:
        cfg: the typed config (see conf/ and train/config.py).
    """
    device = _device(cfg)
    rank, world, local_rank = init_distributed(cfg.parallel, device.type)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    if cfg.train.num_threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.train.num_threads)
    distributed = cfg.parallel.strategy == "fsdp"
    out_dir = Path(cfg.train.out_dir)
    ckpt_root = out_dir / "checkpoints"
    train_path, val_path = _data_paths(cfg, rank, distributed)

    # -- model and data (the seed fixes the random init, then LoRA's)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device)
    from model import load_processor

    processor = load_processor(cfg.model.path)
    encoder = ChatEncoder(processor, model.config, cfg.data)
    train_ds, val_ds = (SFTDataset(p, encoder, dataset_root(cfg.data, p), cfg.data.max_seq_len, cfg.data.on_error)
                        if p else None for p in (train_path, val_path))
    resume_from, verified = _resume_from(cfg, ckpt_root, rank)
    counts, warmup_result = _prepare_model(model, cfg, train_ds, fresh=resume_from is None, device=device)
    optimizer = build_optimizer(model, cfg.optim)
    start_step, position = 0, {"epoch": 0, "offset": 0}
    if resume_from is not None:
        st = load_checkpoint(resume_from, model, optimizer, distributed=distributed, verify=not verified)
        start_step, position = st["step"], st["position"]
        warmup_result = st.get("vision_warmup")
    elif warmup_result is not None and cfg.train.save_every > 0:
        # the warmed-up tower is minutes of work: a run cut before its first checkpoint resumes from here
        save_checkpoint(ckpt_root, 0, model, optimizer, {"step": 0, "position": position, "config":
                        config_to_dict(cfg), "history_tail": [], "vision_warmup": warmup_result},
                        cfg.train.keep_last, distributed)

    sampler = PackedBatchSampler(train_ds.lengths, cfg.data.token_budget, seed=cfg.train.seed,
                                 shuffle=cfg.data.shuffle, length_grouping=cfg.data.length_grouping,
                                 group_size=cfg.data.group_size, max_samples=cfg.data.max_samples_per_batch)
    stream = BatchStream(train_ds, sampler, rank, world, cfg.train.grad_accum, cfg.data.num_workers,
                         cfg.data.prefetch_factor, epoch=position["epoch"], offset=position["offset"])
    logger = Logger(cfg, rank, start_step)
    if resume_from is not None:
        logger.print(f"resumed from {resume_from} at step {start_step}")
    logger.print(f"{cfg.name}: {sum(counts.values()) / 1e6:.2f}M trainable params {counts}; "
                 f"{len(train_ds)} train samples ({len(train_ds.broken)} broken skipped), device {device}, "
                 f"world {world}")

    # -- the loop
    history, evals = [], []
    dropped = {"batches": 0}  # optimizer steps' worth of micro-batches in which no sample loaded
    t_start = time.perf_counter()
    step = start_step
    last_ckpt = None

    def do_eval():
        if val_ds is None:
            return
        res = evaluate(model, val_ds, cfg, device, processor.tokenizer)
        res["step"] = step
        evals.append(res)
        logger.eval(step, res)

    if start_step == 0 and cfg.train.eval_every > 0:
        do_eval()
    tokens_since, t_since = 0, time.perf_counter()
    while step < cfg.train.steps:
        mult = lr_at(step, cfg.train.steps, cfg.optim)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        micro = _next_micro_batches(stream, cfg.train.grad_accum, device, logger, dropped)
        try:
            metrics = train_step(model, micro, optimizer, cfg, device, world)
        except NonFiniteError as e:
            logger.close()
            raise NonFiniteError(f"step {step + 1}: {e}") from e
        step += 1
        if metrics["skipped"]:
            logger.print(f"step {step}: non-finite loss or gradient, update skipped (train.on_nonfinite=skip)")
        tokens_since += metrics["tokens"]
        dt = time.perf_counter() - t_since
        metrics.update(step=step, lr=optimizer.param_groups[0]["lr"])
        history.append(metrics)
        logger.step(step, metrics, optimizer.param_groups[0]["lr"], tokens_since / max(dt, 1e-9))
        if step % 10 == 0:
            tokens_since, t_since = 0, time.perf_counter()
        timed_out = _should_stop(cfg, step, start_step, t_start, world, device)
        if cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0 and step < cfg.train.steps and not timed_out:
            do_eval()
        if (cfg.train.save_every > 0 and step % cfg.train.save_every == 0) or step == cfg.train.steps or timed_out:
            state = {"step": step, "position": stream.position, "config": config_to_dict(cfg),
                     "history_tail": history[-5:], "vision_warmup": warmup_result}
            last_ckpt = save_checkpoint(ckpt_root, step, model, optimizer, state, cfg.train.keep_last, distributed)
        if timed_out:
            logger.print(f"stopping at step {step} (train.max_time_s / train.stop_after_steps); resume=auto continues")
            break

    # -- the end: last validation, export, result.json
    finished = step >= cfg.train.steps
    if finished and (not evals or evals[-1]["step"] != step):
        do_eval()
    final_dir = None
    if finished and cfg.train.export:
        final_dir = export(model, out_dir / "final", cfg, rank, distributed)
        if rank == 0:
            logger.print(f"exported {final_dir}")
    logger.close()
    result = {"history": history, "evals": [{k: v for k, v in e.items() if k != "examples"} for e in evals],
              "final_dir": str(final_dir) if final_dir else None, "checkpoint": str(last_ckpt) if last_ckpt else None,
              "wall_s": time.perf_counter() - t_start, "steps": step, "vision_warmup": warmup_result,
              "dropped_batches": dropped["batches"]}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    result["model"] = model  # for notebooks and tests (not serialised)
    return result
