"""The Python reference of the per-image Diffusion-TTA loop, for parity tests.

Usage: python tools/reference_tta.py BUNDLE_DIR OUT.safetensors [--steps 3] [--accum 2]
       [--samples 4] [--lr 0.05] [--momentum 0.9] [--weight-decay 0.0]
       [--optimizer sgd|adamw] [--adapt classifier+diffusion|classifier|norm]
       [--loss mse|l1] [--adapt-topk 0] [--seed 0]

A dense bundle (task segmentation or depth, diffusion.condition = "concat") is conditioned
on a per-pixel map instead (`dense_condition`). Follows the published code's semantics (ALGORITHM.md): the classifier re-runs every
iteration in eval mode, the loss is the mean MSE divided by accum, the optimizer
(torch.optim) steps every accum iterations. It draws the image, the timesteps and the
noise itself and saves them with the per-iteration losses and the final adapted
parameters, so another implementation can replay the same draws and compare.

DUSA (ALGORITHM.md, "DUSA"), parity mode only:

       python tools/reference_tta.py BUNDLE_DIR OUT.safetensors --method dusa
       [--mode episodic|online] [--steps 2] [--accum 1] [--lr 1e-3] [--timestep 100]
       [--dusa-topk 2] [--random 1] [--max-dense-candidates 20] [--no-adapt-head]
       [--batch 2] [--batches 2] [--adapt ...] [--seed 0]

As the authors' recipe, DUSA adapts the whole classifier, head included, unless
--no-adapt-head. episodic: one image, steps*accum iterations, Adam step every accum
iterations; online: `batches` batches of `batch` images, one iteration per batch, a step
every accum batches. Per image and iteration one eps (shared by the image's candidates)
and one uniform [K] draw u. A classifier's candidates are the top `dusa-topk` logits plus
`random` classes drawn without replacement with softmax(logits) over the rest, as the top
of logits + Gumbel(u) (Gumbel-top-k); p = softmax of the l2-normalised logits at the
candidates. A segmenter's candidates are the union of every pixel's top `dusa-topk`
classes, every pixel's top-1 always kept, at most `max-dense-candidates` (the others by
how many pixels rank them), ascending (`dusa_dense_candidates`); p(u) is the plain
per-pixel softmax over them. The loss is mean((eps - sum_k p_k denoiser(x_t, t, E_k))^2),
averaged over the batch's images and divided by accum. Saves eps, u (in draw order), the
candidates (concatenated, with their counts), the losses and the final adapted parameters.

EATA and SAR (ALGORITHM.md's baselines; the authors' eata.py, sar.py and sam.py),
parity mode only:

       python tools/reference_tta.py BUNDLE_DIR OUT.safetensors --method eata|sar
       [--batch 8] [--batches 4] [--lr 2.5e-4] [--momentum 0.9] [--e-margin 0.4]
       [--d-margin 0.05] [--fisher-alpha 2000] [--fisher-samples 16] [--fisher-batch 8]
       [--rho 0.05] [--reset-below 0.2] [--frozen layer4,norm] [--seed 0]

online over `batches` batches of `batch` random images, each image scaled by its own
factor (so entropies spread over the filters' thresholds), with the classifier in train
mode and the bundle's norm-layer affine parameters adapted by SGD (SAR: less those in
--frozen module paths). EATA's Fisher information comes from --fisher-samples other
random images (the authors' main.py: cross-entropy on the model's own argmax, squared
gradients summed per batch, divided by the number of batches). Saves the images, the
per-batch losses (NaN: no update), the reliable and kept masks, SAR's moving average
and recoveries, and the final adapted parameters.

Images mode (a benchmark baseline; OUT.safetensors is not used):

       python tools/reference_tta.py BUNDLE_DIR --images DIR_OR_TAR [--json OUT.json]
       [--device cpu|cuda] [--precision fp32|bf16 | --bf16] [--threads N] [--warmup 1]
       [--steps 5] [--accum 12] [--samples-per-step 15] [--lr 5e-3] [--momentum 0.9]
       [--weight-decay 0] [--optimizer sgd|adamw] [--adapt classifier+diffusion]
       [--loss mse] [--adapt-topk 0] [--timesteps uniform|stratified] [--same-noise]
       [--mode episodic|online] [--seed 0]

runs the published per-image loop over real images: JPEG/PNG/WebP files below a folder
(sorted by path; key = path without extension) or the samples of a WebDataset tar (key +
image member, label from `.cls`). Each image is preprocessed with PIL as dtta does it
(src/image/preprocess.rs): the torchvision resize-shorter-side + center-crop window,
resampled bilinearly (PIL's antialiasing) straight to the crop size and normalised; the
diffusion view is the same window at the bundle's resolution in [-1, 1] (PNG input gives
both sides the same pixels; JPEG decoders differ slightly, and dtta may decode a large
JPEG at a reduced DCT scale). Per image: the
encoder once, then steps*accum iterations (classifier re-run every iteration, loss/accum,
optimizer step every accum iterations), the prediction after, then (episodic) every
adapted parameter is restored and the optimizer is made anew. The knobs are dtta's
`[tta]` keys with dtta's defaults; the (t, eps) draws come from torch's generator seeded
per image from (seed, key) with dtta's FNV-1a mix. dtta draws from a generator of its
own (src/rng.rs, xoshiro256**), so the two see draws of the same distribution, not the
same draws: compare their accuracies over many images, not image by image.
`--bf16` is CUDA autocast to bfloat16 around the forward passes, as tta.precision =
"bf16" (an error on the CPU, as in dtta). Seconds per image cover the device copy of the
views through the prediction after (what dtta's adapt_ms covers), with a device sync at
both ends; model loading and the first `--warmup` images are excluded from the mean.
"""
import argparse
import contextlib
import io
import json
import math
import os
import tarfile
import time
import tomllib

import torch
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("out", nargs="?", help="OUT.safetensors (parity mode; not with --images)")
    # Defaults: the parity tests' values here, dtta's [tta] defaults with --images.
    ap.add_argument("--steps", type=int)
    ap.add_argument("--accum", type=int)
    ap.add_argument("--samples", "--samples-per-step", dest="samples", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--optimizer", default="sgd", help="sgd | adamw")
    ap.add_argument("--adapt", default="classifier+diffusion", help="classifier+diffusion | classifier | norm")
    ap.add_argument("--loss", default="mse", help="mse | l1")
    ap.add_argument("--adapt-topk", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=["diffusion-tta", "dusa", "eata", "sar"], default="diffusion-tta")
    dusa = ap.add_argument_group("dusa (parity mode)")
    dusa.add_argument("--timestep", type=int, default=100)
    dusa.add_argument("--dusa-topk", type=int, default=2)
    dusa.add_argument("--random", type=int, default=1)
    dusa.add_argument("--max-dense-candidates", type=int, default=20)
    dusa.add_argument("--no-adapt-head", action="store_true", help="leave the classifier's head out")
    dusa.add_argument("--batch", type=int, default=2, help="images per online batch")
    dusa.add_argument("--batches", type=int, default=2, help="online batches")
    entropy = ap.add_argument_group("eata and sar (parity mode; --batch and --batches as dusa online)")
    entropy.add_argument("--e-margin", type=float, default=0.4, help="E0 as a fraction of ln C")
    entropy.add_argument("--d-margin", type=float, default=0.05)
    entropy.add_argument("--fisher-alpha", type=float, default=2000.0)
    entropy.add_argument("--fisher-samples", type=int, default=16)
    entropy.add_argument("--fisher-batch", type=int, default=8)
    entropy.add_argument("--rho", type=float, default=0.05)
    entropy.add_argument("--reset-below", type=float, default=0.2)
    entropy.add_argument("--frozen", default="", help="comma-separated module paths SAR leaves alone")
    images = ap.add_argument_group("images mode")
    images.add_argument("--images", help="folder of JPEG/PNG/WebP files, or a WebDataset .tar")
    images.add_argument("--json", help="write per-image results and timings here")
    images.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    images.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    images.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    images.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    images.add_argument("--warmup", type=int, default=1, help="leading images left out of the mean time")
    images.add_argument("--timesteps", choices=["uniform", "stratified"], default="uniform")
    images.add_argument("--same-noise", action="store_true")
    images.add_argument("--mode", choices=["episodic", "online"], default="episodic")
    args = ap.parse_args()
    if args.images:
        for name, allowed in (("optimizer", ("sgd", "adamw")), ("loss", ("mse", "l1")),
                              ("adapt", ("classifier+diffusion", "classifier", "norm"))):
            if getattr(args, name) not in allowed:
                ap.error(f"--{name} must be one of {', '.join(allowed)}")
        if args.out:
            ap.error("OUT.safetensors is for the parity mode; with --images use --json")
        for name, value in (("steps", 5), ("accum", 12), ("samples", 15), ("lr", 5e-3)):
            if getattr(args, name) is None:
                setattr(args, name, value)
        return run_images(args)
    if args.out is None:
        ap.error("OUT.safetensors is required (or --images DIR_OR_TAR)")
    if args.method == "dusa":
        return run_dusa(args)
    if args.method in ("eata", "sar"):
        return run_entropy_method(args)
    for name, value in (("steps", 3), ("accum", 2), ("samples", 4), ("lr", 0.05)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    spec = tomllib.load(open(os.path.join(args.bundle, "bundle.toml"), "rb"))
    cls_spec, diff = spec["classifier"], spec["diffusion"]
    classifier = torch.jit.load(os.path.join(args.bundle, cls_spec["file"])).eval()
    denoiser = torch.jit.load(os.path.join(args.bundle, diff["denoiser"])).eval()
    encoder = torch.jit.load(os.path.join(args.bundle, diff["encoder"])).eval() if "encoder" in diff else None
    E = load_file(os.path.join(args.bundle, diff["class_embeddings"]))["embeddings"].float() if "class_embeddings" in diff else None
    # Dense bundles (task segmentation/depth, condition concat): the condition is a map.
    args.dense = dense_condition(spec) if spec.get("task", "classification") != "classification" else None
    sched = diff["schedule"]
    abar = alphas_cumprod(sched, "cpu")  # linear (DiT) or scaled_linear (Stable Diffusion)

    pre = cls_spec["preprocess"]
    x_cls = torch.randn(1, pre["channels"], pre["crop"], pre["crop"])
    x_gen = torch.rand(1, diff["channels"], diff["resolution"], diff["resolution"]) * 2 - 1
    with torch.no_grad():
        z0 = encoder(x_gen) * diff.get("latent_scale", 1.0) if encoder is not None else x_gen.clone()
    C = z0.shape[1]
    iters = args.steps * args.accum
    n = args.samples
    t_all = torch.randint(0, sched["steps"], (iters, n))
    eps_all = torch.randn(iters, n, *z0.shape[1:])

    params = adapted_parameters(classifier, denoiser, cls_spec, args.adapt)
    tensors = [p for _, p in params]
    opt = make_optimizer(tensors, args)

    with torch.no_grad():
        logits0 = classifier(x_cls)
    topk = logits0.topk(args.adapt_topk, dim=-1).indices[0] if args.adapt_topk > 0 else None
    losses = []
    opt.zero_grad()
    for it in range(iters):
        t, eps = t_all[it], eps_all[it]
        loss = iteration_loss(classifier, denoiser, x_cls, z0, t, eps, E, abar, topk, C, args)
        loss.backward()
        losses.append(loss.detach())
        if (it + 1) % args.accum == 0:
            opt.step()
            opt.zero_grad()

    out = {
        "x_cls": x_cls.contiguous(),
        "x_gen": x_gen.contiguous(),
        "t": t_all.contiguous(),
        "eps": eps_all.contiguous(),
        "losses": torch.stack(losses).contiguous(),
    }
    for name, p in params:
        out["param." + name] = p.detach().contiguous()
    save_file(out, args.out)
    print(f"reference: {iters} iterations, final loss {losses[-1].item():.6f}, {len(params)} adapted tensors")


# ----------------------------------------------------------------------------------------
# DUSA, parity mode.
# ----------------------------------------------------------------------------------------

def dusa_candidates(logits_row, u_row, k, m):
    """Top-k classes of one image's logits, then m more without replacement from the rest
    with probabilities softmax(logits): the m largest logits + Gumbel(u) among the rest."""
    order = sorted(range(logits_row.shape[0]), key=lambda c: -float(logits_row[c]))
    top = order[:k]
    gumbel = -torch.log(-torch.log(u_row.clamp(1e-20, 1.0)))
    keys = {c: float(logits_row[c] + gumbel[c]) for c in range(logits_row.shape[0]) if c not in top}
    drawn = sorted(keys, key=lambda c: -keys[c])[:m]
    return top + drawn


def dusa_dense_candidates(logits_row, k, cap):
    """A segmenter's candidates from its [K,h,w] logits, as the authors build them: every
    pixel's top-1 class, then the classes in some pixel's top k by how many pixels rank
    them (ties: lower class first), at most `cap` (never dropping a top-1), ascending."""
    K = logits_row.shape[0]
    ranked = torch.bincount(logits_row.topk(min(k, K), dim=0).indices.flatten(), minlength=K)
    top1 = torch.bincount(logits_row.argmax(dim=0).flatten(), minlength=K)
    chosen = [c for c in range(K) if top1[c] > 0]
    others = sorted((c for c in range(K) if top1[c] == 0 and ranked[c] > 0), key=lambda c: (-int(ranked[c]), c))
    return sorted(chosen + others[:max(cap - len(chosen), 0)])


def dusa_image_loss(logits_row, cand, z0_row, eps_row, t, denoiser, E, abar, C):
    """One image's DUSA loss: its candidates' noise predictions (each under its own
    class embedding) mixed with p = softmax of the LogitNorm logits at the candidates.

    A segmenter's logits_row is [K,h,w]: p is the plain per-pixel softmax over the
    candidates (no LogitNorm, as the authors' segmentation code), resampled to the
    latent's size (bilinear, align_corners=False), and candidate j's condition is E_j at
    every pixel (concat conditioning), so the mixture is per pixel."""
    a = abar[t]
    z_t = a.sqrt() * z0_row + (1 - a).sqrt() * eps_row
    b = len(cand)
    steps = torch.full((b,), t, dtype=torch.int64)
    if logits_row.dim() == 3:
        p = torch.nn.functional.interpolate(logits_row[cand].softmax(0).unsqueeze(0), size=z0_row.shape[-2:],
                                            mode="bilinear", align_corners=False)[0]
        cond = E[cand][:, :, None, None].expand(b, E.shape[1], *z0_row.shape[-2:])
        preds = denoiser(z_t.unsqueeze(0).expand(b, *z_t.shape), steps, cond)[:, :C].float()
        mix = sum(p[j].unsqueeze(0) * preds[j] for j in range(b))
    else:
        z = logits_row / logits_row.norm()
        p = z[cand].softmax(-1)
        preds = denoiser(z_t.unsqueeze(0).expand(b, *z_t.shape), steps, E[cand])[:, :C].float()
        mix = sum(p[j] * preds[j] for j in range(b))
    return (eps_row - mix).pow(2).mean()


def run_dusa(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    spec = tomllib.load(open(os.path.join(args.bundle, "bundle.toml"), "rb"))
    cls_spec, diff = spec["classifier"], spec["diffusion"]
    classifier = torch.jit.load(os.path.join(args.bundle, cls_spec["file"])).eval()
    denoiser = torch.jit.load(os.path.join(args.bundle, diff["denoiser"])).eval()
    encoder = torch.jit.load(os.path.join(args.bundle, diff["encoder"])).eval() if "encoder" in diff else None
    E = load_file(os.path.join(args.bundle, diff["class_embeddings"]))["embeddings"].float()
    abar = alphas_cumprod(diff["schedule"], "cpu")
    K = cls_spec["num_classes"]
    steps = args.steps if args.steps is not None else 2
    accum = args.accum if args.accum is not None else 1
    lr = args.lr if args.lr is not None else 1e-3
    online = args.mode == "online"
    images = args.batch * args.batches if online else 1
    pre = cls_spec["preprocess"]
    x_cls = torch.randn(images, pre["channels"], pre["crop"], pre["crop"])
    x_gen = torch.rand(images, diff["channels"], diff["resolution"], diff["resolution"]) * 2 - 1
    with torch.no_grad():
        z0 = encoder(x_gen) * diff.get("latent_scale", 1.0) if encoder is not None else x_gen.clone()
    C = z0.shape[1]
    params = adapted_parameters(classifier, denoiser, cls_spec, args.adapt, with_head=not args.no_adapt_head)
    opt = torch.optim.Adam([p for _, p in params], lr=lr)

    # iteration -> list of image indices it covers
    iterations = [list(range(j * args.batch, (j + 1) * args.batch)) for j in range(args.batches)] if online \
        else [[0]] * (steps * accum)
    eps_all, u_all, cands, losses = [], [], [], []
    opt.zero_grad()
    for it, idx in enumerate(iterations):
        logits = classifier(x_cls[idx]).float()
        total = 0
        for row, i in enumerate(idx):
            eps = torch.randn(*z0.shape[1:])
            u = torch.rand(K)
            eps_all.append(eps)
            u_all.append(u)
            scores = logits[row].detach()
            if scores.dim() == 3:
                cand = dusa_dense_candidates(scores, args.dusa_topk, args.max_dense_candidates)
            else:
                cand = dusa_candidates(scores, u, args.dusa_topk, args.random)
            cands.append(torch.tensor(cand))
            total = total + dusa_image_loss(logits[row], cand, z0[i], eps, args.timestep, denoiser, E, abar, C)
        loss = total / len(idx) / accum
        loss.backward()
        losses.append(loss.detach())
        if (it + 1) % accum == 0:
            opt.step()
            opt.zero_grad()

    out = {
        "x_cls": x_cls.contiguous(),
        "x_gen": x_gen.contiguous(),
        "eps": torch.stack(eps_all).contiguous(),
        "u": torch.stack(u_all).contiguous(),
        "candidates": torch.cat(cands).contiguous(),
        "candidate_counts": torch.tensor([len(c) for c in cands]),
        "losses": torch.stack(losses).contiguous(),
    }
    for name, p in params:
        out["param." + name] = p.detach().contiguous()
    save_file(out, args.out)
    print(f"reference dusa ({args.mode}): {len(iterations)} iterations, final loss {losses[-1].item():.6f}, "
          f"{len(params)} adapted tensors")


def softmax_entropy(x):
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def norm_parameters(classifier, cls_spec, frozen):
    """(name, parameter) of the bundle's norm affines outside the `frozen` module paths
    (a parameter's module path equal to one, or below one); requires_grad on those only."""
    norm = set(cls_spec.get("norm", []))

    def is_frozen(name):
        module = name.rpartition(".")[0]
        return any(module == f or module.startswith(f + ".") for f in frozen)

    params = []
    for name, p in classifier.named_parameters():
        chosen = name in norm and not is_frozen(name)
        p.requires_grad_(chosen)
        if chosen:
            params.append(("classifier." + name, p))
    return params


def eata_fishers(classifier, params, images, batch):
    """The authors' main.py: per batch, CE on the model's own argmax, backward, squared
    gradients summed; at the last batch divided by the number of batches."""
    ewc_optimizer = torch.optim.SGD([p for _, p in params], 0.001)
    chunks = images.split(batch)
    fishers = {}
    for i, chunk in enumerate(chunks, start=1):
        outputs = classifier(chunk)
        _, targets = outputs.max(1)
        torch.nn.functional.cross_entropy(outputs, targets).backward()
        for name, p in params:
            if p.grad is not None:
                fisher = p.grad.detach().clone() ** 2
                if i > 1:
                    fisher = fisher + fishers[name][0]
                if i == len(chunks):
                    fisher = fisher / i
                fishers[name] = [fisher, p.detach().clone()]
        ewc_optimizer.zero_grad()
    return fishers


def eata_batch(x, classifier, params, optimizer, fishers, e_margin, d_margin, alpha, probs):
    """eata.py's forward_and_adapt_eata; returns (outputs, ids1, kept ids, loss or NaN, new probs)."""
    outputs = classifier(x)
    entropys = softmax_entropy(outputs)
    ids1 = torch.where(entropys < e_margin)
    ids2 = torch.where(ids1[0] > -0.1)
    entropys = entropys[ids1]
    if probs is not None:
        cos = torch.nn.functional.cosine_similarity(probs.unsqueeze(dim=0), outputs[ids1].softmax(1), dim=1)
        ids2 = torch.where(torch.abs(cos) < d_margin)
        entropys = entropys[ids2]
        new = outputs[ids1][ids2].softmax(1)
        updated = probs if new.size(0) == 0 else (0.9 * probs + 0.1 * new.mean(0)).detach()
    else:
        new = outputs[ids1].softmax(1)
        updated = None if new.size(0) == 0 else new.mean(0).detach()
    coeff = 1 / (torch.exp(entropys.clone().detach() - e_margin))
    loss = entropys.mul(coeff).mean(0)
    if fishers is not None:
        ewc = 0
        for name, p in params:
            ewc += alpha * (fishers[name][0] * (p - fishers[name][1]) ** 2).sum()
        loss += ewc
    value = float("nan")
    if x[ids1][ids2].size(0) != 0:
        loss.backward()
        optimizer.step()
        value = loss.item()
    optimizer.zero_grad()
    return outputs, ids1[0], ids1[0][ids2[0]], value, updated


def sar_batch(x, classifier, params, optimizer, rho, e_margin, reset_below, ema):
    """sar.py's forward_and_adapt_sar with sam.py's two steps (base SGD); returns
    (outputs, ids1, kept ids, first loss, second loss, ema, reset)."""
    tensors = [p for _, p in params]
    optimizer.zero_grad()
    outputs = classifier(x)
    entropys = softmax_entropy(outputs)
    ids1 = torch.where(entropys < e_margin)
    loss = entropys[ids1].mean(0)
    loss.backward()
    with torch.no_grad():  # SAM first_step
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in tensors if p.grad is not None]), p=2)
        scale = rho / (grad_norm + 1e-12)
        old = {}
        for p in tensors:
            if p.grad is None:
                continue
            old[p] = p.data.clone()
            p.add_(p.grad * scale.to(p))
    optimizer.zero_grad()
    entropys2 = softmax_entropy(classifier(x))[ids1]
    ids2 = torch.where(entropys2 < e_margin)
    loss2 = entropys2[ids2].mean(0)
    if not math.isnan(loss2.item()):
        ema = loss2.item() if ema is None else 0.9 * ema + (1 - 0.9) * loss2.item()
    loss2.backward()
    with torch.no_grad():  # SAM second_step
        for p in tensors:
            if p.grad is None:
                continue
            p.data = old[p]
    optimizer.step()
    optimizer.zero_grad()
    reset = ema is not None and ema < reset_below
    return outputs, ids1[0], ids1[0][ids2[0]], loss.item(), loss2.item(), ema, reset


def run_entropy_method(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    spec = tomllib.load(open(os.path.join(args.bundle, "bundle.toml"), "rb"))
    cls_spec = spec["classifier"]
    classifier = torch.jit.load(os.path.join(args.bundle, cls_spec["file"])).train()
    frozen = [f for f in args.frozen.split(",") if f] if args.method == "sar" else []
    params = norm_parameters(classifier, cls_spec, frozen)
    K = cls_spec["num_classes"]
    pre = cls_spec["preprocess"]
    n = args.batch * args.batches
    shape = (pre["channels"], pre["crop"], pre["crop"])
    scale = torch.exp(torch.empty(n, 1, 1, 1).uniform_(math.log(0.05), math.log(20.0)))
    x = torch.randn(n, *shape) * scale
    lr = args.lr if args.lr is not None else 2.5e-4
    e_margin = args.e_margin * math.log(K)
    out = {"x_cls": x.contiguous()}
    fishers = None
    if args.method == "eata" and args.fisher_alpha > 0:
        fisher_x = torch.randn(args.fisher_samples, *shape)
        out["fisher_x"] = fisher_x.contiguous()
        fishers = eata_fishers(classifier, params, fisher_x, args.fisher_batch)
    source = {name: p.detach().clone() for name, p in params}
    new_optimizer = lambda: torch.optim.SGD([p for _, p in params], lr=lr, momentum=args.momentum)
    optimizer = new_optimizer()
    probs, ema = None, None
    reliable, kept, losses, seconds, emas, resets = [], [], [], [], [], []
    for j in range(args.batches):
        xb = x[j * args.batch:(j + 1) * args.batch]
        if args.method == "eata":
            _, ids1, ids2, value, probs = eata_batch(xb, classifier, params, optimizer, fishers, e_margin,
                                                     args.d_margin, args.fisher_alpha, probs)
        else:
            _, ids1, ids2, value, second, ema, reset = sar_batch(xb, classifier, params, optimizer, args.rho,
                                                                 e_margin, args.reset_below, ema)
            if reset:  # sar.py's reset: source weights, fresh optimizer; the ema is kept
                with torch.no_grad():
                    for name, p in params:
                        p.copy_(source[name])
                optimizer = new_optimizer()
            seconds.append(second)
            emas.append(float("nan") if ema is None else ema)
            resets.append(float(reset))
        mask = lambda ids: torch.zeros(args.batch, dtype=torch.bool).index_fill_(0, ids, True)
        reliable.append(mask(ids1))
        kept.append(mask(ids2))
        losses.append(value)
    out["reliable"] = torch.cat(reliable).to(torch.uint8)
    out["kept"] = torch.cat(kept).to(torch.uint8)
    out["losses"] = torch.tensor(losses)
    if args.method == "sar":
        out["losses_second"] = torch.tensor(seconds)
        out["ema"] = torch.tensor(emas, dtype=torch.float64)
        out["resets"] = torch.tensor(resets)
    for name, p in params:
        out["param." + name] = p.detach().contiguous()
    save_file(out, args.out)
    print(f"reference {args.method}: {args.batches} batches of {args.batch}, reliable {int(out['reliable'].sum())}, "
          f"kept {int(out['kept'].sum())}, {len(params)} adapted tensors")


# ----------------------------------------------------------------------------------------
# Images mode: the published loop over real images, timed (a benchmark baseline).
# ----------------------------------------------------------------------------------------

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def adapted_parameters(classifier, denoiser, cls_spec, adapt, with_head=False):
    """(name, parameter) of what `adapt` selects, as dtta does; sets requires_grad on all.

    The classifier's head adapts only `with_head` (DUSA's recipe); `norm` keeps only the
    bundle's norm affines; `classifier+diffusion` adds every denoiser parameter.
    """
    head = set() if with_head else set(cls_spec.get("head", []))
    norm = set(cls_spec.get("norm", []))
    params = []
    for name, p in classifier.named_parameters():
        chosen = name not in head and (adapt != "norm" or name in norm)
        p.requires_grad_(chosen)
        if chosen:
            params.append(("classifier." + name, p))
    for name, p in denoiser.named_parameters():
        chosen = adapt == "classifier+diffusion"
        p.requires_grad_(chosen)
        if chosen:
            params.append(("denoiser." + name, p))
    return params


def make_optimizer(tensors, args):
    """torch.optim SGD (momentum, weight decay) or AdamW, from the command line."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(tensors, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(tensors, lr=args.lr, weight_decay=args.weight_decay)


def dense_condition(spec):
    """The concat condition of a dense bundle (paper section 3.2), as a function of the
    model's output [1,K,h,w] (segmentation) or [1,1,h,w] (depth) and E:
    - segmentation: c(u) = sum_k p_k(u) E_k, p the per-pixel softmax over classes,
      resampled to the latent's size as probabilities (bilinear, align_corners=False);
    - depth: the depth map resampled the same way, mapped from [depth_min, depth_max]
      metres linearly onto [-1, 1]."""
    diff = spec["diffusion"]
    if diff.get("condition") != "concat":
        raise SystemExit("reference: dense bundles need diffusion.condition = \"concat\"")

    def resample(m, size):
        return torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)

    if spec["task"] == "depth":
        lo, hi = diff["depth_min"], diff["depth_max"]
        return lambda out, E, size: 2 * (resample(out.float(), size) - lo) / (hi - lo) - 1
    return lambda out, E, size: torch.einsum("bkhw,kd->bdhw", resample(out.float().softmax(1), size), E)


def iteration_loss(classifier, denoiser, x, z0, t, eps, E, abar, topk, C, args):
    """One iteration of the published loop: the classifier re-runs (eval mode), its
    softmax (over `topk` when set) mixes the embeddings `E` into one condition for all
    pairs (a dense bundle: one condition map, `dense_condition`), and the loss is the mean
    MSE (or L1) of the noise prediction over `accum`."""
    n = t.shape[0]
    logits = classifier(x)
    if getattr(args, "dense", None) is not None:
        c = args.dense(logits, E, z0.shape[-2:])
        c = c.expand(n, *c.shape[1:])
    else:
        chosen = logits[:, topk] if topk is not None else logits
        p = chosen.float().softmax(-1)
        e = E[topk] if topk is not None else E
        c = (p @ e.reshape(e.shape[0], -1)).reshape(1, *e.shape[1:]).expand(n, *e.shape[1:])
    a = abar[t].view(n, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    d = denoiser(z_t, t, c)[:, :C].float() - eps
    return (d.pow(2).mean() if args.loss == "mse" else d.abs().mean()) / args.accum


def image_seed(seed, key):
    """A per-image torch seed: dtta's FNV-1a mix of (seed, key) (src/tta/schedule.rs
    image_seed), halved to fit torch's seed range."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325 ^ ((seed * 0x9E3779B97F4A7C15) & mask)
    for b in key.encode():
        h ^= b
        h = (h * 0x100000001B3) & mask
    return h >> 1


def read_images(path):
    """[(key, label or None, encoded bytes)] from a folder or a WebDataset tar, in order."""
    samples = []
    if os.path.isdir(path):
        files = []
        for root, _, names in os.walk(path):
            files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
        for f in sorted(files, key=lambda f: os.path.relpath(f, path)):
            rel = os.path.relpath(f, path).replace(os.sep, "/")
            samples.append((rel.rsplit(".", 1)[0], None, open(f, "rb").read()))
        return samples
    groups = {}
    order = []
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            d, _, base = m.name.rpartition("/")
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            key = f"{d}/{stem}" if d else stem
            if key not in groups:
                groups[key] = {}
                order.append(key)
            groups[key][ext.lower()] = tar.extractfile(m).read()
    for key in order:
        g = groups[key]
        image = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
        if image is None:
            continue
        label = int(g["cls"].decode().strip()) if "cls" in g else None
        samples.append((key, label, image))
    return samples


def crop_window(width, height, resize, crop):
    """The source rectangle (left, top, w, h) that torchvision's Resize(resize) +
    CenterCrop(crop) keeps (ClassifierView::crop_window)."""
    w, h, r = float(width), float(height), float(resize)
    new_w, new_h = (r, math.trunc(r * h / w)) if width <= height else (math.trunc(r * w / h), r)
    left, top = round((new_w - crop) / 2.0), round((new_h - crop) / 2.0)  # ties to even
    sx, sy = w / new_w, h / new_h
    return left * sx, top * sy, crop * sx, crop * sy


def views(data, pre, diff):
    """(classifier view [1,C,crop,crop], diffusion view [1,C,res,res] in [-1,1]) as dtta builds them."""
    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    rgb = pre["channels"] == 3 or (diff is not None and diff["channels"] == 3)
    img = img.convert("RGB" if rgb else "L")
    l, t, w, h = crop_window(img.width, img.height, pre["resize"], pre["crop"])

    def window(side, channels):
        whole = (l, t, w, h) == (0, 0, img.width, img.height) and img.width == side and img.height == side
        out = img if whole else img.resize((side, side), Image.BILINEAR, box=(l, t, l + w, t + h))
        a = np.asarray(out, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        if channels == 1 and a.shape[2] == 3:  # ITU-R 601 luma, as dtta converts
            a = ((a[:, :, 0].astype(np.uint32) * 299 + a[:, :, 1] * 587 + a[:, :, 2] * 114 + 500) // 1000)
            a = a.astype(np.uint8)[:, :, None]
        elif channels == 3 and a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        return torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32)).unsqueeze(0)

    x = window(pre["crop"], pre["channels"])
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)
    x_cls = x * (1.0 / (255.0 * std)) - mean / std
    x_gen = window(diff["resolution"], diff["channels"]) * (2.0 / 255.0) - 1.0 if diff is not None else None
    return x_cls.contiguous(), x_gen.contiguous() if x_gen is not None else None


def alphas_cumprod(sched, device):
    if sched["kind"] == "scaled_linear":
        betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, sched["steps"],
                               dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(sched["beta_start"], sched["beta_end"], sched["steps"], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float().to(device)


def draw(n, shape, num_timesteps, timesteps, same_noise, device):
    """One iteration's (t, eps), in SeededNoise::draw's order of generator calls."""
    if timesteps == "uniform":
        t = torch.randint(num_timesteps, (n,), dtype=torch.int64, device=device)
    else:
        stride = num_timesteps / n
        offset = torch.rand(1, dtype=torch.float64, device=device) * stride
        t = (torch.arange(n, dtype=torch.float64, device=device) * stride + offset).floor()
        t = t.clamp(0, num_timesteps - 1).to(torch.int64)
    if same_noise:
        eps = torch.randn(1, *shape, device=device).expand(n, *shape).contiguous()
    else:
        eps = torch.randn(n, *shape, device=device)
    return t, eps


def run_images(args):
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.precision == "bf16" and device.type != "cuda":
        raise SystemExit('reference_tta: --bf16 is CUDA autocast, but the device is cpu (as tta.precision = "bf16" in dtta)')
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext

    loaded = time.perf_counter()
    spec = tomllib.load(open(os.path.join(args.bundle, "bundle.toml"), "rb"))
    cls_spec, diff = spec["classifier"], spec.get("diffusion")
    if diff is None:
        raise SystemExit("reference_tta: the bundle has no [diffusion] section")
    pre = cls_spec["preprocess"]
    classifier = torch.jit.load(os.path.join(args.bundle, cls_spec.get("file", "classifier.pt")), map_location=device).eval()
    denoiser = torch.jit.load(os.path.join(args.bundle, diff["denoiser"]), map_location=device).eval()
    encoder = (torch.jit.load(os.path.join(args.bundle, diff["encoder"]), map_location=device).eval()
               if diff.get("encoder") else None)
    E = load_file(os.path.join(args.bundle, diff["class_embeddings"]))[diff.get("embeddings_tensor", "embeddings")]
    E = E.float().to(device)
    abar = alphas_cumprod(diff["schedule"], device)
    num_timesteps = diff["schedule"]["steps"]
    latent_scale = diff.get("latent_scale", 1.0)

    tensors = [p for _, p in adapted_parameters(classifier, denoiser, cls_spec, args.adapt)]
    originals = [p.detach().clone() for p in tensors]

    def new_optimizer():
        return make_optimizer(tensors, args)

    samples = read_images(args.images)
    if not samples:
        raise SystemExit(f"reference_tta: no images in {args.images}")
    sync()
    load_s = time.perf_counter() - loaded
    iters, n = args.steps * args.accum, args.samples
    opt = new_optimizer()
    results = []
    for key, label, data in samples:
        x_host, g_host = views(data, pre, diff)
        sync()
        started = time.perf_counter()
        x = x_host.to(device)
        x_gen = g_host.to(device)
        with torch.no_grad(), autocast():
            z0 = encoder(x_gen) * latent_scale if encoder is not None else x_gen.clone()
            logits0 = classifier(x)
        z0 = z0.float()
        C = z0.shape[1]
        topk = logits0.topk(min(args.adapt_topk, logits0.shape[1]), dim=-1).indices[0] if args.adapt_topk > 0 else None
        torch.manual_seed(image_seed(args.seed, key))
        if args.mode == "episodic":
            opt = new_optimizer()
        losses = []
        opt.zero_grad()
        for it in range(iters):
            t, eps = draw(n, z0.shape[1:], num_timesteps, args.timesteps, args.same_noise, device)
            with autocast():
                loss = iteration_loss(classifier, denoiser, x, z0, t, eps, E, abar, topk, C, args)
            loss.backward()
            losses.append(loss.detach())
            if (it + 1) % args.accum == 0:
                opt.step()
                opt.zero_grad()
        with torch.no_grad(), autocast():
            logits1 = classifier(x)
        pred_before, pred_after = int(logits0.argmax(-1)[0]), int(logits1.argmax(-1)[0])
        if args.mode == "episodic":  # every adapted parameter back; the optimizer is made anew
            with torch.no_grad():
                for p, o in zip(tensors, originals):
                    p.copy_(o)
        step_losses = torch.stack(losses).view(args.steps, args.accum).sum(1).cpu()
        sync()
        seconds = time.perf_counter() - started
        results.append({
            "key": key, "label": label, "pred_before": pred_before, "pred_after": pred_after,
            "seconds": seconds, "step_losses": [float(v) for v in step_losses],
            "nonfinite": not bool(torch.isfinite(step_losses).all()),
        })
        print(f"reference: {key}: {seconds:.3f}s, pred {pred_before} -> {pred_after}, "
              f"loss {step_losses[0]:.5f} -> {step_losses[-1]:.5f}", flush=True)

    timed = results[args.warmup:] or results
    report = {
        "bundle": args.bundle, "images": args.images, "device": str(device), "precision": args.precision,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "steps": args.steps, "accum": args.accum, "samples_per_step": n, "optimizer": args.optimizer,
        "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay, "adapt": args.adapt,
        "loss": args.loss, "adapt_topk": args.adapt_topk, "timesteps": args.timesteps,
        "same_noise": args.same_noise, "mode": args.mode, "seed": args.seed,
        "load_s": load_s, "warmup": [r["key"] for r in results[: len(results) - len(timed)]],
        "seconds_per_image": sum(r["seconds"] for r in timed) / len(timed), "timed_images": len(timed),
        "results": results,
    }
    print(f"reference: {len(results)} image(s) on {device} ({args.precision}), "
          f"{report['seconds_per_image']:.3f} s/image over {len(timed)} (load {load_s:.1f}s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
