"""The output folder of `export` and `convert`: new, or emptied on request, and never one that holds an input."""

import shutil
from pathlib import Path


def prepare_output_folder(folder, overwrite: bool, inputs=(), error=ValueError) -> Path:
    """Check `folder` before any work, and empty it when `overwrite` allows. Refuses a file, a non-empty folder
    without `overwrite`, and a folder that is or contains one of `inputs` (emptying it would delete them)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder} exists and is not a folder: pass a new or an existing folder's path.")
    for source in inputs:
        if source and Path(source).exists() and holds(folder, Path(source)):
            raise error(f"the output folder {folder} is or contains the input {source}: writing there would replace "
                        "or delete it; pass another output folder.")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise error(f"{folder} exists and is not empty; pass overwrite=True (CLI: --overwrite).")
        shutil.rmtree(folder)
    return folder


def holds(folder: Path, path: Path) -> bool:
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents
