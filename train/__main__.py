"""`python -m train [group=choice ...] [key=value ...]`: compose conf/ with Hydra, convert once, train.

Examples:
    python -m train experiment=ocr_demo
    python -m train experiment=ocr_finetune model.path=/ckpt/Qwen3-VL-2B-Instruct data.train=my.jsonl
    torchrun --nproc_per_node=2 -m train experiment=ocr_demo parallel=fsdp
"""
import os

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra stops here: the composed config becomes typed dataclasses (unknown keys fail) and `train` runs."""
    from .config import config_from_dict
    from .trainer import train

    train(config_from_dict(OmegaConf.to_container(cfg, resolve=True)))


if __name__ == "__main__":
    main()
