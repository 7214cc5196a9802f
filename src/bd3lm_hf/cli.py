"""The `bd3lm-hf` command line: convert | train | eval | generate | export | push | demo."""

import argparse
import contextlib
import json
import logging as std_logging
import os
import sys

from transformers.utils import logging

# Commands whose flags come from dataclasses (HfArgumentParser) rather than from argparse here.
DATACLASS_COMMANDS = ("train", "demo")
# `generate` settings: a flag the user gives wins, then the model's generation_config.json, then these.
GENERATE_FLAGS = ("max_new_tokens", "sampler", "num_steps", "do_sample", "top_p", "temperature",
                  "cache_implementation")
GENERATE_FALLBACKS = {"max_new_tokens": 64, "sampler": "ddpm", "do_sample": True}
SAMPLING_FALLBACKS = {"top_p": 0.9, "temperature": 1.0, "top_k": 0}  # applied only when sampling


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bd3lm-hf", description="Block Diffusion LMs on the Hugging Face stack.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_convert_command(commands)
    for name in DATACLASS_COMMANDS:  # their flags come from dataclasses (HfArgumentParser)
        commands.add_parser(name, add_help=False, help=f"`bd3lm-hf {name} --help` lists its flags")
    add_eval_command(commands)
    add_generate_command(commands)
    add_export_command(commands)
    add_push_command(commands)
    parser.command_parsers = commands.choices  # each command's own parser, for its usage in errors
    return parser


def add_loading_arguments(command, default_dtype: str, dtype_help: str) -> None:
    command.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    command.add_argument("--dtype", default=default_dtype, choices=["auto", "float32", "bfloat16", "float16"],
                         help=dtype_help)


def add_convert_command(commands) -> None:
    convert = commands.add_parser("convert", help="convert an original bd3lms checkpoint to this format, or back")
    convert.add_argument("src", help="original Hub folder (config.json + model.safetensors) or Lightning .ckpt; "
                                     "with --to-original, a folder in this package's format")
    convert.add_argument("dst", help="output folder")
    convert.add_argument("--to-original", action="store_true", help="write the original bd3lms Hub format")
    convert.add_argument("--code-from", metavar="ORIGINAL_FOLDER",
                         help="with --to-original: copy the original code files (configuration_bd3lm.py, "
                              "modeling_bd3lm.py) from this download of an original Hub repo; without it the "
                              "folder needs them added to load with trust_remote_code")
    convert.add_argument("--config", help="original config.json to use with a .ckpt")
    convert.add_argument("--block-size", type=int, help="block size of a .ckpt (not recorded in it)")
    convert.add_argument("--model-length", type=int, help="training context length of a .ckpt")
    convert.add_argument("--mask-token-id", type=int,
                         help="[MASK] id (default: the last id; 103 for the bert-base-uncased vocabulary of LM1B)")
    convert.add_argument("--with-gpt2-tokenizer", action="store_true",
                         help="also save the GPT-2 BPE + [MASK] tokenizer (the OWT checkpoints' vocabulary) and a "
                              "model card: the folder is then ready for `bd3lm-hf push`")
    convert.add_argument("--no-ema", action="store_true",
                         help="from a .ckpt, convert the raw trained weights instead of its EMA weights (the ones "
                              "the original code evaluates and samples with)")
    convert.add_argument("--overwrite", action="store_true", help="empty an existing output folder first")


def add_eval_command(commands) -> None:
    evaluate = commands.add_parser("eval", help="NELBO perplexity of a saved model on held-out text files")
    evaluate.add_argument("model", help="model folder or Hub id (loaded with trust_remote_code=True)")
    evaluate.add_argument("--data", nargs="+", required=True, help=".txt/.md/.json/.jsonl files")
    evaluate.add_argument("--text-column", default="text",
                          help="the text column of .json/.jsonl files (default: text), as train's --text_column")
    evaluate.add_argument("--batch-size", type=positive_int, default=32,
                          help="sequences per noise draw (default 32): the seed's times and masks are drawn per batch")
    evaluate.add_argument("--forward-batch-size", type=positive_int, default=None,
                          help="sequences per forward pass (default: a batch, or fewer when their logits would "
                               "pass 1 GiB on the CPU / a quarter of the free GPU memory); only rounding changes")
    evaluate.add_argument("--max-sequences", type=positive_int, default=None,
                          help="score only the first N sequences (default: all)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the noise (times and masks) drawn per batch")
    add_loading_arguments(evaluate, "float32", "weights' dtype (default float32; auto: bfloat16 on a GPU)")
    evaluate.add_argument("--wrap-framed", action="store_true",
                          help="lay the text out as the original bd3lms wrap mode (every sequence BOS + L-2 "
                               "tokens + EOS, its BOS not scored)")
    evaluate.add_argument("--ignore-first-token", action="store_true",
                          help="leave each sequence's first token out (neither noised nor scored), as the "
                               "original's ignore_bos; with it, the paper's OpenWebText protocol")


def add_generate_command(commands) -> None:
    from .modeling.sampling_bd3lm import SAMPLERS

    generate = commands.add_parser(
        "generate", help="sample through pipeline('text-generation')",
        description="Each setting left out comes from the model's generation_config.json; where that has none: "
                    "--sampler ddpm, --max-new-tokens 64, --do-sample with --top-p 0.9, --temperature 1.0 and top_k 0.")
    generate.add_argument("model", help="model folder or Hub id (loaded with trust_remote_code=True)")
    generate.add_argument("--prompt", nargs="+", help="one or more prompts (default: 'ROMEO.' and a line break)")
    generate.add_argument("--prompt-file", nargs="+", metavar="FILE",
                          help="prompts read from files, each file's whole text one prompt (line breaks kept; '-': "
                               "standard input); after any --prompt")
    generate.add_argument("--max-new-tokens", type=int, help="default: the model's, else 64")
    generate.add_argument("--sampler", choices=SAMPLERS,
                          help="default: the model's, else ddpm")
    generate.add_argument("--num-steps", type=int, help="ddpm steps per block (default: the model's, else its "
                                                        "block size)")
    generate.add_argument("--do-sample", action=argparse.BooleanOptionalAction,
                          help="default: the model's, else sampling")
    generate.add_argument("--top-p", type=float, help="default: the model's, else 0.9 when sampling")
    generate.add_argument("--temperature", type=float, help="default: the model's, else 1.0 when sampling")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--cache-implementation", choices=["dynamic", "static"],
                          help="static: preallocated cache, the denoising step compiled on a GPU (default: the "
                               "model's, else dynamic)")
    generate.add_argument("--score-with", metavar="SCORER",
                          help="an autoregressive model folder or Hub id (the paper: gpt2-large): also print the "
                               "samples' generative perplexity under it (prompt + sample, each token given the ones "
                               "before it) and their mean unigram entropy")
    add_loading_arguments(generate, "auto", "auto: bfloat16 on a GPU, float32 on CPU")


def add_export_command(commands) -> None:
    export = commands.add_parser("export", help="write a Hub folder (weights, code, tokenizer, model card)")
    export.add_argument("model", help="a saved model folder, or the adapter folder of a `train --lora true` run "
                                      "(merged into its base model)")
    export.add_argument("out_dir")
    export.add_argument("--repo-id", default=None, help="the repo id the card's snippets use")
    export.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    export.add_argument("--metrics", default=None, help="JSON file of evaluation metrics for the card")
    export.add_argument("--dataset", nargs="*", default=None, help="datasets the card's metadata names")
    export.add_argument("--license", default="apache-2.0", help="the card's license (default: apache-2.0)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def add_push_command(commands) -> None:
    push = commands.add_parser("push", help="upload an exported folder to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--dry-run", action="store_true", help="list the files and the card; no network")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (at least 1)")
    return value


def prompts_of(args) -> list[str]:
    """--prompt, then each --prompt-file's text ('-': standard input); by default the demo's 'ROMEO.' + line break."""
    prompts = list(args.prompt or [])
    if (args.prompt_file or []).count("-") > 1:  # the second read of standard input would be an empty prompt
        raise ValueError("--prompt-file - (standard input) can be given once.")
    for path in args.prompt_file or []:
        try:
            if path == "-":
                prompts.append(sys.stdin.read().removeprefix("\ufeff"))
                continue
            with open(path, encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not part of the prompt
                prompts.append(handle.read())
        except OSError as error:
            raise ValueError(f"--prompt-file {path}: cannot read it ({error.strerror or error}).") from None
        except UnicodeDecodeError:
            raise ValueError(f"--prompt-file {path} is not UTF-8 text.") from None
    return prompts or ["ROMEO.\n"]


def read_json_object(path: str, flag: str) -> dict:
    """The JSON object in the file a flag names; one-line errors naming the flag and the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot read it ({error.strerror or error}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag} {path} is not valid JSON: {error}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} {path} must hold a JSON object ({{...}}), got a {type(value).__name__}.")
    return value


def run_convert(args) -> None:
    from .conversion import convert_to_original, convert_to_ours

    if args.to_original:
        if args.no_ema:
            raise ValueError("--no-ema chooses the weights of a .ckpt; --to-original writes the one set of weights "
                             "a folder in this package's format holds.")
        convert_to_original(args.src, args.dst, code_from=args.code_from, overwrite=args.overwrite)
        return
    if args.code_from is not None:
        raise ValueError("--code-from copies the original code into a --to-original output; it has no use here.")
    original_config = read_json_object(args.config, "--config") if args.config else {}
    for name in ("block_size", "model_length", "mask_token_id"):
        flag = getattr(args, name)
        if flag is None:
            continue
        if original_config.get(name, flag) != flag:
            raise ValueError(f"--{name.replace('_', '-')} {flag} contradicts {name}={original_config[name]} in "
                             f"--config {args.config}: give one of them.")
        original_config[name] = flag
    tokenizer = None
    if args.with_gpt2_tokenizer:
        from .tokenization import gpt2_tokenizer_with_mask

        tokenizer = gpt2_tokenizer_with_mask()
    convert_to_ours(args.src, args.dst, original_config or None, tokenizer, overwrite=args.overwrite,
                    use_ema=not args.no_ema, sources=(args.config,))  # the config file is the user's too


def run_train(argv: list[str]) -> None:
    from transformers import TrainingArguments

    from .flags import parse_dataclass_flags
    from .training import BD3LMTrainingConfig, train

    config, args = parse_dataclass_flags((BD3LMTrainingConfig, TrainingArguments), argv, "bd3lm-hf train")
    train(config, args)


def run_demo(argv: list[str]) -> None:
    from .demo import main as demo

    result = demo(argv)
    print(result["evaluation"] + result["samples"], end="")


def load_for_inference(name: str, device: str = "cpu", dtype: str = "float32"):
    """The model (on `device`, in `dtype`; "auto": the GPU in bf16 when there is one) and its tokenizer."""
    import torch

    from .loading import load_saved_model, load_tokenizer, local_folder_or_hub_id

    name = local_folder_or_hub_id(name)
    device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model = load_saved_model(name, getattr(torch, dtype))
    tokenizer = load_tokenizer(name, "convert with --with-gpt2-tokenizer, or save the tokenizer into the folder "
                                     "(tokenizer.save_pretrained)")
    return model.to(device).eval(), tokenizer


def resolve_device(device: str) -> str:
    """"auto": cuda when there is a GPU, else cpu. A device this machine lacks is refused before the model loads:
    torch's own error (an AssertionError from deep inside .to()) does not say which flag was wrong."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device: use auto, cpu, cuda or cuda:N.") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available on this machine; use --device cpu "
                         "(or auto).")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return device


def run_eval(args) -> None:
    from .evaluation import nelbo_perplexity

    model, tokenizer = load_for_inference(args.model, args.device, args.dtype)
    result = nelbo_perplexity(model, tokenizer, args.data, args.batch_size, args.max_sequences, args.seed,
                              framed=args.wrap_framed, ignore_first_token=args.ignore_first_token,
                              text_column=args.text_column, forward_batch_size=args.forward_batch_size)
    print(f"NELBO {result['nelbo']:.4f} nats/token, perplexity <= {result['perplexity']:.2f} "
          f"({result['tokens']} tokens, {result['sequences']} sequences)")


def generation_options(args, saved) -> dict:
    """The `generate` keyword arguments: the flags given, then for what neither they nor the model's saved
    generation config (`saved`) set, the CLI's fallbacks."""
    given = {name: getattr(args, name) for name in GENERATE_FLAGS if getattr(args, name) is not None}
    options = {**_unset_in(saved, GENERATE_FALLBACKS), **given}
    if options.get("do_sample", getattr(saved, "do_sample", None)):
        options = {**_unset_in(saved, SAMPLING_FALLBACKS), **options}
    return options


def _unset_in(saved, fallbacks: dict) -> dict:
    return {name: value for name, value in fallbacks.items() if getattr(saved, name, None) is None}


def run_generate(args) -> None:
    from .evaluation import sample_with_pipeline
    from .modeling.generation_bd3lm import ContextExceededError

    model, tokenizer = load_for_inference(args.model, args.device, args.dtype)
    scorer = load_scorer(args.score_with, model.device) if args.score_with else None  # before sampling: fail early
    options = generation_options(args, model.generation_config)
    try:
        result = sample_with_pipeline(model, tokenizer, prompts_of(args), seed=args.seed, **options)
    except ContextExceededError as error:  # said in the flags' words
        dynamic = ", or --cache-implementation dynamic" if error.dynamic_cache_helps else ""
        raise ValueError(f"{error} With bd3lm-hf generate: --max-new-tokens {error.most_new_tokens} or less"
                         f"{dynamic}.") from None
    for prompt, text in zip(result["prompts"], result["texts"]):
        print(f"--- {prompt!r}\n{prompt}{text}")
    sampler = options.get("sampler", getattr(model.generation_config, "sampler", None))
    print(f"--- {result['nfe']} model calls (NFE) for {result['new_tokens']} new tokens, "
          f"{result['tokens_per_second']:.1f} tokens/s ({sampler}, block {model.config.block_size})")
    if scorer is not None:
        from .evaluation import generative_perplexity

        quality = generative_perplexity([prompt + text for prompt, text in zip(result["prompts"], result["texts"])],
                                        *scorer)
        empty = f"; {quality['empty']} empty sample(s) not scored" if quality["empty"] else ""
        print(f"--- generative perplexity {quality['gen_ppl']:.2f} under {args.score_with} ({quality['tokens']} "
              f"tokens), unigram entropy {quality['entropy']:.2f} nats per sample{empty}")


def load_scorer(name: str, device):
    """An autoregressive model (float32, on `device`) and its tokenizer, to score samples."""
    from transformers import AutoModelForCausalLM

    from .evaluation import check_autoregressive_scorer
    from .loading import load_tokenizer, local_folder_or_hub_id

    name = local_folder_or_hub_id(name)
    scorer = AutoModelForCausalLM.from_pretrained(name).to(device).eval()
    check_autoregressive_scorer(scorer.config)  # before sampling (an adapter folder has no config of its own)
    return scorer, load_tokenizer(name, "save the scorer's tokenizer into its folder (tokenizer.save_pretrained)")


def run_export(args) -> None:
    from .hub import export_for_hub
    from .loading import load_for_export

    model, tokenizer = load_for_export(args.model, args.tokenizer)
    metrics = read_json_object(args.metrics, "--metrics") if args.metrics else None
    export_for_hub(model, tokenizer, args.out_dir, repo_id=args.repo_id, metrics=metrics, datasets=args.dataset,
                   license=args.license, overwrite=args.overwrite, sources=(args.model,))  # logs "exported ..."


def run_push(args) -> None:
    from .hub import push_to_hub

    result = push_to_hub(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run)
    if args.dry_run:
        print(f"dry run: would upload to {result['repo_id']} ({'private' if result['private'] else 'public'}):")
        print("\n".join(f"  {name}" for name in result["files"]))
        print("--- README.md (model card) ---\n" + result["card"])
    else:
        print(f"pushed to {result['repo_id']}: {result['url']}")


COMMANDS = {"convert": run_convert, "train": lambda args: run_train(args.rest), "eval": run_eval,
            "generate": run_generate, "export": run_export, "push": run_push,
            "demo": lambda args: run_demo(args.rest)}


class _CurrentStderrHandler(std_logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (it may be replaced after setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        del value  # logging assigns a stream at setup; ours is always the current sys.stderr


def _stderr_handler():
    handler = _CurrentStderrHandler()
    handler.setFormatter(std_logging.Formatter("[bd3lm-hf] %(message)s"))
    return handler


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] and argv[0] in DATACLASS_COMMANDS:
        args = parser.parse_args(argv[:1])
        args.rest = argv[1:]
    else:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # the command's own usage and flags, not the top-level list of commands
            parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.set_verbosity(transformers_verbosity())
    logging.enable_default_handler()
    with package_messages_on_stderr() as package_logger:
        try:
            COMMANDS[args.command](args)
        # OSError: unreadable or missing files the commands did not anticipate; ImportError: an optional package a
        # flag asks for (flash-attn for --attn_implementation flash_attention_2, ...) is not installed.
        except (ValueError, OSError, ImportError) as error:
            package_logger.error(str(error))
            return 2
        except KeyboardInterrupt as interrupt:  # Ctrl-C: one line (train's says what is left to resume), no traceback
            package_logger.error(str(interrupt) or "interrupted")
            return 130
    return 0


def transformers_verbosity() -> int:
    """The level of transformers' own messages in a command: TRANSFORMERS_VERBOSITY's (its names: debug, info,
    warning, error, critical), else warnings."""
    name = os.environ.get("TRANSFORMERS_VERBOSITY", "").lower()
    return getattr(std_logging, name.upper()) if name in ("debug", "info", "warning", "error", "critical") \
        else std_logging.WARNING


@contextlib.contextmanager
def package_messages_on_stderr():
    """The package's info messages (results, progress notes) on stderr as "[bd3lm-hf] ...": through its own handler,
    and hung under the root logger instead of transformers' for the command (transformers' handler would print
    them a second time); the logger is restored afterwards (main() may run inside another program)."""
    package_logger = logging.get_logger("bd3lm_hf")
    handler, level, parent = _stderr_handler(), package_logger.level, package_logger.parent
    package_logger.addHandler(handler)
    package_logger.setLevel("INFO")
    package_logger.parent = std_logging.getLogger()
    try:
        yield package_logger
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)
        package_logger.parent = parent


if __name__ == "__main__":
    sys.exit(main())
