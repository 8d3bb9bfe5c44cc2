"""Plot a run's training curve (train loss, validation loss and CER, or Acc@0.5 and mean IoU, vs step) from its
result.json.

    python -m train.plot runs/ocr_demo_gpu/result.json docs/ocr_demo_curve.png
    python -m train.plot runs/grounding_demo_gpu/result.json docs/grounding_demo_curve.png
"""
from __future__ import annotations

import json
import sys


def plot_curve(result_path: str, out_png: str, title: str | None = None):
    """Draw loss (left axis, log) and CER (right axis, log) against the optimizer step; a grounding run
    (train.eval_metric=grounding) gets Acc@0.5 and mean IoU (right axis, linear 0..1) instead of CER, and its
    box-digit loss with the sample's own image and with another one (left axis; they part when the decoder reads
    the image).

    Args:
        result_path: result.json written by `train.trainer.train`.
        out_png: output image path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.load(open(result_path))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in r["history"]], [h["loss"] for h in r["history"]], lw=0.8, label="train loss")
    ev = [e for e in r["evals"] if e.get("val_loss") is not None]
    ax.plot([e["step"] for e in ev], [e["val_loss"] for e in ev], "o-", label="val loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    for key, style, label in (("box_loss", "v-", "val loss, box digits"),
                              ("box_loss_blind", "v--", "val loss, box digits, another image")):
        pts = [e for e in ev if e.get(key) is not None]
        if pts:
            ax.plot([e["step"] for e in pts], [e[key] for e in pts], style, label=label)
    cer = [e for e in ev if e.get("cer") is not None]
    grounding = [e for e in ev if e.get("acc50") is not None]
    if grounding:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in grounding], [e["acc50"] for e in grounding], "s-", color="tab:red",
                 label=f"val Acc@0.5 (last {grounding[-1]['acc50']:.3f})")
        ax2.plot([e["step"] for e in grounding], [e["miou"] for e in grounding], "^-", color="tab:green",
                 label=f"val mean IoU (last {grounding[-1]['miou']:.3f})")
        ax2.set_ylabel("Acc@0.5 / mean IoU")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper center")
    elif cer:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in cer], [e["cer"] for e in cer], "s-", color="tab:red",
                 label=f"val CER (last {cer[-1]['cer']:.4f})")
        ax2.set_ylabel("character error rate (log)")
        ax2.set_yscale("log")  # untrained garbage (CER >> 1) and a reading model (CER ~1e-3) on one axis
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(title or result_path)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


if __name__ == "__main__":
    plot_curve(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
