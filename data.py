r"""data.py: what train.py trains on and prepare_data.py encodes: captioned images (a folder, or img2dataset/webdataset
tar shards) or token shards, the crops and their micro-conditioning, and which example each step and process gets.

Three sources, one --data flag:
  - a folder of images with NAME.txt captions or a metadata.jsonl (the Hugging Face "imagefolder" layout), or one
    image captioned by --prompt: every image is decoded once at the start, and one that cannot be is skipped;
  - tar shards as img2dataset writes them (00000.tar, 00001.tar, ...: KEY.jpg|png|webp beside KEY.txt, and KEY.json,
    which is not read): a .tar file, a folder of them, or a brace pattern ("shards/{00000..00099}.tar"). Read in
    place with the standard library's tarfile, never extracted: a scan of each tar's headers at the start finds
    where every member lies, then a member is one seek and one read. Uncompressed tars only (a .tar.gz cannot be
    read at an offset);
  - a folder of token shards written by prepare_data.py (tokens-00000-of-00010.safetensors, ...): the VQ ids of V
    crops ("views") of every image with their micro-conditioning, and the captions; no image is decoded in training.

Bad data never stops a run, and never changes what is trained on without a count: a member without a caption (or a
caption without an image), a truncated tar (the members before the cut are kept), an empty shard or a file that is
not a tar is skipped at the start, counted by kind, and the first few are named (Problems). An image that turns out
undecodable when it is loaded is replaced by the next example of its shard, with a warning for the first few and a
count that train.py logs.

The order (Data): example number g of a run (counted over steps and epochs) is in epoch g // N, at position g % N of
that epoch's order. An epoch visits the shards in a seeded order, --shard-window of them at a time (a "group"), and
the examples of a group in a seeded permutation: so a process reads from a few shards at a time however many there
are, and a batch mixes the examples of several shards. A folder is one shard, whose order is a permutation of all
its images, the order train.py always had (epoch_order). Every random number of an example (its crop, or which
view; then its masks and prompt dropout in train.py) comes from a generator seeded by (seed, g). All of it is a pure
function of the seed and the example number: no loader state to save, so --resume continues exactly mid-epoch.

Processes (step_examples): each optimizer step takes the next batch_size x world x grad_accum example numbers, and
each process its blocks of batch_size of them. So every example is used once per epoch whatever the number of
processes, every process runs the same number of steps (no shard left over at an epoch's end), and the global batch
of a step does not depend on how it is split. The processes share a group's shards, each reading its own members.
"""
import bisect
import hashlib
import io
import json
import re
import tarfile
import threading
import time
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open

from cli import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AESTHETIC_SCORE = 6.0  # micro-conditioning of every training image, as in the reference (and the sampler's default)
MAX_NAMED = 5  # problems named one by one before they are only counted
TOKEN_FORMAT, TOKEN_VERSION = "amused-tokens", "1"
TOKEN_SHARD = re.compile(r"tokens-(\d{5,})-of-(\d{5,})\.safetensors")
DEFAULT_WINDOW = 4  # shards mixed at a time (--shard-window)
TAR_NAMES = (".tar", ".tar.gz", ".tgz")  # what --data takes for a tar shard; the compressed ones to refuse them


# ----------------------------------------------------------------------------------------------------
# Randomness: one generator per training example


DATA_STREAM, OBJECTIVE_STREAM = 0, 1


def example_generator(seed: int, number: int, stream: int) -> torch.Generator:
    """The random numbers of example `number` of the run (counted over all steps and epochs). Stream DATA_STREAM
    crops its image, or picks its view in a token shard; OBJECTIVE_STREAM draws its mask ratio, masked positions and
    prompt dropout, in that order. They depend on nothing else, so neither the batch split nor a resume changes them."""
    return torch.Generator().manual_seed(((seed * 2**32 + number) * 2 + stream) % 2**64)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits the n examples of a folder: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 2**20 + epoch))


def seed_of(*parts) -> int:
    """A 64-bit seed from any strings and integers: the same on every machine and Python (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little")


def image_generator(seed: int, name: str) -> torch.Generator:
    """The generator of the crops prepare_data.py takes of one image, seeded by its name (shard and key): the same
    crops whichever process encodes it, in whatever order, and on a resumed run."""
    return torch.Generator().manual_seed(seed_of("views", seed, name))


def step_examples(step: int, batch_size: int, grad_accum: int, rank: int, world: int) -> tuple[range, list[list[int]]]:
    """The example numbers of optimizer step `step`: its global batch, batch_size x world x grad_accum consecutive
    examples of the run, and this process's micro-batches of it: micro-batch m of process r holds the batch_size
    examples from first + (m * world + r) * batch_size on."""
    G = batch_size * world * grad_accum
    first = step * G
    starts = [first + (m * world + rank) * batch_size for m in range(grad_accum)]
    return range(first, first + G), [list(range(s, s + batch_size)) for s in starts]


# ----------------------------------------------------------------------------------------------------
# What is skipped


class Problems:
    """Data skipped or replaced, counted by kind; the first MAX_NAMED are also warned about by name."""

    def __init__(self, counts: dict | None = None):
        self.counts = Counter(counts or {})

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        total = sum(self.counts.values())
        if total <= MAX_NAMED:
            warnings.warn(message)
        elif total == MAX_NAMED + 1:
            warnings.warn(f"{message}; further problems are counted, not named")

    def summary(self) -> str:
        """e.g. "2 no caption, 1 unreadable image", or "none"."""
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items())) or "none"


# ----------------------------------------------------------------------------------------------------
# Crops


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> a PIL image, decoded whole; PIL's error if they are not a readable image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def resize_shorter_side(image: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """-> (the image upright (EXIF orientation), RGB, its shorter side resized to R (bilinear); its size before).
    Matches reference: train_amused.py process_image: torchvision's Resize(R), the longer side truncated to int."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    W, H = image.size
    w, h = (resolution, int(resolution * H / W)) if W <= H else (int(resolution * W / H), resolution)
    return image.resize((w, h), Image.BILINEAR), (W, H)


def random_crop(image: Image.Image, resolution: int, generator: torch.Generator) -> tuple[torch.Tensor, int, int]:
    """A random R x R crop of a resized image -> (pixels (3, R, R) in [0, 1], top, left). Matches reference:
    torchvision's RandomCrop.get_params (top drawn first, then left)."""
    w, h = image.size
    top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    crop = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1), top, left  # (3, R, R)


def micro_conditioning(width: int, height: int, top: int, left: int) -> torch.Tensor:
    """(5,) [orig_width, orig_height, crop_top, crop_left, aesthetic score]; the crop corner is in the resized image."""
    return torch.tensor([width, height, top, left, AESTHETIC_SCORE], dtype=torch.float32)


def process_image(image: Image.Image, resolution: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A PIL image -> pixels (3, R, R) in [0, 1] and micro-conditioning (5,): the shorter side resized to R, then a
    random R x R crop. Matches reference: train_amused.py process_image."""
    image, (W, H) = resize_shorter_side(image, resolution)
    pixels, top, left = random_crop(image, resolution, generator)
    return pixels, micro_conditioning(W, H, top, left)


# ----------------------------------------------------------------------------------------------------
# Shards: a folder, a tar, a token shard. Each has a name, a length, key(i) (what a warning names) and
# item(i, resolution, generator); close() lets go of its file.


@dataclass(frozen=True)
class Item:
    """One training example, ready for the batch: pixels to encode, or tokens encoded already."""
    pixels: torch.Tensor | None  # (3, R, R) in [0, 1], from an image
    ids: torch.Tensor | None  # (h, w) long, from a token shard
    micro: torch.Tensor  # (5,) micro-conditioning
    caption: str


class ImageShard:
    """What the folder and the tar have in common: item(i) is a crop of image(i)."""

    def item(self, i: int, resolution: int, generator: torch.Generator) -> Item:
        image, caption = self.image(i)
        pixels, micro = process_image(image, resolution, generator)
        return Item(pixels, None, micro, caption)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


class FolderShard(ImageShard):
    """Images in files, with their captions: a folder, a part of one (prepare_data.py), or one --prompt image."""

    def __init__(self, examples: list[Example], name: str, root: Path):
        self.examples, self.name, self.root = examples, name, root

    def __len__(self):
        return len(self.examples)

    def key(self, i: int) -> str:
        """The image's path in the folder: what names it in warnings and token shards, and seeds its crops."""
        path = self.examples[i].path
        return str(path.relative_to(self.root) if self.root.is_dir() else path.name)

    def image(self, i: int) -> tuple[Image.Image, str]:
        e = self.examples[i]
        return decode_image(e.path.read_bytes()), e.caption

    def rows(self) -> list:
        """What the run's data fingerprint hashes: (relative path, caption) per image."""
        return [[self.key(i), e.caption] for i, e in enumerate(self.examples)]


def webdataset_key(name: str) -> tuple[str, str] | None:
    """A member name -> (key, extension) as webdataset splits it: "dir/000123.jpg" -> ("dir/000123", "jpg");
    the extension is everything after the first dot of the base name. None for a name without one."""
    m = re.fullmatch(r"((?:.*/)?[^./][^/]*?)\.([^/]+)", name.removeprefix("./"))
    return (m[1], m[2].lower()) if m else None


class TarShard(ImageShard):
    """An img2dataset tar, indexed by scan_tar: member i is one seek and one read of the image and of the caption."""

    def __init__(self, path: Path, keys: list[str], spans: np.ndarray):
        self.path, self.name, self.keys = path, path.name, keys
        self.spans = spans  # (n, 4) int64: image offset, image size, caption offset, caption size
        self._file, self._lock = None, threading.Lock()  # prepare_data.py reads from several threads

    def __len__(self):
        return len(self.keys)

    def key(self, i: int) -> str:
        return f"{self.name}/{self.keys[i]}"

    def _read(self, offset: int, size: int) -> bytes:
        with self._lock:  # one seek and read at a time on the shared file
            if self._file is None:
                self._file = open(self.path, "rb")  # noqa: SIM115 (kept open across reads; close() closes it)
            self._file.seek(offset)
            data = self._file.read(size)
        if len(data) != size:
            raise OSError(f"{size - len(data)} bytes missing at offset {offset}: the tar is shorter than when it was "
                          f"indexed")
        return data

    def image(self, i: int) -> tuple[Image.Image, str]:
        image_at, image_size, caption_at, caption_size = (int(x) for x in self.spans[i])
        caption = self._read(caption_at, caption_size).decode("utf-8").strip()
        return decode_image(self._read(image_at, image_size)), caption

    def rows(self) -> list:
        return [[self.name, self.path.stat().st_size, len(self)]]

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def scan_tar(path: Path, problems: Problems) -> TarShard:
    """Index a tar from its headers: the examples are the keys with an image and a .txt caption, in the tar's
    order. What is skipped is counted in `problems`: keys without a caption or an image, a truncated tar (the
    complete members before the cut are kept), an empty tar, a file that is not an uncompressed tar."""
    size = path.stat().st_size
    found: dict[str, dict[str, tuple[int, int]]] = {}  # key -> {"image" or "caption": (offset, size)}
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed, so that members can be read at their offsets
            complete = read_headers(tar, path, size, found, problems)
    except tarfile.ReadError as e:
        if size == 0:
            problems.add("empty shard", f"{path}: skipped, an empty file")
        else:
            problems.add("not a tar", f"{path}: skipped, not an uncompressed tar ({e})")
        return TarShard(path, [], np.zeros((0, 4), np.int64))
    keys, spans = [], []
    for key, parts in found.items():
        if "image" not in parts or "caption" not in parts:
            missing = "no caption" if "image" in parts else "no image"
            problems.add(missing, f"{path.name}/{key}: skipped, {missing} (img2dataset writes KEY.txt beside KEY.jpg)")
            continue
        keys.append(key)
        spans.append([*parts["image"], *parts["caption"]])
    if not found and complete:
        problems.add("empty shard", f"{path}: skipped, a tar with no image or caption")
    return TarShard(path, keys, np.array(spans, np.int64).reshape(-1, 4))


def read_headers(tar: tarfile.TarFile, path: Path, size: int, found: dict, problems: Problems) -> bool:
    """scan_tar's walk over the headers (tarfile seeks over the data); -> whether the tar ended where a tar ends."""
    while True:
        try:
            info = tar.next()
        except tarfile.ReadError as e:  # a header cut short or damaged: what came before is whole
            problems.add("truncated tar", f"{path}: truncated ({e}); the {len(found)} keys before the cut are kept")
            return False
        if info is None:
            break
        if info.offset_data + info.size > size:
            problems.add("truncated tar", f"{path}: truncated in {info.name}; the keys before it are kept")
            return False
        split = webdataset_key(info.name) if info.isfile() else None
        if split is None:
            continue
        key, ext = split
        part = "image" if f".{ext}" in IMAGE_SUFFIXES else "caption" if ext == "txt" else None
        if part is not None:  # KEY.json and other members are not read
            found.setdefault(key, {}).setdefault(part, (info.offset_data, info.size))
    # tarfile also stops quietly at a header cut short or damaged after the first: a whole tar has its two zero
    # blocks there
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
        problems.add("truncated tar", f"{path}: truncated or damaged at byte {tar.offset}; the {len(found)} keys "
                                      f"before it are kept")
        return False
    return True


class TokenShard:
    """A shard written by prepare_data.py: item(i) is one of example i's views, chosen by the example's generator."""

    def __init__(self, path: Path):
        try:
            with safe_open(path, framework="np") as f:
                self.meta = f.metadata() or {}
                names = f.keys()  # a list: safe_open has no `in`
                shape = f.get_slice("ids").get_shape() if "ids" in names else None
        except Exception as e:  # noqa: BLE001 (safetensors' own error type for a damaged header; OSError)
            raise UsageError(f"{path}: not a readable token shard ({type(e).__name__}: {e}): delete it and run "
                             f"prepare_data.py again, which writes the missing shards") from None
        if self.meta.get("format") != TOKEN_FORMAT or shape is None:
            raise UsageError(f"{path}: not a token shard of prepare_data.py")
        if self.meta.get("version") != TOKEN_VERSION:
            raise UsageError(f"{path}: token shard version {self.meta.get('version')}, this train.py reads "
                             f"{TOKEN_VERSION}: run prepare_data.py again into another --out")
        self.path, self.name = path, path.name
        self.n, self.views, self.grid = shape[0], shape[1], tuple(shape[2:])  # (N, V, h, w)
        self.resolution = int(self.meta["resolution"])
        self._file = None

    def __len__(self):
        return self.n

    def _open(self):
        if self._file is None:
            self._file = safe_open(self.path, framework="np")  # memory-mapped: a row is read when sliced
        return self._file

    def _text(self, name: str, i: int) -> str:
        f = self._open()
        start, end = (int(x) for x in f.get_slice(f"{name}_offsets")[i:i + 2])
        return f.get_slice(f"{name}_utf8")[start:end].tobytes().decode("utf-8")

    def key(self, i: int) -> str:
        return self._text("key", i)

    def item(self, i: int, resolution: int, generator: torch.Generator) -> Item:
        v = int(torch.randint(0, self.views, (1,), generator=generator))
        f = self._open()
        ids = torch.from_numpy(f.get_slice("ids")[i, v].astype(np.int64))  # (h, w)
        W, H, top, left = (int(x) for x in f.get_slice("micro")[i, v])
        return Item(None, ids, micro_conditioning(W, H, top, left), self._text("caption", i))

    def problems(self) -> dict:
        """What prepare_data.py skipped in this shard, by kind."""
        return json.loads(self.meta.get("skipped", "{}"))

    def rows(self) -> list:
        return [[self.name, self.n, *(self.meta[k] for k in ("vq", "seed", "views", "resolution", "source"))]]

    def close(self) -> None:
        self._file = None  # safe_open unmaps when it is dropped


# ----------------------------------------------------------------------------------------------------
# Finding the shards of --data


def unreadable(path: Path) -> str | None:
    """None if PIL decodes the whole file, else why not."""
    try:
        decode_image(path.read_bytes())
        return None
    except Exception as e:  # noqa: BLE001 (PIL's decoders raise OSError, ValueError, SyntaxError, DecompressionBomb...)
        return f"{type(e).__name__}: {e}"


def captions_in_folder(folder: Path, problems: Problems) -> list[tuple[Path, str]]:
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
                problems.add("no image", f"{meta}, line {n}: {folder / file_name} not found: skipped")
                continue
            pairs.append((folder / file_name, text))
        return pairs
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            problems.add("no caption", f"{image}: skipped, no caption (write it to {caption.name}, or list the "
                                       f"images with their captions in metadata.jsonl)")
            continue
        pairs.append((image, caption.read_text(encoding="utf-8").strip()))
    return pairs


def find_examples(data: str, prompt: str | None, problems: Problems | None = None) -> list[Example]:
    """The captioned images of --data (a folder, or one image captioned by --prompt). Images that PIL cannot
    decode are skipped with a warning; it is an error if none is left."""
    problems = Problems() if problems is None else problems
    path = Path(data)
    if path.is_file():
        if prompt is None:
            raise UsageError("--data is a single image: give its caption with --prompt")
        pairs = [(path, prompt)]
    elif path.is_dir():
        if prompt is not None:
            raise UsageError("--prompt is for a single image; a folder's captions come from .txt files or "
                             "metadata.jsonl")
        pairs = captions_in_folder(path, problems)
    else:
        raise UsageError(f"--data {data}: no such file or folder")
    examples = []
    for image, caption in pairs:
        why = unreadable(image)
        if why is not None:
            problems.add("unreadable image", f"{image}: skipped, not a readable image ({why})")
            continue
        examples.append(Example(image, caption))
    if not examples:
        raise UsageError(f"--data {data}: no readable, captioned image")
    return examples


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard patterns: "a/{00000..00003}.tar" -> a/00000.tar ... a/00003.tar (the width of the first
    number kept), "{a,b}.tar" -> a.tar, b.tar; several braces expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m[1])
    if r:
        lo, hi = int(r[1]), int(r[2])
        if hi < lo:
            raise UsageError(f"--data {pattern}: the range {{{m[1]}}} runs backwards")
        choices = [str(i).zfill(len(r[1])) for i in range(lo, hi + 1)]
    else:
        choices = m[1].split(",")
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def tar_paths(data: str) -> list[Path] | None:
    """The tar shards --data names: a .tar file, a brace pattern of them, or a folder holding .tar files; None
    when it names none of these (a folder of images or of token shards)."""
    path = Path(data)
    if "{" in data:
        paths = [Path(p) for p in expand_braces(data)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UsageError(f"--data {data}: {len(missing)} of its {len(paths)} shards do not exist, e.g. "
                             f"{missing[0]}")
    elif path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.name.endswith(TAR_NAMES) and p.is_file())
    else:
        paths = [path] if path.name.endswith(TAR_NAMES) and path.is_file() else []
    compressed = [p for p in paths if p.name.endswith(TAR_NAMES[1:])]  # found, to be refused by name
    if compressed:
        raise UsageError(f"{compressed[0]}: compressed tars cannot be read at an offset; decompress them (gunzip)")
    return paths or None


def token_paths(folder: Path) -> list[Path]:
    """The token shards in `folder`, in shard order; a UsageError if some are missing (prepare_data.py not done)."""
    found = {}
    for p in folder.glob("tokens-*-of-*.safetensors"):
        m = TOKEN_SHARD.fullmatch(p.name)
        if m:
            found[int(m[1])] = (int(m[2]), p)
    if not found:
        return []
    totals = {total for total, _ in found.values()}
    if len(totals) > 1:
        raise UsageError(f"{folder}: token shards of different runs of prepare_data.py (of {sorted(totals)} "
                         f"shards): keep one run's shards per folder")
    total = totals.pop()
    missing = [k for k in range(total) if k not in found]
    if missing:
        raise UsageError(f"{folder}: {len(missing)} of its {total} token shards are missing (e.g. "
                         f"tokens-{missing[0]:05d}-of-{total:05d}.safetensors): run prepare_data.py again with the "
                         f"same settings, it finishes what is missing")
    return [found[k][1] for k in range(total)]


@dataclass
class Source:
    """The shards of --data, what kind they are, and what was skipped finding them."""
    kind: str  # "folder", "tar" or "tokens"
    shards: list
    problems: Problems

    def describe(self) -> str:
        n = sum(len(s) for s in self.shards)
        if self.kind == "folder":
            return f"{n} images"
        what = "tar shards" if self.kind == "tar" else f"token shards, {self.shards[0].views} views each"
        return f"{n:,} examples in {len(self.shards)} {what}"


def find_source(data: str, prompt: str | None) -> Source:
    """--data -> its shards: a folder of images (or one image, with --prompt), tar shards, or token shards. Tars
    are indexed and token shards' headers read here; a UsageError if nothing trainable is left."""
    problems = Problems()
    tars = tar_paths(data)
    tokens = token_paths(Path(data)) if Path(data).is_dir() else []
    if (tars or tokens) and prompt is not None:
        raise UsageError("--prompt is for a single image; tar and token shards hold their captions")
    if tars and tokens:
        raise UsageError(f"--data {data} holds both .tar files and token shards: keep them in separate folders")
    if tars and Path(data).is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(data).iterdir()):
        raise UsageError(f"--data {data} holds both .tar shards and images: keep them in separate folders")
    if tars:
        shards = [scan_tar(p, problems) for p in tars]
        kind = "tar"
    elif tokens:
        shards = [TokenShard(p) for p in tokens]
        check_token_shards(shards, data)
        for s in shards:
            problems.counts.update(s.problems())
        kind = "tokens"
    else:
        path = Path(data)
        shards = [FolderShard(find_examples(data, prompt, problems), path.name, path)]
        kind = "folder"
    if sum(len(s) for s in shards) == 0:
        raise UsageError(f"--data {data}: no readable, captioned example ({problems.summary()} skipped)")
    return Source(kind, shards, problems)


def check_token_shards(shards: list[TokenShard], data: str) -> None:
    """Every shard of one prepare_data.py run: the same VQ, resolution, views, grid."""
    keys = ("vq", "resolution", "views", "seed", "codebook_size")
    first = shards[0]
    for s in shards[1:]:
        differ = [f"{k} {first.meta.get(k)} in {first.name}, {s.meta.get(k)} in {s.name}" for k in keys
                  if s.meta.get(k) != first.meta.get(k)] + (
                     [f"token grid {first.grid} in {first.name}, {s.grid} in {s.name}"] if s.grid != first.grid else [])
        if differ:
            raise UsageError(f"--data {data}: token shards made with different settings: {'; '.join(differ)}")


def vq_fingerprint(vq) -> str:
    """A hash of the weights that decide a VQ's tokens (encoder, quant_conv, codebook; not the decoder): token shards
    carry it, and train.py refuses shards another VQ made."""
    h = hashlib.sha256()
    for name, t in sorted(vq.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.", "quantize.")):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_tokens_fit(source: Source, vq_hash: str, resolution: int, grid: int, codebook_size: int) -> None:
    """Token shards made with the training checkpoint's VQ, at its resolution and token grid; else a UsageError
    naming the difference and the fix."""
    s = source.shards[0]
    made = f"made at {s.resolution} px with VQ {s.meta['vq']}, {s.grid[0]}x{s.grid[1]} tokens"
    if s.meta["vq"] != vq_hash:
        raise UsageError(f"the token shards were {made}, but --checkpoint's VQ is {vq_hash}: run prepare_data.py "
                         f"with this --checkpoint (tokens of another VQ mean other images)")
    if s.resolution != resolution or s.grid != (grid, grid) or int(s.meta["codebook_size"]) != codebook_size:
        raise UsageError(f"the token shards were {made}, the U-ViT trains at {resolution} px, {grid}x{grid} tokens: "
                         f"run prepare_data.py with --resolution {resolution}")


# ----------------------------------------------------------------------------------------------------
# The run's examples in order


class Data:
    """The examples in run order: example number g is a pure function of (seed, g) (see the module docstring), so
    there is no loader state to save for --resume. Loads count their time and their unreadable examples."""

    def __init__(self, shards: list, resolution: int, seed: int, window: int = DEFAULT_WINDOW):
        self.shards, self.resolution, self.seed, self.window = shards, resolution, seed, window
        self.sizes = [len(s) for s in shards]
        self.n = sum(self.sizes)
        self.tokens = isinstance(shards[0], TokenShard)
        self.problems = Problems()  # examples replaced because they could not be read
        self.load_seconds = 0.0  # spent in load(): what a step waits for its data
        self._layouts, self._orders = {}, {}  # epoch -> shard groups; (epoch, group) -> permutation: the recent ones
        self._open = OrderedDict()  # shards with an open file, least recently used first

    def __len__(self):
        return self.n

    def _layout(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """Epoch `epoch`'s groups of shards (window at a time, in a seeded shard order) and where each starts."""
        if epoch not in self._layouts:
            S = len(self.shards)
            order = (torch.randperm(S, generator=torch.Generator().manual_seed(seed_of("shards", self.seed, epoch)))
                     .tolist() if S > 1 else [0])
            groups = [order[i:i + self.window] for i in range(0, S, self.window)]
            starts = np.cumsum([0] + [sum(self.sizes[k] for k in g) for g in groups[:-1]]).tolist()
            self._layouts = {e: v for e, v in self._layouts.items() if e >= epoch - 1}
            self._layouts[epoch] = groups, starts
        return self._layouts[epoch]

    def _group_order(self, epoch: int, group: int, m: int) -> torch.Tensor:
        if (epoch, group) not in self._orders:
            # group 0 draws as epoch_order does, so that a folder (one shard, one group) keeps the order it always
            # had, and so its runs resume
            seed = self.seed * 2**20 + epoch if group == 0 else seed_of("group", self.seed, epoch, group)
            if len(self._orders) > 8:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch, group] = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
        return self._orders[epoch, group]

    def index(self, number: int) -> tuple[int, int]:
        """Example `number` of the run -> (shard, example within the shard)."""
        epoch, p = divmod(number, self.n)
        groups, starts = self._layout(epoch)
        g = bisect.bisect_right(starts, p) - 1
        ends = np.cumsum([self.sizes[k] for k in groups[g]]).tolist()  # within the group
        q = int(self._group_order(epoch, g, ends[-1])[p - starts[g]])
        s = bisect.bisect_right(ends, q)
        return groups[g][s], q - (ends[s - 1] if s else 0)

    def _shard(self, k: int):
        """Shard k, its file kept open among the most recent ones (a tar, a memory map)."""
        self._open[k] = self._open.pop(k, None)
        if len(self._open) > 2 * self.window + 1:
            self.shards[self._open.popitem(last=False)[0]].close()
        return self.shards[k]

    def load(self, number: int) -> Item:
        """Example `number` of the run. One that cannot be read (an image that does not decode) is replaced by the
        next one of its shard, with a warning for the first few, and counted in self.problems."""
        t0 = time.perf_counter()
        generator = example_generator(self.seed, number, DATA_STREAM)
        k, i = self.index(number)
        shard = self._shard(k)
        for j in range(len(shard)):
            try:
                item = shard.item((i + j) % len(shard), self.resolution, generator)
                break
            except Exception as e:  # noqa: BLE001 (any decoder failure, as in unreadable())
                self.problems.add("unreadable", f"{shard.key((i + j) % len(shard))}: skipped, could not read it "
                                                f"({type(e).__name__}: {e}); using the next one of {shard.name}")
        else:
            raise UsageError(f"none of the {len(shard)} examples of {shard.name} can be read any more: was it "
                             f"changed or removed since the run started?")
        self.load_seconds += time.perf_counter() - t0
        return item

    def fingerprint(self) -> str:
        """A hash of what the shards hold: --resume refuses a changed data set."""
        rows = [row for s in self.shards for row in s.rows()]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
