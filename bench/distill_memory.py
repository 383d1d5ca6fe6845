"""Memory of distill.py at full size: amused-256 (random weights) distilled for a few steps on the CPU.

    python bench/distill_memory.py [--workdir /tmp/amused-memory] [--modes lora full] [--steps 2]

Runs `distill.py --teacher HUB --prompt ... --batch-size 1 --max-steps STEPS --device cpu` in a fresh child process
per mode (LoRA adapters on the shared teacher; full copies) and prints its peak resident memory (ru_maxrss) and
seconds per step beside what the weights and optimizer state alone take (distill.py's docstring: full 9P floats,
LoRA P + the adapters'), and what they would take on a GPU with the U-ViTs in bf16 autocast (fp32 master weights
and Adam state stay fp32: the same bytes; activations halve). The full mode needs ~22 GB for its weights and Adam
state alone: it does not fit a 24 GB machine and is skipped there unless asked for.
"""
import argparse
import json
import re
import sys
from pathlib import Path

from measure import ROOT, fp32_weight_bytes, hub_checkpoint, peak_rss


def state_bytes(uvit_params: int, mode: str, adapter_params: int) -> int:
    """Weights, gradients and Adam moments of the three U-ViTs, fp32: distill.py's docstring's count."""
    if mode == "full":
        return 4 * 9 * uvit_params  # teacher P; student and auxiliary: P weights + P gradients + 2P Adam each
    return 4 * (uvit_params + 2 * 4 * adapter_params)  # the shared teacher; two adapter sets, each 4x


def run(hub: Path, work: Path, mode: str, steps: int) -> dict:
    out = work / f"distill-{mode}"
    cmd = [sys.executable, str(ROOT / "distill.py"), "--teacher", str(hub), "--prompt", "a photo of a cat",
           "--out", str(out), "--batch-size", "1", "--max-steps", str(steps), "--log-every", "1", "--save-every", "0",
           "--device", "cpu", "--warmup-steps", "1"] + (["--lora"] if mode == "lora" else [])
    for old in out.glob("*"):
        old.unlink()
    log = work / f"distill-{mode}.log"
    peak, seconds = peak_rss(cmd, log)
    text = log.read_text()
    per_step = [float(x) for x in re.findall(r"([\d.]+) s/step", text)]
    trainable = int(re.search(r"trainable\s+([\d,]+) parameters", text).group(1).replace(",", ""))
    return dict(mode=mode, peak_gib=peak / 2**30, seconds=seconds, s_per_step=per_step[-1] if per_step else None,
                trainable=trainable)


def main(workdir: str, modes: list[str], steps: int) -> None:
    work = Path(workdir)
    hub = hub_checkpoint("amused-256", work / "amused-256")
    uvit = fp32_weight_bytes(hub / "transformer") // 4
    rows = []
    for mode in modes:
        r = run(hub, work, mode, steps)
        r["state_gib"] = state_bytes(uvit, mode, r["trainable"] if mode == "lora" else 0) / 2**30
        rows.append(r)
        print(json.dumps(r), flush=True)
    sys.path.insert(0, str(ROOT))
    import speed  # after the runs: importing torch would raise the children's ru_maxrss floor
    print(f"\namused-256 U-ViT: {uvit / 1e6:.0f} M parameters; {speed.cpu_description()}; batch 1, fp32, {steps} "
          f"steps\n\n| mode | trainable per model | weights + Adam state (computed) | peak RSS, CPU (measured) "
          f"| s/step |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable'] / 1e6:.1f} M | {r['state_gib']:.1f} GiB | {r['peak_gib']:.1f} GiB | "
              f"{r['s_per_step']} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/amused-memory", help="where the random-weight checkpoint is built")
    p.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora"])
    p.add_argument("--steps", type=int, default=2, help="distillation steps per run")
    main(**vars(p.parse_args()))
