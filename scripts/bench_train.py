"""Train-step benchmark: our Qwen3-VL training step vs transformers' Qwen3VLForConditionalGeneration, one GPU.

Both sides in one process, same random Qwen3-VL-2B-shaped weights layout (bf16 parameters, random init), the same
packed multimodal batch (one image of 1024 patches = 256 merged tokens + random text, `--tokens` in all, labels on
every text position), AdamW, activation / gradient checkpointing, SDPA attention. Ours: `train.trainer.forward_losses`
(chunked cross-entropy from hidden states, no full logits) + AdamW(fused). Reference: `model(..., labels=...)`
(`attn_implementation="sdpa"`, `gradient_checkpointing_enable()`). Timed with CUDA events after warm-up (median of
`--steps`); peak memory = torch.cuda.max_memory_allocated over the timed steps (weights + optimizer state included).

    python scripts/bench_train.py --tokens 8192 --steps 6            # prints a markdown table
    python scripts/bench_train.py --smoke                            # CPU, tiny preset: checks the script runs
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import platform
import time

import torch
from _bench import device_name, hf_twin, median_ms, peak_memory_gib, reset_peak_memory

from model.config import IGNORE_INDEX

DEVICE, DTYPE, PRECISION = "cuda", torch.bfloat16, "bf16"  # cpu, fp32 under --smoke (CPU bf16 is slow)
IMAGE_SIDE = 32  # patches per side of the one image (1024 patches = 256 merged tokens); 4 under --smoke


def make_batch(cfg, n_tokens: int, device, seed: int = 0) -> dict:
    """One packed row: text, <|vision_start|> 256 image pads <|vision_end|>, text; labels on text positions."""
    from model.positions import get_rope_index

    g = torch.Generator().manual_seed(seed)
    n_img = IMAGE_SIDE * IMAGE_SIDE // 4
    n_text = n_tokens - n_img - 2
    pre = n_text // 8
    ids = torch.cat([torch.randint(0, 151000, (pre,), generator=g), torch.tensor([cfg.vision_start_token_id]),
                     torch.full((n_img,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                     torch.randint(0, 151000, (n_text - pre,), generator=g)])[None]
    labels = ids.clone()
    labels[ids == cfg.image_token_id] = IGNORE_INDEX
    grid = torch.tensor([[1, IMAGE_SIDE, IMAGE_SIDE]])
    pos, _ = get_rope_index(ids, grid, None, config=cfg)
    shifted = torch.cat([labels[:, 1:], torch.full((1, 1), IGNORE_INDEX)], 1)
    return {"input_ids": ids.to(device), "labels_unshifted": labels.to(device), "labels": shifted.to(device),
            "position_ids": pos.to(device), "cu_seqlens": torch.tensor([0, n_tokens], dtype=torch.int32, device=device),
            "pixel_values": torch.randn(IMAGE_SIDE ** 2, 1536, generator=g).to(device, DTYPE),
            "image_grid_thw": grid.to(device), "pixel_values_videos": None, "video_grid_thw": None}


def _train_steps(m, loss_fn, steps: int, warmup: int, in_backward: bool = False,
                 profile: bool = False) -> tuple[float, float, float]:
    """Time optimizer steps (loss_fn() -> loss, backward, fused AdamW); returns (median ms, peak GiB, last loss).

    in_backward: each parameter's AdamW step runs as soon as its gradient is complete (a post-accumulate-grad hook,
    as torchtune's optimizer_in_bwd), so gradients never all exist at once (same update; no global grad clipping).
    """
    gc.collect()  # release what the previous run left behind before this one allocates
    reset_peak_memory()
    if in_backward:
        opts = {p: torch.optim.AdamW([p], lr=1e-5, fused=DEVICE == "cuda") for p in m.parameters()}

        def hook(p):
            opts[p].step()
            opts[p].zero_grad(set_to_none=True)

        for p in m.parameters():
            p.register_post_accumulate_grad_hook(hook)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=DEVICE == "cuda")
    last = {}

    def step():
        loss = loss_fn()
        loss.backward()
        if not in_backward:
            opt.step()
            opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    ms = median_ms(step, reps=steps, warmup=warmup)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof_ctx

        with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
    return ms, peak_memory_gib(), float(last["loss"])


def bench_ours(cfg, batch, steps, warmup, attn_backend: str, compile_blocks: bool, chunk: int, ac: bool = True,
               ac_every: int = 1, in_backward: bool = False, profile: bool = False, vision_ac: bool = True):
    """Our model + chunked loss + fused AdamW; returns (ms, peak GiB, last loss)."""
    from model import Qwen3VL
    from train.parallel import apply_activation_checkpointing, apply_compile
    from train.step import forward_losses

    torch.manual_seed(0)
    with torch.device(DEVICE):
        m = Qwen3VL(cfg.replace(attn_backend=attn_backend)).to(DTYPE)
    m.train()
    if ac:
        apply_activation_checkpointing(m, every=ac_every, vision=vision_ac)
    if compile_blocks:
        apply_compile(m)
    n = int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_fn():
        losses, _ = forward_losses(m, batch, chunk, precision=PRECISION)
        return losses.sum() / n

    return _train_steps(m, loss_fn, steps, warmup, in_backward, profile)


def bench_hf(cfg, batch, steps, warmup):
    """transformers' Qwen3VLForConditionalGeneration (sdpa, gradient checkpointing) + fused AdamW."""
    torch.manual_seed(0)
    m = hf_twin(cfg, DEVICE, DTYPE)  # its own random init: the two models never share the GPU
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.config.use_cache = False
    kw = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"],
          "image_grid_thw": batch["image_grid_thw"], "labels": batch["labels_unshifted"]}
    if "mm_token_type_ids" in inspect.signature(m.forward).parameters:
        kw["mm_token_type_ids"] = (batch["input_ids"] == cfg.image_token_id).int()
    return _train_steps(m, lambda: m(**kw).loss, steps, warmup)


def main():
    """Run both sides and print a markdown table (+ JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2b")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk", type=int, default=2048, help="tokens per lm_head chunk of our loss")
    p.add_argument("--ours", default="torch", help="comma list of our variants: <torch|triton>[+compile][+noac]"
                   "[+ac2|+ac3 (checkpoint every 2nd / 3rd decoder layer)][+vnoac (vision tower not checkpointed)]"
                   "[+oib (optimizer step in backward)]")
    p.add_argument("--profile", action="store_true", help="print the CUDA kernel table of one step of each variant")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--json", default=None, help="also write results here")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 300 tokens, one step: checks it runs")
    a = p.parse_args()
    global DEVICE, DTYPE, PRECISION, IMAGE_SIDE
    if a.smoke:
        DEVICE, DTYPE, PRECISION, IMAGE_SIDE = "cpu", torch.float32, "fp32", 4
        a.preset, a.tokens, a.steps, a.warmup, a.chunk = "tiny", 64, 1, 0, 32

    from model import preset

    cfg = preset(a.preset)
    batch = make_batch(cfg, a.tokens, DEVICE)
    rows = []
    if not a.skip_hf:
        ms, gib, loss = bench_hf(cfg, batch, a.steps, a.warmup)
        rows.append(("transformers (sdpa, grad ckpt)", ms, gib, loss))
    for v in a.ours.split(","):
        backend, *flags = v.split("+")
        unknown = set(flags) - {"compile", "noac", "ac2", "ac3", "oib", "vnoac"}
        if unknown:
            raise SystemExit(f"unknown variant flags {sorted(unknown)} in {v!r} (use compile, noac, ac2, ac3, vnoac, "
                             "oib)")
        every = 2 if "ac2" in flags else (3 if "ac3" in flags else 1)
        try:
            ms, gib, loss = bench_ours(cfg, batch, a.steps, a.warmup, backend, "compile" in flags, a.chunk,
                                       ac="noac" not in flags, ac_every=every, in_backward="oib" in flags,
                                       profile=a.profile, vision_ac="vnoac" not in flags)
        except Exception as e:  # report and go on with the other variants
            print(f"variant {v} failed: {type(e).__name__}: {e}", flush=True)
            gc.collect()
            reset_peak_memory()
            continue
        ckpt = "no act ckpt" if "noac" in flags else ("act ckpt" if every == 1 else f"act ckpt every {every}")
        ckpt += " (not the vision tower)" if "vnoac" in flags and "noac" not in flags else ""
        rows.append((f"ours (attn {backend}{', compiled blocks' if 'compile' in flags else ''}, {ckpt}"
                     f"{', AdamW in backward' if 'oib' in flags else ''}, chunked CE)", ms, gib, loss))
    import transformers

    print(f"device: {device_name(DEVICE)}  torch {torch.__version__}  transformers {transformers.__version__}"
          f"  python {platform.python_version()}  date {time.strftime('%Y-%m-%d')}")
    print(f"Qwen3-VL-{a.preset} shape, random {str(DTYPE).split('.')[-1]} weights, 1 packed row of {a.tokens} tokens "
          f"(1 image, {IMAGE_SIDE ** 2} patches), AdamW, median of {a.steps} steps after {a.warmup} warm-up")
    print("| run | ms/step | tokens/s | peak GiB | loss |\n|---|---|---|---|---|")
    base = rows[0] if not a.skip_hf else None
    for name, ms, gib, loss in rows:
        extra = ""
        if base is not None and name != base[0]:
            extra = f" ({base[1] / ms:.2f}x tokens/s, {gib / max(base[2], 1e-9):.2f}x memory)"
        print(f"| {name} | {ms:.0f} | {a.tokens / ms * 1e3:,.0f} | {gib:.1f} | {loss:.3f} |{extra}")
    if a.json:
        json.dump([{"run": r[0], "ms": r[1], "tokens_per_s": a.tokens / r[1] * 1e3, "peak_gib": r[2], "loss": r[3]}
                   for r in rows], open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
