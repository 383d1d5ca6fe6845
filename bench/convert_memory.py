"""Peak memory of `convert_weights.py` on a full-size amused-512 checkpoint (random weights, hub layout).

    python bench/convert_memory.py [--workdir /tmp/amused-convert] [--dtype fp16]

Builds the checkpoint once (measure.hub_checkpoint; needs requirements-dev.txt), then runs the converter CLI in a
child process and reports its peak resident memory (ru_maxrss) next to the size of the weights, so the ratio reads
as "copies of the weights held at once".
"""
import argparse
import shutil
import sys
from pathlib import Path

from measure import ROOT, fp32_weight_bytes, hub_checkpoint, peak_rss


def main(workdir: str, dtype: str | None) -> None:
    work = Path(workdir)
    hub = hub_checkpoint("amused-512", work / "amused-512")
    weights = fp32_weight_bytes(hub)
    out = work / "amused-512.safetensors"
    cmd = [sys.executable, str(ROOT / "convert_weights.py"), str(hub), "-o", str(out)] + (["--dtype", dtype] if dtype else [])
    peak, seconds = peak_rss(cmd, work / "convert.log")
    print(f"source weights {weights / 2**30:.2f} GiB (fp32), output {out.stat().st_size / 2**30:.2f} GiB, "
          f"converter peak RSS {peak / 2**30:.2f} GiB = {peak / weights:.2f}x the source weights, {seconds:.0f} s")
    out.unlink()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/amused-convert")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    p.add_argument("--keep", action=argparse.BooleanOptionalAction, default=True, help="keep the built checkpoint")
    args = p.parse_args()
    main(args.workdir, args.dtype)
    if not args.keep:
        shutil.rmtree(args.workdir)
