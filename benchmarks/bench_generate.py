"""Generation speed: BD3-LM cached vs uncached vs an AR baseline (LlamaForCausalLM, HF generate) of the same size.

    python benchmarks/bench_generate.py                 # CPU: tiny model, 1024 new tokens, block 16
    python benchmarks/bench_generate.py --gpu           # CUDA: paper "small" (H768, 12 layers, V50258), bf16
    python benchmarks/bench_generate.py --gpu --batch 1 # one batch size (to fit one 10-minute device call)
    python benchmarks/bench_generate.py --smoke --results /tmp/r.md  # the GPU case list on CPU, tiny (tests)
    python benchmarks/bench_generate.py --gpu --batch 1 --block 16 --inductor-option triton.cudagraphs=True \
        --inductor-option coordinate_descent_tuning=True   # the compiled rows with other inductor settings
    python benchmarks/bench_generate.py --gpu --batch 1 --block 16 --experiment aligned-logits  # experiments.py

CPU: each case runs in a fresh process (peak memory = max RSS of the case). GPU: one process (compiled graphs are
per process), peak memory = max allocated during the timed run; every case is warmed up first, compiled ones with
the full length (CUDA graphs captured before timing). Prints a table and appends it, with the machine, to
benchmarks/RESULTS.md (or --results). Compare ratios within one run only.
"""

import argparse
import contextlib
import datetime
import gc
import multiprocessing
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from compile_settings import add_compile_arguments, compile_kwargs, generation_compile_config
from experiments import (EXPERIMENTS, apply_experiment, experiment_names, logit_difference, reference_logits,
                         restore_process_backends)
from reporting import markdown_table, measure_all, publish

RESULTS = Path(__file__).parent / "RESULTS.md"
# The project's tiny model (DESIGN.md §5: H128, 2 layers, 4 heads, BPE vocab 1024), and a wider one with the GPT-2
# vocabulary, where the output layer (16 x H x 50258 per call) dominates a CPU call.
CPU_MODELS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, cond_dim=64, vocab_size=1025),
    "tiny-gpt2vocab": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, cond_dim=128,
                           vocab_size=50258),
}
GPU_MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, cond_dim=128, vocab_size=50258)
ORIGINAL_H100 = {"first_hitting": 59.6, "4 tokens/call": 218.0}  # DESIGN.md §5: bd3lms, batch 1, block 16
# Peak HBM bandwidth by device name (the first match; the original's figures are from an H100 SXM).
HBM_BYTES_PER_S = (("GH200", 4.0e12), ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12),
                   ("H100", 3.35e12))
ORIGINAL_DEVICE = "NVIDIA H100 80GB HBM3"  # the H100 SXM of the original's figures


def build_bd3lm(model_shape, block_size, context, device, dtype, attention="sdpa"):
    from bd3lm_hf import BD3LMConfig, BD3LMForBlockDiffusion

    config = BD3LMConfig(max_position_embeddings=context, block_size=block_size, hidden_dropout=0.0,
                         attn_implementation=attention, **model_shape)
    torch.manual_seed(0)
    model = BD3LMForBlockDiffusion(config)
    with torch.no_grad():  # random weights everywhere: the zero-init head would make every call trivial
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def llama_shape(model_shape) -> dict:
    """The AR baseline of the same size: Llama's gated MLP has three matrices where the DiT's has two, so its
    width is 2/3 of 4 H (same MLP weights per layer: 3 H x 8H/3 = 2 H x 4H)."""
    hidden = model_shape["hidden_size"]
    return dict(vocab_size=model_shape["vocab_size"], hidden_size=hidden, intermediate_size=8 * hidden // 3,
                num_hidden_layers=model_shape["num_hidden_layers"],
                num_attention_heads=model_shape["num_attention_heads"])


def build_llama(model_shape, context, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**llama_shape(model_shape), max_position_embeddings=context)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def context_for(case) -> int:
    context = 1 + case["new_tokens"] + case["block_size"]
    return context + -context % case["block_size"]


def build_model(case, models: dict):
    """One model per (kind, shape, block size), shared by the cases of a GPU run."""
    device, dtype = case["device"], getattr(torch, case["dtype"])
    key = (case["kind"] == "ar", case["model"], case["block_size"], case.get("attention", "sdpa"),
           case.get("experiment"))
    if key not in models:
        # Compiled graphs are kept per code object, up to torch._dynamo.config.recompile_limit (8): a new model
        # starts from an empty cache (the previous model's graphs are not used again). The previous models go too,
        # so that a row's peak memory is its own model's (weights, static cache, graph pools).
        models.clear()
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if case["kind"] == "ar":
            models[key] = build_llama(case["shape"], context_for(case), device, dtype)
        else:
            models[key] = build_bd3lm_case(case, device, dtype)
    return models[key]


def build_bd3lm_case(case, device, dtype):
    """The case's BD3-LM; with an experiment, patched, and its logit difference from the shipped model noted
    (`experiment_difference`)."""
    def build():
        return build_bd3lm(case["shape"], case["block_size"], context_for(case), device, dtype,
                           case.get("attention", "sdpa"))

    model = build()
    if case.get("experiment"):
        # the reference's logits with the shipped model's kernels, before patching (an experiment may switch a
        # process-wide backend, and an earlier model's experiment may have switched one already)
        restore_process_backends()
        reference = reference_logits(build())
        model.experiment_difference = logit_difference(apply_experiment(model, case["experiment"]), reference)
    return model


def decoding(case) -> dict:
    """Greedy, or sampling without top-k and by default without top-p (the original's nucleus_p = 1.0, what its
    figures used); CPU rows also sample at top_p 0.9 (the CLI's and the converted checkpoints' setting)."""
    if not case.get("do_sample"):
        return dict(do_sample=False)
    return dict(do_sample=True, top_k=0, top_p=case.get("top_p", 1.0))


def generate_kwargs(case, new_tokens: int) -> dict:
    if case["kind"] == "ar":
        return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                    cache_implementation=case.get("cache"), **decoding(case))
    settings = dict(max_new_tokens=new_tokens, **decoding(case), sampler=case["sampler"],
                    use_cache=case["kind"] == "cached", return_dict_in_generate=True,
                    cache_implementation=case.get("cache"), disable_compile=not case.get("compiled", True))
    if case["sampler"] == "ddpm":  # the other samplers take one call per revealed token (a num_steps would warn)
        settings["num_steps"] = case["num_steps"]
    if case.get("compile"):
        settings["compile_config"] = generation_compile_config(case["compile"])
    return settings


class EagerBlockSteps:
    """Counts the block-sized denoising steps a generation runs eagerly (while installed, `with`). In a compiled
    generation only the prompt's first call is eager by design: a block-sized eager step means the compiled step
    was given up (a compilation error, or the recompile limit), and the row would time the eager path under the
    compiled row's name. Compiled replays never enter the Python step (dynamo traced the original method)."""

    def __init__(self, model, block_size: int):
        self.model, self.widths, self.count = model, (block_size, 2 * block_size), 0

    def __enter__(self):
        step = type(self.model).denoise_step.__get__(self.model)

        def counted(tokens, *args, **kwargs):
            self.count += tokens.shape[1] in self.widths
            return step(tokens, *args, **kwargs)

        self.model.denoise_step = counted  # the instance attribute the generation loop calls
        return self

    def __exit__(self, *exc):
        del self.model.denoise_step
        return False


def strict_cuda_graphs():
    """Inductor raises, with the reason, where it would run a compiled graph without CUDA graphs (a CPU input, a
    mutated input; it only logs that under TORCH_LOGS=cudagraphs): a compiled row would time something else."""
    strict = {"triton.cudagraph_or_error": True} if hasattr(inductor_config.triton, "cudagraph_or_error") else {}
    return inductor_config.patch(strict)


def refuse_eager_steps(eager: EagerBlockSteps) -> None:
    """A compiled row whose block-sized steps ran eagerly (the compiled step given up) fails: not timed as named."""
    if eager.count:
        raise RuntimeError(f"{eager.count} block-sized steps ran eagerly in a compiled row (the compiled step was "
                           "given up: see the warning above): not timed as compiled")


def run_case(case: dict, models: dict | None = None) -> dict:
    """Runs one case; returns its row. A compiled row on the GPU fails if it did not run as compiled
    (`strict_cuda_graphs`, `refuse_eager_steps`)."""
    device = case["device"]
    torch.set_num_threads(case.get("threads", torch.get_num_threads()))
    model = build_model(case, {} if models is None else models)
    prompt = torch.full((case["batch"], 1), 0, dtype=torch.long, device=device)
    # explicit: token 0 is also the AR baseline's pad id, from which transformers would infer a zero mask
    prompt_mask = torch.ones_like(prompt)
    new_tokens = case["new_tokens"]
    compiled_row = device == "cuda" and case.get("compiled") and case["kind"] != "ar"
    with strict_cuda_graphs() if compiled_row else contextlib.nullcontext():
        if device == "cuda":  # compiled paths warm up at full length: every graph is captured before timing
            warm_up = new_tokens if case.get("cache") == "static" and case.get("compiled", True) else 64
            model.generate(prompt, attention_mask=prompt_mask, **generate_kwargs(case, min(warm_up, new_tokens)))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # counted once the warm-up has built the compiled step (it compiles the method it finds then)
        with EagerBlockSteps(model, case["block_size"]) if compiled_row else contextlib.nullcontext() as eager:
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=prompt_mask, **generate_kwargs(case, new_tokens))
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    if compiled_row:
        refuse_eager_steps(eager)
    nfe = out.nfe if case["kind"] != "ar" else new_tokens  # AR: one call per token (prefill included)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row = {key: value for key, value in case.items() if key != "shape"}
    if hasattr(model, "experiment_difference"):
        row["logit_difference"] = model.experiment_difference
    return {**row, "seconds": seconds, "tokens_per_s": case["batch"] * new_tokens / seconds, "nfe": nfe,
            "nfe_per_token": nfe / new_tokens, "peak_mib": peak / 2**20, "ms_per_call": 1000 * seconds / nfe}


def isolated(case: dict) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_case, (case,))


def cpu_cases(new_tokens: int, threads: int = 2) -> list[dict]:
    """Greedy rows (cached, uncached, static cache; the AR baseline), then the cached 16-steps row sampled: pure,
    and at top_p 0.9. With random weights every distribution is flat, so top-p takes its full sort (the worst
    case: `bench_top_p.py` times the peaked ones)."""
    rows = []
    for model, shape in CPU_MODELS.items():
        base = dict(device="cpu", dtype="float32", model=model, shape=shape, block_size=16, new_tokens=new_tokens,
                    batch=1, threads=threads)
        for steps in (16, 4):
            for kind in ("cached", "uncached", "cached static"):
                rows.append({**base, "name": f"{model}: bd3lm {kind}, ddpm {steps} steps/block",
                             "kind": kind.split()[0], "cache": "static" if "static" in kind else None,
                             "sampler": "ddpm", "num_steps": steps})
        for label, top_p in (("sampled", 1.0), ("sampled top_p 0.9", 0.9)):
            rows.append({**base, "name": f"{model}: bd3lm cached, ddpm 16 steps/block, {label}", "kind": "cached",
                         "sampler": "ddpm", "num_steps": 16, "do_sample": True, "top_p": top_p})
        rows.append({**base, "name": f"{model}: AR baseline (Llama, HF generate)", "kind": "ar"})
    return rows


def gpu_cases(new_tokens: int, batches, blocks, device="cuda", dtype="bfloat16", shape=None,
              attention="sdpa", experiment=None) -> list[dict]:
    """Batch x block size x sampler x path: eager (dynamic cache), static+eager (batch 1, block 16: what the
    cache alone gives) and static+compiled; the AR baseline (HF's static cache, compiled by HF) comes after the first
    block size, so that a run cut short still has the figures the targets quote. BD3-LM models other than sdpa
    carry the attention in their name (small-bs16-flex_attention), patched ones the experiment
    (small-bs16+aligned-logits)."""
    shape = shape or GPU_MODEL
    suffix = ("" if attention == "sdpa" else f"-{attention}") + (f"+{experiment}" if experiment else "")
    rows = []
    for batch in batches:
        for index, block_size in enumerate(blocks):
            if index == 1:  # after the first block size (the one the targets quote): the AR baseline
                rows.append(ar_case(device, dtype, shape, new_tokens, batch))
            model = f"small-bs{block_size}{suffix}"
            base = dict(device=device, dtype=dtype, model=model, shape=shape, block_size=block_size,
                        new_tokens=new_tokens, batch=batch, kind="cached", do_sample=True, attention=attention,
                        experiment=experiment)
            paths = [("eager", None, False), ("static+compiled", "static", True)]
            if batch == 1 and block_size == 16:
                paths.insert(1, ("static+eager", "static", False))
            for label, cache, compiled in paths:
                for sampler_label, sampler, steps in samplers_for(block_size):
                    rows.append({**base, "name": f"{model}: bd3lm {label}, {sampler_label}",
                                 "cache": cache, "compiled": compiled, "sampler": sampler, "num_steps": steps})
        if len(blocks) == 1:
            rows.append(ar_case(device, dtype, shape, new_tokens, batch))
    return rows


def samplers_for(block_size: int) -> list[tuple[str, str, int]]:
    """(label, sampler, ddpm steps per block): first hitting (1 token per call), 4 tokens per call (the AR
    comparison's setting) and 4 steps per block (the issue's second sampler; the same as 4 tokens per call at block
    16, 1 token per call at block 4)."""
    samplers = [("first_hitting", "first_hitting", block_size), ("4 tokens/call", "ddpm", max(block_size // 4, 1))]
    if block_size // 4 != 4:
        samplers.append(("4 steps/block", "ddpm", 4))
    return samplers


def ar_case(device, dtype, shape, new_tokens: int, batch: int) -> dict:
    return dict(device=device, dtype=dtype, model="small-ar", shape=shape, block_size=1, new_tokens=new_tokens,
                batch=batch, kind="ar", cache="static", do_sample=True,
                name="small: AR baseline (Llama, HF generate, static cache)")


def decoding_text(cases) -> str:
    if all(case.get("do_sample") for case in cases):
        return "pure sampling (top_k=0, top_p=1.0: the original's nucleus_p=1.0)"
    return "greedy" if not any(case.get("do_sample") for case in cases) else "greedy and sampled rows"


def run_stamp() -> str:
    """When and where, so that sections copied from several device calls can be told apart."""
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}, host {platform.node()}, transformers {transformers.__version__}"


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def table(rows) -> str:
    return markdown_table(
        ["case", "batch", "new tokens", "tokens/s", "NFE", "NFE/token", "ms/call", "peak MiB", "seconds"],
        [[row["name"], row["batch"], row["new_tokens"], f"{row['tokens_per_s']:.1f}", row["nfe"],
          f"{row['nfe_per_token']:.3f}", f"{row['ms_per_call']:.2f}", f"{row['peak_mib']:.0f}",
          f"{row['seconds']:.2f}"] for row in rows])


def hbm_bandwidth(device_name: str) -> tuple[str, float]:
    """(name, bytes/s) of the device's peak HBM bandwidth; an H100 SXM's where the name is not known (CPU runs)."""
    return next(((name, rate) for name, rate in HBM_BYTES_PER_S if name in device_name),
                ("H100", dict(HBM_BYTES_PER_S)["H100"]))


def streamed_bytes_per_call(shape, batch: int, context: int, block_size: int) -> int:
    """What one bf16 call must read from HBM: every weight but the embedding table (only its rows are gathered) and
    the keys and values of the whole static capacity (a multiple of `block_size`, which the config checks)."""
    with torch.device("meta"):
        model = build_bd3lm(shape, block_size, context, "meta", torch.bfloat16)
    weights = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    cache = 2 * shape["num_hidden_layers"] * batch * context * shape["hidden_size"]
    return 2 * (weights + cache)


def hbm_floor_lines(rows, shape, device_name: str) -> list[str]:
    name, rate = hbm_bandwidth(device_name)
    lines = []
    cases = {(row["batch"], context_for(row)): row["block_size"] for row in rows if row["kind"] != "ar"}
    for (batch, context), block_size in sorted(cases.items()):
        floor = 1000 * streamed_bytes_per_call(shape, batch, context, block_size) / rate
        lines.append(f"HBM floor per call at batch {batch}, context {context} (bf16 weights without the embedding "
                     f"table + the static cache's keys/values, at {name}'s {rate / 1e12:.2f} TB/s): {floor:.3f} ms")
    if device_name != ORIGINAL_DEVICE:
        lines.append(f"this device ({device_name}) is not the H100 SXM of the original's figures: the ratios to "
                     "them compare other hardware")
    return lines


def gpu_summary(rows, shape, device_name: str) -> list[str]:
    """The issue's targets: vs the original sampler (batch 1, block 16), ms/call vs the HBM floor, vs AR."""
    lines = hbm_floor_lines(rows, shape, device_name)
    for model in sorted({row["model"] for row in rows if "logit_difference" in row}):
        difference = next(row["logit_difference"] for row in rows if row["model"] == model)
        lines.append(f"{model}: largest logit difference from the shipped model {difference:.1e} (of the largest "
                     "logit; bf16 rounding is ~1e-2)")
    for row in rows:
        if row["batch"] == 1 and row["block_size"] == 16 and row["kind"] == "cached":
            for sampler, original in ORIGINAL_H100.items():
                if row["name"].endswith(sampler):
                    lines.append(f"{row['name']}: {row['tokens_per_s'] / original:.1f}x the original's {original} "
                                 f"tok/s (target 20x), {row['ms_per_call']:.3f} ms/call (target <= 0.8)")
    for batch in sorted({row["batch"] for row in rows}):
        ar = next((r for r in rows if r["kind"] == "ar" and r["batch"] == batch), None)
        for row in rows:
            if ar and row["batch"] == batch and row.get("compiled") and row.get("cache") == "static":
                four = row["name"].endswith("4 tokens/call")  # else first_hitting: 1 token per NFE, as AR
                lines.append(f"batch {batch}, {row['name']} / AR: {row['tokens_per_s'] / ar['tokens_per_s']:.2f}x "
                             + ("(target 2x)" if four else "(equal tokens per NFE)"))
    return lines


def cpu_summary(rows) -> list[str]:
    """Speed-ups within this run: cached / uncached, and cached at 4 tokens per call / the AR baseline."""
    ratios = []
    for model, batch in sorted({(row["model"], row["batch"]) for row in rows}):
        same = {row["name"].split(": ", 1)[1]: row for row in rows if (row["model"], row["batch"]) == (model, batch)}
        for steps in (16, 4):
            cached, uncached = (same.get(f"bd3lm {k}, ddpm {steps} steps/block") for k in ("cached", "uncached"))
            if cached and uncached:
                ratios.append(f"{model}, batch {batch}: cached / uncached at {steps} steps/block = "
                              f"{cached['tokens_per_s'] / uncached['tokens_per_s']:.2f}x")
        greedy = same.get("bd3lm cached, ddpm 16 steps/block")
        for label in ("sampled", "sampled top_p 0.9"):
            sampled = same.get(f"bd3lm cached, ddpm 16 steps/block, {label}")
            if greedy and sampled:
                ratios.append(f"{model}, batch {batch}: cached at 16 steps/block, {label} / greedy = "
                              f"{sampled['tokens_per_s'] / greedy['tokens_per_s']:.2f}x")
        ar = next((row for row in same.values() if row["kind"] == "ar"), None)
        four = same.get("bd3lm cached, ddpm 4 steps/block")
        if ar and four:
            ratios.append(f"{model}, batch {batch}: cached at 4 tokens/NFE / AR baseline = "
                          f"{four['tokens_per_s'] / ar['tokens_per_s']:.2f}x")
    return ratios


def run_cases(cases, isolate: bool):
    """(rows, failures) of the cases (`reporting.measure_all`: failures and SIGTERM keep the finished rows)."""
    models = {}
    return measure_all(
        cases, lambda case: isolated(case) if case["device"] == "cpu" and isolate else run_case(case, models),
        label=lambda case: f"{case['name']} (batch {case['batch']})",
        show=lambda row: print(table([row]).splitlines()[-1], flush=True))


def experiment_spec(text: str) -> str:
    """argparse type of `--experiment`: the variants' names checked (an unknown one is a usage error)."""
    try:
        experiment_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--smoke", action="store_true", help="the GPU case list on CPU with a tiny model")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 1024 (--smoke: 24)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="GPU batch sizes")
    parser.add_argument("--block", type=int, nargs="+", default=[16, 4], help="GPU block sizes, in this order")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flex_attention"],
                        help="attention of the BD3-LM rows (GPU and smoke case lists)")
    parser.add_argument("--experiment", default=None, type=experiment_spec,
                        help=f"a model variant of experiments.py for the BD3-LM rows (GPU and smoke case lists): "
                             f"{', '.join(sorted(EXPERIMENTS))}, or several joined by '+'")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the CPU rows (default 2)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    add_compile_arguments(parser, default_mode="reduce-overhead")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    compile_settings = compile_kwargs(args.compile_mode, args.inductor_option)
    new_tokens = args.new_tokens or (24 if args.smoke else 1024)
    if args.gpu:
        all_cases = gpu_cases(new_tokens, args.batch, args.block, attention=args.attn, experiment=args.experiment)
    elif args.smoke:
        all_cases = gpu_cases(new_tokens, args.batch, args.block, "cpu", "float32", CPU_MODELS["tiny"], args.attn,
                              args.experiment)
    else:
        all_cases = cpu_cases(new_tokens, args.threads)
    selected = [dict(case, compile=compile_settings) if case.get("compiled") else case
                for case in all_cases if not args.only or args.only in case["name"]]
    if not selected:
        raise SystemExit(f"no case matches --only {args.only!r}")
    rows, failures = run_cases(selected, isolate=not args.smoke)
    shape = selected[0]["shape"]
    device_name = torch.cuda.get_device_name() if args.gpu else "CPU"
    summary = gpu_summary(rows, shape, device_name) if args.gpu or args.smoke else cpu_summary(rows)
    models_text = "; ".join(f"{name} = {llama_shape(shape) if name.endswith('-ar') else shape}"
                            for name, shape in {c["model"]: c["shape"] for c in selected}.items())
    title = "GPU" if args.gpu else ("smoke, CPU" if args.smoke else "CPU")
    text = (f"\n## bench_generate ({title}) — {run_stamp()}\n\nMachine: {machine(selected[0]['device'])}. "
            f"Command: `{' '.join(['bench_generate.py', *(argv if argv is not None else sys.argv[1:])])}`. "
            f"Models: {models_text}. Random weights, {decoding_text(selected)}, prompt = 1 token. Compiled rows: "
            f"{compile_settings}."
            f"\n\n{table(rows)}\n\n"
            + "\n".join(f"- {line}" for line in failures + summary) + "\n")
    publish(text, args.results, failures)
    return rows


if __name__ == "__main__":
    main()
