"""Peak memory of one generation on the CPU, load to PNG, on a full-size amused-256 checkpoint (random weights).

    python bench/memory.py [--workdir /tmp/amused-memory] [--prompt "a photo of a cat"] [--exact]

Builds once, in the work folder, the hub checkpoint (measure.hub_checkpoint; needs requirements-dev.txt) and its
bf16 and int8 conversions (convert_weights.py --dtype bf16 / int8). Then runs
`sample.py PROMPT --device cpu --dtype DTYPE --steps 2` (256x256, guidance 10) from each, and diffusers' pipeline
in bf16, every run in a fresh child process, and prints its peak resident memory (ru_maxrss) beside the size of
the weights in the dtype it runs in. --exact/--no-exact is passed on to sample.py.
"""
import argparse
import sys
from pathlib import Path

from measure import ROOT, fp32_weight_bytes, hub_checkpoint, peak_rss


def converted(hub: Path, work: Path, dtype: str) -> Path:
    """The hub checkpoint converted to one file (convert_weights.py --dtype DTYPE), made on first use."""
    out = work / f"{hub.name}-{dtype}.safetensors"
    if not out.exists():
        peak, seconds = peak_rss([sys.executable, str(ROOT / "convert_weights.py"), str(hub), "-o", str(out),
                                  "--dtype", dtype], work / "convert.log")
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
    bf16_file, int8_file = converted(hub, work, "bf16"), converted(hub, work, "int8")
    png = str(work / "x.png")
    sample = [sys.executable, str(ROOT / "sample.py"), prompt, "--device", "cpu", "--steps", "2", "--out", png,
              "--exact" if exact else "--no-exact"]
    params = fp32_weight_bytes(hub) // 4
    int8_bytes = int8_file.stat().st_size  # the U-ViT's linears in int8 + scales, the rest bf16: about the weights
    runs = [  # (what, dtype, bytes of the weights in that dtype, command)
        ("hub folder (fp32 files)", "bf16", 2 * params, sample + ["--checkpoint", str(hub), "--dtype", "bf16"]),
        ("converted bf16 file", "bf16", 2 * params, sample + ["--checkpoint", str(bf16_file), "--dtype", "bf16"]),
        ("hub folder (fp32 files)", "fp32", 4 * params, sample + ["--checkpoint", str(hub), "--dtype", "fp32"]),
        ("hub folder (fp32 files), quantised on load", "int8", int8_bytes,
         sample + ["--checkpoint", str(hub), "--dtype", "int8"]),
        ("converted int8 file", "int8", int8_bytes, sample + ["--checkpoint", str(int8_file), "--dtype", "int8"]),
        ("hub folder (fp32 files), diffusers", "bf16", 2 * params,
         [sys.executable, "-c", DIFFUSERS, str(hub), prompt, png]),
    ]
    rows = []
    for i, (what, dtype, weights, cmd) in enumerate(runs):
        peak, seconds = peak_rss(cmd, work / f"run{i}.log")
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
