"""`model/` is single-device, plain PyTorch: importing it pulls in no training, Hydra, distributed, Triton or
transformers module (house rule; Triton is imported only when a Triton backend runs, transformers only by tests).

Each import runs in a fresh interpreter and lists what it added to sys.modules beyond a plain `import torch`
(torch may import parts of torch.distributed itself; those are in the baseline, not blamed on us).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("train", "eval", "hydra", "omegaconf", "torch.distributed", "triton", "transformers", "kernels")

# model.processing is the processor (a module today, a subpackage once split); it is imported lazily by
# `model.load_processor` and must obey the same rule.
MODULES = ["model", "model.processing"] + sorted(
    f"model.{p.stem}" for p in (ROOT / "model").glob("*.py") if p.stem not in ("__init__", "processing"))

PROBE = """
import importlib, json, sys
import torch
added, seen = {}, set(sys.modules)
for name in NAMES:
    importlib.import_module(name)
    added[name] = sorted(set(sys.modules) - seen)  # what this import added beyond torch and the earlier imports
    seen = set(sys.modules)
print(json.dumps(added))
"""


def _new_modules(names: list[str]) -> dict[str, list[str]]:
    """{name: modules its import added}, importing `names` in order in one fresh interpreter after `import torch`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", PROBE.replace("NAMES", repr(names))], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, f"import failed:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _forbidden(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_model_imports_no_training_or_backend_module():
    added = _new_modules(MODULES)
    assert "model.qwen3vl" in added["model"]  # the probe really imported the package
    bad = {name: _forbidden(mods) for name, mods in added.items() if _forbidden(mods)}
    assert not bad, f"model/ imports forbidden modules at import time: {bad}"


def test_the_probe_sees_a_forbidden_import():
    """The check can fail: importing train.config after model pulls in `train`, which the rule forbids for model/."""
    added = _new_modules(["model", "train.config"])
    assert "train" in _forbidden(added["train.config"])
