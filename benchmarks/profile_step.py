"""Where one denoising step's time goes: a torch.profiler summary of static-cache generation (the compiled step on
a GPU), with kernels per model call and the top operators.

    python benchmarks/profile_step.py --gpu            # paper "small", bf16, batch 1, block 16, first hitting
    python benchmarks/profile_step.py --smoke          # tiny model on CPU (tests)

Prints the table (no RESULTS.md entry: a diagnostic for tuning, not a benchmark).
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_generate import CPU_MODELS, GPU_MODEL, build_bd3lm, decoding
from compile_settings import add_compile_arguments, compile_kwargs, generation_compile_config
from reporting import markdown_table


def profile_generation(model, batch: int, new_tokens: int, sampler: str, **extra):
    """(profiler, nfe, wall seconds of an unprofiled run) of a warmed-up static-cache generation; `extra`: more
    generate() settings (decoding, compile_config)."""
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    settings = dict(max_new_tokens=new_tokens, sampler=sampler, cache_implementation="static",
                    return_dict_in_generate=True, **{"do_sample": False, **extra})
    model.generate(prompt, **settings)  # warm-up: compilation and CUDA-graph capture
    start = time.perf_counter()
    model.generate(prompt, **settings)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        out = model.generate(prompt, **settings)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return profiler, out.nfe, wall


def kernel_time_us(event) -> float:
    """The event's own device time (torch renamed `self_cuda_time_total` to `self_device_time_total`)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def summary(profiler, nfe: int, device: str, rows: int, wall: float) -> str:
    events = profiler.key_averages()
    on_gpu = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sum(event.count for event in on_gpu)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    lines = [f"model calls (NFE): {nfe}; wall per call (unprofiled run): {1000 * wall / nfe:.3f} ms"]
    if device == "cuda":
        busy_ms = sum(kernel_time_us(event) for event in on_gpu) / 1000 / nfe
        # Kernel time leaves out the gaps between kernels, inside a CUDA graph too (~1-2 us each at batch 1): a wall
        # time above it is launch latency, from the host or from the graph's own launches (one graph per block
        # did not close it: docs/NOTES.md, session 4).
        bound = ("launch-latency-bound: wall time exceeds kernel time" if wall * 1000 / nfe > 1.2 * busy_ms
                 else "kernel-bound")
        lines.append(f"GPU kernels per call: {kernels / nfe:.1f}; kernel time per call: {busy_ms:.3f} ms ({bound})")
        lines.append(host_launches(events, nfe))
        lines += kernel_breakdown(on_gpu, nfe)
    lines.append(events.table(sort_by=sort, row_limit=rows))
    return "\n".join(lines)


GRAPH_LAUNCH = "cudaGraphLaunch"
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def host_launches(events, nfe: int) -> str:
    """CUDA graph replays and single kernel launches the host made, per model call. A compiled step replays one
    graph per call and launches only the eager ops between calls (~40 per block at 4 steps, counted on CPU in
    session 20: docs/NOTES.md): a call whose kernels are each launched from the host ran without its graph (~1.2 ms
    at batch 1 against ~0.75 replayed). Session 20's rows fit a block's first call (2 blocks wide: it commits the
    previous block) costing ~1.27 ms; this line tells whether that call replays its graph."""
    count = {name: sum(event.count for event in events if event.key == name)
             for name in (GRAPH_LAUNCH, *KERNEL_LAUNCHES)}
    kernels = sum(count[name] for name in KERNEL_LAUNCHES)
    return (f"host launches per call: {count[GRAPH_LAUNCH] / nfe:.2f} CUDA graph replays, {kernels / nfe:.1f} single "
            "kernels")


def kernel_breakdown(kernels, nfe: int) -> list[str]:
    """Every distinct GPU kernel with its launches and microseconds per model call, most launched first: inductor's
    kernel names list the operations each one fuses (triton_poi_fused_add_mul_...), so this is where the kernels
    per call can be counted down."""
    ordered = sorted(kernels, key=lambda event: (-event.count, -kernel_time_us(event)))
    table = markdown_table(["kernel", "launches/call", "us/call"],
                           [[event.key[:100], f"{event.count / nfe:.2f}", f"{kernel_time_us(event) / nfe:.2f}"]
                            for event in ordered])
    return ["", *table.splitlines(), ""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sampler", default="first_hitting")
    parser.add_argument("--num-steps", type=int, default=None, help="ddpm's steps per block (the benchmark's: 4)")
    parser.add_argument("--trace", default=None, help="also write the profiler's Chrome trace (JSON) here")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--greedy", action="store_true", help="greedy instead of the benchmark's pure sampling")
    parser.add_argument("--context", type=int, default=None,
                        help="max_position_embeddings = static cache capacity (default: new tokens + 2 blocks; the "
                             "benchmark's at 1024 tokens, block 16, is 1056: bench_generate.context_for)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flex_attention"])
    add_compile_arguments(parser, default_mode="reduce-overhead")
    args = parser.parse_args(argv)
    if args.num_steps is not None and args.sampler != "ddpm":
        parser.error(f"--num-steps applies to --sampler ddpm only, not {args.sampler!r}")
    extra = dict(decoding({"do_sample": not args.greedy}),
                 **({} if args.num_steps is None else {"num_steps": args.num_steps}),
                 compile_config=generation_compile_config(compile_kwargs(args.compile_mode, args.inductor_option)))
    device, dtype, shape = ("cuda", torch.bfloat16, GPU_MODEL) if args.gpu else ("cpu", torch.float32,
                                                                                  CPU_MODELS["tiny"])
    context = args.context or args.new_tokens + 2 * args.block
    model = build_bd3lm(shape, args.block, context + -context % args.block, device, dtype, args.attn)
    profiler, nfe, wall = profile_generation(model, args.batch, args.new_tokens, args.sampler, **extra)
    text = summary(profiler, nfe, device, args.rows, wall)
    if args.trace:
        profiler.export_chrome_trace(args.trace)
    print(text)
    return text


if __name__ == "__main__":
    main()
