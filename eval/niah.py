"""The needle sweep shared by every long-context task: lengths x depths cells, teacher-forced scoring, JSON + heatmap.

A task (eval/tasks/: V-NIAH video needles, text passkeys, ...) builds one cell's prompt and gold answer; this
module runs the grid, scores each trial by teacher forcing (`eval.scoring`, the V-NIAH protocol of Zhang et al.
2024, LongVA) and reports accuracy per length x depth, the way Qwen3-VL reports V-NIAH.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .scoring import teacher_forced_correct
from .tasks import get_task


@dataclass
class NeedleConfig:
    """One sweep of a needle test over lengths x depths; task options (frame_size ... question, extra) are read
    by the tasks that use them."""

    task: str = "vniah"                      # a name in eval.tasks.TASKS (vniah, passkey, ...)
    lengths: tuple[int, ...] = (16, 32)      # in the task's unit: vniah haystack frames, passkey prompt tokens
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    trials: int = 1                          # needles per cell (different answers / haystacks)
    frame_size: int = 224                    # haystack frame side (pixels) before the processor's resize
    fps: float = 1.0                         # haystack sampling rate: frame i is at i / fps seconds
    frames_dir: str | None = None            # optional real haystack: a folder of images, sorted by name
    seed: int = 0
    out_dir: str = "eval_out"
    question: str = "What is the secret number shown in one of the frames? Answer with the number only."
    extra: dict = field(default_factory=dict)  # options of tasks added later (conf/task/<name>.yaml)

    def __post_init__(self):
        """Values that would otherwise fail (or mean nothing) only after the model is built and the sweep started."""
        from model.config import ConfigError

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        checks = [
            ("lengths", self.lengths, len(self.lengths) > 0 and all(isinstance(n, int) and not isinstance(n, bool)
                                                                    and n >= 1 for n in self.lengths),
             "a non-empty list of ints >= 1"),
            ("depths", self.depths, len(self.depths) > 0 and all(number(d) and 0 <= d <= 1 for d in self.depths),
             "a non-empty list of numbers in [0, 1]"),
            ("trials", self.trials, isinstance(self.trials, int) and self.trials >= 1, "an int >= 1"),
            ("frame_size", self.frame_size, isinstance(self.frame_size, int) and self.frame_size >= 1, "an int >= 1"),
            ("fps", self.fps, number(self.fps) and self.fps > 0, "a number > 0"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ConfigError(f"config: needle.{name}={value!r} is invalid; expected {expected}")


def run_needle(model, proc, cfg: NeedleConfig) -> dict:
    """Sweep lengths x depths; returns {"accuracy": [[...]], "tokens": [[...]], ...} and writes JSON + heatmap."""
    task = get_task(cfg.task)
    rng = np.random.default_rng(cfg.seed)
    random.seed(cfg.seed)
    acc = np.zeros((len(cfg.lengths), len(cfg.depths)))
    tokens = np.zeros_like(acc, dtype=np.int64)
    cells = [(i, j) for i in range(len(cfg.lengths)) for j in range(len(cfg.depths))]
    for i, j in tqdm(cells, desc=f"needle-{cfg.task}", unit="cell"):
        hits = 0
        for _ in range(cfg.trials):
            inputs, answer = task.make_case(proc, cfg.lengths[i], cfg.depths[j], rng, cfg)
            ok, _ = teacher_forced_correct(model, inputs, proc.tokenizer.encode(answer))
            hits += ok
            tokens[i, j] = inputs["input_ids"].shape[1]
        acc[i, j] = hits / cfg.trials
    result = {"task": cfg.task, "unit": task.unit, "lengths": list(cfg.lengths), "depths": list(cfg.depths),
              "accuracy": acc.tolist(), "tokens": tokens.tolist(), "mean_accuracy": float(acc.mean())}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"needle_{cfg.task}.json").write_text(json.dumps(result, indent=1))
    plot_heatmap(result, out / f"needle_{cfg.task}.png")
    return result


def plot_heatmap(result: dict, path: Path):
    """Length x depth accuracy heatmap (green = found), the way V-NIAH results are reported."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.array(result["accuracy"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * acc.shape[0], 1.5 + 0.5 * acc.shape[1]))
    im = ax.imshow(acc.T, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
    ax.set_xticks(range(len(result["lengths"])), [f"{n}\n({t} tok)" for n, t in
                                                   zip(result["lengths"], np.array(result["tokens"])[:, 0])])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel(f"haystack length ({result['unit']})")
    ax.set_ylabel("needle depth")
    for (x, y), v in np.ndenumerate(acc):
        ax.text(x, y, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(f"needle-{result['task']}: mean {result['mean_accuracy']:.1%}")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
