"""kernels.moe.moe_experts (Triton grouped-expert SwiGLU) vs the plain-PyTorch fp32 reference, forward and backward.

CPU runs go through TRITON_INTERPRET=1 (set by conftest.py) at tiny shapes in fp32 and fp16 (bf16 tl.dot is
wrong in the interpreter); the GPU cases run the 30B-A3B layer shape in bf16.

Tolerances, as relative L2 error ||out - ref|| / ||ref|| against the fp32 reference:
  fp32 1e-5 (interpreter: exact fp32 products, only the summation order differs; GPU: "ieee" tl.dot),
  fp16 3e-3 (inputs, gu, h, dgu and the per-row outputs are rounded to fp16, unit roundoff 4.9e-4),
  bf16 1.5e-2 (the same roundings at bf16's 3.9e-3).
plus a max-abs check at 10x that level, relative to the largest reference value, so a single bad row fails.
"""
import pytest
import torch

pytest.importorskip("triton")
from kernels.moe import build_schedule, moe_experts, moe_experts_ref  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _routing(T, E, k, skewed, device):
    """topk_ids (T, k) distinct experts per token and renormalised random weights (T, k) fp32."""
    scores = torch.randn(T, E, device=device)
    if skewed:  # expert 0 is chosen by every token; the last two experts by none
        scores[:, 0] += 100.0
        scores[:, -2:] -= 100.0
    ids = scores.topk(k, dim=-1).indices
    w = torch.rand(T, k, device=device) + 0.1
    return ids, w / w.sum(-1, keepdim=True)


def _inputs(T, H, I, E, k, dtype, skewed=False, device=DEVICE, scale=1.0):
    x = torch.randn(T, H, device=device).to(dtype)
    gate_up = (torch.randn(E, H, 2 * I, device=device) * scale * H ** -0.5).to(dtype)
    down = (torch.randn(E, I, H, device=device) * scale * I ** -0.5).to(dtype)
    ids, w = _routing(T, E, k, skewed, device)
    return x, gate_up, down, ids, w.to(dtype)


def _assert_rel(out, ref, tol, name):
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    rel = ((out - ref).norm() / ref.norm()).item()
    worst = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < tol and worst < 10 * tol, f"{name}: relative L2 error {rel:.2e}, max {worst:.2e} (tol {tol:.0e})"


def _check_fwd_bwd(T, H, I, E, k, dtype, skewed=False, device=DEVICE):
    torch.manual_seed(T * 1000 + E * 10 + k)
    inputs = _inputs(T, H, I, E, k, dtype, skewed, device)
    x, gate_up, down, ids, w = [t.requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    y = moe_experts(x, gate_up, down, ids, w)
    assert y.dtype == dtype and y.shape == (T, H)
    ref_in = [t.detach().float().requires_grad_(True) for t in (x, gate_up, down, w)]
    y_ref = moe_experts_ref(ref_in[0], ref_in[1], ref_in[2], ids, ref_in[3])
    _assert_rel(y, y_ref, TOL[dtype], "y")
    dy = torch.randn(T, H, device=device)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for name, t, r in zip(("dx", "d_gate_up", "d_down", "d_weights"), (x, gate_up, down, w), ref_in):
        assert t.grad.dtype == dtype
        _assert_rel(t.grad, r.grad, TOL[dtype], name)


CPU_CASES = [  # (T, H, I, E, k)
    pytest.param(37, 40, 24, 6, 2, id="t37-h40-i24-e6-k2"),
    pytest.param(1, 32, 16, 4, 1, id="single-token-k1"),
    pytest.param(29, 48, 40, 5, 1, id="t29-k1"),
    pytest.param(23, 72, 48, 10, 8, id="t23-h72-e10-k8"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,H,I,E,k", CPU_CASES)
def test_moe_experts_matches_reference(T, H, I, E, k, dtype):
    _check_fwd_bwd(T, H, I, E, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("k", [1, 2, 8], ids=["k1", "k2", "k8"])
def test_moe_experts_skewed_routing(k, dtype):
    """One expert takes every token (many row tiles), two experts get none (zero weight gradients)."""
    _check_fwd_bwd(41, 40, 24, 11, k, dtype, skewed=True)


def test_idle_experts_get_zero_gradient():
    torch.manual_seed(7)
    x, gate_up, down, ids, w = _inputs(19, 32, 16, 6, 2, torch.float32, skewed=True)
    gate_up.requires_grad_(True), down.requires_grad_(True)
    moe_experts(x, gate_up, down, ids, w).pow(2).sum().backward()
    assert gate_up.grad[-2:].abs().max() == 0 and down.grad[-2:].abs().max() == 0
    assert gate_up.grad[:-2].abs().amax(dim=(1, 2)).min() > 0  # every used expert got a gradient


def test_partial_grads_and_no_grad():
    """Frozen experts (only x and weights need grad) and inference mode give the same values."""
    torch.manual_seed(8)
    x, gate_up, down, ids, w = _inputs(17, 40, 24, 6, 2, torch.float32)
    x.requires_grad_(True)
    y = moe_experts(x, gate_up, down, ids, w)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    moe_experts_ref(xr, gate_up, down, ids, w).sum().backward()
    _assert_rel(x.grad, xr.grad, TOL[torch.float32], "dx")
    with torch.no_grad():
        _assert_rel(moe_experts(x, gate_up, down, ids, w), y.detach(), 1e-7, "no-grad y")


def test_repeated_expert_within_a_token():
    """ids need not be distinct per token: both rows count (the reference sums their weights)."""
    torch.manual_seed(10)
    x, gate_up, down, _, w = _inputs(13, 32, 16, 5, 3, torch.float32)
    ids = torch.randint(0, 5, (13, 3), device=DEVICE)
    ids[:, 1] = ids[:, 0]
    _assert_rel(moe_experts(x, gate_up, down, ids, w), moe_experts_ref(x, gate_up, down, ids, w),
                TOL[torch.float32], "y")


def test_schedule_covers_each_row_once():
    torch.manual_seed(9)
    T, E, k, bm = 53, 9, 3, 8
    ids, _ = _routing(T, E, k, skewed=True, device="cpu")
    s = build_schedule(ids, E, bm)
    flat = ids.reshape(-1)
    assert torch.equal(flat[s.sorted_pair.long()].sort().values, flat[s.sorted_pair.long()])  # grouped
    assert torch.equal(s.sorted_token.long(), s.sorted_pair.long() // k)
    assert torch.equal(s.sorted_pair[s.inv.long()].long(), torch.arange(T * k))
    assert torch.equal(s.expert_offsets.diff().long(), torch.bincount(flat, minlength=E))
    covered = torch.zeros(T * k, dtype=torch.long)
    for e, start, end in zip(s.tile_expert.tolist(), s.tile_row_start.tolist(), s.tile_row_end.tolist()):
        if e < 0:
            continue
        rows = torch.arange(start, min(start + bm, end))
        assert (flat[s.sorted_pair[rows].long()] == e).all()
        assert end == s.expert_offsets[e + 1]
        covered[rows] += 1
    assert (covered == 1).all()


def test_bad_inputs_raise():
    x, gate_up, down, ids, w = _inputs(5, 24, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="gate_up"):
        moe_experts(x, gate_up.transpose(1, 2), down, ids, w)
    with pytest.raises(ValueError, match="topk_ids"):
        moe_experts(x, gate_up, down, ids[:4], w[:4])
    with pytest.raises(ValueError, match="integer"):
        moe_experts(x, gate_up, down, ids.float(), w)
    with pytest.raises(ValueError, match="share"):
        moe_experts(x.half(), gate_up, down, ids, w)


@pytest.mark.parametrize("needs_grad", [True, False], ids=["train", "inference"])
def test_custom_ops_pass_opcheck(needs_grad):
    """torch.library.opcheck: schema, fake (meta) shapes, autograd registration and AOT dispatch of both ops agree
    with the real kernels; this is what lets torch.compile trace the experts without a graph break."""
    from kernels.moe import moe_experts_bwd, moe_experts_fwd
    from kernels.moe.grouped_gemm import block_m_for

    torch.manual_seed(11)
    T, H, I, E, k = 11, 32, 24, 5, 2
    x, gate_up, down, ids, w = _inputs(T, H, I, E, k, torch.float32)
    s = build_schedule(ids, E, block_m_for(x))
    w_sorted = w.reshape(-1)[s.sorted_pair.long()].float()
    if needs_grad:
        for t in (x, gate_up, down, w_sorted):
            t.requires_grad_(True)
    sched = (s.sorted_token, s.inv, s.expert_offsets, s.tile_expert, s.tile_row_start, s.tile_row_end)
    torch.library.opcheck(moe_experts_fwd, (x, gate_up, down, w_sorted, *sched, s.block_m, k, needs_grad))
    _, gu, h = moe_experts_fwd(x.detach(), gate_up.detach(), down.detach(), w_sorted.detach(), *sched, s.block_m, k,
                               True)
    dy = torch.randn(T, H, device=x.device)
    for needs in [(True, True, True, True), (True, False, False, True), (False, False, True, False)]:
        torch.library.opcheck(moe_experts_bwd, (dy, x.detach(), gate_up.detach(), down.detach(), w_sorted.detach(),
                                                gu, h, *sched, s.block_m, k, *needs))


# ---------------------------------------------------------------------------------------------- GPU, full size

@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "skewed"])
def test_moe_experts_30b_a3b_shape_bf16(skewed):
    """30B-A3B layer: H 2048, I 768, 128 experts, top-8, 4096 tokens (+ 3 for ragged tiles)."""
    _check_fwd_bwd(4099, 2048, 768, 128, 8, torch.bfloat16, skewed=skewed, device="cuda")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_moe_experts_gpu_other_dtypes(dtype):
    _check_fwd_bwd(1031, 320, 200, 16, 4, dtype, device="cuda")
