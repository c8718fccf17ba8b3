"""Exports a Diffusion-TTA model bundle: ConvNeXt-Tiny + DiT-XL/2-256 + the SD VAE encoder.

Usage: python tools/export_bundle.py --out DIR
           [--classifier-ckpt PATH] [--dit-ckpt PATH] [--vae-ckpt PATH]
           [--tiny] [--device cpu|cuda] [--resize 232] [--crop 224] [--seed 0]

The three models are written out here as plain PyTorch modules (no torchvision, timm or
diffusers needed) whose state_dict keys are those of the public checkpoints, so real
weights load with strict=True:

- classifier.pt: torchvision `convnext_tiny` (features.*, classifier.0 LayerNorm2d,
  classifier.2 Linear head). A timm `convnext_tiny` state_dict (stem.*, stages.*, head.*)
  is converted to that layout on load.
  forward(x [B,3,crop,crop], ImageNet-normalised) -> logits [B,1000].
- denoiser.pt: facebookresearch/DiT `DiT_XL_2` (x_embedder, t_embedder, y_embedder,
  pos_embed, blocks.N.{attn,mlp,adaLN_modulation}, final_layer), learn_sigma: 8 output
  channels for 4 latent channels (C' = 2C). Its forward takes the condition as an
  embedding vector instead of a label: forward(x_t [N,4,32,32], t [N] int64,
  cond [N,1152]) -> [N,8,32,32], with c = t_embedder(t) + cond, so dtta can pass the
  probability-weighted mixture of label-table rows. The label table
  (y_embedder.embedding_table, [1001,1152]: 1000 classes + the CFG null class) leaves
  the module: its rows 0..999 are class_embeddings.safetensors, tensor `embeddings`.
  pos_embed is a buffer (DiT keeps it frozen), so it is not adapted.
- encoder.pt: diffusers `AutoencoderKL` encoder + quant_conv (encoder.*, quant_conv.*;
  SD's config: block_out_channels 128/256/512/512, 2 resnets per block, GroupNorm 32,
  one mid-block attention). forward(x [N,3,256,256] in [-1,1]) -> latent mean
  [N,4,32,32]; bundle.toml sets latent_scale = 0.18215. Older diffusers attention names
  (query/key/value/proj_attn) and the original ldm layout (encoder.down.N.block.M,
  first_stage_model.*) are converted on load; decoder keys are ignored.
- bundle.toml: preprocess (resize 232, crop 224, ImageNet mean/std, RGB), head =
  the final Linear's parameters, norm = every LayerNorm affine parameter, diffusion
  section (3 channels, resolution 256: the encoder's input side), DiT's schedule
  (linear 1e-4..0.02 over 1000 steps).

A checkpoint that is not given is replaced by random weights (DiT's own initialisation,
its zero-initialised layers given small noise so gradients reach the classifier from
the first step), and a warning says the bundle is for timing only.

--tiny: the same architectures with tiny widths, depths and resolutions, so the whole
bundle builds and runs on a CPU in seconds (random weights, or checkpoints of these shapes):
  classifier: ConvNeXt, dims 8/16/32/32, depths 1/1/1/1, 10 classes, RGB resize 36,
              crop 32, ImageNet mean/std;
  encoder:    VAE encoder, channels 8/16/16/16, 1 resnet per block, GroupNorm 4, mid
              attention, 4 latent channels: [N,3,64,64] -> [N,4,8,8];
  denoiser:   DiT, hidden 32, depth 2, 2 heads, patch 2, input 8x8x4 (16 tokens),
              learn_sigma (8 output channels); label table [11,32] -> embeddings [10,32].

Checkpoints: .safetensors or torch pickles holding a state_dict (optionally under
"ema", "model" or "state_dict"; a "module." prefix is stripped).
"""
import argparse
import json
import math
import os
import struct
import sys
import time
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------------------
# ConvNeXt (torchvision layout)
# ----------------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (torchvision's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: List[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Stochastic depth is the identity in eval mode; it has no parameters.
        return self.layer_scale * self.block(x) + x


class ConvNeXt(nn.Module):
    """torchvision.models.ConvNeXt with its state_dict keys (features.*, classifier.*)."""

    def __init__(self, dims: List[int], depths: List[int], num_classes: int, layer_scale: float = 1e-6):
        super().__init__()
        layers: List[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4, bias=True), LayerNorm2d(dims[0], eps=1e-6))
        ]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(dim, layer_scale) for _ in range(depth)]))
            if i + 1 < len(dims):
                layers.append(
                    nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2))
                )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def convnext_head_and_norm(model: ConvNeXt):
    """(head parameter names, LayerNorm affine parameter names) of a ConvNeXt."""
    head = ["classifier.2.weight", "classifier.2.bias"]
    norm = []
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            norm += [f"{name}.weight", f"{name}.bias"]
    return head, norm


def timm_convnext_to_torchvision(sd: dict) -> dict:
    """Renames a timm convnext state_dict (stem/stages/head) to torchvision's layout."""
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "stem":  # stem.0 conv, stem.1 LayerNorm2d
            out[f"features.0.{p[1]}.{p[2]}"] = v
        elif p[0] == "stages":
            s = int(p[1])
            if p[2] == "downsample":  # downsample.0 LayerNorm2d, downsample.1 conv
                out[f"features.{2 * s}.{p[3]}.{p[4]}"] = v
            elif p[2] == "blocks":
                b = int(p[3])
                prefix = f"features.{2 * s + 1}.{b}"
                rest = ".".join(p[4:])
                if rest == "gamma":
                    out[f"{prefix}.layer_scale"] = v.reshape(-1, 1, 1)
                else:
                    sub = {"conv_dw": "block.0", "norm": "block.2", "mlp.fc1": "block.3", "mlp.fc2": "block.5"}
                    mod, param = rest.rsplit(".", 1)
                    if mod not in sub:
                        raise KeyError(f"timm convnext key `{k}` has no torchvision counterpart")
                    out[f"{prefix}.{sub[mod]}.{param}"] = v
            else:
                raise KeyError(f"timm convnext key `{k}` has no torchvision counterpart")
        elif p[0] == "head":
            mod = {"norm": "classifier.0", "fc": "classifier.2"}.get(p[1])
            if mod is None:
                raise KeyError(f"timm convnext key `{k}` has no torchvision counterpart")
            out[f"{mod}.{p[2]}"] = v
        else:
            raise KeyError(f"timm convnext key `{k}` has no torchvision counterpart")
    return out


# ----------------------------------------------------------------------------------------
# DiT (facebookresearch/DiT layout), conditioned on an embedding vector
# ----------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: conv with stride = patch, tokens in row-major order."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's Attention (qkv with bias, proj), computed with scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(h.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb)


class LabelEmbedder(nn.Module):
    """Holds DiT's label table for loading; the exported denoiser does not use it."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # + the CFG null class


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + m[2].unsqueeze(1) * self.attn(modulate(self.norm1(x), m[0], m[1]))
        x = x + m[5].unsqueeze(1) * self.mlp(modulate(self.norm2(x), m[3], m[4]))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """facebookresearch/DiT's DiT with learn_sigma, taking `cond` (an embedding) for `y`."""

    def __init__(self, input_size: int = 32, patch: int = 2, in_channels: int = 4, dim: int = 1152,
                 depth: int = 28, heads: int = 16, num_classes: int = 1000, frequency_embedding_size: int = 256):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels  # learn_sigma
        self.patch = patch
        self.grid = input_size // patch
        self.x_embedder = PatchEmbed(in_channels, dim, patch)
        self.t_embedder = TimestepEmbedder(dim, frequency_embedding_size)
        self.y_embedder = LabelEmbedder(num_classes, dim)
        # DiT keeps pos_embed frozen (a Parameter with requires_grad=False); a buffer here,
        # under the same state_dict key, so that nothing adapts it.
        self.register_buffer("pos_embed", torch.zeros(1, self.grid * self.grid, dim))
        self.blocks = nn.ModuleList([DiTBlock(dim, heads) for _ in range(depth)])
        self.final_layer = FinalLayer(dim, patch, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialize_weights."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.pos_embed.copy_(sincos_pos_embed(self.pos_embed.shape[-1], self.grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        zero += [b.adaLN_modulation[-1] for b in self.blocks]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + cond
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        n, g, p, o = x.shape[0], self.grid, self.patch, self.out_channels
        x = x.reshape(n, g, g, p, p, o).permute(0, 5, 1, 3, 2, 4)  # 'nhwpqc->nchpwq'
        return x.reshape(n, o, g * p, g * p)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """DiT's get_2d_sincos_pos_embed (from MAE), in float64 then float32: [grid*grid, dim]."""
    g = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(g, g, indexing="xy")  # np.meshgrid(grid_w, grid_h): w first

    def one_d(d, pos):
        omega = torch.arange(d // 2, dtype=torch.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_d(dim // 2, gw), one_d(dim // 2, gh)], dim=1).float()


# ----------------------------------------------------------------------------------------
# SD VAE encoder (diffusers AutoencoderKL layout: encoder.*, quant_conv.*)
# ----------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # 1x1 shortcut only when the width changes (diffusers' use_in_shortcut).
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class Downsample2D(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(cout)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class SpatialAttention(nn.Module):
    """diffusers' Attention as the VAE mid block uses it: one head, GroupNorm, residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = self.to_q(s).unsqueeze(1), self.to_k(s).unsqueeze(1), self.to_v(s).unsqueeze(1)
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        for layer in self.to_out:
            o = layer(o)
        return o.transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock2D(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, groups), ResnetBlock2D(c, c, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, channels: List[int], layers: int, groups: int, latent: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        blocks = []
        for i, cout in enumerate(channels):
            cin = channels[max(i - 1, 0)]
            blocks.append(DownEncoderBlock2D(cin, cout, layers, groups, downsample=i + 1 < len(channels)))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock2D(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent, 3, padding=1)  # double_z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VaeEncoder(nn.Module):
    """AutoencoderKL's encode(x).latent_dist.mean: encoder, quant_conv, first half."""

    def __init__(self, channels: List[int], layers: int, groups: int, latent: int = 4):
        super().__init__()
        self.latent = latent
        self.encoder = Encoder(channels, layers, groups, latent)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))[:, : self.latent]


def vae_keys_to_diffusers(sd: dict) -> dict:
    """Keeps the encoder/quant_conv keys of a VAE or full SD checkpoint, in diffusers' names.

    Accepts diffusers (encoder.down_blocks...), older diffusers attention names
    (query/key/value/proj_attn) and the original ldm layout (encoder.down.N.block.M,
    optionally under first_stage_model.)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("first_stage_model."):
            k = k[len("first_stage_model."):]
        if not (k.startswith("encoder.") or k.startswith("quant_conv.")):
            continue
        p = k.split(".")
        if len(p) > 2 and p[1] in ("down", "mid", "norm_out"):  # ldm layout
            if p[1] == "norm_out":
                k = "encoder.conv_norm_out." + p[2]
            elif p[1] == "down" and p[3] == "block":
                name = {"nin_shortcut": "conv_shortcut"}.get(p[5], p[5])
                k = f"encoder.down_blocks.{p[2]}.resnets.{p[4]}.{name}.{p[6]}"
            elif p[1] == "down" and p[3] == "downsample":
                k = f"encoder.down_blocks.{p[2]}.downsamplers.0.conv.{p[5]}"
            elif p[1] == "mid" and p[2] in ("block_1", "block_2"):
                name = {"nin_shortcut": "conv_shortcut"}.get(p[3], p[3])
                k = f"encoder.mid_block.resnets.{int(p[2][-1]) - 1}.{name}.{p[4]}"
            elif p[1] == "mid" and p[2] == "attn_1":
                name = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[p[3]]
                k = f"encoder.mid_block.attentions.0.{name}.{p[4]}"
                if name != "group_norm" and v.dim() == 4:  # 1x1 conv -> linear
                    v = v[:, :, 0, 0]
            else:
                raise KeyError(f"VAE key `{k}` has no diffusers counterpart")
        else:
            for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")):
                if ".attentions.0." + old + "." in k:
                    k = k.replace(".attentions.0." + old + ".", ".attentions.0." + new + ".")
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------
# Checkpoints, shapes, export
# ----------------------------------------------------------------------------------------


def read_checkpoint(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("ema", "model", "state_dict"):  # DiT training checkpoints keep "ema"
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_strict(model: nn.Module, sd: dict, what: str, path: str):
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        sys.exit(f"export_bundle: {path} does not fit the {what} (strict load): {e}")
    print(f"  {what}: loaded {len(sd)} tensors from {path}")


SIZES = {
    "real": {
        "classifier": dict(dims=[96, 192, 384, 768], depths=[3, 3, 9, 3], num_classes=1000),
        "vae": dict(channels=[128, 256, 512, 512], layers=2, groups=32),
        "dit": dict(input_size=32, patch=2, dim=1152, depth=28, heads=16, num_classes=1000),
        "resize": 232, "crop": 224, "resolution": 256,
    },
    "tiny": {
        "classifier": dict(dims=[8, 16, 32, 32], depths=[1, 1, 1, 1], num_classes=10),
        "vae": dict(channels=[8, 16, 16, 16], layers=1, groups=4),
        "dit": dict(input_size=8, patch=2, dim=32, depth=2, heads=2, num_classes=10),
        "resize": 36, "crop": 32, "resolution": 64,
    },
}


def save_safetensors(tensors: dict, path: str):
    try:
        from safetensors.torch import save_file
    except ImportError:  # the format is a JSON header and raw little-endian bytes
        header, blobs, offset = {}, [], 0
        for name, t in tensors.items():
            data = t.contiguous().cpu().float().numpy().tobytes()
            header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
            blobs.append(data)
            offset += len(data)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
        return
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path)


def toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="bundle folder to write")
    ap.add_argument("--classifier-ckpt", help="torchvision or timm convnext_tiny state_dict")
    ap.add_argument("--dit-ckpt", help="DiT-XL-2-256x256.pt (facebookresearch/DiT)")
    ap.add_argument("--vae-ckpt", help="SD VAE: diffusers diffusion_pytorch_model.{safetensors,bin} or ldm .ckpt")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes for CPU tests (checkpoints must match them)")
    ap.add_argument("--device", default="cpu", help="where to build and check the models (cpu, cuda)")
    ap.add_argument("--resize", type=int, help="classifier resize of the shorter side (232; torchvision's "
                    "convnext_tiny recipe says 236)")
    ap.add_argument("--crop", type=int, help="classifier center crop (224)")
    ap.add_argument("--name", help="bundle name (default from the models)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    size = SIZES["tiny" if args.tiny else "real"]
    resize = args.resize or size["resize"]
    crop = args.crop or size["crop"]
    if crop > resize:
        ap.error(f"--crop {crop} is larger than --resize {resize}")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    print(f"export_bundle: {'tiny' if args.tiny else 'real-size'} models on {device}")

    # Built and initialised on the device (fast for 675M parameters), saved from the CPU.
    with torch.no_grad(), device:
        classifier = ConvNeXt(**size["classifier"])
        vae = VaeEncoder(**size["vae"])
        dit = DiT(**size["dit"])
    random_parts = []
    if args.classifier_ckpt:
        sd = read_checkpoint(args.classifier_ckpt)
        if any(k.startswith("stages.") for k in sd):
            sd = timm_convnext_to_torchvision(sd)
        load_strict(classifier, sd, "classifier (ConvNeXt)", args.classifier_ckpt)
    else:
        random_parts.append("classifier")
    if args.vae_ckpt:
        load_strict(vae, vae_keys_to_diffusers(read_checkpoint(args.vae_ckpt)), "VAE encoder", args.vae_ckpt)
    else:
        random_parts.append("VAE encoder")
    if args.dit_ckpt:
        load_strict(dit, read_checkpoint(args.dit_ckpt), "DiT", args.dit_ckpt)
    else:
        random_parts.append("DiT")
        # DiT zero-initialises adaLN and the output layer, which would leave the condition
        # (and so the classifier) without gradient for the first steps; small noise instead.
        with torch.no_grad():
            zeroed = [dit.final_layer.adaLN_modulation[-1], dit.final_layer.linear]
            zeroed += [b.adaLN_modulation[-1] for b in dit.blocks]
            for m in zeroed:
                m.weight.normal_(0.0, 0.02)
    if random_parts:
        print(
            f"WARNING: random weights for the {', '.join(random_parts)} (no checkpoint given): "
            "this bundle is for timing only; its predictions mean nothing",
            file=sys.stderr,
        )

    num_classes = size["classifier"]["num_classes"]
    table = dit.y_embedder.embedding_table.weight.detach()
    if table.shape[0] < num_classes:
        sys.exit(f"export_bundle: the DiT label table has {table.shape[0]} rows, fewer than {num_classes} classes")
    embeddings = table[:num_classes].float().cpu().clone()
    del dit.y_embedder  # the condition comes in as an embedding; the table leaves the module
    head, norm = convnext_head_and_norm(classifier)

    # Shape checks on the device, as dtta's probe does.
    res, side = size["resolution"], crop
    with torch.no_grad():
        for m in (classifier, vae, dit):
            m.eval()
        logits = classifier(torch.zeros(2, 3, side, side, device=device))
        z0 = vae(torch.zeros(2, 3, res, res, device=device))
        eps = dit(z0, torch.zeros(2, dtype=torch.long, device=device), embeddings[:2].to(device))
    assert logits.shape == (2, num_classes), logits.shape
    assert eps.shape == (2, 2 * z0.shape[1], *z0.shape[2:]), (eps.shape, z0.shape)

    for name, model in (("classifier.pt", classifier), ("encoder.pt", vae), ("denoiser.pt", dit)):
        t0 = time.time()
        scripted = torch.jit.script(model.cpu().eval())
        scripted.save(os.path.join(args.out, name))
        n = sum(p.numel() for p in model.parameters())
        print(f"  {name}: {n / 1e6:.1f}M parameters, scripted and saved in {time.time() - t0:.1f}s")
    save_safetensors({"embeddings": embeddings}, os.path.join(args.out, "class_embeddings.safetensors"))

    name = args.name or ("tiny-convnext-dit-vae" if args.tiny else "convnext-tiny_dit-xl-2-256")
    weights = "random weights (timing only)" if random_parts else "checkpoints"
    if random_parts and len(random_parts) < 3:
        weights = f"checkpoints, random {', '.join(random_parts)} (timing only)"
    with open(os.path.join(args.out, "bundle.toml"), "w") as f:
        f.write(f"""# Written by tools/export_bundle.py{' --tiny' if args.tiny else ''}: {weights}.
# classifier: ConvNeXt{'-Tiny' if not args.tiny else ' (tiny)'}; denoiser: DiT{'-XL/2' if not args.tiny else ' (tiny)'}
# with learned sigma (C' = 2C), conditioned on an embedding; encoder: SD VAE encoder (mean).
name = "{name}"

[classifier]
file = "classifier.pt"
num_classes = {num_classes}
# The final Linear; Diffusion-TTA never adapts it.
head = {toml_list(head)}
# Affine parameters of every LayerNorm (TENT, adapt = "norm").
norm = {toml_list(norm)}

[classifier.preprocess]
channels = 3
resize = {resize}
crop = {crop}
mean = {toml_list(IMAGENET_MEAN)}
std = {toml_list(IMAGENET_STD)}

[diffusion]
denoiser = "denoiser.pt"
class_embeddings = "class_embeddings.safetensors"
encoder = "encoder.pt"
latent_scale = 0.18215
# The encoder's input: the classifier's crop window at {res}x{res} in [-1, 1]; the latent
# is {z0.shape[1]}x{z0.shape[2]}x{z0.shape[3]}.
channels = 3
resolution = {res}

[diffusion.schedule]
kind = "linear"
beta_start = 0.0001
beta_end = 0.02
steps = 1000
""")
    print(f"export_bundle: wrote {args.out} in {time.time() - started:.1f}s "
          f"(classifier 3x{side}x{side} -> {num_classes}; encoder 3x{res}x{res} -> {tuple(z0.shape[1:])}; "
          f"denoiser -> {tuple(eps.shape[1:])}; embeddings {tuple(embeddings.shape)})")


if __name__ == "__main__":
    main()
