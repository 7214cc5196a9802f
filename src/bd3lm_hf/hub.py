"""Hub export and push: a folder that loads with `trust_remote_code=True`, with a model card, and its upload."""

import json
import math
from pathlib import Path

from transformers.utils import logging

from .model_card import card_for_repo, render_card, sampling_settings
from .modeling import BD3LMForBlockDiffusion
from .output_folder import check_output_folder, clear_output_folder
from .tokenization import raise_if_tokenizer_mismatch

logger = logging.get_logger(__name__)

# Flags that describe how a tokenizer was loaded, not the tokenizer: a Hub copy must not carry them.
LOAD_TIME_TOKENIZER_FLAGS = ("is_local", "local_files_only")


class HubError(ValueError):
    """A Hub operation cannot proceed; the message says why (and never holds a token)."""


def export_for_hub(model, tokenizer, out_dir, repo_id: str | None = None, metrics: dict | None = None,
                   datasets=None, license: str = "apache-2.0", summary: str | None = None,
                   overwrite: bool = False, sources=()) -> Path:
    """Write a Hub-ready folder: config.json (with auto_map), the modeling code, model.safetensors,
    generation_config.json, tokenizer files and a README.md model card. Refuses a non-empty folder unless
    `overwrite`, a tokenizer that does not fit the model, and an output folder that is or holds an input (the
    model's and tokenizer's folders, and `sources`: other folders the model came from)."""
    out_dir = Path(out_dir)
    if repo_id is not None:  # it goes into the card's snippets: as push checks it
        validate_repo_id(repo_id)
    _check_exportable(model, tokenizer)
    _check_metrics(metrics)
    check_output_folder(out_dir, overwrite, (getattr(model, "name_or_path", None),
                                             getattr(tokenizer, "name_or_path", None), *sources), HubError)
    summary = summary or f"A BD3-LM with block size {model.config.block_size}, trained with `bd3lm_hf`."
    card = render_card(model.config, repo_id or out_dir.resolve().name, sum(p.numel() for p in model.parameters()),
                       summary, metrics=metrics, datasets=datasets, license=license,
                       sampling=sampling_settings(model.generation_config))  # before writing anything
    clear_output_folder(out_dir)
    take_special_ids_from(tokenizer, model.config)
    # Trainer writes TrainingArguments.use_cache (False) into the config; this code ignores it, but the files of
    # some earlier versions (pinned on the Hub) follow it and would generate without a cache
    model.config.use_cache = True
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    finish_tokenizer_config(out_dir / "tokenizer_config.json", longest_prompt(model.config))
    card.save(out_dir / "README.md")
    logger.info("exported %s (%d files)", out_dir, len(list(out_dir.iterdir())))
    return out_dir


def take_special_ids_from(tokenizer, model_config) -> None:
    """A model config that names no BOS/EOS/PAD id (a converted LM1B checkpoint, exported with its tokenizer) takes
    the tokenizer's: without them generation never stops at EOS and cannot start an empty prompt from BOS."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(model_config, name, None) is None and getattr(tokenizer, name, None) is not None:
            setattr(model_config, name, getattr(tokenizer, name))
            logger.info("%s = %d, from the tokenizer (the model's config named none)", name, getattr(tokenizer, name))


def _check_exportable(model, tokenizer) -> None:
    if tokenizer is None:
        raise HubError("export needs the tokenizer: a Hub model without one cannot be used by pipeline().")
    if not isinstance(model, BD3LMForBlockDiffusion) and type(model).__name__ != "BD3LMForBlockDiffusion":
        raise HubError(f"export_for_hub takes a BD3LMForBlockDiffusion, got {type(model).__name__} (merge LoRA "
                       "adapters with merge_and_unload() first).")
    if getattr(model, "_hf_peft_config_loaded", False):  # transformers' load_adapter / add_adapter
        raise HubError("the model carries PEFT adapters (load_adapter / add_adapter): save_pretrained would write "
                       "the adapters only, without the model. Merge them first: load the adapter folder with "
                       "peft's AutoPeftModelForCausalLM and call merge_and_unload(), or run `bd3lm-hf export "
                       "ADAPTER_FOLDER OUT`, which merges.")
    raise_if_tokenizer_mismatch(tokenizer, model, HubError)  # the card's own snippet would fail with it


def _check_metrics(metrics) -> None:
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise HubError(f"metrics must be a dict of metric name -> number (as eval_results.json), got "
                       f"{type(metrics).__name__}.")
    if metrics and not any(str(name).startswith("eval_") for name in metrics):  # e.g. --metrics config.json
        raise HubError(f"metrics hold no evaluation result (no eval_* entry; got {sorted(metrics)[:5]}): pass the "
                       "eval_results.json of a run that evaluated.")
    perplexity = metrics.get("eval_perplexity")
    if perplexity is not None and (isinstance(perplexity, bool) or not isinstance(perplexity, (int, float))
                                   or not math.isfinite(perplexity)):  # JSON's NaN / Infinity read as floats
        raise HubError(f"metrics: eval_perplexity must be a finite number (or null), got {perplexity!r}.")


def longest_prompt(config) -> int:
    """The most prompt tokens generate() takes: the prompt's whole blocks plus its first block to denoise must fit
    the context (floor(p / block_size) * block_size + block_size <= context), and the block size divides it."""
    return config.max_position_embeddings - 1


def finish_tokenizer_config(path: Path, model_max_length: int) -> None:
    """The saved tokenizer truncates to the longest prompt generation takes (pipeline(truncation=True) needs a
    finite length), from the left: generation continues the end of a prompt, so that is the part to keep. It
    carries no flags of the local load it came from. Edited on disk: the caller's tokenizer stays as it was."""
    if not path.is_file():
        return
    fields = json.loads(path.read_text(encoding="utf-8"))
    fields["model_max_length"] = model_max_length
    fields["truncation_side"] = "left"
    for flag in LOAD_TIME_TOKENIZER_FLAGS:
        fields.pop(flag, None)
    path.write_text(json.dumps(fields, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    try:
        hub_validate(repo_id)
    except HFValidationError as error:
        raise HubError(f"invalid repo id {repo_id!r}: {error}") from None
    if "/" not in repo_id:
        raise HubError(f"invalid repo id {repo_id!r}: use <namespace>/<name>.")


def folder_files(folder) -> list[str]:
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def push_to_hub(folder, repo_id: str, private: bool = False, dry_run: bool = False, token: str | None = None):
    """Upload an exported folder with `huggingface_hub` (token from `token`, HF_TOKEN or `hf auth login`).

    `dry_run=True` returns the file list and the card without touching the network. Errors never contain the
    token."""
    folder = Path(folder)
    validate_repo_id(repo_id)
    missing = [name for name in ("config.json", "README.md") if not (folder / name).is_file()]
    if missing:
        raise HubError(f"{folder} is not an exported folder (no {' / '.join(missing)}): run `bd3lm-hf export`.")
    card_path = folder / "README.md"
    written = card_path.read_text(encoding="utf-8")
    card = card_for_repo(written, repo_id)
    if dry_run:
        return {"repo_id": repo_id, "private": private, "files": folder_files(folder), "card": card}
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, then push again.")
    card_path.write_text(card, encoding="utf-8")
    pushed = False
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                   commit_message="Upload BD3-LM (bd3lm_hf export)")
        pushed = True
    except Exception as error:  # network, auth, offline mode: report without a traceback or the token
        raise HubError(f"push to {repo_id} failed: {_without(str(error), token)}") from None
    finally:
        if not pushed:  # failed or interrupted: the folder stays as it was
            card_path.write_text(written, encoding="utf-8")
    if card != written:
        logger.info("%s: the card's usage snippets now load %s", card_path, repo_id)
    return {"repo_id": repo_id, "url": getattr(commit, "commit_url", str(commit))}


def _without(message: str, secret: str) -> str:
    return message.replace(secret, "***") if secret else message
