"""quantize.py: the int8 linear layer against a float64 product of the original weights and inputs, the exactness
of its integer part, smoothing and calibration, quantize_ on a tiny U-ViT, the int8 state dict's round trip, and the
refusal without a kernel.

The bound (derivation in quantize.py's docstring). With qx = round(x / sx) and qw = round(w / sw), each rounding
is off by at most half a step, so x = sx qx + ex, |ex| <= sx/2, and w = sw qw + ew, |ew| <= sw/2, and
    sx sw qx.qw - x.w = -sum_k (ex_k w_k + x_k ew_k - ex_k ew_k)
    |y^ - y| <= sum_k (sx/2 |w_k| + sw/2 |x_k| + sx sw / 4)                                        (1)
per output element. The int32 accumulation is exact; what float32 adds on top: x / sx is rounded before the
rounding to an integer (<= 127 * 2^-24 of a step, so each half step grows by a factor < 1 + 2^-16), and the int32
sum to float32 plus the two rescaling multiplies round three times (<= 3 * 2^-24 |y^|). We check
    |y^ - y| <= (1 + 2^-15) * (1) + 2^-22 |y^|
everywhere. (1) is a worst case; the typical error is far smaller, as the roundings are independent and cancel
(the relative error ||y^ - y|| / ||y|| is ~1% for Gaussian inputs), and we check that too.
"""
import copy

import pytest
import torch
import torch.nn as nn
from conftest import TINY_UVIT, assert_nontrivial, perturb_
from safetensors.torch import load_file, save_file

import quantize
import uvit
from quantize import Int8Linear

pytestmark = pytest.mark.usefixtures("one_thread")


def random_linear(in_features, out_features, seed):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=False)


def bound(x, w, q):
    """The bound (1), per element (M, N) float64, for Int8Linear q made from weight w, at input x. A smoothed q
    quantises x / s and w * s: the bound is theirs, plus 2^-22 sum_k |x_k w_k| for the float32 roundings of the
    two divisions and multiplies."""
    s = q.smooth if q.smooth is not None else torch.ones(x.shape[-1])
    xs, ws = x.float() / s, w.float() * s  # what q quantises, computed as q computes them
    sx = quantize.quantize_rows(xs)[1].double()  # (M, 1)
    sw = q.weight_scale.double()[None, :]  # (1, N)
    ax, aw = xs.double().abs(), ws.double().abs()
    K = x.shape[-1]
    worst = sx / 2 * aw.sum(1)[None, :] + sw / 2 * ax.sum(1, keepdim=True) + K * sx * sw / 4
    rounding = 2 ** -22 * q(x).double().abs() + 2 ** -22 * (x.double().abs() @ w.double().abs().T)
    return (1 + 2 ** -15) * worst + rounding


def outlier_inputs(seed):
    """Tokens (37, 256) whose first 4 channels are 30x larger than the rest, as trained transformers have."""
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(seed))
    x[:, :4] *= 30
    return x


def within_bound(x, linear, q):
    """Assert q(x) is within the bound of the float64 product of the original x and weights; -> relative error."""
    want = x.double() @ linear.weight.double().T  # (M, N)
    got = q(x).double()
    assert_nontrivial("int8 linear", got)
    err = (got - want).abs()
    b = bound(x, linear.weight, q)
    assert (err <= b).all(), f"{(err > b).sum().item()} elements over the bound; worst excess {(err - b).max():.3e}"
    rel = (err.norm() / want.norm()).item()
    print(f"relative error {rel:.4f}, max |err| / bound {(err / b).max():.3f}")
    assert rel > 1e-3, "no quantisation error at all: is the layer still computing in float?"
    return rel


@torch.no_grad()
def test_int8_linear_within_bound():
    """Int8Linear vs the float64 product of the original float32 weights and inputs: within the bound (1)
    everywhere, and typically ~1% (Gaussian inputs: < 2% asserted, ~0.8% measured). With outlier channels the
    per-token scale grows 30x and the error with it (~2.7% measured); the bound still holds."""
    linear = random_linear(256, 48, seed=0)
    q = Int8Linear.from_linear(linear)
    assert within_bound(torch.randn(37, 256, generator=torch.Generator().manual_seed(1)), linear, q) < 0.02
    assert within_bound(outlier_inputs(seed=1), linear, q) > 0.02


@torch.no_grad()
def test_smoothing():
    """Smoothed with the inputs' own channel maxima, the layer on outlier inputs is within the bound and at least
    twice as accurate as unsmoothed (measured ~2.7% -> ~0.9%); the product it computes is the same one."""
    linear = random_linear(256, 48, seed=0)
    x = outlier_inputs(seed=2)
    plain = within_bound(x, linear, Int8Linear.from_linear(linear))
    smoothed = within_bound(x, linear, Int8Linear.from_linear(linear, x.abs().amax(dim=0)))
    assert smoothed < plain / 2
    # a channel never active in calibration, or with zero weights, keeps s = 1
    s = quantize.smoothing(torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1.0, 0.5, 0.0]), alpha=0.5)
    assert torch.allclose(s, torch.tensor([1.0, 2.0, 1.0]))


@torch.no_grad()
def test_integer_part_exact():
    """int8_matmul equals the float64 product of the int8 values exactly, with sums past 2^24, where a float32
    matmul of the same values rounds; at M = 1 and 3 (padded to 17 rows inside) and M = 40."""
    g = torch.Generator().manual_seed(2)
    K = 4096
    for M in (1, 3, 40):
        qx = torch.randint(100, 128, (M, K), generator=g, dtype=torch.int8)  # same signs: sums ~ 5e7 > 2^24
        qw = torch.randint(100, 128, (24, K), generator=g, dtype=torch.int8)
        qw[::2] = -qw[::2]
        got = quantize.int8_matmul(qx, qw)
        want = qx.double() @ qw.double().T
        assert got.dtype == torch.int32 and got.shape == (M, 24)
        assert torch.equal(got.double(), want), f"M={M}: int32 result differs from the exact product"
        assert want.abs().min() > 2 ** 24
        assert not torch.equal((qx.float() @ qw.float().T).double(), want), "float32 would have been exact too"


@torch.no_grad()
def test_int8_linear_shapes_and_rows():
    """Any leading dims, one token or none; each token's output depends on that token only (per-token scales),
    bit for bit; the output takes the input's dtype."""
    q = Int8Linear.from_linear(random_linear(64, 32, seed=3))
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4))
    y = q(x)
    assert y.shape == (2, 3, 32)
    for i in range(2):
        for j in range(3):
            assert torch.equal(q(x[i, j:j + 1]), y[i, j:j + 1])
    assert q(torch.zeros(0, 64)).shape == (0, 32)
    assert torch.equal(q(torch.zeros(5, 64)), torch.zeros(5, 32)), "an all-zero token must give zeros, not NaN"
    assert q(x.bfloat16()).dtype == torch.bfloat16


@torch.no_grad()
def test_int8_linear_keeps_float32_scales():
    """Module.to(bf16), as the pipeline casts a model, leaves the weights int8 and the scales float32 (bf16 scales
    would be off by up to 2^-9); the output follows the input's dtype."""
    linear = random_linear(64, 32, seed=5)
    q = Int8Linear.from_linear(linear, act_absmax=torch.rand(64) + 0.5).to(torch.bfloat16)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == q.smooth.dtype == torch.float32
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(q(x.bfloat16()), q(x.bfloat16().float()).bfloat16())


def test_int8_linear_refuses():
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_linear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        Int8Linear.from_linear(nn.Linear(60, 32, bias=False))


def tiny_uvit(seed=0):
    torch.manual_seed(seed)
    return perturb_(uvit.UViT(uvit.config_from_hub(TINY_UVIT)).eval(), seed)


def tiny_inputs(cfg, seed=1):
    """Two [uncond, cond]-like rows: distinct text, about half of the grid masked."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(2, 77, cfg.encoder_hidden_size, generator=g)
    pooled = torch.randn(2, cfg.cond_embed_dim, generator=g)
    micro = torch.tensor([[256.0, 256, 0, 0, 6]] * 2)
    s, mask_id = cfg.sample_size, cfg.vocab_size - 1
    ids = torch.randint(0, cfg.codebook_size, (2, s, s), generator=g)
    ids[torch.rand(2, s, s, generator=g) < 0.5] = mask_id
    return ids, (text, pooled, micro)


def logits(model, ids, conds):
    return model(ids, model.encode_conditions(*conds))


def calibration(model, cfg):
    """Channel maxima of every linear's inputs over two other batches than tiny_inputs' (a different seed)."""
    ids, conds = tiny_inputs(cfg, seed=5)
    return quantize.calibrate(model, lambda: logits(model, ids, conds))


@torch.no_grad()
def test_calibrate():
    """calibrate sees every linear; encoder_proj's maxima are exactly those of the text hidden states it reads."""
    model = tiny_uvit()
    ids, conds = tiny_inputs(model.cfg, seed=5)
    absmax = quantize.calibrate(model, lambda: logits(model, ids, conds))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert absmax.keys() == linears.keys()
    assert all(absmax[n].shape == (m.in_features,) for n, m in linears.items())
    assert torch.equal(absmax["encoder_proj"], conds[0].abs().amax(dim=(0, 1)))
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules()), "hooks left behind"


@torch.no_grad()
@pytest.mark.parametrize("smoothed", [False, True], ids=["plain", "smoothed"])
def test_quantize_tiny_uvit(smoothed):
    """quantize_ keeps exactly the KEEP_FLOAT linears in float and makes every other one int8 (smoothed when
    calibrated); the logits stay within 5% (relative L2) of fp32 and agree on the top-1 code at >= 90% of the
    masked positions. Measured: 1.2% and 97% plain, 1.2% and 100% smoothed. The tiny model's logits are flat (random
    weights), so top-1 is fragile here."""
    model = tiny_uvit()
    ids, conds = tiny_inputs(model.cfg)
    want = logits(model, ids, conds)
    q = copy.deepcopy(model)
    names = quantize.quantize_(q, act_absmax=calibration(q, q.cfg) if smoothed else None)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(names) == sorted(n for n in linears if not quantize.keeps_float(n))
    for n in linears:
        kind = nn.Linear if quantize.keeps_float(n) else Int8Linear
        assert type(q.get_submodule(n)) is kind, f"{n} is {type(q.get_submodule(n)).__name__}, expected {kind.__name__}"
    assert all((q.get_submodule(n).smooth is not None) == smoothed for n in names)
    assert any(quantize.keeps_float(n) for n in linears) and names  # both kinds are present
    got = logits(q, ids, conds)
    assert_nontrivial("int8 logits", got)
    rel = ((got - want).norm() / want.norm()).item()
    masked = ids == model.cfg.vocab_size - 1
    top1 = (got.argmax(1) == want.argmax(1))[masked].float().mean().item()
    print(f"tiny U-ViT int8 vs fp32: relative error {rel:.4f}, top-1 agreement {top1:.3f}")
    assert 1e-3 < rel < 0.05
    assert top1 >= 0.9


def test_quantize_needs_every_layer_calibrated():
    model = tiny_uvit()
    absmax = calibration(model, model.cfg)
    del absmax["transformer_layers.0.ff.net.2"]
    with pytest.raises(ValueError, match="transformer_layers.0.ff.net.2"):
        quantize.quantize_(model, act_absmax=absmax)


@torch.no_grad()
@pytest.mark.parametrize("smoothed", [False, True], ids=["plain", "smoothed"])
def test_int8_state_dict_round_trip(tmp_path, smoothed):
    """An int8 U-ViT's state dict (`<name>.weight` int8 in the float weight's shape, `<name>.weight_scale`
    float32, and `<name>.smooth` float32 (in,) when smoothed) saved with safetensors and loaded into a float model
    prepared by prepare_int8_ on the meta device, as convert_weights.build loads: the same logits, bit for bit."""
    q = tiny_uvit()
    names = quantize.quantize_(q, act_absmax=calibration(q, q.cfg) if smoothed else None)
    sd = q.state_dict()
    float_shapes = {k: v.shape for k, v in tiny_uvit().state_dict().items()}
    extra = {f"{n}.weight_scale" for n in names} | ({f"{n}.smooth" for n in names} if smoothed else set())
    assert sd.keys() - float_shapes.keys() == extra
    for n in names:
        assert sd[f"{n}.weight"].dtype == torch.int8 and sd[f"{n}.weight"].shape == float_shapes[f"{n}.weight"]
        assert sd[f"{n}.weight_scale"].dtype == torch.float32
    save_file(sd, tmp_path / "int8.safetensors")
    loaded = load_file(tmp_path / "int8.safetensors")
    fresh = uvit.UViT(q.cfg).to("meta")  # (not built under torch.device("meta"): its first use costs seconds)
    assert sorted(quantize.prepare_int8_(fresh, loaded)) == sorted(names)
    fresh.load_state_dict(loaded, strict=True, assign=True)
    ids, conds = tiny_inputs(q.cfg)
    assert torch.equal(logits(fresh.eval(), ids, conds), logits(q, ids, conds))


@pytest.fixture
def no_int8_kernel(monkeypatch):
    """A PyTorch whose torch._int_mm fails on this device, as on a device without the kernel."""
    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_int_mm' with arguments from the 'CPU' backend")

    quantize._int_mm_runs.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", missing)
    yield
    quantize._int_mm_runs.cache_clear()  # forget the failure once the real kernel is back


def test_refused_without_kernel(no_int8_kernel):
    """Without a working kernel: int8_available says so, and quantizing or checking a device for an int8 model
    raises one ValueError that names the kernel and the way out (a float dtype)."""
    assert not quantize.int8_available("cpu")
    with pytest.raises(ValueError, match=r"torch\._int_mm.*cpu.*float dtype"):
        quantize.quantize_(tiny_uvit())
    with pytest.raises(ValueError, match=r"torch\._int_mm.*float dtype"):
        quantize.check("cpu")


def test_available_here():
    """The build this project requires (torch >= 2.4) runs int8 on the CPU: the probe must not fail for nothing."""
    assert quantize.int8_available("cpu")


# ----------------------------------------------------------------------------------------------------
# int8 through the pipeline: quantised on load, the int8 file, sample.py


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_tokenizer_dir):
    from conftest import reference_pipeline, save_hub_checkpoint

    ref = reference_pipeline("tiny", tiny_tokenizer_dir, seed=4)
    return save_hub_checkpoint(ref, tmp_path_factory.mktemp("hub") / "tiny", tiny_tokenizer_dir)


def test_int8_file_round_trip(hub, tmp_path, one_thread):
    """convert_weights --dtype int8 writes the U-ViT's quantised linears (int8 + float32 scales, KEEP_FLOAT's in
    bf16) and loads them as int8, no float copy: the same tensors and the same tokens as quantising a float checkpoint
    on load (both quantise the file's float32 weights)."""
    import convert_weights
    from amused import Amused

    out = tmp_path / "int8.safetensors"
    convert_weights.main(str(hub), str(out), dtype="int8")
    stored = load_file(out)
    names = quantize.int8_names(uvit.UViT(uvit.config_from_hub(TINY_UVIT)))
    assert names and all(stored[f"transformer.{n}.weight"].dtype == torch.int8 for n in names)
    assert all(stored[f"transformer.{n}.weight_scale"].dtype == torch.float32 for n in names)
    assert stored["transformer.encoder_proj.weight"].dtype == torch.bfloat16  # KEEP_FLOAT

    from_file = Amused.from_pretrained(out, dtype="auto", exact=False)
    on_load = Amused.from_pretrained(hub, dtype="int8", exact=False)
    assert from_file.int8 and on_load.int8 and from_file.dtype == on_load.dtype
    a, b = from_file.transformer.state_dict(), on_load.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = Amused.from_pretrained(out, dtype="int8", exact=False).transformer.state_dict()  # not quantised twice
    assert all(torch.equal(a[k], again[k]) for k in a)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    tokens = from_file(["a cat", "a dog"], steps=4, generator=gen(), output_type="tokens")
    assert_nontrivial("int8 tokens", tokens.float())
    assert torch.equal(tokens, on_load(["a cat", "a dog"], steps=4, generator=gen(), output_type="tokens"))
    with pytest.raises(ValueError, match="int8: merge the LoRA"):
        from_file.load_lora(out)


def test_int8_pipeline_refused_without_kernel(hub, tmp_path, no_int8_kernel):
    """An int8 file, or dtype="int8", on a build whose int8 matmul does not run: one clear error at load."""
    import convert_weights
    from amused import Amused

    with pytest.raises(ValueError, match=r"torch\._int_mm.*float dtype"):
        Amused.from_pretrained(hub, dtype="int8")
    out = tmp_path / "int8.safetensors"
    convert_weights.convert(hub, out, torch.bfloat16, int8=True)  # writing one needs no kernel
    for dtype in ("auto", torch.float32):
        with pytest.raises(ValueError, match=r"torch\._int_mm.*float dtype"):
            Amused.from_pretrained(out, dtype=dtype)


def test_sample_py_int8(hub, tmp_path, capsys, one_thread):
    """sample.py --dtype int8 quantises the float checkpoint on load, says so, and draws what the pipeline draws."""
    import sample
    from amused import Amused
    from conftest import assert_same_image
    from PIL import Image

    out = tmp_path / "int8.png"
    sample.main("a cat", checkpoint=str(hub), steps="3", out=str(out), dtype="int8")
    assert "dtype           int8 (the U-ViT's linear layers in int8, the rest in " in capsys.readouterr().out
    pipe = Amused.from_pretrained(hub, dtype="int8", exact=False)
    assert_same_image(Image.open(out), pipe("a cat", steps=3, generator=torch.Generator().manual_seed(0))[0], "int8")
