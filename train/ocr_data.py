"""Synthetic OCR data: random text lines rendered with PIL into images + JSONL (messages format).

No downloads: fonts are the DejaVu faces matplotlib ships (`matplotlib.get_data_path()/fonts/ttf`), falling back
to PIL's built-in bitmap font. Text is digits, words, or mixed scripts (Latin, Greek, Cyrillic words where the
chosen font has every glyph, checked against its cmap). Each line gets a random font, size, gray levels,
offset, small rotation and Gaussian pixel noise. Deterministic for a given seed; train and val use disjoint
random streams. Driven by `scripts/make_ocr_data.py` and by `python -m train experiment=ocr_demo`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .config import OCRGenConfig

WORDS_LATIN = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter mother"
).split()
WORDS_GREEK = "και του της το να είναι για με από στο την που ένα θα δεν λόγος νερό ήλιος άνθρωπος".split()
WORDS_CYRILLIC = "и в не на я быть он с что а по это она этот к но они мы как из у который то за свой".split()


def font_paths(font_dir: str | None = None) -> list[str]:
    """Paths of the DejaVu TrueType fonts in `font_dir` (default: matplotlib's); [] if there are none.

    Args:
        font_dir: a folder of .ttf files, or None for `matplotlib.get_data_path()/fonts/ttf`.
    """
    if font_dir is None:
        try:
            import matplotlib
        except ImportError:
            return []
        font_dir = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    return sorted(str(p) for p in Path(font_dir).glob("DejaVu*.ttf"))


def _font_cmaps(paths: list[str]) -> dict[str, set[int]]:
    """Codepoints each font covers (from its cmap table), to skip text a font would draw as boxes."""
    try:
        from fontTools.ttLib import TTFont
    except ImportError:  # no fontTools: trust the fonts (DejaVu covers Latin, Greek and Cyrillic)
        return {p: None for p in paths}
    out = {}
    for p in paths:
        with TTFont(p, lazy=True) as f:
            out[p] = set(f.getBestCmap())
    return out


class OCRRenderer:
    """Draws random text lines; `sample(rng)` returns (PIL.Image RGB, text)."""

    def __init__(self, cfg: OCRGenConfig):
        self.cfg = cfg
        self.fonts = [p for p in font_paths(cfg.font_dir) if not cfg.fonts or os.path.basename(p) in cfg.fonts]
        if cfg.fonts and not self.fonts:
            raise ValueError(f"none of the fonts {list(cfg.fonts)} found ({font_paths(cfg.font_dir)})")
        self.cmaps = _font_cmaps(self.fonts)
        self._cache: dict = {}

    def random_text(self, rng: random.Random) -> str:
        """A random line: digits, Latin words, or (mixed) digits/words/Greek/Cyrillic tokens."""
        c = self.cfg
        if c.charset == "digits":
            return "".join(rng.choice("0123456789") for _ in range(rng.randint(c.min_len, c.max_len)))
        pools = [WORDS_LATIN] if c.charset == "words" else [WORDS_LATIN, WORDS_GREEK, WORDS_CYRILLIC, None]
        out = ""
        while len(out) < c.min_len:
            pool = rng.choice(pools)
            tok = str(rng.randint(0, 9999)) if pool is None else rng.choice(pool)
            cand = (out + " " + tok).strip()
            if len(cand) > c.max_len and out:
                break
            out = cand[: c.max_len]
        return out

    def _font(self, path, size):
        key = (path, size)
        if key not in self._cache:
            self._cache[key] = ImageFont.truetype(path, size) if path else ImageFont.load_default()
        return self._cache[key]

    def render(self, text: str, rng: random.Random) -> Image.Image:
        """Render `text` on a (height, width) canvas with random font, size, colours, rotation and noise."""
        c = self.cfg
        usable = [p for p in self.fonts if self.cmaps[p] is None or all(ord(ch) in self.cmaps[p] for ch in text)]
        path = rng.choice(usable) if usable else None
        size = rng.randint(int(c.font_size[0]), int(c.font_size[1]))
        # Shrink until the text fits with a small margin (long lines, wide fonts).
        while True:
            font = self._font(path, size)
            x0, y0, x1, y1 = font.getbbox(text)
            if (x1 - x0 <= c.width - 4 and y1 - y0 <= c.height - 2) or size <= 8 or path is None:
                break
            size -= 1
        bg = rng.randint(170, 255) if c.colors == "random" else 255
        fg = rng.randint(0, max(0, bg - 120)) if c.colors == "random" else 0
        img = Image.new("L", (c.width, c.height), color=bg)
        draw = ImageDraw.Draw(img)
        free_x, free_y = max(0, c.width - (x1 - x0) - 2), max(0, c.height - (y1 - y0) - 1)
        tx = rng.randint(0, free_x if c.align == "random" else min(c.jitter, free_x)) - x0
        ty = rng.randint(0, free_y) - y0
        draw.text((tx, ty), text, fill=fg, font=font)
        if c.rotation > 0:
            img = img.rotate(rng.uniform(-c.rotation, c.rotation), resample=Image.BILINEAR, fillcolor=bg)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if c.noise > 0:
            nrng = np.random.default_rng(rng.getrandbits(32))
            arr = arr + nrng.normal(0.0, c.noise, size=arr.shape).astype(np.float32)
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")


def ocr_record(image_rel: str, text: str, prompt: str) -> dict:
    """One training record in the transformers / qwen-vl-utils messages format."""
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image_rel}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": text}]},
    ]}


def generate_ocr_dataset(cfg: OCRGenConfig, out_dir: str | None = None, force: bool = False) -> dict[str, str]:
    """Write `images/*.png`, `train.jsonl`, `val.jsonl` and `meta.json` under `out_dir` (default cfg.out_dir).

    Args:
        cfg: generator settings (counts, seed, charset, sizes, noise, rotation).
        out_dir: destination folder; reused without regenerating when its meta.json matches `cfg`.
        force: regenerate even if a matching set exists.
    Returns:
        {"train": path, "val": path} of the JSONL files.
    """
    out = Path(out_dir or cfg.out_dir)
    meta = {"generator": "train/ocr_data.py", "version": 1, **dataclasses.asdict(cfg)}
    meta["font_size"], meta["fonts"] = list(meta["font_size"]), list(meta["fonts"])
    meta.pop("out_dir")
    meta.pop("font_dir")
    paths = {"train": str(out / "train.jsonl"), "val": str(out / "val.jsonl")}
    meta_path = out / "meta.json"
    if not force and meta_path.exists() and all(os.path.exists(p) for p in paths.values()):
        try:
            if json.loads(meta_path.read_text()) == meta:
                return paths
        except json.JSONDecodeError:
            pass
    (out / "images").mkdir(parents=True, exist_ok=True)
    renderer = OCRRenderer(cfg)
    for split, n, salt in (("train", cfg.n_train, 1), ("val", cfg.n_val, 2)):
        rng = random.Random(cfg.seed * 1000003 + salt)
        tmp = out / f".{split}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(n):
                text = renderer.random_text(rng)
                rel = f"images/{split}_{i:06d}.png"
                renderer.render(text, rng).save(out / rel)
                f.write(json.dumps(ocr_record(rel, text, cfg.prompt), ensure_ascii=False) + "\n")
        os.replace(tmp, paths[split])
    meta_path.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return paths
