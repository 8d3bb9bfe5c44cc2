"""Generate the synthetic referring-expression grounding set (images + train/val JSONL); logic in
train/grounding_data.py, settings in train/config.py's GroundingGenConfig (docs/grounding.md).

Example:
    python scripts/make_grounding_data.py --out data/grounding_synth --n-train 2000 --n-val 64 --seed 0
    python scripts/make_grounding_data.py --out data/grounding_synth_gpu --n-train 32000 --n-val 128 \
        --width 256 --height 256                  # the set of experiment=grounding_demo_gpu
    python scripts/make_grounding_data.py --smoke --out /tmp/grounding_smoke    # 4 + 2 samples
"""
import argparse

from train.config import GroundingGenConfig
from train.grounding_data import KINDS, generate_grounding_dataset


def main():
    """Parse arguments and write the dataset."""
    d = GroundingGenConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-val", type=int, default=d.n_val)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--grid", type=int, nargs=2, default=list(d.grid), help="columns rows")
    p.add_argument("--objects", type=int, nargs=2, default=list(d.objects), help="items per scene (min max)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(d.kinds))
    p.add_argument("--clutter", type=int, default=d.clutter)
    p.add_argument("--noise", type=float, default=d.noise)
    p.add_argument("--prompt", default=d.prompt, help="template holding {expr}")
    p.add_argument("--question-first", action="store_true", help="the prompt text before the image")
    p.add_argument("--detect-all", type=float, default=d.detect_all,
                   help="share of training scenes asking for every item (the val split stays referring)")
    p.add_argument("--scenes-dir", default=d.scenes_dir,
                   help="with --question-first / --detect-all: the plain set whose scenes are reused (made if missing)")
    p.add_argument("--force", action="store_true", help="regenerate even if a matching set exists")
    p.add_argument("--workers", type=int, default=None,
                   help="processes drawing scenes (default: the CPU count, at most 16); the set is the same for any")
    p.add_argument("--smoke", action="store_true", help="4 training and 2 validation samples")
    a = p.parse_args()
    if a.smoke:
        a.n_train, a.n_val, a.force = 4, 2, True
    cfg = GroundingGenConfig(enabled=True, out_dir=a.out, n_train=a.n_train, n_val=a.n_val, seed=a.seed,
                             width=a.width, height=a.height, grid=tuple(a.grid), objects=tuple(a.objects),
                             kinds=tuple(a.kinds), clutter=a.clutter, noise=a.noise, prompt=a.prompt,
                             question_first=a.question_first, detect_all=a.detect_all, scenes_dir=a.scenes_dir)
    paths = generate_grounding_dataset(cfg, force=a.force, workers=a.workers)
    print(f"wrote {paths['train']} ({a.n_train} scenes) and {paths['val']} ({a.n_val} scenes)")


if __name__ == "__main__":
    main()
