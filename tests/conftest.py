"""Test-suite setup: on machines without CUDA, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before any `triton.jit` function is created, so it is set here, before the
test modules import `kernels`.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
