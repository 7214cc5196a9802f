"""Command-line flags read into dataclasses (transformers' HfArgumentParser), as `train` and `demo` take them."""

import dataclasses
import difflib

from transformers import HfArgumentParser


def parse_dataclass_flags(dataclass_types: tuple, argv: list[str], prog: str) -> tuple:
    """One instance per dataclass from `argv`. No abbreviations (argparse's prefix matching would let `--max_step 2`
    set --max_steps silently); a flag none of them has is a ValueError naming the closest ones."""
    parser = HfArgumentParser(dataclass_types, prog=prog, allow_abbrev=False)
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ValueError(unknown_flags_message(unknown, dataclass_types, prog))
    return tuple(parsed)


def unknown_flags_message(unknown: list[str], dataclass_types: tuple, prog: str) -> str:
    """"unknown arguments for P: --max_step (did you mean --max_steps?)": each unknown flag with its closest known
    spellings (their values left out), or the stray values when no flag is unknown."""
    known = [f"--{field.name}" for kind in dataclass_types for field in dataclasses.fields(kind)]
    flags = [argument.split("=", 1)[0] for argument in unknown if argument.startswith("--")] or unknown
    described = []
    for flag in flags:
        close = difflib.get_close_matches("--" + flag.lstrip("-").replace("-", "_"), known, n=2)
        described.append(f"{flag} (did you mean {' or '.join(close)}?)" if close else flag)
    return f"unknown arguments for {prog}: {', '.join(described)} (`{prog} --help` lists the flags)"
