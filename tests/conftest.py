"""Test-suite setup: on machines without CUDA, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before any `triton.jit` function is created, so it is set here, before the
test modules import `kernels`.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def single_thread():
    """Training tests run with one intra-op thread (`pytestmark = pytest.mark.usefixtures("single_thread")`)."""
    from .test_train_common import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The training tests' small synthetic OCR set ({"train": path, "val": path}), generated once per module."""
    from .test_train_common import ocr_set

    return ocr_set(tmp_path_factory.mktemp("ocr"))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a failure reproduces with `pytest -k NAME`."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
