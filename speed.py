"""speed.py: ways to run the same pipeline faster, kept apart from the algorithm (amused.py).

Nothing here changes what is computed, only which kernels compute it and in which memory layout. Two modes:
  - exact (the API's default; sample.py --exact): on the CPU every operation runs as diffusers runs it, so float32
    tokens and images equal the reference's bit for bit. On CUDA, channels_last VQ convolutions (GPU kernels never
    match the CPU reference's bits anyway).
  - not exact (Amused(..., exact=False), sample.py's default), CPU only: float32 linear layers as oneDNN matmuls
    (OneDNNLinear). Logits then differ from the reference's in the last bits (~1e-6 of their scale), which changes
    a sampled token only where two candidates tie to that precision.

The precision is the other choice made here: dtype "auto" (auto_dtype) is the fastest one the device runs natively.
The pipeline asks this module what dtype "auto" means here (auto_dtype), whether a mode can run here (check), the
layout of the VQ's weights (vq_memory_format), the context its models run in (kernels), and for the compiled
sampling step (compile_step).
"""
import contextlib
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cli import DTYPES


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# x86 flags (Linux /proc/cpuinfo names) of bf16 matrix instructions, which make a bf16 matmul ~2x (AVX512-BF16, measured
# on an AMD EPYC: 400 against 200 GFLOP/s) to ~7x (AMX, on an Intel Xeon) as fast as float32. Without them, oneDNN
# emulates bf16 with float32 instructions plus conversions: slower than float32.
NATIVE_BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}


# The ISA features that decide which precision is fastest here: reported beside every measurement (bench.py).
ISA_FEATURES = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_vnni": "AVX512-VNNI", "avx512_bf16": "AVX512-BF16",
                "amx_bf16": "AMX"}


def cpuinfo(*keys: str) -> str:
    """The first /proc/cpuinfo line for one of `keys`, after its colon; "" where there is none (macOS, Windows)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.partition(":")[2].strip() for line in lines if line.startswith(keys)), "")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (x86 "flags", Arm "Features"); empty where unknown."""
    return set(cpuinfo("flags", "Features").split())


def cpu_description() -> str:
    """The CPU and the features that matter here, e.g. "AMD EPYC (AVX2, AVX512, AVX512-VNNI, AVX512-BF16; no AMX)"."""
    flags = cpu_flags()
    have = [name for flag, name in ISA_FEATURES.items() if flag in flags]
    amx = "" if "amx_bf16" in flags or not flags else "; no AMX"
    return f"{cpuinfo('model name') or platform.processor() or 'unknown CPU'} ({', '.join(have) or 'features unknown'}{amx})"


def auto_dtype(device: torch.device, exact: bool) -> tuple[torch.dtype, str]:
    """What dtype "auto" means on `device`, and why (the settings line says it): float32 when exact (the
    reference's precision); float16 on CUDA; on the CPU bfloat16 where bf16 matmuls are native, else float32."""
    if exact:
        return torch.float32, "exact: the reference's float32"
    if device.type == "cuda":
        return torch.float16, "CUDA: float16"
    if device.type != "cpu":
        return torch.float32, f"{device.type}: float32"
    native = [name for flag, name in NATIVE_BF16_FLAGS.items() if flag in cpu_flags()]
    if native and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16, f"the CPU has {' and '.join(native)}: native bf16 matmuls"
    return torch.float32, "the CPU has neither AMX nor AVX512-BF16: bf16 would be emulated, slower than float32"


# The float dtypes the pipeline runs in, by the names it takes: the command lines' (--dtype) and torch's own.
DTYPE_NAMES = {**DTYPES, **{str(d).removeprefix("torch."): d for d in DTYPES.values()}}


def resolve_dtype(dtype: torch.dtype | str, device: torch.device, exact: bool) -> tuple[torch.dtype, bool, str]:
    """The pipeline's dtype argument -> (the float dtype of the models, whether the U-ViT's linear layers are int8
    (quantize.py), and why, for the settings line). dtype: torch.float32, float16 or bfloat16, one of their names
    (DTYPE_NAMES: "bf16" or "bfloat16", ...), "auto" or "int8"; ValueError naming those for anything else."""
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype], False, "asked for"
    if not (dtype in ("auto", "int8") or dtype in DTYPE_NAMES.values()):
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, auto, int8, or torch.float32/float16/"
                         f"bfloat16, got {dtype!r}")
    if dtype == "int8":
        float_dtype, why = auto_dtype(device, exact)
        return float_dtype, True, f"the U-ViT's linear layers in int8, the rest in {str(float_dtype)[6:]} ({why})"
    if dtype == "auto":
        float_dtype, why = auto_dtype(device, exact)
        return float_dtype, False, why
    return dtype, False, "asked for"


def check(device: torch.device, exact: bool) -> None:
    """ValueError if the mode cannot run on this device with this PyTorch build."""
    if not exact and device.type == "cpu" and not onednn_available():
        raise ValueError("exact=False needs a PyTorch build with oneDNN (torch.backends.mkldnn.is_available()); "
                         "use exact=True on this build")


def vq_memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA, where cuDNN's convolutions are markedly faster in it. On the CPU the reference's
    layout: there oneDNN gains ~15% of the VQ decode in channels_last (~0.2 s of a 17 s bf16 amused-256 image on
    our AMD EPYC), but the copy of the weights costs ~0.1-0.3 GiB of peak memory (bench/memory.py), and the
    pixels would no longer equal diffusers'."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def kernels(device: torch.device, exact: bool):
    """The context the models run in: the reference's kernels, or oneDNN's matmuls on the CPU when not exact."""
    return OneDNNLinear() if not exact and device.type == "cpu" else contextlib.nullcontext()


class OneDNNLinear(TorchFunctionMode):
    """Inside this context, F.linear on float32 CPU tensors, outside autograd, runs as a oneDNN matmul
    (torch.ops.mkldnn._linear_pointwise, the kernel torch.compile's CPU backend emits for linear layers) instead
    of the MKL sgemm that eager PyTorch and the reference call. On the AMD EPYC we develop on, a guided amused-256
    U-ViT step takes 2.3 s with it instead of 2.9 s (README, Performance). It sums in another order, so results
    differ from the reference's in the last bits (~1e-7 relative): this is the fast mode, never the exact one.

    A context rather than a module swap: the models keep their plain nn.Linear weights (state dicts, LoRA
    merging and memory are unchanged), and anything else (autograd, other dtypes and devices) falls through.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled():
            x, weight, bias = linear_arguments(*args, **kwargs)
            if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() >= 2
                    and x.numel() > 0 and weight.is_contiguous()):
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


def linear_arguments(input, weight, bias=None):
    """F.linear's (input, weight, bias), however the caller passed them (positionally or by keyword)."""
    return input, weight, bias


def compile_step(step, device: torch.device):
    """`step` (sampling.sampling_step) compiled whole with fullgraph=True, so that a graph break or a host sync in it
    is an error rather than a silent slowdown. On CUDA in CUDA graphs (mode="reduce-overhead": one launch per
    step); the next replay of a graph overwrites its outputs, so they are cloned (B x h x w ids and a flag)."""
    if device.type != "cuda":
        return torch.compile(step, fullgraph=True)
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")

    def run(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        tokens, finite = compiled(*args, **kwargs)
        return tokens.clone(), finite.clone()

    return run
