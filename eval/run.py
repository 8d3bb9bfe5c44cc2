"""Evaluation run: build the model and processor once, then sweep the needle task (eval/niah.py, eval/tasks/)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.build import ModelSpec, build_model

from .niah import NeedleConfig, run_needle
from .ocr import OCRConfig


@dataclass(frozen=True)
class EvalConfig:
    """model: which model (model.build.ModelSpec: preset or checkpoint path); needle: the sweep;
    processor: checkpoint dir with tokenizer/preprocessor files (None: the model path if it has them, else the
    embedded default); device: "auto" = cuda when available; ocr: set by `task=ocr` (conf/task/ocr.yaml), which
    runs the OCR evaluation of eval/ocr.py on ocr.checkpoints instead of a needle sweep (model is then unused)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    needle: NeedleConfig = field(default_factory=NeedleConfig)
    processor: str | None = None
    device: str = "auto"
    ocr: OCRConfig | None = None


def run(cfg: EvalConfig) -> dict:
    """Build, sweep, print a summary table; returns the result dict."""
    from pathlib import Path

    from model import load_processor

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.ocr is not None:
        from .ocr import print_summary, run_ocr

        result = run_ocr(cfg.ocr, device)
        print_summary(result)
        print(f"results.json, results.md and report.html in {cfg.ocr.out_dir}")
        return result
    model = build_model(cfg.model, device).eval()
    proc_path = cfg.processor
    if proc_path is None and cfg.model.path and (Path(cfg.model.path) / "tokenizer.json").is_file():
        proc_path = cfg.model.path
    proc = load_processor(proc_path)
    result = run_needle(model, proc, cfg.needle)
    print(f"needle-{result['task']}: mean accuracy {result['mean_accuracy']:.1%} "
          f"(json + heatmap in {cfg.needle.out_dir})")
    for n, row, toks in zip(result["lengths"], result["accuracy"], result["tokens"]):
        print(f"  length {n:>7} ({toks[0]} tokens): " + "  ".join(f"{a:.0%}" for a in row))
    return result
