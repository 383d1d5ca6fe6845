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
import contextlib
import json
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch.overrides import TorchFunctionMode

import clip_text
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


def num_masked_after(step: int, steps: int, seq_len: int, schedule: str = "cosine",
                     starting_mask_ratio: float | torch.Tensor = 1.0) -> int:
    """How many of `seq_len` tokens stay masked after sampling step `step` (0-based) of `steps`, before the
    clamps of unmask_step. On the last step, none.

    Matches reference: AmusedScheduler.step computes this in float32 tensors: (step + 1) / steps, the cosine,
    the product and the floor. The float32 rounding matters: at steps=12, step=7 the cosine of 2/3 * pi/2 is
    0.49999997, so 127 of 256 tokens stay masked, where float64 would give 128. We compute it on the CPU, so
    the count does not depend on the device's cos."""
    if step == steps - 1:
        return 0
    progress = torch.tensor(step + 1) / steps  # float32, like the reference's (step_idx + 1) / N
    ratio = starting_mask_ratio * mask_ratio(progress, schedule)
    return int((seq_len * ratio).floor())


# ----------------------------------------------------------------------------------------------------
# One sampling step


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped and typed like `like`, drawn on the generator's device.

    Matches reference: scheduling_amused.gumbel_noise: uniform_ in the dtype of `like` (so fp16 runs draw fp16
    uniforms), clamped away from 0 before each log."""
    device = generator.device if generator is not None else like.device
    u = torch.zeros_like(like, device=device).uniform_(0, 1, generator=generator).to(like.device)
    return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from each row of probs (N, K) -> (N, 1): torch.multinomial(probs, 1, generator=generator) exactly.

    multinomial draws one sample by the Gumbel-max trick (its n_sample == 1 path in ATen's Distributions.cpp):
    q ~ Exp(1) for every entry, then argmax(probs / q). We do the same three operations, so the random numbers,
    their order and the result are the same, but skip its two validity checks, which read values back to the
    host: a sync every step on a GPU. Non-finite logits are caught once per generation instead (Amused._generate).
    """
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(dim=-1, keepdim=True)


def unmask_step(logits, tokens, step: int, steps: int, *, mask_id: int, temperature: torch.Tensor,
                schedule: str = "cosine", starting_mask_ratio: float | torch.Tensor = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample every masked position, then re-mask the least confident ones (diffusers AmusedScheduler.step).

    logits: (B, K, h, w) guided logits over the codebook; tokens: (B, h, w) long, mask_id where masked;
    temperature: the Gumbel temperature of this step. Returns the new tokens (B, h, w).
    Random draws, in order: one multinomial over (B*h*w, K) (sample_categorical), then (except on the last step) one
    uniform (B, h*w).
    """
    B, K, h, w = logits.shape
    L = h * w
    tokens = tokens.reshape(B, L)
    logits = logits.reshape(B, K, L).permute(0, 2, 1)  # (B, L, K)
    masked = tokens == mask_id  # (B, L)
    probs = logits.softmax(dim=-1)  # (B, L, K), in the model's dtype like the reference

    # A candidate for every position. Matches reference: the probabilities go to the generator's device, and on
    # the CPU in float32 (torch.multinomial has no CPU half), which makes the exponential draws float32 too.
    p = probs.to(generator.device) if generator is not None else probs
    if p.device.type == "cpu" and p.dtype != torch.float32:
        p = p.float()
    pred = sample_categorical(p.reshape(B * L, K), generator).to(probs.device).view(B, L)
    pred = torch.where(masked, pred, tokens)  # committed tokens never change
    if step == steps - 1:
        return pred.view(B, h, w)  # the last step commits everything

    # How many to re-mask: the schedule's count, but fewer than are masked now, and at least one.
    n = torch.full((B, 1), num_masked_after(step, steps, L, schedule, starting_mask_ratio), device=tokens.device)
    n = torch.minimum(masked.sum(dim=-1, keepdim=True) - 1, n).clamp(min=1)  # (B, 1)

    # Confidence: log-probability of the sampled token plus annealed Gumbel noise; committed tokens get the
    # largest finite value so they are never chosen for re-masking.
    chosen = probs.gather(-1, pred[..., None])[..., 0]  # (B, L)
    chosen = torch.where(masked, chosen, torch.finfo(chosen.dtype).max)
    # Matches reference: the temperature is a float32 (1, 1) tensor there, so in fp16 runs the confidence is
    # promoted to float32 (a 0-d tensor would not promote).
    confidence = torch.log(chosen.clamp(1e-20)) + temperature.reshape(1, 1) * gumbel_noise(chosen, generator)
    cutoff = confidence.sort(dim=-1).values.gather(1, n)  # the n-th smallest confidence, (B, 1)
    return torch.where(confidence < cutoff, mask_id, pred).view(B, h, w)


# ----------------------------------------------------------------------------------------------------
# Images in and out


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (1, C, H, W) float32 in [0, 1], as diffusers' pil_to_numpy then numpy_to_pt."""
    pixels = torch.from_numpy(np.array(image).astype(np.float32) / 255.0)
    return pixels.reshape(image.height, image.width, -1).permute(2, 0, 1)[None]


def preprocess_image(image, size: int, multiple: int = 16) -> torch.Tensor:
    """An image (PIL, or tensor (B, 3, H, W) / (3, H, W) in [0, 1]) -> (B, 3, size, size) in [0, 1].

    Matches reference: VaeImageProcessor(vae_scale_factor=16).preprocess: a side that is not a multiple of 16
    (the VQ's pixels per token) is cut down to one by resizing (Lanczos for PIL, nearest for tensors). We warn
    when that happens, and since the U-ViT only works on its own grid size, any other size is an error rather
    than a silent resize."""
    if not isinstance(image, (Image.Image, torch.Tensor)):
        raise TypeError(f"image must be a PIL image or a torch tensor (for a file: PIL.Image.open(path)), "
                        f"got {type(image).__name__}")
    if isinstance(image, Image.Image) and image.mode != "RGB":
        image = image.convert("RGB")  # the reference would pass an RGBA image's 4 channels on and fail
    H, W = (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])
    h16, w16 = H - H % multiple, W - W % multiple
    if (h16, w16) != (H, W):
        warnings.warn(f"image is {W}x{H}, not a multiple of {multiple}: resized to {w16}x{h16} like the reference",
                      stacklevel=3)
    if (h16, w16) != (size, size):
        raise ValueError(f"image is {W}x{H}; this model works on {size}x{size} images: resize or crop it first")
    if isinstance(image, Image.Image):
        return pil_to_tensor(image.resize((w16, h16), resample=Image.LANCZOS))
    t = image[None] if image.ndim == 3 else image
    if t.ndim != 4 or t.shape[1] != 3 or not t.is_floating_point():
        raise ValueError(f"an image tensor must be floats (B, 3, H, W) or (3, H, W) in [0, 1], "
                         f"got {image.dtype} {tuple(image.shape)}")
    t = t.float()
    return torch.nn.functional.interpolate(t, size=(h16, w16)) if (h16, w16) != (H, W) else t


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
        m = pil_to_tensor(mask.convert("L").resize((grid[1], grid[0]), resample=Image.LANCZOS))
    else:
        m = mask.reshape(-1, 1, *size).float()
        m = torch.nn.functional.interpolate(m, size=grid)  # nearest
    return (m >= 0.5).reshape(-1, *grid)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded like the reference's postprocess."""
    arr = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]


# ----------------------------------------------------------------------------------------------------
# Fast CPU matmuls (Amused(exact=False))


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(TorchFunctionMode):
    """Inside this context, F.linear on float32 CPU tensors, outside autograd, runs as a oneDNN matmul
    (torch.ops.mkldnn._linear_pointwise, the kernel torch.compile's CPU backend emits for linear layers) instead
    of the MKL sgemm that eager PyTorch and the reference call. On the AMD EPYC we develop on, a guided amused-256
    U-ViT step takes 2.3 s with it instead of 2.9 s (README, Performance). It sums in another order, so results
    differ from the reference's in the last bits (~1e-7 relative): this is the fast mode, never the exact one.

    A context rather than a module swap: the models keep their plain nn.Linear weights (state dicts, LoRA
    merging and memory are unchanged), and anything else (autograd, other dtypes and devices) falls through.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled():
            x, weight, bias = _linear_args(*args, **kwargs)
            if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() >= 2
                    and x.numel() > 0 and weight.is_contiguous()):
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


def _linear_args(input, weight, bias=None):
    return input, weight, bias  # F.linear's signature, however the caller passed the arguments


# ----------------------------------------------------------------------------------------------------
# The pipeline

OUTPUT_TYPES = ("pil", "pt", "tokens")


class Amused:
    """Text-to-image, image-to-image and inpainting with aMUSEd.

        pipe = Amused.from_pretrained("amused-256")        # hub folder, converted file or hub repo id
        images = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, ckpt: Checkpoint, device="cpu", dtype: torch.dtype = torch.float32, exact: bool = True):
        """exact: on the CPU, run every operation as the reference does, so that float32 tokens and images equal
        diffusers' bit for bit. exact=False trades that for speed on the CPU: float32 linear layers run as oneDNN
        matmuls (OneDNNLinear) and the VQ decoder in channels_last; logits then differ from the reference's by
        ~1e-6 of their scale, which changes a sampled token only where two candidates tie to that precision. On CUDA
        the flag changes nothing (GPU kernels never equal the CPU reference's bits anyway)."""
        device = torch.device(device)
        if not exact and device.type == "cpu" and not onednn_available():
            raise ValueError("exact=False needs a PyTorch build with oneDNN (torch.backends.mkldnn.is_available()); "
                             "use exact=True on this build")
        self.tokenizer: clip_text.CLIPTokenizer = ckpt.tokenizer
        self.text_encoder: clip_text.CLIPTextEncoder = ckpt.text_encoder.to(device, dtype)
        self.transformer: uvit.UViT = ckpt.transformer.to(device, dtype)
        # half-precision VQ weights follow the checkpoint's force_upcast (see vqgan.VQModel.upcast)
        self.vqvae: vqgan.VQModel = ckpt.vqvae.to(device, dtype)
        if device.type == "cuda" or not exact:
            # channels_last convolutions are markedly faster (cuDNN; oneDNN ~15% on the CPU), but on the CPU they
            # sum in another order than the reference's layout, where the decoded pixels equal diffusers' exactly
            self.vqvae.to(memory_format=torch.channels_last)
        self.mask_id = ckpt.mask_token_id
        self.device, self.dtype, self.exact = device, dtype, exact

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype = torch.float32, variant: str | None = None,
                        exact: bool = True):
        """path: a hub-layout folder, a file written by convert_weights.py, or a hub repo id (downloaded)."""
        return cls(load_checkpoint(path, variant), device, dtype, exact)

    @property
    def grid_size(self) -> int:
        return self.transformer.cfg.grid_size  # tokens per side: 16 (amused-256) or 32 (amused-512)

    @property
    def resolution(self) -> int:
        return self.grid_size * self.vqvae.cfg.downsample_factor  # 256 or 512 pixels

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> CLIP penultimate hidden states (B, 77, D) and projected pooled embeddings (B, P)."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))

    def __call__(self, prompt, negative_prompt=None, *, steps: int = 12, guidance_scale: float = 10.0,
                 temperature=(2.0, 0.0), generator: torch.Generator | None = None, num_images_per_prompt: int = 1,
                 aesthetic_score: float = 6.0, crop_coords=(0, 0), output_type: str = "pil", callback=None):
        """Text to image. prompt: a string or a list. Returns PIL images, a (B, 3, H, W) tensor in [0, 1], or
        tokens (B, h, w), per output_type; B = len(prompt) * num_images_per_prompt, ordered [p0, p1, p0, p1]."""
        prompts = self._check(prompt, steps, guidance_scale, num_images_per_prompt, output_type)
        B = len(prompts) * num_images_per_prompt
        tokens = torch.full((B, self.grid_size, self.grid_size), self.mask_id, dtype=torch.long, device=self.device)
        return self._generate(prompts, negative_prompt, tokens, self.resolution, self.resolution, start=0,
                              steps=steps, guidance_scale=guidance_scale, temperature=temperature, generator=generator,
                              num_images_per_prompt=num_images_per_prompt, aesthetic_score=aesthetic_score,
                              crop_coords=crop_coords, output_type=output_type, callback=callback)

    def img2img(self, prompt, image, strength: float = 0.5, negative_prompt=None, *, steps: int = 12,
                guidance_scale: float = 10.0, temperature=(2.0, 0.0), generator: torch.Generator | None = None,
                num_images_per_prompt: int = 1, aesthetic_score: float = 6.0, crop_coords=(0, 0),
                output_type: str = "pil", callback=None):
        """Image to image: mask a random fraction of the image's tokens (more for higher strength), then run the
        last int(steps * strength) steps of the schedule. image: PIL, or a tensor in [0, 1]."""
        prompts = self._check(prompt, steps, guidance_scale, num_images_per_prompt, output_type, strength)
        pixels = preprocess_image(image, self.resolution, self.vqvae.cfg.downsample_factor)  # (B_img, 3, H, W)
        pixels = pixels.to(self.device)
        start = steps - int(steps * strength)
        if start == steps:
            warnings.warn(f"strength {strength} x {steps} steps rounds down to 0 steps: the output is the input "
                          f"image's VQ reconstruction", stacklevel=2)
        tokens = self.vqvae.encode_to_ids(pixels)  # (B_img, h, w)
        # Matches reference: AmusedScheduler.add_noise(tokens, timesteps[start - 1]): every token is masked with
        # probability mask_ratio((start' + 1) / steps), start' = start - 1 (Python's index -1, i.e. the last
        # step, when strength is 1: then the ratio is cos(pi/2) < 0 and nothing is masked at all).
        ratio = mask_ratio(torch.tensor((start - 1) % steps + 1) / steps)
        draw = torch.rand(tokens.shape, generator=generator,
                          device=generator.device if generator is not None else tokens.device).to(tokens.device)
        tokens = torch.where(draw < ratio, self.mask_id, tokens)
        tokens = self._batch(tokens, len(prompts), "image").repeat(num_images_per_prompt, 1, 1)
        return self._generate(prompts, negative_prompt, tokens, pixels.shape[-1], pixels.shape[-2], start=start,
                              steps=steps, guidance_scale=guidance_scale, temperature=temperature, generator=generator,
                              num_images_per_prompt=num_images_per_prompt, aesthetic_score=aesthetic_score,
                              crop_coords=crop_coords, output_type=output_type, callback=callback)

    def inpaint(self, prompt, image, mask, strength: float = 1.0, negative_prompt=None, *, steps: int = 12,
                guidance_scale: float = 10.0, temperature=(2.0, 0.0), generator: torch.Generator | None = None,
                num_images_per_prompt: int = 1, aesthetic_score: float = 6.0, crop_coords=(0, 0),
                output_type: str = "pil", callback=None):
        """Inpainting: mask the image's tokens under the mask (white = repaint) and fill them in. The rest of the
        image comes back as its VQ reconstruction (it is not pasted back), like the reference."""
        prompts = self._check(prompt, steps, guidance_scale, num_images_per_prompt, output_type, strength)
        pixels = preprocess_image(image, self.resolution, self.vqvae.cfg.downsample_factor)  # (B_img, 3, H, W)
        pixels = pixels.to(self.device)
        start = steps - int(steps * strength)
        if start == steps:
            raise ValueError(f"strength {strength} x {steps} steps rounds down to 0 steps: nothing would fill the mask")
        tokens = self.vqvae.encode_to_ids(pixels)  # (B_img, h, w)
        where = preprocess_mask(mask, tuple(pixels.shape[-2:]), tuple(tokens.shape[-2:])).to(self.device)
        if where.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(f"{where.shape[0]} masks for {tokens.shape[0]} images: give one mask, or one per image")
        if not where.any():
            raise ValueError("the mask selects no token to repaint: it is black (< 0.5) everywhere once resized to "
                             f"the {tokens.shape[-1]}x{tokens.shape[-2]} token grid; white marks what to repaint")
        tokens = torch.where(where, self.mask_id, tokens)
        # Matches reference: the count schedule is scaled by the masked fraction, a float32 0-d tensor
        starting_mask_ratio = tokens.eq(self.mask_id).sum() / tokens.numel()
        tokens = self._batch(tokens, len(prompts), "image").repeat(num_images_per_prompt, 1, 1)
        # Matches reference: AmusedInpaintPipeline switches its scheduler to the linear schedule.
        return self._generate(prompts, negative_prompt, tokens, pixels.shape[-1], pixels.shape[-2], start=start,
                              steps=steps, guidance_scale=guidance_scale, temperature=temperature, generator=generator,
                              num_images_per_prompt=num_images_per_prompt, aesthetic_score=aesthetic_score,
                              crop_coords=crop_coords, output_type=output_type, callback=callback,
                              schedule="linear", starting_mask_ratio=starting_mask_ratio)

    @torch.no_grad()
    def _generate(self, prompts, negative_prompt, tokens, width: int, height: int, *, start: int, steps: int,
                  guidance_scale: float, temperature, generator, num_images_per_prompt: int, aesthetic_score: float,
                  crop_coords, output_type: str, callback, schedule: str = "cosine", starting_mask_ratio=1.0):
        """The sampling loop shared by the three modes: steps start..steps-1 on `tokens` (B, h, w)."""
        with self._matmuls():
            n = num_images_per_prompt
            hidden, pooled = self.encode_prompt(prompts)  # (P, 77, D), (P, E)
            hidden, pooled = hidden.repeat(n, 1, 1), pooled.repeat(n, 1)  # tiled: [p0, p1, p0, p1] for n = 2
            guided = guidance_scale > 1.0  # matches reference: guidance only when strictly above 1
            if guided:
                negatives = self._negatives(negative_prompt, len(prompts))
                # encoded on its own (not batched with the prompts) as the reference does, so rounding matches
                neg_hidden, neg_pooled = self.encode_prompt(negatives)
                hidden = torch.cat([neg_hidden.repeat(n, 1, 1), hidden])  # (2B, 77, D): [negative; positive]
                pooled = torch.cat([neg_pooled.repeat(n, 1), pooled])
            # Matches reference: [width, height, crop top, crop left, aesthetic], in the text encoder's dtype. The
            # width comes first: the original training code's order.
            micro = torch.tensor([width, height, crop_coords[0], crop_coords[1], aesthetic_score],
                                 dtype=hidden.dtype, device=self.device).expand(hidden.shape[0], -1)
            conds = self.transformer.encode_conditions(hidden, pooled, micro)  # computed once, reused every step
            temps = torch.linspace(temperature[0], temperature[1], steps) if isinstance(temperature, (tuple, list)) \
                else torch.linspace(temperature, 0.01, steps)  # matches reference: set_timesteps
            temps = temps.to(self.device)

            finite = torch.ones((), dtype=torch.bool, device=self.device)  # read once, after the loop
            for step in range(start, steps):
                model_input = torch.cat([tokens, tokens]) if guided else tokens  # (2B, h, w): [negative; positive]
                logits = self.transformer.predict(model_input, conds)  # (2B, K, h, w); tokens valid by construction
                if guided:
                    uncond, cond = logits.chunk(2)
                    logits = uncond + guidance_scale * (cond - uncond)  # (B, K, h, w)
                # NaN or +inf logits make NaN probabilities, which torch.multinomial would reject (its host-side
                # check, which sample_categorical skips): the same test, kept on the device
                finite &= logits.amax() < math.inf
                tokens = unmask_step(logits, tokens, step, steps, mask_id=self.mask_id, temperature=temps[step],
                                     schedule=schedule, starting_mask_ratio=starting_mask_ratio, generator=generator)
                if callback is not None:
                    callback(step, tokens)

            if not finite:
                raise FloatingPointError(f"the U-ViT's logits were NaN or infinite at some step ({self.dtype}; in "
                                         f"float16 an overflow): rerun in torch.bfloat16 or torch.float32")
            if output_type == "tokens":
                return tokens
            images = self.vqvae.decode_ids(tokens)  # (B, 3, H, W) in [0, 1]
            return images if output_type == "pt" else to_pil(images)

    def _matmuls(self):
        """The context the models run in: the reference's kernels, or oneDNN's on the CPU when not exact."""
        return OneDNNLinear() if not self.exact and self.device.type == "cpu" else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------
    # Argument checks

    def _check(self, prompt, steps, guidance_scale, num_images_per_prompt, output_type, strength=None) -> list[str]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (values <= 1 turn guidance off), got {guidance_scale}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if strength is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return list(prompt)

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
        examples/amused/train_amused.py. Keys are "transformer.<module>.lora_A.weight" (r, in) and
        "transformer.<module>.lora_B.weight" (out, r); our module names are UVit2DModel's, so they map by identity.
        alpha is read from the metadata diffusers defines, "lora_adapter_metadata": {"transformer.lora_alpha": ...}.
        Without it, alpha = r (scale 1), as diffusers' loader does (peft_utils.get_peft_kwargs); note that
        train_amused.py trains with alpha 32, r 16 but does not save alpha, so its files load at half strength
        in diffusers too: pass scale=2.0 to get what it trained.
        The merge is done in float32 and cast back to the weights' dtype; it is permanent: reload the pipeline to
        undo it. Nothing is changed unless the whole file checks out.
        """
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
                raise ValueError(f"{path}: {key} = {config[key]!r} is not supported (one alpha for all layers, "
                                 f"plain LoRA)")
        alpha = config.get("transformer.lora_alpha")

        pairs, problems = {}, []
        for key, t in tensors.items():
            module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
            if not key.startswith("transformer.") or kind not in ("A.weight", "B.weight"):
                problems.append(f"{key} (expected transformer.<module>.lora_A.weight / .lora_B.weight; "
                                f"text-encoder LoRA is not supported)")
                continue
            pairs.setdefault(module, {})[kind[0]] = t
        modules = dict(self.transformer.named_modules())
        for module, ab in pairs.items():
            layer = modules.get(module)
            if not isinstance(layer, torch.nn.Linear):
                problems.append(f"{module} (not a Linear layer of the U-ViT)")
            elif set(ab) != {"A", "B"}:
                problems.append(f"{module} (has lora_{next(iter(ab))} but not lora_{'B' if 'A' in ab else 'A'})")
            elif (ab["A"].ndim != 2 or ab["B"].ndim != 2 or ab["A"].shape[0] != ab["B"].shape[1]
                  or ab["A"].shape[1] != layer.in_features or ab["B"].shape[0] != layer.out_features):
                problems.append(f"{module} (lora_A {tuple(ab['A'].shape)}, lora_B {tuple(ab['B'].shape)} do not fit a "
                                f"Linear {layer.in_features} -> {layer.out_features})")
        if problems or not pairs:
            raise ValueError(f"{path}: not a LoRA file for this U-ViT: {'; '.join(problems[:3]) or 'no tensors'}"
                             + (f" and {len(problems) - 3} more" if len(problems) > 3 else ""))

        for module, ab in pairs.items():
            w = modules[module].weight
            rank = ab["A"].shape[0]
            delta = (scale * (rank if alpha is None else alpha) / rank) * (ab["B"].float() @ ab["A"].float())
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
