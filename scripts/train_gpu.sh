#!/usr/bin/env bash
# Train the nano model on a CUDA machine, about 9 minutes end to end, and export it:
#   1. the CPU cores render world examples (single-threaded Python, one process a core) while
#      one process encodes them into latent chunks on the GPU as they appear;
#   2. once FIRST chunks are encoded, train the transformer in bf16 on the GPU for
#      TRAIN_MINUTES while rendering and encoding go on; the trainer picks up new chunks at
#      each checkpoint (every minute). Half the renderers draw all families, a quarter the
#      ones that still fail most (WEAK), a quarter the workflows (issue 20);
#   3. export fp16 weights to EXPORT_TO and, with PACK set, a tar of them in 15 MB pieces there.
#
#   scripts/train_gpu.sh                                                  # on the GPU machine
#   DEVICE=cpu TRAIN_MINUTES=1 FIRST=2 MORE=2 CHUNK_SIZE=64 BATCH=8 JOBS=2 scripts/train_gpu.sh   # the CPU check
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
TRAIN_MINUTES=${TRAIN_MINUTES:-6.5}
JOBS=${JOBS:-$(nproc)}
FIRST=${FIRST:-$((JOBS > 2 ? JOBS - 2 : 1))}  # chunks encoded before training starts: one round of the renderers
MORE=${MORE:-400}           # chunks to render in all (as many as the time allows; the rest are dropped)
CHUNK_SIZE=${CHUNK_SIZE:-1024}
START=${START:-1000}        # chunk seeds no CPU run has used
BATCH=${BATCH:-256}
LR=${LR:-4e-4}
INIT=${INIT:-incontext/weights/nano}
EXPORT_TO=${EXPORT_TO:-$OUT/export}
PACK=${PACK:-}              # a folder for the exported model as nano.tar.part-* (15 MB pieces)
WEAK=${WEAK:-recolor,add,move,background,resize,replace,invert,night,texture,outline,pastel,text}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if [ -d .whl ] && ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/incontext-site .whl/*.whl
  export PYTHONPATH=/tmp/incontext-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
train() { "$PY" -m incontext.train "$@"; }

# Renders chunks [first, first + count) on `jobs` processes of one thread each, a few chunks
# each in turn, so the first round is ready soon; even processes draw all families, odd ones
# WEAK, every fourth the workflows' families (removal, bgref, emblem, segment).
render() {
  local first=$1 count=$2 jobs=$3 j fam
  for ((j = 0; j < jobs; j++)); do
    fam=all; ((j % 2)) && fam=$WEAK; ((j % 4 == 3)) && fam=workflows
    (for ((c = first + j; c < first + count; c += jobs)); do
      OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 train data --out "$OUT" --render-only --start "$c" --chunks 1 \
        --chunk-size "$CHUNK_SIZE" --families "$fam" || exit 1
    done) >"$OUT/render_$j.log" 2>&1 &
  done
}
encoded() { ls "$OUT/data" 2>/dev/null | grep -c '^chunk_.*\.pt$' || true; }

SECONDS=0
renderers=$((JOBS > 2 ? JOBS - 2 : 1))  # one core for the encoder, one for the trainer's loop
render "$START" "$MORE" "$renderers"
train data --out "$OUT" --encode-rendered --follow --device "$DEVICE" >"$OUT/encode.log" 2>&1 &
while [ "$(encoded)" -lt "$FIRST" ]; do
  sleep 2
  if ! jobs %% >/dev/null 2>&1 || [ "$SECONDS" -gt 600 ]; then echo "data: no chunks"; tail "$OUT"/*.log; exit 1; fi
done
echo "data: $(encoded) chunks in ${SECONDS}s"

fit() {  # [extra options]: the transformer on OUT's chunks
  train transformer --out "$OUT" --device "$DEVICE" --batch "$BATCH" --lr "$LR" --edit-weight 1 --guidance-start 0 \
    --flow-start context --init-from "$INIT" "$@"
}
# A few steps first, each kernel checked as it runs (CUDA_LAUNCH_BLOCKING), in bf16 and else in
# fp32: a failing kernel is then named, and the run goes on in the precision that works.
precision=--bf16
for p in --bf16 --no-bf16; do
  precision=$p
  if (mkdir -p "$OUT/probe" && ln -sfn "$(cd "$OUT" && pwd)/data" "$OUT/probe/data" && CUDA_LAUNCH_BLOCKING=1 OUT="$OUT/probe" \
      fit --minutes 0.05 --save-every 10 "$p" >"$OUT/probe$p.log" 2>&1); then
    echo "probe $p: ok"; break
  fi
  echo "probe $p: failed"; grep -v -i warn "$OUT/probe$p.log" | grep -E "Error|error|❱|\.py:" | head -30
  [ "$p" = --no-bf16 ] && exit 1
done
rm -rf "$OUT/probe"
fit --minutes "$TRAIN_MINUTES" --save-every 1 "$precision"
echo "trained: ${SECONDS}s in all, on $(encoded) chunks"
jobs -p | xargs -r kill 2>/dev/null || true
pkill -f "incontext.train data" 2>/dev/null || true
wait 2>/dev/null || true

train export --out "$OUT" --to "$EXPORT_TO"
find "$EXPORT_TO" -name '*.safetensors' -exec ls -l {} +
if [ -n "$PACK" ]; then
  mkdir -p "$PACK"
  tar -C "$EXPORT_TO" -cf - . | split -b 15000000 - "$PACK/nano.tar.part-"
  ls -l "$PACK"
fi
echo "done in ${SECONDS}s: $EXPORT_TO"
