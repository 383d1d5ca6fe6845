"""vqgan.py: the VQGAN of aMUSEd, which turns images into grids of codebook ids and back.

aMUSEd (arXiv 2401.01808) reuses open-muse's VQGAN, a taming-transformers style convolutional autoencoder
(Esser et al. 2021) with a codebook of 8192 vectors of width 64. Each 16 x 16 pixel patch becomes one id, so
a 256 or 512 px image is a 16 x 16 or 32 x 32 grid of ids. Pixels live in [0, 1], not [-1, 1].

Matches diffusers' `VQModel` (models/autoencoders/vq_model.py; Encoder, Decoder and VectorQuantizer in
vae.py; blocks in unet_2d_blocks.py, resnet.py, downsampling.py, upsampling.py) with the amused
`vqvae/config.json`, numerically and key for key: our state-dict keys are the reference's, so a hub
`vqvae/diffusion_pytorch_model.safetensors` loads with strict=True and no renaming (tests/test_vqgan.py).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VQConfig:
    # Field names are the diffusers `vqvae/config.json` keys, so config_from_hub is a plain copy.
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]  # encoder widths per level; the decoder uses them reversed
    layers_per_block: int  # res-blocks per encoder level; decoder levels have one more
    latent_channels: int  # width of the latents and of the codebook vectors
    num_vq_embeddings: int  # codebook size
    norm_num_groups: int
    force_upcast: bool  # an fp16 model computes in fp32 (see VQModel.upcast)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)  # pixels per token along each side


# Both amused-256 and amused-512 ship this VQ (reference doc §1.3; hub vqvae/config.json).
PRESETS = {
    "amused": VQConfig(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 512, 768),
        layers_per_block=2,
        latent_channels=64,
        num_vq_embeddings=8192,
        norm_num_groups=32,
        force_upcast=True,
    ),
}

# Hub config values this file hard-codes: any other value is an architecture we do not implement.
FIXED_HUB_CONFIG = {
    "act_fn": "silu",
    "norm_type": "group",
    "mid_block_add_attention": False,
    "lookup_from_codebook": True,  # decode takes ids (codebook lookup), not latents
}
# Hub config keys with no effect on this model: the resolution the VQ was trained at, and a latent scale that
# only latent-diffusion pipelines use. Keys starting with "_" are diffusers bookkeeping and are skipped too.
UNUSED_HUB_KEYS = {"sample_size", "scaling_factor"}
# Every key of a diffusers vqvae/config.json that this file reads or checks (convert_weights.hub_config decides
# what to do with any other). vq_embed_dim is the codebook width, null in the hub config: latent_channels.
HUB_KEYS = (frozenset(VQConfig.__dataclass_fields__) | FIXED_HUB_CONFIG.keys() | UNUSED_HUB_KEYS
            | {"down_block_types", "up_block_types", "vq_embed_dim"})

NORM_EPS = 1e-6  # matches reference: vae.py hard-codes resnet_eps=1e-6 and GroupNorm eps=1e-6 everywhere


def config_from_hub(d: dict) -> VQConfig:
    """Our config from a diffusers `vqvae/config.json` dict; ValueError naming the key for anything else."""
    fields = list(VQConfig.__dataclass_fields__)
    n_levels = len(d.get("block_out_channels", ()))
    expected = {
        **FIXED_HUB_CONFIG,
        "down_block_types": ("DownEncoderBlock2D",) * n_levels,
        "up_block_types": ("UpDecoderBlock2D",) * n_levels,
    }
    unknown = sorted(k for k in d if k not in HUB_KEYS and not k.startswith("_"))
    missing = [k for k in [*fields, *expected, "vq_embed_dim"] if k not in d]
    if unknown or missing:
        # A missing key would take diffusers' default, which for most of these is not the amused value.
        raise ValueError(f"vqvae config: unknown keys {unknown}, missing keys {missing}")
    for key, value in expected.items():
        got = tuple(d[key]) if isinstance(d[key], (list, tuple)) else d[key]
        if got != value:
            raise ValueError(f"vqvae config: {key}={d[key]!r} is not supported (only {value!r})")
    if d["vq_embed_dim"] not in (None, d["latent_channels"]):
        raise ValueError(f"vqvae config: vq_embed_dim={d['vq_embed_dim']!r} is not supported "
                         f"(only null or latent_channels={d['latent_channels']})")
    return VQConfig(**{k: tuple(d[k]) if k == "block_out_channels" else d[k] for k in fields})


def _fp32_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) computed in fp32 on fp32 copies of its weights; the module itself keeps its dtype."""
    weights = {name: t.float() for name, t in module.state_dict().items()}  # fp16 -> fp32 is exact
    return torch.func.functional_call(module, weights, (x.float(),), strict=True)


# ----------------------------------------------------------------------------------------------------
# Building blocks (diffusers names: ResnetBlock2D, Downsample2D, Upsample2D and the three 2D blocks)


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block: (GroupNorm, SiLU, conv 3x3) twice, plus a 1x1 shortcut if the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # the reference's dropout (p=0) and time-embedding projection (temb_channels=None) are not needed
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, Cin, H, W)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h  # the reference divides by output_scale_factor = 1.0, which is exact


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 conv 3x3. (uvit.py's Downsample2D and Upsample2D, named after the same diffusers
    modules, are other layers: an RMSNorm and a 2x2 conv.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        # matches reference: downsampling.py Downsample2D with padding=0 pads one zero row and column on the
        # bottom and right only (taming's asymmetric padding), not one on every side
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H + 1, W + 1)
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a conv 3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class DownEncoderBlock2D(nn.Module):
    """One encoder level: res-blocks, then a downsampler except on the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        # a one-element list because the checkpoint key is downsamplers.0.conv
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """One decoder level: res-blocks, then an upsampler except on the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None  # upsamplers.0.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """Two res-blocks at the lowest resolution. The amused config has mid_block_add_attention false, so the
    reference's attention between them is absent (its `attentions` list holds only None: no keys)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.resnets[0](x))


# ----------------------------------------------------------------------------------------------------
# Encoder, decoder, quantizer


class Encoder(nn.Module):
    """Pixels (B, 3, H, W) -> latents (B, latent_channels, H/f, W/f), f = cfg.downsample_factor."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, add_downsample=i < n - 1)
             for i in range(n)]
        )
        self.mid_block = UNetMidBlock2D(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)  # double_z=False: no variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        x = self.conv_in(x)  # (B, 128, H, W) at the amused widths
        for block in self.down_blocks:
            x = block(x)  # the last level keeps its resolution: (B, 768, H/16, W/16)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 64, H/16, W/16)


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> pixels (B, 3, h*f, w*f), unclamped."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, groups, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], groups)
        # matches reference: vae.py Decoder gives each level layers_per_block + 1 res-blocks (the encoder has one
        # fewer), and the widths run 768 -> 768, 768 -> 512, 512 -> 256, 256 -> 256, 256 -> 128
        self.up_blocks = nn.ModuleList(
            [UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, add_upsample=i < n - 1)
             for i in range(n)]
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: (B, 64, h, w)
        x = self.mid_block(self.conv_in(z))  # (B, 768, h, w)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, 16h, 16w)


class VectorQuantizer(nn.Module):
    """The codebook: latents -> ids of the nearest entries, and ids -> entries."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_vq_embeddings, cfg.latent_channels)  # (K, C)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: (B, C, h, w) -> ids (B, h, w)
        B, C, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(B * h * w, C)  # row-major over (B, h, w), like the reference
        # matches reference: vae.py VectorQuantizer takes argmin of torch.cdist (Euclidean, not squared, default
        # compute mode), so near-ties break the same way. In fp32 both casts are no-ops. For half-precision
        # models we still measure distances in fp32: CPU has no fp16/bf16 cdist kernel, and with bf16's 8-bit
        # mantissa many distances would tie.
        dist = torch.cdist(z_flat.float(), self.embedding.weight.float())  # (B*h*w, K)
        return dist.argmin(dim=1).view(B, h, w)

    def get_codebook_entry(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, h, w) -> (B, C, h, w)
        return self.embedding(ids).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# The model


class VQModel(nn.Module):
    """The aMUSEd VQGAN. Public API: encode_to_ids (images -> ids) and decode_ids (ids -> images); training a VQ
    (examples/digits.py) uses the parts: encoder + quant_conv -> latents, quantize, post_quant_conv + decoder."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.quantize = VectorQuantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def upcast(self) -> bool:
        """Whether this model computes in fp32 although its weights are fp16.

        matches reference: pipeline_amused.py and pipeline_amused_img2img.py upcast the VQ when
        `vqvae.dtype == torch.float16 and vqvae.config.force_upcast`, around both encode and decode. The amused
        decoder is known to return NaNs in fp16 (early model cards: "vqvae is producing nans in fp16"), which
        the hub config's force_upcast handles. We take it to be activations overflowing fp16's max of 65504
        (not checked on the real weights); bf16 has fp32's exponent range, and the pipelines run it natively.
        """
        return self.cfg.force_upcast and self.quant_conv.weight.dtype == torch.float16

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # The reference pipelines upcast with vqvae.float() ... vqvae.half(). We instead run on temporary fp32
        # copies of the weights: same numbers, but the module never changes dtype, not even briefly, and under
        # inference_mode its parameters do not become inference tensors.
        return _fp32_call(module, x) if self.upcast else module(x)

    @torch.no_grad()
    def encode_to_ids(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), floats in [0, 1], H and W multiples of 16 -> ids (B, H/16, W/16), long.

        Checks its input, values included: it runs once per image, where a host sync costs nothing."""
        f, c = self.cfg.downsample_factor, self.cfg.in_channels
        shape = tuple(images.shape)
        if (images.ndim != 4 or shape[1] != c or not images.is_floating_point()
                or shape[0] == 0 or shape[2] == 0 or shape[3] == 0 or shape[2] % f or shape[3] % f):
            raise ValueError(f"images must be floats of shape (B, {c}, H, W) with H and W positive multiples of "
                             f"{f}, got {images.dtype} {shape}")
        lo, hi = torch.aminmax(images)
        if not (lo >= 0 and hi <= 1):  # written so that NaN fails too
            raise ValueError(f"images must have values in [0, 1] (not [-1, 1]), got min {lo.item():.4g}, "
                             f"max {hi.item():.4g}")
        # matches reference: pipeline_amused_img2img.py casts the image to the VQ's dtype, fp32 when upcast
        images = images.to(torch.float32 if self.upcast else self.quant_conv.weight.dtype)
        latents = self._run(self.quant_conv, self._run(self.encoder, images))  # (B, 64, h, w), unquantized
        return self.quantize(latents)  # (B, h, w)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w), integers in [0, num_vq_embeddings) -> images (B, 3, 16h, 16w) clamped to [0, 1].

        The images come in the weights' dtype, except for fp16 weights with force_upcast: then fp32, as the
        reference pipelines return. Checks its input like encode_to_ids.
        """
        K = self.cfg.num_vq_embeddings
        if ids.ndim != 3 or ids.dtype not in (torch.int32, torch.int64) or 0 in ids.shape:
            raise ValueError(f"ids must be an int64 or int32 tensor of shape (B, h, w), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        lo, hi = torch.aminmax(ids)
        if lo < 0 or hi >= K:
            raise ValueError(f"ids must be in [0, {K}), the codebook size, got min {lo.item()}, max {hi.item()}")
        # matches reference: VQModel.decode(ids, force_not_quantize=True, shape=...) with lookup_from_codebook:
        # look up the entries, post_quant_conv, decoder; the pipelines then .clip(0, 1)
        z = self.quantize.get_codebook_entry(ids)  # (B, 64, h, w), exact in any dtype
        return self._run(self.decoder, self._run(self.post_quant_conv, z)).clamp(0, 1)  # (B, 3, 16h, 16w)
