"""bd3lm_hf: Block Diffusion language models (BD3-LMs) as first-class citizens of the Hugging Face stack."""

import logging as _std_logging

from .auto import register_auto_classes
from .collator import DataCollatorForBlockDiffusion
from .modeling import BD3LMCache, BD3LMConfig, BD3LMForBlockDiffusion, BD3LMModel, BD3LMPreTrainedModel
from . import diffusion

# In this process the Auto classes and pipelines know "bd3lm" (a model built here, not loaded with remote code, would
# otherwise make pipeline("text-generation", model=...) log that its class is not supported).
register_auto_classes()
# The package's loggers (bd3lm_hf.*) hang under transformers' library logger: its verbosity
# (`transformers.logging.set_verbosity_*`, TRANSFORMERS_VERBOSITY) and handler apply to them, as to transformers'.
_std_logging.getLogger("bd3lm_hf").parent = _std_logging.getLogger("transformers")

__all__ = [
    "BD3LMCache",
    "BD3LMConfig",
    "BD3LMForBlockDiffusion",
    "BD3LMModel",
    "BD3LMPreTrainedModel",
    "DataCollatorForBlockDiffusion",
    "diffusion",
    "register_auto_classes",
]
__version__ = "0.1.0"
