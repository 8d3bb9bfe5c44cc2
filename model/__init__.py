"""qwen3vl-lab model package: Qwen3-VL (dense and MoE) in plain PyTorch.

Public API:
    load_pretrained, save_pretrained   -- official Hugging Face safetensors checkpoints (model/checkpoint.py)
    load_processor                     -- tokenizer, chat template, image/video preprocessing (model/processing/)
    Qwen3VL, Qwen3VLConfig, preset     -- the model and its configuration
"""
from .config import Qwen3VLConfig, TextConfig, VisionConfig, RopeConfig, MoEConfig, preset
from .qwen3vl import Qwen3VL
from .checkpoint import load_pretrained, save_pretrained


def __getattr__(name):
    # The processor pulls in PIL/av/tokenizers; import it only when asked for.
    if name == "load_processor":
        from .processing import load_processor

        return load_processor
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = [
    "Qwen3VL", "Qwen3VLConfig", "TextConfig", "VisionConfig", "RopeConfig", "MoEConfig", "preset",
    "load_pretrained", "save_pretrained", "load_processor",
]
