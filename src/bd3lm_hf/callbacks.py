"""Trainer callbacks of block diffusion: the noise range around evaluations, NELBO perplexity, and the clip search
of the noise schedule (the paper's variance minimisation, "var_min")."""

import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .collator import EVAL_RANGE
from .modeling.diffusion_bd3lm import diffusion_nelbo_terms, q_xt, sample_block_noise_levels

logger = logging.get_logger(__name__)

COLLATOR_STATE = "collator_state.json"


class BlockDiffusionCallback(TrainerCallback):
    """Trains with the collator's clip range and evaluates with t over [1e-3, 1] (the paper's NELBO); adds
    `eval_perplexity` = exp(eval_loss) to the evaluation metrics; keeps the collator's noise in step with the data
    on resume (batch index, per-process stream) and saves its training range with every checkpoint."""

    def __init__(self, collator):
        self.collator = collator
        self.collator.training = False  # outside `train()`, Trainer only evaluates
        self.in_training = False

    def on_train_begin(self, args, state, control, **kwargs):
        if args.label_smoothing_factor:
            # Trainer's label smoother pops the labels, so the model would run its plain forward (no 2L pass) and
            # Trainer would train a smoothed cross-entropy of x_t predictions instead of the NELBO.
            raise ValueError(f"label_smoothing_factor={args.label_smoothing_factor} replaces the block-diffusion "
                             "NELBO with Trainer's smoothed cross-entropy; set label_smoothing_factor=0.")
        self.in_training = True
        self.collator.training = True
        self.collator.stream = args.process_index
        self.collator.batch_index["train"] = state.global_step * args.gradient_accumulation_steps
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}" / COLLATOR_STATE
        if state.global_step > 0 and checkpoint.is_file():
            saved = json.loads(checkpoint.read_text())
            self.collator.train_range = tuple(saved["train_range"])

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            self.collator.training = False
            self.collator.batch_index["eval"] = 0  # every evaluation sees the same noise

    def on_train_end(self, args, state, control, **kwargs):
        self.in_training = False
        self.collator.training = False

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / COLLATOR_STATE
        path.write_text(json.dumps({"train_range": list(self.collator.train_range)}))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # Back to training noise before the next training batch is fetched (the data loader fetches one batch
        # ahead, before `on_step_begin`).
        self.collator.training = self.in_training
        if metrics and "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
            if state.log_history and "eval_loss" in state.log_history[-1]:
                state.log_history[-1]["eval_perplexity"] = metrics["eval_perplexity"]


def candidate_intervals(widths=(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9), delta: float = 0.05,
                        eps: float = 1e-3) -> list[tuple[float, float]]:
    """[1e-3, 1] and every interval of each width stepping `delta` across [0, 1] (lower ends clamped at eps)."""
    intervals = [(eps, 1.0)]
    for width in widths:
        for start in np.arange(0.0, 1.0 - width + delta / 2, delta):
            low, high = max(round(float(start), 6), eps), round(float(start) + width, 6)
            if high <= 1.0 + 1e-9 and (low, min(high, 1.0)) not in intervals:
                intervals.append((low, min(high, 1.0)))
    return intervals


@torch.no_grad()
def per_block_losses(model, x0, attention_mask, keep, interval, mask_token_id: int, block_size: int,
                     generator: torch.Generator | None = None):
    """(B, nb) mean NELBO term per block for clean `x0` noised with t in `interval` (low-discrepancy)."""
    batch, length = x0.shape
    t = sample_block_noise_levels(batch, length // block_size, *interval, generator=generator).to(x0.device)
    x_t = q_xt(x0.cpu(), t.cpu(), block_size, mask_token_id, generator=generator, keep=keep.cpu()).to(x0.device)
    labels = x0.masked_fill(keep, -100)
    logits = model(input_ids=x_t, labels=labels, attention_mask=attention_mask).logits
    terms = diffusion_nelbo_terms(logits, x_t, x0, t, block_size, mask_token_id) * (~keep)
    return terms.view(batch, -1, block_size).mean(-1)


class ClipSearchCallback(TrainerCallback):
    """At each evaluation, picks the clip range [beta, omega] whose per-block NELBO has the least summed variance
    over `num_batches` validation batches (the paper's search, widths 0.5-0.9 in steps of 0.05), and writes it to
    `model.config.sampling_eps_min/max` (saved with the checkpoint) and to the collator's training range.

    Register it BEFORE `EMACallback`, so that it searches with the EMA weights as the original does.
    """

    def __init__(self, collator, num_batches: int = 100, intervals: list[tuple[float, float]] | None = None,
                 seed: int = 0):
        self.collator = collator
        self.num_batches = num_batches
        self.intervals = intervals or candidate_intervals()
        self.seed = seed

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, metrics=None, **kwargs):
        if eval_dataloader is None:
            return
        best = self.search(model, eval_dataloader)
        model.config.sampling_eps_min, model.config.sampling_eps_max = best
        self.collator.train_range = best
        if metrics is not None:
            metrics["eval_sampling_eps_min"], metrics["eval_sampling_eps_max"] = best
        logger.info("clip search: training noise range is now [%.3f, %.3f]", *best)

    def search(self, model, dataloader) -> tuple[float, float]:
        was_training = model.training
        model.eval()
        variances = dict.fromkeys(self.intervals, 0.0)
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)  # every search draws the same noise
        for index, batch in enumerate(dataloader):
            if index >= self.num_batches:
                break
            labels, x_t = batch["labels"].to(device), batch["input_ids"].to(device)
            keep = labels == -100
            x0 = torch.where(keep, x_t, labels)
            attention_mask = batch["attention_mask"].to(device)
            for interval in self.intervals:
                losses = per_block_losses(model, x0, attention_mask, keep, interval, self.collator.mask_token_id,
                                          self.collator.block_size, generator)
                variances[interval] += float(_all_reduce_sum(losses.var()))
        model.train(was_training)
        return min(self.intervals, key=lambda interval: (variances[interval], interval != EVAL_RANGE))


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value
