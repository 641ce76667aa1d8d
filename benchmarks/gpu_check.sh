#!/usr/bin/env bash
# One prepared device check for the GPU issues (training on CUDA, fast CMAF-Net and Table 8,
# overlapped inference loop, batch engine, decoding). It finishes within BUDGET seconds
# (default 465, under the 8 minutes the issues allow): every step runs under `timeout`, given
# what is left of the budget, so a hung step costs its slot and not the run. It also runs on a
# machine without CUDA: the CPU parts run, and each GPU-only step says that it was skipped and why.
#
#     bash benchmarks/gpu_check.sh                 # results in $OUT (or /tmp/wsi_cmaf_gpu_check)
#     QUICK=1 bash benchmarks/gpu_check.sh         # small slides: a smoke run of the script itself
#
# Nothing is installed from the network. Packages the GPU machine lacks are installed from wheels
# in ./.whl when that folder exists (benchmarks/README.md, "GPU check", lists them); real slides
# are read from ./.gpudata or ../shared/data/slides.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-/tmp/wsi_cmaf_gpu_check}
mkdir -p "$RES"
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${BUDGET:-465}
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
# slot MAX RESERVE: seconds for the next step, at most MAX, leaving RESERVE for the steps after it,
# and never under a third of MAX (a late step is cut short, not skipped).
slot() {
    local left=$(( START + BUDGET - $(date +%s) - $2 )) floor=$(( $1 / 3 ))
    (( left > $1 )) && left=$1; (( left < floor )) && left=$floor; echo $left
}

if [ -d .whl ] && ! $PY -c "import dask, distributed, zarr, tiffslide, torchstain" 2>/dev/null; then
    log "installing carried wheels from .whl into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
DEV=cpu; PREC=off
[ "$CUDA" = 1 ] && { DEV=cuda; PREC=bf16; }
log "device: $DEV"
[ "$CUDA" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RES/device.txt"
$PY -c "import os, sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cpus', os.cpu_count())" \
    | tee -a "$RES/device.txt"
NCPU=$($PY -c "import os; print(os.cpu_count())")

REAL=""
for d in .gpudata ../shared/data/slides; do
    [ -f "$d/cmu_small_region.svs" ] && { REAL=$d; break; }
done
if [ "${QUICK:-0}" = 1 ]; then
    BIG="20000 16000"; BATCH_SLIDES=3; BATCH_SIZE="8000 6000"
else
    # 20 x 40,000 x 32,000 took ~300 s to write on the H200 machine's 16 cores (2026-11-30) and
    # starved every later step; 16,000 x 12,000 slides write about 7x faster.
    BIG="100000 80000"; BATCH_SLIDES=20; BATCH_SIZE="16000 12000"
fi
WORK=/tmp/wsi_cmaf_bench
BWORK=/tmp/wsi_cmaf_bench_batch

# 0. Synthetic slides, written in the background while the tests run (they use the GPU, the
#    writers the CPU cores); every benchmark below waits for them.
log "0. writing synthetic slides in the background ($BIG; $BATCH_SLIDES x $BATCH_SIZE)"
( timeout 150 $PY benchmarks/bench_pipeline.py --prepare-only --size $BIG --models resnet18@64 --workdir "$WORK" \
      --write-workers "$NCPU" --no-rss > "$RES/prepare.log" 2>&1
  timeout 100 $PY benchmarks/bench_batch.py --prepare-only --slides "$BATCH_SLIDES" --size $BATCH_SIZE --mpp 0.25 \
      --workdir "$BWORK" --write-workers "$NCPU" >> "$RES/prepare.log" 2>&1 ) &
PREP=$!

# 1. CUDA-relevant tests (on CPU machines they run on CPU, as in the normal suite). Serially they
#    took over 140 s on the H200 machine (51 tests by then), so they run in 6 processes where
#    pytest-xdist is installed (it is on the GPU image).
log "1. tests: trainer, AMP, SAM, training fast paths, model, fast paths, infer, runner, stream"
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 6"
timeout "$(slot 150 300)" $PY -m pytest -q -rfE -p no:cacheprovider --timeout 120 $XDIST \
    tests/test_trainer.py tests/test_amp.py tests/test_sam.py tests/test_train_fast_paths.py \
    tests/test_model_cmaf.py tests/test_fast_paths.py tests/test_infer.py tests/test_runner.py tests/test_stream.py \
    > "$RES/tests.txt" 2>&1
printf '\ntests_rc=%s\n' "$?" >> "$RES/tests.txt"
tail -n 30 "$RES/tests.txt"

log "waiting for the slide writers"
wait $PREP; cat "$RES/prepare.log"

# 2. Table 8 on this device, in three parts so a slow compile cannot lose the eager numbers:
#    eager fp32 + bf16 (throughput batch and batch 1), compiled bf16 at the throughput batch, and
#    CMAF-Net with CUDA graphs at batch 1. On CPU only the first part runs.
log "2. Table 8 (efficiency protocol)"
timeout "$(slot 45 210)" $PY -m wsi_cmaf protocol efficiency --device "$DEV" --quick --no-progress \
    --compile off --out "$RES/table8_eager" > "$RES/table8.txt" 2>&1
if [ "$CUDA" = 1 ]; then
    timeout "$(slot 80 150)" $PY -m wsi_cmaf protocol efficiency --device cuda --quick --no-progress \
        --compile on --precisions bf16 --latency-batch 256 --out "$RES/table8_compiled" >> "$RES/table8.txt" 2>&1
    timeout "$(slot 50 120)" $PY -m wsi_cmaf protocol efficiency --device cuda --no-progress --models cmaf_net \
        --compile reduce-overhead --precisions bf16 --batch-size 1 --latency-batch 1 \
        --out "$RES/table8_graphs" >> "$RES/table8.txt" 2>&1
fi
grep -E "^\| (cmaf_net|timm)|FLOOR|floor|Error|error" "$RES/table8.txt" | tail -n 30

# 3. Pipeline: model-only vs streaming loop vs whole analyze_slide, both models, same run.
#    Eager: compiling CMAF-Net takes minutes, which Table 8 measures, not this budget.
log "3. pipeline benchmark ($BIG, precision $PREC)"
timeout "$(slot 75 80)" $PY benchmarks/bench_pipeline.py --device "$DEV" --size $BIG --repeats 1 \
    --model-only-s 2 --precision "$PREC" --compile off --reader-threads 8 --prefetch 16 --no-rss \
    --workdir "$WORK" --write-workers "$NCPU" > "$RES/pipeline.jsonl" 2>&1
cat "$RES/pipeline.jsonl"

# 4. Decode bound of the same slide at 1, 2, 8 (the loop's reader threads) and 16 threads, and
#    nvJPEG against the CPU decoder on its raw JPEG tiles and on the real JPEG slides.
log "4. decode bound and GPU JPEG decoding"
: > "$RES/decode.jsonl"
SLIDE=$(ls "$WORK"/pipeline_*.tiff 2>/dev/null | grep -v partial | head -n 1)
[ -n "$SLIDE" ] && timeout "$(slot 30 70)" $PY benchmarks/bench_decode.py --slide "$SLIDE" --threads 1 2 8 16 \
    --repeats 2 --nvjpeg >> "$RES/decode.jsonl" 2>&1
[ -n "$REAL" ] && timeout "$(slot 15 60)" $PY benchmarks/bench_decode.py --slide "$REAL/cmu_small_region.svs" \
    --slide "$REAL/cmu_small_region_pyramid_3level.tiff" --tile-mpp 1.0 --threads 1 "$NCPU" --repeats 2 \
    --nvjpeg --cucim >> "$RES/decode.jsonl" 2>&1
cat "$RES/decode.jsonl"

# 5. A batch of synthetic slides on one GPU, several slides in flight.
if [ "$CUDA" = 1 ]; then
    log "5. batch benchmark ($BATCH_SLIDES slides of $BATCH_SIZE)"
    timeout "$(slot 60 5)" $PY benchmarks/bench_batch.py --gpu --slides "$BATCH_SLIDES" --size $BATCH_SIZE \
        --mpp 0.25 --slides-per-gpu 4 --reader-threads 4 --precision bf16 --compile off --workdir "$BWORK" \
        > "$RES/batch.jsonl" 2>&1
    cat "$RES/batch.jsonl"
else
    log "5. batch benchmark skipped: it measures slides/hour on one GPU and this machine has no CUDA device"
fi

log "floors"
$PY benchmarks/gpu_floors.py "$RES" | tee "$RES/floors.txt"
log "done"
