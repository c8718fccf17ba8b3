#!/usr/bin/env bash
# Decode + preprocess benchmark, dtta against the Python/PIL path (torchvision's ImageNet
# eval transform) on the same JPEGs made from the photographs that ship inside
# scikit-learn and scikit-image. About 2 minutes once the bench binary is built.
#
#   bash bench/preprocess.sh            (from the repository root; `make bench` calls it)
#
# Writes target/bench/{photos/,pil_out/,preprocess_pil.json,preprocess.json,
# preprocess_report.json} and prints the table. PY and LIBTORCH may be set; the defaults
# are the project's venv and its torch package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -z "${LIBTORCH:-}" ]; then
    LIBTORCH="$(ls -d "$PWD"/.venv/lib/python3*/site-packages/torch | head -n 1)"
    export LIBTORCH
fi
PHOTOS=target/bench/photos

"$PY" bench/photos.py --out "$PHOTOS"
"$PY" bench/pil_preprocess.py --photos "$PHOTOS" --out target/bench/preprocess_pil.json --pil-out target/bench/pil_out
cargo bench --bench preprocess -- --photos "$PHOTOS" --out target/bench/preprocess.json --pil-out target/bench/pil_out
"$PY" bench/report_preprocess.py --dtta target/bench/preprocess.json --pil target/bench/preprocess_pil.json \
    --out target/bench/preprocess_report.json
