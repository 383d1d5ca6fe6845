"""vqgan.py against diffusers' VQModel (the oracle), at the tiny and the official amused configs.

Tolerances, and why:
- DECODE_ATOL = 1e-4 on fp32 pixels in [0, 1]. We run the same ops in the same order as the reference, so we
  expect (and measure) differences of 0 to ~1e-7. 1e-4 is the issue's bar; it leaves room for a different
  conv algorithm being picked, not for a wrong op.
- MIN_ID_AGREEMENT = 0.999. Ids may differ only where two codebook distances tie within fp32 rounding;
  every disagreement must be such a tie (relative distance gap <= TIE_RTOL). On these inputs we measure 100%.
- UPCAST_ATOL = 0: an fp16 model with force_upcast computes in fp32, so it must equal exactly the reference
  run the way the pipelines run it (vqvae.half(), then vqvae.float() before decoding).
- UPCAST_VS_FP32_ATOL = 5e-3: the same fp16 model against the fp32 original. Compute is fp32 on both sides (the
  exact check above proves it), so the difference is only the fp16 rounding of the weights (relative 2^-11 per
  weight, through ~20 layers); measured 2.9e-3 on the tiny model, of which 0.7e-3 comes from the codebook alone.
- FP16_ATOL = 1e-2 (force_upcast off, so fp16 compute too; measured 5.7e-3, twice the weight rounding alone) and
  BF16_ATOL = 8e-2 (8-bit mantissa, 8x coarser than fp16; measured 4.0e-2), pixels in [0, 1]. A wrong op gives
  errors of order 0.1-1, so these still catch one.
"""
import copy
import dataclasses

import pytest
import torch
from conftest import TINY_VQ, assert_close, assert_nontrivial, perturb_, save_reference, smooth_images, spread_codebook_
from diffusers import VQModel as RefVQModel
from safetensors.torch import load_file

import vqgan

DECODE_ATOL = 1e-4
MIN_ID_AGREEMENT = 0.999
TIE_RTOL = 1e-5
UPCAST_ATOL = 0.0
UPCAST_VS_FP32_ATOL = 5e-3
FP16_ATOL = 1e-2
BF16_ATOL = 8e-2

# The amused-512 hub vqvae/config.json (../shared/docs/hub-checkpoints.md §2.2; amused-reference.md §1.3).
HUB_VQ_CONFIG = {
    "_class_name": "VQModel",
    "_diffusers_version": "0.25.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512, 768],
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "in_channels": 3,
    "latent_channels": 64,
    "layers_per_block": 2,
    "lookup_from_codebook": True,
    "mid_block_add_attention": False,
    "norm_num_groups": 32,
    "norm_type": "group",
    "num_vq_embeddings": 8192,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "vq_embed_dim": None,
    "force_upcast": True,
}


# ----------------------------------------------------------------------------------------------------
# Helpers


@torch.no_grad()
def build_reference(kwargs, seed):
    """A random reference VQModel with non-trivial norms and biases and a codebook spread like its latents."""
    torch.manual_seed(seed)
    ref = spread_codebook_(perturb_(RefVQModel.from_config(kwargs).eval(), seed), seed)
    return ref


def ours_from(ref):
    ours = vqgan.VQModel(vqgan.config_from_hub(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@torch.no_grad()
def reference_ids(ref, images):
    """Ids the way pipeline_amused_img2img.py gets them: encode, quantize()[2][2] (flat), reshape (B, h, w)."""
    latents = ref.encode(images).latents
    B, _, h, w = latents.shape
    return ref.quantize(latents)[2][2].reshape(B, h, w), latents


@torch.no_grad()
def reference_decode(ref, ids):
    """Pixels the way pipeline_amused.py decodes: codebook lookup via force_not_quantize + shape, then clip."""
    B, h, w = ids.shape
    out = ref.decode(ids, force_not_quantize=True, shape=(B, h, w, ref.config.latent_channels)).sample
    return out.clip(0, 1)


def check_ids(name, ours, ref_ids, latents, codebook):
    """Ids must agree except at near-ties; report the agreement fraction."""
    assert ours.shape == ref_ids.shape and ours.dtype == torch.long, (ours.shape, ours.dtype)
    n_distinct = ref_ids.unique().numel()
    assert n_distinct >= min(4, ref_ids.numel()), f"{name}: only {n_distinct} distinct ids, a degenerate test"
    same = ours == ref_ids
    frac = same.float().mean().item()
    print(f"{name}: {frac:.2%} of {same.numel()} ids identical ({n_distinct} distinct)")
    # every disagreement must be a tie: both entries at the same distance, within rounding (float64 check)
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    d = torch.cdist(z, codebook.double())  # (N, K)
    rows = (~same).flatten().nonzero()[:, 0]
    d_ours, d_ref = d[rows, ours.flatten()[rows]], d[rows, ref_ids.flatten()[rows]]
    gap = ((d_ours - d_ref).abs() / d_ref).max().item() if rows.numel() else 0.0
    assert gap <= TIE_RTOL, f"{name}: ids differ at non-tied distances (relative gap {gap:.2e})"
    assert frac >= MIN_ID_AGREEMENT, f"{name}: only {frac:.2%} ids identical"


def check_parity(ref, ours, images, ids):
    """Encode ids, decode pixels, and the round trip, against the reference."""
    got_ids = ours.encode_to_ids(images)
    want_ids, latents = reference_ids(ref, images)
    check_ids("encode ids", got_ids, want_ids, latents, ref.quantize.embedding.weight)

    assert_close("decode pixels", ours.decode_ids(ids), reference_decode(ref, ids), atol=DECODE_ATOL)
    with torch.no_grad():  # before the clamp too: random weights saturate many pixels
        raw = ours.decoder(ours.post_quant_conv(ours.quantize.get_codebook_entry(ids)))
        B, h, w = ids.shape
        want = ref.decode(ids, force_not_quantize=True, shape=(B, h, w, ref.config.latent_channels)).sample
    assert_close("decode, unclamped", raw, want, atol=DECODE_ATOL)

    # round trip against the reference's own reconstruction: forward() = encode, quantize, decode
    with torch.no_grad():
        want = ref(images).sample.clip(0, 1)
    assert_close("round trip", ours.decode_ids(got_ids), want, atol=DECODE_ATOL)


# ----------------------------------------------------------------------------------------------------
# Tiny config


@pytest.fixture(scope="module")
def tiny():
    ref = build_reference(TINY_VQ, seed=0)
    return ref, ours_from(ref)


def test_tiny_parity(tiny):
    ref, ours = tiny
    f = ours.cfg.downsample_factor
    images = smooth_images(2, 8 * f, 12 * f, seed=1)  # non-square: a swapped h and w would show
    ids = torch.randint(0, ours.cfg.num_vq_embeddings, (2, 3, 5), generator=torch.Generator().manual_seed(2))
    check_parity(ref, ours, images, ids)


def test_hub_file_keys_are_identity(tiny, tmp_path):
    ref, _ = tiny
    folder = save_reference(ref, tmp_path, "vqvae")
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    ours = vqgan.VQModel(vqgan.config_from_hub(dict(ref.config)))
    ours.load_state_dict(sd, strict=True)  # no renaming, no leftovers
    ids = torch.randint(0, ours.cfg.num_vq_embeddings, (1, 4, 4), generator=torch.Generator().manual_seed(3))
    assert_close("decode after loading the hub file", ours.decode_ids(ids), reference_decode(ref, ids), atol=0.0)


def test_config_from_hub_rejects_unsupported(tiny):
    ref, _ = tiny
    d = dict(ref.config)
    cfg = vqgan.config_from_hub(d)
    assert cfg.block_out_channels == (16, 32, 32) and cfg.downsample_factor == 4 and cfg.latent_channels == 8
    bad = {
        "act_fn": "gelu",
        "norm_type": "spatial",
        "mid_block_add_attention": True,
        "lookup_from_codebook": False,
        "down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "vq_embed_dim": 16,
    }
    for key, value in bad.items():
        with pytest.raises(ValueError, match=key):
            vqgan.config_from_hub({**d, key: value})
    with pytest.raises(ValueError, match="missing keys.*force_upcast"):
        vqgan.config_from_hub({k: v for k, v in d.items() if k != "force_upcast"})
    with pytest.raises(ValueError, match="unknown keys.*new_option"):
        vqgan.config_from_hub({**d, "new_option": 1})


def test_bad_inputs(tiny):
    _, ours = tiny
    ok = smooth_images(1, 32, 32, seed=4)
    shape_msg = r"images must be floats of shape \(B, 3, H, W\) with H and W positive multiples of 4"
    for images in (ok[..., :30], ok[..., :30, :], ok[:, :1], ok[0], (ok * 255).to(torch.uint8)):
        with pytest.raises(ValueError, match=shape_msg):
            ours.encode_to_ids(images)
    for where, value in (((0, 0, 0, 0), -1e-3), ((0, 2, 31, 31), 1.001), ((0, 1, 5, 7), float("nan"))):
        images = ok.clone()
        images[where] = value  # one bad pixel is enough
        with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
            ours.encode_to_ids(images)
    with pytest.raises(ValueError, match=r"values in \[0, 1\] \(not \[-1, 1\]\)"):
        ours.encode_to_ids(ok * 2 - 1)
    ids = torch.zeros(1, 4, 4, dtype=torch.long)
    for bad in (ids - 1, ids + 64):
        with pytest.raises(ValueError, match=r"ids must be in \[0, 64\)"):
            ours.decode_ids(bad)
    for bad in (ids[0], ids.float(), ids[:, :0]):
        with pytest.raises(ValueError, match=r"shape \(B, h, w\)"):
            ours.decode_ids(bad)


def test_half_precision(tiny):
    ref, ours = tiny
    ids = torch.randint(0, ours.cfg.num_vq_embeddings, (2, 4, 6), generator=torch.Generator().manual_seed(5))
    images = smooth_images(1, 32, 32, seed=6)
    fp32 = ours.decode_ids(ids)

    # fp16 weights + force_upcast: computed in fp32, exactly as the pipelines do it (half(), then float())
    up = copy.deepcopy(ours).half()
    assert up.upcast
    with torch.inference_mode():
        got = up.decode_ids(ids)
    assert got.dtype == torch.float32
    w = up.decoder.conv_in.weight
    assert w.dtype == torch.float16 and not w.is_inference(), "decode_ids changed the module's weights"
    pipe = copy.deepcopy(ref).half().float()
    assert_close("fp16 + force_upcast vs reference pipeline", got, reference_decode(pipe, ids), atol=UPCAST_ATOL)
    assert_close("fp16 + force_upcast vs fp32", got, fp32, atol=UPCAST_VS_FP32_ATOL)
    # encoding upcasts too (pipeline_amused_img2img.py), fp16 images included: they go to fp32, not the reverse
    for name, x in (("fp32", images), ("fp16", images.half())):
        want_ids, latents = reference_ids(pipe, x.float())
        got_ids = up.encode_to_ids(x)
        check_ids(f"fp16 + force_upcast encode ids of {name} images", got_ids, want_ids, latents,
                  pipe.quantize.embedding.weight)
        assert torch.equal(got_ids, want_ids)  # the same fp32 latents, the same cdist: no tie can differ

    # fp16 compute, force_upcast off: finite and close (random weights do not overflow; the real ones may)
    native = vqgan.VQModel(dataclasses.replace(ours.cfg, force_upcast=False)).half()
    native.load_state_dict(up.state_dict(), strict=True)
    assert not native.upcast
    got = native.decode_ids(ids)
    assert got.dtype == torch.float16
    assert_close("fp16 native vs fp32", got, fp32, atol=FP16_ATOL)

    # bf16 always runs natively: it has fp32's exponent range
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    assert not bf16.upcast
    got = bf16.decode_ids(ids)
    assert got.dtype == torch.bfloat16
    assert_close("bf16 vs fp32", got, fp32, atol=BF16_ATOL)
    bf16_ids = bf16.encode_to_ids(images)
    agree = (bf16_ids == ours.encode_to_ids(images)).float().mean().item()
    print(f"bf16 encode: {agree:.2%} of ids equal to fp32 (informational: bf16 latents are coarse)")
    assert bf16_ids.shape == (1, 8, 8) and bf16_ids.dtype == torch.long


# ----------------------------------------------------------------------------------------------------
# Official config (random weights). CPU time is kept low with one 64 x 64 image.


@pytest.fixture(scope="module")
def full():
    ref = build_reference(HUB_VQ_CONFIG, seed=0)
    return ref, ours_from(ref)


def test_full_config_matches_preset(full):
    ref, ours = full
    assert vqgan.config_from_hub(dict(ref.config)) == vqgan.PRESETS["amused"]
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert len(sd_ours) == len(sd_ref) == 277
    assert sum(t.numel() for t in sd_ours.values()) == 146_244_675
    assert {k: tuple(t.shape) for k, t in sd_ours.items()} == {k: tuple(t.shape) for k, t in sd_ref.items()}
    assert ours.cfg.downsample_factor == 16 and ours.cfg.latent_channels == 64


def test_full_config_parity(full):
    ref, ours = full
    images = smooth_images(1, 64, 64, seed=7)  # a 4 x 4 grid of tokens
    ids = torch.randint(0, 8192, (1, 2, 3), generator=torch.Generator().manual_seed(8))  # -> 32 x 48 px
    check_parity(ref, ours, images, ids)
    assert_nontrivial("full decode", ours.decode_ids(ids))
