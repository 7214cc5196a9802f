"""The noising data collator of block diffusion: clean token ids in, (x_t, labels, per-block t) out."""

import contextlib
import math
import operator

import torch
from transformers.utils import logging

from .modeling.diffusion_bd3lm import check_clip_range, q_xt, sample_block_noise_levels

logger = logging.get_logger(__name__)

EVAL_RANGE = (1e-3, 1.0)  # the paper reports the NELBO with t over [1e-3, 1], whatever the training clip range
MAX_RESAMPLES = 100


class DataCollatorForBlockDiffusion:
    """Pads, noises and labels a batch for the 2L training forward, so that `model(**collator(features)).loss` works.

    Features are dicts with `input_ids` (clean tokens) and, for SFT, `prompt_length` (tokens before it are never
    noised and carry no loss). Returns `input_ids` (x_t), `labels` (x_0, -100 at prompt and padding),
    `noise_levels` (B, L / block_size) and `attention_mask`. One t per block, low-discrepancy across the batch, in
    the training clip range [eps_min, eps_max] while `training` is True and in [1e-3, 1] otherwise (evaluation;
    `BlockDiffusionCallback` switches it around Trainer evaluations). `resample=True` redraws the noise of blocks
    whose realised masked fraction falls outside the clip range (as the original: a bound at 1e-3 or 1 is not
    enforced, so with [1e-3, w] only blocks above w are redrawn). `ignore_first_token=True` never noises the first
    token of a sequence and leaves it out of evaluation scores (the original's `ignore_bos`, on in its BD3-LM runs).

    Randomness: with `seed`, the noise of the i-th training batch comes from a generator seeded with
    (seed, stream, i), and the noise of the i-th batch of an evaluation from (seed, stream, "eval", i). Noise is
    then a function of the batch index, not of a running RNG stream, so a resumed run draws exactly the noise of
    an uninterrupted one (`BlockDiffusionCallback` sets the batch index on resume and `stream` to the process
    index) and every evaluation sees the same noise. With an explicit `generator` it is used as one stream; with
    neither, torch's global RNG. With a seed or a generator it refuses to run in a DataLoader worker process: each
    worker holds a copy, which the batch index and range changes of the main process never reach, and copies of a
    generator repeat each other's numbers (`BlockDiffusionCallback` refuses `dataloader_num_workers > 0` when the
    Trainer is built); with neither, workers use torch's per-worker RNG.

    Setting `train_range` (the clip search does, between steps) takes effect from the next training batch not yet
    drawn: the data loader has already drawn one batch ahead with the old range. `range_changes` keeps the batch
    index each range starts at, so that a resumed run draws every batch with the range the uninterrupted run used.
    """

    def __init__(self, mask_token_id: int, block_size: int, eps_min: float = 1e-3, eps_max: float = 1.0,
                 resample: bool = False, pad_token_id: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, ignore_first_token: bool = False):
        if not hasattr(mask_token_id, "__index__") or operator.index(mask_token_id) < 0:
            raise ValueError(f"mask_token_id must be a token id (int >= 0; the model's config.mask_token_id), got "
                             f"{mask_token_id!r}.")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}.")
        check_clip_range(eps_min, eps_max)
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.resample = resample
        self.check_reachable(eps_min, eps_max)
        self.range_changes: list[tuple[int, tuple[float, float]]] = [(0, (float(eps_min), float(eps_max)))]
        self.ignore_first_token = ignore_first_token
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.generator = generator
        self.stream = 0
        self.batch_index = {"train": 0, "eval": 0}
        self.training = True

    @property
    def train_range(self) -> tuple[float, float]:
        """The training clip range of the next training batch."""
        return self.range_changes[-1][1]

    @train_range.setter
    def train_range(self, value) -> None:
        low, high = (float(bound) for bound in value)
        check_clip_range(low, high, ("low", "high"))
        self.check_reachable(low, high)
        if (low, high) == self.train_range:
            return
        start = self.batch_index["train"]
        self.range_changes = [change for change in self.range_changes if change[0] < start] + [(start, (low, high))]

    def training_range(self, index: int) -> tuple[float, float]:
        """The clip range of training batch `index`."""
        return next(value for start, value in reversed(self.range_changes) if start <= index)

    @property
    def noise_range(self) -> tuple[float, float]:
        """The range of the next batch: its training range, or [1e-3, 1] in evaluation."""
        return self.training_range(self.batch_index["train"]) if self.training else EVAL_RANGE

    @contextlib.contextmanager
    def evaluating(self):
        """Evaluation noise from eval batch 0 inside the block; the training state is restored after it."""
        training, index = self.training, self.batch_index["eval"]
        self.training, self.batch_index["eval"] = False, 0
        try:
            yield self
        finally:
            self.training, self.batch_index["eval"] = training, index

    def next_generator(self) -> torch.Generator | None:
        """The generator of this batch (see the class docstring); None means torch's global RNG. Advances the
        batch index of the current mode."""
        mode = "train" if self.training else "eval"
        index = self.batch_index[mode]
        self.batch_index[mode] += 1
        if torch.utils.data.get_worker_info() is not None:
            if self.seed is not None or self.generator is not None:
                # a worker collates with its own copy: the batch indices (and the clip ranges and evaluation mode set
                # in the main process) diverge from the main process's, and every worker's copy of a generator
                # draws the same numbers
                source = f"seed={self.seed}" if self.seed is not None else "generator=..."
                raise ValueError(f"DataCollatorForBlockDiffusion({source}) draws its noise in the main process: use "
                                 "it with DataLoader(num_workers=0) (Trainer: dataloader_num_workers=0), or neither "
                                 "seed nor generator for the workers' own random noise.")
            return None  # torch's per-worker RNG
        if self.generator is not None or self.seed is None:
            return self.generator
        key = (self.seed * 1_000_003 + self.stream) * 1_000_033 + 2 * index + (mode == "eval")
        return torch.Generator().manual_seed(key % (2**63))

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        x0, attention_mask, unscored = self.pad(features)
        batch, length = x0.shape
        noise_range = self.noise_range
        rng = self.next_generator()
        keep = unscored.clone()
        if self.ignore_first_token:  # never noised; scored (with loss 0) in training, left out of evaluations
            keep[:, 0] = True
            unscored[:, 0] |= not self.training
        t = sample_block_noise_levels(batch, length // self.block_size, *noise_range, generator=rng)
        x_t = q_xt(x0, t, self.block_size, self.mask_token_id, generator=rng, keep=keep)
        if self.resample and self.training:
            x_t = self.resample_blocks(x0, x_t, t, keep, noise_range, rng)
        labels = x0.masked_fill(unscored, -100)
        return {"input_ids": x_t, "labels": labels, "noise_levels": t, "attention_mask": attention_mask}

    def pad(self, features):
        """(x0, attention_mask, unscored): right-padded to a common block multiple; unscored = prompt or padding
        (never noised, never scored)."""
        if not features:
            raise ValueError("empty batch.")
        missing = [index for index, feature in enumerate(features) if "input_ids" not in feature]
        if missing:
            raise ValueError(f"features {missing} have no input_ids (columns: {sorted(features[missing[0]])}); "
                             "tokenize the text first (bd3lm_hf.data.wrap_tokenize or sft_tokenize).")
        sequences = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        lengths = [len(s) for s in sequences]
        if min(lengths) < 1:
            raise ValueError("a feature has no input_ids.")
        width = max(lengths) + (-max(lengths) % self.block_size)
        if len(set(lengths)) > 1 or width != max(lengths):
            if self.pad_token_id is None:
                raise ValueError(f"sequences of lengths {sorted(set(lengths))} need padding to a multiple of "
                                 f"block_size={self.block_size}: pass pad_token_id (any id the model knows: "
                                 "padding is masked out, never noised nor scored).")
        x0 = torch.full((len(sequences), width), self.pad_token_id if self.pad_token_id is not None else 0)
        attention_mask = torch.zeros_like(x0)
        unscored = torch.ones_like(x0, dtype=torch.bool)
        for row, (sequence, feature) in enumerate(zip(sequences, features)):
            x0[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
            unscored[row, int(feature.get("prompt_length", 0)): len(sequence)] = False
        if bool((x0[attention_mask.bool()] == self.mask_token_id).any()):
            raise ValueError(f"clean input_ids contain the mask token id {self.mask_token_id}.")
        return x0, attention_mask, unscored

    def reaches(self, low: float, high: float) -> bool:
        """Whether resampling can meet the range [low, high]: with `resample`, a full block's masked fraction is
        k / block_size, and a range holding none of those could never be met (every batch would redraw
        `MAX_RESAMPLES` times in vain)."""
        lowest, highest = enforced_bounds((low, high))
        fractions = [k / self.block_size for k in range(self.block_size + 1)]
        return not self.resample or any(lowest <= fraction <= highest for fraction in fractions)

    def check_reachable(self, low: float, high: float) -> None:
        if not self.reaches(low, high):
            raise ValueError(f"resample=True with the clip range [{low}, {high}] and block_size={self.block_size}: no "
                             f"masked fraction k/{self.block_size} lies in it, so no block could be resampled into "
                             "it; widen the range (or turn resample off).")

    def resample_blocks(self, x0, x_t, t, keep, noise_range, generator=None):
        """Redraw the masks of blocks whose masked fraction is outside `noise_range` (bounded retries)."""
        low, high = enforced_bounds(noise_range)
        blocks = (x0.shape[0], -1, self.block_size)
        noisable = (~keep).view(blocks).sum(-1)  # blocks made only of prompt/padding are never redrawn
        for attempt in range(MAX_RESAMPLES + 1):
            fraction = (x_t == self.mask_token_id).view(blocks).sum(-1) / noisable.clamp(min=1)
            outside = ((fraction < low) | (fraction > high)) & (noisable > 0)
            if not bool(outside.any()):
                break
            if attempt == MAX_RESAMPLES:
                # blocks partly made of prompt/padding have fewer possible fractions, not always one in the range
                logger.warning_once(f"resample: after {MAX_RESAMPLES} redraws some blocks still have a masked "
                                    f"fraction outside [{noise_range[0]}, {noise_range[1]}] (blocks with few "
                                    "noisable tokens); they are kept as drawn.")
                break
            redrawn = q_xt(x0, t, self.block_size, self.mask_token_id, generator=generator, keep=keep)
            x_t = torch.where(outside.repeat_interleave(self.block_size, dim=-1), redrawn, x_t)
        return x_t


def enforced_bounds(noise_range) -> tuple[float, float]:
    """The bounds resampling enforces: as the original, one at the edge of [1e-3, 1] is not (a block may stay
    unmasked)."""
    low = noise_range[0] if noise_range[0] > EVAL_RANGE[0] else -math.inf
    high = noise_range[1] if noise_range[1] < EVAL_RANGE[1] else math.inf
    return low, high
