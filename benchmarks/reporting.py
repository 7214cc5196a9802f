"""What both benchmark scripts do with their results: note a failed case without losing the others, then print
the section, append it to RESULTS.md and fail the run if any case failed."""

import traceback
from pathlib import Path

import torch


def record_failure(failures: list[str], label: str, error: Exception) -> None:
    """Print the traceback, keep a FAILED line for the report and free the GPU memory the case held."""
    traceback.print_exc()
    failures.append(f"FAILED {label}: {type(error).__name__}: {error}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def publish(text: str, results: Path, failures: list[str], unit: str = "case") -> None:
    """Print the section and append it to `results`; a run with failures exits non-zero after writing."""
    print(text)
    with results.open("a") as handle:
        handle.write(text)
    if failures:
        raise SystemExit(f"{len(failures)} {unit}(s) failed (see the log and {results})")
