"""Compiled decoder layers (and loss) for training: each DiT block fused by `torch.compile` (torchtitan's
per-block compile).

Compiling block by block rather than the whole model keeps the input checks and the mask construction eager (they
read the batch), compiles one graph that all identical layers share, and leaves parameter names unchanged
(`nn.Module.compile` works in place), so checkpoints, EMA, PEFT and `save_pretrained` see the same model.
"""

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

COMPILE_LAYERS_CHOICES = ("auto", "on", "off")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (also under a PEFT wrapper), found by the class names in `_no_split_modules`."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers to compile (looked for {sorted(names)}).")
    return layers


def compile_decoder_layers(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile every decoder layer in place, and the training loss (default: `fullgraph=True`, static shapes until
    a second shape comes, then dynamic ones; inductor); returns `model`. `compile_kwargs` go to `torch.compile` (backend, mode, options, ...).

    The loss is the model's `loss_function` (transformers' hook): compiled, the fp32 upcast, the SUBS mask, the
    log-softmax and its gradient fuse into a few kernels instead of materialising (B, L, V) fp32 copies."""
    # dynamic=None: the first shape compiles static; a second one recompiles with dynamic sizes, so that SFT batches
    # (padded to their longest row) or a last partial batch never reach the recompile limit, which a fullgraph
    # compilation turns into an error
    settings = {"fullgraph": True, "dynamic": None, **compile_kwargs}
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**settings)
    for module in model.modules():
        if "_loss_function" in vars(module):  # the BD3-LM model itself, also under a PEFT wrapper
            module.loss_function = torch.compile(module.loss_function, **settings)
    logger.info("compiled %d decoder layers and the loss with %s", len(layers), settings)
    return model


def should_compile_layers(choice: str) -> bool:
    """`auto`: on a CUDA machine only (CPU compilation is slow to build and barely faster)."""
    if choice not in COMPILE_LAYERS_CHOICES:
        raise ValueError(f"compile_layers must be one of {COMPILE_LAYERS_CHOICES}, got {choice!r}.")
    return choice == "on" or (choice == "auto" and torch.cuda.is_available())
