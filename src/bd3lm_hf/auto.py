"""Registration of the BD3-LM classes with the transformers Auto* factories, in this process."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from .lora import register_peft_defaults
from .modeling import BD3LMConfig, BD3LMForBlockDiffusion, BD3LMModel


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModel*` resolve model_type "bd3lm" without trust_remote_code, and give PEFT the
    default LoRA targets of "bd3lm". Idempotent."""
    AutoConfig.register(BD3LMConfig.model_type, BD3LMConfig, exist_ok=True)
    AutoModel.register(BD3LMConfig, BD3LMModel, exist_ok=True)
    AutoModelForCausalLM.register(BD3LMConfig, BD3LMForBlockDiffusion, exist_ok=True)
    AutoModelForMaskedLM.register(BD3LMConfig, BD3LMForBlockDiffusion, exist_ok=True)
    register_peft_defaults()
