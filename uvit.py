"""uvit.py: the U-ViT token predictor of aMUSEd.

aMUSEd (arXiv 2401.01808, §3) is a MUSE-style masked image model: given a grid of VQ token ids, some of
them replaced by the mask id, it predicts logits over the codebook at every position. The network is a
U-ViT (Hoogeboom et al. 2023, "simple diffusion"): a convolutional stage (ConvNeXt blocks plus blocks that
cross-attend to the text), an optional 2x down/upsampling (amused-512, so that both checkpoints run their
transformer on 16x16 = 256 tokens), 22 transformer layers with adaptive norms and text cross-attention, and
the mirrored convolutional stage before a 1x1-conv MLM head. It is conditioned on
  - the CLIP penultimate hidden states, (B, 77, 768): cross-attention context;
  - the pooled, projected CLIP embedding, (B, 768), concatenated with SDXL-style micro-conditioning
    (sinusoidal features of [width, height, crop_top, crop_left, aesthetic score]): the vector that
    modulates every norm.

Matches diffusers' UVit2DModel (models/unets/uvit_2d.py) numerically; see tests/test_uvit.py. Our state-dict
keys are exactly UVit2DModel's, so hub weights and diffusers LoRA keys map by identity.

Everything that depends only on the prompt (text projection, conditioning vector, the text keys/values of
every cross-attention, every scale/shift modulation) is computed by `UViT.encode_conditions` once per prompt;
`UViT.forward(ids, conds)` then runs only the token path, once per sampling step. The forward checks shapes
only (free, and static under torch.compile); `UViT.check_ids` also checks the ids' values, for ids from outside:
reading them back would make the device wait on every sampling step.
"""
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# The order of the micro-conditioning values in `micro_conds` (B, 5); each gets micro_cond_encode_dim features.
MICRO_CONDS = ("width", "height", "crop_top", "crop_left", "aesthetic")


@dataclass(frozen=True)
class UViTConfig:
    """Field names and meanings are those of the diffusers transformer/config.json."""
    hidden_size: int  # width of the transformer layers (and of the conditioning vector)
    cond_embed_dim: int  # pooled text embedding width (CLIP projection_dim)
    micro_cond_encode_dim: int  # sinusoidal features per micro-condition
    micro_cond_embed_dim: int  # all micro-condition features: len(MICRO_CONDS) * micro_cond_encode_dim
    encoder_hidden_size: int  # CLIP hidden width: the cross-attention context before encoder_proj
    vocab_size: int  # token ids accepted: codebook + spare ids; the mask id (scheduler config) is the last
    codebook_size: int  # logits produced: one per VQ codebook entry
    in_channels: int  # token embedding width (and the MLM head's inner width)
    block_out_channels: int  # width of the convolutional stages
    num_res_blocks: int  # (ConvNeXt, cross-attention) pairs per convolutional stage
    downsample: bool  # 2x2 stride-2 conv before the transformer (amused-512 only)
    upsample: bool  # 2x2 stride-2 transposed conv after it
    block_num_heads: int  # heads of the convolutional stages' attention
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # GEGLU inner width
    layer_norm_eps: float
    sample_size: int  # side of the token grid trained on (any grid runs: UViT.forward); halved inside when downsample

    def __post_init__(self):
        # Shapes the modules below assume; a config breaking one is a checkpoint we do not know.
        checks = [
            ("micro_cond_embed_dim", self.micro_cond_embed_dim == len(MICRO_CONDS) * self.micro_cond_encode_dim,
             f"must be {len(MICRO_CONDS)} x micro_cond_encode_dim"),
            ("micro_cond_encode_dim", self.micro_cond_encode_dim % 2 == 0, "must be even (cos and sin halves)"),
            ("num_attention_heads", self.hidden_size % self.num_attention_heads == 0, "must divide hidden_size"),
            ("block_num_heads", self.block_out_channels % self.block_num_heads == 0,
             "must divide block_out_channels"),
            # diffusers' SkipFFTransformerBlock drops kv_mapper when the widths are equal; no checkpoint does.
            ("block_out_channels", self.block_out_channels != self.hidden_size, "must differ from hidden_size"),
            ("upsample", self.upsample == self.downsample, "must equal downsample (logits on the input grid)"),
            ("sample_size", not self.downsample or self.sample_size % 2 == 0, "must be even with downsample"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"UViTConfig.{key} = {getattr(self, key)} {why}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def block_head_dim(self) -> int:
        return self.block_out_channels // self.block_num_heads


# transformer/config.json of the hub checkpoints (amused/amused-256 and amused/amused-512).
PRESETS = {
    "amused-256": UViTConfig(
        hidden_size=1024,
        cond_embed_dim=768,
        micro_cond_encode_dim=256,
        micro_cond_embed_dim=1280,
        encoder_hidden_size=768,
        vocab_size=8256,
        codebook_size=8192,
        in_channels=768,
        block_out_channels=768,
        num_res_blocks=3,
        downsample=False,
        upsample=False,
        block_num_heads=12,
        num_hidden_layers=22,
        num_attention_heads=16,
        intermediate_size=2816,
        layer_norm_eps=1e-6,
        sample_size=16,
    ),
    "amused-512": UViTConfig(
        hidden_size=1024,
        cond_embed_dim=768,
        micro_cond_encode_dim=256,
        micro_cond_embed_dim=1280,
        encoder_hidden_size=768,
        vocab_size=8256,
        codebook_size=8192,
        in_channels=768,
        block_out_channels=768,
        num_res_blocks=3,
        downsample=True,
        upsample=True,
        block_num_heads=12,
        num_hidden_layers=22,
        num_attention_heads=16,
        intermediate_size=2816,
        layer_norm_eps=1e-6,
        sample_size=32,
    ),
}

# Hub config keys this file hard-codes rather than reads: the value every released checkpoint has.
FIXED_HUB_CONFIG = {"use_bias": False, "hidden_dropout": 0.0, "attention_dropout": 0.0, "ln_elementwise_affine": True}
# Every key of a diffusers transformer/config.json that this file reads or checks; keys starting with "_" are
# diffusers' bookkeeping (_class_name, _diffusers_version, _name_or_path). convert_weights.hub_config decides
# what to do with any other key.
HUB_KEYS = frozenset(f.name for f in fields(UViTConfig)) | FIXED_HUB_CONFIG.keys()


def config_from_hub(d: dict) -> UViTConfig:
    """A UViTConfig from a diffusers transformer/config.json dict; ValueError naming any key we cannot honour."""
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if key not in HUB_KEYS:
            raise ValueError(f"unknown UVit2DModel config key {key!r}")
        if key in FIXED_HUB_CONFIG and value != FIXED_HUB_CONFIG[key]:
            raise ValueError(f"{key} = {value!r} is not supported (released checkpoints: {FIXED_HUB_CONFIG[key]!r})")
    ours = [f.name for f in fields(UViTConfig)]
    missing = sorted(set(ours) - set(d))
    if missing:
        raise ValueError(f"config is missing {missing}")
    return UViTConfig(**{k: d[k] for k in ours})


def micro_cond_embedding(micro_conds: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features, cosines first, of each micro-condition. (B, 5) -> (B, 5 * dim), float32.

    Matches reference: diffusers get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0), computed
    in float32 whatever the model dtype, op for op, so that the features are bit-identical.
    """
    B = micro_conds.shape[0]
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=micro_conds.device) / half
    args = micro_conds.flatten().float()[:, None] * torch.exp(exponent)[None, :]  # (5B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(B, -1)  # (B, 5 * dim)


# ----------------------------------------------------------------------------------------------------
# Layers, smallest first

Modulation = tuple[torch.Tensor, torch.Tensor]  # (scale, shift) of an adaptive norm, each (B, dim)
TextKV = tuple[torch.Tensor, torch.Tensor]  # text keys and values of one attention, each (B, heads, L, head_dim)


class RMSNorm(nn.Module):
    """RMS norm over the last dim, with a weight and no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Matches reference: diffusers RMSNorm. The mean square is taken in float32 and, by type promotion,
        # the normalised x is float32 too; it is cast to the weight dtype only before the weight multiply.
        var = x.float().pow(2).mean(-1, keepdim=True)  # (..., 1) float32
        x = x * torch.rsqrt(var + self.eps)  # float32
        return x.to(self.weight.dtype) * self.weight


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN (arXiv 2301.00808): rescale each channel by its spatial L2 norm relative to the mean."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):  # x: (B, H, W, C)
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)  # eps hard-coded in the reference
        return self.gamma * (x * nx) + self.beta + x


class Attention(nn.Module):
    """Multi-head attention without biases. Keys/values come from the tokens themselves (self-attention) or
    are precomputed from the text with `kv` (cross-attention)."""

    def __init__(self, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        # A one-element list only so that the key is the reference's `to_out.0`; its `to_out.1` is Dropout(p=0).
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def kv(self, ctx) -> TextKV:  # ctx: (B, L, kv_dim)
        B, L, _ = ctx.shape
        k = self.to_k(ctx).view(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, head_dim)
        v = self.to_v(ctx).view(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, head_dim)
        return k, v

    def forward(self, x, kv: TextKV | None = None):  # x: (B, N, D); kv None means self-attention
        B, N, D = x.shape
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, head_dim)
        k, v = self.kv(x) if kv is None else kv
        # No mask: the reference attends to all 77 text positions, padding included.
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim), scale 1/sqrt(head_dim)
        return self.to_out[0](y.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class GEGLU(nn.Module):
    """Gated GELU (arXiv 2002.05202): one projection to twice the inner width, split into value and gate."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner, bias=False)

    def forward(self, x):  # (B, N, dim) -> (B, N, inner)
        # Matches reference: diffusers GEGLU, the first half is the value, the second half is GELU'd (exact erf).
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        # The indices only mirror the reference keys ff.net.0.proj and ff.net.2; the reference's net.1 is
        # Dropout(p=0), here a parameter-free placeholder.
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim, bias=False))

    def forward(self, x):  # (B, N, dim)
        return self.net(x)


class AdaLayerNormContinuous(nn.Module):
    """norm(x) * (1 + scale) + shift, with (scale, shift) a linear map of silu(cond). `norm` is an RMSNorm or,
    for norm3, a bias-free LayerNorm; both keep their own learned weight, as in the reference."""

    def __init__(self, dim: int, cond_dim: int, norm: nn.Module):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim, bias=False)
        self.norm = norm

    def modulation(self, cond) -> Modulation:  # cond: (B, cond_dim)
        scale, shift = self.linear(F.silu(cond)).chunk(2, dim=1)  # scale first, as in the reference
        return scale, shift  # each (B, dim)

    def forward(self, x, mod: Modulation):  # x: (B, N, dim)
        scale, shift = mod
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class ConvEmbed(nn.Module):
    """Token ids -> feature map (diffusers UVit2DConvEmbed). No positional embedding: position reaches the
    model only through the depthwise and 2x2 convolutions."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.in_channels)
        self.layer_norm = RMSNorm(cfg.in_channels, cfg.layer_norm_eps)
        self.conv = nn.Conv2d(cfg.in_channels, cfg.block_out_channels, kernel_size=1, bias=False)

    def forward(self, ids):  # ids: (B, h, w) long
        x = self.layer_norm(self.embeddings(ids))  # (B, h, w, E)
        return self.conv(x.permute(0, 3, 1, 2))  # (B, C, h, w)


class CondEmbed(nn.Module):
    """[pooled text, micro-conditioning features] -> the conditioning vector (diffusers TimestepEmbedding)."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.cond_embed_dim + cfg.micro_cond_embed_dim, cfg.hidden_size, bias=False)
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # (B, cond_embed_dim + micro_cond_embed_dim) -> (B, hidden_size)
        return self.linear_2(F.silu(self.linear_1(x)))


class ConvNextBlock(nn.Module):
    """ConvNeXt-V2 block (depthwise 3x3, RMSNorm, 4x MLP with GRN), then a conditional scale and shift."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        C = cfg.block_out_channels
        self.depthwise = nn.Conv2d(C, C, kernel_size=3, padding=1, groups=C, bias=False)
        self.norm = RMSNorm(C, cfg.layer_norm_eps)
        self.channelwise_linear_1 = nn.Linear(C, 4 * C, bias=False)
        self.channelwise_norm = GlobalResponseNorm(4 * C)
        self.channelwise_linear_2 = nn.Linear(4 * C, C, bias=False)
        self.cond_embeds_mapper = nn.Linear(cfg.hidden_size, 2 * C, bias=False)

    def modulation(self, cond) -> Modulation:  # cond: (B, hidden_size)
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)  # scale first
        return scale, shift  # each (B, C)

    def forward(self, x, mod: Modulation):  # x: (B, C, H, W)
        r = x
        x = self.norm(self.depthwise(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        x = F.gelu(self.channelwise_linear_1(x))  # (B, H, W, 4C), exact erf GELU
        x = self.channelwise_linear_2(self.channelwise_norm(x))  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2) + r  # (B, C, H, W)
        # Matches reference: diffusers ConvNextBlock modulates after the residual add, not inside the branch.
        scale, shift = mod
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class SkipFFTransformerBlock(nn.Module):
    """Two pre-norm attentions over the flattened feature map, both reading the text; no feed-forward."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        C = cfg.block_out_channels
        self.kv_mapper = nn.Linear(cfg.hidden_size, C, bias=False)
        # Matches reference: diffusers SkipFFTransformerBlock hard-codes eps 1e-6 here, not layer_norm_eps.
        self.norm1 = RMSNorm(C, 1e-6)
        # Matches reference: attn1 is a *cross*-attention too (open-muse: "this is actually a cross attention").
        self.attn1 = Attention(C, cfg.block_num_heads, kv_dim=C)
        self.norm2 = RMSNorm(C, 1e-6)
        self.attn2 = Attention(C, cfg.block_num_heads, kv_dim=C)

    def text_kv(self, text) -> tuple[TextKV, TextKV]:  # text: (B, L, hidden_size), projected
        ctx = self.kv_mapper(F.silu(text))  # (B, L, C)
        return self.attn1.kv(ctx), self.attn2.kv(ctx)

    def forward(self, x, kvs: tuple[TextKV, TextKV]):  # x: (B, N, C)
        x = x + self.attn1(self.norm1(x), kvs[0])
        return x + self.attn2(self.norm2(x), kvs[1])


class StageConditions(NamedTuple):
    """Prompt-only inputs of one (ConvNextBlock, SkipFFTransformerBlock) pair of a UVitBlock."""
    res_block: Modulation  # ConvNeXt output modulation, each (B, C)
    attention_block: tuple[TextKV, TextKV]  # text (k, v) of attn1 and attn2, each (B, block_num_heads, L, block_head_dim)


# Downsample2D and Upsample2D are named after the diffusers modules behind the checkpoint keys
# (down_block.downsample, up_block.upsample), but are the U-ViT's own: an RMSNorm and a 2x2 (transposed) conv.
# vqgan.py's classes of the same names are other layers (a padded 3x3 stride-2 conv; nearest upsampling + 3x3 conv).


class Downsample2D(nn.Module):
    """RMSNorm over channels, then a 2x2 stride-2 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.block_out_channels, cfg.layer_norm_eps)
        self.conv = nn.Conv2d(cfg.block_out_channels, cfg.block_out_channels, kernel_size=2, stride=2, bias=False)

    def forward(self, x):  # (B, C, H, W)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W)
        # Matches reference: diffusers Downsample2D(padding=0) pads one zero row and column (right, bottom). With even
        # H, W (always: _check_id_shapes refuses odd grids) the stride-2 conv never reads them, and dropping the pad is
        # bit-identical on CPU; we keep it so that the conv gets the reference's input shape, and so the same
        # kernel choice, on any backend.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """RMSNorm over channels, then a 2x2 stride-2 transposed conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.block_out_channels, cfg.layer_norm_eps)
        self.conv = nn.ConvTranspose2d(cfg.block_out_channels, cfg.block_out_channels, 2, stride=2, bias=False)

    def forward(self, x):  # (B, C, H, W)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv(x)  # (B, C, 2H, 2W)


class UVitBlock(nn.Module):
    """A convolutional stage: optional downsampling, num_res_blocks x (ConvNeXt, text attention), optional
    upsampling. The model has two: down_block (may downsample) and up_block (may upsample)."""

    def __init__(self, cfg: UViTConfig, downsample: bool, upsample: bool):
        super().__init__()
        self.downsample = Downsample2D(cfg) if downsample else None
        self.res_blocks = nn.ModuleList([ConvNextBlock(cfg) for _ in range(cfg.num_res_blocks)])
        self.attention_blocks = nn.ModuleList([SkipFFTransformerBlock(cfg) for _ in range(cfg.num_res_blocks)])
        self.upsample = Upsample2D(cfg) if upsample else None

    def conditions(self, text, cond) -> list[StageConditions]:  # text: (B, L, hidden), cond: (B, hidden)
        return [StageConditions(res.modulation(cond), attn.text_kv(text))
                for res, attn in zip(self.res_blocks, self.attention_blocks)]

    def forward(self, x, conds: list[StageConditions]):  # x: (B, C, H, W)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, H/2, W/2)
        for res_block, attention_block, c in zip(self.res_blocks, self.attention_blocks, conds):
            x = res_block(x, c.res_block)
            B, C, H, W = x.shape
            x = x.view(B, C, H * W).permute(0, 2, 1)  # (B, HW, C), row-major tokens
            x = attention_block(x, c.attention_block)
            x = x.permute(0, 2, 1).view(B, C, H, W)
        if self.upsample is not None:
            x = self.upsample(x)  # (B, C, 2H, 2W)
        return x


class LayerConditions(NamedTuple):
    """Prompt-only inputs of one transformer layer. attn1 is self-attention, so it has nothing to cache."""
    norm1: Modulation  # each (B, hidden_size)
    norm2: Modulation
    attn2: TextKV  # text (k, v), each (B, num_attention_heads, L, head_dim)
    norm3: Modulation


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: self-attention, text cross-attention, GEGLU feed-forward, each behind an
    adaptive norm. Matches reference: diffusers BasicTransformerBlock(norm_type="ada_norm_continuous")."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.norm1 = AdaLayerNormContinuous(D, D, RMSNorm(D, eps))
        self.attn1 = Attention(D, cfg.num_attention_heads, kv_dim=D)
        self.norm2 = AdaLayerNormContinuous(D, D, RMSNorm(D, eps))
        self.attn2 = Attention(D, cfg.num_attention_heads, kv_dim=D)
        # Matches reference: norm3 is a LayerNorm (weight, no bias), not an RMSNorm; open-muse's pre_mlp_layer_norm.
        self.norm3 = AdaLayerNormContinuous(D, D, nn.LayerNorm(D, eps=eps, bias=False))
        self.ff = FeedForward(D, cfg.intermediate_size)

    def conditions(self, text, cond) -> LayerConditions:  # text: (B, L, D), cond: (B, D)
        return LayerConditions(self.norm1.modulation(cond), self.norm2.modulation(cond),
                               self.attn2.kv(text), self.norm3.modulation(cond))

    def forward(self, x, c: LayerConditions):  # x: (B, N, D)
        x = x + self.attn1(self.norm1(x, c.norm1))  # self-attention
        x = x + self.attn2(self.norm2(x, c.norm2), c.attn2)  # cross-attention to the text
        return x + self.ff(self.norm3(x, c.norm3))


class ConvMlmLayer(nn.Module):
    """The MLM head: 1x1 conv, RMSNorm over channels, 1x1 conv to codebook logits."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(cfg.block_out_channels, cfg.in_channels, kernel_size=1, bias=False)
        self.layer_norm = RMSNorm(cfg.in_channels, cfg.layer_norm_eps)
        self.conv2 = nn.Conv2d(cfg.in_channels, cfg.codebook_size, kernel_size=1, bias=False)

    def forward(self, x):  # (B, C, h, w)
        x = self.layer_norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, E, h, w)
        return self.conv2(x)  # (B, codebook_size, h, w)


# ----------------------------------------------------------------------------------------------------
# The model


@dataclass
class Conditions:
    """Everything the U-ViT computes from the prompt alone, for one batch; reusable across sampling steps."""
    text: torch.Tensor  # (B, L, hidden_size): encoder_proj + RMSNorm of the CLIP hidden states
    cond: torch.Tensor  # (B, hidden_size): cond_embed([pooled text, micro-conditioning features])
    down_block: list[StageConditions]
    transformer_layers: list[LayerConditions]
    up_block: list[StageConditions]

    @property
    def batch_size(self) -> int:
        return self.cond.shape[0]

    def rows(self, start: int, stop: int) -> "Conditions":
        """The conditions of batch rows start..stop-1, as views: e.g. the prompts' half of [negative; positive]."""
        return Conditions(*(take_rows(getattr(self, f.name), start, stop) for f in fields(self)))


def take_rows(x, start: int, stop: int):
    """Rows start..stop-1 of every tensor in x: a tensor, or (named) tuples and lists of them, nested."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    items = [take_rows(item, start, stop) for item in x]
    return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)


class UViT(nn.Module):
    """The aMUSEd token predictor (diffusers UVit2DModel); state-dict keys are UVit2DModel's."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.cfg = cfg
        D, C = cfg.hidden_size, cfg.block_out_channels
        self.encoder_proj = nn.Linear(cfg.encoder_hidden_size, D, bias=False)
        self.encoder_proj_layer_norm = RMSNorm(D, cfg.layer_norm_eps)
        self.embed = ConvEmbed(cfg)
        self.cond_embed = CondEmbed(cfg)
        self.down_block = UVitBlock(cfg, downsample=cfg.downsample, upsample=False)
        self.project_to_hidden_norm = RMSNorm(C, cfg.layer_norm_eps)
        self.project_to_hidden = nn.Linear(C, D, bias=False)
        self.transformer_layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.project_from_hidden_norm = RMSNorm(D, cfg.layer_norm_eps)
        self.project_from_hidden = nn.Linear(D, C, bias=False)
        self.up_block = UVitBlock(cfg, downsample=False, upsample=cfg.upsample)
        self.mlm_layer = ConvMlmLayer(cfg)

    def encode_conditions(self, text_hidden, pooled, micro_conds) -> Conditions:
        """Everything that depends only on the prompt.

        text_hidden: (B, L, encoder_hidden_size) CLIP penultimate hidden states (L = 77).
        pooled: (B, cond_embed_dim) CLIP pooled, projected embedding.
        micro_conds: (B, 5) [width, height, crop_top, crop_left, aesthetic score], any real dtype.
        """
        self._check_condition_shapes(text_hidden, pooled, micro_conds)
        dtype = self.encoder_proj.weight.dtype
        # The text encoder may run in another precision; the reference would fail on the mismatch instead.
        text = self.encoder_proj_layer_norm(self.encoder_proj(text_hidden.to(dtype)))  # (B, L, D)
        # Matches reference: UVit2DModel.forward builds the micro-conditioning features in float32, concatenates
        # (pooled first, which promotes to float32) and only then casts to the model dtype.
        m = micro_cond_embedding(micro_conds, self.cfg.micro_cond_encode_dim)  # (B, 5 * encode_dim) float32
        cond = self.cond_embed(torch.cat([pooled, m], dim=1).to(dtype))  # (B, D)
        return Conditions(
            text=text,
            cond=cond,
            down_block=self.down_block.conditions(text, cond),
            transformer_layers=[layer.conditions(text, cond) for layer in self.transformer_layers],
            up_block=self.up_block.conditions(text, cond),
        )

    def forward(self, ids, conds: Conditions, embedding_noise: tuple[float, torch.Tensor] | None = None):
        """Logits over the codebook for a token grid. ids: (B, h, w) long, each in [0, vocab_size) (not checked
        here: see check_ids); conds: encode_conditions() of a batch of B. embedding_noise: (s, noise (B, C, h, w)
        standard normal) replaces the embedded tokens x by s * noise + sqrt(1 - s^2) * x: the input perturbation of
        a Di[M]O one-step generator (sampling.dimo_start); None for every other use. Any h x w runs, even with
        downsampling (then h and w must be even): there is no positional embedding, the convolutions carry
        position. The model was trained at sample_size x sample_size; the shape check is free, and static under
        torch.compile (a new grid is a new compiled graph).
        Returns (B, codebook_size, h, w). UVit2DModel(ids, text_hidden, pooled, micro_conds) is
        forward(ids, encode_conditions(text_hidden, pooled, micro_conds))."""
        self._check_id_shapes(ids, conds.batch_size)
        x = self.embed(ids)  # (B, C, h, w)
        if embedding_noise is not None:
            s, noise = embedding_noise
            x = s * noise + math.sqrt(1 - s * s) * x
        x = self.down_block(x, conds.down_block)  # (B, C, H, W); H = h/2 with downsampling
        B, C, H, W = x.shape
        x = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C), row-major tokens
        x = self.project_to_hidden(self.project_to_hidden_norm(x))  # (B, N, D)
        for layer, c in zip(self.transformer_layers, conds.transformer_layers):
            x = layer(x, c)  # (B, N, D)
        x = self.project_from_hidden(self.project_from_hidden_norm(x))  # (B, N, C)
        x = x.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        x = self.up_block(x, conds.up_block)  # (B, C, h, w)
        return self.mlm_layer(x)  # (B, codebook_size, h, w)

    def check_ids(self, ids, batch_size: int) -> None:
        """ValueError unless ids fit forward: shape, dtype, and every id in [0, vocab_size). For ids from outside
        (a file, a user); reading the range back makes the device wait, so the sampler, whose ids are valid by
        construction, does not call it."""
        self._check_id_shapes(ids, batch_size)
        lo, hi = torch.aminmax(ids)
        if (lo < 0) | (hi >= self.cfg.vocab_size):  # one host sync
            raise ValueError(f"ids must lie in [0, {self.cfg.vocab_size}) (vocab_size; the mask id is the last); "
                             f"got min {lo.item()}, max {hi.item()}")

    def _preset_name(self) -> str:
        return next((name for name, c in PRESETS.items() if c == self.cfg), "this config")

    def _check_condition_shapes(self, text_hidden, pooled, micro_conds):
        cfg = self.cfg
        B = pooled.shape[0] if pooled.ndim == 2 else None
        expected = [
            ("text_hidden", text_hidden, 3, cfg.encoder_hidden_size, f"(B, L, {cfg.encoder_hidden_size})"),
            ("pooled", pooled, 2, cfg.cond_embed_dim, f"(B, {cfg.cond_embed_dim})"),
            ("micro_conds", micro_conds, 2, len(MICRO_CONDS), f"(B, {len(MICRO_CONDS)}) {list(MICRO_CONDS)}"),
        ]
        for name, t, ndim, last, shape in expected:
            if t.ndim != ndim or t.shape[-1] != last or t.shape[0] != B:
                raise ValueError(f"{self._preset_name()} expects {name} of shape {shape} with the batch size of "
                                 f"pooled; got text_hidden {tuple(text_hidden.shape)}, pooled {tuple(pooled.shape)}, "
                                 f"micro_conds {tuple(micro_conds.shape)}")

    def _check_id_shapes(self, ids, batch_size: int):
        if ids.ndim != 3 or ids.shape[1] < 1 or ids.shape[2] < 1:
            raise ValueError(f"{self._preset_name()} expects a token grid, ids of shape (B, h, w); "
                             f"got {tuple(ids.shape)}")
        if self.cfg.downsample and (ids.shape[1] % 2 or ids.shape[2] % 2):
            raise ValueError(f"{self._preset_name()} halves the token grid inside (downsample), so h and w must be "
                             f"even; got a {ids.shape[1]}x{ids.shape[2]} grid")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be integer token ids (torch.long), got {ids.dtype}")
        if ids.shape[0] != batch_size:
            raise ValueError(f"ids batch size {ids.shape[0]} != conditions batch size {batch_size}")
