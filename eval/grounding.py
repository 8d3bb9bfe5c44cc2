"""Referring-expression grounding evaluation: one or more checkpoints on a JSONL set of images, expressions and
gold boxes, side by side.

`python -m eval task=grounding grounding.checkpoints=[ckpt] grounding.data=val.jsonl grounding.out_dir=OUT`
(conf/task/grounding.yaml). Like the OCR evaluation (eval/ocr.py), and unlike the needle tasks (eval/niah.py,
whose cases are generated per length and depth and scored by exact answers), this is a fixed labelled set with
its own metrics, so it reuses eval/ocr.py's pipeline: the set is in the training format, read by the training's
own `SFTDataset` with the checkpoint's exported pixel budgets (`eval_dataset`), and answered in left-padded greedy
batches as the trainer's validation does (`predict`; tests/test_ocr_eval.py shows that pipeline reproduces the
trainer's CER to the last bit), so with `max_new_tokens` = `train.eval_max_new_tokens` an export is scored on the
generations the trainer's `train.eval_metric=grounding` validation scored. The gold box is the reference answer's first `bbox_2d`, the predicted one the generated answer's first
box (or point), both read by the processor's response parser (model/processing/responses.py) in Qwen3-VL's
0..1000 image-relative coordinates (docs/responses.md).

Metrics (eval/grounding_metrics.py): Acc@0.5, mean IoU and point-in-box accuracy with seeded bootstrap intervals,
the share of answers holding a readable box, and the same per expression kind when the records carry
`meta.kind` (the synthetic set of train/grounding_data.py does). Writes to `out_dir`: results.json (everything,
with every prediction and its IoU), results.md (the side-by-side table) and, with `draw` > 0, the first `draw`
samples' images with the gold box and each checkpoint's box drawn (`draw_grounding`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from .grounding_metrics import bootstrap_ci, corpus_metrics, score_sample
from .ocr import CheckpointEvalConfig, _image_path, checkpoint_name, eval_dataset, predict

METRICS = (("acc50", "Acc@0.5"), ("miou", "mean IoU"), ("point_acc", "point-in-box"))


@dataclass(frozen=True)
class GroundingConfig(CheckpointEvalConfig):
    """One grounding evaluation: eval/ocr.py's `CheckpointEvalConfig` (checkpoints, data, generation and precision
    settings, n_boot) plus
        draw: samples drawn with their boxes into out_dir/draw.  out_dir: where results.json and results.md go.
    """

    SECTION: ClassVar[str] = "grounding"
    EXAMPLE: ClassVar[str] = "runs/grounding_demo/final"
    DATA_HINT: ClassVar[str] = "a JSONL set in the training format with gold boxes"

    draw: int = 0
    out_dir: str = "eval_out/grounding"

    def __post_init__(self):
        from model.config import ConfigError

        super().__post_init__()
        if self.draw < 0:
            raise ConfigError(f"grounding.draw must be >= 0, got {self.draw}")


def _kinds(ds, n: int) -> list[str]:
    """meta.kind of the first n usable records (read by their line numbers), "all" where a record has none."""
    lines = Path(ds.path).read_text(encoding="utf-8").splitlines()
    out = []
    for i in range(n):
        meta = json.loads(lines[ds.records[i][0] - 1]).get("meta")
        out.append(str(meta.get("kind", "all")) if isinstance(meta, dict) else "all")
    return out


def summarise(preds: list[str], refs: list[str], kinds: list[str], cfg: GroundingConfig) -> dict:
    """Per-sample scores, set metrics with bootstrap intervals, and metrics per expression kind."""
    scores = [score_sample(p, r) for p, r in zip(preds, refs)]
    metrics = {**corpus_metrics(scores), "ci": {k: list(v) for k, v in
                                                bootstrap_ci(scores, cfg.n_boot, seed=cfg.seed).items()}}
    per_kind = {k: corpus_metrics([s for s, t in zip(scores, kinds) if t == k]) for k in sorted(set(kinds))}
    samples = [{"iou": s.iou, "hit": s.hit, "point_hit": s.point_hit, "pred_box": s.pred_box,
                "pred_point": s.pred_point} for s in scores]
    return {"metrics": metrics, "per_kind": per_kind, "samples": samples}


def run_grounding(cfg: GroundingConfig, device: str | torch.device = "cpu") -> dict:
    """Evaluate every checkpoint on the set; write results.json and results.md (and drawings) to cfg.out_dir.

    Returns the results dict (as written to results.json)."""
    from model import load_pretrained

    from .grounding_metrics import gold_box

    names = list(cfg.names) or [checkpoint_name(c) for c in cfg.checkpoints]
    columns, refs, kinds, images = [], None, None, None
    for name, ckpt in zip(names, cfg.checkpoints):
        model = load_pretrained(ckpt, dtype=getattr(torch, cfg.dtype), device=device, progress=False).eval()
        ds, proc, budgets = eval_dataset(ckpt, model.config, cfg)
        preds = predict(model, ds, proc.tokenizer, cfg, device)
        n = len(preds)
        these_refs = [ds.answer(i) for i in range(n)]
        if refs is None:
            refs, kinds, images = these_refs, _kinds(ds, n), [_image_path(ds, i) for i in range(n)]
        elif these_refs != refs:  # a different max_seq_len filter per checkpoint would misalign the columns
            raise ValueError(f"{ckpt}: the set's usable samples differ from the first checkpoint's")
        columns.append({"name": name, "path": str(ckpt), "budgets": budgets, "predictions": preds,
                        **summarise(preds, refs, kinds, cfg)})
        del model
    result = {"data": str(cfg.data), "n": len(refs), "references": refs, "gold_boxes": [gold_box(r) for r in refs],
              "kinds": kinds, "images": images,
              "generation": {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                             "do_sample": cfg.do_sample, "temperature": cfg.temperature, "top_k": cfg.top_k,
                             "top_p": cfg.top_p, "seed": cfg.seed, "precision": cfg.precision,
                             "dtype": cfg.dtype},
              "n_boot": cfg.n_boot, "checkpoints": columns}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "results.md").write_text(markdown_table(result))
    if cfg.draw > 0:
        draw_samples(result, out / "draw", cfg.draw)
    return result


def draw_samples(result: dict, out_dir: Path, n: int) -> None:
    """The first n images with the gold box (label "gold") and each checkpoint's box, as out_dir/<i>.png."""
    from PIL import Image

    from model.processing.responses import draw_grounding

    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(min(n, result["n"])):
        if not result["images"][i]:
            continue
        boxes = [{"bbox_2d": result["gold_boxes"][i], "label": "gold"}]
        boxes += [{"bbox_2d": c["samples"][i]["pred_box"], "label": c["name"]} for c in result["checkpoints"]
                  if c["samples"][i]["pred_box"] is not None]
        draw_grounding(Image.open(result["images"][i]).convert("RGB"), {"boxes": boxes, "points": []},
                       out_dir / f"{i:04d}.png")


def _fmt(m: dict, key: str, with_ci: bool) -> str:
    v = f"{m[key]:.4f}"
    if with_ci and key in m.get("ci", {}):
        lo, hi = m["ci"][key]
        v += f" [{lo:.4f}, {hi:.4f}]"
    return v


def markdown_table(result: dict) -> str:
    """The side-by-side table (95% bootstrap CI in brackets), then Acc@0.5 per expression kind."""
    cols = result["checkpoints"]
    head = "| metric | " + " | ".join(c["name"] for c in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = [f"Grounding evaluation of `{result['data']}` ({result['n']} samples; "
             f"{'sampled' if result['generation']['do_sample'] else 'greedy'}, "
             f"max_new_tokens {result['generation']['max_new_tokens']}; 95% bootstrap CI, "
             f"{result['n_boot']} resamples)\n\n", head]
    for key, label in METRICS:
        lines.append(f"| {label} | " + " | ".join(_fmt(c["metrics"], key, result["n_boot"] > 0) for c in cols)
                     + " |\n")
    lines.append("| answers with a box | " + " | ".join(f"{c['metrics']['parsed']:.4f}" for c in cols) + " |\n")
    lines.append("\nAcc@0.5 / mean IoU per expression kind:\n\n")
    lines.append("| kind | n | " + " | ".join(c["name"] for c in cols) + " |\n|---|---|" + "---|" * len(cols) + "\n")
    for kind, v in cols[0]["per_kind"].items():
        lines.append(f"| {kind} | {v['n']} | " + " | ".join(
            f"{c['per_kind'][kind]['acc50']:.4f} / {c['per_kind'][kind]['miou']:.4f}" for c in cols) + " |\n")
    return "".join(lines)


def print_summary(result: dict) -> None:
    """The markdown table on stdout."""
    print(markdown_table(result))
