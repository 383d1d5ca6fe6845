"""uvit.py against diffusers' UVit2DModel: config, parameter counts, state-dict keys, logit parity (tiny config
with down/upsampling and both full presets), the cached-conditions path, bf16/fp16, and input validation.

Tolerances, relative to the reference logits' scale s = max |logit| (see TOL):
  - fp32 parity: 1e-4 * s. We run the reference's operations in the reference's order, so on CPU we measure 0
    (bit-identical); the slack only allows for a different kernel choice on other hardware.
  - cached vs direct path of our own model: exact. Both run the very same tensors through the same kernels.
  - ours in half precision vs diffusers in the same half precision: 1e-4 * s, nearly exact (one fp16 ulp near s is
    ~1e-3 * s, one bf16 ulp ~8e-3 * s): the same operations in the same dtype; we measure 0.
  - ours in half precision vs the fp32 reference: bf16 5e-2 * s, fp16 1e-2 * s. bf16 keeps 8 mantissa bits and
    fp16 11 (one rounding costs up to 2e-3 / 2.4e-4 relative) and the logits come out of ~30 residual blocks.
    Measured at the tiny config: bf16 ~2e-2 * s, fp16 ~3e-3 * s; full presets bf16 ~2e-2 * s.
Full presets are slow on CPU: the 512 reference is built once (module fixture) and its weights are shared with
the 256 model, whose state dict is the 512 one minus the four down/upsampling tensors.
"""
import gc

import pytest
import torch
from conftest import FULL_UVIT, TINY_UVIT, assert_close, perturb_
from diffusers import UVit2DModel
from diffusers.models.embeddings import get_timestep_embedding

from uvit import PRESETS, UViT, config_from_hub

TOL = {"fp32": 1e-4, "same-dtype": 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}  # x max |ref logit|

MICRO = [[256, 256, 0, 0, 6], [512, 384, 16, 32, 5.5], [1024, 768, 100, 3, 4.25]]  # one row per sample


def direct(ours, ids, text_hidden, pooled, micro_conds):
    """Our logits with UVit2DModel's signature: the conditions computed for this call alone."""
    return ours(ids, ours.encode_conditions(text_hidden, pooled, micro_conds))


def make_ids(cfg, kinds, seed):
    """One token grid per kind: "masked" (all mask id), "partly" (about half masked), "unmasked" (codebook ids)."""
    g = torch.Generator().manual_seed(seed)
    s, mask_id = cfg.sample_size, cfg.vocab_size - 1
    ids = torch.randint(0, cfg.codebook_size, (len(kinds), s, s), generator=g)
    for i, kind in enumerate(kinds):
        if kind == "masked":
            ids[i] = mask_id
        elif kind == "partly":
            ids[i][torch.rand(s, s, generator=g) < 0.5] = mask_id
    return ids


def make_conditions(cfg, batch, seed, dtype=torch.float32):
    """Distinct random text hidden states, pooled embedding and micro-conditions for each sample."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 77, cfg.encoder_hidden_size, generator=g).to(dtype)
    pooled = torch.randn(batch, cfg.cond_embed_dim, generator=g).to(dtype)
    micro = torch.tensor(MICRO[:batch], dtype=dtype)  # the pipeline builds it in the text encoder's dtype
    return text, pooled, micro


def logit_scale(t):
    return t.detach().float().abs().max().item()


@pytest.fixture(scope="module")
def tiny():
    """A perturbed tiny diffusers reference (with down/upsampling) and our model with its weights."""
    torch.manual_seed(0)
    ref = perturb_(UVit2DModel(**TINY_UVIT), seed=1).eval()
    ours = UViT(config_from_hub(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


# ----------------------------------------------------------------------------------------------------
# Config, sizes, keys


@pytest.mark.parametrize("preset", ["amused-256", "amused-512"])
def test_config_from_hub_equals_preset(preset):
    with torch.device("meta"):
        ref = UVit2DModel(**FULL_UVIT[preset])
    assert config_from_hub(dict(ref.config)) == PRESETS[preset]


def test_config_from_hub_tiny():
    cfg = config_from_hub(dict(UVit2DModel(**TINY_UVIT).config))
    assert {k: getattr(cfg, k) for k in cfg.__dataclass_fields__} == {
        k: v for k, v in TINY_UVIT.items() if k in cfg.__dataclass_fields__}


@pytest.mark.parametrize("change, key", [
    ({"use_bias": True}, "use_bias"),
    ({"hidden_dropout": 0.1}, "hidden_dropout"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"ln_elementwise_affine": False}, "ln_elementwise_affine"),
    ({"micro_cond_embed_dim": 1024}, "micro_cond_embed_dim"),
    ({"block_out_channels": 1024}, "block_out_channels"),  # == hidden_size: diffusers would drop kv_mapper
    ({"upsample": True}, "upsample"),  # without downsample
    ({"num_attention_heads": 15}, "num_attention_heads"),
    ({"mask_token_id": 8255}, "mask_token_id"),  # unknown key: it belongs to the scheduler config
])
def test_config_from_hub_rejects(change, key):
    d = {"_class_name": "UVit2DModel", "_name_or_path": "muse-512/", **FULL_UVIT["amused-256"], **change}
    with pytest.raises(ValueError, match=key):
        config_from_hub(d)


def test_config_from_hub_missing_key():
    d = dict(FULL_UVIT["amused-256"])
    del d["sample_size"]
    with pytest.raises(ValueError, match="sample_size"):
        config_from_hub(d)


@pytest.mark.parametrize("preset, n_params, n_tensors", [
    ("amused-256", 603_537_664, 474),
    ("amused-512", 608_257_792, 478),
])
def test_param_counts_and_keys(preset, n_params, n_tensors):
    with torch.device("meta"):  # sizes only: nothing is allocated
        ours = UViT(PRESETS[preset])
        ref = UVit2DModel(**FULL_UVIT[preset])
    assert sum(p.numel() for p in ours.parameters()) == n_params
    sd = ours.state_dict()
    assert len(sd) == n_tensors
    # the identity key map the converter relies on
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)


# ----------------------------------------------------------------------------------------------------
# Parity at the tiny config


@torch.no_grad()
def test_logit_parity_tiny(tiny):
    """Fully masked, partly masked and unmasked grids, each with its own conditions; fp32."""
    ref, ours = tiny
    ids = make_ids(ours.cfg, ["masked", "partly", "unmasked"], seed=2)
    conds = make_conditions(ours.cfg, 3, seed=3)
    want = ref(ids, *conds)
    got = direct(ours, ids, *conds)
    assert got.shape == (3, ours.cfg.codebook_size, ours.cfg.sample_size, ours.cfg.sample_size)
    for i, kind in enumerate(["masked", "partly", "unmasked"]):
        assert_close(f"tiny fp32 {kind}", got[i], want[i], atol=TOL["fp32"] * logit_scale(want))


@torch.no_grad()
def test_cached_conditions_tiny(tiny):
    """encode_conditions once, forward twice with different ids: exactly the direct path; and the cached
    tensors themselves match the reference's intermediate values."""
    ref, ours = tiny
    cfg = ours.cfg
    text, pooled, micro = make_conditions(cfg, 2, seed=4)
    conds = ours.encode_conditions(text, pooled, micro)
    for seed, kinds in [(5, ["masked", "partly"]), (6, ["partly", "unmasked"])]:
        ids = make_ids(cfg, kinds, seed)
        assert_close(f"cached vs direct {kinds}", ours(ids, conds), direct(ours, ids, text, pooled, micro), atol=0.0)

    # the prompt-only intermediates, computed the reference's way
    ref_text = ref.encoder_proj_layer_norm(ref.encoder_proj(text))
    m = get_timestep_embedding(micro.flatten(), cfg.micro_cond_encode_dim, flip_sin_to_cos=True,
                               downscale_freq_shift=0).reshape(2, -1)
    ref_cond = ref.cond_embed(torch.cat([pooled, m], dim=1))
    assert_close("conds.text", conds.text, ref_text, atol=0.0)
    assert_close("conds.cond", conds.cond, ref_cond, atol=0.0)
    layer = ref.transformer_layers[0]
    k = layer.attn2.to_k(ref_text).view(2, -1, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
    assert_close("transformer_layers[0].attn2 k", conds.transformer_layers[0].attn2[0], k, atol=0.0)
    ctx = ref.up_block.attention_blocks[1].kv_mapper(torch.nn.functional.silu(ref_text))
    v = ref.up_block.attention_blocks[1].attn1.to_v(ctx).view(2, -1, cfg.block_num_heads, cfg.block_head_dim)
    assert_close("up_block stage 1 attn1 v", conds.up_block[1].attention_block[0][1], v.transpose(1, 2), atol=0.0)
    scale, shift = ref.down_block.res_blocks[0].cond_embeds_mapper(torch.nn.functional.silu(ref_cond)).chunk(2, 1)
    assert_close("down_block stage 0 scale", conds.down_block[0].res_block[0], scale, atol=0.0)
    assert len(conds.down_block) == len(conds.up_block) == cfg.num_res_blocks
    assert len(conds.transformer_layers) == cfg.num_hidden_layers


@torch.no_grad()
def test_cfg_batch_tiny(tiny):
    """A classifier-free-guidance batch [uncond; cond]: same ids, different conditions. Each row must equal the
    row computed alone (no mixing across the batch) and the reference."""
    ref, ours = tiny
    ids = make_ids(ours.cfg, ["partly"], seed=7).expand(2, -1, -1)
    text, pooled, micro = make_conditions(ours.cfg, 2, seed=8)
    text[0], pooled[0] = 0.0, 0.0  # an "empty prompt" row
    micro[0] = micro[1]  # CFG repeats the micro-conditions
    got = direct(ours, ids, text, pooled, micro)
    want = ref(ids, text, pooled, micro)
    s = logit_scale(want)
    assert_close("tiny CFG batch", got, want, atol=TOL["fp32"] * s)
    for i in range(2):
        alone = direct(ours, ids[i:i + 1], text[i:i + 1], pooled[i:i + 1], micro[i:i + 1])
        assert_close(f"tiny CFG row {i} alone", alone[0], got[i], atol=1e-5 * s)  # batch-size kernels may differ
    assert (got[0] - got[1]).abs().max() > 1e-3 * s, "the two conditions gave the same logits"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_half_precision_tiny(tiny, dtype):
    """Weights cast to bf16/fp16 (how the pipeline runs in half precision): equal to diffusers in the same dtype,
    close to fp32."""
    ref32, ours32 = tiny
    ref = UVit2DModel(**TINY_UVIT).eval()
    ref.load_state_dict(ref32.state_dict())
    ref.to(dtype)
    ours = UViT(ours32.cfg).eval()
    ours.load_state_dict(ours32.state_dict())
    ours.to(dtype)
    ids = make_ids(ours.cfg, ["masked", "partly", "unmasked"], seed=9)
    conds = make_conditions(ours.cfg, 3, seed=10)
    want32 = ref32(ids, *conds)
    got = direct(ours, ids, *(c.to(dtype) for c in conds))
    want = ref(ids, *(c.to(dtype) for c in conds))
    assert got.dtype == dtype
    s = logit_scale(want32)
    assert_close(f"tiny {dtype} ours vs diffusers {dtype}", got, want, atol=TOL["same-dtype"] * s)
    assert_close(f"tiny {dtype} vs fp32 reference", got.float(), want32, atol=TOL[dtype] * s)


# ----------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("case, match", [
    ("id too large", r"ids must lie in \[0, 72\)"),
    ("negative id", r"ids must lie in \[0, 72\)"),
    ("wrong grid", r"halves the token grid inside \(downsample\), so h and w must be even; got a 7x8 grid"),
    ("flat ids", r"expects a token grid, ids of shape \(B, h, w\)"),
    ("float ids", r"integer token ids"),
    ("text width", r"text_hidden of shape \(B, L, 32\)"),
    ("text batch", r"text_hidden of shape \(B, L, 32\)"),
    ("pooled width", r"pooled of shape \(B, 24\)"),
    ("micro_conds width", r"micro_conds of shape \(B, 5\)"),
    ("micro_conds batch", r"micro_conds of shape \(B, 5\)"),
    ("conditions batch", r"ids batch size 1 != conditions batch size 2"),
])
@torch.no_grad()
def test_bad_inputs(tiny, case, match):
    _, ours = tiny
    cfg = ours.cfg
    ids = make_ids(cfg, ["partly", "unmasked"], seed=11)
    text, pooled, micro = make_conditions(cfg, 2, seed=12)
    if case == "id too large":
        ids[1, 3, 4] = cfg.vocab_size
    elif case == "negative id":
        ids[0, 0, 0] = -1
    elif case == "wrong grid":
        ids = ids[:, :7]
    elif case == "flat ids":
        ids = ids.flatten(1)
    elif case == "float ids":
        ids = ids.float()
    elif case == "text width":
        text = text[..., :-1]
    elif case == "text batch":
        text = text[:1]
    elif case == "pooled width":
        pooled = torch.cat([pooled, pooled], dim=1)
    elif case == "micro_conds width":
        micro = micro[:, :4]
    elif case == "micro_conds batch":
        micro = micro[:1]
    if case == "conditions batch":
        ids = ids[:1]
    with pytest.raises(ValueError, match=match):
        if case in ("id too large", "negative id"):  # values: only check_ids reads them (a host sync)
            ours.check_ids(ids, batch_size=2)
        else:  # shapes: checked by forward itself, and by check_ids
            direct(ours, ids, text, pooled, micro)
    if case in ("wrong grid", "flat ids", "float ids", "conditions batch"):
        with pytest.raises(ValueError, match=match):
            ours.check_ids(ids, batch_size=2)


def test_bad_grid_names_preset():
    """amused-512 halves its grid inside: an odd side is refused, naming the preset; any even grid runs (shapes
    only: on the meta device, before any real compute)."""
    with torch.device("meta"):
        ours = UViT(PRESETS["amused-512"])
        text, pooled, micro = torch.zeros(1, 77, 768), torch.zeros(1, 768), torch.zeros(1, 5)
        odd, even = torch.zeros(1, 33, 32, dtype=torch.long), torch.zeros(1, 16, 48, dtype=torch.long)
    with pytest.raises(ValueError, match="amused-512 halves the token grid inside .* got a 33x32 grid"):
        direct(ours, odd, text, pooled, micro)
    assert direct(ours, even, text, pooled, micro).shape == (1, 8192, 16, 48)


@pytest.mark.parametrize("h, w", [(8, 12), (4, 4), (12, 6)])
@torch.no_grad()
def test_other_grids_match_the_reference(tiny, h, w):
    """Any even grid (the tiny config downsamples, like amused-512): the same logits as UVit2DModel."""
    ref, ours = tiny
    ids = torch.randint(0, TINY_UVIT["vocab_size"], (2, h, w), generator=torch.Generator().manual_seed(h * w))
    text, pooled = torch.randn(2, 77, 32), torch.randn(2, 24)
    micro = torch.tensor([[4.0 * w, 4.0 * h, 0, 0, 6], [4.0 * w, 4.0 * h, 2, 3, 5]])
    want = ref(ids, micro_conds=micro, pooled_text_emb=pooled, encoder_hidden_states=text)
    got = direct(ours, ids, text, pooled, micro)
    assert got.shape == (2, TINY_UVIT["codebook_size"], h, w)
    assert_close(f"{h}x{w} logits", got, want, atol=TOL["fp32"] * logit_scale(want))


# ----------------------------------------------------------------------------------------------------
# Full presets (slow: ~0.6 B parameters each). Kept last so the shared weights are freed early.


@pytest.fixture(scope="module")
def full_weights():
    """The state dict of a perturbed diffusers amused-512 model; amused-256 uses all of it but the 4 tensors of
    down_block.downsample and up_block.upsample."""
    torch.manual_seed(0)
    ref = perturb_(UVit2DModel(**FULL_UVIT["amused-512"]), seed=1)
    sd = ref.state_dict()
    del ref
    yield sd
    del sd
    gc.collect()


@pytest.mark.parametrize("preset", ["amused-256", "amused-512"])
@torch.no_grad()
def test_logit_parity_full(full_weights, preset):
    """fp32 parity at the real sizes through the cached path, then our bf16 vs the fp32 reference. One batch of 3
    (fully masked, partly masked, unmasked; distinct conditions) costs less than two forwards of 2 on CPU. The
    direct path and reusing conditions across ids are checked exactly at the tiny config."""
    cfg = PRESETS[preset]
    with torch.device("meta"):
        ref, ours = UVit2DModel(**FULL_UVIT[preset]), UViT(cfg)
    keys = set(ours.state_dict())
    sd = {k: v for k, v in full_weights.items() if k in keys}
    ref.load_state_dict(sd, strict=True, assign=True)  # both share the fixture's tensors: no copy
    ours.load_state_dict(sd, strict=True, assign=True)
    ref.eval(), ours.eval()

    kinds = ["masked", "partly", "unmasked"]
    ids = make_ids(cfg, kinds, seed=14)
    text, pooled, micro = make_conditions(cfg, 3, seed=13)
    want = ref(ids, text, pooled, micro)
    del ref
    got = direct(ours, ids, text, pooled, micro)
    s = logit_scale(want)
    for i, kind in enumerate(kinds):
        assert_close(f"{preset} fp32 {kind}", got[i], want[i], atol=TOL["fp32"] * s)

    ours.to(torch.bfloat16)  # new bf16 tensors; the fixture's fp32 weights are untouched
    got = direct(ours, ids, *(c.to(torch.bfloat16) for c in (text, pooled, micro)))
    assert got.dtype == torch.bfloat16
    assert_close(f"{preset} bf16 vs fp32 reference", got.float(), want, atol=TOL[torch.bfloat16] * s)
    del ours, got
    gc.collect()
