"""clip_text.py against transformers' CLIPTokenizer and CLIPTextModelWithProjection.

Tolerances: token ids must be identical. Encoder outputs, fp32: atol 1e-4 at the full CLIP-L/14 size and 1e-5
at the tiny one, on outputs of magnitude ~1-5. We do the same float32 operations in the same order as
transformers 5.x (SDPA with a causal mask), and measured a difference of exactly 0 with torch 2.13 on CPU; the
tolerance leaves room for other torch versions or kernels (transformers 4.x scaled q before the matmul).
"""
import json
import random
import shutil
import warnings

import pytest
import torch
from conftest import FULL_CLIP, SHARED_TOKENIZER, TINY_CLIP, assert_close, needs_shared_tokenizer, perturb_, save_reference

import clip_text
from convert_weights import CheckpointError, load_model

# ----------------------------------------------------------------------------------------------------
# Tokenizer

WORDS = ["a", "photo", "of", "cat", "Dog", "PAINTING", "astronaut", "riding", "horse", "moon", "the", "in",
         "oil", "canvas", "4k", "highly-detailed", "trending", "on", "artstation", "portrait", "cyberpunk"]
ODD = ["café", "naïve", "Ångström", "e\u0301", "Straße", "ﬁne", "東京タワー", "日本語のテキスト", "中文提示词", "한국어",
       "русский", "العربية", "हिन्दी", "ελληνικά", "🎉", "👩‍🚀", "🐱🐶", "🇫🇷", "❤️", "™", "½", "²", "①", "٣",
       "!!!", "?!?", "...", "---", "***", "(((", ")))", "[x]", "{y}", "<|startoftext|>", "<|endoftext|>",
       "<|ENDOFTEXT|>", "don't", "it's", "WE'RE", "they've", "I'm", "we'll", "he'd", "''", '"quoted"', "#tag",
       "@user", "a/b\\c", "1234567890", "3.14159", "-42", "1e10", "0x1F", "\u200b", "\u00a0", "\u3000", "\x00",
       "\x7f", "\ufeff", "tab\there", "new\nline", "cr\r\nlf", "  lead", "trail  ", "\u2028", "ｆｕｌｌｗｉｄｔｈ",
       "ŁÓDŹ", "İstanbul", "ß", "ǅ", "\U0001d400", "\ud7ff", "a" * 60, "!" * 10, "$$$", "%%%", "&&&", "~~~"]
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", ", ", "", " \u00a0 ", "\u3000"]


def varied_prompts(n=1000, seed=0):
    """Deterministic mix of plain words, odd unicode, punctuation runs, digits, odd whitespace, the empty
    string, and prompts far over 77 tokens."""
    rng = random.Random(seed)
    prompts = ["", " ", "\n\t ", "!", "a", "A", "hello world", "Hello, World!"]
    while len(prompts) < n:
        length = rng.choice([1, 2, 3, 5, 8, 13, 20, 40, 90, 200])  # the long ones exceed 77 tokens
        pieces = [rng.choice(ODD) if rng.random() < 0.35 else rng.choice(WORDS) for _ in range(length)]
        text = ""
        for p in pieces:
            text += p + rng.choice(SEPARATORS)
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        prompts.append(text)
    return prompts[:n]


def tokenizer_dirs():
    return ["tiny", pytest.param("shared", marks=needs_shared_tokenizer)]


@pytest.fixture(params=tokenizer_dirs())
def tokenizer_dir(request, tiny_tokenizer_dir):
    return tiny_tokenizer_dir if request.param == "tiny" else SHARED_TOKENIZER


def reference_ids(folder, prompts):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(str(folder))
    return ref(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def test_tokenizer_matches_transformers_on_varied_prompts(tokenizer_dir):
    prompts = varied_prompts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts warn; tested on their own below
        ours = clip_text.CLIPTokenizer.from_folder(tokenizer_dir)(prompts)
    ref = reference_ids(tokenizer_dir, prompts)
    assert ours.shape == ref.shape == (1000, 77)
    mismatch = [i for i in range(len(prompts)) if not torch.equal(ours[i], ref[i])]
    assert not mismatch, f"{len(mismatch)} prompts differ, e.g. {prompts[mismatch[0]]!r}: " \
                         f"{ours[mismatch[0]].tolist()} vs {ref[mismatch[0]].tolist()}"
    # the set is really varied: many distinct token ids, some truncated rows, some padded rows
    assert len(ours.unique()) > (300 if tokenizer_dir == SHARED_TOKENIZER else 150)
    assert (ours[:, -1] != ours[0, -1]).any() and (ours[:, 2] == ours[0, -1]).any()


def test_tokenizer_special_tokens_and_padding(tokenizer_dir):
    tok = clip_text.CLIPTokenizer.from_folder(tokenizer_dir)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert (tok.pad_token, tok.pad_id) == ("!", 0)  # the amused files pad with "!", id 0
    assert tok.eos_id == vocab["<|endoftext|>"] == max(vocab.values())
    ids = tok(["a photo of a cat", ""])
    assert ids[0, 0] == tok.bos_id and ids[1, :2].tolist() == [tok.bos_id, tok.eos_id]
    assert (ids[1, 2:] == 0).all()
    # Matches reference: "!" in a prompt is the added pad token, not BPE'd
    assert torch.equal(tok("wow!"), reference_ids(tokenizer_dir, ["wow!"]))


def test_overlong_prompt_truncates_like_reference_and_warns(tokenizer_dir):
    prompt = "a photo of a cat " * 40
    with pytest.warns(UserWarning, match="longer than CLIP's 77"):
        ours = clip_text.CLIPTokenizer.from_folder(tokenizer_dir)(prompt)
    assert torch.equal(ours, reference_ids(tokenizer_dir, [prompt]))
    assert ours[0, -1] == json.loads((tokenizer_dir / "vocab.json").read_text())["<|endoftext|>"]


def test_prompt_that_fits_does_not_warn(tiny_tokenizer_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_text.CLIPTokenizer.from_folder(tiny_tokenizer_dir)("a" + " a" * 74)  # 75 tokens + BOS + EOS = 77


@pytest.mark.parametrize("bad", [5, None, b"bytes", ["ok", 3], [None]])
def test_non_string_prompt_is_a_type_error(tiny_tokenizer_dir, bad):
    with pytest.raises(TypeError, match="prompt must be a string"):
        clip_text.CLIPTokenizer.from_folder(tiny_tokenizer_dir)(bad)


@pytest.mark.parametrize("name", clip_text.TOKENIZER_FILES)
def test_missing_tokenizer_file_is_named(tiny_tokenizer_dir, tmp_path, name):
    folder = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        clip_text.CLIPTokenizer.from_folder(folder)


@pytest.mark.parametrize("name", ["vocab.json", "tokenizer_config.json", "merges.txt"])
def test_corrupt_tokenizer_file_is_named(tiny_tokenizer_dir, tmp_path, name):
    folder = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    (folder / name).write_bytes(b"\xff\xfe{ not json" if name != "merges.txt" else b"a b c\n")
    with pytest.raises(ValueError, match=name):
        clip_text.CLIPTokenizer.from_folder(folder)


# ----------------------------------------------------------------------------------------------------
# Text encoder


def reference_encoder(cfg_kwargs, seed):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    ref = CLIPTextModelWithProjection(CLIPTextConfig(**cfg_kwargs)).eval()
    return perturb_(ref, seed=seed)  # layer norms and biases away from their 1 / 0 initialisation


def encoder_inputs(tokenizer_dir):
    """Real tokenized prompts (EOS then pad 0 after it) plus a row of random ids with no EOS at all."""
    ids = clip_text.CLIPTokenizer.from_folder(tokenizer_dir)(["a photo of a cat", "an astronaut riding a horse, 4k!", ""])
    g = torch.Generator().manual_seed(0)
    return torch.cat([ids, torch.randint(0, int(ids.max()), (1, 77), generator=g)])


@pytest.mark.parametrize("size, atol", [("tiny", 1e-5), ("full", 1e-4)])
def test_encoder_matches_transformers(tmp_path, tiny_tokenizer_dir, size, atol):
    cfg_kwargs = TINY_CLIP if size == "tiny" else FULL_CLIP
    ref = reference_encoder(cfg_kwargs, seed=1)
    folder = save_reference(ref, tmp_path, "text_encoder")  # the hub layout: config.json + model.safetensors
    ours = load_model(folder, "text_encoder")
    if size == "full":
        assert ours.cfg == clip_text.PRESETS["clip-vit-large-patch14"]
        assert sum(p.numel() for p in ours.parameters()) == 123_650_304
    tok_dir = SHARED_TOKENIZER if size == "full" and SHARED_TOKENIZER.exists() else tiny_tokenizer_dir
    ids = encoder_inputs(tok_dir)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = ours(ids)
    # every position, including those after the end-of-text token
    assert_close(f"{size} penultimate hidden states", hidden, out.hidden_states[-2], atol=atol)
    assert_close(f"{size} projected pooled", pooled, out.text_embeds, atol=atol)


def test_encoder_pools_at_first_eos_when_config_is_not_legacy(tmp_path, tiny_tokenizer_dir):
    ids = encoder_inputs(tiny_tokenizer_dir)[:3]
    eos = int(ids.max())
    ids[0, 10] = eos  # a second end-of-text: the first occurrence wins
    ref = reference_encoder({**TINY_CLIP, "eos_token_id": eos}, seed=2)
    ours = load_model(save_reference(ref, tmp_path, "text_encoder"), "text_encoder")
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        _, pooled = ours(ids)
    assert_close("pooled at first eos", pooled, out.text_embeds, atol=1e-5)


def test_fp16_variant_loads(tmp_path, tiny_tokenizer_dir):
    ref = reference_encoder(TINY_CLIP, seed=3)
    folder = save_reference(ref.half(), tmp_path, "text_encoder", variant="fp16")
    ours = load_model(folder, "text_encoder", variant="fp16")
    assert all(p.dtype == torch.float16 for p in ours.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="model.safetensors: file not found"):
        load_model(folder, "text_encoder")  # only the fp16 file is there


def test_loader_errors_name_the_problem(tmp_path):
    ref = reference_encoder(TINY_CLIP, seed=4)
    folder = save_reference(ref, tmp_path, "text_encoder")
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a truncated download
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(folder, "text_encoder")
    weights.write_bytes(good)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match="unknown.*layers.2"):
        load_model(folder, "text_encoder")
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model(folder, "text_encoder")
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="hidden_act"):
        load_model(folder, "text_encoder")


def test_encoder_rejects_bad_ids():
    model = clip_text.CLIPTextEncoder(clip_text.CLIPTextConfig(**{k: TINY_CLIP[k] for k in clip_text.CLIPTextConfig.__dataclass_fields__}))
    with pytest.raises(ValueError, match=r"\[0, 49408\)"):
        model(torch.full((1, 77), 49408))
    with pytest.raises(ValueError, match="77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="long"):
        model(torch.zeros(1, 77))
