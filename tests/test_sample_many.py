"""Tests of sample_many.py (`sample.py --prompts FILE --out-dir DIR`) on a tiny random-weight checkpoint (32x32
images, 8x8 tokens), CPU float32.

An image must depend on its line and index only: alone, in a batch of 8, or made by one of two processes, the
files are the same bytes (the seeds are per image, and each image's tokens and decode are independent of the
batch on the CPU in float32). A killed run, rerun, must end with the files of an uninterrupted run; Ctrl-C must
finish the batch in flight and exit 130; a rerun with other settings or another prompt file must be refused; and
bad input must be one error line before the model loads, with nothing written. Most runs call main() in-process;
the ones about processes and signals are subprocesses.
"""
import hashlib
import inspect
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same_image, reference_pipeline, save_hub_checkpoint, seeded
from PIL import Image

import cli
import sample
import sample_many
from amused import Amused
from sample_many import Defaults, Item, Keywords, Process

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models only
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # for the subprocesses (see test_sample.py)

LINES = [  # a prompt file of 12 images: mixed prompts, per-line seeds and counts, two groups of other settings
    {"prompt": "a photo of a cat"},
    {"prompt": "a dog in the park", "num_images": 3},
    {"prompt": "an astronaut riding a horse on the moon", "seed": 7, "num_images": 2},
    None,  # a blank line: skipped, and the lines after it keep their numbers
    {"prompt": "a bowl of fruit", "negative_prompt": "blurry"},
    {"prompt": "portrait of a woman with a red hat, watercolor", "num_images": 2, "guidance_scale": 4},
    {"prompt": "mountains at sunset", "steps": 5},
    {"prompt": "a painting of a dog", "steps": 5, "seed": 2**64 - 2, "num_images": 2},
]
N_IMAGES = 12
FLAGS = {"steps": "8", "dtype": "fp32", "seed": 3}  # the settings every run of the shared prompt file uses


def write_jsonl(path, lines):
    path.write_text("".join("\n" if line is None else json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("sample-many")
    hub = save_hub_checkpoint(reference_pipeline("tiny", tiny_tokenizer_dir, seed=3), root / "hub", tiny_tokenizer_dir)
    return {"root": root, "hub": str(hub), "prompts": write_jsonl(root / "prompts.jsonl", LINES)}


def run(files, out_dir, **kwargs):
    """main() in-process, as `sample.py --prompts ... --out-dir out_dir` with FLAGS."""
    sample_many.main(files["prompts"], str(out_dir), checkpoint=files["hub"], **{**FLAGS, **kwargs})


def command(files, out_dir, *args):
    return [sys.executable, "sample.py", "--prompts", files["prompts"], "--out-dir", str(out_dir), "--checkpoint",
            files["hub"], "--steps", FLAGS["steps"], "--dtype", FLAGS["dtype"], "--seed", str(FLAGS["seed"]), *args]


def start(args, env=None):
    # (A shell's background job, `pytest ... &`, starts its children with SIGINT ignored: no matter here, as the
    # Ctrl-C tests signal during the generation, where cli.stop_requests has its own handler installed.)
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD, **(env or {})})


def folder_files(folder) -> dict[str, bytes]:
    """Every file a run leaves in the folder (temporary ones included), name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(files):
    """(folder, what it printed) of one process at batch size 1: the output every other way must reproduce."""
    folder = files["root"] / "reference"
    run(files, folder, batch_size=1)
    return folder


# ----------------------------------------------------------------------------------------------------
# The rules: seeds, names, shares, batches


def test_image_seed_rule():
    """The documented rule, pinned: a line's seed + index, else sha256("{--seed} {line} {index}")[:8] // 2."""
    digest = hashlib.sha256(b"3 42 1").digest()
    assert sample_many.image_seed(None, 3, 42, 1) == int.from_bytes(digest[:8], "big") // 2
    assert sample_many.image_seed(None, 0, 1, 0) == 0x48452ca3e142c8f3  # the same in every Python, on every machine
    assert sample_many.image_seed(100, 3, 42, 1) == 101
    seeds = {sample_many.image_seed(None, s, line, i) for s in range(3) for line in range(1, 30) for i in range(5)}
    assert len(seeds) == 3 * 29 * 5 and all(0 <= s < 2**63 for s in seeds)


def test_read_prompts_jsonl_lines_and_defaults(files):
    keywords = Keywords(steps=8, guidance_scale=10.0, aesthetic_score=6.0)
    items = sample_many.read_prompts(files["prompts"], Defaults("ugly", 3, 1, keywords))
    assert len(items) == N_IMAGES
    assert [item.file for item in items[:4]] == ["00000001-000.png", "00000002-000.png", "00000002-001.png",
                                                 "00000002-002.png"]
    assert [(i.line, i.index, i.seed) for i in items if i.line == 3] == [(3, 0, 7), (3, 1, 8)]
    assert {i.line for i in items} == {1, 2, 3, 5, 6, 7, 8}, "the blank line 4 is skipped, the numbers kept"
    fruit = next(i for i in items if i.line == 5)
    assert fruit.negative_prompt == "blurry" and items[0].negative_prompt == "ugly"
    woman = next(i for i in items if i.line == 6)
    assert woman.keywords == Keywords(8, 4.0, 6.0) and isinstance(woman.keywords.guidance_scale, float)
    assert items[0].seed == sample_many.image_seed(None, 3, 1, 0)
    assert [i.seed for i in items if i.line == 8] == [2**64 - 2, 2**64 - 1]


def test_read_prompts_text(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa cat\r\n\n  a dog  \n{\"prompt\": \"text, not JSON\"}\n\n".encode())
    items = sample_many.read_prompts(str(path), Defaults(None, 0, 2, Keywords(12, 10.0, 6.0)))
    assert [(i.line, i.index, i.prompt) for i in items] == [
        (1, 0, "a cat"), (1, 1, "a cat"), (3, 0, "a dog"), (3, 1, "a dog"),
        (4, 0, '{"prompt": "text, not JSON"}'), (4, 1, '{"prompt": "text, not JSON"}')]


def test_shares_partition_the_images(files):
    items = sample_many.read_prompts(files["prompts"], Defaults(None, 0, 1, Keywords(8, 10.0, 6.0)))
    for n in (1, 2, 3, 5, 13):
        shares = [sample_many.share(items, Process(i, n, 0, "")) for i in range(n)]
        names = [item.file for s in shares for item in s]
        assert sorted(names) == sorted(i.file for i in items) and len(set(names)) == len(items), n


def test_batches_share_their_keywords():
    kw = [Keywords(8, 10.0, 6.0), Keywords(5, 10.0, 6.0)]
    items = [Item(line, 0, "p", None, line, kw[line % 3 == 0]) for line in range(1, 11)]
    batches = sample_many.batches(items, 3)
    assert [[i.line for i in b] for b in batches] == [[1, 2, 4], [5, 7, 8], [10], [3, 6, 9]]
    assert all(len({i.keywords for i in b}) == 1 for b in batches)


def test_this_process():
    this = sample_many.this_process
    assert this(None, {}) == Process(0, 1, 0, "")
    assert this("2/4", {"RANK": "0", "WORLD_SIZE": "2"}) == Process(2, 4, 0, "--shard")
    assert this(None, {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Process(3, 8, 1, "torchrun")
    assert this(None, {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1"}) == Process(5, 6, 1, "SLURM")
    both = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # torchrun inside a SLURM job
    assert this(None, both).source == "torchrun"
    for shard in ("2/2", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(sample_many.UsageError, match="--shard must be i/n"):
            this(shard, {})
    with pytest.raises(sample_many.UsageError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        this(None, {"RANK": "2", "WORLD_SIZE": "2"})


def test_process_device(monkeypatch):
    monkeypatch.setattr(sample_many.cli, "resolve_device", lambda name: name)  # as if CUDA were there
    device = sample_many.process_device
    assert device("cpu", Process(3, 4, 3, "torchrun"), 8) == "cpu"
    assert device("cuda", Process(3, 4, 3, "torchrun"), 8) == "cuda:3"
    assert device("cuda", Process(5, 16, 1, "SLURM"), 1) == "cuda:0", "SLURM --gpus-per-task 1: the one it sees"
    with pytest.raises(sample_many.UsageError, match="local rank 2, but this process sees 2 GPUs"):
        device("cuda", Process(2, 3, 2, "torchrun"), 2)


# ----------------------------------------------------------------------------------------------------
# One image, whatever the batch, the processes or the order


def test_batch_of_8_writes_the_files_of_batch_1(files, reference, tmp_path):
    run(files, tmp_path / "b8", batch_size=8)
    assert folder_files(tmp_path / "b8") == folder_files(reference)


def test_an_image_is_the_pipelines_image_alone(files, reference):
    """Image 000 of a line with "seed": S is what the pipeline (and so `sample.py PROMPT --seed S`) makes."""
    pipe = Amused.from_pretrained(files["hub"], dtype=torch.float32, exact=False)  # --dtype fp32, as FLAGS
    alone = pipe("an astronaut riding a horse on the moon", generator=seeded(7), steps=8)[0]
    assert_same_image(Image.open(reference / "00000003-000.png"), alone, "line 3, image 0")
    derived = pipe("a photo of a cat", generator=seeded(sample_many.image_seed(None, 3, 1, 0)), steps=8)[0]
    assert_same_image(Image.open(reference / "00000001-000.png"), derived, "line 1, image 0")


def test_main_takes_every_flag_of_sample_main_with_its_default():
    """`sample.py --prompts` hands sample_many.main every flag of sample.py: a flag added to sample.main and not
    here would fail on the command line ("unexpected keyword"), and a default that differs would make another
    image than `sample.py PROMPT` does."""
    ours, theirs = (inspect.signature(f).parameters for f in (sample_many.main, sample.main))
    assert set(ours) == set(theirs)
    assert {name for name in ours if ours[name].default != theirs[name].default} == {"prompt", "prompts", "out_dir"}


SAMPLER_FLAGS = [  # (flags as sample.py takes them, the pipeline keywords they stand for)
    ({"sampler": "halton", "guidance_schedule": "ramp", "mask_schedule": "linear", "softmax_temperature": "1.5,0.5"},
     {"sampler": "halton", "guidance_schedule": "ramp", "mask_schedule": "linear", "softmax_temperature": (1.5, 0.5)}),
    ({"temperature": "1,0", "guidance_schedule": "interval", "guidance_from": 0.25},
     {"temperature": (1.0, 0.0), "guidance_schedule": "interval", "guidance_from": 0.25}),
]


@pytest.mark.parametrize("flags, keywords", SAMPLER_FLAGS, ids=["halton", "confidence"])
def test_sampler_flags_apply_to_every_image(files, tmp_path, flags, keywords):
    """The sampler's flags reach every image, at any batch size: each file is the pipeline's image made alone
    with those keywords (so `sample.py PROMPT --seed S` with the same flags), and not the default sampler's."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat", "num_images": 2}, {"prompt": "a dog", "seed": 5},
                                                 {"prompt": "a fox", "guidance_scale": 4}])
    for b in (1, 4):
        sample_many.main(prompts, str(tmp_path / f"b{b}"), checkpoint=files["hub"], batch_size=b, **FLAGS, **flags)
    assert folder_files(tmp_path / "b1") == folder_files(tmp_path / "b4")
    pipe = Amused.from_pretrained(files["hub"], dtype=torch.float32, exact=False)  # --dtype fp32, as FLAGS
    changed = 0
    for item in sample_many.read_prompts(prompts, Defaults(None, FLAGS["seed"], 1, Keywords(8, 10.0, 6.0))):
        made = Image.open(tmp_path / "b1" / item.file)
        common = {"generator": seeded(item.seed), "steps": 8, "guidance_scale": item.keywords.guidance_scale}
        assert_same_image(made, pipe(item.prompt, **common, **keywords)[0], item.file)
        common["generator"] = seeded(item.seed)
        changed += not np.array_equal(np.asarray(made), np.asarray(pipe(item.prompt, **common)[0]))
    assert changed == 4, "the flags changed every image"


def test_two_processes_write_the_files_of_one(files, reference, tmp_path):
    """Two processes as torchrun starts them (RANK, WORLD_SIZE), at another batch size, at once: the same files."""
    out = tmp_path / "two"
    args = command(files, out, "--batch-size", "3", "--sampler", "confidence", "--temperature", "2,0")  # as FLAGS
    procs = [start(args, {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    assert folder_files(out) == folder_files(reference)
    for r, (stdout, _) in enumerate(outputs):
        assert f"[{r + 1}/2] process {r + 1} of 2 (torchrun): 6 of its 6 images to make" in stdout, stdout
        assert re.search(rf"^\[{r + 1}/2\] made 6 images in ", stdout, re.MULTILINE), stdout
    assert sum("wrote" in stdout and "manifest.jsonl" in stdout for stdout, _ in outputs) >= 1
    assert sum(stdout.count("settings:") for stdout, _ in outputs) == 1, "the settings, once, by process 1"


def test_shards_by_hand_in_any_order(files, reference, tmp_path):
    """--shard 1/3, 0/3, 2/3 one after the other: the last writes the manifest; the folder is the same."""
    out = tmp_path / "shards"
    for i in (1, 0, 2):
        run(files, out, batch_size=2, shard=f"{i}/3")
    assert folder_files(out) == folder_files(reference)


# ----------------------------------------------------------------------------------------------------
# The folder: records, manifest, captions, progress


def test_manifest_captions_and_records(files, reference):
    items = sample_many.read_prompts(files["prompts"], Defaults(None, 3, 1, Keywords(8, 10.0, 6.0)))
    manifest = [json.loads(line) for line in (reference / "manifest.jsonl").read_text().splitlines()]
    assert manifest == [item.record() for item in items]
    assert manifest[6] == {"file": "00000005-000.png", "line": 5, "index": 0, "prompt": "a bowl of fruit",
                           "negative_prompt": "blurry", "seed": sample_many.image_seed(None, 3, 5, 0), "steps": 8,
                           "guidance_scale": 10.0, "aesthetic_score": 6.0, "width": None, "height": None}
    assert (reference / "captions.txt").read_text().splitlines() == [r["prompt"] for r in manifest]
    images = sorted(p.name for p in reference.glob("*.png"))
    assert images == [r["file"] for r in manifest], "file names sort in manifest order"
    for record in manifest:
        with Image.open(reference / record["file"]) as image:
            assert json.loads(image.info["amused"]) == record and image.size == (32, 32)
    run_file = json.loads((reference / "run.json").read_text())
    assert run_file == {"format": 1, "checkpoint": str((ROOT / files["hub"]).resolve()), "variant": None,
                        "device": "cpu", "dtype": "fp32", "exact": False, "generator": "cpu", "seed": 3,
                        "num_images": 1, "negative_prompt": None, "steps": 8, "guidance_scale": 10.0,
                        "aesthetic_score": 6.0, "width": None, "height": None,
                        # the sampler's flags, sample.py's defaults
                        "sampler": "confidence", "guidance_schedule": "constant", "guidance_from": 0.5,
                        "mask_schedule": None, "softmax_temperature": 1.0, "halton_roll": True,
                        "temperature": [2.0, 0.0]}
    assert not list(reference.glob(".*")), "no temporary file left"


def test_progress_per_batch_and_summary(files, tmp_path, capsys):
    run(files, tmp_path / "out", batch_size=4)
    printed = capsys.readouterr().out
    # 3 groups of settings: 7 images at 8 steps, guidance 10 (batches of 4 and 3); 2 at guidance 4; 3 at 5 steps
    assert "process 1 of 1: 12 of its 12 images to make, in 4 batches of up to 4" in printed
    lines = re.findall(r"^batch (\d)/4: (\d) images?, (\d+)/12 done, ([\d.e+]+) images/s(, about .+ left)?$",
                       printed, re.MULTILINE)
    assert [(b, n, d) for b, n, d, _, _ in lines] == [("1", "4", "4"), ("2", "3", "7"), ("3", "2", "9"),
                                                      ("4", "3", "12")], printed
    assert all(left for *_, left in lines[:-1]) and not lines[-1][-1], "an ETA until the last batch"
    assert re.search(r"^made 12 images in \d+\.\d s \([\d.]+ images/s\), 0 were there already; total ", printed,
                     re.MULTILINE)
    assert f"wrote {tmp_path / 'out' / 'manifest.jsonl'} and {tmp_path / 'out' / 'captions.txt'}: 12 images" in printed


def test_rerun_skips_what_exists_without_loading(files, reference, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(reference, out)
    (out / "manifest.jsonl").unlink()
    (out / "00000002-001.png").unlink()
    (out / ".00000002-001.png.99999.tmp").write_bytes(b"\x89PNG")  # what a killed run leaves
    run(files, out, batch_size=4)
    printed = capsys.readouterr().out
    assert "1 of its 12 images to make" in printed and "made 1 image in" in printed
    assert folder_files(out) == folder_files(reference), "the image made again, the temporary file removed"
    run(files, out)
    printed = capsys.readouterr().out
    assert "made 0 images" in printed and "loaded" not in printed, "nothing to make: no model load"


def test_sizes_per_line(files, tmp_path):
    """width and height are pipeline keywords like the others: per line, batched apart, in the record; a size
    without a token grid is refused after the load but before anything is written, naming its line."""
    prompts = write_jsonl(tmp_path / "sizes.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog", "width": 48},
                                                     {"prompt": "a fox", "width": 48, "height": 16}])
    run_dir = tmp_path / "sizes"
    sample_many.main(prompts, str(run_dir), checkpoint=files["hub"], batch_size=3, **FLAGS)
    assert [Image.open(run_dir / f"0000000{n}-000.png").size for n in (1, 2, 3)] == [(32, 32), (48, 32), (48, 16)]
    pipe = Amused.from_pretrained(files["hub"], dtype=torch.float32, exact=False)
    seed = sample_many.image_seed(None, FLAGS["seed"], 3, 0)
    assert_same_image(Image.open(run_dir / "00000003-000.png"),
                      pipe("a fox", width=48, height=16, generator=seeded(seed), steps=8)[0], "48x16")
    bad = write_jsonl(tmp_path / "bad-size.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog", "width": 30}])
    with pytest.raises(ValueError, match=r"30x32 pixels \(line 2 of --prompts, the first of that size\): the width "
                                         r"must be a multiple of 8"):
        sample_many.main(bad, str(tmp_path / "bad"), checkpoint=files["hub"], **FLAGS)
    assert not (tmp_path / "bad").exists()


def test_compile_compiles_once_before_the_batches(files, reference, tmp_path, capsys, monkeypatch):
    """(Compiling itself is tested in test_speed.py; a stand-in keeps this fast.)"""
    calls = []
    monkeypatch.setattr(Amused, "compile", lambda self: calls.append(self))
    run(files, tmp_path / "compiled", batch_size=4, compile=True)
    assert len(calls) == 1 and "note: --compile: the first batch compiles the step" in capsys.readouterr().out
    assert folder_files(tmp_path / "compiled") == folder_files(reference)


def test_a_cut_short_image_is_made_again(files, reference, tmp_path, capsys):
    out = tmp_path / "cut"
    shutil.copytree(reference, out)
    (out / "00000006-001.png").write_bytes((reference / "00000006-001.png").read_bytes()[:100])
    run(files, out)
    assert "00000006-001.png is not a readable PNG (cut short?): made again" in capsys.readouterr().out
    assert folder_files(out) == folder_files(reference)


# ----------------------------------------------------------------------------------------------------
# Mixing is refused


@pytest.mark.parametrize("change, message", [
    ({"steps": "6"}, "holds images made with other settings: --steps 8 (now 6)"),
    ({"dtype": "bf16", "guidance_scale": 5.0}, '--dtype "fp32" (now "bf16"); --guidance-scale 10.0 (now 5.0)'),
    ({"seed": 4}, "--seed 3 (now 4)"),
    ({"exact": True}, "--exact false (now true)"),
    ({"sampler": "halton"}, '--sampler "confidence" (now "halton")'),
    ({"softmax_temperature": "1.5,0.5", "halton_roll": False}, ("--softmax-temperature 1.0 (now [1.5, 0.5]); "
                                                                "--halton-roll true (now false)")),
    ({"temperature": "1,0"}, "--temperature [2.0, 0.0] (now [1.0, 0.0])"),
    ({"guidance_schedule": "interval", "guidance_from": 0.25}, ('--guidance-schedule "constant" (now "interval"); '
                                                                "--guidance-from 0.5 (now 0.25)")),
    ({"mask_schedule": "linear"}, '--mask-schedule null (now "linear")'),
])
def test_rerun_with_other_settings_is_refused(files, reference, change, message):
    before = folder_files(reference)
    with pytest.raises(sample_many.UsageError, match=re.escape(message)):
        run(files, reference, **change)
    assert folder_files(reference) == before


def test_rerun_with_an_edited_prompt_file_is_refused(files, reference, tmp_path):
    edited = [dict(line) if line else None for line in LINES]
    edited[5]["prompt"] = "portrait of a man"
    prompts = write_jsonl(tmp_path / "edited.jsonl", edited)
    with pytest.raises(sample_many.UsageError) as e:
        sample_many.main(prompts, str(reference), checkpoint=files["hub"], **FLAGS)
    assert str(e.value).startswith(f"{reference / '00000006-000.png'} was made otherwise: prompt \"portrait of a "
                                   f"woman with a red hat, watercolor\" (now \"portrait of a man\"). The prompt file")


def test_an_image_of_another_program_is_refused(files, reference, tmp_path):
    out = tmp_path / "foreign"
    shutil.copytree(reference, out)
    Image.new("RGB", (32, 32)).save(out / "00000007-000.png")
    with pytest.raises(sample_many.UsageError, match="00000007-000.png holds no record of `sample.py --prompts`"):
        run(files, out)


# ----------------------------------------------------------------------------------------------------
# Interruptions


def test_stop_requests_record_sigterm_and_a_late_second_ctrl_c_quits(capsys, monkeypatch):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # the times the handler reads: at the first request; at the second (half a second later: checked, then kept);
    # at the third (two seconds after the first)
    clock = itertools.chain([100.0, 100.5, 100.5, 102.0], itertools.repeat(103.0))
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    with cli.stop_requests("stopping after this batch") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's echo of the first: recorded, not raised
        assert len(stop) == 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert capsys.readouterr().out == "\nSIGTERM: stopping after this batch\n"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before, "handlers restored"


def test_killed_at_random_moments_then_rerun_ends_complete(files, reference, tmp_path):
    """SIGKILL twice, each at a random moment of the generation (after a random number of batch lines, plus a
    random delay), then a rerun: every image once, each readable, the files of the uninterrupted run."""
    out, seed = tmp_path / "killed", random.randrange(2**32)
    rng = random.Random(seed)
    for attempt in range(2):
        p = start(command(files, out, "--batch-size", "2"))
        wait_for = rng.randrange(0, 4)  # batch lines of this attempt before the kill
        try:
            for line in p.stdout:
                if line.startswith("batch ") and wait_for == 0 or "made " in line:
                    break
                wait_for -= line.startswith("batch ")
            time.sleep(rng.uniform(0, 0.1))
            p.kill()
        finally:
            p.communicate(timeout=60)
        if attempt == 0:
            assert not (out / "manifest.jsonl").exists(), f"seed {seed}: the first kill came after the end"
    r = subprocess.run(command(files, out, "--batch-size", "2"), cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **ONE_THREAD}, timeout=120, check=False)
    assert r.returncode == 0, f"seed {seed}: {r.stderr}"
    for path in out.glob("*.png"):
        with Image.open(path) as image:
            image.load()  # a truncated file fails here
    assert folder_files(out) == folder_files(reference), f"random seed {seed}"


def test_ctrl_c_finishes_the_batch_then_exits_130_and_the_rerun_continues(files, reference, tmp_path):
    out = tmp_path / "ctrl-c"
    p = start(command(files, out, "--batch-size", "2"))
    try:
        lines = []
        for line in p.stdout:  # until the first batch is written: the second is in flight
            lines.append(line)
            if line.startswith("batch 1/"):  # a batch takes ~0.2 s: 0.05 s into the second one
                time.sleep(0.05)
                p.send_signal(signal.SIGINT)
                break
        rest, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    stdout = "".join(lines) + rest
    assert p.returncode == 130, f"exit code {p.returncode}; stdout: {stdout[-2000:]}; stderr: {stderr[-2000:]}"
    assert stderr.endswith("\ninterrupted\n") or stderr == "interrupted\n", stderr
    _, stop, after = stdout.partition("SIGINT: stopping after this batch (Ctrl-C again to quit now, losing it)")
    assert stop and len(re.findall(r"^batch ", after, re.MULTILINE)) == 1, "the batch in flight at Ctrl-C was finished"
    done = int(re.findall(r"^batch \d+/\d+: \d images?, (\d+)/12 done", after, re.MULTILINE)[0])
    assert f"stopped: {done} of 12 images made; run the same command again to make the rest" in after
    assert len(list(out.glob("*.png"))) == done >= 4, "and written"
    assert not (out / "manifest.jsonl").exists()
    run(files, out, batch_size=5)  # the rerun, at another batch size
    assert folder_files(out) == folder_files(reference)


# ----------------------------------------------------------------------------------------------------
# Bad input: one error before the model loads, nothing written


BAD_FILES = {  # name -> (file content, message)
    "empty.txt": ("", "no prompts in it (it is empty, or only blank lines)"),
    "blank.txt": ("\n  \n\n", "no prompts in it"),
    "bad.jsonl": ('{"prompt": "a cat"}\n\n{"prompt": "a dog",}\n', "bad.jsonl line 3: not valid JSON ("),
    "list.jsonl": ('["a cat"]\n', "line 1: expected an object like {\"prompt\": \"a photo of a cat\"}, got list"),
    "no-prompt.jsonl": ('{"seed": 1}\n', 'line 1: needs "prompt", a string'),
    "int-prompt.jsonl": ('{"prompt": 5}\n', 'line 1: needs "prompt", a string (got 5)'),
    "typo.jsonl": ('{"prompt": "a", "guidance": 3}\n', ("line 1: unknown key 'guidance'; the keys are prompt, "
                                                       "negative_prompt, seed, num_images, steps, guidance_scale, "
                                                       "aesthetic_score, width, height")),
    "width.jsonl": ('{"prompt": "a", "width": 0}\n', "line 1: width must be a positive number of pixels, or null"),
    "seed.jsonl": ('{"prompt": "a", "seed": -1}\n', "line 1: seed must be an integer in [0, 2**64), got -1"),
    "seed-end.jsonl": ('{"prompt": "a", "seed": 18446744073709551615, "num_images": 2}\n',
                       "line 1: seed 18446744073709551615 + 2 images passes 2**64"),
    "count.jsonl": ('{"prompt": "a", "num_images": 0}\n', "line 1: num_images must be an integer in [1, 1000], got 0"),
    "bool.jsonl": ('{"prompt": "a", "steps": true}\n', "line 1: steps must be an integer >= 1, got true"),
    "nan.jsonl": ('{"prompt": "a", "guidance_scale": NaN}\n', "line 1: guidance_scale must be a finite number >= 0"),
    "text.jsonl": ('{"prompt": "a", "guidance_scale": "10"}\n', ('guidance_scale must be a finite number >= 0 (<= 1 '
                                                                'turns guidance off), got "10"')),
    "negative.jsonl": ('{"prompt": "a", "negative_prompt": 1}\n', "negative_prompt must be a string or null, got 1"),
    "surrogate.jsonl": ('{"prompt": "a \\ud800"}\n', "line 1: prompt is not valid Unicode"),
    "coco.json": ('{"annotations": []}', "give JSON Lines (one object per line) in a .jsonl file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_prompt_file(tmp_path, name):
    content, message = BAD_FILES[name]
    (tmp_path / name).write_text(content)
    with pytest.raises(sample_many.UsageError) as e:  # the checkpoint does not exist: checked after the file
        sample_many.main(str(tmp_path / name), str(tmp_path / "out"), checkpoint=str(tmp_path / "missing"))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_prompt_file_not_utf8_names_the_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("a cat\na café\n".encode("latin-1"))
    with pytest.raises(sample_many.UsageError, match=r"latin1.txt line 2: not UTF-8 text \(invalid continuation byte "
                                                     r"at byte 11\)"):
        sample_many.main(str(tmp_path / "latin1.txt"), str(tmp_path / "out"))


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": "missing.txt"}, "--prompts missing.txt: no such file"),
    ({"prompts": "."}, "--prompts .: is a folder"),
    ({"out_dir": "p.txt"}, "--out-dir p.txt: is a file; give a folder"),
    ({"out_dir": "p.txt/sub"}, "p.txt is a file, so the folder cannot be made"),
    ({"out_dir": None}, "--prompts needs --out-dir"),
    ({"prompt": "a cat"}, "give a prompt or --prompts FILE, not both"),
    ({"init_image": "x.png"}, "--init-image does not apply with --prompts"),
    ({"save_steps": "x.gif"}, "--save-steps does not apply with --prompts"),
    ({"steps": "4,8"}, "--steps takes one count with --prompts, got '4,8'"),
    ({"steps": "0"}, "--steps must be >= 1"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"num_images": 1001}, "--num-images must be <= 1000 with --prompts"),
    ({"seed": -1}, "--seed must be in [0, 2**64)"),
    ({"guidance_scale": float("nan")}, "--guidance-scale must be >= 0 and finite"),
    ({"shard": "1/1"}, "--shard must be i/n with 0 <= i < n"),
    ({"height": 0}, "--height must be a positive number of pixels, or null (the model's size), got 0"),
    ({"sampler": "greedy"}, "--sampler must be one of ('confidence', 'halton'"),  # and any added since
    ({"guidance_from": 1.5}, "--guidance-from must be in [0, 1], got 1.5"),
    ({"softmax_temperature": "hot"}, "--softmax-temperature must be a finite number or two like 2,0"),
    ({"softmax_temperature": "0"}, "--softmax-temperature must be a positive finite number"),
    ({"temperature": "2,1,0"}, ("--temperature must be a finite number or two like 2,0 (first step, last step), "
                                "got '2,1,0'")),
    ({"device": "cuda"}, "CUDA is not available"),
])
def test_bad_flags(tmp_path, monkeypatch, kwargs, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    args = {"prompts": "p.txt", "out_dir": "out", "checkpoint": "missing"} | kwargs
    with pytest.raises(sample_many.UsageError) as e:
        sample_many.main(**args)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["p.txt"], "nothing written"


def test_unreadable_prompt_file(tmp_path, monkeypatch):
    """(As root every file is readable: shown with reading failing as it does without permission.)"""
    (tmp_path / "p.txt").write_text("a cat\n")

    def refuse(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sample_many.Path, "read_bytes", refuse)
    with pytest.raises(sample_many.UsageError, match=r"p.txt: cannot read it \(Permission denied\)$"):
        sample_many.main(str(tmp_path / "p.txt"), str(tmp_path / "out"))


def test_unwritable_out_dir(tmp_path, monkeypatch):
    """(As root, os.access says yes to everything: the check is shown with os.access answering no.)"""
    (tmp_path / "p.txt").write_text("a cat\n")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(sample_many.UsageError, match=f"--out-dir {tmp_path / 'a' / 'b'}: {tmp_path} is not writable"):
        sample_many.main(str(tmp_path / "p.txt"), str(tmp_path / "a" / "b"))


def test_single_image_flags_need_prompts():
    with pytest.raises(sample.UsageError, match="--out-dir and --shard apply with --prompts FILE"):
        sample.main("a cat", out_dir="x")
    with pytest.raises(sample.UsageError, match="give a prompt, or --prompts FILE --out-dir DIR"):
        sample.main(None)


def test_command_line_bad_input_is_one_line_exit_2_nothing_written(files, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "seed": "1"}\n')
    (tmp_path / "a-file").write_text("")
    cases = {
        "bad line": ([sys.executable, "sample.py", "--prompts", str(tmp_path / "bad.jsonl"), "--out-dir",
                      str(tmp_path / "out")], 'bad.jsonl line 2: seed must be an integer in [0, 2**64), got "1"'),
        "out-dir a file": ([sys.executable, "sample.py", "--prompts", files["prompts"], "--out-dir",
                            str(tmp_path / "a-file")], "is a file; give a folder"),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(lambda c: subprocess.run(c[0], cwd=ROOT, capture_output=True, text=True,
                                                                     env={**os.environ, **ONE_THREAD}, timeout=120,
                                                                     check=False),
                                           cases.values())))
    for name, r in results.items():
        assert r.returncode == 2, f"{name}: exit code {r.returncode}, stderr {r.stderr[-2000:]}"
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and cases[name][1] in r.stderr, r.stderr
        assert "loaded" not in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["a-file", "bad.jsonl"], "nothing written"


def test_long_prompts_warn_once(files, tmp_path):
    """A prompt over CLIP's 77 tokens: one warning for the file, naming the lines, then truncated as CLIP does
    (the tokenizer's own warning, per batch, is not repeated)."""
    long = " ".join(["a photo of a cat sitting on the table"] * 12)
    prompts = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long}, {"prompt": "a dog"},
                                                    {"prompt": "a dog", "negative_prompt": long}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample_many.main(prompts, str(tmp_path / "out"), checkpoint=files["hub"], **FLAGS)
    messages = [str(w.message) for w in caught]
    assert messages == [("2 lines of the prompt file have a prompt longer than CLIP's 77 tokens: truncated, as CLIP "
                        "does (lines 1, 3)")], messages


def test_the_checkpoints_sampling_defaults_are_the_flags_defaults(files, tmp_path, capsys):
    """A converted file's sampling_defaults give the flags not given their values, as in sample.py: in the settings
    line (marked), in run.json and in every image's record; a flag given, or a line's own value, wins."""
    import train
    pipe = Amused.from_pretrained(files["hub"])
    pipe.sampling_defaults = {"steps": 2, "guidance_scale": 4.0}
    checkpoint = tmp_path / "recommends.safetensors"
    train.save_model(checkpoint, pipe)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog", "steps": 3}])
    sample_many.main(prompts, str(tmp_path / "out"), checkpoint=str(checkpoint), dtype="fp32", batch_size=2)
    printed = capsys.readouterr().out
    assert re.search(r"^  steps +2 \(checkpoint\)$", printed, re.M)
    assert re.search(r"^  guidance_scale +4\.0 \(checkpoint\)$", printed, re.M)
    records = [json.loads(line) for line in (tmp_path / "out" / sample_many.MANIFEST).read_text().splitlines()]
    assert [(r["steps"], r["guidance_scale"]) for r in records] == [(2, 4.0), (3, 4.0)]
    run = json.loads((tmp_path / "out" / sample_many.RUN_FILE).read_text())
    assert (run["steps"], run["guidance_scale"]) == (2, 4.0)
    sample_many.main(prompts, str(tmp_path / "out10"), checkpoint=str(checkpoint), dtype="fp32", guidance_scale=10.0)
    assert re.search(r"^  guidance_scale +10\.0$", capsys.readouterr().out, re.M)
    assert json.loads((tmp_path / "out10" / sample_many.RUN_FILE).read_text())["guidance_scale"] == 10.0
