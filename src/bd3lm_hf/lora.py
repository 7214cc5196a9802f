"""PEFT LoRA defaults for BD3-LM: which projections to adapt, so that `LoraConfig` works without guessing names."""

from transformers.utils import logging

logger = logging.get_logger(__name__)

# The attention and MLP projections of every DiT block. The adaLN projections and the output layer stay frozen:
# they carry the (constant) conditioning and the vocabulary, as for LoRA on AR models.
DEFAULT_LORA_TARGET_MODULES = ["qkv_proj", "o_proj", "fc_in", "fc_out"]


def register_peft_defaults() -> None:
    """Teach PEFT the default targets of model_type "bd3lm": `LoraConfig()` then needs no `target_modules`."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    defaults.setdefault("bd3lm", list(DEFAULT_LORA_TARGET_MODULES))


def lora_config(r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0, target_modules=None, **kwargs):
    """A `peft.LoraConfig` for BD3-LM with the default target modules and task_type "CAUSAL_LM" (a `task_type`
    in `kwargs` wins). `target_modules` as PEFT takes it: names, "all-linear" or a regex."""
    from peft import LoraConfig

    # Without a task type PEFT records the base model's module (bd3lm_hf.modeling...) in the adapter's auto_mapping:
    # AutoPeftModelForCausalLM then refuses it (not in its import allowlist) and a machine without bd3lm_hf could
    # not import it. With CAUSAL_LM it rebuilds the base with AutoModelForCausalLM, from the folder's own code.
    kwargs.setdefault("task_type", "CAUSAL_LM")
    if target_modules is None:
        target_modules = list(DEFAULT_LORA_TARGET_MODULES)
    elif not isinstance(target_modules, str):  # a str is PEFT's: "all-linear", or a regex over module names
        target_modules = list(target_modules)
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, **kwargs)


def add_lora(model, config=None):
    """Wrap `model` with LoRA adapters (defaults above); only adapter weights stay trainable."""
    from peft import get_peft_model

    register_peft_defaults()
    peft_model = get_peft_model(model, config or lora_config())
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable parameters of %d", trainable, total)
    return peft_model
