"""Tests of sample.py, the command line, on a tiny random-weight checkpoint in the hub layout (32x32 images,
8x8 tokens, 4 px per token).

What it writes must equal what the pipeline gives for the same settings and seed, pixel for pixel; bad input
must end in exit code 2 and one `error: ...` line that names the problem, without a traceback, and Ctrl-C in exit
code 130 and one line. An --init-image or --mask in any mode Pillow reads must reach the pipeline as what it shows
(a gray ramp, within 2/255), or be refused by name. The command-line
runs are subprocesses started together (they spend most of their time importing torch); the comparisons that
need many runs call main() in-process.
"""
import math
import os
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (ROOT, assert_same_image, interrupt_at, reference_pipeline, save_hub_checkpoint, seeded,
                      smooth_images)
import amused
from amused import Amused
import sample
import sampling
import speed

PROMPT = "a photo of a cat"
# Tiny models run fastest on one thread, and on a shared, busy machine two OpenMP threads can be 100x slower
# than one (they spin waiting for each other). For our runs only: restored after the module, and in the env of
# the subprocesses.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PROGRESS = re.compile(r"^step (\d+)/(\d+): (\d+) of (\d+) tokens still masked \(\d+\.\d+ s\)$", re.M)


def write_png(tensor_or_array, path):
    if isinstance(tensor_or_array, torch.Tensor):  # (3, H, W) in [0, 1]
        tensor_or_array = (tensor_or_array.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(tensor_or_array).save(path)
    return str(path)


def square_mask(H, W, top, left, size):
    """White square on black, as a grayscale array: white = repaint."""
    m = np.zeros((H, W), dtype="uint8")
    m[top:top + size, left:left + size] = 255
    return m


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models only


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny hub checkpoint and the input images, written once for the module."""
    root = tmp_path_factory.mktemp("sample")
    hub = save_hub_checkpoint(reference_pipeline("tiny", tiny_tokenizer_dir, seed=3), root / "hub", tiny_tokenizer_dir)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (root / "empty").mkdir()
    return dict(
        root=root, hub=str(hub),
        init=write_png(smooth_images(1, 32, 32, seed=1)[0], root / "init.png"),
        init34=write_png(smooth_images(1, 34, 34, seed=2)[0], root / "init34.png"),
        mask=write_png(square_mask(32, 32, 8, 12, 16), root / "mask.png"),
        mask_wide=write_png(square_mask(16, 32, 4, 4, 8), root / "mask_wide.png"),  # 32x16: another aspect
        corrupt=str(corrupt), empty=str(root / "empty"),
    )


@pytest.fixture(scope="module")
def pipe(files):
    """The pipeline as sample.py builds it by default: --dtype auto, without --exact."""
    return Amused.from_pretrained(files["hub"], dtype="auto", exact=False)


# ----------------------------------------------------------------------------------------------------
# The command line, as a user runs it: subprocesses, started together


def cli_cases(files):
    """name -> (arguments, extra environment). Every case but the two about the checkpoint uses the tiny one."""
    root = files["root"]
    offline = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(root / "hf-home")}
    return {
        "text_to_image": ([PROMPT, "--steps", "3", "--device", "cpu", "--out", str(root / "cli.png")], {}),
        "init_34x34": ([PROMPT, "--steps", "2", "--init-image", files["init34"], "--out", str(root / "cli34.png")], {}),
        "steps_0": ([PROMPT, "--steps", "0"], {}),
        "steps_not_ints": ([PROMPT, "--steps", "a,b"], {}),
        "negative_guidance": ([PROMPT, "--guidance-scale", "-1"], {}),
        "strength_1.5": ([PROMPT, "--init-image", files["init"], "--strength", "1.5"], {}),
        "mask_without_init": ([PROMPT, "--mask", files["mask"]], {}),
        "mask_aspect": ([PROMPT, "--init-image", files["init"], "--mask", files["mask_wide"]], {}),
        "missing_init": ([PROMPT, "--init-image", str(root / "nope.png")], {}),
        "corrupt_init": ([PROMPT, "--init-image", files["corrupt"]], {}),
        "device_cuda": ([PROMPT, "--device", "cuda"], {}),
        "out_missing_folder": ([PROMPT, "--out", str(root / "no-such-folder" / "x.png")], {}),
        "checkpoint_missing": ([PROMPT, "--checkpoint", str(root / "missing")], {}),
        "checkpoint_empty_folder": ([PROMPT, "--checkpoint", files["empty"]], {}),
        # values argparse takes as numbers, which must fail before the load with the flag's name
        "guidance_nan": ([PROMPT, "--guidance-scale", "nan", "--checkpoint", str(root / "missing")], {}),
        "seed_too_big": ([PROMPT, "--seed", "99999999999999999999999", "--checkpoint", str(root / "missing")], {}),
        "hub_offline": ([PROMPT, "--checkpoint", "amused/amused-256"], offline),
    }


@pytest.fixture(scope="module")
def cli(files):
    """name -> CompletedProcess of `python sample.py ...`, all run up front, two at a time."""
    def run(args, env):
        if "--checkpoint" not in args:
            args = [*args, "--checkpoint", files["hub"]]
        return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **ONE_THREAD, **env}, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, args, env) for name, (args, env) in cli_cases(files).items()}
        return {name: f.result() for name, f in futures.items()}


def test_cli_text_to_image_equals_pipeline(cli, files, pipe):
    r = cli["text_to_image"]
    assert r.returncode == 0, r.stderr
    out = files["root"] / "cli.png"
    assert_same_image(Image.open(out), pipe(PROMPT, generator=seeded(0), steps=3)[0], "CLI vs pipeline")
    assert not list(files["root"].glob(".*.tmp")), "a temporary file was left behind"


def test_cli_prints_settings_once_and_progress_per_step(cli):
    r = cli["text_to_image"]
    assert r.stdout.count("settings:") == 1, r.stdout
    assert re.search(r"^  device +cpu$", r.stdout, re.M)
    dtype, why = speed.auto_dtype(torch.device("cpu"), exact=False)  # bf16 where the CPU has native bf16 matmuls
    shown = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    assert re.search(rf"^  dtype +{shown} \(auto: {re.escape(why)}\)$", r.stdout, re.M), "what auto chose, and why"
    assert re.search(r"^  compile +False$", r.stdout, re.M), "the resolved compile setting"
    assert re.search(r"^  generator +cpu$", r.stdout, re.M), "--generator auto on the CPU"
    steps = [tuple(map(int, m)) for m in PROGRESS.findall(r.stdout)]
    assert [s[:2] for s in steps] == [(1, 3), (2, 3), (3, 3)], r.stdout
    masked = [s[2] for s in steps]
    assert all(s[3] == 64 for s in steps) and masked == sorted(masked, reverse=True) and masked[-1] == 0
    assert 0 < masked[0] < 64
    assert re.search(r"^generated 1 image in \d+\.\d+ s", r.stdout, re.M), "the time taken"
    # after the first step, once, an estimate of the rest of the run
    lines = r.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("step 1/3:"))
    assert re.fullmatch(r"  about \d+\.\d s more for the other 2 steps \(at this step's pace\)", lines[first + 1])
    assert r.stdout.count("  about ") == 1, r.stdout


def test_generator_device():
    """auto draws on the GPU when sampling on CUDA (no per-step copy to the CPU), on the CPU elsewhere."""
    assert sample.resolve_generator_device("auto", "cuda") == "cuda"
    assert [sample.resolve_generator_device("auto", d) for d in ("cpu", "mps")] == ["cpu", "cpu"]
    assert sample.resolve_generator_device("cpu", "cuda") == "cpu"


def test_cli_image_not_multiple_of_token_size_warns_and_runs(cli, files, pipe):
    r = cli["init_34x34"]
    assert r.returncode == 0, r.stderr
    assert re.search(r"^warning: image is 34x34, not a multiple of 4: resized to 32x32", r.stderr, re.M), r.stderr
    with pytest.warns(UserWarning, match="not a multiple"):
        ref = pipe.img2img(PROMPT, Image.open(files["init34"]), generator=seeded(0), steps=2)[0]
    assert_same_image(Image.open(files["root"] / "cli34.png"), ref, "34x34 init image")


ERRORS = {  # case -> a piece of the message that names the problem
    "steps_0": "--steps must be >= 1",
    "steps_not_ints": "--steps must be an integer",
    "negative_guidance": "--guidance-scale must be >= 0",
    "strength_1.5": "--strength must be in (0, 1]",
    "mask_without_init": "--mask needs --init-image",
    "mask_aspect": "same aspect ratio",
    "missing_init": "nope.png: no such file",
    "corrupt_init": "corrupt.png: cannot read it as an image",
    "device_cuda": "CUDA is not available",
    "out_missing_folder": "does not exist",
    "checkpoint_missing": "missing: no such file or folder",
    "checkpoint_empty_folder": "empty: not a hub-layout checkpoint folder",
    "guidance_nan": "--guidance-scale must be >= 0 and finite",
    "seed_too_big": "--seed must be in [0, 2**64), got 99999999999999999999999",
    "hub_offline": "hf download amused/amused-256 --local-dir",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_cli_bad_input_is_one_error_line(cli, case):
    if case == "device_cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = cli[case]
    assert r.returncode == 2, f"exit code {r.returncode}; stderr: {r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert ERRORS[case] in lines[0], lines[0]
    assert "loaded" not in r.stdout


@pytest.mark.parametrize("kwargs, message", [
    (dict(out="x.txt"), "--out x.txt: unknown image type '.txt'"),
    (dict(out="."), "is a folder"),
    (dict(save_steps="x.png"), "--save-steps x.png: unknown image type '.png'; use one of .gif"),
    (dict(strength=0.5), "--strength applies only with --init-image"),
    (dict(num_images=0), "--num-images must be >= 1"),
    (dict(steps="4,5", init_image="in.png", mask="m.png", strength=0.2), "rounds down to 0 steps"),
    # non-finite numbers and seeds torch.Generator would refuse (or wrap around) late, in other words
    (dict(guidance_scale=math.inf), "--guidance-scale must be >= 0 and finite"),
    (dict(guidance_scale=math.nan), "--guidance-scale must be >= 0 and finite"),
    (dict(aesthetic_score=math.nan), "--aesthetic-score must be a finite number, got nan"),
    (dict(aesthetic_score=-math.inf), "--aesthetic-score must be a finite number, got -inf"),
    (dict(init_image="in.png", strength=math.nan), "--strength must be in (0, 1], got nan"),
    (dict(init_image="in.png", mask="m.png", strength=math.nan), "--strength must be in (0, 1], got nan"),
    (dict(seed=99999999999999999999999), "--seed must be in [0, 2**64)"),
    (dict(seed=2**64), "--seed must be in [0, 2**64)"),
    (dict(seed=-1), "--seed must be in [0, 2**64), got -1"),
    (dict(batch_size=0), "--batch-size must be >= 1, got 0"),
    (dict(num_images=1001), "--num-images 1001 x 1 step count makes 1001 images in one grid file, above 1000"),
    (dict(num_images=400, steps="2,3,4"), "1200 images in one grid file, above 1000: for many images, one file each, "
                                          "use --prompts FILE --out-dir DIR"),
    (dict(num_images=9, seed=2**64 - 5), "--seed 18446744073709551611 + --num-images 9 passes 2**64"),
])
def test_more_bad_input_rejected_before_loading(kwargs, message):
    """Errors main() raises before it touches the checkpoint (which does not exist here, so a check that came after
    the load would fail with another message)."""
    with pytest.raises(sample.UsageError) as e:
        sample.main(PROMPT, checkpoint="/no/such/checkpoint", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_img2img_strength_1_notes_the_reference_quirk(files, capsys):
    with pytest.raises(sample.CheckpointError):  # the note comes before the load
        sample.main(PROMPT, checkpoint=str(files["root"] / "missing"), init_image=files["init"], strength=1.0)
    assert "note: img2img at --strength 1 masks none" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Everything else in-process: the same main() the command line calls


def cells(grid: Image.Image, rows: int, cols: int, size: int = 32):
    """Cut a grid into cells[row][col]; the label strip, if any, is what is left above the rows."""
    top = grid.height - rows * size
    assert grid.width == cols * size and top >= 0
    return top, [[grid.crop((c * size, top + r * size, (c + 1) * size, top + (r + 1) * size)) for c in range(cols)]
                 for r in range(rows)]


def test_steps_list_makes_grid_of_independent_runs(files, pipe, capsys):
    out = files["root"] / "grid.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="2,3", num_images=2, seed=5, out=str(out))
    top, grid = cells(Image.open(out), rows=2, cols=2)
    assert top > 0, "step counts are written above the columns"
    for c, n_steps in enumerate((2, 3)):
        ref = pipe(PROMPT, generator=seeded(5), steps=n_steps, num_images_per_prompt=2)
        for r in range(2):
            assert_same_image(grid[r][c], ref[r], f"image {r} at {n_steps} steps")
    assert np.asarray(grid[0][0]).tolist() != np.asarray(grid[1][0]).tolist(), "the two images are the same"
    assert "2 steps: 2 images in" in capsys.readouterr().out


def test_num_images_without_step_list_makes_a_column(files, pipe):
    out = files["root"] / "column.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="2", num_images=2, negative_prompt="a dog",
                guidance_scale=4.0, out=str(out))
    top, grid = cells(Image.open(out), rows=2, cols=1)
    assert top == 0, "no labels with one step count"
    ref = pipe(PROMPT, "a dog", guidance_scale=4.0, generator=seeded(0), steps=2, num_images_per_prompt=2)
    for r in range(2):
        assert_same_image(grid[r][0], ref[r], f"image {r}")


def test_img2img_equals_pipeline(files, pipe, capsys):
    out = files["root"] / "img2img.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="4", init_image=files["init"], out=str(out))
    ref = pipe.img2img(PROMPT, Image.open(files["init"]), 0.5, generator=seeded(0), steps=4)[0]  # default strength
    assert_same_image(Image.open(out), ref, "img2img")
    # the progress starts at step 3/4: said once, before it
    printed = capsys.readouterr().out
    note = "note: img2img at --strength 0.5 runs only the last 2 of the 4 steps (the image's tokens stand in for"
    assert printed.count(note) == 1 and printed.index(note) < printed.index("step 3/4:"), printed
    assert [m[:2] for m in PROGRESS.findall(printed)] == [("3", "4"), ("4", "4")], printed


def test_exact_runs_the_reference_fp32_pipeline(files, capsys, monkeypatch):
    """--exact (with --dtype auto) loads Amused(dtype=float32, exact=True), the pipeline whose output equals
    diffusers' bit for bit (test_amused.py), and says so in the settings."""
    seen, load = {}, Amused.from_pretrained
    monkeypatch.setattr(Amused, "from_pretrained", lambda *args, **kwargs: seen.update(kwargs) or load(*args, **kwargs))
    out = files["root"] / "exact.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="3", out=str(out), exact=True)
    assert seen["exact"] is True and seen["dtype"] == torch.float32
    printed = capsys.readouterr().out
    assert re.search(r"^  exact +True$", printed, re.M)
    assert re.search(r"^  dtype +fp32 \(auto: exact: the reference's float32\)$", printed, re.M)
    exact = Amused.from_pretrained(files["hub"])
    assert_same_image(Image.open(out), exact(PROMPT, generator=seeded(0), steps=3)[0], "--exact")


def test_compile_compiles_the_step_and_warms_up(files, capsys, monkeypatch):
    """--compile calls Amused.compile before the timed runs and warms up with the job's batch and guidance.
    (Compiling itself is tested in test_speed.py; here a stand-in keeps this test fast.)"""
    calls = []
    monkeypatch.setattr(Amused, "compile", lambda self: calls.append(("compile", self.step_fn)))
    out = files["root"] / "compiled.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="2", out=str(out), compile=True)
    printed = capsys.readouterr().out
    assert calls == [("compile", sampling.sampling_step)] and re.search(r"^  compile +True$", printed, re.M)
    assert re.search(r"^compiled the sampling step in \d+\.\d s \(a 2-step warm-up run\)$", printed, re.M)


def test_init_images_keep_their_aspect_ratio(files, pipe, tmp_path, capsys):
    """A 64x48 image for a 32x32 model (8 px multiples: 4 px tokens, a grid halved inside) is generated at the
    model's pixel count at 4:3, rounded to the grid: 40x24; the image and the mask are scaled and centre-cropped
    alike, and the run is what the pipeline gives on them. With --width/--height: that size."""
    big = Image.open(files["init"]).resize((64, 48), resample=Image.BICUBIC)
    big.save(tmp_path / "big.png")
    mask = Image.fromarray(square_mask(48, 64, 8, 20, 24))
    mask.save(tmp_path / "mask.png")
    for (width, height), scaled, crop in [((None, None), (40, 30), (0, 3, 40, 27)),
                                          ((32, 32), (43, 32), (5, 0, 37, 32))]:
        out = tmp_path / "out.png"
        sample.main(PROMPT, checkpoint=files["hub"], steps="4", init_image=str(tmp_path / "big.png"),
                    mask=str(tmp_path / "mask.png"), out=str(out), width=width, height=height)
        size = f"{crop[2] - crop[0]}x{crop[3] - crop[1]}"
        assert f"scaled to {scaled[0]}x{scaled[1]} and centre-cropped to {size}" in capsys.readouterr().out
        fitted = big.resize(scaled, resample=Image.LANCZOS).crop(crop)
        fitted_mask = mask.resize(scaled, resample=Image.LANCZOS).crop(crop)
        ref = pipe.inpaint(PROMPT, fitted, fitted_mask, generator=seeded(0), steps=4)[0]
        assert_same_image(Image.open(out), ref, f"64x48 inpainting at {size}")
        assert Image.open(out).size == (crop[2] - crop[0], crop[3] - crop[1])


def test_width_and_height(files, pipe, tmp_path, capsys):
    """Text to image at --width x --height equals the pipeline at that size; a size past the model's says what a
    step will cost; a size with no token grid is one clear error, after the load (the multiple is the model's)."""
    out = tmp_path / "wide.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="3", width=64, height=40, out=str(out))
    printed = capsys.readouterr().out
    assert re.search(r"^note: 64x40 has 2\.5x the pixels of the model's 32x32: a step costs about \d+\.\dx", printed,
                     re.M)
    assert re.search(r"^  width +64$", printed, re.M) and re.search(r"^step 1/3: \d+ of 160 tokens", printed, re.M)
    assert_same_image(Image.open(out), pipe(PROMPT, height=40, width=64, steps=3, generator=seeded(0))[0], "64x40")
    with pytest.raises(ValueError, match="the width must be a multiple of 8 .*use e.g. 32 or 40"):
        sample.main(PROMPT, checkpoint=files["hub"], steps="1", width=36, out=str(out))
    with pytest.raises(sample.UsageError, match="--height must be a positive number of pixels"):
        sample.main(PROMPT, checkpoint=files["hub"], height=0, out=str(out))


def test_sampler_flags_reach_the_pipeline(files, pipe, tmp_path, capsys):
    """--sampler and its knobs give the pipeline's image with those keywords, and the settings line says what they
    cost in U-ViT passes; a bad value is refused before the load, naming the flag."""
    out = tmp_path / "halton.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="4,6", out=str(out), sampler="halton",
                guidance_schedule="interval", softmax_temperature="1,0.8")
    printed = capsys.readouterr().out
    assert re.search(r"^  sampler +halton \(guidance interval from 0\.5, softmax temperature \(1\.0, 0\.8\)\): 6,9 "
                     r"U-ViT passes per image$", printed, re.M), printed
    grid = Image.open(out)
    expected = pipe(PROMPT, steps=4, generator=seeded(0), sampler="halton", guidance_schedule="interval",
                    softmax_temperature=(1.0, 0.8))[0]
    assert_same_image(grid.crop((0, grid.height - 32, 32, grid.height)), expected, "the 4-step column")
    sample.main(PROMPT, checkpoint=files["hub"], steps="12", out=str(out))
    assert re.search(r"^  sampler +confidence: 24 U-ViT passes per image$", capsys.readouterr().out, re.M)
    sample.main(PROMPT, checkpoint=files["hub"], steps="3", out=str(out), guidance_schedule="ramp",
                guidance_scale=6.0, temperature="0.75,0")  # FEWER_PASSES's kind of setting
    assert re.search(r"^  sampler +confidence \(guidance ramp\): 5 U-ViT passes per image$", capsys.readouterr().out,
                     re.M)
    expected = pipe(PROMPT, steps=3, guidance_scale=6.0, generator=seeded(0), guidance_schedule="ramp",
                    temperature=(0.75, 0.0))[0]
    assert_same_image(Image.open(out), expected, "ramp, Gumbel temperature 0.75 -> 0")
    for kwargs, message in [(dict(guidance_from=1.5), r"--guidance-from must be in \[0, 1\]"),
                            (dict(softmax_temperature="hot"), "--softmax-temperature must be a finite number or two"),
                            (dict(softmax_temperature="0"), "--softmax-temperature must be a positive"),
                            (dict(temperature="1,nan"), "--temperature must be a finite number or two like 2,0")]:
        with pytest.raises(sample.UsageError, match=message):
            sample.main(PROMPT, checkpoint=str(tmp_path / "missing"), **kwargs)


def test_step_cost_grows_with_the_square_of_the_tokens():
    """step_cost: linear in the tokens while they are few, quadratic (self-attention) when many."""
    cfg = amused.uvit.PRESETS["amused-256"]
    base = sample.step_cost(cfg, 16, 16)
    assert 1.9 < sample.step_cost(cfg, 16, 32) / base < 2.2  # 2x the tokens: ~2x
    assert sample.step_cost(cfg, 64, 64) / base > 20  # 16x the tokens: attention dominates


def test_inpaint_equals_pipeline(files, pipe):
    out = files["root"] / "inpaint.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="3", init_image=files["init"], mask=files["mask"],
                seed=2, out=str(out))
    ref = pipe.inpaint(PROMPT, Image.open(files["init"]), Image.open(files["mask"]), 1.0, generator=seeded(2),
                       steps=3)[0]  # default strength
    assert_same_image(Image.open(out), ref, "inpaint")
    recon = pipe.img2img(PROMPT, Image.open(files["init"]), 1.0, generator=seeded(2), steps=3)[0]
    assert np.asarray(Image.open(out)).tolist() != np.asarray(recon).tolist(), "the mask changed nothing"


def test_save_steps_gif_one_frame_per_step(files, pipe, capsys):
    out, gif = files["root"] / "anim.png", files["root"] / "anim.gif"
    sample.main(PROMPT, checkpoint=files["hub"], steps="4", out=str(out), save_steps=str(gif))
    masked = [int(m[2]) for m in PROGRESS.findall(capsys.readouterr().out)]
    with Image.open(gif) as g:
        assert g.n_frames == 4 and g.info["loop"] == 0
        frames = []
        for i in range(g.n_frames):
            g.seek(i)
            frames.append((g.convert("RGB"), g.info["duration"]))
    assert [d for _, d in frames] == [sample.FRAME_MS] * 3 + [sample.LAST_FRAME_MS]
    # GIF frames have a 256-colour palette: the last frame equals the final image up to that quantization
    last, final = np.asarray(frames[-1][0], dtype=int), np.asarray(Image.open(out), dtype=int)
    assert np.abs(last - final).mean() < 4, np.abs(last - final).mean()
    # Masked token cells (4x4 px) are grey: about as many cells as the progress line said after step 1
    first = np.asarray(frames[0][0], dtype=int).reshape(8, 4, 8, 4, 3)
    grey = (np.abs(first - 128) <= 2).all(axis=(1, 3, 4))  # (8, 8) cells
    assert abs(int(grey.sum()) - masked[0]) <= 2 and 0 < masked[0] < 64, (grey.sum(), masked)


def test_step_frames_exact(pipe):
    """The frames before GIF quantization: the last one is the final image, masked cells are exactly grey."""
    history = []
    final = pipe(PROMPT, generator=seeded(1), steps=3, callback=lambda step, t: history.append(t[0].clone()))[0]
    frames = sample.step_frames(pipe, history)
    assert len(frames) == 3
    assert_same_image(frames[-1], final, "last frame")
    first = np.asarray(frames[0], dtype=int).reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4)  # (8, 8) cells of 4x4
    masked = (history[0] == pipe.mask_id).numpy()
    assert 0 < masked.sum() < 64
    assert (first[masked] == 128).all(), "masked cells are flat grey"
    assert (first[~masked] != 128).any(axis=(1, 2, 3)).all(), "committed cells are decoded, not grey"


def test_step_list_note_names_every_count(files, capsys):
    """Inpainting at strength 0.5 with a list of step counts: one note for them all."""
    with pytest.raises(sample.CheckpointError):  # the note is printed after the load: make the load fail late
        sample.main(PROMPT, checkpoint=files["empty"], init_image=files["init"], mask=files["mask"], strength=0.5)
    job = sample.Job("inpaint", PROMPT, None, 10.0, 1, 6.0, 0.5, None, None)
    sample.note_step_counts(job, [4, 12, 100], n_tokens=64)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2] == ("note: inpaint at --strength 0.5 runs only the last 2, 6, 50 of the 4, 12, 100 steps "
                           "(the image's tokens stand in for the first ones)")
    assert printed[-1].startswith("note: --steps 100 is more than the 64 tokens of an image. Each step commits at "
                                  "least one token"), printed[-1]


def test_ctrl_c_is_one_line_and_exit_130(files):
    """--steps 1000 on the 64-token model: a note says why that is no better, step 1 an estimate of the rest; a
    SIGINT then stops the run with one line `interrupted`, exit code 130, no traceback and no output file."""
    out = files["root"] / "interrupted.png"
    code, stdout, stderr = interrupt_at([sys.executable, "sample.py", PROMPT, "--steps", "1000", "--checkpoint",
                                         files["hub"], "--out", str(out)], "  about ", ONE_THREAD)
    assert code == 130, f"exit code {code}; stdout: {stdout[-2000:]}; stderr: {stderr[-2000:]}"
    assert stderr == "interrupted\n", stderr
    assert "note: --steps 1000 is more than the 64 tokens of an image. Each step commits at least one token, so " \
           "past 64 steps the extra steps only resample the last masked tokens: the result is not better" in stdout
    assert re.search(r"^step 1/1000: 63 of 64 tokens still masked \(\d+\.\d+ s\)\n  about .+ more for the other 999 "
                     r"steps", stdout, re.M), stdout
    assert not out.exists() and not list(files["root"].glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------------
# --init-image and --mask in every mode Pillow reads: what the pipeline receives is the image's content

RAMP = np.add.outer(np.arange(32), np.arange(32)) * 255 // 62  # (32, 32) uint8 gray ramp, 0 at the top left to 255
RAMP = RAMP.astype("uint8")


def ramp_file(folder, mode: str, fmt: str, scale=1 / 255, size=32):
    """The gray ramp saved in Pillow mode `mode` as a `fmt` file (scale: of the F mode's values)."""
    ramp = RAMP if size == 32 else np.asarray(Image.fromarray(RAMP).resize((size, size), resample=Image.BICUBIC))
    gray = Image.fromarray(ramp)
    if mode in ("I;16", "I"):
        image = Image.fromarray(ramp.astype("uint16") * 257)  # 0..65535; "I" as 32-bit integers
        image = image if mode == "I;16" else image.convert("I")
    elif mode == "F":
        image = Image.fromarray(ramp.astype("float32") * (scale * 1.0))
    elif mode in ("RGBA", "LA", "PA"):  # the colour channels are the ramp; alpha a ramp the other way
        alpha = Image.fromarray(255 - ramp)
        image = Image.merge(mode, (*gray.convert(mode[:-1]).split(), alpha))
    elif mode == "P+transparency":
        image = gray.convert("P")
        image.info["transparency"] = 0
    else:
        image = gray.convert(mode)  # "1" dithers; the others hold the ramp exactly (YCbCr, LAB: in their terms)
    path = folder / f"ramp-{mode.replace(';', '')}-{size}.{fmt.lower()}"
    image.save(path, format=fmt)
    return str(path)


@pytest.fixture
def received(files, pipe, monkeypatch):
    """main() with the module's pipeline (no reload) -> the image (and mask) that Amused.img2img / inpaint got."""
    seen = {}
    monkeypatch.setattr(Amused, "from_pretrained", lambda *args, **kwargs: pipe)
    img2img, inpaint = Amused.img2img, Amused.inpaint

    def spy_img2img(self, prompt, image, *args, **kwargs):
        seen["image"] = image
        return img2img(self, prompt, image, *args, **kwargs)

    def spy_inpaint(self, prompt, image, mask, *args, **kwargs):
        seen["image"], seen["mask"] = image, mask
        return inpaint(self, prompt, image, mask, *args, **kwargs)

    monkeypatch.setattr(Amused, "img2img", spy_img2img)
    monkeypatch.setattr(Amused, "inpaint", spy_inpaint)

    def run(init, mask=None):
        seen.clear()
        sample.main(PROMPT, checkpoint=files["hub"], steps="2", init_image=init, mask=mask,
                    out=str(files["root"] / "modes.png"))
        return seen
    return run


def as_array(image, mode="RGB"):
    """What the pipeline's preprocessing reads from a PIL image, as ints."""
    image = amused.pil_to_rgb(image)
    return np.asarray(image if mode == "RGB" else image.convert(mode), dtype=int)


MODES = [  # mode, file format, largest difference to the ramp (of 255) that is still reading it right
    ("L", "PNG", 0), ("P", "PNG", 0), ("RGB", "PNG", 0), ("RGB", "JPEG", 2), ("CMYK", "TIFF", 0), ("CMYK", "JPEG", 2),
    ("YCbCr", "TIFF", 0), ("LAB", "TIFF", 1), ("I;16", "PNG", 0), ("I;16", "TIFF", 0), ("F", "TIFF", 0),
]
ALPHA_MODES = [("RGBA", "PNG"), ("LA", "PNG"), ("PA", "TIFF"), ("P+transparency", "PNG")]


@pytest.mark.parametrize("mode, fmt, tolerance", MODES)
def test_init_image_modes_read_right(received, tmp_path, mode, fmt, tolerance):
    path = ramp_file(tmp_path, mode, fmt)
    with Image.open(path) as f:
        assert f.mode == mode, f"Pillow opened the {mode} {fmt} file as {f.mode}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no transparency to drop, nothing resized
        got = as_array(received(path)["image"])
    diff = np.abs(got - RAMP[..., None]).max()
    assert diff <= tolerance, f"{mode} {fmt}: the pipeline got values up to {diff}/255 away from the image's"
    if mode == "I;16":
        assert got.mean() < 160, "16-bit gray clipped to white"


@pytest.mark.parametrize("mode, fmt", ALPHA_MODES)
def test_init_image_alpha_dropped_with_a_warning(received, tmp_path, mode, fmt):
    path = ramp_file(tmp_path, mode, fmt)
    with Image.open(path) as f:
        assert f.mode == mode.split("+")[0] and (mode != "P+transparency" or "transparency" in f.info)
    with pytest.warns(UserWarning, match="transparency"):
        got = as_array(received(path)["image"])
    assert np.abs(got - RAMP[..., None]).max() == 0, f"{mode}: the colours under the alpha channel changed"


def test_init_image_1_bit(received, tmp_path):
    path = ramp_file(tmp_path, "1", "PNG")
    with Image.open(path) as f:
        bits = np.asarray(f, dtype=int) * 255  # 0 or 255, dithered from the ramp
    assert np.array_equal(as_array(received(path)["image"]), np.repeat(bits[..., None], 3, axis=-1))


def test_16_bit_init_image_of_another_size_is_fitted(received, tmp_path, capsys):
    """40x40 16-bit gray: read as 8 bits, then scaled to the model's 32x32 like an 8-bit image of that size."""
    path = ramp_file(tmp_path, "I;16", "PNG", size=40)
    got = as_array(received(path)["image"], "L")
    assert "note: --init-image is 40x40; scaled to 32x32\n" in capsys.readouterr().out
    with Image.open(path) as f:
        eight_bit = Image.fromarray((np.asarray(f, dtype=float) / 257).round().astype("uint8"))
    expected = np.asarray(eight_bit.resize((32, 32), resample=Image.LANCZOS), dtype=int)
    assert np.abs(got - expected).max() <= 1 and np.abs(got - RAMP).max() <= 8  # Lanczos of a bicubic resize


def test_16_bit_mask(received, files, tmp_path):
    mask = square_mask(32, 32, 8, 12, 16)
    path = tmp_path / "mask16.png"
    Image.fromarray(mask.astype("uint16") * 257).save(path)
    with Image.open(path) as f:
        assert f.mode == "I;16"
    seen = received(files["init"], str(path))
    assert np.array_equal(as_array(seen["mask"], "L"), mask), "the 16-bit mask is not the 8-bit one"


@pytest.mark.parametrize("mode, scale, message", [
    ("I", None, "32-bit integer pixels (Pillow mode I), whose range is unknown"),
    ("F", 1.0, "the image's F pixels lie in [0, 255], outside [0, 1]"),
    ("F", -1 / 255, "outside [0, 1]"),
])
def test_init_image_of_unknown_range_refused(tmp_path, mode, scale, message):
    path = ramp_file(tmp_path, mode, "TIFF", scale=scale)
    with pytest.raises(sample.UsageError) as e:
        sample.main(PROMPT, checkpoint="/no/such/checkpoint", init_image=path)
    assert str(e.value).startswith(f"--init-image {path}: ") and message in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------------------
# Many images in bounded batches


def test_more_images_than_a_batch_run_in_batches_and_the_batch_size_changes_no_image(files, tmp_path, capsys,
                                                                                      monkeypatch):
    """--num-images past --batch-size: pipeline calls of at most --batch-size images, a line per batch, and image i
    is `--seed S+i` alone, whatever the batch size (CPU fp32: the same file bit for bit)."""
    calls, call = [], Amused.__call__
    monkeypatch.setattr(Amused, "__call__", lambda self, *a, **kw: calls.append(kw["num_images_per_prompt"])
                        or call(self, *a, **kw))
    for b in (2, 3):
        sample.main(PROMPT, checkpoint=files["hub"], steps="2", num_images=5, batch_size=b, seed=4, dtype="fp32",
                    out=str(tmp_path / f"b{b}.png"))
    monkeypatch.undo()
    assert calls == [2, 2, 1, 3, 2]
    printed = capsys.readouterr().out
    assert re.findall(r"^batch (\d)/(\d): (\d)/5 images", printed, re.M) == [
        ("1", "3", "2"), ("2", "3", "4"), ("3", "3", "5"), ("1", "2", "3"), ("2", "2", "5")]
    assert len(PROGRESS.findall(printed)) == 2 * 2, "step lines for the first batch of each run only"
    assert (tmp_path / "b2.png").read_bytes() == (tmp_path / "b3.png").read_bytes()
    alone = Amused.from_pretrained(files["hub"], dtype="fp32", exact=False)
    _, grid = cells(Image.open(tmp_path / "b2.png"), rows=5, cols=1)
    for i in range(5):
        assert_same_image(grid[i][0], alone(PROMPT, steps=2, generator=seeded(4 + i))[0], f"image {i} vs seed {4 + i}")


# ----------------------------------------------------------------------------------------------------
# Sampling defaults a checkpoint carries


@pytest.fixture(scope="module")
def student(files, tmp_path_factory):
    """A one-step checkpoint as distill.py writes it: sampling_defaults set on the pipeline, then train.save_model."""
    import train
    pipe = Amused.from_pretrained(files["hub"])
    pipe.sampling_defaults = {"steps": 1, "guidance_scale": 0.0}
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    train.save_model(path, pipe)
    return path


def test_a_checkpoints_sampling_defaults_are_the_flags_defaults(files, student, pipe, tmp_path, capsys, monkeypatch):
    """`sample.py --checkpoint student.safetensors PROMPT` draws in one step, unguided (one U-ViT pass per step),
    and says where the settings came from; a flag given wins over the checkpoint."""
    batches = []
    forward = sampling.uvit.UViT.forward
    monkeypatch.setattr(sampling.uvit.UViT, "forward", lambda self, ids, *a, **kw: batches.append(ids.shape[0])
                        or forward(self, ids, *a, **kw))
    out = tmp_path / "student.png"
    sample.main(PROMPT, checkpoint=str(student), out=str(out))
    printed = capsys.readouterr().out
    assert batches == [1], "one step, one U-ViT pass on one image: no guidance pass"
    assert re.search(r"^  steps +1 \(checkpoint\)$", printed, re.M)
    assert re.search(r"^  guidance_scale +0\.0 \(checkpoint\)$", printed, re.M)
    assert re.search(r"^  sampler +confidence: 1 U-ViT passes per image$", printed, re.M), "not marked: the pipeline's"
    assert PROGRESS.findall(printed) == [("1", "1", "0", "64")]
    assert_same_image(Image.open(out), pipe(PROMPT, steps=1, guidance_scale=0.0, generator=seeded(0))[0], "student")

    sample.main(PROMPT, checkpoint=str(student), steps="2", out=str(out))
    printed = capsys.readouterr().out
    assert re.search(r"^  steps +2$", printed, re.M) and re.search(r"^  guidance_scale +0\.0 \(checkpoint\)$",
                                                                    printed, re.M)
    # a hub folder has none: the pipeline's defaults, unmarked
    assert sample.sampling_flags(dict.fromkeys(sample.SAMPLING_KEYS), files["hub"]) == (
        {**dict.fromkeys(sample.SAMPLING_KEYS), "steps": "12", "guidance_scale": 10.0, "temperature": "2.0,0.0",
         "sampler": "confidence", "guidance_schedule": "constant", "guidance_from": 0.5, "mask_schedule": None,
         "softmax_temperature": "1.0", "halton_roll": True}, [])


# ----------------------------------------------------------------------------------------------------
# Small surprises, each said in a line


def test_a_prompt_that_names_a_file_gets_a_note(files, capsys):
    with pytest.raises(sample.CheckpointError):  # the note comes before the load
        sample.main(files["init"], checkpoint=str(files["root"] / "missing"))
    assert f"note: the prompt {files['init']!r} is the name of a file" in capsys.readouterr().out
    with pytest.raises(sample.CheckpointError):
        sample.main("x" * 5000, checkpoint=str(files["root"] / "missing"))  # too long for a file name: no error
    assert "note: the prompt" not in capsys.readouterr().out


def test_fp16_on_a_cpu_gets_a_note(tmp_path, capsys):
    """sample.py --dtype fp16 (and sample_many.py, playground.py: the same resolve_dtype) and train.py
    --mixed-precision fp16 on a CPU say that it runs emulated, and what to use instead."""
    import train
    sample.resolve_dtype("fp16", "cpu", exact=False)
    assert "note: --dtype fp16 on a CPU runs emulated" in capsys.readouterr().out
    sample.resolve_dtype("bf16", "cpu", exact=False)
    sample.resolve_dtype("fp16", "cuda", exact=False)
    assert capsys.readouterr().out == ""
    with pytest.raises(sample.UsageError, match="--data"):  # the note comes before the data is looked at
        train.main(checkpoint="x", data=str(tmp_path / "missing"), out=str(tmp_path / "out"), mixed_precision="fp16",
                   device="cpu")
    assert "note: --mixed-precision fp16 on a CPU runs emulated" in capsys.readouterr().out
    with pytest.raises(sample.UsageError, match="--data"):
        train.main(checkpoint="x", data=str(tmp_path / "missing"), out=str(tmp_path / "out"), mixed_precision="bf16",
                   device="cpu")
    assert "note:" not in capsys.readouterr().out


def test_help_shows_each_default_once():
    """A default of None is explained in the flag's help: "(default: None)" would say it a second time, wrongly."""
    import argparse
    import cli
    p = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=8, help="images per call")
    text = " ".join(p.format_help().split())
    assert "torch threads (default: torch's choice)" in text and text.count("default") == 2
    assert "images per call (default: 8)" in text
