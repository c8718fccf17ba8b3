#!/usr/bin/env python3
"""Makes the JPEGs of the decode + preprocess benchmark from real photographs.

The photographs are the ones shipped inside the scikit-learn and scikit-image wheels
(nothing is downloaded): scikit-learn's sample images (china.jpg, flower.jpg) and the
colour photographs bundled in skimage/data. Two size classes, same photographs in both:

  imagenet/  long side 500, aspect kept (500x375 for a 4:3 photo), like ImageNet val
  camera/    upscaled with Lanczos to a long side of 2400..4000 px, both sides rounded to
             a multiple of 16 as a camera's are (4032x3024, 6000x4000, ...), like a
             phone or camera picture; a faint sensor-like grain (Gaussian, sigma 4 levels,
             fixed seed) is added so the files carry about as many bits per pixel as
             a real camera JPEG instead of the near-empty high frequencies of a pure
             upscale (Huffman decoding, which no scaled IDCT avoids, scales with that)

All are written as baseline JPEG, quality 90, 4:2:0 chroma subsampling, with PIL
(libjpeg-turbo). Writes into OUT (default target/bench/photos) and prints one line per
class. Idempotent: a rerun rewrites the same bytes.
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

# Long sides of the camera class, cycled over the photographs.
CAMERA_LONG_SIDES = [2400, 3000, 3600, 4000]


def sources():
    """(name, RGB PIL image) of every bundled colour photograph."""
    import sklearn
    import skimage

    found = []
    sk_dir = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    for f in ("china.jpg", "flower.jpg"):
        found.append((f"sklearn-{os.path.splitext(f)[0]}", os.path.join(sk_dir, f)))
    ski_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    for f in (
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "motorcycle_left.png",
        "motorcycle_right.png",
        "hubble_deep_field.jpg",
        "retina.jpg",
    ):
        path = os.path.join(ski_dir, f)
        if os.path.exists(path):  # all ship in the wheel; skip quietly if a release drops one
            found.append((f"skimage-{os.path.splitext(f)[0]}", path))
    out = []
    for name, path in found:
        with Image.open(path) as im:
            out.append((name, im.convert("RGB")))
    if not out:
        sys.exit("no bundled photographs found (pip install scikit-learn scikit-image)")
    return out


def scaled(im, long_side, resample, multiple=1):
    w, h = im.size
    s = long_side / max(w, h)
    size = [max(multiple, multiple * round(v * s / multiple)) for v in (w, h)]
    return im.resize(tuple(size), resample)


def grain(im, sigma, seed):
    rng = np.random.default_rng(seed)
    a = np.asarray(im, dtype=np.float32)
    a = a + rng.normal(0.0, sigma, a.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def save(im, path):
    im.save(path, "JPEG", quality=90, subsampling="4:2:0", optimize=False, progressive=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="target/bench/photos")
    ap.add_argument("--grain", type=float, default=4.0, help="camera-class grain sigma in 8-bit levels (0: none)")
    args = ap.parse_args()
    photos = sources()
    for cls in ("imagenet", "camera"):
        d = os.path.join(args.out, cls)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            if f.endswith(".jpg"):
                os.remove(os.path.join(d, f))
    stats = {"imagenet": [], "camera": []}
    for i, (name, im) in enumerate(photos):
        small = scaled(im, 500, Image.LANCZOS)
        p = os.path.join(args.out, "imagenet", name + ".jpg")
        save(small, p)
        stats["imagenet"].append((small.size, os.path.getsize(p)))
        big = scaled(im, CAMERA_LONG_SIDES[i % len(CAMERA_LONG_SIDES)], Image.LANCZOS, multiple=16)
        if args.grain > 0:
            big = grain(big, args.grain, seed=i)
        p = os.path.join(args.out, "camera", name + ".jpg")
        save(big, p)
        stats["camera"].append((big.size, os.path.getsize(p)))
    for cls, rows in stats.items():
        px = sum(w * h for (w, h), _ in rows)
        size = sum(b for _, b in rows)
        dims = ", ".join(f"{w}x{h}" for (w, h), _ in rows)
        print(f"{cls:8s} {len(rows)} JPEGs, {px / len(rows) / 1e6:.2f} MP avg, {8 * size / px:.2f} bits/pixel: {dims}")


if __name__ == "__main__":
    main()
