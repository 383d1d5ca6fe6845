"""examples/digits.py, the short version: every stage runs, the VQ's reconstruction and the U-ViT's loss fall, and
the checkpoint loads and samples (through the API and sample.py). Also the judge's own pieces against independent
references. The full run, whose figures the README quotes, is a script, not a test (~10 minutes)."""
import json
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
import vqgan  # noqa: E402
from amused import Amused  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("digits") / "run"
    return out, digits.main(str(out), recipe="quick", seed=0)


def test_every_stage_runs_and_learns(quick_run):
    out, results = quick_run
    for name in ("model.safetensors", "results.json", "results.md", "start.safetensors", "uvit.json",
                 "data/metadata.jsonl", "train/log.jsonl"):
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


def test_a_second_run_into_the_same_folder_is_refused(quick_run):
    out, _ = quick_run
    with pytest.raises(digits.cli.UsageError, match="holds a run already"):
        digits.main(str(out), recipe="quick")


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
