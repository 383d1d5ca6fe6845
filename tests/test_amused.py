"""amused.py against diffusers' AmusedPipeline, AmusedImg2ImgPipeline, AmusedInpaintPipeline and AmusedScheduler.

Same weights, same inputs, same seed (a CPU torch.Generator), CPU fp32: the tokens must be identical, and the
images are then the same VQ decode of the same tokens: atol 1e-4 (we measure 0). In fp16 the scheduler must
still give identical tokens for identical logits, since we make the same dtype choices as the reference.
"""
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_TOKENIZER, TINY_UVIT, assert_close, assert_nontrivial, reference_pipeline, save_hub_checkpoint, seeded, smooth_images
from diffusers import AmusedImg2ImgPipeline, AmusedInpaintPipeline, AmusedPipeline, AmusedScheduler
from PIL import Image

import convert_weights
import amused
import speed
from amused import Amused
from sampling import draw_step_noise, sample_categorical, sampling_mask_counts, unmask_step
from speed import OneDNNLinear

MASK_ID = TINY_UVIT["vocab_size"] - 1
PROMPTS = ["a photo of a cat", "an astronaut riding a horse!"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir):
    """(diffusers pipeline, our pipeline, hub folder): the same random tiny weights, ours loaded from the folder."""
    ref = reference_pipeline("tiny", tiny_tokenizer_dir, seed=11)
    folder = save_hub_checkpoint(ref, tmp_path_factory.mktemp("hub") / "tiny", tiny_tokenizer_dir)
    ref.set_progress_bar_config(disable=True)
    return ref, Amused.from_pretrained(folder), folder


def reference_variant(ref, cls):
    """The same models in another diffusers pipeline class, with a scheduler of its own (the inpaint pipeline
    switches its scheduler to the linear schedule)."""
    pipe = cls(**{**ref.components, "scheduler": AmusedScheduler(mask_token_id=ref.scheduler.config.mask_token_id)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_run(name, ref_call, our_call):
    """Tokens identical, then images (decoded again from fresh generators with the same seed) within 1e-4."""
    ref_tokens = ref_call(output_type="latent").images
    our_tokens = our_call(output_type="tokens")
    assert ref_tokens.dtype == our_tokens.dtype == torch.long
    assert len(ref_tokens.unique()) > 5, "degenerate sample: too few distinct tokens"
    assert (ref_tokens != MASK_ID).all()
    assert torch.equal(our_tokens, ref_tokens), f"{name}: {(our_tokens != ref_tokens).sum()} tokens differ"
    assert_close(f"{name} images", our_call(output_type="pt"), ref_call(output_type="pt").images, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parametrize("steps", [1, 2, 5, 12])
def test_text_to_image_matches_diffusers(tiny, steps):
    ref, ours, _ = tiny
    kwargs = dict(negative_prompt=["blurry", "low quality"], num_images_per_prompt=2)
    assert_same_run(
        f"t2i {steps} steps",
        lambda **o: ref(PROMPTS, num_inference_steps=steps, generator=seeded(steps), **kwargs, **o),
        lambda **o: ours(PROMPTS, steps=steps, generator=seeded(steps), **kwargs, **o),
    )


@pytest.mark.parametrize("guidance_scale, negative", [(1.0, None), (4.0, None), (10.0, "ugly")])
def test_text_to_image_guidance_and_conditioning(tiny, guidance_scale, negative):
    ref, ours, _ = tiny
    kwargs = dict(negative_prompt=negative, guidance_scale=guidance_scale, temperature=(3.0, 0.5))
    assert_same_run(
        f"t2i guidance {guidance_scale}",
        lambda **o: ref("a dog", num_inference_steps=6, generator=seeded(1), micro_conditioning_aesthetic_score=5.5,
                        micro_conditioning_crop_coord=(4, 8), **kwargs, **o),
        lambda **o: ours("a dog", steps=6, generator=seeded(1), aesthetic_score=5.5, crop_coords=(4, 8), **kwargs, **o),
    )


@pytest.mark.parametrize("strength, steps", [(0.5, 12), (0.3, 12), (1.0, 5), (0.75, 4)])
def test_img2img_matches_diffusers(tiny, strength, steps):
    ref, ours, _ = tiny
    i2i = reference_variant(ref, AmusedImg2ImgPipeline)
    image = smooth_images(2, 32, 32, seed=2)  # one per prompt (the reference cannot share one image)
    assert_same_run(
        f"img2img strength {strength}",
        lambda **o: i2i(PROMPTS, image=image, strength=strength, num_inference_steps=steps, generator=seeded(3), **o),
        lambda **o: ours.img2img(PROMPTS, image, strength=strength, steps=steps, generator=seeded(3), **o),
    )


def test_img2img_from_pil_and_batch(tiny):
    ref, ours, _ = tiny
    i2i = reference_variant(ref, AmusedImg2ImgPipeline)
    pil = Image.fromarray((smooth_images(1, 32, 32, seed=4)[0].permute(1, 2, 0) * 255).byte().numpy())
    assert_same_run(
        "img2img PIL",
        lambda **o: i2i("a cat", image=pil, num_inference_steps=8, num_images_per_prompt=3, generator=seeded(5), **o),
        lambda **o: ours.img2img("a cat", pil, steps=8, num_images_per_prompt=3, generator=seeded(5), **o),
    )


def square_mask(kind, batch=1):
    m = torch.zeros(batch, 1, 32, 32)
    m[..., 8:24, 4:20] = 1.0  # white = repaint
    m[1:, ..., 0:8, 20:32] = 1.0  # a second mask differs
    if kind == "tensor":
        return m
    pil = Image.fromarray((m[0, 0] * 255).byte().numpy(), mode="L")
    return pil.convert("RGB") if kind == "pil-rgb" else pil


@pytest.mark.parametrize("kind, strength", [("tensor", 1.0), ("pil-l", 1.0), ("pil-rgb", 0.7)])
def test_inpaint_matches_diffusers(tiny, kind, strength):
    ref, ours, _ = tiny
    inp = reference_variant(ref, AmusedInpaintPipeline)
    # a PIL mask is one mask, for one image and prompt; tensors may carry one per prompt
    prompts = PROMPTS if kind == "tensor" else PROMPTS[:1]
    image, mask = smooth_images(len(prompts), 32, 32, seed=6), square_mask(kind, len(prompts))
    assert_same_run(
        f"inpaint {kind}",
        lambda **o: inp(prompts, image=image, mask_image=mask, strength=strength, num_inference_steps=12,
                        num_images_per_prompt=2, generator=seeded(7), **o),
        lambda **o: ours.inpaint(prompts, image, mask, strength=strength, steps=12, num_images_per_prompt=2,
                                 generator=seeded(7), **o),
    )


# ----------------------------------------------------------------------------------------------------
# Any size: height and width, and init images at their own size (the tiny U-ViT halves its grid like amused-512)


@pytest.mark.parametrize("height, width", [(32, 48), (48, 32), (16, 16), (64, 40)])
def test_text_to_image_at_any_size_matches_diffusers(tiny, height, width):
    ref, ours, _ = tiny
    assert_same_run(
        f"t2i {width}x{height}",
        lambda **o: ref(PROMPTS, height=height, width=width, num_inference_steps=5, generator=seeded(1), **o),
        lambda **o: ours(PROMPTS, height=height, width=width, steps=5, generator=seeded(1), **o),
    )
    tokens = ours("a cat", height=height, width=width, steps=1, output_type="tokens")
    assert tokens.shape == (1, height // 4, width // 4)


@pytest.mark.parametrize("kind", ["tensor", "pil"])
def test_img2img_keeps_the_image_size_like_diffusers(tiny, kind):
    """A 50x34 image is cut to 48x32 (12x8 tokens) by the reference's rule; the micro-conditioning says 48x32."""
    ref, ours, _ = tiny
    i2i = reference_variant(ref, AmusedImg2ImgPipeline)
    image = smooth_images(2, 34, 50, seed=3)  # one per prompt (the reference cannot share one image)
    prompts = PROMPTS
    if kind == "pil":
        image, prompts = Image.fromarray((image[0].permute(1, 2, 0) * 255).byte().numpy()), PROMPTS[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn about the cut to whole tokens
        assert_same_run(
            f"img2img {kind} 50x34",
            lambda **o: i2i(prompts, image=image, strength=0.8, num_inference_steps=6, generator=seeded(4), **o),
            lambda **o: ours.img2img(prompts, image, strength=0.8, steps=6, generator=seeded(4), **o),
        )
        assert ours.img2img(prompts, image, steps=2, output_type="pt").shape == (len(prompts), 3, 32, 48)


@pytest.mark.parametrize("kind", ["tensor", "pil-l"])
def test_inpaint_keeps_the_image_size_like_diffusers(tiny, kind):
    ref, ours, _ = tiny
    inp = reference_variant(ref, AmusedInpaintPipeline)
    image = smooth_images(1, 32, 48, seed=6)  # an 8x12 token grid
    mask = torch.zeros(1, 1, 32, 48)
    mask[..., 8:24, 4:30] = 1.0
    if kind == "pil-l":
        mask = Image.fromarray((mask[0, 0] * 255).byte().numpy(), mode="L")
    assert_same_run(
        f"inpaint {kind} 48x32",
        lambda **o: inp(PROMPTS[:1], image=image, mask_image=mask, num_inference_steps=8, generator=seeded(7), **o),
        lambda **o: ours.inpaint(PROMPTS[:1], image, mask, steps=8, generator=seeded(7), **o),
    )


def test_inpaint_where_diffusers_mask_processor_fails(tiny):
    """A 40x32 image has an 8x10 token grid. diffusers' mask processor rounds the grid it resizes the mask to down
    to a multiple of its vae_scale_factor (8x8 here; a multiple of 16 tokens at full size) and then fails to reshape
    it: we resize the mask to the real grid, so the repainted tokens are those under the mask."""
    ref, ours, _ = tiny
    inp = reference_variant(ref, AmusedInpaintPipeline)
    image, mask = smooth_images(1, 32, 40, seed=6), torch.zeros(1, 1, 32, 40)
    mask[..., :, 32:] = 1.0  # the last two token columns
    with pytest.raises(RuntimeError, match="invalid for input of size 64"):
        inp("a", image=image, mask_image=mask, num_inference_steps=4, generator=seeded(1), output_type="latent")
    before = ours.vqvae.encode_to_ids(image)
    after = ours.inpaint("a", image, mask, steps=4, generator=seeded(1), output_type="tokens")
    assert after.shape == (1, 8, 10)
    assert torch.equal(after[..., :8], before[..., :8])  # outside the mask: the image's own tokens
    assert not torch.equal(after[..., 8:], before[..., 8:])


def test_full_amused_256_matches_diffusers(full_hub_256):
    """The official amused-256 configuration in the hub layout, 2 steps like diffusers' own slow tests."""
    ref = AmusedPipeline.from_pretrained(full_hub_256, dtype=torch.float32)  # config.json says fp16 after the variant save
    ref.set_progress_bar_config(disable=True)
    ours = Amused.from_pretrained(full_hub_256)
    MASK = ref.scheduler.config.mask_token_id
    ref_tokens = ref("dog", num_inference_steps=2, generator=seeded(0), output_type="latent").images
    our_images = []
    our_tokens = ours("dog", steps=2, generator=seeded(0), output_type="tokens",
                      callback=lambda step, t: our_images.append(t.clone()))
    assert ref_tokens.shape == (1, 16, 16) and len(ref_tokens.unique()) > 50 and (ref_tokens != MASK).all()
    assert torch.equal(our_tokens, ref_tokens)
    assert (our_images[0] == MASK).sum() == 181  # the float32 cosine count after step 0 of 2
    ref_vq = ref.vqvae
    del ref  # the two 600M-parameter transformers need not live together with what follows
    with torch.no_grad():
        ref_pixels = ref_vq.decode(ref_tokens, force_not_quantize=True, shape=(1, 16, 16, 64)).sample.clip(0, 1)
    assert_close("amused-256 image", ours.vqvae.decode_ids(our_tokens), ref_pixels, atol=1e-4)


def full_size_runs(ref_pipe, ours, cases):
    """Each case: (name, diffusers call, our call, expected token grid); tokens equal, non-trivial, none masked."""
    for name, ref_call, our_call, grid in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cut of a 500x300 image to whole tokens
            want = ref_call(output_type="latent").images
            got = our_call(output_type="tokens")
        assert want.shape[1:] == grid and len(want.unique()) > 50, f"{name}: {tuple(want.shape)}"
        assert (want != ref_pipe.scheduler.config.mask_token_id).all()
        assert torch.equal(got, want), f"{name}: {(got != want).sum()} of {want.numel()} tokens differ"


def test_full_amused_256_at_other_sizes_matches_diffusers(full_hub_256):
    """The official amused-256 configuration: text to image at 256x384, 384x256 and 128x128; img2img of a 500x300
    image (-> 496x288, a 31x18 grid: its own micro-conditioning); inpainting of a 512x256 image with its mask (a
    16x32 grid: diffusers' mask processor needs multiples of 16 tokens)."""
    ref = AmusedPipeline.from_pretrained(full_hub_256, dtype=torch.float32)
    i2i, inp = reference_variant(ref, AmusedImg2ImgPipeline), reference_variant(ref, AmusedInpaintPipeline)
    for r in (ref, i2i, inp):
        r.set_progress_bar_config(disable=True)
    ours = Amused.from_pretrained(full_hub_256)
    photo = Image.fromarray((smooth_images(1, 300, 500, seed=3)[0].permute(1, 2, 0) * 255).byte().numpy())
    wide, mask = smooth_images(1, 256, 512, seed=4), torch.zeros(1, 1, 256, 512)
    mask[..., 64:192, 300:460] = 1.0
    cases = [(f"t2i {w}x{h}",
              lambda h=h, w=w, **o: ref("dog", height=h, width=w, num_inference_steps=2, generator=seeded(0), **o),
              lambda h=h, w=w, **o: ours("dog", height=h, width=w, steps=2, generator=seeded(0), **o),
              (h // 16, w // 16))
             for h, w in [(256, 384), (384, 256), (128, 128)]]
    cases += [
        ("img2img 500x300", lambda **o: i2i("dog", image=photo, num_inference_steps=2, generator=seeded(1), **o),
         lambda **o: ours.img2img("dog", photo, steps=2, generator=seeded(1), **o), (18, 31)),
        ("inpaint 512x256", lambda **o: inp("dog", image=wide, mask_image=mask, num_inference_steps=2,
                                           generator=seeded(2), **o),
         lambda **o: ours.inpaint("dog", wide, mask, steps=2, generator=seeded(2), **o), (16, 32)),
    ]
    full_size_runs(ref, ours, cases)


@pytest.fixture(scope="module")
def full_hub_512(tmp_path_factory, tiny_tokenizer_dir):
    """The full amused-512 configuration with random weights in the hub layout (fp32 files only)."""
    tok = SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else tiny_tokenizer_dir
    folder = tmp_path_factory.mktemp("hub") / "amused-512"
    save_hub_checkpoint(reference_pipeline("amused-512", tok, seed=8), folder, tok)
    yield folder
    shutil.rmtree(folder)


def test_full_amused_512_at_other_sizes_matches_diffusers(full_hub_512):
    """amused-512 halves its token grid inside: 512x768 (32x48 tokens, 16x24 in the transformer) matches diffusers;
    a size whose grid is odd is refused before any compute, naming sizes that work."""
    ref = AmusedPipeline.from_pretrained(full_hub_512, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = Amused.from_pretrained(full_hub_512)
    full_size_runs(ref, ours, [(
        "t2i 768x512", lambda **o: ref("dog", height=512, width=768, num_inference_steps=2, generator=seeded(0), **o),
        lambda **o: ours("dog", height=512, width=768, steps=2, generator=seeded(0), **o), (32, 48))])
    with pytest.raises(ValueError, match="height must be a multiple of 32 .* halves its token grid inside.*512 or 544"):
        ours("dog", height=528)
    with pytest.raises(ValueError, match=r"the image \(496x288 .* width must be a multiple of 32"):
        ours.img2img("dog", smooth_images(1, 288, 500, seed=0))


@pytest.mark.parametrize("L, dtype", [(256, torch.float32), (1024, torch.float32), (256, torch.float16)])
def test_unmask_step_matches_scheduler_at_full_size(L, dtype):
    """Every step of a 12-step run at the official grid sizes and codebook, on random logits: the float32 mask
    counts (127 of 256 and 511 of 1024 at step 7) and every random draw must agree with AmusedScheduler."""
    side, K, B, steps = int(L ** 0.5), 8192, 2, 12
    sched = AmusedScheduler(mask_token_id=8255)
    sched.set_timesteps(steps)
    temps, counts = torch.linspace(2.0, 0.0, steps), sampling_mask_counts(steps, L)
    logit_gen = seeded(0)
    ours = ref = torch.full((B, side, side), 8255)
    g_ours, g_ref = seeded(1), seeded(1)
    for i, t in enumerate(sched.timesteps):
        logits = (3 * torch.randn(B, K, side, side, generator=logit_gen)).to(dtype)
        ref = sched.step(logits, t, ref, generator=g_ref).prev_sample
        noise = draw_step_noise(B, L, K, dtype, torch.device("cpu"), g_ours, uniforms=i < steps - 1)
        ours = unmask_step(logits, ours, noise, counts[i], temps[i], mask_id=8255)
        assert torch.equal(ours, ref), f"step {i}"
        assert (ours == 8255).sum(dim=(1, 2)).tolist() == [counts[i].item()] * B
    assert (ours != 8255).all() and torch.equal(g_ours.get_state(), g_ref.get_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_categorical_is_torch_multinomial(dtype):
    """Our sync-free draw equals torch.multinomial(probs, 1): the same samples from the same random numbers
    (the generators end in the same state), on peaked and on flat distributions."""
    logits = torch.randn(300, 8192, generator=seeded(0), dtype=dtype) * torch.linspace(0.1, 20, 300, dtype=dtype)[:, None]
    probs = logits.softmax(-1)
    g_ours, g_ref = seeded(1), seeded(1)
    ours = sample_categorical(probs, torch.empty_like(probs).exponential_(1, generator=g_ours))
    assert ours.shape == (300, 1) and len(ours.unique()) > 100
    assert torch.equal(ours, torch.multinomial(probs, 1, generator=g_ref))
    assert torch.equal(g_ours.get_state(), g_ref.get_state())


def test_nan_logits_are_an_error_not_an_image(tiny, monkeypatch):
    """torch.multinomial rejects NaN probabilities on the host every step; we test once per generation."""
    _, ours, _ = tiny
    forward = ours.transformer.forward
    def overflowing(ids, conds, embedding_noise=None):
        logits = forward(ids, conds, embedding_noise)
        logits[0, 3, 1, 1] = float("nan")
        return logits
    monkeypatch.setattr(ours.transformer, "forward", overflowing)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        ours("a cat", steps=3, generator=seeded(0))


def test_fast_loop_equals_the_plain_loop(tiny):
    """The pipeline computes the prompt's conditions once and runs only the token path each step; a plain loop
    that recomputes the conditions every step (as diffusers' UVit2DModel does) must give the same tokens."""
    _, ours, _ = tiny
    steps, g = 8, 5.0
    fast = ours(PROMPTS, steps=steps, guidance_scale=g, generator=seeded(12), output_type="tokens")
    hidden, pooled = ours.encode_prompt(PROMPTS)
    neg_hidden, neg_pooled = ours.encode_prompt([""] * 2)
    hidden, pooled = torch.cat([neg_hidden, hidden]), torch.cat([neg_pooled, pooled])
    micro = torch.tensor([[32, 32, 0, 0, 6.0]] * 4)
    tokens, generator, temps = torch.full((2, 8, 8), MASK_ID), seeded(12), torch.linspace(2, 0, steps)
    counts, K = sampling_mask_counts(steps, 64), ours.transformer.cfg.codebook_size
    with torch.no_grad():
        for i in range(steps):
            conds = ours.transformer.encode_conditions(hidden, pooled, micro)
            uncond, cond = ours.transformer(torch.cat([tokens, tokens]), conds).chunk(2)
            noise = draw_step_noise(2, 64, K, torch.float32, torch.device("cpu"), generator, uniforms=i < steps - 1)
            tokens = unmask_step(uncond + g * (cond - uncond), tokens, noise, counts[i], temps[i], mask_id=MASK_ID)
    assert len(fast.unique()) > 5 and torch.equal(fast, tokens)


# ----------------------------------------------------------------------------------------------------
# exact=False: oneDNN matmuls on the CPU

needs_onednn = pytest.mark.skipif(not speed.onednn_available(), reason="this PyTorch build has no oneDNN")


@needs_onednn
def test_onednn_linear_is_a_linear_summed_in_another_order():
    """Within OneDNNLinear, F.linear on float32 CPU tensors is a float32 dot product summed in another order:
    against the float64 result, every value is within the rounding bound that holds for any summation order,
    K * 2^-24 * sum_k |x_k w_k| (Higham, Accuracy and Stability, §3.1; K = 768), for the input layouts the
    models produce (3-d, a permuted 4-d map, with and without bias, keyword arguments), and the mean error is
    within 2x the reference kernel's. The bits must differ from the reference kernel's somewhere, or oneDNN did
    not run. Anything else falls through to the reference."""
    g = seeded(0)
    w, b = torch.randn(3072, 768, generator=g), torch.randn(3072, generator=g)
    inputs = {"3-d": torch.randn(2, 256, 768, generator=g),
              "permuted 4-d": torch.randn(2, 768, 16, 16, generator=g).permute(0, 2, 3, 1)}
    for name, x in inputs.items():
        for bias in (None, b):
            exact = F.linear(x, w, bias)
            with torch.no_grad(), OneDNNLinear():
                fast = F.linear(x, weight=w, bias=bias)
            x64, w64, b64 = x.double(), w.double(), None if bias is None else bias.double()
            truth = F.linear(x64, w64, b64)
            bound = 769 * 2.0 ** -24 * F.linear(x64.abs(), w64.abs(), None if b64 is None else b64.abs())
            assert fast.shape == exact.shape and fast.dtype == torch.float32
            assert_nontrivial(name, fast)
            err, ref_err = (fast - truth).abs(), (exact - truth).abs()
            print(f"{name} bias={bias is not None}: error vs float64, max (mean): oneDNN {err.max():.2e} "
                  f"({err.mean():.2e}), MKL {ref_err.max():.2e} ({ref_err.mean():.2e}); bound >= {bound.min():.2e}")
            assert (err <= bound).all()
            assert err.mean() <= 2 * ref_err.mean()  # a tighter, empirical check: measured 1.4x MKL's mean error
            assert not torch.equal(fast, exact), f"{name}: bit-identical to MKL, so oneDNN did not run"

    x = inputs["3-d"][:, :8]
    with OneDNNLinear():  # autograd on: the reference kernel, which has a backward
        y = F.linear(x.requires_grad_(), w)
    assert torch.equal(y, F.linear(x, w)) and y.requires_grad
    with torch.no_grad(), OneDNNLinear():  # other dtypes are not ours to change
        assert torch.equal(F.linear(x.double(), w.double()), F.linear(x.double(), w.double()))


@needs_onednn
def test_inexact_mode_matches_diffusers(tiny):
    """exact=False on the CPU: U-ViT logits within 1e-5 of their scale of UVit2DModel's (oneDNN's sums, ~1e-7
    relative per matmul, compounded over the layers), and the same tokens as diffusers in text-to-image and
    image-to-image runs: the differences only matter where two candidates tie to ~1e-6, which these seeded runs
    do not meet (a failure here after a kernel change would mean such a tie, or a real bug: the logit check
    tells which). Images: atol 1e-4 (the VQ's attention linears run as oneDNN matmuls too)."""
    ref, exact, folder = tiny
    fast = Amused.from_pretrained(folder, exact=False)
    hidden, pooled = exact.encode_prompt(PROMPTS)
    micro = torch.tensor([[32, 32, 0, 0, 6.0]] * 2)
    ids = torch.randint(0, MASK_ID + 1, (2, 8, 8), generator=seeded(3))
    with torch.no_grad():
        ref_logits = ref.transformer(ids, hidden, pooled, micro)
        with OneDNNLinear():
            our_logits = fast.transformer(ids, fast.transformer.encode_conditions(hidden, pooled, micro))
    assert_close("exact=False logits", our_logits, ref_logits, atol=1e-5 * ref_logits.abs().max().item())

    kwargs = dict(negative_prompt=["blurry", "low quality"], num_images_per_prompt=2)
    assert_same_run("exact=False t2i",
                    lambda **o: ref(PROMPTS, num_inference_steps=12, generator=seeded(4), **kwargs, **o),
                    lambda **o: fast(PROMPTS, steps=12, generator=seeded(4), **kwargs, **o))
    image = smooth_images(2, 32, 32, seed=5)
    i2i = reference_variant(ref, AmusedImg2ImgPipeline)
    assert_same_run("exact=False img2img",
                    lambda **o: i2i(PROMPTS, image=image, strength=0.6, num_inference_steps=12, generator=seeded(6), **o),
                    lambda **o: fast.img2img(PROMPTS, image, strength=0.6, steps=12, generator=seeded(6), **o))


def test_inexact_mode_needs_onednn(tiny, monkeypatch):
    monkeypatch.setattr(speed, "onednn_available", lambda: False)
    with pytest.raises(ValueError, match="oneDNN"):
        Amused.from_pretrained(tiny[2], exact=False)


# ----------------------------------------------------------------------------------------------------
# Invariants of our loop, on their own


def record_steps(call):
    seen = []
    out = call(callback=lambda step, tokens: seen.append((step, tokens.clone())))
    return out, seen


@pytest.mark.parametrize("mode", ["t2i", "img2img", "inpaint"])
def test_sampling_invariants(tiny, mode):
    _, ours, _ = tiny
    steps = 10
    image, mask = smooth_images(1, 32, 32, seed=8), square_mask("tensor")
    call = {
        "t2i": lambda **o: ours(PROMPTS, steps=steps, generator=seeded(9), output_type="tokens", **o),
        "img2img": lambda **o: ours.img2img(PROMPTS, image, strength=0.6, steps=steps, generator=seeded(9), output_type="tokens", **o),
        "inpaint": lambda **o: ours.inpaint(PROMPTS, image, mask, steps=steps, generator=seeded(9), output_type="tokens", **o),
    }[mode]
    out, seen = record_steps(call)
    L = 8 * 8
    assert [s for s, _ in seen] == list(range(steps - len(seen), steps))  # the last len(seen) steps, in order
    for (_, before), (step, after) in zip(seen, seen[1:]):
        committed = before != MASK_ID
        assert torch.equal(after[committed], before[committed]), f"step {step} changed a committed token"
        n_before, n_after = (before == MASK_ID).sum((1, 2)), (after == MASK_ID).sum((1, 2))
        assert (n_after < n_before).all() | (n_before == 0).all(), "the masked count must fall every step"
        if mode == "t2i":  # the schedule alone decides the count (inpaint scales it by the masked fraction)
            count = int(sampling_mask_counts(steps, L)[step])
            expected = 0 if step == steps - 1 else max(1, min(count, int(n_before[0]) - 1))
            assert n_after.tolist() == [expected] * 2
    assert torch.equal(seen[-1][1], out) and (out != MASK_ID).all()  # the last step leaves none masked


def test_schedule_counts():
    """sampling_mask_counts: starts near L, falls monotonically, ends at 0, and rounds in float32 like the reference."""
    for steps, L in [(12, 256), (12, 1024), (16, 256), (2, 1024)]:
        counts = sampling_mask_counts(steps, L).tolist()
        assert counts[-1] == 0 and counts[0] < L
        assert all(a > b for a, b in zip(counts, counts[1:]))
    assert sampling_mask_counts(12, 256)[7] == 127  # float32 cos(pi/3) = 0.49999997; float64 would give 128
    assert sampling_mask_counts(10, 100, "linear")[4] == 50
    assert sampling_mask_counts(10, 100, "linear", torch.tensor(0.5)).tolist()[:5] == [45, 40, 35, 30, 25]
    with pytest.raises(ValueError, match="unknown masking schedule"):
        sampling_mask_counts(12, 256, "square")


def test_same_seed_same_result_and_converted_file(tiny, tmp_path):
    _, ours, hub = tiny
    a = ours("a cat", steps=4, generator=seeded(3), output_type="tokens")
    b = ours("a cat", steps=4, generator=seeded(3), output_type="tokens")
    c = ours("a cat", steps=4, generator=seeded(4), output_type="tokens")
    assert torch.equal(a, b) and not torch.equal(a, c)
    out = tmp_path / "tiny.safetensors"
    convert_weights.convert(hub, out)
    assert torch.equal(Amused.from_pretrained(out)("a cat", steps=4, generator=seeded(3), output_type="tokens"), a)


@pytest.mark.parametrize("mode", ["t2i", "img2img", "inpaint"])
def test_one_generator_per_image_makes_each_image_as_if_alone(tiny, mode):
    """generator=[g0, g1, ...]: image i is what a batch of one with g_i gives (mixed prompts, guidance batched).
    CPU fp32: the U-ViT's matmuls on 4 images sum each row as on 1 here, so the tokens are identical."""
    _, ours, _ = tiny
    image, mask = smooth_images(1, 32, 32, seed=8), square_mask("tensor")
    prompts, seeds = ["a cat", "a dog", "a cat", "an astronaut riding a horse!"], [5, 6, 7, 5]
    run = {
        "t2i": lambda p, g: ours(p, steps=6, generator=g, output_type="tokens"),
        "img2img": lambda p, g: ours.img2img(p, image, strength=0.7, steps=6, generator=g, output_type="tokens"),
        "inpaint": lambda p, g: ours.inpaint(p, image, mask, steps=6, generator=g, output_type="tokens"),
    }[mode]
    batch = run(prompts, [seeded(s) for s in seeds])
    alone = torch.cat([run(p, [seeded(s)]) for p, s in zip(prompts, seeds)])
    assert_nontrivial(f"{mode} tokens", batch)
    assert torch.equal(batch, alone)
    assert torch.equal(alone[:1], run(prompts[0], seeded(seeds[0])))  # a list of one = that generator alone
    assert not torch.equal(batch[0], batch[2])  # same prompt, other seed


def test_a_seed_is_a_cpu_generator_seeded_with_it(tiny):
    """seed=7 in the three methods draws what generator=torch.Generator().manual_seed(7) draws."""
    _, ours, _ = tiny
    image, mask = smooth_images(1, 32, 32, seed=8), square_mask("tensor")
    for run in (lambda **kw: ours("a cat", steps=3, output_type="tokens", **kw),
                lambda **kw: ours.img2img("a cat", image, strength=0.7, steps=3, output_type="tokens", **kw),
                lambda **kw: ours.inpaint("a cat", image, mask, steps=3, output_type="tokens", **kw)):
        seeded_run = run(seed=7)
        assert torch.equal(seeded_run, run(generator=seeded(7))) and not torch.equal(seeded_run, run(seed=8))


def test_dtype_names_and_devices(tiny):
    """dtype takes sample.py's --dtype names and torch's ("bf16" = "bfloat16" = torch.bfloat16); anything else,
    or a dtype name given as the device, is one ValueError saying what is accepted."""
    _, _, hub = tiny
    cpu = torch.device("cpu")
    for names, dtype in ((("fp32", "float32"), torch.float32), (("fp16", "float16"), torch.float16),
                         (("bf16", "bfloat16"), torch.bfloat16)):
        assert all(speed.resolve_dtype(n, cpu, exact=True)[:2] == (dtype, False) for n in names)
    pipe = Amused.from_pretrained(hub, dtype="bf16")
    assert pipe.dtype == next(pipe.transformer.parameters()).dtype == torch.bfloat16
    for bad in ("cuda", "fp8", "torch.float32", torch.int64):
        with pytest.raises(ValueError, match="dtype must be one of fp32, fp16, bf16, float32, float16, bfloat16, "
                                             "auto, int8"):
            Amused.from_pretrained(hub, dtype=bad)
    with pytest.raises(ValueError, match="device must be .*got 'bf16' .the precision is the dtype= keyword"):
        Amused.from_pretrained(hub, "bf16")
    # "auto" follows exact: float32 with the API's default exact=True (parity), the fast precision without it
    assert speed.resolve_dtype("auto", cpu, exact=True)[0] == torch.float32
    assert speed.resolve_dtype("auto", cpu, exact=False)[0] == speed.auto_dtype(cpu, exact=False)[0]


def test_output_types(tiny):
    _, ours, _ = tiny
    pil = ours("a cat", steps=2, generator=seeded(0))
    pt = ours("a cat", steps=2, generator=seeded(0), output_type="pt")
    assert isinstance(pil, list) and pil[0].size == (32, 32) and pil[0].mode == "RGB"
    assert pt.shape == (1, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    assert torch.equal(torch.from_numpy(__import__("numpy").array(pil[0])).permute(2, 0, 1), (pt[0] * 255).round().byte())


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_arguments(tiny):
    _, ours, _ = tiny
    image = smooth_images(1, 32, 32, seed=0)
    cases = [
        (lambda: ours("a", steps=0), ValueError, "steps must be an integer >= 1"),
        (lambda: ours("a", guidance_scale=-1.0), ValueError, "guidance_scale must be >= 0"),
        (lambda: ours("a", output_type="np"), ValueError, "output_type"),
        (lambda: ours("a", num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
        (lambda: ours(["a", 3]), TypeError, "prompt must be"),
        (lambda: ours(PROMPTS, negative_prompt=["x"]), ValueError, "negative_prompt must be a string or a list of 2"),
        (lambda: ours.img2img("a", image, strength=0.0), ValueError, r"strength must be in \(0, 1\]"),
        (lambda: ours.img2img("a", image, strength=1.5), ValueError, r"strength must be in \(0, 1\]"),
        (lambda: ours("a", height=36), ValueError, "height must be a multiple of 8 .*use e.g. 32 or 40"),
        (lambda: ours("a", width=4), ValueError, "width must be a multiple of 8"),
        (lambda: ours("a", width=32.0), ValueError, "width must be a multiple of 8"),
        (lambda: ours("a", height=160, width=136), ValueError, r"136x160 has 21.2x the pixels .* bound of 16x"),
        (lambda: ours.img2img("a", smooth_images(1, 44, 32, 0)), ValueError, "the image .32x44 .* multiple of 8"),
        (lambda: ours.img2img("a", smooth_images(1, 3, 32, 0)), ValueError, "at least 4 pixels"),
        (lambda: ours.img2img("a", "cat.png"), TypeError, "PIL image or a torch tensor"),
        (lambda: ours.inpaint("a", image, torch.ones(1, 1, 32, 16)), ValueError, "same aspect ratio"),
        (lambda: ours.inpaint("a", image, torch.ones(1, 1, 32, 32), strength=0.05), ValueError, "nothing would fill"),
        (lambda: ours.inpaint("a", image, Image.new("L", (32, 32)), strength=0.5), ValueError, "no token to repaint"),
        (lambda: ours.img2img(PROMPTS * 2, smooth_images(3, 32, 32, 0)), ValueError, "3 images for 4 prompts"),
        (lambda: ours(PROMPTS, generator=[seeded(0)]), ValueError, "a list of one per image"),
        (lambda: ours("a", generator=0), TypeError, "generator must be a torch.Generator .* pass seed=0"),
        (lambda: ours("a", generator=seeded(1), seed=1), ValueError, "a generator or a seed, not both"),
        (lambda: ours("a", seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*64\)"),
        (lambda: ours("a", seed=1.0), ValueError, "seed must be an integer"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_image_not_a_multiple_of_the_token_size_is_resized_like_the_reference(tiny):
    ref, ours, _ = tiny
    i2i = reference_variant(ref, AmusedImg2ImgPipeline)
    image = smooth_images(1, 34, 35, seed=1)  # -> 32x32, nearest, as VaeImageProcessor does for tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = i2i("a cat", image=image, num_inference_steps=6, generator=seeded(2), output_type="latent").images
    with pytest.warns(UserWarning, match="not a multiple of 4: resized to 32x32"):
        got = ours.img2img("a cat", image, steps=6, generator=seeded(2), output_type="tokens")
    assert torch.equal(got, expected)


def test_non_finite_settings_are_refused(tiny):
    _, ours, _ = tiny
    cases = [
        (dict(guidance_scale=float("inf")), "guidance_scale must be >= 0 and finite"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be >= 0 and finite"),
        (dict(aesthetic_score=float("nan")), "aesthetic_score must be finite"),
        (dict(temperature=(2.0, float("inf"))), "temperature must be a finite number or a pair"),
        (dict(temperature=(1, 2, 3)), "temperature must be a finite number or a pair"),
        (dict(crop_coords=(0, float("nan"))), "crop_coords must be two finite numbers"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ours("a cat", steps=2, generator=seeded(0), **kwargs)


# ----------------------------------------------------------------------------------------------------
# PIL images of every mode Pillow opens: read right, or refused with a clear error

GRADIENT = torch.linspace(0, 255, 32).round().expand(32, 32)  # (H, W): 0 at the left to 255 at the right


def gradient_in_mode(mode: str) -> Image.Image:
    import numpy as np
    from PIL import ImageCms

    gray = GRADIENT.numpy().astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * 257)  # 0..65535, as a 16-bit PNG opens
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) / 255)
    if mode == "LAB":
        rgb = Image.fromarray(gray).convert("RGB")
        return ImageCms.profileToProfile(rgb, ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"),
                                         outputMode="LAB")
    return Image.fromarray(gray).convert(mode)


@pytest.mark.parametrize("mode, atol", [("L", 0), ("P", 0), ("RGB", 0), ("RGBA", 0), ("LA", 0), ("PA", 0),
                                        ("CMYK", 0), ("YCbCr", 0), ("LAB", 1), ("I;16", 0), ("F", 0)])
def test_every_pillow_mode_is_read_right(mode, atol):
    """Every channel of the pipeline's input equals the gradient the image was made from, within `atol` / 255
    (LAB: Pillow's conversion back to RGB rounds by one level). A 16-bit image converted by Pillow alone would be
    white almost everywhere."""
    image = gradient_in_mode(mode)
    assert image.mode == mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels = amused.preprocess_image(image, 32)  # (1, 3, 32, 32) in [0, 1]
    diff = (pixels[0] * 255 - GRADIENT).abs().max().item()
    print(f"{mode}: max deviation {diff:.2f} / 255")
    assert pixels.shape == (1, 3, 32, 32) and diff <= atol + 1e-3
    transparency = [w for w in caught if "transparency" in str(w.message)]
    assert len(transparency) == (mode in ("RGBA", "LA", "PA"))


def test_pillow_modes_without_a_known_range_are_refused():
    import numpy as np

    with pytest.raises(ValueError, match="32-bit integer pixels"):
        amused.preprocess_image(Image.fromarray(GRADIENT.numpy().astype(np.int32) * 1000), 32)
    with pytest.raises(ValueError, match=r"F pixels lie in \[0, 255\], outside \[0, 1\]"):
        amused.preprocess_image(Image.fromarray(GRADIENT.numpy().astype(np.float32)), 32)
    nan = GRADIENT.numpy().astype(np.float32) / 255
    nan[3, 3] = float("nan")
    with pytest.raises(ValueError, match="outside"):
        amused.preprocess_image(Image.fromarray(nan), 32)


def test_a_16_bit_mask_selects_what_it_shows():
    """The right half of a 16-bit mask is white (65535), the left black, except a dim 1000/65535 stripe that
    Pillow's own conversion would clip to white."""
    import numpy as np

    values = np.zeros((32, 32), dtype=np.uint16)
    values[:, 16:] = 65535
    values[:, :4] = 1000
    repaint = amused.preprocess_mask(Image.fromarray(values), (32, 32), (8, 8))  # (1, 8, 8)
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[..., 4:] = True
    assert torch.equal(repaint, expected)
