"""convert_weights.py: load the official aMUSEd checkpoints into our modules, and convert them to one file.

A hub checkpoint (`amused/amused-256`, `amused/amused-512`) is a folder of components (diffusers layout):
    model_index.json
    text_encoder/  config.json + model.safetensors                       (transformers CLIPTextModelWithProjection)
    tokenizer/     vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
    vqvae/         config.json + diffusion_pytorch_model.safetensors      (diffusers VQModel)
    transformer/   config.json + diffusion_pytorch_model.safetensors      (diffusers UVit2DModel)
    scheduler/     scheduler_config.json                                  (mask_token_id, masking schedule)
and each weight file also as a `.fp16.safetensors` variant. Our modules mirror the reference module names, so
the key map of every component is the identity; what this file adds is the accounting: every key of a file
loaded or listed in IGNORED with a reason, every shape asserted against the config, strict loading.

    python convert_weights.py amused/amused-256 -o amused-256.safetensors [--dtype fp32|fp16|bf16]

writes ONE safetensors file: every weight under "<component>.<our key>", and in its metadata the three configs
(our dataclasses, as JSON), the scheduler settings and the tokenizer files. That file alone is a complete model
(`load_checkpoint("amused-256.safetensors")`).
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

import cli
import clip_text
import quantize
import uvit
import vqgan
from sampling import Sampler

FORMAT_VERSION = "amused-1"  # the "format" entry of a converted file's metadata


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match the model: the message names the file."""


@dataclass(frozen=True)
class Component:
    """One model of the pipeline, as it appears in a hub folder and in our code."""
    name: str                   # sub-folder of the hub checkpoint, and key prefix in a converted file
    weights: str                # weight file stem in the hub folder
    config_cls: type            # our frozen config dataclass
    config_from_hub: callable   # hub config.json dict -> our config (raises ValueError on what we don't support)
    hub_keys: frozenset         # every config.json key config_from_hub reads or checks
    model_cls: type             # our root module, built from the config
    ignored: dict               # keys of the hub file we deliberately drop -> why


COMPONENTS = {c.name: c for c in (
    Component("text_encoder", "model", clip_text.CLIPTextConfig, clip_text.config_from_hub, clip_text.HUB_KEYS,
              clip_text.CLIPTextEncoder,
              # transformers 4.x saved an arange(77) buffer; we index the position table directly
              {"text_model.embeddings.position_ids": "position-index buffer of older transformers versions"}),
    Component("vqvae", "diffusion_pytorch_model", vqgan.VQConfig, vqgan.config_from_hub, vqgan.HUB_KEYS,
              vqgan.VQModel, {}),
    Component("transformer", "diffusion_pytorch_model", uvit.UViTConfig, uvit.config_from_hub, uvit.HUB_KEYS,
              uvit.UViT, {}),
)}
# Keys diffusers writes into every config.json for its own bookkeeping: read without a word.
BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path"}
TOKENIZER_PREFIX = "tokenizer/"  # metadata keys of the tokenizer files in a converted file
# A converted file may recommend how to sample it: this metadata key holds JSON of pipeline keywords, e.g.
# {"steps": 12, "guidance_scale": 4.0}. Allowed: the sampling keywords of Amused.__call__ (how to draw, not what).
SAMPLING_DEFAULTS_KEY = "sampling_defaults"
START_LOGITS_KEY = "dimo.start_logits"  # Checkpoint.start_logits, in a converted file
SAMPLING_KEYS = ("steps", "guidance_scale", "temperature", "sampler", "guidance_schedule", "guidance_from",
                 "mask_schedule", "softmax_temperature", "halton_roll")


@dataclass
class Checkpoint:
    """Everything the pipeline needs, loaded."""
    tokenizer: clip_text.CLIPTokenizer
    text_encoder: clip_text.CLIPTextEncoder
    vqvae: vqgan.VQModel
    transformer: uvit.UViT
    mask_token_id: int          # the id of a masked token in the U-ViT's input (8255 for the official models)
    masking_schedule: str       # "cosine" for the official models
    # the pipeline keywords the file recommends (check_sampling_defaults); none in a hub folder
    sampling_defaults: dict = dataclasses.field(default_factory=dict)
    # a one-step student's start codes' logits (h, w, K) (sampling.dimo_start), from `distill.py --start prior`
    start_logits: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------
# Reading files, with errors that name the file


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def weights_file(folder: Path, stem: str, variant: str | None) -> Path:
    """`stem.safetensors`, or `stem.<variant>.safetensors` for a variant such as "fp16"."""
    path = folder / (f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")
    if not path.is_file():
        have = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
        raise CheckpointError(f"{path}: file not found" + (f" (the folder has {', '.join(have)})" if have else ""))
    return path


def read_safetensors(path: Path, dtype: torch.dtype | None = None, int8: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Every tensor of the file, each floating one not already in `dtype` cast to it as it is read (None: all as
    stored); the weights named in `int8` quantised as they are read (quantize.quantize_weight: "<key>" int8 and
    "<key>_scale" float32, an Int8Linear's buffers). The float32 scales of an int8 file are never cast.

    A tensor kept as stored views the memory-mapped file: nothing is copied, and a page is read only when first
    touched (text to image never touches the VQ encoder's). One to cast is read with pread(2) into a buffer of its
    own, freed once its copy is made. Read through the mapping instead, its pages would stay resident (and in the
    RSS) until the last tensor viewing the file is freed: the source tensors and their copies all held at once."""
    sd = {}
    try:
        with safe_open(path, framework="pt") as mapped, safe_open(path, framework="pt", backend="pread") as unmapped:
            for k in mapped.offset_keys():
                t = mapped.get_tensor(k)  # a view of the mapping: nothing read yet
                if k in int8 and t.is_floating_point():  # an int8 file's weights are int8 already
                    sd[k], sd[k + "_scale"] = quantize.quantize_weight_(unmapped.get_tensor(k).float())
                elif needs_cast(t, dtype) and not k.endswith(quantize.FLOAT32_BUFFERS):
                    sd[k] = unmapped.get_tensor(k).to(dtype)
                else:
                    sd[k] = t
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated, download it again") from e
    return sd


def needs_cast(t: torch.Tensor, dtype: torch.dtype | None) -> bool:
    """Floating tensors are cast to `dtype`; integer ones (ids, counters) keep theirs, and None keeps every dtype."""
    return dtype is not None and t.is_floating_point() and t.dtype != dtype


def hub_config(folder: Path, comp: Component):
    """Our config from the component folder's config.json.

    A key we do not know (say, one a later diffusers or transformers version adds) is dropped with a warning naming
    it when it cannot change what the model computes: bookkeeping (a leading "_", such as _use_default_values or
    _commit_hash) or a feature switched off (null or false). Any other unknown key is an error naming it: we cannot
    tell what it would change."""
    path = folder / "config.json"
    d = read_json(path)
    unknown = {k: v for k, v in d.items() if k not in comp.hub_keys and k not in BOOKKEEPING_KEYS}
    neutral = {k: v for k, v in unknown.items() if k.startswith("_") or v is None or v is False}
    if len(neutral) < len(unknown):
        k, v = next((k, v) for k, v in unknown.items() if k not in neutral)
        raise CheckpointError(f"{path}: unknown config key {k!r} = {v!r}: this version of amused does not know what "
                              f"it changes, so it cannot load the model faithfully")
    if neutral:
        warnings.warn(f"{path}: ignored config keys unknown to this version of amused, which cannot change the "
                      f"model: {', '.join(f'{k} = {v!r}' for k, v in neutral.items())}", stacklevel=2)
    try:
        return comp.config_from_hub({k: v for k, v in d.items() if k not in neutral})
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], ignored: dict, source) -> dict[str, torch.Tensor]:
    """The tensors of `sd` that `model` takes, after checking that the keys are exactly the model's (plus the
    `ignored` ones) and every shape equals the model's. The model may live on the meta device."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd]
    unknown = [k for k in sd if k not in ours and k not in ignored]
    if missing or unknown:
        raise CheckpointError(f"{source}: keys do not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(t.shape)})" for k, t in ours.items() if sd[k].shape != t.shape]
    if wrong:
        raise CheckpointError(f"{source}: tensors of the wrong shape, e.g. {', '.join(wrong[:3])}; "
                              f"does the config belong to these weights?")
    return {k: sd[k] for k in ours}


class SkipNormalInit(TorchFunctionMode):
    """Inside it, torch.nn.init.normal_ and Tensor.normal_ leave their tensor as it is. For models built on the meta
    device only to be given loaded tensors: a meta normal_ (nn.Embedding's init) computes nothing, but it runs in
    torch._refs, whose first call imports torch._dynamo: 70 MB of RSS that sampling never needs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_ or func is torch.Tensor.normal_:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def empty_model(comp: Component, cfg) -> nn.Module:
    """Our model for `cfg` on the meta device: its keys and shapes, and no memory for the weights (whose init does
    nothing there; SkipNormalInit keeps it from importing torch._dynamo)."""
    with torch.device("meta"), SkipNormalInit():
        return comp.model_cls(cfg)


def build(comp: Component, cfg, sd: dict[str, torch.Tensor], source) -> nn.Module:
    """Our model for `cfg`, holding exactly the tensors of `sd` (no copy: they are assigned, in their dtype). A
    linear whose "<name>.weight_scale" is in `sd` becomes an int8 layer (quantize.Int8Linear)."""
    model = empty_model(comp, cfg)  # no point allocating and initialising weights we are about to replace
    quantize.prepare_int8_(model, sd)
    model.load_state_dict(check_state_dict(model, sd, comp.ignored, source), strict=True, assign=True)
    assert not any(t.is_meta for t in model.state_dict().values()), "a non-persistent buffer was left on meta"
    return model.eval().requires_grad_(False)


def check_components(ckpt: Checkpoint, source) -> None:
    """The three models must fit together: widths, codebook size, and the mask id."""
    te, vq, tr = ckpt.text_encoder.cfg, ckpt.vqvae.cfg, ckpt.transformer.cfg
    checks = [
        (te.hidden_size == tr.encoder_hidden_size, f"text encoder width {te.hidden_size} != transformer "
                                                   f"encoder_hidden_size {tr.encoder_hidden_size}"),
        (te.projection_dim == tr.cond_embed_dim, f"text projection {te.projection_dim} != transformer "
                                                 f"cond_embed_dim {tr.cond_embed_dim}"),
        (vq.num_vq_embeddings == tr.codebook_size, f"VQ codebook {vq.num_vq_embeddings} != transformer "
                                                   f"codebook_size {tr.codebook_size}"),
        (tr.codebook_size <= ckpt.mask_token_id < tr.vocab_size, f"mask_token_id {ckpt.mask_token_id} is not a "
                                                                 f"non-codebook id of the transformer's vocabulary "
                                                                 f"[{tr.codebook_size}, {tr.vocab_size})"),
    ]
    for ok, message in checks:
        if not ok:
            raise CheckpointError(f"{source}: the components do not fit together: {message}")


def scheduler_settings(d: dict, source) -> tuple[int, str]:
    if not isinstance(d.get("mask_token_id"), int):
        raise CheckpointError(f"{source}: no integer mask_token_id")
    schedule = d.get("masking_schedule", "cosine")
    if schedule not in ("cosine", "linear"):
        raise CheckpointError(f"{source}: unknown masking_schedule {schedule!r} (cosine or linear)")
    return d["mask_token_id"], schedule


# ----------------------------------------------------------------------------------------------------
# Hub folders


def int8_keys(comp: Component, cfg, prefix: str = "") -> frozenset:
    """The weight keys that int8 loading quantises: those of the U-ViT's quantize.int8_names, none elsewhere."""
    if comp.name != "transformer":
        return frozenset()
    return frozenset(f"{prefix}{name}.weight" for name in quantize.int8_names(empty_model(comp, cfg)))


def load_model(folder, name: str, variant: str | None = None, dtype: torch.dtype | None = None,
               int8: bool = False) -> nn.Module:
    """One component folder of a hub checkpoint (e.g. `amused-256/vqvae`) -> our model, in the file's dtype (None)
    or cast to `dtype` as it is read (read_safetensors); with int8, the U-ViT's linears quantised as read."""
    folder, comp = Path(folder), COMPONENTS[name]
    cfg = hub_config(folder, comp)
    path = weights_file(folder, comp.weights, variant)
    return build(comp, cfg, read_safetensors(path, dtype, int8_keys(comp, cfg) if int8 else frozenset()), path)


def load_hub_folder(folder, variant: str | None = None, dtype: torch.dtype | None = None,
                    int8: bool = False) -> Checkpoint:
    """A hub-layout folder (fp32 files, or variant="fp16") -> Checkpoint, each model in its file's dtype (None)
    or in `dtype`; with int8, the U-ViT's linears quantised as they are read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    check_hub_layout(folder)
    models = {name: load_model(folder / name, name, variant, dtype, int8) for name in COMPONENTS}
    try:
        tokenizer = clip_text.CLIPTokenizer.from_folder(folder / "tokenizer")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from e
    sched_path = folder / "scheduler" / "scheduler_config.json"
    mask_id, schedule = scheduler_settings(read_json(sched_path), sched_path)
    ckpt = Checkpoint(tokenizer, **models, mask_token_id=mask_id, masking_schedule=schedule)
    check_components(ckpt, folder)
    return ckpt


def check_hub_layout(folder: Path) -> None:
    """A folder with none of a hub checkpoint's sub-folders is not a half-downloaded checkpoint but something else:
    say so, rather than name the first missing file."""
    parts = [*COMPONENTS, "tokenizer", "scheduler"]
    if not any((folder / part).is_dir() for part in parts):
        raise CheckpointError(f"{folder}: not a hub-layout checkpoint folder (it has none of {', '.join(parts)}/) "
                              f"nor a file converted by convert_weights.py; pass one of those, or a hub repo id "
                              f"such as amused/amused-256")


def download(repo_id: str, variant: str | None = None) -> Path:
    """Fetch the files of a hub checkpoint (only those of the chosen variant) into huggingface_hub's cache,
    which resumes interrupted downloads and shows progress bars. Returns the local folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{repo_id}: downloading needs huggingface_hub (pip install huggingface_hub)") from e
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
                f"text_encoder/model{suffix}", f"vqvae/diffusion_pytorch_model{suffix}",
                f"transformer/diffusion_pytorch_model{suffix}"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub raises many types: network, auth, not found, cache; all end here
        raise CheckpointError(
            f"{repo_id}: could not download it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Check the network and the repo id, or download it on another machine with "
            f"`hf download {repo_id} --local-dir <folder>` and pass the folder") from e


def resolve_source(src: str, variant: str | None = None) -> Path:
    """A local folder or file stays as it is; anything of the form owner/name that is not a local path is
    taken as a hub repo id and downloaded."""
    path = Path(src)
    if path.exists():
        return path
    if src.count("/") == 1 and not src.startswith((".", "/")) and not src.endswith(".safetensors"):
        return download(src, variant)
    raise CheckpointError(f"{src}: no such file or folder (and not a hub repo id like amused/amused-256)")


# ----------------------------------------------------------------------------------------------------
# Our single-file format


def config_from_json(cls, text: str, source):
    """Our config dataclass back from the JSON of dataclasses.asdict (JSON lists become tuples)."""
    try:
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{source}: bad {cls.__name__} in the metadata ({e})") from e


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_sampling_defaults(defaults, source) -> dict:
    """Recommended pipeline keywords (SAMPLING_KEYS), checked as the pipeline would check them -> the dict, JSON's
    lists as tuples; CheckpointError naming `source` and the first bad key or value."""
    where = f"{source}: sampling_defaults"
    if not isinstance(defaults, dict):
        raise CheckpointError(f"{where} must be an object of pipeline keywords like "
                              f'{{"steps": 12, "guidance_scale": 4.0}}, got {defaults!r:.60}')
    unknown = sorted(set(defaults) - set(SAMPLING_KEYS))
    if unknown:
        raise CheckpointError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(SAMPLING_KEYS)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in defaults.items()}
    pair = d.get("temperature", 2.0)
    pair = pair if isinstance(pair, tuple) else (pair,)
    checks = [("steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
              ("guidance_scale", lambda v: number(v) and v >= 0, "a finite number >= 0 (<= 1: no guidance)"),
              ("temperature", lambda v: len(pair) in (1, 2) and all(map(number, pair)),
               "a finite number or a pair (first step, last step)")]
    for key, ok, what in checks:
        if key in d and not ok(d[key]):
            raise CheckpointError(f"{where}: {key} must be {what}, got {json.dumps(defaults[key])}")
    try:  # the sampler's keywords, as the pipeline checks them
        Sampler(d.get("sampler", "confidence"), d.get("mask_schedule"), d.get("guidance_schedule", "constant"),
                d.get("guidance_from", 0.5), d.get("softmax_temperature", 1.0), d.get("halton_roll", True))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    return d


def parse_sampling_defaults(meta: dict[str, str], source) -> dict:
    """A converted file's sampling_defaults from its metadata ({} when it has none), checked."""
    if SAMPLING_DEFAULTS_KEY not in meta:
        return {}
    try:
        defaults = json.loads(meta[SAMPLING_DEFAULTS_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: sampling_defaults is not valid JSON ({e})") from None
    return check_sampling_defaults(defaults, source)


def read_sampling_defaults(src) -> dict:
    """The sampling_defaults of a checkpoint, read from the metadata alone, before any weight: a converted file's,
    or {} for a hub folder or repo id (the diffusers layout has no place for them)."""
    path = Path(src)
    return parse_sampling_defaults(converted_metadata(path), path) if path.is_file() else {}


def converted_metadata(path: Path) -> dict[str, str]:
    """The metadata of a file written by `convert`; CheckpointError for any other file."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated") from e
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a converted amused file (metadata format {meta.get('format')!r}); "
                              f"convert a hub checkpoint with `python convert_weights.py SRC -o {path.name}`")
    return meta


def write_sampling_defaults(path, defaults: dict) -> None:
    """Replace the sampling_defaults of a converted file ({} removes them), e.g. after training it through
    train.py in a subprocess. Only the header changes: the tensors' bytes are copied as they are, to a temporary
    file renamed into place (cli.atomic_write), so an interruption leaves the old file whole."""
    path = Path(path)
    converted_metadata(path)
    checked = check_sampling_defaults(defaults, path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))  # safetensors: u64 length, JSON header
        meta = header.setdefault("__metadata__", {})
        meta.pop(SAMPLING_DEFAULTS_KEY, None)
        if checked:
            meta[SAMPLING_DEFAULTS_KEY] = json.dumps(checked)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the tensors' offsets count from the header's end: keep it 8-aligned

        def write(tmp):
            with open(tmp, "wb") as out:
                out.write(len(text).to_bytes(8, "little") + text)
                shutil.copyfileobj(f, out)
        cli.atomic_write(path, write)


def load_converted(path, dtype: torch.dtype | None = None, int8: bool = False) -> Checkpoint:
    """A file written by `convert` -> Checkpoint, each model in the file's dtype (None) or in `dtype`; the
    U-ViT's linears int8 if the file has them so (convert --dtype int8), or, with int8, quantised as read."""
    path = Path(path)
    meta = converted_metadata(path)
    sampling_defaults = parse_sampling_defaults(meta, path)  # before the weights: a bad file fails at once
    configs = {comp.name: config_from_json(comp.config_cls, meta.get(f"{comp.name}.config", ""), path)
               for comp in COMPONENTS.values()}
    quantised = int8_keys(COMPONENTS["transformer"], configs["transformer"], "transformer.") if int8 else frozenset()
    sd = read_safetensors(path, dtype, quantised)
    models = {}
    for comp in COMPONENTS.values():
        cfg = configs[comp.name]
        prefix = comp.name + "."
        part = {k[len(prefix):]: sd.pop(k) for k in list(sd) if k.startswith(prefix)}
        models[comp.name] = build(dataclasses.replace(comp, ignored={}), cfg, part, path)
    start_logits = sd.pop(START_LOGITS_KEY, None)
    if start_logits is not None and (start_logits.dim() != 3
                                     or start_logits.shape[-1] != configs["transformer"].codebook_size):
        raise CheckpointError(f"{path}: {START_LOGITS_KEY} must be (h, w, codebook size "
                              f"{configs['transformer'].codebook_size}), got {tuple(start_logits.shape)}")
    if sd:
        raise CheckpointError(f"{path}: unknown tensors {sorted(sd)[:5]}")
    tokenizer = clip_text.CLIPTokenizer(
        {name: meta.get(TOKENIZER_PREFIX + name, "") for name in clip_text.TOKENIZER_FILES}, source=path)
    mask_id, schedule = scheduler_settings(json.loads(meta.get("scheduler.config", "{}")), path)
    ckpt = Checkpoint(tokenizer, **models, mask_token_id=mask_id, masking_schedule=schedule,
                      sampling_defaults=sampling_defaults, start_logits=start_logits)
    check_components(ckpt, path)
    return ckpt


def load_checkpoint(src, variant: str | None = None, dtype: torch.dtype | None = None,
                    int8: bool = False) -> Checkpoint:
    """A converted .safetensors file, a hub-layout folder, or a hub repo id (downloaded) -> Checkpoint.

    dtype None keeps each file's dtype; a dtype casts every floating tensor as it is read (read_safetensors), so that
    the weights are never held in the file's dtype and in `dtype` at once: an fp32 file loaded as bf16 peaks at the
    bf16 weights plus one fp32 tensor, not at 1.5x the fp32 ones. A tensor already in `dtype` is not copied.
    int8: the U-ViT's linear layers quantised to int8 as they are read (quantize.py); a file written with --dtype
    int8 loads them as int8 in any case."""
    path = resolve_source(str(src), variant)
    return load_converted(path, dtype, int8) if path.is_file() else load_hub_folder(path, variant, dtype, int8)


def single_file_metadata(configs: dict, tokenizer_files: dict[str, str], mask_token_id: int,
                         masking_schedule: str, sampling_defaults: dict | None = None) -> dict[str, str]:
    """The metadata of our single-file format: configs (component name -> our config dataclass), the tokenizer
    files' texts, the scheduler settings, and the sampling defaults if any (check_sampling_defaults)."""
    meta = {"format": FORMAT_VERSION}
    meta.update({f"{name}.config": json.dumps(dataclasses.asdict(cfg)) for name, cfg in configs.items()})
    meta.update({TOKENIZER_PREFIX + name: text for name, text in tokenizer_files.items()})
    meta["scheduler.config"] = json.dumps({"mask_token_id": mask_token_id, "masking_schedule": masking_schedule})
    if sampling_defaults:
        meta[SAMPLING_DEFAULTS_KEY] = json.dumps(check_sampling_defaults(sampling_defaults, "the pipeline"))
    return meta


def save_single_file(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write tensors ("<component>.<key>") and metadata (single_file_metadata) atomically."""
    try:
        cli.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write it ({e.strerror or e})") from e


def convert(folder, out, dtype: torch.dtype | None = None, variant: str | None = None, int8: bool = False) -> dict:
    """Write the hub checkpoint in `folder` as one safetensors file at `out`, cast to `dtype` (None: keep the
    dtype of the source files); with int8, the U-ViT's linear layers as int8 weights and float32 scales
    (quantize.py), quantised as they are read.

    Holds the converted tensors (cast as they are read, one source tensor at a time: read_safetensors), then
    safetensors' serialisation buffer: about two copies of the converted weights. Writes to a temporary file, then
    renames, so nothing half-written is ever left at `out`. Returns a summary: tensors and parameters per
    component, bytes written."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    check_hub_layout(folder)
    tensors, configs, summary = {}, {}, {}
    for comp in COMPONENTS.values():
        cfg = hub_config(folder / comp.name, comp)
        path = weights_file(folder / comp.name, comp.weights, variant)
        model = empty_model(comp, cfg)  # only for its keys and shapes
        n_params = sum(p.numel() for p in model.parameters())
        sd = read_safetensors(path, dtype, int8_keys(comp, cfg) if int8 else frozenset())
        quantize.prepare_int8_(model, sd)
        sd = check_state_dict(model, sd, comp.ignored, path)
        tensors.update({f"{comp.name}.{k}": t.contiguous() for k, t in sd.items()})
        configs[comp.name] = cfg
        summary[comp.name] = (len(model.state_dict()), n_params)
    try:
        files = clip_text.read_tokenizer_files(folder / "tokenizer")
        clip_text.CLIPTokenizer(files, source=folder / "tokenizer")  # fail now, not when someone loads the file
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from e
    sched_path = folder / "scheduler" / "scheduler_config.json"
    mask_id, schedule = scheduler_settings(read_json(sched_path), sched_path)
    save_single_file(out, tensors, single_file_metadata(configs, files, mask_id, schedule))
    summary["bytes"] = out.stat().st_size
    summary["dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return summary


# ----------------------------------------------------------------------------------------------------
# CLI


def main(src: str, out: str, dtype: str | None = None, variant: str | None = None) -> None:
    t0 = time.perf_counter()
    out_path = Path(out)
    if out_path.is_dir() or not out_path.parent.is_dir():
        raise CheckpointError(f"{out}: the output must be a file in an existing folder")
    if not os.access(out_path.parent, os.W_OK):
        raise CheckpointError(f"{out_path.parent}: folder is not writable")
    folder = resolve_source(src, variant)
    if folder.is_file():
        raise CheckpointError(f"{src}: already a single file; pass a hub-layout folder or a hub repo id")
    shown = "int8 (the U-ViT's linear layers; the rest bf16)" if dtype == "int8" else dtype or "stored"
    print(f"converting {folder} ({variant or 'fp32'} files) -> {out} as {shown}")
    float_dtype = torch.bfloat16 if dtype == "int8" else cli.DTYPES[dtype] if dtype else None
    summary = convert(folder, out_path, float_dtype, variant, int8=dtype == "int8")
    total = 0
    for name in COMPONENTS:
        n_tensors, n_params = summary[name]
        total += n_params
        print(f"  {name:<13} {n_tensors:4d} tensors {n_params:>13,} parameters")
    print(f"  {'total':<13} {sum(summary[name][0] for name in COMPONENTS):4d} tensors {total:>13,} parameters, "
          f"{', '.join(summary['dtypes'])}, {summary['bytes'] / 2**20:,.1f} MiB, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Convert an official aMUSEd checkpoint (hub folder or repo id) "
                                            "to one safetensors file.")
    p.add_argument("src", help="hub-layout folder, or a hub repo id such as amused/amused-256 (downloaded)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--dtype", choices=[*sorted(cli.DTYPES), "int8"], default=None,
                   help="dtype of the written weights (default: as stored in the source files); int8: the U-ViT's "
                        "linear layers in int8 with float32 scales (W8A8, quantize.py), everything else in bf16")
    p.add_argument("--variant", choices=["fp16"], default=None,
                   help="read the .fp16.safetensors files of the checkpoint instead of the fp32 ones")
    cli.run(main, p.parse_args(), errors=(CheckpointError, FileNotFoundError))
