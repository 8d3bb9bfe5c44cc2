"""The final export: weights in the official safetensors layout (LoRA merged, adapter saved beside) plus the files
`load_processor` needs (tokenizer, chat template, preprocessor configs with the training's pixel budgets)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config
from .parallel import full_state_dict


def export(model, path: Path, cfg: Config, rank: int = 0, distributed: bool = False) -> Path:
    """Final weights in the official safetensors layout (save_pretrained), LoRA merged; adapters saved beside.

    Args:
        model: the trained model (LoRA / FSDP handled here).  path: output directory.
    """
    from model import Qwen3VL, save_pretrained

    from .lora import lora_modules, remove_lora, save_lora_adapter

    if distributed:
        sd = full_state_dict(model)
        if rank == 0:
            cpu = Qwen3VL(model.config, init_weights=False)
            if cfg.train.mode == "lora":
                from .lora import apply_lora

                lc = cfg.train.lora
                apply_lora(cpu, lc.r, lc.alpha, lc.dropout, lc.target_modules, lc.exclude_vision)
            cpu.load_state_dict(sd, strict=False)
            cpu.tie_weights()
            model = cpu
        dist.barrier()
        if rank != 0:
            return path
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise RuntimeError(f"refusing to export non-finite weights ({len(bad)} tensors, first {bad[:3]})")
    if lora_modules(model):
        save_lora_adapter(model, str(path.parent / "adapter"), base_model_name_or_path=cfg.model.path)
        remove_lora(model, merge=True)
    save_pretrained(model, path)
    copy_processor_files(cfg.model.path, path)
    write_preprocessor_configs(cfg.data, path)
    return path


def write_preprocessor_configs(data, dst: Path):
    """Record the pixel budgets and video sampling the model was trained with, in the checkpoint's
    preprocessor_config.json / video_preprocessor_config.json (transformers' keys), so that `load_processor(dst)`
    preprocesses exactly as training did. Values the training config does not set (patch geometry, mean/std) are
    kept from the copied files, or the official ones."""
    from model.processing import load_processor

    from .data import training_processor

    training_processor(load_processor(dst), data).save_preprocessor_configs(dst)


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json", "generation_config.json")


def copy_processor_files(src: str | None, dst: Path):
    """Make `dst` loadable by `load_processor`: copy the source checkpoint's tokenizer / preprocessor files, or
    write the embedded tokenizer as tokenizer.json when training started from a preset (src None)."""
    import shutil

    if src is None:
        from model.processing.tokenizer import default_tokenizer_json_path

        shutil.copyfile(default_tokenizer_json_path(), dst / "tokenizer.json")
        return
    for name in PROCESSOR_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)
