"""The Python reference of the per-image Diffusion-TTA loop, for parity tests.

Usage: python tools/reference_tta.py BUNDLE_DIR OUT.safetensors [--steps 3] [--accum 2]
       [--samples 4] [--lr 0.05] [--momentum 0.9] [--weight-decay 0.0]
       [--optimizer sgd|adamw] [--adapt classifier+diffusion|classifier|norm]
       [--loss mse|l1] [--adapt-topk 0] [--seed 0]

Follows the published code's semantics (ALGORITHM.md): the classifier re-runs every
iteration in eval mode, the loss is the mean MSE divided by accum, the optimizer
(torch.optim) steps every accum iterations. It draws the image, the timesteps and the
noise itself and saves them with the per-iteration losses and the final adapted
parameters, so another implementation can replay the same draws and compare.
"""
import argparse
import os
import tomllib

import torch
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--adapt", default="classifier+diffusion")
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--adapt-topk", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    spec = tomllib.load(open(os.path.join(args.bundle, "bundle.toml"), "rb"))
    cls_spec, diff = spec["classifier"], spec["diffusion"]
    classifier = torch.jit.load(os.path.join(args.bundle, cls_spec["file"])).eval()
    denoiser = torch.jit.load(os.path.join(args.bundle, diff["denoiser"])).eval()
    encoder = torch.jit.load(os.path.join(args.bundle, diff["encoder"])).eval() if "encoder" in diff else None
    E = load_file(os.path.join(args.bundle, diff["class_embeddings"]))["embeddings"].float()
    sched = diff["schedule"]
    betas = torch.linspace(sched["beta_start"], sched["beta_end"], sched["steps"], dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()

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

    head, norm = set(cls_spec.get("head", [])), set(cls_spec.get("norm", []))
    params = []
    for name, p in classifier.named_parameters():
        chosen = name not in head and (args.adapt != "norm" or name in norm)
        p.requires_grad_(chosen)
        if chosen:
            params.append(("classifier." + name, p))
    for name, p in denoiser.named_parameters():
        chosen = args.adapt == "classifier+diffusion"
        p.requires_grad_(chosen)
        if chosen:
            params.append(("denoiser." + name, p))
    tensors = [p for _, p in params]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(tensors, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(tensors, lr=args.lr, weight_decay=args.weight_decay)

    with torch.no_grad():
        logits0 = classifier(x_cls)
    topk = logits0.topk(args.adapt_topk, dim=-1).indices[0] if args.adapt_topk > 0 else None
    losses = []
    opt.zero_grad()
    for it in range(iters):
        t, eps = t_all[it], eps_all[it]
        a = abar[t].view(n, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        logits = classifier(x_cls)  # re-run every iteration, eval mode
        if topk is not None:
            p = logits[:, topk].softmax(-1)
            e = E[topk]
        else:
            p = logits.softmax(-1)
            e = E
        c = (p @ e.reshape(e.shape[0], -1)).reshape(1, *e.shape[1:]).expand(n, *e.shape[1:])
        eps_hat = denoiser(z_t, t, c)[:, :C]
        diff_ = eps_hat - eps
        loss = (diff_.pow(2).mean() if args.loss == "mse" else diff_.abs().mean()) / args.accum
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


if __name__ == "__main__":
    main()
