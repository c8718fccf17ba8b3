"""How much the demo diffusion model's label matters, on the validation split.

Usage: python tools/probe_conditioning.py BUNDLE_DIR [--images 100] [--pairs 6]

For each validation image and each band of 100 timesteps, the mean diffusion loss under
every class's label embedding over the same (t, eps) pairs; the Diffusion Classifier
picks the lowest. Prints its top-1 per band and over all bands. Diffusion-TTA's gradient
into the classifier only exists where the label changes the loss, so a model whose
top-1 here is near chance cannot help it. Never reads the test split.
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from demo_data import load_mnist, split_indices
from train_demo_diffusion import BETA_END, BETA_START, T_STEPS, diffusion_view


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=6, help="(t, eps) pairs per band and image")
    args = ap.parse_args()
    torch.manual_seed(0)
    denoiser = torch.jit.load(os.path.join(args.bundle, "denoiser.pt")).eval()
    table = load_file(os.path.join(args.bundle, "class_embeddings.safetensors"))["embeddings"]
    classes = table.shape[0]
    images, labels = load_mnist()
    _, validation, _ = split_indices(len(images))
    rows = validation[np.random.default_rng(0).permutation(len(validation))[: args.images]]
    x0, y = diffusion_view(images[rows]), torch.from_numpy(labels[rows])
    abar = torch.cumprod(1 - torch.linspace(BETA_START, BETA_END, T_STEPS, dtype=torch.float64), 0).float()
    bands, n = T_STEPS // 100, args.pairs
    losses = torch.zeros(len(rows), bands, classes)
    with torch.no_grad():
        for i in range(len(rows)):
            for b in range(bands):
                t = torch.randint(b * 100, (b + 1) * 100, (n,))
                eps = torch.randn(n, *x0.shape[1:])
                a = abar[t].view(-1, 1, 1, 1)
                x_t = (a.sqrt() * x0[i : i + 1] + (1 - a).sqrt() * eps).repeat(classes, 1, 1, 1)
                out = denoiser(x_t, t.repeat(classes), table.repeat_interleave(n, 0))[:, : x0.shape[1]]
                per_pair = ((out - eps.repeat(classes, 1, 1, 1)) ** 2).mean(dim=(1, 2, 3))
                losses[i, b] = per_pair.view(classes, n).mean(1)
    print(f"label embedding norm (mean): {table.norm(dim=1).mean():.3f}")
    for b in range(bands):
        acc = (losses[:, b].argmin(1) == y).float().mean().item()
        print(f"t {b * 100:4d}..{b * 100 + 99:4d}: Diffusion Classifier top-1 {acc:.2f}")
    acc = (losses.mean(1).argmin(1) == y).float().mean().item()
    print(f"all t: Diffusion Classifier top-1 {acc:.2f} on {len(rows)} validation images")


if __name__ == "__main__":
    main()
