"""Generate the synthetic OCR dataset (images + train/val JSONL in the messages format); logic in train/ocr_data.py.

Example:
    python scripts/make_ocr_data.py --out data/ocr_synth --n-train 2000 --n-val 64 --charset mixed --seed 0
    python scripts/make_ocr_data.py --smoke --out /tmp/ocr_smoke      # 4 + 2 samples: checks the script runs
    python scripts/make_ocr_data.py --out data/ocr_multi --charset multilingual --mix 0.2 --lines 1 3 \
        --layout random --width 320 --min-len 8 --max-len 24 --blur 1.0 --low-contrast 0.2 --rotation 3
        # every script a shipped font covers (train/ocr_scripts.py), mixed-script lines, 1-3 line documents
"""
import argparse

from train.config import OCRGenConfig
from train.ocr_data import generate_ocr_dataset


def main():
    """Parse arguments and write the dataset."""
    d = OCRGenConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-val", type=int, default=d.n_val)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--charset", choices=["digits", "words", "mixed", "multilingual"], default=d.charset)
    p.add_argument("--min-len", type=int, default=d.min_len)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--font-size", type=int, nargs=2, default=list(d.font_size))
    p.add_argument("--rotation", type=float, default=d.rotation)
    p.add_argument("--noise", type=float, default=d.noise)
    p.add_argument("--prompt", default=d.prompt)
    p.add_argument("--scripts", nargs="*", default=list(d.scripts), help="multilingual: subset of scripts")
    p.add_argument("--mix", type=float, default=d.mix, help="multilingual: probability of a mixed-script line")
    p.add_argument("--lines", type=int, nargs=2, default=list(d.lines), help="lines per image (min max)")
    p.add_argument("--layout", choices=["left", "center", "right", "random"], default=d.layout)
    p.add_argument("--blur", type=float, default=d.blur, help="max Gaussian blur radius (px)")
    p.add_argument("--low-contrast", type=float, default=d.low_contrast, help="probability of low contrast")
    p.add_argument("--force", action="store_true", help="regenerate even if a matching set exists")
    p.add_argument("--smoke", action="store_true", help="4 training and 2 validation samples")
    a = p.parse_args()
    if a.smoke:
        a.n_train, a.n_val, a.force = 4, 2, True
    cfg = OCRGenConfig(enabled=True, out_dir=a.out, n_train=a.n_train, n_val=a.n_val, seed=a.seed,
                       charset=a.charset, min_len=a.min_len, max_len=a.max_len, height=a.height, width=a.width,
                       font_size=tuple(a.font_size), rotation=a.rotation, noise=a.noise, prompt=a.prompt,
                       scripts=tuple(a.scripts), mix=a.mix, lines=tuple(a.lines), layout=a.layout, blur=a.blur,
                       low_contrast=a.low_contrast)
    paths = generate_ocr_dataset(cfg, force=a.force)
    print(f"wrote {paths['train']} ({a.n_train} lines) and {paths['val']} ({a.n_val} lines)")


if __name__ == "__main__":
    main()
