"""Position ids (model/positions.py) and the rotary layout registry (model/rope.py).

Decode: the positions `generate` feeds for every new token equal what the prefill rule gives that token when the
whole sequence is run at once. Packing: a packed row's ids are each document's own ids, concatenated. Layouts: a
layout added through the registry round-trips through config.json and drives the rotary tables exactly as a
hand-written reference says; the built-in layouts keep the config.json spellings transformers reads and writes.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model import Qwen3VL, preset
from model.config import ConfigError, Qwen3VLConfig, RopeConfig
from model.positions import decode_position_ids, get_rope_index, pack_position_ids
from model.rope import ROTARY_LAYOUTS, TextRotary, rotary_layout
from tests.hf_reference import Sample, batch

CFG = preset("tiny")
SEED = 20260112  # fixed; every generator below is seeded from it


def _prompts(rng):
    return {
        "text_only": [Sample(rng).text(11)],
        "image": [Sample(rng).text(3).image(6, 10).text(4)],
        "video": [Sample(rng).text(2).video(3, 4, 6).text(2)],
        "left_padded_image_and_video": [Sample(rng).text(4).image(4, 8).text(2),
                                        Sample(rng).text(2).video(2, 6, 4).text(1).image(4, 4).text(3)],
    }


class _Recorder(torch.nn.Module):
    """Passes calls through to the model and keeps the position_ids of every decode step."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.seen = model, model.config, []

    def forward(self, input_ids, **kw):
        if kw.get("position_ids") is not None:
            self.seen.append(kw["position_ids"].clone())
        return self.model(input_ids, **kw)


@pytest.mark.parametrize("case", list(_prompts(torch.Generator().manual_seed(SEED))))
def test_decode_positions_equal_one_shot_positions(case):
    """generate's decode positions == get_rope_index over prompt + generated tokens, at each generated token."""
    from model.generation import generate

    print("seed", SEED)
    torch.manual_seed(SEED)
    model = Qwen3VL(CFG).eval()
    b = batch(_prompts(torch.Generator().manual_seed(SEED))[case])
    B, L = b["input_ids"].shape
    n_new = 5
    rec = _Recorder(model)
    out = generate(rec, b["input_ids"], b["attention_mask"], max_new_tokens=n_new, stop_token_ids=(),
                   **{k: v for k, v in b.items() if k not in ("input_ids", "attention_mask")})
    assert out.shape == (B, L + n_new) and len(rec.seen) == n_new - 1
    # the prefill rule on the whole sequence; generated tokens are text whatever their id (a random model may
    # emit a pad id, which the rule would read as an image), so give them a plain text id
    full = out.clone()
    full[:, L:] = 1000
    mask = torch.cat([b["attention_mask"], torch.ones(B, n_new, dtype=torch.long)], 1)
    one_shot, _ = get_rope_index(full, b.get("image_grid_thw"), b.get("video_grid_thw"), mask, config=CFG)
    for j, pos in enumerate(rec.seen):  # step j feeds generated token j at sequence index L + j
        assert pos.shape == (3, B, 1)
        assert torch.equal(pos[:, :, 0], one_shot[:, :, L + j]), f"decode step {j}"
    # and the rule itself, straight from the prefill deltas
    _, deltas = get_rope_index(b["input_ids"], b.get("image_grid_thw"), b.get("video_grid_thw"),
                               b["attention_mask"], config=CFG)
    for j in range(n_new):
        assert torch.equal(decode_position_ids(L + j, deltas)[:, :, 0], one_shot[:, :, L + j])


def test_packed_ids_equal_per_document_ids_concatenated():
    rng = torch.Generator().manual_seed(SEED + 1)
    docs = [Sample(rng).text(5).image(6, 4).text(3), Sample(rng).text(2), Sample(rng).video(2, 4, 4).text(4),
            Sample(rng).text(1).image(4, 8).image(8, 4).text(2)]
    alone = [get_rope_index(b["input_ids"], b.get("image_grid_thw"), b.get("video_grid_thw"), config=CFG)
             for b in map(lambda d: batch([d]), docs)]
    lens = [len(d.ids) for d in docs]
    ids = torch.cat([torch.tensor(d.ids) for d in docs])[None]
    img = torch.tensor([g for d in docs for g in d.img_grid])
    vid = torch.tensor([g for d in docs for g in d.vid_grid])
    # an empty document in the middle must not shift anything
    bounds = [0, lens[0], lens[0] + lens[1], lens[0] + lens[1], sum(lens[:3]), sum(lens)]
    cu = torch.tensor(bounds, dtype=torch.int32)
    packed, delta = get_rope_index(ids, img, vid, config=CFG, cu_seqlens=cu)
    expect = torch.cat([p[:, 0] for p, _ in alone], dim=1)
    assert torch.equal(packed[:, 0], expect)
    assert torch.equal(pack_position_ids([p[:, 0] for p, _ in alone]), packed)
    # positions restart at 0 in every document
    assert [int(packed[0, 0, s]) for s in (0, lens[0], sum(lens[:2]), sum(lens[:3]))] == [0, 0, 0, 0]
    # decoding continues the last document: same next position as the last document decoded alone
    T, last = sum(lens), lens[-1]
    assert torch.equal(decode_position_ids(T, delta), decode_position_ids(last, alone[-1][1]))


def test_prefill_rule_errors_name_the_problem():
    s = Sample(torch.Generator().manual_seed(SEED + 2)).text(2).image(4, 4).text(2).image(4, 8)
    ids = torch.tensor(s.ids)[None]
    with pytest.raises(ValueError, match="more runs of image pad tokens than image_grid_thw rows"):
        get_rope_index(ids, torch.tensor([[1, 4, 4]]), config=CFG)
    with pytest.raises(ValueError, match=r"a run of 8 image pad tokens does not match its grid \(t=1, h=4, w=4\)"):
        get_rope_index(ids, torch.tensor([[1, 4, 4], [1, 4, 4]]), config=CFG)
    with pytest.raises(ValueError, match="image_grid_thw has more rows"):
        get_rope_index(ids, torch.tensor([[1, 4, 4], [1, 4, 8], [1, 4, 4]]), config=CFG)
    with pytest.raises(ValueError, match="needs B == 1"):
        get_rope_index(torch.cat([ids, ids]), config=CFG, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------- layouts
@pytest.fixture
def reversed_layout():
    """A toy layout registered the way a researcher would: [W]*s_w [H]*s_h then T for the rest."""

    @rotary_layout("test_reversed")
    def reversed_chunks(section, n_freq):
        s_t, s_h, s_w = section
        axis = torch.zeros(n_freq, dtype=torch.long)
        axis[:s_w] = 2
        axis[s_w:s_w + s_h] = 1
        return axis

    yield "test_reversed"
    del ROTARY_LAYOUTS["test_reversed"]


def _reference_tables(pos: torch.Tensor, theta: float, head_dim: int, axis_of_slot):
    """cos/sin (B, L, head_dim) fp64, slot by slot: angle_i = pos[axis_of_slot(i)] * theta^(-2i/head_dim)."""
    n = head_dim // 2
    angles = torch.stack([pos[axis_of_slot(i)].double() * theta ** (-2 * i / head_dim) for i in range(n)], -1)
    emb = torch.cat([angles, angles], -1)
    return emb.cos().float(), emb.sin().float()


# The model's angles are fp32 products of size up to ~300 rad: one fp32 ulp there is ~3e-5, so the tables can
# differ from the fp64 reference by a few 1e-5; with theta 100 every slot turns >= 0.1 rad per position, so a
# wrong axis for any slot changes entries by O(0.1-1).
ANGLE_TOL = dict(rtol=0, atol=1e-4)


def test_registered_layout_round_trips_and_drives_the_tables(reversed_layout, tmp_path):
    rope = RopeConfig(theta=100.0, layout=reversed_layout, mrope_section=(6, 5, 5))
    cfg = CFG.replace(text=dataclasses.replace(CFG.text, rope=rope))
    hf = cfg.to_hf()
    assert hf["text_config"]["rope_scaling"] == {"rope_type": "default", "mrope_section": [6, 5, 5],
                                                 "mrope_layout": "test_reversed"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert Qwen3VLConfig.from_file(tmp_path) == cfg

    g = torch.Generator().manual_seed(SEED + 3)
    pos = torch.randint(0, 300, (3, 2, 13), generator=g)
    cos, sin = TextRotary(cfg.text)(pos, torch.float32)
    rc, rs = _reference_tables(pos, 100.0, 32, lambda i: 2 if i < 5 else (1 if i < 10 else 0))
    torch.testing.assert_close(cos, rc, **ANGLE_TOL)
    torch.testing.assert_close(sin, rs, **ANGLE_TOL)
    # and the layout matters: Qwen3-VL's interleaved tables differ for the same positions
    inter = dataclasses.replace(CFG.text, rope=RopeConfig(theta=100.0, mrope_section=(6, 5, 5)))
    assert not torch.allclose(TextRotary(inter)(pos, torch.float32)[0], cos)


def test_interleaved_tables_follow_the_qwen3_vl_rule():
    """The registered interleaved layout, slot by slot: H at i = 1 mod 3, W at i = 2 mod 3 within 3 * section."""
    g = torch.Generator().manual_seed(SEED + 4)
    pos = torch.randint(0, 300, (3, 1, 9), generator=g)
    # tiny: head_dim 32, section (6, 5, 5); a small theta keeps every slot's angle large enough to see its axis
    text = dataclasses.replace(CFG.text, rope=RopeConfig(theta=100.0, mrope_section=(6, 5, 5)))
    cos, sin = TextRotary(text)(pos, torch.float32)
    rc, rs = _reference_tables(pos, 100.0, 32,
                               lambda i: 1 if i % 3 == 1 and i < 15 else (2 if i % 3 == 2 and i < 15 else 0))
    torch.testing.assert_close(cos, rc, **ANGLE_TOL)
    torch.testing.assert_close(sin, rs, **ANGLE_TOL)


@pytest.mark.parametrize("fields,layout", [
    ({"mrope_section": [6, 5, 5], "mrope_interleaved": True}, "interleaved"),   # Qwen3-VL config.json
    ({"mrope_section": [6, 5, 5]}, "interleaved"),                              # transformers' Qwen3-VL default
    ({"mrope_interleaved": True}, "interleaved"),
    ({"mrope_section": [6, 5, 5], "mrope_interleaved": False}, "chunked"),
    ({}, "1d"),
    ({"mrope_interleaved": False}, "1d"),
], ids=["interleaved", "interleaved-no-flag", "interleaved-no-section", "chunked", "1d", "1d-flag-false"])
def test_builtin_layouts_read_from_config_json(fields, layout):
    d = CFG.to_hf()
    d["text_config"]["rope_scaling"] = {"rope_type": "default", **fields}
    if layout == "interleaved" and "mrope_section" not in fields:
        d["text_config"]["head_dim"] = 128  # the default section (24, 20, 20) needs 64 frequencies
    c = Qwen3VLConfig.from_hf(d)
    assert c.text.rope.layout == layout
    # written back in the first (transformers) spelling, and read again to the same config
    written = c.to_hf()["text_config"]["rope_scaling"]
    assert written == {"rope_type": "default", **{"interleaved": {"mrope_section": list(c.text.rope.mrope_section),
                                                                  "mrope_interleaved": True},
                                                  "chunked": {"mrope_section": [6, 5, 5], "mrope_interleaved": False},
                                                  "1d": {}}[layout]}
    assert Qwen3VLConfig.from_hf(c.to_hf()).text.rope.layout == layout


def test_unknown_layouts_raise(reversed_layout):
    registered = r"\('interleaved', 'chunked', 'videorope', '1d', 'test_reversed'\)"
    with pytest.raises(ConfigError, match=r"rope layout 'nope' not in " + registered):
        RopeConfig(layout="nope")
    d = CFG.to_hf()
    d["text_config"]["rope_scaling"] = {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_layout": "nope"}
    with pytest.raises(ConfigError, match="match no registered rotary layout"):
        Qwen3VLConfig.from_hf(d)
    with pytest.raises(ValueError, match="already registered"):
        rotary_layout("chunked")(lambda section, n: torch.zeros(n, dtype=torch.long))


def test_layout_without_section_skips_the_section_check():
    @rotary_layout("test_all_h", uses_section=False)
    def all_h(section, n_freq):
        return torch.ones(n_freq, dtype=torch.long)

    try:
        text = dataclasses.replace(CFG.text, rope=RopeConfig(layout="test_all_h", mrope_section=(1, 1, 1)))
        cfg = CFG.replace(text=text)
        assert cfg.to_hf()["text_config"]["rope_scaling"] == {"rope_type": "default", "mrope_layout": "test_all_h"}
        assert Qwen3VLConfig.from_hf(cfg.to_hf()).text.rope.layout == "test_all_h"
        pos = torch.randint(0, 50, (3, 1, 4), generator=torch.Generator().manual_seed(SEED + 5))
        h_only = pos[1:2].expand(3, 1, 4)  # every slot reads H: T and W must not matter
        for a, b in zip(TextRotary(text)(pos, torch.float32), TextRotary(text)(h_only, torch.float32)):
            assert torch.equal(a, b)
    finally:
        del ROTARY_LAYOUTS["test_all_h"]
