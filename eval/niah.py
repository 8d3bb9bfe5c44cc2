"""The needle sweep shared by every long-context task: lengths x depths cells, scored per cell in two modes,
resumable, written as JSON + heatmap PNG + markdown table.

A task (eval/tasks/: vniah, vniah_d, temporal, multi_needle, passkey) builds one prompt (`Case`) per trial of a
cell; this module runs the grid and scores every trial by teacher forcing (the V-NIAH protocol of Zhang et al. 2024,
LongVA) and by free greedy generation judged on the value it states (eval/answers.py), the way Qwen3-VL reports
V-NIAH as a length x depth heatmap. Results go to `out_dir/<task>.json` after every cell: a rerun with the same
settings skips the cells already there (resumable; each cell draws from its own seeded generator, so a resumed
sweep equals an uninterrupted one). A cell that runs out of memory is recorded with status "oom" and the sweep
goes on.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .haystack import HaystackConfig
from .scoring import Qwen3VLNeedleModel, judge, judge_teacher_forced
from .tasks import Case, get_task

MODES = ("teacher_forced", "generate")


@dataclass
class NeedleConfig:
    """One sweep of a needle test over lengths x depths; task options are in `extra` (conf/task/<name>.yaml)."""

    task: str = "vniah"                      # a name in eval.tasks.TASKS
    lengths: tuple[int, ...] = (16, 32)      # in `length_unit`
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    trials: int = 1                          # prompts per cell (different answers / haystacks)
    length_unit: str = "task"                # "task": the task's unit (frames / tokens); "tokens": prompt tokens
    scoring: tuple[str, ...] = MODES         # teacher_forced and/or generate; the first fills the heatmap
    max_new_tokens: int = 24                 # generate mode's answer budget
    chunk_size: int = 0                      # 0: one forward per prompt; > 0: chunked prefill into a KV cache
    sparsity: str = "none"                   # the prefill's attn_sparsity: none | xattention | vertical_slash | window
    sparsity_params: dict = field(default_factory=dict)  # its SparsityConfig fields (block_size, params, ...)
    stream: Any = "auto"                     # "auto" | true | false: video prompts streamed chunk by chunk (auto:
                                             # when chunk_size > 0); Any: Hydra gives a bool or the string
    timestamps: bool = True                  # False: drop the `<t seconds>` text of video prompts (ablation)
    haystack: HaystackConfig = field(default_factory=HaystackConfig)  # `python -m eval` fills it from `haystack.*`
    seed: int = 0
    out_dir: str = "eval_out"
    question: str = "What is the secret number shown in one of the frames? Answer with the number only."
    extra: dict = field(default_factory=dict)  # task options (conf/task/<name>.yaml)

    def __post_init__(self):
        """Values that would otherwise fail (or mean nothing) only after the model is built and the sweep started."""
        from model.config import ConfigError

        if isinstance(self.haystack, dict):
            self.haystack = HaystackConfig(**self.haystack)

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        checks = [
            ("lengths", self.lengths, len(self.lengths) > 0 and all(isinstance(n, int) and not isinstance(n, bool)
                                                                    and n >= 1 for n in self.lengths),
             "a non-empty list of ints >= 1"),
            ("depths", self.depths, len(self.depths) > 0 and all(number(d) and 0 <= d <= 1 for d in self.depths),
             "a non-empty list of numbers in [0, 1]"),
            ("trials", self.trials, isinstance(self.trials, int) and self.trials >= 1, "an int >= 1"),
            ("length_unit", self.length_unit, self.length_unit in ("task", "tokens"), "task | tokens"),
            ("scoring", self.scoring, len(self.scoring) > 0 and all(m in MODES for m in self.scoring),
             f"a non-empty list of {MODES}"),
            ("max_new_tokens", self.max_new_tokens, isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "an int >= 1"),
            ("chunk_size", self.chunk_size, isinstance(self.chunk_size, int) and self.chunk_size >= 0, "an int >= 0"),
            ("stream", self.stream, isinstance(self.stream, bool) or self.stream == "auto", "auto | true | false"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ConfigError(f"config: needle.{name}={value!r} is invalid; expected {expected}")
        try:
            sparsity = self.prefill_sparsity()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config: needle.sparsity / needle.sparsity_params: {e}") from None
        if sparsity is not None and self.chunk_size == 0:
            raise ConfigError(f"config: needle.sparsity={self.sparsity!r} applies to the chunked prefill; set "
                              "needle.chunk_size > 0")
        if self.stream is True and not self.chunk_size:
            raise ConfigError("config: needle.stream=true needs needle.chunk_size > 0 (a streamed video is prefilled "
                              "into a KV cache chunk by chunk); set needle.chunk_size, or needle.stream=auto|false")

    @property
    def streams(self) -> bool:
        """Whether video cells are streamed: built lazily and prefilled a chunk of temporal groups at a time
        (eval/haystack.py `video_case`, eval/scoring.py), so host memory holds one chunk's pixels, not the prompt's."""
        return bool(self.chunk_size) if self.stream == "auto" else self.stream

    def prefill_sparsity(self):
        """The model.sparsity.SparsityConfig of the prompt prefill, or None (dense)."""
        from model.sparsity import as_sparsity

        return as_sparsity({"method": self.sparsity, **dict(self.sparsity_params)})

    def signature(self) -> dict:
        """The settings a saved cell depends on: a saved sweep is resumed only when they are equal."""
        d = asdict(self)
        for k in ("lengths", "depths", "out_dir"):
            d.pop(k)
        return json.loads(json.dumps(d))


def _cell_rng(seed: int, length: int, depth: float) -> np.random.Generator:
    """Each cell its own generator: the cell's prompts do not depend on which cells ran before (resume)."""
    return np.random.default_rng([seed, length, int(round(depth * 1_000_000))])


def task_length(task, proc, length: int, cfg: NeedleConfig) -> int:
    """The frame count of a video cell given in prompt tokens (`length_unit: tokens`).

    Two small prompts (the fewest frames the task accepts, and one temporal group more) give the tokens of the
    prompt around the video and of a group without its timestamp; groups are then added, each with its own
    `<t seconds>` text (longer as t grows), while the total gets closer to `length`. No full-size prompt is built.
    """
    if cfg.length_unit == "task" or task.unit == "tokens":
        return length
    from model.processing.prompt import timestamp_text

    def tokens(n):
        return task.make_case(proc, n, 0.0, _cell_rng(cfg.seed, n, 0.0), cfg).inputs["input_ids"].shape[1]

    def stamp(g):  # timestamp tokens of group g (synthetic timing; a video file's differs by < one interval)
        t = (2 * g + 0.5) / cfg.haystack.fps
        return len(proc.tokenizer.encode(timestamp_text(t))) if cfg.timestamps else 0

    base = 2
    while True:  # tasks with several needles need a few groups
        try:
            total = tokens(base)
            break
        except ValueError:
            base += 2
            if base > 1000:
                raise
    per_group = tokens(base + 2) - total - stamp(base // 2)
    n = base
    while abs(total + per_group + stamp(n // 2) - length) < abs(total - length):
        total += per_group + stamp(n // 2)
        n += 2
    return n


def _oom_message(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else "out of memory"


def _peak_memory(device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host_max_rss"


def as_case(made) -> Case:
    """A task's return value as a `Case`: an (inputs, answer) pair (the registry's earlier contract) is judged as
    text ("text": the stripped answer equals the gold one)."""
    if isinstance(made, Case):
        return made
    inputs, answer = made
    return Case(inputs, answer, "text", [answer])


def run_cell(model, proc, task, length: int, depth: float, cfg: NeedleConfig) -> dict:
    """Score one cell's trials in every mode of cfg.scoring; returns the cell's record (eval JSON `cells` entry)."""
    rng = _cell_rng(cfg.seed, length, depth)
    n = task_length(task, proc, length, cfg)
    trials, tokens, frames = [], 0, 0
    for _ in range(cfg.trials):
        case = as_case(task.make_case(proc, n, depth, rng, cfg))
        answer_ids = proc.tokenizer.encode(case.answer)
        rec = {"answer": case.answer, "values": case.values, "frames": case.frames,
               "tokens": int(case.inputs["input_ids"].shape[1]),
               "needle_frames": [nd["frame"] for nd in case.needles]}
        tokens, frames = max(tokens, rec["tokens"]), max(frames, rec["frames"])
        try:
            if "teacher_forced" in cfg.scoring:
                rec["teacher_forced"] = judge_teacher_forced(case, model.answer_hits(case, answer_ids), answer_ids,
                                                             proc.tokenizer)
            if "generate" in cfg.scoring:
                text = model.generate(case, cfg.max_new_tokens)
                rec["generate"] = {"text": text, **judge(case, text)}
        except torch.OutOfMemoryError as e:  # the prompt's size is known: record it with the failure
            del case
            return {"length": length, "depth": depth, "status": "oom", "error": _oom_message(e), "frames": frames,
                    "tokens": tokens}
        trials.append(rec)
    cell = {"length": length, "depth": depth, "status": "ok", "frames": frames, "tokens": tokens}
    for mode in cfg.scoring:
        s = {"accuracy": float(np.mean([t[mode]["correct"] for t in trials]))}
        if "recall" in trials[0][mode]:
            s["recall"] = np.mean([t[mode]["recall"] for t in trials], axis=0).tolist()
        if mode == "generate" and any("abs_error" in t[mode] for t in trials):
            errs = [t[mode]["abs_error"] for t in trials]  # MAE over the answers that state a time
            parsed = [e for e in errs if e is not None]
            s["mae"] = float(np.mean(parsed)) if parsed else None
            s["unparsed"] = len(errs) - len(parsed)
        cell[mode] = s
    cell["trials"] = trials
    return cell


def run_needle(model, proc, cfg: NeedleConfig, run_info: dict | None = None) -> dict:
    """Sweep lengths x depths (resuming out_dir/<task>.json); returns the result dict, written as JSON + PNG + MD.

    Args:
        model: a `eval.scoring.NeedleModel`, or a Qwen3VL (wrapped in `Qwen3VLNeedleModel` with cfg.chunk_size).
        proc: the processor (tokenizer, video preprocessing).
        run_info: what else the cells depend on (model, rope scaling, processor; JSON-able), saved with them: a
            saved sweep is resumed only when it and `cfg.signature()` are both equal.
    """
    task = get_task(cfg.task)
    if not hasattr(model, "answer_hits"):
        model = Qwen3VLNeedleModel(model, proc.tokenizer, cfg.chunk_size, cfg.prefill_sparsity(),
                                   max_new_tokens=cfg.max_new_tokens)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{cfg.task}.json"
    done = {}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("config") == cfg.signature() and old.get("run") == json.loads(json.dumps(run_info or {})):
            done = {(c["length"], c["depth"]): c for c in old["cells"]}
        else:
            print(f"needle-{cfg.task}: {path} holds another configuration; starting afresh")
    device = getattr(getattr(model, "model", None), "device", torch.device("cpu"))
    cells = []
    bar = tqdm([(n, d) for n in cfg.lengths for d in cfg.depths], desc=f"needle-{cfg.task}", unit="cell")
    for n, d in bar:
        if (n, d) in done:
            cells.append(done[(n, d)])
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            cell = run_cell(model, proc, task, n, d, cfg)
        except torch.OutOfMemoryError as e:
            cell = {"length": n, "depth": d, "status": "oom", "error": _oom_message(e), "frames": None, "tokens": None}
        if cell["status"] == "oom" and device.type == "cuda":
            torch.cuda.empty_cache()
        cell["seconds"] = time.perf_counter() - t0
        cell["memory_bytes"], cell["memory_kind"] = _peak_memory(device)
        cell["scoring"] = list(cfg.scoring)
        cells.append(cell)
        bar.set_postfix(length=n, depth=d, tokens=cell["tokens"], s=f"{cell['seconds']:.1f}", status=cell["status"])
        _write(path, _result(cfg, task, cells, run_info))
    result = _result(cfg, task, cells, run_info)
    _write(path, result)
    plot_heatmap(result, out / f"{cfg.task}.png")
    (out / f"{cfg.task}.md").write_text(markdown_table(result))
    return result


def _result(cfg: NeedleConfig, task, cells: list[dict], run_info: dict | None) -> dict:
    """The JSON: per-cell records plus length x depth grids of the first scoring mode (NaN where not run / OOM)."""
    mode = cfg.scoring[0]
    by = {(c["length"], c["depth"]): c for c in cells}
    grid = lambda f: [[f(by.get((n, d))) for d in cfg.depths] for n in cfg.lengths]  # noqa: E731
    acc = grid(lambda c: c[mode]["accuracy"] if c and c["status"] == "ok" else None)
    vals = [a for row in acc for a in row if a is not None]
    return {"task": cfg.task, "unit": task.unit, "length_unit": cfg.length_unit, "lengths": list(cfg.lengths),
            "depths": list(cfg.depths), "scoring": list(cfg.scoring), "mode": mode, "config": cfg.signature(),
            "run": json.loads(json.dumps(run_info or {})),
            "accuracy": acc, "tokens": grid(lambda c: c["tokens"] if c else None),
            "frames": grid(lambda c: c["frames"] if c else None),
            "mean_accuracy": float(np.mean(vals)) if vals else float("nan"), "cells": cells}


def _write(path: Path, result: dict):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def markdown_table(result: dict) -> str:
    """One row per cell: length, depth, frames, tokens, each mode's accuracy (+ MAE / recall), seconds, memory."""
    modes = result["scoring"]
    head = ["length", "depth", "frames", "tokens"] + [f"{m} acc" for m in modes] + ["extra", "s", "GiB", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in result["cells"]:
        ok = c["status"] == "ok"
        accs = [f"{c[m]['accuracy']:.0%}" if ok else "-" for m in modes]
        extra = []
        if ok and "generate" in c and c["generate"].get("mae") is not None:
            extra.append(f"MAE {c['generate']['mae']:.2f} s")
        if ok:
            for m in modes:
                if "recall" in c[m]:
                    extra.append(f"{m} recall " + "/".join(f"{r:.0%}" for r in c[m]["recall"]))
        lines.append("| " + " | ".join(str(x) for x in [c["length"], f"{c['depth']:.2f}", c["frames"], c["tokens"],
                                                        *accs, "; ".join(extra), f"{c['seconds']:.1f}",
                                                        f"{c['memory_bytes'] / 2**30:.2f}", c["status"]]) + " |")
    title = f"# needle-{result['task']} ({result['mode']}): mean {result['mean_accuracy']:.1%}"
    return title + "\n\n" + "\n".join(lines) + "\n"


def plot_heatmap(result: dict, path: Path, ax=None):
    """Length x depth accuracy heatmap (green = found; grey = OOM / not run), the way V-NIAH results are reported."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.array([[np.nan if a is None else a for a in row] for row in result["accuracy"]], dtype=float)
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(1.6 + 0.9 * acc.shape[0], 1.5 + 0.5 * acc.shape[1]))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(acc.T), cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="upper")
    toks = [next((t for t in row if t is not None), None) for row in result["tokens"]]
    ax.set_xticks(range(len(result["lengths"])), [f"{n}\n({t} tok)" for n, t in zip(result["lengths"], toks)])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel(f"haystack length ({result['unit'] if result.get('length_unit') == 'task' else 'tokens'})")
    ax.set_ylabel("needle depth")
    for (x, y), v in np.ndenumerate(acc):
        ax.text(x, y, "OOM" if np.isnan(v) else f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{result['task']} ({result['mode']}): {result['mean_accuracy']:.1%}", fontsize=9)
    if own:
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
