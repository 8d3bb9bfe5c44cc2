"""Grounding metrics: IoU of a predicted box with the gold box, Acc@0.5, mean IoU and point-in-box accuracy, per
sample and over a set, with seeded bootstrap confidence intervals.

Both answers are read with the processor's response parser (model/processing/responses.py, `parse_response`): the
first box of each (a referring expression names one object) in Qwen3-VL's 0..1000 image-relative coordinates.
IoU is computed in those coordinates: scaling x by w / 1000 and y by h / 1000 multiplies the intersection and the
union by the same factor, so the IoU equals the one in pixels (up to the model's integer rounding).

- IoU (Jaccard index) of boxes [x1, y1, x2, y2] with continuous edges: intersection area / union area; two
  degenerate boxes (zero area) that do not overlap score 0.
- Acc@0.5: the share of samples whose predicted box has IoU >= 0.5 with the gold one (the RefCOCO convention,
  Mao et al. 2016 / Yu et al. 2016; "Acc@0.5" as reported for Qwen-VL grounding).
- mean IoU: the mean of the per-sample IoU.
- point-in-box: the prediction's point (a `point_2d` answer, else the centre of the predicted box) lies inside the
  gold box, edges included (the pointing metric of Molmo / PixMo-Points style evaluations).
A sample whose prediction holds no box or point (unparseable, cut off, empty) scores IoU 0, miss, miss.
"""
from __future__ import annotations

from dataclasses import dataclass

ACC_IOU = 0.5


def box_iou(a, b) -> float:
    """Intersection over union of two boxes [x1, y1, x2, y2] (x1 <= x2, y1 <= y2), in any one coordinate system."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def point_in_box(point, box) -> bool:
    """Whether [x, y] lies inside box [x1, y1, x2, y2], edges included."""
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def box_centre(box) -> list[float]:
    """The centre [x, y] of a box [x1, y1, x2, y2]."""
    return [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]


@dataclass(frozen=True)
class GroundingScore:
    """One sample: iou (0 when the prediction has no box), hit (iou >= 0.5), point_hit, and the boxes read."""
    iou: float
    hit: bool
    point_hit: bool
    pred_box: list | None
    pred_point: list | None
    gold_box: list


def gold_box(reference: str) -> list:
    """The first box of a reference answer; a reference without a readable box is a broken sample (ValueError)."""
    from model.processing.responses import parse_response

    boxes = parse_response(reference)["boxes"]
    if not boxes:
        raise ValueError(f"grounding reference holds no readable bbox_2d: {reference[:80]!r}")
    return list(boxes[0]["bbox_2d"])


def score_sample(prediction: str, reference: str) -> GroundingScore:
    """Score one generated answer against the reference answer (both in the model's output format)."""
    from model.processing.responses import parse_response

    gold = gold_box(reference)
    parsed = parse_response(prediction)
    box = list(parsed["boxes"][0]["bbox_2d"]) if parsed["boxes"] else None
    point = (list(parsed["points"][0]["point_2d"]) if parsed["points"] and box is None
             else box_centre(box) if box is not None else None)
    iou = box_iou(box, gold) if box is not None else 0.0
    return GroundingScore(iou=iou, hit=iou >= ACC_IOU, point_hit=point is not None and point_in_box(point, gold),
                          pred_box=box, pred_point=point, gold_box=gold)


def corpus_metrics(scores: list[GroundingScore]) -> dict[str, float]:
    """{"acc50", "miou", "point_acc", "parsed" (share of predictions with a box or point), "n"} over the samples."""
    n = len(scores)
    if n == 0:
        return {"acc50": 0.0, "miou": 0.0, "point_acc": 0.0, "parsed": 0.0, "n": 0}
    return {"acc50": sum(s.hit for s in scores) / n, "miou": sum(s.iou for s in scores) / n,
            "point_acc": sum(s.point_hit for s in scores) / n,
            "parsed": sum(s.pred_box is not None or s.pred_point is not None for s in scores) / n, "n": n}


def grounding_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus Acc@0.5, mean IoU and point-in-box accuracy of generated answers (the trainer's validation metric)."""
    if len(predictions) != len(references):
        raise ValueError(f"grounding: {len(predictions)} predictions vs {len(references)} references")
    return corpus_metrics([score_sample(p, r) for p, r in zip(predictions, references)])


def bootstrap_ci(scores: list[GroundingScore], n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (Efron 1979) intervals of acc50, miou and point_acc: resample the samples with
    replacement `n_boot` times (seeded numpy Generator), as eval/ocr_metrics.bootstrap_ci does."""
    import numpy as np

    if not scores or n_boot <= 0:
        return {}
    cols = {"acc50": [s.hit for s in scores], "miou": [s.iou for s in scores],
            "point_acc": [s.point_hit for s in scores]}
    idx = np.random.default_rng(seed).integers(0, len(scores), size=(n_boot, len(scores)))  # (n_boot, n)
    out = {}
    for k, v in cols.items():
        draws = np.asarray(v, dtype=np.float64)[idx].mean(1)                               # (n_boot,)
        out[k] = (float(np.quantile(draws, alpha / 2)), float(np.quantile(draws, 1 - alpha / 2)))
    return out
