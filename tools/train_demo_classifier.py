"""Trains the demo classifier on the MNIST train split and exports the bundle.

Usage: python tools/train_demo_classifier.py BUNDLE_DIR [--epochs 10] [--seed 0]

A small CNN with BatchNorm (so TENT applies) over 1x28x28 inputs normalised with
mean 0.5, std 0.5. It writes BUNDLE_DIR/classifier.pt (TorchScript, eval mode) and
BUNDLE_DIR/bundle.toml. Trains on the train split only (demo_data.split_indices).
"""
import argparse
import json
import os

import numpy as np
import torch
from torch import nn

from demo_data import load_mnist, split_indices


class DemoCNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(1, 16), nn.MaxPool2d(2),
            block(16, 32), nn.MaxPool2d(2),
            block(32, 64), nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


BUNDLE_TOML = """\
# Demo bundle: trained by tools/train_demo_classifier.py on the MNIST train split.
name = "demo-mnist"
class_names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

[classifier]
file = "classifier.pt"
num_classes = 10
# Parameters of the final layer; Diffusion-TTA never adapts them.
head = ["fc.weight", "fc.bias"]
# Affine parameters of the BatchNorm layers (TENT, adapt = "norm").
norm = {norm}

[classifier.preprocess]
channels = 1
resize = 28
crop = 28
mean = [0.5]
std = [0.5]
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle_dir")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    images, labels = load_mnist()
    train, _, _ = split_indices(len(images))
    x = (torch.from_numpy(images[train]).float().unsqueeze(1) / 255.0 - 0.5) / 0.5
    y = torch.from_numpy(labels[train])

    model = DemoCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    steps = args.epochs * ((len(train) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(train)))
        total, correct = 0.0, 0
        for i in range(0, len(train), 64):
            idx = perm[i:i + 64]
            xb = x[idx]
            # Small random shifts: cheap augmentation that keeps digits legible.
            dx, dy = rng.integers(-2, 3, size=2)
            xb = torch.roll(xb, shifts=(int(dy), int(dx)), dims=(2, 3))
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
        print(f"epoch {epoch}: loss {total / len(train):.4f} train acc {correct / len(train):.4f}")

    model.eval()
    os.makedirs(args.bundle_dir, exist_ok=True)
    scripted = torch.jit.script(model)
    scripted.save(os.path.join(args.bundle_dir, "classifier.pt"))
    norm = [
        f"{module}.{param}"
        for module, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for param in ("weight", "bias")
    ]
    with open(os.path.join(args.bundle_dir, "bundle.toml"), "w") as f:
        f.write(BUNDLE_TOML.replace("{norm}", json.dumps(norm)))
    print(f"exported {args.bundle_dir}")


if __name__ == "__main__":
    main()
