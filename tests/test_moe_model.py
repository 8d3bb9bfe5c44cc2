"""Qwen3-VL-MoE end to end against transformers: checkpoints saved by transformers 5 (their [E, 2I, H] expert
layout), logits (text, image, video), greedy generation, aux loss, save -> transformers round trip, layout errors.
Tolerances: fp32, rtol = atol = 1e-5 (same math, different op order)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model import load_pretrained, save_pretrained
from model.checkpoint import CheckpointError
from model.moe import load_balancing_loss
from tests.hf_reference import PAD, Sample, batch, hf_inputs, hf_model, hf_tiny_config

FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("hfmoe")
    hf = hf_model(hf_tiny_config(72, moe=True), seed=1)
    hf.save_pretrained(d)
    return hf, load_pretrained(d), d


@pytest.mark.parametrize("case", ["text", "image", "video", "batch_left_padded"])
def test_moe_logits_and_aux_loss_match(pair, case):
    hf, ours, _ = pair
    rng = torch.Generator().manual_seed(len(case))
    samples = {"text": [Sample(rng).text(17)],
               "image": [Sample(rng).text(3).image(6, 10).text(4)],
               "video": [Sample(rng).text(2).video(3, 4, 4).text(3)],
               "batch_left_padded": [Sample(rng).text(3).image(4, 4).text(8), Sample(rng).video(2, 4, 6).text(1)]}[case]
    b = batch(samples)
    mask = b["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**hf_inputs(b), output_router_logits=True)
        out = ours(**b)
    torch.testing.assert_close(out.logits[mask], ref.logits[mask], **FP32)
    assert len(out.router_logits) == 3
    aux = load_balancing_loss(out.router_logits, ours.config.text.moe.num_experts_per_tok, b["attention_mask"])
    torch.testing.assert_close(aux, ref.aux_loss, **FP32)


def test_moe_greedy_generation_token_identical(pair):
    hf, ours, _ = pair
    rng = torch.Generator().manual_seed(9)
    b = batch([Sample(rng).text(3).image(4, 6).text(2), Sample(rng).text(6)])
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(b), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=PAD,
                          eos_token_id=None)
        out = ours.generate(**b, max_new_tokens=20, stop_token_ids=())
    assert torch.equal(out, ref)


def test_moe_save_official_layout_then_transformers_load(pair, tmp_path):
    import transformers

    hf, ours, _ = pair
    save_pretrained(ours, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    E, H, I = 4, 64, 48
    assert sd["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (E, H, 2 * I)  # official
    assert sd["model.language_model.layers.0.mlp.experts.down_proj"].shape == (E, I, H)
    theirs = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path).eval()
    b = batch([Sample(torch.Generator().manual_seed(2)).text(4).image(4, 4).text(2)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(**hf_inputs(b)).logits, hf(**hf_inputs(b)).logits, rtol=0, atol=0)
    again = load_pretrained(tmp_path)
    for (k, a), (_, c) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, c), k


def test_ambiguous_expert_layout_needs_a_hint(tmp_path):
    """With H == 2I, [E, H, 2I] and [E, 2I, H] have the same shape: refuse without moe_layout."""
    import transformers

    cfg = hf_tiny_config(64, moe=True)
    cfg.text_config.moe_intermediate_size = 32  # 2I == H == 64
    hf = transformers.Qwen3VLMoeForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="moe_layout"):
        load_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, moe_layout="transformers")
    b = batch([Sample(torch.Generator().manual_seed(4)).text(9)])
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, hf(**hf_inputs(b)).logits, **FP32)
    # the wrong hint is caught by the (unambiguous) down_proj shape
    with pytest.raises(CheckpointError, match=r"down_proj: shape \(4, 64, 32\) does not fit moe_layout='official'"):
        load_pretrained(tmp_path, moe_layout="official")


def test_moe_model_with_triton_experts_matches_torch_experts(pair):
    """The decoder wiring of moe_backend="triton" (grouped-expert kernels, CPU interpreter, fp32)."""
    _, ours, d = pair
    tri = load_pretrained(d, moe_backend="triton")
    assert tri.config.text.moe.backend == "triton"
    b = batch([Sample(torch.Generator().manual_seed(12)).text(5).image(4, 4).text(4)])
    with torch.no_grad():
        torch.testing.assert_close(tri(**b).logits, ours(**b).logits, rtol=1e-5, atol=1e-5)
