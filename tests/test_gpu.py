"""GPU paths (flex_attention training with backward, bf16, flash-attn): run on a CUDA machine, skipped elsewhere."""

import pytest
import torch
from conftest import random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(device):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 49, (4, 32), generator=g)
    xt = torch.where(torch.rand(4, 32, generator=g) < 0.5, 49, x0)
    return x0.to(device), xt.to(device), torch.full((4, 8), 0.5, device=device)


def test_flex_training_pass_matches_sdpa_forward_and_backward():
    x0, xt, t = _batch("cuda")
    results = {}
    for implementation in ("sdpa", "flex_attention"):
        model = random_model(std=0.1, num_attention_heads=2).cuda().train()  # head_dim 16: flex's minimum on CUDA
        model.set_attn_implementation(implementation)
        loss = model(input_ids=xt, labels=x0, noise_levels=t).loss
        loss.backward()
        results[implementation] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(results["flex_attention"][0], results["sdpa"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["flex_attention"][1], results["sdpa"][1], atol=1e-4, rtol=1e-3)


def test_flex_on_cuda_refuses_head_dim_below_16_clearly():
    x0, _, _ = _batch("cuda")
    model = random_model().cuda()  # hidden 32 / 4 heads: head_dim 8
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="head_dim >= 16"):
        model(input_ids=x0)


def test_bf16_inference_is_close_to_fp32():
    x0, _, _ = _batch("cuda")
    model = random_model(std=0.1).cuda()
    with torch.no_grad():
        reference = model(input_ids=x0).logits
        bf16 = model.to(torch.bfloat16)(input_ids=x0).logits.float()
    assert (bf16 - reference).abs().max() < 0.05 * reference.abs().max()


def test_flash_attention_matches_sdpa_for_a_block_against_the_cache():
    pytest.importorskip("flash_attn")
    from bd3lm_hf import BD3LMCache

    x0, xt, _ = _batch("cuda")
    outputs = {}
    for implementation in ("sdpa", "flash_attention_2"):
        model = random_model(std=0.1).cuda().to(torch.bfloat16)
        model.set_attn_implementation(implementation)
        cache = BD3LMCache()
        with torch.no_grad():
            for start in range(0, 16, 4):
                model(input_ids=x0[:, start:start + 4], past_key_values=cache, use_cache=True, store_kv=True)
            outputs[implementation] = model(input_ids=xt[:, 16:20], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(outputs["flash_attention_2"].float(), outputs["sdpa"].float(), atol=5e-2, rtol=5e-2)
