"""Tests of playground.py, the local web page, on a tiny random-weight checkpoint (32x32 images, 8x8 tokens).

Through the HTTP API with urllib, on a server in this process: a generation's events arrive with a frame per step
whose grey cells are its masked tokens, and its images equal the pipeline's for the same settings and seed; a cancel
stops it at the next step; waiting generations know their place in the line; bad input is a JSON error naming the
problem, and the server goes on serving. As a user runs it (a subprocess): it says where it serves, writes nothing
outside its temporary folder and removes that at exit. In a real browser (Debian's Chromium, driven by selenium):
type a prompt, generate, watch the frames arrive, paint a mask and inpaint, upload a non-image and read the error.

The browser test is skipped, with the reason, where Chromium, its driver or selenium is missing; .ci/run installs
them and sets AMUSED_REQUIRE_BROWSER=1, which makes a missing or broken browser a failure instead.

The README's screenshot is taken with the same browser and helpers:

    python tests/test_playground.py --checkpoint runs/digits/model.safetensors --screenshot docs/playground.png
"""
import argparse
import base64
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_same_image, reference_pipeline, save_hub_checkpoint, seeded, smooth_images
import amused
import cli
import playground
import sample
from amused import Amused

PROMPT = "a photo of a cat"
GREY = round(sample.GREY * 255)  # the masked cells of a frame
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's packages
# Headless, as root (no sandbox), and nothing that would reach the network: no updates, sync or QUIC probes.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models only


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_image(tensor) -> Image.Image:  # (3, H, W) in [0, 1]
    return Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def square_mask(size, top, left, side) -> Image.Image:
    """White square on black: white = repaint."""
    m = np.zeros((size, size), dtype="uint8")
    m[top:top + side, left:left + side] = 255
    return Image.fromarray(m)


def grey_cells(image: Image.Image, f: int) -> int:
    """The number of f x f token cells of an image that are flat grey: the masked ones of a frame."""
    a = np.asarray(image.convert("RGB")).astype(int)
    h, w = a.shape[0] // f, a.shape[1] // f
    cells = a[:h * f, :w * f].reshape(h, f, w, f, 3)
    return int((cells == GREY).all(axis=(1, 3, 4)).sum())


def wait_until(condition, what, timeout: float = 30):
    """what: a string, or a function that says it when the time is up (what the page shows by then)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------------
# Talking to the server as the page does


def call(base: str, path: str, body=None, *, method=None, content_type="application/json", headers=None):
    """-> (status, the JSON answer or the raw bytes, headers). body: a dict (sent as JSON) or bytes."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(base + path, data=data, method=method or ("GET" if data is None else "POST"))
    if request.method == "POST" and content_type is not None:
        request.add_header("Content-Type", content_type)
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, raw, answer_headers = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, raw, answer_headers = e.code, e.read(), e.headers
    if answer_headers.get_content_type() == "application/json":
        raw = json.loads(raw)
    return status, raw, answer_headers


def submit(base: str, **settings) -> dict:
    status, answer, _ = call(base, "/api/generations", {"prompt": PROMPT, **settings})
    assert status == 200, answer
    return answer


def read_events(base: str, gen: dict, last_event_id: int | None = None) -> list[tuple[str, dict]]:
    """Every event of a generation, until the server ends the stream (after the last one)."""
    request = urllib.request.Request(base + gen["events"])
    if last_event_id is not None:
        request.add_header("Last-Event-ID", str(last_event_id))
    events, name, data = [], None, None
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers.get_content_type() == "text/event-stream"
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
            elif line == "" and name is not None:
                events.append((name, data))
                name = None
    return events


def image_at(base: str, url: str) -> Image.Image:
    status, data, headers = call(base, url)
    assert status == 200 and headers.get_content_type() == "image/png", (status, data)
    return Image.open(io.BytesIO(data))


def upload(base: str, image: Image.Image) -> dict:
    status, answer, _ = call(base, "/api/uploads", png_bytes(image), content_type="application/octet-stream")
    assert status == 200, answer
    return answer


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


class Gate:
    """Holds the worker before every U-ViT call (one per step: guidance batches both prompts) until the test lets
    it through, and counts the calls that were started."""

    def __init__(self, transformer):
        self.permits, self.calls = threading.Semaphore(0), 0
        self.handle = transformer.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        assert self.permits.acquire(timeout=60), "the test never let this step run"

    def open(self, n=1):
        self.permits.release(n)

    def remove(self):
        self.handle.remove()
        self.permits.release(1000)  # whatever still waits goes on


# ----------------------------------------------------------------------------------------------------
# Fixtures: the checkpoint, a reference pipeline, and a server in this process


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("playground")
    return save_hub_checkpoint(reference_pipeline("tiny", tiny_tokenizer_dir, seed=3), root / "hub", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def ref(hub):
    """A pipeline of its own for the expected images: the server's belongs to its worker thread."""
    return Amused.from_pretrained(hub)


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    pg = playground.Playground(Amused.from_pretrained(hub), folder, "tiny")
    httpd = playground.Server("127.0.0.1", 0)
    httpd.playground = pg
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", pg=pg, folder=folder)
    httpd.shutdown()
    httpd.server_close()
    pg.close(timeout=30)


@pytest.fixture
def gate(server):
    g = Gate(server.pg.pipe.transformer)
    yield g
    g.remove()


# ----------------------------------------------------------------------------------------------------
# The API


def test_info_and_a_page_that_loads_nothing_from_elsewhere(server):
    status, info, _ = call(server.url, "/api/info")
    assert status == 200
    assert (info["resolution"], info["tokens"], info["max_steps"]) == (32, 8, 64)  # 64 tokens: at most 64 steps
    assert info["max_upload_bytes"] == 10 * 2**20 and info["max_images"] == 8
    # the form's first values: a hub folder carries no sampling_defaults, so the pipeline's
    assert info["defaults"] == {"steps": 12, "guidance_scale": 10.0, "sampler": "confidence",
                                "guidance_schedule": "constant"}
    status, page, headers = call(server.url, "/")
    assert status == 200 and headers.get_content_type() == "text/html"
    html = page.decode()
    assert "<canvas" in html and 'id="compare"' in html
    # offline: no address of another site anywhere, and the browser is told to load nothing from one
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), "an external address in the page"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert call(server.url, "/favicon.ico")[0] == 204


def test_text_to_image_streams_a_frame_per_step_and_equals_the_pipeline(server, ref):
    gen = submit(server.url, steps=4, seed=7, num_images=2)
    events = read_events(server.url, gen)
    names = [name for name, _ in events]
    assert names == ["queued", "started", "step", "step", "step", "step", "run_done", "done"], names

    # what the pipeline gives for the same settings and seed, and its tokens after every step
    history = []
    expected = ref(PROMPT, steps=4, generator=seeded(7), num_images_per_prompt=2,
                   callback=lambda step, tokens: history.append(tokens.clone()))
    steps = [data for name, data in events if name == "step"]
    assert [(d["step"], d["steps"]) for d in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # counted per image: of the 64 tokens of each, not of the 128 of both
    assert [d["masked"] for d in steps] == [(t == ref.mask_id).flatten(1).sum(1).tolist() for t in history]
    assert all(0 < m < 64 for m in steps[0]["masked"]) and steps[-1]["masked"] == [0, 0] and steps[0]["tokens"] == 64
    for d, tokens in zip(steps, history):
        assert len(d["urls"]) == 2  # a frame per image
        for i, url in enumerate(d["urls"]):
            frame = image_at(server.url, url)
            assert_same_image(frame, sample.step_frames(ref, [tokens[i]])[0], f"step {d['step']} image {i}")
            # masked tokens show as grey cells (4 px per token)
            assert grey_cells(frame, 4) == int((tokens[i] == ref.mask_id).sum())

    done = events[-1][1]
    for url, image in zip(done["images"][0], expected):
        assert_same_image(image_at(server.url, url), image, "a final image")
    assert_same_image(image_at(server.url, done["result"]), cli.image_grid(expected, 2), "the result: side by side")
    status, state, _ = call(server.url, f"/api/generations/{gen['id']}")
    assert status == 200 and state["status"] == "done" and state["result"] == done["result"]
    assert state["settings"]["seed"] == "7"  # a string: JavaScript's numbers are exact only to 2**53
    # a page that reconnects gets only the events it missed
    assert read_events(server.url, gen, last_event_id=5) == events[6:]


def test_a_checkpoints_sampling_defaults_are_the_pages(hub, ref, tmp_path):
    """The checkpoint's recommendation (sampling_defaults) gives the form its first values and every setting a
    request leaves out, the ones the page cannot set (the Gumbel temperature here) included."""
    pipe = Amused.from_pretrained(hub)
    pipe.sampling_defaults = {"steps": 3, "guidance_scale": 4.0, "temperature": (1.0, 0.0)}
    httpd = playground.Server("127.0.0.1", 0)
    httpd.playground = playground.Playground(pipe, tmp_path, "tiny")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert call(url, "/api/info")[1]["defaults"] == {"steps": 3, "guidance_scale": 4.0, "sampler": "confidence",
                                                         "guidance_schedule": "constant"}
        events = read_events(url, submit(url, seed=2))
        assert [d["step"] for name, d in events if name == "step"] == [1, 2, 3]
        expected = ref(PROMPT, steps=3, guidance_scale=4.0, temperature=(1.0, 0.0), generator=seeded(2))[0]
        assert_same_image(image_at(url, events[-1][1]["images"][0][0]), expected, "with the checkpoint's settings")
    finally:
        httpd.shutdown()
        httpd.server_close()
        httpd.playground.close(timeout=30)


def test_a_comparison_runs_each_step_count_from_the_seed(server, ref):
    gen = submit(server.url, steps=[2, 3], seed=11, frames=False, guidance_scale=4)
    events = read_events(server.url, gen)
    steps = [data for name, data in events if name == "step"]
    assert [(d["run"], d["step"], d["steps"]) for d in steps] == [(0, 1, 2), (0, 2, 2), (1, 1, 3), (1, 2, 3), (1, 3, 3)]
    assert all(d["urls"] is None for d in steps), "frames=False: no frame decoded"
    done = events[-1][1]
    expected = [ref(PROMPT, steps=n, guidance_scale=4, generator=seeded(11))[0] for n in (2, 3)]
    for urls, image in zip(done["images"], expected):
        assert_same_image(image_at(server.url, urls[0]), image, "one run")
    assert_same_image(image_at(server.url, done["result"]), cli.image_grid(expected, 2, labels=["2 steps", "3 steps"]),
                      "the comparison, as sample.py draws it")


def test_image_to_image_and_inpainting_from_an_upload(server, ref, capsys):
    photo = to_image(smooth_images(1, 40, 48, seed=4)[0])  # 48x40: scaled and centre-cropped to 32x32
    up = upload(server.url, photo)
    assert (up["width"], up["height"]) == (32, 32) and "from 48x40 to 32x32" in up["note"]
    fitted = Image.open(io.BytesIO(base64.b64decode(up["data_url"].split(",")[1])))
    assert_same_image(fitted, sample.fit_image(photo, (32, 32), 4, "x"), "the upload, as the model sees it")

    gen = submit(server.url, mode="img2img", image=up["id"], strength=0.6, steps=5, seed=2)
    done = read_events(server.url, gen)[-1]
    assert done[0] == "done", done
    expected = ref.img2img(PROMPT, fitted, 0.6, steps=5, generator=seeded(2))[0]
    assert_same_image(image_at(server.url, done[1]["result"]), expected, "img2img")

    mask = square_mask(32, 8, 12, 16)
    gen = submit(server.url, mode="inpaint", image=up["id"], mask=data_url(mask), steps=4, seed=3)
    events = read_events(server.url, gen)
    started = dict(events)["started"]
    assert started["repaint"] == int(amused.preprocess_mask(mask, (32, 32), (8, 8)).sum()) == 16
    assert events[-1][0] == "done", events[-1]
    expected = ref.inpaint(PROMPT, fitted, mask, steps=4, generator=seeded(3))[0]
    assert_same_image(image_at(server.url, events[-1][1]["result"]), expected, "inpaint")


def test_shapes_other_than_square(server, ref):
    """Text to image at a chosen aspect ratio (about the model's pixel count: 16:9 is 40x24 for this 32x32 model, its
    sides multiples of 8); a wide upload keeps its shape (64x32 -> 48x24), and img2img and inpainting run at it."""
    info = call(server.url, "/api/info")[1]
    assert info["sizes"]["1:1"] == [32, 32] and info["sizes"]["16:9"] == [40, 24] and info["sizes"]["9:16"] == [24, 40]
    gen = submit(server.url, steps=3, seed=5, aspect="16:9", frames=False)
    events = read_events(server.url, gen)
    assert dict(events)["started"]["tokens"] == 10 * 6 and gen["settings"]["width"] == 40
    expected = ref(PROMPT, height=24, width=40, steps=3, generator=seeded(5))[0]
    assert_same_image(image_at(server.url, events[-1][1]["result"]), expected, "text to image at 16:9")

    up = upload(server.url, to_image(smooth_images(1, 32, 64, seed=6)[0]))
    assert (up["width"], up["height"]) == (48, 24) and "at the image's aspect ratio" in up["note"]
    fitted = Image.open(io.BytesIO(base64.b64decode(up["data_url"].split(",")[1])))
    mask = Image.fromarray(np.where(np.arange(48)[None, :] >= 24, 255, 0).repeat(24, 0).astype("uint8"))
    gen = submit(server.url, mode="inpaint", image=up["id"], mask=data_url(mask), steps=3, seed=6)
    events = read_events(server.url, gen)
    assert dict(events)["started"]["repaint"] == 6 * 6 and gen["settings"]["height"] == 24  # the right half
    expected = ref.inpaint(PROMPT, fitted, mask, steps=3, generator=seeded(6))[0]
    assert_same_image(image_at(server.url, events[-1][1]["result"]), expected, "inpainting a wide image")


def test_the_sampler_choice(server, ref):
    """The page's sampler and guidance schedule reach the pipeline: the Halton order with guidance on the later
    steps equals the pipeline's run with those keywords."""
    info = call(server.url, "/api/info")[1]
    assert info["samplers"][:2] == ["confidence", "halton"] and "interval" in info["guidance_schedules"]
    gen = submit(server.url, steps=4, seed=9, frames=False, sampler="halton", guidance_schedule="interval")
    events = read_events(server.url, gen)
    assert gen["settings"]["sampler"] == "halton" and events[-1][0] == "done", events[-1]
    expected = ref(PROMPT, steps=4, generator=seeded(9), sampler="halton", guidance_schedule="interval")[0]
    assert_same_image(image_at(server.url, events[-1][1]["result"]), expected, "halton, interval")


def test_cancel_stops_at_the_next_step_and_waiting_ones_know_their_place(server, gate):
    a = submit(server.url, steps=4)
    wait_until(lambda: gate.calls == 1, "the first generation's first step")
    b, c = submit(server.url, steps=2), submit(server.url, steps=2)
    assert (b["status"], b["ahead"]) == ("queued", 1) and (c["status"], c["ahead"]) == ("queued", 2)

    # the server answers while the worker is busy
    t0 = time.perf_counter()
    assert call(server.url, "/api/info")[0] == 200 and time.perf_counter() - t0 < 5
    state = call(server.url, f"/api/generations/{a['id']}")[1]
    assert (state["status"], state["ahead"]) == ("running", None)

    # a waiting one is dropped at once, and the one behind it moves up
    assert call(server.url, f"/api/generations/{b['id']}/cancel", {})[1]["status"] == "cancelled"
    assert read_events(server.url, b) == [("queued", {"ahead": 1}), ("cancelled", {})]

    # the running one finishes the step it is in, then stops: no frame of it, no further U-ViT call
    assert call(server.url, f"/api/generations/{a['id']}/cancel", {})[1]["status"] == "running"
    gate.open(1)
    assert [name for name, _ in read_events(server.url, a)] == ["queued", "started", "cancelled"]

    gate.open(2)  # c's two steps
    c_events = read_events(server.url, c)
    assert c_events[:3] == [("queued", {"ahead": 2}), ("queued", {"ahead": 1}), ("started", c_events[2][1])]
    assert [name for name, _ in c_events].count("step") == 2 and c_events[-1][0] == "done"
    assert gate.calls == 1 + 2, "the cancelled generation ran the U-ViT again"


def test_old_generations_are_forgotten_and_their_files_deleted(server, monkeypatch):
    monkeypatch.setattr(playground, "KEEP_GENERATIONS", 2)
    gens = [submit(server.url, steps=1) for _ in range(3)]
    for gen in gens:
        read_events(server.url, gen)
    wait_until(lambda: gens[0]["id"] not in server.pg.generations, "the oldest to be forgotten")
    status, answer, _ = call(server.url, f"/api/generations/{gens[0]['id']}")
    assert status == 404 and "no generation" in answer["error"]
    assert not (server.folder / gens[0]["id"]).exists()
    assert (server.folder / gens[2]["id"]).is_dir()


def test_host_warning():
    assert "every network interface" in playground.host_warning("0.0.0.0")
    assert "every network interface" in playground.host_warning("::")
    assert "192.168.1.5" in playground.host_warning("192.168.1.5")
    assert all(playground.host_warning(h) is None for h in ("127.0.0.1", "localhost", "::1"))


# ----------------------------------------------------------------------------------------------------
# Bad requests: a JSON error that names the problem, and the server goes on


def bad_upload_cases() -> dict:
    huge = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(huge, format="PNG")  # 60 million pixels in a few kB
    truncated = png_bytes(to_image(smooth_images(1, 32, 32, seed=1)[0]))[:200]
    return {
        "upload_not_an_image": (b"hello, I am text", 400, "not an image"),
        "upload_truncated": (truncated, 400, "not an image Pillow can read"),
        "upload_empty": (b"", 400, "the upload is empty"),
        "upload_too_big": (b"\0" * (10 * 2**20 + 1), 413, "the limit is 10 MB"),
        "upload_too_many_pixels": (huge.getvalue(), 400, "more than 50 million pixels"),
    }


BAD_SETTINGS = {  # case -> (settings posted to /api/generations, a piece of the message)
    "empty_prompt": ({"prompt": ""}, "the prompt is empty"),
    "blank_prompt": ({"prompt": "   "}, "the prompt is empty"),
    "no_prompt": ({"prompt": None}, "the prompt is empty"),
    "prompt_too_long": ({"prompt": "a" * 2001}, "limited to 2000 characters"),
    "steps_0": ({"steps": 0}, "steps must be between 1 and 64"),
    "steps_too_many": ({"steps": 65}, "steps must be between 1 and 64"),
    "steps_not_a_number": ({"steps": "many"}, "steps must be a whole number"),
    "steps_fraction": ({"steps": 2.5}, "steps must be a whole number"),
    "steps_true": ({"steps": True}, "steps must be a whole number"),
    "compare_too_many": ({"steps": [1, 2, 3, 4, 5]}, "a list of 1 to 4 numbers"),
    "guidance_nan": ({"guidance_scale": "nan"}, "guidance must be >= 0 and finite"),
    "guidance_inf": ({"guidance_scale": "inf"}, "guidance must be >= 0 and finite"),
    "guidance_negative": ({"guidance_scale": -1}, "guidance must be >= 0"),
    "seed_negative": ({"seed": -1}, "seed must be in [0, 2**64)"),
    "seed_too_big": ({"seed": str(2**64)}, "seed must be in [0, 2**64)"),
    "seed_not_a_number": ({"seed": "12x"}, "seed must be a whole number"),
    "images_0": ({"num_images": 0}, "between 1 and 8"),
    "images_9": ({"num_images": 9}, "between 1 and 8"),
    "unknown_mode": ({"mode": "video"}, "mode must be one of"),
    "unknown_setting": ({"temperature": 3}, "unknown setting 'temperature'"),
    "frames_not_bool": ({"frames": "yes"}, "frames must be true or false"),
    "unknown_aspect": ({"aspect": "5:4"}, "aspect must be one of 1:1, 4:3"),
    "aspect_of_an_edit": ({"mode": "img2img", "image": "0" * 32, "aspect": "4:3"}, "keeps the shape of its image"),
    "unknown_sampler": ({"sampler": "greedy"}, "sampler must be one of"),
    "unknown_guidance_schedule": ({"guidance_schedule": "cosine"}, "guidance_schedule must be one of"),
    "image_in_text_mode": ({"image": "abc"}, "are for img2img and inpaint"),
    "img2img_no_image": ({"mode": "img2img"}, "drop or upload one first"),
    "img2img_unknown_image": ({"mode": "img2img", "image": "0" * 32}, "no longer on the server"),
    "inpaint_no_mask": ({"mode": "inpaint", "image": "0" * 32}, "inpaint needs a mask"),
    "strength_0": ({"mode": "img2img", "image": "0" * 32, "strength": 0}, "strength must be in (0, 1]"),
    "strength_1.5": ({"mode": "img2img", "image": "0" * 32, "strength": 1.5}, "strength must be in (0, 1]"),
    "strength_rounds_to_0": ({"mode": "img2img", "image": "0" * 32, "strength": 0.1, "steps": 5},
                             "rounds down to 0 steps"),
}


@pytest.fixture(scope="module")
def uploaded(server):
    """An image on the server, for the cases that need a real one."""
    return upload(server.url, to_image(smooth_images(1, 32, 32, seed=5)[0]))["id"]


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_settings_are_a_message(server, case):
    settings, message = BAD_SETTINGS[case]
    status, answer, _ = call(server.url, "/api/generations", {"prompt": PROMPT, **settings})
    assert status == 400 and message in answer["error"], (status, answer)


BAD_MASKS = {  # case -> (the mask as posted, a piece of the message)
    "not_base64": ("data:image/png;base64,???", "not valid base64"),
    "not_an_image": (base64.b64encode(b"GIF89a nope").decode(), "the mask is not an image"),
    "all_black": (data_url(square_mask(32, 0, 0, 0)), "the mask covers no token"),
    "under_half_a_token": (data_url(square_mask(32, 0, 0, 2)), "the mask covers no token"),  # 2x2 px of 4x4
}


@pytest.mark.parametrize("case", sorted(BAD_MASKS))
def test_bad_masks_are_a_message(server, uploaded, case):
    mask, message = BAD_MASKS[case]
    status, answer, _ = call(server.url, "/api/generations", {"prompt": PROMPT, "mode": "inpaint", "image": uploaded,
                                                             "mask": mask})
    assert status == 400 and message in answer["error"], (status, answer)


@pytest.mark.parametrize("case", sorted(bad_upload_cases()))
def test_bad_uploads_are_a_message(server, case):
    body, code, message = bad_upload_cases()[case]
    status, answer, _ = call(server.url, "/api/uploads", body, content_type="application/octet-stream")
    assert status == code and message in answer["error"], (status, answer)


BAD_REQUESTS = {  # case -> (method, path, body, content type, extra headers), status, a piece of the message
    "not_json": (("POST", "/api/generations", b"{prompt", "application/json", {}), 400, "the body is not JSON"),
    "json_list": (("POST", "/api/generations", b"[1]", "application/json", {}), 400, "must be a JSON object"),
    # what another site could send without asking the browser first (CSRF)
    "form_post": (("POST", "/api/generations", b"prompt=x", "application/x-www-form-urlencoded", {}), 415,
                  "needs a Content-Type"),
    "text_plain_upload": (("POST", "/api/uploads", b"x", "text/plain", {}), 415, "needs a Content-Type"),
    "no_content_type": (("POST", "/api/uploads", b"x", None, {}), 415, "needs a Content-Type"),
    # another site's name pointed at 127.0.0.1 (DNS rebinding)
    "foreign_host": (("GET", "/api/info", None, None, {"Host": "evil.example:7860"}), 403, "127.0.0.1 and localhost"),
    "unknown_generation": (("GET", "/api/generations/" + "ab" * 16, None, None, {}), 404, "no generation abab"),
    "unknown_generation_events": (("GET", f"/api/generations/{'cd' * 16}/events", None, None, {}), 404,
                                  "no generation"),
    "path_in_id": (("GET", "/api/generations/../../etc/passwd", None, None, {}), 404, "no such page"),
    "encoded_path_in_id": (("GET", "/api/generations/%2e%2e%2fetc%2fpasswd", None, None, {}), 404, "no such page"),
    "path_as_file": (("GET", "/api/generations/" + "ab" * 16 + "/files/..%2f..%2fx", None, None, {}), 404,
                     "no such page"),
    "file_of_unknown_generation": (("GET", "/api/generations/" + "ab" * 16 + "/files/0", None, None, {}), 404,
                                   "no generation"),
    "unknown_page": (("GET", "/etc/passwd", None, None, {}), 404, "no such page"),
    "get_uploads": (("GET", "/api/uploads", None, None, {}), 405, "takes POST"),
    "post_info": (("POST", "/api/info", b"{}", "application/json", {}), 405, "takes GET"),
    "cancel_by_get": (("GET", "/api/generations/" + "ab" * 16 + "/cancel", None, None, {}), 404, "no generation"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_a_message(server, case):
    (method, path, body, kind, headers), code, message = BAD_REQUESTS[case]
    status, answer, _ = call(server.url, path, body, method=method, content_type=kind, headers=headers)
    assert status == code and message in answer["error"], (status, answer)


def test_a_generation_has_only_the_files_it_wrote(server):
    gen = submit(server.url, steps=2)
    done = read_events(server.url, gen)[-1][1]
    n = int(done["result"].rsplit("/", 1)[1])
    assert call(server.url, f"/api/generations/{gen['id']}/files/{n}")[0] == 200
    status, answer, _ = call(server.url, f"/api/generations/{gen['id']}/files/{n + 1}")
    assert status == 404 and f"has no file {n + 1}" in answer["error"]
    assert call(server.url, "/api/info")[0] == 200, "the server still serves after all the bad requests"


# ----------------------------------------------------------------------------------------------------
# The command line, as a user runs it


def run_cli(args, cwd, env, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "playground.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=timeout)


def test_command_line(hub, tmp_path):
    """Serves on the port it prints, writes only into its temporary folder, removes it when stopped; bad flags are
    one `error:` line and exit code 2. Stopped by SIGTERM, which takes the way out of Ctrl-C (KeyboardInterrupt):
    a SIGINT would do nothing where the tests run in the background of a shell, which ignores it there."""
    taken = socket.create_server(("127.0.0.1", 0))  # a port in use
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    with ThreadPoolExecutor(max_workers=2) as pool:  # the failing runs meanwhile: they mostly import torch
        errors = {
            "missing_checkpoint": pool.submit(run_cli, ["--checkpoint", str(tmp_path / "nope"), "--port", "0"], work, {}),
            "port_taken": pool.submit(run_cli, ["--checkpoint", str(hub), "--port", str(taken.getsockname()[1])],
                                      work, {}),
        }
        server = subprocess.Popen([sys.executable, str(ROOT / "playground.py"), "--checkpoint", str(hub), "--port", "0",
                                   "--device", "cpu"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        try:
            lines = queue.Queue()
            reader = threading.Thread(target=lambda: [lines.put(line) for line in server.stdout], daemon=True)
            reader.start()
            output = []
            while not (output and output[-1].startswith("serving on ")):
                output.append(lines.get(timeout=120))
            url = re.fullmatch(r"serving on (http://127\.0\.0\.1:\d+) \(Ctrl-C to stop\)\n", output[-1]).group(1)
            assert "  host        127.0.0.1\n" in output, "the settings, printed once"

            up = upload(url, to_image(smooth_images(1, 32, 32, seed=1)[0]))
            mask = data_url(square_mask(32, 0, 0, 16))
            for settings in ({"steps": 3}, {"mode": "inpaint", "image": up["id"], "mask": mask, "steps": 2}):
                assert read_events(url, submit(url, **settings))[-1][0] == "done"
            (served,) = tmp.iterdir()  # one temporary folder in TMPDIR, and nothing in the working folder
            assert served.name.startswith("amused-playground-") and len(list(served.rglob("*.png"))) > 5
            assert list(work.iterdir()) == []
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                rc = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()  # not left running behind a failed test
                raise
        reader.join(timeout=10)
        while not lines.empty():
            output.append(lines.get_nowait())
        log = "".join(output)
        assert rc == 0 and log.endswith("stopped\n"), log
        assert list(tmp.iterdir()) == [], "the temporary folder is left behind"
        assert list(work.iterdir()) == []

        for case, needle in (("missing_checkpoint", "nope: no such file or folder"), ("port_taken", "cannot listen")):
            r = errors[case].result()
            assert r.returncode == 2, (case, r.stdout, r.stderr)
            assert r.stderr.startswith("error: ") and needle in r.stderr and "Traceback" not in r.stderr, (case, r.stderr)
    taken.close()


# ----------------------------------------------------------------------------------------------------
# In a real browser


def browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing: apt-get install chromium chromium-driver (as .ci/run does)"
    return None


def start_browser(profile: Path, width=1200, height=900):
    """Debian's Chromium, headless, driven through its chromedriver (no driver or browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read at the end of the test
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


@pytest.fixture
def browser(tmp_path):
    reason = browser_missing()
    if reason is None:
        from selenium.common.exceptions import WebDriverException
        try:
            driver = start_browser(tmp_path / "profile")
        except WebDriverException as e:
            reason = f"Chromium did not start: {' '.join(str(e).split())[:300]}"
    if reason is not None:
        if os.environ.get("AMUSED_REQUIRE_BROWSER"):  # .ci/run installed the browser: it must work
            pytest.fail(f"AMUSED_REQUIRE_BROWSER is set, but {reason}")
        pytest.skip(f"no browser test: {reason}")
    yield driver
    driver.quit()


class Page:
    """The playground page in the browser, as a user sees and uses it."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By
        self.driver, self.By = driver, By
        driver.get(url)
        wait_until(lambda: driver.execute_script("return document.body.dataset.ready === 'true'"), "the page to load")

    def el(self, element_id: str):
        return self.driver.find_element(self.By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.el(element_id).text

    def set(self, element_id: str, value) -> None:
        field = self.el(element_id)
        field.clear()
        field.send_keys(str(value))

    def mode(self, value: str) -> None:
        self.driver.find_element(self.By.CSS_SELECTOR, f"input[value={value}]").find_element(self.By.XPATH, "..").click()

    def wait_status(self, pattern: str, timeout: float = 30) -> str:
        wait_until(lambda: re.search(pattern, self.text("status")),
                   lambda: f"status {pattern!r} (it says {self.text('status')!r}, {self.text('message')!r})", timeout)
        return self.text("status")

    def painted(self) -> int:
        """The mask's painted pixels (alpha >= 1/2: what the page sends as white)."""
        return self.driver.execute_script(
            "const m = document.getElementById('mask'), d = m.getContext('2d').getImageData(0, 0, m.width, m.height)"
            ".data; let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] >= 128; return n;")

    def view_images(self) -> list[dict]:
        """The images of #view: their address, whether they are loaded and their natural size."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#view img')].map(i => ({src: i.getAttribute('src'), "
            "loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth, done: i.classList.contains('done')}))")


def test_in_a_browser(browser, server, ref, tmp_path):
    page = Page(browser, server.url)
    assert "32×32 px" in page.text("model")

    # 1. Text to image, one step at a time: each step's frame reaches the page while the next step waits.
    page.el("prompt").send_keys(PROMPT)
    page.set("steps", 3)
    gate = Gate(server.pg.pipe.transformer)
    try:
        page.el("generate").click()
        frames = []
        for k in (1, 2):
            gate.open(1)
            status = page.wait_status(rf"^step {k}/3: \d+ of 64 tokens still masked")
            wait_until(lambda: page.view_images()[0]["loaded"] and page.view_images()[0]["src"] not in frames,
                      f"the frame of step {k}")
            frames.append(page.view_images()[0]["src"])
            if k == 1:  # the first frame: masked cells grey, as many as the page says are masked
                masked = int(re.search(r"(\d+) of 64", status).group(1))
                assert 0 < masked < 64 and grey_cells(image_at(server.url, frames[0]), 4) == masked
        gate.open(1)  # the last step
    finally:
        gate.remove()
    page.wait_status(r"^done in")
    assert page.el("view").get_attribute("data-frames") == "3"
    (final,) = page.view_images()
    assert final["loaded"] and final["done"] and final["width"] == 32 and final["src"] not in frames
    assert page.el("download").get_attribute("href").endswith(final["src"])
    assert_same_image(image_at(server.url, final["src"]), ref(PROMPT, steps=3, generator=seeded(0))[0],
                      "the page's image")

    # 2. The comparison, in one click: a column per step count.
    page.el("compare").click()
    page.wait_status(r"^done in")
    captions = [c.text for c in browser.find_elements(page.By.CSS_SELECTOR, "#view .caption")]
    assert captions == ["5 steps", "10 steps", "15 steps"]
    assert [i["done"] and i["loaded"] for i in page.view_images()] == [True] * 3
    assert len(browser.find_elements(page.By.CSS_SELECTOR, "#history button")) == 2

    # 3. Inpainting: upload an image, paint a stroke over part of it, fill it.
    png = tmp_path / "photo.png"
    to_image(smooth_images(1, 32, 32, seed=8)[0]).save(png)
    page.mode("inpaint")
    page.el("file").send_keys(str(png))
    wait_until(lambda: browser.execute_script("return document.getElementById('input-image').naturalWidth") == 32,
              "the uploaded image")
    from selenium.webdriver.common.action_chains import ActionChains
    canvas = page.el("mask")  # 256 CSS px for 32 image px; the brush is 4 image px wide
    ActionChains(browser).move_to_element_with_offset(canvas, -100, -100).click_and_hold() \
        .move_by_offset(80, 0).move_by_offset(0, 60).release().perform()
    page.el("generate").click()
    page.wait_status(r"^done in")
    gen = list(server.pg.generations.values())[-1]
    assert gen.settings.mode == "inpaint" and 0 < gen.repaint < 32, gen.repaint
    expected = ref.inpaint(PROMPT, gen.job.image, gen.job.mask, steps=3, generator=seeded(0))[0]
    assert_same_image(image_at(server.url, page.view_images()[0]["src"]), expected, "the page's inpainting")
    # the eraser takes paint away, clear takes it all
    before = page.painted()
    browser.find_element(page.By.CSS_SELECTOR, "label:has(#eraser)").click()
    ActionChains(browser).move_to_element_with_offset(canvas, -100, -100).click_and_hold() \
        .move_by_offset(40, 0).release().perform()
    assert 0 < page.painted() < before, (page.painted(), before)
    page.el("clear-mask").click()
    assert page.painted() == 0
    # with nothing painted, the mask covers no token: a message on the page
    browser.find_element(page.By.CSS_SELECTOR, "label:has(#brush)").click()
    page.el("generate").click()
    wait_until(lambda: "the mask covers no token" in page.text("message"), "the empty-mask message")

    # 4. A file that is not an image: a message, and the page goes on working.
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    page.el("file").send_keys(str(not_image))
    wait_until(lambda: "not an image" in page.text("message"), "the upload's error message")
    assert "notes.txt" in page.text("message")

    # 5. Cancel: the running generation stops at its next step.
    page.mode("text-to-image")
    gate = Gate(server.pg.pipe.transformer)
    try:
        page.el("generate").click()
        wait_until(lambda: gate.calls == 1, "the first step to start")
        page.el("cancel").click()
        page.wait_status(r"^cancelling")
        gate.open(1)
        page.wait_status(r"^cancelled$")
    finally:
        gate.remove()
    assert page.el("generate").is_enabled() and not page.el("cancel").is_enabled()

    browser.save_screenshot(str(tmp_path / "playground.png"))  # to look at when this test fails
    problems = [e["message"] for e in browser.get_log("browser")
                if "Uncaught" in e["message"] or "Content Security Policy" in e["message"]]
    assert problems == [], problems


# ----------------------------------------------------------------------------------------------------
# The README's screenshot


def take_screenshot(checkpoint: str, out: Path, prompt: str, guidance: float) -> None:
    """A few generations in the history, then a 5/10/15 comparison of four images, held (by a Gate) in the middle of
    its last run, so that the picture shows finished images beside a grid still filling in."""
    pipe = Amused.from_pretrained(checkpoint)
    with tempfile.TemporaryDirectory(prefix="amused-screenshot-") as folder:
        pg = playground.Playground(pipe, Path(folder), Path(checkpoint).name)
        httpd = playground.Server("127.0.0.1", 0)
        httpd.playground = pg
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        driver = start_browser(Path(folder) / "profile", width=1200, height=1150)
        gate = None
        try:
            page = Page(driver, f"http://127.0.0.1:{httpd.server_address[1]}")
            page.set("guidance", f"{guidance:g}")
            page.set("num-images", 4)
            for text in (prompt.replace("7", "3"), prompt.replace("7", "0"), prompt):
                page.set("prompt", text)
                page.el("generate").click()
                page.wait_status(r"^done in")
            gate = Gate(pipe.transformer)
            page.el("compare").click()
            gate.open(5 + 10 + 6)  # the 5- and 10-step runs, and 6 of the 15 steps
            page.wait_status(r"^run 3/3: step 6/15")
            time.sleep(0.5)  # the frames' paint
            png = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
        finally:
            if gate is not None:
                gate.remove()
            driver.quit()
            httpd.shutdown()
            httpd.server_close()
            pg.close(timeout=30)
    cli.atomic_write(out, lambda tmp: png.save(tmp, format="PNG", optimize=True))
    print(f"wrote {out} ({png.width}x{png.height}, {out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Take the README's screenshot of the playground (see the docstring).")
    p.add_argument("--checkpoint", required=True, help="examples/digits.py's model.safetensors")
    p.add_argument("--screenshot", required=True, help="the PNG to write, e.g. docs/playground.png")
    p.add_argument("--prompt", default="a handwritten digit 7")
    p.add_argument("--guidance", type=float, default=4.0, help="4 serves the digits model best (README)")
    args = p.parse_args()
    reason = browser_missing()
    if reason:
        sys.exit(f"error: {reason}")
    take_screenshot(args.checkpoint, Path(args.screenshot), args.prompt, args.guidance)
