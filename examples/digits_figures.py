"""examples/digits_figures.py: the pictures and tables of docs/how-it-works.md, drawn from a digits run.

    python examples/digits.py --out runs/digits --figures docs/how-it-works

(digits.py calls draw() at its end.) Every picture comes from the model that run trained: the unmasking of
generated digits step by step (the frames `sample.py --save-steps` writes), samples of every class, what a
training example looks like after masking, and the mask-count schedule; the page itself is rewritten with the run's
figures. The images are tiny (16x16 pixels) and are scaled up, nearest-neighbour, so the tokens stay visible.
"""
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps

import sample
import speed
from amused import Amused, to_pil  # noqa: E402
from sampling import mask_ratio, sampling_mask_counts, training_mask_count  # noqa: E402
from cli import atomic_write, image_grid

SCALE = 8  # on-page pixels per image pixel
PAGE = Path(__file__).resolve().parents[1] / "docs" / "how-it-works.md"


def upscaled(images, scale: int = SCALE, border: int = 3):
    """Each image `scale` times larger (nearest-neighbour: the tokens stay sharp), in a white frame."""
    return [ImageOps.expand(im.resize((im.width * scale, im.height * scale), resample=Image.NEAREST), border, "white")
            for im in images]


def save_png(image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", optimize=True))


@torch.no_grad()
def unmasking_gif(pipe: Amused, path: Path, seed: int) -> None:
    """One sample of each digit, side by side, after every one of 12 steps: committed tokens decoded, masked ones
    grey (sample.step_frames, what --save-steps draws); the last frame held longer."""
    history = []
    pipe([f"a handwritten digit {k}" for k in range(10)], generator=torch.Generator().manual_seed(seed),
         output_type="tokens", callback=lambda step, tokens: history.append(tokens.cpu().clone()))
    frames = []
    for tokens in history:  # (10, h, w) after each step
        digits = sample.step_frames(pipe, list(tokens))
        frames.append(image_grid(upscaled(digits, SCALE // 2), cols=10))
    durations = [sample.FRAME_MS * 2] * (len(frames) - 1) + [sample.LAST_FRAME_MS]
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                                                  duration=durations))


@torch.no_grad()
def samples_grid(pipe: Amused, path: Path, seed: int, per_class: int = 10) -> None:
    """Rows: the digits 0 to 9; columns: seeds (12 steps, guidance 10, the defaults)."""
    images = pipe([f"a handwritten digit {k}" for k in range(10)], num_images_per_prompt=per_class,
                  generator=torch.Generator().manual_seed(seed))  # [p0..p9, p0..p9, ...]
    by_row = [images[j * 10 + k] for k in range(10) for j in range(per_class)]
    save_png(image_grid(upscaled(by_row, SCALE // 2), cols=per_class), path)


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


def cpu_name() -> str:
    return f"{speed.cpu_description()}, {torch.get_num_threads()} threads"


def draw(pipe: Amused, run_dir: Path, folder: Path, train_images: torch.Tensor, results: dict,
         seed: int = 0) -> None:
    """The pictures into `folder`, and the page docs/how-it-works.md (PAGE) around them, with this run's figures."""
    folder.mkdir(parents=True, exist_ok=True)
    unmasking_gif(pipe, folder / "unmasking.gif", seed)
    samples_grid(pipe, folder / "samples.png", seed)
    masked_training_example(pipe, train_images[0], folder / "masked-example.png", seed)
    sizes_grid(pipe, folder / "sizes.png", seed)
    images = {name: Path(folder / name).resolve().relative_to(PAGE.parent.resolve()).as_posix()
              if Path(folder).resolve().is_relative_to(PAGE.parent.resolve()) else str(folder / name)
              for name in ("unmasking.gif", "samples.png", "masked-example.png", "sizes.png", "samplers.png")}
    seconds = results["seconds"]
    page = PAGE_TEMPLATE.format(
        results=(run_dir / "results.md").read_text(), schedule=schedule_table(), cpu=cpu_name(),
        minutes=seconds["total"] / 60, uvit_minutes=seconds["U-ViT"] / 60, vq=results["vq"]["held out"],
        g10=results["12 steps, guidance 10"]["accuracy"], g4=results["12 steps, guidance 4"]["accuracy"],
        ceiling=results["judge_on_real_held_out"], uvit_params=sum(p.numel() for p in pipe.transformer.parameters()), **{k.replace(".", "_").replace("-", "_"): v for k, v in images.items()})
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(PAGE, lambda tmp: Path(tmp).write_text(page))
    total = sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote {PAGE} and its pictures in {folder} ({total / 1024:.0f} KiB)")


PAGE_TEMPLATE = """# How aMUSEd works, shown on handwritten digits

Every picture and number on this page comes from one run of `examples/digits.py`, which trains a whole aMUSEd from
scratch (a VQ tokenizer, then a U-ViT; the text encoder is a small CLIP with fixed random weights) on
scikit-learn's 1,797 handwritten digits in {minutes:.0f} minutes on a CPU ({cpu}). To draw it all again:

```bash
python examples/digits.py --out runs/digits --figures docs/how-it-works
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
randomness early, greed late). How many stay masked after each step follows the cosine schedule, computed in float32 exactly
as diffusers' `AmusedScheduler` does (`sampling.sampling_mask_counts`). Rounding matters: after step 8,
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
steps, guidance 4 (drawn by `python examples/digits_samplers.py runs/digits/model.safetensors --figure
docs/how-it-works/samplers.png`). How each sampler, guidance schedule and step count reads to the judge, per
U-ViT pass: the README's [Fewer U-ViT passes](../README.md#fewer-u-vit-passes-the-samplers).
"""
