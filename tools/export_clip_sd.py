"""Exports an open-vocabulary bundle: a CLIP zero-shot classifier adapted with Stable
Diffusion conditioned on class text (the reference's second classification setting;
mihirp1998/Diffusion-TTA clip_classifier.py, build.py).

Usage (real checkpoints, downloaded on your own machine):
    python tools/export_clip_sd.py OUT_DIR --clip PATH/clip-vit-base-patch16 \
        --sd PATH/stable-diffusion-v1-4 --classes names.txt [--template "a photo of a {}."]
Vocabulary switch (the text part only, beside the same image tower and UNet):
    python tools/export_clip_sd.py OUT_DIR --clip ... --sd ... --classes other.txt --text-only
Checks with no downloads (random weights at the libraries' own configs):
    python tools/export_clip_sd.py OUT_DIR --clip random:ViT-B/16 --sd random:sd1 --classes names.txt
    python tools/export_clip_sd.py OUT_DIR --clip random:tiny --sd random:tiny --classes names.txt

--clip: a Hugging Face `transformers` CLIP checkpoint folder (CLIPModel + its tokenizer),
or random:ViT-B/32 | random:ViT-B/16 | random:tiny. --sd: a `diffusers` Stable Diffusion
1.x folder (unet/, vae/, text_encoder/, tokenizer/), or random:sd1 | random:tiny.

What it writes (README, "Open vocabulary"):
- classifier.pt: the CLIP image tower traced with its parameter names, then the
  projection, L2 normalisation and a fixed linear head `head.weight` = the L2-normalised
  text features of each class (the mean over templates, normalised again), logits
  100 x head(features). ImageNet mean/std, resize and crop 224, as the reference.
- denoiser.pt: forward(z_t [N,4,64,64], t [N], cond [N,77,D]) -> eps, the UNet.
- encoder.pt: image in [-1,1] at 512 -> the VAE posterior mean; latent_scale 0.18215.
- class_embeddings.safetensors: `embeddings` [K,77,D], the SD text encoder's last
  hidden state for the first template per class, padded to 77 tokens.
- bundle.toml: class names, templates, the scaled-linear schedule (0.00085 to 0.012,
  1,000 steps), the head's and the LayerNorms' parameter names.
Each traced module is compared with its eager self on one input; the largest difference
is printed.

Random weights need a tokenizer, which ships with a checkpoint and cannot be downloaded
here: random:* uses a stand-in (byte values as token ids between CLIP's start and end
tokens). It exercises the shapes and the arithmetic, never the meaning of the text.
"""
import argparse
import os
import tomllib
import warnings

import torch
from safetensors.torch import save_file
from torch import nn

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
LATENT_SCALE = 0.18215
TOKENS = 77
BOS, EOS = 49406, 49407


class StandInTokenizer:
    """Byte values as token ids between CLIP's start and end tokens, end-padded to 77."""

    def __call__(self, texts):
        ids = []
        for text in texts:
            body = [b + 1 for b in text.encode("utf-8")][: TOKENS - 2]
            row = [BOS] + body + [EOS]
            ids.append(row + [EOS] * (TOKENS - len(row)))
        ids = torch.tensor(ids)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(ids.tolist()):
            mask[i, : row.index(EOS) + 1] = 1
        return ids, mask


class HfTokenizer:
    def __init__(self, path):
        from transformers import CLIPTokenizer
        self.tok = CLIPTokenizer.from_pretrained(path)

    def __call__(self, texts):
        t = self.tok(texts, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt")
        return t["input_ids"], t["attention_mask"]


def clip_model(spec):
    from transformers import CLIPConfig, CLIPModel
    if not spec.startswith("random:"):
        return CLIPModel.from_pretrained(spec).eval(), HfTokenizer(spec)
    kind = spec.split(":", 1)[1]
    if kind == "tiny":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)
    elif kind in ("ViT-B/32", "ViT-B/16"):
        # OpenAI's ViT-B configs (transformers' CLIPConfig defaults are ViT-B/32's).
        config = CLIPConfig(vision_config=dict(patch_size=int(kind[-2:])), projection_dim=512)
    else:
        raise SystemExit(f"--clip {spec}: random:ViT-B/32, random:ViT-B/16 or random:tiny")
    torch.manual_seed(0)
    return CLIPModel(config).eval(), StandInTokenizer()


def sd_models(spec):
    """(unet, vae, text encoder, tokenizer, latent side)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    if not spec.startswith("random:"):
        unet = UNet2DConditionModel.from_pretrained(spec, subfolder="unet").eval()
        vae = AutoencoderKL.from_pretrained(spec, subfolder="vae").eval()
        text = CLIPTextModel.from_pretrained(spec, subfolder="text_encoder").eval()
        return unet, vae, text, HfTokenizer(os.path.join(spec, "tokenizer")), unet.config.sample_size
    kind = spec.split(":", 1)[1]
    torch.manual_seed(1)
    if kind == "sd1":
        # Stable Diffusion 1.x's published UNet, VAE and text encoder configs.
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=TOKENS))
        side = 64
    elif kind == "tiny":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
            block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=TOKENS))
        side = 4
    else:
        raise SystemExit(f"--sd {spec}: random:sd1 or random:tiny")
    return unet.eval(), vae.eval(), text.eval(), StandInTokenizer(), side


class ClipClassifier(nn.Module):
    """Image tower + projection, L2-normalised, then 100 x a fixed text head."""

    def __init__(self, model, head):
        super().__init__()
        self.vision = model.vision_model
        self.proj = model.visual_projection
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(head)

    def forward(self, x):
        features = self.proj(self.vision(pixel_values=x, return_dict=False)[1])
        return 100.0 * self.head(features / features.norm(dim=-1, keepdim=True))


class Denoiser(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, cond):
        return self.unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]


class Encoder(nn.Module):
    """The VAE's posterior mean (what the reference encodes with)."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, x):
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]


@torch.no_grad()
def text_head(model, tokenizer, names, templates):
    """The L2-normalised mean over templates of the L2-normalised text features: [K,P]."""
    rows = []
    for name in names:
        ids, mask = tokenizer([t.format(name) for t in templates])
        f = model.get_text_features(input_ids=ids, attention_mask=mask)
        f = f if torch.is_tensor(f) else f.pooler_output
        f = f / f.norm(dim=-1, keepdim=True)
        m = f.mean(0)
        rows.append(m / m.norm())
    return torch.stack(rows)


@torch.no_grad()
def sd_embeddings(text, tokenizer, names, template):
    ids, _ = tokenizer([template.format(n) for n in names])
    return text(input_ids=ids, return_dict=False)[0].float().contiguous()


def trace(module, inputs, path):
    """Traces, saves, and prints the largest traced-against-eager difference."""
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs, check_trace=False)
        eager = module(*inputs)
        diff = (traced(*inputs) - eager).abs().max().item()
    traced.save(path)
    print(f"{os.path.basename(path)}: traced against eager, max |difference| {diff:.3e}, "
          f"{sum(p.numel() for p in module.parameters()):,} parameters")
    return traced


def write_toml(out, names, templates, head_dim, norm, latent_side, resolution, crop, cond_dim):
    q = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    lines = [
        "# Open-vocabulary bundle (tools/export_clip_sd.py): CLIP zero-shot classifier, Stable Diffusion.",
        f'name = "clip-sd"',
        f"class_names = [{', '.join(q(n) for n in names)}]",
        f"prompt_templates = [{', '.join(q(t) for t in templates)}]",
        "",
        "[classifier]",
        'file = "classifier.pt"',
        f"num_classes = {len(names)}",
        'head = ["head.weight"]',
        f"norm = [{', '.join(q(n) for n in norm)}]",
        "",
        "[classifier.preprocess]",
        "channels = 3",
        f"resize = {crop}",
        f"crop = {crop}",
        f"mean = {IMAGENET_MEAN}",
        f"std = {IMAGENET_STD}",
        "",
        "[diffusion]",
        'denoiser = "denoiser.pt"',
        'class_embeddings = "class_embeddings.safetensors"',
        'encoder = "encoder.pt"',
        f"latent_scale = {LATENT_SCALE}",
        "channels = 3",
        f"resolution = {resolution}",
        "",
        "[diffusion.schedule]",
        'kind = "scaled_linear"',
        "beta_start = 0.00085",
        "beta_end = 0.012",
        "steps = 1000",
    ]
    with open(os.path.join(out, "bundle.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"bundle.toml: {len(names)} classes, {len(templates)} template(s), condition [K,{TOKENS},{cond_dim}]")


def main():
    # diffusers' shape asserts become trace constants: right for the traced shapes.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--clip", required=True)
    ap.add_argument("--sd", required=True)
    ap.add_argument("--classes", required=True, help="a text file, one class name per line")
    ap.add_argument("--template", action="append", help="prompt template(s) with {} (default: 'a photo of a {}.')")
    ap.add_argument("--text-only", action="store_true",
                    help="a new vocabulary: rewrite the head, the class embeddings and bundle.toml only")
    args = ap.parse_args()
    names = [l.strip() for l in open(args.classes, encoding="utf-8") if l.strip()]
    templates = args.template or ["a photo of a {}."]
    os.makedirs(args.out, exist_ok=True)
    clip, clip_tok = clip_model(args.clip)
    unet, vae, text, sd_tok, latent_side = sd_models(args.sd)
    head = text_head(clip, clip_tok, names, templates)
    classifier = ClipClassifier(clip, head).eval()
    crop = clip.config.vision_config.image_size
    resolution = latent_side * 8
    cond_dim = text.config.hidden_size
    norm = [n for n, m in classifier.named_modules() if isinstance(m, nn.LayerNorm) for n in (n + ".weight", n + ".bias")]
    x = torch.rand(2, 3, crop, crop)
    if args.text_only:
        # The same traced image tower with a new head: load, replace head.weight, save.
        traced = torch.jit.load(os.path.join(args.out, "classifier.pt"))
        before = tomllib.load(open(os.path.join(args.out, "bundle.toml"), "rb"))["classifier"]["num_classes"]
        traced.head.weight = nn.Parameter(head.clone())  # any class count: the graph takes the tensor
        traced.save(os.path.join(args.out, "classifier.pt"))
        print(f"classifier.pt: head replaced ({before} -> {len(names)} classes); image tower unchanged")
    else:
        trace(classifier, (x,), os.path.join(args.out, "classifier.pt"))
        z = torch.randn(2, 4, latent_side, latent_side)
        t = torch.tensor([10, 500])
        cond = torch.randn(2, TOKENS, cond_dim)
        trace(Denoiser(unet), (z, t, cond), os.path.join(args.out, "denoiser.pt"))
        trace(Encoder(vae), (torch.rand(1, 3, resolution, resolution) * 2 - 1,), os.path.join(args.out, "encoder.pt"))
    E = sd_embeddings(text, sd_tok, names, templates[0])
    save_file({"embeddings": E}, os.path.join(args.out, "class_embeddings.safetensors"))
    print(f"class_embeddings.safetensors: {list(E.shape)}")
    write_toml(args.out, names, templates, head.shape[1], norm, latent_side, resolution, crop, cond_dim)


if __name__ == "__main__":
    main()
