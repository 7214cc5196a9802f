"""The `bd3lm-hf` command line turns the usual mistakes into one-line errors (exit code 2), never a traceback."""

import importlib.util
import logging

import pytest
import torch
from conftest import random_model

from bd3lm_hf.cli import main as cli


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


@pytest.fixture
def model_folder(tmp_path):
    random_model().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_on_cuda_without_cuda_is_a_one_line_error(model_folder, capsys):
    assert cli(["generate", str(model_folder), "--prompt", "x", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available" in _one_line_error(capsys)


def test_generate_on_an_unknown_device_is_a_one_line_error(model_folder, capsys):
    assert cli(["generate", str(model_folder), "--prompt", "x", "--device", "gpu0"]) == 2
    assert "--device gpu0 is not a device" in _one_line_error(capsys)


@pytest.mark.parametrize("command", [["generate"], ["eval", "--data", "held_out.txt"]], ids=["generate", "eval"])
@pytest.mark.parametrize("folder", ["./missing_dir", "runs/missing/model", "~/missing_dir"])
def test_a_missing_local_model_folder_is_named(command, folder, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    name, *flags = command
    assert cli([name, folder, *flags]) == 2
    err = _one_line_error(capsys)
    assert f"model folder {folder} does not exist" in err and "Repo id" not in err


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="needs flash-attn to be missing")
def test_train_with_flash_attention_but_no_flash_attn_is_a_one_line_error(tmp_path, capsys):
    code = cli(["train", "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--shakespeare_plays", "1",
                "--hidden_size", "32", "--num_hidden_layers", "1", "--cond_dim", "16", "--bpe_vocab_size", "300",
                "--max_position_embeddings", "32", "--per_device_train_batch_size", "4", "--report_to", "none",
                "--use_cpu", "true", "--attn_implementation", "flash_attention_2"])
    assert code == 2
    assert "flash" in _one_line_error(capsys).lower()


@pytest.mark.parametrize("name, local", [("bd3lm-owt", False), ("kuleshov-group/bd3lm-owt-block_size16", False),
                                         ("./model", True), ("/abs/model", True), ("~/model", True),
                                         ("runs/a/model", True), ("..", True)])
def test_names_that_cannot_be_hub_ids_are_taken_as_local_folders(name, local):
    from bd3lm_hf.loading import looks_like_a_local_path

    assert looks_like_a_local_path(name) is local


def test_owner_slash_name_under_a_local_folder_is_a_missing_folder(tmp_path, monkeypatch, capsys):
    """`out/run` where `out` is a folder here: a typo of a run folder, named as missing (it went to the Hub, and
    offline the error was about the connection)."""
    from bd3lm_hf.loading import looks_like_a_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert looks_like_a_local_path("out/run") and not looks_like_a_local_path("kuleshov-group/bd3lm-owt")
    assert cli(["eval", "out/run", "--data", "held_out.txt"]) == 2
    assert "model folder out/run does not exist (out is a folder here, so out/run was not looked up on the Hub" \
        in _one_line_error(capsys)


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["eval", "--data", "held_out.txt"]],
                         ids=["generate", "eval"])
def test_a_model_folder_without_a_tokenizer_is_named(model_folder, command, capsys):
    name, *flags = command
    assert cli([name, str(model_folder), *flags]) == 2
    err = _one_line_error(capsys)
    assert f"{model_folder} has no tokenizer files" in err and "sentencepiece" not in err


@pytest.mark.parametrize("flag", ["--batch-size", "--max-sequences"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_eval_refuses_counts_below_one(model_folder, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["eval", str(model_folder), "--data", "held_out.txt", flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_nelbo_perplexity_refuses_counts_below_one():
    from bd3lm_hf.evaluation import nelbo_perplexity

    for kwargs in ({"batch_size": 0}, {"max_sequences": 0}, {"batch_size": 2.5}, {"batch_size": True},
                   {"forward_batch_size": 0}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            nelbo_perplexity(None, None, ["held_out.txt"], **kwargs)


def test_a_broken_tokenizer_file_is_not_called_missing(model_folder, capsys):
    (model_folder / "tokenizer_config.json").write_text('{"tokenizer_class": ')
    assert cli(["generate", str(model_folder), "--prompt", "x"]) == 2
    err = _one_line_error(capsys)
    assert "tokenizer of" in err and "could not be loaded" in err and "no tokenizer files" not in err


def test_a_file_given_as_the_model_folder_is_named_a_file(tmp_path, capsys):
    (tmp_path / "model.ckpt").write_bytes(b"not a folder")
    assert cli(["eval", str(tmp_path / "model.ckpt"), "--data", "held_out.txt"]) == 2
    assert "model.ckpt is a file, not a model folder" in _one_line_error(capsys)


@pytest.mark.parametrize("setting, level", [(None, logging.WARNING), ("error", logging.ERROR),
                                            ("INFO", logging.INFO), ("loud", logging.WARNING)])
def test_commands_take_transformers_verbosity_from_its_variable(monkeypatch, setting, level):
    from bd3lm_hf.cli import transformers_verbosity

    if setting is None:
        monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    else:
        monkeypatch.setenv("TRANSFORMERS_VERBOSITY", setting)
    assert transformers_verbosity() == level


def test_train_flags_are_not_abbreviated_and_a_misspelt_one_gets_its_closest(tmp_path, capsys):
    """argparse's prefix matching took `--max_step 2` for --max_steps silently; refused, it named no alternative."""
    assert cli(["train", "--max_step", "2", "--output_dir", str(tmp_path / "run")]) == 2
    assert "unknown arguments for bd3lm-hf train: --max_step (did you mean --max_steps" in _one_line_error(capsys)
    assert cli(["demo", "--hiden-size=8", "--frobnicate", "-1", "--output_dir", str(tmp_path / "run")]) == 2
    error = _one_line_error(capsys)
    assert "bd3lm-hf demo: --hiden-size (did you mean --hidden_size" in error and "--frobnicate (`bd3lm-hf demo" in error
    assert cli(["train", "--max_steps", "2", "3", "--output_dir", str(tmp_path / "run")]) == 2
    assert "unknown arguments for bd3lm-hf train: 3 (" in _one_line_error(capsys)


def test_train_into_a_file_and_ctrl_c_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """Ctrl-C: one line saying whether a checkpoint is left to resume from (the hint was given also when none was),
    exit code 130, no traceback."""
    from transformers import Trainer

    from bd3lm_hf.training import interrupted_message

    (tmp_path / "afile").write_text("")
    assert cli(["train", "--output_dir", str(tmp_path / "afile"), "--use_cpu", "true"]) == 2
    assert f"output_dir={tmp_path / 'afile'} is a file" in _one_line_error(capsys)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    assert cli(["train", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--shakespeare_plays", "1",
                "--bpe_vocab_size", "300", "--hidden_size", "32", "--num_hidden_layers", "1", "--cond_dim", "16",
                "--max_position_embeddings", "32"]) == 130
    assert "interrupted before any checkpoint was saved" in _one_line_error(capsys)
    (tmp_path / "run" / "checkpoint-7").mkdir(parents=True)
    assert interrupted_message(tmp_path / "run") == (
        f"training interrupted: {tmp_path / 'run' / 'checkpoint-7'} is kept; rerun the same command with "
        "--resume_from_checkpoint true to go on from it.")


def test_eval_of_a_folder_without_config_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "held_out.txt").write_text("To be, or not to be")
    assert cli(["eval", str(tmp_path / "empty"), "--data", str(tmp_path / "held_out.txt")]) == 2
    assert "is not a saved model folder (no config.json, no adapter_config.json)" in _one_line_error(capsys)


def test_train_with_a_tokenizer_that_cannot_be_found_is_a_one_line_error(tmp_path, capsys):
    assert cli(["train", "--output_dir", str(tmp_path / "run"), "--tokenizer", "no-such-tokenizer", "--use_cpu",
                "true", "--shakespeare_plays", "1"]) == 2
    assert "the tokenizer of no-such-tokenizer could not be loaded" in _one_line_error(capsys)


def test_a_misspelled_flag_shows_the_commands_own_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["generate", "folder", "--promt", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: bd3lm-hf generate" in err and "unrecognized arguments: --promt x" in err
