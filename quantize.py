"""quantize.py: int8 weights and activations (W8A8) for the U-ViT's linear layers, kept apart from the model.

A linear layer y = x W^T (no bias: the U-ViT's have none) becomes
    y ~= sx * sw * (qx @ qw^T),    qx = round(x / sx),  qw = round(W / sw),  both int8 in [-127, 127],
with sw (out,) one scale per output channel, computed once from the weights, and sx one scale per token (row of
x), computed at run time from the activations; both symmetric, scale = absmax / 127. torch._int_mm multiplies
the int8 matrices with int32 accumulation, which is exact, so the only errors are the roundings of x and W to
their grids, and then the float32 rescale. Per output element (tests/test_quantize.py checks it):
    |y^ - y| <= sum_k (sx/2 |W_k| + sw/2 |x_k| + sx sw/4)  (+ 2^-15 of that, + 2^-22 |y^|: float32 roundings)

    import quantize
    quantize.quantize_(pipe.transformer)       # in place; KEEP_FLOAT says which linears stay float, and why

Everything else (convolutions, norms, attention's softmax and products, the sampler) stays in the model's float
dtype. Measured on the amused-256 stand-in (random perturbed weights in the official config), AMD EPYC with
AVX512-VNNI and AVX512-BF16, 2 threads, one guided U-ViT forward (batch 2): fp32 2.9 s (oneDNN 2.3 s), bf16 1.4 s,
int8 1.1 s; weights 2.4 GB fp32, 1.2 GB bf16, 0.69 GB int8. Logits against fp32 (relative L2): int8 1.5%, bf16
1.6%; tokens of whole 12-step generations equal to fp32's: int8 84%, bf16 79%. Random weights give flat logits
(entropy 8.85 of at most 9.01 nats), so top-1 choices are fragile there; on the trained digits model
(examples/digits.py) the judge reads int8's digits as well as fp32's (within the noise of 500 images).

Smoothing (SmoothQuant, opt-in): calibrate() records each linear's input maxima per channel over a few prompts'
generations, and quantize_(model, act_absmax=...) divides each channel of x by s = max|x|^alpha / max|W|^(1-alpha)
and multiplies W's by it (an identity in exact arithmetic) before quantising, moving channel outliers, which
per-token scales cannot follow, into the weights. On the stand-in it cuts the logit error from 1.5% to 1.25% and
raises token agreement to 90%, for ~3% of the time and a calibration run; on random weights the activations have
no real outlier channels, so what it does for the released weights is yet to be measured.

An int8 state dict has, for each quantised linear `<name>`, `<name>.weight` (int8, (out, in), the float weight's
shape), `<name>.weight_scale` (float32, (out,)) and, if smoothed, `<name>.smooth` (float32, (in,));
prepare_int8_ turns a float model into the shape such a state dict loads into.
"""
import fnmatch
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

QMAX = 127  # symmetric: -128 is never used, so that negating a value never overflows and the grid is centred

UNAVAILABLE = ("int8 needs torch._int_mm, PyTorch's int8 x int8 -> int32 matmul, on {device}, and this PyTorch "
               "({version}) does not run it there: run int8 on the CPU or CUDA, or use a float checkpoint in a "
               "float dtype (float32, bfloat16) instead")

# Int8Linear's float32 buffers: never cast to the model's dtype (Int8Linear._apply; convert_weights' reader)
FLOAT32_BUFFERS = ("weight_scale", "smooth")

# The U-ViT's nn.Linear modules that stay in float (fnmatch patterns over module names), and why. Measured on the
# amused-256 stand-in (random weights in the official config; see the module docstring): with every linear int8
# the logits are off by 2.3% (relative L2), against bf16's 1.6%. Quantised alone, the up_block's six ConvNeXt MLP
# linears cost 1.4% and project_from_hidden 0.8%: they are the last layers before the MLM head, where no later
# residual dilutes their error, and the MLPs' second linear reads the GRN's heavy-tailed 3072 channels. Kept in
# float, the logits are off by 1.5% (bf16's level) for 4% of the linears' multiply-adds, 8% slower than all-int8.
# Alone, every other group costs less: attention 1.2%, the down_block 0.6%, the feed-forward 0.7%, the adaLN
# modulations 0.06%, and attention and the feed-forward are where the time is. The convolutions (embed conv, MLM
# head, depthwise, down/upsampling) are nn.Conv2d and stay float anyway.
KEEP_FLOAT = {
    "encoder_proj": "uvit.UViT.encode_conditions reads the model's float dtype from its weight; once per prompt",
    "up_block.res_blocks.*.channelwise_linear_*": "the last ConvNeXt MLPs before the head: 1.4% of logit error alone",
    "project_from_hidden": "the transformer's exit, straight into the up_block: 0.8% of logit error alone",
}


@functools.lru_cache(maxsize=None)
def _int_mm_runs(device: str) -> bool:
    try:
        a = torch.full((17, 8), -QMAX, dtype=torch.int8, device=device)  # 17 rows: CUDA's kernel needs M > 16
        b = torch.full((8, 8), QMAX, dtype=torch.int8, device=device)
        return bool((torch._int_mm(a, b) == -8 * QMAX * QMAX).all())
    except (AttributeError, RuntimeError, NotImplementedError):  # no such op; no kernel for this device
        return False


def int8_available(device: torch.device | str = "cpu") -> bool:
    """Whether torch._int_mm exists in this PyTorch and gives the right answer on `device` (tried once)."""
    return _int_mm_runs(str(torch.device(device)))


def check(device: torch.device | str) -> None:
    """ValueError, saying what to do instead, unless int8 matmuls run on `device`. quantize_ calls it; a loader of
    int8 weights (prepare_int8_), which may build on the meta device, calls it for the device the model will run on."""
    if not int8_available(device):
        raise ValueError(UNAVAILABLE.format(device=torch.device(device), version=torch.__version__))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: (M, K) float -> (M, K) int8, (M, 1) float32 scale = absmax / 127."""
    x = x.float()
    # an all-zero row gets the tiniest positive scale instead of 0: its values quantise to 0 rather than 0/0 = NaN
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / QMAX
    return (x / scale).round_().clamp_(-QMAX, QMAX).to(torch.int8), scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear weight (out, in) float -> int8 (out, in) and float32 scales (out,), one per output channel.

    Kept in nn.Linear's (out, in) layout, which torch._int_mm reads as a transposed (in, out) view: on the AMD EPYC
    we measured (oneDNN, 1 and 2 threads) it as fast as a contiguous (in, out) copy, within +-5% either way."""
    return quantize_weight_(w.detach().to(torch.float32, copy=True))


def quantize_weight_(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_weight, overwriting w (float32, owned by the caller: convert_weights' reader): no temporary the size
    of w, whose freed copies the allocator would keep (quantising amused-256 on load peaked at 2.8 GiB with them).
    The same values as quantize_rows: max |w| per row is exact either way, then the same division and rounding."""
    absmax = torch.linalg.vector_norm(w, float("inf"), dim=1, keepdim=True)
    scale = absmax.clamp_(min=torch.finfo(torch.float32).tiny) / QMAX  # (out, 1)
    return w.div_(scale).round_().clamp_(-QMAX, QMAX).to(torch.int8), scale[:, 0]


def int8_matmul(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """qx @ qw^T exactly: (M, K) int8, (N, K) int8 -> (M, N) int32."""
    M = qx.shape[0]
    # CUDA's kernel (cuBLASLt) refuses M <= 16; the CPU's takes any M. The only calls this small are the
    # once-per-prompt ones at batch size rows, so zero rows cost nothing worth a device-dependent branch.
    if M <= 16:
        qx = F.pad(qx, (0, 0, 0, 17 - M))
    return torch._int_mm(qx, qw.t())[:M]


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights, and activations quantised to int8 per token at run time.

    With smoothing (SmoothQuant, Xiao et al. 2023, arXiv 2211.10438), x / s is quantised instead of x and W * s
    instead of W, for a per-input-channel s (`smooth`): the product is the same, but s moves the spread of the
    activations' channels, which per-token scales cannot follow, into the weights, which have a scale per output."""

    def __init__(self, in_features: int, out_features: int, smoothed: bool = False, device=None):
        super().__init__()
        # CUDA's int8 kernel wants K and N multiples of 8; every U-ViT linear has them (so does every config we
        # know), and refusing others here keeps an int8 model portable between devices.
        if in_features % 8 or out_features % 8:
            raise ValueError(f"Int8Linear needs in_features and out_features multiples of 8, got {in_features}, "
                             f"{out_features}; keep this layer in float")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        smooth = torch.ones(in_features, dtype=torch.float32, device=device) if smoothed else None
        self.register_buffer("smooth", smooth)  # None: not in the state dict

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_absmax: torch.Tensor | None = None,
                    alpha: float = 0.5) -> "Int8Linear":
        """act_absmax (in_features,): max |x| per input channel over calibration inputs (calibrate); given, the
        layer is smoothed with s = act_absmax^alpha / max|W|^(1 - alpha) per input channel."""
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; the U-ViT's linears have none")
        m = cls(linear.in_features, linear.out_features, act_absmax is not None, device=linear.weight.device)
        w = linear.weight.detach().float()
        if act_absmax is not None:
            m.smooth = smoothing(act_absmax.float(), w.abs().amax(dim=0), alpha)
            w = w * m.smooth
        m.weight, m.weight_scale = quantize_weight(w)
        return m

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the float32 scales along with the model's float weights, to 8 bits of
        # mantissa in bf16: they keep float32, and follow only a change of device.
        kept = {name: getattr(self, name) for name in FLOAT32_BUFFERS if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            setattr(self, name, t.to(self.weight.device))
        return self

    def forward(self, x):  # (..., in_features) -> (..., out_features), in x's dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.smooth is not None:
            x2 = x2.float() / self.smooth
        qx, sx = quantize_rows(x2)  # (M, K) int8, (M, 1)
        acc = int8_matmul(qx, self.weight)  # (M, N) int32
        # The scale is float32 whatever the model dtype: int32 sums reach 2^25 (K = 2816), past bf16's 8 bits.
        y = acc.float().mul_(sx).mul_(self.weight_scale.float())  # (M, N) float32
        return y.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8" + (
            ", smoothed" if self.smooth is not None else "")


def smoothing(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = max|x|^alpha / max|W|^(1 - alpha), (K,) float32. A channel that was
    never active in calibration (or has zero weights) keeps s = 1: a tiny s would blow up its first real input."""
    s = act_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))


@torch.no_grad()
def calibrate(model: nn.Module, run) -> dict[str, torch.Tensor]:
    """{name: max |x| per input channel (in_features,)} of every nn.Linear of `model`, over the inputs it sees
    while `run()` runs (a few prompts' generations): what quantize_ needs to smooth."""
    absmax = {}

    def record(name):
        def hook(module, args, out):
            a = args[0].detach().reshape(-1, module.in_features).abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], a) if name in absmax else a
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return absmax


def keeps_float(name: str, keep: dict | tuple = KEEP_FLOAT) -> bool:
    """Whether module `name` matches one of the patterns of `keep`."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in keep)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def quantize_(model: nn.Module, keep: dict | tuple = KEEP_FLOAT, act_absmax: dict | None = None,
              alpha: float = 0.5) -> list[str]:
    """Replace, in place, every nn.Linear of `model` whose name matches no pattern of `keep` by an Int8Linear,
    smoothed when `act_absmax` (calibrate's result) is given; returns their names. ValueError if int8 matmuls do
    not run on the model's device, or if calibration never saw one of the layers."""
    check(next(model.parameters()).device)
    names = int8_names(model, keep)
    unseen = [n for n in names if act_absmax is not None and n not in act_absmax]
    if unseen:
        raise ValueError(f"calibration never ran {unseen[:3]}: calibrate with a run that calls every layer")
    for name in names:
        absmax = act_absmax[name] if act_absmax is not None else None
        _replace(model, name, Int8Linear.from_linear(model.get_submodule(name), absmax, alpha))
    return names


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def int8_names(model: nn.Module, keep: dict | tuple = KEEP_FLOAT) -> list[str]:
    """The names of the nn.Linear modules of `model` that quantize_ makes int8 (those matching no pattern of keep)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not keeps_float(n, keep)]


def prepare_int8_(model: nn.Module, state_dict: dict) -> list[str]:
    """Before loading an int8 state dict: every nn.Linear `<name>` of `model` whose `<name>.weight_scale` is in
    `state_dict` becomes an (empty) Int8Linear, smoothed if `<name>.smooth` is there too, so that
    load_state_dict(state_dict, strict=True) fills it. Returns their names. Works on the meta device; call
    check(device) for the device the model will run on."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight_scale" in state_dict]
    for name in names:
        linear = model.get_submodule(name)
        _replace(model, name, Int8Linear(linear.in_features, linear.out_features, f"{name}.smooth" in state_dict,
                                         device=linear.weight.device))
    return names
