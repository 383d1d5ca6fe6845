"""examples/digits_samplers.py: the samplers of sampling.py judged on the digits model, per U-ViT pass.

    python examples/digits.py --out runs/digits                            # train once
    python examples/digits_samplers.py runs/digits/model.safetensors       # the whole table
    python examples/digits_samplers.py runs/digits/model.safetensors --settings reference "fewer passes" --seeds 0 1
    python examples/digits_samplers.py runs/digits/model.safetensors --figure docs/how-it-works/samplers.png

For each sampler setting x steps x guidance scale: the judge's accuracy for the prompted digit, the Frechet
distance to the held-out digits and the diversity (examples/digits.py's figures), over --per-class images of each
digit (500 images a cell by default), and the U-ViT passes per image (a guided step costs 2: [negative; positive]).
The judge is digits.py's: an SVC fitted on the real training split of --split-seed (the --seed the model was trained
with) before anything here is drawn; it never saw a generated digit, and nothing here was tuned on it.

FEWER_PASSES and FEWEST_PASSES name the settings this table found to draw as well as the reference sampler at 12
steps (24 passes) in at most 8 and at most 4 passes: dicts of the pipeline call's keywords, so that anyone can check
them with another judge: `pipe(prompt, **FEWER_PASSES)`. The digits model is small (8x8 tokens, 16 codes): the official checkpoints may rank
the samplers differently (README, "Fewer U-ViT passes").

--figure draws the same digits (one per class, the same seed) by the confidence order and the Halton order, step by
step: committed tokens decoded, masked cells grey.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402
import digits  # noqa: E402
import sample  # noqa: E402
import sampling  # noqa: E402
import speed  # noqa: E402
from amused import Amused  # noqa: E402

# name -> the sampler keywords of the pipeline call. The reference first; then the 2022-2026 options alone and
# combined (sampling.py cites their papers).
SETTINGS = {
    "reference": {},
    "ramp": {"guidance_schedule": "ramp"},
    "interval": {"guidance_schedule": "interval"},
    "arccos": {"mask_schedule": "arccos"},
    "softmax 1.3->0.5": {"softmax_temperature": (1.3, 0.5)},
    "gumbel 0.75->0": {"temperature": (0.75, 0.0)},
    "ramp, gumbel 0.75->0": {"guidance_schedule": "ramp", "temperature": (0.75, 0.0)},
    "interval 0.67, gumbel 0.5->0": {"guidance_schedule": "interval", "guidance_from": 0.67, "temperature": (0.5, 0.0)},
    "halton": {"sampler": "halton"},
    "halton, ramp": {"sampler": "halton", "guidance_schedule": "ramp"},
    "halton, interval": {"sampler": "halton", "guidance_schedule": "interval"},
}
STEPS = (2, 3, 4, 8, 12)
GUIDANCES = (4.0, 10.0)
REFERENCE = dict(steps=12)  # the reference sampler at the pipeline's default step count: 24 passes

# What this table found (README, "Fewer U-ViT passes"): settings that read as well as the reference at 12 steps
# (either guidance) and draw closer to the real digits, in at most 8 passes per image (FEWER_PASSES: 5) and in at
# most 4 (FEWEST_PASSES). Both draw less varied digits than the reference: their Gumbel temperature is lower.
FEWER_PASSES = dict(steps=3, guidance_scale=6.0, guidance_schedule="ramp", temperature=(0.75, 0.0))
FEWEST_PASSES = dict(steps=3, guidance_scale=8.0, guidance_schedule="interval", guidance_from=0.67,
                     temperature=(0.5, 0.0))
FOUND = {"fewer passes": FEWER_PASSES, "fewest passes": FEWEST_PASSES}  # rows of one cell: their own steps, guidance


def draw(pipe: Amused, per_class: int, seed: int, call: dict) -> tuple[np.ndarray, np.ndarray]:
    """per_class images of each digit drawn with the pipeline keywords `call` -> their 8x8 pixels, the labels."""
    images = pipe(digits.CAPTIONS, num_images_per_prompt=per_class, generator=torch.Generator().manual_seed(seed),
                  output_type="pt", **call)  # [p0..p9, p0..p9, ...]
    return digits.to_pixels8(images), np.tile(np.arange(10), per_class)


def passes(call: dict) -> int:
    """U-ViT passes per image of a pipeline call (text to image: every step runs)."""
    return sampling.passes_per_image(sampling.guidance_scales(
        call.get("guidance_scale", 10.0), call["steps"], call.get("guidance_schedule", "constant"),
        call.get("guidance_from", 0.5)))


def judge_cell(pipe: Amused, judge, x_test, y_test, per_class: int, seeds: list[int], call: dict) -> dict:
    """The judge's figures of one setting, averaged over the seeds (each seed's too)."""
    runs = [digits.judge_samples(judge, *draw(pipe, per_class, seed, call), x_test, y_test) for seed in seeds]
    mean = {key: float(np.mean([r[key] for r in runs])) for key in ("accuracy", "frechet", "diversity")}
    return dict(**mean, passes=passes(call), per_seed=[{k: r[k] for k in mean} for r in runs])


def main(checkpoint: str, settings: list[str], steps: list[int], guidances: list[float], seeds: list[int],
         per_class: int = 50, split_seed: int = 0, out: str | None = None, figure: str | None = None) -> dict:
    if not Path(checkpoint).is_file():
        raise cli.UsageError(f"{checkpoint}: no such file; train one with examples/digits.py --out DIR first")
    unknown = [s for s in settings if s not in SETTINGS and s not in FOUND]
    if unknown:
        raise cli.UsageError(f"unknown setting {unknown[0]!r}; choose from {', '.join([*SETTINGS, *FOUND])}")
    x_train, y_train, x_test, y_test = digits.load_digits(split_seed)
    judge = digits.fit_judge(x_train, y_train)  # fixed before any sampler is looked at
    pipe = Amused.from_pretrained(checkpoint)  # fp32, the reference's kernels: the precision the README's figures use
    ceiling = dict(accuracy=float((judge.predict(x_test) == y_test).mean()),
                   frechet=digits.frechet_distance(x_train, x_test))
    print(f"{speed.cpu_description()}, {torch.get_num_threads()} threads; judge on real held-out digits "
          f"{ceiling['accuracy']:.3f}, Frechet real vs real {ceiling['frechet']:.1f}; {10 * per_class} images a cell, "
          f"seeds {seeds}", flush=True)
    cells = {}
    for name, call in calls(settings, steps, guidances):
        t0 = time.perf_counter()
        cell = judge_cell(pipe, judge, x_test, y_test, per_class, seeds, call)
        cells[f"{name} | {call['guidance_scale']:g} | {call['steps']}"] = cell
        print(f"  {name:28s} guidance {call['guidance_scale']:4g} steps {call['steps']:2d}: "
              f"accuracy {cell['accuracy']:.3f} Frechet {cell['frechet']:6.1f} diversity {cell['diversity']:.2f} "
              f"passes {cell['passes']:2d} ({time.perf_counter() - t0:.1f} s)", flush=True)
    results = dict(cpu=speed.cpu_description(), checkpoint=checkpoint, split_seed=split_seed, seeds=seeds,
                   per_class=per_class, ceiling=ceiling, found=FOUND, cells=cells)
    if out:
        cli.atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
        print(f"wrote {out}")
    print(tables(results))
    if figure:
        draw_figure(pipe, Path(figure))
    return results


def calls(settings: list[str], steps: list[int], guidances: list[float]) -> list[tuple[str, dict]]:
    """(row name, pipeline keywords) of every cell: a SETTINGS row at each guidance and step count; a FOUND row
    once, at its own."""
    return [(name, dict(FOUND[name])) if name in FOUND else (name, dict(SETTINGS[name], steps=n, guidance_scale=g))
            for name in settings for g in ([None] if name in FOUND else guidances)
            for n in ([None] if name in FOUND else steps)]


def tables(results: dict) -> str:
    """Markdown: per guidance scale, a row per setting, a column per step count: accuracy / Frechet (passes)."""
    cells, lines = results["cells"], []
    for guidance in sorted({float(key.split(" | ")[1]) for key in cells}):
        rows = [key for key in cells if float(key.split(" | ")[1]) == guidance]
        names = list(dict.fromkeys(key.split(" | ")[0] for key in rows))
        counts = sorted({int(key.split(" | ")[2]) for key in rows})
        lines += [f"\nguidance {guidance:g}: accuracy / Frechet distance (U-ViT passes per image)\n",
                  "| setting | " + " | ".join(f"{n} steps" for n in counts) + " |", "|---|" + "---|" * len(counts)]
        for name in names:
            row = [cells.get(f"{name} | {guidance:g} | {n}") for n in counts]
            lines.append(f"| {name} | " + " | ".join(
                "" if c is None else f"{c['accuracy']:.3f} / {c['frechet']:.0f} ({c['passes']})" for c in row) + " |")
    c = results["ceiling"]
    lines.append(f"\n{10 * results['per_class']} images a cell, mean of seeds {results['seeds']}; "
                 f"real held-out digits: "
                 f"accuracy {c['accuracy']:.3f}, Frechet real vs real {c['frechet']:.1f}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The picture: the confidence order and the Halton order, step by step


def draw_figure(pipe: Amused, path: Path, steps: int = 8, guidance: float = 4.0, seed: int = 0, scale: int = 5,
                gap: int = 4) -> None:
    """Two panels (confidence, Halton), each a row per digit and a column per step; committed tokens decoded,
    masked cells grey (sample.step_frames). The same prompts and seed in both."""
    size = pipe.resolution * scale
    panel_w, panel_h, label_h = steps * (size + gap), 10 * (size + gap), 28
    out = Image.new("RGB", (2 * panel_w + 6 * gap, panel_h + label_h), "white")
    pen = ImageDraw.Draw(out)
    for i, name in enumerate(("confidence", "halton")):
        history = []
        pipe(digits.CAPTIONS, steps=steps, guidance_scale=guidance, sampler=name, output_type="tokens",
             generator=torch.Generator().manual_seed(seed),
             callback=lambda step, tokens: history.append(tokens.clone()))
        left = i * (panel_w + 6 * gap)
        pen.text((left + panel_w / 2, label_h / 2), f"{name} order: steps 1 to {steps}, left to right", fill="black",
                 anchor="mm")
        for k in range(10):  # a row per digit
            for step, frame in enumerate(sample.step_frames(pipe, [tokens[k] for tokens in history])):
                out.paste(frame.resize((size, size), Image.NEAREST),
                          (left + step * (size + gap), label_h + k * (size + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(path, lambda tmp: out.save(tmp, format="PNG"))
    print(f"wrote {path} ({out.width}x{out.height})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoint", help="model.safetensors written by examples/digits.py")
    p.add_argument("--settings", nargs="+", default=[*SETTINGS, *FOUND],
                   help=f"which rows: {', '.join(SETTINGS)}; or {', '.join(FOUND)} (one cell, as it is)")
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS), help="step counts (columns)")
    p.add_argument("--guidances", nargs="+", type=float, default=list(GUIDANCES), help="guidance scales (tables)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="sampling seeds; each cell is their mean")
    p.add_argument("--per-class", type=int, default=50, help="images per digit in each cell")
    p.add_argument("--split-seed", type=int, default=0, help="the --seed the model was trained with: its judge's split")
    p.add_argument("--out", default=None, help="write every figure to this JSON file")
    p.add_argument("--figure", default=None, metavar="PNG", help="also draw the confidence and Halton orders")
    cli.run(main, p.parse_args(), errors=(cli.UsageError, ValueError))
