"""Everything that changes how a single-device model runs, applied from outside it in torchtitan's order
(torchtitan/models/llama3/infra/parallelize.py): activation checkpointing, then torch.compile of each block, then
FSDP2 `fully_shard` on every vision block and decoder layer, then on the root. model/ knows none of this.

Works under `torchrun` on CUDA (nccl) and on CPU (gloo). The root keeps its parameters unsharded after forward
(`reshard_after_forward=False`) because the chunked loss reads `lm_head.weight` after the model's forward returns.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import ParallelConfig


def init_distributed(cfg: ParallelConfig, device_type: str) -> tuple[int, int, int]:
    """Start the process group for `strategy=fsdp` (env:// from torchrun); returns (rank, world, local_rank).

    Args:
        cfg: ParallelConfig (backend auto: nccl on CUDA, gloo on CPU).
        device_type: "cuda" or "cpu".
    """
    if cfg.strategy == "none":
        return 0, 1, 0
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("parallel.strategy=fsdp needs torchrun (RANK / WORLD_SIZE / MASTER_ADDR not set); "
                               "use `torchrun --nproc_per_node=N -m train ...` or parallel=none")
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def apply_activation_checkpointing(model: torch.nn.Module, every: int = 1, vision: bool = True) -> torch.nn.Module:
    """Recompute blocks in backward instead of storing their activations (non-reentrant checkpointing).

    Uses the composable `torch.distributed._composable.checkpoint`: forward hooks on each block, no wrapper
    module, so parameter names and state_dict keys (LoRA, freezing groups, checkpoints, export) stay as they are.

    Args:
        model: Qwen3VL with `model.visual.blocks` and `model.language_model.layers`.
        every: checkpoint decoder layer i when i % every == 0 (1: all; 2: half, trading memory for less recompute).
        vision: also every vision block (False: they are cheap to store and slow to recompute for their work).
    Returns:
        the same module.
    """
    from torch.distributed._composable import checkpoint

    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    if vision:
        for block in model.model.visual.blocks:
            checkpoint(block)
    for i, layer in enumerate(model.model.language_model.layers):
        if i % every == 0:
            checkpoint(layer)
    return model


def apply_compile(model: torch.nn.Module, **compile_kwargs) -> torch.nn.Module:
    """torch.compile each vision block and decoder layer in place (fuses norms, rotary and activations).

    `nn.Module.compile` keeps the module tree, so names are unchanged; apply activation checkpointing first (as
    torchtitan does): its hooks then run inside the compiled call and the block is still recomputed in backward.
    Compilation costs time at the first call of each new shape; the numerics
    are unchanged up to floating-point reassociation.

    Args:
        model: Qwen3VL.  compile_kwargs: for `nn.Module.compile` (e.g. dynamic=True, mode=...).
    Returns:
        the same module.
    """
    for block in model.model.visual.blocks:
        block.compile(**compile_kwargs)
    for layer in model.model.language_model.layers:
        layer.compile(**compile_kwargs)
    return model


def apply_fsdp(model: torch.nn.Module, cfg: ParallelConfig, device_type: str) -> torch.nn.Module:
    """Shard `model` (a Qwen3VL, already on its device) with FSDP2: each vision block, each decoder layer, the root.

    Args:
        model: Qwen3VL with `model.visual.blocks` and `model.language_model.layers`.
        cfg: ParallelConfig (`reshard_after_forward` for the blocks).
        device_type: "cuda" or "cpu" (the device mesh type).
    Returns:
        the same module, now an FSDPModule.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for block in model.model.visual.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def all_reduce_sum(x: float | int, device: torch.device) -> float:
    """Sum a Python number over ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of an FSDP2 model (on every rank; rank 0 writes it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
