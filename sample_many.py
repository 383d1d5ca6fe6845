"""sample_many.py: many images from a prompt file: one PNG per (line, image) in a folder, batched, spread over
processes and GPUs, resumable. The command is sample.py's:

    python sample.py --prompts prompts.txt --out-dir out/ --batch-size 8              # one prompt per line
    python sample.py --prompts prompts.jsonl --out-dir out/ --num-images 4 --seed 1   # per-line settings
    torchrun --nproc-per-node 8 sample.py --prompts coco.txt --out-dir out/coco      # one process per GPU
    srun --ntasks 16 --gpus-per-task 1 python sample.py --prompts coco.txt --out-dir out/coco   # SLURM
    python sample.py --prompts coco.txt --out-dir out/coco --shard 1/4                # by hand: share 1 of 4

The prompt file is UTF-8 text with one prompt per line, or, when its name ends in .jsonl, JSON Lines: one object per
line with "prompt" and optionally "negative_prompt", "seed", "num_images", "steps", "guidance_scale",
"aesthetic_score", "width" and "height". The flags of the same names (--negative-prompt, --seed, ...) give the
defaults. The sampler's flags (--sampler, --guidance-schedule, --guidance-from, --mask-schedule,
--softmax-temperature, --halton-roll, --temperature) apply to every image, as sample.py applies them. Blank lines are
skipped; lines keep their numbers. Text to image only.

Every image is named after its place in the file, `LLLLLLLL-III.png` for image III (from 000) of line LLLLLLLL (the
line number as an editor shows it, from 1), and has a seed of its own (image_seed): the line's "seed" plus III when
the line gives one (so image 000 of {"prompt": P, "seed": S} is `sample.py P --seed S`), else a hash of (--seed,
line, III). Each image is drawn from its own torch.Generator, so it depends neither on the batch it ran in, nor on
the number of processes, nor on the order of the work (on the CPU in float32, bit for bit: tests/test_sample_many.py).

The folder:
    run.json          the settings that change images (the sampler's too), written by the first run; a rerun with
                      others is refused
    LLLLLLLL-III.png  the images, each written atomically, with its record (manifest line) in an iTXt chunk
    manifest.jsonl    one line per image, in file order: file, line, index, prompt, negative prompt, seed, and
                      the pipeline's settings (Keywords: steps, guidance_scale, ...); written once all are there
    captions.txt      the prompts, one per line, in the order of manifest.jsonl (and of the sorted file names)

A rerun of the same command skips the images that exist, after checking that each was made with this file's line
and these settings, so a killed run loses at most the batch in flight. Ctrl-C (or SIGTERM, what schedulers send)
finishes the batch in flight, writes it, and exits with code 130; a second Ctrl-C quits at once.

Processes: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), under SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID)
or with --shard i/n, process i takes every n-th image of the file, from the i-th on (`share`), on its own GPU
(cuda:LOCAL_RANK, or the only one it sees). No process waits for another: together they write the files one
process writes, and the process that finishes last (whichever it is) writes the manifest.
"""
import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

import cli
import sample
from amused import Amused
from cli import UsageError
from sampling import Sampler

RUN_FILE, MANIFEST, CAPTIONS = "run.json", "manifest.jsonl", "captions.txt"
RUN_FORMAT = 1  # of run.json and of the seed and naming rules: a folder of another format is refused
RECORD_KEY = "amused"  # the PNG text chunk that holds an image's manifest line
MAX_IMAGES = 1000  # per line: image numbers have three digits, so that file names sort in file order
JSONL_SUFFIXES = (".jsonl", ".ndjson")


# ----------------------------------------------------------------------------------------------------
# What each image is: the prompt file read into work items


def rule(types, check, what: str, default=MISSING):
    """A field of the settings a JSONL line may set, with its rule: the JSON types it takes, the range check, and
    what the value must be (for the error message)."""
    return field(default=default, metadata={"types": types, "check": check, "what": what})


@dataclass(frozen=True)
class Keywords:
    """The keywords of the pipeline call (Amused.__call__'s names) that change an image beside its prompt, negative
    prompt and generator. Their flags give the defaults (main), a JSONL line may set each for its images, one batch
    shares them, and the run file and every image's record hold them: a new pipeline keyword is a field here, its
    flag a parameter of main."""
    steps: int = rule(int, lambda v: v >= 1, "an integer >= 1")
    guidance_scale: float = rule((int, float), lambda v: 0 <= v < math.inf,
                                 "a finite number >= 0 (<= 1 turns guidance off)")
    aesthetic_score: float = rule((int, float), math.isfinite, "a finite number")
    width: int | None = rule((int, type(None)), lambda v: v is None or v >= 1,
                             "a positive number of pixels, or null (the model's size)", None)
    height: int | None = rule((int, type(None)), lambda v: v is None or v >= 1,
                              "a positive number of pixels, or null (the model's size)", None)


@dataclass(frozen=True)
class Defaults:
    """What the flags give each line that does not say otherwise, and how every image is drawn (a line cannot
    change the sampler: one folder, one way of drawing, which run.json records)."""
    negative_prompt: str | None
    seed: int  # --seed: the base of the seeds derived for lines without a seed
    num_images: int
    keywords: Keywords
    sampler: Sampler = field(default_factory=Sampler)  # --sampler and the flags after it; the reference's
    temperature: float | tuple[float, float] = (2.0, 0.0)  # --temperature: the confidence sampler's Gumbel temperature


@dataclass(frozen=True)
class Item:
    """One image to make: image `index` of line `line`."""
    line: int  # the line number in the prompt file, from 1
    index: int  # from 0
    prompt: str
    negative_prompt: str | None  # None: the empty prompt
    seed: int
    keywords: Keywords

    @property
    def file(self) -> str:
        return f"{self.line:08d}-{self.index:03d}.png"

    def record(self) -> dict:
        """The image's manifest line, also stored in the image."""
        return dict(file=self.file, line=self.line, index=self.index, prompt=self.prompt,
                    negative_prompt=self.negative_prompt, seed=self.seed, **asdict(self.keywords))


# A JSONL line's keys beside "prompt": (the JSON types each takes, the range check, what the value must be), the
# same ranges as the flags of the same names (sample.check_numbers, sample.parse_steps); Keywords' rules last.
JSON_RULES = {
    "negative_prompt": ((str, type(None)), lambda v: True, "a string or null"),
    "seed": (int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)"),
    "num_images": (int, lambda v: 1 <= v <= MAX_IMAGES, f"an integer in [1, {MAX_IMAGES}]"),
    **{f.name: (f.metadata["types"], f.metadata["check"], f.metadata["what"]) for f in fields(Keywords)},
}


def image_seed(line_seed: int | None, base_seed: int, line: int, index: int) -> int:
    """The seed of image `index` of line `line`: line_seed + index when the line gives a seed, else the first 8
    bytes of sha256("{base_seed} {line} {index}") as an integer, halved into [0, 2**63). A hash rather than
    base_seed + position: neighbouring lines and neighbouring --seed values get unrelated seeds, and the rule is the
    same in every Python and on every machine."""
    if line_seed is not None:
        return line_seed + index
    digest = hashlib.sha256(f"{base_seed} {line} {index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def read_prompts(path: str, defaults: Defaults) -> list[Item]:
    """The prompt file -> its images, in file order (line, then index). UsageError naming the file, and the line
    where there is one, for anything that cannot be read."""
    jsonl = Path(path).suffix.lower() in JSONL_SUFFIXES
    items = []
    for number, text in enumerate(read_lines(path), start=1):
        if not text.strip():
            continue
        line = parse_json_line(text, f"--prompts {path} line {number}") if jsonl else {"prompt": text.strip()}
        seed, num_images = line.get("seed"), line.get("num_images", defaults.num_images)
        if seed is not None and seed + num_images > 2**64:
            raise UsageError(f"--prompts {path} line {number}: seed {seed} + {num_images} images passes 2**64")
        negative = line.get("negative_prompt", defaults.negative_prompt)
        keywords = Keywords(**{f.name: line.get(f.name, getattr(defaults.keywords, f.name))
                               for f in fields(Keywords)})
        items += [Item(number, i, line["prompt"], negative, image_seed(seed, defaults.seed, number, i), keywords)
                  for i in range(num_images)]
    if not items:
        raise UsageError(f"--prompts {path}: no prompts in it (it is empty, or only blank lines)")
    return items


def read_lines(path: str) -> list[str]:
    p = Path(path)
    if p.suffix.lower() == ".json":
        raise UsageError(f"--prompts {path}: give JSON Lines (one object per line) in a .jsonl file, or plain text "
                         f"with one prompt per line")
    if not p.is_file():
        raise UsageError(f"--prompts {path}: {'is a folder' if p.is_dir() else 'no such file'}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UsageError(f"--prompts {path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, which some editors write, is not a prompt
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UsageError(f"--prompts {path} line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    # "\n" only (and "\r\n"): str.splitlines also splits at form feeds and Unicode separators, which editors do not
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_json_line(text: str, where: str) -> dict:
    """One JSONL line -> its keys, each checked against JSON_RULES; "prompt" is required."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(line, dict):
        raise UsageError(f"{where}: expected an object like {{\"prompt\": \"a photo of a cat\"}}, "
                         f"got {type(line).__name__}")
    if not isinstance(line.get("prompt"), str):
        raise UsageError(f"{where}: needs \"prompt\", a string" + ("" if "prompt" not in line else
                                                                   f" (got {line['prompt']!r:.40})"))
    unknown = sorted(set(line) - {"prompt", *JSON_RULES})
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; the keys are prompt, {', '.join(JSON_RULES)}")
    for key, value in line.items():
        if isinstance(value, str) and not value.isascii() and not utf8(value):  # "\ud800": no character
            raise UsageError(f"{where}: {key} is not valid Unicode (a lone surrogate escape?)")
        if key == "prompt":
            continue
        types, in_range, what = JSON_RULES[key]
        if isinstance(value, bool) or not isinstance(value, types) or not in_range(value):
            raise UsageError(f"{where}: {key} must be {what}, got {json.dumps(value)}")
    for f in fields(Keywords):  # 10 and 10.0 are one setting: one record
        if f.type is float and f.name in line:
            line[f.name] = float(line[f.name])
    return line


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ----------------------------------------------------------------------------------------------------
# Processes: who does what, on which device


@dataclass(frozen=True)
class Process:
    index: int  # from 0
    count: int
    local_rank: int  # the GPU of this process on its machine
    source: str  # what said so: "--shard", "torchrun", "SLURM", or "" for a single process

    def __str__(self) -> str:
        return f"process {self.index + 1} of {self.count}" + (f" ({self.source})" if self.source else "")


def this_process(shard: str | None, env) -> Process:
    """--shard i/n, else torchrun's variables, else SLURM's, else process 0 of 1."""
    if shard is not None:
        return Process(*cli.parse_shard(shard), 0, "--shard")
    for source, (rank, size, local) in {"torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                        "SLURM": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")}.items():
        if rank in env and size in env:
            try:
                process = Process(int(env[rank]), int(env[size]), int(env.get(local, 0)), source)
            except ValueError:
                raise UsageError(f"{rank}={env[rank]!r}, {size}={env[size]!r}: not integers") from None
            if not 0 <= process.index < process.count:
                raise UsageError(f"{rank}={process.index} is not in [0, {size}={process.count})")
            return process
    return Process(0, 1, 0, "")


def share(items: list[Item], process: Process) -> list[Item]:
    """This process's images: every count-th of the file's, from the index-th on. It depends on the file alone, not
    on what exists, so that processes that start at different moments still split the work without overlap."""
    return items[process.index::process.count]


def process_device(name: str, process: Process, n_gpus: int) -> str:
    """--device resolved (cli.resolve_device); on CUDA the process's own GPU: the only one it sees (SLURM's
    --gpus-per-task 1 shows each task one), else cuda:LOCAL_RANK (torchrun's processes see every GPU)."""
    device = cli.resolve_device(name)
    if device != "cuda":
        return device
    if n_gpus == 1:
        return "cuda:0"
    if process.local_rank >= n_gpus:
        raise UsageError(f"{process}: local rank {process.local_rank}, but this process sees {n_gpus} GPUs; "
                         f"start at most one process per GPU")
    return f"cuda:{process.local_rank}"


# ----------------------------------------------------------------------------------------------------
# The folder: run file, images with their records, manifest


def check_out_dir(path: str) -> Path:
    """The folder exists and is writable, or can be made: its nearest existing parent is a writable folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out-dir {path}: is a file; give a folder")
    existing = next(a for a in (p, *p.absolute().parents) if a.exists())
    if not existing.is_dir():
        raise UsageError(f"--out-dir {path}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out-dir {path}: {existing} is not writable")
    return p


def run_settings(checkpoint: str, variant: str | None, device: str, dtype: str, exact: bool, generator: str,
                 defaults: Defaults) -> dict:
    """What run.json records: every setting that changes the images and that the images' records do not all say
    (the model, its precision and kernels, where the random numbers are drawn, the sampler) and the flags' defaults;
    keyed by the flags' names. Not recorded: the batch size, the processes and --compile, which change no image.
    As JSON reads it back (a pair of temperatures is a list), so that it compares equal to the file."""
    source = Path(checkpoint)
    settings = dict(format=RUN_FORMAT, checkpoint=str(source.resolve()) if source.exists() else checkpoint,
                    variant=variant, device=torch.device(device).type, dtype=dtype, exact=exact, generator=generator,
                    seed=defaults.seed, num_images=defaults.num_images, negative_prompt=defaults.negative_prompt,
                    **asdict(defaults.keywords), **sample.sampler_keywords(defaults.sampler),
                    temperature=defaults.temperature)
    return json.loads(json.dumps(settings))


def check_run_file(out_dir: Path, settings: dict) -> None:
    """A folder made with other settings is refused, naming each difference."""
    path = out_dir / RUN_FILE
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read it ({e}); it records the settings of the images in {out_dir}") from None
    differ = [f"--{key.replace('_', '-')} {json.dumps(before.get(key))} (now {json.dumps(value)})"
              for key, value in settings.items() if before.get(key) != value]
    if differ:
        raise UsageError(f"{out_dir} holds images made with other settings: {'; '.join(differ)}. Rerun with those, "
                         f"or give another --out-dir")


def write_run_file(out_dir: Path, settings: dict) -> None:
    """run.json, created once: written to a temporary file and hard-linked into place, which fails if another
    process got there first; then that one's must say the same."""
    path = out_dir / RUN_FILE
    tmp = out_dir / f".{RUN_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")
        os.link(tmp, path)
    except FileExistsError:
        check_run_file(out_dir, settings)
    finally:
        tmp.unlink(missing_ok=True)


def stored_record(path: Path, whole: bool) -> dict | None:
    """The record stored in an image ({} if none); None for a file that is not a PNG, or with `whole`, not a whole
    one (cut short by a crash of the machine, say: it is made again). `whole` reads the file through, but decodes
    no pixels; else only the chunks before the pixels are read."""
    try:
        with Image.open(path) as image:  # reads the chunks up to the pixels: the record comes before them
            text = image.info.get(RECORD_KEY) if image.format == "PNG" else None
            if whole:
                image.verify()  # every chunk's checksum, to the end of the file
    except (OSError, ValueError, SyntaxError):  # Pillow raises SyntaxError for a bad checksum
        return None
    try:
        return json.loads(text) if text is not None else {}
    except ValueError:
        return {}


def check_existing(out_dir: Path, items: list[Item], mine: set[str]) -> tuple[set[str], list[str]]:
    """(the files of `items` that exist, the unreadable ones among them, which are to be made again). Each existing
    image must have been made from the same line with the same settings, or the folder is refused: it would mix
    images of two prompt files, or of two settings. Only this process's images (`mine`) are read through: each
    process checks its own for damage, so that together they read the folder once."""
    if not out_dir.is_dir():
        return set(), []
    present, unreadable = {e.name for e in os.scandir(out_dir)}, []
    done = set()
    for item in items:
        if item.file not in present:
            continue
        record = stored_record(out_dir / item.file, whole=item.file in mine)
        if record is None:
            unreadable.append(item.file)
            continue
        if not record:
            raise UsageError(f"{out_dir / item.file} holds no record of `sample.py --prompts`: it was not made by this "
                             f"command; move it away, or give another --out-dir")
        if record != item.record():
            differ = [f"{key} {json.dumps(record.get(key))} (now {json.dumps(value)})"
                      for key, value in item.record().items() if record.get(key) != value]
            raise UsageError(f"{out_dir / item.file} was made otherwise: {'; '.join(differ)}. The prompt file or the "
                             f"settings changed since: give another --out-dir, or delete the images to redo")
        done.add(item.file)
    return done, unreadable


def write_image(path: Path, image: Image.Image, record: dict) -> None:
    """Atomically (cli.atomic_write), with the record in an iTXt chunk (UTF-8) before the pixels."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(RECORD_KEY, json.dumps(record, ensure_ascii=False))
    cli.atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def write_manifest(out_dir: Path, items: list[Item]) -> bool:
    """manifest.jsonl and captions.txt, in file order, once every image of `items` is there; False (nothing
    written) while some are not. Several processes may write them at once: each writes the same bytes atomically.
    Temporary files that killed runs left behind are removed then, when no run has anything left to write."""
    present = {e.name for e in os.scandir(out_dir)}
    if any(item.file not in present for item in items):
        return False
    manifest = "".join(json.dumps(item.record(), ensure_ascii=False) + "\n" for item in items)
    captions = "".join(" ".join(item.prompt.split()) + "\n" for item in items)  # a caption with a newline: one line
    cli.atomic_write(out_dir / MANIFEST, lambda tmp: tmp.write_text(manifest))
    cli.atomic_write(out_dir / CAPTIONS, lambda tmp: tmp.write_text(captions))
    for name in present:
        if re.fullmatch(r"\.\d{8}-\d{3,}\.png\.\d+\.tmp", name):
            (out_dir / name).unlink(missing_ok=True)
    return True


# ----------------------------------------------------------------------------------------------------
# Generating


def batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Batches of up to batch_size images that share their Keywords (one pipeline call each), in file order within
    each group of equal Keywords, the groups in order of first appearance."""
    groups: dict[Keywords, list[Item]] = {}
    for item in items:
        groups.setdefault(item.keywords, []).append(item)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def make_images(pipe: Amused, batch: list[Item], generator_device: str, sampler: Sampler,
                temperature: float | tuple[float, float]) -> list[Image.Image]:
    """One pipeline call makes the tokens: mixed prompts, a generator per image (so that each image's tokens are
    what they would be alone), guidance batched with the prompts, the sampler's keywords as sample.py passes them.
    Then the VQ decodes each image on its own (sample.decode_each), so that its pixels do not depend on the batch."""
    generators = [torch.Generator(generator_device).manual_seed(item.seed) for item in batch]
    tokens = pipe([item.prompt for item in batch], [item.negative_prompt or "" for item in batch],
                  generator=generators, output_type="tokens", temperature=temperature,
                  **sample.sampler_keywords(sampler),
                  **asdict(batch[0].keywords))  # Keywords' fields are the pipeline's keyword names
    return sample.decode_each(pipe, tokens)


def warn_long_prompts(tokenizer, items: list[Item]) -> None:
    """One warning for all the prompts CLIP will truncate (the pipeline's tokenizer would warn per batch)."""
    lines = {}
    for item in items:
        for text in (item.prompt, item.negative_prompt or ""):
            lines.setdefault(text, []).append(item.line)
    texts = list(lines)
    lengths = [len(e.ids) + 2 for e in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)]  # + BOS, EOS
    long = sorted({line for text, n in zip(texts, lengths) if n > tokenizer.max_length for line in lines[text]})
    if long:
        shown = ", ".join(map(str, long[:5])) + (f" and {len(long) - 5} more" if len(long) > 5 else "")
        warnings.warn(f"{len(long)} line{'s' * (len(long) > 1)} of the prompt file ha{'ve' if len(long) > 1 else 's'} "
                      f"a prompt longer than CLIP's {tokenizer.max_length} tokens: truncated, as CLIP does "
                      f"(line{'s' * (len(long) > 1)} {shown})", stacklevel=2)


def generate(pipe: Amused, todo: list[list[Item]], out_dir: Path, generator_device: str, defaults: Defaults,
             prefix: str) -> int:
    """Run the batches, writing each image as it comes, a progress line per batch; stop after a batch when asked
    (KeyboardInterrupt). Returns the number of images made."""
    total, done, t0 = sum(map(len, todo)), 0, time.perf_counter()
    with cli.stop_requests("stopping after this batch (Ctrl-C again to quit now, losing it)") as stop, \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"prompt is \d+ tokens, longer than CLIP")  # warned once
        for b, batch in enumerate(todo, start=1):
            for item, image in zip(batch, make_images(pipe, batch, generator_device, defaults.sampler,
                                                       defaults.temperature)):
                write_image(out_dir / item.file, image, item.record())
            done += len(batch)
            rate = done / (time.perf_counter() - t0)
            left = f", about {cli.duration((total - done) / rate)} left" if done < total else ""
            print(f"{prefix}batch {b}/{len(todo)}: {len(batch)} image{'s' * (len(batch) > 1)}, {done}/{total} done, "
                  f"{rate:.3g} images/s{left}", flush=True)
            if stop and done < total:
                print(f"{prefix}stopped: {done} of {total} images made; run the same command again to make the rest",
                      flush=True)
                raise KeyboardInterrupt
    return done


# ----------------------------------------------------------------------------------------------------


def check_flags(prompt: str | None, out_dir: str | None, batch_size: int, negative_prompt: str | None, steps: str,
                seed: int, num_images: int, keywords: dict, one_image_flags: dict, sampler: Sampler,
                temperature: float | tuple[float, float]) -> Defaults:
    """The flags, checked as sample.py checks them (and --steps is one count), -> the lines' defaults. The flags of
    sample.py that make one grid from one prompt (one_image_flags: flag -> value) do not apply. sampler and
    temperature come checked (sample.parse_sampler, sample.parse_temperature)."""
    if prompt is not None:
        raise UsageError(f"give a prompt or --prompts FILE, not both (got the prompt {prompt!r:.40})")
    if out_dir is None:
        raise UsageError("--prompts needs --out-dir: the folder the images go to")
    for flag, value in one_image_flags.items():
        if value is not None:
            raise UsageError(f"{flag} does not apply with --prompts (text to image only)")
    step_counts = sample.parse_steps(steps)
    if len(step_counts) > 1:
        raise UsageError(f"--steps takes one count with --prompts, got {steps!r}; a JSONL line may set its own steps")
    sample.check_numbers(keywords["guidance_scale"], keywords["aesthetic_score"], seed, num_images)
    if num_images > MAX_IMAGES:
        raise UsageError(f"--num-images must be <= {MAX_IMAGES} with --prompts; repeat a line for more")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    values = {**keywords, "steps": step_counts[0]}
    for f in fields(Keywords):
        if not f.metadata["check"](values[f.name]):
            raise UsageError(f"--{f.name.replace('_', '-')} must be {f.metadata['what']}, got {values[f.name]}")
        if f.type is float:
            values[f.name] = float(values[f.name])
    return Defaults(negative_prompt, seed, num_images, Keywords(**values), sampler, temperature)


def check_sizes(pipe: Amused, items: list[Item]) -> None:
    """Each size asked for has a token grid (Amused.token_grid: multiples of 16 pixels, or 32...), before anything
    is written: the first line that asks for a size that has none is named. A size past the model's gets
    sample.py's note (what a step costs there), once."""
    first = {}
    for item in items:
        first.setdefault((item.keywords.width, item.keywords.height), item.line)
    for (width, height), line in first.items():
        width, height = width or pipe.resolution, height or pipe.resolution
        pipe.token_grid(height, width, f"{width}x{height} pixels (line {line} of --prompts, the first of that size)")
        sample.note_size(pipe, (width, height))


def report_folder(folder: Path, items: list[Item], prefix: str) -> None:
    """The manifest, once every process's images are there; else how many are."""
    if folder.is_dir() and write_manifest(folder, items):
        print(f"{prefix}wrote {folder / MANIFEST} and {folder / CAPTIONS}: {len(items)} images")
        return
    n_present = len({e.name for e in os.scandir(folder)} & {i.file for i in items}) if folder.is_dir() else 0
    print(f"{prefix}{folder} holds {n_present} of the {len(items)} images: the manifest comes when all are there "
          f"(the last process to finish writes it, or run the command again)")


def main(prompts: str, out_dir: str | None, prompt: str | None = None, batch_size: int = sample.DEFAULT_BATCH_SIZE,
         shard: str | None = None, checkpoint: str = "amused/amused-256", negative_prompt: str | None = None,
         steps: str | None = None, guidance_scale: float | None = None, seed: int = 0, num_images: int = 1,
         aesthetic_score: float = 6.0, generator: str = "auto", device: str = "auto", dtype: str = "auto",
         compile: bool = False, variant: str | None = None, exact: bool = False, width: int | None = None,
         height: int | None = None, sampler: str | None = None, guidance_schedule: str | None = None,
         guidance_from: float | None = None, mask_schedule: str | None = None, softmax_temperature: str | None = None,
         halton_roll: bool | None = None, temperature: str | None = None, out: str = "out.png",
         init_image: str | None = None, strength: float | None = None, mask: str | None = None,
         save_steps: str | None = None) -> None:
    """`sample.py --prompts FILE --out-dir DIR`: takes every flag of sample.py (the same names and defaults as
    sample.main's, tests/test_sample_many.py checks it); --out does not apply (--out-dir). The sampling flags left
    None take the checkpoint's sampling_defaults, else the pipeline's (sample.sampling_flags)."""
    t_start = time.perf_counter()

    # 1. Everything that needs no model, first; nothing is written until the model has loaded.
    f, from_checkpoint = sample.sampling_flags(dict(
        steps=steps, guidance_scale=guidance_scale, temperature=temperature, sampler=sampler,
        guidance_schedule=guidance_schedule, guidance_from=guidance_from, mask_schedule=mask_schedule,
        softmax_temperature=softmax_temperature, halton_roll=halton_roll), checkpoint)
    defaults = check_flags(prompt, out_dir, batch_size, negative_prompt, f["steps"], seed, num_images,
                           {"guidance_scale": f["guidance_scale"], "aesthetic_score": aesthetic_score, "width": width,
                            "height": height},  # Keywords' flags but --steps
                           {"--init-image": init_image, "--strength": strength, "--mask": mask,
                            "--save-steps": save_steps},
                           sample.parse_sampler(f["sampler"], f["guidance_schedule"], f["guidance_from"],
                                                f["mask_schedule"], f["softmax_temperature"], f["halton_roll"]),
                           sample.parse_temperature(f["temperature"], "--temperature"))
    process = this_process(shard, os.environ)
    device = process_device(device, process, torch.cuda.device_count())
    generator_device = device if sample.resolve_generator_device(generator, device.split(":")[0]) == "cuda" else "cpu"
    torch_dtype, dtype_shown = sample.resolve_dtype(dtype, device, exact)
    items = read_prompts(prompts, defaults)
    folder = check_out_dir(out_dir)
    settings = run_settings(checkpoint, variant, device, "int8" if torch_dtype == "int8" else
                            cli.dtype_name(torch_dtype), exact, torch.device(generator_device).type, defaults)
    check_run_file(folder, settings)
    mine = share(items, process)
    present, unreadable = check_existing(folder, items, {item.file for item in mine})
    todo = [item for item in mine if item.file not in present]
    todo_batches = batches(todo, batch_size)
    prefix = f"[{process.index + 1}/{process.count}] " if process.count > 1 else ""
    if process.index == 0:
        shown = dict(prompts=f"{prompts}: {len({i.line for i in items})} prompts, {len(items)} images",
                     out_dir=f"{out_dir}: {len(present)} of them there already", processes=process.count,
                     checkpoint=checkpoint, variant=variant, batch_size=batch_size, device=device, dtype=dtype_shown,
                     exact=exact, generator=generator_device, compile=compile, seed=seed, num_images=num_images,
                     negative_prompt=repr(negative_prompt), **asdict(defaults.keywords),
                     sampler=sample.shown(sample.describe_sampler(defaults.sampler, defaults.keywords.guidance_scale,
                                                                  [defaults.keywords.steps], None) + " (at --steps)",
                                          list(sample.SAMPLER_FLAGS), from_checkpoint),
                     temperature=sample.shown(defaults.temperature, ["temperature"], from_checkpoint))
        for key in ("steps", "guidance_scale"):
            shown[key] = sample.shown(shown[key], [key], from_checkpoint)
        print("settings:\n" + "\n".join(f"  {key:<16}{value}" for key, value in shown.items()))
    for name in sorted(set(unreadable) & {item.file for item in todo}):
        print(f"{prefix}note: {folder / name} is not a readable PNG (cut short?): made again")
    print(f"{prefix}{process}: {len(todo)} of its {len(mine)} images to make, in {len(todo_batches)} "
          f"batch{'es' * (len(todo_batches) != 1)} of up to {batch_size}", flush=True)

    # 2. The model, unless there is nothing left to make; then the images.
    made, t_gen = 0, 0.0
    if todo:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        pipe = sample.load(checkpoint, device, torch_dtype, variant, exact)
        if compile:
            pipe.compile()
            print("note: --compile: the first batch compiles the step (and the last, smaller batch of a group again)")
        check_sizes(pipe, items)
        if process.index == 0:
            warn_long_prompts(pipe.tokenizer, items)
        folder.mkdir(parents=True, exist_ok=True)
        write_run_file(folder, settings)
        t_gen = time.perf_counter()
        made = generate(pipe, todo_batches, folder, generator_device, defaults, prefix)
        t_gen = time.perf_counter() - t_gen

    # 3. The summary, and the manifest once every process's images are there.
    rate = f" ({made / t_gen:.3g} images/s)" if made else ""
    print(f"{prefix}made {made} image{'s' * (made != 1)} in {cli.duration(t_gen)}{rate}, "
          f"{len(mine) - len(todo)} were there already; total {cli.duration(time.perf_counter() - t_start)}")
    report_folder(folder, items, prefix)
