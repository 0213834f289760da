#!/usr/bin/env bash
# Every GPU measurement of the load work in one go, on a bare lent GPU machine (python3 with torch,
# no internet): partial VRAM loading (bench_partial), then bench_load (SD-1.5 and SDXL UNets, a
# FLUX-size flat file with --flux, fastsafetensors and Run:ai streamer baselines when their wheels
# came along, first/later offload and reload), then bench_fp8 (a FLUX.1-size fp8_scaled transformer kept
# in fp8 vs upcast to bf16: memory held, peak and forward time; it writes a 12 GB file under $MB_TMP), then
# bench_families (a FLUX.1-size GGUF Q8_0 vs its bf16 file: memory, load, forward; a Qwen-Image-size
# transformer, 41 GB, through the DiT loader vs diffusers' from_single_file; sparse files under $MB_TMP), then
# bnb (bench_bnb: a FLUX-shaped transformer in lllyasviel's NF4 layout, 5 + 10 blocks of FLUX.1's width by
# default, quantized by bitsandbytes on the GPU, vs its bf16 file: memory held, load and forward time; a 6 GB
# and a 1.7 GB file under $MB_TMP, removed after; BNB_ARGS="--layers 19,38" for the full 24 GB model).
#
#   WHL=folder/of/wheels OUT=results/folder bash tests/bench/gpu_all.sh [partial] [load] [flux] [fp8] [families] [bnb]
#
# The wheels: diffusers, structlog, fastsafetensors, runai-model-streamer, for the families step gguf and
# pydantic, for the bnb step bitsandbytes (pip download them for the machine's Python). Only modelbus's load modules are put on the path (no
# Redis, records or API; of the probe, the GGUF header reader the GGUF loader uses).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WHL=${WHL:-$REPO/../whl}
OUT=${OUT:-/tmp/bench-out}
STEPS=${*:-partial load fp8 families bnb}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
  || echo "some wheels did not install"
MB=/tmp/mb/modelbus
rm -rf /tmp/mb
mkdir -p $MB/events $MB/services/load $MB/services/records $MB/services/probe
touch $MB/__init__.py $MB/events/__init__.py $MB/services/__init__.py $MB/services/load/__init__.py \
  $MB/services/records/__init__.py
ln -s "$REPO/events/errors.py" $MB/events/errors.py
ln -s "$REPO/events/logs.py" $MB/events/logs.py
ln -s "$REPO/services/records/enums.py" $MB/services/records/enums.py
ln -s "$REPO/services/configs" $MB/services/configs
for f in "$REPO"/services/load/*.py; do
  [ "$(basename "$f")" = "__init__.py" ] || ln -s "$f" "$MB/services/load/$(basename "$f")"
done
cat > $MB/services/probe/__init__.py <<'EOF'
def scan_pickle(path):  # the benchmarks load safetensors only
    raise RuntimeError(f"{path}: pickles are not loaded on the bench machine")
EOF
for f in errors gguf_file result tensor_index; do  # the GGUF loader reads a FLUX GGUF's header through these
  ln -s "$REPO/services/probe/$f.py" "$MB/services/probe/$f.py"
done
export PYTHONPATH=/tmp/mb:/tmp/site
cd "$REPO"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; df -h /tmp
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
for step in $STEPS; do
  case $step in
    partial) timeout "${PARTIAL_TIMEOUT:-300}" python3 tests/bench/bench_partial.py --out "$OUT/partial.jsonl" \
               ${PARTIAL_ARGS:-} 2>&1 | tee "$OUT/partial.log" ;;
    load) timeout "${LOAD_TIMEOUT:-330}" python3 tests/bench/bench_load.py --device cuda --repeat "${REPEAT:-3}" \
            --out "$OUT/load.jsonl" ${LOAD_ARGS:-} 2>&1 | tee "$OUT/load.log" ;;
    flux) timeout "${FLUX_TIMEOUT:-330}" python3 tests/bench/bench_load.py --device cuda --sizes "" --flux \
            --out "$OUT/flux.jsonl" 2>&1 | tee "$OUT/flux.log" ;;
    fp8) MODELBUS_BENCH_TMP=${MB_TMP:-/tmp} timeout "${FP8_TIMEOUT:-330}" python3 tests/bench/bench_fp8.py \
           --device cuda --out "$OUT/fp8.jsonl" ${FP8_ARGS:-} 2>&1 | tee "$OUT/fp8.log" ;;
    families) MODELBUS_BENCH_TMP=${MB_TMP:-/tmp} timeout "${FAMILIES_TIMEOUT:-400}" python3 tests/bench/bench_families.py \
                --device cuda --out "$OUT/families.jsonl" ${FAMILIES_ARGS:-} 2>&1 | tee "$OUT/families.log" ;;
    bnb) if timeout 120 python3 -c "import torch, bitsandbytes as b; print('bitsandbytes', b.__version__, 'torch cuda',
           torch.version.cuda, 'backends', sorted(getattr(b, 'supported_torch_devices', ['?'])))" 2>&1 | tee "$OUT/bnb.log"; then
           MODELBUS_BENCH_TMP=${MB_TMP:-/tmp} timeout "${BNB_TIMEOUT:-420}" python3 tests/bench/bench_bnb.py \
             --device cuda --out "$OUT/bnb.jsonl" ${BNB_ARGS:-} 2>&1 | tee -a "$OUT/bnb.log"
           echo "bnb step exit status ${PIPESTATUS[0]} (124: past BNB_TIMEOUT)" | tee -a "$OUT/bnb.log"
         else
           echo "bnb step skipped: bitsandbytes does not import (is its wheel in \$WHL?)" | tee -a "$OUT/bnb.log"
         fi ;;
  esac
done
