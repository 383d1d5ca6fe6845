"""examples/digits_precision.py: the digits judge (examples/digits.py) read in each precision of one trained model.

    python examples/digits.py --out runs/digits                       # train once (~9 min)
    python examples/digits_precision.py runs/digits/model.safetensors  # fp32 (exact), bf16, int8: accuracy each

int8 is the U-ViT's linear layers in int8 (quantize.py), the rest in the CPU's "auto" float dtype.

The judge is digits.py's, fitted on the real training split with the same seed, before anything here runs: an
SVC that never saw a generated digit. For each precision the same prompts and seed draw the same number of images
(12 steps, guidance 4 and 10, the full recipe's 50 per class); we report the judge's accuracy, its difference from
fp32 (the issue's bar: within 2 points), and the share of tokens equal to the fp32 run's. A precision this machine
cannot run (bf16 without oneDNN bf16, int8 without its kernel) is reported as such, not skipped silently.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402
import digits  # noqa: E402
import quantize  # noqa: E402
import speed  # noqa: E402
from amused import Amused  # noqa: E402

GUIDANCES = (4.0, 10.0)
# name -> (dtype, exact) as Amused takes them
PRECISIONS = {"fp32": (torch.float32, True), "bf16": (torch.bfloat16, False), "int8": ("int8", False)}


def draw(pipe: Amused, per_class: int, guidance: float, seed: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(8x8 pixels, prompted labels, tokens) of per_class images of each digit."""
    generator = torch.Generator().manual_seed(seed)
    tokens = pipe(digits.CAPTIONS, steps=12, guidance_scale=guidance, num_images_per_prompt=per_class,
                  generator=generator, output_type="tokens")
    pixels = digits.to_pixels8(pipe.vqvae.decode_ids(tokens))
    return pixels, np.tile(np.arange(10), per_class), tokens


def main(checkpoint: str, precisions: list[str], per_class: int = 50, seed: int = 0) -> dict:
    if not Path(checkpoint).is_file():
        raise cli.UsageError(f"{checkpoint}: no such file; train one with examples/digits.py --out DIR first")
    x_train, y_train, x_test, y_test = digits.load_digits(seed)
    judge = digits.fit_judge(x_train, y_train)  # fixed before any precision is looked at
    ceiling = float((judge.predict(x_test) == y_test).mean())
    print(f"{speed.cpu_description()}, {torch.get_num_threads()} threads; judge on real held-out digits {ceiling:.3f}")
    results, fp32 = {}, {}
    for name in precisions:
        dtype, exact = PRECISIONS[name]
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            results[name] = "not available: this PyTorch build has no oneDNN bf16"
            continue
        if dtype == "int8" and not quantize.int8_available("cpu"):
            results[name] = "not available: this PyTorch build does not run torch._int_mm on the CPU"
            continue
        pipe = Amused.from_pretrained(checkpoint, dtype=dtype, exact=exact)
        results[name] = {}
        for guidance in GUIDANCES:
            t0 = time.perf_counter()
            pixels, labels, tokens = draw(pipe, per_class, guidance, seed)
            fp32.setdefault(guidance, tokens)
            accuracy = float((judge.predict(pixels) == labels).mean())
            same = float((tokens == fp32[guidance]).float().mean())
            results[name][guidance] = dict(accuracy=accuracy, tokens_equal_to_fp32=same)
            print(f"  {name} guidance {guidance:g}: accuracy {accuracy:.3f}, tokens equal to fp32 {same:.3f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    print(table(results, precisions[0], per_class, ceiling))
    return results


def table(results: dict, base: str, per_class: int, ceiling: float) -> str:
    lines = ["| precision | " + " | ".join(f"accuracy, guidance {g:g} (vs {base})" for g in GUIDANCES)
             + " | tokens equal to fp32 |", "|---|" + "---|" * (len(GUIDANCES) + 1)]
    for name, r in results.items():
        if isinstance(r, str):
            lines.append(f"| {name} | {r} |" + " |" * len(GUIDANCES))
            continue
        cells = [f"{r[g]['accuracy']:.3f} ({100 * (r[g]['accuracy'] - results[base][g]['accuracy']):+.1f} points)"
                 for g in GUIDANCES]
        same = np.mean([r[g]["tokens_equal_to_fp32"] for g in GUIDANCES])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {same:.1%} |")
    return ("\n".join(lines) + f"\n\n{10 * per_class} images per cell, 12 steps; the judge reads {ceiling:.3f} of the "
            "real held-out digits.\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoint", help="model.safetensors written by examples/digits.py")
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS),
                   help="the first is the baseline of the differences")
    p.add_argument("--per-class", type=int, default=50, help="images per digit and guidance")
    p.add_argument("--seed", type=int, default=0, help="the data split (as digits.py's run) and the sampling seed")
    args = p.parse_args()
    cli.run(main, args, errors=(cli.UsageError,))
