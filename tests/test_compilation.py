"""Compiled decoder layers for training (issue: GPU fast path): same loss and gradients as eager, same parameter
names; checked on CPU (the Trainer wiring: tests/test_training.py) (the GPU speed is in benchmarks/bench_train.py)."""

import copy

import pytest
import torch
from conftest import random_model

from bd3lm_hf.compilation import compile_decoder_layers, decoder_layers

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def training_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 49, (3, 16), generator=g)
    xt = torch.where(torch.rand(3, 16, generator=g) < 0.5, 49, x0)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, :4] = 0  # a padded row: the dense mask path
    return dict(input_ids=xt, labels=x0, noise_levels=torch.rand(3, 4, generator=g).clamp(min=0.05),
                attention_mask=mask)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_layers_give_the_eager_loss_and_gradients(backend):
    eager, compiled = (random_model(seed=3, std=0.1, max_position_embeddings=16).train() for _ in range(2))
    names = list(compiled.state_dict())
    compile_decoder_layers(compiled, backend=backend)
    assert list(compiled.state_dict()) == names  # compiled in place: checkpoints are unchanged
    assert compiled.loss_function is not eager.loss_function  # the loss is compiled too
    for seed in (0, 1):  # a second batch replays the compiled graph
        batch = training_batch(seed)
        expected_loss, expected = loss_and_grads(eager, batch)
        loss, grads = loss_and_grads(compiled, batch)
        torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_layers_train_on_batches_of_many_widths():
    """SFT batches are padded to their longest row: more widths than the recompile limit (8), which a fullgraph
    compilation with static shapes turns into an error at the 9th. The layers and the loss compile dynamic sizes
    once a second width comes, and give the eager loss."""
    eager = random_model(seed=3, std=0.1, max_position_embeddings=64).train()
    compiled = compile_decoder_layers(copy.deepcopy(eager), backend="eager")
    generator = torch.Generator().manual_seed(0)
    for width in range(4, 64 + 1, 4):  # 16 widths
        x0 = torch.randint(0, 49, (2, width), generator=generator)
        xt = torch.where(torch.rand(2, width, generator=generator) < 0.5, 49, x0)
        batch = dict(input_ids=xt, labels=x0, noise_levels=torch.full((2, width // 4), 0.5))
        loss = compiled(**batch).loss
        loss.backward()
        torch.testing.assert_close(loss, eager(**batch).loss)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generation_after_training_with_compiled_layers(cache_implementation):
    """A model whose layers were compiled for training (fullgraph) generates through their eager forward: its cache
    calls would recompile them at every block up to the recompile limit, a hard error. Same tokens as a model never
    compiled, and the layers stay compiled for training."""
    reference = random_model(seed=1, std=0.12, max_position_embeddings=128)
    model = compile_decoder_layers(copy.deepcopy(reference), backend="eager")
    ids = torch.tensor([[5, 9, 13, 2, 7], [11, 3, 8, 21, 4]])
    settings = dict(max_new_tokens=40, cache_implementation=cache_implementation)
    torch.testing.assert_close(model.generate(ids, **settings), reference.generate(ids, **settings), rtol=0, atol=0)
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    model.train()(**training_batch())  # the training pass still goes through them


def test_decoder_layers_are_found_under_peft():
    from peft import LoraConfig, get_peft_model

    model = random_model()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["qkv_proj"]))
    assert decoder_layers(peft_model) == list(model.model.layers)
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_compiled_layers_take_the_flex_block_mask():
    """The GPU training path: flex BlockMasks (the shared 2L mask without padding, a per-batch one with padding)
    passed into fullgraph-compiled layers. Forward only: flex has no backward on CPU (tests/test_gpu.py)."""
    eager, compiled = (random_model(seed=3, std=0.1, max_position_embeddings=16).train() for _ in range(2))
    for model in (eager, compiled):
        model.set_attn_implementation("flex_attention")
    compile_decoder_layers(compiled, backend="aot_eager")
    with torch.no_grad():
        for batch in (training_batch(0), {k: v for k, v in training_batch(1).items() if k != "attention_mask"}):
            torch.testing.assert_close(compiled(**batch).loss, eager(**batch).loss, atol=1e-5, rtol=1e-5)
    

@torch.no_grad()
def test_the_whole_forward_compiles_in_one_graph():
    """torch.compile(model, fullgraph=True): the forward's input checks that read values on the host are skipped
    while compiling (they would break the graph); inference and the 2L training pass give the eager results."""
    model = random_model(seed=3, std=0.1, max_position_embeddings=16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    batch = {k: v for k, v in training_batch(0).items() if k != "attention_mask"}
    torch.testing.assert_close(compiled(input_ids=batch["input_ids"]).logits,
                               model(input_ids=batch["input_ids"]).logits, rtol=0, atol=0)
    torch.testing.assert_close(compiled(**batch).loss, model(**batch).loss, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_the_compiled_training_pass_makes_its_tensors_on_the_input_device(attn):
    """Every tensor the compiled 2L pass creates names its device (the 2L mask, traced through its cache): a factory
    without one makes CPU tensors in a CUDA graph, i.e. host work and a copy every step, and no CUDA graphs."""
    factories = {"arange", "zeros", "ones", "full", "empty", "tensor", "rand", "randn", "randint"}
    deviceless = []

    def recording_backend(graph_module, example_inputs):
        deviceless.extend(f"{node.target.__name__} at {node.meta.get('stack_trace', '').strip().splitlines()[-2:]}"
                          for node in graph_module.graph.nodes
                          if node.op == "call_function" and getattr(node.target, "__name__", "") in factories
                          and "device" not in node.kwargs)
        return graph_module.forward

    model = random_model(seed=3, std=0.1, max_position_embeddings=16, num_attention_heads=2)
    model.set_attn_implementation(attn)
    batch = {k: v for k, v in training_batch(0).items() if k != "attention_mask"}
    torch.compile(model, backend=recording_backend, fullgraph=True)(**batch)
    assert deviceless == []


@torch.no_grad()
def test_the_whole_forward_compiles_in_one_graph_with_flex_attention():
    """The 2L pass picks its shared flex mask after a host read (no padding?); while compiling it takes it only
    when there is no attention_mask at all, else it builds the per-batch mask; both give the eager loss."""
    model = random_model(seed=3, std=0.1, max_position_embeddings=16, num_attention_heads=2)
    model.set_attn_implementation("flex_attention")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    batch = training_batch(0)  # with an attention_mask: the per-batch mask while compiling
    torch.testing.assert_close(compiled(**batch).loss, model(**batch).loss, rtol=1e-5, atol=1e-6)
    batch = {k: v for k, v in batch.items() if k != "attention_mask"}  # none: the shared mask, no host read
    torch.testing.assert_close(compiled(**batch).loss, model(**batch).loss, rtol=1e-5, atol=1e-6)
