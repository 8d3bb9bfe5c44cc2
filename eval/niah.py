"""Long-context needle tests: needle-in-a-video-haystack (V-NIAH) and text passkey retrieval.

V-NIAH (Zhang et al. 2024, LongVA; the protocol Qwen3-VL reports as a length x depth heatmap): a haystack of
frames sampled at 1 fps, one needle frame inserted at a relative depth, a question whose answer only the needle
holds, scored by teacher forcing (`eval.scoring`). Here the haystack is synthetic (smooth random colour fields, no
downloads) and the needle is a rendered frame "THE SECRET NUMBER IS 4821"; bring your own haystack frames with
`frames_dir`. Passkey (Mohtashami & Jaggi 2023): a 5-digit key hidden at a depth in repeated filler text.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .scoring import teacher_forced_correct

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@dataclass
class NeedleConfig:
    """One sweep of a needle test over lengths x depths."""

    task: str = "video"                      # "video" (V-NIAH) or "passkey"
    lengths: tuple[int, ...] = (16, 32)      # video: haystack frames; passkey: approximate prompt tokens
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    trials: int = 1                          # needles per cell (different answers / haystacks)
    frame_size: int = 224                    # haystack frame side (pixels) before the processor's resize
    fps: float = 1.0                         # haystack sampling rate: frame i is at i / fps seconds
    frames_dir: str | None = None            # optional real haystack: a folder of images, sorted by name
    seed: int = 0
    out_dir: str = "eval_out"
    question: str = "What is the secret number shown in one of the frames? Answer with the number only."
    extra: dict = field(default_factory=dict)


def haystack_frames(n: int, size: int, rng: np.random.Generator, frames_dir: str | None = None) -> list[np.ndarray]:
    """n frames (H, W, 3) uint8: from frames_dir (cycled) or smooth random colour fields."""
    if frames_dir:
        files = sorted(p for p in Path(frames_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"frames_dir {frames_dir} holds no .png/.jpg frames")
        return [np.array(Image.open(files[i % len(files)]).convert("RGB").resize((size, size))) for i in range(n)]
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return [np.array(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in coarse]


def needle_frame(text: str, size: int) -> np.ndarray:
    """A white frame with `text` in large black letters."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    try:
        import matplotlib

        font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans-Bold.ttf"), size // 9)
    except (ImportError, OSError):
        font = ImageFont.load_default()
    words, lines = text.split(), []
    for w in words:  # greedy line wrap
        if lines and draw.textlength(lines[-1] + " " + w, font=font) < size * 0.9:
            lines[-1] += " " + w
        else:
            lines.append(w)
    y = size // 2 - len(lines) * size // 18
    for line in lines:
        draw.text((size * 0.05, y), line, fill="black", font=font)
        y += size // 8
    return np.array(img)


def video_case(proc, n_frames: int, depth: float, rng: np.random.Generator, cfg: NeedleConfig):
    """Processor inputs and gold answer for one V-NIAH cell."""
    frames = haystack_frames(n_frames, cfg.frame_size, rng, cfg.frames_dir)
    answer = str(rng.integers(1000, 10000))
    pos = min(n_frames - 1, int(round(depth * (n_frames - 1))))
    frames[pos] = needle_frame(f"THE SECRET NUMBER IS {answer}", cfg.frame_size)
    item = {"type": "video", "video": frames, "timestamps": [i / cfg.fps for i in range(n_frames)],
            "resized_height": cfg.frame_size, "resized_width": cfg.frame_size}
    conv = [{"role": "user", "content": [item, {"type": "text", "text": cfg.question}]}]
    return proc(messages=[conv], add_generation_prompt=True), answer


def passkey_case(proc, n_tokens: int, depth: float, rng: np.random.Generator, cfg: NeedleConfig):
    """Processor inputs and gold answer for one passkey cell (prompt of about n_tokens tokens)."""
    answer = str(rng.integers(10000, 100000))
    per = max(1, len(proc.tokenizer.encode(FILLER)))
    reps = max(1, n_tokens // per)
    cut = int(round(depth * reps))
    needle = f"The pass key is {answer}. Remember it. {answer} is the pass key. "
    text = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            + FILLER * cut + needle + FILLER * (reps - cut) + "What is the pass key? Answer with the number only.")
    conv = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return proc(messages=[conv], add_generation_prompt=True), answer


def run_needle(model, proc, cfg: NeedleConfig) -> dict:
    """Sweep lengths x depths; returns {"accuracy": [[...]], "tokens": [[...]], ...} and writes JSON + heatmap."""
    if cfg.task not in ("video", "passkey"):
        raise ValueError(f"unknown needle task {cfg.task!r} (video | passkey)")
    make = video_case if cfg.task == "video" else passkey_case
    rng = np.random.default_rng(cfg.seed)
    random.seed(cfg.seed)
    acc = np.zeros((len(cfg.lengths), len(cfg.depths)))
    tokens = np.zeros_like(acc, dtype=np.int64)
    cells = [(i, j) for i in range(len(cfg.lengths)) for j in range(len(cfg.depths))]
    for i, j in tqdm(cells, desc=f"needle-{cfg.task}", unit="cell"):
        hits = 0
        for _ in range(cfg.trials):
            inputs, answer = make(proc, cfg.lengths[i], cfg.depths[j], rng, cfg)
            ok, _ = teacher_forced_correct(model, inputs, proc.tokenizer.encode(answer))
            hits += ok
            tokens[i, j] = inputs["input_ids"].shape[1]
        acc[i, j] = hits / cfg.trials
    result = {"task": cfg.task, "lengths": list(cfg.lengths), "depths": list(cfg.depths),
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
    unit = "frames" if result["task"] == "video" else "tokens"
    ax.set_xticks(range(len(result["lengths"])), [f"{n}\n({t} tok)" for n, t in
                                                   zip(result["lengths"], np.array(result["tokens"])[:, 0])])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel(f"haystack length ({unit})")
    ax.set_ylabel("needle depth")
    for (x, y), v in np.ndenumerate(acc):
        ax.text(x, y, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(f"needle-{result['task']}: mean {result['mean_accuracy']:.1%}")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
