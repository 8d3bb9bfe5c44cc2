"""Plain-PyTorch fp32 reference of the grouped-expert SwiGLU mixture (`kernels.moe.moe_experts`).

A loop over experts with a boolean mask per expert: slow and obvious on purpose. The tests differentiate it with
autograd to get the reference gradients.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def moe_experts_ref(x: Tensor, gate_up: Tensor, down: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
    """y[t] = sum_j w[t, j] * down[e](silu(gate) * up), gate, up = chunk(x[t] @ gate_up[e], 2), e = ids[t, j].

    Args:
        x: (T, H). gate_up: (E, H, 2I). down: (E, I, H). topk_ids: (T, k) int. topk_weights: (T, k).
    Returns:
        (T, H) fp32 (all inputs are upcast to fp32; differentiable in x, gate_up, down, topk_weights).
    """
    x, gate_up, down, w = x.float(), gate_up.float(), down.float(), topk_weights.float()
    y = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        hit = topk_ids == e                         # (T, k): which choice of which token went to e
        if not hit.any():
            continue
        gate, up = (x @ gate_up[e]).chunk(2, dim=-1)  # every token through e: simple, (T, I) each
        out = (F.silu(gate) * up) @ down[e]           # (T, H)
        y = y + out * (w * hit).sum(-1, keepdim=True)  # sums the weights if a token picks e twice
    return y
