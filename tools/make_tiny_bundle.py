"""Writes a tiny random-weight bundle for tests: every shape path of the bundle contract.

Usage: python tools/make_tiny_bundle.py OUT_DIR [--seed 0] [--text-embeddings]
       [--task classification|segmentation|depth] [--nan-grad-sentinel]

- classifier.pt: RGB 8x8 -> 4 classes (conv, BatchNorm, linear head `fc`).
- encoder.pt: image in [-1,1] [N,3,8,8] -> latent [N,2,4,4]; latent_scale 0.5.
- denoiser.pt: forward(x_t [N,2,4,4], t [N], cond [N,D] or [N,T,D]) -> [N,4,4,4]
  (learned variance: 2C channels, the first C are the noise prediction).
- class_embeddings.safetensors: `embeddings` [4,6], or [4,3,6] with --text-embeddings.
- --nan-grad-sentinel: an image whose first input value is at least 50 (a sentinel)
  gives the head `fc` a NaN gradient while every output stays finite (a fault for the
  methods' gradient guards); other images are untouched.

Dense tasks (`--task`, concat conditioning; the encoder and latent are as above):
- segmentation: classifier.pt maps RGB 8x8 -> logits [N,4,6,6] (a 3x3 conv without
  padding, so the map is resampled to the 4x4 latent: bilinear, not an identity);
  denoiser.pt concatenates cond [N,6,4,4] (sum_k p_k E_k) to x_t.
- depth: classifier.pt maps RGB 8x8 -> depth [N,1,6,6] in (0.5, 4.5) m; denoiser.pt
  concatenates cond [N,1,4,4]; depth_min 0.5, depth_max 4.5; no class embeddings.
Weights are random (seeded); the point is shapes and arithmetic, not accuracy.
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from torch import nn

K, D, T_TOKENS = 4, 6, 3


class TinyClassifier(nn.Module):
    def __init__(self, nan_grad_sentinel: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, K)
        self.sentinel = nan_grad_sentinel

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        out = self.fc(h.mean(dim=(2, 3)))
        if self.sentinel:
            # 0 * sqrt(0 * w + gate) adds 0 everywhere; its gradient on w is
            # 0 * (0 / 0) = NaN where gate = 0 (the sentinel) and 0 elsewhere.
            gate = 1.0 - (x[:, 0, 0, 0] >= 50.0).float()
            out = out + 0.0 * torch.sqrt(self.fc.weight.sum() * 0.0 + gate).unsqueeze(1)
        return out


class TinyDenseModel(nn.Module):
    """Segmenter (`out` = K logits) or depth network (`out` = 1, squashed into 0.5..4.5 m)."""

    def __init__(self, out: int):
        super().__init__()
        self.depth = out == 1
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Conv2d(5, out, 1)

    def forward(self, x):
        y = self.head(torch.relu(self.bn(self.conv(x))))
        return 0.5 + 4.0 * torch.sigmoid(y) if self.depth else y


class TinyConcatDenoiser(nn.Module):
    """forward(x_t [N,2,4,4], t [N], cond [N,Dc,4,4]) -> [N,2,4,4]: cond is concatenated."""

    def __init__(self, cond_channels: int):
        super().__init__()
        self.inp = nn.Conv2d(2 + cond_channels, 8, 3, padding=1)
        self.t_proj = nn.Linear(1, 8)
        self.out = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x_t, cond], dim=1))
        h = torch.tanh(h + self.t_proj(t.float().unsqueeze(1) / 1000.0)[:, :, None, None])
        return self.out(h)


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


class TinyDenoiser(nn.Module):
    def __init__(self, text: bool):
        super().__init__()
        self.text = text
        self.inp = nn.Conv2d(2, 8, 3, padding=1)
        self.t_proj = nn.Linear(1, 8)
        self.c_proj = nn.Linear(D, 16)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.text:
            cond = cond.mean(dim=1)
        scale, shift = self.c_proj(cond).chunk(2, dim=1)
        h = self.inp(x_t) + self.t_proj(t.float().unsqueeze(1) / 1000.0)[:, :, None, None]
        h = torch.tanh(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        return self.out(h)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-embeddings", action="store_true")
    parser.add_argument("--task", choices=["classification", "segmentation", "depth"], default="classification")
    parser.add_argument("--nan-grad-sentinel", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.task != "classification":
        return write_dense(args)

    classifier = TinyClassifier(args.nan_grad_sentinel)
    # Non-trivial running statistics, so a buffer mix-up would show.
    classifier.bn.running_mean.uniform_(-0.2, 0.2)
    classifier.bn.running_var.uniform_(0.5, 1.5)
    classifier.eval()
    torch.jit.script(classifier).save(os.path.join(args.out_dir, "classifier.pt"))
    torch.jit.script(TinyEncoder().eval()).save(os.path.join(args.out_dir, "encoder.pt"))
    torch.jit.script(TinyDenoiser(args.text_embeddings).eval()).save(os.path.join(args.out_dir, "denoiser.pt"))
    shape = (K, T_TOKENS, D) if args.text_embeddings else (K, D)
    save_file({"embeddings": torch.randn(*shape)}, os.path.join(args.out_dir, "class_embeddings.safetensors"))
    write_toml(args.out_dir, "tiny", None, K, "fc", 'class_embeddings = "class_embeddings.safetensors"')


def write_dense(args):
    depth = args.task == "depth"
    model = TinyDenseModel(1 if depth else K)
    model.bn.running_mean.uniform_(-0.2, 0.2)
    model.bn.running_var.uniform_(0.5, 1.5)
    torch.jit.script(model.eval()).save(os.path.join(args.out_dir, "classifier.pt"))
    torch.jit.script(TinyEncoder().eval()).save(os.path.join(args.out_dir, "encoder.pt"))
    denoiser = TinyConcatDenoiser(1 if depth else D)
    torch.jit.script(denoiser.eval()).save(os.path.join(args.out_dir, "denoiser.pt"))
    if depth:
        condition = "depth_min = 0.5\ndepth_max = 4.5"
    else:
        save_file({"embeddings": torch.randn(K, D)}, os.path.join(args.out_dir, "class_embeddings.safetensors"))
        condition = 'class_embeddings = "class_embeddings.safetensors"'
    write_toml(args.out_dir, f"tiny-{args.task}", args.task, 1 if depth else K, "head", 'condition = "concat"\n' + condition)


def write_toml(out_dir, name, task, num_classes, head, diffusion_keys):
    """bundle.toml: the shared 8x8 preprocessing, encoder and schedule; `head` names the
    final layer, `diffusion_keys` are the condition's lines."""
    task_line = f'task = "{task}"\n' if task else ""
    with open(os.path.join(out_dir, "bundle.toml"), "w") as f:
        f.write(f"""# Tiny random-weight bundle for tests (tools/make_tiny_bundle.py).
name = "{name}"
{task_line}
[classifier]
file = "classifier.pt"
num_classes = {num_classes}
head = ["{head}.weight", "{head}.bias"]
norm = ["bn.weight", "bn.bias"]

[classifier.preprocess]
channels = 3
resize = 8
crop = 8
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[diffusion]
denoiser = "denoiser.pt"
{diffusion_keys}
encoder = "encoder.pt"
latent_scale = 0.5
channels = 3
resolution = 8

[diffusion.schedule]
kind = "linear"
beta_start = 0.0001
beta_end = 0.02
steps = 1000
""")


if __name__ == "__main__":
    main()
