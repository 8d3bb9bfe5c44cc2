"""Needle evaluations: teacher-forced scoring alignment, needle placement, and the sweep's bookkeeping.

The model under test is replaced by transparent fakes whose next-token prediction is known (an oracle that
predicts the true next token, and one that is wrong at a chosen answer position), so the expected scores are
known independently of the code under test.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eval.niah import NeedleConfig, run_needle
from eval.tasks.passkey import passkey_case
from eval.tasks.vniah import video_case
from eval.scoring import teacher_forced_correct
from model import load_processor

V = 151936


class NextTokenFake:
    """logits[t] peaks at ids[t + 1] (the true next token), except at answer positions listed in `wrong_at`."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, wrong_at=()):
        self.wrong_at = set(wrong_at)
        self.calls = []

    def __call__(self, ids, logits_to_keep=0, **kw):
        self.calls.append((ids.shape, logits_to_keep, sorted(kw)))
        L = ids.shape[1]
        logits = torch.zeros(1, L, V)
        nxt = torch.cat([ids[0, 1:], ids[0, :1]])
        logits[0, torch.arange(L), nxt] = 1.0
        keep = logits[:, -logits_to_keep:] if logits_to_keep else logits
        for a in self.wrong_at:  # answer token a is predicted at kept position a
            keep[0, a] = 0
            keep[0, a, 7] = 1.0
        return SimpleNamespace(logits=keep)


@pytest.fixture(scope="module")
def proc():
    return load_processor(None)


def test_teacher_forcing_alignment():
    inputs = {"input_ids": torch.randint(1000, 2000, (1, 12))}
    answer = [4321, 98, 5]
    ok, frac = teacher_forced_correct(NextTokenFake(), inputs, answer)
    assert ok and frac == 1.0
    ok, frac = teacher_forced_correct(NextTokenFake(wrong_at=[2]), inputs, answer)
    assert not ok and frac == pytest.approx(2 / 3)
    ok, frac = teacher_forced_correct(NextTokenFake(wrong_at=[0]), inputs, answer)
    assert not ok and frac == pytest.approx(2 / 3)


@pytest.mark.parametrize("depth, n", [(0.0, 8), (0.5, 10), (1.0, 8)])
def test_video_needle_sits_at_its_depth(proc, depth, n):
    cfg = NeedleConfig(frame_size=64)
    inputs, answer = video_case(proc, n, depth, np.random.default_rng(0), cfg)
    assert answer.isdigit() and len(answer) == 4
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == n // 2
    # the needle frame is mostly white (+1 after normalisation); haystack frames average near 0
    group_mean = inputs["pixel_values_videos"].view(t, h * w, -1).mean(dim=(1, 2))
    assert int(group_mean.argmax()) == round(depth * (n - 1)) // 2
    text = proc.decode(inputs["input_ids"][0])
    assert text.count("<|vision_start|>") == t and "<0.5 seconds>" in text  # 1 fps: group 0 at mean(0, 1) s


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.8])
def test_passkey_at_depth(proc, depth):
    inputs, answer = passkey_case(proc, 600, depth, np.random.default_rng(1), NeedleConfig(task="passkey"))
    text = proc.decode(inputs["input_ids"][0])
    assert 500 < inputs["input_ids"].shape[1] < 800
    start = text.index("There is important info")
    body = text[start:text.index("What is the pass key?")]
    where = body.index(f"The pass key is {answer}.") / len(body)
    assert abs(where - depth) < 0.1


def test_sweep_scores_and_writes_results(proc, tmp_path):
    cfg = NeedleConfig(task="passkey", lengths=(200, 400), depths=(0.0, 1.0), trials=2, out_dir=str(tmp_path))
    good = run_needle(NextTokenFake(), proc, cfg)
    assert good["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and good["mean_accuracy"] == 1.0
    bad = run_needle(NextTokenFake(wrong_at=[1]), proc, cfg)
    assert bad["mean_accuracy"] == 0.0
    saved = json.loads((tmp_path / "needle_passkey.json").read_text())
    assert saved["accuracy"] == bad["accuracy"] and (tmp_path / "needle_passkey.png").stat().st_size > 1000
    assert saved["tokens"][1][0] > saved["tokens"][0][0]


def test_eval_entry_point_rejects_unknown_keys():
    from eval.run import EvalConfig
    from model.build import config_from_dict
    from model.config import ConfigError

    with pytest.raises(ConfigError, match="lenghts"):
        config_from_dict({"needle": {"lenghts": [1]}}, EvalConfig)
