"""The benchmark scripts run (their GPU case lists on CPU, tiny model, `--smoke`) and write their tables: what a
session with a GPU machine runs must not have rotted. Speed itself is never asserted here."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_generate  # noqa: E402
import bench_train  # noqa: E402


def test_bench_generate_smoke_runs_the_gpu_case_list(tmp_path):
    results = tmp_path / "RESULTS.md"
    rows = bench_generate.main(["--smoke", "--new-tokens", "8", "--batch", "1", "2", "--results", str(results)])
    names = {row["name"] for row in rows}
    assert "small-bs16: bd3lm static+compiled, first_hitting" in names
    assert "small: AR baseline (Llama, HF generate, static cache)" in names
    assert all(row["tokens_per_s"] > 0 and row["nfe"] > 0 for row in rows)
    four = [row for row in rows if row["name"].endswith("4 tokens/call") and row["kind"] == "cached"]
    assert all(row["nfe_per_token"] <= 0.5 for row in four)  # 4 tokens per call (1 step per block of 4)
    text = results.read_text()
    assert "## bench_generate (smoke, CPU)" in text and "target 20x" in text and "/ AR:" in text


def test_bench_generate_runs_the_bd3lm_rows_with_flex_attention(tmp_path):
    rows = bench_generate.main(["--smoke", "--new-tokens", "8", "--batch", "1", "--block", "4",
                                "--attn", "flex_attention", "--only", "static+compiled",
                                "--results", str(tmp_path / "RESULTS.md")])
    assert {row["name"] for row in rows} == {"small-bs4-flex_attention: bd3lm static+compiled, first_hitting",
                                             "small-bs4-flex_attention: bd3lm static+compiled, 4 tokens/call",
                                             "small-bs4-flex_attention: bd3lm static+compiled, 4 steps/block"}
    assert all(row["attention"] == "flex_attention" and row["nfe"] > 0 for row in rows)


def test_bench_generate_times_an_experiment_and_reports_its_logit_difference(tmp_path):
    results = tmp_path / "RESULTS.md"
    rows = bench_generate.main(["--smoke", "--new-tokens", "8", "--batch", "1", "--block", "4",
                                "--experiment", "aligned-logits", "--only", "static+compiled",
                                "--results", str(results)])
    assert {row["model"] for row in rows} == {"small-bs4+aligned-logits"}
    assert all(row["logit_difference"] < 1e-5 for row in rows)  # fp32: the same function
    assert "small-bs4+aligned-logits: largest logit difference from the shipped model" in results.read_text()


def test_an_experiment_switching_a_process_wide_backend_is_compared_with_the_shipped_kernels(tmp_path,
                                                                                             monkeypatch):
    """sdpa-efficient switches cuDNN attention off for the whole process: the reference logits must be taken
    before, or the shipped model runs the variant's kernels too and the difference reads 0 whatever it is."""
    import experiments

    layer_norm = torch.nn.functional.layer_norm

    def process_wide(model):  # another function, switched for every model in the process
        monkeypatch.setattr(torch.nn.functional, "layer_norm", lambda *a, **k: layer_norm(*a, **k) * 1.5)

    monkeypatch.setitem(experiments.EXPERIMENTS, "process-wide", process_wide)
    monkeypatch.setattr(sys.modules["bench_generate"], "EXPERIMENTS", experiments.EXPERIMENTS)
    rows = bench_generate.run_cases([case for case in bench_generate.gpu_cases(
        8, [1], [4], "cpu", "float32", bench_generate.CPU_MODELS["tiny"], experiment="process-wide")
        if case["name"].endswith("static+eager, first_hitting") or "compiled, first" in case["name"]][:1],
        isolate=False)[0]
    assert rows and rows[0]["logit_difference"] > 1e-2


def test_the_gpu_scripts_settings_are_flags_the_benchmark_takes():
    """run_gpu_checks.sh's tune and experiments settings, parsed as its stage passes them: a typo there would cost a
    GPU session one of its few calls."""
    import re
    import shlex

    script = (BENCHMARKS / "run_gpu_checks.sh").read_text()
    settings = [setting for block in re.findall(r"settings=\(([^)]*)\)", script) for setting in shlex.split(block)]
    assert len(settings) >= 8 and "--experiment mlp-epilogue+aligned-logits" in settings
    for setting in settings:
        args = bench_generate.build_parser().parse_args(
            ["--gpu", "--batch", "1", "--block", "16", "--only", "static+compiled", *setting.split()])
        bench_generate.compile_kwargs(args.compile_mode, args.inductor_option)  # KEY=VALUE options


def test_a_compiled_row_that_ran_eagerly_fails():
    """A compiled row whose steps fell back to eager (a compilation error, the recompile limit) would time the eager
    path under the compiled row's name: `EagerBlockSteps` counts the block-sized steps run eagerly, which a compiled
    generation has none of, and `refuse_eager_steps` fails the row. Compiled here on CPU with eager kernels, as the
    GPU path compiles, and with a backend that cannot compile."""
    from conftest import random_model
    from transformers import CompileConfig

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("this backend compiles nothing")

    prompt = torch.zeros(1, 1, dtype=torch.long)
    settings = dict(max_new_tokens=12, do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    runs = {}
    for backend in ("eager", failing_backend):
        model = random_model(block_size=4)
        config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
        config._compile_all_devices = True
        with bench_generate.strict_cuda_graphs():
            model.generate(prompt, compile_config=config, **settings)  # the warm-up compiles (or gives up)
            with bench_generate.EagerBlockSteps(model, 4) as eager:
                runs[backend == "eager"] = model.generate(prompt, compile_config=config, **settings), eager
        assert "denoise_step" not in vars(model)  # the counter is uninstalled
    (compiled, counted), (given_up, eager) = runs[True], runs[False]
    assert torch.equal(compiled.sequences, given_up.sequences)
    assert counted.count == 0 and eager.count == given_up.nfe > 0  # the prompt fits the first block: all block-wide
    bench_generate.refuse_eager_steps(counted)
    with pytest.raises(RuntimeError, match=r"block-sized steps ran eagerly in a compiled row"):
        bench_generate.refuse_eager_steps(eager)


def test_block_4_rows_also_run_4_steps_per_block_and_the_ar_baseline_has_the_same_mlp_weights():
    cases = bench_generate.gpu_cases(8, [1], [16, 4], "cpu", "float32", bench_generate.CPU_MODELS["tiny"])
    steps = {case["name"].split(", ", 1)[1]: case["num_steps"] for case in cases
             if case["model"] == "small-bs4" and case["cache"] == "static"}
    assert steps == {"first_hitting": 4, "4 tokens/call": 1, "4 steps/block": 4}
    assert not any(case["name"].endswith("4 steps/block") for case in cases if case["model"] == "small-bs16")
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = bench_generate.GPU_MODEL
    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(**bench_generate.llama_shape(shape)))
        bd3lm = bench_generate.build_bd3lm(shape, 16, 1040, "meta", torch.bfloat16)
    assert (sum(p.numel() for p in llama.model.layers[0].mlp.parameters())
            == sum(p.numel() for p in bd3lm.model.layers[0].mlp.parameters() if p.dim() == 2))


def test_hbm_floor_reads_the_streamed_weights_and_the_cache_at_the_devices_bandwidth():
    shape = bench_generate.GPU_MODEL
    weights = 169_627_218 - 50258 * 768  # the paper model's parameters, without the embedding table
    assert bench_generate.streamed_bytes_per_call(shape, 1, 1040, 16) == 2 * (weights + 2 * 12 * 1040 * 768)
    # block-4 rows have a context (1032) that 16 does not divide (block 16: 1056): the meta model is built with each
    # row's block size
    rows = [dict(batch=1, kind="cached", new_tokens=1024, block_size=16),
            dict(batch=1, kind="cached", new_tokens=1024, block_size=4)]
    h100 = bench_generate.hbm_floor_lines(rows, shape, "NVIDIA H100 80GB HBM3")
    h200 = bench_generate.hbm_floor_lines(rows, shape, "NVIDIA H200")
    assert len(h100) == 2 and "context 1032" in h100[0] and "context 1056" in h100[1]
    assert "3.35 TB/s" in h100[0] and "4.80 TB/s" in h200[0]
    assert "not the H100 SXM" in h200[-1]


def test_experiments_patch_the_model_into_the_same_function():
    from conftest import random_model
    from experiments import apply_experiment, logit_difference, reference_logits

    reference = reference_logits(random_model(vocab_size=101))  # rows padded to 128
    patched = apply_experiment(random_model(vocab_size=101), "aligned-logits")
    assert patched.lm_head.weight.shape == (128, 32) and logit_difference(patched, reference) < 1e-6
    for cuda_only in ("mlp-epilogue", "sdpa-efficient"):
        with pytest.raises(ValueError, match="needs CUDA"):
            apply_experiment(random_model(), cuda_only)
    with pytest.raises(ValueError, match="unknown: 'frobnicate'"):
        apply_experiment(random_model(), "frobnicate")


def test_experiments_joined_by_plus_are_applied_together_in_order(tmp_path, monkeypatch):
    from conftest import random_model
    import experiments

    applied = []
    monkeypatch.setitem(experiments.EXPERIMENTS, "marker", lambda model: applied.append(type(model.lm_head)))
    reference = experiments.reference_logits(random_model(vocab_size=101))
    patched = experiments.apply_experiment(random_model(vocab_size=101), "aligned-logits+marker")
    assert applied == [experiments.AlignedOutputLayer]  # the marker ran after the output layer was swapped
    assert experiments.logit_difference(patched, reference) < 1e-6
    for spec, unknown in (("aligned-logits+frobnicate", "'frobnicate'"), ("aligned-logits+aligned-logits", "none"),
                          ("aligned-logits+", "''")):
        with pytest.raises(ValueError, match=f"each once\\); unknown: {unknown}"):
            experiments.apply_experiment(random_model(), spec)
    with pytest.raises(SystemExit):  # a usage error before any model is built
        bench_generate.main(["--smoke", "--experiment", "aligned-logits+frobnicate",
                             "--results", str(tmp_path / "RESULTS.md")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mlp_epilogue_experiment_computes_the_model_on_cuda():
    """The fused epilogue computes the model's tanh GELU (not the exact erf one, which differs by up to ~5e-4
    over [-4, 4]: too little to tell apart through a whole model's logits), and the patched model its logits."""
    import torch.nn.functional as F
    from conftest import random_model
    from experiments import apply_experiment, fused_fc_in_gelu, logit_difference, reference_logits

    mlp = random_model().cuda().model.layers[0].mlp
    with torch.no_grad():  # pre-activations = the bias, spread over [-4, 4]
        mlp.fc_in.weight.zero_()
        mlp.fc_in.bias.copy_(torch.linspace(-4, 4, mlp.fc_in.out_features))
        fused = fused_fc_in_gelu(mlp, torch.zeros(2, mlp.fc_in.in_features, device="cuda"))[0]
    from_tanh = (fused - F.gelu(mlp.fc_in.bias, approximate="tanh")).abs().mean()
    from_erf = (fused - F.gelu(mlp.fc_in.bias)).abs().mean()
    assert from_tanh < 0.25 * from_erf, (float(from_tanh), float(from_erf))
    reference = reference_logits(random_model(std=0.1).cuda())
    for spec in ("mlp-epilogue", "mlp-epilogue+aligned-logits"):
        patched = apply_experiment(random_model(std=0.1).cuda(), spec)
        assert logit_difference(patched, reference) < 1e-3  # fp32: the epilogue's own tanh rounding


def test_bench_train_smoke_runs(tmp_path):
    results = tmp_path / "RESULTS.md"
    rows = bench_train.main(["--smoke", "--block", "4", "--results", str(results)])
    assert [(row["mode"], row["attention"]) for row in rows] == [("2L", "sdpa"), ("two passes", "sdpa")]
    assert "## bench_train (smoke, CPU)" in results.read_text()
    assert [row["attention"] for row in bench_train.rows_for(True, [16])][:2] == ["flex_attention"] * 2
    assert all(row["peak_gib"] > 0 for row in rows)  # CPU peaks come from MemTracker


def test_bench_train_memory_estimate_extrapolates_from_two_batches(tmp_path):
    results = tmp_path / "RESULTS.md"
    shape = dict(bench_train.SMOKE, max_position_embeddings=128)  # activations outweigh the optimizer's temporaries
    estimate = bench_train.publish_memory_estimate(results, shape=shape)
    assert 0 < estimate["peaks"][1] < estimate["peaks"][2]  # one more row, more activations
    assert estimate["estimate"] == pytest.approx(estimate["peaks"][1] + 15 * estimate["per_row"])
    assert "GiB per row -> batch 16" in results.read_text()


def test_peak_live_bytes_counts_what_is_alive_at_once():
    base = torch.zeros(1024)  # 4 KiB alive throughout
    with bench_train.PeakLiveBytes([base]) as tracker:
        first = base + 1  # +4 KiB
        del first  # freed: the next one reuses the budget
        second = torch.ones(2048) * 2  # +8 KiB (ones) +8 KiB (product) at once
    assert tracker.peak == 4096 + 8192 + 8192 and second.numel() == 2048


def test_a_failing_case_is_reported_and_the_others_still_written(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    real_run_case = bench_generate.run_case

    def flaky(case, models=None):
        if "static+compiled" in case["name"]:
            raise RuntimeError("simulated compile failure")
        return real_run_case(case, models)

    monkeypatch.setattr(bench_generate, "run_case", flaky)
    try:
        bench_generate.main(["--smoke", "--new-tokens", "8", "--batch", "1", "--block", "4",
                             "--results", str(results)])
    except SystemExit as stop:
        assert "3 case(s) failed" in str(stop)
    else:
        raise AssertionError("a failed case must make the run fail")
    text = results.read_text()
    assert "FAILED small-bs4: bd3lm static+compiled, first_hitting (batch 1): RuntimeError" in text
    assert "| small-bs4: bd3lm eager, first_hitting | 1 |" in text


def test_sigterm_writes_the_cases_already_measured(tmp_path, monkeypatch):
    """`timeout` ends a device call with SIGTERM: the finished cases must still reach RESULTS.md."""
    import os
    import signal

    results = tmp_path / "RESULTS.md"
    real_run_case = bench_generate.run_case
    calls = []

    def stopped_on_third(case, models=None):
        calls.append(case["name"])
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run_case(case, models)

    monkeypatch.setattr(bench_generate, "run_case", stopped_on_third)
    before = signal.getsignal(signal.SIGTERM)
    try:
        bench_generate.main(["--smoke", "--new-tokens", "8", "--batch", "1", "--results", str(results)])
    except SystemExit as stop:
        assert "1 case(s) failed" in str(stop)
    else:
        raise AssertionError("an interrupted run must fail")
    assert signal.getsignal(signal.SIGTERM) is before
    text = results.read_text()
    assert "INTERRUPTED (SIGTERM) after 2 of" in text and text.count("| small-bs16: bd3lm") == 2


def test_profile_step_smoke():
    import profile_step

    text = profile_step.main(["--smoke", "--new-tokens", "8", "--rows", "5"])
    assert "model calls (NFE): 16" in text and "aten::" in text  # first hitting, block 16: one call per token
    assert "wall per call (unprofiled run)" in text
    flex = profile_step.main(["--smoke", "--new-tokens", "8", "--rows", "40", "--context", "64",
                              "--attn", "flex_attention"])
    assert "model calls (NFE): 16" in flex and "FlexAttention" in flex


def test_profile_step_runs_ddpm_steps_and_writes_a_trace(tmp_path):
    import profile_step

    trace = tmp_path / "trace.json"
    text = profile_step.main(["--smoke", "--new-tokens", "8", "--rows", "5", "--sampler", "ddpm", "--num-steps", "4",
                              "--trace", str(trace)])
    assert "model calls (NFE): 4" in text  # one block of 16, 4 steps
    assert json.loads(trace.read_text())["traceEvents"]
    with pytest.raises(SystemExit):
        profile_step.main(["--smoke", "--num-steps", "4"])  # first hitting takes no number of steps


def test_profile_counts_graph_replays_and_single_kernel_launches_per_call():
    import profile_step

    class Event:
        def __init__(self, key, count):
            self.key, self.count = key, count

    events = [Event("cudaGraphLaunch", 16), Event("cudaLaunchKernel", 300), Event("cuLaunchKernel", 20),
              Event("aten::mm", 999)]
    expected = "host launches per call: 1.00 CUDA graph replays, 20.0 single kernels"
    assert profile_step.host_launches(events, 16) == expected


def test_profile_kernel_breakdown_lists_each_kernel_per_call():
    import profile_step

    class Kernel:
        def __init__(self, key, count, time):
            self.key, self.count, self.self_device_time_total = key, count, time

    lines = profile_step.kernel_breakdown([Kernel("gemm", 96, 480.0), Kernel("triton_poi_fused_add", 192, 288.0)], 2)
    assert lines[3:5] == ["| triton_poi_fused_add | 96.00 | 144.00 |", "| gemm | 48.00 | 240.00 |"]


def test_compile_settings_from_the_command_line():
    from compile_settings import compile_kwargs

    assert compile_kwargs("reduce-overhead", []) == {"mode": "reduce-overhead"}
    assert compile_kwargs(None, []) == {}
    options = compile_kwargs("reduce-overhead", ["coordinate_descent_tuning=True", "triton.cudagraphs=true",
                                                 "max_autotune_gemm_backends=TRITON", "epilogue_fusion=0"])
    assert options == {"options": {"coordinate_descent_tuning": True, "triton.cudagraphs": True,
                                   "max_autotune_gemm_backends": "TRITON", "epilogue_fusion": 0}}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        compile_kwargs(None, ["coordinate_descent_tuning"])


def test_bench_generate_passes_the_compile_settings_to_the_compiled_rows(tmp_path):
    results = tmp_path / "RESULTS.md"
    rows = bench_generate.main(["--smoke", "--batch", "1", "--block", "4", "--only", "static+compiled",
                                "--inductor-option", "coordinate_descent_tuning=True", "--results", str(results)])
    assert rows and all(row["compile"] == {"options": {"coordinate_descent_tuning": True}} for row in rows)
    kwargs = bench_generate.generate_kwargs(rows[0], 8)
    assert kwargs["compile_config"].mode is None and kwargs["compile_config"].options == {
        "coordinate_descent_tuning": True}
    assert "coordinate_descent_tuning" in results.read_text()


def test_bench_train_passes_the_compile_settings_to_the_compiled_layers(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_train, "compile_decoder_layers", lambda model, **kwargs: seen.append(kwargs))
    row = {"mode": "2L", "attention": "sdpa", "compiled": True, "block": 4}
    bench_train.measure(bench_train.SMOKE, row, "cpu", {"mode": "max-autotune-no-cudagraphs"})
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}]


def test_bench_train_sigterm_writes_the_rows_already_measured(tmp_path, monkeypatch):
    import os
    import signal

    results = tmp_path / "RESULTS.md"
    real_measure = bench_train.measure
    calls = []

    def stopped_on_second(shape, row, device, compile_settings=None):
        calls.append(row)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_measure(shape, row, device, compile_settings)

    monkeypatch.setattr(bench_train, "measure", stopped_on_second)
    with pytest.raises(SystemExit, match="1 row"):
        bench_train.main(["--smoke", "--block", "4", "--results", str(results)])
    text = results.read_text()
    assert "INTERRUPTED (SIGTERM) after 1 of 2 rows" in text and text.count("| 2L | sdpa |") == 1


def test_bench_top_p_smoke_times_both_warpers_and_writes_its_table(tmp_path):
    import bench_top_p

    results = tmp_path / "RESULTS.md"
    rows = bench_top_p.main(["--smoke", "--rows", "4", "--results", str(results)])
    assert len(rows) == 2 and all(row["full_ms"] > 0 and row["candidate_ms"] > 0 for row in rows)
    assert rows[0]["nucleus"] > rows[-1]["nucleus"] >= 1  # flat rows keep more of the vocabulary
    assert "## bench_top_p (smoke, CPU)" in results.read_text()


def test_bench_generate_cpu_rows_sample_too_and_compare_with_greedy():
    cases = [case for case in bench_generate.cpu_cases(8, threads=1)
             if case["name"].startswith("tiny: bd3lm cached, ddpm 16 steps/block")]
    assert [case.get("top_p") for case in cases] == [None, 1.0, 0.9]
    assert bench_generate.decoding(cases[2]) == dict(do_sample=True, top_k=0, top_p=0.9)
    threads = torch.get_num_threads()
    try:
        rows = [bench_generate.run_case(case) for case in cases]  # sets the case's thread count
    finally:
        torch.set_num_threads(threads)
    assert all(row["nfe"] > 0 and row["tokens_per_s"] > 0 for row in rows)
    summary = "\n".join(bench_generate.cpu_summary(rows))
    assert "16 steps/block, sampled / greedy" in summary and "sampled top_p 0.9 / greedy" in summary


def test_bench_top_p_times_the_rows_of_a_saved_models_sampling_steps(tmp_path):
    """--model: the rows its generation hands the top-p warper (recorded by a processor that changes nothing)."""
    import bench_top_p
    from conftest import random_model

    from bd3lm_hf.tokenization import gpt2_tokenizer_with_mask

    folder = tmp_path / "model"
    random_model(seed=2, std=0.05, vocab_size=50258, max_position_embeddings=64, eos_token_id=50256,
                 bos_token_id=50256, pad_token_id=50256).save_pretrained(folder)
    gpt2_tokenizer_with_mask().save_pretrained(folder)
    results = tmp_path / "RESULTS.md"
    (row,) = bench_top_p.main(["--smoke", "--model", str(folder), "--new-tokens", "8", "--results", str(results)])
    assert row["rows"] >= 8 * 4 and row["full_ms"] > 0 and row["candidate_ms"] > 0 and row["differing_rows"] == 0
    assert "sampling steps of" in results.read_text()
