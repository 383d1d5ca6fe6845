r"""examples/digits_finetune.py: teach the digits model a new style by fine-tuning it, LoRA and full, and judge
both what it learnt and what it kept.

    python examples/digits.py --out runs/digits                                          # the base model
    python examples/digits_finetune.py --base runs/digits/model.safetensors --out runs/digits-bold
    python sample.py "a handwritten digit 7 bold" --checkpoint runs/digits-bold/full/model.safetensors \
        --guidance-scale 4 --out bold7.png

The new style is **bold**: the real handwritten training digits (the base model's own training split), each pixel
of the 16x16 image replaced by the brightest of itself and its right, lower and lower-right neighbours (a 2x2
dilation), so that every stroke is one pixel thicker. A fixed transform of real digits: the judge can be fitted on
real examples of the style, and the tokenizer, trained on plain digits, reconstructs bold ones well (below).

The caption is "a handwritten digit k bold": the style word comes last. Why: the digits model's text encoder has
random frozen weights and a BPE vocabulary trained on its ten captions only (examples/digits.py, stage 4). A new
word is not an unknown token: the vocabulary is byte-level, so "bold" becomes the byte tokens b, o, l, d</w>, each
with its own (random) embedding, and any two captions tokenize differently. But the encoder is causal, so a word
placed before the digit changes the hidden state of every token after it, the digit's included: to the U-ViT,
"a bold handwritten digit 3" is as foreign as a caption it never saw, and the digit's identity has to be learnt
again from the new data. The base model, asked for "a typed digit k" or "a bold handwritten digit k", draws the
prompted digit 38% and 21% of the time (plain judge, 300 images each; "a handwritten digit k bold": 87%): blobs.
That is what a LoRA on a few "typed digit" images starts from. Put last, the style word leaves the hidden states
of "a handwritten digit k" exactly as they were (checked at the start), so the fine-tune only has to learn what the
extra tokens mean.

The judge, fixed before any fine-tune was run (figures at 12 steps, guidance 4, the digits model's best, over
--per-class images per digit, the same seed for every model):
  - learnt, on the bold captions: the *style score*, the share of the samples that a style classifier calls bold
    (an SVC, fit_judge's recipe, on the real training digits, plain against bold); the *bold accuracy*, the share
    that a digits judge fitted on the bold training digits reads as the prompted digit; the Frechet distance to the
    bold held-out digits.
  - kept, on the original captions: the digits judge's accuracy and the Frechet distance to the held-out digits,
    before and after; the *leak*, the share of the original captions' samples that the style classifier calls
    bold (the style must stay behind its word).
  - a fine-tune works if it learnt (style score >= 0.9 and bold accuracy >= 0.9) and kept (accuracy at most 3
    points below the base model's, Frechet distance at most 1.25x the base model's, leak at most 5 points above
    the base model's). The judge's noise, at 500 images, is about 2 points.
The ceilings are printed first: the classifiers on the real held-out digits, and on their reconstructions through
the model's VQ (what the frozen tokenizer allows the U-ViT to draw).

Both fine-tunes run train.py (train.main) on a data folder of every training digit under its original caption plus a
seeded share of them also bold under the bold captions (half for the full fine-tune, a quarter for the LoRA), with
prompt dropout 0.15 as the base model was trained, and a cosine learning rate ending at 0 as the base model's did (a
constant one cost the full fine-tune 3 points of accuracy). The share is a trade-off, and the reason neither recipe
reaches the bold accuracy bar: the empty prompt is shared by both caption sets, and guidance 4 pushes each sample away
from what the unconditional model draws. The more bold digits the unconditional model sees, the better the bold
captions' samples read and the thinner, and worse read, the original captions' ones (with every digit plain and
bold: mean ink 4.6 against 4.9 for real digits, 5 points of accuracy lost). Training the unconditional model on plain
digits only (plain digits under an empty caption in the data folder, no prompt dropout) keeps the originals but
reads the bold digits worst of all (0.69 to 0.75). The README gives the figures. The LoRA (rank 32) adapts every
linear layer of the attention and feed-forward blocks and the pooled-prompt embedding (cond_embed): on q/k/v alone
it read the bold digits 12 points worse. The LoRA is loaded into the base pipeline (Amused.load_lora), judged, then
unloaded, and the base weights checked to come back bit for bit. Written in --out: data-bold*/, lora/ and full/
(train.py's runs: pytorch_lora_weights.safetensors, model.safetensors), results.json, results.md.
scikit-learn is needed, as for examples/digits.py.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's flat modules

import cli  # noqa: E402
import digits  # noqa: E402 (examples/digits.py: the data, the judge's pieces)
import speed  # noqa: E402
import train  # noqa: E402
from amused import Amused  # noqa: E402

STYLE_CAPTIONS = [f"{caption} bold" for caption in digits.CAPTIONS]
STEPS, GUIDANCE = 12, 4.0  # the judge's sampling: the digits model's best guidance (README)
# What "works" means, fixed before any fine-tune was run
MIN_STYLE, MIN_BOLD_ACCURACY = 0.9, 0.9
MAX_ACCURACY_DROP, MAX_FRECHET_RATIO, MAX_LEAK_RISE = 0.03, 1.25, 0.05


@dataclass(frozen=True)
class Recipe:
    """One fine-tune: train.main's settings."""
    lora: bool
    lr: float  # after a linear warm-up, half a cosine down to 0 (the base model was trained so, and ends annealed)
    warmup: int
    steps: int
    batch: int
    bold: float  # the share of the training digits that also come bold, under the bold captions: 0 to 1
    prompt_dropout: float  # as the base model was trained: the unconditional model that guidance uses keeps learning
    rank: int = 16  # LoRA only
    alpha: float = 32.0
    targets: str = "to_q,to_k,to_v"


# The README's best measured recipes: both learn the style and keep the original captions; neither reaches the
# bold accuracy bar (0.78 and 0.85), and more bold data, which reads better, costs the original captions (README)
RECIPES = {
    "lora": Recipe(lora=True, lr=3e-3, warmup=20, steps=400, batch=32, bold=0.25, prompt_dropout=0.15, rank=32,
                   alpha=64.0, targets="to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,linear_1,linear_2"),
    "full": Recipe(lora=False, lr=3e-3, warmup=20, steps=400, batch=32, bold=0.5, prompt_dropout=0.15),
}


def log(message: str) -> None:
    print(message, flush=True)


def bold(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> the same digits with every stroke a pixel thicker: each pixel the maximum of itself
    and its right, lower and lower-right neighbours."""
    return F.max_pool2d(F.pad(images, (0, 1, 0, 1)), 2, stride=1)


# ----------------------------------------------------------------------------------------------------
# The judge


@dataclass
class Judge:
    digits: object  # reads plain digits: examples/digits.py's judge
    bold_digits: object  # reads bold digits: the same recipe, fitted on the bold training digits
    style: object  # plain (0) or bold (1)
    x_train: np.ndarray  # the real digits' 8x8 pixels, plain and bold
    bold_train: np.ndarray
    x_test: np.ndarray
    bold_test: np.ndarray
    y_test: np.ndarray


def fit_judges(x_train, y_train, x_test, y_test) -> Judge:
    """The three classifiers, each fitted on real training digits only (digits.fit_judge's SVC)."""
    bold_train = digits.to_pixels8(bold(digits.to_images(x_train)))
    styles = np.r_[np.zeros(len(x_train)), np.ones(len(bold_train))]
    return Judge(digits.fit_judge(x_train, y_train), digits.fit_judge(bold_train, y_train),
                 digits.fit_judge(np.concatenate([x_train, bold_train]), styles),
                 x_train, bold_train, x_test, digits.to_pixels8(bold(digits.to_images(x_test))), y_test)


def read(judge: Judge, plain: np.ndarray, bold_pixels: np.ndarray, labels: np.ndarray) -> dict:
    """The judge's figures for plain and bold digits (8x8 pixels, in 0..16) meant to be `labels`."""
    original = digits.judge_samples(judge.digits, plain, labels, judge.x_test, judge.y_test)
    new = digits.judge_samples(judge.bold_digits, bold_pixels, labels, judge.bold_test, judge.y_test)
    return {"style": float(judge.style.predict(bold_pixels).mean()), "bold_accuracy": new["accuracy"],
            "bold_frechet": new["frechet"], "accuracy": original["accuracy"], "frechet": original["frechet"],
            "leak": float(judge.style.predict(plain).mean())}


def ceilings(judge: Judge, pipe: Amused) -> dict:
    """The figures of the real held-out digits (their Frechet distances: the real training digits', the floor),
    and of their reconstructions through the pipeline's VQ."""
    real = read(judge, judge.x_test, judge.bold_test, judge.y_test)
    real.update(frechet=digits.frechet_distance(judge.x_train, judge.x_test),
                bold_frechet=digits.frechet_distance(judge.bold_train, judge.bold_test))
    through_vq = [digits.to_pixels8(pipe.vqvae.decode_ids(pipe.vqvae.encode_to_ids(images)))
                  for images in (digits.to_images(judge.x_test), bold(digits.to_images(judge.x_test)))]
    return {"real held-out digits": real, "held-out digits through the VQ": read(judge, *through_vq, judge.y_test)}


@torch.no_grad()
def judge_pipe(judge: Judge, pipe: Amused, per_class: int, seed: int) -> dict:
    """per_class samples of each digit under the original and under the bold captions, read by the judge."""
    plain, labels = digits.generate(pipe, per_class, STEPS, GUIDANCE, seed)
    bold_pixels, _ = digits.generate(pipe, per_class, STEPS, GUIDANCE, seed, STYLE_CAPTIONS)
    return read(judge, plain, bold_pixels, labels)


def verdict(before: dict, after: dict) -> dict:
    return {"learnt": after["style"] >= MIN_STYLE and after["bold_accuracy"] >= MIN_BOLD_ACCURACY,
            "kept": (after["accuracy"] >= before["accuracy"] - MAX_ACCURACY_DROP
                     and after["frechet"] <= MAX_FRECHET_RATIO * before["frechet"]
                     and after["leak"] <= before["leak"] + MAX_LEAK_RISE)}


# ----------------------------------------------------------------------------------------------------
# The data and the fine-tunes


def check_captions(pipe: Amused) -> None:
    """The premise of the bold captions: the base model's text encoder gives their first tokens the hidden states
    of the original captions (a causal encoder), and the two sets tokenize apart."""
    ids = pipe.tokenizer(digits.CAPTIONS + STYLE_CAPTIONS)  # (20, 77), padded with "!" (id 0)
    n = int((ids[0] != 0).sum()) - 1  # the original caption's tokens before <|endoftext|>
    hidden, _ = pipe.encode_prompt(digits.CAPTIONS)
    style_hidden, _ = pipe.encode_prompt(STYLE_CAPTIONS)
    if not torch.equal(hidden[:, :n], style_hidden[:, :n]) or len({tuple(r.tolist()) for r in ids}) != 20:
        raise cli.UsageError("this base model's text encoder does not keep the original captions' hidden states "
                             "under the bold captions (not a causal CLIP encoder?): use a base model from "
                             "examples/digits.py")


def write_data(folder: Path, x_train, y_train, share: float, seed: int) -> int:
    """Every training digit under its original caption, and a seeded choice of round(share x N) of them also bold
    under the bold captions, in train.py's folder layout -> how many bold ones."""
    images = digits.to_images(x_train)
    chosen = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:round(share * len(x_train))]
    # labels 0-9: the original captions, 10-19: the bold ones
    digits.write_data_folder(folder, torch.cat([images, bold(images[chosen])]),
                             np.r_[y_train, y_train[chosen.numpy()] + 10], digits.CAPTIONS + STYLE_CAPTIONS)
    return len(chosen)


def fine_tune(recipe: Recipe, base: str, data: Path, out: Path, seed: int) -> float:
    """train.main with the recipe's settings -> seconds it took."""
    t0 = time.perf_counter()
    train.main(checkpoint=base, data=str(data), out=str(out), lora=recipe.lora, lora_rank=recipe.rank,
               lora_alpha=recipe.alpha, lora_targets=recipe.targets, lr=recipe.lr, warmup_steps=recipe.warmup,
               lr_schedule="cosine", max_grad_norm=digits.MAX_GRAD_NORM,
               batch_size=recipe.batch, max_steps=recipe.steps, prompt_dropout=recipe.prompt_dropout, save_every=0,
               validate_every=0, log_every=max(1, recipe.steps // 5), seed=seed, device="cpu")
    return time.perf_counter() - t0


def state_bytes(pipe: Amused) -> dict[str, bytes]:
    return {k: t.contiguous().view(torch.uint8).numpy().tobytes() for k, t in pipe.transformer.state_dict().items()}


def results_markdown(results: dict) -> str:
    columns = ("style", "bold_accuracy", "bold_frechet", "accuracy", "frechet", "leak")
    lines = ["| | style score | bold accuracy | bold Frechet | original accuracy | original Frechet | leak | "
             "training | learnt, kept |", "|---" * 9 + "|"]
    for name, row in results["rows"].items():
        cells = [f"{row[c]:.3f}" if c != "bold_frechet" and c != "frechet" else f"{row[c]:.0f}" for c in columns]
        seconds = f"{row['seconds']:.0f} s" if "seconds" in row else ""
        ok = ", ".join("yes" if row[k] else "no" for k in ("learnt", "kept")) if "learnt" in row else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds} | {ok} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------


def main(base: str, out: str, modes: tuple[str, ...] = ("lora", "full"), per_class: int = 50,
         steps: int | None = None, seed: int = 0, threads: int | None = None) -> dict:
    """Judge the base model, fine-tune it per mode (steps: instead of the recipes' own) and judge each result."""
    if not Path(base).is_file():
        raise cli.UsageError(f"--base {base}: no such file (make one with python examples/digits.py --out DIR: "
                             "DIR/model.safetensors)")
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    if (out_dir / "results.json").exists():
        raise cli.UsageError(f"{out_dir} holds a run already: choose another --out, or remove {out_dir}")
    t_start, recipes = time.perf_counter(), {m: RECIPES[m] for m in modes}
    if steps is not None:
        recipes = {m: Recipe(**{**asdict(r), "steps": steps}) for m, r in recipes.items()}

    log(f"judge: fitted on the real digits of split seed {seed} (the base model's split)")
    x_train, y_train, x_test, y_test = digits.load_digits(seed)
    judge = fit_judges(x_train, y_train, x_test, y_test)
    pipe = Amused.from_pretrained(base)
    check_captions(pipe)
    rows = ceilings(judge, pipe)
    for name, row in rows.items():
        log(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))

    log(f"before: {base}, {10 * per_class} images per caption set")
    rows["before"] = before = judge_pipe(judge, pipe, per_class, seed)
    log("  " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()))
    original = state_bytes(pipe)

    for mode, recipe in recipes.items():
        data = out_dir / f"data-bold{recipe.bold:g}"
        if not data.exists():
            n = write_data(data, x_train, y_train, recipe.bold, seed)
            log(f"data: {len(x_train)} plain digits and {n} bold ones in {data}")
        log(f"{mode}: {recipe}")
        seconds = fine_tune(recipe, base, data, out_dir / mode, seed)
        if recipe.lora:
            pipe.load_lora(out_dir / mode / train.LORA_FILE)
            row = judge_pipe(judge, pipe, per_class, seed)
            pipe.unload_lora()
            if state_bytes(pipe) != original:
                raise AssertionError("unload_lora did not give back the base model's weights bit for bit")
        else:
            row = judge_pipe(judge, Amused.from_pretrained(out_dir / mode / train.MODEL_FILE), per_class, seed)
        rows[mode] = {**row, **verdict(before, row), "seconds": seconds, "recipe": asdict(recipe)}
        log(f"  {mode}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in rows[mode].items() if k != "recipe"))

    results = {"rows": rows, "per_class": per_class, "seed": seed, "base": str(base),
               "machine": f"{speed.cpu_description()}, {torch.get_num_threads()} threads",
               "seconds": time.perf_counter() - t_start}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(results_markdown(results))
    log(results_markdown(results) + f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--base", required=True, help="the digits model: examples/digits.py's DIR/model.safetensors")
    p.add_argument("--out", required=True, help="output folder: data-bold*/, lora/, full/, results.json, results.md")
    p.add_argument("--modes", nargs="+", choices=sorted(RECIPES), default=["lora", "full"], help="the fine-tunes")
    p.add_argument("--per-class", type=int, default=50, help="images per digit and caption set for each judged model")
    p.add_argument("--steps", type=int, default=None, help="training steps instead of the recipes' own")
    p.add_argument("--seed", type=int, default=0,
                   help="the base model's: its data split; also the fine-tunes' and the samples' seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    cli.run(main, argparse.Namespace(**{**vars(args), "modes": tuple(args.modes)}),
            errors=(cli.UsageError, ValueError, OSError))
