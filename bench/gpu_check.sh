#!/usr/bin/env bash
# The GPU check (issue 26): one command that, on a GPU machine with no registry, installs the carried
# wheels it lacks, builds its models without the hub, and runs - each step under its own time limit,
# all of them in under 8 minutes - the GPU tests, the raw engines (fp32/bf16/fp16, encoder batch
# 1..256, images 1..64), the server on the GPU at concurrency 1/32/128 with GPU utilisation, pinned
# staging + streams against plain copies, and continuous batching against static generate. It
# writes $OUT/summary.json (every figure, each target met or missed), $OUT/check.log,
# $OUT/servers.log and $OUT/pytest.xml.
#
#   bash bench/gpu_check.sh --prepare       here, once: wheels and MiniLM's small files into .gpu-carry/
#   bash bench/gpu_check.sh                 on the GPU machine (carry .gpu-carry)
#   bash bench/gpu_check.sh --cpu-dry-run   anywhere: tiny models on the CPU, the same steps (make test runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
mode=gpu
case "${1:-}" in
  "") ;;
  --cpu-dry-run) mode=dry ;;
  --prepare) mode=prepare ;;
  *) echo "usage: bash bench/gpu_check.sh [--prepare | --cpu-dry-run]" >&2; exit 2 ;;
esac
if [ "$mode" = gpu ]; then PY=${PYTHON:-python3}; else PY=${PYTHON:-.venv/bin/python}; fi
command -v "$PY" >/dev/null || PY=python3

if [ "$mode" = prepare ]; then
  # Pure-Python wheels for the device's Python 3.12 (see the device notes), pinned as here.
  set -e
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
  "$PY" -m bench.gpu_check pack "$CARRY/minilm"
  # shellcheck disable=SC2046 # one argument per requirement
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" \
    $("$PY" -m bench.gpu_check carried)
  du -sh "$CARRY"/*
  exit 0
fi

OUT=${OUT:-$PWD/artifacts/gpu-check-$mode}
mkdir -p "$OUT"
work=$(mktemp -d /tmp/binserve-gpucheck.XXXXXX)
export PYTHONUNBUFFERED=1 BINSERVE_TEST_LOG_DIR="$work/logs" BINSERVE_TEST_PIDS_FILE="$work/servers.pids"
mkdir -p "$work/logs"
: >"$BINSERVE_TEST_PIDS_FILE"
exec > >(tee "$OUT/check.log") 2>&1

stop_servers() {  # every server a step started, by its process group (each runs in a session of its own)
  while read -r pid; do [ -n "$pid" ] && kill -9 -- "-$pid" 2>/dev/null; done <"$BINSERVE_TEST_PIDS_FILE"
  : >"$BINSERVE_TEST_PIDS_FILE"
}
finish() {
  stop_servers
  for f in "$work"/logs/*.log; do [ -f "$f" ] && { echo "=== $f"; tail -c 200000 "$f"; }; done >"$OUT/servers.log"
  [ -f "$work/pytest.xml" ] && cp "$work/pytest.xml" "$OUT/"
  rm -rf "$work"
}
trap finish EXIT

started=$SECONDS
budget=$([ "$mode" = gpu ] && echo 465 || echo 1200)  # seconds for every step together
declare -A limit=([build]=60 [tests]=60 [raw]=60 [server]=120 [overlap]=75 [generation]=75)
[ "$mode" = dry ] && limit=([build]=120 [tests]=180 [raw]=120 [server]=240 [overlap]=240 [generation]=240)
step() {  # step NAME COMMAND...: run it under the smaller of its limit and what is left of the budget
  local name=$1 left
  shift
  left=$((budget - (SECONDS - started)))
  ((left > limit[$name])) && left=${limit[$name]}
  if ((left < 10)); then echo "== $name: skipped, the time budget is spent"; return; fi
  echo "== $name (at most ${left}s, $((SECONDS - started))s in)"
  timeout -k 10 "$left" "$@" --limit "$left"
  echo $? >"$work/phase-$name.rc"
  stop_servers
}

echo "== prerequisites ($mode)"
if [ -d "$CARRY/wheels" ]; then
  need=$("$PY" -m bench.gpu_check wheels-needed "$CARRY/wheels")
  if [ -n "$need" ]; then
    echo "installing carried wheels: $need"
    # shellcheck disable=SC2086 # one argument per wheel
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" $need || exit 3
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
files="$CARRY/minilm"
if [ "$mode" = dry ] && [ ! -d "$files" ]; then
  files="$work/minilm-files"
  "$PY" -m bench.gpu_check pack "$files" || exit 3
fi
if ! "$PY" -m bench.gpu_check prereqs --mode "$mode" --files "$files" --work "$work"; then
  "$PY" -m bench.gpu_check report --mode "$mode" --work "$work" --out "$OUT"
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,utilization.gpu --format=csv 2>/dev/null || true

step build "$PY" -m bench.gpu_check build --mode "$mode" --files "$files" --work "$work"
if [ -f "$work/models.json" ]; then
  for phase in tests raw server overlap generation; do
    step "$phase" "$PY" -m bench.gpu_check phase "$phase" --mode "$mode" --work "$work"
  done
fi
echo "== report ($((SECONDS - started))s in)"
"$PY" -m bench.gpu_check report --mode "$mode" --work "$work" --out "$OUT"
