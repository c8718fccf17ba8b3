"""Exports a dense-task dtta bundle: a Hugging Face segmenter or depth network + your denoiser.

Usage: python tools/export_dense_bundle.py --out DIR (--segformer NAME_OR_DIR | --depth NAME_OR_DIR)
           (--denoiser denoiser.pt | --make-tiny-denoiser) [--encoder encoder.pt --latent-scale S]
           [--class-embeddings E.safetensors] [--depth-min M --depth-max M]
           [--resolution R] [--channels 3] [--crop C] [--resize R] [--mean ...] [--std ...]
           [--schedule linear --beta-start 1e-4 --beta-end 0.02 --steps 1000]
           [--random-init [--num-classes K] [--depth-arch glpn|dpt]] [--name N] [--seed 0]

It needs PyTorch, transformers and safetensors. The bundle it writes (task = "segmentation"
or "depth", diffusion.condition = "concat"; README, "Model bundles") holds:

- classifier.pt: the transformers model traced with torch.jit.trace at the bundle's crop,
  in eval mode, with a forward that returns a plain tensor: SegFormer's `.logits`
  [B,K,H/4,W/4], or a depth model's `.predicted_depth` [B,H,W] as [B,1,H,W] (dtta reads
  metres: use a metric model). The model is traced as its own class with only forward
  replaced, so parameter names are the checkpoint's (decode_head.classifier.weight, ...).
  `head` (never adapted) is the last Conv2d with K output channels; `norm` lists every
  LayerNorm/BatchNorm/GroupNorm affine parameter. Both are checked against the traced
  module's named_parameters(), where dtta looks them up. BatchNorm layers are scripted
  before the trace, so they keep their train/eval switch (TENT runs in train mode, with
  batch statistics); everything else (dropout, drop path) is traced in eval mode.
- denoiser.pt (and encoder.pt): your files, copied. The denoiser is concat-conditioned:
  forward(x_t [N,C,h,w], t [N] int64, cond [N,Dc,h,w]) -> eps [N,C or 2C,h,w], h x w the
  latent (or, without an encoder, the --resolution view), Dc = D of the class embeddings
  (segmentation: cond = sum_k softmax(logits)_k E_k) or 1 (depth: the depth map,
  2 (d - depth_min) / (depth_max - depth_min) - 1), both resized bilinearly to h x w.
- class_embeddings.safetensors (segmentation): your tensor `embeddings` [K,D], copied.

The diffusion models of the paper's dense experiments are not public: the denoiser (and its
embedding table) must be trained by you, on your domain, with that condition. Examples:

  # SegFormer-B0 on ADE20K (150 classes), downloaded by transformers on your machine:
  python tools/export_dense_bundle.py --out bundles/segformer-b0-ade \\
      --segformer nvidia/segformer-b0-finetuned-ade-512-512 --crop 512 --resize 512 \\
      --denoiser my_seg_denoiser.pt --class-embeddings my_ade_embeddings.safetensors \\
      --encoder my_vae_encoder.pt --latent-scale 0.18215 --resolution 256
  # GLPN on NYUv2 (metric depth, 0..10 m; its processor does not normalise: mean 0, std 1):
  python tools/export_dense_bundle.py --out bundles/glpn-nyu --depth vinvino02/glpn-nyu \\
      --crop 480 --resize 480 --denoiser my_depth_denoiser.pt --resolution 64 \\
      --depth-min 0.5 --depth-max 10
  # (Intel/dpt-hybrid-midas and other MiDaS models predict relative inverse depth, not metres.)

Mean/std and the crop default to the model's preprocessor_config.json (GLPN does not
normalise: mean 0, std 1), else ImageNet's and 512. --random-init builds the model from a
small config with random weights (NAME then only names the bundle), and
--make-tiny-denoiser writes a small random concat-conditioned denoiser (and random class
embeddings if none are given): with both, the whole path runs with no download, but such a
bundle is for checking the plumbing only; its predictions mean nothing:

  python tools/export_dense_bundle.py --out /tmp/dense-bundles/seg --segformer segformer-b0 \
      --random-init --num-classes 11 --make-tiny-denoiser --crop 128 --resolution 32
"""
import argparse
import math
import os
import shutil
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_bundle import IMAGENET_MEAN, IMAGENET_STD, save_safetensors, toml_list  # noqa: E402


class TinyConcatDenoiser(nn.Module):
    """A few convs on cat(x_t, cond) plus a timestep embedding: plumbing checks only."""

    def __init__(self, channels: int, cond_channels: int, width: int = 32):
        super().__init__()
        self.inp = nn.Conv2d(channels + cond_channels, width, 3, padding=1)
        self.temb = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, width))
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(10000.0) * torch.arange(16, dtype=torch.float32, device=t.device) / 16)
        args = t[:, None].float() * freqs[None]
        emb = self.temb(torch.cat([torch.cos(args), torch.sin(args)], dim=1))
        h = F.silu(self.inp(torch.cat([x, cond], dim=1)) + emb[:, :, None, None])
        h = F.silu(self.mid(h)) + h
        return self.out(h)


def load_task_model(args):
    """The transformers model (eval mode) and its preprocessor config (or None)."""
    import transformers as tf

    name = args.segformer or args.depth
    if args.random_init:
        if args.segformer:
            config = tf.SegformerConfig(num_labels=args.num_classes)  # B0 sizes
            return tf.SegformerForSemanticSegmentation(config).eval(), None
        if args.depth_arch == "glpn":  # B0-sized encoder; sigmoid * max_depth metres
            return tf.GLPNForDepthEstimation(tf.GLPNConfig(max_depth=10)).eval(), None
        config = tf.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                              image_size=args.crop or 512, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                              neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32)
        return tf.DPTForDepthEstimation(config).eval(), None
    if args.segformer:
        model = tf.SegformerForSemanticSegmentation.from_pretrained(name)
    else:  # DPT, GLPN, Depth Anything, ...: anything with .predicted_depth
        model = tf.AutoModelForDepthEstimation.from_pretrained(name)
    try:
        processor = tf.AutoImageProcessor.from_pretrained(name)
    except Exception as e:  # no preprocessor_config.json: keep the defaults
        print(f"  no image processor for {name} ({type(e).__name__}); mean/std default to ImageNet's")
        processor = None
    return model.float().eval(), processor


def tensor_forward(model: nn.Module, task: str) -> nn.Module:
    """Replaces the model's forward by one returning a plain tensor, keeping its parameter names."""
    base = type(model)

    def forward(self, pixel_values):
        out = base.forward(self, pixel_values)
        if task == "segmentation":
            return out.logits if hasattr(out, "logits") else out[0]
        depth = out.predicted_depth if hasattr(out, "predicted_depth") else out[0]
        return depth.unsqueeze(1)  # [B,H,W] -> [B,1,H,W]

    model.__class__ = type(base.__name__ + "TensorOut", (base,), {"forward": forward})
    return model


def head_and_norm(model: nn.Module, k: int):
    """(the last Conv2d with k output channels, every norm layer's affine parameters)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == k]
    if not convs:
        sys.exit(f"export_dense_bundle: no Conv2d with {k} output channels to call the head")
    head = [f"{convs[-1]}.{p}" for p, _ in model.get_submodule(convs[-1]).named_parameters()]
    norm = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            norm += [f"{name}.{p}" for p, _ in m.named_parameters(recurse=False)]
    return head, norm


def script_batchnorms(model: nn.Module) -> int:
    """Scripts every BatchNorm in place, so the traced module keeps its train/eval branch.

    torch.jit.trace bakes in the mode a layer was traced in; a scripted submodule keeps
    `if self.training`, so TENT (train mode: batch statistics) still works after tracing."""
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in bns:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, torch.jit.script(owner.get_submodule(child)))
    return len(bns)


def condition_map(output: torch.Tensor, task: str, size, embeddings, depth_range) -> torch.Tensor:
    """dtta's concat condition (src/model/bundle.rs, Diffusion::condition_map)."""
    resize = lambda t: t if tuple(t.shape[2:]) == tuple(size) else F.interpolate(
        t, size=size, mode="bilinear", align_corners=False)
    if task == "depth":
        lo, hi = depth_range
        return (resize(output.float()) - lo) * (2.0 / (hi - lo)) - 1.0
    return torch.einsum("bkhw,kd->bdhw", resize(output.float().softmax(1)), embeddings)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="bundle folder to write")
    model_arg = ap.add_mutually_exclusive_group(required=True)
    model_arg.add_argument("--segformer", help="SegformerForSemanticSegmentation: hub name or local folder")
    model_arg.add_argument("--depth", help="metric depth model (GLPN, DPT, ...): hub name or local folder")
    ap.add_argument("--random-init", action="store_true", help="small config, random weights (plumbing only)")
    ap.add_argument("--num-classes", type=int, default=19, help="--random-init segformer: classes (19)")
    ap.add_argument("--depth-arch", choices=["glpn", "dpt"], default="glpn", help="--random-init depth model")
    den = ap.add_mutually_exclusive_group(required=True)
    den.add_argument("--denoiser", help="your TorchScript concat-conditioned denoiser")
    den.add_argument("--make-tiny-denoiser", action="store_true", help="a small random one (plumbing only)")
    ap.add_argument("--encoder", help="optional TorchScript encoder: image in [-1,1] -> latent mean")
    ap.add_argument("--latent-scale", type=float, default=1.0, help="z0 = encoder(x) * latent_scale")
    ap.add_argument("--class-embeddings", help="segmentation: safetensors with tensor `embeddings` [K,D]")
    ap.add_argument("--depth-min", type=float, help="depth: metres mapped to -1 in the condition")
    ap.add_argument("--depth-max", type=float, help="depth: metres mapped to +1 in the condition")
    ap.add_argument("--resolution", type=int, help="side of the diffusion view (tiny denoiser: min(crop, 64))")
    ap.add_argument("--channels", type=int, default=3, choices=[1, 3], help="channels of the diffusion view")
    ap.add_argument("--crop", type=int, help="center crop (default: the processor's size, else 512)")
    ap.add_argument("--resize", type=int, help="shorter side before the crop (default: the crop)")
    ap.add_argument("--mean", type=float, nargs=3, help="default: the processor's, else ImageNet's")
    ap.add_argument("--std", type=float, nargs=3)
    ap.add_argument("--schedule", default="linear", choices=["linear", "scaled_linear"])
    ap.add_argument("--beta-start", type=float, default=1e-4)
    ap.add_argument("--beta-end", type=float, default=0.02)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--name", help="bundle name (default from the model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    task = "segmentation" if args.segformer else "depth"
    if task == "depth" and (args.depth_min is None or args.depth_max is None or args.depth_min >= args.depth_max):
        ap.error("--depth needs --depth-min < --depth-max: the range your denoiser's condition was normalised from")
    if args.denoiser and not args.resolution:
        ap.error("--denoiser needs --resolution: the side of the view your denoiser (or encoder) was trained on")
    if args.denoiser and task == "segmentation" and not args.class_embeddings:
        ap.error("--segformer with --denoiser needs --class-embeddings (the table the denoiser was trained with)")
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    out = lambda f: os.path.join(args.out, f)

    # Task model, preprocessing.
    model, processor = load_task_model(args)
    size = getattr(processor, "size", None) or {}
    side = [size.get(k) if isinstance(size, dict) else getattr(size, k, None) for k in ("height", "shortest_edge")]
    args.crop = args.crop or next((int(s) for s in side if s), 512)
    resize = args.resize or args.crop
    if args.crop > resize:
        ap.error(f"--crop {args.crop} is larger than --resize {resize}")
    if args.crop % 32:
        print(f"  note: crop {args.crop} is not a multiple of 32; most of these models expect one")
    if processor is not None and not getattr(processor, "do_normalize", False):
        mean, std = [0.0] * 3, [1.0] * 3  # GLPN: pixels in [0, 1], no normalisation
    else:
        mean = list(getattr(processor, "image_mean", None) or IMAGENET_MEAN)
        std = list(getattr(processor, "image_std", None) or IMAGENET_STD)
    mean, std = args.mean or mean, args.std or std
    k = model.config.num_labels if task == "segmentation" else 1
    if task == "segmentation" and k > 255:
        sys.exit(f"export_dense_bundle: {k} classes; dtta writes 8-bit masks (at most 255 classes)")
    head, norm = head_and_norm(model, k)
    scripted_bns = script_batchnorms(model)
    model = tensor_forward(model, task)

    # Trace at the crop (batch 2), compare with eager at batch 2 and 1, save, check names.
    x = torch.randn(2, 3, args.crop, args.crop)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x, strict=False, check_trace=False)
        for xb in (x, x[:1]):
            eager, got = model(xb), traced(xb)
            if eager.shape != got.shape:
                sys.exit(f"export_dense_bundle: traced output {tuple(got.shape)} != eager {tuple(eager.shape)}")
            print(f"  classifier.pt: traced vs eager at batch {xb.shape[0]}: output {tuple(got.shape)}, "
                  f"max abs diff {(eager - got).abs().max().item():.3g}")
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    for w in caught:  # show the others
        if w not in tracer:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"  ({len(tracer)} tracer warnings; the output was checked at two batch sizes, and dtta always "
          "feeds the crop size)")
    traced.save(out("classifier.pt"))
    classifier = torch.jit.load(out("classifier.pt"))
    names = dict(classifier.named_parameters())
    missing = [n for n in head + norm if n not in names]
    if missing:
        sys.exit(f"export_dense_bundle: not parameters of the traced module: {missing}")
    print(f"  classifier.pt: {sum(p.numel() for p in names.values()) / 1e6:.2f}M parameters; head = {head}; "
          f"norm = {len(norm)} tensors ({', '.join(norm[:4])}, ...), all found in the traced module; "
          f"{scripted_bns} BatchNorm layer(s) scripted (train mode uses batch statistics)")

    # Diffusion side: embeddings, encoder, denoiser.
    embeddings, dc = None, 1
    if task == "segmentation":
        if args.class_embeddings:
            from safetensors.torch import load_file

            embeddings = load_file(args.class_embeddings).get("embeddings")
            if embeddings is None or embeddings.dim() != 2 or embeddings.shape[0] != k:
                sys.exit(f"export_dense_bundle: {args.class_embeddings} needs a tensor `embeddings` [{k}, D]")
            shutil.copyfile(args.class_embeddings, out("class_embeddings.safetensors"))
        else:
            print("WARNING: random class embeddings [K, 16] (plumbing only)", file=sys.stderr)
            embeddings = torch.randn(k, 16)
            save_safetensors({"embeddings": embeddings}, out("class_embeddings.safetensors"))
        embeddings = embeddings.float()
        dc = embeddings.shape[1]
    res = args.resolution or min(args.crop, 64)
    encoder = None
    if args.encoder:
        shutil.copyfile(args.encoder, out("encoder.pt"))
        encoder = torch.jit.load(out("encoder.pt")).eval()
    with torch.no_grad():
        view = torch.zeros(2, args.channels, res, res)
        z0 = encoder(view) * args.latent_scale if encoder is not None else view
    if args.make_tiny_denoiser:
        print("WARNING: random tiny denoiser: this bundle is for checking the plumbing only", file=sys.stderr)
        torch.jit.script(TinyConcatDenoiser(z0.shape[1], dc).eval()).save(out("denoiser.pt"))
    else:
        shutil.copyfile(args.denoiser, out("denoiser.pt"))
    denoiser = torch.jit.load(out("denoiser.pt")).eval()

    # One forward of everything on a zero batch, as dtta's load check does; then one step's
    # backward on a random image (a zero image gives most weights no gradient).
    depth_range = (args.depth_min, args.depth_max)
    c, t = z0.shape[1], torch.zeros(2, dtype=torch.long)

    def step(image):
        pred = classifier(image)
        assert pred.dim() == 4 and pred.shape[:2] == (2, k), f"classifier output {tuple(pred.shape)}, want [2, {k}, h, w]"
        cond = condition_map(pred, task, z0.shape[2:], embeddings, depth_range)
        return pred, cond, denoiser(z0, t, cond)

    with torch.no_grad():
        pred, cond, eps = step(torch.zeros(2, 3, args.crop, args.crop))
    if eps.shape[0] != 2 or eps.shape[1] not in (c, 2 * c) or eps.shape[2:] != z0.shape[2:]:
        sys.exit(f"export_dense_bundle: denoiser returns {tuple(eps.shape)} for x_t {tuple(z0.shape)} "
                 f"and cond {tuple(cond.shape)}; want [2, {c} or {2 * c}, {z0.shape[2]}, {z0.shape[3]}]")
    step(torch.randn(2, 3, args.crop, args.crop))[2][:, :c].pow(2).mean().backward()
    with_grad = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in names.values())
    print(f"  checked: classifier 3x{args.crop}x{args.crop} -> {tuple(pred.shape[1:])}; z0 {tuple(z0.shape[1:])}; "
          f"cond {tuple(cond.shape[1:])}; denoiser -> {tuple(eps.shape[1:])}; "
          f"{with_grad}/{len(names)} classifier tensors get a gradient through the denoiser")

    # bundle.toml.
    name = args.name or ("random-" if args.random_init else "") + os.path.basename(
        (args.segformer or args.depth).rstrip("/")) + ("-depth" if args.random_init and task == "depth" else "")
    labels = [model.config.id2label.get(i, "") for i in range(k)] if task == "segmentation" else []
    labels = labels if all(labels) and labels != [f"LABEL_{i}" for i in range(k)] else []
    random = [w for w, r in (("task model", args.random_init), ("denoiser", args.make_tiny_denoiser)) if r]
    cond_doc = (f'cond = sum_k softmax(logits)_k E_k; E is {list(embeddings.shape)} (class_embeddings).'
                if task == "segmentation" else
                "cond = 2 * (d - depth_min) / (depth_max - depth_min) - 1, d the depth in metres.")
    lines = [
        f"# Written by tools/export_dense_bundle.py: {' '.join(sys.argv[1:])}",
        f"# RANDOM WEIGHTS ({', '.join(random)}): for checking the plumbing only." if random else
        "# The denoiser was supplied by the user (the paper's dense diffusion models are not public).",
        f'name = "{name}"',
        f'task = "{task}"',
    ]
    if labels:
        lines.append(f"class_names = {toml_list(labels)}")
    shape = "[B,K,H/4,W/4] logits (SegFormer)" if task == "segmentation" else "[B,1,H,W] depth in metres"
    lines += [
        "", "[classifier]", 'file = "classifier.pt"',
        f"# [B,3,{args.crop},{args.crop}] -> {shape}; dtta upsamples it bilinearly to the crop.",
        f"num_classes = {k}",
        "# The last conv; Diffusion-TTA never adapts it.", f"head = {toml_list(head)}",
        "# Affine parameters of the LayerNorm/BatchNorm layers (TENT, adapt = \"norm\").",
        f"norm = {toml_list(norm)}",
        "", "[classifier.preprocess]", "channels = 3", f"resize = {resize}", f"crop = {args.crop}",
        f"mean = {toml_list(mean)}", f"std = {toml_list(std)}",
        "", "[diffusion]", 'denoiser = "denoiser.pt"',
        f"# forward(x_t [N,{c},{z0.shape[2]},{z0.shape[3]}], t [N] int64, cond [N,{dc},{z0.shape[2]},"
        f"{z0.shape[3]}]) -> eps; cond is concatenated to x_t.",
        'condition = "concat"', f"# {cond_doc} Resized bilinearly to {z0.shape[2]}x{z0.shape[3]}.",
    ]
    if task == "segmentation":
        lines.append('class_embeddings = "class_embeddings.safetensors"')
    else:
        lines += [f"depth_min = {args.depth_min!r}", f"depth_max = {args.depth_max!r}"]
    if encoder is not None:
        lines += [f"# z0 = encoder(view) * latent_scale: {tuple(z0.shape[1:])}.",
                  'encoder = "encoder.pt"', f"latent_scale = {args.latent_scale!r}"]
    where = "the encoder's input" if encoder is not None else "pixel space"
    lines += [
        f"# The diffusion view ({where}): the crop resized to {res}x{res} (bilinear, antialias) in [-1, 1].",
        f"channels = {args.channels}", f"resolution = {res}",
        "", "[diffusion.schedule]", f'kind = "{args.schedule}"', f"beta_start = {args.beta_start!r}",
        f"beta_end = {args.beta_end!r}", f"steps = {args.steps}", "",
    ]
    with open(out("bundle.toml"), "w") as f:
        f.write("\n".join(lines))
    print(f"export_dense_bundle: wrote {args.out} (task = {task}, {k} classes, crop {args.crop}, "
          f"diffusion view {args.channels}x{res}x{res}, latent {tuple(z0.shape[1:])}, cond {dc} channels)")
    if random:
        print(f"WARNING: random weights for the {', '.join(random)}: this bundle checks the plumbing only; "
              "its predictions mean nothing", file=sys.stderr)


if __name__ == "__main__":
    main()
