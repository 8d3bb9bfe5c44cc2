"""Triton kernels of the grouped-expert SwiGLU: grouped GEMMs over expert-sorted rows, and their launchers.

Rows are the N = T * k (token, choice) pairs sorted by expert (`schedule.py`). A "token GEMM" program computes one
BLOCK_M x BLOCK_N tile of one expert: the tile schedule maps program -> (expert, first row), so every program
multiplies by a single expert's weight matrix (the layout of MegaBlocks / vLLM's fused_moe). A "weight-gradient
GEMM" program computes one BLOCK_M x BLOCK_N tile of one expert's weight gradient, with K running over that
expert's rows (zero rows -> a zero gradient).

  forward    gu = x[tok] @ W1[e]                       _gate_up_kernel (gather fused in the A load; h = silu(g) * u
             h = silu(g) * u                            fused in the epilogue, gu kept for backward)
             ys = w * (h @ W2[e])                       _token_gemm_kernel (routing weight in the epilogue, fp32)
             y[t] = sum_j ys[inv[t, j]]                 _gather_sum_kernel (deterministic, fp32)
  backward   dh' = dy[tok] @ W2[e]^T                   _down_bwd_kernel, epilogue: dw = <h, dh'> per row,
             dgu = dSwiGLU(w * dh')                     dh = w * dh', dgu from the saved gu
             dxs = dgu @ W1[e]^T; dx = gather-sum        _token_gemm_kernel, _gather_sum_kernel
             dW1[e] = x[tok]_e^T @ dgu_e                _wgrad_kernel (A rows gathered)
             dW2[e] = h_e^T @ (w * dy[tok])_e           _wgrad_kernel (B rows gathered and scaled)

Weights are in the official layout: W1 = gate_up (E, H, 2I), W2 = down (E, I, H); the transposed products read
the same tensors with swapped strides. All accumulation is fp32.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .schedule import Schedule


@triton.jit
def _program_tile(tile_e_ptr, N, BLOCK_N: tl.constexpr):
    """This program's (tile, n-block) and the tile's expert (-1: a padding tile of the schedule)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    tile, pid_n = pid // num_n, pid % num_n
    return tile, pid_n, tl.load(tile_e_ptr + tile)


@triton.jit
def _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M: tl.constexpr):
    """The tile's first row, its BLOCK_M rows of the expert-sorted order and which of them are real."""
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    rows = row_start + tl.arange(0, BLOCK_M)
    return row_start, rows, rows < row_end


@triton.jit
def _columns(pid_n, N, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
    """The n-block's output columns, their mask, and the columns to load (ragged ones wrapped onto valid memory;
    they are never stored). The modulo hides contiguity from the compiler, so it is used only when N is ragged."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if EVEN_N:
        offs_nb = offs_n
    else:
        offs_nb = offs_n % N
    return offs_n, n_mask, offs_nb


@triton.jit
def _accumulate(a_ptrs, b_ptrs, K, stride_bk, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) = A tile @ B tile over K: A rows contiguous in K, B rows `stride_bk` apart."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, gu_ptr, h_ptr, tok_ptr, tile_e_ptr, tile_start_ptr, tile_end_ptr,
                    H, I, stride_x, stride_we, stride_wk, stride_wn, stride_gu, stride_h,
                    SAVE_GU: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gu = x[tok] @ W1[e] for one (tile, n-block), both halves; h = silu(gate) * up."""
    tile, pid_n, e = _program_tile(tile_e_ptr, I, BLOCK_N)
    if e < 0:  # a padding tile of the schedule
        return
    row_start, rows, row_mask = _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M)
    tok = tl.load(tok_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # masked rows read token 0: in bounds
    offs_n, n_mask, offs_nb = _columns(pid_n, I, BLOCK_N, EVEN_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_x + offs_k[None, :]
    bg_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_nb[None, :] * stride_wn
    bu_ptrs = bg_ptrs + I * stride_wn  # up columns follow the I gate columns
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            bg = tl.load(bg_ptrs)
            bu = tl.load(bu_ptrs)
        else:
            k_mask = offs_k < H - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            bg = tl.load(bg_ptrs, mask=k_mask[:, None], other=0.0)
            bu = tl.load(bu_ptrs, mask=k_mask[:, None], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        bg_ptrs += BLOCK_K * stride_wk
        bu_ptrs += BLOCK_K * stride_wk
    mask = row_mask[:, None] & n_mask[None, :]
    rows64 = rows.to(tl.int64)
    if SAVE_GU:
        gu_ptrs = gu_ptr + rows64[:, None] * stride_gu + offs_n[None, :]
        tl.store(gu_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptrs + I, acc_u.to(gu_ptr.dtype.element_ty), mask=mask)
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up from the fp32 accumulators
    tl.store(h_ptr + rows64[:, None] * stride_h + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _token_gemm_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, tile_e_ptr, tile_start_ptr, tile_end_ptr,
                       N, K, stride_a, stride_be, stride_bk, stride_bn, stride_c,
                       HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[rows] = (a[rows] @ B[e]) * scale[rows] for one (tile, n-block); B[e] read through strides."""
    tile, pid_n, e = _program_tile(tile_e_ptr, N, BLOCK_N)
    if e < 0:  # a padding tile of the schedule
        return
    row_start, rows, row_mask = _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M)
    rows_a = tl.where(row_mask, rows, row_start).to(tl.int64)  # masked rows re-read the first row: in bounds
    offs_n, n_mask, offs_nb = _columns(pid_n, N, BLOCK_N, EVEN_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_nb[None, :] * stride_bn
    acc = _accumulate(a_ptrs, b_ptrs, K, stride_bk, EVEN_K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_c + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_bwd_kernel(dy_ptr, w2_ptr, gu_ptr, scale_ptr, dgu_ptr, dw_part_ptr, tok_ptr,
                     tile_e_ptr, tile_start_ptr, tile_end_ptr,
                     H, I, stride_dy, stride_we, stride_wi, stride_wh, stride_gu, stride_dgu, stride_dw,
                     EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dh' = dy[tok] @ W2[e]^T for one (tile, i-block); epilogue: dw partial = <h, dh'>, dgu = dSwiGLU(w * dh')."""
    tile, pid_n, e = _program_tile(tile_e_ptr, I, BLOCK_N)
    if e < 0:  # a padding tile of the schedule
        return
    row_start, rows, row_mask = _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M)
    tok = tl.load(tok_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    offs_n, n_mask, offs_nb = _columns(pid_n, I, BLOCK_N, EVEN_N)  # columns of I
    offs_k = tl.arange(0, BLOCK_K)                                # reduction over H
    a_ptrs = dy_ptr + tok[:, None] * stride_dy + offs_k[None, :]
    b_ptrs = w2_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wh + offs_nb[None, :] * stride_wi
    acc = _accumulate(a_ptrs, b_ptrs, H, stride_wh, EVEN_K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = row_mask[:, None] & n_mask[None, :]
    rows64 = rows.to(tl.int64)
    gu_ptrs = gu_ptr + rows64[:, None] * stride_gu + offs_n[None, :]
    g = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d w[row] = <dy, y_unweighted> = <h, dy @ W2^T>; this block's share of the I columns (masked terms are 0)
    tl.store(dw_part_ptr + rows64 * stride_dw + pid_n, tl.sum(silu * u * acc, axis=1), mask=row_mask)
    dh = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))  # silu'(g) = sig * (1 + g * (1 - sig))
    du = dh * silu
    dgu_ptrs = dgu_ptr + rows64[:, None] * stride_dgu + offs_n[None, :]
    tl.store(dgu_ptrs, dg.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptrs + I, du.to(dgu_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_kernel(a_ptr, a_idx_ptr, b_ptr, b_idx_ptr, scale_ptr, out_ptr, offsets_ptr,
                  M, N, stride_a, stride_b, stride_oe, stride_om, stride_on,
                  A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, B_SCALE: tl.constexpr,
                  EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = sum over expert e's rows r of A[ia(r)]^T (x) B[ib(r)] * scale[r], one BLOCK_M x BLOCK_N tile."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    e = pid // (num_m * num_n)
    rest = pid % (num_m * num_n)
    pid_m, pid_n = rest // num_n, rest % num_n
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_M:
        offs_mb = offs_m
    else:
        offs_mb = offs_m % M
    if EVEN_N:
        offs_nb = offs_n
    else:
        offs_nb = offs_n % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < end
        if A_GATHER:
            ia = tl.load(a_idx_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            ia = rows.to(tl.int64)
        if B_GATHER:
            ib = tl.load(b_idx_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            ib = rows.to(tl.int64)
        a = tl.load(a_ptr + ia[None, :] * stride_a + offs_mb[:, None], mask=r_mask[None, :], other=0.0)  # (BM, BK)
        b = tl.load(b_ptr + ib[:, None] * stride_b + offs_nb[None, :], mask=r_mask[:, None], other=0.0)  # (BK, BN)
        if B_SCALE:
            s = tl.load(scale_ptr + rows, mask=r_mask, other=0.0)
            b = (b.to(tl.float32) * s[:, None]).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _gather_sum_kernel(src_ptr, idx_ptr, out_ptr, D, stride_src, stride_out,
                       K_CHOICES: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j src[idx[t * k + j]] in fp32 (the k rows of token t), one BLOCK_D slice of one token."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(K_CHOICES):
        r = tl.load(idx_ptr + t * K_CHOICES + j).to(tl.int64)
        acc += tl.load(src_ptr + r * stride_src + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers

# Tile shapes per kernel: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_M of the token GEMMs is the
# schedule's block_m, shared by the four token kernels. The CUDA entries are the fastest of
# `scripts/bench_moe.py --sweep` for the 30B-A3B shape on H100; the interpreter entries keep CPU tests fast.
CONFIGS = {
    "cuda": {  # H100 sweep, 2026-11-25, 16K tokens (docs/benchmarks.md): TFLOP/s of each kernel alone
        "gate_up": (128, 128, 64, 8, 3),   # 477
        "down": (128, 256, 64, 8, 3),      # 455
        "down_bwd": (128, 64, 64, 8, 4),   # 222 (heavy epilogue: gu loads, dSwiGLU, d weight)
        "dx": (128, 256, 64, 8, 3),        # 495
        "wgrad": (128, 128, 64, 4, 3),     # 351 (dW1 and dW2 together)
    },
    "cuda_fp32": {  # 4-byte operands: half the K depth and fewer stages to fit shared memory
        "gate_up": (64, 64, 32, 4, 3),
        "down": (64, 64, 32, 4, 3),
        "down_bwd": (64, 64, 32, 4, 3),
        "dx": (64, 64, 32, 4, 3),
        "wgrad": (64, 64, 32, 4, 3),
    },
    "interpret": {k: (16, 32, 32, 4, 1) for k in ("gate_up", "down", "down_bwd", "dx", "wgrad")},
}


def _configs(x: Tensor) -> dict:
    if x.device.type != "cuda":
        return CONFIGS["interpret"]
    return CONFIGS["cuda_fp32"] if x.dtype == torch.float32 else CONFIGS["cuda"]


def block_m_for(x: Tensor) -> int:
    """Rows per tile of the token GEMMs for x's device/dtype (the schedule must be built with it)."""
    return _configs(x)["gate_up"][0]


def _precision(t: Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # fp32 exact; ignored for 16-bit operands


def _num_tiles(sched: Schedule) -> int:
    return sched.tile_expert.numel()


def gate_up_fwd(x: Tensor, w1: Tensor, sched: Schedule, save_gu: bool) -> tuple[Tensor | None, Tensor]:
    """gu (N, 2I) (None unless save_gu) and h = silu(gate) * up (N, I), rows in sorted order."""
    N, H, I = sched.sorted_token.numel(), x.shape[1], w1.shape[2] // 2
    BM, BN, BK, warps, stages = _configs(x)["gate_up"]
    assert BM == sched.block_m
    h = torch.empty(N, I, device=x.device, dtype=x.dtype)
    gu = torch.empty(N, 2 * I, device=x.device, dtype=x.dtype) if save_gu else h
    grid = (_num_tiles(sched) * triton.cdiv(I, BN),)
    _gate_up_kernel[grid](x, w1, gu, h, sched.sorted_token, sched.tile_expert, sched.tile_row_start,
                          sched.tile_row_end, H, I, x.stride(0), w1.stride(0), w1.stride(1), w1.stride(2),
                          gu.stride(0), h.stride(0), SAVE_GU=save_gu, EVEN_K=H % BK == 0, EVEN_N=I % BN == 0,
                          PRECISION=_precision(x), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps,
                          num_stages=stages)
    return (gu if save_gu else None), h


def token_gemm(a: Tensor, b: Tensor, sched: Schedule, transpose_b: bool, scale: Tensor | None,
               kind: str) -> Tensor:
    """c[rows] = a[rows] @ B[e] (* scale[rows]) with B[e] = b[e] or b[e]^T; a (N, K), b (E, K, Nout) or (E, Nout, K)."""
    N, K = a.shape
    if transpose_b:
        n_out, stride_bk, stride_bn = b.shape[1], b.stride(2), b.stride(1)
    else:
        n_out, stride_bk, stride_bn = b.shape[2], b.stride(1), b.stride(2)
    BM, BN, BK, warps, stages = _configs(a)[kind]
    assert BM == sched.block_m
    c = torch.empty(N, n_out, device=a.device, dtype=a.dtype)
    grid = (_num_tiles(sched) * triton.cdiv(n_out, BN),)
    _token_gemm_kernel[grid](a, b, c, scale if scale is not None else a, sched.tile_expert, sched.tile_row_start,
                             sched.tile_row_end, n_out, K, a.stride(0), b.stride(0), stride_bk, stride_bn,
                             c.stride(0), HAS_SCALE=scale is not None, EVEN_K=K % BK == 0, EVEN_N=n_out % BN == 0,
                             PRECISION=_precision(a), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                             num_warps=warps, num_stages=stages)
    return c


def down_bwd(dy: Tensor, w2: Tensor, gu: Tensor, scale: Tensor, sched: Schedule) -> tuple[Tensor, Tensor]:
    """dgu (N, 2I) and d(routing weight) per sorted row (N,) fp32, from dy (T, H)."""
    N, H, I = gu.shape[0], dy.shape[1], w2.shape[1]
    BM, BN, BK, warps, stages = _configs(dy)["down_bwd"]
    assert BM == sched.block_m
    num_n = triton.cdiv(I, BN)
    dgu = torch.empty_like(gu)
    dw_part = torch.empty(N, num_n, device=dy.device, dtype=torch.float32)
    grid = (_num_tiles(sched) * num_n,)
    _down_bwd_kernel[grid](dy, w2, gu, scale, dgu, dw_part, sched.sorted_token, sched.tile_expert,
                           sched.tile_row_start, sched.tile_row_end, H, I, dy.stride(0), w2.stride(0),
                           w2.stride(1), w2.stride(2), gu.stride(0), dgu.stride(0), dw_part.stride(0),
                           EVEN_K=H % BK == 0, EVEN_N=I % BN == 0, PRECISION=_precision(dy), BLOCK_M=BM,
                           BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages)
    return dgu, dw_part.sum(1)


def weight_grad(a: Tensor, a_idx: Tensor | None, b: Tensor, b_idx: Tensor | None, scale: Tensor | None,
                sched: Schedule, out: Tensor) -> Tensor:
    """out[e] (M, N) = sum over expert e's sorted rows r of a[ia(r)]^T b[ib(r)] * scale[r]; out (E, M, N)."""
    E, M, N = out.shape
    BM, BN, BK, warps, stages = _configs(a)["wgrad"]
    grid = (E * triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _wgrad_kernel[grid](a, a_idx if a_idx is not None else sched.sorted_token, b,
                        b_idx if b_idx is not None else sched.sorted_token, scale if scale is not None else a,
                        out, sched.expert_offsets, M, N, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
                        out.stride(2), A_GATHER=a_idx is not None, B_GATHER=b_idx is not None,
                        B_SCALE=scale is not None, EVEN_M=M % BM == 0, EVEN_N=N % BN == 0,
                        PRECISION=_precision(a), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                        num_warps=warps, num_stages=stages)
    return out


def gather_sum(src: Tensor, idx: Tensor, num_tokens: int, k: int) -> Tensor:
    """out[t] = sum_j src[idx[t * k + j]], fp32 accumulation; src (N, D) -> (T, D) in src's dtype."""
    D = src.shape[1]
    out = torch.empty(num_tokens, D, device=src.device, dtype=src.dtype)
    block_d = 1024 if src.device.type == "cuda" else 64
    grid = (num_tokens, triton.cdiv(D, block_d))
    _gather_sum_kernel[grid](src, idx, out, D, src.stride(0), out.stride(0), K_CHOICES=k, BLOCK_D=block_d,
                             num_warps=4)
    return out
