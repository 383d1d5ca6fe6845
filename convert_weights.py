"""convert_weights.py: read the official aMUSEd checkpoints (Hugging Face diffusers layout) into our modules.

A hub checkpoint (`amused/amused-256`, `amused/amused-512`) is a folder of components:
    text_encoder/  config.json + model.safetensors                       (transformers CLIPTextModelWithProjection)
    tokenizer/     vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
    vqvae/         config.json + diffusion_pytorch_model.safetensors      (diffusers VQModel)
    transformer/   config.json + diffusion_pytorch_model.safetensors      (diffusers UVit2DModel)
    scheduler/     scheduler_config.json                                  (mask_token_id, masking schedule)
each weight file also as a `.fp16.safetensors` variant. Our modules mirror the reference names, so the key map
of every component is the identity; what this file adds is the accounting: every key of the file loaded or
listed below as ignored with a reason, every shape asserted, strict loading.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

import clip_text


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or does not match the model: the message names the file."""


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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated, download it again") from e


def load_exactly(model: nn.Module, sd: dict[str, torch.Tensor], ignored: dict[str, str], source: Path) -> None:
    """Load `sd` into `model` with an identity key map: every key of ours filled, every key of the file used
    or in `ignored` (key -> reason), every shape equal. Raises CheckpointError naming the first offenders."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd]
    unknown = [k for k in sd if k not in ours and k not in ignored]
    if missing or unknown:
        raise CheckpointError(f"{source}: keys do not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(t.shape)})" for k, t in ours.items() if sd[k].shape != t.shape]
    if wrong:
        raise CheckpointError(f"{source}: tensors of the wrong shape, e.g. {', '.join(wrong[:3])}; "
                              f"does the config.json belong to these weights?")
    model.load_state_dict({k: sd[k] for k in ours}, strict=True)


# ----------------------------------------------------------------------------------------------------
# Text encoder

TEXT_ENCODER_IGNORED = {
    # transformers 4.x saved this buffer (arange(77)); we index the position table directly.
    "text_model.embeddings.position_ids": "position index buffer of older transformers versions",
}


def load_text_encoder(folder, variant: str | None = None) -> clip_text.CLIPTextEncoder:
    """A hub `text_encoder/` folder (config.json + model[.variant].safetensors) -> CLIPTextEncoder, in the
    file's dtype (use .to() to cast)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    d = read_json(config_path)
    try:
        cfg = clip_text.config_from_hub(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    path = weights_file(folder, "model", variant)
    sd = read_safetensors(path)
    with torch.device("meta"):
        model = clip_text.CLIPTextEncoder(cfg)
    model.to_empty(device="cpu")  # no point initialising weights we are about to overwrite
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    load_exactly(model, sd, TEXT_ENCODER_IGNORED, path)
    return model.eval().requires_grad_(False)
