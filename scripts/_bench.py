"""Shared by the benchmark scripts: one timer, one decode-step timer, one peak-memory reading, one markdown table,
one builder of the transformers twin model.

Scripts run as `python scripts/<name>.py` have `scripts/` on sys.path, so they `from _bench import ...`; the
package itself (`model`, `kernels`, `train`) comes from the editable install (`pip install -e .`).

Timing method: `warmup` untimed calls, then `reps` calls each between two CUDA events (recorded back to back, one
synchronize at the end, as `triton.testing.do_bench` does), median in ms. `flush_l2` zeroes a 256 MB buffer
before each timed call (outside the events), so inputs that fit in L2 are not measured warm. Without CUDA the same
loop runs with `time.perf_counter`: the --smoke runs, a check that the script works, not a measurement.
"""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, *, reps: int = 5, warmup: int = 2, grad_to_none=None, flush_l2: bool = False) -> float:
    """Median milliseconds of `fn()` after warm-up; resets the CUDA peak-memory counter after the warm-up.

    Args:
        fn: the callable to time (its result is ignored).
        reps: timed calls; warmup: untimed calls first (compilation, autotuning, allocator warm-up).
        grad_to_none: tensors whose .grad is set to None before each call (outside the timing), so backward
            timings do not include gradient accumulation.
        flush_l2: zero a 256 MB buffer before each timed call (CUDA only).
    """
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if cuda and flush_l2 else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, events = [], []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        if cache is not None:
            cache.zero_()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            events.append((a, b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in events]
    return statistics.median(times)


def graph_ms(fn, *, reps: int = 20, flush_l2: bool = True) -> float:
    """Median ms of one replay of `fn` captured in a CUDA graph: the GPU time, without the Python and launch
    overhead that `median_ms` also counts when the kernels are short (decode: generate replays its step as a CUDA
    graph, model/generation.py's StaticDecoder). `fn` is called twice first (compilation), then captured."""
    fn(), fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return median_ms(g.replay, reps=reps, warmup=2, flush_l2=flush_l2)


def reset_peak_memory():
    """Free cached blocks and restart the peak-memory counter (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """Peak CUDA memory allocated since the last reset, GiB (0.0 without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


@torch.no_grad()
def decode_ms(model, cache, steps: int = 16, static: bool = True) -> float:
    """Median ms of one decode step (one new token, logits) at the cache's length; the cache is restored.
    static: the CUDA-graph step that generate uses on a GPU (model/generation.py's StaticDecoder), else one eager
    forward per token."""
    from model.generation import StaticDecoder

    n0 = cache.length
    tok = torch.tensor([[1000]], device=model.device)
    dec = StaticDecoder(model, cache) if static else None
    times = []
    for i in range(steps + 3):
        pos = cache.next_position.view(1, 1, 1).expand(3, 1, 1)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if dec is not None:
            dec.step(tok, pos)
        else:
            model(tok, position_ids=pos, past_key_values=cache, logits_to_keep=1)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    if dec is not None:
        dec.close()
    cache.truncate(n0)
    return sorted(times)[len(times) // 2]


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines: the header, the separator, then one line per row (cells already formatted)."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def device_name(device) -> str:
    """A device description for result tables."""
    import platform

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def hf_twin(cfg, device, dtype: torch.dtype, state_dict: dict | None = None, attn_implementation: str = "sdpa"):
    """transformers' Qwen3VLForConditionalGeneration for our config, optionally holding our weights.

    Args:
        cfg: model.Qwen3VLConfig (written to transformers through `cfg.to_hf()`).
        device, dtype: where and in what dtype the twin is built.
        state_dict: our model's state dict to copy in (the checkpoint names are the same); None keeps the twin's
            own random init (memory benchmarks that must not hold both models).
        attn_implementation: transformers' attention backend.
    Returns:
        the twin in eval mode.
    """
    import transformers

    hf_cfg = transformers.Qwen3VLConfig.from_dict(cfg.to_hf())
    hf_cfg._attn_implementation = attn_implementation
    with torch.device(device):
        hf = transformers.Qwen3VLForConditionalGeneration._from_config(
            hf_cfg, attn_implementation=attn_implementation, dtype=dtype)
    if state_dict is not None:
        missing, unexpected = hf.load_state_dict(state_dict, strict=False)
        tied = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"twin does not take our weights: missing {missing}, unexpected {unexpected}")
        if tied:
            hf.tie_weights()
    return hf.eval()
