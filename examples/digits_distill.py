"""examples/digits_distill.py: the digits model distilled into a one-step student (distill.py, Di[M]O), judged.

    python examples/digits.py --out runs/digits                                  # the teacher, once
    python examples/digits_distill.py --teacher runs/digits/model.safetensors --out runs/digits-student
    python sample.py --checkpoint runs/digits-student/model.safetensors "a handwritten digit 7"     # one pass

Distils on the ten captions (no images: Di[M]O needs prompts only), then judges, with examples/digits.py's judge
(an SVC fitted on the real training digits of --split-seed before anything is drawn; never tuned on these
results) and examples/digits_samplers.py's measurement (judge_cell: 500 images a cell, the mean over --seeds):
  - the teacher at 12 steps, at guidance 4 (its best) and 10 (the pipeline's default): 24 U-ViT passes per image;
  - the teacher with as few passes as the student, its own sampler: 1 step unguided (1 pass), 2 steps at guidance 4
    (4 passes): what distillation has to beat;
  - the teacher drawn the student's way before any training (sampler dimo, 1 step): what distillation starts from;
  - the student at 1, 2 and 4 steps, unguided (sampler dimo): 1, 2 and 4 passes per image.
For each: accuracy for the prompted digit, Frechet distance to the held-out digits, diversity (1 = as varied as
the real digits of a class), passes per image, and a diagnosis beside the judge: the share of implausible tokens
(implausible_share: those the teacher, shown all the others, gives under 10%; tokens that disagree score high).
The targets (README, "One step"): the 1-step student within 3 points of the teacher's best accuracy, a Frechet
distance no worse than the teacher's at guidance 10, and a diversity of at least half the teacher's (a student
that draws one digit per class fails, whatever its accuracy).

Writes DIR/prompts.txt, distill.py's output (DIR/model.safetensors, checkpoint.pt, log.jsonl), DIR/results.json,
DIR/results.md and DIR/teacher-vs-student.png (a column per digit: the teacher at 12 steps, the student in one
pass and in four, the same seed). A rerun finds the finished student and only judges again; an interrupted distillation
(Ctrl-C) continues with the same command.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's flat modules
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402
import digits  # noqa: E402
import digits_samplers  # noqa: E402
import distill  # noqa: E402
import speed  # noqa: E402
from amused import Amused  # noqa: E402

# The digits recipe: the reference's optimizer (distill.py), a learning rate and batch for a model of 0.2 M
# parameters (the reference's 1e-5 is for 300 M-1 B), and as many steps as 2 CPU cores run in ~10 minutes. Three
# changes to the reference's objective, chosen with the step count among the recipes of the README's "One pass" table
# (the same judge and sampling seeds; checked on six others there): the start's codes from the teacher's prior
# (--start prior), half forward, half reverse KL (--divergence 0.5) and the teacher guided at 6 instead of its
# file's 4.
RECIPE = dict(lr=1e-4, batch_size=16, max_steps=2000, warmup_steps=50, save_every=250, log_every=50, start="prior",
              divergence=0.5, guidance=6.0)
TEACHER_GUIDANCES = (4.0, 10.0)
STUDENT_STEPS = (1, 2, 4)
STUDENT = dict(sampler="dimo", guidance_scale=1.0)  # unguided: one pass a step
IMPLAUSIBLE = 0.1  # a drawn token the teacher gives less than this, all the other tokens seen, is implausible
IMPLAUSIBLE_PER_CLASS = 10  # images per digit it is measured on: 64 teacher passes per image


def rows() -> list[tuple[str, str, dict]]:
    """(row name, which model, pipeline keywords) of the table."""
    return ([(f"teacher, 12 steps, guidance {g:g}", "teacher", dict(steps=12, guidance_scale=g))
             for g in TEACHER_GUIDANCES]
            + [("teacher, 1 step, no guidance (as few passes as the student's 1 step)", "teacher",
                dict(steps=1, guidance_scale=1.0)),
               ("teacher, 2 steps, guidance 4 (as many passes as the student's 4 steps)", "teacher",
                dict(steps=2, guidance_scale=4.0)),
               ("teacher drawn as a student (before training), 1 step", "untrained", dict(STUDENT, steps=1))]
            + [(f"student, {n} step{'s' * (n > 1)}", "student", dict(STUDENT, steps=n)) for n in STUDENT_STEPS])


def distil(teacher: str, out: Path) -> float:
    """Run distill.py on the ten captions (continuing an interrupted run) -> its seconds; 0 if already done."""
    model, state = out / distill.MODEL_FILE, out / distill.STATE_FILE
    if state.is_file() and torch.load(state, weights_only=True)["step"] >= RECIPE["max_steps"] and model.is_file():
        print(f"found the finished student {model}: judging it again", flush=True)
        return 0.0
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(digits.CAPTIONS) + "\n")
    t0 = time.perf_counter()
    done = distill.main(teacher, str(out), prompts=str(prompts), device="cpu", resume=state.is_file(), **RECIPE)
    if done < RECIPE["max_steps"]:
        raise KeyboardInterrupt  # Ctrl-C: distill.py saved; the same command continues
    return time.perf_counter() - t0


@torch.no_grad()
def implausible_share(teacher: Amused, tokens: torch.Tensor, prompts: list[str], guidance: float = 4.0) -> float:
    """The share of drawn tokens (B, h, w) that the teacher, guided as at its best, finds implausible given all the
    others: each position masked alone, its probability of the drawn token under IMPLAUSIBLE. Not the judge's: a
    diagnosis of why a drawing fails. Tokens drawn independently of each other score high; a coherent drawing
    scores as low as the teacher's own."""
    B, h, w = tokens.shape
    t, flat = teacher.transformer, tokens.reshape(B, -1)
    hidden, pooled = teacher.encode_prompt(prompts)
    micro = torch.tensor([teacher.resolution, teacher.resolution, 0, 0, 6.0]).expand(B, -1)
    conds = distill.teacher_conditions(t, distill.PromptBatch(hidden, pooled, micro), teacher.encode_prompt([""]),
                                       guided=True)
    implausible = 0
    for i in range(h * w):
        alone = flat.clone()
        alone[:, i] = teacher.mask_id  # position i masked, every other token seen
        logits = distill.guided_logits(t, alone.view(B, h, w), conds, torch.full((B,), guidance))[:, i]  # (B, K)
        implausible += int((logits.softmax(-1).gather(1, flat[:, i:i + 1]) < IMPLAUSIBLE).sum())
    return implausible / flat.numel()


def implausible_cell(teacher: Amused, pipe: Amused, per_class: int, seed: int, call: dict) -> float:
    """implausible_share of the first per_class (at most IMPLAUSIBLE_PER_CLASS) drawings of each digit of a cell."""
    per_class = min(per_class, IMPLAUSIBLE_PER_CLASS)
    tokens = pipe(digits.CAPTIONS, num_images_per_prompt=per_class, generator=torch.Generator().manual_seed(seed),
                  output_type="tokens", **call)  # [p0..p9, p0..p9, ...], as digits_samplers.draw
    return implausible_share(teacher, tokens, digits.CAPTIONS * per_class)


def judge_all(teacher: str, student: str, per_class: int, seeds: list[int], split_seed: int) -> dict:
    x_train, y_train, x_test, y_test = digits.load_digits(split_seed)
    judge = digits.fit_judge(x_train, y_train)  # fixed before anything is drawn
    pipes = {"teacher": Amused.from_pretrained(teacher), "student": Amused.from_pretrained(student)}
    pipes["untrained"] = copy.copy(pipes["teacher"])  # the teacher from the student's start (its file's start_logits)
    pipes["untrained"].start_logits = pipes["student"].start_logits
    cells = {}
    for name, which, call in rows():
        t0 = time.perf_counter()
        cells[name] = digits_samplers.judge_cell(pipes[which], judge, x_test, y_test, per_class, seeds, call)
        c = cells[name]
        c["implausible"] = implausible_cell(pipes["teacher"], pipes[which], per_class, seeds[0], call)
        print(f"  {name:70s} accuracy {c['accuracy']:.3f} Frechet {c['frechet']:6.1f} diversity "
              f"{c['diversity']:.2f} implausible {c['implausible']:.3f} passes {c['passes']:2d} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    ceiling = dict(accuracy=float((judge.predict(x_test) == y_test).mean()),
                   frechet=digits.frechet_distance(x_train, x_test))
    return dict(cells=cells, ceiling=ceiling)


def verdict(cells: dict) -> dict:
    """The targets, read off the table."""
    best = max((cells[f"teacher, 12 steps, guidance {g:g}"] for g in TEACHER_GUIDANCES), key=lambda c: c["accuracy"])
    at_10, one = cells["teacher, 12 steps, guidance 10"], cells["student, 1 step"]
    return {"accuracy within 3 points of the teacher's best": one["accuracy"] >= best["accuracy"] - 0.03,
            "Frechet no worse than the teacher's at guidance 10": one["frechet"] <= at_10["frechet"],
            "diversity at least half the teacher's": one["diversity"] >= 0.5 * best["diversity"],
            "moonshot: accuracy equal to the teacher's best": one["accuracy"] >= best["accuracy"]}


def markdown(results: dict) -> str:
    lines = ["| model, sampler | accuracy | Frechet distance | diversity | implausible tokens "
             "| U-ViT passes per image |", "|---|---|---|---|---|---|"]
    for name, c in results["cells"].items():
        lines.append(f"| {name} | {c['accuracy']:.3f} | {c['frechet']:.0f} | {c['diversity']:.2f} | "
                     f"{c['implausible']:.2f} | {c['passes']} |")
    c = results["ceiling"]
    lines.append(f"| real held-out digits (ceiling) | {c['accuracy']:.3f} | {c['frechet']:.1f} (real vs real) | 1 "
                 "| | |")
    lines += ["", f"{10 * results['per_class']} images a cell, mean of sampling seeds {results['seeds']}; "
              f"distillation: {results['recipe']}, {results['distill_seconds'] / 60:.1f} min on {results['cpu']}. "
              f"Implausible tokens ({IMPLAUSIBLE_PER_CLASS} images per digit, seed {results['seeds'][0]}): the share "
              f"the teacher at guidance 4 gives under {IMPLAUSIBLE:g} given all the others.", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: {target}" for target, ok in results["verdict"].items()]
    return "\n".join(lines) + "\n"


def figure(teacher: str, student: str, path: Path, seed: int = 0, scale: int = 6, gap: int = 4) -> None:
    """Rows of ten digits, the same prompts and seed: the teacher at 12 steps (guidance 4), the student in one pass,
    the student in four."""
    size, label_w = 16 * scale, 190
    panels = [("teacher: 12 steps, 24 passes", teacher, dict(steps=12, guidance_scale=4.0)),
              ("student: 1 step, 1 pass", student, dict(STUDENT, steps=1)),
              ("student: 4 steps, 4 passes", student, dict(STUDENT, steps=4))]
    out = Image.new("RGB", (label_w + 10 * (size + gap), len(panels) * (size + gap)), "white")
    pen = ImageDraw.Draw(out)
    for row, (name, checkpoint, call) in enumerate(panels):
        images = Amused.from_pretrained(checkpoint)(digits.CAPTIONS, generator=torch.Generator().manual_seed(seed),
                                                    **call)
        pen.text((4, row * (size + gap) + size / 2), name, fill="black", anchor="lm")
        for k, image in enumerate(images):
            out.paste(image.resize((size, size), Image.NEAREST), (label_w + k * (size + gap), row * (size + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(path, lambda tmp: out.save(tmp, format="PNG"))
    print(f"wrote {path}", flush=True)


def main(teacher: str, out: str, per_class: int = 50, seeds: list[int] = (0, 1, 2), split_seed: int = 0,
         threads: int | None = None, figure_path: str | None = None) -> dict:
    if not Path(teacher).is_file():
        raise cli.UsageError(f"--teacher {teacher}: no such file; train one with examples/digits.py --out DIR first")
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = distil(teacher, out_dir)
    if seconds == 0.0 and (out_dir / "results.json").is_file():
        seconds = json.loads((out_dir / "results.json").read_text())["distill_seconds"]
    student = str(out_dir / distill.MODEL_FILE)
    print(f"judging: {10 * per_class} images a cell, seeds {list(seeds)}", flush=True)
    results = judge_all(teacher, student, per_class, list(seeds), split_seed)
    results.update(per_class=per_class, seeds=list(seeds), recipe=RECIPE, distill_seconds=seconds,
                   cpu=f"{speed.cpu_description()}, {torch.get_num_threads()} threads", teacher=teacher)
    results["verdict"] = verdict(results["cells"])
    cli.atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    cli.atomic_write(out_dir / "results.md", lambda tmp: Path(tmp).write_text(markdown(results)))
    print(markdown(results))
    figure(teacher, student, Path(figure_path) if figure_path else out_dir / "teacher-vs-student.png")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the digits model: examples/digits.py's DIR/model.safetensors")
    p.add_argument("--out", required=True, help="output folder: the student, its training state and the results")
    p.add_argument("--per-class", type=int, default=50, help="images of each digit per cell and seed (50: 500)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds, averaged")
    p.add_argument("--split-seed", type=int, default=0, help="the --seed the teacher was trained with (the judge's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--figure", dest="figure_path", default=None,
                   help="where to draw the teacher-vs-student picture (default: in --out)")
    cli.run(main, p.parse_args(), errors=(cli.UsageError,))  # Ctrl-C: exit 130, distill.py has saved
