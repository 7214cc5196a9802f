"""Trains a tiny BD3-LM for 3 steps on fixed (pre-noised) data; run alone or under `accelerate launch`.

    python ddp_train.py OUT PER_DEVICE_BATCH GRAD_ACCUM

Writes OUT/result.json (losses per step, parameter checksum) from the main process.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, set_seed

from bd3lm_hf import BD3LMConfig, BD3LMForBlockDiffusion
from bd3lm_hf.collator import DataCollatorForBlockDiffusion
from process_exit import exit_processes

MASK, BLOCK, LENGTH, EXAMPLES = 63, 4, 16, 48


def fixed_noisy_dataset() -> Dataset:
    """Each example noised once with its own seed: the same inputs whatever the batching. Prompt lengths vary, so
    examples carry different numbers of scored tokens (the loss normalisation matters)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for index in range(EXAMPLES):
        feature = {"input_ids": torch.randint(0, MASK, (LENGTH,), generator=g).tolist(),
                   "prompt_length": int(torch.randint(0, 9, (1,), generator=g))}
        collator = DataCollatorForBlockDiffusion(MASK, BLOCK, seed=index)
        batch = collator([feature])
        rows.append({k: v[0].tolist() for k, v in batch.items()})
    return Dataset.from_list(rows)


def stack(features):
    return {key: torch.tensor([f[key] for f in features]) for key in features[0]}


def main(out: str, per_device: int, accumulation: int) -> None:
    args = TrainingArguments(out, max_steps=3, per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, learning_rate=5e-3, logging_steps=1,
                             save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(),
                             remove_unused_columns=False, dataloader_drop_last=True,
                             ddp_find_unused_parameters=False)  # build_trainer's default: no parameter is unused
    set_seed(0)
    config = BD3LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, cond_dim=16,
                         max_position_embeddings=LENGTH, block_size=BLOCK, hidden_dropout=0.0)
    model = BD3LMForBlockDiffusion(config)
    with torch.no_grad():  # leave the zero-init: start from random weights so that every step moves the loss
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    trainer = Trainer(model=model, args=args, train_dataset=fixed_noisy_dataset(), data_collator=stack)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        checksum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps({"losses": losses, "checksum": checksum,
                                                           "world_size": args.world_size}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    exit_processes()  # here only: a test may import and run main() in its own process
