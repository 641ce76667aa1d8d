#!/usr/bin/env bash
# One prepared device check for the GPU floors (Table 8 compiled and with CUDA graphs, the
# streaming loop against the model and against decoding, the batch engine, training on CUDA).
# It ends within CAP seconds (default 420, installs included) and reports as it goes:
#   $RES/results.jsonl  every measurement, one JSON line, appended the moment it is known
#   $RES/stages.jsonl   every stage: started, finished (rc, seconds), skipped (why), timed out
#   $RES/<stage>.log    each stage's own output; $RES/floors.txt the floor table at the end
# A stage whose imports are missing is skipped with the reason and the run goes on; GPU-only
# stages on a machine without CUDA are skipped for "no CUDA".
#
#     bash benchmarks/gpu_check.sh                      # everything, results in $OUT (or /tmp/wsi_cmaf_gpu_check)
#     STAGES=prepare,batch bash benchmarks/gpu_check.sh   # only these stages (install and preflight always run)
#     QUICK=1 bash benchmarks/gpu_check.sh              # small slides, one repeat: a smoke run (also on CPU)
#     python benchmarks/gpu_floors.py RES1 [RES2 ...]   # the floors again, from one or several runs
#
# Schedule: the slide writers and the compile warm-up (compiled Table 8 and CUDA graphs, which
# fill Inductor's on-disk cache) run in the background while the tests run; the timed stages run
# after them, one at a time, each holding $RES/.timed.lock, so no two timed sections overlap.
# Nothing is installed from the network: wheels listed in benchmarks/gpu_wheels.txt are installed
# from $WHEELS (default ./.whl) with --no-deps into a target folder on PYTHONPATH.
set -uo pipefail
# The whole script is one compound command: bash reads it completely before running any of it,
# so an edit of this file while a check runs cannot derail that run.
{
cd "$(dirname "$0")/.."
RES=${OUT:-/tmp/wsi_cmaf_gpu_check}
mkdir -p "$RES"
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
START=$(date +%s)
CAP=${CAP:-420}
QUICK=${QUICK:-0}
# stage slots are sized for the GPU machine's 16 cores; a rehearsal on 2 shared cores stretches them
SLOT_SCALE=${SLOT_SCALE:-1}
STAGES=${STAGES:-all}
STAGE_LOG=$RES/stages.jsonl
RESULTS=$RES/results.jsonl
LOCK=$RES/.timed.lock
touch "$STAGE_LOG" "$RESULTS"
# Compiles of the warm-up land here and the timed runs read them back instead of compiling again.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/wsi_cmaf_inductor_cache}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( START + CAP - $(date +%s) )); }
log() { echo "[gpu_check +$(elapsed)s] $*"; }
esc() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/ }; printf '%s' "${s//$'\t'/ }"; }
# event STAGE EVENT [REASON] [RC] [SECONDS]
event() {
    printf '{"stage": "%s", "event": "%s", "reason": "%s", "rc": %s, "seconds": %s, "at_s": %s}\n' \
        "$1" "$2" "$(esc "${3:-}")" "${4:-null}" "${5:-null}" "$(elapsed)" >> "$STAGE_LOG"
    log "stage $1: $2${3:+ ($3)}"
}
want() { [ "$STAGES" = all ] || [[ ",$STAGES," == *",$1,"* ]]; }
# missing MOD...: the first module of the list that the preflight could not import
missing() {
    local m
    for m in "$@"; do grep -qx "$m" "$RES/imports_ok.txt" 2>/dev/null || { echo "$m"; return 0; }; done
    return 1
}

# run_stage NAME MAX_S TIMED DEPS CUDA_ONLY -- CMD...: skip, or run under timeout with its
# output in NAME.log and its JSON lines appended to results.jsonl as they are printed.
run_stage() {
    local name=$1 max=$2 timed=$3 deps=$4 cuda_only=$5; shift 6
    want "$name" || return 0
    if [ "$cuda_only" = 1 ] && [ "$CUDA" != 1 ]; then event "$name" skipped "no CUDA"; return 0; fi
    local m
    if m=$(missing $deps); then event "$name" skipped "missing dependency: $m (see preflight)"; return 0; fi
    local slot=$(( $(left) - 10 ))
    max=$(( max * SLOT_SCALE ))
    (( slot > max )) && slot=$max
    if (( slot < 15 )); then event "$name" skipped "no time left under the ${CAP} s cap"; return 0; fi
    event "$name" started "" null null
    local t0=$(date +%s) rc
    if [ "$timed" = 1 ] && command -v flock >/dev/null; then
        flock "$LOCK" timeout -s INT -k 15 "$slot" "$@" > >(tee "$RES/$name.log" | grep --line-buffered '^{"bench"' >> "$RESULTS") 2>&1
    else
        timeout -s INT -k 15 "$slot" "$@" > >(tee "$RES/$name.log" | grep --line-buffered '^{"bench"' >> "$RESULTS") 2>&1
    fi
    rc=$?
    sleep 0.2  # let the tee/grep of the process substitution flush
    if (( rc == 124 || rc == 137 )); then
        event "$name" timed_out "killed after its ${slot} s slot" "$rc" $(( $(date +%s) - t0 ))
    else
        event "$name" finished "" "$rc" $(( $(date +%s) - t0 ))
    fi
}

# --- 0. carried wheels, then the preflight -------------------------------------------------
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/wsi_cmaf_site}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    event install started
    t0=$(date +%s)
    pipi() { timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$@" >> "$RES/install.log" 2>&1; }
    if pipi "$WHEELS"/*.whl; then
        event install finished "" 0 $(( $(date +%s) - t0 ))
    else  # one by one: a bad wheel costs itself only
        failed=""
        for w in "$WHEELS"/*.whl; do pipi "$w" || failed="$failed $(basename "$w")"; done
        event install finished "failed:${failed:- none}" 1 $(( $(date +%s) - t0 ))
    fi
fi
[ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

event preflight started
timeout 120 $PY - "$RES" > "$RES/preflight.log" 2>&1 <<'EOF'
import importlib, json, os, sys
res = sys.argv[1]
mods = ["torch", "numpy", "timm", "torchvision", "pytest", "pytest_timeout", "xdist", "tifffile", "imagecodecs",
        "tiffslide", "openslide", "zarr", "dask", "distributed", "torchstain", "shapely", "skimage", "pandas",
        "matplotlib", "tqdm", "psutil", "wsi_cmaf", "wsi_cmaf.infer", "wsi_cmaf.cluster", "wsi_cmaf.train", "wsi_cmaf.encoders",
        "cucim"]
out = {}
for m in mods:
    try:
        importlib.import_module(m)
        out[m] = "ok"
    except Exception as exc:  # any import failure is the answer here
        out[m] = f"{type(exc).__name__}: {exc}"[:300]
with open(os.path.join(res, "imports_ok.txt"), "w") as f:
    f.write("".join(m + "\n" for m, v in out.items() if v == "ok"))
rec = {"bench": "preflight", "python": sys.version.split()[0], "cpus": os.cpu_count(), "imports": out}
if out["torch"] == "ok":
    import torch
    rec.update(torch=torch.__version__, cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec.update(gpu=p.name, gpu_mib=p.total_memory // 2**20, capability=f"{p.major}.{p.minor}")
print(json.dumps(rec))
EOF
event preflight finished "" $? null
grep '^{"bench"' "$RES/preflight.log" >> "$RESULTS"
CUDA=0; grep -q '"cuda": true' "$RES/preflight.log" && CUDA=1
log "CUDA: $CUDA; not importable: $(grep -o '"[a-z_.]*": "[A-Z][A-Za-z]*Error' "$RES/preflight.log" | cut -d'"' -f2 | tr '\n' ' ')"
[ "$CUDA" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RES/device.txt" 2>&1
DEV=cpu; PREC=off
[ "$CUDA" = 1 ] && { DEV=cuda; PREC=bf16; }
NCPU=$(nproc 2>/dev/null || echo 2)

REAL=""
for d in .gpudata ../shared/data/slides shared/data/slides; do
    [ -f "$d/cmu_small_region.svs" ] && { REAL=$d; break; }
done
if [ "$QUICK" = 1 ]; then
    BIG="16000 12000"; BSIZE="5000 4000"; BCOPIES=4; BDISTINCT=2; REPEATS=1; MODEL_S=0.5; INFLIGHT=2
    TESTS="tests/infer/test_cuda_runner.py tests/train/test_host_copies.py tests/infer/test_runner_device_faults.py"
    T8_BATCH="--batch-size 8"; LOOP_BATCH="--batch-size 16"
else
    # pipeline slide as issue 12 asks; batch slides with the same tile count at 1 µm/px (16x
    # fewer pixels to write), 4 distinct ones copied to 20 paths (copies, not links: the batch engine analyses one file once)
    BIG="100000 80000"; BSIZE="25000 20000"; BCOPIES=20; BDISTINCT=4; REPEATS=3; MODEL_S=2; INFLIGHT=4
    TESTS="tests/train/test_trainer.py tests/train/test_amp.py tests/train/test_sam.py tests/train/test_fast_paths.py
           tests/models/test_fast_paths.py tests/infer/test_runner.py tests/infer/test_stream.py tests/infer/test_cuda_runner.py
           tests/train/test_host_copies.py tests/infer/test_runner_device_faults.py"
    T8_BATCH=""; LOOP_BATCH=""
fi
WORK=${BENCH_WORK:-/tmp/wsi_cmaf_bench}
BWORK=${BATCH_WORK:-/tmp/wsi_cmaf_gpu_batch}

# --- 1. background: slide writers and the compile warm-up (untimed) --------------------------
run_stage prepare 200 0 "wsi_cmaf.infer tifffile imagecodecs" 0 -- bash -c "
    $PY benchmarks/bench_pipeline.py --prepare-only --size $BIG --models resnet18@64 --workdir $WORK \
        --write-workers $NCPU --no-rss &&
    $PY benchmarks/gpu_loop.py batch --prepare-only --workdir $BWORK --size $BSIZE --distinct $BDISTINCT \
        --mpp 1.0 --write-workers $NCPU" &
PREP=$!
# the warm-up ends in time to leave the timed stages about 230 s of the cap
WARM_MAX=$(( (CAP - $(elapsed) - 230) / SLOT_SCALE )); (( WARM_MAX > 240 )) && WARM_MAX=240
(( WARM_MAX < 60 )) && WARM_MAX=60
run_stage warm_compile $WARM_MAX 0 "wsi_cmaf timm" 1 -- bash -c "
    $PY -m wsi_cmaf protocol efficiency --device cuda --quick --no-progress --models cmaf_net timm:resnet50 \
        --compile on --precisions bf16 --latency-batch 256 --out $RES/warm_table8_compiled &&
    $PY -m wsi_cmaf protocol efficiency --device cuda --no-progress --models cmaf_net --compile reduce-overhead \
        --precisions bf16 --batch-size 1 --latency-batch 1 --out $RES/warm_table8_graphs &&
    $PY benchmarks/gpu_probe_graphs.py" &
WARM=$!

# --- 2. tests (the GPU's own, under a cap that still prints pytest's summary on SIGINT) -------
TEST_ARGS="-q -rfEs -p no:cacheprovider"
grep -qx pytest_timeout "$RES/imports_ok.txt" 2>/dev/null && TEST_ARGS="$TEST_ARGS --timeout 90"
[ "$CUDA" = 1 ] && grep -qx xdist "$RES/imports_ok.txt" 2>/dev/null && TEST_ARGS="$TEST_ARGS -n 4"
# shellcheck disable=SC2086
run_stage tests 130 0 "pytest wsi_cmaf" 0 -- $PY -m pytest $TEST_ARGS $TESTS
if [ -f "$RES/tests.log" ]; then
    SUMMARY=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)|(passed|failed|error|skipped).* in [0-9.]+s' \
        "$RES/tests.log" | tail -n 1)
    printf '{"bench": "tests", "summary": "%s", "files": "%s"}\n' "$(esc "$SUMMARY")" "$(esc "$(echo $TESTS)")" \
        >> "$RESULTS"
fi

log "waiting for the background stages"
wait $PREP 2>/dev/null
wait $WARM 2>/dev/null  # its slot ends in time: no timed stage runs beside a compile

# --- 3. timed stages, floors first ---------------------------------------------------------
run_stage table8_compiled 70 1 "wsi_cmaf timm" 1 -- $PY -m wsi_cmaf protocol efficiency --device cuda --quick \
    --no-progress --models cmaf_net timm:resnet50 --compile on --precisions bf16 --latency-batch 256 \
    --out "$RES/table8_compiled"
run_stage table8_graphs 50 1 "wsi_cmaf timm" 1 -- $PY -m wsi_cmaf protocol efficiency --device cuda --no-progress \
    --models cmaf_net --compile reduce-overhead --precisions bf16 --batch-size 1 --latency-batch 1 \
    --out "$RES/table8_graphs"
SLIDE=$(ls "$WORK"/pipeline_${BIG% *}x${BIG#* }_*.tiff 2>/dev/null | grep -v partial | head -n 1)
if [ -z "$SLIDE" ]; then
    for s in loop_cmaf loop_resnet decode; do want $s && event $s skipped "no pipeline slide (stage prepare did not finish)"; done
else
    run_stage loop_cmaf 75 1 "wsi_cmaf.infer zarr tiffslide distributed shapely" 0 -- $PY benchmarks/gpu_loop.py loop \
        --model cmaf_net@224 --slide "$SLIDE" --repeats $REPEATS --model-only-s $MODEL_S --device $DEV \
        --precision $PREC --compile off --reader-threads 8 --prefetch 16 $LOOP_BATCH
    run_stage loop_resnet 50 1 "wsi_cmaf.infer zarr tiffslide distributed shapely" 0 -- $PY benchmarks/gpu_loop.py loop \
        --model resnet18@64 --slide "$SLIDE" --repeats $REPEATS --model-only-s $MODEL_S --device $DEV \
        --precision $PREC --compile off --reader-threads 8 --prefetch 16 --block-tiles 8 $LOOP_BATCH
    NVJ=""; [ "$CUDA" = 1 ] && grep -qx torchvision "$RES/imports_ok.txt" && NVJ="--nvjpeg"
    run_stage decode 40 1 "wsi_cmaf tiffslide dask" 0 -- $PY benchmarks/bench_decode.py --slide "$SLIDE" \
        --threads 8 --block-tiles 8 --repeats 3 $NVJ
fi
run_stage batch 110 1 "wsi_cmaf.cluster zarr tiffslide distributed shapely" 0 -- $PY benchmarks/gpu_loop.py batch \
    --workdir $BWORK --size $BSIZE --distinct $BDISTINCT --copies $BCOPIES --mpp 1.0 --slides-in-flight $INFLIGHT \
    --reader-threads 4 --model-only-s $MODEL_S --device $DEV --precision $PREC --compile off $LOOP_BATCH
run_stage compile_first_block 60 1 "wsi_cmaf" 1 -- env TORCHINDUCTOR_CACHE_DIR="$RES/.cold_inductor" \
    $PY benchmarks/gpu_loop.py compile --model cmaf_net@224 --device cuda --precision bf16 --compile auto
# shellcheck disable=SC2086
run_stage table8_eager 60 1 "wsi_cmaf timm" 0 -- $PY -m wsi_cmaf protocol efficiency --device $DEV --quick \
    --no-progress --compile off $T8_BATCH --out "$RES/table8_eager"
if [ -n "$REAL" ]; then
    run_stage decode_real 30 1 "wsi_cmaf tiffslide dask" 0 -- $PY benchmarks/bench_decode.py \
        --slide "$REAL/cmu_small_region.svs" --slide "$REAL/cmu_small_region_pyramid_3level.tiff" --tile-mpp 1.0 \
        --threads 1 "$NCPU" --repeats 2 ${NVJ:-}
else
    want decode_real && event decode_real skipped "no real slides in .gpudata or ../shared/data/slides"
fi

# device-side JPEG decoding (decode="device") against the CPU block reads: not a floor; it decides the default
DD_SIZE="16000 12000"; [ "$CUDA" = 1 ] || DD_SIZE="6000 4000"  # a CPU rehearsal writes a smaller slide
DD_SLIDES=""; [ -n "$REAL" ] && DD_SLIDES="--slide $REAL/cmu_small_region.svs --slide $REAL/cmu_small_region_pyramid_3level.tiff"
# shellcheck disable=SC2086
run_stage device_decode 90 1 "wsi_cmaf tifffile torchvision zarr" 0 -- $PY benchmarks/gpu_decode.py $DD_SLIDES \
    --synthetic-size $DD_SIZE --device $DEV --workdir "$WORK" --threads 8 --repeats 2

# last: not one of the six floors; the encoder throughput table (a second call can run it alone)
ENC_Q=""; [ "${QUICK:-0}" = 1 ] && ENC_Q="--quick"
run_stage encoders 90 1 "wsi_cmaf.encoders timm zarr" 0 -- $PY benchmarks/gpu_encoders.py --out "$RES" \
    --budget 80 $ENC_Q

log "floors"
$PY benchmarks/gpu_floors.py "$RES" | tee "$RES/floors.txt"
log "done in $(elapsed) s"
exit 0
}
