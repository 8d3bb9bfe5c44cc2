"""Chat with a Qwen3-VL checkpoint (or a random preset) from the command line: text, images and videos.

    python scripts/generate.py --checkpoint /path/to/Qwen3-VL-2B-Instruct --image cat.jpg --prompt "Describe it."
    python scripts/generate.py --checkpoint /path/to/ckpt --video clip.mp4 --fps 2 --prompt "What happens?"
    python scripts/generate.py --preset tiny --prompt "Hello"          # random weights: checks the pipeline runs
    python scripts/generate.py --smoke     # the same with a generated image and 4 new tokens (CPU, seconds)

The processor comes from the checkpoint directory (tokenizer.json, chat template, preprocessor_config.json) when
present, else the embedded default (real Qwen3-VL vocabulary, official preprocessing budgets).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from model import Qwen3VL, load_pretrained, load_processor, preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate with Qwen3-VL.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="checkpoint directory (official safetensors layout)")
    src.add_argument("--preset", help="random model from a preset (e.g. tiny): a pipeline check, not a chat")
    ap.add_argument("--prompt")
    ap.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    ap.add_argument("--video", action="append", default=[], help="video path (repeatable)")
    ap.add_argument("--fps", type=float, default=2.0, help="video sampling rate")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn-backend", choices=["torch", "triton"], default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, a generated 64x48 image, 4 new tokens")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.prompt, args.max_new_tokens, args.device = "tiny", "Describe it.", 4, "cpu"
        args.image = [_smoke_image()]
    if not (args.checkpoint or args.preset) or not args.prompt:
        ap.error("give --checkpoint or --preset, and --prompt (or --smoke)")

    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    t0 = time.perf_counter()
    if args.checkpoint:
        model = load_pretrained(args.checkpoint, dtype=dtype, device=args.device, attn_backend=args.attn_backend)
        has_tok = (args.checkpoint / "tokenizer.json").is_file()
        proc = load_processor(args.checkpoint if has_tok else None)
    else:
        cfg = preset(args.preset)
        if args.attn_backend:
            cfg = cfg.replace(attn_backend=args.attn_backend)
        model = Qwen3VL(cfg).to(args.device, dtype).eval()
        proc = load_processor(None)
    print(f"model ready in {time.perf_counter() - t0:.1f}s "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}, {args.device})")

    content = [{"type": "image", "image": p} for p in args.image]
    content += [{"type": "video", "video": p, "fps": args.fps} for p in args.video]
    content.append({"type": "text", "text": args.prompt})
    batch = proc(messages=[[{"role": "user", "content": content}]], add_generation_prompt=True)
    inputs = {k: v.to(args.device) for k, v in batch.items() if torch.is_tensor(v)}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in inputs:
            inputs[k] = inputs[k].to(dtype)
    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    dt = time.perf_counter() - t0
    new = out[0, inputs["input_ids"].shape[1]:]
    print(proc.decode(new, skip_special_tokens=True))
    print(f"[{inputs['input_ids'].shape[1]} prompt tokens, {len(new)} new tokens in {dt:.2f}s]")


def _smoke_image() -> str:
    """A small random RGB image written to the temp directory (for --smoke)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (48, 64, 3), generator=g, dtype=torch.uint8).numpy()
    path = Path(tempfile.gettempdir()) / "qwen3vl_generate_smoke.png"
    Image.fromarray(pixels).save(path)
    return str(path)


if __name__ == "__main__":
    main()
