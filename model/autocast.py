"""Running a single-dtype kernel under autocast."""
from __future__ import annotations

import torch


def to_autocast_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype when autocast is on for the tensors' device, else return them unchanged.

    Our Triton kernels take one dtype. Under autocast (fp32 master weights, fp32 RoPE outputs) this runs them in the
    autocast dtype, as autocast would run the torch backend's SDPA and matmuls. The casts are differentiable.
    """
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) for t in tensors)
