"""qwen3vl-lab training: Hydra-configured fine-tuning and from-scratch training of Qwen3-VL (`python -m train`).

Modules: config (typed config), data (JSONL -> packed batches), loss (chunked cross-entropy), optim (groups,
freezing, AdamW, schedule), step (train step, validation), lora, checkpoint, parallel (activation checkpointing,
compile, FSDP2, applied from outside the model), export, logger, trainer (the job), vision_warmup, ocr_data
(synthetic OCR), plot. The model is built by model/build.py. See docs/training.md.
"""
