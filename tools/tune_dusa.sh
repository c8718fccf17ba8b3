#!/usr/bin/env bash
# DUSA's settings on VALIDATION material only (README, "Cost and accuracy" and "Dense
# evaluation"): each setting's output under out/tune-dusa/, then one summary table per
# task. Classification: 100 validation digits (shards 0-1 of `make_demo_shards.py --split
# validation`), clean + contrast, snow, zoom blur, motion blur at severity 3.
# Segmentation: 40 validation scenes, clean + the 4 corruptions of pipelines/demo-seg.toml.
# Usage: tools/tune_dusa.sh [BIN]   (BIN defaults to target/release/dtta)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/dtta}
OUT=out/tune-dusa
PY=.venv/bin/python
rm -rf "$OUT"
$PY tools/make_demo_shards.py "$OUT/val-mnist" --split validation --shards 10 >/dev/null
$PY tools/make_dense_demo_shards.py "$OUT/val-seg" --task seg --split validation --shards 1 --count 40 >/dev/null

cls() { # NAME ARGS...: one classification setting
  local name=$1; shift
  "$BIN" run pipelines/robustness-eval.toml --no-progress \
    --set "input.url=$OUT/val-mnist/shard-{000000..000001}.tar" \
    --set 'corrupt.kinds=["contrast","snow","zoom_blur","motion_blur"]' \
    --set runtime.torch_threads=1 --set "output.url=$OUT/cls/$name/" "$@" 2>/dev/null
}
cls source --set tta.method=source
D=(--set tta.method=dusa)
ON=(--set tta.method=dusa --set tta.mode=online --set runtime.batch_size=8)
cls online-b8-lr1e-5 "${ON[@]}" --set tta.dusa.lr=1e-5
cls online-b8-lr1e-4 "${ON[@]}" --set tta.dusa.lr=1e-4
cls online-b8-lr1e-3 "${ON[@]}" --set tta.dusa.lr=1e-3
cls online-b8x8-lr1e-5 "${ON[@]}" --set tta.dusa.lr=1e-5 --set tta.dusa.accum=8
cls online-b8x8-lr1e-4 "${ON[@]}" --set tta.dusa.lr=1e-4 --set tta.dusa.accum=8
cls online-b8-lr1e-4-nohead "${ON[@]}" --set tta.dusa.lr=1e-4 --set tta.dusa.adapt_head=false
cls episodic-1-lr1e-4 "${D[@]}" --set tta.dusa.steps=1 --set tta.dusa.lr=1e-4
cls episodic-3-lr1e-4 "${D[@]}" --set tta.dusa.steps=3 --set tta.dusa.lr=1e-4
cls episodic-3-lr1e-3 "${D[@]}" --set tta.dusa.steps=3 --set tta.dusa.lr=1e-3

seg() { # NAME ARGS...: one segmentation setting
  local name=$1; shift
  "$BIN" run pipelines/demo-seg.toml --no-progress --set "input.url=$OUT/val-seg/shard-000000.tar" \
    --set runtime.torch_threads=1 --set "output.url=$OUT/seg/$name/" "$@" 2>/dev/null
}
seg source --set tta.method=source
seg online-b8-lr1e-5 "${ON[@]}" --set tta.dusa.lr=1e-5
seg online-b8-lr1e-4 "${ON[@]}" --set tta.dusa.lr=1e-4
seg online-b8-lr1e-3 "${ON[@]}" --set tta.dusa.lr=1e-3
seg episodic-3-lr1e-4 "${D[@]}" --set tta.dusa.steps=3 --set tta.dusa.lr=1e-4

# One table per setting (summarize merges outputs of one method label).
for dir in "$OUT"/cls/[a-z]*/ "$OUT"/seg/[a-z]*/; do
  echo "== $dir"
  "$BIN" summarize "$dir" 2>/dev/null | grep -E "^(clean|mean over corrupted|ms per image|denoiser evals)"
done
