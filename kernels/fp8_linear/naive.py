"""Plain-PyTorch fp32 reference of the W8A16 linear (`kernels.fp8_linear.fp8_linear`): dequantise, then matmul.

A loop over the scale blocks, slow and obvious on purpose; it shares no code with model/fp8.py.
"""
from torch import Tensor


def fp8_linear_ref(x: Tensor, weight: Tensor, scale_inv: Tensor, block: tuple[int, int],
                   bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T + b with W[i, j] = fp32(weight[i, j]) * scale_inv[i // bn, j // bk].

    Args:
        x: (..., K) any float dtype. weight: (N, K) float8_e4m3fn. scale_inv: (ceil(N / bn), ceil(K / bk)).
        block: (bn, bk). bias: (N,) or None.
    Returns: (..., N) fp32.
    """
    bn, bk = block
    w = weight.float()
    for i in range(0, w.shape[0], bn):
        for j in range(0, w.shape[1], bk):
            w[i:i + bn, j:j + bk] *= scale_inv[i // bn, j // bk].float()
    y = x.float() @ w.T
    return y if bias is None else y + bias.float()
