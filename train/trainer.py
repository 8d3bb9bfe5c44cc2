"""The fine-tuning loop: model / LoRA / freezing / optimizer setup, the train step, validation, checkpoints, export.

One function, `train(cfg)`, runs a whole job from a typed `train.config.Config`; the pieces it uses are public so
tests and notebooks can drive them directly (`build_model`, `build_optimizer`, `lr_at`, `train_step`, `evaluate`).
Loss: mean next-token cross-entropy over all supervised tokens of the optimizer step (all micro-batches and
ranks), computed chunk-wise from hidden states (train/loss.py), plus the MoE load-balancing loss when the model
has experts. Mixed precision is bf16 autocast on CUDA (fp32 master weights), fp32 on CPU by default.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, FreezeConfig, ModelConfig, OptimConfig, config_to_dict
from .data import (BatchStream, ChatEncoder, PackedBatchSampler, SFTDataset, count_label_tokens, dataset_root,
                   pack_samples)
from .loss import chunked_cross_entropy
from .ocr_data import character_error_rate, generate_ocr_dataset
from .parallel import all_reduce_sum, apply_fsdp, full_state_dict, init_distributed

log = logging.getLogger("train")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- model
def _replace_nested(dc, overrides: dict, where: str):
    """dataclasses.replace that recurses into nested dataclass fields and turns lists into tuples."""
    fields = {f.name for f in dataclasses.fields(dc)}
    kw = {}
    for k, v in overrides.items():
        if k not in fields:
            raise ValueError(f"config: unknown field {where}.{k}; valid: {sorted(fields)}")
        cur = getattr(dc, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            v = _replace_nested(cur, v, f"{where}.{k}")
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return dataclasses.replace(dc, **kw)


def model_config(cfg: ModelConfig):
    """The Qwen3VLConfig a random-init run builds: preset with text / vision / top overrides applied."""
    from model import preset

    base = preset(cfg.preset)
    text = _replace_nested(base.text, cfg.text, "model.text")
    vis_over = dict(cfg.vision)
    vis_over.setdefault("out_hidden_size", text.hidden_size)    # the merger projects into the LLM width
    vision = _replace_nested(base.vision, vis_over, "model.vision")
    return _replace_nested(dataclasses.replace(base, text=text, vision=vision), cfg.top, "model.top")


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """Qwen3VL from `cfg.path` (load_pretrained) or a random-init preset; in train mode.

    Args:
        cfg: ModelConfig.  device: where the parameters live.
    """
    from model import Qwen3VL, load_pretrained

    dtype = _DTYPES[cfg.dtype]
    if cfg.path:
        m = load_pretrained(cfg.path, dtype=dtype, device=device, progress=False,
                            attn_backend=cfg.top.get("attn_backend"))
    else:
        m = Qwen3VL(model_config(cfg)).to(device=device, dtype=dtype)
    return m.train()


def param_group(name: str) -> str:
    """Which freezing / learning-rate group a parameter belongs to.

    Args:
        name: parameter name in the official layout (e.g. `model.visual.blocks.0.attn.qkv.weight`).
    Returns:
        one of lora, deepstack, merger, vision, lm_head, embed, llm.
    """
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    if name.startswith("model.visual.deepstack_merger_list."):
        return "deepstack"
    if name.startswith("model.visual.merger."):
        return "merger"
    if name.startswith("model.visual."):
        return "vision"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("model.language_model.embed_tokens."):
        return "embed"
    return "llm"


def apply_freezing(model: torch.nn.Module, freeze: FreezeConfig) -> dict[str, int]:
    """Set requires_grad=False on every parameter of the frozen groups; returns trainable counts per group.

    A tied lm_head shares the embedding parameter, so it follows the `embed` group.
    """
    counts: dict[str, int] = {}
    for n, p in model.named_parameters():
        g = param_group(n)
        if g != "lora" and getattr(freeze, g):
            p.requires_grad_(False)
        if p.requires_grad:
            counts[g] = counts.get(g, 0) + p.numel()
    if not counts:
        raise ValueError("every parameter is frozen: nothing to train (check train.freeze / train.mode)")
    return counts


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one param group per (module group, decay / no decay).

    Args:
        model: the model (frozen parameters are left out).
        cfg: OptimConfig; `module_lr[group]` overrides `lr`; no weight decay on 1-D params (norms, biases).
    """
    groups: dict[tuple[str, bool], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((param_group(n), p.ndim >= 2), []).append(p)
    param_groups = []
    for (g, decay), ps in sorted(groups.items()):
        lr = cfg.module_lr.get(g, cfg.lr)
        param_groups.append({"params": ps, "lr": lr, "base_lr": lr, "name": f"{g}{'' if decay else '.no_decay'}",
                             "weight_decay": cfg.weight_decay if decay else 0.0})
    kw = {"fused": True} if cfg.fused else {"foreach": True}  # foreach: one kernel per op for all params (CPU too)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kw)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio.

    Args:
        step: steps already taken.  total: planned steps.  cfg: warmup_steps, min_lr_ratio.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(device, precision: str):
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def forward_losses(model, batch: dict, chunk_size: int, precision: str = "fp32"):
    """Per-token losses of one packed batch (and the model output for aux losses).

    Args:
        model: Qwen3VL (possibly FSDP-sharded).  batch: output of `pack_samples`, on the model's device.
    Returns:
        (losses (N,) fp32 for the N supervised positions in order, output).
    """
    dev = batch["input_ids"].device
    with _autocast(dev, precision):
        out = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                    position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"], compute_logits=False)
        losses = chunked_cross_entropy(out.last_hidden_state, _lm_head_weight(model), batch["labels"], chunk_size)
    return losses, out


def _lm_head_weight(model):
    w = model.lm_head.weight
    # FSDP2 keeps the root unsharded after forward (reshard_after_forward=False), so this is the full tensor
    if type(w).__name__ == "DTensor":
        raise RuntimeError("lm_head.weight is sharded after forward; the root must use reshard_after_forward=False")
    return w


def train_step(model, micro_batches: list[dict], optimizer, cfg: Config, device, world: int = 1) -> dict:
    """One optimizer step over `micro_batches` (this rank's share): forward, chunked loss, backward, clip, step.

    The loss is the mean over every supervised token of the step on all ranks (so packing, accumulation and
    data parallelism do not change it); gradients are scaled by `world` because FSDP averages over ranks.
    Returns: {"loss", "aux_loss", "grad_norm", "tokens", "label_tokens", "samples"} (global sums / means).
    """
    n_labels = all_reduce_sum(sum(count_label_tokens(b) for b in micro_batches), device)
    if n_labels == 0:
        raise RuntimeError("an optimizer step without supervised tokens (all labels are -100)")
    loss_sum, aux_sum, tokens, samples = 0.0, 0.0, 0, 0
    moe = model.config.is_moe
    for i, b in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        if b["input_ids"] is None:  # every sample failed to load: keep collectives in step with a dummy token
            b = _dummy_batch(model)
        b = _to(b, device)
        losses, out = forward_losses(model, b, cfg.train.loss_chunk_size, cfg.train.precision)
        loss = losses.sum() / n_labels * world
        if moe and cfg.train.aux_loss_coef > 0:
            from model.moe import load_balancing_loss

            aux = load_balancing_loss(out.router_logits, model.config.text.moe.num_experts_per_tok)
            loss = loss + cfg.train.aux_loss_coef * aux / len(micro_batches)
            aux_sum += float(aux.detach()) / len(micro_batches)
        loss.backward()
        loss_sum += float(losses.detach().sum())
        tokens += int(b["input_ids"].numel())
        samples += int(b["cu_seqlens"].numel() - 1)
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if hasattr(
            torch.nn.utils, "get_total_norm") else torch.zeros(())
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": all_reduce_sum(loss_sum, device) / n_labels, "aux_loss": all_reduce_sum(aux_sum, device) / world,
            "grad_norm": float(grad_norm), "tokens": all_reduce_sum(tokens, device), "label_tokens": n_labels,
            "samples": all_reduce_sum(samples, device)}


def _dummy_batch(model) -> dict:
    ids = torch.tensor([[0, 0]])
    return {"input_ids": ids, "labels": torch.tensor([[-100, 0]]), "position_ids": torch.zeros(3, 1, 2, dtype=torch.long),
            "cu_seqlens": torch.tensor([0, 2], dtype=torch.int32), "pixel_values": None, "image_grid_thw": None,
            "pixel_values_videos": None, "video_grid_thw": None}


# ----------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def evaluate(model, dataset: SFTDataset, cfg: Config, device, tokenizer=None) -> dict:
    """Validation loss over the whole set and, if `eval_samples` > 0, CER of greedy generations.

    Args:
        model: the model.  dataset: validation SFTDataset.  tokenizer: for decoding (CER).
    Returns:
        {"val_loss", "cer" (or None), "examples": [(prediction, reference), ...]}.
    """
    was_training = model.training
    model.eval()
    sampler = PackedBatchSampler(dataset.lengths, cfg.data.token_budget, shuffle=False, length_grouping=False)
    total, count = 0.0, 0
    for idx in sampler.batches(0):
        b = pack_samples([dataset[i] for i in idx])
        if b["input_ids"] is None:
            continue
        losses, _ = forward_losses(model, _to(b, device), cfg.train.loss_chunk_size, cfg.train.precision)
        total += float(losses.sum())
        count += losses.numel()
    res = {"val_loss": total / max(1, count), "cer": None, "examples": []}
    n = min(cfg.train.eval_samples, len(dataset))
    if n > 0 and tokenizer is not None:
        preds, refs = [], []
        for s in range(0, n, 32):
            preds += _generate_batch(model, [dataset.prompt(i) for i in range(s, min(n, s + 32))], cfg, device,
                                     tokenizer)
            refs += [dataset.answer(i) for i in range(s, min(n, s + 32))]
        res["cer"] = character_error_rate(preds, refs)
        res["examples"] = list(zip(preds[:4], refs[:4]))
    if was_training:
        model.train()
    return res


def _generate_batch(model, prompts: list, cfg: Config, device, tokenizer, return_ids: bool = False) -> list:
    """Greedy answers (strings, or new-token id lists with `return_ids`) for Encoded prompts, left-padded batch."""
    L = max(p.input_ids.numel() for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - p.input_ids.numel():] = p.input_ids
        mask[r, L - p.input_ids.numel():] = 1
    kw = {}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(p, key) for p in prompts if getattr(p, key) is not None]
        if parts:
            kw[key] = torch.cat(parts).to(device)
    with _autocast(device, cfg.train.precision):
        out = model.generate(ids.to(device), attention_mask=mask.to(device) if not bool(mask.all()) else None,
                             max_new_tokens=cfg.train.eval_max_new_tokens, pad_token_id=pad, **kw)
    new = out[:, L:].cpu()
    if return_ids:
        return [[t for t in row.tolist() if t != pad] for row in new]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


# ----------------------------------------------------------------------------------------------- the job
class _Logger:
    """tqdm bar (loss, tokens/s, lr, ETA) + wandb (offline by default) + plain lines; rank 0 only."""

    def __init__(self, cfg: Config, rank: int, start_step: int):
        self.rank, self.cfg = rank, cfg
        self.bar, self.wandb = None, None
        if rank != 0:
            return
        if cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc=cfg.name, dynamic_ncols=True)
        if cfg.logging.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name or cfg.name,
                                    mode=cfg.logging.wandb_mode, dir=cfg.train.out_dir, config=config_to_dict(cfg))

    def step(self, step: int, metrics: dict, lr: float, tok_s: float):
        """Advance the bar; log metrics to wandb every step and print every `train.log_every` steps."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}")
        if self.wandb is not None:
            self.wandb.log({"train/loss": metrics["loss"], "train/lr": lr, "train/tokens_per_s": tok_s,
                            "train/grad_norm": metrics["grad_norm"], "train/aux_loss": metrics["aux_loss"]}, step=step)
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            self.print(f"step {step:5d}/{self.cfg.train.steps}  loss {metrics['loss']:.4f}  lr {lr:.2e}  "
                       f"grad_norm {metrics['grad_norm']:.3f}  tok/s {tok_s:.0f}")

    def eval(self, step: int, res: dict):
        """Print and log one validation result (loss, CER, a few examples)."""
        if self.rank != 0:
            return
        cer = "n/a" if res["cer"] is None else f"{res['cer']:.4f}"
        ex = "  ".join(f"{p!r}->{r!r}" for p, r in res["examples"][:3])
        self.print(f"eval step {step:5d}  val_loss {res['val_loss']:.4f}  cer {cer}  {ex}")
        if self.wandb is not None:
            d = {"val/loss": res["val_loss"]}
            if res["cer"] is not None:
                d["val/cer"] = res["cer"]
            self.wandb.log(d, step=step)

    def print(self, msg: str):
        """Print on rank 0 without breaking the progress bar."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        """Close the bar and finish the wandb run."""
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def train(cfg: Config) -> dict:
    """Run one training job end to end; returns {"history", "evals", "final_dir", "checkpoint", "model", ...}.

    Args:
        cfg: the typed config (see conf/ and train/config.py).
    """
    device = torch.device("cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else
                          (cfg.train.device if cfg.train.device != "auto" else "cpu"))
    rank, world, local_rank = init_distributed(cfg.parallel, device.type)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    if cfg.train.num_threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.train.num_threads)
    distributed = cfg.parallel.strategy == "fsdp"
    out_dir = Path(cfg.train.out_dir)
    ckpt_root = out_dir / "checkpoints"

    # -- data
    data = cfg.data
    train_path, val_path = data.train, data.val
    if data.ocr.enabled:
        if rank == 0:
            paths = generate_ocr_dataset(data.ocr)
        if distributed:
            dist.barrier()
        paths = {"train": os.path.join(data.ocr.out_dir, "train.jsonl"),
                 "val": os.path.join(data.ocr.out_dir, "val.jsonl")}
        train_path, val_path = train_path or paths["train"], val_path or paths["val"]
    if not train_path:
        raise ValueError("no training data: set data.train=<file.jsonl> (or data.ocr.enabled=true)")

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device)
    from model import load_processor

    processor = load_processor(cfg.model.path)
    tokenizer = processor.tokenizer
    encoder = ChatEncoder(processor, model.config, data)
    train_ds = SFTDataset(train_path, encoder, dataset_root(data, train_path), data.max_seq_len, data.on_error)
    val_ds = SFTDataset(val_path, encoder, dataset_root(data, val_path), data.max_seq_len, data.on_error) \
        if val_path else None

    # -- model surgery, parallelism, optimizer
    if cfg.train.mode == "lora":
        from .lora import apply_lora

        lc = cfg.train.lora
        apply_lora(model, lc.r, lc.alpha, lc.dropout, lc.target_modules, lc.exclude_vision)
    counts = apply_freezing(model, cfg.train.freeze)
    start_step, position = 0, {"epoch": 0, "offset": 0}
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = latest_checkpoint(ckpt_root)
    elif cfg.train.resume != "none":
        resume_from = Path(cfg.train.resume)
    warm = cfg.train.vision_warmup
    warmup_result = None  # stage 1's CTC losses, when it ran in this invocation
    if warm.steps > 0 and resume_from is None:
        # first stage (a fresh run only: a checkpoint already holds the warmed-up tower)
        if distributed:
            raise ConfigError("train.vision_warmup runs single-process; warm up once, then launch torchrun with "
                              "model.path=<that export>")
        if counts.get("vision", 0) == 0:
            raise ConfigError("train.vision_warmup.steps > 0 but the vision tower is frozen (train.freeze.vision or "
                              "mode=lora): nothing to warm up")
        from .vision_warmup import vision_warmup

        t_warm = time.perf_counter()
        warmup_result = vision_warmup(model, train_ds, warm, device, log=print)
        warmup_result["wall_s"] = time.perf_counter() - t_warm
    if cfg.train.activation_checkpointing:
        model.set_activation_checkpointing(True, vision=cfg.train.checkpoint_vision)
    if cfg.train.compile:
        model.compile_blocks(dynamic=None)  # packed batches change length: dynamic shapes after the first recompile
    if distributed:
        apply_fsdp(model, cfg.parallel, device.type)
    optimizer = build_optimizer(model, cfg.optim)

    # -- resume
    if resume_from is not None:
        st = load_checkpoint(resume_from, model, optimizer, distributed=distributed)
        start_step, position = st["step"], st["position"]

    sampler = PackedBatchSampler(train_ds.lengths, data.token_budget, seed=cfg.train.seed, shuffle=data.shuffle,
                                 length_grouping=data.length_grouping, group_size=data.group_size,
                                 max_samples=data.max_samples_per_batch)
    stream = BatchStream(train_ds, sampler, rank, world, cfg.train.grad_accum, data.num_workers, data.prefetch_factor,
                         epoch=position["epoch"], offset=position["offset"])
    logger = _Logger(cfg, rank, start_step)
    if resume_from is not None:
        logger.print(f"resumed from {resume_from} at step {start_step}")
    logger.print(f"{cfg.name}: {sum(counts.values()) / 1e6:.2f}M trainable params {counts}; "
                 f"{len(train_ds)} train samples ({len(train_ds.broken)} broken skipped), device {device}, "
                 f"world {world}")

    history, evals = [], []
    t_start = time.perf_counter()
    step = start_step
    last_ckpt = None

    def trainer_state():
        return {"step": step, "position": stream.position, "config": config_to_dict(cfg),
                "history_tail": history[-5:]}

    def do_eval():
        if val_ds is None:
            return
        res = evaluate(model, val_ds, cfg, device, tokenizer)
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
        micro = [next(stream) for _ in range(cfg.train.grad_accum)]
        metrics = train_step(model, micro, optimizer, cfg, device, world)
        step += 1
        tokens_since += metrics["tokens"]
        dt = time.perf_counter() - t_since
        metrics.update(step=step, lr=optimizer.param_groups[0]["lr"])
        history.append(metrics)
        logger.step(step, metrics, optimizer.param_groups[0]["lr"], tokens_since / max(dt, 1e-9))
        if step % 10 == 0:
            tokens_since, t_since = 0, time.perf_counter()
        timed_out = cfg.train.max_time_s > 0 and time.perf_counter() - t_start > cfg.train.max_time_s
        timed_out = bool(all_reduce_sum(1.0 if timed_out else 0.0, device) > 0) if world > 1 else timed_out
        if cfg.train.stop_after_steps > 0 and step - start_step >= cfg.train.stop_after_steps:
            timed_out = True
        if cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0 and step < cfg.train.steps and not timed_out:
            do_eval()
        if (cfg.train.save_every > 0 and step % cfg.train.save_every == 0) or step == cfg.train.steps or timed_out:
            last_ckpt = save_checkpoint(ckpt_root, step, model, optimizer, trainer_state(), cfg.train.keep_last,
                                        distributed)
        if timed_out:
            logger.print(f"stopping at step {step} (train.max_time_s / train.stop_after_steps); resume=auto continues")
            break
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
              "wall_s": time.perf_counter() - t_start, "steps": step, "vision_warmup": warmup_result}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    result["model"] = model  # for notebooks and tests (not serialised)
    return result


def export(model, path: Path, cfg: Config, rank: int = 0, distributed: bool = False) -> Path:
    """Final weights in the official safetensors layout (save_pretrained), LoRA merged; adapters saved beside.

    Args:
        model: the trained model (LoRA / FSDP handled here).  path: output directory.
    """
    from model import Qwen3VL, save_pretrained

    from .lora import lora_modules, remove_lora, save_lora_adapter

    if distributed:
        sd = full_state_dict(model)
        if rank == 0:
            cpu = Qwen3VL(model.config, init_weights=False)
            if cfg.train.mode == "lora":
                from .lora import apply_lora

                lc = cfg.train.lora
                apply_lora(cpu, lc.r, lc.alpha, lc.dropout, lc.target_modules, lc.exclude_vision)
            cpu.load_state_dict(sd, strict=False)
            cpu.tie_weights()
            model = cpu
        dist.barrier()
        if rank != 0:
            return path
    if lora_modules(model):
        save_lora_adapter(model, str(path.parent / "adapter"), base_model_name_or_path=cfg.model.path)
        remove_lora(model, merge=True)
    save_pretrained(model, path)
    copy_processor_files(cfg.model.path, path)
    write_preprocessor_configs(cfg.data, path)
    return path


def write_preprocessor_configs(data, dst: Path):
    """Record the pixel budgets and video sampling the model was trained with, in the checkpoint's
    preprocessor_config.json / video_preprocessor_config.json (transformers' keys), so that `load_processor(dst)`
    preprocesses exactly as training did. Values the training config does not set (patch geometry, mean/std) are
    kept from the copied files, or the official ones."""
    from model.processing import load_processor

    from .data import training_processor

    training_processor(load_processor(dst), data).save_preprocessor_configs(dst)


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json", "generation_config.json")


def copy_processor_files(src: str | None, dst: Path):
    """Make `dst` loadable by `load_processor`: copy the source checkpoint's tokenizer / preprocessor files, or
    write the embedded tokenizer as tokenizer.json when training started from a preset (src None)."""
    import shutil

    if src is None:
        from model.processing.tokenizer import default_tokenizer_json_path

        shutil.copyfile(default_tokenizer_json_path(), dst / "tokenizer.json")
        return
    for name in PROCESSOR_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)
