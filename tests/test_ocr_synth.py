"""Multilingual synthetic OCR (train/ocr_data.py, train/ocr_scripts.py): scripts, mixed lines, documents, blur and
low contrast, seeding; and the per-script CER breakdown the OCR evaluation reports (eval/ocr.py)."""
import json
import random

import numpy as np
import pytest

from eval.ocr import OCRConfig, summarise
from eval.ocr_metrics import text_script
from train.config import OCRGenConfig
from train.ocr_data import OCRRenderer, generate_ocr_dataset
from train.ocr_scripts import SCRIPT_WORDS

MULTI = dict(charset="multilingual", min_len=6, max_len=20, width=256, rotation=0.0, noise=0.0)


def _texts(path):
    return [json.loads(line)["messages"][1]["content"][0]["text"] for line in open(path, encoding="utf-8")]


def test_multilingual_set_is_seeded_and_covers_every_script(tmp_path):
    cfg = OCRGenConfig(n_train=40, n_val=2, seed=3, mix=0.0, **{**MULTI, "noise": 0.05, "rotation": 2.0},
                       blur=1.0, low_contrast=0.3, lines=(1, 2), layout="random")
    a, b = (generate_ocr_dataset(cfg, out_dir=str(tmp_path / d)) for d in ("a", "b"))
    assert open(a["train"], encoding="utf-8").read() == open(b["train"], encoding="utf-8").read()
    for i in range(5):
        assert ((tmp_path / "a" / "images" / f"train_{i:06d}.png").read_bytes()
                == (tmp_path / "b" / "images" / f"train_{i:06d}.png").read_bytes())
    lines = [ln for t in _texts(a["train"]) for ln in t.split("\n")]
    # mix = 0: every line is one script's words, and over 40 documents every covered script shows up
    assert {text_script(ln) for ln in lines} == set(SCRIPT_WORDS)
    c = generate_ocr_dataset(OCRGenConfig(**{**cfg.__dict__, "seed": 4}), out_dir=str(tmp_path / "c"))
    assert _texts(c["train"]) != _texts(a["train"])


def test_mixed_script_lines_and_script_subset():
    r = OCRRenderer(OCRGenConfig(scripts=("Greek", "Arabic", "Georgian"), mix=1.0, **MULTI))
    rng = random.Random(0)
    texts = [r.random_text(rng) for _ in range(30)]
    scripts = {text_script(t) for t in texts}
    assert "Mixed" in scripts and scripts <= {"Mixed", "Greek", "Arabic", "Georgian", "Common"}
    with pytest.raises(ValueError, match="unknown script 'Han'"):
        OCRRenderer(OCRGenConfig(scripts=("Han",), **MULTI))


def test_documents_have_one_band_per_line():
    r = OCRRenderer(OCRGenConfig(lines=(3, 3), height=32, layout="right", **MULTI))
    rng = random.Random(1)
    text = r.random_text(rng)
    assert text.count("\n") == 2
    img = np.asarray(r.render(text, rng).convert("L"))
    assert img.shape == (96, 256)
    ink = img < img.max() - 40                          # text pixels (no noise, no rotation)
    for k in range(3):                                   # every band holds its line, right-aligned
        band = ink[32 * k: 32 * (k + 1)]
        cols = np.nonzero(band.any(0))[0]
        assert band.any() and cols.max() >= 256 - 4 - 4 - 1


def test_blur_and_low_contrast():
    def render(seed=7, **kw):
        r = OCRRenderer(OCRGenConfig(**{**MULTI, "colors": "fixed", **kw}))
        return np.asarray(r.render("λόγος и water", random.Random(seed)).convert("L"), dtype=np.float32)

    # edge energy over a few images (the radius is uniform in [0, blur]: one draw may be near 0)
    grad = lambda a: (np.diff(a, axis=1) ** 2).sum()  # noqa: E731
    sharp = sum(grad(render(s)) for s in range(6))
    assert sum(grad(render(s, blur=3.0)) for s in range(6)) < 0.7 * sharp
    sharp = render()
    assert sharp.max() - sharp.min() == 255              # fixed colours: black on white
    low = render(low_contrast=1.0)
    assert 25 <= low.max() - low.min() <= 60


def test_per_script_cer_breakdown():
    refs = ["12", "λόγος", "water", "и water"]
    preds = ["12", "λογος", "wat", "и water"]
    out = summarise(preds, refs, [text_script(r) for r in refs],
                    OCRConfig(checkpoints=("x",), data="d", n_boot=0))
    assert out["per_script"] == {"Common": {"cer": 0.0, "n": 1}, "Greek": {"cer": pytest.approx(1 / 5), "n": 1},
                                 "Latin": {"cer": pytest.approx(2 / 5), "n": 1}, "Mixed": {"cer": 0.0, "n": 1}}
    assert out["metrics"]["raw"]["cer"] == pytest.approx(3 / 19)
