"""The main job, end to end on the bundled Shakespeare corpus: train -> export -> reload in a fresh process ->
NELBO perplexity on held-out plays and samples through `pipeline("text-generation")`.

    bd3lm-hf demo                                  # defaults below; ~2 minutes on 2 CPU cores
    bd3lm-hf demo --max_steps 2000 --block_size 8 --prompts "HAMLET." --sampler first_hitting

Every field of DemoArguments, BD3LMTrainingConfig and TrainingArguments is a flag (`bd3lm-hf demo --help`).
"""

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from .flags import parse_dataclass_flags
from .hub import export_for_hub
from .output_folder import check_output_folder, holds, is_exported_model_folder
from .modeling.sampling_bd3lm import SAMPLERS
from .training import BD3LMTrainingConfig, shakespeare_split, train

logger = logging.get_logger(__name__)


@dataclass
class DemoArguments:
    export_dir: str = field(default="demo_out/bd3lm-shakespeare", metadata={"help": "the exported Hub folder"})
    prompts: list[str] = field(default_factory=lambda: ["ROMEO.\n", "To be, or not to be", "KING HENRY.\n"])
    max_new_tokens: int = 48
    sampler: str = field(default="ddpm", metadata={"help": " | ".join(SAMPLERS), "choices": list(SAMPLERS)})
    num_steps: int | None = field(default=None, metadata={"help": "ddpm steps per block (default: block size)"})
    eval_sequences: int = field(default=256, metadata={"help": "held-out sequences for the fresh-process NELBO"})


def training_defaults() -> list[str]:
    """The demo's training settings (the project's tiny model, H 128, 2 layers, 4 heads, BPE vocabulary 1024, L 64,
    block 4: ~1 minute of training on 2 CPU cores); flags given on the command line override them."""
    defaults = ["--output_dir", "demo_out/run", "--max_steps", "800", "--per_device_train_batch_size", "16",
                "--per_device_eval_batch_size", "64", "--learning_rate", "2e-3", "--warmup_steps", "50",
                "--logging_steps", "100", "--eval_strategy", "no", "--do_eval", "true", "--save_strategy", "no",
                "--report_to", "none", "--seed", "0"]
    if not torch.cuda.is_available():
        defaults += ["--use_cpu", "true"]
    return defaults


def held_out_files(config: BD3LMTrainingConfig) -> list[str]:
    if config.eval_data:
        return list(config.eval_data)
    if config.data == ["shakespeare"]:
        return [str(play) for play in shakespeare_split(config.shakespeare_plays)[1]]
    raise ValueError("the demo evaluates on held-out files: pass --eval_data with --data.")


def check_export_dir(export_dir: str, output_dir: str | None = None) -> None:
    """Before training: the demo replaces its own earlier export, never a folder holding anything else, nor one
    that is, holds or lies inside the training run's `output_dir` (emptying it would delete the run)."""
    folder = check_output_folder(export_dir, overwrite=True)  # not a file, not a git repository
    if output_dir is not None and (holds(folder, Path(output_dir)) or holds(Path(output_dir), folder)):
        raise ValueError(f"--export_dir {export_dir} and --output_dir {output_dir} overlap: the export replaces its "
                         "folder's contents, the training run's included; pass two separate folders.")
    if folder.exists() and any(folder.iterdir()) and not is_exported_model_folder(folder):
        raise ValueError(f"--export_dir {export_dir} holds files that are not an exported model folder (a training "
                         "run's checkpoints or results, or other files): the demo replaces the folder's contents "
                         "with its export; pass a new or an empty folder (or an earlier export).")


def fresh_process(*arguments: str) -> str:
    """Run `bd3lm-hf ARGUMENTS` in a new interpreter (the model comes from the exported folder's code)."""
    result = subprocess.run([sys.executable, "-m", "bd3lm_hf.cli", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"`bd3lm-hf {arguments[0]}` failed in the fresh process:\n{result.stderr[-2000:]}")
    return result.stdout


def main(argv: list[str]) -> dict:
    demo, config, args = parse_dataclass_flags((DemoArguments, BD3LMTrainingConfig, TrainingArguments),
                                               training_defaults() + list(argv), "bd3lm-hf demo")
    check_export_dir(demo.export_dir, args.output_dir)
    eval_files = held_out_files(config)  # before training: a missing --eval_data is known now
    logger.info(f"1/3 training a BD3-LM (block {config.block_size}, L {config.max_position_embeddings}, "
                f"H {config.hidden_size} x {config.num_hidden_layers}) for {args.max_steps} steps")
    summary = train(config, args)
    trainer = summary["trainer"]
    metrics = {"eval_nelbo": summary["eval_nelbo"], "eval_perplexity": summary["eval_perplexity"]}  # None: no card row
    export = export_for_hub(trainer.model, trainer.processing_class, demo.export_dir, metrics=metrics,
                            datasets=["shakespeare"] if config.data == ["shakespeare"] else None, overwrite=True,
                            sources=(args.output_dir,))  # the run's folder is never emptied
    logger.info(f"2/3 the Hub folder holds {', '.join(sorted(p.name for p in Path(export).iterdir()))}")
    logger.info("3/3 reloading it in a fresh process with AutoModelForCausalLM.from_pretrained(dir, "
                "trust_remote_code=True)")
    layout = ["--wrap-framed"] * config.wrap_framed + ["--ignore-first-token"] * config.ignore_first_token
    evaluation = fresh_process("eval", str(export), "--data", *eval_files, "--text-column",
                               config.text_column, "--max-sequences", str(demo.eval_sequences),
                               *layout)  # the data and layout training evaluated with
    generation_flags = ["--prompt", *demo.prompts, "--max-new-tokens", str(demo.max_new_tokens), "--sampler",
                        demo.sampler] + ([] if demo.num_steps is None else ["--num-steps", str(demo.num_steps)])
    samples = fresh_process("generate", str(export), *generation_flags)
    return {"summary": summary, "export": export, "evaluation": evaluation, "samples": samples}
