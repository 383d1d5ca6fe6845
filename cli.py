"""cli.py: what the command-line scripts (sample.py, train.py, convert_weights.py) share.

One-line errors with exit code 2 and Ctrl-C without a traceback (`run`), the help layout, the --device rule, the
dtype names, durations and times left for progress lines, atomic file writes and image grids. Nothing here knows
about the model.
"""
import argparse
import contextlib
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --dtype names


def dtype_name(dtype: torch.dtype) -> str:
    """The --dtype name of a torch dtype: "bf16" for torch.bfloat16."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def fp16_cpu_note(flag: str, full: str = "fp32") -> str:
    """What to say when a flag asks for fp16 on a CPU: CPUs have no fp16 matmul units, so it runs emulated. full:
    the flag's value for full precision."""
    return (f"note: {flag} fp16 on a CPU runs emulated (sampling: 2.7x slower than bf16 on our AMD EPYC with "
            f"AVX512-BF16): use {flag} bf16, or {flag} {full} on a CPU without AMX or AVX512-BF16")


EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # 130 = 128 + SIGINT, what shells report for a Ctrl-C


class UsageError(ValueError):
    """A flag value or an input we reject before doing any work."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's layout kept, and every flag's default shown (they are the real ones). A default of None
    means "decided at run time", which the flag's help says in words: "(default: None)" would only repeat it
    wrongly."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def run(main, args: argparse.Namespace, errors: tuple[type[Exception], ...]):
    """main(**vars(args)), with the errors a user can fix (`errors`) as one line `error: ...` on stderr and exit
    code 2, and Ctrl-C as one line and exit code 130, neither with a traceback. Returns what main returns."""
    # warnings (e.g. an image resized to a multiple of the token size) as one plain line each
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        return main(**vars(args))
    except errors as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def resolve_device(name: str) -> str:
    """auto -> cuda, else mps, else cpu; an explicit device that is not there is an error, not a fallback."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise UsageError("--device cuda: CUDA is not available here (no GPU, or torch built without CUDA); "
                         "use --device cpu or auto")
    if name == "mps" and not mps:
        raise UsageError("--device mps: MPS (Apple GPU) is not available here; use --device cpu or auto")
    return name


def parse_shard(shard: str) -> tuple[int, int]:
    """--shard i/n (the i-th of n separate jobs, from 0) -> (i, n)."""
    m = re.fullmatch(r"(\d+)/(\d+)", shard)
    if m is None or not int(m[1]) < int(m[2]):
        raise UsageError(f"--shard must be i/n with 0 <= i < n, e.g. 0/4 for the first of 4 shares, got {shard!r}")
    return int(m[1]), int(m[2])


def duration(seconds: float) -> str:
    """12.3 s, 4 min 10 s, 2 h 46 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds) // 60
    return f"{minutes} min {round(seconds) % 60} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def time_left(seconds: float, done: float, left: float) -> str:
    """How long `left` more units of work will take, if they go at the pace of the `done` ones that took `seconds`."""
    return duration(seconds / done * left) if done > 0 else "?"


@contextlib.contextmanager
def stop_requests(message: str | None):
    """Inside, Ctrl-C and SIGTERM (what cluster schedulers send before they kill) do not interrupt: they are
    recorded in the yielded list (their times), for the loop to stop where its work is whole (train.py: after the
    step; sample_many.py: after the batch). The first prints "SIGNAL: message" (None: nothing, as on a process
    other than rank 0). A second Ctrl-C quits at once (KeyboardInterrupt), but only a second later: torchrun
    forwards the terminal's Ctrl-C to its workers, which so receive it twice within milliseconds."""
    requests = []

    def request(signum, frame):
        if requests and signum == signal.SIGINT and time.monotonic() - requests[0] > 1.0:
            raise KeyboardInterrupt
        if not requests and message is not None:
            print(f"\n{signal.Signals(signum).name}: {message}", flush=True)
        requests.append(time.monotonic())

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def atomic_write(path, write) -> None:
    """write(tmp) to a temporary file beside `path`, then rename it to `path`, so that an interruption never leaves
    a half-written `path`. The file gets the permissions the umask gives new files (safetensors creates its files
    0600)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def image_grid(images: list[Image.Image], cols: int, labels: list[str] | None = None) -> Image.Image:
    """Images of one size, row by row, `cols` to a row, on white; `labels`, if given, written above the columns."""
    W, H = images[0].size
    rows = -(-len(images) // cols)  # ceil
    label_h = 0 if labels is None else max(12, H // 10)
    font = ImageFont.load_default(size=label_h * 0.8) if labels else None
    grid = Image.new("RGB", (W * cols, label_h + H * rows), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(labels or []):
        text = label if draw.textlength(label, font=font) <= W else label.split()[0]  # "12 steps", or "12"
        draw.text((j * W + W / 2, label_h / 2), text, fill="black", font=font, anchor="mm")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * W, label_h + (i // cols) * H))
    return grid
