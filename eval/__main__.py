"""`python -m eval [key=value ...]`: long-context needle evaluations (V-NIAH video, passkey) with Hydra.

Examples:
    python -m eval                                                   # tiny random model: a pipeline check
    python -m eval model.path=/ckpt/Qwen3-VL-8B-Instruct model.dtype=bfloat16 \\
        needle.task=video needle.lengths=[200,400,800] needle.depths=[0,0.25,0.5,0.75,1] needle.trials=5
    python -m eval model.path=/ckpt needle.task=passkey needle.lengths=[4000,32000,128000]
Writes needle_<task>.json (accuracy per length x depth) and needle_<task>.png (heatmap) to needle.out_dir.
"""
import os

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra stops here: the composed config becomes typed dataclasses (unknown keys fail), then the sweep runs."""
    from .run import EvalConfig, run
    from train.config import config_from_dict

    run(config_from_dict(OmegaConf.to_container(cfg, resolve=True), EvalConfig))


if __name__ == "__main__":
    main()
