#!/usr/bin/env bash
# Seconds per image of Diffusion-TTA at the paper's budget: dtta against the Python
# reference loop (tools/reference_tta.py --images), on the same images and the same bundle
# at the same budget, in fp32 and (on CUDA) bf16. The (t, eps) draws are of the same
# distribution, not the same numbers (dtta draws from a generator of its own, the reference
# from torch's), so "loss_first rel diff" is sampling noise, not a parity check (that is
# tests/engine.rs), and a prediction near a tie may differ. Beside it, the same
# run measures DUSA (method dusa, online, DUSA's batch of 64 = 8 images x accum 8,
# 4 + 2 candidates at t = 100) on the same bundle.
#
#   bench/gpu.sh [--tiny] [--images N] [--device cuda|cpu] [--max-batch N] [--threads N]
#                [--unfused] [--keep] [--bundle DIR --shard TAR] [--json PATH]
#                [--cases diffusion-tta,dusa] [--dusa-images N] [--dusa-batch N] [--dusa-accum N]
#
# Real size (the default; needs a GPU): tools/export_bundle.py builds ConvNeXt-Tiny,
# DiT-XL/2-256 (1000-class label table) and the SD VAE encoder with random weights and
# exports them as a bundle; then N images (default 4; the first is a warm-up, left out of
# the means) go through `dtta run` (method diffusion-tta, steps 5, accum 12,
# samples_per_step 15: 180 (t, eps) pairs per optimizer step) and through the reference
# loop. Prints seconds per image for each and the ratio reference/dtta, and writes
# target/bench/gpu.json. Estimated at about 5 minutes on an H100 with 4 images (not yet
# measured there).
#
# --tiny: the same architectures at tiny sizes (tools/export_bundle.py --tiny), so the
# whole script runs on a CPU in about a minute; the GPU run is only a change of size.
# bf16 is CUDA autocast and an error on the CPU in dtta (by design), so a CPU run
# measures fp32 only.
# --max-batch: dtta's tta.max_batch (denoiser chunk when fusing a step's 180 pairs);
#   default 60 at real size (180 pairs of DiT-XL/2 at once do not fit in 80 GB in fp32),
#   dtta's default 256 with --tiny.
# --threads: torch CPU threads for both (dtta runtime.torch_threads, reference --threads);
#   default 1 on the CPU (on a shared machine, OpenMP's multi-threaded ops slow down by
#   orders of magnitude when another process takes a core), torch's default on CUDA.
# --unfused: also run dtta with tta.fuse_accum = false (the reference's loop shape).
# --bundle DIR --shard TAR: an existing bundle and a WebDataset shard of exactly
#   --images samples instead of the exported models and generated images (`make bench`
#   runs the demo bundle on demo digits this way, on the CPU).
# --json PATH: where the results go (default target/bench/gpu.json).
# --keep: keep the work folder (the real bundle is 3 GB; removed by default).
# --cases: which cases run (comma-separated; default both). `dusa` alone skips the
#   Diffusion-TTA runs and the reference.
# --dusa-images N: images of the dusa case (default 72: 9 batches of 8, the first batch a
#   warm-up left out of the mean), its own shard of generated images (with --shard, that
#   shard). --dusa-batch / --dusa-accum: runtime.batch_size and tta.dusa.accum (default 8
#   and 8: DUSA's 64 images per optimizer step; 64 images x 6 candidates as one DiT-XL/2
#   batch with gradients would not fit in GPU memory in fp32). DUSA has no reference
#   loop in images mode; its parity is tests/engine.rs.
#
# Environment: PYTHON (a python with torch; default .venv/bin/python, else python3),
# DTTA_BIN (default target/release/dtta), BENCH_WORK (work folder).
# On a machine without this repo's .venv (a GPU box with PyTorch 2.11 and no internet),
# copy a release build of dtta there and point DTTA_BIN at it: libtorch comes from
# python3's torch package (its lib/ is put on LD_LIBRARY_PATH below).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TINY=0
IMAGES=4
DEVICE=""
MAX_BATCH=""
THREADS=""
UNFUSED=0
KEEP=0
BUNDLE=""
GIVEN_SHARD=""
JSON_OUT=""
CASES="diffusion-tta,dusa"
DUSA_IMAGES=72
DUSA_BATCH=8
DUSA_ACCUM=8
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tiny) TINY=1 ;;
        --images) IMAGES="${2:?--images needs a number}"; shift ;;
        --device) DEVICE="${2:?--device needs cpu or cuda}"; shift ;;
        --max-batch) MAX_BATCH="${2:?--max-batch needs a number}"; shift ;;
        --threads) THREADS="${2:?--threads needs a number}"; shift ;;
        --unfused) UNFUSED=1 ;;
        --keep) KEEP=1 ;;
        --bundle) BUNDLE="${2:?--bundle needs a folder}"; shift ;;
        --shard) GIVEN_SHARD="${2:?--shard needs a tar}"; shift ;;
        --json) JSON_OUT="${2:?--json needs a path}"; shift ;;
        --cases) CASES="${2:?--cases needs a list}"; shift ;;
        --dusa-images) DUSA_IMAGES="${2:?--dusa-images needs a number}"; shift ;;
        --dusa-batch) DUSA_BATCH="${2:?--dusa-batch needs a number}"; shift ;;
        --dusa-accum) DUSA_ACCUM="${2:?--dusa-accum needs a number}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for n in "$IMAGES" "$DUSA_IMAGES" "$DUSA_BATCH" "$DUSA_ACCUM"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench/gpu.sh: --images, --dusa-images, --dusa-batch and --dusa-accum must be positive numbers" >&2; exit 2; }
done
RUN_TTA=0 RUN_DUSA=0
for c in ${CASES//,/ }; do
    case "$c" in
        diffusion-tta) RUN_TTA=1 ;;
        dusa) RUN_DUSA=1 ;;
        *) echo "bench/gpu.sh: unknown case $c in --cases (diffusion-tta, dusa)" >&2; exit 2 ;;
    esac
done

started=$(date +%s.%N)
elapsed() { python_float "$(date +%s.%N) - $started"; }
python_float() { awk "BEGIN { printf \"%.1f\", $1 }"; }
say() { echo "[bench $(elapsed)s] $*"; }

# A python with torch: $PYTHON, this repo's venv, or python3 (a GPU box's PyTorch).
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch' 2>/dev/null; then
    PY="$ROOT/.venv/bin/python"
else
    PY=python3
fi
"$PY" -c 'import torch, PIL, safetensors' 2>/dev/null \
    || { echo "bench/gpu.sh: $PY lacks torch, pillow or safetensors" >&2; exit 1; }
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

DTTA="${DTTA_BIN:-$ROOT/target/release/dtta}"
[[ -x "$DTTA" ]] || { echo "bench/gpu.sh: no dtta binary at $DTTA (make build, or set DTTA_BIN)" >&2; exit 1; }
"$DTTA" --version >/dev/null || { echo "bench/gpu.sh: $DTTA does not start (libtorch from $TORCH_LIB)" >&2; exit 1; }

HAS_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [[ -z "$DEVICE" ]]; then
    if [[ "$HAS_CUDA" == 1 ]]; then DEVICE=cuda; else DEVICE=cpu; fi
    if [[ "$DEVICE" == cpu && "$TINY" == 0 ]]; then
        echo "bench/gpu.sh: no CUDA device: real sizes need a GPU; use --tiny here (or --device cpu to insist)" >&2
        exit 2
    fi
fi
if [[ "$DEVICE" == cuda* ]]; then
    PRECISIONS=(fp32 bf16)
else
    PRECISIONS=(fp32)
fi
if [[ -z "$MAX_BATCH" ]]; then
    if [[ "$TINY" == 1 ]]; then MAX_BATCH=256; else MAX_BATCH=60; fi
fi
if [[ -z "$THREADS" ]]; then
    if [[ "$DEVICE" == cpu ]]; then THREADS=1; else THREADS=0; fi
fi
SIZE=$([[ "$TINY" == 1 ]] && echo tiny || echo real)
[[ -n "$BUNDLE" ]] && SIZE="$(basename "$BUNDLE")"
JSON_OUT="${JSON_OUT:-$ROOT/target/bench/gpu.json}"
WORK="${BENCH_WORK:-$ROOT/target/bench/work-$SIZE}"
rm -rf "$WORK"
mkdir -p "$WORK" "$ROOT/target/bench"
cleanup() { if [[ "$KEEP" == 0 && "$TINY" == 0 ]]; then rm -rf "$WORK/bundle"; fi; }
trap cleanup EXIT

STEPS=5 ACCUM=12 SAMPLES=15
say "device $DEVICE, torch threads $THREADS (0: torch's default), $SIZE models, $IMAGES image(s) (the first a warm-up), steps $STEPS x accum $ACCUM x samples $SAMPLES, python $PY, dtta $DTTA"
if [[ "$DEVICE" == cpu ]]; then
    say "CPU: fp32 only (bf16 is CUDA autocast; dtta refuses it on the CPU)"
fi

# 1. The bundle.
if [[ -z "$BUNDLE" ]]; then
    BUNDLE="$WORK/bundle"
    export_args=(--out "$BUNDLE" --device "$DEVICE")
    [[ "$TINY" == 1 ]] && export_args+=(--tiny)
    "$PY" tools/export_bundle.py "${export_args[@]}" 2>&1 | sed 's/^/  /'
    "$DTTA" inspect "$BUNDLE" --device "$DEVICE" | sed 's/^/  /'
fi
say "bundle ready: $BUNDLE"

# 2. The images (unless --shard): one WebDataset shard of PNGs (lossless, so dtta and PIL decode the same
#    pixels), from scikit-learn's two sample photos (shifted crops, flips) when it is
#    installed, else smooth random images.
make_shard() {  # dir count
"$PY" - "$1" "$2" <<'EOF'
import io, os, sys, tarfile
import numpy as np
from PIL import Image

out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)
try:
    from sklearn.datasets import load_sample_images
    photos = list(load_sample_images().images)
except Exception:
    photos = []
source = "scikit-learn sample photos" if photos else "smooth random images"
with tarfile.open(os.path.join(out, "shard-000000.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
    for i in range(n):
        if photos:
            a = photos[i % len(photos)]
            h, w = a.shape[:2]
            ch, cw = int(h * 0.85), int(w * 0.85)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            a = a[y:y + ch, x:x + cw]
            if (i // len(photos)) % 2:
                a = a[:, ::-1]
            img = Image.fromarray(np.ascontiguousarray(a))
        else:
            low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
            img = low.resize((480, 360), Image.BICUBIC)
        png = io.BytesIO()
        img.save(png, format="PNG")
        for name, payload in ((f"img-{i:04d}.png", png.getvalue()), (f"img-{i:04d}.cls", str(i % 10).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))
print(f"  {n} image(s) ({source}) in {out}/shard-000000.tar")
EOF
}
if [[ -z "$GIVEN_SHARD" ]]; then
    if [[ "$RUN_TTA" == 1 ]]; then make_shard "$WORK/images" "$IMAGES"; fi
    if [[ "$RUN_DUSA" == 1 ]]; then make_shard "$WORK/dusa-images" "$DUSA_IMAGES"; fi
fi
SHARD="${GIVEN_SHARD:-$WORK/images/shard-000000.tar}"
DUSA_SHARD="${GIVEN_SHARD:-$WORK/dusa-images/shard-000000.tar}"

# 3. dtta, then the reference, per precision.
launch() {  # tag: runs $WORK/pipeline-TAG.toml, times the process
    local tag=$1 t0 t1
    t0=$(date +%s.%N)
    if ! "$DTTA" run "$WORK/pipeline-$tag.toml" --no-progress >"$WORK/dtta-$tag.log" 2>&1; then
        tail -n 20 "$WORK/dtta-$tag.log" >&2
        echo "bench/gpu.sh: dtta run ($tag) failed; log: $WORK/dtta-$tag.log" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    python_float "$t1 - $t0" >"$WORK/dtta-$tag.wall"
    say "dtta $tag: done in $(cat "$WORK/dtta-$tag.wall")s (process wall time, model load included)"
}

run_dtta() {  # tag precision fuse
    local tag=$1 prec=$2 fuse=$3
    cat >"$WORK/pipeline-$tag.toml" <<EOF
[input]
url = "$SHARD"
format = "webdataset"

[output]
url = "$WORK/dtta-$tag/"

[model]
bundle = "$BUNDLE"

[tta]
method = "diffusion-tta"
steps = $STEPS
accum = $ACCUM
samples_per_step = $SAMPLES
precision = "$prec"
fuse_accum = $fuse
max_batch = $MAX_BATCH

[runtime]
device = "$DEVICE"
torch_threads = $THREADS
seed = 0
EOF
    launch "$tag"
}

run_reference() {  # precision
    local prec=$1
    if ! "$PY" tools/reference_tta.py "$BUNDLE" --images "$SHARD" --device "$DEVICE" --precision "$prec" \
        --steps $STEPS --accum $ACCUM --samples-per-step $SAMPLES --seed 0 --warmup 1 --threads "$THREADS" \
        --json "$WORK/ref-$prec.json" >"$WORK/ref-$prec.log" 2>&1; then
        tail -n 20 "$WORK/ref-$prec.log" >&2
        echo "bench/gpu.sh: reference ($prec) failed; log: $WORK/ref-$prec.log" >&2
        exit 1
    fi
    say "reference $prec: $(tail -n 1 "$WORK/ref-$prec.log" | sed 's/^reference: //')"
}

run_dusa() {  # precision
    local prec=$1 tag="dusa-$1"
    cat >"$WORK/pipeline-$tag.toml" <<EOF
[input]
url = "$DUSA_SHARD"
format = "webdataset"

[output]
url = "$WORK/dtta-$tag/"

[model]
bundle = "$BUNDLE"

[tta]
method = "dusa"
mode = "online"
precision = "$prec"

[tta.dusa]
timestep = 100
topk = 4
random = 2
accum = $DUSA_ACCUM

[runtime]
device = "$DEVICE"
torch_threads = $THREADS
batch_size = $DUSA_BATCH
seed = 0
EOF
    launch "$tag"
}

TAGS=()
DUSA_TAGS=()
for prec in "${PRECISIONS[@]}"; do
    if [[ "$RUN_TTA" == 1 ]]; then
        run_dtta "$prec" "$prec" true
        TAGS+=("$prec")
        if [[ "$UNFUSED" == 1 ]]; then
            run_dtta "$prec-unfused" "$prec" false
            TAGS+=("$prec-unfused")
        fi
        run_reference "$prec"
    fi
    if [[ "$RUN_DUSA" == 1 ]]; then
        run_dusa "$prec"
        DUSA_TAGS+=("dusa-$prec")
    fi
done

# 4. The table and target/bench/gpu.json.
"$PY" - "$WORK" "$JSON_OUT" "$DEVICE" "$SIZE" "$IMAGES" "$MAX_BATCH" "$THREADS" "$(elapsed)" \
    "$DUSA_BATCH" "$DUSA_ACCUM" "${DUSA_TAGS[*]:-}" "${TAGS[@]}" <<'EOF'
import glob, json, os, sys

work, out, device, size, images, max_batch, threads, elapsed, dusa_batch, dusa_accum, dusa_tags = sys.argv[1:12]
tags = sys.argv[12:]
dusa_tags = dusa_tags.split()

def dtta_result(tag, warmup=1):
    runs = [json.load(open(p)) for p in glob.glob(f"{work}/dtta-{tag}/_runs/*.json")
            if not os.path.basename(p).startswith("summary")]
    run = runs[0]
    rows = []
    try:
        import pyarrow.parquet as pq
        for p in sorted(glob.glob(f"{work}/dtta-{tag}/predictions/**/*.parquet", recursive=True)):
            rows += pq.read_table(p, columns=["key", "status", "pred_before", "pred_after",
                                              "loss_first", "loss_last", "adapt_ms"]).to_pylist()
    except ImportError:
        pass
    rows.sort(key=lambda r: r["key"])
    if rows:
        timed = rows[warmup:] if len(rows) > warmup else rows
        s_per_image = sum(r["adapt_ms"] for r in timed) / len(timed) / 1e3
        source = "adapt_ms per image from predictions/*.parquet, warm-up left out"
    else:  # no pyarrow: the run summary's mean, warm-up included
        s_per_image = run["tally"]["adapt_ms"] / max(run["tally"]["rows"], 1) / 1e3
        timed = []
        source = "tally.adapt_ms / rows from _runs/*.json, warm-up included"
    return {
        "s_per_image": s_per_image, "timed_images": len(timed), "source": source,
        "wall_s": float(open(f"{work}/dtta-{tag}.wall").read()), "run_elapsed_s": run["elapsed_s"],
        "adapt_busy_s": run["adapt_busy_s"], "device": run["device"], "statuses": run["tally"]["statuses"],
        "rows": rows,
    }

gpu = None
try:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
except Exception:
    pass

table = []
for tag in tags:
    prec = tag.split("-")[0]
    d = dtta_result(tag)
    ref = json.load(open(f"{work}/ref-{prec}.json"))
    by_key = {r["key"]: r for r in ref["results"]}
    agree = [r["pred_after"] == by_key[r["key"]]["pred_after"] for r in d["rows"] if r["key"] in by_key]
    rel = [abs(r["loss_first"] - by_key[r["key"]]["step_losses"][0]) / max(abs(by_key[r["key"]]["step_losses"][0]), 1e-12)
           for r in d["rows"] if r["key"] in by_key and r["loss_first"] is not None]
    table.append({
        "config": tag, "precision": prec, "fuse_accum": not tag.endswith("unfused"), "max_batch": int(max_batch),
        "reference_s_per_image": ref["seconds_per_image"], "dtta_s_per_image": d["s_per_image"],
        "ratio_reference_over_dtta": ref["seconds_per_image"] / d["s_per_image"],
        "pred_after_agree": f"{sum(agree)}/{len(agree)}" if agree else "n/a",
        "loss_first_max_rel_diff": max(rel) if rel else None,
        "dtta": {k: v for k, v in d.items() if k != "rows"},
        "reference": {k: ref[k] for k in ("seconds_per_image", "timed_images", "load_s", "threads", "torch")},
        "dtta_statuses": d["statuses"],
        "reference_nonfinite": sum(r["nonfinite"] for r in ref["results"]),
    })

dusa = []
for tag in dusa_tags:
    d = dtta_result(tag, warmup=int(dusa_batch))
    full = next((r for r in table if r["config"] == tag[len("dusa-"):]), None)
    dusa.append({
        "config": tag, "precision": tag[len("dusa-"):], "batch_size": int(dusa_batch), "accum": int(dusa_accum),
        "candidates": 6, "timestep": 100, "denoiser_evals_per_image": 6, "dtta_s_per_image": d["s_per_image"],
        "diffusion_tta_over_dusa": full["dtta_s_per_image"] / d["s_per_image"] if full else None,
        "dtta": {k: v for k, v in d.items() if k != "rows"}, "dtta_statuses": d["statuses"],
    })

if table:
    print()
    print(f"Diffusion-TTA seconds per image, {size} models on {gpu or device} (torch threads {threads if threads != '0' else 'default'}), {images} image(s) "
          f"(first = warm-up, left out), steps 5 x accum 12 x samples 15 (180 (t, eps) pairs per step)")
    head = f"{'config':<14} {'reference s/img':>16} {'dtta s/img':>11} {'ref/dtta':>9} {'pred_after agree':>17} {'loss_first rel diff':>20}"
    print(head)
    print("-" * len(head))
    for r in table:
        rel = "n/a" if r["loss_first_max_rel_diff"] is None else f"{r['loss_first_max_rel_diff']:.1e}"
        print(f"{r['config']:<14} {r['reference_s_per_image']:>16.4f} {r['dtta_s_per_image']:>11.4f} "
              f"{r['ratio_reference_over_dtta']:>8.2f}x {r['pred_after_agree']:>17} {rel:>20}")
    for r in table:
        bad = {k: v for k, v in r["dtta_statuses"].items() if k != "ok"}
        if bad or r["reference_nonfinite"]:
            print(f"note: {r['config']}: dtta statuses {r['dtta_statuses']}, reference non-finite images {r['reference_nonfinite']}")
    print(f"dtta: fuse_accum {'true' if all(r['fuse_accum'] for r in table) else 'true/false'}, max_batch {max_batch}; "
          "reference: the published loop (classifier every iteration, 15 pairs per iteration); (t, eps) draws of the same distribution, not the same draws")
    if device == "cpu":
        print("bf16: not measured (CUDA autocast only; dtta refuses precision = \"bf16\" on the CPU)")
if dusa:
    print()
    print(f"DUSA online seconds per image, {size} models on {gpu or device}: batches of {dusa_batch} images, "
          f"accum {dusa_accum} ({int(dusa_batch) * int(dusa_accum)} images per optimizer step), 4 + 2 candidates "
          f"at t = 100 (6 denoiser passes per image); the first batch is a warm-up, left out")
    head = f"{'config':<14} {'dtta s/img':>11} {'diffusion-tta/dusa':>19}"
    print(head)
    print("-" * len(head))
    for r in dusa:
        ratio = "n/a" if r["diffusion_tta_over_dusa"] is None else f"{r['diffusion_tta_over_dusa']:.1f}x"
        print(f"{r['config']:<14} {r['dtta_s_per_image']:>11.4f} {ratio:>19}")
        if any(k != "ok" for k in r["dtta_statuses"]):
            print(f"note: {r['config']}: dtta statuses {r['dtta_statuses']}")
report = {"device": device, "gpu": gpu, "size": size, "images": int(images), "warmup_images": 1,
          "steps": 5, "accum": 12, "samples_per_step": 15, "max_batch": int(max_batch),
          "torch_threads": int(threads), "elapsed_s": float(elapsed), "rows": table, "dusa": dusa}
with open(out, "w") as f:
    json.dump(report, f, indent=2)
print(f"written: {out}")
EOF
say "total"
