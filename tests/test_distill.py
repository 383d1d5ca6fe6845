"""distill.py (Di[M]O one-step distillation) and the pipeline's sampler="dimo" that draws its students.

The objective's pieces are checked against independent computations (the surrogate loss's gradient against
autograd of the forward KL it stands for, the re-masking counts against the reference's formula); a tiny run in
each mode (full, LoRA) must change the student and keep the teacher; --resume must be bit-exact on the CPU; Ctrl-C
must save; torchrun must run; and the student's file must draw in one step through the API, sample.py and the
playground without any sampling flag."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_nontrivial, interrupt_at, reference_pipeline, save_hub_checkpoint
from safetensors import safe_open

import distill  # noqa: E402
import playground  # noqa: E402
import sampling  # noqa: E402
from amused import Amused  # noqa: E402
import train  # noqa: E402
from convert_weights import CheckpointError, load_checkpoint  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROMPTS = ["a photo of a cat", "a photo of a dog", "a red house"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer_dir, one_thread):
    root = tmp_path_factory.mktemp("distill")
    hub = save_hub_checkpoint(reference_pipeline("tiny", tiny_tokenizer_dir, seed=3), root / "hub",
                              tiny_tokenizer_dir)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    return {"root": root, "hub": str(hub), "prompts": str(prompts)}


def run(files, out, **kw):
    args = {"teacher": files["hub"], "prompts": files["prompts"], "out": str(files["root"] / out), "batch_size": 2,
            "max_steps": 3, "warmup_steps": 1, "lr": 1e-3, "log_every": 1, "save_every": 0, "device": "cpu"}
    return distill.main(**{**args, **kw})


def transformer_of(path):
    return load_checkpoint(str(path)).transformer.state_dict()


# ----------------------------------------------------------------------------------------------------
# The objective


def test_surrogate_gradient_is_the_forward_kl_gradient():
    """With the auxiliary model's logits equal to the student's, the surrogate's gradient with respect to the
    logits must be that of sum over re-masked positions of KL(p_true || softmax(logits)) / B, by autograd."""
    torch.manual_seed(0)
    B, L, K = 3, 16, 11
    logits = torch.randn(B, L, K, requires_grad=True)
    true_logits = torch.randn(B, L, K)
    masked = torch.rand(B, 4, 4) < 0.5
    distill.distribution_matching_loss(logits, true_logits, logits.detach(), masked).backward()
    ref = logits.detach().clone().requires_grad_(True)
    kl = F.kl_div(ref.log_softmax(-1), true_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    (kl * masked.view(B, L)).sum().div(B).backward()
    assert_nontrivial("gradient", ref.grad)
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)  # float32 softmax rounding
    assert logits.grad[~masked.view(B, L)].abs().max() == 0


def test_reverse_and_mixed_divergence_gradients_by_autograd():
    """beta 1: the gradient of KL(softmax(logits) || p_true); beta 0.3: 0.7 forward + 0.3 reverse."""
    torch.manual_seed(1)
    logits, true_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    for beta in (1.0, 0.3):
        z = logits.clone().requires_grad_(True)
        p, log_p, log_q = z.softmax(-1), z.log_softmax(-1), true_logits.log_softmax(-1)
        reverse = (p * (log_p - log_q)).sum()
        forward = (log_q.exp() * (log_q - log_p)).sum()
        ((1 - beta) * forward + beta * reverse).backward()
        torch.testing.assert_close(distill.divergence_gradient(true_logits, logits, beta), z.grad, atol=1e-6,
                                   rtol=1e-5)
        assert_nontrivial("gradient", z.grad)


def test_remask_counts_follow_the_reference_formula():
    """get_mask_code: round(L * clamp(cos(pi/2 u), 0.02, 0.98)), at least 1, at random places."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8, (64, 8, 8))
    x_t, masked = distill.remask(tokens, 99, g)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(64, generator=g)
    expected = (64 * torch.cos(u * torch.pi / 2).clamp(0.02, 0.98)).round().clamp(min=1)
    assert torch.equal(masked.sum(dim=(1, 2)), expected.long())
    assert torch.equal(x_t[masked], torch.full_like(x_t[masked], 99)) and torch.equal(x_t[~masked], tokens[~masked])
    assert masked.float().mean(0).std() < 0.1  # no place preferred


def test_auxiliary_soft_target_is_the_kl_from_the_students_softmax():
    """alpha_fake: weight 1, the KL from the student's softmax to the auxiliary model's, mean over codes (as the
    reference), mean over the re-masked positions; 0, the hard cross-entropy on the drawn tokens; between, the mix."""
    torch.manual_seed(0)
    B, K, h, w = 3, 7, 4, 4
    fixed = torch.randn(B, K, h, w)
    tokens, probs = torch.randint(0, K, (B, h, w)), torch.randn(B, h * w, K).softmax(-1)

    def loss(soft):
        return distill.auxiliary_loss(lambda x_t, conds: fixed, tokens, probs, None, 99, soft,
                                      torch.Generator().manual_seed(0))

    _, masked = distill.remask(tokens, 99, torch.Generator().manual_seed(0))
    m = masked.view(B, -1)
    log_q = fixed.view(B, K, -1).permute(0, 2, 1).log_softmax(-1)
    per_position = ((probs * (probs.log() - log_q)).sum(-1) / K)[m]
    soft = per_position.mean()
    hard = F.cross_entropy(log_q[m], tokens.view(B, -1)[m], label_smoothing=distill.LABEL_SMOOTHING)
    assert_nontrivial("the soft loss per position", per_position)
    torch.testing.assert_close(loss(1.0), soft)
    torch.testing.assert_close(loss(0.0), hard)
    torch.testing.assert_close(loss(0.25), 0.25 * soft + 0.75 * hard)


def test_adaptive_guidance_ramps_with_the_masked_fraction():
    """adaptive_cfg: 1 + (guidance - 1) * the fraction re-masked, per image; off: the scale for every image."""
    masked = torch.zeros(3, 4, 4, dtype=torch.bool)
    masked[0, :2] = True  # 8 of 16
    masked[2] = True
    adaptive = distill.guidance_scales(distill.Objective(guidance=5.0, adaptive_guidance=True), masked)
    assert torch.equal(adaptive, torch.tensor([3.0, 1.0, 5.0]))
    assert torch.equal(distill.guidance_scales(distill.Objective(guidance=5.0), masked), torch.full((3,), 5.0))


def test_dimo_start_draws_codes_masks_and_noise(files):
    pipe = Amused.from_pretrained(files["hub"])
    t = pipe.transformer
    K, L = t.cfg.codebook_size, t.cfg.sample_size ** 2
    tokens, (scale, noise) = sampling.dimo_start(6, *(t.cfg.sample_size,) * 2, t, pipe.mask_id,
                                                 torch.Generator().manual_seed(1), torch.device("cpu"))
    assert scale == sampling.DIMO_EMBEDDING_NOISE
    masked = tokens == pipe.mask_id
    assert torch.equal(masked.sum(dim=(1, 2)), torch.full((6,), round(L * sampling.DIMO_START_MASKED)))
    codes = tokens[~masked]
    assert codes.min() >= 0 and codes.max() < K and len(codes.unique()) > 10
    assert noise.shape == (6, t.cfg.block_out_channels, *tokens.shape[1:]) and abs(noise.std() - 1) < 0.1
    # a list of generators: each image as drawn alone
    alone = sampling.dimo_start(1, *tokens.shape[1:], t, pipe.mask_id, torch.Generator().manual_seed(7), "cpu")
    batch = sampling.dimo_start(2, *tokens.shape[1:], t, pipe.mask_id,
                                [torch.Generator().manual_seed(s) for s in (5, 7)], "cpu")
    assert torch.equal(batch[0][1], alone[0][0]) and torch.equal(batch[1][1][1], alone[1][1][0])


def test_dimo_start_from_logits_draws_each_positions_codes_none_masked(files):
    """--start prior's start: the codes at each position follow the softmax of its logits (frequencies over many
    images against the probabilities, independent of the inverse-CDF draw), none masked; the random draws are the
    uniform start's, in the same order (the embedding noise is the same numbers)."""
    pipe = Amused.from_pretrained(files["hub"])
    t = pipe.transformer
    K, s = t.cfg.codebook_size, t.cfg.sample_size
    probs = torch.zeros(s, s, K)
    probs[..., 3], probs[..., 5] = 0.25, 0.75  # every position: code 3 or 5
    probs[0, 0] = 0.0
    probs[0, 0, K - 1] = 1.0  # one position sure of the last code (the clamp of the inverse CDF's top end)
    B = 4000
    tokens, (_, noise) = sampling.dimo_start(B, s, s, t, pipe.mask_id, torch.Generator().manual_seed(2), "cpu",
                                             probs.log())
    assert not (tokens == pipe.mask_id).any()
    assert (tokens[:, 0, 0] == K - 1).all()
    rest = tokens.view(B, -1)[:, 1:]
    assert set(rest.unique().tolist()) == {3, 5}
    share = (rest == 5).float().mean(0)  # (L - 1,) per position: binomial, std sqrt(.25 * .75 / 4000) = 0.007
    assert (share - 0.75).abs().max() < 0.04
    _, (_, uniform_noise) = sampling.dimo_start(B, s, s, t, pipe.mask_id, torch.Generator().manual_seed(2), "cpu")
    assert torch.equal(noise, uniform_noise)


def test_start_distribution_stretches_the_layout_to_another_grid():
    logits = torch.randn(2, 3, 7)
    probs = sampling.start_distribution(logits, 4, 6).view(4, 6, 7)
    expected = logits.softmax(-1).repeat_interleave(2, 0).repeat_interleave(2, 1)  # nearest: each cell 2 x 2
    assert_nontrivial("probabilities", probs)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(sampling.start_distribution(logits, 2, 3), logits.softmax(-1).view(6, 7))


def test_dimo_sampler_is_one_pass_with_the_noise_at_the_first_step_only(files, monkeypatch):
    pipe = Amused.from_pretrained(files["hub"])
    calls = []
    forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward",
                        lambda ids, conds, noise=None: calls.append((ids.shape[0], noise is not None)) or
                        forward(ids, conds, noise))
    tokens = pipe(PROMPTS[:2], steps=1, guidance_scale=1.0, sampler="dimo", output_type="tokens",
                  generator=torch.Generator().manual_seed(0))
    assert calls == [(2, True)] and not (tokens == pipe.mask_id).any()
    calls.clear()
    pipe(PROMPTS[:2], steps=3, guidance_scale=4.0, sampler="dimo", output_type="tokens",
         generator=torch.Generator().manual_seed(0))
    assert calls == [(4, True), (4, False), (4, False)]  # guided: [negative; prompts], noise on both halves
    # per-image generators: an image as drawn alone
    one = pipe(PROMPTS[1], steps=2, guidance_scale=1.0, sampler="dimo", output_type="tokens",
               generator=[torch.Generator().manual_seed(4)])
    two = pipe(PROMPTS[:2], steps=2, guidance_scale=1.0, sampler="dimo", output_type="tokens",
               generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    assert torch.equal(one[0], two[1])


# ----------------------------------------------------------------------------------------------------
# Runs


def test_full_run_learns_and_writes_a_one_step_pipeline(files, capsys):
    assert run(files, "full") == 3
    out = files["root"] / "full"
    log = [json.loads(line) for line in (out / distill.LOG_FILE).read_text().splitlines()]
    assert len(log) == 3 and all(e["student_loss"] > 0 and e["fake_loss"] > 0 for e in log)
    assert "ETA" in capsys.readouterr().out
    teacher, student = transformer_of(files["hub"]), transformer_of(out / distill.MODEL_FILE)
    moved = [k for k in teacher if not torch.equal(teacher[k], student[k])]
    assert moved and all(not k.startswith(distill.FROZEN) for k in moved)  # embed and mlm_layer stay the teacher's
    state = torch.load(out / distill.STATE_FILE, weights_only=True)
    fake = state["fake"]["params"]
    assert any(not torch.equal(fake[k], teacher[k]) for k in fake)  # the auxiliary model learnt too
    with safe_open(str(out / distill.MODEL_FILE), "pt") as f:
        assert json.loads(f.metadata()["sampling_defaults"]) == distill.STUDENT_DEFAULTS


def test_the_reference_options_change_the_run_and_the_students_defaults(files):
    """true_temp, adaptive_cfg, alpha_fake and gen_temp each change what the student learns (the same seed
    otherwise); the student's file carries the temperature it was trained to draw at."""
    if not (files["root"] / "full" / distill.MODEL_FILE).is_file():
        run(files, "full")
    plain = transformer_of(files["root"] / "full" / distill.MODEL_FILE)
    options = dict(teacher_temperature=0.5, adaptive_guidance=True, auxiliary_soft=1.0, student_temperature=0.5)
    for name, value in options.items():
        assert run(files, f"option-{name}", **{name: value}) == 3
        out = files["root"] / f"option-{name}" / distill.MODEL_FILE
        other = transformer_of(out)
        assert any(not torch.equal(plain[k], other[k]) for k in plain), name
        with safe_open(str(out), "pt") as f:
            defaults = json.loads(f.metadata()["sampling_defaults"])
        assert defaults == (dict(distill.STUDENT_DEFAULTS, softmax_temperature=0.5)
                            if name == "student_temperature" else distill.STUDENT_DEFAULTS)
    with pytest.raises(distill.UsageError, match="--teacher-temperature and --student-temperature must be > 0"):
        run(files, "bad", teacher_temperature=0.0)


def test_prior_start_travels_in_the_students_file_and_the_sampler_draws_from_it(files, monkeypatch, tmp_path):
    """--start prior: the file carries the teacher's logits for an all-masked grid and the empty prompt (computed
    here through the teacher's pipeline itself), the student learns from that start (it differs from the uniform
    start's student), the pipeline loads them, and sampler "dimo" draws its first input from them."""
    assert run(files, "prior", start="prior") == 3
    out = files["root"] / "prior" / distill.MODEL_FILE
    teacher = Amused.from_pretrained(files["hub"])
    s = teacher.transformer.cfg.sample_size
    conds = teacher.conditions([""], None, 1, False, (teacher.resolution,) * 2, 6.0, (0, 0))
    expected = teacher.transformer(torch.full((1, s, s), teacher.mask_id), conds)[0].permute(1, 2, 0)
    student = Amused.from_pretrained(str(out))
    assert_nontrivial("start logits", student.start_logits)
    torch.testing.assert_close(student.start_logits, expected, atol=0, rtol=0)  # the same float32 computation
    if not (files["root"] / "full" / distill.MODEL_FILE).is_file():
        run(files, "full")
    plain = transformer_of(files["root"] / "full" / distill.MODEL_FILE)
    prior = transformer_of(out)
    assert any(not torch.equal(plain[k], prior[k]) for k in plain)
    assert Amused.from_pretrained(files["root"] / "full" / distill.MODEL_FILE).start_logits is None
    # the sampler's start: a file whose logits are sure of one code per position gives exactly those codes
    sure = torch.full_like(student.start_logits, -1e4)
    codes = torch.arange(s * s).view(s, s) % sure.shape[-1]
    sure.scatter_(-1, codes[..., None], 0.0)
    student.start_logits = sure
    seen = []
    forward = student.transformer.forward
    monkeypatch.setattr(student.transformer, "forward",
                        lambda ids, conds, noise=None: seen.append(ids.clone()) or forward(ids, conds, noise))
    student(PROMPTS[:2], **student.sampling_defaults, output_type="tokens", seed=0)
    assert len(seen) == 1 and torch.equal(seen[0], codes.expand(2, s, s))
    # saved and read back by train.save_model / load_checkpoint; a file with malformed logits names the problem
    train.save_model(tmp_path / "sure.safetensors", student)
    assert torch.equal(Amused.from_pretrained(tmp_path / "sure.safetensors").start_logits, sure)
    student.start_logits = sure[..., :5]
    train.save_model(tmp_path / "bad.safetensors", student)
    with pytest.raises(CheckpointError, match="dimo.start_logits must be .h, w, codebook size"):
        Amused.from_pretrained(tmp_path / "bad.safetensors")
    with pytest.raises(distill.UsageError, match="--start must be one of uniform, prior"):
        run(files, "bad", start="gaussian")


def test_student_gradient_is_clipped_in_bf16_only(files, monkeypatch):
    """As the reference: the student's gradient norm clipped at 1 under mixed precision, never in fp32; the
    auxiliary model's never."""
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, **kw: clipped.append(max_norm) or clip(params, max_norm, **kw))
    assert run(files, "fp32", max_steps=2) == 2 and clipped == []
    assert run(files, "bf16", max_steps=2, mixed_precision="bf16") == 2 and clipped == [distill.MAX_GRAD_NORM] * 2


def test_lora_run_shares_the_teachers_weights(files):
    pipe = Amused.from_pretrained(files["hub"])
    t = pipe.transformer.requires_grad_(False)
    student, params = distill.trainable_copy(t, True, 4, 4.0, ["to_q", "to_k", "to_v"])
    assert params and all(".lora_" in n for n in params)
    shared = dict(t.named_parameters())
    q = "transformer_layers.0.attn1.to_q"
    assert student.get_submodule(q).base_layer.weight.data_ptr() == shared[q + ".weight"].data_ptr()
    assert student.embed.embeddings.weight.data_ptr() == shared["embed.embeddings.weight"].data_ptr()

    before = transformer_of(files["hub"])
    run(files, "lora", lora=True, lora_rank=4, lora_alpha=4.0, lr=1e-2)
    out = files["root"] / "lora"
    after = transformer_of(out / distill.MODEL_FILE)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v") for k in changed), changed
    student_state = torch.load(out / distill.STATE_FILE, weights_only=True)["student"]["params"]
    assert all(".lora_" in k for k in student_state)  # the checkpoint holds the adapters only


def test_resume_is_bit_exact(files):
    run(files, "straight", max_steps=4, ema=True, ema_decay=0.9)
    run(files, "resumed", max_steps=2, ema=True, ema_decay=0.9)
    assert run(files, "resumed", max_steps=4, ema=True, ema_decay=0.9, resume=True) == 4
    a = transformer_of(files["root"] / "straight" / distill.MODEL_FILE)
    b = transformer_of(files["root"] / "resumed" / distill.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(distill.UsageError, match="batch_size was 2, now 1"):
        run(files, "resumed", max_steps=5, batch_size=1, ema=True, ema_decay=0.9, resume=True)


def test_bad_input_is_one_clear_error(files, tmp_path):
    with pytest.raises(distill.UsageError, match="--prompts FILE"):
        run(files, "bad", prompts=None)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(distill.UsageError, match="holds no prompt"):
        run(files, "bad", prompts=str(empty))
    with pytest.raises(distill.UsageError, match="no such file"):
        run(files, "bad", prompts=str(tmp_path / "missing.txt"))
    r = subprocess.run([sys.executable, "distill.py", "--teacher", files["hub"], "--prompt", "x", "--out",
                        str(tmp_path / "o"), "--lr", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --lr"), r.stderr


def test_ctrl_c_saves_then_resumes(files):
    out = files["root"] / "interrupted"
    cmd = [sys.executable, "distill.py", "--teacher", files["hub"], "--prompts", files["prompts"], "--out", str(out),
           "--batch-size", "2", "--max-steps", "100000", "--log-every", "1", "--save-every", "0", "--device", "cpu"]
    code, stdout, stderr = interrupt_at(cmd, "step 2/", ONE_THREAD)
    assert code == 130, stderr
    assert "interrupted at step" in stdout, stdout
    assert torch.load(out / distill.STATE_FILE, weights_only=True)["step"] >= 2
    assert (out / distill.MODEL_FILE).is_file()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(files):
    """2 gloo processes, each drawing its own prompts and starts: they run the same steps, rank 0 alone logs and
    saves, and the run ends cleanly."""
    out = files["root"] / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "distill.py",
                        "--teacher", files["hub"], "--prompts", files["prompts"], "--out", str(out),
                        "--batch-size", "1", "--max-steps", "2", "--log-every", "1", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("step 2/2") == 1 and "processes               2" in r.stdout
    assert (out / distill.MODEL_FILE).is_file()


# ----------------------------------------------------------------------------------------------------
# The student's file: one step, no flags


def test_student_draws_in_one_step_through_api_cli_and_page(files, tmp_path):
    student = files["root"] / "full" / distill.MODEL_FILE
    if not student.is_file():
        run(files, "full")
    pipe = Amused.from_pretrained(str(student))
    assert pipe.sampling_defaults == distill.STUDENT_DEFAULTS
    steps = []
    images = pipe(PROMPTS[0], **pipe.sampling_defaults, callback=lambda step, tokens: steps.append(step))
    assert steps == [0] and len(images) == 1

    r = subprocess.run([sys.executable, "sample.py", PROMPTS[0], "--checkpoint", str(student), "--out",
                        str(tmp_path / "one.png"), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **ONE_THREAD}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "one.png").is_file()
    settings = r.stdout + r.stderr
    assert "1 step" in settings and "dimo" in settings, settings

    # the page: a generation posted with no sampling settings runs the student's
    page = playground.Playground(pipe, tmp_path / "page", str(student))
    settings = playground.check_settings({"prompt": PROMPTS[0]}, page.max_steps, page.defaults)
    assert settings.step_counts == [1] and settings.sampler.name == "dimo" and settings.guidance_scale <= 1
