"""Every script in scripts/ runs: its CPU smoke mode (tiny shapes, seconds) in a fresh subprocess, as a user types it.

A benchmark that fails at import (as `bench_moe.py` once did, loading model/moe.py by file path) fails here. The
smoke runs check that the script works and prints its result, not the numbers (benchmarks are not tests). Each
case names what its output must contain; scripts that compare against a reference print it, and those checks run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# script -> (extra arguments after --smoke, text its output must contain)
CASES = {
    "ask_video.py": ([], "after the cached video"),
    "attention_ptx_report.py": ([], "bwd_dkdv_kernel"),
    # one case: the full --smoke runs every case and the decode path (minutes in the interpreter)
    "bench_attention.py": (["--only", "causal 8K"], "| causal 8K | ours |"),
    "bench_fp8_decode.py": ([], "| fp8 | torch |"),
    "bench_fp8_linear.py": ([], "| 5 |"),
    "bench_long_video.py": ([], "\"decode_ms_fp8\""),
    "bench_moe.py": ([], "| block | uniform | 24 | hf-eager |"),
    "bench_prefill.py": ([], "| ours (torch sdpa) | 2 |"),
    "bench_sparse_prefill.py": ([], "| 256 | xattention |"),
    "bench_train.py": ([], "| ours (attn torch"),
    "bench_video.py": ([], "| transformers | 6 |"),
    "bench_video_stream.py": ([], "| stream 8 | 144 | 60 |"),
    "generate.py": ([], "4 new tokens"),
    "make_grounding_data.py": (["--out", "{tmp}/grounding"], "(4 scenes)"),
    "make_ocr_data.py": (["--out", "{tmp}/ocr"], "(4 lines)"),
    "measure_load_memory.py": (["--dir", "{tmp}/ckpt"], "x the weights"),
    # smaller than its own --smoke (tests/test_pe_ablation.py runs that one): one variant, one task, one step
    "pe_ablation.py": (["--out", "{tmp}/pe", "run=[videorope]", "train.steps=1", "eval.trials=1", "data.tasks=[read]",
                        "data.train_groups=4", "data.min_groups=2", "train.vision_warmup.steps=1",
                        "+train.first_tasks=[read]", "+train.first_steps=1",
                        "train.warmup_images=8"], "ablations.md"),
}
NEEDS = {"attention_ptx_report.py": ["triton"], "bench_attention.py": ["triton"], "bench_fp8_linear.py": ["triton"],
         "bench_sparse_prefill.py": ["triton"], "bench_moe.py": ["transformers"],
         "bench_long_video.py": ["transformers"], "bench_prefill.py": ["transformers"], "bench_train.py": ["transformers"],
         "bench_video.py": ["transformers", "qwen_vl_utils", "decord"]}  # dev dependencies of the references


def test_every_script_has_a_smoke_case():
    assert sorted(p.name for p in SCRIPTS.glob("*.py") if not p.name.startswith("_")) == sorted(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_script_smoke(script, tmp_path):
    for module in NEEDS.get(script, []):
        pytest.importorskip(module)
    extra, expect = CASES[script]
    cmd = [sys.executable, str(SCRIPTS / script), "--smoke", *(a.format(tmp=tmp_path) for a in extra)]
    # a fresh process with the repository importable the way the tests import it, nothing else changed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{out[-4000:]}"
    assert expect in out, f"{' '.join(cmd)}: {expect!r} not in its output:\n{out[-4000:]}"
