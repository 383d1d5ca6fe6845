"""Tests of sample.py, the command line, on a tiny random-weight checkpoint in the hub layout (32x32 images,
8x8 tokens, 4 px per token).

What it writes must equal what the pipeline gives for the same settings and seed, pixel for pixel; bad input
must end in exit code 2 and one `error: ...` line that names the problem, without a traceback. The command-line
runs are subprocesses started together (they spend most of their time importing torch); the comparisons that
need many runs call main() in-process.
"""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, reference_pipeline, save_hub_checkpoint, smooth_images
import amused
from amused import Amused
import sample

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
    return dict(
        root=root, hub=str(hub),
        init=write_png(smooth_images(1, 32, 32, seed=1)[0], root / "init.png"),
        init34=write_png(smooth_images(1, 34, 34, seed=2)[0], root / "init34.png"),
        mask=write_png(square_mask(32, 32, 8, 12, 16), root / "mask.png"),
        mask_wide=write_png(square_mask(16, 32, 4, 4, 8), root / "mask_wide.png"),  # 32x16: another aspect
        corrupt=str(corrupt),
    )


@pytest.fixture(scope="module")
def pipe(files):
    return Amused.from_pretrained(files["hub"])


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_same_image(ours: Image.Image, ref: Image.Image, what: str):
    a, b = np.asarray(ours.convert("RGB")), np.asarray(ref.convert("RGB"))
    assert a.shape == b.shape, f"{what}: size {a.shape} != {b.shape}"
    assert a.std() > 0, f"{what}: a constant image"
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() == 0, f"{what}: {np.count_nonzero(diff)} of {diff.size} values differ (max {diff.max()})"


# ----------------------------------------------------------------------------------------------------
# The command line, as a user runs it: subprocesses, started together


def cli_cases(files):
    """name -> (arguments, extra environment). Every case but the two about the checkpoint uses the tiny one."""
    root = files["root"]
    offline = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(root / "hf-home")}
    return {
        "text_to_image": ([PROMPT, "--steps", "3", "--device", "cpu", "--compile", "--out", str(root / "cli.png")], {}),
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
    # --compile is for CUDA: on the CPU it is ignored with a note
    assert "note: --compile is for CUDA only; ignored on cpu" in r.stdout


def test_cli_prints_settings_once_and_progress_per_step(cli):
    r = cli["text_to_image"]
    assert r.stdout.count("settings:") == 1, r.stdout
    assert re.search(r"^  device +cpu$", r.stdout, re.M) and re.search(r"^  dtype +fp32$", r.stdout, re.M)
    assert re.search(r"^  compile +False$", r.stdout, re.M), "the resolved compile setting"
    assert re.search(r"^  generator +cpu$", r.stdout, re.M), "--generator auto on the CPU"
    steps = [tuple(map(int, m)) for m in PROGRESS.findall(r.stdout)]
    assert [s[:2] for s in steps] == [(1, 3), (2, 3), (3, 3)], r.stdout
    masked = [s[2] for s in steps]
    assert all(s[3] == 64 for s in steps) and masked == sorted(masked, reverse=True) and masked[-1] == 0
    assert 0 < masked[0] < 64
    assert re.search(r"^generated 1 image in \d+\.\d+ s", r.stdout, re.M), "the time taken"


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
    "hub_offline": "huggingface-cli download amused/amused-256",
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
])
def test_more_bad_input_rejected_before_loading(kwargs, message):
    """Errors main() raises before it touches the checkpoint (which does not exist here)."""
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


def test_img2img_equals_pipeline(files, pipe):
    out = files["root"] / "img2img.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="4", init_image=files["init"], out=str(out))
    ref = pipe.img2img(PROMPT, Image.open(files["init"]), 0.5, generator=seeded(0), steps=4)[0]  # default strength
    assert_same_image(Image.open(out), ref, "img2img")


@pytest.mark.skipif(not amused.onednn_available(), reason="this PyTorch build has no oneDNN")
def test_no_exact_runs_the_inexact_pipeline(files, capsys, monkeypatch):
    """--no-exact loads Amused(exact=False) and gives what it gives; that mode's own checks are in test_amused.py."""
    seen, load = {}, Amused.from_pretrained
    monkeypatch.setattr(Amused, "from_pretrained", lambda *args, **kwargs: seen.update(kwargs) or load(*args, **kwargs))
    out = files["root"] / "inexact.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="3", out=str(out), exact=False)
    assert seen["exact"] is False
    assert re.search(r"^  exact +False$", capsys.readouterr().out, re.M)
    fast = Amused.from_pretrained(files["hub"], exact=False)
    assert_same_image(Image.open(out), fast(PROMPT, generator=seeded(0), steps=3)[0], "--no-exact")


def test_other_sizes_are_scaled_and_centre_cropped(files, pipe, tmp_path, capsys):
    """The pipeline refuses a 64x48 image for a 32 px model; the command line scales the shorter side to 32 and
    centre-crops (the image and the mask alike), then runs what the pipeline gives on that."""
    big = Image.open(files["init"]).resize((64, 48), resample=Image.BICUBIC)
    big.save(tmp_path / "big.png")
    mask = Image.fromarray(square_mask(48, 64, 8, 20, 24))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    sample.main(PROMPT, checkpoint=files["hub"], steps="4", init_image=str(tmp_path / "big.png"),
                mask=str(tmp_path / "mask.png"), out=str(out))
    assert "scaled to 43x32 and centre-cropped to 32x32" in capsys.readouterr().out
    fitted = big.resize((43, 32), resample=Image.LANCZOS).crop((5, 0, 37, 32))
    fitted_mask = mask.resize((43, 32), resample=Image.LANCZOS).crop((5, 0, 37, 32))
    ref = pipe.inpaint(PROMPT, fitted, fitted_mask, generator=seeded(0), steps=4)[0]
    assert_same_image(Image.open(out), ref, "64x48 inpainting")


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
