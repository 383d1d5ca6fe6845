"""device_check.py: the checks that need a GPU, as one short script for a lent CUDA machine.

    python bench/device_check.py                      # amused-256 and amused-512, random weights, on CUDA
    python bench/device_check.py --tiny --device cpu  # a smoke run of this script itself (seconds, on the CPU)

For each model (random weights in the official configuration; needs no diffusers, no weights download):
  - fp32, fp16 and bf16 text-to-image (12 steps, guidance 10, CPU generator seed 0): NaN-free images, the share of
    tokens equal to the fp32 run, and the U-ViT logits' largest difference from fp32 relative to their scale;
  - fp16 with the whole sampling step compiled (Amused.compile: fullgraph, CUDA graphs) against fp16 eager;
  - the median latency of 3 runs of each;
  - that the sampling loop makes no host synchronisation per step (torch.cuda.set_sync_debug_mode: a 4-step and a
    12-step run, with a CUDA generator, must make the same number of syncs), with the reference sampler and with
    the Halton sampler under an interval guidance schedule (sampling.py).
Prints a markdown table (append it to bench/RESULTS.md) and exits 1 if an image has a NaN, compiled != eager, or
a step syncs.
Random weights give flat token distributions, so token agreement across dtypes is a weak signal here; the logit
difference is the one to read.
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import clip_text  # noqa: E402
import uvit  # noqa: E402
import vqgan  # noqa: E402
from amused import Amused  # noqa: E402
from cli import DTYPES  # noqa: E402
from convert_weights import Checkpoint  # noqa: E402



def random_checkpoint(preset: str, tiny: bool) -> Checkpoint:
    """Our three models with seeded random weights (norm weights jittered away from 1), and a tokenizer."""
    from conftest import SHARED_TOKENIZER, TINY_CLIP, TINY_UVIT, TINY_VQ, perturb_, write_tiny_tokenizer

    torch.manual_seed(0)
    if tiny:
        te = clip_text.config_from_hub({**TINY_CLIP, "hidden_act": "quick_gelu"})
        vq = vqgan.config_from_hub({**TINY_VQ, "norm_type": "group", "vq_embed_dim": None})
        tr = uvit.config_from_hub(TINY_UVIT)
    else:
        te, vq, tr = clip_text.PRESETS["clip-vit-large-patch14"], vqgan.PRESETS["amused"], uvit.PRESETS[preset]
    tok = SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else write_tiny_tokenizer(Path("/tmp/amused-device-tokenizer"))
    models = [perturb_(m.eval(), seed=0) for m in (clip_text.CLIPTextEncoder(te), vqgan.VQModel(vq), uvit.UViT(tr))]
    return Checkpoint(clip_text.CLIPTokenizer.from_folder(tok), *models, mask_token_id=tr.vocab_size - 1,
                      masking_schedule="cosine")


def run(pipe: Amused, device: str, batch: int):
    """(tokens, images, median seconds of 3 timed runs after the first)."""
    def once():
        return pipe(["a photo of a cat"] * batch, steps=12, generator=torch.Generator().manual_seed(0), output_type="pt")

    tokens = pipe(["a photo of a cat"] * batch, steps=12, generator=torch.Generator().manual_seed(0), output_type="tokens")
    images = once()
    times = []
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return tokens.cpu(), images.float().cpu(), statistics.median(times)


def host_syncs(pipe: Amused, steps: int, halton: bool) -> int:
    """How many times one text-to-image run (tokens out, CUDA generator) makes the host wait for the GPU, with the
    reference sampler or the Halton sampler guided on the later steps only."""
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pipe(["a photo of a cat"], steps=steps, generator=generator, output_type="tokens",
                 sampler="halton" if halton else "confidence", guidance_schedule="interval" if halton else "constant")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@torch.no_grad()
def logits_diff(pipe: Amused, ref: Amused) -> float:
    """max |logits - fp32 logits| / max |fp32 logits| for one half-masked grid."""
    g = torch.Generator().manual_seed(1)
    s = ref.transformer.cfg.sample_size
    ids = torch.randint(0, ref.transformer.cfg.codebook_size, (1, s, s), generator=g)
    ids[:, : s // 2] = ref.mask_id
    out = []
    for p in (pipe, ref):
        hidden, pooled = p.encode_prompt(["a photo of a cat"])
        micro = torch.tensor([[p.resolution, p.resolution, 0, 0, 6.0]], device=p.device)
        out.append(p.transformer(ids.to(p.device), p.transformer.encode_conditions(hidden, pooled, micro)).float().cpu())
    return ((out[0] - out[1]).abs().max() / out[1].abs().max()).item()


def main(models, device, batch, tiny, compile):
    rows, failed = [], False
    for preset in models:
        results = {}
        fp32 = None
        for name, dtype in DTYPES.items():
            pipe = Amused(random_checkpoint(preset, tiny), device, dtype)
            fp32 = fp32 or pipe
            tokens, images, seconds = run(pipe, device, batch)
            results[name] = (tokens, images, seconds, logits_diff(pipe, fp32))
            if name != "fp32":
                del pipe
        ref_tokens = results["fp32"][0]
        for halton in (False, True) if device == "cuda" else ():
            syncs = {n: host_syncs(fp32, n, halton) for n in (4, 12)}
            failed |= syncs[4] != syncs[12]
            rows.append(f"| {preset} | fp32{', halton, interval' if halton else ''} | host syncs per run: "
                        f"{syncs[4]} at 4 steps, {syncs[12]} at 12 steps "
                        f"({'none per step' if syncs[4] == syncs[12] else 'SYNCS PER STEP!'}) | | | |")
        for name, (tokens, images, seconds, diff) in results.items():
            nan = bool(torch.isnan(images).any())
            failed |= nan
            rows.append(f"| {preset} | {name} | {seconds * 1e3:,.0f} | {'NaN!' if nan else 'ok'} | "
                        f"{(tokens == ref_tokens).float().mean():.3f} | {diff:.2e} |")
        if compile:
            pipe = Amused(random_checkpoint(preset, tiny), device, torch.float16)
            eager = run(pipe, device, batch)
            pipe.compile()
            t0 = time.perf_counter()
            compiled = run(pipe, device, batch)
            same = (compiled[0] == eager[0]).float().mean().item()
            failed |= same < 1.0 or bool(torch.isnan(compiled[1]).any())
            rows.append(f"| {preset} | fp16 compiled step | {compiled[2] * 1e3:,.0f} (first call incl. compile: "
                        f"{time.perf_counter() - t0:.0f} s in all) | {'NaN!' if torch.isnan(compiled[1]).any() else 'ok'} "
                        f"| {same:.3f} vs fp16 eager | |")
            del pipe
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, batch {batch}, 12 steps, guidance 10, random weights\n")
    print("| model | dtype | ms per run (median of 3) | images | tokens equal to fp32 | logits max diff / scale |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["amused-256", "amused-512"], choices=["amused-256", "amused-512"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="tiny configs: a smoke test of this script")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    main(**vars(p.parse_args()))
