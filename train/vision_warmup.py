"""Vision warm-up: train the vision tower alone, before the vision-language stage, on what the images hold.

Why: trained from scratch, the decoder learns the answers' statistics long before the randomly initialised vision
tower carries anything it could read, and then it stops looking at the image (measured: a 1-digit task stays at
chance for 400 steps; docs/training.md). The official Qwen3-VL starts from a pretrained vision encoder; for
from-scratch demos this stage plays that part. Two objectives (`train.vision_warmup.kind`), both on the tower's
last-block patch features (`VisionTower.forward_features`), both with a linear head discarded afterwards; the
merger and the DeepStack mergers are not trained here (the vision-language stage learns them):

  * ctc: read the answer text. The CRNN recipe (Shi et al. 2015; CTC: Graves et al. 2006): the features are
    averaged over each patch column (and over frames), a linear head maps every column to characters + a blank,
    and `torch.nn.functional.ctc_loss` aligns the columns, left to right, with the answer text (OCR lines).
  * grounding: "what is where", for referring-expression grounding. Every patch is classified by the item whose
    pixel box covers the patch centre (background, each colour x shape, each digit: train/grounding_data.py's
    ITEM_CLASSES, labels from the records' `meta.items` layout), and on the patches of an item a box head
    regresses that item's box in 0..1 image coordinates (L1), the dense per-location classification + box
    regression of one-stage detectors (FCOS: Tian et al. 2019). So the tower's features say which item lies at
    each patch and where its edges are before the decoder must write them as 0..1000 coordinates.

    python -m train experiment=ocr_demo train.vision_warmup.steps=150     # ctc; on by default in the OCR demos
    python -m train experiment=grounding_demo                             # grounding; on in the grounding demos
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.rope import merge_block_order, vision_position_ids

from .data import pack_samples
from .grounding_data import ITEM_CLASSES


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


# ----------------------------------------------------------------------------------------------- grounding
def patch_labels(items: list[dict], size: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Per patch, in raster order, the class of the item covering it and that item's box.

    A patch belongs to the item whose pixel box [x1, x2) x [y1, y2) holds the patch centre (the processor resizes
    the whole image onto the patch grid, so patch (r, c) has its centre at ((c + 0.5) W / w, (r + 0.5) H / h) in
    source pixels); where boxes overlap the later item wins, as it is drawn on top. An item covering no patch
    centre (smaller than a patch) gets the patch holding its box centre, so no item goes unlabelled.

    Args:
        items: [{"class": a name in ITEM_CLASSES, "box_px": [x1, y1, x2, y2]}] in drawing order.
        size: (W, H) of the source image in pixels.  grid_hw: (h, w) patches.
    Returns: labels (h, w) long (0 = background), boxes (h, w, 4) fp32 (x1/W, y1/H, x2/W, y2/H; 0 on background).
    """
    (W, H), (h, w) = size, grid_hw
    for it in items:
        if it["class"] not in ITEM_CLASSES[1:]:
            raise ValueError(f"unknown item class {it['class']!r}; expected one of {list(ITEM_CLASSES[1:])}")
    if not items:
        return torch.zeros(h, w, dtype=torch.long), torch.zeros(h, w, 4)
    xyxy = torch.tensor([it["box_px"] for it in items], dtype=torch.float64)          # (n, 4) source pixels
    cx = (torch.arange(w, dtype=torch.float64) + 0.5) * W / w                          # (w,) patch centres
    cy = (torch.arange(h, dtype=torch.float64) + 0.5) * H / h                          # (h,)
    inx = (cx >= xyxy[:, 0:1]) & (cx < xyxy[:, 2:3])                                   # (n, w)
    iny = (cy >= xyxy[:, 1:2]) & (cy < xyxy[:, 3:4])                                   # (n, h)
    cover = iny[:, :, None] & inx[:, None, :]                                          # (n, h, w)
    for k in torch.nonzero(~cover.flatten(1).any(1)).flatten().tolist():               # smaller than a patch
        x1, y1, x2, y2 = xyxy[k].tolist()
        cover[k, min(h - 1, max(0, int((y1 + y2) / 2 * h / H))), min(w - 1, max(0, int((x1 + x2) / 2 * w / W)))] = True
    n = len(items)
    top = (cover * torch.arange(1, n + 1)[:, None, None]).amax(0)                      # (h, w) last item + 1, 0 = none
    cls = torch.tensor([0] + [ITEM_CLASSES.index(it["class"]) for it in items])
    rel = torch.cat([torch.zeros(1, 4), (xyxy / torch.tensor([W, H, W, H])).float()])  # (n + 1, 4), row 0 background
    return cls[top], rel[top]


def read_layouts(dataset) -> list[dict]:
    """Every sample's `meta` layout ({"items": [...], "size": [W, H]}), read from the JSONL by line number.

    Raises ValueError naming the file and line of the first record without one.
    """
    path, records = getattr(dataset, "path", None), getattr(dataset, "records", None)
    if path is None or records is None:
        raise ValueError(f"train.vision_warmup.kind=grounding reads each record's meta.items from a JSONL set "
                         f"(SFTDataset); {type(dataset).__name__} has none")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for lineno, _ in records:
        meta = json.loads(lines[lineno - 1]).get("meta")
        if not (isinstance(meta, dict) and isinstance(meta.get("items"), list) and len(meta.get("size", ())) == 2):
            raise ValueError(f"train.vision_warmup.kind=grounding needs every record's meta.items and meta.size "
                             f"(the scene layout train/grounding_data.py writes); {path}:{lineno} has none "
                             f"(regenerate the set, or set train.vision_warmup.steps=0)")
        out.append(meta)
    return out


def layout_targets(layouts: list[dict], grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`patch_labels` of every image of a packed batch, in the tower's patch order (merge-block, every frame alike).

    Args: layouts: one meta ({"items", "size"}) per image.  grid_thw: (n, 3) long.  merge: spatial_merge_size.
    Returns: labels (N,) long, boxes (N, 4) fp32, N = the batch's patches.
    """
    if grid_thw.shape[0] != len(layouts):
        raise ValueError(f"vision warm-up: {grid_thw.shape[0]} images but {len(layouts)} layouts (one image per "
                         f"sample)")
    labels, boxes = [], []
    for (t, h, w), lay in zip(grid_thw.tolist(), layouts):
        lab, box = patch_labels(lay["items"], tuple(lay["size"]), (h, w))
        labels.append(merge_block_order(lab, merge).repeat(t))
        boxes.append(merge_block_order(box, merge).repeat(t, 1))
    return torch.cat(labels), torch.cat(boxes)


class GroundingHead(torch.nn.Module):
    """Linear map from a patch feature to ITEM_CLASSES logits and a box (sigmoid: 0..1 image coordinates)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, len(ITEM_CLASSES) + 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, dim) -> logits (N, len(ITEM_CLASSES)), boxes (N, 4)."""
        y = self.proj(x)
        return y[:, :-4], y[:, -4:].sigmoid()


def grounding_loss(model, head: GroundingHead, batch: dict, targets: tuple[torch.Tensor, torch.Tensor],
                   box_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Per-patch item-class cross-entropy (all patches) + box_weight * box L1 (item patches; summed over the four
    coordinates) of one packed batch against its images' layouts.

    Args: targets: (labels, boxes) of the batch's patches, `layout_targets` of its layouts (the warm-up's loader
        workers make them).
    Returns: (loss, {"fg_acc": share of item patches classified right, "box_err": mean |error| of a coordinate
        on item patches, in 0..1000 units}).
    """
    visual = model.model.visual
    device = batch["pixel_values"].device
    labels, boxes = (t.to(device) for t in targets)
    feats = visual.forward_features(batch["pixel_values"].to(model.dtype), batch["image_grid_thw"])
    logits, pred = head(feats.float())
    fg = labels > 0
    ce = F.cross_entropy(logits, labels)
    l1 = (pred[fg] - boxes[fg]).abs().sum(-1).mean() if fg.any() else logits.new_zeros(())
    with torch.no_grad():
        stats = {"fg_acc": float((logits[fg].argmax(-1) == labels[fg]).float().mean()) if fg.any() else 0.0,
                 "box_err": float(l1) / 4 * 1000}
    return ce + box_weight * l1, stats


# ----------------------------------------------------------------------------------------------- the stage
class _CTC:
    """kind=ctc: the head, and one batch's loss / log fields from the answers' text."""

    def __init__(self, model, dataset, cfg, device):
        from .config import ConfigError

        self.texts = [dataset.answer(i) for i in range(len(dataset))]
        charset = "".join(sorted({c for t in self.texts for c in t}))
        if not charset:
            raise ConfigError("train.vision_warmup: the training answers hold no characters to read")
        self.head = CTCHead(model.model.visual.cfg.hidden_size, charset).to(device)

    @staticmethod
    def batch_targets(b: dict) -> dict:
        return {}

    def __call__(self, model, batch, indices) -> tuple[torch.Tensor, dict, str]:
        truth = [self.texts[i] for i in indices]
        loss, read = ctc_loss(model, self.head, batch, truth)
        acc = sum(r == t for r, t in zip(read, truth)) / len(truth)
        return loss, {"line_acc": acc}, (f"ctc_loss {float(loss.detach()):.4f}  line_acc {acc:.3f}  "
                                         f"'{read[0]}'<-'{truth[0]}'")


class _LayoutTargets:
    """A packed batch's per-patch grounding targets (`layout_targets`, ~1-3 ms an image), made in the loader's
    workers; holds no module, so it pickles cheaply into them."""

    def __init__(self, layouts: list[dict], merge: int):
        self.layouts, self.merge = layouts, merge

    def __call__(self, b: dict) -> dict:
        return {"targets": layout_targets([self.layouts[i] for i in b["indices"].tolist()], b["image_grid_thw"],
                                          self.merge)}


class _Grounding:
    """kind=grounding: the head, and one batch's loss / log fields from the records' layouts."""

    def __init__(self, model, dataset, cfg, device):
        self.layouts, self.box_weight = read_layouts(dataset), cfg.box_weight
        self.head = GroundingHead(model.model.visual.cfg.hidden_size).to(device)
        # run in the loader's workers
        self.batch_targets = _LayoutTargets(self.layouts, model.model.visual.cfg.spatial_merge_size)

    def __call__(self, model, batch, indices) -> tuple[torch.Tensor, dict, str]:
        loss, st = grounding_loss(model, self.head, batch, batch["targets"], self.box_weight)
        return loss, st, (f"loss {float(loss.detach()):.4f}  item-patch acc {st['fg_acc']:.3f}  "
                          f"box err {st['box_err']:.0f}/1000")


class _Collate:
    """The warm-up loader's collate_fn, run in its workers: pack the samples, make the objective's targets, and on a
    GPU hand the pixels over in bf16. A step is 64-128 images of up to 1,024 rows x 1,536 values: in fp32 that is
    up to 800 MB to pack, pass between processes and copy to the device, which made the 400-step grounding warm-up
    of grounding_demo_gpu take 1.4 s a step on an H200. bf16 loses nothing the tower keeps: under bf16 autocast its
    patch embedding rounds its input to bf16 anyway."""

    def __init__(self, targets, pixel_dtype: torch.dtype | None):
        self.targets, self.pixel_dtype = targets, pixel_dtype

    def __call__(self, samples) -> dict:
        b = pack_samples(samples)
        if b["input_ids"] is None or b["pixel_values"] is None:
            return b
        if self.pixel_dtype is not None:
            b["pixel_values"] = b["pixel_values"].to(self.pixel_dtype)
        return {**b, **self.targets(b)}


def vision_warmup(model, dataset, cfg, device, log=print) -> dict:
    """Train `model.model.visual` with a `cfg.kind` head on `dataset` (single-image samples) for cfg.steps steps.

    Args:
        model: Qwen3VL (not yet sharded).  dataset: SFTDataset of one-image samples (anything with `answer(i)` for
            kind=ctc).  cfg: VisionWarmupConfig.  device: torch device.  log: print-like callable.
    Returns: {"kind", "history": loss per step, "loss": the last one, and the last batch's scores: "line_acc"
        (ctc: exact-match rate of the greedy readings) or "fg_acc" / "box_err" (grounding: item patches classified
        right; mean box-coordinate error on them, 0..1000 units)}.
    """
    objective = (_Grounding if cfg.kind == "grounding" else _CTC)(model, dataset, cfg, device)
    params = [p for p in model.model.visual.parameters() if p.requires_grad] + list(objective.head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[torch.randint(len(dataset), (cfg.batch_size,), generator=g).tolist()
                                for _ in range(cfg.steps)],
        collate_fn=_Collate(objective.batch_targets, torch.bfloat16 if cuda else None), num_workers=cfg.num_workers,
        persistent_workers=False, pin_memory=cuda)
    amp = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    model.train()
    t0, res = time.perf_counter(), {"kind": cfg.kind, "history": []}
    for step, b in enumerate(loader, 1):
        if b["input_ids"] is None:
            continue
        if b["pixel_values"] is None or b["pixel_values_videos"] is not None:
            raise ValueError(f"vision warm-up: every training sample must hold exactly one image (samples "
                             f"{b['indices'].tolist()} of {dataset.path} do not); set train.vision_warmup.steps=0")
        batch = {k: b[k].to(device, non_blocking=True) for k in ("pixel_values", "image_grid_thw")}
        batch["targets"] = b.get("targets")
        for pg in opt.param_groups:  # short linear warmup, then constant
            pg["lr"] = cfg.lr * min(1.0, step / max(1, cfg.steps // 10))
        with amp:
            loss, scores, line = objective(model, batch, b["indices"].tolist())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        res["history"].append(float(loss.detach()))
        res.update(loss=res["history"][-1], **scores)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(f"vision warm-up {step:4d}/{cfg.steps}  {line}  {time.perf_counter() - t0:.0f}s")
    return res
