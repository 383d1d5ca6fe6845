"""amused.py: the aMUSEd pipeline. Text (and optionally an image and a mask) in, tokens and images out.

How sampling works (MUSE, Chang et al. 2023, §2.6; aMUSEd, Patil et al. 2024, §3):
  1. Start from a token grid where every position holds the mask id (text-to-image), or from the VQ tokens of
     an image with some of them masked (image-to-image: a random subset; inpainting: the masked region).
  2. Each step, the U-ViT predicts a distribution over the codebook at every position. We sample a token at
     every masked position, then keep the most confident of them and mask the rest again. How many stay masked
     after step i follows a schedule (cosine for generation, linear for inpainting), so the grid fills up over
     ~12 steps. Confidence is the sampled token's probability, noised with Gumbel noise whose temperature falls
     from 2 to 0 (randomness early, greed late).
  3. Classifier-free guidance: each step runs the model on [negative prompt; prompt] in one batch and moves the
     logits away from the negative prompt's: uncond + g * (cond - uncond).
  4. The VQGAN decodes the final grid to pixels.

Matches diffusers' AmusedPipeline, AmusedImg2ImgPipeline, AmusedInpaintPipeline and AmusedScheduler: same seed
(a torch.Generator), same tokens, drawing the same random numbers in the same order (tests/test_amused.py).
"""
import json
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open

import clip_text
import quantize
import speed
import uvit
import vqgan
from convert_weights import Checkpoint, load_checkpoint

# ----------------------------------------------------------------------------------------------------
# Schedules: pure functions, shared by sampling and training (train.py)

SCHEDULES = ("cosine", "linear")


def mask_ratio(progress: torch.Tensor, schedule: str = "cosine") -> torch.Tensor:
    """Fraction of tokens masked at `progress` in [0, 1] (float tensor): 1 at 0, 0 at 1."""
    if schedule == "cosine":
        return torch.cos(progress * math.pi / 2)
    if schedule == "linear":
        return 1 - progress
    raise ValueError(f"unknown masking schedule {schedule!r}; expected one of {SCHEDULES}")


def sampling_mask_counts(steps: int, seq_len: int, schedule: str = "cosine",
                         starting_mask_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """How many of `seq_len` tokens stay masked after each sampling step of `steps`, before the clamps of
    unmask_step: the floor of seq_len * mask_ratio, (steps,) long; 0 after the last step. On the device of
    starting_mask_ratio when it is a tensor (inpainting's masked fraction), so that reading it costs no sync.

    Matches reference: AmusedScheduler.step computes this in float32 tensors: (step + 1) / steps, the cosine,
    the product and the floor. The float32 rounding matters: at steps=12, step=7 the cosine of 2/3 * pi/2 is
    0.49999997, so 127 of 256 tokens stay masked, where float64 would give 128. Each cosine is taken on the CPU, one
    0-d tensor at a time as the reference does, so the counts depend neither on the device's cos nor on a SIMD
    kernel's."""
    ratios = torch.stack([mask_ratio(torch.tensor(step + 1) / steps, schedule) for step in range(steps)])  # float32
    if isinstance(starting_mask_ratio, torch.Tensor):
        ratios = ratios.to(starting_mask_ratio.device)
    counts = (seq_len * (starting_mask_ratio * ratios)).floor().long()
    counts[-1] = 0  # the last step commits every token
    return counts


def training_mask_count(t: torch.Tensor, seq_len: int, min_masking_rate: float = 0.0,
                        schedule: str = "cosine") -> torch.Tensor:
    """How many of seq_len tokens a training example masks at times t (B,) in [0, 1) -> (B,) long, each >= 1:
    seq_len * mask_ratio(t) *rounded* (where the sampler floors), at least min_masking_rate of them.

    Matches reference: train_amused.py: round(L * max(mask_ratio(t), min_masking_rate)), then at least one
    (cos(pi/2 * t) reaches 0 as t -> 1, and an example with nothing masked would have no loss)."""
    ratio = mask_ratio(t, schedule).clamp(min=min_masking_rate)
    return (seq_len * ratio).round().clamp(min=1).long()


def temperature_schedule(temperature, steps: int) -> torch.Tensor:
    """The Gumbel temperature of each of `steps` steps, (steps,) float32: from temperature[0] to temperature[1] for
    a pair, from temperature to 0.01 for a number. Matches reference: AmusedScheduler.set_timesteps."""
    if isinstance(temperature, (tuple, list)):
        return torch.linspace(temperature[0], temperature[1], steps)
    return torch.linspace(temperature, 0.01, steps)


# ----------------------------------------------------------------------------------------------------
# One sampling step. Its random numbers are drawn first (draw_step_noise), with the explicit generator; what
# follows is deterministic and sync-free, so that torch.compile can capture the whole step as one graph.


class StepNoise(NamedTuple):
    """The random numbers of one sampling step, in the order the reference draws them."""
    exponential: torch.Tensor  # (B * L, K) Exp(1): the categorical draw at every position (sample_categorical)
    uniform: torch.Tensor | None  # (B, L) in [0, 1): the Gumbel noise of the confidence; None on the last step


def draw_step_noise(B: int, L: int, K: int, dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator | None, last: bool) -> StepNoise:
    """Draw step noise on the generator's device (so a CPU generator gives diffusers' CPU draws anywhere), then
    move it to `device`. dtype: the logits'.

    Matches reference: AmusedScheduler.step moves the probabilities to the generator's device and, on the CPU,
    to float32 (torch.multinomial has no CPU half): the exponentials are float32 on the CPU, in the logits' dtype
    elsewhere. The uniforms come from scheduling_amused.gumbel_noise: uniform_ in the logits' dtype (so fp16 runs
    draw fp16 uniforms). None on the last step, which re-masks nothing."""
    where = generator.device if generator is not None else device
    exp_dtype = torch.float32 if where.type == "cpu" else dtype
    q = torch.empty(B * L, K, dtype=exp_dtype, device=where).exponential_(1, generator=generator)
    u = None if last else torch.zeros(B, L, dtype=dtype, device=where).uniform_(0, 1, generator=generator)
    return StepNoise(q.to(device), None if u is None else u.to(device))


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniforms u. Matches reference: clamped away from 0 before each log."""
    return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))


def sample_categorical(probs: torch.Tensor, exponential: torch.Tensor) -> torch.Tensor:
    """One draw from each row of probs (N, K) -> (N, 1), given exponential = Exp(1) noise (N, K):
    torch.multinomial(probs, 1, generator=g) exactly, when exponential was drawn from g as draw_step_noise does.

    multinomial draws one sample by the Gumbel-max trick (its n_sample == 1 path in ATen's Distributions.cpp):
    q ~ Exp(1) for every entry, then argmax(probs / q). We do the same operations, so the random numbers, their
    order and the result are the same, but skip its two validity checks, which read values back to the host: a
    sync every step on a GPU. Non-finite logits are caught once per generation instead (generate).
    """
    return (probs / exponential).argmax(dim=-1, keepdim=True)


def unmask_step(logits, tokens, noise: StepNoise, n_masked: torch.Tensor, temperature: torch.Tensor, *,
                mask_id: int) -> torch.Tensor:
    """Sample every masked position, then re-mask the least confident ones (diffusers AmusedScheduler.step).

    logits: (B, K, h, w) guided logits over the codebook; tokens: (B, h, w) long, mask_id where masked; noise:
    draw_step_noise's; n_masked: 0-d, how many the schedule leaves masked (sampling_mask_counts); temperature: 0-d,
    this step's Gumbel temperature. Returns the new tokens (B, h, w).
    """
    B, K, h, w = logits.shape
    L = h * w
    tokens = tokens.reshape(B, L)
    logits = logits.reshape(B, K, L).permute(0, 2, 1)  # (B, L, K)
    masked = tokens == mask_id  # (B, L)
    probs = logits.softmax(dim=-1)  # (B, L, K), in the model's dtype like the reference

    # A candidate for every position; committed tokens never change.
    pred = sample_categorical(probs.reshape(B * L, K), noise.exponential).view(B, L)
    pred = torch.where(masked, pred, tokens)
    if noise.uniform is None:
        return pred.view(B, h, w)  # the last step commits everything

    # How many to re-mask: the schedule's count, but fewer than are masked now, and at least one.
    n_remask = torch.minimum(masked.sum(dim=-1, keepdim=True) - 1, n_masked).clamp(min=1)  # (B, 1)

    # Confidence: log-probability of the sampled token plus annealed Gumbel noise; committed tokens get the
    # largest finite value so they are never chosen for re-masking.
    chosen = probs.gather(-1, pred[..., None])[..., 0]  # (B, L)
    chosen = torch.where(masked, chosen, torch.finfo(chosen.dtype).max)
    # Matches reference: the temperature is a float32 (1, 1) tensor there, so in fp16 runs the confidence is
    # promoted to float32 (a 0-d tensor would not promote).
    confidence = torch.log(chosen.clamp(1e-20)) + temperature.reshape(1, 1) * gumbel(noise.uniform)
    cutoff = confidence.sort(dim=-1).values.gather(1, n_remask)  # the n-th smallest confidence, (B, 1)
    return torch.where(confidence < cutoff, mask_id, pred).view(B, h, w)


def sampling_step(transformer: uvit.UViT, conds: uvit.Conditions, tokens: torch.Tensor, noise: StepNoise,
                  n_masked: torch.Tensor, temperature: torch.Tensor, *, mask_id: int,
                  guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on tokens (B, h, w) -> (new tokens (B, h, w), whether every logit was finite (0-d bool)).
    No random draws and no host syncs: speed.compile_step captures it whole (fullgraph)."""
    guided = guidance_scale > 1.0  # matches reference: guidance only when strictly above 1
    # 1. Logits over the codebook at every position; with guidance, one batch [negative; positive].
    logits = transformer(torch.cat([tokens, tokens]) if guided else tokens, conds)  # (2B or B, K, h, w)
    # 2. Classifier-free guidance: away from the negative prompt's prediction, towards the prompt's.
    if guided:
        uncond, cond = logits.chunk(2)
        logits = uncond + guidance_scale * (cond - uncond)  # (B, K, h, w)
    # NaN or +inf logits make NaN probabilities, which torch.multinomial would reject with a host-side check
    # every step (sample_categorical skips it): the same test, kept on the device.
    finite = logits.amax() < math.inf
    # 3. Sample every masked position, keep the most confident samples, re-mask the rest.
    return unmask_step(logits, tokens, noise, n_masked, temperature, mask_id=mask_id), finite


# ----------------------------------------------------------------------------------------------------
# The sampling loop


@torch.no_grad()
def generate(transformer: uvit.UViT, conds: uvit.Conditions, tokens: torch.Tensor, *, mask_id: int, steps: int,
             start: int = 0, guidance_scale: float = 10.0, temperatures: torch.Tensor, schedule: str = "cosine",
             starting_mask_ratio: float | torch.Tensor = 1.0, generator: torch.Generator | None = None,
             callback=None, step_fn=sampling_step) -> torch.Tensor:
    """Steps start..steps-1 of a `steps`-step schedule on tokens (B, h, w), mask_id where masked -> the final
    tokens (B, h, w), none masked. Text to image starts at 0 from an all-masked grid; image to image and
    inpainting start later, from an image's tokens with some masked.

    conds: the U-ViT's conditions for [negative prompts; prompts] (2B) when guidance_scale > 1, else for the prompts
    (B). temperatures: (steps,), the Gumbel temperature of each step. callback(step, tokens) after every step.
    step_fn: sampling_step, or the same compiled (speed.compile_step).
    """
    B, h, w = tokens.shape
    K, dtype = transformer.cfg.codebook_size, transformer.mlm_layer.conv2.weight.dtype  # the logits' size and dtype
    # The schedule's counts and temperatures on the device, before the loop: nothing inside it reads back to the host.
    counts = sampling_mask_counts(steps, h * w, schedule, starting_mask_ratio).to(tokens.device)
    temperatures = temperatures.to(tokens.device)
    finite = torch.ones((), dtype=torch.bool, device=tokens.device)  # read once, after the loop
    for step in range(start, steps):
        noise = draw_step_noise(B, h * w, K, dtype, tokens.device, generator, last=step == steps - 1)
        tokens, step_finite = step_fn(transformer, conds, tokens, noise, counts[step], temperatures[step],
                                      mask_id=mask_id, guidance_scale=guidance_scale)
        finite &= step_finite
        if callback is not None:
            callback(step, tokens)
    if not finite:
        why = ("in float16 an overflow: rerun in torch.bfloat16 or torch.float32" if dtype == torch.float16
               else "check that the weights, guidance_scale and micro-conditioning are finite")
        raise FloatingPointError(f"the U-ViT's logits were NaN or infinite at some step ({dtype}; {why})")
    return tokens


# ----------------------------------------------------------------------------------------------------
# Images in and out

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_8bit(image: Image.Image) -> Image.Image:
    """A PIL image whose mode Pillow converts correctly to "RGB" and "L": 16-bit grayscale (PNG's "I;16", or "I"
    from a PNG in older Pillow) scaled from 0..65535 and float images ("F") from [0, 1] to an 8-bit "L"; any other
    mode as it is. Pillow's own convert would clip 16-bit values at 255: an almost white image.
    ValueError for an image whose value range is unknown (32-bit integers, floats outside [0, 1])."""
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        full_scale = 65535
    elif image.mode == "F":
        full_scale = 1
    elif image.mode == "I":
        raise ValueError("the image has 32-bit integer pixels (Pillow mode I), whose range is unknown: save it with "
                         "8 or 16 bits per channel")
    else:
        return image
    values = np.asarray(image, dtype=np.float64)
    if not (values.min() >= 0 and values.max() <= full_scale):  # written so that NaN fails too
        lo, hi = values.min() + 0.0, values.max() + 0.0  # + 0.0: -0.0 prints as 0
        raise ValueError(f"the image's {image.mode} pixels lie in [{lo:.4g}, {hi:.4g}], "
                         f"outside [0, {full_scale}]: save it as an 8- or 16-bit image")
    return Image.fromarray(np.round(values / full_scale * 255).astype(np.uint8), mode="L")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit PIL image -> (1, C, H, W) float32 in [0, 1], as diffusers' pil_to_numpy then numpy_to_pt."""
    pixels = torch.from_numpy(np.array(image).astype(np.float32) / 255.0)
    return pixels.reshape(image.height, image.width, -1).permute(2, 0, 1)[None]


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> "RGB" (to_8bit first); an alpha channel is dropped with a warning, as diffusers'
    load_image drops it (the colours stored under transparent pixels show)."""
    image = to_8bit(image)
    if image.mode == "RGB":
        return image
    if image.mode in ALPHA_MODES or "transparency" in image.info:  # P and L images may carry a transparent colour
        warnings.warn(f"the image has transparency (mode {image.mode}): dropped, as diffusers' load_image does",
                      stacklevel=3)
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"Pillow cannot convert this {image.mode} image to RGB ({e}): save it as RGB") from e


def preprocess_image(image, size: int, multiple: int = 16) -> torch.Tensor:
    """An image (PIL, or tensor (B, 3, H, W) / (3, H, W) in [0, 1]) -> (B, 3, size, size) in [0, 1].

    Matches reference: VaeImageProcessor(vae_scale_factor=16).preprocess: a side that is not a multiple of 16
    (the VQ's pixels per token) is cut down to one by resizing (Lanczos for PIL, nearest for tensors). We warn
    when that happens, and since the U-ViT only works on its own grid size, any other size is an error rather
    than a silent resize."""
    if not isinstance(image, (Image.Image, torch.Tensor)):
        raise TypeError(f"image must be a PIL image or a torch tensor (for a file: PIL.Image.open(path)), "
                        f"got {type(image).__name__}")
    if isinstance(image, Image.Image):
        image = pil_to_rgb(image)  # the reference would pass an RGBA image's 4 channels on and fail
    H, W = (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])
    h_cut, w_cut = H - H % multiple, W - W % multiple
    if (h_cut, w_cut) != (H, W):
        warnings.warn(f"image is {W}x{H}, not a multiple of {multiple}: resized to {w_cut}x{h_cut} like the "
                      f"reference", stacklevel=3)
    if (h_cut, w_cut) != (size, size):
        raise ValueError(f"image is {W}x{H}; this model works on {size}x{size} images: resize or crop it first")
    if isinstance(image, Image.Image):
        return pil_to_tensor(image.resize((w_cut, h_cut), resample=Image.LANCZOS))
    t = image[None] if image.ndim == 3 else image
    if t.ndim != 4 or t.shape[1] != 3 or not t.is_floating_point():
        raise ValueError(f"an image tensor must be floats (B, 3, H, W) or (3, H, W) in [0, 1], "
                         f"got {image.dtype} {tuple(image.shape)}")
    t = t.float()
    return F.interpolate(t, size=(h_cut, w_cut)) if (h_cut, w_cut) != (H, W) else t


def preprocess_mask(mask, image_hw: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """A mask (PIL, any mode; or tensor (H, W), (1, H, W), (B, 1, H, W)), white = repaint -> (B, h, w) bool.

    Matches reference: the inpaint pipeline's mask processor resizes the mask straight to the token grid
    (Lanczos for PIL after converting to grayscale, nearest for tensors), then a token is repainted where the
    resized value is >= 0.5."""
    if isinstance(mask, Image.Image):
        size = (mask.height, mask.width)
    elif isinstance(mask, torch.Tensor):
        size = tuple(mask.shape[-2:])
    else:
        raise TypeError(f"mask must be a PIL image or a torch tensor, got {type(mask).__name__}")
    if size[0] * image_hw[1] != size[1] * image_hw[0]:
        raise ValueError(f"mask is {size[1]}x{size[0]} but the image is {image_hw[1]}x{image_hw[0]}: "
                         f"they must have the same aspect ratio")
    if isinstance(mask, Image.Image):
        m = pil_to_tensor(to_8bit(mask).convert("L").resize((grid[1], grid[0]), resample=Image.LANCZOS))
    else:
        m = F.interpolate(mask.reshape(-1, 1, *size).float(), size=grid)  # nearest
    return (m >= 0.5).reshape(-1, *grid)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded like the reference's postprocess."""
    arr = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]


# ----------------------------------------------------------------------------------------------------
# The pipeline

OUTPUT_TYPES = ("pil", "pt", "tokens")


class Amused:
    """Text-to-image, image-to-image and inpainting with aMUSEd.

        pipe = Amused.from_pretrained("amused-256")        # hub folder, converted file or hub repo id
        images = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, ckpt: Checkpoint, device="cpu", dtype: torch.dtype | str = torch.float32, exact: bool = True):
        """dtype: a torch dtype; "auto": the fastest precision the device runs natively (speed.auto_dtype; float32
        when exact); "int8": the U-ViT's linear layers in int8 (quantize.py), the rest as "auto". A checkpoint whose
        U-ViT is int8 already (convert_weights.py --dtype int8) stays so. exact: on the CPU, run every operation as
        the reference does, so that float32 tokens and images equal diffusers' bit for bit; exact=False is faster
        there, and not bit-exact (speed.py)."""
        device = torch.device(device)
        speed.check(device, exact)
        dtype, int8, self.dtype_reason = speed.resolve_dtype(dtype, device, exact)
        stored_int8 = quantize.is_int8(ckpt.transformer)  # an int8 file
        self.int8 = int8 or stored_int8
        if self.int8:
            quantize.check(device)  # a clear error, before anything moves, where int8 matmuls do not run
        if int8 and not stored_int8:
            quantize.quantize_(ckpt.transformer)  # from the checkpoint's weights, before a cast to dtype
        self.tokenizer: clip_text.CLIPTokenizer = ckpt.tokenizer
        self.text_encoder: clip_text.CLIPTextEncoder = ckpt.text_encoder.to(device, dtype)
        self.transformer: uvit.UViT = ckpt.transformer.to(device, dtype)
        # half-precision VQ weights follow the checkpoint's force_upcast (see vqgan.VQModel.upcast)
        self.vqvae: vqgan.VQModel = ckpt.vqvae.to(device, dtype, memory_format=speed.vq_memory_format(device))
        self.mask_id = ckpt.mask_token_id
        self.schedule = ckpt.masking_schedule  # of text to image and image to image; inpainting's is linear
        self.device, self.dtype, self.exact = device, dtype, exact
        self.step_fn = sampling_step  # compile() swaps in the compiled step

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype | str = torch.float32, variant: str | None = None,
                        exact: bool = True):
        """path: a hub-layout folder, a file written by convert_weights.py, or a hub repo id (downloaded). The
        weights are cast to `dtype` as they are read (int8: quantised as read): never held in the file's dtype and
        in `dtype` at once."""
        cast, int8, _ = speed.resolve_dtype(dtype, torch.device(device), exact)
        return cls(load_checkpoint(path, variant, cast, int8), device, dtype, exact)

    def compile(self) -> None:
        """From the next call on, sample with the whole step compiled (speed.compile_step). The first call of each
        new shape (batch size, guidance on or off) compiles: tens of seconds."""
        self.step_fn = speed.compile_step(sampling_step, self.device)

    @property
    def resolution(self) -> int:
        """Image side in pixels: 256 (amused-256) or 512 (amused-512)."""
        return self.transformer.cfg.sample_size * self.vqvae.cfg.downsample_factor

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> CLIP penultimate hidden states (B, 77, D) and projected pooled embeddings (B, P)."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))

    @torch.no_grad()
    def conditions(self, prompts: list[str], negative_prompt, n: int, guided: bool, size: tuple[int, int],
                   aesthetic_score: float, crop_coords) -> uvit.Conditions:
        """The U-ViT's conditions for the images of `prompts`, n per prompt, ordered [p0, p1, p0, p1] for n = 2;
        with guidance, preceded by those of the negative prompts: (2B, ...). size: the images' (width, height)."""
        hidden, pooled = self.encode_prompt(prompts)  # (P, 77, D), (P, E)
        hidden, pooled = hidden.repeat(n, 1, 1), pooled.repeat(n, 1)  # (B, 77, D), (B, E)
        if guided:
            # encoded on its own (not batched with the prompts) as the reference does, so rounding matches
            neg_hidden, neg_pooled = self.encode_prompt(self._negatives(negative_prompt, len(prompts)))
            hidden = torch.cat([neg_hidden.repeat(n, 1, 1), hidden])  # (2B, 77, D): [negative; positive]
            pooled = torch.cat([neg_pooled.repeat(n, 1), pooled])
        # Matches reference: [width, height, crop top, crop left, aesthetic], in the text encoder's dtype. The
        # width comes first: the original training code's order.
        micro = torch.tensor([*size, *crop_coords, aesthetic_score], dtype=hidden.dtype, device=self.device)
        return self.transformer.encode_conditions(hidden, pooled, micro.expand(hidden.shape[0], -1))

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, *, steps: int = 12, guidance_scale: float = 10.0,
                 temperature=(2.0, 0.0), generator: torch.Generator | None = None, num_images_per_prompt: int = 1,
                 aesthetic_score: float = 6.0, crop_coords=(0, 0), output_type: str = "pil", callback=None):
        """Text to image. prompt: a string or a list. Returns PIL images, a (B, 3, H, W) tensor in [0, 1], or
        tokens (B, h, w), per output_type; B = len(prompt) * num_images_per_prompt, ordered [p0, p1, p0, p1]."""
        prompts = self._check(prompt, steps, guidance_scale, temperature, num_images_per_prompt, aesthetic_score,
                              crop_coords, output_type)
        s, B = self.transformer.cfg.sample_size, len(prompts) * num_images_per_prompt
        tokens = torch.full((B, s, s), self.mask_id, dtype=torch.long, device=self.device)  # all masked
        with speed.kernels(self.device, self.exact):
            conds = self.conditions(prompts, negative_prompt, num_images_per_prompt, guidance_scale > 1,
                                    (self.resolution, self.resolution), aesthetic_score, crop_coords)
            tokens = generate(self.transformer, conds, tokens, mask_id=self.mask_id, steps=steps,
                              guidance_scale=guidance_scale, temperatures=temperature_schedule(temperature, steps),
                              schedule=self.schedule, generator=generator, callback=callback, step_fn=self.step_fn)
            return self._output(tokens, output_type)

    @torch.no_grad()
    def img2img(self, prompt, image, strength: float = 0.5, negative_prompt=None, *, steps: int = 12,
                guidance_scale: float = 10.0, temperature=(2.0, 0.0), generator: torch.Generator | None = None,
                num_images_per_prompt: int = 1, aesthetic_score: float = 6.0, crop_coords=(0, 0),
                output_type: str = "pil", callback=None):
        """Image to image: mask a random fraction of the image's tokens (more for higher strength), then run the
        last int(steps * strength) steps of the schedule. image: PIL, or a tensor in [0, 1]."""
        prompts = self._check(prompt, steps, guidance_scale, temperature, num_images_per_prompt, aesthetic_score,
                              crop_coords, output_type, strength)
        pixels = preprocess_image(image, self.resolution, self.vqvae.cfg.downsample_factor).to(self.device)
        start = steps - int(steps * strength)  # the first step to run: strength 0.5 of 12 steps runs steps 6..11
        if start == steps:
            warnings.warn(f"strength {strength} x {steps} steps rounds down to 0 steps: the output is the input "
                          f"image's VQ reconstruction", stacklevel=2)
        with speed.kernels(self.device, self.exact):
            tokens = self.vqvae.encode_to_ids(pixels)  # (B_img, h, w)
            # Matches reference: AmusedScheduler.add_noise(tokens, timesteps[start - 1]): every token is masked with
            # probability mask_ratio((start' + 1) / steps), start' = start - 1 (Python's index -1, i.e. the last
            # step, when strength is 1: then the cosine's ratio is cos(pi/2) < 0 and nothing is masked at all).
            ratio = mask_ratio(torch.tensor((start - 1) % steps + 1) / steps, self.schedule)
            draw = torch.rand(tokens.shape, generator=generator,
                              device=generator.device if generator is not None else tokens.device).to(tokens.device)
            tokens = torch.where(draw < ratio, self.mask_id, tokens)
            tokens = self._batch(tokens, len(prompts), "image").repeat(num_images_per_prompt, 1, 1)
            conds = self.conditions(prompts, negative_prompt, num_images_per_prompt, guidance_scale > 1,
                                    (pixels.shape[-1], pixels.shape[-2]), aesthetic_score, crop_coords)
            tokens = generate(self.transformer, conds, tokens, mask_id=self.mask_id, steps=steps, start=start,
                              guidance_scale=guidance_scale, temperatures=temperature_schedule(temperature, steps),
                              schedule=self.schedule, generator=generator, callback=callback, step_fn=self.step_fn)
            return self._output(tokens, output_type)

    @torch.no_grad()
    def inpaint(self, prompt, image, mask, strength: float = 1.0, negative_prompt=None, *, steps: int = 12,
                guidance_scale: float = 10.0, temperature=(2.0, 0.0), generator: torch.Generator | None = None,
                num_images_per_prompt: int = 1, aesthetic_score: float = 6.0, crop_coords=(0, 0),
                output_type: str = "pil", callback=None):
        """Inpainting: mask the image's tokens under the mask (white = repaint) and fill them in. The rest of the
        image comes back as its VQ reconstruction (it is not pasted back), like the reference."""
        prompts = self._check(prompt, steps, guidance_scale, temperature, num_images_per_prompt, aesthetic_score,
                              crop_coords, output_type, strength)
        pixels = preprocess_image(image, self.resolution, self.vqvae.cfg.downsample_factor).to(self.device)
        start = steps - int(steps * strength)
        if start == steps:
            raise ValueError(f"strength {strength} x {steps} steps rounds down to 0 steps: nothing would fill the mask")
        with speed.kernels(self.device, self.exact):
            tokens = self.vqvae.encode_to_ids(pixels)  # (B_img, h, w)
            repaint = preprocess_mask(mask, tuple(pixels.shape[-2:]), tuple(tokens.shape[-2:])).to(self.device)
            self._check_mask(repaint, tokens)
            tokens = torch.where(repaint, self.mask_id, tokens)
            # Matches reference: the count schedule is scaled by the masked fraction, a float32 0-d tensor
            starting_mask_ratio = tokens.eq(self.mask_id).sum() / tokens.numel()
            tokens = self._batch(tokens, len(prompts), "image").repeat(num_images_per_prompt, 1, 1)
            conds = self.conditions(prompts, negative_prompt, num_images_per_prompt, guidance_scale > 1,
                                    (pixels.shape[-1], pixels.shape[-2]), aesthetic_score, crop_coords)
            # Matches reference: AmusedInpaintPipeline switches its scheduler to the linear schedule.
            tokens = generate(self.transformer, conds, tokens, mask_id=self.mask_id, steps=steps, start=start,
                              guidance_scale=guidance_scale, temperatures=temperature_schedule(temperature, steps),
                              schedule="linear", starting_mask_ratio=starting_mask_ratio, generator=generator,
                              callback=callback, step_fn=self.step_fn)
            return self._output(tokens, output_type)

    def _output(self, tokens: torch.Tensor, output_type: str):
        if output_type == "tokens":
            return tokens
        images = self.vqvae.decode_ids(tokens)  # (B, 3, H, W) in [0, 1]
        return images if output_type == "pt" else to_pil(images)

    # ------------------------------------------------------------------------------------------------
    # Argument checks: everything that enters through the three methods above

    def _check(self, prompt, steps, guidance_scale, temperature, num_images_per_prompt, aesthetic_score, crop_coords,
               output_type, strength=None) -> list[str]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not 0 <= guidance_scale < math.inf:
            raise ValueError(f"guidance_scale must be >= 0 and finite (values <= 1 turn guidance off), "
                             f"got {guidance_scale}")
        pair = temperature if isinstance(temperature, (tuple, list)) else (temperature,)
        if len(pair) not in (1, 2) or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in pair):
            raise ValueError(f"temperature must be a finite number or a pair (start, end), got {temperature!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if not math.isfinite(aesthetic_score):
            raise ValueError(f"aesthetic_score must be finite, got {aesthetic_score}")
        if len(crop_coords) != 2 or not all(math.isfinite(c) for c in crop_coords):
            raise ValueError(f"crop_coords must be two finite numbers (top, left), got {crop_coords!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if strength is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return list(prompt)

    @staticmethod
    def _check_mask(repaint: torch.Tensor, tokens: torch.Tensor) -> None:
        if repaint.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(f"{repaint.shape[0]} masks for {tokens.shape[0]} images: give one mask, or one per image")
        if not repaint.any():
            raise ValueError("the mask selects no token to repaint: it is black (< 0.5) everywhere once resized to "
                             f"the {tokens.shape[-1]}x{tokens.shape[-2]} token grid; white marks what to repaint")

    @staticmethod
    def _negatives(negative_prompt, n_prompts: int) -> list[str]:
        if negative_prompt is None:
            return [""] * n_prompts  # matches reference: the empty prompt
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n_prompts  # one negative prompt for every prompt
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) == n_prompts:
            return list(negative_prompt)
        raise ValueError(f"negative_prompt must be a string or a list of {n_prompts} strings (one per prompt), "
                         f"got {negative_prompt!r:.80}")

    @staticmethod
    def _batch(tokens: torch.Tensor, n_prompts: int, what: str) -> torch.Tensor:
        """One image for all prompts, or one per prompt."""
        if tokens.shape[0] == n_prompts:
            return tokens
        if tokens.shape[0] == 1:
            return tokens.expand(n_prompts, -1, -1)
        raise ValueError(f"{tokens.shape[0]} {what}s for {n_prompts} prompts: give one {what}, or one per prompt")

    # ------------------------------------------------------------------------------------------------
    # LoRA

    @torch.no_grad()
    def load_lora(self, path, scale: float = 1.0) -> None:
        """Merge a LoRA file into the U-ViT: W += scale * (alpha / r) * B @ A for each adapted Linear layer.

        path: a .safetensors file written by `train.py --lora`, or the pytorch_lora_weights.safetensors of diffusers'
        examples/amused/train_amused.py (read_lora says what it must hold). The merge is done in float32 and cast back
        to the weights' dtype; it is permanent: reload the pipeline to undo it. Nothing is changed unless the whole
        file checks out.
        """
        if self.int8:
            raise ValueError("this U-ViT's linear layers are int8: merge the LoRA into a float pipeline (load the "
                             "checkpoint in float32 or bfloat16), or quantise after merging")
        pairs, alpha = read_lora(path, self.transformer)
        modules = dict(self.transformer.named_modules())
        for module, (A, B) in pairs.items():
            w = modules[module].weight  # (out, in)
            rank = A.shape[0]
            delta = (scale * (rank if alpha is None else alpha) / rank) * (B.float() @ A.float())  # (out, in)
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))


def read_lora(path, transformer: uvit.UViT) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float | None]:
    """A LoRA file for `transformer` -> ({module name: (lora_A (r, in), lora_B (out, r))}, alpha or None); ValueError
    naming the first problems if it does not fit.

    Keys are "transformer.<module>.lora_A.weight" and "transformer.<module>.lora_B.weight"; our module names are
    UVit2DModel's, so they map by identity. alpha is read from the metadata diffusers defines,
    "lora_adapter_metadata": {"transformer.lora_alpha": ...}. Without it, alpha = r (scale 1), as diffusers' loader
    does (peft_utils.get_peft_kwargs); note that train_amused.py trains with alpha 32, r 16 but does not save alpha,
    so its files load at half strength in diffusers too: pass scale=2.0 to get what it trained."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: bad lora_adapter_metadata JSON ({e})") from e
    for key in ("transformer.alpha_pattern", "transformer.rank_pattern", "transformer.use_dora"):
        if config.get(key):
            raise ValueError(f"{path}: {key} = {config[key]!r} is not supported (one alpha for all layers, plain LoRA)")

    halves, problems = {}, []
    for key, t in tensors.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        if not key.startswith("transformer.") or kind not in ("A.weight", "B.weight"):
            problems.append(f"{key} (expected transformer.<module>.lora_A.weight / .lora_B.weight; "
                            f"text-encoder LoRA is not supported)")
            continue
        halves.setdefault(module, {})[kind[0]] = t
    modules = dict(transformer.named_modules())
    for module, ab in halves.items():
        layer = modules.get(module)
        if not isinstance(layer, torch.nn.Linear):
            problems.append(f"{module} (not a Linear layer of the U-ViT)")
        elif set(ab) != {"A", "B"}:
            problems.append(f"{module} (has lora_{next(iter(ab))} but not lora_{'B' if 'A' in ab else 'A'})")
        elif (ab["A"].ndim != 2 or ab["B"].ndim != 2 or ab["A"].shape[0] != ab["B"].shape[1]
              or ab["A"].shape[1] != layer.in_features or ab["B"].shape[0] != layer.out_features):
            problems.append(f"{module} (lora_A {tuple(ab['A'].shape)}, lora_B {tuple(ab['B'].shape)} do not fit a "
                            f"Linear {layer.in_features} -> {layer.out_features})")
    if problems or not halves:
        raise ValueError(f"{path}: not a LoRA file for this U-ViT: {'; '.join(problems[:3]) or 'no tensors'}"
                         + (f" and {len(problems) - 3} more" if len(problems) > 3 else ""))
    return {module: (ab["A"], ab["B"]) for module, ab in halves.items()}, config.get("transformer.lora_alpha")
