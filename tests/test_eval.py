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
from eval.haystack import HaystackConfig
from eval.tasks.passkey import passkey_case
from eval.tasks.vniah import vniah_case
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


@pytest.mark.parametrize("depth, n, group", [(0.0, 8, 0), (0.5, 10, 2), (0.3, 10, 1), (1.0, 8, 3), (1.0, 9, 3)])
def test_video_needle_sits_at_its_depth(proc, depth, n, group):
    """The needle is a pair of frames filling one whole temporal group, at round(depth * (groups - 1))."""
    cfg = NeedleConfig(haystack=HaystackConfig(frame_size=64))
    case = vniah_case(proc, n, depth, np.random.default_rng(0), cfg)
    inputs, answer = case.inputs, case.answer
    assert answer.isdigit() and len(answer) == 4 and case.values == [int(answer)]
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == (n + 1) // 2
    # both needle frames are mostly white (+1 after normalisation); a group with one haystack frame averages lower
    group_mean = inputs["pixel_values_videos"].view(t, h * w, -1).mean(dim=(1, 2))
    assert int(group_mean.argmax()) == group and case.needles[0]["frame"] == 2 * group
    assert group_mean[group] > 0.8 and (group_mean[torch.arange(t) != group] < 0.5).all()
    text = proc.decode(inputs["input_ids"][0])
    assert text.count("<|vision_start|>") == t and "<0.5 seconds>" in text  # 1 fps: group 0 at mean(0, 1) s


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.8])
def test_passkey_at_depth(proc, depth):
    case = passkey_case(proc, 600, depth, np.random.default_rng(1), NeedleConfig(task="passkey"))
    inputs, answer = case.inputs, case.answer
    text = proc.decode(inputs["input_ids"][0])
    assert 500 < inputs["input_ids"].shape[1] < 800
    start = text.index("There is important info")
    body = text[start:text.index("What is the pass key?")]
    where = body.index(f"The pass key is {answer}.") / len(body)
    assert abs(where - depth) < 0.1


def test_sweep_scores_and_writes_results(proc, tmp_path):
    cfg = NeedleConfig(task="passkey", lengths=(200, 400), depths=(0.0, 1.0), trials=2, out_dir=str(tmp_path / "a"),
                       scoring=("teacher_forced",))
    good = run_needle(NextTokenFake(), proc, cfg)
    assert good["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and good["mean_accuracy"] == 1.0
    cfg.out_dir = str(tmp_path)
    bad = run_needle(NextTokenFake(wrong_at=[1]), proc, cfg)
    assert bad["mean_accuracy"] == 0.0
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved["accuracy"] == bad["accuracy"] and (tmp_path / "passkey.png").stat().st_size > 1000
    assert saved["tokens"][1][0] > saved["tokens"][0][0]


def test_eval_entry_point_rejects_unknown_keys():
    from eval.run import EvalConfig
    from model.build import config_from_dict
    from model.config import ConfigError

    with pytest.raises(ConfigError, match="lenghts"):
        config_from_dict({"needle": {"lenghts": [1]}}, EvalConfig)


def test_a_registered_task_runs_through_the_sweep(proc, tmp_path, monkeypatch):
    """A new task is one registered function: the sweep finds it by name, calls it per cell with the cell's length
    and depth, and scores the gold answer it returns (the oracle fake gets every cell right)."""
    from eval import tasks

    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))  # keep the registry as it was after this test
    seen = []

    @tasks.register("toy", unit="words")
    def toy_case(proc_, length, depth, rng, cfg):
        seen.append((length, depth, cfg.extra["word"]))
        answer = str(rng.integers(100, 1000))
        text = f"{cfg.extra['word']} " * length + f"The code is {answer}. What is the code?"
        return proc_(messages=[[{"role": "user", "content": [{"type": "text", "text": text}]}]],
                     add_generation_prompt=True), answer  # a plain pair is judged as text

    with pytest.raises(ValueError, match="registered twice"):
        tasks.register("toy", unit="words")(toy_case)
    cfg = NeedleConfig(task="toy", lengths=(3, 9), depths=(0.0, 1.0), out_dir=str(tmp_path), extra={"word": "tree"},
                       scoring=("teacher_forced",))
    res = run_needle(NextTokenFake(), proc, cfg)
    assert seen == [(3, 0.0, "tree"), (3, 1.0, "tree"), (9, 0.0, "tree"), (9, 1.0, "tree")]
    assert res["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and res["unit"] == "words"
    assert res["tokens"][1][0] - res["tokens"][0][0] == 6  # " tree" is one token
    assert json.loads((tmp_path / "toy.json").read_text())["task"] == "toy"
    with pytest.raises(ValueError, match="unknown needle task 'nope'"):
        run_needle(NextTokenFake(), proc, NeedleConfig(task="nope", out_dir=str(tmp_path)))


def test_eval_imports_nothing_from_train():
    import subprocess
    import sys

    code = ("import sys, eval.run, eval.niah, eval.generate, eval.metrics, eval.tasks, eval.compare; "
            "print(sorted(m for m in sys.modules if m == 'train' or m.startswith('train.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("task, lengths", [("vniah", (8, 16)), ("vniah_d", (8, 16)), ("temporal", (8, 16)),
                                           ("multi_needle", (8, 16)), ("passkey", (200, 400))])
def test_task_group_selects_the_task(task, lengths, tmp_path):
    """`python -m eval task=<name> model.preset=tiny needle.lengths=[...] needle.out_dir=DIR` composes to a typed
    EvalConfig whose needle.task is the registered task (conf/task/<name>.yaml)."""
    import os

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from eval.run import EvalConfig
    from eval.tasks import TASKS
    from model.build import config_from_dict

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        plain = compose("eval", overrides=[f"task={task}", "model.preset=tiny"])
        swept = compose("eval", overrides=[f"task={task}", "needle.lengths=[5,7]", f"needle.out_dir={tmp_path}"])
    cfg = config_from_dict(OmegaConf.to_container(plain, resolve=True), EvalConfig)
    assert cfg.needle.task == task and task in TASKS and cfg.needle.lengths == lengths
    cfg = config_from_dict(OmegaConf.to_container(swept, resolve=True), EvalConfig)
    assert cfg.needle.lengths == (5, 7) and cfg.needle.out_dir == str(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("lengths", (16, 0), r"needle.lengths"), ("lengths", (), r"needle.lengths"), ("lengths", (8.5,), r"needle.lengths"),
    ("depths", (0.0, 1.5), r"needle.depths"), ("depths", (-0.1,), r"needle.depths"), ("depths", (), r"needle.depths"),
    ("trials", 0, r"needle.trials"), ("scoring", ("greedy",), r"needle.scoring"), ("chunk_size", -1, "chunk_size"),
    ("length_unit", "seconds", "length_unit"), ("fps", 0.0, r"haystack.fps"), ("fps", -1.0, r"haystack.fps"),
    ("frame_size", 0, r"haystack.frame_size")],
    ids=["length-0", "no-lengths", "length-float", "depth-1.5", "depth-negative", "no-depths", "trials-0",
         "scoring-unknown", "chunk-negative", "unit-seconds", "fps-0", "fps-negative", "frame-size-0"])
def test_needle_config_rejects_values_that_fail_late(field, value, message):
    from model.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        if field in ("fps", "frame_size"):
            HaystackConfig(**{field: value})
        else:
            NeedleConfig(**{field: value})
