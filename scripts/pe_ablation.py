"""The position-encoding ablation study in one command (docs/ablations.md).

    python scripts/pe_ablation.py                        # GPU: variants x 3 seeds -> docs/ablations/, docs/ablations.md
    python scripts/pe_ablation.py --smoke --out DIR      # CPU pipeline check (minutes): tiny model, 2 variants, 1 seed
    python scripts/pe_ablation.py run=[videorope] seeds=[0] train.steps=300     # Hydra overrides of conf/pe_ablation/
    python scripts/pe_ablation.py --workers 8            # 8 runs at a time, one per GPU of an 8-GPU host
    python scripts/pe_ablation.py --report-only          # regenerate docs/ablations.md from the JSON files

The config is conf/pe_ablation/study.yaml (+ scale/gpu.yaml or scale/smoke.yaml), composed with Hydra's compose
API and converted once into train/pe_study.py's dataclasses. The sweep over variants x seeds is Hydra's multirun
grid, run in this one process (each (variant, seed) composes its own model config; the processor is shared): each
run writes `<out>/<variant>_seed<seed>.json`, and a run whose JSON already holds the same settings is skipped, so an
interrupted study resumes. The report is regenerated from every JSON in `out` at the end (eval/pe_report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONF = ROOT / "conf" / "pe_ablation"


def compose(overrides: list[str]):
    """conf/pe_ablation/study.yaml with `overrides` -> StudyConfig (strict: unknown keys raise ConfigError)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from model.build import config_from_dict
    from train.pe_study import StudyConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="study", overrides=overrides)
    return config_from_dict(OmegaConf.to_container(cfg, resolve=True), StudyConfig)


def _done(path: Path, cfg, variant: str) -> bool:
    """A result file for this run exists and was made with the same settings."""
    if not path.is_file():
        return False
    import dataclasses

    old = json.loads(path.read_text())
    spec = cfg.variant_spec(variant)
    new = {"smoke": cfg.smoke, "model": dataclasses.asdict(spec), "data": dataclasses.asdict(cfg.data),
           "optim": dataclasses.asdict(cfg.optim), "train_config": dataclasses.asdict(cfg.train),
           "eval_config": dataclasses.asdict(cfg.eval)}
    return all(json.loads(json.dumps(new[k])) == old.get(k) for k in new)


def _launch_workers(a):
    """Run the study's (variant, seed) runs in `a.workers` processes of this script, worker k on GPU k mod #GPUs."""
    import subprocess

    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    base = [sys.executable, str(Path(__file__).resolve())] + (["--smoke"] if a.smoke else []) + \
        (["--out", a.out] if a.out else []) + a.overrides
    procs = []
    for k in range(a.workers):
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[k % len(gpus)]} if gpus else {}))
        procs.append(subprocess.Popen(base + ["--shard", f"{k}/{a.workers}"], env=env))
    failed = [k for k, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise SystemExit(f"pe_ablation: worker(s) {failed} failed; rerun the same command to resume")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU pipeline check: conf/pe_ablation/scale/smoke.yaml")
    p.add_argument("--out", help="directory for the JSON files and the report (default: docs/ablations)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from the JSON files")
    p.add_argument("--workers", type=int, default=1,
                   help="runs in parallel processes, worker k on GPU k mod #GPUs (e.g. 8 on an 8-GPU host)")
    p.add_argument("--shard", help=argparse.SUPPRESS)  # "k/N": a worker's share of the runs (set by --workers)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/pe_ablation/study.yaml")
    a = p.parse_args(argv)
    overrides = (["scale=smoke"] if a.smoke else []) + ([f"out={a.out}"] if a.out else []) + a.overrides
    cfg = compose(overrides)
    from eval.pe_report import write_report

    out = Path(cfg.out)
    report = ROOT / "docs" / "ablations.md" if out.resolve() == (ROOT / "docs" / "ablations").resolve() \
        else out / "ablations.md"
    if not a.report_only and a.workers > 1 and not a.shard:
        _launch_workers(a)
    elif not a.report_only:
        import torch

        from model import load_processor
        from train.pe_study import run_one

        if not cfg.smoke and not torch.cuda.is_available() and cfg.device == "auto":
            print("warning: no CUDA device; the full study is sized for one H200 (use --smoke on a CPU)")
        processor = load_processor(None)
        k, n = (int(x) for x in a.shard.split("/")) if a.shard else (0, 1)
        jobs = [(variant, seed) for variant in cfg.run for seed in cfg.seeds]
        for variant, seed in jobs[k::n]:
            path = out / f"{variant}_seed{seed}.json"
            if _done(path, cfg, variant):
                print(f"{path}: done with these settings, skipped")
                continue
            run_one(cfg, variant, seed, processor)
    if a.shard:
        return None
    write_report(out, report, figure=out / "accuracy.png",
                 command="python scripts/pe_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
