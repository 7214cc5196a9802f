"""Trainer's evaluation entry points and resumes with the block-diffusion callbacks: every evaluation (by steps, by
epoch, on start, standalone) sees the evaluation noise on the EMA weights; the best checkpoint's EMA is what
load_best_model_at_end keeps; a run resumed from any folder, or across a clip-range change, is exact."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import bd3lm_hf.callbacks as callbacks
from bd3lm_hf.ema import EMA_FILE, EMACallback
from bd3lm_hf.training import (build_trainer, refuse_earlier_checkpoints, refuse_finished_checkpoint,
                               resume_checkpoint, train)
from test_training import arguments, shakespeare_sets, small_config


@pytest.fixture(scope="module")
def small_data():
    return shakespeare_sets(train_rows=48, eval_rows=16)


def history(trainer, key):
    return [(h["step"], h[key]) for h in trainer.state.log_history if key in h]


def make_trainer(out, small_data, config=None, **fields):
    train_set, eval_set, tokenizer = small_data
    args = arguments(out, per_device_eval_batch_size=8, **fields)
    return build_trainer(config or small_config(eps_min=0.5, eps_max=0.6), args, train_set=train_set,
                         eval_set=eval_set, tokenizer=tokenizer)


@pytest.mark.parametrize("strategy", [dict(eval_strategy="epoch", num_train_epochs=2),
                                      dict(eval_strategy="steps", eval_steps=12, max_steps=24)])
def test_evaluations_in_training_see_the_eval_noise_on_the_ema_weights(tmp_path, small_data, strategy):
    """The last in-training evaluation (EMA swapped in, t over [1e-3, 1], eval batch 0 on) equals a standalone
    evaluate() of the final model (the EMA copied in): same weights, same noise. Training losses do not depend on
    the evaluations (they use no training batch index)."""
    trainer = make_trainer(tmp_path / "eval", small_data, **strategy)
    trainer.train()
    evaluations = history(trainer, "eval_loss")
    assert len(evaluations) == 2 and evaluations[-1][0] == 24
    assert trainer.evaluate()["eval_loss"] == evaluations[-1][1]
    assert trainer.evaluate()["eval_loss"] == evaluations[-1][1]  # every evaluation the same noise
    quiet = make_trainer(tmp_path / "quiet", small_data, **{**strategy, "eval_strategy": "no"})
    quiet.train()
    assert history(quiet, "loss") == history(trainer, "loss")


def test_eval_on_start_sees_the_eval_noise(tmp_path, small_data):
    before = make_trainer(tmp_path / "before", small_data, max_steps=1).evaluate()["eval_loss"]
    trainer = make_trainer(tmp_path / "start", small_data, max_steps=1, eval_on_start=True)
    trainer.train()
    assert history(trainer, "eval_loss")[0] == (0, before)


class RankFirstEvaluationBest(TrainerCallback):
    """Makes the first evaluation the best one (eval_rank = -step, greater is better)."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_rank"] = -state.global_step


def test_load_best_model_at_end_keeps_the_best_checkpoints_ema(tmp_path, small_data):
    trainer = make_trainer(tmp_path, small_data, max_steps=6, eval_strategy="steps", eval_steps=2,
                           save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                           metric_for_best_model="rank", greater_is_better=True)
    trainer.add_callback(RankFirstEvaluationBest)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = load_file(str(tmp_path / "checkpoint-2" / EMA_FILE))
    last = load_file(str(tmp_path / "checkpoint-6" / EMA_FILE))
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, best[name])
    assert any(not torch.equal(best[name], last[name]) for name in best)


def fake_losses(model, x0, attention_mask, keep, interval, *args):
    """Per-block losses whose variance is least for (0.2, 0.8): the clip search moves the range there."""
    return torch.tensor([[0.0, 0.5 if interval == (0.2, 0.8) else 3.0]])


def test_resume_across_a_clip_range_change_is_exact(tmp_path, small_data, monkeypatch):
    """The clip search at step 3 changes the range after the data loader has drawn the next batch with the old
    one: a run resumed from checkpoint-3 draws that batch with the old range too."""
    monkeypatch.setattr(callbacks, "per_block_losses", fake_losses)
    config = small_config(clip_search=True, clip_search_batches=1)

    def run(out, resume=None):
        trainer = make_trainer(out, small_data, config, max_steps=6, eval_strategy="steps", eval_steps=3,
                               save_strategy="steps", save_steps=3)
        search = next(c for c in trainer.callback_handler.callbacks if isinstance(c, callbacks.ClipSearchCallback))
        search.intervals = [(1e-3, 1.0), (0.2, 0.8)]
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    assert whole.data_collator.train_range == (0.2, 0.8)
    run(tmp_path / "cut")
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert history(resumed, "loss") == history(whole, "loss")
    assert history(resumed, "eval_loss") == history(whole, "eval_loss")
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_resume_from_a_folder_outside_output_dir(tmp_path, small_data, caplog):
    """train() hands the folder it resumes from to the callbacks (EMA, collator state); with the stock Trainer and
    no `resume_from`, a missing state is a warning, not a silent restart."""
    whole = make_trainer(tmp_path / "whole", small_data, max_steps=4, save_strategy="steps", save_steps=2)
    whole.train()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "elsewhere")
    train_set, eval_set, tokenizer = small_data
    args = arguments(tmp_path / "new", max_steps=4, save_strategy="steps", save_steps=2,
                     resume_from_checkpoint=str(tmp_path / "elsewhere"))
    summary = train(small_config(eps_min=0.5, eps_max=0.6), args, train_set=train_set, eval_set=eval_set,
                    tokenizer=tokenizer)
    resumed = summary["trainer"]
    assert history(resumed, "loss") == history(whole, "loss")
    ema = next(c for c in resumed.callback_handler.callbacks if isinstance(c, EMACallback))
    assert ema.num_updates == 4
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)

    stock = make_trainer(tmp_path / "stock", small_data, max_steps=4)
    with caplog.at_level("WARNING", logger="bd3lm_hf"):
        stock.train(resume_from_checkpoint=str(tmp_path / "elsewhere"))
    assert "the EMA restarts from the current weights" in caplog.text
    assert "the collator keeps its training clip range" in caplog.text


def test_resuming_from_a_checkpoint_without_ema_says_so(tmp_path, caplog):
    """A checkpoint of an early version holds no EMA file: the warning names that folder, and does not ask to set
    resume_from, which is set."""
    from types import SimpleNamespace

    from conftest import random_model

    (tmp_path / "checkpoint-6").mkdir()
    ema = EMACallback(resume_from=str(tmp_path / "checkpoint-6"))
    args = SimpleNamespace(output_dir=str(tmp_path), eval_on_start=False)
    with caplog.at_level("WARNING", logger="bd3lm_hf"):
        ema.on_train_begin(args, SimpleNamespace(global_step=6), None, model=random_model())
    assert "checkpoint-6, which holds no" in caplog.text and "set EMACallback.resume_from" not in caplog.text


def test_train_refuses_another_runs_checkpoints_and_a_finished_checkpoint(tmp_path, small_data):
    """A new run into a folder holding checkpoints would leave them beside its own (and `--resume_from_checkpoint
    true` would then pick the old run's last); resuming a checkpoint at max_steps trained one step more (Trainer)
    and replaced the finished model. Both are refused before anything is written."""
    train_set, eval_set, tokenizer = small_data
    data = dict(train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    train(small_config(), args, **data)
    weights = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"holds the checkpoints of an earlier run \(checkpoint-2\): resume it"):
        train(small_config(), arguments(tmp_path, max_steps=4), **data)
    finished = arguments(tmp_path, max_steps=2, resume_from_checkpoint="true")
    with pytest.raises(ValueError, match="checkpoint-2 already reached max_steps=2 .step 2.: there is nothing"):
        train(small_config(), finished, **data)
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    longer = train(small_config(), arguments(tmp_path, max_steps=3, resume_from_checkpoint="true"), **data)
    assert longer["steps"] == 3
    (tmp_path / "other" / "checkpoint-best").mkdir(parents=True)  # not a folder Trainer resumes from
    refuse_earlier_checkpoints(tmp_path / "other")


def test_a_checkpoint_at_max_steps_is_refused_whatever_max_steps(tmp_path):
    """One step is a run too: its checkpoint at max_steps=1 is finished. max_steps=-1 (epochs decide) is never
    finished by its step count."""
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    with pytest.raises(ValueError, match="already reached max_steps=1"):
        refuse_finished_checkpoint(checkpoint, arguments(tmp_path, max_steps=1))
    refuse_finished_checkpoint(checkpoint, arguments(tmp_path, max_steps=2))
    refuse_finished_checkpoint(checkpoint, arguments(tmp_path, num_train_epochs=1))


def test_a_checkpoint_is_evaluated_and_exported_with_its_ema_weights(tmp_path, small_data):
    """A checkpoint's model weights are the raw training weights; its EMA sits beside them. Loading a checkpoint
    folder for `eval`/`generate`/`export` uses the EMA, as training's evaluation and final save do: the last
    checkpoint then equals the final model."""
    from bd3lm_hf.cli import load_for_inference
    from bd3lm_hf.conversion import convert_to_original
    from bd3lm_hf.loading import load_for_export

    train_set, eval_set, tokenizer = small_data
    train(small_config(), arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
          train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
    final = load_file(tmp_path / "model.safetensors")
    raw = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(raw[name], final[name]) for name in final)  # EMA differs from the training weights
    for model in (load_for_export(tmp_path / "checkpoint-2")[0], load_for_inference(str(tmp_path / "checkpoint-2"))[0]):
        assert all(torch.equal(model.state_dict()[name], final[name]) for name in final)
    convert_to_original(tmp_path / "checkpoint-2", tmp_path / "original_checkpoint")
    convert_to_original(tmp_path, tmp_path / "original_final")
    converted = [load_file(tmp_path / name / "model.safetensors") for name in ("original_checkpoint", "original_final")]
    assert all(torch.equal(converted[0][key], converted[1][key]) for key in converted[1])


def test_resume_checkpoint_resolution(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    args = arguments(tmp_path, resume_from_checkpoint="true")
    assert resume_checkpoint(args) == str(tmp_path / "checkpoint-3")
    assert resume_checkpoint(arguments(tmp_path)) is None
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        resume_checkpoint(arguments(tmp_path, resume_from_checkpoint=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no checkpoint found"):
        resume_checkpoint(arguments(tmp_path / "empty", resume_from_checkpoint="last"))


def test_cli_reads_resume_from_checkpoint(tmp_path):
    from bd3lm_hf.cli import main

    assert main(["train", "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(tmp_path / "missing"),
                 "--shakespeare_plays", "1", "--bpe_vocab_size", "300", "--use_cpu", "true"]) == 2


def test_remove_unused_columns_is_refused(tmp_path, small_data):
    trainer = make_trainer(tmp_path, small_data, max_steps=1)
    trainer.args.remove_unused_columns = True
    with pytest.raises(ValueError, match="remove_unused_columns=True drops the `prompt_length` column"):
        trainer.train()


def test_every_split_of_a_dict_eval_dataset_sees_the_eval_noise_on_the_ema_weights(tmp_path, small_data):
    """Trainer evaluates a dict split after split (on_evaluate after each): the evaluation noise and the EMA weights
    last until the last split, so two copies of one split score the same, and as a standalone evaluate()."""
    train_set, eval_set, tokenizer = small_data
    args = arguments(tmp_path, per_device_eval_batch_size=8, max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer = build_trainer(small_config(eps_min=0.5, eps_max=0.6), args, train_set=train_set,
                            eval_set={"a": eval_set, "b": eval_set}, tokenizer=tokenizer)
    trainer.train()
    assert len(history(trainer, "eval_b_loss")) == 2
    assert history(trainer, "eval_a_loss") == history(trainer, "eval_b_loss")
    assert history(trainer, "eval_a_perplexity") == history(trainer, "eval_b_perplexity")
    assert trainer.evaluate(eval_set)["eval_loss"] == history(trainer, "eval_b_loss")[-1][1]
    single = make_trainer(tmp_path / "single", small_data, max_steps=4, eval_strategy="steps", eval_steps=2)
    single.train()
    assert history(single, "loss") == history(trainer, "loss")  # training noise untouched by the evaluations

    stock = make_trainer(tmp_path / "stock", small_data, max_steps=2, eval_strategy="steps", eval_steps=2)
    stock.eval_dataset = {"a": eval_set, "b": eval_set}  # callbacks built without eval_splits
    with pytest.raises(ValueError, match="pass eval_splits=list"):
        stock.train()


def test_resume_is_exact_when_an_epoch_ends_inside_an_accumulation(tmp_path, small_data):
    """12 batches per epoch with gradient_accumulation_steps=5: steps of 5, 5, 2 batches. Resumed at step 4 (epoch
    2), the collator continues at batch 12 + 5 = 17, as Trainer skips the data, not at 4 x 5 = 20."""
    def run(out, resume=None):
        trainer = make_trainer(out, small_data, num_train_epochs=2, gradient_accumulation_steps=5,
                               save_strategy="steps", save_steps=4)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-4"))
    assert len(history(whole, "loss")) == 6
    assert history(resumed, "loss") == history(whole, "loss")
    assert resumed.data_collator.batch_index["train"] == whole.data_collator.batch_index["train"] == 24


@pytest.mark.parametrize("fields, message", [
    (dict(neftune_noise_alpha=5.0), "neftune_noise_alpha=5.0 would add noise to the clean x_0 half"),
    (dict(dataloader_num_workers=1), "dataloader_num_workers=1: the block-diffusion collator"),
])
def test_arguments_that_change_the_objective_or_the_noise_are_refused(tmp_path, small_data, fields, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, small_data, max_steps=1, **fields)  # refused when the Trainer is built


def test_dataloader_workers_are_refused_for_evaluation_too(tmp_path, small_data):
    """In a worker the collator's batch index and mode are a copy: evaluate() gave other numbers at every call."""
    from torch.utils.data import DataLoader

    from bd3lm_hf import DataCollatorForBlockDiffusion

    with pytest.raises(ValueError, match="dataloader_num_workers=1: the block-diffusion collator"):
        make_trainer(tmp_path, small_data, dataloader_num_workers=1)  # at construction: evaluate() may come first
    rows = [{"input_ids": list(range(8))}] * 4
    collator = DataCollatorForBlockDiffusion(9, 4, seed=0)
    with pytest.raises(ValueError, match=r"seed=0\) draws its noise in the main process"):
        list(DataLoader(rows, batch_size=2, num_workers=1, collate_fn=collator))
    with_generator = DataCollatorForBlockDiffusion(9, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"generator=...\) draws its noise in the main process"):  # copies repeat
        list(DataLoader(rows, batch_size=2, num_workers=2, collate_fn=with_generator))
    unseeded = DataCollatorForBlockDiffusion(9, 4)  # the workers' own random noise, as asked
    assert len(list(DataLoader(rows, batch_size=2, num_workers=1, collate_fn=unseeded))) == 2


def test_train_saves_the_training_dtype_whatever_the_eval_dtype(tmp_path, small_data):
    train_set, eval_set, tokenizer = small_data
    args = arguments(tmp_path, max_steps=1, bf16_full_eval=True)
    train(small_config(), args, train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}


def test_a_custom_compute_loss_func_is_refused(tmp_path, small_data):
    """Trainer pops the labels when compute_loss_func is set: the model would train on x_t predictions (no 2L pass)
    instead of its NELBO; the training forward refuses noise_levels without labels."""
    trainer = make_trainer(tmp_path, small_data, max_steps=1)
    trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: outputs.logits.mean()
    with pytest.raises(ValueError, match="Trainer removes them when compute_loss_func"):
        trainer.train()


def test_clip_search_runs_at_evaluations_during_training_only(tmp_path, small_data, monkeypatch):
    """train() saves, then evaluates: a search at that last evaluation would change a config no longer saved (and
    report a range on the model card the saved model does not hold)."""
    monkeypatch.setattr(callbacks, "per_block_losses", fake_losses)
    train_set, eval_set, tokenizer = small_data
    config = small_config(clip_search=True, clip_search_batches=1)
    args = arguments(tmp_path, per_device_eval_batch_size=8, max_steps=3, eval_strategy="steps", eval_steps=2)
    summary = train(config, args, train_set=train_set, eval_set=eval_set, tokenizer=tokenizer)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["sampling_eps_min"], saved["sampling_eps_max"]) == pytest.approx((0.2, 0.8))
    assert "eval_sampling_eps_min" not in json.loads((tmp_path / "eval_results.json").read_text())
    assert summary["trainer"].model.config.sampling_eps_min == pytest.approx(0.2)
    with pytest.raises(ValueError, match="clip_search=True searches at evaluations during training"):
        build_trainer(config, arguments(tmp_path / "no-eval"), train_set=train_set, eval_set=eval_set,
                      tokenizer=tokenizer)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_on_a_streamed_train_set_is_exact(tmp_path, small_data, accumulation):
    """A data loader over an iterable dataset (`streaming=True`, `to_iterable_dataset()`) has no sampler to skip in:
    Trainer fetches the batches it skips, through the collator, whose batch index was already past them. Each resumed
    batch then got the noise of another index (losses differed from the first resumed step)."""
    train_set, eval_set, tokenizer = small_data
    streamed = (train_set.to_iterable_dataset(num_shards=4), eval_set, tokenizer)

    def run(out, resume=None):
        trainer = make_trainer(out, streamed, max_steps=6, gradient_accumulation_steps=accumulation,
                               save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut")
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert history(resumed, "loss") == history(whole, "loss")
    assert resumed.data_collator.batch_index["train"] == whole.data_collator.batch_index["train"]
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_state_files_without_their_fields_are_refused_by_name(tmp_path):
    """A hand-made or truncated checkpoint state gave a KeyError (or a TypeError for a file without metadata)."""
    from safetensors.torch import save_file

    from bd3lm_hf.collator import DataCollatorForBlockDiffusion

    callback = EMACallback()
    callback.shadow = {"weight": torch.zeros(2)}
    save_file({"weight": torch.ones(2)}, str(tmp_path / EMA_FILE))  # no metadata
    with pytest.raises(ValueError, match=f"{EMA_FILE} has no num_updates"):
        callback.load(tmp_path / EMA_FILE)
    save_file({"weight": torch.ones(2)}, str(tmp_path / EMA_FILE), metadata={"num_updates": "7"})
    callback.load(tmp_path / EMA_FILE)
    assert callback.num_updates == 7 and torch.equal(callback.shadow["weight"], torch.ones(2))

    resumed = callbacks.BlockDiffusionCallback(DataCollatorForBlockDiffusion(mask_token_id=3, block_size=4))
    state = tmp_path / callbacks.COLLATOR_STATE
    state.write_text(json.dumps({"batch_index": 3}))
    with pytest.raises(ValueError, match="holds neither range_changes nor train_range"):
        resumed.restore(state)
    state.write_text(json.dumps({"train_range": [0.3, 0.8]}))  # an older checkpoint's single range
    resumed.restore(state)
    assert resumed.collator.range_changes == [(0, (0.3, 0.8))]
