"""The position-encoding variants of the ablation study (docs/ablations.md): rotary layouts (model/rope.py) and video
position-id rules (model/positions.py, RopeConfig.temporal_ids / spatial_ids / temporal_stride).

Every expectation below is written out by hand on a small grid from the papers' rules, or comes from transformers'
Qwen2.5-VL `get_rope_index` (the absolute-time ids, on the same video), never from the code under test.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model import preset
from model.build import ModelSpec, model_config
from model.config import ConfigError, Qwen3VLConfig, RopeConfig
from model.positions import get_rope_index
from model.rope import TextRotary, mrope_axis_map

CFG = preset("tiny")            # head_dim 32: 16 frequencies, spatial_merge_size 2
V, X = CFG.video_token_id, 7    # a video pad, and any text token
SEED = 20261201


def _cfg(**rope) -> Qwen3VLConfig:
    return CFG.replace(text=dataclasses.replace(CFG.text, rope=dataclasses.replace(CFG.text.rope, **rope)))


# ------------------------------------------------------------------------------------------------ rotary layouts
T, H, W = 0, 1, 2
AXIS_MAPS = {  # 16 frequency slots; hand-written from each paper's description
    ("interleaved", (6, 5, 5)): [T, H, W, T, H, W, T, H, W, T, H, W, T, H, W, T],   # Qwen3-VL: THW x5, then T
    ("interleaved", (8, 4, 4)): [T, H, W, T, H, W, T, H, W, T, H, W, T, T, T, T],
    ("chunked", (6, 5, 5)): [T] * 6 + [H] * 5 + [W] * 5,                               # Qwen2.5-VL: T..H..W..
    ("chunked", (4, 6, 6)): [T] * 4 + [H] * 6 + [W] * 6,
    ("videorope", (4, 6, 6)): [H, W] * 6 + [T] * 4,                                     # VideoRoPE: HW.. then T last
    ("videorope", (6, 5, 5)): [H, W] * 5 + [T] * 6,
    ("1d", (6, 5, 5)): [T] * 16,
}


@pytest.mark.parametrize("layout,section", list(AXIS_MAPS), ids=[f"{k[0]}-{'-'.join(map(str, k[1]))}"
                                                                 for k in AXIS_MAPS])
def test_rotary_layout_axis_maps(layout, section):
    rope = RopeConfig(layout=layout, mrope_section=section)
    assert mrope_axis_map(rope, 16).tolist() == AXIS_MAPS[(layout, section)]


@pytest.mark.parametrize("layout,section", [("interleaved", (6, 5, 5)), ("chunked", (4, 6, 6)),
                                            ("videorope", (4, 6, 6)), ("1d", (6, 5, 5))])
def test_rotary_tables_follow_the_axis_map(layout, section):
    """cos / sin of slot i = cos / sin(pos[axis_i] * theta^(-2i/d)), duplicated for rotate_half (fp32, exact math)."""
    cfg = _cfg(layout=layout, mrope_section=section, theta=10000.0)
    g = torch.Generator().manual_seed(SEED)
    pos = torch.randint(-20, 3000, (3, 2, 5), generator=g)
    cos, sin = TextRotary(cfg.text)(pos, torch.float32)
    axis = AXIS_MAPS[(layout, section)]
    for b in range(2):
        for j in range(5):
            ang = [float(pos[axis[i], b, j]) * 10000.0 ** (-2 * i / 32) for i in range(16)]
            want_c = torch.tensor([math.cos(a) for a in ang] * 2)
            want_s = torch.tensor([math.sin(a) for a in ang] * 2)
            torch.testing.assert_close(cos[b, j], want_c, atol=2e-4, rtol=0)  # fp32 angles up to ~3e3 rad
            torch.testing.assert_close(sin[b, j], want_s, atol=2e-4, rtol=0)


def test_videorope_layout_round_trips_through_config_json():
    c = _cfg(layout="videorope", mrope_section=(4, 6, 6), temporal_ids="none", temporal_stride=2.0,
             spatial_ids="diagonal")
    d = c.to_hf()
    rs = d["text_config"]["rope_scaling"]
    assert rs["mrope_layout"] == "videorope" and rs["mrope_section"] == [4, 6, 6]
    assert (rs["temporal_ids"], rs["temporal_stride"], rs["spatial_ids"]) == ("none", 2.0, "diagonal")
    assert Qwen3VLConfig.from_hf(d).text.rope == c.text.rope
    # Qwen3-VL's own rule writes none of the ablation keys (official config.json files stay as they are)
    assert not {"temporal_ids", "tokens_per_second", "temporal_stride", "spatial_ids"} & set(
        CFG.to_hf()["text_config"]["rope_scaling"])


# ------------------------------------------------------------------------------------------------ position ids
def _ids(*parts) -> torch.Tensor:
    """parts: ("t", n) text tokens or ("v", n) video pads -> (1, L) input_ids."""
    out = []
    for kind, n in parts:
        out += [X if kind == "t" else V] * n
    return torch.tensor([out])


def _check(cfg, ids, grid, want, **kw):
    pos, delta = get_rope_index(ids, video_grid_thw=torch.tensor(grid), config=cfg, **kw)
    assert pos[:, 0].tolist() == want
    return delta


def test_timestamps_rule_by_hand():
    """Qwen3-VL: each group (1, 2x2 merged) its own run after timestamp text; pos += max(h', w') per group."""
    ids = _ids(("t", 2), ("v", 4), ("t", 1), ("v", 4), ("t", 1))
    want = [[0, 1, 2, 2, 2, 2, 4, 5, 5, 5, 5, 7],
            [0, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7],
            [0, 1, 2, 3, 2, 3, 4, 5, 6, 5, 6, 7]]
    assert _check(CFG, ids, [[2, 4, 4]], want).tolist() == [[8 - 12]]


def test_absolute_time_rule_by_hand():
    """Qwen2.5-VL: one run, T = start + int(g * 1.5 s * 2 tokens/s) = +0, +3, +6; text after at max + 1."""
    cfg = _cfg(temporal_ids="absolute_time")
    ids = _ids(("t", 1), ("v", 6), ("t", 2))   # grid (3, 2, 4): 3 groups of 1x2 merged tokens
    want = [[0, 1, 1, 4, 4, 7, 7, 8, 9],
            [0, 1, 1, 1, 1, 1, 1, 8, 9],
            [0, 1, 2, 1, 2, 1, 2, 8, 9]]
    assert _check(cfg, ids, [[3, 2, 4]], want, second_per_grid_ts=[1.5]).tolist() == [[10 - 9]]


def test_none_rule_with_videorope_diagonal_and_stride_by_hand():
    """VideoRoPE: one run, T = start + 2g; H, W = T + row - (h'-1)//2, T + col - (w'-1)//2; text after at last T + 1."""
    cfg = _cfg(layout="videorope", mrope_section=(4, 6, 6), temporal_ids="none", temporal_stride=2.0,
               spatial_ids="diagonal")
    ids = _ids(("t", 3), ("v", 18), ("t", 1))   # grid (2, 6, 6): 2 groups of 3x3 merged tokens
    t0, t1 = [3] * 9, [5] * 9
    rows, cols = [-1, -1, -1, 0, 0, 0, 1, 1, 1], [-1, 0, 1] * 3
    want = [[0, 1, 2] + t0 + t1 + [6],
            [0, 1, 2] + [3 + r for r in rows] + [5 + r for r in rows] + [6],
            [0, 1, 2] + [3 + c for c in cols] + [5 + c for c in cols] + [6]]
    assert _check(cfg, ids, [[2, 6, 6]], want).tolist() == [[7 - 22]]
    # the grid placement with the same stride: H, W from the run's start, the next text after the largest id
    cfg = _cfg(temporal_ids="none", temporal_stride=2.0)
    want = [[0, 1, 2] + t0 + t1 + [6],
            [0, 1, 2] + [3 + r + 1 for r in rows] * 2 + [6],
            [0, 1, 2] + [3 + c + 1 for c in cols] * 2 + [6]]
    _check(cfg, ids, [[2, 6, 6]], want)


def test_diagonal_rule_on_timestamped_groups_by_hand():
    """Diagonal placement with Qwen3-VL's per-group runs: each 3x1 group centred on its T id, text at T + 1."""
    cfg = _cfg(spatial_ids="diagonal")
    ids = _ids(("t", 1), ("v", 3), ("t", 1), ("v", 3))  # grid (2, 6, 2): groups of 3x1 merged tokens
    want = [[0, 1, 1, 1, 2, 3, 3, 3],
            [0, 0, 1, 2, 2, 2, 3, 4],
            [0, 1, 1, 1, 2, 3, 3, 3]]
    assert _check(cfg, ids, [[2, 6, 2]], want).tolist() == [[4 - 8]]


def _hf_qwen25_rope_index(ids, types, grid, spg, tokens_per_second):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, vocab_size=CFG.text.vocab_size,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=16, out_hidden_size=16, intermediate_size=32, num_heads=2,
                  tokens_per_second=tokens_per_second, spatial_merge_size=2)
    model = Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    return model.get_rope_index(ids, types, video_grid_thw=grid, second_per_grid_ts=spg)[0]


@pytest.mark.parametrize("spg,tps", [(1.0, 2), (0.5, 2), (2.0, 25), (0.75, 2)], ids=["1s", "0.5s", "2s-tps25", "0.75s"])
def test_absolute_time_ids_equal_transformers_qwen2_5_vl(spg, tps):
    """The video's ids (and the text before it) equal transformers' Qwen2_5_VLModel.get_rope_index on the same
    video; text after the video starts at the largest id + 1 (Qwen2.5-VL's original rule; transformers 5 restarts
    it at start + max(h', w'), inside the video's T range, so only the prefix is compared)."""
    cfg = _cfg(temporal_ids="absolute_time", tokens_per_second=float(tps))
    grid = torch.tensor([[5, 4, 6]])  # 5 groups of 2x3 merged tokens
    n_vid = 5 * 2 * 3
    ids = _ids(("t", 3), ("v", n_vid), ("t", 4))
    types = (ids == V).long()
    types[types == 1] = 2
    ours, _ = get_rope_index(ids, video_grid_thw=grid, config=cfg, second_per_grid_ts=torch.tensor([spg]))
    ref = _hf_qwen25_rope_index(ids, types, grid, torch.tensor([spg]), tps)
    torch.testing.assert_close(ours[:, :, :3 + n_vid], ref[:, :, :3 + n_vid], rtol=0, atol=0)
    start = int(ref[:, 0, :3 + n_vid].max()) + 1
    assert ours[:, 0, 3 + n_vid:].tolist() == [list(range(start, start + 4))] * 3


def test_position_rule_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"temporal_ids 'seconds' not in \('timestamps', 'absolute_time', 'none'\)"):
        RopeConfig(temporal_ids="seconds")
    with pytest.raises(ConfigError, match=r"spatial_ids 'centred' not in \('grid', 'diagonal'\)"):
        RopeConfig(spatial_ids="centred")
    with pytest.raises(ConfigError, match="temporal_stride 2.0 needs temporal_ids 'none'"):
        RopeConfig(temporal_stride=2.0)
    with pytest.raises(ConfigError, match="temporal_stride must be > 0"):
        RopeConfig(temporal_ids="none", temporal_stride=0.0)
    with pytest.raises(ConfigError, match="tokens_per_second must be > 0"):
        RopeConfig(tokens_per_second=-1.0)
    # a Qwen3-VL prompt (one run per group) under the one-run-per-video rule
    cfg = _cfg(temporal_ids="absolute_time")
    with pytest.raises(ValueError, match=r"run of 4 video pad tokens .*\(temporal_ids 'absolute_time'"):
        get_rope_index(_ids(("t", 1), ("v", 4), ("t", 1), ("v", 4)), video_grid_thw=torch.tensor([[2, 4, 4]]),
                       config=cfg)
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 entries for 1 videos"):
        get_rope_index(_ids(("v", 8)), video_grid_thw=torch.tensor([[2, 4, 4]]), config=cfg,
                       second_per_grid_ts=[1.0, 2.0])


def test_variants_are_reachable_from_hydra_model_overrides():
    """`model.text.rope.*` overrides (conf/model/*.yaml, the command line) reach the config, and are validated."""
    spec = ModelSpec(text={"rope": {"layout": "videorope", "mrope_section": [4, 6, 6], "temporal_ids": "none",
                                    "temporal_stride": 2, "spatial_ids": "diagonal"}})
    rope = model_config(spec).text.rope
    assert (rope.layout, rope.mrope_section, rope.temporal_ids, rope.temporal_stride, rope.spatial_ids) == \
        ("videorope", (4, 6, 6), "none", 2.0, "diagonal")
    with pytest.raises(ConfigError, match="temporal_ids 'bogus'"):
        model_config(ModelSpec(text={"rope": {"temporal_ids": "bogus"}}))
