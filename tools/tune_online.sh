#!/usr/bin/env bash
# EATA's and SAR's settings on VALIDATION digits only (README, "EATA, SAR and the
# stream protocols"): 200 validation digits (shards 0-1 of `make_demo_shards.py --split
# validation`), clean + all 15 corruptions at severity 3, batches of 64 as `make eval`;
# EATA's Fisher information from 100 other clean validation digits (shard 2). Each
# setting's output under out/tune-online/, then one summary line per setting.
# Usage: tools/tune_online.sh [BIN]   (BIN defaults to target/release/dtta)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/dtta}
OUT=out/tune-online
PY=.venv/bin/python
rm -rf "$OUT"
$PY tools/make_demo_shards.py "$OUT/val-mnist" --split validation --shards 3 >/dev/null

run() { # NAME ARGS...: one setting
  local name=$1; shift
  "$BIN" run pipelines/robustness-eval.toml --no-progress \
    --set "input.url=$OUT/val-mnist/shard-{000000..000001}.tar" \
    --set runtime.torch_threads=1 --set "output.url=$OUT/$name/" "$@" 2>/dev/null
}
FISHER=(--set "tta.eata.fisher_url=$OUT/val-mnist/shard-000002.tar" --set tta.eata.fisher_samples=100)
run source --set tta.method=source
run tent --set tta.method=tent
for lr in 2.5e-4 1e-3 1e-2; do
  run "eata-lr$lr" --set tta.method=eata --set "tta.eata.lr=$lr" "${FISHER[@]}"
  run "eta-lr$lr" --set tta.method=eata --set "tta.eata.lr=$lr" --set tta.eata.fisher_alpha=0
  run "sar-lr$lr" --set tta.method=sar --set "tta.sar.lr=$lr"
done
# EATA's redundancy threshold (set for 1,000 classes) on 10, and batches of 16.
for d in 0.4 1.01; do
  run "eata-d$d-lr1e-2" --set tta.method=eata --set tta.eata.lr=1e-2 --set "tta.eata.d_margin=$d" "${FISHER[@]}"
done
run tent-b16 --set tta.method=tent --set runtime.batch_size=16
run eata-b16-lr1e-2 --set tta.method=eata --set tta.eata.lr=1e-2 --set runtime.batch_size=16 "${FISHER[@]}"
run sar-b16-lr1e-2 --set tta.method=sar --set tta.sar.lr=1e-2 --set runtime.batch_size=16
for method in tent eata sar; do
  set -- --set tta.method=$method --set protocol.kind=continual
  [ $method = eata ] && set -- "$@" "${FISHER[@]}"
  run "$method-continual" "$@"
done

for dir in "$OUT"/[a-z]*/; do
  case $dir in *val-mnist*) continue;; esac
  printf '%-28s' "$(basename "$dir")"
  "$BIN" summarize "$dir" 2>/dev/null | grep -E "^(clean|mean over corrupted)" | tr -s ' ' | tr '\n' ' '
  echo
done
