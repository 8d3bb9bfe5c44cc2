"""`python -m eval [task=<name>] [protocol=<preset>] [key=value ...]`: long-context needle evaluations with Hydra.

Tasks are registered in eval/tasks/ (vniah, vniah_d, temporal, multi_needle, passkey); `task=<name>` picks
conf/task/<name>.yaml; `protocol=<preset>` a published sweep (conf/protocol/: longva_vniah, videorope_vniah_d,
qwen3vl_1m). Examples (docs/needle.md has more):
    python -m eval task=vniah model.preset=tiny needle.lengths=[8,16] needle.depths=[0,1] needle.out_dir=out
    python -m eval task=temporal model.path=/ckpt/Qwen3-VL-8B-Instruct model.dtype=bfloat16 \\
        haystack.video=talk.mp4 haystack.fps=1 needle.lengths=[200,400] needle.trials=5
    python -m eval task=passkey model.path=/ckpt needle.lengths=[4000,32000,128000] needle.chunk_size=8192
Writes <task>.json (per cell: accuracy per scoring mode, tokens, frames, seconds, memory), <task>.png (heatmap) and
<task>.md (table) to needle.out_dir; a rerun resumes from <task>.json. The OCR evaluation:
    python -m eval task=ocr ocr.checkpoints=[base,runs/ocr_demo/final] ocr.data=val.jsonl ocr.out_dir=out
task=ocr (eval/ocr.py) writes results.json, results.md (base vs fine-tuned table) and report.html (worst samples)
to ocr.out_dir. The referring-expression grounding evaluation (eval/grounding.py, docs/grounding.md):
    python -m eval task=grounding grounding.checkpoints=[runs/grounding_demo/final] \
        grounding.data=data/grounding_synth/val.jsonl grounding.out_dir=out
writes results.json and results.md (Acc@0.5, mean IoU, point-in-box) to grounding.out_dir.
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
