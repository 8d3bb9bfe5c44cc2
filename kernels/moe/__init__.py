"""Grouped-expert SwiGLU for mixture-of-experts layers (Qwen3-VL-MoE), forward and backward in Triton.

    y = moe_experts(x, gate_up, down, topk_ids, topk_weights)
    y[t] = sum_j w[t, j] * (silu(g) * u) @ down[e],  g, u = chunk(x[t] @ gate_up[e], 2),  e = topk_ids[t, j]

Pipeline (no host sync): sort the T * k (token, choice) pairs by expert and build a tile schedule
(`schedule.py`); a grouped GEMM with the token gather in its loads and SiLU-and-multiply in its epilogue; a
grouped GEMM for `down` with the routing weight in its epilogue; a deterministic gather-sum back to tokens.
Backward: dy @ down^T with dSwiGLU and d(routing weight) fused in the epilogue, dgu @ gate_up^T, and per-expert
weight-gradient GEMMs (`grouped_gemm.py`). `naive.py` is the fp32 reference the tests compare against.
"""
import torch
from torch import Tensor

from . import grouped_gemm as gg
from .naive import moe_experts_ref
from .schedule import Schedule, build_schedule

__all__ = ["moe_experts", "moe_experts_ref", "build_schedule", "Schedule"]


class MoEExpertsFunction(torch.autograd.Function):
    """autograd.Function over the Triton kernels; saves gu (N, 2I) and h (N, I) for backward."""

    @staticmethod
    def forward(ctx, x, gate_up, down, topk_weights, topk_ids):
        T, k = topk_ids.shape
        E = gate_up.shape[0]
        sched = build_schedule(topk_ids, E, gg.block_m_for(x))
        w_sorted = topk_weights.reshape(-1)[sched.sorted_pair.long()].float()  # (N,) weight of each sorted row
        needs_grad = any(ctx.needs_input_grad[:4])
        gu, h = gg.gate_up_fwd(x, gate_up, sched, save_gu=needs_grad)
        ys = gg.token_gemm(h, down, sched, transpose_b=False, scale=w_sorted, kind="down")  # (N, H) weighted
        y = gg.gather_sum(ys, sched.inv, T, k)
        if needs_grad:
            ctx.sched, ctx.k = sched, k
            ctx.save_for_backward(x, gate_up, down, w_sorted, gu, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate_up, down, w_sorted, gu, h = ctx.saved_tensors
        sched, k = ctx.sched, ctx.k
        need_x, need_w1, need_w2, need_rw = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        T = dy.shape[0]
        dx = d_gate_up = d_down = d_weights = None
        if need_x or need_w1 or need_rw:
            dgu, dw_sorted = gg.down_bwd(dy, down, gu, w_sorted, sched)
            if need_rw:
                d_weights = dw_sorted[sched.inv.long()].view(T, k).to(x.dtype)
            if need_x:
                dxs = gg.token_gemm(dgu, gate_up, sched, transpose_b=True, scale=None, kind="dx")  # (N, H)
                dx = gg.gather_sum(dxs, sched.inv, T, k)
            if need_w1:
                d_gate_up = gg.weight_grad(x, sched.sorted_token, dgu, None, None, sched, torch.empty_like(gate_up))
        if need_w2:
            d_down = gg.weight_grad(h, None, dy, sched.sorted_token, w_sorted, sched, torch.empty_like(down))
        return dx, d_gate_up, d_down, d_weights, None


@torch.compiler.disable  # opaque to torch.compile: dynamo cannot trace Triton's launcher/autotuner
def moe_experts(x: Tensor, gate_up: Tensor, down: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
    """Mix each token's top-k SwiGLU experts with Triton grouped GEMMs (differentiable in all float inputs).

    Args:
        x: (T, H) fp16/bf16/fp32 activations.
        gate_up: (E, H, 2I) same dtype; columns [0, I) gate, [I, 2I) up (official checkpoint layout).
        down: (E, I, H) same dtype.
        topk_ids: (T, k) int, expert of each choice, in [0, E) (repeats within a token are fine).
            The range is not checked: that would need a host sync; out-of-range rows would leave y unwritten.
        topk_weights: (T, k) float routing weights (any float dtype; used in fp32).
    Returns:
        (T, H) in x's dtype; fp32 accumulation throughout.
    """
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"moe_experts expects x (T, H), gate_up (E, H, 2I), down (E, I, H); got "
                         f"{tuple(x.shape)}, {tuple(gate_up.shape)}, {tuple(down.shape)}")
    T, H = x.shape
    E, I = gate_up.shape[0], gate_up.shape[2] // 2
    if gate_up.shape != (E, H, 2 * I) or down.shape != (E, I, H):
        raise ValueError(f"expert shapes do not match x (T={T}, H={H}): gate_up {tuple(gate_up.shape)} must be "
                         f"(E, H, 2I), down {tuple(down.shape)} must be (E, {I}, {H})")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must "
                         f"both be (T={T}, k)")
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if not (x.dtype == gate_up.dtype == down.dtype) or x.dtype not in (torch.float16, torch.bfloat16,
                                                                          torch.float32):
        raise ValueError(f"x, gate_up and down must share one of fp16/bf16/fp32; got {x.dtype}, {gate_up.dtype}, "
                         f"{down.dtype}")
    if not (x.device == gate_up.device == down.device == topk_ids.device == topk_weights.device):
        raise ValueError("moe_experts: all inputs must be on one device")
    if T == 0:
        return x.new_zeros(0, H)
    return MoEExpertsFunction.apply(x.contiguous(), gate_up.contiguous(), down.contiguous(),
                                    topk_weights.contiguous(), topk_ids)
