"""examples/digits.py, the short version: every stage runs, the VQ's reconstruction and the U-ViT's loss fall, and
the checkpoint loads and samples (through the API and sample.py); the run's pictures are drawn, and
digits_figures.py draws the page's from the finished run without training; --resume skips what is done and, after a
Ctrl-C in the U-ViT's training, finishes to the same weights. Also the judge's own pieces against independent
references. The full run, whose figures the README quotes, is a script, not a test (~9 minutes)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT / "examples"))
pytest.importorskip("sklearn", reason="examples/digits.py needs scikit-learn (requirements-dev.txt)")

import digits  # noqa: E402
import digits_figures  # noqa: E402
import vqgan  # noqa: E402
from amused import Amused  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("digits") / "run"
    return out, digits.main(str(out), recipe="quick", seed=0)


def test_every_stage_runs_and_learns(quick_run):
    out, results = quick_run
    for name in ("model.safetensors", "results.json", "results.md", "start.safetensors", "uvit.json",
                 "data/metadata.jsonl", "train/log.jsonl", "run.json"):
        assert (out / name).is_file(), name
    assert len((out / "data" / "metadata.jsonl").read_text().splitlines()) == 1347  # 75% of 1,797

    # the VQ learnt: its held-out reconstruction beats an untrained VQ's by far, and it uses most of its codebook
    x_train, _, x_test, _ = digits.load_digits(0)
    torch.manual_seed(0)
    untrained = digits.vq_report(vqgan.VQModel(digits.VQ), digits.to_images(x_test))
    held_out = results["vq"]["held out"]
    print(f"held-out reconstruction MSE: trained {held_out['mse']:.4f}, untrained {untrained['mse']:.4f}; "
          f"perplexity {held_out['perplexity']:.1f}, unused {held_out['unused']}")
    assert held_out["mse"] < untrained["mse"] / 4
    assert held_out["perplexity"] > digits.VQ.num_vq_embeddings / 4

    # the U-ViT learnt: train.py's logged loss fell from about ln(codebook size), a uniform guess
    losses = [json.loads(line)["loss"] for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    uniform = np.log(digits.VQ.num_vq_embeddings)
    print(f"U-ViT loss: {losses[0]:.3f} -> {losses[-1]:.3f} (a uniform guess: {uniform:.3f})")
    assert losses[0] > 0.8 * uniform and losses[-1] < losses[0] - 0.3

    # every judged figure is there and is a number where it should be
    assert 0.95 <= results["judge_on_real_held_out"] <= 1
    for key in ("12 steps, guidance 10", "12 steps, guidance 4"):
        r = results[key]
        assert 0 <= r["accuracy"] <= 1 and len(r["per_class"]) == 10 and r["diversity"] >= 0 and r["frechet"] > 0
    assert len(results["accuracy by steps, guidance"]) == len(digits.STEP_COUNTS) * len(digits.GUIDANCES)


def test_the_checkpoint_loads_and_samples(quick_run, tmp_path):
    out, _ = quick_run
    pipe = Amused.from_pretrained(out / "model.safetensors")
    assert pipe.resolution == digits.RESOLUTION and pipe.transformer.cfg == digits.UVIT
    images = pipe("a handwritten digit 7", steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert images.shape == (1, 3, 16, 16) and images.std() > 0
    png = tmp_path / "seven.png"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "a handwritten digit 7", "--checkpoint",
                        str(out / "model.safetensors"), "--out", str(png), "--steps", "4", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert Image.open(png).size == (16, 16)


def test_the_run_draws_its_pictures_enlarged(quick_run):
    """samples.png: a label and ten samples in a row per digit; unmasking.gif: the ten digits, a frame per step;
    each 16 px digit drawn 8x (and framed: 3 px a side)."""
    out, _ = quick_run
    cell = digits.RESOLUTION * digits_figures.SCALE + 6
    assert Image.open(out / "samples.png").size == (11 * cell, 10 * cell)
    gif = Image.open(out / "unmasking.gif")
    assert gif.width == 10 * cell and gif.height > cell and gif.n_frames == 12


def test_a_second_run_into_the_same_folder_is_refused(quick_run, tmp_path):
    out, _ = quick_run
    with pytest.raises(digits.cli.UsageError, match="holds a run already: add --resume"):
        digits.main(str(out), recipe="quick")
    with pytest.raises(digits.cli.UsageError, match="--recipe was quick, now full"):
        digits.main(str(out), recipe="full", resume=True)
    with pytest.raises(digits.cli.UsageError, match="holds no run to finish"):
        digits.main(str(tmp_path / "none"), recipe="quick", resume=True)


def test_resuming_a_finished_run_does_no_work(quick_run, monkeypatch):
    out, results = quick_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run worked again")

    for module, name in ((digits, "load_digits"), (digits, "fit_judge"), (digits, "train_vq"), (digits, "evaluate"),
                         (digits.train, "main"), (digits_figures, "samples_grid"), (digits_figures, "unmasking_gif")):
        monkeypatch.setattr(module, name, no_work)
    assert digits.main(str(out), recipe="quick", resume=True) == results
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_resume_after_ctrl_c_in_the_uvit_training(quick_run, tmp_path, monkeypatch, one_thread):
    """The quick run's first four stages, then its U-ViT training stopped by a real SIGINT at step 20: train.py
    saves, digits.py stops (KeyboardInterrupt, with the time spent kept); --resume skips the stages done, continues
    the training from step 21, and ends with the uninterrupted run's weights and figures."""
    out, results = quick_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("train", "model.safetensors", "results.*", "samples.png",
                                                            "unmasking.gif"))
    record = json.loads((run / "run.json").read_text())
    for stage in ("U-ViT", "judge the drawings", "pictures"):
        del record["seconds"][stage]
    (run / "run.json").write_text(json.dumps(record))

    step_once = digits.train.optimizer_step

    def ctrl_c_at_step_20(state, lr, step, *args):
        step_once(state, lr, step, *args)
        if step + 1 == 20:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(digits.train, "optimizer_step", ctrl_c_at_step_20)
    with pytest.raises(KeyboardInterrupt):
        digits.main(str(run), recipe="quick", resume=True)
    monkeypatch.undo()
    assert torch.load(run / "train" / "checkpoint.pt", weights_only=True)["step"] == 20
    assert not (run / "model.safetensors").exists()
    interrupted = json.loads((run / "run.json").read_text())["interrupted"]["U-ViT"]
    assert interrupted > 0

    resumed = digits.main(str(run), recipe="quick", resume=True)
    a, b = load_file(out / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("12 steps, guidance 10", "12 steps, guidance 4", "accuracy by steps, guidance", "vq"):
        assert resumed[key] == results[key], key
    assert resumed["seconds"]["U-ViT"] > interrupted
    assert resumed["seconds"]["tokenizer"] == record["seconds"]["tokenizer"]  # not trained again
    steps = [json.loads(line)["step"] for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(6, 61, 6))  # each logged once: steps 1-20 in the first session, 21-60 in the second


def test_figures_are_drawn_from_a_finished_run(quick_run, tmp_path):
    """digits_figures.py --run DIR --out FOLDER: no training; the pictures into FOLDER, the page beside it with
    links that resolve; docs/how-it-works.md untouched."""
    out, _ = quick_run
    page = ROOT / "docs" / "how-it-works.md"
    before = page.read_bytes() if page.exists() else None
    written = digits_figures.draw(out, tmp_path / "figures")
    assert written == (tmp_path / "figures.md").resolve()
    text = written.read_text()
    links = [line.split("](./")[1].split(")")[0] for line in text.splitlines() if line.startswith("![")]
    assert sorted(links) == sorted(f"figures/{name}" for name in digits_figures.PICTURES)
    assert all((tmp_path / link).stat().st_size > 0 for link in links)
    assert (page.read_bytes() if page.exists() else None) == before
    with pytest.raises(digits.cli.UsageError, match="not a finished digits run"):
        digits_figures.draw(tmp_path, tmp_path / "nothing")


def test_frechet_distance_against_scipy():
    """Our eigendecomposition route against scipy's general matrix square root, on correlated data."""
    from scipy import linalg

    g = np.random.default_rng(0)
    a = g.normal(size=(400, 8)) @ g.normal(size=(8, 8))
    b = g.normal(size=(300, 8)) @ g.normal(size=(8, 8)) + 0.5
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert want > 1 and abs(digits.frechet_distance(a, b) - want) < 1e-6 * want
    assert abs(digits.frechet_distance(a, a)) < 1e-6


def test_diversity_catches_a_collapsed_model():
    """One drawing per class, whatever the seed: diversity 0, where the real digits of a class score 1."""
    x_train, y_train, x_test, y_test = digits.load_digits(0)
    judge = digits.fit_judge(x_train, y_train)
    one_per_class = np.stack([x_test[y_test == k][0] for k in range(10)])  # (10, 64)
    labels = np.tile(np.arange(10), 5)
    collapsed = digits.judge_samples(judge, one_per_class[labels], labels, x_test, y_test)
    real = np.concatenate([x_test[y_test == k] for k in range(10)])
    real_labels = np.concatenate([np.full((y_test == k).sum(), k) for k in range(10)])
    honest = digits.judge_samples(judge, real, real_labels, x_test, y_test)
    assert collapsed["accuracy"] == 1.0 and collapsed["diversity"] == 0.0
    assert abs(honest["diversity"] - 1.0) < 1e-9 and honest["accuracy"] > 0.95


def test_digits_precision_judges_each_precision(quick_run):
    """examples/digits_precision.py on the quick model: each precision drawn and judged from the same seed; fp32
    (exact) is its own baseline, and bf16 draws other tokens only where its rounding changes a choice."""
    import digits_precision

    out, _ = quick_run
    results = digits_precision.main(str(out / "model.safetensors"), ["fp32", "bf16"], per_class=2)
    for guidance in digits_precision.GUIDANCES:
        assert results["fp32"][guidance]["tokens_equal_to_fp32"] == 1.0
        if isinstance(results["bf16"], dict):
            assert 0 <= results["bf16"][guidance]["accuracy"] <= 1
            assert 0 < results["bf16"][guidance]["tokens_equal_to_fp32"] <= 1
    with pytest.raises(digits.cli.UsageError, match="no such file"):
        digits_precision.main(str(out / "missing.safetensors"), ["fp32"])


def test_digits_samplers_judges_each_setting_per_pass(quick_run, tmp_path):
    """examples/digits_samplers.py on the quick model: a cell per setting x guidance x steps, each FOUND setting
    once at its own; passes counted as the loop runs them (a guided step 2, an unguided 1); the tables and the
    picture written."""
    import digits_samplers

    out, _ = quick_run
    figure = tmp_path / "samplers.png"
    results = digits_samplers.main(str(out / "model.safetensors"), ["reference", "interval", "fewest passes"], [2, 4],
                                   [4.0], [0], per_class=2, out=str(tmp_path / "r.json"), figure=str(figure))
    cells = results["cells"]
    assert sorted(cells) == ["fewest passes | 8 | 3", "interval | 4 | 2", "interval | 4 | 4", "reference | 4 | 2",
                             "reference | 4 | 4"]
    assert [cells[k]["passes"] for k in sorted(cells)] == [4, 3, 6, 4, 8]
    assert all(0 <= c["accuracy"] <= 1 and c["frechet"] > 0 for c in cells.values())
    assert json.loads((tmp_path / "r.json").read_text())["cells"].keys() == cells.keys()
    table = digits_samplers.tables(results)
    assert "| reference | 0." in table and "| fewest passes | " in table
    width, height = Image.open(figure).size  # two panels side by side, 8 steps wide, 10 digits tall
    assert width > height > 0
    with pytest.raises(digits.cli.UsageError, match="unknown setting 'nope'"):
        digits_samplers.main(str(out / "model.safetensors"), ["nope"], [2], [4.0], [0])


def test_digits_distill_distils_judges_and_draws(quick_run, tmp_path, monkeypatch):
    """examples/digits_distill.py on the quick model, a few distillation steps: every row judged with its passes,
    the verdict read off the table, the picture drawn; a rerun finds the finished student and trains nothing."""
    import digits_distill

    out, _ = quick_run
    monkeypatch.setattr(digits_distill, "RECIPE", dict(digits_distill.RECIPE, max_steps=3, warmup_steps=1,
                                                       save_every=0, log_every=1))
    teacher, student = str(out / "model.safetensors"), tmp_path / "student"
    results = digits_distill.main(teacher, str(student), per_class=2, seeds=[0])
    cells = results["cells"]
    assert list(cells) == [name for name, _, _ in digits_distill.rows()]
    assert [c["passes"] for c in cells.values()] == [24, 24, 1, 4, 1, 1, 2, 4]
    assert all(0 <= c["accuracy"] <= 1 and c["frechet"] > 0 and 0 <= c["implausible"] <= 1 for c in cells.values())
    assert set(results["verdict"].values()) <= {True, False} and results["distill_seconds"] > 0
    assert "| implausible tokens |" in (student / "results.md").read_text()
    assert Amused.from_pretrained(student / "model.safetensors").sampling_defaults["steps"] == 1
    assert Image.open(student / "teacher-vs-student.png").size[0] > 0 and (student / "results.md").is_file()
    monkeypatch.setattr(digits_distill.distill, "main", lambda *a, **k: pytest.fail("trained again"))
    again = digits_distill.main(teacher, str(student), per_class=2, seeds=[0])
    assert again["distill_seconds"] == results["distill_seconds"]
    with pytest.raises(digits.cli.UsageError, match="no such file"):
        digits_distill.main(str(tmp_path / "missing.safetensors"), str(student))
    # the diagnosis counts every token: none under a threshold of 0, all under one above 1
    pipe = Amused.from_pretrained(teacher)
    tokens = pipe(digits.CAPTIONS[:3], steps=2, output_type="tokens", generator=torch.Generator().manual_seed(0))
    for threshold, share in ((0.0, 0.0), (1.01, 1.0)):
        monkeypatch.setattr(digits_distill, "IMPLAUSIBLE", threshold)
        assert digits_distill.implausible_share(pipe, tokens, digits.CAPTIONS[:3]) == share
