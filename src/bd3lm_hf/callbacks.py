"""Trainer callbacks of block diffusion: the noise range around evaluations, NELBO perplexity, and the clip search
of the noise schedule (the paper's variance minimisation, "var_min")."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
from accelerate.data_loader import DataLoaderDispatcher
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length  # has_length: what Trainer asks of a data loader
from transformers.utils import logging

from .collator import EVAL_RANGE
from .modeling.diffusion_bd3lm import diffusion_nelbo_terms, q_xt, sample_block_noise_levels

logger = logging.get_logger(__name__)

COLLATOR_STATE = "collator_state.json"


class BlockDiffusionCallback(TrainerCallback):
    """Trains with the collator's clip range and evaluates with t over [1e-3, 1] (the paper's NELBO); adds
    `eval_perplexity` = exp(eval_loss) to the evaluation metrics; keeps the collator's noise in step with the data
    on resume (batch index, per-process stream, the clip ranges saved with every checkpoint).

    Pass it to `Trainer(callbacks=[...])`: its checks and per-process noise stream are set when the Trainer is built
    (`trainer.add_callback` comes too late for an evaluate() before train()).

    Every evaluation (by steps, by epoch, `eval_on_start`, or `trainer.evaluate()` / `predict()`) sees the same noise:
    the eval batches restart at index 0 and never use up training batch indices.

    `resume_from`: the checkpoint folder to read the collator state from when training resumes; by default
    `output_dir/checkpoint-<step>`, where Trainer writes it (`train(resume_from_checkpoint=...)` does not tell
    callbacks the folder it resumes from: set this when resuming from elsewhere).

    `eval_splits`: the keys of a dict `eval_dataset`, in order (Trainer evaluates them one after the other and calls
    `on_evaluate` after each); the evaluation noise then lasts until the last split. Required with a dict.
    """

    def __init__(self, collator, resume_from: str | None = None, eval_splits=None):
        self.collator = collator
        self.collator.training = False  # outside `train()`, Trainer only evaluates
        self.in_training = False
        self.resume_from = resume_from
        self.eval_splits = list(eval_splits) if eval_splits is not None else None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # evaluate() / predict() may come before (or without) train(): the same checks and per-process noise stream
        refuse_unsupported_arguments(args)
        refuse_precompiled_model(model)
        self.collator.stream = args.process_index

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        refuse_unsupported_arguments(args)
        self.in_training = True
        self.collator.training = True
        self.collator.stream = args.process_index
        self.collator.batch_index["train"] = first_batch_index(args, state, train_dataloader)
        if state.global_step > 0:
            self.restore(checkpoint_folder(args, state, self.resume_from) / COLLATOR_STATE)
        if args.eval_on_start:
            self.enter_evaluation()

    def enter_evaluation(self) -> None:
        """Evaluation noise from eval batch 0, until `on_evaluate` switches back."""
        self.collator.training = False
        self.collator.batch_index["eval"] = 0

    def restore(self, path: Path) -> None:
        if not path.is_file():
            logger.warning("resuming at a step without %s (looked in %s): the collator keeps its training clip range "
                           "%s; set BlockDiffusionCallback.resume_from to the checkpoint folder resumed from.",
                           COLLATOR_STATE, path.parent, self.collator.train_range)
            return
        saved = json.loads(path.read_text())
        if not (saved.get("range_changes") or "train_range" in saved):
            raise ValueError(f"{path} holds neither range_changes nor train_range (BlockDiffusionCallback writes "
                             "them): resume from a checkpoint it saved.")
        changes = saved.get("range_changes") or [[0, saved["train_range"]]]  # older checkpoints: one range
        self.collator.range_changes = [(int(start), tuple(bounds)) for start, bounds in changes]

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            self.enter_evaluation()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_evaluate:  # eval_strategy="epoch"
            self.enter_evaluation()

    def on_train_end(self, args, state, control, **kwargs):
        self.in_training = False
        self.collator.training = False

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:  # one writer; the folder may not exist yet on the other processes
            return
        folder = checkpoint_folder(args, state)
        folder.mkdir(parents=True, exist_ok=True)
        changes = [[start, list(bounds)] for start, bounds in self.collator.range_changes]
        (folder / COLLATOR_STATE).write_text(json.dumps({"range_changes": changes}))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # Back to training noise before the next training batch is fetched (the data loader fetches one batch
        # ahead, before `on_step_begin`), unless another split of this evaluation follows; every split and the next
        # evaluation start again at eval batch 0.
        self.collator.batch_index["eval"] = 0
        if not (self.in_training and more_splits_follow(metrics, self.eval_splits)):
            self.collator.training = self.in_training
        add_perplexity(metrics, state)

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self.collator.batch_index["eval"] = 0


def refuse_precompiled_model(model) -> None:
    """`Trainer(model=torch.compile(model))`: Trainer reads no label names from the compiled wrapper (evaluation
    would report no eval_loss) and checkpoints carry `_orig_mod.` key prefixes."""
    if hasattr(model, "_orig_mod"):
        raise ValueError("the model was compiled before Trainer got it (torch.compile(model)): evaluation would lose "
                         "its loss and checkpoints their key names. Pass the model itself, with "
                         "TrainingArguments(torch_compile=True) to compile it.")


def refuse_unsupported_arguments(args) -> None:
    """TrainingArguments that would silently train or evaluate something else than the block-diffusion NELBO."""
    if args.label_smoothing_factor:
        # Trainer's label smoother pops the labels, so the model would run its plain forward (no 2L pass) and
        # Trainer would train a smoothed cross-entropy of x_t predictions instead of the NELBO.
        raise ValueError(f"label_smoothing_factor={args.label_smoothing_factor} replaces the block-diffusion "
                         "NELBO with Trainer's smoothed cross-entropy; set label_smoothing_factor=0.")
    if args.remove_unused_columns:
        # Trainer keeps only the columns of the model's forward: the collator's `prompt_length` would be dropped
        # and SFT prompts noised and scored as if they were responses.
        raise ValueError("remove_unused_columns=True drops the `prompt_length` column the collator needs; set "
                         "TrainingArguments(remove_unused_columns=False) (the collator ignores other columns).")
    if args.neftune_noise_alpha:
        # NEFTune hooks the input embeddings, which embed [x_t ; x_0] in the 2L pass: it would noise the clean
        # context too (at a scale set by 2L), which inference never sees.
        raise ValueError(f"neftune_noise_alpha={args.neftune_noise_alpha} would add noise to the clean x_0 half of "
                         "the 2L training input too; set neftune_noise_alpha=None.")
    if args.dataloader_num_workers:
        # Each worker collates with its own copy of the collator: the batch-index keyed noise, the evaluation noise
        # and clip-search ranges set in the main process would not reach it (noise no longer exact or resumable).
        raise ValueError(f"dataloader_num_workers={args.dataloader_num_workers}: the block-diffusion collator "
                         "draws its noise in the main process (keyed by batch index; collating is cheap); set "
                         "dataloader_num_workers=0.")


def first_batch_index(args, state, train_dataloader=None) -> int:
    """The collator's training batch index when `train()` starts or resumes at `state.global_step`.

    The batches drawn before, less those Trainer draws again to skip them: a loader over an iterable dataset has no
    sampler to skip in, so it fetches (and collates) the batches of the resumed epoch and drops them. Times the
    processes whose batches this one collates: with accelerate's dispatching (its default for iterable data on
    several processes) process 0 collates one batch per process, unless `split_batches` (one batch, split)."""
    index = consumed_batches(args, state, train_dataloader)
    dataset = getattr(train_dataloader, "dataset", None)
    if state.global_step > 0 and not args.ignore_data_skip and isinstance(dataset, torch.utils.data.IterableDataset):
        index -= state.global_step % steps_per_epoch(args, state, train_dataloader) * args.gradient_accumulation_steps
    if isinstance(train_dataloader, DataLoaderDispatcher) and not train_dataloader.split_batches:
        index *= args.world_size
    return index


def consumed_batches(args, state, train_dataloader=None) -> int:
    """Training batches drawn before `state.global_step`, as Trainer counts them when it resumes: an epoch of n
    batches makes ceil(n / gradient_accumulation_steps) optimizer steps (its last one may take fewer batches)."""
    if not has_length(train_dataloader):  # no data loader, or no length: every step takes a full accumulation
        return state.global_step * args.gradient_accumulation_steps
    epochs, steps = divmod(state.global_step, steps_per_epoch(args, state, train_dataloader))
    return epochs * len(train_dataloader) + steps * args.gradient_accumulation_steps


def steps_per_epoch(args, state, train_dataloader) -> int:
    """Trainer's optimizer steps per epoch: ceil(batches / gradient_accumulation_steps); `max_steps` for a loader
    without a length."""
    if not has_length(train_dataloader):
        return state.max_steps
    return max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)


def metric_prefix(metrics) -> str | None:
    """The prefix of an evaluation's metrics (`eval`, or `eval_<split>` for a dict eval_dataset)."""
    runtime = next((key for key in metrics or {} if key.endswith("_runtime")), None)
    return runtime[: -len("_runtime")] if runtime else None


def evaluated_split(metrics, eval_splits) -> str | None:
    """The split of a dict eval_dataset these metrics are of (Trainer evaluates the dict in order, with the prefix
    `eval_<name>`); None for a single dataset. A dict needs its keys in `eval_splits`."""
    prefix = metric_prefix(metrics)
    if prefix is None or not prefix.startswith("eval_"):
        return None
    if eval_splits is None:
        raise ValueError(f"eval_dataset is a dict (this evaluation: {prefix!r}): pass eval_splits=list(eval_dataset) "
                         "to BlockDiffusionCallback, EMACallback and ClipSearchCallback, so that every split is "
                         "evaluated with the evaluation noise on the EMA weights.")
    return prefix[len("eval_"):]


def more_splits_follow(metrics, eval_splits) -> bool:
    """Whether Trainer evaluates another split of a dict eval_dataset after this one."""
    split = evaluated_split(metrics, eval_splits)
    return split is not None and split != eval_splits[-1]


def add_perplexity(metrics, state) -> None:
    """`<prefix>_perplexity` = exp(`<prefix>_loss`), in the metrics and in the log entry Trainer just wrote."""
    prefix = metric_prefix(metrics)
    if prefix is None or f"{prefix}_loss" not in metrics:
        return
    perplexity = math.exp(min(metrics[f"{prefix}_loss"], 50.0))  # a diverged loss: a huge number, not inf
    metrics[f"{prefix}_perplexity"] = perplexity
    if state.log_history and f"{prefix}_loss" in state.log_history[-1]:
        state.log_history[-1][f"{prefix}_perplexity"] = perplexity


def checkpoint_folder(args, state, resume_from: str | None = None) -> Path:
    """The checkpoint folder of this step: `resume_from` when given (a resumed run's source), else where Trainer
    writes it, `output_dir/checkpoint-<step>`."""
    return Path(resume_from) if resume_from else Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def candidate_intervals(widths=(0.5, 0.6, 0.7, 0.8, 0.9), delta: float = 0.05,
                        eps: float = 1e-3) -> list[tuple[float, float]]:
    """[1e-3, 1] and every interval of each width stepping `delta` across [0, 1] (lower ends clamped at eps); the
    widths of the original's released runs (clip_search_widths), 36 intervals."""
    intervals = [(eps, 1.0)]
    for width in widths:
        for start in np.arange(0.0, 1.0 - width + delta / 2, delta):
            low, high = max(round(float(start), 6), eps), round(float(start) + width, 6)
            if high <= 1.0 + 1e-9 and (low, min(high, 1.0)) not in intervals:
                intervals.append((low, min(high, 1.0)))
    return intervals


@torch.no_grad()
def per_block_losses(model, x0, attention_mask, keep, interval, mask_token_id: int, block_size: int,
                     generator: torch.Generator | None = None, resample=None):
    """(B, nb) mean NELBO term per block for clean `x0` noised with t in `interval` (low-discrepancy); `resample`:
    the collator's `resample_blocks`, when training resamples (the original's search noises as training does)."""
    batch, length = x0.shape
    t = sample_block_noise_levels(batch, length // block_size, *interval, generator=generator)
    x0_cpu, keep_cpu = x0.cpu(), keep.cpu()
    x_t = q_xt(x0_cpu, t, block_size, mask_token_id, generator=generator, keep=keep_cpu)
    if resample is not None:
        x_t = resample(x0_cpu, x_t, t, keep_cpu, interval, generator)
    t, x_t = t.to(x0.device), x_t.to(x0.device)
    labels = x0.masked_fill(keep, -100)
    logits = model(input_ids=x_t, labels=labels, noise_levels=t, attention_mask=attention_mask, return_dict=True).logits
    terms = diffusion_nelbo_terms(logits, x_t, x0, t, block_size, mask_token_id) * (~keep)
    return terms.view(batch, -1, block_size).mean(-1)


class ClipSearchCallback(TrainerCallback):
    """At each evaluation during training, picks the clip range [beta, omega] whose per-block NELBO has the least
    summed variance over `num_batches` validation batches (the paper's search: widths 0.5, 0.6, ..., 0.9 as in the
    original's released runs, starts stepping 0.05; noised as training noises, resampling included), and writes it
    to `model.config.sampling_eps_min/max` (saved with the checkpoint) and to the collator's training range.
    With several processes, the variance is taken over the losses of all of them (as the original pools them).

    Register it BEFORE `EMACallback`, so that it searches with the EMA weights as the original does.
    """

    def __init__(self, collator, num_batches: int = 100, intervals: list[tuple[float, float]] | None = None,
                 seed: int = 0, eval_splits=None):
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive int (validation batches per clip search), got "
                             f"{num_batches!r}.")
        self.collator = collator
        self.eval_splits = list(eval_splits) if eval_splits is not None else None
        self.num_batches = num_batches
        self.intervals = intervals or candidate_intervals()
        self.seed = seed
        self.in_training = False

    def on_train_begin(self, args, state, control, **kwargs):
        if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no" and not args.eval_on_start:
            raise ValueError("ClipSearchCallback searches at the evaluations during training, and eval_strategy='no' "
                             "(without eval_on_start) runs none: set eval_strategy ('steps' or 'epoch') and an "
                             "eval_dataset, or leave the callback out.")
        self.in_training = True
        # with resample, the collator refuses a range no block can meet: leave those out now, not after a search
        reachable = [interval for interval in self.intervals if self.collator.reaches(*interval)]
        if not reachable:
            raise ValueError(f"clip search: with resample=True and block_size={self.collator.block_size} no "
                             f"candidate range holds a masked fraction k/{self.collator.block_size}: {self.intervals}.")
        if len(reachable) < len(self.intervals):
            logger.info("clip search: %d of %d candidate ranges hold no masked fraction k/%d (resample): left out",
                        len(self.intervals) - len(reachable), len(self.intervals), self.collator.block_size)
        self.intervals = reachable

    def on_train_end(self, args, state, control, **kwargs):
        self.in_training = False

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, metrics=None, **kwargs):
        # Only evaluations during training search: the range is for the training still to come, and a standalone
        # evaluate() after the model was saved would change a config that is no longer saved.
        if eval_dataloader is None or not self.in_training or not self.searches_on(metrics):
            return
        with self.collator.evaluating():  # whatever the order of the callbacks' on_evaluate
            best = self.search(model, eval_dataloader)
        model.config.sampling_eps_min, model.config.sampling_eps_max = best
        self.collator.train_range = best  # from the next training batch not yet drawn
        if metrics is not None:
            metrics["eval_sampling_eps_min"], metrics["eval_sampling_eps_max"] = best
        logger.info("clip search: training noise range is now [%.3f, %.3f]", *best)

    def searches_on(self, metrics) -> bool:
        """One search per evaluation: on the first split of a dict eval_dataset (`eval_splits`, in order)."""
        split = evaluated_split(metrics, self.eval_splits)
        return split is None or split == self.eval_splits[0]

    def search(self, model, dataloader) -> tuple[float, float]:
        was_training = model.training
        model.eval()
        try:
            variances = self.summed_variances(model, dataloader)
        finally:
            model.train(was_training)
        return min(self.intervals, key=lambda interval: (variances[interval], interval != EVAL_RANGE))

    def summed_variances(self, model, dataloader) -> dict:
        """{interval: the per-block NELBO variance summed over the first `num_batches` batches}: one 2L forward per
        interval and batch (36 x 100 by default: minutes on a large model, hence the progress bar)."""
        variances = dict.fromkeys(self.intervals, 0.0)
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)  # every search draws the same noise
        resampling = self.collator.resample_blocks if self.collator.resample else None
        num_batches = min(self.num_batches, len(dataloader)) if hasattr(dataloader, "__len__") else self.num_batches
        logger.info("clip search: %d candidate ranges on %d validation batches", len(self.intervals), num_batches)
        with logging.tqdm(total=num_batches, desc="clip search", leave=False) as progress:
            for batch in itertools.islice(dataloader, self.num_batches):
                labels, x_t = batch["labels"].to(device), batch["input_ids"].to(device)
                keep = labels == -100
                x0 = torch.where(keep, x_t, labels)
                attention_mask = batch["attention_mask"].to(device)
                for interval in self.intervals:
                    losses = per_block_losses(model, x0, attention_mask, keep, interval, self.collator.mask_token_id,
                                              self.collator.block_size, generator, resampling)
                    variances[interval] += pooled_variance(losses)
                progress.update()
        return variances


def pooled_variance(losses: torch.Tensor) -> float:
    """The unbiased variance of the per-block losses of every process together (the original pools them before
    taking one variance). Reduced as (count, sum, sum of squares): processes may hold batches of other shapes
    (the collator pads each batch to its longest row)."""
    values = losses.detach().double().flatten()
    moments = torch.stack([torch.tensor(values.numel(), dtype=torch.float64, device=values.device), values.sum(),
                           values.square().sum()])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(moments)
    count, total, squares = moments.tolist()
    return (squares - total * total / count) / (count - 1) if count > 1 else math.nan
