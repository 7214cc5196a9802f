"""LoRA through PEFT: the package's `lora_config()` makes adapters that PEFT's auto classes load back."""

import torch
from conftest import random_model
from transformers import AutoModelForCausalLM

from bd3lm_hf.lora import lora_config


def test_auto_peft_model_loads_an_adapter_made_with_lora_config(tmp_path):
    from peft import AutoPeftModelForCausalLM, get_peft_model

    random_model().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", trust_remote_code=True)
    peft_model = get_peft_model(base, lora_config(r=4))
    with torch.no_grad():  # lora_B starts at zero: perturb it, so that a lost adapter would show in the logits
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    peft_model.eval().save_pretrained(tmp_path / "adapter")

    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True).eval()
    ids = torch.randint(0, 49, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(input_ids=ids).logits, expected)  # the adapter is no no-op
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_lora_config_keeps_a_task_type_given_by_the_user():
    assert lora_config(task_type="SEQ_CLS").task_type == "SEQ_CLS"
