"""The registry of needle tasks: name -> `Task`. A task is one file in this folder plus its conf/task/<name>.yaml.

A task turns one cell of the length x depth sweep (eval/niah.py) into processor inputs and a gold answer:

    from . import register

    @register("mytask", unit="tokens")           # unit: what `needle.lengths` counts, for the heatmap's axis
    def mytask_case(proc, length, depth, rng, cfg):
        ...                                       # cfg: eval.niah.NeedleConfig (task options in cfg.extra)
        return proc(messages=[conv], add_generation_prompt=True), answer

and write conf/task/mytask.yaml (`python -m eval task=mytask`). Every module in this folder is imported here, so
the file is the whole registration.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Task:
    """make_case(proc, length, depth, rng, cfg) -> (processor inputs for one prompt, gold answer str);
    unit: what a sweep length counts ("frames", "tokens")."""
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
