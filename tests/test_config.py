import json

import pytest

from bd3lm_hf import BD3LMConfig


def test_defaults_are_the_paper_small_model():
    config = BD3LMConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.vocab_size, config.mask_token_id, config.max_position_embeddings) == (50258, 50257, 1024)
    assert config.num_blocks == 1024 // 16


def test_paper_small_parameter_count():
    import torch

    from bd3lm_hf import BD3LMForBlockDiffusion

    with torch.device("meta"):
        model = BD3LMForBlockDiffusion(BD3LMConfig())
    assert sum(p.numel() for p in model.parameters()) == 169_627_218  # DESIGN.md §3, original "small"


def test_original_config_json_is_accepted(fixtures):
    original = json.loads((fixtures / "bd3lm_public" / "config.json").read_text())
    config = BD3LMConfig(**{k: v for k, v in original.items() if k != "model_type"})
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.max_position_embeddings, config.block_size, config.hidden_dropout) == (32, 4, 0.0)
    for dropped in ("hidden_dim", "n_blocks", "attn_backend", "cross_attn", "var_min"):
        assert dropped not in config.to_dict()


def test_original_mdlm_flavour_is_one_block(fixtures):
    original = json.loads((fixtures / "mdlm_public" / "config.json").read_text())
    config = BD3LMConfig(**{k: v for k, v in original.items() if k != "model_type"})
    assert config.block_size == config.max_position_embeddings == 32 and config.time_conditioning


def test_a_field_given_under_both_spellings_must_agree():
    agreed = BD3LMConfig(hidden_size=64, hidden_dim=64, num_attention_heads=4, n_heads=4, model_length=32)
    assert (agreed.hidden_size, agreed.num_attention_heads, agreed.max_position_embeddings) == (64, 4, 32)
    with pytest.raises(ValueError, match="hidden_size=512 and its original spelling hidden_dim=768 disagree"):
        BD3LMConfig(hidden_size=512, hidden_dim=768)
    with pytest.raises(ValueError, match="hidden_dropout=0.1 and its original spelling dropout=0.0 disagree"):
        BD3LMConfig(hidden_dropout=0.1, dropout=0.0)  # the explicit default disagrees as well
    # An MDLM-flavoured original config (cross_attn off) attends over the whole context whatever its block_size.
    assert BD3LMConfig(cross_attn=False, model_length=32, block_size=4).block_size == 32
    assert BD3LMConfig(head_dim=64, num_blocks=64).to_dict() == BD3LMConfig().to_dict()  # derived, when they agree


def test_save_and_reload(tmp_path):
    config = BD3LMConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
                         block_size=8, mask_token_id=3, eos_token_id=5)
    config.save_pretrained(tmp_path)
    again = BD3LMConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(block_size=5), "block_size=5 must divide max_position_embeddings=1024"),
        (dict(num_attention_heads=5), "num_attention_heads=5 must divide hidden_size=768"),
        (dict(mask_token_id=50258), r"mask_token_id=50258 must be an int in \[0, vocab_size=50258\)"),
        (dict(mask_token_id="3"), r"mask_token_id='3' must be an int"),  # these three were TypeErrors
        (dict(vocab_size="3"), "vocab_size must be a positive int, got '3'"),
        (dict(hidden_dropout="0.1"), r"hidden_dropout must be a number in \[0, 1\), got '0.1'"),
        (dict(sampling_eps_min=0.5, sampling_eps_max=0.4), "sampling_eps_min < sampling_eps_max"),
        (dict(hidden_size=0), "hidden_size must be a positive int"),
        (dict(num_attention_heads=0), "num_attention_heads must be a positive int"),  # was a ZeroDivisionError
        (dict(head_dim=8), "head_dim=8: head_dim is hidden_size / num_attention_heads here"),  # an AttributeError
        (dict(num_blocks=3), "num_blocks=3: num_blocks is max_position_embeddings / block_size"),
        (dict(hidden_size=36, num_attention_heads=4), "must be even"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(causal=True), "causal=True is not supported"),
        (dict(adaln=False), "adaln=False is not supported"),
        (dict(adaln="yes"), "original field adaln='yes' is not supported; only adaln=True is"),  # the value given
        (dict(causal=1), "original field causal=1 is not supported"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings=True is not supported"),
        (dict(rope_theta=0), "rope_theta must be a positive number, got 0"),  # NaN logits before
        (dict(layer_norm_eps=-1.0), r"layer_norm_eps must be a positive number, got -1.0"),
        (dict(time_conditioning="no"), "time_conditioning must be True or False, got 'no'"),  # was switched on
    ],
)
def test_invalid_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        BD3LMConfig(**fields)


@pytest.mark.parametrize("override, message", [
    (dict(block_size=5), "block_size=5 must divide"),
    (dict(mask_token_id=500), "mask_token_id=500 must be an int in"),
    (dict(hidden_dropout=1.5), "hidden_dropout must be a number in"),
])
def test_overrides_at_load_time_are_checked(tmp_path, override, message):
    from transformers import AutoConfig

    BD3LMConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
                block_size=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        BD3LMConfig.from_pretrained(tmp_path, **override)
    with pytest.raises(ValueError, match=message):  # the saved configuration file, as a Hub user loads it
        AutoConfig.from_pretrained(tmp_path, trust_remote_code=True, **override)


def test_save_refuses_a_config_changed_into_an_invalid_one(tmp_path):
    from bd3lm_hf import BD3LMForBlockDiffusion

    model = BD3LMForBlockDiffusion(BD3LMConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, cond_dim=8, max_position_embeddings=16,
                                               block_size=4))
    model.config.block_size = 5
    with pytest.raises(ValueError, match="block_size=5 must divide max_position_embeddings=16"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()  # no folder that cannot load


def test_return_dict_false_is_kept_and_round_trips(tmp_path):
    config = BD3LMConfig(return_dict=False)
    assert config.return_dict is False
    config.save_pretrained(tmp_path)
    assert BD3LMConfig.from_pretrained(tmp_path).return_dict is False


def test_the_original_return_dict_false_is_not_taken_over(fixtures):
    """Every original config.json sets return_dict=False for the original code (its diffusion code indexes the
    output as a logits tensor); our model, loaded from it, returns a ModelOutput as any transformers model."""
    original = json.loads((fixtures / "bd3lm_public" / "config.json").read_text())
    assert original["return_dict"] is False
    assert BD3LMConfig(**{k: v for k, v in original.items() if k != "model_type"}).return_dict is True


def test_the_shipped_code_names_the_transformers_version_it_needs(monkeypatch):
    """On transformers 4.x, remote-code loading failed with a missing-file error naming no version. The module is
    run as a separate copy: reloading the real one would replace the BD3LMConfig class other modules hold."""
    import importlib.util

    import transformers

    import bd3lm_hf.modeling.configuration_bd3lm as module

    def run_a_copy():
        spec = importlib.util.spec_from_file_location("bd3lm_hf.modeling.configuration_copy", module.__file__)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"needs transformers >= 5.17, found 4.57.1"):
        run_a_copy()
    monkeypatch.setattr(transformers, "__version__", "5.17.0.dev0")
    run_a_copy()
