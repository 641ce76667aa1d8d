#!/usr/bin/env bash
# One prepared device check for the GPU issues (training on CUDA, fast CMAF-Net, overlapped
# inference loop, batch engine). Budget: at most 8 minutes on one GPU, every step under its own
# `timeout`, so a hung step costs its slot and not the whole run. It also runs on a machine
# without CUDA, where it runs the CPU parts and says which GPU steps it skipped and why.
#
#     bash benchmarks/gpu_check.sh                 # results in $OUT (or /tmp/wsi_cmaf_gpu_check)
#     QUICK=1 bash benchmarks/gpu_check.sh         # smaller slides (a CPU smoke run of the script)
#
# Nothing is installed from the network. Packages the GPU machine lacks (dask, distributed, zarr,
# numcodecs, google-crc32c, donfig, tiffslide, tifffile, imagecodecs, openslide, torchstain,
# partd, locket, zict, tblib, tornado) are installed from wheels in ./.whl when that folder
# exists (see benchmarks/README.md, "GPU check"); real slides are read from ./.gpudata or
# ../shared/data/slides.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-/tmp/wsi_cmaf_gpu_check}
mkdir -p "$RES"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }

if [ -d .whl ] && ! $PY -c "import dask, distributed, zarr, tiffslide, torchstain" 2>/dev/null; then
    log "installing carried wheels from .whl into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
DEV=cpu; [ "$CUDA" = 1 ] && DEV=cuda
log "device: $DEV"
if [ "$CUDA" = 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RES/device.txt"
fi
$PY -c "import sys, torch, platform; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$RES/device.txt"

REAL=""
for d in .gpudata ../shared/data/slides; do
    [ -f "$d/cmu_small_region.svs" ] && { REAL=$d; break; }
done

if [ "${QUICK:-0}" = 1 ]; then
    BIG="20000 16000"; BATCH_SLIDES=3; BATCH_SIZE="8000 6000"
else
    BIG="100000 80000"; BATCH_SLIDES=20; BATCH_SIZE="16000 12000"
fi
CACHE=/tmp/wsi_cmaf_bench
NCPU=$($PY -c "import os; print(os.cpu_count())")

# 1. CUDA-relevant tests (on CPU machines these run on CPU: they are part of the normal suite).
log "1/6 tests: trainer, AMP, SAM, model, fast paths, infer, runner, stream"
timeout 150 $PY -m pytest -q -x -p no:cacheprovider --timeout 120 \
    tests/test_trainer.py tests/test_amp.py tests/test_sam.py tests/test_model_cmaf.py tests/test_model_arch.py \
    tests/test_fast_paths.py tests/test_infer.py tests/test_runner.py tests/test_stream.py \
    2>&1 | tail -n 25 | tee "$RES/tests.txt"
echo "tests_rc=${PIPESTATUS[0]}" | tee -a "$RES/tests.txt"

# 2. Table 8 on this device.
log "2/6 Table 8 (efficiency protocol)"
timeout 150 $PY -m wsi_cmaf protocol efficiency --device "$DEV" --quick --out "$RES/table8" \
    2>&1 | tail -n 40 | tee "$RES/table8.txt"

# 3. The synthetic slides (written once, in parallel).
log "3/6 synthetic slides ($BIG)"
timeout 120 $PY benchmarks/bench_decode.py --size $BIG --cache-dir "$CACHE" --workers "$NCPU" --threads 1 2 8 16 \
    --repeats 2 --nvjpeg 2>&1 | tee "$RES/decode.jsonl"
if [ -n "$REAL" ]; then
    timeout 60 $PY benchmarks/bench_decode.py --slide "$REAL/cmu_small_region.svs" \
        --slide "$REAL/cmu_small_region_pyramid_3level.tiff" --tile-mpp 1.0 --threads 1 "$NCPU" --repeats 2 \
        --nvjpeg --cucim 2>&1 | tee -a "$RES/decode.jsonl"
fi

# 4. Pipeline: model-only vs streaming loop vs whole analyze_slide.
log "4/6 pipeline benchmark"
# (filled in below once bench_pipeline's flags are final)

# 5. Batch of slides on one GPU.
log "5/6 batch benchmark"

# 6. Floors.
log "6/6 floors"
$PY benchmarks/gpu_floors.py "$RES" | tee "$RES/floors.txt"
log "done"
