"""The block-diffusion callbacks under 2 processes (gloo, CPU): evaluate() before train() sees the noise it sees
after (each process its own stream from the start), and checkpoints with save_only_model=True are written (the
collator state once, by the process that saves). Usage: accelerate launch --num_processes 2 ... OUT"""

import json
import sys
from pathlib import Path

from transformers import Trainer, TrainingArguments, set_seed

from bd3lm_hf import DataCollatorForBlockDiffusion
from bd3lm_hf.callbacks import BlockDiffusionCallback
from process_exit import exit_processes
from tiny_training import BLOCK, MASK, random_rows, random_tiny_model


def main(out: str) -> None:
    args = TrainingArguments(out, max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                             learning_rate=0.0, save_strategy="steps", save_steps=1, save_only_model=True,
                             logging_steps=1, report_to="none", seed=0, disable_tqdm=True, use_cpu=True,
                             remove_unused_columns=False)
    set_seed(0)
    model = random_tiny_model(std=0.3)  # random weights: the loss depends on the noise
    data = random_rows(8)
    collator = DataCollatorForBlockDiffusion(MASK, BLOCK, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collator,
                      callbacks=[BlockDiffusionCallback(collator)])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]  # learning rate 0: the same weights
    if trainer.is_world_process_zero():
        saved = sorted(str(p.relative_to(out)) for p in Path(out).glob("checkpoint-*/collator_state.json"))
        (Path(out) / "result.json").write_text(json.dumps({"before": before, "after": after, "saved": saved,
                                                           "world_size": args.world_size}))


if __name__ == "__main__":
    main(sys.argv[1])
    exit_processes()  # here only: a test may import and run main() in its own process
