"""sampling.py: how a masked-token model turns an all-masked grid into an image: the schedules, the samplers and the
one sampling loop (generate). The pipeline (amused.py) builds the starting tokens and the conditions and calls it.

The reference sampler (MUSE, Chang et al. 2023, §2.6; MaskGIT, Chang et al. 2022; diffusers' AmusedScheduler), the
default: each step, the U-ViT predicts a distribution over the codebook at every position; we draw a token at every
masked position, keep the most confident draws and mask the rest again. How many stay masked after step i follows a
schedule (cosine for generation, linear for inpainting). Confidence is the drawn token's probability, noised with
Gumbel noise whose temperature falls from 2 to 0 (randomness early, greed late). Classifier-free guidance runs the
model on [negative prompt; prompt] in one batch and moves the logits away from the negative prompt's:
uncond + g * (cond - uncond). Same seed (a torch.Generator), same tokens as diffusers, drawing the same random
numbers in the same order (tests/test_amused.py).

Beside it, options from the papers that followed, for the same image in fewer U-ViT passes (judged on the digits
model: examples/digits_samplers.py):
  - sampler="halton" (Besnier et al., ICLR 2025): positions revealed in a fixed, evenly spread order, no confidence
    and no re-masking (halton_order, halton_step);
  - guidance schedules (guidance_scales): a ramp that starts unguided (Rojas et al., ICLR 2026), or guidance only
    in the later steps (eMIGM, You et al., ICML 2025); an unguided step runs the U-ViT on the prompts alone, one pass
    instead of two;
  - the arccos masking schedule (MaskGIT's best) and a softmax temperature ramp for the categorical draws;
  - sampler="dimo": the start of a one-step generator distilled by distill.py (Zhu et al., ICCV 2025): random codes
    (uniform and partly masked, or from the teacher's prior), their embeddings perturbed, every position drawn at
    the first step (dimo_start).

Each step draws its random numbers first (draw_step_noise), with the explicit generator; what follows
(sampling_step) is deterministic and sync-free, so that torch.compile captures it whole (speed.compile_step).
"""
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import torch

import uvit

# ----------------------------------------------------------------------------------------------------
# Schedules: pure functions, shared by sampling and training (train.py)

SCHEDULES = ("cosine", "linear", "arccos")


def mask_ratio(progress: torch.Tensor, schedule: str = "cosine") -> torch.Tensor:
    """Fraction of tokens masked at `progress` in [0, 1] (float tensor): 1 at 0, 0 at 1. arccos: MaskGIT's best
    schedule at few steps (Chang et al. 2022, Fig. 3), more masked early than the cosine."""
    if schedule == "cosine":
        return torch.cos(progress * math.pi / 2)
    if schedule == "linear":
        return 1 - progress
    if schedule == "arccos":
        return torch.arccos(progress) / (math.pi / 2)
    raise ValueError(f"unknown masking schedule {schedule!r}; expected one of {SCHEDULES}")


def sampling_mask_counts(steps: int, seq_len: int, schedule: str = "cosine",
                         starting_mask_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """How many of `seq_len` tokens stay masked after each sampling step of `steps`, before the clamps of
    unmask_step: the floor of seq_len * mask_ratio, (steps,) long; 0 after the last step. On the device of
    starting_mask_ratio when it is a tensor (inpainting's masked fraction), so that reading it costs no sync.

    Matches reference: AmusedScheduler.step computes this in float32 tensors: (step + 1) / steps, the cosine,
    the product and the floor. The float32 rounding matters: at steps=12, step=7 the cosine of 2/3 * pi/2 is
    0.49999997, so 127 of 256 tokens stay masked, where float64 would give 128. Each cosine is taken on the CPU, one
    0-d tensor at a time as the reference does, so the counts depend neither on the device's cos nor on a SIMD
    kernel's."""
    ratios = torch.stack([mask_ratio(torch.tensor(step + 1) / steps, schedule) for step in range(steps)])  # float32
    if isinstance(starting_mask_ratio, torch.Tensor):
        ratios = ratios.to(starting_mask_ratio.device)
    counts = (seq_len * (starting_mask_ratio * ratios)).floor().long()
    counts[-1] = 0  # the last step commits every token
    return counts


def training_mask_count(t: torch.Tensor, seq_len: int, min_masking_rate: float = 0.0,
                        schedule: str = "cosine") -> torch.Tensor:
    """How many of seq_len tokens a training example masks at times t (B,) in [0, 1) -> (B,) long, each >= 1:
    seq_len * mask_ratio(t) *rounded* (where the sampler floors), at least min_masking_rate of them.

    Matches reference: train_amused.py: round(L * max(mask_ratio(t), min_masking_rate)), then at least one
    (cos(pi/2 * t) reaches 0 as t -> 1, and an example with nothing masked would have no loss)."""
    ratio = mask_ratio(t, schedule).clamp(min=min_masking_rate)
    return (seq_len * ratio).round().clamp(min=1).long()


def temperature_schedule(temperature, steps: int) -> torch.Tensor:
    """The Gumbel temperature of each of `steps` steps, (steps,) float32: from temperature[0] to temperature[1] for
    a pair, from temperature to 0.01 for a number. Matches reference: AmusedScheduler.set_timesteps."""
    if isinstance(temperature, (tuple, list)):
        return torch.linspace(temperature[0], temperature[1], steps)
    return torch.linspace(temperature, 0.01, steps)


GUIDANCE_SCHEDULES = ("constant", "ramp", "interval")


def guidance_scales(scale: float, steps: int, schedule: str = "constant", guidance_from: float = 0.5) -> list[float]:
    """The classifier-free guidance scale of each of `steps` steps. A step at <= 1 is unguided: it runs the U-ViT on
    the prompts alone, one pass instead of two.
      constant: `scale` at every step (the reference).
      ramp: from 1 (unguided) at the first step linearly up to `scale` at the last. Rojas et al., ICLR 2026
        ("Theory-informed improvements to CFG for discrete diffusion": guidance while nearly everything is masked
        hurts); the `guidance_decay` of bytedance/1d-tokenizer modeling/maskgit.py, whose ramp stops one step short
        of the full scale (ours reaches it at the last step).
      interval: unguided before step round(guidance_from * steps), `scale` from there on. eMIGM (You et al.,
        ICML 2025, arXiv 2503.07197; ML-GSAI/eMIGM): guidance only late in sampling, at nearly no loss."""
    if schedule == "constant":
        return [scale] * steps
    if schedule == "ramp":
        return [1 + (scale - 1) * (k / (steps - 1) if steps > 1 else 1.0) for k in range(steps)]
    if schedule == "interval":
        first = round(guidance_from * steps)
        return [1.0 if k < first else scale for k in range(steps)]
    raise ValueError(f"unknown guidance schedule {schedule!r}; expected one of {GUIDANCE_SCHEDULES}")


def passes_per_image(scales: list[float]) -> int:
    """U-ViT passes per image for the steps of `scales`: 2 for a guided step ([negative; positive]), 1 otherwise."""
    return sum(2 if g > 1 else 1 for g in scales)


# ----------------------------------------------------------------------------------------------------
# The Halton order (Besnier et al., "Halton Scheduler for Masked Generative Image Transformer", ICLR 2025)


def radical_inverse(i: int, base: int) -> Fraction:
    """The i-th point of the van der Corput sequence in `base`: i's digits in that base mirrored about the point,
    exactly (1 -> 1/2, 2 -> 1/4, 3 -> 3/4 in base 2). Halton's sequence pairs two coprime bases."""
    value, scale = Fraction(0), Fraction(1, base)
    while i:
        i, digit = divmod(i, base)
        value += digit * scale
        scale /= base
    return value


def halton_order(h: int, w: int) -> torch.Tensor:
    """Every position of an h x w grid (row-major indices, (h * w,) long) in the order the Halton sampler reveals
    them: the 2-D Halton points (radical_inverse(i, 2), radical_inverse(i, 3)), i = 1, 2, ..., scaled to the grid
    (row = floor(h x the first), column = floor(w x the second)), each position where it first appears.

    Follows valeoai/Halton-MaskGIT, Sampler/halton_sampler.py (build_halton_mask), which takes a fixed 10,000 points
    and a square grid; we take points until every position of any grid is covered, in exact arithmetic."""
    return torch.tensor(halton_positions(h, w))


@lru_cache(maxsize=16)
def halton_positions(h: int, w: int) -> tuple[int, ...]:
    """halton_order's positions as Python ints, cached: a cached tensor would outlive the mode it was made in (a
    FakeTensor made while tracing would later be read as data)."""
    seen, order, i = set(), [], 0
    while len(order) < h * w:
        i += 1
        row, col = int(radical_inverse(i, 2) * h), int(radical_inverse(i, 3) * w)
        if (row, col) not in seen:
            seen.add((row, col))
            order.append(row * w + col)
    return tuple(order)


def halton_ranks(order: torch.Tensor, masked: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each masked position's place among its image's masked positions in the Halton order, the order rolled by
    the image's offset (torch.roll, as the reference's randomize=True); L for positions already committed.
    order: (L,), masked: (B, L) bool, offsets: (B,) long -> (B, L) long."""
    B, L = masked.shape
    rolled = order.to(masked.device)[(torch.arange(L, device=masked.device) - offsets[:, None]) % L]  # (B, L)
    in_order = masked.gather(1, rolled)  # (B, L): is the i-th position of the order masked
    place = in_order.long().cumsum(dim=1) - 1
    return torch.full_like(place, L).scatter(1, rolled, torch.where(in_order, place, L))


def halton_reveal_counts(steps: int, n_masked: torch.Tensor, schedule: str = "arccos") -> torch.Tensor:
    """How many of each image's n_masked (B,) positions are revealed after each of `steps` steps, (steps, B) long:
    max(k + 1, floor(n * (1 - mask_ratio((k + 1) / steps)))), at most n; all of them after the last step.
    Halton-MaskGIT's rule for text to image (n = L), applied to whatever is masked when the run starts."""
    progress = torch.arange(1, steps + 1) / steps  # float32, on the CPU like sampling_mask_counts
    revealed = 1 - mask_ratio(progress, schedule).to(n_masked.device)  # (steps,)
    counts = (n_masked[None, :] * revealed[:, None]).floor().long()  # (steps, B)
    at_least = torch.arange(1, steps + 1, device=n_masked.device)[:, None]  # one position per step
    return torch.minimum(torch.maximum(counts, at_least), n_masked[None, :].long())


# ----------------------------------------------------------------------------------------------------
# A one-step generator's start (Zhu et al., "Di[M]O: Distilling Masked Diffusion Models into One-step Generator",
# ICCV 2025; yuanzhi-zhu/DiMO)


# The student's start, fixed: a student learns to map this distribution to images, so it must be sampled from the
# one it was trained on. DiMO's Meissonic recipe (configs/DIMO_Meissonic.yaml: fixed_ratio 0.5, noise_emb_perturb
# fix_0.3); Meissonic is aMUSEd's text-to-image descendant (its MaskGIT recipe has 0.6 and 0.1).
DIMO_START_MASKED, DIMO_EMBEDDING_NOISE = 0.5, 0.3


def dimo_start(B: int, h: int, w: int, transformer: uvit.UViT, mask_id: int, generator, device: torch.device,
               start_logits: torch.Tensor | None = None, embedding_noise: float = DIMO_EMBEDDING_NOISE):
    """The input a Di[M]O student maps to an image in one pass -> (tokens (B, h, w), the embedding noise for
    UViT.forward, or None at 0). The random codes and the noise are where the image's randomness comes from: a
    one-step draw from an all-masked grid samples every token independently and cannot make a coherent image.

    start_logits None, the paper's start: every token a uniformly random code, round(L * DIMO_START_MASKED) of them
    (at least one), at uniformly random places, masked. start_logits (h0, w0, K), a student distilled with
    `distill.py --start prior` (its file carries them): each code drawn from the softmax of its position's logits
    (the teacher's guess for an all-masked grid), none masked. Then the embedded tokens perturbed by standard normal
    noise.

    Draws, in order, on the generator's device (per image with a list of generators): uniforms (B, L) -> the codes,
    uniforms (B, L) whose argsort places the masks, normals (B, C, h, w). Follows generate_one_step of the reference's
    train_DIMO_*.py (randint codes, a fixed count of masks placed by argsort(rand)), drawn from our generator."""
    L, K = h * w, transformer.cfg.codebook_size
    u = uniform((B, L), generator, device)
    if start_logits is None:
        codes, n_masked = (u * K).long().clamp(max=K - 1), max(1, round(L * DIMO_START_MASKED))
    else:
        cdf = start_distribution(start_logits, h, w).cumsum(-1)  # (L, K)
        # inverse CDF: the first code whose cumulative probability passes u (clamped: the last sum may round < 1)
        codes, n_masked = torch.searchsorted(cdf, u.T.contiguous(), right=True).T.clamp(max=K - 1), 0
    masked = uniform((B, L), generator, device).argsort(dim=-1) < n_masked
    tokens = torch.where(masked, mask_id, codes).view(B, h, w)
    noise = uniform((B, transformer.cfg.block_out_channels, h, w), generator, device, torch.randn)
    noise = noise.to(transformer.embed.conv.weight.dtype)  # the embeddings' dtype: bf16 stays bf16
    return tokens, (embedding_noise, noise) if embedding_noise > 0 else None


def start_distribution(start_logits: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """start_logits (h0, w0, K) -> the start codes' probabilities (h * w, K), float32. At another grid than the
    student was distilled at, the nearest position's: the layout stretched to the new size."""
    logits = start_logits.float()
    if logits.shape[:2] != (h, w):
        logits = torch.nn.functional.interpolate(logits.permute(2, 0, 1)[None], size=(h, w), mode="nearest")
        logits = logits[0].permute(1, 2, 0)
    return logits.reshape(h * w, -1).softmax(-1)


# ----------------------------------------------------------------------------------------------------
# What a sampler is asked to do


SAMPLERS = ("confidence", "halton", "dimo")


@dataclass(frozen=True)
class Sampler:
    """How to draw: the pipelines' sampler keywords, checked. The defaults are the reference's."""
    name: str = "confidence"  # "confidence" (MaskGIT's, the reference), "halton" or "dimo"
    mask_schedule: str | None = None  # None: the mode's own (the checkpoint's for confidence, linear to inpaint;
    #                                   arccos for halton)
    guidance_schedule: str = "constant"  # GUIDANCE_SCHEDULES
    guidance_from: float = 0.5  # interval: the fraction of the steps that runs unguided
    softmax_temperature: float | tuple[float, float] = 1.0  # of the categorical draws; a pair ramps first -> last
    halton_roll: bool = True  # halton: each image's order rolled by an offset drawn from its generator

    def __post_init__(self):
        pair = self.softmax_temperature if isinstance(self.softmax_temperature, tuple) else (self.softmax_temperature,)
        checks = [
            ("sampler", self.name in SAMPLERS, f"must be one of {SAMPLERS}", self.name),
            ("mask_schedule", self.mask_schedule in (None, *SCHEDULES), f"must be None or one of {SCHEDULES}",
             self.mask_schedule),
            ("guidance_schedule", self.guidance_schedule in GUIDANCE_SCHEDULES,
             f"must be one of {GUIDANCE_SCHEDULES}", self.guidance_schedule),
            ("guidance_from", isinstance(self.guidance_from, (int, float)) and 0 <= self.guidance_from <= 1,
             "must be in [0, 1]", self.guidance_from),
            ("softmax_temperature", len(pair) in (1, 2) and all(isinstance(t, (int, float)) and 0 < t < math.inf
                                                              for t in pair),
             "must be a positive finite number or a pair (first step, last step)", self.softmax_temperature),
            ("halton_roll", isinstance(self.halton_roll, bool), "must be True or False", self.halton_roll),
        ]
        for key, ok, why, value in checks:
            if not ok:
                raise ValueError(f"{key} {why}, got {value!r}")

    def softmax_temperatures(self, steps: int) -> torch.Tensor | None:
        """(steps,) float32, or None at the reference's 1.0 (so that its logits are not even divided by 1)."""
        t = self.softmax_temperature
        if t == 1.0 or t == (1.0, 1.0):
            return None
        return torch.linspace(*t, steps) if isinstance(t, tuple) else torch.full((steps,), float(t))


# ----------------------------------------------------------------------------------------------------
# One sampling step: its random numbers, then the token choice of each sampler


class StepNoise(NamedTuple):
    """The random numbers of one sampling step, in the order the reference draws them."""
    exponential: torch.Tensor  # (B * L, K) Exp(1): the categorical draw at every position (sample_categorical)
    uniform: torch.Tensor | None  # (B, L) in [0, 1): the Gumbel noise of the confidence; None when not needed


Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per image


def draw_step_noise(B: int, L: int, K: int, dtype: torch.dtype, device: torch.device, generator: Generators,
                    uniforms: bool) -> StepNoise:
    """Draw step noise on the generator's device (so a CPU generator gives diffusers' CPU draws anywhere), then
    move it to `device`. dtype: the logits'. uniforms: whether to draw the confidence's uniforms (not on the last
    step of the confidence sampler, which re-masks nothing, nor for the Halton sampler). With a list of B
    generators, image i's noise comes from generator i alone, drawn as a batch of one would draw it: an image then
    depends on its generator only, not on the batch.

    Matches reference: AmusedScheduler.step moves the probabilities to the generator's device and, on the CPU,
    to float32 (torch.multinomial has no CPU half): the exponentials are float32 on the CPU, in the logits' dtype
    elsewhere. The uniforms come from scheduling_amused.gumbel_noise: uniform_ in the logits' dtype (so fp16 runs
    draw fp16 uniforms)."""
    if isinstance(generator, list):
        per_image = [draw_step_noise(1, L, K, dtype, device, g, uniforms) for g in generator]
        return StepNoise(torch.cat([n.exponential for n in per_image]),
                         torch.cat([n.uniform for n in per_image]) if uniforms else None)
    where = generator.device if generator is not None else device
    exp_dtype = torch.float32 if where.type == "cpu" else dtype
    q = torch.empty(B * L, K, dtype=exp_dtype, device=where).exponential_(1, generator=generator)
    u = torch.zeros(B, L, dtype=dtype, device=where).uniform_(0, 1, generator=generator) if uniforms else None
    return StepNoise(q.to(device), None if u is None else u.to(device))


def uniform(shape: tuple[int, ...], generator: Generators, device: torch.device, draw=torch.rand) -> torch.Tensor:
    """torch.rand(shape) (or `draw`, e.g. torch.randn) on the generator's device, then moved to `device`; with a
    list of generators, row i from generator i, as a batch of one would draw it."""
    if isinstance(generator, list):
        return torch.cat([uniform((1, *shape[1:]), g, device, draw) for g in generator])
    where = generator.device if generator is not None else device
    return draw(shape, generator=generator, device=where).to(device)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniforms u. Matches reference: clamped away from 0 before each log."""
    return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))


def sample_categorical(probs: torch.Tensor, exponential: torch.Tensor) -> torch.Tensor:
    """One draw from each row of probs (N, K) -> (N, 1), given exponential = Exp(1) noise (N, K):
    torch.multinomial(probs, 1, generator=g) exactly, when exponential was drawn from g as draw_step_noise does.

    multinomial draws one sample by the Gumbel-max trick (its n_sample == 1 path in ATen's Distributions.cpp):
    q ~ Exp(1) for every entry, then argmax(probs / q). We do the same operations, so the random numbers, their
    order and the result are the same, but skip its two validity checks, which read values back to the host: a
    sync every step on a GPU. Non-finite logits are caught once per generation instead (generate).
    """
    return (probs / exponential).argmax(dim=-1, keepdim=True)


def unmask_step(logits, tokens, noise: StepNoise, n_masked: torch.Tensor, temperature: torch.Tensor, *,
                mask_id: int) -> torch.Tensor:
    """The confidence sampler (MaskGIT; diffusers AmusedScheduler.step): sample every masked position, then
    re-mask the least confident ones.

    logits: (B, K, h, w) guided logits over the codebook; tokens: (B, h, w) long, mask_id where masked; noise:
    draw_step_noise's; n_masked: 0-d, how many the schedule leaves masked (sampling_mask_counts); temperature: 0-d,
    this step's Gumbel temperature. Returns the new tokens (B, h, w).
    """
    B, K, h, w = logits.shape
    L = h * w
    tokens = tokens.reshape(B, L)
    logits = logits.reshape(B, K, L).permute(0, 2, 1)  # (B, L, K)
    masked = tokens == mask_id  # (B, L)
    probs = logits.softmax(dim=-1)  # (B, L, K), in the model's dtype like the reference

    # A candidate for every position; committed tokens never change.
    pred = sample_categorical(probs.reshape(B * L, K), noise.exponential).view(B, L)
    pred = torch.where(masked, pred, tokens)
    if noise.uniform is None:
        return pred.view(B, h, w)  # the last step commits everything

    # How many to re-mask: the schedule's count, but fewer than are masked now, and at least one.
    n_remask = torch.minimum(masked.sum(dim=-1, keepdim=True) - 1, n_masked).clamp(min=1)  # (B, 1)

    # Confidence: log-probability of the sampled token plus annealed Gumbel noise; committed tokens get the
    # largest finite value so they are never chosen for re-masking.
    chosen = probs.gather(-1, pred[..., None])[..., 0]  # (B, L)
    chosen = torch.where(masked, chosen, torch.finfo(chosen.dtype).max)
    # Matches reference: the temperature is a float32 (1, 1) tensor there, so in fp16 runs the confidence is
    # promoted to float32 (a 0-d tensor would not promote).
    confidence = torch.log(chosen.clamp(1e-20)) + temperature.reshape(1, 1) * gumbel(noise.uniform)
    cutoff = confidence.sort(dim=-1).values.gather(1, n_remask)  # the n-th smallest confidence, (B, 1)
    return torch.where(confidence < cutoff, mask_id, pred).view(B, h, w)


def halton_step(logits, tokens, noise: StepNoise, ranks: torch.Tensor, n_revealed: torch.Tensor, *,
                mask_id: int) -> torch.Tensor:
    """The Halton sampler (Besnier et al. 2025; valeoai/Halton-MaskGIT, Sampler/halton_sampler.py): draw a token
    at the positions the Halton order reveals by this step, from the softmax of the logits; no confidence, nothing
    re-masked, committed tokens kept. (The reference code draws again at every revealed position each step; aMUSEd
    is trained on masked positions only, so its predictions at committed ones mean nothing: we keep them.)

    ranks: (B, L), halton_ranks; n_revealed: (B,), how many of each image's masked positions are revealed after
    this step (halton_reveal_counts). Returns the new tokens (B, h, w)."""
    B, K, h, w = logits.shape
    L = h * w
    tokens = tokens.reshape(B, L)
    probs = logits.reshape(B, K, L).permute(0, 2, 1).softmax(dim=-1)  # (B, L, K)
    pred = sample_categorical(probs.reshape(B * L, K), noise.exponential).view(B, L)
    reveal = (ranks < n_revealed[:, None]) & (tokens == mask_id)  # (B, L): this step's share of the order
    return torch.where(reveal, pred, tokens).view(B, h, w)


def dimo_first_step(logits, tokens, noise: StepNoise, n_masked: torch.Tensor, temperature: torch.Tensor, *,
                    mask_id: int) -> torch.Tensor:
    """The first step from dimo_start's tokens: their codes are noise, not commitments, so every position is drawn
    (then, with more steps to come, the least confident re-masked), as unmask_step does for an all-masked grid."""
    return unmask_step(logits, torch.full_like(tokens, mask_id), noise, n_masked, temperature, mask_id=mask_id)


def sampling_step(transformer: uvit.UViT, conds: uvit.Conditions, tokens: torch.Tensor, noise: StepNoise,
                  plan: tuple[torch.Tensor, ...], guidance: float | torch.Tensor | None,
                  softmax_temperature: torch.Tensor | None, *, mask_id: int, choose=unmask_step,
                  embedding_noise: tuple[float, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on tokens (B, h, w) -> (new tokens (B, h, w), whether every logit was finite (0-d bool)).
    No random draws and no host syncs: speed.compile_step captures it whole (fullgraph).

    guidance: the scale, or None for an unguided step (conds then hold the prompts alone); a Python float keeps the
    reference's arithmetic, a 0-d tensor lets one compiled graph serve a schedule of scales. softmax_temperature:
    0-d, or None for the reference's 1. choose: the sampler's token choice (unmask_step, halton_step), given
    plan: its per-step inputs. embedding_noise: (scale, (B, C, h, w)) at a dimo start's step, else None."""
    # 1. Logits over the codebook at every position; with guidance, one batch [negative; positive].
    inputs = tokens if guidance is None else torch.cat([tokens, tokens])
    if guidance is not None and embedding_noise is not None:
        embedding_noise = (embedding_noise[0], torch.cat([embedding_noise[1]] * 2))
    logits = transformer(inputs, conds, embedding_noise)  # (2B or B, K, h, w)
    # 2. Classifier-free guidance: away from the negative prompt's prediction, towards the prompt's.
    if guidance is not None:
        uncond, cond = logits.chunk(2)
        logits = uncond + guidance * (cond - uncond)  # (B, K, h, w)
    # NaN or +inf logits make NaN probabilities, which torch.multinomial would reject with a host-side check
    # every step (sample_categorical skips it): the same test, kept on the device.
    finite = logits.amax() < math.inf
    if softmax_temperature is not None:
        logits = logits / softmax_temperature
    # 3. The sampler's choice: which positions get a token now, which stay (or become again) masked.
    return choose(logits, tokens, noise, *plan, mask_id=mask_id), finite


# ----------------------------------------------------------------------------------------------------
# The sampling loop


def step_plans(sampler: Sampler, tokens: torch.Tensor, mask_id: int, steps: int, start: int, schedule: str,
               starting_mask_ratio: float | torch.Tensor, temperatures: torch.Tensor,
               generator: Generators) -> list[tuple[torch.Tensor, ...]]:
    """Each step's inputs to the sampler's choice, on the tokens' device before the loop (nothing inside it reads
    back to the host): plans[step] for step in start..steps-1 (None before start).
    confidence and dimo: (how many stay masked, the Gumbel temperature). halton: (the ranks, how many are
    revealed)."""
    device = tokens.device
    if sampler.name in ("confidence", "dimo"):
        counts = sampling_mask_counts(steps, tokens[0].numel(), schedule, starting_mask_ratio).to(device)
        temperatures = temperatures.to(device)
        return [None] * start + [(counts[k], temperatures[k]) for k in range(start, steps)]
    B, L = tokens.shape[0], tokens[0].numel()
    masked = tokens.reshape(B, L) == mask_id
    # the roll's draw comes before any step's: one uniform per image, as Halton-MaskGIT's randint
    offsets = ((uniform((B,), generator, device) * L).long().clamp(max=L - 1) if sampler.halton_roll
               else torch.zeros(B, dtype=torch.long, device=device))
    ranks = halton_ranks(halton_order(*tokens.shape[1:]), masked, offsets)
    revealed = halton_reveal_counts(steps - start, masked.sum(dim=1), schedule)  # (steps - start, B)
    return [None] * start + [(ranks, revealed[k - start]) for k in range(start, steps)]


@torch.no_grad()
def generate(transformer: uvit.UViT, conds: uvit.Conditions, tokens: torch.Tensor, *, mask_id: int, steps: int,
             start: int = 0, guidance_scale: float = 10.0, temperatures: torch.Tensor, schedule: str = "cosine",
             starting_mask_ratio: float | torch.Tensor = 1.0, generator: Generators = None,
             sampler: Sampler = Sampler(), start_logits: torch.Tensor | None = None, callback=None,
             step_fn=sampling_step) -> torch.Tensor:
    """Steps start..steps-1 of a `steps`-step schedule on tokens (B, h, w), mask_id where masked -> the final
    tokens (B, h, w), none masked. Text to image starts at 0 from an all-masked grid; image to image and
    inpainting start later, from an image's tokens with some masked. The dimo sampler replaces an all-masked start
    by dimo_start's; from an image's tokens it is the confidence sampler.

    conds: the U-ViT's conditions for [negative prompts; prompts] (2B) when any step is guided, else for the
    prompts (B). temperatures: (steps,), the Gumbel temperature of each step (confidence sampler). schedule: the
    masking schedule, unless sampler.mask_schedule says another. start_logits: the dimo start's code distribution
    (dimo_start), None for the paper's. callback(step, tokens) after every step.
    step_fn: sampling_step, or the same compiled (speed.compile_step).
    """
    B, h, w = tokens.shape
    K, dtype = transformer.cfg.codebook_size, transformer.mlm_layer.conv2.weight.dtype  # the logits' size and dtype
    scales = guidance_scales(guidance_scale, steps, sampler.guidance_schedule, sampler.guidance_from)
    scheduled = sampler.guidance_schedule != "constant"
    # the steps run unguided see the prompts alone: the second half of [negative; positive] (views)
    prompts_only = conds.rows(B, 2 * B) if conds.batch_size == 2 * B else conds
    halton = sampler.name == "halton"
    schedule = sampler.mask_schedule or ("arccos" if halton else schedule)
    plans = step_plans(sampler, tokens, mask_id, steps, start, schedule, starting_mask_ratio, temperatures, generator)
    # On the device before the loop, like the plans: a scheduled guidance scale as a 0-d tensor (one compiled graph
    # for every scale of the schedule), the constant one as the reference's Python float.
    guidances = [None if g <= 1.0 else g for g in scales]  # matches reference: guidance only when strictly above 1
    if scheduled:
        on_device = torch.tensor(scales, device=tokens.device)
        guidances = [None if g is None else on_device[k] for k, g in enumerate(guidances)]
    softmax_temperatures = sampler.softmax_temperatures(steps)
    softmax_temperatures = [None] * steps if softmax_temperatures is None else softmax_temperatures.to(tokens.device)
    choose = [halton_step if halton else unmask_step] * steps
    embedding_noise = None
    if sampler.name == "dimo" and start == 0:
        tokens, embedding_noise = dimo_start(B, h, w, transformer, mask_id, generator, tokens.device, start_logits)
        choose[0] = dimo_first_step
    finite = torch.ones((), dtype=torch.bool, device=tokens.device)  # read once, after the loop
    for step in range(start, steps):
        noise = draw_step_noise(B, h * w, K, dtype, tokens.device, generator,
                                uniforms=not halton and step < steps - 1)
        tokens, step_finite = step_fn(transformer, prompts_only if guidances[step] is None else conds, tokens, noise,
                                      plans[step], guidances[step], softmax_temperatures[step], mask_id=mask_id,
                                      choose=choose[step], embedding_noise=embedding_noise if step == 0 else None)
        finite &= step_finite
        if callback is not None:
            callback(step, tokens)
    if not finite:
        why = ("in float16 an overflow: rerun in torch.bfloat16 or torch.float32" if dtype == torch.float16
               else "check that the weights, guidance_scale and micro-conditioning are finite")
        raise FloatingPointError(f"the U-ViT's logits were NaN or infinite at some step ({dtype}; {why})")
    return tokens
