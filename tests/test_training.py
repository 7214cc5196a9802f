"""Training with the stock Trainer: learning on Shakespeare, exact gradient accumulation, 2-process DDP, exact
resume, EMA, clip search, LoRA, CLI."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from bd3lm_hf.callbacks import ClipSearchCallback, candidate_intervals
from bd3lm_hf.data import load_text_dataset, shakespeare_files, wrap_tokenize
from bd3lm_hf.tokenization import train_bpe_tokenizer
from bd3lm_hf.compilation import decoder_layers, should_compile_layers
from bd3lm_hf.ema import EMACallback
from bd3lm_hf.training import BD3LMTrainingConfig, build_model, build_trainer, tokens_trained

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))


# 2 CPU processes over gloo: accelerate's launcher (what `accelerate launch` users run) or torchrun
LAUNCHERS = {
    "accelerate": ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"],
    "torchrun": ["torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
}


def launch_two_processes(script: str, port: int, *script_arguments: str, launcher: str = "accelerate") -> None:
    """Run tests/scripts/`script` in 2 CPU processes; its checks are in the files it writes."""
    command = [sys.executable, "-m", *LAUNCHERS[launcher], str(port), str(SCRIPTS / script), *script_arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def arguments(out, **overrides):
    fields = dict(per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, report_to="none", seed=0,
                  disable_tqdm=True, save_strategy="no", use_cpu=True)
    fields.update(overrides)
    return TrainingArguments(str(out), **fields)


def shakespeare_sets(train_rows: int = 160, eval_rows: int = 32):
    """(train, eval, tokenizer): sequences of 32 tokens of one play, the byte-level BPE (258 ids) trained on it."""
    raw = load_text_dataset(shakespeare_files()[:1])
    tokenizer = train_bpe_tokenizer(raw["text"], 258)  # the smallest: bytes, EOS, [MASK]
    data = wrap_tokenize(raw, tokenizer, 32, 4)
    return data.select(range(train_rows)), data.select(range(160, 160 + eval_rows)), tokenizer


@pytest.fixture(scope="module")
def small_data():
    return shakespeare_sets()


def small_config(**overrides):
    fields = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, cond_dim=16,
                  max_position_embeddings=32, ema_decay=0.9)
    fields.update(overrides)
    return BD3LMTrainingConfig(**fields)


def test_training_on_shakespeare_lowers_the_nelbo(tmp_path):
    """The tiny model of DESIGN.md §5 on 6 plays: held-out NELBO from ~ln(1025) = 6.93 at init (uniform prediction;
    measured 7.02, the 1/t weights make the estimate noisy) to 5.39 after 300 steps (perplexity 219; ~33 s on
    2 CPU cores)."""
    config = BD3LMTrainingConfig(shakespeare_plays=6)
    args = arguments(tmp_path, per_device_train_batch_size=16, per_device_eval_batch_size=64, learning_rate=2e-3,
                     max_steps=300, warmup_steps=30, logging_steps=50)
    trainer = build_trainer(config, args)
    trainer.eval_dataset = trainer.eval_dataset.select(range(256))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    assert abs(before - 6.93) < 0.3
    assert after["eval_loss"] < before - 1.0, (before, after)
    assert after["eval_perplexity"] == pytest.approx(torch.tensor(after["eval_loss"]).exp().item(), rel=1e-6)
    model, tokenizer = trainer.model, trainer.processing_class
    prompt = tokenizer("ROMEO.\n", return_tensors="pt")
    sample = model.generate(**prompt, max_new_tokens=32, do_sample=False)[0, prompt.input_ids.shape[1]:]
    assert len(set(sample.tolist())) > 1, tokenizer.decode(sample)  # not a single repeated token


def test_gradient_accumulation_is_exact(tmp_path):
    """1 x 8 and 4 x 2 micro-batches on the same (pre-noised) data: the same losses and weights."""
    import ddp_train

    ddp_train.main(str(tmp_path / "one"), 8, 1)
    ddp_train.main(str(tmp_path / "four"), 2, 4)
    one, four = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "four"))
    assert one["losses"] == pytest.approx(four["losses"], abs=1e-5)
    assert one["checksum"] == pytest.approx(four["checksum"], rel=1e-7)


def test_two_processes_match_one_process(tmp_path):
    """`accelerate launch` with 2 processes (DDP over gloo on CPU), 4 per device == 1 process with 8."""
    import ddp_train

    ddp_train.main(str(tmp_path / "single"), 8, 1)
    launch_two_processes("ddp_train.py", 29561, str(tmp_path / "ddp"), "4", "1")
    single, ddp = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("single", "ddp"))
    assert ddp["world_size"] == 2
    assert single["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
    assert single["checksum"] == pytest.approx(ddp["checksum"], rel=1e-6)


def test_the_token_count_of_a_run_counts_every_process(tmp_path, monkeypatch):
    """train()'s summary: steps x sequences per step (batch x accumulation x processes) x context."""
    args = arguments(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=5)
    assert tokens_trained(7, args, 32) == 7 * 3 * 5 * 32
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    assert tokens_trained(7, args, 32) == 7 * 3 * 5 * 2 * 32


def test_resume_reproduces_the_uninterrupted_run(tmp_path, small_data):
    train_set, eval_set, tokenizer = small_data

    def run(out, resume=None):
        args = arguments(out, max_steps=10, save_strategy="steps", save_steps=5, eval_strategy="steps",
                         eval_steps=5)
        trainer = build_trainer(small_config(), args, train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut")
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-5"))
    history = [[(h["step"], h.get("loss"), h.get("eval_loss")) for h in t.state.log_history
                if "loss" in h or "eval_loss" in h] for t in (whole, resumed)]
    assert history[0] == history[1]
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):  # EMA weights, copied in at the end
        assert torch.equal(a, b)


def test_every_process_copies_the_ema_weights_and_one_says_so(caplog):
    import logging

    from conftest import random_model

    args = TrainingArguments("unused", report_to="none")
    for main_process in (False, True):
        model, callback = random_model(), EMACallback()
        state = type("State", (), {"global_step": 0, "is_world_process_zero": main_process})
        callback.on_train_begin(args, state, None, model=model)
        callback.shadow = {name: tensor + 1 for name, tensor in callback.shadow.items()}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bd3lm_hf"):
            callback.on_train_end(args, state, None, model=model)
        name, parameter = next(iter(model.named_parameters()))
        assert torch.equal(parameter, callback.shadow[name])
        assert ("copied the EMA weights" in caplog.text) == main_process


def test_ema_follows_the_warmed_up_formula_and_is_what_gets_evaluated():
    from conftest import random_model

    model = random_model()
    callback = EMACallback(decay=0.999)
    args = TrainingArguments("unused", report_to="none")

    class State:
        global_step = 0
        is_world_process_zero = True

    class Control:
        should_evaluate = False

    callback.on_train_begin(args, State, Control, model=model)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        callback.on_step_end(args, State, Control, model=model)
        decay = min(0.999, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            expected[n] = expected[n] - (1 - decay) * (expected[n] - p.detach())
    for n, _ in model.named_parameters():
        torch.testing.assert_close(callback.shadow[n], expected[n])
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    Control.should_evaluate = True
    callback.on_step_end(args, State, Control, model=model)  # swaps the EMA in for the evaluation
    name, parameter = next(iter(model.named_parameters()))
    assert torch.equal(parameter, callback.shadow[name])
    callback.on_evaluate(args, State, Control, model=model)  # and the training weights back
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    assert not torch.equal(parameter, callback.shadow[name])
    callback.on_train_end(args, State, Control, model=model)
    assert torch.equal(parameter, callback.shadow[name])


def test_clip_search_intervals_match_the_paper():
    intervals = candidate_intervals()  # the released runs' widths 0.5, 0.6, ..., 0.9, starts stepping 0.05
    assert len(intervals) == 36 and intervals[0] == (1e-3, 1.0)
    assert len(candidate_intervals(widths=(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9))) == 64
    assert (1e-3, 0.5) in intervals and (0.5, 1.0) in intervals and (0.1, 1.0) in intervals
    assert all(0.5 - 1e-9 <= high - low + (low == 1e-3) * 1e-3 <= 0.9 + 1e-9 for low, high in intervals[1:])


def test_clip_search_picks_the_least_variance_and_saves_it(tmp_path, small_data, monkeypatch):
    train_set, eval_set, tokenizer = small_data
    intervals = [(1e-3, 1.0), (0.2, 0.8), (0.3, 0.9)]
    spread = {(1e-3, 1.0): 3.0, (0.2, 0.8): 0.5, (0.3, 0.9): 1.0}
    import bd3lm_hf.callbacks as callbacks

    def fake_losses(model, x0, attention_mask, keep, interval, *args):
        return torch.tensor([[0.0, spread[interval]]])

    monkeypatch.setattr(callbacks, "per_block_losses", fake_losses)
    args = arguments(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = build_trainer(small_config(clip_search=True, ema_decay=0), args, train_set=train_set,
                            eval_set=eval_set, tokenizer=tokenizer)
    search = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ClipSearchCallback))
    search.intervals, search.num_batches = intervals, 2
    trainer.train()
    assert (trainer.model.config.sampling_eps_min, trainer.model.config.sampling_eps_max) == (0.2, 0.8)
    assert search.collator.train_range == (0.2, 0.8)
    trainer.save_model(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["sampling_eps_min"], saved["sampling_eps_max"]) == (0.2, 0.8)


def test_lora_trains_adapters_only_and_merges_exactly(tmp_path, small_data):
    from peft import PeftModel

    train_set, eval_set, tokenizer = small_data
    config = small_config(lora=True, lora_r=4)
    base = build_model(config, tokenizer)
    with torch.no_grad():  # a non-trivial base (the real init zeroes the head)
        for parameter in base.parameters():
            parameter.normal_(0.0, 0.1)
    base.save_pretrained(tmp_path / "base")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainer = build_trainer(config, arguments(tmp_path / "run", max_steps=5, learning_rate=1e-2),
                            train_set=train_set, eval_set=eval_set, tokenizer=tokenizer, model=base)
    trainer.train()
    peft_model = trainer.model
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters() if "lora_" not in n
               and n in before)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor(train_set[0]["input_ids"])[None]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        reloaded_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", trust_remote_code=True)
        reloaded = PeftModel.from_pretrained(reloaded_base, tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    assert not (expected - torch.zeros_like(expected)).abs().max() < 1e-3


def test_peft_knows_the_default_targets():
    from peft import LoraConfig, get_peft_model

    import bd3lm_hf
    from conftest import random_model

    bd3lm_hf.register_auto_classes()
    peft_model = get_peft_model(random_model(), LoraConfig(r=2))  # no target_modules given
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert names == {"qkv_proj", "o_proj", "fc_in", "fc_out"}


def test_cli_train_runs_and_exports(tmp_path):
    from bd3lm_hf.cli import main

    code = main(["train", "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--shakespeare_plays", "1",
                 "--hidden_size", "32", "--num_hidden_layers", "1", "--cond_dim", "16", "--bpe_vocab_size", "300",
                 "--max_position_embeddings", "32", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
                 "--save_strategy", "no", "--use_cpu", "true"])
    assert code == 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_bd3lm.py", "tokenizer.json"} <= files
    assert "eval_results.json" not in files  # --eval_strategy no without --do_eval: no final pass over held-out data


def test_training_config_bad_input(tmp_path):
    from bd3lm_hf.cli import main

    with pytest.raises(ValueError, match="shakespeare_plays"):
        build_trainer(BD3LMTrainingConfig(shakespeare_plays=41), arguments(tmp_path))
    assert main(["train", "--output_dir", str(tmp_path), "--data", str(tmp_path / "missing.txt")]) == 2


def test_finetuning_keeps_the_base_models_tokenizer(tmp_path, small_data):
    from bd3lm_hf.tokenization import check_tokenizer_fits
    from bd3lm_hf.training import build_tokenizer

    train_set, eval_set, tokenizer = small_data
    base = build_model(small_config(), tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    loaded = build_tokenizer(BD3LMTrainingConfig(init_from=str(tmp_path / "base")), ["other text, other vocabulary"])
    assert loaded.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError, match="50258 tokens, more than the model's vocab_size"):
        check_tokenizer_fits(base, build_tokenizer(small_config(tokenizer="gpt2"), []))
    with pytest.raises(ValueError, match="LoRA|lora=True finetunes a pretrained model"):
        build_trainer(small_config(lora=True), arguments(tmp_path), train_set, eval_set, tokenizer)


def test_ddp_does_not_search_for_unused_parameters_unless_asked(tmp_path, small_data):
    """Every trainable parameter takes part in each step (2-process DDP with False: ddp_train.py, and checked by hand
    for MDLM and LoRA in session 20), so build_trainer turns off DDP's per-step search; an explicit choice stays."""
    train_set, eval_set, tokenizer = small_data
    trainer = build_trainer(small_config(), arguments(tmp_path), train_set, eval_set, tokenizer)
    assert trainer.args.ddp_find_unused_parameters is False
    asked = arguments(tmp_path, ddp_find_unused_parameters=True)
    assert build_trainer(small_config(), asked, train_set, eval_set, tokenizer).args.ddp_find_unused_parameters


def test_lora_without_a_pretrained_model_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    """The refusal needs only the config: it came after loading and tokenizing the corpus."""
    import bd3lm_hf.training as training

    def no_data(config):
        raise AssertionError("the data was read before the LoRA refusal")

    monkeypatch.setattr(training, "load_datasets", no_data)
    with pytest.raises(ValueError, match="lora=True finetunes a pretrained model"):
        build_trainer(small_config(lora=True), arguments(tmp_path))


def test_given_data_without_a_tokenizer_takes_the_configs_or_is_refused(tmp_path, small_data):
    """Tokenized data passed to build_trainer come without their tokenizer: the config's named one (or init_from's)
    is loaded; a BPE trained on the data cannot be rebuilt from ids, so it is asked for (was a TypeError)."""
    train_set, eval_set, tokenizer = small_data
    with pytest.raises(ValueError, match=r"got tokenized data and no tokenizer: pass tokenizer="):
        build_trainer(small_config(), arguments(tmp_path), train_set=train_set, eval_set=eval_set)
    without_mask = train_bpe_tokenizer(["to be or not to be"], 300)
    without_mask.mask_token = None  # was "the tokenizer's mask token id None is not the model's mask_token_id=299"
    with pytest.raises(ValueError, match=r"the tokenizer has no mask token; block diffusion needs one"):
        build_trainer(small_config(), arguments(tmp_path), train_set=train_set, eval_set=eval_set,
                      tokenizer=without_mask)
    build_model(small_config(), tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    trainer = build_trainer(BD3LMTrainingConfig(init_from=str(tmp_path / "base")), arguments(tmp_path / "run"),
                            train_set=train_set, eval_set=eval_set)
    assert trainer.processing_class.get_vocab() == tokenizer.get_vocab()  # saved with every checkpoint
    trainer = build_trainer(small_config(tokenizer="gpt2"), arguments(tmp_path / "gpt2"), train_set=train_set,
                            eval_set=eval_set)
    assert trainer.model.config.vocab_size == len(trainer.processing_class) == 50258


def test_finetuning_from_a_checkpoint_starts_from_its_ema_weights(tmp_path, small_data, caplog):
    """What `bd3lm-hf eval`/`export` of a checkpoint use; under LoRA the raw weights PEFT reloads, with a warning."""
    import logging

    from safetensors.torch import save_file

    from bd3lm_hf.ema import EMA_FILE

    tokenizer = small_data[2]
    build_model(small_config(), tokenizer).save_pretrained(tmp_path / "checkpoint-4")
    raw = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-4", trust_remote_code=True)
    shadow = {name: parameter.detach() + 0.5 for name, parameter in raw.named_parameters()}
    save_file(shadow, str(tmp_path / "checkpoint-4" / EMA_FILE))
    started = build_model(BD3LMTrainingConfig(init_from=str(tmp_path / "checkpoint-4")), tokenizer)
    assert all(torch.equal(parameter, shadow[name]) for name, parameter in started.named_parameters())
    with caplog.at_level(logging.WARNING):
        under_lora = build_model(BD3LMTrainingConfig(init_from=str(tmp_path / "checkpoint-4"), lora=True), tokenizer)
    assert all(torch.equal(parameter, dict(raw.named_parameters())[name])
               for name, parameter in under_lora.named_parameters())
    assert "LoRA finetunes the raw training weights of the checkpoint" in caplog.text


def test_label_smoothing_is_refused_instead_of_replacing_the_nelbo(tmp_path, small_data):
    train_set, eval_set, tokenizer = small_data
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 replaces the block-diffusion NELBO"):
        build_trainer(small_config(), arguments(tmp_path, max_steps=1, label_smoothing_factor=0.1), train_set,
                      eval_set, tokenizer)  # refused when the Trainer is built: evaluate() could come first


def test_sft_finetuning_end_to_end(tmp_path):
    rows = [{"prompt": f"Q{i}: what follows {i}?\nA:", "response": f" {i + 1}, then {i + 2}."} for i in range(64)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = small_config(sft=True, data=[str(tmp_path / "sft.jsonl")], eval_data=[str(tmp_path / "sft.jsonl")],
                          tokenizer="gpt2", max_position_embeddings=32)
    trainer = build_trainer(config, arguments(tmp_path / "run", max_steps=4))
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    prompt_length = trainer.train_dataset[0]["prompt_length"]
    assert (batch["labels"][0, :prompt_length] == -100).all()
    prompt = torch.tensor(trainer.train_dataset[0]["input_ids"][:prompt_length])
    assert torch.equal(batch["input_ids"][0, :prompt_length], prompt)  # the prompt is never noised
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))


def test_sft_batches_pad_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path):
    """Llama-style tokenizers have no pad token: ragged SFT batches crashed at the first step, asking for a
    pad_token_id no flag sets. Padding is masked out, so EOS pads them."""
    from bd3lm_hf.data import sft_tokenize
    from bd3lm_hf.tokenization import gpt2_tokenizer_with_mask

    tokenizer = gpt2_tokenizer_with_mask()
    tokenizer.pad_token = None
    rows = Dataset.from_list([{"prompt": "Q: what follows 1?\nA:", "response": " 2."},
                              {"prompt": "Q: and what follows 2, then 3, then 4?\nA:", "response": " 5, then 6."}])
    data = sft_tokenize(rows, tokenizer, 4, 32)
    trainer = build_trainer(small_config(sft=True, max_position_embeddings=32), arguments(tmp_path, max_steps=1),
                            train_set=data, eval_set=data, tokenizer=tokenizer)
    assert trainer.model.config.pad_token_id is None
    batch = trainer.data_collator([data[0], data[1]])
    short = len(data[0]["input_ids"])
    assert batch["attention_mask"][0, short:].eq(0).all() and batch["labels"][0, short:].eq(-100).all()
    assert batch["input_ids"][0, short:].eq(tokenizer.eos_token_id).all()
    assert trainer.train().global_step == 1


def test_bf16_training_on_cpu(tmp_path, small_data):
    train_set, eval_set, tokenizer = small_data
    trainer = build_trainer(small_config(ema_decay=0), arguments(tmp_path, max_steps=3, bf16=True),
                            train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(loss == loss and loss < 20 for loss in losses)


def test_build_trainer_compiles_layers_on_request(tmp_path, small_data):
    train_set, eval_set, tokenizer = small_data
    for choice, compiled in (("on", True), ("off", False), ("auto", torch.cuda.is_available())):
        trainer = build_trainer(small_config(compile_layers=choice), arguments(tmp_path, max_steps=1),
                                train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
        layers = decoder_layers(trainer.model)
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers), choice
    with pytest.raises(ValueError, match="compile_layers must be one of"):
        should_compile_layers("yes")


def test_training_with_compiled_layers_matches_eager(tmp_path, small_data, monkeypatch, fresh_dynamo):
    """Trainer + compiled decoder layers (+ EMA swaps and evaluations): the same losses as eager. The backend is
    aot_eager here for speed (inductor's numerics: tests/test_compilation.py)."""
    import functools

    import bd3lm_hf.training as training
    from bd3lm_hf.compilation import compile_decoder_layers

    monkeypatch.setattr(training, "compile_decoder_layers",
                        functools.partial(compile_decoder_layers, backend="aot_eager"))
    train_set, eval_set, tokenizer = small_data
    history = {}
    for choice in ("off", "on"):
        trainer = build_trainer(small_config(compile_layers=choice),
                                arguments(tmp_path / choice, max_steps=6, eval_strategy="steps", eval_steps=3),
                                train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
        trainer.train()
        history[choice] = [(h.get("loss"), h.get("eval_loss")) for h in trainer.state.log_history
                           if "loss" in h or "eval_loss" in h]
    assert len(history["on"]) == 8
    for (loss, eval_loss), (expected_loss, expected_eval) in zip(history["on"], history["off"]):
        assert (loss is None) == (expected_loss is None) and (eval_loss is None) == (expected_eval is None)
        if loss is not None:
            assert abs(loss - expected_loss) < 1e-5
        if eval_loss is not None:
            assert abs(eval_loss - expected_eval) < 1e-5


def test_ema_checkpoints_of_fsdp2_sharded_parameters(tmp_path):
    """FSDP2 (fully_shard, 2 processes, gloo): the EMA file holds the full weights, written by one process, and
    resumes sharded as the parameters are (before: the DTensor shadow could not be saved)."""
    launch_two_processes("fsdp_ema.py", 29563, str(tmp_path), launcher="torchrun")
    assert json.loads((tmp_path / "result.json").read_text()) == {"same": True, "sharded": True, "updates": 1,
                                                                  "full_shapes": True}


def test_fsdp2_per_layer_sharding_trains_and_generates_as_the_unsharded_model(tmp_path):
    """Sharded per decoder layer (docs/accelerate/fsdp.yaml): the forward computed every layer's adaLN modulation
    outside the layer's forward, where FSDP had not gathered its weights (crash); generate() likewise, and it may
    now stop at different lengths on different ranks."""
    launch_two_processes("fsdp_forward_and_generate.py", 29569, str(tmp_path), launcher="torchrun")
    for rank in range(2):
        outcome = json.loads((tmp_path / f"result_{rank}.json").read_text())
        assert outcome["tokens_equal"] == {"dynamic": True, "static": True} and outcome["sharded_after_generate"]
        assert outcome["settings_restored"] and outcome["outer_root_refused"]
        assert outcome["loss_difference"] < 1e-6 and outcome["gradient_difference"] < 1e-6 and outcome["loss"] > 1


def test_finetuning_keeps_the_base_models_shape_unless_told(tmp_path, small_data, monkeypatch):
    """Unset, the context and block size are the init_from model's (they were the CLI defaults 64 and 4, which
    re-targeted a block-16 checkpoint); a new model's shape cannot be given with init_from."""
    train_set, eval_set, tokenizer = small_data
    base = build_model(small_config(block_size=8), tokenizer)
    base.save_pretrained(tmp_path / "base")
    config = BD3LMTrainingConfig(init_from=str(tmp_path / "base"))
    assert (config.max_position_embeddings, config.block_size) == (32, 8)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert BD3LMTrainingConfig(init_from="~/base").init_from == str(tmp_path / "base")  # for every later load
    assert BD3LMTrainingConfig(init_from=str(tmp_path / "base"), block_size=4).block_size == 4  # the paper's finetune
    with pytest.raises(ValueError, match="hidden_size describes a new model"):
        BD3LMTrainingConfig(init_from=str(tmp_path / "base"), hidden_size=256)
    with pytest.raises(ValueError, match="longer than the context of init_from"):
        BD3LMTrainingConfig(init_from=str(tmp_path / "base"), max_position_embeddings=33)
    assert BD3LMTrainingConfig(init_from=str(tmp_path / "base"), max_position_embeddings=32).block_size == 8
    fresh = BD3LMTrainingConfig()
    assert (fresh.max_position_embeddings, fresh.block_size, fresh.hidden_size) == (64, 4, 128)


def test_clip_search_noises_as_training_does_resampling_included(monkeypatch):
    """The original's search draws its candidate masks through q_xt, which resamples when training does."""
    import bd3lm_hf.callbacks as callbacks
    from bd3lm_hf import DataCollatorForBlockDiffusion

    seen = []

    def spy(model, x0, attention_mask, keep, interval, *args):
        seen.append(args[-1])
        return torch.zeros(1, 2)

    monkeypatch.setattr(callbacks, "per_block_losses", spy)
    for resample in (True, False):
        collator = DataCollatorForBlockDiffusion(9, 4, resample=resample, seed=0)
        batch = collator([{"input_ids": list(range(8))}])
        ClipSearchCallback(collator, num_batches=1, intervals=[(1e-3, 1.0)]).search(torch.nn.Linear(1, 1), [batch])
    assert seen == [seen[0], None] and seen[0].__func__ is DataCollatorForBlockDiffusion.resample_blocks


def test_clip_search_pools_the_losses_of_all_processes(tmp_path):
    launch_two_processes("clip_search_processes.py", 29565, str(tmp_path), launcher="torchrun")
    assert json.loads((tmp_path / "result.json").read_text()) == {"best": [0.2, 0.8]}


def test_callbacks_under_two_processes_evaluate_alike_before_training_and_save_only_model(tmp_path):
    """evaluate() before train() used one noise stream on every process (the streams were set at train()), so it
    disagreed with the same evaluation after; save_only_model=True crashed on the process that does not save."""
    launch_two_processes("callbacks_processes.py", 29567, str(tmp_path))
    outcome = json.loads((tmp_path / "result.json").read_text())
    assert outcome["world_size"] == 2 and outcome["before"] == outcome["after"]
    assert outcome["saved"] == ["checkpoint-1/collator_state.json", "checkpoint-2/collator_state.json"]


def test_clip_search_runs_once_per_evaluation_on_the_first_split():
    from bd3lm_hf import DataCollatorForBlockDiffusion

    search = ClipSearchCallback(DataCollatorForBlockDiffusion(9, 4), eval_splits=["a", "b"])
    assert search.searches_on({"eval_runtime": 1.0}) and search.searches_on({"eval_a_runtime": 1.0})
    assert not search.searches_on({"eval_b_runtime": 1.0})
    with pytest.raises(ValueError, match="pass eval_splits=list"):
        ClipSearchCallback(DataCollatorForBlockDiffusion(9, 4)).searches_on({"eval_a_runtime": 1.0})


def test_lora_runs_keep_what_their_adapters_carry(tmp_path, small_data, monkeypatch):
    """A LoRA run saves adapters only: config changes they cannot carry are refused, the base is recorded as an
    absolute path (it loads from any working directory), and the EMA covers the adapters."""
    train_set, eval_set, tokenizer = small_data
    base = build_model(small_config(block_size=8), tokenizer)
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="reload on the base model's block_size=8"):
        BD3LMTrainingConfig(init_from=str(tmp_path / "base"), lora=True, block_size=4)
    with pytest.raises(ValueError, match="a LoRA adapter does not carry"):
        BD3LMTrainingConfig(init_from=str(tmp_path / "base"), lora=True, clip_search=True)
    monkeypatch.chdir(tmp_path)
    config = BD3LMTrainingConfig(init_from="./base", lora=True, lora_r=4, ema_decay=0.5)
    assert config.init_from == str((tmp_path / "base").resolve())
    trainer = build_trainer(config, arguments(tmp_path / "run", max_steps=3, learning_rate=1e-2),
                            train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
    ema = [c for c in trainer.callback_handler.callbacks if isinstance(c, EMACallback)]
    assert len(ema) == 1
    trainer.train()
    adapters = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all(torch.equal(p.float(), ema[0].shadow[n]) for n, p in adapters.items())
    trainer.save_model(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((tmp_path / "base").resolve())


@pytest.mark.parametrize("field, value, message", [
    ("ema_decay", -0.5, r"ema_decay must be in \[0, 1\)"), ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
    ("clip_search_batches", 0, "clip_search_batches must be >= 1"),
    ("bpe_vocab_size", 0, "bpe_vocab_size must be >= 258"),
    ("block_size", 0, "block_size must be a positive integer, got 0"),  # was "seq_len=32 is shorter than a block"
    ("num_attention_heads", -4, "num_attention_heads must be a positive integer"),
])
def test_training_settings_that_would_silently_do_nothing_are_refused(field, value, message):
    """ema_decay < 0 turned the EMA off without a word, clip_search_batches=0 "found" the eval range from no data, and
    a BPE below 258 tokens could not hold the bytes, EOS and [MASK]."""
    with pytest.raises(ValueError, match=message):
        small_config(**{field: value})


def test_a_bpe_too_small_for_the_bytes_and_an_empty_clip_search_are_refused():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 258"):
        train_bpe_tokenizer(["some text"], 100)  # it returned 258 tokens, not the 100 asked for
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        ClipSearchCallback(collator=None, num_batches=0)


def test_clip_search_leaves_out_the_ranges_resampling_cannot_meet():
    """With resample=True the collator refuses a range holding no masked fraction k/block_size: a search that picked
    one raised after the whole search, in the middle of training. Such candidates are left out at train begin."""
    from bd3lm_hf import DataCollatorForBlockDiffusion

    collator = DataCollatorForBlockDiffusion(9, 1, resample=True)  # block 1: fractions 0 and 1 only
    search = ClipSearchCallback(collator, intervals=[(0.2, 0.8), (1e-3, 1.0), (0.5, 1.0)])
    evaluating = SimpleNamespace(eval_strategy="steps", eval_on_start=False)
    search.on_train_begin(evaluating, None, None)
    assert search.intervals == [(1e-3, 1.0), (0.5, 1.0)]
    with pytest.raises(ValueError, match="no candidate range holds a masked fraction k/1"):
        ClipSearchCallback(collator, intervals=[(0.2, 0.8)]).on_train_begin(evaluating, None, None)


def test_a_clip_search_in_a_run_without_evaluations_is_refused(tmp_path, small_data):
    """With the stock Trainer and eval_strategy='no' the callback never searched, without a word."""
    from bd3lm_hf import DataCollatorForBlockDiffusion

    train_set, _, tokenizer = small_data
    model = build_model(small_config(), tokenizer)
    collator = DataCollatorForBlockDiffusion(model.config.mask_token_id, 4)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=1, remove_unused_columns=False),
                      train_dataset=train_set, data_collator=collator, callbacks=[ClipSearchCallback(collator)])
    with pytest.raises(ValueError, match=r"eval_strategy='no' \(without eval_on_start\) runs none"):
        trainer.train()
    ClipSearchCallback(collator).on_train_begin(SimpleNamespace(eval_strategy="no", eval_on_start=True), None, None)


def test_clip_search_puts_the_model_back_in_training_mode_after_an_error(small_data):
    from bd3lm_hf.collator import DataCollatorForBlockDiffusion

    train_set, _, tokenizer = small_data
    model = build_model(small_config(), tokenizer).train()
    search = ClipSearchCallback(DataCollatorForBlockDiffusion(model.config.mask_token_id, 4), num_batches=2)

    def broken_loader():
        raise RuntimeError("a data error in the middle of the search")
        yield

    with pytest.raises(RuntimeError, match="data error"):
        search.search(model, broken_loader())
    assert model.training


def test_a_model_compiled_before_the_trainer_is_refused_with_the_way_to_compile(tmp_path, small_data):
    """Trainer reads no label names from torch.compile's wrapper (evaluation lost its eval_loss without a word) and
    its checkpoints and EMA state carried `_orig_mod.` key prefixes; build_trainer crashed on bool(model)."""
    train_set, eval_set, tokenizer = small_data
    compiled = torch.compile(build_model(small_config(), tokenizer), backend="eager")
    with pytest.raises(ValueError, match=r"compiled before Trainer got it.*TrainingArguments\(torch_compile=True\)"):
        build_trainer(small_config(), arguments(tmp_path, max_steps=1), train_set, eval_set, tokenizer,
                      model=compiled)


def test_resume_on_streamed_data_under_two_processes_is_exact(tmp_path):
    """With iterable data accelerate dispatches batches from process 0 (which collates every process's batches) by
    default, and Trainer skips the batches of a resumed run by fetching them: a resumed run must still get the
    uninterrupted run's noise, so its losses and weights (with and without dispatching); with ignore_data_skip the
    data restart, and the noise goes on from where the uninterrupted run's was."""
    launch_two_processes("stream_resume_processes.py", 29571, str(tmp_path))
    outcome = json.loads((tmp_path / "result.json").read_text())
    for name, runs in outcome.items():
        whole, resumed = runs["whole"], runs["resumed"]
        assert resumed["batch_index"] == whole["batch_index"], name
        if "ignore_data_skip=False" in name:
            assert resumed["losses"] == whole["losses"] and len(whole["losses"]) == 6, name  # 1-3 from the checkpoint
            assert resumed["checksum"] == whole["checksum"], name


def test_cli_trains_on_a_streamed_corpus(tmp_path):
    """`--streaming true` reads the data as a stream (tokenized as training reads it): the corpus need not fit in
    memory. What a stream cannot give is refused up front: its length, a BPE trained on it, a held-out split."""
    from bd3lm_hf.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Line {i}: to be, or not to be. " * 3}) for i in range(200)))
    shape = ["--hidden_size", "32", "--num_hidden_layers", "1", "--cond_dim", "16", "--max_position_embeddings", "32",
             "--per_device_train_batch_size", "4", "--save_strategy", "no", "--use_cpu", "true"]
    streaming = ["--data", str(corpus), "--streaming", "true", "--tokenizer", "gpt2"]
    assert main(["train", "--output_dir", str(tmp_path / "out"), *streaming, "--max_steps", "2",
                 "--eval_data", str(corpus), "--eval_strategy", "steps", "--eval_steps", "2", *shape]) == 0
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert metrics["eval_loss"] > 0
    config = small_config(data=[str(corpus)], streaming=True, tokenizer="gpt2")
    with pytest.raises(ValueError, match="a stream has no length, so set max_steps"):
        build_trainer(config, arguments(tmp_path, num_train_epochs=1))
    with pytest.raises(ValueError, match="cannot train a BPE on the data before training"):
        build_trainer(small_config(data=[str(corpus)], streaming=True), arguments(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="holds no sequences out of the stream for evaluation"):
        build_trainer(config, arguments(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1))
    with pytest.raises(ValueError, match="holds no sequences out of the stream for evaluation"):  # a final pass only
        build_trainer(config, arguments(tmp_path, max_steps=2, do_eval=True))
    trainer = build_trainer(config, arguments(tmp_path, max_steps=2))
    assert isinstance(trainer.train_dataset, IterableDataset) and trainer.eval_dataset is None


def test_a_final_evaluation_without_held_out_data_is_refused_before_training(tmp_path, small_data):
    from bd3lm_hf.training import train

    train_set, _, tokenizer = small_data
    with pytest.raises(ValueError, match=r"do_eval=True .* needs held-out data"):
        train(small_config(), arguments(tmp_path, max_steps=2, do_eval=True), train_set=train_set, tokenizer=tokenizer)
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "model.safetensors").exists()


def test_training_data_is_held_out_only_when_the_run_evaluates(tmp_path, caplog):
    """Without do_eval (or eval_on_start) nothing scores a held-out split: the run trains on every sequence (5% were
    set aside unused, and a one-sequence corpus was refused as too small to hold one out); eval_data given to a run
    that does not evaluate is named in a warning."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Line {i}: to be, or not to be. " * 3}) for i in range(60)))
    config = small_config(data=[str(corpus)], tokenizer="gpt2", eval_split=0.1)
    everything = build_trainer(config, arguments(tmp_path, max_steps=1))
    assert everything.eval_dataset is None
    for evaluating in (dict(do_eval=True), dict(eval_on_start=True), dict(eval_strategy="steps", eval_steps=1)):
        split = build_trainer(config, arguments(tmp_path, max_steps=1, **evaluating))
        assert len(split.eval_dataset) == int(0.1 * len(everything.train_dataset)) > 0
        assert len(split.train_dataset) + len(split.eval_dataset) == len(everything.train_dataset)
    one = tmp_path / "one.txt"
    one.write_text(load_text_dataset(shakespeare_files()[:1])["text"][0][:150])
    assert len(build_trainer(small_config(data=[str(one)], tokenizer="gpt2"), arguments(tmp_path)).train_dataset) == 1
    with caplog.at_level(logging.WARNING):
        build_trainer(small_config(data=[str(corpus)], eval_data=[str(corpus)], tokenizer="gpt2"), arguments(tmp_path))
        build_trainer(small_config(data=[str(corpus)], eval_split=0.2, tokenizer="gpt2"), arguments(tmp_path))
    assert "eval_data is given but this run does not evaluate" in caplog.text
    assert "eval_split=0.2 is set but this run does not evaluate" in caplog.text
    for fraction in (0.0, 1.0, 2):  # refused whether or not the run splits
        with pytest.raises(ValueError, match=f"eval_split must be in \\(0, 1\\), got {fraction}"):
            small_config(eval_split=fraction)


def test_a_run_without_evaluation_leaves_no_earlier_runs_metrics(tmp_path, small_data, caplog):
    """`export --metrics OUT/eval_results.json` reads the run's last evaluation: a run into the same folder without
    one must not leave the earlier run's, which described the model it replaced (the card showed it)."""
    from bd3lm_hf.training import train

    train_set, eval_set, tokenizer = small_data
    out = tmp_path / "out"
    train(small_config(), arguments(out, max_steps=1, do_eval=True), train_set=train_set, eval_set=eval_set,
          tokenizer=tokenizer)
    assert "eval_loss" in json.loads((out / "eval_results.json").read_text())
    assert "eval_loss" in json.loads((out / "all_results.json").read_text())
    (out / "all_results.json").write_text(json.dumps({"eval_loss": 5.0, "train_runtime": 1.0}))  # a user's entry
    with caplog.at_level(logging.WARNING):
        train(small_config(), arguments(out, max_steps=2), train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
    assert not (out / "eval_results.json").exists() and "removed" in caplog.text
    assert json.loads((out / "all_results.json").read_text()) == {"train_runtime": 1.0}
    (out / "all_results.json").write_text("[1, 2")  # not Trainer's: left alone, the finished run is not lost
    with caplog.at_level(logging.WARNING):
        train(small_config(), arguments(out, max_steps=1), train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
    assert (out / "all_results.json").read_text() == "[1, 2" and "not a JSON object of metrics" in caplog.text
