"""Model features beyond the transformers parity suite: the Triton attention backend inside the model, sampling
filters (vs transformers' logits warpers), and the chunked (Qwen2.5-VL) MRoPE layout. (Activation checkpointing,
applied from outside the model, is tested in tests/test_train_parallel.py.)"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model import Qwen3VL, preset
from model.generation import process_logits
from tests.hf_reference import Sample, batch


def _pair(**cfg):
    torch.manual_seed(0)
    c = preset("tiny", **cfg)
    a = Qwen3VL(c)
    b = Qwen3VL(c.replace(attn_backend="triton"))
    b.load_state_dict(a.state_dict())
    return a, b


def _loss_and_grads(m, b):
    m.zero_grad()
    out = m(**b).logits
    loss = out.float().square().mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


# The two tests below run the kernels through the Triton interpreter on CPU tensors (tests/conftest.py sets
# TRITON_INTERPRET only where there is no CUDA device); on a GPU machine the same kernels are checked at full size
# in tests/test_attention_kernel.py.
_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton-interpreter test (CPU tensors)")


@_CPU_ONLY
def test_triton_backend_in_model_matches_torch_fp32():
    """Vision per-frame segments (non-causal varlen) and the causal decoder through kernels.attention
    (Triton interpreter on CPU, fp32): same logits and gradients as SDPA. fp32 tolerance 1e-4 (fp32 dots in a
    different order, then through 3 + 4 layers and the backward)."""
    ref, tri = _pair()
    rng = torch.Generator().manual_seed(1)
    b = batch([Sample(rng).text(5).video(2, 4, 4).text(3)])
    b.pop("attention_mask")
    o1, g1 = _loss_and_grads(ref, b)
    o2, g2 = _loss_and_grads(tri, b)
    torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-4)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-3, atol=1e-5, msg=n)


@_CPU_ONLY
def test_triton_backend_under_autocast_matches_torch():
    """fp32 master weights + autocast (the training setup): the vision tower's fp32 RoPE outputs meet the
    autocast-dtype v, and the Triton backend must run them in the autocast dtype as SDPA does (fp16 here: the CPU
    interpreter cannot do bf16 dots). Same logits within fp16 tolerance."""
    ref, tri = _pair()
    rng = torch.Generator().manual_seed(3)
    b = batch([Sample(rng).text(4).image(4, 4).text(3)])
    b.pop("attention_mask")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        o1 = ref(**b).logits.float()
        o2 = tri(**b).logits.float()
    assert torch.isfinite(o2).all()
    rel = (o2 - o1).norm() / o1.norm()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.6, 20, 0.9)])
def test_sampling_filters_match_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(3, 1000) * 3
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    ref = procs(None, logits.clone())
    out = process_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    keep = ~torch.isinf(ref)
    torch.testing.assert_close(out[keep], ref[keep])


def test_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(0)
    m = Qwen3VL(preset("tiny")).eval()
    ids = torch.randint(1000, 5000, (2, 7))
    g = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    a = m.generate(ids, max_new_tokens=6, do_sample=True, top_k=3, generator=g(), stop_token_ids=())
    b = m.generate(ids, max_new_tokens=6, do_sample=True, top_k=3, generator=g(), stop_token_ids=())
    assert torch.equal(a, b)
    # every sampled token is among the top 3 of its step's logits
    with torch.no_grad():
        logits = m(a[:, :-1]).logits[:, ids.shape[1] - 1:]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == a[:, ids.shape[1]:, None]).any(-1).all()


def test_chunked_mrope_layout_matches_qwen2_5_vl():
    """Our "chunked" layout equals transformers' Qwen2.5-VL rotary (sections [16, 24, 24], theta 1e6)."""
    import transformers
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    from model.config import RopeConfig, TextConfig
    from model.rope import TextRotary

    hf_cfg = transformers.Qwen2_5_VLTextConfig(
        hidden_size=2048, num_attention_heads=16, num_key_value_heads=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    ref = Qwen2_5_VLRotaryEmbedding(hf_cfg)
    cfg = TextConfig(rope=RopeConfig(theta=1e6, layout="chunked", mrope_section=(16, 24, 24)))
    pos = torch.randint(0, 500, (3, 2, 11))
    rc, rs = ref(torch.randn(2, 11, 8), pos)
    oc, os_ = TextRotary(cfg)(pos, torch.float32)
    torch.testing.assert_close(oc, rc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(os_, rs, rtol=1e-6, atol=1e-6)


def test_plain_1d_rope_ablation_ignores_h_and_w():
    from model.config import RopeConfig
    from model.rope import TextRotary

    cfg = dataclasses.replace(preset("tiny").text, rope=RopeConfig(layout="1d", mrope_section=(6, 5, 5)))
    rot = TextRotary(cfg)
    pos = torch.randint(0, 100, (3, 1, 9))
    pos_t = pos[:1].expand(3, 1, 9)
    for a, b in zip(rot(pos, torch.float32), rot(pos_t, torch.float32)):
        assert torch.equal(a, b)


def test_mismatched_vision_inputs_raise_clear_errors():
    torch.manual_seed(0)
    m = Qwen3VL(preset("tiny")).eval()
    b = batch([Sample(torch.Generator().manual_seed(3)).text(3).image(4, 6).text(2)])
    with pytest.raises(ValueError, match=r"6 <\|image_pad\|> tokens but the image grids give 4 features"):
        m(b["input_ids"], pixel_values=b["pixel_values"][:16], image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="no pixel_values were given"):
        m(b["input_ids"])
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        m(b["input_ids"], pixel_values=b["pixel_values"][:15], image_grid_thw=torch.tensor([[1, 3, 5]]))
    with pytest.raises(ValueError, match="pixel_values must be"):
        m(b["input_ids"], pixel_values=b["pixel_values"][:, :100], image_grid_thw=b["image_grid_thw"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[5, 10**6]]))


@pytest.mark.parametrize("causal", [True, False])
def test_attend_many_documents_masked_path_equals_per_document(causal):
    """> 16 packed documents take the single block-diagonal masked SDPA call; it must equal per-document calls."""
    from model.attention import attend
    from model.masks import AttentionMask

    lengths = torch.randint(1, 12, (23,)).tolist()
    T = sum(lengths)
    q, k, v = torch.randn(T, 4, 16), torch.randn(T, 2, 16), torch.randn(T, 2, 16)
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    out = attend(q, k, v, AttentionMask(causal=causal, cu_seqlens=cu))
    ref = torch.cat([attend(qi[None], ki[None], vi[None], AttentionMask(causal=causal))[0]
                     for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_triton_backend_inside_torch_compile():
    """attn_backend=triton under torch.compile: the kernels are custom ops, so the whole call compiles as one graph
    (fullgraph=True fails on any graph break) through AOTAutograd (fake shapes, registered backward); packed with
    max_seqlen as the model passes it, outputs and gradients equal the eager torch backend's."""
    from model.attention import attend
    from model.masks import AttentionMask

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (tests/conftest.py)
    cu = torch.tensor([0, 5, 14], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(14, h, 16, device=dev) for h in (4, 2, 2))

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.square().sum().backward()
        return [out.detach()] + [x.grad for x in leaves]

    compiled = torch.compile(lambda q, k, v: attend(q, k, v, AttentionMask(causal=True, cu_seqlens=cu, max_seqlen=9),
                                                    backend="triton") * 2, backend="aot_eager", fullgraph=True)
    got = run(compiled)
    ref = run(lambda q, k, v: attend(q, k, v, AttentionMask(causal=True, cu_seqlens=cu), backend="torch") * 2)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
