r"""bench/train_data.py: training throughput from images (train.py's path: decode, resize, crop and VQ-encode every
example in every step) against from token shards (prepare_data.py's, encoded once), side by side in one process.

    python bench/train_data.py                                        # the tiny and the amused-256 configuration
    python bench/train_data.py --sizes amused-256 --rounds 4 --steps 2 --batch-size 2
    python bench/train_data.py --sizes amused-256 --mixed-precision bf16    # the U-ViT autocast, as train.py's flag

Per configuration: a random-weight checkpoint (timing does not depend on the weight values: tiny is tests/conftest.py's,
amused-256 the official configuration, built once into --work by bench/measure.py), --images captioned JPEGs of a
web photo's size (--image-size, 4:3, with noise so that they do not compress to nothing), and prepare_data.py's token
shards of them, one view each: its encode speed (images/s, one process) and the bytes per stored example are
measured there. Then one pipeline and one optimizer train in rounds: each round runs --steps optimizer steps from the
images, then --steps from the tokens (train.accumulate_gradients and train.optimizer_step, what train.py's loop
runs), after a warm-up step of each. Every step is timed, and within it the time it waited for its data
(Data.load: reading, decoding and cropping the images, or reading the token rows) and the optimizer's update; on
the images path, the VQ encode of a step's pixels is timed alone once per round. Printed: the medians per path with
their spread, images/s, the ratio tokens/images, the machine.

    python bench/train_data.py --memory          # what a full fine-tune of amused-256/512 holds per GPU

--memory: the bytes a full fine-tuning (or from-scratch) run holds per process: the trained U-ViT's fp32 weights,
gradients and AdamW's two moments (16 bytes a parameter), the frozen VQ and text encoder (fp32, as train.py keeps
them), and the activations autograd stores for the backward pass, measured on the CPU (saved-tensor hooks; a
forward of a batch of 2 at random weights) with and without bf16 autocast and gradient checkpointing. Not counted:
the CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation (typically 1-3 GB on a GPU), and the
transient tensors of the backward pass.
"""
import argparse
import contextlib
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import clip_text
import prepare_data
import speed
import train
import uvit
import vqgan
from data import Data, check_tokens_fit, find_source, step_examples, vq_fingerprint


def checkpoint(size: str, work: Path) -> str:
    """The random-weight checkpoint of `size` in the hub layout, built into `work` on first use (diffusers)."""
    if size != "tiny":
        from measure import hub_checkpoint
        return str(hub_checkpoint(size, work / size))
    from conftest import reference_pipeline, save_hub_checkpoint, write_tiny_tokenizer
    folder = work / "tiny"
    if not (folder / "model_index.json").exists():
        tok = write_tiny_tokenizer(work / "tiny-tokenizer")
        save_hub_checkpoint(reference_pipeline("tiny", tok, seed=5), folder, tok)
    return str(folder)


def write_images(folder: Path, n: int, width: int, height: int) -> None:
    """n JPEGs (quality 90) of smooth random colour fields with noise, each with a NAME.txt caption."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        low = torch.rand(1, 3, 6, 8, generator=g)
        image = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear")[0]
        image = (image + 0.08 * torch.randn(image.shape, generator=g)).clamp(0, 1)
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"a photo of a colourful blur, number {i}")


class Trainer:
    """One pipeline and one optimizer, full fine-tuning as train.py sets it up, stepping on either data set."""

    def __init__(self, ckpt: str, batch_size: int, mixed_precision: str):
        self.autocast = train.autocast_context(mixed_precision, torch.device("cpu"))  # as train.py: the U-ViT only
        self.pipe = train.load_pipeline(ckpt, None, None, None, 0, torch.device("cpu"), 0)
        params = train.trainable_parameters(self.pipe.transformer.train(), False, 16, 32.0, [])
        self.model = train.training_model(self.pipe.transformer, False, torch.device("cpu"), 1)
        self.state = train.TrainingState(params, train.make_optimizer(params, "adamw", 1e-4, 0.01),
                                         torch.amp.GradScaler("cpu", enabled=False), None)
        self.empty = self.pipe.encode_prompt([""])
        self.batch_size, self.step = batch_size, 0

    def train_step(self, data_set: Data) -> tuple[float, float, float]:
        """One optimizer step on the next batch of data_set -> (seconds, of which waiting for data, of which the
        optimizer's update)."""
        seq_len = self.pipe.transformer.cfg.sample_size ** 2
        t0, d0 = time.perf_counter(), data_set.load_seconds
        global_batch, micro_batches = step_examples(self.step, self.batch_size, 1, 0, 1)
        n_masked = sum(train.example_mask_count(0, g, seq_len, 0.0, self.pipe.schedule) for g in global_batch)
        train.accumulate_gradients(self.model, self.pipe, data_set, self.empty, micro_batches, n_masked, 0.0, 0.0, 0.0,
                                   self.state.scaler, self.autocast, 1)
        t_update = time.perf_counter()
        train.optimizer_step(self.state, 1e-4, self.step, None, 0.9999)
        self.step += 1
        now = time.perf_counter()
        return now - t0, data_set.load_seconds - d0, now - t_update

    @torch.no_grad()
    def vq_seconds(self, data_set: Data) -> float:
        """The VQ encode alone of one batch of data_set's crops."""
        pixels = torch.stack([data_set.load(g).pixels for g in range(self.batch_size)])
        t0 = time.perf_counter()
        self.pipe.vqvae.encode_to_ids(pixels)
        return time.perf_counter() - t0


DEFAULTS = {"tiny": {"batch_size": 8, "steps": 10}, "amused-256": {"batch_size": 2, "steps": 2}}  # per step: ms, 30 s


def spread(values: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    return (f"{statistics.median(values) * scale:{fmt}} ({min(values) * scale:{fmt}}-{max(values) * scale:{fmt}})")


def bench(size: str, args) -> dict:
    batch_size, steps = (getattr(args, k) or DEFAULTS[size][k] for k in ("batch_size", "steps"))
    work = Path(args.work)
    ckpt = checkpoint(size, work)
    images = work / f"{size}-images"
    if len(list(images.glob("*.jpg"))) != args.images:  # made by an earlier run with another --images
        shutil.rmtree(images, ignore_errors=True)
        write_images(images, args.images, *args.image_size)
    tokens = work / f"{size}-tokens"
    if tokens.exists():
        for f in tokens.glob("tokens-*.safetensors"):
            f.unlink()  # encoded anew, to time it
    print(f"\n== {size}: prepare_data.py on {args.images} JPEGs of {args.image_size[0]}x{args.image_size[1]}",
          flush=True)
    prep = prepare_data.main(checkpoint=ckpt, data=str(images), out=str(tokens), batch_size=args.prepare_batch,
                             device="cpu")
    trainer = Trainer(ckpt, batch_size, args.mixed_precision)
    pipe = trainer.pipe
    paths = {"images": Data(find_source(str(images), None).shards, pipe.resolution, 0),
             "tokens": Data(find_source(str(tokens), None).shards, pipe.resolution, 0)}
    check_tokens_fit(find_source(str(tokens), None), vq_fingerprint(pipe.vqvae), pipe.resolution,
                     pipe.transformer.cfg.sample_size, pipe.transformer.cfg.codebook_size)
    for name, data_set in paths.items():  # warm-up: first calls, allocator, page cache
        trainer.train_step(data_set)
    times, waits, updates = ({name: [] for name in paths} for _ in range(3))
    vq = []
    for r in range(args.rounds):
        for name, data_set in paths.items():
            for _ in range(steps):
                seconds, waited, update = trainer.train_step(data_set)
                times[name].append(seconds)
                waits[name].append(waited)
                updates[name].append(update)
        vq.append(trainer.vq_seconds(paths["images"]))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {statistics.median(t[-steps:]):.3f} s/step"
                                                               for n, t in times.items()), flush=True)
    B = batch_size
    rate = {n: B / statistics.median(t) for n, t in times.items()}
    precision = "fp32" if args.mixed_precision == "no" else f"{args.mixed_precision} autocast"
    print(f"\n{size}, batch {B}, U-ViT in {precision}, {args.rounds} rounds x {steps} steps per path, "
          f"{torch.get_num_threads()} "
          f"threads, {speed.cpu_description()}, torch {torch.__version__}")
    print("| path | s/step, median (min-max) | images/s | waiting for data, ms/step | VQ encode, s/step | "
          "AdamW update, s/step |")
    print("|---|---|---|---|---|---|")
    for n in paths:
        encode = spread(vq) if n == "images" else "none"
        print(f"| from {n} | {spread(times[n], fmt='.3f')} | {rate[n]:.3g} | {spread(waits[n], 1000, '.2f')} | "
              f"{encode} | {spread(updates[n])} |")
    ratio = rate["tokens"] / rate["images"]
    vq_share = statistics.median(vq) / statistics.median(times["images"])
    fastest = min(times["images"]) / min(times["tokens"])  # the least disturbed steps: steadier on shared cores
    print(f"tokens / images: {ratio:.2f}x images/s ({fastest:.2f}x by the fastest step of each); the VQ encode is "
          f"{vq_share:.0%} of an images step; "
          f"prepare_data.py: {prep['images_per_s']:.2f} images/s (1 process), "
          f"{prep['bytes_per_example']:.0f} bytes per stored example (1 view)", flush=True)
    return {"ratio": ratio, "rate": rate, "prepare": prep}


def stored_bytes(model: uvit.UViT, batch: int, autocast) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward (each storage once), the
    parameters themselves not counted (they are in the 16 bytes a parameter)."""
    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.codebook_size, (batch, cfg.sample_size, cfg.sample_size), generator=g)
    input_ids, labels = train.mask_tokens(ids, g, cfg.vocab_size - 1)
    hidden = torch.randn(batch, 77, cfg.encoder_hidden_size, generator=g)
    pooled = torch.randn(batch, cfg.cond_embed_dim, generator=g)
    micro = torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]]).repeat(batch, 1)
    seen, params = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        train.training_loss(model, input_ids, labels, model.encode_conditions(hidden, pooled, micro))
    return sum(seen.values())


def memory(sizes: list[str]) -> None:
    """The table of --memory: per process, GiB. Activations are measured at batch 1 and 2: the difference is what
    each image adds; what batch 1 holds beyond it is per step whatever the batch (autocast's bf16 weight copies)."""
    GiB = 2**30
    with torch.device("meta"):
        frozen = sum(p.numel() for m in (vqgan.VQModel(vqgan.PRESETS["amused"]),
                                         clip_text.CLIPTextEncoder(clip_text.PRESETS["clip-vit-large-patch14"]))
                     for p in m.parameters()) * 4
    print(f"per process, GiB; activations measured on {speed.cpu_description()}, torch {torch.__version__}")
    print("| model | U-ViT weights + grads + AdamW | frozen VQ + text encoder | activations per image (+ per step): "
          "fp32 / bf16 autocast / bf16 autocast + gradient checkpointing |")
    print("|---|---|---|---|")
    for size in sizes:
        torch.manual_seed(0)
        model = uvit.UViT(uvit.PRESETS[size]).train()
        P = sum(p.numel() for p in model.parameters())
        cells = []
        for checkpointing, autocast in [(False, None), (False, torch.bfloat16), (True, torch.bfloat16)]:
            if checkpointing:
                train.enable_gradient_checkpointing(model)  # in place, so last
            context = torch.autocast("cpu", autocast) if autocast else contextlib.nullcontext()
            one, two = (stored_bytes(model, b, context) for b in (1, 2))
            cells.append(f"{(two - one) / GiB:.3f} (+ {(2 * one - two) / GiB:.2f})")
        print(f"| {size} ({P / 1e6:.0f} M parameters) | {16 * P / GiB:.2f} | {frozen / GiB:.2f} | "
              + " / ".join(cells) + " |", flush=True)
        del model


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=["tiny", "amused-256", "amused-512"], default=["tiny", "amused-256"],
                   help="the throughput benchmark: tiny, amused-256; --memory: amused-256, amused-512")
    p.add_argument("--work", default="/tmp/amused-train-data", help="checkpoints, images and token shards, kept")
    p.add_argument("--images", type=int, default=32, help="JPEGs in the data set")
    p.add_argument("--image-size", type=int, nargs=2, default=[512, 384], metavar=("W", "H"))
    p.add_argument("--batch-size", type=int, default=None, help=f"images per step; None: {DEFAULTS}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="steps per path per round; None: as --batch-size")
    p.add_argument("--prepare-batch", type=int, default=8, help="prepare_data.py --batch-size")
    p.add_argument("--mixed-precision", choices=list(train.MIXED_PRECISION), default="no",
                   help="train.py's --mixed-precision: autocast of the U-ViT (bf16 is fast on CPUs with AVX512-BF16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads; None: torch's default")
    p.add_argument("--memory", action="store_true", help="print the memory table of --sizes' U-ViTs instead "
                                                         "(amused-256, amused-512; see above)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        memory(args.sizes)
    for size in [] if args.memory else args.sizes:
        bench(size, args)
