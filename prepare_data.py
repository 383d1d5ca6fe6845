r"""prepare_data.py: encode a data set into token shards once, with the frozen VQGAN, so that train.py then trains on
the tokens: no image decoded, resized or cropped and no VQGAN run in the training step.

    python prepare_data.py --checkpoint amused/amused-256 --data photos/ --out tokens/
    python prepare_data.py --checkpoint amused/amused-256 --data "laion/{00000..00999}.tar" --out tokens/ --views 2
    torchrun --nproc_per_node 8 prepare_data.py ... --device cuda   # one process per GPU, every 8th shard each
    python prepare_data.py ... --shard 3/16                         # job 3 of 16 independent jobs (0-based)
    python train.py --checkpoint amused/amused-256 --data tokens/ --out runs/tokens

--data: a folder of captioned images (train.py's layout), or img2dataset/webdataset tar shards (a .tar, a folder of
them or a brace pattern). Each tar becomes one token shard; a folder becomes shards of --shard-size images.

Per image, --views random crops (train.py's: the shorter side resized to the resolution, a random square cropped),
each with its micro-conditioning (original width and height, crop top and left). The crops are drawn from a
generator seeded by (--seed, the image's name), so they do not depend on which process encodes the image or when.
No flips: the reference recipe trains without them, and a flipped image's tokens are not its tokens flipped (the
VQGAN is not mirror-symmetric), so a flip would have to be a view of its own, encoded from flipped pixels. train.py
picks one view per example per epoch with the example's own generator, so --resume stays exact.

A token shard, OUT/tokens-00003-of-00010.safetensors (safetensors; N examples, V views, h x w tokens):
    ids              (N, V, h, w) uint16   the VQ codebook ids of every view (h = w = resolution / 16 for amused)
    micro            (N, V, 4) int32       original width, original height, crop top, crop left of every view
    caption_utf8     (bytes,) uint8        the captions in UTF-8, one after the other; caption i is
    caption_offsets  (N + 1,) int64        caption_utf8[caption_offsets[i]:caption_offsets[i + 1]]
    key_utf8, key_offsets                  each example's name in the source ("00003.tar/000030012", "cat.png")
and in the header's metadata: format, version, the VQ's fingerprint (train.py refuses shards another VQ made),
resolution, views, flips, seed, codebook size, the number of shards, the source shard, and what was skipped in it,
by kind. 512 bytes of tokens per view at 256 px (16 x 16 ids), plus the caption.

Resumable: each shard is written to a temporary file and renamed once complete, and the shards already there (made
with the same settings) are skipped, so the same command continues an interrupted run. Processes share nothing:
under torchrun (or with --shard i/n) process i of n takes the shards k with k % n == i, and together they write what
one process would. Images that cannot be decoded are skipped, counted in their shard, the first few named.
"""
import argparse
import contextlib
import json
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import cli
import speed
from cli import UsageError, atomic_write
from convert_weights import CheckpointError, load_checkpoint
from data import (
    TOKEN_FORMAT,
    TOKEN_VERSION,
    Example,
    FolderShard,
    Problems,
    captions_in_folder,
    image_generator,
    random_crop,
    resize_shorter_side,
    scan_tar,
    tar_paths,
    vq_fingerprint,
)
from train import torchrun_process

PROGRESS_EVERY = 10.0  # seconds between progress lines


@dataclass(frozen=True)
class Settings:
    """What every shard records, and what a resumed run must find unchanged in the shards written already."""
    vq: str  # data.vq_fingerprint of the checkpoint's VQ
    resolution: int
    views: int
    seed: int
    shards: int  # in the whole data set
    codebook_size: int

    def metadata(self) -> dict[str, str]:
        return {"format": TOKEN_FORMAT, "version": TOKEN_VERSION, "vq": self.vq, "resolution": str(self.resolution),
                "views": str(self.views), "flips": "no", "seed": str(self.seed), "shards": str(self.shards),
                "codebook_size": str(self.codebook_size)}


def shard_path(out: Path, k: int, total: int) -> Path:
    return out / f"tokens-{k:05d}-of-{total:05d}.safetensors"


# ----------------------------------------------------------------------------------------------------
# The source, in shards


def source_shards(data: str, shard_size: int, problems: Problems) -> list[Path | FolderShard]:
    """--data -> its shards: tar paths (indexed only when encoded, by the process that encodes them), or a folder's
    captioned images in parts of shard_size. The folder's images are not decoded here: encoding does it."""
    tars = tar_paths(data)
    if tars:
        return tars
    folder = Path(data)
    if not folder.is_dir():
        raise UsageError(f"--data {data}: not a folder of captioned images, a .tar or a pattern of .tar files")
    examples = [Example(path, caption) for path, caption in captions_in_folder(folder, problems)]
    if not examples:
        raise UsageError(f"--data {data}: no captioned image (NAME.txt beside NAME.png, or a metadata.jsonl)")
    return [FolderShard(examples[a:a + shard_size], f"{folder.name}[{a}:{a + len(examples[a:a + shard_size])}]", folder)
            for a in range(0, len(examples), shard_size)]


def open_shard(source: Path | FolderShard, problems: Problems):
    """A source shard, indexed: a tar's headers scanned (what it skips counted in `problems`); a folder part as is."""
    return scan_tar(source, problems) if isinstance(source, Path) else source


# ----------------------------------------------------------------------------------------------------
# Encoding


def crops(image, resolution: int, views: int, generator: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """An image -> `views` random crops (V, 3, R, R) in [0, 1] and their micro-conditioning (V, 4) int32: original
    width, height, crop top, left. The image is resized once; the crops are drawn one after the other."""
    image, (W, H) = resize_shorter_side(image, resolution)
    pixels, micro = [], []
    for _ in range(views):
        p, top, left = random_crop(image, resolution, generator)
        pixels.append(p)
        micro.append([W, H, top, left])
    return torch.stack(pixels), np.array(micro, np.int32)


def pack_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (their UTF-8 bytes one after the other, (n + 1,) offsets)."""
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.cumsum([0] + [len(b) for b in encoded]).astype(np.int64)
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


class Progress:
    """Images done, images/s and the time left, on one line every PROGRESS_EVERY seconds and at each shard's end.
    The images still to do are counted from the shards opened so far (a tar is only indexed when its turn comes)."""

    def __init__(self, tag: str, shards: int):
        self.tag, self.shards, self.opened, self.images_opened = tag, shards, 0, 0
        self.done, self.t0, self.t_line = 0, time.perf_counter(), time.perf_counter()

    def opened_shard(self, n: int) -> None:
        self.opened, self.images_opened = self.opened + 1, self.images_opened + n

    def advance(self, n: int, where: str, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if force or now - self.t_line >= PROGRESS_EVERY:
            self.t_line = now
            rate = self.done / max(now - self.t0, 1e-9)
            total = self.images_opened / max(self.opened, 1) * self.shards  # the shards not opened: as the others
            left = max(total - self.done, 0) / rate if rate > 0 else float("inf")
            print(f"{self.tag}{self.done:,} of ~{total:,.0f} images ({where}), {rate:.3g} images/s, ETA "
                  f"{format_seconds(left)}", flush=True)


def format_seconds(s: float) -> str:
    if s == float("inf"):
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(s)) if s < 86400 else f"{s / 86400:.1f} days"


@torch.inference_mode()
def encode_shard(shard, vq, settings: Settings, batch_size: int, workers: int, device: torch.device,
                 problems: Problems, progress: Progress) -> dict[str, np.ndarray]:
    """The token shard of one source shard: each readable image's views encoded by the VQ, in the shard's order.
    Images are decoded and cropped in `workers` threads (PIL lets go of the GIL), a batch ahead of the VQ."""
    def load(i: int):
        try:
            image, caption = shard.image(i)
            return caption, *crops(image, settings.resolution, settings.views, image_generator(settings.seed,
                                                                                              shard.key(i)))
        except Exception as e:  # noqa: BLE001 (PIL's decoders raise OSError, ValueError, ...; a bad caption too)
            return e

    keys, captions, micro, ids = [], [], [], []
    batches = [range(a, min(a + batch_size, len(shard))) for a in range(0, len(shard), batch_size)]
    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(load, i) for i in batches[0]] if batches else []
        for b, batch in enumerate(batches):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(load, i) for i in batches[b + 1]] if b + 1 < len(batches) else []
            pixels = []
            for i, result in zip(batch, loaded):
                if isinstance(result, Exception):
                    problems.add("unreadable image", f"{shard.key(i)}: skipped, not a readable image "
                                                     f"({type(result).__name__}: {result})")
                    continue
                keys.append(shard.key(i))
                captions.append(result[0])
                pixels.append(result[1])
                micro.append(result[2])
            if pixels:
                tokens = vq.encode_to_ids(torch.cat(pixels).to(device))  # (B * V, h, w)
                ids.append(tokens.cpu().numpy().astype(np.uint16).reshape(len(pixels), settings.views,
                                                                           *tokens.shape[1:]))
            progress.advance(len(batch), shard.name)
    h = settings.resolution // vq.cfg.downsample_factor
    caption_utf8, caption_offsets = pack_texts(captions)
    key_utf8, key_offsets = pack_texts(keys)
    return {"ids": np.concatenate(ids) if ids else np.zeros((0, settings.views, h, h), np.uint16),
            "micro": np.stack(micro) if micro else np.zeros((0, settings.views, 4), np.int32),
            "caption_utf8": caption_utf8, "caption_offsets": caption_offsets,
            "key_utf8": key_utf8, "key_offsets": key_offsets}


def write_shard(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A token shard, written whole or not at all: to a temporary file, renamed when complete."""
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))


def written_count(path: Path, settings: Settings, source: str) -> int | None:
    """The number of examples in a shard written already with these settings; None if there is none. A UsageError
    if it was made with others (a resumed run must not mix them) or cannot be read."""
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="np") as f:
            meta, n = f.metadata() or {}, f.get_slice("ids").get_shape()[0]
    except Exception as e:  # noqa: BLE001 (safetensors' own error for a damaged file; OSError)
        raise UsageError(f"{path}: not a readable token shard ({type(e).__name__}: {e}): delete it, and the same "
                         f"command writes it again") from None
    expected = {**settings.metadata(), "source": source}
    differ = [f"{k} was {meta.get(k)!r}, now {v!r}" for k, v in expected.items() if meta.get(k) != v]
    if differ:
        raise UsageError(f"{path} was made with other settings ({', '.join(differ)}): choose another --out, or "
                         f"delete the shards made with the old ones")
    return n


# ----------------------------------------------------------------------------------------------------


def process_share(shard: str | None, rank: int, world: int) -> tuple[int, int]:
    """(i, n): this process takes the shards k with k % n == i; from torchrun's RANK and WORLD_SIZE, or --shard."""
    if shard is None:
        return rank, world
    i, n = cli.parse_shard(shard)
    if world > 1:
        raise UsageError("--shard is for separate jobs; under torchrun each process takes its share by its rank")
    return i, n


def check_settings(views: int, seed: int, shard_size: int, batch_size: int, workers: int,
                   resolution: int | None) -> None:
    checks = [(views >= 1, f"--views must be >= 1, got {views}"),
              (0 <= seed < 2**30, f"--seed must be in [0, 2**30), got {seed}"),
              (min(shard_size, batch_size, workers) >= 1, "--shard-size, --batch-size and --workers must be >= 1"),
              (resolution is None or resolution >= 1, f"--resolution must be >= 1, got {resolution}")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def load_vq(checkpoint: str, variant: str | None, resolution: int | None, device: torch.device):
    """The checkpoint's VQ in fp32 (as train.py runs it), and the resolution: --resolution, else the checkpoint's."""
    ckpt = load_checkpoint(checkpoint, variant)
    f = ckpt.vqvae.cfg.downsample_factor
    resolution = resolution or ckpt.transformer.cfg.sample_size * f
    if resolution % f:
        raise UsageError(f"--resolution {resolution}: must be a multiple of the VQ's {f} pixels per token")
    if ckpt.vqvae.cfg.num_vq_embeddings > 2**16:
        raise UsageError(f"the VQ's {ckpt.vqvae.cfg.num_vq_embeddings} codes do not fit the shards' uint16 ids")
    vq = ckpt.vqvae.to(device, torch.float32, memory_format=speed.vq_memory_format(device)).eval()
    return vq, resolution


def main(checkpoint: str, data: str, out: str, views: int = 1, seed: int = 0, shard_size: int = 10000,
         batch_size: int = 32, workers: int = 4, resolution: int | None = None, shard: str | None = None,
         device: str = "auto", variant: str | None = None) -> dict:
    """Encode this process's share of the shards; -> a summary (images encoded, skipped, shards, speed, size)."""
    check_settings(views, seed, shard_size, batch_size, workers, resolution)
    rank, world, dev = torchrun_process(device)
    i, n = process_share(shard, rank, world)
    tag = f"[{i}/{n}] " if n > 1 else ""
    listing = Problems()  # what listing a folder skips: recorded in shard 0, by the process that writes it
    with contextlib.nullcontext() if i == 0 else warnings.catch_warnings(action="ignore"):
        sources = source_shards(data, shard_size, listing)
    mine = [k for k in range(len(sources)) if k % n == i]
    vq, resolution = load_vq(checkpoint, variant, resolution, dev)
    settings = Settings(vq_fingerprint(vq), resolution, views, seed, len(sources), vq.cfg.num_vq_embeddings)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [k for k in mine if written_count(shard_path(out_dir, k, len(sources)), settings, sources[k].name) is None]
    print(f"{tag}{len(todo)} shards to encode of the {len(mine)} of this process ({len(mine) - len(todo)} done "
          f"already), of the {len(sources)} of {data}, into {out_dir}: {views} views of {resolution} px per image, "
          f"on {dev}", flush=True)

    progress, summary = Progress(tag, len(todo)), {"images": 0, "skipped": {}, "written": 0, "bytes": 0}
    t0 = time.perf_counter()
    try:
        for k in todo:
            path = shard_path(out_dir, k, len(sources))
            problems = Problems(listing.counts if k == 0 else None)
            source = open_shard(sources[k], problems)
            progress.opened_shard(len(source))
            arrays = encode_shard(source, vq, settings, batch_size, workers, dev, problems, progress)
            write_shard(path, arrays, {**settings.metadata(), "source": sources[k].name,
                                       "skipped": json.dumps(dict(sorted(problems.counts.items())))})
            source.close()
            summary["images"] += len(arrays["ids"])
            summary["written"] += 1
            summary["bytes"] += path.stat().st_size
            for kind, c in problems.counts.items():
                summary["skipped"][kind] = summary["skipped"].get(kind, 0) + c
            progress.advance(0, f"wrote {path.name}: {len(arrays['ids']):,} examples, skipped "
                                f"{problems.summary()}", force=True)
    except KeyboardInterrupt:
        print(f"{tag}interrupted: the shards written are complete; the same command continues", flush=True)
        raise
    seconds = time.perf_counter() - t0
    summary.update(seconds=seconds, images_per_s=summary["images"] / seconds if seconds else 0.0,
                   bytes_per_example=summary["bytes"] / summary["images"] if summary["images"] else 0.0)
    print(f"{tag}done: {summary['images']:,} images encoded into {summary['written']} shards in {seconds:.1f} s "
          f"({summary['images_per_s']:.3g} images/s, {summary['bytes_per_example']:.0f} bytes per example); "
          f"skipped: {Problems(summary['skipped']).summary()}",
          flush=True)
    return summary


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoint", default="amused/amused-256",
                   help="hub-layout folder, file from convert_weights.py, or hub repo id: its VQ encodes")
    p.add_argument("--variant", choices=["fp16"], default=None, help="read the .fp16.safetensors files of a hub "
                                                                    "checkpoint (the VQ still encodes in fp32)")
    p.add_argument("--data", required=True,
                   help="folder of images with NAME.txt captions or a metadata.jsonl; or tar shards (img2dataset: a "
                        ".tar, a folder of them, or a pattern \"{00000..00099}.tar\")")
    p.add_argument("--out", required=True, help="folder of the token shards (train.py --data OUT)")
    p.add_argument("--views", type=int, default=1, help="random crops stored per image; train.py uses one per epoch")
    p.add_argument("--seed", type=int, default=0, help="the crops (each image's generator: seed and image name)")
    p.add_argument("--resolution", type=int, default=None,
                   help="crop size in pixels; None: the checkpoint's (its U-ViT's sample_size x the VQ's pixels "
                        "per token)")
    p.add_argument("--shard-size", type=int, default=10000, help="images per token shard from a folder (a tar: one "
                                                                 "shard each)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VQ encode")
    p.add_argument("--workers", type=int, default=4, help="threads decoding and cropping images ahead of the VQ")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="take the shards k with k %% N == I (0-based): one of N separate jobs")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                   help="auto: cuda, else mps, else cpu; under torchrun, cuda is each process's GPU (LOCAL_RANK)")
    args = p.parse_args()
    cli.run(main, args, errors=(UsageError, CheckpointError, FileNotFoundError))
    sys.exit(0)
