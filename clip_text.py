"""clip_text.py: the text side of aMUSEd. CLIP's BPE tokenizer and the CLIP-L/14 text transformer.

aMUSEd (arXiv 2401.01808, §3) conditions its U-ViT on OpenAI's CLIP ViT-L/14 text tower (Radford et al.
2021) through two tensors:
  - the hidden states of the *penultimate* layer, (B, 77, 768), not final-normed: cross-attention context;
  - the projected pooled embedding, (B, 768): the final-normed state at the end-of-text token, times
    text_projection; it joins the micro-conditioning vector.

Matches transformers' CLIPTokenizer and CLIPTextModelWithProjection numerically (tests/test_clip_text.py).
State-dict keys are those of CLIPTextModelWithProjection, so loading a hub `text_encoder/` folder is the
identity map (see convert_weights.py).
"""
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    # Matches reference: transformers CLIPTextTransformer. The legacy value 2 (which the amused hub configs
    # carry) means "pool at argmax(input_ids)", i.e. at <|endoftext|>, the largest id in CLIP's vocabulary.
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# amused-256 and amused-512 both ship a CLIP ViT-L/14 text encoder with projection (hub text_encoder/config.json).
PRESETS = {
    "clip-vit-large-patch14": CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        projection_dim=768,
        eos_token_id=2,
    ),
}

# Values of a transformers CLIPTextConfig that this file hard-codes rather than reads.
FIXED_HUB_CONFIG = {"hidden_act": "quick_gelu", "attention_dropout": 0.0, "dropout": 0.0}
# Keys a transformers config.json may hold that change nothing we compute: the library's bookkeeping, the
# initialisation, token ids the model never reads (only eos_token_id matters, see above), and the generic settings
# transformers 4.x wrote into every model's config (generation, labels, output flags). pruned_heads would change
# tensor shapes, which the loader checks against the weights.
UNUSED_HUB_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "initializer_factor",
    "initializer_range", "bos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "id2label",
    "label2id", "tokenizer_class", "prefix", "task_specific_params", "problem_type",
})
# Every key of a transformers text_encoder/config.json that this file reads or checks (convert_weights.hub_config
# decides what to do with any other).
HUB_KEYS = frozenset(CLIPTextConfig.__dataclass_fields__) | FIXED_HUB_CONFIG.keys() | UNUSED_HUB_KEYS


def config_from_hub(d: dict) -> CLIPTextConfig:
    """Our config from a transformers `text_encoder/config.json` dict; ValueError for what we don't implement."""
    for key, value in FIXED_HUB_CONFIG.items():
        if d.get(key, value) != value:
            raise ValueError(f"text encoder config: {key}={d[key]!r} is not supported (only {value!r})")
    unknown = sorted(k for k in d if k not in HUB_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"text encoder config: unknown keys {unknown}")
    fields = CLIPTextConfig.__dataclass_fields__
    missing = [k for k in fields if k not in d]
    if missing:
        raise ValueError(f"text encoder config: missing keys {missing}")
    return CLIPTextConfig(**{k: d[k] for k in fields})


# ----------------------------------------------------------------------------------------------------
# Tokenizer

# CLIP's pre-tokenization split (openai/CLIP simple_tokenizer.py), as transformers writes it.
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


def read_tokenizer_files(folder) -> dict[str, str]:
    """The text of each of TOKENIZER_FILES in a hub `tokenizer/` folder; errors name the file."""
    files = {}
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found; a CLIP tokenizer folder holds {', '.join(TOKENIZER_FILES)}")
        try:
            files[name] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable ({e}); re-download the tokenizer folder") from e
    return files


def _token_content(entry) -> str:
    """Special tokens are written either as a plain string or as an AddedToken dict."""
    return entry["content"] if isinstance(entry, dict) else entry


class CLIPTokenizer:
    """CLIP's byte-level BPE, built on the `tokenizers` library from the files of a hub `tokenizer/` folder.

    tokenizer(prompts) -> (B, 77) long ids: <|startoftext|> prompt-tokens <|endoftext|> pad pad ...
    Same ids as transformers.CLIPTokenizer(..., padding="max_length", truncation=True, max_length=77).
    """

    @classmethod
    def from_folder(cls, folder) -> "CLIPTokenizer":
        return cls(read_tokenizer_files(folder), source=Path(folder))

    def __init__(self, files: dict[str, str], source: Path = Path("tokenizer")):
        """files: file name -> text, for each of TOKENIZER_FILES; `source` names them in error messages."""
        self.files = dict(files)  # kept so that a saved model can carry its tokenizer along

        def parse_json(name):
            try:
                return json.loads(files[name])
            except json.JSONDecodeError as e:
                raise ValueError(f"{source / name}: not valid JSON ({e}); re-download the tokenizer folder") from e

        vocab = parse_json("vocab.json")
        # one merge per line, "a b"; the first line is a "#version" header
        merges = [tuple(line.split(" ")) for line in files["merges.txt"].splitlines() if line and not line.startswith("#version")]
        if bad := next((m for m in merges if len(m) != 2), None):
            raise ValueError(f"{source / 'merges.txt'}: malformed merge line {' '.join(bad)!r}; expected two symbols")
        specials = parse_json("special_tokens_map.json")
        config = parse_json("tokenizer_config.json")

        def special(name, default):
            return _token_content(config.get(name) or specials.get(name) or default)

        self.bos_token = special("bos_token", "<|startoftext|>")
        self.eos_token = special("eos_token", "<|endoftext|>")
        # Matches reference: the pad token is whatever the checkpoint names. amused pads with "!" (id 0), not
        # <|endoftext|>; since the U-ViT attends to all 77 positions, the pad id changes its input.
        self.pad_token = special("pad_token", self.eos_token)
        self.unk_token = special("unk_token", "<|endoftext|>")
        self.max_length = int(config.get("model_max_length", 77))
        for tok in (self.bos_token, self.eos_token, self.pad_token, self.unk_token):
            if tok not in vocab:
                raise ValueError(f"{source / 'vocab.json'}: special token {tok!r} is not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = vocab[self.bos_token], vocab[self.eos_token], vocab[self.pad_token]

        # Matches reference: transformers' CLIPTokenizer (v5). NFC, whitespace runs -> " ", lower-case; CLIP's
        # regex split; byte-level symbols; BPE with "</w>" marking the end of each word.
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                            unk_token=self.unk_token, fuse_unk=False))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # Matches reference: the special tokens are "added tokens", matched in the raw text before BPE. So with
        # the amused files every "!" in a prompt becomes the pad id 0, exactly as in diffusers' pipelines.
        added = config.get("added_tokens_decoder") or {
            vocab[t]: {"content": t} for t in dict.fromkeys((self.pad_token, self.bos_token, self.eos_token, self.unk_token))
        }
        tok.add_special_tokens([
            AddedToken(e["content"], single_word=e.get("single_word", False), lstrip=e.get("lstrip", False),
                       rstrip=e.get("rstrip", False), normalized=e.get("normalized", True), special=True)
            for _, e in sorted(added.items(), key=lambda kv: int(kv[0]))
        ])
        self.tokenizer = tok

    def __call__(self, prompts) -> torch.Tensor:
        """prompts: a string or a list of strings -> (B, max_length) long ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a list of strings, got {prompts!r:.80}")
        n = self.max_length - 2  # room for <|startoftext|> and <|endoftext|>
        rows = []
        for prompt, enc in zip(prompts, self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > n:  # truncate like the reference: the end-of-text token stays last
                warnings.warn(f"prompt is {len(ids) + 2} tokens, longer than CLIP's {self.max_length}: "
                              f"the last {len(ids) - n} were dropped ({prompt[:40]!r}...)", stacklevel=2)
                ids = ids[:n]
            ids = [self.bos_id] + ids + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# A vocabulary of your own, for models trained from scratch on a small, fixed set of captions (examples/digits.py)
# and for tests that must run without CLIP's 49,408-entry vocabulary.


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table, in CLIP's order ("!" first, so "!" gets id 0)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_bpe_files(corpus: str, n_merges: int = 300) -> dict[str, str]:
    """The texts of TOKENIZER_FILES for a byte-level BPE trained on `corpus` (split on whitespace), in CLIP's
    layout: 256 byte symbols, the same with "</w>", one entry per merge (the most frequent pair first, ties broken
    by the pair itself), then <|startoftext|> and <|endoftext|>; the special tokens as amused's hub tokenizer has
    them (pad "!", id 0). CLIPTokenizer(files) reads them; a model's vocab_size must be at least len(vocab)."""
    b2u = bytes_to_unicode()
    words = Counter(corpus.split())
    # each word as a tuple of byte symbols, the last one carrying the end-of-word suffix
    seqs = {w: tuple(b2u[b] for b in w.encode())[:-1] + (b2u[w.encode()[-1]] + "</w>",) for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, s in seqs.items():
            for pair in zip(s, s[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        seqs = {w: _merge_pair(s, best) for w, s in seqs.items()}
    symbols = list(b2u.values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]

    def token(content, normalized, special=None):
        entry = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
        return entry if special is None else {**entry, "special": special}

    specials = {"bos_token": token("<|startoftext|>", True), "eos_token": token("<|endoftext|>", True),
                "pad_token": token("!", False), "unk_token": token("<|endoftext|>", True)}
    config = {"add_prefix_space": False,
              "added_tokens_decoder": {"0": token("!", False, True), str(bos): token("<|startoftext|>", True, True),
                                       str(eos): token("<|endoftext|>", True, True)},
              "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77, "pad_token": "!",
              "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "special_tokens_map.json": json.dumps(specials, indent=2),
            "tokenizer_config.json": json.dumps(config, indent=2)}


# ----------------------------------------------------------------------------------------------------
# Text encoder


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):  # x: (B, N, D)
        B, N, D = x.shape
        q, k, v = (proj(x).view(B, N, self.n_heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, N, d); token i sees tokens <= i
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick-GELU, the activation OpenAI's CLIP was trained with


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):  # pre-LN transformer block
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):  # ids: (B, N)
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]  # (B, N, D)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower with projection; module names mirror transformers' CLIPTextModelWithProjection."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, ids):
        """ids: (B, N) long, N <= 77 -> (penultimate hidden states (B, N, D), projected pooled (B, P)).

        The hidden states are the raw output of layer L-1 (transformers' hidden_states[-2]: not final-normed),
        which is what aMUSEd cross-attends to. The pooled embedding is taken at the end-of-text token."""
        if ids.dtype != torch.long or ids.dim() != 2:
            raise ValueError(f"ids must be a (B, N) long tensor, got {tuple(ids.shape)} {ids.dtype}")
        B, N = ids.shape
        if N > self.cfg.max_position_embeddings:
            raise ValueError(f"ids has {N} positions; CLIP has {self.cfg.max_position_embeddings}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.cfg.vocab_size}), got [{ids.min()}, {ids.max()}]")
        model = self.text_model
        x = model.embeddings(ids)  # (B, N, D)
        for layer in model.encoder.layers[:-1]:
            x = layer(x)
        penultimate = x
        x = model.final_layer_norm(model.encoder.layers[-1](x))  # (B, N, D)
        if self.cfg.eos_token_id == 2:
            # Matches reference: transformers' legacy rule. <|endoftext|> is the largest id, so argmax finds it.
            eos = ids.argmax(dim=-1)  # (B,)
        else:
            eos = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # first end-of-text position
        pooled = x[torch.arange(B, device=x.device), eos]  # (B, D)
        return penultimate, self.text_projection(pooled)  # (B, N, D), (B, P)
