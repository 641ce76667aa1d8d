#!/usr/bin/env bash
# Rehearse the GPU check on a CPU machine, with only what the GPU machine is known to hold, to
# prove that the carried wheels (benchmarks/gpu_wheels.txt) are complete before device time is spent.
#
#     bash benchmarks/gpu_rehearsal.sh               # build/reuse the venv, run QUICK=1 gpu_check.sh on a clone
#     bash benchmarks/gpu_rehearsal.sh --gpu-wheels  # only fetch the GPU's wheels (CPython 3.12) into ./.whl
#
# 1. A venv ($REHEARSAL_VENV) holding python3 with torch, torchvision, timm, tifffile,
#    scikit-image, matplotlib, safetensors, pandas, pytest, numpy and scipy (and what pip pulls
#    in for those), plus scikit-learn: the GPU image holds it (the device tool's KINDS.md lists
#    it) and its 13 MB wheel would take the carry past 64 MiB; training imports it.
# 2. The wheel list downloaded for this Python (the cp311 equivalents of the GPU's cp312 set) into
#    $WHEEL_CACHE, installed by the check itself as on the GPU: --no-deps --target, PYTHONPATH.
# 3. gpu_check.sh in QUICK mode on a fresh clone of HEAD (so untracked files cannot hide a gap),
#    with the real slides linked in as .gpudata, as they travel to the device.
# It passes (exit 0) only if every stage finished with rc 0 or was skipped for "no CUDA" alone.
# Prints the size of the carried set: wheels + real slides + the tracked tree must stay under
# the 64 MiB a device call carries.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
LIST=$REPO/benchmarks/gpu_wheels.txt
PYBASE=${PYBASE:-python3}
VENV=${REHEARSAL_VENV:-/tmp/wsi_cmaf_rehearsal_venv}
WHEEL_CACHE=${WHEEL_CACHE:-/tmp/wsi_cmaf_rehearsal_wheels}
WORK=${REHEARSAL_DIR:-/tmp/wsi_cmaf_rehearsal}
SLIDES=${SLIDES:-$REPO/../shared/data/slides}
CARRY_MIB=64

mib() { du -cb "$@" 2>/dev/null | tail -n 1 | awk '{printf "%.1f", $1 / 1048576}'; }
reqs() { grep -v '^\s*#' "$LIST" | grep -v '^\s*$'; }

if [ "${1:-}" = --gpu-wheels ]; then
    mkdir -p "$REPO/.whl"
    # shellcheck disable=SC2046
    "$PYBASE" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$REPO/.whl" $(reqs) || exit 1
    echo "GPU wheels in $REPO/.whl: $(ls "$REPO/.whl" | wc -l) files, $(mib "$REPO/.whl"/*.whl) MiB"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, torchvision, timm, skimage, sklearn" 2>/dev/null; then
    echo "building the GPU-like venv in $VENV"
    "$PYBASE" -m venv "$VENV" || exit 1
    # torch pinned in the same call, so timm and torchvision cannot pull another build
    "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 timm tifffile scikit-image matplotlib \
        safetensors pandas pytest numpy scipy scikit-learn || exit 1
fi
# carried packages the base venv holds anyway (pulled in by torch, timm, pandas...): a gap in the
# list would hide behind them, so they are named
HELD=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | cut -d= -f1 | tr 'A-Z_' 'a-z-' | sort)
for r in $(reqs); do
    n=$(echo "${r%%==*}" | tr 'A-Z_' 'a-z-')
    grep -qx "$n" <<< "$HELD" && echo "note: the base venv already holds $n"
done

mkdir -p "$WHEEL_CACHE"
# shellcheck disable=SC2046
"$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$WHEEL_CACHE" $(reqs) || {
    echo "REHEARSAL FAIL: a wheel of benchmarks/gpu_wheels.txt could not be downloaded"; exit 1; }

rm -rf "$WORK"; mkdir -p "$WORK"
git clone -q --no-hardlinks "$REPO" "$WORK/clone" || exit 1
[ -d "$SLIDES" ] && mkdir -p "$WORK/clone/.gpudata" && cp "$SLIDES"/cmu_small_region.svs \
    "$SLIDES"/cmu_small_region_pyramid_3level.tiff "$WORK/clone/.gpudata/" 2>/dev/null
TREE=$(cd "$WORK/clone" && git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | awk '{print $1}')
W=$(mib "$WHEEL_CACHE"/*.whl); S=$(mib "$WORK/clone/.gpudata"/*)
TOTAL=$(awk -v w="$W" -v s="$S" -v t="$TREE" 'BEGIN {printf "%.1f", w + s + t / 1048576}')
echo "carried set: wheels $W MiB ($(ls "$WHEEL_CACHE"/*.whl | wc -l) files, cp311 here; the GPU's cp312 set is" \
     "of the same packages) + real slides $S MiB + tracked tree $(awk -v t="$TREE" 'BEGIN {printf "%.1f", t / 1048576}') MiB" \
     "= $TOTAL MiB of the $CARRY_MIB MiB carry"
awk -v t="$TOTAL" -v c="$CARRY_MIB" 'BEGIN {exit !(t < c)}' || { echo "REHEARSAL FAIL: over the carry"; exit 1; }

RES=$WORK/out
(cd "$WORK/clone" && env -u PYTHONPATH PYTHON="$VENV/bin/python" WHEELS="$WHEEL_CACHE" SITE="$WORK/site" \
    OUT="$RES" QUICK=1 CAP="${CAP:-1800}" SLOT_SCALE="${SLOT_SCALE:-5}" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" \
    BENCH_WORK="$WORK/slides" BATCH_WORK="$WORK/batch_slides" bash benchmarks/gpu_check.sh)

"$VENV/bin/python" - "$RES/stages.jsonl" <<'EOF'
import json, sys
ends = {}
for line in open(sys.argv[1]):
    ev = json.loads(line)
    if ev["event"] != "started":
        ends[ev["stage"]] = ev
    else:
        ends.setdefault(ev["stage"], ev)
bad = [ev for ev in ends.values() if not ((ev["event"] == "finished" and ev["rc"] == 0)
                                         or (ev["event"] == "skipped" and ev["reason"] == "no CUDA"))]
for ev in ends.values():
    print(f"  {ev['stage']:20s} {ev['event']:9s} rc={ev['rc']} {ev['reason']}")
if bad:
    print("REHEARSAL FAIL: " + "; ".join(f"{ev['stage']} {ev['event']} (rc={ev['rc']}) {ev['reason']}" for ev in bad))
    sys.exit(1)
print(f"REHEARSAL OK: {len(ends)} stages, each finished or skipped for 'no CUDA' alone")
EOF
