#!/usr/bin/env bash
# The GPU preset of the step benchmark (ViT-B/16-like CLIP, batch 256, bf16, TF32, fused AdamW) on a
# lent accelerator; about 2-3 minutes on an H200, no network needed.
#
# The device image has torch, timm, safetensors and tokenizers, but not omegaconf, open_clip, ftfy
# or wcwidth. They are pure Python: carry them as a folder, prepared once on this machine:
#   mkdir -p .bench_site && echo /.bench_site/ >> .git/info/exclude
#   cp -r /work/venv/lib/python3.11/site-packages/{omegaconf,open_clip,ftfy,wcwidth} .bench_site/
# then run it with carry=[".bench_site"], timeout_s=420. COMPILE=1 adds a torch.compile run of the
# two CLIP contenders (a few more minutes of compilation).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.bench_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__)" || exit 1
$PY benchmarks/bench_step.py --preset gpu --quick --out "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log"
status=$?
if [ "${COMPILE:-0}" = 1 ]; then
  $PY benchmarks/bench_step.py --preset gpu --quick --compile --only "clip bf16" --out "$OUT/gpu_step_compile.json" \
    2>&1 | tee "$OUT/gpu_step_compile.log"
fi
nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv
exit $status
