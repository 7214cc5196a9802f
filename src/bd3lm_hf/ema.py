"""Exponential moving average of the weights as a Trainer callback (the original's EMA, decay 0.9999)."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import TrainerCallback
from transformers.utils import logging

from .callbacks import checkpoint_folder, more_splits_follow

logger = logging.get_logger(__name__)

EMA_FILE = "ema_state.safetensors"


class EMACallback(TrainerCallback):
    """Keeps an EMA of the trainable weights; evaluates and exports the EMA weights, as the original does.

    After every optimizer step: ema -= (1 - d) * (ema - w), with the warm-up d = min(decay, (1 + n) / (10 + n)).
    Around each evaluation during training (by steps, by epoch, `eval_on_start`) the EMA weights are swapped in
    (and back out afterwards); at the end of training they are copied into the model, so `trainer.save_model()` /
    export writes them. With `load_best_model_at_end`, those are the EMA weights of the best checkpoint (the ones
    its evaluation saw). The EMA is saved next to every checkpoint (`ema_state.safetensors`) and restored on resume,
    from `resume_from` if set, else from `output_dir/checkpoint-<step>` (Trainer does not tell callbacks the folder
    it resumes from: set `resume_from` when resuming from elsewhere).

    Register it AFTER callbacks that must see the EMA weights during evaluation (e.g. `ClipSearchCallback`): its
    `on_evaluate` puts the training weights back (after the last split of a dict eval_dataset, whose keys go in
    `eval_splits`, as for `BlockDiffusionCallback`).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, resume_from: str | None = None,
                 eval_splits=None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay = decay
        self.warmup = warmup
        self.resume_from = resume_from
        self.eval_splits = list(eval_splits) if eval_splits is not None else None
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] | None = None
        self.stored: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _parameters(model) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.shadow = {name: p.detach().clone().float() for name, p in self._parameters(model).items()}
        self.num_updates = 0
        if state.global_step > 0:
            checkpoint = checkpoint_folder(args, state, self.resume_from) / EMA_FILE
            if checkpoint.is_file():
                self.load(checkpoint)
            elif self.resume_from is not None:  # the folder is the right one: it holds no EMA (an early version's)
                logger.warning("resuming at step %d from %s, which holds no %s: the EMA restarts from the current "
                               "weights.", state.global_step, checkpoint.parent, EMA_FILE)
            else:
                logger.warning("resuming at step %d without %s (looked in %s): the EMA restarts from the current "
                               "weights; set EMACallback.resume_from to the checkpoint folder resumed from.",
                               state.global_step, EMA_FILE, checkpoint.parent)
        if args.eval_on_start:
            self.swap_in(model)

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.num_updates += 1
        decay = self.decay
        if self.warmup:
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, parameter in self._parameters(model).items():
            shadow = self.shadow[name]
            shadow.sub_((1.0 - decay) * (shadow - parameter.detach().float()))
        if control.should_evaluate:
            self.swap_in(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate:  # eval_strategy="epoch"
            self.swap_in(model)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if self.stored is not None and not more_splits_follow(metrics, self.eval_splits):
            self.swap_out(model)

    def on_save(self, args, state, control, **kwargs):
        self.save(checkpoint_folder(args, state) / EMA_FILE, write=args.should_save)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.swap_out(model)
        if args.load_best_model_at_end and state.best_model_checkpoint:
            # Trainer has loaded the best checkpoint's training weights; its evaluation saw its EMA weights
            best = Path(state.best_model_checkpoint) / EMA_FILE
            if not best.is_file():
                logger.warning("load_best_model_at_end: %s has no %s; the model keeps that checkpoint's training "
                               "weights.", state.best_model_checkpoint, EMA_FILE)
                return
            self.load(best)
        self.copy_to(model)
        if state.is_world_process_zero:  # every process copies; one says so
            logger.info("copied the EMA weights (%d updates) into the model", self.num_updates)

    @torch.no_grad()
    def copy_to(self, model):
        for name, parameter in self._parameters(model).items():
            parameter.copy_(self.shadow[name].to(parameter.dtype))

    @torch.no_grad()
    def swap_in(self, model):
        if self.stored is None:
            self.stored = {name: p.detach().clone() for name, p in self._parameters(model).items()}
            self.copy_to(model)

    @torch.no_grad()
    def swap_out(self, model):
        if self.stored is not None:
            for name, parameter in self._parameters(model).items():
                parameter.copy_(self.stored[name])
            self.stored = None

    def save(self, path: Path, write: bool = True):
        """Writes the full EMA (sharded FSDP2 parameters are gathered first: every process must call this; only
        those with `write`, the ones Trainer saves on, write the file)."""
        tensors = {name: full_tensor(shadow).contiguous() for name, shadow in self.shadow.items()}
        if not write:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"num_updates": str(self.num_updates), "decay": str(self.decay)})

    def load(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        loaded = load_file(str(path))
        if set(loaded) != set(self.shadow):
            raise ValueError(f"EMA state {path} does not match the model's trainable parameters.")
        if "num_updates" not in (metadata or {}):
            raise ValueError(f"EMA state {path} has no num_updates in its metadata (EMACallback writes it); resume "
                             "from a checkpoint EMACallback saved, or remove the file to restart the EMA there.")
        self.shadow = {name: shard_like(tensor, self.shadow[name]) for name, tensor in loaded.items()}
        self.num_updates = int(metadata["num_updates"])
        logger.info("resumed the EMA from %s (%d updates)", path, self.num_updates)


def saved_ema(folder, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The EMA a Trainer checkpoint `folder` holds beside its raw training weights (EMA_FILE), when it fits
    `weights` (names and shapes: a LoRA run's EMA covers the adapters only); None without one. Training's evaluation
    and final save use the EMA, so evaluating, exporting or converting a checkpoint should too."""
    path = Path(folder) / EMA_FILE
    if not path.is_file():
        return None
    shadow = load_file(str(path))
    if any(name not in weights or weights[name].shape != tensor.shape for name, tensor in shadow.items()):
        logger.warning("%s does not fit the model's weights: using the checkpoint's training weights", path)
        return None
    logger.info("%s is a training checkpoint: using its EMA weights (%s)", folder, EMA_FILE)
    return shadow


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded (DTensor) parameter or EMA entry (a collective); others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: sharded over its device mesh when `like` is a DTensor, else on its device."""
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full.to(like.device)
