"""Throughput of `sample.py --prompts` at batch sizes 1, 4 and 8, side by side in one process.

    python bench/many_images.py                          # CPU: dtype auto (bf16 where native) and fp32
    python bench/many_images.py --device cuda --dtypes fp16 --batch-sizes 1 4 8 16

The amused-256 configuration with random weights (bench.reference: timing does not depend on the weight values),
12 steps, guidance 10, mixed prompts. Each run makes one batch the way sample_many.py does (make_images: a
generator per image, tokens in one pipeline call, each image decoded alone) and writes its PNGs (write_image);
images/s = batch size / the run's time. Every variant is warmed up (a 2-step run of its batch size), then the runs
go in rounds, each round running every variant once in turn, so that a slow spell of the machine hits all of them;
the table gives the median (min-max) over the rounds, and the speed-up per image against batch 1.

It also checks what the many-images determinism rests on: after the timed rounds, each image of the largest batch
is made alone (batch 1), and every batch's images are compared with those pixel for pixel; and each variant's
images with its own of every round. Prints the table and
appends it to bench/RESULTS.md.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench  # bench.py: the random-weight stand-ins, the machine's description
import sample_many
from cli import DTYPES, dtype_name
from sample_many import Defaults, Item, Keywords

PROMPTS = ["a photo of an astronaut riding a horse on the moon, highly detailed", "a bowl of fruit, still life",
           "a watercolor portrait of a woman with a red hat", "mountains at sunset, landscape photography",
           "a cyberpunk city at night", "a painting of a dog in the park, oil on canvas",
           "the quick brown fox jumps over the lazy dog", "a cat sitting on the table"]


def work(batch_size: int, steps: int) -> list[Item]:
    """The first batch_size images of the same mixed list: image i is the same (prompt, seed) at every batch size."""
    return [Item(i + 1, 0, PROMPTS[i % len(PROMPTS)], None, 1000 + i, Keywords(steps, 10.0, 6.0))
            for i in range(batch_size)]


DRAW = Defaults(None, 0, 1, Keywords(12, 10.0, 6.0))  # for its sampler and temperature: sample.py's defaults


def run_batch(pipe, items, generator_device, folder: Path, device: str) -> tuple[float, list[np.ndarray]]:
    """(seconds, the images as arrays): one batch, made and written as sample_many.py does."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = sample_many.make_images(pipe, items, generator_device, DRAW.sampler, DRAW.temperature)
    for item, image in zip(items, images):
        sample_many.write_image(folder / item.file, image, item.record())
    return time.perf_counter() - t0, [np.asarray(image) for image in images]


def main(device: str, dtypes: list[str], batch_sizes: list[int], steps: int, repeats: int, results: str) -> None:
    ref, tok = bench.reference("amused-256")
    pipes = {name: bench.ours_from(ref, tok, device, "auto" if name == "auto" else DTYPES[name], False)
             for name in dtypes}
    del ref
    generator_device = device  # sample.py's --generator auto: on the GPU when sampling on CUDA
    variants = [(name, b) for name in dtypes for b in batch_sizes]
    folder = Path(tempfile.mkdtemp(prefix="amused-many-"))
    for name, b in variants:  # warm-up: first-call costs (kernel selection, allocations) of each batch shape
        print(f"warming up {name} batch {b} ...", flush=True)
        run_batch(pipes[name], work(b, 2), generator_device, folder, device)
    times = {v: [] for v in variants}
    images: dict[tuple, list] = {}
    repeatable = {v: True for v in variants}
    for r in range(repeats):
        for v in variants:
            seconds, made = run_batch(pipes[v[0]], work(v[1], steps), generator_device, folder, device)
            times[v].append(seconds)
            repeatable[v] &= v not in images or all(np.array_equal(a, b) for a, b in zip(images[v], made))
            images[v] = made
            print(f"round {r + 1}: {v[0]} batch {v[1]}: {v[1] / seconds:.3f} images/s", flush=True)

    rows = []
    for name in dtypes:
        # every image of the largest batch, made alone (untimed): what each batch's images must equal
        print(f"making the {max(batch_sizes)} images of {name} alone ...", flush=True)
        alone = [run_batch(pipes[name], [item], generator_device, folder, device)[1][0]
                 for item in work(max(batch_sizes), steps)]
        shown = f"auto ({dtype_name(pipes[name].dtype)})" if name == "auto" else name
        per_image_b1 = statistics.median(times[(name, batch_sizes[0])]) / batch_sizes[0]
        for b in batch_sizes:
            t = times[(name, b)]
            rates = sorted(b / s for s in t)
            diffs = [int(np.abs(image.astype(int) - alone[i].astype(int)).max())
                     for i, image in enumerate(images[(name, b)])]
            equal = sum(d == 0 for d in diffs)
            rows.append(f"| {shown} | {b} | {statistics.median(rates):.4f} ({rates[0]:.4f}-{rates[-1]:.4f}) | "
                        f"{per_image_b1 / (statistics.median(t) / b):.2f}x | {equal} of {b}"
                        f"{'' if equal == b else f' (max diff {max(diffs)}/255)'} | "
                        f"{'n/a (1 round)' if repeats == 1 else 'yes' if repeatable[(name, b)] else 'no'} |")
    machine = bench.machine(device)
    text = (f"\n### {time.strftime('%Y-%m-%d')}: many images (bench/many_images.py), amused-256 stand-in, {steps} "
            f"steps, guidance 10, {repeats} round{'s' * (repeats > 1)} after a warm-up\n\nMachine: {machine}\n\n"
            f"| dtype | batch | images/s, median (min-max) | speed-up per image vs batch {batch_sizes[0]} | images "
            f"equal to the same image made alone | same images every round |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    bench.report(text, results)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["auto", *DTYPES],
                   help="default: auto and fp32 on the CPU, fp16 on CUDA")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="rounds of timed runs")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="append the table here ('' to skip)")
    args = p.parse_args()
    if args.dtypes is None:
        args.dtypes = ["auto", "fp32"] if args.device == "cpu" else ["fp16"]
    main(**vars(args))
