"""Hub export and push, model cards, and the demo's steps (shortened)."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import random_model
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from bd3lm_hf.cli import main as cli
from bd3lm_hf.hub import HubError, export_for_hub, push_to_hub
from bd3lm_hf.model_card import PAPER_CHECKPOINTS, card_for_repo, paper_card
from bd3lm_hf.tokenization import gpt2_tokenizer_with_mask
from test_hub_folder import BLOCK_IMPORT

EXPECTED_FILES = ["README.md", "cache_bd3lm.py", "config.json", "configuration_bd3lm.py", "diffusion_bd3lm.py",
                  "fsdp_bd3lm.py", "generation_bd3lm.py", "generation_config.json", "generation_config_bd3lm.py",
                  "masking_bd3lm.py", "model.safetensors", "modeling_bd3lm.py", "sampling_bd3lm.py", "tokenizer.json",
                  "tokenizer_config.json"]


def gpt2_vocabulary_model():
    """A tiny model over GPT-2's vocabulary + [MASK], with its special tokens: it fits gpt2_tokenizer_with_mask()."""
    return random_model(seed=3, std=0.05, vocab_size=50258, max_position_embeddings=64, eos_token_id=50256,
                        bos_token_id=50256, pad_token_id=50256)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "tiny-bd3lm"
    model = gpt2_vocabulary_model()
    export_for_hub(model, gpt2_tokenizer_with_mask(), folder, repo_id="someone/tiny-bd3lm",
                   metrics={"eval_nelbo": 5.2, "eval_perplexity": 181.27}, datasets=["shakespeare"])
    return folder


def test_export_writes_exactly_the_hub_files(exported):
    assert sorted(p.name for p in exported.iterdir()) == EXPECTED_FILES
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_bd3lm.BD3LMForBlockDiffusion"


def test_card_metadata_parses(exported):
    card = ModelCard.load(exported / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"block-diffusion", "custom_code"} <= set(data["tags"])
    assert data["license"] == "apache-2.0" and data["datasets"] == ["shakespeare"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 181.27
    assert 'from_pretrained("someone/tiny-bd3lm", trust_remote_code=True)' in card.text


def test_a_run_without_final_evaluation_gets_no_empty_metrics_table(tmp_path):
    """`bd3lm-hf demo --do_eval false` (or `export --metrics` of a file with nulls) has no numeric metric: the card
    leaves the evaluation section out instead of an empty table."""
    folder = export_for_hub(gpt2_vocabulary_model(), gpt2_tokenizer_with_mask(), tmp_path / "no-eval",
                            metrics={"eval_nelbo": None, "eval_perplexity": None})
    card = (folder / "README.md").read_text()
    assert "## Evaluation (last run)" not in card and "model-index" not in card


def test_integer_metrics_are_in_the_cards_table(tmp_path):
    """A hand-written metrics file may hold ints: the table shows every number (it kept floats only)."""
    folder = export_for_hub(gpt2_vocabulary_model(), gpt2_tokenizer_with_mask(), tmp_path / "ints",
                            metrics={"eval_perplexity": 12, "eval_samples": 123456, "flag": True})
    card = (folder / "README.md").read_text()
    assert "| eval_perplexity | 12 |" in card and "| eval_samples | 123456 |" in card and "| flag |" not in card


def test_the_cards_table_shows_the_perplexity_of_its_model_index(tmp_path):
    """The table rounded to 4 significant digits (160.1) where model-index keeps 3 decimals (160.123): one rule now,
    with small values kept to 3 significant digits."""
    folder = export_for_hub(gpt2_vocabulary_model(), gpt2_tokenizer_with_mask(), tmp_path / "digits",
                            metrics={"eval_perplexity": 160.12345, "eval_loss": 0.000123456, "eval_nelbo": 5.07551})
    card = ModelCard.load(folder / "README.md")
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 160.123
    assert "| eval_perplexity | 160.123 |" in card.text and "| eval_nelbo | 5.076 |" in card.text
    assert "| eval_loss | 0.000123 |" in card.text


def test_card_snippets_run_on_the_folder_without_the_package(exported, tmp_path):
    """The usage, then the finetuning snippet (LoRA, the loss from the folder's own noising functions)."""
    card = ModelCard.load(exported / "README.md").text
    snippets = [block.split("```", 1)[0] for block in card.split("```python\n")[1:]]
    assert len(snippets) == 2
    check = textwrap.dedent("""
        assert torch.isfinite(loss) and loss > 0
        trained = [p for p in model.parameters() if p.requires_grad]
        assert trained and all(p.grad is not None for p in trained) and len(trained) < 30  # the adapters only
        print("finetuning loss", float(loss))
    """)
    script = BLOCK_IMPORT + "\n".join(snippets).replace("someone/tiny-bd3lm", str(exported)) + check
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model calls:" in result.stdout and "finetuning loss" in result.stdout
    assert "sequence length is longer than" not in result.stderr  # the finetuning text is cut to one context


def test_exported_folder_generates_in_a_fresh_process(exported, tmp_path):
    script = BLOCK_IMPORT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(exported)!r}, trust_remote_code=True)
        out = model.generate(**tokenizer(["To be", "Friends, Romans"], return_tensors="pt", padding=True),
                             max_new_tokens=8, return_dict_in_generate=True)
        assert out.sequences.shape[1] >= 8 and out.nfe > 0
        print("OK")
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_dry_run_lists_exactly_the_files_and_the_card(exported, capsys):
    assert cli(["push", str(exported), "someone/tiny-bd3lm", "--dry-run", "--private"]) == 0
    out = capsys.readouterr().out
    listed = [line.strip() for line in out.split("--- README.md")[0].splitlines()[1:]]
    assert listed == EXPECTED_FILES
    assert "private" in out.splitlines()[0] and "library_name: transformers" in out


def test_push_without_a_token_is_a_clear_error(exported, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no cached token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError, match="no Hugging Face token found"):
        push_to_hub(exported, "someone/tiny-bd3lm")


def test_push_failure_never_shows_the_token(exported, monkeypatch, tmp_path, capfd):
    secret = "hf_thisIsASecretToken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    card = (exported / "README.md").read_text()
    assert cli(["push", str(exported), "someone-else/tiny-bd3lm"]) == 2  # offline: the upload fails
    captured = capfd.readouterr()
    assert "push to someone-else/tiny-bd3lm failed" in captured.err
    assert secret not in captured.out + captured.err and "Traceback" not in captured.err
    assert (exported / "README.md").read_text() == card  # nothing pushed: the card still names its own repo


def test_a_push_error_quoting_the_token_is_redacted(exported, monkeypatch):
    """Offline, the error above never held the token: here the Hub's error quotes it (as a request's headers
    might), and the message shows *** instead."""
    import huggingface_hub

    secret = "hf_anotherSecretToken0987654321"

    def create_repo(self, *args, **kwargs):
        raise RuntimeError(f"401 Unauthorized: Authorization: Bearer {secret}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    with pytest.raises(HubError) as error:
        push_to_hub(exported, "someone/tiny-bd3lm", token=secret)
    assert secret not in str(error.value) and "Bearer ***" in str(error.value)


@pytest.mark.parametrize("repo_id", ["no-namespace", "bad//slashes", "white space/x", "a/b" + "c" * 100])
def test_invalid_repo_ids(exported, repo_id, tmp_path):
    with pytest.raises(HubError, match="invalid repo id"):
        push_to_hub(exported, repo_id, dry_run=True)
    with pytest.raises(HubError, match="invalid repo id"):  # export writes it into the card's snippets
        export_for_hub(random_model(vocab_size=50258), gpt2_tokenizer_with_mask(), tmp_path / "out", repo_id=repo_id)
    assert not (tmp_path / "out").exists()


def test_push_names_what_a_folder_lacks(exported, tmp_path):
    """A converted folder has a config.json but no card: the error names only the card."""
    import shutil

    shutil.copytree(exported, tmp_path / "folder")
    (tmp_path / "folder" / "README.md").unlink()
    with pytest.raises(HubError, match=r"is not an exported folder \(no README.md\)"):
        push_to_hub(tmp_path / "folder", "me/x", dry_run=True)
    with pytest.raises(HubError, match=r"\(no config.json / README.md\)"):
        push_to_hub(tmp_path / "empty", "me/x", dry_run=True)


def test_export_refuses_an_existing_folder_and_a_missing_tokenizer(exported, tmp_path):
    model = random_model(vocab_size=50258)  # fits the GPT-2 + [MASK] tokenizer
    with pytest.raises(HubError, match="exists and is not empty"):
        export_for_hub(model, gpt2_tokenizer_with_mask(), exported)
    with pytest.raises(HubError, match="needs the tokenizer"):
        export_for_hub(model, None, tmp_path / "new")
    model.save_pretrained(tmp_path / "bare")
    assert cli(["export", str(tmp_path / "bare"), str(tmp_path / "out")]) == 2  # no tokenizer in the folder


def test_export_writes_use_cache_true_whatever_training_left(tmp_path):
    """Trainer leaves use_cache=False in the config (TrainingArguments.use_cache): generation here ignores it, and
    the exported config says True for the code of earlier versions, which followed it."""
    model = random_model(vocab_size=50258)
    model.config.use_cache = False
    export_for_hub(model, gpt2_tokenizer_with_mask(), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True


def test_export_cli_overwrites_only_when_asked(exported, tmp_path):
    assert cli(["export", str(exported), str(tmp_path / "again")]) == 0
    assert cli(["export", str(exported), str(tmp_path / "again")]) == 2
    assert cli(["export", str(exported), str(tmp_path / "again"), "--overwrite"]) == 0


@pytest.mark.parametrize("name", sorted(PAPER_CHECKPOINTS))
def test_paper_cards_are_committed_and_current(name):
    from pathlib import Path

    committed = Path(__file__).parents[1] / "model_cards" / f"{name}.md"
    assert committed.read_text() == str(paper_card(name)), "run: python model_cards/render_paper_cards.py"
    card = ModelCard.load(committed)
    assert card.data.library_name == "transformers" and "block-diffusion" in card.data.tags
    assert "169,627,218" in card.text and f"bd3lm-hf convert {name}" in card.text and "20.73" in card.text


def test_export_overwrite_into_the_working_directory_empties_it_and_exports(exported, tmp_path, monkeypatch):
    """`.` cannot be removed: the folder's contents go, then the export is written (it emptied it, then failed)."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "old.txt").write_text("a previous export's file")
    monkeypatch.chdir(tmp_path / "cwd")
    assert cli(["export", str(exported), ".", "--overwrite"]) == 0
    assert (tmp_path / "cwd" / "model.safetensors").is_file() and not (tmp_path / "cwd" / "old.txt").exists()
    (tmp_path / "cwd" / ".git").mkdir()  # a repository is never emptied
    assert cli(["export", str(exported), ".", "--overwrite"]) == 2
    assert (tmp_path / "cwd" / ".git").is_dir() and (tmp_path / "cwd" / "model.safetensors").is_file()


def test_demo_refuses_an_export_dir_holding_other_files_before_training(tmp_path, exported):
    from bd3lm_hf.demo import check_export_dir
    from bd3lm_hf.demo import main as demo

    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.txt").write_text("not a model")
    with pytest.raises(ValueError, match="holds files that are not an exported model folder"):
        demo(["--export_dir", str(tmp_path / "thesis"), "--output_dir", str(tmp_path / "run")])
    assert (tmp_path / "thesis" / "chapter1.txt").is_file() and not (tmp_path / "run").exists()  # nothing trained
    check_export_dir(str(exported))  # an earlier export is replaced
    check_export_dir(str(tmp_path / "new"))
    # a training run's folder holds a BD3-LM config.json too, beside its checkpoints and results: never emptied
    for extra in ("checkpoint-4", "training_args.bin", "eval_results.json"):
        training_run = shutil.copytree(exported, tmp_path / extra / "run")
        if extra.startswith("checkpoint"):
            shutil.copytree(exported, training_run / extra)
        else:
            (training_run / extra).write_text("{}")
        with pytest.raises(ValueError, match="a training run's checkpoints or results"):
            check_export_dir(str(training_run))
    for export_dir, output_dir in (("root", "root/run"), ("root/run/export", "root/run"), ("same", "same")):
        with pytest.raises(ValueError, match="overlap: the export replaces its folder's contents"):
            demo(["--export_dir", str(tmp_path / export_dir), "--output_dir", str(tmp_path / output_dir)])
    assert not (tmp_path / "root").exists()  # refused before training
    repository = shutil.copytree(exported, tmp_path / "repository")
    (repository / ".git").mkdir()  # refused before training, not after it
    with pytest.raises(ValueError, match=r"holds a git repository \(.git\)"):
        demo(["--export_dir", str(repository), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):  # argparse's choices: refused before training
        demo(["--sampler", "greedy", "--output_dir", str(tmp_path / "run")])
    own_text = tmp_path / "own.txt"
    own_text.write_text("To be, or not to be: that is the question.\n" * 50)
    with pytest.raises(ValueError, match="pass --eval_data with --data"):  # was found after training and export
        demo(["--data", str(own_text), "--output_dir", str(tmp_path / "run"), "--export_dir", str(tmp_path / "e")])
    assert not (tmp_path / "run").exists() and not (tmp_path / "e").exists()


def test_demo_steps_run_shortened(tmp_path):
    from bd3lm_hf.data import shakespeare_files
    from bd3lm_hf.demo import main as demo

    held_out = tmp_path / "held_out.txt"
    held_out.write_text(shakespeare_files()[5].read_text()[:20_000])
    result = demo(["--max_steps", "10", "--shakespeare_plays", "1", "--eval_data", str(held_out),
                   "--hidden_size", "32", "--num_hidden_layers",
                   "1", "--cond_dim", "16", "--bpe_vocab_size", "300", "--max_position_embeddings", "32",
                   "--output_dir", str(tmp_path / "run"), "--export_dir", str(tmp_path / "export"),
                   "--eval_sequences", "8", "--max_new_tokens", "8", "--prompts", "ROMEO.\n",
                   "--wrap_framed", "true", "--ignore_first_token", "true"])
    out = result["evaluation"] + result["samples"]
    assert "NELBO" in out and "perplexity <=" in out and "model calls (NFE)" in out and "tokens/s" in out
    assert "(248 tokens, 8 sequences)" in out  # the fresh process evaluates in the trained layout: 31 scored each
    assert (tmp_path / "export" / "README.md").is_file() and result["summary"]["steps"] == 10
    assert result["summary"]["eval_nelbo"] > 0  # the demo's --do_eval true: a final pass for the card's metrics


def test_export_refuses_a_tokenizer_that_does_not_fit_the_model(tmp_path):
    with pytest.raises(HubError, match="50258 tokens, more than the model's vocab_size=50"):
        export_for_hub(random_model(), gpt2_tokenizer_with_mask(), tmp_path / "small")
    with pytest.raises(HubError, match="mask token id 50257 is not the model's mask_token_id=50259"):
        export_for_hub(random_model(vocab_size=50260), gpt2_tokenizer_with_mask(), tmp_path / "other_mask")
    assert not (tmp_path / "small").exists() and not (tmp_path / "other_mask").exists()


def test_exported_tokenizer_truncates_to_the_longest_prompt_and_has_no_load_flags(exported, tmp_path):
    from transformers import AutoTokenizer

    assert cli(["export", str(exported), str(tmp_path / "again")]) == 0  # its tokenizer was loaded from a folder
    saved = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 63 and not {"is_local", "local_files_only"} & set(saved)  # context 64
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert len(tokenizer("word " * 100, truncation=True)["input_ids"]) == 63


def test_pipeline_truncation_keeps_the_end_of_a_prompt_longer_than_the_context(exported):
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(exported), trust_remote_code=True)
    text = " ".join(f"word{i}" for i in range(60))  # 120 tokens, the context is 64
    ids = generator.tokenizer(text)["input_ids"]
    out = generator(text, truncation=True, max_new_tokens=8, do_sample=False, return_tensors=True)
    generated = out[0]["generated_token_ids"]
    assert generated[:63] == ids[-63:] and len(generated) > 63  # the model continued the prompt's last 63 tokens


def test_export_cli_names_a_missing_model_folder_and_a_file_as_output(exported, tmp_path, capfd):
    assert cli(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope does not exist" in capfd.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli(["export", str(exported), str(tmp_path / "file")]) == 2
    err = capfd.readouterr().err
    assert "file exists and is not a folder" in err and "Traceback" not in err


def _generate_args(*flags):
    from bd3lm_hf.cli import build_parser

    return build_parser().parse_args(["generate", "folder", *flags])


def test_generate_cli_takes_what_the_model_saved_unless_a_flag_is_given():
    from transformers import GenerationConfig

    from bd3lm_hf.cli import generation_options

    saved = GenerationConfig(max_new_tokens=12)
    saved.sampler, saved.num_steps = "first_hitting", 2  # custom fields load as plain attributes
    assert generation_options(_generate_args(), saved) == {"do_sample": True, "top_p": 0.9, "temperature": 1.0,
                                                           "top_k": 0}
    assert generation_options(_generate_args("--sampler", "ddpm", "--max-new-tokens", "5", "--num-steps", "0"),
                              saved) == {"do_sample": True, "top_p": 0.9, "temperature": 1.0, "top_k": 0,
                                         "sampler": "ddpm", "max_new_tokens": 5, "num_steps": 0}
    greedy = GenerationConfig(do_sample=False)
    assert generation_options(_generate_args(), greedy) == {"max_new_tokens": 64, "sampler": "ddpm"}
    assert generation_options(_generate_args(), GenerationConfig()) == {  # the CLI's documented defaults
        "max_new_tokens": 64, "sampler": "ddpm", "do_sample": True, "top_p": 0.9, "temperature": 1.0, "top_k": 0}


def test_generate_cli_passes_num_steps_zero_on_to_be_refused(exported):
    assert cli(["generate", str(exported), "--prompt", "To be", "--num-steps", "0", "--device", "cpu"]) == 2


def test_sampled_token_count_is_that_of_the_generated_ids(exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bd3lm_hf.evaluation import sample_with_pipeline

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    equals = tokenizer.convert_tokens_to_ids("=")
    with torch.no_grad():
        model.lm_head.bias[equals] = 1e4  # 16 generated "=" decode to a text that re-tokenizes into one token
    result = sample_with_pipeline(model, tokenizer, ["To be"], max_new_tokens=16, do_sample=False)
    assert result["texts"] == ["=" * 16] and result["new_tokens"] == 16
    # an empty prompt starts from BOS (here = EOS), which is not a new token: it counted 0 new tokens
    result = sample_with_pipeline(model, tokenizer, [""], max_new_tokens=16, do_sample=False)
    assert result["texts"] == ["=" * 16] and result["new_tokens"] == 16


def test_sampling_with_a_bert_style_tokenizer_continues_the_prompt_and_prints_the_decoded_text():
    """The paper's LM1B vocabulary is BERT's: its tokenizer ends every text with [SEP] (EOS), so each prompt ended
    its document; and the new ids decoded alone lost the space WordPiece reads in front of a first piece
    ("to be" + "or not" printed "to beor not"). Prompts now go in as [CLS] + text, and the text after the prompt is
    cut from the whole decoded sequence, as the pipeline's return_full_text=False does."""
    import torch
    from conftest import bert_style_tokenizer

    from bd3lm_hf.evaluation import sample_with_pipeline

    tokenizer = bert_style_tokenizer()
    model = random_model(seed=3, std=0.1, vocab_size=len(tokenizer), mask_token_id=4, bos_token_id=2,
                         eos_token_id=3, pad_token_id=0)
    words = tokenizer("or", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.lm_head.bias[words[0]] = 1e4  # every new token is the word "or"
    given = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: given.append(kwargs["input_ids"]) or generate(*args, **kwargs)
    result = sample_with_pipeline(model, tokenizer, ["to be,"], max_new_tokens=4, do_sample=False)
    assert given[0][0].tolist() == tokenizer("to be,")["input_ids"][:-1]  # [CLS] to be , (no [SEP])
    assert result["texts"] == [" or or or or"] and result["new_tokens"] == 4


@pytest.mark.parametrize("layout", ["same folder", "parent folder"])
def test_export_overwrite_never_deletes_its_input(exported, tmp_path, layout, capfd):
    import shutil

    shutil.copytree(exported, tmp_path / "run" / "model")
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    source = tmp_path / "run" / "model"
    out = source if layout == "same folder" else tmp_path / "run"
    assert cli(["export", str(source), str(out), "--overwrite"]) == 2
    assert "is or contains the input" in capfd.readouterr().err
    assert (source / "model.safetensors").is_file() and (tmp_path / "run" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("metrics, message", [([1, 2], "must hold a JSON object"),
                                              ({"eval_perplexity": "n/a"}, "eval_perplexity must be a finite number"),
                                              ('{"eval_perplexity": NaN}', "eval_perplexity must be a finite number"),
                                              ("{bad json", "is not valid JSON"),
                                              # a config.json, not a run's eval_results.json
                                              ({"block_size": 4, "hidden_size": 8}, "hold no evaluation result")])
def test_export_checks_its_metrics_file_before_writing_anything(exported, tmp_path, capfd, metrics, message):
    path = tmp_path / "metrics.json"
    path.write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    assert cli(["export", str(exported), str(tmp_path / "out"), "--metrics", str(path)]) == 2
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "out").exists()
    if message not in ("eval_perplexity must be a finite number", "hold no evaluation result"):
        assert str(path) in err


def test_push_points_the_card_snippets_at_the_repo_pushed_to(exported, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import HfApi

    shutil.copytree(exported, tmp_path / "folder")
    card = push_to_hub(tmp_path / "folder", "me/other-name", dry_run=True)["card"]
    assert 'from_pretrained("me/other-name", trust_remote_code=True)' in card and "someone/tiny-bd3lm" not in card
    assert "someone/tiny-bd3lm" in (tmp_path / "folder" / "README.md").read_text()  # a dry run writes nothing
    other = 'from_pretrained("gpt2", trust_remote_code=True)'  # a snippet a user added about another repo stays
    assert other in card_for_repo(f"{card}\n{other}\n", "me/third")
    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, folder_path, **kwargs: uploaded.setdefault(
        "card", (tmp_path / "folder" / "README.md").read_text()))
    push_to_hub(tmp_path / "folder", "me/other-name", token="hf_fake")
    assert uploaded["card"] == card


def test_converted_cards_are_the_papers_only_for_their_shape():
    import torch

    from bd3lm_hf import BD3LMConfig, BD3LMForBlockDiffusion
    from bd3lm_hf.model_card import converted_card

    with torch.device("meta"):
        paper_shaped = BD3LMForBlockDiffusion(BD3LMConfig(block_size=16))
    card = str(converted_card(paper_shaped, "bd3lm-owt-block_size16", "me/bd3lm16"))
    assert "Results reported in the paper" in card and 'from_pretrained("me/bd3lm16"' in card
    card = str(converted_card(random_model(block_size=16), "bd3lm-owt-block_size16", "tiny"))
    assert "Results reported in the paper" not in card and "converted from the original" in card
    card = str(converted_card(paper_shaped, "bd3lm-owt-block_size16", "bd3lm-owt-bs16"))
    assert "bd3lm-hf convert bd3lm-owt-block_size16 bd3lm-owt-bs16" in card and "block_size16-hf" not in card
    with torch.device("meta"):  # the shape decides, not the time conditioning a config may record
        mdlm_shaped = BD3LMForBlockDiffusion(BD3LMConfig(block_size=1024, time_conditioning=False))
    assert "Results reported in the paper" in str(converted_card(mdlm_shaped, "mdlm-owt", "mdlm-owt-hf"))
    mdlm = str(paper_card("mdlm-owt"))
    assert "| noise clip range (training) | [0.001, 1] |" in mdlm and "grid-searched" not in mdlm


def test_cards_name_the_folders_generation_defaults(exported):
    from bd3lm_hf.model_card import converted_card

    assert "`generation_config.json` where not given: none is set" in (exported / "README.md").read_text()
    paper_defaults = '`sampler="first_hitting", do_sample=True, temperature=1.0, top_k=0, top_p=0.9`'
    assert paper_defaults in str(paper_card("bd3lm-owt-block_size4"))
    model = random_model(block_size=4)
    model.generation_config.update(sampler="ddpm", num_steps=2, do_sample=True, temperature=0.7)
    assert '`sampler="ddpm", num_steps=2, do_sample=True, temperature=0.7`.' in str(
        converted_card(model, "my-run", "me/my-run"))
    # the fields that change the tokens or their number are named too; what is left unset is said
    model.generation_config = type(model.generation_config)(
        block_size=2, confidence_threshold=0.8, min_p=0.1, do_sample=True, entropy_stop=True, max_new_tokens=64)
    assert ('`block_size=2, confidence_threshold=0.8, do_sample=True, min_p=0.1, entropy_stop=True, max_new_tokens=64` '
            '(otherwise the `ddpm` sampler with `num_steps = block_size`)') in str(
        converted_card(model, "my-run", "me/my-run"))
    model.generation_config = type(model.generation_config)(sampler="first_hitting")
    assert '`sampler="first_hitting"` (otherwise greedy)' in str(converted_card(model, "my-run", "me/my-run"))


def test_eval_runs_in_the_dtype_asked(exported, tmp_path, capsys):
    from bd3lm_hf.data import shakespeare_files

    held_out = tmp_path / "held_out.txt"
    held_out.write_text(shakespeare_files()[5].read_text()[:8_000])
    nelbo = {}
    for dtype in ("float32", "bfloat16"):
        assert cli(["eval", str(exported), "--data", str(held_out), "--max-sequences", "4", "--device", "cpu",
                    "--dtype", dtype]) == 0
        nelbo[dtype] = float(capsys.readouterr().out.split("NELBO ")[1].split()[0])
    assert nelbo["float32"] != nelbo["bfloat16"] and abs(nelbo["float32"] - nelbo["bfloat16"]) < 0.1
    # JSON data with another text column, as train's --text_column reads it: the same sequences, the same NELBO
    (tmp_path / "held_out.jsonl").write_text(json.dumps({"content": held_out.read_text()}) + "\n")
    assert cli(["eval", str(exported), "--data", str(tmp_path / "held_out.jsonl"), "--text-column", "content",
                "--max-sequences", "4", "--device", "cpu"]) == 0
    assert float(capsys.readouterr().out.split("NELBO ")[1].split()[0]) == nelbo["float32"]


@pytest.fixture
def adapter_folder(tmp_path):
    """What `bd3lm-hf train --lora true` saves: adapters (naming their base folder) and the tokenizer."""
    from test_lora import perturbed_lora

    model = gpt2_vocabulary_model()
    model.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", trust_remote_code=True)
    peft_model = perturbed_lora(base)
    peft_model.save_pretrained(tmp_path / "adapter")
    gpt2_tokenizer_with_mask().save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model


def test_export_merges_an_adapter_folder(adapter_folder, tmp_path, capsys):
    folder, peft_model = adapter_folder
    assert cli(["export", str(folder), str(tmp_path / "hub")]) == 0
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (tmp_path / "hub").iterdir()}
    assert not (tmp_path / "hub" / "adapter_config.json").exists()
    exported_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hub", trust_remote_code=True).eval()
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-3)
        torch.testing.assert_close(exported_model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    # the adapter folder is an input: never an output, even with --overwrite
    assert cli(["export", str(folder), str(folder.parent), "--overwrite", "--tokenizer", str(folder)]) == 2
    assert "is or contains the input" in capsys.readouterr().err


def test_an_adapter_checkpoint_loads_with_its_ema_for_export_and_generate(adapter_folder, capsys):
    """A LoRA run's checkpoint holds the adapters' EMA (PeftModel names) beside them: merged in, as for a full
    model (it was ignored); `generate` takes the adapter folder (it was refused for lacking config.json)."""
    from safetensors.torch import save_file

    from bd3lm_hf.ema import EMA_FILE
    from bd3lm_hf.loading import load_for_export

    folder, peft_model = adapter_folder
    g = torch.Generator().manual_seed(1)
    shadow = {name: (p + 0.05 * torch.randn(p.shape, generator=g)).detach()
              for name, p in peft_model.named_parameters() if p.requires_grad}
    save_file(shadow, str(folder / EMA_FILE), metadata={"num_updates": "3", "decay": "0.9"})
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name in shadow:
                p.copy_(shadow[name])
    ids = torch.randint(0, 50257, (2, 16), generator=g)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        torch.testing.assert_close(load_for_export(folder)[0](input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    assert cli(["generate", str(folder), "--prompt", "To be", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "model calls (NFE)" in capsys.readouterr().out


def test_an_adapter_saved_without_a_task_type_loads_merged(tmp_path):
    """An adapter of a plain `LoraConfig(r=8)` (no task_type, as early `--lora` folders) names its base in
    adapter_config.json; peft's Auto classes refuse to import the model code it maps to without a task_type. The
    loader goes through the base and PeftModel: the adapted logits, for export, eval and generate."""
    from peft import LoraConfig, get_peft_model

    from bd3lm_hf.loading import load_saved_model

    random_model().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", trust_remote_code=True)
    peft_model = get_peft_model(base, LoraConfig(r=8, target_modules=["qkv_proj", "o_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] is None
    ids = torch.randint(0, 49, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = load_saved_model(tmp_path / "adapter")(input_ids=ids).logits
        torch.testing.assert_close(merged, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)  # merged: rounding
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", trust_remote_code=True)
        assert not torch.allclose(merged, base(input_ids=ids).logits, atol=1e-2)  # the adapters are in


def test_export_of_an_adapter_folder_whose_base_is_gone_is_a_one_line_error(adapter_folder, tmp_path, capsys):
    import shutil

    folder, _ = adapter_folder
    shutil.rmtree(folder.parent / "base")
    assert cli(["export", str(folder), str(tmp_path / "hub")]) == 2
    err = capsys.readouterr().err
    assert "cannot load the base model of the adapters" in err and "Traceback" not in err


def test_export_refuses_a_model_that_carries_adapters(tmp_path):
    from bd3lm_hf.lora import lora_config

    model = random_model(vocab_size=50258, max_position_embeddings=64)
    try:
        model.add_adapter(lora_config(r=2))
    except ValueError as error:  # transformers 5.24's adapter integration needs peft >= 0.22 (unreleased today)
        assert "version of PEFT" in str(error)
        pytest.skip(f"transformers' add_adapter refuses the installed peft ({error}): no model can carry its adapters")
    with pytest.raises(HubError, match="carries PEFT adapters"):
        export_for_hub(model, gpt2_tokenizer_with_mask(), tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_fill_mask_reads_the_space_before_mask_as_part_of_it(exported):
    """"not to [MASK]" used to leave its space as a token of its own (id 220, which GPT-2's BPE never puts before a
    word): the model then filled after it, and every pipeline("fill-mask") sequence held a double space."""
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer("not to [MASK]")["input_ids"] == tokenizer("not to")["input_ids"] + [tokenizer.mask_token_id]
    fill = pipeline("fill-mask", model=str(exported), trust_remote_code=True)
    guesses = fill("To be, or not to [MASK]", top_k=3)
    assert all(guess["sequence"] == "To be, or not to" + guess["token_str"] for guess in guesses)


def test_export_takes_the_special_ids_the_model_config_lacks_from_the_tokenizer(tmp_path):
    """A converted LM1B-style checkpoint names no BOS/EOS/PAD: exported with its tokenizer, its generation never
    stopped at EOS. The folder now carries the tokenizer's ids; ids the config names are kept."""
    model = random_model(seed=3, std=0.05, vocab_size=50258, max_position_embeddings=64)
    assert model.config.eos_token_id is None
    export_for_hub(model, gpt2_tokenizer_with_mask(), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["bos_token_id"] == saved["eos_token_id"] == saved["pad_token_id"] == 50256
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        reloaded.lm_head.bias[50256] = 100.0  # EOS first: every row stops at once
    out = reloaded.generate(torch.tensor([[464, 3290]]), max_new_tokens=12, do_sample=False,
                            return_dict_in_generate=True)
    assert out.sequences[0, 2].item() == 50256 and out.nfe <= 4  # stopped in the first block
    kept = random_model(seed=3, std=0.05, vocab_size=50258, max_position_embeddings=64, eos_token_id=7)
    export_for_hub(kept, gpt2_tokenizer_with_mask(), tmp_path / "kept")
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["eos_token_id"] == 7


def test_emptying_an_output_folder_never_follows_a_link_out_of_it(tmp_path):
    """`--overwrite` empties the folder: a link in it to another folder is removed, never what it points to."""
    from bd3lm_hf.output_folder import clear_output_folder

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "inner").mkdir(parents=True)
    (elsewhere / "keep.txt").write_text("not ours")
    out = tmp_path / "out"
    (out / "old_dir").mkdir(parents=True)
    (out / "old_dir" / "x.bin").write_text("old")
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    (out / "linked_file").symlink_to(elsewhere / "keep.txt")
    clear_output_folder(out)
    assert out.is_dir() and not any(out.iterdir())
    assert (elsewhere / "keep.txt").read_text() == "not ours" and (elsewhere / "inner").is_dir()


def test_only_a_bd3lm_export_and_nothing_else_counts_as_an_exported_folder(exported, tmp_path):
    """What `demo` may replace: another model's export, or an export holding a folder, is not its own."""
    from bd3lm_hf.output_folder import is_exported_model_folder

    assert is_exported_model_folder(exported)
    other_model = shutil.copytree(exported, tmp_path / "other")
    config = json.loads((other_model / "config.json").read_text())
    (other_model / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with_folder = shutil.copytree(exported, tmp_path / "with_folder")
    (with_folder / "model-00009.safetensors").mkdir()  # a folder named as an export's file
    assert not is_exported_model_folder(other_model) and not is_exported_model_folder(with_folder)
