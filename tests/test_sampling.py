"""The samplers beside the reference's (sampling.py): the Halton order rebuilt from the definition of the Halton
sequence, the counts and ranks, the guidance schedules and what they cost in U-ViT passes, and the invariants of
every sampler in all three modes on the tiny model. The reference sampler's parity with diffusers is
tests/test_amused.py's, untouched: these options are never the default.
"""
import math

import pytest
import torch
from conftest import TINY_UVIT, reference_pipeline, save_hub_checkpoint, seeded, smooth_images

import sampling
from amused import Amused
from sampling import Sampler, guidance_scales, halton_order, halton_ranks, halton_reveal_counts, passes_per_image

MASK_ID = TINY_UVIT["vocab_size"] - 1
PROMPTS = ["a photo of a cat", "an astronaut riding a horse!"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models only


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_tokenizer_dir):
    ref = reference_pipeline("tiny", tiny_tokenizer_dir, seed=11)
    return Amused.from_pretrained(save_hub_checkpoint(ref, tmp_path_factory.mktemp("hub") / "tiny", tiny_tokenizer_dir))


# ----------------------------------------------------------------------------------------------------
# The Halton order, from the definition


def van_der_corput(i: int, base: int) -> float:
    """The definition, written independently: i in base `base`, its digit string reversed behind the point."""
    digits = []
    while i:
        i, d = divmod(i, base)
        digits.append(d)
    return sum(d * base ** -(k + 1) for k, d in enumerate(digits))  # digits[0] is the least significant


def halton_order_by_definition(h: int, w: int) -> list[tuple[int, int]]:
    """Halton points (base 2, base 3), i = 1, 2, ... scaled to the grid, first occurrences, until all are seen.
    float64 is exact for base 2; for base 3 a product landing within 1e-12 of an integer would be ambiguous: none
    does on these grids (checked below)."""
    order, seen, i = [], set(), 0
    while len(order) < h * w:
        i += 1
        x, y = van_der_corput(i, 2) * h, van_der_corput(i, 3) * w
        assert abs(y - round(y)) > 1e-12 or y == round(y), "an ambiguous point: use exact arithmetic"
        cell = (math.floor(x), math.floor(y))
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
    return order


@pytest.mark.parametrize("h, w", [(8, 8), (16, 16), (5, 7), (12, 8), (1, 3)])
def test_halton_order_is_the_halton_sequence(h, w):
    order = halton_order(h, w)
    expected = [r * w + c for r, c in halton_order_by_definition(h, w)]
    assert order.tolist() == expected
    assert sorted(order.tolist()) == list(range(h * w))  # every position once


def test_halton_order_spreads_the_first_positions():
    """The point of the order: its first quarter of an 8x8 grid lies in every row and every column, 3 to 5 in each
    4x4 quadrant (4 would be perfectly even)."""
    first = halton_order(8, 8)[:16]
    rows, cols = first // 8, first % 8
    quadrants = torch.bincount((rows // 4) * 2 + cols // 4, minlength=4)
    assert quadrants.min() >= 3 and quadrants.max() <= 5
    assert len(set(rows.tolist())) == 8 and len(set(cols.tolist())) == 8


def test_halton_ranks_follow_the_rolled_order_among_the_masked():
    order = halton_order(4, 4)
    masked = torch.ones(2, 16, dtype=torch.bool)
    masked[1, order[:3]] = False  # image 1: the first three positions of the order are committed already
    ranks = halton_ranks(order, masked, torch.tensor([0, 5]))
    assert torch.equal(ranks[0][order], torch.arange(16))  # no roll: the order itself
    rolled = torch.roll(order, 5)
    expected = torch.full((16,), 16)
    place = 0
    for position in rolled.tolist():  # by hand: the rolled order, skipping what is committed
        if masked[1, position]:
            expected[position], place = place, place + 1
    assert torch.equal(ranks[1], expected) and (ranks[1] == 16).sum() == 3


def test_halton_reveal_counts_are_the_papers_rule():
    """Text to image: max(k + 1, int(L * (1 - arccos((k + 1) / N) / (pi / 2)))) revealed after step k, written
    in float64 as Halton-MaskGIT does; ours in float32 may only differ where the product is within rounding of an
    integer (none here); at most n; all after the last step."""
    for L in (64, 256, 1024):
        for N in (1, 2, 4, 6, 8, 12, 16):
            ours = halton_reveal_counts(N, torch.tensor([L]))[:, 0].tolist()
            theirs = [max(k + 1, int(L * (1 - math.acos((k + 1) / N) / (math.pi / 2)))) for k in range(N)]
            assert ours == theirs, (L, N)
    counts = halton_reveal_counts(6, torch.tensor([3, 0, 40]))  # per image: a few, none, many masked
    assert counts[:, 0].tolist() == [1, 2, 3, 3, 3, 3] and counts[:, 1].tolist() == [0] * 6 and counts[-1, 2] == 40


# ----------------------------------------------------------------------------------------------------
# Guidance schedules


def test_guidance_schedules_and_their_passes():
    assert guidance_scales(4.0, 4) == [4.0] * 4 and passes_per_image(guidance_scales(4.0, 4)) == 8
    assert guidance_scales(4.0, 4, "ramp") == [1.0, 2.0, 3.0, 4.0]  # unguided first, the full scale last
    assert passes_per_image(guidance_scales(4.0, 4, "ramp")) == 7
    assert guidance_scales(10.0, 6, "interval", 0.5) == [1.0, 1.0, 1.0, 10.0, 10.0, 10.0]
    assert passes_per_image(guidance_scales(10.0, 6, "interval", 0.5)) == 9
    assert guidance_scales(10.0, 4, "interval", 0.0) == [10.0] * 4 and guidance_scales(10.0, 1, "ramp") == [10.0]
    assert passes_per_image(guidance_scales(1.0, 12)) == 12  # guidance off: one pass a step
    with pytest.raises(ValueError, match="unknown guidance schedule 'cosine'"):
        guidance_scales(4.0, 4, "cosine")


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="maskgit"), "sampler must be one of"),
    (dict(mask_schedule="square"), "mask_schedule must be None or one of"),
    (dict(guidance_schedule="cosine"), "guidance_schedule must be one of"),
    (dict(guidance_from=1.5), r"guidance_from must be in \[0, 1\]"),
    (dict(softmax_temperature=0.0), "softmax_temperature must be a positive finite number"),
    (dict(softmax_temperature=(1.0, float("inf"))), "softmax_temperature must be a positive finite number"),
    (dict(halton_roll=1), "halton_roll must be True or False"),
])
def test_bad_sampler_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)


def test_the_pipeline_names_a_bad_setting(pipe):
    with pytest.raises(ValueError, match="sampler must be one of"):
        pipe("a", sampler="greedy")
    with pytest.raises(ValueError, match="guidance_from must be in"):
        pipe.img2img("a", smooth_images(1, 32, 32, 0), guidance_schedule="interval", guidance_from=-0.1)


# ----------------------------------------------------------------------------------------------------
# The pipeline with each sampler


def record(call):
    """call(callback=...) -> (its output, [(step, tokens after it)], the U-ViT's batch size at each call)."""
    seen, batches = [], []
    handle = record.pipe.transformer.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        out = call(callback=lambda step, tokens: seen.append((step, tokens.clone())))
    finally:
        handle.remove()
    return out, seen, batches


def test_halton_text_to_image_reveals_its_order(pipe):
    """Each step commits exactly the next positions of the (rolled) Halton order, with the paper's counts; nothing
    committed changes; every image of the batch has its own roll, from the generator."""
    record.pipe = pipe
    steps = 5
    out, seen, batches = record(lambda **o: pipe(PROMPTS, steps=steps, sampler="halton", generator=seeded(2),
                                                 output_type="tokens", **o))
    counts = halton_reveal_counts(steps, torch.tensor([64]))[:, 0]
    offsets = (torch.rand(2, generator=seeded(2)) * 64).long()  # the roll: the generator's first draw
    previous = torch.full((2, 64), MASK_ID)
    for (step, tokens), n in zip(seen, counts.tolist()):
        flat = tokens.reshape(2, 64)
        for b in range(2):
            revealed = torch.roll(halton_order(8, 8), int(offsets[b]))[:n]
            assert set((flat[b] != MASK_ID).nonzero()[:, 0].tolist()) == set(revealed.tolist()), (step, b)
        committed = previous != MASK_ID
        assert torch.equal(flat[committed], previous[committed]), f"step {step} changed a committed token"
        previous = flat
    assert (out != MASK_ID).all() and len(out.unique()) > 5 and batches == [4] * steps  # guided: [neg; pos]
    unrolled = pipe(PROMPTS, steps=2, sampler="halton", halton_roll=False, output_type="tokens", callback=lambda s, t:
                    seen.append((s, t.clone())))
    assert torch.equal(seen[-2][1][0] != MASK_ID, seen[-2][1][1] != MASK_ID) and unrolled.shape == (2, 8, 8)


@pytest.mark.parametrize("schedule, batches", [("interval", [2, 2, 4, 4]), ("ramp", [2, 4, 4, 4])])
def test_unguided_steps_run_the_prompts_alone(pipe, schedule, batches):
    """A guidance schedule's unguided steps run the U-ViT on the 2 prompts alone, the guided ones on [neg; pos]:
    the passes saved are real; and a guided step of the interval equals the constant schedule's arithmetic."""
    record.pipe = pipe
    out, seen, seen_batches = record(lambda **o: pipe(PROMPTS, steps=4, guidance_scale=5.0,
                                                      guidance_schedule=schedule, generator=seeded(3),
                                                      output_type="tokens", **o))
    assert seen_batches == batches
    assert sum(b // 2 for b in seen_batches) == passes_per_image(guidance_scales(5.0, 4, schedule))
    assert (out != MASK_ID).all()
    constant = pipe(PROMPTS, steps=4, guidance_scale=5.0, generator=seeded(3), output_type="tokens")
    assert not torch.equal(out, constant)  # the first steps differ: unguided


def test_interval_from_0_is_the_reference_and_the_defaults_change_nothing(pipe):
    """guidance_from 0 guides every step: the same tokens as the constant schedule (the scale then a 0-d tensor,
    the same value); every default keyword spelled out gives the reference's tokens."""
    reference = pipe(PROMPTS, steps=6, generator=seeded(4), output_type="tokens")
    spelled = pipe(PROMPTS, steps=6, generator=seeded(4), output_type="tokens", sampler="confidence",
                   guidance_schedule="constant", mask_schedule=None, softmax_temperature=1.0, halton_roll=True)
    interval = pipe(PROMPTS, steps=6, generator=seeded(4), output_type="tokens", guidance_schedule="interval",
                    guidance_from=0.0)
    assert torch.equal(spelled, reference) and torch.equal(interval, reference)


def test_softmax_temperature_and_arccos_change_the_draws(pipe):
    reference = pipe(PROMPTS, steps=6, generator=seeded(5), output_type="tokens")
    record.pipe = pipe
    _, seen, _ = record(lambda **o: pipe(PROMPTS, steps=6, generator=seeded(5), output_type="tokens",
                                         mask_schedule="arccos", **o))
    arccos = [max(1, int(64 * math.acos(k / 6) / (math.pi / 2))) for k in range(1, 6)]  # masked after each step
    assert [int((t[0] == MASK_ID).sum()) for _, t in seen][:5] == arccos
    for t in (0.5, (1.3, 0.5)):
        assert not torch.equal(pipe(PROMPTS, steps=6, generator=seeded(5), output_type="tokens",
                                    softmax_temperature=t), reference)


@pytest.mark.parametrize("sampler", ["confidence", "halton"])
@pytest.mark.parametrize("schedule", ["constant", "interval"])
def test_img2img_and_inpainting_with_every_sampler(pipe, sampler, schedule):
    """Image to image keeps the tokens it does not mask and fills the rest; inpainting keeps everything outside the
    mask; both run only the last steps; the result has nothing masked."""
    image, mask = smooth_images(1, 32, 32, seed=8), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 4:20] = 1.0
    record.pipe = pipe
    kw = dict(steps=6, generator=seeded(6), output_type="tokens", sampler=sampler, guidance_schedule=schedule)
    source = pipe.vqvae.encode_to_ids(image)
    out, seen, _ = record(lambda **o: pipe.img2img(PROMPTS, image, strength=0.7, **kw, **o))
    assert [s for s, _ in seen] == [2, 3, 4, 5] and (out != MASK_ID).all()
    # the generator's first draw masks each token with probability cos(pi/2 * 2/6) (the reference's add_noise)
    kept = (torch.rand(1, 8, 8, generator=seeded(6)) >= math.cos(math.pi / 2 * 2 / 6)).expand_as(out)
    assert kept.any() and torch.equal(out[kept], source.expand_as(out)[kept])
    assert not torch.equal(out[~kept], source.expand_as(out)[~kept])
    out, seen, _ = record(lambda **o: pipe.inpaint(PROMPTS, image, mask, **kw, **o))
    outside = ~torch.nn.functional.interpolate(mask, size=(8, 8)).bool()[:, 0].expand_as(out)
    assert torch.equal(out[outside], source.expand_as(out)[outside]) and (out != MASK_ID).all()
    assert not torch.equal(out[~outside], source.expand_as(out)[~outside])


def test_per_image_generators_with_halton(pipe):
    """Each image's roll and draws come from its own generator (sample.py --prompts' determinism)."""
    batch = pipe(["a cat", "a dog"], steps=4, sampler="halton", generator=[seeded(7), seeded(8)], output_type="tokens")
    alone = torch.cat([pipe(p, steps=4, sampler="halton", generator=[seeded(s)], output_type="tokens")
                       for p, s in (("a cat", 7), ("a dog", 8))])
    assert torch.equal(batch, alone)


def test_sampling_counts_per_mode_defaults():
    """sampling.step_plans' schedules: the confidence sampler's counts as before (the reference's), Halton's from
    arccos unless asked otherwise."""
    tokens = torch.full((1, 4, 4), 9)
    plans = sampling.step_plans(Sampler(), tokens, 9, 4, 0, "cosine", 1.0, torch.linspace(2, 0, 4), None)
    assert [int(p[0]) for p in plans] == sampling.sampling_mask_counts(4, 16).tolist()
    plans = sampling.step_plans(Sampler("halton", halton_roll=False), tokens, 9, 4, 1, "arccos", 1.0,
                                torch.linspace(2, 0, 4), None)
    assert plans[0] is None and [int(p[1]) for p in plans[1:]] == halton_reveal_counts(3, torch.tensor([16]))[:, 0].tolist()


def test_an_order_made_while_tracing_is_not_kept():
    """halton_order caches Python ints, not a tensor: one made under FakeTensorMode (compiling, or
    tests/test_cuda_fake.py) and kept would be read as data by a later real run (it crashed the compiled step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        traced = halton_order(5, 7)
    real = halton_order(5, 7)
    assert type(traced) is not torch.Tensor and type(real) is torch.Tensor
    assert real.tolist() == [r * 7 + c for r, c in halton_order_by_definition(5, 7)]
