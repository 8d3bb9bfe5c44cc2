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


# The kernels as torch.library custom ops, as kernels/attention/flash.py does: eager calls dispatch straight to
# them, and torch.compile keeps each as one opaque node of its graph (shapes from the fake implementations) instead
# of breaking the graph around Triton's launcher. The routing bookkeeping (`build_schedule`, plain torch ops) stays
# outside the ops, so the compiler traces it, and its tensors reach backward as saved inputs (no recomputation).
# The schedule crosses the op boundary as its tensors: sorted_token, inv, expert_offsets, tile_expert,
# tile_row_start, tile_row_end (Schedule's fields; sorted_pair is not needed inside).
def _schedule(block_m, sorted_token, inv, expert_offsets, tile_expert, tile_row_start, tile_row_end) -> Schedule:
    return Schedule(block_m, None, sorted_token, inv, expert_offsets, tile_expert, tile_row_start, tile_row_end)


@torch.library.custom_op("qwen3vl_lab::moe_experts_fwd", mutates_args=())
def moe_experts_fwd(x: Tensor, gate_up: Tensor, down: Tensor, w_sorted: Tensor, sorted_token: Tensor, inv: Tensor,
                    expert_offsets: Tensor, tile_expert: Tensor, tile_row_start: Tensor, tile_row_end: Tensor,
                    block_m: int, k: int, save_for_backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: (y (T, H) in x's dtype, gu (N, 2I) or (0, 2I) unless saved, h (N, I)); w_sorted (N,) fp32."""
    sched = _schedule(block_m, sorted_token, inv, expert_offsets, tile_expert, tile_row_start, tile_row_end)
    gu, h = gg.gate_up_fwd(x, gate_up, sched, save_gu=save_for_backward)
    ys = gg.token_gemm(h, down, sched, transpose_b=False, scale=w_sorted, kind="down")  # (N, H) weighted
    y = gg.gather_sum(ys, sched.inv, x.shape[0], k)
    return y, (gu if gu is not None else x.new_empty(0, gate_up.shape[2])), h


@moe_experts_fwd.register_fake
def _(x, gate_up, down, w_sorted, sorted_token, inv, expert_offsets, tile_expert, tile_row_start, tile_row_end,
      block_m, k, save_for_backward):
    N, I2 = sorted_token.shape[0], gate_up.shape[2]
    return x.new_empty(x.shape), x.new_empty(N if save_for_backward else 0, I2), x.new_empty(N, I2 // 2)


@torch.library.custom_op("qwen3vl_lab::moe_experts_bwd", mutates_args=())
def moe_experts_bwd(dy: Tensor, x: Tensor, gate_up: Tensor, down: Tensor, w_sorted: Tensor, gu: Tensor, h: Tensor,
                    sorted_token: Tensor, inv: Tensor, expert_offsets: Tensor, tile_expert: Tensor,
                    tile_row_start: Tensor, tile_row_end: Tensor, block_m: int, k: int, need_x: bool,
                    need_gate_up: bool, need_down: bool, need_w: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward: (dx, d_gate_up, d_down, d_w_sorted); a gradient that is not needed comes back empty (numel 0)."""
    sched = _schedule(block_m, sorted_token, inv, expert_offsets, tile_expert, tile_row_start, tile_row_end)
    T = dy.shape[0]
    dx, d_gate_up, d_down, d_w = x.new_empty(0), gate_up.new_empty(0), down.new_empty(0), w_sorted.new_empty(0)
    if need_x or need_gate_up or need_w:
        dgu, d_w_all = gg.down_bwd(dy, down, gu, w_sorted, sched)
        if need_w:
            d_w = d_w_all
        if need_x:
            dxs = gg.token_gemm(dgu, gate_up, sched, transpose_b=True, scale=None, kind="dx")  # (N, H)
            dx = gg.gather_sum(dxs, sched.inv, T, k)
        if need_gate_up:
            d_gate_up = gg.weight_grad(x, sched.sorted_token, dgu, None, None, sched, torch.empty_like(gate_up))
    if need_down:
        d_down = gg.weight_grad(h, None, dy, sched.sorted_token, w_sorted, sched, torch.empty_like(down))
    return dx, d_gate_up, d_down, d_w


@moe_experts_bwd.register_fake
def _(dy, x, gate_up, down, w_sorted, gu, h, sorted_token, inv, expert_offsets, tile_expert, tile_row_start,
      tile_row_end, block_m, k, need_x, need_gate_up, need_down, need_w):
    def like(t, need):
        return t.new_empty(t.shape if need else (0,))

    return like(x, need_x), like(gate_up, need_gate_up), like(down, need_down), like(w_sorted, need_w)


def _setup_context(ctx, inputs, output):
    x, gate_up, down, w_sorted, *sched, block_m, k, _ = inputs
    _, gu, h = output
    ctx.save_for_backward(x, gate_up, down, w_sorted, gu, h, *sched)
    ctx.block_m, ctx.k = block_m, k
    ctx.mark_non_differentiable(gu, h)


def _backward(ctx, dy, _dgu, _dh):
    x, gate_up, down, w_sorted, gu, h, *sched = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    grads = moe_experts_bwd(dy.contiguous(), x, gate_up, down, w_sorted, gu, h, *sched, ctx.block_m, ctx.k, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)),) + (None,) * 9


moe_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    sched = build_schedule(topk_ids, E, gg.block_m_for(x))
    w_sorted = topk_weights.reshape(-1)[sched.sorted_pair.long()].float()  # (N,) weight of each sorted row
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down, topk_weights))
    y, _, _ = moe_experts_fwd(x, gate_up, down, w_sorted, sched.sorted_token, sched.inv, sched.expert_offsets,
                              sched.tile_expert, sched.tile_row_start, sched.tile_row_end, sched.block_m,
                              topk_ids.shape[1], save)
    return y
