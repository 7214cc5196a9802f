"""Original checkpoints <-> this format: strict key map, clip range, EMA from .ckpt, bit-identical round trip."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bd3lm_hf import BD3LMForBlockDiffusion
from bd3lm_hf.cli import main as cli
from bd3lm_hf.conversion import (ConversionError, config_from_original, convert_original_state_dict, load_original,
                                 original_to_ours_key, ours_to_original_key)


@pytest.mark.parametrize("case", ["bd3lm_public", "mdlm_public"])
def test_round_trip_is_bit_identical(fixtures, tmp_path, case):
    assert cli(["convert", str(fixtures / case), str(tmp_path / "ours")]) == 0
    assert cli(["convert", str(tmp_path / "ours"), str(tmp_path / "original"), "--to-original"]) == 0
    original_weights = (fixtures / case / "model.safetensors").read_bytes()
    assert (tmp_path / "original" / "model.safetensors").read_bytes() == original_weights
    original, back = (json.loads((d / "config.json").read_text()) for d in (fixtures / case, tmp_path / "original"))
    for field in set(original) - {"_name_or_path", "transformers_version"}:  # return_dict=False included
        assert back.get(field) == pytest.approx(original[field]), field  # approx: the clip range went via fp32


def test_round_trip_keeps_the_flags_of_a_single_block_checkpoint_saved_as_bd3lm(fixtures, tmp_path):
    """One block over the context (block_size = model_length) saved with the BD3-LM flags (var_min: the weights hold
    the clip buffers; cross_attn true): the shape implies neither, so the conversion records them and writes them
    back: the same weights byte for byte and the same flags."""
    shutil.copytree(fixtures / "bd3lm_public", tmp_path / "source")
    config = json.loads((tmp_path / "source" / "config.json").read_text())
    config["block_size"] = config["model_length"]
    (tmp_path / "source" / "config.json").write_text(json.dumps(config))
    assert cli(["convert", str(tmp_path / "source"), str(tmp_path / "ours")]) == 0
    assert cli(["convert", str(tmp_path / "ours"), str(tmp_path / "original"), "--to-original"]) == 0
    weights = (tmp_path / "source" / "model.safetensors").read_bytes()
    assert (tmp_path / "original" / "model.safetensors").read_bytes() == weights
    back = json.loads((tmp_path / "original" / "config.json").read_text())
    assert (back["var_min"], back["cross_attn"], back["block_size"]) == (True, True, config["model_length"])
    model = BD3LMForBlockDiffusion.from_pretrained(tmp_path / "ours")
    assert model.config.block_size == model.config.max_position_embeddings  # one block, as the shape says


def test_clip_range_from_weights_wins_over_config_json(fixtures):
    model = load_original(fixtures / "bd3lm_public")
    buffers = load_file(fixtures / "bd3lm_public" / "model.safetensors")
    assert model.config.sampling_eps_max == float(buffers["sampling_eps_max"]) != 0.999  # config.json says 0.999


def test_converted_folder_loads_with_same_logits(fixtures, tmp_path):
    model = load_original(fixtures / "bd3lm_public")
    model.save_pretrained(tmp_path)
    reloaded = BD3LMForBlockDiffusion.from_pretrained(tmp_path).eval()
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    ids = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        # bit-identical weights; the logits may still differ in the last fp32 bits: loaded tensors lie at other
        # memory alignments, which send some CPUs' BLAS down another vectorized path (seen: 2.4e-6 on AVX-512)
        torch.testing.assert_close(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_a_converted_checkpoint_samples_as_the_papers_runs_by_default(fixtures, tmp_path):
    from bd3lm_hf.conversion import convert_to_ours
    from bd3lm_hf.model_card import ORIGINAL_SAMPLING

    convert_to_ours(fixtures / "bd3lm_public", tmp_path / "ours")
    converted = BD3LMForBlockDiffusion.from_pretrained(tmp_path / "ours").eval()
    assert {name: getattr(converted.generation_config, name) for name in ORIGINAL_SAMPLING} == ORIGINAL_SAMPLING
    plain = load_original(fixtures / "bd3lm_public")  # the package's defaults: ddpm, greedy
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))

    def generate(model, **settings):
        return model.generate(prompt, max_new_tokens=12, generator=torch.Generator().manual_seed(1), **settings)

    assert torch.equal(generate(converted), generate(plain, **ORIGINAL_SAMPLING))
    assert not torch.equal(generate(converted), generate(plain))


def test_key_map_is_a_bijection_over_every_key(fixtures):
    keys = load_file(fixtures / "bd3lm_public" / "model.safetensors")
    parameters = [k for k in keys if k.startswith("backbone.") and "rotary" not in k]
    ours = [original_to_ours_key(k) for k in parameters]
    assert len(set(ours)) == len(parameters)
    assert [ours_to_original_key(k) for k in ours] == parameters


def _original(fixtures):
    state = load_file(fixtures / "bd3lm_public" / "model.safetensors")
    config = json.loads((fixtures / "bd3lm_public" / "config.json").read_text())
    return state, config_from_original(config)


def test_missing_key_is_reported(fixtures):
    state, config = _original(fixtures)
    del state["backbone.blocks.1.attn_out.weight"]
    with pytest.raises(ConversionError, match=r"missing key 'backbone.blocks.1.attn_out.weight'"):
        convert_original_state_dict(state, config)


def test_unexpected_key_is_reported(fixtures):
    state, config = _original(fixtures)
    state["backbone.blocks.0.extra.weight"] = torch.zeros(1)
    state["backbone.blocks.2.norm1.weight"] = torch.ones(64)
    with pytest.raises(ConversionError, match="unexpected key 'backbone.blocks.0.extra.weight'") as error:
        convert_original_state_dict(state, config)
    assert "num_hidden_layers=2" in str(error.value)


def test_shape_mismatch_is_reported(fixtures):
    state, config = _original(fixtures)
    state["backbone.vocab_embed.embedding"] = torch.zeros(98, 64)
    with pytest.raises(ConversionError, match=r"shape mismatch .*vocab_embed.*\(98, 64\).*\(97, 64\)"):
        convert_original_state_dict(state, config)


def test_heads_mismatch_between_config_and_rotary_buffer(fixtures):
    state, _ = _original(fixtures)
    config = config_from_original({**json.loads((fixtures / "bd3lm_public" / "config.json").read_text()),
                                   "n_heads": 2})
    with pytest.raises(ConversionError, match="rotary_emb.inv_freq"):
        convert_original_state_dict(state, config)


def _lightning_checkpoint(fixtures, path, ema_scale=2.0):
    """A .ckpt laid out as bd3lms' Lightning module saves it: state_dict, ema.shadow_params, clip range."""
    state = load_file(fixtures / "bd3lm_public" / "model.safetensors")
    state_dict = dict(sorted(state.items()))  # the EMA list follows the order of the state dict
    parameters = [k for k in state_dict if k.startswith("backbone.") and "rotary" not in k]
    checkpoint = {"state_dict": state_dict,
                  "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": [state_dict[k] * ema_scale
                                                                                 for k in parameters]},
                  "sampling_eps_min": torch.tensor(0.3), "sampling_eps_max": torch.tensor(0.8),
                  "global_step": 10}
    torch.save(checkpoint, path)
    return state_dict


def test_lightning_checkpoint_exports_ema_weights(fixtures, tmp_path):
    state = _lightning_checkpoint(fixtures, tmp_path / "last.ckpt")
    assert cli(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "out"), "--block-size", "4",
                "--model-length", "32"]) == 0
    model = BD3LMForBlockDiffusion.from_pretrained(tmp_path / "out")
    assert torch.equal(model.model.embed_tokens.weight, 2 * state["backbone.vocab_embed.embedding"])
    assert model.config.num_attention_heads == 4  # read off the rotary buffer
    assert (model.config.sampling_eps_min, model.config.sampling_eps_max) == (pytest.approx(0.3), pytest.approx(0.8))


def test_lightning_checkpoint_raw_weights_with_no_ema(fixtures, tmp_path, capfd):
    state = _lightning_checkpoint(fixtures, tmp_path / "last.ckpt")
    assert cli(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "out"), "--block-size", "4",
                "--model-length", "32", "--no-ema"]) == 0
    model = BD3LMForBlockDiffusion.from_pretrained(tmp_path / "out")
    assert torch.equal(model.model.embed_tokens.weight, state["backbone.vocab_embed.embedding"])
    assert (model.config.sampling_eps_min, model.config.sampling_eps_max) == (pytest.approx(0.3), pytest.approx(0.8))
    # a folder holds one set of weights: the flag has nothing to choose there
    with pytest.raises(ConversionError, match="use_ema=False .--no-ema. chooses the raw weights of a Lightning"):
        load_original(fixtures / "bd3lm_public", use_ema=False)
    assert cli(["convert", str(tmp_path / "out"), str(tmp_path / "back"), "--to-original", "--no-ema"]) == 2
    assert "--no-ema chooses the weights of a .ckpt" in capfd.readouterr().err


def test_lightning_checkpoint_with_a_broken_ema_names_the_way_out(fixtures, tmp_path):
    _lightning_checkpoint(fixtures, tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    checkpoint["ema"]["shadow_params"].pop()
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    config = {"block_size": 4, "model_length": 32}
    with pytest.raises(ConversionError, match=r"pass use_ema=False \(CLI: --no-ema\)"):
        load_original(tmp_path / "broken.ckpt", config)
    assert load_original(tmp_path / "broken.ckpt", config, use_ema=False) is not None
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    checkpoint["ema"]["shadow_params"][0] = checkpoint["ema"]["shadow_params"][0][:1]  # a tensor of another shape
    torch.save(checkpoint, tmp_path / "misshapen.ckpt")
    with pytest.raises(ConversionError, match=r"EMA tensor for .* has shape \(1,"):
        load_original(tmp_path / "misshapen.ckpt", config)


def test_lightning_checkpoint_of_a_compiled_model_and_one_without_ema(fixtures, tmp_path, caplog):
    """A run trained with torch.compile saves its keys under `_orig_mod.`: the same weights come out. A checkpoint
    without EMA gives its raw weights, with a warning (the EMA is the default)."""
    state = _lightning_checkpoint(fixtures, tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    config = {"block_size": 4, "model_length": 32}
    plain = load_original(tmp_path / "last.ckpt", config)
    checkpoint["state_dict"] = {key.replace("backbone.", "backbone._orig_mod.", 1): value
                                for key, value in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "compiled.ckpt")
    compiled = load_original(tmp_path / "compiled.ckpt", config)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), compiled.state_dict().values()))
    del checkpoint["ema"]
    torch.save(checkpoint, tmp_path / "no_ema.ckpt")
    with caplog.at_level(logging.WARNING):
        raw = load_original(tmp_path / "no_ema.ckpt", config)
    assert "has no EMA weights; exporting the raw weights" in caplog.text
    assert torch.equal(raw.model.embed_tokens.weight, state["backbone.vocab_embed.embedding"])


def test_lightning_checkpoint_needs_block_size(fixtures, tmp_path):
    _lightning_checkpoint(fixtures, tmp_path / "last.ckpt")
    with pytest.raises(ConversionError, match="block_size"):
        load_original(tmp_path / "last.ckpt")


def test_lightning_checkpoint_with_pickled_objects_is_refused(tmp_path):
    import argparse

    opaque = argparse.Namespace(lr=3e-4)  # stands for the pickled Hydra config of a real checkpoint
    torch.save({"state_dict": {}, "hyper_parameters": {"x": opaque}}, tmp_path / "bad.ckpt")
    with pytest.raises(ConversionError, match="weights_only"):
        load_original(tmp_path / "bad.ckpt")


def test_cli_reports_errors_without_traceback(fixtures, tmp_path, capsys):
    shutil.copytree(fixtures / "bd3lm_public", tmp_path / "src")
    state = load_file(tmp_path / "src" / "model.safetensors")
    del state["backbone.output_layer.linear.bias"]
    save_file(state, tmp_path / "src" / "model.safetensors")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert not (tmp_path / "dst").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "backbone.output_layer.linear.bias" in err, err


def test_block_size_contradicting_the_checkpoint_config_is_an_error(fixtures, tmp_path):
    with pytest.raises(ConversionError, match="block_size: checkpoint has 4, given 8"):
        load_original(fixtures / "bd3lm_public", {"block_size": 8})
    assert cli(["convert", str(fixtures / "bd3lm_public"), str(tmp_path / "out"), "--block-size", "8"]) == 2


def test_ckpt_config_contradicting_the_weights_is_an_error(fixtures, tmp_path):
    _lightning_checkpoint(fixtures, tmp_path / "last.ckpt")
    with pytest.raises(ConversionError, match="n_heads: checkpoint has 4, given 8"):
        load_original(tmp_path / "last.ckpt", {"block_size": 4, "model_length": 32, "n_heads": 8})


def test_mask_token_id_follows_the_vocabulary():
    from bd3lm_hf.conversion import config_to_original

    lm1b = config_from_original({"vocab_size": 30522, "hidden_dim": 64, "n_blocks": 1, "n_heads": 4,
                                 "cond_dim": 16, "model_length": 32, "block_size": 4})
    assert lm1b.mask_token_id == 103
    owt = config_from_original({"vocab_size": 50258, "hidden_dim": 64, "n_blocks": 1, "n_heads": 4,
                                "cond_dim": 16, "model_length": 32, "block_size": 4})
    assert owt.mask_token_id == 50257
    given = config_from_original({"vocab_size": 100, "hidden_dim": 64, "n_blocks": 1, "n_heads": 4, "cond_dim": 16,
                                  "model_length": 32, "block_size": 4, "mask_token_id": 7})
    assert given.mask_token_id == 7
    with pytest.raises(ConversionError, match="mask_token_id=7 cannot be expressed"):
        config_to_original(given)
    last = config_from_original({"vocab_size": 30522, "hidden_dim": 64, "n_blocks": 1, "n_heads": 4, "cond_dim": 16,
                                 "model_length": 32, "block_size": 4, "mask_token_id": 30521})
    with pytest.raises(ConversionError, match="implies 103 for vocab_size=30522"):  # it came back as 103
        config_to_original(last)


def test_convert_with_the_gpt2_tokenizer_gives_a_pipeline_ready_folder(tmp_path, fixtures):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from bd3lm_hf import BD3LMConfig
    from bd3lm_hf.conversion import convert_to_original

    owt_like = BD3LMForBlockDiffusion(BD3LMConfig(vocab_size=50258, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=4, cond_dim=16, max_position_embeddings=32,
                                                  block_size=4))
    owt_like.save_pretrained(tmp_path / "ours")
    convert_to_original(tmp_path / "ours", tmp_path / "original")  # an original-format OWT-vocabulary checkpoint
    assert cli(["convert", str(tmp_path / "original"), str(tmp_path / "back"), "--with-gpt2-tokenizer"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "back", trust_remote_code=True)
    assert model.config.eos_token_id == tokenizer.eos_token_id == 50256
    sampled_with = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: sampled_with.append(kwargs) or generate(*args, **kwargs)
    text = pipeline("text-generation", model=model, tokenizer=tokenizer)("Hello", max_new_tokens=4)
    assert text[0]["generated_text"].startswith("Hello")
    # the paper's sampling, not the pipeline's own temperature 0.7
    assert sampled_with[0].get("temperature", model.generation_config.temperature) == 1.0
    assert model.generation_config.do_sample and model.generation_config.top_p == 0.9
    # a tokenizer that does not match the vocabulary is refused
    assert cli(["convert", str(fixtures / "bd3lm_public"), str(tmp_path / "bad"), "--with-gpt2-tokenizer"]) == 2


def _our_folder(fixtures, path):
    load_original(fixtures / "bd3lm_public").save_pretrained(path)
    return path


def test_to_original_is_strict_and_reports_every_mismatch(fixtures, tmp_path):
    from bd3lm_hf.conversion import convert_to_original

    ours = _our_folder(fixtures, tmp_path / "ours")
    state = load_file(ours / "model.safetensors")
    del state["model.layers.1.self_attn.o_proj.weight"]
    state["model.layers.0.mlp.fc_in.bias"] = state["model.layers.0.mlp.fc_in.bias"][:10].clone()
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, ours / "model.safetensors")
    with pytest.raises(ConversionError) as error:
        convert_to_original(ours, tmp_path / "original")
    for problem in ("missing key 'model.layers.1.self_attn.o_proj.weight'",
                    "shape mismatch for 'model.layers.0.mlp.fc_in.bias': checkpoint (10,), config expects (256,)",
                    "unexpected key 'model.extra.weight'"):
        assert problem in str(error.value)
    assert not (tmp_path / "original").exists()


def test_each_direction_recognises_a_folder_already_in_its_target_format(fixtures, tmp_path):
    from bd3lm_hf.conversion import convert_to_original

    with pytest.raises(ConversionError, match="already in the original bd3lms format"):
        convert_to_original(fixtures / "bd3lm_public", tmp_path / "out")
    ours = _our_folder(fixtures, tmp_path / "ours")
    with pytest.raises(ConversionError, match="already in this package's format"):
        load_original(ours)
    assert not (tmp_path / "out").exists()
    (tmp_path / "adapters").mkdir()  # what a LoRA run saves: adapters only
    (tmp_path / "adapters" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConversionError, match=r"holds LoRA adapters, not a model: merge them into their base "
                                              r"first \(`bd3lm-hf export"):
        convert_to_original(tmp_path / "adapters", tmp_path / "out")


def test_to_original_reads_a_sharded_folder(fixtures, tmp_path):
    load_original(fixtures / "bd3lm_public").save_pretrained(tmp_path / "ours", max_shard_size="20KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    assert cli(["convert", str(tmp_path / "ours"), str(tmp_path / "original"), "--to-original"]) == 0
    original_weights = (fixtures / "bd3lm_public" / "model.safetensors").read_bytes()
    assert (tmp_path / "original" / "model.safetensors").read_bytes() == original_weights


def test_a_sharded_original_folder_converts_as_the_single_file(fixtures, tmp_path):
    source = fixtures / "bd3lm_public"
    weights = load_file(str(source / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(source / "config.json", sharded / "config.json")
    for shard, keys in shards.items():
        save_file({key: weights[key] for key in keys}, str(sharded / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {key: shard for shard, keys in shards.items() for key in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for name, model in (("single", load_original(source)), ("sharded", load_original(sharded))):
        model.save_pretrained(tmp_path / name)
    single, from_shards = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("single", "sharded"))
    assert single.keys() == from_shards.keys() and all(torch.equal(single[k], from_shards[k]) for k in single)


def test_code_from_copies_the_original_code_and_its_relative_imports(fixtures, tmp_path, caplog):
    download = tmp_path / "download"  # stands for `hf download kuleshov-group/...`: stand-in code, not the original
    download.mkdir()
    (download / "configuration_bd3lm.py").write_text("class BD3LMConfig(object):\n    pass\n")
    (download / "modeling_bd3lm.py").write_text("from .configuration_bd3lm import BD3LMConfig\nfrom .helpers import X\n"
                                                "class BD3LM(object):\n    pass\n")
    (download / "helpers.py").write_text("X = 2\n")
    ours = _our_folder(fixtures, tmp_path / "ours")
    assert cli(["convert", str(ours), str(tmp_path / "with"), "--to-original", "--code-from", str(download)]) == 0
    for name in ("configuration_bd3lm.py", "modeling_bd3lm.py", "helpers.py"):
        assert (tmp_path / "with" / name).read_text() == (download / name).read_text()
    caplog.clear()
    assert cli(["convert", str(ours), str(tmp_path / "without"), "--to-original"]) == 0
    assert "--code-from" in caplog.text and not list((tmp_path / "without").glob("*.py"))
    # a download kept inside the output folder: --overwrite would delete it before its files are copied
    inside = tmp_path / "with" / "download"
    shutil.copytree(download, inside)
    caplog.clear()
    assert cli(["convert", str(ours), str(tmp_path / "with"), "--to-original", "--overwrite",
                "--code-from", str(inside)]) == 2
    assert "is or contains the input" in caplog.text and (inside / "helpers.py").read_text() == "X = 2\n"
    # this package's own folder has code files of the same names, which the original format's auto_map cannot load
    assert cli(["convert", str(ours), str(tmp_path / "x"), "--to-original", "--code-from", str(ours)]) == 2
    assert "modeling_bd3lm.py defines no class BD3LM, so it is not the original" in caplog.text
    assert not (tmp_path / "x").exists()
    (download / "modeling_bd3lm.py").unlink()
    assert cli(["convert", str(ours), str(tmp_path / "x"), "--to-original", "--code-from", str(download)]) == 2


def test_layer_norm_eps_the_original_cannot_express_is_refused(fixtures, tmp_path):
    from bd3lm_hf.conversion import config_to_original

    config = config_from_original(json.loads((fixtures / "bd3lm_public" / "config.json").read_text()))
    assert config_to_original(config)["n_blocks"] == 2
    config.layer_norm_eps = 1e-6
    with pytest.raises(ConversionError, match="layer_norm_eps=1e-06 cannot be expressed"):
        config_to_original(config)
    config.layer_norm_eps, config.rope_theta = 1e-5, 500000.0  # written, it would not convert back
    with pytest.raises(ConversionError, match="rope_theta=500000.0 cannot be expressed .* allowed: 10000"):
        config_to_original(config)


def test_a_bf16_model_keeps_its_dtype_through_the_original_format(fixtures, tmp_path):
    """The original folder of a bf16 model holds bf16 weights; converting it back built an fp32 model (twice the
    size), so the next conversion to the original format was not byte-identical."""
    ours = tmp_path / "ours"
    load_original(fixtures / "bd3lm_public").to(torch.bfloat16).save_pretrained(ours)
    assert cli(["convert", str(ours), str(tmp_path / "original"), "--to-original"]) == 0
    assert cli(["convert", str(tmp_path / "original"), str(tmp_path / "back")]) == 0
    assert cli(["convert", str(tmp_path / "back"), str(tmp_path / "again"), "--to-original"]) == 0
    back = load_original(tmp_path / "original")
    assert back.dtype == torch.bfloat16 and back.model.rotary_emb.inv_freq.dtype == torch.float32
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == \
        (tmp_path / "original" / "model.safetensors").read_bytes()


def _truncate_weights(folder):
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])


def _break_config(folder):
    (folder / "config.json").write_text("{")


@pytest.mark.parametrize("damage, flags, message", [
    (_truncate_weights, [], "model.safetensors is not a readable safetensors file"),
    (_break_config, [], "config.json is not a readable JSON file"),
    (lambda folder: (folder / "model.safetensors").unlink(), [], "model.safetensors does not exist"),
    (lambda folder: shutil.rmtree(folder), ["--to-original"], "is not a folder"),
], ids=["truncated-weights", "bad-json", "no-weights", "no-folder"])
def test_cli_names_the_unreadable_file_in_one_line(fixtures, tmp_path, capfd, damage, flags, message):
    shutil.copytree(fixtures / "bd3lm_public", tmp_path / "src")
    damage(tmp_path / "src")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *flags]) == 2
    err = capfd.readouterr().err
    assert message in err and str(tmp_path / "src") in err and "Traceback" not in err


@pytest.mark.parametrize("flags", [[], ["--to-original"]], ids=["to-ours", "to-original"])
def test_cli_refuses_an_existing_file_as_output_in_both_directions(fixtures, tmp_path, capfd, flags):
    src = fixtures / "bd3lm_public" if not flags else _our_folder(fixtures, tmp_path / "ours")
    (tmp_path / "afile").write_text("keep me")
    assert cli(["convert", str(src), str(tmp_path / "afile"), *flags]) == 2
    err = capfd.readouterr().err
    assert "afile exists and is not a folder" in err and "Traceback" not in err and "converted" not in err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_cli_names_a_ckpt_without_a_state_dict_in_one_line(tmp_path, capfd):
    torch.save({"foo": 1, "global_step": 3}, tmp_path / "nostate.ckpt")
    assert cli(["convert", str(tmp_path / "nostate.ckpt"), str(tmp_path / "out"), "--block-size", "4",
                "--model-length", "32"]) == 2
    err = capfd.readouterr().err
    assert "nostate.ckpt has no 'state_dict'" in err and "['foo', 'global_step']" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    (tmp_path / "text.ckpt").write_text("not a checkpoint at all")  # torch's message spans 6 lines
    assert cli(["convert", str(tmp_path / "text.ckpt"), str(tmp_path / "out"), "--block-size", "4",
                "--model-length", "32"]) == 2
    err = capfd.readouterr().err
    assert "text.ckpt is not a checkpoint torch.load(weights_only=True) can read" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cli_convert_refuses_a_non_empty_folder_and_its_own_input(fixtures, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("an earlier export")
    assert cli(["convert", str(fixtures / "bd3lm_public"), str(out)]) == 2
    assert "exists and is not empty" in capfd.readouterr().err and (out / "README.md").is_file()
    assert cli(["convert", str(fixtures / "bd3lm_public"), str(out), "--overwrite"]) == 0
    assert not (out / "README.md").exists() and (out / "model.safetensors").is_file()
    shutil.copytree(fixtures / "bd3lm_public", tmp_path / "src")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "src"), "--overwrite"]) == 2
    assert "is or contains the input" in capfd.readouterr().err
    assert "backbone.vocab_embed.embedding" in load_file(tmp_path / "src" / "model.safetensors")


def test_cli_convert_names_a_bad_config_file(fixtures, tmp_path, capfd):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{'single': quotes}")
    for name, message in (("list.json", "must hold a JSON object"), ("broken.json", "is not valid JSON")):
        assert cli(["convert", str(tmp_path / "x.ckpt"), str(tmp_path / "out"), "--config",
                    str(tmp_path / name)]) == 2
        err = capfd.readouterr().err
        assert message in err and str(tmp_path / name) in err and "Traceback" not in err


def test_convert_with_the_tokenizer_writes_a_folder_ready_to_push(tmp_path):
    import json

    from bd3lm_hf import BD3LMConfig
    from bd3lm_hf.conversion import convert_to_original
    from bd3lm_hf.hub import push_to_hub

    BD3LMForBlockDiffusion(BD3LMConfig(vocab_size=50258, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       cond_dim=16, max_position_embeddings=32, block_size=4)).save_pretrained(
        tmp_path / "ours")
    convert_to_original(tmp_path / "ours", tmp_path / "bd3lm-owt-block_size4")  # the paper's name, not its shape
    assert cli(["convert", str(tmp_path / "bd3lm-owt-block_size4"), str(tmp_path / "hf"),
                "--with-gpt2-tokenizer"]) == 0
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 31 and tokenizer_config["truncation_side"] == "left"
    card = push_to_hub(tmp_path / "hf", "me/converted", dry_run=True)["card"]
    assert "bd3lm-owt-block_size4" in card and 'from_pretrained("me/converted"' in card


def test_convert_overwrite_keeps_the_previous_output_when_the_source_fails(fixtures, tmp_path, capfd):
    assert cli(["convert", str(fixtures / "bd3lm_public"), str(tmp_path / "out")]) == 0
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert cli(["convert", str(tmp_path / "typo"), str(tmp_path / "out"), "--overwrite"]) == 2
    assert cli(["convert", str(tmp_path / "out"), str(tmp_path / "out2"), "--to-original"]) == 0
    assert cli(["convert", str(tmp_path / "typo"), str(tmp_path / "out2"), "--to-original", "--overwrite"]) == 2
    kept = sorted(p.name for p in (tmp_path / "out2").iterdir())
    # a mistyped --code-from is found before the folder is emptied (it cost the previous conversion's files)
    (tmp_path / "out2" / "modeling_bd3lm.py").write_text("# the original code, copied earlier\n")
    assert cli(["convert", str(tmp_path / "out"), str(tmp_path / "out2"), "--to-original", "--overwrite",
                "--code-from", str(tmp_path / "typo")]) == 2
    capfd.readouterr()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert (tmp_path / "out2" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == sorted([*kept, "modeling_bd3lm.py"])


def test_convert_into_the_current_folder_names_its_card_after_it(tmp_path, monkeypatch):
    from bd3lm_hf import BD3LMConfig
    from bd3lm_hf.conversion import convert_to_original

    BD3LMForBlockDiffusion(BD3LMConfig(vocab_size=50258, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       cond_dim=16, max_position_embeddings=32, block_size=4)).save_pretrained(
        tmp_path / "ours")
    convert_to_original(tmp_path / "ours", tmp_path / "original")
    (tmp_path / "tiny-hf").mkdir()
    monkeypatch.chdir(tmp_path / "tiny-hf")
    assert cli(["convert", "../original", ".", "--with-gpt2-tokenizer"]) == 0
    assert 'from_pretrained("tiny-hf", trust_remote_code=True)' in (tmp_path / "tiny-hf" / "README.md").read_text()


def test_a_checkpoint_of_another_model_or_ema_is_named_not_a_key_error(fixtures, tmp_path):
    """A Lightning .ckpt of another model raised KeyError('backbone.vocab_embed.embedding') after warning that it had
    no EMA; an `ema` entry of another layout raised KeyError('shadow_params')."""
    torch.save({"state_dict": {"model.layer.weight": torch.zeros(2, 2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ConversionError, match=r"not a bd3lms Lightning checkpoint.*model\.layer\.weight"):
        load_original(tmp_path / "other.ckpt", {"block_size": 4, "model_length": 32})
    _lightning_checkpoint(fixtures, tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    checkpoint["ema"] = {"decay": 0.9999}
    torch.save(checkpoint, tmp_path / "other_ema.ckpt")
    with pytest.raises(ConversionError, match="holds no list 'shadow_params'.*--no-ema"):
        load_original(tmp_path / "other_ema.ckpt", {"block_size": 4, "model_length": 32})


def test_a_config_file_is_never_emptied_away_nor_contradicted_by_a_flag(fixtures, tmp_path, capfd):
    """`--config OUT/config.json --overwrite` emptied OUT, the config file with it; `--block-size` silently won over
    the --config file's block_size."""
    out = tmp_path / "out"
    out.mkdir()
    config = out / "cfg.json"
    shutil.copy(fixtures / "bd3lm_public" / "config.json", config)
    assert cli(["convert", str(fixtures / "bd3lm_public"), str(out), "--config", str(config), "--overwrite"]) == 2
    assert "is or contains the input" in capfd.readouterr().err and config.is_file()
    block_size = json.loads(config.read_text())["block_size"]
    assert cli(["convert", str(fixtures / "bd3lm_public"), str(tmp_path / "new"), "--config", str(config),
                "--block-size", str(2 * block_size)]) == 2
    assert f"contradicts block_size={block_size} in --config" in capfd.readouterr().err
    assert not (tmp_path / "new").exists()
