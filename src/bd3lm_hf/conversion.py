"""Lossless conversion between the original bd3lms checkpoints and this package's format.

The key map is an explicit table (original name -> our name); the conversion is strict: every key consumed, every
shape checked against the model the config describes, and a report listing what did not match.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from .modeling import BD3LMConfig, BD3LMForBlockDiffusion
from .ema import saved_ema
from .hub import finish_tokenizer_config, longest_prompt
from .model_card import ORIGINAL_SAMPLING, converted_card
from .modeling.configuration_bd3lm import ORIGINAL_FIELD_NAMES
from .modeling.modeling_bd3lm import rotary_inv_freq
from .output_folder import check_output_folder, clear_output_folder
from .tokenization import raise_if_tokenizer_mismatch

logger = logging.get_logger(__name__)

ORIGINAL_PREFIX = "backbone."
# the weights `config_fields_from_weights` reads the shape from
WEIGHT_KEYS_READ = ("backbone.vocab_embed.embedding", "backbone.sigma_map.mlp.0.weight")
# Non-parameter state of the original: derived (rotary) or moved into our config (clip range).
ROTARY_KEY = "backbone.rotary_emb.inv_freq"
CLIP_KEYS = ("sampling_eps_min", "sampling_eps_max")
BERT_VOCAB_SIZE, BERT_MASK_ID = 30522, 103
# Hard-coded in the original code (its LayerNorm), so a model with another value has no original form.
ORIGINAL_LAYER_NORM_EPS = 1e-5
ORIGINAL_ROPE_THETA = 10000.0  # the original's Rotary(dim, base=10_000)

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
# The same tables, read the other way
_ORIGINAL_GLOBAL_KEYS = {ours: original for original, ours in GLOBAL_KEY_MAP.items()}
_ORIGINAL_LAYER_KEYS = {ours: original for original, ours in LAYER_KEY_MAP.items()}
_OUR_LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(.+)")


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
    if our_key in _ORIGINAL_GLOBAL_KEYS:
        return ORIGINAL_PREFIX + _ORIGINAL_GLOBAL_KEYS[our_key]
    match = _OUR_LAYER_PATTERN.fullmatch(our_key)
    if match and match.group(2) in _ORIGINAL_LAYER_KEYS:
        return f"{ORIGINAL_PREFIX}blocks.{match.group(1)}.{_ORIGINAL_LAYER_KEYS[match.group(2)]}"
    raise KeyError(our_key)


def config_from_original(original: dict, clip_range: tuple[float, float] | None = None) -> BD3LMConfig:
    """Our config from an original `config.json` dict (model_type "bd3lm" or "mdlm")."""
    # return_dict=False is for the original code (it indexes the output as logits): ours keep the default ModelOutput.
    fields = {k: v for k, v in original.items()
              if k not in ("architectures", "auto_map", "_name_or_path", "model_type", "transformers_version",
                           "torch_dtype", "dtype", "return_dict")}
    if original.get("model_type") == "mdlm":
        fields["block_size"] = fields.get("model_length", fields.get("max_position_embeddings"))
        fields.setdefault("sampling_eps_max", 1.0)
    if clip_range is not None:  # the grid-searched values saved with the weights win over config.json
        fields["sampling_eps_min"], fields["sampling_eps_max"] = clip_range
    config = BD3LMConfig(**{**fields, **implied_mask_id(fields)})
    # The original's var_min (its weights hold the clip buffers) and cross_attn, where they differ from what the
    # shape implies (e.g. an MDLM-shaped checkpoint saved with BD3-LM flags): kept, so that the conversion back
    # writes the same files.
    implied = implied_flags(config)
    found = {"var_min": clip_range is not None, "cross_attn": original.get("cross_attn", implied["cross_attn"])}
    deviations = {name: value for name, value in found.items() if value != implied[name]}
    if deviations:
        config.original_flags = deviations
    return config


def implied_mask_id(fields: dict) -> dict:
    """The mask id an original config implies when it records none."""
    if "mask_token_id" not in fields and fields.get("vocab_size") == BERT_VOCAB_SIZE:
        # The original records no mask id: OWT models append [MASK] last (our default), LM1B models use
        # bert-base-uncased, whose own [MASK] is 103.
        logger.info("vocab_size %d (bert-base-uncased, LM1B): mask_token_id = %d", BERT_VOCAB_SIZE, BERT_MASK_ID)
        return {"mask_token_id": BERT_MASK_ID}
    return {}


def implied_flags(config: BD3LMConfig) -> dict:
    """The original's var_min and cross_attn for our shape: both on for a BD3-LM, off for one block (MDLM)."""
    several_blocks = config.num_blocks > 1
    return {"var_min": several_blocks, "cross_attn": several_blocks}


def original_flags(config: BD3LMConfig) -> dict:
    """var_min and cross_attn to write: the shape's, unless the converted checkpoint had others (`original_flags`)."""
    return {**implied_flags(config), **(getattr(config, "original_flags", None) or {})}


def config_to_original(config: BD3LMConfig, dtype: str = "float32") -> dict:
    """The original bd3lms `config.json` fields for our config (`dtype`: that of the weights written with it)."""
    _check_expressible_in_original(config)
    inverse = {v: k for k, v in ORIGINAL_FIELD_NAMES.items()}
    original = {inverse[name]: getattr(config, name) for name in inverse}
    original.update(
        model_type="bd3lm", block_size=config.block_size, vocab_size=config.vocab_size, cond_dim=config.cond_dim,
        time_conditioning=config.time_conditioning, **original_flags(config),
        sampling_eps_min=config.sampling_eps_min, sampling_eps_max=config.sampling_eps_max,
        attn_backend="sdpa", adaln=True, causal=False, architectures=["BD3LM"],
        auto_map={"AutoConfig": "configuration_bd3lm.BD3LMConfig", "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
        # The original backbone returns a ModelOutput unless return_dict is False, and its diffusion code indexes
        # the result as a logits tensor: every released config sets it.
        return_dict=False, torch_dtype=dtype,
    )
    return dict(sorted(original.items()))


def _check_expressible_in_original(config: BD3LMConfig) -> None:
    """Refuse what the original format cannot record (it would be lost silently and change the logits)."""
    # the original records no mask id: the last id, except for bert-base-uncased's vocabulary (its own [MASK])
    implied = BERT_MASK_ID if config.vocab_size == BERT_VOCAB_SIZE else config.vocab_size - 1
    if config.mask_token_id != implied:
        raise ConversionError(f"mask_token_id={config.mask_token_id} cannot be expressed in the original format, "
                              f"which records none and implies {implied} for vocab_size={config.vocab_size} (the "
                              f"last id, or {BERT_MASK_ID} for the bert-base-uncased vocabulary); allowed: {implied}.")
    if config.layer_norm_eps != ORIGINAL_LAYER_NORM_EPS:
        raise ConversionError(f"layer_norm_eps={config.layer_norm_eps} cannot be expressed in the original format "
                              f"(whose code hard-codes {ORIGINAL_LAYER_NORM_EPS}); allowed: {ORIGINAL_LAYER_NORM_EPS}.")
    if config.rope_theta != ORIGINAL_ROPE_THETA:
        raise ConversionError(f"rope_theta={config.rope_theta} cannot be expressed in the original format (whose "
                              f"code hard-codes the rotary base {ORIGINAL_ROPE_THETA:g}); allowed: "
                              f"{ORIGINAL_ROPE_THETA:g}.")


def expected_shapes(config: BD3LMConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = BD3LMForBlockDiffusion(config)
    return {name: p.shape for name, p in model.state_dict().items()}


def convert_original_state_dict(original: dict[str, torch.Tensor], config: BD3LMConfig) -> dict[str, torch.Tensor]:
    """Map an original state dict (prefix `backbone.`, plus clip buffers) onto ours; strict."""
    converted, problems = {}, []
    for key, tensor in original.items():
        if key in CLIP_KEYS:
            continue
        if key == ROTARY_KEY:
            problems += _check_rotary(tensor, config)
            continue
        try:
            converted[original_to_ours_key(key)] = tensor
        except KeyError:
            problems.append(f"unexpected key {key!r} (not in the key map)")
    _raise_if_any(problems + state_dict_problems(converted, config, shown_as=ours_to_original_key))
    return converted


def state_dict_problems(state_dict: dict[str, torch.Tensor], config: BD3LMConfig, shown_as=str) -> list[str]:
    """Every key of `state_dict` (our names) against the model `config` describes: unexpected, wrong shape, missing.

    `shown_as` names a key in the messages as the user's checkpoint names it."""
    shapes = expected_shapes(config)
    problems = []
    for key, tensor in state_dict.items():
        if key not in shapes:
            problems.append(f"unexpected key {shown_as(key)!r}: not in the model the config describes "
                            f"(num_hidden_layers={config.num_hidden_layers})")
        elif tensor.shape != shapes[key]:
            problems.append(f"shape mismatch for {shown_as(key)!r}: checkpoint {tuple(tensor.shape)}, "
                            f"config expects {tuple(shapes[key])}")
    return problems + [f"missing key {shown_as(key)!r}" for key in shapes if key not in state_dict]


def _raise_if_any(problems: list[str]) -> None:
    if problems:  # all of them at once: a user fixing one at a time would run the conversion again and again
        raise ConversionError("checkpoint does not match the config:\n  " + "\n  ".join(problems))


def _check_rotary(inv_freq: torch.Tensor, config: BD3LMConfig) -> list[str]:
    half = config.head_dim // 2
    if inv_freq.shape != (half,):
        return [f"shape mismatch for {ROTARY_KEY!r}: checkpoint {tuple(inv_freq.shape)}, head_dim "
                f"{config.head_dim} expects ({half},)"]
    expected = rotary_inv_freq(config.head_dim, config.rope_theta)
    if not torch.equal(inv_freq.float(), expected):
        return [f"{ROTARY_KEY!r} differs from rope_theta={config.rope_theta}"]
    return []


def convert_to_original_state_dict(state_dict: dict[str, torch.Tensor], config: BD3LMConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the original keys, with the rotary buffer and (for BD3-LM) the clip-range buffers."""
    original = {ours_to_original_key(k): v for k, v in state_dict.items()}
    original[ROTARY_KEY] = rotary_inv_freq(config.head_dim, config.rope_theta)
    if original_flags(config)["var_min"]:
        original["sampling_eps_min"] = torch.tensor(config.sampling_eps_min, dtype=torch.float32)
        original["sampling_eps_max"] = torch.tensor(config.sampling_eps_max, dtype=torch.float32)
    return original


def clip_range_from(state_dict: dict[str, torch.Tensor]) -> tuple[float, float] | None:
    if all(key in state_dict for key in CLIP_KEYS):
        return tuple(float(state_dict[key]) for key in CLIP_KEYS)
    return None


def load_original(src: str | os.PathLike, original_config: dict | None = None,
                  use_ema: bool = True) -> BD3LMForBlockDiffusion:
    """Load an original checkpoint: a Hub folder (config.json + model.safetensors) or a Lightning `.ckpt`.

    A `.ckpt` carries no readable config (its Hydra config is a pickled object, which `weights_only` loading
    refuses): pass the original config fields as `original_config` (at least `block_size` and `model_length`; the
    widths are read off the weights). From a `.ckpt`, `use_ema=True` takes its EMA weights (what the original
    evaluates and samples with), False the raw trained weights; a Hub folder holds one set of weights only.
    """
    src = Path(src)
    if src.is_dir() and not use_ema:
        raise ConversionError(f"{src} is a Hub folder, which holds one set of weights: use_ema=False (--no-ema) "
                              "chooses the raw weights of a Lightning .ckpt only.")
    if src.is_dir():
        recorded = read_json(src / "config.json")
        if "BD3LMForBlockDiffusion" in (recorded.get("architectures") or []):
            raise ConversionError(f"{src} is already in this package's format; to write the original format, "
                                  "convert it with --to-original.")
        original_config = merge_config_fields(recorded, original_config)
        state_dict = read_folder_weights(src)
    elif src.suffix == ".ckpt":
        state_dict = read_lightning_checkpoint(src, use_ema)
        original_config = merge_config_fields(config_fields_from_weights(state_dict), original_config)
        missing = [name for name in ("block_size", "model_length") if name not in original_config]
        if missing:
            raise ConversionError(f"a .ckpt does not record {missing}: pass them (CLI: --block-size, "
                                  "--model-length, or --config with the original config.json).")
    else:
        raise ConversionError(f"{src} is neither a folder with config.json + model.safetensors nor a .ckpt file.")
    config = config_from_original(original_config, clip_range_from(state_dict))
    weights = convert_original_state_dict(state_dict, config)
    model = BD3LMForBlockDiffusion(config)
    model.load_state_dict(weights, strict=True)
    # in the weights' dtype (bf16 weights stay bf16: the round trip is byte-identical, the folder no larger); the
    # rotary frequencies stay fp32, as `.to()` keeps them
    return model.to(weights_dtype(weights)).eval()


def weights_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of most floating-point weights (a checkpoint's fp32 buffers, such as the rotary frequencies, do not
    decide it)."""
    counts = {}
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get, default=torch.float32)


def merge_config_fields(recorded: dict, given: dict | None) -> dict:
    """`recorded` (config.json, or what the weights determine) completed by `given`; a conflict is an error."""
    conflicts = [f"{k}: checkpoint has {recorded[k]!r}, given {v!r}" for k, v in (given or {}).items()
                 if k in recorded and recorded[k] != v]
    if conflicts:
        raise ConversionError("the given config fields contradict the checkpoint:\n  " + "\n  ".join(conflicts))
    return {**recorded, **(given or {})}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} does not exist: a checkpoint folder needs its config.json.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path} is not a readable JSON file: {error}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path} does not exist: the weights of a checkpoint folder are in {path.name}.")
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:  # truncated or not a safetensors file at all
        raise ConversionError(f"{path} is not a readable safetensors file: {error}") from None


def read_lightning_checkpoint(path: Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Original-keyed state dict (EMA weights by default) from a bd3lms Lightning `.ckpt`.

    The Lightning module holds the backbone under `backbone.` and the EMA as `ema.shadow_params`: a list in the
    order of `backbone.parameters()`, i.e. of the parameter keys of `state_dict` (buffers excluded). The searched
    clip range is saved both as buffers and at the top level of the checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or pickled objects other than tensors and containers
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ConversionError(f"{path} is not a checkpoint torch.load(weights_only=True) can read: "
                              f"{first_line}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(f"{path} has no 'state_dict' (it holds {found}): a bd3lms Lightning checkpoint keeps "
                              "the weights there.")
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in checkpoint["state_dict"].items()}
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX) or k in CLIP_KEYS}
    missing = [key for key in WEIGHT_KEYS_READ if key not in state_dict]
    if missing:
        found = sorted(checkpoint["state_dict"])[:5]
        raise ConversionError(f"{path} is not a bd3lms Lightning checkpoint: its state_dict lacks {missing} (its "
                              f"first keys: {found}).")
    for key in CLIP_KEYS:
        if key in checkpoint:
            state_dict[key] = torch.as_tensor(checkpoint[key]).float()
    if use_ema and "ema" in checkpoint:
        parameter_keys = [k for k in state_dict if k != ROTARY_KEY and k not in CLIP_KEYS]
        shadow = checkpoint["ema"].get("shadow_params") if isinstance(checkpoint["ema"], dict) else None
        if not isinstance(shadow, (list, tuple)):
            raise ConversionError(f"{path}: its 'ema' entry holds no list 'shadow_params' (the bd3lms EMA's "
                                  "state); pass use_ema=False (CLI: --no-ema) to convert the raw weights.")
        if len(shadow) != len(parameter_keys):
            raise ConversionError(f"EMA has {len(shadow)} tensors but the backbone has {len(parameter_keys)} "
                                  "parameters; pass use_ema=False (CLI: --no-ema) to convert the raw weights.")
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
                    tokenizer=None, overwrite: bool = False, use_ema: bool = True,
                    sources=()) -> BD3LMForBlockDiffusion:
    """Original folder or `.ckpt` -> our Hub folder (config, code, weights, and a generation config holding the
    original's sampling, `ORIGINAL_SAMPLING`; with `tokenizer`, also the tokenizer and a model card, so that the
    folder is ready for `bd3lm-hf push`). `dst` must be new or empty, or
    `overwrite` empties it (never when it holds `src` or one of `sources`: other files the conversion came from,
    such as the config file `original_config` was read from). `use_ema`: see `load_original`."""
    check_output_folder(dst, overwrite, (src, *sources), ConversionError)
    model = load_original(src, original_config, use_ema)
    model.generation_config.update(**ORIGINAL_SAMPLING)
    if tokenizer is not None:
        raise_if_tokenizer_mismatch(tokenizer, model, ConversionError)
        model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    clear_output_folder(dst)  # only now: a source that fails to convert leaves the previous output as it was
    model.save_pretrained(dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
        finish_tokenizer_config(Path(dst) / "tokenizer_config.json", longest_prompt(model.config))
        source_name = Path(src).resolve().name if Path(src).is_dir() else Path(src).stem
        converted_card(model, source_name, Path(dst).resolve().name).save(Path(dst) / "README.md")
    logger.info("converted %s -> %s", src, dst)
    return model


def convert_to_original(src: str | os.PathLike, dst: str | os.PathLike,
                        code_from: str | os.PathLike | None = None, overwrite: bool = False) -> None:
    """Our folder -> the original Hub format (config.json + model.safetensors with the original keys); strict.

    The original code files (`configuration_bd3lm.py`, `modeling_bd3lm.py`) are not ours to ship: `code_from`, a
    download of an original Hub repo, provides them; without it the folder loads only once they are added."""
    src, dst = Path(src), Path(dst)
    check_output_folder(dst, overwrite, (src, code_from), ConversionError)
    config = read_our_config(src)
    state_dict = read_folder_weights(src)
    state_dict.update({name: tensor.to(state_dict[name].dtype)  # a training checkpoint: its EMA weights
                       for name, tensor in (saved_ema(src, state_dict) or {}).items()})
    if any(key.startswith(ORIGINAL_PREFIX) for key in state_dict):
        raise ConversionError(f"{src} holds original (`backbone.`) weights: it is already in the original format; "
                              "convert it without --to-original.")
    _raise_if_any(state_dict_problems(state_dict, config))
    dtype_name = str(weights_dtype(state_dict)).removeprefix("torch.")  # what load_original brings back
    original_config = config_to_original(config, dtype_name)  # refuses what it cannot express
    # checked before the output folder is emptied: a mistyped --code-from must not cost a previous conversion
    code_files = None if code_from is None else original_code_files(Path(code_from), original_config["auto_map"])
    clear_output_folder(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(convert_to_original_state_dict(state_dict, config), dst / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(original_config, indent=2, sort_keys=True) + "\n")
    if code_files is not None:
        copy_original_code(code_files, dst, code_from)
    else:
        logger.warning("%s has no code files: bd3lm_hf does not ship the original code. To load it with "
                       "trust_remote_code=True, copy %s from a download of an original Hub repo (e.g. "
                       "kuleshov-group/bd3lm-owt-block_size16), or convert with --code-from THAT_FOLDER.", dst,
                       " and ".join(_code_files(original_config["auto_map"])))
    logger.info("converted %s -> %s (original format)", src, dst)


def read_our_config(folder: Path) -> BD3LMConfig:
    """The config of a folder in this package's format; an original bd3lms folder is refused by name."""
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder: --to-original converts a folder in this package's format.")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} holds LoRA adapters, not a model: merge them into their base first "
                              f"(`bd3lm-hf export {folder} MERGED`, which uses a checkpoint's EMA too), then convert "
                              "MERGED.")
    fields = read_json(folder / "config.json")
    original_names = sorted(name for name in ORIGINAL_FIELD_NAMES if name in fields)
    if fields.get("architectures") == ["BD3LM"] or original_names:
        raise ConversionError(f"{folder} is already in the original bd3lms format (architectures "
                              f"{fields.get('architectures')}, fields {original_names}): convert it without "
                              "--to-original.")
    if fields.get("model_type") != BD3LMConfig.model_type:
        raise ConversionError(f"{folder} is not a BD3-LM folder (model_type {fields.get('model_type')!r}, "
                              f"allowed: {BD3LMConfig.model_type!r}).")
    return BD3LMConfig.from_dict(fields)


def read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of a Hub folder (either format): `model.safetensors`, or the shards listed by
    `model.safetensors.index.json`."""
    if (folder / SAFE_WEIGHTS_NAME).is_file() or not (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return read_safetensors(folder / SAFE_WEIGHTS_NAME)
    weight_map = read_json(folder / SAFE_WEIGHTS_INDEX_NAME).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{folder / SAFE_WEIGHTS_INDEX_NAME} has no weight_map: cannot find the shards.")
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(read_safetensors(folder / shard))
    return state_dict


def _code_files(auto_map: dict) -> list[str]:
    """`{"AutoConfig": "configuration_bd3lm.BD3LMConfig", ...}` -> ["configuration_bd3lm.py", ...]."""
    return sorted({reference.split("--")[-1].rsplit(".", 1)[0] + ".py" for reference in auto_map.values()})


def original_code_files(code_from: Path, auto_map: dict) -> set[Path]:
    """The code files `auto_map` names, and the files they import relatively, in the user's download of an original
    Hub repo; a ConversionError names what is missing."""
    from transformers.dynamic_module_utils import get_relative_import_files

    named = [code_from / name for name in _code_files(auto_map)]
    missing = [path.name for path in named if not path.is_file()]
    if missing:
        raise ConversionError(f"--code-from {code_from} lacks {missing}: pass the folder of a download of an "
                              "original bd3lms Hub repo (e.g. `hf download kuleshov-group/bd3lm-owt-block_size16 "
                              "--local-dir FOLDER`).")
    for module, name in (entry.split("--")[-1].rsplit(".", 1) for entry in auto_map.values()):
        if f"class {name}(" not in (code_from / f"{module}.py").read_text(encoding="utf-8", errors="replace"):
            raise ConversionError(f"--code-from {code_from}: {module}.py defines no class {name}, so it is not the "
                                  "original bd3lms code (this package's own code files have the same names): pass "
                                  "the folder of a download of an original bd3lms Hub repo.")
    files = set(named)
    for path in named:
        files.update(Path(imported) for imported in get_relative_import_files(str(path)))
    for path in sorted(files):
        if not path.is_file():
            raise ConversionError(f"--code-from {code_from}: {path.name}, imported by the original code, is missing.")
    return files


def copy_original_code(files: set[Path], dst: Path, code_from) -> None:
    """Copy `original_code_files` into `dst`: the folder then loads with trust_remote_code=True as that repo does."""
    for path in sorted(files):
        if path.resolve() != (dst / path.name).resolve():
            shutil.copyfile(path, dst / path.name)
    logger.info("copied the original code (%s) from %s", ", ".join(sorted(p.name for p in files)), code_from)
