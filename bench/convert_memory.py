"""Peak memory of `convert_weights.py` on a full-size amused-512 checkpoint (random weights, hub layout).

    python bench/convert_memory.py [--workdir /tmp/amused-convert] [--dtype fp16]

Builds the checkpoint with diffusers/transformers save_pretrained (needs requirements-dev.txt), then runs the
converter CLI in a child process and reports its peak resident memory (ru_maxrss) next to the size of the
weights, so the ratio reads as "copies of the weights held at once".
"""
import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(workdir: str, dtype: str | None) -> None:
    from conftest import reference_pipeline, save_hub_checkpoint, write_tiny_tokenizer, SHARED_TOKENIZER

    work = Path(workdir)
    hub = work / "amused-512"
    if not (hub / "model_index.json").exists():
        tok = SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else write_tiny_tokenizer(work / "tokenizer")
        print(f"building a random-weight amused-512 checkpoint in {hub} ...", flush=True)
        save_hub_checkpoint(reference_pipeline("amused-512", tok), hub, tok)
    weights = sum(f.stat().st_size for f in hub.rglob("*.safetensors") if ".fp16." not in f.name)
    out = work / "amused-512.safetensors"
    cmd = [sys.executable, str(ROOT / "convert_weights.py"), str(hub), "-o", str(out)] + (["--dtype", dtype] if dtype else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
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
