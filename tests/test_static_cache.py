"""The static cache path (issue: GPU fast path, CPU parts): same tokens as the dynamic cache, fixed shapes, and
no host synchronization inside a block."""

import pytest
import torch
from conftest import random_model
from test_generation import SAMPLERS, prompts

from bd3lm_hf.modeling.cache_bd3lm import BD3LMStaticCache
from bd3lm_hf.modeling.generation_bd3lm import BD3LMGenerationMixin


@pytest.fixture(scope="module")
def gen_model():
    return random_model(seed=1, std=0.12, max_position_embeddings=128)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("do_sample", [False, True])
def test_static_cache_generates_the_tokens_of_the_dynamic_cache(gen_model, sampler, do_sample):
    ids, mask = prompts()
    outputs = {}
    for implementation in (None, "static"):
        torch.manual_seed(7)
        outputs[implementation] = gen_model.generate(ids, attention_mask=mask, max_new_tokens=13, sampler=sampler,
                                                     do_sample=do_sample, cache_implementation=implementation,
                                                     return_dict_in_generate=True)
    assert torch.equal(outputs[None].sequences, outputs["static"].sequences)
    assert isinstance(outputs["static"].past_key_values, BD3LMStaticCache)
    assert outputs["static"].nfe >= outputs[None].nfe  # static: one call per step, no reuse


def test_static_cache_buffers_keep_their_shape_and_cursor_follows_store_kv(gen_model):
    cache = BD3LMStaticCache(max_cache_len=16)
    ids = torch.randint(0, 49, (2, 16))
    valid = torch.ones(2, 16, dtype=torch.bool)
    gen_model(input_ids=ids[:, :8], attention_mask=valid, past_key_values=cache, use_cache=True, store_kv=4)
    assert cache.get_seq_length() == 4
    shapes = [tuple(keys.shape) for keys, _ in cache.buffers]
    gen_model(input_ids=ids[:, 4:8], attention_mask=valid, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 4  # a denoising call never commits
    gen_model(input_ids=ids[:, 4:8], attention_mask=valid, past_key_values=cache, use_cache=True, store_kv=True)
    assert cache.get_seq_length() == 8 and [tuple(k.shape) for k, _ in cache.buffers] == shapes == [(2, 4, 16, 8)] * 2


def test_static_cache_call_equals_no_cache_logits(gen_model):
    ids = torch.randint(0, 49, (2, 12))
    cache = BD3LMStaticCache(max_cache_len=16)
    valid = torch.ones(2, 16, dtype=torch.bool)
    gen_model(input_ids=ids[:, :8], attention_mask=valid, past_key_values=cache, use_cache=True, store_kv=True)
    cached = gen_model(input_ids=ids[:, 8:12], attention_mask=valid, past_key_values=cache, use_cache=True).logits
    reference = gen_model(input_ids=ids).logits[:, 8:12]
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-5)


def test_no_host_synchronization_inside_a_block(gen_model, monkeypatch):
    """With the static cache, denoising a block reads nothing back from the device (no bool(), item(), tolist())."""
    syncs = {"count": 0, "active": False}
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if syncs["active"]:
                syncs["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    denoise = BD3LMGenerationMixin.denoise_block

    def watched(self, *args, **kwargs):
        syncs["active"] = True
        try:
            return denoise(self, *args, **kwargs)
        finally:
            syncs["active"] = False

    monkeypatch.setattr(BD3LMGenerationMixin, "denoise_block", watched)
    ids, mask = prompts()
    for sampler in SAMPLERS:
        gen_model.generate(ids, attention_mask=mask, max_new_tokens=9, sampler=sampler, do_sample=True,
                           cache_implementation="static")
        assert syncs["count"] == 0, sampler
    gen_model.generate(ids, attention_mask=mask, max_new_tokens=9)  # the dynamic path does synchronize
    assert syncs["count"] > 0


def test_unknown_cache_implementation(gen_model):
    with pytest.raises(ValueError, match="cache_implementation='offloaded' is not supported"):
        gen_model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=4, cache_implementation="offloaded")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_static_generation_matches_eager_on_gpu():
    model = random_model(seed=1, std=0.12, max_position_embeddings=128).cuda().to(torch.bfloat16)
    ids, mask = (t.cuda() for t in prompts())
    outputs = [model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                              cache_implementation=implementation) for implementation in (None, "static")]
    assert torch.equal(*outputs)


def test_denoising_step_compiles_as_one_graph():
    """What the CUDA path captures: `denoise_forward` against a static cache traces with fullgraph=True (no graph
    breaks, no host reads) and matches eager. Checked here with the CPU inductor backend."""
    model = random_model(seed=1, std=0.12, max_position_embeddings=64)
    caches = [BD3LMStaticCache(max_cache_len=32) for _ in range(2)]
    for cache in caches:
        cache.early_initialization(2, 2, 4, 8, torch.float32, "cpu")
    valid = torch.ones(2, 32, dtype=torch.bool)
    ids = torch.randint(0, 49, (2, 8))
    step = torch.compile(model.denoise_forward, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled = step(ids, valid, caches[0], 4, 4)
        eager = model.denoise_forward(ids, valid, caches[1], 4, 4)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert caches[0].get_seq_length() == caches[1].get_seq_length() == 4
