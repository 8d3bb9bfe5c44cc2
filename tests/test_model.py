"""Dense Qwen3-VL against transformers (the oracle): tiny random checkpoints written by transformers'
`save_pretrained`, loaded with our `load_pretrained`; logits, position ids, vision/DeepStack features, generation.

Tolerances: fp32 on CPU, rtol = atol = 1e-5 (both sides run the same math in a different op order; observed
differences are ~1e-6). bf16 vs the fp32 reference: relative Frobenius error <= 2e-2 (bf16 has an 8-bit mantissa,
~4e-3 per rounding, accumulated over a few layers).
"""
from __future__ import annotations

import zlib

import pytest
import torch

from model import load_pretrained, save_pretrained
from model.positions import get_rope_index
from tests.hf_reference import PAD, Sample, batch, hf_inputs, hf_model, hf_tiny_config

FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=[64, 72], ids=["vision_d64-single_file", "vision_d72-sharded"])
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained output)."""
    d = tmp_path_factory.mktemp(f"hf{request.param}")
    hf = hf_model(hf_tiny_config(request.param), seed=request.param)
    # d72: shard so the index.json path is exercised (the embeddings alone are ~39 MB)
    hf.save_pretrained(d, max_shard_size="20MB" if request.param == 72 else "10GB")
    files = sorted(p.name for p in d.iterdir())
    assert ("model.safetensors.index.json" in files) == (request.param == 72), files
    return hf, load_pretrained(d), d


def _cases(rng):
    S = lambda: Sample(rng)  # noqa: E731
    return {
        "text_only": [S().text(23)],
        "one_nonsquare_image": [S().text(5).image(6, 10).text(7)],
        "two_images": [S().text(3).image(4, 4).text(2).image(8, 6).text(4)],
        "video_3_groups": [S().text(4).video(3, 4, 6).text(5)],
        "image_and_video": [S().text(2).video(2, 6, 4).text(3).image(4, 8).text(3)],
        "batch2_left_padding": [S().text(4).image(6, 4).text(9), S().text(2).video(2, 4, 4).text(1)],
    }


CASES = list(_cases(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("case", CASES)
def test_logits_and_positions_match_transformers(pair, case):
    hf, ours, _ = pair
    seed = zlib.crc32(case.encode())  # stable across processes, unlike hash(str)
    print(f"seed {seed}")
    rng = torch.Generator().manual_seed(seed)
    b = batch(_cases(rng)[case])
    hb = hf_inputs(b)
    mask = b["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**hb).logits
        out = ours(**b)
    torch.testing.assert_close(out.logits[mask], ref[mask], **FP32)
    # position ids: exactly the reference's (at the real tokens; padding is 0 on our side)
    pos, _ = get_rope_index(b["input_ids"], b.get("image_grid_thw"), b.get("video_grid_thw"), b["attention_mask"],
                            config=ours.config)
    if "image_grid_thw" in b or "video_grid_thw" in b:
        ref_pos, _ = hf.model.get_rope_index(b["input_ids"], mm_token_type_ids=hb["mm_token_type_ids"],
                                             image_grid_thw=b.get("image_grid_thw"),
                                             video_grid_thw=b.get("video_grid_thw"),
                                             attention_mask=b["attention_mask"])
        assert torch.equal(pos[:, mask], ref_pos[:, mask])
    else:
        assert torch.equal(pos[0, 0], torch.arange(b["input_ids"].shape[1]))


@pytest.mark.parametrize("kind", ["image", "video", "repeated_sizes"])
def test_vision_and_deepstack_features_match(pair, kind):
    """repeated_sizes: a packed training batch repeats grid sizes (position tables are built once per size and
    gathered per image), interleaved so the gather order matters."""
    hf, ours, _ = pair
    rng = torch.Generator().manual_seed(7)
    s = {"image": lambda: Sample(rng).image(6, 10).image(4, 8),
         "video": lambda: Sample(rng).video(3, 8, 6),
         "repeated_sizes": lambda: Sample(rng).image(4, 8).image(6, 4).image(4, 8).image(4, 8).image(6, 4)}[kind]()
    px = torch.cat(s.img_px or s.vid_px)
    grid = torch.tensor(s.img_grid or s.vid_grid)
    with torch.no_grad():
        ref = hf.model.get_image_features(px, grid, return_dict=True)
        feats, deepstack = ours.model.visual(px, grid)
    torch.testing.assert_close(feats, torch.cat(ref.pooler_output), **FP32)
    assert len(deepstack) == len(ref.deepstack_features) == 2
    for mine, theirs in zip(deepstack, ref.deepstack_features):
        torch.testing.assert_close(mine, torch.cat(theirs), **FP32)


def test_greedy_generation_matches_transformers_batched_left_padded(pair):
    hf, ours, _ = pair
    rng = torch.Generator().manual_seed(3)
    b = batch([Sample(rng).text(3).image(4, 6).text(5), Sample(rng).text(2).video(2, 4, 4).text(2)])
    assert (b["attention_mask"] == 0).any()  # really left padded
    n_new = 24
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(b), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          pad_token_id=PAD, eos_token_id=None)
        out = ours.generate(**b, max_new_tokens=n_new, stop_token_ids=())
    assert out.shape == ref.shape == (2, b["input_ids"].shape[1] + n_new)
    assert torch.equal(out, ref)


def test_save_then_transformers_load_and_our_load(pair, tmp_path):
    import transformers

    hf, ours, _ = pair
    save_pretrained(ours, tmp_path / "ours", max_shard_size="15MB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    # ours -> ours: bit-exact
    again = load_pretrained(tmp_path / "ours")
    a, b2 = ours.state_dict(), again.state_dict()
    assert a.keys() == b2.keys()
    for k in a:
        assert torch.equal(a[k], b2[k]), k
    # ours -> transformers: identical logits
    theirs = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    rng = torch.Generator().manual_seed(5)
    b = batch([Sample(rng).text(4).image(4, 6).text(3)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(**hf_inputs(b)).logits, hf(**hf_inputs(b)).logits, rtol=0, atol=0)


def test_bf16_agrees_with_fp32_reference(pair):
    hf, _, d = pair
    ours16 = load_pretrained(d, dtype=torch.bfloat16)
    assert ours16.lm_head.weight.dtype == torch.bfloat16
    rng = torch.Generator().manual_seed(11)
    b = batch([Sample(rng).text(6).image(6, 4).text(6)])
    with torch.no_grad():
        ref = hf(**hf_inputs(b)).logits
        out = ours16(**b).logits.float()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 2e-2, f"bf16 relative error {rel:.3e}"
