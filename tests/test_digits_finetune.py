"""examples/digits_finetune.py, the short version: on examples/digits.py's quick model, a LoRA and a full fine-tune of
a few steps run through train.py and are judged (the LoRA unloaded bit for bit after); the judge's pieces on real
digits; the bold captions' premise, which a style word placed before the digit breaks. The measured run, whose
figures the README quotes, is a script, not a test."""
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
pytest.importorskip("sklearn", reason="examples/digits_finetune.py needs scikit-learn (requirements-dev.txt)")

import digits  # noqa: E402
import digits_finetune  # noqa: E402
from amused import Amused  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("digits") / "run"
    digits.main(str(out), recipe="quick", seed=0)
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def split():
    return digits.load_digits(0)


def test_bold_thickens_every_stroke_by_a_pixel():
    image = torch.zeros(1, 3, 16, 16)
    image[..., 5, 5] = 0.5
    thick = digits_finetune.bold(image)
    assert torch.equal(thick[0, 0].nonzero(), torch.tensor([[4, 4], [4, 5], [5, 4], [5, 5]]))
    assert thick.max() == 0.5
    real = digits.to_images(digits.load_digits(0)[0][:50])
    assert (digits_finetune.bold(real) >= real).all() and digits_finetune.bold(real).sum() > 1.2 * real.sum()


def test_the_judge_tells_bold_from_plain_and_reads_bold_digits(split):
    judge = digits_finetune.fit_judges(*split)
    real = digits_finetune.read(judge, judge.x_test, judge.bold_test, judge.y_test)
    print(real)
    assert real["style"] > 0.97 and real["leak"] < 0.02  # bold held-out called bold, plain ones not
    assert real["bold_accuracy"] > 0.95 and real["accuracy"] > 0.95
    assert abs(real["frechet"]) < 1e-3 and abs(real["bold_frechet"]) < 1e-3  # each set against itself


def test_verdict_thresholds():
    before = {"style": 0.05, "bold_accuracy": 0.5, "accuracy": 0.95, "frechet": 200.0, "leak": 0.02}
    good = {"style": 0.95, "bold_accuracy": 0.92, "accuracy": 0.93, "frechet": 240.0, "leak": 0.06}
    assert digits_finetune.verdict(before, good) == {"learnt": True, "kept": True}
    assert digits_finetune.verdict(before, {**good, "style": 0.85}) == {"learnt": False, "kept": True}
    assert digits_finetune.verdict(before, {**good, "leak": 0.1}) == {"learnt": True, "kept": False}
    assert digits_finetune.verdict(before, {**good, "accuracy": 0.91}) == {"learnt": True, "kept": False}
    assert digits_finetune.verdict(before, {**good, "frechet": 260.0}) == {"learnt": True, "kept": False}


def test_the_style_word_last_keeps_the_digit_captions_hidden_states(base, monkeypatch):
    """The causal text encoder gives "a handwritten digit k bold" the hidden states of "a handwritten digit k" on
    its first tokens; "a bold handwritten digit k" changes them all, digit included, and is refused."""
    pipe = Amused.from_pretrained(base)
    digits_finetune.check_captions(pipe)
    monkeypatch.setattr(digits_finetune, "STYLE_CAPTIONS", [f"a bold handwritten digit {k}" for k in range(10)])
    with pytest.raises(digits.cli.UsageError, match="does not keep the original captions' hidden states"):
        digits_finetune.check_captions(pipe)


def test_a_quick_run_fine_tunes_and_judges_both(base, tmp_path):
    out = tmp_path / "bold"
    results = digits_finetune.main(str(base), str(out), per_class=2, steps=3)
    rows = results["rows"]
    assert list(rows) == ["real held-out digits", "held-out digits through the VQ", "before", "lora", "full"]
    for row in rows.values():
        assert all(0 <= row[k] <= 1 for k in ("style", "bold_accuracy", "accuracy", "leak"))
        assert row["frechet"] >= 0 and row["bold_frechet"] >= 0
    for mode in ("lora", "full"):
        assert isinstance(rows[mode]["learnt"], bool) and rows[mode]["seconds"] > 0
        assert rows[mode]["recipe"]["steps"] == 3
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # the data: every training digit under its caption, and the recipe's share of them bold under the bold ones
    share, n = digits_finetune.RECIPES["full"].bold, len(digits.load_digits(0)[0])
    captions = (out / f"data-bold{share:g}" / "metadata.jsonl").read_text()
    assert captions.count(" bold\"") == round(share * n) and captions.count("\n") == n + round(share * n)
    # the full fine-tune changed the U-ViT (the LoRA's unload to the base's bits is checked inside main)
    tuned = Amused.from_pretrained(out / "full" / "model.safetensors").transformer.state_dict()
    start = Amused.from_pretrained(base).transformer.state_dict()
    assert any(not torch.equal(tuned[k], start[k]) for k in start)
    assert "| lora |" in (out / "results.md").read_text()
    with pytest.raises(digits.cli.UsageError, match="holds a run already"):
        digits_finetune.main(str(base), str(out), per_class=2, steps=3)
    with pytest.raises(digits.cli.UsageError, match="no such file"):
        digits_finetune.main(str(tmp_path / "missing.safetensors"), str(tmp_path / "x"))
    assert np.isfinite(results["seconds"])
