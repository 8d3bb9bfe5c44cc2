"""Sparse mixture-of-experts block of the Qwen3-VL-MoE text decoder (30B-A3B, 235B-A22B).

Follows transformers' `Qwen3VLMoeTextSparseMoeBlock` (transformers/models/qwen3_vl_moe): a bias-free linear router, softmax in
fp32, top-k, the top-k weights ALWAYS renormalised to sum to one (the config's `norm_topk_prob` is ignored by
Qwen3-VL-MoE), and SwiGLU experts stored as two fused 3-D tensors in the official checkpoint layout:
`experts.gate_up_proj` [E, H, 2I] (gate columns first, then up) and `experts.down_proj` [E, I, H].
transformers 5 keeps the transposes ([E, 2I, H], [E, H, I]); the checkpoint loader owns that mapping.

Also here: the Switch-Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6) exactly as transformers'
`load_balancing_loss_func` computes it for Qwen3-VL-MoE, and router statistics for logging.

Expert backends (`MoEConfig.backend`): "torch" sorts the token-expert pairs by expert and runs one matmul pair
per expert (plain PyTorch, one host sync for the per-expert counts); "triton" calls `kernels.moe.moe_experts`
(grouped GEMMs, no host sync), imported only when used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autocast import to_autocast_dtype

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class MoEConfig:
    """MoE hyper-parameters of the text decoder (names as in the official `text_config`).

    Args:
        num_experts: E, routed experts per sparse layer (128 for 30B-A3B).
        num_experts_per_tok: k, experts chosen per token (8).
        moe_intermediate_size: I, each expert's SwiGLU width (768 for 30B-A3B).
        decoder_sparse_step: every `step`-th layer is sparse (1: all).
        mlp_only_layers: layer indices that use the dense MLP instead.
        router_aux_loss_coef: weight of the load-balancing loss when it is requested.
        backend: "torch" or "triton" expert computation.
    """

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    backend: str = "torch"

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")
        if self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.backend not in BACKENDS:
            raise ValueError(f"MoE backend must be one of {BACKENDS}, got {self.backend!r}")
        # Accept a list from JSON/YAML but store a hashable tuple (the dataclass is frozen).
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` (0-based) uses the MoE block (transformers' rule)."""
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0


def route(router_logits: Tensor, top_k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Top-k routing: softmax in fp32, top-k, renormalise, cast.

    Args:
        router_logits: (T, E) any float dtype.
        top_k: k.
        dtype: dtype of the returned weights (the activations' dtype, as in transformers).
    Returns:
        topk_weights (T, k) `dtype`, summing to 1 per token; topk_ids (T, k) int64.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # fp32 softmax, as the reference
    topk_probs, topk_ids = torch.topk(probs, top_k, dim=-1)
    topk_probs = topk_probs / topk_probs.sum(dim=-1, keepdim=True)    # always renormalised (norm_topk_prob is ignored)
    return topk_probs.to(dtype), topk_ids


def experts_torch(x: Tensor, gate_up: Tensor, down: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
    """Expert SwiGLU mixture in plain PyTorch: sort the (token, choice) pairs by expert, one matmul pair each.

    Args:
        x: (T, H). gate_up: (E, H, 2I). down: (E, I, H). topk_ids: (T, k) int. topk_weights: (T, k).
    Returns:
        (T, H) in x's dtype: sum_j w[t, j] * down[e](silu(gate) * up), accumulated in fp32.
    """
    T, H = x.shape
    E, k = gate_up.shape[0], topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)             # (T*k,) pair index, grouped by expert
    counts = torch.bincount(flat_ids, minlength=E).tolist()  # one host sync: per-expert slice sizes
    token_of_pair = order // k
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        tokens = token_of_pair[start:start + n]
        start += n
        gate, up = (x[tokens] @ gate_up[e]).chunk(2, dim=-1)  # gate first, then up
        y = (F.silu(gate) * up) @ down[e]                      # (n, H)
        y = y * topk_weights.reshape(-1)[pairs, None]          # weight in x's dtype, as transformers
        out.index_add_(0, tokens, y.float())
    return out.to(x.dtype)


class Experts(nn.Module):
    """The E SwiGLU experts as two fused tensors in the official checkpoint layout.

    Args:
        hidden_size: H. cfg: MoEConfig (E = num_experts, I = moe_intermediate_size, backend).
    Parameters:
        gate_up_proj: (E, H, 2I), columns [0, I) gate, [I, 2I) up. down_proj: (E, I, H).
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = cfg.moe_intermediate_size
        self.backend = cfg.backend
        E, H, I = cfg.num_experts, hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        """Normal(0, std) init, as transformers' `_init_weights` (initializer_range 0.02)."""
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        """Mix the chosen experts' outputs.

        Args:
            x: (T, H). topk_ids: (T, k) int. topk_weights: (T, k), x's dtype.
        Returns:
            (T, H) x's dtype.
        """
        if self.backend == "triton":
            from kernels.moe import moe_experts  # Triton is imported only when this backend is chosen

            x_in, gate_up, down, topk_weights = to_autocast_dtype(x, self.gate_up_proj, self.down_proj, topk_weights)
            return moe_experts(x_in, gate_up, down, topk_ids, topk_weights).to(x.dtype)
        return experts_torch(x, self.gate_up_proj, self.down_proj, topk_ids, topk_weights)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, backend={self.backend}")


class SparseMoeBlock(nn.Module):
    """Router + experts; names match the checkpoint (`mlp.gate.weight`, `mlp.experts.gate_up_proj`, ...).

    Args:
        hidden_size: H. cfg: MoEConfig.
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(hidden_size, cfg.num_experts, bias=False)  # router, weight (E, H)
        self.experts = Experts(hidden_size, cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Route every token to its top-k experts and mix their outputs.

        Args:
            x: (B, L, H).
        Returns:
            y (B, L, H) x's dtype; router_logits (B*L, E) fp32 (computed in x's dtype, as the reference,
            then upcast for the aux loss and statistics).
        """
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"SparseMoeBlock expects x of shape (B, L, {self.hidden_size}), got {tuple(x.shape)}")
        B, L, H = x.shape
        x_flat = x.reshape(B * L, H)
        router_logits = self.gate(x_flat)                                # (B*L, E) x's dtype
        topk_weights, topk_ids = route(router_logits, self.top_k, x.dtype)
        y = self.experts(x_flat, topk_ids, topk_weights)
        return y.reshape(B, L, H), router_logits.float()


def load_balancing_loss(router_logits: tuple[Tensor, ...], top_k: int,
                        attention_mask: Tensor | None = None) -> Tensor:
    """Switch-Transformer load-balancing loss over all MoE layers, padding masked (unscaled by the coef).

    E * sum_e f_e * P_e, where f_e = top-k assignments to expert e per (valid token, layer) and P_e = mean router
    probability of e over (valid token, layer); equals transformers' `load_balancing_loss_func`.

    Args:
        router_logits: tuple over MoE layers of (B*L, E) logits (any float dtype; softmax runs in fp32).
        top_k: k.
        attention_mask: (B, L) 0/1 or bool, 0 = padding, or None (all tokens count).
    Returns:
        scalar fp32 tensor.
    """
    if isinstance(router_logits, Tensor):
        router_logits = (router_logits,)
    if len(router_logits) == 0:
        raise ValueError("load_balancing_loss needs router logits of at least one MoE layer, got none "
                         "(a dense model has no aux loss)")
    rows, E = router_logits[0].shape
    device = router_logits[0].device
    if attention_mask is None:
        mask = torch.ones(rows, dtype=torch.float32, device=device)
    else:
        if attention_mask.numel() != rows:
            raise ValueError(f"attention_mask has {attention_mask.numel()} entries but router logits have "
                             f"{rows} rows (expected B*L)")
        mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    assigned = torch.zeros(E, dtype=torch.float32, device=device)  # sum over layers/tokens of top-k hits
    prob_sum = torch.zeros(E, dtype=torch.float32, device=device)
    for logits in router_logits:
        if logits.shape != (rows, E):
            raise ValueError(f"all router logits must have shape {(rows, E)}, got {tuple(logits.shape)}")
        probs = torch.softmax(logits.to(device), dim=-1, dtype=torch.float32)  # (rows, E)
        topk_ids = torch.topk(probs, top_k, dim=-1).indices                     # (rows, k)
        hits = torch.zeros_like(probs).scatter_(1, topk_ids, 1.0)               # (rows, E) one-hot of the k
        assigned = assigned + (hits * mask[:, None]).sum(0)
        prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
    total = mask.sum() * len(router_logits)
    return E * torch.sum((assigned / total) * (prob_sum / total))


@torch.no_grad()
def router_stats(router_logits: Tensor | tuple[Tensor, ...], top_k: int) -> dict:
    """Per-expert load for logging (host sync).

    Args:
        router_logits: (T, E) or a tuple over layers of (T, E).
        top_k: k.
    Returns:
        dict: "load" (E,) fp32 CPU fraction of all top-k assignments per expert, summed over layers (sums to 1);
        "max_load", "min_load": its extremes; "max_over_mean": max_load * E (1.0 = perfectly balanced);
        "dead_experts": number of experts with no assignment.
    """
    if isinstance(router_logits, Tensor):
        router_logits = (router_logits,)
    if len(router_logits) == 0:
        raise ValueError("router_stats needs router logits of at least one MoE layer, got none")
    E = router_logits[0].shape[-1]
    counts = torch.zeros(E, dtype=torch.float64, device=router_logits[0].device)
    for logits in router_logits:
        ids = torch.topk(logits.float(), top_k, dim=-1).indices.reshape(-1)  # softmax is monotone: same top-k
        counts += torch.bincount(ids, minlength=E).to(counts.dtype)
    load = (counts / counts.sum()).float().cpu()
    return {
        "load": load,
        "max_load": load.max().item(),
        "min_load": load.min().item(),
        "max_over_mean": load.max().item() * E,
        "dead_experts": int((load == 0).sum().item()),
    }
