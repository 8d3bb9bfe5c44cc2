"""End to end: our processor -> our model equals transformers' processor -> transformers' model.

A real conversation (an odd-sized image file and a synthetic mp4 written with PyAV) goes through
`load_processor(None)` (embedded tokenizer, official budgets) into `load_pretrained` of a tiny random transformers
checkpoint, and through transformers' `Qwen3VLProcessor` (official preprocessor settings, a Qwen2 tokenizer built
from the same ranks) into transformers' model. fp32, rtol = atol = 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model import load_pretrained, load_processor
from tests.hf_reference import hf_model, hf_tiny_config
from tests.test_processing import hf_proc, hf_video_inputs  # noqa: F401  (fixture)
from tests.test_video import write_video


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    hf = hf_model(hf_tiny_config(64), seed=3)
    hf.save_pretrained(d)
    return hf, load_pretrained(d)


@pytest.mark.parametrize("layout", ["transformers5", "release"])
def test_processor_to_model_matches_transformers(models, hf_proc, tmp_path, layout):  # noqa: F811
    from model.processing import Qwen3VLProcessor

    hf, ours = models
    proc = Qwen3VLProcessor(load_processor(None).tokenizer, video_layout=layout)
    img_path = tmp_path / "page.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (77, 131, 3), dtype=np.uint8)).save(img_path)
    vid_path = write_video(tmp_path / "clip.mp4", 90, 58, 25, 2.2, "libx264")
    conv = [{"role": "user", "content": [
        {"type": "image", "image": str(img_path)},
        {"type": "video", "video": vid_path, "fps": 2.0},
        {"type": "text", "text": "What is written on the page, and what happens in the clip?"}]}]
    ours_in = proc(messages=[conv], add_generation_prompt=True)

    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    frames, meta = hf_video_inputs(hf_proc, vid_path)
    ref_in = hf_proc(text=[text], images=[Image.open(img_path).convert("RGB")], videos=[frames],
                     video_metadata=[meta], do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt")
    assert torch.equal(ours_in["image_grid_thw"], ref_in["image_grid_thw"])
    assert torch.equal(ours_in["video_grid_thw"], ref_in["video_grid_thw"])
    n_groups = int(ref_in["video_grid_thw"][0, 0])
    assert n_groups >= 2  # several temporal groups, each with its timestamp text
    with torch.no_grad():
        ref = hf(**ref_in).logits[0, -1]
        out = ours(**{k: v for k, v in ours_in.items() if k != "mm_token_type_ids"}).logits[0, -1]
    if layout == "transformers5":
        assert ours_in["input_ids"].tolist() == ref_in["input_ids"].tolist()
    else:  # release layout: 2 tokens shorter per video (no outer vision_start / vision_end), different logits
        assert ours_in["input_ids"].shape[1] == ref_in["input_ids"].shape[1] - 2
    if layout == "transformers5":
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        # the release layout is what vLLM / transformers 4.57 feed: check against transformers on the same ids
        tt = torch.zeros_like(ours_in["input_ids"])
        tt[ours_in["input_ids"] == 151655], tt[ours_in["input_ids"] == 151656] = 1, 2
        with torch.no_grad():
            ref_same = hf(**{k: v for k, v in ours_in.items() if k != "mm_token_type_ids"},
                          mm_token_type_ids=tt).logits[0, -1]
        torch.testing.assert_close(out, ref_same, rtol=1e-5, atol=1e-5)
