"""Synthetic referring-expression grounding: coloured shapes and digits on clutter, with one box to find.

Each image holds `objects` items on a `grid` of cells (one item per cell, jittered inside it): coloured triangles,
squares and circles, and digits drawn in dark ink, over a light background with random lines and dots (clutter)
and pixel noise. One item is the target, named by a referring expression of one of three kinds:
  * attribute: "the red triangle" (the only red triangle);
  * relation: "the triangle left of the 7" (left of / right of / above / below a digit, by grid column / row;
    among the items the description matches, only the target stands in that relation to the digit; a second
    item of the same description is placed where the relation fails whenever the grid has room, so the relation
    is needed);
  * digit: "the 7".
With `detect_all` > 0 that share of the training scenes asks for every item instead (a multi-object answer: each
item's box and class in reading order), the dense box supervision of detection data; the val split stays referring.
The answer is what Qwen3-VL writes for grounding (docs/responses.md): a ```json fenced list holding one
{"bbox_2d": [x1, y1, x2, y2], "label": ...} with coordinates relative to the image on a 0..1000 scale
(`model.processing.responses.from_pixels` of the drawn item's pixel box; continuous edges, x2 / y2 exclusive).
Records are in the training JSONL format (docs/training.md) plus a "meta" field (kind, relation, the pixel box,
and the whole layout: every item's class and pixel box) that the trainer's loss ignores; eval/grounding.py uses it
to break its metrics down by expression kind, and the grounding vision warm-up (train/vision_warmup.py) to label
every patch with the class of the item on it.
Deterministic for a given seed; train and val use disjoint random streams. Driven by
`python -m train experiment=grounding_demo` (data.grounding.enabled) and `scripts/make_grounding_data.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model.processing.responses import from_pixels

from .config import GroundingGenConfig
from .ocr_data import generator_meta, write_synthetic_set

COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("triangle", "square", "circle")
DIGITS = "0123456789"
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("attribute", "relation", "digit")
# what an item is, as the grounding vision warm-up classifies it per patch: 0 = background (no item), then every
# colour x shape, then every digit
ITEM_CLASSES = ("background",) + tuple(f"{c} {s}" for c in COLORS for s in SHAPES) + tuple(DIGITS)


@dataclasses.dataclass
class Item:
    """One drawn item: kind "shape" (colour, shape) or "digit" (text); its grid cell and pixel box (x2, y2 excl.)."""
    kind: str
    name: str             # shape name or the digit
    color: str | None
    col: int
    row: int
    box: tuple = ()

    @property
    def cls(self) -> str:
        """Its name in ITEM_CLASSES: "red triangle" or "7"."""
        return self.name if self.kind == "digit" else f"{self.color} {self.name}"

    def describe(self, with_color: bool = True) -> str:
        if self.kind == "digit":
            return f"the {self.name}"
        return f"the {self.color} {self.name}" if with_color else f"the {self.name}"


def _holds(rel: str, a: Item, b: Item) -> bool:
    """Whether item a is `rel` item b, by grid cell (left of: a smaller column; above: a smaller row)."""
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row,
            "below": a.row > b.row}[rel]


def _font(size: int):
    """DejaVu Sans Bold from matplotlib's fonts (no download), else PIL's default font at that size."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"),
                                  size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


class GroundingScenes:
    """Draws scenes; `sample(rng)` returns (PIL.Image RGB, expression, target Item, meta dict)."""

    def __init__(self, cfg: GroundingGenConfig):
        self.cfg = cfg
        self.cols, self.rows = cfg.grid
        self.cw, self.ch = cfg.width / self.cols, cfg.height / self.rows
        self._fonts: dict = {}
        self.kinds = list(cfg.kinds)  # validated by GroundingGenConfig

    def _layout(self, rng: random.Random) -> list[Item]:
        """Random items in distinct cells: at least one digit, the rest mostly shapes."""
        lo, hi = self.cfg.objects
        n = rng.randint(lo, min(hi, self.cols * self.rows))
        cells = rng.sample([(c, r) for r in range(self.rows) for c in range(self.cols)], n)
        items, digits = [], rng.sample(DIGITS, len(DIGITS))
        for k, (c, r) in enumerate(cells):
            if k == 0 or (rng.random() < self.cfg.digit_frac and digits):
                items.append(Item("digit", digits.pop(), None, c, r))
            else:
                items.append(Item("shape", rng.choice(SHAPES), rng.choice(list(COLORS)), c, r))
        return items

    def _expressions(self, items: list[Item], kind: str) -> list[tuple[str, Item, dict]]:
        """Every unambiguous expression of `kind` in the scene: (text, target, meta)."""
        out = []
        shapes = [it for it in items if it.kind == "shape"]
        if kind == "digit":
            out = [(it.describe(), it, {}) for it in items if it.kind == "digit"]
        elif kind == "attribute":
            for it in shapes:
                if sum(s.name == it.name and s.color == it.color for s in shapes) == 1:
                    out.append((it.describe(), it, {}))
        else:
            for t in shapes:
                for a in (it for it in items if it.kind == "digit"):
                    for rel in RELATIONS:
                        if not _holds(rel, t, a):
                            continue
                        for with_color in (False, True):
                            same = [s for s in shapes if s.name == t.name and (not with_color or s.color == t.color)]
                            if [s for s in same if _holds(rel, s, a)] == [t]:
                                needed = len(same) > 1  # a second such item that the relation rules out
                                out.append((f"{t.describe(with_color)} {rel} {a.describe()}", t,
                                            {"relation": rel, "anchor": a.name, "needed": needed}))
                                break
        return out

    def _add_distractor(self, items: list[Item], rng: random.Random) -> None:
        """A shape copying an existing shape's description into a free cell (makes relations necessary)."""
        shapes = [it for it in items if it.kind == "shape"]
        free = [(c, r) for r in range(self.rows) for c in range(self.cols)
                if not any(it.col == c and it.row == r for it in items)]
        if shapes and free:
            s = rng.choice(shapes)
            c, r = rng.choice(free)
            items.append(Item("shape", s.name, s.color if rng.random() < 0.5 else rng.choice(list(COLORS)), c, r))

    def _font(self, size: int):
        if size not in self._fonts:
            self._fonts[size] = _font(size)
        return self._fonts[size]

    def _draw_item(self, draw: ImageDraw.ImageDraw, it: Item, rng: random.Random) -> None:
        """Draw `it` in its cell (random size and jitter) and set its pixel box."""
        c = self.cfg
        side = rng.randint(int(min(self.cw, self.ch) * c.size[0]), int(min(self.cw, self.ch) * c.size[1]))
        x0 = int(it.col * self.cw + rng.uniform(0, self.cw - side))
        y0 = int(it.row * self.ch + rng.uniform(0, self.ch - side))
        if it.kind == "digit":
            font = self._font(side)
            l, t, r, b = draw.textbbox((0, 0), it.name, font=font)
            w, h = r - l, b - t
            x0 = int(it.col * self.cw + rng.uniform(0, max(0.0, self.cw - w)))
            y0 = int(it.row * self.ch + rng.uniform(0, max(0.0, self.ch - h)))
            ink = tuple(rng.randint(0, 70) for _ in range(3))
            draw.text((x0 - l, y0 - t), it.name, fill=ink, font=font)
            it.box = (x0, y0, x0 + w, y0 + h)
            return
        fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLORS[it.color])
        x1, y1 = x0 + side, y0 + side
        if it.name == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif it.name == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        it.box = (x0, y0, x1, y1)

    def _clutter(self, draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
        """Thin random lines and small dots in muted colours (drawn under the items)."""
        c = self.cfg
        for _ in range(c.clutter):
            col = tuple(rng.randint(120, 210) for _ in range(3))
            x, y = rng.uniform(0, c.width), rng.uniform(0, c.height)
            if rng.random() < 0.5:
                draw.line((x, y, x + rng.uniform(-40, 40), y + rng.uniform(-40, 40)), fill=col, width=1)
            else:
                rad = rng.uniform(1, 3)
                draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=col)

    def sample(self, rng: random.Random) -> tuple[Image.Image, str, Item, dict]:
        """One scene and one unambiguous referring expression (kind drawn uniformly from cfg.kinds)."""
        c = self.cfg
        kind = rng.choice(self.kinds)
        for _ in range(100):
            items = self._layout(rng)
            if kind == "relation":
                self._add_distractor(items, rng)
            exprs = self._expressions(items, kind)
            if kind == "relation" and any(m["needed"] for _, _, m in exprs):
                exprs = [e for e in exprs if e[2]["needed"]]
            if exprs:
                break
        else:
            raise RuntimeError(f"no {kind} expression found in 100 scenes: grid {c.grid} too small for objects "
                               f"{c.objects}?")
        text, target, meta = rng.choice(exprs)
        bg = tuple(rng.randint(215, 255) for _ in range(3))
        img = Image.new("RGB", (c.width, c.height), bg)
        draw = ImageDraw.Draw(img)
        self._clutter(draw, rng)
        for it in items:
            self._draw_item(draw, it, rng)
        if c.noise > 0:
            arr = np.asarray(img, dtype=np.float32) / 255.0
            arr = arr + np.random.default_rng(rng.getrandbits(32)).normal(0.0, c.noise, arr.shape)
            img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode="RGB")
        meta = {"kind": kind, **meta, "box_px": list(target.box), "size": [c.width, c.height],
                "items": [{"class": it.cls, "box_px": list(it.box)} for it in items]}  # in drawing order
        return img, text, target, meta


def grounding_answer(box_1000: list[int], label: str) -> str:
    """The answer in Qwen3-VL's grounding format: a ```json fence around a one-object list (docs/responses.md)."""
    return grounding_answer_many([(box_1000, label)])


def grounding_answer_many(objects: list[tuple[list[int], str]]) -> str:
    """Several (box in 0..1000, label) objects in one fenced list, one object a line, as Qwen3-VL writes them."""
    lines = ",\n".join("\t" + json.dumps({"bbox_2d": [int(v) for v in box], "label": label}, ensure_ascii=False)
                       for box, label in objects)
    return f"```json\n[\n{lines}\n]\n```"


def reading_order(items: list[dict], height: int, rows: int) -> list[int]:
    """Indices of the layout's items (meta.items) top to bottom by grid row of their box centre, then left to right."""
    ch = height / rows

    def key(i):
        x1, y1, x2, y2 = items[i]["box_px"]
        return (int((y1 + y2) / 2 // ch), (x1 + x2) / 2)
    return sorted(range(len(items)), key=key)


def detect_all_record(image_rel: str, meta: dict, grid: tuple, prompt: str) -> dict:
    """A record asking for every item of a scene (meta from GroundingScenes.sample): the answer holds each item's
    box in 0..1000 coordinates and its class ("red triangle", "7") in reading order; meta.kind becomes "detect" and
    meta.box_px the first listed box."""
    w, h = meta["size"]
    items = meta["items"]
    order = reading_order(items, h, grid[1])
    objs = [(from_pixels(list(items[i]["box_px"]), w, h), items[i]["class"]) for i in order]
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image_rel}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": grounding_answer_many(objs)}]}],
        "meta": {"kind": "detect", "box_px": list(items[order[0]]["box_px"]), "size": [w, h], "items": items}}


def grounding_record(image_rel: str, expression: str, box_px, width: int, height: int, prompt: str,
                     meta: dict | None = None) -> dict:
    """One training record: the image and the prompt (with `{expr}` filled) -> the box in 0..1000 coordinates."""
    box = from_pixels(list(box_px), width, height)
    label = expression[4:] if expression.startswith("the ") else expression
    parts = [{"type": "image", "image": image_rel}, {"type": "text", "text": prompt.format(expr=expression)}]
    rec = {"messages": [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": [{"type": "text", "text": grounding_answer(box, label)}]},
    ]}
    if meta is not None:
        rec["meta"] = meta
    return rec


def generate_grounding_dataset(cfg: GroundingGenConfig, out_dir: str | None = None,
                               force: bool = False, workers: int | None = None) -> dict[str, str]:
    """Write `images/*.png`, `train.jsonl`, `val.jsonl` and `meta.json` under `out_dir` (default cfg.out_dir).

    A set with `question_first` or `detect_all` is derived from the plain referring set of the same scenes (the
    same images, prompts put first or training scenes asked for every item): that set is made (or reused) in
    `cfg.scenes_dir` (default `out_dir/scenes`), and `out_dir/images` links to its images. Several runs that differ
    only in these two settings therefore draw their scenes once when they name one `scenes_dir`, even when they
    start together (a lock file in it serialises the drawing).

    Args:
        cfg: generator settings (counts, seed, canvas, grid, objects, kinds, clutter, noise, prompt, ...).
        out_dir: destination folder; reused without regenerating when its meta.json matches `cfg`.
        force: regenerate even if a matching set exists (the shared scenes too).
        workers: processes drawing scenes (default: the CPU count, at most 16). Each scene has its own generator
            seeded by (seed, split, index), so the set does not depend on the number of workers.
    Returns:
        {"train": path, "val": path} of the JSONL files.
    """
    # version 2: the records' meta.items (the layout); a set written by version 1 lacks it and is regenerated.
    # version 3: one generator per scene (seeded by seed, split and index), drawn in parallel
    # version 4: question_first / detect_all sets derived from the plain set (detect_all picks by (seed, index))
    out = Path(out_dir or cfg.out_dir)
    meta = generator_meta("train/grounding_data.py", 4, cfg, drop=("out_dir", "enabled", "scenes_dir"))
    if cfg.question_first or cfg.detect_all > 0:
        base_cfg = dataclasses.replace(cfg, question_first=False, detect_all=0.0, scenes_dir="",
                                       prompt_all=GroundingGenConfig.prompt_all)
        base_dir = Path(cfg.scenes_dir) if cfg.scenes_dir else out / "scenes"
        if base_dir.resolve() == out.resolve():
            raise ValueError(f"data.grounding.scenes_dir={cfg.scenes_dir!r} is the set's own out_dir {str(out)!r}")
        base = generate_grounding_dataset(base_cfg, str(base_dir), force, workers)
        with _locked(out):
            return _derive(base, base_dir, out, cfg, meta, force)

    def sampler():
        scenes = GroundingScenes(cfg)

        def sample(rng, out, rel):
            img, text, target, m = scenes.sample(rng)
            img.save(out / rel, compress_level=1)  # noisy pixels barely compress: level 6 costs 2.5x the time
            return grounding_record(rel, text, target.box, cfg.width, cfg.height, cfg.prompt, m)
        return sample

    if workers is None:
        workers = min(16, os.cpu_count() or 1)
    with _locked(out):
        return write_synthetic_set(out, meta, cfg.n_train, cfg.n_val, cfg.seed, sampler, force,
                                   seed_per_sample=True, workers=workers)


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on `folder/.lock` (processes making the same set wait for the first one)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (runs sharing a set must then not start together)
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _derive(base: dict[str, str], base_dir: Path, out: Path, cfg: GroundingGenConfig, meta: dict,
            force: bool) -> dict[str, str]:
    """The question_first / detect_all set from the plain set at `base_dir`: its records rewritten, its images
    linked (out/images -> base_dir/images); meta.json last, as write_synthetic_set does."""
    paths = {"train": str(out / "train.jsonl"), "val": str(out / "val.jsonl")}
    meta_path = out / "meta.json"
    if not force and meta_path.exists() and all(os.path.exists(p) for p in paths.values()):
        try:
            if json.loads(meta_path.read_text()) == meta and (out / "images").resolve() == \
                    (base_dir / "images").resolve():
                return paths
        except json.JSONDecodeError:
            pass
    meta_path.unlink(missing_ok=True)
    link = out / "images"
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)  # the images of a set drawn here before (version 3): now shared
    os.symlink(os.path.relpath(base_dir / "images", out), link)
    for split in ("train", "val"):
        tmp = out / f".{split}.jsonl.tmp"
        with open(base[split], encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            for i, line in enumerate(src):
                rec = json.loads(line)
                image = rec["messages"][0]["content"][0]["image"]
                if split == "train" and cfg.detect_all > 0 and \
                        random.Random(f"{cfg.seed}/detect/{i}").random() < cfg.detect_all:
                    rec = detect_all_record(image, rec["meta"], cfg.grid, cfg.prompt_all)
                if cfg.question_first:
                    rec["messages"][0]["content"] = rec["messages"][0]["content"][::-1]
                dst.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, paths[split])
    meta_path.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return paths
