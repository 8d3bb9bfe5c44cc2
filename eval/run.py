"""Evaluation run: build the model and processor once, then sweep the needle task (eval/niah.py, eval/tasks/)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from model.build import ModelSpec, build_model

from .grounding import GroundingConfig
from .haystack import HaystackConfig
from .niah import NeedleConfig, run_needle
from .ocr import OCRConfig


@dataclass(frozen=True)
class EvalConfig:
    """model: which model (model.build.ModelSpec: preset or checkpoint path); needle: the sweep; haystack: where
    video haystack frames come from (eval/haystack.py); processor: checkpoint dir with tokenizer/preprocessor files
    (None: the model path if it has them, else the embedded default); device: "auto" = cuda when available;
    rope_scaling: e.g. {"rope_type": "yarn", "factor": 3.0} (Qwen3VL.set_rope_scaling) for sweeps past the
    trained context; ocr: set by `task=ocr` (conf/task/ocr.yaml), which runs the OCR evaluation
    of eval/ocr.py on ocr.checkpoints instead of a needle sweep (model is then unused); grounding: likewise set by
    `task=grounding` (conf/task/grounding.yaml, eval/grounding.py)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    needle: NeedleConfig = field(default_factory=NeedleConfig)
    haystack: HaystackConfig = field(default_factory=HaystackConfig)
    processor: str | None = None
    device: str = "auto"
    rope_scaling: dict = field(default_factory=dict)
    ocr: OCRConfig | None = None
    grounding: GroundingConfig | None = None


def run(cfg: EvalConfig) -> dict:
    """Build, sweep, print the markdown table; returns the result dict."""
    from pathlib import Path

    from model import load_processor

    from .niah import markdown_table

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.ocr is not None:
        from .ocr import print_summary, run_ocr

        result = run_ocr(cfg.ocr, device)
        print_summary(result)
        print(f"results.json, results.md and report.html in {cfg.ocr.out_dir}")
        return result
    if cfg.grounding is not None:
        from .grounding import print_summary, run_grounding

        result = run_grounding(cfg.grounding, device)
        print_summary(result)
        print(f"results.json and results.md in {cfg.grounding.out_dir}")
        return result
    model = build_model(cfg.model, device).eval()
    if cfg.rope_scaling:
        model.set_rope_scaling(**cfg.rope_scaling)
    proc_path = cfg.processor
    if proc_path is None and cfg.model.path and (Path(cfg.model.path) / "tokenizer.json").is_file():
        proc_path = cfg.model.path
    proc = load_processor(proc_path)
    info = {"model": dataclasses.asdict(cfg.model), "rope_scaling": cfg.rope_scaling, "processor": proc_path}
    result = run_needle(model, proc, dataclasses.replace(cfg.needle, haystack=cfg.haystack), info)
    print(markdown_table(result))
    print(f"json, heatmap and table in {cfg.needle.out_dir}/{result['task']}.{{json,png,md}}")
    return result
