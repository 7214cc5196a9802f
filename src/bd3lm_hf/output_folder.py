"""The output folder of `export` and `convert`: new, or emptied on request, and never one that holds an input."""

import shutil
from pathlib import Path


def check_output_folder(folder, overwrite: bool, inputs=(), error=ValueError) -> Path:
    """Refuse, before any work, a file, a non-empty folder without `overwrite`, and a folder that is or contains
    one of `inputs` (emptying it would delete them). Deletes nothing: `clear_output_folder` does, once the inputs
    have been read."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder} exists and is not a folder: pass a new or an existing folder's path.")
    for source in inputs:
        if source and Path(source).exists() and holds(folder, Path(source)):
            raise error(f"the output folder {folder} is or contains the input {source}: writing there would replace "
                        "or delete it; pass another output folder.")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise error(f"{folder} exists and is not empty; pass overwrite=True (CLI: --overwrite).")
    if (folder / ".git").exists():  # `convert X . --overwrite` inside a repository would delete it
        raise error(f"{folder} holds a git repository (.git): emptying it would delete the repository; pass another "
                    "output folder.")
    return folder


def clear_output_folder(folder) -> None:
    """Empty a folder `check_output_folder` allowed (with overwrite): what a previous run left there goes. Its
    contents, not the folder itself, which may be the working directory (`.` cannot be removed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# What `export` writes: the card, configs, the modeling code, the weights (sharded or not) and the tokenizer's files.
EXPORT_FILES = ("README.md", "config.json", "generation_config.json", "*.py", "model*.safetensors",
                "model.safetensors.index.json", "tokenizer*.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                "chat_template.jinja")


def is_exported_model_folder(folder) -> bool:
    """Whether `folder` is an exported BD3-LM folder and nothing else (its config.json names model_type bd3lm; every
    entry is a file an export writes): what `demo` may replace with its new export. A training run's folder
    (checkpoints, trainer state, optimizer, results) is not one."""
    import json

    folder = Path(folder)
    try:
        if json.loads((folder / "config.json").read_text()).get("model_type") != "bd3lm":
            return False
    except (OSError, ValueError, AttributeError):
        return False
    return all(entry.is_file() and any(entry.match(pattern) for pattern in EXPORT_FILES) for entry in folder.iterdir())


def holds(folder: Path, path: Path) -> bool:
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents
