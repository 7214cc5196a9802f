"""A BD3-LM sharded per decoder layer with FSDP2 (2 processes, gloo, CPU), as docs/accelerate/fsdp.yaml shards it:
the 2L training pass gives the unsharded model's loss and gradients, and generate() the unsharded model's tokens
with a different length on each rank (synced_gpus accepted); afterwards the weights are sharded again and training
goes on. Usage: torchrun --nproc_per_node 2 fsdp_forward_and_generate.py OUT"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import random_model  # noqa: E402

from bd3lm_hf.modeling.fsdp_bd3lm import _reshard_setting, fsdp_modules  # noqa: E402
from process_exit import exit_processes  # noqa: E402

MASK = 49  # tiny_config: vocab 50, [MASK] last


def training_batch(rank: int):
    g = torch.Generator().manual_seed(rank)
    x0 = torch.randint(0, MASK, (2, 16), generator=g)
    noise_levels = torch.rand(2, 4, generator=g) * 0.8 + 0.2
    xt = torch.where(torch.rand(2, 16, generator=g) < noise_levels.repeat_interleave(4, dim=1), MASK, x0)
    return dict(input_ids=xt, labels=x0, noise_levels=noise_levels)


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    gradients = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                 for name, p in model.named_parameters()}
    return float(loss), gradients


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


def outer_root_refused(mesh, prompt) -> bool:
    """A model inside the FSDP root (as accelerate shards a PeftModel): generate() says so instead of failing in
    FSDP, and leaves the FSDP state usable (no layer made the root)."""
    inner = random_model(std=0.1, max_position_embeddings=64)
    wrapper = Wrapper(inner)
    for layer in inner.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)
    try:
        inner.generate(prompt, max_new_tokens=4)
    except ValueError as error:
        return "needs that model to be the FSDP root" in str(error)
    return False


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = random_model(std=0.1, max_position_embeddings=64)
    prompt = torch.tensor([[1 + rank, 2, 3, 4]])
    settings = dict(max_new_tokens=4 if rank == 0 else 16, do_sample=False, eos_token_id=[], pad_token_id=0)
    expected_tokens = {cache: model.generate(prompt, cache_implementation=cache, **settings)
                       for cache in ("dynamic", "static")}
    # gradients are averaged over the 2 ranks by FSDP: the reference is the mean over both ranks' batches
    batches = [training_batch(r) for r in range(2)]
    reference = [loss_and_gradients(model, batch) for batch in batches]
    expected_gradients = {name: (reference[0][1][name] + reference[1][1][name]) / 2 for name in reference[0][1]}

    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._get_fsdp_state()._lazy_init()  # as the first forward (or generate) would: the settings training then has
    reshard_settings = [_reshard_setting(module) for module in fsdp_modules(model)]
    tokens_equal = {cache: torch.equal(model.generate(prompt, cache_implementation=cache,
                                                      synced_gpus=cache == "dynamic", **settings),
                                       expected_tokens[cache]) for cache in expected_tokens}
    sharded_after_generate = all(isinstance(p, DTensor) for p in model.parameters())
    settings_restored = reshard_settings == [_reshard_setting(module) for module in fsdp_modules(model)]
    loss, gradients = loss_and_gradients(model, batches[rank])
    result = {"tokens_equal": tokens_equal, "outer_root_refused": outer_root_refused(mesh, prompt), "sharded_after_generate": sharded_after_generate,
              "settings_restored": settings_restored,
              "loss_difference": abs(loss - reference[rank][0]),
              "gradient_difference": max(float((gradients[n] - expected_gradients[n]).abs().max()) for n in gradients),
              "loss": loss}
    (Path(out) / f"result_{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
    exit_processes()  # here only: a test may import and run main() in its own process
