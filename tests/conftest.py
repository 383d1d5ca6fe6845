"""Shared test fixtures: tiny configs, reference-model builders, a tiny CLIP vocabulary, assert_close.

The reference libraries (diffusers, transformers) are imported only inside tests: they are the oracles
our from-scratch modules are compared with, never dependencies of the product.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the product is flat modules at the repository root

import clip_text  # noqa: E402

# The real CLIP-L/14 vocabulary with the amused special-token files. CI has it; a user's clone does not.
SHARED_TOKENIZER = ROOT.parent / "shared" / "clip-tokenizer"
needs_shared_tokenizer = pytest.mark.skipif(
    not (SHARED_TOKENIZER / "vocab.json").exists(), reason="../shared/clip-tokenizer/ is not present"
)


# ----------------------------------------------------------------------------------------------------
# Tiny configs, as keyword arguments of the reference classes. Their widths chain like the official ones:
# CLIP hidden -> U-ViT encoder_hidden_size, CLIP projection -> U-ViT cond_embed_dim,
# U-ViT codebook_size == VQ num_vq_embeddings, U-ViT vocab_size - 1 == the mask token id.

TINY_CLIP = dict(  # transformers.CLIPTextConfig
    vocab_size=49408,  # room for the real vocabulary's ids, so any tokenizer folder works with it
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=24,
    bos_token_id=0,  # the legacy ids of the hub config: eos_token_id == 2 selects the argmax pooling
    eos_token_id=2,
    pad_token_id=1,
)

# The hub config of amused-256/512 text_encoder/ (../shared/docs/hub-checkpoints.md §2.3).
FULL_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

TINY_UVIT = dict(  # diffusers.UVit2DModel
    hidden_size=64,
    use_bias=False,
    hidden_dropout=0.0,
    cond_embed_dim=24,  # == TINY_CLIP projection_dim
    micro_cond_encode_dim=8,
    micro_cond_embed_dim=40,  # 5 micro-conditions x micro_cond_encode_dim
    encoder_hidden_size=32,  # == TINY_CLIP hidden_size
    vocab_size=72,  # codebook + 8 spare ids; the last one is the mask token, as in the official 8256 = 8192 + 64
    codebook_size=64,
    in_channels=32,
    block_out_channels=32,
    num_res_blocks=2,
    downsample=True,
    upsample=True,
    block_num_heads=2,
    num_hidden_layers=2,
    num_attention_heads=4,
    attention_dropout=0.0,
    intermediate_size=96,
    layer_norm_eps=1e-6,
    ln_elementwise_affine=True,
    sample_size=8,
)

TINY_VQ = dict(  # diffusers.VQModel, amused-style (no mid-block attention, codebook lookup, force_upcast)
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),  # 2 downsamplings: 4 px per token
    layers_per_block=1,
    act_fn="silu",
    latent_channels=8,
    sample_size=32,
    num_vq_embeddings=64,  # == TINY_UVIT codebook_size
    norm_num_groups=8,
    mid_block_add_attention=False,
    lookup_from_codebook=True,
    force_upcast=True,
)


# The official configs (../shared/docs/amused-reference.md §1.2, §1.3; hub-checkpoints.md §2.1, §2.2).
FULL_UVIT = {
    "amused-256": dict(
        hidden_size=1024, use_bias=False, hidden_dropout=0.0, cond_embed_dim=768, micro_cond_encode_dim=256,
        micro_cond_embed_dim=1280, encoder_hidden_size=768, vocab_size=8256, codebook_size=8192, in_channels=768,
        block_out_channels=768, num_res_blocks=3, downsample=False, upsample=False, block_num_heads=12,
        num_hidden_layers=22, num_attention_heads=16, attention_dropout=0.0, intermediate_size=2816,
        layer_norm_eps=1e-6, ln_elementwise_affine=True, sample_size=16,
    ),
}
FULL_UVIT["amused-512"] = {**FULL_UVIT["amused-256"], "downsample": True, "upsample": True, "sample_size": 32}

FULL_VQ = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 5,
    up_block_types=("UpDecoderBlock2D",) * 5, block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2,
    act_fn="silu", latent_channels=64, sample_size=32, num_vq_embeddings=8192, norm_num_groups=32,
    mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True,
)


# ----------------------------------------------------------------------------------------------------
# Comparing tensors


def assert_nontrivial(name, t):
    """A parity test between two broken outputs passes too: insist on finite, non-constant values."""
    t = t.detach().float()
    assert torch.isfinite(t).all(), f"{name}: contains NaN or inf"
    assert t.numel() > 1 and t.std() > 0, f"{name}: constant tensor ({t.flatten()[:1].tolist()})"


def assert_same_image(ours, ref, what):
    """Two PIL images equal pixel for pixel (as RGB), and not constant."""
    a, b = np.asarray(ours.convert("RGB")), np.asarray(ref.convert("RGB"))
    assert a.shape == b.shape, f"{what}: size {a.shape} != {b.shape}"
    assert a.std() > 0, f"{what}: a constant image"
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() == 0, f"{what}: {np.count_nonzero(diff)} of {diff.size} values differ (max {diff.max()})"


def assert_close(name, ours, ref, atol, rtol=0.0):
    """Assert |ours - ref| <= atol + rtol * |ref| everywhere; print max/mean abs diff either way."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert_nontrivial(f"{name} (reference)", ref)
    assert_nontrivial(f"{name} (ours)", ours)
    ours, ref = ours.detach().double(), ref.detach().double()
    diff = (ours - ref).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e} "
          f"(ref abs max {ref.abs().max().item():.3e}, atol {atol:.1e}, rtol {rtol:.1e})")
    bad = diff > atol + rtol * ref.abs()
    if bad.any():
        i = bad.flatten().nonzero()[:5, 0]
        raise AssertionError(
            f"{name}: {bad.sum().item()} of {bad.numel()} values out of tolerance; max abs diff "
            f"{diff.max().item():.3e}; first ours {ours.flatten()[i].tolist()} vs ref {ref.flatten()[i].tolist()}"
        )


# ----------------------------------------------------------------------------------------------------
# Reference models


def interrupt_at(cmd: list[str], prefix: str, env: dict, delay: float = 0.0, timeout: float = 60):
    """Run cmd in the repository root and send it a SIGINT `delay` seconds after a line of its output starts with
    `prefix` (Ctrl-C, as a terminal sends it) -> (exit code, all its stdout, its stderr). SIGINT is back to its
    default in the child: a shell's background job (`pytest ... &`) has it ignored, which Python would inherit."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **env}, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in p.stdout:  # until the line (or the end, if it never comes)
            lines.append(line)
            if line.startswith(prefix):
                time.sleep(delay)
                p.send_signal(signal.SIGINT)
                break
        rest, stderr = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, "".join(lines) + rest, stderr


def seeded(seed=0):
    """A CPU torch.Generator seeded with `seed`: the generator diffusers' pipelines draw the same numbers from."""
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def perturb_(module, seed=0, rel=0.1):
    """Add noise to every parameter, norms and biases included, so that a weight we forget to load (a norm
    left at ones, a bias left at zero) changes the output. Noise is `rel` x the tensor's own std (or `rel`
    for constant tensors such as fresh norm weights)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        std = p.float().std().item() if p.numel() > 1 else 0.0
        scale = rel * (std if std > 0 else 1.0)
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return module


def smooth_images(B, H, W, seed):
    """Smooth random images in [0, 1]: random 4x4 colour fields, upsampled bilinearly."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(B, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False).clamp(0, 1)


@torch.no_grad()
def spread_codebook_(vq, seed):
    """Refill a reference VQModel's codebook with values spread like its latents. diffusers initialises it in
    +-1/K, where every latent is about equally far from every entry: ids would hinge on rounding and decoding
    would see near-zero inputs."""
    f = 2 ** (len(vq.config.block_out_channels) - 1)
    h = vq.encode(smooth_images(1, 2 * f, 2 * f, seed)).latents
    g = torch.Generator().manual_seed(seed)
    w = vq.quantize.embedding.weight
    w.copy_(h.mean() + h.std() * torch.randn(w.shape, generator=g))
    return vq


def save_reference(model, root, subfolder, **kwargs):
    """Save a diffusers/transformers model with save_pretrained: the exact hub layout and key names."""
    path = Path(root) / subfolder
    model.save_pretrained(path, **kwargs)
    return path


# ----------------------------------------------------------------------------------------------------
# A tiny CLIP-style BPE vocabulary, trained here, so that tokenizer tests run without ../shared/.

TINY_CORPUS = (
    "a photo of a cat sitting on the table . a painting of a dog in the park , oil on canvas . "
    "an astronaut riding a horse on the moon ! a bowl of fruit , still life , high quality , 4k . "
    "the quick brown fox jumps over the lazy dog . portrait of a woman with a red hat , watercolor . "
    "mountains at sunset , landscape photography , trending on artstation . cyberpunk city at night "
)


def write_tiny_tokenizer(folder, n_merges=300):
    """A tokenizer folder (vocab.json, merges.txt, the amused special-token files, pad "!") for a BPE trained on
    TINY_CORPUS by clip_text.train_bpe_files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in clip_text.train_bpe_files(TINY_CORPUS, n_merges).items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one thread: on a busy 2-core machine OpenMP's second thread makes tiny models up to
    100x slower (for modules with tiny models only: full-size ones want every core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


def reference_pipeline(size, tokenizer_dir, seed=0):
    """diffusers' AmusedPipeline with random weights (perturbed), at "tiny", "amused-256" or "amused-512"."""
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    uvit_kwargs = TINY_UVIT if size == "tiny" else FULL_UVIT[size]
    torch.manual_seed(seed)
    return AmusedPipeline(
        vqvae=spread_codebook_(perturb_(VQModel(**(TINY_VQ if size == "tiny" else FULL_VQ)).eval(), seed), seed),
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        text_encoder=perturb_(CLIPTextModelWithProjection(CLIPTextConfig(**(TINY_CLIP if size == "tiny" else FULL_CLIP))).eval(), seed),
        transformer=perturb_(UVit2DModel(**uvit_kwargs).eval(), seed),
        scheduler=AmusedScheduler(mask_token_id=uvit_kwargs["vocab_size"] - 1),
    )


def save_hub_checkpoint(pipe, folder, tokenizer_dir, fp16_variant=False):
    """Save like the hub repos: fp32 files, and optionally the .fp16 variant beside them (this casts `pipe`).
    transformers 5 saves a tokenizer as tokenizer.json; the hub repos have the four slow-tokenizer files
    instead, so those are copied from `tokenizer_dir`."""
    folder = Path(folder)
    pipe.save_pretrained(folder)
    if fp16_variant:
        pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(tokenizer_dir, folder / "tokenizer")
    return folder


@pytest.fixture(scope="session")
def full_hub_256(tmp_path_factory, tiny_tokenizer_dir):
    """The full amused-256 configuration with random weights in the hub layout: fp32 files and the fp16 variant,
    the real tokenizer files when ../shared/ has them. ~5 GB on disk, built once per session."""
    tok = SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else tiny_tokenizer_dir
    folder = tmp_path_factory.mktemp("hub") / "amused-256"
    save_hub_checkpoint(reference_pipeline("amused-256", tok, seed=6), folder, tok, fp16_variant=True)
    yield folder
    shutil.rmtree(folder)
