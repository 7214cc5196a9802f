"""One CUDA graph per block (`graph_scope="block"`): the tokens and model calls of one graph per call and of eager
generation. On CPU the block's steps run from the same fixed-address buffers that a CUDA graph replays."""

import pytest
import torch
from conftest import random_model
from test_generation import SAMPLERS, prompts

from transformers.generation import CompileConfig

import bd3lm_hf.modeling.generation_bd3lm as generation
from bd3lm_hf.modeling.block_graph_bd3lm import BlockGraph

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(scope="module")
def gen_model():
    return random_model(seed=1, std=0.12, max_position_embeddings=128)


def cuda_graph_compile_config(graphs: list) -> CompileConfig:
    """Mode "reduce-overhead" (asks for CUDA graphs, so block graphs apply), compiled on CPU too, with a backend
    that records each graph and runs it as traced (eager kernels, so sampled tokens match exactly)."""

    def recording_backend(graph_module, example_inputs, **settings):
        graphs.append(graph_module)
        return graph_module.forward

    config = CompileConfig(fullgraph=True, dynamic=False, backend=recording_backend, mode="reduce-overhead")
    config._compile_all_devices = True
    return config


@pytest.fixture
def block_runs(monkeypatch) -> list:
    """The blocks that went through a BlockGraph."""
    runs = []
    run = BlockGraph.run

    def counted(self, canvas, mask, start, *args, **kwargs):
        runs.append(start)
        return run(self, canvas, mask, start, *args, **kwargs)

    monkeypatch.setattr(BlockGraph, "run", counted)
    return runs


def generate_three_ways(model, settings: dict, seed: int = 7) -> dict:
    """Sequences and NFE with one graph per block, one per call, and eagerly (the static cache in all three)."""
    ids, mask = prompts()
    ways = {"block": dict(graph_scope="block", compile_config=cuda_graph_compile_config([])),
            "step": dict(graph_scope="step", compile_config=cuda_graph_compile_config([])),
            "eager": dict(disable_compile=True)}
    outputs = {}
    for name, extra in ways.items():
        torch.manual_seed(seed)
        outputs[name] = model.generate(ids, attention_mask=mask, cache_implementation="static",
                                       return_dict_in_generate=True, **settings, **extra)
    return outputs


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("do_sample", [False, True])
def test_block_graph_gives_the_tokens_and_calls_of_one_graph_per_call(gen_model, sampler, do_sample, block_runs):
    outputs = generate_three_ways(gen_model, dict(max_new_tokens=17, sampler=sampler, do_sample=do_sample, top_k=20))
    assert torch.equal(outputs["block"].sequences, outputs["step"].sequences)
    assert torch.equal(outputs["step"].sequences, outputs["eager"].sequences)
    assert outputs["block"].nfe == outputs["step"].nfe == outputs["eager"].nfe
    # prompts of 4-10 tokens, block 4: the first block to denoise runs per call, the four after it as blocks
    assert block_runs == [12, 16, 20, 24]


def test_block_graph_with_fewer_ddpm_steps_than_positions(gen_model, block_runs):
    outputs = generate_three_ways(gen_model, dict(max_new_tokens=17, sampler="ddpm", num_steps=2, do_sample=True))
    assert torch.equal(outputs["block"].sequences, outputs["eager"].sequences)
    assert outputs["block"].nfe == outputs["eager"].nfe and len(block_runs) == 4


def test_block_graph_compiles_two_graphs_and_never_recompiles(gen_model, block_runs):
    graphs = []
    config = cuda_graph_compile_config(graphs)
    ids, mask = prompts()
    gen_model.generate(ids, attention_mask=mask, max_new_tokens=17, cache_implementation="static",
                       compile_config=config)
    assert len(graphs) == 2  # (B, bs) and (B, 2 bs), as with one graph per call
    other_ids, other_mask = prompts(lengths=(3, 9, 14), seed=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        again = gen_model.generate(other_ids, attention_mask=other_mask, max_new_tokens=30,
                                   cache_implementation="static", compile_config=config)
    reference = gen_model.generate(other_ids, attention_mask=other_mask, max_new_tokens=30,
                                   cache_implementation="static", disable_compile=True)
    assert torch.equal(again, reference) and len(graphs) == 2


@pytest.mark.parametrize("reason", ["noise over the limit", "history", "mode without CUDA graphs"])
def test_one_graph_per_call_where_a_block_graph_does_not_apply(gen_model, block_runs, monkeypatch, reason):
    config = cuda_graph_compile_config([])
    settings = dict(max_new_tokens=13, do_sample=True, cache_implementation="static", return_dict_in_generate=True)
    if reason == "noise over the limit":
        monkeypatch.setattr(generation, "MAX_BLOCK_NOISE_BYTES", 1024)
    elif reason == "history":
        settings["output_history"] = True
    else:
        config.mode = None
    ids, mask = prompts()
    torch.manual_seed(3)
    out = gen_model.generate(ids, attention_mask=mask, compile_config=config, **settings)
    torch.manual_seed(3)
    reference = gen_model.generate(ids, attention_mask=mask, disable_compile=True, **settings)
    assert block_runs == [] and torch.equal(out.sequences, reference.sequences)
    if reason == "history":
        assert len(out.history) == out.nfe


def test_graph_scope_is_checked(gen_model):
    ids, mask = prompts()
    with pytest.raises(ValueError, match="graph_scope must be one of"):
        gen_model.generate(ids, attention_mask=mask, max_new_tokens=5, graph_scope="layer")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_block_cuda_graph_gives_the_eager_tokens_on_gpu(monkeypatch):
    """The default CUDA path (inductor; one CUDA graph per block, captured once per generation and replayed) gives
    the tokens of one graph per call and of eager generation: fp32, greedy for every sampler and seeded sampling;
    in bf16 another prompt runs without recompiling."""
    captures = []
    capture = BlockGraph.capture

    def counted(self):
        captures.append(self.num_steps)
        return capture(self)

    monkeypatch.setattr(BlockGraph, "capture", counted)
    model = random_model(seed=1, std=0.12, max_position_embeddings=128).cuda()
    ids, mask = (t.cuda() for t in prompts())
    ways = (dict(disable_compile=True), dict(graph_scope="step"), dict(graph_scope="block"))
    for sampler, do_sample in [(sampler, False) for sampler in SAMPLERS] + [("first_hitting", True)]:
        torch._dynamo.reset()  # two compile settings x two shapes per sampler: stay under the recompile limit (8)
        outputs = []
        for extra in ways:
            torch.manual_seed(3)
            outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=24, sampler=sampler, top_k=0,
                                          do_sample=do_sample, cache_implementation="static", **extra))
        assert all(torch.equal(outputs[0], other) for other in outputs[1:]), (sampler, do_sample)
    assert len(captures) == 4  # one capture per generation with block graphs
    torch._dynamo.reset()
    model = model.to(torch.bfloat16)
    model.generate(ids, attention_mask=mask, max_new_tokens=24, cache_implementation="static")
    other_ids, other_mask = (t.cuda() for t in prompts(lengths=(3, 9, 14), seed=1))
    with torch.compiler.set_stance("fail_on_recompile"):
        model.generate(other_ids, attention_mask=other_mask, max_new_tokens=40, cache_implementation="static")
