"""speed.py: ways to run the same pipeline faster, kept apart from the algorithm (amused.py).

Nothing here changes what is computed, only which kernels compute it and in which memory layout. Two modes:
  - exact (the default): on the CPU every operation runs as diffusers runs it, so float32 tokens and images equal
    the reference's bit for bit. On CUDA, channels_last VQ convolutions (GPU kernels never match the CPU
    reference's bits anyway).
  - not exact (Amused(..., exact=False), sample.py --no-exact), CPU only: float32 linear layers as oneDNN matmuls
    (OneDNNLinear) and the VQ decoder in channels_last. Logits then differ from the reference's in the last bits
    (~1e-6 of their scale), which changes a sampled token only where two candidates tie to that precision.

The pipeline asks this module three things: whether a mode can run here (check), the layout of the VQ's weights
(vq_memory_format), and the context its models run in (kernels).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def check(device: torch.device, exact: bool) -> None:
    """ValueError if the mode cannot run on this device with this PyTorch build."""
    if not exact and device.type == "cpu" and not onednn_available():
        raise ValueError("exact=False needs a PyTorch build with oneDNN (torch.backends.mkldnn.is_available()); "
                         "use exact=True on this build")


def vq_memory_format(device: torch.device, exact: bool) -> torch.memory_format:
    """channels_last convolutions are markedly faster (cuDNN; oneDNN ~15% on the CPU), but on the CPU they sum in
    another order than the reference's layout, in which the decoded pixels equal diffusers' exactly."""
    fast = device.type == "cuda" or not exact
    return torch.channels_last if fast else torch.contiguous_format


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
