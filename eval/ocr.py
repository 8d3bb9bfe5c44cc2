"""Domain-OCR evaluation: one or more checkpoints on a labelled JSONL set, side by side.

`python -m eval task=ocr ocr.checkpoints=[base,finetuned] ocr.data=set.jsonl ocr.out_dir=OUT` (conf/task/ocr.yaml).
The set is in the training format (train/data.py: messages with an image and a question, the assistant turn is the
reference), read by the training's own `SFTDataset`, so prompts are built exactly as in training. Each checkpoint
is preprocessed with the pixel budgets its export wrote (preprocessor_config.json, train/export.py), which are the
budgets it was trained with; a base checkpoint uses its own files. Answers are generated in left-padded batches
(eval/generate.py), greedy by default, the way the trainer's validation does (train/step.py `evaluate`: batches of
32, `train.eval_max_new_tokens`, bf16 autocast on CUDA for precision auto), so the CPU demo's export on its validation
set gives the CER the trainer logged at the last step (`metrics.raw.cer_codepoints`, the trainer's code-point CER, to
the last bit; `metrics.raw.cer` counts grapheme clusters and equals it unless a prediction or reference holds a
multi-code-point grapheme; tests/test_ocr_eval.py).

Metrics (eval/ocr_metrics.py): CER, WER, exact match and ANLS under each normalisation, per sample and over the
set with seeded bootstrap intervals, and CER per script of the reference. Writes to `out_dir`:
results.json (everything), results.md (the side-by-side table) and report.html (the worst samples with their image
as an embedded PNG, the reference and every checkpoint's prediction).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from .generate import generate_batch
from .metrics import character_error_rate
from .ocr_metrics import NORMALISERS, bootstrap_ci, corpus_metrics, score_sample, text_script

TABLE_ROWS = (("cer", "raw"), ("cer", "all"), ("wer", "raw"), ("wer", "all"), ("exact", "raw"), ("exact", "all"),
              ("anls", "all"))


@dataclass(frozen=True)
class CheckpointEvalConfig:
    """Checkpoints answering a labelled JSONL set: the settings `eval_dataset` and `predict` read, shared by
    the OCR (`OCRConfig`) and grounding (eval/grounding.py) evaluations; `SECTION` names the config group in errors.

    Args:
        checkpoints: exported checkpoint directories (config.json, weights, tokenizer and preprocessor configs),
            listed base first: the report ranks its worst samples by the last one's CER.
        names: column labels (default: each directory's last two path parts).
        data: the JSONL set (training format); root: its media root (default: the file's folder).
        limit: score only the first N samples (0 = all); the trainer scores the first `train.eval_samples`.
        batch_size: prompts per generate call (the trainer uses 32).  max_new_tokens: the answer budget (the
            trainer's `train.eval_max_new_tokens`: a model that does not stop is cut at the same place).
        do_sample / temperature / top_k / top_p / seed: sampling instead of greedy decoding.
        precision: auto (bf16 autocast on CUDA, fp32 on CPU, as training) | fp32 | bf16.
        dtype: weights' dtype: float32 (as training's master weights, with autocast) | bfloat16 (half the memory).
        max_seq_len: longer samples are skipped, as in training (`data.max_seq_len`).
        system_prompt: prepended as in training's `data.system_prompt`.
        n_boot: bootstrap resamples (0: no intervals).
    """

    SECTION: ClassVar[str] = ""
    EXAMPLE: ClassVar[str] = ""     # an exported checkpoint, for the "checkpoints is empty" message
    DATA_HINT: ClassVar[str] = ""   # what `data` holds, for the "data is not set" message

    checkpoints: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    data: str | None = None
    root: str | None = None
    limit: int = 0
    batch_size: int = 32
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    precision: str = "auto"
    dtype: str = "float32"
    max_seq_len: int = 4096
    system_prompt: str | None = None
    n_boot: int = 1000

    def __post_init__(self):
        from model.config import ConfigError

        s = self.SECTION
        if not self.checkpoints:
            raise ConfigError(f"{s}.checkpoints is empty: give one or more exported checkpoint dirs, "
                              f"e.g. {s}.checkpoints=[{self.EXAMPLE}]")
        if not self.data:
            raise ConfigError(f"{s}.data is not set: {self.DATA_HINT}")
        if self.names and len(self.names) != len(self.checkpoints):
            raise ConfigError(f"{s}.names has {len(self.names)} entries for {len(self.checkpoints)} checkpoints")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{s}.precision must be auto | fp32 | bf16, got {self.precision!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"{s}.dtype must be float32 | bfloat16, got {self.dtype!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.limit < 0:
            raise ConfigError(f"{s}.batch_size and {s}.max_new_tokens must be >= 1, {s}.limit >= 0")


@dataclass(frozen=True)
class OCRConfig(CheckpointEvalConfig):
    """One OCR evaluation: `CheckpointEvalConfig` plus
        worst: samples shown in report.html.  out_dir: where results.json, results.md and report.html go.
    """

    SECTION: ClassVar[str] = "ocr"
    EXAMPLE: ClassVar[str] = "runs/ocr_demo/final"
    DATA_HINT: ClassVar[str] = "a JSONL set in the training format"

    worst: int = 20
    out_dir: str = "eval_out/ocr"


def checkpoint_name(path: str) -> str:
    """A short column label: the last two parts of the path (runs/ocr_demo/final -> ocr_demo/final)."""
    parts = Path(os.path.normpath(path)).parts
    return "/".join(parts[-2:])


def eval_dataset(ckpt: str, model_config, cfg: OCRConfig):
    """The set as the training's SFTDataset, encoded with the checkpoint's processor and exported pixel budgets.

    Returns (dataset, processor, budgets dict)."""
    from model import load_processor
    from train.config import DataConfig
    from train.data import ChatEncoder, SFTDataset

    proc = load_processor(ckpt)
    img, vid = proc.image_config, proc.video_config
    # a DataConfig carrying the checkpoint's own budgets: ChatEncoder's training_processor is then the identity
    data = DataConfig(image_min_pixels=img.min_pixels, image_max_pixels=img.max_pixels,
                      video_min_pixels=vid.min_pixels, video_max_pixels=vid.max_pixels, video_fps=proc.fps,
                      video_max_frames=proc.max_frames, system_prompt=cfg.system_prompt,
                      max_seq_len=cfg.max_seq_len)
    ds = SFTDataset(cfg.data, ChatEncoder(proc, model_config, data), cfg.root, cfg.max_seq_len)
    budgets = {"image_min_pixels": img.min_pixels, "image_max_pixels": img.max_pixels,
               "video_min_pixels": vid.min_pixels, "video_max_pixels": vid.max_pixels}
    return ds, proc, budgets


@torch.no_grad()
def predict(model, ds, tokenizer, cfg: OCRConfig, device) -> list[str]:
    """Answers for the first n samples of `ds`, in batches of cfg.batch_size (greedy unless cfg.do_sample)."""
    from train.step import autocast

    n = len(ds) if cfg.limit == 0 else min(cfg.limit, len(ds))
    sampling = {}
    if cfg.do_sample:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        generator=gen)
    preds = []
    for s in range(0, n, cfg.batch_size):
        idx = range(s, min(n, s + cfg.batch_size))
        with autocast(device, cfg.precision):
            preds += generate_batch(model, [ds.prompt(i) for i in idx], tokenizer, cfg.max_new_tokens, device,
                                    **sampling)
    return preds


def summarise(preds: list[str], refs: list[str], scripts: list[str], cfg: OCRConfig) -> dict:
    """Per-sample scores (every normalisation), corpus metrics with bootstrap CIs, and CER per script."""
    per_norm = {k: [score_sample(p, r, k) for p, r in zip(preds, refs)] for k in NORMALISERS}
    metrics = {}
    for k, scores in per_norm.items():
        metrics[k] = {**corpus_metrics(scores), "ci": {m: list(v) for m, v in
                                                        bootstrap_ci(scores, cfg.n_boot, seed=cfg.seed).items()}}
    # the trainer's CER (eval/metrics.py) counts code points; here CER counts graphemes, which differs only where a
    # grapheme is several code points (combining marks, e.g. Thai vowel signs, Devanagari matras): both are kept
    metrics["raw"]["cer_codepoints"] = character_error_rate(preds, refs)
    per_script = {}
    for sc in sorted(set(scripts)):
        sel = [s for s, t in zip(per_norm["raw"], scripts) if t == sc]
        per_script[sc] = {"cer": corpus_metrics(sel)["cer"], "n": len(sel)}
    samples = [{k: {"cer": per_norm[k][i].cer, "wer": per_norm[k][i].wer, "exact": per_norm[k][i].exact,
                    "anls": per_norm[k][i].anls} for k in ("raw", "all")} for i in range(len(preds))]
    return {"metrics": metrics, "per_script": per_script, "samples": samples}


def run_ocr(cfg: OCRConfig, device: str | torch.device = "cpu") -> dict:
    """Evaluate every checkpoint on the set; write results.json, results.md and report.html to cfg.out_dir.

    Returns the results dict (as written to results.json)."""
    from model import load_pretrained

    names = list(cfg.names) or [checkpoint_name(c) for c in cfg.checkpoints]
    columns, refs, images, scripts = [], None, None, None
    for name, ckpt in zip(names, cfg.checkpoints):
        model = load_pretrained(ckpt, dtype=getattr(torch, cfg.dtype), device=device, progress=False).eval()
        ds, proc, budgets = eval_dataset(ckpt, model.config, cfg)
        preds = predict(model, ds, proc.tokenizer, cfg, device)
        n = len(preds)
        these_refs = [ds.answer(i) for i in range(n)]
        if refs is None:
            refs, scripts = these_refs, [text_script(r) for r in these_refs]
            images = [_image_path(ds, i) for i in range(n)]
        elif these_refs != refs:  # a different max_seq_len filter per checkpoint would misalign the columns
            raise ValueError(f"{ckpt}: the set's usable samples differ from the first checkpoint's")
        columns.append({"name": name, "path": str(ckpt), "budgets": budgets, "predictions": preds,
                        **summarise(preds, refs, scripts, cfg)})
        del model
    result = {"data": str(cfg.data), "n": len(refs), "references": refs, "scripts": scripts, "images": images,
              "generation": {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                             "do_sample": cfg.do_sample, "temperature": cfg.temperature, "top_k": cfg.top_k,
                             "top_p": cfg.top_p, "seed": cfg.seed, "precision": cfg.precision,
                             "dtype": cfg.dtype},
              "n_boot": cfg.n_boot, "checkpoints": columns}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "results.md").write_text(markdown_table(result))
    (out / "report.html").write_text(html_report(result, cfg.worst))
    return result


def _image_path(ds, i: int) -> str | None:
    """Absolute path of sample i's first image (for the report), or None."""
    from model.processing import local_path

    for m in ds.records[i][1]:
        for it in m["content"]:
            if it.get("type") == "image" and isinstance(it.get("image"), str):
                return os.path.join(ds.root, local_path(it["image"]))
    return None


# ----------------------------------------------------------------------------------------------- reports
def _fmt(m: dict, metric: str, with_ci: bool) -> str:
    v = f"{m[metric]:.4f}"
    if with_ci and metric in m.get("ci", {}):
        lo, hi = m["ci"][metric]
        v += f" [{lo:.4f}, {hi:.4f}]"
    return v


def markdown_table(result: dict) -> str:
    """The side-by-side table: metric x normalisation rows, one column per checkpoint (95% bootstrap CI in
    brackets), then CER per script of the reference."""
    cols = result["checkpoints"]
    head = "| metric | " + " | ".join(c["name"] for c in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = [f"OCR evaluation of `{result['data']}` ({result['n']} samples; "
             f"{'sampled' if result['generation']['do_sample'] else 'greedy'}, "
             f"max_new_tokens {result['generation']['max_new_tokens']}; 95% bootstrap CI, "
             f"{result['n_boot']} resamples)\n", head]
    lines.append("| CER (raw, code points: the trainer's) | "
                 + " | ".join(f"{c['metrics']['raw']['cer_codepoints']:.4f}" for c in cols) + " |\n")
    for metric, norm in TABLE_ROWS:
        lines.append(f"| {metric.upper() if metric in ('cer', 'wer') else metric} ({norm}) | "
                     + " | ".join(_fmt(c["metrics"][norm], metric, result["n_boot"] > 0) for c in cols) + " |\n")
    lines.append("\nCER (raw) per script of the reference:\n\n")
    lines.append("| script | n | " + " | ".join(c["name"] for c in cols) + " |\n|---|---|" + "---|" * len(cols)
                 + "\n")
    for sc, v in cols[0]["per_script"].items():
        lines.append(f"| {sc} | {v['n']} | " + " | ".join(f"{c['per_script'][sc]['cer']:.4f}" for c in cols)
                     + " |\n")
    return "".join(lines)


def _png_data_uri(path: str | None, max_side: int = 800) -> str | None:
    """The image as a base64 PNG data URI (downscaled to max_side), or None if it cannot be read."""
    if not path:
        return None
    try:
        from PIL import Image

        img = Image.open(path).convert("RGB")
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except OSError:
        return None


def _code(text: str) -> str:
    """Text as an HTML <code> element; dir=auto lays right-to-left text out as such."""
    return f"<code dir='auto'>{html.escape(text)}</code>"


def html_report(result: dict, worst: int) -> str:
    """A self-contained HTML page: the side-by-side table and the `worst` samples by the last checkpoint's CER
    (raw), each with its image, the reference and every checkpoint's prediction and CER."""
    cols = result["checkpoints"]
    last = cols[-1]["samples"]
    order = sorted(range(result["n"]), key=lambda i: (-last[i]["raw"]["cer"], i))[:worst]
    rows = []
    for i in order:
        uri = _png_data_uri(result["images"][i])
        img = f'<img src="{uri}">' if uri else "(no image)"
        preds = "".join(f"<tr><td>{html.escape(c['name'])}</td><td>{_code(c['predictions'][i])}</td>"
                        f"<td>{c['samples'][i]['raw']['cer']:.3f}</td></tr>" for c in cols)
        rows.append(f"<div class='s'><h3>#{i} ({html.escape(result['scripts'][i])})</h3>{img}<table>"
                    f"<tr><td>reference</td><td>{_code(result['references'][i])}</td><td>CER</td></tr>{preds}"
                    f"</table></div>")
    table = html.escape(markdown_table(result))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>OCR evaluation</title><style>"
            "body{font-family:sans-serif} .s{border-top:1px solid #ccc;padding:8px} td{padding:2px 8px}"
            "img{max-width:800px;border:1px solid #888} code{white-space:pre-wrap}</style></head><body>"
            f"<h1>OCR evaluation</h1><pre>{table}</pre><h2>Worst {len(order)} samples (by the CER of "
            f"{html.escape(cols[-1]['name'])})</h2>{''.join(rows)}</body></html>")


def print_summary(result: dict) -> None:
    """The markdown table on stdout."""
    print(markdown_table(result))
