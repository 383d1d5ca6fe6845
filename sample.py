"""sample.py: generate images with aMUSEd from the command line.

    python sample.py "a photo of a cat"                                   # amused-256, 12 steps -> out.png
    python sample.py "a photo of a cat" --steps 4,8,12 --num-images 2     # grid: rows = images, columns = steps
    python sample.py "a photo of a cat" --save-steps cat.gif              # the prediction after every step
    python sample.py "a cat in the snow" --init-image cat.png --strength 0.6        # image to image
    python sample.py "a dog" --init-image cat.png --mask mask.png                   # inpainting, white = repaint
    python sample.py "a cat" --checkpoint amused-512.safetensors --device cuda --compile
    python sample.py "a cat" --exact                                      # float32, diffusers' image bit for bit
    python sample.py "a wide beach" --width 384 --height 256             # any size, in multiples of 16 pixels
    python sample.py --prompts prompts.txt --out-dir out/ --batch-size 8  # many images: sample_many.py

--checkpoint takes a hub-layout folder, a file written by convert_weights.py, or a hub repo id, which is
downloaded into huggingface_hub's cache on first use. --seed seeds a torch.Generator, on the CPU unless sampling on
CUDA (--generator auto): on the CPU with --exact (fp32, the reference's kernels), the same seed gives the same image
as diffusers' pipelines given a CPU generator with that seed. By default sample.py runs the fastest precision the
device has natively (--dtype auto: bf16 on a CPU with AMX or AVX512-BF16), whose images differ from fp32's in
detail. --generator cpu draws on the CPU on every device, as diffusers does with a CPU generator (the same random
numbers; a GPU's arithmetic still differs), at the cost of a copy and a CPU draw per step.

--num-images up to --batch-size (8) are one pipeline call from one generator (diffusers' num_images_per_prompt with
that seed); more run --batch-size at a time, with a line per batch, image i from its own generator seeded --seed + i
(so the batch size changes no image). One grid file holds at most 1000 images: for more, --prompts FILE --out-dir.

The sampling flags (--steps, --guidance-scale, --sampler and those after it, --temperature) not given take the
checkpoint's recommendation, which a converted file may carry in its metadata ("sampling_defaults", e.g.
examples/digits.py's model: 12 steps at guidance 4), else the pipeline's defaults (the reference's); the settings
line marks the values that came from the checkpoint.
Each entry of --steps is an independent run from the same seed, so the columns of a grid differ only in the
number of steps. Each step commits at least one token to the image, so a step count above the number of tokens
(256 for amused-256, 1024 for amused-512) is no better, only slower. Image to image and inpainting at a
--strength below 1 run only the last steps of the schedule (the image's tokens stand in for the first ones).

Sizes: text to image is drawn at --width x --height (default: the model's own, 256x256 or 512x512; multiples of 16
pixels, of 32 for amused-512, up to 16x the model's pixel count). An --init-image is generated at about the model's
pixel count at the image's own aspect ratio (a 4000x3000 photo at 288x224 with amused-256), or at --width x
--height: it is scaled and centre-cropped to that size, with a note. (The Python API instead keeps the image's own
size, cut to whole tokens, as diffusers does.) Far from the size it was trained at, the model draws worse.

--init-image and --mask may be in any mode Pillow reads: 16-bit and float (values in [0, 1]) grayscale are
scaled to 8 bits, and an alpha channel is dropped with a warning; 32-bit integer images, whose range is unknown,
and float images outside [0, 1] are refused.

--save-steps FILE.gif shows what a masked-token model offers and a diffusion model does not: after every step,
which tokens the model has committed to (decoded by the VQ) and which are still masked (flat grey).

Bad input is reported as one line `error: ...` on stderr with exit code 2, and is checked before the (slow)
model load wherever that is possible. Ctrl-C stops with one line `interrupted` and exit code 130.
"""
import argparse
import inspect
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageOps

import amused
import cli
import sampling
import speed
from amused import Amused, to_pil
from cli import DTYPES, UsageError
from sampling import Sampler
from convert_weights import SAMPLING_KEYS, CheckpointError, read_sampling_defaults

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF"}  # --out suffix -> PIL format
DEFAULT_STRENGTH = {"img2img": 0.5, "inpaint": 1.0}  # the pipelines' defaults (and diffusers')
GREY = 0.5  # colour of the still-masked token cells in --save-steps frames
FRAME_MS, LAST_FRAME_MS = 300, 2000  # --save-steps: each step, then the final image held longer
# what a user can fix: one line `error: ...` and exit code 2 (cli.run)
USER_ERRORS = (UsageError, CheckpointError, FileNotFoundError, ValueError, TypeError, OSError, FloatingPointError)
# The pipeline's defaults of the sampling keywords a checkpoint may recommend others for (its sampling_defaults)
PIPELINE_DEFAULTS = {key: inspect.signature(Amused.__call__).parameters[key].default for key in SAMPLING_KEYS}
TEXT_FLAGS = ("steps", "temperature", "softmax_temperature")  # the sampling flags given as text: "2,0" for a pair
SAMPLER_FLAGS = ("sampler", "guidance_schedule", "guidance_from", "mask_schedule", "softmax_temperature",
                 "halton_roll")  # those the settings line shows as one: the sampler
DEFAULT_BATCH_SIZE = 8  # images per pipeline call: bounds the memory of a large --num-images
MAX_GRID_IMAGES = 1000  # images in one grid file; more belong in a folder (--prompts FILE --out-dir DIR)


# ----------------------------------------------------------------------------------------------------
# Checks that need no model


def parse_temperature(text: str, flag: str) -> float | tuple[float, float]:
    """"0.8" -> 0.8; "2,0" -> (2.0, 0.0): a temperature, or its first and last step's."""
    try:
        values = tuple(float(t) for t in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2) or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} must be a finite number or two like 2,0 (first step, last step), got {text!r}")
    return values[0] if len(values) == 1 else values


def parse_sampler(sampler: str, guidance_schedule: str, guidance_from: float, mask_schedule: str | None,
                  softmax_temperature: str, halton_roll: bool) -> Sampler:
    """The sampler flags -> a checked Sampler."""
    try:
        return Sampler(sampler, mask_schedule, guidance_schedule, guidance_from,
                       parse_temperature(softmax_temperature, "--softmax-temperature"), halton_roll)
    except ValueError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from None


def parse_steps(text) -> list[int]:
    """"12" -> [12]; "5,10,15" -> [5, 10, 15] (one grid column each)."""
    try:
        counts = [int(s) for s in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--steps must be an integer or a comma list of integers like 5,10,15, got {text!r}") from None
    if any(s < 1 for s in counts):
        raise UsageError(f"--steps must be >= 1, got {text!r}")
    return counts


def sampling_flags(flags: dict, checkpoint: str) -> tuple[dict, list[str]]:
    """The sampling flags (SAMPLING_KEYS: main's values, None where not given) with each one not given set to the
    checkpoint's recommendation (its sampling_defaults), else the pipeline's default, in the flag's form ("2.0,0.0"
    for a pair); and the names of those the checkpoint set. Reads the file's metadata only, before the model."""
    recommended = read_sampling_defaults(checkpoint)
    resolved, from_checkpoint = dict(flags), []
    for key in SAMPLING_KEYS:
        if flags[key] is not None:
            continue
        if key in recommended:
            from_checkpoint.append(key)
        value = recommended.get(key, PIPELINE_DEFAULTS[key])
        if key in TEXT_FLAGS:
            value = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        resolved[key] = value
    return resolved, from_checkpoint


def shown(value, keys: list[str], from_checkpoint: list[str]) -> str:
    """A setting for the settings line, marked where the checkpoint's sampling_defaults gave it."""
    ours = [key for key in keys if key in from_checkpoint]
    return f"{value}" + ("" if not ours else " (checkpoint)" if keys == ours else f" (checkpoint: {', '.join(ours)})")


def check_numbers(guidance_scale: float, aesthetic_score: float, seed: int, num_images: int) -> None:
    """The numbers the pipeline would refuse only after the model load, or, for a seed, with torch's words."""
    if not 0 <= guidance_scale < math.inf:  # written so that NaN fails too
        raise UsageError(f"--guidance-scale must be >= 0 and finite (values <= 1 turn guidance off), "
                         f"got {guidance_scale}")
    if not math.isfinite(aesthetic_score):
        raise UsageError(f"--aesthetic-score must be a finite number, got {aesthetic_score}")
    if not 0 <= seed < 2**64:  # torch.Generator.manual_seed takes [0, 2**64) and wraps negative seeds around
        raise UsageError(f"--seed must be in [0, 2**64), got {seed}")
    if num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {num_images}")


def describe_sampler(how: Sampler, guidance_scale: float, step_counts: list[int], strength: float | None) -> str:
    """The settings line's: the sampler, what differs from the reference, and the U-ViT passes per image."""
    changed = [f"{key} {value}" for key, value, default in [
        ("guidance", how.guidance_schedule + (f" from {how.guidance_from:g}" if how.guidance_schedule == "interval"
                                               else ""), "constant"),
        ("mask schedule", how.mask_schedule, None), ("softmax temperature", how.softmax_temperature, 1.0),
        ("roll", how.halton_roll if how.name == "halton" else True, True)] if value != default]
    passes = []
    for n in step_counts:
        scales = sampling.guidance_scales(guidance_scale, n, how.guidance_schedule, how.guidance_from)
        passes.append(sampling.passes_per_image(scales[n - int(n * strength):] if strength else scales))
    return (f"{how.name}{' (' + ', '.join(changed) + ')' if changed else ''}: "
            f"{','.join(map(str, passes))} U-ViT passes per image")


def check_batches(num_images: int, n_step_counts: int, batch_size: int, seed: int) -> None:
    """The images fit in one grid file, and the batches can be seeded (seed + i for image i past one batch)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if num_images * n_step_counts > MAX_GRID_IMAGES:
        raise UsageError(f"--num-images {num_images} x {n_step_counts} step count{'s' * (n_step_counts > 1)} makes "
                         f"{num_images * n_step_counts} images in one grid file, above {MAX_GRID_IMAGES}: for many "
                         f"images, one file each, use --prompts FILE --out-dir DIR (sample_many.py)")
    if num_images > batch_size and seed + num_images > 2**64:
        raise UsageError(f"--seed {seed} + --num-images {num_images} passes 2**64: in batches, image i is drawn "
                         f"from seed + i")


def check_mode(init_image: str | None, mask: str | None, strength: float | None,
               step_counts: list[int]) -> tuple[str, float | None]:
    """The mode the flags ask for, and --strength resolved: its default depends on the mode."""
    if mask is not None and init_image is None:
        raise UsageError("--mask needs --init-image: the image whose white-masked region is repainted")
    if strength is not None and init_image is None:
        raise UsageError("--strength applies only with --init-image")
    mode = "inpaint" if mask else "img2img" if init_image else "text-to-image"
    if strength is None and init_image is not None:
        strength = DEFAULT_STRENGTH[mode]
    if strength is not None and not 0 < strength <= 1:  # written so that NaN fails too
        raise UsageError(f"--strength must be in (0, 1], got {strength}")
    if mode == "inpaint" and any(int(s * strength) == 0 for s in step_counts):
        raise UsageError(f"--strength {strength} x --steps {','.join(map(str, step_counts))} rounds down to 0 steps "
                         f"for inpainting; raise one of them")
    return mode, strength


def resolve_dtype(name: str, device: str, exact: bool) -> tuple[torch.dtype | str, str]:
    """--dtype -> (the dtype Amused takes, what the settings line shows). auto and int8 say what they chose and why
    (speed.resolve_dtype: float32 with --exact, float16 on CUDA, bfloat16 on a CPU with native bf16 matmuls, else
    float32; int8: the U-ViT's linear layers, the rest as auto). fp16 on a CPU gets a note: it runs emulated."""
    if name == "fp16" and torch.device(device).type == "cpu":
        print(cli.fp16_cpu_note("--dtype"))
    if name in DTYPES:
        return DTYPES[name], name
    dtype, int8, why = speed.resolve_dtype(name, torch.device(device), exact)
    return ("int8", f"int8 ({why})") if int8 else (dtype, f"{cli.dtype_name(dtype)} (auto: {why})")


def resolve_generator_device(name: str, device: str) -> str:
    """auto -> a generator on the GPU when sampling on CUDA, else on the CPU. With a CPU generator every step
    copies the probabilities to the CPU and draws one exponential per codebook entry and position there, on one
    thread: ~40 ms a step at 256 px and ~160 ms at 512 px on our CPU, more than the GPU's whole step."""
    return "cuda" if name == "auto" and device == "cuda" else "cpu"


def check_writable(path: str, flag: str, formats: dict) -> Path:
    """The file can be written: a known image suffix, in an existing, writable folder."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    if p.suffix.lower() not in formats:
        raise UsageError(f"{flag} {path}: unknown image type {p.suffix!r}; use one of {', '.join(sorted(formats))}")
    if not p.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {p.parent} is not writable")
    return p


def open_image(path: str, flag: str) -> Image.Image:
    """The image file at `path` as 8-bit RGB, read fully now, so that a missing, corrupt or unusable file fails
    before the model load."""
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        image = Image.open(path)
        image.load()  # Image.open only reads the header; a truncated file fails here
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: cannot read it as an image ({e})") from None
    try:
        # 16-bit and float grayscale scaled to 8 bits (Pillow's convert alone clips 16-bit values: near white)
        return amused.pil_to_rgb(exif_oriented(image))
    except ValueError as e:
        raise UsageError(f"{flag} {path}: {e}") from None


def exif_oriented(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen. Matches reference: diffusers.utils.load_image applies the EXIF orientation
    of photos. exif_transpose returns a copy without the file's format, which amused.to_8bit reads: kept."""
    oriented = ImageOps.exif_transpose(image)
    oriented.format = image.format
    return oriented


def read_inputs(init_image: str | None, mask: str | None) -> tuple[Image.Image | None, Image.Image | None]:
    """--init-image as 8-bit RGB and --mask as 8-bit grayscale, each None when not given."""
    image = None if init_image is None else open_image(init_image, "--init-image")
    mask_image = None if mask is None else open_image(mask, "--mask").convert("L")
    if mask_image is not None and mask_image.width * image.height != mask_image.height * image.width:
        raise UsageError(f"--mask is {mask_image.width}x{mask_image.height} but --init-image is "
                         f"{image.width}x{image.height}: they must have the same aspect ratio")
    return image, mask_image


# ----------------------------------------------------------------------------------------------------
# The model and the runs


@dataclass
class Job:
    """What every run generates: the checked flags, with --init-image and --mask read and fitted to the model."""
    mode: str  # "text-to-image", "img2img" or "inpaint"
    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    num_images: int
    aesthetic_score: float
    strength: float | None  # None for text to image
    image: Image.Image | None  # 8-bit RGB, at the size to generate
    mask: Image.Image | None  # 8-bit L, the image's aspect ratio
    size: tuple[int, int] | None = None  # text to image: (width, height) in pixels; None: the model's
    sampler: Sampler = Sampler()  # how tokens are drawn (sampling.py); the default is the reference's
    temperature: float | tuple[float, float] = (2.0, 0.0)  # the confidence sampler's Gumbel temperature


def load(checkpoint: str, device: str, dtype: torch.dtype, variant: str | None, exact: bool) -> Amused:
    t0 = time.perf_counter()
    pipe = Amused.from_pretrained(checkpoint, device=device, dtype=dtype, variant=variant, exact=exact)
    s = pipe.transformer.cfg.sample_size
    vq_note = " (VQ in fp32: force_upcast)" if pipe.vqvae.upcast else ""
    print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s: trained at {pipe.resolution}x{pipe.resolution} "
          f"({s}x{s} tokens){vq_note}", flush=True)
    return pipe


def model_size_at(aspect: float, pipe: Amused) -> tuple[int, int]:
    """(width, height) of about the model's pixel count at aspect = width / height, each side rounded to a multiple
    of pipe.size_multiple: 4:3 gives 288x224 for amused-256, 16:9 gives 336x192."""
    m, res = pipe.size_multiple, pipe.resolution
    return (max(m, round(res * math.sqrt(aspect) / m) * m), max(m, round(res / math.sqrt(aspect) / m) * m))


def image_size(image: Image.Image, width: int | None, height: int | None, pipe: Amused) -> tuple[int, int]:
    """The size an init image is generated at: --width and --height if both are given; one of them and the other
    from the image's aspect ratio; neither: the model's pixel count at the image's aspect ratio (model_size_at)."""
    m = pipe.size_multiple
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, max(m, round(width * image.height / image.width / m) * m)
    if height is not None:
        return max(m, round(height * image.width / image.height / m) * m), height
    return model_size_at(image.width / image.height, pipe)


def fit_image(image: Image.Image, size: tuple[int, int], token: int, what: str) -> Image.Image:
    """An image scaled (Lanczos) to cover size = (width, height) and centre-cropped to it, with a note. An image
    whose sides cut down to whole tokens (`token` pixels) already give `size` is left to the pipeline, which makes
    that cut like the reference."""
    W, H = size
    if (image.width - image.width % token, image.height - image.height % token) == size:
        return image
    scale = max(W / image.width, H / image.height)
    w, h = max(W, round(image.width * scale)), max(H, round(image.height * scale))
    left, top = (w - W) // 2, (h - H) // 2
    print(f"note: {what} is {image.width}x{image.height}; scaled to {w}x{h}" + (
        f" and centre-cropped to {W}x{H}" if (w, h) != size else ""))
    return image.resize((w, h), resample=Image.LANCZOS).crop((left, top, left + W, top + H))


def step_cost(cfg, h: int, w: int) -> float:
    """The multiply-adds of one U-ViT pass over an h x w token grid, roughly: the convolutional stages and the MLM
    head per position, the transformer layers per (possibly halved) token, and self-attention per pair of tokens."""
    n = h * w
    n_t = n // 4 if cfg.downsample else n
    C, D, K = cfg.block_out_channels, cfg.hidden_size, cfg.codebook_size
    per_position = 2 * cfg.num_res_blocks * (8 * C * C + 4 * C * C) + cfg.in_channels * (C + K)
    per_token = cfg.num_hidden_layers * (8 * D * D + 3 * D * cfg.intermediate_size)
    return n * per_position + n_t * per_token + cfg.num_hidden_layers * 2 * n_t * n_t * D


def note_size(pipe: Amused, size: tuple[int, int]) -> None:
    """Past the model's own size: what a step will cost, and that the model did not learn that size."""
    (W, H), res, f = size, pipe.resolution, pipe.vqvae.cfg.downsample_factor
    if W * H <= res * res:
        return
    cost = step_cost(pipe.transformer.cfg, H // f, W // f) / step_cost(pipe.transformer.cfg, res // f, res // f)
    print(f"note: {W}x{H} has {W * H / res ** 2:.1f}x the pixels of the model's {res}x{res}: a step costs about "
          f"{cost:.1f}x as long (self-attention grows with the square of the tokens), and the model was trained at "
          f"{res}x{res}, so expect repeated or broken content far from it")


def compile_and_warm_up(pipe: Amused, job: Job, seed: int, generator: str) -> None:
    """Every step has the same shapes, (B, h, w) tokens and the U-ViT on 2B with guidance, in all three modes, so
    two compiled graphs (a step, and the last step, which re-masks nothing) serve every run. A short text-to-image
    warm-up (same batch, same guidance) compiles them (and on CUDA records their CUDA graphs) before we time
    anything."""
    pipe.compile()
    t0 = time.perf_counter()
    width, height = job_size(pipe, job)
    pipe(job.prompt, job.negative_prompt, height=height, width=width, steps=2, guidance_scale=job.guidance_scale,
         num_images_per_prompt=job.num_images, generator=torch.Generator(generator).manual_seed(seed),
         output_type="tokens")
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    print(f"compiled the sampling step in {time.perf_counter() - t0:.1f} s (a 2-step warm-up run)", flush=True)


def note_step_counts(job: Job, step_counts: list[int], n_tokens: int) -> None:
    """What the progress lines would leave unexplained: skipped first steps, and step counts that cannot help."""
    if job.strength is not None and any(int(s * job.strength) < s for s in step_counts):
        ran, of = ", ".join(str(int(s * job.strength)) for s in step_counts), ", ".join(map(str, step_counts))
        print(f"note: {job.mode} at --strength {job.strength} runs only the last {ran} of the {of} steps (the "
              f"image's tokens stand in for the first ones)")
    too_many = [s for s in step_counts if s > n_tokens]
    if too_many:
        print(f"note: --steps {','.join(map(str, too_many))} is more than the {n_tokens} tokens of an image. Each step "
              f"commits at least one token, so past {n_tokens} steps the extra steps only resample the last masked "
              f"tokens: the result is not better, only slower")


class Progress:
    """The callback of one run: a line per step (tokens still masked, the step's time), after the run's first step
    an estimate of the time the rest will take, and with `history` the first image's tokens after every step."""

    def __init__(self, mask_id: int, n_steps: int, n_tokens: int, history: list | None):
        self.mask_id, self.n_steps, self.n_tokens, self.history = mask_id, n_steps, n_tokens, history
        self.t_prev, self.first = time.perf_counter(), True

    def __call__(self, step: int, tokens: torch.Tensor) -> None:
        n_masked = int((tokens == self.mask_id).sum())  # .item() also waits for the GPU: honest timing
        now = time.perf_counter()
        print(f"step {step + 1}/{self.n_steps}: {n_masked} of {self.n_tokens} tokens still masked "
              f"({now - self.t_prev:.2f} s)", flush=True)
        left = self.n_steps - step - 1
        if self.first and left > 0:
            print(f"  about {cli.time_left(now - self.t_prev, 1, left)} more for the other {left} "
                  f"step{'s' * (left > 1)} (at this step's pace)", flush=True)
        self.t_prev, self.first = now, False
        if self.history is not None:
            self.history.append(tokens[0].to("cpu", copy=True))  # a copy, even when already on the CPU


def job_size(pipe: Amused, job: Job) -> tuple[int, int]:
    """(width, height) of the job's images: the init image's, or the text-to-image size."""
    if job.image is not None:
        f = pipe.vqvae.cfg.downsample_factor
        return job.image.width - job.image.width % f, job.image.height - job.image.height % f
    return job.size or (pipe.resolution, pipe.resolution)


def sampler_keywords(sampler: Sampler) -> dict:
    """A Sampler as the pipeline methods' keywords."""
    return dict(sampler=sampler.name, guidance_schedule=sampler.guidance_schedule, guidance_from=sampler.guidance_from,
                mask_schedule=sampler.mask_schedule, softmax_temperature=sampler.softmax_temperature,
                halton_roll=sampler.halton_roll)


def generate(pipe: Amused, job: Job, n_steps: int, generator, callback, output_type: str = "pil"):
    """The job's images (or tokens) at n_steps, drawn from `generator` (one, or a list of one per image)."""
    kw = dict(steps=n_steps, guidance_scale=job.guidance_scale, generator=generator,
              num_images_per_prompt=job.num_images, aesthetic_score=job.aesthetic_score, callback=callback,
              temperature=job.temperature, output_type=output_type, **sampler_keywords(job.sampler))
    if job.mode == "inpaint":
        return pipe.inpaint(job.prompt, job.image, job.mask, job.strength, job.negative_prompt, **kw)
    if job.mode == "img2img":
        return pipe.img2img(job.prompt, job.image, job.strength, job.negative_prompt, **kw)
    width, height = job_size(pipe, job)
    return pipe(job.prompt, job.negative_prompt, height=height, width=width, **kw)


def decode_each(pipe: Amused, tokens: torch.Tensor) -> list[Image.Image]:
    """Token grids (B, h, w) -> images, each decoded alone, as the pipeline decodes one image: the VQ's float32
    convolutions choose their kernels by batch size, and decoded in a batch of 8, one pixel value in ~3,000 moved
    by 1/255 (tiny model, CPU) against the same tokens decoded alone. Alone, an image's pixels do not depend on
    its batch, for a few percent of the work."""
    with speed.kernels(pipe.device, pipe.exact):
        return [to_pil(pipe.vqvae.decode_ids(t[None]))[0] for t in tokens]


def generate_in_batches(pipe: Amused, job: Job, n_steps: int, seed: int, generator: str, batch_size: int,
                        tokens_per_image: int, history: list | None) -> list[Image.Image]:
    """More images than a batch: image i drawn from a generator of its own seeded seed + i (the rule of
    sample_many.py for a line's images) and decoded alone, so that no image depends on the batch size. The first
    batch reports its steps; every batch a line of its own."""
    images, t0, n_batches = [], time.perf_counter(), -(-job.num_images // batch_size)
    for b, first in enumerate(range(0, job.num_images, batch_size), start=1):
        n = min(batch_size, job.num_images - first)
        generators = [torch.Generator(generator).manual_seed(seed + i) for i in range(first, first + n)]
        progress = Progress(pipe.mask_id, n_steps, n * tokens_per_image, history) if b == 1 else None
        tokens = generate(pipe, replace(job, num_images=n), n_steps, generators, progress, output_type="tokens")
        images += decode_each(pipe, tokens)
        rate = len(images) / (time.perf_counter() - t0)
        left = f", about {cli.duration((job.num_images - len(images)) / rate)} left" if b < n_batches else ""
        print(f"batch {b}/{n_batches}: {len(images)}/{job.num_images} images{left}", flush=True)
    return images


def generate_all(pipe: Amused, job: Job, step_counts: list[int], seed: int, generator: str, keep_history: bool,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[list[list[Image.Image]], list[torch.Tensor]]:
    """One run per step count -> columns[j]: the images of run j, and (keep_history) the first image's tokens
    (h, w) after each step of the first run. Up to batch_size images are one pipeline call drawing from one
    generator, as diffusers' num_images_per_prompt; more are made batch_size at a time (generate_in_batches)."""
    width, height = job_size(pipe, job)
    f = pipe.vqvae.cfg.downsample_factor
    tokens_per_image = (height // f) * (width // f)
    history, columns = [], []
    for j, n_steps in enumerate(step_counts):
        kept = history if keep_history and j == 0 else None
        t0 = time.perf_counter()
        # A fresh generator per run: each column is what `--steps n_steps` alone would give.
        if job.num_images <= batch_size:
            progress = Progress(pipe.mask_id, n_steps, job.num_images * tokens_per_image, kept)
            columns.append(generate(pipe, job, n_steps, torch.Generator(generator).manual_seed(seed), progress))
        else:
            columns.append(generate_in_batches(pipe, job, n_steps, seed, generator, batch_size, tokens_per_image,
                                               kept))
        dt = time.perf_counter() - t0
        print(f"{n_steps} steps: {job.num_images} image{'s' * (job.num_images > 1)} in {dt:.2f} s "
              f"({dt / job.num_images:.2f} s per image)", flush=True)
    return columns, history


# ----------------------------------------------------------------------------------------------------
# Writing images


def write_image(columns: list[list[Image.Image]], step_counts: list[int], path: Path) -> None:
    """One image as it is; several as a grid, rows = images, columns = runs, step counts above the columns."""
    if len(columns) == 1 and len(columns[0]) == 1:
        result = columns[0][0]
    else:
        rows = [columns[j][i] for i in range(len(columns[0])) for j in range(len(columns))]
        result = cli.image_grid(rows, cols=len(columns),
                                labels=[f"{s} steps" for s in step_counts] if len(step_counts) > 1 else None)
    cli.atomic_write(path, lambda tmp: result.save(tmp, format=IMAGE_FORMATS[path.suffix.lower()]))
    print(f"wrote {path} ({result.width}x{result.height})")


@torch.no_grad()
def step_frames(pipe: Amused, history: list[torch.Tensor]) -> list[Image.Image]:
    """Token grids (h, w) after each step -> one frame each: committed tokens decoded, masked cells grey.

    The VQ decoder needs a valid id everywhere, so masked positions are filled with id 0 first; the decoder's
    convolutions let that filler bleed a little into neighbouring cells, which the grey paint then covers."""
    f = pipe.vqvae.cfg.downsample_factor  # pixels per token
    frames = []
    for tokens in history:
        masked = tokens == pipe.mask_id  # (h, w)
        image = pipe.vqvae.decode_ids(tokens.masked_fill(masked, 0)[None].to(pipe.device))[0].float().cpu()
        cells = masked.repeat_interleave(f, 0).repeat_interleave(f, 1)  # (H, W)
        image[:, cells] = GREY
        frames.append(to_pil(image[None])[0])
    return frames


def write_gif(pipe: Amused, history: list[torch.Tensor], path: Path, n_steps: int) -> None:
    frames = step_frames(pipe, history)
    durations = [FRAME_MS] * (len(frames) - 1) + [LAST_FRAME_MS]
    cli.atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                      loop=0, duration=durations))
    print(f"wrote {path} ({len(frames)} frames, one per step of the first image at {n_steps} steps)")


# ----------------------------------------------------------------------------------------------------


def main(prompt: str | None, checkpoint: str = "amused/amused-256", negative_prompt: str | None = None,
         steps: str | None = None, guidance_scale: float | None = None, seed: int = 0, num_images: int = 1,
         out: str = "out.png", device: str = "auto", dtype: str = "auto", compile: bool = False,
         init_image: str | None = None, strength: float | None = None, mask: str | None = None,
         save_steps: str | None = None, aesthetic_score: float = 6.0, variant: str | None = None, exact: bool = False,
         generator: str = "auto", width: int | None = None, height: int | None = None, sampler: str | None = None,
         guidance_schedule: str | None = None, guidance_from: float | None = None, mask_schedule: str | None = None,
         softmax_temperature: str | None = None, halton_roll: bool | None = None, temperature: str | None = None,
         prompts: None = None, out_dir: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
         shard: str | None = None) -> None:
    """One grid from one prompt. prompts is None here (--prompts FILE runs sample_many.main); out_dir and shard
    are its flags. The sampling flags left None take the checkpoint's sampling_defaults, else the pipeline's."""
    if prompt is None or out_dir is not None or shard is not None:
        raise UsageError("give a prompt, or --prompts FILE --out-dir DIR for many images" if prompt is None else
                         "--out-dir and --shard apply with --prompts FILE (many images)")
    t_start = time.perf_counter()

    # 1. Everything that can be checked without the model, first: loading takes seconds to minutes.
    flags, from_checkpoint = sampling_flags(dict(
        steps=steps, guidance_scale=guidance_scale, temperature=temperature, sampler=sampler,
        guidance_schedule=guidance_schedule, guidance_from=guidance_from, mask_schedule=mask_schedule,
        softmax_temperature=softmax_temperature, halton_roll=halton_roll), checkpoint)
    guidance_scale = flags["guidance_scale"]
    step_counts = parse_steps(flags["steps"])
    check_numbers(guidance_scale, aesthetic_score, seed, num_images)
    check_batches(num_images, len(step_counts), batch_size, seed)
    if os.path.isfile(prompt):  # os.path: False, not an error, for a prompt too long to be a file name
        print(f"note: the prompt {prompt!r} is the name of a file, drawn here as text; for one prompt per line of "
              f"the file: --prompts {prompt} --out-dir DIR")
    for flag, side in (("--width", width), ("--height", height)):
        if side is not None and side < 1:
            raise UsageError(f"{flag} must be a positive number of pixels, got {side}")
    mode, strength = check_mode(init_image, mask, strength, step_counts)
    how = parse_sampler(flags["sampler"], flags["guidance_schedule"], flags["guidance_from"], flags["mask_schedule"],
                        flags["softmax_temperature"], flags["halton_roll"])
    gumbel_temperature = parse_temperature(flags["temperature"], "--temperature")
    out_path = check_writable(out, "--out", IMAGE_FORMATS)
    gif_path = None if save_steps is None else check_writable(save_steps, "--save-steps", {".gif": "GIF"})
    device = cli.resolve_device(device)
    generator = resolve_generator_device(generator, device)
    torch_dtype, dtype_shown = resolve_dtype(dtype, device, exact)
    image, mask_image = read_inputs(init_image, mask)
    if mode == "img2img" and strength == 1:
        # matches reference: AmusedImg2ImgPipeline masks each token with probability cos(pi/2 * step'/steps) at
        # step' = start - 1, which at strength 1 is index -1, the last step: cos(pi/2) < 0, so nothing is masked
        print("note: img2img at --strength 1 masks none of the image's tokens at the start (as in diffusers), so "
              "the output stays close to the input; use e.g. 0.99 to redo most of it")
    settings = dict(prompt=repr(prompt), negative_prompt=repr(negative_prompt), checkpoint=checkpoint,
                    variant=variant, mode=mode,
                    steps=shown(",".join(map(str, step_counts)), ["steps"], from_checkpoint),
                    guidance_scale=shown(guidance_scale, ["guidance_scale"], from_checkpoint),
                    sampler=shown(describe_sampler(how, guidance_scale, step_counts, strength),
                                  list(SAMPLER_FLAGS), from_checkpoint),
                    temperature=shown(gumbel_temperature, ["temperature"], from_checkpoint),
                    seed=seed, generator=generator, num_images=num_images, batch_size=batch_size,
                    aesthetic_score=aesthetic_score,
                    width=width, height=height, init_image=init_image, strength=strength, mask=mask, device=device,
                    dtype=dtype_shown, compile=compile, exact=exact,
                    out=out, save_steps=save_steps)
    print("settings:\n" + "\n".join(f"  {key:<16}{value}" for key, value in settings.items()))

    # 2. The model, the size, and the input images fitted to it.
    pipe = load(checkpoint, device, torch_dtype, variant, exact)
    size = ((width or pipe.resolution, height or pipe.resolution) if image is None
            else image_size(image, width, height, pipe))
    pipe.token_grid(size[1], size[0], f"{size[0]}x{size[1]} pixels")  # a clear error for a size that has none
    note_size(pipe, size)
    f = pipe.vqvae.cfg.downsample_factor
    job = Job(mode, prompt, negative_prompt, guidance_scale, num_images, aesthetic_score, strength,
              image=None if image is None else fit_image(image, size, f, "--init-image"),
              mask=None if mask_image is None else fit_image(mask_image, size, f, "--mask"),
              size=size if image is None else None, sampler=how, temperature=gumbel_temperature)
    if compile:
        compile_and_warm_up(pipe, replace(job, num_images=min(num_images, batch_size)), seed, generator)

    # 3. One run per step count, each from the same seed.
    note_step_counts(job, step_counts, (size[0] // f) * (size[1] // f))
    t_gen = time.perf_counter()
    columns, history = generate_all(pipe, job, step_counts, seed, generator, gif_path is not None, batch_size)
    t_gen = time.perf_counter() - t_gen

    # 4. The outputs.
    write_image(columns, step_counts, out_path)
    if gif_path is not None:
        write_gif(pipe, history, gif_path, step_counts[0])
    n_images = num_images * len(step_counts)
    print(f"generated {n_images} image{'s' * (n_images > 1)} in {t_gen:.2f} s ({t_gen / n_images:.2f} s per image); "
          f"total {time.perf_counter() - t_start:.1f} s")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --variant, --device, --dtype, --exact: which model to load, and how (playground.py's too)."""
    p.add_argument("--checkpoint", default="amused/amused-256",
                   help="hub-layout folder, file from convert_weights.py, or hub repo id (downloaded on first use)")
    p.add_argument("--variant", choices=["fp16"], default=None,
                   help="read the .fp16.safetensors files of a hub checkpoint (half the download)")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                   help="auto: cuda, else mps, else cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES, "int8"], default="auto",
                   help="auto: the fastest native precision: fp16 on cuda; on the CPU bf16 where it has AMX or "
                        "AVX512-BF16, else fp32; fp32 with --exact. int8: the U-ViT's linear layers in int8 "
                        "(quantised on load, or as stored by convert_weights.py --dtype int8), the rest as auto. An "
                        "fp16 VQ decodes in fp32 when its config says force_upcast")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=False,
                   help="the reference's kernels (and fp32 with --dtype auto): on the CPU, output equal to diffusers' "
                        "bit for bit. Default: the fastest kernels (oneDNN fp32 matmuls)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("prompt", nargs="?", default=None, help="the text; or --prompts FILE for many images")
    add_model_flags(p)
    p.add_argument("--negative-prompt", default=None, help="what to steer away from; None: the empty prompt")
    p.add_argument("--steps", default=None,
                   help="sampling steps; a comma list such as 5,10,15 makes a grid. Default: the checkpoint's "
                        "recommendation (its sampling_defaults), else 12. So for every sampling flag below: the "
                        "settings line marks the values the checkpoint gave")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance; <= 1 turns it off (one U-ViT pass per step, not two). Default: the "
                        "checkpoint's, else 10")
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**64): seed of the torch.Generator used for sampling")
    p.add_argument("--generator", choices=["auto", "cpu"], default="auto",
                   help="where the random numbers are drawn. auto: on the GPU when sampling on CUDA (fast), else on "
                        "the CPU; cpu: always, the same draws as diffusers with a CPU generator")
    p.add_argument("--num-images", type=int, default=1, help="images per step count (grid rows)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per pipeline call (memory grows with it). Up to this many --num-images: one call "
                        "from one generator, as diffusers' num_images_per_prompt; more: batches, image i from its "
                        "own generator seeded --seed + i, as sample_many.py seeds a line's images. With --prompts: "
                        "images per forward pass")
    p.add_argument("--aesthetic-score", type=float, default=6.0, help="micro-conditioning aesthetic score")
    p.add_argument("--out", default="out.png", help="output image; a grid when there are several images")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the whole sampling step (CUDA: with CUDA graphs); compiling takes tens of "
                        "seconds, and on the CPU gains little")
    p.add_argument("--sampler", choices=sampling.SAMPLERS, default=None,
                   help="confidence: the reference's (MaskGIT: keep the most confident tokens, re-mask the rest); "
                        "halton: reveal positions in a fixed, evenly spread order (Besnier et al. 2025); dimo: the "
                        "start of a one-step student from distill.py (random codes, partly masked, noised). Default: "
                        "the checkpoint's, else confidence")
    p.add_argument("--guidance-schedule", choices=sampling.GUIDANCE_SCHEDULES, default=None,
                   help="constant: the reference's; ramp: from none at the first step to --guidance-scale at the last; "
                        "interval: none before --guidance-from of the steps (one U-ViT pass instead of two). Default: "
                        "the checkpoint's, else constant")
    p.add_argument("--guidance-from", type=float, default=None,
                   help="with --guidance-schedule interval: the fraction of the steps run without guidance. Default: "
                        "the checkpoint's, else 0.5")
    p.add_argument("--mask-schedule", choices=sampling.SCHEDULES, default=None,
                   help="how many tokens stay masked after each step; default: the checkpoint's sampling_defaults', "
                        "else its scheduler's (cosine) for the confidence sampler, linear for its inpainting, arccos "
                        "for halton")
    p.add_argument("--softmax-temperature", default=None,
                   help="temperature of the token draws: a number, or first,last (a linear ramp over the steps). "
                        "Default: the checkpoint's, else 1.0")
    p.add_argument("--temperature", default=None,
                   help="the confidence sampler's Gumbel temperature (how random the choice of tokens to keep is): "
                        "first,last step (the reference's 2,0), or a number falling to 0.01. Default: the "
                        "checkpoint's, else 2,0")
    p.add_argument("--halton-roll", action=argparse.BooleanOptionalAction, default=None,
                   help="with --sampler halton: roll each image's order by an offset drawn from the seed. Default: "
                        "the checkpoint's, else on")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels, a multiple of 16 (32 for amused-512). Default: the model's size; with "
                        "--init-image, the model's pixel count at the image's aspect ratio")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, as --width")
    p.add_argument("--init-image", default=None,
                   help="start from this image (image to image), scaled and centre-cropped to --width x --height")
    p.add_argument("--strength", type=float, default=None,
                   help="in (0, 1]: how much of --init-image to redo; None: 0.5, or 1.0 with --mask")
    p.add_argument("--mask", default=None, help="inpainting mask for --init-image: white = repaint")
    p.add_argument("--save-steps", default=None, metavar="FILE.gif",
                   help="write an animation of the prediction after every step (first image, first step count)")
    many = p.add_argument_group("many images (sample_many.py)")
    many.add_argument("--prompts", default=None, metavar="FILE",
                      help="one prompt per line, or JSONL (.jsonl) with prompt and optional negative_prompt, seed, "
                           "num_images, steps, guidance_scale, aesthetic_score, width, height; the flags above are "
                           "the defaults")
    many.add_argument("--out-dir", default=None, help="with --prompts: the folder of images (LLLLLLLL-III.png), "
                                                      "run.json, manifest.jsonl and captions.txt")
    many.add_argument("--shard", default=None, metavar="I/N",
                      help="with --prompts: make share I of N (from 0/N); torchrun's and SLURM's variables say it "
                           "without this flag")
    args = p.parse_args()
    if args.prompts is not None:
        import sample_many  # here: it imports this module
        cli.run(sample_many.main, args, errors=USER_ERRORS)
    else:
        cli.run(main, args, errors=USER_ERRORS)
