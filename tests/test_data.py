"""Tests of data.py, what train.py trains on: folders, img2dataset tar shards, token shards, crops, the run order.

- folders: .txt captions, metadata.jsonl, a single image; unreadable images skipped with a warning;
- crops and micro-conditioning of non-square images;
- tars: read in place (the pixels are the image's), brace patterns; bad data (a member without a caption or an image,
  a corrupt JPEG, truncated tars, empty shards, a file that is not a tar) skipped, counted by kind and named, and a
  training run over it finishes with the counts in its log;
- the order: every example once per epoch for any number of processes, batch size and accumulation, the global batch
  independent of the split, shards mixed a window at a time, a folder's order the one train.py always had;
- token shards: train.py on prepare_data.py's shards of the same crops ends with the same weights as on the images;
  the view is the example's generator's; shards another VQ made, of another resolution, or missing, are refused;
- two gloo processes on tar shards, killed (SIGKILL) mid-epoch and resumed, end with the weights of an uninterrupted
  run, and each example is used exactly once per epoch (counted from the examples the processes load).
"""
import io
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, reference_pipeline, save_hub_checkpoint, smooth_images
from PIL import Image
from safetensors.torch import load_file

import data
import prepare_data
import train
from cli import UsageError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: fastest, and reproducible, on one thread

pytestmark = pytest.mark.usefixtures("one_thread")


def image_bytes(tensor, fmt="PNG") -> bytes:
    """(3, H, W) in [0, 1] -> an encoded image."""
    buf = io.BytesIO()
    Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def example_members(key: str, image: bytes, caption: str | None = "", ext: str = "png") -> list[tuple[str, bytes]]:
    """What img2dataset writes for one example: KEY.png, KEY.txt, KEY.json (caption None: no KEY.txt)."""
    members = [(f"{key}.{ext}", image)] + ([(f"{key}.txt", caption.encode())] if caption is not None else [])
    return members + [(f"{key}.json", json.dumps({"key": key}).encode())]


def write_tar_shards(folder: Path, images, sizes: list[int]) -> list[Path]:
    """Tars 00000.tar ... of `sizes` examples each, keys numbered through, caption "caption <key>"."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, n = [], 0
    for s, size in enumerate(sizes):
        members = []
        for key in range(n, n + size):
            members += example_members(f"{key:09d}", image_bytes(images[key]), f"caption {key:09d}")
        paths.append(write_tar(folder / f"{s:05d}.tar", members))
        n += size
    return paths


@pytest.fixture(scope="module", name="hub")  # named apart from its function, so that other modules can import it
def hub_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny random-weight checkpoint (32x32 images, 8x8 tokens, codebook 64) in the hub layout."""
    ref = reference_pipeline("tiny", tiny_tokenizer_dir, seed=5)
    return str(save_hub_checkpoint(ref, tmp_path_factory.mktemp("hub") / "tiny", tiny_tokenizer_dir))


def trained_weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: t for k, t in load_file(out / train.MODEL_FILE).items() if k.startswith("transformer.")}


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / train.LOG_FILE).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# Folders and crops


def write_png(tensor, path):
    path.write_bytes(image_bytes(tensor))
    return path


def test_folder_with_txt_captions_skips_bad_images(tmp_path):
    for name, image in zip(("cat", "dog"), smooth_images(2, 32, 40, seed=1)):
        write_png(image, tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"  a {name}\n")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (tmp_path / "corrupt.txt").write_text("never used")
    write_png(smooth_images(1, 32, 32, seed=3)[0], tmp_path / "uncaptioned.png")
    with pytest.warns(UserWarning) as record:
        source = data.find_source(str(tmp_path), None)
    messages = " | ".join(str(w.message) for w in record)
    assert "corrupt.png: skipped, not a readable image" in messages
    assert "uncaptioned.png: skipped, no caption" in messages
    assert source.problems.counts == {"unreadable image": 1, "no caption": 1}
    assert source.kind == "folder" and len(source.shards) == 1
    assert [(e.path.name, e.caption) for e in source.shards[0].examples] == [("cat.png", "a cat"), ("dog.png", "a dog")]
    # an image that breaks after the start: a warning and the next image, counted, not a crash
    run_order = data.Data(source.shards, 32, seed=0)
    (tmp_path / "cat.png").write_bytes(b"broken now")
    with pytest.warns(UserWarning, match="cat.png: skipped, could not read it"):
        loaded = [run_order.load(g).caption for g in range(4)]
    assert loaded == ["a dog"] * 4 and run_order.problems.counts == {"unreadable": 2}


def test_metadata_jsonl_and_single_image(tmp_path):
    (tmp_path / "imgs").mkdir()
    write_png(smooth_images(1, 32, 40, seed=1)[0], tmp_path / "imgs" / "a.png")
    (tmp_path / "a.txt").write_text("ignored: metadata.jsonl takes precedence")
    lines = [{"file_name": "imgs/a.png", "text": "a cat"}, {"file_name": "missing.png", "text": "x"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    with pytest.warns(UserWarning, match="missing.png not found: skipped"):
        examples = data.find_examples(str(tmp_path), None)
    assert [(e.path.name, e.caption) for e in examples] == [("a.png", "a cat")]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "imgs/a.png"}\n')
    with pytest.raises(UsageError, match="line 1: expected a JSON object with \"file_name\" and \"text\""):
        data.find_examples(str(tmp_path), None)

    image = str(tmp_path / "imgs" / "a.png")
    assert [(e.path.name, e.caption) for e in data.find_examples(image, "a [V] cat")] == [("a.png", "a [V] cat")]
    with pytest.raises(UsageError, match="give its caption with --prompt"):
        data.find_examples(image, None)
    with pytest.raises(UsageError, match="--prompt is for a single image"):
        data.find_examples(str(tmp_path), "a cat")
    with pytest.raises(UsageError, match="no such file or folder"):
        data.find_examples(str(tmp_path / "nope"), None)


@pytest.mark.parametrize("W, H", [(48, 32), (64, 96), (32, 32)])
def test_crop_and_micro_conditioning(W, H):
    """The shorter side resized to 32, a random 32x32 crop; micro-conds [orig W, orig H, top, left, 6]."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    resized = image.resize((32 * W // min(W, H), 32 * H // min(W, H)), Image.BILINEAR)
    corners = set()
    for seed in range(100):
        pixels, micro = data.process_image(image, 32, torch.Generator().manual_seed(seed))
        w, h, top, left, score = micro.tolist()
        assert (w, h, score) == (W, H, 6.0)
        assert 0 <= top <= resized.height - 32 and 0 <= left <= resized.width - 32
        assert (top == 0 or H > W) and (left == 0 or W > H), "the crop moves along the longer side only"
        crop = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
        assert pixels.shape == (3, 32, 32) and torch.equal(pixels, torch.from_numpy(crop).permute(2, 0, 1))
        corners.add((top, left))
    assert len(corners) == (1 if W == H else 17)  # all 17 possible crops occur over the 100 seeds


# ----------------------------------------------------------------------------------------------------
# Tar shards


def test_brace_patterns_and_source_errors(tmp_path):
    assert data.expand_braces("a/{00008..00011}.tar") == [f"a/{i:05d}.tar" for i in range(8, 12)]
    assert data.expand_braces("{x,y}-{1..2}.tar") == ["x-1.tar", "x-2.tar", "y-1.tar", "y-2.tar"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]
    images = smooth_images(3, 32, 32, seed=0)
    write_tar_shards(tmp_path / "tars", images, [1, 2])
    assert [p.name for p in data.tar_paths(str(tmp_path / "tars"))] == ["00000.tar", "00001.tar"]
    assert [p.name for p in data.tar_paths(str(tmp_path / "tars" / "{00001..00001}.tar"))] == ["00001.tar"]
    assert data.tar_paths(str(tmp_path / "tars" / "00000.tar"))[0].name == "00000.tar"
    for spec, message in [(f"{tmp_path}/tars/{{00000..00002}}.tar", "1 of its 3 shards do not exist"),
                          (f"{tmp_path}/tars/{{00002..00000}}.tar", "runs backwards")]:
        with pytest.raises(UsageError, match=message):
            data.find_source(spec, None)
    with pytest.raises(UsageError, match="tar and token shards hold their captions"):
        data.find_source(str(tmp_path / "tars"), "a cat")
    write_png(images[0], tmp_path / "tars" / "stray.png")
    with pytest.raises(UsageError, match="holds both .tar shards and images"):
        data.find_source(str(tmp_path / "tars"), None)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "00000.tar.gz").write_bytes(b"\x1f\x8b")
    for spec in (tmp_path / "gz", tmp_path / "gz" / "00000.tar.gz"):  # a folder of them, or one named
        with pytest.raises(UsageError, match="00000.tar.gz: compressed tars cannot be read at an offset; decompress"):
            data.find_source(str(spec), None)


def test_tar_members_are_read_in_place(tmp_path):
    """An example from a tar is the image's crop and the caption, exactly; KEY.json and a JPEG are read too."""
    images = smooth_images(5, 40, 48, seed=4)  # 48x40: crops move along the width
    write_tar_shards(tmp_path, images[:3], [3])
    write_tar(tmp_path / "00001.tar", [m for k in (3, 4) for m in
                                        example_members(f"./sub/{k:09d}", image_bytes(images[k], "JPEG"),
                                                        f" caption {k} \n", ext="JPG")])
    source = data.find_source(str(tmp_path), None)
    assert source.kind == "tar" and source.problems.counts == {} and [len(s) for s in source.shards] == [3, 2]
    assert source.shards[1].key(0) == "00001.tar/sub/000000003"
    for k, (s, i) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]):
        item = source.shards[s].item(i, 32, torch.Generator().manual_seed(k))
        fmt = "PNG" if k < 3 else "JPEG"
        pixels, micro = data.process_image(data.decode_image(image_bytes(images[k], fmt)), 32,
                                           torch.Generator().manual_seed(k))
        assert torch.equal(item.pixels, pixels) and torch.equal(item.micro, micro) and item.ids is None
        assert item.caption == f"caption {k:09d}" if k < 3 else f"caption {k}"
    assert data.webdataset_key("a/b.c/000.seg.png") == ("a/b.c/000", "seg.png")
    assert data.webdataset_key("noext") is None


def bad_tars(folder: Path) -> dict:
    """Tar shards with every kind of bad data, beside good examples; -> what is expected of them."""
    folder.mkdir()
    images = smooth_images(12, 32, 32, seed=8)
    good = [m for k in range(3) for m in example_members(f"{k:09d}", image_bytes(images[k]), f"caption {k}")]
    write_tar(folder / "00000.tar", good)
    jpeg = image_bytes(images[4], "JPEG")
    write_tar(folder / "00001.tar", example_members("000000003", image_bytes(images[3]), "caption 3")
              + example_members("000000004", jpeg, None, ext="jpg")  # no caption
              + [("000000005.txt", b"caption 5")]  # no image
              + example_members("000000006", jpeg[:len(jpeg) // 2], "caption 6", ext="jpg")  # a corrupt JPEG
              + example_members("000000007", image_bytes(images[7]), "caption 7"))
    whole = write_tar(folder / "00002.tar", [m for k in (8, 9, 10) for m in
                                            example_members(f"{k:09d}", image_bytes(images[k]), f"caption {k}")])
    tar_bytes = whole.read_bytes()
    with tarfile.open(whole) as tar:
        members = tar.getmembers()
    cut_in_data = members[6].offset_data + 10  # inside 000000010.png: 8 and 9 are whole
    whole.write_bytes(tar_bytes[:cut_in_data])
    (folder / "00003.tar").write_bytes(tar_bytes[:members[3].offset])  # cut at 9's first header: 8 whole
    (folder / "00004.tar").write_bytes(b"")  # an empty file
    write_tar(folder / "00005.tar", [])  # a tar without members
    (folder / "00006.tar").write_bytes(b"this is not a tar file at all" * 40)
    return {"counts": {"no caption": 1, "no image": 1, "truncated tar": 2, "empty shard": 2, "not a tar": 1},
            "keys": ["00000.tar/000000000", "00000.tar/000000001", "00000.tar/000000002", "00001.tar/000000003",
                     "00001.tar/000000006", "00001.tar/000000007", "00002.tar/000000008", "00002.tar/000000009",
                     "00003.tar/000000008"],
            "corrupt": "00001.tar/000000006"}


def test_bad_data_is_skipped_counted_and_named(tmp_path, hub, capsys):
    """Truncated tars, members without a caption or an image, empty shards, a file that is not a tar: skipped at the
    start, counted by kind, the first few named; a corrupt JPEG found mid-run is replaced by the next example of its
    shard and counted in every progress line after. A run over it all finishes."""
    expected = bad_tars(tmp_path / "bad")
    with pytest.warns(UserWarning) as record:
        source = data.find_source(str(tmp_path / "bad"), None)
    messages = [str(w.message) for w in record]
    assert len(messages) == data.MAX_NAMED + 1 and "further problems are counted, not named" in messages[-1]
    assert "00001.tar/000000004: skipped, no caption" in messages[0]
    assert source.problems.counts == expected["counts"], source.problems.counts
    assert [s.key(i) for s in source.shards for i in range(len(s))] == expected["keys"]
    assert [len(s) for s in source.shards] == [3, 3, 2, 1, 0, 0, 0]

    out = tmp_path / "run"
    n = len(expected["keys"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        steps = train.main(checkpoint=hub, data=str(tmp_path / "bad"), out=str(out), batch_size=3, max_steps=2 * n // 3,
                           log_every=n // 3, save_every=0, device="cpu")
    assert steps == 2 * n // 3
    assert any(re.match(f"{expected['corrupt']}: skipped, could not read it .*; using the next one of 00001.tar",
                        str(w.message)) for w in record)
    stdout = capsys.readouterr().out
    assert f"{'skipped':<24}2 empty shard, 1 no caption, 1 no image, 1 not a tar, 2 truncated tar" in stdout
    assert "9 examples in 7 tar shards" in stdout
    log = read_log(out)
    print(f"progress lines: {[(e['step'], e['unreadable']) for e in log]}")
    assert [e["unreadable"] for e in log] == [1, 2], "the corrupt JPEG, once per epoch, counted"
    assert "2 unreadable examples replaced so far" in stdout


# ----------------------------------------------------------------------------------------------------
# The run order


def epoch_examples(run_order: data.Data, batch_size: int, grad_accum: int, world: int, epochs: int) -> list[list]:
    """Per step, the (shard, example) pairs each process loads (as train.main asks for them), for `epochs` epochs."""
    G = batch_size * grad_accum * world
    steps = []
    for step in range(-(-epochs * len(run_order) // G)):
        loaded = []
        for rank in range(world):
            _, micro_batches = data.step_examples(step, batch_size, grad_accum, rank, world)
            loaded += [(g, run_order.index(g)) for batch in micro_batches for g in batch]
        steps.append(sorted(loaded))
    return steps


def test_each_example_once_per_epoch_for_any_split():
    """Uneven shards (one empty), a window of 2: for 1, 2 and 3 processes, with accumulation, every epoch visits
    every example exactly once; a step's global batch is the same however it is split."""
    shards = [list(range(size)) for size in (5, 0, 3, 7, 1, 4)]
    run_order = data.Data([FakeShard(k, s) for k, s in enumerate(shards)], 32, seed=3, window=2)
    N = len(run_order)
    assert N == 20
    reference = epoch_examples(run_order, 3, 2, 1, epochs=3)
    for batch_size, grad_accum, world in [(1, 1, 2), (2, 1, 3), (3, 2, 1), (1, 3, 2)]:
        steps = epoch_examples(run_order, batch_size, grad_accum, world, epochs=3)
        numbers = [x for step in steps for x in step]
        assert [g for g, _ in numbers] == list(range(len(numbers))), "each process takes other examples"
        for epoch in range(3):
            visited = Counter(ex for g, ex in numbers if epoch * N <= g < (epoch + 1) * N)
            assert visited == Counter((k, i) for k, s in enumerate(shards) for i in s), (world, epoch)
    flat = [ex for step in reference for _, ex in step]
    assert flat[:N] != flat[N:2 * N], "each epoch has its own order"
    for epoch in range(2):
        visits = [k for k, _ in flat[epoch * N:(epoch + 1) * N]]
        # the window: while a shard is being read, one other shard at most is read beside it...
        for k in set(visits):
            first, last = visits.index(k), len(visits) - 1 - visits[::-1].index(k)
            assert len(set(visits[first:last + 1])) <= 2, (epoch, visits)
        # ...and their examples are mixed, not read one shard after the other (4 switches between the 5 non-empty)
        switches = sum(a != b for a, b in itertools.pairwise(visits))
        print(f"epoch {epoch}: shards visited {visits}: {switches} switches")
        assert switches > 6


class FakeShard:
    """A shard of n examples, for the order alone."""

    def __init__(self, k, examples):
        self.name, self.n = f"{k:05d}", len(examples)

    def __len__(self):
        return self.n


def test_a_folder_keeps_its_order():
    """A folder is one shard: its run order is epoch_order's, as before shards, so its saved runs resume."""
    run_order = data.Data([FakeShard(0, range(10))], 32, seed=7)
    for epoch in range(3):
        assert [run_order.index(epoch * 10 + p)[1] for p in range(10)] == data.epoch_order(7, epoch, 10).tolist()


# ----------------------------------------------------------------------------------------------------
# Token shards in training


def test_training_on_token_shards_equals_training_on_the_images(tmp_path, hub):
    """prepare_data.py with one view of images at the model's resolution (one possible crop) stores the tokens the
    VQ makes of them in training; a run on those token shards ends with exactly the weights of the run on the tars.
    (Of larger images a run on images crops anew every epoch, a run on tokens picks one of the --views stored crops:
    the same distribution only as --views grows.)"""
    write_tar_shards(tmp_path / "tars", smooth_images(10, 32, 32, seed=11), [4, 3, 3])
    prepare_data.main(checkpoint=hub, data=str(tmp_path / "tars"), out=str(tmp_path / "tokens"), device="cpu")
    kw = {"checkpoint": hub, "batch_size": 2, "grad_accum": 2, "max_steps": 6, "lr": 1e-3, "log_every": 1,
          "save_every": 0, "device": "cpu", "shard_window": 2, "prompt_dropout": 0.2}
    train.main(data=str(tmp_path / "tars"), out=str(tmp_path / "from-images"), **kw)
    train.main(data=str(tmp_path / "tokens"), out=str(tmp_path / "from-tokens"), **kw)
    a, b = trained_weights(tmp_path / "from-images"), trained_weights(tmp_path / "from-tokens")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [e["loss"] for e in read_log(tmp_path / "from-images")]
    assert losses == [e["loss"] for e in read_log(tmp_path / "from-tokens")] and len(set(losses)) > 1


def test_token_view_is_the_examples_own(tmp_path, hub):
    """With several views the example's generator picks one, uniformly: the ids and micro-conditioning of that view."""
    write_tar_shards(tmp_path / "tars", smooth_images(2, 32, 64, seed=12), [2])
    prepare_data.main(checkpoint=hub, data=str(tmp_path / "tars"), out=str(tmp_path / "tokens"), views=3,
                      device="cpu")
    source = data.find_source(str(tmp_path / "tokens"), None)
    assert source.kind == "tokens" and source.describe() == "2 examples in 1 token shards, 3 views each"
    shard = source.shards[0]
    stored = load_file(shard.path)
    run_order = data.Data(source.shards, 32, seed=0)
    views = Counter()
    for g in range(300):
        item = run_order.load(g)
        v = int(torch.randint(0, 3, (1,), generator=data.example_generator(0, g, data.DATA_STREAM)))
        _, i = run_order.index(g)
        assert torch.equal(item.ids, stored["ids"][i, v].long()) and item.pixels is None
        assert item.micro.tolist() == [*stored["micro"][i, v].tolist(), data.AESTHETIC_SCORE]
        assert item.caption == f"caption {i:09d}"
        views[v] += 1
    assert min(views.values()) > 70, views
    assert len({tuple(stored["micro"][i, v].tolist()) for i in range(2) for v in range(3)}) > 2, "views differ"


def test_token_shards_that_do_not_fit_are_refused(tmp_path, hub, tiny_tokenizer_dir):
    write_tar_shards(tmp_path / "tars", smooth_images(3, 32, 32, seed=13), [1, 2])
    tokens = tmp_path / "tokens"
    prepare_data.main(checkpoint=hub, data=str(tmp_path / "tars"), out=str(tokens), device="cpu")
    other = save_hub_checkpoint(reference_pipeline("tiny", tiny_tokenizer_dir, seed=6), tmp_path / "other",
                                tiny_tokenizer_dir)
    run = {"data": str(tokens), "batch_size": 1, "max_steps": 1, "save_every": 0, "device": "cpu"}
    with pytest.raises(UsageError, match="the token shards were made at 32 px with VQ .*, but --checkpoint's VQ is "
                                         ".*: run prepare_data.py with this --checkpoint"):
        train.main(checkpoint=str(other), out=str(tmp_path / "o1"), **run)
    small = tmp_path / "small"
    prepare_data.main(checkpoint=hub, data=str(tmp_path / "tars"), out=str(small), resolution=16, device="cpu")
    with pytest.raises(UsageError, match="the U-ViT trains at 32 px, 8x8 tokens: run prepare_data.py with "
                                         "--resolution 32"):
        train.main(checkpoint=hub, out=str(tmp_path / "o2"), **{**run, "data": str(small)})
    (tokens / "tokens-00001-of-00002.safetensors").unlink()
    with pytest.raises(UsageError, match="1 of its 2 token shards are missing .*tokens-00001-of-00002.*run "
                                         "prepare_data.py again"):
        data.find_source(str(tokens), None)


# ----------------------------------------------------------------------------------------------------
# Two processes, killed and resumed

RECORDING_TRAIN = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
import data
record = open(os.environ["RECORD"] + "." + os.environ["RANK"], "a")
load = data.Data.load

def recording(self, number):  # which example each process loads, for the test to count
    if number == int(os.environ["KILL_AT"]):  # a hard kill, mid-step
        os.kill(os.getpid(), signal.SIGKILL)
    k, i = self.index(number)
    record.write(f"{{number}} {{self.shards[k].key(i)}}\\n")
    record.flush()
    return load(self, number)

data.Data.load = recording
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, args: list[str], record: Path, kill_at: int = -1) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the recording train.py under torchrun, 2 processes, in a session of its own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    env = {**os.environ, **ONE_THREAD, "RECORD": str(record), "KILL_AT": str(kill_at)}
    r = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True, env=env, start_new_session=True,
                       timeout=180)
    return r.returncode, r.stdout, r.stderr


def recorded(record: Path) -> list[tuple[int, str]]:
    return [(int(n), key) for rank in (0, 1) for n, key in
            (line.split() for line in Path(f"{record}.{rank}").read_text().splitlines())]


def test_two_processes_killed_mid_epoch_resume_to_the_same_weights(tmp_path, hub):
    """torchrun, 2 gloo processes, on 3 uneven tar shards (11 examples), batch 2 x 2 processes: 8 steps straight, and
    the same run killed with SIGKILL (no chance to save) inside its sixth step, mid-epoch, after saving step 5, then
    resumed: the same weights, bit for bit. The examples the processes loaded: each exactly once in every epoch."""
    write_tar_shards(tmp_path / "tars", smooth_images(11, 32, 40, seed=14), [5, 2, 4])
    script = tmp_path / "recording_train.py"
    script.write_text(RECORDING_TRAIN.format(root=str(ROOT), train=str(ROOT / "train.py")))
    common = ["--checkpoint", hub, "--data", str(tmp_path / "tars"), "--batch-size", "2", "--max-steps", "8",
              "--log-every", "1", "--lr", "1e-3", "--device", "cpu", "--shard-window", "2"]
    code, _, stderr = torchrun(script, [*common, "--out", str(tmp_path / "straight")], tmp_path / "straight-record")
    assert code == 0, stderr[-3000:]

    # rank 0 loads example 21 in step 5 (0-based; examples 20-23), after step 5's save and barrier: SIGKILL to it
    # (torchrun then ends the other process and fails)
    code, stdout, stderr = torchrun(script, [*common, "--out", str(tmp_path / "killed"), "--save-every", "1"],
                                    tmp_path / "killed-record", kill_at=21)
    print(stderr[-1500:])
    assert code != 0 and "Signal 9 (SIGKILL)" in stderr and "saved step 5:" in stdout and "step 6/" not in stdout
    saved = torch.load(tmp_path / "killed" / train.STATE_FILE, weights_only=True)["step"]
    assert saved == 5 and (saved * 4) % 11 != 0, "killed mid-epoch"
    code, stdout, stderr = torchrun(script, [*common, "--out", str(tmp_path / "killed"), "--resume"],
                                    tmp_path / "killed-record")
    assert code == 0, stderr[-3000:]
    assert f"{'start':<24}step {saved}, resumed" in stdout

    a, b = trained_weights(tmp_path / "straight"), trained_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run's weights differ"
    keys = [s.key(i) for s in data.find_source(str(tmp_path / "tars"), None).shards for i in range(len(s))]
    loads = recorded(tmp_path / "straight-record")
    assert sorted(n for n, _ in loads) == list(range(32)), "8 steps x 4 examples, each loaded by one process"
    for epoch in range(2):  # 32 examples: two whole epochs of 11, and 10 of the third
        used = Counter(key for n, key in loads if epoch * 11 <= n < (epoch + 1) * 11)
        assert used == Counter(keys), f"epoch {epoch}: {used}"
    assert len({key for n, key in loads if n >= 22}) == 10
    # the killed and resumed run loaded the same examples, the steps after the last save twice
    again = recorded(tmp_path / "killed-record")
    assert sorted(set(again)) == sorted(set(loads))
