"""Original checkpoints <-> this format: strict key map, clip range, EMA from .ckpt, bit-identical round trip."""

import json
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
    for field in ("block_size", "vocab_size", "hidden_dim", "n_blocks", "n_heads", "cond_dim", "model_length",
                  "time_conditioning", "cross_attn"):
        assert back[field] == original[field], field


def test_clip_range_from_weights_wins_over_config_json(fixtures):
    model = load_original(fixtures / "bd3lm_public")
    buffers = load_file(fixtures / "bd3lm_public" / "model.safetensors")
    assert model.config.sampling_eps_max == float(buffers["sampling_eps_max"]) != 0.999  # config.json says 0.999


def test_converted_folder_loads_with_same_logits(fixtures, tmp_path):
    model = load_original(fixtures / "bd3lm_public")
    model.save_pretrained(tmp_path)
    reloaded = BD3LMForBlockDiffusion.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


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


def test_cli_reports_errors_without_traceback(fixtures, tmp_path, caplog):
    shutil.copytree(fixtures / "bd3lm_public", tmp_path / "src")
    state = load_file(tmp_path / "src" / "model.safetensors")
    del state["backbone.output_layer.linear.bias"]
    save_file(state, tmp_path / "src" / "model.safetensors")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert not (tmp_path / "dst").exists()


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
    text = pipeline("text-generation", model=model, tokenizer=tokenizer)("Hello", max_new_tokens=4)
    assert text[0]["generated_text"].startswith("Hello")
    # a tokenizer that does not match the vocabulary is refused
    assert cli(["convert", str(fixtures / "bd3lm_public"), str(tmp_path / "bad"), "--with-gpt2-tokenizer"]) == 2
