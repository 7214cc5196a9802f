"""The clip search over 2 processes (gloo, CPU) takes one variance of the pooled per-block losses, as the original:
per process (summed) it would pick another interval. Usage: torchrun --nproc_per_node 2 clip_search_processes.py OUT"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import bd3lm_hf.callbacks as callbacks
from bd3lm_hf import DataCollatorForBlockDiffusion
from bd3lm_hf.callbacks import ClipSearchCallback
from process_exit import exit_processes

SAME, SPREAD = (1e-3, 1.0), (0.2, 0.8)


def losses_of_this_process(model, x0, attention_mask, keep, interval, *args):
    """SAME: constant within each process (variance 0 each) but 0 on one and 10 on the other, in batches of other
    widths (as SFT batches padded to their longest row); SPREAD: [0, 1] on both (variance 0.5 each). Pooled: SAME
    varies far more, so SPREAD wins; summed per process, SAME would."""
    if interval == SAME:
        return torch.full((1, 2 + dist.get_rank()), 10.0 * dist.get_rank())
    return torch.tensor([[0.0, 1.0]])


def main(out: str):
    dist.init_process_group("gloo")
    callbacks.per_block_losses = losses_of_this_process
    collator = DataCollatorForBlockDiffusion(9, 4, seed=0)
    search = ClipSearchCallback(collator, num_batches=1, intervals=[SAME, SPREAD])
    best = search.search(torch.nn.Linear(1, 1), [collator([{"input_ids": list(range(8))}])])
    if dist.get_rank() == 0:
        (Path(out) / "result.json").write_text(json.dumps({"best": list(best)}))


if __name__ == "__main__":
    main(sys.argv[1])
    exit_processes()  # here only: a test may import and run main() in its own process
