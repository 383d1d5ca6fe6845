"""Peak memory of one generation on the CPU, load to PNG, on a full-size amused-256 checkpoint (random weights).

    python bench/memory.py [--workdir /tmp/amused-memory] [--prompt "a photo of a cat"] [--exact]

Builds once, in the work folder, the hub checkpoint (measure.hub_checkpoint; needs requirements-dev.txt) and its
bf16 conversion (convert_weights.py --dtype bf16). Then runs `sample.py PROMPT --device cpu --dtype DTYPE --steps 2`
(256x256, guidance 10) from each, every run in a fresh child process, and prints its peak resident memory
(ru_maxrss) beside the size of the weights in the dtype it runs in. --exact/--no-exact is passed on to sample.py:
not exact, the VQ's weights are copied to channels_last.
"""
import argparse
import sys
from pathlib import Path

from measure import ROOT, fp32_weight_bytes, hub_checkpoint, peak_rss

BYTES = {"fp32": 4, "bf16": 2}


def converted_bf16(hub: Path, work: Path) -> Path:
    """The hub checkpoint converted to one bf16 file, made on first use."""
    out = work / f"{hub.name}-bf16.safetensors"
    if not out.exists():
        peak, seconds = peak_rss([sys.executable, str(ROOT / "convert_weights.py"), str(hub), "-o", str(out),
                                  "--dtype", "bf16"], work / "convert.log")
        print(f"converted {hub} to {out} in {seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB", flush=True)
    return out


def machine_description() -> str:
    """The CPU and its ISA features, and torch's version. Called after the runs: it imports torch (speed.py), which
    would raise the floor of every later child's ru_maxrss."""
    sys.path.insert(0, str(ROOT))
    import speed
    import torch

    return f"{speed.cpu_description()}, torch {torch.__version__}"


# diffusers' pipeline on the same hub folder, in bf16, 2 steps, one image written: the reference's peak
DIFFUSERS = """
import sys, torch, warnings
warnings.simplefilter("ignore")
from diffusers import AmusedPipeline
pipe = AmusedPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)
pipe(sys.argv[2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0].save(sys.argv[3])
"""


def main(workdir: str, prompt: str, exact: bool) -> None:
    work = Path(workdir)
    hub = hub_checkpoint("amused-256", work / "amused-256")
    file = converted_bf16(hub, work)
    png = str(work / "x.png")
    sample = [sys.executable, str(ROOT / "sample.py"), prompt, "--device", "cpu", "--steps", "2", "--out", png,
              "--exact" if exact else "--no-exact"]
    runs = [  # (what, dtype, command)
        ("hub folder (fp32 files)", "bf16", sample + ["--checkpoint", str(hub), "--dtype", "bf16"]),
        ("converted bf16 file", "bf16", sample + ["--checkpoint", str(file), "--dtype", "bf16"]),
        ("hub folder (fp32 files)", "fp32", sample + ["--checkpoint", str(hub), "--dtype", "fp32"]),
        ("hub folder (fp32 files), diffusers", "bf16", [sys.executable, "-c", DIFFUSERS, str(hub), prompt, png]),
    ]
    params = fp32_weight_bytes(hub) // BYTES["fp32"]
    rows = []
    for i, (what, dtype, cmd) in enumerate(runs):
        peak, seconds = peak_rss(cmd, work / f"run{i}.log")
        weights = params * BYTES[dtype]
        rows.append(f"| {what} | {dtype} | {weights / 2**30:.2f} GiB | {peak / 2**30:.2f} GiB | "
                    f"{peak / weights:.2f}x | {seconds:.0f} s |")
        print(rows[-1], flush=True)
    print(f"\n{machine_description()}; {'exact' if exact else 'not exact (--no-exact)'}\n")
    print("| sample.py from | dtype | weights | peak RSS | peak / weights | seconds |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/amused-memory")
    p.add_argument("--prompt", default="a photo of a cat")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=False,
                   help="run sample.py with --exact (default: --no-exact, sample.py's default)")
    args = p.parse_args()
    main(args.workdir, args.prompt, args.exact)
