#!/usr/bin/env bash
# The bundled nano model from scratch, every run in order (docs/training.md, "Recipe").
# About 14 hours on a 2-core CPU. Every stage resumes from its checkpoint under runs/, so the
# script can be stopped and run again; a finished stage costs only its export.
#
#   scripts/train_nano.sh              # all stages, then the benchmark
#
# Runs 3a–3i, w and w2 trained the flow from noise; run 4 tried the flow from the context.
set -euo pipefail
cd "$(dirname "$0")/.."
t() { python3 run.py train "$@"; }
# Runs 3b–3i read run 3a's chunks, and every run uses stage 1's autoencoder (without it
# under its folder, a run would take the bundled model's).
link() { mkdir -p "runs/$1"; ln -sfn ../nano/data "runs/$1/data"; ln -sfn ../nano/vae.pt "runs/$1/vae.pt"; }
noise=(--flow-start noise)

t data --render-only --chunks 30 --families basic
t vae --minutes 24 --lr 2e-3
t data --chunks 30 --families basic
t transformer --minutes 65 "${noise[@]}"                                                                  # 3a
t export --no-ema --to runs/nano/a
link nano_b; t transformer --out runs/nano_b --minutes 70 --edit-weight 6 --uniform-t 0 --init-from runs/nano/a "${noise[@]}"   # 3b
t export --out runs/nano_b --no-ema --to runs/nano_b/export
link nano_c; t transformer --out runs/nano_c --minutes 52 --lr 3e-4 --uniform-t 0 --init-from runs/nano_b/export "${noise[@]}"  # 3c
t export --out runs/nano_c --no-ema --to runs/nano_c/export
t data --start 30 --chunks 6
link nano_d; t transformer --out runs/nano_d --minutes 95 --lr 3e-4 --edit-weight 1 --init-from runs/nano_c/export "${noise[@]}"  # 3d
t export --out runs/nano_d --to runs/nano_d/export
link nano_e; t transformer --out runs/nano_e --minutes 14 --lr 1e-4 --edit-weight 1 --guidance-start 0 --init-from runs/nano_d/export "${noise[@]}"  # 3e
t export --out runs/nano_e --to runs/nano_e/export
t data --start 36 --chunks 24
link nano_f; t transformer --out runs/nano_f --minutes 100 --lr 3e-4 --edit-weight 1 --guidance-start 0 --init-from runs/nano_e/export "${noise[@]}"  # 3f
t export --out runs/nano_f --to runs/nano_f/export
t data --start 60 --chunks 24
link nano_g; t transformer --out runs/nano_g --minutes 95 --lr 3e-4 --edit-weight 1 --guidance-start 0 --init-from runs/nano_f/export "${noise[@]}"  # 3g
t export --out runs/nano_g --to runs/nano_g/export
t data --start 84 --chunks 24 --families resize,replace,invert,night,texture,outline,pixelate,pastel,text,creature
link nano_h; t transformer --out runs/nano_h --minutes 90 --lr 3e-4 --edit-weight 1 --guidance-start 0 --init-from runs/nano_g/export "${noise[@]}"  # 3h
t export --out runs/nano_h --to runs/nano_h/export
t data --start 108 --chunks 20 --families recolor,add,move,background,resize,replace,invert,night,texture,outline,pixelate,pastel,text,creature
link nano_i; t transformer --out runs/nano_i --minutes 85 --lr 3e-4 --edit-weight 1 --guidance-start 0 --init-from runs/nano_h/export "${noise[@]}"  # 3i
t export --out runs/nano_i --to runs/nano_i/export

# Run 4: the flow from the context (x1 = context + 0.3·noise), on 24 chunks of all 16
# families in a folder of its own (their seeds are run 3a's, their families all 16).
mkdir -p runs/nano_4; ln -sfn ../nano/vae.pt runs/nano_4/vae.pt
t data --out runs/nano_4 --start 0 --chunks 24
t transformer --out runs/nano_4 --minutes 90 --lr 3e-4 --edit-weight 1 --guidance-start 0 --flow-start context --start-noise 0.3 --init-from runs/nano_i/export
t export --out runs/nano_4 --to runs/nano_4/export   # not bundled: it ties 3i

# Session 15: 3i's decoder grown (twice the channels, one more block a level; the encoder,
# grown too, computes the same latents) and trained alone, in two legs of 6 and 42 minutes.
# 3i with it was the bundled model of session 15.
t vae --out runs/nano_dec --decoder-only --init-from runs/nano_i/export --widen 2 --deepen 1 --minutes 6 --lr 5e-4
t vae --out runs/nano_dec --decoder-only --minutes 42 --lr 5e-4
t export-vae --out runs/nano_dec --model runs/nano_i/export --to runs/nano_dec/model

# Runs w (session 13) and w2 (session 16): the workflow families trained in, then continued
# on w's chunks, run 3j's and three fresh ones. Their chunks are encoded with stage 1's
# encoder (the grown one computes the same latents). Run t (w2 with the T5's neighbour heads) with the grown decoder is the bundled model.
for r in nano_w nano_j nano_w2; do mkdir -p runs/$r; ln -sfn ../nano/vae.pt runs/$r/vae.pt; done
t data --out runs/nano_w --start 400 --chunks 12 --families workflows
t data --out runs/nano_w --start 412 --chunks 7
t transformer --out runs/nano_w --minutes 90 --lr 3e-4 --edit-weight 1 --guidance-start 0 --init-from runs/nano_i/export "${noise[@]}"  # w
t export --out runs/nano_w --to runs/nano_w/export
t data --out runs/nano_j --start 500 --chunks 12 --families recolor,add,move,background,resize,replace,invert,night,texture,outline,pastel,text
t data --out runs/nano_j --start 512 --chunks 5
mkdir -p runs/nano_w2/data
for c in runs/nano_w/data/chunk_*.pt runs/nano_j/data/chunk_*.pt; do ln -sfn "../../${c#runs/}" runs/nano_w2/data/; done
t data --out runs/nano_w2 --start 520 --chunks 3
t transformer --out runs/nano_w2 --minutes 60 --lr 2e-4 --edit-weight 1 --guidance-start 0 --init-from runs/nano_w/export "${noise[@]}"  # w2
t export --out runs/nano_w2 --to runs/nano_w2/export
rm -rf runs/nano_w2/export/vae && cp -r runs/nano_dec/model/vae runs/nano_w2/export/   # w2's transformer and text encoders with the grown decoder
# Run t: w2 with two T5 heads pointed at each word's neighbours, on w2's chunks: the bundled model.
mkdir -p runs/nano_t && ln -sfn ../nano_w2/data runs/nano_t/data && ln -sfn ../nano/vae.pt runs/nano_t/vae.pt
t transformer --out runs/nano_t --minutes 75 --lr 3e-4 --edit-weight 1 --guidance-start 0 --neighbour-heads --init-from runs/nano_w2/export "${noise[@]}"  # t
t export --out runs/nano_t --to runs/nano_t/export
rm -rf runs/nano_t/export/vae && cp -r runs/nano_dec/model/vae runs/nano_t/export/   # with the grown decoder
rm -rf incontext/weights/nano && cp -r runs/nano_t/export incontext/weights/nano
python3 run.py bench quality --n 20
