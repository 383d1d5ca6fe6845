"""The CUDA fp16 pipeline, walked on a CPU-only machine under FakeTensorMode: no GPU has run our CUDA lines yet.

Amused(ckpt, device="cuda:0", dtype=torch.float16) runs text to image, img2img and inpainting on fake tensors,
which have a device, a dtype and a shape but no data: every operation propagates only those. That checks three
things a GPU would, on a tiny random-weight model:
  - no device mix: an op mixing a CPU tensor (other than a 0-d one) with a CUDA one raises, as it does on CUDA;
  - the dtypes intended: the U-ViT's logits are fp16; the VQ encodes and decodes in fp32 under force_upcast (its
    weights stay fp16, the images come out fp32), in fp16 without it;
  - no host sync inside the sampling loop: a fake tensor has no value to read back, so every read-back of device
    data (.item(), bool(t), int(t), .tolist(), .cpu(), a blocking copy) is seen, with the product line that made it
    (HostSyncs). Generation reads one flag back after the loop (its NaN/inf check), and nothing else in it.
Values are not checked: there are none (tests/test_amused.py checks them against diffusers, on the CPU).

FakeTensorMode has three gaps on a CPU-only build of torch; FakeCuda bridges them, and only them:
  - the Python bindings of indexing, int(t), float(t), .contiguous() and .copy_() take a CUDA device guard before
    any dispatch, and a CPU-only build has none: those go to the aten ops they would call;
  - in-place random fills (uniform_, exponential_) fail in their fake decompositions; with no data to fill they are
    no-ops, after checking, as CUDA does, that an explicit generator is on the tensor's device;
  - torch.Generator("cuda") needs the CUDA runtime: CudaGenerator stands in for one.
"""
import ast
import dataclasses
import functools
import inspect
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_CLIP, TINY_UVIT, TINY_VQ
from PIL import Image

import clip_text
import sampling
import uvit
import vqgan
from amused import Amused
from convert_weights import Checkpoint

try:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    DATA_DEPENDENT, OUTPUT_SHAPE_FROM_DATA = torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape
except (ImportError, AttributeError) as e:
    pytest.skip(f"torch {torch.__version__} lacks what the fake-CUDA walk needs: {e}", allow_module_level=True)

aten = torch.ops.aten
CUDA = torch.device("cuda:0")  # with its index: a fake .to("cuda") asks the (missing) CUDA runtime which device
STEPS = 3


# ----------------------------------------------------------------------------------------------------
# Fake CUDA on a CPU-only build


class CudaGenerator(torch.Generator):
    """A CPU generator that says it is on cuda:0, for want of a CUDA one (torch.Generator("cuda") needs the CUDA
    runtime). The pipeline reads generator.device to decide where to draw, so this takes a CUDA generator's path
    (the draws made on the device); FakeCuda checks each draw against this device. generator=None takes the same
    path, but a CUDA generator is what a seeded GPU run uses (bench/device_check.py)."""

    @property
    def device(self) -> torch.device:
        return CUDA


def on_cuda(t) -> bool:
    return isinstance(t, FakeTensor) and t.device.type == "cuda"


def index_views(x: torch.Tensor, index) -> tuple[torch.Tensor, list]:
    """x[index] as Python's indexing does it: first the views of the ints, slices, None and Ellipsis (select, slice,
    unsqueeze), then the tensor indices, left for aten.index / aten.index_put_ (None for the other dimensions)."""
    index = index if isinstance(index, tuple) else (index,)
    used = sum(i is not None and i is not Ellipsis for i in index)
    dim, tensors = 0, []
    for i in index:
        if i is Ellipsis:
            dim += x.dim() - used
        elif i is None:
            x, dim = aten.unsqueeze(x, dim), dim + 1
        elif isinstance(i, int):
            x = aten.select(x, dim, i)
        elif isinstance(i, slice):
            x, dim = aten.slice(x, dim, i.start, i.stop, 1 if i.step is None else i.step), dim + 1
        elif isinstance(i, torch.Tensor):
            tensors, dim = tensors + [None] * (dim - len(tensors)) + [i], dim + 1
        else:
            raise NotImplementedError(f"index_views cannot index with {i!r}")
    return x, tensors


class FakeCuda(TorchFunctionMode):
    """The three gaps of FakeTensorMode on a CPU-only build (module docstring)."""

    RANDOM_FILLS = {torch.Tensor.uniform_, torch.Tensor.exponential_, torch.Tensor.normal_, torch.Tensor.bernoulli_,
                    torch.Tensor.random_}
    SCALARS = {torch.Tensor.__int__: int, torch.Tensor.__index__: int, torch.Tensor.__float__: float,
               torch.Tensor.__complex__: complex}  # (.item() and bool() reach the dispatcher as they are)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("generator") is not None:
            where = args[0].device if func in self.RANDOM_FILLS else torch.device(kwargs.get("device") or "cpu")
            assert kwargs["generator"].device.type == where.type, \
                f"{func.__name__}: a {kwargs['generator'].device} generator draws a {where} tensor (a CUDA error)"
        if func in self.RANDOM_FILLS and isinstance(args[0], FakeTensor):
            return args[0]
        if not (args and on_cuda(args[0])):
            return func(*args, **kwargs)
        if func in self.SCALARS:
            return self.SCALARS[func](aten._local_scalar_dense(args[0]))
        if func is torch.Tensor.__getitem__:
            x, tensors = index_views(*args)
            return aten.index(x, tensors) if tensors else x
        if func is torch.Tensor.__setitem__:
            (x, tensors), value = index_views(*args[:2]), args[2]
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=x.dtype)
            return aten.index_put_(x, tensors, value) if tensors else aten.copy_(x, value)
        if func is torch.Tensor.contiguous:
            layout = kwargs.get("memory_format", torch.contiguous_format)
            return args[0] if args[0].is_contiguous(memory_format=layout) else aten.clone(args[0], memory_format=layout)
        if func is torch.Tensor.copy_:
            return aten.copy_(*args, **kwargs)
        return func(*args, **kwargs)


def fake_cuda_error() -> str | None:
    """Why this torch cannot run a fake CUDA fp16 layer, or None."""
    layer = torch.nn.Linear(2, 2).requires_grad_(False)  # real weights, moved in: as the pipeline's are
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), FakeCuda():
            layer.to(CUDA, torch.float16)
            layer(torch.ones(1, 2, dtype=torch.float16, device=CUDA))[0].uniform_()
    except Exception as e:  # whatever fails is the reason to skip
        return f"{type(e).__name__}: {e}"
    return None


# Verified on torch 2.13; an older torch whose fake tensors cannot do this much is skipped, not failed. From 2.13 on a
# failure here is a failure of the tests below.
WHY_NOT = fake_cuda_error() if torch.__version__ < "2.13" else None
pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny models only
              pytest.mark.skipif(WHY_NOT is not None, reason=f"torch {torch.__version__}'s FakeTensorMode cannot "
                                                             f"run CUDA on this machine: {WHY_NOT}")]


# ----------------------------------------------------------------------------------------------------
# Host syncs


@dataclasses.dataclass
class Sync:
    what: str  # the op and the tensor
    frames: list  # the product's frames, outermost first: (file, function, line number, source line)
    steps_done: int  # sampling steps completed when it happened (counted by the callback)

    @property
    def site(self) -> tuple[str, str]:
        return self.frames[-1][:2] if self.frames else ("?", "?")

    def __str__(self):
        where = " <- ".join(f"{f}:{n} {fn}(): {src.strip()}" for f, fn, n, src in self.frames[::-1])
        return f"{self.what}, after {self.steps_done} steps, at {where}"


# What each validating read-back gives for valid inputs, by where it is (file, function): the answer FakeTensorMode
# cannot give, having no values. A new read-back outside the loop fails the walk until it is listed here.
VALID_ANSWERS = {
    ("clip_text.py", "forward"): False,  # ids.min() < 0 or ids.max() >= vocab_size
    ("vqgan.py", "encode_to_ids"): True,  # lo >= 0 and hi <= 1
    ("vqgan.py", "decode_ids"): False,  # lo < 0 or hi >= K
    ("amused.py", "_check_mask"): True,  # repaint.any()
    ("sampling.py", "generate"): True,  # after the loop: every logit was finite
}


def shape_from_data(func, args) -> bool:
    """Whether func's output shape depends on tensor values (nonzero, masked_select, a boolean mask index): a host
    sync on CUDA. aten.index is tagged so for its boolean indices only."""
    if OUTPUT_SHAPE_FROM_DATA not in func.tags:
        return False
    if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    return True


class HostSyncs(TorchDispatchMode):
    """Records every point where the host waits for CUDA: a read-back of device data (item, bool, int, tolist, equal,
    a copy to the CPU, an output shape from data) and a blocking copy to the device (the host waits for the stream).
    FakeTensorMode raises on a read-back, having no value; this mode, above it, answers the validating ones from
    VALID_ANSWERS, so that the walk goes on and every sync is seen."""

    def __init__(self):
        super().__init__()
        self.syncs: list[Sync] = []
        self.steps_done = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if DATA_DEPENDENT in func.tags and any(on_cuda(a) for a in args):
            sync = self._record(f"{func} of a {args[0].dtype} {tuple(args[0].shape)} tensor")
            if sync.site not in VALID_ANSWERS:
                raise AssertionError(f"a host sync, not in VALID_ANSWERS: {sync}")
            return VALID_ANSWERS[sync.site]
        if shape_from_data(func, args) and any(on_cuda(a) for a in args):
            raise AssertionError(f"a host sync: {self._record(f'{func}, whose output shape depends on data')}")
        out = func(*args, **kwargs)
        if func in (aten._to_copy.default, aten.copy_.default, aten.copy.default):
            src = args[1] if func is aten.copy_.default else args[0]
            if on_cuda(src) != on_cuda(out) and not kwargs.get("non_blocking", False):
                self._record(f"{func}: a copy to {out.device}")
        return out

    def _record(self, what: str) -> Sync:
        frames = [(Path(f.filename).name, f.name, f.lineno, f.line or "") for f in traceback.extract_stack()
                  if Path(f.filename).parent == ROOT]
        self.syncs.append(Sync(what, frames, self.steps_done))
        return self.syncs[-1]


# ----------------------------------------------------------------------------------------------------
# The walk


def tiny_checkpoint(tokenizer_dir, force_upcast: bool) -> Checkpoint:
    """Our three models at the tests' tiny sizes, thinner still (fake ops cost ~0.5 ms each), random weights."""
    te = clip_text.config_from_hub({**TINY_CLIP, "num_hidden_layers": 2})
    vq = vqgan.config_from_hub({**TINY_VQ, "norm_type": "group", "vq_embed_dim": None, "force_upcast": force_upcast})
    tr = uvit.config_from_hub({**TINY_UVIT, "num_res_blocks": 1, "num_hidden_layers": 1})
    models = [clip_text.CLIPTextEncoder(te), vqgan.VQModel(vq), uvit.UViT(tr)]
    for m in models:
        # Autograd's bookkeeping of a fake CUDA tensor that requires grad asks for the missing CUDA device guard;
        # sampling runs under no_grad and needs no gradients.
        m.eval().requires_grad_(False)
    return Checkpoint(clip_text.CLIPTokenizer.from_folder(tokenizer_dir), *models, mask_token_id=tr.vocab_size - 1,
                      masking_schedule="cosine")


@dataclasses.dataclass
class Walk:
    """What one pipeline call on fake CUDA tensors saw."""
    pipe: Amused
    out: torch.Tensor
    steps: list  # the steps the callback saw
    logits: list  # the U-ViT's outputs
    vq: dict  # the VQ encoder's and decoder's outputs
    syncs: list


def walk(ckpt: Checkpoint, method: str, *args, callback=None, **kwargs) -> Walk:
    """pipe.<method>(*args, **kwargs) with the pipeline on fake cuda:0 in fp16. callback(step, tokens), if given,
    runs after the walk's own, which counts the steps for HostSyncs."""
    steps, logits, vq = [], [], {}
    host = HostSyncs()

    def count(step, tokens):
        assert on_cuda(tokens), f"step {step}: tokens on {tokens.device} ({type(tokens).__name__})"
        steps.append(step)
        host.steps_done = len(steps)
        if callback is not None:
            callback(step, tokens)

    with FakeTensorMode(allow_non_fake_inputs=True), FakeCuda():
        pipe = Amused(ckpt, device=CUDA, dtype=torch.float16)  # before HostSyncs: moving the weights is no sampling
        pipe.transformer.register_forward_hook(lambda m, i, out: logits.append(out))
        for name in ("encoder", "decoder"):
            getattr(pipe.vqvae, name).register_forward_hook(lambda m, i, out, name=name: vq.setdefault(name, out))
        with host:
            out = getattr(pipe, method)(*args, **kwargs, callback=count)
    return Walk(pipe, out, steps, logits, vq, host.syncs)


@functools.cache
def generate_loop_lines() -> set[int]:
    """The line numbers of sampling.generate's sampling loop (its for or while statements, whole)."""
    lines, first = inspect.getsourcelines(sampling.generate)
    loops = [n for n in ast.walk(ast.parse(textwrap.dedent("".join(lines)))) if isinstance(n, (ast.For, ast.While))]
    assert loops, "sampling.generate has no loop: update generate_loop_lines"
    return {first + n for loop in loops for n in range(loop.lineno - 1, loop.end_lineno)}


def in_generate(s: Sync) -> int | None:
    """The line of generate that the sync happened under, if any."""
    return next((n for f, fn, n, _ in s.frames if (f, fn) == ("sampling.py", "generate")), None)


def in_loop(w: Walk) -> list[Sync]:
    """The syncs made inside generate's sampling loop: under one of its lines."""
    return [s for s in w.syncs if in_generate(s) in generate_loop_lines()]


IMAGE, MASK = Image.new("RGB", (32, 32), (90, 120, 200)), Image.new("L", (32, 32), 255)  # 32 px: the tiny VQ's 8x8
CALLS = {  # method, args, kwargs, the steps it runs: img2img and inpaint run the last int(STEPS * strength)
    "text to image": ("__call__", ("a cat",), {}, [0, 1, 2]),
    "img2img": ("img2img", ("a cat", IMAGE), {"strength": 0.7}, [1, 2]),
    "inpaint": ("inpaint", ("a cat", IMAGE, MASK), {}, [0, 1, 2]),
    # the other samplers and schedules: the Halton order's plan, a guidance schedule (unguided steps on the prompts'
    # half of the conditions), a softmax temperature ramp
    "text to image, halton, ramp": ("__call__", ("a cat",), {"sampler": "halton", "guidance_schedule": "ramp",
                                                             "softmax_temperature": (1.0, 0.8)}, [0, 1, 2]),
    "img2img, interval": ("img2img", ("a cat", IMAGE), {"strength": 0.7, "guidance_schedule": "interval"}, [1, 2]),
    "inpaint, halton, interval": ("inpaint", ("a cat", IMAGE, MASK), {"sampler": "halton",
                                                                      "guidance_schedule": "interval"}, [0, 1, 2]),
}
GENERATORS = {"cuda generator": CudaGenerator, "no generator": lambda: None, "cpu generator": torch.Generator}
WALKS = [("text to image", g) for g in GENERATORS] + [("img2img", "cuda generator"), ("img2img", "cpu generator"),
                                                      ("inpaint", "cuda generator")] + [
    (call, "cuda generator") for call in ("text to image, halton, ramp", "img2img, interval", "inpaint, halton, interval")]


@functools.cache
def walked(tokenizer_dir, call: str, generator: str, force_upcast: bool = True) -> Walk:
    """Each walk once, for the tests that read it."""
    method, args, kwargs, _ = CALLS[call]
    return walk(tiny_checkpoint(tokenizer_dir, force_upcast), method, *args, steps=STEPS, output_type="pt",
                generator=GENERATORS[generator](), **kwargs)


# ----------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("call, generator", WALKS)
def test_runs_on_cuda_without_a_device_mix(tiny_tokenizer_dir, call, generator):
    w = walked(tiny_tokenizer_dir, call, generator)  # a device mix would have raised in it
    assert w.steps == CALLS[call][3]
    assert len(w.logits) == len(w.steps) and all(on_cuda(x) for x in w.logits)  # fake CUDA tensors all along
    assert on_cuda(w.out) and w.out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("call, generator", WALKS)
def test_the_u_vit_runs_in_fp16_and_the_upcast_vq_in_fp32(tiny_tokenizer_dir, call, generator):
    w = walked(tiny_tokenizer_dir, call, generator)
    assert {x.dtype for x in w.logits} == {torch.float16}
    assert {name: x.dtype for name, x in w.vq.items()} == {
        "decoder": torch.float32, **({"encoder": torch.float32} if not call.startswith("text to image") else {})}
    assert w.out.dtype == torch.float32  # as the reference pipelines return
    assert {p.dtype for p in w.pipe.vqvae.parameters()} == {torch.float16}  # the upcast is on copies


def test_the_vq_without_force_upcast_runs_in_fp16(tiny_tokenizer_dir):
    w = walked(tiny_tokenizer_dir, "img2img", "cuda generator", force_upcast=False)
    assert {name: x.dtype for name, x in w.vq.items()} == {"encoder": torch.float16, "decoder": torch.float16}
    assert w.out.dtype == torch.float16


@pytest.mark.parametrize("call, generator", [(c, g) for c, g in WALKS if g != "cpu generator"])
def test_no_host_sync_inside_the_sampling_loop(tiny_tokenizer_dir, call, generator):
    w = walked(tiny_tokenizer_dir, call, generator)
    assert not in_loop(w), "host syncs inside the sampling loop:\n" + "\n".join(map(str, in_loop(w)))
    # generate reads back one thing, its NaN/inf flag, once every step has run (the callback's count)
    read_backs = [s for s in w.syncs if in_generate(s) and "_local_scalar_dense" in s.what]
    assert len(read_backs) == 1, "\n".join(map(str, read_backs))
    assert read_backs[0].site == ("sampling.py", "generate") and read_backs[0].steps_done == len(w.steps)
    assert "of a torch.bool () tensor" in read_backs[0].what


@pytest.mark.parametrize("call", ["text to image", "img2img"])
def test_a_cpu_generator_costs_copies_in_the_loop_never_a_read_back(tiny_tokenizer_dir, call):
    """A CPU generator (diffusers' draws on any device) draws on the CPU and copies the noise to the GPU each step:
    a blocking copy, the host waiting for the stream; but nothing read back from the GPU."""
    syncs = in_loop(walked(tiny_tokenizer_dir, call, "cpu generator"))
    assert syncs and all("a copy to cuda:0" in s.what for s in syncs), "\n".join(map(str, syncs))


def test_the_walk_sees_a_sync_inside_the_loop(tiny_tokenizer_dir):
    """The harness itself: a read-back in the loop (here in a callback, which generate calls after every step) is
    found, at each step."""
    w = walk(tiny_checkpoint(tiny_tokenizer_dir, True), "__call__", "a cat", steps=2, output_type="tokens",
             callback=lambda step, tokens: bool(tokens.eq(0).any()))
    assert [s.steps_done for s in in_loop(w)] == [1, 2]


def test_the_walk_sees_a_device_mix(tiny_tokenizer_dir):
    with pytest.raises(RuntimeError, match="device"):
        walk(tiny_checkpoint(tiny_tokenizer_dir, True), "__call__", "a cat", steps=2, output_type="tokens",
             callback=lambda step, tokens: tokens + torch.zeros(tokens.shape, dtype=tokens.dtype))
