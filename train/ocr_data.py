"""Synthetic OCR data: random text lines rendered with PIL into images + JSONL (messages format).

No downloads: fonts are the DejaVu faces matplotlib ships (`matplotlib.get_data_path()/fonts/ttf`), falling back
to PIL's built-in bitmap font. Text is digits, words, mixed scripts (Latin, Greek, Cyrillic words where the
chosen font has every glyph, checked against its cmap) or multilingual: common words of every script a shipped
font covers (train/ocr_scripts.py lists them and the scripts not covered), one script per line or, with
probability `mix`, mixed-script lines. Each line gets a random font, size, gray levels, offset, small rotation
and Gaussian pixel noise; optionally Gaussian blur and low contrast (the "low light, blur, tilt" cases).
`lines` > 1 makes documents of several lines (reference lines joined by "\n") laid out left, centred or right.
Deterministic for a given seed; train and val use disjoint random streams. Driven by
`scripts/make_ocr_data.py` and by `python -m train experiment=ocr_demo`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .config import OCRGenConfig

from .ocr_scripts import (NOT_COVERED, RTL_SCRIPTS, SCRIPT_WORDS, WORDS_CYRILLIC, WORDS_GREEK,  # noqa: F401
                          WORDS_LATIN, rtl_layout_available)


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
        self.scripts = list(cfg.scripts) or list(SCRIPT_WORDS)
        if cfg.charset == "multilingual":
            self._check_scripts()

    def _check_scripts(self):
        """Every requested script has a font drawing all its words (and RTL layout when it needs one)."""
        for sc in self.scripts:
            if sc not in SCRIPT_WORDS:
                raise ValueError(f"unknown script {sc!r}: have {sorted(SCRIPT_WORDS)} (no font for {NOT_COVERED})")
            if sc in RTL_SCRIPTS and not rtl_layout_available():
                raise ValueError(f"{sc} needs PIL built with libraqm (right-to-left layout, joined letters)")
            if not any(self._covers(p, "".join(SCRIPT_WORDS[sc])) for p in self.fonts):
                raise ValueError(f"no font in {self.fonts or 'PIL default'} draws every {sc} word")

    def _covers(self, path, text: str) -> bool:
        return self.cmaps[path] is None or all(ord(ch) in self.cmaps[path] for ch in text if ch != "\n")

    def random_text(self, rng: random.Random) -> str:
        """A random line, or `cfg.lines` lines joined by "\\n"."""
        lo, hi = self.cfg.lines
        if hi <= 1:
            return self.random_line(rng)
        return "\n".join(self.random_line(rng) for _ in range(rng.randint(lo, hi)))

    def random_line(self, rng: random.Random) -> str:
        """One line: digits, Latin words, (mixed) digits/words/Greek/Cyrillic tokens, or (multilingual) words of one
        script, or with probability `mix` of random scripts."""
        c = self.cfg
        if c.charset == "multilingual":
            if c.mix > 0 and rng.random() < c.mix:
                pools = [SCRIPT_WORDS[sc] for sc in self.scripts] + [None]
            else:
                pools = [SCRIPT_WORDS[rng.choice(self.scripts)]]
            return self._words(rng, pools)
        if c.charset == "digits":
            return "".join(rng.choice("0123456789") for _ in range(rng.randint(c.min_len, c.max_len)))
        pools = [WORDS_LATIN] if c.charset == "words" else [WORDS_LATIN, WORDS_GREEK, WORDS_CYRILLIC, None]
        return self._words(rng, pools)

    def _words(self, rng: random.Random, pools: list) -> str:
        """Space-separated tokens from random pools (None: a number) until min_len characters (max max_len)."""
        c = self.cfg
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

    def _pick_font(self, text: str, rng: random.Random):
        usable = [p for p in self.fonts if self._covers(p, text)]
        if not usable and self.cfg.charset == "multilingual":
            raise ValueError(f"no font draws {text!r}")
        return rng.choice(usable) if usable else None

    def _colors(self, rng: random.Random) -> tuple[int, int]:
        """(background, text) gray levels; with probability `low_contrast` they differ by only 25-60 levels."""
        c = self.cfg
        bg = rng.randint(170, 255) if c.colors == "random" else 255
        fg = rng.randint(0, max(0, bg - 120)) if c.colors == "random" else 0
        if c.low_contrast > 0 and rng.random() < c.low_contrast:
            fg = bg - rng.randint(25, 60)
        return bg, fg

    def _finish(self, img: Image.Image, bg: int, rng: random.Random) -> Image.Image:
        """Rotation, blur and pixel noise (each only when configured, so the random stream of older sets holds)."""
        c = self.cfg
        if c.rotation > 0:
            img = img.rotate(rng.uniform(-c.rotation, c.rotation), resample=Image.BILINEAR, fillcolor=bg)
        if c.blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, c.blur)))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if c.noise > 0:
            nrng = np.random.default_rng(rng.getrandbits(32))
            arr = arr + nrng.normal(0.0, c.noise, size=arr.shape).astype(np.float32)
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")

    def _fit(self, text: str, path, size: int, width: int, height: int):
        """The font at the largest size <= `size` at which `text` fits (width - 4, height - 2); and its bbox."""
        while True:
            font = self._font(path, size)
            x0, y0, x1, y1 = font.getbbox(text)
            if (x1 - x0 <= width - 4 and y1 - y0 <= height - 2) or size <= 8 or path is None:
                return font, (x0, y0, x1, y1)
            size -= 1

    def render(self, text: str, rng: random.Random) -> Image.Image:
        """Render `text` on a (height, width) canvas with random font, size, colours, rotation and noise; text with
        several lines goes to `render_document`."""
        if "\n" in text:
            return self.render_document(text.split("\n"), rng)
        c = self.cfg
        path = self._pick_font(text, rng)
        size = rng.randint(int(c.font_size[0]), int(c.font_size[1]))
        # Shrink until the text fits with a small margin (long lines, wide fonts).
        font, (x0, y0, x1, y1) = self._fit(text, path, size, c.width, c.height)
        bg, fg = self._colors(rng)
        img = Image.new("L", (c.width, c.height), color=bg)
        draw = ImageDraw.Draw(img)
        free_x, free_y = max(0, c.width - (x1 - x0) - 2), max(0, c.height - (y1 - y0) - 1)
        tx = rng.randint(0, free_x if c.align == "random" else min(c.jitter, free_x)) - x0
        ty = rng.randint(0, free_y) - y0
        draw.text((tx, ty), text, fill=fg, font=font)
        return self._finish(img, bg, rng)

    def render_document(self, lines: list[str], rng: random.Random) -> Image.Image:
        """Several lines on a (height * n, width) canvas, one line per `height` band, one font and size for the
        page, aligned left, centre or right (`layout`; random picks one per page)."""
        c = self.cfg
        path = self._pick_font("".join(lines), rng)
        size = rng.randint(int(c.font_size[0]), int(c.font_size[1]))
        fits = [self._fit(line, path, size, c.width, c.height) for line in lines]
        font = min((f for f, _ in fits), key=lambda f: getattr(f, "size", 0))  # the smallest fitting size
        layout = rng.choice(["left", "center", "right"]) if c.layout == "random" else c.layout
        bg, fg = self._colors(rng)
        img = Image.new("L", (c.width, c.height * len(lines)), color=bg)
        draw = ImageDraw.Draw(img)
        for k, line in enumerate(lines):
            x0, y0, x1, y1 = font.getbbox(line)
            free_x, free_y = max(0, c.width - (x1 - x0) - 2), max(0, c.height - (y1 - y0) - 1)
            jitter = rng.randint(0, min(c.jitter, free_x))
            tx = {"left": jitter, "center": free_x // 2, "right": free_x - jitter}[layout] - x0
            draw.text((tx, k * c.height + rng.randint(0, free_y) - y0), line, fill=fg, font=font)
        return self._finish(img, bg, rng)


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
    meta = generator_meta("train/ocr_data.py", 1, cfg, drop=("out_dir", "font_dir"))

    def sampler():
        renderer = OCRRenderer(cfg)

        def sample(rng, out, rel):
            text = renderer.random_text(rng)
            renderer.render(text, rng).save(out / rel)
            return ocr_record(rel, text, cfg.prompt)
        return sample

    return write_synthetic_set(Path(out_dir or cfg.out_dir), meta, cfg.n_train, cfg.n_val, cfg.seed, sampler, force)


def generator_meta(generator: str, version: int, cfg, drop: tuple[str, ...]) -> dict:
    """What a synthetic set's meta.json records: the generator, its version and the settings that shape the set
    (`drop`: those that do not), as JSON reads them back (tuples as lists)."""
    meta = {"generator": generator, "version": version, **dataclasses.asdict(cfg)}
    for k in drop:
        meta.pop(k)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}


_FORKED: dict = {}  # the sampler of the set being written, inherited by the forked workers of write_synthetic_set


def _draw_seeded(job: tuple) -> dict:
    """One sample with its own generator, seeded by (seed, split, index): the same in any process."""
    seed, split, i, out = job
    return _FORKED["sample"](random.Random(f"{seed}/{split}/{i}"), out, f"images/{split}_{i:06d}.png")


def write_synthetic_set(out: Path, meta: dict, n_train: int, n_val: int, seed: int, sampler,
                        force: bool = False, seed_per_sample: bool = False, workers: int = 1) -> dict[str, str]:
    """The synthetic generators' set protocol (OCR here, grounding in train/grounding_data.py).

    `out` is reused as is when its meta.json equals `meta` and both splits exist (unless `force`). Otherwise
    `sampler()` gives `sample(rng, out, rel) -> record`, which draws one sample from `rng`, saves its image as
    out/rel and returns its JSONL record; each split is written to a temporary file and renamed (atomic), and
    meta.json last. Random streams: one seeded generator per split, drawn sample after sample (the OCR sets); or,
    with `seed_per_sample`, one generator per sample seeded by (seed, split, index), so that `workers` forked
    processes draw the samples in parallel and the set is the same for any number of workers (grounding).
    Returns {"train": path, "val": path}.
    """
    paths = {"train": str(out / "train.jsonl"), "val": str(out / "val.jsonl")}
    meta_path = out / "meta.json"
    if not force and meta_path.exists() and all(os.path.exists(p) for p in paths.values()):
        try:
            if json.loads(meta_path.read_text()) == meta:
                return paths
        except json.JSONDecodeError:
            pass
    if workers > 1 and not seed_per_sample:
        raise ValueError("write_synthetic_set: workers > 1 needs seed_per_sample (one drawing order otherwise)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    sample = sampler()
    _FORKED["sample"] = sample  # set before the fork: the workers inherit it (a closure does not pickle)
    pool = None
    if seed_per_sample and workers > 1 and n_train + n_val > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        for split, n, salt in (("train", n_train, 1), ("val", n_val, 2)):
            tmp = out / f".{split}.jsonl.tmp"
            if seed_per_sample:
                jobs = [(seed, split, i, out) for i in range(n)]
                recs = pool.imap(_draw_seeded, jobs, chunksize=64) if pool else map(_draw_seeded, jobs)
            else:
                rng = random.Random(seed * 1000003 + salt)
                recs = (sample(rng, out, f"images/{split}_{i:06d}.png") for i in range(n))
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in recs:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            os.replace(tmp, paths[split])
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        _FORKED.clear()
    meta_path.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return paths
