"""Amused.load_lora / unload_lora: a LoRA comes off bit for bit (the original weights are kept, not recomputed),
load_lora at scale 0 is the original model, and a second LoRA replaces the first instead of stacking on it; in
float32 and bfloat16, where W + d - d is not W."""
import pytest
import torch
from conftest import reference_pipeline, save_hub_checkpoint

import train
from amused import Amused


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("lora")
    return save_hub_checkpoint(reference_pipeline("tiny", tiny_tokenizer_dir, seed=5), root / "hub", tiny_tokenizer_dir)


def write_lora(path, transformer, targets, seed):
    """A LoRA file of rank 3, alpha 6 on the U-ViT's Linear layers named by `targets`, with random A and B (a trained
    B would start at zero): train.py's format."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
            tensors[f"{name}.lora_A.weight"] = torch.randn(3, m.in_features, generator=g)
            tensors[f"{name}.lora_B.weight"] = torch.randn(m.out_features, 3, generator=g)
    train.save_lora(path, tensors, 3, 6.0, list(targets))
    return path


def bits(transformer):
    """Every tensor of the U-ViT's state as raw bytes: -0.0 differs from +0.0, NaN patterns count."""
    return {k: t.contiguous().view(torch.uint8).clone() for k, t in transformer.state_dict().items()}


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unload_and_scale_zero_give_back_the_original_bits(hub, tmp_path, dtype):
    pipe = Amused.from_pretrained(hub, dtype=dtype)
    with torch.no_grad():  # a negative zero, which w + 0.0 would turn into +0.0
        pipe.transformer.transformer_layers[0].attn1.to_q.weight[0, 0] = -0.0
    original = bits(pipe.transformer)
    lora = write_lora(tmp_path / "a.safetensors", pipe.transformer, ("to_q", "to_k", "to_v"), seed=1)

    pipe.load_lora(lora, scale=1.5)
    changed = [k for k, t in bits(pipe.transformer).items() if not torch.equal(t, original[k])]
    assert len(changed) == len(pipe.lora_originals) > 0, "every adapted layer changed, nothing else"
    pipe.unload_lora()
    assert_same_bits(bits(pipe.transformer), original)
    assert pipe.lora_originals == {}
    pipe.unload_lora()  # nothing loaded: nothing to do
    assert_same_bits(bits(pipe.transformer), original)

    pipe.load_lora(lora)
    pipe.load_lora(lora, scale=0.0)  # replaces the scale-1 LoRA with nothing
    assert_same_bits(bits(pipe.transformer), original)


def test_a_second_lora_replaces_the_first(hub, tmp_path):
    pipe, fresh = Amused.from_pretrained(hub), Amused.from_pretrained(hub)
    first = write_lora(tmp_path / "first.safetensors", pipe.transformer, ("to_q", "to_k", "to_v"), seed=1)
    second = write_lora(tmp_path / "second.safetensors", pipe.transformer, ("to_k", "to_out.0"), seed=2)
    pipe.load_lora(first)
    pipe.load_lora(second, scale=0.5)
    fresh.load_lora(second, scale=0.5)  # the second alone, on the original weights
    assert_same_bits(bits(pipe.transformer), bits(fresh.transformer))  # the first's to_q, to_v are restored too

    # a file that does not check out changes nothing: the loaded LoRA stays loaded
    bad = tmp_path / "bad.safetensors"
    train.save_lora(bad, {"nope.lora_A.weight": torch.zeros(3, 4), "nope.lora_B.weight": torch.zeros(4, 3)}, 3, 6.0,
                    ["nope"])
    with pytest.raises(ValueError, match="not a LoRA file for this U-ViT"):
        pipe.load_lora(bad)
    assert_same_bits(bits(pipe.transformer), bits(fresh.transformer))
    pipe.unload_lora(), fresh.unload_lora()
    assert_same_bits(bits(pipe.transformer), bits(Amused.from_pretrained(hub).transformer))
