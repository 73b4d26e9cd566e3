#!/usr/bin/env bash
# Fine-tuning 3T from a pretrained CLIP (the clip-art demo's CLIP of each seed, exported to open_clip)
# with the real ImageNet h (EfficientNet-Lite0), optim.fresh_lr_scale 1 against 10; 3 seeds, 300 steps,
# lr 1e-4. Needs the clip-art demo's runs (threetowers demo --preset demo/clipart benchmark=$DATA
# output_dir=$DEMO) and the prepared benchmark ($DATA). Scores: python score.py (beside this file).
set -euo pipefail
DEMO=${DEMO:-/tmp/demo_clipart}; DATA=${DATA:-/tmp/clipart}; OUT=${OUT:-/tmp/ft}
for s in 0 1 2; do
  threetowers export "$DEMO/runs/clip_seed$s/model" "$OUT/clip$s"
  for x in 1 10; do
    threetowers train "$DEMO/runs/3t_imagenet_seed$s/config.yaml" model.init_from=local-dir:"$OUT/clip$s" \
      optim.lr=1e-4 optim.warmup_steps=20 train.steps=300 optim.fresh_lr_scale=$x \
      train.output_dir="$OUT/run_s${s}_x$x" train.resume=never
  done
done
