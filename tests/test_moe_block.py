"""MoE block parity: `model.moe.SparseMoeBlock` and `load_balancing_loss` against transformers' Qwen3-VL-MoE.

Tolerances: fp32 on CPU, both sides do the same matmuls in a different order (we sort tokens by expert and
accumulate in fp32), so ~1e-5 relative. The Triton backend runs through TRITON_INTERPRET=1 on CPU (tiny shapes).
"""
import pytest
import torch

from model.moe import MoEConfig, SparseMoeBlock, load_balancing_loss, route, router_stats

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf_moe  # noqa: E402

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _hf_config(hidden=40, experts=6, top_k=2, inter=24):
    return transformers.Qwen3VLMoeTextConfig(
        hidden_size=hidden, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
        vocab_size=97)


def _pair(hidden, experts, top_k, inter, backend="torch"):
    """Our block and transformers' block with the same random weights (experts transposed to the HF layout)."""
    hf_block = hf_moe.Qwen3VLMoeTextSparseMoeBlock(_hf_config(hidden, experts, top_k, inter)).eval()
    ours = SparseMoeBlock(hidden, MoEConfig(experts, top_k, inter, backend=backend)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)  # large enough that routing and SwiGLU are far from linear
        hf_block.gate.weight.copy_(ours.gate.weight)
        hf_block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj.transpose(1, 2))  # [E, H, 2I] -> [E, 2I, H]
        hf_block.experts.down_proj.copy_(ours.experts.down_proj.transpose(1, 2))        # [E, I, H] -> [E, H, I]
    return ours, hf_block


def _hf_router_logits(hf_block, x):
    captured = []
    handle = hf_block.gate.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    y = hf_block(x)
    handle.remove()
    return y, captured[0]


@pytest.mark.parametrize("B,L,H,E,k,I", [(2, 13, 40, 6, 2, 24), (1, 1, 40, 6, 2, 24), (3, 37, 72, 16, 8, 40),
                                         (1, 29, 32, 5, 1, 48)],
                         ids=["b2-l13-k2", "single-token", "b3-l37-e16-k8", "k1"])
def test_block_matches_transformers(B, L, H, E, k, I):
    torch.manual_seed(0)
    ours, hf_block = _pair(H, E, k, I)
    x = torch.randn(B, L, H)
    y, logits = ours(x)
    y_ref, logits_ref = _hf_router_logits(hf_block, x)
    assert logits.dtype == torch.float32 and logits.shape == (B * L, E)
    torch.testing.assert_close(logits, logits_ref.float(), **FP32_TOL)
    torch.testing.assert_close(y, y_ref, **FP32_TOL)


def test_block_backward_matches_transformers():
    torch.manual_seed(1)
    ours, hf_block = _pair(48, 8, 2, 32)
    ours.train(), hf_block.train()
    x = torch.randn(2, 19, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 19, 48)
    (ours(x)[0] * g).sum().backward()
    (hf_block(x_ref) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **FP32_TOL)
    torch.testing.assert_close(ours.gate.weight.grad, hf_block.gate.weight.grad, **FP32_TOL)
    torch.testing.assert_close(ours.experts.gate_up_proj.grad, hf_block.experts.gate_up_proj.grad.transpose(1, 2),
                               **FP32_TOL)
    torch.testing.assert_close(ours.experts.down_proj.grad, hf_block.experts.down_proj.grad.transpose(1, 2),
                               **FP32_TOL)


def test_routing_always_renormalises():
    torch.manual_seed(2)
    logits = torch.randn(31, 10) * 3
    w, ids = route(logits, 3, torch.float32)
    probs = logits.softmax(-1)
    torch.testing.assert_close(w, probs.gather(1, ids) / probs.gather(1, ids).sum(-1, keepdim=True))
    torch.testing.assert_close(w.sum(-1), torch.ones(31))
    assert (ids == probs.topk(3, -1).indices).all()


@pytest.mark.parametrize("use_mask", [True, False], ids=["left-padding", "no-mask"])
def test_load_balancing_loss_matches_transformers(use_mask):
    torch.manual_seed(3)
    B, L, E, k, layers = 3, 11, 8, 2, 4
    logits = tuple(torch.randn(B * L, E) * 2 for _ in range(layers))
    mask = None
    if use_mask:
        mask = torch.ones(B, L, dtype=torch.long)
        mask[0, :4] = 0  # left padding
        mask[2, :7] = 0
    ours = load_balancing_loss(logits, k, mask)
    ref = hf_moe.load_balancing_loss_func(logits, E, k, mask)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)


def test_load_balancing_loss_ignores_padding():
    """Changing the logits of padded rows must not change the loss."""
    torch.manual_seed(4)
    logits = torch.randn(2 * 9, 6)
    mask = torch.ones(2, 9)
    mask[1, :5] = 0
    other = logits.clone()
    other[9:14] = torch.randn(5, 6) * 10
    torch.testing.assert_close(load_balancing_loss((logits,), 2, mask), load_balancing_loss((other,), 2, mask))
    assert not torch.allclose(load_balancing_loss((logits,), 2, None), load_balancing_loss((other,), 2, None))


def test_router_stats_counts():
    logits = torch.full((4, 5), -5.0)
    logits[:, 0] = 3.0  # every token picks expert 0 first
    logits[:2, 1] = 2.0  # tokens 0, 1 pick expert 1 second; tokens 2, 3 tie-break among the rest
    logits[2:, 4] = 2.0
    s = router_stats(logits, 2)
    torch.testing.assert_close(s["load"], torch.tensor([0.5, 0.25, 0.0, 0.0, 0.25]))
    assert s["max_load"] == 0.5 and s["min_load"] == 0.0 and s["dead_experts"] == 2
    assert s["max_over_mean"] == pytest.approx(2.5)


def test_is_sparse_and_validation():
    cfg = MoEConfig(8, 2, 16, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [cfg.is_sparse(i) for i in range(6)] == [False, True, False, False, False, True]
    hf = _hf_config()
    hf.decoder_sparse_step, hf.mlp_only_layers = 2, [3]
    ref = [(i not in hf.mlp_only_layers) and (hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0)
           for i in range(6)]
    assert [cfg.is_sparse(i) for i in range(6)] == ref
    with pytest.raises(ValueError, match="backend"):
        MoEConfig(8, 2, 16, backend="cuda")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEConfig(4, 5, 16)
    with pytest.raises(ValueError, match="shape"):
        SparseMoeBlock(16, MoEConfig(4, 2, 8))(torch.randn(3, 15))


def _backend_pair(H: int = 32, E: int = 6, k: int = 2, I: int = 24):
    """(device, H, torch-backend block, triton-backend block with the same weights)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    block_t = SparseMoeBlock(H, MoEConfig(E, k, I, backend="torch")).to(dev)
    block_k = SparseMoeBlock(H, MoEConfig(E, k, I, backend="triton")).to(dev)
    block_k.load_state_dict(block_t.state_dict())
    return dev, H, block_t, block_k


def test_triton_backend_matches_torch():
    """Same block, backend "triton" (kernels.moe; interpreter on CPU) vs "torch", forward and backward, fp32."""
    pytest.importorskip("triton")
    torch.manual_seed(5)
    dev, H, block_t, block_k = _backend_pair()
    x = torch.randn(2, 9, H, device=dev)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(2, 9, H, device=dev)
    y1, l1 = block_t(x1)
    y2, l2 = block_k(x2)
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(y2, y1, **FP32_TOL)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **FP32_TOL)
    for (name, p1), p2 in zip(block_t.named_parameters(), block_k.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, **FP32_TOL, msg=lambda m: f"{name}: {m}")


def test_triton_backend_under_autocast():
    """fp32 master weights + autocast (fp16 here: the CPU interpreter cannot do bf16 dots): both backends agree."""
    pytest.importorskip("triton")
    torch.manual_seed(6)
    dev, H, block_t, block_k = _backend_pair()
    x = torch.randn(3, 7, H, device=dev)
    with torch.autocast(dev, dtype=torch.float16):
        y_t, _ = block_t(x)
        y_k, _ = block_k(x)
    assert y_k.dtype == y_t.dtype == torch.float32  # x's dtype, as transformers' block under autocast
    # both round x, weights and per-expert outputs to fp16 (unit roundoff 4.9e-4); summation orders differ
    torch.testing.assert_close(y_k, y_t, rtol=2e-3, atol=2e-3)
    y_k.sum().backward()
    assert block_k.experts.gate_up_proj.grad.dtype == torch.float32


def test_triton_backend_inside_torch_compile():
    """moe_backend=triton under torch.compile(fullgraph=True): the kernels are custom ops (fake shapes, registered
    autograd), so dynamo traces the whole block without a graph break; forward and backward equal the torch backend.
    backend="aot_eager" traces forward and backward through AOTAutograd without needing a C++ toolchain."""
    pytest.importorskip("triton")
    torch.manual_seed(7)
    dev, H, block_t, block_k = _backend_pair()
    x = torch.randn(3, 7, H, device=dev)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_t, _ = block_t(x1)
    y_k, _ = torch.compile(block_k, backend="aot_eager", fullgraph=True)(x2)
    torch.testing.assert_close(y_k, y_t, **FP32_TOL)
    g = torch.randn_like(y_t)
    (y_t * g).sum().backward()
    (y_k * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **FP32_TOL)
    for (name, p1), p2 in zip(block_t.named_parameters(), block_k.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, **FP32_TOL, msg=lambda m: f"{name}: {m}")
