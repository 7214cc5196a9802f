"""Loading saved folders for export and the CLI: models (an adapter folder merged into its base, a training
checkpoint with its EMA weights), tokenizers, and local folders told from Hub ids, each with a one-line error."""

import os
from pathlib import Path

from transformers.utils import logging

from .hub import HubError

logger = logging.get_logger(__name__)


def load_for_export(model_folder, tokenizer_folder=None):
    """The model and tokenizer of a saved folder (`tokenizer_folder` when the tokenizer lives elsewhere)."""
    model = load_saved_model(model_folder)
    return model, load_tokenizer(tokenizer_folder or model_folder, "pass --tokenizer FOLDER")


def load_saved_model(name, dtype=None):
    """The model of a saved folder or Hub id (loaded with trust_remote_code=True, in `dtype`). An adapter folder
    (what `bd3lm-hf train --lora true` saves) is loaded onto its base model and merged: the whole model. A training
    checkpoint gets its EMA weights, as training's evaluation and final save use them."""
    from transformers import AutoModelForCausalLM

    name = local_folder_or_hub_id(str(name))  # a missing local folder is named, not taken for a Hub id
    folder = Path(name)
    if folder.is_dir() and not (folder / "config.json").is_file():
        if not (folder / "adapter_config.json").is_file():
            raise HubError(f"{name} is not a saved model folder (no config.json, no adapter_config.json): pass the "
                           "folder save_pretrained, `bd3lm-hf train` or `bd3lm-hf export` wrote.")
        merged = merged_adapter_model(folder)
        return merged if dtype is None else merged.to(dtype)
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True,
                                                 **({} if dtype is None else {"dtype": dtype}))
    return with_checkpoint_ema(model, folder) if folder.is_dir() else model


def with_checkpoint_ema(model, folder):
    """`model` (a PeftModel too) with the EMA weights of the training checkpoint `folder`, when it holds them."""
    import torch

    from .ema import saved_ema

    parameters = dict(model.named_parameters())
    shadow = saved_ema(folder, parameters)
    with torch.no_grad():
        for name, tensor in (shadow or {}).items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))
    return model


def merged_adapter_model(adapter_folder: Path):
    """The base model named by the adapter folder, with the adapters (their EMA in a training checkpoint) merged into
    its weights. Loaded as base + `PeftModel` rather than through peft's Auto classes, which refuse an adapter saved
    without a task_type (a plain `LoraConfig(r=8)`, or `--lora` folders of early versions)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    logger.info("%s holds adapters: loading their base model and merging them", adapter_folder)
    adapter = PeftConfig.from_pretrained(adapter_folder)
    if not adapter.base_model_name_or_path:
        raise HubError(f"the adapters in {adapter_folder} do not name their base model (base_model_name_or_path in "
                       "adapter_config.json): set it to the base model's folder or Hub id.")
    try:
        base = AutoModelForCausalLM.from_pretrained(adapter.base_model_name_or_path, revision=adapter.revision,
                                                    trust_remote_code=True)
    except (OSError, ValueError) as error:  # the base (base_model_name_or_path) moved, or is not on this machine
        raise HubError(f"cannot load the base model of the adapters in {adapter_folder}: its adapter_config.json "
                       f"names base_model_name_or_path={adapter.base_model_name_or_path!r}: "
                       f"{str(error).splitlines()[0]}") from None
    peft_model = PeftModel.from_pretrained(base, adapter_folder)
    return with_checkpoint_ema(peft_model, adapter_folder).merge_and_unload()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(name, remedy: str):
    """AutoTokenizer of a folder or Hub id, with a one-line error: transformers answers a folder without tokenizer
    files with a list of backends to install. `remedy` says what to do about a missing tokenizer."""
    from transformers import AutoTokenizer

    folder = Path(name)
    if folder.is_dir() and not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise HubError(f"{name} has no tokenizer files: {remedy}.")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError, TypeError) as error:  # a broken file: say which error, in one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubError(f"the tokenizer of {name} could not be loaded: {first_line}") from None


def local_folder_or_hub_id(name: str) -> str:
    """A local folder as its absolute path (~ expanded), else `name` as a Hub id. An existing folder wins, as in
    from_pretrained; absolute, so that what records it (a LoRA adapter's base_model_name_or_path) loads from any
    working directory. A missing folder is named here: from_pretrained would take it for a Hub id and answer
    that repo ids must use alphanumeric chars."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder.resolve())
    if folder.exists():
        raise ValueError(f"{name} is a file, not a model folder (a saved model is the folder save_pretrained wrote).")
    if looks_like_a_local_path(name):
        reason = (f"{name.split('/')[0]} is a folder here, so {name} was not looked up on the Hub: for the Hub repo, "
                  "run from another folder" if owner_is_a_folder_here(name) else "a Hub id is NAME or OWNER/NAME")
        raise ValueError(f"model folder {name} does not exist ({reason}).")
    return name


def looks_like_a_local_path(name: str) -> bool:
    """A Hub id is "name" or "owner/name": a relative or home path, a path separator other than /, or more than
    one / can only mean a folder; so does "owner/name" where "owner" is a folder here (`out/run`, a typo of a run
    folder, would otherwise be looked up on the Hub, offline an error about the connection)."""
    return (name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1
            or owner_is_a_folder_here(name))


def owner_is_a_folder_here(name: str) -> bool:
    """"owner/name" whose "owner" is a folder of the working directory."""
    return name.count("/") == 1 and Path(name.split("/")[0]).is_dir()
