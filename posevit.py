"""The pose-aware vision encoder f_b of PoseLlava (§3.1, App. A) and its weights from HMR2.0.

`PoseViT` is a plain ViT without a class token, the shape of HMR2.0's ViT-H backbone (a ViTPose
network), with the same parameter names. The tiny and smol presets build a small one that
train_sft.py's stage 0 pretrains on pose estimation; the llava-1.5-7b preset loads HMR2.0's
backbone into a ViT-H (`load_hmr2_backbone`) from the 4D-Humans checkpoint file, read without
importing any class the checkpoint names (`load_checkpoint_state_dict`). model.py puts it beside
the CLIP tower, each with its own projector (Eq. 11).

Shapes: B batch, L visual tokens (the patch grid), dim the width.
"""
from __future__ import annotations

import os
import pickle
import types

import torch
import torch.nn as nn
import torch.nn.functional as F


class PoseViTBlock(nn.Module):
    """Pre-norm transformer block; parameter names follow ViTPose / HMR2.0's backbone."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):  # (B, L, C)
        B, L, C = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, L, C/heads)
        x = x + self.attn.proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


def crop_to_aspect(pixel_values: torch.Tensor, size: tuple) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, h, w) for size = (h, w): the centred crop with the aspect ratio h : w,
    resized (bilinear, antialiased). Never squashes: a square 336 x 336 crop becomes its centre
    336 x 252 region scaled to 256 x 192, as HMR2.0 feeds its ViT the centre 192 columns of a
    256 x 256 crop."""
    H, W = pixel_values.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return pixel_values
    x = pixel_values
    if H * w > W * h:  # taller than h : w -> keep the centre rows
        Hc = round(W * h / w)
        x = x[..., (H - Hc) // 2:(H - Hc) // 2 + Hc, :]
    elif H * w < W * h:  # wider -> keep the centre columns
        Wc = round(H * w / h)
        x = x[..., (W - Wc) // 2:(W - Wc) // 2 + Wc]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


class PoseViT(nn.Module):
    """A plain ViT without a class token, as HMR2.0's ViT-H backbone (a ViTPose network); the
    parameter names are that backbone's, so `load_hmr2_backbone` only strips their prefix.

    Args (from `config.pose_vision_config`): image_size (H, W), patch_size, dim, depth, heads,
    mlp_ratio, patch_padding (HMR2.0: 2, so 256 x 192 gives a 16 x 12 token grid), conv_stem (channels
    of an optional convolutional stem; HMR2.0: none).
    Input: (B, 3, H', W') normalised images of any size (`crop_to_aspect` fits them); output:
    (B, L, dim) patch tokens, L = grid[0] * grid[1], row-major.
    """

    def __init__(self, image_size=(64, 64), patch_size=16, dim=128, depth=4, heads=4, mlp_ratio=4.0,
                 patch_padding=0, conv_stem=()):
        super().__init__()
        self.image_size = tuple(image_size)
        self.grid = tuple((s + 2 * patch_padding - patch_size) // patch_size + 1 for s in self.image_size)
        self.patch_embed = nn.Module()
        # Optional convolutional stem (ours, the small presets; Xiao et al. 2021, "Early convolutions
        # help transformers see better"): each entry a 3x3 stride-2 conv + GroupNorm + GELU, then the
        # patch projection covers the remaining patch_size / 2^len(conv_stem) pixels. Same token grid.
        k = patch_size // 2 ** len(conv_stem)
        if conv_stem and (k * 2 ** len(conv_stem) != patch_size or patch_padding):
            raise ValueError(f"PoseViT: conv_stem {tuple(conv_stem)} needs patch_size divisible by "
                             f"{2 ** len(conv_stem)} and no patch_padding (got {patch_size}, {patch_padding})")
        layers, c = [], 3
        for ch in conv_stem:
            layers += [nn.Conv2d(c, ch, 3, 2, 1), nn.GroupNorm(8, ch), nn.GELU()]
            c = ch
        if layers:
            self.patch_embed.stem = nn.Sequential(*layers)
        self.patch_embed.proj = nn.Conv2d(c, dim, k, k, padding=patch_padding)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], dim) * 0.02)
        self.blocks = nn.ModuleList(PoseViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.last_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dim = dim

    def forward(self, pixel_values):  # (B, 3, H', W') -> (B, L, dim)
        x = crop_to_aspect(pixel_values, self.image_size).to(self.pos_embed.dtype)  # (B, 3, H, W)
        if hasattr(self.patch_embed, "stem"):
            x = self.patch_embed.stem(x)  # (B, C', H / 2^s, W / 2^s)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, L, dim)
        for blk in self.blocks:
            x = blk(x)
        return self.last_norm(x)


# ---- HMR2.0's checkpoint -> PoseViT (the 7B preset's f_b) -----------------------------------

HMR2_SOURCE = ("4D-Humans (https://github.com/shubham-goel/4D-Humans): its download_models() fetches "
               "hmr2_data.tar.gz, whose logs/train/multiruns/hmr2/0/checkpoints/epoch=35-step=1000000.ckpt "
               "is the HMR2.0 checkpoint")
VIT_H = dict(image_size=(256, 192), patch_size=16, dim=1280, depth=32, heads=16, mlp_ratio=4.0, patch_padding=2)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # HMR2.0's input normalisation


class _Opaque(dict):
    """Stands in for any class a checkpoint names that `load_checkpoint_state_dict` does not allow
    (a Lightning checkpoint's hyper-parameters: a yacs CfgNode, ...): keeps what the pickle hands it,
    imports and runs nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.opaque_args = args

    def __setstate__(self, state):
        self.opaque_state = state

    def append(self, item):
        self.setdefault("_items", []).append(item)

    def extend(self, items):
        self.setdefault("_items", []).extend(items)


class _CheckpointUnpickler(pickle.Unpickler):
    """Resolves torch's tensor rebuilders, torch dtypes/sizes and plain containers; every other
    global becomes an `_Opaque` subclass, never imported (torch.load's own loader handles storages)."""

    SAFE = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
            ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
            ("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
            ("builtins", "slice"), ("builtins", "complex")}

    def find_class(self, module, name):
        if (module, name) in self.SAFE or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        return type(f"Opaque[{module}.{name}]", (_Opaque,), {})


def load_checkpoint_state_dict(path: str, flag: str = "--hmr2_ckpt", source: str = HMR2_SOURCE) -> dict:
    """The `state_dict` of a Lightning `.ckpt` (or a plain torch state dict), read memory-mapped and
    without importing the classes the file names (Lightning, yacs, ...): see `_CheckpointUnpickler`."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file; it comes from {source}")
    safe = types.SimpleNamespace(__name__="pose_rft_checkpoint_pickle", Unpickler=_CheckpointUnpickler,
                                 load=lambda f, **kw: _CheckpointUnpickler(f, **kw).load())
    try:
        ckpt = torch.load(path, map_location="cpu", pickle_module=safe, weights_only=False, mmap=True)
    except RuntimeError:  # an old (non-zip) torch file cannot be memory-mapped
        ckpt = torch.load(path, map_location="cpu", pickle_module=safe, weights_only=False)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{flag} {path}: expected a Lightning checkpoint with a 'state_dict' of tensors "
                         f"(top-level keys: {sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__})")
    return sd


def map_hmr2_backbone(state_dict: dict, vit: PoseViT, where: str = "HMR2.0 checkpoint") -> dict:
    """HMR2.0 state dict -> `vit`'s state dict.

    HMR2.0 (4D-Humans `hmr2/models/backbones/vit.py`) names its ViT's parameters
    `backbone.patch_embed.proj`, `backbone.pos_embed`, `backbone.blocks.{i}.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}`, `backbone.last_norm`: PoseViT's names behind a prefix.
    Its `pos_embed` (1, 1 + L, C) keeps a class-token slot that it adds to every patch token
    (`x + pos_embed[:, 1:] + pos_embed[:, :1]`); it is folded into our (1, L, C). The other heads
    of the checkpoint (`smpl_head.*`, `discriminator.*`, ...) are not ours and are left out.

    Raises:
        KeyError: no `backbone.*` keys, or backbone keys missing or unknown to PoseViT (all named).
        ValueError: a shape that does not match this PoseViT's configuration.
    """
    prefix = "backbone."
    bb = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not bb:
        heads = sorted({k.split(".")[0] for k in state_dict})
        raise KeyError(f"{where}: no '{prefix}*' keys (found prefixes {heads[:10]}); expected HMR2.0's "
                       f"ViT backbone, from {HMR2_SOURCE}")
    ours = vit.state_dict()
    missing, unknown = sorted(set(ours) - set(bb)), sorted(set(bb) - set(ours))
    if missing or unknown:
        raise KeyError(f"{where}: backbone keys do not match PoseViT(depth={len(vit.blocks)}): "
                       f"missing {[prefix + k for k in missing[:8]]}{' ...' if len(missing) > 8 else ''}, "
                       f"unknown {[prefix + k for k in unknown[:8]]}{' ...' if len(unknown) > 8 else ''}")
    out = {}
    for k, v in bb.items():
        want = tuple(ours[k].shape)
        if k == "pos_embed":  # (1, 1 + L, C) -> (1, L, C): the class slot is added to every token
            if v.dim() != 3 or v.shape[1] != want[1] + 1:
                raise ValueError(f"{where}: {prefix}pos_embed has shape {tuple(v.shape)}, expected "
                                 f"(1, {want[1] + 1}, {want[2]}) (a class slot + a {vit.grid[0]}x{vit.grid[1]} grid)")
            v = v[:, 1:] + v[:, :1]
        if tuple(v.shape) != want:
            raise ValueError(f"{where}: {prefix}{k} has shape {tuple(v.shape)} but this PoseViT expects {want} "
                             f"(dim {vit.dim}, grid {vit.grid}); HMR2.0's ViT-H is {VIT_H}")
        out[k] = v.to(ours[k].dtype)
    return out


def load_hmr2_backbone(vit: PoseViT, ckpt_path: str) -> None:
    """Load HMR2.0's ViT backbone from its checkpoint file into `vit` (every parameter, strictly)."""
    vit.load_state_dict(map_hmr2_backbone(load_checkpoint_state_dict(ckpt_path), vit, ckpt_path), strict=True)
