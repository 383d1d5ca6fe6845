"""sample.py: generate images with aMUSEd from the command line.

    python sample.py "a photo of a cat"                                   # amused-256, 12 steps -> out.png
    python sample.py "a photo of a cat" --steps 4,8,12 --num-images 2     # grid: rows = images, columns = steps
    python sample.py "a photo of a cat" --save-steps cat.gif              # the prediction after every step
    python sample.py "a cat in the snow" --init-image cat.png --strength 0.6        # image to image
    python sample.py "a dog" --init-image cat.png --mask mask.png                   # inpainting, white = repaint
    python sample.py "a cat" --checkpoint amused-512.safetensors --device cuda --compile
    python sample.py "a cat" --no-exact                                   # CPU: faster, not bit-exact

--checkpoint takes a hub-layout folder, a file written by convert_weights.py, or a hub repo id, which is
downloaded into huggingface_hub's cache on first use. --seed seeds a torch.Generator, on the CPU unless sampling on
CUDA (--generator auto): on the CPU in fp32, the same seed gives the same image as diffusers' pipelines given a
CPU generator with that seed. --generator cpu draws on the CPU on every device, as diffusers does with a CPU
generator (the same random numbers; a GPU's arithmetic still differs), at the cost of a copy and a CPU draw per
step.
Each entry of --steps is an independent run from the same seed, so the columns of a grid differ only in the
number of steps.

--save-steps FILE.gif shows what a masked-token model offers and a diffusion model does not: after every step,
which tokens the model has committed to (decoded by the VQ) and which are still masked (flat grey).

Bad input is reported as one line `error: ...` on stderr with exit code 2, and is checked before the (slow)
model load wherever that is possible.
"""
import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from amused import Amused, to_pil
from convert_weights import CheckpointError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF"}  # --out suffix -> PIL format
GREY = 0.5  # colour of the still-masked token cells in --save-steps frames
FRAME_MS, LAST_FRAME_MS = 300, 2000  # --save-steps: each step, then the final image held longer


class UsageError(ValueError):
    """A flag value we reject before doing any work."""


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


def resolve_device(name: str) -> str:
    """auto -> cuda, else mps, else cpu; an explicit device that is not there is an error, not a fallback."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise UsageError("--device cuda: CUDA is not available here (no GPU, or torch built without CUDA); "
                         "use --device cpu or auto")
    if name == "mps" and not mps:
        raise UsageError("--device mps: MPS (Apple GPU) is not available here; use --device cpu or auto")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    # auto: fp16 where it is fast and well supported (CUDA), fp32 elsewhere. The resolved dtype is printed.
    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return DTYPES[name]


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
    """Read an image fully now, so that a missing or corrupt file fails before the model load."""
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        image = Image.open(path)
        image.load()  # Image.open only reads the header; a truncated file fails here
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: cannot read it as an image ({e})") from None
    # matches reference: diffusers.utils.load_image applies the EXIF orientation of photos
    return ImageOps.exif_transpose(image)


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


# ----------------------------------------------------------------------------------------------------
# Writing images


def save_atomic(image: Image.Image, path: Path, **params) -> None:
    """Write to a temporary name in the same folder, then rename: an interrupted run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format=IMAGE_FORMATS[path.suffix.lower()], **params)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_grid(columns: list[list[Image.Image]], labels: list[str] | None) -> Image.Image:
    """columns[j][i]: image i of run j -> one image, rows = images, columns = runs; labels above the columns."""
    W, H = columns[0][0].size
    label_h = 0 if labels is None else max(12, H // 10)
    font = ImageFont.load_default(size=label_h * 0.8) if labels else None
    grid = Image.new("RGB", (W * len(columns), label_h + H * len(columns[0])), "white")
    draw = ImageDraw.Draw(grid)
    for j, column in enumerate(columns):
        if labels:
            text = labels[j] if draw.textlength(labels[j], font=font) <= W else labels[j].split()[0]  # "12 steps" or "12"
            draw.text((j * W + W / 2, label_h / 2), text, fill="black", font=font, anchor="mm")
        for i, image in enumerate(column):
            grid.paste(image, (j * W, label_h + i * H))
    return grid


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


# ----------------------------------------------------------------------------------------------------


def main(prompt: str, checkpoint: str = "amused/amused-256", negative_prompt: str | None = None, steps: str = "12",
         guidance_scale: float = 10.0, seed: int = 0, num_images: int = 1, out: str = "out.png",
         device: str = "auto", dtype: str = "auto", compile: bool = False, init_image: str | None = None,
         strength: float | None = None, mask: str | None = None, save_steps: str | None = None,
         aesthetic_score: float = 6.0, variant: str | None = None, exact: bool = True,
         generator: str = "auto") -> None:
    t_start = time.perf_counter()

    # Everything that can be checked without the model, first: loading takes seconds to minutes.
    step_counts = parse_steps(steps)
    if not guidance_scale >= 0:
        raise UsageError(f"--guidance-scale must be >= 0 (values <= 1 turn guidance off), got {guidance_scale}")
    if num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {num_images}")
    if mask is not None and init_image is None:
        raise UsageError("--mask needs --init-image: the image whose white-masked region is repainted")
    if strength is not None and init_image is None:
        raise UsageError("--strength applies only with --init-image")
    mode = "inpaint" if mask else "img2img" if init_image else "text-to-image"
    if strength is None and init_image is not None:
        strength = 1.0 if mask else 0.5  # the defaults of the pipelines (and diffusers')
    if strength is not None and not 0 < strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {strength}")
    if mode == "inpaint" and any(int(s * strength) == 0 for s in step_counts):
        raise UsageError(f"--strength {strength} x --steps {steps} rounds down to 0 steps for inpainting; "
                         f"raise one of them")
    out_path = check_writable(out, "--out", IMAGE_FORMATS)
    gif_path = None if save_steps is None else check_writable(save_steps, "--save-steps", {".gif": "GIF"})
    device = resolve_device(device)
    generator = resolve_generator_device(generator, device)
    torch_dtype = resolve_dtype(dtype, device)
    image = None if init_image is None else open_image(init_image, "--init-image")
    mask_image = None if mask is None else open_image(mask, "--mask")
    if mask_image is not None and mask_image.width * image.height != mask_image.height * image.width:
        raise UsageError(f"--mask is {mask_image.width}x{mask_image.height} but --init-image is "
                         f"{image.width}x{image.height}: they must have the same aspect ratio")
    if mode == "img2img" and strength == 1:
        # matches reference: AmusedImg2ImgPipeline masks each token with probability cos(pi/2 * step'/steps) at
        # step' = start - 1, which at strength 1 is index -1, the last step: cos(pi/2) < 0, so nothing is masked
        print("note: img2img at --strength 1 masks none of the image's tokens at the start (as in diffusers), so "
              "the output stays close to the input; use e.g. 0.99 to redo most of it")
    if compile and device != "cuda":
        # CUDA graphs (mode="reduce-overhead") are what makes compiling worth its start-up time here
        print(f"note: --compile is for CUDA only; ignored on {device}")
        compile = False

    dtype_name = next(k for k, v in DTYPES.items() if v == torch_dtype)
    print("settings:")
    settings = dict(prompt=repr(prompt), negative_prompt=repr(negative_prompt), checkpoint=checkpoint,
                    variant=variant, mode=mode, steps=",".join(map(str, step_counts)), guidance_scale=guidance_scale,
                    seed=seed, generator=generator, num_images=num_images, aesthetic_score=aesthetic_score,
                    init_image=init_image, strength=strength, mask=mask, device=device, dtype=dtype_name,
                    compile=compile, exact=exact, out=out, save_steps=save_steps)
    for key, value in settings.items():
        print(f"  {key:<16}{value}")

    t0 = time.perf_counter()
    pipe = Amused.from_pretrained(checkpoint, device=device, dtype=torch_dtype, variant=variant, exact=exact)
    vq_note = " (VQ in fp32: force_upcast)" if pipe.vqvae.upcast else ""
    print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s: {pipe.resolution}x{pipe.resolution} images, "
          f"{pipe.grid_size}x{pipe.grid_size} tokens{vq_note}", flush=True)

    if image is not None:
        image = fit_to_model(image, pipe.resolution, pipe.vqvae.cfg.downsample_factor, "--init-image")
    if mask_image is not None:
        mask_image = fit_to_model(mask_image, pipe.resolution, pipe.vqvae.cfg.downsample_factor, "--mask")

    def generate(n_steps: int, generator: torch.Generator, callback) -> list[Image.Image]:
        kw = dict(steps=n_steps, guidance_scale=guidance_scale, generator=generator, num_images_per_prompt=num_images,
                  aesthetic_score=aesthetic_score, callback=callback)
        if mode == "inpaint":
            return pipe.inpaint(prompt, image, mask_image, strength, negative_prompt, **kw)
        if mode == "img2img":
            return pipe.img2img(prompt, image, strength, negative_prompt, **kw)
        return pipe(prompt, negative_prompt, **kw)

    if compile:
        # Every step calls the U-ViT on the same shapes, (2B, h, w) with guidance, in all three modes, so one
        # compiled graph serves every run. A short text-to-image warm-up (same batch, same guidance) compiles it
        # and records the CUDA graphs before we time anything.
        pipe.transformer.predict = torch.compile(pipe.transformer.predict, mode="reduce-overhead")
        t0 = time.perf_counter()
        pipe(prompt, negative_prompt, steps=3, guidance_scale=guidance_scale, num_images_per_prompt=num_images,
             generator=torch.Generator(generator).manual_seed(seed), output_type="tokens")
        torch.cuda.synchronize()
        print(f"compiled the U-ViT in {time.perf_counter() - t0:.1f} s (a 3-step warm-up run)", flush=True)

    n_tokens = num_images * pipe.grid_size ** 2
    history = []  # tokens (h, w) of the first image after each step of the first run, for --save-steps
    columns = []  # columns[j]: the num_images images of run j
    t_gen = time.perf_counter()
    for j, n_steps in enumerate(step_counts):
        t_prev = time.perf_counter()

        def progress(step, tokens):
            nonlocal t_prev
            n_masked = int((tokens == pipe.mask_id).sum())  # .item() also waits for the GPU: honest timing
            now = time.perf_counter()
            print(f"step {step + 1}/{n_steps}: {n_masked} of {n_tokens} tokens still masked ({now - t_prev:.2f} s)",
                  flush=True)
            t_prev = now
            if gif_path is not None and j == 0:
                history.append(tokens[0].to("cpu", copy=True))  # a copy, even when already on the CPU

        t0 = time.perf_counter()
        # A fresh generator per run: each column is what `--steps n_steps` alone would give.
        columns.append(generate(n_steps, torch.Generator(generator).manual_seed(seed), callback=progress))
        dt = time.perf_counter() - t0
        print(f"{n_steps} steps: {num_images} image{'s' * (num_images > 1)} in {dt:.2f} s "
              f"({dt / num_images:.2f} s per image)", flush=True)
    t_gen = time.perf_counter() - t_gen

    if len(columns) == 1 and num_images == 1:
        result = columns[0][0]
    else:
        result = make_grid(columns, [f"{s} steps" for s in step_counts] if len(step_counts) > 1 else None)
    save_atomic(result, out_path)
    print(f"wrote {out_path} ({result.width}x{result.height})")
    if gif_path is not None:
        frames = step_frames(pipe, history)
        save_atomic(frames[0], gif_path, save_all=True, append_images=frames[1:], loop=0,
                    duration=[FRAME_MS] * (len(frames) - 1) + [LAST_FRAME_MS])
        print(f"wrote {gif_path} ({len(frames)} frames, one per step of the first image at {step_counts[0]} steps)")
    n_images = num_images * len(step_counts)
    print(f"generated {n_images} image{'s' * (n_images > 1)} in {t_gen:.2f} s ({t_gen / n_images:.2f} s per image); "
          f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The docstring's layout kept, and every flag's default shown (they are the real ones)."""

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--checkpoint", default="amused/amused-256",
                   help="hub-layout folder, file from convert_weights.py, or hub repo id (downloaded on first use)")
    p.add_argument("--variant", choices=["fp16"], default=None,
                   help="read the .fp16.safetensors files of a hub checkpoint (half the download)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from; None: the empty prompt")
    p.add_argument("--steps", default="12", help="sampling steps; a comma list such as 5,10,15 makes a grid")
    p.add_argument("--guidance-scale", type=float, default=10.0, help="classifier-free guidance; <= 1 turns it off")
    p.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator used for sampling")
    p.add_argument("--generator", choices=["auto", "cpu"], default="auto",
                   help="where the random numbers are drawn. auto: on the GPU when sampling on CUDA (fast), else on "
                        "the CPU; cpu: always, the same draws as diffusers with a CPU generator")
    p.add_argument("--num-images", type=int, default=1, help="images per step count (grid rows)")
    p.add_argument("--aesthetic-score", type=float, default=6.0, help="micro-conditioning aesthetic score")
    p.add_argument("--out", default="out.png", help="output image; a grid when there are several images")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                   help="auto: cuda, else mps, else cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: fp16 on cuda, fp32 elsewhere; an fp16 VQ decodes in fp32 when its config says "
                        "force_upcast")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the U-ViT (CUDA only; ignored with a note elsewhere)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, the reference's kernels: fp32 output equal to diffusers' bit for bit; "
                        "--no-exact uses oneDNN matmuls (~1.2x faster, logits ~1e-6 off diffusers')")
    p.add_argument("--init-image", default=None,
                   help="start from this image (image to image); scaled and centre-cropped to the model's size")
    p.add_argument("--strength", type=float, default=None,
                   help="in (0, 1]: how much of --init-image to redo; None: 0.5, or 1.0 with --mask")
    p.add_argument("--mask", default=None, help="inpainting mask for --init-image: white = repaint")
    p.add_argument("--save-steps", default=None, metavar="FILE.gif",
                   help="write an animation of the prediction after every step (first image, first step count)")
    args = p.parse_args()
    # the pipeline's warnings (e.g. an image resized to a multiple of the token size) as one plain line
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        main(**vars(args))
    except (UsageError, CheckpointError, FileNotFoundError, ValueError, TypeError, OSError, FloatingPointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
