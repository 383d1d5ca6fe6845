"""bench.py: aMUSEd generation latency, ours against diffusers, side by side in one process.

    python bench.py                                   # CPU fp32 (and CUDA fp16/bf16 when a GPU is present)
    python bench.py --models amused-256 --batch-sizes 1 --repeats 5

Both pipelines get the same random weights in the official configurations (timing does not depend on the weight
values), the same prompt, seed and settings (12 steps, guidance 10). After a warm-up run of each, the runs
alternate (diffusers, ours, diffusers, ours, ...), so a slow spell of the machine hits both. We report the median
latency per image and the spread (min-max), the peak CUDA memory, whether the tokens were identical, and the
ratio ours / diffusers. On the CPU ours runs twice, each against its own diffusers runs: exact (the default,
bit-identical to diffusers) and exact=False (oneDNN matmuls); on CUDA eager and compiled. The table is printed
and appended to bench/RESULTS.md with the machine named.
Needs requirements-dev.txt (diffusers, transformers).
"""
import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))

from amused import Amused  # noqa: E402
from cli import DTYPES  # noqa: E402
from convert_weights import COMPONENTS, Checkpoint, build  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"


def build_pipelines(preset: str, device: str, dtype: torch.dtype, exact: bool = True):
    """(diffusers AmusedPipeline, our Amused) holding the same random weights, official configuration."""
    from conftest import SHARED_TOKENIZER, reference_pipeline, write_tiny_tokenizer
    import clip_text

    tok = SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else write_tiny_tokenizer(Path("/tmp/amused-bench-tokenizer"))
    ref = reference_pipeline(preset, tok, seed=0)  # random weights, perturbed; fp32 on the CPU
    models = {}
    for name, comp in COMPONENTS.items():
        module = getattr(ref, name)
        config = dict(module.config) if name != "text_encoder" else module.config.to_dict()
        models[name] = build(comp, comp.config_from_hub(config), dict(module.state_dict()), f"diffusers {name}")
    ckpt = Checkpoint(clip_text.CLIPTokenizer.from_folder(tok), **models, mask_token_id=ref.scheduler.config.mask_token_id,
                      masking_schedule="cosine")
    ours = Amused(ckpt, device, dtype, exact)
    ref.to(device, dtype)
    ref.set_progress_bar_config(disable=True)
    return ref, ours


def timed(fn, device: str) -> tuple[float, int]:
    """Seconds and peak CUDA memory (bytes; 0 on the CPU) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() if device == "cuda" else 0


def bench_one(preset, batch, device, dtype_name, compile, exact, steps, repeats, warmup):
    dtype = DTYPES[dtype_name]
    ref, ours = build_pipelines(preset, device, dtype, exact)
    if compile:
        # diffusers as its model card recommends (compile the transformer); ours compiles the U-ViT's forward
        # with CUDA graphs, which the fixed shapes of our loop allow
        ref.transformer = torch.compile(ref.transformer)
        ours.transformer.compile(mode="reduce-overhead")
    gen_device = "cpu" if device == "cpu" else device  # a generator on the device: no copy of probabilities

    def gen():
        return torch.Generator(gen_device).manual_seed(0)

    prompts = [PROMPT] * batch
    run_ref = lambda: ref(prompts, num_inference_steps=steps, generator=gen(), output_type="pt").images  # noqa: E731
    run_ours = lambda: ours(prompts, steps=steps, generator=gen(), output_type="pt")  # noqa: E731
    same = torch.equal(ref(prompts, num_inference_steps=steps, generator=gen(), output_type="latent").images.cpu(),
                       ours(prompts, steps=steps, generator=gen(), output_type="tokens").cpu())
    for _ in range(warmup):
        run_ref(), run_ours()
    times = {"diffusers": [], "ours": []}
    peaks = {"diffusers": 0, "ours": 0}
    for _ in range(repeats):
        for name, fn in (("diffusers", run_ref), ("ours", run_ours)):
            seconds, peak = timed(fn, device)
            times[name].append(seconds / batch)
            peaks[name] = max(peaks[name], peak)
    return times, peaks, same


def machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    desc = f"{cpu}, {torch.get_num_threads()} threads"
    if device == "cuda":
        desc = f"{torch.cuda.get_device_name()} (host: {desc})"
    return f"{desc}; torch {torch.__version__}, python {platform.python_version()}"


def main(models, batch_sizes, devices, dtypes, compile, steps, repeats, warmup, results):
    rows = []
    for device in devices:
        for dtype_name in (["fp32"] if device == "cpu" else dtypes):
            for preset in models:
                for batch in batch_sizes:
                    # (label suffix, compile, exact): on CUDA eager and compiled; on the CPU the exact mode and
                    # exact=False (oneDNN matmuls), which changes nothing on CUDA
                    variants = ([("", False, True)] + ([(" compiled", True, True)] if compile else [])
                                if device == "cuda" else [("", False, True), (" exact=False", False, False)])
                    for suffix, comp, exact in variants:
                        label = f"{preset} b{batch} {device} {dtype_name}{suffix}"
                        print(f"running {label} ...", flush=True)
                        times, peaks, same = bench_one(preset, batch, device, dtype_name, comp, exact, steps, repeats,
                                                       warmup)
                        med = {k: statistics.median(v) for k, v in times.items()}
                        row = (f"| {label} | {med['diffusers'] * 1e3:,.0f} ({min(times['diffusers']) * 1e3:,.0f}-"
                               f"{max(times['diffusers']) * 1e3:,.0f}) | {med['ours'] * 1e3:,.0f} "
                               f"({min(times['ours']) * 1e3:,.0f}-{max(times['ours']) * 1e3:,.0f}) | "
                               f"**{med['ours'] / med['diffusers']:.2f}x** | "
                               + (f"{peaks['diffusers'] / 2**30:.2f} / {peaks['ours'] / 2**30:.2f} GiB" if device == "cuda" else "n/a")
                               + f" | {'yes' if same else 'no'} |")
                        print(row, flush=True)
                        rows.append((device, row))
    header = ("| run | diffusers ms/image, median (min-max) | ours ms/image | ours / diffusers | peak CUDA memory "
              "(diffusers / ours) | same tokens |\n|---|---|---|---|---|---|")
    text = f"\n### {time.strftime('%Y-%m-%d')}: {steps} steps, guidance 10, {repeats} alternating runs after {warmup} warm-up\n\n"
    for device in dict.fromkeys(d for d, _ in rows):
        text += f"Machine: {machine(device)}\n\n{header}\n" + "\n".join(r for d, r in rows if d == device) + "\n\n"
    print(text)
    if results:
        with open(results, "a") as f:
            f.write(text)
        print(f"appended to {results}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["amused-256", "amused-512"], choices=["amused-256", "amused-512"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="default: 1 and 8 on CUDA, 1 on the CPU (batch 8 takes minutes per run there)")
    p.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when present, else cpu")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES), help="on CUDA (CPU: fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also compiled, on CUDA")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="append the table here ('' to skip)")
    args = p.parse_args()
    if args.devices is None:
        args.devices = ["cuda"] if torch.cuda.is_available() else ["cpu"]
    if args.batch_sizes is None:
        args.batch_sizes = [1, 8] if "cuda" in args.devices else [1]
    warnings.simplefilter("ignore")  # diffusers' deprecation notices
    main(**vars(args))
