"""bench.py: aMUSEd generation latency, ours against diffusers, side by side in one process.

    python bench.py                                   # CPU: amused-256 and amused-512, batch 1
    python bench.py --models amused-256 --repeats 5
    python bench.py --memory                          # also the peak RSS of sample.py runs (bench/memory.py)

Every pipeline gets the same random weights in the official configuration (timing does not depend on the weight
values), the same prompt, seed and settings (12 steps, guidance 10). Per model, every variant is built once and
warmed up; then the runs go in rounds, each round running every variant once in turn, so that a slow spell of the
machine hits all of them. The variants:
  - diffusers in each precision this device runs (CPU: fp32, and bf16 where oneDNN has it; CUDA: --dtypes, and fp16
    with its transformer compiled as its model card recommends);
  - ours exact (CPU: fp32, the reference's kernels: its tokens must equal diffusers' fp32 tokens), ours in the
    default fast mode (dtype "auto", exact=False: what sample.py runs) and, on the CPU, ours with the U-ViT's
    linear layers in int8 (quantize.py); on CUDA also the compiled step;
  - ours in the default fast mode with FEWER_PASSES and FEWEST_PASSES (examples/digits_samplers.py): other sampler
    settings, whose step counts and guidance are the ones the digits judge found to draw as well as the reference's
    12 steps on the digits model. Their rows measure time only: they are not a measurement of amused-256's quality,
    and their tokens are not the reference's (the table says so).
Each row gives the median latency per image with the spread (min-max), the ratio to diffusers' *best* variant on
this machine (its fastest median, named in the table), and the share of tokens equal to diffusers' fp32 tokens.
The machine (CPU model and its ISA features, threads; the GPU) heads the table, which is printed and appended to
bench/RESULTS.md. Needs requirements-dev.txt (diffusers, transformers).
"""
import argparse
import copy
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

import quantize  # noqa: E402
import speed  # noqa: E402
from amused import Amused  # noqa: E402
from cli import DTYPES, dtype_name  # noqa: E402
from convert_weights import COMPONENTS, Checkpoint, build  # noqa: E402
from digits_samplers import FOUND  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"


def reference(preset: str):
    """(diffusers' AmusedPipeline with random weights in the official configuration, fp32 on the CPU; its tokenizer
    folder)."""
    from conftest import SHARED_TOKENIZER, reference_pipeline, write_tiny_tokenizer

    tok = SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else write_tiny_tokenizer(Path("/tmp/amused-bench-tokenizer"))
    ref = reference_pipeline(preset, tok, seed=0)  # random weights, perturbed
    ref.set_progress_bar_config(disable=True)
    return ref, tok


def ours_from(ref, tok: Path, device: str, dtype, exact: bool) -> Amused:
    """Our pipeline holding the reference's weights (its fp32 tensors, shared; cast copies for other dtypes)."""
    import clip_text

    models = {}
    for name, comp in COMPONENTS.items():
        module = getattr(ref, name)
        config = dict(module.config) if name != "text_encoder" else module.config.to_dict()
        models[name] = build(comp, comp.config_from_hub(config), dict(module.state_dict()), f"diffusers {name}")
    ckpt = Checkpoint(clip_text.CLIPTokenizer.from_folder(tok), **models,
                      mask_token_id=ref.scheduler.config.mask_token_id, masking_schedule="cosine")
    return Amused(ckpt, device, dtype, exact)


def variants(ref, tok: Path, device: str, dtypes: list[str], compile: bool) -> dict:
    """label -> (run(prompts, steps, generator, output_type) -> images or tokens, owner: "diffusers", "ours", or
    "ours, another sampler" (its own steps and guidance: a setting of digits_samplers.FOUND))."""
    def theirs(pipe):
        return lambda p, n, g, out: pipe(p, num_inference_steps=n, generator=g,
                                         output_type="latent" if out == "tokens" else "pt").images

    def ours(pipe):
        return lambda p, n, g, out: pipe(p, steps=n, generator=g, output_type=out)

    def found(pipe) -> dict:  # the FOUND settings' rows
        return {f"ours, {name} ({', '.join(f'{k} {v}' for k, v in call.items())})":
                (lambda p, n, g, out, call=call: pipe(p, generator=g, output_type=out, **call), "ours, another sampler")
                for name, call in FOUND.items()}

    out = {}
    if device == "cpu":
        out["diffusers fp32"] = (theirs(ref), "diffusers")
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            out["diffusers bf16"] = (theirs(copy.deepcopy(ref).to(dtype=torch.bfloat16)), "diffusers")
        out["ours fp32 exact"] = (ours(ours_from(ref, tok, device, torch.float32, True)), "ours")
        fast = ours_from(ref, tok, device, "auto", False)
        out[f"ours auto ({dtype_name(fast.dtype)}, fast)"] = (ours(fast), "ours")
        out.update(found(fast))
        if quantize.int8_available(device):
            out["ours int8 (U-ViT linears; the rest auto)"] = (ours(ours_from(ref, tok, device, "int8", False)), "ours")
        return out
    fp32 = copy.deepcopy(ref).to(device)
    out["diffusers fp32"] = (theirs(fp32), "diffusers")
    for name in dtypes:
        out[f"diffusers {name}"] = (theirs(copy.deepcopy(fp32).to(dtype=DTYPES[name])), "diffusers")
        out[f"ours {name}"] = (ours(ours_from(ref, tok, device, DTYPES[name], False)), "ours")
    out.update(found(ours_from(ref, tok, device, torch.float16, False)))
    if compile:
        compiled = copy.deepcopy(fp32).to(dtype=torch.float16)
        compiled.transformer = torch.compile(compiled.transformer)
        out["diffusers fp16 compiled"] = (theirs(compiled), "diffusers")
        pipe = ours_from(ref, tok, device, torch.float16, False)
        pipe.compile()
        out["ours fp16 compiled step"] = (ours(pipe), "ours")
    return out


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_model(preset, batch, device, dtypes, compile, steps, repeats, warmup) -> list[str]:
    """The table rows of one model at one batch size."""
    ref, tok = reference(preset)
    runs = variants(ref, tok, device, dtypes, compile)
    prompts = [PROMPT] * batch
    gen = lambda: torch.Generator("cpu" if device == "cpu" else device).manual_seed(0)  # noqa: E731
    tokens = {label: run(prompts, steps, gen(), "tokens").cpu() for label, (run, _) in runs.items()}
    for _ in range(warmup):
        for run, _ in runs.values():
            run(prompts, steps, gen(), "pt")
    times = {label: [] for label in runs}
    for _ in range(repeats):  # rounds: every variant once per round
        for label, (run, _) in runs.items():
            times[label].append(timed(lambda: run(prompts, steps, gen(), "pt"), device) / batch)
    median = {label: statistics.median(t) for label, t in times.items()}
    best = min((label for label, (_, owner) in runs.items() if owner == "diffusers"), key=median.get)
    rows = []
    for label, t in times.items():
        same = (f"{(tokens[label] == tokens['diffusers fp32']).float().mean().item():.1%}"
                if runs[label][1] != "ours, another sampler" else "another sampler: not comparable")
        rows.append(f"| {preset} b{batch} {device} | {label} | {median[label] * 1e3:,.0f} ({min(t) * 1e3:,.0f}-"
                    f"{max(t) * 1e3:,.0f}) | **{median[label] / median[best]:.2f}x** {best.removeprefix('diffusers ')} "
                    f"| {same} |")
        print(rows[-1], flush=True)
    return rows


def memory_table() -> str:
    """bench/memory.py's table (peak RSS of sample.py and of diffusers' pipeline, load to PNG), run as a child."""
    print("measuring peak memory (bench/memory.py) ...", flush=True)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py")], capture_output=True, text=True,
                         check=True).stdout
    return "Peak memory, amused-256, 2 steps, load to PNG. Machine: " + out[out.index("\n\n"):].strip() + "\n\n"


def machine(device: str) -> str:
    desc = f"{speed.cpu_description()}, {torch.get_num_threads()} threads"
    if device == "cuda":
        desc = f"{torch.cuda.get_device_name()} (host: {desc})"
    return f"{desc}; torch {torch.__version__}, python {platform.python_version()}"


def main(models, batch_sizes, devices, dtypes, compile, steps, repeats, warmup, memory, results):
    text = (f"\n### {time.strftime('%Y-%m-%d')}: {steps} steps, guidance 10, {repeats} rounds after {warmup} "
            f"warm-up\n\n")
    header = ("| model | run | ms/image, median (min-max) | against diffusers' best | tokens equal to diffusers "
              "fp32 |\n|---|---|---|---|---|")
    if memory:  # first, while this process is small: a child's peak RSS reading starts from its parent's
        text += memory_table()
    for device in devices:
        rows = []
        for preset in models:
            for batch in batch_sizes:
                print(f"running {preset} batch {batch} on {device} ...", flush=True)
                rows += bench_model(preset, batch, device, dtypes, compile, steps, repeats, warmup)
        text += f"Machine: {machine(device)}\n\n{header}\n" + "\n".join(rows) + "\n\n"
    report(text, results)



def report(text: str, results: str) -> None:
    """Print a results table and append it to the file `results` ('' or None: do not)."""
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
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES), help="on CUDA")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also compiled, on CUDA")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="rounds of timed runs")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure peak RSS of sample.py runs, ours and diffusers' (bench/memory.py; minutes)")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="append the table here ('' to skip)")
    args = p.parse_args()
    if args.devices is None:
        args.devices = ["cuda"] if torch.cuda.is_available() else ["cpu"]
    if args.batch_sizes is None:
        args.batch_sizes = [1, 8] if "cuda" in args.devices else [1]
    warnings.simplefilter("ignore")  # diffusers' deprecation notices
    main(**vars(args))
