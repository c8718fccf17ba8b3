"""Trains the dense demo models (segmentation or depth) and exports their bundle.

Usage: python tools/train_demo_dense.py BUNDLE_DIR --task seg|depth
           [--part all|classifier|denoiser] [--iters N] [--seed 0] [--batch 32]

Scenes come from tools/dense_scenes.py, generated while training: a pool of train-split
scenes (segmentation: digits of the MNIST train rows only; depth: procedural scenes
from the training seed) of which a few are replaced by fresh ones every iteration.

The classifier (`classifier.pt`) is a small U-Net with BatchNorm (so TENT has norm
layers): [B,1,64,64] normalised with mean 0.5, std 0.5 -> [B,K,32,32] at half
resolution; the caller upsamples bilinearly (align_corners=False) to 64x64, and so does
the training loss. seg: K = 11 logits, cross-entropy. depth: K = 1, depth in metres
(softplus, positive), L1 on log depth. The depth renders are noise-free, so the depth
classifier trains with mild sensor noise (std up to --noise-aug grey levels).

The denoiser (`denoiser.pt`) is a small pixel-space epsilon-prediction U-Net at 32x32
with concat conditioning: forward(x_t [N,1,32,32], t [N] int64, cond [N,D,32,32]) ->
eps [N,1,32,32]. The diffusion view is the 64x64 image resized to 32x32 (bilinear,
antialias) in [-1, 1]; linear betas 1e-4..0.02 over 1000 steps; half of each batch is
drawn from t in [50, 500), where the condition matters most. seg: cond = sum_k p_k E_k
with a learnt table E [11, 8] (`class_embeddings.safetensors`, init std 1), trained on
the true label map (nearest, 32x32) and, for half the batches, on softened one-hots so
that probability mixtures are in distribution. depth: cond = the depth map at 32x32
(bilinear), 2 * (d - DEPTH_MIN) / (DEPTH_MAX - DEPTH_MIN) - 1.

`--part classifier` / `--part denoiser` train one model and rewrite bundle.toml keeping
the other part's header line, so each run fits in a short wall-time budget.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import dense_scenes
from demo_data import load_mnist, split_indices

IMG, RES = 64, 32
T_STEPS, BETA_START, BETA_END = 1000, 1e-4, 0.02
DEPTH_MIN, DEPTH_MAX = 0.5, 12.0
EMBED_DIM = 8


# ------------------------------------------------------------------------ classifier


def cbr(cin, cout, stride=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DenseUNet(nn.Module):
    """64x64 -> 32x32 outputs; encoder down to 8x8, additive skips at 16 and 32."""

    def __init__(self, out_channels: int, depth_head: bool = False, widths=(16, 24, 32, 40)):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.depth_head = depth_head
        self.stem = cbr(1, w0)                                   # 64
        self.enc1 = nn.Sequential(cbr(w0, w1, 2), cbr(w1, w1))   # 32
        self.enc2 = nn.Sequential(cbr(w1, w2, 2), cbr(w2, w2))   # 16
        self.enc3 = nn.Sequential(cbr(w2, w3, 2), cbr(w3, w3, dilation=2))  # 8
        self.lat2 = nn.Conv2d(w3, w2, 1)
        self.dec2 = cbr(w2, w2)                                  # 16
        self.lat1 = nn.Conv2d(w2, w1, 1)
        self.dec1 = cbr(w1, w1)                                  # 32
        self.head = nn.Conv2d(w1, out_channels, 1)
        if depth_head:
            nn.init.zeros_(self.head.weight)
            # softplus(b) = 4 m: start at a typical scene depth.
            nn.init.constant_(self.head.bias, math.log(math.expm1(4.0)))

    def forward(self, x):
        e1 = self.enc1(self.stem(x))
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(F.interpolate(self.lat2(e3), scale_factor=2.0, mode="bilinear", align_corners=False) + e2)
        d1 = self.dec1(F.interpolate(self.lat1(d2), scale_factor=2.0, mode="bilinear", align_corners=False) + e1)
        out = self.head(d1)
        if self.depth_head:
            out = F.softplus(out) + 1e-3
        return out


# -------------------------------------------------------------------------- denoiser


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TBlock(nn.Module):
    """Residual block: GroupNorm -> SiLU -> conv, + timestep bias, GroupNorm -> SiLU -> conv."""

    def __init__(self, ch, tdim):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.temb = nn.Linear(tdim, ch)
        self.norm2 = nn.GroupNorm(8, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(temb)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class CondDenoiser(nn.Module):
    """Epsilon prediction at 32x32; cond [N,D,32,32] is concatenated to x_t."""

    def __init__(self, cond_channels: int, widths=(24, 32), tdim: int = 32):
        super().__init__()
        w0, w1 = widths
        self.tdim = tdim
        self.t_mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(1 + cond_channels, w0, 3, padding=1)
        self.b32 = TBlock(w0, tdim)
        self.down = nn.Conv2d(w0, w1, 3, stride=2, padding=1)
        self.b16a = TBlock(w1, tdim)
        self.b16b = TBlock(w1, tdim)
        self.up = nn.Conv2d(w1, w0, 3, padding=1)
        self.u32 = TBlock(w0, tdim)
        self.out_norm = nn.GroupNorm(8, w0)
        self.out = nn.Conv2d(w0, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = self.t_mlp(timestep_embedding(t, self.tdim))
        h32 = self.b32(self.inp(torch.cat([x_t, cond], 1)), temb)
        h16 = self.b16b(self.b16a(self.down(h32), temb), temb)
        u = self.u32(self.up(F.interpolate(h16, scale_factor=2.0, mode="nearest")) + h32, temb)
        return self.out(F.silu(self.out_norm(u)))


# ---------------------------------------------------------------------- shared bits


def normalise(img_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,64,64] -> the classifier's input [B,1,64,64] (mean 0.5, std 0.5)."""
    return (img_u8.float().unsqueeze(1) / 255.0 - 0.5) / 0.5


def diffusion_view(img_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,64,64] -> float [B,1,32,32] in [-1, 1]: bilinear, antialias."""
    x = img_u8.float().unsqueeze(1) / 255.0
    x = F.interpolate(x, size=(RES, RES), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


def upsample(out: torch.Tensor) -> torch.Tensor:
    return F.interpolate(out, size=(IMG, IMG), mode="bilinear", align_corners=False)


def depth_condition(depth64: torch.Tensor) -> torch.Tensor:
    """float metres [B,64,64] (or [B,1,32,32] already at 32) -> [B,1,32,32] in [-1, 1]."""
    d = depth64 if depth64.dim() == 4 else depth64.unsqueeze(1)
    if d.shape[-1] != RES:
        d = F.interpolate(d, size=(RES, RES), mode="bilinear", align_corners=False, antialias=True)
    return 2.0 * (d - DEPTH_MIN) / (DEPTH_MAX - DEPTH_MIN) - 1.0


def seg_labels32(lab64: torch.Tensor) -> torch.Tensor:
    """int [B,64,64] -> int64 [B,32,32], nearest."""
    return F.interpolate(lab64.unsqueeze(1).float(), size=(RES, RES), mode="nearest").squeeze(1).long()


def schedule():
    betas = torch.linspace(BETA_START, BETA_END, T_STEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class ScenePool:
    """Train-split scenes: a pool, `refresh` of them replaced by fresh ones per draw."""

    def __init__(self, task, rng, size, refresh):
        self.task, self.rng, self.refresh = task, rng, refresh
        if task == "seg":
            images, labels = load_mnist()
            train, _, _ = split_indices(len(images))
            self.mnist = (images, labels, train)
        started = time.time()
        self.img, self.tgt = self._make(size)
        print(f"pool of {size} {task} scenes in {time.time() - started:.0f} s", flush=True)

    def _make(self, n):
        if self.task == "seg":
            return dense_scenes.seg_batch(self.rng, *self.mnist, n)
        return dense_scenes.depth_batch(self.rng, n)

    def draw(self, n):
        if self.refresh:
            img, tgt = self._make(self.refresh)
            slots = self.rng.integers(0, len(self.img), self.refresh)
            self.img[slots], self.tgt[slots] = img, tgt
        idx = self.rng.integers(0, len(self.img), n)
        img, tgt = torch.from_numpy(self.img[idx]), torch.from_numpy(self.tgt[idx])
        flip = torch.from_numpy(self.rng.random(n) < 0.5)
        if self.task == "depth":  # a mirrored render is a valid render
            img = torch.where(flip[:, None, None], img.flip(-1), img)
            tgt = torch.where(flip[:, None, None], tgt.flip(-1), tgt)
        return img, tgt


def param_count(m):
    return sum(p.numel() for p in m.parameters())


# -------------------------------------------------------------------------- training


def train_classifier(args, pool):
    seg = args.task == "seg"
    model = DenseUNet(dense_scenes.SEG_CLASSES if seg else 1, depth_head=not seg)
    print(f"classifier: {param_count(model)} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.iters, pct_start=0.1)
    started, running = time.time(), None
    for it in range(args.iters):
        img, tgt = pool.draw(args.batch)
        x = normalise(img)
        if args.noise_aug > 0:
            # Sensor noise, std drawn per image from [0, noise_aug] grey levels (x is 2x [0, 1]).
            sigma = torch.rand(x.shape[0], 1, 1, 1) * (2.0 * args.noise_aug / 255.0)
            x = x + sigma * torch.randn_like(x)
        out = upsample(model(x))
        if seg:
            loss = F.cross_entropy(out, tgt.long(), ignore_index=255)
        else:
            valid = tgt > 0
            loss = (out.squeeze(1).log() - tgt.clamp_min(1e-3).log()).abs()[valid].mean()
        running = optimise(opt, sched, loss, running, it, args.iters, started)
    model.eval()
    torch.jit.script(model).save(os.path.join(args.bundle_dir, "classifier.pt"))
    norm = [
        f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")
    ]
    return norm, param_count(model), time.time() - started


def optimise(opt, sched, loss, running, it, iters, started):
    """One optimizer and schedule step on `loss`; returns the smoothed loss, printed
    every 100 iterations and at the last."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
    if it % 100 == 0 or it == iters - 1:
        print(f"iter {it}: loss {running:.4f} ({time.time() - started:.0f} s)", flush=True)
    return running


def soften(onehot: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One-hots [B,K,h,w] -> plausible classifier probabilities: noisy tempered softmax, blurred."""
    b = onehot.shape[0]
    sharp = torch.from_numpy(rng.uniform(1.0, 8.0, (b, 1, 1, 1))).float()
    noise = torch.from_numpy(rng.uniform(0.0, 2.0, (b, 1, 1, 1))).float()
    p = torch.softmax(onehot * sharp + noise * torch.randn_like(onehot), dim=1)
    blur = torch.from_numpy(rng.random((b, 1, 1, 1)) < 0.5)
    p_blur = F.avg_pool2d(p, 3, stride=1, padding=1, count_include_pad=False)
    return torch.where(blur, p_blur, p)


def train_denoiser(args, pool):
    seg = args.task == "seg"
    model = CondDenoiser(EMBED_DIM if seg else 1)
    table = nn.Parameter(torch.randn(dense_scenes.SEG_CLASSES, EMBED_DIM)) if seg else None
    params = list(model.parameters()) + ([table] if seg else [])
    print(f"denoiser: {param_count(model)} parameters", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.iters, pct_start=0.05)
    abar = schedule()
    n_mid = args.batch // 2
    started, running = time.time(), None
    for it in range(args.iters):
        img, tgt = pool.draw(args.batch)
        x0 = diffusion_view(img)
        if seg:
            onehot = F.one_hot(seg_labels32(tgt), dense_scenes.SEG_CLASSES).permute(0, 3, 1, 2).float()
            p = soften(onehot, pool.rng) if pool.rng.random() < args.soft_frac else onehot
            cond = torch.einsum("bkhw,kd->bdhw", p, table)
        else:
            cond = depth_condition(tgt)
        t = torch.cat([torch.randint(50, 500, (n_mid,)), torch.randint(0, T_STEPS, (args.batch - n_mid,))])
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(model(x_t, t, cond), eps)
        running = optimise(opt, sched, loss, running, it, args.iters, started)
    model.eval()
    torch.jit.script(model).save(os.path.join(args.bundle_dir, "denoiser.pt"))
    if seg:
        save_file({"embeddings": table.detach().contiguous()},
                  os.path.join(args.bundle_dir, "class_embeddings.safetensors"))
    return param_count(model), time.time() - started


# ---------------------------------------------------------------------------- bundle


def write_bundle(args, header_line, norm):
    seg = args.task == "seg"
    path = os.path.join(args.bundle_dir, "bundle.toml")
    old = open(path).read() if os.path.exists(path) else ""
    headers = {}
    for line in old.splitlines():
        m = re.match(r"# (classifier|denoiser): (.*)", line)
        if m:
            headers[m.group(1)] = m.group(2)
    if norm is None:
        m = re.search(r"^norm = (.*)$", old, re.M)
        norm = json.loads(m.group(1)) if m else []
    headers.update(header_line)
    lines = [
        f"# Demo bundle ({'segmentation' if seg else 'depth'}): trained by tools/train_demo_dense.py on",
        "# train-split scenes of tools/dense_scenes.py only (never the test split).",
    ]
    for part in ("classifier", "denoiser"):
        lines.append(f"# {part}: {headers.get(part, 'not trained yet')}")
    lines += [f'name = "demo-{args.task}"', f'task = "{"segmentation" if seg else "depth"}"']
    if seg:
        lines.append(f"class_names = {json.dumps(dense_scenes.SEG_CLASS_NAMES)}")
    lines += [
        "",
        "[classifier]",
        'file = "classifier.pt"',
        "# [B,1,64,64] -> [B,K,32,32] at half resolution: upsample bilinearly to 64x64.",
        f"num_classes = {dense_scenes.SEG_CLASSES if seg else 1}",
        "# The final conv; Diffusion-TTA never adapts it.",
        'head = ["head.weight", "head.bias"]',
        "# Affine parameters of the BatchNorm layers (TENT, adapt = \"norm\").",
        f"norm = {json.dumps(norm)}",
        "",
        "[classifier.preprocess]",
        "channels = 1",
        "resize = 64",
        "crop = 64",
        "mean = [0.5]",
        "std = [0.5]",
        "",
        "[diffusion]",
        'denoiser = "denoiser.pt"',
        "# forward(x_t [N,1,32,32], t [N] int64, cond [N,D,32,32]) -> eps; cond is concatenated to x_t.",
        'condition = "concat"',
    ]
    if seg:
        lines.append("# cond = sum_k p_k E_k over the classifier's 32x32 probabilities; E is [11, 8].")
        lines.append('class_embeddings = "class_embeddings.safetensors"')
    else:
        lines.append("# cond = 2 * (d - depth_min) / (depth_max - depth_min) - 1, d the 32x32 depth in metres.")
        lines.append(f"depth_min = {DEPTH_MIN}")
        lines.append(f"depth_max = {DEPTH_MAX}")
    lines += [
        "# Pixel space: the 64x64 view resized to 32x32 (bilinear, antialias) in [-1, 1].",
        "channels = 1",
        "resolution = 32",
        "",
        "[diffusion.schedule]",
        'kind = "linear"',
        "beta_start = 0.0001",
        "beta_end = 0.02",
        "steps = 1000",
    ]
    open(path, "w").write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle_dir")
    parser.add_argument("--task", choices=["seg", "depth"], required=True)
    parser.add_argument("--part", choices=["all", "classifier", "denoiser"], default="all")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="default 5e-3 classifier, 2e-3 denoiser")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=None, help="scenes in the pool (default seg 4000, depth 3000)")
    parser.add_argument("--refresh", type=int, default=None, help="fresh scenes per iteration (seg 8, depth 2)")
    parser.add_argument("--soft-frac", type=float, default=0.5, help="seg: batches with softened one-hots")
    parser.add_argument("--noise-aug", type=float, default=None,
                        help="classifier: max sensor-noise std in grey levels (default seg 0, depth 4)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([dense_scenes.SPLIT_CODES["train"], 1000 + args.seed])
    os.makedirs(args.bundle_dir, exist_ok=True)
    seg = args.task == "seg"
    if args.noise_aug is None:
        # The depth renders are noise-free; without this the depth net keyed on exact
        # shading and collapsed (AbsRel 0.06 -> 0.9 on validation) under noise of std 0.02.
        args.noise_aug = 0.0 if seg else 4.0
    pool = ScenePool(
        args.task, rng,
        args.pool or (4000 if seg else 3000),
        args.refresh if args.refresh is not None else (8 if seg else 2),
    )
    settings = f"--task {args.task} --iters {args.iters} --batch {args.batch} --seed {args.seed}"
    norm, headers = None, {}
    base_lr = args.lr
    if args.part in ("all", "classifier"):
        args.lr = base_lr or 5e-3
        norm, n, secs = train_classifier(args, pool)
        headers["classifier"] = (
            f"--part classifier {settings} --lr {args.lr} --noise-aug {args.noise_aug}: "
            f"{n} parameters, {secs / 60:.1f} min"
        )
    if args.part in ("all", "denoiser"):
        args.lr = base_lr or 2e-3
        n, secs = train_denoiser(args, pool)
        headers["denoiser"] = f"--part denoiser {settings} --lr {args.lr}: {n} parameters, {secs / 60:.1f} min"
    write_bundle(args, headers, norm)
    print(f"exported {args.bundle_dir}")


if __name__ == "__main__":
    sys.exit(main())
