"""W8A16 linear layer for fine-grained FP8 weights (the official `*-Instruct-FP8` checkpoints) in Triton.

    y = fp8_linear(x, weight, weight_scale_inv, block, bias)
    y = x @ W.T + b,  W[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]   (layout: model/fp8.py)

The weight stays in FP8 in memory (half of bf16) and is dequantised inside the matmul. When the K step divides the
quantisation block's width (the official 128 x 128 blocks), a K step lies in one scale column: the raw FP8 tile
(exact in bf16 / fp16 / fp32) feeds `tl.dot` and the per-row scales multiply the fp32 partial product, which is
the DeepSeek-V3 recipe for block-scaled GEMMs. The weight is then never rounded after scaling, so the result is
slightly closer to fp32 than model/fp8.py's torch path (which dequantises to x's dtype first). Other block sizes
scale each element of the tile and round it to x's dtype before the dot. Activations stay bf16 / fp16 / fp32 (no
activation quantisation: W8A16, as in weight-only FP8 serving, e.g. vLLM's Marlin FP8 path). Decode (few rows) is
bound by reading the weight, so halving its bytes is the point. Few rows give few output tiles, so K is split
over more programs (fp32 partial sums, added by the caller) to fill the GPU. `scripts/bench_fp8_linear.py`
measures it on a GPU.

Backward (for adapters trained on top of frozen FP8 weights): dx = dy @ W with W dequantised in PyTorch; the
weight, scales and bias get no gradient. `naive.py` is the fp32 reference the tests compare against.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .naive import fp8_linear_ref

__all__ = ["fp8_linear", "fp8_linear_ref"]


@triton.jit
def _fp8_linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_sn,
                       stride_ym, stride_ys, BN_Q: tl.constexpr, BK_Q: tl.constexpr, HAS_BIAS: tl.constexpr,
                       TILE_SCALE: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of y = x @ dequant(W).T over the K range [pid_k * K_SPLIT, +K_SPLIT).

    BN_Q x BK_Q is the quantisation block. TILE_SCALE (BLOCK_K divides BK_Q): a K step lies in one scale column,
    so the raw FP8 tile (exact in bf16 / fp16 / fp32) goes to `tl.dot` and the (BLOCK_N,) scales multiply the
    fp32 partial product. Otherwise each weight element is scaled before the dot (any block size).
    Split K (pid_k > 0 possible): y_ptr is then an fp32 (SPLIT, M, N) workspace summed by the caller.
    """
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]   # (BLOCK_N, BLOCK_K)
    s_rows = s_ptr + (offs_n // BN_Q).to(tl.int64) * stride_sn                              # scale row of each n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = offs_k < k_end - k0
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if TILE_SCALE:
            s = tl.load(s_rows + k0 // BK_Q, mask=n_mask, other=0.0)                         # (BLOCK_N,)
            part = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
            acc += part * s[None, :]
        else:
            s = tl.load(s_rows[:, None] + ((k0 + offs_k) // BK_Q)[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            w = (w.to(tl.float32) * s).to(x.dtype)  # dequantised tile, rounded once to the activation dtype
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_k.to(tl.int64) * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _config(M: int, x: Tensor) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): small M (decode) gets narrow row and weight tiles
    (more programs, then split K to fill the GPU); prefill gets square tiles."""
    if x.device.type != "cuda":
        return 16, 32, 32, 4, 1  # the interpreter: small tiles keep the CPU tests fast
    if M <= 16:
        return 16, 32, 128, 4, 4
    if M <= 64:
        return 64, 64, 128, 4, 4
    return 128, 128, 64, 8, 3


def _split_k(M: int, N: int, K: int, BM: int, BN: int, BK: int, x: Tensor) -> int:
    """How many K slices: enough programs for ~2 waves on the GPU's SMs, each slice >= 4 K steps."""
    if x.device.type != "cuda":
        return 2 if K >= 4 * BK else 1  # the interpreter: exercise the split path on the tests' shapes
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, tiles), K // (4 * BK)))


def _forward(x2: Tensor, weight: Tensor, scale_inv: Tensor, block: tuple[int, int], bias: Tensor | None,
             config: tuple[int, int, int, int, int] | None = None, split: int | None = None) -> Tensor:
    """config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) and split (K slices) override `_config` and
    `_split_k` (scripts/bench_fp8_linear.py --sweep searches them)."""
    M, K = x2.shape
    N = weight.shape[0]
    if M == 0:
        return torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    BM, BN, BK, warps, stages = config or _config(M, x2)
    tile_scale = block[1] % BK == 0
    if not tile_scale and block[1] >= 16 and block[1] & (block[1] - 1) == 0:  # a power of two below BK: use it
        BK, tile_scale = block[1], True
    split = split or _split_k(M, N, K, BM, BN, BK, x2)
    k_split = triton.cdiv(triton.cdiv(K, split), BK) * BK  # each slice a whole number of K steps
    split = triton.cdiv(K, k_split)
    y = torch.empty(split, M, N, device=x2.device, dtype=x2.dtype if split == 1 else torch.float32)
    has_bias = bias is not None and split == 1
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), split)
    _fp8_linear_kernel[grid](x2, weight, scale_inv, bias if has_bias else scale_inv, y, M, N, K, k_split,
                             x2.stride(0), weight.stride(0), scale_inv.stride(0), y.stride(1), y.stride(0),
                             BN_Q=block[0], BK_Q=block[1], HAS_BIAS=has_bias, TILE_SCALE=tile_scale,
                             PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
                             BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages)
    if split == 1:
        return y[0]
    y = y.sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(x2.dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, scale_inv, block, bias):
        ctx.save_for_backward(weight, scale_inv)
        ctx.block = block
        return _forward(x2, weight, scale_inv, block, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, scale_inv = ctx.saved_tensors
        bn, bk = ctx.block
        N, K = weight.shape
        s = scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
        w = (weight.float() * s).to(dy.dtype)
        return dy @ w, None, None, None, None


def fp8_linear(x: Tensor, weight: Tensor, weight_scale_inv: Tensor, block: tuple[int, int],
               bias: Tensor | None = None) -> Tensor:
    """y = x @ dequant(weight).T + bias with the FP8 weight dequantised inside a Triton matmul.

    Args:
        x: (..., K) fp16 / bf16 / fp32 activations.
        weight: (N, K) float8_e4m3fn.
        weight_scale_inv: (ceil(N / bn), ceil(K / bk)) fp32 per-block scales.
        block: (bn, bk), the checkpoint's weight_block_size.
        bias: (N,) or None (any float dtype; added in fp32).
    Returns: (..., N) in x's dtype (fp32 accumulation); differentiable in x.
    """
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    bn, bk = block
    want = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    if tuple(weight_scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv {tuple(weight_scale_inv.shape)} does not fit weight {(N, K)} with "
                         f"blocks {tuple(block)} (expected {want})")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {K}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16 / bf16 / fp32, got {x.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias {tuple(bias.shape)} must be ({N},)")
    if not (x.device == weight.device == weight_scale_inv.device):
        raise ValueError("fp8_linear: x, weight and weight_scale_inv must be on one device")
    x2 = x.reshape(-1, K).contiguous()
    y = _FP8Linear.apply(x2, weight.contiguous(), weight_scale_inv.float().contiguous(), (bn, bk), bias)
    return y.reshape(*x.shape[:-1], N)
