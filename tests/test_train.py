"""Tests of train.py on a tiny random-weight checkpoint in the hub layout (32x32 images, 8x8 tokens, codebook 64).

- the objective: masks drawn like the reference's, the loss equal to one computed with diffusers' UVit2DModel (and
  the reference's VQ and text encoder) on the same weights, masks and inputs;
- training works: a tiny model overfits two captioned images;
- the data (folders, tars, token shards, crops, order) is tested in test_data.py and test_prepare_data.py;
- safety: --resume is bit-exact on the CPU; Ctrl-C saves; two gloo processes give the single-process update;
  examples/slurm_train.sh starts one torchrun per node (srun stubbed) and adds --resume once there is a checkpoint;
- LoRA: only adapters train, merging agrees, the file reloads into the pipeline (ours and diffusers' key format);
- from scratch (--init-transformer): the new U-ViT is initialised as diffusers' UVit2DModel, trains, saves its config,
  and a config that does not fit, bad JSON, an unknown field or preset, or a changed config on --resume is refused;
- prompt dropout has probability p; gradient checkpointing keeps the gradients and stores fewer activations;
  every NO_DECAY name is a U-ViT parameter; --optimizer adamw8bit without bitsandbytes is a one-line error.
Not tested here: CUDA memory and speed (no GPU in CI), and 8-bit Adam itself (bitsandbytes needs CUDA).
"""
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    TINY_UVIT,
    assert_close,
    interrupt_at,
    perturb_,
    reference_pipeline,
    save_hub_checkpoint,
    seeded,
    smooth_images,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import cli
import train
import uvit
from amused import Amused
from convert_weights import load_checkpoint
from data import Data, find_source
from sampling import training_mask_count

MASK_ID = TINY_UVIT["vocab_size"] - 1
L = TINY_UVIT["sample_size"] ** 2  # 64 tokens per image
CAPTIONS = ["a photo of a cat", "a painting of a dog in the park"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # see test_sample.py: tiny models are fastest, and reproducible, on one thread


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models only


def write_png(tensor, path):
    """(3, H, W) in [0, 1] -> PNG file."""
    Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny hub checkpoint (and the diffusers pipeline it was saved from), and a folder of two captioned
    images: 40x32 and 32x48, so both crop directions occur."""
    root = tmp_path_factory.mktemp("train")
    ref = reference_pipeline("tiny", tiny_tokenizer_dir, seed=5)
    hub = save_hub_checkpoint(ref, root / "hub", tiny_tokenizer_dir)
    data = root / "data"
    data.mkdir()
    write_png(smooth_images(1, 32, 40, seed=1)[0], data / "cat.png")
    write_png(smooth_images(1, 48, 32, seed=2)[0], data / "dog.png")
    for name, caption in zip(["cat", "dog"], CAPTIONS):
        (data / f"{name}.txt").write_text(caption + "\n")
    # 32x32: one crop each, so the token grids are fixed and can be learnt by heart
    square = root / "square"
    square.mkdir()
    for i, (image, caption) in enumerate(zip(smooth_images(2, 32, 32, seed=7), CAPTIONS)):
        write_png(image, square / f"{i}.png")
        (square / f"{i}.txt").write_text(caption)
    return {"root": root, "ref": ref, "hub": str(hub), "data": str(data), "square": str(square)}


def run(files, out, **kw):
    """train.main on the tiny checkpoint and the two captioned images, quietly (no logging, no saving on the way)."""
    args = {"checkpoint": files["hub"], "data": files["data"], "out": str(files["root"] / out), "batch_size": 2,
            "max_steps": 4, "log_every": 1, "save_every": 0, "device": "cpu"}
    return train.main(**{**args, **kw})


def folder_data(folder, resolution, seed):
    """The run order of a folder's captioned images, as train.main builds it."""
    return Data(find_source(folder, None).shards, resolution, seed)


def read_log(files, out):
    return [json.loads(line) for line in (files["root"] / out / train.LOG_FILE).read_text().splitlines()]


def logits_of(transformer, ids, hidden, pooled, micro):
    """The U-ViT's logits, (B, K, h, w), for token ids and the text and micro-conditioning."""
    return transformer(ids, transformer.encode_conditions(hidden, pooled, micro))


def loss_of(transformer, ids, labels, hidden, pooled, micro, **kw):
    """train.training_loss, its conditions encoded from the text and micro-conditioning."""
    return train.training_loss(transformer, ids, labels, transformer.encode_conditions(hidden, pooled, micro), **kw)


def transformer_of(path):
    """The U-ViT weights of a saved full model file."""
    return {k.removeprefix("transformer."): t for k, t in load_file(path).items() if k.startswith("transformer.")}


# ----------------------------------------------------------------------------------------------------
# The objective


def reference_masking(ids, generator, mask_id, min_masking_rate=0.0):
    """The masking lines of diffusers' examples/amused/train_amused.py (with a generator for the draws)."""
    B, L = ids.shape
    timesteps = torch.rand(B, generator=generator)
    mask_prob = torch.cos(timesteps * math.pi * 0.5)
    mask_prob = mask_prob.clip(min_masking_rate)
    num_token_masked = (L * mask_prob).round().clamp(min=1)
    batch_randperm = torch.rand(B, L, generator=generator).argsort(dim=-1)
    mask = batch_randperm < num_token_masked.unsqueeze(-1)
    return torch.where(mask, mask_id, ids), torch.where(mask, ids, -100)


def test_masking_matches_reference_and_is_uniform():
    B, N = 4000, 8
    ids = torch.randint(0, 64, (B, N, N), generator=torch.Generator().manual_seed(0))
    for min_rate in (0.0, 0.3):
        ours = train.mask_tokens(ids, torch.Generator().manual_seed(1), MASK_ID, min_rate)
        ref = reference_masking(ids.view(B, -1), torch.Generator().manual_seed(1), MASK_ID, min_rate)
        assert torch.equal(ours[0].view(B, -1), ref[0]) and torch.equal(ours[1].view(B, -1), ref[1])
    input_ids, labels = ours
    masked = (input_ids == MASK_ID).view(B, -1)
    assert torch.equal(masked, (labels != train.IGNORE).view(B, -1)), "labels exactly at the masked positions"
    assert torch.equal(labels[labels != train.IGNORE], ids[labels != train.IGNORE])
    assert torch.equal(input_ids[~masked.view(B, N, N)], ids[~masked.view(B, N, N)]), "the rest unchanged"
    counts = masked.sum(1)
    assert counts.min() >= 1 and counts.max() == L
    # The count is the schedule's: replaying t gives it, and the sampler's schedule function gives the ratio
    t = torch.rand(B, generator=torch.Generator().manual_seed(1))
    assert torch.equal(counts, training_mask_count(t, L, 0.3))
    assert training_mask_count(torch.tensor([0.0, 0.5, 0.99999, 1.0]), L).tolist() == [64, 45, 1, 1]  # >= 1 at t = 1
    # Uniform over positions: given n masked, each position has probability n / L
    p = counts[:, None].float() / L
    expected, std = p.sum(0), (p * (1 - p)).sum(0).sqrt()
    z = (masked.sum(0) - expected) / std
    print(f"position frequency z-scores: max |z| {z.abs().max():.2f} over {L} positions")
    assert z.abs().max() < 4.5


def test_loss_equals_diffusers_uvit2d():
    """training_loss on our U-ViT = cross-entropy over the masked tokens of diffusers' UVit2DModel's logits, on
    the same state dict (strict), masks and inputs. fp32 on the CPU: we measure ~1e-7 relative; bound 1e-6."""
    from diffusers import UVit2DModel

    torch.manual_seed(0)
    ref = perturb_(UVit2DModel(**TINY_UVIT).eval(), seed=1)
    ours = uvit.UViT(uvit.config_from_hub(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    B = 6
    ids = torch.randint(0, 64, (B, 8, 8), generator=g)
    input_ids, labels = train.mask_tokens(ids, g, MASK_ID, 0.0)
    hidden, pooled = torch.randn(B, 77, 32, generator=g), torch.randn(B, 24, generator=g)
    micro = torch.tensor([[256.0, 384.0, 12.0, 0.0, 6.0]]).repeat(B, 1)

    loss = loss_of(ours, input_ids, labels, hidden, pooled, micro)
    logits = ref(input_ids, encoder_hidden_states=hidden, micro_conds=micro, pooled_text_emb=pooled)  # (B, K, 8, 8)
    logits = logits.reshape(B, 64, -1).permute(0, 2, 1).reshape(-1, 64)
    ref_loss = F.cross_entropy(logits, labels.view(-1), ignore_index=-100)
    # the same by hand: only masked positions count, each once
    m = labels.view(-1) != -100
    by_hand = -logits.log_softmax(-1)[m].gather(1, labels.view(-1)[m, None]).mean()
    all_positions = F.cross_entropy(logits, ids.view(-1))
    rel = abs(loss.item() - ref_loss.item()) / ref_loss.item()
    print(f"loss {loss.item():.6f}, diffusers {ref_loss.item():.6f}, relative diff {rel:.1e}; "
          f"over all positions it would be {all_positions.item():.6f}")
    assert rel < 1e-6
    assert abs(ref_loss.item() - by_hand.item()) < 1e-6 * ref_loss.item()
    # counting the unmasked positions too would be caught: 100x the tolerance (random weights: flat logits)
    assert abs(all_positions.item() - ref_loss.item()) > 1e-4 * ref_loss.item()
    n = (labels != -100).sum()
    summed = loss_of(ours, input_ids, labels, hidden, pooled, micro, reduction="sum")
    assert abs(summed.item() / n.item() - loss.item()) < 1e-6 * loss.item()
    smooth = loss_of(ours, input_ids, labels, hidden, pooled, micro, label_smoothing=0.1)
    ref_smooth = F.cross_entropy(logits, labels.view(-1), ignore_index=-100, label_smoothing=0.1)
    assert abs(smooth.item() - ref_smooth.item()) < 1e-6 * ref_smooth.item()


def test_training_batch_loss_equals_reference_computation(files):
    """A whole training batch (make_batch: crop, VQ tokens, masks, CLIP text) through our pipeline, against the
    reference script's computation with diffusers' VQModel, CLIPTextModelWithProjection and UVit2DModel."""
    ref = files["ref"]
    pipe = Amused.from_pretrained(files["hub"])
    data = folder_data(files["data"], pipe.resolution, seed=0)
    empty = pipe.encode_prompt([""])
    numbers = [0, 1, 2, 3]  # two epochs of two images: different crops and masks
    batch = train.make_batch(pipe, data, numbers, empty, 0.0, 0.0, "cosine")
    items = [data.load(g) for g in numbers]
    pixels, micro, captions = ([getattr(item, k) for item in items] for k in ("pixels", "micro", "caption"))
    # the counts the training loop normalises by, replayed without the images, are the batch's
    counts = (batch.labels != train.IGNORE).flatten(1).sum(1).tolist()
    assert counts == [train.example_mask_count(0, g, L, 0.0, "cosine") for g in numbers]
    with torch.no_grad():
        tokens = ref.vqvae.quantize(ref.vqvae.encode(torch.stack(pixels)).latents)[2][2].reshape(4, 8, 8)
        masked = batch.labels != train.IGNORE
        assert torch.equal(batch.input_ids, torch.where(masked, MASK_ID, tokens))
        assert torch.equal(batch.labels[masked], tokens[masked])
        text_ids = ref.tokenizer(list(captions), padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        out = ref.text_encoder(text_ids, return_dict=True, output_hidden_states=True)
        hidden, pooled = out.hidden_states[-2], out.text_embeds
        logits = ref.transformer(batch.input_ids, encoder_hidden_states=hidden, micro_conds=torch.stack(micro),
                                 pooled_text_emb=pooled)
        ref_loss = F.cross_entropy(logits.reshape(4, 64, -1).permute(0, 2, 1).reshape(-1, 64),
                                   batch.labels.view(-1), ignore_index=-100)
        loss = loss_of(pipe.transformer, batch.input_ids, batch.labels, batch.text_hidden, batch.pooled,
                                   batch.micro_conds)
    print(f"batch loss {loss.item():.6f}, reference {ref_loss.item():.6f}")
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * ref_loss.item()  # text encoder and VQ in the chain too


def test_prompt_dropout_has_probability_p(files):
    pipe = Amused.from_pretrained(files["hub"])
    data = folder_data(files["data"], pipe.resolution, seed=3)
    empty = pipe.encode_prompt([""])
    numbers = list(range(400))
    batches = {p: train.make_batch(pipe, data, numbers, empty, p, 0.0, "cosine") for p in (0.0, 0.5, 1.0)}
    # the dropout draw comes after the mask draws, so p changes nothing else
    assert all(torch.equal(b.input_ids, batches[0.0].input_ids) for b in batches.values())
    captions = pipe.encode_prompt([data.load(g).caption for g in numbers])
    for p, b in batches.items():
        dropped = (b.text_hidden == empty[0]).flatten(1).all(1)
        assert torch.equal(dropped, (b.pooled == empty[1]).all(1)), "hidden states and pooled dropped together"
        kept = ~dropped
        assert torch.equal(b.text_hidden[kept], captions[0][kept]) and torch.equal(b.pooled[kept], captions[1][kept])
        rate = dropped.float().mean().item()
        print(f"p = {p}: dropped {rate:.3f} of {len(numbers)}")
        assert abs(rate - p) < 0.075  # 3 standard deviations at p = 0.5, n = 400


# ----------------------------------------------------------------------------------------------------
# Training runs


def test_overfits_two_captioned_images(files):
    """100 full fine-tuning steps at lr 2e-3 on two 32x32 captioned images (about 3 s). We measure the mean loss
    of the first 5 steps 3.65 and of the last 5 0.20; the bound: the last below half the first."""
    steps = run(files, "overfit", data=files["square"], max_steps=100, lr=2e-3)
    assert steps == 100
    losses = [e["loss"] for e in read_log(files, "overfit")]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"loss: mean of the first 5 steps {first:.3f}, of the last 5 {last:.3f} (ln 64 = {math.log(64):.3f})")
    assert last < 0.5 * first
    # the saved model is a complete single file, loadable like a converted checkpoint
    pipe = Amused.from_pretrained(files["root"] / "overfit" / train.MODEL_FILE)
    assert pipe.resolution == 32
    base = load_checkpoint(files["hub"])
    for name in ("text_encoder", "vqvae"):  # frozen
        for k, t in getattr(base, name).state_dict().items():
            assert torch.equal(getattr(pipe, name).state_dict()[k], t), f"{name}.{k} changed"
    assert not torch.equal(pipe.transformer.state_dict()["mlm_layer.conv2.weight"],
                           base.transformer.state_dict()["mlm_layer.conv2.weight"])


def test_duration():
    assert [cli.duration(s) for s in (0.04, 59.9, 61, 3599, 3600, 9999.0)] == \
        ["0.0 s", "59.9 s", "1 min 1 s", "59 min 59 s", "1 h 0 min", "2 h 46 min"]


def test_progress_line_has_an_eta(files, capsys):
    """Every progress line tells the time left: at the pace of the steps so far, down to 0 at the last step. The
    ETA is printed only: log.jsonl keeps its keys."""
    assert cli.time_left(10.0, 2, 6) == "30.0 s" and cli.time_left(30.0, 1, 9) == "4 min 30 s"
    assert cli.time_left(0.0, 0, 5) == "?"
    run(files, "eta", max_steps=4)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    etas = [line.split(" ETA ")[1].split(" peak")[0] for line in lines]
    assert len(etas) == 4 and etas[-1] == "0.0 s", lines
    # a tiny step takes milliseconds: the time left may print as 0.0 s before the end; its form is what is checked
    assert all(re.fullmatch(r"\d+\.\d s", eta) for eta in etas), etas
    assert all(e.keys() == {"step", "loss", "lr", "images_per_s", "data_ms_per_step", "unreadable"}
               for e in read_log(files, "eta"))


def test_resume_is_bit_exact(files):
    """6 steps straight = 3 steps, stop, --resume to 6: every weight, the EMA, the optimizer moments and the loss
    scale, with fp16 loss scaling, gradient accumulation, warm-up and EMA all in play."""
    kw = {"batch_size": 1, "grad_accum": 2, "max_steps": 6, "warmup_steps": 4, "ema": True, "ema_decay": 0.9,
          "lr": 1e-3, "mixed_precision": "fp16", "prompt_dropout": 0.3, "label_smoothing": 0.1}
    run(files, "straight", **kw)
    assert run(files, "resumed", **{**kw, "max_steps": 3}) == 3
    with pytest.raises(train.UsageError, match="pass --resume"):
        run(files, "resumed", **kw)
    with pytest.raises(train.UsageError, match="batch_size was 1, now 2"):
        run(files, "resumed", **{**kw, "batch_size": 2}, resume=True)
    assert run(files, "resumed", **kw, resume=True) == 6
    a = torch.load(files["root"] / "straight" / train.STATE_FILE, weights_only=True)
    b = torch.load(files["root"] / "resumed" / train.STATE_FILE, weights_only=True)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))
    for k, s in a["optimizer"]["state"].items():
        assert all(torch.equal(s[n], b["optimizer"]["state"][k][n]) for n in s)
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    assert [e["loss"] for e in read_log(files, "straight")] == [e["loss"] for e in read_log(files, "resumed")]
    model_a = transformer_of(files["root"] / "straight" / train.MODEL_FILE)
    model_b = transformer_of(files["root"] / "resumed" / train.MODEL_FILE)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    # what is saved with --ema is the EMA, not the last weights
    assert not torch.equal(model_a["mlm_layer.conv2.weight"], a["params"]["mlm_layer.conv2.weight"])


def test_ctrl_c_saves_then_resumes(files):
    """A real SIGINT to `python train.py`: it finishes the step, saves, exits 130, and --resume continues."""
    out = files["root"] / "interrupted"
    cmd = [sys.executable, "train.py", "--checkpoint", files["hub"], "--data", files["data"], "--out", str(out),
           "--batch-size", "2", "--max-steps", "100000", "--log-every", "1", "--save-every", "0", "--device", "cpu"]
    code, stdout, stderr = interrupt_at(cmd, "step 3/", ONE_THREAD)
    assert code == 130, stderr
    assert "SIGINT: stopping after this step" in stdout and "interrupted at step" in stdout, stdout
    state = torch.load(out / train.STATE_FILE, weights_only=True)
    k = state["step"]
    assert k >= 3
    # resume one more step in this process; equal to k + 1 steps straight (on one thread, across processes)
    assert run(files, "interrupted", max_steps=k + 1, resume=True) == k + 1
    run(files, "uninterrupted", max_steps=k + 1)
    a = transformer_of(out / train.MODEL_FILE)
    b = transformer_of(files["root"] / "uninterrupted" / train.MODEL_FILE)
    assert all(torch.equal(a[key], b[key]) for key in a)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adam_moments_diff(run_a, run_b) -> float:
    """The largest difference of Adam's moments (exp_avg, exp_avg_sq) between two runs' checkpoint.pt, relative to
    each tensor's largest value."""
    sa, sb = (torch.load(r / train.STATE_FILE, weights_only=True)["optimizer"]["state"] for r in (run_a, run_b))
    return max(((sa[i][m] - sb[i][m]).abs().max() / sb[i][m].abs().max()).item()
               for i in sb for m in ("exp_avg", "exp_avg_sq") if sb[i][m].abs().max() > 0)


def test_two_process_ddp_equals_one_process(files):
    """torchrun, 2 gloo processes x batch 1 = 1 process x batch 2 (= 1 process x 2 accumulated micro-batches of 1),
    over 2 steps of AdamW. The gradients differ only in summation order (the all-reduce): Adam's moments, which hold
    them (exp_avg = 0.1 g after one step), agree to ~3e-6 of their largest value; bound 2e-5 (a wrong gradient scale,
    invisible in Adam's update, shows here).
    The weights: Adam's first update is lr * g / (|g| + eps), about lr * sign(g), so a 1e-9 difference in a gradient
    near zero moves a weight by up to ~lr * 1e-2; we measure 17 of 273,824 weights off by more than 1e-6, at most
    1.1e-5 (lr 1e-3). Bounds: 0.1% of the weights beyond 1e-6, none beyond 3e-5."""
    out = files["root"] / "ddp"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "train.py",
                        "--checkpoint", files["hub"], "--data", files["data"], "--out", str(out), "--batch-size", "1",
                        "--max-steps", "2", "--log-every", "1", "--lr", "1e-3", "--device", "cpu"],
                       cwd=ROOT, check=False, capture_output=True, text=True, env={**os.environ, **ONE_THREAD},
                       timeout=180)
    print(f"torchrun: {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("step 2/2") == 1, "rank 0 alone logs"
    assert "processes               2" in r.stdout
    run(files, "ddp-single", max_steps=2, lr=1e-3)
    a = transformer_of(out / train.MODEL_FILE)
    b = transformer_of(files["root"] / "ddp-single" / train.MODEL_FILE)
    base = load_checkpoint(files["hub"]).transformer.state_dict()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    n_off = sum(((a[k] - b[k]).abs() > 1e-6).sum().item() for k in a)
    n = sum(t.numel() for t in a.values())
    moved = min((b[k] - base[k]).abs().max().item() for k in b)
    moments = adam_moments_diff(out, files["root"] / "ddp-single")
    print(f"DDP vs single process: Adam moments differ by {moments:.1e} of their largest value; weights: max abs "
          f"diff {diff:.2e}, {n_off} of {n} beyond 1e-6; every tensor moved by >= {moved:.1e}")
    assert moments < 2e-5
    assert n_off < 1e-3 * n and diff < 3e-5 and moved > 1e-4
    # the same batch as 2 accumulated micro-batches of 1 in one process
    run(files, "accumulated", batch_size=1, grad_accum=2, max_steps=2, lr=1e-3)
    accumulated = adam_moments_diff(files["root"] / "accumulated", files["root"] / "ddp-single")
    print(f"--grad-accum 2 x 1 image vs 1 x 2 images: Adam moments differ by {accumulated:.1e}")
    assert accumulated < 2e-5
    losses = [json.loads(line)["loss"] for line in (out / train.LOG_FILE).read_text().splitlines()]
    assert np.allclose(losses, [e["loss"] for e in read_log(files, "ddp-single")], rtol=1e-6)


def test_ctrl_c_under_torchrun_saves(files):
    """Ctrl-C in a terminal signals the whole process group: torchrun, which forwards it to its workers, and the
    workers themselves. They must agree on the step to stop at, and rank 0 saves."""
    out = files["root"] / "ddp-interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "train.py",
                             "--checkpoint", files["hub"], "--data", files["data"], "--out", str(out),
                             "--batch-size", "1", "--max-steps", "100000", "--log-every", "1", "--save-every", "0",
                             "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD}, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert "interrupted at step" in stdout, stdout + stderr[-2000:]
    state = torch.load(out / train.STATE_FILE, weights_only=True)
    assert state["step"] >= 2 and state["resume_settings"]["world_size"] == 2
    with pytest.raises(train.UsageError, match="world_size was 2, now 1"):
        run(files, "ddp-interrupted", batch_size=1, max_steps=state["step"] + 1, resume=True)


SLURM_STUBS = {  # what examples/slurm_train.sh calls, recorded instead of run
    "srun": 'echo "OMP_NUM_THREADS=$OMP_NUM_THREADS $*" >> "$RECORD"\n',
    "scontrol": 'printf "gpu-a17\\ngpu-a18\\n"\n',
}


def test_slurm_script_starts_one_torchrun_per_node_and_resumes(tmp_path):
    """examples/slurm_train.sh with srun and scontrol stubbed: the torchrun command it starts (rendezvous at the
    first node, the node and GPU counts, threads per process), --resume added once --out holds a checkpoint, and a
    one-line error without --out or outside the project."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in SLURM_STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "srun.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "32",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": str(ROOT)}
    script = str(ROOT / "examples" / "slurm_train.sh")
    out = tmp_path / "run"

    def sbatch(*args, **changes):
        return subprocess.run(["bash", script, *args], cwd=tmp_path, check=False, capture_output=True, text=True,
                              env={**env, **changes}, timeout=30)

    for _ in range(2):
        r = sbatch("--data", "tokens/", "--out", str(out), "--batch-size", "32")
        assert r.returncode == 0, r.stderr
        out.mkdir(exist_ok=True)
        (out / train.STATE_FILE).write_bytes(b"")  # the first run saved
    first, second = record.read_text().splitlines()
    expected = ("OMP_NUM_THREADS=8 --kill-on-bad-exit=1 python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 "
                "--rdzv-backend c10d --rdzv-endpoint gpu-a17:29500 --rdzv-id 4242 --shutdown-timeout 240 train.py "
                f"--device cuda --data tokens/ --out {out} --batch-size 32")
    assert (first, second) == (expected, expected + " --resume")
    r = sbatch("--data", "tokens/")
    assert (r.returncode, r.stderr) == (2, "error: pass train.py's arguments, --out included\n")
    r = sbatch("--out", str(out), SLURM_SUBMIT_DIR=str(tmp_path))
    assert (r.returncode, r.stderr) == (2, f"error: no train.py in {tmp_path}: run sbatch from the amused folder\n")


# ----------------------------------------------------------------------------------------------------
# A new U-ViT from scratch (--init-transformer)


def small_uvit_config(**changes) -> uvit.UViTConfig:
    """A U-ViT smaller than the tiny checkpoint's (no down/upsampling, one layer), fitting its VQ and text encoder."""
    small = {"hidden_size": 48, "block_out_channels": 16, "num_res_blocks": 1, "downsample": False,
             "upsample": False, "num_hidden_layers": 1, "intermediate_size": 64}
    return dataclasses.replace(uvit.config_from_hub(TINY_UVIT), **{**small, **changes})


def write_config(path, cfg: uvit.UViTConfig) -> str:
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return str(path)


def test_new_uvit_is_initialised_as_diffusers(files):
    """The new U-ViT has exactly the weights of diffusers' UVit2DModel(**config) after torch.manual_seed(seed)."""
    from diffusers import UVit2DModel

    cfg = small_uvit_config()
    ckpt = train.with_new_transformer(load_checkpoint(files["hub"]), cfg, seed=3, source="test")
    torch.manual_seed(3)
    ref = UVit2DModel(**dataclasses.asdict(cfg)).state_dict()
    ours = ckpt.transformer.state_dict()
    assert ckpt.transformer.cfg == cfg and set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    other = train.with_new_transformer(load_checkpoint(files["hub"]), cfg, seed=4, source="test").transformer
    assert not torch.equal(other.state_dict()["embed.embeddings.weight"], ours["embed.embeddings.weight"])


def test_init_transformer_trains_from_scratch(files):
    """100 steps of a new, smaller U-ViT on the two 32x32 images (about 3.5 s). A new model's first loss is about
    ln 64 = 4.16 (we measure 4.28; bound 0.3 off); then it falls: we measure the mean of the first 5 steps 3.56, of
    the last 5 1.48; the bound: the last below 60% of the first. The saved file loads with the new config and the
    checkpoint's frozen VQ and text encoder; --resume refuses another config."""
    cfg = small_uvit_config()
    spec = write_config(files["root"] / "small-uvit.json", cfg)
    assert run(files, "scratch", data=files["square"], init_transformer=spec, max_steps=100, lr=5e-3) == 100
    losses = [e["loss"] for e in read_log(files, "scratch")]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"from scratch: first loss {losses[0]:.3f} (ln 64 = {math.log(64):.3f}); mean of the first 5 steps "
          f"{first:.3f}, of the last 5 {last:.3f}")
    assert abs(losses[0] - math.log(64)) < 0.3 and last < 0.6 * first
    pipe = Amused.from_pretrained(files["root"] / "scratch" / train.MODEL_FILE)
    assert pipe.transformer.cfg == cfg and pipe.resolution == 32
    base = load_checkpoint(files["hub"])
    for name in ("text_encoder", "vqvae"):  # frozen, and the checkpoint's
        for k, t in getattr(base, name).state_dict().items():
            assert torch.equal(getattr(pipe, name).state_dict()[k], t), f"{name}.{k} changed"
    assert pipe("a cat", generator=seeded(0), output_type="tokens").shape == (1, 8, 8)

    bigger = write_config(files["root"] / "bigger-uvit.json", small_uvit_config(hidden_size=64))
    with pytest.raises(train.UsageError, match="init_transformer.hidden_size was 48, now 64"):
        run(files, "scratch", data=files["square"], init_transformer=bigger, max_steps=101, resume=True)
    with pytest.raises(train.UsageError, match="init_transformer was {'hidden_size': 48, .*}, now None"):
        run(files, "scratch", data=files["square"], max_steps=101, resume=True)
    assert run(files, "scratch", data=files["square"], init_transformer=spec, max_steps=101, resume=True) == 101


def test_init_transformer_errors(files, tmp_path):
    """A config that does not fit the checkpoint, bad JSON, an unknown field or preset, or --lora: one clear line."""
    misfit = write_config(tmp_path / "misfit.json", small_uvit_config(encoder_hidden_size=16))
    with pytest.raises(train.CheckpointError, match="misfit.json with --checkpoint .*: the components do not fit "
                                                    "together: text encoder width 32 != transformer "
                                                    "encoder_hidden_size 16"):
        run(files, "misfit", init_transformer=misfit)
    with pytest.raises(train.CheckpointError, match="VQ codebook 64 != transformer codebook_size 32"):
        run(files, "misfit", init_transformer=write_config(tmp_path / "codebook.json",
                                                            small_uvit_config(codebook_size=32, vocab_size=40)))
    (tmp_path / "bad.json").write_text('{"hidden_size": 48,')
    (tmp_path / "unknown.json").write_text(json.dumps({**dataclasses.asdict(small_uvit_config()), "hidden": 4}))
    (tmp_path / "missing.json").write_text(json.dumps({"hidden_size": 48}))
    (tmp_path / "odd.json").write_text(json.dumps({**dataclasses.asdict(small_uvit_config()),
                                                   "num_attention_heads": 5}))
    for name, message in [("bad.json", "bad.json: Expecting"),
                          ("unknown.json", "unknown UVit2DModel config key 'hidden'"),
                          ("missing.json", "config is missing \\['block_num_heads'"),
                          ("odd.json", "num_attention_heads = 5 must divide hidden_size"),
                          ("amused-1024", ("amused-1024: neither a preset \\(amused-256, amused-512\\) nor a JSON "
                                           "file"))]:
        spec = name if name.startswith("amused") else str(tmp_path / name)
        with pytest.raises(train.UsageError, match=f"--init-transformer .*{message}"):
            train.transformer_config(spec)
    assert train.transformer_config("amused-512") == uvit.PRESETS["amused-512"]
    with pytest.raises(train.UsageError, match="--init-transformer trains a new U-ViT.*--lora"):
        run(files, "lora-scratch", init_transformer="amused-256", lora=True)
    # the command line: one line on stderr, exit code 2
    r = subprocess.run([sys.executable, "train.py", "--checkpoint", files["hub"], "--data", files["data"], "--out",
                        str(tmp_path / "o"), "--init-transformer", misfit, "--device", "cpu"],
                       cwd=ROOT, check=False, capture_output=True, text=True, env={**os.environ, **ONE_THREAD},
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --init-transformer ") and "encoder_hidden_size 16" in r.stderr


# ----------------------------------------------------------------------------------------------------
# LoRA


def test_lora_trains_only_adapters_and_merges(files):
    pipe = Amused.from_pretrained(files["hub"])
    before = {k: t.clone() for k, t in pipe.transformer.state_dict().items()}
    data = folder_data(files["data"], 32, seed=0)
    empty = pipe.encode_prompt([""])
    b = train.make_batch(pipe, data, [0, 1], empty, 0.0, 0.0, "cosine")
    with torch.no_grad():
        base_logits = logits_of(pipe.transformer, b.input_ids, b.text_hidden, b.pooled, b.micro_conds)
    torch.manual_seed(0)
    pipe.transformer.requires_grad_(True)  # whatever the loader left: LoRA mode must freeze the base model itself
    params = train.trainable_parameters(pipe.transformer, True, rank=4, alpha=8.0, targets=["to_q", "to_k", "to_v"])
    names = sorted({n.rsplit(".lora_", 1)[0] for n in params})
    n_attention = 2 * (TINY_UVIT["num_hidden_layers"] + 2 * TINY_UVIT["num_res_blocks"])  # attn1, attn2 each
    assert len(names) == 3 * n_attention and all(n.rsplit(".", 1)[1] in ("to_q", "to_k", "to_v") for n in names)
    assert len(params) == 2 * len(names) and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in params)
    opt = train.make_optimizer(params, "adamw", 1e-2, 0.01)
    for step in range(3):
        s = train.make_batch(pipe, data, [2 * step, 2 * step + 1], empty, 0.0, 0.0, "cosine")
        loss_of(pipe.transformer, s.input_ids, s.labels, s.text_hidden, s.pooled, s.micro_conds).backward()
        opt.step()
        opt.zero_grad()
    after = pipe.transformer.state_dict()
    for k, t in before.items():  # base weights: same values, LoRA-wrapped ones under base_layer
        key = k if k in after else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(after[key], t), f"{k} changed"
    assert all(after[f"{n}.lora_B.weight"].abs().max() > 0 for n in names), "every adapter trained"

    unmerged = loss_of(pipe.transformer, b.input_ids, b.labels, b.text_hidden, b.pooled, b.micro_conds)
    with torch.no_grad():
        logits = logits_of(pipe.transformer, b.input_ids, b.text_hidden, b.pooled, b.micro_conds)
        train.merge_lora(pipe.transformer)
        merged_logits = logits_of(pipe.transformer, b.input_ids, b.text_hidden, b.pooled, b.micro_conds)
    assert set(pipe.transformer.state_dict()) == set(before), "merged: the original module tree"
    # fp32: (W + s B A) x vs W x + s B (A x), a different summation order: we measure ~1e-6 on logits of size ~5
    assert_close("merged vs unmerged LoRA logits", merged_logits, logits, atol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-2, "the adapters changed nothing"
    assert unmerged.isfinite()


def test_lora_file_reloads_into_pipeline(files):
    """A LoRA run (bf16 autocast, gradient checkpointing, validation grid): a small file in diffusers' format that
    pipe.load_lora merges to exactly the trained adapters' effect, changing what the pipeline samples."""
    out = files["root"] / "lora"
    run(files, "lora", lora=True, lora_rank=4, lora_alpha=8.0, max_steps=3, lr=3e-2, mixed_precision="bf16",
        gradient_checkpointing=True, validation_prompts=["a cat", "a dog"], validate_every=3)
    assert Image.open(out / "validation-000003.png").size == (64, 32)
    path = out / train.LORA_FILE
    with safe_open(path, framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    config = json.loads(meta["lora_adapter_metadata"])
    assert config == {"transformer.r": 4, "transformer.lora_alpha": 8.0,
                      "transformer.target_modules": ["to_q", "to_k", "to_v"]}
    assert "transformer.transformer_layers.0.attn1.to_q.lora_A.weight" in keys
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    transformer_bytes = (ROOT / files["hub"] / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    print(f"LoRA file {path.stat().st_size} bytes, {len(keys)} tensors; the U-ViT's file {transformer_bytes} bytes")
    assert path.stat().st_size < 0.2 * transformer_bytes

    pipe = Amused.from_pretrained(files["hub"])
    tokens_before = pipe("a cat", generator=seeded(0), output_type="tokens")
    w0 = pipe.transformer.state_dict()["transformer_layers.0.attn1.to_q.weight"].clone()
    pipe.load_lora(path)
    w1 = pipe.transformer.state_dict()["transformer_layers.0.attn1.to_q.weight"]
    A = tensors["transformer.transformer_layers.0.attn1.to_q.lora_A.weight"]
    B = tensors["transformer.transformer_layers.0.attn1.to_q.lora_B.weight"]
    assert_close("merged weight", w1, w0 + (8.0 / 4) * B @ A, atol=1e-7)
    tokens_after = pipe("a cat", generator=seeded(0), output_type="tokens")
    changed = (tokens_after != tokens_before).float().mean().item()
    print(f"LoRA changed {changed:.0%} of the sampled tokens")
    assert changed > 0.1

    # the trained adapters, unmerged, on the training side give the same logits as the merged pipeline
    side = Amused.from_pretrained(files["hub"])
    train.add_lora(side.transformer, 4, 8.0, ["to_q", "to_k", "to_v"])
    side.transformer.load_state_dict({**side.transformer.state_dict(),
                                      **{k.removeprefix("transformer."): t for k, t in tensors.items()}}, strict=True)
    ids = torch.randint(0, 64, (2, 8, 8), generator=seeded(1))
    hidden, pooled = pipe.encode_prompt(["a cat", "a dog"])
    micro = torch.tensor([[32.0, 32.0, 0.0, 0.0, 6.0]] * 2)
    with torch.no_grad():
        assert_close("pipeline + load_lora vs LoRA modules", logits_of(pipe.transformer, ids, hidden, pooled, micro),
                     logits_of(side.transformer, ids, hidden, pooled, micro), atol=1e-5)


def test_diffusers_lora_file_loads(files, tmp_path):
    """A file as diffusers' AmusedLoraLoaderMixin.save_lora_weights writes it (train_amused.py --use_lora): no
    alpha in the metadata, so alpha = rank, as diffusers loads it. Bad files fail naming the file, changing nothing."""
    from diffusers.loaders.lora_pipeline import AmusedLoraLoaderMixin

    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, (out_f, in_f) in [("transformer_layers.1.attn2.to_v", (64, 64)),
                                ("up_block.attention_blocks.0.attn1.to_q", (32, 32))]:
        layers[f"{name}.lora_A.weight"] = torch.randn(3, in_f, generator=g)
        layers[f"{name}.lora_B.weight"] = torch.randn(out_f, 3, generator=g)
    AmusedLoraLoaderMixin.save_lora_weights(str(tmp_path), transformer_lora_layers=layers)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    pipe = Amused.from_pretrained(files["hub"])
    before = {k: t.clone() for k, t in pipe.transformer.state_dict().items()}
    pipe.load_lora(path, scale=0.5)
    after = pipe.transformer.state_dict()
    for name in ("transformer_layers.1.attn2.to_v", "up_block.attention_blocks.0.attn1.to_q"):
        expected = before[f"{name}.weight"] + 0.5 * layers[f"{name}.lora_B.weight"] @ layers[f"{name}.lora_A.weight"]
        assert_close(f"{name} merged", after[f"{name}.weight"], expected, atol=1e-6)
    assert sum(not torch.equal(after[k], before[k]) for k in before) == 2

    bad = {
        "module": ({"transformer.nope.to_q.lora_A.weight": torch.zeros(3, 64),
                    "transformer.nope.to_q.lora_B.weight": torch.zeros(64, 3)}, "nope.to_q \\(not a Linear layer"),
        "text_encoder": ({"text_encoder.x.lora_A.weight": torch.zeros(3, 4)}, "text-encoder LoRA is not supported"),
        "shape": ({"transformer.transformer_layers.0.attn1.to_q.lora_A.weight": torch.zeros(3, 32),
                   "transformer.transformer_layers.0.attn1.to_q.lora_B.weight": torch.zeros(64, 3)}, "do not fit"),
        "half": ({"transformer.transformer_layers.0.attn1.to_q.lora_A.weight": torch.zeros(3, 64)}, "but not lora_B"),
    }
    from safetensors.torch import save_file
    for name, (tensors, message) in bad.items():
        save_file({**tensors, **{f"transformer.{k}": v for k, v in layers.items()}}, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match=f"{name}.safetensors: not a LoRA file for this U-ViT: .*{message}"):
            pipe.load_lora(tmp_path / f"{name}.safetensors")
    now = pipe.transformer.state_dict()
    assert all(torch.equal(now[k], t) for k, t in after.items()), "a failed load changed weights"
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pipe.load_lora(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------------
# Memory, optimizer, schedule


def saved_bytes(fn):
    """Bytes of the tensors autograd stores for the backward pass while fn() runs (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_gradient_checkpointing_same_gradients_fewer_activations(files):
    pipe = Amused.from_pretrained(files["hub"])
    data = folder_data(files["data"], 32, seed=0)
    b = train.make_batch(pipe, data, [0, 1, 2, 3], pipe.encode_prompt([""]), 0.0, 0.0, "cosine")
    grads, stored = [], []
    for checkpointing in (False, True):
        model = Amused.from_pretrained(files["hub"]).transformer.train().requires_grad_(True)
        if checkpointing:
            train.enable_gradient_checkpointing(model)
        loss, nbytes = saved_bytes(functools.partial(loss_of, model, b.input_ids, b.labels, b.text_hidden, b.pooled,
                                                     b.micro_conds))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        stored.append(nbytes)
    print(f"activations stored for backward: {stored[0] / 2**20:.2f} MiB without checkpointing, "
          f"{stored[1] / 2**20:.2f} MiB with")
    for n, g0 in grads[0].items():
        assert torch.equal(grads[1][n], g0), f"{n}: gradients differ with checkpointing"
    assert stored[1] < 0.5 * stored[0]


def test_no_decay_names_uvit_parameters(files):
    """Each NO_DECAY entry is a parameter of the U-ViT, of both released configs and the tiny one, and those are the
    parameters the optimizer's no-decay group holds."""
    for cfg in [*uvit.PRESETS.values(), uvit.config_from_hub(TINY_UVIT)]:
        with torch.device("meta"):
            names = {n for n, _ in uvit.UViT(cfg).named_parameters()}
        assert set(train.NO_DECAY) <= names, sorted(set(train.NO_DECAY) - names)
    transformer = Amused.from_pretrained(files["hub"]).transformer
    params = dict(transformer.named_parameters())
    decay, no_decay = train.make_optimizer(params, "adamw", 1e-3, 0.01).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert {id(p) for p in no_decay["params"]} == {id(params[n]) for n in train.NO_DECAY}
    assert len(decay["params"]) == len(params) - len(train.NO_DECAY)


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(files, tmp_path):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(train.UsageError, match="pip install bitsandbytes"):
        run(files, "8bit", optimizer="adamw8bit")
    # the command line: one line on stderr, exit code 2, before any model is loaded
    r = subprocess.run([sys.executable, "train.py", "--checkpoint", str(tmp_path / "never-read"), "--data",
                        files["data"], "--out", str(tmp_path / "o"), "--optimizer", "adamw8bit"],
                       cwd=ROOT, check=False, capture_output=True, text=True, env={**os.environ, **ONE_THREAD},
                       timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: --optimizer adamw8bit needs bitsandbytes") and r.stderr.count("\n") == 1


def test_cosine_schedule_matches_diffusers_after_the_warm_up():
    """diffusers' get_cosine_schedule_with_warmup (the reference's --lr_scheduler cosine) after the warm-up; during it
    ours starts at lr / warmup_steps rather than 0 (the constant schedule's rule, test below)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    warmup, total, lr = 10, 50, 3e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [train.lr_at(s, lr, warmup, "cosine", total) for s in range(total)]
    assert ours[warmup:] == pytest.approx(want[warmup:], rel=1e-12, abs=1e-15)
    assert ours[:warmup] == pytest.approx([lr * (s + 1) / warmup for s in range(warmup)])
    assert want[warmup + 1] < want[warmup] and want[-1] < 0.01 * lr  # it decays, and nearly to 0


def test_lr_warmup_and_ema_match_reference():
    assert [train.lr_at(s, 1e-3, 4) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert train.lr_at(0, 1e-3, 0) == 1e-3
    from diffusers.training_utils import EMAModel

    params = [torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(0)))]
    ref = EMAModel(params, decay=0.99)
    ours = [params[0].detach().clone()]
    for step in range(20):
        with torch.no_grad():
            params[0].add_(torch.randn(5, generator=torch.Generator().manual_seed(step + 1)))
        ref.step(params)
        train.ema_update(ours, params, step, 0.99)
    assert_close("EMA after 20 updates", ours[0], ref.shadow_params[0], atol=1e-6)
