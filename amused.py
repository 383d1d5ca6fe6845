"""amused.py: the aMUSEd pipeline. Text (and optionally an image and a mask) in, tokens and images out.

  1. The prompt: the CLIP tokenizer and text encoder, then everything the U-ViT computes from the prompt alone
     (Amused.conditions), with the micro-conditioning (image size, crop, aesthetic score).
  2. The starting tokens: an all-masked grid (text to image), or the VQ tokens of an image with some of them masked
     (image to image: a random subset; inpainting: the masked region).
  3. The sampling loop (sampling.generate): step by step the U-ViT predicts the masked tokens and the sampler
     commits some of them, with classifier-free guidance, until none is masked. sampling.py says how.
  4. The VQGAN decodes the final grid to pixels.

Matches diffusers' AmusedPipeline, AmusedImg2ImgPipeline, AmusedInpaintPipeline and AmusedScheduler: same seed
(a torch.Generator), same tokens, drawing the same random numbers in the same order (tests/test_amused.py), at
every image size. The other samplers (sampler=, guidance_schedule=, ...) are options beside it.
"""
import json
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open

import clip_text
import quantize
import sampling
import speed
import uvit
import vqgan
from convert_weights import Checkpoint, load_checkpoint
from sampling import Generators, Sampler, generate, mask_ratio, temperature_schedule, uniform

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


def preprocess_image(image, multiple: int = 16) -> torch.Tensor:
    """An image (PIL, or tensor (B, 3, H, W) / (3, H, W) in [0, 1]) -> (B, 3, H', W') in [0, 1], each side cut
    down to a multiple of `multiple` (the VQ's pixels per token).

    Matches reference: VaeImageProcessor(vae_scale_factor=16).preprocess keeps the image's own size but for that
    cut, done by resizing (Lanczos for PIL, nearest for tensors): a 500x300 image becomes 496x288. We warn when it
    happens."""
    if not isinstance(image, (Image.Image, torch.Tensor)):
        raise TypeError(f"image must be a PIL image or a torch tensor (for a file: PIL.Image.open(path)), "
                        f"got {type(image).__name__}")
    if isinstance(image, Image.Image):
        image = pil_to_rgb(image)  # the reference would pass an RGBA image's 4 channels on and fail
    H, W = (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])
    h_cut, w_cut = H - H % multiple, W - W % multiple
    if h_cut == 0 or w_cut == 0:
        raise ValueError(f"image is {W}x{H}: each side needs at least {multiple} pixels (one token)")
    if (h_cut, w_cut) != (H, W):
        warnings.warn(f"image is {W}x{H}, not a multiple of {multiple}: resized to {w_cut}x{h_cut} like the "
                      f"reference", stacklevel=3)
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
# The largest image, in multiples of the model's pixel count (1024x1024 for amused-256): beyond it a step costs over
# ~25x the model's size's (attention grows with the square of the tokens) and its memory grows alike; the reference
# has no bound.
MAX_PIXELS = 16


def as_device(device) -> torch.device:
    """A torch.device from a device or its name; ValueError naming what a device is for anything else (a dtype name
    passed as the device, say)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a name such as cpu, cuda, cuda:1 or mps, got {device!r} "
                         f"(the precision is the dtype= keyword)") from e


class Amused:
    """Text-to-image, image-to-image and inpainting with aMUSEd.

        pipe = Amused.from_pretrained("amused/amused-256")  # hub folder, converted file or hub repo id
        images = pipe("a photo of a cat", seed=0)           # = generator=torch.Generator().manual_seed(0)
        images = pipe("a photo of a cat", **pipe.sampling_defaults)  # the checkpoint's recommended settings

    The sampling keywords' defaults are the reference's (diffusers'), whatever the checkpoint: a converted file may
    recommend others (its "sampling_defaults", e.g. {"steps": 12, "guidance_scale": 4.0} for examples/digits.py's
    model), which sample.py and playground.py use when no flag says otherwise; here pass them as above.
    """

    def __init__(self, ckpt: Checkpoint, device="cpu", dtype: torch.dtype | str = torch.float32, exact: bool = True):
        """dtype: torch.float32, float16 or bfloat16, or a name of one ("fp32", "fp16", "bf16", as sample.py's
        --dtype, or "float32", ...); "auto": the fastest precision the device runs natively (speed.auto_dtype),
        but float32 while exact is True, as it is by default: pass exact=False for the fast path (what sample.py
        runs); "int8": the U-ViT's linear layers in int8 (quantize.py), the rest as "auto". A checkpoint whose
        U-ViT is int8 already (convert_weights.py --dtype int8) stays so. exact: on the CPU, run every operation as
        the reference does, so that float32 tokens and images equal diffusers' bit for bit; exact=False is faster
        there, and not bit-exact (speed.py)."""
        device = as_device(device)
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
        self.step_fn = sampling.sampling_step  # compile() swaps in the compiled step
        self.lora_originals: dict[str, torch.Tensor] = {}  # load_lora's: the merged layers' own weights (CPU)
        # what the checkpoint recommends passing to the three methods (convert_weights.check_sampling_defaults)
        self.sampling_defaults: dict = dict(ckpt.sampling_defaults)
        # a one-step student's start codes' logits (h, w, K), for sampler="dimo" (sampling.dimo_start); else None
        self.start_logits = None if ckpt.start_logits is None else ckpt.start_logits.to(device)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype | str = torch.float32, variant: str | None = None,
                        exact: bool = True):
        """path: a hub-layout folder, a file written by convert_weights.py, or a hub repo id (downloaded). The
        weights are cast to `dtype` as they are read (int8: quantised as read): never held in the file's dtype and
        in `dtype` at once. dtype and exact as in Amused(): "auto" is float32 unless exact=False."""
        cast, int8, _ = speed.resolve_dtype(dtype, as_device(device), exact)
        return cls(load_checkpoint(path, variant, cast, int8), device, dtype, exact)

    def compile(self) -> None:
        """From the next call on, sample with the whole step compiled (speed.compile_step). The first call of each
        new shape (batch size, image size, guidance on or off) compiles: tens of seconds."""
        self.step_fn = speed.compile_step(sampling.sampling_step, self.device)

    @property
    def resolution(self) -> int:
        """The image side the model was trained at, in pixels: 256 (amused-256) or 512 (amused-512); text to
        image's default height and width."""
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
    def __call__(self, prompt, negative_prompt=None, *, height: int | None = None, width: int | None = None,
                 steps: int = 12, guidance_scale: float = 10.0,
                 temperature=(2.0, 0.0), generator: Generators = None, seed: int | None = None,
                 num_images_per_prompt: int = 1, aesthetic_score: float = 6.0, crop_coords=(0, 0),
                 output_type: str = "pil", callback=None, sampler: str = "confidence",
                 guidance_schedule: str = "constant", guidance_from: float = 0.5, mask_schedule: str | None = None,
                 softmax_temperature=1.0, halton_roll: bool = True):
        """Text to image. prompt: a string or a list. height, width: in pixels, multiples of size_multiple (default:
        the model's resolution). Returns PIL images, a (B, 3, H, W) tensor in [0, 1], or tokens (B, h, w), per
        output_type; B = len(prompt) * num_images_per_prompt, ordered [p0, p1, p0, p1].

        generator: one torch.Generator, or a list of one per image (each image then as if drawn alone). seed: an
        int instead of a generator, meaning torch.Generator().manual_seed(seed) (on the CPU, as diffusers' examples
        seed: the same draws on every device). callback(step, tokens): after every step, with step counted from 0
        (sample.py prints it as "step 1/12") and tokens (B, h, w) the grid so far, mask_id where still masked.

        guidance_scale <= 1 turns guidance off: one U-ViT pass per step instead of two. sampler and the keywords
        after it choose how tokens are drawn (sampling.Sampler); the defaults are the reference's: sampler
        "confidence" (MaskGIT's), "halton", or "dimo" (a distill.py student's start: random codes, uniform and
        partly masked or from the file's start_logits, their embeddings noised, every token drawn at the first
        step; from an image's tokens, in img2img and inpainting, it is the confidence sampler); guidance_schedule
        "constant", "ramp" or "interval" (unguided before guidance_from x steps: fewer U-ViT passes);
        mask_schedule None (the mode's), "cosine", "linear" or "arccos"; softmax_temperature of the draws (a pair
        ramps from the first step to the last); halton_roll.
        temperature is the confidence sampler's Gumbel temperature. The checkpoint may recommend other values
        for these keywords: pipe.sampling_defaults."""
        generator = self._generator(generator, seed)
        prompts = self._check(prompt, steps, guidance_scale, temperature, num_images_per_prompt, aesthetic_score,
                              crop_coords, output_type, generator)
        how = self._sampler(sampler, guidance_schedule, guidance_from, mask_schedule, softmax_temperature,
                            halton_roll)
        height = self.resolution if height is None else height
        width = self.resolution if width is None else width
        h, w = self.token_grid(height, width, f"height {height}, width {width}")
        B = len(prompts) * num_images_per_prompt
        tokens = torch.full((B, h, w), self.mask_id, dtype=torch.long, device=self.device)  # all masked
        with speed.kernels(self.device, self.exact):
            # Matches reference: the micro-conditioning's size is the requested (width, height)
            tokens = self._sample(tokens, prompts, negative_prompt, num_images_per_prompt, (width, height),
                                  aesthetic_score, crop_coords, how, steps=steps, start=0,
                                  guidance_scale=guidance_scale, temperature=temperature, schedule=self.schedule,
                                  generator=generator, callback=callback)
            return self._output(tokens, output_type)

    @torch.no_grad()
    def img2img(self, prompt, image, strength: float = 0.5, negative_prompt=None, *, steps: int = 12,
                guidance_scale: float = 10.0, temperature=(2.0, 0.0), generator: Generators = None,
                seed: int | None = None, num_images_per_prompt: int = 1, aesthetic_score: float = 6.0,
                crop_coords=(0, 0), output_type: str = "pil", callback=None, sampler: str = "confidence",
                guidance_schedule: str = "constant", guidance_from: float = 0.5, mask_schedule: str | None = None,
                softmax_temperature=1.0, halton_roll: bool = True):
        """Image to image: mask a random fraction of the image's tokens (more for higher strength), then run the
        last int(steps * strength) steps of the schedule. image: PIL, or a tensor in [0, 1], at its own size (each
        side cut down to a multiple of 16 pixels, like the reference). The other keywords as in __call__."""
        generator = self._generator(generator, seed)
        prompts = self._check(prompt, steps, guidance_scale, temperature, num_images_per_prompt, aesthetic_score,
                              crop_coords, output_type, generator, strength)
        how = self._sampler(sampler, guidance_schedule, guidance_from, mask_schedule, softmax_temperature,
                            halton_roll)
        pixels = self._image(image)
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
            if isinstance(generator, list):  # one draw per output image, from that image's generator
                tokens = self._batch(tokens, len(prompts), "image").repeat(num_images_per_prompt, 1, 1)
                tokens = torch.where(uniform(tokens.shape, generator, self.device) < ratio, self.mask_id, tokens)
            else:  # matches reference: one draw per input image, before the batch is repeated
                tokens = torch.where(uniform(tokens.shape, generator, self.device) < ratio, self.mask_id, tokens)
                tokens = self._batch(tokens, len(prompts), "image").repeat(num_images_per_prompt, 1, 1)
            tokens = self._sample(tokens, prompts, negative_prompt, num_images_per_prompt,
                                  (pixels.shape[-1], pixels.shape[-2]), aesthetic_score, crop_coords, how,
                                  steps=steps, start=start, guidance_scale=guidance_scale, temperature=temperature,
                                  schedule=self.schedule, generator=generator, callback=callback)
            return self._output(tokens, output_type)

    @torch.no_grad()
    def inpaint(self, prompt, image, mask, strength: float = 1.0, negative_prompt=None, *, steps: int = 12,
                guidance_scale: float = 10.0, temperature=(2.0, 0.0), generator: Generators = None,
                seed: int | None = None, num_images_per_prompt: int = 1, aesthetic_score: float = 6.0,
                crop_coords=(0, 0), output_type: str = "pil", callback=None, sampler: str = "confidence",
                guidance_schedule: str = "constant", guidance_from: float = 0.5, mask_schedule: str | None = None,
                softmax_temperature=1.0, halton_roll: bool = True):
        """Inpainting: mask the image's tokens under the mask (white = repaint) and fill them in. The rest of the
        image comes back as its VQ reconstruction (it is not pasted back), like the reference. The image is used at
        its own size, as in img2img; the mask (the image's aspect ratio) is resized to the token grid. The other
        keywords as in __call__."""
        generator = self._generator(generator, seed)
        prompts = self._check(prompt, steps, guidance_scale, temperature, num_images_per_prompt, aesthetic_score,
                              crop_coords, output_type, generator, strength)
        how = self._sampler(sampler, guidance_schedule, guidance_from, mask_schedule, softmax_temperature,
                            halton_roll)
        pixels = self._image(image)
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
            # Matches reference: AmusedInpaintPipeline switches its scheduler to the linear schedule.
            tokens = self._sample(tokens, prompts, negative_prompt, num_images_per_prompt,
                                  (pixels.shape[-1], pixels.shape[-2]), aesthetic_score, crop_coords, how,
                                  steps=steps, start=start, guidance_scale=guidance_scale, temperature=temperature,
                                  schedule="linear", starting_mask_ratio=starting_mask_ratio, generator=generator,
                                  callback=callback)
            return self._output(tokens, output_type)

    def _sample(self, tokens, prompts, negative_prompt, n, size, aesthetic_score, crop_coords, how: Sampler, *,
                steps, start, guidance_scale, temperature, schedule, generator, callback, starting_mask_ratio=1.0):
        """The conditions (with the negative prompts when any step to run is guided), then the sampling loop."""
        scales = sampling.guidance_scales(guidance_scale, steps, how.guidance_schedule, how.guidance_from)
        conds = self.conditions(prompts, negative_prompt, n, max(scales[start:]) > 1, size, aesthetic_score,
                                crop_coords)
        return generate(self.transformer, conds, tokens, mask_id=self.mask_id, steps=steps, start=start,
                        guidance_scale=guidance_scale, temperatures=temperature_schedule(temperature, steps),
                        schedule=schedule, starting_mask_ratio=starting_mask_ratio, generator=generator,
                        sampler=how, start_logits=self.start_logits, callback=callback, step_fn=self.step_fn)

    @staticmethod
    def _sampler(name, guidance_schedule, guidance_from, mask_schedule, softmax_temperature, halton_roll) -> Sampler:
        if isinstance(softmax_temperature, list):
            softmax_temperature = tuple(softmax_temperature)
        return Sampler(name, mask_schedule, guidance_schedule, guidance_from, softmax_temperature, halton_roll)

    def _image(self, image) -> torch.Tensor:
        """An init image as pixels (B, 3, H, W) on the device, at its own size cut to the token size."""
        pixels = preprocess_image(image, self.vqvae.cfg.downsample_factor)
        H, W = pixels.shape[-2:]
        self.token_grid(H, W, f"the image ({W}x{H} once cut to whole tokens)")
        return pixels.to(self.device)

    def _output(self, tokens: torch.Tensor, output_type: str):
        if output_type == "tokens":
            return tokens
        images = self.vqvae.decode_ids(tokens)  # (B, 3, H, W) in [0, 1]
        return images if output_type == "pt" else to_pil(images)

    # ------------------------------------------------------------------------------------------------
    # Argument checks: everything that enters through the three methods above

    def _check(self, prompt, steps, guidance_scale, temperature, num_images_per_prompt, aesthetic_score, crop_coords,
               output_type, generator, strength=None) -> list[str]:
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
        n_images = len(prompt) * num_images_per_prompt
        if isinstance(generator, list) and (len(generator) != n_images
                                            or not all(isinstance(g, torch.Generator) for g in generator)):
            raise ValueError(f"generator: give one torch.Generator, or a list of one per image ({n_images} = "
                             f"{len(prompt)} prompts x {num_images_per_prompt}), got a list of {len(generator)}")
        if not (generator is None or isinstance(generator, (torch.Generator, list))):
            seed_hint = f"; for a seed, pass seed={generator}" if isinstance(generator, int) else ""
            raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), a list of "
                            f"them (one per image) or None, got {type(generator).__name__}{seed_hint}")
        return list(prompt)

    @staticmethod
    def _generator(generator, seed):
        """The generator of a call: `generator`, or a CPU one seeded with `seed`."""
        if seed is None:
            return generator
        if generator is not None:
            raise ValueError("give a generator or a seed, not both")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64) (what torch.Generator.manual_seed takes), "
                             f"got {seed!r}")
        return torch.Generator().manual_seed(seed)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VQ's pixels per token (16), times 2 when the U-ViT halves its
        grid inside (amused-512: 32)."""
        return self.vqvae.cfg.downsample_factor * (2 if self.transformer.cfg.downsample else 1)

    def token_grid(self, height, width, what: str = "the image") -> tuple[int, int]:
        """(h, w) of the token grid of a height x width image; ValueError naming sizes that work if it has none."""
        m, f, res = self.size_multiple, self.vqvae.cfg.downsample_factor, self.resolution
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, int) or side < m or side % m:
                ok = f"{max(m, side // m * m)} or {max(m, side // m * m) + m}" if isinstance(side, int) else f"{m}"
                why = (f"{f} pixels per token, and this U-ViT halves its token grid inside" if m != f
                       else f"{f} pixels per token")
                raise ValueError(f"{what}: the {name} must be a multiple of {m} ({why}); got {side!r}: use e.g. {ok}")
        if height * width > MAX_PIXELS * res * res:
            side = res * int(MAX_PIXELS ** 0.5)
            raise ValueError(f"{what}: {width}x{height} has {height * width / res ** 2:.1f}x the pixels of the model's "
                             f"{res}x{res} images, above the bound of {MAX_PIXELS}x (e.g. {side}x{side}), past which a "
                             f"step's time and memory grow with the square of the token count: use a smaller size, or "
                             f"resize the image first")
        return height // f, width // f

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
        """Merge a LoRA file into the U-ViT: W = W0 + scale * (alpha / r) * B @ A for each adapted Linear layer,
        W0 being the layer's own weight. A LoRA loaded before is unloaded first (unload_lora): LoRAs replace each
        other, they do not stack, and scale 0 gives back the original weights exactly.

        path: a .safetensors file written by `train.py --lora`, or the pytorch_lora_weights.safetensors of diffusers'
        examples/amused/train_amused.py (read_lora says what it must hold). The merge is done in float32 and cast back
        to the weights' dtype. Nothing is changed unless the whole file checks out. The adapted layers' original
        weights are kept on the CPU until unload_lora (for amused-256's default q/k/v targets, 0.6 GB in fp32).
        """
        if self.int8:
            raise ValueError("this U-ViT's linear layers are int8: merge the LoRA into a float pipeline (load the "
                             "checkpoint in float32 or bfloat16), or quantise after merging")
        pairs, alpha = read_lora(path, self.transformer)
        self.unload_lora()
        modules = dict(self.transformer.named_modules())
        for module, (A, B) in pairs.items():
            w = modules[module].weight  # (out, in)
            self.lora_originals[module] = w.detach().to("cpu", copy=True)  # kept, not subtracted back: bit-exact
            if scale == 0:
                continue  # w + 0 would turn a -0.0 into +0.0
            rank = A.shape[0]
            delta = (scale * (rank if alpha is None else alpha) / rank) * (B.float() @ A.float())  # (out, in)
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

    @torch.no_grad()
    def unload_lora(self) -> None:
        """Put back the weights load_lora changed, bit for bit (they were kept, not recomputed); nothing to do when
        no LoRA is loaded."""
        modules = dict(self.transformer.named_modules())
        for module, original in self.lora_originals.items():
            modules[module].weight.copy_(original)
        self.lora_originals = {}


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
