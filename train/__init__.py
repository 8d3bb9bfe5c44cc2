"""qwen3vl-lab training: Hydra-configured fine-tuning and from-scratch training of Qwen3-VL (`python -m train`).

Modules: config (typed config), data (JSONL -> packed batches), loss (chunked cross-entropy), lora, checkpoint,
parallel (FSDP2), trainer (the loop), ocr_data (synthetic OCR), plot. See docs/training.md.
"""
