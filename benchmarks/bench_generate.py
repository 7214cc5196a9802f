"""Generation speed: BD3-LM cached vs uncached vs an AR baseline (LlamaForCausalLM, HF generate) of the same size.

    python benchmarks/bench_generate.py                 # CPU: tiny model, 1024 new tokens, block 16
    python benchmarks/bench_generate.py --gpu           # CUDA: paper "small" (H768, 12 layers, V50258), bf16

Each case runs in a fresh process (peak memory is per case: max RSS on CPU, max allocated on CUDA). Prints a table
and appends it, with the machine, to benchmarks/RESULTS.md. Compare ratios within one run only.
"""

import argparse
import datetime
import multiprocessing
import platform
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"
# The project's tiny model (DESIGN.md §5: H128, 2 layers, 4 heads, BPE vocab 1024), and a wider one with the GPT-2
# vocabulary, where the output layer (16 x H x 50258 per call) dominates a CPU call.
CPU_MODELS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, cond_dim=64, vocab_size=1025),
    "tiny-gpt2vocab": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, cond_dim=128,
                           vocab_size=50258),
}
GPU_MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, cond_dim=128, vocab_size=50258)


def build_bd3lm(model_shape, block_size, context, device, dtype):
    from bd3lm_hf import BD3LMConfig, BD3LMForBlockDiffusion

    config = BD3LMConfig(max_position_embeddings=context, block_size=block_size, hidden_dropout=0.0, **model_shape)
    torch.manual_seed(0)
    model = BD3LMForBlockDiffusion(config)
    with torch.no_grad():  # random weights everywhere: the zero-init head would make every call trivial
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def build_llama(model_shape, context, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=model_shape["vocab_size"], hidden_size=model_shape["hidden_size"],
                         intermediate_size=4 * model_shape["hidden_size"],
                         num_hidden_layers=model_shape["num_hidden_layers"],
                         num_attention_heads=model_shape["num_attention_heads"], max_position_embeddings=context)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def run_case(case: dict) -> dict:
    """Runs one case; returns its row. Executed in a fresh process."""
    device, dtype = case["device"], getattr(torch, case["dtype"])
    torch.set_num_threads(case.get("threads", torch.get_num_threads()))
    prompt = torch.full((case["batch"], 1), 0, dtype=torch.long, device=device)
    new_tokens = case["new_tokens"]
    context = 1 + new_tokens + case["block_size"]
    context += -context % case["block_size"]
    if case["kind"] == "ar":
        model = build_llama(case["shape"], context, device, dtype)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if case.get("static"):
            kwargs["cache_implementation"] = "static"
    else:
        model = build_bd3lm(case["shape"], case["block_size"], context, device, dtype)
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, sampler=case["sampler"],
                      num_steps=case["num_steps"], use_cache=case["kind"] == "cached", return_dict_in_generate=True,
                      cache_implementation=case.get("cache"))
    synchronize(device)
    if device == "cuda":
        model.generate(prompt, **{**kwargs, "max_new_tokens": 32, "min_new_tokens": None} if case["kind"] == "ar"
                       else {**kwargs, "max_new_tokens": 32})  # warm-up
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, **kwargs)
    synchronize(device)
    seconds = time.perf_counter() - start
    produced = case["batch"] * new_tokens
    nfe = out.nfe if case["kind"] != "ar" else new_tokens  # AR: one call per token (prefill included)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**case, "seconds": seconds, "tokens_per_s": produced / seconds, "nfe": nfe,
            "nfe_per_token": nfe / new_tokens, "peak_mib": peak / 2**20, "ms_per_call": 1000 * seconds / nfe}


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def isolated(case: dict) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_case, (case,))


def bd3lm_cases(base: dict, steps_per_block=(16, 4), kinds=("cached", "uncached", "cached static")):
    rows = []
    for steps in steps_per_block:
        for kind in kinds:
            rows.append({**base, "name": f"{base['model']}: bd3lm {kind}, ddpm {steps} steps/block",
                         "kind": kind.split()[0], "cache": "static" if "static" in kind else None,
                         "sampler": "ddpm", "num_steps": steps})
    return rows


def cases(gpu: bool, new_tokens: int):
    if not gpu:
        rows = []
        for model, shape in CPU_MODELS.items():
            base = dict(device="cpu", dtype="float32", model=model, shape=shape, block_size=16,
                        new_tokens=new_tokens, batch=1, threads=2)
            rows += bd3lm_cases(base) + [{**base, "name": f"{model}: AR baseline (Llama, HF generate)", "kind": "ar"}]
        return rows
    rows = []
    for batch in (1, 16):
        for block_size in (4, 16):
            base = dict(device="cuda", dtype="bfloat16", model=f"small-bs{block_size}", shape=GPU_MODEL,
                        block_size=block_size, new_tokens=new_tokens, batch=batch)
            for cache in (None, "static"):
                label = "static+compiled" if cache else "eager"
                rows.append({**base, "name": f"small-bs{block_size}: bd3lm {label}, first_hitting",
                             "kind": "cached", "cache": cache, "sampler": "first_hitting",
                             "num_steps": block_size})
                rows.append({**base, "name": f"small-bs{block_size}: bd3lm {label}, 4 tokens/call", "kind": "cached",
                             "cache": cache, "sampler": "ddpm", "num_steps": max(block_size // 4, 1)})
        rows.append({**base, "model": "small-ar", "name": "small: AR baseline (Llama, HF generate, static cache)",
                     "kind": "ar", "static": True})
    return rows


def machine(gpu: bool) -> str:
    if gpu:
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"CPU {cpu}, 2 threads (torch {torch.__version__})"


def table(rows) -> str:
    lines = ["| case | batch | new tokens | tokens/s | NFE | NFE/token | ms/call | peak MiB | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['batch']} | {row['new_tokens']} | {row['tokens_per_s']:.1f} | "
                     f"{row['nfe']} | {row['nfe_per_token']:.3f} | {row['ms_per_call']:.2f} | {row['peak_mib']:.0f} | "
                     f"{row['seconds']:.2f} |")
    return "\n".join(lines)


ORIGINAL_H100 = {"first_hitting": 59.6, "4 tokens/call": 218.0}  # DESIGN.md §5: bd3lms, batch 1, block 16
H100_HBM_BYTES_PER_S = 3.35e12


def gpu_summary(rows) -> list[str]:
    """GPU targets: vs the original sampler (batch 1, block 16) and vs the AR baseline at 4 tokens per call."""
    lines = []
    weights = sum(p.numel() for p in build_bd3lm(GPU_MODEL, 16, 1040, "meta", torch.bfloat16).parameters()) * 2
    lines.append(f"HBM floor per call: {weights / 2**20:.0f} MiB of bf16 weights / 3.35 TB/s = "
                 f"{1000 * weights / H100_HBM_BYTES_PER_S:.3f} ms")
    for row in rows:
        if row["batch"] == 1 and row["model"] == "small-bs16" and row.get("cache") == "static":
            for sampler, original in ORIGINAL_H100.items():
                if row["name"].endswith(sampler):
                    lines.append(f"{row['name']}: {row['tokens_per_s'] / original:.1f}x the original's "
                                 f"{original} tok/s (target 20x), {row['ms_per_call']:.2f} ms/call (target <= 0.8)")
    for batch in (1, 16):
        ar = next((r for r in rows if r["kind"] == "ar" and r["batch"] == batch), None)
        for row in rows:
            if ar and row["batch"] == batch and row["name"].endswith("4 tokens/call") and row.get("cache"):
                lines.append(f"batch {batch}, {row['name']} / AR: {row['tokens_per_s'] / ar['tokens_per_s']:.2f}x "
                             "(target 2x)")
    return lines


def summary_ratios(rows) -> list[str]:
    """Speed-ups within this run: cached / uncached, and cached at 4 tokens per call / the AR baseline."""
    ratios = []
    for model, batch in sorted({(row["model"], row["batch"]) for row in rows}):
        same = {row["name"].split(": ", 1)[1]: row for row in rows if (row["model"], row["batch"]) == (model, batch)}
        for steps in (16, 4):
            cached, uncached = (same.get(f"bd3lm {k}, ddpm {steps} steps/block") for k in ("cached", "uncached"))
            if cached and uncached:
                ratios.append(f"{model}, batch {batch}: cached / uncached at {steps} steps/block = "
                              f"{cached['tokens_per_s'] / uncached['tokens_per_s']:.2f}x")
        ar = next((row for name, row in same.items() if row["kind"] == "ar"), None)
        four = same.get("bd3lm cached, ddpm 4 steps/block")
        if ar and four:
            ratios.append(f"{model}, batch {batch}: cached at 4 tokens/NFE / AR baseline = "
                          f"{four['tokens_per_s'] / ar['tokens_per_s']:.2f}x")
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    args = parser.parse_args()
    rows = [isolated(case) for case in cases(args.gpu, args.new_tokens) if not args.only or args.only in case["name"]]
    report = table(rows)
    ratios = gpu_summary(rows) if args.gpu else summary_ratios(rows)
    models = "; ".join(f"{name} = {shape}" for name, shape in
                       ({row["model"]: row["shape"] for row in rows}).items())
    text = (f"\n## bench_generate ({'GPU' if args.gpu else 'CPU'}) — {datetime.date.today()}\n\nMachine: "
            f"{machine(args.gpu)}. Models: {models}. Block 16, random weights, greedy, prompt = 1 token.\n\n"
            f"{report}\n\n" + "\n".join(f"- {r}" for r in ratios) + "\n")
    print(text)
    with RESULTS.open("a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
