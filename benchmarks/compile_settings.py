"""Compile settings from the command line, shared by the benchmarks: a GPU session can try inductor's levers
(max-autotune, coordinate-descent tuning, ...) without editing code.

torch.compile takes either a `mode` or inductor `options`, not both: `--inductor-option` replaces `--compile-mode`
(add `triton.cudagraphs=True` to keep the CUDA graphs that mode "reduce-overhead" gives).
"""

import contextlib


def add_compile_arguments(parser, default_mode: str | None) -> None:
    parser.add_argument("--compile-mode", default=default_mode,
                        help=f"torch.compile mode of the compiled rows (default: {default_mode})")
    parser.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an inductor option (repeatable), e.g. coordinate_descent_tuning=True; replaces "
                             "--compile-mode")


def parse_value(text: str):
    """'True'/'False' -> bool, then int, then float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):  # not of this kind: try the next
            return kind(text)
    return text


def generation_compile_config(settings: dict):
    """The `CompileConfig` of a static-cache generation with these settings (fullgraph, static shapes); its own
    default mode, "reduce-overhead", is dropped when options replace it."""
    from transformers.generation import CompileConfig

    return CompileConfig(fullgraph=True, dynamic=False, mode=settings.get("mode"), options=settings.get("options"))


def compile_kwargs(compile_mode: str | None, inductor_options: list[str]) -> dict:
    """{"mode": ...} or {"options": {...}} for torch.compile / CompileConfig."""
    if not inductor_options:
        return {"mode": compile_mode} if compile_mode else {}
    options = {}
    for item in inductor_options:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise SystemExit(f"--inductor-option takes KEY=VALUE, got {item!r}")
        options[key] = parse_value(value)
    return {"options": options}
