"""EMACallback over FSDP2-sharded parameters (2 processes, gloo, CPU): the checkpoint holds the full weights, written
once, and a resumed EMA is sharded again as the parameters are. Usage: torchrun --nproc_per_node 2 fsdp_ema.py OUT"""

import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from bd3lm_hf import BD3LMConfig, BD3LMForBlockDiffusion
from bd3lm_hf.ema import EMA_FILE, EMACallback, full_tensor
from process_exit import exit_processes


def sharded_model():
    torch.manual_seed(0)
    config = BD3LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, cond_dim=16,
                         max_position_embeddings=16, block_size=4)
    model = BD3LMForBlockDiffusion(config)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main(out: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = sharded_model()
    args = types.SimpleNamespace(output_dir=out, eval_on_start=False, load_best_model_at_end=False,
                                 should_save=rank == 0)
    control = types.SimpleNamespace(should_evaluate=False)
    ema = EMACallback(0.9)
    ema.on_train_begin(args, types.SimpleNamespace(global_step=0), control, model=model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    step = types.SimpleNamespace(global_step=1, best_model_checkpoint=None)
    ema.on_step_end(args, step, control, model=model)
    ema.on_save(args, step, control)
    dist.barrier()
    resumed = EMACallback(0.9)
    resumed.on_train_begin(args, step, control, model=model)  # reads checkpoint-1
    same = all(torch.equal(full_tensor(ema.shadow[name]), full_tensor(resumed.shadow[name])) for name in ema.shadow)
    sharded = all(type(resumed.shadow[name]) is type(ema.shadow[name]) for name in ema.shadow)
    resumed.copy_to(model)
    full_shapes = {name: list(full_tensor(p).shape) for name, p in model.named_parameters()}  # a collective
    if rank == 0:
        saved = load_file(str(Path(out) / "checkpoint-1" / EMA_FILE))
        result = {"same": same, "sharded": sharded, "updates": resumed.num_updates,
                  "full_shapes": {name: list(t.shape) for name, t in saved.items()} == full_shapes}
        (Path(out) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
    exit_processes()  # here only: a test may import and run main() in its own process
