"""`python -m eval [task=<name>] [key=value ...]`: long-context needle evaluations with Hydra.

Tasks are registered in eval/tasks/ (vniah: needle in a video haystack, passkey: text passkey); `task=<name>`
picks conf/task/<name>.yaml, which sets `needle.task` and the task's options. Examples:
    python -m eval                                                   # tiny random model, vniah: a pipeline check
    python -m eval model.path=/ckpt/Qwen3-VL-8B-Instruct model.dtype=bfloat16 \\
        task=vniah needle.lengths=[200,400,800] needle.depths=[0,0.25,0.5,0.75,1] needle.trials=5
    python -m eval model.path=/ckpt task=passkey needle.lengths=[4000,32000,128000]
    python -m eval task=passkey model.preset=tiny needle.lengths=[200,400] needle.depths=[0,1] needle.out_dir=out
    python -m eval task=ocr ocr.checkpoints=[base,runs/ocr_demo/final] ocr.data=val.jsonl ocr.out_dir=out
Writes needle_<task>.json (accuracy per length x depth) and needle_<task>.png (heatmap) to needle.out_dir;
task=ocr (eval/ocr.py) writes results.json, results.md (base vs fine-tuned table) and report.html (worst samples)
to ocr.out_dir.
"""
import os

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra stops here: the composed config becomes typed dataclasses (unknown keys fail), then the sweep runs."""
    from model.build import config_from_dict

    from .run import EvalConfig, run

    run(config_from_dict(OmegaConf.to_container(cfg, resolve=True), EvalConfig))


if __name__ == "__main__":
    main()
