"""Synthetic long-video needle tasks for training and evaluating position encodings from scratch (docs/ablations.md).

Videos of small frames (`frame_size` pixels square: (frame_size / 32)^2 merged tokens per temporal group of two
frames), so thousands of frames fit in a few thousand tokens. The haystack is smooth colour fields (as
eval/haystack.py's default); a needle is one temporal group showing a large digit. Four tasks, those of the needle
suite (eval/tasks/, docs/needle.md) at a size a from-scratch model can learn:

    read       one white digit somewhere; "What is the secret number?"                    -> "7"        (vniah)
    time       one white digit; "At what time, in seconds, does the number appear?"      -> "41.5"     (temporal)
    distract   one red digit and two blue look-alikes; "What is the red number?"         -> "3"        (vniah_d)
    order      two white digits a before b; "Which number appears first, b or a?"        -> "a"        (multi_needle)

The prompt layout follows the model's `RopeConfig.temporal_ids` (model/positions.py): "timestamps" writes Qwen3-VL's
`<t seconds><|vision_start|>pads<|vision_end|>` per group; "absolute_time" and "none" write one
`<|vision_start|>pads<|vision_end|>` run per video (Qwen2.5-VL / Qwen2-VL, whose time lives in the T ids or
nowhere). Frames are sampled at `fps` (group g spans frames 2g, 2g + 1: its time is (2g + 0.5) / fps, the
processor's group timestamp). Pixel rows come from seeded banks built once with the processor's own `patchify`
(haystack groups and needle digits in a few jittered variants), so a sample costs a gather, not a render; position
ids of the video part are computed once per (rule, group count) with `get_rope_index` and continued by the text.
Everything is seeded; nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from model.positions import get_rope_index
from model.processing.patchify import patchify
from model.processing.prompt import timestamp_text

from .data import Encoded
from .loss import IGNORE_INDEX

TASKS = ("read", "time", "distract", "order")
COLOURS = {"white": (255, 255, 255), "red": (230, 30, 30), "blue": (40, 80, 240)}


@dataclass(frozen=True)
class NeedleVideoConfig:
    """Synthetic video needle data (the study's `data.*`)."""
    frame_size: int = 64          # pixels, a multiple of 32: (frame_size / 32)^2 tokens per temporal group
    fps: float = 1.0              # frame rate of the synthetic videos (timestamps, absolute-time ids)
    train_groups: int = 256       # the training length L, in temporal groups (2 frames each)
    min_groups: int = 16          # shortest training video
    tasks: tuple = TASKS
    haystack_bank: int = 512      # distinct haystack groups in the pixel bank
    needle_variants: int = 8      # jittered renderings per (digit, colour)
    distractors: int = 2

    def __post_init__(self):
        from model.config import ConfigError

        if self.frame_size % 32 or self.frame_size < 32:
            raise ConfigError(f"data.frame_size={self.frame_size} must be a positive multiple of 32")
        need = 1 + self.distractors if "distract" in self.tasks else 2  # groups the needles of one sample take
        if not need <= self.min_groups <= self.train_groups:
            raise ConfigError(f"data.min_groups={self.min_groups} must be in [{need}, data.train_groups="
                              f"{self.train_groups}] (a sample's needles each take one temporal group)")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ConfigError(f"data.tasks={list(self.tasks)} must be a non-empty subset of {TASKS}")
        if self.fps <= 0:
            raise ConfigError(f"data.fps={self.fps} must be > 0")


def _font(size: int):
    import matplotlib

    path = f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans-Bold.ttf"  # the OCR demo's font source
    return ImageFont.truetype(path, size)


def digit_frame(digit: int, size: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: a large digit in `colour` on a dark random background, jittered by a few pixels."""
    bg = tuple(int(c) for c in rng.integers(0, 60, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    j = max(1, size // 16)
    d.text((size // 2 + int(rng.integers(-j, j + 1)), size // 2 + int(rng.integers(-j, j + 1))), str(digit),
           fill=COLOURS[colour], font=_font(int(size * 0.8)), anchor="mm")
    return np.asarray(img)


def haystack_frame(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: a smooth colour field (two random colours blended along a random direction)."""
    a, b = rng.integers(40, 256, 3), rng.integers(40, 256, 3)
    ang = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / max(1, size - 1)
    w = np.clip(0.5 + (np.cos(ang) * (x - 0.5) + np.sin(ang) * (y - 0.5)), 0, 1)[..., None]
    return (a * (1 - w) + b * w).astype(np.uint8)


class NeedleVideos:
    """Seeded generator of needle-task samples (`Encoded`) for one model config (its position-id rule).

    Args:
        cfg: NeedleVideoConfig.  model_config: Qwen3VLConfig (token ids, merge size, rope.temporal_ids).
        processor: model.processing.Qwen3VLProcessor (tokenizer, video patch geometry).  seed: bank seed.
        device: where the pixel banks live (a sample's rows are gathered there: no per-step host copy on a GPU).
    """

    def __init__(self, cfg: NeedleVideoConfig, model_config, processor, seed: int = 0, device="cpu"):
        self.cfg, self.mc, self.tok = cfg, model_config, processor.tokenizer
        self.rule = model_config.text.rope.temporal_ids
        vc = processor.video_config
        self.patch = vc.patch_size
        self.tokens_per_group = (cfg.frame_size // (self.patch * vc.merge_size)) ** 2
        rng = np.random.default_rng([seed, 1])

        def rows(frame):  # one temporal group of the same frame twice -> (patches, 1536) fp32
            f = torch.from_numpy(np.stack([frame, frame])).permute(0, 3, 1, 2)
            return patchify(f, vc)[0]

        self.device = torch.device(device)
        self.hay = torch.stack([rows(haystack_frame(cfg.frame_size, rng))
                                for _ in range(cfg.haystack_bank)]).to(self.device)
        self.needles = {(d, c): torch.stack([rows(digit_frame(d, cfg.frame_size, c, rng))
                                             for _ in range(cfg.needle_variants)]).to(self.device)
                        for d in range(10) for c in COLOURS}
        self.vs, self.ve = model_config.vision_start_token_id, model_config.vision_end_token_id
        self._video_cache: dict[int, tuple[list[int], torch.Tensor, int]] = {}
        self._ids_cache: dict[int, torch.Tensor] = {}

    # -------------------------------------------------------------------------------------------- layout
    @property
    def second_per_grid(self) -> float:
        return 2.0 / self.cfg.fps

    def group_time(self, g: int) -> float:
        """Seconds of temporal group g: the mean of its two frame times, as the processor's timestamps."""
        return (2 * g + 0.5) / self.cfg.fps

    def video(self, groups: int) -> tuple[list[int], torch.Tensor, int]:
        """(token ids, (3, n) position ids, next position) of a video of `groups` groups at the prompt start."""
        if groups not in self._video_cache:
            pad = [self.mc.video_token_id] * self.tokens_per_group
            if self.rule == "timestamps":
                ids = [i for g in range(groups) for i in self.tok.encode(timestamp_text(self.group_time(g)))
                       + [self.vs] + pad + [self.ve]]
            else:
                ids = [self.vs] + pad * groups + [self.ve]
            pos, delta = get_rope_index(torch.tensor([ids]), video_grid_thw=self.grid(groups), config=self.mc,
                                        second_per_grid_ts=[self.second_per_grid])
            self._video_cache[groups] = (ids, pos[:, 0], int(delta) + len(ids))
        return self._video_cache[groups]

    def _video_ids(self, groups: int) -> torch.Tensor:
        """`video(groups)`'s token ids as a (n,) long tensor (cached: the training loop asks for it every sample)."""
        if groups not in self._ids_cache:
            self._ids_cache[groups] = torch.tensor(self.video(groups)[0])
        return self._ids_cache[groups]

    def grid(self, groups: int) -> torch.Tensor:
        side = self.cfg.frame_size // self.patch
        return torch.tensor([[groups, side, side]])

    # -------------------------------------------------------------------------------------------- samples
    def sample(self, task: str, groups: int, rng: np.random.Generator, depth: float | None = None) -> Encoded:
        """One prompt + answer of `task` over a video of `groups` groups (labels on the answer tokens).

        depth: the needle's relative position in [0, 1] (the first needle's for `order`); None: uniform at random.
        """
        pick = (lambda: int(rng.integers(groups))) if depth is None else (lambda: int(round(depth * (groups - 1))))
        first = pick()
        free = [g for g in range(groups) if g != first]
        needles: list[tuple[int, int, str]] = []   # (group, digit, colour)
        if task == "read" or task == "time":
            d = int(rng.integers(10))
            needles.append((first, d, "white"))
            q, a = ("What is the secret number?", str(d)) if task == "read" else \
                ("At what time, in seconds, does the number appear?", f"{self.group_time(first):.1f}")
        elif task == "distract":
            digits = rng.choice(10, size=1 + self.cfg.distractors, replace=False)
            others = rng.choice(free, size=self.cfg.distractors, replace=False)
            needles = [(first, int(digits[0]), "red")] + [(int(g), int(x), "blue") for g, x in zip(others, digits[1:])]
            q, a = "What is the red number?", str(int(digits[0]))
        elif task == "order":
            a_, b_ = (int(x) for x in rng.choice(10, size=2, replace=False))
            second = int(rng.choice(free))
            ga, gb = sorted((first, second))
            needles = [(ga, a_, "white"), (gb, b_, "white")]
            x, y = (a_, b_) if rng.random() < 0.5 else (b_, a_)
            q, a = f"Which number appears first, {x} or {y}?", str(a_)
        else:
            raise ValueError(f"unknown needle task {task!r}; known: {TASKS}")
        _, vid_pos, nxt = self.video(groups)
        q_ids, a_ids = self.tok.encode(" " + q + " Answer:"), self.tok.encode(" " + a) + [self.mc.eos_token_id]
        ids = torch.cat([self._video_ids(groups), torch.tensor(q_ids + a_ids)])
        tail = torch.arange(nxt, nxt + len(q_ids) + len(a_ids)).expand(3, -1)
        labels = torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long)
        labels[len(ids) - len(a_ids):] = torch.tensor(a_ids)
        idx = torch.from_numpy(rng.integers(len(self.hay), size=groups)).to(self.device)
        hay = self.hay[idx]  # (groups, patches, 1536)
        for g, d, c in needles:
            hay[g] = self.needles[(d, c)][int(rng.integers(self.cfg.needle_variants))]
        return Encoded(input_ids=ids, labels=labels, position_ids=torch.cat([vid_pos, tail], dim=1),
                       pixel_values_videos=hay.flatten(0, 1), video_grid_thw=self.grid(groups))

    def train_sample(self, rng: np.random.Generator, tasks: tuple | None = None) -> Encoded:
        """A training sample: a task from `tasks` (default cfg.tasks) and a length in [min_groups, train_groups],
        both uniform."""
        tasks = tasks or self.cfg.tasks
        task = tasks[int(rng.integers(len(tasks)))]
        return self.sample(task, int(rng.integers(self.cfg.min_groups, self.cfg.train_groups + 1)), rng)


class DigitImages(torch.utils.data.Dataset):
    """Single-image samples of the needle digits, answer = the digit: what `train.vision_warmup` reads (the OCR
    demo's recipe: the tower learns to read before the decoder learns to ignore it)."""

    def __init__(self, videos: NeedleVideos, n: int = 2000, seed: int = 0):
        rng = np.random.default_rng([seed, 2])
        keys = list(videos.needles)
        self.items = [(keys[int(rng.integers(len(keys)))], int(rng.integers(videos.cfg.needle_variants)))
                      for _ in range(n)]
        self.videos, self.path = videos, "<synthetic needle digits>"

    def __len__(self):
        return len(self.items)

    def answer(self, i: int) -> str:
        return str(self.items[i][0][0])

    def __getitem__(self, i: int) -> Encoded:
        key, v = self.items[i]
        side = self.videos.cfg.frame_size // self.videos.patch
        ids = torch.tensor([0])
        return Encoded(input_ids=ids, labels=ids.clone(), position_ids=torch.zeros(3, 1, dtype=torch.long),
                       pixel_values=self.videos.needles[key][v], image_grid_thw=torch.tensor([[1, side, side]]),
                       index=i)
