r"""distill.py: an aMUSEd image in one U-ViT pass: distil a teacher's many-step sampler into a one-step student
(Di[M]O), from prompts alone, no training images.

    python distill.py --teacher runs/digits/model.safetensors --prompts captions.txt --out runs/student
    torchrun --nproc_per_node 8 distill.py --teacher amused/amused-256 --prompts prompts.txt --out runs/student256 \
        --lr 1e-6 --batch-size 2 --max-steps 20000 --ema --mixed-precision bf16 --gradient-checkpointing  # [--lora]
    python distill.py ... --resume                      # continue the run saved in --out exactly where it stopped
    python sample.py --checkpoint runs/student/model.safetensors "a prompt"       # one step, no flags needed

The method (Zhu, Wang, Lathuiliere, Kalogeiton, "Di[M]O: Distilling Masked Diffusion Models into One-step
Generator", ICCV 2025, arXiv 2503.15457; code yuanzhi-zhu/DiMO, train_DIMO_Meissonic.py, whose names we give):
  - The student starts as a copy of the teacher. It maps an initial state to tokens in one forward pass: every
    token a random code, half of them masked, the embeddings perturbed by Gaussian noise (sampling.dimo_start, the
    same function the pipeline's sampler="dimo" draws with). Its output is drawn from the softmax (temperature 1).
  - Token-level distribution matching. The student's draw x is re-masked at a random ratio (cosine of a uniform,
    clamped to [0.02, 0.98], the count rounded: get_mask_code) into x_t. The teacher, with classifier-free guidance
    against the empty prompt, and an auxiliary ("fake") model, unguided, both predict x_t's masked tokens. The
    student's logits at those positions are moved along p_fake - p_true, the gradient of the forward KL
    KL(p_true || p_fake) with respect to the logits (distil_loss_type Jeffreys_0. = FKL; --divergence mixes in the
    reverse KL as its Jeffreys_<beta>), through the surrogate
    loss 0.5 * |logits - sg(logits - grad)|^2 summed over positions and codes, divided by the batch size.
  - The auxiliary model, also a copy of the teacher, learns online what the student draws: on a fresh draw,
    re-masked the same way, the masked-token cross-entropy (label smoothing 0.1, mean over masked tokens), with
    the prompts (fake_cfg_train 1: no prompt dropout). Each step: one update of the student, then --fake-rounds
    (fake_rounds; 1 in the reference's runs) of the auxiliary model, each on new prompts and a new draw.
  - The token embedding and the output layer (embed, mlm_layer) of both stay frozen (fix_emb_layer); Adam, no
    weight decay, a linear warm-up (100 steps), then constant (lr_scheduler constant_with_warmup).
  - The reference's other knobs, as options whose defaults are its runs' (Objective): --teacher-temperature
    (true_temp: the teacher's guided logits divided by it), --adaptive-guidance (adaptive_cfg: the scale
    1 + (guidance - 1) r at a re-masked fraction r), --auxiliary-soft (alpha_fake: the auxiliary model also learns
    the student's softmax, by KL, mean over codes), --student-temperature (gen_temp: the student draws at it).
Departures, and why:
  - Prompts are drawn with replacement from the prompt list, by a generator seeded from (--seed, step, process),
    not from a shuffled loader: a resumed run or another process count draws the same prompts, as train.py's data.
  - The teacher's negative prompt is the empty one, what aMUSEd was trained to drop prompts to (the reference's
    Meissonic run has a tuned negative prompt).
  - No NaN filtering: the reference zeroes non-finite gradients; here a non-finite loss stops the run, saying so (a
    silently zeroed step hides a broken run). The gradient clipping is the reference's: the student's gradient norm
    clipped at 1 under --mixed-precision fp16 or bf16 only, the auxiliary model's never.
  - LoRA mode (--lora): the student and the auxiliary model are LoRA adapters (train.py's) on the teacher's weights,
    shared, not copied: one U-ViT in memory instead of three (the reference trains full copies).
  - EMA off by default (the reference keeps 0.9999): a digits run is 1,500 steps, where an EMA of that decay
    would still be the teacher. --ema turns it on.
  - --start prior (an option; the default is the paper's uniform start): the start's codes drawn, per position,
    from the teacher's own prediction for an all-masked grid and the empty prompt, none masked. Uniform codes are
    unlike any grid the teacher has seen; from these the one-step student's tokens agree with each other far more
    often (on the digits: accuracy 0.69 -> 0.87, Frechet 385 -> 222). The student's file carries the logits
    (h, w, K), so that the sampler draws the same start.
  - --auxiliary-soft's target is the softmax the student's tokens are drawn from (at --student-temperature); the
    reference divides by a separate temperature_fake (1 in its configs): the same whenever gen_temp is 1.
  - The adaptive guidance's r is the fraction actually re-masked (the rounded count over L), not the drawn ratio.
  - No gradient accumulation: the reference's Meissonic run accumulates 8 batches of 2 on one GPU; here the same
    16 is 2 per process on 8 processes (README, "One pass").

Memory, weights and optimizer state only (P: the U-ViT's parameters; fp32 master weights, Adam's two moments):
full: teacher P + student P (+ gradient P + Adam 2P) + auxiliary P (+ P + 2P) = 9P floats; LoRA: P, plus the
adapters'. For amused-256 (P = 604 M): 21.7 GB full, 2.6 GB LoRA (README, "One pass"; bench/distill_memory.py).

Output, in --out: checkpoint.pt (--resume; every --save-every steps, at the end and on Ctrl-C), model.safetensors
(the student as a whole pipeline, with its sampling defaults in the metadata: sampler dimo, 1 step, no guidance;
Amused.from_pretrained, sample.py and the playground load it), log.jsonl (the progress lines as JSON).
Ctrl-C or SIGTERM finishes the step, saves and exits with 130; a second Ctrl-C quits without saving.
"""
import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
import sampling
import train
import uvit
from amused import Amused
from cli import UsageError
from convert_weights import CheckpointError
from data import seed_of

STATE_FILE, MODEL_FILE, LOG_FILE = "checkpoint.pt", "model.safetensors", "log.jsonl"
STATE_VERSION = 1  # of distill.py's checkpoint.pt
# --start: the paper's, or codes from the teacher's prior (teacher_start_logits); as the settings line says them
STARTS_SAID = {"uniform": "uniform codes, half masked", "prior": "codes of the teacher's prior, none masked"}
STARTS = tuple(STARTS_SAID)
FROZEN = ("embed", "mlm_layer")  # the reference's fix_emb_layer: the token embedding and the output layer
STUDENT_DEFAULTS = {"sampler": "dimo", "steps": 1, "guidance_scale": 1.0}  # carried by the student's file
LABEL_SMOOTHING = 0.1  # of the auxiliary model's cross-entropy, as the reference
REMASK_RANGE = (0.02, 0.98)  # get_mask_code's r_min, r_max: the fraction of a draw re-masked
MAX_GRAD_NORM = 1.0  # max_grad_norm: the student's gradient norm is clipped at this in fp16/bf16 (not in fp32)


# ----------------------------------------------------------------------------------------------------
# The objective


def remask(tokens: torch.Tensor, mask_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's get_mask_code: per image a ratio cos(pi/2 * u), u ~ U(0, 1), clamped to REMASK_RANGE, of its
    tokens masked (the count rounded, at least 1), at uniformly random places. tokens: (B, h, w) -> (masked tokens
    (B, h, w), where masked (B, h, w) bool). Draws on the generator's device: u (B,), then uniforms (B, L)."""
    B, h, w = tokens.shape
    u = torch.rand(B, generator=generator, device=generator.device)
    n = (h * w * sampling.mask_ratio(u).clamp(*REMASK_RANGE)).round().clamp(min=1).long()  # (B,)
    ranks = torch.rand(B, h * w, generator=generator, device=generator.device).argsort(dim=-1)
    masked = (ranks < n[:, None]).view(B, h, w).to(tokens.device)
    return torch.where(masked, mask_id, tokens), masked


def flat_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) -> (B, L, K), positions row-major, in float32 for the losses."""
    B, K = logits.shape[:2]
    return logits.reshape(B, K, -1).permute(0, 2, 1).float()


def student_draw(student, conds: uvit.Conditions, B: int, grid: tuple[int, int], mask_id: int, temperature: float,
                 start_logits: torch.Tensor | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-step generator: its start (sampling.dimo_start, from start_logits: None, the paper's), one pass, a
    draw at every position from the softmax at temperature. -> (logits (B, L, K) float32, with the graph when grad
    is on; the probabilities drawn from (B, L, K); the drawn tokens (B, h, w))."""
    h, w = grid
    module = student.module if hasattr(student, "module") else student  # DDP's wrapped U-ViT
    start, noise = sampling.dimo_start(B, h, w, module, mask_id, generator, conds.cond.device, start_logits)
    logits = flat_logits(student(start, conds, noise))  # (B, L, K)
    K = logits.shape[-1]
    exponential = torch.empty(B * h * w, K, device=generator.device).exponential_(1, generator=generator)
    probs = (logits.detach() / temperature).softmax(-1)
    drawn = sampling.sample_categorical(probs.view(-1, K), exponential.to(logits.device))
    return logits, probs, drawn.view(B, h, w)


@dataclass(frozen=True)
class Objective:
    """What the student is moved towards. The reference's names in brackets."""
    guidance: float = 4.0  # the teacher's classifier-free guidance scale against the empty prompt (true_cfg)
    adaptive_guidance: bool = False  # the scale ramped with the re-masked fraction r: 1 + (guidance - 1) r
    #                                  (adaptive_cfg)
    teacher_temperature: float = 1.0  # the teacher's guided logits divided by this (true_temp)
    divergence: float = 0.0  # the reverse KL's weight, the forward KL's 1 - this (distil_loss_type Jeffreys_<beta>)
    auxiliary_soft: float = 0.0  # the auxiliary model's target: the student's softmax with this weight, the drawn
    #                               tokens with 1 - this (alpha_fake)
    student_temperature: float = 1.0  # the student draws from its softmax at this temperature (gen_temp)


def guidance_scales(objective: Objective, masked: torch.Tensor) -> torch.Tensor:
    """The teacher's guidance scale per image (B,) for re-masked positions masked (B, h, w)."""
    g = torch.full((masked.shape[0],), objective.guidance, device=masked.device)
    return 1 + (g - 1) * masked.flatten(1).float().mean(1) if objective.adaptive_guidance else g


@torch.no_grad()
def guided_logits(model: uvit.UViT, tokens: torch.Tensor, conds: uvit.Conditions,
                  guidance: torch.Tensor | None) -> torch.Tensor:
    """The model's logits (B, L, K) for tokens (B, h, w): with guidance (B,) scales, conds are [negative; prompts]
    (2B) and the result uncond + guidance * (cond - uncond), as the sampler (sampling.sampling_step); with None,
    conds are B."""
    if guidance is None:
        return flat_logits(model(tokens, conds))
    uncond, cond = flat_logits(model(torch.cat([tokens, tokens]), conds)).chunk(2)
    return uncond + guidance.view(-1, 1, 1) * (cond - uncond)


def divergence_gradient(true_logits: torch.Tensor, fake_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """The gradient with respect to the logits of (1 - beta) KL(p_true || p_fake) + beta KL(p_fake || p_true), per
    position: p_fake - p_true for the forward KL (mode covering), p_fake * (log p_fake - log p_true - KL) for the
    reverse one (mode seeking). The reference's distil_loss_type Jeffreys_<beta>. (B, L, K) each."""
    p_true, p_fake = true_logits.softmax(-1), fake_logits.softmax(-1)
    forward = p_fake - p_true
    if beta == 0:
        return forward
    log_ratio = fake_logits.log_softmax(-1) - true_logits.log_softmax(-1)
    reverse = p_fake * (log_ratio - (p_fake * log_ratio).sum(-1, keepdim=True))
    return (1 - beta) * forward + beta * reverse


def distribution_matching_loss(logits: torch.Tensor, true_logits: torch.Tensor, fake_logits: torch.Tensor,
                               masked: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """The student's loss, whose gradient with respect to its logits (B, L, K) is divergence_gradient at the
    re-masked positions (masked (B, h, w)) and 0 elsewhere, divided by B: the reference's surrogate,
    0.5 * mse(logits, sg(logits - grad), reduction sum) / B."""
    grad = divergence_gradient(true_logits, fake_logits, beta)  # (B, L, K), no graph: both came without
    grad = torch.where(masked.view(masked.shape[0], -1, 1), grad, 0.0)
    return 0.5 * F.mse_loss(logits, (logits - grad).detach(), reduction="sum") / logits.shape[0]


def auxiliary_loss(fake, tokens: torch.Tensor, probs: torch.Tensor, conds: uvit.Conditions, mask_id: int,
                   soft: float, generator: torch.Generator) -> torch.Tensor:
    """The auxiliary model's loss on the student's draw tokens (B, h, w), drawn from its softmax probs (B, L, K):
    re-masked (remask), at the masked positions the cross-entropy against the drawn tokens (label smoothing 0.1)
    and, weighted by soft, the KL from the student's softmax (mean over codes, as the reference), both means
    over the masked positions. Both have the same minimiser, the student's distribution given x_t; the soft one
    with less noise: it averages over the draws the hard one samples."""
    x_t, masked = remask(tokens, mask_id, generator)
    logits = flat_logits(fake(x_t, conds))  # (B, L, K)
    labels = torch.where(masked, tokens, train.IGNORE)
    hard = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=train.IGNORE,
                           label_smoothing=LABEL_SMOOTHING)
    if soft == 0:
        return hard
    kl = F.kl_div(logits.log_softmax(-1), probs, reduction="none").mean(-1)  # (B, L)
    return soft * kl[masked.flatten(1)].mean() + (1 - soft) * hard


# ----------------------------------------------------------------------------------------------------
# The three models


def shared_copy(model: uvit.UViT) -> uvit.UViT:
    """A U-ViT whose weights are `model`'s tensors, not copies: where LoRA adapters go on a shared frozen base."""
    with torch.device("meta"):
        twin = uvit.UViT(model.cfg)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.requires_grad_(False)


def trainable_copy(teacher: uvit.UViT, lora: bool, rank: int, alpha: float,
                   targets: list[str]) -> tuple[uvit.UViT, dict[str, torch.nn.Parameter]]:
    """The student or the auxiliary model, started from the teacher -> (the model, its parameters to train by name):
    a full copy with embed and mlm_layer frozen, or LoRA adapters on the teacher's own (shared, frozen) weights."""
    if lora:
        model = shared_copy(teacher)
        train.add_lora(model, rank, alpha, targets)
    else:
        model = copy.deepcopy(teacher).requires_grad_(True)
        for name in FROZEN:
            getattr(model, name).requires_grad_(False)
    return model.train(), {n: p for n, p in model.named_parameters() if p.requires_grad}


def merged(student: uvit.UViT) -> uvit.UViT:
    """The student as a plain U-ViT: a copy, its LoRA adapters (if any) folded into the weights."""
    plain = copy.deepcopy(student)
    train.merge_lora(plain)
    return plain.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Prompts and conditions


def read_prompts(prompts_file: str | None, prompt: str | None) -> list[str]:
    """The prompts to distil on: a text file, one per line (blank lines skipped), or the one --prompt."""
    if (prompts_file is None) == (prompt is None):
        raise UsageError("give the prompts to distil on: --prompts FILE (one per line) or --prompt TEXT, not both")
    if prompt is not None:
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file (a text file, one prompt per line)")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts {path}: not UTF-8 text ({e})") from e
    prompts = [line for line in lines if line]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompt (one per line)")
    return prompts


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Every draw of one process's step comes from this: (seed, step, rank) fix them, so a resumed run continues
    exactly. On the CPU, whatever the device, like the pipeline's generators."""
    return torch.Generator().manual_seed(seed_of("distill", seed, step, rank))


@dataclass
class PromptBatch:
    hidden: torch.Tensor  # (B, 77, D) the prompts' CLIP hidden states
    pooled: torch.Tensor  # (B, P)
    micro: torch.Tensor  # (B, 5) the micro-conditioning: the model's size, no crop, aesthetic score 6


@torch.no_grad()
def prompt_batch(pipe: Amused, prompts: list[str], B: int, generator: torch.Generator) -> PromptBatch:
    """B prompts drawn with replacement, encoded by the frozen text encoder."""
    chosen = torch.randint(len(prompts), (B,), generator=generator).tolist()
    hidden, pooled = pipe.encode_prompt([prompts[i] for i in chosen])
    return PromptBatch(hidden, pooled, micro_conditions(pipe, hidden.dtype, B))


def micro_conditions(pipe: Amused, dtype: torch.dtype, B: int) -> torch.Tensor:
    """(B, 5): the model's own size, no crop, aesthetic score 6, for every image."""
    micro = torch.tensor([pipe.resolution, pipe.resolution, 0, 0, 6.0], dtype=dtype, device=pipe.device)
    return micro.expand(B, -1)


@torch.no_grad()
def teacher_start_logits(pipe: Amused, empty: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """--start prior: the teacher's (pipe's U-ViT's) logits (h, w, K) for an all-masked grid and the empty prompt
    (empty: its encoding): at each position, the codes it expects before it has seen anything. The student's start
    codes are drawn from them (sampling.dimo_start) instead of uniformly, and its file carries them for the sampler."""
    teacher = pipe.transformer
    size = teacher.cfg.sample_size
    ids = torch.full((1, size, size), pipe.mask_id, device=pipe.device)
    logits = teacher(ids, teacher.encode_conditions(*empty, micro_conditions(pipe, empty[0].dtype, 1)))  # (1, K, h, w)
    return logits[0].permute(1, 2, 0).float().contiguous()


@torch.no_grad()
def teacher_conditions(teacher: uvit.UViT, batch: PromptBatch, empty: tuple[torch.Tensor, torch.Tensor],
                       guided: bool) -> uvit.Conditions:
    """The teacher's conditions: [empty prompt; prompts] (2B) when guided, the prompts alone otherwise."""
    if not guided:
        return teacher.encode_conditions(batch.hidden, batch.pooled, batch.micro)
    B = batch.hidden.shape[0]
    hidden = torch.cat([empty[0].expand(B, -1, -1), batch.hidden])
    pooled = torch.cat([empty[1].expand(B, -1), batch.pooled])
    return teacher.encode_conditions(hidden, pooled, torch.cat([batch.micro, batch.micro]))


# ----------------------------------------------------------------------------------------------------
# One step


@dataclass
class Models:
    teacher: uvit.UViT
    student: torch.nn.Module  # the student U-ViT, wrapped in DDP under torchrun
    fake: torch.nn.Module  # the auxiliary model, likewise
    student_raw: uvit.UViT  # the U-ViTs themselves: conditions, and draws that need no gradient
    fake_raw: uvit.UViT
    start_logits: torch.Tensor | None  # the student's start codes' logits (h, w, K) with --start prior, else None


def student_gradients(m: Models, pipe: Amused, batch: PromptBatch, empty, objective: Objective,
                      generator: torch.Generator, autocast, scaler: torch.amp.GradScaler) -> float:
    """The student's gradients of one step: draw, re-mask, and move its logits towards the teacher's guided
    prediction, away from the auxiliary model's (DDP averages them over the processes; scaler: fp16 loss scaling, a
    no-op otherwise). -> its loss."""
    B, grid = batch.hidden.shape[0], (m.teacher.cfg.sample_size,) * 2
    guided = objective.guidance > 1
    with autocast:
        conds = m.student_raw.encode_conditions(batch.hidden, batch.pooled, batch.micro)
        logits, _, drawn = student_draw(m.student, conds, B, grid, pipe.mask_id, objective.student_temperature,
                                        m.start_logits, generator)
        x_t, masked = remask(drawn, pipe.mask_id, generator)
        true_logits = guided_logits(m.teacher, x_t, teacher_conditions(m.teacher, batch, empty, guided),
                                    guidance_scales(objective, masked) if guided else None)
        with torch.no_grad():
            fake_conds = m.fake_raw.encode_conditions(batch.hidden, batch.pooled, batch.micro)
            fake_logits = flat_logits(m.fake_raw(x_t, fake_conds))
    loss = distribution_matching_loss(logits, true_logits / objective.teacher_temperature, fake_logits, masked,
                                      objective.divergence)
    scaler.scale(loss).backward()
    return loss.item()


def auxiliary_gradients(m: Models, pipe: Amused, batch: PromptBatch, objective: Objective,
                        generator: torch.Generator, autocast, scaler: torch.amp.GradScaler) -> float:
    """The auxiliary model's gradients of one update: learning what the student draws now. -> its loss."""
    B, grid = batch.hidden.shape[0], (m.teacher.cfg.sample_size,) * 2
    with autocast:
        with torch.no_grad():
            conds = m.student_raw.encode_conditions(batch.hidden, batch.pooled, batch.micro)
            _, probs, drawn = student_draw(m.student_raw, conds, B, grid, pipe.mask_id, objective.student_temperature,
                                           m.start_logits, generator)
        fake_conds = m.fake_raw.encode_conditions(batch.hidden, batch.pooled, batch.micro)
        loss = auxiliary_loss(m.fake, drawn, probs, fake_conds, pipe.mask_id, objective.auxiliary_soft,
                              generator)
    scaler.scale(loss).backward()
    return loss.item()


# ----------------------------------------------------------------------------------------------------
# Saving and resuming


@dataclass(frozen=True)
class ResumeSettings:
    """What --resume must find unchanged for the run to continue exactly; saved in checkpoint.pt."""
    teacher: str
    prompts: tuple[str, ...]
    lora: bool
    lora_rank: int | None  # the LoRA settings are None without --lora
    lora_alpha: float | None
    lora_targets: tuple[str, ...] | None
    guidance: float
    adaptive_guidance: bool
    teacher_temperature: float
    divergence: float
    auxiliary_soft: float
    student_temperature: float
    fake_rounds: int
    seed: int
    batch_size: int
    world_size: int
    ema: bool
    mixed_precision: str
    start: str


def save_state(path: Path, step: int, student: train.TrainingState, fake: train.TrainingState,
               settings: ResumeSettings) -> None:
    saved = {"version": STATE_VERSION, "step": step, "resume_settings": dataclasses.asdict(settings),
             "student": train.state_tensors(student), "fake": train.state_tensors(fake)}
    cli.atomic_write(path, lambda tmp: torch.save(saved, tmp))


def load_state(path: Path, student: train.TrainingState, fake: train.TrainingState, settings: ResumeSettings,
               device: torch.device) -> int:
    """Restore checkpoint.pt into both states -> the step it was saved at; UsageError if another run wrote it."""
    saved = torch.load(path, map_location=device, weights_only=True)
    if saved.get("version") != STATE_VERSION:
        raise UsageError(f"{path} was written by another version of distill.py (state version "
                         f"{saved.get('version')}, this one reads {STATE_VERSION}): start anew in another --out")
    changed = train.changed_settings(saved["resume_settings"], dataclasses.asdict(settings))
    if changed:
        raise UsageError(f"{path} was saved by a different run: " + ", ".join(changed))
    train.restore_state(student, saved["student"])
    train.restore_state(fake, saved["fake"])
    return saved["step"]


def student_defaults(settings: ResumeSettings) -> dict:
    """The sampling defaults the student's file carries: one step of the dimo sampler, unguided, at the softmax
    temperature it was trained to draw at."""
    t = settings.student_temperature
    return dict(STUDENT_DEFAULTS, **({"softmax_temperature": t} if t != 1 else {}))


def save(out_dir: Path, step: int, models: Models, student: train.TrainingState, fake: train.TrainingState,
         settings: ResumeSettings, pipe: Amused, rank: int) -> None:
    """checkpoint.pt, then the student (its EMA with --ema, LoRA folded in) as a whole pipeline carrying its sampling
    defaults. Rank 0 writes; the others wait."""
    if rank == 0:
        save_state(out_dir / STATE_FILE, step, student, fake, settings)
        with train.swapped_in(list(student.params.values()), student.ema):
            one_step = copy.copy(pipe)  # the teacher's pipeline, the student's U-ViT and sampling defaults
            one_step.transformer, one_step.sampling_defaults = merged(models.student_raw), student_defaults(settings)
            one_step.start_logits = models.start_logits
        train.save_model(out_dir / MODEL_FILE, one_step)
        train.log(f"saved step {step}: {out_dir / STATE_FILE}, {out_dir / MODEL_FILE}", rank)
    if settings.world_size > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------
# Distillation


def check_settings(*, lr: float, fake_lr: float | None, fake_rounds: int, batch_size: int, max_steps: int,
                   warmup_steps: int, guidance: float | None, teacher_temperature: float, divergence: float,
                   auxiliary_soft: float, student_temperature: float, start: str, lora_rank: int, ema_decay: float,
                   mixed_precision: str, save_every: int, log_every: int, seed: int, state_path: Path,
                   resume: bool) -> None:
    """UsageError for settings we cannot distil with: checked before anything slow."""
    checks = [
        (lr > 0 and (fake_lr is None or fake_lr > 0), f"--lr and --fake-lr must be > 0, got {lr}, {fake_lr}"),
        (min(batch_size, log_every, lora_rank, fake_rounds) >= 1,
         "--batch-size, --log-every, --lora-rank and --fake-rounds must be >= 1"),
        (min(max_steps, warmup_steps, save_every) >= 0, "--max-steps, --warmup-steps and --save-every must be >= 0"),
        (guidance is None or guidance >= 0, f"--guidance must be >= 0, got {guidance}"),
        (teacher_temperature > 0 and student_temperature > 0,
         f"--teacher-temperature and --student-temperature must be > 0, got {teacher_temperature}, "
         f"{student_temperature}"),
        (0 <= divergence <= 1, f"--divergence is a weight in [0, 1], got {divergence}"),
        (0 <= auxiliary_soft <= 1, f"--auxiliary-soft is a weight in [0, 1], got {auxiliary_soft}"),
        (start in STARTS, f"--start must be one of {', '.join(STARTS)}, got {start!r}"),
        (0 <= ema_decay < 1, f"--ema-decay must be in [0, 1), got {ema_decay}"),
        (mixed_precision in train.MIXED_PRECISION, f"--mixed-precision must be one of {list(train.MIXED_PRECISION)}"),
        (0 <= seed < 2**30, f"--seed must be in [0, 2**30), got {seed}"),
    ]
    train.raise_first_failed(checks + train.resume_checks(state_path, resume))


def stop_everywhere(requests: int, world: int) -> bool:
    """Whether any process was asked to stop: all must stop after the same step, or the others would wait forever."""
    flag = torch.tensor(float(requests))
    if world > 1:
        torch.distributed.all_reduce(flag)
    return flag.item() > 0


def teacher_guidance(pipe: Amused, guidance: float | None) -> float:
    """--guidance, or the scale the teacher's file recommends (its sampling defaults), else the reference's
    Meissonic run's true_cfg, 4."""
    if guidance is not None:
        return guidance
    return float(pipe.sampling_defaults.get("guidance_scale", 4.0))


def log_progress(path: Path, rank: int, step: int, max_steps: int, losses: list[tuple[float, float]], lr: float,
                 seconds: float, eta: str, device: torch.device) -> None:
    """The progress line (rank 0 prints it and appends it to log.jsonl): its process's mean losses since the last
    line, the learning rate, speed, the time left and peak memory."""
    student, fake = (sum(x) / len(losses) for x in zip(*losses))
    entry = {"step": step, "student_loss": student, "fake_loss": fake, "lr": lr, "s_per_step": seconds / len(losses)}
    train.log(f"step {step}/{max_steps} student loss {student:.4f} auxiliary loss {fake:.4f} lr {lr:.1e} "
              f"{entry['s_per_step']:.2f} s/step ETA {eta} {train.peak_memory(device)}", rank)
    if rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def main(teacher: str, out: str, prompts: str | None = None, prompt: str | None = None, variant: str | None = None,
         lora: bool = False, lora_rank: int = 16, lora_alpha: float = 32.0, lora_targets: str = "to_q,to_k,to_v",
         lr: float = 1e-5, fake_lr: float | None = None, fake_rounds: int = 1, warmup_steps: int = 100,
         batch_size: int = 4, max_steps: int = 1000, guidance: float | None = None, adaptive_guidance: bool = False,
         teacher_temperature: float = 1.0, divergence: float = 0.0, auxiliary_soft: float = 0.0,
         student_temperature: float = 1.0, start: str = "uniform", mixed_precision: str = "no",
         gradient_checkpointing: bool = False,
         ema: bool = False, ema_decay: float = 0.9999, save_every: int = 500, log_every: int = 10, seed: int = 0,
         device: str = "auto", resume: bool = False) -> int:
    """Distil; returns the number of steps done in all (less than max_steps when interrupted)."""
    out_dir = Path(out)
    check_settings(lr=lr, fake_lr=fake_lr, fake_rounds=fake_rounds, batch_size=batch_size, max_steps=max_steps,
                   warmup_steps=warmup_steps, guidance=guidance, teacher_temperature=teacher_temperature,
                   divergence=divergence, auxiliary_soft=auxiliary_soft, student_temperature=student_temperature,
                   start=start, lora_rank=lora_rank, ema_decay=ema_decay, mixed_precision=mixed_precision,
                   save_every=save_every, log_every=log_every, seed=seed, state_path=out_dir / STATE_FILE,
                   resume=resume)
    prompt_list = read_prompts(prompts, prompt)
    targets = [t for t in lora_targets.split(",") if t]
    rank, world, dev = train.torchrun_process(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    train.start_distributed(dev, world)
    student_model = fake_model = None
    try:
        # ---- The teacher, frozen, in fp32; the student and the auxiliary model start as it
        pipe = train.load_pipeline(teacher, variant, None, None, seed, dev, rank)
        t = pipe.transformer.eval().requires_grad_(False)
        torch.manual_seed(seed)  # the LoRA initialisation
        student_raw, student_params = trainable_copy(t, lora, lora_rank, lora_alpha, targets)
        fake_raw, fake_params = trainable_copy(t, lora, lora_rank, lora_alpha, targets)
        student_model = train.training_model(student_raw, gradient_checkpointing, dev, world)
        fake_model = train.training_model(fake_raw, gradient_checkpointing, dev, world)
        empty = pipe.encode_prompt([""])  # the teacher's negative prompt, (1, 77, D) and (1, P)
        start_logits = teacher_start_logits(pipe, empty) if start == "prior" else None
        models = Models(t, student_model, fake_model, student_raw, fake_raw, start_logits)

        def scaler():  # fp16 loss scaling, one per optimizer; a disabled one (a no-op) otherwise
            return torch.amp.GradScaler(dev.type, enabled=mixed_precision == "fp16")

        student = train.TrainingState(student_params, train.make_optimizer(student_params, "adamw", lr, 0.0),
                                      scaler(), [p.detach().clone() for p in student_params.values()] if ema else None)
        fake = train.TrainingState(fake_params, train.make_optimizer(fake_params, "adamw", fake_lr or lr, 0.0),
                                   scaler(), None)
        objective = Objective(teacher_guidance(pipe, guidance), adaptive_guidance, teacher_temperature, divergence,
                              auxiliary_soft, student_temperature)
        settings = ResumeSettings(teacher, tuple(prompt_list), lora, lora_rank if lora else None,
                                  lora_alpha if lora else None, tuple(targets) if lora else None,
                                  *dataclasses.astuple(objective), fake_rounds, seed, batch_size, world, ema,
                                  mixed_precision, start)
        step = load_state(out_dir / STATE_FILE, student, fake, settings, dev) if resume else 0
        autocast = train.autocast_context(mixed_precision, dev)
        clip = None if mixed_precision == "no" else MAX_GRAD_NORM  # the reference: `if '16' in mixed_precision`
        n = sum(p.numel() for p in student_params.values())
        train.log_settings({
            "teacher": (f"{teacher}, guidance {objective.guidance:g}"
                        f"{' ramped with the masked fraction' * adaptive_guidance} against the empty prompt, "
                        f"temperature {teacher_temperature:g}"),
            "divergence": f"{1 - divergence:g} forward KL + {divergence:g} reverse KL",
            "auxiliary": f"learns the student's draws x {1 - auxiliary_soft:g} + its softmax x {auxiliary_soft:g}",
            "student": f"starts from {STARTS_SAID[start]}, draws at softmax temperature {student_temperature:g}",
            "mode": (f"LoRA rank {lora_rank}, alpha {lora_alpha:g} on {len(student_params) // 2} layers "
                     f"({', '.join(targets)}), student and auxiliary on the teacher's weights" if lora
                     else "full: the student and the auxiliary model are copies of the teacher"),
            "trainable": f"{n:,} parameters per model ({', '.join(FROZEN)} frozen)",
            "prompts": f"{len(prompt_list):,} ({prompts or 'the --prompt'})", "device": dev, "processes": world,
            "batch": f"{batch_size} x {world} processes = {batch_size * world}",
            "lr": f"student {lr:g}, auxiliary {fake_lr or lr:g} (warm-up {warmup_steps} steps, then constant)",
            "updates": f"per step: 1 of the student, {fake_rounds} of the auxiliary model",
            "mixed_precision": mixed_precision, "gradient_checkpointing": gradient_checkpointing,
            "ema": f"{ema_decay:g}" if ema else "off", "max_steps": max_steps, "seed": seed, "out": out_dir,
            "start": f"step {step}, resumed from {out_dir / STATE_FILE}" if resume else "step 0"}, rank)

        # ---- Distil: one update of each model per step; Ctrl-C or SIGTERM stops at the end of a step
        started, t_log, losses = time.perf_counter(), time.perf_counter(), []
        first = step
        with cli.stop_requests("stopping after this step (Ctrl-C again to quit without saving)" if rank == 0
                               else None) as stop:
            while step < max_steps:
                # One step, as the reference's loop: the student's update, then fake_rounds of the auxiliary
                # model's, each on new prompts (all drawn from the step's generator)
                g = step_generator(seed, step, rank)
                batch = prompt_batch(pipe, prompt_list, batch_size, g)
                step_losses = [student_gradients(models, pipe, batch, empty, objective, g, autocast, student.scaler)]
                train.optimizer_step(student, train.lr_at(step, lr, warmup_steps), step, clip, ema_decay)
                for r in range(fake_rounds):
                    batch = prompt_batch(pipe, prompt_list, batch_size, g)
                    step_losses.append(auxiliary_gradients(models, pipe, batch, objective, g, autocast, fake.scaler))
                    k = step * fake_rounds + r  # the auxiliary model's update count
                    train.optimizer_step(fake, train.lr_at(k, fake_lr or lr, warmup_steps * fake_rounds), k, None,
                                         0.0)
                if not all(math.isfinite(x) for x in step_losses):
                    raise FloatingPointError(f"step {step}: a loss is not finite ({step_losses}); lower --lr, or use "
                                             f"--mixed-precision bf16 instead of fp16")
                losses.append((step_losses[0], sum(step_losses[1:]) / fake_rounds))
                step += 1
                stopping = stop_everywhere(len(stop), world)
                if step % log_every == 0 or step == max_steps:
                    eta = cli.time_left(time.perf_counter() - started, step - first, max_steps - step)
                    log_progress(out_dir / LOG_FILE, rank, step, max_steps, losses, lr, time.perf_counter() - t_log,
                                 eta, dev)
                    t_log, losses = time.perf_counter(), []
                if stopping:
                    break
                if save_every and step % save_every == 0 and step < max_steps:
                    save(out_dir, step, models, student, fake, settings, pipe, rank)
        save(out_dir, step, models, student, fake, settings, pipe, rank)
        if step < max_steps:
            train.log(f"interrupted at step {step}: continue with the same command and --resume", rank)
        return step
    finally:
        student_model = fake_model = models = None  # DDP's reducers, freed before the process group
        train.end_distributed(world)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--teacher", required=True,
                   help="the model to distil: a hub-layout folder, a file from convert_weights.py or train.py (the "
                        "digits model, a fine-tune), or a hub repo id (amused/amused-256)")
    p.add_argument("--variant", choices=["fp16"], default=None, help="read a hub checkpoint's .fp16 files")
    p.add_argument("--prompts", default=None, help="text file of prompts, one per line")
    p.add_argument("--prompt", default=None, help="a single prompt instead of --prompts")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, model.safetensors, log.jsonl")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from --out/checkpoint.pt (same teacher, prompts and batch settings)")
    g = p.add_argument_group("what to train")
    train.add_lora_flags(g, "student and auxiliary model as LoRA adapters on the teacher's shared weights: one "
                            "U-ViT in memory instead of three")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-5,
                   help="the student's Adam learning rate; the reference: 1e-5 (MaskGIT), 1e-6 (Meissonic, 1B)")
    g.add_argument("--fake-lr", type=float, default=None,
                   help="the auxiliary model's (default: --lr, as the reference)")
    g.add_argument("--fake-rounds", type=int, default=1,
                   help="auxiliary model updates per student update (the reference's fake_rounds; 1 in its runs)")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up of both, then constant")
    g.add_argument("--batch-size", type=int, default=4, help="images per process per update")
    g.add_argument("--max-steps", type=int, default=1000, help="steps in all (a resumed run counts on)")
    g.add_argument("--guidance", type=float, default=None,
                   help="the teacher's classifier-free guidance scale (default: what the teacher's file recommends, "
                        "else 4, the reference's Meissonic run)")
    g.add_argument("--adaptive-guidance", action=argparse.BooleanOptionalAction, default=False,
                   help="ramp the teacher's guidance with the fraction re-masked: 1 + (guidance - 1) r (adaptive_cfg)")
    g.add_argument("--teacher-temperature", type=float, default=1.0,
                   help="divide the teacher's guided logits by this (true_temp): below 1, a surer target")
    g.add_argument("--auxiliary-soft", type=float, default=0.0,
                   help="the auxiliary model learns the student's softmax with this weight, its drawn tokens with "
                        "1 - this (alpha_fake; 0 in the reference's runs): the same target with less noise")
    g.add_argument("--student-temperature", type=float, default=1.0,
                   help="the student draws at this softmax temperature while it learns (gen_temp), and its file "
                        "asks the sampler for the same")
    g.add_argument("--divergence", type=float, default=0.0,
                   help="what the student matches the teacher by: 0, the forward KL (mode covering, the reference's "
                        "runs); 1, the reverse KL (mode seeking: surer, less varied); between, a mix (Jeffreys)")
    g.add_argument("--start", choices=STARTS, default="uniform",
                   help="the student's start codes: uniform, half masked (the paper's); prior: drawn per position "
                        "from the teacher's prediction for an all-masked grid, none masked (the file carries it; "
                        "on the digits, the one-step student's best: README, 'One pass')")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                   help="save an exponential moving average of the student's weights")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="at most; less in the first steps, as train.py")
    g = p.add_argument_group("memory and speed")
    g.add_argument("--mixed-precision", choices=list(train.MIXED_PRECISION), default="no",
                   help="autocast the U-ViTs in fp16 (with loss scaling) or bf16; the weights stay fp32")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in the backward pass: less memory, one more forward per step")
    g.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                   help="auto: cuda, else mps, else cpu; under torchrun, cuda is each process's GPU (LOCAL_RANK)")
    g.add_argument("--seed", type=int, default=0, help="the prompts, starts, draws and masks; the LoRA init")
    g = p.add_argument_group("progress")
    g.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps")
    g.add_argument("--save-every", type=int, default=500, help="save every N steps (0: only at the end)")
    args = p.parse_args()
    steps_done = cli.run(main, args, errors=(UsageError, CheckpointError, FileNotFoundError))
    sys.exit(130 if steps_done < args.max_steps else 0)
