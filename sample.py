"""sample.py: generate images with aMUSEd from the command line.

    python sample.py "a photo of a cat"                                   # amused-256, 12 steps -> out.png
    python sample.py "a photo of a cat" --steps 4,8,12 --num-images 2     # grid: rows = images, columns = steps
    python sample.py "a photo of a cat" --save-steps cat.gif              # the prediction after every step
    python sample.py "a cat in the snow" --init-image cat.png --strength 0.6        # image to image
    python sample.py "a dog" --init-image cat.png --mask mask.png                   # inpainting, white = repaint
    python sample.py "a cat" --checkpoint amused-512.safetensors --device cuda --compile
    python sample.py "a cat" --exact                                      # float32, diffusers' image bit for bit

--checkpoint takes a hub-layout folder, a file written by convert_weights.py, or a hub repo id, which is
downloaded into huggingface_hub's cache on first use. --seed seeds a torch.Generator, on the CPU unless sampling on
CUDA (--generator auto): on the CPU with --exact (fp32, the reference's kernels), the same seed gives the same image
as diffusers' pipelines given a CPU generator with that seed. By default sample.py runs the fastest precision the
device has natively (--dtype auto: bf16 on a CPU with AMX or AVX512-BF16), whose images differ from fp32's in detail. --generator cpu draws on the CPU on every device, as diffusers does with a CPU
generator (the same random numbers; a GPU's arithmetic still differs), at the cost of a copy and a CPU draw per
step.
Each entry of --steps is an independent run from the same seed, so the columns of a grid differ only in the
number of steps. Each step commits at least one token to the image, so a step count above the number of tokens
(256 for amused-256, 1024 for amused-512) is no better, only slower. Image to image and inpainting at a
--strength below 1 run only the last steps of the schedule (the image's tokens stand in for the first ones).

--init-image and --mask may be in any mode Pillow reads: 16-bit and float (values in [0, 1]) grayscale are
scaled to 8 bits, and an alpha channel is dropped with a warning; 32-bit integer images, whose range is unknown,
and float images outside [0, 1] are refused.

--save-steps FILE.gif shows what a masked-token model offers and a diffusion model does not: after every step,
which tokens the model has committed to (decoded by the VQ) and which are still masked (flat grey).

Bad input is reported as one line `error: ...` on stderr with exit code 2, and is checked before the (slow)
model load wherever that is possible. Ctrl-C stops with one line `interrupted` and exit code 130.
"""
import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

import amused
import cli
import speed
from amused import Amused, to_pil
from cli import DTYPES, UsageError
from convert_weights import CheckpointError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF"}  # --out suffix -> PIL format
DEFAULT_STRENGTH = {"img2img": 0.5, "inpaint": 1.0}  # the pipelines' defaults (and diffusers')
GREY = 0.5  # colour of the still-masked token cells in --save-steps frames
FRAME_MS, LAST_FRAME_MS = 300, 2000  # --save-steps: each step, then the final image held longer
# what a user can fix: one line `error: ...` and exit code 2 (cli.run)
USER_ERRORS = (UsageError, CheckpointError, FileNotFoundError, ValueError, TypeError, OSError, FloatingPointError)


# ----------------------------------------------------------------------------------------------------
# Checks that need no model


def parse_steps(text) -> list[int]:
    """"12" -> [12]; "5,10,15" -> [5, 10, 15] (one grid column each)."""
    try:
        counts = [int(s) for s in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--steps must be an integer or a comma list of integers like 5,10,15, got {text!r}") from None
    if any(s < 1 for s in counts):
        raise UsageError(f"--steps must be >= 1, got {text!r}")
    return counts


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
    float32; int8: the U-ViT's linear layers, the rest as auto)."""
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
    image: Image.Image | None  # 8-bit RGB, model-sized
    mask: Image.Image | None  # 8-bit L, the image's aspect ratio


def load(checkpoint: str, device: str, dtype: torch.dtype, variant: str | None, exact: bool) -> Amused:
    t0 = time.perf_counter()
    pipe = Amused.from_pretrained(checkpoint, device=device, dtype=dtype, variant=variant, exact=exact)
    s = pipe.transformer.cfg.sample_size
    vq_note = " (VQ in fp32: force_upcast)" if pipe.vqvae.upcast else ""
    print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s: {pipe.resolution}x{pipe.resolution} images, "
          f"{s}x{s} tokens{vq_note}", flush=True)
    return pipe


def fit_to_model(image: Image.Image, size: int, token: int, what: str) -> Image.Image:
    """An image of another size than the model's, scaled (shorter side to `size`, Lanczos) and centre-cropped to
    size x size, with a note. The pipelines themselves refuse other sizes; the command line does this for you.
    Sizes within one token (`token` pixels) of the model's are left to the pipeline, which cuts them down like
    the reference."""
    if size <= min(image.width, image.height) and max(image.width, image.height) < size + token:
        return image
    scale = size / min(image.width, image.height)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    print(f"note: {what} is {image.width}x{image.height}; scaled to {w}x{h} and centre-cropped to {size}x{size}")
    return image.resize((w, h), resample=Image.LANCZOS).crop((left, top, left + size, top + size))


def compile_and_warm_up(pipe: Amused, job: Job, seed: int, generator: str) -> None:
    """Every step has the same shapes, (B, h, w) tokens and the U-ViT on 2B with guidance, in all three modes, so
    two compiled graphs (a step, and the last step, which re-masks nothing) serve every run. A short text-to-image
    warm-up (same batch, same guidance) compiles them (and on CUDA records their CUDA graphs) before we time
    anything."""
    pipe.compile()
    t0 = time.perf_counter()
    pipe(job.prompt, job.negative_prompt, steps=2, guidance_scale=job.guidance_scale,
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


def duration(seconds: float) -> str:
    """12.3 s, 4 min 10 s, 2 h 46 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds) // 60
    return f"{minutes} min {round(seconds) % 60} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


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
            print(f"  about {duration((now - self.t_prev) * left)} more for the other {left} step{'s' * (left > 1)} "
                  f"(at this step's pace)", flush=True)
        self.t_prev, self.first = now, False
        if self.history is not None:
            self.history.append(tokens[0].to("cpu", copy=True))  # a copy, even when already on the CPU


def generate(pipe: Amused, job: Job, n_steps: int, generator: torch.Generator, callback) -> list[Image.Image]:
    kw = dict(steps=n_steps, guidance_scale=job.guidance_scale, generator=generator,
              num_images_per_prompt=job.num_images, aesthetic_score=job.aesthetic_score, callback=callback)
    if job.mode == "inpaint":
        return pipe.inpaint(job.prompt, job.image, job.mask, job.strength, job.negative_prompt, **kw)
    if job.mode == "img2img":
        return pipe.img2img(job.prompt, job.image, job.strength, job.negative_prompt, **kw)
    return pipe(job.prompt, job.negative_prompt, **kw)


def generate_all(pipe: Amused, job: Job, step_counts: list[int], seed: int, generator: str,
                 keep_history: bool) -> tuple[list[list[Image.Image]], list[torch.Tensor]]:
    """One run per step count -> columns[j]: the images of run j, and (keep_history) the first image's tokens
    (h, w) after each step of the first run."""
    n_tokens = job.num_images * pipe.transformer.cfg.sample_size ** 2
    history, columns = [], []
    for j, n_steps in enumerate(step_counts):
        progress = Progress(pipe.mask_id, n_steps, n_tokens, history if keep_history and j == 0 else None)
        t0 = time.perf_counter()
        # A fresh generator per run: each column is what `--steps n_steps` alone would give.
        columns.append(generate(pipe, job, n_steps, torch.Generator(generator).manual_seed(seed), progress))
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


def main(prompt: str, checkpoint: str = "amused/amused-256", negative_prompt: str | None = None, steps: str = "12",
         guidance_scale: float = 10.0, seed: int = 0, num_images: int = 1, out: str = "out.png",
         device: str = "auto", dtype: str = "auto", compile: bool = False, init_image: str | None = None,
         strength: float | None = None, mask: str | None = None, save_steps: str | None = None,
         aesthetic_score: float = 6.0, variant: str | None = None, exact: bool = False,
         generator: str = "auto") -> None:
    t_start = time.perf_counter()

    # 1. Everything that can be checked without the model, first: loading takes seconds to minutes.
    step_counts = parse_steps(steps)
    check_numbers(guidance_scale, aesthetic_score, seed, num_images)
    mode, strength = check_mode(init_image, mask, strength, step_counts)
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
                    variant=variant, mode=mode, steps=",".join(map(str, step_counts)), guidance_scale=guidance_scale,
                    seed=seed, generator=generator, num_images=num_images, aesthetic_score=aesthetic_score,
                    init_image=init_image, strength=strength, mask=mask, device=device,
                    dtype=dtype_shown, compile=compile, exact=exact,
                    out=out, save_steps=save_steps)
    print("settings:\n" + "\n".join(f"  {key:<16}{value}" for key, value in settings.items()))

    # 2. The model, and the input images fitted to its size.
    pipe = load(checkpoint, device, torch_dtype, variant, exact)
    px, f = pipe.resolution, pipe.vqvae.cfg.downsample_factor
    job = Job(mode, prompt, negative_prompt, guidance_scale, num_images, aesthetic_score, strength,
              image=None if image is None else fit_to_model(image, px, f, "--init-image"),
              mask=None if mask_image is None else fit_to_model(mask_image, px, f, "--mask"))
    if compile:
        compile_and_warm_up(pipe, job, seed, generator)

    # 3. One run per step count, each from the same seed.
    note_step_counts(job, step_counts, pipe.transformer.cfg.sample_size ** 2)
    t_gen = time.perf_counter()
    columns, history = generate_all(pipe, job, step_counts, seed, generator, keep_history=gif_path is not None)
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
    p.add_argument("prompt")
    add_model_flags(p)
    p.add_argument("--negative-prompt", default=None, help="what to steer away from; None: the empty prompt")
    p.add_argument("--steps", default="12", help="sampling steps; a comma list such as 5,10,15 makes a grid")
    p.add_argument("--guidance-scale", type=float, default=10.0, help="classifier-free guidance; <= 1 turns it off")
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**64): seed of the torch.Generator used for sampling")
    p.add_argument("--generator", choices=["auto", "cpu"], default="auto",
                   help="where the random numbers are drawn. auto: on the GPU when sampling on CUDA (fast), else on "
                        "the CPU; cpu: always, the same draws as diffusers with a CPU generator")
    p.add_argument("--num-images", type=int, default=1, help="images per step count (grid rows)")
    p.add_argument("--aesthetic-score", type=float, default=6.0, help="micro-conditioning aesthetic score")
    p.add_argument("--out", default="out.png", help="output image; a grid when there are several images")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the whole sampling step (CUDA: with CUDA graphs); compiling takes tens of "
                        "seconds, and on the CPU gains little")
    p.add_argument("--init-image", default=None,
                   help="start from this image (image to image); scaled and centre-cropped to the model's size")
    p.add_argument("--strength", type=float, default=None,
                   help="in (0, 1]: how much of --init-image to redo; None: 0.5, or 1.0 with --mask")
    p.add_argument("--mask", default=None, help="inpainting mask for --init-image: white = repaint")
    p.add_argument("--save-steps", default=None, metavar="FILE.gif",
                   help="write an animation of the prediction after every step (first image, first step count)")
    cli.run(main, p.parse_args(), errors=USER_ERRORS)
