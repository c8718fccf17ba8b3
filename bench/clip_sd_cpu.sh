#!/usr/bin/env bash
# The open-vocabulary path at real size on the CPU (README, "Performance"): CLIP
# ViT-B/16 + Stable Diffusion 1.x UNet and VAE with random weights at their published
# configs (tools/export_clip_sd.py random:ViT-B/16 random:sd1, 10 ImageNet class names),
# `dtta inspect`, then one 512x512 photo (scikit-image's astronaut) through Diffusion-TTA
# at 1 step x 1 x 2 (t, eps) pairs, the image tower adapted (the reference's recipe).
# Prints the run's seconds per image in the method and its peak resident memory.
# Needs about 4 GB of disk and 16 GB of memory; about 6 minutes on 2 cores.
# On a GPU, the same bundle runs through bench/gpu.sh --bundle DIR --shard TAR
# (and set --set runtime.device there); WORK=DIR keeps the bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BIN=${DTTA_BIN:-target/release/dtta}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
printf '%s\n' tench goldfish "great white shark" "tiger shark" hammerhead "electric ray" stingray cock hen ostrich \
  > "$WORK/names.txt"
$PY - "$WORK/one.tar" <<'PY'
import io, sys, tarfile
from PIL import Image
from skimage import data
buf = io.BytesIO()
Image.fromarray(data.astronaut()).save(buf, format="PNG")
with tarfile.open(sys.argv[1], "w") as t:
    for name, payload in (("astronaut.png", buf.getvalue()), ("astronaut.cls", b"0")):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
PY
[ -f "$WORK/clip-sd/denoiser.pt" ] || $PY tools/export_clip_sd.py "$WORK/clip-sd" \
  --clip random:ViT-B/16 --sd random:sd1 --classes "$WORK/names.txt" 2>/dev/null
"$BIN" inspect "$WORK/clip-sd"
rm -rf "$WORK/out"
cat > "$WORK/run.toml" <<TOML
[input]
url = "$WORK/one.tar"
[output]
url = "$WORK/out/"
[model]
bundle = "$WORK/clip-sd"
[tta]
method = "diffusion-tta"
steps = 1
accum = 1
samples_per_step = 2
adapt = "classifier"
[runtime]
device = "cpu"
TOML
"$BIN" run "$WORK/run.toml" --no-progress 2>/dev/null
