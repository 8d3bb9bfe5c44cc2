"""The position-encoding ablation report (docs/ablations.md) from the per-run JSON files of train/pe_study.py.

Per variant and length multiple: accuracy (mean over the needle tasks) as mean +- std over seeds, without and with
YaRN; a per-task table; a figure; and, for each published claim whose variants were run, what these numbers say
(agree / disagree / inside the seed spread). Everything written is computed from the JSON files.

    python -m eval.pe_report docs/ablations docs/ablations.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# (claim, source, variant a, variant b, task or None = mean over tasks, multiples: "beyond" (> 1) or "all"):
# the claim says a > b
CLAIMS = (
    ("Interleaved MRoPE extrapolates better than chunked MRoPE with the same allocation [24, 20, 20]",
     "Qwen3-VL technical report, arXiv:2511.21631", "mrope_interleaved", "mrope_chunked_q3", None, "beyond"),
    ("Qwen3-VL's interleaved MRoPE beats Qwen2.5-VL's chunked [16, 24, 24] beyond the training length",
     "Qwen3-VL technical report, arXiv:2511.21631", "mrope_interleaved", "mrope_chunked_q25", None, "beyond"),
    ("VideoRoPE beats M-RoPE beyond the training length, with look-alike distractors (V-NIAH-D)",
     "VideoRoPE, arXiv:2502.05173, section 5", "videorope", "mrope_chunked_q25", "distract", "beyond"),
    ("Text timestamps ground time better than absolute-time T ids",
     "Qwen3-VL technical report, arXiv:2511.21631", "mrope_interleaved", "absolute_time", "time", "all"),
    ("Absolute-time T ids ground time better than no time information at all",
     "Qwen2.5-VL technical report, arXiv:2502.13923", "absolute_time", "no_timestamps", "time", "all"),
    ("3-D position ids beat plain 1-D RoPE on video",
     "VideoRoPE, arXiv:2502.05173, Table 1 (vanilla RoPE vs M-RoPE)", "mrope_interleaved", "rope_1d", None, "beyond"),
)


def load_results(json_dir: Path) -> list[dict]:
    """Every run file (`<variant>_seed<seed>.json`) in json_dir."""
    runs = []
    for p in sorted(Path(json_dir).glob("*.json")):
        d = json.loads(p.read_text())
        if isinstance(d, dict) and {"variant", "seed", "eval"} <= set(d):
            runs.append(d)
    if not runs:
        raise FileNotFoundError(f"no pe-ablation result files (<variant>_seed<n>.json) in {json_dir}")
    return runs


def aggregate(runs: list[dict]) -> dict:
    """{(variant, yarn, multiple, task or "mean"): [per-seed accuracy]} plus the variant order of appearance."""
    acc: dict = {}
    for r in runs:
        for row in r["eval"]:
            for task, a in [*row["accuracy"].items(), ("mean", row["mean"])]:
                acc.setdefault((r["variant"], row["yarn"], row["multiple"], task), []).append(a)
    return acc


def _cell(v: list[float]) -> str:
    return f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}" if len(v) > 1 else f"{100 * v[0]:.1f}"


def _verdict(a: list[float], b: list[float]) -> tuple[str, float]:
    """Compare two lists of per-seed accuracies: the claim holds when a's mean exceeds b's by more than the seed
    spread (the larger std; 2 points with a single seed)."""
    d = float(np.mean(a) - np.mean(b))
    spread = max(float(np.std(a)), float(np.std(b))) if min(len(a), len(b)) > 1 else 0.02
    if d > spread:
        return "agrees", d
    if d < -spread:
        return "disagrees", d
    return "inside the seed spread (no conclusion)", d


def _pooled(acc: dict, variant: str, task: str, mults: list, yarn: bool) -> list[float]:
    """Per-seed accuracy averaged over the given multiples."""
    rows = [acc.get((variant, yarn, m, task)) for m in mults]
    if any(r is None for r in rows):
        return []
    return list(np.mean(np.array(rows), axis=0))


def plot(acc: dict, variants: list, mults: list, yarns: list, path: Path):
    """Accuracy (mean over tasks; error bars: std over seeds) against the length multiple, one panel per YaRN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(yarns), figsize=(5.5 * len(yarns), 4), squeeze=False, sharey=True)
    for ax, yarn in zip(axes[0], yarns):
        for v in variants:
            ys = [acc.get((v, yarn, m, "mean")) for m in mults]
            if any(y is None for y in ys):
                continue
            ax.errorbar(mults, [np.mean(y) for y in ys], yerr=[np.std(y) for y in ys], marker="o", capsize=3, label=v)
        ax.set_xscale("log", base=2)
        ax.set_xticks(mults, [f"{m:g}x" for m in mults])
        ax.set_xlabel("length / training length")
        ax.set_title("with YaRN" if yarn else "without YaRN")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (mean over tasks)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sparse_section(runs: list[dict], variants: list) -> list[str]:
    """Accuracy with block-sparse prefill next to dense prefill (the runs' `sparse_eval`, eval.sparse), per variant
    and length; the difference to dense in points. Empty when no run measured it."""
    acc: dict = {}
    for r in runs:
        for row in r.get("sparse_eval") or []:
            acc.setdefault((r["variant"], row["sparse"], row["multiple"]), []).append(row["mean"])
    if not acc:
        return []
    methods = list(dict.fromkeys(k[1] for k in acc))
    mults = sorted({k[2] for k in acc})
    L = ["", "## Block-sparse prefill next to dense (no YaRN)", "",
         "The prompt goes through `Qwen3VL.prefill` with each `attn_sparsity` method (model/sparsity.py, the "
         "estimators' published defaults) and the answer tokens are fed on the cache; `none` is the same path "
         "dense. Cells: accuracy in % (mean over tasks and seeds); in brackets the difference to dense in points.",
         "", "| variant | method | " + " | ".join(f"{m:g}x" for m in mults) + " |", "|---|---|" + "---|" * len(mults)]
    for v in variants:
        for meth in methods:
            cells = []
            for m in mults:
                a, d = acc.get((v, meth, m)), acc.get((v, "none", m))
                if a is None:
                    cells.append("-")
                elif meth == "none" or d is None:
                    cells.append(f"{100 * np.mean(a):.1f}")
                else:
                    cells.append(f"{100 * np.mean(a):.1f} ({100 * (np.mean(a) - np.mean(d)):+.1f})")
            L.append(f"| {v} | {meth} | " + " | ".join(cells) + " |")
    return L


def write_report(json_dir, md_path, figure=None, command: str = "python scripts/pe_ablation.py") -> str:
    """Write the markdown report (and the figure) from json_dir's run files; returns the markdown."""
    json_dir, md_path = Path(json_dir), Path(md_path)
    runs = load_results(json_dir)
    acc = aggregate(runs)
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    mults = sorted({row["multiple"] for r in runs for row in r["eval"]})
    yarns = sorted({row["yarn"] for r in runs for row in r["eval"]})
    tasks = list(dict.fromkeys(t for r in runs for row in r["eval"] for t in row["accuracy"]))
    seeds = sorted({r["seed"] for r in runs})
    r0 = runs[0]
    L = []
    if any(r["smoke"] for r in runs):
        L += ["> **Smoke run** (tiny model, a few steps, CPU): this checks the pipeline; the accuracies mean "
              "nothing.", ""]
    cut = [r for r in runs if r["train"]["steps"] < r["train"].get("planned_steps", r["train"]["steps"])]
    if cut:  # a time budget that cut some runs short makes the variants differ in training, not only in encoding
        L += [f"> **{len(cut)} run(s) stopped at `train.max_time_s` before their planned steps**: "
              + ", ".join(f"{r['variant']} seed {r['seed']} ({r['train']['steps']}/{r['train']['planned_steps']})"
                          for r in cut) + ". Those variants trained less than the others; raise the budget or "
              "lower `train.steps` and rerun them.", ""]
    weak = [r for r in runs if (r["train"].get("vision_warmup") or {}).get("line_acc", 1.0) < 0.9]
    if weak:  # the decoder cannot read what the tower has not learnt: the 1x accuracy is capped (docs/needle.md)
        L += [f"> **{len(weak)} run(s) ended the vision warm-up reading < 90% of the digits**: "
              + ", ".join(f"{r['variant']} seed {r['seed']} ({r['train']['vision_warmup']['line_acc']:.0%})"
                          for r in weak) + ". Lengthen `train.vision_warmup.steps`.", ""]
    L += ["# Position-encoding ablation: how each encoding holds up beyond the training length", "",
          f"Generated by `eval/pe_report.py` from {len(runs)} run files in `{json_dir}` "
          f"(command: `{command}`); do not edit by hand.", "",
          "## Setup", "",
          f"- Model: Qwen3-VL from scratch, {r0['params'] / 1e6:.1f}M parameters "
          f"(text {r0['model']['text'].get('num_hidden_layers')} layers x {r0['model']['text'].get('hidden_size')}, "
          f"head_dim {r0['model']['text'].get('head_dim')}), vision warm-up then "
          f"{np.mean([r['train']['steps'] for r in runs]):.0f} steps on average "
          f"({np.mean([r['train']['wall_s'] for r in runs]):.0f} s per run) on {r0['device']}, torch {r0['torch']}.",
          f"- Data (train/video_needles.py): synthetic videos of {r0['data']['frame_size']} px frames at "
          f"{r0['data']['fps']:g} fps, {r0['tokens_per_group']} visual tokens per temporal group of two frames; "
          f"training length L = {r0['data']['train_groups']} groups; tasks {', '.join(tasks)}.",
          f"- Evaluation: {r0['eval_config']['trials']} teacher-forced prompts per task and length (needles spread "
          f"over the depth), lengths {', '.join(f'{m:g}x' for m in mults)} L; YaRN factor from "
          f"{r0['eval_config']['yarn_factor']}, original length = the training length's largest position id.",
          f"- Seeds: {seeds}. Cells: accuracy in % (mean over tasks), mean ± std over seeds.", ""]
    L += ["## Variants", "", "| variant | layout | section | temporal ids | spatial ids | T stride | tokens per group "
          "(1x L) |", "|---|---|---|---|---|---|---|"]
    for v in variants:
        r = next(r for r in runs if r["variant"] == v)
        ro = r["rope"]
        one = next(row for row in r["eval"] if row["multiple"] == mults[0])
        L.append(f"| {v} | {ro['layout']} | {list(ro['mrope_section']) if ro['layout'] != '1d' else '-'} | "
                 f"{ro['temporal_ids']} | {ro['spatial_ids']} | {ro['temporal_stride']:g} | "
                 f"{one['video_tokens'] / one['groups']:.1f} |")
    for yarn in yarns:
        L += ["", f"## Accuracy {'with' if yarn else 'without'} YaRN", "",
              "| variant | " + " | ".join(f"{m:g}x" for m in mults) + " |", "|---|" + "---|" * len(mults)]
        for v in variants:
            L.append(f"| {v} | " + " | ".join(_cell(acc[(v, yarn, m, 'mean')]) if (v, yarn, m, "mean") in acc
                                              else "-" for m in mults) + " |")
    L += ["", f"## Per task, without YaRN, at {mults[0]:g}x and {mults[-1]:g}x", "",
          "| variant | " + " | ".join(f"{t} {m:g}x" for t in tasks for m in (mults[0], mults[-1])) + " |",
          "|---|" + "---|" * (2 * len(tasks))]
    for v in variants:
        L.append(f"| {v} | " + " | ".join(_cell(acc[(v, False, m, t)]) if (v, False, m, t) in acc else "-"
                                          for t in tasks for m in (mults[0], mults[-1])) + " |")
    if figure is not None:
        plot(acc, variants, mults, yarns, Path(figure))
        rel = Path(figure).resolve().relative_to(md_path.resolve().parent) \
            if Path(figure).resolve().is_relative_to(md_path.resolve().parent) else Path(figure)
        L += ["", f"![accuracy against length]({rel.as_posix()})"]
    L += _sparse_section(runs, variants)
    L += ["", "## What the numbers say", ""]
    beyond = [m for m in mults if m > 1] or mults
    for claim, source, a, b, task, which in CLAIMS:
        ms = beyond if which == "beyond" else mults
        pa, pb = _pooled(acc, a, task or "mean", ms, False), _pooled(acc, b, task or "mean", ms, False)
        if not pa or not pb:
            L.append(f"- *{claim}* ({source}): not measured (needs variants `{a}` and `{b}`"
                     f"{f' and task {task}' if task else ''}).")
            continue
        verdict, d = _verdict(pa, pb)
        L.append(f"- *{claim}* ({source}): `{a}` {100 * np.mean(pa):.1f}% vs `{b}` {100 * np.mean(pb):.1f}% "
                 f"({task or 'mean over tasks'}, lengths {', '.join(f'{m:g}x' for m in ms)}, no YaRN): "
                 f"difference {100 * d:+.1f} points, **{verdict}**.")
    if True in yarns and False in yarns:
        gains = [(np.mean(_pooled(acc, v, "mean", beyond, True)) - np.mean(_pooled(acc, v, "mean", beyond, False)))
                 for v in variants if _pooled(acc, v, "mean", beyond, True) and _pooled(acc, v, "mean", beyond, False)]
        if gains:
            L.append(f"- *YaRN extends the usable context without training* (YaRN, arXiv:2309.00071; Qwen3-VL's 1M "
                     f"recipe): beyond L it changes accuracy by {100 * np.mean(gains):+.1f} points on average over "
                     f"the variants (from {100 * min(gains):+.1f} to {100 * max(gains):+.1f}).")
    L += ["", "## Reproduce", "", "```",
          "python scripts/pe_ablation.py                     # one GPU; --workers 8 on an 8-GPU host; reruns resume",
          "python scripts/pe_ablation.py --smoke --out DIR   # the pipeline on a CPU in minutes (meaningless numbers)",
          "python scripts/pe_ablation.py --report-only       # this file from docs/ablations/*.json", "```",
          "Variants and settings: conf/pe_ablation/ (variants are `model.text.rope.*` overrides: layouts in "
          "model/rope.py, position-id rules in model/positions.py); data: train/video_needles.py; runs: "
          "train/pe_study.py."]
    text = "\n".join(L) + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return text


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m eval.pe_report JSON_DIR REPORT.md")
    write_report(sys.argv[1], sys.argv[2], figure=Path(sys.argv[1]) / "accuracy.png")
