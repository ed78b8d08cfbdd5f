#!/usr/bin/env bash
# Train the nano model on a CUDA machine, about 12 minutes end to end, and export it:
#   1. render and encode a first round of latent chunks on every CPU core (~2 min);
#   2. train the transformer in bf16 on the GPU for TRAIN_MINUTES while the CPU cores keep
#      rendering fresh chunks, which the trainer picks up at each checkpoint (every minute);
#   3. export fp16 weights (every file well under 16 MiB) to EXPORT_TO.
#
#   scripts/train_gpu.sh                                                  # on the GPU machine
#   DEVICE=cpu TRAIN_MINUTES=1 FIRST=2 MORE=0 CHUNK_SIZE=64 BATCH=8 scripts/train_gpu.sh   # the CPU check
#
# Continues from INIT (the bundled weights) with the context-start flow; a checkpoint under
# OUT resumes instead. Uses .venv/bin/python when there is one, else python3 (a GPU image
# with torch, transformers and typer; wheels in .whl/, e.g. diffusers, are installed first).
# A GPU image without diffusers gets it from wheels fetched here beforehand (pure Python):
#   pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
TRAIN_MINUTES=${TRAIN_MINUTES:-8}
FIRST=${FIRST:-32}          # chunks before training starts
MORE=${MORE:-96}            # chunks rendered while it trains (as many as the time allows)
CHUNK_SIZE=${CHUNK_SIZE:-1024}
START=${START:-1000}        # chunk seeds no CPU run has used
JOBS=${JOBS:-$(nproc)}
BATCH=${BATCH:-256}
LR=${LR:-4e-4}
INIT=${INIT:-incontext/weights/nano}
EXPORT_TO=${EXPORT_TO:-$OUT/export}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if [ -d .whl ] && ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/incontext-site .whl/*.whl
  export PYTHONPATH=/tmp/incontext-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
train() { "$PY" -m incontext.train "$@"; }

# Renders chunks [first, first + count) on `jobs` processes of one thread each: rendering
# is single-threaded Python, and one encoder per core beats one encoder on all of them.
render() {
  local first=$1 count=$2 jobs=$3 per j
  per=$(((count + jobs - 1) / jobs))
  for ((j = 0; j * per < count; j++)); do
    local n=$((count - j * per < per ? count - j * per : per))
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 train data --out "$OUT" --start $((first + j * per)) --chunks "$n" \
      --chunk-size "$CHUNK_SIZE" >"$OUT/data_$((first + j * per)).log" 2>&1 &
  done
}

SECONDS=0
render "$START" "$FIRST" "$JOBS"
wait
echo "data: $FIRST chunks in ${SECONDS}s"

renderers=$((JOBS > 2 ? JOBS - 2 : 1))  # two cores stay with the trainer's loop
if [ "$MORE" -gt 0 ]; then
  # Each renderer does a few chunks at a time, so those left undone when training ends are few.
  render $((START + FIRST)) "$MORE" "$renderers"
fi
train transformer --out "$OUT" --device "$DEVICE" --minutes "$TRAIN_MINUTES" --batch "$BATCH" --lr "$LR" \
  --edit-weight 1 --guidance-start 0 --flow-start context --init-from "$INIT" --save-every 1
jobs -p | xargs -r kill 2>/dev/null || true
wait 2>/dev/null || true
echo "trained: ${SECONDS}s in all"

train export --out "$OUT" --to "$EXPORT_TO"
find "$EXPORT_TO" -name '*.safetensors' -exec ls -l {} +
echo "done in ${SECONDS}s: $EXPORT_TO"
