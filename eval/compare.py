"""`python -m eval.compare a.json b.json ... --out cmp.png`: needle heatmaps of several runs side by side.

For comparisons across position encodings, checkpoints or scoring modes: each JSON written by the sweep
(eval/niah.py) becomes one panel with its own title (the file's name, or `--labels`); `--mode` picks which scoring
mode's accuracy is drawn (default: each run's first). A markdown summary (mean accuracy per run and mode, MAE
where the task has one) is printed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def with_mode(result: dict, mode: str | None) -> dict:
    """`result` with its accuracy grid taken from scoring mode `mode` (None: as saved)."""
    if mode is None or mode == result["mode"]:
        return result
    if mode not in result["scoring"]:
        raise ValueError(f"{result['task']}: scoring mode {mode!r} was not run (have {result['scoring']})")
    by = {(c["length"], c["depth"]): c for c in result["cells"]}
    acc = [[by[(n, d)][mode]["accuracy"] if (n, d) in by and by[(n, d)]["status"] == "ok" else None
            for d in result["depths"]] for n in result["lengths"]]
    vals = [a for row in acc for a in row if a is not None]
    return {**result, "mode": mode, "accuracy": acc, "mean_accuracy": float(np.mean(vals)) if vals else float("nan")}


def summary(results: list[dict], labels: list[str]) -> str:
    """Markdown: one row per run, mean accuracy per scoring mode (+ mean MAE of generated times)."""
    lines = ["| run | task | cells | " + " | ".join(("teacher_forced", "generate")) + " | MAE (s) |",
             "|---|---|---|---|---|---|"]
    for r, label in zip(results, labels):
        ok = [c for c in r["cells"] if c["status"] == "ok"]
        accs = []
        for m in ("teacher_forced", "generate"):
            accs.append(f"{np.mean([c[m]['accuracy'] for c in ok]):.1%}" if ok and m in r["scoring"] else "-")
        maes = [c["generate"]["mae"] for c in ok if "generate" in c and c["generate"].get("mae") is not None]
        mae = f"{np.mean(maes):.2f}" if maes else "-"
        lines.append(f"| {label} | {r['task']} | {len(ok)}/{len(r['cells'])} | " + " | ".join(accs) + f" | {mae} |")
    return "\n".join(lines)


def compare(paths: list[str], out: str, labels: list[str] | None = None, mode: str | None = None) -> list[dict]:
    """Plot the runs in `paths` side by side into `out`; returns the loaded results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .niah import plot_heatmap

    results = [with_mode(json.loads(Path(p).read_text()), mode) for p in paths]
    labels = labels or [Path(p).stem if Path(p).stem not in [Path(q).stem for q in paths if q != p]
                        else f"{Path(p).parent.name}/{Path(p).stem}" for p in paths]
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} runs")
    w = max(len(r["lengths"]) for r in results)
    fig, axes = plt.subplots(1, len(results), figsize=(len(results) * (1.6 + 0.9 * w), 2.2 + 0.5 *
                                                          max(len(r["depths"]) for r in results)), squeeze=False)
    for ax, r, label in zip(axes[0], results, labels):
        plot_heatmap(r, None, ax=ax)
        ax.set_title(f"{label}\n{r['task']} ({r['mode']}): {r['mean_accuracy']:.1%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(summary(results, labels))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="JSON files written by `python -m eval`")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--labels", nargs="*", help="one title per run (default: file names)")
    ap.add_argument("--mode", choices=("teacher_forced", "generate"), help="scoring mode to draw")
    a = ap.parse_args(argv)
    compare(a.runs, a.out, a.labels, a.mode)


if __name__ == "__main__":
    main()
