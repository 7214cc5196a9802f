"""The Hub-uploadable BD3-LM code: exactly what a model repo holds next to its weights."""

from .cache_bd3lm import BD3LMCache
from .configuration_bd3lm import BD3LMConfig
from .modeling_bd3lm import BD3LMForBlockDiffusion, BD3LMModel, BD3LMPreTrainedModel

__all__ = ["BD3LMCache", "BD3LMConfig", "BD3LMForBlockDiffusion", "BD3LMModel", "BD3LMPreTrainedModel"]
