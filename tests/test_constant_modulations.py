"""The adaLN modulations of a model without time conditioning are constants of the weights: generation computes them
once per `generate` instead of at every model call. Same logits and tokens as computing them per call."""

import copy

import pytest
import torch
from conftest import cache_of, random_model
from test_generation import prompts
from test_static_cache import counting_compile_config

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(scope="module")
def gen_model():
    return random_model(seed=1, std=0.12, max_position_embeddings=128)


def count_adaln_calls(model) -> list:
    calls = []
    model.model.layers[0].adaln_modulation.register_forward_hook(lambda *args: calls.append(1))
    return calls


@torch.no_grad()
def test_forward_with_precomputed_modulations_gives_the_same_logits(gen_model):
    ids, mask = prompts()
    modulations = gen_model.model.adaln_modulations(None, 1, ids.device, torch.float32)
    assert [tuple(m.shape) for m in modulations] == [(1, 1, 6 * 32)] * 2 + [(1, 1, 2 * 32)]
    computed = gen_model(ids, attention_mask=mask).logits
    outputs = gen_model.model(ids, attention_mask=mask, modulations=modulations).last_hidden_state
    assert torch.equal(gen_model.lm_head(outputs), computed)


def test_modulations_of_the_wrong_length_are_refused(gen_model):
    ids, _ = prompts()
    modulations = gen_model.model.adaln_modulations(None, 1, ids.device, torch.float32)
    with pytest.raises(ValueError, match="modulations must hold 3 tensors"):
        gen_model.model(ids, modulations=modulations[:-1])


@pytest.mark.parametrize("cache", ["dynamic", "static", "uncached"])
def test_generation_computes_the_modulations_once(cache):
    model = random_model(seed=1, std=0.12, max_position_embeddings=128)
    calls = count_adaln_calls(model)
    ids, mask = prompts()
    settings = dict(use_cache=False) if cache == "uncached" else dict(cache_implementation=cache)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=21, return_dict_in_generate=True, **settings)
    assert out.nfe > 10 and len(calls) == 1


def test_time_conditioned_models_compute_them_at_every_call():
    model = random_model(seed=5, std=0.12, time_conditioning=True, block_size=16, max_position_embeddings=16)
    calls = count_adaln_calls(model)
    out = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=13, num_steps=4, cache_implementation="static",
                         return_dict_in_generate=True)
    assert len(calls) == out.nfe == 4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_hoisted_modulations_give_the_tokens_of_per_call_ones(gen_model, cache, do_sample, monkeypatch):
    ids, mask = prompts()
    settings = dict(attention_mask=mask, max_new_tokens=21, do_sample=do_sample, cache_implementation=cache)
    torch.manual_seed(3)
    hoisted = gen_model.generate(ids, **settings)
    monkeypatch.setattr(type(gen_model), "constant_modulations", lambda self, cache, device, batch_size: None)
    torch.manual_seed(3)
    assert torch.equal(gen_model.generate(ids, **settings), hoisted)


def test_static_cache_holds_them_in_place_and_follows_new_weights(gen_model, monkeypatch):
    """Training between two generations changes the weights: the held modulations are recomputed (in place, so a
    compiled step replays without recompiling) and the tokens are those of the new weights."""
    model = copy.deepcopy(gen_model)
    ids, mask = prompts()
    settings = dict(attention_mask=mask, max_new_tokens=21, cache_implementation="static",
                    compile_config=counting_compile_config([]), return_dict_in_generate=True)
    first = model.generate(ids, **settings)
    addresses = [tensor.data_ptr() for tensor in cache_of(first).constants]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.adaln_modulation.bias.add_(0.5)
    with torch.compiler.set_stance("fail_on_recompile"):
        second = model.generate(ids, **settings)
    assert [tensor.data_ptr() for tensor in cache_of(second).constants] == addresses
    monkeypatch.setattr(type(model), "constant_modulations", lambda self, cache, device, batch_size: None)
    per_call = model.generate(ids, attention_mask=mask, max_new_tokens=21, cache_implementation="static",
                              disable_compile=True)
    assert torch.equal(second.sequences, per_call) and not torch.equal(second.sequences, first.sequences)
