"""Training-step speed and memory: the vectorized 2L pass (flex BlockMask / sdpa dense mask) vs two separate passes.

    python benchmarks/bench_train.py            # CPU: tiny model (flex has no backward on CPU: sdpa rows only)
    python benchmarks/bench_train.py --gpu      # CUDA: paper "small" (H768, 12 layers, V50258), bf16, B16, L1024
    python benchmarks/bench_train.py --smoke --results /tmp/r.md   # the GPU row list on CPU, tiny (tests)
    python benchmarks/bench_train.py --memory-estimate   # CPU: peak memory of the GPU shape at batch 16, estimated

One training step = forward + backward + AdamW step (fused on CUDA, Trainer's default) on a batch noised by the
collator, with fp32 weights under bf16 autocast on the GPU (what `TrainingArguments(bf16=True)` and the original's
bf16 training do). Rows: the 2L pass with flex attention (eager layers, then `compile_decoder_layers`), with sdpa's
dense mask, and "two passes" (the model on x_0 and on x_t separately, block-causal, L tokens each: the naive
alternative, for comparison). On CPU, peak memory is what torch's MemTracker sees live during one step (parameters,
gradients, optimizer states, activations, temporaries); `--memory-estimate` measures it for the GPU shape (eager
layers, sdpa, bf16 autocast on CPU) at batch 1 and 2 and extrapolates linearly to the original's batch 16.
Prints a table and appends it, with the machine, to benchmarks/RESULTS.md (or --results).
"""

import argparse
import contextlib
import datetime
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from bd3lm_hf import BD3LMConfig, BD3LMForBlockDiffusion, DataCollatorForBlockDiffusion
from bd3lm_hf.compilation import compile_decoder_layers
from compile_settings import add_compile_arguments, compile_kwargs
from reporting import markdown_table, measure_all, publish

RESULTS = Path(__file__).parent / "RESULTS.md"
CPU = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, cond_dim=64, vocab_size=1025,
           max_position_embeddings=256, batch=8, steps=5)
GPU = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, cond_dim=128, vocab_size=50258,
           max_position_embeddings=1024, batch=16, steps=10)
SMOKE = dict(CPU, max_position_embeddings=32, batch=2, steps=1)
ORIGINAL_H100 = {"tokens_per_s": 69.7e3, "peak_gib": 33.8}  # DESIGN.md §5: bd3lms 2L pass, flex, bf16, B16, L1024


def make_model(shape, block_size, implementation, device):
    fields = {k: v for k, v in shape.items() if k not in ("batch", "steps")}
    torch.manual_seed(0)
    model = BD3LMForBlockDiffusion(BD3LMConfig(block_size=block_size, hidden_dropout=0.0, **fields))
    model.set_attn_implementation(implementation)
    return model.to(device=device).train()


def batch_for(shape, block_size, device):
    collator = DataCollatorForBlockDiffusion(shape["vocab_size"] - 1, block_size, seed=0)
    x0 = torch.randint(0, shape["vocab_size"] - 1, (shape["batch"], shape["max_position_embeddings"]))
    return {k: v.to(device) for k, v in collator([{"input_ids": row} for row in x0.tolist()]).items()}


def training_step(model, optimizer, batch, mode, autocast):
    with autocast():
        if mode == "two passes":
            clean = model(input_ids=batch["labels"]).logits
            noisy = model(input_ids=batch["input_ids"]).logits
            loss = noisy.float().logsumexp(-1).mean() + 0 * clean.float().mean()
        else:
            loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(shape, row, device, compile_settings=None) -> dict:
    model = make_model(shape, row["block"], row["attention"], device)
    if row["compiled"]:
        compile_decoder_layers(model, **(compile_settings or {}))
    # fused on CUDA: what Trainer uses by default (optim="adamw_torch_fused")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch = batch_for(shape, row["block"], device)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda"
                else contextlib.nullcontext)
    for _ in range(2):  # warm-up (compilation, autotuning, allocator)
        training_step(model, optimizer, batch, row["mode"], autocast)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(shape["steps"]):
        training_step(model, optimizer, batch, row["mode"], autocast)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / shape["steps"]
    tokens = shape["batch"] * shape["max_position_embeddings"]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = tracked_peak_gib(model, optimizer, lambda: training_step(model, optimizer, batch, row["mode"], autocast))
    return {**row, "tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds, "peak_gib": peak}


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages alive during a region (CPU has no allocator statistics): the storages of
    `initial` tensors (weights, optimizer states) plus every op output, counted until it is freed. Kernel-internal
    workspaces are not seen."""

    def __init__(self, initial):
        super().__init__()
        self.sizes = WeakIdKeyDictionary()  # storage -> bytes, dropped when the storage is freed
        for tensor in initial:
            self.sizes[tensor.untyped_storage()] = tensor.untyped_storage().nbytes()
        self.peak = sum(self.sizes.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self.sizes:
                self.sizes[tensor.untyped_storage()] = tensor.untyped_storage().nbytes()
                self.peak = max(self.peak, sum(self.sizes.values()))
        return out


def tracked_peak_gib(model, optimizer, step) -> float:
    """Peak GiB live during `step()`, weights and optimizer states included."""
    initial = list(model.parameters()) + [value for state in optimizer.state.values() for value in state.values()
                                          if isinstance(value, torch.Tensor)]
    with PeakLiveBytes(initial) as tracker:
        step()
    return tracker.peak / 2**30


def memory_estimate(shape, block_size: int = 16, batches=(1, 2), target_batch: int = 16) -> dict:
    """The GPU shape's training-step peak on CPU at two small batches, extrapolated linearly to `target_batch`
    (fixed part: weights, gradients, AdamW states; per-row part: activations and temporaries)."""
    peaks = {}
    for batch in batches:
        sized = dict(shape, batch=batch)
        model = make_model(sized, block_size, "sdpa", "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        data = batch_for(sized, block_size, "cpu")
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        training_step(model, optimizer, data, "2L", autocast)  # optimizer states exist from here on
        peaks[batch] = tracked_peak_gib(model, optimizer, lambda: training_step(model, optimizer, data, "2L", autocast))
    (small, p_small), (large, p_large) = sorted(peaks.items())
    per_row = (p_large - p_small) / (large - small)
    return {"peaks": peaks, "per_row": per_row, "target_batch": target_batch,
            "estimate": p_small + per_row * (target_batch - small), "length": shape["max_position_embeddings"],
            "block": block_size}


def memory_estimate_line(estimate: dict) -> str:
    measured = ", ".join(f"batch {b}: {p:.3f} GiB" for b, p in sorted(estimate["peaks"].items()))
    return (f"memory estimate (CPU, eager layers, sdpa, bf16 autocast, L {estimate['length']}, block "
            f"{estimate['block']}): {measured}; {estimate['per_row']:.3f} GiB per row -> batch "
            f"{estimate['target_batch']}: {estimate['estimate']:.1f} GiB (the original measured "
            f"{ORIGINAL_H100['peak_gib']} GiB on the H100)")


def rows_for(gpu: bool, blocks) -> list[dict]:
    """(pass, attention, compiled layers) per block size; flex rows need a GPU (no flex backward on CPU)."""
    variants = [("2L", "sdpa", False), ("two passes", "sdpa", False)]
    if gpu:
        variants = [("2L", "flex_attention", False), ("2L", "flex_attention", True)] + variants
    return [{"mode": mode, "attention": attention, "compiled": compiled, "block": block}
            for block in blocks for mode, attention, compiled in variants]


def summary(rows) -> list[str]:
    lines = []
    for row in rows:
        if row["attention"] == "flex_attention":
            lines.append(f"2L flex, block {row['block']}, {'compiled' if row['compiled'] else 'eager'} layers: "
                         f"{row['tokens_per_s'] / ORIGINAL_H100['tokens_per_s']:.2f}x the original's 69.7k tok/s "
                         f"(target 1.5x), peak {row['peak_gib']:.1f} GiB (original 33.8)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--smoke", action="store_true", help="the GPU row list on CPU with a tiny model, sdpa only")
    parser.add_argument("--block", type=int, nargs="+", default=[4, 16])
    mode.add_argument("--memory-estimate", action="store_true",
                      help="CPU: the GPU shape's peak at batch 1 and 2, extrapolated to batch 16 (no timing rows)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    add_compile_arguments(parser, default_mode=None)
    args = parser.parse_args(argv)
    compile_settings = compile_kwargs(args.compile_mode, args.inductor_option)
    if args.memory_estimate:
        return publish_memory_estimate(args.results)
    device = "cuda" if args.gpu else "cpu"
    shape = GPU if args.gpu else (SMOKE if args.smoke else CPU)
    selected = [row for row in rows_for(args.gpu, args.block)
                if not (args.smoke and row["attention"] == "flex_attention")]
    rows, failures = measure_all(selected, lambda row: measure(shape, row, device, compile_settings), label=str,
                                 show=lambda row: print(row, flush=True), unit="row")
    table = markdown_table(
        ["pass", "attention", "layers", "block", "tokens/s", "ms/step", "peak GiB"],
        [[r["mode"], r["attention"], "compiled" if r["compiled"] else "eager", r["block"], f"{r['tokens_per_s']:.0f}",
          f"{r['ms_per_step']:.1f}", "n/a" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"]
         for r in rows])
    machine = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    precision = "fp32 weights, bf16 autocast" if args.gpu else "fp32"
    title = "GPU" if args.gpu else ("smoke, CPU" if args.smoke else "CPU")
    text = (f"\n## bench_train ({title}) — {datetime.date.today()}\n\nMachine: {machine} (torch {torch.__version__})."
            f" Model: {shape}, {precision}, AdamW step included. Compiled layers: "
            f"{compile_settings or 'inductor defaults'}.\n\n" + table + "\n\n"
            + "\n".join(f"- {line}" for line in failures + summary(rows)) + "\n")
    publish(text, args.results, failures, unit="row")
    return rows


def publish_memory_estimate(results: Path, shape=None) -> dict:
    estimate = memory_estimate(shape or GPU)
    line = memory_estimate_line(estimate)
    text = (f"\n## bench_train memory estimate (CPU) — {datetime.date.today()}\n\nMachine: CPU, "
            f"{torch.get_num_threads()} threads (torch {torch.__version__}).\n\n- {line}\n")
    publish(text, results, [])
    return estimate


if __name__ == "__main__":
    main()
