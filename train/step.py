"""One training step and one validation pass: forward, chunked loss, backward, clip, optimizer step.

Loss: mean next-token cross-entropy over all supervised tokens of the optimizer step (all micro-batches and
ranks), computed chunk-wise from hidden states (train/loss.py), plus the MoE load-balancing loss when the model
has experts. Mixed precision is bf16 autocast on CUDA (fp32 master weights), fp32 on CPU by default. Validation
adds the character error rate of greedy generations (eval/generate.py, eval/metrics.py).
"""
from __future__ import annotations

import contextlib
import math
import re

import torch

from eval.generate import generate_batch
from eval.grounding_metrics import grounding_metrics
from eval.metrics import character_error_rate

from .config import Config
from .data import PackedBatchSampler, SFTDataset, count_label_tokens, pack_samples
from .loss import chunked_cross_entropy
from .parallel import all_reduce_sum


def autocast(device, precision: str):
    """bf16 autocast for precision bf16 (or auto on CUDA); otherwise no autocast (fp32)."""
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
    with autocast(dev, precision):
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


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient norm (train.on_nonfinite=raise): training stops before the update."""


def train_step(model, micro_batches: list[dict], optimizer, cfg: Config, device, world: int = 1) -> dict:
    """One optimizer step over `micro_batches` (this rank's share): forward, chunked loss, backward, clip, step.

    The loss is the mean over every supervised token of the step on all ranks (so packing, accumulation and
    data parallelism do not change it); gradients are scaled by `world` because FSDP averages over ranks.
    A non-finite loss or gradient norm (same on every rank: both are global) raises `NonFiniteError` before the
    optimizer is touched, or with `train.on_nonfinite=skip` drops the step's gradients and returns
    `skipped=True`: NaN never reaches the weights, a checkpoint or an export.
    Returns: {"loss", "aux_loss", "grad_norm", "tokens", "label_tokens", "samples", "skipped", "dropped_samples"}
    (global sums / means).
    """
    n_labels = all_reduce_sum(sum(count_label_tokens(b) for b in micro_batches), device)
    if n_labels == 0:
        raise RuntimeError("an optimizer step without supervised tokens (all labels are -100)")
    loss_sum, aux_sum, tokens, samples = 0.0, 0.0, 0, 0
    dropped = sum(b.get("n_dropped", 0) for b in micro_batches)  # samples that failed to load
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
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    loss_mean, aux_mean, grad_norm = (all_reduce_sum(loss_sum, device) / n_labels,
                                      all_reduce_sum(aux_sum, device) / world, float(grad_norm))
    skipped = not all(math.isfinite(v) for v in (loss_mean, aux_mean, grad_norm))
    if skipped and cfg.train.on_nonfinite == "raise":
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite loss {loss_mean} / aux loss {aux_mean} / gradient norm {grad_norm}; the "
                             f"weights are not updated and nothing more is saved (train.on_nonfinite=skip drops such "
                             f"steps instead)")
    if not skipped:  # clip_grad_norm_ has already scaled the gradients; a skipped step just drops them
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_mean, "aux_loss": aux_mean, "grad_norm": grad_norm, "tokens": all_reduce_sum(tokens, device),
            "label_tokens": n_labels, "samples": all_reduce_sum(samples, device), "skipped": skipped,
            "dropped_samples": int(all_reduce_sum(dropped, device))}


def _dummy_batch(model) -> dict:
    ids = torch.tensor([[0, 0]])
    return {"input_ids": ids, "labels": torch.tensor([[-100, 0]]), "position_ids": torch.zeros(3, 1, 2, dtype=torch.long),
            "cu_seqlens": torch.tensor([0, 2], dtype=torch.int32), "pixel_values": None, "image_grid_thw": None,
            "pixel_values_videos": None, "video_grid_thw": None}


_FIRST_BOX = re.compile(r'"bbox_2d"\s*:\s*\[([^\]]*)\]')


def first_box_token_mask(target_ids: list[int], decode) -> list[bool]:
    """Which of an answer's target tokens are the digits of its first `"bbox_2d": [...]` list (the coordinates a
    grounding model must read off the image; the format and label tokens around them are not)."""
    pieces = [decode([i]) for i in target_ids]
    m = _FIRST_BOX.search("".join(pieces))
    mask = [False] * len(pieces)
    if m is not None:
        lo, hi, pos = m.start(1), m.end(1), 0
        for k, p in enumerate(pieces):
            mask[k] = lo <= pos and pos + len(p) <= hi and p.strip().isdigit()
            pos += len(p)
    return mask


def _box_losses(losses: torch.Tensor, batch: dict, decode, cache: dict) -> torch.Tensor:
    """The per-token `losses` (supervised positions of a packed batch, in order) on first-box coordinate digits."""
    labels = batch["labels"][0].cpu()
    sup = (labels != -100).nonzero().flatten()
    doc = batch["doc_index"].cpu()[sup]
    keep = []
    for d in doc.unique(sorted=True).tolist():
        ids = tuple(labels[sup[doc == d]].tolist())
        if ids not in cache:
            cache[ids] = first_box_token_mask(list(ids), decode)
        keep += cache[ids]
    return losses[torch.tensor(keep, dtype=torch.bool, device=losses.device)]


def _images_rolled(batch: dict) -> dict | None:
    """The packed batch with every image moved to the next image slot (sample i sees sample i-1's image), or None
    when the images differ in grid (or are fewer than two): the image-blind control of `box_loss`."""
    g = batch["image_grid_thw"]
    if g is None or len(g) < 2 or not bool((g == g[0]).all()):
        return None
    pv = batch["pixel_values"]
    return dict(batch, pixel_values=pv.reshape(len(g), -1, pv.shape[-1]).roll(1, 0).reshape(pv.shape))


@torch.no_grad()
def evaluate(model, dataset: SFTDataset, cfg: Config, device, tokenizer=None) -> dict:
    """Validation loss over the whole set and, if `eval_samples` > 0, CER of greedy generations (and with
    `train.eval_metric=grounding` their Acc@0.5, mean IoU and point-in-box accuracy, eval/grounding_metrics.py).

    Args:
        model: the model.  dataset: validation SFTDataset.  tokenizer: for decoding (CER).
    Returns:
        {"val_loss", "cer" (or None), "examples": [(prediction, reference), ...]}; grounding adds "acc50", "miou",
        "point_acc", "parsed" (share of answers holding a readable box), "box_loss": the teacher-forced loss on
        the coordinate digits of each answer's first box over the whole set (`first_box_token_mask`), and
        "box_loss_blind": the same with every sample given another sample's image (packed batches whose images share
        one grid). While the decoder ignores the image the two are equal; box_loss falls below box_loss_blind as
        it starts to read positions off the image, before Acc@0.5 moves.
    """
    was_training = model.training
    model.eval()
    sampler = PackedBatchSampler(dataset.lengths, cfg.data.token_budget, shuffle=False, length_grouping=False)
    total, count = 0.0, 0
    box = [] if cfg.train.eval_metric == "grounding" and tokenizer is not None else None
    blind: list = []
    cache: dict = {}
    for idx in sampler.batches(0):
        b = pack_samples([dataset[i] for i in idx])
        if b["input_ids"] is None:
            continue
        losses, _ = forward_losses(model, _to(b, device), cfg.train.loss_chunk_size, cfg.train.precision)
        total += float(losses.sum())
        count += losses.numel()
        if box is not None:
            box.append(_box_losses(losses, b, tokenizer.decode, cache).float().cpu())
            rolled = _images_rolled(b)
            if rolled is not None:
                blind_losses, _ = forward_losses(model, _to(rolled, device), cfg.train.loss_chunk_size,
                                                 cfg.train.precision)
                blind.append(_box_losses(blind_losses, b, tokenizer.decode, cache).float().cpu())
    res = {"val_loss": total / max(1, count), "cer": None, "examples": []}
    for key, parts in (("box_loss", box), ("box_loss_blind", blind)):
        if parts:
            t = torch.cat(parts)
            res[key] = float(t.mean()) if t.numel() else float("nan")
    n = min(cfg.train.eval_samples, len(dataset))
    if n > 0 and tokenizer is not None:
        preds, refs = [], []
        for s in range(0, n, 32):
            with autocast(device, cfg.train.precision):
                preds += generate_batch(model, [dataset.prompt(i) for i in range(s, min(n, s + 32))], tokenizer,
                                        cfg.train.eval_max_new_tokens, device)
            refs += [dataset.answer(i) for i in range(s, min(n, s + 32))]
        res["cer"] = character_error_rate(preds, refs)
        if cfg.train.eval_metric == "grounding":
            res.update({k: v for k, v in grounding_metrics(preds, refs).items() if k != "n"})
        res["examples"] = list(zip(preds[:4], refs[:4]))
    if was_training:
        model.train()
    return res
