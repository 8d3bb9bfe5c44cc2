"""The position-encoding ablation study (docs/ablations.md): synthetic needle videos (train/video_needles.py), the
report (eval/pe_report.py) and the whole study in smoke mode (scripts/pe_ablation.py).

The samples are checked against independent oracles: the position ids against `get_rope_index` over the whole
prompt (the generator computes the video part once and continues it by hand), the answers against the needle
frames found in the pixel rows and, for the time task, against the timestamp text the prompt shows.
"""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from model import load_processor, preset
from model.config import ConfigError
from model.positions import get_rope_index
from model.processing.prompt import timestamp_text
from train.video_needles import NeedleVideoConfig, NeedleVideos

SEED = 20261201
RULES = {
    "timestamps": {},
    "absolute_time": {"temporal_ids": "absolute_time"},
    "videorope": {"layout": "videorope", "mrope_section": (6, 5, 5), "temporal_ids": "none", "temporal_stride": 2.0,
                  "spatial_ids": "diagonal"},
}


@pytest.fixture(scope="module")
def processor():
    return load_processor(None)


def _videos(processor, rule: str, fps: float = 1.0) -> NeedleVideos:
    cfg = preset("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, rope=dataclasses.replace(cfg.text.rope, **RULES[rule])))
    data = NeedleVideoConfig(frame_size=64, fps=fps, train_groups=12, min_groups=4, haystack_bank=6,
                             needle_variants=2)
    return NeedleVideos(data, cfg, processor, seed=SEED)


def _needles(v: NeedleVideos, s) -> list[tuple[int, int, str]]:
    """(group, digit, colour) of every needle group, found by matching its pixel rows against the needle bank."""
    rows = s.pixel_values_videos.view(int(s.video_grid_thw[0, 0]), -1, s.pixel_values_videos.shape[-1])
    found = []
    for g in range(rows.shape[0]):
        for (d, c), bank in v.needles.items():
            if any(torch.equal(rows[g], b) for b in bank):
                found.append((g, d, c))
    return found


@pytest.mark.parametrize("rule", list(RULES))
def test_sample_position_ids_equal_the_whole_prompt_rule(processor, rule):
    v = _videos(processor, rule)
    rng = np.random.default_rng(SEED)
    for task in ("read", "time", "distract", "order"):
        for groups in (4, 9):
            s = v.sample(task, groups, rng)
            want, _ = get_rope_index(s.input_ids[None], video_grid_thw=s.video_grid_thw, config=v.mc,
                                     second_per_grid_ts=[2.0])
            assert torch.equal(s.position_ids, want[:, 0]), (rule, task, groups)
            n_pad = int((s.input_ids == v.mc.video_token_id).sum())
            assert n_pad == groups * 4 == s.pixel_values_videos.shape[0] // 4  # 2x2 merged tokens of 4 patches
            text = processor.tokenizer.decode(s.input_ids.tolist())
            assert (timestamp_text(0.5) in text) == (rule == "timestamps")


@pytest.mark.parametrize("fps", [1.0, 2.0])
def test_answers_match_the_needle_frames(processor, fps):
    v = _videos(processor, "timestamps", fps)
    rng = np.random.default_rng(SEED + 1)
    tok = processor.tokenizer
    for task in ("read", "time", "distract", "order"):
        for _ in range(4):
            s = v.sample(task, 10, rng)
            n = int((s.labels != -100).sum())
            answer = tok.decode(s.input_ids[-n:-1].tolist()).strip()   # the last label is <|im_end|>
            assert s.input_ids[-1] == v.mc.eos_token_id
            needles = _needles(v, s)
            if task == "read":
                assert len(needles) == 1 and answer == str(needles[0][1])
            elif task == "distract":
                assert sorted(c for _, _, c in needles) == ["blue", "blue", "red"]
                assert answer == str(next(d for _, d, c in needles if c == "red"))
            elif task == "order":
                (g1, d1, _), (g2, d2, _) = needles
                assert g1 < g2 and answer == str(d1)
                assert re.search(rf"first, ({d1} or {d2}|{d2} or {d1})\?", tok.decode(s.input_ids.tolist()))
            else:
                (g, _, _), = needles
                assert float(answer) == pytest.approx((2 * g + 0.5) / fps, abs=0.051)  # 1 decimal, as the prompt
                # the prompt's timestamp text before the needle's group states the same time
                ids = s.input_ids.tolist()
                starts = [i for i, t in enumerate(ids) if t == v.mc.vision_start_token_id]
                before = tok.decode(ids[(starts[g - 1] + 1 if g else 0):starts[g]])
                assert before.endswith(f"<{answer} seconds>")


def test_needle_depth_places_the_needle(processor):
    v = _videos(processor, "absolute_time")
    for depth, group in ((0.0, 0), (1.0, 10), (0.5, 5)):
        s = v.sample("read", 11, np.random.default_rng(SEED), depth=depth)
        assert [g for g, _, _ in _needles(v, s)] == [group]


@pytest.mark.parametrize("rule", ["timestamps", "absolute_time"])
def test_prefill_scoring_equals_one_forward_and_full_sparse_equals_dense(processor, rule):
    """The sparse-prefill accuracy path (prompt through Qwen3VL.prefill, answer tokens fed on the cache with the
    sample's own positions) predicts the same answer tokens as one forward over the whole sample; and a block-sparse
    pattern that keeps every block (a window longer than the prompt, Triton interpreter) predicts them too."""
    import os

    from model import Qwen3VL
    from model.sparsity import SparsityConfig
    from train.pe_study import answer_preds, answer_preds_prefill

    v = _videos(processor, rule)
    torch.manual_seed(0)
    model = Qwen3VL(v.mc).eval()
    rng = np.random.default_rng(SEED)
    cpu = torch.device("cpu")
    for task in ("read", "time"):
        s = v.sample(task, 6, rng)
        want = answer_preds(model, s, cpu, "fp32")
        assert torch.equal(answer_preds_prefill(model, s, cpu, "fp32"), want), (rule, task)
        if os.environ.get("TRITON_INTERPRET") == "1":
            full = SparsityConfig("window", block_size=16, min_queries=16, params={"window": 4096})
            assert torch.equal(answer_preds_prefill(model, s, cpu, "fp32", full), want), (rule, task)


def test_prefill_takes_explicit_position_ids(processor):
    """Qwen3VL.prefill(position_ids=...) uses the given positions: stretched ones (RoPE is relative, so a shift
    alone would change nothing) give the logits of one forward with the same positions, not those of the model's
    own rule, and the cache continues after them."""
    from model import Qwen3VL
    from model.generation import KVCache

    v = _videos(processor, "timestamps")
    torch.manual_seed(0)
    model = Qwen3VL(v.mc).eval()
    s = v.sample("read", 5, np.random.default_rng(SEED))
    ids, pos = s.input_ids[None], s.position_ids[:, None] * 2 + 7
    media = dict(pixel_values_videos=s.pixel_values_videos, video_grid_thw=s.video_grid_thw)
    with torch.no_grad():
        want = model(ids, position_ids=pos, **media).logits[0, -1]
        own = model(ids, **media).logits[0, -1]
        cache = KVCache.for_model(model, 1, ids.shape[1])
        got = model.prefill(ids, cache, chunk_size=16, position_ids=pos, **media).logits[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (own - want).abs().max() > 1e-3
    assert int(cache.next_position.max()) == int(pos.max()) + 1
    with pytest.raises(ValueError, match="position_ids must be"):
        model.prefill(ids, KVCache.for_model(model, 1, ids.shape[1]), chunk_size=16, position_ids=pos[:2], **media)


def test_bad_data_config_is_named():
    with pytest.raises(ConfigError, match="data.frame_size=48"):
        NeedleVideoConfig(frame_size=48)
    with pytest.raises(ConfigError, match=r"data.tasks=\['read', 'count'\]"):
        NeedleVideoConfig(tasks=("read", "count"))
    with pytest.raises(ConfigError, match=r"data.min_groups=2 must be in \[3, data.train_groups=8\]"):
        NeedleVideoConfig(min_groups=2, train_groups=8, distractors=2)


# ------------------------------------------------------------------------------------------------ report
def _run(variant, seed, accs: dict, yarn_accs: dict | None = None) -> dict:
    """A hand-written result file: accs[multiple] = {task: accuracy}."""
    rows = []
    for yarn, table in ((False, accs), (True, yarn_accs or accs)):
        for m, a in table.items():
            rows.append({"yarn": yarn, "multiple": m, "groups": 8 * m, "video_tokens": 32 * m, "max_position": 40 * m,
                         "yarn_factor": float(m) if yarn else 1.0, "accuracy": a,
                         "mean": float(np.mean(list(a.values()))), "seconds": 1.0})
    rope = {"layout": "interleaved", "mrope_section": [24, 20, 20], "temporal_ids": "timestamps", "spatial_ids": "grid",
            "temporal_stride": 1.0}
    return {"variant": variant, "seed": seed, "smoke": False, "rope": rope, "params": 92e6,
            "model": {"text": {"num_hidden_layers": 4, "hidden_size": 512, "head_dim": 128}},
            "data": {"frame_size": 64, "fps": 1.0, "train_groups": 8}, "tokens_per_group": 4,
            "eval_config": {"trials": 4, "yarn_factor": "tokens"}, "train": {"steps": 100, "wall_s": 60.0},
            "device": "test", "torch": "x", "eval": rows}


def test_report_tables_and_verdicts_from_hand_written_results(tmp_path):
    from eval.pe_report import write_report

    runs = [  # interleaved beats chunked_q3 beyond L by far; chunked_q25 equals interleaved
        _run("mrope_interleaved", 0, {1: {"read": 1.0, "time": 0.5}, 2: {"read": 0.75, "time": 0.25}}),
        _run("mrope_interleaved", 1, {1: {"read": 1.0, "time": 0.5}, 2: {"read": 0.75, "time": 0.75}},
             {1: {"read": 1.0, "time": 0.5}, 2: {"read": 1.0, "time": 1.0}}),
        _run("mrope_chunked_q3", 0, {1: {"read": 1.0, "time": 0.0}, 2: {"read": 0.0, "time": 0.0}}),
        _run("mrope_chunked_q3", 1, {1: {"read": 1.0, "time": 0.0}, 2: {"read": 0.0, "time": 0.0}}),
        _run("mrope_chunked_q25", 0, {1: {"read": 1.0, "time": 0.5}, 2: {"read": 0.75, "time": 0.25}}),
        _run("mrope_chunked_q25", 1, {1: {"read": 1.0, "time": 0.5}, 2: {"read": 0.75, "time": 0.75}}),
    ]
    for r in runs:
        (tmp_path / f"{r['variant']}_seed{r['seed']}.json").write_text(json.dumps(r))
    (tmp_path / "unrelated.json").write_text(json.dumps({"something": "else"}))
    md = write_report(tmp_path, tmp_path / "report.md", figure=tmp_path / "fig.png")
    assert (tmp_path / "report.md").read_text() == md and (tmp_path / "fig.png").stat().st_size > 0
    no_yarn = md.split("## Accuracy without YaRN")[1].split("##")[0]
    # interleaved: means 0.75, 0.75 at 1x; 0.5, 0.75 at 2x -> 75.0 ± 0.0 and 62.5 ± 12.5
    assert "| mrope_interleaved | 75.0 ± 0.0 | 62.5 ± 12.5 |" in no_yarn
    assert "| mrope_chunked_q3 | 50.0 ± 0.0 | 0.0 ± 0.0 |" in no_yarn
    with_yarn = md.split("## Accuracy with YaRN")[1].split("##")[0]
    assert "| mrope_interleaved | 75.0 ± 0.0 | 75.0 ± 25.0 |" in with_yarn  # 2x: seed 0 0.5, seed 1 (YaRN table) 1.0
    claims = md.split("## What the numbers say")[1]
    assert re.search(r"`mrope_interleaved` 62.5% vs `mrope_chunked_q3` 0.0% .*difference \+62.5 points, \*\*agrees",
                     claims)
    assert re.search(r"`mrope_interleaved` 62.5% vs `mrope_chunked_q25` 62.5% .*inside the seed spread", claims)
    assert "not measured (needs variants `videorope` and `mrope_chunked_q25`" in claims
    assert "Smoke run" not in md and "stopped at" not in md and "vision warm-up reading" not in md
    # a run cut by the time budget and one whose tower did not learn to read are named above the tables
    runs[2]["train"].update(planned_steps=300, vision_warmup={"loss": 1.2, "line_acc": 0.5, "wall_s": 3.0})
    (tmp_path / "mrope_chunked_q3_seed0.json").write_text(json.dumps(runs[2]))
    md = write_report(tmp_path, tmp_path / "report.md")
    assert "1 run(s) stopped at `train.max_time_s` before their planned steps**: mrope_chunked_q3 seed 0 (100/300)" in md
    assert "1 run(s) ended the vision warm-up reading < 90% of the digits**: mrope_chunked_q3 seed 0 (50%)" in md
    assert "Block-sparse prefill" not in md  # no run measured it


def test_report_sparse_prefill_table_from_hand_written_results(tmp_path):
    """eval.sparse results: accuracy per method and length, mean over seeds, with the difference to dense."""
    from eval.pe_report import write_report

    def sparse_rows(dense: float, vs: float):
        return [{"sparse": meth, "multiple": m, "groups": 8 * m, "accuracy": {"read": a}, "mean": a, "seconds": 1.0}
                for meth, a in (("none", dense), ("vertical_slash", vs)) for m in (1, 2)]

    for seed, (dense, vs) in enumerate(((1.0, 0.75), (0.5, 0.5))):
        r = _run("mrope_interleaved", seed, {1: {"read": 1.0}, 2: {"read": 0.5}})
        r["sparse_eval"] = sparse_rows(dense, vs)
        (tmp_path / f"mrope_interleaved_seed{seed}.json").write_text(json.dumps(r))
    md = write_report(tmp_path, tmp_path / "report.md")
    table = md.split("## Block-sparse prefill next to dense")[1].split("##")[0]
    assert "| mrope_interleaved | none | 75.0 | 75.0 |" in table          # (1.0 + 0.5) / 2
    assert "| mrope_interleaved | vertical_slash | 62.5 (-12.5) | 62.5 (-12.5) |" in table


# ------------------------------------------------------------------------------------------------ smoke study
def test_smoke_study_end_to_end_writes_results_and_report(tmp_path, capsys):
    """`scripts/pe_ablation.py --smoke --out DIR` (made even smaller here): two variants trained and evaluated,
    one JSON each, the report and the figure; a second call skips the finished runs."""
    from scripts.pe_ablation import main

    small = ["train.steps=2", "eval.trials=1", "data.train_groups=4", "data.min_groups=2", "data.tasks=[read,order]",
             "train.vision_warmup.steps=1", "train.warmup_images=8", "eval.sparse=[vertical_slash]",
             "eval.sparse_multiples=[1]", "eval.sparse_block_size=16"]
    report = main(["--smoke", "--out", str(tmp_path), *small])
    assert report == tmp_path / "ablations.md"
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["mrope_interleaved_seed0.json", "videorope_seed0.json"]
    for name in files:
        r = json.loads((tmp_path / name).read_text())
        assert r["smoke"] and r["train"]["steps"] == 2
        assert [(row["yarn"], row["multiple"]) for row in r["eval"]] == [(False, 1), (False, 2), (True, 1), (True, 2)]
        assert [(row["sparse"], row["multiple"]) for row in r["sparse_eval"]] == [("none", 1), ("vertical_slash", 1)]
        for row in r["eval"]:
            assert set(row["accuracy"]) == {"read", "order"}
            assert row["mean"] == pytest.approx(np.mean(list(row["accuracy"].values())))
            assert row["groups"] == 4 * row["multiple"]
    vr = json.loads((tmp_path / "videorope_seed0.json").read_text())
    assert (vr["rope"]["layout"], vr["rope"]["temporal_ids"], vr["rope"]["spatial_ids"]) == ("videorope", "none",
                                                                                          "diagonal")
    md = report.read_text()
    assert md.startswith("> **Smoke run**") and "| videorope |" in md and "| mrope_interleaved |" in md
    assert "| videorope | vertical_slash |" in md.split("## Block-sparse prefill next to dense")[1]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    capsys.readouterr()
    main(["--smoke", "--out", str(tmp_path), *small])
    assert capsys.readouterr().out.count("done with these settings, skipped") == 2


def test_study_config_errors_name_the_key(tmp_path):
    from scripts.pe_ablation import compose

    with pytest.raises(ConfigError, match=r"run: unknown variant\(s\) \['nope'\]"):
        compose(["scale=smoke", "run=[nope]"])
    with pytest.raises(ConfigError, match="eval.yarn_factor='frames'"):
        compose(["scale=smoke", "eval.yarn_factor=frames"])
    with pytest.raises(ConfigError, match=r"train.first_steps=5 and train.first_tasks=\[\]: give both"):
        compose(["scale=smoke", "+train.first_steps=5"])
    with pytest.raises(ConfigError, match=r"train.first_tasks=\['find'\] must be a subset"):
        compose(["scale=smoke", "+train.first_tasks=[find]", "+train.first_steps=5"])
    assert compose(["scale=gpu"]).train.first_tasks == ("read",)  # the GPU settings' curriculum
    with pytest.raises(ConfigError, match="temporal_ids 'seconds'"):
        from model.build import model_config

        model_config(compose(["scale=smoke", "variants.videorope.temporal_ids=seconds"]).variant_spec("videorope"))
