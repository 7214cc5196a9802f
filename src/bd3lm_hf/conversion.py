"""Lossless conversion between the original bd3lms checkpoints and this package's format.

The key map is an explicit table (original name -> our name); the conversion is strict: every key consumed, every
shape checked against the model the config describes, and a report listing what did not match.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from .modeling import BD3LMConfig, BD3LMForBlockDiffusion
from .modeling.configuration_bd3lm import ORIGINAL_FIELD_NAMES

logger = logging.get_logger(__name__)

ORIGINAL_PREFIX = "backbone."
# Non-parameter state of the original: derived (rotary) or moved into our config (clip range).
ROTARY_KEY = "backbone.rotary_emb.inv_freq"
CLIP_KEYS = ("sampling_eps_min", "sampling_eps_max")
BERT_VOCAB_SIZE, BERT_MASK_ID = 30522, 103

GLOBAL_KEY_MAP = {
    "vocab_embed.embedding": "model.embed_tokens.weight",
    "sigma_map.mlp.0.weight": "model.timestep_embedder.linear_1.weight",
    "sigma_map.mlp.0.bias": "model.timestep_embedder.linear_1.bias",
    "sigma_map.mlp.2.weight": "model.timestep_embedder.linear_2.weight",
    "sigma_map.mlp.2.bias": "model.timestep_embedder.linear_2.bias",
    "output_layer.norm_final.weight": "model.norm.weight",
    "output_layer.adaLN_modulation.weight": "model.norm_modulation.weight",
    "output_layer.adaLN_modulation.bias": "model.norm_modulation.bias",
    "output_layer.linear.weight": "lm_head.weight",
    "output_layer.linear.bias": "lm_head.bias",
}
LAYER_KEY_MAP = {
    "norm1.weight": "input_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "mlp.0.weight": "mlp.fc_in.weight",
    "mlp.0.bias": "mlp.fc_in.bias",
    "mlp.2.weight": "mlp.fc_out.weight",
    "mlp.2.bias": "mlp.fc_out.bias",
    "adaLN_modulation.weight": "adaln_modulation.weight",
    "adaLN_modulation.bias": "adaln_modulation.bias",
}
_LAYER_PATTERN = re.compile(r"blocks\.(\d+)\.(.+)")


class ConversionError(ValueError):
    """A checkpoint does not match the model its config describes; the message lists every mismatch."""


def original_to_ours_key(original_key: str) -> str:
    """`backbone.blocks.3.attn_qkv.weight` -> `model.layers.3.self_attn.qkv_proj.weight`; KeyError if unknown."""
    if not original_key.startswith(ORIGINAL_PREFIX):
        raise KeyError(original_key)
    name = original_key[len(ORIGINAL_PREFIX):]
    if name in GLOBAL_KEY_MAP:
        return GLOBAL_KEY_MAP[name]
    match = _LAYER_PATTERN.fullmatch(name)
    if match and match.group(2) in LAYER_KEY_MAP:
        return f"model.layers.{match.group(1)}.{LAYER_KEY_MAP[match.group(2)]}"
    raise KeyError(original_key)


def ours_to_original_key(our_key: str) -> str:
    inverse_global = {v: k for k, v in GLOBAL_KEY_MAP.items()}
    if our_key in inverse_global:
        return ORIGINAL_PREFIX + inverse_global[our_key]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", our_key)
    inverse_layer = {v: k for k, v in LAYER_KEY_MAP.items()}
    if match and match.group(2) in inverse_layer:
        return f"{ORIGINAL_PREFIX}blocks.{match.group(1)}.{inverse_layer[match.group(2)]}"
    raise KeyError(our_key)


def config_from_original(original: dict, clip_range: tuple[float, float] | None = None) -> BD3LMConfig:
    """Our config from an original `config.json` dict (model_type "bd3lm" or "mdlm")."""
    fields = {k: v for k, v in original.items()
              if k not in ("architectures", "auto_map", "_name_or_path", "model_type", "transformers_version",
                           "torch_dtype", "dtype")}
    if original.get("model_type") == "mdlm":
        fields["block_size"] = fields.get("model_length", fields.get("max_position_embeddings"))
        fields.setdefault("sampling_eps_max", 1.0)
    if clip_range is not None:  # the grid-searched values saved with the weights win over config.json
        fields["sampling_eps_min"], fields["sampling_eps_max"] = clip_range
    if "mask_token_id" not in fields and fields.get("vocab_size") == BERT_VOCAB_SIZE:
        # The original records no mask id: OWT models append [MASK] last (our default), LM1B models use
        # bert-base-uncased, whose own [MASK] is 103.
        fields["mask_token_id"] = BERT_MASK_ID
        logger.info("vocab_size %d (bert-base-uncased, LM1B): mask_token_id = %d", BERT_VOCAB_SIZE, BERT_MASK_ID)
    return BD3LMConfig(**fields)


def config_to_original(config: BD3LMConfig) -> dict:
    """The original bd3lms `config.json` fields for our config."""
    if config.mask_token_id not in (config.vocab_size - 1, BERT_MASK_ID if config.vocab_size == BERT_VOCAB_SIZE
                                    else None):
        raise ConversionError(f"mask_token_id={config.mask_token_id} cannot be expressed in the original format "
                              "(which assumes the last id, or 103 for the bert-base-uncased vocabulary).")
    inverse = {v: k for k, v in ORIGINAL_FIELD_NAMES.items()}
    original = {inverse[name]: getattr(config, name) for name in inverse}
    is_mdlm = config.block_size == config.max_position_embeddings
    original.update(
        model_type="bd3lm", block_size=config.block_size, vocab_size=config.vocab_size, cond_dim=config.cond_dim,
        time_conditioning=config.time_conditioning, cross_attn=not is_mdlm, var_min=not is_mdlm,
        sampling_eps_min=config.sampling_eps_min, sampling_eps_max=config.sampling_eps_max,
        attn_backend="sdpa", adaln=True, causal=False, architectures=["BD3LM"],
        auto_map={"AutoConfig": "configuration_bd3lm.BD3LMConfig", "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
    )
    return dict(sorted(original.items()))


def expected_shapes(config: BD3LMConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = BD3LMForBlockDiffusion(config)
    return {name: p.shape for name, p in model.state_dict().items()}


def convert_original_state_dict(original: dict[str, torch.Tensor], config: BD3LMConfig) -> dict[str, torch.Tensor]:
    """Map an original state dict (prefix `backbone.`, plus clip buffers) onto ours; strict."""
    shapes = expected_shapes(config)
    converted, problems = {}, []
    for key, tensor in original.items():
        if key in CLIP_KEYS:
            continue
        if key == ROTARY_KEY:
            problems += _check_rotary(tensor, config)
            continue
        try:
            ours = original_to_ours_key(key)
        except KeyError:
            problems.append(f"unexpected key {key!r} (not in the key map)")
            continue
        if ours not in shapes:
            problems.append(f"unexpected key {key!r}: the config has no {ours!r} "
                            f"(num_hidden_layers={config.num_hidden_layers})")
        elif tensor.shape != shapes[ours]:
            problems.append(f"shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)}, "
                            f"config expects {tuple(shapes[ours])}")
        else:
            converted[ours] = tensor
    problems += [f"missing key {ours_to_original_key(k)!r}" for k in shapes if k not in converted]
    if problems:
        raise ConversionError("checkpoint does not match the config:\n  " + "\n  ".join(problems))
    return converted


def _check_rotary(inv_freq: torch.Tensor, config: BD3LMConfig) -> list[str]:
    half = config.head_dim // 2
    if inv_freq.shape != (half,):
        return [f"shape mismatch for {ROTARY_KEY!r}: checkpoint {tuple(inv_freq.shape)}, head_dim "
                f"{config.head_dim} expects ({half},)"]
    expected = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    if not torch.equal(inv_freq.float(), expected):
        return [f"{ROTARY_KEY!r} differs from rope_theta={config.rope_theta}"]
    return []


def convert_to_original_state_dict(state_dict: dict[str, torch.Tensor], config: BD3LMConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the original keys, with the rotary buffer and (for BD3-LM) the clip-range buffers."""
    original = {ours_to_original_key(k): v for k, v in state_dict.items()}
    original[ROTARY_KEY] = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    if config.block_size != config.max_position_embeddings:
        original["sampling_eps_min"] = torch.tensor(config.sampling_eps_min, dtype=torch.float32)
        original["sampling_eps_max"] = torch.tensor(config.sampling_eps_max, dtype=torch.float32)
    return original


def clip_range_from(state_dict: dict[str, torch.Tensor]) -> tuple[float, float] | None:
    if all(key in state_dict for key in CLIP_KEYS):
        return tuple(float(state_dict[key]) for key in CLIP_KEYS)
    return None


def load_original(src: str | os.PathLike, original_config: dict | None = None) -> BD3LMForBlockDiffusion:
    """Load an original checkpoint: a Hub folder (config.json + model.safetensors) or a Lightning `.ckpt`.

    A `.ckpt` carries no readable config (its Hydra config is a pickled object, which `weights_only` loading
    refuses): pass the original config fields as `original_config` (at least `block_size` and `model_length`; the
    widths are read off the weights).
    """
    src = Path(src)
    if src.is_dir():
        original_config = merge_config_fields(json.loads((src / "config.json").read_text()), original_config)
        state_dict = load_file(src / "model.safetensors")
    elif src.suffix == ".ckpt":
        state_dict = read_lightning_checkpoint(src)
        original_config = merge_config_fields(config_fields_from_weights(state_dict), original_config)
        missing = [name for name in ("block_size", "model_length") if name not in original_config]
        if missing:
            raise ConversionError(f"a .ckpt does not record {missing}: pass them (CLI: --block-size, "
                                  "--model-length, or --config with the original config.json).")
    else:
        raise ValueError(f"{src} is neither a folder with config.json + model.safetensors nor a .ckpt file.")
    config = config_from_original(original_config, clip_range_from(state_dict))
    weights = convert_original_state_dict(state_dict, config)
    model = BD3LMForBlockDiffusion(config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def merge_config_fields(recorded: dict, given: dict | None) -> dict:
    """`recorded` (config.json, or what the weights determine) completed by `given`; a conflict is an error."""
    conflicts = [f"{k}: checkpoint has {recorded[k]!r}, given {v!r}" for k, v in (given or {}).items()
                 if k in recorded and recorded[k] != v]
    if conflicts:
        raise ConversionError("the given config fields contradict the checkpoint:\n  " + "\n  ".join(conflicts))
    return {**recorded, **(given or {})}


def read_lightning_checkpoint(path: Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Original-keyed state dict (EMA weights by default) from a bd3lms Lightning `.ckpt`.

    The Lightning module holds the backbone under `backbone.` and the EMA as `ema.shadow_params`: a list in the
    order of `backbone.parameters()`, i.e. of the parameter keys of `state_dict` (buffers excluded). The searched
    clip range is saved both as buffers and at the top level of the checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refuses objects other than tensors and containers
        raise ConversionError(f"{path} cannot be read with torch.load(weights_only=True): {error}") from None
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in checkpoint["state_dict"].items()}
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX) or k in CLIP_KEYS}
    for key in CLIP_KEYS:
        if key in checkpoint:
            state_dict[key] = torch.as_tensor(checkpoint[key]).float()
    if use_ema and "ema" in checkpoint:
        parameter_keys = [k for k in state_dict if k != ROTARY_KEY and k not in CLIP_KEYS]
        shadow = checkpoint["ema"]["shadow_params"]
        if len(shadow) != len(parameter_keys):
            raise ConversionError(f"EMA has {len(shadow)} tensors but the backbone has {len(parameter_keys)} "
                                  "parameters; pass use_ema=False to export the raw weights.")
        for key, value in zip(parameter_keys, shadow):
            if value.shape != state_dict[key].shape:
                raise ConversionError(f"EMA tensor for {key!r} has shape {tuple(value.shape)}, "
                                      f"weights have {tuple(state_dict[key].shape)}.")
            state_dict[key] = value
    elif use_ema:
        logger.warning("%s has no EMA weights; exporting the raw weights.", path)
    return state_dict


def config_fields_from_weights(state_dict: dict[str, torch.Tensor]) -> dict:
    """The original config fields the weights determine (widths, depth, heads via the rotary buffer)."""
    vocab_size, hidden_dim = state_dict["backbone.vocab_embed.embedding"].shape
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))}
    fields = {"vocab_size": vocab_size, "hidden_dim": hidden_dim, "n_blocks": len(layers),
              "cond_dim": state_dict["backbone.sigma_map.mlp.0.weight"].shape[0]}
    if ROTARY_KEY in state_dict:
        fields["n_heads"] = hidden_dim // (2 * state_dict[ROTARY_KEY].shape[0])
    return fields


def convert_to_ours(src: str | os.PathLike, dst: str | os.PathLike, original_config: dict | None = None,
                    tokenizer=None) -> BD3LMForBlockDiffusion:
    """Original folder or `.ckpt` -> our Hub folder (config, code, weights, and `tokenizer` when given)."""
    model = load_original(src, original_config)
    if tokenizer is not None:
        if len(tokenizer) != model.config.vocab_size or tokenizer.mask_token_id != model.config.mask_token_id:
            raise ConversionError(f"the tokenizer ({len(tokenizer)} tokens, [MASK] = {tokenizer.mask_token_id}) "
                                  f"does not match the checkpoint (vocab_size={model.config.vocab_size}, "
                                  f"mask_token_id={model.config.mask_token_id}).")
        model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    logger.info("converted %s -> %s", src, dst)
    return model


def convert_to_original(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Our folder -> the original Hub format (config.json + model.safetensors with the original keys)."""
    model = BD3LMForBlockDiffusion.from_pretrained(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(convert_to_original_state_dict(state_dict, model.config), dst / "model.safetensors",
              metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config_to_original(model.config), indent=2, sort_keys=True) + "\n")
    logger.info("converted %s -> %s (original format)", src, dst)
