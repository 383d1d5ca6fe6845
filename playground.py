"""playground.py: a local web page to watch aMUSEd draw, edit and inpaint.

    python playground.py --checkpoint amused/amused-256              # then open http://127.0.0.1:7860
    python playground.py --checkpoint runs/digits/model.safetensors  # examples/digits.py's model: any CPU, offline

aMUSEd is a masked-token model, so the page can show what a diffusion demo cannot: the token grid filling in, step
by step. Text to image, image to image (drop an image, pick a strength), inpainting (paint the mask on the image in
the browser), a comparison of step counts (5, 10 and 15 side by side) in one click, and a history of what was made
since the page opened. Everything is local: the page loads nothing from other sites, so it works offline.

How it works, with the standard library only (http.server: no web framework to install or to learn):
  - One worker thread owns the pipeline and runs the generations one at a time, in the order they were asked for.
    The HTTP server answers on threads of its own, so the page stays responsive during a generation: it queues a
    generation, follows its events, cancels it, fetches its images.
  - After every step the pipeline calls our callback. It decodes the committed tokens into a PNG (masked cells
    grey, as `sample.py --save-steps` draws them), and announces it on the generation's event stream
    (server-sent events: one long HTTP response, a few lines per event). A cancel is honoured there too: the
    callback raises, which stops the generation at the next step. A frame costs a VQ decode per image and step
    (for amused-256 on a CPU, about as long as the step itself): untick "show every step" to skip them.
  - Everything the server writes goes to one temporary folder, removed at exit. Images are served by generation id
    and index only: no name or path sent by the page is ever used to open a file. The checkpoint is the one given
    at start; nothing on the page can change it.

The API the page uses (JSON in and out; a refused request gets {"error": "..."} and a 4xx status):
  GET  /api/info                          the model (resolution, token grid), the limits of the settings, and
                                          their first values (defaults: the checkpoint's sampling_defaults, else
                                          the pipeline's; they also fill in what a request leaves out)
  POST /api/uploads                       an image file as the body -> {id, data_url: the image as the model sees it}
  POST /api/generations                   settings -> {id, ahead, events, ...}: queued
  GET  /api/generations/ID                where it stands: queued (and how many ahead), running, done, ...
  GET  /api/generations/ID/events         its events: queued, started, step, run_done, then done/cancelled/failed
  POST /api/generations/ID/cancel         stop it (at the next step if it is running)
  GET  /api/generations/ID/files/N        its N-th image, a PNG: step frames and results, as the events name them

Bound to 127.0.0.1 by default: only this machine can reach it. `--host 0.0.0.0` lets anyone who can reach this
machine use the model, with a warning at start.
"""
import argparse
import base64
import binascii
import io
import json
import math
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch
from PIL import Image

import amused
import cli
import sample
import sampling
from amused import Amused
from cli import UsageError
from sampling import Sampler

PAGE = Path(__file__).with_name("playground.html")  # the page: HTML, CSS and JavaScript in one file
MODES = ("text-to-image", "img2img", "inpaint")  # sample.Job's names
MAX_UPLOAD_BYTES = 10 * 2**20  # an uploaded image (and a request body)
MAX_PIXELS = 50_000_000  # decoded: a small file can hold a huge image (a "decompression bomb")
MAX_STEPS = 100  # and never more than the model's tokens: each step commits at least one
MAX_IMAGES = 8  # images per generation
MAX_COMPARE = 4  # step counts in one comparison
MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens; this only bounds the tokenizer's work
MAX_QUEUED = 16  # generations waiting; more are refused until some have run
KEEP_GENERATIONS = 100  # finished generations kept (their images stay on the page's history strip)
KEEP_UPLOADS = 20  # uploaded images kept in memory, for the generations still to be asked for
KEEPALIVE_S = 15  # an event stream with nothing to say sends a comment this often, to notice closed pages
FINISHED = ("done", "cancelled", "failed")
# the settings a page may post to /api/generations
FIELDS = ("mode", "prompt", "negative_prompt", "steps", "guidance_scale", "seed", "num_images", "strength", "image",
          "mask", "frames", "aspect", "sampler", "guidance_schedule")
PAGE_DEFAULTS = ("steps", "guidance_scale", "sampler", "guidance_schedule")  # the sampling settings the form sets
# text to image's choice of shape (width:height); each is drawn at about the model's pixel count (sample.model_size_at)
ASPECTS = {"1:1": 1.0, "4:3": 4 / 3, "3:4": 3 / 4, "3:2": 3 / 2, "2:3": 2 / 3, "16:9": 16 / 9, "9:16": 9 / 16}
# A page on another site can make the browser send a POST here, but without asking first (a CORS preflight, which
# we never answer) only with one of these content types, or none. Refusing them keeps other sites from queueing work.
SIMPLE_CONTENT_TYPES = ("", "application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # this machine's own names
EVERY_INTERFACE = ("", "0.0.0.0", "::")
# what a generation may fail with that is about its input, not a bug: its message is shown as it is
GENERATION_ERRORS = (UsageError, ValueError, TypeError, FloatingPointError)


# ----------------------------------------------------------------------------------------------------
# Checks that need no model: the settings a page sends, and uploaded images


def to_int(value, name: str) -> int:
    """A whole number, given as a JSON number or a string of digits (a seed can exceed JavaScript's 2**53)."""
    if isinstance(value, int) and not isinstance(value, bool):  # bool is an int in Python
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise UsageError(f"{name} must be a whole number, got {value!r:.40}")


def to_float(value, name: str) -> float:
    """A number, given as a JSON number or a string ("nan" parses, and is then refused by the range checks)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise UsageError(f"{name} must be a number, got {value!r:.40}")


@dataclass
class Settings:
    """A generation's settings, checked; the image and mask are upload id and PNG data until the model fits them."""
    mode: str
    prompt: str
    negative_prompt: str | None
    step_counts: list[int]  # one run each, from the same seed: [12], or [5, 10, 15] to compare
    guidance_scale: float
    seed: int
    num_images: int
    strength: float | None  # None for text to image
    frames: bool  # stream a frame after every step (a VQ decode per image and step)
    image: str | None  # upload id
    mask: str | None  # a PNG, as a data URL or base64
    aspect: str | None  # text to image: a key of ASPECTS; None for img2img and inpaint (the image's own shape)
    sampler: Sampler  # the sampler and its guidance schedule (sampling.py); the reference's by default
    size: tuple[int, int] = (0, 0)  # (width, height) of the images, set when the model is known (Playground.submit)

    def public(self) -> dict:
        """What the page shows of them (the seed as a string: JavaScript's numbers are exact only to 2**53)."""
        return dict(mode=self.mode, prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.step_counts,
                    guidance_scale=self.guidance_scale, seed=str(self.seed), num_images=self.num_images,
                    strength=self.strength, aspect=self.aspect, width=self.size[0], height=self.size[1],
                    sampler=self.sampler.name, guidance_schedule=self.sampler.guidance_schedule)


def check_settings(body, max_steps: int, defaults: dict = sample.PIPELINE_DEFAULTS) -> Settings:
    """The JSON object a page posts to /api/generations -> Settings; a UsageError with a message for the page.
    defaults: the pipeline keywords (sample.PIPELINE_DEFAULTS' keys) of the settings the page leaves out, and of
    those it cannot set (mask schedule, ...): the checkpoint's sampling_defaults over the pipeline's."""
    if not isinstance(body, dict):
        raise UsageError("the settings must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r}")
    mode = body.get("mode", "text-to-image")
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r:.40}")
    prompt, negative = body.get("prompt"), body.get("negative_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt is empty: type what to draw")
    if negative is not None and not isinstance(negative, str):
        raise UsageError("negative_prompt must be text")
    negative = negative or None  # "" is the default too: the empty prompt
    if max(len(prompt), len(negative or "")) > MAX_PROMPT_CHARS:
        raise UsageError(f"a prompt is limited to {MAX_PROMPT_CHARS} characters (CLIP reads only its first 77 tokens)")
    steps = body.get("steps", defaults["steps"])
    step_counts = [to_int(s, "steps") for s in (steps if isinstance(steps, list) else [steps])]
    if not 1 <= len(step_counts) <= MAX_COMPARE:
        raise UsageError(f"steps must be a number, or a list of 1 to {MAX_COMPARE} numbers to compare")
    if not all(1 <= s <= max_steps for s in step_counts):
        raise UsageError(f"steps must be between 1 and {max_steps} (each step commits at least one of the model's "
                         f"tokens), got {', '.join(map(str, step_counts))}")
    guidance = to_float(body.get("guidance_scale", defaults["guidance_scale"]), "guidance_scale")
    if not 0 <= guidance < math.inf:  # written so that NaN fails too
        raise UsageError(f"guidance must be >= 0 and finite (values <= 1 turn guidance off), got {guidance}")
    seed = to_int(body.get("seed", 0), "seed")
    if not 0 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise UsageError(f"seed must be in [0, 2**64), got {seed}")
    num_images = to_int(body.get("num_images", 1), "num_images")
    if not 1 <= num_images <= MAX_IMAGES:
        raise UsageError(f"the number of images must be between 1 and {MAX_IMAGES}, got {num_images}")
    frames = body.get("frames", True)
    if not isinstance(frames, bool):
        raise UsageError("frames must be true or false")
    image, mask, strength, aspect = body.get("image"), body.get("mask"), body.get("strength"), body.get("aspect")
    if mode == "text-to-image":
        if image is not None or mask is not None or strength is not None:
            raise UsageError("image, mask and strength are for img2img and inpaint, not text-to-image")
        aspect = "1:1" if aspect is None else aspect
        if aspect not in ASPECTS:
            raise UsageError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r:.20}")
    else:
        if aspect is not None:
            raise UsageError(f"{mode} keeps the shape of its image: aspect is for text-to-image")
        if not isinstance(image, str):
            raise UsageError(f"{mode} starts from an image: drop or upload one first")
        if mode == "img2img" and mask is not None:
            raise UsageError("a mask is for inpaint; img2img redoes a random part of the whole image")
        if mode == "inpaint" and mask is None:
            raise UsageError("inpaint needs a mask: paint over the part of the image to redo")
        if strength is None:
            strength = sample.DEFAULT_STRENGTH[mode]
        strength = to_float(strength, "strength")
        if not 0 < strength <= 1:  # written so that NaN fails too
            raise UsageError(f"strength must be in (0, 1], got {strength}")
        zero = [s for s in step_counts if int(s * strength) == 0]
        if zero:  # the pipelines run only the last int(steps * strength) steps of the schedule
            raise UsageError(f"strength {strength} x {zero[0]} steps rounds down to 0 steps: raise one of them")
    try:
        sampler = Sampler(body.get("sampler", defaults["sampler"]), defaults["mask_schedule"],
                          body.get("guidance_schedule", defaults["guidance_schedule"]), defaults["guidance_from"],
                          defaults["softmax_temperature"], defaults["halton_roll"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Settings(mode, prompt, negative, step_counts, guidance, seed, num_images, strength, frames, image, mask,
                    aspect, sampler)


def decode_image(data: bytes, what: str, mode: str = "RGB") -> Image.Image:
    """An image file's bytes -> 8-bit "RGB" (or "L", for a mask), read fully now; a UsageError naming `what` if it is
    not a usable image."""
    if not data:
        raise UsageError(f"{what} is empty")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only: the size is known before any pixel is decoded
        too_big = image.width * image.height > MAX_PIXELS
        if not too_big:
            image.load()
    except Image.DecompressionBombError:  # Pillow's own, larger limit, checked in Image.open
        raise UsageError(f"{what} has more than {MAX_PIXELS / 1e6:.0f} million pixels") from None
    except Image.UnidentifiedImageError:  # its message would name our in-memory file
        raise UsageError(f"{what} is not an image Pillow can read (no image format it knows)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # what Pillow's decoders raise on bad data
        raise UsageError(f"{what} is not an image Pillow can read ({e})") from None
    if too_big:
        raise UsageError(f"{what} is {image.width}x{image.height}: more than {MAX_PIXELS / 1e6:.0f} million pixels")
    oriented = sample.exif_oriented(image)
    try:
        if mode == "L":  # a mask's grey levels; its alpha channel means nothing (a canvas's PNG always has one)
            return amused.to_8bit(oriented).convert("L")
        # 16-bit and float grayscale scaled to 8 bits; an alpha channel dropped (with a warning in the server's log)
        return amused.pil_to_rgb(oriented)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None


def data_url_bytes(text, what: str) -> bytes:
    """"data:image/png;base64,AAAA" (what a canvas's toDataURL gives) or plain base64 -> the bytes."""
    if not isinstance(text, str):
        raise UsageError(f"{what} must be a PNG as a data URL")
    try:
        return base64.b64decode(text.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what} is not valid base64 data") from None


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def host_warning(host: str) -> str | None:
    """What to say when --host makes the page reachable from other machines."""
    if host in EVERY_INTERFACE:
        return (f"warning: --host {host or '(empty)'} listens on every network interface: anyone who can reach this "
                f"machine can use the model and send it images. Use it only on a network you trust.")
    if host not in LOOPBACK:
        return f"warning: --host {host}: every machine that can reach {host} can use the model and send it images."
    return None


# ----------------------------------------------------------------------------------------------------
# Generations, the queue and the worker


class Cancelled(Exception):
    """Raised in the step callback of a cancelled generation: it unwinds the pipeline after the current step."""


@dataclass
class Generation:
    """One generation asked for by a page: what it runs, where it stands, and what it has said and written."""
    id: str  # 32 random hex digits: unguessable, and never a path
    settings: Settings
    job: sample.Job  # what sample.generate runs: the settings with the image and mask fitted to the model
    repaint: int | None  # inpainting: the number of tokens under the mask
    folder: Path  # its files, inside the server's temporary folder
    status: str = "queued"  # then "running", then one of FINISHED
    events: list = field(default_factory=list)  # (name, data) in order; an event's id is its index
    files: list = field(default_factory=list)  # the PNGs it wrote, served as files/N
    cancel: threading.Event = field(default_factory=threading.Event)
    result: str | None = None  # the URL of the finished image (a grid when there are several)
    images: list = field(default_factory=list)  # the URLs of each run's images
    error: str | None = None


class StepFrames:
    """The step callback of one run: stops a cancelled generation, and announces the committed tokens of every step,
    decoded (as sample.step_frames draws them: masked cells grey), a frame per image."""

    def __init__(self, playground: "Playground", gen: Generation, run: int, n_steps: int):
        self.playground, self.gen, self.run, self.n_steps = playground, gen, run, n_steps
        self.t0 = time.perf_counter()

    def __call__(self, step: int, tokens: torch.Tensor) -> None:  # tokens: (B, h, w)
        if self.gen.cancel.is_set():
            raise Cancelled  # before decoding: a cancelled generation spends nothing more
        pipe, urls = self.playground.pipe, None
        if self.gen.settings.frames:
            frames = sample.step_frames(pipe, list(tokens.cpu()))  # step_frames paints the grey on the CPU
            urls = [self.playground.add_file(self.gen, frame) for frame in frames]
        # counted per image: "29 of 64 tokens" means something; 116 of the 256 of four images at once does not
        self.playground.emit(self.gen, "step", dict(run=self.run, step=step + 1, steps=self.n_steps,
                                                    masked=(tokens == pipe.mask_id).flatten(1).sum(1).tolist(),
                                                    tokens=tokens[0].numel(), urls=urls,
                                                    seconds=round(time.perf_counter() - self.t0, 3)))


class Playground:
    """What the HTTP handlers share: the pipeline (used by the worker thread only), the queue, the generations and
    the uploads. One lock guards all of them: `self.changed`, a Condition, which every change notifies, so that
    event streams wait on it for new events."""

    def __init__(self, pipe: Amused, folder: Path, checkpoint: str):
        self.pipe, self.folder, self.checkpoint = pipe, Path(folder), checkpoint
        self.page = PAGE.read_bytes()  # read once: the server never opens a file by a name a request gives
        s = pipe.transformer.cfg.sample_size
        self.max_steps = min(MAX_STEPS, s * s)  # more steps than the model's tokens cannot help (sample.py's note)
        self.generator_device = sample.resolve_generator_device("auto", pipe.device.type)
        # the settings the page does not send: the checkpoint's recommendation, else the pipeline's defaults
        self.defaults = {**sample.PIPELINE_DEFAULTS, **pipe.sampling_defaults}
        self.changed = threading.Condition()
        self.pending: list[Generation] = []  # waiting, first in line first
        self.running: Generation | None = None
        self.generations: dict[str, Generation] = {}  # every one still kept, oldest first
        self.uploads: OrderedDict[str, Image.Image] = OrderedDict()  # id -> RGB image fitted to the model
        self.closed = False
        self.worker = threading.Thread(target=self.work, name="amused-worker", daemon=True)
        self.worker.start()

    def info(self) -> dict:
        cfg = self.pipe.transformer.cfg
        return dict(checkpoint=self.checkpoint, resolution=self.pipe.resolution, tokens=cfg.sample_size,
                    sizes={name: sample.model_size_at(aspect, self.pipe) for name, aspect in ASPECTS.items()},
                    samplers=list(sampling.SAMPLERS), guidance_schedules=list(sampling.GUIDANCE_SCHEDULES),
                    device=str(self.pipe.device),
                    dtype="int8" if self.pipe.int8 else cli.dtype_name(self.pipe.dtype),
                    max_steps=self.max_steps, max_images=MAX_IMAGES, max_compare=MAX_COMPARE,
                    max_upload_bytes=MAX_UPLOAD_BYTES, max_prompt_chars=MAX_PROMPT_CHARS,
                    defaults={key: self.defaults[key] for key in PAGE_DEFAULTS})  # the form's first values

    def fit(self, image: Image.Image, what: str, size: tuple[int, int] | None = None) -> Image.Image:
        """An image at `size` (default: the model's pixel count at its aspect ratio), scaled and centre-cropped as
        sample.py does, then, for sizes within one token of it, the pipeline's own resize done here, so that the
        page shows exactly what the model gets."""
        size = size or sample.image_size(image, None, None, self.pipe)
        image = sample.fit_image(image, size, self.pipe.vqvae.cfg.downsample_factor, what)
        return image if image.size == size else image.resize(size, resample=Image.LANCZOS)

    # -- what the requests do (on the HTTP server's threads)

    def upload(self, data: bytes) -> dict:
        image = decode_image(data, "the upload")
        fitted = self.fit(image, "the upload")
        upload_id = secrets.token_hex(16)
        with self.changed:
            self.uploads[upload_id] = fitted
            while len(self.uploads) > KEEP_UPLOADS:
                self.uploads.popitem(last=False)  # the oldest
        note = None if fitted.size == image.size else (f"scaled and centre-cropped from {image.width}x{image.height} "
                                                       f"to {fitted.width}x{fitted.height}: about the model's "
                                                       f"{self.pipe.resolution}x{self.pipe.resolution} pixels, at the "
                                                       f"image's aspect ratio")
        return dict(id=upload_id, width=fitted.width, height=fitted.height, note=note, data_url=png_data_url(fitted))

    def submit(self, body) -> Generation:
        """Check a page's settings, fit its image and mask to the model, and queue the generation."""
        settings = check_settings(body, self.max_steps, self.defaults)
        image = mask = repaint = None
        if settings.image is not None:
            with self.changed:
                image = self.uploads.get(settings.image)
            if image is None:
                raise UsageError("the image is no longer on the server (it keeps the last few uploads): upload it again")
        settings.size = image.size if image is not None else sample.model_size_at(ASPECTS[settings.aspect], self.pipe)
        f = self.pipe.vqvae.cfg.downsample_factor
        grid = (settings.size[1] // f, settings.size[0] // f)
        if settings.mask is not None:
            mask = decode_image(data_url_bytes(settings.mask, "the mask"), "the mask", "L")
            mask = self.fit(mask, "the mask", image.size)  # painted on the image as the page showed it: its size
            repaint = int(amused.preprocess_mask(mask, (mask.height, mask.width), grid).sum())  # what inpaint masks
            if repaint == 0:
                raise UsageError(f"the mask covers no token: paint (white) over the part to redo; each of the "
                                 f"{grid[1]}x{grid[0]} tokens is repainted where the mask covers at least half of it")
        job = sample.Job(settings.mode, settings.prompt, settings.negative_prompt, settings.guidance_scale,
                         settings.num_images, aesthetic_score=6.0, strength=settings.strength, image=image, mask=mask,
                         size=settings.size if image is None else None, sampler=settings.sampler,
                         temperature=self.defaults["temperature"])
        gen_id = secrets.token_hex(16)
        gen = Generation(gen_id, settings, job, repaint, self.folder / gen_id)
        with self.changed:
            if self.closed:
                raise UsageError("the server is stopping")
            if len(self.pending) >= MAX_QUEUED:
                raise UsageError(f"{MAX_QUEUED} generations are already waiting: try again when some have run")
            self.generations[gen_id] = gen
            self.pending.append(gen)
            self.emit(gen, "queued", {"ahead": self.ahead(gen)})
        return gen

    def cancel(self, gen: Generation) -> None:
        """A waiting generation is dropped now; a running one stops at its next step (StepFrames raises)."""
        with self.changed:
            if gen in self.pending:
                self.pending.remove(gen)
                self.finish(gen, "cancelled")
                self.announce_places()
            gen.cancel.set()

    def describe(self, gen: Generation) -> dict:
        with self.changed:
            return dict(id=gen.id, status=gen.status, ahead=self.ahead(gen), settings=gen.settings.public(),
                        repaint=gen.repaint, result=gen.result, images=gen.images, error=gen.error,
                        events=f"/api/generations/{gen.id}/events")

    def file(self, gen: Generation, n: int) -> Path:
        with self.changed:
            if n >= len(gen.files):
                raise LookupError(f"generation {gen.id} has no file {n}")
            return gen.files[n]

    # -- state changes; the caller holds the lock where it says so

    def ahead(self, gen: Generation) -> int | None:
        """How many generations will run before this one (the running one included); None once it has started.
        The caller holds the lock."""
        if gen not in self.pending:
            return None
        return self.pending.index(gen) + (self.running is not None)

    def announce_places(self) -> None:
        """Tell every waiting generation its new place in the line. The caller holds the lock."""
        for gen in self.pending:
            self.emit(gen, "queued", {"ahead": self.ahead(gen)})

    def emit(self, gen: Generation, name: str, data: dict) -> None:
        """Add an event (data: what the page gets as JSON) and wake the event streams."""
        with self.changed:  # re-entrant: callers that hold the lock may call it too
            gen.events.append((name, data))
            self.changed.notify_all()

    def finish(self, gen: Generation, status: str, data: dict | None = None) -> None:
        """The last event, and the status that ends the event stream, in one step."""
        with self.changed:
            gen.status = status
            gen.error = (data or {}).get("error")
            self.emit(gen, status, data or {})

    def add_file(self, gen: Generation, image: Image.Image) -> str:
        """Save a PNG in the generation's folder (named by its index) -> the URL it is served at."""
        with self.changed:
            n = len(gen.files)
            path = gen.folder / f"{n}.png"
            gen.files.append(path)
        image.save(path, format="PNG")  # no one reads it before the event that names it
        return f"/api/generations/{gen.id}/files/{n}"

    # -- the worker thread

    def work(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.pending or self.closed)
                if self.closed:
                    return
                gen = self.running = self.pending.pop(0)
                gen.status = "running"
                self.announce_places()
            try:
                self.run(gen)
            finally:
                with self.changed:
                    self.running = None
                    self.prune()

    def run(self, gen: Generation) -> None:
        """Every run of a generation (one per step count, each from the same seed, as sample.py's --steps 5,10,15),
        with its events. Whatever goes wrong ends this generation only: the worker goes on with the next one."""
        s, t0 = gen.settings, time.perf_counter()
        what = (f"generation {gen.id[:8]}: {s.mode}, {'/'.join(map(str, s.step_counts))} steps, "
                f"{s.num_images} image{'s' * (s.num_images > 1)}, {s.prompt!r:.60}")
        print(f"{what}: started", flush=True)
        try:
            gen.folder.mkdir()
            f = self.pipe.vqvae.cfg.downsample_factor
            self.emit(gen, "started", dict(runs=s.step_counts, num_images=s.num_images, repaint=gen.repaint,
                                           tokens=(s.size[0] // f) * (s.size[1] // f)))
            columns = []
            for run, n_steps in enumerate(s.step_counts):
                if gen.cancel.is_set():  # cancelled between two runs of a comparison (or before the first)
                    raise Cancelled
                # A fresh generator per run: each run is what that step count alone would give.
                generator = torch.Generator(self.generator_device).manual_seed(s.seed)
                images = sample.generate(self.pipe, gen.job, n_steps, generator, StepFrames(self, gen, run, n_steps))
                columns.append(images)
                urls = [self.add_file(gen, image) for image in images]
                with self.changed:
                    gen.images.append(urls)
                self.emit(gen, "run_done", {"run": run, "images": urls})
            # The result to download: one image as it is, one run's images side by side (4 a row), a comparison as
            # sample.py writes it (rows = images, columns = runs, the step counts above them).
            if len(columns) == 1 and s.num_images == 1:
                result_url = gen.images[0][0]
            elif len(columns) == 1:
                result_url = self.add_file(gen, cli.image_grid(columns[0], min(s.num_images, 4)))
            else:
                rows = [columns[j][i] for i in range(s.num_images) for j in range(len(columns))]
                result_url = self.add_file(gen, cli.image_grid(rows, len(columns),
                                                               labels=[f"{n} steps" for n in s.step_counts]))
            with self.changed:
                gen.result = result_url
                self.finish(gen, "done", dict(result=result_url, images=gen.images,
                                              seconds=round(time.perf_counter() - t0, 3)))
            print(f"{what}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        except Cancelled:
            self.finish(gen, "cancelled")
            print(f"{what}: cancelled", flush=True)
        except GENERATION_ERRORS as e:
            self.finish(gen, "failed", {"error": " ".join(str(e).split())})
            print(f"{what}: failed: {gen.error}", flush=True)
        except Exception as e:  # a bug, or out of memory: said on the page, and in full in the server's log
            traceback.print_exc()
            self.finish(gen, "failed", {"error": f"internal error: {type(e).__name__}: {e}"})

    def prune(self) -> None:
        """Forget the oldest finished generations past KEEP_GENERATIONS, and delete their files. The caller holds
        the lock."""
        finished = [gen for gen in self.generations.values() if gen.status in FINISHED]
        for gen in finished[:max(0, len(finished) - KEEP_GENERATIONS)]:
            del self.generations[gen.id]
            shutil.rmtree(gen.folder, ignore_errors=True)

    def close(self, timeout: float | None = None) -> None:
        """Drop the waiting generations, stop the running one at its next step, and wait for the worker."""
        with self.changed:
            self.closed = True
            for gen in self.pending:
                self.finish(gen, "cancelled")
            self.pending.clear()
            if self.running is not None:
                self.running.cancel.set()
            self.changed.notify_all()
        self.worker.join(timeout)


# ----------------------------------------------------------------------------------------------------
# HTTP


class ApiError(Exception):
    """A request we refuse: its HTTP status and a message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


GENERATION_PATH = re.compile(r"/api/generations/([0-9a-f]{32})(/events|/cancel|/files/(\d{1,6}))?")
# What the page's own code may do: scripts and styles from the page itself, images from here, data URLs (uploads)
# and blobs, requests to here. Nothing from other sites can load, so the page works offline.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")


class Handler(BaseHTTPRequestHandler):
    """One request, on a thread of the server's (ThreadingHTTPServer). Routes are the if-chain of `route`."""
    server_version = "amused-playground"

    def do_GET(self):
        self.respond("GET")

    def do_POST(self):
        self.respond("POST")

    def respond(self, method: str) -> None:
        """Route, and turn every refusal into a JSON error: a bad request never stops the server."""
        try:
            self.route(method, urlsplit(self.path).path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away (a closed tab, a reload): nothing to answer
        except ApiError as e:
            self.send_json({"error": str(e)}, e.status)
        except UsageError as e:
            self.send_json({"error": " ".join(str(e).split())}, 400)
        except Exception as e:  # a bug: in full in the server's log, in one line on the page
            traceback.print_exc()
            self.send_json({"error": f"internal error: {type(e).__name__}: {e}"}, 500)

    def route(self, method: str, path: str) -> None:
        pg: Playground = self.server.playground
        self.check_host()
        if method == "POST":
            # Also for the one POST without a body (cancel): see SIMPLE_CONTENT_TYPES.
            kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if kind in SIMPLE_CONTENT_TYPES:
                raise ApiError(415, f"a POST here needs a Content-Type such as application/json, got {kind!r}")
        if path == "/":
            self.allow(method, "GET")
            return self.send(pg.page, "text/html; charset=utf-8", {"Content-Security-Policy": CONTENT_SECURITY_POLICY})
        if path == "/favicon.ico":
            return self.send(b"", "image/x-icon", status=204)  # none: spares the log a 404 on every page load
        if path == "/api/info":
            self.allow(method, "GET")
            return self.send_json(pg.info())
        if path == "/api/uploads":
            self.allow(method, "POST")
            return self.send_json(pg.upload(self.read_body()))
        if path == "/api/generations":
            self.allow(method, "POST")
            try:
                body = json.loads(self.read_body())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ApiError(400, f"the body is not JSON ({e})") from None
            return self.send_json(pg.describe(pg.submit(body)))
        m = GENERATION_PATH.fullmatch(path)
        if m is None:
            raise ApiError(404, f"no such page: {path[:100]}")
        gen_id, action, n = m.groups()
        with pg.changed:
            gen = pg.generations.get(gen_id)
        if gen is None:
            raise ApiError(404, f"no generation {gen_id}: it was never made, or it is older than the last "
                                f"{KEEP_GENERATIONS}, or the server was restarted since")
        if action is None:
            self.allow(method, "GET")
            return self.send_json(pg.describe(gen))
        if action == "/cancel":
            self.allow(method, "POST")
            pg.cancel(gen)
            return self.send_json(pg.describe(gen))
        self.allow(method, "GET")
        if action == "/events":
            return self.send_events(pg, gen)
        try:
            data = pg.file(gen, int(n)).read_bytes()
        except (LookupError, FileNotFoundError):  # FileNotFoundError: pruned meanwhile
            raise ApiError(404, f"generation {gen_id} has no file {n}") from None
        # the URL of a file never names another one, so the browser may keep it (the history strip shows them again)
        return self.send(data, "image/png", {"Cache-Control": "private, max-age=86400"})

    def check_host(self) -> None:
        """Bound to this machine only, a request must say it is for this machine. Otherwise a site could point its
        own name at 127.0.0.1 and have the browser read our answers as its own ("DNS rebinding")."""
        if self.server.server_address[0] in LOOPBACK:
            host = self.headers.get("Host", "")  # "127.0.0.1:7860", "localhost:7860", "[::1]:7860"
            name = host[1:host.find("]")] if host.startswith("[") else host.split(":")[0]
            if name.lower() not in LOOPBACK:
                raise ApiError(403, f"this server answers requests for 127.0.0.1 and localhost only, not {host[:80]!r}")

    def allow(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(405, f"{self.path[:100]} takes {allowed}, not {method}")

    def read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "the request needs a Content-Length")
        length = int(length)
        if length > MAX_UPLOAD_BYTES:
            # Read what the browser sends anyway (up to a bound), so that it reads our answer rather than a
            # connection reset; the connection closes after this response either way (HTTP/1.0).
            left = min(length, 8 * MAX_UPLOAD_BYTES)
            while left > 0 and (chunk := self.rfile.read(min(left, 2**20))):
                left -= len(chunk)
            raise ApiError(413, f"the upload is {length / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
        return self.rfile.read(length)

    def send(self, data: bytes, content_type: str, headers: dict | None = None, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")  # a PNG is a PNG, never run as a script
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, obj, status: int = 200) -> None:
        self.send(json.dumps(obj).encode(), "application/json", {"Cache-Control": "no-store"}, status)

    def send_events(self, pg: Playground, gen: Generation) -> None:
        """The generation's events as server-sent events: `id: N`, `event: name`, `data: {json}`, a blank line.
        Each event is kept, so a page that reconnects (EventSource does it by itself, sending the id of the last
        event it got as Last-Event-ID) gets the ones it missed; the stream ends after the last one."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        last = self.headers.get("Last-Event-ID", "")
        sent = int(last) + 1 if last.isdigit() else 0
        while True:
            with pg.changed:
                pg.changed.wait_for(lambda: len(gen.events) > sent, timeout=KEEPALIVE_S)
                new, finished = gen.events[sent:], gen.status in FINISHED  # the last event comes with the status
            text = "".join(f"id: {sent + k}\nevent: {name}\ndata: {json.dumps(data)}\n\n"
                           for k, (name, data) in enumerate(new))
            self.wfile.write((text or ": still here\n\n").encode())  # a comment line; writing finds a closed page
            self.wfile.flush()
            sent += len(new)
            if finished:
                return

    def log_request(self, code="-", size="-"):
        if not (isinstance(code, int) and code < 400):  # the page fetches a frame per step: log only what went wrong
            super().log_request(code, size)


class Server(ThreadingHTTPServer):
    """A thread per request (event streams are long requests), daemon threads (exiting never waits for them), and
    the Playground the handlers use, set once the model is loaded. It listens as soon as it is made."""
    playground: Playground

    def __init__(self, host: str, port: int):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # read by the base class's __init__
        super().__init__((host, port), Handler)


# ----------------------------------------------------------------------------------------------------


def stop_on_sigterm(signum, frame):
    """`kill` (SIGTERM, what service managers send) stops the server like Ctrl-C does, cleaning up: by default it
    would end Python at once and leave the temporary folder behind."""
    raise KeyboardInterrupt


def main(checkpoint: str = "amused/amused-256", host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
         dtype: str = "auto", variant: str | None = None, exact: bool = False) -> None:
    device = cli.resolve_device(device)
    torch_dtype, dtype_shown = sample.resolve_dtype(dtype, device, exact)
    if not PAGE.is_file():
        raise UsageError(f"{PAGE}: the page is missing (it lives beside playground.py)")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in [0, 65535] (0: any free port), got {port}")
    settings = dict(checkpoint=checkpoint, variant=variant, device=device,
                    dtype=dtype_shown, exact=exact, host=host, port=port)
    print("settings:\n" + "\n".join(f"  {key:<12}{value}" for key, value in settings.items()))
    warning = host_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    try:
        server = Server(host, port)  # before the (slow) model load, so that a port in use is said at once
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        pipe = sample.load(checkpoint, device, torch_dtype, variant, exact)
        # Everything the server writes goes here, and is removed at exit (even on Ctrl-C).
        with tempfile.TemporaryDirectory(prefix="amused-playground-", ignore_cleanup_errors=True) as folder:
            server.playground = Playground(pipe, Path(folder), checkpoint)
            defaults, recommended = server.playground.defaults, list(pipe.sampling_defaults)
            print("page defaults: " + ", ".join(f"{key} {sample.shown(defaults[key], [key], recommended)}"
                                                 for key in PAGE_DEFAULTS))
            name, bound_port = server.server_address[:2]
            shown = "127.0.0.1" if name in EVERY_INTERFACE else f"[{name}]" if ":" in name else name
            print(f"serving on http://{shown}:{bound_port} (Ctrl-C to stop)", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how a server is stopped, not an error
                print("stopping", flush=True)
            finally:
                server.playground.close(timeout=60)
    finally:
        server.server_close()
    print("stopped")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    sample.add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on; 0.0.0.0 (every interface) lets other machines in, with a warning")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on; 0: any free port (printed)")
    cli.run(main, p.parse_args(), errors=sample.USER_ERRORS)
