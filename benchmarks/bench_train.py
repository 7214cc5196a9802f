"""Training-step speed and memory: the vectorized 2L pass (flex BlockMask / sdpa dense mask) vs two separate passes.

    python benchmarks/bench_train.py            # CPU: tiny model (flex has no backward on CPU: sdpa rows only)
    python benchmarks/bench_train.py --gpu      # CUDA: paper "small" (H768, 12 layers, V50258), bf16, L=1024

One training step = forward + backward + AdamW step on a batch noised by the collator. "two passes" runs the model
on x_0 and on x_t separately (block-causal, L tokens each): the FLOPs of the naive alternative to the 2L pass, for
comparison. Prints a table and appends it, with the machine, to benchmarks/RESULTS.md.
"""

import argparse
import datetime
import time
from pathlib import Path

import torch

from bd3lm_hf import BD3LMConfig, BD3LMForBlockDiffusion, DataCollatorForBlockDiffusion

RESULTS = Path(__file__).parent / "RESULTS.md"
CPU = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, cond_dim=64, vocab_size=1025,
           max_position_embeddings=256, batch=8, steps=5)
GPU = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, cond_dim=128, vocab_size=50258,
           max_position_embeddings=1024, batch=16, steps=10)


def make_model(shape, block_size, implementation, device, dtype):
    fields = {k: v for k, v in shape.items() if k not in ("batch", "steps")}
    model = BD3LMForBlockDiffusion(BD3LMConfig(block_size=block_size, hidden_dropout=0.0, **fields))
    model.set_attn_implementation(implementation)
    return model.to(device=device, dtype=dtype).train()


def batch_for(shape, block_size, device):
    collator = DataCollatorForBlockDiffusion(shape["vocab_size"] - 1, block_size, seed=0)
    x0 = torch.randint(0, shape["vocab_size"] - 1, (shape["batch"], shape["max_position_embeddings"]))
    return {k: v.to(device) for k, v in collator([{"input_ids": row} for row in x0.tolist()]).items()}


def training_step(model, optimizer, batch, mode):
    if mode == "two passes":
        labels = batch["labels"]
        clean = model(input_ids=labels).logits
        noisy = model(input_ids=batch["input_ids"]).logits
        loss = noisy.float().logsumexp(-1).mean() + 0 * clean.float().mean()
    else:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(shape, block_size, implementation, mode, device, dtype) -> dict:
    model = make_model(shape, block_size, implementation, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = batch_for(shape, block_size, device)
    training_step(model, optimizer, batch, mode)  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(shape["steps"]):
        training_step(model, optimizer, batch, mode)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / shape["steps"]
    tokens = shape["batch"] * shape["max_position_embeddings"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"mode": mode, "attention": implementation, "block": block_size, "tokens_per_s": tokens / seconds,
            "ms_per_step": 1000 * seconds, "peak_gib": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    dtype = torch.bfloat16 if args.gpu else torch.float32
    shape = GPU if args.gpu else CPU
    rows = []
    for block_size in (4, 16):
        modes = [("2L", "sdpa"), ("two passes", "sdpa")]
        if args.gpu:
            modes.insert(0, ("2L", "flex_attention"))
        for mode, implementation in modes:
            rows.append(measure(shape, block_size, implementation, mode, device, dtype))
            print(rows[-1], flush=True)
    lines = ["| pass | attention | block | tokens/s | ms/step | peak GiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['attention']} | {r['block']} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.1f} | "
              f"{'n/a' if r['peak_gib'] != r['peak_gib'] else format(r['peak_gib'], '.1f')} |" for r in rows]
    machine = torch.cuda.get_device_name() if args.gpu else "CPU, 2 threads"
    text = (f"\n## bench_train ({'GPU' if args.gpu else 'CPU'}) — {datetime.date.today()}\n\nMachine: {machine} "
            f"(torch {torch.__version__}). Model: {shape}, {dtype}, AdamW step included.\n\n" + "\n".join(lines) + "\n")
    print(text)
    with RESULTS.open("a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
