"""What the benchmark scripts do with their cases and results: measure them one by one, noting a failed case
without losing the others and stopping on SIGTERM with the finished ones kept; then print the section, append it to
RESULTS.md and fail the run if any case failed."""

import signal
import traceback
from pathlib import Path

import torch


def record_failure(failures: list[str], label: str, error: Exception) -> None:
    """Print the traceback, keep a FAILED line for the report and free the GPU memory the case held."""
    traceback.print_exc()
    failures.append(f"FAILED {label}: {type(error).__name__}: {error}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Interrupted(BaseException):
    """SIGTERM (the `timeout` of a device call): stop and write what is measured."""


def raise_interrupted(signum, frame):
    raise Interrupted()


def measure_all(items, measure, label, show, unit: str = "case"):
    """(rows, failures): `measure(item)` for each item. A failing item is reported (`label(item)`) without costing
    the others' figures; SIGTERM stops the run and keeps the finished rows, each also `show`n as it finishes so that
    the log has it."""
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    rows, failures = [], []
    try:
        for number, item in enumerate(items):
            try:
                rows.append(measure(item))
            except Interrupted:
                failures.append(f"INTERRUPTED (SIGTERM) after {number} of {len(items)} {unit}s")
                break
            except Exception as error:
                record_failure(failures, label(item), error)
                continue
            show(rows[-1])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return rows, failures


def markdown_table(header: list[str], rows) -> str:
    """A markdown table: the header, its rule, then one line per row of cells (formatted by the caller)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(text: str, results: Path, failures: list[str], unit: str = "case") -> None:
    """Print the section and append it to `results`; a run with failures exits non-zero after writing."""
    print(text)
    with results.open("a") as handle:
        handle.write(text)
    if failures:
        raise SystemExit(f"{len(failures)} {unit}(s) failed (see the log and {results})")
