"""Evaluation helpers on a tiny model: NELBO perplexity."""

from conftest import random_model

from bd3lm_hf.tokenization import train_bpe_tokenizer
from bd3lm_hf.evaluation import nelbo_perplexity


def test_nelbo_perplexity_does_not_depend_on_the_config_return_dict(tmp_path):
    """A model loaded with `return_dict=False` (tuple outputs by default) is evaluated as any other."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("To be, or not to be, that is the question. " * 30)
    tokenizer = train_bpe_tokenizer([held_out.read_text()], vocab_size=258)  # the 256 bytes, EOS, [MASK]
    model = random_model(std=0.05, vocab_size=len(tokenizer))
    expected = nelbo_perplexity(model, tokenizer, [held_out], batch_size=4)
    model.config.return_dict = False  # what from_pretrained(..., return_dict=False) sets
    assert nelbo_perplexity(model, tokenizer, [held_out], batch_size=4) == expected


def test_framed_evaluation_leaves_each_sequences_bos_unscored(tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("To be, or not to be, that is the question. " * 30)
    tokenizer = train_bpe_tokenizer([held_out.read_text()], vocab_size=258)
    model = random_model(std=0.05, vocab_size=len(tokenizer))
    plain = nelbo_perplexity(model, tokenizer, [held_out], batch_size=4)
    framed = nelbo_perplexity(model, tokenizer, [held_out], batch_size=4, framed=True)
    assert plain["tokens"] == plain["sequences"] * 32
    assert framed["tokens"] == framed["sequences"] * 31  # the context is 32; the BOS of every sequence unscored


def test_ignoring_the_first_token_leaves_it_unscored(tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("To be, or not to be, that is the question. " * 30)
    tokenizer = train_bpe_tokenizer([held_out.read_text()], vocab_size=258)
    model = random_model(std=0.05, vocab_size=len(tokenizer))
    result = nelbo_perplexity(model, tokenizer, [held_out], batch_size=4, ignore_first_token=True)
    assert result["tokens"] == result["sequences"] * 31
