"""train.py: fine-tune aMUSEd on your own images: full fine-tuning, LoRA, and single-image style transfer.

    python train.py --checkpoint amused/amused-256 --data photos/ --out runs/full                # full fine-tuning
    python train.py --checkpoint amused/amused-256 --data photos/ --out runs/lora --lora --lr 8e-4
    python train.py --checkpoint amused/amused-256 --data mushroom.png --prompt "a mushroom in [V] style" \
        --out runs/style --lora --lr 4e-4 --batch-size 1 --validation-prompts "a chihuahua in [V] style"
    torchrun --nproc_per_node 4 train.py ...      # DistributedDataParallel: one process per GPU, --batch-size each
    python train.py ... --resume                  # continue the run saved in --out exactly where it stopped

Data (--data): a folder of images with captions, either NAME.txt beside each NAME.png or one metadata.jsonl holding
{"file_name": ..., "text": ...} per line (the Hugging Face "imagefolder" layout); or a single image whose caption is
--prompt (style transfer, StyleDrop-like). Each image's shorter side is resized to the model's resolution (bilinear)
and a random square is cropped; the original size and the crop's corner are its micro-conditioning, with aesthetic
score 6. Images that cannot be read are skipped with a warning, when the run starts and also mid-run.

Objective (MUSE, Chang et al. 2023, §2.1-2.2; aMUSEd, Patil et al. 2024, §3; diffusers examples/amused/
train_amused.py): the frozen VQGAN turns each image into a grid of token ids; a fraction mask_ratio(t), t ~ U(0, 1),
of them is replaced by the mask id, at least one, using the schedule function the sampler uses (amused.mask_ratio);
the U-ViT is trained with cross-entropy on the masked positions only, given the frozen CLIP text encoder's embedding
of the caption or, with probability --prompt-dropout, of the empty prompt (what classifier-free guidance needs).

The loss of one optimizer step is the mean over every masked token of the global batch (all processes and all
--grad-accum micro-batches), so the update does not depend on how the batch is split; the reference averages the
per-micro-batch means instead. Every random number of a training example (its crop, mask ratio, masked positions,
prompt dropout) is drawn from a generator seeded by (--seed, the example's number in the run), and the data order is
a seeded permutation per epoch. So a run resumed with --resume, or split over more processes, sees exactly the same
batches: on the CPU a resumed run ends with bit-identical weights.

What we do not copy from train_amused.py (see ../shared/docs/amused-reference.md §10): its prompt dropout keeps the
prompt with probability p (here p is the probability of dropping it) and is overwritten for dataset batches; its
split VQ encode reshapes with the wrong batch size (we encode whole batches); its gradient checkpointing is a no-op
or crashes (here it recomputes each U-ViT stage and transformer layer, tested to give the same gradients); its LoRA
file loses lora_alpha (ours stores it in the metadata diffusers reads).

Output, in --out:
    checkpoint.pt                      training state for --resume: trained weights, optimizer, grad scaler, EMA,
                                       step, RNG; written every --save-every steps, at the end and on Ctrl-C
    model.safetensors                  full fine-tuning: the whole pipeline in convert_weights.py's single-file
                                       format (Amused.from_pretrained("runs/full/model.safetensors"))
    pytorch_lora_weights.safetensors   LoRA: the adapters only, in diffusers' key format
                                       (pipe.load_lora("runs/lora/pytorch_lora_weights.safetensors"))
    validation-000250.png              --validation-prompts sampled every --validate-every steps, as a grid
    log.jsonl                          the progress lines as JSON
Ctrl-C (or SIGTERM) finishes the current step, saves and exits with code 130; a second Ctrl-C stops at once without
saving. torchrun forwards Ctrl-C to its workers and kills them --shutdown-timeout seconds later (30 by default):
raise it when saving takes longer. Bad input is reported as one line `error: ...` on stderr with exit code 2, before
the model is loaded.
"""
import argparse
import contextlib
import functools
import gc
import hashlib
import importlib.util
import json
import math
import os
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import uvit
from amused import Amused, mask_ratio
from convert_weights import (COMPONENTS, CheckpointError, atomic_write, load_checkpoint, save_single_file,
                             single_file_metadata)

MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AESTHETIC_SCORE = 6.0  # micro-conditioning of every training image, as in the reference (and the sampler's default)
IGNORE = -100  # label of the positions that do not count in the loss (F.cross_entropy's ignore_index)
STATE_FILE, MODEL_FILE, LOG_FILE = "checkpoint.pt", "model.safetensors", "log.jsonl"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights and load_lora_weights use
STATE_VERSION = 1
# Matches reference: train_amused.py gives no weight decay to parameters whose names contain these (in the U-ViT:
# embed.embeddings, embed.layer_norm, encoder_proj_layer_norm and mlm_layer.layer_norm); every other norm decays.
NO_DECAY = ("bias", "layer_norm.weight", "mlm_ln.weight", "embeddings.weight")


class UsageError(ValueError):
    """A flag value or input we reject before training starts."""


# ----------------------------------------------------------------------------------------------------
# Randomness: one generator per training example


DATA_STREAM, OBJECTIVE_STREAM = 0, 1


def example_generator(seed: int, number: int, stream: int) -> torch.Generator:
    """The random numbers of example `number` of the run (counted over all steps and epochs). Stream DATA_STREAM
    crops its image; OBJECTIVE_STREAM draws its mask ratio, masked positions and prompt dropout, in that order. They
    depend on nothing else, so neither the batch split nor a resume changes them."""
    return torch.Generator().manual_seed(((seed * 2**32 + number) * 2 + stream) % 2**64)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits the n examples: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 2**20 + epoch))


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


def unreadable(path: Path) -> str | None:
    """None if PIL decodes the whole file, else why not."""
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except Exception as e:  # PIL's decoders raise OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return f"{type(e).__name__}: {e}"


def captions_in_folder(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs: from metadata.jsonl when the folder has one, else from NAME.txt beside each image."""
    meta = folder / "metadata.jsonl"
    pairs = []
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                file_name, text = entry["file_name"], entry["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UsageError(f"{meta}, line {n}: expected a JSON object with \"file_name\" and \"text\" "
                                 f"({type(e).__name__}: {e})") from None
            if not isinstance(file_name, str) or not isinstance(text, str):
                raise UsageError(f"{meta}, line {n}: \"file_name\" and \"text\" must be strings")
            if not (folder / file_name).is_file():
                warnings.warn(f"{meta}, line {n}: {folder / file_name} not found: skipped")
                continue
            pairs.append((folder / file_name, text))
        return pairs
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            warnings.warn(f"{image}: skipped, no caption (write it to {caption.name}, or list the images with their "
                          f"captions in metadata.jsonl)")
            continue
        pairs.append((image, caption.read_text(encoding="utf-8").strip()))
    return pairs


def find_examples(data: str, prompt: str | None) -> list[Example]:
    """The captioned images of --data (a folder, or one image captioned by --prompt). Images that PIL cannot
    decode are skipped with a warning; it is an error if none is left."""
    path = Path(data)
    if path.is_file():
        if prompt is None:
            raise UsageError("--data is a single image: give its caption with --prompt")
        pairs = [(path, prompt)]
    elif path.is_dir():
        if prompt is not None:
            raise UsageError("--prompt is for a single image; a folder's captions come from .txt files or "
                             "metadata.jsonl")
        pairs = captions_in_folder(path)
    else:
        raise UsageError(f"--data {data}: no such file or folder")
    examples = []
    for image, caption in pairs:
        why = unreadable(image)
        if why is not None:
            warnings.warn(f"{image}: skipped, not a readable image ({why})")
            continue
        examples.append(Example(image, caption))
    if not examples:
        raise UsageError(f"--data {data}: no readable, captioned image")
    return examples


def process_image(image: Image.Image, resolution: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A PIL image -> pixels (3, R, R) in [0, 1] and micro-conditioning (5,) [orig_width, orig_height, crop_top,
    crop_left, aesthetic score]: the shorter side resized to R (bilinear), then a random R x R crop.

    Matches reference: train_amused.py process_image: EXIF orientation applied, RGB, torchvision's Resize(R)
    (the longer side truncated to int) and RandomCrop.get_params (top drawn first, then left); the crop corner is in
    the resized image."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    W, H = image.size
    w, h = (resolution, int(resolution * H / W)) if W <= H else (int(resolution * W / H), resolution)
    image = image.resize((w, h), Image.BILINEAR)
    top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, R, R)
    return pixels, torch.tensor([W, H, top, left, AESTHETIC_SCORE], dtype=torch.float32)


class Data:
    """The examples in run order: epoch e visits them in epoch_order(seed, e), so example number g of the run is
    examples[order(g // n)[g % n]]: a pure function of the seed, with no loader state to save for --resume."""

    def __init__(self, examples: list[Example], resolution: int, seed: int):
        self.examples, self.resolution, self.seed = examples, resolution, seed
        self._orders = {}  # epoch -> permutation; only the current one or two are kept

    def __len__(self):
        return len(self.examples)

    def index(self, number: int) -> int:
        epoch, n = number // len(self), len(self)
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order(self.seed, epoch, n)
        return int(self._orders[epoch][number % n])

    def load(self, number: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Example `number` of the run -> (pixels (3, R, R), micro_conds (5,), caption). An image that has become
        unreadable since the start is replaced by the next one in the data set, with a warning, not a crash."""
        generator = example_generator(self.seed, number, DATA_STREAM)
        i = self.index(number)
        for k in range(len(self)):
            example = self.examples[(i + k) % len(self)]
            try:
                with Image.open(example.path) as image:
                    pixels, micro = process_image(image, self.resolution, generator)
                return pixels, micro, example.caption
            except Exception as e:  # any decoder failure, as in unreadable()
                warnings.warn(f"{example.path}: skipped, could not read it ({type(e).__name__}: {e}); "
                              f"using the next image")
        raise RuntimeError("none of the training images can be read any more")

    def fingerprint(self, root: str) -> str:
        """A hash of the (relative path, caption) list: --resume refuses a changed data set."""
        rows = [[str(e.path.relative_to(root) if Path(root).is_dir() else e.path.name), e.caption]
                for e in self.examples]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# The objective


def num_masked(t: torch.Tensor, seq_len: int, min_masking_rate: float = 0.0, schedule: str = "cosine") -> torch.Tensor:
    """How many of seq_len tokens to mask at training times t (B,) in [0, 1) -> (B,) long, each >= 1.

    Matches reference: round(L * max(mask_ratio(t), min_masking_rate)), at least one (cos(pi/2 * t) reaches 0 as
    t -> 1, and a sample with nothing masked would have no loss)."""
    ratio = mask_ratio(t, schedule).clamp(min=min_masking_rate)
    return (seq_len * ratio).round().clamp(min=1).long()


def mask_tokens(ids: torch.Tensor, generator: torch.Generator, mask_id: int, min_masking_rate: float = 0.0,
                schedule: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a random subset of each token grid. ids: (B, h, w) long -> (input_ids (B, h, w), mask_id where masked;
    labels (B, h, w), the original ids where masked and IGNORE elsewhere).

    Random draws, in order, on the generator's device: t (B,), then uniforms (B, L) whose argsort is a uniformly
    random permutation; the positions holding the num_masked smallest ranks are masked, a uniformly random subset of
    that size. Matches reference: train_amused.py (masked with the same draws, given the same generator)."""
    B, h, w = ids.shape
    L = h * w
    t = torch.rand(B, generator=generator, device=generator.device)
    n = num_masked(t, L, min_masking_rate, schedule)  # (B,)
    ranks = torch.rand(B, L, generator=generator, device=generator.device).argsort(dim=-1)  # (B, L)
    mask = (ranks < n[:, None]).view(B, h, w).to(ids.device)
    return torch.where(mask, mask_id, ids), torch.where(mask, ids, IGNORE)


def masked_count(seed: int, number: int, seq_len: int, min_masking_rate: float, schedule: str) -> int:
    """How many tokens example `number` of the run gets masked, without its image: mask_tokens' first draw, t,
    replayed from the example's objective stream."""
    t = torch.rand(1, generator=example_generator(seed, number, OBJECTIVE_STREAM))
    return int(num_masked(t, seq_len, min_masking_rate, schedule))


def drop_prompts(hidden, pooled, empty_hidden, empty_pooled, drop: torch.Tensor):
    """The text conditioning with the empty prompt's, (1, 77, D) and (1, P), in place of the samples' where `drop`
    (B,) bool is set. hidden: (B, 77, D), pooled: (B, P)."""
    return torch.where(drop[:, None, None], empty_hidden, hidden), torch.where(drop[:, None], empty_pooled, pooled)


def training_loss(transformer, input_ids, labels, text_hidden, pooled, micro_conds, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the U-ViT's logits at the masked positions (labels != IGNORE). input_ids, labels: (B, h, w);
    text_hidden (B, 77, D), pooled (B, P), micro_conds (B, 5). "mean" is the reference's loss, the mean over masked
    tokens; the training loop takes the "sum" and divides by the masked-token count of the whole global batch.

    Matches reference: train_amused.py: logits (B, K, h, w) -> (B*L, K), F.cross_entropy(ignore_index=-100)."""
    logits = transformer(input_ids, text_hidden, pooled, micro_conds)  # (B, K, h, w)
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
    """Examples `numbers` of the run, encoded by the frozen VQGAN and text encoder, masked, prompts dropped."""
    pixels, micro, captions = zip(*(data.load(g) for g in numbers))
    ids = pipe.vqvae.encode_to_ids(torch.stack(pixels).to(pipe.device))  # (B, h, w)
    input_ids, labels, drop = [], [], []
    for i, g in enumerate(numbers):
        generator = example_generator(data.seed, g, OBJECTIVE_STREAM)
        x, y = mask_tokens(ids[i:i + 1], generator, pipe.mask_id, min_masking_rate, schedule)
        input_ids.append(x)
        labels.append(y)
        # The reference keeps the prompt when uniform < p, i.e. drops it with probability 1 - p; here p is the
        # probability of dropping it. Drawn whatever p is, so that p does not change the other draws.
        drop.append(torch.rand((), generator=generator) < prompt_dropout)
    hidden, pooled = pipe.encode_prompt(list(captions))  # (B, 77, D), (B, P)
    hidden, pooled = drop_prompts(hidden, pooled, *empty, torch.stack(drop).to(pipe.device))
    return Batch(torch.cat(input_ids), torch.cat(labels), hidden, pooled, torch.stack(micro).to(pipe.device))


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


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Constant learning rate after a linear warm-up: step 0 (the first) gets lr / warmup_steps, not 0."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def make_optimizer(named: dict[str, nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999, eps 1e-8, as the reference), or bitsandbytes' 8-bit AdamW, with weight decay on all
    but the NO_DECAY parameters."""
    decay = [p for n, p in named.items() if not any(k in n for k in NO_DECAY)]
    no_decay = [p for n, p in named.items() if any(k in n for k in NO_DECAY)]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    if name == "adamw8bit":
        import bitsandbytes  # optional dependency; main() checked that it is installed
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


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes
    return f"peak RSS {rss / 2**30:.2f} GB"


# ----------------------------------------------------------------------------------------------------
# Files


def save_model(path: Path, pipe: Amused, schedule: str) -> None:
    """The whole pipeline as one file in convert_weights.py's format, which Amused.from_pretrained loads."""
    tensors = {f"{name}.{k}": t.detach().to("cpu").contiguous()
               for name in COMPONENTS for k, t in getattr(pipe, name).state_dict().items()}
    configs = {name: getattr(pipe, name).cfg for name in COMPONENTS}
    save_single_file(path, tensors, single_file_metadata(configs, pipe.tokenizer.files, pipe.mask_id, schedule))


def image_grid(images: list[Image.Image], cols: int = 4) -> Image.Image:
    cols = min(cols, len(images))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# ----------------------------------------------------------------------------------------------------
# Training


def resolve_device(name: str, local_rank: int) -> torch.device:
    """auto -> cuda if available, else cpu; an explicit device that is not there is an error. Under torchrun each
    process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS (Apple GPU) is not available here; use --device cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def main(checkpoint: str, data: str, out: str, prompt: str | None = None, variant: str | None = None,
         lora: bool = False, lora_rank: int = 16, lora_alpha: float = 32.0, lora_targets: str = "to_q,to_k,to_v",
         lr: float = 1e-4, warmup_steps: int = 0, weight_decay: float = 0.01, optimizer: str = "adamw",
         max_grad_norm: float | None = None, batch_size: int = 8, grad_accum: int = 1, max_steps: int = 1000,
         label_smoothing: float = 0.0, prompt_dropout: float = 0.0, min_masking_rate: float = 0.0,
         mixed_precision: str = "no", gradient_checkpointing: bool = False, ema: bool = False,
         ema_decay: float = 0.9999, save_every: int = 500, validate_every: int = 250,
         validation_prompts: list[str] | None = None, log_every: int = 10, seed: int = 0, device: str = "auto",
         resume: bool = False) -> int:
    """Train; returns the number of optimizer steps done in all (less than max_steps when interrupted)."""
    # ---- Checks that need no model: loading takes a while
    checks = [
        (lora_rank >= 1, f"--lora-rank must be >= 1, got {lora_rank}"),
        (lr > 0 and weight_decay >= 0, f"--lr must be > 0 and --weight-decay >= 0, got {lr}, {weight_decay}"),
        (min(batch_size, grad_accum, log_every) >= 1, "--batch-size, --grad-accum and --log-every must be >= 1"),
        (min(max_steps, warmup_steps, save_every, validate_every) >= 0,
         "--max-steps, --warmup-steps, --save-every and --validate-every must be >= 0"),
        (0 <= prompt_dropout <= 1, f"--prompt-dropout is a probability in [0, 1], got {prompt_dropout}"),
        (0 <= label_smoothing < 1 and 0 <= min_masking_rate <= 1,
         "--label-smoothing must be in [0, 1) and --min-masking-rate in [0, 1]"),
        (0 <= ema_decay < 1, f"--ema-decay must be in [0, 1), got {ema_decay}"),
        (max_grad_norm is None or max_grad_norm > 0, f"--max-grad-norm must be > 0, got {max_grad_norm}"),
        (0 <= seed < 2**30, f"--seed must be in [0, 2**30), got {seed}"),
        (mixed_precision in MIXED_PRECISION, f"--mixed-precision must be one of {list(MIXED_PRECISION)}"),
        (optimizer in ("adamw", "adamw8bit"), f"--optimizer must be adamw or adamw8bit, got {optimizer!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--optimizer adamw8bit needs bitsandbytes, which is not installed: pip install bitsandbytes "
                         "(CUDA only), or use --optimizer adamw")
    targets = [t for t in lora_targets.split(",") if t]
    out_dir = Path(out)
    state_path = out_dir / STATE_FILE
    if resume and not state_path.is_file():
        raise UsageError(f"--resume: there is no {state_path} to continue from")
    if not resume and state_path.exists():
        raise UsageError(f"{state_path} exists: pass --resume to continue that run, or choose another --out")
    # torchrun sets these; a plain `python train.py` is one process
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev = resolve_device(device, local_rank)
    with warnings.catch_warnings():
        if rank > 0:
            warnings.simplefilter("ignore")  # rank 0 reports the skipped images once
        examples = find_examples(data, prompt)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        # ---- Models: the text encoder and the VQGAN stay frozen, in fp32
        t0 = time.perf_counter()
        ckpt = load_checkpoint(checkpoint, variant)
        schedule = ckpt.masking_schedule  # "cosine" for the released models, the sampler's schedule
        pipe = Amused(ckpt, dev, torch.float32)
        transformer = pipe.transformer
        data_set = Data(examples, pipe.resolution, seed)
        log(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s: {pipe.resolution}x{pipe.resolution} images, "
            f"{pipe.grid_size}x{pipe.grid_size} tokens; {len(data_set)} training images")

        torch.manual_seed(seed)  # the LoRA initialisation
        transformer.train()
        params = trainable_parameters(transformer, lora, lora_rank, lora_alpha, targets)
        if lora:
            log(f"LoRA rank {lora_rank}, alpha {lora_alpha:g} on {len(params) // 2} layers ({', '.join(targets)})")
        if gradient_checkpointing:
            enable_gradient_checkpointing(transformer)
        model = DistributedDataParallel(transformer, device_ids=[dev.index] if dev.type == "cuda" else None) \
            if world > 1 else transformer
        opt = make_optimizer(params, optimizer, lr, weight_decay)
        scaler = torch.amp.GradScaler(dev.type, enabled=mixed_precision == "fp16")  # loss scaling: fp16 only
        autocast = torch.autocast(dev.type, dtype=MIXED_PRECISION[mixed_precision]) if mixed_precision != "no" \
            else contextlib.nullcontext()
        ema_params = [p.detach().clone() for p in params.values()] if ema else None
        empty = pipe.encode_prompt([""])  # the dropped prompt's conditioning, (1, 77, D) and (1, P)

        # What --resume must find unchanged for the run to continue exactly
        run = dict(lora=lora, lora_rank=lora_rank if lora else None, lora_alpha=lora_alpha if lora else None,
                   lora_targets=targets if lora else None, seed=seed, batch_size=batch_size, grad_accum=grad_accum,
                   world_size=world, data=data_set.fingerprint(data), ema=ema, mixed_precision=mixed_precision)
        step = 0
        if resume:
            state = torch.load(state_path, map_location=dev, weights_only=True)
            changed = {k: (state["run"].get(k), v) for k, v in run.items() if state["run"].get(k) != v}
            if state.get("version") != STATE_VERSION or changed:
                raise UsageError(f"{state_path} was saved by a different run: "
                                 + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state["params"][n])
                for e, s in zip(ema_params or [], state["ema"] or []):
                    e.copy_(s)
            opt.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"].cpu())
            if dev.type == "cuda" and state["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), dev)
            step = state["step"]
            log(f"resumed {state_path} at step {step}")

        G = batch_size * world * grad_accum  # the global batch
        L = pipe.grid_size ** 2
        n_trainable = sum(p.numel() for p in params.values())
        log("settings:")
        settings = dict(mode="LoRA" if lora else "full", trainable=f"{n_trainable:,} parameters", device=dev,
                        processes=world, batch=f"{batch_size} x {world} processes x {grad_accum} accumulation = {G}",
                        lr=f"{lr:g} (warm-up {warmup_steps} steps)", optimizer=optimizer,
                        mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                        ema=f"{ema_decay:g}" if ema else "off", prompt_dropout=prompt_dropout,
                        label_smoothing=label_smoothing, max_steps=max_steps, seed=seed, out=out_dir)
        for key, value in settings.items():
            log(f"  {key:<24}{value}")

        def save(step: int) -> None:
            """Training state, then the weights (the EMA ones when --ema), from rank 0; the others wait."""
            if rank == 0:
                state = {"version": STATE_VERSION, "step": step, "run": run,
                         "params": {n: p.detach() for n, p in params.items()},
                         "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "ema": ema_params,
                         "rng": {"torch": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}}
                atomic_write(state_path, lambda tmp: torch.save(state, tmp))
                with swapped_in(list(params.values()), ema_params):
                    if lora:
                        save_lora(out_dir / LORA_FILE, params, lora_rank, lora_alpha, targets)
                    else:
                        save_model(out_dir / MODEL_FILE, pipe, schedule)
                log(f"saved step {step}: {state_path}, {out_dir / (LORA_FILE if lora else MODEL_FILE)}")
            if world > 1:
                dist.barrier()

        def validate(step: int) -> None:
            with swapped_in(list(params.values()), ema_params), autocast:
                images = pipe(validation_prompts, generator=torch.Generator().manual_seed(seed))
            path = out_dir / f"validation-{step:06d}.png"
            atomic_write(path, lambda tmp: image_grid(images).save(tmp, format="PNG"))
            log(f"wrote {path}")

        # Ctrl-C and SIGTERM (what cluster schedulers send) ask for a stop at the end of the step, where the state is
        # consistent. A second Ctrl-C quits at once, but only a second later: torchrun forwards the terminal's
        # Ctrl-C to its workers, which so receive it twice within milliseconds.
        stop = []  # times of the stop requests

        def request_stop(signum, frame):
            if stop and signum == signal.SIGINT and time.monotonic() - stop[0] > 1.0:
                raise KeyboardInterrupt
            if not stop:
                log(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to quit without saving)")
            stop.append(time.monotonic())

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            t_log, n_log, losses = time.perf_counter(), 0, []
            while step < max_steps:
                lr_now = lr_at(step, lr, warmup_steps)
                for group in opt.param_groups:
                    group["lr"] = lr_now
                first = step * G  # examples first .. first + G - 1 of the run make up this step's global batch
                n_total = sum(masked_count(seed, first + j, L, min_masking_rate, schedule) for j in range(G))
                loss_sum = torch.zeros((), device=dev)
                for m in range(grad_accum):
                    start = first + (m * world + rank) * batch_size  # this process's share of micro-batch m
                    batch = make_batch(pipe, data_set, list(range(start, start + batch_size)), empty, prompt_dropout,
                                       min_masking_rate, schedule)
                    # DDP averages gradients over processes: the factor `world` turns that into the global sum
                    sync = world == 1 or m == grad_accum - 1
                    with (contextlib.nullcontext() if sync else model.no_sync()):
                        with autocast:
                            loss = training_loss(model, batch.input_ids, batch.labels, batch.text_hidden, batch.pooled,
                                                 batch.micro_conds, label_smoothing, reduction="sum")
                        scaler.scale(loss * (world / n_total)).backward()
                    loss_sum += loss.detach()
                if max_grad_norm is not None:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params.values(), max_grad_norm)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if ema_params is not None:
                    ema_update(ema_params, list(params.values()), step, ema_decay)
                step += 1

                # One all-reduce: the global batch's loss, and whether any process was asked to stop
                flags = torch.stack([loss_sum, torch.tensor(float(len(stop)), device=dev)])
                if world > 1:
                    dist.all_reduce(flags)
                losses.append(flags[0].item() / n_total)
                n_log += 1
                if step % log_every == 0 or step == max_steps:
                    dt = time.perf_counter() - t_log
                    entry = dict(step=step, loss=sum(losses) / len(losses), lr=lr_now, images_per_s=n_log * G / dt)
                    log(f"step {step}/{max_steps} loss {entry['loss']:.4f} lr {lr_now:.1e} "
                        f"{entry['images_per_s']:.1f} img/s {peak_memory(dev)}")
                    if rank == 0:
                        with open(out_dir / LOG_FILE, "a") as f:
                            f.write(json.dumps(entry) + "\n")
                    t_log, n_log, losses = time.perf_counter(), 0, []
                if flags[1] > 0:
                    break
                if validation_prompts and validate_every and step % validate_every == 0 and rank == 0:
                    validate(step)
                if save_every and step % save_every == 0 and step < max_steps:
                    save(step)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        save(step)
        if step < max_steps:
            log(f"interrupted at step {step}: continue with the same command and --resume")
        elif validation_prompts and rank == 0 and not (validate_every and step % validate_every == 0):
            validate(step)
        return step
    finally:
        if world > 1:
            # DDP's reducer holds the process group and gloo's pending work: free them while the interpreter is
            # whole, then destroy the group. Left to interpreter shutdown, gloo's threads can abort the process
            # ("terminate called without an active exception": seen once in CI, rank 1, after a finished run).
            model = None
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The docstring's layout kept, and every flag's default shown (they are the real ones)."""

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default="amused/amused-256",
                   help="hub-layout folder, file from convert_weights.py, or hub repo id (downloaded on first use)")
    p.add_argument("--variant", choices=["fp16"], default=None,
                   help="read the .fp16.safetensors files of a hub checkpoint (training still keeps fp32 weights)")
    p.add_argument("--data", required=True,
                   help="folder of images with NAME.txt captions or a metadata.jsonl; or one image with --prompt")
    p.add_argument("--prompt", default=None, help="the caption of a single --data image (style transfer)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, the weights, validation grids, log")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from --out/checkpoint.pt (same data and batch settings)")
    g = p.add_argument_group("what to train")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False,
                   help="train LoRA adapters instead of the whole U-ViT")
    g.add_argument("--lora-rank", type=int, default=16, help="inner width r of each adapter")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="the adapters' output is scaled by alpha / rank")
    g.add_argument("--lora-targets", default="to_q,to_k,to_v",
                   help="comma list: Linear layers whose names end with one of these get an adapter")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4,
                   help="learning rate; the reference recipes: full 1e-4 (amused-256) or 8e-5 (512), LoRA 8e-4 "
                        "(256) or 1e-4 (512), single-image style 4e-4")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then constant")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW's; not on embeddings, biases and the layer_norm weights, as the reference")
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
    g.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="auto: cuda, else cpu")
    g.add_argument("--seed", type=int, default=0, help="data order, crops, masks, prompt dropout, LoRA init")
    g = p.add_argument_group("progress")
    g.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps")
    g.add_argument("--save-every", type=int, default=500, help="save every N steps (0: only at the end)")
    g.add_argument("--validate-every", type=int, default=250, help="sample --validation-prompts every N steps")
    g.add_argument("--validation-prompts", nargs="+", default=None, help="prompts for the validation grids")
    args = p.parse_args()
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        done = main(**vars(args))
    except (UsageError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: quit without saving", file=sys.stderr)
        sys.exit(130)
    sys.exit(130 if done < args.max_steps else 0)
