"""The `bd3lm-hf` command line."""

import argparse
import json
import sys

from transformers.utils import logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bd3lm-hf", description="Block Diffusion LMs on the Hugging Face stack.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an original bd3lms checkpoint to this format, or back")
    convert.add_argument("src", help="original Hub folder (config.json + model.safetensors) or Lightning .ckpt; "
                                     "with --to-original, a folder in this package's format")
    convert.add_argument("dst", help="output folder")
    convert.add_argument("--to-original", action="store_true", help="write the original bd3lms Hub format")
    convert.add_argument("--config", help="original config.json to use with a .ckpt")
    convert.add_argument("--block-size", type=int, help="block size of a .ckpt (not recorded in it)")
    convert.add_argument("--model-length", type=int, help="training context length of a .ckpt")

    commands.add_parser("train", add_help=False,
                        help="train or finetune with transformers.Trainer (every BD3LMTrainingConfig and "
                             "TrainingArguments field is a flag; `bd3lm-hf train --help` lists them)")
    return parser


def run_train(argv: list[str]) -> None:
    from transformers import HfArgumentParser, TrainingArguments

    from .training import BD3LMTrainingConfig, train

    parser = HfArgumentParser((BD3LMTrainingConfig, TrainingArguments), prog="bd3lm-hf train")
    config, args = parser.parse_args_into_dataclasses(args=argv)
    train(config, args)


def run_convert(args) -> None:
    from .conversion import convert_to_original, convert_to_ours

    if args.to_original:
        convert_to_original(args.src, args.dst)
        return
    original_config = json.loads(open(args.config).read()) if args.config else {}
    if args.block_size is not None:
        original_config["block_size"] = args.block_size
    if args.model_length is not None:
        original_config["model_length"] = args.model_length
    convert_to_ours(args.src, args.dst, original_config or None)


COMMANDS = {"convert": run_convert, "train": lambda args: run_train(args.rest)}


def _stderr_handler():
    import logging as std_logging

    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("[bd3lm-hf] %(message)s"))
    return handler


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["train"]:  # its flags come from the dataclasses, parsed by HfArgumentParser
        args = parser.parse_args(argv[:1])
        args.rest = argv[1:]
    else:
        args = parser.parse_args(argv)
    logging.set_verbosity_warning()
    logging.enable_default_handler()
    package_logger = logging.get_logger("bd3lm_hf")
    if not package_logger.handlers:
        package_logger.addHandler(_stderr_handler())
    package_logger.setLevel("INFO")
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        logging.get_logger("bd3lm_hf").error(str(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
