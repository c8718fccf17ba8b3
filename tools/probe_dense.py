"""Probes a dense demo bundle with PyTorch alone (independent of dtta's Rust code).

Usage: python tools/probe_dense.py BUNDLE_DIR --task seg|depth --shards DIR
           [--pairs 4] [--no-cond]

1. Source metrics of classifier.pt on the shards, outputs upsampled bilinearly
   (align_corners=False) to 64x64: seg: pixel accuracy and dataset-level mIoU
   (intersections and unions summed per class over the dataset, classes present in
   label or prediction, 255 ignored); depth: AbsRel, RMSE and delta1 (max(d/d*, d*/d)
   < 1.25) over valid pixels (depth > 0). Also under a few corruptions with ImageNet-C's
   per-severity constants (the table dtta applies at 64x64): gaussian noise (std on
   [0, 1]) at severities 3 and 5 plus the brief's 0.3, and contrast (factor on the
   deviation from the image mean) at severity 3, each on a fixed seed.
2. Conditioning probe (skip with --no-cond): the denoiser's mean eps-MSE over the same
   (t, eps) pairs, t in [50, 500), under the true condition, the condition from the
   classifier's own prediction (what Diffusion-TTA feeds it) and wrong conditions
   (seg: another scene's label map; depth: another scene's depth map and the map flipped
   upside down). Diffusion-TTA only has a signal where the true condition gives a
   clearly lower loss. Run it on validation shards: tuning must never look at test.
"""
import argparse
import glob
import io
import os
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import dense_scenes
from train_demo_dense import (
    depth_condition, diffusion_view, normalise, schedule, seg_labels32, upsample,
)

CORRUPTIONS = [
    ("clean", None, None),
    ("gaussian_noise/3 (0.18)", "noise", 0.18),
    ("gaussian_noise 0.3", "noise", 0.30),
    ("gaussian_noise/5 (0.38)", "noise", 0.38),
    ("contrast/3 (0.2)", "contrast", 0.2),
]


def read_shards(directory, task):
    """(keys, images uint8 [N,64,64], targets: labels uint8 or depth float metres)."""
    samples = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    keys = sorted(samples)
    imgs, tgts = [], []
    for key in keys:
        imgs.append(np.asarray(Image.open(io.BytesIO(samples[key]["png"])).convert("L")))
        if task == "seg":
            tgts.append(np.asarray(Image.open(io.BytesIO(samples[key]["seg.png"]))))
        else:
            im = Image.open(io.BytesIO(samples[key]["depth.png"]))
            assert im.mode == "I;16", im.mode
            tgts.append(np.asarray(im, dtype=np.uint16).astype(np.float32) / 1000.0)
    return keys, np.stack(imgs), np.stack(tgts)


def corrupt(imgs, kind, level, seed=0):
    x = imgs.astype(np.float32) / 255.0
    if kind == "noise":
        x = x + np.random.default_rng(seed).normal(0, level, x.shape).astype(np.float32)
    elif kind == "contrast":
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * level + mean
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8) if kind else imgs


@torch.no_grad()
def predict(model, imgs, batch=100):
    outs = [model(normalise(torch.from_numpy(imgs[i:i + batch]))) for i in range(0, len(imgs), batch)]
    return torch.cat(outs)  # half resolution


def seg_metrics(out32, labels, k):
    pred = upsample(out32).argmax(1).numpy()
    valid = labels != 255
    acc = (pred[valid] == labels[valid]).mean()
    inter = np.zeros(k)
    union = np.zeros(k)
    for c in range(k):
        p, g = (pred == c) & valid, (labels == c) & valid
        inter[c] += (p & g).sum()
        union[c] += (p | g).sum()
    present = union > 0
    return {"pixel_acc": acc, "mIoU": (inter[present] / union[present]).mean()}


def depth_metrics(out32, depth):
    pred = upsample(out32)[:, 0].numpy()
    valid = depth > 0
    d, g = pred[valid], depth[valid]
    ratio = np.maximum(d / g, g / d)
    return {"AbsRel": np.mean(np.abs(d - g) / g), "RMSE": np.sqrt(np.mean((d - g) ** 2)), "delta1": np.mean(ratio < 1.25)}


@torch.no_grad()
def cond_probe(denoiser, task, imgs, tgts, out32, table, pairs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = diffusion_view(torch.from_numpy(imgs))
    n = len(x0)
    other = torch.roll(torch.arange(n), 1)
    if task == "seg":
        onehot = F.one_hot(seg_labels32(torch.from_numpy(tgts)), table.shape[0]).permute(0, 3, 1, 2).float()
        embed = lambda p: torch.einsum("bkhw,kd->bdhw", p, table)  # noqa: E731
        conds = {
            "true labels": embed(onehot),
            "classifier probabilities": embed(torch.softmax(out32, 1)),
            "another scene's labels": embed(onehot[other]),
        }
    else:
        true = depth_condition(torch.from_numpy(tgts))
        conds = {
            "true depth": true,
            "classifier depth": depth_condition(out32),
            "another scene's depth": true[other],
            "depth flipped upside down": true.flip(-2),
        }
    abar = schedule()
    losses = {name: 0.0 for name in conds}
    for _ in range(pairs):
        t = torch.randint(50, 500, (n,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for name, cond in conds.items():
            out = torch.cat([denoiser(x_t[i:i + 100], t[i:i + 100], cond[i:i + 100]) for i in range(0, n, 100)])
            losses[name] += ((out - eps) ** 2).mean().item() / pairs
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--task", choices=["seg", "depth"], required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--pairs", type=int, default=4, help="(t, eps) pairs per scene")
    ap.add_argument("--no-cond", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    classifier = torch.jit.load(os.path.join(args.bundle, "classifier.pt")).eval()
    keys, imgs, tgts = read_shards(args.shards, args.task)
    print(f"{len(keys)} scenes from {args.shards}")
    for name, kind, level in CORRUPTIONS:
        out32 = predict(classifier, corrupt(imgs, kind, level))
        if args.task == "seg":
            m = seg_metrics(out32, tgts, dense_scenes.SEG_CLASSES)
        else:
            m = depth_metrics(out32, tgts)
        print(f"source {name:26s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if args.no_cond:
        return
    denoiser = torch.jit.load(os.path.join(args.bundle, "denoiser.pt")).eval()
    table = None
    if args.task == "seg":
        table = load_file(os.path.join(args.bundle, "class_embeddings.safetensors"))["embeddings"]
    out32 = predict(classifier, imgs)
    losses = cond_probe(denoiser, args.task, imgs, tgts, out32, table, args.pairs)
    for name, loss in losses.items():
        print(f"denoiser eps-MSE, t in [50, 500), {name:26s} {loss:.5f}")


if __name__ == "__main__":
    main()
