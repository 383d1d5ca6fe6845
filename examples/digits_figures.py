"""examples/digits_figures.py: the pictures and tables of docs/how-it-works.md, drawn from a finished digits run.

    python examples/digits.py --out runs/digits                                     # train once (~9 min)
    python examples/digits_figures.py --run runs/digits --out runs/digits/figures  # no training: figures.md
    python examples/digits_figures.py --run runs/digits --out docs/how-it-works    # redraw the project's page

Nothing is trained here: every picture comes from the model the run in --run trained (its model.safetensors, its
judged figures results.json and results.md, its first training digit data/0000.png): the unmasking of generated
digits step by step (the frames `sample.py --save-steps` writes), samples of every class, what a training example
looks like after masking, the same prompts at other sizes, the confidence and Halton orders
(digits_samplers.draw_figure), and the mask-count schedule. The pictures go into the folder --out, and the page
beside it, named after it: FOLDER.md (docs/how-it-works.md for docs/how-it-works). The images are tiny (16x16
pixels) and are scaled up, nearest-neighbour, so the tokens stay visible. Every digits.py run draws two of these
pictures into its own folder too, at 8x: samples.png and unmasking.gif.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's flat modules, from any working directory

import cli  # noqa: E402
import sample  # noqa: E402
from amused import Amused, to_pil  # noqa: E402
from cli import atomic_write, image_grid  # noqa: E402
from sampling import mask_ratio, sampling_mask_counts, training_mask_count  # noqa: E402

SCALE = 8  # pixels per image pixel in a run's own pictures; the page's are half that
PICTURES = ("unmasking.gif", "samples.png", "masked-example.png", "sizes.png", "samplers.png")  # what draw() writes


def upscaled(images, scale: int = SCALE, border: int = 3):
    """Each image `scale` times larger (nearest-neighbour: the tokens stay sharp), in a white frame."""
    return [ImageOps.expand(im.resize((im.width * scale, im.height * scale), resample=Image.NEAREST), border, "white")
            for im in images]


def save_png(image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", optimize=True))


def label_tile(text: str, size: tuple[int, int]) -> Image.Image:
    """`text` centred on a white tile of `size`: a row's label in a grid of tiles of that size."""
    tile = Image.new("RGB", size, "white")
    font = ImageFont.load_default(size=size[1] // 3)
    ImageDraw.Draw(tile).text((size[0] / 2, size[1] / 2), text, fill="black", font=font, anchor="mm")
    return tile


@torch.no_grad()
def unmasking_gif(pipe: Amused, path: Path, seed: int, scale: int = SCALE // 2) -> None:
    """One sample of each digit, side by side under its label, after every one of 12 steps: committed tokens
    decoded, masked ones grey (sample.step_frames, what --save-steps draws); the last frame held longer."""
    history = []
    pipe([f"a handwritten digit {k}" for k in range(10)], generator=torch.Generator().manual_seed(seed),
         output_type="tokens", callback=lambda step, tokens: history.append(tokens.cpu().clone()))
    frames = []
    for tokens in history:  # (10, h, w) after each step
        digits = sample.step_frames(pipe, list(tokens))
        frames.append(image_grid(upscaled(digits, scale), cols=10, labels=[str(k) for k in range(10)]))
    durations = [sample.FRAME_MS * 2] * (len(frames) - 1) + [sample.LAST_FRAME_MS]
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                                                  duration=durations))


@torch.no_grad()
def samples_grid(pipe: Amused, path: Path, seed: int, per_class: int = 10, scale: int = SCALE // 2) -> None:
    """Rows: the digits 0 to 9, each after its label; columns: seeds (12 steps, guidance 10, the defaults)."""
    images = upscaled(pipe([f"a handwritten digit {k}" for k in range(10)], num_images_per_prompt=per_class,
                           generator=torch.Generator().manual_seed(seed)), scale)  # [p0..p9, p0..p9, ...]
    rows = [[label_tile(str(k), images[0].size)] + [images[j * 10 + k] for j in range(per_class)] for k in range(10)]
    save_png(image_grid([tile for row in rows for tile in row], cols=per_class + 1), path)


@torch.no_grad()
def masked_training_example(pipe: Amused, image: torch.Tensor, path: Path, seed: int) -> None:
    """A training digit, its VQ reconstruction, then its tokens as training masks them at t = 0.2, 0.5 and 0.8:
    mask_ratio(t) of the tokens, the positions at random (masked ones grey)."""
    tokens = pipe.vqvae.encode_to_ids(image[None])[0]  # (h, w)
    L = tokens.numel()
    generator = torch.Generator().manual_seed(seed)
    panels = to_pil(image[None]) + to_pil(pipe.vqvae.decode_ids(tokens[None]))
    for t in (0.2, 0.5, 0.8):
        n = int(training_mask_count(torch.tensor([t]), L))
        positions = torch.randperm(L, generator=generator)[:n]
        masked = tokens.flatten().clone()
        masked[positions] = pipe.mask_id
        panels += sample.step_frames(pipe, [masked.view_as(tokens)])
    save_png(image_grid(upscaled(panels), cols=len(panels)), path)


@torch.no_grad()
def sizes_grid(pipe: Amused, path: Path, seed: int,
               sizes=((16, 16), (24, 16), (16, 24), (24, 24), (32, 32))) -> None:
    """Rows: image sizes (width x height; the model was trained at 16x16); columns: the digits 0 to 9, the same
    prompts and seed at every size (12 steps, guidance 4)."""
    rows = [pipe([f"a handwritten digit {k}" for k in range(10)], width=w, height=h, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(seed)) for w, h in sizes]
    scale, gap, label_w = SCALE // 2, 6, 90
    cell_w, cell_h = max(w for w, _ in sizes) * scale + gap, [h * scale + gap for _, h in sizes]
    out = Image.new("RGB", (label_w + 10 * cell_w, sum(cell_h)), "white")
    pen, top = ImageDraw.Draw(out), 0
    for (w, h), images, row_h in zip(sizes, rows, cell_h):
        pen.text((label_w / 2, top + row_h / 2), f"{w}x{h}" + (" (trained)" if (w, h) == (16, 16) else ""),
                 fill="black", anchor="mm")
        for k, image in enumerate(images):
            out.paste(image.resize((w * scale, h * scale), resample=Image.NEAREST), (label_w + k * cell_w, top))
        top += row_h
    save_png(out, path)


def schedule_table(steps: int = 12) -> str:
    """How many of 64 (our digits) and 256 (amused-256) tokens stay masked after each of 12 steps, as the sampler
    computes it in float32 (sampling_mask_counts), against the same in float64."""
    rows = ["| after step k | cos(pi/2 x k/12), float32 | masked, of 64 | of 256 | of 256, in float64 |",
            "|---|---|---|---|---|"]
    of_64, of_256 = sampling_mask_counts(steps, 64).tolist(), sampling_mask_counts(steps, 256).tolist()
    for step in range(steps):
        ratio = mask_ratio(torch.tensor(step + 1) / steps).item()
        f64 = 0 if step == steps - 1 else math.floor(256 * math.cos(math.pi / 2 * (step + 1) / steps))
        f32_cell = f"**{of_256[step]}**" if of_256[step] != f64 else str(of_256[step])
        rows.append(f"| {step + 1} | {ratio:.8f} | {of_64[step]} | {f32_cell} | {f64} |")
    return "\n".join(rows)


def page_path(folder: Path) -> Path:
    """Where the page of the pictures in `folder` goes: beside it, FOLDER.md."""
    folder = folder.resolve()
    return folder.with_name(folder.name + ".md")


def draw(run_dir: Path, folder: Path, seed: int = 0) -> Path:
    """The pictures of the finished digits run in `run_dir` into `folder`, and their page beside it; -> the page."""
    run_dir, folder = Path(run_dir), Path(folder)
    for name in ("model.safetensors", "results.json", "results.md", "data/0000.png"):
        if not (run_dir / name).is_file():
            raise cli.UsageError(f"{run_dir} is not a finished digits run ({run_dir / name} is missing): run "
                                 f"examples/digits.py --out {run_dir} first (with --resume if it was interrupted)")
    import digits_samplers  # examples/digits_samplers.py (it imports digits.py, which imports this file)

    pipe = Amused.from_pretrained(run_dir / "model.safetensors")
    results = json.loads((run_dir / "results.json").read_text())
    first = torch.from_numpy(np.array(Image.open(run_dir / "data" / "0000.png").convert("RGB")))
    folder.mkdir(parents=True, exist_ok=True)
    unmasking_gif(pipe, folder / "unmasking.gif", seed)
    samples_grid(pipe, folder / "samples.png", seed)
    masked_training_example(pipe, first.permute(2, 0, 1) / 255, folder / "masked-example.png", seed)
    sizes_grid(pipe, folder / "sizes.png", seed)
    digits_samplers.draw_figure(pipe, folder / "samplers.png", seed=seed)
    seconds, page = results["seconds"], page_path(folder)
    text = PAGE_TEMPLATE.format(
        results=(run_dir / "results.md").read_text(), schedule=schedule_table(),
        machine=results.get("machine", "machine not recorded"), minutes=seconds["total"] / 60,
        uvit_minutes=seconds["U-ViT"] / 60, vq=results["vq"]["held out"],
        g10=results["12 steps, guidance 10"]["accuracy"], g4=results["12 steps, guidance 4"]["accuracy"],
        ceiling=results["judge_on_real_held_out"], uvit_params=sum(p.numel() for p in pipe.transformer.parameters()),
        readme=Path(os.path.relpath(ROOT / "README.md", page.parent)).as_posix(),
        **{name.replace(".", "_").replace("-", "_"): f"{folder.name}/{name}" for name in PICTURES})
    atomic_write(page, lambda tmp: Path(tmp).write_text(text))
    total = sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote {page} and its pictures in {folder} ({total / 1024:.0f} KiB)")
    return page


PAGE_TEMPLATE = """# How aMUSEd works, shown on handwritten digits

Every picture and number on this page comes from one run of `examples/digits.py`, which trains a whole aMUSEd from
scratch (a VQ tokenizer, then a U-ViT; the text encoder is a small CLIP with fixed random weights) on
scikit-learn's 1,797 handwritten digits in {minutes:.0f} minutes on a CPU ({machine}). To train it and draw it all
again:

```bash
python examples/digits.py --out runs/digits
python examples/digits_figures.py --run runs/digits --out docs/how-it-works
```

The model is tiny, and so are its images: 16x16 pixels, an 8x8 grid of tokens from a codebook of 16. The
official amused-256 works the same way on 256x256 pixels, a 16x16 grid and a codebook of 8,192.

## 1. Images become tokens

A VQ-VAE (`vqgan.py`) turns every 2x2 patch of pixels into the id of the nearest of its 16 code vectors, and turns a
grid of ids back into an image. On the held-out digits its reconstructions are off by a mean squared error of
{vq[mse]:.4f} (pixels in [0, 1]); the codes it picks have a perplexity of {vq[perplexity]:.1f} (16 would be all
used equally often), and {vq[unused]} are never used. The first two panels of the next picture: a training digit and
its reconstruction from its 64 tokens.

## 2. Training: hide some tokens, predict them

![a digit, its VQ reconstruction, then its tokens masked at t = 0.2, 0.5, 0.8](./{masked_example_png})

For each training image, `train.py` draws t in [0, 1), masks `round(64 * cos(pi/2 * t))` of its 64 tokens at random
(grey above, for t = 0.2, 0.5 and 0.8: 61, 45 and 20 tokens), and trains the U-ViT (`uvit.py`) to predict the hidden
tokens from the visible ones and the caption, with cross-entropy on the hidden positions only. 15% of the time the
caption is replaced by the empty prompt, so that the same model also learns to draw without one: classifier-free
guidance needs both. The U-ViT here has {uvit_params:,} parameters and trains for {uvit_minutes:.1f} minutes.

## 3. Sampling: start from nothing, commit the surest tokens first

![one sample of each digit, after each of 12 steps](./{unmasking_gif})

Generation starts from a grid where every token is masked. At each of 12 steps the U-ViT predicts every position;
a token is drawn at every masked one, and the most confident of those are kept while the rest are masked again
(their confidence is the token's log-probability plus Gumbel noise whose temperature falls from 2 to 0:
randomness early, greed late). How many stay masked after each step follows the cosine schedule, computed in float32
exactly as diffusers' `AmusedScheduler` does (`sampling.sampling_mask_counts`). Rounding matters: after step 8,
cos(pi/2 x 8/12) is 0.49999997 in float32, so 127 of amused-256's 256 tokens stay masked where float64 would keep
128; we reproduce it, so that the same seed gives the same tokens as diffusers.

{schedule}

## 4. Classifier-free guidance

Each step runs the U-ViT twice in one batch, on the caption and on the empty prompt, and moves the logits away from
the unconditioned prediction: `uncond + g * (cond - uncond)`. A judge fixed before training (an SVC trained on the
real training digits' pixels, {ceiling:.1%} right on the real held-out digits) reads each generated digit, averaged
back to 8x8:

{results}

Guidance helps, up to a point: at guidance 4, {g4:.1%} of the digits read as the one asked for; at the pipeline's
default of 10, {g10:.1%}. With one token per 2x2 patch, even the background's tokens carry a little class
information (which codes border the strokes), and a strong guidance pushes such positions onto the rarer,
class-typical codes, which shows as grey speckle around the digits. The official models, whose tokens cover 16x16
pixels each, are used at 10.

## 5. Samples

![ten samples of each digit, 12 steps, guidance 10](./{samples_png})

Ten samples per digit (rows 0 to 9), 12 steps at the default guidance 10, one seed per column.

## 6. Other sizes

![the same prompts and seed at 16x16, 24x16, 16x24, 24x24 and 32x32 pixels](./{sizes_png})

The U-ViT has no positional embedding: its convolutions carry position, so it runs on a token grid of any size
(`pipe(prompt, width=24, height=16)`; a 2x2-pixel token here, 16x16 pixels for amused-256). But it learned to draw
one digit filling an 8x8 grid. Above, the same prompts and seed at other sizes, guidance 4. Taller (16x24), it still
draws one digit, stretched; wider (24x16), it draws pieces of the digit side by side; at 24x24 strokes repeat
across the frame, and at 32x32 (4x the tokens) no digit is left, only stroke texture. Its local statistics survive,
its global layout does not. Expect the same kind of thing, less extreme, from the official models far from their
256 or 512 pixels: the micro-conditioning tells them the size, but they were trained mostly at one.

## 7. Fewer passes: the Halton order

![the same digits drawn by the confidence order and the Halton order, 8 steps, step by step](./{samplers_png})

The sampler above commits the most confident tokens first: on the digits, the black background, then the strokes'
edges, the digit itself last. The Halton sampler (`sampler="halton"`, Besnier et al., ICLR 2025) instead reveals
the positions in a fixed order that spreads them evenly over the grid (a 2-D Halton sequence), with no confidence
and no re-masking: every step commits a sample of the whole image. Both pictures: the same prompts and seed, 8
steps, guidance 4 (`digits_samplers.draw_figure`; also `python examples/digits_samplers.py
runs/digits/model.safetensors --figure samplers.png`). How each sampler, guidance schedule and step count reads to
the judge, per U-ViT pass: the README's [Fewer U-ViT passes]({readme}#fewer-u-vit-passes-the-samplers).
"""


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR",
                   help="a finished examples/digits.py run: its --out folder")
    p.add_argument("--out", dest="folder", required=True, metavar="FOLDER",
                   help="the pictures go into FOLDER, their page beside it as FOLDER.md")
    p.add_argument("--seed", type=int, default=0, help="the drawings' seed")
    cli.run(draw, p.parse_args(), errors=(cli.UsageError, OSError))
