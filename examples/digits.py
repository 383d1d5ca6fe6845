r"""examples/digits.py: a whole aMUSEd trained from scratch on a CPU in minutes, and a judge of what it draws.

    python examples/digits.py --out runs/digits                  # data -> VQ -> U-ViT -> judged results, pictures
    python examples/digits.py --out runs/digits --resume         # after Ctrl-C: the stages done are skipped
    python sample.py "a handwritten digit 7" --checkpoint runs/digits/model.safetensors --out seven.png
    python examples/digits_figures.py --run runs/digits --out runs/digits/figures  # docs/how-it-works.md's pictures
    python examples/digits.py --out runs/digits-tokens --tokens  # train.py on prepare_data.py's token shards

What nanoGPT's shakespeare_char is for language models: a model small enough to train on a laptop's CPU that
visibly works, so that the training objective, the sampler and classifier-free guidance can be seen to learn and
draw something real without a 3.5 GB download and a GPU. The data are scikit-learn's bundled handwritten digits
(1,797 grayscale 8x8 images, 10 classes, no download), upscaled 2x to 16x16; the caption of a digit k is exactly
"a handwritten digit k". Stages, each with its timing, the long ones with their progress and time left (ETA):

  1. data: a fixed, seeded, stratified split (75% train, 25% held out); the train split written as PNGs with
     captions (train.py's data folder layout, metadata.jsonl).
  2. judge, fixed before anything is trained: an SVC on the real training split's 8x8 pixels. Its accuracy on the
     held-out real digits is the ceiling for the generated ones.
  3. tokenizer: our vqgan.VQModel at a small config, trained from scratch with the VQ-VAE objective (van den Oord
     et al. 2017: reconstruction, codebook and commitment losses, straight-through gradients), the codebook
     initialised by k-means on the encoder's outputs and dead codes restarted on data. Reported: held-out
     reconstruction error, codebook perplexity and unused codes.
  4. text: a BPE vocabulary trained on the ten captions (clip_text.train_bpe_files) and a small CLIP text encoder
     with fixed, seeded *random* weights. Plainly: nothing about language is learnt here; the encoder only has to
     give ten different captions ten different embeddings, which random weights do. The U-ViT learns what they
     mean.
  5. U-ViT: trained from scratch by train.py itself (--init-transformer), the VQ and the text encoder frozen, with
     prompt dropout so that classifier-free guidance works. With --tokens, prepare_data.py first encodes the
     training digits into token shards once, and train.py trains on those instead of the images: at 16x16 px there
     is one crop per image, and the 1,347 digits make one shard, whose order is the folder's, so it trains on the
     same tokens in the same order, without a VQ encode per step. The result, DIR/model.safetensors, is a
     complete checkpoint in convert_weights.py's single-file format: Amused.from_pretrained and sample.py load it.
  6. judged results (DIR/results.json, DIR/results.md): at the pipeline's defaults (12 steps, guidance 10) and at
     guidance 4, over the recipe's images per class (full: 50; quick: 4): the judge's accuracy for the prompted
     class, overall and per class; diversity (mean pairwise distance of a class's samples over that of the held-out
     real digits of the class: one drawing per class, whatever the seed, scores 0); the Frechet distance to the
     held-out digits in pixel space, with real-vs-real as its floor; and accuracy against steps (1, 2, 4, 8, 12)
     and guidance (1, 2, 4, 10).
  7. pictures, enlarged 8x (nearest neighbour): DIR/samples.png, ten samples of each digit (a row per digit, at
     the pipeline's defaults), and DIR/unmasking.gif, one of each digit unmasked step by step. More pictures, with
     the page docs/how-it-works.md around them, from the finished run and without training again:
     examples/digits_figures.py.

Interrupted (Ctrl-C stops train.py after its step, which saves), the same command with --resume goes on: the stages
that finished (DIR/run.json records them) are skipped, the U-ViT continues from train.py's checkpoint (as train.py
--resume does, to the same weights), and a finished run does no work at all.

scikit-learn is a dependency of this example and of the tests, never of the product (requirements-dev.txt).
"""
import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's flat modules

import cli  # noqa: E402
import clip_text  # noqa: E402
import digits_figures  # noqa: E402 (examples/: the pictures)
import prepare_data  # noqa: E402
import sampling  # noqa: E402
import speed  # noqa: E402
import train  # noqa: E402
import uvit  # noqa: E402
import vqgan  # noqa: E402
from amused import Amused  # noqa: E402
from convert_weights import COMPONENTS, save_single_file, single_file_metadata, write_sampling_defaults  # noqa: E402

CAPTIONS = [f"a handwritten digit {k}" for k in range(10)]
RESOLUTION = 16  # pixels per side: the 8x8 digits upscaled 2x (nearest), so the VQ's 2x downsampling keeps 8x8 tokens
GUIDANCES, STEP_COUNTS = (1.0, 2.0, 4.0, 10.0), (1, 2, 4, 8, 12)  # the accuracy table's columns and rows

# ----------------------------------------------------------------------------------------------------
# The three models: small versions of the official architectures (vqgan.PRESETS, clip_text.PRESETS, uvit.PRESETS)

# 16 codes: of 8, 16, 32 and 64 (each reconstructing well enough for the judge to read 99% of the held-out
# digits), 16 gave the U-ViT the best drawings; see the README
VQ = vqgan.VQConfig(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                    latent_channels=16, num_vq_embeddings=16, norm_num_groups=8, force_upcast=False)
TEXT_WIDTH = 32  # the text encoder's hidden and projection width; its vocab_size is the trained vocabulary's
UVIT = uvit.UViTConfig(hidden_size=64, cond_embed_dim=TEXT_WIDTH, micro_cond_encode_dim=8, micro_cond_embed_dim=40,
                       encoder_hidden_size=TEXT_WIDTH, vocab_size=VQ.num_vq_embeddings + 1,  # + the mask id
                       codebook_size=VQ.num_vq_embeddings, in_channels=32, block_out_channels=32, num_res_blocks=1,
                       downsample=False, upsample=False, block_num_heads=2, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, layer_norm_eps=1e-6,
                       sample_size=RESOLUTION // VQ.downsample_factor)


@dataclass(frozen=True)
class Recipe:
    """How long and how hard each stage trains, and how much the judge generates."""
    vq_steps: int
    vq_batch: int
    vq_lr: float  # Adam; a 50-step warm-up, then a cosine down to a tenth
    uvit_steps: int
    uvit_batch: int
    uvit_lr: float  # train.py's AdamW: a linear warm-up, then a cosine down to 0 (--lr-schedule cosine)
    uvit_warmup: int
    prompt_dropout: float  # the probability of training on the empty prompt: what guidance needs
    per_class: int  # images per class at 12 steps (guidance 10 and 4)
    table_per_class: int  # images per class in each cell of the steps x guidance table


RECIPES = {
    "full": Recipe(vq_steps=600, vq_batch=64, vq_lr=2e-3, uvit_steps=2500, uvit_batch=64, uvit_lr=3e-3,
                   uvit_warmup=100, prompt_dropout=0.15, per_class=50, table_per_class=20),
    # the test suite's: well under a minute, enough for the losses to fall, not for good digits
    "quick": Recipe(vq_steps=150, vq_batch=32, vq_lr=2e-3, uvit_steps=60, uvit_batch=32, uvit_lr=3e-3,
                    uvit_warmup=10, prompt_dropout=0.15, per_class=4, table_per_class=2),
}
MAX_GRAD_NORM = 1.0  # the U-ViT's gradient clipping
RUN_FILE = "run.json"  # the run's settings, and the seconds of every stage finished: what --resume reads


def log(message: str) -> None:
    print(message, flush=True)


def save_run(out_dir: Path, run: dict) -> None:
    cli.atomic_write(out_dir / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(run, indent=2)))


def start_run(out_dir: Path, settings: dict, resume: bool) -> dict:
    """The run's record (RUN_FILE): a new one, or with resume the one in out_dir, which must have these settings."""
    path = out_dir / RUN_FILE
    if not resume:
        if path.exists() or (out_dir / "train").exists():
            raise cli.UsageError(f"{out_dir} holds a run already: add --resume to finish it, choose another --out, "
                                 f"or remove {out_dir}")
        out_dir.mkdir(parents=True, exist_ok=True)
        run = {"settings": settings, "seconds": {}, "interrupted": {}}
        save_run(out_dir, run)
        return run
    if not path.is_file():
        raise cli.UsageError(f"--resume: {out_dir} holds no run to finish (no {RUN_FILE}); leave out --resume to "
                             "start one")
    run = json.loads(path.read_text())
    changed = [f"--{key} was {was}, now {settings[key]}" for key, was in run["settings"].items()
               if settings[key] != was]
    if changed:
        raise cli.UsageError(f"--resume: {out_dir} was run with other settings ({'; '.join(changed)}): pass the "
                             "ones of its first run")
    return run


def done(out_dir: Path, run: dict, stage: str, *outputs: str) -> bool:
    """Whether `stage` finished in an earlier session (then it is skipped); its outputs must still be there."""
    if stage not in run["seconds"]:
        return False
    for name in outputs:
        if not (out_dir / name).exists():
            raise cli.UsageError(f"{out_dir / name} is missing, though {out_dir / RUN_FILE} records the {stage} stage "
                                 "done: start again in another --out")
    log("  done already, skipped")
    return True


def finished(out_dir: Path, run: dict, stage: str, seconds: float) -> None:
    """Record that `stage` finished in `seconds` (plus those of its interrupted sessions), and print it."""
    run["seconds"][stage] = seconds + run["interrupted"].pop(stage, 0.0)
    save_run(out_dir, run)
    log(f"{stage}: {run['seconds'][stage]:.1f} s")


# ----------------------------------------------------------------------------------------------------
# 1. Data, and 2. the judge


def load_digits(seed: int):
    """-> (x_train, y_train, x_test, y_test): 8x8 pixels (N, 64) in 0..16 and labels, a stratified 75/25 split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise cli.UsageError("this example needs scikit-learn: pip install -r requirements-dev.txt") from None
    digits = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data.astype(np.float32), digits.target,
                                                        test_size=0.25, stratify=digits.target, random_state=seed)
    return x_train, y_train, x_test, y_test


def to_images(pixels8: np.ndarray) -> torch.Tensor:
    """8x8 digits (N, 64) in 0..16 -> RGB images (N, 3, 16, 16) in [0, 1], each pixel repeated 2x2."""
    images = torch.from_numpy(pixels8).view(-1, 1, 8, 8) / 16
    return F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="nearest").repeat(1, 3, 1, 1)


def to_pixels8(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1] -> what the judge reads: gray, averaged back to 8x8, (N, 64) in 0..16."""
    gray = images.float().mean(dim=1, keepdim=True)  # (N, 1, H, W)
    return (F.adaptive_avg_pool2d(gray, 8).flatten(1) * 16).numpy()


def write_data_folder(folder: Path, images: torch.Tensor, labels: np.ndarray, captions: list[str] = CAPTIONS) -> None:
    """The images as PNGs with their captions (captions[label]) in metadata.jsonl: train.py's --data layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{i:04d}.png"
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": captions[label]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def fit_judge(x_train: np.ndarray, y_train: np.ndarray):
    """The classifier that reads the generated digits, trained on real training pixels only."""
    from sklearn.svm import SVC

    return SVC(gamma=0.001).fit(x_train, y_train)  # the scikit-learn digits example's classifier


# ----------------------------------------------------------------------------------------------------
# 3. The tokenizer: a VQ-VAE (van den Oord et al. 2017), trained from scratch


def nearest_codes(vq: vqgan.VQModel, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, C, h, w) -> their nearest codebook entries' ids (B, h, w) and vectors (B, C, h, w)."""
    B, C, h, w = z.shape
    codebook = vq.quantize.embedding.weight  # (K, C)
    ids = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, C), codebook).argmin(dim=1)  # (B*h*w,)
    return ids.view(B, h, w), codebook[ids].view(B, h, w, C).permute(0, 3, 1, 2)


@torch.no_grad()
def kmeans_codebook_(vq: vqgan.VQModel, images: torch.Tensor, generator: torch.Generator, iters: int = 10) -> None:
    """Set the codebook to k-means centres of the encoder's latents: every entry starts where latents are, so
    none is dead from the start (a randomly initialised codebook loses most of its entries that way)."""
    K = vq.cfg.num_vq_embeddings
    sample = images[torch.randperm(len(images), generator=generator)[:512]]
    z = vq.quant_conv(vq.encoder(sample))
    z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, C)
    centres = z[torch.randperm(len(z), generator=generator)[:K]].clone()  # (K, C)
    for _ in range(iters):  # Lloyd's iterations; an empty cluster takes a random latent
        nearest = torch.cdist(z, centres).argmin(dim=1)
        for k in range(K):
            members = z[nearest == k]
            centres[k] = members.mean(0) if len(members) else z[torch.randint(len(z), (1,), generator=generator)][0]
    vq.quantize.embedding.weight.copy_(centres)


def train_vq(images: torch.Tensor, recipe: Recipe, seed: int, beta: float = 0.25) -> vqgan.VQModel:
    """A VQModel of config VQ trained on `images` (N, 3, 16, 16) in [0, 1]. The first sixth of the steps trains
    the autoencoder unquantized; then k-means sets the codebook and the VQ-VAE loss takes over:
    |x - decode(z_q)|^2 + |sg[z] - e|^2 + beta |z - sg[e]|^2, with e the nearest code to the encoder's z and
    z_q = e forward but z backward (straight-through). Every 100 steps until the last third, the codes no latent
    chose since the last restart move onto random latents of the batch."""
    torch.manual_seed(seed)
    vq = vqgan.VQModel(VQ)
    optimizer = torch.optim.Adam(vq.parameters(), lr=recipe.vq_lr)
    generator = torch.Generator().manual_seed(seed)
    warmup, usage, t0 = recipe.vq_steps // 6, torch.zeros(VQ.num_vq_embeddings), time.perf_counter()
    for step in range(recipe.vq_steps):
        for group in optimizer.param_groups:  # cosine decay to a tenth, after a 50-step warm-up
            group["lr"] = (recipe.vq_lr * min(1, (step + 1) / 50)
                           * (0.55 + 0.45 * math.cos(math.pi * step / recipe.vq_steps)))
        x = images[torch.randint(len(images), (recipe.vq_batch,), generator=generator)]
        z = vq.quant_conv(vq.encoder(x))  # (B, C, h, w)
        if step < warmup:
            loss = F.mse_loss(vq.decoder(vq.post_quant_conv(z)), x)
        else:
            if step == warmup:
                kmeans_codebook_(vq, images, generator)
            ids, e = nearest_codes(vq, z)
            z_q = z + (e - z).detach()  # straight-through: the decoder sees e, the encoder gets its gradient
            loss = (F.mse_loss(vq.decoder(vq.post_quant_conv(z_q)), x) + F.mse_loss(e, z.detach())
                    + beta * F.mse_loss(z, e.detach()))
            usage += torch.bincount(ids.flatten(), minlength=VQ.num_vq_embeddings)
            if (step + 1) % 100 == 0 and step + 1 < recipe.vq_steps * 2 // 3:
                restart_dead_codes_(vq, usage, z.detach(), generator)
                usage.zero_()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == recipe.vq_steps - 1:
            eta = cli.time_left(time.perf_counter() - t0, step + 1, recipe.vq_steps - step - 1)
            log(f"  VQ step {step + 1}/{recipe.vq_steps}: loss {loss.item():.5f}, ETA {eta}")
    return vq.eval().requires_grad_(False)


@torch.no_grad()
def restart_dead_codes_(vq: vqgan.VQModel, usage: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> None:
    dead = (usage == 0).nonzero().flatten()
    z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, C)
    picks = z[torch.randint(len(z), (len(dead),), generator=generator)]
    vq.quantize.embedding.weight[dead] = picks + 0.01 * torch.randn(picks.shape, generator=generator)


@torch.no_grad()
def vq_report(vq: vqgan.VQModel, images: torch.Tensor) -> dict:
    """Reconstruction MSE (pixels in [0, 1]), codebook perplexity and unused codes on `images`."""
    ids = vq.encode_to_ids(images)
    mse = F.mse_loss(vq.decode_ids(ids), images).item()
    counts = torch.bincount(ids.flatten(), minlength=VQ.num_vq_embeddings).float()
    p = counts[counts > 0] / counts.sum()
    return dict(mse=mse, perplexity=math.exp(-(p * p.log()).sum().item()), unused=int((counts == 0).sum()))


# ----------------------------------------------------------------------------------------------------
# 4. The text side, and the checkpoint train.py starts from


def text_side(seed: int) -> tuple[dict[str, str], clip_text.CLIPTextEncoder]:
    """(tokenizer files, text encoder): a BPE trained on the captions, and a small CLIP with seeded random weights."""
    files = clip_text.train_bpe_files(" ".join(CAPTIONS))
    tokenizer = clip_text.CLIPTokenizer(files)
    ids = tokenizer(CAPTIONS + [""])  # (11, 77)
    assert len({tuple(row.tolist()) for row in ids}) == 11, "two captions tokenize alike"
    cfg = clip_text.CLIPTextConfig(vocab_size=len(json.loads(files["vocab.json"])), hidden_size=TEXT_WIDTH,
                                   intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=TEXT_WIDTH,
                                   eos_token_id=2)  # 2: pool at the argmax id, <|endoftext|> (the last in the vocab)
    torch.manual_seed(seed)
    return files, clip_text.CLIPTextEncoder(cfg).eval().requires_grad_(False)


def write_start_checkpoint(path: Path, vq: vqgan.VQModel, text_encoder: clip_text.CLIPTextEncoder,
                           tokenizer_files: dict[str, str], seed: int) -> None:
    """A complete single-file checkpoint: the trained VQ, the text encoder, the tokenizer, and a U-ViT of config
    UVIT with fresh weights (train.py --init-transformer replaces them with its own seeded ones)."""
    torch.manual_seed(seed)
    models = {"text_encoder": text_encoder, "vqvae": vq, "transformer": uvit.UViT(UVIT)}
    tensors = {f"{name}.{k}": t.contiguous() for name in COMPONENTS for k, t in models[name].state_dict().items()}
    meta = single_file_metadata({name: models[name].cfg for name in COMPONENTS}, tokenizer_files,
                                mask_token_id=UVIT.vocab_size - 1, masking_schedule="cosine")
    save_single_file(path, tensors, meta)


# ----------------------------------------------------------------------------------------------------
# 6. The judge's figures


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of a and b: |mu_a - mu_b|^2 + Tr(S_a + S_b -
    2 (S_a^1/2 S_b S_a^1/2)^1/2), the FID formula (Heusel et al. 2017), here on 8x8 pixels rather than Inception
    features. The matrix square roots through symmetric eigendecompositions."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ s_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def mean_pairwise_distance(x: np.ndarray) -> float:
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))  # (n, n)
    return float(d.sum() / (len(x) * (len(x) - 1)))


@torch.no_grad()
def generate(pipe: Amused, per_class: int, steps: int, guidance: float, seed: int,
             captions: list[str] = CAPTIONS) -> tuple[np.ndarray, np.ndarray]:
    """per_class images of each digit (captions[k] for digit k) -> their 8x8 pixels (10 * per_class, 64) and the
    prompted labels."""
    images = pipe(captions, steps=steps, guidance_scale=guidance, num_images_per_prompt=per_class,
                  generator=torch.Generator().manual_seed(seed), output_type="pt")  # [p0..p9, p0..p9, ...]
    return to_pixels8(images), np.tile(np.arange(10), per_class)


def judge_samples(judge, pixels: np.ndarray, labels: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """Accuracy for the prompted class (overall, per class), diversity against the held-out digits, Frechet distance."""
    predicted = judge.predict(pixels)
    per_class = [float((predicted[labels == k] == k).mean()) for k in range(10)]
    diversity = [mean_pairwise_distance(pixels[labels == k]) / mean_pairwise_distance(x_test[y_test == k])
                 for k in range(10)]
    return dict(accuracy=float((predicted == labels).mean()), per_class=per_class, diversity=float(np.mean(diversity)),
                diversity_min=float(np.min(diversity)), frechet=frechet_distance(pixels, x_test))


def passes(per_class: int, steps: int, guidance: float) -> int:
    """U-ViT passes of a generate() call: the evaluation's unit of work, for its ETA."""
    return 10 * per_class * sampling.passes_per_image([guidance] * steps)


def evaluate(pipe: Amused, judge, x_train, y_train, x_test, y_test, recipe: Recipe, seed: int) -> dict:
    """Every figure of results.md: the ceilings, the two 12-step settings, the steps x guidance table."""
    reconstructions = to_pixels8(pipe.vqvae.decode_ids(pipe.vqvae.encode_to_ids(to_images(x_test))))
    results = dict(judge_on_real_held_out=float((judge.predict(x_test) == y_test).mean()),
                   frechet_real_vs_real=frechet_distance(x_train, x_test),
                   judge_on_vq_reconstructions=float((judge.predict(reconstructions) == y_test).mean()),
                   frechet_vq_reconstructions=frechet_distance(reconstructions, x_test))
    work = ([passes(recipe.per_class, 12, g) for g in (10.0, 4.0)]
            + [passes(recipe.table_per_class, s, g) for s in STEP_COUNTS for g in GUIDANCES])
    t_start, work_done = time.perf_counter(), 0
    for guidance in (10.0, 4.0):
        t0 = time.perf_counter()
        pixels, labels = generate(pipe, recipe.per_class, 12, guidance, seed)
        work_done += passes(recipe.per_class, 12, guidance)
        key = f"12 steps, guidance {guidance:g}"
        results[key] = judge_samples(judge, pixels, labels, x_test, y_test)
        log(f"  {key}: accuracy {results[key]['accuracy']:.3f} ({10 * recipe.per_class} images, "
            f"{time.perf_counter() - t0:.1f} s), ETA "
            f"{cli.time_left(time.perf_counter() - t_start, work_done, sum(work) - work_done)}")
    table = {}
    for steps in STEP_COUNTS:
        for guidance in GUIDANCES:
            pixels, labels = generate(pipe, recipe.table_per_class, steps, guidance, seed + 1)
            work_done += passes(recipe.table_per_class, steps, guidance)
            table[f"{steps},{guidance:g}"] = float((judge.predict(pixels) == labels).mean())
        log(f"  {steps:2d} steps: accuracy " + ", ".join(f"{table[f'{steps},{g:g}']:.3f}" for g in GUIDANCES)
            + f" at guidance {', '.join(f'{g:g}' for g in GUIDANCES)}, ETA "
            + cli.time_left(time.perf_counter() - t_start, work_done, sum(work) - work_done))
    results["accuracy by steps, guidance"] = table
    return results


def results_markdown(r: dict, recipe: Recipe) -> str:
    lines = ["| | accuracy | diversity (min class) | Frechet distance |", "|---|---|---|---|",
             f"| real held-out digits (ceiling, floor) | {r['judge_on_real_held_out']:.3f} | 1 | "
             f"{r['frechet_real_vs_real']:.1f} (real train vs held-out) |",
             "| the held-out digits through the VQ (what the tokenizer allows) | "
             f"{r['judge_on_vq_reconstructions']:.3f} | | {r['frechet_vq_reconstructions']:.1f} |"]
    for key in ("12 steps, guidance 10", "12 steps, guidance 4"):
        s = r[key]
        lines.append(f"| generated, {key}, {recipe.per_class} per class | {s['accuracy']:.3f} | {s['diversity']:.2f} "
                     f"({s['diversity_min']:.2f}) | {s['frechet']:.1f} |")
    lines += ["", "| accuracy per class (0-9) | " + " | ".join(map(str, range(10))) + " |", "|---|" + "---|" * 10]
    for key in ("12 steps, guidance 10", "12 steps, guidance 4"):
        lines.append(f"| {key} | " + " | ".join(f"{a:.2f}" for a in r[key]["per_class"]) + " |")
    lines += ["", f"| steps \\ guidance ({recipe.table_per_class} per class) | "
              + " | ".join(f"{g:g}" for g in GUIDANCES) + " |", "|---|" + "---|" * len(GUIDANCES)]
    for steps in STEP_COUNTS:
        lines.append(f"| {steps} | " + " | ".join(f"{r['accuracy by steps, guidance'][f'{steps},{g:g}']:.3f}"
                                               for g in GUIDANCES) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------


def main(out: str, recipe: str = "full", seed: int = 0, figures: str | None = None, threads: int | None = None,
         tokens: bool = False, resume: bool = False) -> dict:
    out_dir, r = Path(out), RECIPES[recipe]
    if threads:
        torch.set_num_threads(threads)
    run = start_run(out_dir, dict(recipe=recipe, seed=seed, tokens=tokens), resume)
    if any(stage not in run["seconds"] for stage in ("data", "text", "judge the drawings")):  # they need the digits
        x_train, y_train, x_test, y_test = load_digits(seed)
        train_images, test_images = to_images(x_train), to_images(x_test)

    log(f"1/7 data: scikit-learn's digits, split with seed {seed}")
    if not done(out_dir, run, "data", "data/metadata.jsonl"):
        t0 = time.perf_counter()
        write_data_folder(out_dir / "data", train_images, y_train)
        log(f"  {len(x_train)} training digits written to {out_dir / 'data'}, {len(x_test)} held out")
        finished(out_dir, run, "data", time.perf_counter() - t0)

    log("2/7 judge: an SVC on the real training digits")
    if "judge the drawings" in run["seconds"]:  # the judge is not saved: it is fitted again (in < 1 s) when needed
        log("  not needed: the drawings are judged already")
    else:
        t0 = time.perf_counter()
        judge = fit_judge(x_train, y_train)
        log(f"  accuracy on the held-out real digits: {(judge.predict(x_test) == y_test).mean():.3f} (the ceiling)")
        finished(out_dir, run, "judge", time.perf_counter() - t0)

    # 3 and 4 are skipped together: the trained VQ is kept only in the start checkpoint that 4 writes
    log(f"3/7 tokenizer: a VQ-VAE with {VQ.num_vq_embeddings} codes, {recipe} recipe ({r.vq_steps} steps)")
    if not done(out_dir, run, "text", "start.safetensors", "uvit.json"):
        t0 = time.perf_counter()
        vq = train_vq(train_images, r, seed)
        run["vq"] = {split: vq_report(vq, images) for split, images in (("train", train_images),
                                                                         ("held out", test_images))}
        for split, f in run["vq"].items():
            log(f"  {split}: reconstruction MSE {f['mse']:.5f}, perplexity {f['perplexity']:.1f} of "
                f"{VQ.num_vq_embeddings} codes, {f['unused']} never used")
        finished(out_dir, run, "tokenizer", time.perf_counter() - t0)

        log("4/7 text: a BPE vocabulary of the ten captions, a CLIP text encoder with seeded random weights")
        t0 = time.perf_counter()
        tokenizer_files, text_encoder = text_side(seed)
        (out_dir / "uvit.json").write_text(json.dumps(dataclasses.asdict(UVIT), indent=2))
        write_start_checkpoint(out_dir / "start.safetensors", vq, text_encoder, tokenizer_files, seed)
        finished(out_dir, run, "text", time.perf_counter() - t0)

    train_data = out_dir / ("tokens" if tokens else "data")
    if tokens:
        log("5/7 tokens: prepare_data.py encodes the training digits once")
        if not done(out_dir, run, "tokens", "tokens"):
            t0 = time.perf_counter()
            prepare_data.main(checkpoint=str(out_dir / "start.safetensors"), data=str(out_dir / "data"),
                              out=str(train_data), device="cpu")
            finished(out_dir, run, "tokens", time.perf_counter() - t0)
    log(f"5/7 U-ViT: train.py --init-transformer {out_dir / 'uvit.json'} ({r.uvit_steps} steps of {r.uvit_batch}) "
        f"on {train_data}")
    if not done(out_dir, run, "U-ViT", "model.safetensors"):
        t0, state = time.perf_counter(), out_dir / "train" / train.STATE_FILE
        if state.is_file():
            log(f"  continuing from {state}")
        else:  # nothing saved yet: start afresh (a process killed before its first save leaves its log behind)
            shutil.rmtree(out_dir / "train", ignore_errors=True)
        steps = train.main(checkpoint=str(out_dir / "start.safetensors"), data=str(train_data),
                           out=str(out_dir / "train"), init_transformer=str(out_dir / "uvit.json"), lr=r.uvit_lr,
                           warmup_steps=r.uvit_warmup, lr_schedule="cosine", max_grad_norm=MAX_GRAD_NORM,
                           batch_size=r.uvit_batch, max_steps=r.uvit_steps, prompt_dropout=r.prompt_dropout,
                           save_every=max(1, r.uvit_steps // 5), validate_every=0,
                           log_every=max(1, r.uvit_steps // 10), seed=seed, device="cpu", resume=state.is_file())
        if steps < r.uvit_steps:  # Ctrl-C: train.py saved where it stopped, and said to add --resume
            run["interrupted"]["U-ViT"] = run["interrupted"].get("U-ViT", 0.0) + time.perf_counter() - t0
            save_run(out_dir, run)
            raise KeyboardInterrupt
        shutil.copyfile(out_dir / "train" / "model.safetensors", out_dir / "model.safetensors")
        # what sample.py and playground.py then use unless told otherwise: this model draws best at guidance 4
        write_sampling_defaults(out_dir / "model.safetensors", {"steps": 12, "guidance_scale": 4.0})
        finished(out_dir, run, "U-ViT", time.perf_counter() - t0)

    log(f"6/7 judge the drawings of {out_dir / 'model.safetensors'}")
    if done(out_dir, run, "judge the drawings", "results.json", "results.md"):
        results = json.loads((out_dir / "results.json").read_text())
    else:
        t0 = time.perf_counter()
        pipe = Amused.from_pretrained(out_dir / "model.safetensors")
        results = evaluate(pipe, judge, x_train, y_train, x_test, y_test, r, seed)
        seconds = {**run["seconds"], "judge the drawings": time.perf_counter() - t0}
        results.update(vq=run["vq"], seconds={**seconds, "total": sum(seconds.values())},
                       machine=f"{speed.cpu_description()}, {torch.get_num_threads()} threads")
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        (out_dir / "results.md").write_text(results_markdown(results, r))
        log(f"  wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
        finished(out_dir, run, "judge the drawings", seconds["judge the drawings"])

    pictures = [out_dir / "samples.png", out_dir / "unmasking.gif"]
    log(f"7/7 pictures, {digits_figures.SCALE}x: {pictures[0]} (a row per digit), {pictures[1]} (step by step)")
    if not done(out_dir, run, "pictures", *(p.name for p in pictures)):
        t0 = time.perf_counter()
        pipe = Amused.from_pretrained(out_dir / "model.safetensors")
        digits_figures.samples_grid(pipe, pictures[0], seed, scale=digits_figures.SCALE)
        digits_figures.unmasking_gif(pipe, pictures[1], seed, scale=digits_figures.SCALE)
        finished(out_dir, run, "pictures", time.perf_counter() - t0)
    log(f"total {cli.duration(results['seconds']['total'])} (the stages to the judged results, in all sessions)")
    if figures:
        digits_figures.draw(out_dir, Path(figures), seed)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--out", required=True, help="output folder: data/, start.safetensors, train/, model.safetensors, "
                                                "results.json, results.md, samples.png, unmasking.gif, run.json")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="full",
                   help="full: the README's figures; quick: a minute or two, the test suite's")
    p.add_argument("--seed", type=int, default=0, help="the data split, every initialisation and every draw")
    p.add_argument("--figures", default=None, metavar="FOLDER",
                   help="also draw digits_figures.py's pictures into FOLDER, and their page as FOLDER.md")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--tokens", action=argparse.BooleanOptionalAction, default=False,
                   help="train the U-ViT on token shards that prepare_data.py makes of the training digits")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="finish the interrupted run in --out: skip its finished stages, continue its U-ViT training")
    cli.run(main, p.parse_args(), errors=(cli.UsageError, ValueError, OSError))
