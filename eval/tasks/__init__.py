"""The registry of needle tasks: name -> `Task`. A task is one file in this folder plus its conf/task/<name>.yaml.

A task turns one cell of the length x depth sweep (eval/niah.py) into a `Case`: the processor inputs of one prompt,
the gold answer (text to teacher-force) and how a generated answer is judged:

    from . import Case, register

    @register("mytask", unit="tokens")           # unit: what `needle.lengths` counts, for the heatmap's axis
    def mytask_case(proc, length, depth, rng, cfg):
        ...                                       # cfg: eval.niah.NeedleConfig (task options in cfg.extra)
        return Case(proc(messages=[conv], add_generation_prompt=True), answer)

and write conf/task/mytask.yaml (`python -m eval task=mytask`). Every module in this folder that registers a task
is imported here, so the file is the whole registration. Answer kinds (`Case.kind`): "number" (the one number
stated equals the gold one), "time" (seconds, within `Case.tolerance`), "numbers" (multi-needle: every gold number
stated; recall per needle), "text" (the stripped answer equals the gold one; a task returning a plain
(inputs, answer) pair gets this kind).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Case:
    """One prompt of a needle cell.

    Args:
        inputs: processor output for ONE prompt ending with the generation prompt (input_ids (1, P), pixels ...).
        answer: gold answer text, teacher-forced after the prompt ("4821", "12.5", "4821, 1234").
        kind: "number" | "time" | "numbers" | "text" (how a generated answer is parsed and judged; module docstring).
        values: gold values: [number], [seconds] or the k needle numbers in the order of `answer`.
        tolerance: "time" only: largest |error| in seconds still counted correct.
        frames: haystack frames in the prompt (0 for text tasks).
        needles: per inserted needle-like frame: {"frame": index, "group": temporal group, "value": its number or
            time, "target": whether the question asks for it, "image": (H, W, 3) uint8} -- what a transparent
            oracle (tests) looks for in the pixels; not saved in the JSON.
        stream: a streamed video prompt (needle.stream, eval/haystack.py `video_case`): a
            `model.processing.stream.VideoStream` over the haystack's lazy frames; `inputs` then holds input_ids,
            video_grid_thw and video_timestamps but no pixel_values_videos, and the scorer prefills the video a
            chunk at a time. None: `inputs` is the whole processor output.
    """

    inputs: dict
    answer: str
    kind: str = "number"
    values: list = field(default_factory=list)
    tolerance: float = 0.0
    frames: int = 0
    needles: list = field(default_factory=list)
    stream: object | None = None

    def full_inputs(self) -> dict:
        """`inputs` with the video's pixel rows (a streamed case's chunks concatenated: for small cells, and for
        models that need the whole prompt at once)."""
        if self.stream is None:
            return self.inputs
        return {**self.inputs, "pixel_values_videos": torch.cat([c.pixel_values for c in self.stream])}


@dataclass(frozen=True)
class Task:
    """make_case(proc, length, depth, rng, cfg) -> Case; unit: what a sweep length counts ("frames", "tokens")."""
    name: str
    make_case: Callable
    unit: str


TASKS: dict[str, Task] = {}


def register(name: str, unit: str) -> Callable:
    """Decorator: add `make_case` to TASKS under `name` (a second task with the same name is an error)."""
    def add(make_case: Callable) -> Callable:
        if name in TASKS:
            raise ValueError(f"needle task {name!r} registered twice")
        TASKS[name] = Task(name, make_case, unit)
        return make_case
    return add


def get_task(name: str) -> Task:
    """The registered task `name`; an unknown name raises with the list of known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown needle task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name]


for _module in pkgutil.iter_modules(__path__):  # each task module registers itself when imported
    importlib.import_module(f"{__name__}.{_module.name}")
