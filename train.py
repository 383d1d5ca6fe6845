r"""train.py: train aMUSEd's U-ViT on your own images: full fine-tuning, LoRA, single-image style transfer, or a new
U-ViT from scratch.

    python train.py --checkpoint amused/amused-256 --data photos/ --out runs/full                # full fine-tuning
    python train.py --checkpoint amused/amused-256 --data photos/ --out runs/lora --lora --lr 8e-4
    python train.py --checkpoint amused/amused-256 --data mushroom.png --prompt "a mushroom in [V] style" \
        --out runs/style --lora --lr 4e-4 --batch-size 1 --validation-prompts "a chihuahua in [V] style"
    python train.py --checkpoint amused/amused-256 --data photos/ --out runs/scratch \
        --init-transformer small-uvit.json --lr 1e-3      # a new U-ViT; the checkpoint's VQGAN and text encoder
    torchrun --nproc_per_node 4 train.py ...      # DistributedDataParallel: one process per GPU, --batch-size each
    python train.py ... --resume                  # continue the run saved in --out exactly where it stopped

Data (--data; data.py reads it): a folder of images with captions, either NAME.txt beside each NAME.png or one
metadata.jsonl holding {"file_name": ..., "text": ...} per line (the Hugging Face "imagefolder" layout); a single
image whose caption is --prompt (style transfer, StyleDrop-like); img2dataset/webdataset tar shards (KEY.jpg +
KEY.txt; a .tar, a folder of them or a brace pattern "shards/{00000..00099}.tar"); or a folder of token shards that
prepare_data.py wrote, which hold every image's VQ tokens already, so that no image is decoded and no VQGAN runs in
the training step:

    python prepare_data.py --checkpoint amused/amused-256 --data "laion/{00000..00999}.tar" --out tokens/ --views 2
    torchrun --nproc_per_node 8 train.py --checkpoint amused/amused-256 --data tokens/ --out runs/big ...

Each image's shorter side is resized to the model's resolution (bilinear) and a random square is cropped; the
original size and the crop's corner are its micro-conditioning, with aesthetic score 6 (from token shards: one of
the crops prepare_data.py stored, chosen per example). Data that cannot be read (an undecodable image, a member
without a caption, a truncated or empty tar) is skipped, counted and the first few named, when the run starts and
also mid-run, where the progress lines count it.

Objective (MUSE, Chang et al. 2023, §2.1-2.2; aMUSEd, Patil et al. 2024, §3; diffusers examples/amused/
train_amused.py): the frozen VQGAN turns each image into a grid of token ids; a fraction mask_ratio(t), t ~ U(0, 1),
of them is replaced by the mask id, at least one, using the sampler's schedule function (sampling.training_mask_count
beside sampling.sampling_mask_counts); the U-ViT is trained with cross-entropy on the masked positions only, given the
frozen CLIP text encoder's embedding of the caption or, with probability --prompt-dropout, of the empty prompt (what
classifier-free guidance needs).

From scratch (--init-transformer CONFIG): the U-ViT is built new from CONFIG, a preset name of uvit.PRESETS
("amused-256", "amused-512") or a JSON file of uvit.UViTConfig's fields (a diffusers transformer/config.json is one),
with PyTorch's default initialisation seeded by --seed (the same weights as diffusers' UVit2DModel(**config) after
torch.manual_seed(seed)); the VQGAN, text encoder and tokenizer still come from --checkpoint, frozen. CONFIG must fit
them: encoder_hidden_size = the text encoder's width, cond_embed_dim = its projection width, codebook_size = the VQ
codebook, and the checkpoint's mask id in [codebook_size, vocab_size). sample_size sets the resolution (sample_size
x the VQGAN's downsampling factor). The saved model.safetensors carries the new config. A config file to edit
(e.g. fewer num_hidden_layers), from a preset:

    python -c "import dataclasses, json, uvit; print(json.dumps(dataclasses.asdict(uvit.PRESETS['amused-256'])))" \
        > small-uvit.json

The loss of one optimizer step is the mean over every masked token of the global batch (all processes and all
--grad-accum micro-batches), so the update does not depend on how the batch is split; the reference averages the
per-micro-batch means instead. Every random number of a training example (its crop, mask ratio, masked positions,
prompt dropout) is drawn from a generator seeded by (--seed, the example's number in the run), and the data order is
a seeded permutation per epoch (of the shards, --shard-window at a time, and of their examples). So a run resumed
with --resume, or split over more processes, sees exactly the same batches, each example once per epoch: on the CPU
a resumed run ends with bit-identical weights.

What we do not copy from diffusers' examples/amused/train_amused.py: its prompt dropout keeps the prompt with
probability p (here p is the probability of dropping it) and is overwritten for dataset batches; its split VQ encode
reshapes with the wrong batch size (we encode whole batches); its gradient checkpointing is a no-op or crashes (here
it recomputes each U-ViT stage and transformer layer, tested to give the same gradients); its LoRA file loses
lora_alpha (ours stores it in the metadata diffusers reads).

Output, in --out:
    checkpoint.pt                      training state for --resume: trained weights, optimizer, grad scaler, EMA,
                                       step, RNG; written every --save-every steps, at the end and on Ctrl-C
    model.safetensors                  full fine-tuning and from scratch: the whole pipeline in convert_weights.py's
                                       single-file format (Amused.from_pretrained("runs/full/model.safetensors"))
    pytorch_lora_weights.safetensors   LoRA: the adapters only, in diffusers' key format
                                       (pipe.load_lora("runs/lora/pytorch_lora_weights.safetensors"))
    validation-000250.png              --validation-prompts sampled every --validate-every steps, as a grid
    log.jsonl                          the progress lines as JSON (all but the time left, ETA, which is printed)
Ctrl-C (or SIGTERM) finishes the current step, saves and exits with code 130; a second Ctrl-C stops at once without
saving. torchrun forwards Ctrl-C to its workers and kills them --shutdown-timeout seconds later (30 by default):
raise it when saving takes longer. Bad input is reported as one line `error: ...` on stderr with exit code 2, before
the model is loaded (a --init-transformer config that does not fit the checkpoint: just after).
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import cli
import uvit
from amused import Amused
from cli import UsageError, atomic_write
from convert_weights import (
    COMPONENTS,
    START_LOGITS_KEY,
    Checkpoint,
    CheckpointError,
    check_components,
    load_checkpoint,
    save_single_file,
    single_file_metadata,
)
from data import (
    DEFAULT_WINDOW,
    OBJECTIVE_STREAM,
    Data,
    check_tokens_fit,
    example_generator,
    find_source,
    step_examples,
    vq_fingerprint,
)
from sampling import training_mask_count

MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
LR_SCHEDULES = ("constant", "cosine")
IGNORE = -100  # label of the positions that do not count in the loss (F.cross_entropy's ignore_index)
STATE_FILE, MODEL_FILE, LOG_FILE = "checkpoint.pt", "model.safetensors", "log.jsonl"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights and load_lora_weights use
STATE_VERSION = 2  # of checkpoint.pt; 2: the settings --resume checks under "resume_settings", with init_transformer
# The U-ViT parameters that get no weight decay; every other one decays, the other norms included.
# Matches reference: train_amused.py exempts the parameters whose names contain "bias", "layer_norm.weight",
# "mlm_ln.weight" or "embeddings.weight". In UVit2DModel (so in our U-ViT, which has its names) these four are all
# they match: "bias" and "mlm_ln.weight" match nothing (the released U-ViTs have no biases; mlm_ln is the name in
# open-muse's MlmLayer). We list the four by their full names (tests/test_train.py checks that each exists).
NO_DECAY = (
    "embed.embeddings.weight",  # the token embedding table ("embeddings.weight")
    "embed.layer_norm.weight",  # the RMSNorm after it ("layer_norm.weight")
    "encoder_proj_layer_norm.weight",  # the RMSNorm of the projected text hidden states ("layer_norm.weight")
    "mlm_layer.layer_norm.weight",  # the RMSNorm before the logits ("layer_norm.weight")
)


# ----------------------------------------------------------------------------------------------------
# The objective


def mask_tokens(ids: torch.Tensor, generator: torch.Generator, mask_id: int, min_masking_rate: float = 0.0,
                schedule: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a random subset of each token grid. ids: (B, h, w) long -> (input_ids (B, h, w), mask_id where masked;
    labels (B, h, w), the original ids where masked and IGNORE elsewhere).

    Random draws, in order, on the generator's device: t (B,), then uniforms (B, L) whose argsort is a uniformly
    random permutation; the positions holding the training_mask_count smallest ranks are masked, a uniformly random
    subset of that size. Matches reference: train_amused.py (masked with the same draws, given the same generator)."""
    B, h, w = ids.shape
    L = h * w
    t = torch.rand(B, generator=generator, device=generator.device)
    n_masked = training_mask_count(t, L, min_masking_rate, schedule)  # (B,)
    ranks = torch.rand(B, L, generator=generator, device=generator.device).argsort(dim=-1)  # (B, L)
    mask = (ranks < n_masked[:, None]).view(B, h, w).to(ids.device)
    return torch.where(mask, mask_id, ids), torch.where(mask, ids, IGNORE)


def example_mask_count(seed: int, number: int, seq_len: int, min_masking_rate: float, schedule: str) -> int:
    """How many tokens example `number` of the run gets masked, without its image: mask_tokens' first draw, t,
    replayed from the example's objective stream."""
    t = torch.rand(1, generator=example_generator(seed, number, OBJECTIVE_STREAM))
    return int(training_mask_count(t, seq_len, min_masking_rate, schedule))


def drop_prompts(hidden, pooled, empty_hidden, empty_pooled, drop: torch.Tensor):
    """The text conditioning with the empty prompt's, (1, 77, D) and (1, P), in place of the samples' where `drop`
    (B,) bool is set. hidden: (B, 77, D), pooled: (B, P)."""
    return torch.where(drop[:, None, None], empty_hidden, hidden), torch.where(drop[:, None], empty_pooled, pooled)


def training_loss(model, input_ids, labels, conds: uvit.Conditions, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the U-ViT's logits at the masked positions (labels != IGNORE). model: the U-ViT, or the
    DistributedDataParallel wrapping it; input_ids, labels: (B, h, w); conds: the U-ViT's encode_conditions(
    text_hidden, pooled, micro_conds) of the batch. "mean" is the reference's loss, the mean over masked tokens; the
    training loop takes the "sum" and divides by the masked-token count of the whole global batch.

    Matches reference: train_amused.py: logits (B, K, h, w) -> (B*L, K), F.cross_entropy(ignore_index=-100)."""
    logits = model(input_ids, conds)  # (B, K, h, w)
    B, K = logits.shape[:2]
    logits = logits.reshape(B, K, -1).permute(0, 2, 1).reshape(-1, K)  # (B*L, K), tokens row-major
    return F.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=IGNORE, label_smoothing=label_smoothing,
                           reduction=reduction)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, h, w), mask_id at masked positions
    labels: torch.Tensor  # (B, h, w), IGNORE at unmasked positions
    text_hidden: torch.Tensor  # (B, 77, D)
    pooled: torch.Tensor  # (B, P)
    micro_conds: torch.Tensor  # (B, 5)


@torch.no_grad()
def make_batch(pipe: Amused, data: Data, numbers: list[int], empty: tuple[torch.Tensor, torch.Tensor],
               prompt_dropout: float, min_masking_rate: float, schedule: str) -> Batch:
    """Examples `numbers` of the run: their tokens (read from token shards, or the frozen VQGAN's encoding of their
    crops), masked; their captions through the frozen text encoder, prompts dropped."""
    items = [data.load(g) for g in numbers]
    if data.tokens:
        ids = torch.stack([item.ids for item in items]).to(pipe.device)  # (B, h, w)
    else:
        ids = pipe.vqvae.encode_to_ids(torch.stack([item.pixels for item in items]).to(pipe.device))  # (B, h, w)
    input_ids, labels, drop = [], [], []
    for i, g in enumerate(numbers):
        generator = example_generator(data.seed, g, OBJECTIVE_STREAM)
        x, y = mask_tokens(ids[i:i + 1], generator, pipe.mask_id, min_masking_rate, schedule)
        input_ids.append(x)
        labels.append(y)
        # The reference keeps the prompt when uniform < p, i.e. drops it with probability 1 - p; here p is the
        # probability of dropping it. Drawn whatever p is, so that p does not change the other draws.
        drop.append(torch.rand((), generator=generator) < prompt_dropout)
    hidden, pooled = pipe.encode_prompt([item.caption for item in items])  # (B, 77, D), (B, P)
    hidden, pooled = drop_prompts(hidden, pooled, *empty, torch.stack(drop).to(pipe.device))
    micro = torch.stack([item.micro for item in items]).to(pipe.device)  # (B, 5)
    return Batch(torch.cat(input_ids), torch.cat(labels), hidden, pooled, micro)


# ----------------------------------------------------------------------------------------------------
# The pipeline to train: the checkpoint's, or with a new U-ViT (--init-transformer)


def transformer_config(spec: str) -> uvit.UViTConfig:
    """--init-transformer's value -> the config of the U-ViT to build: a preset name of uvit.PRESETS, or a JSON file
    of uvit.UViTConfig's fields (a diffusers transformer/config.json is one). UsageError naming what is wrong."""
    if spec in uvit.PRESETS:
        return uvit.PRESETS[spec]
    if not Path(spec).is_file():
        raise UsageError(f"--init-transformer {spec}: neither a preset ({', '.join(uvit.PRESETS)}) nor a JSON file")
    try:
        fields = json.loads(Path(spec).read_text(encoding="utf-8"))
        if not isinstance(fields, dict):
            raise TypeError(f"expected a JSON object of UViTConfig fields, got {type(fields).__name__}")
        return uvit.config_from_hub(fields)  # ValueError naming an unknown or a missing field, or a bad value
    except (OSError, ValueError, TypeError) as e:  # json's and UTF-8's decode errors are ValueErrors
        raise UsageError(f"--init-transformer {spec}: {e}") from None


def load_pipeline(checkpoint: str, variant: str | None, init_transformer: str | None,
                  new_config: uvit.UViTConfig | None, seed: int, device: torch.device, rank: int) -> Amused:
    """The pipeline to train, in fp32: --checkpoint's, with a new U-ViT of new_config (--init-transformer) in place
    of its own when given."""
    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint, variant)
    if new_config is not None:
        ckpt = with_new_transformer(ckpt, new_config, seed,
                                    f"--init-transformer {init_transformer} with --checkpoint {checkpoint}")
    pipe = Amused(ckpt, device, torch.float32)
    s = pipe.transformer.cfg.sample_size
    log(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s: {pipe.resolution}x{pipe.resolution} images, "
        f"{s}x{s} tokens", rank)
    return pipe


def with_new_transformer(ckpt: Checkpoint, cfg: uvit.UViTConfig, seed: int, source: str) -> Checkpoint:
    """ckpt with a newly built U-ViT of config cfg in place of its own. PyTorch's default initialisation, seeded by
    `seed`: the same weights as diffusers' UVit2DModel(**config) after torch.manual_seed(seed), which adds no init
    of its own. CheckpointError, naming the mismatch, if cfg does not fit ckpt's text encoder, VQGAN or mask id."""
    torch.manual_seed(seed)
    new = dataclasses.replace(ckpt, transformer=uvit.UViT(cfg))
    check_components(new, source)
    return new


# ----------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021, arXiv 2106.09685)


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * lora_B(lora_A(x)), the base layer frozen. lora_A starts random (nn.Linear's
    init, as PEFT), lora_B at zero, so training starts exactly from the base model. The child names make the
    adapter's keys PEFT's and diffusers' (`<module>.lora_A.weight`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)  # (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)  # (out, r)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Wrap every Linear layer whose name is, or ends with ".<target>", in a LoRALinear (PEFT's target_modules rule);
    with the default targets that is every to_q, to_k, to_v of the U-ViT, as in the reference. Returns their names."""
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if not names:
        raise UsageError(f"--lora-targets {','.join(targets)} matched no Linear layer of the U-ViT; its names look "
                         f"like transformer_layers.0.attn1.to_q or down_block.attention_blocks.0.attn2.to_out.0")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), rank, alpha))
    return names


def trainable_parameters(transformer: uvit.UViT, lora: bool, rank: int, alpha: float,
                         targets: list[str]) -> dict[str, nn.Parameter]:
    """Make the U-ViT trainable (full fine-tuning), or freeze it and add LoRA adapters; -> the parameters to train
    by name: the fp32 master weights the optimizer updates."""
    transformer.requires_grad_(not lora)
    if lora:
        add_lora(transformer, rank, alpha, targets)
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every LoRALinear back into a plain Linear with W + (alpha / r) B A: the original module tree."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            base = m.base_layer
            base.weight += m.scale * (m.lora_B.weight @ m.lora_A.weight)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, base)


def save_lora(path: Path, tensors: dict[str, torch.Tensor], rank: int, alpha: float, targets: list[str]) -> None:
    """The adapters as diffusers' pytorch_lora_weights.safetensors: keys "transformer.<module>.lora_A.weight" etc.,
    and lora_alpha in the "lora_adapter_metadata" JSON that diffusers' loader reads (its Amused saver omits it)."""
    config = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": targets}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    weights = {f"transformer.{k}": t.detach().to("cpu", torch.float32).contiguous() for k, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(weights, tmp, metadata=meta))


# ----------------------------------------------------------------------------------------------------
# Memory and precision


def enable_gradient_checkpointing(transformer: uvit.UViT) -> None:
    """Keep only the inputs of each convolutional stage and each transformer layer for the backward pass, and
    recompute the rest there: the activations stored drop from all layers' to about one layer's, for one more
    forward. The modules' forward is wrapped in place, so module names and state-dict keys do not change."""
    for module in [transformer.down_block, *transformer.transformer_layers, transformer.up_block]:
        module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes
    return f"peak RSS {rss / 2**30:.2f} GB"


# ----------------------------------------------------------------------------------------------------
# The optimizer and the moving average


def lr_at(step: int, lr: float, warmup_steps: int, schedule: str = "constant", max_steps: int = 0) -> float:
    """The learning rate of optimizer step `step` (0-based): a linear warm-up over warmup_steps (step 0 gets
    lr / warmup_steps, not 0), then constant, or, for "cosine", half a cosine from lr down to 0 at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def autocast_context(mixed_precision: str, device: torch.device):
    """--mixed-precision as the context the forward passes run in: autocast to fp16 or bf16, or nothing."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=MIXED_PRECISION[mixed_precision])


def make_optimizer(named: dict[str, nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999, eps 1e-8, as the reference), or bitsandbytes' 8-bit AdamW, with weight decay on all
    but the NO_DECAY parameters."""
    decay = [p for n, p in named.items() if n not in NO_DECAY]
    no_decay = [p for n, p in named.items() if n in NO_DECAY]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    if name == "adamw8bit":
        import bitsandbytes  # optional dependency; check_settings checked that it is installed
        return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], step: int, decay: float) -> None:
    """Matches reference: diffusers EMAModel (update_after_step 0, no warm-up): at the step-th update (0-based)
    the decay is min(decay, (1 + step) / (10 + step)), so early averages follow the weights closely."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema, params):
        e.lerp_(p, 1 - d)


@contextlib.contextmanager
def swapped_in(params: list[torch.Tensor], ema: list[torch.Tensor] | None):
    """The EMA weights in place of the trained ones for the duration (validation, saving); no-op without EMA."""
    if ema is None:
        yield
        return
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):
            p.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)


@dataclass
class TrainingState:
    """What the optimizer steps change; checkpoint.pt saves it, with the step and the RNG states."""
    params: dict[str, nn.Parameter]  # the trained tensors by name: fp32 master weights
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 loss scaling; a disabled one (a no-op) otherwise
    ema: list[torch.Tensor] | None  # the moving average of params, with --ema


def optimizer_step(state: TrainingState, lr: float, step: int, max_grad_norm: float | None, ema_decay: float) -> None:
    """Update the weights from the accumulated gradients (clipped first when max_grad_norm is set), clear the
    gradients, then move the EMA towards the new weights."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if max_grad_norm is not None:
        state.scaler.unscale_(state.optimizer)  # clip the true gradients, not the loss-scaled ones
        torch.nn.utils.clip_grad_norm_(state.params.values(), max_grad_norm)
    state.scaler.step(state.optimizer)  # skipped when fp16 gradients overflowed
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        ema_update(state.ema, list(state.params.values()), step, ema_decay)


# ----------------------------------------------------------------------------------------------------
# Saving and resuming


@dataclass(frozen=True)
class ResumeSettings:
    """What --resume must find unchanged for the run to continue exactly; saved in checkpoint.pt."""
    lora: bool
    lora_rank: int | None  # the LoRA settings are None without --lora
    lora_alpha: float | None
    lora_targets: tuple[str, ...] | None
    init_transformer: dict | None  # the new U-ViT's config (dataclasses.asdict) with --init-transformer
    seed: int
    batch_size: int
    grad_accum: int
    world_size: int
    data: str  # Data.fingerprint: the (image, caption) list, the tars' names and sizes, the token shards' settings
    ema: bool
    mixed_precision: str
    # --shard-window where the data has several shards; None for a folder, whose order it does not change (and
    # whose runs saved before it existed resume: a missing key reads as None)
    shard_window: int | None = None


def state_tensors(state: TrainingState) -> dict:
    """A TrainingState as what torch.save writes; restore_state reads it back."""
    return {"params": {n: p.detach() for n, p in state.params.items()}, "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict(), "ema": state.ema}


def restore_state(state: TrainingState, saved: dict) -> None:
    """Put state_tensors' dict back into `state`: weights, EMA, optimizer and loss scaler."""
    with torch.no_grad():
        for n, p in state.params.items():
            p.copy_(saved["params"][n])
        for e, s in zip(state.ema or [], saved["ema"] or []):
            e.copy_(s)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scaler.load_state_dict(saved["scaler"])


def changed_settings(before: dict, now: dict) -> list[str]:
    """What differs between the resume settings a run saved and this run's (dataclasses.asdict of each), one
    "key was X, now Y" per difference; for a nested dict (a U-ViT config), its fields that differ."""
    changed = []
    for key, value in now.items():
        if isinstance(value, dict) and isinstance(before.get(key), dict):
            changed += [f"{key}.{f} was {before[key].get(f)!r}, now {v!r}" for f, v in value.items()
                        if before[key].get(f) != v]
        elif before.get(key) != value:
            changed.append(f"{key} was {before.get(key)!r}, now {value!r}")
    return changed


def save_state(path: Path, step: int, state: TrainingState, settings: ResumeSettings, device: torch.device) -> None:
    """checkpoint.pt: everything --resume needs to continue exactly where the run stopped."""
    saved = {"version": STATE_VERSION, "step": step, "resume_settings": dataclasses.asdict(settings),
             **state_tensors(state),
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
    atomic_write(path, lambda tmp: torch.save(saved, tmp))


def load_state(path: Path, state: TrainingState, settings: ResumeSettings, device: torch.device) -> int:
    """Restore checkpoint.pt into `state` and the RNGs -> the step it was saved at. UsageError if another version of
    train.py wrote it, or another run (other ResumeSettings), which could not be continued exactly."""
    saved = torch.load(path, map_location=device, weights_only=True)
    if saved.get("version") != STATE_VERSION:
        raise UsageError(f"{path} was written by another version of train.py (state version {saved.get('version')}, "
                         f"this one reads {STATE_VERSION}): start the run anew in another --out")
    changed = changed_settings(saved["resume_settings"], dataclasses.asdict(settings))
    if changed:
        raise UsageError(f"{path} was saved by a different run: " + ", ".join(changed))
    restore_state(state, saved)
    torch.set_rng_state(saved["rng"]["torch"].cpu())
    if device.type == "cuda" and saved["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"].cpu(), device)
    return saved["step"]


def save_model(path: Path, pipe: Amused) -> None:
    """The whole pipeline as one file in convert_weights.py's format, which Amused.from_pretrained loads, with the
    pipeline's sampling_defaults (and a one-step student's start_logits): a fine-tune keeps its base checkpoint's
    recommendation."""
    tensors = {f"{name}.{k}": t.detach().to("cpu").contiguous()
               for name in COMPONENTS for k, t in getattr(pipe, name).state_dict().items()}
    if pipe.start_logits is not None:  # a one-step student's start (distill.py --start prior)
        tensors[START_LOGITS_KEY] = pipe.start_logits.detach().to("cpu").contiguous()
    configs = {name: getattr(pipe, name).cfg for name in COMPONENTS}
    save_single_file(path, tensors, single_file_metadata(configs, pipe.tokenizer.files, pipe.mask_id, pipe.schedule,
                                                         pipe.sampling_defaults))


def save(out_dir: Path, step: int, state: TrainingState, settings: ResumeSettings, pipe: Amused, rank: int) -> None:
    """checkpoint.pt, then the weights (the EMA ones with --ema): the LoRA file, or the whole pipeline. Rank 0
    writes; the other processes wait for it."""
    if rank == 0:
        save_state(out_dir / STATE_FILE, step, state, settings, pipe.device)
        weights = out_dir / (LORA_FILE if settings.lora else MODEL_FILE)
        with swapped_in(list(state.params.values()), state.ema):
            if settings.lora:
                save_lora(weights, state.params, settings.lora_rank, settings.lora_alpha, list(settings.lora_targets))
            else:
                save_model(weights, pipe)
        log(f"saved step {step}: {out_dir / STATE_FILE}, {weights}", rank)
    if settings.world_size > 1:
        dist.barrier()


def validate(path: Path, pipe: Amused, prompts: list[str], seed: int, state: TrainingState, autocast) -> None:
    """The prompts sampled with the trained weights (the EMA ones with --ema), seeded by --seed, as one grid.
    Rank 0 alone calls it."""
    with swapped_in(list(state.params.values()), state.ema), autocast:
        images = pipe(prompts, generator=torch.Generator().manual_seed(seed))
    atomic_write(path, lambda tmp: cli.image_grid(images, cols=min(4, len(images))).save(tmp, format="PNG"))
    print(f"wrote {path}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Processes, signals, progress


def log(message: str, rank: int) -> None:
    """Print on rank 0 only: under torchrun, one copy of each line."""
    if rank == 0:
        print(message, flush=True)


def log_settings(settings: dict, rank: int) -> None:
    """The resolved settings, once, as a table: name, then value."""
    log("settings:\n" + "\n".join(f"  {key:<24}{value}" for key, value in settings.items()), rank)


def torchrun_process(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. torchrun starts one process per GPU and sets RANK, WORLD_SIZE and
    LOCAL_RANK; a plain `python train.py` is process 0 of 1. --device cuda is then this process's GPU."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    name = cli.resolve_device(device)  # auto: cuda, else mps, else cpu
    return rank, world, torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def start_distributed(device: torch.device, world: int) -> None:
    """Join torchrun's process group, nccl between GPUs or gloo between CPU processes; nothing for one process."""
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def training_model(transformer: uvit.UViT, gradient_checkpointing: bool, device: torch.device,
                   world: int) -> nn.Module:
    """The module the training step calls: the U-ViT, with gradient checkpointing if asked; under torchrun wrapped
    in DistributedDataParallel, which all-reduces the gradients in the backward pass."""
    if gradient_checkpointing:
        enable_gradient_checkpointing(transformer)
    if world == 1:
        return transformer
    return DistributedDataParallel(transformer, device_ids=[device.index] if device.type == "cuda" else None)


def end_distributed(world: int) -> None:
    """Leave the process group. The caller drops its DistributedDataParallel first: DDP's reducer holds the process
    group and gloo's pending work, which gc frees here while the interpreter is whole. Left to interpreter shutdown,
    gloo's threads can abort the process ("terminate called without an active exception": seen once in CI, rank 1,
    after a finished run)."""
    if world > 1:
        gc.collect()
        dist.destroy_process_group()


def log_progress(path: Path, rank: int, step: int, max_steps: int, losses: list[float], lr: float, images: int,
                 seconds: float, data_seconds: float, unreadable: int, device: torch.device, eta: str) -> None:
    """The progress line: the mean loss of the steps since the last one, the learning rate, speed, the time a step
    waited for its data, the time left (eta, printed only), the examples replaced because unreadable (if any), and
    peak memory; rank 0 prints it and appends it to log.jsonl."""
    entry = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, "images_per_s": images / seconds,
             "data_ms_per_step": 1000 * data_seconds / len(losses), "unreadable": unreadable}
    bad = f"{unreadable} unreadable examples replaced so far, " if unreadable else ""
    log(f"step {step}/{max_steps} loss {entry['loss']:.4f} lr {lr:.1e} {entry['images_per_s']:.1f} img/s "
        f"data {entry['data_ms_per_step']:.1f} ms/step ETA {eta} {bad}{peak_memory(device)}", rank)
    if rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------------------------------
# One training step


def accumulate_gradients(model: nn.Module, pipe: Amused, data: Data, empty: tuple[torch.Tensor, torch.Tensor],
                         micro_batches: list[list[int]], n_masked: int, prompt_dropout: float,
                         min_masking_rate: float, label_smoothing: float, scaler: torch.amp.GradScaler, autocast,
                         world: int) -> torch.Tensor:
    """Forward and backward of this process's micro-batches of one step. The gradients add up in .grad, scaled so
    that, once DDP has averaged them over the processes, they are those of the global batch's loss: the sum over
    its n_masked masked tokens, divided by n_masked. -> this process's summed loss, (), not divided."""
    loss_sum = torch.zeros((), device=pipe.device)
    for m, numbers in enumerate(micro_batches):
        batch = make_batch(pipe, data, numbers, empty, prompt_dropout, min_masking_rate, pipe.schedule)
        # DDP all-reduces the gradients in the backward pass of the last micro-batch only
        sync = world == 1 or m == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast:
                # The prompt-only part of the U-ViT runs outside DDP's forward; its parameters' gradients are
                # all-reduced all the same (DDP hooks every parameter's gradient, wherever it was used).
                conds = pipe.transformer.encode_conditions(batch.text_hidden, batch.pooled, batch.micro_conds)
                loss = training_loss(model, batch.input_ids, batch.labels, conds, label_smoothing, reduction="sum")
            # DDP averages over processes: the factor `world` turns that into the global sum
            scaler.scale(loss * (world / n_masked)).backward()
        loss_sum += loss.detach()
    return loss_sum


@dataclass(frozen=True)
class StepTotals:
    loss_sum: float  # the global batch's summed loss
    stopping: bool  # a process was asked to stop
    data_seconds: float  # spent loading data since the start, the mean over processes
    unreadable: int  # examples replaced because they could not be read, since the start, all processes


def all_reduce_step(loss_sum: torch.Tensor, stop_requests: int, data: Data, world: int) -> StepTotals:
    """One all-reduce for what the step's end needs from every process: the summed loss, whether any process was
    asked to stop (all must stop at the same step, or the others would wait for it forever), and the data counts."""
    counts = [stop_requests, data.load_seconds, sum(data.problems.counts.values())]
    totals = torch.cat([loss_sum[None], torch.tensor(counts, dtype=loss_sum.dtype, device=loss_sum.device)])
    if world > 1:
        dist.all_reduce(totals)
    loss, stop, seconds, unreadable = totals.tolist()
    return StepTotals(loss, stop > 0, seconds / world, round(unreadable))


# ----------------------------------------------------------------------------------------------------
# Training


def resume_checks(state_path: Path, resume: bool) -> list[tuple[bool, str]]:
    """--resume needs the run's state in --out; without it, --out must not hold one (it would be overwritten)."""
    return [(not resume or state_path.is_file(), f"--resume: there is no {state_path} to continue from"),
            (resume or not state_path.exists(), (f"{state_path} exists: pass --resume to continue that run, or "
                                                 f"choose another --out"))]


def raise_first_failed(checks: list[tuple[bool, str]]) -> None:
    """UsageError with the message of the first (ok, message) check that is not ok."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def check_settings(*, lora: bool, lora_rank: int, init_transformer: str | None, lr: float, weight_decay: float,
                   optimizer: str, max_grad_norm: float | None, batch_size: int, grad_accum: int, max_steps: int,
                   warmup_steps: int, lr_schedule: str, label_smoothing: float, prompt_dropout: float,
                   min_masking_rate: float,
                   mixed_precision: str, ema_decay: float, save_every: int, validate_every: int, log_every: int,
                   seed: int, shard_window: int, state_path: Path, resume: bool) -> None:
    """UsageError for settings we cannot train with: checked before anything slow."""
    checks = [
        (lora_rank >= 1, f"--lora-rank must be >= 1, got {lora_rank}"),
        (not (lora and init_transformer), ("--init-transformer trains a new U-ViT, all of it; --lora adapts an "
                                           "existing one: use one or the other")),
        (lr > 0 and weight_decay >= 0, f"--lr must be > 0 and --weight-decay >= 0, got {lr}, {weight_decay}"),
        (min(batch_size, grad_accum, log_every, shard_window) >= 1,
         "--batch-size, --grad-accum, --log-every and --shard-window must be >= 1"),
        (min(max_steps, warmup_steps, save_every, validate_every) >= 0,
         "--max-steps, --warmup-steps, --save-every and --validate-every must be >= 0"),
        (0 <= prompt_dropout <= 1, f"--prompt-dropout is a probability in [0, 1], got {prompt_dropout}"),
        (0 <= label_smoothing < 1 and 0 <= min_masking_rate <= 1,
         "--label-smoothing must be in [0, 1) and --min-masking-rate in [0, 1]"),
        (0 <= ema_decay < 1, f"--ema-decay must be in [0, 1), got {ema_decay}"),
        (max_grad_norm is None or max_grad_norm > 0, f"--max-grad-norm must be > 0, got {max_grad_norm}"),
        (0 <= seed < 2**30, f"--seed must be in [0, 2**30), got {seed}"),
        (mixed_precision in MIXED_PRECISION, f"--mixed-precision must be one of {list(MIXED_PRECISION)}"),
        (lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {list(LR_SCHEDULES)}, got {lr_schedule!r}"),
        (optimizer in ("adamw", "adamw8bit"), f"--optimizer must be adamw or adamw8bit, got {optimizer!r}"),
    ]
    raise_first_failed(checks + resume_checks(state_path, resume))
    if optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--optimizer adamw8bit needs bitsandbytes, which is not installed: pip install bitsandbytes "
                         "(CUDA only), or use --optimizer adamw")


def main(checkpoint: str, data: str, out: str, prompt: str | None = None, variant: str | None = None,
         init_transformer: str | None = None, lora: bool = False, lora_rank: int = 16, lora_alpha: float = 32.0,
         lora_targets: str = "to_q,to_k,to_v", lr: float = 1e-4, warmup_steps: int = 0, lr_schedule: str = "constant",
         weight_decay: float = 0.01,
         optimizer: str = "adamw", max_grad_norm: float | None = None, batch_size: int = 8, grad_accum: int = 1,
         max_steps: int = 1000, label_smoothing: float = 0.0, prompt_dropout: float = 0.0,
         min_masking_rate: float = 0.0, mixed_precision: str = "no", gradient_checkpointing: bool = False,
         ema: bool = False, ema_decay: float = 0.9999, save_every: int = 500, validate_every: int = 250,
         validation_prompts: list[str] | None = None, log_every: int = 10, seed: int = 0, device: str = "auto",
         resume: bool = False, shard_window: int = DEFAULT_WINDOW) -> int:
    """Train; returns the number of optimizer steps done in all (less than max_steps when interrupted)."""
    # ---- Settings and data, checked first: loading the model takes a while
    out_dir = Path(out)
    check_settings(lora=lora, lora_rank=lora_rank, init_transformer=init_transformer, lr=lr, weight_decay=weight_decay,
                   optimizer=optimizer, max_grad_norm=max_grad_norm, batch_size=batch_size, grad_accum=grad_accum,
                   max_steps=max_steps, warmup_steps=warmup_steps, lr_schedule=lr_schedule,
                   label_smoothing=label_smoothing,
                   prompt_dropout=prompt_dropout, min_masking_rate=min_masking_rate, mixed_precision=mixed_precision,
                   ema_decay=ema_decay, save_every=save_every, validate_every=validate_every, log_every=log_every,
                   seed=seed, shard_window=shard_window, state_path=out_dir / STATE_FILE, resume=resume)
    new_config = transformer_config(init_transformer) if init_transformer else None
    targets = tuple(t for t in lora_targets.split(",") if t)
    rank, world, dev = torchrun_process(device)
    if mixed_precision == "fp16" and dev.type == "cpu":
        log(cli.fp16_cpu_note("--mixed-precision", "no"), rank)
    with contextlib.nullcontext() if rank == 0 else warnings.catch_warnings(action="ignore"):
        source = find_source(data, prompt)  # rank 0 alone warns of what it skips
    out_dir.mkdir(parents=True, exist_ok=True)
    start_distributed(dev, world)
    try:
        # ---- Load: the text encoder and the VQGAN stay frozen, in fp32; the U-ViT from the checkpoint, or new
        pipe = load_pipeline(checkpoint, variant, init_transformer, new_config, seed, dev, rank)
        if source.kind == "tokens":  # made with this VQ, at this resolution?
            check_tokens_fit(source, vq_fingerprint(pipe.vqvae), pipe.resolution, pipe.transformer.cfg.sample_size,
                             pipe.transformer.cfg.codebook_size)
        data_set = Data(source.shards, pipe.resolution, seed, shard_window)

        # ---- What to train: the whole U-ViT, or LoRA adapters on the frozen one
        torch.manual_seed(seed)  # the LoRA initialisation
        params = trainable_parameters(pipe.transformer.train(), lora, lora_rank, lora_alpha, list(targets))
        model = training_model(pipe.transformer, gradient_checkpointing, dev, world)

        # ---- Optimizer, loss scaling (fp16 only), autocast, EMA; a resumed run's state
        state = TrainingState(params, make_optimizer(params, optimizer, lr, weight_decay),
                              torch.amp.GradScaler(dev.type, enabled=mixed_precision == "fp16"),
                              [p.detach().clone() for p in params.values()] if ema else None)
        autocast = autocast_context(mixed_precision, dev)
        settings = ResumeSettings(lora, lora_rank if lora else None, lora_alpha if lora else None,
                                  targets if lora else None, dataclasses.asdict(new_config) if new_config else None,
                                  seed, batch_size, grad_accum, world, data_set.fingerprint(), ema, mixed_precision,
                                  shard_window if len(source.shards) > 1 else None)
        step = load_state(out_dir / STATE_FILE, state, settings, dev) if resume else 0
        G = batch_size * world * grad_accum  # the global batch
        mode = (f"LoRA rank {lora_rank}, alpha {lora_alpha:g} on {len(params) // 2} layers ({', '.join(targets)})"
                if lora else f"full, a new U-ViT ({init_transformer})" if init_transformer else "full")
        log_settings({"mode": mode, "trainable": f"{sum(p.numel() for p in params.values()):,} parameters",
                      "data": source.describe(), "skipped": source.problems.summary(), "device": dev,
                      "processes": world,
                      "batch": f"{batch_size} x {world} processes x {grad_accum} accumulation = {G}",
                      "lr": f"{lr:g} (warm-up {warmup_steps} steps, then {lr_schedule})", "optimizer": optimizer,
                      "mixed_precision": mixed_precision, "gradient_checkpointing": gradient_checkpointing,
                      "ema": f"{ema_decay:g}" if ema else "off", "prompt_dropout": prompt_dropout,
                      "label_smoothing": label_smoothing, "max_steps": max_steps, "seed": seed, "out": out_dir,
                      "start": f"step {step}, resumed from {out_dir / STATE_FILE}" if resume else "step 0"}, rank)

        # ---- Train: one optimizer step per global batch; Ctrl-C or SIGTERM stops at the end of a step
        empty = pipe.encode_prompt([""])  # the dropped prompt's conditioning, (1, 77, D) and (1, P)
        seq_len = pipe.transformer.cfg.sample_size ** 2  # tokens per image
        t_log, data_log, losses = time.perf_counter(), 0.0, []  # data_log: data_seconds at the last progress line
        t_run, step_run = t_log, step  # the ETA: the pace of this process's steps so far (a resumed run's too)
        with cli.stop_requests("stopping after this step (Ctrl-C again to quit without saving)" if rank == 0
                               else None) as stop:
            while step < max_steps:
                global_batch, micro_batches = step_examples(step, batch_size, grad_accum, rank, world)
                n_masked = sum(example_mask_count(seed, g, seq_len, min_masking_rate, pipe.schedule)
                               for g in global_batch)  # of the global batch: what the loss is divided by
                loss_sum = accumulate_gradients(model, pipe, data_set, empty, micro_batches, n_masked, prompt_dropout,
                                                min_masking_rate, label_smoothing, state.scaler, autocast, world)
                lr_now = lr_at(step, lr, warmup_steps, lr_schedule, max_steps)
                optimizer_step(state, lr_now, step, max_grad_norm, ema_decay)
                step += 1
                totals = all_reduce_step(loss_sum, len(stop), data_set, world)
                losses.append(totals.loss_sum / n_masked)
                if step % log_every == 0 or step == max_steps:
                    log_progress(out_dir / LOG_FILE, rank, step, max_steps, losses, lr_now, len(losses) * G,
                                 time.perf_counter() - t_log, totals.data_seconds - data_log, totals.unreadable, dev,
                                 cli.time_left(time.perf_counter() - t_run, step - step_run, max_steps - step))
                    t_log, data_log, losses = time.perf_counter(), totals.data_seconds, []
                if totals.stopping:
                    break
                if validation_prompts and rank == 0 and (step == max_steps or validate_every
                                                         and step % validate_every == 0):
                    validate(out_dir / f"validation-{step:06d}.png", pipe, validation_prompts, seed, state, autocast)
                if save_every and step % save_every == 0 and step < max_steps:
                    save(out_dir, step, state, settings, pipe, rank)

        # ---- Save
        save(out_dir, step, state, settings, pipe, rank)
        if step < max_steps:
            log(f"interrupted at step {step}: continue with the same command and --resume", rank)
        return step
    finally:
        model = None  # DDP's reducer, freed before the process group (see end_distributed)
        end_distributed(world)


def add_lora_flags(g, what: str) -> None:
    """On the argument group g: --lora (its help: what), --lora-rank, --lora-alpha, --lora-targets."""
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False, help=what)
    g.add_argument("--lora-rank", type=int, default=16, help="inner width r of each adapter")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="the adapters' output is scaled by alpha / rank")
    g.add_argument("--lora-targets", default="to_q,to_k,to_v",
                   help="comma list: Linear layers whose names end with one of these get an adapter")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoint", default="amused/amused-256",
                   help="hub-layout folder, file from convert_weights.py, or hub repo id (downloaded on first use)")
    p.add_argument("--variant", choices=["fp16"], default=None,
                   help="read the .fp16.safetensors files of a hub checkpoint (training still keeps fp32 weights)")
    p.add_argument("--data", required=True,
                   help="folder of images with NAME.txt captions or a metadata.jsonl; one image with --prompt; tar "
                        "shards (img2dataset: a .tar, a folder of them, or a pattern \"{00000..00099}.tar\"); or a "
                        "folder of token shards from prepare_data.py")
    p.add_argument("--prompt", default=None, help="the caption of a single --data image (style transfer)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, the weights, validation grids, log")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from --out/checkpoint.pt (same data and batch settings)")
    g = p.add_argument_group("what to train")
    g.add_argument("--init-transformer", metavar="CONFIG", default=None,
                   help=f"train a new U-ViT from scratch, of this config: a preset ({', '.join(uvit.PRESETS)}) or a "
                        f"JSON file of uvit.UViTConfig's fields; the VQGAN and text encoder still come from "
                        f"--checkpoint. None: fine-tune the checkpoint's U-ViT")
    add_lora_flags(g, "train LoRA adapters instead of the whole U-ViT")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4,
                   help="learning rate; the reference recipes: full 1e-4 (amused-256) or 8e-5 (512), LoRA 8e-4 "
                        "(256) or 1e-4 (512), single-image style 4e-4")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then --lr-schedule")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="after the warm-up: constant (the reference's default), or cosine, half a cosine down to 0 at "
                        "--max-steps (a resume with another --max-steps bends the curve from there)")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW's; not on the token embeddings and three RMSNorm weights, as the reference (NO_DECAY)")
    g.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit: bitsandbytes' 8-bit AdamW (CUDA; pip install bitsandbytes)")
    g.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm; None: no clipping")
    g.add_argument("--batch-size", type=int, default=8, help="images per process per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer steps in all (a resumed run counts on)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="of the cross-entropy (open-muse used 0.1)")
    g.add_argument("--prompt-dropout", type=float, default=0.0,
                   help="probability of training a sample on the empty prompt instead of its caption")
    g.add_argument("--min-masking-rate", type=float, default=0.0, help="lower bound of the masked fraction")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                   help="keep an exponential moving average of the weights; it is what gets saved and validated")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="at most; less in the first steps, as diffusers")
    g = p.add_argument_group("memory and speed")
    g.add_argument("--mixed-precision", choices=list(MIXED_PRECISION), default="no",
                   help="autocast the U-ViT in fp16 (with loss scaling) or bf16; the weights stay fp32")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in the backward pass: less memory, one more forward per step")
    g.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                   help="auto: cuda, else mps, else cpu; under torchrun, cuda is each process's GPU (LOCAL_RANK)")
    g.add_argument("--seed", type=int, default=0,
                   help="data order, crops, masks, prompt dropout, LoRA init, a new U-ViT's init")
    g.add_argument("--shard-window", type=int, default=DEFAULT_WINDOW,
                   help="tar or token shards whose examples are shuffled together; each process reads from this many "
                        "(twice as many at a window's edge) at a time")
    g = p.add_argument_group("progress")
    g.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps")
    g.add_argument("--save-every", type=int, default=500, help="save every N steps (0: only at the end)")
    g.add_argument("--validate-every", type=int, default=250, help="sample --validation-prompts every N steps")
    g.add_argument("--validation-prompts", nargs="+", default=None, help="prompts for the validation grids")
    args = p.parse_args()
    steps_done = cli.run(main, args, errors=(UsageError, CheckpointError, FileNotFoundError))
    sys.exit(130 if steps_done < args.max_steps else 0)
