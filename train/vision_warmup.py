"""Vision warm-up: train the vision tower alone, as a CTC line reader, before the vision-language stage.

Why: trained from scratch, the decoder learns the answers' digit statistics long before the randomly initialised
vision tower carries anything it could read, and then it stops looking at the image (measured: a 1-digit task
stays at chance for 400 steps; docs/training.md). The official Qwen3-VL starts from a pretrained vision encoder;
for from-scratch demos this stage plays that part. It is the CRNN recipe (Shi et al. 2015; CTC: Graves et al.
2006): the tower's last-block patch features are averaged over each patch column (and over frames), a linear head
maps every column to characters + a blank, and `torch.nn.functional.ctc_loss` aligns the columns, left to right,
with the answer text. The merger and the DeepStack mergers are not trained here (the vision-language stage learns
them); the head is discarded afterwards.

    python -m train experiment=ocr_demo train.vision_warmup.steps=150     # on by default in the OCR demos
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from model.rope import vision_position_ids

from .data import pack_samples


def column_features(patches: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Per image, the mean patch feature of each patch column, left to right.

    Args:
        patches: (N, D) last-block vision features in the processor's merge-block order.
        grid_thw: (n, 3) (t, h, w) in patches.  merge: spatial_merge_size.
    Returns: n tensors of shape (w, D), averaged over frames and rows.
    """
    cols = vision_position_ids(grid_thw, merge)[:, 1].to(patches.device)  # column of every patch, same order
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        x, c = patches[start:start + t * h * w], cols[start:start + t * h * w]
        start += t * h * w
        out.append(x.new_zeros(w, x.shape[1]).index_add(0, c, x) / (t * h))
    return out


class CTCHead(torch.nn.Module):
    """Linear map from a column feature to (blank, char_1, ..., char_K) logits; `charset` fixes the classes."""

    def __init__(self, dim: int, charset: str):
        super().__init__()
        self.charset = charset
        self.index = {c: i + 1 for i, c in enumerate(charset)}  # 0 = CTC blank
        self.proj = torch.nn.Linear(dim, len(charset) + 1)

    def forward(self, cols: torch.Tensor) -> torch.Tensor:
        return self.proj(cols)

    def targets(self, text: str) -> list[int]:
        return [self.index[c] for c in text if c in self.index]

    def greedy(self, logits: torch.Tensor) -> str:
        """Best-path decoding: argmax per column, collapse repeats, drop blanks."""
        ids = logits.argmax(-1).tolist()
        chars, prev = [], 0
        for i in ids:
            if i != prev and i != 0:
                chars.append(self.charset[i - 1])
            prev = i
        return "".join(chars)


def ctc_loss(model, head: CTCHead, batch: dict, texts: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Mean CTC loss of one packed batch's images against `texts`; also the greedy readings."""
    visual = model.model.visual
    patches = visual.forward_features(batch["pixel_values"].to(model.dtype), batch["image_grid_thw"])
    cols = column_features(patches, batch["image_grid_thw"].cpu(), visual.cfg.spatial_merge_size)
    if len(cols) != len(texts):
        raise ValueError(f"vision warm-up: {len(cols)} images but {len(texts)} answers (one image per sample)")
    logits = [head(c.float()) for c in cols]
    log_probs = torch.nn.utils.rnn.pad_sequence(logits).log_softmax(-1)  # (T, n, C)
    tgt = [head.targets(t) for t in texts]
    loss = F.ctc_loss(log_probs, torch.tensor([i for t in tgt for i in t], dtype=torch.long),
                      torch.tensor([c.shape[0] for c in cols]), torch.tensor([len(t) for t in tgt]),
                      blank=0, reduction="mean", zero_infinity=True)  # a line longer than its columns counts 0
    return loss, [head.greedy(lg.detach()) for lg in logits]


def vision_warmup(model, dataset, cfg, device, log=print) -> dict:
    """Train `model.model.visual` with a CTC head on `dataset` (single-image samples) for cfg.steps steps.

    Args:
        model: Qwen3VL (not yet sharded).  dataset: SFTDataset of one-image samples.  cfg: VisionWarmupConfig.
        device: torch device.  log: print-like callable.
    Returns: {"history": CTC loss per step, "loss": the last one, "line_acc": exact-match rate of the greedy
        readings in the last batch}.
    """
    from .config import ConfigError

    texts = [dataset.answer(i) for i in range(len(dataset))]
    charset = "".join(sorted({c for t in texts for c in t}))
    if not charset:
        raise ConfigError("train.vision_warmup: the training answers hold no characters to read")
    head = CTCHead(model.model.visual.cfg.hidden_size, charset).to(device)
    params = [p for p in model.model.visual.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[torch.randint(len(dataset), (cfg.batch_size,), generator=g).tolist()
                                for _ in range(cfg.steps)],
        collate_fn=pack_samples, num_workers=cfg.num_workers, persistent_workers=False)
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    t0, res = time.perf_counter(), {"history": []}
    for step, b in enumerate(loader, 1):
        if b["input_ids"] is None:
            continue
        if b["pixel_values"] is None or b["pixel_values_videos"] is not None:
            raise ValueError(f"vision warm-up: every training sample must hold exactly one image (samples "
                             f"{b['indices'].tolist()} of {dataset.path} do not); set train.vision_warmup.steps=0")
        batch = {k: b[k].to(device) for k in ("pixel_values", "image_grid_thw")}
        for pg in opt.param_groups:  # short linear warmup, then constant
            pg["lr"] = cfg.lr * min(1.0, step / max(1, cfg.steps // 10))
        with amp:
            loss, read = ctc_loss(model, head, batch, [texts[i] for i in b["indices"].tolist()])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        truth = [texts[i] for i in b["indices"].tolist()]
        res["history"].append(float(loss.detach()))
        res.update(loss=res["history"][-1], line_acc=sum(r == t for r, t in zip(read, truth)) / len(truth))
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(f"vision warm-up {step:4d}/{cfg.steps}  ctc_loss {res['loss']:.4f}  line_acc {res['line_acc']:.3f}"
                f"  '{read[0]}'<-'{truth[0]}'  {time.perf_counter() - t0:.0f}s")
    return res
