"""Writes the dense demo WebDataset shards: segmentation or depth scenes as PNGs.

Usage: python tools/make_dense_demo_shards.py OUT_DIR --task seg|depth
           [--split test|validation] [--shards 2] [--count 100]

`--count` is scenes per shard. The committed data/demo-seg/ and data/demo-depth/ are the
test split (default); the validation split (tuning material) goes under
out/dense-validation/{seg,depth}/, which is not committed. Scenes come from
tools/dense_scenes.py: segmentation scenes compose digits of the split's MNIST rows
only; depth scenes are procedural and separated by the split's seed.

Each sample is `<key>.png` (64x64, 8-bit grayscale) plus, for seg, `<key>.seg.png`
(8-bit grayscale PNG of class indices: 0 background, 1 + d for digit d, 255 = ignore)
or, for depth, `<key>.depth.png` (16-bit grayscale PNG, mode "I;16": depth in
millimetres, 0 = invalid). Keys are `seg-<n>` / `depth-<n>` with the scene index n.
Shards are deterministic (USTAR, mtime 0): the same arguments yield the same bytes.
"""
import argparse
import io
import os
import tarfile

import numpy as np
from PIL import Image

import dense_scenes
from demo_data import load_mnist, split_indices
from make_demo_shards import add_member


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def depth_png(depth_m):
    """float metres -> 16-bit PNG bytes (millimetres, 0 = invalid); checks the round trip."""
    mm = np.clip(np.rint(np.asarray(depth_m, np.float64) * 1000.0), 0, 65535).astype(np.uint16)
    h, w = mm.shape
    payload = png_bytes(Image.frombytes("I;16", (w, h), mm.astype("<u2").tobytes()))
    back = Image.open(io.BytesIO(payload))
    assert back.mode == "I;16", back.mode
    assert np.array_equal(np.asarray(back, dtype=np.uint16), mm), "16-bit PNG did not round-trip"
    return payload


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--task", choices=["seg", "depth"], required=True)
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--count", type=int, default=100, help="scenes per shard")
    args = parser.parse_args()

    if args.task == "seg":
        images, labels = load_mnist()
        _, validation, test = split_indices(len(images))
        rows = test if args.split == "test" else validation
    os.makedirs(args.out_dir, exist_ok=True)
    for shard in range(args.shards):
        path = os.path.join(args.out_dir, f"shard-{shard:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for n in range(shard * args.count, (shard + 1) * args.count):
                rng = dense_scenes.scene_rng(args.split, n, args.task)
                key = f"{args.task}-{n:05d}"
                if args.task == "seg":
                    img, lab = dense_scenes.seg_scene(rng, images, labels, rows)
                    add_member(tar, f"{key}.png", png_bytes(Image.fromarray(img)))
                    add_member(tar, f"{key}.seg.png", png_bytes(Image.fromarray(lab)))
                else:
                    img, depth = dense_scenes.depth_scene(rng)
                    add_member(tar, f"{key}.png", png_bytes(Image.fromarray(img)))
                    add_member(tar, f"{key}.depth.png", depth_png(depth))
        print(f"wrote {path} ({args.count} samples)")


if __name__ == "__main__":
    main()
