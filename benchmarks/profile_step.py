"""Where one denoising step's time goes: a torch.profiler summary of static-cache generation (the compiled step on
a GPU), with kernels per model call and the top operators.

    python benchmarks/profile_step.py --gpu            # paper "small", bf16, batch 1, block 16, first hitting
    python benchmarks/profile_step.py --smoke          # tiny model on CPU (tests)

Prints the table (no RESULTS.md entry: a diagnostic for tuning, not a benchmark).
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_generate import CPU_MODELS, GPU_MODEL, build_bd3lm


def profile_generation(model, batch: int, new_tokens: int, sampler: str):
    """(profiler, nfe) of one warmed-up static-cache generation."""
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    settings = dict(max_new_tokens=new_tokens, sampler=sampler, do_sample=False, cache_implementation="static",
                    return_dict_in_generate=True)
    model.generate(prompt, **settings)  # warm-up: compilation and CUDA-graph capture
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        out = model.generate(prompt, **settings)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return profiler, out.nfe


def summary(profiler, nfe: int, device: str, rows: int) -> str:
    events = profiler.key_averages()
    kernels = sum(event.count for event in events if event.device_type == torch.autograd.DeviceType.CUDA)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    lines = [f"model calls (NFE): {nfe}"]
    if device == "cuda":
        lines.append(f"GPU kernels per call: {kernels / nfe:.1f}")
    lines.append(events.table(sort_by=sort, row_limit=rows))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sampler", default="first_hitting")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    device, dtype, shape = ("cuda", torch.bfloat16, GPU_MODEL) if args.gpu else ("cpu", torch.float32,
                                                                                  CPU_MODELS["tiny"])
    context = args.new_tokens + 2 * args.block
    model = build_bd3lm(shape, args.block, context + -context % args.block, device, dtype)
    profiler, nfe = profile_generation(model, args.batch, args.new_tokens, args.sampler)
    text = summary(profiler, nfe, device, args.rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
