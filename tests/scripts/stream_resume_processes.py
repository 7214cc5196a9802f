"""Resume under 2 processes (gloo, CPU) on streamed (iterable) training data, with accelerate's dispatching (its
default for iterable data: process 0 collates every process's batches, or one batch it splits: `split_batches`)
and without it: the resumed run's losses and weights equal the uninterrupted run's. With `ignore_data_skip` the
data restart, but the collator's batch index (the noise) goes on where the uninterrupted run's is.
Usage: accelerate launch --num_processes 2 ... OUT"""

import json
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from bd3lm_hf import DataCollatorForBlockDiffusion
from bd3lm_hf.callbacks import BlockDiffusionCallback
from process_exit import exit_processes
from tiny_training import BLOCK, MASK, random_rows, random_tiny_model

ROWS = 64


def run(out: Path, dispatch: bool, split: bool, ignore_data_skip: bool, resume: str | None = None) -> dict:
    """6 steps (a checkpoint at 3) on a stream of fixed rows: losses, parameter checksum, the last batch index."""
    args = TrainingArguments(str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=5e-3,
                             save_strategy="steps", save_steps=3, logging_steps=1, report_to="none", seed=0,
                             disable_tqdm=True, use_cpu=True, remove_unused_columns=False,
                             ignore_data_skip=ignore_data_skip,
                             accelerator_config={"dispatch_batches": dispatch, "split_batches": split})
    set_seed(0)
    model = random_tiny_model(std=0.1, hidden_dropout=0.0)  # random weights: the loss depends on the noise
    rows = random_rows(ROWS)
    collator = DataCollatorForBlockDiffusion(MASK, BLOCK, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows.to_iterable_dataset(num_shards=2),
                      data_collator=collator,
                      callbacks=[BlockDiffusionCallback(collator)])
    trainer.train(resume_from_checkpoint=resume)
    return {"losses": [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry],
            "checksum": float(sum(p.detach().double().abs().sum() for p in model.parameters())),
            "batch_index": collator.batch_index["train"]}


def main(out: str) -> None:
    results = {}
    for dispatch, split, ignore_data_skip in ((True, False, False), (False, False, False), (True, False, True),
                                             (True, True, False), (True, True, True)):
        name = f"dispatch_batches={dispatch}, split_batches={split}, ignore_data_skip={ignore_data_skip}"
        folder = Path(out) / name.replace(", ", "_")
        whole = run(folder / "whole", dispatch, split, ignore_data_skip)
        run(folder / "cut", dispatch, split, ignore_data_skip)
        resumed = run(folder / "cut", dispatch, split, ignore_data_skip, resume=str(folder / "cut" / "checkpoint-3"))
        results[name] = {"whole": whole, "resumed": resumed}
    if torch.distributed.get_rank() == 0:
        (Path(out) / "result.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
    exit_processes()
