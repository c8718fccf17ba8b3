#!/usr/bin/env python3
"""The Python baseline of the decode + preprocess benchmark: PIL, as torchvision does it.

For every size class under PHOTOS (default target/bench/photos: imagenet/, camera/, as
bench/photos.py writes them) it times, images/s per core, on 1 process and on 2
processes (multiprocessing, every process decodes the whole set, so the work is equal;
images/s per core is images over CPU seconds, wall-clock rates are reported beside):

  decode_only  Image.open + load (PIL's libjpeg-turbo, full scale)
  full         torchvision's ImageNet eval transform on the PIL path:
               pil_loader (open, convert("RGB")) -> Resize(232) -> CenterCrop(224)
               -> ToTensor -> Normalize(mean, std), float32 CHW

torchvision is not installed, so its PIL path is written out here the way torchvision
0.2x does it: Resize(232) with a PIL image calls Image.resize((w, h), BILINEAR) with the
shorter side 232 and the longer int(232 * long / short) (no reducing_gap, no draft);
CenterCrop rounds the offsets with Python's round(); ToTensor is uint8 HWC -> CHW, then
float32 / 255; Normalize subtracts mean and divides by std in float32 (numpy here,
the same float32 operations torch does).

It writes the results to OUT (default target/bench/preprocess_pil.json) and each
image's output tensor as raw little-endian float32 to PIL_OUT/<class>/<name>.f32
(default target/bench/pil_out), which `cargo bench --bench preprocess` compares dtta's
output with.
"""

import argparse
import glob
import io
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

# One thread per process: the comparison is per core.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
from PIL import Image, features  # noqa: E402

try:  # torch is in the project's venv; the pipeline below does not need it
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    torch = None

RESIZE, CROP = 232, 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
TRIALS = 5
PROCESSES = (1, 2)


def decode_only(data):
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def pil_loader(data):
    # torchvision.datasets.folder.pil_loader, from memory instead of a path
    im = Image.open(io.BytesIO(data))
    return im.convert("RGB")


def resize(im, size):
    # torchvision.transforms.functional.resize, PIL branch, int size
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return im.resize((new_w, new_h), Image.BILINEAR)


def center_crop(im, size):
    w, h = im.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def to_tensor_normalize(im):
    a = np.array(im, dtype=np.uint8, copy=True)  # HWC
    t = np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32)
    t /= np.float32(255.0)
    t -= MEAN
    t /= STD
    return t


def full(data):
    return to_tensor_normalize(center_crop(resize(pil_loader(data), RESIZE), CROP))


PIPELINES = {"decode_only": decode_only, "full": full}


def run_passes(fn, photos, passes):
    for _ in range(passes):
        for data in photos:
            fn(data)


def _worker(name, photos, passes, barrier, queue):
    fn = PIPELINES[name]
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    run_passes(fn, photos, passes)
    queue.put((start, time.perf_counter(), time.process_time() - cpu))


def trial(name, photos, processes, passes):
    """(images, wall seconds, CPU seconds of all processes) of `processes` processes
    that each run `passes` passes over `photos`."""
    images = processes * passes * len(photos)
    if processes == 1:
        start, cpu = time.perf_counter(), time.process_time()
        run_passes(PIPELINES[name], photos, passes)
        return images, time.perf_counter() - start, time.process_time() - cpu
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(name, photos, passes, barrier, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    spans = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
    return images, wall, sum(c for _, _, c in spans)


def timings(photos, min_time):
    """Every pipeline on 1 and 2 processes, trials interleaved, as benches/preprocess.rs:
    images/s per core is images over CPU seconds (robust to other load on the machine),
    wall-clock rates beside it for the scaling."""
    cases = [(name, n) for name in PIPELINES for n in PROCESSES]
    passes = {}
    for name, n in cases:
        images, wall, _ = trial(name, photos, 1, 1)  # warm-up, sizes the trials
        passes[name, n] = max(1, math.ceil(min_time * images / wall / len(photos)))
    runs = {case: [] for case in cases}
    for _ in range(TRIALS):
        for case in cases:
            runs[case].append(trial(case[0], photos, case[1], passes[case]))
    out = {}
    for (name, n), rs in runs.items():
        per_core = [i / c for i, _, c in rs]
        wall = [i / w for i, w, _ in rs]
        m = statistics.median(per_core)
        out.setdefault(name, {})[str(n)] = {
            "processes": n,
            "images_per_s_per_core": m,
            "ms_per_image_per_core": 1e3 / m,
            "spread": (max(per_core) - min(per_core)) / m,
            "wall_images_per_s": statistics.median(wall),
            "wall_images_per_s_per_core": statistics.median(wall) / n,
            "per_core_trials": per_core,
            "wall_trials": wall,
            "images_per_trial": rs[0][0],
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", default=os.environ.get("DTTA_BENCH_PHOTOS", "target/bench/photos"))
    ap.add_argument("--out", default="target/bench/preprocess_pil.json")
    ap.add_argument("--pil-out", default="target/bench/pil_out")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per trial (5 trials per measurement)")
    args = ap.parse_args()

    classes = sorted(
        (d for d in os.listdir(args.photos) if os.path.isdir(os.path.join(args.photos, d))),
        key=lambda c: ({"imagenet": 0, "camera": 1}.get(c, 2), c),
    )
    if not classes:
        sys.exit(f"no size classes under {args.photos}; run bench/photos.py first")
    started = time.perf_counter()
    report = {}
    for cls in classes:
        paths = sorted(glob.glob(os.path.join(args.photos, cls, "*.jp*g")))
        if not paths:
            continue
        print(f"PIL preprocess bench: {cls} ({len(paths)} JPEGs)", file=sys.stderr)
        photos = [open(p, "rb").read() for p in paths]
        os.makedirs(os.path.join(args.pil_out, cls), exist_ok=True)
        for p, data in zip(paths, photos):
            name = os.path.splitext(os.path.basename(p))[0]
            full(data).astype("<f4").tofile(os.path.join(args.pil_out, cls, name + ".f32"))
        report[cls] = {"images": len(photos), "timings": timings(photos, args.min_time)}
    out = {
        "bench": "preprocess",
        "side": "pil",
        "photos": args.photos,
        "versions": {
            "python": platform.python_version(),
            "pillow": Image.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo"),
            "numpy": np.__version__,
            "torch": getattr(torch, "__version__", None),
        },
        "view": {"resize": RESIZE, "crop": CROP, "interpolation": "PIL BILINEAR", "normalize": "imagenet"},
        "cpu_count": os.cpu_count(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "seconds": time.perf_counter() - started,
        "classes": report,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    for cls, c in report.items():
        for name, by_n in c["timings"].items():
            for n, m in by_n.items():
                print(
                    f"{cls:9s} PIL {name:12s} {n:>2s} proc {m['images_per_s_per_core']:9.1f} img/s/core "
                    f"{m['ms_per_image_per_core']:8.3f} ms/img/core  spread {100 * m['spread']:4.1f}%  "
                    f"wall {m['wall_images_per_s']:8.1f} img/s"
                )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
