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


def perturbed_lora(model, **config):
    """`model` with LoRA adapters whose B matrices are not zero (an untrained adapter is the identity)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(r=4, **config))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return peft_model.eval()


def test_mixed_adapter_batches_route_the_conditioning_per_row():
    """PEFT's `adapter_names=` with adapters on the adaLN projections and the timestep MLP ("all-linear"): the
    constant conditioning is computed per row (a broadcast row would carry one adapter; PEFT refused it), so each row
    gets what its adapter alone gives, in forward and in generation (dynamic and static cache)."""
    peft_model = perturbed_lora(random_model(), target_modules="all-linear")
    assert any("adaln_modulation.lora_A" in name for name, _ in peft_model.named_parameters())
    ids = torch.randint(0, 49, (2, 16), generator=torch.Generator().manual_seed(0))
    names = ["default", "__base__"]
    settings = dict(max_new_tokens=8, do_sample=False, eos_token_id=[], attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        adapted, adapted_tokens = peft_model(input_ids=ids).logits, peft_model.generate(input_ids=ids, **settings)
        with peft_model.disable_adapter():
            base, base_tokens = peft_model(input_ids=ids).logits, peft_model.generate(input_ids=ids, **settings)
        assert not torch.allclose(adapted, base, atol=1e-3)
        mixed = peft_model(input_ids=ids, adapter_names=names).logits
        tolerance = 1e-5 * float(adapted.abs().max())  # fp32 reduction order (PEFT runs each adapter's rows apart)
        torch.testing.assert_close(mixed[0], adapted[0], rtol=0, atol=tolerance)
        torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=tolerance)
        for cache in (None, "static"):
            tokens = peft_model.generate(input_ids=ids, adapter_names=names, cache_implementation=cache, **settings)
            assert torch.equal(tokens[0], adapted_tokens[0]) and torch.equal(tokens[1], base_tokens[1])
        # without routing hooks the conditioning stays one broadcast row
        assert not peft_model.base_model.model.model.conditioning_routes_rows()
