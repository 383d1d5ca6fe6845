"""Tests of prepare_data.py, which encodes a data set into token shards once, on the tiny checkpoint.

- round trip: the stored ids are the VQ encoding of each view's crop (drawn by the image's own generator), uint16,
  with the crop's micro-conditioning, the caption and the key; undecodable images and members without a caption are
  skipped and counted in the shard's metadata;
- never lost work: a shard is written whole or not at all (an interruption mid-write leaves nothing); a second run
  skips the finished shards, untouched, and writes the rest; shards made with other settings are refused;
- processes: --shard 0/2 and 1/2 together write what one process writes;
- the command line: progress and a summary; bad arguments are one line `error: ...` with exit code 2.
"""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, smooth_images
from safetensors import safe_open
from safetensors.torch import load_file
from test_data import ONE_THREAD, bad_tars, example_members, hub_checkpoint, image_bytes, write_tar  # noqa: F401 (the fixture)

import data
import prepare_data
from amused import Amused
from cli import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def shard_contents(path):
    """(tensors, metadata) of a token shard."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    return load_file(path), meta


def texts(tensors, name):
    utf8, offsets = tensors[f"{name}_utf8"].numpy().tobytes(), tensors[f"{name}_offsets"].tolist()
    return [utf8[a:b].decode() for a, b in itertools.pairwise(offsets)]


def test_tokens_are_the_vq_encoding_of_each_views_crop(tmp_path, hub):
    """Two tars (one with a corrupt JPEG and a member without a caption), 3 views, VQ batches of 2 images: every
    stored view is the VQ's ids of that crop, encoded alone; uint16; the crop's micro-conditioning; captions, keys."""
    images = smooth_images(4, 32, 48, seed=21)  # 48x32: the crop moves along the width
    jpeg = image_bytes(images[3], "JPEG")
    write_tar(tmp_path / "00000.tar", [m for k in range(3) for m in
                                       example_members(f"{k:09d}", image_bytes(images[k]), f"caption {k}")])
    write_tar(tmp_path / "00001.tar", example_members("000000003", jpeg, "caption 3", ext="jpg")
              + example_members("000000004", jpeg[:200], "caption 4", ext="jpg")  # corrupt
              + example_members("000000005", jpeg, None, ext="jpg"))  # no caption
    with pytest.warns(UserWarning) as record:
        summary = prepare_data.main(checkpoint=hub, data=str(tmp_path), out=str(tmp_path / "tokens"), views=3,
                                    seed=5, batch_size=2, device="cpu")
    warned = " | ".join(str(w.message) for w in record)
    assert "00001.tar/000000004: skipped, not a readable image" in warned and "000000005: skipped, no caption" in warned
    assert summary["images"] == 4 and summary["written"] == 2
    assert summary["skipped"] == {"unreadable image": 1, "no caption": 1}

    vq = Amused.from_pretrained(hub).vqvae
    expected = {"000000000": images[0], "000000001": images[1], "000000002": images[2], "000000003": jpeg}
    for k, keys in [(0, ["000000000", "000000001", "000000002"]), (1, ["000000003"])]:
        tensors, meta = shard_contents(tmp_path / "tokens" / f"tokens-{k:05d}-of-00002.safetensors")
        assert tensors["ids"].dtype == torch.uint16 and tensors["ids"].shape == (len(keys), 3, 8, 8)
        assert tensors["micro"].dtype == torch.int32 and tensors["micro"].shape == (len(keys), 3, 4)
        assert texts(tensors, "key") == [f"{k:05d}.tar/{key}" for key in keys]
        assert texts(tensors, "caption") == [f"caption {int(key)}" for key in keys]
        assert meta == {"format": "amused-tokens", "version": "1", "vq": data.vq_fingerprint(vq), "resolution": "32",
                        "views": "3", "flips": "no", "seed": "5", "shards": "2", "codebook_size": "64",
                        "source": f"{k:05d}.tar",
                        "skipped": json.dumps({} if k == 0 else {"no caption": 1, "unreadable image": 1})}
        for i, key in enumerate(keys):
            source = expected[key]
            image = data.decode_image(source if isinstance(source, bytes) else image_bytes(source))
            generator = data.image_generator(5, f"{k:05d}.tar/{key}")
            pixels, micro = prepare_data.crops(image, 32, 3, generator)
            assert tensors["micro"][i].tolist() == micro.tolist()
            for v in range(3):
                ids = vq.encode_to_ids(pixels[v:v + 1])[0]
                assert torch.equal(tensors["ids"][i, v].long(), ids), f"{key} view {v}"
        assert tensors["micro"][0, 0, :2].tolist() == [48, 32]  # the original size
        assert len(set(tensors["micro"][:, :, 3].flatten().tolist())) > 1, "the views are other crops"


def test_interrupted_and_resumed_loses_nothing(tmp_path, hub, monkeypatch):
    """An interruption while a shard is written leaves no file; one during the second shard's encoding keeps the
    first whole; the same command then writes only what is missing, leaving the first untouched, and the shards
    equal a run that was never interrupted. Shards of other settings are refused."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(smooth_images(5, 32, 40, seed=22)):
        (folder / f"{i}.png").write_bytes(image_bytes(image))
        (folder / f"{i}.txt").write_text(f"photo {i}")
    run = {"checkpoint": hub, "data": str(folder), "shard_size": 2, "views": 2, "device": "cpu"}
    prepare_data.main(out=str(tmp_path / "whole"), **run)
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == [f"tokens-{k:05d}-of-00003.safetensors" for k in range(3)]

    out = tmp_path / "resumed"
    save = prepare_data.save_file

    def half_written(tensors, path, metadata):  # the process dies in the middle of writing the first shard
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main(out=str(out), **run)
    assert list(out.iterdir()) == [], "nothing half-written is left"
    monkeypatch.setattr(prepare_data, "save_file", save)

    encode = prepare_data.encode_shard
    calls = []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(*args, **kwargs)

    monkeypatch.setattr(prepare_data, "encode_shard", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main(out=str(out), **run)
    first = out / names[0]
    assert sorted(p.name for p in out.iterdir()) == names[:1]
    before = first.stat()
    monkeypatch.setattr(prepare_data, "encode_shard", encode)
    summary = prepare_data.main(out=str(out), **run)
    assert summary["written"] == 2 and summary["images"] == 3
    assert first.stat().st_mtime_ns == before.st_mtime_ns and first.stat().st_ino == before.st_ino
    for name in names:
        (a, meta_a), (b, meta_b) = shard_contents(tmp_path / "whole" / name), shard_contents(out / name)
        assert meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UsageError, match="tokens-00000-of-00003.safetensors was made with other settings \\(views was "
                                         "'2', now '1'\\): choose another --out"):
        prepare_data.main(out=str(out), **{**run, "views": 1})


def test_shares_of_processes_add_up_to_one_run(tmp_path, hub):
    """--shard 0/2 and 1/2 (each process's crops seeded by the image, not by who encodes it) = one process; bad tar
    data is counted in the shard it was in."""
    bad_tars(tmp_path / "bad")
    with pytest.warns(UserWarning):
        single = prepare_data.main(checkpoint=hub, data=str(tmp_path / "bad"), out=str(tmp_path / "one"), views=2,
                                   device="cpu")
    with pytest.warns(UserWarning):  # process 0 of 2 warns of what it skips
        halves = [prepare_data.main(checkpoint=hub, data=str(tmp_path / "bad"), out=str(tmp_path / "two"), views=2,
                                    shard=f"{i}/2", device="cpu") for i in (0, 1)]
    assert [h["written"] for h in halves] == [4, 3] and single["written"] == 7
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 7
    for name in names:
        (a, meta_a), (b, meta_b) = shard_contents(tmp_path / "one" / name), shard_contents(tmp_path / "two" / name)
        assert meta_a == meta_b and all(torch.equal(a[k], b[k]) for k in a)
    skipped = {}
    for name in names:
        for kind, n in json.loads(shard_contents(tmp_path / "one" / name)[1]["skipped"]).items():
            skipped[kind] = skipped.get(kind, 0) + n
    assert skipped == {"no caption": 1, "no image": 1, "truncated tar": 2, "empty shard": 2, "not a tar": 1,
                       "unreadable image": 1}
    assert single["images"] == 8 and np.isclose(single["bytes_per_example"], sum(
        (tmp_path / "one" / n).stat().st_size for n in names) / 8)


def test_command_line(tmp_path, hub):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_bytes(smooth_images(1, 32, 32, seed=23)[0]))
    (folder / "a.txt").write_text("a photo")
    cmd = [sys.executable, "prepare_data.py", "--checkpoint", hub, "--data", str(folder), "--out", str(tmp_path / "t"),
           "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True, env={**os.environ, **ONE_THREAD},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 of ~1 images (wrote tokens-00000-of-00001.safetensors: 1 examples, skipped none)" in r.stdout
    assert "done: 1 images encoded into 1 shards" in r.stdout
    for extra, message in [(["--shard", "2/2"],
                            "--shard must be i/n with 0 <= i < n, e.g. 0/4 for the first of 4 shares, got '2/2'"),
                           (["--views", "0"], "--views must be >= 1, got 0")]:
        r = subprocess.run(cmd + extra, cwd=ROOT, check=False, capture_output=True, text=True,
                           env={**os.environ, **ONE_THREAD}, timeout=120)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {message}\n")
