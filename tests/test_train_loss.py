"""Chunked linear cross-entropy (train/loss.py) vs a full-logits fp32 reference: values and gradients."""
import pytest
import torch

from train.loss import IGNORE_INDEX, chunked_cross_entropy, reference_cross_entropy


# fp32 on CPU: the chunked path does the same matmuls in a different grouping; 1e-5 relative covers reordering.
@pytest.mark.parametrize("n,vocab,dim,chunk", [(1, 50, 8, 4), (131, 1000, 24, 32), (257, 3001, 72, 1000)],
                         ids=["n1", "n131-chunk32", "n257-chunk-gt-n"])
def test_chunked_ce_matches_reference(n, vocab, dim, chunk):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(2, n, dim, generator=g, requires_grad=True)
    w = (torch.randn(vocab, dim, generator=g) * 0.2).requires_grad_()
    y = torch.randint(0, vocab, (2, n), generator=g)
    y[torch.rand(2, n, generator=g) < 0.3] = IGNORE_INDEX
    y[0, 0] = 3  # at least one target
    gl = torch.rand(int((y != IGNORE_INDEX).sum()), generator=g)  # non-uniform upstream grads

    out = chunked_cross_entropy(h, w, y, chunk_size=chunk)
    (out * gl).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = reference_cross_entropy(h, w, y)
    (ref * gl).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)
    assert bool((gh[y == IGNORE_INDEX] == 0).all())  # ignored positions get no gradient


def test_chunked_ce_rejects_out_of_range_labels():
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="labels outside"):
        chunked_cross_entropy(h, w, torch.tensor([1, 10, 2]))


def test_fused_elementwise_stages_equal_the_eager_ones():
    """The two stages that CUDA runs compiled (`_lse_and_loss`, `_dlogits`), run eagerly here, equal
    F.cross_entropy and its gradient (on a GPU the next test also runs the compiled path end to end)."""
    from train.loss import _dlogits, _lse_and_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 37, generator=g, requires_grad=True)
    y = torch.randint(0, 37, (5,), generator=g)
    up = torch.rand(5, generator=g)
    lse, loss = _lse_and_loss(logits.detach(), y)
    ref = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(lse, torch.logsumexp(logits.detach(), -1))
    (ref * up).sum().backward()
    torch.testing.assert_close(_dlogits(logits.detach(), lse, y, up), logits.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled (fused) path runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ce_fused_cuda_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    n, vocab, dim = 300, 5003, 64
    h = torch.randn(n, dim, generator=g).cuda().to(dtype).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) * 0.2).cuda().to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g).cuda()
    gl = torch.rand(n, generator=g).cuda()
    out = chunked_cross_entropy(h, w, y, chunk_size=128)
    (out * gl).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = reference_cross_entropy(h32, w32, y)
    (ref * gl).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gh.float(), h32.grad, **tol)
    torch.testing.assert_close(gw.float(), w32.grad, **tol)


@pytest.mark.parametrize("chunk", [0, -4])
def test_chunked_ce_rejects_nonpositive_chunk_size(chunk):
    h, w = torch.randn(5, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, torch.randint(0, 11, (5,)), chunk)


def test_export_refuses_nonfinite_weights(tmp_path):
    from model import Qwen3VL, preset
    from train.config import Config
    from train.export import export

    torch.manual_seed(0)
    m = Qwen3VL(preset("tiny"))
    with torch.no_grad():
        m.model.language_model.norm.weight[0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        export(m, tmp_path / "final", Config())
    assert not (tmp_path / "final" / "model.safetensors").exists()
